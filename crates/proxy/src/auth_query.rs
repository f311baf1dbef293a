//! auth_query: a user Weir has no secret for is looked up on the server, by running
//! `auth.query` as `auth.user` in the client's database. The secret found (an md5 hash or a
//! SCRAM verifier, as `pg_shadow.passwd` holds) checks the client's password, and, with the
//! ClientKey the client's SCRAM proof reveals, logs Weir in to the server as that user: no
//! password of such users is ever in the config. Answers, including "no such user", are
//! cached for `auth.cache_ttl`.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use weir_config::{Config, ServerLogin};

use crate::server::ServerConn;
use crate::tls::TlsSetup;

type Key = (String, String);
type Entries = HashMap<Key, (Instant, Option<String>)>;

/// Answers kept at most. Any client can ask for a user name before it authenticates, and
/// each name it makes up would otherwise stay cached for `cache_ttl`.
const MAX_CACHED: usize = 10_000;

/// Keeps `secret` for `key` as of `now`: drops what is older than `ttl`, and when the cache
/// is still full, the oldest answer.
fn remember(map: &mut Entries, key: Key, secret: Option<String>, now: Instant, ttl: Duration) {
    map.retain(|_, (at, _)| now.saturating_duration_since(*at) < ttl);
    if map.len() >= MAX_CACHED
        && !map.contains_key(&key)
        && let Some(oldest) = map
            .iter()
            .min_by_key(|(_, (at, _))| *at)
            .map(|(k, _)| k.clone())
    {
        map.remove(&oldest);
    }
    map.insert(key, (now, secret));
}

#[derive(Default)]
pub struct AuthCache {
    entries: Mutex<Entries>,
    /// One lookup at a time per database: a crowd of new clients makes one query, not a
    /// crowd of them, and a database that is down does not hold up lookups for the others.
    fetching: Mutex<HashMap<String, std::sync::Arc<tokio::sync::Mutex<()>>>>,
}

impl std::fmt::Debug for AuthCache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // The entries are secrets.
        f.write_str("AuthCache(<redacted>)")
    }
}

impl AuthCache {
    /// The secret of `user` for `database`: `Ok(None)` if the query finds no such user (or
    /// no password). `Err` says why the lookup could not be made.
    pub async fn lookup(
        &self,
        config: &Config,
        tls: &TlsSetup,
        database: &str,
        user: &str,
    ) -> Result<Option<String>, String> {
        let q = config
            .auth_query
            .as_ref()
            .ok_or("auth_query is not configured")?;
        let key = (database.to_string(), user.to_string());
        let cached = |entries: &Mutex<Entries>| {
            let map = entries.lock().unwrap_or_else(|p| p.into_inner());
            map.get(&key)
                .filter(|(at, _)| at.elapsed() < q.cache_ttl)
                .map(|(_, s)| s.clone())
        };
        if let Some(hit) = cached(&self.entries) {
            return Ok(hit);
        }
        let lock = self
            .fetching
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .entry(database.to_string())
            .or_default()
            .clone();
        let _one = lock.lock().await;
        if let Some(hit) = cached(&self.entries) {
            return Ok(hit);
        }
        let secret = fetch(config, tls, database, user).await?;
        let mut map = self.entries.lock().unwrap_or_else(|p| p.into_inner());
        remember(&mut map, key, secret.clone(), Instant::now(), q.cache_ttl);
        Ok(secret)
    }
}

async fn fetch(
    config: &Config,
    tls: &TlsSetup,
    database: &str,
    user: &str,
) -> Result<Option<String>, String> {
    let q = config.auth_query.as_ref().ok_or("auth_query is off")?;
    let db = config
        .databases
        .get(database)
        .ok_or_else(|| format!("database \"{database}\" is not configured"))?;
    let login = ServerLogin {
        host: db.host.clone(),
        port: db.port,
        dbname: db.dbname.clone(),
        user: q.user.clone(),
        password: config.users.get(&q.user).and_then(|u| u.password.clone()),
    };
    let timeout = config.pool_settings(database, &q.user).connect_timeout;
    let mut conn = ServerConn::connect(&login, None, tls, timeout, 0, 0)
        .await
        .map_err(|e| format!("auth_query as \"{}\": {e}", q.user))?;
    let rows = tokio::time::timeout(timeout, conn.query(&q.query, &[user]))
        .await
        .map_err(|_| format!("auth_query did not answer within {timeout:?}"))?
        .map_err(|e| format!("auth_query failed: {e}"))?;
    drop(conn);
    // (name, secret) as PgBouncer's query returns it; a one-column query is the secret.
    Ok(rows.into_iter().next().and_then(|row| {
        let i = if row.len() >= 2 { 1 } else { 0 };
        row.into_iter().nth(i).flatten()
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(i: usize) -> Key {
        ("db".to_string(), format!("user{i}"))
    }

    #[test]
    fn the_cache_forgets_old_answers_and_stays_bounded() {
        let ttl = Duration::from_secs(60);
        let t0 = Instant::now();
        let mut map = Entries::new();
        for i in 0..MAX_CACHED + 5 {
            let at = t0 + Duration::from_millis(i as u64);
            remember(&mut map, key(i), None, at, ttl);
        }
        assert_eq!(map.len(), MAX_CACHED);
        // The oldest answers made room for the newest.
        assert!(!map.contains_key(&key(0)) && !map.contains_key(&key(4)));
        assert!(map.contains_key(&key(5)) && map.contains_key(&key(MAX_CACHED + 4)));
        // A known user's new answer replaces its old one without evicting anyone.
        let later = t0 + Duration::from_secs(1);
        remember(&mut map, key(7), Some("md5x".into()), later, ttl);
        assert_eq!(map.len(), MAX_CACHED);
        assert_eq!(map[&key(7)].1.as_deref(), Some("md5x"));
        // Once they are older than the ttl, all of them go at the next answer.
        remember(&mut map, key(1), None, t0 + Duration::from_secs(71), ttl);
        assert_eq!(map.len(), 1);
        assert!(map.contains_key(&key(1)));
    }
}
