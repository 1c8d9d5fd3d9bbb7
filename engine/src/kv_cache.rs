//! The paged KV cache: its layout, shared by every backend and by the wire,
//! and the CPU backend's storage.
//!
//! # Layout
//!
//! The cache holds `num_blocks` blocks per layer. One block stores
//! `block_size` consecutive tokens of one sequence, K then V, head-major:
//!
//! ```text
//! layer L: [ block 0 | block 1 | ... | block num_blocks-1 ]
//! block:   [ K: kv_head 0 [slot 0 .. block_size) x head_dim | ... kv_head H-1 ... ]
//!          [ V: kv_head 0 [slot 0 .. block_size) x head_dim | ... kv_head H-1 ... ]
//! ```
//!
//! so element `(kind, head, slot, d)` of block `b` sits at
//! `b * block_elems + ((kind * H + head) * block_size + slot) * head_dim + d`,
//! with `kind` 0 for K and 1 for V. Token `p` of a sequence lives in block
//! `block_table[p / block_size]`, slot `p % block_size`.
//!
//! Why this shape: a block is one contiguous byte range per layer, so moving a
//! sequence's layer is a handful of memcpys (one per block) with no reshaping;
//! within a block each head's keys are contiguous, which is what a paged
//! attention kernel reads, and what a tensor-parallel rank owning a subset of
//! heads slices out.

use std::ops::Range;

use crate::block_manager::BlockId;
use crate::error::{EngineError, Result};
use half::bf16;

use crate::fp8_cache::Fp8Layers;
use crate::kv_quant::fp8_block_bytes;
use crate::plain_cache::PlainLayers;

/// Element type of the cache as stored and as sent on the wire.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KvDtype {
    /// 32-bit float (the CPU backend's default).
    F32,
    /// bfloat16 (the CUDA backend; the CPU backend when asked).
    Bf16,
    /// IEEE half.
    F16,
    /// FP8 e4m3 with an f32 scale per (block, K or V, KV head)
    /// ([`kv_quant`](crate::kv_quant)); a block's bytes are its e4m3 values
    /// in the layout above, then its scales (`[K heads][V heads]`, f32 LE).
    Fp8E4m3,
}

impl KvDtype {
    /// Bytes per element.
    pub fn size(self) -> usize {
        match self {
            KvDtype::F32 => 4,
            KvDtype::Bf16 | KvDtype::F16 => 2,
            KvDtype::Fp8E4m3 => 1,
        }
    }

    /// The name configs and messages use (`f32`, `bf16`, `f16`, `fp8_e4m3`).
    pub fn name(self) -> &'static str {
        match self {
            KvDtype::F32 => "f32",
            KvDtype::Bf16 => "bf16",
            KvDtype::F16 => "f16",
            KvDtype::Fp8E4m3 => "fp8_e4m3",
        }
    }
}

/// The shape of a KV cache.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KvLayout {
    /// Decoder layers.
    pub num_layers: usize,
    /// Blocks per layer.
    pub num_blocks: usize,
    /// Tokens per block.
    pub block_size: usize,
    /// KV heads stored (all of the model's, or one tensor-parallel rank's share).
    pub num_kv_heads: usize,
    /// Width of a head.
    pub head_dim: usize,
    /// Element type.
    pub dtype: KvDtype,
}

impl KvLayout {
    /// Elements in one block of one layer (K and V).
    pub fn block_elems(&self) -> usize {
        2 * self.num_kv_heads * self.block_size * self.head_dim
    }

    /// Bytes in one block of one layer (K and V; for fp8, with its scales).
    pub fn block_bytes(&self) -> usize {
        frame_block_bytes(self, self.num_kv_heads)
    }

    /// Tokens of KV one layer's block holds per byte of cache budget, as
    /// blocks: how many blocks of this layout (all layers) fit in `budget`
    /// bytes. The smaller the element, the more blocks.
    pub fn blocks_in_budget(&self, budget: usize) -> usize {
        budget / (self.block_bytes() * self.num_layers).max(1)
    }

    /// Offset, in elements within a block, of `(kind, head, slot)`; `kind` 0 is K, 1 is V.
    pub fn offset_in_block(&self, kind: usize, head: usize, slot: usize) -> usize {
        ((kind * self.num_kv_heads + head) * self.block_size + slot) * self.head_dim
    }
}

