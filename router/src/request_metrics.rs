//! What the router records about each request (see `tandem_telemetry::names`):
//! time to first token and inter-token latency as tokens leave for the
//! client, and at the end the request's duration, its status, and its tokens.
//!
//! The router is where these facts are known end to end: it sees a request
//! arrive, every token the client gets (across re-runs on other nodes) and
//! how it ended, including refusals that never reach a node.

use metrics::{Histogram, counter, histogram};
use tandem_proto::v1 as pb;
use tandem_telemetry::names;
use tokio::time::Instant;

/// The `status` label of a request that finished with `reason`.
pub fn finish_label(reason: i32) -> &'static str {
    match pb::FinishReason::try_from(reason) {
        Ok(pb::FinishReason::Length) => "length",
        Ok(pb::FinishReason::Stop) => "stop",
        Ok(pb::FinishReason::Eos) => "eos",
        Ok(pb::FinishReason::Cancelled) => "cancelled",
        Ok(pb::FinishReason::Unspecified) | Err(_) => "unspecified",
    }
}

/// Times the token messages of one request.
pub struct TokenClock {
    arrival: Instant,
    last: Option<Instant>,
    /// Taken once per request rather than once per token.
    inter_token: Histogram,
}

impl TokenClock {
    /// A clock for a request that arrived at `arrival`.
    pub fn new(arrival: Instant) -> Self {
        TokenClock {
            arrival,
            last: None,
            inter_token: histogram!(names::INTER_TOKEN_LATENCY_SECONDS),
        }
    }

    /// A token message is going to the client now: the first records the
    /// time to first token, the others the gap since the one before.
    pub fn on_token(&mut self, now: Instant) {
        match self.last.replace(now) {
            None => histogram!(names::TIME_TO_FIRST_TOKEN_SECONDS)
                .record(now.duration_since(self.arrival).as_secs_f64()),
            Some(before) => self
                .inter_token
                .record(now.duration_since(before).as_secs_f64()),
        }
    }
}

/// Tokens of a request that reached a node.
#[derive(Debug, Clone, Copy)]
pub struct Tokens {
    /// Prompt tokens.
    pub prompt: usize,
    /// Tokens the client received.
    pub generated: usize,
}

/// Records the end of a request that arrived at `arrival`: its duration and
/// count by `status`, and its tokens if it reached a node.
pub fn request_ended(status: &'static str, arrival: Instant, tokens: Option<Tokens>) {
    counter!(names::REQUESTS_TOTAL, names::STATUS => status).increment(1);
    histogram!(names::REQUEST_DURATION_SECONDS, names::STATUS => status)
        .record(arrival.elapsed().as_secs_f64());
    if let Some(t) = tokens {
        counter!(names::PROMPT_TOKENS_TOTAL).increment(t.prompt as u64);
        counter!(names::GENERATION_TOKENS_TOTAL).increment(t.generated as u64);
    }
}

/// Records the end of a later sample of an `n` > 1 request: only its
/// generated tokens (the request, its prompt and its duration are counted
/// once, by sample 0's [`request_ended`]).
pub fn sample_ended(tokens: Option<Tokens>) {
    if let Some(t) = tokens {
        counter!(names::GENERATION_TOKENS_TOTAL).increment(t.generated as u64);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finish_reasons_have_their_own_labels() {
        assert_eq!(finish_label(pb::FinishReason::Length as i32), "length");
        assert_eq!(finish_label(pb::FinishReason::Eos as i32), "eos");
        assert_eq!(finish_label(99), "unspecified");
    }
}
