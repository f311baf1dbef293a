//! The admin console: databases `weir` and `pgbouncer`, for users in `admin.users`. It
//! answers PgBouncer's SHOW commands with PgBouncer 1.18's column names, order and types, so
//! existing exporters and dashboards work unchanged, plus PAUSE, RESUME, RECONNECT, KILL and
//! SHUTDOWN. Simple protocol only, like PgBouncer's.

use std::sync::Arc;
use std::sync::atomic::Ordering::Relaxed;
use std::time::{Duration, SystemTime};

use bytes::BytesMut;
use weir_config::Config;
use weir_wire::backend::{self, Authentication, ParameterStatus, TxStatus, oid};
use weir_wire::frontend::{CancelKey, Query, Startup, tag};
use weir_wire::{ErrorResponse, SqlState};

use crate::auth;
use crate::limits::ClientSlot;
use crate::listener::Shared;
use crate::metrics::{ConnInfo, ConnState};
use crate::pools::ServerPool;
use crate::startup::read_message;
use crate::stream::Stream;

/// Database names that open the console.
pub const DATABASES: [&str; 2] = ["weir", "pgbouncer"];

const VERSION: &str = concat!(
    "PgBouncer 1.18.0 compatible; Weir ",
    env!("CARGO_PKG_VERSION")
);

/// Serves one console connection to the end.
pub async fn serve(
    shared: Arc<Shared>,
    mut client: Stream,
    mut buf: BytesMut,
    startup: Startup,
    _slot: ClientSlot,
    ip: Option<std::net::IpAddr>,
    deadline: tokio::time::Instant,
) {
    let user = startup.get("user").unwrap_or("").to_string();
    let config = shared.config.load_full();
    let fatal = |code, msg: String| ErrorResponse::fatal(code, msg);
    if !config.admin.users.contains(&user) {
        let e = fatal(
            SqlState::INVALID_AUTHORIZATION,
            format!("user \"{user}\" may not use the admin console"),
        )
        .with_hint("list the user in admin.users");
        send(&mut client, |o| e.encode(o)).await;
        return;
    }
    let database = startup.get("database").unwrap_or("");
    if let Err(e) = crate::access::admit(
        &config,
        shared.tls().required(),
        &client,
        ip,
        database,
        &user,
    ) {
        send(&mut client, |o| e.encode(o)).await;
        return;
    }
    let paused = match shared.failed_logins.pause(
        ip,
        config.failed_login_delay,
        config.failed_login_delay_max,
    ) {
        Ok((pause, guard)) => {
            // Within the login deadline, as the pause of a database login is.
            tokio::time::sleep_until(deadline.min(tokio::time::Instant::now() + pause)).await;
            guard
        }
        Err(e) => {
            send(&mut client, |o| e.encode(o)).await;
            return;
        }
    };
    let users = shared.users.load_full();
    let method = config.auth_type("", &user);
    // Under the login deadline like any login: a client that stops answering the challenge
    // would otherwise hold its connection slot for good.
    let auth = tokio::time::timeout_at(
        deadline,
        auth::authenticate(&mut client, &mut buf, method, &user, &users, None),
    )
    .await;
    match auth {
        Ok(Ok(_)) => drop(paused),
        Ok(Err(e)) => {
            if let auth::AuthError::Failed(_) = e {
                shared.failed_logins.failed(ip);
            }
            drop(paused);
            if let Some(r) = e.to_response() {
                send(&mut client, |o| r.encode(o)).await;
            }
            return;
        }
        Err(_) => {
            let e = ErrorResponse::fatal(SqlState::PROTOCOL_VIOLATION, "login timed out");
            send(&mut client, |o| e.encode(o)).await;
            return;
        }
    }
    let mut out = BytesMut::new();
    Authentication::Ok.encode(&mut out);
    for (k, v) in [
        ("server_version", VERSION),
        ("client_encoding", "UTF8"),
        ("DateStyle", "ISO"),
        ("standard_conforming_strings", "on"),
    ] {
        ParameterStatus {
            name: k.as_bytes(),
            value: v.as_bytes(),
        }
        .encode(&mut out);
    }
    let key = CancelKey { pid: 0, secret: 0 };
    backend::BackendKey {
        pid: key.pid,
        secret: key.secret,
    }
    .encode(&mut out);
    TxStatus::Idle.encode(&mut out);
    if client.write_all(&out).await.is_err() {
        return;
    }
    loop {
        let read = tokio::select! {
            r = read_message(&mut client, &mut buf, 1 << 20) => Some(r),
            _ = shared.drain.cancelled() => None,
        };
        let Some(Ok((t, body))) = read else {
            if read.is_none() {
                let e = ErrorResponse::fatal(
                    SqlState(*b"57P01"),
                    "terminating connection because weir is shutting down",
                );
                send(&mut client, |o| e.encode(o)).await;
            }
            return;
        };
        out.clear();
        match t {
            tag::QUERY => {
                let sql = Query::decode(&body)
                    .map(|q| String::from_utf8_lossy(q.sql).into_owned())
                    .unwrap_or_default();
                let config = shared.config.load_full();
                if let Err(e) = run(&shared, &config, &sql, &mut out).await {
                    e.encode(&mut out);
                }
                TxStatus::Idle.encode(&mut out);
            }
            tag::TERMINATE => return,
            tag::SYNC => TxStatus::Idle.encode(&mut out),
            tag::FLUSH | tag::BIND | tag::DESCRIBE | tag::EXECUTE | tag::CLOSE => {}
            tag::PARSE => ErrorResponse::error(
                SqlState::FEATURE_NOT_SUPPORTED,
                "the admin console speaks the simple query protocol only",
            )
            .encode(&mut out),
            other => {
                let e = ErrorResponse::fatal(
                    SqlState::PROTOCOL_VIOLATION,
                    format!("unexpected message type '{}'", other as char),
                );
                send(&mut client, |o| e.encode(o)).await;
                return;
            }
        }
        if client.write_all(&out).await.is_err() {
            return;
        }
        if shared.stopping.load(Relaxed) {
            return;
        }
    }
}

