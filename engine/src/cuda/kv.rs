//! The paged KV cache in GPU memory, bf16 or fp8 (e4m3), in the layout of
//! [`kv_cache`](crate::kv_cache) (so the wire format is the same as the CPU
//! backend's), and its copy paths to and from pinned host memory on the copy
//! stream: [`GpuKvCache::export_async`] queues a layer's
//! blocks into the [staging ring](super::staging) and returns at once, so a
//! prefill's layer hook costs the GPU nothing. [`GpuKvCache::import_layer`]
//! stages a frame in a pinned [copy ring](super::copy_ring) and queues its copy
//! without waiting for it (the next forward pass is ordered after it), so a
//! decode node's engine thread never waits on the GPU for imports; the
//! synchronous [`GpuKvCache::export_with`] uses the same buffer. A frame
//! received in pieces (packets) is gathered into the ring as it is
//! ([`GpuKvCache::import_pieces`]): never joined into one buffer first.
//!
//! Each layer holds one block more than the layout says: the scratch block,
//! where the padding rows of a CUDA-graph decode step write their K/V.
//!
//! An fp8 layer is its blocks' e4m3 values, then all its blocks' scales (`2 ·
//! kv heads` f32 per block), so the attention kernels' 16-byte loads of values
//! stay aligned whatever the head count. On the wire (and in the CPU cache's
//! frames) a block is its values then its scales: an export of consecutive
//! blocks is two strided copies, values and scales (`copy_run`); an import
//! splits the frame into its values and its scales on the host first and
//! makes two plain copies (bf16: one of each, a block being all values).

use std::ops::Range;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use cudarc::driver::sys::{CUDA_MEMCPY2D, CUmemorytype, CUstream};
use cudarc::driver::{CudaEvent, CudaSlice, CudaStream, PinnedHostSlice};
use half::bf16;

use super::copy_ring::CopyRing;
use super::device::{Gpu, ptr};
use super::error::DriverContext;
use super::launch::{Dev, KvRead};
use super::staging::{PendingRange, StagingRing};
use super::tensor_map::{self, TensorMap};
use crate::backend::{KvBytes, KvExport};
use crate::block_manager::BlockId;
use crate::error::{EngineError, Result};
use crate::kv_cache::{KvDtype, KvLayout};

/// Pinned memory of imports (and synchronous exports) with its ranges in flight.
struct Staging {
    buf: PinnedHostSlice<u8>,
    ring: CopyRing<CudaEvent>,
}

impl Drop for Staging {
    /// The buffer is freed only after the copies still reading it.
    fn drop(&mut self) {
        if let Err(e) = self.ring.drain(|e| e.synchronize()) {
            tracing::error!(error = %e, "KV import copies did not finish");
        }
    }
}

/// One buffer per layer, plus a pinned staging buffer for moving layers.
pub struct GpuKvCache {
    /// First field, so dropped first: it waits for the imports still copying
    /// into `layers`.
    staging: Mutex<Staging>,
    /// Blocks the staging buffer holds; larger moves go in several rounds.
    staging_blocks: usize,
    layout: KvLayout,
    layers: Vec<CudaSlice<u8>>,
    /// Each layer's TMA tensor map (`tensor_map`), where the GPU and the
    /// layout allow one.
    tensor_maps: Option<CudaSlice<u8>>,
    compute: Arc<CudaStream>,
    copy: Arc<CudaStream>,
    /// Where asynchronous exports land.
    ring: Arc<StagingRing>,
    /// Imports were queued since the compute stream last waited for the copy
    /// stream ([`GpuKvCache::order_after_imports`]).
    imports_pending: AtomicBool,
}

