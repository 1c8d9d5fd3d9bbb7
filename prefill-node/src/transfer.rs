//! A request's sending side: receives its job's events from the worker and
//! ships each layer's blocks to the decode node, then the Final frame.
//!
//! This runs inside the `Prefill` call's own future, so a caller that goes
//! away drops it: the QUIC streams are reset (the decode node sees an abort)
//! and the channel to the worker closes, which drops the job at its next
//! layer. The stream is opened at the first layer, not while queued, so a
//! request waiting for blocks holds nothing at the decode node.

use std::collections::VecDeque;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Instant;

use tandem_engine::backend::KvBytes;
use tandem_kv_transfer::{
    FinalAhead, FirstLogprobs, FirstToken, KvSender, LayerShape, RequestStream, SentFinal,
    TransferError,
};
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

/// A layer's send, owning the request's stream while it waits for the
/// device copy and the sender's budget; gives the stream back with the
/// bytes queued.
type LayerSend = Pin<Box<dyn Future<Output = (RequestStream, Result<u64, PrefillError>)> + Send>>;

/// What the worker said when the prompt was done.
struct Done {
    first_token: u32,
    cached_tokens: usize,
    queue_seconds: f64,
    compute_seconds: f64,
    /// The Final frame, sent as soon as the first token was known.
    sent: SentFinal,
}

/// Ships a job's KV as the worker produces it; returns the response once the
/// decode node has acknowledged every byte. Counts the bytes as they go in
/// `metrics`. (The transfer's time is measured by the decode node: the router
/// may drop this call as soon as the decode node has the KV and finishes, so
/// the acknowledgement is not always seen here.)
///
/// The worker's events are taken while a layer waits for its device copy or
/// the sender's byte budget, so the Final frame (the first token) leaves as
/// soon as the worker has sampled it, ahead of the layers still to queue: it
/// announces every layer's frames, counted as the events arrive.
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
    // The request's stream, opened at the first event; `None` while a
    // layer's send holds it.
    let mut stream: Option<RequestStream> = None;
    let mut ahead: Option<FinalAhead> = None;
    let mut sending: Option<LayerSend> = None;
    let mut queued: VecDeque<(LayerShape, KvBytes)> = VecDeque::new();
    // Layer frames of every layer seen so far, queued or not.
    let mut frames_total = 0u32;
    let mut done: Option<Done> = None;
    let mut kv_bytes_sent = 0u64;
    loop {
        // The stream is idle: the next layer takes it.
        if sending.is_none()
            && stream.is_some()
            && let Some((shape, kv)) = queued.pop_front()
            && let Some(s) = stream.take()
        {
            let layer = send_layer(s, shape, kv, dest.addr, cancel.clone());
            sending = Some(Box::pin(layer));
        }
        if sending.is_none()
            && queued.is_empty()
            && let Some(d) = done.take()
        {
            let Some(s) = stream.take() else {
                return Err(PrefillError::Server("the KV stream went missing".into()));
            };
            let flushed = s.finish_after(d.sent).await.map_err(fail)?;
            let kv_sent_seconds = flushed.saturating_duration_since(submitted).as_secs_f64();
            return Ok(pb::PrefillResponse {
                first_token: d.first_token,
                queue_seconds: d.queue_seconds,
                compute_seconds: d.compute_seconds,
                kv_bytes_sent,
                cached_tokens: u32::try_from(d.cached_tokens).unwrap_or(u32::MAX),
                kv_sent_seconds,
            });
        }
        let event = tokio::select! {
            biased;
            _ = cancel.cancelled() => None,
            (s, r) = async {
                match sending.as_mut() {
                    Some(send) => send.await,
                    None => std::future::pending().await,
                }
            } => {
                sending = None;
                stream = Some(s);
                match r {
                    Ok(bytes) => {
                        kv_bytes_sent += bytes;
                        metrics.bytes.increment(bytes);
                        continue;
                    }
                    Err(PrefillError::Cancelled) => None,
                    Err(e) => {
                        abort(stream.take(), &e.to_string()).await;
                        return Err(e);
                    }
                }
            }
            e = events.recv(), if done.is_none() => e,
        };
        // The stream opens at the first layer (or, were a prompt to have no
        // blocks, at its end: still a valid transfer), not while queued.
        let opens = matches!(event, Some(JobEvent::Layer(..) | JobEvent::Done { .. }));
        if opens && ahead.is_none() {
            let s = sender.open_request(dest.transfer_id).await.map_err(fail)?;
            ahead = Some(s.final_ahead());
            stream = Some(s);
        }
        let opened = || {
            ahead
                .as_ref()
                .ok_or_else(|| PrefillError::Server("the KV stream went missing".into()))
        };
        match event {
            Some(JobEvent::Layer(shape, kv)) => {
                let frames = opened()?.frames_for(&shape).map_err(fail)?;
                frames_total = frames_total.saturating_add(frames);
                queued.push_back((shape, kv));
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
                // acknowledgement comes back.
                tracing::info!(
                    kv_bytes = kv_bytes_sent,
                    layers_queued = queued.len(),
                    cached_tokens,
                    queue_ms = queue_seconds * 1e3,
                    compute_ms = compute_seconds * 1e3,
                    "prefilled; sending the final frame"
                );
                let first = FirstToken {
                    id: first_token,
                    logprobs: logprobs.map(|l| FirstLogprobs {
                        logprob: l.logprob,
                        top: l.top,
                    }),
                };
                done = Some(Done {
                    first_token,
                    cached_tokens,
                    queue_seconds,
                    compute_seconds,
                    sent: opened()?.send(&first, num_layers, frames_total),
                });
            }
            Some(JobEvent::Failed(e)) => {
                abort(take_back(&mut stream, sending.take()).await, &e.to_string()).await;
                return Err(e);
            }
            None => {
                let e = if cancel.is_cancelled() {
                    PrefillError::Cancelled
                } else {
                    PrefillError::ShuttingDown
                };
                abort(take_back(&mut stream, sending.take()).await, &e.to_string()).await;
                return Err(e);
            }
        }
    }
}

