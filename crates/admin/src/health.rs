//! Health, readiness, the per-pool JSON, the redacted config and slow queries.
//!
//! `/health/pool` schema:
//! ```text
//! { "status": "normal|warning|critical",      // the worst pool's
//!   "timestamp": "RFC 3339",
//!   "pools": [ { "database", "user", "status",
//!       "metrics": { "active", "idle", "waiting", "total", "pool_size", "min_pool_size" },
//!       "config": { "mode", "query_wait_timeout_ms", "connect_timeout_ms", "query_timeout_ms",
//!                   "idle_transaction_timeout_ms", "server_idle_timeout_ms", "server_lifetime_ms" },
//!       "utilisation": { "percent", "status", "warning_percent", "critical_percent" },
//!       "wait": { "p50_ms", "p95_ms", "p99_ms" },
//!       "probe": { "ok", "latency_ms", "error", "age_ms" } | null,
//!       "clients", "transactions", "queries", "errors", "timeouts", "paused" } ],
//!   "total": { "active", "idle", "waiting", "total", "pool_size", "min_pool_size", "clients",
//!              "transactions", "queries", "errors", "utilisation": { "percent", "status" } } }
//! ```
//! `active + idle = total <= pool_size` (+ reserve). Utilisation is `active / pool_size`.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use axum::Json;
use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use serde_json::{Value, json};
use weir_config::Config;
use weir_proxy::listener::Shared;
use weir_proxy::pools::ServerPool;

fn ms(d: Duration) -> f64 {
    (d.as_secs_f64() * 1e6).round() / 1e3
}

fn level(pct: f64, warn: u32, crit: u32) -> &'static str {
    if pct >= crit as f64 {
        "critical"
    } else if pct >= warn as f64 {
        "warning"
    } else {
        "normal"
    }
}

fn rank(s: &str) -> u8 {
    match s {
        "critical" => 2,
        "warning" => 1,
        _ => 0,
    }
}

/// One pool as `/health/pool` shows it.
pub fn pool_json(p: &ServerPool) -> Value {
    let s = p.pool.snapshot();
    let set = p.settings();
    let pct = if s.max_size == 0 {
        0.0
    } else {
        s.active as f64 * 100.0 / s.max_size as f64
    };
    let status = level(pct, set.utilisation_warning, set.utilisation_critical);
    let stats = p.pool.stats();
    let errors: u64 = p.metrics.errors().values().sum();
    let probe = p.probe().map(|pr| match pr.result {
        Ok(rtt) => {
            json!({"ok": true, "latency_ms": ms(rtt), "error": null, "age_ms": ms(pr.at.elapsed())})
        }
        Err(e) => {
            json!({"ok": false, "latency_ms": null, "error": e, "age_ms": ms(pr.at.elapsed())})
        }
    });
    json!({
        "database": p.database,
        "user": p.user,
        "status": status,
        "metrics": {
            "active": s.active, "idle": s.idle, "waiting": s.waiting, "total": s.size,
            "pool_size": s.max_size, "min_pool_size": set.min_size,
        },
        "config": {
            "mode": set.mode.to_string(),
            "query_wait_timeout_ms": ms(set.query_wait_timeout),
            "connect_timeout_ms": ms(set.connect_timeout),
            "query_timeout_ms": ms(set.query_timeout),
            "idle_transaction_timeout_ms": ms(set.idle_transaction_timeout),
            "server_idle_timeout_ms": ms(set.server_idle_timeout),
            "server_lifetime_ms": ms(set.server_lifetime),
        },
        "utilisation": {
            "percent": (pct * 10.0).round() / 10.0, "status": status,
            "warning_percent": set.utilisation_warning, "critical_percent": set.utilisation_critical,
        },
        "wait": {
            "p50_ms": ms(stats.wait_quantile(0.50)),
            "p95_ms": ms(stats.wait_quantile(0.95)),
            "p99_ms": ms(stats.wait_quantile(0.99)),
        },
        "probe": probe,
        "clients": p.metrics.clients.load(std::sync::atomic::Ordering::Relaxed),
        "transactions": p.metrics.transactions.snapshot().count,
        "queries": p.metrics.queries.snapshot().count,
        "errors": errors,
        "timeouts": s.timeouts,
        "paused": p.is_paused(),
    })
}

