//! Who may try to log in: the `[[access]]` rules (in the spirit of pg_hba.conf), checked
//! after the startup packet and before authentication, and the slowdown of failed logins per
//! client address.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use weir_config::Config;
use weir_wire::{ErrorResponse, SqlState};

/// Whether a client may go on to authenticate, for client and console logins alike: TLS if
/// `tls.mode = "require"` (plain TCP only; Unix sockets are exempt), then the access rules.
/// `Err` is the 28000 to send.
pub fn admit(
    config: &Config,
    tls_required: bool,
    client: &crate::stream::Stream,
    peer: Option<IpAddr>,
    database: &str,
    user: &str,
) -> Result<(), ErrorResponse> {
    if tls_required && client.is_plain_tcp() {
        return Err(ErrorResponse::fatal(
            SqlState::INVALID_AUTHORIZATION,
            "weir requires TLS (tls.mode = \"require\"), and the connection is not encrypted",
        )
        .with_hint("connect with sslmode=require or stronger"));
    }
    check(config, peer, database, user, client.is_tls())
}

/// Applies the rules in order; the first that matches decides. `Err` is the 28000 to send.
pub fn check(
    config: &Config,
    ip: Option<IpAddr>,
    database: &str,
    user: &str,
    tls: bool,
) -> Result<(), ErrorResponse> {
    if config.access.is_empty() {
        return Ok(());
    }
    let host = match ip {
        Some(ip) => format!("host \"{ip}\""),
        None => "local connection".to_string(),
    };
    let enc = if tls { "TLS" } else { "no encryption" };
    let refuse = |why: String| {
        Err(ErrorResponse::fatal(
            SqlState::INVALID_AUTHORIZATION,
            format!("{why} for {host}, user \"{user}\", database \"{database}\", {enc}"),
        ))
    };
    match config.access.iter().find(|r| r.matches(ip, database, user)) {
        None => refuse("no access rule allows the connection".into()),
        Some(r) if !r.allow => refuse(format!("access rule \"{}\" rejects the connection", r.name)),
        Some(r) if r.require_tls && !tls => refuse(format!(
            "access rule \"{}\" requires TLS, and the connection is not encrypted",
            r.name
        )),
        Some(_) => Ok(()),
    }
}

/// Failures are forgotten after this long without another from the same address.
const FORGET_AFTER: Duration = Duration::from_secs(60);
/// Addresses tracked at most; past it, old entries go, and if all are recent, all go.
const MAX_TRACKED: usize = 100_000;
/// Logins from one address that may be held in their pause at once; more are refused
/// (53300), so one address cannot fill the client slots with paused logins.
pub const MAX_PAUSED_PER_ADDRESS: u32 = 4;

/// Recent failed logins per client address (IPv6 by /64, since one host has a whole /64 to
/// rotate through). A login from an address with recent failures is paused before its
/// password exchange starts: `base` after one failure, twice as long for each further one,
/// up to `max`. Pausing before the attempt (not before the failure's answer) is what slows a
/// guesser: it cannot skip the pause by giving up on an answer that is late.
#[derive(Debug, Default)]
pub struct FailedLogins {
    state: Mutex<State>,
}

#[derive(Debug, Default)]
struct State {
    failures: HashMap<Option<IpAddr>, (u32, Instant)>,
    paused: HashMap<Option<IpAddr>, u32>,
}

fn key(ip: Option<IpAddr>) -> Option<IpAddr> {
    match ip {
        Some(IpAddr::V6(v6)) => match v6.to_ipv4_mapped() {
            Some(v4) => Some(IpAddr::V4(v4)),
            None => Some(IpAddr::V6((u128::from(v6) & !((1u128 << 64) - 1)).into())),
        },
        other => other,
    }
}

/// A login held in its pause; counts against [`MAX_PAUSED_PER_ADDRESS`] until dropped.
#[derive(Debug)]
pub struct Paused<'a> {
    owner: &'a FailedLogins,
    key: Option<IpAddr>,
}

impl Drop for Paused<'_> {
    fn drop(&mut self) {
        let mut st = self.owner.lock();
        if let Some(n) = st.paused.get_mut(&self.key) {
            *n -= 1;
            if *n == 0 {
                st.paused.remove(&self.key);
            }
        }
    }
}

impl FailedLogins {
    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// How long a login from `ip` waits before its password exchange, with the guard that
    /// holds its place; `Err` when too many logins from the address are already waiting.
    pub fn pause(
        &self,
        ip: Option<IpAddr>,
        base: Duration,
        max: Duration,
    ) -> Result<(Duration, Option<Paused<'_>>), ErrorResponse> {
        let k = key(ip);
        let n = self.count(ip);
        if n == 0 || base.is_zero() {
            return Ok((Duration::ZERO, None));
        }
        let mut st = self.lock();
        let waiting = st.paused.entry(k).or_insert(0);
        if *waiting >= MAX_PAUSED_PER_ADDRESS {
            return Err(ErrorResponse::fatal(
                SqlState::TOO_MANY_CONNECTIONS,
                "too many logins from this address after failed attempts; try again later",
            ));
        }
        *waiting += 1;
        let doublings = (n - 1).min(20);
        let pause = base.saturating_mul(1 << doublings).min(max);
        Ok((
            pause,
            Some(Paused {
                owner: self,
                key: k,
            }),
        ))
    }

