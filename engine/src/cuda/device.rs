//! One GPU: its context, streams, the compiled kernels and cuBLAS, and the
//! unsafe driver calls under the launches ([`Launch`]), raw copies and GEMMs.
//!
//! Kernels take raw device pointers (`u64`): the backend owns every buffer for
//! its whole life (allocated once at start), so lifetimes are simple, and
//! cudarc's per-argument event tracking, which the compute stream does not
//! need, is switched off. Ordering between the compute stream and the copy
//! stream is explicit (events). The methods that take raw addresses are
//! crate-private (or `unsafe`); the public ones take buffers.

use std::ffi::c_void;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicI32, Ordering};

use cudarc::cublas::{CudaBlas, sys as blas_sys};
use cudarc::driver::{
    CudaContext, CudaFunction, CudaSlice, CudaStream, DevicePtr, DeviceRepr, LaunchConfig,
    ValidAsZeroBits,
};

use half::bf16;

use super::error::{CudaError, DriverContext, require};
use super::gemm_tune::{Operands, Picked, Queue, Shape, Tuner, Tuning};
use super::launch::{
    self, DECODE_THREADS, Dev, FillUniform, GEMV_KERNEL_ROWS, Gemv, GemvSilu, PrefillShape,
    ProductOut, SiluMul, decode_smem, prefill_shape,
};
use super::program;
pub use super::program::{DEFAULT_INCLUDE_DIRS, include_dir};
use crate::config::ModelConfig;
use crate::model_dir::GpuPriority;

/// The kernels, looked up once (launched through [`launch`](super::launch)).
pub(crate) struct Kernels {
    pub embed: CudaFunction,
    pub add_rmsnorm: CudaFunction,
    /// The same for a pass of many rows (`AddRmsnorm`'s choice).
    pub add_rmsnorm_rows: CudaFunction,
    pub rope_kv: CudaFunction,
    /// The fp8 (e4m3) KV cache store (kernels/kv_fp8.cu).
    pub kv_fp8_store: CudaFunction,
    pub silu_mul: CudaFunction,
    /// Greedy or top-k/top-p/min-p sampling of rows of logits.
    pub sample_rows: CudaFunction,
    /// A grammar's allowed-token bitmask applied to rows of logits.
    pub mask_logits: CudaFunction,
    /// Log probabilities of sampled tokens and the most likely ones.
    pub row_logprobs: CudaFunction,
    pub fill_uniform: CudaFunction,
    pub gemv: CudaFunction,
    /// The gate/up product fused with the SiLU·up activation, one row.
    pub gemv_silu: CudaFunction,
    pub attn_combine: CudaFunction,
    /// `decode_attn_{32,64,128}_{1,2,4,8}` for the model's head_dim and group size.
    pub decode_attn: CudaFunction,
    /// `prefill_attn_{32,64,128}` for the model's head_dim.
    pub prefill_attn: CudaFunction,
    /// `decode_attn_fp8_*`: the same over an fp8 (e4m3) cache.
    pub decode_attn_fp8: CudaFunction,
    /// `prefill_attn_fp8_*`: the same over an fp8 (e4m3) cache.
    pub prefill_attn_fp8: CudaFunction,
}

/// A GPU with a compute stream, a copy stream, kernels and cuBLAS.
pub struct Gpu {
    pub(crate) ctx: Arc<CudaContext>,
    /// Where the forward pass runs.
    pub(crate) compute: Arc<CudaStream>,
    /// Where KV layers move to and from pinned host memory.
    pub(crate) copy: Arc<CudaStream>,
    /// How both streams rank against other work on the GPU: the CUDA stream
    /// priorities of the normal and the high rank (lower is ahead), the one
    /// the streams have now, and whether steps still move it (`Auto`, until
    /// the driver refuses a move).
    ranks: [i32; 2],
    rank: AtomicI32,
    ranked_by_step: AtomicBool,
    pub(crate) k: Kernels,
    blas: CudaBlas,
    /// cuBLASLt and the algorithms timed for the products at the decode
    /// buckets' row counts and at full passes (`gemm_tune`).
    tuner: Tuner,
    /// Rows of a full pass (the backend's token budget), whose products are
    /// tuned too: a long prompt's chunks fill it (0: none).
    pass_rows: usize,
    /// cuBLAS's workspace, set once so that GEMMs captured in a CUDA graph never
    /// allocate.
    _blas_workspace: CudaSlice<u8>,
    /// Dynamic shared memory the decode attention kernel is launched with.
    pub(crate) decode_smem: usize,
    /// The same for its fp8-cache instance.
    pub(crate) decode_smem_fp8: usize,
    /// Decode attention blocks resident at once on the whole GPU (one wave).
    pub(crate) decode_wave: usize,
    /// How `prefill_attn` and its fp8-cache instance are launched.
    pub(crate) prefill: PrefillShape,
    pub(crate) prefill_fp8: PrefillShape,
    /// The target the kernels were compiled for (`sm_90a`, `sm_90`, ..).
    arch: &'static str,
    /// Use cuBLAS even for skinny products (`TANDEM_CUDA_CUBLAS_ONLY=1`, for comparisons).
    cublas_only: bool,
    /// Above one row, the o and down products add into the residual stream in
    /// cuBLAS's epilogue (`TANDEM_CUDA_RESIDUAL_EPILOGUE=0`: they write `delta`
    /// and the norms add it, for comparisons).
    pub(crate) residual_epilogue: bool,
    /// Launch the forward pass's kernels as programmatic dependent launches
    /// (`TANDEM_CUDA_PDL=0` turns it off).
    pub(crate) pdl: bool,
    /// Bytes at the start of each weight row a `gemv` warp asks L2 for before it
    /// waits for the kernel before (PDL launches only; docs/GPU_BENCH.md, eleventh
    /// session). `TANDEM_CUDA_PREFETCH_ROWS=BYTES` sets it, 0 turns it off.
    pub(crate) prefetch_row_bytes: usize,
    /// The Hopper prefill attention loads a bf16 cache's tiles by TMA where the
    /// block size allows (`tensor_map`); `TANDEM_CUDA_TMA=0` keeps its copies.
    pub(crate) tma: bool,
}

