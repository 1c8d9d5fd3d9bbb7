//! One typed launch per kernel: each kernel's arguments, in the order of its
//! signature in `kernels/*.cu`, are written here once ([`Kernel::params`]),
//! next to its grid ([`Kernel::config`]). A launch is a struct whose fields
//! are the kernel's parameters (device addresses typed by element, sizes as
//! `usize`) plus what the grid needs; `launch` is `unsafe` because the
//! addresses are raw: its caller promises what each must hold.
//!
//! The parameter names are the kernels' own, and a test reads every kernel's
//! signature out of the program source and checks names, count, order and
//! types (a pointer's element type, `int`, `u64`, `float`) against
//! [`Kernel::params`], so a swapped argument fails here instead of giving a
//! silently wrong answer on the GPU.
//!
//! (Long on purpose: one table of every kernel's launch, kept in one file so
//! the signature test checks all of them against the program source together.)

use std::marker::PhantomData;

use cudarc::driver::{CudaFunction, CudaSlice, CudaStream, LaunchConfig};
use half::bf16;

use super::device::{Gpu, grid, ptr};
use super::error::{CudaError, DriverContext};
use super::tensor_map::TensorMap;

/// The most splits a decode sequence's context is cut into (`attn_combine`
/// stages one weight per split in a shared array of this size). `-D` to the kernels.
pub(crate) const MAX_SPLITS: usize = 64;
/// Keys per tile of the decode attention kernel. `-D` to the kernels.
pub(crate) const DECODE_TILE: usize = 64;
/// Query rows per block of the prefill attention kernel (16 per warp). `-D` to the kernels.
pub(crate) const PREFILL_BQ: usize = 128;
/// Keys per tile of the prefill attention kernel. `-D` to the kernels.
pub(crate) const PREFILL_BK: usize = 64;
/// Threads of a decode attention block (its P·V reduction area is sized for it).
pub(crate) const DECODE_THREADS: u32 = 128;
/// Threads of a portable prefill attention block: one warp per 16 query rows.
pub(crate) const PREFILL_THREADS: u32 = (PREFILL_BQ / 16 * 32) as u32;
/// Threads of the warp-specialized Hopper prefill attention block: a producer
/// warpgroup and one consumer warpgroup per 64 query rows.
pub(crate) const PREFILL_WS_THREADS: u32 = ((PREFILL_BQ / 64 + 1) * 128) as u32;
/// Keys per tile of the warp-specialized Hopper prefill attention kernel
/// (FlashAttention-3's causal tile). `-D` to the kernels.
pub(crate) const PREFILL_WS_BK: usize = 128;
/// K/V tiles in the warp-specialized kernel's ring for a bf16 cache (with
/// 64-key tiles, 4, 5 and 6 measured the same on the H200). `-D` to the kernels.
pub(crate) const PREFILL_STAGES: usize = 3;
/// The same for an fp8 cache, whose two staging buffers of e4m3 tiles leave
/// room for two. `-D` to the kernels.
pub(crate) const PREFILL_FP8_STAGES: usize = 2;
/// Threads per row of the RMSNorm kernels for `rows` rows of `hidden` values.
/// A pass of many rows (a prefill chunk, from [`NORM_MANY_ROWS`] on) runs
/// `add_rmsnorm_rows` in blocks of a sixteenth of the width (128 to 1024), so
/// each thread holds its four 16-byte loads of the row in registers, all in
/// flight at once (`NORM_VEC` in kernels/elementwise.cu), and more blocks fit a
/// multiprocessor: the norms of an 8k chunk of the 8B shape took 87 → 66-68 µs
/// a layer on an H100 (docs/GPU_BENCH.md, nineteenth session). A decode step's
/// few rows keep `add_rmsnorm` in blocks of 1024, one load a thread: there a
/// row's latency counts, and the small blocks were 1-1.5 µs slower a norm at 1
/// to 256 rows.
pub(crate) fn norm_threads(rows: usize, hidden: usize) -> u32 {
    if rows >= NORM_MANY_ROWS {
        (hidden / 16).next_multiple_of(32).clamp(128, 1024) as u32
    } else {
        1024
    }
}
/// Rows from which a norm launch uses [`norm_threads`]'s small blocks: above
/// every decode batch bucket of the default limits (256 sequences).
pub(crate) const NORM_MANY_ROWS: usize = 512;
/// Threads of a `rope_kv` block (one token's heads).
const ROPE_THREADS: u32 = 512;
/// Threads per row of logits in the sampling kernel (its scans hold 32 warps).
const SAMPLE_THREADS: u32 = 1024;
/// Threads of a `gemv`/`gemv_silu` block: 8 warps, one output row each.
const GEMV_THREADS: u32 = 256;
/// Rows of input the `gemv` kernel handles (it is instantiated for 1..=8).
pub(crate) const GEMV_KERNEL_ROWS: usize = 8;
const _: () = assert!(MAX_SPLITS <= 64 && PREFILL_BQ.is_multiple_of(16));

