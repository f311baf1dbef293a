//! Session parameters: what a client believes each run-time parameter is, what each server
//! connection has, and the one query that makes a server match a client before its
//! transaction runs.
//!
//! Reported parameters (those PostgreSQL sends ParameterStatus for) are tracked from the
//! server's own reports, so a client's `SET TimeZone` is carried to its next server
//! connection. Parameters that are not reported (search_path, statement_timeout, ...) are
//! carried only when the client gave them at startup; a `SET` of one inside a transaction-mode
//! session stays on the server connection it ran on (see the README).

/// One parameter: lower-cased key for lookups (GUC names are case-insensitive), the name as
/// first seen, and the value.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Param {
    key: Box<str>,
    name: Box<str>,
    value: Box<str>,
}

/// A small ordered map of parameters. A handful of entries: a Vec beats a HashMap here.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ParamSet {
    items: Vec<Param>,
}

impl ParamSet {
    pub fn get(&self, name: &str) -> Option<&str> {
        self.items
            .iter()
            .find(|p| p.key.eq_ignore_ascii_case(name))
            .map(|p| &*p.value)
    }

    /// Sets a value; returns whether it changed.
    pub fn set(&mut self, name: &str, value: &str) -> bool {
        match self
            .items
            .iter_mut()
            .find(|p| p.key.eq_ignore_ascii_case(name))
        {
            Some(p) if &*p.value == value => false,
            Some(p) => {
                p.value = value.into();
                true
            }
            None => {
                self.items.push(Param {
                    key: name.to_ascii_lowercase().into(),
                    name: name.into(),
                    value: value.into(),
                });
                true
            }
        }
    }

    pub fn remove(&mut self, name: &str) {
        self.items.retain(|p| !p.key.eq_ignore_ascii_case(name));
    }

    pub fn clear(&mut self) {
        self.items.clear();
    }

    pub fn is_empty(&self) -> bool {
        self.items.is_empty()
    }

    /// A hash of the names and values in order.
    pub fn fingerprint(&self) -> u64 {
        use std::hash::{Hash, Hasher};
        let mut h = std::collections::hash_map::DefaultHasher::new();
        for p in &self.items {
            p.key.hash(&mut h);
            p.value.hash(&mut h);
        }
        h.finish()
    }

    /// `(name, value)` pairs in insertion order.
    pub fn iter(&self) -> impl Iterator<Item = (&str, &str)> {
        self.items.iter().map(|p| (&*p.name, &*p.value))
    }
}

/// Reported parameters a client cannot change; never synchronised.
const READ_ONLY: &[&str] = &[
    "server_version",
    "server_encoding",
    "integer_datetimes",
    "is_superuser",
    "session_authorization",
    "in_hot_standby",
    "scram_iterations",
];

/// Startup keys that are not run-time parameters.
const NOT_PARAMETERS: &[&str] = &["user", "database", "replication", "options"];

fn is_read_only(key: &str) -> bool {
    READ_ONLY.iter().any(|k| k.eq_ignore_ascii_case(key))
}

/// A name Weir can put unquoted in `SET name TO ...`.
fn is_plain_name(name: &str) -> bool {
    !name.is_empty()
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'.')
}

/// PostgreSQL accepts several spellings of UTF8; report the canonical one as it would.
fn normalize(key: &str, value: &str) -> String {
    if key.eq_ignore_ascii_case("client_encoding") {
        let squashed: String = value.chars().filter(|c| *c != '-' && *c != '_').collect();
        if squashed.eq_ignore_ascii_case("utf8") || squashed.eq_ignore_ascii_case("unicode") {
            return "UTF8".into();
        }
        return value.to_ascii_uppercase();
    }
    value.to_string()
}

/// Splits a libpq `options` string (`-c name=value --name=value`, backslash escapes) into
/// parameters.
pub fn parse_options(options: &str) -> Result<Vec<(String, String)>, String> {
    let mut words = Vec::new();
    let mut cur = String::new();
    let mut chars = options.chars();
    while let Some(c) = chars.next() {
        match c {
            '\\' => cur.extend(chars.next()),
            c if c.is_whitespace() => {
                if !cur.is_empty() {
                    words.push(std::mem::take(&mut cur));
                }
            }
            c => cur.push(c),
        }
    }
    if !cur.is_empty() {
        words.push(cur);
    }
    let mut out = Vec::new();
    let mut it = words.into_iter();
    while let Some(w) = it.next() {
        let setting = if w == "-c" {
            it.next().ok_or("`-c` without a setting")?
        } else if let Some(s) = w.strip_prefix("--") {
            s.to_string()
        } else if let Some(s) = w.strip_prefix("-c") {
            s.to_string()
        } else {
            return Err(format!(
                "unsupported option `{w}`; only -c name=value and --name=value are accepted"
            ));
        };
        let (k, v) = setting
            .split_once('=')
            .ok_or_else(|| format!("`{setting}` is not name=value"))?;
        out.push((k.replace('-', "_"), v.to_string()));
    }
    Ok(out)
}

