//! Cross-origin requests to the HTTP API, as vLLM's server allows them
//! (`--allowed-origins`, every origin by default, no credentials): a page
//! served from an allowed origin may call the API from a browser.
//!
//! A preflight (`OPTIONS` with `Origin` and `Access-Control-Request-Method`)
//! is answered here, before routing and API keys, as Starlette's
//! `CORSMiddleware` answers it for vLLM: 200 with the methods, the headers
//! asked for and a max age of 600 s, or 400 for an origin not allowed. Any
//! other request from an allowed origin gets `Access-Control-Allow-Origin` on
//! its answer. With no origin allowed (`router.http_allowed_origins = []`)
//! nothing is added, and browsers refuse cross-origin answers.

use std::sync::Arc;

use axum::extract::{Request, State};
use axum::http::{HeaderMap, HeaderValue, Method, StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};

/// The methods a preflight allows (Starlette's list for `allow_methods=["*"]`).
const METHODS: &str = "DELETE, GET, HEAD, OPTIONS, PATCH, POST, PUT";
/// How long a browser may keep a preflight's answer, in seconds.
const MAX_AGE: &str = "600";

/// The origins allowed to call the API.
#[derive(Debug, Clone)]
pub struct Cors {
    any: bool,
    origins: Vec<String>,
}

impl Cors {
    /// From `router.http_allowed_origins`: `"*"` allows every origin.
    pub fn new(allowed: &[String]) -> Self {
        Cors {
            any: allowed.iter().any(|o| o == "*"),
            origins: allowed.iter().filter(|o| *o != "*").cloned().collect(),
        }
    }

    fn enabled(&self) -> bool {
        self.any || !self.origins.is_empty()
    }

    /// The `Access-Control-Allow-Origin` for a request from `origin`, if allowed.
    fn allow_origin(&self, origin: &HeaderValue) -> Option<HeaderValue> {
        if self.any {
            return Some(HeaderValue::from_static("*"));
        }
        let o = origin.to_str().ok()?;
        self.origins
            .iter()
            .any(|allowed| allowed == o)
            .then(|| origin.clone())
    }
}

/// The middleware: answers preflights, marks answers to allowed origins.
pub async fn layer(State(cors): State<Arc<Cors>>, request: Request, next: Next) -> Response {
    if !cors.enabled() {
        return next.run(request).await;
    }
    let Some(origin) = request.headers().get(header::ORIGIN).cloned() else {
        return next.run(request).await;
    };
    let allowed = cors.allow_origin(&origin);
    let preflight = request.method() == Method::OPTIONS
        && request
            .headers()
            .contains_key(header::ACCESS_CONTROL_REQUEST_METHOD);
    if preflight {
        return preflight_answer(allowed, request.headers());
    }
    let mut response = next.run(request).await;
    if let Some(value) = allowed {
        mark(response.headers_mut(), value);
    }
    response
}

fn preflight_answer(allowed: Option<HeaderValue>, asked: &HeaderMap) -> Response {
    let Some(value) = allowed else {
        return (StatusCode::BAD_REQUEST, "Disallowed CORS origin").into_response();
    };
    let mut response = (StatusCode::OK, "OK").into_response();
    let headers = response.headers_mut();
    mark(headers, value);
    headers.insert(
        header::ACCESS_CONTROL_ALLOW_METHODS,
        HeaderValue::from_static(METHODS),
    );
    headers.insert(
        header::ACCESS_CONTROL_MAX_AGE,
        HeaderValue::from_static(MAX_AGE),
    );
    // Every header is allowed: the ones asked for, echoed.
    if let Some(h) = asked.get(header::ACCESS_CONTROL_REQUEST_HEADERS) {
        headers.insert(header::ACCESS_CONTROL_ALLOW_HEADERS, h.clone());
    }
    response
}

fn mark(headers: &mut HeaderMap, allow_origin: HeaderValue) {
    let specific = allow_origin != "*";
    headers.insert(header::ACCESS_CONTROL_ALLOW_ORIGIN, allow_origin);
    if specific {
        // The answer depends on the origin: caches must key on it.
        headers.append(header::VARY, HeaderValue::from_static("Origin"));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn origins_are_allowed_by_list_or_all() {
        let site = HeaderValue::from_static("https://app.example");
        let other = HeaderValue::from_static("https://evil.example");
        let all = Cors::new(&["*".into()]);
        assert_eq!(
            all.allow_origin(&other),
            Some(HeaderValue::from_static("*"))
        );
        let listed = Cors::new(&["https://app.example".into()]);
        assert_eq!(listed.allow_origin(&site), Some(site.clone()));
        assert_eq!(listed.allow_origin(&other), None);
        let none = Cors::new(&[]);
        assert!(!none.enabled());
        assert_eq!(none.allow_origin(&site), None);
    }
}