/// A device address of `T` elements (null allowed where a kernel takes an
/// optional input). Making one is safe, as with a raw pointer; only a launch,
/// which is `unsafe`, reads or writes through it.
#[derive(Debug)]
pub(crate) struct Dev<T> {
    addr: u64,
    _elem: PhantomData<fn() -> T>,
}

impl<T> Clone for Dev<T> {
    fn clone(&self) -> Self {
        *self
    }
}
impl<T> Copy for Dev<T> {}

impl<T> Dev<T> {
    /// No buffer (the kernel's optional input is absent).
    pub(crate) const NULL: Self = Dev::from_raw(0);

    /// The address `addr` as a buffer of `T`.
    pub(crate) const fn from_raw(addr: u64) -> Self {
        Dev {
            addr,
            _elem: PhantomData,
        }
    }

    /// The start of `s`.
    pub(crate) fn of(s: &CudaSlice<T>, stream: &CudaStream) -> Self {
        Dev::from_raw(ptr(s, stream))
    }

    /// `elems` elements further on.
    pub(crate) fn add(self, elems: usize) -> Self {
        Dev::from_raw(self.addr + (elems * std::mem::size_of::<T>()) as u64)
    }

    /// The same address, read as elements of `U` (the metadata buffer's words
    /// as token ids).
    pub(crate) fn cast<U>(self) -> Dev<U> {
        Dev::from_raw(self.addr)
    }

    /// The raw address.
    pub(crate) fn addr(self) -> u64 {
        self.addr
    }
}

/// An element type a kernel's pointer parameter points to, by its name in the
/// kernel source.
pub(crate) trait Elem {
    /// The C type (`bf16`, `float`, `int`, `u32`).
    const C: &'static str;
}
impl Elem for bf16 {
    const C: &'static str = "bf16";
}
impl Elem for f32 {
    const C: &'static str = "float";
}
impl Elem for i32 {
    const C: &'static str = "int";
}
impl Elem for u32 {
    const C: &'static str = "u32";
}
impl Elem for u8 {
    const C: &'static str = "unsigned char";
}

/// One kernel parameter, as the driver receives it.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) enum Param {
    /// A device address (`T*` in the kernel) and the C name of `T` (`void` for
    /// an untyped output).
    Ptr(u64, &'static str),
    /// `int`.
    I32(i32),
    /// `u64`.
    U64(u64),
    /// `float`.
    F32(f32),
}

impl<T: Elem> From<Dev<T>> for Param {
    fn from(d: Dev<T>) -> Self {
        Param::Ptr(d.addr, T::C)
    }
}

/// A kernel's `int` parameter from a size; an error past `i32::MAX`.
fn int(v: usize) -> Result<Param, CudaError> {
    i32::try_from(v)
        .map(Param::I32)
        .map_err(|_| CudaError::Unsupported(format!("kernel argument {v} exceeds a 32-bit int")))
}

/// A kernel launch with its parameters and grid.
pub(crate) trait Kernel {
    /// The kernel's name in the program (`decode_attn_*`, `prefill_attn_*`: the
    /// stem; the instance is picked for the model at start).
    const NAME: &'static str;
    /// The kernel's parameters by name, in the order of its signature.
    fn params(&self) -> Result<Vec<(&'static str, Param)>, CudaError>;
    /// Grid, block and dynamic shared memory.
    fn config(&self) -> LaunchConfig;
    /// The compiled function on `gpu`.
    fn function<'g>(&self, gpu: &'g Gpu) -> &'g CudaFunction;
}

/// Queues `k` on `gpu`'s compute stream, a programmatic dependent launch when `pdl`.
///
/// # Safety
/// Every address among `k`'s parameters must be a live allocation of the
/// size and element type the kernel's documentation (its struct here) names
/// for the grid [`Kernel::config`] gives.
pub(crate) unsafe fn launch<K: Kernel>(gpu: &Gpu, k: &K, pdl: bool) -> Result<(), CudaError> {
    let params = k.params()?;
    let mut l = gpu.kernel(k.function(gpu), pdl);
    for (_, p) in &params {
        match p {
            Param::Ptr(v, _) | Param::U64(v) => l.arg(v),
            Param::I32(v) => l.arg(v),
            Param::F32(v) => l.arg(v),
        };
    }
    // SAFETY: `params` follows the kernel's signature (checked against the source
    // in the tests below); the pointers are forwarded to the caller.
    unsafe { l.launch(k.config()) }.op(K::NAME)
}

/// `embed`: `x[row] = table[ids[row]]` (f32) for `rows` token ids.
/// Holds: `ids` `rows` ids below the table's rows, `table` `[vocab, hidden]`,
/// `x` `rows × hidden`.
pub(crate) struct Embed {
    pub rows: usize,
    pub ids: Dev<u32>,
    pub table: Dev<bf16>,
    pub x: Dev<f32>,
    pub hidden: usize,
}

