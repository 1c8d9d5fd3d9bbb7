//! Products at decode batch sizes (and full prefill passes) through cuBLASLt,
//! each shape's algorithm picked by timing cuBLASLt's candidates on this GPU.
//!
//! At 64–256 rows a product is a wave of tiles or less (the o product's 4096
//! outputs at 256 rows are 64 tiles of 128 × 128 on 132 multiprocessors), and
//! cuBLAS's own pick (`cublasGemmEx`, its heuristic's first) ran the b256
//! products at 44–57% of the H200's copy rate, 475–611 TFLOP/s where its large
//! products reach ~750 (docs/GPU_BENCH.md). The heuristic's other candidates
//! (other tiles, split-K, stream-K) are timed once per shape and the fastest
//! kept, cuBLAS's own among them.
//!
//! Only the batch sizes decode graphs are captured for, and a full pass (the
//! backend's token budget, which a long prompt's chunks fill), are tuned. The
//! backend runs each of those products once when it is made
//! (`CudaBackend::tune_products`), so no request waits for a tuning; a shape
//! not yet timed (the tuning turned on later, for a benchmark) is timed the
//! first time it runs outside a capture, and the backend runs one pass
//! directly before it captures a bucket for that. Every other product keeps
//! `cublasGemmEx`.

use std::cell::RefCell;
use std::collections::HashMap;
use std::ffi::c_void;

use cudarc::cublaslt::result as lt_result;
use cudarc::cublaslt::sys as lt;

use super::error::{CudaError, DriverContext, require};

/// Candidates asked of cuBLASLt's heuristic for each shape.
const CANDIDATES: usize = 16;
/// Launches timed per candidate (after two warm-up launches).
const TIMED_LAUNCHES: usize = 10;
/// A candidate replaces cuBLAS's own pick only when it is at least this much
/// faster (timing noise must not swap algorithms run to run).
const MIN_GAIN: f32 = 0.02;

/// Something queued on the stream (one product, or a batch of them).
pub(crate) type Queue<'a> = &'a dyn Fn() -> Result<(), CudaError>;

/// A product `y [n, out] = x [n, k] · wᵀ` (or `y +=` it when `add`), `w [out,
/// k]` bf16, `x` bf16, `y` bf16 or f32, f32 accumulation.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug)]
pub(crate) struct Shape {
    pub n: usize,
    pub k: usize,
    pub out: usize,
    pub y_bf16: bool,
    /// The product is added to what `y` holds (beta = 1; f32 `y` only).
    pub add: bool,
}

impl Shape {
    /// The epilogue's factor on what `y` held.
    pub fn beta(&self) -> f32 {
        if self.add { 1.0 } else { 0.0 }
    }
}

/// The device addresses of one product of a [`Shape`].
#[derive(Clone, Copy)]
pub(crate) struct Operands {
    pub x: u64,
    pub w: u64,
    pub y: u64,
}

/// A shape's cuBLASLt descriptors (column-major: `yᵀ [out, n] = w [k, out]ᵀ · xᵀ [k, n]`).
struct Descs {
    beta: f32,
    op: lt::cublasLtMatmulDesc_t,
    w: lt::cublasLtMatrixLayout_t,
    x: lt::cublasLtMatrixLayout_t,
    y: lt::cublasLtMatrixLayout_t,
}

// SAFETY: the descriptors are host-side objects owned by this value alone; cuBLASLt
// allows them to be used from any thread, one at a time (`Tuner` is not `Sync`).
unsafe impl Send for Descs {}