impl GpuKvCache {
    /// A zeroed cache of `layout` (dtype bf16 or fp8_e4m3), a pinned staging
    /// buffer of `staging_blocks` blocks and an export ring of `ring_bytes`.
    pub fn new(
        gpu: &Gpu,
        layout: KvLayout,
        staging_blocks: usize,
        ring_bytes: usize,
    ) -> Result<Self> {
        if !matches!(layout.dtype, KvDtype::Bf16 | KvDtype::Fp8E4m3) {
            return Err(EngineError::KvCache(format!(
                "the CUDA cache stores bf16 or fp8_e4m3, not {}",
                layout.dtype.name()
            )));
        }
        // Blocks and scratch block, whose bytes (scales included) are block_bytes.
        let per_layer = (layout.num_blocks + 1) * layout.block_bytes();
        let layers = (0..layout.num_layers)
            .map(|_| gpu.zeros::<u8>(per_layer))
            .collect::<Result<Vec<_>, _>>()?;
        let tensor_maps = if gpu.tma && tensor_map::kv_fits(&layout) {
            let maps = layers
                .iter()
                .map(|l| tensor_map::encode_kv_layer(ptr(l, &gpu.compute), &layout))
                .collect::<Result<Vec<_>, _>>()?;
            Some(gpu.upload(&tensor_map::bytes(&maps))?)
        } else {
            None
        };
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
            tensor_maps,
            compute: gpu.compute.clone(),
            copy: gpu.copy.clone(),
            staging_blocks,
            staging: Mutex::new(Staging {
                ring: CopyRing::new(staging.len()),
                buf: staging,
            }),
            imports_pending: AtomicBool::new(false),
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
        let host = self.ring.ptr(&pending.range);
        for (first, run) in runs(blocks) {
            // SAFETY: the run's blocks lie inside the layer (checked above); the
            // destination is inside the range this export owns; the range is read
            // only after `done` (below) has completed.
            unsafe { self.copy_run(layer, run, host.add(first * bb)) }?;
        }
        pending.done = Some(self.copy.record_event(None).op("cuEventRecord (copy)")?);
        Ok(KvBytes::Pending(Box::new(pending)))
    }

    /// Device address of `layer`'s blocks.
    fn layer_ptr(&self, layer: usize) -> u64 {
        ptr(&self.layers[layer], &self.compute)
    }

    /// Device address of an fp8 `layer`'s scales (after its blocks and the scratch block).
    fn scales_ptr(&self, layer: usize) -> u64 {
        self.layer_ptr(layer) + ((self.layout.num_blocks + 1) * self.values_bytes()) as u64
    }

    /// Bytes of a block's values (a bf16 block's whole size).
    fn values_bytes(&self) -> usize {
        match self.layout.dtype {
            KvDtype::Fp8E4m3 => self.layout.block_elems(),
            _ => self.layout.block_bytes(),
        }
    }

    /// `layer` as the attention kernels read it.
    pub(crate) fn read(&self, layer: usize) -> KvRead {
        match self.layout.dtype {
            KvDtype::Fp8E4m3 => KvRead::Fp8 {
                cache: Dev::from_raw(self.layer_ptr(layer)),
                scales: Dev::from_raw(self.scales_ptr(layer)),
            },
            _ => KvRead::Bf16(Dev::from_raw(self.layer_ptr(layer))),
        }
    }

    /// Whether the prefill attention loads this cache's tiles by TMA (tensor
    /// maps: a Hopper GPU, a bf16 cache, a block size of 8, 16, 32 or 64, and
    /// `TANDEM_CUDA_TMA` not `0`).
    pub fn uses_tma(&self) -> bool {
        self.tensor_maps.is_some()
    }

    /// `layer`'s TMA tensor map, or null where the cache has none.
    pub(crate) fn tensor_map(&self, layer: usize) -> Dev<TensorMap> {
        match &self.tensor_maps {
            Some(m) => {
                Dev::from_raw(ptr(m, &self.compute) + (layer * tensor_map::MAP_BYTES) as u64)
            }
            None => Dev::NULL,
        }
    }

    /// Where the forward pass writes `layer`'s K/V: a bf16 layer, or an fp8
    /// one's values and scales (for `kv_fp8_store`).
    pub(crate) fn write_target(&self, layer: usize) -> (Dev<bf16>, Dev<u8>, Dev<f32>) {
        match self.layout.dtype {
            KvDtype::Fp8E4m3 => (
                Dev::NULL,
                Dev::from_raw(self.layer_ptr(layer)),
                Dev::from_raw(self.scales_ptr(layer)),
            ),
            _ => (Dev::from_raw(self.layer_ptr(layer)), Dev::NULL, Dev::NULL),
        }
    }