impl Kernel for Embed {
    const NAME: &'static str = "embed";
    fn params(&self) -> Result<Vec<(&'static str, Param)>, CudaError> {
        Ok(vec![
            ("ids", self.ids.into()),
            ("table", self.table.into()),
            ("x", self.x.into()),
            ("hidden", int(self.hidden)?),
        ])
    }
    fn config(&self) -> LaunchConfig {
        grid(self.rows as u32, 256)
    }
    fn function<'g>(&self, gpu: &'g Gpu) -> &'g CudaFunction {
        &gpu.k.embed
    }
}

/// `add_rmsnorm` (`add_rmsnorm_rows` from [`NORM_MANY_ROWS`] rows on, the same
/// signature): for output row `r` of `rows`, source row `s = rows_map[r]`
/// (or `r` when null): `x[s] += delta[s]` (when `delta` is not null), then
/// `out[r] = rmsnorm(x[s]) · w`. Holds: `x`, `delta` source rows × hidden f32,
/// `rows_map` `rows` ints, `w` hidden bf16, `out` `rows × hidden` bf16.
pub(crate) struct AddRmsnorm {
    pub rows: usize,
    pub x: Dev<f32>,
    pub delta: Dev<f32>,
    pub rows_map: Dev<i32>,
    pub w: Dev<bf16>,
    pub out: Dev<bf16>,
    pub hidden: usize,
    pub eps: f32,
}

impl Kernel for AddRmsnorm {
    const NAME: &'static str = "add_rmsnorm";
    fn params(&self) -> Result<Vec<(&'static str, Param)>, CudaError> {
        Ok(vec![
            ("x", self.x.into()),
            ("delta", self.delta.into()),
            ("rows", self.rows_map.into()),
            ("w", self.w.into()),
            ("out", self.out.into()),
            ("hidden", int(self.hidden)?),
            ("eps", Param::F32(self.eps)),
        ])
    }
    fn config(&self) -> LaunchConfig {
        grid(self.rows as u32, norm_threads(self.rows, self.hidden))
    }
    fn function<'g>(&self, gpu: &'g Gpu) -> &'g CudaFunction {
        if self.rows >= NORM_MANY_ROWS {
            &gpu.k.add_rmsnorm_rows
        } else {
            &gpu.k.add_rmsnorm
        }
    }
}

/// `rope_kv`: rotary embedding of q and k for `tokens` rows of `qkv`
/// (`[tokens, (hq + 2 hkv) hd]`, optional `bias` of that width), q into
/// `q_out` (`[tokens, hq hd]`), K and V into the cache layer `cache` at
/// `slots[t]`, or (when `kv_out` is not null: an fp8 cache) as f32 rows
/// `[tokens, 2, hkv, hd]` into `kv_out` for [`KvFp8Store`]; positions in
/// `pos`. `inv_freq` holds `hd / 2` floats.
pub(crate) struct RopeKv {
    pub tokens: usize,
    pub qkv: Dev<bf16>,
    pub bias: Dev<bf16>,
    pub pos: Dev<i32>,
    pub slots: Dev<i32>,
    pub inv_freq: Dev<f32>,
    pub q_out: Dev<bf16>,
    pub cache: Dev<bf16>,
    pub kv_out: Dev<f32>,
    pub hq: usize,
    pub hkv: usize,
    pub hd: usize,
    pub block_size: usize,
}

impl Kernel for RopeKv {
    const NAME: &'static str = "rope_kv";
    fn params(&self) -> Result<Vec<(&'static str, Param)>, CudaError> {
        Ok(vec![
            ("qkv", self.qkv.into()),
            ("bias", self.bias.into()),
            ("pos", self.pos.into()),
            ("slots", self.slots.into()),
            ("inv_freq", self.inv_freq.into()),
            ("q_out", self.q_out.into()),
            ("cache", self.cache.into()),
            ("kv_out", self.kv_out.into()),
            ("hq", int(self.hq)?),
            ("hkv", int(self.hkv)?),
            ("hd", int(self.hd)?),
            ("bs", int(self.block_size)?),
        ])
    }
    /// One block per token (no tokens: an invalid launch, never a block that
    /// would write K/V at a stale slot).
    fn config(&self) -> LaunchConfig {
        LaunchConfig {
            grid_dim: (self.tokens as u32, 1, 1),
            block_dim: (ROPE_THREADS, 1, 1),
            shared_mem_bytes: 0,
        }
    }
    fn function<'g>(&self, gpu: &'g Gpu) -> &'g CudaFunction {
        &gpu.k.rope_kv
    }
}