/// What one client believes: every reported parameter plus what it asked for at startup.
#[derive(Debug, Clone, Default)]
pub struct ClientParams {
    /// Shared copy-on-write: clients of a pool nearly always want the same set, and an idle
    /// client should not carry its own copy of a dozen strings (issue 8's memory target).
    wanted: std::sync::Arc<ParamSet>,
    /// Identifies the content of `wanted`: a server connection last synchronised to the same
    /// fingerprint needs no query (the common case: every client of an app asks for the same).
    fingerprint: u64,
}

impl ClientParams {
    /// Starts from the pool's defaults (what the server reported at login) and applies the
    /// client's startup parameters and `options`.
    pub fn new(defaults: &ParamSet, startup: &[(String, String)]) -> Result<ClientParams, String> {
        let mut wanted = defaults.clone();
        for (k, v) in startup {
            if k.starts_with("_pq_.") || NOT_PARAMETERS.iter().any(|n| n.eq_ignore_ascii_case(k)) {
                continue;
            }
            set_checked(&mut wanted, k, v)?;
        }
        if let Some((_, opts)) = startup.iter().find(|(k, _)| k == "options") {
            for (k, v) in parse_options(opts)? {
                set_checked(&mut wanted, &k, &v)?;
            }
        }
        Ok(ClientParams::from_set(wanted))
    }

    pub fn from_set(wanted: ParamSet) -> ClientParams {
        let fingerprint = wanted.fingerprint();
        ClientParams {
            wanted: std::sync::Arc::new(wanted),
            fingerprint,
        }
    }

    pub fn wanted(&self) -> &ParamSet {
        &self.wanted
    }

    /// Records a value the client now has (from a ParameterStatus of its own session).
    pub fn set(&mut self, name: &str, value: &str) {
        if self.wanted.get(name) == Some(value) {
            return;
        }
        if std::sync::Arc::make_mut(&mut self.wanted).set(name, value) {
            self.fingerprint = self.wanted.fingerprint();
        }
    }

    /// The parameters to report to the client at login: those the server reports.
    pub fn reported<'a>(
        &'a self,
        defaults: &'a ParamSet,
    ) -> impl Iterator<Item = (&'a str, &'a str)> {
        self.wanted
            .iter()
            .filter(|(k, _)| defaults.get(k).is_some())
    }
}

/// What the last login to a pool settled: kept so that the next client sending the same
/// startup parameters (an app connecting per request sends the same every time) skips
/// building, hashing and encoding them again.
#[derive(Debug)]
struct LastLogin {
    defaults: std::sync::Arc<ParamSet>,
    startup: Vec<(String, String)>,
    params: ClientParams,
    /// The ParameterStatus messages of the login, encoded.
    reply: bytes::Bytes,
}

/// One pool's [`LastLogin`].
#[derive(Debug, Default)]
pub struct LoginCache(std::sync::Mutex<Option<std::sync::Arc<LastLogin>>>);

impl LoginCache {
    /// A client's parameters and the ParameterStatus messages its login reports, from the
    /// pool's `defaults` and the client's startup parameters. Clients that want the same set
    /// share one copy of it (an idle client should not carry a dozen strings of its own).
    pub fn settle(
        &self,
        defaults: &std::sync::Arc<ParamSet>,
        startup: &[(String, String)],
    ) -> Result<(ClientParams, bytes::Bytes), String> {
        let last = self.0.lock().unwrap_or_else(|p| p.into_inner()).clone();
        if let Some(l) = &last
            && std::sync::Arc::ptr_eq(&l.defaults, defaults)
            && l.startup == startup
        {
            return Ok((l.params.clone(), l.reply.clone()));
        }
        let mut params = ClientParams::new(defaults, startup)?;
        if let Some(l) = &last
            && *l.params.wanted == *params.wanted
        {
            params.wanted = l.params.wanted.clone();
        }
        let mut reply = bytes::BytesMut::new();
        for (name, value) in params.reported(defaults) {
            weir_wire::backend::ParameterStatus {
                name: name.as_bytes(),
                value: value.as_bytes(),
            }
            .encode(&mut reply);
        }
        let reply = reply.freeze();
        *self.0.lock().unwrap_or_else(|p| p.into_inner()) = Some(std::sync::Arc::new(LastLogin {
            defaults: defaults.clone(),
            startup: startup.to_vec(),
            params: params.clone(),
            reply: reply.clone(),
        }));
        Ok((params, reply))
    }
}