impl Descs {
    fn new(s: Shape) -> Result<Self, CudaError> {
        let bf16 = lt::cudaDataType::CUDA_R_16BF;
        let y_type = if s.y_bf16 {
            bf16
        } else {
            lt::cudaDataType::CUDA_R_32F
        };
        let dim = |v: usize| v as u64;
        let op = lt_result::create_matmul_desc(
            lt::cublasComputeType_t::CUBLAS_COMPUTE_32F,
            lt::cudaDataType::CUDA_R_32F,
        )
        .op("cublasLtMatmulDescCreate")?;
        // Built before anything else can fail, so `Drop` frees whatever was made.
        let mut d = Descs {
            beta: s.beta(),
            op,
            w: std::ptr::null_mut(),
            x: std::ptr::null_mut(),
            y: std::ptr::null_mut(),
        };
        let transpose: i32 = 1; // CUBLAS_OP_T
        // SAFETY: `d.op` is a live descriptor; the buffer is an i32 as the attribute takes.
        unsafe {
            lt_result::set_matmul_desc_attribute(
                d.op,
                lt::cublasLtMatmulDescAttributes_t::CUBLASLT_MATMUL_DESC_TRANSA,
                (&transpose) as *const i32 as *const c_void,
                std::mem::size_of::<i32>(),
            )
        }
        .op("cublasLtMatmulDescSetAttribute (TRANSA)")?;
        d.w = lt_result::create_matrix_layout(bf16, dim(s.k), dim(s.out), s.k as i64)
            .op("cublasLtMatrixLayoutCreate (w)")?;
        d.x = lt_result::create_matrix_layout(bf16, dim(s.k), dim(s.n), s.k as i64)
            .op("cublasLtMatrixLayoutCreate (x)")?;
        d.y = lt_result::create_matrix_layout(y_type, dim(s.out), dim(s.n), s.out as i64)
            .op("cublasLtMatrixLayoutCreate (y)")?;
        Ok(d)
    }
}

impl Drop for Descs {
    fn drop(&mut self) {
        // SAFETY: each was created by `Descs::new` (or is null) and is freed once.
        unsafe {
            for l in [self.w, self.x, self.y] {
                if !l.is_null() {
                    let _ = lt_result::destroy_matrix_layout(l);
                }
            }
            let _ = lt_result::destroy_matmul_desc(self.op);
        }
    }
}

/// What timing chose for a shape.
enum Pick {
    /// cuBLAS's own (`cublasGemmEx`): no candidate was faster by [`MIN_GAIN`].
    Default,
    /// A cuBLASLt algorithm and the descriptors it runs with.
    Lt(Descs, lt::cublasLtMatmulAlgo_t),
}

/// What [`Tuner::tune`] measured for one shape (for logs and the bench).
#[derive(Debug, Clone)]
pub struct Tuning {
    /// µs per launch of cuBLAS's own pick (NaN, untimed, when cuBLASLt could
    /// not describe the product).
    pub default_us: f32,
    /// µs per launch of the fastest cuBLASLt candidate, and its place in the
    /// heuristic's order (0: the heuristic's first).
    pub best: Option<(f32, usize)>,
    /// Candidates the heuristic offered.
    pub candidates: usize,
    /// True when the candidate replaced cuBLAS's pick.
    pub picked: bool,
}

impl Tuning {
    /// The verdict on cuBLAS's own pick (µs a launch) against each candidate's
    /// time (`None`: it would not run): the fastest candidate replaces it only
    /// when faster by [`MIN_GAIN`].
    fn from_times(default_us: f32, times: &[Option<f32>]) -> Self {
        let best = times
            .iter()
            .enumerate()
            .filter_map(|(i, t)| t.map(|t| (t, i)))
            .min_by(|a, b| a.0.total_cmp(&b.0));
        Tuning {
            default_us,
            best,
            candidates: times.len(),
            picked: best.is_some_and(|(t, _)| t < default_us * (1.0 - MIN_GAIN)),
        }
    }
}

/// What [`Tuner::run_picked`] did with a product.
pub(crate) enum Picked {
    /// Ran it with the shape's tuned cuBLASLt algorithm.
    Ran,
    /// Nothing: cuBLAS's own pick won the shape's timing.
    Own,
    /// Nothing: the shape has not been timed.
    Untimed,
}

/// cuBLASLt and the algorithm each tuned shape runs with.
pub(crate) struct Tuner {
    handle: lt::cublasLtHandle_t,
    /// The workspace split-K candidates may use (cuBLAS's, on the same stream).
    workspace: (u64, usize),
    picks: RefCell<HashMap<Shape, Pick>>,
    /// Tuning on (`TANDEM_CUDA_GEMM_TUNE=0` turns it off, for comparisons).
    pub on: bool,
}

// SAFETY: the handle is used from the owning backend's thread, with the context bound;
// cuBLASLt handles may move between threads.
unsafe impl Send for Tuner {}