/// `kv_fp8_store`: stores `tokens`' rotated K and V (`kv`, `[tokens, 2, hkv,
/// hd]` f32) into an fp8 (e4m3) cache layer at `slots[t]`, bit for bit as
/// [`kv_quant::write_token`](crate::kv_quant::write_token) token by token
/// (requantizing a block's earlier slots when its scale rises). Holds:
/// `runs` `runs + 1` ints from [`fp8_store_runs`], `slots` `tokens` ints,
/// `cache` the layer's blocks (`2 hkv bs hd` bytes each, `[K: head][slot][dim]`
/// then V), `scales` `2 hkv` f32 per block (`[kind][head]`).
pub(crate) struct KvFp8Store {
    pub runs: usize,
    pub kv: Dev<f32>,
    pub run_starts: Dev<i32>,
    pub slots: Dev<i32>,
    pub cache: Dev<u8>,
    pub scales: Dev<f32>,
    pub hkv: usize,
    pub hd: usize,
    pub block_size: usize,
}

impl Kernel for KvFp8Store {
    const NAME: &'static str = "kv_fp8_store";
    fn params(&self) -> Result<Vec<(&'static str, Param)>, CudaError> {
        Ok(vec![
            ("kv", self.kv.into()),
            ("runs", self.run_starts.into()),
            ("slots", self.slots.into()),
            ("cache", self.cache.into()),
            ("scales", self.scales.into()),
            ("hkv", int(self.hkv)?),
            ("hd", int(self.hd)?),
            ("bs", int(self.block_size)?),
        ])
    }
    /// One block per (run, K or V and head), `hd` threads (a multiple of 32:
    /// the kernel's block-wide max reduces whole warps).
    fn config(&self) -> LaunchConfig {
        LaunchConfig {
            grid_dim: (self.runs as u32, (2 * self.hkv) as u32, 1),
            block_dim: (self.hd as u32, 1, 1),
            shared_mem_bytes: 0,
        }
    }
    fn function<'g>(&self, gpu: &'g Gpu) -> &'g CudaFunction {
        &gpu.k.kv_fp8_store
    }
}

/// The runs `kv_fp8_store` takes for tokens written at `slots` (`block * bs +
/// slot`, in the order the tokens are stored): `starts[r]..starts[r + 1]` are
/// the tokens of run `r`, cut wherever a token's block differs from the one
/// before it. A block may appear in two runs only if it does in `slots` with
/// other blocks between (two sequences never share a written block, and one
/// sequence's tokens are in position order, so in a pass it does not); runs of
/// one launch run concurrently, so the caller must not pass such slots.
pub(crate) fn fp8_store_runs(slots: &[i32], block_size: usize) -> Vec<i32> {
    let bs = block_size.max(1) as i64;
    let mut starts = Vec::with_capacity(slots.len() / block_size.max(1) + 2);
    let mut prev = None;
    for (t, &s) in slots.iter().enumerate() {
        let block = i64::from(s).div_euclid(bs);
        if prev != Some(block) {
            starts.push(t as i32);
            prev = Some(block);
        }
    }
    starts.push(slots.len() as i32);
    starts
}

/// `silu_mul`: `act[r, i] = silu(gu[r, i]) · gu[r, inter + i]` for `n` rows;
/// `gu` `n × 2 inter` bf16, `act` `n × inter` bf16.
pub(crate) struct SiluMul {
    pub gu: Dev<bf16>,
    pub act: Dev<bf16>,
    pub n: usize,
    pub inter: usize,
}

impl Kernel for SiluMul {
    const NAME: &'static str = "silu_mul";
    fn params(&self) -> Result<Vec<(&'static str, Param)>, CudaError> {
        Ok(vec![
            ("gu", self.gu.into()),
            ("act", self.act.into()),
            ("n", int(self.n)?),
            ("inter", int(self.inter)?),
        ])
    }
    /// Rows along y (at most 65535 at once, the kernel strides over the rest);
    /// along x enough blocks of 256 threads for a row, 8 values a thread when
    /// `inter` is a multiple of 8 (the kernel's vector path).
    fn config(&self) -> LaunchConfig {
        let per_thread = if self.inter.is_multiple_of(8) { 8 } else { 1 };
        LaunchConfig {
            grid_dim: (
                self.inter.div_ceil(256 * per_thread).max(1) as u32,
                self.n.clamp(1, 65535) as u32,
                1,
            ),
            block_dim: (256, 1, 1),
            shared_mem_bytes: 0,
        }
    }
    fn function<'g>(&self, gpu: &'g Gpu) -> &'g CudaFunction {
        &gpu.k.silu_mul
    }
}

/// `fill_uniform`: `n` bf16 at `p`, uniform in `[lo, hi)` from `seed`.
pub(crate) struct FillUniform {
    pub p: Dev<bf16>,
    pub n: usize,
    pub seed: u64,
    pub lo: f32,
    pub hi: f32,
}

