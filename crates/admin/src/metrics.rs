//! `/metrics`: Prometheus text from prometheus-client. A [`Collector`] reads Weir's counters
//! and snapshots at scrape time; every metric is named once, here.
//!
//! | metric | type | labels |
//! |---|---|---|
//! | `weir_pool_size` | gauge | database, user |
//! | `weir_pool_server_connections` | gauge | database, user, state (active, idle) |
//! | `weir_pool_clients` | gauge | database, user, state (active, waiting, idle) |
//! | `weir_pool_utilisation_ratio` | gauge | database, user |
//! | `weir_pool_wait_seconds` | histogram | database, user |
//! | `weir_transaction_duration_seconds` | histogram | database, user |
//! | `weir_query_duration_seconds` | histogram | database, user |
//! | `weir_errors` | counter | database, user, sqlstate |
//! | `weir_pool_timeouts` | counter | database, user |
//! | `weir_server_connects` / `weir_server_connect_errors` | counter | database, user |
//! | `weir_server_connect_retries` | counter | database, user |
//! | `weir_server_replaced` | counter | database, user (dead/failed idle connections replaced unseen) |
//! | `weir_server_closes` | counter | database, user, reason |
//! | `weir_received_bytes` / `weir_sent_bytes` | counter | database, user |
//! | `weir_client_connections` | gauge | |
//! | `weir_slow_queries` | gauge | (kept in the slow-query list) |
//! | `weir_up` / `weir_uptime_seconds` | gauge | |

use std::fmt;
use std::sync::Arc;
use std::sync::atomic::Ordering::Relaxed;

use axum::extract::State;
use axum::http::header;
use axum::response::IntoResponse;
use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, NoLabelSet};
use prometheus_client::metrics::MetricType;
use prometheus_client::registry::Registry;
use weir_pool::{CloseReason, HistogramSnapshot};
use weir_proxy::listener::Shared;
use weir_proxy::pools::ServerPool;

/// Reads Weir's state on each scrape.
#[derive(Debug)]
pub struct WeirCollector {
    pub shared: Arc<Shared>,
}