impl Tuner {
    /// cuBLASLt with `workspace` (device address and bytes), which must outlive it.
    pub fn new(workspace: (u64, usize)) -> Result<Self, CudaError> {
        require("libcublasLt", cudarc::cublaslt::sys::is_culib_present)?;
        let handle = lt_result::create_handle().op("cublasLtCreate")?;
        Ok(Tuner {
            handle,
            workspace,
            picks: RefCell::new(HashMap::new()),
            on: !std::env::var("TANDEM_CUDA_GEMM_TUNE").is_ok_and(|v| v == "0"),
        })
    }

    /// Runs the product with the shape's tuned cuBLASLt algorithm, if it has
    /// one; otherwise says why not (the caller runs `cublasGemmEx`, or tunes).
    ///
    /// # Safety
    /// The operands must be live device buffers of the sizes `shape` implies.
    pub unsafe fn run_picked(
        &self,
        shape: Shape,
        ops: Operands,
        stream: lt::cudaStream_t,
    ) -> Result<Picked, CudaError> {
        match self.picks.borrow().get(&shape) {
            // SAFETY: forwarded to the caller.
            Some(Pick::Lt(d, algo)) => {
                unsafe { self.matmul(d, algo, ops, stream) }.map(|()| Picked::Ran)
            }
            Some(Pick::Default) => Ok(Picked::Own),
            None => Ok(Picked::Untimed),
        }
    }

    /// Times cuBLAS's own pick (`default`, which launches it once) and the
    /// heuristic's candidates on `ops`, and keeps the fastest for `shape`. The
    /// stream must not be capturing: this waits on it. `ops.y` ends up written by
    /// the algorithm kept (for an adding shape, many times over: time it on a
    /// scratch output).
    ///
    /// # Safety
    /// The operands must be live device buffers of the sizes `shape` implies, and
    /// `time` must time its closure on the stream `stream` is.
    pub unsafe fn tune(
        &self,
        shape: Shape,
        ops: Operands,
        stream: lt::cudaStream_t,
        default: Queue<'_>,
        time: &dyn Fn(Queue<'_>) -> Result<f32, CudaError>,
    ) -> Result<Tuning, CudaError> {
        let lt = Descs::new(shape).and_then(|d| Ok((self.candidates(&d)?, d)));
        let (candidates, d) = match lt {
            Ok(lt) => lt,
            Err(e) => {
                // A product cuBLASLt cannot describe keeps cuBLAS's own algorithm.
                tracing::warn!(
                    ?shape,
                    "cuBLASLt offers no algorithm ({e}); cuBLAS's own is kept"
                );
                default()?;
                self.picks.borrow_mut().insert(shape, Pick::Default);
                return Ok(Tuning::from_times(f32::NAN, &[]));
            }
        };
        let per_launch = |f: Queue<'_>| -> Result<f32, CudaError> {
            f()?;
            f()?;
            let ms = time(&|| (0..TIMED_LAUNCHES).try_for_each(|_| f()))?;
            Ok(ms * 1e3 / TIMED_LAUNCHES as f32)
        };
        let default_us = per_launch(default)?;
        let times: Vec<Option<f32>> = candidates
            .iter()
            .map(|algo| {
                // SAFETY: forwarded to the caller. A candidate cuBLASLt refuses at
                // launch is skipped (it returns before queueing anything).
                let run = || unsafe { self.matmul(&d, algo, ops, stream) };
                per_launch(&run).ok()
            })
            .collect();
        let tuning = Tuning::from_times(default_us, &times);
        let picked = tuning.best.filter(|_| tuning.picked);
        tracing::debug!(?shape, ?tuning, "product tuned");
        let pick = match picked {
            Some((_, i)) => {
                let algo = candidates[i];
                // SAFETY: forwarded to the caller.
                unsafe { self.matmul(&d, &algo, ops, stream) }?;
                Pick::Lt(d, algo)
            }
            None => {
                default()?;
                Pick::Default
            }
        };
        self.picks.borrow_mut().insert(shape, pick);
        Ok(tuning)
    }