impl Kernel for FillUniform {
    const NAME: &'static str = "fill_uniform";
    fn params(&self) -> Result<Vec<(&'static str, Param)>, CudaError> {
        Ok(vec![
            ("p", self.p.into()),
            ("n", Param::U64(self.n as u64)),
            ("seed", Param::U64(self.seed)),
            ("lo", Param::F32(self.lo)),
            ("hi", Param::F32(self.hi)),
        ])
    }
    /// A grid-stride loop over 1024 blocks of 256.
    fn config(&self) -> LaunchConfig {
        grid(1024, 256)
    }
    fn function<'g>(&self, gpu: &'g Gpu) -> &'g CudaFunction {
        &gpu.k.fill_uniform
    }
}

/// Where a product's output goes: f32 (added to the residual stream) or bf16.
#[derive(Debug, Clone, Copy)]
pub(crate) enum ProductOut {
    /// f32 rows.
    F32(Dev<f32>),
    /// bf16 rows.
    Bf16(Dev<bf16>),
    /// f32 rows the product is added to (cuBLAS's epilogue, beta = 1; not the
    /// `gemv` kernel, which only writes).
    AddF32(Dev<f32>),
}

/// `gemv`: `y[r, o] = Σ_k x[r, k] w[o, k]` for `n` ≤ [`GEMV_KERNEL_ROWS`] rows;
/// `x` `n × k` bf16, `w` `out × k` bf16, `y` `n × out`; `k` a multiple of 8.
pub(crate) struct Gemv {
    pub x: Dev<bf16>,
    pub w: Dev<bf16>,
    pub y: ProductOut,
    pub n: usize,
    pub k: usize,
    pub out: usize,
    /// Bytes at the start of each weight row a warp asks L2 for before it waits
    /// for the kernel before (0: none).
    pub prefetch: usize,
}

impl Kernel for Gemv {
    const NAME: &'static str = "gemv";
    fn params(&self) -> Result<Vec<(&'static str, Param)>, CudaError> {
        let (y, y_f32) = match self.y {
            ProductOut::F32(y) => (y.addr, 1),
            ProductOut::Bf16(y) => (y.addr, 0),
            ProductOut::AddF32(_) => {
                return Err(CudaError::Unsupported(
                    "the gemv kernel writes its output; it cannot add to it".into(),
                ));
            }
        };
        Ok(vec![
            ("x", self.x.into()),
            ("w", self.w.into()),
            ("y", Param::Ptr(y, "void")),
            ("n", int(self.n)?),
            ("k", int(self.k)?),
            ("out", int(self.out)?),
            ("y_f32", Param::I32(y_f32)),
            ("prefetch", int(self.prefetch)?),
        ])
    }
    /// One warp per output row, 8 warps a block.
    fn config(&self) -> LaunchConfig {
        grid(self.out.div_ceil(8) as u32, GEMV_THREADS)
    }
    fn function<'g>(&self, gpu: &'g Gpu) -> &'g CudaFunction {
        &gpu.k.gemv
    }
}

/// `gemv_silu`: `act[o] = silu(x · w[o]) · (x · w[inter + o])` for one row;
/// `w = [gate; up]` of `2 inter × k` bf16, `x` `k` bf16, `act` `inter` bf16;
/// `k` a multiple of 8.
pub(crate) struct GemvSilu {
    pub x: Dev<bf16>,
    pub w: Dev<bf16>,
    pub act: Dev<bf16>,
    pub k: usize,
    pub inter: usize,
    /// As [`Gemv::prefetch`] (for each of the warp's two rows).
    pub prefetch: usize,
}

impl Kernel for GemvSilu {
    const NAME: &'static str = "gemv_silu";
    fn params(&self) -> Result<Vec<(&'static str, Param)>, CudaError> {
        Ok(vec![
            ("x", self.x.into()),
            ("w", self.w.into()),
            ("act", self.act.into()),
            ("k", int(self.k)?),
            ("inter", int(self.inter)?),
            ("prefetch", int(self.prefetch)?),
        ])
    }
    /// One warp per output element, 8 warps a block.
    fn config(&self) -> LaunchConfig {
        grid(self.inter.div_ceil(8) as u32, GEMV_THREADS)
    }
    fn function<'g>(&self, gpu: &'g Gpu) -> &'g CudaFunction {
        &gpu.k.gemv_silu
    }
}

/// The KV cache layer an attention kernel reads: bf16, or fp8 (e4m3) values
/// and their scales (`decode_attn_fp8_*`, `prefill_attn_fp8_*`, picked at
/// start for the cache's dtype: [`Gpu::open`](super::device::Gpu::open)).
#[derive(Debug, Clone, Copy)]
pub(crate) enum KvRead {
    /// `2 hkv bs hd` bf16 per block.
    Bf16(Dev<bf16>),
    /// `2 hkv bs hd` e4m3 bytes per block; `2 hkv` f32 scales per block.
    Fp8 { cache: Dev<u8>, scales: Dev<f32> },
}

