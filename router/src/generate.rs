//! A request's life after admission (see `internal.proto`): reserve at a
//! decode node, start the remote prefill if the decode node asks for one,
//! relay the decode node's tokens to the client, and clean up on every exit.
//!
//! Every way out is covered by a `CancelGuard`: unless a node already
//! finished the request, leaving this module (deadline, client gone, node
//! error, shutdown, even a panic) sends `Cancel` to the nodes still holding
//! it, and dropping the in-flight gRPC calls resets their streams, so both
//! nodes release their KV blocks.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use tandem_cluster::Role;
use tandem_proto::v1 as pb;
use tandem_proto::v1::decode_node_client::DecodeNodeClient;
use tandem_proto::v1::decode_response::Event as DecodeEvent;
use tandem_proto::v1::generate_response::Event as ClientEvent;
use tandem_proto::v1::prefill_node_client::PrefillNodeClient;
use tokio::sync::mpsc;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tonic::Status;
use tonic::codec::Streaming;
use tracing::{debug, warn};

use crate::error::RouterError;
use crate::nodes::{NodeHandle, NodePool};
use crate::validation::ValidRequest;

/// Wait before asking the decode nodes again when all of them are full.
const FULL_BACKOFF: Duration = Duration::from_millis(20);
/// How long a `Cancel` call may take.
const CANCEL_TIMEOUT: Duration = Duration::from_secs(2);
/// How long the router waits to deliver a final error to a slow client.
const ERROR_SEND_TIMEOUT: Duration = Duration::from_secs(1);

/// The stream of responses to one client.
pub type ClientSender = mpsc::Sender<Result<pb::GenerateResponse, Status>>;

/// What a request's life needs from the router.
pub struct Relay {
    /// The cluster's nodes.
    pub nodes: Arc<NodePool>,
    /// How long a decode node waits for KV.
    pub kv_timeout_ms: u32,
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

/// Sends `Cancel` for a request to the nodes still holding it when dropped.
struct CancelGuard {
    request_id: String,
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

/// A reservation at a decode node: its answer and the stream that follows.
struct Reserved {
    node: NodeHandle,
    admitted: pb::Admitted,
    stream: Streaming<pb::DecodeResponse>,
}

type PrefillCall =
    Pin<Box<dyn Future<Output = Result<tonic::Response<pb::PrefillResponse>, Status>> + Send>>;

impl Relay {
    /// Serves `req` to the end, writing its responses to `tx`. The caller
    /// holds the request's admission permit for as long as this runs.
    pub async fn run(
        &self,
        req: ValidRequest,
        arrival: Instant,
        deadline: Instant,
        tx: ClientSender,
    ) {
        let request = Request {
            relay: self,
            req: &req,
            arrival,
            deadline,
            tx: &tx,
        };
        match request.serve().await {
            Ok(()) => debug!("finished"),
            Err(RouterError::ClientGone) => debug!("client went away; cancelled"),
            Err(err) => {
                warn!("request failed: {err}");
                let _ = tokio::time::timeout(ERROR_SEND_TIMEOUT, tx.send(Err(err.into()))).await;
            }
        }
    }
}

impl Request<'_> {
    async fn serve(&self) -> Result<(), RouterError> {
        let mut guard = CancelGuard {
            request_id: self.req.request_id.clone(),
            decode: None,
            prefill: None,
        };
        let Reserved {
            node: decode,
            admitted,
            mut stream,
        } = self.reserve(&mut guard).await?;
        let admitted_at = Instant::now();
        debug!(node = %decode.addr, local_prefill = admitted.local_prefill, "admitted");

        let mut prefill: Option<PrefillCall> = None;
        if !admitted.local_prefill {
            let target = admitted.kv_target.ok_or_else(|| RouterError::Protocol {
                node: decode.addr.clone(),
                message: "Admitted for remote prefill without a kv_target".into(),
            })?;
            let node = self
                .relay
                .nodes
                .ranked(Role::Prefill)
                .into_iter()
                .next()
                .ok_or(RouterError::NoNode("prefill"))?;
            debug!(node = %node.addr, "prefill");
            self.relay
                .nodes
                .note_assigned(&node.addr, self.req.prompt.len());
            let mut client = PrefillNodeClient::new(node.channel.clone());
            let request = pb::PrefillRequest {
                request_id: self.req.request_id.clone(),
                prompt: self.req.prompt.clone(),
                sampling: Some(self.req.sampling),
                kv_target: Some(target),
            };
            guard.prefill = Some(node);
            prefill = Some(Box::pin(async move { client.prefill(request).await }));
        }

        let mut first_token_at = None;
        loop {
            let prefill_done = async {
                match prefill.as_mut() {
                    Some(call) => call.await,
                    None => std::future::pending().await,
                }
            };
            let next = tokio::select! {
                _ = self.relay.shutdown.cancelled() => return Err(RouterError::ShuttingDown),
                _ = self.tx.closed() => return Err(RouterError::ClientGone),
                _ = tokio::time::sleep_until(self.deadline) => return Err(self.deadline_exceeded()),
                result = prefill_done => {
                    prefill = None;
                    // The prefill node is done with the request either way.
                    let node = guard.prefill.take();
                    match result {
                        Ok(r) => {
                            let r = r.into_inner();
                            debug!(
                                first_token = r.first_token,
                                queue_s = r.queue_seconds,
                                compute_s = r.compute_seconds,
                                kv_bytes = r.kv_bytes_sent,
                                "prefilled"
                            );
                            continue;
                        }
                        Err(status) => {
                            let addr = node.map(|n| n.addr).unwrap_or_default();
                            return Err(RouterError::from_node_status(&addr, &status));
                        }
                    }
                }
                next = stream.message() => next,
            };
            let event = match next {
                Ok(Some(pb::DecodeResponse { event: Some(e) })) => e,
                Ok(Some(pb::DecodeResponse { event: None })) => {
                    return Err(self.protocol(&decode, "a response without an event"));
                }
                Ok(None) => {
                    return Err(RouterError::NodeUnavailable {
                        node: decode.addr.clone(),
                        message: "the decode stream ended before Finished".into(),
                    });
                }
                Err(status) => return Err(RouterError::from_node_status(&decode.addr, &status)),
            };
            match event {
                DecodeEvent::Token(chunk) => {
                    first_token_at.get_or_insert_with(Instant::now);
                    self.send(ClientEvent::Token(chunk)).await?;
                }
                DecodeEvent::Finished(mut finished) => {
                    // The decode node has released the request.
                    guard.decode = None;
                    let now = Instant::now();
                    let since = |t: Instant| t.duration_since(self.arrival).as_secs_f64();
                    finished.timings = Some(pb::Timings {
                        queue_seconds: since(admitted_at),
                        time_to_first_token_seconds: since(first_token_at.unwrap_or(now)),
                        total_seconds: since(now),
                    });
                    self.send(ClientEvent::Finished(finished)).await?;
                    return Ok(());
                }
                DecodeEvent::Admitted(_) => {
                    return Err(self.protocol(&decode, "a second Admitted"));
                }
            }
        }
    }