/// The whole `/health/pool` document.
pub fn pools_json(shared: &Shared) -> Value {
    let mut pools: Vec<Arc<ServerPool>> = shared.pools.all();
    pools.sort_by(|a, b| (&a.database, &a.user).cmp(&(&b.database, &b.user)));
    let list: Vec<Value> = pools.iter().map(|p| pool_json(p)).collect();
    let sum = |k: &str| -> u64 {
        list.iter()
            .map(|p| p["metrics"][k].as_u64().unwrap_or(0))
            .sum()
    };
    let top = |k: &str| -> u64 { list.iter().map(|p| p[k].as_u64().unwrap_or(0)).sum() };
    let (active, size) = (sum("active"), sum("pool_size"));
    let pct = if size == 0 {
        0.0
    } else {
        active as f64 * 100.0 / size as f64
    };
    let worst = list
        .iter()
        .map(|p| p["status"].as_str().unwrap_or("normal"))
        .max_by_key(|s| rank(s))
        .unwrap_or("normal");
    json!({
        "status": worst,
        "timestamp": humantime::format_rfc3339_millis(SystemTime::now()).to_string(),
        "pools": list,
        "total": {
            "active": active, "idle": sum("idle"), "waiting": sum("waiting"), "total": sum("total"),
            "pool_size": size, "min_pool_size": sum("min_pool_size"),
            "clients": top("clients"), "transactions": top("transactions"), "queries": top("queries"),
            "errors": top("errors"),
            "utilisation": { "percent": (pct * 10.0).round() / 10.0, "status": worst },
        },
    })
}

pub async fn pool(State(shared): State<Arc<Shared>>) -> Json<Value> {
    Json(pools_json(&shared))
}

/// Why the service is not ready, if it is not.
pub async fn not_ready_reasons(shared: &Shared) -> Vec<String> {
    if shared.stopping.load(std::sync::atomic::Ordering::Acquire) {
        return vec!["weir is shutting down".into()];
    }
    let config = shared.config.load_full();
    let mut reasons = Vec::new();
    let pools = shared.pools.all();
    for p in &pools {
        match p.probe() {
            None => reasons.push(format!("pool {}/{}: not probed yet", p.database, p.user)),
            Some(pr) if pr.at.elapsed() > Duration::from_secs(10) => reasons.push(format!(
                "pool {}/{}: no probe for {:?}",
                p.database,
                p.user,
                pr.at.elapsed()
            )),
            Some(pr) => {
                if let Err(e) = pr.result {
                    reasons.push(format!("pool {}/{}: {e}", p.database, p.user));
                }
            }
        }
    }
    for (name, db) in &config.databases {
        if pools.iter().any(|p| &p.database == name) {
            continue;
        }
        if let Err(e) = reachable(db).await {
            reasons.push(format!("database {name}: {e}"));
        }
    }
    reasons
}

async fn reachable(db: &weir_config::Database) -> Result<(), String> {
    let connect = async {
        if db.host.starts_with('/') {
            let path = std::path::Path::new(&db.host).join(format!(".s.PGSQL.{}", db.port));
            tokio::net::UnixStream::connect(path).await.map(|_| ())
        } else {
            tokio::net::TcpStream::connect((db.host.as_str(), db.port))
                .await
                .map(|_| ())
        }
    };
    match tokio::time::timeout(Duration::from_secs(1), connect).await {
        Ok(Ok(())) => Ok(()),
        Ok(Err(e)) => Err(format!("cannot reach {}:{}: {e}", db.host, db.port)),
        Err(_) => Err(format!("no answer from {}:{} within 1s", db.host, db.port)),
    }
}

pub async fn ready(State(shared): State<Arc<Shared>>) -> (StatusCode, Json<Value>) {
    let reasons = not_ready_reasons(&shared).await;
    if reasons.is_empty() {
        (StatusCode::OK, Json(json!({"ready": true})))
    } else {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            Json(json!({"ready": false, "reasons": reasons})),
        )
    }
}

/// `POST /api/reload[?rollback=true]`.
pub async fn reload(
    State(shared): State<Arc<Shared>>,
    Query(q): Query<HashMap<String, String>>,
) -> (StatusCode, Json<Value>) {
    let rollback = q.get("rollback").is_some_and(|v| v == "true" || v == "1");
    // Loading reads a file: off the async workers.
    let s = shared.clone();
    let result =
        tokio::task::spawn_blocking(move || if rollback { s.rollback() } else { s.reload() }).await;
    match result {
        Ok(Ok(r)) => (
            StatusCode::OK,
            Json(json!({
                "ok": true,
                "rollback": rollback,
                "changes": r.changes,
                "restart_needed": r.restart_needed,
                "warnings": r.warnings,
            })),
        ),
        Ok(Err(e)) => {
            let status = match e {
                weir_proxy::reload::ReloadError::Invalid(_) => StatusCode::UNPROCESSABLE_ENTITY,
                _ => StatusCode::CONFLICT,
            };
            (
                status,
                Json(json!({"ok": false, "rollback": rollback, "errors": e.lines()})),
            )
        }
        Err(e) => (
            StatusCode::INTERNAL_SERVER_ERROR,
            Json(json!({"ok": false, "errors": [format!("reload task failed: {e}")]})),
        ),
    }
}

