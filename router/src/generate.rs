//! A request's life after admission (see `internal.proto`): reserve at a
//! decode node, start the remote prefill if the decode node asks for one,
//! relay the decode node's tokens to the client, and clean up on every exit.
//!
//! Every way out is covered by a `CancelGuard`: unless a node already
//! finished the request, leaving this module (deadline, client gone, node
//! error, shutdown, even a panic) sends `Cancel` to the nodes still holding
//! it, and dropping the in-flight gRPC calls resets their streams, so both
//! nodes release their KV blocks.
//!
//! A node that fails mid-request (its stream breaks, or it stops sending load
//! reports and tokens: a paused process) does not fail the request: the
//! router re-runs it on other nodes, up to [`MAX_ATTEMPTS`] times, sending the
//! tokens the client already has as `generated`. The new nodes prefill prompt +
//! generated and replay them through sampling and stop matching, so the
//! client's stream continues with no token repeated or lost (and, for greedy
//! or seeded sampling, exactly as if nothing had failed).
//!
//! Only failures of a node count against it ([`RouterError::blames_node`]):
//! they open its circuit breaker, and a node whose breaker is open gets no
//! requests. With no usable prefill node the decode node prefills the prompt
//! itself (slower, not failed); with no usable decode node the request fails
//! UNAVAILABLE with a retry-after. A decode reservation's KV wait grows with
//! the prefill work queued ahead of it ([`crate::backlog::kv_wait`]).

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use tandem_cluster::Role;
use tandem_proto::v1 as pb;
use tandem_proto::v1::decode_node_client::DecodeNodeClient;
use tandem_proto::v1::decode_response::Event as DecodeEvent;
use tandem_proto::v1::generate_response::Event as ClientEvent;
use tandem_proto::v1::prefill_node_client::PrefillNodeClient;
use tandem_telemetry::names;
use tokio::sync::mpsc;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tonic::Status;
use tonic::codec::Streaming;
use tracing::{Instrument, debug, info, warn};

use crate::backlog::PendingTokens;
use crate::error::RouterError;
use crate::node_addr::NodeAddr;
use crate::nodes::{Assignment, NodeHandle, NodePool};
use crate::request_metrics::{TokenClock, Tokens, finish_label, request_ended, sample_ended};
use crate::request_spans::{self, SpanClock};
use crate::validation::ValidRequest;

mod attempt;
mod reserve;
use reserve::Reserved;

mod fanout;
use fanout::Placement;

/// The longest wait before asking the decode nodes again when all of them
/// refused a request for room (a request ending there wakes it sooner).
const FULL_BACKOFF: Duration = Duration::from_millis(20);
/// How long a `Cancel` call may take.
const CANCEL_TIMEOUT: Duration = Duration::from_secs(2);
/// How long the router waits to deliver a final error to a slow client.
const ERROR_SEND_TIMEOUT: Duration = Duration::from_secs(1);
/// Tries of one request: the first run and the re-runs after node failures.
pub const MAX_ATTEMPTS: usize = 3;
/// How often a running request checks that its nodes still answer.
const STALL_CHECK: Duration = Duration::from_millis(250);
/// How long a finished request waits for its prefill node's answer, which
/// carries the prompt's cached-token count. The answer follows the decode
/// node's acknowledgement of the KV, which came before its first token, so it
/// is normally already here or a round trip away.
const PREFILL_ANSWER_WAIT: Duration = Duration::from_millis(500);

/// The stream of responses to one client.
pub type ClientSender = mpsc::Sender<Result<pb::GenerateResponse, Status>>;

/// What a request's life needs from the router.
pub struct Relay {
    /// The cluster's nodes.
    pub nodes: Arc<NodePool>,
    /// How long a decode node waits for KV, with nothing queued ahead.
    pub kv_timeout_ms: u32,
    /// The longest KV wait, however much prefill work is queued ahead.
    pub kv_timeout_max_ms: u32,
    /// Prompt tokens of admitted requests not yet given to a prefill node
    /// (see [`PendingTokens`]).
    pub pending_prefill: Arc<AtomicU64>,
    /// The request deadline, for messages.
    pub request_timeout_s: f64,
    /// Fires when the router shuts down.
    pub shutdown: CancellationToken,
}

