//! `weir reload`: asks a running Weir, through its admin listener, to load its config again
//! (`POST /api/reload`) or to roll back the last reload. Exit codes: 0 applied, 1 rejected
//! (the running config is unchanged; every problem is printed), 64 usage, 69 Weir could not
//! be reached.

use std::net::SocketAddr;
use std::process::ExitCode;

use anyhow::{Context, anyhow};
use clap::Args;
use serde_json::Value;

use crate::SourceArgs;

#[derive(Args, Debug)]
pub struct ReloadArgs {
    /// Restore the config in force before the last reload.
    #[arg(long)]
    rollback: bool,
    /// The admin listener of the running Weir, HOST:PORT (default: admin.listen of the
    /// config).
    #[arg(long, env = "WEIR_ADMIN_ADDR", value_parser = parse_admin)]
    admin: Option<SocketAddr>,
    /// Bearer token for the admin listener (default: admin.token of the config).
    #[arg(long, env = "WEIR_ADMIN_TOKEN", hide_env_values = true)]
    token: Option<String>,
    /// Where to find the admin address and token when not given.
    #[command(flatten)]
    source: SourceArgs,
}

fn parse_admin(s: &str) -> Result<SocketAddr, String> {
    crate::http::admin_addr(s).map_err(|e| e.to_string())
}

pub fn main(args: ReloadArgs) -> ExitCode {
    match run(args) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("weir reload: {e:#}");
            ExitCode::from(69)
        }
    }
}

fn run(args: ReloadArgs) -> anyhow::Result<ExitCode> {
    let (addr, token) = match (args.admin, &args.token) {
        (Some(a), t) => (a, t.clone()),
        (None, t) => {
            if args.source.config.is_none() {
                eprintln!(
                    "weir reload: give --admin HOST:PORT (or WEIR_ADMIN_ADDR), or --config FILE to read admin.listen from"
                );
                return Ok(ExitCode::from(64));
            }
            let (config, _) = args
                .source
                .source()
                .load(&crate::env_vars())
                .map_err(|p| anyhow!("cannot read the admin address from the config:\n{p}"))?;
            let addr = config
                .admin
                .listen
                .context("the config has no admin.listen: give --admin HOST:PORT")?;
            let token = t
                .clone()
                .or_else(|| config.admin.token.map(|s| s.expose().to_string()));
            (addr, token)
        }
    };
    let path = if args.rollback {
        "/api/reload?rollback=true"
    } else {
        "/api/reload"
    };
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let (status, body) = rt.block_on(crate::http::request(
        hyper::Method::POST,
        addr,
        path,
        token.as_deref(),
    ))?;
    let v: Value = serde_json::from_slice(&body).map_err(|_| {
        anyhow!(
            "{addr} answered {status}: {}",
            String::from_utf8_lossy(&body).trim()
        )
    })?;
    let lines = |key: &str| -> Vec<String> {
        v.get(key)
            .and_then(Value::as_array)
            .map(|a| {
                a.iter()
                    .filter_map(|s| s.as_str().map(str::to_string))
                    .collect()
            })
            .unwrap_or_default()
    };
    let what = if args.rollback { "rollback" } else { "reload" };
    if v.get("ok").and_then(Value::as_bool) == Some(true) {
        let changes = lines("changes");
        if changes.is_empty() {
            println!("{what} applied: no changes");
        } else {
            println!("{what} applied:");
            for c in changes {
                println!("  {c}");
            }
        }
        for r in lines("restart_needed") {
            println!("  not applied: {r}");
        }
        for w in lines("warnings") {
            println!("  warning: {w}");
        }
        Ok(ExitCode::SUCCESS)
    } else {
        eprintln!("{what} rejected; the running config is unchanged:");
        for e in lines("errors") {
            eprintln!("  {e}");
        }
        Ok(ExitCode::FAILURE)
    }
}
