//! A prompt's log probabilities (`prompt_logprobs`), computed as the prompt is
//! prefilled here: every token but the last runs through
//! [`Backend::forward_every_logit`], a chunk per step ahead of the step's batch,
//! and each position's logits give the next prompt token's log probability.
//! Then they go to the caller in one message, and the prompt's last token
//! joins the batch as any prefill's does: it samples the first token.
//!
//! Until then the sequence is not planned (`Sequence::prompt_logprobs` is
//! set), so no other path prefills its positions without their logits.

use tandem_cluster::convert::prompt_logprobs_to_pb;
use tandem_engine::backend::Backend;
use tandem_engine::{SeqChunk, prompt_logprobs};
use tandem_proto::v1 as pb;

use super::Scheduler;
use crate::errors::RequestError;
use crate::sequence::State;

/// Most prompt positions one step scores: each one's logits (a row the size
/// of the vocabulary) come to the host.
const SCORE_TOKENS: usize = 256;

impl<B: Backend> Scheduler<B> {
    /// Scores the next chunk of the first sequence (in admission order) whose
    /// prompt log probabilities are being computed; sends them once complete.
    pub(super) fn score_prompts(&mut self) {
        let budget = SCORE_TOKENS.min(self.limits.max_batch_tokens).max(1);
        let Some((id, seq, done)) = self.seqs.iter_mut().find_map(|(&id, s)| match s.state {
            State::Prefilling { done } if s.prompt_logprobs.is_some() => Some((id, s, done)),
            _ => None,
        }) else {
            return;
        };
        // The last prompt token is the batch's (it samples the first token).
        let scored_end = seq.generation.prompt().len() - 1;
        let end = scored_end.min(done + budget);
        if done < end {
            let tokens = seq.generation.tokens();
            let chunk = SeqChunk {
                tokens: &tokens[done..end],
                start: done,
                block_table: &seq.table,
            };
            let rows = match self.backend.forward_every_logit(&chunk) {
                Ok(rows) => rows,
                Err(e) => {
                    tracing::error!(error = %e, "scoring a prompt failed; failing its sequence");
                    return self.fail(id, RequestError::Forward(e.to_string()));
                }
            };
            let Some(scoring) = seq.prompt_logprobs.as_mut() else {
                return;
            };
            scoring.entries.extend(prompt_logprobs(
                &rows,
                &tokens[done + 1..=end],
                scoring.top_n,
            ));
            seq.spans
                .prefill_started
                .get_or_insert_with(std::time::Instant::now);
            seq.register_full_blocks(&mut self.blocks, end);
            seq.state = State::Prefilling { done: end };
        }
        if end < scored_end {
            return;
        }
        let Some(scoring) = seq.prompt_logprobs.take() else {
            return;
        };
        let message = pb::DecodeResponse {
            event: Some(pb::decode_response::Event::PromptLogprobs(
                prompt_logprobs_to_pb(seq.generation.prompt()[0], &scoring.entries),
            )),
        };
        // The stream has room for it (see the service); a full one is a caller gone.
        if seq.events.try_send(Ok(message)).is_err() {
            self.fail(
                id,
                RequestError::Generation("the caller stopped reading".into()),
            );
        }
    }
}
