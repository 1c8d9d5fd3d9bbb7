//! The CPU cache's unquantized storage: per layer, one buffer of `f32` or
//! `bf16` elements in the [`kv_cache`](crate::kv_cache) block layout. A bf16
//! cache rounds each K/V value once, when it is written (round to nearest
//! even, as the CUDA backend's stores do), and reads it back exactly; frames
//! carry the elements little-endian, so a bf16 CPU node and a CUDA node
//! exchange KV without conversion.

use std::ops::Range;

use half::bf16;

use crate::block_manager::BlockId;
use crate::kv_cache::KvLayout;

/// An element a plain cache stores.
pub(crate) trait Elem: Copy + Default {
    /// Bytes of one element on the wire.
    const BYTES: usize;
    /// The element nearest `x`.
    fn from_f32(x: f32) -> Self;
    /// The element's value.
    fn to_f32(self) -> f32;
    /// Writes the element little-endian into `out` (`BYTES` long).
    fn write_le(self, out: &mut [u8]);
    /// Reads an element from `b` (`BYTES` long, little-endian).
    fn read_le(b: &[u8]) -> Self;
}

impl Elem for f32 {
    const BYTES: usize = 4;
    fn from_f32(x: f32) -> Self {
        x
    }
    fn to_f32(self) -> f32 {
        self
    }
    fn write_le(self, out: &mut [u8]) {
        out.copy_from_slice(&self.to_le_bytes());
    }
    fn read_le(b: &[u8]) -> Self {
        f32::from_le_bytes([b[0], b[1], b[2], b[3]])
    }
}

impl Elem for bf16 {
    const BYTES: usize = 2;
    fn from_f32(x: f32) -> Self {
        bf16::from_f32(x)
    }
    fn to_f32(self) -> f32 {
        bf16::to_f32(self)
    }
    fn write_le(self, out: &mut [u8]) {
        out.copy_from_slice(&self.to_bits().to_le_bytes());
    }
    fn read_le(b: &[u8]) -> Self {
        bf16::from_bits(u16::from_le_bytes([b[0], b[1]]))
    }
}

/// Every layer's elements.
pub(crate) struct PlainLayers<T> {
    layers: Vec<Vec<T>>,
}

impl<T: Elem> PlainLayers<T> {
    /// Zeroed storage.
    pub(crate) fn new(l: &KvLayout) -> Self {
        PlainLayers {
            layers: (0..l.num_layers)
                .map(|_| vec![T::default(); l.num_blocks * l.block_elems()])
                .collect(),
        }
    }

    /// Stores token `slot` of block `b` (`k`, `v`: `[num_kv_heads * head_dim]`).
    pub(crate) fn write_token(
        &mut self,
        l: &KvLayout,
        layer: usize,
        b: usize,
        slot: usize,
        k: &[f32],
        v: &[f32],
    ) {
        let base = b * l.block_elems();
        let buf = &mut self.layers[layer];
        for (kind, src) in [k, v].into_iter().enumerate() {
            for h in 0..l.num_kv_heads {
                let at = base + l.offset_in_block(kind, h, slot);
                for (d, &x) in buf[at..at + l.head_dim]
                    .iter_mut()
                    .zip(&src[h * l.head_dim..(h + 1) * l.head_dim])
                {
                    *d = T::from_f32(x);
                }
            }
        }
    }

