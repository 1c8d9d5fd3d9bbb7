//! One request's generation state, independent of where its forward passes
//! run: sampling, stop conditions, and the streamed text.
//!
//! A [`Generation`] is fed each step's logits (or a token sampled elsewhere,
//! such as the first token from a prefill node) and answers with the token,
//! the text it made final, and whether the request is finished. The
//! single-process generator and the decode node's scheduler share it, which
//! is what makes their outputs identical.

use crate::constraint::{AllowedTokens, Constraint, ConstraintState};
use crate::error::{EngineError, Result};
use crate::mask_overlap::MaskJob;
use crate::sampling::{MAX_TOP_LOGPROBS, Sampler, SamplingParams, TokenDraw, TokenLogprobs};
use crate::stop::{StopMatcher, StopScan};
use crate::tokenizer::{Detokenizer, Tokenizer};

/// Why a generation ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FinishReason {
    /// `max_tokens` generated.
    Length,
    /// A stop string or stop token id.
    Stop,
    /// The model's end-of-sequence token.
    Eos,
}

/// What ended a generation that finished with [`FinishReason::Stop`]
/// (vLLM's `stop_reason`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StopReason {
    /// This stop string matched.
    String(String),
    /// This stop token id was generated.
    TokenId(u32),
}

/// What a request asks of generation.
#[derive(Debug, Clone, PartialEq)]
pub struct GenerationParams {
    /// How to choose tokens.
    pub sampling: SamplingParams,
    /// Most tokens to generate (at least 1).
    pub max_tokens: usize,
    /// Stop strings: the output ends before the first one.
    pub stop: Vec<String>,
    /// Stop token ids: the output ends after one (its text is not emitted).
    pub stop_token_ids: Vec<u32>,
    /// Keep going past the model's EOS token.
    pub ignore_eos: bool,
    /// vLLM's `include_stop_str_in_output`: the stop string that ends the
    /// output stays in it, as does the text of a stop token id or EOS that
    /// ends it (special tokens have none).
    pub include_stop_str_in_output: bool,
    /// Special tokens make no text (vLLM's `skip_special_tokens`, default
    /// true); false keeps their text in the output.
    pub skip_special_tokens: bool,
    /// vLLM's `spaces_between_special_tokens` (default true): false, with
    /// special tokens kept, gives an added token that follows another its bare
    /// text ([`Detokenizer::spacing_special`]).
    pub spaces_between_special_tokens: bool,
    /// vLLM's `min_tokens`: until this many tokens were generated, EOS and the
    /// stop token ids cannot be drawn (their logits are -inf) and stop strings
    /// do not end the output. At most `max_tokens`.
    pub min_tokens: usize,
    /// Report each sampled token's log probability and those of this many most
    /// likely tokens (at most [`MAX_TOP_LOGPROBS`]); `None` reports none.
    pub logprobs: Option<usize>,
    /// Structured output: the generated text must match this (see
    /// [`crate::constraint`]); `None` leaves it free.
    pub constraint: Option<Constraint>,
}

impl Default for GenerationParams {
    fn default() -> Self {
        GenerationParams {
            sampling: SamplingParams::default(),
            max_tokens: 16,
            stop: Vec::new(),
            stop_token_ids: Vec::new(),
            ignore_eos: false,
            include_stop_str_in_output: false,
            skip_special_tokens: true,
            spaces_between_special_tokens: true,
            min_tokens: 0,
            logprobs: None,
            constraint: None,
        }
    }
}

impl GenerationParams {
    /// Checks the parameters; the message names the bad one.
    pub fn validate(&self) -> Result<()> {
        self.sampling.validate()?;
        if self.max_tokens == 0 {
            return Err(EngineError::InvalidInput(
                "max_tokens must be at least 1".into(),
            ));
        }
        if self.min_tokens > self.max_tokens {
            return Err(EngineError::InvalidInput(format!(
                "min_tokens ({}) must be at most max_tokens ({})",
                self.min_tokens, self.max_tokens
            )));
        }
        if let Some(n) = self.logprobs
            && n > MAX_TOP_LOGPROBS
        {
            return Err(EngineError::InvalidInput(format!(
                "logprobs must be at most {MAX_TOP_LOGPROBS}, got {n}"
            )));
        }
        Ok(())
    }
}

/// The outcome of one generated token.
#[derive(Debug, Clone, PartialEq)]
pub struct TokenEvent {
    /// The token.
    pub token: u32,
    /// Text made final by it (possibly empty); on the last token this includes
    /// any text that had been held back.
    pub text: String,
    /// Set on the last token.
    pub finished: Option<FinishReason>,
    /// The token's log probabilities, when the request asked for them and the
    /// token was sampled here (see [`Generation::step`]).
    pub logprobs: Option<TokenLogprobs>,
}

