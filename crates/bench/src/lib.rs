//! Load generation against any PostgreSQL endpoint (Weir or not), over tokio-postgres.
//!
//! Layout:
//! - [`workload`]: what one request does (select-only, web, sleep, TPC-B-like, a script).
//! - [`scenario`]: how the load changes over phases, closed or open loop; the presets.
//! - [`run`] (here): drives a scenario into a [`Report`], with a progress callback once a
//!   second.
//! - [`slo`]: gates such as `p95<400ms,errors<1%` and their verdicts.
//! - [`compare`]: a Markdown before/after report of two JSON reports.
//!
//! Closed loop: N clients, each sending its next request when the last is answered;
//! latency is measured from the send. Open loop: requests are scheduled at the target rate
//! (Poisson arrivals by default) whatever happens to earlier ones, queue for a free
//! connection, and latency is measured from the *scheduled* start, so a stall shows in full
//! in the percentiles instead of slowing the generator down (no coordinated omission).

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;
use rand::{RngExt, SeedableRng};
use serde_json::{Value, json};

pub mod compare;
pub mod scenario;
pub mod slo;
pub mod workload;

pub use scenario::{Loop, Phase, PhaseKind, Scenario};
pub use workload::{Script, Workload};

/// How open-loop arrivals are spaced.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Arrivals {
    /// Exponential gaps (a Poisson process), as independent users arrive.
    Poisson,
    /// Even gaps.
    Uniform,
}

/// What to run.
#[derive(Debug, Clone)]
pub struct Plan {
    pub url: String,
    pub scenario: Scenario,
    pub workload: Workload,
    /// Open loop: connections that serve the scheduled requests.
    pub connections: usize,
    pub arrivals: Arrivals,
}

/// Weir's own view of the run, from its admin listener (filled in by the caller).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct PoolView {
    pub utilisation_mean: f64,
    pub utilisation_max: f64,
    pub wait_p95_ms: Option<f64>,
    pub transactions: Option<f64>,
    pub mean_transaction_ms: Option<f64>,
}

/// What a load run measured.
#[derive(Debug, Clone)]
pub struct Report {
    pub scenario: String,
    pub mode: Loop,
    pub workload: String,
    /// The URL without its password.
    pub target: String,
    pub elapsed: Duration,
    pub requests: u64,
    /// Errors by SQLSTATE (or a short description for errors without one).
    pub errors: BTreeMap<String, u64>,
    /// Request latency in microseconds.
    pub latency: Histogram<u64>,
    /// Connect (and login) time in microseconds.
    pub connect: Histogram<u64>,
    pub connect_errors: u64,
    pub pool: Option<PoolView>,
}

fn histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 3_600_000_000, 3).expect("valid bounds")
}

impl Report {
    fn new(plan: &Plan) -> Report {
        Report {
            scenario: plan.scenario.name.clone(),
            mode: plan.scenario.mode,
            workload: plan.workload.name().into(),
            target: redact(&plan.url),
            elapsed: Duration::ZERO,
            requests: 0,
            errors: BTreeMap::new(),
            latency: histogram(),
            connect: histogram(),
            connect_errors: 0,
            pool: None,
        }
    }

    pub fn error_count(&self) -> u64 {
        self.errors.values().sum()
    }

    /// Errors as a percentage of requests attempted.
    pub fn error_percent(&self) -> f64 {
        let e = self.error_count() as f64;
        let all = self.requests as f64 + e;
        if all == 0.0 { 0.0 } else { e * 100.0 / all }
    }

    /// Latency at quantile `q` in milliseconds.
    pub fn ms(&self, q: f64) -> f64 {
        self.latency.value_at_quantile(q) as f64 / 1000.0
    }

    pub fn throughput(&self) -> f64 {
        self.requests as f64 / self.elapsed.as_secs_f64().max(1e-9)
    }

