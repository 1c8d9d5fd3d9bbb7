//! The CPU backend: the Llama-family forward pass ([`llama::forward`]) in
//! f32 on candle-core tensors, on one rank or sharded over `tp`
//! tensor-parallel ranks ([`tp`](crate::tp)). TP = 1 is the same code with
//! one rank; it is the reference the CUDA backend is checked against.
//!
//! Threads: each forward pass runs the ranks as scoped threads (rank 0 on the
//! caller's thread; at TP = 1 no thread is started), synchronised by a
//! barrier-based all-reduce. Spawning a few threads per forward pass costs
//! tens of microseconds, noise beside the matmuls of a CPU forward pass, and
//! in exchange the ranks borrow the weights and caches directly (no
//! reference counting per pass, no long-lived pool to shut down), and a
//! forward pass cannot outlive its inputs.

use std::ops::Range;
use std::sync::{Arc, Mutex};

use candle_core::{DType, Device, Tensor};

use crate::backend::{
    Backend, BackendExt, KvExport, KvIo, LayerHook, SeqChunk, check_draws, check_logit_flags,
    validate_chunks,
};
use crate::block_manager::BlockId;
use crate::config::ModelConfig;
use crate::error::{EngineError, Result};
use crate::kv_cache::{CpuKvCache, KvDtype, KvLayout};
use crate::llama::forward::Pass;
use crate::llama::{Activations, ModelWeights, ShardSpec, WeightScope};
use crate::rope;
use crate::row_sampling::{HostStep, RowAsk, RowOut};
use crate::sampling::TokenDraw;
use crate::tp::{Collective, RankCaches, TpPlan};
use crate::weights::Weights;

/// Fixes the thread count candle's CPU matmuls use, once, for the process.
///
/// Unless `RAYON_NUM_THREADS` is set, candle works the count out again on
/// every matmul, by reading and parsing `/proc/cpuinfo` (~6% of a CPU decode
/// step of a 135M model, measured with `perf`). This sets the variable to
/// that same count, so the matmuls use as many threads as before and only
/// read the variable (rayon's pool takes the same count). A value the user
/// set is kept.
///
/// # Safety
///
/// Call it first in `main`, before any other thread is started: it sets an
/// environment variable (`std::env::set_var`).
pub unsafe fn fix_cpu_thread_count() {
    if std::env::var_os("RAYON_NUM_THREADS").is_none() {
        let threads = candle_core::utils::get_num_threads();
        // SAFETY: the caller guarantees no other thread is running.
        unsafe { std::env::set_var("RAYON_NUM_THREADS", threads.to_string()) };
    }
}

/// The model's weights on the CPU, each rank's share. A clone shares the
/// weights (read-only once loaded) with the original.
#[derive(Clone)]
pub struct CpuModel {
    pub(crate) config: ModelConfig,
    plan: TpPlan,
    ranks: Arc<[ModelWeights]>,
    inv_freq: Vec<f32>,
}

impl CpuModel {
    /// Loads every tensor the config calls for onto one rank; a missing one
    /// is an error naming it.
    pub fn load(config: &ModelConfig, w: &Weights) -> Result<Self> {
        Self::load_sharded(config, w, 1)
    }

    /// Whether `self` and `other` share their weights (one is a clone of the other).
    pub fn shares_weights_with(&self, other: &CpuModel) -> bool {
        Arc::ptr_eq(&self.ranks, &other.ranks)
    }

    /// Loads each of `tp` ranks' share of the weights.
    pub fn load_sharded(config: &ModelConfig, w: &Weights, tp: usize) -> Result<Self> {
        let plan = TpPlan::new(config, tp)?;
        let vb = WeightScope::new(w, DType::F32, &Device::Cpu);
        let ranks = (0..tp)
            .map(|rank| ModelWeights::load(&vb, config, ShardSpec::Rank { plan: &plan, rank }))
            .collect::<Result<Arc<[_]>>>()?;
        Ok(CpuModel {
            config: config.clone(),
            plan,
            ranks,
            inv_freq: rope::inv_freq(config),
        })
    }
}

/// The CPU model together with each rank's KV cache.
pub struct CpuBackend {
    model: CpuModel,
    caches: Vec<Mutex<CpuKvCache>>,
    layout: KvLayout,
    /// The logits of a step started and not yet finished.
    step: HostStep,
    /// The activations' precision (f32 unless a check asks for bf16).
    act: Activations,
}