/// The CPU backend's KV storage: one `f32` or `bf16` buffer per layer
/// ([`PlainLayers`]), or one e4m3 buffer and its scales per layer ([`Fp8Layers`]).
pub struct CpuKvCache {
    layout: KvLayout,
    store: Store,
}

/// What a [`CpuKvCache`] holds, by its dtype.
enum Store {
    F32(PlainLayers<f32>),
    Bf16(PlainLayers<bf16>),
    Fp8(Fp8Layers),
}

/// Runs `$body` with `$s` bound to the store, whichever its element type
/// (the three have the same methods).
macro_rules! each_store {
    ($store:expr, $s:ident => $body:expr) => {
        match $store {
            Store::F32($s) => $body,
            Store::Bf16($s) => $body,
            Store::Fp8($s) => $body,
        }
    };
}

impl CpuKvCache {
    /// Zeroed storage for `layout` (whose dtype must be f32, bf16 or fp8_e4m3).
    pub fn new(layout: KvLayout) -> Result<Self> {
        let store = match layout.dtype {
            KvDtype::F32 => Store::F32(PlainLayers::new(&layout)),
            KvDtype::Bf16 => Store::Bf16(PlainLayers::new(&layout)),
            KvDtype::Fp8E4m3 => Store::Fp8(Fp8Layers::new(&layout)),
            other => {
                return Err(EngineError::KvCache(format!(
                    "the CPU cache stores f32, bf16 or fp8_e4m3, not {}",
                    other.name()
                )));
            }
        };
        Ok(CpuKvCache { layout, store })
    }

    /// The cache's shape.
    pub fn layout(&self) -> &KvLayout {
        &self.layout
    }

    fn check_block(&self, block: BlockId) -> Result<usize> {
        let b = block as usize;
        if b >= self.layout.num_blocks {
            return Err(EngineError::KvCache(format!(
                "block {block} is beyond the cache's {} blocks",
                self.layout.num_blocks
            )));
        }
        Ok(b)
    }

    /// Stores the K and V (`[num_kv_heads * head_dim]` each) of the token at `position`.
    pub fn write_token(
        &mut self,
        layer: usize,
        block_table: &[BlockId],
        position: usize,
        k: &[f32],
        v: &[f32],
    ) -> Result<()> {
        let l = self.layout;
        let block = *block_table.get(position / l.block_size).ok_or_else(|| {
            EngineError::KvCache(format!("position {position} is beyond the block table"))
        })?;
        let b = self.check_block(block)?;
        let slot = position % l.block_size;
        each_store!(&mut self.store, st => st.write_token(&l, layer, b, slot, k, v));
        Ok(())
    }

    /// Gathers the first `len` tokens of a sequence into contiguous
    /// `[num_kv_heads, len, head_dim]` K and V buffers.
    pub fn gather(
        &self,
        layer: usize,
        block_table: &[BlockId],
        len: usize,
    ) -> Result<(Vec<f32>, Vec<f32>)> {
        let l = self.layout;
        if crate::block_manager::blocks_for(len, l.block_size) > block_table.len() {
            return Err(EngineError::KvCache(format!(
                "{len} tokens do not fit a block table of {} blocks",
                block_table.len()
            )));
        }
        let mut k = vec![0.0; l.num_kv_heads * len * l.head_dim];
        let mut v = vec![0.0; k.len()];
        for (i, &block) in block_table.iter().enumerate() {
            if i * l.block_size >= len {
                break;
            }
            let b = self.check_block(block)?;
            each_store!(&self.store, st => st.gather_block(&l, layer, b, i, len, &mut k, &mut v));
        }
        Ok((k, v))
    }

    /// The bytes (little-endian) of `blocks` of one layer, block after block:
    /// what goes on the wire for that layer.
    pub fn export_layer(&self, layer: usize, blocks: &[BlockId]) -> Result<Vec<u8>> {
        self.export_heads(layer, blocks, 0..self.layout.num_kv_heads)
    }