/// [`Gpu::prefetch_row_bytes`] by default on a GPU of at most
/// [`PREFETCH_MAX_GBS_PER_SM`]: a few µs of HBM time ahead of a product, spread
/// over its first wave's rows (whole rows, more than L2 holds, evict each
/// other: 24% slower steps on an H100).
const PREFETCH_ROW_BYTES: usize = 1024;

/// The DRAM peak per multiprocessor (GB/s) above which a GPU prefetches no
/// row starts by default. 1 KiB a row took 0.3-0.6% off the 1k batch-1 step on
/// H100s (25.4 GB/s a multiprocessor) and added 0.3-0.5% on the H200 (36.5),
/// in every process of each (docs/GPU_BENCH.md, twenty-first session).
const PREFETCH_MAX_GBS_PER_SM: f64 = 30.0;

/// `TANDEM_CUDA_PREFETCH_ROWS` (bytes), else [`PREFETCH_ROW_BYTES`] where the
/// DRAM peak per multiprocessor is at most [`PREFETCH_MAX_GBS_PER_SM`], else 0.
fn prefetch_row_bytes(dram_gbs_per_sm: f64) -> usize {
    let default = if dram_gbs_per_sm <= PREFETCH_MAX_GBS_PER_SM {
        PREFETCH_ROW_BYTES
    } else {
        0
    };
    let Ok(v) = std::env::var("TANDEM_CUDA_PREFETCH_ROWS") else {
        return default;
    };
    v.trim().parse().unwrap_or_else(|_| {
        tracing::warn!(
            "TANDEM_CUDA_PREFETCH_ROWS={v:?} is not a byte count; prefetching {default} bytes of each row"
        );
        default
    })
}

/// An error unless `x [n, k]`, `w [out, k]` and `y [n, out]` fit their buffers.
fn fits(
    x: &CudaSlice<bf16>,
    w: &CudaSlice<bf16>,
    y: &CudaSlice<f32>,
    n: usize,
    k: usize,
    out: usize,
) -> Result<(), CudaError> {
    if x.len() < n * k || w.len() < out * k || y.len() < n * out {
        return Err(CudaError::Unsupported(format!(
            "a product of {n} rows, {k} in, {out} out does not fit buffers of {}, {} and {} elements",
            x.len(),
            w.len(),
            y.len()
        )));
    }
    Ok(())
}

/// Bytes of cuBLAS's workspace (what PyTorch gives it on Hopper).
const BLAS_WORKSPACE: usize = 32 << 20;

/// Products with at most this many rows use the `gemv` kernel instead of cuBLAS
/// (measured on an H100: faster than cuBLAS at 1 row, slower at 8).
const GEMV_MAX_ROWS: usize = 1;
const _: () = assert!(GEMV_MAX_ROWS <= GEMV_KERNEL_ROWS);

/// Products of these many rows have their algorithm tuned (`gemm_tune`): the
/// decode graph buckets (and a full pass, `Gpu::pass_rows`), so a chunk of any
/// other length never waits for a tuning.
const TUNED_ROWS: &[usize] = super::GRAPH_BUCKETS;

impl Gpu {
    /// Opens GPU `ordinal` and compiles the kernels; picks the attention kernels for
    /// `config`'s head width and query heads per KV head.
    pub fn open(ordinal: usize, config: &ModelConfig) -> Result<Self, CudaError> {
        Self::open_ranked(ordinal, config, GpuPriority::Normal)
    }

