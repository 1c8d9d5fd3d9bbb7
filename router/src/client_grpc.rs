//! What the router's gRPC port shows clients: the `Generate` service, whose
//! malformed requests are the client's fault, and server reflection over the
//! client-facing descriptors only.
//!
//! tonic decodes a request before any handler runs, and reports every failure
//! of that step (a protobuf that does not parse, such as a `string` field
//! holding invalid UTF-8 or a message cut short; a gRPC frame cut short; no
//! message at all) as `INTERNAL`, a code that tells a client the server is
//! broken. [`ClientGenerateServer`] wraps the generated server and turns an
//! `INTERNAL` answer given before the handler saw the request into
//! `INVALID_ARGUMENT`, keeping tonic's message, which names the problem.
//! Failures after decoding keep their code.
//!
//! Reflection registers `generate.proto` (and health's descriptors) but not
//! `internal.proto`, so the nodes' `DecodeNode` and `PrefillNode` services,
//! which the router's port does not serve, are not listed; it answers both
//! `grpc.reflection.v1` and `v1alpha` (grpcio's and older grpcurl's clients
//! speak only v1alpha).

use std::convert::Infallible;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use prost::Message;
use tandem_proto::v1::generate_server::GenerateServer;
use tonic::body::Body;
use tonic::codegen::{BoxFuture, Context, Poll, Service, http};
use tonic::server::NamedService;
use tonic::{Code, Status};

use crate::error::RouterError;
use crate::service::GenerateService;

/// The one `.proto` file of the client-facing API.
pub const CLIENT_PROTO: &str = "tandem/v1/generate.proto";

/// Marks, in a request's extensions, that the handler received it decoded.
#[derive(Clone, Default)]
pub struct RequestDecoded(Arc<AtomicBool>);

impl RequestDecoded {
    /// Called by the handler: the request reached it.
    pub fn mark(&self) {
        self.0.store(true, Ordering::Relaxed);
    }

    fn seen(&self) -> bool {
        self.0.load(Ordering::Relaxed)
    }
}

/// The `Generate` server, answering undecodable requests with `INVALID_ARGUMENT`.
#[derive(Clone)]
pub struct ClientGenerateServer {
    inner: GenerateServer<GenerateService>,
}

impl ClientGenerateServer {
    /// Wraps `inner` (configured already, e.g. with its message size limit).
    pub fn new(inner: GenerateServer<GenerateService>) -> Self {
        ClientGenerateServer { inner }
    }
}

impl NamedService for ClientGenerateServer {
    const NAME: &'static str = <GenerateServer<GenerateService> as NamedService>::NAME;
}

impl Service<http::Request<Body>> for ClientGenerateServer {
    type Response = http::Response<Body>;
    type Error = Infallible;
    type Future = BoxFuture<Self::Response, Self::Error>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Service::<http::Request<Body>>::poll_ready(&mut self.inner, cx)
    }

    fn call(&mut self, mut req: http::Request<Body>) -> Self::Future {
        let decoded = RequestDecoded::default();
        req.extensions_mut().insert(decoded.clone());
        let answer = self.inner.call(req);
        Box::pin(async move {
            let response = answer.await?;
            Ok(match Status::from_header_map(response.headers()) {
                Some(status) if status.code() == Code::Internal && !decoded.seen() => {
                    Status::invalid_argument(format!(
                        "malformed GenerateRequest: {}",
                        status.message()
                    ))
                    .into_http()
                }
                _ => response,
            })
        })
    }
}

/// The descriptors reflection serves on the router's port: `generate.proto`
/// only, out of every `tandem.v1` file.
pub fn client_descriptors() -> Result<prost_types::FileDescriptorSet, RouterError> {
    let mut set = prost_types::FileDescriptorSet::decode(tandem_proto::FILE_DESCRIPTOR_SET)
        .map_err(|e| RouterError::Reflection(e.to_string()))?;
    set.file.retain(|f| f.name() == CLIENT_PROTO);
    if set.file.is_empty() {
        return Err(RouterError::Reflection(format!(
            "{CLIENT_PROTO} is missing from the descriptor set"
        )));
    }
    Ok(set)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_the_client_facing_file_is_served() {
        let set = client_descriptors().unwrap();
        let services: Vec<&str> = set
            .file
            .iter()
            .flat_map(|f| f.service.iter().map(|s| s.name()))
            .collect();
        assert_eq!(services, ["Generate"]);
    }
}
