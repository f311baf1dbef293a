//! How big a pool should be, from the load it must carry.
//!
//! A pool of `c` server connections serving transactions that arrive at rate λ and hold a
//! connection for a mean time S is modelled as an M/M/c queue (Poisson arrivals,
//! exponential service, `c` servers, first come first served, which is how Weir's pool
//! queues waiters):
//!
//! - offered load a = λ·S (Erlangs); by Little's law it is also the mean number of
//!   connections in use, and a pool of `c <= a` cannot keep up at all;
//! - the probability that a transaction waits is Erlang C, C(c, a), computed from Erlang B
//!   by the stable recurrence B(0) = 1, B(k) = a·B(k-1) / (k + a·B(k-1)), and
//!   C = B / (1 - ρ(1 - B)) with ρ = a / c;
//! - the wait is exponential given that it waits: P(W > t) = C·exp(-(c/S - λ)·t), so the
//!   q-quantile is 0 when C <= 1 - q and ln(C / (1 - q)) / (c/S - λ) otherwise; the mean wait
//!   is C / (c/S - λ).
//!
//! [`advise`] picks the smallest `c` whose wait quantile meets the target and whose
//! utilisation a/c stays under the ceiling, then checks the server's connection budget
//! (instances × c + reserved + other applications <= max_connections). Real service times
//! are not exponential; with less variable ones waits are shorter, so the model errs on the
//! side of a larger pool.

use std::fmt::Write as _;
use std::time::Duration;

use serde_json::{Value, json};

/// Erlang B: the blocking probability of `c` servers offered `a` Erlangs.
pub fn erlang_b(c: u32, a: f64) -> f64 {
    let mut b = 1.0;
    for k in 1..=c {
        b = a * b / (k as f64 + a * b);
    }
    b
}

/// Erlang C: the probability that an arrival waits, with `c` servers and `a` Erlangs.
/// 1 when the queue is unstable (a >= c).
pub fn erlang_c(c: u32, a: f64) -> f64 {
    if a <= 0.0 {
        return 0.0;
    }
    if a >= c as f64 {
        return 1.0;
    }
    let b = erlang_b(c, a);
    let rho = a / c as f64;
    b / (1.0 - rho * (1.0 - b))
}

/// One pool size under a load: what the model expects.
#[derive(Debug, Clone, PartialEq)]
pub struct Expectation {
    pub size: u32,
    /// a / c.
    pub utilisation: f64,
    /// Probability that a transaction waits for a connection.
    pub p_wait: f64,
    /// Mean wait (None: the pool cannot keep up, the queue grows without bound).
    pub mean_wait: Option<Duration>,
    /// The wait at the quantile asked for.
    pub wait_quantile: Option<Duration>,
}

/// The model's figures for a pool of `size` at `rate` per second and `service` per
/// transaction, with the wait at quantile `q` (0.95 for p95).
pub fn expect(size: u32, rate: f64, service: Duration, q: f64) -> Expectation {
    let s = service.as_secs_f64();
    let a = rate * s;
    let c = size as f64;
    let utilisation = if c > 0.0 { a / c } else { f64::INFINITY };
    if size == 0 || a >= c {
        return Expectation {
            size,
            utilisation,
            p_wait: 1.0,
            mean_wait: None,
            wait_quantile: None,
        };
    }
    let pc = erlang_c(size, a);
    let drain = c / s - rate; // rate at which the queue empties, per second
    let mean = pc / drain;
    let tail = 1.0 - q;
    let quantile = if pc <= tail {
        0.0
    } else {
        (pc / tail).ln() / drain
    };
    Expectation {
        size,
        utilisation,
        p_wait: pc,
        mean_wait: Some(Duration::from_secs_f64(mean)),
        wait_quantile: Some(Duration::from_secs_f64(quantile)),
    }
}

/// The server side of the budget.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Budget {
    pub max_connections: u32,
    /// Connections the server keeps for superusers and the like.
    pub reserved: u32,
    /// Connections other applications hold.
    pub others: u32,
    /// Copies of Weir (or of the application) each holding a pool this size.
    pub instances: u32,
}

