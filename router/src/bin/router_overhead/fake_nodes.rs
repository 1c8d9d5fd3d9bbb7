//! Decode and prefill nodes that answer at once, for measuring the router alone.
//!
//! The fake decode node admits every request, for remote prefill unless told
//! otherwise, and streams `tokens` token messages and `Finished` as soon as
//! the request's prefill has happened (at once for local prefill). The fake
//! prefill node answers `Prefill` at once and tells the decode node, as the
//! KV transfer's final frame would. Both report an idle load.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tandem_proto::v1 as pb;
use tandem_proto::v1::decode_node_server::{DecodeNode, DecodeNodeServer};
use tandem_proto::v1::decode_response::Event as E;
use tandem_proto::v1::prefill_node_server::{PrefillNode, PrefillNodeServer};
use tokio::net::TcpListener;
use tokio::sync::{mpsc, oneshot};
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;
use tonic::transport::Server;
use tonic::transport::server::TcpIncoming;
use tonic::{Request, Response, Status};

/// Requests waiting for their prefill, by request id.
type Waiting = Arc<Mutex<HashMap<String, oneshot::Sender<u32>>>>;

#[derive(Clone)]
struct FakeDecode {
    waiting: Waiting,
    tokens: u32,
    local_prefill: bool,
}

#[derive(Clone)]
struct FakePrefill {
    waiting: Waiting,
}

fn idle_load(role: &str) -> ReceiverStream<Result<pb::NodeLoad, Status>> {
    let (tx, rx) = mpsc::channel(1);
    let load = pb::NodeLoad {
        node_id: format!("fake-{role}"),
        role: match role {
            "prefill" => pb::Role::Prefill,
            _ => pb::Role::Decode,
        }
        .into(),
        kv_blocks_total: 1 << 20,
        kv_blocks_free: 1 << 20,
        ..Default::default()
    };
    tokio::spawn(async move {
        while tx.send(Ok(load.clone())).await.is_ok() {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    });
    ReceiverStream::new(rx)
}

#[tonic::async_trait]
impl DecodeNode for FakeDecode {
    type DecodeStream = ReceiverStream<Result<pb::DecodeResponse, Status>>;
    type WatchLoadStream = ReceiverStream<Result<pb::NodeLoad, Status>>;

    async fn decode(
        &self,
        request: Request<pb::DecodeRequest>,
    ) -> Result<Response<Self::DecodeStream>, Status> {
        let r = request.into_inner();
        let local = self.local_prefill || r.force_local_prefill;
        let (tx, rx) = mpsc::channel(self.tokens as usize + 2);
        let event = |e| Ok(pb::DecodeResponse { event: Some(e) });
        let prefilled = if local {
            None
        } else {
            let (done, prefilled) = oneshot::channel();
            self.waiting
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .insert(r.request_id.clone(), done);
            Some(prefilled)
        };
        let admitted = pb::Admitted {
            local_prefill: local,
            kv_target: (!local).then(|| pb::KvTarget {
                quic_addr: "127.0.0.1:9".into(),
                transfer_id: 1,
                ..Default::default()
            }),
        };
        // Room for every message: these sends never wait.
        let _ = tx.try_send(event(E::Admitted(admitted)));
        let tokens = self.tokens;
        tokio::spawn(async move {
            let first = match prefilled {
                Some(rx) => match rx.await {
                    Ok(t) => t,
                    Err(_) => return,
                },
                None => 1,
            };
            for i in 0..tokens {
                let chunk = pb::TokenChunk {
                    ids: vec![first + i],
                    text: "x".into(),
                    logprobs: Vec::new(),
                    prompt_tokens: 0,
                };
                let _ = tx.try_send(event(E::Token(chunk)));
            }
            let finished = pb::Finished {
                reason: pb::FinishReason::Length as i32,
                usage: Some(pb::Usage {
                    prompt_tokens: r.prompt.len() as u32,
                    completion_tokens: tokens,
                    cached_tokens: 0,
                }),
                ..Default::default()
            };
            let _ = tx.try_send(event(E::Finished(finished)));
        });
        Ok(Response::new(ReceiverStream::new(rx)))
    }

    async fn cancel(
        &self,
        _request: Request<pb::CancelRequest>,
    ) -> Result<Response<pb::CancelResponse>, Status> {
        Ok(Response::new(pb::CancelResponse { found: false }))
    }

    async fn watch_load(
        &self,
        _request: Request<pb::WatchLoadRequest>,
    ) -> Result<Response<Self::WatchLoadStream>, Status> {
        Ok(Response::new(idle_load("decode")))
    }
}

#[tonic::async_trait]
impl PrefillNode for FakePrefill {
    type WatchLoadStream = ReceiverStream<Result<pb::NodeLoad, Status>>;

    async fn prefill(
        &self,
        request: Request<pb::PrefillRequest>,
    ) -> Result<Response<pb::PrefillResponse>, Status> {
        let id = request.into_inner().request_id;
        let waiter = self
            .waiting
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&id);
        let Some(waiter) = waiter else {
            return Err(Status::failed_precondition(format!(
                "no decode reservation for {id}"
            )));
        };
        let _ = waiter.send(1);
        Ok(Response::new(pb::PrefillResponse {
            first_token: 1,
            ..Default::default()
        }))
    }

    async fn cancel(
        &self,
        _request: Request<pb::CancelRequest>,
    ) -> Result<Response<pb::CancelResponse>, Status> {
        Ok(Response::new(pb::CancelResponse { found: false }))
    }

    async fn watch_load(
        &self,
        _request: Request<pb::WatchLoadRequest>,
    ) -> Result<Response<Self::WatchLoadStream>, Status> {
        Ok(Response::new(idle_load("prefill")))
    }
}

/// The two fake nodes' gRPC addresses.
pub struct FakeNodes {
    /// The decode node.
    pub decode: SocketAddr,
    /// The prefill node.
    pub prefill: SocketAddr,
}

/// Starts both fakes on loopback until `shutdown` fires.
pub async fn start(
    tokens: u32,
    local_prefill: bool,
    shutdown: &CancellationToken,
) -> std::io::Result<FakeNodes> {
    let waiting = Waiting::default();
    let decode = TcpListener::bind("127.0.0.1:0").await?;
    let prefill = TcpListener::bind("127.0.0.1:0").await?;
    let nodes = FakeNodes {
        decode: decode.local_addr()?,
        prefill: prefill.local_addr()?,
    };
    tokio::spawn(
        Server::builder()
            .add_service(DecodeNodeServer::new(FakeDecode {
                waiting: waiting.clone(),
                tokens,
                local_prefill,
            }))
            .serve_with_incoming_shutdown(
                TcpIncoming::from(decode).with_nodelay(Some(true)),
                shutdown.clone().cancelled_owned(),
            ),
    );
    tokio::spawn(
        Server::builder()
            .add_service(PrefillNodeServer::new(FakePrefill { waiting }))
            .serve_with_incoming_shutdown(
                TcpIncoming::from(prefill).with_nodelay(Some(true)),
                shutdown.clone().cancelled_owned(),
            ),
    );
    Ok(nodes)
}
