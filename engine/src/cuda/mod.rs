//! The CUDA backend (feature `cuda`): the Llama-family forward pass on one GPU
//! in bf16, with the paged KV cache in GPU memory.
//!
//! - [`device`]: the GPU, its streams, the NVRTC-compiled kernels (`kernels.cu`)
//!   and cuBLAS; every unsafe call lives there or in [`kv`].
//! - [`model`]: weights in GPU memory, from safetensors or random of a named shape.
//! - [`kv`]: the cache (same layout as the CPU backend's, bf16) and its copy path
//!   through pinned memory on a stream of its own.
//!
//! One forward pass over `n` tokens: embedding; per layer RMSNorm (fused with the
//! residual add), one GEMM for q/k/v, rotary embedding fused with the cache write,
//! attention (paged, split along the context for decode batches; tiled causal
//! flash attention on tensor cores for prefill chunks), the output GEMM, RMSNorm,
//! one GEMM for gate/up, SiLU·up, the down GEMM; then the final norm and the LM
//! head for each chunk's last token only. The residual stream is f32, GEMMs take
//! bf16 and accumulate in f32. Every buffer is allocated once, at construction,
//! for at most [`CudaLimits::max_tokens`] tokens and [`CudaLimits::max_seqs`]
//! sequences per pass. Sampling (greedy, temperature, top-k, top-p, min-p)
//! runs on the GPU ([`Backend::forward_draw`]) so only token ids cross to the host.
//!
//! Decode steps run as CUDA graphs, one per batch-size bucket (captured at first
//! use): the batch is padded to the bucket (padding rows write their K/V to a
//! scratch block), and nothing that changes from step to step is a launch
//! parameter: token ids, positions, block tables, their row stride, sequence
//! lengths and sampling parameters are read from the metadata buffer, uploaded
//! before each replay, and the decode attention splits each sequence's context
//! by its own length on the device. `TANDEM_CUDA_GRAPHS=0` launches the same
//! kernels one by one instead.

pub mod device;
pub mod error;
pub mod kv;
pub mod model;
mod staging;

use std::cell::RefCell;
use std::collections::HashMap;
use std::ops::Range;

use cudarc::driver::sys::CUevent_flags::CU_EVENT_DEFAULT;
use cudarc::driver::{CudaEvent, CudaGraph, CudaSlice, LaunchConfig, PinnedHostSlice};
use half::bf16;

pub use device::Gpu;
pub use error::CudaError;
pub use kv::GpuKvCache;
pub use model::{GpuModel, NAMED_SHAPES, named_config};

use crate::backend::{
    Backend, KvIo, LayerHook, SeqChunk, check_draws, check_logit_flags, validate_chunks,
};
use crate::block_manager::{BlockId, blocks_for};
use crate::config::ModelConfig;
use crate::error::{EngineError, Result};
use crate::kv_cache::{KvDtype, KvLayout};
use crate::sampling::TokenDraw;
use device::{grid, ptr};
use error::DriverContext;

/// The most splits a decode sequence's context is cut into (at most 64:
/// `attn_combine` stages one weight per split in a 64-entry array).
const MAX_SPLITS: usize = 64;
const _: () = assert!(MAX_SPLITS <= 64);

/// Threads per row of the RMSNorm kernel: at batch 1 the norm is one block, so
/// its latency is the per-thread share of the hidden width.
const NORM_THREADS: u32 = 1024;
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
}