async fn send(client: &mut Stream, f: impl FnOnce(&mut BytesMut)) {
    let mut out = BytesMut::new();
    f(&mut out);
    let _ = tokio::time::timeout(Duration::from_secs(1), client.write_all(&out)).await;
}

/// A result set being built.
struct Rows<'a> {
    out: &'a mut BytesMut,
    n: usize,
}

impl<'a> Rows<'a> {
    fn new(out: &'a mut BytesMut, columns: &[(&str, u32)]) -> Self {
        backend::encode_row_description(out, columns);
        Rows { out, n: 0 }
    }

    fn row(&mut self, values: &[String]) {
        let v: Vec<Option<&str>> = values.iter().map(|s| Some(s.as_str())).collect();
        backend::encode_data_row(self.out, &v);
        self.n += 1;
    }

    fn done(self, tag: &str) {
        backend::encode_command_complete(self.out, tag.as_bytes());
    }
}

fn text(cols: &[&'static str]) -> Vec<(&'static str, u32)> {
    cols.iter().map(|c| (*c, oid::TEXT)).collect()
}

/// PgBouncer's time format in SHOW CLIENTS/SERVERS.
fn timestamp(micros: u64) -> String {
    let t = SystemTime::UNIX_EPOCH + Duration::from_micros(micros);
    let s = humantime::format_rfc3339_seconds(t).to_string();
    format!("{} UTC", s.trim_end_matches('Z').replace('T', " "))
}

/// A NoticeResponse (for what RELOAD reports but does not fail on).
fn notice(out: &mut BytesMut, message: &str) {
    ErrorResponse::new(
        weir_wire::error::Severity::Warning,
        SqlState(*b"01000"),
        message.to_string(),
    )
    .encode(out);
}

/// `SET pool_size = N FOR database/user` (the pool as SHOW POOLS names it).
fn parse_set_pool_size(sql: &str) -> Result<(String, String, u32), ErrorResponse> {
    let bad = || {
        ErrorResponse::error(
            SqlState(*b"42601"),
            format!("cannot read `{sql}`: write SET pool_size = N FOR database/user"),
        )
    };
    let rest = sql.trim().trim_end_matches(';');
    let rest = rest.get(3..).ok_or_else(bad)?.trim_start();
    let rest = rest.get("pool_size".len()..).ok_or_else(bad)?.trim_start();
    let rest = rest
        .strip_prefix('=')
        .or_else(|| rest.strip_prefix("TO "))
        .or_else(|| rest.strip_prefix("to "))
        .ok_or_else(bad)?;
    let mut words = rest.split_whitespace();
    let size = words
        .next()
        .and_then(|w| w.trim_matches('\'').parse::<u32>().ok())
        .ok_or_else(bad)?;
    if !words.next().is_some_and(|w| w.eq_ignore_ascii_case("FOR")) {
        return Err(bad());
    }
    let target = words.next().ok_or_else(bad)?.trim_matches('"');
    let (db, user) = target.split_once('/').ok_or_else(bad)?;
    if words.next().is_some() || db.is_empty() || user.is_empty() {
        return Err(bad());
    }
    Ok((db.to_string(), user.to_string(), size))
}

/// Runs one console command.
async fn run(
    shared: &Shared,
    config: &Config,
    sql: &str,
    out: &mut BytesMut,
) -> Result<(), ErrorResponse> {
    let words: Vec<String> = sql
        .trim()
        .trim_end_matches(';')
        .split_whitespace()
        .map(str::to_ascii_uppercase)
        .collect();
    let arg = sql
        .trim()
        .trim_end_matches(';')
        .split_whitespace()
        .nth(1)
        .map(|s| s.trim_matches('"').to_string());
    let pools_of = |db: Option<&str>| -> Result<Vec<Arc<ServerPool>>, ErrorResponse> {
        if let Some(d) = db
            && !config.databases.contains_key(d)
        {
            return Err(ErrorResponse::error(
                SqlState::INVALID_CATALOG_NAME,
                format!("no such database: {d}"),
            ));
        }
        Ok(shared.pools.of_database(db))
    };
    match words.iter().map(String::as_str).collect::<Vec<_>>().as_slice() {
        ["SHOW", what] => show(shared, config, what, out),
        ["PAUSE", ..] => {
            let pools = pools_of(arg.as_deref())?;
            let waits = pools.iter().map(|p| p.pause(Duration::from_secs(60)));
            let drained = futures_all(waits).await;
            if drained.iter().all(|d| *d) {
                backend::encode_command_complete(out, b"PAUSE");
                Ok(())
            } else {
                Err(ErrorResponse::error(SqlState(*b"57014"), "PAUSE timed out after 60s: transactions still running"))
            }
        }
        ["RESUME", ..] => {
            for p in pools_of(arg.as_deref())? {
                p.resume();
            }
            backend::encode_command_complete(out, b"RESUME");
            Ok(())
        }
        ["RECONNECT", ..] => {
            for p in pools_of(arg.as_deref())? {
                p.reconnect();
            }
            backend::encode_command_complete(out, b"RECONNECT");
            Ok(())
        }
        ["KILL", _] => {
            for p in pools_of(arg.as_deref())? {
                p.kill();
            }
            let db = arg.as_deref().unwrap_or_default();
            shared
                .clients_registry
                .raise(crate::metrics::signal::KILL, |c| &*c.database == db);
            backend::encode_command_complete(out, b"KILL");
            Ok(())
        }
        ["KILL"] => Err(ErrorResponse::error(SqlState(*b"42601"), "KILL needs a database name")),
        ["SHUTDOWN"] => {
            shared.stopping.store(true, Relaxed);
            // notify_one keeps the wakeup if the main loop is not waiting right now.
            shared.shutdown.notify_one();
            backend::encode_command_complete(out, b"SHUTDOWN");
            Ok(())
        }
        ["RELOAD"] => match shared.reload() {
            Ok(report) => {
                for line in report.restart_needed.iter().chain(&report.warnings) {
                    notice(out, line);
                }
                backend::encode_command_complete(out, b"RELOAD");
                Ok(())
            }
            Err(e) => Err(ErrorResponse::error(
                SqlState(*b"F0000"),
                format!("RELOAD rejected: {}", e.lines().join("; ")),
            )
            .with_hint("fix the config and RELOAD again; the running config is unchanged")),
        },
        ["SET", key, ..] if key.starts_with("POOL_SIZE") => {
            let (db, user, size) = parse_set_pool_size(sql)?;
            shared
                .resize_pool(&db, &user, size)
                .map_err(|m| ErrorResponse::error(SqlState(*b"22023"), m))?;
            backend::encode_command_complete(out, b"SET");
            Ok(())
        }
        _ => Err(ErrorResponse::error(SqlState(*b"42601"), format!("unknown console command: {sql}"))
            .with_hint("SHOW POOLS|STATS|CLIENTS|SERVERS|DATABASES|CONFIG|LISTS|VERSION|TOTALS, PAUSE [db], RESUME [db], RECONNECT [db], KILL db, SHUTDOWN")),
    }
}

async fn futures_all<F: std::future::Future<Output = bool>>(
    futs: impl Iterator<Item = F>,
) -> Vec<bool> {
    let mut v = Vec::new();
    for f in futs {
        v.push(f.await);
    }
    v
}

/// Per-database sums for SHOW STATS / TOTALS.
#[derive(Default)]
struct Totals {
    xacts: u64,
    queries: u64,
    received: u64,
    sent: u64,
    xact_us: u64,
    query_us: u64,
    wait_us: u64,
}

fn totals(pools: &[Arc<ServerPool>]) -> Totals {
    let mut t = Totals::default();
    for p in pools {
        let m = &p.metrics;
        let (x, q) = (m.transactions.snapshot(), m.queries.snapshot());
        t.xacts += x.count;
        t.queries += q.count;
        t.xact_us += (x.sum * 1e6) as u64;
        t.query_us += (q.sum * 1e6) as u64;
        t.received += m.bytes_received.get();
        t.sent += m.bytes_sent.get();
        t.wait_us += p.pool.stats().wait_us.load(Relaxed);
    }
    t
}

/// PgBouncer's averages: per second over the process's life, times per transaction/query.
fn averages(t: &Totals, secs: f64) -> [u64; 7] {
    let per_s = |v: u64| (v as f64 / secs.max(1.0)) as u64;
    let per = |v: u64, n: u64| v.checked_div(n).unwrap_or(0);
    [
        per_s(t.xacts),
        per_s(t.queries),
        per_s(t.received),
        per_s(t.sent),
        per(t.xact_us, t.xacts),
        per(t.query_us, t.queries),
        per(t.wait_us, t.queries),
    ]
}

fn show(
    shared: &Shared,
    config: &Config,
    what: &str,
    out: &mut BytesMut,
) -> Result<(), ErrorResponse> {
    let up = shared.started.elapsed().unwrap_or_default().as_secs_f64();
    match what {
        "POOLS" => {
            let mut cols = text(&["database", "user"]);
            for c in [
                "cl_active",
                "cl_waiting",
                "cl_active_cancel_req",
                "cl_waiting_cancel_req",
                "sv_active",
                "sv_active_cancel",
                "sv_being_canceled",
                "sv_idle",
                "sv_used",
                "sv_tested",
                "sv_login",
                "maxwait",
                "maxwait_us",
            ] {
                cols.push((c, oid::INT4));
            }
            cols.push(("pool_mode", oid::TEXT));
            let mut rows = Rows::new(out, &cols);
            let clients = shared.clients_registry.list();
            for p in shared.pools.all() {
                let s = p.pool.snapshot();
                let maxwait = clients
                    .iter()
                    .filter(|c| *c.database == *p.database)
                    .map(|c| c.waiting_for())
                    .max()
                    .unwrap_or_default();
                let logged_in = p.metrics.clients.load(Relaxed);
                rows.row(&[
                    p.database.clone(),
                    p.user.clone(),
                    logged_in.saturating_sub(s.waiting).to_string(),
                    s.waiting.to_string(),
                    "0".into(),
                    "0".into(),
                    s.active.to_string(),
                    "0".into(),
                    "0".into(),
                    s.idle.to_string(),
                    "0".into(),
                    "0".into(),
                    "0".into(),
                    maxwait.as_secs().to_string(),
                    maxwait.subsec_micros().to_string(),
                    p.settings().mode.to_string(),
                ]);
            }
            rows.done("SHOW");
        }
        "STATS" => {
            let mut cols = text(&["database"]);
            for c in [
                "total_xact_count",
                "total_query_count",
                "total_received",
                "total_sent",
                "total_xact_time",
                "total_query_time",
                "total_wait_time",
                "avg_xact_count",
                "avg_query_count",
                "avg_recv",
                "avg_sent",
                "avg_xact_time",
                "avg_query_time",
                "avg_wait_time",
            ] {
                cols.push((c, oid::NUMERIC));
            }
            let mut rows = Rows::new(out, &cols);
            for db in config.databases.keys() {
                let t = totals(&shared.pools.of_database(Some(db)));
                let a = averages(&t, up);
                let mut row = vec![db.clone()];
                row.extend(
                    [
                        t.xacts, t.queries, t.received, t.sent, t.xact_us, t.query_us, t.wait_us,
                    ]
                    .map(|v| v.to_string()),
                );
                row.extend(a.map(|v| v.to_string()));
                rows.row(&row);
            }
            rows.done("SHOW");
        }
        "TOTALS" => {
            let t = totals(&shared.pools.all());
            let a = averages(&t, up);
            let mut rows = Rows::new(out, &[("name", oid::TEXT), ("value", oid::NUMERIC)]);
            let names = [
                "total_xact_count",
                "total_query_count",
                "total_client_bytes",
                "total_server_bytes",
                "total_xact_time",
                "total_query_time",
                "total_wait_time",
                "avg_xact_count",
                "avg_query_count",
                "avg_client_bytes",
                "avg_server_bytes",
                "avg_xact_time",
                "avg_query_time",
                "avg_wait_time",
            ];
            let values = [
                t.xacts, t.queries, t.received, t.sent, t.xact_us, t.query_us, t.wait_us, a[0],
                a[1], a[2], a[3], a[4], a[5], a[6],
            ];
            for (n, v) in names.iter().zip(values) {
                rows.row(&[n.to_string(), v.to_string()]);
            }
            rows.done("SHOW");
        }
        "CLIENTS" | "SERVERS" => {
            let cols = [
                ("type", oid::TEXT),
                ("user", oid::TEXT),
                ("database", oid::TEXT),
                ("state", oid::TEXT),
                ("addr", oid::TEXT),
                ("port", oid::INT4),
                ("local_addr", oid::TEXT),
                ("local_port", oid::INT4),
                ("connect_time", oid::TEXT),
                ("request_time", oid::TEXT),
                ("wait", oid::INT4),
                ("wait_us", oid::INT4),
                ("close_needed", oid::INT4),
                ("ptr", oid::TEXT),
                ("link", oid::TEXT),
                ("remote_pid", oid::INT4),
                ("tls", oid::TEXT),
                ("application_name", oid::TEXT),
            ];
            let mut rows = Rows::new(out, &cols);
            let (kind, conns): (&str, Vec<Arc<ConnInfo>>) = if what == "CLIENTS" {
                ("C", shared.clients_registry.list())
            } else {
                (
                    "S",
                    shared
                        .pools
                        .all()
                        .iter()
                        .flat_map(|p| p.pool.manager().servers.list())
                        .collect(),
                )
            };
            for c in conns {
                let state = match (kind, c.state()) {
                    ("C", ConnState::Waiting) => "waiting",
                    ("C", _) => "active",
                    (_, ConnState::Active) => "active",
                    _ => "idle",
                };
                let wait = c.waiting_for();
                let link = c.link();
                rows.row(&[
                    kind.into(),
                    c.user.to_string(),
                    c.database.to_string(),
                    state.into(),
                    c.addr(),
                    c.port().to_string(),
                    c.local_addr(),
                    c.local_port().to_string(),
                    timestamp(c.connect_time()),
                    timestamp(c.request_time()),
                    wait.as_secs().to_string(),
                    wait.subsec_micros().to_string(),
                    "0".into(),
                    format!("0x{:x}", c.id),
                    if link == 0 {
                        String::new()
                    } else {
                        format!("0x{link:x}")
                    },
                    c.remote_pid.to_string(),
                    String::new(),
                    c.application_name.clone(),
                ]);
            }
            rows.done("SHOW");
        }
        "DATABASES" => {
            let cols = [
                ("name", oid::TEXT),
                ("host", oid::TEXT),
                ("port", oid::INT4),
                ("database", oid::TEXT),
                ("force_user", oid::TEXT),
                ("pool_size", oid::INT4),
                ("min_pool_size", oid::INT4),
                ("reserve_pool", oid::INT4),
                ("pool_mode", oid::TEXT),
                ("max_connections", oid::INT4),
                ("current_connections", oid::INT4),
                ("paused", oid::INT4),
                ("disabled", oid::INT4),
            ];
            let mut rows = Rows::new(out, &cols);
            for (name, db) in &config.databases {
                let s = config.pool_settings(name, db.user.as_deref().unwrap_or(""));
                let pools = shared.pools.of_database(Some(name));
                let current: usize = pools.iter().map(|p| p.pool.snapshot().size).sum();
                let paused = pools.iter().any(|p| p.is_paused());
                rows.row(&[
                    name.clone(),
                    db.host.clone(),
                    db.port.to_string(),
                    db.dbname.clone(),
                    db.user.clone().unwrap_or_default(),
                    s.size.to_string(),
                    s.min_size.to_string(),
                    s.reserve_size.to_string(),
                    s.mode.to_string(),
                    s.max_db_connections.to_string(),
                    current.to_string(),
                    (paused as u8).to_string(),
                    "0".into(),
                ]);
            }
            rows.done("SHOW");
        }
        "CONFIG" => {
            let cols = text(&["key", "value", "default", "changeable"]);
            let mut rows = Rows::new(out, &cols);
            let defaults = weir_config::PoolSettings::default().entries();
            let current = config.pool_settings("", "").entries();
            for ((key, value), (_, default)) in current.into_iter().zip(defaults) {
                rows.row(&[format!("pool.{key}"), value, default, "no".into()]);
            }
            let p = &config.proxy;
            for (k, v) in [
                (
                    "proxy.listen",
                    p.listen
                        .iter()
                        .map(|a| a.to_string())
                        .collect::<Vec<_>>()
                        .join(","),
                ),
                ("proxy.max_client_conn", p.max_client_conn.to_string()),
                (
                    "proxy.shutdown_timeout",
                    humantime::format_duration(p.shutdown_timeout).to_string(),
                ),
                (
                    "proxy.client_login_timeout",
                    humantime::format_duration(p.client_login_timeout).to_string(),
                ),
                ("proxy.max_message_size", p.max_message_size.to_string()),
                ("proxy.workers", p.workers.to_string()),
                ("auth.type", config.auth_type.to_string()),
                (
                    "admin.listen",
                    config.admin.listen.map_or("off".into(), |a| a.to_string()),
                ),
                (
                    "admin.token",
                    if config.admin.token.is_some() {
                        "<redacted>".into()
                    } else {
                        String::new()
                    },
                ),
                ("admin.users", config.admin.users.join(",")),
                ("tls.mode", config.tls.mode.to_string()),
                ("tls.cert_file", path(&config.tls.cert_file)),
                ("server_tls.mode", config.server_tls.mode.to_string()),
                ("server_tls.ca_file", path(&config.server_tls.ca_file)),
                (
                    "auth.user",
                    config
                        .auth_query
                        .as_ref()
                        .map_or(String::new(), |q| q.user.clone()),
                ),
                ("access", format!("{} rules", config.access.len())),
            ] {
                rows.row(&[k.into(), v, String::new(), "no".into()]);
            }
            rows.done("SHOW");
        }
        "LISTS" => {
            let mut rows = Rows::new(out, &[("list", oid::TEXT), ("items", oid::INT4)]);
            let pools = shared.pools.all();
            let servers: usize = pools.iter().map(|p| p.pool.snapshot().size).sum();
            let items = [
                ("databases", config.databases.len()),
                ("users", config.users.len()),
                ("pools", pools.len()),
                ("free_clients", 0),
                ("used_clients", shared.clients_registry.len()),
                ("login_clients", 0),
                ("free_servers", 0),
                ("used_servers", servers),
                ("dns_names", 0),
                ("dns_zones", 0),
                ("dns_queries", 0),
                ("dns_pending", 0),
            ];
            for (k, v) in items {
                rows.row(&[k.into(), v.to_string()]);
            }
            rows.done("SHOW");
        }
        "VERSION" => {
            let mut rows = Rows::new(out, &[("version", oid::TEXT)]);
            rows.row(&[VERSION.into()]);
            rows.done("SHOW");
        }
        other => {
            return Err(ErrorResponse::error(
                SqlState(*b"42601"),
                format!("unknown SHOW target: {other}"),
            )
            .with_hint(
                "POOLS, STATS, CLIENTS, SERVERS, DATABASES, CONFIG, LISTS, VERSION, TOTALS",
            ));
        }
    }
    Ok(())
}

fn path(p: &Option<std::path::PathBuf>) -> String {
    p.as_ref()
        .map_or(String::new(), |p| p.display().to_string())
}
