//! When things happened to one request on this node, for the router's
//! per-request timing spans (`RequestSpans` on the decode node's Finished,
//! in seconds since admission): the local prefill's first and last chunk,
//! the last layer of shipped KV landing, and the first decode step.

use std::time::{Duration, Instant};

use tandem_proto::v1 as pb;

/// A request's points in time on this node.
#[derive(Debug, Clone, Copy)]
pub(crate) struct SeqSpans {
    pub admitted: Instant,
    pub prefill_started: Option<Instant>,
    pub prefill_computed: Option<Instant>,
    pub kv_imported: Option<Instant>,
    pub first_step: Option<Instant>,
    /// Shipped KV: frames imported and the engine loop's time in them.
    pub imports: u32,
    pub import_time: Duration,
}

impl SeqSpans {
    pub fn new(admitted: Instant) -> Self {
        SeqSpans {
            admitted,
            prefill_started: None,
            prefill_computed: None,
            kv_imported: None,
            first_step: None,
            imports: 0,
            import_time: Duration::ZERO,
        }
    }

    /// Seconds since admission of each point (0: did not happen).
    pub fn to_pb(self) -> pb::RequestSpans {
        let since =
            |t: Option<Instant>| t.map_or(0.0, |t| t.duration_since(self.admitted).as_secs_f64());
        pb::RequestSpans {
            prefill_started: since(self.prefill_started),
            prefill_computed: since(self.prefill_computed),
            kv_imported: since(self.kv_imported),
            first_step: since(self.first_step),
            ..Default::default()
        }
    }
}

impl<B: tandem_engine::backend::Backend> crate::scheduler::Scheduler<B> {
    /// After a forward pass that began at `started` over `plan`: marks each
    /// row's sequence's first prefill chunk or first decode step, and feeds
    /// the local prefill rate (`link_cost`).
    pub(crate) fn note_step(&mut self, plan: &[crate::batch_plan::PlannedRow], started: Instant) {
        use crate::batch_plan::RowKind;
        let mut prefilled = 0;
        for r in plan {
            let Some(seq) = self.seqs.get_mut(&r.id) else {
                continue;
            };
            match r.kind {
                RowKind::Decode => {
                    seq.spans.first_step.get_or_insert(started);
                }
                RowKind::Prefill { .. } => {
                    prefilled += r.len;
                    seq.spans.prefill_started.get_or_insert(started);
                }
            }
        }
        self.local_rate.observe(prefilled, started.elapsed());
    }
}