impl Default for CudaLimits {
    fn default() -> Self {
        CudaLimits {
            max_tokens: 8192,
            max_seqs: 256,
            staging_blocks: 2048,
            export_ring_bytes: 0,
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
}

/// Offsets (in i32 elements) of one pass's metadata sections.
struct Meta {
    ids: usize,
    pos: usize,
    slots: usize,
    last_rows: usize,
    q_off: usize,
    q_pos: usize,
    q_len: usize,
    seq_lens: usize,
    /// Five 32-bit words per sequence: see `sample_rows` in kernels.cu.
    draws: usize,
    /// One word: the block tables' row stride.
    stride: usize,
    tables: usize,
    table_stride: usize,
}

/// A captured decode step.
struct DecodeGraph(CudaGraph);

// SAFETY: a graph is only touched through `&mut CudaBackend`, so by one thread at a
// time (the backend moves between threads but is never shared); CUDA allows a graph
// to be launched from any thread when calls are serialized.
unsafe impl Send for DecodeGraph {}

/// Shape of one pass, as the kernels are launched for it.
#[derive(Debug, Clone, Copy)]
struct Pass {
    /// Token rows.
    n: usize,
    /// Sequences (chunks).
    s: usize,
    /// Every chunk is one token: paged decode attention.
    decode: bool,
    /// Longest chunk (prefill attention's grid).
    max_q: usize,
}

/// The model and its KV cache on one GPU.
pub struct CudaBackend {
    gpu: Gpu,
    model: GpuModel,
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
}

impl CudaBackend {
    /// A backend over `model` with a zeroed cache of `num_blocks` blocks of `block_size` tokens.
    pub fn new(
        gpu: Gpu,
        model: GpuModel,
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
            dtype: KvDtype::Bf16,
        };
        let ring = if limits.export_ring_bytes > 0 {
            limits.export_ring_bytes
        } else {
            8 * (blocks_for(limits.max_tokens, block_size) + 1) * layout.block_bytes()
        };
        let kv = GpuKvCache::new(&gpu, layout, limits.staging_blocks, ring)?;
        let (t, s) = (limits.max_tokens, limits.max_seqs);
        let (h, hd) = (c.hidden_size, c.head_dim);
        let qd = c.num_heads * hd;
        let qkvw = (c.num_heads + 2 * c.num_kv_heads) * hd;
        let inter = c.intermediate_size;
        let max_table = blocks_for(c.max_position_embeddings, block_size).min(num_blocks);
        let meta_cap = 3 * t + 10 * s + 1 + s * max_table;
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
        };
        // SAFETY: plain pinned memory, written by the host before each pass and read by
        // a copy that completes before the pass returns.
        let meta_host =
            unsafe { gpu.ctx.alloc_pinned_with_flags::<i32>(meta_cap, 0) }.op("cuMemHostAlloc")?;
        gpu.sync()?;
        Ok(CudaBackend {
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
        })
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
        let gpu = Gpu::open(ordinal, config)?;
        let model = GpuModel::load(&gpu, config, weights)?;
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

    /// Fills every layer's cache with random values (benchmarks of long contexts
    /// without running the prefill first; never time on zeros).
    pub fn fill_cache_random(&mut self, seed: u64) -> Result<()> {
        self.gpu.bind()?;
        let n = self.kv.layout().num_blocks * self.kv.layout().block_elems();
        for l in 0..self.kv.layout().num_layers {
            self.gpu
                .fill_uniform(self.kv.layer_ptr(l), n, seed + l as u64, -1.0, 1.0)?;
        }
        Ok(self.gpu.sync()?)
    }

    /// Overwrites the activation and output buffers with NaN, so that a result a
    /// kernel failed to write cannot pass for a correct one.
    pub fn poison(&mut self) -> Result<()> {
        self.gpu.bind()?;
        let s = &self.gpu.compute;
        let b = &self.bufs;
        for (p, bytes) in [
            (ptr(&b.h, s), b.h.num_bytes()),
            (ptr(&b.qkv, s), b.qkv.num_bytes()),
            (ptr(&b.q, s), b.q.num_bytes()),
            (ptr(&b.attn, s), b.attn.num_bytes()),
            (ptr(&b.gu, s), b.gu.num_bytes()),
            (ptr(&b.act, s), b.act.num_bytes()),
            (ptr(&b.last_h, s), b.last_h.num_bytes()),
            (ptr(&b.logits, s), b.logits.num_bytes()),
            (ptr(&b.ids_out, s), b.ids_out.num_bytes()),
            (ptr(&b.x, s), b.x.num_bytes()),
            (ptr(&b.delta, s), b.delta.num_bytes()),
        ] {
            self.gpu.memset(p, 0xff, bytes)?;
        }
        Ok(self.gpu.sync()?)
    }

    /// Writes the pass's metadata into pinned memory and copies it to the GPU;
    /// with `pad_to`, one-token rows for the scratch block fill the batch up to
    /// that many sequences (a graph bucket).
    fn upload_meta(
        &mut self,
        chunks: &[SeqChunk<'_>],
        draws: &[TokenDraw],
        pad_to: Option<usize>,
    ) -> Result<(Meta, Pass)> {
        let real_n: usize = chunks.iter().map(|c| c.tokens.len()).sum();
        let s = pad_to.unwrap_or(chunks.len()).max(chunks.len());
        let n = real_n + (s - chunks.len());
        let bs = self.kv.layout().block_size;
        let table_stride = chunks
            .iter()
            .map(|c| blocks_for(c.start + c.tokens.len(), bs))
            .max()
            .unwrap_or(1)
            .max(1);
        if n > self.limits.max_tokens || s > self.limits.max_seqs {
            return Err(CudaError::Unsupported(format!(
                "a pass of {n} tokens in {s} sequences exceeds the backend's limits ({} tokens, {} sequences)",
                self.limits.max_tokens, self.limits.max_seqs
            ))
            .into());
        }
        if table_stride > self.max_table {
            return Err(EngineError::InvalidInput(format!(
                "block table of {table_stride} blocks is longer than any sequence can need"
            )));
        }
        let m = Meta {
            ids: 0,
            pos: n,
            slots: 2 * n,
            last_rows: 3 * n,
            q_off: 3 * n + s,
            q_pos: 3 * n + 2 * s,
            q_len: 3 * n + 3 * s,
            seq_lens: 3 * n + 4 * s,
            draws: 3 * n + 5 * s,
            stride: 3 * n + 10 * s,
            tables: 3 * n + 10 * s + 1,
            table_stride,
        };
        let total = m.tables + s * table_stride;
        debug_assert!(total <= self.meta_cap);
        let scratch = self.kv.scratch_block();
        let host = self.meta_host.as_mut_slice().op("pinned buffer")?;
        let mut row = 0usize;
        for i in 0..s {
            let (len, start) = match chunks.get(i) {
                Some(c) => {
                    for (j, &t) in c.tokens.iter().enumerate() {
                        let p = c.start + j;
                        host[m.ids + row] = t as i32;
                        host[m.pos + row] = p as i32;
                        host[m.slots + row] = (c.block_table[p / bs] as usize * bs + p % bs) as i32;
                        row += 1;
                    }
                    let dst = &mut host[m.tables + i * table_stride..][..table_stride];
                    let used = blocks_for(c.start + c.tokens.len(), bs);
                    for (d, &b) in dst.iter_mut().zip(c.block_table.iter().take(used)) {
                        *d = b as i32;
                    }
                    (c.tokens.len(), c.start)
                }
                None => {
                    // Padding: token 0 at position 0, its K/V into the scratch block.
                    host[m.ids + row] = 0;
                    host[m.pos + row] = 0;
                    host[m.slots + row] = (scratch as usize * bs) as i32;
                    row += 1;
                    host[m.tables + i * table_stride..][..table_stride].fill(scratch as i32);
                    (1, 0)
                }
            };
            host[m.last_rows + i] = (row - 1) as i32;
            host[m.q_off + i] = (row - len) as i32;
            host[m.q_pos + i] = start as i32;
            host[m.q_len + i] = len as i32;
            host[m.seq_lens + i] = (start + len) as i32;
            let d = draws.get(i).copied().unwrap_or(TokenDraw::GREEDY);
            let w = &mut host[m.draws + 5 * i..][..5];
            w[0] = d.temperature.to_bits() as i32;
            w[1] = d.top_k.min(i32::MAX as u32) as i32;
            w[2] = d.top_p.to_bits() as i32;
            w[3] = d.min_p.to_bits() as i32;
            w[4] = d.u01.to_bits() as i32;
        }
        host[m.stride] = table_stride as i32;
        let dev = ptr(&self.bufs.meta, &self.gpu.compute);
        // SAFETY: `meta` holds `meta_cap >= total` elements; the pinned source is not
        // written again before this pass synchronizes at its end.
        unsafe { self.gpu.upload_to(&host[..total], dev) }?;
        let pass = Pass {
            n,
            s,
            decode: chunks.iter().all(|c| c.tokens.len() == 1),
            max_q: chunks.iter().map(|c| c.tokens.len()).max().unwrap_or(1),
        };
        Ok((m, pass))
    }

    /// Runs the layers; leaves each chunk's last-token logits in `bufs.logits`.
    fn run(&mut self, chunks: &[SeqChunk<'_>], on_layer: Option<LayerHook<'_>>) -> Result<()> {
        validate_chunks(&self.model.config, self.kv.layout(), chunks)?;
        self.gpu.bind()?;
        let (m, pass) = self.upload_meta(chunks, &[], None)?;
        self.enqueue(&m, pass, on_layer)
    }

    /// Queues every kernel of one pass on the compute stream (also while a graph
    /// is being captured: nothing here waits or allocates).
    fn enqueue(&self, m: &Meta, p: Pass, mut on_layer: Option<LayerHook<'_>>) -> Result<()> {
        let c = &self.model.config;
        let g = &self.gpu;
        let st = &g.compute;
        let b = &self.bufs;
        let (n, s) = (p.n, p.s);
        let (h, hd, hq, hkv) = (c.hidden_size, c.head_dim, c.num_heads, c.num_kv_heads);
        let (qd, inter) = (hq * hd, c.intermediate_size);
        let qkvw = (hq + 2 * hkv) * hd;
        let bs = self.kv.layout().block_size as i32;
        let meta = ptr(&b.meta, st);
        let at = |off: usize| meta + 4 * off as u64;
        let (x, delta, hb, qkv, q, attn, gu, act) = (
            ptr(&b.x, st),
            ptr(&b.delta, st),
            ptr(&b.h, st),
            ptr(&b.qkv, st),
            ptr(&b.q, st),
            ptr(&b.attn, st),
            ptr(&b.gu, st),
            ptr(&b.act, st),
        );
        let (h_i, hd_i, hq_i, hkv_i) = (h as i32, hd as i32, hq as i32, hkv as i32);
        let eps = c.rms_norm_eps as f32;
        let window = c.sliding_window.unwrap_or(0) as i32;
        let scale = 1.0 / (hd as f32).sqrt();
        let null = 0u64;
        let inv_freq = ptr(&b.inv_freq, st);
        let ts = m.table_stride as i32;
        let splits = match self.decode_blocks {
            Some(blocks) => splits_aiming_at(blocks, s, hkv),
            None => decode_splits(s, hkv, self.gpu.decode_wave),
        };
        // Programmatic dependent launches, except around the export hook's events.
        let pdl = g.pdl && on_layer.is_none();

        // SAFETY (every launch below): the pointers are the backend's own buffers, sized
        // at construction for `max_tokens`/`max_seqs` (checked in `upload_meta`), the
        // cache layers (one scratch block beyond the layout), and the metadata just
        // uploaded; grids match the kernels' indexing.
        let ids = at(m.ids);
        let mut l = g.kernel(&g.k.embed, false);
        let table = ptr(&self.model.embed, st);
        l.arg(&ids).arg(&table).arg(&x).arg(&h_i);
        unsafe { l.launch(grid(n as u32, 256)) }.op("launch embed")?;
        self.mark("embed")?;

        let (pos, slots) = (at(m.pos), at(m.slots));
        for (li, layer) in self.model.layers.iter().enumerate() {
            let first = if li == 0 { null } else { delta };
            let w = ptr(&layer.input_norm, st);
            let mut l = g.kernel(&g.k.add_rmsnorm, pdl);
            l.arg(&x)
                .arg(&first)
                .arg(&null)
                .arg(&w)
                .arg(&hb)
                .arg(&h_i)
                .arg(&eps);
            unsafe { l.launch(grid(n as u32, NORM_THREADS)) }.op("launch add_rmsnorm")?;
            self.mark("input norm")?;
            g.gemm_with(hb, ptr(&layer.qkv, st), qkv, n, h, qkvw, false, pdl)?;
            self.mark("qkv product")?;

            let bias = layer.qkv_bias.as_ref().map_or(0, |bb| ptr(bb, st));
            let cache = self.kv.layer_ptr(li);
            let mut l = g.kernel(&g.k.rope_kv, pdl);
            l.arg(&qkv)
                .arg(&bias)
                .arg(&pos)
                .arg(&slots)
                .arg(&inv_freq)
                .arg(&q)
                .arg(&cache)
                .arg(&hq_i)
                .arg(&hkv_i)
                .arg(&hd_i)
                .arg(&bs);
            let cfg = LaunchConfig {
                grid_dim: ((hq + hkv) as u32, n as u32, 1),
                block_dim: ((hd / 2) as u32, 1, 1),
                shared_mem_bytes: 0,
            };
            unsafe { l.launch(cfg) }.op("launch rope_kv")?;
            self.mark("rope_kv")?;
            if let Some(hook) = on_layer.as_mut() {
                hook(li, &self.kv)?;
            }

            let tables = at(m.tables);
            if p.decode {
                let (seq_lens, stride) = (at(m.seq_lens), at(m.stride));
                let (po, pml) = (ptr(&b.part_o, st), ptr(&b.part_ml, st));
                let ms = splits as i32;
                let mut l = g.kernel(&g.k.decode_attn, pdl);
                l.arg(&q)
                    .arg(&cache)
                    .arg(&tables)
                    .arg(&stride)
                    .arg(&seq_lens)
                    .arg(&po)
                    .arg(&pml)
                    .arg(&hq_i)
                    .arg(&hkv_i)
                    .arg(&bs)
                    .arg(&ms)
                    .arg(&window)
                    .arg(&scale);
                let cfg = LaunchConfig {
                    grid_dim: (splits as u32, hkv as u32, s as u32),
                    block_dim: (128, 1, 1),
                    shared_mem_bytes: g.decode_smem as u32,
                };
                unsafe { l.launch(cfg) }.op("launch decode_attn")?;
                self.mark("decode_attn")?;
                let mut l = g.kernel(&g.k.attn_combine, pdl);
                l.arg(&po)
                    .arg(&pml)
                    .arg(&seq_lens)
                    .arg(&attn)
                    .arg(&hq_i)
                    .arg(&hd_i)
                    .arg(&ms);
                let cfg = LaunchConfig {
                    grid_dim: (hq as u32, s as u32, 1),
                    block_dim: (hd as u32, 1, 1),
                    shared_mem_bytes: 0,
                };
                unsafe { l.launch(cfg) }.op("launch attn_combine")?;
                self.mark("attn_combine")?;
            } else {
                let (q_off, q_pos, q_len) = (at(m.q_off), at(m.q_pos), at(m.q_len));
                let mut l = g.kernel(&g.k.prefill_attn, pdl);
                l.arg(&q)
                    .arg(&cache)
                    .arg(&tables)
                    .arg(&ts)
                    .arg(&q_off)
                    .arg(&q_pos)
                    .arg(&q_len)
                    .arg(&attn)
                    .arg(&hq_i)
                    .arg(&hkv_i)
                    .arg(&bs)
                    .arg(&window)
                    .arg(&scale);
                let cfg = LaunchConfig {
                    grid_dim: (p.max_q.div_ceil(128) as u32, hq as u32, s as u32),
                    block_dim: (256, 1, 1),
                    shared_mem_bytes: device::prefill_smem(hd) as u32,
                };
                unsafe { l.launch(cfg) }.op("launch prefill_attn")?;
                self.mark("prefill_attn")?;
            }

            g.gemm_with(attn, ptr(&layer.o, st), delta, n, qd, h, true, pdl)?;
            self.mark("o product")?;
            let w = ptr(&layer.post_norm, st);
            let mut l = g.kernel(&g.k.add_rmsnorm, pdl);
            l.arg(&x)
                .arg(&delta)
                .arg(&null)
                .arg(&w)
                .arg(&hb)
                .arg(&h_i)
                .arg(&eps);
            unsafe { l.launch(grid(n as u32, NORM_THREADS)) }.op("launch add_rmsnorm")?;
            self.mark("post-attention norm")?;
            g.gemm_silu(hb, ptr(&layer.gate_up, st), gu, act, n, h, inter, pdl)?;
            self.mark("gate_up product, SiLU")?;
            g.gemm_with(act, ptr(&layer.down, st), delta, n, inter, h, true, pdl)?;
            self.mark("down product")?;
        }

        let rows = at(m.last_rows);
        let last_h = ptr(&b.last_h, st);
        let w = ptr(&self.model.norm, st);
        // The last layer's output is in `delta`, still to be added (unless no layer ran).
        let pending = if self.model.layers.is_empty() {
            null
        } else {
            delta
        };
        let mut l = g.kernel(&g.k.add_rmsnorm, pdl);
        l.arg(&x)
            .arg(&pending)
            .arg(&rows)
            .arg(&w)
            .arg(&last_h)
            .arg(&h_i)
            .arg(&eps);
        unsafe { l.launch(grid(s as u32, NORM_THREADS)) }.op("launch add_rmsnorm")?;
        self.mark("final norm")?;
        let head = self.model.lm_head.as_ref().unwrap_or(&self.model.embed);
        g.gemm_with(
            last_h,
            ptr(head, st),
            ptr(&b.logits, st),
            s,
            h,
            c.vocab_size,
            true,
            pdl,
        )?;
        self.mark("lm_head product")?;
        Ok(())
    }

    /// Queues the sampling of each of the pass's `s` rows of logits into `ids_out`.
    fn enqueue_sample(&self, m: &Meta, p: Pass) -> Result<()> {
        let st = &self.gpu.compute;
        let (logits, ids) = (ptr(&self.bufs.logits, st), ptr(&self.bufs.ids_out, st));
        let draws = ptr(&self.bufs.meta, st) + 4 * m.draws as u64;
        let v = self.model.config.vocab_size as i32;
        let mut l = self.gpu.kernel(&self.gpu.k.sample_rows, self.gpu.pdl);
        l.arg(&logits).arg(&draws).arg(&ids).arg(&v);
        // SAFETY: `logits` holds `s` rows of `vocab` f32, `draws` 5 words per row
        // (uploaded with the metadata), `ids` room for `s` ids.
        unsafe { l.launch(grid(p.s as u32, 1024)) }.op("launch sample_rows")?;
        self.mark("sample")?;
        Ok(())
    }

    /// One decode step as a graph replay: the batch padded to its bucket, the
    /// bucket's graph captured on first use.
    fn decode_graph(&mut self, chunks: &[SeqChunk<'_>], draws: &[TokenDraw]) -> Result<Vec<u32>> {
        let Some(&bucket) = GRAPH_BUCKETS
            .iter()
            .find(|&&b| b >= chunks.len() && b <= self.limits.max_seqs)
        else {
            return self.direct(chunks, draws, None);
        };
        let (m, pass) = self.upload_meta(chunks, draws, Some(bucket))?;
        if !self.graphs.contains_key(&bucket) {
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
        self.download_ids(chunks.len())
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
    ) -> Result<Vec<u32>> {
        let (m, pass) = self.upload_meta(chunks, draws, None)?;
        self.enqueue(&m, pass, on_layer)?;
        self.enqueue_sample(&m, pass)?;
        self.download_ids(chunks.len())
    }

    fn download_ids(&self, n: usize) -> Result<Vec<u32>> {
        let mut out = vec![0u32; n];
        self.gpu
            .download(ptr(&self.bufs.ids_out, &self.gpu.compute), &mut out)?;
        Ok(out)
    }

    /// Turns decode-step graphs on or off (benchmarks and checks compare the two).
    pub fn set_graphs(&mut self, on: bool) {
        self.use_graphs = on;
    }

    /// Records an event on the compute stream while [`profile`](Self::profile) runs.
    fn mark(&self, name: &'static str) -> Result<()> {
        if let Some(marks) = self.marks.borrow_mut().as_mut() {
            let e = self
                .gpu
                .compute
                .record_event(Some(CU_EVENT_DEFAULT))
                .op("cuEventRecord (profile)")?;
            marks.push((name, e));
        }
        Ok(())
    }

    /// Times one forward pass and its sampling kernel by kernel, with an event
    /// after every launch (no graphs, no programmatic dependent launches):
    /// microseconds per kernel, summed over the layers, in launch order. Each
    /// figure holds its launch gap, so the sum exceeds a graph replay's time.
    pub fn profile(&mut self, chunks: &[SeqChunk<'_>]) -> Result<Vec<(&'static str, f64)>> {
        validate_chunks(&self.model.config, self.kv.layout(), chunks)?;
        self.gpu.bind()?;
        let draws = vec![TokenDraw::GREEDY; chunks.len()];
        let (m, pass) = self.upload_meta(chunks, &draws, None)?;
        let pdl = std::mem::replace(&mut self.gpu.pdl, false);
        let start = self
            .gpu
            .compute
            .record_event(Some(CU_EVENT_DEFAULT))
            .op("cuEventRecord (profile)")?;
        *self.marks.borrow_mut() = Some(Vec::new());
        let queued = self
            .enqueue(&m, pass, None)
            .and_then(|()| self.enqueue_sample(&m, pass));
        let marks = self.marks.borrow_mut().take().unwrap_or_default();
        self.gpu.pdl = pdl;
        queued?;
        self.gpu.sync()?;
        let mut out: Vec<(&'static str, f64)> = Vec::new();
        let mut prev = &start;
        for (name, e) in &marks {
            let us = f64::from(prev.elapsed_ms(e).op("cuEventElapsedTime")?) * 1e3;
            match out.iter_mut().find(|(n, _)| n == name) {
                Some(slot) => slot.1 += us,
                None => out.push((name, us)),
            }
            prev = e;
        }
        Ok(out)
    }

    /// Sets the decode attention blocks a step aims at (benchmarks compare
    /// settings; [`decode_wave`](Self::decode_wave) is one wave); graphs
    /// captured with another setting are dropped.
    pub fn set_decode_blocks(&mut self, blocks: Option<usize>) {
        let blocks = blocks.map(|b| b.max(1));
        if self.decode_blocks != blocks {
            self.decode_blocks = blocks;
            self.graphs.clear();
        }
    }

    /// Decode attention blocks resident at once on this GPU.
    pub fn decode_wave(&self) -> usize {
        self.gpu.decode_wave
    }

    /// Turns programmatic dependent launches on or off (benchmarks compare the
    /// two); graphs captured the other way are dropped.
    pub fn set_pdl(&mut self, on: bool) {
        if self.gpu.pdl != on {
            self.gpu.pdl = on;
            self.graphs.clear();
        }
    }

    /// Decode-step graphs captured so far (for benchmarks and tests).
    pub fn graphs_captured(&self) -> usize {
        self.graphs.len()
    }
}

/// Decode attention blocks a large batch's step aims at: some ten waves of
/// resident blocks, so the last wave's idle share is small.
const DECODE_BLOCKS: usize = 4096;

/// Splits per sequence the decode attention grid has for a batch of `s`
/// sequences, `wave` blocks being resident at once: a batch whose sequences ×
/// KV heads fill at most half a wave is split to fill exactly one (a block's
/// fixed cost is paid once; measured on the H200 at 4k context: batch 1 25.7 →
/// 18.8 µs a layer, batch 8 111 → 72 µs against aiming at 4096 blocks); a
/// larger one aims at [`DECODE_BLOCKS`] (at batch 32 and 4k context, one
/// split per sequence and head measured slower: 2268 against 2139 µs for a
/// 4-layer step). Each sequence then uses as many splits as its own
/// length needs (kernels.cu, `split_chunk`).
fn decode_splits(s: usize, hkv: usize, wave: usize) -> usize {
    let blocks = if 2 * s * hkv <= wave {
        wave
    } else {
        DECODE_BLOCKS
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
        // Only the rows asked for leave the device: one copy per run of
        // consecutive rows (one copy when every row is wanted).
        let v = self.model.config.vocab_size;
        let base = ptr(&self.bufs.logits, &self.gpu.compute);
        let mut out: Vec<Option<Vec<f32>>> = vec![None; chunks.len()];
        let mut i = 0;
        while i < logits.len() {
            if !logits[i] {
                i += 1;
                continue;
            }
            let end = (i..logits.len())
                .find(|&j| !logits[j])
                .unwrap_or(logits.len());
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

    fn forward_draw(
        &mut self,
        chunks: &[SeqChunk<'_>],
        draws: &[TokenDraw],
        on_layer: Option<LayerHook<'_>>,
    ) -> Result<Vec<u32>> {
        check_draws(chunks, draws)?;
        if chunks.is_empty() {
            return Ok(Vec::new());
        }
        validate_chunks(&self.model.config, self.kv.layout(), chunks)?;
        self.gpu.bind()?;
        let decode = chunks.iter().all(|c| c.tokens.len() == 1);
        if decode && on_layer.is_none() && self.use_graphs {
            return self.decode_graph(chunks, draws);
        }
        self.direct(chunks, draws, on_layer)
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
        });
        assert_eq!((l.max_tokens, l.max_seqs), (4096, 512));
        // Fewer tokens than sequences: room for a padded decode batch.
        let l = CudaLimits::from(BatchLimits {
            max_tokens: 8,
            max_seqs: 64,
        });
        assert_eq!((l.max_tokens, l.max_seqs), (64, 64));
    }

    #[test]
    fn decode_grids_fill_the_gpu_within_the_split_limit() {
        // An H200 holds 396 decode attention blocks of the Llama-3-8B shape at once.
        assert_eq!(decode_splits(1, 8, 396), 49);
        assert_eq!(decode_splits(8, 8, 396), 6);
        assert_eq!(decode_splits(24, 8, 396), 2);
        assert_eq!(decode_splits(32, 8, 396), 16);
        assert_eq!(decode_splits(64, 8, 396), 8);
        assert_eq!(decode_splits(256, 8, 396), 2);
        assert_eq!(decode_splits(1024, 8, 396), 1);
        assert_eq!(decode_splits(0, 8, 396), MAX_SPLITS);
        // A small GPU: one wave of 16 blocks.
        assert_eq!(decode_splits(1, 8, 16), 2);
        assert_eq!(decode_splits(4, 8, 16), 64);
    }
}