/// The ids that cannot be the token at output index `generated` (0-based):
/// EOS (`eos`, empty with `ignore_eos`) and the stop token ids while
/// `generated < min_tokens`; none after. For a node sampling a request's
/// first token itself (a prefill node) as well as for [`Generation`].
pub fn banned_before_min_tokens(
    params: &GenerationParams,
    eos: &[u32],
    generated: usize,
) -> Vec<u32> {
    if generated >= params.min_tokens {
        return Vec::new();
    }
    let eos: &[u32] = if params.ignore_eos { &[] } else { eos };
    let mut ids: Vec<u32> = eos.iter().chain(&params.stop_token_ids).copied().collect();
    ids.sort_unstable();
    ids.dedup();
    ids
}

/// One request's generation state.
pub struct Generation {
    params: GenerationParams,
    sampler: Sampler,
    detokenizer: Detokenizer,
    stop: StopMatcher,
    eos: Vec<u32>,
    /// Prompt then output tokens.
    tokens: Vec<u32>,
    prompt_len: usize,
    finished: Option<FinishReason>,
    /// The constraint's parser, started with the first token (which brings the
    /// tokenizer it is compiled against); `None` before or without one.
    grammar: Option<ConstraintState>,
    /// The parser is lent out in a [`MaskJob`] (see [`crate::mask_overlap`]).
    grammar_lent: bool,
    /// The mask for the next token, computed while the step ran, with the
    /// number of tokens it follows.
    next_mask: Option<(usize, Result<AllowedTokens>)>,
}

impl Generation {
    /// A generation continuing `prompt`; `eos` are the model's end-of-sequence ids.
    pub fn new(prompt: Vec<u32>, params: GenerationParams, eos: &[u32]) -> Result<Self> {
        params.validate()?;
        if prompt.is_empty() {
            return Err(EngineError::InvalidInput("the prompt is empty".into()));
        }
        Ok(Generation {
            sampler: Sampler::new(params.sampling.clone(), &prompt),
            detokenizer: Detokenizer::starting_at(prompt.len())
                .keeping_special(!params.skip_special_tokens)
                .spacing_special(params.spaces_between_special_tokens),
            stop: StopMatcher::new(&params.stop, params.include_stop_str_in_output),
            eos: if params.ignore_eos {
                Vec::new()
            } else {
                eos.to_vec()
            },
            prompt_len: prompt.len(),
            tokens: prompt,
            params,
            finished: None,
            grammar: None,
            grammar_lent: false,
            next_mask: None,
        })
    }

    /// A generation that already produced `generated` (on a node that then
    /// failed): replays those tokens through the sampler, the detokenizer and
    /// the stop matcher, so that what follows is what the first node would
    /// have produced next. Their text is not emitted again.
    pub fn resume(
        prompt: Vec<u32>,
        generated: &[u32],
        params: GenerationParams,
        eos: &[u32],
        tokenizer: &Tokenizer,
    ) -> Result<Self> {
        let mut g = Generation::new(prompt, params, eos)?;
        for (i, &token) in generated.iter().enumerate() {
            g.push_sampled(token, None, tokenizer)?;
            if g.finished.is_some() {
                return Err(EngineError::InvalidInput(format!(
                    "the {} already generated tokens end the request at token {i}; nothing is left to generate",
                    generated.len()
                )));
            }
        }
        Ok(g)
    }

    /// The prompt's tokens.
    pub fn prompt(&self) -> &[u32] {
        &self.tokens[..self.prompt_len]
    }

    /// The tokens generated so far.
    pub fn output(&self) -> &[u32] {
        &self.tokens[self.prompt_len..]
    }

    /// Prompt and output tokens.
    pub fn tokens(&self) -> &[u32] {
        &self.tokens
    }

    /// Why it ended, once it has.
    pub fn finished(&self) -> Option<FinishReason> {
        self.finished
    }

    /// The stop string or stop token id that ended it, when one did (`None`
    /// for the other reasons, and for a structured output that completed).
    pub fn stop_reason(&self) -> Option<StopReason> {
        if self.finished != Some(FinishReason::Stop) {
            return None;
        }
        match (self.output().last(), self.stop.matched()) {
            (Some(&t), _) if self.params.stop_token_ids.contains(&t) => {
                Some(StopReason::TokenId(t))
            }
            (_, Some(s)) => Some(StopReason::String(s.to_string())),
            _ => None,
        }
    }