    /// The report as JSON; the schema is documented in docs/BENCH.md.
    pub fn json(&self) -> Value {
        let l = &self.latency;
        let q = |h: &Histogram<u64>, q: f64| round3(h.value_at_quantile(q) as f64 / 1000.0);
        // No successful request, no latency: null, so a latency gate fails rather than
        // passing on an empty histogram's zero.
        let latency = if self.requests == 0 {
            json!({"p50": null, "p90": null, "p95": null, "p99": null, "p99_9": null, "max": null, "mean": null})
        } else {
            json!({
                "p50": q(l, 0.50), "p90": q(l, 0.90), "p95": q(l, 0.95), "p99": q(l, 0.99),
                "p99_9": q(l, 0.999), "max": round3(l.max() as f64 / 1000.0),
                "mean": round3(l.mean() / 1000.0),
            })
        };
        json!({
            "schema": "weir-bench/1",
            "scenario": self.scenario,
            "mode": match self.mode { Loop::Closed => "closed", Loop::Open => "open" },
            "workload": self.workload,
            "target": self.target,
            "duration_s": round3(self.elapsed.as_secs_f64()),
            "requests": self.requests,
            "throughput_per_s": round3(self.throughput()),
            "latency_ms": latency,
            "errors": {
                "total": self.error_count(),
                "percent": round3(self.error_percent()),
                "by_sqlstate": self.errors,
            },
            "connect_ms": {
                "count": self.connect.len(),
                "errors": self.connect_errors,
                "p50": q(&self.connect, 0.50),
                "p95": q(&self.connect, 0.95),
                "max": round3(self.connect.max() as f64 / 1000.0),
            },
            "pool": self.pool.as_ref().map(|p| json!({
                "utilisation_mean_percent": round3(p.utilisation_mean),
                "utilisation_max_percent": round3(p.utilisation_max),
                "wait_p95_ms": p.wait_p95_ms.map(round3),
                "transactions": p.transactions,
                "mean_transaction_ms": p.mean_transaction_ms.map(round3),
            })),
        })
    }

    /// The report for people.
    pub fn text(&self) -> String {
        use std::fmt::Write as _;
        let mut out = String::new();
        let _ = writeln!(
            out,
            "{} ({} loop, {} workload) against {}",
            self.scenario,
            match self.mode {
                Loop::Closed => "closed",
                Loop::Open => "open",
            },
            self.workload,
            self.target
        );
        let _ = writeln!(
            out,
            "  requests    {} in {:.1} s = {:.1}/s",
            self.requests,
            self.elapsed.as_secs_f64(),
            self.throughput()
        );
        let _ = writeln!(
            out,
            "  latency     p50 {:.2} ms  p95 {:.2} ms  p99 {:.2} ms  p99.9 {:.2} ms  max {:.2} ms",
            self.ms(0.5),
            self.ms(0.95),
            self.ms(0.99),
            self.ms(0.999),
            self.latency.max() as f64 / 1000.0
        );
        let by: Vec<String> = self
            .errors
            .iter()
            .map(|(k, v)| format!("{k}: {v}"))
            .collect();
        let _ = writeln!(
            out,
            "  errors      {} ({:.2}%){}",
            self.error_count(),
            self.error_percent(),
            if by.is_empty() {
                String::new()
            } else {
                format!("  [{}]", by.join(", "))
            }
        );
        let _ = writeln!(
            out,
            "  connects    {} (p50 {:.2} ms, p95 {:.2} ms, max {:.2} ms), {} failed",
            self.connect.len(),
            self.connect.value_at_quantile(0.5) as f64 / 1000.0,
            self.connect.value_at_quantile(0.95) as f64 / 1000.0,
            self.connect.max() as f64 / 1000.0,
            self.connect_errors
        );
        if let Some(p) = &self.pool {
            let _ = writeln!(
                out,
                "  weir pool   utilisation mean {:.1}%, max {:.1}%; pool wait p95 {}",
                p.utilisation_mean,
                p.utilisation_max,
                p.wait_p95_ms.map_or("n/a".into(), |w| format!("{w:.2} ms"))
            );
        }
        out
    }
}

fn round3(v: f64) -> f64 {
    (v * 1000.0).round() / 1000.0
}

/// The URL with its password replaced.
pub fn redact(url: &str) -> String {
    if let Some((scheme, rest)) = url.split_once("://")
        && let Some((userinfo, host)) = rest.split_once('@')
        && let Some((user, _)) = userinfo.split_once(':')
    {
        return format!("{scheme}://{user}:***@{host}");
    }
    url.to_string()
}

/// Figures so far, passed to the progress callback.
#[derive(Debug, Clone, Copy)]
pub struct Progress {
    pub elapsed: Duration,
    pub total: Duration,
    pub requests: u64,
    pub errors: u64,
    /// Requests per second over the last interval.
    pub rate: f64,
    pub p95_ms: f64,
    /// Clients (closed loop) or target rate (open loop) now.
    pub level: f64,
}

fn error_key(e: &tokio_postgres::Error) -> String {
    match e.code() {
        Some(c) => c.code().to_string(),
        None => {
            let s = e.to_string();
            s.chars().take(60).collect()
        }
    }
}

