//! The paged KV cache in GPU memory, bf16, in the layout of
//! [`kv_cache`](crate::kv_cache) (so the wire format is the same as the CPU
//! backend's, with dtype bf16), and its copy paths to and from pinned host
//! memory on the copy stream: [`GpuKvCache::export_async`] queues a layer's
//! blocks into the [staging ring](super::staging) and returns at once, so a
//! prefill's layer hook costs the GPU nothing; the synchronous paths
//! ([`GpuKvCache::export_with`], [`GpuKvCache::import_layer`]) go through a
//! staging buffer of their own.
//!
//! Each layer holds one block more than the layout says: the scratch block,
//! where the padding rows of a CUDA-graph decode step write their K/V.

use std::ops::Range;
use std::sync::{Arc, Mutex};

use cudarc::driver::{CudaSlice, CudaStream, PinnedHostSlice};
use half::bf16;

use super::device::{Gpu, ptr};
use super::error::DriverContext;
use super::staging::{PendingRange, StagingRing};
use crate::backend::{KvBytes, KvExport};
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
    /// Where asynchronous exports land.
    ring: Arc<StagingRing>,
}

impl GpuKvCache {
    /// A zeroed cache of `layout` (dtype bf16), a pinned staging buffer of
    /// `staging_blocks` blocks and an export ring of `ring_bytes`.
    pub fn new(
        gpu: &Gpu,
        layout: KvLayout,
        staging_blocks: usize,
        ring_bytes: usize,
    ) -> Result<Self> {
        if layout.dtype != crate::kv_cache::KvDtype::Bf16 {
            return Err(EngineError::KvCache("the CUDA cache stores bf16".into()));
        }
        let per_layer = (layout.num_blocks + 1) * layout.block_elems();
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
        // SAFETY: as above; the ring hands each range to one copy at a time.
        let region = unsafe {
            gpu.ctx
                .alloc_pinned_with_flags::<u8>(ring_bytes.max(layout.block_bytes()), 0)
        }
        .op("cuMemHostAlloc (export ring)")?;
        Ok(GpuKvCache {
            ring: StagingRing::new(region)?,
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

    /// The block padding rows of a graph-captured decode step write to (never
    /// handed out: it is past the layout's blocks).
    pub(crate) fn scratch_block(&self) -> u32 {
        self.layout.num_blocks as u32
    }

    /// Bytes the export ring holds.
    pub fn ring_bytes(&self) -> usize {
        self.ring.capacity()
    }

    /// Queues a copy of `blocks` of `layer` into the export ring on the copy
    /// stream, after the compute stream's work so far (so K/V a running forward
    /// pass just wrote are in), and returns without waiting for it. Waits only
    /// when the ring is full, until the transport hands earlier bytes back.
    pub fn export_async(&self, layer: usize, blocks: &[BlockId]) -> Result<KvBytes> {
        self.check(layer, blocks)?;
        self.compute
            .context()
            .bind_to_thread()
            .op("cuCtxSetCurrent")?;
        let bb = self.layout.block_bytes();
        let range = self.ring.take(blocks.len() * bb)?;
        let mut pending = PendingRange {
            ring: self.ring.clone(),
            range,
            done: None,
        };
        let computed = self.compute.record_event(None).op("cuEventRecord")?;
        self.copy.wait(&computed).op("cuStreamWaitEvent")?;
        let base = self.layer_ptr(layer);
        let host = self.ring.ptr(&pending.range);
        for (first, run) in runs(blocks) {
            let src = base + (run[0] as usize * bb) as u64;
            // SAFETY: `src..src + run.len() * bb` lies inside the layer (checked above);
            // the destination is inside the range this export owns; the range is read
            // only after `done` (below) has completed.
            unsafe {
                cudarc::driver::sys::cuMemcpyDtoHAsync_v2(
                    host.add(first * bb) as *mut _,
                    src,
                    run.len() * bb,
                    self.copy.cu_stream(),
                )
            }
            .result()
            .op("cuMemcpyDtoHAsync (KV export)")?;
        }
        pending.done = Some(self.copy.record_event(None).op("cuEventRecord (copy)")?);
        Ok(KvBytes::Pending(Box::new(pending)))
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

    fn export_heads(
        &self,
        layer: usize,
        blocks: &[BlockId],
        heads: Range<usize>,
    ) -> Result<Vec<u8>> {
        self.whole(&heads)?;
        self.export_layer(layer, blocks)
    }

    fn export_heads_async(
        &self,
        layer: usize,
        blocks: &[BlockId],
        heads: Range<usize>,
    ) -> Result<KvBytes> {
        self.whole(&heads)?;
        self.export_async(layer, blocks)
    }
}

impl GpuKvCache {
    /// One GPU holds every KV head: only the whole range can be exported.
    fn whole(&self, heads: &Range<usize>) -> Result<()> {
        if *heads != (0..self.layout.num_kv_heads) {
            return Err(EngineError::KvCache(format!(
                "this cache exports all {} KV heads together, not {heads:?}",
                self.layout.num_kv_heads
            )));
        }
        Ok(())
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