    /// Samples the next token from `logits` and accounts for it; the event
    /// carries its log probabilities when the request asked for them.
    pub fn step(&mut self, logits: &mut [f32], tokenizer: &Tokenizer) -> Result<TokenEvent> {
        let mut banned = self.banned_next();
        if self.params.constraint.is_some() {
            let ends = self.ending_ids();
            let allowed = self.allowed_next(tokenizer)?;
            if !allowed.apply(logits, &ends) {
                // Only the end is left: min_tokens cannot hold it back.
                banned.clear();
            }
        }
        let (token, logprobs) = self
            .sampler
            .sample_banning(logits, self.params.logprobs, &banned);
        let mut event = self.accept(token, tokenizer)?;
        event.logprobs = logprobs;
        Ok(event)
    }

    /// How many top log probabilities each token reports, when the request
    /// asked for log probabilities at all.
    pub fn logprobs(&self) -> Option<usize> {
        self.params.logprobs
    }

    /// Whether the next token can be chosen by a [`TokenDraw`] from the raw
    /// logits under the mask of [`next_mask_bits`](Self::next_mask_bits) (no
    /// penalty or bias needs this request's history), so a GPU backend can
    /// sample it, and compute its log probabilities, without the logits
    /// leaving the device.
    pub fn draws_from_raw_logits(&self) -> bool {
        self.sampler.draws_from_raw_logits()
    }

    /// The ids the next token may not be: EOS and the stop token ids while
    /// fewer than `min_tokens` tokens were generated.
    pub fn banned_next(&self) -> Vec<u32> {
        banned_before_min_tokens(&self.params, &self.eos, self.output().len())
    }

    /// The next token's draw, from this request's random stream; give the token
    /// it chose to [`accept_drawn`](Self::accept_drawn).
    pub fn next_draw(&mut self) -> TokenDraw {
        self.sampler.next_draw()
    }

    /// Accounts for the token chosen with the draw [`next_draw`](Self::next_draw)
    /// gave (under the mask of [`next_mask_bits`](Self::next_mask_bits)), with
    /// its log probabilities when the request asked for them.
    pub fn accept_drawn(
        &mut self,
        token: u32,
        logprobs: Option<TokenLogprobs>,
        tokenizer: &Tokenizer,
    ) -> Result<TokenEvent> {
        self.sampler.observe(token);
        let mut event = self.accept(token, tokenizer)?;
        event.logprobs = logprobs;
        Ok(event)
    }

    /// Accounts for a token sampled elsewhere with this request's parameters
    /// (the first token, sampled by a prefill node, with its `logprobs` when
    /// asked), keeping the random stream in step.
    pub fn push_sampled(
        &mut self,
        token: u32,
        logprobs: Option<TokenLogprobs>,
        tokenizer: &Tokenizer,
    ) -> Result<TokenEvent> {
        self.sampler.resume_after(token);
        let mut event = self.accept(token, tokenizer)?;
        event.logprobs = logprobs;
        Ok(event)
    }

    /// Lends the constraint's parser out so the next token's mask can be
    /// computed while the step runs ([`crate::mask_overlap`]); `None` without a
    /// constraint or once finished. Give it back with
    /// [`return_mask_job`](Self::return_mask_job) before the next
    /// [`step`](Self::step).
    pub fn lend_mask_job(&mut self, tokenizer: &Tokenizer) -> Result<Option<MaskJob>> {
        if self.params.constraint.is_none() || self.finished.is_some() {
            return Ok(None);
        }
        self.grammar(tokenizer)?;
        let Some(state) = self.grammar.take() else {
            return Ok(None);
        };
        self.grammar_lent = true;
        Ok(Some(MaskJob {
            state,
            at: self.tokens.len(),
            allowed: None,
        }))
    }

    /// Takes back the parser [`lend_mask_job`](Self::lend_mask_job) lent, and
    /// the mask it computed (used by the next [`step`](Self::step)).
    pub fn return_mask_job(&mut self, job: MaskJob) {
        self.grammar = Some(job.state);
        self.grammar_lent = false;
        self.next_mask = job
            .allowed
            .filter(|_| job.at == self.tokens.len())
            .map(|a| (job.at, a));
    }

    /// The tokens the next one may be, as a packed bitmask over `vocab`
    /// logits for a device to apply before it samples (see
    /// [`AllowedTokens::packed`]): the constraint's mask (EOS and stop ids
    /// where the grammar accepts) with `min_tokens`' bans applied; `None` when
    /// every token may come. Uses the mask computed during the step when there
    /// is one, as [`step`](Self::step) would.
    pub fn next_mask_bits(
        &mut self,
        vocab: usize,
        tokenizer: &Tokenizer,
    ) -> Result<Option<Vec<u32>>> {
        let banned = self.banned_next();
        if self.params.constraint.is_none() {
            if banned.is_empty() {
                return Ok(None);
            }
            let mut bits = vec![u32::MAX; vocab.div_ceil(32)];
            if !vocab.is_multiple_of(32)
                && let Some(last) = bits.last_mut()
            {
                *last = (1u32 << (vocab % 32)) - 1;
            }
            for t in banned.into_iter().filter(|&t| (t as usize) < vocab) {
                bits[t as usize / 32] &= !(1 << (t % 32));
            }
            return Ok(Some(bits));
        }
        let ends = self.ending_ids();
        let allowed = self.allowed_next(tokenizer)?;
        Ok(Some(allowed.packed(vocab, &ends, &banned)))
    }