impl CpuBackend {
    /// A backend with a zeroed cache of `num_blocks` blocks of `block_size`
    /// tokens per rank (for the KV heads it holds).
    pub fn new(model: CpuModel, num_blocks: usize, block_size: usize) -> Result<Self> {
        Self::with_kv_dtype(model, num_blocks, block_size, KvDtype::F32)
    }

    /// Like [`new`](Self::new) with the cache in `dtype`: f32 (the CPU's own)
    /// or fp8 e4m3 (quantized as [`kv_quant`](crate::kv_quant) says,
    /// dequantized when attention reads it).
    pub fn with_kv_dtype(
        model: CpuModel,
        num_blocks: usize,
        block_size: usize,
        dtype: KvDtype,
    ) -> Result<Self> {
        let c = &model.config;
        let layout = KvLayout {
            num_layers: c.num_layers,
            num_blocks,
            block_size,
            num_kv_heads: c.num_kv_heads,
            head_dim: c.head_dim,
            dtype,
        };
        let caches = (0..model.plan.tp)
            .map(|r| {
                CpuKvCache::new(KvLayout {
                    num_kv_heads: model.plan.kv_heads(r).len(),
                    ..layout
                })
                .map(Mutex::new)
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(CpuBackend {
            model,
            caches,
            layout,
            step: HostStep::default(),
            act: Activations::F32,
        })
    }

    /// The same backend with its activations rounded as `act` says: bf16 makes
    /// it the CUDA backend's reference for what bf16 arithmetic itself loses.
    pub fn with_activations(mut self, act: Activations) -> Self {
        self.act = act;
        self
    }

    /// The split over tensor-parallel ranks (one rank at TP = 1).
    pub fn plan(&self) -> &TpPlan {
        &self.model.plan
    }

    fn rank_caches(&self) -> RankCaches<'_> {
        RankCaches {
            plan: &self.model.plan,
            caches: &self.caches,
            layout: self.layout,
        }
    }
}

impl KvExport for CpuKvCache {
    fn export_layer(&self, layer: usize, blocks: &[BlockId]) -> Result<Vec<u8>> {
        CpuKvCache::export_layer(self, layer, blocks)
    }

    fn export_heads(
        &self,
        layer: usize,
        blocks: &[BlockId],
        heads: Range<usize>,
    ) -> Result<Vec<u8>> {
        CpuKvCache::export_heads(self, layer, blocks, heads)
    }
}

impl CpuBackend {
    /// Runs `chunks`, checked with `validate_chunks`, through the model (their
    /// K/V into the cache) and returns the logits of the tokens `logit_rows`
    /// names (indices into the chunks' tokens laid end to end), in that order.
    fn run(
        &mut self,
        chunks: &[SeqChunk<'_>],
        logit_rows: &[u32],
        on_layer: Option<LayerHook<'_>>,
    ) -> Result<Vec<Vec<f32>>> {
        if chunks.is_empty() {
            return Ok(Vec::new());
        }
        let (cpu, model) = (&Device::Cpu, &self.model);
        let hd = model.config.head_dim;
        let ids: Vec<u32> = chunks
            .iter()
            .flat_map(|ch| ch.tokens.iter().copied())
            .collect();
        let positions: Vec<usize> = chunks
            .iter()
            .flat_map(|ch| ch.start..ch.start + ch.tokens.len())
            .collect();
        let n = ids.len();
        let (cos, sin) = rope::cos_sin(&model.inv_freq, &positions);
        let cos = Tensor::from_vec(cos, (n, 1, hd / 2), cpu)?;
        let sin = Tensor::from_vec(sin, (n, 1, hd / 2), cpu)?;
        let tp = model.plan.tp;
        let coll = Collective::new(tp);
        let pass = Pass {
            config: &model.config,
            plan: &model.plan,
            layout: self.layout,
            chunks,
            logit_rows,
            ids: &ids,
            cos: &cos,
            sin: &sin,
            caches: &self.caches,
            coll: &coll,
            with_hook: on_layer.is_some(),
            act: self.act,
        };
        let ranks = &model.ranks;
        let results: Vec<Result<Option<Tensor>>> = std::thread::scope(|s| {
            let handles: Vec<_> = (1..tp)
                .map(|r| {
                    let pass = &pass;
                    std::thread::Builder::new()
                        .name(format!("tp-rank-{r}"))
                        .spawn_scoped(s, move || pass.run_rank(r, &ranks[r], None))
                })
                .collect();
            let mut results = vec![pass.run_rank(0, &ranks[0], on_layer)];
            for h in handles {
                results.push(match h {
                    Ok(h) => h.join().unwrap_or_else(|_| {
                        Err(EngineError::TensorParallel("a rank thread panicked".into()))
                    }),
                    Err(e) => Err(EngineError::TensorParallel(format!(
                        "cannot start a rank thread: {e}"
                    ))),
                });
            }
            results
        });
        // The first rank's own error (not a peer's echo of it) is the one to report.
        let mut rows = None;
        let mut first_error: Option<EngineError> = None;
        for res in results {
            match res {
                Ok(t) => rows = rows.or(Some(t)),
                Err(e) => {
                    if first_error
                        .as_ref()
                        .is_none_or(|f| matches!(f, EngineError::PeerRankFailed))
                    {
                        first_error = Some(e);
                    }
                }
            }
        }
        if let Some(e) = first_error {
            return Err(e);
        }
        let rows = rows
            .ok_or_else(|| EngineError::TensorParallel("no rank returned logits".into()))?
            .map(|t| t.to_vec2::<f32>())
            .transpose()?
            .unwrap_or_default();
        Ok(rows)
    }
}

impl Backend for CpuBackend {
    fn config(&self) -> &ModelConfig {
        &self.model.config
    }

