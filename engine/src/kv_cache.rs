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

use crate::block_manager::BlockId;
use crate::error::{EngineError, Result};

/// Element type of the cache as stored and as sent on the wire.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KvDtype {
    /// 32-bit float (the CPU backend).
    F32,
    /// bfloat16 (the CUDA backend).
    Bf16,
    /// IEEE half.
    F16,
}

impl KvDtype {
    /// Bytes per element.
    pub fn size(self) -> usize {
        match self {
            KvDtype::F32 => 4,
            KvDtype::Bf16 | KvDtype::F16 => 2,
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

    /// Bytes in one block of one layer (K and V).
    pub fn block_bytes(&self) -> usize {
        self.block_elems() * self.dtype.size()
    }

    /// Offset, in elements within a block, of `(kind, head, slot)`; `kind` 0 is K, 1 is V.
    pub fn offset_in_block(&self, kind: usize, head: usize, slot: usize) -> usize {
        ((kind * self.num_kv_heads + head) * self.block_size + slot) * self.head_dim
    }
}

/// The CPU backend's KV storage: one `f32` buffer per layer.
pub struct CpuKvCache {
    layout: KvLayout,
    layers: Vec<Vec<f32>>,
}

impl CpuKvCache {
    /// Zeroed storage for `layout` (whose dtype must be f32).
    pub fn new(layout: KvLayout) -> Result<Self> {
        if layout.dtype != KvDtype::F32 {
            return Err(EngineError::KvCache("the CPU cache stores f32".into()));
        }
        let per_layer = layout.num_blocks * layout.block_elems();
        Ok(CpuKvCache {
            layout,
            layers: (0..layout.num_layers)
                .map(|_| vec![0.0; per_layer])
                .collect(),
        })
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
        let base = self.check_block(block)? * l.block_elems();
        let slot = position % l.block_size;
        let buf = &mut self.layers[layer];
        for h in 0..l.num_kv_heads {
            let src = h * l.head_dim..(h + 1) * l.head_dim;
            let kd = base + l.offset_in_block(0, h, slot);
            buf[kd..kd + l.head_dim].copy_from_slice(&k[src.clone()]);
            let vd = base + l.offset_in_block(1, h, slot);
            buf[vd..vd + l.head_dim].copy_from_slice(&v[src]);
        }
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
        let buf = &self.layers[layer];
        for (i, &block) in block_table.iter().enumerate() {
            let first = i * l.block_size;
            if first >= len {
                break;
            }
            let n = (len - first).min(l.block_size);
            let base = self.check_block(block)? * l.block_elems();
            for h in 0..l.num_kv_heads {
                let dst = (h * len + first) * l.head_dim..(h * len + first + n) * l.head_dim;
                let ks = base + l.offset_in_block(0, h, 0);
                k[dst.clone()].copy_from_slice(&buf[ks..ks + n * l.head_dim]);
                let vs = base + l.offset_in_block(1, h, 0);
                v[dst].copy_from_slice(&buf[vs..vs + n * l.head_dim]);
            }
        }
        Ok((k, v))
    }

    /// The bytes (little-endian) of `blocks` of one layer, block after block:
    /// what goes on the wire for that layer.
    pub fn export_layer(&self, layer: usize, blocks: &[BlockId]) -> Result<Vec<u8>> {
        if layer >= self.layout.num_layers {
            return Err(EngineError::KvCache(format!(
                "layer {layer} does not exist"
            )));
        }
        let be = self.layout.block_elems();
        let mut out = Vec::with_capacity(blocks.len() * self.layout.block_bytes());
        for &b in blocks {
            let b = self.check_block(b)?;
            for x in &self.layers[layer][b * be..(b + 1) * be] {
                out.extend_from_slice(&x.to_le_bytes());
            }
        }
        Ok(out)
    }

    /// Writes bytes produced by [`export_layer`](Self::export_layer) into `blocks` of one layer.
    pub fn import_layer(&mut self, layer: usize, blocks: &[BlockId], bytes: &[u8]) -> Result<()> {
        let l = self.layout;
        if layer >= l.num_layers {
            return Err(EngineError::KvCache(format!(
                "layer {layer} does not exist"
            )));
        }
        if bytes.len() != blocks.len() * l.block_bytes() {
            return Err(EngineError::KvCache(format!(
                "{} bytes do not fill {} blocks of {} bytes",
                bytes.len(),
                blocks.len(),
                l.block_bytes()
            )));
        }
        for &b in blocks {
            self.check_block(b)?;
        }
        let be = l.block_elems();
        for (i, &b) in blocks.iter().enumerate() {
            let b = b as usize;
            let src = &bytes[i * l.block_bytes()..(i + 1) * l.block_bytes()];
            for (dst, chunk) in self.layers[layer][b * be..(b + 1) * be]
                .iter_mut()
                .zip(src.chunks_exact(4))
            {
                *dst = f32::from_le_bytes([chunk[0], chunk[1], chunk[2], chunk[3]]);
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn layout() -> KvLayout {
        KvLayout {
            num_layers: 2,
            num_blocks: 4,
            block_size: 4,
            num_kv_heads: 2,
            head_dim: 3,
            dtype: KvDtype::F32,
        }
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
}
