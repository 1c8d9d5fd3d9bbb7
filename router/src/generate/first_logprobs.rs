//! The first token's log probabilities when another node prefilled: held
//! from the prefill node's answer until the decode stream's first chunk.

use super::*;

/// The first token's log probabilities in an attempt with remote prefill: the
/// prefill node sampled that token, so they come in its answer, and go into
/// the decode stream's first chunk (which has the token without them).
pub(super) enum FirstLogprobs {
    /// Not needed (none asked, or the decode node prefills and reports them),
    /// or already put in.
    Done,
    /// The prefill node has not answered yet.
    Awaited,
    /// The prefill node's answer, for the first chunk.
    Answered(pb::TokenLogprobs),
}

impl FirstLogprobs {
    pub(super) fn new(needed: bool) -> Self {
        if needed {
            FirstLogprobs::Awaited
        } else {
            FirstLogprobs::Done
        }
    }

    /// Whether the first chunk must wait for the prefill node's answer.
    pub(super) fn waiting_for_answer(&self) -> bool {
        matches!(self, FirstLogprobs::Awaited)
    }

    /// Takes the prefill node's answer.
    pub(super) fn answered(
        &mut self,
        logprobs: Option<pb::TokenLogprobs>,
        node: &str,
    ) -> Result<(), RouterError> {
        if !self.waiting_for_answer() {
            return Ok(());
        }
        let logprobs = logprobs.ok_or_else(|| RouterError::Protocol {
            node: node.into(),
            message: "answered a prefill asking for log probabilities without them".into(),
        })?;
        *self = FirstLogprobs::Answered(logprobs);
        Ok(())
    }

    /// Puts the first token's log probabilities into the first chunk.
    pub(super) fn fill(
        &mut self,
        chunk: &mut pb::TokenChunk,
        decode: &str,
    ) -> Result<(), RouterError> {
        let FirstLogprobs::Answered(first) = std::mem::replace(self, FirstLogprobs::Done) else {
            return Ok(());
        };
        if chunk.ids.first() != Some(&first.id) || chunk.logprobs.len() >= chunk.ids.len() {
            return Err(RouterError::Protocol {
                node: decode.into(),
                message: format!(
                    "sent a first token {:?} other than the prefill node's {}",
                    chunk.ids.first(),
                    first.id
                ),
            });
        }
        chunk.logprobs.insert(0, first);
        Ok(())
    }
}