    /// Block `b`, the `index`th of a sequence of `len` tokens, into
    /// `[num_kv_heads, len, head_dim]` K and V.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn gather_block(
        &self,
        l: &KvLayout,
        layer: usize,
        b: usize,
        index: usize,
        len: usize,
        k: &mut [f32],
        v: &mut [f32],
    ) {
        let d = l.head_dim;
        let first = index * l.block_size;
        let n = (len - first).min(l.block_size);
        let base = b * l.block_elems();
        for (kind, dst) in [k, v].into_iter().enumerate() {
            for h in 0..l.num_kv_heads {
                let src = base + l.offset_in_block(kind, h, 0);
                let out = (h * len + first) * d;
                for (o, x) in dst[out..out + n * d]
                    .iter_mut()
                    .zip(&self.layers[layer][src..src + n * d])
                {
                    *o = x.to_f32();
                }
            }
        }
    }

    /// Writes heads `common` of a frame of heads `frame` (this cache holds
    /// heads `first..`) into `blocks`; sizes were checked by the caller.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn import_heads(
        &mut self,
        l: &KvLayout,
        layer: usize,
        blocks: &[BlockId],
        first: usize,
        frame: &Range<usize>,
        common: Range<usize>,
        bytes: &[u8],
    ) {
        let (fc, run) = (frame.len(), l.block_size * l.head_dim);
        let fbe = 2 * fc * run;
        for (i, &b) in blocks.iter().enumerate() {
            for kind in 0..2 {
                for h in common.clone() {
                    let src = (i * fbe + (kind * fc + h - frame.start) * run) * T::BYTES;
                    let dst = b as usize * l.block_elems() + l.offset_in_block(kind, h - first, 0);
                    for (d, c) in self.layers[layer][dst..dst + run]
                        .iter_mut()
                        .zip(bytes[src..src + run * T::BYTES].chunks_exact(T::BYTES))
                    {
                        *d = T::read_le(c);
                    }
                }
            }
        }
    }

    /// The inverse of [`import_heads`](Self::import_heads).
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn export_heads(
        &self,
        l: &KvLayout,
        layer: usize,
        blocks: &[BlockId],
        first: usize,
        frame: &Range<usize>,
        common: Range<usize>,
        out: &mut [u8],
    ) {
        let (fc, run) = (frame.len(), l.block_size * l.head_dim);
        let fbe = 2 * fc * run;
        for (i, &b) in blocks.iter().enumerate() {
            for kind in 0..2 {
                for h in common.clone() {
                    let dst = (i * fbe + (kind * fc + h - frame.start) * run) * T::BYTES;
                    let src = b as usize * l.block_elems() + l.offset_in_block(kind, h - first, 0);
                    for (o, x) in out[dst..dst + run * T::BYTES]
                        .chunks_exact_mut(T::BYTES)
                        .zip(&self.layers[layer][src..src + run])
                    {
                        x.write_le(o);
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use half::bf16;

    use crate::kv_cache::{CpuKvCache, KvDtype, small_layout as layout};

    #[test]
    fn a_bf16_cache_holds_each_value_rounded_to_bf16() {
        let mut c = CpuKvCache::new(layout(KvDtype::Bf16)).unwrap();
        // bf16 steps by 2^-7 above 1: 1 + 2^-8 is a tie (to even: 1), and so
        // is 1 + 3 * 2^-8 (to even: 1 + 2^-6).
        let k = [
            1.0 + 2f32.powi(-8),
            1.0 + 3.0 * 2f32.powi(-8),
            -3.3,
            0.1,
            1e-3,
            7.0,
        ];
        let v: Vec<f32> = k.iter().map(|x| x * 2.0).collect();
        c.write_token(1, &[2], 1, &k, &v).unwrap();
        let (gk, gv) = c.gather(1, &[2], 2).unwrap();
        for h in 0..2 {
            for d in 0..3 {
                // [head, len 2, dim 3]: position 1 of head h.
                let at = (h * 2 + 1) * 3 + d;
                assert_eq!(gk[at], bf16::from_f32(k[h * 3 + d]).to_f32());
                assert_eq!(gv[at], bf16::from_f32(v[h * 3 + d]).to_f32());
            }
        }
        assert_eq!(gk[3], 1.0, "a tie rounds to even");
        assert_eq!(gk[4], 1.0 + 2f32.powi(-6), "a tie rounds to even");
    }

    #[test]
    fn bf16_frames_are_little_endian_bf16_and_round_trip_exactly() {
        let l = layout(KvDtype::Bf16);
        let mut a = CpuKvCache::new(l).unwrap();
        for p in 0..6 {
            let k: Vec<f32> = (0..6).map(|i| (p * 10 + i) as f32 * 0.37).collect();
            let v: Vec<f32> = k.iter().map(|x| -x).collect();
            a.write_token(0, &[3, 1], p, &k, &v).unwrap();
        }
        let frame = a.export_layer(0, &[3, 1]).unwrap();
        assert_eq!(frame.len(), 2 * l.block_elems() * 2);
        // K of head 0, slot 0 of the first block, dim 1: token 0's value 1 * 0.37.
        let at = 2;
        assert_eq!(
            u16::from_le_bytes([frame[at], frame[at + 1]]),
            bf16::from_f32(0.37).to_bits()
        );
        let mut b = CpuKvCache::new(l).unwrap();
        b.import_layer(0, &[0, 2], &frame).unwrap();
        assert_eq!(b.export_layer(0, &[0, 2]).unwrap(), frame);
        assert_eq!(
            a.gather(0, &[3, 1], 6).unwrap(),
            b.gather(0, &[0, 2], 6).unwrap()
        );
        // Head ranges: one head's frame is half the bytes and lands in place.
        let h1 = a.export_heads(0, &[3, 1], 1..2).unwrap();
        assert_eq!(h1.len() * 2, frame.len());
        let mut c = CpuKvCache::new(l).unwrap();
        c.import_heads(0, &[0, 2], 0, 1..2, &h1).unwrap();
        assert_eq!(c.export_heads(0, &[0, 2], 1..2).unwrap(), h1);
        assert!(b.import_layer(0, &[0], &frame).is_err(), "size mismatch");
    }

    #[test]
    fn bf16_halves_the_cache_of_f32() {
        // An f32 block of both layers is 2 layers x 48 values x 4 bytes.
        assert_eq!(layout(KvDtype::F32).blocks_in_budget(384_000), 1000);
        assert_eq!(layout(KvDtype::Bf16).blocks_in_budget(384_000), 2000);
        assert!(
            CpuKvCache::new(layout(KvDtype::F16)).is_err(),
            "f16 is not a CPU cache"
        );
    }
}