/// One request being served.
struct Request<'a> {
    relay: &'a Relay,
    req: &'a ValidRequest,
    arrival: Instant,
    deadline: Instant,
    tx: &'a ClientSender,
}

/// What a request has delivered so far, across attempts.
struct Progress {
    /// Token ids the client has received.
    sent: Vec<u32>,
    /// When the first decode node admitted the request.
    admitted_at: Option<Instant>,
    /// When the first token went out.
    first_token_at: Option<Instant>,
    /// Times the token messages for the latency histograms.
    clock: TokenClock,
    /// The finish reason's status label, once the request finished.
    finish: Option<&'static str>,
    /// Prompt tokens served from a prefix cache, as the final usage says.
    cached_tokens: u32,
    /// The request's count among the pending prefill tokens, until its
    /// first attempt has a prefill node (or prefills at the decode node).
    pending: Option<PendingTokens>,
    /// Where the last attempt's time to first token went.
    spans: SpanClock,
    /// Where a sample of an `n` > 1 request goes (see `generate/fanout.rs`).
    placement: Placement,
    /// The decode node of the current attempt.
    decode: Option<NodeAddr>,
    /// The prompt's log probabilities went to the client (a re-run does not
    /// ask for them again).
    prompt_logprobs_sent: bool,
}

impl Progress {
    fn new(arrival: Instant, pending: PendingTokens, placement: Placement) -> Self {
        Progress {
            sent: Vec::new(),
            admitted_at: None,
            first_token_at: None,
            clock: TokenClock::new(arrival),
            finish: None,
            cached_tokens: 0,
            pending: Some(pending),
            spans: SpanClock::default(),
            placement,
            decode: None,
            prompt_logprobs_sent: false,
        }
    }
}

/// Sends `Cancel` for a request to the nodes still holding it when dropped.
struct CancelGuard {
    request_id: String,
    /// The attempt the nodes hold: a stale Cancel never reaches a newer one.
    attempt: u32,
    decode: Option<NodeHandle>,
    prefill: Option<NodeHandle>,
}

impl Drop for CancelGuard {
    fn drop(&mut self) {
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            return;
        };
        for node in [self.decode.take(), self.prefill.take()]
            .into_iter()
            .flatten()
        {
            let request = pb::CancelRequest {
                request_id: self.request_id.clone(),
                attempt: self.attempt,
            };
            runtime.spawn(async move {
                let call = async {
                    match node.role {
                        Role::Decode => DecodeNodeClient::new(node.channel.clone())
                            .cancel(request)
                            .await
                            .map(|r| r.into_inner().found),
                        Role::Prefill => PrefillNodeClient::new(node.channel.clone())
                            .cancel(request)
                            .await
                            .map(|r| r.into_inner().found),
                    }
                };
                match tokio::time::timeout(CANCEL_TIMEOUT, call).await {
                    Ok(Ok(found)) => debug!(node = %node.addr, found, "cancelled"),
                    Ok(Err(status)) => debug!(node = %node.addr, "cancel failed: {status}"),
                    Err(_) => debug!(node = %node.addr, "cancel timed out"),
                }
            });
        }
    }
}

type PrefillCall =
    Pin<Box<dyn Future<Output = Result<tonic::Response<pb::PrefillResponse>, Status>> + Send>>;

impl Relay {
    /// Serves `req` to the end, writing its responses to `tx`. The caller
    /// holds the request's admission permit for as long as this runs.
    /// Returns the request's tokens if it reached a node (for its API key's
    /// usage and quota).
    pub async fn run(
        &self,
        req: ValidRequest,
        arrival: Instant,
        deadline: Instant,
        tx: ClientSender,
        pending: PendingTokens,
    ) -> Option<Tokens> {
        self.run_placed(req, arrival, deadline, tx, pending, Placement::default())
            .await
    }

