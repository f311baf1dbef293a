//! Service-level gates: `p95<400ms,errors<1%,rps>100`.
//!
//! A gate is `METRIC OP VALUE`, gates separated by commas. Metrics: `p50`, `p90`, `p95`,
//! `p99`, `p99.9`, `max`, `mean` (latency, with a unit: `us`, `ms`, `s`), `errors` (a share
//! with `%`, or a count without), `rps` (requests per second), `pool_wait_p95` (Weir's pool
//! wait p95, when the run sampled Weir's admin listener), `connect_p95`. Operators: `<`, `<=`,
//! `>`, `>=`.

use serde_json::Value;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Op {
    Lt,
    Le,
    Gt,
    Ge,
}

/// One gate.
#[derive(Debug, Clone, PartialEq)]
pub struct Gate {
    /// As written.
    pub text: String,
    pub metric: String,
    pub op: Op,
    /// In the metric's unit: milliseconds, percent, a count, or per second.
    pub value: f64,
    /// `errors` as a count rather than a percentage.
    pub count: bool,
}

/// A gate checked against a report.
#[derive(Debug, Clone, PartialEq)]
pub struct Verdict {
    pub gate: Gate,
    /// None when the report lacks the figure (e.g. pool wait without an admin URL).
    pub actual: Option<f64>,
    pub pass: bool,
}

const LATENCY: &[&str] = &[
    "p50",
    "p90",
    "p95",
    "p99",
    "p99.9",
    "max",
    "mean",
    "pool_wait_p95",
    "connect_p95",
];

/// Parses `p95<400ms,errors<1%`; the error names the gate that is wrong and why.
pub fn parse(spec: &str) -> Result<Vec<Gate>, String> {
    let mut gates = Vec::new();
    for part in spec.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        let at = part
            .find(['<', '>'])
            .ok_or_else(|| format!("`{part}`: expected METRIC<VALUE or METRIC>VALUE"))?;
        let metric = part[..at].trim().to_ascii_lowercase();
        let rest = &part[at..];
        let (op, value) = if let Some(v) = rest.strip_prefix("<=") {
            (Op::Le, v)
        } else if let Some(v) = rest.strip_prefix(">=") {
            (Op::Ge, v)
        } else if let Some(v) = rest.strip_prefix('<') {
            (Op::Lt, v)
        } else {
            (Op::Gt, &rest[1..])
        };
        let value = value.trim();
        let (number, count) = if LATENCY.contains(&metric.as_str()) {
            let (num, unit) = split_unit(value);
            let scale = match unit {
                "us" => 0.001,
                "ms" => 1.0,
                "s" => 1000.0,
                "" => return Err(format!("`{part}`: give a unit: ms, s or us")),
                u => return Err(format!("`{part}`: unknown unit `{u}` (use ms, s or us)")),
            };
            (num.map(|n| n * scale), false)
        } else if metric == "errors" {
            match value.strip_suffix('%') {
                Some(v) => (v.trim().parse::<f64>().ok(), false),
                None => (value.parse::<f64>().ok(), true),
            }
        } else if metric == "rps" || metric == "throughput" {
            (value.trim_end_matches("/s").parse::<f64>().ok(), false)
        } else {
            return Err(format!(
                "`{part}`: unknown metric `{metric}` (use p50, p90, p95, p99, p99.9, max, mean, errors, rps, pool_wait_p95, connect_p95)"
            ));
        };
        let value = number.ok_or_else(|| format!("`{part}`: `{value}` is not a number"))?;
        gates.push(Gate {
            text: part.to_string(),
            metric: if metric == "throughput" {
                "rps".into()
            } else {
                metric
            },
            op,
            value,
            count,
        });
    }
    if gates.is_empty() {
        return Err("no gates: write them like p95<400ms,errors<1%".into());
    }
    Ok(gates)
}

fn split_unit(v: &str) -> (Option<f64>, &str) {
    let end = v
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(v.len());
    (v[..end].parse().ok(), v[end..].trim())
}

impl Gate {
    /// The gate's figure from a report's JSON (see [`crate::Report::json`]).
    pub fn actual(&self, report: &Value) -> Option<f64> {
        let lat = &report["latency_ms"];
        match self.metric.as_str() {
            "p99.9" => lat["p99_9"].as_f64(),
            m @ ("p50" | "p90" | "p95" | "p99" | "max" | "mean") => lat[m].as_f64(),
            "errors" if self.count => report["errors"]["total"].as_f64(),
            "errors" => report["errors"]["percent"].as_f64(),
            "rps" => report["throughput_per_s"].as_f64(),
            "pool_wait_p95" => report["pool"]["wait_p95_ms"].as_f64(),
            "connect_p95" => report["connect_ms"]["p95"].as_f64(),
            _ => None,
        }
    }

    pub fn check(&self, report: &Value) -> Verdict {
        let actual = self.actual(report);
        let pass = actual.is_some_and(|a| match self.op {
            Op::Lt => a < self.value,
            Op::Le => a <= self.value,
            Op::Gt => a > self.value,
            Op::Ge => a >= self.value,
        });
        Verdict {
            gate: self.clone(),
            actual,
            pass,
        }
    }

    /// The figure with its unit.
    pub fn show(&self, v: f64) -> String {
        if LATENCY.contains(&self.metric.as_str()) {
            if v >= 1000.0 {
                format!("{:.2} s", v / 1000.0)
            } else {
                format!("{v:.2} ms")
            }
        } else if self.metric == "errors" && !self.count {
            format!("{v:.2}%")
        } else if self.metric == "rps" {
            format!("{v:.1}/s")
        } else {
            format!("{v}")
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn gates_parse_and_check() {
        let g = parse("p95<400ms, errors<1%,rps>=100,p99.9<=2s,errors<5,max<500us").unwrap();
        assert_eq!(g.len(), 6);
        assert_eq!(g[0].value, 400.0);
        assert_eq!(g[3].value, 2000.0);
        assert!(g[4].count);
        assert_eq!(g[5].value, 0.5);
        let report = json!({
            "latency_ms": {"p95": 399.0, "p99_9": 2000.0, "max": 0.6},
            "errors": {"total": 5, "percent": 0.5},
            "throughput_per_s": 100.0,
        });
        let v: Vec<bool> = g.iter().map(|g| g.check(&report).pass).collect();
        assert_eq!(v, [true, true, true, true, false, false]);
        // A figure the report lacks fails the gate.
        let p = parse("pool_wait_p95<10ms").unwrap();
        let v = p[0].check(&report);
        assert!(!v.pass && v.actual.is_none());
    }

    #[test]
    fn bad_gates_are_named() {
        for (spec, want) in [
            ("p95=400ms", "`p95=400ms`: expected"),
            ("p95<400", "give a unit"),
            ("p95<4h", "unknown unit `h`"),
            ("latency<4ms", "unknown metric `latency`"),
            ("errors<lots", "`lots` is not a number"),
            ("", "no gates"),
        ] {
            let e = parse(spec).unwrap_err();
            assert!(e.contains(want), "{spec}: {e}");
        }
    }
}