/// What [`advise`] is given.
#[derive(Debug, Clone, PartialEq)]
pub struct Inputs {
    /// Transactions per second.
    pub rate: f64,
    /// Mean time a transaction holds a server connection.
    pub service_time: Duration,
    /// The wait (for a connection) that `quantile` of transactions must not exceed.
    pub target_wait: Duration,
    /// 0.95 for p95.
    pub quantile: f64,
    /// Highest acceptable a / c (0.85 leaves room for bursts the model does not see).
    pub max_utilisation: f64,
    pub budget: Option<Budget>,
}

/// The recommendation and how it was reached.
#[derive(Debug, Clone)]
pub struct Advice {
    pub inputs: Inputs,
    /// λ·S, also the mean number of connections in use (Little's law).
    pub offered_load: f64,
    pub recommended: u32,
    /// Which constraint set the size: "wait target" or "utilisation ceiling".
    pub bound_by: &'static str,
    /// At 25% less, the recommended size, 25% more.
    pub around: Vec<Expectation>,
    /// (instances × size + reserved + others, max_connections).
    pub budget_use: Option<(u32, u32)>,
    pub warnings: Vec<String>,
}

const LARGEST: u32 = 100_000;

/// Recommends a pool size; see the module documentation for the model.
pub fn advise(inputs: Inputs) -> Result<Advice, String> {
    if !(inputs.rate.is_finite() && inputs.rate > 0.0) {
        return Err("the arrival rate must be above zero".into());
    }
    if inputs.service_time.is_zero() {
        return Err("the service time must be above zero".into());
    }
    if !(inputs.quantile > 0.0 && inputs.quantile < 1.0) {
        return Err("the quantile must be between 0 and 1 (0.95 for p95)".into());
    }
    if !(inputs.max_utilisation > 0.0 && inputs.max_utilisation <= 1.0) {
        return Err("the utilisation ceiling must be in (0, 1]".into());
    }
    let a = inputs.rate * inputs.service_time.as_secs_f64();
    let mut c = (a.floor() as u32).saturating_add(1).max(1);
    let by_utilisation = (a / inputs.max_utilisation).ceil() as u32;
    loop {
        if c > LARGEST {
            return Err(format!(
                "no pool up to {LARGEST} connections meets the target: the load is {a:.0} Erlangs"
            ));
        }
        let e = expect(c, inputs.rate, inputs.service_time, inputs.quantile);
        let wait_ok = e.wait_quantile.is_some_and(|w| w <= inputs.target_wait);
        if wait_ok && e.utilisation <= inputs.max_utilisation {
            break;
        }
        c += 1;
    }
    let bound_by = if c <= by_utilisation && by_utilisation > 0 {
        "utilisation ceiling"
    } else {
        "wait target"
    };
    let less = ((c as f64) * 0.75).round().max(1.0) as u32;
    let more = ((c as f64) * 1.25).round() as u32;
    let mut around = vec![];
    for size in [less, c, more] {
        if around.last().is_none_or(|e: &Expectation| e.size != size) {
            around.push(expect(
                size,
                inputs.rate,
                inputs.service_time,
                inputs.quantile,
            ));
        }
    }
    let mut warnings = Vec::new();
    let budget_use = inputs.budget.map(|b| {
        let need = b.instances * c + b.reserved + b.others;
        if need > b.max_connections {
            let room = b.max_connections.saturating_sub(b.reserved + b.others);
            warnings.push(format!(
                "{} instances x {c} + {} reserved + {} held by others = {need} > max_connections {}: \
                 the server can give each instance at most {}; raise max_connections, run fewer instances, or shorten transactions",
                b.instances,
                b.reserved,
                b.others,
                b.max_connections,
                room / b.instances.max(1)
            ));
        }
        (need, b.max_connections)
    });
    if c > 100 {
        warnings.push(format!(
            "{c} connections in one pool: PostgreSQL slows down with many active backends; \
             shorter transactions or more servers may serve better"
        ));
    }
    Ok(Advice {
        inputs,
        offered_load: a,
        recommended: c,
        bound_by,
        around,
        budget_use,
        warnings,
    })
}