type Labels = Vec<(&'static str, String)>;

fn pool_labels(p: &ServerPool) -> Labels {
    vec![("database", p.database.clone()), ("user", p.user.clone())]
}

fn with(mut l: Labels, k: &'static str, v: &str) -> Labels {
    l.push((k, v.to_string()));
    l
}

/// Writes one metric family from samples.
fn family<V: Copy>(
    enc: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    ty: MetricType,
    samples: &[(Labels, V)],
    mut put: impl FnMut(&mut prometheus_client::encoding::MetricEncoder, V) -> fmt::Result,
) -> fmt::Result {
    let mut m = enc.encode_descriptor(name, help, None, ty)?;
    for (labels, v) in samples {
        let mut e = m.encode_family(labels)?;
        put(&mut e, *v)?;
    }
    Ok(())
}

fn gauges(
    enc: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    samples: &[(Labels, f64)],
) -> fmt::Result {
    family(enc, name, help, MetricType::Gauge, samples, |e, v| {
        e.encode_gauge(&v)
    })
}

fn counters(
    enc: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    samples: &[(Labels, u64)],
) -> fmt::Result {
    family(enc, name, help, MetricType::Counter, samples, |e, v| {
        e.encode_counter::<NoLabelSet, u64, f64>(&v, None)
    })
}

fn histograms(
    enc: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    samples: &[(Labels, HistogramSnapshot)],
) -> fmt::Result {
    let mut m = enc.encode_descriptor(name, help, None, MetricType::Histogram)?;
    for (labels, h) in samples {
        // prometheus-client wants counts per bucket (it accumulates), with +Inf last.
        let mut buckets = Vec::with_capacity(h.buckets.len() + 1);
        let mut prev = 0;
        for (bound, cumulative) in &h.buckets {
            buckets.push((*bound, cumulative - prev));
            prev = *cumulative;
        }
        buckets.push((f64::INFINITY, h.count - prev));
        let mut e = m.encode_family(labels)?;
        e.encode_histogram::<NoLabelSet>(h.sum, h.count, &buckets, None)?;
    }
    Ok(())
}

impl Collector for WeirCollector {
    fn encode(&self, mut enc: DescriptorEncoder) -> fmt::Result {
        let shared = &self.shared;
        let mut pools = shared.pools.all();
        pools.sort_by(|a, b| (&a.database, &a.user).cmp(&(&b.database, &b.user)));
        let snaps: Vec<_> = pools
            .iter()
            .map(|p| (pool_labels(p), p.pool.snapshot(), p))
            .collect();

        let up = shared.started.elapsed().unwrap_or_default().as_secs_f64();
        gauges(&mut enc, "weir_up", "1 while Weir serves", &[(vec![], 1.0)])?;
        gauges(
            &mut enc,
            "weir_uptime_seconds",
            "Seconds since Weir started",
            &[(vec![], up)],
        )?;
        gauges(
            &mut enc,
            "weir_client_connections",
            "Client connections logged in (all pools and the console)",
            &[(vec![], shared.clients.total() as f64)],
        )?;
        gauges(
            &mut enc,
            "weir_slow_queries",
            "Slow statements kept for /api/slow-queries",
            &[(vec![], shared.slow.list().len() as f64)],
        )?;

        let size: Vec<_> = snaps
            .iter()
            .map(|(l, s, _)| (l.clone(), s.max_size as f64))
            .collect();
        gauges(
            &mut enc,
            "weir_pool_size",
            "Server connections the pool may hold",
            &size,
        )?;
        let mut servers = Vec::new();
        for (l, s, _) in &snaps {
            servers.push((with(l.clone(), "state", "active"), s.active as f64));
            servers.push((with(l.clone(), "state", "idle"), s.idle as f64));
        }
        gauges(
            &mut enc,
            "weir_pool_server_connections",
            "Server connections by state",
            &servers,
        )?;
        let mut clients = Vec::new();
        for (l, s, p) in &snaps {
            let logged_in = p.metrics.clients.load(Relaxed);
            let active = s.active.min(logged_in);
            clients.push((with(l.clone(), "state", "active"), active as f64));
            clients.push((with(l.clone(), "state", "waiting"), s.waiting as f64));
            clients.push((
                with(l.clone(), "state", "idle"),
                logged_in.saturating_sub(active + s.waiting) as f64,
            ));
        }
        gauges(
            &mut enc,
            "weir_pool_clients",
            "Clients of the pool by state",
            &clients,
        )?;
        let util: Vec<_> = snaps
            .iter()
            .map(|(l, s, _)| {
                (
                    l.clone(),
                    if s.max_size == 0 {
                        0.0
                    } else {
                        s.active as f64 / s.max_size as f64
                    },
                )
            })
            .collect();
        gauges(
            &mut enc,
            "weir_pool_utilisation_ratio",
            "Share of the pool's size in use",
            &util,
        )?;

        let waits: Vec<_> = snaps
            .iter()
            .map(|(l, _, p)| (l.clone(), p.pool.stats().wait_buckets.snapshot()))
            .collect();
        histograms(
            &mut enc,
            "weir_pool_wait_seconds",
            "Time clients waited for a server connection",
            &waits,
        )?;
        let xacts: Vec<_> = snaps
            .iter()
            .map(|(l, _, p)| (l.clone(), p.metrics.transactions.snapshot()))
            .collect();
        histograms(
            &mut enc,
            "weir_transaction_duration_seconds",
            "Transactions, from first request to idle",
            &xacts,
        )?;
        let queries: Vec<_> = snaps
            .iter()
            .map(|(l, _, p)| (l.clone(), p.metrics.queries.snapshot()))
            .collect();
        histograms(
            &mut enc,
            "weir_query_duration_seconds",
            "Requests, from a client's message to its last reply",
            &queries,
        )?;

        let mut errors = Vec::new();
        for (l, _, p) in &snaps {
            for (code, n) in p.metrics.errors() {
                errors.push((with(l.clone(), "sqlstate", &code), n));
            }
        }
        counters(
            &mut enc,
            "weir_errors",
            "Errors sent to clients, by SQLSTATE",
            &errors,
        )?;
        let per_pool = |f: &dyn Fn(&weir_pool::Snapshot) -> u64| -> Vec<(Labels, u64)> {
            snaps.iter().map(|(l, s, _)| (l.clone(), f(s))).collect()
        };
        counters(
            &mut enc,
            "weir_pool_timeouts",
            "Checkouts that ran out of query_wait_timeout",
            &per_pool(&|s| s.timeouts),
        )?;
        counters(
            &mut enc,
            "weir_server_connects",
            "Server connections opened",
            &per_pool(&|s| s.created),
        )?;
        counters(
            &mut enc,
            "weir_server_connect_errors",
            "Server connection attempts that failed",
            &per_pool(&|s| s.create_errors),
        )?;
        counters(
            &mut enc,
            "weir_server_connect_retries",
            "Failed connects retried after a backoff",
            &per_pool(&|s| s.retries),
        )?;
        counters(
            &mut enc,
            "weir_server_replaced",
            "Idle server connections found dead or failing their check, replaced unseen",
            &per_pool(&|s| s.replaced),
        )?;
        let mut closes = Vec::new();
        for (l, _, p) in &snaps {
            for r in CloseReason::ALL {
                closes.push((
                    with(l.clone(), "reason", r.as_str()),
                    p.pool.stats().closed(r),
                ));
            }
        }
        counters(
            &mut enc,
            "weir_server_closes",
            "Server connections closed, by reason",
            &closes,
        )?;
        let rx: Vec<_> = snaps
            .iter()
            .map(|(l, _, p)| (l.clone(), p.metrics.bytes_received.get()))
            .collect();
        counters(&mut enc, "weir_received_bytes", "Bytes from clients", &rx)?;
        let tx: Vec<_> = snaps
            .iter()
            .map(|(l, _, p)| (l.clone(), p.metrics.bytes_sent.get()))
            .collect();
        counters(&mut enc, "weir_sent_bytes", "Bytes to clients", &tx)?;
        let moves: Vec<_> = snaps
            .iter()
            .map(|(l, _, p)| (l.clone(), p.metrics.server_moves.load(Relaxed)))
            .collect();
        counters(
            &mut enc,
            "weir_server_moves",
            "Server connections moved to another worker thread at checkout",
            &moves,
        )?;
        let moves: Vec<_> = snaps
            .iter()
            .map(|(l, _, p)| (l.clone(), p.metrics.client_moves.load(Relaxed)))
            .collect();
        counters(
            &mut enc,
            "weir_client_moves",
            "Client sessions moved to another worker thread between transactions",
            &moves,
        )?;
        Ok(())
    }
}

/// The exposition text.
pub fn text(shared: Arc<Shared>) -> String {
    let mut registry = Registry::default();
    registry.register_collector(Box::new(WeirCollector { shared }));
    let mut out = String::new();
    prometheus_client::encoding::text::encode(&mut out, &registry).expect("writing to a String");
    out
}

pub async fn render(State(shared): State<Arc<Shared>>) -> impl IntoResponse {
    (
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        text(shared),
    )
}
