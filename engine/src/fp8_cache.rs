//! The CPU cache's fp8 storage: per layer, the e4m3 bytes in the
//! [`kv_cache`](crate::kv_cache) block layout and one f32 scale per
//! (block, K or V, KV head). Writes follow [`kv_quant::write_token`]; reads
//! dequantize; frames (what the wire carries) are each block's bytes then its
//! scales, so a layer or a range of heads moves with its scales and
//! round-trips exactly.

use std::ops::Range;

use crate::block_manager::BlockId;
use crate::kv_cache::KvLayout;
use crate::kv_quant::{self, HeadRun};

/// The e4m3 values and scales of every layer.
pub(crate) struct Fp8Layers {
    bytes: Vec<Vec<u8>>,
    scales: Vec<Vec<f32>>,
}

impl Fp8Layers {
    /// Zeroed storage (every scale 0: every value reads 0).
    pub(crate) fn new(l: &KvLayout) -> Self {
        Fp8Layers {
            bytes: (0..l.num_layers)
                .map(|_| vec![0; l.num_blocks * l.block_elems()])
                .collect(),
            scales: (0..l.num_layers)
                .map(|_| vec![0.0; l.num_blocks * 2 * l.num_kv_heads])
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
        let (run, h_n, d) = (l.block_size * l.head_dim, l.num_kv_heads, l.head_dim);
        let base = b * l.block_elems();
        for (kind, src) in [k, v].into_iter().enumerate() {
            for h in 0..h_n {
                let at = base + l.offset_in_block(kind, h, 0);
                kv_quant::write_token(
                    HeadRun {
                        bytes: &mut self.bytes[layer][at..at + run],
                        scale: &mut self.scales[layer][b * 2 * h_n + kind * h_n + h],
                    },
                    slot,
                    &src[h * d..(h + 1) * d],
                );
            }
        }
    }

    /// Dequantizes block `b`, the `index`th of a sequence of `len` tokens,
    /// into `[num_kv_heads, len, head_dim]` K and V.
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
        let (h_n, d) = (l.num_kv_heads, l.head_dim);
        let first = index * l.block_size;
        let n = (len - first).min(l.block_size);
        let base = b * l.block_elems();
        for (kind, dst) in [k, v].into_iter().enumerate() {
            for h in 0..h_n {
                let scale = self.scales[layer][b * 2 * h_n + kind * h_n + h];
                let src = base + l.offset_in_block(kind, h, 0);
                let out = (h * len + first) * d;
                for (o, &q) in dst[out..out + n * d]
                    .iter_mut()
                    .zip(&self.bytes[layer][src..src + n * d])
                {
                    *o = kv_quant::dequantize(q, scale);
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
        let (fc, run, h_n) = (frame.len(), l.block_size * l.head_dim, l.num_kv_heads);
        let fbb = kv_quant::fp8_block_bytes(fc, l.block_size, l.head_dim);
        for (i, &b) in blocks.iter().enumerate() {
            let b = b as usize;
            let fb = &bytes[i * fbb..(i + 1) * fbb];
            for kind in 0..2 {
                for h in common.clone() {
                    let r = kind * fc + h - frame.start;
                    let dst = b * l.block_elems() + l.offset_in_block(kind, h - first, 0);
                    self.bytes[layer][dst..dst + run].copy_from_slice(&fb[r * run..(r + 1) * run]);
                    let s = 2 * fc * run + r * 4;
                    self.scales[layer][b * 2 * h_n + kind * h_n + h - first] =
                        f32::from_le_bytes([fb[s], fb[s + 1], fb[s + 2], fb[s + 3]]);
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
        let (fc, run, h_n) = (frame.len(), l.block_size * l.head_dim, l.num_kv_heads);
        let fbb = kv_quant::fp8_block_bytes(fc, l.block_size, l.head_dim);
        for (i, &b) in blocks.iter().enumerate() {
            let b = b as usize;
            let fb = &mut out[i * fbb..(i + 1) * fbb];
            for kind in 0..2 {
                for h in common.clone() {
                    let r = kind * fc + h - frame.start;
                    let src = b * l.block_elems() + l.offset_in_block(kind, h - first, 0);
                    fb[r * run..(r + 1) * run].copy_from_slice(&self.bytes[layer][src..src + run]);
                    let s = 2 * fc * run + r * 4;
                    let scale = self.scales[layer][b * 2 * h_n + kind * h_n + h - first];
                    fb[s..s + 4].copy_from_slice(&scale.to_le_bytes());
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use crate::kv_cache::{CpuKvCache, KvDtype, KvLayout, small_layout as layout};

    fn token(p: usize) -> (Vec<f32>, Vec<f32>) {
        let k: Vec<f32> = (0..6).map(|i| (p * 10 + i) as f32 * 0.1 - 2.0).collect();
        let v: Vec<f32> = k.iter().map(|x| -x * 3.0).collect();
        (k, v)
    }

    #[test]
    fn fp8_cache_reads_back_what_was_written_within_e4m3_precision() {
        let mut c = CpuKvCache::new(layout(KvDtype::Fp8E4m3)).unwrap();
        let mut f = CpuKvCache::new(layout(KvDtype::F32)).unwrap();
        let table = [3, 1];
        for p in 0..7 {
            let (k, v) = token(p);
            c.write_token(1, &table, p, &k, &v).unwrap();
            f.write_token(1, &table, p, &k, &v).unwrap();
        }
        let (k8, v8) = c.gather(1, &table, 7).unwrap();
        let (k32, v32) = f.gather(1, &table, 7).unwrap();
        for (a, b) in k8.iter().zip(&k32).chain(v8.iter().zip(&v32)) {
            // Two roundings at most (a requantized token): 2 * 1/16 relative
            // plus the block's smallest step.
            assert!((a - b).abs() <= b.abs() / 8.0 + 0.02, "{a} vs {b}");
        }
        assert!(c.gather(1, &table, 9).is_err());
    }

    #[test]
    fn fp8_layers_and_heads_round_trip_exactly() {
        let l = layout(KvDtype::Fp8E4m3);
        let mut a = CpuKvCache::new(l).unwrap();
        for p in 0..7 {
            let (k, v) = token(p);
            a.write_token(0, &[2, 0], p, &k, &v).unwrap();
        }
        let whole = a.export_layer(0, &[2, 0]).unwrap();
        assert_eq!(whole.len(), 2 * l.block_bytes());
        assert_eq!(
            l.block_bytes(),
            2 * 2 * 4 * 3 + 2 * 2 * 4,
            "values then scales"
        );
        let mut b = CpuKvCache::new(l).unwrap();
        b.import_layer(0, &[1, 3], &whole).unwrap();
        assert_eq!(b.export_layer(0, &[1, 3]).unwrap(), whole);
        assert_eq!(
            a.gather(0, &[2, 0], 7).unwrap(),
            b.gather(0, &[1, 3], 7).unwrap()
        );
        // Head frames carry their heads' scales; two halves reassemble the layer.
        let h0 = a.export_heads(0, &[2, 0], 0..1).unwrap();
        let h1 = a.export_heads(0, &[2, 0], 1..2).unwrap();
        assert_eq!(h0.len() * 2, whole.len());
        let mut c = CpuKvCache::new(l).unwrap();
        c.import_heads(0, &[0, 1], 0, 1..2, &h1).unwrap();
        c.import_heads(0, &[0, 1], 0, 0..1, &h0).unwrap();
        assert_eq!(c.export_layer(0, &[0, 1]).unwrap(), whole);
        // A one-head rank takes its head out of the whole frame.
        let mut hi = CpuKvCache::new(KvLayout {
            num_kv_heads: 1,
            ..l
        })
        .unwrap();
        hi.import_heads(0, &[1, 3], 1, 0..2, &whole).unwrap();
        assert_eq!(hi.export_layer(0, &[1, 3]).unwrap(), h1);
        assert!(
            b.import_layer(0, &[1], &whole).is_err(),
            "size mismatch refused"
        );
        assert!(b.import_heads(0, &[3], 0, 0..1, &h0).is_err(), "size");
    }

    #[test]
    fn fp8_doubles_the_tokens_a_budget_holds_for_the_8b_shape() {
        // Llama-3-8B: 32 layers, 8 KV heads of 128, blocks of 16 tokens.
        let shape = |dtype| KvLayout {
            num_layers: 32,
            num_blocks: 0,
            block_size: 16,
            num_kv_heads: 8,
            head_dim: 128,
            dtype,
        };
        let (bf16, fp8) = (shape(KvDtype::Bf16), shape(KvDtype::Fp8E4m3));
        let per_token = |l: KvLayout| l.block_bytes() * l.num_layers / l.block_size;
        assert_eq!(per_token(bf16), 131_072);
        // 64 KiB of e4m3 plus 2 * 8 scales per layer per 16-token block.
        assert_eq!(per_token(fp8), 65_536 + 32 * 2 * 8 * 4 / 16);
        let budget = 40usize << 30;
        let (tb, tf) = (
            bf16.blocks_in_budget(budget) * 16,
            fp8.blocks_in_budget(budget) * 16,
        );
        println!("8B shape, 40 GiB of KV: bf16 {tb} tokens, fp8 {tf} tokens");
        assert_eq!(tb, 327_680);
        assert!(tf > tb * 199 / 100 && tf < tb * 2, "{tf}");
    }
}