impl KvRead {
    /// The kernel parameters it stands for: `cache` (and `scales`).
    fn params(self) -> Vec<(&'static str, Param)> {
        match self {
            KvRead::Bf16(c) => vec![("cache", c.into())],
            KvRead::Fp8 { cache, scales } => {
                vec![("cache", cache.into()), ("scales", scales.into())]
            }
        }
    }
}

/// `decode_attn_{hd}_{group}`: one query token per sequence for `seqs`
/// sequences, each context cut into at most `max_splits` splits; unnormalised
/// partial results into `part_o` (`seqs × hq × max_splits × hd` f32) and
/// `part_ml` (`seqs × hq × max_splits × 2` f32). `q` `seqs × hq × hd` bf16;
/// `tables` `seqs` rows of `*table_stride` block ids; `seq_lens` `seqs` ints;
/// `window` 0 for none. `smem`: the dynamic shared memory (`decode_smem`).
pub(crate) struct DecodeAttn {
    pub seqs: usize,
    pub smem: usize,
    pub q: Dev<bf16>,
    pub cache: KvRead,
    pub tables: Dev<i32>,
    pub table_stride: Dev<i32>,
    pub seq_lens: Dev<i32>,
    pub part_o: Dev<f32>,
    pub part_ml: Dev<f32>,
    /// The normalised output (`seqs × hq × hd` bf16), written here instead of
    /// the partial results when `max_splits` is 1 ([`AttnCombine`] is then not
    /// launched).
    pub out: Dev<bf16>,
    pub hq: usize,
    pub hkv: usize,
    pub block_size: usize,
    pub max_splits: usize,
    pub window: usize,
    pub scale: f32,
}

impl Kernel for DecodeAttn {
    const NAME: &'static str = "decode_attn";
    fn params(&self) -> Result<Vec<(&'static str, Param)>, CudaError> {
        let mut p = vec![("q", self.q.into())];
        p.extend(self.cache.params());
        p.extend([
            ("tables", self.tables.into()),
            ("table_stride", self.table_stride.into()),
            ("seq_lens", self.seq_lens.into()),
            ("part_o", self.part_o.into()),
            ("part_ml", self.part_ml.into()),
            ("out", self.out.into()),
            ("hq", int(self.hq)?),
            ("hkv", int(self.hkv)?),
            ("bs", int(self.block_size)?),
            ("max_splits", int(self.max_splits)?),
            ("window", int(self.window)?),
            ("scale", Param::F32(self.scale)),
        ]);
        Ok(p)
    }
    /// One block per (split, KV head, sequence).
    fn config(&self) -> LaunchConfig {
        LaunchConfig {
            grid_dim: (self.max_splits as u32, self.hkv as u32, self.seqs as u32),
            block_dim: (DECODE_THREADS, 1, 1),
            shared_mem_bytes: self.smem as u32,
        }
    }
    fn function<'g>(&self, gpu: &'g Gpu) -> &'g CudaFunction {
        match self.cache {
            KvRead::Bf16(_) => &gpu.k.decode_attn,
            KvRead::Fp8 { .. } => &gpu.k.decode_attn_fp8,
        }
    }
}

/// `attn_combine`: merges [`DecodeAttn`]'s splits into `out` (`seqs × hq × hd`
/// bf16), the split count recomputed from `seq_lens` as the attention did.
pub(crate) struct AttnCombine {
    pub seqs: usize,
    pub part_o: Dev<f32>,
    pub part_ml: Dev<f32>,
    pub seq_lens: Dev<i32>,
    pub out: Dev<bf16>,
    pub hq: usize,
    pub hd: usize,
    pub max_splits: usize,
}

impl Kernel for AttnCombine {
    const NAME: &'static str = "attn_combine";
    fn params(&self) -> Result<Vec<(&'static str, Param)>, CudaError> {
        Ok(vec![
            ("part_o", self.part_o.into()),
            ("part_ml", self.part_ml.into()),
            ("seq_lens", self.seq_lens.into()),
            ("out", self.out.into()),
            ("hq", int(self.hq)?),
            ("hd", int(self.hd)?),
            ("max_splits", int(self.max_splits)?),
        ])
    }
    /// One block per (query head, sequence), one thread per dimension.
    fn config(&self) -> LaunchConfig {
        LaunchConfig {
            grid_dim: (self.hq as u32, self.seqs as u32, 1),
            block_dim: (self.hd as u32, 1, 1),
            shared_mem_bytes: 0,
        }
    }
    fn function<'g>(&self, gpu: &'g Gpu) -> &'g CudaFunction {
        &gpu.k.attn_combine
    }
}