fn set_checked(set: &mut ParamSet, k: &str, v: &str) -> Result<(), String> {
    if !is_plain_name(k) {
        return Err(format!("invalid parameter name \"{k}\""));
    }
    if is_read_only(k) {
        return Err(format!("parameter \"{k}\" cannot be changed"));
    }
    set.set(k, &normalize(k, v));
    Ok(())
}

/// What one server connection has: the values it reported, and what Weir set on it that has
/// not been changed since.
#[derive(Debug, Clone, Default)]
pub struct ServerParams {
    pub reported: ParamSet,
    pub set_by_weir: ParamSet,
    /// Fingerprint of the client parameters this connection was last made to match, while
    /// nothing has changed it since.
    synced: Option<u64>,
}

impl ServerParams {
    /// Records a ParameterStatus. `ours` is true while Weir's own synchronising query runs;
    /// otherwise the client changed the value and Weir's record of it is void.
    pub fn on_report(&mut self, name: &str, value: &str, ours: bool) {
        self.reported.set(name, value);
        if !ours {
            self.set_by_weir.remove(name);
            self.synced = None;
        }
    }

    /// Forgets what Weir set (after DISCARD ALL or a reset query).
    pub fn forget_sets(&mut self) {
        self.set_by_weir.clear();
        self.synced = None;
    }

    /// Builds the query that makes this server match `client`, or `None` if it already does.
    /// Records the values as set, so the caller must send the query.
    pub fn sync_query(&mut self, client: &ClientParams) -> Option<String> {
        if self.synced == Some(client.fingerprint) {
            return None;
        }
        self.synced = Some(client.fingerprint);
        let mut q = String::new();
        for (name, value) in client.wanted.iter() {
            if is_read_only(name) {
                continue;
            }
            let matches = match self.set_by_weir.get(name) {
                Some(v) => v == value,
                None => self.reported.get(name) == Some(value),
            };
            if !matches {
                push_set(&mut q, name, value);
                self.set_by_weir.set(name, value);
            }
        }
        let stale: Vec<String> = self
            .set_by_weir
            .iter()
            .filter(|(k, _)| client.wanted.get(k).is_none())
            .map(|(k, _)| k.to_string())
            .collect();
        for k in stale {
            q.push_str("RESET ");
            q.push_str(&k.to_ascii_lowercase());
            q.push(';');
            self.set_by_weir.remove(&k);
        }
        (!q.is_empty()).then_some(q)
    }
}

fn push_set(q: &mut String, name: &str, value: &str) {
    q.push_str("SET ");
    q.push_str(&name.to_ascii_lowercase());
    q.push_str(" TO E'");
    for c in value.chars() {
        match c {
            '\'' => q.push_str("''"),
            '\\' => q.push_str("\\\\"),
            c => q.push(c),
        }
    }
    q.push_str("';");
}

#[cfg(test)]
mod tests {
    use super::*;

    fn defaults() -> ParamSet {
        let mut d = ParamSet::default();
        for (k, v) in [
            ("server_version", "15.8"),
            ("client_encoding", "UTF8"),
            ("DateStyle", "ISO, MDY"),
            ("TimeZone", "Etc/UTC"),
            ("application_name", ""),
        ] {
            d.set(k, v);
        }
        d
    }

