//! Service-level objectives for goodput: `--slo ttft=500ms,tpot=50ms,e2e=2s`.
//!
//! A request is "good" when it succeeded and meets every objective given,
//! as in `vllm bench serve --goodput`. A request with one output token has
//! no TPOT; like vLLM, it counts as TPOT 0 for this check.

use std::str::FromStr;

/// Upper bounds, in seconds, a good request must stay within; `None` is unbounded.
#[derive(Clone, Copy, Debug, Default, PartialEq, serde::Serialize)]
pub struct Slo {
    /// Time to first token.
    pub ttft_s: Option<f64>,
    /// Time per output token after the first.
    pub tpot_s: Option<f64>,
    /// End-to-end latency.
    pub e2e_s: Option<f64>,
}

impl Slo {
    /// Whether a request with these latencies (seconds) meets every bound.
    pub fn is_met(&self, ttft_s: f64, tpot_s: f64, e2e_s: f64) -> bool {
        let within = |bound: Option<f64>, v: f64| bound.is_none_or(|b| v <= b);
        within(self.ttft_s, ttft_s) && within(self.tpot_s, tpot_s) && within(self.e2e_s, e2e_s)
    }
}

impl FromStr for Slo {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let mut slo = Slo::default();
        for part in s.split(',').map(str::trim).filter(|p| !p.is_empty()) {
            let (key, value) = part
                .split_once('=')
                .ok_or_else(|| format!("SLO {part:?} is not KEY=DURATION"))?;
            let secs = parse_duration_s(value.trim()).ok_or_else(|| {
                format!("SLO {key}: {value:?} is not a duration like 500ms or 2s")
            })?;
            let slot = match key.trim() {
                "ttft" => &mut slo.ttft_s,
                "tpot" => &mut slo.tpot_s,
                "e2e" | "e2el" => &mut slo.e2e_s,
                other => return Err(format!("unknown SLO {other:?} (use ttft, tpot, e2e)")),
            };
            *slot = Some(secs);
        }
        Ok(slo)
    }
}

/// `500ms`, `2s`, `1.5s`, `250us`; a bare number is milliseconds, as in vLLM.
fn parse_duration_s(v: &str) -> Option<f64> {
    let (num, scale) = if let Some(n) = v.strip_suffix("ms") {
        (n, 1e-3)
    } else if let Some(n) = v.strip_suffix("us") {
        (n, 1e-6)
    } else if let Some(n) = v.strip_suffix('s') {
        (n, 1.0)
    } else {
        (v, 1e-3)
    };
    let x: f64 = num.trim().parse().ok()?;
    (x >= 0.0 && x.is_finite()).then_some(x * scale)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_units() {
        let slo: Slo = "ttft=500ms, tpot=50, e2e=2s".parse().unwrap();
        assert_eq!(slo.ttft_s, Some(0.5));
        assert_eq!(slo.tpot_s, Some(0.05));
        assert_eq!(slo.e2e_s, Some(2.0));
        assert!("ttft=fast".parse::<Slo>().is_err());
        assert!("itl=5ms".parse::<Slo>().is_err());
        assert!("ttft".parse::<Slo>().is_err());
    }

    #[test]
    fn checks_every_given_bound() {
        let slo: Slo = "ttft=100ms,tpot=10ms".parse().unwrap();
        assert!(slo.is_met(0.1, 0.01, 100.0));
        assert!(!slo.is_met(0.11, 0.01, 1.0));
        assert!(!slo.is_met(0.05, 0.02, 1.0));
        assert!(Slo::default().is_met(1e9, 1e9, 1e9));
    }
}