    /// Like [`open`](Self::open), with both streams at `priority`'s rank (for
    /// `Auto`, the normal one until [`rank_step`](Self::rank_step) moves it).
    pub fn open_ranked(
        ordinal: usize,
        config: &ModelConfig,
        priority: GpuPriority,
    ) -> Result<Self, CudaError> {
        let head_dim = config.head_dim;
        let group = config.num_heads / config.num_kv_heads.max(1);
        let group_bound = match group {
            1 => 1,
            2 => 2,
            3 | 4 => 4,
            5..=8 => 8,
            g => {
                return Err(CudaError::Unsupported(format!(
                    "{g} query heads per KV head: the CUDA kernels take at most 8"
                )));
            }
        };
        if !matches!(head_dim, 32 | 64 | 128) {
            return Err(CudaError::Unsupported(format!(
                "head_dim {head_dim}: the CUDA kernels are built for 32, 64 and 128"
            )));
        }
        require(
            "libcuda (the NVIDIA driver)",
            cudarc::driver::sys::is_culib_present,
        )?;
        let ctx = CudaContext::new(ordinal).op("cuCtxCreate")?;
        // SAFETY: the backend orders its streams with explicit events and owns every
        // buffer for its whole life, so cudarc's automatic tracking is not needed.
        unsafe { ctx.disable_event_tracking() };
        ctx.bind_to_thread().op("cuCtxSetCurrent")?;
        let (least, greatest) = cudarc::driver::result::stream::get_priority_range()
            .op("cuCtxGetStreamPriorityRange")?;
        let ranks = [least, greatest];
        let rank = ranks[usize::from(priority.high_for(0))];
        let compute = ctx
            .new_stream_with_priority(rank)
            .op("create compute stream")?;
        let copy = ctx
            .new_stream_with_priority(rank)
            .op("create copy stream")?;
        tracing::info!(ordinal, ?priority, rank, "CUDA streams created");
        let (ptx, arch) = program::compile(&ctx)?;
        let module = ctx.load_module(ptx).op("cuModuleLoadData")?;
        let f = |name: &str| {
            module
                .load_function(name)
                .map_err(|source| CudaError::Driver {
                    op: "cuModuleGetFunction",
                    source,
                })
        };
        let k = Kernels {
            embed: f("embed")?,
            add_rmsnorm: f("add_rmsnorm")?,
            add_rmsnorm_rows: f("add_rmsnorm_rows")?,
            rope_kv: f("rope_kv")?,
            kv_fp8_store: f("kv_fp8_store")?,
            silu_mul: f("silu_mul")?,
            sample_rows: f("sample_rows")?,
            mask_logits: f("mask_logits")?,
            row_logprobs: f("row_logprobs")?,
            fill_uniform: f("fill_uniform")?,
            gemv: f("gemv")?,
            gemv_silu: f("gemv_silu")?,
            attn_combine: f("attn_combine")?,
            decode_attn: f(&format!("decode_attn_{head_dim}_{group_bound}"))?,
            prefill_attn: f(&format!("prefill_attn_{head_dim}"))?,
            decode_attn_fp8: f(&format!("decode_attn_fp8_{head_dim}_{group_bound}"))?,
            prefill_attn_fp8: f(&format!("prefill_attn_fp8_{head_dim}"))?,
        };
        let (prefill, prefill_fp8) = (
            prefill_shape(arch, head_dim, false),
            prefill_shape(arch, head_dim, true),
        );
        let max_smem =
            cudarc::driver::sys::CUfunction_attribute::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES;
        for (func, bytes) in [
            (&k.decode_attn, decode_smem(head_dim, group_bound, false)),
            (&k.decode_attn_fp8, decode_smem(head_dim, group_bound, true)),
            // The prefill attention kernel's K/V stages exceed the default 48 KiB.
            (&k.prefill_attn, prefill.smem),
            (&k.prefill_attn_fp8, prefill_fp8.smem),
        ] {
            func.set_attribute(max_smem, bytes as i32)
                .op("cuFuncSetAttribute")?;
        }
        let (dram_gbs, sms) = dram_peak(&ctx)?;
        let per_sm = k
            .decode_attn
            .occupancy_max_active_blocks_per_multiprocessor(
                DECODE_THREADS,
                decode_smem(head_dim, group_bound, false),
                None,
            )
            .op("cuOccupancyMaxActiveBlocksPerMultiprocessor")?;
        let decode_wave = sms * (per_sm.max(1) as usize);
        let prefetch_row_bytes = prefetch_row_bytes(dram_gbs / sms as f64);
        require("libcublas", cudarc::cublas::sys::is_culib_present)?;
        let blas = CudaBlas::new(compute.clone()).op("cublasCreate")?;
        let workspace = compute
            .alloc_zeros::<u8>(BLAS_WORKSPACE)
            .op("cuMemAlloc (cuBLAS workspace)")?;
        let (wp, _) = workspace.device_ptr(&compute);
        // SAFETY: the workspace lives as long as the handle (both are fields of `Gpu`).
        unsafe { blas_sys::cublasSetWorkspace_v2(*blas.handle(), wp as *mut _, BLAS_WORKSPACE) }
            .result()
            .op("cublasSetWorkspace")?;
        // The same workspace for cuBLASLt: both run on the compute stream only.
        let tuner = Tuner::new((wp, BLAS_WORKSPACE))?;
        Ok(Gpu {
            ctx,
            compute,
            copy,
            ranks,
            rank: AtomicI32::new(rank),
            ranked_by_step: AtomicBool::new(priority == GpuPriority::Auto),
            k,
            blas,
            tuner,
            pass_rows: 0,
            _blas_workspace: workspace,
            decode_smem: decode_smem(head_dim, group_bound, false),
            decode_smem_fp8: decode_smem(head_dim, group_bound, true),
            decode_wave,
            prefill,
            prefill_fp8,
            arch,
            cublas_only: std::env::var("TANDEM_CUDA_CUBLAS_ONLY").is_ok_and(|v| v == "1"),
            residual_epilogue: !std::env::var("TANDEM_CUDA_RESIDUAL_EPILOGUE")
                .is_ok_and(|v| v == "0"),
            pdl: !std::env::var("TANDEM_CUDA_PDL").is_ok_and(|v| v == "0"),
            prefetch_row_bytes,
            tma: arch == "sm_90a" && !std::env::var("TANDEM_CUDA_TMA").is_ok_and(|v| v == "0"),
        })
    }

