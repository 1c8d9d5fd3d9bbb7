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
//! sequences per pass. Greedy sampling runs on the GPU
//! ([`Backend::forward_greedy`]) so only token ids cross to the host.

pub mod device;
pub mod error;
pub mod kv;
pub mod model;

use cudarc::driver::{CudaSlice, LaunchConfig, PinnedHostSlice, PushKernelArg};
use half::bf16;

pub use device::Gpu;
pub use error::CudaError;
pub use kv::GpuKvCache;
pub use model::{GpuModel, NAMED_SHAPES, named_config};

use crate::backend::{Backend, LayerHook, SeqChunk, validate_chunks};
use crate::block_manager::{BlockId, blocks_for};
use crate::config::ModelConfig;
use crate::error::{EngineError, Result};
use crate::kv_cache::{KvDtype, KvLayout};
use device::{grid, ptr};
use error::DriverContext;

/// The most splits a decode sequence's context is cut into.
const MAX_SPLITS: usize = 64;
/// Largest dynamic shared memory a kernel is launched with (the default limit).
const SMEM_LIMIT: usize = 48 * 1024;

/// What one forward pass may hold; buffers are sized for it once.
#[derive(Debug, Clone, Copy)]
pub struct CudaLimits {
    /// Tokens in one pass (all chunks together).
    pub max_tokens: usize,
    /// Chunks (sequences) in one pass.
    pub max_seqs: usize,
    /// Blocks the pinned staging buffer for KV export/import holds.
    pub staging_blocks: usize,
}

