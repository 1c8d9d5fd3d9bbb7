//! A request's sending side: receives its job's events from the worker and
//! ships each layer's blocks to the decode node, then the Final frame.
//!
//! This runs inside the `Prefill` call's own future, so a caller that goes
//! away drops it: the QUIC streams are reset (the decode node sees an abort)
//! and the channel to the worker closes, which drops the job at its next
//! layer. The stream is opened at the first layer, not while queued, so a
//! request waiting for blocks holds nothing at the decode node.

use std::sync::Arc;
use std::time::Instant;

use tandem_engine::backend::KvBytes;
use tandem_kv_transfer::{FirstLogprobs, FirstToken, KvSender, RequestStream, TransferError};
use tandem_proto::v1 as pb;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::error::PrefillError;
use crate::job::JobEvent;
use crate::node_metrics::TransferMetrics;
use crate::validation::KvDestination;

// Every top log probability a request may ask for fits in the Final frame.
const _: () =
    assert!(tandem_engine::MAX_TOP_LOGPROBS <= tandem_kv_transfer::wire::MAX_TOP_LOGPROBS);

/// Ships a job's KV as the worker produces it; returns the response once the
/// decode node has acknowledged every byte. Counts the bytes as they go in
/// `metrics`. (The transfer's time is measured by the decode node: the router
/// may drop this call as soon as the decode node has the KV and finishes, so
/// the acknowledgement is not always seen here.)
pub(crate) async fn ship(
    sender: &Arc<KvSender>,
    dest: &KvDestination,
    num_layers: u32,
    mut events: mpsc::Receiver<JobEvent>,
    cancel: &CancellationToken,
    metrics: &TransferMetrics,
    submitted: Instant,
) -> Result<pb::PrefillResponse, PrefillError> {
    let fail = |source: TransferError| PrefillError::Transfer {
        addr: dest.addr,
        source,
    };
    let mut stream: Option<RequestStream> = None;
    let mut kv_bytes_sent = 0u64;
    loop {
        let event = tokio::select! {
            biased;
            _ = cancel.cancelled() => None,
            e = events.recv() => e,
        };
        match event {
            Some(JobEvent::Layer(shape, kv)) => {
                let payload = match kv {
                    KvBytes::Ready(b) => b,
                    // A device copy still in flight: wait for it off the async threads.
                    pending => tokio::task::spawn_blocking(move || pending.wait())
                        .await
                        .map_err(|e| PrefillError::Compute(format!("KV export task: {e}")))?
                        .map_err(|e| PrefillError::Compute(e.to_string()))?,
                };
                let s = match stream.as_mut() {
                    Some(s) => s,
                    None => {
                        stream.insert(sender.open_request(dest.transfer_id).await.map_err(fail)?)
                    }
                };
                let bytes = payload.len() as u64;
                // Cancellation while waiting on back-pressure ends the call too.
                tokio::select! {
                    biased;
                    _ = cancel.cancelled() => {}
                    r = s.send_layer(shape, payload) => {
                        r.map_err(fail)?;
                        kv_bytes_sent += bytes;
                        metrics.bytes.increment(bytes);
                    }
                }
            }
            Some(JobEvent::Done {
                first_token,
                logprobs,
                cached_tokens,
                queue_seconds,
                compute_seconds,
            }) => {
                // Logged now, in the call's `prefill` span: the router may drop
                // the call once the decode node has the KV, before the
                // acknowledgement below comes back.
                tracing::info!(
                    kv_bytes = kv_bytes_sent,
                    cached_tokens,
                    queue_ms = queue_seconds * 1e3,
                    compute_ms = compute_seconds * 1e3,
                    "prefilled; sending the final frame"
                );
                let s = match stream.take() {
                    Some(s) => s,
                    // Every prompt has at least one block: this cannot happen,
                    // but a stream with no layers is still a valid transfer.
                    None => sender.open_request(dest.transfer_id).await.map_err(fail)?,
                };
                // The last layer is queued: the Final (the first token) goes
                // ahead of what is still queued, and `finish` says when the
                // queued bytes went to the transport.
                let first = FirstToken {
                    id: first_token,
                    logprobs: logprobs.map(|l| FirstLogprobs {
                        logprob: l.logprob,
                        top: l.top,
                    }),
                };
                let flushed = s.finish(&first, num_layers).await.map_err(fail)?;
                let kv_sent_seconds = flushed.saturating_duration_since(submitted).as_secs_f64();
                return Ok(pb::PrefillResponse {
                    first_token,
                    queue_seconds,
                    compute_seconds,
                    kv_bytes_sent,
                    cached_tokens: u32::try_from(cached_tokens).unwrap_or(u32::MAX),
                    kv_sent_seconds,
                });
            }
            Some(JobEvent::Failed(e)) => {
                abort(stream.take(), &e.to_string()).await;
                return Err(e);
            }
            None => {
                let e = if cancel.is_cancelled() {
                    PrefillError::Cancelled
                } else {
                    PrefillError::ShuttingDown
                };
                abort(stream.take(), &e.to_string()).await;
                return Err(e);
            }
        }
        if cancel.is_cancelled() {
            abort(stream.take(), "request cancelled").await;
            return Err(PrefillError::Cancelled);
        }
    }
}

async fn abort(stream: Option<RequestStream>, reason: &str) {
    if let Some(s) = stream
        && let Err(e) = s.abort(reason).await
    {
        tracing::debug!("aborting a KV transfer: {e}");
    }
}
