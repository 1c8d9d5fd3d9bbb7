//! One client request served by several calls of the router's own. A beam
//! search over HTTP asks the cluster for one token per live beam per step, and
//! a completions batch makes a call per prompt, but the client sent one
//! request. It counts once against its API key's requests per second: its
//! calls after the first carry [`Prepaid::Request`]. A beam search is also
//! charged to the key's quota once, up front, for its prompts and `n` ·
//! `max_tokens` ([`GenerateService::prepay`](crate::service::GenerateService::prepay)),
//! and its steps carry [`Prepaid::RequestAndTokens`]. Without this a key
//! limited to a few requests a second had its beam search refused after a few
//! steps (and its quota charged each step's whole prompt again), and its
//! batches refused past their first prompts.

use std::sync::Arc;

use crate::auth::{ClientAuth, KeyId};
use crate::request_metrics::Tokens;
use crate::usage;

/// The marker of a call the router makes for a client request it has already
/// counted: the service still checks the call's key, but neither counts the
/// call against the key nor takes it from the key's requests per second. Only
/// the router sets it, in-process: a request's extensions never come off the
/// wire.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Prepaid {
    /// The request is counted; the call's tokens are charged and counted as
    /// any call's (a batch's prompts after the first).
    Request,
    /// The request and its tokens are ([`Prepayment`]): the call takes
    /// nothing from the key's quota and counts no tokens (a beam search's
    /// steps).
    RequestAndTokens,
}

/// A request's reservation from its key's quota. [`settle`](Self::settle) keeps
/// what the request used and counts it; dropped unsettled (the request failed
/// and its client got nothing), it gives all of it back.
pub struct Prepayment {
    auth: Arc<ClientAuth>,
    key: KeyId,
    reserved: u64,
}

impl Prepayment {
    pub(crate) fn new(auth: Arc<ClientAuth>, key: KeyId, reserved: u64) -> Self {
        Prepayment {
            auth,
            key,
            reserved,
        }
    }

    /// Ends the request: the quota keeps `used` (the prompt and the tokens the
    /// client received) and gets the rest back; the key's token counters
    /// count `used`.
    pub fn settle(mut self, used: Tokens) {
        let kept = (used.prompt + used.generated) as u64;
        self.auth
            .refund(self.key, self.reserved.saturating_sub(kept));
        self.reserved = 0;
        usage::tokens(self.auth.name(self.key), used);
    }
}

impl Drop for Prepayment {
    fn drop(&mut self) {
        if self.reserved > 0 {
            self.auth.refund(self.key, self.reserved);
        }
    }
}