/// `POST /api/pools/{database}/{user}/size` with `{"size": N}`.
pub async fn resize(
    State(shared): State<Arc<Shared>>,
    Path((database, user)): Path<(String, String)>,
    body: axum::body::Bytes,
) -> (StatusCode, Json<Value>) {
    let size = serde_json::from_slice::<Value>(&body)
        .ok()
        .and_then(|v| v.get("size").and_then(Value::as_u64))
        .and_then(|n| u32::try_from(n).ok());
    let Some(size) = size.filter(|n| *n > 0) else {
        return (
            StatusCode::BAD_REQUEST,
            Json(
                json!({"ok": false, "errors": ["send a JSON body like {\"size\": 30} with a size of at least 1"]}),
            ),
        );
    };
    match shared.resize_pool(&database, &user, size) {
        Ok(old) => (
            StatusCode::OK,
            Json(
                json!({"ok": true, "pool": format!("{database}/{user}"), "old_size": old, "size": size}),
            ),
        ),
        Err(e) => (
            StatusCode::NOT_FOUND,
            Json(json!({"ok": false, "errors": [e]})),
        ),
    }
}

const REDACTED: &str = "<redacted>";

/// The running config with every secret replaced.
pub fn config_json(c: &Config) -> Value {
    let pool = |s: &weir_config::PoolSettings| -> Value {
        s.entries()
            .into_iter()
            .map(|(k, v)| (k.to_string(), Value::String(v)))
            .collect::<serde_json::Map<_, _>>()
            .into()
    };
    let databases: serde_json::Map<String, Value> = c
        .databases
        .iter()
        .map(|(name, d)| {
            let v = json!({
                "host": d.host, "port": d.port, "dbname": d.dbname, "user": d.user,
                "password": d.password.as_ref().map(|_| REDACTED),
                "auth": d.auth.map(|a| a.to_string()),
                "max_client_conn": d.max_client_conn,
                "pool": pool(&c.pool_settings(name, d.user.as_deref().unwrap_or(""))),
            });
            (name.clone(), v)
        })
        .collect();
    let users: serde_json::Map<String, Value> = c
        .users
        .iter()
        .map(|(name, u)| {
            let v = json!({
                "password": u.password.as_ref().map(|_| REDACTED),
                "auth": u.auth.map(|a| a.to_string()),
                "max_client_conn": u.max_client_conn,
                "pool": pool(&c.pool_settings("", name)),
            });
            (name.clone(), v)
        })
        .collect();
    json!({
        "profile": c.profile,
        "proxy": {
            "listen": c.proxy.listen.iter().map(|a| a.to_string()).collect::<Vec<_>>(),
            "unix_socket_dir": c.proxy.unix_socket_dir,
            "workers": c.proxy.workers,
            "max_message_size": c.proxy.max_message_size,
            "max_client_conn": c.proxy.max_client_conn,
            "shutdown_timeout": humantime::format_duration(c.proxy.shutdown_timeout).to_string(),
            "client_login_timeout": humantime::format_duration(c.proxy.client_login_timeout).to_string(),
        },
        "admin": {
            "listen": c.admin.listen.map(|a| a.to_string()),
            "token": c.admin.token.as_ref().map(|_| REDACTED),
            "users": c.admin.users,
        },
        "auth": {
            "type": c.auth_type.to_string(),
            "file": c.auth_file,
            "user": c.auth_query.as_ref().map(|q| &q.user),
            "query": c.auth_query.as_ref().map(|q| &q.query),
            "cache_ttl": c.auth_query.as_ref().map(|q| humantime::format_duration(q.cache_ttl).to_string()),
            "failed_login_delay": humantime::format_duration(c.failed_login_delay).to_string(),
            "failed_login_delay_max": humantime::format_duration(c.failed_login_delay_max).to_string(),
        },
        // File paths only: what the files hold is never read out.
        "tls": {
            "mode": c.tls.mode.to_string(),
            "cert_file": c.tls.cert_file,
            "key_file": c.tls.key_file,
        },
        "server_tls": {
            "mode": c.server_tls.mode.to_string(),
            "ca_file": c.server_tls.ca_file,
            "cert_file": c.server_tls.cert_file,
            "key_file": c.server_tls.key_file,
        },
        "access": c.access.iter().map(|r| json!({
            "name": r.name,
            "action": if r.allow { "allow" } else { "reject" },
            "address": if r.local { Some("local".to_string()) } else { r.address.map(|a| a.to_string()) },
            "database": r.databases,
            "user": r.users,
            "require_tls": r.require_tls,
        })).collect::<Vec<_>>(),
        "pool": pool(&c.pool_settings("", "")),
        "databases": databases,
        "users": users,
    })
}

pub async fn config(State(shared): State<Arc<Shared>>) -> Json<Value> {
    Json(config_json(&shared.config.load()))
}

pub async fn slow_queries(State(shared): State<Arc<Shared>>) -> Json<Value> {
    let list: Vec<Value> = shared
        .slow
        .list()
        .into_iter()
        .map(|q| {
            json!({
                "at": humantime::format_rfc3339_millis(q.at).to_string(),
                "database": q.database, "user": q.user, "client": q.client,
                "duration_ms": ms(q.duration), "query": q.query,
            })
        })
        .collect();
    Json(json!({ "slow_queries": list }))
}
