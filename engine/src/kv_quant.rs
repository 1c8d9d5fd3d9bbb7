//! FP8 (e4m3) KV: the element codec and the scaling rule every backend and
//! the wire share. This CPU code is the reference: the CUDA cache-write
//! kernel does the same float operations in the same order, and its tests
//! compare against these functions bit for bit.
//!
//! # The format
//!
//! `e4m3` as OCP FP8 and NVIDIA's `__nv_fp8_e4m3` define it ("fn": finite,
//! no infinities): 1 sign bit, 4 exponent bits (bias 7), 3 mantissa bits;
//! largest finite ±448, smallest subnormal 2⁻⁹, NaN `0x7f`/`0xff`.
//! [`e4m3_from_f32`] rounds to nearest, ties to even, saturates finite values
//! and infinities beyond ±448 to ±448 (as `__NV_SATFINITE`), and keeps NaN.
//!
//! # Scales
//!
//! Each (block, K or V, KV head) has one `f32` scale: stored value
//! `q = e4m3(x / scale)`, read value `e4m3_to_f32(q) * scale`. The scale is
//! `amax / 448` over the values written into that block and head so far,
//! so the largest lands on 448 and nothing saturates.
//!
//! A block fills token by token (decode) or a chunk at a time (prefill);
//! tokens are written in order, each as [`write_token`]:
//! writing slot 0 starts the block afresh (scale 0); a later token whose
//! `amax / 448` exceeds the block's scale raises the scale to it and first
//! **requantizes** the block's earlier slots with the new scale
//! (`q' = e4m3(e4m3_to_f32(q) * old / new)`). So the scale is always the
//! amax of what the block holds, a block costs one scale whatever happens,
//! and a block written in one pass or token by token ends the same only when
//! the first token holds the amax (otherwise the early tokens are rounded
//! twice: an error of at most one more e4m3 rounding). The result depends only
//! on the values and their order, which is what makes the CPU the oracle.
//!
//! Imported KV in a wider dtype (a bf16 or f32 prefill node feeding an fp8
//! decode node) goes through the same rule, token by token over the tokens
//! a block holds ([`quantize_frame`]): the decode node's cache then holds
//! exactly what it would had it computed that KV itself.

use crate::error::{EngineError, Result};

/// The largest finite e4m3 value.
pub const E4M3_MAX: f32 = 448.0;

/// The canonical e4m3 NaN.
pub const E4M3_NAN: u8 = 0x7f;

/// `x` as e4m3: round to nearest even, saturating at ±448 (infinities
/// too), NaN to NaN.
pub fn e4m3_from_f32(x: f32) -> u8 {
    let sign = ((x.to_bits() >> 24) & 0x80) as u8;
    if x.is_nan() {
        return sign | E4M3_NAN;
    }
    let a = x.abs();
    if a > E4M3_MAX {
        return sign | 0x7e;
    }
    if a < 1.0 / 64.0 {
        // Subnormal (2^-9 steps); k = 8 is 2^-6, whose code 0x08 is the
        // smallest normal: the encoding carries over by itself.
        return sign | (a * 512.0).round_ties_even() as u8;
    }
    // Round the f32 mantissa to 3 bits, ties to even; a carry moves into the
    // exponent, and a value at most 448 rounds to at most 448.
    let bits = a.to_bits();
    let lsb = (bits >> 20) & 1;
    let r = (bits + 0x7ffff + lsb) & !0xfffff;
    let exp = (r >> 23) as i32 - 127 + 7;
    let man = ((r >> 20) & 7) as u8;
    sign | ((exp as u8) << 3) | man
}

/// The value of an e4m3 byte.
pub fn e4m3_to_f32(b: u8) -> f32 {
    let exp = i32::from((b >> 3) & 0xf);
    let man = f32::from(b & 7);
    let v = if exp == 15 && man == 7.0 {
        f32::NAN
    } else if exp == 0 {
        man / 512.0
    } else {
        (1.0 + man / 8.0) * f32::powi(2.0, exp - 7)
    };
    if b & 0x80 != 0 { -v } else { v }
}

