//! The CUDA backend (feature `cuda`): the Llama-family forward pass on one GPU
//! in bf16, with the paged KV cache in GPU memory.
//!
//! - [`device`]: the GPU, its streams, the NVRTC-compiled kernels and cuBLAS.
//! - `program`: the NVRTC program, `kernels/*.cu` (common helpers, per-token
//!   layer kernels, decode attention, sampling, prefill attention, GEMV)
//!   concatenated in one order, and the constants shared with them as `-D` defines.
//! - `launch`: one typed launch per kernel, its argument order written once
//!   (and tested against the kernel source), its grid beside it.
//! - `pass`: one forward pass: its metadata upload and the launches it queues.
//! - [`model`]: weights in GPU memory, from safetensors or random of a named shape.
//! - [`kv`]: the cache (same layout as the CPU backend's, bf16 or fp8 e4m3 with
//!   per-block scales) and its copy path through pinned memory on a stream of its
//!   own (`staging`: the export ring).
//! - [`bench`]: what benchmarks and checks alone do ([`BenchControls`]: poison,
//!   graphs and PDL on/off, profiles, random caches; named shapes).
//! - [`check`]: the CUDA backend against the CPU backend on synthesized models
//!   (`tandem-gpu-bench check` and the GPU tests).
//!
//! Where `unsafe` lives: driver, NVRTC and cuBLAS calls in `device` (the
//! [`Launch`](device::Launch) builder under every kernel launch); the typed
//! launches, `unsafe fn`s whose contract names what each address must hold, in
//! `launch`; their calls with the backend's own buffers in `pass` and `device`
//! (products); pinned host memory in `kv`, `staging` and this module (the
//! metadata buffer); and `DecodeGraph`'s `Send`. Each block has a `SAFETY` line.
//! Raw device addresses never leave the crate: public methods take buffers.
//!
//! One forward pass over `n` tokens: embedding; per layer RMSNorm (fused with the
//! residual add), one GEMM for q/k/v, rotary embedding fused with the cache write
//! (an fp8 cache: rotated K/V in f32, then `kv_fp8_store` quantizes them as the
//! CPU does, bit for bit), attention (paged, split along the context for decode
//! batches; tiled causal flash attention on tensor cores for prefill chunks; an
//! fp8 cache is expanded into bf16 tiles in shared memory as it is read), the
//! output GEMM, RMSNorm,
//! one GEMM for gate/up, SiLU·up, the down GEMM; then the final norm and the LM
//! head for each chunk's last token only. The residual stream is f32, GEMMs take
//! bf16 and accumulate in f32. Every buffer is allocated once, at construction,
//! for at most [`CudaLimits::max_tokens`] tokens and [`CudaLimits::max_seqs`]
//! sequences per pass. Sampling (greedy, temperature, top-k, top-p, min-p)
//! runs on the GPU ([`Backend::finish_step`]), with grammar masks and log
//! probabilities (`masked_sampling`), so only token ids and the numbers asked
//! for cross to the host.
//!
//! Decode steps run as CUDA graphs, one per batch-size bucket (captured at first
//! use): the batch is padded to the bucket (padding rows write their K/V to a
//! scratch block), and nothing that changes from step to step is a launch
//! parameter: token ids, positions, block tables, their row stride, sequence
//! lengths and sampling parameters are read from the metadata buffer, uploaded
//! before each replay, and the decode attention splits each sequence's context
//! by its own length on the device. `TANDEM_CUDA_GRAPHS=0` launches the same
//! kernels one by one instead.

pub mod bench;
pub mod check;
mod check_fp8;
mod check_norm;
mod check_sampling;
mod copy_ring;
pub mod device;
pub mod error;
mod gemm_tune;
pub mod kv;
mod launch;
mod masked_sampling;
pub mod model;
mod pass;
mod program;
mod staging;
mod tensor_map;

use std::cell::RefCell;
use std::collections::HashMap;
use std::ops::Range;
use std::sync::Arc;