    /// The heuristic's candidates for `d`, best first, that fit the workspace.
    fn candidates(&self, d: &Descs) -> Result<Vec<lt::cublasLtMatmulAlgo_t>, CudaError> {
        let pref = lt_result::create_matmul_pref().op("cublasLtMatmulPreferenceCreate")?;
        let bytes = self.workspace.1 as u64;
        // SAFETY: `pref` is live; the buffer is the u64 the attribute takes.
        let set = unsafe {
            lt_result::set_matmul_pref_attribute(
                pref,
                lt::cublasLtMatmulPreferenceAttributes_t::CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES,
                (&bytes) as *const u64 as *const c_void,
                std::mem::size_of::<u64>(),
            )
        };
        let mut results = Vec::<lt::cublasLtMatmulHeuristicResult_t>::with_capacity(CANDIDATES);
        let mut count = 0i32;
        // SAFETY: every descriptor is live; `results` has room for CANDIDATES entries,
        // of which cuBLASLt writes `count`.
        let asked = set.and_then(|()| unsafe {
            lt::cublasLtMatmulAlgoGetHeuristic(
                self.handle,
                d.op,
                d.w,
                d.x,
                d.y,
                d.y,
                pref,
                CANDIDATES as i32,
                results.as_mut_ptr(),
                &mut count,
            )
            .result()
        });
        // SAFETY: created above, freed once.
        let _ = unsafe { lt_result::destroy_matmul_pref(pref) };
        asked.op("cublasLtMatmulAlgoGetHeuristic")?;
        // SAFETY: cuBLASLt initialized the first `count` (≤ CANDIDATES) entries.
        unsafe { results.set_len(count.clamp(0, CANDIDATES as i32) as usize) };
        Ok(results
            .iter()
            .filter(|r| r.state == lt::cublasStatus_t::CUBLAS_STATUS_SUCCESS)
            .filter(|r| r.workspaceSize <= self.workspace.1)
            .map(|r| r.algo)
            .collect())
    }

    /// One cuBLASLt product with `algo`.
    ///
    /// # Safety
    /// The operands must be live device buffers of the sizes `d` describes.
    unsafe fn matmul(
        &self,
        d: &Descs,
        algo: &lt::cublasLtMatmulAlgo_t,
        ops: Operands,
        stream: lt::cudaStream_t,
    ) -> Result<(), CudaError> {
        let (alpha, beta) = (1.0f32, d.beta);
        // SAFETY: the descriptors are live; the operands are the caller's; the
        // workspace outlives the tuner.
        unsafe {
            lt_result::matmul(
                self.handle,
                d.op,
                (&alpha) as *const f32 as *const c_void,
                (&beta) as *const f32 as *const c_void,
                ops.w as *const c_void,
                d.w,
                ops.x as *const c_void,
                d.x,
                ops.y as *const c_void,
                d.y,
                ops.y as *mut c_void,
                d.y,
                algo,
                self.workspace.0 as *mut c_void,
                self.workspace.1,
                stream,
            )
        }
        .op("cublasLtMatmul")
    }
}

impl Drop for Tuner {
    fn drop(&mut self) {
        self.picks.get_mut().clear();
        // SAFETY: created in `new`, destroyed once, after every descriptor.
        let _ = unsafe { lt_result::destroy_handle(self.handle) };
    }
}

#[cfg(test)]
mod tests {
    use super::Tuning;
    use half::bf16;
    use rand::{Rng, SeedableRng};
    use rand_chacha::ChaCha8Rng;

    use crate::cuda::device::Gpu;
    use crate::cuda::launch::{Dev, ProductOut};
    use crate::cuda::model::named_config;

    /// The fastest candidate that ran wins, and replaces cuBLAS's own pick only
    /// when 2% faster; ties keep the heuristic's earlier candidate.
    #[test]
    fn a_candidate_replaces_cublas_own_pick_only_when_clearly_faster() {
        let t = Tuning::from_times(10.0, &[Some(9.9), None, Some(9.5), Some(9.5)]);
        assert_eq!((t.best, t.candidates, t.picked), (Some((9.5, 2)), 4, true));
        let t = Tuning::from_times(10.0, &[Some(9.9), Some(9.85)]);
        assert_eq!((t.best, t.picked), (Some((9.85, 1)), false));
        let t = Tuning::from_times(10.0, &[None, None]);
        assert_eq!((t.best, t.picked), (None, false));
        assert!(!Tuning::from_times(10.0, &[]).picked);
    }

