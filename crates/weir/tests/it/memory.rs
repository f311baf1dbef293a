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

/// Weir turns transparent huge pages off for itself. Its allocator asks the kernel for them,
/// and a 2 MiB page stays resident whole while a few clients use part of it: idle memory per
/// client read 1,887 bytes with them and 1,599 without (docs/BENCHMARKS.md, 2026-12-02 14:30).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_transparent_huge_pages_under_idle_clients() {
    let (pg, db) = shared_pg_database("nothp").await;
    let weir = WeirProcess::quick_start(&pg.url(SCRAM_USER, &db), 2);
    let mut clients = Vec::new();
    for _ in 0..200 {
        clients.push(connect(&weir.url(SCRAM_USER, &db)).await.unwrap());
    }
    for c in &clients {
        c.simple_query("select 1").await.unwrap();
    }
    let pid = weir.child.id();
    let field = |file: &str, name: &str| -> u64 {
        let text = std::fs::read_to_string(format!("/proc/{pid}/{file}")).unwrap();
        let line = text
            .lines()
            .find(|l| l.starts_with(name))
            .unwrap_or_else(|| panic!("no {name} in /proc/{pid}/{file}"));
        line[name.len()..]
            .split_whitespace()
            .next()
            .unwrap()
            .parse()
            .unwrap()
    };
    assert_eq!(field("status", "THP_enabled:"), 0, "THP still on for weir");
    // Where THP is `always`, pages touched before `main` turned it off may be huge; elsewhere
    // (`madvise`, as on the machines this was measured on, or `never`) there must be none.
    let mode =
        std::fs::read_to_string("/sys/kernel/mm/transparent_hugepage/enabled").unwrap_or_default();
    if mode.contains("[always]") {
        eprintln!("THP is always on here: huge pages from before main are not checked");
    } else {
        assert_eq!(
            field("smaps_rollup", "AnonHugePages:"),
            0,
            "weir's memory is in huge pages (THP: {})",
            mode.trim()
        );
    }
    drop(clients);
}