    /// Fills every block for a benchmark: bf16 values uniform in [-1, 1) from
    /// `seed`; an fp8 cache one value (0.5) and scale (1/64) throughout (random
    /// bytes would hold e4m3 NaNs; attention does the same work either way).
    pub(crate) fn fill_random(&self, gpu: &Gpu, seed: u64) -> Result<()> {
        let blocks = self.layout.num_blocks;
        for l in 0..self.layout.num_layers {
            if self.layout.dtype == KvDtype::Fp8E4m3 {
                let (vals, scales) = (self.layer_ptr(l), self.scales_ptr(l));
                let n_scales = blocks * (self.layout.block_bytes() - self.values_bytes()) / 4;
                // SAFETY: both ranges lie inside the layer's allocation.
                unsafe {
                    cudarc::driver::sys::cuMemsetD8Async(
                        vals,
                        0x30,
                        blocks * self.values_bytes(),
                        self.compute.cu_stream(),
                    )
                    .result()
                    .op("cuMemsetD8Async")?;
                    cudarc::driver::sys::cuMemsetD32Async(
                        scales,
                        (1.0f32 / 64.0).to_bits(),
                        n_scales,
                        self.compute.cu_stream(),
                    )
                    .result()
                    .op("cuMemsetD32Async")?;
                }
            } else {
                let n = blocks * self.layout.block_elems();
                gpu.fill_uniform(self.layer_ptr(l), n, seed + l as u64, -1.0, 1.0)?;
            }
        }
        Ok(())
    }

    /// Queues on the copy stream the copy of the consecutive blocks `run` of
    /// `layer` into `host` (`run.len()` blocks in the wire layout): one copy
    /// for bf16, two strided ones (values, scales) for fp8.
    ///
    /// # Safety
    /// `run` must lie inside the layer and `host` hold `run.len() * block_bytes`
    /// bytes of pinned memory that stay untouched until the copy stream has
    /// passed this copy.
    unsafe fn copy_run(&self, layer: usize, run: &[BlockId], host: *mut u8) -> Result<()> {
        let (b0, n) = (run[0] as usize, run.len());
        let bb = self.layout.block_bytes();
        let vb = self.values_bytes();
        let stream: CUstream = self.copy.cu_stream();
        let sb = bb - vb;
        let parts = [
            (self.layer_ptr(layer) + (b0 * vb) as u64, vb, 0usize),
            (self.scales_ptr(layer) + (b0 * sb) as u64, sb, vb),
        ];
        for (dev, width, at) in parts.into_iter().filter(|&(_, w, _)| w > 0) {
            // A device run of `n` rows of `width` bytes (pitch `width`) and host rows
            // at `at` within each `bb`-byte block: contiguous when width == bb.
            // SAFETY: `host + at` and the rows after it stay inside the caller's
            // `n * bb` bytes.
            let host_at = unsafe { host.add(at) };
            let c = CUDA_MEMCPY2D {
                srcXInBytes: 0,
                srcY: 0,
                srcMemoryType: CUmemorytype::CU_MEMORYTYPE_DEVICE,
                srcHost: std::ptr::null(),
                srcDevice: dev,
                srcArray: std::ptr::null_mut(),
                srcPitch: width,
                dstXInBytes: 0,
                dstY: 0,
                dstMemoryType: CUmemorytype::CU_MEMORYTYPE_HOST,
                dstHost: host_at.cast(),
                dstDevice: 0,
                dstArray: std::ptr::null_mut(),
                dstPitch: bb,
                WidthInBytes: width,
                Height: n,
            };
            // SAFETY: the caller's promises cover both ends of the copy.
            unsafe { cudarc::driver::sys::cuMemcpy2DAsync_v2(&c, stream) }
                .result()
                .op("cuMemcpy2DAsync (KV export)")?;
        }
        Ok(())
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
        let mut staging = self.lock_staging()?;
        let Staging { buf, ring } = &mut *staging;
        // Every import still reading the buffer is done before it is overwritten.
        ring.drain(|e| e.synchronize().op("cuEventSynchronize (KV import)"))?;
        for round in blocks.chunks(self.staging_blocks) {
            let host = buf.as_mut_slice().op("pinned buffer")?;
            for (first, run) in runs(round) {
                // SAFETY: the run lies inside the layer (blocks checked above); the
                // staging range is inside the pinned buffer; we wait for the copy
                // stream before reading it.
                unsafe { self.copy_run(layer, run, host[first * bb..].as_mut_ptr()) }?;
            }
            self.copy.synchronize().op("cuStreamSynchronize (copy)")?;
            sink(&host[..round.len() * bb]);
        }
        Ok(())
    }