fn ms(d: Option<Duration>) -> String {
    d.map_or("unbounded".into(), |d| {
        format!("{:.1} ms", d.as_secs_f64() * 1e3)
    })
}

fn ms_json(d: Option<Duration>) -> Value {
    d.map_or(Value::Null, |d| {
        json!((d.as_secs_f64() * 1e6).round() / 1e3)
    })
}

impl Advice {
    /// The recommendation with its working, for people.
    pub fn text(&self) -> String {
        let i = &self.inputs;
        let pct = (i.quantile * 100.0).round();
        let mut out = String::new();
        let _ = writeln!(out, "Load");
        let _ = writeln!(out, "  arrival rate       {:.1} transactions/s", i.rate);
        let _ = writeln!(
            out,
            "  service time       {:.1} ms (mean time a transaction holds a server connection)",
            i.service_time.as_secs_f64() * 1e3
        );
        let _ = writeln!(
            out,
            "  offered load       {:.2} Erlangs = {:.1}/s x {:.3} s; by Little's law, {:.1} connections busy on average",
            self.offered_load,
            i.rate,
            i.service_time.as_secs_f64(),
            self.offered_load
        );
        let _ = writeln!(out, "Target");
        let _ = writeln!(
            out,
            "  p{pct} wait for a connection <= {}, utilisation <= {:.0}%",
            ms(Some(i.target_wait)),
            i.max_utilisation * 100.0
        );
        let _ = writeln!(
            out,
            "Model: M/M/c (Erlang C); P(wait > t) = C(c, a) * exp(-(c/S - rate) * t)"
        );
        let _ = writeln!(
            out,
            "  {:>6}  {:>11}  {:>8}  {:>11}  {:>11}",
            "size",
            "utilisation",
            "P(wait)",
            "mean wait",
            format!("p{pct} wait")
        );
        for e in &self.around {
            let mark = if e.size == self.recommended {
                "  <- recommended"
            } else {
                ""
            };
            let _ = writeln!(
                out,
                "  {:>6}  {:>10.1}%  {:>8.4}  {:>11}  {:>11}{mark}",
                e.size,
                e.utilisation * 100.0,
                e.p_wait,
                ms(e.mean_wait),
                ms(e.wait_quantile)
            );
        }
        let _ = writeln!(
            out,
            "Recommendation: pool size {} (set by the {})",
            self.recommended, self.bound_by
        );
        if let (Some(b), Some((need, max))) = (&i.budget, self.budget_use) {
            let _ = writeln!(
                out,
                "Server budget: {} instances x {} + {} reserved + {} others = {need} of max_connections {max}{}",
                b.instances,
                self.recommended,
                b.reserved,
                b.others,
                if need <= max {
                    ": fits"
                } else {
                    ": DOES NOT FIT"
                }
            );
        }
        for w in &self.warnings {
            let _ = writeln!(out, "warning: {w}");
        }
        out
    }