use cudarc::driver::{CudaEvent, CudaGraph, CudaSlice, PinnedHostSlice};
use half::bf16;

pub use bench::BenchControls;
pub use device::Gpu;
pub use error::CudaError;
pub use gemm_tune::Tuning;
pub use kv::GpuKvCache;
pub use model::GpuModel;

use crate::backend::{
    Backend, KvIo, LayerHook, SeqChunk, check_draws, check_logit_flags, validate_chunks,
};
use crate::block_manager::{BlockId, blocks_for};
use crate::config::ModelConfig;
use crate::error::{EngineError, Result};
use crate::kv_cache::{KvDtype, KvLayout};
use crate::model_dir::GpuPriority;
use crate::row_sampling::{RowAsk, RowOut, check_asks};
use crate::sampling::TokenDraw;
use device::ptr;
use error::DriverContext;
use launch::MAX_SPLITS;
use masked_sampling::RowDraw;
use pass::{Meta, Pass};
/// Decode batch sizes a graph is captured for; a batch runs in the smallest
/// bucket that holds it (and without a graph above the largest).
const GRAPH_BUCKETS: &[usize] = &[1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128, 160, 192, 256];

/// What one forward pass may hold; buffers are sized for it once.
#[derive(Debug, Clone, Copy)]
pub struct CudaLimits {
    /// Tokens in one pass (all chunks together).
    pub max_tokens: usize,
    /// Chunks (sequences) in one pass.
    pub max_seqs: usize,
    /// Blocks the pinned staging buffer for synchronous KV export/import holds.
    pub staging_blocks: usize,
    /// Bytes of the pinned ring asynchronous exports land in (0: room for eight
    /// layers of a pass of `max_tokens` tokens).
    pub export_ring_bytes: usize,
    /// The cache's dtype: bf16 or fp8_e4m3 (docs/FP8_KV.md).
    pub kv_dtype: KvDtype,
    /// The rank of its streams against other backends' on the GPU.
    pub priority: GpuPriority,
}

impl Default for CudaLimits {
    fn default() -> Self {
        CudaLimits {
            max_tokens: 8192,
            max_seqs: 256,
            staging_blocks: 2048,
            export_ring_bytes: 0,
            kv_dtype: KvDtype::Bf16,
            priority: GpuPriority::Normal,
        }
    }
}

impl From<crate::model_dir::BatchLimits> for CudaLimits {
    /// Buffers for a node's passes. A decode batch padded to its graph bucket
    /// adds one token per padding row, so there is room for at least one token
    /// per sequence.
    fn from(b: crate::model_dir::BatchLimits) -> Self {
        CudaLimits {
            max_tokens: b.max_tokens.max(b.max_seqs),
            max_seqs: b.max_seqs,
            priority: b.priority,
            ..CudaLimits::default()
        }
    }
}

/// Activation buffers, allocated once.
struct Buffers {
    x: CudaSlice<f32>,
    delta: CudaSlice<f32>,
    h: CudaSlice<bf16>,
    qkv: CudaSlice<bf16>,
    q: CudaSlice<bf16>,
    attn: CudaSlice<bf16>,
    gu: CudaSlice<bf16>,
    act: CudaSlice<bf16>,
    last_h: CudaSlice<bf16>,
    logits: CudaSlice<f32>,
    ids_out: CudaSlice<u32>,
    part_o: CudaSlice<f32>,
    part_ml: CudaSlice<f32>,
    inv_freq: CudaSlice<f32>,
    /// Per-pass metadata (token ids, positions, slots, chunk descriptors, block tables).
    meta: CudaSlice<i32>,
    /// An fp8 cache: a layer's rotated K and V as f32 (`[tokens, 2, hkv, hd]`),
    /// between `rope_kv` and `kv_fp8_store`.
    kv_f32: Option<CudaSlice<f32>>,
}

/// A captured decode step.
struct DecodeGraph(CudaGraph);

