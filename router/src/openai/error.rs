//! Errors in OpenAI's shape: [`ApiError`], its HTTP status and
//! `Retry-After`, the mapping from gRPC status codes, and the
//! `{"error": {"message", "type", "param", "code"}}` body.

use super::*;

/// An error in OpenAI's shape.
#[derive(Debug)]
pub(super) struct ApiError {
    pub(super) status: StatusCode,
    pub(super) message: String,
    /// The request field at fault, if one is.
    pub(super) param: Option<String>,
    /// Seconds to wait before retrying (`Retry-After`).
    pub(super) retry_after: Option<String>,
}

impl ApiError {
    pub(super) fn bad_request(message: impl Into<String>) -> Self {
        ApiError {
            status: StatusCode::BAD_REQUEST,
            message: message.into(),
            param: None,
            retry_after: None,
        }
    }

    /// A 400 about one field of the request.
    pub(super) fn bad_field(param: &str, message: impl Into<String>) -> Self {
        ApiError {
            param: Some(param.to_string()),
            ..ApiError::bad_request(message)
        }
    }
}

impl From<openai_fields::Refused> for ApiError {
    fn from(r: openai_fields::Refused) -> Self {
        ApiError::bad_field(&r.param, r.message)
    }
}

impl From<Status> for ApiError {
    fn from(s: Status) -> Self {
        let status = match s.code() {
            Code::InvalidArgument | Code::OutOfRange | Code::FailedPrecondition => {
                StatusCode::BAD_REQUEST
            }
            Code::NotFound => StatusCode::NOT_FOUND,
            Code::ResourceExhausted => StatusCode::TOO_MANY_REQUESTS,
            Code::Unauthenticated => StatusCode::UNAUTHORIZED,
            Code::PermissionDenied => StatusCode::FORBIDDEN,
            Code::Unavailable => StatusCode::SERVICE_UNAVAILABLE,
            Code::DeadlineExceeded => StatusCode::GATEWAY_TIMEOUT,
            _ => StatusCode::INTERNAL_SERVER_ERROR,
        };
        ApiError {
            status,
            message: s.message().to_string(),
            param: None,
            retry_after: s
                .metadata()
                .get(RETRY_AFTER)
                .and_then(|v| v.to_str().ok())
                .map(str::to_owned),
        }
    }
}

impl From<JsonRejection> for ApiError {
    fn from(r: JsonRejection) -> Self {
        let mut e = ApiError::bad_request(format!("invalid request body: {}", r.body_text()));
        if r.status() == StatusCode::PAYLOAD_TOO_LARGE {
            e.status = StatusCode::PAYLOAD_TOO_LARGE;
        }
        e
    }
}

pub(super) fn error_body(status: StatusCode, message: &str, param: Option<&str>) -> Value {
    let kind = match status {
        StatusCode::BAD_REQUEST | StatusCode::METHOD_NOT_ALLOWED => "invalid_request_error",
        StatusCode::NOT_FOUND => "not_found_error",
        StatusCode::TOO_MANY_REQUESTS => "rate_limit_error",
        StatusCode::UNAUTHORIZED => "authentication_error",
        StatusCode::PAYLOAD_TOO_LARGE => "invalid_request_error",
        _ => "server_error",
    };
    json!({ "error": { "message": message, "type": kind, "param": param, "code": status.as_u16() } })
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut r = (
            self.status,
            Json(error_body(
                self.status,
                &self.message,
                self.param.as_deref(),
            )),
        )
            .into_response();
        r.extensions_mut()
            .insert(crate::http_access::Refusal(self.message));
        if let Some(v) = self
            .retry_after
            .and_then(|v| HeaderValue::from_str(&v).ok())
        {
            r.headers_mut().insert(header::RETRY_AFTER, v);
        }
        r
    }
}
