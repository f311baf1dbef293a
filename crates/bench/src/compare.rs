//! `weir bench compare BEFORE.json AFTER.json`: a Markdown verification report.

use std::fmt::Write as _;

use serde_json::Value;

use crate::slo::Gate;

/// One figure of the report: label, where it is in the JSON, and whether lower is better.
const FIGURES: &[(&str, &str, bool)] = &[
    ("throughput (req/s)", "throughput_per_s", false),
    ("latency p50 (ms)", "latency_ms.p50", true),
    ("latency p95 (ms)", "latency_ms.p95", true),
    ("latency p99 (ms)", "latency_ms.p99", true),
    ("latency p99.9 (ms)", "latency_ms.p99_9", true),
    ("latency max (ms)", "latency_ms.max", true),
    ("errors (%)", "errors.percent", true),
    ("connect p95 (ms)", "connect_ms.p95", true),
    ("pool wait p95 (ms)", "pool.wait_p95_ms", true),
    (
        "pool utilisation mean (%)",
        "pool.utilisation_mean_percent",
        true,
    ),
];

fn get(v: &Value, path: &str) -> Option<f64> {
    path.split('.').try_fold(v, |v, k| v.get(k))?.as_f64()
}

/// Which gates a figure's path answers.
fn gate_path(g: &Gate) -> &'static str {
    match g.metric.as_str() {
        "p50" => "latency_ms.p50",
        "p95" => "latency_ms.p95",
        "p99" => "latency_ms.p99",
        "p99.9" => "latency_ms.p99_9",
        "max" => "latency_ms.max",
        "errors" if !g.count => "errors.percent",
        "rps" => "throughput_per_s",
        "connect_p95" => "connect_ms.p95",
        "pool_wait_p95" => "pool.wait_p95_ms",
        _ => "",
    }
}

/// The Markdown report and whether every gate passes on AFTER.
pub fn compare(before: &Value, after: &Value, gates: &[Gate]) -> (String, bool) {
    let mut out = String::new();
    let name = |v: &Value| {
        format!(
            "{} / {} against {}",
            v["scenario"].as_str().unwrap_or("?"),
            v["workload"].as_str().unwrap_or("?"),
            v["target"].as_str().unwrap_or("?")
        )
    };
    let _ = writeln!(out, "# Verification report\n");
    let _ = writeln!(out, "- before: {}", name(before));
    let _ = writeln!(out, "- after: {}\n", name(after));
    let _ = writeln!(out, "| figure | before | after | change | gate on after |");
    let _ = writeln!(out, "|---|---:|---:|---:|---|");
    for (label, path, lower_better) in FIGURES {
        let (b, a) = (get(before, path), get(after, path));
        if b.is_none() && a.is_none() {
            continue;
        }
        let show = |v: Option<f64>| v.map_or("—".into(), |v| format!("{v:.2}"));
        let change = match (b, a) {
            (Some(b), Some(a)) if b != 0.0 => {
                let pct = (a - b) / b * 100.0;
                let better = if *lower_better { pct < 0.0 } else { pct > 0.0 };
                let word = if pct.abs() < 0.5 {
                    "same"
                } else if better {
                    "better"
                } else {
                    "worse"
                };
                format!("{pct:+.1}% ({word})")
            }
            (Some(_), Some(0.0)) => "same".into(),
            _ => "—".into(),
        };
        let verdicts: Vec<String> = gates
            .iter()
            .filter(|g| gate_path(g) == *path)
            .map(|g| {
                let v = g.check(after);
                format!("`{}` {}", g.text, if v.pass { "PASS" } else { "FAIL" })
            })
            .collect();
        let _ = writeln!(
            out,
            "| {label} | {} | {} | {change} | {} |",
            show(b),
            show(a),
            verdicts.join(", ")
        );
    }
    let other: Vec<&Gate> = gates.iter().filter(|g| gate_path(g).is_empty()).collect();
    for g in &other {
        let v = g.check(after);
        let _ = writeln!(
            out,
            "| `{}` | | {} | | {} |",
            g.text,
            v.actual.map_or("—".into(), |a| g.show(a)),
            if v.pass { "PASS" } else { "FAIL" }
        );
    }
    let pass = gates.iter().all(|g| g.check(after).pass);
    if !gates.is_empty() {
        let _ = writeln!(
            out,
            "\n**Verdict: {}** ({} of {} gates pass on after)",
            if pass { "GO" } else { "NO-GO" },
            gates.iter().filter(|g| g.check(after).pass).count(),
            gates.len()
        );
    }
    (out, pass)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn compare_shows_change_and_gates() {
        let before = json!({"scenario": "peak", "workload": "web", "target": "a",
            "throughput_per_s": 100.0, "latency_ms": {"p95": 200.0}, "errors": {"percent": 2.0, "total": 2}});
        let after = json!({"scenario": "peak", "workload": "web", "target": "b",
            "throughput_per_s": 150.0, "latency_ms": {"p95": 100.0}, "errors": {"percent": 0.0, "total": 0}});
        let gates = crate::slo::parse("p95<150ms,errors<1%").unwrap();
        let (md, pass) = compare(&before, &after, &gates);
        assert!(pass, "{md}");
        assert!(
            md.contains("| throughput (req/s) | 100.00 | 150.00 | +50.0% (better) |"),
            "{md}"
        );
        assert!(
            md.contains(
                "| latency p95 (ms) | 200.00 | 100.00 | -50.0% (better) | `p95<150ms` PASS |"
            ),
            "{md}"
        );
        assert!(md.contains("**Verdict: GO**"), "{md}");
        let gates = crate::slo::parse("p95<50ms").unwrap();
        let (md, pass) = compare(&before, &after, &gates);
        assert!(
            !pass && md.contains("`p95<50ms` FAIL") && md.contains("NO-GO"),
            "{md}"
        );
    }
}
