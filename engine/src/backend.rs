//! The forward-pass interface every backend (CPU, CUDA) implements.
//!
//! One call, [`Backend::forward`], runs a batch of *sequence chunks*: each is
//! a run of new tokens of one sequence at known positions, with the block
//! table where that sequence's KV lives. A prefill is one long chunk (or
//! several calls with consecutive chunks: chunked prefill); a decode step is
//! many chunks of one token. Both write the new tokens' K/V into the paged
//! cache and return the logits of the last token of the chunks that ask for
//! them. A step that samples is two calls, [`Backend::start_step`] and
//! [`Backend::finish_step`] (the token each row's draw chooses, under its
//! grammar mask, with its log probabilities: on the device where it can).
//!
//! Three traits: [`Backend`] (the model: config, KV layout, the forward
//! calls), [`KvIo`] (KV in and out of the cache as bytes) and [`BackendExt`]
//! (`prefill`, `decode`, `forward_greedy`, `forward_logits`, written once over
//! the other two).
//!
//! Disaggregation needs the KV to leave and enter a cache one layer at a time:
//! `on_layer` is called as soon as a layer's K/V for the whole batch is in the
//! cache (so a prefill node can ship layer L while layer L+1 computes), and
//! [`KvIo::export_layer`] / [`KvIo::import_layer`] move a layer's blocks
//! as bytes in the layout of [`kv_cache`](crate::kv_cache).

use std::ops::Range;

use bytes::Bytes;

use crate::block_manager::BlockId;
use crate::config::ModelConfig;
use crate::error::{EngineError, Result};
use crate::kv_cache::KvLayout;
use crate::row_sampling::{RowAsk, RowOut};
use crate::sampling::TokenDraw;

/// New tokens of one sequence.
#[derive(Debug, Clone, Copy)]
pub struct SeqChunk<'a> {
    /// The tokens; not empty.
    pub tokens: &'a [u32],
    /// Position of `tokens[0]` in the sequence (tokens before it are in the cache).
    pub start: usize,
    /// The sequence's blocks, enough for `start + tokens.len()` tokens.
    pub block_table: &'a [BlockId],
}

/// Reads one layer's blocks out of a cache while a forward pass is running.
pub trait KvExport {
    /// The bytes of `blocks` of `layer`, block after block.
    fn export_layer(&self, layer: usize, blocks: &[BlockId]) -> Result<Vec<u8>>;

    /// KV heads `heads` (model numbering) of `blocks` of `layer`: each block
    /// laid out like the cache's restricted to those heads
    /// (`[K: heads][slot][dim]` then V), what one tensor-parallel rank ships.
    fn export_heads(
        &self,
        layer: usize,
        blocks: &[BlockId],
        heads: Range<usize>,
    ) -> Result<Vec<u8>> {
        let _ = (layer, blocks);
        Err(EngineError::KvCache(format!(
            "this cache cannot export the head range {heads:?} alone"
        )))
    }

    /// Like [`export_heads`](Self::export_heads), but may return before the bytes
    /// are in host memory: called from a layer hook, this starts the copy of
    /// layer L and lets the forward pass go on to layer L + 1 while it runs.
    fn export_heads_async(
        &self,
        layer: usize,
        blocks: &[BlockId],
        heads: Range<usize>,
    ) -> Result<KvBytes> {
        Ok(KvBytes::Ready(Bytes::from(
            self.export_heads(layer, blocks, heads)?,
        )))
    }
}

/// The bytes of an export on their way out of a cache: ready at once (the CPU
/// backend), or once a device-to-host copy already queued has completed (the
/// GPU backend's pinned staging memory, handed on without a copy).
pub enum KvBytes {
    /// Already in host memory.
    Ready(Bytes),
    /// A copy in flight.
    Pending(Box<dyn PendingKv>),
}

/// A device-to-host copy of KV in flight.
pub trait PendingKv: Send {
    /// Blocks until the copy is done; the bytes then stay valid for as long as
    /// the returned `Bytes` (and its clones) live.
    fn wait(self: Box<Self>) -> Result<Bytes>;
}

impl KvBytes {
    /// The bytes, waiting for the copy if one is in flight.
    pub fn wait(self) -> Result<Bytes> {
        match self {
            KvBytes::Ready(b) => Ok(b),
            KvBytes::Pending(p) => p.wait(),
        }
    }
}

impl std::fmt::Debug for KvBytes {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            KvBytes::Ready(b) => write!(f, "KvBytes::Ready({} bytes)", b.len()),
            KvBytes::Pending(_) => f.write_str("KvBytes::Pending"),
        }
    }
}

/// Called with each layer index once that layer's K/V is in the cache.
pub type LayerHook<'a> = &'a mut dyn FnMut(usize, &dyn KvExport) -> Result<()>;

