//! Usage per API key, as Prometheus counters labelled with the key's
//! configured name (never the secret): requests, refusals by reason, prompt
//! tokens and generated tokens.
//!
//! A request counts once it is authenticated (a request without a valid key
//! belongs to no key and shows only in `tandem_requests_total`). A refusal is
//! a request that never ran: over the key's requests per second
//! (`requests_per_s`) or tokens per minute (`tokens_per_min`), or refused by
//! validation, admission or readiness (the status label, e.g.
//! `invalid_argument`, `resource_exhausted`, `unavailable`). Tokens count
//! for requests that reached a node: the prompt, and what the client received.

use metrics::counter;
use tandem_telemetry::names;

use crate::auth::ClientAuth;
use crate::request_metrics::Tokens;

/// Refusal reason: over the key's requests per second.
pub const REQUESTS_PER_S: &str = "requests_per_s";
/// Refusal reason: over the key's tokens per minute.
pub const TOKENS_PER_MIN: &str = "tokens_per_min";

/// Exports every key's counters at 0, so rates have a baseline from the
/// start (and a key that was never used is visible).
pub fn register(auth: &ClientAuth) {
    for name in auth.names() {
        let key = name.to_owned();
        for metric in [
            names::API_KEY_REQUESTS_TOTAL,
            names::API_KEY_PROMPT_TOKENS_TOTAL,
            names::API_KEY_COMPLETION_TOKENS_TOTAL,
        ] {
            counter!(metric, names::KEY => key.clone()).increment(0);
        }
        for reason in [REQUESTS_PER_S, TOKENS_PER_MIN] {
            counter!(names::API_KEY_REFUSALS_TOTAL, names::KEY => key.clone(), names::REASON => reason)
                .increment(0);
        }
    }
}

/// Counts an authenticated request of the key named `key`.
pub fn request(key: &str) {
    counter!(names::API_KEY_REQUESTS_TOTAL, names::KEY => key.to_owned()).increment(1);
}

/// Counts a refusal of the key's request, for `reason`.
pub fn refused(key: &str, reason: &'static str) {
    counter!(names::API_KEY_REFUSALS_TOTAL, names::KEY => key.to_owned(), names::REASON => reason)
        .increment(1);
}

/// Counts the tokens of the key's request that reached a node.
pub fn tokens(key: &str, tokens: Tokens) {
    counter!(names::API_KEY_PROMPT_TOKENS_TOTAL, names::KEY => key.to_owned())
        .increment(tokens.prompt as u64);
    counter!(names::API_KEY_COMPLETION_TOKENS_TOTAL, names::KEY => key.to_owned())
        .increment(tokens.generated as u64);
}