    /// Ranks both streams for a step of `seqs` sequences ([`GpuPriority::high_for`]):
    /// the work queued after this call runs at that rank, graph replays included
    /// (a graph runs at the priority of the stream it is launched into). Only
    /// `Auto` ever changes the rank; where the driver refuses, the streams keep
    /// the rank they have (a warning says so) and the steps run on.
    pub(crate) fn rank_step(&self, seqs: usize) {
        if !self.ranked_by_step.load(Ordering::Relaxed) {
            return;
        }
        let rank = self.ranks[usize::from(GpuPriority::Auto.high_for(seqs))];
        if self.rank.swap(rank, Ordering::Relaxed) == rank {
            return;
        }
        use cudarc::driver::sys::{CUlaunchAttributeID, CUstreamAttrValue, cuStreamSetAttribute};
        // SAFETY: an all-zero attribute value is valid (a plain C union); only
        // its priority member is read for this attribute.
        let mut value: CUstreamAttrValue = unsafe { std::mem::zeroed() };
        value.priority = rank;
        for stream in [&self.compute, &self.copy] {
            // SAFETY: a live stream of this context and a valid attribute value.
            let set = unsafe {
                cuStreamSetAttribute(
                    stream.cu_stream(),
                    CUlaunchAttributeID::CU_LAUNCH_ATTRIBUTE_PRIORITY,
                    &value,
                )
            }
            .result();
            if let Err(e) = set {
                tracing::warn!(
                    "the driver refused to move a CUDA stream's priority ({e}); gpu_priority \"auto\" keeps the rank it has"
                );
                self.ranked_by_step.store(false, Ordering::Relaxed);
                return;
            }
        }
        tracing::debug!(seqs, rank, "CUDA streams ranked");
    }

    /// Makes this GPU's context current on the calling thread (a backend is built on
    /// one thread and driven from another; raw driver and cuBLAS calls need it).
    pub fn bind(&self) -> Result<(), CudaError> {
        self.ctx.bind_to_thread().op("cuCtxSetCurrent")
    }

    /// The target the kernels were compiled for (`sm_90a` selects the Hopper
    /// prefill attention) and the registers a thread of `prefill_attn` uses.
    pub fn kernel_target(&self) -> Result<(&'static str, i32), CudaError> {
        let regs = self
            .k
            .prefill_attn
            .get_attribute(cudarc::driver::sys::CUfunction_attribute::CU_FUNC_ATTRIBUTE_NUM_REGS)
            .op("cuFuncGetAttribute")?;
        Ok((self.arch, regs))
    }

    /// The device's name.
    pub fn name(&self) -> String {
        self.ctx.name().unwrap_or_else(|_| "unknown GPU".into())
    }

    /// Free and total device memory in bytes.
    pub fn mem_info(&self) -> Result<(usize, usize), CudaError> {
        self.ctx.mem_get_info().op("cuMemGetInfo")
    }

    /// A zeroed device buffer.
    pub fn zeros<T: DeviceRepr + ValidAsZeroBits>(
        &self,
        len: usize,
    ) -> Result<CudaSlice<T>, CudaError> {
        self.compute.alloc_zeros::<T>(len.max(1)).op("cuMemAlloc")
    }

    /// A device copy of `data`.
    pub fn upload<T: DeviceRepr>(&self, data: &[T]) -> Result<CudaSlice<T>, CudaError> {
        self.compute.clone_htod(data).op("cuMemcpyHtoD")
    }

    /// Waits for the compute stream.
    pub fn sync(&self) -> Result<(), CudaError> {
        self.compute
            .synchronize()
            .op("cuStreamSynchronize (compute)")
    }

    /// Fills `len` bytes at `ptr` with `byte` on the compute stream (poisoning outputs).
    pub(crate) fn memset(&self, ptr: u64, byte: u8, len: usize) -> Result<(), CudaError> {
        // SAFETY: callers pass a pointer to a live allocation of at least `len` bytes.
        unsafe { cudarc::driver::result::memset_d8_async(ptr, byte, len, self.compute.cu_stream()) }
            .op("cuMemsetD8Async")
    }

    /// Copies `dst.len()` elements from device `src` to host `dst` on the compute stream, then waits.
    pub(crate) fn download<T: DeviceRepr>(&self, src: u64, dst: &mut [T]) -> Result<(), CudaError> {
        // SAFETY: `src` holds at least `dst.len()` elements (callers size it); we wait
        // for the copy before `dst` is used.
        unsafe { cudarc::driver::result::memcpy_dtoh_async(dst, src, self.compute.cu_stream()) }
            .op("cuMemcpyDtoHAsync")?;
        self.sync()
    }

    /// Copies host `src` to device `dst` on the compute stream.
    ///
    /// # Safety
    /// `dst` must hold `src.len()` elements and `src` must stay alive and unchanged
    /// until the compute stream has passed this copy (pinned memory is copied
    /// asynchronously).
    pub(crate) unsafe fn upload_to<T: DeviceRepr>(
        &self,
        src: &[T],
        dst: u64,
    ) -> Result<(), CudaError> {
        // SAFETY: forwarded to the caller.
        unsafe { cudarc::driver::result::memcpy_htod_async(dst, src, self.compute.cu_stream()) }
            .op("cuMemcpyHtoDAsync")
    }

    /// A launch of `func` on the compute stream, a programmatic dependent launch
    /// when `pdl` (kernels/common.cuh, `pdl_enter`).
    pub(crate) fn kernel<'a>(&'a self, func: &'a CudaFunction, pdl: bool) -> Launch<'a> {
        Launch {
            stream: &self.compute,
            func,
            args: Vec::with_capacity(16),
            pdl,
        }
    }

