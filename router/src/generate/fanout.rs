//! `n` > 1: parallel samples of one prompt, each run as its own request
//! through [`Relay::run`]'s machinery, their responses interleaved on the
//! client's stream with each one's `index`.
//!
//! The prompt is prefilled and its KV shipped once. Sample 0 runs first, as
//! any request does (remote prefill, KV over QUIC to a decode node). Its
//! first token comes only after the decode node has written every shipped
//! block and named its full blocks in its prefix cache
//! (`Command::KvComplete` in `decode-node/src/scheduler.rs`), so from then
//! on the samples after it are reserved at that same decode node, told to
//! prefill there: its admission claims the prompt's full blocks by reference
//! (`BlockManager::allocate_sequence`) and each sample computes only the
//! prompt's partial last block and its own tokens. No other prefill or KV
//! transfer happens. (With the decode node's prefix cache off they prefill
//! the whole prompt there: still nothing shipped twice.)
//!
//! Each sample is admitted with blocks for its whole length, so the node
//! never over-commits: a sample it cannot hold yet is refused there and
//! asked again (backing off until the deadline, as any full node is), while
//! the samples already running go on. Each sample has its own seed stream,
//! `seed + i` for sample `i`, as vLLM does, and its own id (`<id>-s<i>`;
//! sample 0 keeps the request's id) under which the nodes key and cancel it.
//!
//! The router's request metrics count the request once (sample 0's status
//! and duration, the prompt once) and every sample's generated tokens.
//!
//! A sample whose node fails is re-run on its own, from the tokens it sent,
//! like any request (`Request::serve`); a re-run is not pinned. The client
//! going away closes every sample's stream, so each one's `CancelGuard`
//! frees its blocks on its nodes.

use futures::future::join_all;
use tokio::sync::{mpsc, oneshot};
use tokio::time::Instant;

use crate::backlog::PendingTokens;
use crate::node_addr::NodeAddr;
use crate::request_metrics::Tokens;
use crate::validation::ValidRequest;

use super::{ClientSender, Relay};

/// Responses of one sample buffered before it waits for the client.
const SAMPLE_BUFFER: usize = 16;

/// Where one sample of a request goes.
#[derive(Default)]
pub(super) struct Placement {
    /// Sample 0: told its decode node once the prompt's KV is there.
    ready: Option<oneshot::Sender<NodeAddr>>,
    /// The samples after it: that decode node, for their first attempt.
    pin: Option<NodeAddr>,
    /// A sample after the first (counted in the router's request metrics
    /// only by its tokens).
    later: bool,
}

impl Placement {
    /// The decode node attempt `attempt` must use, if any: only the first
    /// attempt is pinned (a re-run avoids the node that failed).
    pub(super) fn pin(&self, attempt: u32) -> Option<&NodeAddr> {
        self.pin.as_ref().filter(|_| attempt == 1)
    }

    /// Whether this is a sample after the first.
    pub(super) fn is_later_sample(&self) -> bool {
        self.later
    }

    /// The prompt's KV is at `node` (the sample's first token came from it).
    pub(super) fn prompt_ready(&mut self, node: &NodeAddr) {
        if let Some(ready) = self.ready.take() {
            let _ = ready.send(node.clone());
        }
    }
}

/// Sample `index`'s copy of `req`: its own id and seed stream.
pub(crate) fn sample_request(req: &ValidRequest, index: u32) -> ValidRequest {
    let mut sample = req.clone();
    sample.n = 1;
    if index > 0 {
        sample.request_id = format!("{}-s{index}", req.request_id);
        sample.sampling.seed = req.sampling.seed.map(|s| s.wrapping_add(u64::from(index)));
    }
    sample
}