    /// [`Relay::run`] for one sample of a request, placed as `placement` says.
    async fn run_placed(
        &self,
        req: ValidRequest,
        arrival: Instant,
        deadline: Instant,
        tx: ClientSender,
        pending: PendingTokens,
        placement: Placement,
    ) -> Option<Tokens> {
        let request = Request {
            relay: self,
            req: &req,
            arrival,
            deadline,
            tx: &tx,
        };
        let sibling = placement.is_later_sample();
        let mut progress = Progress::new(arrival, pending, placement);
        let result = request.serve(&mut progress).await;
        let status = match &result {
            Ok(()) => progress.finish.unwrap_or("unspecified"),
            Err(err) => err.status_label(),
        };
        let tokens = progress.admitted_at.map(|_| Tokens {
            prompt: req.prompt.len(),
            generated: progress.sent.len(),
        });
        match result {
            Ok(()) => {
                let p = progress.spans.points(arrival, progress.first_token_at);
                let ph = request_spans::phases(&p);
                ph.record();
                let ms = |s: Option<f64>| s.map(|s| s * 1e3);
                info!(
                    status,
                    prompt_tokens = req.prompt.len(),
                    cached_tokens = progress.cached_tokens,
                    generated = progress.sent.len(),
                    ttft_ms = ms(p.first_token_sent.gt(&0.0).then_some(p.first_token_sent)),
                    total_ms = arrival.elapsed().as_secs_f64() * 1e3,
                    route_ms = ms(ph.route),
                    prefill_queue_ms = ms(ph.prefill_queue),
                    prefill_compute_ms = ms(ph.prefill_compute),
                    kv_send_tail_ms = ms(ph.kv_send_tail),
                    kv_import_tail_ms = ms(ph.kv_import_tail),
                    first_token_ms = ms(ph.first_token),
                    first_step_ms = ms(ph.first_step),
                    spans = ?p,
                    "request finished"
                )
            }
            Err(RouterError::ClientGone) => info!(
                status,
                generated = progress.sent.len(),
                "client went away; cancelled"
            ),
            Err(err) => {
                warn!(
                    status,
                    generated = progress.sent.len(),
                    "request failed: {err}"
                );
                let _ = tokio::time::timeout(ERROR_SEND_TIMEOUT, tx.send(Err(err.into()))).await;
            }
        }
        if sibling {
            sample_ended(tokens);
        } else {
            request_ended(status, arrival, tokens);
        }
        tokens
    }
}

