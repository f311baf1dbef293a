//! Scenarios: a load that changes over phases, from a TOML file or a shipped preset.
//!
//! ```toml
//! name = "peak"
//! workload = "web"            # optional: select-only, web, sleep, tpcb, custom
//! server_time = "40ms"        # optional: for web and sleep
//! [[phase]]
//! kind = "ramp"               # ramp | steady | spike | soak
//! duration = "10s"
//! clients = 500               # closed loop: concurrent clients at the end of the phase
//! [[phase]]
//! kind = "steady"
//! duration = "60s"
//! clients = 500
//! ```
//!
//! A phase sets either `clients` (closed loop: that many clients, each sending its next
//! request when the last one is answered) or `rate` (open loop: requests per second, started
//! on schedule whether or not earlier ones have finished); every phase of a scenario uses
//! the same one. `ramp` moves linearly from the previous phase's level (0 for the first) to
//! its own; `steady`, `spike` and `soak` hold their level for the whole phase (`spike` says
//! it is a jump, `soak` that it is long; both are bookkeeping for the report).

use std::time::Duration;

use serde::Deserialize;

/// How a phase changes the load.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum PhaseKind {
    Ramp,
    Steady,
    Spike,
    Soak,
}

/// One phase: a kind, a duration, and a level.
#[derive(Debug, Clone, PartialEq)]
pub struct Phase {
    pub kind: PhaseKind,
    pub duration: Duration,
    /// Clients (closed loop) or requests per second (open loop) at the end of the phase.
    pub level: f64,
}

/// Closed loop (N clients) or open loop (a target arrival rate).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Loop {
    Closed,
    Open,
}

