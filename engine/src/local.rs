//! Whole-request generation in one process: prefill (in chunks) then decode,
//! one sequence at a time. The `tandem generate --local` path and the reference
//! that cluster tests compare against.

use crate::backend::{Backend, BackendExt};
use crate::block_manager::{BlockId, BlockManager, blocks_for};
use crate::error::{EngineError, Result};
use crate::generation::{FinishReason, Generation, GenerationParams, StopReason, TokenEvent};
use crate::tokenizer::Tokenizer;

/// The result of a finished generation.
#[derive(Debug, Clone, PartialEq)]
pub struct GenerationOutput {
    /// Generated token ids.
    pub tokens: Vec<u32>,
    /// Generated text.
    pub text: String,
    /// Why it ended.
    pub finish_reason: FinishReason,
    /// The stop string or stop token id that ended it, if one did.
    pub stop_reason: Option<StopReason>,
    /// Tokens in the prompt.
    pub prompt_tokens: usize,
}

/// Runs requests to completion on one backend.
pub struct LocalGenerator<B: Backend> {
    backend: B,
    blocks: BlockManager,
    /// Longest run of prompt tokens given to one forward pass.
    pub prefill_chunk: usize,
}

impl<B: Backend> LocalGenerator<B> {
    /// A generator owning `backend` and the allocation of its whole cache.
    pub fn new(backend: B) -> Self {
        let total = backend.kv_layout().num_blocks;
        LocalGenerator {
            backend,
            blocks: BlockManager::new(total),
            prefill_chunk: 512,
        }
    }

    /// The backend.
    pub fn backend(&mut self) -> &mut B {
        &mut self.backend
    }

    /// Free blocks (all of them between requests).
    pub fn free_blocks(&self) -> usize {
        self.blocks.num_free()
    }

    /// Generates a continuation of `prompt`, calling `on_token` for every token.
    pub fn generate(
        &mut self,
        prompt: &[u32],
        params: &GenerationParams,
        tokenizer: &Tokenizer,
        on_token: impl FnMut(&TokenEvent),
    ) -> Result<GenerationOutput> {
        self.generate_resumed(prompt, &[], params, tokenizer, on_token)
    }

    /// Like [`generate`](Self::generate) for a request that already produced
    /// `generated` elsewhere (see [`Generation::resume`]): the output holds
    /// them, `on_token` sees only the tokens that follow.
    pub fn generate_resumed(
        &mut self,
        prompt: &[u32],
        generated: &[u32],
        params: &GenerationParams,
        tokenizer: &Tokenizer,
        mut on_token: impl FnMut(&TokenEvent),
    ) -> Result<GenerationOutput> {
        let config = self.backend.config().clone();
        let mut generation = Generation::resume(
            prompt.to_vec(),
            generated,
            params.clone(),
            &config.eos_token_ids,
            tokenizer,
        )?;
        let max_len = (prompt.len() + params.max_tokens).min(config.max_position_embeddings);
        if generation.tokens().len() >= config.max_position_embeddings {
            return Err(EngineError::InvalidInput(format!(
                "prompt of {} tokens leaves no room in the model's context of {} tokens",
                prompt.len(),
                config.max_position_embeddings
            )));
        }
        let block_size = self.backend.kv_layout().block_size;
        let table = self.blocks.allocate(blocks_for(max_len, block_size))?;
        let result = self.run(&mut generation, &table, max_len, tokenizer, &mut on_token);
        self.blocks.release(&table)?;
        let text = result?;
        Ok(GenerationOutput {
            tokens: generation.output().to_vec(),
            text,
            finish_reason: generation.finished().unwrap_or(FinishReason::Length),
            stop_reason: generation.stop_reason(),
            prompt_tokens: prompt.len(),
        })
    }

    fn run(
        &mut self,
        generation: &mut Generation,
        table: &[BlockId],
        max_len: usize,
        tokenizer: &Tokenizer,
        on_token: &mut impl FnMut(&TokenEvent),
    ) -> Result<String> {
        // The prompt and any tokens generated before a resume.
        let context = generation.tokens().to_vec();
        let mut logits = Vec::new();
        for (i, chunk) in context.chunks(self.prefill_chunk.max(1)).enumerate() {
            logits = self
                .backend
                .prefill(chunk, i * self.prefill_chunk.max(1), table)?;
        }
        let mut text = String::new();
        loop {
            let event = generation.step(&mut logits, tokenizer)?;
            text.push_str(&event.text);
            on_token(&event);
            let len = generation.tokens().len();
            if event.finished.is_some() || len >= max_len {
                return Ok(text);
            }
            let next = self.backend.decode(&[(event.token, len - 1, table)])?;
            logits = next.into_iter().next().unwrap_or_default();
        }
    }
}
