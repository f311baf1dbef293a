//! The protocol relayed through Weir to a real PostgreSQL, with real drivers.

mod common;
use common::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn simple_and_extended_queries() {
    let s = Setup::new("proto", 2, PoolMode::Transaction).await;
    let c = s.client().await;
    let rows = c
        .simple_query("select 1 as a; select 'x' as b")
        .await
        .unwrap();
    let values: Vec<String> = rows
        .iter()
        .filter_map(|m| match m {
            tokio_postgres::SimpleQueryMessage::Row(r) => Some(r.get(0).unwrap().to_string()),
            _ => None,
        })
        .collect();
    assert_eq!(
        values,
        vec!["1", "x"],
        "multi-statement simple query returns both results"
    );
    let row = c.query_one("select $1::int + 1", &[&41i32]).await.unwrap();
    assert_eq!(row.get::<_, i32>(0), 42);
}
