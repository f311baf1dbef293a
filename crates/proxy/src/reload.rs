//! Hot reload, rollback and live resize: a new config is loaded and validated whole before
//! anything changes; then the difference is applied to the running pools (see
//! [`crate::pools::Pools::reconfigure`]).
//!
//! What cannot change while Weir runs (its listen addresses, worker threads, Unix socket and
//! admin listener) is reported and keeps its running value, so the config Weir shows is the
//! one in force.

use std::sync::Arc;

use weir_config::{Config, Problems, Source};

use crate::auth::UserDirectory;
use crate::listener::Shared;

/// What a reload changed.
#[derive(Debug, Clone, Default)]
pub struct ReloadReport {
    /// One line per change applied.
    pub changes: Vec<String>,
    /// Settings that changed in the file but need a restart; the running value stays.
    pub restart_needed: Vec<String>,
    /// Warnings from validating the new config.
    pub warnings: Vec<String>,
}

/// Why a reload changed nothing.
#[derive(Debug, thiserror::Error)]
pub enum ReloadError {
    #[error("nothing to reload: weir was started without a config file (quick start)")]
    NoSource,
    #[error("the new config has problems; the running config stays:\n{0}")]
    Invalid(Problems),
    #[error("nothing to roll back to: no reload has happened yet")]
    NoPrevious,
    #[error("weir is shutting down")]
    Stopping,
}

impl ReloadError {
    /// Each problem on its own line (for JSON and the console).
    pub fn lines(&self) -> Vec<String> {
        match self {
            ReloadError::Invalid(p) => p.errors().map(|p| p.to_string()).collect(),
            other => vec![other.to_string()],
        }
    }
}

impl Shared {
    /// Remembers how the running config was loaded, so it can be loaded again.
    pub fn set_source(&self, source: Source) {
        *self.source.lock().unwrap() = Some(source);
    }

    /// Loads the config again (file, profile, the process environment as it is now, and
    /// the `--set` overrides), validates it, and applies it if it has no errors.
    pub fn reload(&self) -> Result<ReloadReport, ReloadError> {
        let source = self.source.lock().unwrap().clone();
        let source = source.ok_or(ReloadError::NoSource)?;
        let env: Vec<(String, String)> = std::env::vars().collect();
        let (config, warnings) = source.load(&env).map_err(ReloadError::Invalid)?;
        let warnings = warnings.warnings().map(|w| w.to_string()).collect();
        let mut report = self.apply(config)?;
        report.warnings = warnings;
        Ok(report)
    }

    /// Goes back to the config in force before the last reload (or rollback).
    pub fn rollback(&self) -> Result<ReloadReport, ReloadError> {
        let previous = self.previous.lock().unwrap().clone();
        let previous = previous.ok_or(ReloadError::NoPrevious)?;
        self.apply(Config::clone(&previous))
    }

    /// Applies a validated config to the running proxy. One at a time.
    pub fn apply(&self, mut new: Config) -> Result<ReloadReport, ReloadError> {
        let _one_at_a_time = self.reloading.lock().unwrap();
        if self.stopping.load(std::sync::atomic::Ordering::Acquire) {
            return Err(ReloadError::Stopping);
        }
        // Certificate files are read again, so a renewed certificate takes effect; a bad
        // one refuses the whole reload.
        let tls = crate::tls::TlsSetup::from_config(&new).map_err(|e| {
            let mut p = Problems::default();
            p.push(weir_config::Problem::error("tls", e));
            ReloadError::Invalid(p)
        })?;
        let old = self.config.load_full();
        let mut report = ReloadReport {
            restart_needed: keep_fixed(&old, &mut new),
            ..ReloadReport::default()
        };
        report.changes.extend(membership(
            "database",
            old.databases.keys(),
            new.databases.keys(),
        ));
        report
            .changes
            .extend(membership("user", old.users.keys(), new.users.keys()));
        if old.auth_type != new.auth_type {
            report.changes.push(format!(
                "auth.type: {} -> {} (for new logins)",
                old.auth_type, new.auth_type
            ));
        }
        if old.admin.token != new.admin.token {
            report.changes.push("admin.token changed".into());
        }
        if old.proxy.max_client_conn != new.proxy.max_client_conn {
            report.changes.push(format!(
                "proxy.max_client_conn: {} -> {}",
                old.proxy.max_client_conn, new.proxy.max_client_conn
            ));
        }
        if tls.accepts() || tls.server_mode.is_some() {
            report.changes.push(format!(
                "TLS: clients {}, servers {} (certificate files read again)",
                new.tls.mode, new.server_tls.mode
            ));
        }
        self.pools.tls.store(Arc::new(tls));
        self.users.store(Arc::new(UserDirectory::new(&new)));
        let new = Arc::new(new);
        self.config.store(new.clone());
        // Pools are reconfigured after the config is in place, so a session that finds its
        // pool retired looks up the new one in the new config.
        report.changes.extend(self.pools.reconfigure(&new));
        *self.previous.lock().unwrap() = Some(old);
        for c in &report.changes {
            tracing::info!("reload: {c}");
        }
        for r in &report.restart_needed {
            tracing::warn!("reload: {r}");
        }
        if report.changes.is_empty() {
            tracing::info!("reload: no changes");
        }
        Ok(report)
    }