    /// `y [n, out] = x [n, k] · wᵀ` with `w [out, k]` (HF layout), bf16 in, f32
    /// accumulation and output, as the forward pass runs its products (the
    /// `gemv` kernel at one row, else cuBLAS); for benchmarks of the products.
    pub fn gemm_f32(
        &self,
        x: &CudaSlice<bf16>,
        w: &CudaSlice<bf16>,
        y: &mut CudaSlice<f32>,
        n: usize,
        k: usize,
        out: usize,
    ) -> Result<(), CudaError> {
        fits(x, w, y, n, k, out)?;
        let s = &self.compute;
        let y = ProductOut::F32(Dev::of(y, s));
        self.gemm_with(Dev::of(x, s), Dev::of(w, s), y, n, k, out, self.pdl)
    }

    /// The bytes of each weight row a `gemv` launch prefetches: only a
    /// programmatic dependent launch starts before the kernel ahead of it ends.
    fn row_prefetch(&self, pdl: bool) -> usize {
        if pdl { self.prefetch_row_bytes } else { 0 }
    }

    /// True when a product of `n` rows over `k` adds to its f32 output
    /// ([`ProductOut::AddF32`]: cuBLAS's epilogue; the `gemv` kernel only writes)
    /// where the forward pass can have it do so (`residual_epilogue`).
    pub(crate) fn adds_to_output(&self, n: usize, k: usize) -> bool {
        self.residual_epilogue && !self.skinny(n, k)
    }

    /// True when a product of `n` rows over `k` runs as the `gemv` kernel.
    fn skinny(&self, n: usize, k: usize) -> bool {
        n <= GEMV_MAX_ROWS && k.is_multiple_of(8) && !self.cublas_only
    }

    /// True when `act = silu(x · gateᵀ) * (x · upᵀ)` over `n` rows of `k` runs
    /// as one kernel ([`gemv_silu`](Self::gemv_silu)); else it is the product
    /// into `gu` and [`silu_mul`](Self::silu_mul).
    pub(crate) fn fuses_silu(&self, n: usize, k: usize) -> bool {
        n == 1 && self.skinny(n, k)
    }

    /// `act [inter] = silu(x · gateᵀ) * (x · upᵀ)` for one row, with `gate_up =
    /// [gate; up]` of `[2 inter, k]`, in one kernel (when [`fuses_silu`](Self::fuses_silu)).
    pub(crate) fn gemv_silu(
        &self,
        x: Dev<bf16>,
        gate_up: Dev<bf16>,
        act: Dev<bf16>,
        k: usize,
        inter: usize,
        pdl: bool,
    ) -> Result<(), CudaError> {
        let fused = GemvSilu {
            x,
            w: gate_up,
            act,
            k,
            inter,
            prefetch: self.row_prefetch(pdl),
        };
        // SAFETY: `gate_up` holds 2 inter rows of k bf16, `x` one row of k, `act`
        // inter bf16 (callers' buffers); k is a multiple of 8 for the 16-byte loads.
        unsafe { launch::launch(self, &fused, pdl) }
    }

    /// `act [n, inter] = silu(gu[:, ..inter]) * gu[:, inter..]` (bf16 rows of
    /// `2 inter`, the gate/up product's output).
    pub(crate) fn silu_mul(
        &self,
        gu: Dev<bf16>,
        act: Dev<bf16>,
        n: usize,
        inter: usize,
        pdl: bool,
    ) -> Result<(), CudaError> {
        if n == 0 {
            return Ok(());
        }
        let silu = SiluMul { gu, act, n, inter };
        // SAFETY: `gu` holds n rows of 2 inter bf16, `act` n rows of inter (callers' buffers).
        unsafe { launch::launch(self, &silu, pdl) }
    }

