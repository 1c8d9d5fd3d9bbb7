//! The results of a benchmark: `vllm bench serve`'s table and the JSON file.

use std::fmt::Write;
use std::path::Path;

use anyhow::Context;
use serde::Serialize;

use super::arrivals::RequestRate;
use super::metrics::{LatencyStats, Metrics};
use super::node_metrics::NodeWork;
use super::record::RequestRecord;

/// One run at one request rate.
#[derive(Clone, Debug, Serialize)]
pub struct RunReport {
    pub request_rate: RequestRate,
    pub burstiness: f64,
    pub max_concurrency: Option<usize>,
    pub metrics: Metrics,
    /// What the nodes did during the run (`--metrics-url`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub node_work: Option<NodeWork>,
    /// Every request, in dataset order.
    pub requests: Vec<RequestRecord>,
}

/// Every run of a benchmark (one per rate of a sweep), in order.
#[derive(Clone, Debug, Serialize)]
pub struct BenchReport {
    pub router: String,
    pub dataset: String,
    pub num_prompts: usize,
    pub seed: u64,
    pub runs: Vec<RunReport>,
}

impl BenchReport {
    /// Writes the whole report, per-request data included, as pretty JSON.
    pub fn write_json(&self, path: &Path) -> anyhow::Result<()> {
        let json = serde_json::to_string_pretty(self)?;
        std::fs::write(path, json).with_context(|| format!("writing {}", path.display()))
    }
}

fn line(out: &mut String, label: &str, value: impl std::fmt::Display) {
    let _ = writeln!(out, "{:<40} {:<10}", label, value);
}

fn header(out: &mut String, title: &str, fill: char) {
    let _ = writeln!(out, "{}", centered(title, fill, 50));
}

fn centered(title: &str, fill: char, width: usize) -> String {
    let pad = width.saturating_sub(title.chars().count());
    let left = pad / 2;
    let fill_str = |n| std::iter::repeat_n(fill, n).collect::<String>();
    format!("{}{}{}", fill_str(left), title, fill_str(pad - left))
}

fn latency_block(out: &mut String, title: &str, short: &str, s: &LatencyStats) {
    header(out, title, '-');
    line(
        out,
        &format!("Mean {short} (ms):"),
        format!("{:.2}", s.mean_ms),
    );
    line(
        out,
        &format!("Median {short} (ms):"),
        format!("{:.2}", s.median_ms),
    );
    line(
        out,
        &format!("P90 {short} (ms):"),
        format!("{:.2}", s.p90_ms),
    );
    line(
        out,
        &format!("P99 {short} (ms):"),
        format!("{:.2}", s.p99_ms),
    );
}