    fn kv_layout(&self) -> KvLayout {
        self.layout
    }

    fn forward(
        &mut self,
        chunks: &[SeqChunk<'_>],
        logits: &[bool],
        on_layer: Option<LayerHook<'_>>,
    ) -> Result<Vec<Option<Vec<f32>>>> {
        check_logit_flags(chunks, logits)?;
        validate_chunks(&self.model.config, &self.layout, chunks)?;
        // The last token of each chunk that asks for logits (none is empty).
        let mut logit_rows = Vec::new();
        let mut end = 0;
        for (ch, &want) in chunks.iter().zip(logits) {
            end += ch.tokens.len();
            if want {
                logit_rows.push((end - 1) as u32);
            }
        }
        let mut rows = self.run(chunks, &logit_rows, on_layer)?.into_iter();
        Ok(logits
            .iter()
            .map(|&want| if want { rows.next() } else { None })
            .collect())
    }

    fn computes_every_logit(&self) -> bool {
        true
    }

    fn forward_every_logit(&mut self, chunk: &SeqChunk<'_>) -> Result<Vec<Vec<f32>>> {
        validate_chunks(
            &self.model.config,
            &self.layout,
            std::slice::from_ref(chunk),
        )?;
        let rows: Vec<u32> = (0..chunk.tokens.len() as u32).collect();
        self.run(std::slice::from_ref(chunk), &rows, None)
    }

    fn start_step(
        &mut self,
        chunks: &[SeqChunk<'_>],
        draws: &[TokenDraw],
        on_layer: Option<LayerHook<'_>>,
    ) -> Result<()> {
        check_draws(chunks, draws)?;
        let logits = self.forward_logits(chunks, on_layer)?;
        self.step.keep(logits, draws);
        Ok(())
    }

    fn finish_step(&mut self, asks: &[RowAsk<'_>]) -> Result<Vec<RowOut>> {
        self.step.finish(asks)
    }
}

impl KvIo for CpuBackend {
    fn export_layer(&self, layer: usize, blocks: &[BlockId]) -> Result<Vec<u8>> {
        self.rank_caches()
            .export(layer, blocks, 0..self.layout.num_kv_heads)
    }

    fn import_layer(&mut self, layer: usize, blocks: &[BlockId], bytes: &[u8]) -> Result<()> {
        self.rank_caches()
            .import(layer, blocks, 0..self.layout.num_kv_heads, bytes)
    }

    fn kv_head_shards(&self) -> Vec<Range<usize>> {
        let plan = &self.model.plan;
        (0..plan.tp)
            .filter(|&r| plan.ships_kv(r))
            .map(|r| plan.kv_heads(r))
            .collect()
    }

    fn export_heads(
        &self,
        layer: usize,
        blocks: &[BlockId],
        heads: Range<usize>,
    ) -> Result<Vec<u8>> {
        self.rank_caches().export(layer, blocks, heads)
    }

    fn import_heads(
        &mut self,
        layer: usize,
        blocks: &[BlockId],
        heads: Range<usize>,
        bytes: &[u8],
    ) -> Result<()> {
        self.rank_caches().import(layer, blocks, heads, bytes)
    }
}
