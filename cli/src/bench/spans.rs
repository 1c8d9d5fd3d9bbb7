//! Where the benchmark's time to first token went: the median of each phase
//! of the requests' timing spans (`Timings.spans`, which the router fills in
//! from what the nodes report; see `tandem_router::request_spans`), printed
//! under the TTFT block as "Request phases". A first token that left ahead of
//! its KV (the prefill node's Final frame overtakes the layers) follows the
//! prefill compute, and the KV tails come after it. gRPC runs only: the HTTP
//! API does not carry them.

use serde::Serialize;

use super::metrics::percentile_sorted;
use super::record::RequestRecord;

/// The phases in the order of a request's life.
const ORDER: [&str; 7] = [
    "route",
    "prefill_queue",
    "prefill_compute",
    "kv_send_tail",
    "kv_import_tail",
    "first_token",
    "first_step",
];

/// One phase's median over the successful requests that had it.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct SpanMedian {
    /// The phase (`tandem_request_span_seconds`' `span` label).
    pub span: String,
    pub median_ms: f64,
    /// Requests that had this phase (a local prefill has no transfer).
    pub requests: usize,
}

/// The phases of one request's spans, in seconds.
pub fn phases_of(spans: &tandem_proto::v1::RequestSpans) -> Vec<(String, f64)> {
    tandem_router::request_spans::phases(spans)
        .labelled()
        .into_iter()
        .map(|(l, v)| (l.to_owned(), v))
        .collect()
}

/// The median of each phase over the successful `records`, in [`ORDER`].
pub fn medians(records: &[RequestRecord]) -> Vec<SpanMedian> {
    ORDER
        .iter()
        .filter_map(|&span| {
            let mut v: Vec<f64> = records
                .iter()
                .filter(|r| r.success)
                .flat_map(|r| r.spans_s.iter())
                .filter(|(l, _)| l == span)
                .map(|(_, s)| s * 1e3)
                .collect();
            if v.is_empty() {
                return None;
            }
            v.sort_by(f64::total_cmp);
            Some(SpanMedian {
                span: span.to_owned(),
                median_ms: percentile_sorted(&v, 50.0),
                requests: v.len(),
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn medians_are_per_phase_over_the_requests_that_had_it() {
        let rec = |ok, spans: &[(&str, f64)]| RequestRecord {
            success: ok,
            spans_s: spans.iter().map(|(l, s)| (l.to_string(), *s)).collect(),
            ..Default::default()
        };
        let records = [
            rec(true, &[("route", 0.001), ("kv_send_tail", 0.010)]),
            rec(true, &[("route", 0.003)]),
            rec(true, &[("route", 0.002), ("kv_send_tail", 0.030)]),
            rec(false, &[("route", 9.0)]),
        ];
        let m = medians(&records);
        assert_eq!(m.len(), 2);
        assert_eq!(m[0].span, "route");
        assert!((m[0].median_ms - 2.0).abs() < 1e-9);
        assert_eq!(m[0].requests, 3);
        assert_eq!(m[1].span, "kv_send_tail");
        assert!((m[1].median_ms - 20.0).abs() < 1e-9);
    }
}