    /// Reserves the request at a decode node: the best one first, then the
    /// others; when all are full, waits briefly and asks again until the deadline.
    async fn reserve(&self, guard: &mut CancelGuard) -> Result<Reserved, RouterError> {
        let nodes = &self.relay.nodes;
        loop {
            let ranked = nodes.ranked(Role::Decode);
            if ranked.is_empty() {
                return Err(RouterError::NoNode("decode"));
            }
            let request = pb::DecodeRequest {
                request_id: self.req.request_id.clone(),
                prompt: self.req.prompt.clone(),
                sampling: Some(self.req.sampling),
                max_tokens: self.req.max_tokens,
                stop: self.req.stop.clone(),
                stop_token_ids: self.req.stop_token_ids.clone(),
                ignore_eos: self.req.ignore_eos,
                kv_timeout_ms: self.relay.kv_timeout_ms,
                force_local_prefill: !nodes.has(Role::Prefill),
            };
            let mut full = None;
            let mut failed = None;
            for node in ranked {
                guard.decode = Some(node.clone());
                match self.watch(self.try_decode(&node, request.clone())).await {
                    Ok(reserved) => {
                        nodes.note_assigned(&node.addr, self.req.prompt.len());
                        return Ok(reserved);
                    }
                    Err(err) => {
                        // The node answered: it holds nothing for the request.
                        guard.decode = None;
                        match err {
                            RouterError::NodeExhausted { .. } => full = Some(err),
                            RouterError::NodeUnavailable { .. } | RouterError::Protocol { .. } => {
                                warn!(node = %node.addr, "decode node failed, trying another: {err}");
                                failed = Some(err);
                            }
                            other => return Err(other),
                        }
                    }
                }
            }
            let Some(full) = full else {
                return Err(failed.unwrap_or(RouterError::NoNode("decode")));
            };
            debug!("every decode node is full: {full}");
            if Instant::now() + FULL_BACKOFF >= self.deadline {
                return Err(self.deadline_exceeded());
            }
            self.watch(async {
                tokio::time::sleep(FULL_BACKOFF).await;
                Ok(())
            })
            .await?;
        }
    }

    /// Calls `Decode` on one node and reads its first answer.
    async fn try_decode(
        &self,
        node: &NodeHandle,
        request: pb::DecodeRequest,
    ) -> Result<Reserved, RouterError> {
        let mut client = DecodeNodeClient::new(node.channel.clone());
        let mut stream = client
            .decode(request)
            .await
            .map_err(|s| RouterError::from_node_status(&node.addr, &s))?
            .into_inner();
        match stream.message().await {
            Ok(Some(pb::DecodeResponse {
                event: Some(DecodeEvent::Admitted(admitted)),
            })) => Ok(Reserved {
                node: node.clone(),
                admitted,
                stream,
            }),
            Ok(Some(_)) => Err(self.protocol(node, "a Decode stream not starting with Admitted")),
            Ok(None) => Err(RouterError::NodeUnavailable {
                node: node.addr.clone(),
                message: "the decode stream ended before Admitted".into(),
            }),
            Err(s) => Err(RouterError::from_node_status(&node.addr, &s)),
        }
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
        let response = pb::GenerateResponse { event: Some(event) };
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
