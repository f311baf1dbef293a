//! `weir check`: verify a config before it is deployed.
//!
//! Offline, the config is loaded with every layer (file, profile, environment, `--set`) and
//! every problem is listed. With `--online`, each server is asked for its connection limit,
//! the connections reserved and those other applications hold, to see whether `--instances`
//! copies of Weir fit, and every configured login is tried.
//!
//! Exit codes: 0 all good, 1 errors, 2 warnings only (64 for a usage error).

use std::collections::BTreeMap;
use std::process::ExitCode;
use std::time::Duration;

use clap::Args;
use serde_json::{Value, json};
use weir_config::{Config, Problem, Problems, Severity};

use crate::SourceArgs;

#[derive(Args)]
pub struct CheckArgs {
    #[command(flatten)]
    source: SourceArgs,
    /// Also connect to every server: check its max_connections against the pools, and
    /// every configured login.
    #[arg(long)]
    online: bool,
    /// Copies of Weir that will run with this config (for --online's capacity check).
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..))]
    instances: u32,
    /// Print one JSON document instead of text.
    #[arg(long)]
    json: bool,
}

/// Share of a server's available connections kept free for the unexpected.
const HEADROOM: f64 = 0.10;

/// What `--online` learned about one server.
struct ServerReport {
    server: String,
    version: String,
    max_connections: i64,
    reserved: i64,
    others: i64,
    available: i64,
    demand: u64,
    needed: u64,
}

struct LoginReport {
    database: String,
    user: String,
    result: Result<(), String>,
}

pub fn main(args: CheckArgs) -> ExitCode {
    let source = args.source.source();
    let what = match &source.file {
        Some(p) => p.display().to_string(),
        None => "(no file: environment and --set only)".to_string(),
    };
    let (config, mut problems) = match source.load(&crate::env_vars()) {
        Ok((c, p)) => (Some(c), p),
        Err(p) => (None, p),
    };
    // The certificate files are parsed as Weir would at start: a key that does not match
    // its certificate is an error here, not at the first client.
    if let Some(c) = &config
        && let Err(e) = weir_proxy::tls::TlsSetup::from_config(c)
    {
        let (key, msg) = e
            .split_once(": ")
            .filter(|(k, _)| !k.contains(' '))
            .unwrap_or(("tls", &e));
        problems.push(Problem::error(key, msg).fix("give PEM files that belong together"));
    }
    let mut servers = Vec::new();
    let mut logins = Vec::new();
    if let (true, Some(config)) = (args.online, &config) {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("a runtime");
        rt.block_on(online(
            config,
            args.instances,
            &mut problems,
            &mut servers,
            &mut logins,
        ));
    }
    let errors = problems.errors().count();
    let warnings = problems.warnings().count();
    let code: u8 = if errors > 0 {
        1
    } else if warnings > 0 {
        2
    } else {
        0
    };
    let verdict = match code {
        0 => "OK: no problems".to_string(),
        1 => format!(
            "FAILED: {errors} error{}, {warnings} warning{}",
            plural(errors),
            plural(warnings)
        ),
        _ => format!(
            "PASSED WITH WARNINGS: {warnings} warning{}",
            plural(warnings)
        ),
    };
    if args.json {
        let doc = json!({
            "config": what,
            "profile": source.profile,
            "online": args.online,
            "instances": args.instances,
            "problems": problems.0.iter().map(problem_json).collect::<Vec<_>>(),
            "servers": servers.iter().map(|s| json!({
                "server": s.server, "version": s.version,
                "max_connections": s.max_connections, "reserved": s.reserved,
                "held_by_others": s.others, "available": s.available,
                "weir_max_per_instance": s.demand, "weir_max_total": s.needed,
            })).collect::<Vec<_>>(),
            "logins": logins.iter().map(|l| json!({
                "database": l.database, "user": l.user, "ok": l.result.is_ok(),
                "error": l.result.as_ref().err(),
            })).collect::<Vec<_>>(),
            "errors": errors,
            "warnings": warnings,
            "verdict": verdict,
            "exit_code": code,
        });
        println!("{}", serde_json::to_string_pretty(&doc).expect("JSON"));
    } else {
        print!("{}", human(&what, &source, &problems, &servers, &logins));
        println!("weir check: {verdict}");
    }
    ExitCode::from(code)
}

fn plural(n: usize) -> &'static str {
    if n == 1 { "" } else { "s" }
}

fn problem_json(p: &Problem) -> Value {
    json!({
        "severity": match p.severity { Severity::Error => "error", Severity::Warning => "warning" },
        "path": p.path,
        "message": p.message,
        "fix": p.fix,
    })
}

fn human(
    what: &str,
    source: &weir_config::Source,
    problems: &Problems,
    servers: &[ServerReport],
    logins: &[LoginReport],
) -> String {
    use std::fmt::Write;
    let mut out = String::new();
    let profile = source
        .profile
        .as_deref()
        .map(|p| format!(" (profile {p})"))
        .unwrap_or_default();
    let _ = writeln!(out, "checking {what}{profile}");
    for s in servers {
        let _ = writeln!(
            out,
            "server {} (PostgreSQL {}): max_connections {}, reserved {}, held by others {}: {} available; Weir may open {}",
            s.server, s.version, s.max_connections, s.reserved, s.others, s.available, s.needed
        );
    }
    for l in logins {
        let status = match &l.result {
            Ok(()) => "ok".to_string(),
            Err(e) => format!("FAILED: {e}"),
        };
        let _ = writeln!(out, "login {} to {}: {status}", l.user, l.database);
    }
    let mut sorted: Vec<&Problem> = problems.0.iter().collect();
    sorted.sort_by_key(|p| std::cmp::Reverse(p.severity));
    for p in sorted {
        let level = match p.severity {
            Severity::Error => "error",
            Severity::Warning => "warning",
        };
        let _ = writeln!(out, "{level:<8} {}: {}", p.path, p.message);
        if let Some(fix) = &p.fix {
            let _ = writeln!(out, "{:<8} fix: {fix}", "");
        }
    }
    out
}

