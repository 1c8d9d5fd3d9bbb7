//! When each request is sent: the open-loop arrival schedule.
//!
//! Requests arrive as a Poisson process at `--request-rate R`, or, with
//! `--burstiness B`, as a gamma process with shape `B` and mean inter-arrival
//! time `1/R`, exactly as `vllm bench serve` draws them (`B = 1` is Poisson,
//! `B < 1` burstier, `B > 1` more regular). A rate of `inf` sends every request
//! at time zero. The schedule is computed up front from a seed, so a run is
//! reproducible and the sender never decides timing on the fly.

use std::fmt;
use std::str::FromStr;

use rand::Rng;
use rand_distr::{Distribution, Gamma};

/// A request rate in requests per second, or `inf` (all at once).
#[derive(Clone, Copy, Debug, PartialEq, serde::Serialize)]
pub enum RequestRate {
    /// Requests per second, > 0.
    PerSecond(f64),
    /// Every request at time zero.
    Infinite,
}

impl RequestRate {
    /// The rate as a number, `f64::INFINITY` for `inf`.
    pub fn as_f64(self) -> f64 {
        match self {
            RequestRate::PerSecond(r) => r,
            RequestRate::Infinite => f64::INFINITY,
        }
    }
}

impl FromStr for RequestRate {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let s = s.trim();
        if s.eq_ignore_ascii_case("inf") {
            return Ok(RequestRate::Infinite);
        }
        match s.parse::<f64>() {
            Ok(r) if r.is_infinite() && r > 0.0 => Ok(RequestRate::Infinite),
            Ok(r) if r > 0.0 && r.is_finite() => Ok(RequestRate::PerSecond(r)),
            _ => Err(format!(
                "request rate {s:?} is not a positive number or `inf`"
            )),
        }
    }
}

impl fmt::Display for RequestRate {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            RequestRate::PerSecond(r) => write!(f, "{r}"),
            RequestRate::Infinite => write!(f, "inf"),
        }
    }
}

/// Send times, in seconds from the start of the run, of `n` requests.
///
/// The first request goes at 0; each later one after a gamma-distributed gap
/// of shape `burstiness` and scale `1 / (rate * burstiness)` (mean `1/rate`).
pub fn arrival_offsets(
    n: usize,
    rate: RequestRate,
    burstiness: f64,
    rng: &mut impl Rng,
) -> anyhow::Result<Vec<f64>> {
    anyhow::ensure!(
        burstiness > 0.0 && burstiness.is_finite(),
        "--burstiness must be a positive number, got {burstiness}"
    );
    let RequestRate::PerSecond(rate) = rate else {
        return Ok(vec![0.0; n]);
    };
    let gaps = Gamma::new(burstiness, 1.0 / (rate * burstiness))?;
    let mut t = 0.0;
    let mut offsets = Vec::with_capacity(n);
    for _ in 0..n {
        offsets.push(t);
        t += gaps.sample(rng);
    }
    Ok(offsets)
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;
    use rand::rngs::StdRng;

    #[test]
    fn parses_rates() {
        assert_eq!("inf".parse(), Ok(RequestRate::Infinite));
        assert_eq!("2.5".parse(), Ok(RequestRate::PerSecond(2.5)));
        assert!("0".parse::<RequestRate>().is_err());
        assert!("-1".parse::<RequestRate>().is_err());
        assert!("fast".parse::<RequestRate>().is_err());
    }

    #[test]
    fn infinite_rate_sends_all_at_zero() {
        let mut rng = StdRng::seed_from_u64(0);
        let t = arrival_offsets(5, RequestRate::Infinite, 1.0, &mut rng).unwrap();
        assert_eq!(t, vec![0.0; 5]);
    }

    #[test]
    fn poisson_schedule_has_the_asked_mean_rate_and_is_seeded() {
        let n = 20_000;
        let mut rng = StdRng::seed_from_u64(7);
        let t = arrival_offsets(n, RequestRate::PerSecond(4.0), 1.0, &mut rng).unwrap();
        assert_eq!(t[0], 0.0);
        assert!(t.windows(2).all(|w| w[1] >= w[0]));
        let mean_gap = t[n - 1] / (n - 1) as f64;
        assert!((mean_gap - 0.25).abs() < 0.01, "mean gap {mean_gap}");
        let mut again = StdRng::seed_from_u64(7);
        let u = arrival_offsets(n, RequestRate::PerSecond(4.0), 1.0, &mut again).unwrap();
        assert_eq!(t, u);
    }

    #[test]
    fn burstiness_changes_spread_not_mean() {
        let n = 20_000;
        let cv = |b: f64| {
            let mut rng = StdRng::seed_from_u64(1);
            let t = arrival_offsets(n, RequestRate::PerSecond(10.0), b, &mut rng).unwrap();
            let gaps: Vec<f64> = t.windows(2).map(|w| w[1] - w[0]).collect();
            let mean = gaps.iter().sum::<f64>() / gaps.len() as f64;
            let var = gaps.iter().map(|g| (g - mean).powi(2)).sum::<f64>() / gaps.len() as f64;
            assert!(
                (mean - 0.1).abs() < 0.01,
                "mean gap {mean} at burstiness {b}"
            );
            var.sqrt() / mean
        };
        // Gamma with shape k has coefficient of variation 1/sqrt(k).
        assert!((cv(1.0) - 1.0).abs() < 0.05);
        assert!((cv(4.0) - 0.5).abs() < 0.05);
        assert!(cv(0.25) > 1.7);
    }

    #[test]
    fn rejects_bad_burstiness() {
        let mut rng = StdRng::seed_from_u64(0);
        assert!(arrival_offsets(3, RequestRate::PerSecond(1.0), 0.0, &mut rng).is_err());
    }
}