    /// The mask for the next token: the one computed during the step if it
    /// follows the current tokens, else computed now.
    fn allowed_next(&mut self, tokenizer: &Tokenizer) -> Result<AllowedTokens> {
        let at = self.tokens.len();
        match self.next_mask.take() {
            Some((done_at, allowed)) if done_at == at => allowed,
            _ => self.grammar(tokenizer)?.allowed(),
        }
    }

    /// The ids that end the output (EOS unless ignored, the stop token ids).
    fn ending_ids(&self) -> Vec<u32> {
        self.eos
            .iter()
            .chain(&self.params.stop_token_ids)
            .copied()
            .collect()
    }

    /// The constraint's parser, started on first use.
    fn grammar(&mut self, tokenizer: &Tokenizer) -> Result<&mut ConstraintState> {
        if self.grammar_lent {
            return Err(EngineError::InvalidInput(
                "the grammar's parser is lent to a mask job that was not given back".into(),
            ));
        }
        let state = match self.grammar.take() {
            Some(state) => state,
            None => {
                let constraint = self.params.constraint.as_ref().ok_or_else(|| {
                    EngineError::InvalidInput("the request has no constraint".into())
                })?;
                tokenizer.constraints()?.start(constraint)?
            }
        };
        Ok(self.grammar.insert(state))
    }

    /// Feeds `token` to the constraint's parser, if the request has one;
    /// true when the grammar can take nothing more (the output is complete).
    fn advance_grammar(&mut self, token: u32, tokenizer: &Tokenizer) -> Result<bool> {
        if self.params.constraint.is_none() || self.ending_ids().contains(&token) {
            return Ok(false);
        }
        let grammar = self.grammar(tokenizer)?;
        grammar.advance(token)?;
        Ok(grammar.is_stopped())
    }

    fn accept(&mut self, token: u32, tokenizer: &Tokenizer) -> Result<TokenEvent> {
        if self.finished.is_some() {
            return Err(EngineError::InvalidInput(
                "the generation has already finished".into(),
            ));
        }
        let grammar_done = self.advance_grammar(token, tokenizer)?;
        self.tokens.push(token);
        let mut finished = None;
        let mut text = String::new();
        // The text of an ending token (EOS or a stop id), kept when the
        // request includes what stopped it.
        let mut ending_text = String::new();
        if self.output().len() < self.params.min_tokens {
            // Nothing ends the output yet (vLLM's `min_tokens`): not EOS or a
            // stop id (only a token sampled elsewhere could be one), not a stop string.
            text = self.detokenizer.step(tokenizer, &self.tokens)?;
        } else if self.eos.contains(&token) || self.params.stop_token_ids.contains(&token) {
            finished = Some(if self.eos.contains(&token) {
                FinishReason::Eos
            } else {
                FinishReason::Stop
            });
            if self.params.include_stop_str_in_output {
                ending_text = self.detokenizer.step(tokenizer, &self.tokens)?;
            }
        } else {
            let delta = self.detokenizer.step(tokenizer, &self.tokens)?;
            match self.stop.push(&delta) {
                StopScan::Emit(t) => text = t,
                StopScan::Stopped(t) => {
                    text = t;
                    finished = Some(FinishReason::Stop);
                }
            }
        }
        if finished.is_none() && (grammar_done || self.output().len() >= self.params.max_tokens) {
            // A complete structured output ends the request as a stop would.
            finished = Some(if grammar_done {
                FinishReason::Stop
            } else {
                FinishReason::Length
            });
            // The last tokens may end inside a character: release what they make.
            let tail = self.detokenizer.flush(tokenizer, &self.tokens)?;
            match self.stop.push(&tail) {
                StopScan::Emit(t) => text.push_str(&t),
                StopScan::Stopped(t) => {
                    text.push_str(&t);
                    finished = Some(FinishReason::Stop);
                }
            }
        }
        if matches!(finished, Some(FinishReason::Length | FinishReason::Eos))
            || grammar_done
            || (finished == Some(FinishReason::Stop) && self.params.stop_token_ids.contains(&token))
        {
            text.push_str(&self.stop.flush());
        }
        text.push_str(&ending_text);
        self.finished = finished;
        Ok(TokenEvent {
            token,
            text,
            finished,
            logprobs: None,
        })
    }
}