type Shared = Arc<Mutex<Report>>;

/// How long after the scenario's end requests in flight may still finish.
const GRACE: Duration = Duration::from_secs(30);

/// A connected client with its prepared statements.
struct Conn {
    client: tokio_postgres::Client,
    statements: workload::Statements,
}

async fn connect(url: &str, workload: &Workload, shared: &Shared) -> Option<Conn> {
    let t = Instant::now();
    let result = async {
        let (client, conn) = tokio_postgres::connect(url, tokio_postgres::NoTls).await?;
        tokio::spawn(async move {
            let _ = conn.await;
        });
        let statements = workload.prepare(&client).await?;
        Ok::<_, tokio_postgres::Error>(Conn { client, statements })
    }
    .await;
    let mut r = shared.lock().unwrap();
    match result {
        Ok(c) => {
            r.connect
                .saturating_record((t.elapsed().as_micros() as u64).max(1));
            Some(c)
        }
        Err(e) => {
            r.connect_errors += 1;
            *r.errors.entry(error_key(&e)).or_default() += 1;
            None
        }
    }
}

fn record(shared: &Shared, since: Instant, result: Result<(), tokio_postgres::Error>) {
    let us = (since.elapsed().as_micros() as u64).max(1);
    let mut r = shared.lock().unwrap();
    match result {
        Ok(()) => {
            r.requests += 1;
            r.latency.saturating_record(us);
        }
        Err(e) => *r.errors.entry(error_key(&e)).or_default() += 1,
    }
}

/// Runs the plan and reports. `progress` is called about once a second.
pub async fn run(plan: &Plan, mut progress: impl FnMut(Progress)) -> Report {
    let shared: Shared = Arc::new(Mutex::new(Report::new(plan)));
    let total = plan.scenario.duration();
    let (workers, start) = match plan.scenario.mode {
        Loop::Closed => {
            let start = Instant::now();
            (closed_loop(plan, &shared, start), start)
        }
        Loop::Open => open_loop(plan, &shared).await,
    };
    let mut last = (Instant::now(), 0u64);
    let mut ticker = tokio::time::interval(Duration::from_secs(1));
    ticker.tick().await;
    while start.elapsed() < total {
        ticker.tick().await;
        let r = shared.lock().unwrap();
        let now = Instant::now();
        let rate = (r.requests - last.1) as f64 / now.duration_since(last.0).as_secs_f64();
        last = (now, r.requests);
        progress(Progress {
            elapsed: start.elapsed().min(total),
            total,
            requests: r.requests,
            errors: r.error_count(),
            rate,
            p95_ms: r.ms(0.95),
            level: plan.scenario.level_at(start.elapsed()),
        });
    }
    // Requests still running (or, open loop, still queued) GRACE after the end are not
    // waited for: they count as errors, so a hung server cannot hang the run.
    let deadline = tokio::time::Instant::from_std(start + total + GRACE);
    let mut unfinished = 0;
    for mut t in workers {
        if tokio::time::timeout_at(deadline, &mut t).await.is_err() {
            t.abort();
            unfinished += 1;
        }
    }
    if unfinished > 0 {
        *shared
            .lock()
            .unwrap()
            .errors
            .entry(format!("unfinished {}s after the end", GRACE.as_secs()))
            .or_default() += unfinished;
    }
    let mut report = shared.lock().unwrap().clone();
    report.elapsed = start.elapsed();
    report
}

fn closed_loop(plan: &Plan, shared: &Shared, start: Instant) -> Vec<tokio::task::JoinHandle<()>> {
    let total = plan.scenario.duration();
    let n = plan.scenario.peak().ceil() as usize;
    (0..n)
        .map(|i| {
            let (plan, shared) = (plan.clone(), shared.clone());
            tokio::spawn(async move {
                let mut rng = rand::rngs::SmallRng::seed_from_u64(rand::random());
                let mut conn: Option<Conn> = None;
                loop {
                    let t = start.elapsed();
                    if t >= total {
                        break;
                    }
                    // This client is active while the level is above its index.
                    if i as f64 >= plan.scenario.level_at(t) {
                        tokio::time::sleep(Duration::from_millis(20)).await;
                        continue;
                    }
                    if conn.as_ref().is_none_or(|c| c.client.is_closed()) {
                        conn = connect(&plan.url, &plan.workload, &shared).await;
                        if conn.is_none() {
                            tokio::time::sleep(Duration::from_millis(100)).await;
                            continue;
                        }
                    }
                    let c = conn.as_ref().expect("connected");
                    let sent = Instant::now();
                    let r = plan
                        .workload
                        .request(&c.client, &c.statements, &mut rng)
                        .await;
                    record(&shared, sent, r);
                }
            })
        })
        .collect()
}