    /// Live resize of one pool, until the next reload. `None` if no such pool exists yet.
    pub fn resize_pool(&self, database: &str, user: &str, size: u32) -> Result<u32, String> {
        if size == 0 {
            return Err("size must be at least 1".into());
        }
        // Not interleaved with a reload, which would otherwise be partly undone.
        let _one_at_a_time = self.reloading.lock().unwrap();
        let pool = self
            .pools
            .all()
            .into_iter()
            .find(|p| p.database == database && p.user == user)
            .ok_or_else(|| {
                format!(
                    "no pool {database}/{user}: it exists once a client of that database and user has connected (or the database has a fixed user)"
                )
            })?;
        let old = pool.settings().size;
        pool.set_size(size);
        tracing::info!(pool = %pool.name(), old, new = size, "pool resized (until the next reload)");
        Ok(old)
    }
}

/// Copies the settings that cannot change live from `old` into `new`, and says which ones
/// the new config wanted to change.
fn keep_fixed(old: &Config, new: &mut Config) -> Vec<String> {
    let mut out = Vec::new();
    let mut note = |key: &str, was: String, wanted: String| {
        out.push(format!(
            "{key}: {was} -> {wanted} needs a restart; {was} stays in force until then"
        ));
    };
    if old.proxy.listen != new.proxy.listen {
        let show = |v: &[std::net::SocketAddr]| {
            v.iter()
                .map(|a| a.to_string())
                .collect::<Vec<_>>()
                .join(",")
        };
        note(
            "proxy.listen",
            show(&old.proxy.listen),
            show(&new.proxy.listen),
        );
        new.proxy.listen = old.proxy.listen.clone();
    }
    if old.proxy.unix_socket_dir != new.proxy.unix_socket_dir {
        let show = |v: &Option<std::path::PathBuf>| {
            v.as_ref()
                .map_or("(none)".into(), |p| p.display().to_string())
        };
        note(
            "proxy.unix_socket_dir",
            show(&old.proxy.unix_socket_dir),
            show(&new.proxy.unix_socket_dir),
        );
        new.proxy.unix_socket_dir = old.proxy.unix_socket_dir.clone();
    }
    if old.proxy.workers != new.proxy.workers {
        note(
            "proxy.workers",
            old.proxy.workers.to_string(),
            new.proxy.workers.to_string(),
        );
        new.proxy.workers = old.proxy.workers;
    }
    if old.admin.listen != new.admin.listen {
        let show = |v: &Option<std::net::SocketAddr>| v.map_or("off".into(), |a| a.to_string());
        note(
            "admin.listen",
            show(&old.admin.listen),
            show(&new.admin.listen),
        );
        new.admin.listen = old.admin.listen;
    }
    out
}

/// "database x added" / "database y removed" lines.
fn membership<'a>(
    what: &str,
    old: impl Iterator<Item = &'a String>,
    new: impl Iterator<Item = &'a String>,
) -> Vec<String> {
    let old: std::collections::BTreeSet<_> = old.collect();
    let new: std::collections::BTreeSet<_> = new.collect();
    let mut out: Vec<String> = new
        .difference(&old)
        .map(|n| format!("{what} {n} added"))
        .collect();
    out.extend(old.difference(&new).map(|n| format!("{what} {n} removed")));
    out
}