/// `prefill_attn_{hd}`: causal attention of `chunks` chunks, the longest
/// `max_q` tokens. Chunk `c`'s queries are rows `q_off[c] ..` of `q`
/// (`[n, hq, hd]` bf16), `q_len[c]` of them at positions `q_pos[c] ..`; keys
/// through `tables` (`chunks` rows of `table_stride` block ids); output rows
/// into `out` like `q`.
pub(crate) struct PrefillAttn {
    pub chunks: usize,
    pub max_q: usize,
    pub q: Dev<bf16>,
    pub cache: KvRead,
    /// The layer's TMA tensor map (`tensor_map`), or null: a bf16 cache only.
    pub tmap: Dev<TensorMap>,
    pub tables: Dev<i32>,
    pub table_stride: usize,
    pub q_off: Dev<i32>,
    pub q_pos: Dev<i32>,
    pub q_len: Dev<i32>,
    pub out: Dev<bf16>,
    pub hq: usize,
    pub hkv: usize,
    pub block_size: usize,
    pub window: usize,
    pub scale: f32,
    /// Block size and shared memory of the kernel instance ([`prefill_shape`]).
    pub shape: PrefillShape,
}

impl Kernel for PrefillAttn {
    const NAME: &'static str = "prefill_attn";
    fn params(&self) -> Result<Vec<(&'static str, Param)>, CudaError> {
        let mut p = vec![("q", self.q.into())];
        p.extend(self.cache.params());
        if let KvRead::Bf16(_) = self.cache {
            p.push(("tmap", self.tmap.into()));
        }
        p.extend([
            ("tables", self.tables.into()),
            ("table_stride", int(self.table_stride)?),
            ("q_off", self.q_off.into()),
            ("q_pos", self.q_pos.into()),
            ("q_len", self.q_len.into()),
            ("out", self.out.into()),
            ("hq", int(self.hq)?),
            ("hkv", int(self.hkv)?),
            ("bs", int(self.block_size)?),
            ("window", int(self.window)?),
            ("scale", Param::F32(self.scale)),
        ]);
        Ok(p)
    }
    /// One block per (tile of [`PREFILL_BQ`] queries, head, chunk).
    fn config(&self) -> LaunchConfig {
        LaunchConfig {
            grid_dim: (
                self.max_q.div_ceil(PREFILL_BQ) as u32,
                self.hq as u32,
                self.chunks as u32,
            ),
            block_dim: (self.shape.threads, 1, 1),
            shared_mem_bytes: self.shape.smem as u32,
        }
    }
    fn function<'g>(&self, gpu: &'g Gpu) -> &'g CudaFunction {
        match self.cache {
            KvRead::Bf16(_) => &gpu.k.prefill_attn,
            KvRead::Fp8 { .. } => &gpu.k.prefill_attn_fp8,
        }
    }
}

/// `sample_rows`: one token id per row of `logits` (`rows × vocab` f32) into
/// `ids`, drawn as `draws` (5 words a row: temperature, top_k, top_p, min_p,
/// u01) says.
pub(crate) struct SampleRows {
    pub rows: usize,
    pub logits: Dev<f32>,
    pub draws: Dev<i32>,
    pub ids: Dev<u32>,
    pub vocab: usize,
}

impl Kernel for SampleRows {
    const NAME: &'static str = "sample_rows";
    fn params(&self) -> Result<Vec<(&'static str, Param)>, CudaError> {
        Ok(vec![
            ("logits", self.logits.into()),
            ("draws", self.draws.into()),
            ("ids", self.ids.into()),
            ("vocab", int(self.vocab)?),
        ])
    }
    /// One block per row.
    fn config(&self) -> LaunchConfig {
        grid(self.rows as u32, SAMPLE_THREADS)
    }
    fn function<'g>(&self, gpu: &'g Gpu) -> &'g CudaFunction {
        &gpu.k.sample_rows
    }
}

/// `mask_logits`: a grammar's packed allowed-token bitmask applied to rows of
/// `logits` (`rows × vocab` f32): `masks[row]` indexes `bits` (`vocab / 32`
/// words a mask, rounded up), -1 for none; disallowed tokens get -inf.
pub(crate) struct MaskLogits {
    pub rows: usize,
    pub logits: Dev<f32>,
    pub bits: Dev<u32>,
    pub masks: Dev<i32>,
    pub vocab: usize,
}

impl Kernel for MaskLogits {
    const NAME: &'static str = "mask_logits";
    fn params(&self) -> Result<Vec<(&'static str, Param)>, CudaError> {
        Ok(vec![
            ("logits", self.logits.into()),
            ("bits", self.bits.into()),
            ("masks", self.masks.into()),
            ("vocab", int(self.vocab)?),
        ])
    }
    /// One block per row.
    fn config(&self) -> LaunchConfig {
        grid(self.rows as u32, SAMPLE_THREADS)
    }
    fn function<'g>(&self, gpu: &'g Gpu) -> &'g CudaFunction {
        &gpu.k.mask_logits
    }
}