// SAFETY: a graph is only touched through `&mut CudaBackend`, so by one thread at a
// time (the backend moves between threads but is never shared); CUDA allows a graph
// to be launched from any thread when calls are serialized.
unsafe impl Send for DecodeGraph {}

/// Weights loaded on each GPU, shared by the backends of one process on that
/// GPU while any of them lives. Their contexts are the device's primary one,
/// so one backend's device pointers are valid in another's streams, and the
/// weights are only read after loading.
#[derive(Default)]
pub struct GpuModels(std::sync::Mutex<HashMap<usize, std::sync::Weak<GpuModel>>>);

impl GpuModels {
    /// The weights on GPU `ordinal`: those a live backend holds, else loaded
    /// through `gpu` from `weights()` (once: a second caller waits for the first).
    fn get_or_load(
        &self,
        gpu: &Gpu,
        ordinal: usize,
        config: &ModelConfig,
        weights: impl FnOnce() -> Result<crate::weights::Weights>,
    ) -> Result<Arc<GpuModel>> {
        let mut models = self.0.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(model) = models.get(&ordinal).and_then(std::sync::Weak::upgrade) {
            tracing::info!(ordinal, "sharing the weights already loaded on this GPU");
            return Ok(model);
        }
        let model = Arc::new(GpuModel::load(gpu, config, &weights()?)?);
        // The uploads are on this backend's stream: done before another reads them.
        gpu.sync()?;
        models.insert(ordinal, Arc::downgrade(&model));
        Ok(model)
    }
}