    fn startup(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn startup_params_override_defaults_case_insensitively() {
        let c = ClientParams::new(
            &defaults(),
            &startup(&[
                ("user", "u"),
                ("datestyle", "German"),
                ("client_encoding", "utf-8"),
                ("search_path", "app"),
            ]),
        )
        .unwrap();
        assert_eq!(c.wanted.get("DateStyle"), Some("German"));
        assert_eq!(c.wanted.get("client_encoding"), Some("UTF8"));
        assert_eq!(c.wanted.get("user"), None);
        let d = defaults();
        let reported: Vec<_> = c.reported(&d).map(|(k, _)| k).collect();
        assert!(reported.contains(&"DateStyle") && !reported.contains(&"search_path"));
    }

    #[test]
    fn options_are_parsed() {
        let opts =
            parse_options(r"-c search_path=a\ b --statement-timeout=5s -cwork_mem=64MB").unwrap();
        assert_eq!(
            opts,
            vec![
                ("search_path".into(), "a b".into()),
                ("statement_timeout".into(), "5s".into()),
                ("work_mem".into(), "64MB".into())
            ]
        );
        assert!(parse_options("-x").is_err());
    }

    #[test]
    fn read_only_and_odd_names_are_refused() {
        assert!(ClientParams::new(&defaults(), &startup(&[("server_version", "1")])).is_err());
        assert!(ClientParams::new(&defaults(), &startup(&[("a;b", "1")])).is_err());
    }

    #[test]
    fn sync_sets_only_differences_and_resets_leftovers() {
        let mut server = ServerParams {
            reported: defaults(),
            ..Default::default()
        };
        let a = ClientParams::new(
            &defaults(),
            &startup(&[("TimeZone", "UTC"), ("search_path", "it's")]),
        )
        .unwrap();
        let q = server.sync_query(&a).unwrap();
        assert_eq!(q, "SET timezone TO E'UTC';SET search_path TO E'it''s';");
        // The server reports its normalised value during Weir's own query.
        server.on_report("TimeZone", "UTC", true);
        assert_eq!(server.sync_query(&a), None, "already in sync");

        let b = ClientParams::new(&defaults(), &startup(&[])).unwrap();
        let q = server.sync_query(&b).unwrap();
        assert_eq!(q, "SET timezone TO E'Etc/UTC';RESET search_path;");
    }

    #[test]
    fn client_set_voids_weirs_record() {
        let mut server = ServerParams {
            reported: defaults(),
            ..Default::default()
        };
        let a = ClientParams::new(&defaults(), &startup(&[("TimeZone", "UTC")])).unwrap();
        server.sync_query(&a);
        server.on_report("TimeZone", "UTC", true);
        // The client runs SET TimeZone itself, on this server.
        server.on_report("TimeZone", "Asia/Tokyo", false);
        assert_eq!(
            server.sync_query(&a).as_deref(),
            Some("SET timezone TO E'UTC';")
        );
    }

    #[test]
    fn identical_clients_need_no_query_after_the_first() {
        let mut server = ServerParams {
            reported: defaults(),
            ..Default::default()
        };
        let a = ClientParams::new(&defaults(), &startup(&[("search_path", "app")])).unwrap();
        let b = ClientParams::new(&defaults(), &startup(&[("search_path", "app")])).unwrap();
        assert!(server.sync_query(&a).is_some());
        server.on_report("search_path", "app", true);
        assert_eq!(
            server.sync_query(&b),
            None,
            "same parameters: nothing to send"
        );
        // The client changes a value in its own session: the shortcut no longer applies.
        server.on_report("TimeZone", "Asia/Tokyo", false);
        assert_eq!(
            server.sync_query(&b).as_deref(),
            Some("SET timezone TO E'Etc/UTC';")
        );
        let mut c = b.clone();
        c.set("TimeZone", "Asia/Tokyo");
        assert_eq!(
            server.sync_query(&c).as_deref(),
            Some("SET timezone TO E'Asia/Tokyo';")
        );
    }

    #[test]
    fn a_login_with_the_same_startup_reuses_the_last_one() {
        let cache = LoginCache::default();
        let d = std::sync::Arc::new(defaults());
        let s = startup(&[("user", "u"), ("TimeZone", "UTC"), ("search_path", "app")]);
        let (a, reply_a) = cache.settle(&d, &s).unwrap();
        assert_eq!(a.wanted().get("timezone"), Some("UTC"));
        // The reply reports what the server reports, with the client's value, and nothing
        // the server does not report.
        let text = String::from_utf8_lossy(&reply_a).to_string();
        assert!(text.contains("TimeZone\0UTC\0") && !text.contains("search_path"));
        assert_eq!(reply_a[0], b'S');

        let (b, reply_b) = cache.settle(&d, &s).unwrap();
        assert!(std::sync::Arc::ptr_eq(&a.wanted, &b.wanted));
        assert_eq!(a.fingerprint, b.fingerprint);
        assert_eq!(reply_a, reply_b);

        // Another startup is worked out afresh, and shares the set when it comes out equal.
        let (c, _) = cache
            .settle(&d, &startup(&[("TimeZone", "Asia/Tokyo")]))
            .unwrap();
        assert_eq!(c.wanted().get("TimeZone"), Some("Asia/Tokyo"));
        let (e, _) = cache
            .settle(&d, &startup(&[("timezone", "Asia/Tokyo")]))
            .unwrap();
        assert!(std::sync::Arc::ptr_eq(&c.wanted, &e.wanted));

        // New defaults (a reloaded pool's first connection) are never answered from the old.
        let mut d2 = defaults();
        d2.set("TimeZone", "Europe/Paris");
        let (f, _) = cache.settle(&std::sync::Arc::new(d2), &[]).unwrap();
        assert_eq!(f.wanted().get("TimeZone"), Some("Europe/Paris"));

        // A refused startup is an error every time, and leaves the cache alone.
        let bad = startup(&[("server_version", "1")]);
        assert!(cache.settle(&d, &bad).is_err());
        assert!(cache.settle(&d, &bad).is_err());
    }

    #[test]
    fn backslashes_are_escaped() {
        let mut q = String::new();
        push_set(&mut q, "x", r"a\b");
        assert_eq!(q, r"SET x TO E'a\\b';");
    }
}
