//! Where a request's time to first token went: the points its nodes
//! report (the prefill node's queue, compute and last KV byte sent in its
//! `PrefillResponse`; the decode node's local prefill, last layer landed and
//! first decode step on its `Finished`), placed on the router's clock by
//! when the router called each node, and the phases between them.
//!
//! At the end of a finished request the router logs every point and phase in
//! its `request finished` line, records each phase in
//! `tandem_request_span_seconds{span}`, and sends the points to the client
//! in `Timings.spans` (which `tandem bench` summarizes). Node clocks are never
//! compared: each node measures from its own arrival, and the router adds
//! when it made that call (the one-way network latency is not subtracted, so
//! a phase that crosses nodes, `kv_import_tail`, can read a little long).

use tandem_proto::v1 as pb;
use tandem_telemetry::names;
use tokio::time::Instant;

/// What one attempt learnt about its request's timing.
#[derive(Debug, Default, Clone)]
pub struct SpanClock {
    /// When the decode node admitted the attempt (answered the reservation).
    admitted: Option<Instant>,
    /// When the router called the prefill node.
    prefill_sent: Option<Instant>,
    /// The prefill node's answer: queue, compute, last KV byte, from its arrival.
    prefill: Option<(f64, f64, f64)>,
    /// The decode node's points, from its admission.
    decode: Option<pb::RequestSpans>,
}

/// A request's phases in seconds, as logged and recorded.
#[derive(Debug, Default, Clone, Copy, PartialEq)]
pub struct Phases {
    /// Arrival to the decode node's admission (the router's queues, admission and
    /// decode room, and its choice of node).
    pub route: Option<f64>,
    /// Admission to the prefill's first chunk (its queue wait).
    pub prefill_queue: Option<f64>,
    /// First chunk start to last chunk end.
    pub prefill_compute: Option<f64>,
    /// Compute end to the last KV byte sent.
    pub kv_send_tail: Option<f64>,
    /// Last KV byte sent to the last layer landed at the decode node.
    pub kv_import_tail: Option<f64>,
    /// KV landed (or local prefill done) to the first token sent to the
    /// client; when the token left before the KV landed, prefill compute end
    /// to the token sent (the KV tails then follow it).
    pub first_token: Option<f64>,
    /// KV landed (or local prefill done) to the first decode step.
    pub first_step: Option<f64>,
}

impl SpanClock {
    /// A new attempt was admitted at `now` (forgets an earlier attempt's points).
    pub fn admitted(&mut self, now: Instant) {
        *self = SpanClock {
            admitted: Some(now),
            ..SpanClock::default()
        };
    }

    /// The prefill node was called at `now`.
    pub fn prefill_sent(&mut self, now: Instant) {
        self.prefill_sent = Some(now);
    }

    /// The prefill node answered.
    pub fn prefill_answered(&mut self, r: &pb::PrefillResponse) {
        self.prefill = Some((r.queue_seconds, r.compute_seconds, r.kv_sent_seconds));
    }

    /// The decode node finished, with its points.
    pub fn decode_finished(&mut self, timings: Option<&pb::Timings>) {
        self.decode = timings.and_then(|t| t.spans);
    }

    /// The points in seconds since `arrival` (0: unknown or did not happen).
    pub fn points(&self, arrival: Instant, first_token_at: Option<Instant>) -> pb::RequestSpans {
        let since = |t: Instant| t.saturating_duration_since(arrival).as_secs_f64();
        // A node's point `s` seconds after the router called it at `origin`.
        let at = |origin: Option<Instant>, s: f64| match origin {
            Some(o) if s > 0.0 => since(o) + s,
            _ => 0.0,
        };
        let d = self.decode.unwrap_or_default();
        let mut p = pb::RequestSpans {
            routed: self.admitted.map_or(0.0, since),
            kv_imported: at(self.admitted, d.kv_imported),
            first_step: at(self.admitted, d.first_step),
            first_token_sent: first_token_at.map_or(0.0, since),
            prefill_started: at(self.admitted, d.prefill_started),
            prefill_computed: at(self.admitted, d.prefill_computed),
            kv_sent: 0.0,
        };
        if let Some((queue, compute, sent)) = self.prefill {
            p.prefill_started = at(self.prefill_sent, queue.max(f64::MIN_POSITIVE));
            p.prefill_computed = at(self.prefill_sent, queue + compute);
            p.kv_sent = at(self.prefill_sent, sent);
        }
        p
    }
}

