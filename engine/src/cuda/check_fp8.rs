//! GPU test (`--ignored`) of the fp8 (e4m3) KV cache store: `kv_fp8_store`
//! (kernels/kv_fp8.cu) against the CPU reference
//! [`kv_quant::write_token`](crate::kv_quant::write_token), byte for byte and
//! scale for scale, over prefill chunks that start and end inside blocks (so
//! later tokens raise a partial block's scale and requantize its earlier
//! slots) and one-token decode steps.
//!
//! The store is not wired into the forward pass yet (docs/FP8_KV.md, "CUDA");
//! this checks the kernel and its typed launch on their own.

#[cfg(test)]
mod tests {
    use rand::{Rng, SeedableRng};
    use rand_chacha::ChaCha8Rng;

    use crate::cuda::device::Gpu;
    use crate::cuda::launch::{Dev, KvFp8Store, fp8_store_runs, launch};
    use crate::cuda::model::named_config;
    use crate::kv_quant::{HeadRun, write_token};

    const HKV: usize = 2;
    const HD: usize = 64;
    const BS: usize = 16;
    const BLOCKS: usize = 6;
    const BLOCK_BYTES: usize = 2 * HKV * BS * HD;

    /// One sequence's tokens in a pass: its slot of a position, and the positions.
    type Part<'a> = (&'a dyn Fn(usize) -> i32, usize, usize);

    /// The CPU reference: `kv` (`[n, 2, HKV, HD]`) stored token by token at `slots`.
    fn store_cpu(kv: &[f32], slots: &[i32], cache: &mut [u8], scales: &mut [f32]) {
        for (t, &slot) in slots.iter().enumerate() {
            let (blk, s) = (slot as usize / BS, slot as usize % BS);
            for kh in 0..2 * HKV {
                let off = blk * BLOCK_BYTES + kh * BS * HD;
                let values = &kv[(t * 2 * HKV + kh) * HD..][..HD];
                write_token(
                    HeadRun {
                        bytes: &mut cache[off..off + BS * HD],
                        scale: &mut scales[blk * 2 * HKV + kh],
                    },
                    s,
                    values,
                );
            }
        }
    }

    /// Tokens' K/V whose magnitude grows with position (so a block's scale
    /// keeps rising), with an all-zero token and an out-of-range one mixed in.
    fn values(rng: &mut ChaCha8Rng, first_pos: usize, n: usize) -> Vec<f32> {
        let mut kv = Vec::with_capacity(n * 2 * HKV * HD);
        for t in 0..n {
            let pos = first_pos + t;
            let amp = 0.01 + pos as f32 * 0.4;
            for _ in 0..2 * HKV * HD {
                kv.push(match pos {
                    5 => 0.0,
                    17 => rng.random_range(-1000.0f32..1000.0),
                    _ => rng.random_range(-amp..amp),
                });
            }
        }
        kv
    }

    #[test]
    #[ignore = "needs an NVIDIA GPU: cargo test -p tandem-engine --features cuda --lib cuda::check_fp8 -- --ignored"]
    fn gpu_kv_fp8_store_matches_kv_quant_bit_for_bit() {
        let gpu = Gpu::open(0, &named_config("tiny", None).unwrap()).expect("a CUDA GPU");
        let mut rng = ChaCha8Rng::seed_from_u64(8);
        // Sequence A on blocks 3, 1 (positions 0..30); sequence B on block 5.
        let slot_a = |p: usize| ([3, 1][p / BS] * BS + p % BS) as i32;
        let slot_b = |p: usize| (5 * BS + p % BS) as i32;
        // Passes: prefill A 0..13 with B 0..4, prefill A 13..27 (crosses into
        // block 1), then three decode steps of A and B together.
        let mut passes: Vec<(Vec<i32>, Vec<f32>)> = Vec::new();
        let mut pass = |parts: &[Part<'_>], rng: &mut ChaCha8Rng| {
            let (mut slots, mut kv) = (Vec::new(), Vec::new());
            for &(slot, from, to) in parts {
                slots.extend((from..to).map(slot));
                kv.extend(values(rng, from, to - from));
            }
            passes.push((slots, kv));
        };
        pass(&[(&slot_a, 0, 13), (&slot_b, 0, 4)], &mut rng);
        pass(&[(&slot_a, 13, 27)], &mut rng);
        for p in 0..3 {
            pass(
                &[(&slot_a, 27 + p, 28 + p), (&slot_b, 4 + p, 5 + p)],
                &mut rng,
            );
        }

        let mut want = vec![0u8; BLOCKS * BLOCK_BYTES];
        let mut want_scales = vec![0f32; BLOCKS * 2 * HKV];
        let cache = gpu.zeros::<u8>(BLOCKS * BLOCK_BYTES).unwrap();
        let scales = gpu.zeros::<f32>(BLOCKS * 2 * HKV).unwrap();
        for (i, (slots, kv)) in passes.iter().enumerate() {
            store_cpu(kv, slots, &mut want, &mut want_scales);
            let runs = fp8_store_runs(slots, BS);
            let d_kv = gpu.upload(kv).unwrap();
            let d_runs = gpu.upload(&runs).unwrap();
            let d_slots = gpu.upload(slots).unwrap();
            let k = KvFp8Store {
                runs: runs.len() - 1,
                kv: Dev::of(&d_kv, &gpu.compute),
                run_starts: Dev::of(&d_runs, &gpu.compute),
                slots: Dev::of(&d_slots, &gpu.compute),
                cache: Dev::of(&cache, &gpu.compute),
                scales: Dev::of(&scales, &gpu.compute),
                hkv: HKV,
                hd: HD,
                block_size: BS,
            };
            // SAFETY: the buffers above hold what `KvFp8Store` documents
            // (`kv` `slots.len()` tokens, `runs` from `fp8_store_runs`, slots
            // below BLOCKS * BS); the uploads are on the compute stream.
            unsafe { launch(&gpu, &k, false) }.unwrap();
            let mut got = vec![0u8; want.len()];
            let mut got_scales = vec![0f32; want_scales.len()];
            gpu.download(Dev::of(&cache, &gpu.compute).addr(), &mut got)
                .unwrap();
            gpu.download(Dev::of(&scales, &gpu.compute).addr(), &mut got_scales)
                .unwrap();
            for (j, (g, w)) in got_scales.iter().zip(&want_scales).enumerate() {
                assert_eq!(g.to_bits(), w.to_bits(), "pass {i}: scale {j}: {g} vs {w}");
            }
            let diff = got.iter().zip(&want).position(|(g, w)| g != w);
            assert_eq!(diff, None, "pass {i}: first differing cache byte");
        }
    }
}