/// The model and its KV cache on one GPU.
pub struct CudaBackend {
    gpu: Gpu,
    /// The weights; shared with the other backends of this process on the
    /// same GPU ([`GpuModels`]).
    model: Arc<GpuModel>,
    kv: GpuKvCache,
    limits: CudaLimits,
    bufs: Buffers,
    meta_host: PinnedHostSlice<i32>,
    meta_cap: usize,
    /// Longest block table a sequence can have.
    max_table: usize,
    /// Decode-step graphs by batch bucket.
    graphs: HashMap<usize, DecodeGraph>,
    /// Graphs in use (false after `TANDEM_CUDA_GRAPHS=0` or a failed capture).
    use_graphs: bool,
    /// Decode attention blocks the split count aims at, when set (benchmarks);
    /// else [`decode_splits`] decides.
    decode_blocks: Option<usize>,
    /// While [`profile`](Self::profile) runs: an event after every launch.
    marks: RefCell<Option<Vec<(&'static str, CudaEvent)>>>,
    /// The draws of the step [`Backend::start_step`] queued, until
    /// [`Backend::finish_step`] takes its rows.
    pending: Option<Vec<TokenDraw>>,
    /// Recorded on the compute stream after the queued step's work, for
    /// [`Backend::step_running`].
    step_done: Option<CudaEvent>,
}

impl CudaBackend {
    /// A backend over `model` with a zeroed cache of `num_blocks` blocks of `block_size` tokens.
    pub fn new(
        mut gpu: Gpu,
        model: Arc<GpuModel>,
        num_blocks: usize,
        block_size: usize,
        limits: CudaLimits,
    ) -> Result<Self> {
        let c = model.config.clone();
        if block_size == 0 || num_blocks == 0 || limits.max_tokens == 0 || limits.max_seqs == 0 {
            return Err(EngineError::InvalidInput(
                "the CUDA backend needs blocks, a block size and room for tokens".into(),
            ));
        }
        let layout = KvLayout {
            num_layers: c.num_layers,
            num_blocks,
            block_size,
            num_kv_heads: c.num_kv_heads,
            head_dim: c.head_dim,
            dtype: limits.kv_dtype,
        };
        let ring = if limits.export_ring_bytes > 0 {
            limits.export_ring_bytes
        } else {
            8 * (blocks_for(limits.max_tokens, block_size) + 1) * layout.block_bytes()
        };
        let kv = GpuKvCache::new(&gpu, layout, limits.staging_blocks, ring)?;
        gpu.set_pass_rows(limits.max_tokens);
        let (t, s) = (limits.max_tokens, limits.max_seqs);
        let (h, hd) = (c.hidden_size, c.head_dim);
        let qd = c.num_heads * hd;
        let qkvw = (c.num_heads + 2 * c.num_kv_heads) * hd;
        let inter = c.intermediate_size;
        let max_table = blocks_for(c.max_position_embeddings, block_size).min(num_blocks);
        // Sections of `pass::Meta`: 3 per token, 10 per sequence, the stride, the
        // fp8 store's runs, the block tables.
        let meta_cap = 3 * t + 10 * s + 1 + t + 1 + s * max_table;
        let bufs = Buffers {
            x: gpu.zeros(t * h)?,
            delta: gpu.zeros(t * h)?,
            h: gpu.zeros(t * h)?,
            qkv: gpu.zeros(t * qkvw)?,
            q: gpu.zeros(t * qd)?,
            attn: gpu.zeros(t * qd)?,
            gu: gpu.zeros(t * 2 * inter)?,
            act: gpu.zeros(t * inter)?,
            last_h: gpu.zeros(s * h)?,
            logits: gpu.zeros(s * c.vocab_size)?,
            ids_out: gpu.zeros(s)?,
            part_o: gpu.zeros(s * c.num_heads * MAX_SPLITS * hd)?,
            part_ml: gpu.zeros(s * c.num_heads * MAX_SPLITS * 2)?,
            inv_freq: gpu.upload(&crate::rope::inv_freq(&c))?,
            meta: gpu.zeros(meta_cap)?,
            kv_f32: match layout.dtype {
                KvDtype::Fp8E4m3 => Some(gpu.zeros(t * 2 * c.num_kv_heads * hd)?),
                _ => None,
            },
        };
        // SAFETY: plain pinned memory, written by the host before each pass and read by
        // a copy that completes before the pass returns.
        let meta_host =
            unsafe { gpu.ctx.alloc_pinned_with_flags::<i32>(meta_cap, 0) }.op("cuMemHostAlloc")?;
        gpu.sync()?;
        let backend = CudaBackend {
            gpu,
            model,
            kv,
            limits,
            bufs,
            meta_host,
            meta_cap,
            max_table,
            graphs: HashMap::new(),
            use_graphs: std::env::var("TANDEM_CUDA_GRAPHS").map_or(true, |v| v != "0"),
            marks: RefCell::new(None),
            decode_blocks: None,
            pending: None,
            step_done: None,
        };
        backend.tune_products()?;
        Ok(backend)
    }

    /// Opens GPU `ordinal`, loads a safetensors model onto it and makes a cache.
    pub fn load(
        ordinal: usize,
        config: &ModelConfig,
        weights: &crate::weights::Weights,
        num_blocks: usize,
        block_size: usize,
        limits: CudaLimits,
    ) -> Result<Self> {
        let gpu = Gpu::open_ranked(ordinal, config, limits.priority)?;
        let model = GpuModel::load(&gpu, config, weights)?;
        Self::new(gpu, Arc::new(model), num_blocks, block_size, limits)
    }

    /// Like [`load`](Self::load), with the weights `models` already holds for
    /// GPU `ordinal` if a backend of this process loaded them there (the
    /// prefill and decode nodes of one `tandem up` process share one copy).
    pub fn load_shared(
        ordinal: usize,
        config: &ModelConfig,
        models: &GpuModels,
        weights: impl FnOnce() -> Result<crate::weights::Weights>,
        (num_blocks, block_size): (usize, usize),
        limits: CudaLimits,
    ) -> Result<Self> {
        let gpu = Gpu::open_ranked(ordinal, config, limits.priority)?;
        let model = models.get_or_load(&gpu, ordinal, config, weights)?;
        Self::new(gpu, model, num_blocks, block_size, limits)
    }

    /// The GPU.
    pub fn gpu(&self) -> &Gpu {
        &self.gpu
    }