    /// `y [n, out] = x [n, k] · wᵀ` with `w [out, k]` (HF layout), bf16 in, f32
    /// accumulation, `y` f32 or bf16: the `gemv` kernel (a programmatic
    /// dependent launch when `pdl`) for skinny products, else cuBLAS.
    /// Crate-private: the addresses must hold what the dimensions imply.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn gemm_with(
        &self,
        x: Dev<bf16>,
        w: Dev<bf16>,
        y: ProductOut,
        n: usize,
        k: usize,
        out: usize,
        pdl: bool,
    ) -> Result<(), CudaError> {
        if n == 0 {
            return Ok(());
        }
        if self.skinny(n, k) {
            let gemv = Gemv {
                x,
                w,
                y,
                n,
                k,
                out,
                prefetch: self.row_prefetch(pdl),
            };
            // SAFETY: as for the cuBLAS path below; `k` is a multiple of 8 so the
            // kernel's 16-byte loads stay inside each row.
            return unsafe { launch::launch(self, &gemv, pdl) };
        }
        let (y, y_bf16, add) = match y {
            ProductOut::F32(y) => (y.addr(), false, false),
            ProductOut::Bf16(y) => (y.addr(), true, false),
            ProductOut::AddF32(y) => (y.addr(), false, true),
        };
        let shape = Shape {
            n,
            k,
            out,
            y_bf16,
            add,
        };
        let ops = Operands {
            x: x.addr(),
            w: w.addr(),
            y,
        };
        if self.tuner.on && (TUNED_ROWS.contains(&n) || n == self.pass_rows) {
            let stream = self.compute.cu_stream() as _;
            // SAFETY: the operands are the caller's buffers of `shape`'s sizes.
            match unsafe { self.tuner.run_picked(shape, ops, stream) }? {
                Picked::Ran => return Ok(()),
                Picked::Own => {}
                // Timing waits on the stream, so inside a capture cuBLAS's own runs.
                Picked::Untimed if !self.capturing()? => {
                    // A product that adds to its output is timed on a scratch output
                    // (each timed launch adds again), then run once on its own.
                    let scratch = if add {
                        Some(
                            self.compute
                                .alloc_zeros::<f32>(n * out)
                                .op("cuMemAlloc (tuning scratch)")?,
                        )
                    } else {
                        None
                    };
                    let timed = Operands {
                        y: scratch.as_ref().map_or(y, |b| ptr(b, &self.compute)),
                        ..ops
                    };
                    // SAFETY: as above (the scratch is of `shape`'s output size);
                    // `time_ms` times on the compute stream, where the product runs.
                    unsafe {
                        self.tuner.tune(
                            shape,
                            timed,
                            stream,
                            &|| self.gemm_ex(shape, timed),
                            &|f| self.time_ms(f),
                        )
                    }?;
                    if !add {
                        return Ok(());
                    }
                    // SAFETY: as above.
                    if let Picked::Ran = unsafe { self.tuner.run_picked(shape, ops, stream) }? {
                        return Ok(());
                    }
                }
                Picked::Untimed => {}
            }
        }
        self.gemm_ex(shape, ops)
    }

    /// The product through `cublasGemmEx` (cuBLAS's own algorithm choice).
    /// Crate-private: the addresses must hold what `shape` implies.
    fn gemm_ex(&self, shape: Shape, ops: Operands) -> Result<(), CudaError> {
        let Shape {
            n, k, out, y_bf16, ..
        } = shape;
        let (alpha, beta) = (1.0f32, shape.beta());
        let bf16 = blas_sys::cudaDataType::CUDA_R_16BF;
        let y_type = if y_bf16 {
            bf16
        } else {
            blas_sys::cudaDataType::CUDA_R_32F
        };
        let Operands { x, w, y } = ops;
        let dim = |v: usize| {
            i32::try_from(v).map_err(|_| CudaError::Unsupported(format!("GEMM dimension {v}")))
        };
        // Column-major view: yᵀ [out, n] = w [out, k] (stored as [k, out], transposed) · xᵀ [k, n].
        // SAFETY: the pointers are live device buffers of the sizes the dimensions imply.
        unsafe {
            cudarc::cublas::result::gemm_ex(
                *self.blas.handle(),
                blas_sys::cublasOperation_t::CUBLAS_OP_T,
                blas_sys::cublasOperation_t::CUBLAS_OP_N,
                dim(out)?,
                dim(n)?,
                dim(k)?,
                (&alpha) as *const f32 as *const _,
                w as *const _,
                bf16,
                dim(k)?,
                x as *const _,
                bf16,
                dim(k)?,
                (&beta) as *const f32 as *const _,
                y as *mut _,
                y_type,
                dim(out)?,
                blas_sys::cublasComputeType_t::CUBLAS_COMPUTE_32F,
                blas_sys::cublasGemmAlgo_t::CUBLAS_GEMM_DEFAULT,
            )
        }
        .op("cublasGemmEx")
    }

    /// True while the compute stream is being captured into a graph.
    fn capturing(&self) -> Result<bool, CudaError> {
        use cudarc::driver::sys::CUstreamCaptureStatus;
        let status = self.compute.capture_status().op("cuStreamIsCapturing")?;
        Ok(status != CUstreamCaptureStatus::CU_STREAM_CAPTURE_STATUS_NONE)
    }

    /// Milliseconds `f` takes on the compute stream (events around it; waits).
    fn time_ms(&self, f: Queue<'_>) -> Result<f32, CudaError> {
        use cudarc::driver::sys::CUevent_flags::CU_EVENT_DEFAULT;
        let start = self
            .compute
            .record_event(Some(CU_EVENT_DEFAULT))
            .op("cuEventRecord")?;
        f()?;
        let end = self
            .compute
            .record_event(Some(CU_EVENT_DEFAULT))
            .op("cuEventRecord")?;
        end.synchronize().op("cuEventSynchronize")?;
        start.elapsed_ms(&end).op("cuEventElapsedTime")
    }

    /// Times cuBLAS's own algorithm and cuBLASLt's candidates for the product
    /// `y [n, out] = x [n, k] · wᵀ` (f32 out), as the forward pass tunes its own,
    /// and keeps the fastest for this shape (for benchmarks and tests: the pass
    /// tunes its products at the graph buckets' row counts and at full passes).
    pub fn tune_f32(
        &self,
        x: &CudaSlice<bf16>,
        w: &CudaSlice<bf16>,
        y: &mut CudaSlice<f32>,
        n: usize,
        k: usize,
        out: usize,
    ) -> Result<Tuning, CudaError> {
        fits(x, w, y, n, k, out)?;
        let s = &self.compute;
        let shape = Shape {
            n,
            k,
            out,
            y_bf16: false,
            add: false,
        };
        let ops = Operands {
            x: ptr(x, s),
            w: ptr(w, s),
            y: ptr(y, s),
        };
        // SAFETY: the buffers were checked against the shape above.
        unsafe {
            self.tuner.tune(
                shape,
                ops,
                s.cu_stream() as _,
                &|| self.gemm_ex(shape, ops),
                &|f| self.time_ms(f),
            )
        }
    }

    /// Sets the rows of a full pass, whose products are tuned as the decode
    /// buckets' are (~0.5 s for an 8B model's four products at 8192 rows: 9
    /// algorithms × 12 launches each, when the backend is made).
    pub(crate) fn set_pass_rows(&mut self, rows: usize) {
        self.pass_rows = rows;
    }

    /// Whether the products of tuned row counts (decode buckets, full passes)
    /// run with their tuned algorithms (`TANDEM_CUDA_GEMM_TUNE=0` starts with it off).
    pub fn gemm_tune(&self) -> bool {
        self.tuner.on
    }

    /// Turns the tuned algorithms on or off (shapes already timed stay timed).
    /// Graphs captured the other way keep the algorithms they were captured with.
    pub fn set_gemm_tune(&mut self, on: bool) {
        self.tuner.on = on;
    }

    /// This GPU's DRAM peak in GB/s as the driver reports it (memory clock ×
    /// bus width, two transfers a clock) and its multiprocessors, for benchmark
    /// headers.
    pub fn dram_peak(&self) -> Result<(f64, usize), CudaError> {
        dram_peak(&self.ctx)
    }

    /// This GPU's device-to-device copy rate in GB/s, counting bytes read and
    /// written (the ceiling a memory-bound decode step is judged against): the
    /// best of three medians of 10 copies of `bytes` of random data, after half
    /// a second of copies. (Timed straight after a model's set-up with one
    /// warm-up copy, the median moved between 3.83 and 4.24 TB/s from one
    /// process to the next on one H200 while the decode steps timed after it
    /// stayed within 1%, so the low readings were the measurement's.)
    pub fn copy_bandwidth_gbs(&self, bytes: usize) -> Result<f64, CudaError> {
        self.bind()?;
        let n = bytes / 2;
        let len = 2 * n;
        let src = self.zeros::<bf16>(n)?;
        let dst = self.zeros::<bf16>(n)?;
        let (s, d) = (ptr(&src, &self.compute), ptr(&dst, &self.compute));
        self.fill_uniform(s, n, 17, -1.0, 1.0)?;
        let copy = || {
            // SAFETY: both buffers hold `len` bytes.
            unsafe {
                cudarc::driver::result::memcpy_dtod_async(d, s, len, self.compute.cu_stream())
            }
            .op("cuMemcpyDtoDAsync")
        };
        let warm = std::time::Instant::now();
        while warm.elapsed().as_secs_f64() < 0.5 {
            copy()?;
            self.sync()?;
        }
        let mut best = f64::INFINITY;
        for _ in 0..3 {
            let mut times = Vec::new();
            for _ in 0..10 {
                let t0 = std::time::Instant::now();
                copy()?;
                self.sync()?;
                times.push(t0.elapsed().as_secs_f64());
            }
            times.sort_by(f64::total_cmp);
            best = best.min(times[times.len() / 2]);
        }
        Ok(2.0 * len as f64 / best / 1e9)
    }

    /// Fills `n` bf16 at `ptr` with uniform random values in `[lo, hi)` (not a
    /// programmatic dependent launch). Crate-private: `ptr` must hold `n` bf16.
    pub(crate) fn fill_uniform(
        &self,
        ptr: u64,
        n: usize,
        seed: u64,
        lo: f32,
        hi: f32,
    ) -> Result<(), CudaError> {
        let fill = FillUniform {
            p: Dev::from_raw(ptr),
            n,
            seed,
            lo,
            hi,
        };
        // SAFETY: `ptr` holds `n` bf16 (callers allocate it so).
        unsafe { launch::launch(self, &fill, false) }
    }

    /// Fills `buf` with uniform random values in `[lo, hi)`.
    pub fn fill_uniform_slice(
        &self,
        buf: &mut CudaSlice<bf16>,
        seed: u64,
        lo: f32,
        hi: f32,
    ) -> Result<(), CudaError> {
        self.fill_uniform(ptr(buf, &self.compute), buf.len(), seed, lo, hi)
    }
}