impl Default for CudaLimits {
    fn default() -> Self {
        CudaLimits {
            max_tokens: 8192,
            max_seqs: 256,
            staging_blocks: 2048,
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
    tables: usize,
    table_stride: usize,
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
        let kv = GpuKvCache::new(&gpu, layout, limits.staging_blocks)?;
        let (t, s) = (limits.max_tokens, limits.max_seqs);
        let (h, hd) = (c.hidden_size, c.head_dim);
        let qd = c.num_heads * hd;
        let qkvw = (c.num_heads + 2 * c.num_kv_heads) * hd;
        let inter = c.intermediate_size;
        let max_table = blocks_for(c.max_position_embeddings, block_size).min(num_blocks);
        let meta_cap = 3 * t + 7 * s + s * max_table;
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

    /// Writes the pass's metadata into pinned memory and copies it to the GPU.
    fn upload_meta(&mut self, chunks: &[SeqChunk<'_>]) -> Result<Meta> {
        let n: usize = chunks.iter().map(|c| c.tokens.len()).sum();
        let s = chunks.len();
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
            tables: 3 * n + 5 * s,
            table_stride,
        };
        let total = m.tables + s * table_stride;
        debug_assert!(total <= self.meta_cap);
        let host = self.meta_host.as_mut_slice().op("pinned buffer")?;
        let mut row = 0usize;
        for (i, c) in chunks.iter().enumerate() {
            for (j, &t) in c.tokens.iter().enumerate() {
                let p = c.start + j;
                host[m.ids + row] = t as i32;
                host[m.pos + row] = p as i32;
                host[m.slots + row] = (c.block_table[p / bs] as usize * bs + p % bs) as i32;
                row += 1;
            }
            host[m.last_rows + i] = (row - 1) as i32;
            host[m.q_off + i] = (row - c.tokens.len()) as i32;
            host[m.q_pos + i] = c.start as i32;
            host[m.q_len + i] = c.tokens.len() as i32;
            host[m.seq_lens + i] = (c.start + c.tokens.len()) as i32;
            let dst = &mut host[m.tables + i * table_stride..][..table_stride];
            let used = blocks_for(c.start + c.tokens.len(), bs);
            for (d, &b) in dst.iter_mut().zip(c.block_table.iter().take(used)) {
                *d = b as i32;
            }
        }
        let dev = ptr(&self.bufs.meta, &self.gpu.compute);
        // SAFETY: `meta` holds `meta_cap >= total` elements; the pinned source is not
        // written again before this pass synchronizes at its end.
        unsafe { self.gpu.upload_to(&host[..total], dev) }?;
        Ok(m)
    }

    /// Runs the layers; leaves each chunk's last-token logits in `bufs.logits`.
    fn run(&mut self, chunks: &[SeqChunk<'_>], mut on_layer: Option<LayerHook<'_>>) -> Result<()> {
        validate_chunks(&self.model.config, self.kv.layout(), chunks)?;
        self.gpu.bind()?;
        let m = self.upload_meta(chunks)?;
        let c = &self.model.config;
        let g = &self.gpu;
        let st = &g.compute;
        let b = &self.bufs;
        let n = chunks.iter().map(|c| c.tokens.len()).sum::<usize>();
        let s = chunks.len();
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
        let decode = chunks.iter().all(|c| c.tokens.len() == 1);
        let max_len = chunks
            .iter()
            .map(|c| c.start + c.tokens.len())
            .max()
            .unwrap_or(1);
        let group = hq / hkv;

        // SAFETY (every launch below): the pointers are the backend's own buffers, sized
        // at construction for `max_tokens`/`max_seqs` (checked in `upload_meta`), the
        // cache layers, and the metadata just uploaded; grids match the kernels' indexing.
        let ids = at(m.ids);
        let mut l = st.launch_builder(&g.k.embed);
        let table = ptr(&self.model.embed, st);
        l.arg(&ids).arg(&table).arg(&x).arg(&h_i);
        unsafe { l.launch(grid(n as u32, 256)) }.op("launch embed")?;

        let (pos, slots) = (at(m.pos), at(m.slots));
        for (li, layer) in self.model.layers.iter().enumerate() {
            let first = if li == 0 { null } else { delta };
            let w = ptr(&layer.input_norm, st);
            let mut l = st.launch_builder(&g.k.add_rmsnorm);
            l.arg(&x)
                .arg(&first)
                .arg(&null)
                .arg(&w)
                .arg(&hb)
                .arg(&h_i)
                .arg(&eps);
            unsafe { l.launch(grid(n as u32, 256)) }.op("launch add_rmsnorm")?;
            g.gemm(hb, ptr(&layer.qkv, st), qkv, n, h, qkvw, false)?;

            let bias = layer.qkv_bias.as_ref().map_or(0, |bb| ptr(bb, st));
            let cache = self.kv.layer_ptr(li);
            let mut l = st.launch_builder(&g.k.rope_kv);
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
            unsafe { l.launch(grid(n as u32, 128)) }.op("launch rope_kv")?;
            if let Some(hook) = on_layer.as_mut() {
                hook(li, &self.kv)?;
            }

            let tables = at(m.tables);
            if decode {
                let (split_len, splits) = choose_split(max_len, s * hkv, group)?;
                let smem = decode_smem(group, split_len);
                let seq_lens = at(m.seq_lens);
                let (po, pml) = (ptr(&b.part_o, st), ptr(&b.part_ml, st));
                let (sl, ms) = (split_len as i32, MAX_SPLITS as i32);
                let mut l = st.launch_builder(&g.k.decode_attn);
                l.arg(&q)
                    .arg(&cache)
                    .arg(&tables)
                    .arg(&ts)
                    .arg(&seq_lens)
                    .arg(&po)
                    .arg(&pml)
                    .arg(&hq_i)
                    .arg(&hkv_i)
                    .arg(&bs)
                    .arg(&sl)
                    .arg(&ms)
                    .arg(&window)
                    .arg(&scale);
                let cfg = LaunchConfig {
                    grid_dim: (splits as u32, hkv as u32, s as u32),
                    block_dim: (128, 1, 1),
                    shared_mem_bytes: smem as u32,
                };
                unsafe { l.launch(cfg) }.op("launch decode_attn")?;
                let mut l = st.launch_builder(&g.k.attn_combine);
                l.arg(&po)
                    .arg(&pml)
                    .arg(&seq_lens)
                    .arg(&attn)
                    .arg(&hq_i)
                    .arg(&hd_i)
                    .arg(&sl)
                    .arg(&ms);
                let cfg = LaunchConfig {
                    grid_dim: (hq as u32, s as u32, 1),
                    block_dim: (hd as u32, 1, 1),
                    shared_mem_bytes: 0,
                };
                unsafe { l.launch(cfg) }.op("launch attn_combine")?;
            } else {
                let max_q = chunks.iter().map(|c| c.tokens.len()).max().unwrap_or(1);
                let (q_off, q_pos, q_len) = (at(m.q_off), at(m.q_pos), at(m.q_len));
                let mut l = st.launch_builder(&g.k.prefill_attn);
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
                    grid_dim: (max_q.div_ceil(128) as u32, hq as u32, s as u32),
                    block_dim: (256, 1, 1),
                    shared_mem_bytes: device::prefill_smem(hd) as u32,
                };
                unsafe { l.launch(cfg) }.op("launch prefill_attn")?;
            }

            g.gemm(attn, ptr(&layer.o, st), delta, n, qd, h, true)?;
            let w = ptr(&layer.post_norm, st);
            let mut l = st.launch_builder(&g.k.add_rmsnorm);
            l.arg(&x)
                .arg(&delta)
                .arg(&null)
                .arg(&w)
                .arg(&hb)
                .arg(&h_i)
                .arg(&eps);
            unsafe { l.launch(grid(n as u32, 256)) }.op("launch add_rmsnorm")?;
            g.gemm(hb, ptr(&layer.gate_up, st), gu, n, h, 2 * inter, false)?;
            let (n_i, inter_i) = (n as i32, inter as i32);
            let mut l = st.launch_builder(&g.k.silu_mul);
            l.arg(&gu).arg(&act).arg(&n_i).arg(&inter_i);
            let blocks = (n * inter).div_ceil(256).min(65535) as u32;
            unsafe { l.launch(grid(blocks, 256)) }.op("launch silu_mul")?;
            g.gemm(act, ptr(&layer.down, st), delta, n, inter, h, true)?;
        }

        let rows = at(m.last_rows);
        let last_h = ptr(&b.last_h, st);
        let w = ptr(&self.model.norm, st);
        let mut l = st.launch_builder(&g.k.add_rmsnorm);
        l.arg(&x)
            .arg(&delta)
            .arg(&rows)
            .arg(&w)
            .arg(&last_h)
            .arg(&h_i)
            .arg(&eps);
        unsafe { l.launch(grid(s as u32, 256)) }.op("launch add_rmsnorm")?;
        let head = self.model.lm_head.as_ref().unwrap_or(&self.model.embed);
        g.gemm(
            last_h,
            ptr(head, st),
            ptr(&b.logits, st),
            s,
            h,
            c.vocab_size,
            true,
        )?;
        Ok(())
    }
}

/// Dynamic shared memory of `decode_attn`: scores of `split_len` keys per query
/// head, and a [128 / (hd / 4)][group][hd] = [group][512] f32 reduction area.
fn decode_smem(group: usize, split_len: usize) -> usize {
    4 * (group * split_len + 512 * group)
}

/// The context length each decode block takes and the number of splits: enough
/// blocks to fill the GPU (`units` = sequences × KV heads), within shared memory.
fn choose_split(max_len: usize, units: usize, group: usize) -> Result<(usize, usize), CudaError> {
    let fits = |sl: usize| decode_smem(group, sl) <= SMEM_LIMIT;
    let mut split_len = 128;
    loop {
        let splits = max_len.div_ceil(split_len);
        if !fits(split_len) {
            return Err(CudaError::Unsupported(format!(
                "a decode context of {max_len} tokens does not fit the attention kernel's shared memory"
            )));
        }
        if splits <= MAX_SPLITS && units * splits <= 2048 {
            return Ok((split_len, splits));
        }
        if splits <= MAX_SPLITS && !fits(split_len * 2) {
            return Ok((split_len, splits));
        }
        split_len *= 2;
    }
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
        on_layer: Option<LayerHook<'_>>,
    ) -> Result<Vec<Vec<f32>>> {
        if chunks.is_empty() {
            return Ok(Vec::new());
        }
        self.run(chunks, on_layer)?;
        let v = self.model.config.vocab_size;
        let mut flat = vec![0f32; chunks.len() * v];
        self.gpu
            .download(ptr(&self.bufs.logits, &self.gpu.compute), &mut flat)?;
        Ok(flat.chunks_exact(v).map(<[f32]>::to_vec).collect())
    }

    fn forward_greedy(
        &mut self,
        chunks: &[SeqChunk<'_>],
        on_layer: Option<LayerHook<'_>>,
    ) -> Result<Vec<u32>> {
        if chunks.is_empty() {
            return Ok(Vec::new());
        }
        self.run(chunks, on_layer)?;
        let st = &self.gpu.compute;
        let (logits, ids) = (ptr(&self.bufs.logits, st), ptr(&self.bufs.ids_out, st));
        let v = self.model.config.vocab_size as i32;
        let mut l = st.launch_builder(&self.gpu.k.argmax_rows);
        l.arg(&logits).arg(&ids).arg(&v);
        // SAFETY: `logits` holds `chunks.len()` rows of `vocab` f32, `ids` as many u32.
        unsafe { l.launch(grid(chunks.len() as u32, 1024)) }.op("launch argmax_rows")?;
        let mut out = vec![0u32; chunks.len()];
        self.gpu.download(ids, &mut out)?;
        Ok(out)
    }

    fn export_layer(&self, layer: usize, blocks: &[BlockId]) -> Result<Vec<u8>> {
        crate::backend::KvExport::export_layer(&self.kv, layer, blocks)
    }

    fn import_layer(&mut self, layer: usize, blocks: &[BlockId], bytes: &[u8]) -> Result<()> {
        self.kv.import_layer(layer, blocks, bytes)
    }
}

#[cfg(test)]
mod tests {
    use super::choose_split;

    #[test]
    fn splits_fill_the_gpu_and_fit_shared_memory() {
        // One sequence of 1k tokens, 8 KV heads: split finely.
        let (sl, n) = choose_split(1024, 8, 4).unwrap();
        assert_eq!((sl, n), (128, 8));
        // A big batch needs no splitting beyond what memory asks.
        let (sl, n) = choose_split(4096, 256 * 8, 4).unwrap();
        assert!(n * sl >= 4096 && n <= super::MAX_SPLITS);
        // Very long contexts still fit.
        assert!(choose_split(131_072, 8, 4).is_ok());
    }
}
