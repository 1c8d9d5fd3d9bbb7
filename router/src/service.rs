//! The `Generate` gRPC service: validate, admit, then hand the request to
//! its own task ([`crate::generate`]) that streams the responses back.
//!
//! Validation and admission errors are the RPC's own status; anything later
//! ends the response stream with an error status.
//!
//! Besides the admission gate's bounds, a request is refused
//! (RESOURCE_EXHAUSTED, retry-after) while the prefill nodes' queued prompts,
//! plus those of the requests admitted but not yet given to a prefill node
//! (waiting at the gate or just past it), would take longer than
//! `max_prefill_backlog_s` at the nodes' measured rate: refusing at the door
//! keeps the admitted requests' KV waits from expiring. A prompt shorter than
//! every decode node's `local_prefill_below` is not refused: a decode node
//! prefills it, and it waits in no prefill queue.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use crate::backlog::PendingTokens;
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
use crate::auth::{ClientAuth, KeyId, Reservation};
use crate::breaker::BreakerConfig;
use crate::client_grpc::RequestDecoded;
use crate::drain::Drain;
use crate::error::RouterError;
use crate::generate::Relay;
use crate::identity::Identity;
use crate::nodes::NodePool;
use crate::prepaid::Prepaid;
use crate::request_metrics::request_ended;
use crate::routing::RoutingConfig;
use crate::usage;
use crate::validation::{ValidRequest, Validator};

/// The gRPC metadata key (and HTTP header) of a client-chosen request id,
/// used when `GenerateRequest.request_id` is empty.
pub const REQUEST_ID_HEADER: &str = "x-request-id";

/// Responses buffered per client before the router waits for it to read.
const CLIENT_BUFFER: usize = 64;

/// What a request reserves from its key's tokens per minute: its prompt and
/// the most it may generate.
fn reservation(req: &ValidRequest) -> u64 {
    req.prompt.len() as u64 + u64::from(req.max_tokens) * u64::from(req.n)
}

/// The router's `Generate` service.
pub struct GenerateService {
    auth: Arc<ClientAuth>,
    validator: Validator,
    admission: Admission,
    relay: Arc<Relay>,
    request_timeout: Duration,
    /// Whether the membership has been read once (see [`Membership::ready`]).
    ready: watch::Receiver<bool>,
    /// Admission on or off, and the admitted requests still running.
    drain: Arc<Drain>,
    /// `router.max_prefill_backlog_s`; 0: no backlog check.
    max_prefill_backlog_s: f64,
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
        let breakers = BreakerConfig {
            failures: config.breaker_failures,
            open: Duration::from_millis(u64::from(config.breaker_open_ms)),
            probes: config.breaker_probes,
        };
        for reason in ["node_failure", "kv_timeout"] {
            // Registered at zero, so the series exist before a first re-run.
            metrics::counter!(tandem_telemetry::names::ROUTER_RERUNS_TOTAL, tandem_telemetry::names::REASON => reason)
                .increment(0);
        }
        let nodes = NodePool::start_with(
            membership,
            config.load_interval_ms,
            tls,
            Identity::new(config.model_fingerprint),
            breakers,
            RoutingConfig::from(config),
            shutdown.clone(),
        );
        Ok(GenerateService {
            auth: {
                let auth = ClientAuth::new(config);
                usage::register(&auth);
                Arc::new(auth)
            },
            validator: Validator::new(model, model_name, config),
            admission: Admission::new(config.max_running, config.max_queue),
            relay: Arc::new(Relay {
                nodes,
                kv_timeout_ms: config.kv_timeout_ms,
                kv_timeout_max_ms: config.kv_timeout_max_ms,
                pending_prefill: Arc::new(AtomicU64::new(0)),
                request_timeout_s: config.request_timeout_s,
                shutdown,
            }),
            request_timeout: Duration::try_from_secs_f64(config.request_timeout_s)
                .unwrap_or(Duration::MAX),
            ready,
            drain: Drain::new(),
            max_prefill_backlog_s: config.max_prefill_backlog_s,
        })
    }

    /// The most samples (`n`, `best_of`) one request may ask for (`router.max_n`).
    pub fn max_n(&self) -> u32 {
        self.validator.max_n()
    }

    /// How many tokens a prompt of `prompt_len` tokens may generate when
    /// `asked` for (0: the default), as a request's validation decides it
    /// (INVALID_ARGUMENT with the reason otherwise).
    pub fn max_tokens(&self, prompt_len: usize, asked: u32) -> Result<u32, Status> {
        self.validator
            .max_tokens(prompt_len, asked)
            .map_err(Status::from)
    }

    /// Whether `model` (empty: any) names the served model; NOT_FOUND naming
    /// the served one otherwise.
    pub fn check_model(&self, model: &str) -> Result<(), Status> {
        self.validator.check_model(model).map_err(Status::from)
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

    /// The service's drain state (see [`crate::drain`]).
    pub fn drain(&self) -> Arc<Drain> {
        self.drain.clone()
    }

    /// The router's view of the cluster's nodes (their load, breakers and
    /// cached blocks as this router knows them).
    pub fn nodes(&self) -> Arc<NodePool> {
        self.relay.nodes.clone()
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
        let admitted = match self.drain.enter() {
            Some(in_flight) => self.admit(request, deadline).await.map(|a| (a, in_flight)),
            None => Err(RouterError::ShuttingDown),
        };
        let ((req, permit, pending, span, reservation), in_flight) = match admitted {
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
                let tokens = relay.run_samples(req, arrival, deadline, tx, pending).await;
                drop(permit);
                // The quota keeps what was used: the prompt and the tokens
                // sent, if the request reached a node; nothing otherwise.
                if let (Some(t), Some(r)) = (tokens, reservation) {
                    r.settle(t);
                }
                drop(in_flight);
            }
            .instrument(span),
        );
        Ok(Response::new(ReceiverStream::new(rx)))
    }
}