    fn lock_staging(&self) -> Result<std::sync::MutexGuard<'_, Staging>> {
        self.staging
            .lock()
            .map_err(|_| EngineError::KvCache("staging buffer lock poisoned".into()))
    }

    /// Makes the compute stream's next work wait for the imports queued so far
    /// (nothing when there were none). Every forward pass calls it before its
    /// first kernel (`upload_meta`), so a pass sees the KV imported before it,
    /// while a step already in flight, and the download of its token ids, do
    /// not wait for imports queued after it.
    pub(crate) fn order_after_imports(&self) -> Result<()> {
        if self.imports_pending.swap(false, Ordering::AcqRel) {
            let imported = self.copy.record_event(None).op("cuEventRecord (copy)")?;
            self.compute.wait(&imported).op("cuStreamWaitEvent")?;
        }
        Ok(())
    }

    /// Writes `bytes` (as made by an export, on any node of the same layout) into
    /// `blocks` of `layer`, through pinned memory on the copy stream. Returns
    /// once the copies are queued; the next forward pass waits for them
    /// ([`order_after_imports`](Self::order_after_imports)).
    pub fn import_layer(&self, layer: usize, blocks: &[BlockId], bytes: &[u8]) -> Result<()> {
        self.import_pieces(layer, blocks, &[bytes])
    }

    /// [`import_layer`](Self::import_layer) of a frame in pieces (as it
    /// arrived): they are gathered straight into the pinned buffer.
    pub fn import_pieces(&self, layer: usize, blocks: &[BlockId], pieces: &[&[u8]]) -> Result<()> {
        self.check(layer, blocks)?;
        self.compute
            .context()
            .bind_to_thread()
            .op("cuCtxSetCurrent")?;
        let bb = self.layout.block_bytes();
        let frame = Pieces::new(pieces);
        if frame.len() != blocks.len() * bb {
            return Err(EngineError::KvCache(format!(
                "{} bytes do not fill {} blocks of {bb} bytes",
                frame.len(),
                blocks.len()
            )));
        }
        let mut staging = self.lock_staging()?;
        let Staging { buf, ring } = &mut *staging;
        // The copies write blocks that work already queued on the compute stream
        // may have used (a released sequence's): they start after it.
        let computed = self.compute.record_event(None).op("cuEventRecord")?;
        self.copy.wait(&computed).op("cuStreamWaitEvent")?;
        // The frame's blocks split into all their values, then all their scales
        // (fp8; a bf16 block is all values), so each run is one or two plain
        // copies, not strided ones with rows of a few dozen bytes.
        let (vb, sb) = (self.values_bytes(), bb - self.values_bytes());
        for (r, round) in blocks.chunks(self.staging_blocks).enumerate() {
            let n = round.len();
            let range = ring.take(n * bb, |e| {
                e.synchronize().op("cuEventSynchronize (KV import)")
            })?;
            let host = &mut buf.as_mut_slice().op("pinned buffer")?[range.clone()];
            split_frame(&frame, r * self.staging_blocks, bb, vb, host);
            let (vals, scales) = host.split_at(n * vb);
            let queue = || -> Result<()> {
                for (first, run) in runs(round) {
                    let (b0, m) = (run[0] as usize, run.len());
                    let parts = [
                        (
                            self.layer_ptr(layer) + (b0 * vb) as u64,
                            &vals[first * vb..][..m * vb],
                        ),
                        (
                            self.scales_ptr(layer) + (b0 * sb) as u64,
                            &scales[first * sb..][..m * sb],
                        ),
                    ];
                    for (dst, part) in parts.into_iter().filter(|(_, p)| !p.is_empty()) {
                        // SAFETY: `dst` and the `part.len()` bytes after it lie inside
                        // the layer's blocks or scales (blocks checked above); the
                        // pinned source stays untouched until the copy's event (kept
                        // in the ring with its range) has completed.
                        unsafe {
                            cudarc::driver::result::memcpy_htod_async(
                                dst,
                                part,
                                self.copy.cu_stream(),
                            )
                        }
                        .op("cuMemcpyHtoDAsync (KV import)")?;
                    }
                }
                Ok(())
            };
            if let Err(e) = queue() {
                // Copies queued before the failure may still read the range.
                let _ = self.copy.synchronize();
                return Err(e);
            }
            let done = match self.copy.record_event(None).op("cuEventRecord (copy)") {
                Ok(done) => done,
                Err(e) => {
                    let _ = self.copy.synchronize();
                    return Err(e.into());
                }
            };
            // The next pass (the sequence's first decode step, or another's on
            // reused blocks) waits for these copies.
            self.imports_pending.store(true, Ordering::Release);
            ring.in_flight(range, done);
        }
        Ok(())
    }
}