impl Relay {
    /// Serves `req` to the end: one run, or `req.n` samples sharing the
    /// prompt's KV. Returns the request's tokens (the prompt once, the
    /// tokens of every sample) if it reached a node.
    pub async fn run_samples(
        &self,
        req: ValidRequest,
        arrival: Instant,
        deadline: Instant,
        tx: ClientSender,
        pending: PendingTokens,
    ) -> Option<Tokens> {
        if req.n <= 1 {
            return self.run(req, arrival, deadline, tx, pending).await;
        }
        let (ready, prompt_ready) = oneshot::channel();
        let first = Placement {
            ready: Some(ready),
            ..Default::default()
        };
        let first = self.sample(&req, 0, &tx, (arrival, deadline), pending, first);
        let others = async {
            // Sample 0's first token, or its end (then the others run unpinned).
            let pin = tokio::select! {
                node = prompt_ready => node.ok(),
                _ = tx.closed() => return Vec::new(),
            };
            tracing::debug!(node = ?pin, n = req.n, "prompt ready; starting the other samples");
            join_all((1..req.n).map(|i| {
                let pending = PendingTokens::new(self.pending_prefill.clone(), 0);
                let placement = Placement {
                    ready: None,
                    pin: pin.clone(),
                    later: true,
                };
                self.sample(&req, i, &tx, (arrival, deadline), pending, placement)
            }))
            .await
        };
        let (first, others) = tokio::join!(first, others);
        let generated: Vec<usize> = std::iter::once(first)
            .chain(others)
            .flatten()
            .map(|t| t.generated)
            .collect();
        (!generated.is_empty()).then(|| Tokens {
            prompt: req.prompt.len(),
            generated: generated.iter().sum(),
        })
    }

    /// Runs sample `index` of `req`, its responses tagged with `index` on `client`.
    async fn sample(
        &self,
        req: &ValidRequest,
        index: u32,
        client: &ClientSender,
        (arrival, deadline): (Instant, Instant),
        pending: PendingTokens,
        placement: Placement,
    ) -> Option<Tokens> {
        let (tx, rx) = mpsc::channel(SAMPLE_BUFFER);
        let run = self.run_placed(
            sample_request(req, index),
            arrival,
            deadline,
            tx,
            pending,
            placement,
        );
        let (tokens, ()) = tokio::join!(run, forward(rx, client, index));
        tokens
    }
}

/// Copies one sample's responses to the client with its `index`, until the
/// sample ends, fails (the error goes to the client, ending its stream) or
/// the client goes away; then drops `rx`, so a sample still running sees
/// its client gone and cancels.
async fn forward(
    mut rx: mpsc::Receiver<Result<tandem_proto::v1::GenerateResponse, tonic::Status>>,
    client: &ClientSender,
    index: u32,
) {
    loop {
        let msg = tokio::select! {
            _ = client.closed() => return,
            msg = rx.recv() => msg,
        };
        let Some(msg) = msg else { return };
        let failed = msg.is_err();
        let msg = msg.map(|mut r| {
            r.index = index;
            r
        });
        if client.send(msg).await.is_err() || failed {
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tandem_proto::v1 as pb;

    fn request(seed: Option<u64>) -> ValidRequest {
        ValidRequest {
            request_id: "r".into(),
            prompt: vec![1, 2, 3],
            sampling: pb::SamplingParams {
                seed,
                ..Default::default()
            },
            max_tokens: 4,
            stop: Vec::new(),
            stop_token_ids: Vec::new(),
            ignore_eos: false,
            include_stop_str_in_output: false,
            keep_special_tokens: false,
            no_spaces_between_special_tokens: false,
            logprobs: None,
            prompt_logprobs: None,
            min_tokens: 0,
            min_tokens_banned: Vec::new(),
            constraint: None,
            cache_salt: String::new(),
            n: 3,
        }
    }

    #[test]
    fn samples_get_seed_plus_index_and_their_own_ids() {
        let req = request(Some(u64::MAX));
        let ids: Vec<_> = (0..3).map(|i| sample_request(&req, i)).collect();
        assert_eq!(ids[0].request_id, "r");
        assert_eq!(ids[1].request_id, "r-s1");
        assert_eq!(ids[2].request_id, "r-s2");
        assert_eq!(ids[0].sampling.seed, Some(u64::MAX));
        assert_eq!(ids[1].sampling.seed, Some(0), "wraps");
        assert_eq!(ids[2].sampling.seed, Some(1));
        assert!(ids.iter().all(|s| s.n == 1));
        assert_eq!(sample_request(&request(None), 2).sampling.seed, None);
    }

    #[test]
    fn only_the_first_attempt_is_pinned() {
        let p = Placement {
            pin: Some(NodeAddr::from("http://d:1")),
            ..Default::default()
        };
        assert!(p.pin(1).is_some());
        assert!(p.pin(2).is_none());
    }

    #[tokio::test]
    async fn prompt_ready_fires_once() {
        let (tx, rx) = oneshot::channel();
        let mut p = Placement {
            ready: Some(tx),
            ..Default::default()
        };
        p.prompt_ready(&NodeAddr::from("http://d:1"));
        p.prompt_ready(&NodeAddr::from("http://d:2"));
        assert_eq!(rx.await.ok(), Some(NodeAddr::from("http://d:1")));
    }
}
