//! `weir advise`: a pool size from the load it must carry, measured live from Weir, taken
//! from a `weir bench` report, or given. The model is in the weir-advisor crate.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{Context, anyhow, bail};
use clap::Args;
use serde_json::{Value, json};
use weir_advisor::{Budget, Inputs};

#[derive(Args)]
pub struct AdviseArgs {
    /// Transactions per second the pool must carry, e.g. 500/s.
    #[arg(long, value_parser = crate::bench::parse_rate)]
    rate: Option<f64>,
    /// Mean time a transaction holds a server connection, e.g. 40ms.
    #[arg(long, value_parser = humantime::parse_duration)]
    service_time: Option<Duration>,
    /// The longest acceptable wait for a connection at --quantile.
    #[arg(long, default_value = "10ms", value_parser = humantime::parse_duration)]
    target_wait: Duration,
    /// Which wait quantile the target is for (0.95: p95).
    #[arg(long, default_value_t = 0.95)]
    quantile: f64,
    /// Highest acceptable share of the pool in use on average.
    #[arg(long, default_value_t = 0.85)]
    max_utilisation: f64,
    /// Measure the load from a running Weir's admin listener (HOST:PORT) over --window.
    #[arg(long)]
    admin: Option<String>,
    #[arg(long, env = "WEIR_ADMIN_TOKEN", hide_env_values = true)]
    admin_token: Option<String>,
    #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
    window: Duration,
    /// Take the load from a `weir bench --json` report.
    #[arg(long)]
    report: Option<PathBuf>,
    /// The server's max_connections, to check the budget.
    #[arg(long)]
    max_connections: Option<u32>,
    /// Connections the server reserves (superuser_reserved_connections + reserved_connections).
    #[arg(long, default_value_t = 3)]
    reserved: u32,
    /// Connections other applications hold on the server.
    #[arg(long, default_value_t = 0)]
    others: u32,
    /// Copies of Weir (or of the application) each with a pool this size.
    #[arg(long, default_value_t = 1)]
    instances: u32,
    /// Print JSON instead of text.
    #[arg(long)]
    json: bool,
}

pub fn main(args: AdviseArgs) -> ExitCode {
    match run(args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("weir advise: {e:#}");
            ExitCode::from(64)
        }
    }
}

/// Where the rate and service time came from, and the figures.
fn measure(args: &AdviseArgs) -> anyhow::Result<(f64, Duration, String)> {
    if let Some(addr) = &args.admin {
        let addr = crate::http::admin_addr(addr)?;
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        let token = args.admin_token.as_deref();
        let (a, b) = rt.block_on(async {
            let a = crate::bench::scrape(addr, token).await?;
            tokio::time::sleep(args.window).await;
            let b = crate::bench::scrape(addr, token).await?;
            anyhow::Ok((a, b))
        })?;
        let n = b.transactions - a.transactions;
        if n <= 0.0 {
            bail!(
                "no transactions through {addr} in {}: measure under load, or give --rate and --service-time",
                humantime::format_duration(args.window)
            );
        }
        let rate = n / args.window.as_secs_f64();
        let service = (b.transaction_seconds - a.transaction_seconds) / n;
        if !(service.is_finite() && service > 0.0) {
            bail!(
                "the counters at {addr} went backwards during the window (a reload replaced a pool?): measure again"
            );
        }
        return Ok((
            rate,
            Duration::from_secs_f64(service),
            format!(
                "measured at {addr} over {}: {n:.0} transactions, mean duration {:.2} ms (weir_transaction_duration_seconds)",
                humantime::format_duration(args.window),
                service * 1e3
            ),
        ));
    }
    if let Some(p) = &args.report {
        let text = std::fs::read_to_string(p).with_context(|| format!("read {}", p.display()))?;
        let r: Value = serde_json::from_str(&text)
            .with_context(|| format!("{} is not a weir bench JSON report", p.display()))?;
        let secs = r["duration_s"]
            .as_f64()
            .context("the report has no duration_s")?;
        if let (Some(n), Some(ms)) = (
            r["pool"]["transactions"].as_f64(),
            r["pool"]["mean_transaction_ms"].as_f64(),
        ) && n > 0.0
            && ms.is_finite()
            && ms > 0.0
        {
            return Ok((
                n / secs,
                Duration::from_secs_f64(ms / 1e3),
                format!(
                    "from {}: Weir's view of the run, {n:.0} transactions in {secs:.1} s, mean {ms:.2} ms",
                    p.display()
                ),
            ));
        }
        let rps = r["throughput_per_s"]
            .as_f64()
            .context("the report has no throughput_per_s")?;
        let mean = r["latency_ms"]["mean"]
            .as_f64()
            .context("the report has no latency_ms.mean")?;
        if !(mean.is_finite() && mean > 0.0 && rps > 0.0) {
            bail!("the report has no successful requests to size a pool from");
        }
        return Ok((
            rps,
            Duration::from_secs_f64(mean / 1e3),
            format!(
                "from {}: requests as transactions, {rps:.1}/s with mean latency {mean:.2} ms (the client's view: \
                 it includes waiting, so the size errs large; bench with --admin for Weir's view)",
                p.display()
            ),
        ));
    }
    match (args.rate, args.service_time) {
        (Some(r), Some(s)) => Ok((r, s, "given".into())),
        _ => Err(anyhow!(
            "give --rate and --service-time, or --admin HOST:PORT to measure a running Weir, or --report BENCH.json"
        )),
    }
}

fn run(args: AdviseArgs) -> anyhow::Result<()> {
    let (mut rate, mut service, mut source) = measure(&args)?;
    // Given figures override measured ones.
    if args.admin.is_some() || args.report.is_some() {
        if let Some(r) = args.rate {
            rate = r;
            source.push_str("; rate as given");
        }
        if let Some(s) = args.service_time {
            service = s;
            source.push_str("; service time as given");
        }
    }
    let advice = weir_advisor::advise(Inputs {
        rate,
        service_time: service,
        target_wait: args.target_wait,
        quantile: args.quantile,
        max_utilisation: args.max_utilisation,
        budget: args.max_connections.map(|m| Budget {
            max_connections: m,
            reserved: args.reserved,
            others: args.others,
            instances: args.instances,
        }),
    })
    .map_err(|e| anyhow!(e))?;
    if args.json {
        let mut j = advice.json();
        j["source"] = json!(source);
        println!("{}", serde_json::to_string_pretty(&j)?);
    } else {
        println!("Source: {source}");
        print!("{}", advice.text());
    }
    Ok(())
}