/// Connects every connection first, then starts the clock and the schedule.
async fn open_loop(plan: &Plan, shared: &Shared) -> (Vec<tokio::task::JoinHandle<()>>, Instant) {
    let total = plan.scenario.duration();
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel::<Instant>();
    let rx = Arc::new(tokio::sync::Mutex::new(rx));
    let mut connecting = Vec::new();
    for _ in 0..plan.connections.max(1) {
        let (url, workload, shared) = (plan.url.clone(), plan.workload.clone(), shared.clone());
        connecting.push(tokio::spawn(async move {
            connect(&url, &workload, &shared).await
        }));
    }
    let mut conns = Vec::new();
    for c in connecting {
        conns.push(c.await.ok().flatten());
    }
    let start = Instant::now();
    let mut tasks = Vec::new();
    for conn in conns {
        let (plan, shared, rx) = (plan.clone(), shared.clone(), rx.clone());
        tasks.push(tokio::spawn(async move {
            let mut rng = rand::rngs::SmallRng::seed_from_u64(rand::random());
            let mut conn = conn;
            loop {
                let Some(intended) = rx.lock().await.recv().await else {
                    break;
                };
                if conn.as_ref().is_none_or(|c| c.client.is_closed()) {
                    conn = connect(&plan.url, &plan.workload, &shared).await;
                }
                let Some(c) = conn.as_ref() else {
                    // Counted as a connect error; the scheduled request did not run.
                    *shared
                        .lock()
                        .unwrap()
                        .errors
                        .entry("not sent: no connection".into())
                        .or_default() += 1;
                    continue;
                };
                let r = plan
                    .workload
                    .request(&c.client, &c.statements, &mut rng)
                    .await;
                // From the scheduled start: time spent queued behind a stall counts.
                record(&shared, intended, r);
            }
        }));
    }
    let (scenario, arrivals) = (plan.scenario.clone(), plan.arrivals);
    tasks.push(tokio::spawn(async move {
        let mut rng = rand::rngs::SmallRng::seed_from_u64(rand::random());
        let mut t = 0.0f64;
        loop {
            let rate = scenario.level_at(Duration::from_secs_f64(t));
            if t >= total.as_secs_f64() {
                break;
            }
            if rate <= 0.0 {
                t += 0.01;
                continue;
            }
            t += match arrivals {
                Arrivals::Poisson => -(1.0 - rng.random_range(0.0..1.0f64)).ln() / rate,
                Arrivals::Uniform => 1.0 / rate,
            };
            if t >= total.as_secs_f64() {
                break;
            }
            let at = start + Duration::from_secs_f64(t);
            tokio::time::sleep_until(at.into()).await;
            if tx.send(at).is_err() {
                break;
            }
        }
    }));
    (tasks, start)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_of_known_distributions() {
        // Uniform on 1..=100,000 µs: the q-quantile is q * 100,000.
        let mut h = histogram();
        for v in 1..=100_000u64 {
            h.record(v).unwrap();
        }
        for q in [0.5, 0.95, 0.99, 0.999] {
            let got = h.value_at_quantile(q) as f64;
            let want = q * 100_000.0;
            assert!((got - want).abs() / want < 0.001, "q{q}: {got} vs {want}");
        }
        // Exponential with mean 10 ms, sampled at evenly spaced probabilities: the
        // q-quantile is -10 ms * ln(1 - q) (p95 = 29.96 ms, p99 = 46.05 ms).
        let mut h = histogram();
        let n = 200_000;
        for i in 0..n {
            let u = (i as f64 + 0.5) / n as f64;
            h.record((-10_000.0 * (1.0 - u).ln()).max(1.0) as u64)
                .unwrap();
        }
        for q in [0.5, 0.95, 0.99] {
            let got = h.value_at_quantile(q) as f64;
            let want = -10_000.0 * (1.0f64 - q).ln();
            assert!((got - want).abs() / want < 0.002, "q{q}: {got} vs {want}");
        }
        assert!((h.mean() - 10_000.0).abs() < 20.0, "{}", h.mean());
    }

    #[test]
    fn urls_lose_their_password() {
        assert_eq!(
            redact("postgres://app:secret@db:5432/x"),
            "postgres://app:***@db:5432/x"
        );
        assert_eq!(redact("postgres://db/x"), "postgres://db/x");
    }
}
