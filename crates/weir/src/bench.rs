//! `weir bench`: a load against any PostgreSQL endpoint, with SLO gates; and
//! `weir bench compare`: a Markdown before/after report. Exit codes: 0 GO (or no gates),
//! 1 NO-GO, 64 usage or a target that could not be reached or prepared.

use std::io::{IsTerminal, Write as _};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{Context, anyhow};
use clap::{Args, Subcommand};
use serde_json::Value;
use weir_bench::{Arrivals, Loop, Plan, PoolView, Scenario, Script, Workload, slo};

#[derive(Args)]
#[command(args_conflicts_with_subcommands = true)]
pub struct BenchArgs {
    #[command(subcommand)]
    cmd: Option<BenchCmd>,
    #[command(flatten)]
    run: RunArgs,
}

#[derive(Subcommand)]
enum BenchCmd {
    /// A Markdown report of two JSON reports: each figure before and after, its change, and
    /// the gates (from --slo, or those AFTER was run with) checked on AFTER.
    Compare {
        before: PathBuf,
        after: PathBuf,
        #[arg(long)]
        slo: Option<String>,
        /// Write the report here as well as to stdout.
        #[arg(long)]
        out: Option<PathBuf>,
    },
}

#[derive(Args)]
struct RunArgs {
    /// What to load: postgres://USER:PASS@HOST:PORT/DB (Weir, PgBouncer, PostgreSQL...).
    #[arg(long, env = "WEIR_BENCH_URL", hide_env_values = true)]
    url: Option<String>,
    /// Closed loop: concurrent clients (default 10). Open loop: connections serving the
    /// schedule (default 100).
    #[arg(long)]
    clients: Option<u32>,
    /// Open loop at this arrival rate, e.g. 500/s (latency counts from the scheduled start).
    #[arg(long, value_parser = parse_rate, conflicts_with = "scenario")]
    rate: Option<f64>,
    /// How long (default 30s); with --scenario, the scenario is scaled to fit.
    #[arg(long, value_parser = humantime::parse_duration)]
    duration: Option<Duration>,
    /// select-only, web (a lookup, --server-time of work, an update half the time), sleep (2
    /// or 3 queries of --server-time), tpcb, custom (--script). Default: the scenario's, or web.
    #[arg(long)]
    workload: Option<String>,
    /// Server time of the web and sleep workloads' work queries (default 5ms).
    #[arg(long, value_parser = humantime::parse_duration)]
    server_time: Option<Duration>,
    /// A custom script: SQL statements ending in `;`, `\set NAME random(LO, HI)`, `:NAME`.
    #[arg(long)]
    script: Option<PathBuf>,
    /// A preset (baseline, peak, spike, endurance) or a scenario TOML file.
    #[arg(long)]
    scenario: Option<String>,
    /// Gates: 'p95<400ms,errors<1%'. Exit 0 when all pass (GO), 1 when one fails (NO-GO).
    #[arg(long)]
    slo: Option<String>,
    /// Write the report as JSON here (schema in docs/BENCH.md).
    #[arg(long)]
    json: Option<PathBuf>,
    /// Weir's admin listener (HOST:PORT): adds pool utilisation and pool wait p95 over the run.
    #[arg(long)]
    admin: Option<String>,
    /// Token for --admin.
    #[arg(long, env = "WEIR_ADMIN_TOKEN", hide_env_values = true)]
    admin_token: Option<String>,
    /// Open-loop arrivals: poisson or uniform.
    #[arg(long, default_value = "poisson", value_parser = ["poisson", "uniform"])]
    arrivals: String,
    /// No progress line.
    #[arg(long)]
    quiet: bool,
}

/// `500/s` or `500`: requests (or transactions) per second. Shared with `weir advise`.
pub fn parse_rate(s: &str) -> Result<f64, String> {
    let n = s.trim().trim_end_matches("/s").trim();
    match n.parse::<f64>() {
        Ok(r) if r > 0.0 && r.is_finite() => Ok(r),
        _ => Err(format!("`{s}` is not a rate: write it like 500/s")),
    }
}