/// Queues one layer on `s` once its device copy is done; a cancellation
/// ends the wait (the stream comes back either way).
async fn send_layer(
    mut s: RequestStream,
    shape: LayerShape,
    kv: KvBytes,
    addr: std::net::SocketAddr,
    cancel: CancellationToken,
) -> (RequestStream, Result<u64, PrefillError>) {
    let queue = async {
        let payload = match kv {
            KvBytes::Ready(b) => b,
            // A device copy still in flight: wait for it off the async threads.
            pending => tokio::task::spawn_blocking(move || pending.wait())
                .await
                .map_err(|e| PrefillError::Compute(format!("KV export task: {e}")))?
                .map_err(|e| PrefillError::Compute(e.to_string()))?,
        };
        let bytes = payload.len() as u64;
        s.send_layer(shape, payload)
            .await
            .map_err(|source| PrefillError::Transfer { addr, source })?;
        Ok(bytes)
    };
    let r = tokio::select! {
        biased;
        _ = cancel.cancelled() => Err(PrefillError::Cancelled),
        r = queue => r,
    };
    (s, r)
}

/// The stream, from where it is: idle, or held by a layer's send (awaited).
async fn take_back(
    stream: &mut Option<RequestStream>,
    sending: Option<LayerSend>,
) -> Option<RequestStream> {
    match sending {
        Some(send) => Some(send.await.0),
        None => stream.take(),
    }
}

async fn abort(stream: Option<RequestStream>, reason: &str) {
    if let Some(s) = stream
        && let Err(e) = s.abort(reason).await
    {
        tracing::debug!("aborting a KV transfer: {e}");
    }
}