/// A kernel launch built argument by argument and submitted with
/// `cuLaunchKernelEx`, so that it can carry the programmatic-stream-serialization
/// attribute: the kernel may then be scheduled while the one before it in the
/// stream finishes (its launch latency and prologue hide behind that kernel's
/// tail) and waits in `pdl_wait` for that kernel's results. Captured into CUDA
/// graphs as programmatic dependencies.
pub(crate) struct Launch<'a> {
    stream: &'a CudaStream,
    func: &'a CudaFunction,
    args: Vec<*mut c_void>,
    pdl: bool,
}

impl<'a> Launch<'a> {
    /// Appends a kernel argument (passed by address, as the driver wants).
    pub fn arg<T: DeviceRepr>(&mut self, v: &'a T) -> &mut Self {
        self.args.push(v as *const T as *mut c_void);
        self
    }

    /// Queues the kernel.
    ///
    /// # Safety
    /// The arguments must match the kernel's parameters in number, order and
    /// type, and every pointer among them must be valid for what the kernel
    /// does with it over the grid `cfg` describes.
    pub unsafe fn launch(&mut self, cfg: LaunchConfig) -> Result<(), cudarc::driver::DriverError> {
        use cudarc::driver::sys;
        self.stream.context().bind_to_thread()?;
        // SAFETY: the attribute value is a plain C union; zero is a valid value of it.
        let mut attr: sys::CUlaunchAttribute = unsafe { std::mem::zeroed() };
        attr.id = sys::CUlaunchAttributeID::CU_LAUNCH_ATTRIBUTE_PROGRAMMATIC_STREAM_SERIALIZATION;
        attr.value.programmaticStreamSerializationAllowed = 1;
        let config = sys::CUlaunchConfig {
            gridDimX: cfg.grid_dim.0,
            gridDimY: cfg.grid_dim.1,
            gridDimZ: cfg.grid_dim.2,
            blockDimX: cfg.block_dim.0,
            blockDimY: cfg.block_dim.1,
            blockDimZ: cfg.block_dim.2,
            sharedMemBytes: cfg.shared_mem_bytes,
            hStream: self.stream.cu_stream(),
            attrs: &mut attr,
            numAttrs: u32::from(self.pdl),
        };
        // SAFETY: forwarded to the caller; `config`, `attr` and the argument
        // addresses outlive the call, which copies what they point to.
        unsafe {
            sys::cuLaunchKernelEx(
                &config,
                self.func.cu_function(),
                self.args.as_mut_ptr(),
                std::ptr::null_mut(),
            )
        }
        .result()
    }
}