/// The run's summary laid out as `vllm bench serve` prints it.
pub fn table(run: &RunReport) -> String {
    let m = &run.metrics;
    let mut out = String::new();
    header(&mut out, " Serving Benchmark Result ", '=');
    line(&mut out, "Successful requests:", m.successful_requests);
    line(&mut out, "Failed requests:", m.failed_requests);
    line(
        &mut out,
        "Request rate configured (RPS):",
        format!("{:.2}", run.request_rate.as_f64()),
    );
    if let Some(c) = run.max_concurrency {
        line(&mut out, "Maximum request concurrency:", c);
    }
    line(
        &mut out,
        "Benchmark duration (s):",
        format!("{:.2}", m.duration_s),
    );
    line(&mut out, "Total input tokens:", m.total_input_tokens);
    line(&mut out, "Total generated tokens:", m.total_output_tokens);
    line(
        &mut out,
        "Total cached prompt tokens:",
        m.total_cached_tokens,
    );
    line(
        &mut out,
        "Prefix cache hit rate (%):",
        format!("{:.2}", m.prefix_cache_hit_rate * 100.0),
    );
    line(
        &mut out,
        "Request throughput (req/s):",
        format!("{:.2}", m.request_throughput),
    );
    if let Some(g) = m.request_goodput {
        line(&mut out, "Request goodput (req/s):", format!("{g:.2}"));
    }
    line(
        &mut out,
        "Output token throughput (tok/s):",
        format!("{:.2}", m.output_throughput),
    );
    line(
        &mut out,
        "Total Token throughput (tok/s):",
        format!("{:.2}", m.total_token_throughput),
    );
    if let Some(w) = &run.node_work {
        header(&mut out, "Node Counters", '-');
        line(
            &mut out,
            "Prompt tokens computed by nodes:",
            format!("{:.0}", w.prefill_tokens_computed),
        );
        line(
            &mut out,
            "Prompt tokens cached at nodes:",
            format!("{:.0}", w.prefill_tokens_cached),
        );
        line(
            &mut out,
            "KV bytes over QUIC:",
            format!("{:.0}", w.kv_bytes_over_quic),
        );
    }
    latency_block(&mut out, "Time to First Token", "TTFT", &m.ttft);
    if let (Some(first), Some(later)) = (&m.first_turn_ttft, &m.later_turn_ttft) {
        header(&mut out, "TTFT by Turn", '-');
        for (which, s) in [("first turns", first), ("later turns", later)] {
            line(
                &mut out,
                &format!("Mean TTFT {which} (ms):"),
                format!("{:.2}", s.mean_ms),
            );
            line(
                &mut out,
                &format!("P99 TTFT {which} (ms):"),
                format!("{:.2}", s.p99_ms),
            );
        }
    }
    if !m.ttft_spans.is_empty() {
        header(&mut out, "Request phases (median ms)", '-');
        for s in &m.ttft_spans {
            line(
                &mut out,
                &format!("{} ({} req):", s.span, s.requests),
                format!("{:.2}", s.median_ms),
            );
        }
    }
    latency_block(
        &mut out,
        "Time per Output Token (excl. 1st token)",
        "TPOT",
        &m.tpot,
    );
    latency_block(&mut out, "Inter-token Latency", "ITL", &m.itl);
    latency_block(&mut out, "End-to-end Latency", "E2EL", &m.e2el);
    let _ = writeln!(out, "{}", "=".repeat(50));
    out
}

/// One line per run of a sweep: rate, throughput and the median/p99 latencies.
pub fn sweep_summary(runs: &[RunReport]) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "{:>8} {:>9} {:>10} {:>10} {:>10} {:>10} {:>10}",
        "rate", "req/s", "tok/s", "TTFT p50", "TTFT p99", "TPOT p50", "TPOT p99"
    );
    for r in runs {
        let m = &r.metrics;
        let _ = writeln!(
            out,
            "{:>8} {:>9.2} {:>10.1} {:>10.2} {:>10.2} {:>10.2} {:>10.2}",
            r.request_rate.to_string(),
            m.request_throughput,
            m.output_throughput,
            m.ttft.median_ms,
            m.ttft.p99_ms,
            m.tpot.median_ms,
            m.tpot.p99_ms
        );
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn headers_are_centered_like_python_format() {
        // '{s:{c}^{n}}'.format(s=' Serving Benchmark Result ', n=50, c='=')
        assert_eq!(
            centered(" Serving Benchmark Result ", '=', 50),
            "============ Serving Benchmark Result ============"
        );
        // Python puts the odd fill character on the right.
        assert_eq!(centered("abc", '-', 6), "-abc--");
    }

    #[test]
    fn table_has_every_vllm_line() {
        let run = RunReport {
            request_rate: RequestRate::PerSecond(4.0),
            burstiness: 1.0,
            max_concurrency: None,
            metrics: Metrics {
                request_goodput: Some(1.0),
                ..Default::default()
            },
            node_work: Some(NodeWork::default()),
            requests: vec![],
        };
        let t = table(&run);
        for label in [
            "Successful requests:",
            "Benchmark duration (s):",
            "Total input tokens:",
            "Total generated tokens:",
            "Prefix cache hit rate (%):",
            "Request throughput (req/s):",
            "Request goodput (req/s):",
            "Output token throughput (tok/s):",
            "Total Token throughput (tok/s):",
            "Median TTFT (ms):",
            "P99 TPOT (ms):",
            "P90 ITL (ms):",
            "Mean E2EL (ms):",
            "Prompt tokens computed by nodes:",
            "KV bytes over QUIC:",
        ] {
            assert!(t.contains(label), "missing {label} in\n{t}");
        }
    }
}