/// `x` stored under `scale` (0 when the scale is 0: nothing nonzero was written).
pub fn quantize(x: f32, scale: f32) -> u8 {
    if scale > 0.0 {
        e4m3_from_f32(x / scale)
    } else {
        0
    }
}

/// The value a stored byte stands for under `scale`.
pub fn dequantize(q: u8, scale: f32) -> f32 {
    e4m3_to_f32(q) * scale
}

/// One (block, kind, head) run of the cache: `block_size * head_dim` e4m3
/// bytes, slot-major, and its scale.
pub struct HeadRun<'a> {
    /// The run's bytes.
    pub bytes: &'a mut [u8],
    /// The run's scale.
    pub scale: &'a mut f32,
}

/// Writes one token's `values` (one head, `head_dim` wide) into `slot` of a
/// run, applying the scaling rule of the module docs.
pub fn write_token(run: HeadRun<'_>, slot: usize, values: &[f32]) {
    let d = values.len();
    if slot == 0 {
        *run.scale = 0.0;
    }
    let amax = values.iter().fold(0.0f32, |m, x| m.max(x.abs()));
    let needed = amax.min(f32::MAX) / E4M3_MAX;
    if needed > *run.scale {
        let (old, new) = (*run.scale, needed);
        for q in &mut run.bytes[..slot * d] {
            *q = if old > 0.0 {
                e4m3_from_f32(e4m3_to_f32(*q) * old / new)
            } else {
                0
            };
        }
        *run.scale = new;
    }
    let scale = *run.scale;
    for (q, &x) in run.bytes[slot * d..(slot + 1) * d].iter_mut().zip(values) {
        *q = quantize(x, scale);
    }
}

/// A wider element type a frame can arrive in, to be quantized on import.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SourceDtype {
    /// Little-endian f32.
    F32,
    /// Little-endian bfloat16.
    Bf16,
    /// Little-endian IEEE half.
    F16,
}

impl SourceDtype {
    fn size(self) -> usize {
        match self {
            SourceDtype::F32 => 4,
            SourceDtype::Bf16 | SourceDtype::F16 => 2,
        }
    }

    fn read(self, b: &[u8]) -> f32 {
        match self {
            SourceDtype::F32 => f32::from_le_bytes([b[0], b[1], b[2], b[3]]),
            SourceDtype::Bf16 => f32::from_bits(u32::from(u16::from_le_bytes([b[0], b[1]])) << 16),
            SourceDtype::F16 => half::f16::from_le_bytes([b[0], b[1]]).to_f32(),
        }
    }
}

/// Bytes of one fp8 block (K and V) of `heads` heads: the e4m3 values in
/// the cache's block layout, then the scales, `[K heads][V heads]` f32 LE.
pub fn fp8_block_bytes(heads: usize, block_size: usize, head_dim: usize) -> usize {
    2 * heads * (block_size * head_dim + 4)
}