/// A load over time.
#[derive(Debug, Clone, PartialEq)]
pub struct Scenario {
    pub name: String,
    pub mode: Loop,
    pub phases: Vec<Phase>,
    pub workload: Option<String>,
    pub server_time: Option<Duration>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawScenario {
    name: Option<String>,
    workload: Option<String>,
    #[serde(default, with = "humantime_serde")]
    server_time: Option<Duration>,
    #[serde(default)]
    phase: Vec<RawPhase>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawPhase {
    kind: PhaseKind,
    #[serde(with = "humantime_serde")]
    duration: Duration,
    clients: Option<u32>,
    rate: Option<f64>,
}

/// The seeds' four load tests.
pub const PRESETS: &[(&str, &str)] = &[
    (
        "baseline",
        "name = \"baseline\"\nworkload = \"web\"\n\
         [[phase]]\nkind = \"ramp\"\nduration = \"10s\"\nclients = 100\n\
         [[phase]]\nkind = \"steady\"\nduration = \"60s\"\nclients = 100\n",
    ),
    (
        "peak",
        "name = \"peak\"\nworkload = \"web\"\n\
         [[phase]]\nkind = \"ramp\"\nduration = \"15s\"\nclients = 500\n\
         [[phase]]\nkind = \"steady\"\nduration = \"60s\"\nclients = 500\n",
    ),
    (
        "spike",
        "name = \"spike\"\nworkload = \"web\"\n\
         [[phase]]\nkind = \"steady\"\nduration = \"10s\"\nclients = 10\n\
         [[phase]]\nkind = \"spike\"\nduration = \"30s\"\nclients = 300\n\
         [[phase]]\nkind = \"steady\"\nduration = \"20s\"\nclients = 10\n",
    ),
    (
        "endurance",
        "name = \"endurance\"\nworkload = \"web\"\n\
         [[phase]]\nkind = \"ramp\"\nduration = \"30s\"\nclients = 100\n\
         [[phase]]\nkind = \"soak\"\nduration = \"30m\"\nclients = 100\n",
    ),
];

impl Scenario {
    /// A shipped preset by name.
    pub fn preset(name: &str) -> Option<Scenario> {
        PRESETS
            .iter()
            .find(|(n, _)| *n == name)
            .map(|(_, text)| Scenario::parse(text).expect("presets parse"))
    }

    /// A preset by name, else a scenario file at that path.
    pub fn preset_or_file(name_or_path: &str) -> Result<Scenario, String> {
        if let Some(p) = Scenario::preset(name_or_path) {
            return Ok(p);
        }
        let text = std::fs::read_to_string(name_or_path).map_err(|e| {
            format!(
                "`{name_or_path}` is neither a preset (baseline, peak, spike, endurance) nor a readable file: {e}"
            )
        })?;
        Scenario::parse(&text).map_err(|e| format!("{name_or_path}: {e}"))
    }

    /// One phase: `clients` or `rate` held for `duration`.
    pub fn single(mode: Loop, level: f64, duration: Duration) -> Scenario {
        Scenario {
            name: "steady".into(),
            mode,
            phases: vec![Phase {
                kind: PhaseKind::Steady,
                duration,
                level,
            }],
            workload: None,
            server_time: None,
        }
    }

    /// Parses a scenario file; every problem is named with its phase.
    pub fn parse(text: &str) -> Result<Scenario, String> {
        let raw: RawScenario = toml::from_str(text).map_err(|e| {
            let msg = e.message().to_string();
            match e.span() {
                Some(span) => {
                    let line = text[..span.start].lines().count().max(1);
                    format!("line {line}: {msg}")
                }
                None => msg,
            }
        })?;
        if raw.phase.is_empty() {
            return Err(
                "no phases: add at least one [[phase]] with kind, duration and clients (or rate)"
                    .into(),
            );
        }
        let mut problems = Vec::new();
        let mut mode = None;
        let mut phases = Vec::new();
        for (i, p) in raw.phase.iter().enumerate() {
            let n = i + 1;
            let (m, level) = match (p.clients, p.rate) {
                (Some(c), None) => (Loop::Closed, c as f64),
                (None, Some(r)) if r.is_finite() && r >= 0.0 => (Loop::Open, r),
                (None, Some(r)) => {
                    problems.push(format!("phase {n}: rate {r} is not a rate"));
                    continue;
                }
                (Some(_), Some(_)) => {
                    problems.push(format!(
                        "phase {n}: set clients (closed loop) or rate (open loop), not both"
                    ));
                    continue;
                }
                (None, None) => {
                    problems.push(format!(
                        "phase {n}: set clients (closed loop) or rate (open loop)"
                    ));
                    continue;
                }
            };
            match mode {
                None => mode = Some(m),
                Some(prev) if prev != m => problems.push(format!(
                    "phase {n}: mixes clients and rate; every phase of a scenario uses the same one"
                )),
                _ => {}
            }
            if p.duration.is_zero() {
                problems.push(format!("phase {n}: duration must be above zero"));
            }
            phases.push(Phase {
                kind: p.kind,
                duration: p.duration,
                level,
            });
        }
        if !problems.is_empty() {
            return Err(problems.join("\n"));
        }
        if phases.iter().all(|p| p.level == 0.0) {
            return Err("every phase has no load (clients or rate 0)".into());
        }
        Ok(Scenario {
            name: raw.name.unwrap_or_else(|| "custom".into()),
            mode: mode.expect("at least one phase"),
            phases,
            workload: raw.workload,
            server_time: raw.server_time,
        })
    }

    pub fn duration(&self) -> Duration {
        self.phases.iter().map(|p| p.duration).sum()
    }

    /// The highest level of any phase (the clients or connections to have ready).
    pub fn peak(&self) -> f64 {
        self.phases.iter().map(|p| p.level).fold(0.0, f64::max)
    }

    /// The level at `t` since the start (0 after the end).
    pub fn level_at(&self, t: Duration) -> f64 {
        let mut start = Duration::ZERO;
        let mut prev = 0.0;
        for p in &self.phases {
            let end = start + p.duration;
            if t < end {
                return match p.kind {
                    PhaseKind::Ramp => {
                        let f = (t - start).as_secs_f64() / p.duration.as_secs_f64();
                        prev + (p.level - prev) * f
                    }
                    _ => p.level,
                };
            }
            prev = p.level;
            start = end;
        }
        0.0
    }

    /// The same shape with every phase scaled so the whole takes `total`.
    pub fn scaled_to(&self, total: Duration) -> Scenario {
        let f = total.as_secs_f64() / self.duration().as_secs_f64().max(1e-9);
        let mut s = self.clone();
        for p in &mut s.phases {
            p.duration = p.duration.mul_f64(f);
        }
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn presets_parse_and_have_the_seeds_shapes() {
        let peak = Scenario::preset("peak").unwrap();
        assert_eq!(peak.mode, Loop::Closed);
        assert_eq!(peak.peak(), 500.0);
        assert_eq!(peak.level_at(Duration::from_millis(7500)), 250.0);
        assert_eq!(peak.level_at(Duration::from_secs(30)), 500.0);
        assert_eq!(peak.level_at(Duration::from_secs(80)), 0.0);
        let spike = Scenario::preset("spike").unwrap();
        assert_eq!(spike.level_at(Duration::from_secs(5)), 10.0);
        assert_eq!(spike.level_at(Duration::from_secs(10)), 300.0);
        assert_eq!(
            Scenario::preset("endurance").unwrap().duration(),
            Duration::from_secs(1830)
        );
        assert_eq!(Scenario::preset("baseline").unwrap().peak(), 100.0);
        let scaled = peak.scaled_to(Duration::from_secs(15));
        assert!((scaled.duration().as_secs_f64() - 15.0).abs() < 1e-6);
    }

    #[test]
    fn open_loop_phases() {
        let s = Scenario::parse(
            "[[phase]]\nkind = \"ramp\"\nduration = \"10s\"\nrate = 100\n\
             [[phase]]\nkind = \"steady\"\nduration = \"5s\"\nrate = 100.5\n",
        )
        .unwrap();
        assert_eq!(s.mode, Loop::Open);
        assert_eq!(s.level_at(Duration::from_secs(5)), 50.0);
        assert_eq!(s.level_at(Duration::from_secs(12)), 100.5);
    }

    #[test]
    fn bad_scenarios_get_clear_errors() {
        for (text, want) in [
            ("name = \"x\"\n", "no phases"),
            (
                "[[phase]]\nkind = \"plateau\"\nduration = \"1s\"\nclients = 1\n",
                "line 2: unknown variant `plateau`, expected one of `ramp`, `steady`, `spike`, `soak`",
            ),
            (
                "[[phase]]\nkind = \"steady\"\nclients = 1\n",
                "missing field `duration`",
            ),
            (
                "[[phase]]\nkind = \"steady\"\nduration = \"1s\"\n",
                "phase 1: set clients (closed loop) or rate (open loop)",
            ),
            (
                "[[phase]]\nkind = \"steady\"\nduration = \"1s\"\nclients = 1\n\
                 [[phase]]\nkind = \"steady\"\nduration = \"1s\"\nrate = 5\n",
                "phase 2: mixes clients and rate",
            ),
            (
                "[[phase]]\nkind = \"steady\"\nduration = \"1s\"\nclients = 1\nrate = 1\n",
                "not both",
            ),
            (
                "[[phase]]\nkind = \"steady\"\nduration = \"soon\"\nclients = 1\n",
                "line 3",
            ),
            (
                "[[phase]]\nkind = \"steady\"\nduration = \"1s\"\nclient = 1\n",
                "unknown field `client`",
            ),
            (
                "[[phase]]\nkind = \"steady\"\nduration = \"1s\"\nclients = 0\n",
                "no load",
            ),
        ] {
            let e = Scenario::parse(text).unwrap_err();
            assert!(e.contains(want), "{text:?}: got {e}");
        }
    }
}
