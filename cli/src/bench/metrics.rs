//! The benchmark's numbers, with `vllm bench serve`'s definitions.
//!
//! Pure functions over per-request records: no clock, no I/O.
//!
//! - Only successful requests count toward latencies and token totals.
//! - TPOT of a request is `(e2e - ttft) / (output_tokens - 1)`, defined only
//!   when it produced more than one token; the statistics are over requests.
//! - ITL is every gap between consecutive streamed chunks, pooled over all
//!   successful requests.
//! - Throughputs divide by the benchmark duration (first send to last finish).
//! - The prefix-cache hit rate is `Σ cached ÷ Σ prompt tokens` over
//!   successful requests (0 when the server reports no cached tokens).
//! - Multi-turn runs also split TTFT into first turns (nothing of the
//!   conversation cached but the system prompt) and later turns.
//! - Percentiles interpolate linearly between order statistics, as
//!   `numpy.percentile` does.

use serde::Serialize;

use super::record::RequestRecord;
use super::slo::Slo;

/// Mean, median, p90, p99 and standard deviation, in milliseconds.
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize)]
pub struct LatencyStats {
    pub mean_ms: f64,
    pub median_ms: f64,
    pub p90_ms: f64,
    pub p99_ms: f64,
    pub std_ms: f64,
}

impl LatencyStats {
    /// Statistics of `samples_s` (seconds); all zero when empty, as vLLM reports.
    pub fn of_seconds(samples_s: &[f64]) -> Self {
        if samples_s.is_empty() {
            return Self::default();
        }
        let mut ms: Vec<f64> = samples_s.iter().map(|s| s * 1e3).collect();
        ms.sort_by(f64::total_cmp);
        let n = ms.len() as f64;
        let mean = ms.iter().sum::<f64>() / n;
        let var = ms.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / n;
        LatencyStats {
            mean_ms: mean,
            median_ms: percentile_sorted(&ms, 50.0),
            p90_ms: percentile_sorted(&ms, 90.0),
            p99_ms: percentile_sorted(&ms, 99.0),
            std_ms: var.sqrt(),
        }
    }
}

/// The `p`th percentile (0..=100) of ascending `sorted`, linearly interpolated.
pub fn percentile_sorted(sorted: &[f64], p: f64) -> f64 {
    match sorted.len() {
        0 => f64::NAN,
        1 => sorted[0],
        n => {
            let rank = (p.clamp(0.0, 100.0) / 100.0) * (n - 1) as f64;
            let lo = rank.floor() as usize;
            let hi = rank.ceil() as usize;
            sorted[lo] + (sorted[hi] - sorted[lo]) * (rank - lo as f64)
        }
    }
}

/// Time per output token after the first, or `None` with fewer than two tokens.
pub fn tpot_s(e2e_s: f64, ttft_s: f64, output_tokens: u64) -> Option<f64> {
    (output_tokens > 1).then(|| (e2e_s - ttft_s) / (output_tokens - 1) as f64)
}

/// The summary `vllm bench serve` prints for one run.
#[derive(Clone, Debug, Default, Serialize)]
pub struct Metrics {
    pub successful_requests: usize,
    pub failed_requests: usize,
    pub duration_s: f64,
    pub total_input_tokens: u64,
    pub total_output_tokens: u64,
    /// Prompt tokens served from a prefix cache.
    pub total_cached_tokens: u64,
    /// `total_cached_tokens / total_input_tokens`, in [0, 1].
    pub prefix_cache_hit_rate: f64,
    pub request_throughput: f64,
    /// Requests per second meeting every SLO; `None` when no SLO was given.
    pub request_goodput: Option<f64>,
    pub output_throughput: f64,
    pub total_token_throughput: f64,
    pub ttft: LatencyStats,
    pub tpot: LatencyStats,
    pub itl: LatencyStats,
    pub e2el: LatencyStats,
    /// Multi-turn only: TTFT of every session's first turn.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub first_turn_ttft: Option<LatencyStats>,
    /// Multi-turn only: TTFT of every turn after the first.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub later_turn_ttft: Option<LatencyStats>,
    /// The median of each phase of the time to first token (gRPC runs).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub ttft_spans: Vec<super::spans::SpanMedian>,
}