/// Connects to every server and login of the config.
async fn online(
    config: &Config,
    instances: u32,
    problems: &mut Problems,
    servers: &mut Vec<ServerReport>,
    logins: &mut Vec<LoginReport>,
) {
    let demand = config.server_demand();
    // One login per database: its fixed user, else every configured user.
    let mut by_server: BTreeMap<String, Vec<(String, weir_config::ServerLogin)>> = BTreeMap::new();
    for (name, db) in &config.databases {
        let users: Vec<String> = match &db.user {
            Some(u) => vec![u.clone()],
            None => config.users.keys().cloned().collect(),
        };
        for u in users {
            if let Some(login) = config.server_login(name, &u) {
                by_server
                    .entry(format!("{}:{}", db.host, db.port))
                    .or_default()
                    .push((name.clone(), login));
            }
        }
    }
    for (server, list) in by_server {
        let mut measured = false;
        for (database, login) in list {
            let path = format!("databases.{database}");
            let secret = login.password.as_ref().map(|p| p.expose().to_string());
            if secret
                .as_deref()
                .is_some_and(|s| s.starts_with("SCRAM-SHA-256$") || is_md5_hash(s))
            {
                problems.push(
                    Problem::warning(
                        path,
                        format!(
                            "login {} not tried: only a hash of its password is configured",
                            login.user
                        ),
                    )
                    .fix(
                        "give the plain password (e.g. { env = \"VAR\" }) to let weir check try it",
                    ),
                );
                continue;
            }
            let mut pg = tokio_postgres::Config::new();
            pg.host(&login.host)
                .port(login.port)
                .dbname(&login.dbname)
                .user(&login.user)
                .application_name("weir check")
                .connect_timeout(Duration::from_secs(5));
            if let Some(pw) = &secret {
                pg.password(pw);
            }
            let connected =
                tokio::time::timeout(Duration::from_secs(10), pg.connect(tokio_postgres::NoTls))
                    .await
                    .map_err(|_| "no answer within 10s".to_string())
                    .and_then(|r| r.map_err(|e| pg_error(&e)));
            let client = match connected {
                Ok((client, conn)) => {
                    tokio::spawn(conn);
                    client
                }
                Err(e) => {
                    problems.push(
                        Problem::error(
                            path,
                            format!(
                                "login as {} to {server}/{} failed: {e}",
                                login.user, login.dbname
                            ),
                        )
                        .fix("check the server address, the database name and the user's password"),
                    );
                    logins.push(LoginReport {
                        database,
                        user: login.user,
                        result: Err(e),
                    });
                    continue;
                }
            };
            logins.push(LoginReport {
                database,
                user: login.user.clone(),
                result: Ok(()),
            });
            if measured {
                continue;
            }
            match capacity(&client).await {
                Err(e) => problems.push(Problem::warning(
                    format!("server {server}"),
                    format!("could not read the connection limits: {e}"),
                )),
                Ok((version, max, reserved, others)) => {
                    measured = true;
                    let per = demand.get(&server).copied().unwrap_or(0);
                    let needed = per * instances as u64;
                    let available = max - reserved - others;
                    let report = ServerReport {
                        server: server.clone(),
                        version,
                        max_connections: max,
                        reserved,
                        others,
                        available,
                        demand: per,
                        needed,
                    };
                    let sum = format!(
                        "{instances} instance{} x {per} = {needed} server connections at most; the server has max_connections {max}, {reserved} reserved, {others} held by others: {available} available",
                        plural(instances as usize)
                    );
                    if needed as i64 > available {
                        problems.push(
                            Problem::error(format!("server {server}"), format!("the pools exceed the server's capacity: {sum}"))
                                .fix("lower pool sizes (or set max_db_connections), run fewer instances, or raise max_connections"),
                        );
                    } else if needed as f64 > available as f64 * (1.0 - HEADROOM) {
                        problems.push(
                            Problem::warning(format!("server {server}"), format!("less than {:.0}% headroom: {sum}", HEADROOM * 100.0))
                                .fix("leave room for maintenance and other clients: lower pool sizes or raise max_connections"),
                        );
                    }
                    servers.push(report);
                }
            }
        }
    }
}

/// (version, max_connections, reserved for superusers and roles, held by other clients)
async fn capacity(c: &tokio_postgres::Client) -> Result<(String, i64, i64, i64), String> {
    let row = c
        .query_one(
            "select current_setting('server_version'), \
                    current_setting('max_connections')::int8, \
                    current_setting('superuser_reserved_connections')::int8 \
                      + coalesce(nullif(current_setting('reserved_connections', true), ''), '0')::int8, \
                    (select count(*) from pg_stat_activity \
                      where backend_type = 'client backend' and pid <> pg_backend_pid())",
            &[],
        )
        .await
        .map_err(|e| pg_error(&e))?;
    Ok((row.get(0), row.get(1), row.get(2), row.get(3)))
}

fn is_md5_hash(s: &str) -> bool {
    s.len() == 35 && s.starts_with("md5") && s[3..].bytes().all(|b| b.is_ascii_hexdigit())
}

fn pg_error(e: &tokio_postgres::Error) -> String {
    match e.as_db_error() {
        Some(db) => format!("{} ({})", db.message(), db.code().code()),
        None => {
            let mut s = e.to_string();
            let mut src = std::error::Error::source(e);
            while let Some(inner) = src {
                s = format!("{s}: {inner}");
                src = inner.source();
            }
            s
        }
    }
}
