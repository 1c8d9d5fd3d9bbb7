//! The paged KV cache in GPU memory, bf16, in the layout of
//! [`kv_cache`](crate::kv_cache) (so the wire format is the same as the CPU
//! backend's, with dtype bf16), and its copy path to and from pinned host
//! memory on the copy stream.

use std::sync::{Arc, Mutex};

use cudarc::driver::{CudaSlice, CudaStream, PinnedHostSlice};
use half::bf16;

use super::device::{Gpu, ptr};
use super::error::DriverContext;
use crate::backend::KvExport;
use crate::block_manager::BlockId;
use crate::error::{EngineError, Result};
use crate::kv_cache::KvLayout;

/// One buffer per layer, plus a pinned staging buffer for moving layers.
pub struct GpuKvCache {
    layout: KvLayout,
    pub(crate) layers: Vec<CudaSlice<bf16>>,
    compute: Arc<CudaStream>,
    copy: Arc<CudaStream>,
    /// Blocks the staging buffer holds; larger moves go in several rounds.
    staging_blocks: usize,
    staging: Mutex<PinnedHostSlice<u8>>,
}

impl GpuKvCache {
    /// A zeroed cache of `layout` (dtype bf16) and a pinned staging buffer of
    /// `staging_blocks` blocks.
    pub fn new(gpu: &Gpu, layout: KvLayout, staging_blocks: usize) -> Result<Self> {
        if layout.dtype != crate::kv_cache::KvDtype::Bf16 {
            return Err(EngineError::KvCache("the CUDA cache stores bf16".into()));
        }
        let per_layer = layout.num_blocks * layout.block_elems();
        let layers = (0..layout.num_layers)
            .map(|_| gpu.zeros::<bf16>(per_layer))
            .collect::<Result<Vec<_>, _>>()?;
        let staging_blocks = staging_blocks.clamp(1, layout.num_blocks.max(1));
        // SAFETY: plain (not write-combined) pinned memory, read back by the CPU; its
        // contents are only read after a copy into it has completed.
        let staging = unsafe {
            gpu.ctx
                .alloc_pinned_with_flags::<u8>(staging_blocks * layout.block_bytes(), 0)
        }
        .op("cuMemHostAlloc")?;
        Ok(GpuKvCache {
            layout,
            layers,
            compute: gpu.compute.clone(),
            copy: gpu.copy.clone(),
            staging_blocks,
            staging: Mutex::new(staging),
        })
    }

    /// The cache's shape.
    pub fn layout(&self) -> &KvLayout {
        &self.layout
    }

    /// Device address of `layer`'s blocks.
    pub(crate) fn layer_ptr(&self, layer: usize) -> u64 {
        ptr(&self.layers[layer], &self.compute)
    }

    fn check(&self, layer: usize, blocks: &[BlockId]) -> Result<()> {
        if layer >= self.layout.num_layers {
            return Err(EngineError::KvCache(format!(
                "layer {layer} does not exist"
            )));
        }
        if let Some(b) = blocks
            .iter()
            .find(|&&b| b as usize >= self.layout.num_blocks)
        {
            return Err(EngineError::KvCache(format!(
                "block {b} is beyond the cache's {} blocks",
                self.layout.num_blocks
            )));
        }
        Ok(())
    }