/// The phases between `p`'s points (a phase is `None` when a point it needs
/// did not happen; crossing nodes, it is never below 0).
pub fn phases(p: &pb::RequestSpans) -> Phases {
    let known = |t: f64| (t > 0.0).then_some(t);
    let between = |a: Option<f64>, b: Option<f64>| Some((b? - a?).max(0.0));
    let routed = known(p.routed);
    let computed = known(p.prefill_computed);
    let kv_sent = known(p.kv_sent);
    let imported = known(p.kv_imported);
    // The first token can be sampled once the KV is here, or the local prefill
    // done; a prefill node's first token may also leave before its KV lands
    // (its Final frame overtakes the layers): then it follows the compute, and
    // the KV tails come after it.
    let ready = imported.or(computed);
    let first_token_sent = known(p.first_token_sent);
    let token_ready = match (imported, first_token_sent) {
        (Some(i), Some(t)) if t < i => computed,
        _ => ready,
    };
    Phases {
        route: routed,
        prefill_queue: between(routed, known(p.prefill_started)),
        prefill_compute: between(known(p.prefill_started), computed),
        kv_send_tail: between(computed, kv_sent),
        kv_import_tail: between(kv_sent, imported),
        first_token: between(token_ready, first_token_sent),
        first_step: between(ready, known(p.first_step)),
    }
}

impl Phases {
    /// Each known phase with its `span` label.
    pub fn labelled(&self) -> Vec<(&'static str, f64)> {
        [
            ("route", self.route),
            ("prefill_queue", self.prefill_queue),
            ("prefill_compute", self.prefill_compute),
            ("kv_send_tail", self.kv_send_tail),
            ("kv_import_tail", self.kv_import_tail),
            ("first_token", self.first_token),
            ("first_step", self.first_step),
        ]
        .into_iter()
        .filter_map(|(l, v)| Some((l, v?)))
        .collect()
    }

    /// Records each known phase in `tandem_request_span_seconds{span}`.
    pub fn record(&self) {
        for (span, secs) in self.labelled() {
            metrics::histogram!(names::REQUEST_SPAN_SECONDS, names::SPAN => span).record(secs);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn node_points_are_placed_by_when_the_router_called_the_node() {
        let arrival = Instant::now();
        let ms = |n| arrival + Duration::from_millis(n);
        let mut clock = SpanClock::default();
        clock.admitted(ms(2));
        clock.prefill_sent(ms(3));
        clock.prefill_answered(&pb::PrefillResponse {
            queue_seconds: 0.010,
            compute_seconds: 0.100,
            kv_sent_seconds: 0.115,
            ..Default::default()
        });
        clock.decode_finished(Some(&pb::Timings {
            spans: Some(pb::RequestSpans {
                kv_imported: 0.120,
                first_step: 0.121,
                ..Default::default()
            }),
            ..Default::default()
        }));
        let p = clock.points(arrival, Some(ms(125)));
        let close = |a: f64, b: f64| (a - b).abs() < 1e-9;
        assert!(close(p.routed, 0.002));
        assert!(close(p.prefill_started, 0.013));
        assert!(close(p.prefill_computed, 0.113));
        assert!(close(p.kv_sent, 0.118));
        assert!(close(p.kv_imported, 0.122));
        assert!(close(p.first_token_sent, 0.125));
        let ph = phases(&p);
        assert!(close(ph.prefill_queue.unwrap(), 0.011));
        assert!(close(ph.prefill_compute.unwrap(), 0.100));
        assert!(close(ph.kv_send_tail.unwrap(), 0.005));
        assert!(close(ph.kv_import_tail.unwrap(), 0.004));
        assert!(close(ph.first_token.unwrap(), 0.003));
        assert!(close(ph.first_step.unwrap(), 0.001));
        assert_eq!(ph.labelled().len(), 7);
    }

    #[test]
    fn a_local_prefill_has_no_transfer_phases() {
        let arrival = Instant::now();
        let mut clock = SpanClock::default();
        clock.admitted(arrival + Duration::from_millis(1));
        clock.decode_finished(Some(&pb::Timings {
            spans: Some(pb::RequestSpans {
                prefill_started: 0.001,
                prefill_computed: 0.050,
                first_step: 0.051,
                ..Default::default()
            }),
            ..Default::default()
        }));
        let ph = phases(&clock.points(arrival, Some(arrival + Duration::from_millis(52))));
        assert_eq!(ph.kv_send_tail, None);
        assert_eq!(ph.kv_import_tail, None);
        assert!((ph.prefill_compute.unwrap() - 0.049).abs() < 1e-9);
        assert!((ph.first_token.unwrap() - 0.001).abs() < 1e-9);
    }

    #[test]
    fn a_first_token_ahead_of_the_kv_follows_the_compute() {
        let p = pb::RequestSpans {
            routed: 0.002,
            prefill_started: 0.013,
            prefill_computed: 0.113,
            first_token_sent: 0.115,
            kv_sent: 0.125,
            kv_imported: 0.130,
            first_step: 0.131,
        };
        let ph = phases(&p);
        let close = |a: Option<f64>, b: f64| (a.unwrap() - b).abs() < 1e-9;
        assert!(close(ph.first_token, 0.002), "{ph:?}");
        assert!(close(ph.kv_send_tail, 0.012));
        assert!(close(ph.kv_import_tail, 0.005));
        assert!(close(ph.first_step, 0.001));
    }
}
