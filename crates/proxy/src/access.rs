//! Who may try to log in: the `[[access]]` rules (in the spirit of pg_hba.conf), checked
//! after the startup packet and before authentication, and the slowdown of failed logins per
//! client address.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use weir_config::Config;
use weir_wire::{ErrorResponse, SqlState};

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
/// Addresses tracked at most; beyond it the oldest entries are dropped first.
const MAX_TRACKED: usize = 100_000;

/// Recent failed logins per client address, to slow the next answer down: the first failure
/// waits `base`, each further one twice as long, up to `max`.
#[derive(Debug, Default)]
pub struct FailedLogins {
    by_addr: Mutex<HashMap<Option<IpAddr>, (u32, Instant)>>,
}

impl FailedLogins {
    /// Records a failure and returns how long to wait before answering it.
    pub fn failed(&self, ip: Option<IpAddr>, base: Duration, max: Duration) -> Duration {
        if base.is_zero() {
            return Duration::ZERO;
        }
        let now = Instant::now();
        let mut map = self.by_addr.lock().unwrap_or_else(|p| p.into_inner());
        if map.len() >= MAX_TRACKED {
            map.retain(|_, (_, at)| now.duration_since(*at) < FORGET_AFTER);
        }
        let entry = map.entry(ip).or_insert((0, now));
        if now.duration_since(entry.1) >= FORGET_AFTER {
            entry.0 = 0;
        }
        entry.0 = entry.0.saturating_add(1);
        entry.1 = now;
        let doublings = (entry.0 - 1).min(20);
        base.saturating_mul(1 << doublings).min(max)
    }

    /// Failures remembered for an address.
    pub fn count(&self, ip: Option<IpAddr>) -> u32 {
        let map = self.by_addr.lock().unwrap_or_else(|p| p.into_inner());
        map.get(&ip)
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
    fn failures_double_the_delay_up_to_the_cap() {
        let f = FailedLogins::default();
        let ip = Some("10.0.0.1".parse().unwrap());
        let (b, m) = (Duration::from_millis(100), Duration::from_millis(500));
        assert_eq!(f.failed(ip, b, m), Duration::from_millis(100));
        assert_eq!(f.failed(ip, b, m), Duration::from_millis(200));
        assert_eq!(f.failed(ip, b, m), Duration::from_millis(400));
        assert_eq!(f.failed(ip, b, m), Duration::from_millis(500));
        assert_eq!(f.count(ip), 4);
        let other = Some("10.0.0.2".parse().unwrap());
        assert_eq!(f.failed(other, b, m), Duration::from_millis(100));
        assert_eq!(f.failed(ip, Duration::ZERO, m), Duration::ZERO);
    }
}