/// A model with its KV cache on some device: the few calls every backend
/// implements. KV movement between caches is [`KvIo`] (a supertrait, so a
/// `Box<dyn Backend>` moves KV too); conveniences built on these calls are
/// [`BackendExt`].
pub trait Backend: KvIo + Send {
    /// The model's shape.
    fn config(&self) -> &ModelConfig;

    /// The KV cache's shape.
    fn kv_layout(&self) -> KvLayout;

    /// Runs `chunks` through the model, writing their K/V into the cache.
    /// `logits[i]` says whether `chunks[i]` needs its last token's logits on
    /// the host: the result holds them for those chunks and `None` for the
    /// others (a prefill chunk that does not end its prompt samples nothing,
    /// so its logits never leave the device).
    fn forward(
        &mut self,
        chunks: &[SeqChunk<'_>],
        logits: &[bool],
        on_layer: Option<LayerHook<'_>>,
    ) -> Result<Vec<Option<Vec<f32>>>>;

    /// Starts a step: runs `chunks`, leaving each chunk's last-token logits
    /// where [`finish_step`](Self::finish_step) chooses from them with
    /// `draws[i]` for `chunks[i]`. A GPU backend may return as soon as the
    /// pass is queued, so the host computes the grammar masks while it runs
    /// ([`crate::mask_overlap`]).
    fn start_step(
        &mut self,
        chunks: &[SeqChunk<'_>],
        draws: &[TokenDraw],
        on_layer: Option<LayerHook<'_>>,
    ) -> Result<()>;

    /// Finishes the step [`start_step`](Self::start_step) started: each row's
    /// token (its mask applied, its log probabilities computed when asked) or
    /// its logits, as `asks[i]` says for row `i` (see
    /// [`row_sampling`](crate::row_sampling)). A GPU backend does it all on the
    /// device: only token ids and the numbers asked for cross to the host.
    fn finish_step(&mut self, asks: &[RowAsk<'_>]) -> Result<Vec<RowOut>>;

    /// Whether the step [`start_step`](Self::start_step) queued is still
    /// running on the device, without waiting: the caller may do other work
    /// (take KV imports, answer admissions) until it is not. False when no
    /// step is in flight, and on a backend that computes the step in
    /// `start_step` (the CPU). An error reading the device's state is
    /// `false`: [`finish_step`](Self::finish_step) reports it.
    fn step_running(&self) -> bool {
        false
    }

    /// Whether [`forward_every_logit`](Self::forward_every_logit) works here.
    fn computes_every_logit(&self) -> bool {
        false
    }

    /// Runs one chunk, writing its K/V into the cache like
    /// [`forward`](Self::forward), and returns the logits of *every* one of its
    /// tokens, in order: what the prompt's log probabilities (vLLM's
    /// `prompt_logprobs`) are computed from. A backend that cannot says so
    /// with [`computes_every_logit`](Self::computes_every_logit); calling it
    /// there is an error and leaves the cache as it was.
    fn forward_every_logit(&mut self, chunk: &SeqChunk<'_>) -> Result<Vec<Vec<f32>>> {
        let _ = chunk;
        Err(EngineError::InvalidInput(
            "this backend computes only the last token's logits of a chunk (prompt log probabilities are not supported on it)".into(),
        ))
    }

    /// Runs `chunks` and chooses each chunk's next token with its draw
    /// (`draws[i]` for `chunks[i]`) from the raw logits: a step whose rows ask
    /// for nothing more.
    fn forward_draw(
        &mut self,
        chunks: &[SeqChunk<'_>],
        draws: &[TokenDraw],
        on_layer: Option<LayerHook<'_>>,
    ) -> Result<Vec<u32>> {
        self.start_step(chunks, draws, on_layer)?;
        self.finish_step(&vec![RowAsk::default(); chunks.len()])?
            .into_iter()
            .map(|row| match row {
                RowOut::Token { token, .. } => Ok(token),
                RowOut::Logits(_) => Err(EngineError::InvalidInput(
                    "the backend returned logits for a row that asked for a token".into(),
                )),
            })
            .collect()
    }
}

/// Moving a cache's KV in and out as bytes, a layer (or a layer's KV heads)
/// at a time, in the layout of [`kv_cache`](crate::kv_cache): what a prefill
/// node ships and a decode node receives.
pub trait KvIo {
    /// The bytes of `blocks` of `layer`.
    fn export_layer(&self, layer: usize, blocks: &[BlockId]) -> Result<Vec<u8>>;

    /// Writes bytes made by [`export_layer`](Self::export_layer) (on any node with the
    /// same layout) into `blocks` of `layer`.
    fn import_layer(&mut self, layer: usize, blocks: &[BlockId], bytes: &[u8]) -> Result<()>;

    /// The KV head ranges a transfer ships as separate frames: one per
    /// tensor-parallel rank owning distinct heads (replicas of a head ship
    /// once), in order, covering every KV head without overlap.
    fn kv_head_shards(&self) -> Vec<Range<usize>>;

    /// Heads `heads` of `blocks` of `layer` (see [`KvExport::export_heads`]).
    fn export_heads(
        &self,
        layer: usize,
        blocks: &[BlockId],
        heads: Range<usize>,
    ) -> Result<Vec<u8>>;

    /// Writes a frame of heads `heads` (made by [`export_heads`](Self::export_heads)
    /// on any node whose model has the same KV shape, whatever its tensor
    /// parallelism) into those heads of `blocks` of `layer`; other heads are untouched.
    fn import_heads(
        &mut self,
        layer: usize,
        blocks: &[BlockId],
        heads: Range<usize>,
        bytes: &[u8],
    ) -> Result<()>;

    /// [`import_heads`](Self::import_heads) of a frame given as pieces, in
    /// order (the packets it arrived in). The default joins them, a copy; a
    /// backend that copies the frame anyway (CUDA, into pinned memory)
    /// gathers the pieces instead.
    fn import_heads_vectored(
        &mut self,
        layer: usize,
        blocks: &[BlockId],
        heads: Range<usize>,
        pieces: &[&[u8]],
    ) -> Result<()> {
        match pieces {
            [one] => self.import_heads(layer, blocks, heads, one),
            _ => self.import_heads(layer, blocks, heads, &pieces.concat()),
        }
    }
}

/// Conveniences over [`Backend`], for every backend. Greedy decoding goes
/// through [`Backend::forward_draw`], so a backend that samples on the device
/// (CUDA) keeps its fast path: only token ids cross to the host.
pub trait BackendExt: Backend {
    /// Runs `chunks`; returns the logits of the last token of each.
    fn forward_logits(
        &mut self,
        chunks: &[SeqChunk<'_>],
        on_layer: Option<LayerHook<'_>>,
    ) -> Result<Vec<Vec<f32>>> {
        let out = self.forward(chunks, &vec![true; chunks.len()], on_layer)?;
        out.into_iter()
            .enumerate()
            .map(|(i, l)| {
                l.ok_or_else(|| {
                    EngineError::InvalidInput(format!(
                        "the backend returned no logits for chunk {i}, which asked for them"
                    ))
                })
            })
            .collect()
    }

    /// Like [`forward_logits`](Self::forward_logits), but returns each chunk's
    /// greedy (argmax, lowest id on ties) next token.
    fn forward_greedy(
        &mut self,
        chunks: &[SeqChunk<'_>],
        on_layer: Option<LayerHook<'_>>,
    ) -> Result<Vec<u32>> {
        let draws = vec![TokenDraw::GREEDY; chunks.len()];
        self.forward_draw(chunks, &draws, on_layer)
    }

    /// Prefills `tokens` at positions `start..` of a sequence; returns the last token's logits.
    fn prefill(
        &mut self,
        tokens: &[u32],
        start: usize,
        block_table: &[BlockId],
    ) -> Result<Vec<f32>> {
        let mut out = self.forward_logits(
            &[SeqChunk {
                tokens,
                start,
                block_table,
            }],
            None,
        )?;
        Ok(out.pop().unwrap_or_default())
    }

    /// One decode step: `(token, position, block table)` per sequence; logits per sequence.
    fn decode(&mut self, batch: &[(u32, usize, &[BlockId])]) -> Result<Vec<Vec<f32>>> {
        let tokens: Vec<[u32; 1]> = batch.iter().map(|b| [b.0]).collect();
        let chunks: Vec<SeqChunk<'_>> = batch
            .iter()
            .zip(&tokens)
            .map(|(&(_, start, block_table), t)| SeqChunk {
                tokens: t,
                start,
                block_table,
            })
            .collect();
        self.forward_logits(&chunks, None)
    }
}

impl<B: Backend + ?Sized> BackendExt for B {}

/// A boxed backend is a backend, so nodes can pick one at run time.
impl<B: Backend + ?Sized> Backend for Box<B> {
    fn config(&self) -> &ModelConfig {
        (**self).config()
    }

    fn kv_layout(&self) -> KvLayout {
        (**self).kv_layout()
    }

    fn forward(
        &mut self,
        chunks: &[SeqChunk<'_>],
        logits: &[bool],
        on_layer: Option<LayerHook<'_>>,
    ) -> Result<Vec<Option<Vec<f32>>>> {
        (**self).forward(chunks, logits, on_layer)
    }

    fn start_step(
        &mut self,
        chunks: &[SeqChunk<'_>],
        draws: &[TokenDraw],
        on_layer: Option<LayerHook<'_>>,
    ) -> Result<()> {
        (**self).start_step(chunks, draws, on_layer)
    }

    fn finish_step(&mut self, asks: &[RowAsk<'_>]) -> Result<Vec<RowOut>> {
        (**self).finish_step(asks)
    }

    fn step_running(&self) -> bool {
        (**self).step_running()
    }

    fn computes_every_logit(&self) -> bool {
        (**self).computes_every_logit()
    }

    fn forward_every_logit(&mut self, chunk: &SeqChunk<'_>) -> Result<Vec<Vec<f32>>> {
        (**self).forward_every_logit(chunk)
    }

    fn forward_draw(
        &mut self,
        chunks: &[SeqChunk<'_>],
        draws: &[TokenDraw],
        on_layer: Option<LayerHook<'_>>,
    ) -> Result<Vec<u32>> {
        (**self).forward_draw(chunks, draws, on_layer)
    }
}

impl<B: KvIo + ?Sized> KvIo for Box<B> {
    fn export_layer(&self, layer: usize, blocks: &[BlockId]) -> Result<Vec<u8>> {
        (**self).export_layer(layer, blocks)
    }

    fn import_layer(&mut self, layer: usize, blocks: &[BlockId], bytes: &[u8]) -> Result<()> {
        (**self).import_layer(layer, blocks, bytes)
    }

    fn kv_head_shards(&self) -> Vec<Range<usize>> {
        (**self).kv_head_shards()
    }

    fn export_heads(
        &self,
        layer: usize,
        blocks: &[BlockId],
        heads: Range<usize>,
    ) -> Result<Vec<u8>> {
        (**self).export_heads(layer, blocks, heads)
    }

    fn import_heads(
        &mut self,
        layer: usize,
        blocks: &[BlockId],
        heads: Range<usize>,
        bytes: &[u8],
    ) -> Result<()> {
        (**self).import_heads(layer, blocks, heads, bytes)
    }

    fn import_heads_vectored(
        &mut self,
        layer: usize,
        blocks: &[BlockId],
        heads: Range<usize>,
        pieces: &[&[u8]],
    ) -> Result<()> {
        (**self).import_heads_vectored(layer, blocks, heads, pieces)
    }
}

/// Checks that `logits` has one flag per chunk (see [`Backend::forward`]).
pub fn check_logit_flags(chunks: &[SeqChunk<'_>], logits: &[bool]) -> Result<()> {
    if logits.len() != chunks.len() {
        return Err(EngineError::InvalidInput(format!(
            "{} logits flags for {} sequences",
            logits.len(),
            chunks.len()
        )));
    }
    Ok(())
}

/// Index of the largest value (the first one on ties; 0 for an empty slice).
pub fn argmax(values: &[f32]) -> u32 {
    let mut best = 0;
    for (i, &v) in values.iter().enumerate() {
        if v > values[best] {
            best = i;
        }
    }
    best as u32
}

/// Checks that `draws` has one draw per chunk (see [`Backend::forward_draw`]).
pub fn check_draws(chunks: &[SeqChunk<'_>], draws: &[TokenDraw]) -> Result<()> {
    if draws.len() != chunks.len() {
        return Err(EngineError::InvalidInput(format!(
            "{} draws for {} sequences",
            draws.len(),
            chunks.len()
        )));
    }
    Ok(())
}

/// Checks a batch against the model and cache before any of it runs, so that
/// bad input is an error and never a panic or a half-written cache.
pub fn validate_chunks(
    config: &ModelConfig,
    layout: &KvLayout,
    chunks: &[SeqChunk<'_>],
) -> Result<()> {
    for c in chunks {
        if c.tokens.is_empty() {
            return Err(EngineError::InvalidInput(
                "empty chunk: a sequence needs at least one token".into(),
            ));
        }
        if let Some(&bad) = c.tokens.iter().find(|&&t| t as usize >= config.vocab_size) {
            return Err(EngineError::InvalidInput(format!(
                "token id {bad} is out of the vocabulary (size {})",
                config.vocab_size
            )));
        }
        let end = c.start + c.tokens.len();
        if end > config.max_position_embeddings {
            return Err(EngineError::InvalidInput(format!(
                "sequence of {end} tokens is longer than the model's context of {} tokens",
                config.max_position_embeddings
            )));
        }
        if crate::block_manager::blocks_for(end, layout.block_size) > c.block_table.len() {
            return Err(EngineError::InvalidInput(format!(
                "block table of {} blocks cannot hold {end} tokens",
                c.block_table.len()
            )));
        }
        if let Some(&b) = c
            .block_table
            .iter()
            .find(|&&b| b as usize >= layout.num_blocks)
        {
            return Err(EngineError::InvalidInput(format!(
                "block {b} is beyond the cache's {} blocks",
                layout.num_blocks
            )));
        }
    }
    Ok(())
}
