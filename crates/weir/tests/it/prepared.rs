//! Prepared statements in transaction mode with a pool smaller than the client count.

use std::sync::Arc;

use crate::common::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fifty_clients_pool_five_reuse_statements() {
    let s = Setup::new("prep50", 5, PoolMode::Transaction).await;
    s.sql("create table items (id int primary key, n int not null default 0); insert into items select g, 0 from generate_series(1, 50) g; grant all on items to public");
    let mut tasks = Vec::new();
    for id in 1..=50i32 {
        let url = s.url(SCRAM_USER);
        tasks.push(tokio::spawn(async move {
            let c = connect(&url).await.unwrap();
            let bump = c
                .prepare("update items set n = n + 1 where id = $1")
                .await
                .unwrap();
            let read = c
                .prepare("select n from items where id = $1")
                .await
                .unwrap();
            for i in 0..1000 {
                if i % 10 == 0 {
                    // An explicit transaction using both statements.
                    c.batch_execute("begin").await.unwrap();
                    c.execute(&bump, &[&id]).await.unwrap();
                    let n: i32 = c.query_one(&read, &[&id]).await.unwrap().get(0);
                    assert_eq!(n, i + 1);
                    c.batch_execute("commit").await.unwrap();
                } else {
                    c.execute(&bump, &[&id]).await.unwrap();
                }
            }
            let n: i32 = c.query_one(&read, &[&id]).await.unwrap().get(0);
            assert_eq!(n, 1000);
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    assert_eq!(s.sql("select sum(n) from items"), "50000");
    assert!(s.backends() <= 5);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn same_statement_name_different_sql_per_client() {
    // One server connection: both clients' statements live on it at once.
    let s = Setup::new("prepname", 1, PoolMode::Transaction).await;
    let a = s.client().await;
    let b = s.client().await;
    // tokio-postgres names each connection's first statement "s0": same name, different SQL.
    let sa = a.prepare("select 'from a'::text, $1::int").await.unwrap();
    let sb = b
        .prepare("select 'from b'::text, $1::int * 100")
        .await
        .unwrap();
    for i in 0..50i32 {
        let ra = a.query_one(&sa, &[&i]).await.unwrap();
        let rb = b.query_one(&sb, &[&i]).await.unwrap();
        assert_eq!(
            (ra.get::<_, String>(0), ra.get::<_, i32>(1)),
            ("from a".to_string(), i)
        );
        assert_eq!(
            (rb.get::<_, String>(0), rb.get::<_, i32>(1)),
            ("from b".to_string(), i * 100)
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn close_deallocate_and_discard_behave_as_on_postgres() {
    let s = Setup::new("prepclose", 2, PoolMode::Transaction).await;
    let c = s.client().await;
    let st = c.prepare("select 1").await.unwrap();
    assert_eq!(c.query_one(&st, &[]).await.unwrap().get::<_, i32>(0), 1);
    // DEALLOCATE ALL removes the client's statements: using one now fails as on PostgreSQL.
    c.batch_execute("DEALLOCATE ALL").await.unwrap();
    let e = c.query_one(&st, &[]).await.unwrap_err();
    assert_eq!(code(&e), "26000");
    // DEALLOCATE of an unknown name is the server's error.
    let e = c.batch_execute("DEALLOCATE nope").await.unwrap_err();
    assert_eq!(code(&e), "26000");
    // Prepared again after DISCARD ALL: a fresh statement works, an old one does not.
    let st2 = c.prepare("select 2").await.unwrap();
    c.batch_execute("DISCARD ALL").await.unwrap();
    assert_eq!(code(&c.query_one(&st2, &[]).await.unwrap_err()), "26000");
    let st3 = c.prepare("select 3").await.unwrap();
    assert_eq!(c.query_one(&st3, &[]).await.unwrap().get::<_, i32>(0), 3);
    // Dropping a statement sends Close; the shared server statement stays for others.
    let other = s.client().await;
    let o = other.prepare("select 3").await.unwrap();
    drop(st3);
    assert_eq!(other.query_one(&o, &[]).await.unwrap().get::<_, i32>(0), 3);
}

/// One server connection that keeps at most four statements.
async fn pool_of_one_caching_four(prefix: &str) -> Setup {
    Setup::with_config(prefix, |pg, db| {
        let mut c = weir_config(pg, db, 1, PoolMode::Transaction);
        c.pool.prepared_statements_cache = Some(4);
        c
    })
    .await
}

/// Statements Weir prepared on the server connection `c`'s queries run on.
async fn weir_statements_on_server(c: &tokio_postgres::Client) -> i64 {
    c.query_one(
        "select count(*) from pg_prepared_statements where name like 'weir_%'",
        &[],
    )
    .await
    .unwrap()
    .get(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn statement_cache_bound_is_respected() {
    let s = pool_of_one_caching_four("prepbound").await;
    let c = Arc::new(s.client().await);
    let mut stmts = Vec::new();
    for i in 0..20 {
        stmts.push(c.prepare(&format!("select {i}")).await.unwrap());
    }
    // Every statement still works although the server holds at most a few at a time.
    for round in 0..3 {
        for (i, st) in stmts.iter().enumerate() {
            assert_eq!(
                c.query_one(st, &[]).await.unwrap().get::<_, i32>(0),
                i as i32,
                "round {round}"
            );
        }
    }
    let held = s.sql("select count(*) from pg_prepared_statements");
    assert_eq!(
        held, "0",
        "psql's own backend has none; sanity check of the query"
    );
    let direct_count = weir_statements_on_server(&c).await;
    assert!(
        direct_count <= 5,
        "server holds {direct_count} statements, bound is 4 (+1 in flight)"
    );
}

/// A client's named statements are held to `max_client_prepared_bytes`: closed ones give
/// their bytes back (a client that prepares and drops statements forever never reaches it),
/// and one that keeps piling them up is closed with 54000 naming the setting, where before
/// it could grow Weir's memory without bound. Other clients carry on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_clients_prepared_statements_are_held_to_their_byte_budget() {
    let s = Setup::with_config("prepbudget", |pg, db| {
        let mut c = weir_config(pg, db, 2, PoolMode::Transaction);
        c.pool.max_client_prepared_bytes = Some(8192);
        c
    })
    .await;
    // About 1 KB a statement.
    let text = |i: usize| format!("select {i} as n, '{}' as pad", "x".repeat(1000));
    let c = s.client().await;
    for i in 0..40 {
        let st = c.prepare(&text(i)).await.unwrap();
        let n: i32 = c.query_one(&st, &[]).await.unwrap().get(0);
        assert_eq!(n, i as i32);
        // Dropping the statement closes it (tokio-postgres sends Close).
    }
    let mut kept = Vec::new();
    let err = loop {
        match c.prepare(&text(100 + kept.len())).await {
            Ok(st) => kept.push(st),
            Err(e) => break e,
        }
        assert!(
            kept.len() < 20,
            "8 KB should not hold 20 statements of 1 KB"
        );
    };
    assert!(
        (5..=8).contains(&kept.len()),
        "{} statements of ~1 KB fit in 8 KB",
        kept.len()
    );
    let db = err.as_db_error().expect("an error from weir");
    assert_eq!(
        db.code(),
        &tokio_postgres::error::SqlState::PROGRAM_LIMIT_EXCEEDED
    );
    assert!(db.message().contains("max_client_prepared_bytes"), "{db}");
    assert!(c.is_closed() || c.simple_query("select 1").await.is_err());
    // Another client is unaffected.
    let other = s.client().await;
    let st = other.prepare(&text(7)).await.unwrap();
    assert_eq!(other.query_one(&st, &[]).await.unwrap().get::<_, i32>(0), 7);
}

/// A transaction may take a server connection's statements past
/// `prepared_statements_cache` (nothing is closed while a portal could depend on it); the
/// next statement prepared outside one brings the set back to the bound, where it used to
/// close one statement and stay over it for good.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_transaction_over_the_statement_cache_is_trimmed_after_it() {
    let s = pool_of_one_caching_four("preptrim").await;
    let c = s.client().await;
    c.batch_execute("begin").await.unwrap();
    for i in 0..10 {
        let st = c.prepare(&format!("select {i} + 100")).await.unwrap();
        assert_eq!(
            c.query_one(&st, &[]).await.unwrap().get::<_, i32>(0),
            i + 100
        );
    }
    assert!(
        weir_statements_on_server(&c).await >= 10,
        "all kept inside the transaction"
    );
    c.batch_execute("commit").await.unwrap();
    let st = c.prepare("select 42").await.unwrap();
    assert_eq!(c.query_one(&st, &[]).await.unwrap().get::<_, i32>(0), 42);
    let after = weir_statements_on_server(&c).await;
    assert!(
        after <= 5,
        "server holds {after} statements, bound is 4 (+1 in flight)"
    );
}

/// Runs `query` (one column) prepared on both server connections of a pool of two: each
/// client holds one in a transaction while it does.
async fn on_both_connections(a: &tokio_postgres::Client, b: &tokio_postgres::Client, query: &str) {
    a.batch_execute("begin").await.unwrap();
    b.batch_execute("begin").await.unwrap();
    for c in [a, b] {
        let st = c.prepare(query).await.unwrap();
        assert_eq!(c.query_one(&st, &[]).await.unwrap().len(), 1);
    }
    a.batch_execute("commit").await.unwrap();
    b.batch_execute("commit").await.unwrap();
}

/// A schema change that changes a statement's result (a column added under `select *`) makes
/// PostgreSQL refuse the plan it cached: "cached plan must not change result type" (0A000).
/// A driver prepares the statement again, under a new name, but the new name maps to the same
/// shared server statement, so without Weir's help it would fail on every connection that
/// holds the old plan until that connection closes. Weir closes and prepares it again, on the
/// connection that failed and on the database's others: one failure at most, then every
/// connection serves the new result.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_schema_change_under_a_shared_statement_is_prepared_again_everywhere() {
    let s = Setup::new("prepddl", 2, PoolMode::Transaction).await;
    s.sql("create table shape (a int); insert into shape values (1); grant all on shape to public");
    let a = s.client().await;
    let b = s.client().await;
    let query = "select * from shape";
    on_both_connections(&a, &b, query).await;

    s.sql("alter table shape add column b text default 'new'");

    // Whoever runs it first may get the stale plan's error, once; a driver then prepares it
    // again (tokio-postgres leaves that to the caller).
    let mut failures = 0;
    async fn run(c: &tokio_postgres::Client) -> Result<tokio_postgres::Row, tokio_postgres::Error> {
        let st = c.prepare("select * from shape").await?;
        c.query_one(&st, &[]).await
    }
    match run(&a).await {
        Ok(row) => assert_eq!(row.len(), 2),
        Err(e) => {
            assert_eq!(
                e.code(),
                Some(&tokio_postgres::error::SqlState::FEATURE_NOT_SUPPORTED),
                "{e}"
            );
            failures += 1;
        }
    }
    // Then both connections serve the new shape, however the clients land on them.
    for _ in 0..5 {
        a.batch_execute("begin").await.unwrap();
        b.batch_execute("begin").await.unwrap();
        for c in [&a, &b] {
            let row = run(c)
                .await
                .unwrap_or_else(|e| panic!("after the first failure: {e}"));
            assert_eq!(row.len(), 2);
            assert_eq!(row.get::<_, String>(1), "new");
        }
        a.batch_execute("commit").await.unwrap();
        b.batch_execute("commit").await.unwrap();
    }
    assert!(failures <= 1);
}

/// A connection learns of outdated plans at its next batch, inside a transaction too: the
/// transaction runs the statement prepared afresh instead of failing on the old plan, and a
/// portal it has open reads on (PostgreSQL keeps a portal when its statement is closed).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_open_transaction_picks_up_a_schema_change_seen_elsewhere() {
    let s = Setup::new("prepddltx", 2, PoolMode::Transaction).await;
    s.sql(
        "create table shape2 (a int); insert into shape2 values (1); grant all on shape2 to public",
    );
    let mut a = s.client().await;
    let b = s.client().await;
    let query = "select * from shape2";
    on_both_connections(&a, &b, query).await;
    // a opens a transaction with a portal; b runs on the other connection.
    let series = a
        .prepare("select g from generate_series(1, 100) g")
        .await
        .unwrap();
    let tx = a.transaction().await.unwrap();
    let portal = tx.bind(&series, &[]).await.unwrap();
    assert_eq!(tx.query_portal(&portal, 10).await.unwrap().len(), 10);
    s.sql("alter table shape2 add column b int default 7");
    // (The Describe of tokio-postgres's prepare is refused already.)
    let e = async {
        let st = b.prepare(query).await?;
        b.query_one(&st, &[]).await
    }
    .await
    .unwrap_err();
    assert_eq!(
        e.code(),
        Some(&tokio_postgres::error::SqlState::FEATURE_NOT_SUPPORTED),
        "{e}"
    );
    // a's connection still holds the old plan; its transaction gets the new one.
    let st = tx.prepare(query).await.unwrap();
    let row = tx.query_one(&st, &[]).await.unwrap();
    assert_eq!(row.get::<_, i32>(1), 7);
    let rest = tx.query_portal(&portal, 100).await.unwrap();
    assert_eq!(rest.len(), 90);
    assert_eq!(rest[0].get::<_, i32>(0), 11);
    tx.commit().await.unwrap();
}
