//! `weir demo`: a throwaway PostgreSQL, Weir in front of it, and the seeds' peak scenario
//! (a ramp to 500 web clients, then a steady phase, scaled to `--duration`) through Weir,
//! from many more clients than server connections, reported as it runs.

use std::time::Duration;

use anyhow::Context;
use clap::Args;
use weir_bench::{Arrivals, Plan, Scenario, Workload};
use weir_config::PoolMode;
use weir_testkit::{PgServer, SCRAM_USER, SUPERUSER};

#[derive(Args)]
pub struct DemoArgs {
    /// The load: a preset (baseline, peak, spike, endurance) or a scenario TOML file.
    #[arg(long, default_value = "peak")]
    scenario: String,
    /// Concurrent clients at the scenario's peak (default: the scenario's own, 500 for peak).
    #[arg(long)]
    clients: Option<usize>,
    /// Server connections in Weir's pool.
    #[arg(long, default_value_t = 50)]
    pool_size: u32,
    /// How long to run the load (the scenario's phases are scaled to fit).
    #[arg(long, default_value = "30s", value_parser = humantime::parse_duration)]
    duration: Duration,
    /// Server time of the middle query of each request (of every query, for `sleep`).
    #[arg(long, default_value = "5ms", value_parser = humantime::parse_duration)]
    server_time: Duration,
    /// `web`: a lookup, server work, an update half the time. `sleep`: 2 or 3 queries, each
    /// `--server-time` long (the seeds' peak: --clients 500 --pool-size 50 --server-time 40ms).
    #[arg(long, default_value = "web", value_parser = ["web", "sleep"])]
    workload: String,
}

pub async fn demo(args: DemoArgs) -> anyhow::Result<()> {
    let mut scenario = Scenario::preset_or_file(&args.scenario)
        .map_err(|e| anyhow::anyhow!(e))?
        .scaled_to(args.duration);
    if scenario.mode != weir_bench::Loop::Closed {
        anyhow::bail!("the demo runs closed-loop scenarios (clients, not rate)");
    }
    if let Some(c) = args.clients {
        let f = c as f64 / scenario.peak();
        for p in &mut scenario.phases {
            p.level = (p.level * f).round();
        }
    }
    let clients = scenario.peak() as usize;
    println!("Starting a throwaway PostgreSQL from the system's binaries...");
    let pg = tokio::task::spawn_blocking(|| {
        let pg = PgServer::start();
        pg.create_database("demo");
        pg
    })
    .await
    .context("start PostgreSQL")?;
    let version = pg.psql_script("demo", "show server_version");
    let config = weir_testkit::weir_config(&pg, "demo", args.pool_size, PoolMode::Transaction);
    let weir = weir_proxy::Proxy::start(config).await?;
    let admin_http = weir_testkit::start_admin(&weir).await;
    let addr = weir.local_addr();
    println!(
        "PostgreSQL {version} listens on 127.0.0.1:{}; Weir listens on {addr}",
        pg.port
    );
    println!(
        "Weir pools the `demo` database in transaction mode with pool_size {}.",
        args.pool_size
    );

    let (admin, conn) =
        tokio_postgres::connect(&pg.url(SUPERUSER, "demo"), tokio_postgres::NoTls).await?;
    tokio::spawn(conn);
    let accounts = 10_000;
    Workload::prepare_schema(&admin, accounts).await?;
    admin
        .batch_execute("grant all on demo_accounts to public")
        .await?;

    println!(
        "\nDashboard: http://{}/   (Prometheus metrics at /metrics, pool JSON at /health/pool)\n\
         Load: the {} scenario, up to {} clients, each looping a web request (a lookup, {} of server work, an update half the time), for {}.\n\
         Try it yourself meanwhile: psql 'postgres://{}:{}@{addr}/demo'\n",
        admin_http.addr,
        scenario.name,
        clients,
        humantime::format_duration(args.server_time),
        humantime::format_duration(args.duration),
        SCRAM_USER.user,
        SCRAM_USER.password,
    );
    let url = weir_testkit::weir_url(&weir, SCRAM_USER, "demo");
    let pool = weir.shared().pools.all();
    let mut peak_servers = 0usize;
    let workload = match args.workload.as_str() {
        "sleep" => Workload::SleepQueries {
            server_time: args.server_time,
        },
        _ => Workload::WebRequest {
            server_time: args.server_time,
            accounts,
        },
    };
    let plan = Plan {
        url: url.clone(),
        scenario,
        workload,
        connections: clients,
        arrivals: Arrivals::Poisson,
    };
    let report = weir_bench::run(&plan, |p| {
        let snap = weir.shared().pools.all().first().map(|p| p.pool.snapshot()).unwrap_or_default();
        peak_servers = peak_servers.max(snap.size);
        println!(
            "[{:>3.0}s] {:>4.0} clients {:>7.0} req/s  p95 {:>7.1} ms  errors {:<4} | pool: {:>3} active {:>3} idle {:>4} waiting",
            p.elapsed.as_secs_f64(),
            p.level,
            p.rate,
            p.p95_ms,
            p.errors,
            snap.active,
            snap.idle,
            snap.waiting,
        );
    })
    .await;
    drop(pool);
    let servers: i64 = admin
        .query_one(
            "select count(*) from pg_stat_activity where datname = 'demo' and usename = $1",
            &[&SCRAM_USER.user],
        )
        .await?
        .get(0);
    let snap = weir
        .shared()
        .pools
        .all()
        .first()
        .map(|p| p.pool.snapshot())
        .unwrap_or_default();

    println!("\nDone in {:.1} s.", report.elapsed.as_secs_f64());
    println!(
        "  requests      {} ({:.0}/s), errors {}{}",
        report.requests,
        report.throughput(),
        report.error_count(),
        if report.errors.is_empty() {
            String::new()
        } else {
            format!(" {:?}", report.errors)
        }
    );
    println!(
        "  latency       p50 {:.1} ms, p95 {:.1} ms, p99 {:.1} ms, max {:.1} ms",
        report.ms(0.50),
        report.ms(0.95),
        report.ms(0.99),
        report.latency.max() as f64 / 1000.0
    );
    println!(
        "  connections   {} clients shared at most {} server connections (pg_stat_activity now: {servers})",
        clients, peak_servers
    );
    let pool_stats = weir.shared().pools.all().first().map(|p| p.pool.clone());
    let wait = |q| {
        pool_stats
            .as_ref()
            .map_or(0.0, |p| p.stats().wait_quantile(q).as_secs_f64() * 1000.0)
    };
    println!(
        "  pool          {} checkouts, {} waited, {} timed out; wait p50 {:.1} ms, p95 {:.1} ms, p99 {:.1} ms",
        snap.checkouts,
        snap.waited,
        snap.timeouts,
        wait(0.50),
        wait(0.95),
        wait(0.99)
    );
    weir.stop();
    drop(admin);
    tokio::task::spawn_blocking(move || drop(pg)).await?;
    Ok(())
}