    /// The same as JSON (schema in docs/BENCH.md).
    pub fn json(&self) -> Value {
        let i = &self.inputs;
        json!({
            "inputs": {
                "rate_per_s": i.rate,
                "service_time_ms": i.service_time.as_secs_f64() * 1e3,
                "target_wait_ms": i.target_wait.as_secs_f64() * 1e3,
                "quantile": i.quantile,
                "max_utilisation": i.max_utilisation,
                "budget": i.budget.map(|b| json!({
                    "max_connections": b.max_connections,
                    "reserved": b.reserved,
                    "others": b.others,
                    "instances": b.instances,
                })),
            },
            "offered_load_erlangs": self.offered_load,
            "mean_busy_connections": self.offered_load,
            "recommended": self.recommended,
            "bound_by": self.bound_by,
            "sizes": self.around.iter().map(|e| json!({
                "size": e.size,
                "utilisation": e.utilisation,
                "p_wait": e.p_wait,
                "mean_wait_ms": ms_json(e.mean_wait),
                "wait_quantile_ms": ms_json(e.wait_quantile),
            })).collect::<Vec<_>>(),
            "budget": self.budget_use.map(|(need, max)| json!({"needed": need, "max_connections": max, "fits": need <= max})),
            "warnings": self.warnings,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn close(a: f64, b: f64, tol: f64) -> bool {
        (a - b).abs() <= tol
    }

    #[test]
    fn erlang_b_matches_published_tables() {
        // Erlang B tables (e.g. the ITU-T/teletraffic tables): 10 circuits at 5 Erlangs block
        // 1.84%; 5 circuits at 2 Erlangs, 3.67%; 1 circuit at 1 Erlang, 50%.
        assert!(close(erlang_b(10, 5.0), 0.0184, 0.0001));
        assert!(close(erlang_b(5, 2.0), 0.0367, 0.0001));
        assert!(close(erlang_b(1, 1.0), 0.5, 1e-12));
    }

    #[test]
    fn erlang_c_matches_published_tables() {
        // Call-centre Erlang C tables: 10 agents at 8 Erlangs wait with probability 0.4092;
        // 2 agents at 1 Erlang, exactly 1/3.
        assert!(close(erlang_c(10, 8.0), 0.4092, 0.0001));
        assert!(close(erlang_c(2, 1.0), 1.0 / 3.0, 1e-12));
        // One server: C = rho (M/M/1).
        assert!(close(erlang_c(1, 0.7), 0.7, 1e-12));
        assert_eq!(erlang_c(5, 5.0), 1.0);
        assert_eq!(erlang_c(5, 0.0), 0.0);
    }

    #[test]
    fn mm1_wait_quantile_is_the_closed_form() {
        // M/M/1, rate 7/s, service 100 ms: P(W > t) = 0.7 e^{-3t}; p95 = ln(0.7/0.05)/3 s.
        let e = expect(1, 7.0, Duration::from_millis(100), 0.95);
        let want = (0.7f64 / 0.05).ln() / 3.0;
        assert!(close(e.wait_quantile.unwrap().as_secs_f64(), want, 1e-6));
        // Mean wait rho/(mu - lambda) = 0.7/3 s.
        assert!(close(e.mean_wait.unwrap().as_secs_f64(), 0.7 / 3.0, 1e-6));
    }

    #[test]
    fn advise_picks_the_smallest_size_meeting_the_target() {
        // The seeds' example: 500 requests/s of 40 ms is 20 Erlangs.
        let a = advise(Inputs {
            rate: 500.0,
            service_time: Duration::from_millis(40),
            target_wait: Duration::from_millis(10),
            quantile: 0.95,
            max_utilisation: 0.85,
            budget: Some(Budget {
                max_connections: 100,
                reserved: 3,
                others: 10,
                instances: 3,
            }),
        })
        .unwrap();
        assert!(close(a.offered_load, 20.0, 1e-9));
        let c = a.recommended;
        let at = |n| expect(n, 500.0, Duration::from_millis(40), 0.95);
        assert!(at(c).wait_quantile.unwrap() <= Duration::from_millis(10));
        assert!(at(c).utilisation <= 0.85);
        let below = at(c - 1);
        assert!(
            below.utilisation > 0.85
                || below
                    .wait_quantile
                    .is_none_or(|w| w > Duration::from_millis(10))
        );
        // 3 x 24 + 13 = 85 fits in 100.
        assert_eq!(a.budget_use, Some((3 * c + 13, 100)));
        assert!(a.text().contains("<- recommended"));
        assert_eq!(a.json()["recommended"], c);
        // Half the pool cannot keep up at all.
        assert!(at(c / 2).wait_quantile.is_none());
    }

    #[test]
    fn advise_rejects_nonsense() {
        let base = Inputs {
            rate: 10.0,
            service_time: Duration::from_millis(10),
            target_wait: Duration::from_millis(1),
            quantile: 0.95,
            max_utilisation: 0.8,
            budget: None,
        };
        assert!(
            advise(Inputs {
                rate: 0.0,
                ..base.clone()
            })
            .is_err()
        );
        assert!(
            advise(Inputs {
                service_time: Duration::ZERO,
                ..base.clone()
            })
            .is_err()
        );
        assert!(
            advise(Inputs {
                quantile: 1.0,
                ..base
            })
            .is_err()
        );
    }
}
