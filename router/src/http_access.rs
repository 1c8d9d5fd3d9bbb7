//! The HTTP API's access record: every answer counted by route and status
//! code (`tandem_http_requests_total`), and every refusal logged with the
//! message its client got, as vLLM's server logs each request and counts it
//! in `http_requests_total`.
//!
//! A request that reaches a node is logged again when it ends (the router's
//! `request finished` line, with its tokens and timings) and counted in
//! `tandem_requests_total`; a body the API refuses before that (a malformed
//! field, an unknown model, a missing key) shows only here.

use axum::extract::{MatchedPath, Request};
use axum::http::StatusCode;
use axum::middleware::Next;
use axum::response::Response;
use tandem_telemetry::names;
use tracing::{info, warn};

/// The message of an error answer, put in the response's extensions by
/// whoever made it (the OpenAI error body) so the access log can say it.
#[derive(Debug, Clone)]
pub struct Refusal(pub String);

/// The `endpoint` label of a request no route matched.
const UNMATCHED: &str = "unmatched";

/// The middleware: counts the answer and logs it unless it succeeded. Added
/// with `Router::layer`, so it runs after routing and sees the route's
/// template (`/v1/models/{model}`), never the raw path, as its label.
pub async fn layer(request: Request, next: Next) -> Response {
    let endpoint = request
        .extensions()
        .get::<MatchedPath>()
        .map_or(UNMATCHED, MatchedPath::as_str)
        .to_owned();
    let method = request.method().clone();
    let response = next.run(request).await;
    let status = response.status();
    metrics::counter!(
        names::HTTP_REQUESTS_TOTAL,
        names::ENDPOINT => endpoint.clone(),
        names::CODE => status.as_str().to_owned()
    )
    .increment(1);
    if !status.is_success() {
        let message = response
            .extensions()
            .get::<Refusal>()
            .map_or("", |r| r.0.as_str());
        let code = status.as_u16();
        if server_fault(status) {
            warn!(%method, endpoint, code, error = message, "HTTP request failed");
        } else {
            info!(%method, endpoint, code, error = message, "HTTP request refused");
        }
    }
    response
}

/// Whether an answer is the server's fault (worth a warning), not the
/// client's or the cluster's load (overloaded, no node up yet, a deadline).
fn server_fault(code: StatusCode) -> bool {
    code.is_server_error()
        && code != StatusCode::SERVICE_UNAVAILABLE
        && code != StatusCode::GATEWAY_TIMEOUT
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_internal_errors_are_the_servers_fault() {
        assert!(server_fault(StatusCode::INTERNAL_SERVER_ERROR));
        for code in [
            StatusCode::SERVICE_UNAVAILABLE,
            StatusCode::GATEWAY_TIMEOUT,
            StatusCode::BAD_REQUEST,
            StatusCode::TOO_MANY_REQUESTS,
            StatusCode::OK,
        ] {
            assert!(!server_fault(code), "{code}");
        }
    }
}