/// Quantizes a frame of `heads` heads in `src` (blocks laid out as the
/// cache's, `[K heads][slot][dim]` then V) into the fp8 frame layout
/// ([`fp8_block_bytes`]). `valid[i]` is how many leading slots of block `i`
/// hold tokens: those are written in order as [`write_token`] would; the rest
/// are zero.
pub fn quantize_frame(
    src: SourceDtype,
    bytes: &[u8],
    heads: usize,
    block_size: usize,
    head_dim: usize,
    valid: &[usize],
) -> Result<Vec<u8>> {
    let es = src.size();
    let run = block_size * head_dim;
    let src_block = 2 * heads * run * es;
    if bytes.len() != valid.len() * src_block {
        return Err(EngineError::KvCache(format!(
            "{} bytes do not fill {} blocks of {heads} heads ({src_block} bytes each)",
            bytes.len(),
            valid.len()
        )));
    }
    let dst_block = fp8_block_bytes(heads, block_size, head_dim);
    let mut out = vec![0u8; valid.len() * dst_block];
    let mut values = vec![0f32; head_dim];
    for (i, (sb, db)) in bytes
        .chunks_exact(src_block)
        .zip(out.chunks_exact_mut(dst_block))
        .enumerate()
    {
        let n = valid[i].min(block_size);
        let (data, scales) = db.split_at_mut(2 * heads * run);
        for (r, (dst, sc)) in data
            .chunks_exact_mut(run)
            .zip(scales.chunks_exact_mut(4))
            .enumerate()
        {
            let mut scale = 0f32;
            for slot in 0..n {
                let at = (r * run + slot * head_dim) * es;
                for (d, v) in values.iter_mut().enumerate() {
                    *v = src.read(&sb[at + d * es..]);
                }
                write_token(
                    HeadRun {
                        bytes: dst,
                        scale: &mut scale,
                    },
                    slot,
                    &values,
                );
            }
            sc.copy_from_slice(&scale.to_le_bytes());
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn known_values_encode_exactly() {
        for (x, b) in [
            (0.0f32, 0x00u8),
            (1.0, 0x38),
            (-1.0, 0xb8),
            (1.125, 0x39),
            (448.0, 0x7e),
            (-448.0, 0xfe),
            (0.015625, 0x08),    // 2^-6, smallest normal
            (0.001953125, 0x01), // 2^-9, smallest subnormal
            (0.013671875, 0x07), // 7 * 2^-9, largest subnormal
            (2.0, 0x40),
            (240.0, 0x77),
        ] {
            assert_eq!(e4m3_from_f32(x), b, "{x}");
            assert_eq!(e4m3_to_f32(b), x, "{b:#x}");
        }
        // Every non-NaN byte survives decode then encode.
        for b in 0..=255u8 {
            if b & 0x7f == 0x7f {
                assert!(e4m3_to_f32(b).is_nan());
            } else if b != 0x80 {
                assert_eq!(e4m3_from_f32(e4m3_to_f32(b)), b, "{b:#x}");
            }
        }
    }

    #[test]
    fn rounds_to_nearest_even() {
        // Between 1.0 (m=0) and 1.125 (m=1): the tie goes to the even 1.0...
        assert_eq!(e4m3_from_f32(1.0625), 0x38);
        // ...between 1.125 and 1.25 to the even 1.25 (m=2).
        assert_eq!(e4m3_from_f32(1.1875), 0x3a);
        // Off the tie, to the nearer.
        assert_eq!(e4m3_from_f32(1.07), 0x39);
        assert_eq!(e4m3_from_f32(1.06), 0x38);
        // Subnormal ties: 0.5 * 2^-9 to 0, 1.5 * 2^-9 to 2 * 2^-9.
        assert_eq!(e4m3_from_f32(0.5 / 512.0), 0x00);
        assert_eq!(e4m3_from_f32(1.5 / 512.0), 0x02);
        // A carry out of the mantissa moves the exponent: 1.9375 -> 2.0.
        assert_eq!(e4m3_from_f32(1.9375), 0x40);
        // 7.5 * 2^-9 ties between the largest subnormal and 2^-6: to even (2^-6).
        assert_eq!(e4m3_from_f32(7.5 / 512.0), 0x08);
    }

    #[test]
    fn saturates_and_keeps_nan() {
        assert_eq!(e4m3_from_f32(449.0), 0x7e);
        assert_eq!(e4m3_from_f32(1e9), 0x7e);
        assert_eq!(e4m3_from_f32(f32::INFINITY), 0x7e);
        assert_eq!(e4m3_from_f32(f32::NEG_INFINITY), 0xfe);
        assert_eq!(e4m3_from_f32(-500.0), 0xfe);
        assert_eq!(e4m3_from_f32(f32::NAN) & 0x7f, 0x7f);
        assert!(e4m3_to_f32(0xff).is_nan());
        assert_eq!(e4m3_from_f32(-0.0), 0x80);
        assert_eq!(e4m3_from_f32(1e-30), 0x00, "underflow to zero");
    }

    #[test]
    fn relative_error_is_within_half_an_ulp() {
        let mut x = 0.02f32;
        while x < 440.0 {
            let y = e4m3_to_f32(e4m3_from_f32(x));
            assert!((y - x).abs() <= x / 16.0 + 1e-6, "{x} -> {y}");
            x *= 1.013;
        }
    }

    #[test]
    fn later_larger_token_requantizes_the_block() {
        let (bs, d) = (4, 2);
        let mut bytes = vec![0u8; bs * d];
        let mut scale = 0.0;
        let run = |slot, v: &[f32], bytes: &mut Vec<u8>, scale: &mut f32| {
            write_token(HeadRun { bytes, scale }, slot, v)
        };
        let close = |q: u8, s: f32, x: f32| (dequantize(q, s) - x).abs() <= x.abs() / 16.0 + 1e-6;
        run(0, &[1.0, -0.5], &mut bytes, &mut scale);
        assert_eq!(scale, 1.0 / 448.0);
        assert!(close(bytes[0], scale, 1.0));
        run(1, &[0.25, 0.0], &mut bytes, &mut scale);
        assert_eq!(scale, 1.0 / 448.0, "a smaller token keeps the scale");
        let before = bytes[2];
        run(2, &[4.0, 2.0], &mut bytes, &mut scale);
        assert_eq!(scale, 4.0 / 448.0);
        // Earlier tokens were requantized: still close, now under the new scale.
        assert!(close(bytes[0], scale, 1.0));
        assert!(close(bytes[1], scale, -0.5));
        assert!(close(bytes[2], scale, 0.25));
        assert_ne!(bytes[2], before, "re-encoded under the larger scale");
        assert!(close(bytes[4], scale, 4.0));
        // Slot 0 again starts a fresh block.
        run(0, &[0.5, 0.5], &mut bytes, &mut scale);
        assert_eq!(scale, 0.5 / 448.0);
    }

    #[test]
    fn frame_quantization_matches_token_writes() {
        let (heads, bs, d) = (2, 4, 3);
        let vals: Vec<f32> = (0..2 * 2 * heads * bs * d)
            .map(|i| ((i * 37 % 23) as f32 - 11.0) * 0.37)
            .collect();
        let src: Vec<u8> = vals.iter().flat_map(|x| x.to_le_bytes()).collect();
        let out = quantize_frame(SourceDtype::F32, &src, heads, bs, d, &[4, 3]).unwrap();
        assert_eq!(out.len(), 2 * fp8_block_bytes(heads, bs, d));
        let run = bs * d;
        for b in 0..2 {
            let blk = &out[b * fp8_block_bytes(heads, bs, d)..];
            for r in 0..2 * heads {
                let mut bytes = vec![0u8; run];
                let mut scale = 0.0;
                let n = if b == 0 { 4 } else { 3 };
                for slot in 0..n {
                    let at = b * 2 * heads * run + r * run + slot * d;
                    write_token(
                        HeadRun {
                            bytes: &mut bytes,
                            scale: &mut scale,
                        },
                        slot,
                        &vals[at..at + d],
                    );
                }
                assert_eq!(&blk[r * run..(r + 1) * run], &bytes[..]);
                let s = 2 * heads * run + r * 4;
                assert_eq!(blk[s..s + 4], scale.to_le_bytes());
            }
        }
        assert!(quantize_frame(SourceDtype::F32, &src[1..], heads, bs, d, &[4, 3]).is_err());
        // bf16 and f16 read as their values.
        let one_bf16 = [0x80u8, 0x3f].repeat(2 * heads * run);
        let q = quantize_frame(SourceDtype::Bf16, &one_bf16, heads, bs, d, &[4]).unwrap();
        assert_eq!(q[0], 0x7e);
        let one_f16 = [0x00u8, 0x3c].repeat(2 * heads * run);
        let q = quantize_frame(SourceDtype::F16, &one_f16, heads, bs, d, &[4]).unwrap();
        assert_eq!(q[0], 0x7e);
    }
}
