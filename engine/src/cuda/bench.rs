//! Controls and measurements for benchmarks and checks (`tandem-gpu-bench`,
//! the GPU tests), kept out of the backend's serving path: poisoning outputs,
//! random caches, switching CUDA graphs and programmatic dependent launches,
//! the decode-attention split target, per-kernel profiles, and the named
//! model shapes that random weights are made for.

use cudarc::driver::sys::CUevent_flags::CU_EVENT_DEFAULT;

use super::CudaBackend;
use super::device::ptr;
use super::error::DriverContext;
use crate::backend::{SeqChunk, validate_chunks};
use crate::error::Result;
use crate::sampling::TokenDraw;

pub use super::model::{NAMED_SHAPES, named_config};

/// What benchmarks and checks do to a backend that serving never does.
/// Import it (`use tandem_engine::cuda::BenchControls`) to use it.
pub trait BenchControls {
    /// Fills every layer's cache with random values (benchmarks of long contexts
    /// without running the prefill first; never time on zeros).
    fn fill_cache_random(&mut self, seed: u64) -> Result<()>;
    /// Overwrites the activation and output buffers with NaN, so that a result a
    /// kernel failed to write cannot pass for a correct one.
    fn poison(&mut self) -> Result<()>;
    /// Turns decode-step graphs on or off (benchmarks and checks compare the two).
    fn set_graphs(&mut self, on: bool);
    /// Times one forward pass and its sampling kernel by kernel, with an event
    /// after every launch (no graphs, no programmatic dependent launches):
    /// microseconds per kernel, summed over the layers, in launch order. Each
    /// figure holds its launch gap, so the sum exceeds a graph replay's time.
    fn profile(&mut self, chunks: &[SeqChunk<'_>]) -> Result<Vec<(&'static str, f64)>>;
    /// Sets the decode attention blocks a step aims at (benchmarks compare
    /// settings; [`decode_wave`](Self::decode_wave) is one wave); graphs
    /// captured with another setting are dropped.
    fn set_decode_blocks(&mut self, blocks: Option<usize>);
    /// Decode attention blocks resident at once on this GPU.
    fn decode_wave(&self) -> usize;
    /// Turns programmatic dependent launches on or off (benchmarks compare the
    /// two); graphs captured the other way are dropped.
    fn set_pdl(&mut self, on: bool);
    /// Decode-step graphs captured so far.
    fn graphs_captured(&self) -> usize;
    /// Sets the bytes of each weight row a `gemv` warp asks L2 for before its
    /// PDL wait (0: none); graphs captured otherwise are dropped.
    fn set_prefetch(&mut self, row_bytes: usize);
    /// The bytes [`set_prefetch`](Self::set_prefetch) set last (at first, the
    /// default or `TANDEM_CUDA_PREFETCH_ROWS`).
    fn prefetch(&self) -> usize;
    /// Turns the tuned cuBLASLt algorithms (products at the decode buckets' row
    /// counts and at full passes) on or off (off: `cublasGemmEx`'s own choice);
    /// graphs captured otherwise are dropped.
    fn set_gemm_tune(&mut self, on: bool);
    /// Turns the residual added in the o and down products' epilogue on or off
    /// (off: they write `delta` and the norms add it); graphs captured otherwise
    /// are dropped.
    fn set_residual_epilogue(&mut self, on: bool);
}

impl CudaBackend {
    /// Records an event on the compute stream while [`BenchControls::profile`] runs.
    pub(super) fn mark(&self, name: &'static str) -> Result<()> {
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
}

impl BenchControls for CudaBackend {
    fn fill_cache_random(&mut self, seed: u64) -> Result<()> {
        self.gpu.bind()?;
        self.kv.fill_random(&self.gpu, seed)?;
        Ok(self.gpu.sync()?)
    }

    fn poison(&mut self) -> Result<()> {
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

    fn set_graphs(&mut self, on: bool) {
        self.use_graphs = on;
    }

    fn profile(&mut self, chunks: &[SeqChunk<'_>]) -> Result<Vec<(&'static str, f64)>> {
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

    fn set_decode_blocks(&mut self, blocks: Option<usize>) {
        let blocks = blocks.map(|b| b.max(1));
        if self.decode_blocks != blocks {
            self.decode_blocks = blocks;
            self.graphs.clear();
        }
    }

    fn decode_wave(&self) -> usize {
        self.gpu.decode_wave
    }

    fn set_pdl(&mut self, on: bool) {
        if self.gpu.pdl != on {
            self.gpu.pdl = on;
            self.graphs.clear();
        }
    }

    fn graphs_captured(&self) -> usize {
        self.graphs.len()
    }

    fn prefetch(&self) -> usize {
        self.gpu.prefetch_row_bytes
    }

    fn set_gemm_tune(&mut self, on: bool) {
        if self.gpu.gemm_tune() != on {
            self.gpu.set_gemm_tune(on);
            self.graphs.clear();
        }
    }

    fn set_residual_epilogue(&mut self, on: bool) {
        if self.gpu.residual_epilogue != on {
            self.gpu.residual_epilogue = on;
            self.graphs.clear();
        }
    }

    fn set_prefetch(&mut self, row_bytes: usize) {
        if self.gpu.prefetch_row_bytes != row_bytes {
            self.gpu.prefetch_row_bytes = row_bytes;
            self.graphs.clear();
        }
    }
}