    /// Writes bytes produced by [`export_layer`](Self::export_layer) into `blocks` of one layer.
    pub fn import_layer(&mut self, layer: usize, blocks: &[BlockId], bytes: &[u8]) -> Result<()> {
        self.import_heads(layer, blocks, 0, 0..self.layout.num_kv_heads, bytes)
    }
}

/// Bytes of one block of a frame holding `heads` KV heads of `layout`'s
/// shape (for fp8, the e4m3 values then the heads' scales).
pub fn frame_block_bytes(layout: &KvLayout, heads: usize) -> usize {
    match layout.dtype {
        KvDtype::Fp8E4m3 => fp8_block_bytes(heads, layout.block_size, layout.head_dim),
        d => 2 * heads * layout.block_size * layout.head_dim * d.size(),
    }
}

impl CpuKvCache {
    /// Checks a head-range transfer and returns the heads it and this cache share.
    /// This cache holds global heads `first..first + num_kv_heads`; the frame holds `frame`.
    fn head_overlap(
        &self,
        layer: usize,
        blocks: &[BlockId],
        first: usize,
        frame: &Range<usize>,
        bytes: usize,
    ) -> Result<Range<usize>> {
        let l = self.layout;
        if layer >= l.num_layers {
            return Err(EngineError::KvCache(format!(
                "layer {layer} does not exist"
            )));
        }
        if frame.is_empty() {
            return Err(EngineError::KvCache("empty head range".into()));
        }
        let want = blocks.len() * frame_block_bytes(&l, frame.len());
        if bytes != want {
            return Err(EngineError::KvCache(format!(
                "{bytes} bytes do not fill {} blocks of heads {frame:?} ({want} bytes)",
                blocks.len()
            )));
        }
        for &b in blocks {
            self.check_block(b)?;
        }
        Ok(frame.start.max(first)..frame.end.min(first + l.num_kv_heads))
    }

    /// Writes the heads this cache holds out of a frame of heads `frame`
    /// (global indices; this cache holds heads `first..first + num_kv_heads`)
    /// whose blocks are laid out like the cache's restricted to those heads:
    /// `[K: frame heads][slot][dim]` then V. Heads outside the cache are skipped.
    pub fn import_heads(
        &mut self,
        layer: usize,
        blocks: &[BlockId],
        first: usize,
        frame: Range<usize>,
        bytes: &[u8],
    ) -> Result<()> {
        let l = self.layout;
        let common = self.head_overlap(layer, blocks, first, &frame, bytes.len())?;
        each_store!(&mut self.store, st => st.import_heads(&l, layer, blocks, first, &frame, common, bytes));
        Ok(())
    }

    /// The inverse of [`import_heads`](Self::import_heads): writes the heads
    /// this cache holds into `out`, a frame of heads `frame`.
    pub fn export_heads_into(
        &self,
        layer: usize,
        blocks: &[BlockId],
        first: usize,
        frame: Range<usize>,
        out: &mut [u8],
    ) -> Result<()> {
        let l = self.layout;
        let common = self.head_overlap(layer, blocks, first, &frame, out.len())?;
        each_store!(&self.store, st => st.export_heads(&l, layer, blocks, first, &frame, common, out));
        Ok(())
    }

    /// Heads `heads` (of this cache's own numbering) of `blocks` of one layer,
    /// as a frame laid out like [`import_heads`](Self::import_heads) reads.
    pub fn export_heads(
        &self,
        layer: usize,
        blocks: &[BlockId],
        heads: Range<usize>,
    ) -> Result<Vec<u8>> {
        if heads.end > self.layout.num_kv_heads {
            return Err(EngineError::KvCache(format!(
                "heads {heads:?} beyond the cache's {} heads",
                self.layout.num_kv_heads
            )));
        }
        let mut out = vec![0u8; blocks.len() * frame_block_bytes(&self.layout, heads.len())];
        self.export_heads_into(layer, blocks, 0, heads, &mut out)?;
        Ok(out)
    }
}