/// Parts a frame's copy into the staging buffer is cut into, at most: one
/// core's memcpy moves a few GB/s (measured: a 4k prompt's 537 MB took the
/// decode node's engine thread ~100 ms to import), under what the link
/// delivers, so a large frame is copied by several threads: rayon's pool's,
/// as spawning threads for each frame cost more than the copy gained (on the
/// 2-core VM, a 4 MiB frame in 8 parts took 360–404 µs on spawned threads,
/// 190–226 on the pool: docs/cpu-results/2026-12-05-zero-copy/).
const COPY_THREADS: usize = 8;
/// The least bytes worth a thread of their own.
const COPY_PART_BYTES: usize = 1 << 20;

/// A frame given as the pieces it arrived in, read by offset.
struct Pieces<'a> {
    pieces: &'a [&'a [u8]],
    /// Where each piece starts in the frame.
    starts: Vec<usize>,
    len: usize,
}

impl<'a> Pieces<'a> {
    fn new(pieces: &'a [&'a [u8]]) -> Self {
        let mut starts = Vec::with_capacity(pieces.len());
        let mut len = 0;
        for p in pieces {
            starts.push(len);
            len += p.len();
        }
        Pieces {
            pieces,
            starts,
            len,
        }
    }

    fn len(&self) -> usize {
        self.len
    }

    /// Fills `out` with the frame's bytes from `at` (which, with `out`, lies
    /// inside the frame).
    fn copy_out(&self, mut at: usize, mut out: &mut [u8]) {
        let mut i = self.starts.partition_point(|&s| s <= at).saturating_sub(1);
        while !out.is_empty() && i < self.pieces.len() {
            let piece = self.pieces[i]
                .get(at - self.starts[i]..)
                .unwrap_or_default();
            let n = piece.len().min(out.len());
            out[..n].copy_from_slice(&piece[..n]);
            out = &mut out[n..];
            at += n;
            i += 1;
        }
    }
}

/// Writes blocks `first..` of `frame` (blocks of `block_bytes`, each `values`
/// bytes of values then its scales), as many as `out` holds, into `out` as
/// all their values, then all their scales; several MiB in parallel.
fn split_frame(frame: &Pieces, first: usize, block_bytes: usize, values: usize, out: &mut [u8]) {
    split_frame_in_parts(frame, first, block_bytes, values, out, COPY_PART_BYTES);
}