/// `row_logprobs`: the sampled token's (`ids`) and the `top_n` most likely
/// tokens' log probabilities of each row of `logits` under its draw's
/// temperature (`draws`, 5 words a row): `lps` gets `1 + MAX_TOP_LOGPROBS`
/// floats a row, `top_ids` `MAX_TOP_LOGPROBS` ids a row.
pub(crate) struct RowLogprobs {
    pub rows: usize,
    pub logits: Dev<f32>,
    pub draws: Dev<i32>,
    pub ids: Dev<u32>,
    pub lps: Dev<f32>,
    pub top_ids: Dev<u32>,
    pub vocab: usize,
    pub top_n: usize,
}

impl Kernel for RowLogprobs {
    const NAME: &'static str = "row_logprobs";
    fn params(&self) -> Result<Vec<(&'static str, Param)>, CudaError> {
        Ok(vec![
            ("logits", self.logits.into()),
            ("draws", self.draws.into()),
            ("ids", self.ids.into()),
            ("lps", self.lps.into()),
            ("top_ids", self.top_ids.into()),
            ("vocab", int(self.vocab)?),
            ("top_n", int(self.top_n)?),
        ])
    }
    /// One block per row.
    fn config(&self) -> LaunchConfig {
        grid(self.rows as u32, SAMPLE_THREADS)
    }
    fn function<'g>(&self, gpu: &'g Gpu) -> &'g CudaFunction {
        &gpu.k.row_logprobs
    }
}

/// Dynamic shared memory of `decode_attn_{head_dim}_{group}`
/// (`kernels/decode_attn.cu`): each of the 4 warps' two stages of 16-key K and
/// V tiles (`2 · 2 · DECODE_TILE · head_dim` bf16 in all), then room for the
/// merge of the warps' partial outputs and (m, l) (`4 · group · head_dim` +
/// `8 · group` f32 at most; the size kept from the earlier kernel's scores and
/// reduction area covers it). `fp8` (`decode_attn_fp8_*`): the same tile bytes
/// hold each warp's one bf16 tile and two stages of e4m3 tiles, plus two
/// stages of its 16 keys' K and V scales.
pub(crate) fn decode_smem(head_dim: usize, group: usize, fp8: bool) -> usize {
    2 * 2 * DECODE_TILE * head_dim * 2
        + if fp8 {
            DECODE_TILE / 16 * 2 * 2 * 16 * 4
        } else {
            0
        }
        + 4 * group * DECODE_TILE
        + 4 * (4 * DECODE_THREADS as usize) * group
}

/// How a `prefill_attn_*` block is launched: threads and dynamic shared memory.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct PrefillShape {
    pub threads: u32,
    pub smem: usize,
}

/// The launch of `prefill_attn_{head_dim}` (`fp8`: `prefill_attn_fp8_*`) as
/// compiled for `arch`: on `sm_90a` head sizes 64 and 128 take the
/// warp-specialized kernel, everything else the portable one (the same test
/// as the dispatch at the end of `kernels/prefill_attn.cu`).
pub(crate) fn prefill_shape(arch: &str, head_dim: usize, fp8: bool) -> PrefillShape {
    if arch == "sm_90a" && matches!(head_dim, 64 | 128) {
        PrefillShape {
            threads: PREFILL_WS_THREADS,
            smem: prefill_ws_smem(head_dim, fp8),
        }
    } else {
        PrefillShape {
            threads: PREFILL_THREADS,
            smem: prefill_smem(head_dim),
        }
    }
}

/// Dynamic shared memory of the portable `prefill_attn`: room for up to three
/// stages of a [`PREFILL_BK`]-key K and V tile and one [`PREFILL_BQ`]-row query
/// tile, rows padded by 8 elements. The kernel decides how it uses it; at 256
/// threads of ~180 registers one block fills an SM's register file anyway, so
/// the room costs no occupancy.
pub(crate) fn prefill_smem(head_dim: usize) -> usize {
    (3 * 2 * PREFILL_BK + PREFILL_BQ) * (head_dim + 8) * 2
}

/// Dynamic shared memory of the warp-specialized `prefill_attn`: its ring of
/// [`PREFILL_STAGES`] ([`PREFILL_FP8_STAGES`]) bf16 K and V tiles of
/// [`PREFILL_WS_BK`] keys with their keys' f32 scales, a `full` and an `empty`
/// barrier (8 bytes each) per stage, and (`fp8`) two staging buffers of e4m3 K
/// and V tiles with their scales; plus 1 KiB so the kernel can start its tiles
/// on a 1024-byte boundary (the 128-byte swizzle's period).
pub(crate) fn prefill_ws_smem(head_dim: usize, fp8: bool) -> usize {
    let stage = 2 * PREFILL_WS_BK * head_dim * 2 + 2 * PREFILL_WS_BK * 4 + 2 * 8;
    let raw = 2 * (2 * PREFILL_WS_BK * head_dim + 2 * PREFILL_WS_BK * 4);
    if fp8 {
        1024 + PREFILL_FP8_STAGES * stage + raw
    } else {
        1024 + PREFILL_STAGES * stage
    }
}

#[cfg(test)]
#[path = "launch_tests.rs"]
mod tests;
