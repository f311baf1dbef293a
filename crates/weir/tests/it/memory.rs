//! Weir's memory does not grow with the size of a result.

use futures_util::TryStreamExt;

use crate::common::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_gigabyte_result_in_bounded_memory() {
    let (pg, db) = shared_pg_database("bigresult").await;
    let weir = WeirProcess::quick_start(&pg.url(SCRAM_USER, &db), 2);
    let c = connect(&weir.url(SCRAM_USER, &db)).await.unwrap();
    // 1,100,000 rows of 1,000 bytes: over a gigabyte of DataRows through Weir.
    let stream = c
        .query_raw(
            "select repeat('x', 1000) from generate_series(1, 1100000)",
            std::iter::empty::<i32>(),
        )
        .await
        .unwrap();
    futures_util::pin_mut!(stream);
    let mut bytes = 0u64;
    let mut rows = 0u64;
    while let Some(row) = stream.try_next().await.unwrap() {
        bytes += row.get::<_, &str>(0).len() as u64;
        rows += 1;
    }
    assert_eq!(rows, 1_100_000);
    assert!(bytes > 1_000_000_000);
    let peak = weir.peak_rss();
    eprintln!(
        "weir peak RSS after a {bytes}-byte result: {:.1} MB",
        peak as f64 / 1e6
    );
    assert!(peak < 64 * 1024 * 1024, "peak RSS {peak} bytes");
}