    /// The weights.
    pub fn model(&self) -> &GpuModel {
        &self.model
    }

    /// The KV cache (for moving layers without the `Backend` trait's copy into a `Vec`).
    pub fn kv(&self) -> &GpuKvCache {
        &self.kv
    }

    /// Runs the layers; leaves each chunk's last-token logits in `bufs.logits`.
    fn run(&mut self, chunks: &[SeqChunk<'_>], on_layer: Option<LayerHook<'_>>) -> Result<()> {
        validate_chunks(&self.model.config, self.kv.layout(), chunks)?;
        self.gpu.bind()?;
        let (m, pass) = self.upload_meta(chunks, &[], None)?;
        self.enqueue(&m, pass, on_layer)
    }

    /// One decode step as a graph replay: the batch padded to its bucket, the
    /// bucket's graph captured on first use.
    fn decode_graph(&mut self, chunks: &[SeqChunk<'_>], draws: &[TokenDraw]) -> Result<()> {
        let Some(&bucket) = GRAPH_BUCKETS
            .iter()
            .find(|&&b| b >= chunks.len() && b <= self.limits.max_seqs)
        else {
            return self.direct(chunks, draws, None);
        };
        let (m, pass) = self.upload_meta(chunks, draws, Some(bucket))?;
        if !self.graphs.contains_key(&bucket) {
            if self.gpu.gemm_tune() {
                // One pass launched directly first, so that the products of this
                // batch size are tuned (`gemm_tune`), which waits on the stream and
                // so cannot happen inside the capture. It writes what the graph's
                // first replay writes again.
                self.enqueue(&m, pass, None)?;
            }
            match self.capture(&m, pass) {
                Ok(graph) => {
                    self.graphs.insert(bucket, DecodeGraph(graph));
                }
                Err(e) => {
                    tracing::warn!(
                        "capturing a CUDA graph for decode batches of {bucket} failed ({e}); running without graphs"
                    );
                    self.use_graphs = false;
                    return self.direct(chunks, draws, None);
                }
            }
        }
        if let Some(graph) = self.graphs.get(&bucket) {
            graph.0.launch().op("cuGraphLaunch")?;
        }
        Ok(())
    }

    /// Captures one decode step (layers and sampling) for metadata laid out as `m`.
    fn capture(&self, m: &Meta, pass: Pass) -> Result<CudaGraph> {
        use cudarc::driver::sys::{CUgraphInstantiate_flags, CUstreamCaptureMode};
        let st = &self.gpu.compute;
        st.begin_capture(CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_THREAD_LOCAL)
            .op("cuStreamBeginCapture")?;
        let queued = self
            .enqueue(m, pass, None)
            .and_then(|()| self.enqueue_sample(m, pass));
        let ended = st.end_capture(CUgraphInstantiate_flags(0));
        queued?;
        let graph = ended
            .op("cuStreamEndCapture")?
            .ok_or_else(|| CudaError::Unsupported("the captured decode graph is empty".into()))?;
        graph.upload().op("cuGraphUpload")?;
        Ok(graph)
    }

    /// A pass launched kernel by kernel, sampled on the device.
    fn direct(
        &mut self,
        chunks: &[SeqChunk<'_>],
        draws: &[TokenDraw],
        on_layer: Option<LayerHook<'_>>,
    ) -> Result<()> {
        let (m, pass) = self.upload_meta(chunks, draws, None)?;
        self.enqueue(&m, pass, on_layer)?;
        self.enqueue_sample(&m, pass)
    }

    /// The rows of a finished step that ask for more than their draw's token
    /// (see [`Backend::finish_step`]): logits rows leave the device first (as
    /// the pass left them), then every row is masked, sampled and given its
    /// log probabilities on the device.
    fn finish_rows(&self, draws: &[TokenDraw], asks: &[RowAsk<'_>]) -> Result<Vec<RowOut>> {
        let v = self.model.config.vocab_size;
        let st = &self.gpu.compute;
        let wanted: Vec<bool> = asks.iter().map(|a| a.logits).collect();
        let logits = self.download_logits(&wanted)?;
        let rows: Vec<RowDraw<'_>> = draws
            .iter()
            .zip(asks)
            .map(|(&draw, a)| RowDraw {
                draw,
                mask: a.mask,
                logprobs: a.logprobs,
            })
            .collect();
        // SAFETY: `bufs.logits` holds `max_seqs` ≥ `rows.len()` rows of `v`
        // f32, written by the step queued on the compute stream.
        let chosen = unsafe {
            masked_sampling::sample_rows_masked(
                &self.gpu,
                launch::Dev::of(&self.bufs.logits, st),
                v,
                &rows,
            )
        }?;
        Ok(chosen
            .into_iter()
            .zip(logits)
            .map(|((token, logprobs), l)| match l {
                Some(l) => RowOut::Logits(l),
                None => RowOut::Token { token, logprobs },
            })
            .collect())
    }

    /// The logits rows the last pass left in `bufs.logits` for which `wanted`
    /// is true (`None` for the others): one copy per run of consecutive
    /// wanted rows (one copy when every row is wanted).
    fn download_logits(&self, wanted: &[bool]) -> Result<Vec<Option<Vec<f32>>>> {
        let v = self.model.config.vocab_size;
        let base = ptr(&self.bufs.logits, &self.gpu.compute);
        let mut out: Vec<Option<Vec<f32>>> = vec![None; wanted.len()];
        let mut i = 0;
        while i < wanted.len() {
            if !wanted[i] {
                i += 1;
                continue;
            }
            let end = (i..wanted.len())
                .find(|&j| !wanted[j])
                .unwrap_or(wanted.len());
            let mut flat = vec![0f32; (end - i) * v];
            let offset = (i * v * std::mem::size_of::<f32>()) as u64;
            self.gpu.download(base + offset, &mut flat)?;
            for (k, row) in flat.chunks_exact(v).enumerate() {
                out[i + k] = Some(row.to_vec());
            }
            i = end;
        }
        Ok(out)
    }

    fn download_ids(&self, n: usize) -> Result<Vec<u32>> {
        let mut out = vec![0u32; n];
        self.gpu
            .download(ptr(&self.bufs.ids_out, &self.gpu.compute), &mut out)?;
        Ok(out)
    }
}

/// Waves of decode attention blocks a large batch's step aims at. Four beat
/// ten (the rule until the twentieth session: 4096 blocks) at every batch size
/// that uses them, in 32-layer 8B steps with the two taking turns
/// (docs/GPU_BENCH.md, twentieth session): on an H200 b32-b128 steps 1.5-8%
/// faster and b256 the same (0.98-1.015); on an H100 b256 2-3% faster. Longer
/// blocks pay their start and the split merge less often; a sequence far longer
/// than the rest of its batch gets fewer, longer splits than it did.
const DECODE_WAVES: usize = 4;

/// Splits per sequence the decode attention grid has for a batch of `s`
/// sequences, `wave` blocks being resident at once: a batch whose sequences ×
/// KV heads fill at most half a wave is split to fill exactly one (a block's
/// fixed cost is paid once; measured on the H200 at 4k context: batch 1 25.7 →
/// 18.8 µs a layer, batch 8 111 → 72 µs against aiming at 4096 blocks); a
/// larger one aims at [`DECODE_WAVES`] waves (at batch 32 and 4k context, one
/// split per sequence and head, under one wave, measured slower: 2268 against
/// 2139 µs for a 4-layer step). Each sequence then uses as many splits as its
/// own length needs (kernels/decode_attn.cu, `split_chunk`).
fn decode_splits(s: usize, hkv: usize, wave: usize) -> usize {
    let blocks = if 2 * s * hkv <= wave {
        wave
    } else {
        DECODE_WAVES * wave
    };
    splits_aiming_at(blocks, s, hkv)
}

/// Splits per sequence that make about `blocks` decode attention blocks for `s`
/// sequences of `hkv` KV heads.
fn splits_aiming_at(blocks: usize, s: usize, hkv: usize) -> usize {
    (blocks / (s * hkv).max(1)).clamp(1, MAX_SPLITS)
}

impl Backend for CudaBackend {
    fn config(&self) -> &ModelConfig {
        &self.model.config
    }

    fn kv_layout(&self) -> KvLayout {
        *self.kv.layout()
    }

    fn forward(
        &mut self,
        chunks: &[SeqChunk<'_>],
        logits: &[bool],
        on_layer: Option<LayerHook<'_>>,
    ) -> Result<Vec<Option<Vec<f32>>>> {
        check_logit_flags(chunks, logits)?;
        if chunks.is_empty() {
            return Ok(Vec::new());
        }
        self.run(chunks, on_layer)?;
        self.download_logits(logits)
    }

    /// Yes: `forward_every_logit` below (its GPU test,
    /// `check_sampling::gpu_every_logit_rows_are_each_prefix_s_last`, passed on
    /// an H200 on 2026-12-05).
    fn computes_every_logit(&self) -> bool {
        true
    }

    /// In passes of at most `max_seqs` tokens (the rows the logits buffer
    /// holds), each one's logits downloaded before the next.
    fn forward_every_logit(&mut self, chunk: &SeqChunk<'_>) -> Result<Vec<Vec<f32>>> {
        validate_chunks(
            &self.model.config,
            self.kv.layout(),
            std::slice::from_ref(chunk),
        )?;
        self.gpu.bind()?;
        let piece_len = self.limits.max_seqs.max(1);
        let mut out = Vec::with_capacity(chunk.tokens.len());
        for (k, tokens) in chunk.tokens.chunks(piece_len).enumerate() {
            let piece = SeqChunk {
                tokens,
                start: chunk.start + k * piece_len,
                block_table: chunk.block_table,
            };
            let (m, pass) = self.upload_meta(std::slice::from_ref(&piece), &[], None)?;
            self.enqueue(&m, pass.with_every_row(), None)?;
            out.extend(
                self.download_logits(&vec![true; tokens.len()])?
                    .into_iter()
                    .flatten(),
            );
        }
        Ok(out)
    }

    fn start_step(
        &mut self,
        chunks: &[SeqChunk<'_>],
        draws: &[TokenDraw],
        on_layer: Option<LayerHook<'_>>,
    ) -> Result<()> {
        check_draws(chunks, draws)?;
        self.pending = None;
        self.step_done = None;
        if !chunks.is_empty() {
            validate_chunks(&self.model.config, self.kv.layout(), chunks)?;
            self.gpu.bind()?;
            self.gpu.rank_step(chunks.len());
            let decode = chunks.iter().all(|c| c.tokens.len() == 1);
            if decode && on_layer.is_none() && self.use_graphs {
                self.decode_graph(chunks, draws)?;
            } else {
                self.direct(chunks, draws, on_layer)?;
            }
            // No timing: the event only says when the step's work is done.
            self.step_done = Some(
                self.gpu
                    .compute
                    .record_event(None)
                    .op("cuEventRecord (step)")?,
            );
        }
        self.pending = Some(draws.to_vec());
        Ok(())
    }

    fn step_running(&self) -> bool {
        self.step_done
            .as_ref()
            .is_some_and(|e| matches!(e.try_is_complete(), Ok(false)))
    }

    fn finish_step(&mut self, asks: &[RowAsk<'_>]) -> Result<Vec<RowOut>> {
        let draws = self.pending.take().ok_or_else(|| {
            EngineError::InvalidInput("finish_step without a started step".into())
        })?;
        self.step_done = None;
        check_asks(asks, draws.len(), self.model.config.vocab_size)?;
        if draws.is_empty() {
            return Ok(Vec::new());
        }
        if asks.iter().all(RowAsk::is_plain) {
            // The graph sampled every row already: only the ids come back.
            let ids = self.download_ids(draws.len())?;
            return Ok(ids
                .into_iter()
                .map(|token| RowOut::Token {
                    token,
                    logprobs: None,
                })
                .collect());
        }
        self.finish_rows(&draws, asks)
    }
}

/// One GPU holds every KV head: a layer is one frame of all heads.
impl KvIo for CudaBackend {
    fn export_layer(&self, layer: usize, blocks: &[BlockId]) -> Result<Vec<u8>> {
        crate::backend::KvExport::export_layer(&self.kv, layer, blocks)
    }

    fn import_layer(&mut self, layer: usize, blocks: &[BlockId], bytes: &[u8]) -> Result<()> {
        self.kv.import_layer(layer, blocks, bytes)
    }

    #[allow(clippy::single_range_in_vec_init)] // one shard holding every head
    fn kv_head_shards(&self) -> Vec<Range<usize>> {
        vec![0..self.kv.layout().num_kv_heads]
    }

    fn export_heads(
        &self,
        layer: usize,
        blocks: &[BlockId],
        heads: Range<usize>,
    ) -> Result<Vec<u8>> {
        self.all_heads(&heads, "export")?;
        self.export_layer(layer, blocks)
    }

    fn import_heads(
        &mut self,
        layer: usize,
        blocks: &[BlockId],
        heads: Range<usize>,
        bytes: &[u8],
    ) -> Result<()> {
        self.all_heads(&heads, "import")?;
        self.import_layer(layer, blocks, bytes)
    }

    fn import_heads_vectored(
        &mut self,
        layer: usize,
        blocks: &[BlockId],
        heads: Range<usize>,
        pieces: &[&[u8]],
    ) -> Result<()> {
        self.all_heads(&heads, "import")?;
        self.kv.import_pieces(layer, blocks, pieces)
    }
}

impl CudaBackend {
    /// Refuses a head range other than every head (the cache moves whole layers).
    fn all_heads(&self, heads: &Range<usize>, what: &str) -> Result<()> {
        if *heads == (0..self.kv.layout().num_kv_heads) {
            return Ok(());
        }
        Err(EngineError::KvCache(format!(
            "this backend cannot {what} the head range {heads:?} alone"
        )))
    }
}

#[cfg(test)]
mod tests {
    use super::{CudaLimits, MAX_SPLITS, decode_splits};
    use crate::model_dir::BatchLimits;

    #[test]
    fn a_nodes_batch_limits_size_the_buffers() {
        let l = CudaLimits::from(BatchLimits {
            max_tokens: 4096,
            max_seqs: 512,
            priority: crate::model_dir::GpuPriority::Normal,
        });
        assert_eq!((l.max_tokens, l.max_seqs), (4096, 512));
        // Fewer tokens than sequences: room for a padded decode batch.
        let l = CudaLimits::from(BatchLimits {
            max_tokens: 8,
            max_seqs: 64,
            priority: crate::model_dir::GpuPriority::Normal,
        });
        assert_eq!((l.max_tokens, l.max_seqs), (64, 64));
    }

    #[test]
    fn decode_grids_fill_the_gpu_within_the_split_limit() {
        // An H200 holds 396 decode attention blocks of the Llama-3-8B shape at once.
        assert_eq!(decode_splits(1, 8, 396), 49);
        assert_eq!(decode_splits(8, 8, 396), 6);
        assert_eq!(decode_splits(24, 8, 396), 2);
        // From 25 sequences on, four waves (1584 blocks).
        assert_eq!(decode_splits(32, 8, 396), 6);
        assert_eq!(decode_splits(64, 8, 396), 3);
        assert_eq!(decode_splits(128, 8, 396), 1);
        assert_eq!(decode_splits(256, 8, 396), 1);
        assert_eq!(decode_splits(0, 8, 396), MAX_SPLITS);
        // A small GPU: one wave of 16 blocks.
        assert_eq!(decode_splits(1, 8, 16), 2);
        assert_eq!(decode_splits(4, 8, 16), 2);
    }
}