impl GenerateService {
    /// Authenticates, validates and admits a request; returns it with its
    /// admission permit, its count among the pending prefill tokens, its
    /// span and its reservation from its key's quota (none for a call whose
    /// tokens are prepaid). Refusals of an authenticated request count
    /// against its key. A `prepaid` call ([`Prepaid`]) takes from the key
    /// only what its marker leaves to it.
    async fn admit(
        &self,
        request: Request<pb::GenerateRequest>,
        deadline: Instant,
    ) -> Result<
        (
            ValidRequest,
            Admitted,
            PendingTokens,
            tracing::Span,
            Option<Reservation>,
        ),
        RouterError,
    > {
        let prepaid = request.extensions().get::<Prepaid>().copied();
        let key = self.auth.authenticate(request.metadata())?;
        let name = self.auth.name(key);
        if prepaid.is_none() {
            self.count_request(key)?;
        }
        let (req, reservation) = match self.validate(request, key, prepaid) {
            Ok(r) => r,
            Err((e, reason)) => {
                usage::refused(name, reason);
                return Err(e);
            }
        };
        let span = tracing::info_span!("generate", request_id = %req.request_id, key = name);
        let prompt_tokens = req.prompt.len() as u64;
        // A refusal from here on drops the reservation, which gives it back.
        if let Err(e) = self.check_prefill_backlog(prompt_tokens) {
            usage::refused(name, e.status_label());
            return Err(e);
        }
        let pending = PendingTokens::new(self.relay.pending_prefill.clone(), prompt_tokens);
        match self
            .admission
            .admit(deadline, self.relay.request_timeout_s)
            .instrument(span.clone())
            .await
        {
            Ok(permit) => Ok((req, permit, pending, span, reservation)),
            Err(e) => {
                usage::refused(name, e.status_label());
                Err(e)
            }
        }
    }

    /// Checks readiness, validates the request and reserves its tokens from
    /// its key's quota (none for a call whose tokens are `prepaid`); a
    /// refusal comes with its usage reason.
    fn validate(
        &self,
        request: Request<pb::GenerateRequest>,
        key: KeyId,
        prepaid: Option<Prepaid>,
    ) -> Result<(ValidRequest, Option<Reservation>), (RouterError, &'static str)> {
        let with_label = |e: RouterError| {
            let label = e.status_label();
            (e, label)
        };
        if !self.is_ready() {
            return Err(with_label(RouterError::NotReady));
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
        let req = self.validator.validate(message).map_err(with_label)?;
        if prepaid == Some(Prepaid::RequestAndTokens) {
            return Ok((req, None));
        }
        let reserved = self
            .auth
            .reserve(key, reservation(&req))
            .map_err(|e| (e, usage::TOKENS_PER_MIN))?;
        Ok((req, Some(reserved)))
    }

    /// Counts a request against `key` and takes it from the key's requests
    /// per second (a refusal counted too).
    fn count_request(&self, key: KeyId) -> Result<(), RouterError> {
        let name = self.auth.name(key);
        usage::request(name);
        self.auth.take_request(key).inspect_err(|_| {
            usage::refused(name, usage::REQUESTS_PER_S);
        })
    }

    /// Authenticates a request that the HTTP API serves with calls of its own
    /// (a beam search), counts it against its key and reserves `tokens` (its
    /// prompts and the most it may generate) from the key's quota, once: its
    /// calls then carry [`Prepaid::RequestAndTokens`]. Refusals count against
    /// the key as a call's would.
    pub fn prepay(
        &self,
        metadata: &tonic::metadata::MetadataMap,
        tokens: u64,
    ) -> Result<Reservation, RouterError> {
        let key = self.auth.authenticate(metadata)?;
        self.count_request(key)?;
        self.auth.reserve(key, tokens).inspect_err(|_| {
            usage::refused(self.auth.name(key), usage::TOKENS_PER_MIN);
        })
    }

    /// Refuses a request of `prompt_tokens` while the prefill backlog (the
    /// nodes' queues and the prompts pending here) is past the bound.
    fn check_prefill_backlog(&self, prompt_tokens: u64) -> Result<(), RouterError> {
        if self.max_prefill_backlog_s <= 0.0 {
            return Ok(());
        }
        let pending = self.relay.pending_prefill.load(Ordering::Acquire);
        let backlog = self.relay.nodes.prefill_backlog();
        if pending == 0 && backlog.queued_tokens == 0 {
            // Nothing queued ahead: refusing it would shorten no one's wait,
            // however long the prompt itself takes.
            return Ok(());
        }
        if prompt_tokens < self.relay.nodes.local_prefill_below() {
            // A decode node prefills it: it waits in no prefill queue.
            return Ok(());
        }
        match backlog.wait_s(pending.saturating_add(prompt_tokens)) {
            Some(wait_s) if wait_s > self.max_prefill_backlog_s => {
                Err(RouterError::PrefillBacklog {
                    wait_s,
                    limit_s: self.max_prefill_backlog_s,
                })
            }
            _ => Ok(()),
        }
    }
}