    /// Records a failed login from `ip`.
    pub fn failed(&self, ip: Option<IpAddr>) {
        let now = Instant::now();
        let mut st = self.lock();
        if st.failures.len() >= MAX_TRACKED {
            st.failures
                .retain(|_, (_, at)| now.duration_since(*at) < FORGET_AFTER);
            if st.failures.len() >= MAX_TRACKED {
                st.failures.clear();
            }
        }
        let entry = st.failures.entry(key(ip)).or_insert((0, now));
        if now.duration_since(entry.1) >= FORGET_AFTER {
            entry.0 = 0;
        }
        entry.0 = entry.0.saturating_add(1);
        entry.1 = now;
    }

    /// Failures remembered for an address.
    pub fn count(&self, ip: Option<IpAddr>) -> u32 {
        let st = self.lock();
        st.failures
            .get(&key(ip))
            .filter(|(_, at)| at.elapsed() < FORGET_AFTER)
            .map_or(0, |(n, _)| *n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(toml: &str) -> Config {
        weir_config::load::from_toml_str(toml, None).unwrap().0
    }

    #[test]
    fn first_matching_rule_decides() {
        let c = config(
            r#"
            [databases.app]
            url = "postgres://h/app"
            [[access]]
            name = "no-batch-from-lan"
            action = "reject"
            address = "10.0.0.0/8"
            user = "batch"
            [[access]]
            action = "allow"
            address = "10.0.0.0/8"
            [[access]]
            action = "allow"
            address = "local"
            [[access]]
            action = "allow"
            address = "192.168.0.0/16"
            database = ["app"]
            require_tls = true
            "#,
        );
        let ip = |s: &str| Some(s.parse::<IpAddr>().unwrap());
        let e = check(&c, ip("10.1.2.3"), "app", "batch", false).unwrap_err();
        assert_eq!(e.code, SqlState::INVALID_AUTHORIZATION);
        assert!(e.message.contains("\"no-batch-from-lan\""), "{}", e.message);
        assert!(check(&c, ip("10.1.2.3"), "app", "web", false).is_ok());
        assert!(check(&c, None, "app", "batch", false).is_ok());
        let e = check(&c, ip("192.168.1.1"), "app", "web", false).unwrap_err();
        assert!(e.message.contains("requires TLS"), "{}", e.message);
        assert!(check(&c, ip("192.168.1.1"), "app", "web", true).is_ok());
        let e = check(&c, ip("172.16.0.1"), "app", "web", true).unwrap_err();
        assert!(e.message.contains("no access rule"), "{}", e.message);
        // IPv4 clients seen as IPv4-mapped IPv6 addresses match IPv4 ranges.
        assert!(check(&c, ip("::ffff:10.0.0.9"), "app", "web", false).is_ok());
    }

    #[test]
    fn bad_ranges_are_named() {
        let e = weir_config::load::from_toml_str(
            "[[access]]\naction = \"allow\"\naddress = \"10.0.0.0/33\"\n",
            None,
        )
        .unwrap_err();
        assert!(e.to_string().contains("access[0].address"), "{e}");
    }

    #[test]
    fn failures_double_the_pause_up_to_the_cap_and_bound_the_waiters() {
        let f = FailedLogins::default();
        let ip = Some("10.0.0.1".parse().unwrap());
        let (b, m) = (Duration::from_millis(100), Duration::from_millis(500));
        let pause = |f: &FailedLogins| f.pause(ip, b, m).unwrap().0;
        assert_eq!(pause(&f), Duration::ZERO, "no failure yet");
        for want in [100, 200, 400, 500, 500] {
            f.failed(ip);
            assert_eq!(pause(&f), Duration::from_millis(want));
        }
        assert_eq!(f.count(ip), 5);
        let other = Some("10.0.0.2".parse().unwrap());
        assert_eq!(f.pause(other, b, m).unwrap().0, Duration::ZERO);
        assert_eq!(f.pause(ip, Duration::ZERO, m).unwrap().0, Duration::ZERO);
        // At most four logins of one address wait at once; a fifth is refused until one ends.
        let held: Vec<_> = (0..MAX_PAUSED_PER_ADDRESS)
            .map(|_| f.pause(ip, b, m).unwrap().1)
            .collect();
        let e = f.pause(ip, b, m).unwrap_err();
        assert_eq!(e.code, SqlState::TOO_MANY_CONNECTIONS);
        drop(held);
        assert!(f.pause(ip, b, m).is_ok());
        // One IPv6 host is one /64.
        let a = Some("2001:db8::1".parse().unwrap());
        let b6 = Some("2001:db8::ffff:1234".parse().unwrap());
        f.failed(a);
        assert_eq!(f.count(b6), 1);
    }
}