impl Request<'_> {
    /// Runs attempts until one finishes the request or fails for good.
    async fn serve(&self, progress: &mut Progress) -> Result<(), RouterError> {
        // Nodes that failed this request: tried again only when no other is left.
        let mut failed: Vec<NodeAddr> = Vec::new();
        for attempt in 1..=MAX_ATTEMPTS as u32 {
            let span = tracing::info_span!("attempt", attempt);
            let err = match self
                .attempt(progress, &failed, attempt)
                .instrument(span)
                .await
            {
                Ok(()) => return Ok(()),
                Err(err) => err,
            };
            let node = match &err {
                RouterError::NodeUnavailable { node, .. }
                | RouterError::Protocol { node, .. }
                | RouterError::KvTimeout { node, .. } => node.clone(),
                _ => return Err(err),
            };
            if attempt == MAX_ATTEMPTS as u32 || Instant::now() >= self.deadline {
                return Err(err);
            }
            warn!(
                %node,
                attempt,
                generated = progress.sent.len(),
                "node failed mid-request; re-running the request elsewhere: {err}"
            );
            let reason = if err.blames_node().is_some() {
                self.relay.nodes.mark_failed(&node);
                "node_failure"
            } else {
                "kv_timeout"
            };
            metrics::counter!(names::ROUTER_RERUNS_TOTAL, names::REASON => reason).increment(1);
            failed.push(node);
            if progress.sent.len() >= self.req.max_tokens as usize {
                // Every token was delivered; only the Finished message was lost.
                return self.finish_here(progress).await;
            }
        }
        unreachable!("the last attempt returns")
    }

    /// Ends a request whose node failed after its last token.
    async fn finish_here(&self, progress: &mut Progress) -> Result<(), RouterError> {
        progress.finish = Some(finish_label(pb::FinishReason::Length as i32));
        let finished = pb::Finished {
            reason: pb::FinishReason::Length as i32,
            usage: Some(pb::Usage {
                prompt_tokens: self.req.prompt.len() as u32,
                completion_tokens: progress.sent.len() as u32,
                cached_tokens: 0,
            }),
            ..Default::default()
        };
        self.send_finished(finished, progress).await
    }

    async fn send_finished(
        &self,
        mut finished: pb::Finished,
        progress: &Progress,
    ) -> Result<(), RouterError> {
        let now = Instant::now();
        let since = |t: Instant| t.duration_since(self.arrival).as_secs_f64();
        finished.timings = Some(pb::Timings {
            queue_seconds: since(progress.admitted_at.unwrap_or(now)),
            time_to_first_token_seconds: since(progress.first_token_at.unwrap_or(now)),
            total_seconds: since(now),
            spans: Some(progress.spans.points(self.arrival, progress.first_token_at)),
        });
        self.send(ClientEvent::Finished(finished)).await
    }

    /// Fails the attempt when a node holding the request has stopped answering:
    /// no load report for the pool's stale bound, and (for the decode node) no
    /// event on the request's stream for as long.
    fn check_answering(&self, guard: &CancelGuard, last_event: Instant) -> Result<(), RouterError> {
        let nodes = &self.relay.nodes;
        let silent = |addr: &str| RouterError::NodeUnavailable {
            node: addr.into(),
            message: format!(
                "stopped answering (no load report for {:?})",
                nodes.stale_after()
            ),
        };
        if let Some(p) = &guard.prefill
            && nodes.is_stale(&p.addr)
        {
            return Err(silent(&p.addr));
        }
        if let Some(d) = &guard.decode
            && nodes.is_stale(&d.addr)
            && last_event.elapsed() >= nodes.stale_after()
        {
            return Err(silent(&d.addr));
        }
        Ok(())
    }

    /// Runs `fut` unless shutdown, the client leaving or the deadline comes first.
    async fn watch<T>(
        &self,
        fut: impl Future<Output = Result<T, RouterError>>,
    ) -> Result<T, RouterError> {
        tokio::select! {
            _ = self.relay.shutdown.cancelled() => Err(RouterError::ShuttingDown),
            _ = self.tx.closed() => Err(RouterError::ClientGone),
            _ = tokio::time::sleep_until(self.deadline) => Err(self.deadline_exceeded()),
            r = fut => r,
        }
    }

    /// Sends one event to the client, waiting no later than the deadline.
    async fn send(&self, event: ClientEvent) -> Result<(), RouterError> {
        let response = pb::GenerateResponse {
            event: Some(event),
            index: 0,
        };
        match tokio::time::timeout_at(self.deadline, self.tx.send(Ok(response))).await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(_closed)) => Err(RouterError::ClientGone),
            Err(_elapsed) => Err(self.deadline_exceeded()),
        }
    }

    fn deadline_exceeded(&self) -> RouterError {
        RouterError::DeadlineExceeded {
            timeout_s: self.relay.request_timeout_s,
        }
    }

    fn protocol(&self, node: &NodeHandle, what: &str) -> RouterError {
        RouterError::Protocol {
            node: node.addr.clone(),
            message: format!("sent {what}"),
        }
    }
}
