//! One request as the engine loop holds it: its generation state, its block
//! table and which of its blocks are named in the prefix cache.

use std::time::{Duration, Instant};

use tandem_cluster::convert::stop_reason_to_pb;
use tandem_engine::block_manager::{BlockHash, BlockId, BlockManager};
use tandem_engine::prefix_hash::PrefixHasher;
use tandem_engine::{Generation, TokenEvent};
use tandem_proto::v1 as pb;
use tokio::sync::mpsc;

use crate::batch_plan::{Phase, SeqView};
use crate::scheduler::Event;
use crate::seq_spans::SeqSpans;

/// Where a sequence is.
#[derive(Debug, Clone, Copy)]
pub(crate) enum State {
    /// Its KV is coming from a prefill node; given up at `deadline`, which
    /// each frame that lands moves to at least `patience` after it (a long
    /// prompt's KV keeps coming for as long as its prefill takes).
    AwaitingKv {
        deadline: Instant,
        patience: Duration,
    },
    /// Prefilled here: the first `done` context tokens have their KV.
    Prefilling { done: usize },
    /// Generating.
    Running,
    /// Its blocks were given back so that older sequences could grow
    /// (`scheduler::preemption`); its context (prompt and tokens generated
    /// so far) is prefilled here again once blocks are free, and generation
    /// goes on where it stopped.
    Preempted,
}

/// A request admitted here.
pub(crate) struct Sequence {
    /// The request's key (`request_id#attempt`).
    pub request_id: String,
    pub generation: Generation,
    /// Its blocks, one for each `block_size` tokens of its context, grown as
    /// it generates (empty while preempted). At admission the first
    /// `cached_tokens / block_size` came from the prefix cache by reference.
    pub table: Vec<BlockId>,
    /// Names its blocks in the prefix cache (the node's, salted with the
    /// request's `cache_salt`).
    pub hasher: PrefixHasher,
    /// Hashes of the full blocks of its context so far (empty with the
    /// prefix cache off); extended as generated tokens fill blocks.
    pub hashes: Vec<BlockHash>,
    /// Leading blocks of `table` named in the prefix cache (or taken from it).
    pub registered: usize,
    /// Context tokens whose KV this node's prefix cache held at admission.
    pub cached_tokens: usize,
    /// Prefilled here rather than receiving KV.
    pub local: bool,
    pub state: State,
    pub events: mpsc::Sender<Event>,
    /// The request's span (carrying its id); the loop logs the request's events in it.
    pub span: tracing::Span,
    /// When its KV landed and its first step ran (for the router's timing spans).
    pub spans: SeqSpans,
    /// Shipped KV: the context length before the prefill node's first token
    /// (the KV its layers carry), set when that token arrived in the Final
    /// frame and went to the router (often ahead of the last layers).
    pub first_token_at: Option<usize>,
    /// Its first token (sent ahead of the KV) ended it and the caller has its answer:
    /// it holds its blocks and reservation only until its KV has landed (or
    /// the transfer ended otherwise), so the transfer ends as usual.
    pub answered: bool,
    /// Its first token, come ahead of the KV while every place in the batch
    /// was taken (`Limits::hold_first_token`), and when: it goes out with the
    /// step that computes the second, so the caller sees no gap between the
    /// two longer than a step (the wait for a place shows in the time to the
    /// first token, as on a colocated node).
    pub held_first: Option<(TokenEvent, Instant)>,
    /// The prompt's log probabilities being computed (`prompt_logprobs`),
    /// until they are sent, just before the first token.
    pub prompt_logprobs: Option<PromptScoring>,
}

/// A prompt's log probabilities as its prefill computes them.
pub(crate) struct PromptScoring {
    /// Most likely tokens listed per prompt token.
    pub top_n: usize,
    /// One per prompt token from the second on, so far.
    pub entries: Vec<tandem_engine::PromptLogprob>,
}

impl Sequence {
    /// The sequence as the batch planner sees it.
    pub fn view(&self, id: u64) -> SeqView {
        SeqView {
            id,
            phase: match self.state {
                State::AwaitingKv { .. } => Phase::AwaitingKv,
                State::Prefilling { done } => Phase::Prefilling { done },
                State::Running => Phase::Running,
                State::Preempted => Phase::Preempted,
            },
            context_len: self.generation.tokens().len(),
        }
    }

    /// Whether it holds a place in the decode batch (`decode.max_batch`):
    /// generating or being prefilled here, or waiting for its KV with its
    /// first token already at the caller's.
    pub fn has_place(&self) -> bool {
        if self.held_first.is_some() || self.answered {
            return false;
        }
        match self.state {
            State::AwaitingKv { .. } => self.first_token_at.is_some(),
            State::Prefilling { .. } | State::Running => true,
            State::Preempted => false,
        }
    }

    /// Context tokens still to prefill here: a local prefill's rest, or a
    /// preempted sequence's whole context.
    pub fn prefill_left(&self) -> usize {
        let len = self.generation.tokens().len();
        match self.state {
            State::Prefilling { done } => len.saturating_sub(done),
            State::Preempted => len,
            State::AwaitingKv { .. } | State::Running => 0,
        }
    }

    /// Whether it holds KV blocks that preempting it would give back: it
    /// runs or is prefilled here (one waiting for shipped KV is left alone).
    pub fn preemptible(&self) -> bool {
        matches!(self.state, State::Running | State::Prefilling { .. }) && !self.table.is_empty()
    }

    /// Context tokens whose KV the shipped layers carry (the prefill node's
    /// first token has none until the first decode step).
    pub fn shipped_len(&self) -> usize {
        self.first_token_at
            .unwrap_or_else(|| self.generation.tokens().len())
    }

    /// Names in the prefix cache the full blocks among the first `kv_len`
    /// context positions, which now all have their KV written, so later
    /// prompts (the next turn of a chat) can reuse them. Cheap when no block
    /// was completed since the last call; does nothing with the cache off.
    pub fn register_full_blocks(&mut self, blocks: &mut BlockManager, kv_len: usize) {
        if !blocks.caching() {
            return;
        }
        let hasher = self.hasher;
        let tokens = self.generation.tokens();
        let kv_len = kv_len.min(tokens.len());
        let full = (kv_len / hasher.block_size()).min(self.table.len());
        if full <= self.registered {
            return;
        }
        if full > self.hashes.len() {
            // A generated token completed a block: hash the chain again up
            // to it (once per block_size tokens).
            self.hashes = hasher.full_blocks(&tokens[..full * hasher.block_size()]);
        }
        for b in self.registered..full {
            blocks.register(self.table[b], self.hashes[b]);
        }
        self.registered = full;
    }

    /// The stream's final message.
    pub fn finished_message(&self, reason: pb::FinishReason) -> pb::DecodeResponse {
        let g = &self.generation;
        pb::DecodeResponse {
            event: Some(pb::decode_response::Event::Finished(pb::Finished {
                reason: reason as i32,
                usage: Some(pb::Usage {
                    prompt_tokens: g.prompt().len() as u32,
                    completion_tokens: g.output().len() as u32,
                    // Tokens this node did not compute. KV held here for a
                    // prompt a prefill node computed saved the transfer, not
                    // the compute: the prefill node reports its own cache hits.
                    cached_tokens: if self.local {
                        self.cached_tokens as u32
                    } else {
                        0
                    },
                }),
                // Only the spans: the router fills in the rest.
                timings: Some(pb::Timings {
                    spans: Some(self.spans.to_pb()),
                    ..Default::default()
                }),
                stop_reason: g.stop_reason().map(stop_reason_to_pb),
            })),
        }
    }
}