    /// Moves `blocks` of `layer` into pinned memory, in rounds of at most the staging
    /// size, calling `sink` with each round's bytes. The copy stream first waits for
    /// the compute stream's work so far, so the K/V a running forward pass wrote are in.
    pub fn export_with(
        &self,
        layer: usize,
        blocks: &[BlockId],
        mut sink: impl FnMut(&[u8]),
    ) -> Result<()> {
        self.check(layer, blocks)?;
        self.compute
            .context()
            .bind_to_thread()
            .op("cuCtxSetCurrent")?;
        let bb = self.layout.block_bytes();
        let done = self.compute.record_event(None).op("cuEventRecord")?;
        self.copy.wait(&done).op("cuStreamWaitEvent")?;
        let base = self.layer_ptr(layer);
        let mut staging = self
            .staging
            .lock()
            .map_err(|_| EngineError::KvCache("staging buffer lock poisoned".into()))?;
        for round in blocks.chunks(self.staging_blocks) {
            let host = staging.as_mut_slice().op("pinned buffer")?;
            for (first, run) in runs(round) {
                let (at, len) = (first * bb, run.len() * bb);
                let src = base + (run[0] as usize * bb) as u64;
                // SAFETY: `src..src+len` lies inside the layer (blocks checked above);
                // the staging range is inside the pinned buffer; we wait for the copy
                // stream before reading it.
                unsafe {
                    cudarc::driver::result::memcpy_dtoh_async(
                        &mut host[at..at + len],
                        src,
                        self.copy.cu_stream(),
                    )
                }
                .op("cuMemcpyDtoHAsync (KV export)")?;
            }
            self.copy.synchronize().op("cuStreamSynchronize (copy)")?;
            sink(&host[..round.len() * bb]);
        }
        Ok(())
    }

    /// Writes `bytes` (as made by an export, on any node of the same layout) into
    /// `blocks` of `layer`, through pinned memory on the copy stream.
    pub fn import_layer(&self, layer: usize, blocks: &[BlockId], bytes: &[u8]) -> Result<()> {
        self.check(layer, blocks)?;
        self.compute
            .context()
            .bind_to_thread()
            .op("cuCtxSetCurrent")?;
        let bb = self.layout.block_bytes();
        if bytes.len() != blocks.len() * bb {
            return Err(EngineError::KvCache(format!(
                "{} bytes do not fill {} blocks of {bb} bytes",
                bytes.len(),
                blocks.len()
            )));
        }
        let base = self.layer_ptr(layer);
        let mut staging = self
            .staging
            .lock()
            .map_err(|_| EngineError::KvCache("staging buffer lock poisoned".into()))?;
        for (r, round) in blocks.chunks(self.staging_blocks).enumerate() {
            let host = staging.as_mut_slice().op("pinned buffer")?;
            let src = &bytes[r * self.staging_blocks * bb..][..round.len() * bb];
            host[..src.len()].copy_from_slice(src);
            for (first, run) in runs(round) {
                let (at, len) = (first * bb, run.len() * bb);
                let dst = base + (run[0] as usize * bb) as u64;
                // SAFETY: `dst..dst+len` lies inside the layer; the pinned range stays
                // untouched until the copy stream is synchronized below.
                unsafe {
                    cudarc::driver::result::memcpy_htod_async(
                        dst,
                        &host[at..at + len],
                        self.copy.cu_stream(),
                    )
                }
                .op("cuMemcpyHtoDAsync (KV import)")?;
            }
            self.copy.synchronize().op("cuStreamSynchronize (copy)")?;
        }
        Ok(())
    }
}

/// Maximal runs of consecutive block ids: `(index in blocks, run)`.
fn runs(blocks: &[BlockId]) -> Vec<(usize, &[BlockId])> {
    let mut out = Vec::new();
    let mut start = 0;
    for i in 1..=blocks.len() {
        if i == blocks.len() || blocks[i] != blocks[i - 1].wrapping_add(1) {
            out.push((start, &blocks[start..i]));
            start = i;
        }
    }
    out
}

impl KvExport for GpuKvCache {
    fn export_layer(&self, layer: usize, blocks: &[BlockId]) -> Result<Vec<u8>> {
        let mut out = Vec::with_capacity(blocks.len() * self.layout.block_bytes());
        self.export_with(layer, blocks, |b| out.extend_from_slice(b))?;
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::runs;

    #[test]
    fn runs_merge_consecutive_blocks() {
        let r = runs(&[3, 4, 5, 9, 1, 2]);
        assert_eq!(
            r,
            vec![(0, &[3u32, 4, 5][..]), (3, &[9][..]), (4, &[1, 2][..])]
        );
        assert!(runs(&[]).is_empty());
    }
}