/// Summarizes a run of `duration_s` seconds; goodput only when `slo` is given.
pub fn summarize(records: &[RequestRecord], duration_s: f64, slo: Option<&Slo>) -> Metrics {
    let ok: Vec<&RequestRecord> = records.iter().filter(|r| r.success).collect();
    let ttfts: Vec<f64> = ok.iter().map(|r| r.ttft_s).collect();
    let e2els: Vec<f64> = ok.iter().map(|r| r.e2e_s).collect();
    let tpots: Vec<f64> = ok
        .iter()
        .filter_map(|r| tpot_s(r.e2e_s, r.ttft_s, r.output_tokens))
        .collect();
    let itls: Vec<f64> = ok.iter().flat_map(|r| r.itl_s.iter().copied()).collect();
    let input: u64 = ok.iter().map(|r| r.input_tokens).sum();
    let output: u64 = ok.iter().map(|r| r.output_tokens).sum();
    let cached: u64 = ok.iter().map(|r| r.cached_tokens).sum();
    let multi_turn = records.iter().any(|r| r.turn.is_some());
    let turn_ttft = |first: bool| {
        multi_turn.then(|| {
            let t: Vec<f64> = ok
                .iter()
                .filter(|r| (r.turn == Some(0)) == first)
                .map(|r| r.ttft_s)
                .collect();
            LatencyStats::of_seconds(&t)
        })
    };
    let per_s = |x: f64| {
        if duration_s > 0.0 {
            x / duration_s
        } else {
            0.0
        }
    };
    let good = slo.map(|slo| {
        let n = ok
            .iter()
            .filter(|r| {
                let tpot = tpot_s(r.e2e_s, r.ttft_s, r.output_tokens).unwrap_or(0.0);
                slo.is_met(r.ttft_s, tpot, r.e2e_s)
            })
            .count();
        per_s(n as f64)
    });
    Metrics {
        successful_requests: ok.len(),
        failed_requests: records.len() - ok.len(),
        duration_s,
        total_input_tokens: input,
        total_output_tokens: output,
        total_cached_tokens: cached,
        prefix_cache_hit_rate: if input > 0 {
            cached as f64 / input as f64
        } else {
            0.0
        },
        request_throughput: per_s(ok.len() as f64),
        request_goodput: good,
        output_throughput: per_s(output as f64),
        total_token_throughput: per_s((input + output) as f64),
        ttft: LatencyStats::of_seconds(&ttfts),
        tpot: LatencyStats::of_seconds(&tpots),
        itl: LatencyStats::of_seconds(&itls),
        e2el: LatencyStats::of_seconds(&e2els),
        first_turn_ttft: turn_ttft(true),
        later_turn_ttft: turn_ttft(false),
        ttft_spans: super::spans::medians(records),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn close(a: f64, b: f64) -> bool {
        (a - b).abs() < 1e-9
    }

    fn record(ttft: f64, e2e: f64, tokens: u64, itl: Vec<f64>, success: bool) -> RequestRecord {
        RequestRecord {
            success,
            input_tokens: 10,
            output_tokens: tokens,
            ttft_s: ttft,
            e2e_s: e2e,
            itl_s: itl,
            ..Default::default()
        }
    }

    #[test]
    fn percentiles_match_numpy_linear() {
        let v = [1.0, 2.0, 3.0, 4.0];
        // numpy.percentile([1,2,3,4], [0, 50, 90, 99, 100])
        assert!(close(percentile_sorted(&v, 0.0), 1.0));
        assert!(close(percentile_sorted(&v, 50.0), 2.5));
        assert!(close(percentile_sorted(&v, 90.0), 3.7));
        assert!(close(percentile_sorted(&v, 99.0), 3.97));
        assert!(close(percentile_sorted(&v, 100.0), 4.0));
        assert!(close(percentile_sorted(&[5.0], 99.0), 5.0));
        assert!(percentile_sorted(&[], 50.0).is_nan());
    }

    #[test]
    fn stats_are_in_ms_and_zero_when_empty() {
        let s = LatencyStats::of_seconds(&[0.003, 0.001, 0.002]);
        assert!(close(s.mean_ms, 2.0));
        assert!(close(s.median_ms, 2.0));
        assert!(close(s.std_ms, (2.0f64 / 3.0).sqrt()));
        assert_eq!(LatencyStats::of_seconds(&[]), LatencyStats::default());
    }

    #[test]
    fn tpot_excludes_the_first_token() {
        assert!(close(tpot_s(1.0, 0.1, 10).unwrap(), 0.1));
        assert_eq!(tpot_s(1.0, 0.1, 1), None);
        assert_eq!(tpot_s(1.0, 0.1, 0), None);
    }

    #[test]
    fn summary_counts_only_successes() {
        let records = vec![
            record(0.1, 1.1, 11, vec![0.1; 10], true),
            record(0.3, 0.3, 1, vec![], true),
            record(0.0, 0.0, 0, vec![], false),
        ];
        let m = summarize(&records, 2.0, None);
        assert_eq!(m.successful_requests, 2);
        assert_eq!(m.failed_requests, 1);
        assert_eq!(m.total_input_tokens, 20);
        assert_eq!(m.total_output_tokens, 12);
        assert!(close(m.request_throughput, 1.0));
        assert!(close(m.output_throughput, 6.0));
        assert!(close(m.total_token_throughput, 16.0));
        assert!(close(m.ttft.mean_ms, 200.0));
        // Only the first request has a TPOT.
        assert!(close(m.tpot.mean_ms, 100.0));
        assert!(close(m.itl.median_ms, 100.0));
        assert_eq!(m.request_goodput, None);
        assert_eq!(m.first_turn_ttft, None);
    }

    #[test]
    fn hit_rate_and_ttft_by_turn() {
        let turn = |t: usize, ttft: f64, cached: u64, success: bool| RequestRecord {
            turn: Some(t),
            session: Some(0),
            cached_tokens: cached,
            ..record(ttft, 1.0, 2, vec![], success)
        };
        let records = vec![
            turn(0, 0.4, 0, true),
            turn(1, 0.1, 5, true),
            turn(2, 0.2, 8, true),
            turn(3, 0.0, 10, false),
        ];
        let m = summarize(&records, 1.0, None);
        assert_eq!(m.total_cached_tokens, 13);
        assert!(close(m.prefix_cache_hit_rate, 13.0 / 30.0));
        assert!(close(m.first_turn_ttft.unwrap().mean_ms, 400.0));
        assert!(close(m.later_turn_ttft.unwrap().mean_ms, 150.0));
        assert_eq!(summarize(&[], 1.0, None).prefix_cache_hit_rate, 0.0);
    }

    #[test]
    fn goodput_counts_requests_meeting_every_slo() {
        let records = vec![
            record(0.1, 1.1, 11, vec![0.1; 10], true), // ttft 100ms, tpot 100ms
            record(0.3, 0.3, 1, vec![], true),         // ttft 300ms, tpot counts as 0
            record(0.05, 0.55, 11, vec![0.05; 10], true), // ttft 50ms, tpot 50ms
            record(0.0, 0.0, 0, vec![], false),
        ];
        let slo: Slo = "ttft=200ms,tpot=60ms".parse().unwrap();
        let m = summarize(&records, 2.0, Some(&slo));
        assert!(close(m.request_goodput.unwrap(), 0.5));
        let slo: Slo = "ttft=400ms".parse().unwrap();
        let m = summarize(&records, 2.0, Some(&slo));
        assert!(close(m.request_goodput.unwrap(), 1.5));
    }
}