/// [`split_frame`] with parts of at least `part_bytes` (rounded to blocks).
fn split_frame_in_parts(
    frame: &Pieces,
    first: usize,
    block_bytes: usize,
    values: usize,
    out: &mut [u8],
    part_bytes: usize,
) {
    let n = out.len() / block_bytes;
    let sb = block_bytes - values;
    let parts = (out.len() / part_bytes.max(1)).clamp(1, COPY_THREADS.min(n.max(1)));
    let (vals, scales) = out.split_at_mut(n * values);
    if parts == 1 {
        split_blocks(frame, first, block_bytes, values, vals, scales);
        return;
    }
    let per = n.div_ceil(parts);
    rayon::scope(|s| {
        let (mut vals, mut scales) = (vals, scales);
        let mut block = first;
        while !vals.is_empty() {
            let m = per.min(vals.len() / values);
            let (v, v_rest) = std::mem::take(&mut vals).split_at_mut(m * values);
            let (sc, sc_rest) = std::mem::take(&mut scales).split_at_mut(m * sb);
            (vals, scales) = (v_rest, sc_rest);
            s.spawn(move |_| split_blocks(frame, block, block_bytes, values, v, sc));
            block += m;
        }
    });
}

/// One thread's part of [`split_frame`]: blocks `first..` of `frame`, as
/// many as `vals` and `scales` hold.
fn split_blocks(
    frame: &Pieces,
    first: usize,
    block_bytes: usize,
    values: usize,
    vals: &mut [u8],
    scales: &mut [u8],
) {
    let sb = block_bytes - values;
    if sb == 0 {
        frame.copy_out(first * block_bytes, vals);
        return;
    }
    let blocks = vals
        .chunks_exact_mut(values)
        .zip(scales.chunks_exact_mut(sb));
    for (j, (v, sc)) in blocks.enumerate() {
        let at = (first + j) * block_bytes;
        frame.copy_out(at, v);
        frame.copy_out(at + values, sc);
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
    use super::{Pieces, runs, split_frame, split_frame_in_parts};

    #[test]
    fn a_frame_splits_into_its_values_then_its_scales() {
        // Three blocks of 4 value bytes and 2 scale bytes: v0 s0 v1 s1 v2 s2.
        let frame = [1, 1, 1, 1, 10, 10, 2, 2, 2, 2, 20, 20, 3, 3, 3, 3, 30, 30];
        let mut out = [0u8; 18];
        split_frame(&Pieces::new(&[&frame]), 0, 6, 4, &mut out);
        assert_eq!(
            out,
            [1, 1, 1, 1, 2, 2, 2, 2, 3, 3, 3, 3, 10, 10, 20, 20, 30, 30]
        );
        // The last two blocks alone, from the frame cut into odd pieces.
        let (a, rest) = frame.split_at(5);
        let (b, c) = rest.split_at(8);
        let mut tail = [0u8; 12];
        split_frame(&Pieces::new(&[a, &[], b, c]), 1, 6, 4, &mut tail);
        assert_eq!(tail, [2, 2, 2, 2, 3, 3, 3, 3, 20, 20, 30, 30]);
    }

    #[test]
    fn a_frame_split_by_several_threads_or_in_pieces_is_the_same() {
        // 37 blocks of 5 value bytes and 3 scale bytes, by 8 threads (5 blocks each).
        let (bb, vb) = (8, 5);
        let frame: Vec<u8> = (0..37 * bb).map(|i| (i * 7 % 251) as u8).collect();
        let all = [&frame[..]];
        let whole = Pieces::new(&all);
        let cut: Vec<&[u8]> = frame.chunks(13).collect();
        let cut = Pieces::new(&cut);
        let mut one = vec![0u8; frame.len()];
        let mut many = vec![0u8; frame.len()];
        let mut pieces = vec![0u8; frame.len()];
        split_frame_in_parts(&whole, 0, bb, vb, &mut one, usize::MAX);
        split_frame_in_parts(&whole, 0, bb, vb, &mut many, 4 * bb);
        split_frame_in_parts(&cut, 0, bb, vb, &mut pieces, 4 * bb);
        assert_eq!(one, many);
        assert_eq!(one, pieces);
        assert_eq!(&one[..vb], &frame[..vb]);
        assert_eq!(&one[37 * vb..][..3], &frame[vb..bb]);
        // A bf16 frame (no scales) is the frame itself.
        let mut plain = vec![0u8; frame.len()];
        split_frame_in_parts(&cut, 0, bb, bb, &mut plain, 3 * bb);
        assert_eq!(plain, frame);
    }

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