    /// Products at graph-bucket row counts, tuned, against cuBLAS's own algorithm
    /// (the same f32 sums in another order) and against the host at sampled entries
    /// (a transposed operand or a wrong stride would pass the first alone); and
    /// the same products added to an output (the residual stream's epilogue).
    #[test]
    #[ignore = "needs an NVIDIA GPU: cargo test -p tandem-engine --features cuda --lib cuda::gemm_tune -- --ignored"]
    fn gpu_tuned_products_match_cublas_own_and_the_host() {
        let mut gpu = Gpu::open(0, &named_config("tiny", None).unwrap()).expect("a CUDA GPU");
        let mut rng = ChaCha8Rng::seed_from_u64(9);
        // o-like (one wave of tiles or less), down-like (long k: split-K), and an
        // output count that is no multiple of 128.
        for (k, out) in [(4096usize, 4096usize), (14336, 4096), (4096, 6208)] {
            let w: Vec<bf16> = (0..out * k)
                .map(|_| bf16::from_f32(rng.random_range(-0.05f32..0.05)))
                .collect();
            let x: Vec<bf16> = (0..8192 * k)
                .map(|_| bf16::from_f32(rng.random_range(-1.0f32..1.0)))
                .collect();
            let (wd, xd) = (gpu.upload(&w).unwrap(), gpu.upload(&x).unwrap());
            let mut y = gpu.zeros::<f32>(8192 * out).unwrap();
            // Decode batch sizes and a full prefill pass.
            for n in [16usize, 64, 256, 8192] {
                gpu.set_gemm_tune(false);
                gpu.gemm_f32(&xd, &wd, &mut y, n, k, out).unwrap();
                let own = gpu.compute.clone_dtoh(&y).unwrap();
                let t = gpu.tune_f32(&xd, &wd, &mut y, n, k, out).unwrap();
                assert!(t.candidates > 0, "{k}×{out} at {n} rows: no candidate");
                let tuned = gpu.compute.clone_dtoh(&y).unwrap();
                // The forward pass's path with tuning on runs what was kept.
                gpu.set_gemm_tune(true);
                gpu.memset(
                    crate::cuda::device::ptr(&y, &gpu.compute),
                    0xff,
                    4 * n * out,
                )
                .unwrap();
                gpu.gemm_f32(&xd, &wd, &mut y, n, k, out).unwrap();
                let again = gpu.compute.clone_dtoh(&y).unwrap();
                let scale = own[..n * out].iter().fold(0f32, |m, v| m.max(v.abs()));
                // Equal but for a split-K reduction's order (and no entry left poisoned).
                for (i, (a, b)) in tuned[..n * out].iter().zip(&again[..n * out]).enumerate() {
                    assert!(
                        (a - b).abs() <= 1e-6 * scale,
                        "{k}×{out} at {n} rows, entry {i}: kept {a}, then {b}"
                    );
                }
                for (i, (a, b)) in own[..n * out].iter().zip(&tuned[..n * out]).enumerate() {
                    assert!(
                        (a - b).abs() <= 1e-4 * scale,
                        "{k}×{out} at {n} rows, entry {i}: own {a}, tuned {b} ({t:?})"
                    );
                }
                // Added to what the output holds (tuned on a scratch output first,
                // then run once on this one): the base plus the same product.
                let base: Vec<f32> = (0..n * out)
                    .map(|_| rng.random_range(-4.0f32..4.0))
                    .collect();
                let yb = gpu.upload(&base).unwrap();
                let s = &gpu.compute;
                let add = ProductOut::AddF32(Dev::of(&yb, s));
                gpu.gemm_with(Dev::of(&xd, s), Dev::of(&wd, s), add, n, k, out, false)
                    .unwrap();
                let added = gpu.compute.clone_dtoh(&yb).unwrap();
                for (i, a) in added.iter().enumerate() {
                    assert!(
                        (a - (base[i] + own[i])).abs() <= 1e-4 * (scale + 4.0),
                        "{k}×{out} at {n} rows, entry {i}: added {a}, base {} + product {}",
                        base[i],
                        own[i]
                    );
                }
                for _ in 0..64 {
                    let (r, c) = (rng.random_range(0..n), rng.random_range(0..out));
                    let host: f64 = (0..k)
                        .map(|j| {
                            f64::from(x[r * k + j].to_f32()) * f64::from(w[c * k + j].to_f32())
                        })
                        .sum();
                    let got = f64::from(tuned[r * out + c]);
                    assert!(
                        (got - host).abs() <= 1e-4 * f64::from(scale),
                        "{k}×{out} at {n} rows, ({r}, {c}): GPU {got}, host {host}"
                    );
                }
            }
        }
    }
}