/// `ctx`'s DRAM peak in GB/s (memory clock × bus width, two transfers a clock)
/// and its multiprocessors.
fn dram_peak(ctx: &CudaContext) -> Result<(f64, usize), CudaError> {
    use cudarc::driver::sys::CUdevice_attribute as A;
    let attr = |a| ctx.attribute(a).op("cuDeviceGetAttribute");
    let khz = attr(A::CU_DEVICE_ATTRIBUTE_MEMORY_CLOCK_RATE)? as f64;
    let bits = attr(A::CU_DEVICE_ATTRIBUTE_GLOBAL_MEMORY_BUS_WIDTH)? as f64;
    let sms = attr(A::CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT)?.max(1) as usize;
    Ok((khz * 1e3 * 2.0 * bits / 8.0 / 1e9, sms))
}

/// A launch of `blocks` blocks of `threads` threads, no dynamic shared memory.
pub(crate) fn grid(blocks: u32, threads: u32) -> LaunchConfig {
    LaunchConfig {
        grid_dim: (blocks.max(1), 1, 1),
        block_dim: (threads, 1, 1),
        shared_mem_bytes: 0,
    }
}

/// The raw device address of a buffer.
pub(crate) fn ptr<T>(s: &CudaSlice<T>, stream: &CudaStream) -> u64 {
    let (p, _guard) = s.device_ptr(stream);
    p
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cuda::model::named_config;

    fn rank(stream: &CudaStream) -> i32 {
        let mut p = 0;
        // SAFETY: a live stream of this process and a valid out-pointer.
        unsafe { cudarc::driver::sys::cuStreamGetPriority(stream.cu_stream(), &mut p) }
            .result()
            .expect("cuStreamGetPriority");
        p
    }

    #[test]
    #[ignore = "needs an NVIDIA GPU: cargo test -p tandem-engine --features cuda --lib cuda::device -- --ignored"]
    fn a_high_priority_gpu_ranks_its_streams_above_a_normal_one() {
        let config = named_config("tiny", None).unwrap();
        let normal = Gpu::open(0, &config).expect("a CUDA GPU");
        let high = Gpu::open_ranked(0, &config, GpuPriority::High).expect("a CUDA GPU");
        let (least, greatest) = cudarc::driver::result::stream::get_priority_range().unwrap();
        assert!(greatest < least, "this GPU has one stream priority");
        for (what, stream, want) in [
            ("normal compute", &normal.compute, least),
            ("normal copy", &normal.copy, least),
            ("high compute", &high.compute, greatest),
            ("high copy", &high.copy, greatest),
        ] {
            assert_eq!(rank(stream), want, "{what}");
        }
    }

    /// The rank a stream's priority attribute holds (what `rank_step` sets).
    fn attribute_rank(stream: &CudaStream) -> i32 {
        use cudarc::driver::sys::{CUlaunchAttributeID, CUstreamAttrValue, cuStreamGetAttribute};
        // SAFETY: zeroed is a valid value of the C union; a live stream and valid pointers.
        unsafe {
            let mut v: CUstreamAttrValue = std::mem::zeroed();
            cuStreamGetAttribute(
                stream.cu_stream(),
                CUlaunchAttributeID::CU_LAUNCH_ATTRIBUTE_PRIORITY,
                &mut v,
            )
            .result()
            .expect("cuStreamGetAttribute");
            v.priority
        }
    }

    #[test]
    #[ignore = "needs an NVIDIA GPU: cargo test -p tandem-engine --features cuda --lib cuda::device -- --ignored"]
    fn an_auto_gpu_ranks_its_streams_by_the_step() {
        use crate::model_dir::AUTO_HIGH_FROM_SEQS;
        let config = named_config("tiny", None).unwrap();
        let gpu = Gpu::open_ranked(0, &config, GpuPriority::Auto).expect("a CUDA GPU");
        let (least, greatest) = cudarc::driver::result::stream::get_priority_range().unwrap();
        assert!(greatest < least, "this GPU has one stream priority");
        let ranks = |gpu: &Gpu| [&gpu.compute, &gpu.copy].map(|s| (rank(s), attribute_rank(s)));
        assert_eq!(
            ranks(&gpu),
            [(least, least); 2],
            "opened at the normal rank"
        );
        for (seqs, want) in [
            (AUTO_HIGH_FROM_SEQS, greatest),
            (256, greatest),
            (AUTO_HIGH_FROM_SEQS - 1, least),
            (1, least),
            (AUTO_HIGH_FROM_SEQS, greatest),
        ] {
            gpu.rank_step(seqs);
            assert_eq!(ranks(&gpu), [(want, want); 2], "a step of {seqs}");
        }
    }
}