pub fn main(args: BenchArgs) -> ExitCode {
    let r = match args.cmd {
        Some(BenchCmd::Compare {
            before,
            after,
            slo,
            out,
        }) => compare(before, after, slo, out),
        None => crate::multi_thread_runtime().and_then(|rt| rt.block_on(run(args.run))),
    };
    r.unwrap_or_else(|e| {
        eprintln!("weir bench: {e:#}");
        ExitCode::from(64)
    })
}

fn read_json(p: &PathBuf) -> anyhow::Result<Value> {
    let text = std::fs::read_to_string(p).with_context(|| format!("read {}", p.display()))?;
    serde_json::from_str(&text).with_context(|| format!("{} is not a JSON report", p.display()))
}

fn compare(
    before: PathBuf,
    after: PathBuf,
    slo: Option<String>,
    out: Option<PathBuf>,
) -> anyhow::Result<ExitCode> {
    let (b, a) = (read_json(&before)?, read_json(&after)?);
    let spec = slo.or_else(|| a["slo"]["spec"].as_str().map(str::to_string));
    let gates = match spec {
        Some(s) => slo::parse(&s).map_err(|e| anyhow!("--slo: {e}"))?,
        None => Vec::new(),
    };
    let (md, pass) = weir_bench::compare::compare(&b, &a, &gates);
    print!("{md}");
    if let Some(p) = out {
        std::fs::write(&p, &md).with_context(|| format!("write {}", p.display()))?;
    }
    Ok(if pass {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

/// Parses everything before the run starts, so a typo costs no load.
fn plan(args: &RunArgs) -> anyhow::Result<(Plan, Option<Vec<slo::Gate>>)> {
    let url = args
        .url
        .clone()
        .context("give --url postgres://USER:PASS@HOST:PORT/DB (or WEIR_BENCH_URL)")?;
    let gates = args
        .slo
        .as_deref()
        .map(slo::parse)
        .transpose()
        .map_err(|e| anyhow!("--slo: {e}"))?;
    let scenario = match (&args.scenario, args.rate) {
        (Some(s), _) => {
            let sc = Scenario::preset_or_file(s).map_err(|e| anyhow!(e))?;
            match args.duration {
                Some(d) => sc.scaled_to(d),
                None => sc,
            }
        }
        (None, Some(rate)) => Scenario::single(
            Loop::Open,
            rate,
            args.duration.unwrap_or(Duration::from_secs(30)),
        ),
        (None, None) => Scenario::single(
            Loop::Closed,
            args.clients.unwrap_or(10) as f64,
            args.duration.unwrap_or(Duration::from_secs(30)),
        ),
    };
    let script = args
        .script
        .as_ref()
        .map(|p| {
            let text =
                std::fs::read_to_string(p).with_context(|| format!("read {}", p.display()))?;
            Script::parse(&text).map_err(|e| anyhow!("{}: {e}", p.display()))
        })
        .transpose()?;
    let name = args
        .workload
        .clone()
        .or_else(|| scenario.workload.clone())
        .unwrap_or_else(|| if script.is_some() { "custom" } else { "web" }.into());
    let server_time = args
        .server_time
        .or(scenario.server_time)
        .unwrap_or(Duration::from_millis(5));
    let workload = Workload::named(&name, server_time, script).map_err(|e| anyhow!(e))?;
    let connections = args.clients.unwrap_or(100) as usize;
    Ok((
        Plan {
            url,
            scenario,
            workload,
            connections,
            arrivals: if args.arrivals == "uniform" {
                Arrivals::Uniform
            } else {
                Arrivals::Poisson
            },
        },
        gates,
    ))
}

async fn run(args: RunArgs) -> anyhow::Result<ExitCode> {
    let (plan, gates) = plan(&args)?;
    let admin = args
        .admin
        .as_deref()
        .map(crate::http::admin_addr)
        .transpose()?;
    let token = args.admin_token.clone();

    // The workload's tables, through the target itself.
    let (client, conn) = tokio_postgres::connect(&plan.url, tokio_postgres::NoTls)
        .await
        .with_context(|| format!("connect to {}", weir_bench::redact(&plan.url)))?;
    tokio::spawn(conn);
    plan.workload
        .ensure_schema(&client)
        .await
        .context("create the workload's tables")?;
    drop(client);

    let before = match admin {
        Some(a) => Some(scrape(a, token.as_deref()).await?),
        None => None,
    };
    let samples = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let sampler =
        admin.map(|a| tokio::spawn(sample_utilisation(a, token.clone(), samples.clone())));
    let mode = plan.scenario.mode;
    let tty = std::io::stderr().is_terminal() && !args.quiet;
    let quiet = args.quiet;
    let mut report = weir_bench::run(&plan, |p| {
        if quiet {
            return;
        }
        let frac = p.elapsed.as_secs_f64() / p.total.as_secs_f64().max(1e-9);
        let filled = (frac * 20.0).round() as usize;
        let bar: String = "#".repeat(filled.min(20)) + &"-".repeat(20 - filled.min(20));
        let level = match mode {
            Loop::Closed => format!("{:.0} clients", p.level),
            Loop::Open => format!("{:.0}/s target", p.level),
        };
        let line = format!(
            "[{bar}] {:>4.0}s/{:.0}s {level:>14}  {:>8.1} req/s  p95 {:>8.2} ms  errors {}",
            p.elapsed.as_secs_f64(),
            p.total.as_secs_f64(),
            p.rate,
            p.p95_ms,
            p.errors
        );
        if tty {
            eprint!("\r{line}");
        } else {
            eprintln!("{line}");
        }
        let _ = std::io::stderr().flush();
    })
    .await;
    if tty {
        eprintln!();
    }
    if let (Some(a), Some(before), Some(sampler)) = (admin, before, sampler) {
        sampler.abort();
        let after = scrape(a, token.as_deref()).await?;
        report.pool = Some(pool_view(&before, &after, &samples.lock().unwrap()));
    }
    let mut json = report.json();
    print!("{}", report.text());
    let mut code = ExitCode::SUCCESS;
    if let Some(gates) = &gates {
        let verdicts: Vec<slo::Verdict> = gates.iter().map(|g| g.check(&json)).collect();
        let go = verdicts.iter().all(|v| v.pass);
        println!("\n  {:<24} {:>14}  verdict", "gate", "actual");
        for v in &verdicts {
            println!(
                "  {:<24} {:>14}  {}",
                v.gate.text,
                v.actual.map_or("n/a".into(), |a| v.gate.show(a)),
                if v.pass { "PASS" } else { "FAIL" }
            );
        }
        println!(
            "\n  {}",
            if go {
                "GO: every gate passes"
            } else {
                "NO-GO: a gate failed"
            }
        );
        json["slo"] = serde_json::json!({
            "spec": args.slo,
            "gates": verdicts.iter().map(|v| serde_json::json!({
                "gate": v.gate.text, "actual": v.actual, "pass": v.pass,
            })).collect::<Vec<_>>(),
            "verdict": if go { "GO" } else { "NO-GO" },
        });
        if !go {
            code = ExitCode::FAILURE;
        }
    }
    if let Some(p) = &args.json {
        std::fs::write(p, serde_json::to_string_pretty(&json)? + "\n")
            .with_context(|| format!("write {}", p.display()))?;
    }
    Ok(code)
}

/// Samples the utilisation (percent of pool size in use, all pools) once a second.
async fn sample_utilisation(
    admin: SocketAddr,
    token: Option<String>,
    samples: std::sync::Arc<std::sync::Mutex<Vec<f64>>>,
) {
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    loop {
        tick.tick().await;
        if let Ok(text) = crate::http::get_text(admin, "/health/pool", token.as_deref()).await
            && let Ok(v) = serde_json::from_str::<Value>(&text)
            && let Some(pct) = v["total"]["utilisation"]["percent"].as_f64()
        {
            samples.lock().unwrap().push(pct);
        }
    }
}

/// What /metrics said at one moment: the pool wait histogram (cumulative buckets, all pools
/// summed) and the transaction count and total duration.
#[derive(Debug, Default, Clone)]
pub struct Scrape {
    pub wait_buckets: Vec<(f64, f64)>,
    pub transactions: f64,
    pub transaction_seconds: f64,
}

fn number(v: &prometheus_parse::Value) -> Option<f64> {
    use prometheus_parse::Value as V;
    match v {
        V::Counter(x) | V::Gauge(x) | V::Untyped(x) => Some(*x),
        _ => None,
    }
}

pub async fn scrape(admin: SocketAddr, token: Option<&str>) -> anyhow::Result<Scrape> {
    let text = crate::http::get_text(admin, "/metrics", token).await?;
    let lines = text.lines().map(|l| Ok(l.to_string()));
    let parsed = prometheus_parse::Scrape::parse(lines).context("parse /metrics")?;
    let mut s = Scrape::default();
    for m in &parsed.samples {
        match (m.metric.as_str(), &m.value) {
            ("weir_pool_wait_seconds", prometheus_parse::Value::Histogram(b)) => {
                for (i, hc) in b.iter().enumerate() {
                    if s.wait_buckets.len() <= i {
                        s.wait_buckets.push((hc.less_than, 0.0));
                    }
                    s.wait_buckets[i].1 += hc.count;
                }
            }
            ("weir_transaction_duration_seconds_count", v) => {
                s.transactions += number(v).unwrap_or(0.0)
            }
            ("weir_transaction_duration_seconds_sum", v) => {
                s.transaction_seconds += number(v).unwrap_or(0.0)
            }
            _ => {}
        }
    }
    Ok(s)
}

/// The q-quantile of the histogram difference `after - before`, interpolated within its
/// bucket, in milliseconds.
pub fn bucket_quantile(before: &[(f64, f64)], after: &[(f64, f64)], q: f64) -> Option<f64> {
    let delta: Vec<(f64, f64)> = after
        .iter()
        .enumerate()
        .map(|(i, (le, c))| (*le, c - before.get(i).map_or(0.0, |b| b.1)))
        .collect();
    let total = delta.last()?.1;
    if total <= 0.0 {
        return None;
    }
    let want = q * total;
    let mut prev = (0.0, 0.0);
    for (le, c) in &delta {
        if *c >= want {
            if le.is_infinite() {
                return Some(prev.0 * 1000.0);
            }
            let span = c - prev.1;
            let f = if span > 0.0 {
                (want - prev.1) / span
            } else {
                1.0
            };
            return Some((prev.0 + (le - prev.0) * f) * 1000.0);
        }
        prev = (*le, *c);
    }
    None
}

fn pool_view(before: &Scrape, after: &Scrape, utilisation: &[f64]) -> PoolView {
    let n = after.transactions - before.transactions;
    let secs = after.transaction_seconds - before.transaction_seconds;
    PoolView {
        utilisation_mean: if utilisation.is_empty() {
            0.0
        } else {
            utilisation.iter().sum::<f64>() / utilisation.len() as f64
        },
        utilisation_max: utilisation.iter().copied().fold(0.0, f64::max),
        wait_p95_ms: bucket_quantile(&before.wait_buckets, &after.wait_buckets, 0.95),
        transactions: Some(n),
        mean_transaction_ms: (n > 0.0).then(|| secs / n * 1000.0),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bucket_quantiles_interpolate_over_the_difference() {
        let before = [(0.001, 10.0), (0.01, 10.0), (f64::INFINITY, 10.0)];
        let after = [(0.001, 10.0), (0.01, 110.0), (f64::INFINITY, 110.0)];
        // 100 new waits, all between 1 and 10 ms: p50 halfway.
        let p50 = bucket_quantile(&before, &after, 0.5).unwrap();
        assert!((p50 - 5.5).abs() < 1e-9, "{p50}");
        assert!(bucket_quantile(&after, &after, 0.5).is_none());
    }
}