/// The small cache shape the storage tests share: 2 layers of 4 blocks of 4
/// tokens, 2 KV heads of width 3.
#[cfg(test)]
pub(crate) fn small_layout(dtype: KvDtype) -> KvLayout {
    KvLayout {
        num_layers: 2,
        num_blocks: 4,
        block_size: 4,
        num_kv_heads: 2,
        head_dim: 3,
        dtype,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn layout() -> KvLayout {
        small_layout(KvDtype::F32)
    }

    #[test]
    fn write_gather_roundtrip_across_blocks() {
        let mut c = CpuKvCache::new(layout()).unwrap();
        let table = [3, 1];
        for p in 0..6 {
            let k: Vec<f32> = (0..6).map(|i| (p * 10 + i) as f32).collect();
            let v: Vec<f32> = k.iter().map(|x| -x).collect();
            c.write_token(1, &table, p, &k, &v).unwrap();
        }
        let (k, v) = c.gather(1, &table, 6).unwrap();
        // head 1, position 5, dim 2 -> value 5*10 + 3 + 2
        assert_eq!(k[(6 + 5) * 3 + 2], 55.0);
        assert_eq!(v[(6 + 5) * 3 + 2], -55.0);
        assert!(c.gather(1, &table, 9).is_err());
        assert!(c.write_token(0, &table, 8, &[0.0; 6], &[0.0; 6]).is_err());
    }

    #[test]
    fn export_import_moves_a_layer() {
        let mut a = CpuKvCache::new(layout()).unwrap();
        for p in 0..8 {
            let k = vec![p as f32; 6];
            a.write_token(0, &[2, 0], p, &k, &k).unwrap();
        }
        let bytes = a.export_layer(0, &[2, 0]).unwrap();
        let mut b = CpuKvCache::new(layout()).unwrap();
        b.import_layer(0, &[1, 3], &bytes).unwrap();
        assert_eq!(
            a.gather(0, &[2, 0], 8).unwrap(),
            b.gather(0, &[1, 3], 8).unwrap()
        );
        assert!(
            b.import_layer(0, &[1], &bytes).is_err(),
            "size mismatch refused"
        );
        assert!(
            b.import_layer(5, &[1, 3], &bytes).is_err(),
            "bad layer refused"
        );
        assert!(
            b.import_layer(0, &[1, 9], &bytes).is_err(),
            "bad block refused"
        );
    }

    #[test]
    fn head_ranges_reassemble_a_layer() {
        let mut a = CpuKvCache::new(layout()).unwrap();
        for p in 0..8 {
            let k: Vec<f32> = (0..6).map(|i| (p * 10 + i) as f32).collect();
            let v: Vec<f32> = k.iter().map(|x| -x).collect();
            a.write_token(1, &[2, 0], p, &k, &v).unwrap();
        }
        let whole = a.export_layer(1, &[2, 0]).unwrap();
        assert_eq!(a.export_heads(1, &[2, 0], 0..2).unwrap(), whole);
        let h0 = a.export_heads(1, &[2, 0], 0..1).unwrap();
        let h1 = a.export_heads(1, &[2, 0], 1..2).unwrap();
        assert_eq!(h0.len() * 2, whole.len());
        // Two half-caches (one head each) take their head out of the whole frame...
        let half = KvLayout {
            num_kv_heads: 1,
            ..layout()
        };
        let mut lo = CpuKvCache::new(half).unwrap();
        let mut hi = CpuKvCache::new(half).unwrap();
        lo.import_heads(1, &[1, 3], 0, 0..2, &whole).unwrap();
        hi.import_heads(1, &[1, 3], 1, 0..2, &whole).unwrap();
        assert_eq!(lo.export_layer(1, &[1, 3]).unwrap(), h0);
        assert_eq!(hi.export_layer(1, &[1, 3]).unwrap(), h1);
        // ...and a whole cache reassembles from the two single-head frames.
        let mut b = CpuKvCache::new(layout()).unwrap();
        b.import_heads(1, &[3, 1], 0, 1..2, &h1).unwrap();
        b.import_heads(1, &[3, 1], 0, 0..1, &h0).unwrap();
        assert_eq!(b.export_layer(1, &[3, 1]).unwrap(), whole);
        assert!(b.import_heads(1, &[3], 0, 0..1, &h0).is_err(), "size");
        assert!(b.import_heads(1, &[3, 1], 0, 0..0, &[]).is_err(), "empty");
        assert!(a.export_heads(1, &[2, 0], 1..3).is_err(), "beyond");
    }
}
