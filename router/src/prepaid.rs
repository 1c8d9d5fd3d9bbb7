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
    /// The request and its tokens are (the [`Reservation`](crate::auth::Reservation)
    /// that [`GenerateService::prepay`](crate::service::GenerateService::prepay)
    /// made): the call takes nothing from the key's quota and counts no tokens
    /// (a beam search's steps).
    RequestAndTokens,
}
