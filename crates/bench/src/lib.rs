//! Load generation against any PostgreSQL endpoint (Weir or not), over tokio-postgres.
//!
//! Layout:
//! - [`Workload`]: what one request does.
//! - [`run`]: a closed loop of N clients for a duration, with a progress callback once a
//!   second, into a [`Report`] with HDR latency percentiles and errors by SQLSTATE.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;
use rand::RngExt;

/// What one request does.
#[derive(Debug, Clone)]
pub enum Workload {
    /// A web request: a lookup, `server_time` of server work, and half the time an update,
    /// each its own statement (autocommit), as a typical web backend issues them.
    WebRequest {
        server_time: Duration,
        accounts: i32,
    },
    /// One primary-key lookup.
    SelectOnly { accounts: i32 },
    /// A request of 2 or 3 queries (at random), each holding the server for `server_time`
    /// (`pg_sleep`): the load of a web backend whose queries each take that long.
    SleepQueries { server_time: Duration },
}

impl Workload {
    /// Creates the table the workload reads (`demo_accounts`), through `client`.
    pub async fn prepare_schema(
        client: &tokio_postgres::Client,
        accounts: i32,
    ) -> Result<(), tokio_postgres::Error> {
        client
            .batch_execute(&format!(
                "drop table if exists demo_accounts;
                 create table demo_accounts (id int primary key, balance bigint not null default 0);
                 insert into demo_accounts select g, 0 from generate_series(1, {accounts}) g;
                 analyze demo_accounts;"
            ))
            .await
    }

    /// Prepares the workload's statements on a client connection, as an application's
    /// driver would once per connection.
    async fn prepare(
        &self,
        c: &tokio_postgres::Client,
    ) -> Result<Statements, tokio_postgres::Error> {
        Ok(Statements {
            lookup: c
                .prepare("select balance from demo_accounts where id = $1")
                .await?,
            work: c.prepare("select pg_sleep($1)").await?,
            update: c
                .prepare("update demo_accounts set balance = balance + 1 where id = $1")
                .await?,
        })
    }

    async fn request(
        &self,
        c: &tokio_postgres::Client,
        st: &Statements,
        rng: &mut impl rand::Rng,
    ) -> Result<(), tokio_postgres::Error> {
        match self {
            Workload::SelectOnly { accounts } => {
                let id = rng.random_range(1..=*accounts);
                c.query_one(&st.lookup, &[&id]).await?;
            }
            Workload::SleepQueries { server_time } => {
                for _ in 0..rng.random_range(2..=3) {
                    c.execute(&st.work, &[&server_time.as_secs_f64()]).await?;
                }
            }
            Workload::WebRequest {
                server_time,
                accounts,
            } => {
                let id = rng.random_range(1..=*accounts);
                c.query_one(&st.lookup, &[&id]).await?;
                c.execute(&st.work, &[&server_time.as_secs_f64()]).await?;
                if rng.random_bool(0.5) {
                    c.execute(&st.update, &[&id]).await?;
                }
            }
        }
        Ok(())
    }
}

struct Statements {
    lookup: tokio_postgres::Statement,
    work: tokio_postgres::Statement,
    update: tokio_postgres::Statement,
}

/// What a load run measured.
#[derive(Debug, Clone)]
pub struct Report {
    pub elapsed: Duration,
    pub requests: u64,
    /// Errors by SQLSTATE (or a short description for errors without one).
    pub errors: BTreeMap<String, u64>,
    /// Request latency in microseconds.
    pub latency: Histogram<u64>,
    pub connect_errors: u64,
}

impl Report {
    fn new() -> Report {
        Report {
            elapsed: Duration::ZERO,
            requests: 0,
            errors: BTreeMap::new(),
            latency: Histogram::new_with_bounds(1, 3_600_000_000, 3).expect("valid bounds"),
            connect_errors: 0,
        }
    }

    pub fn error_count(&self) -> u64 {
        self.errors.values().sum()
    }

    /// Latency at quantile `q` in milliseconds.
    pub fn ms(&self, q: f64) -> f64 {
        self.latency.value_at_quantile(q) as f64 / 1000.0
    }

    pub fn throughput(&self) -> f64 {
        self.requests as f64 / self.elapsed.as_secs_f64().max(1e-9)
    }
}

/// Figures so far, passed to the progress callback.
#[derive(Debug, Clone, Copy)]
pub struct Progress {
    pub elapsed: Duration,
    pub requests: u64,
    pub errors: u64,
    /// Requests per second over the last interval.
    pub rate: f64,
    pub p95_ms: f64,
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

/// Runs `clients` closed-loop clients against `url` for `duration`.
pub async fn run(
    url: &str,
    clients: usize,
    duration: Duration,
    workload: Workload,
    mut progress: impl FnMut(Progress),
) -> Report {
    let shared = Arc::new(Mutex::new(Report::new()));
    let start = Instant::now();
    let deadline = start + duration;
    let mut tasks = Vec::with_capacity(clients);
    for _ in 0..clients {
        let (url, workload, shared) = (url.to_string(), workload.clone(), shared.clone());
        tasks.push(tokio::spawn(async move {
            let client = match tokio_postgres::connect(&url, tokio_postgres::NoTls).await {
                Ok((c, conn)) => {
                    tokio::spawn(async move {
                        let _ = conn.await;
                    });
                    c
                }
                Err(e) => {
                    let mut r = shared.lock().unwrap();
                    r.connect_errors += 1;
                    *r.errors.entry(error_key(&e)).or_default() += 1;
                    return;
                }
            };
            let statements = match workload.prepare(&client).await {
                Ok(s) => s,
                Err(e) => {
                    *shared
                        .lock()
                        .unwrap()
                        .errors
                        .entry(error_key(&e))
                        .or_default() += 1;
                    return;
                }
            };
            let mut rng = rand::rngs::SmallRng::seed_from_u64(rand::random());
            while Instant::now() < deadline {
                let t = Instant::now();
                let res = workload.request(&client, &statements, &mut rng).await;
                let us = t.elapsed().as_micros() as u64;
                let mut r = shared.lock().unwrap();
                match res {
                    Ok(()) => {
                        r.requests += 1;
                        r.latency.saturating_record(us.max(1));
                    }
                    Err(e) => *r.errors.entry(error_key(&e)).or_default() += 1,
                }
            }
        }));
    }
    let mut last = (Instant::now(), 0u64);
    let mut ticker = tokio::time::interval(Duration::from_secs(1));
    ticker.tick().await;
    while Instant::now() < deadline {
        ticker.tick().await;
        let r = shared.lock().unwrap();
        let now = Instant::now();
        let rate = (r.requests - last.1) as f64 / now.duration_since(last.0).as_secs_f64();
        last = (now, r.requests);
        progress(Progress {
            elapsed: start.elapsed(),
            requests: r.requests,
            errors: r.error_count(),
            rate,
            p95_ms: r.ms(0.95),
        });
    }
    for t in tasks {
        let _ = t.await;
    }
    let mut report = shared.lock().unwrap().clone();
    report.elapsed = start.elapsed();
    report
}

use rand::SeedableRng;
