//! The `Generate` gRPC service: validate, admit, then hand the request to
//! its own task ([`crate::generate`]) that streams the responses back.
//!
//! Validation and admission errors are the RPC's own status; anything later
//! ends the response stream with an error status.

use std::sync::Arc;
use std::time::Duration;

use tandem_cluster::{GrpcTls, Membership, RouterSection};
use tandem_engine::ModelDir;
use tandem_proto::v1 as pb;
use tandem_proto::v1::generate_server::{Generate, GenerateServer};
use tokio::sync::{mpsc, watch};
use tokio::time::Instant;
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;
use tonic::{Request, Response, Status};
use tracing::Instrument;

use crate::admission::{Admission, Admitted};
use crate::auth::ClientAuth;
use crate::client_grpc::RequestDecoded;
use crate::error::RouterError;
use crate::generate::Relay;
use crate::nodes::NodePool;
use crate::request_metrics::request_ended;
use crate::routing::RoutingConfig;
use crate::validation::{ValidRequest, Validator};

/// The gRPC metadata key (and HTTP header) of a client-chosen request id,
/// used when `GenerateRequest.request_id` is empty.
pub const REQUEST_ID_HEADER: &str = "x-request-id";

/// Responses buffered per client before the router waits for it to read.
const CLIENT_BUFFER: usize = 64;

/// The router's `Generate` service.
pub struct GenerateService {
    auth: ClientAuth,
    validator: Validator,
    admission: Admission,
    relay: Arc<Relay>,
    request_timeout: Duration,
    /// Whether the membership has been read once (see [`Membership::ready`]).
    ready: watch::Receiver<bool>,
}

impl GenerateService {
    /// A service for `model` over the nodes of `membership`; starts following
    /// the membership at once (call inside a tokio runtime). Background tasks
    /// end when `shutdown` fires. With `config.tls`, every node is dialed
    /// over mutual TLS; its files are read here.
    pub fn new(
        model: Arc<ModelDir>,
        model_name: Option<String>,
        config: &RouterSection,
        membership: Arc<dyn Membership>,
        shutdown: CancellationToken,
    ) -> Result<Self, RouterError> {
        let tls = config.tls.as_ref().map(GrpcTls::load).transpose()?;
        let ready = membership.ready();
        let nodes = NodePool::start(
            membership,
            config.load_interval_ms,
            tls,
            RoutingConfig::from(config),
            shutdown.clone(),
        );
        Ok(GenerateService {
            auth: ClientAuth::new(config),
            validator: Validator::new(model, model_name, config),
            admission: Admission::new(config.max_running, config.max_queue),
            relay: Arc::new(Relay {
                nodes,
                kv_timeout_ms: config.kv_timeout_ms,
                request_timeout_s: config.request_timeout_s,
                shutdown,
            }),
            request_timeout: Duration::try_from_secs_f64(config.request_timeout_s)
                .unwrap_or(Duration::MAX),
            ready,
        })
    }

    /// The tonic server wrapping this service.
    pub fn into_server(self) -> GenerateServer<Self> {
        GenerateServer::new(self)
    }

    /// The API keys and rate limits.
    pub fn auth(&self) -> &ClientAuth {
        &self.auth
    }

    /// Whether the router has read the membership once and serves requests.
    pub fn is_ready(&self) -> bool {
        *self.ready.borrow()
    }

    /// Follows [`GenerateService::is_ready`] (for health reporting).
    pub fn ready(&self) -> watch::Receiver<bool> {
        self.ready.clone()
    }
}

#[tonic::async_trait]
impl Generate for GenerateService {
    type GenerateStream = ReceiverStream<Result<pb::GenerateResponse, Status>>;

    async fn generate(
        &self,
        request: Request<pb::GenerateRequest>,
    ) -> Result<Response<Self::GenerateStream>, Status> {
        // The request decoded: failures from here on are not malformed input.
        if let Some(decoded) = request.extensions().get::<RequestDecoded>() {
            decoded.mark();
        }
        let arrival = Instant::now();
        let deadline = arrival
            .checked_add(self.request_timeout)
            .unwrap_or_else(|| arrival + Duration::from_secs(86_400 * 365));
        let (req, permit, span) = match self.admit(request, deadline).await {
            Ok(admitted) => admitted,
            Err(err) => {
                tracing::debug!(status = err.status_label(), "request refused: {err}");
                request_ended(err.status_label(), arrival, None);
                return Err(err.into());
            }
        };
        let (tx, rx) = mpsc::channel(CLIENT_BUFFER);
        let relay = self.relay.clone();
        tokio::spawn(
            async move {
                relay.run(req, arrival, deadline, tx).await;
                drop(permit);
            }
            .instrument(span),
        );
        Ok(Response::new(ReceiverStream::new(rx)))
    }
}

impl GenerateService {
    /// Authenticates, validates and admits a request; returns it with its
    /// admission permit and its span.
    async fn admit(
        &self,
        request: Request<pb::GenerateRequest>,
        deadline: Instant,
    ) -> Result<(ValidRequest, Admitted, tracing::Span), RouterError> {
        let key = self.auth.check(request.metadata())?;
        if !self.is_ready() {
            return Err(RouterError::NotReady);
        }
        let header_id = request
            .metadata()
            .get(REQUEST_ID_HEADER)
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned);
        let mut message = request.into_inner();
        if message.request_id.is_empty()
            && let Some(id) = header_id
        {
            message.request_id = id;
        }
        let req = self.validator.validate(message)?;
        self.auth
            .charge_tokens(key, req.prompt.len() as u64 + u64::from(req.max_tokens))?;
        let span = tracing::info_span!("generate", request_id = %req.request_id);
        let permit = self
            .admission
            .admit(deadline, self.relay.request_timeout_s)
            .instrument(span.clone())
            .await?;
        Ok((req, permit, span))
    }
}
