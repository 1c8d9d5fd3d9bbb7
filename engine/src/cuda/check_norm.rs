//! GPU test (`--ignored`) of the RMSNorm kernels (kernels/elementwise.cu)
//! against the host, at the row counts that take each: a decode step's few rows
//! (`add_rmsnorm`, blocks of 1024 threads, the row read twice) and a prefill
//! pass's many (`add_rmsnorm_rows`, blocks of a sixteenth of the width, the row
//! held in registers; [`norm_threads`](crate::cuda::launch::norm_threads)), with
//! and without a delta to add and a row map, at the widths of SmolLM2 (576),
//! Llama-3-8B (4096) and a 70B (8192).

#[cfg(test)]
mod tests {
    use half::bf16;
    use rand::{Rng, SeedableRng};
    use rand_chacha::ChaCha8Rng;

    use crate::cuda::device::Gpu;
    use crate::cuda::launch::{AddRmsnorm, Dev, NORM_MANY_ROWS, launch};
    use crate::cuda::model::named_config;

    /// The host's `add_rmsnorm`: `x[s] += delta[s]`, `out[r] = rmsnorm(x[s]) · w`.
    fn host(
        x: &mut [f32],
        delta: Option<&[f32]>,
        map: Option<&[i32]>,
        w: &[bf16],
        rows: usize,
        eps: f32,
    ) -> Vec<f32> {
        let h = w.len();
        let mut out = vec![0f32; rows * h];
        for r in 0..rows {
            let s = map.map_or(r, |m| m[r] as usize);
            let row = &mut x[s * h..(s + 1) * h];
            if let Some(d) = delta {
                for (v, d) in row.iter_mut().zip(&d[s * h..(s + 1) * h]) {
                    *v += d;
                }
            }
            let ss: f64 = row.iter().map(|&v| (v as f64) * (v as f64)).sum();
            let inv = 1.0 / ((ss / h as f64) as f32 + eps).sqrt();
            for ((o, &v), w) in out[r * h..(r + 1) * h].iter_mut().zip(row.iter()).zip(w) {
                *o = v * inv * w.to_f32();
            }
        }
        out
    }

    #[test]
    #[ignore = "needs an NVIDIA GPU: cargo test -p tandem-engine --features cuda --lib cuda::check_norm -- --ignored"]
    fn gpu_rmsnorm_matches_the_host_at_decode_and_prefill_row_counts() {
        let gpu = Gpu::open(0, &named_config("tiny", None).unwrap()).expect("a CUDA GPU");
        let mut rng = ChaCha8Rng::seed_from_u64(5);
        let eps = 1e-5f32;
        for hidden in [576usize, 4096, 8192] {
            for rows in [1usize, 7, 256, NORM_MANY_ROWS, 2000] {
                for (with_delta, with_map) in [(false, false), (true, false), (true, true)] {
                    let what =
                        format!("hidden {hidden}, rows {rows}, delta {with_delta}, map {with_map}");
                    // Sources: one more than the rows.
                    let sources = rows + 1;
                    let mut x: Vec<f32> = (0..sources * hidden)
                        .map(|_| rng.random_range(-3.0f32..3.0))
                        .collect();
                    let delta: Vec<f32> = (0..sources * hidden)
                        .map(|_| rng.random_range(-1.0f32..1.0))
                        .collect();
                    // Rows in reverse, source 0 left out: one-to-one, so each
                    // row's delta is added once.
                    let map: Vec<i32> = (0..rows).map(|r| (sources - 1 - r) as i32).collect();
                    let w: Vec<bf16> = (0..hidden)
                        .map(|_| bf16::from_f32(rng.random_range(0.5f32..1.5)))
                        .collect();
                    let d_x = gpu.upload(&x).unwrap();
                    let d_delta = gpu.upload(&delta).unwrap();
                    let d_map = gpu.upload(&map).unwrap();
                    let d_w = gpu.upload(&w).unwrap();
                    let d_out = gpu.zeros::<bf16>(rows * hidden).unwrap();
                    let st = &gpu.compute;
                    let k = AddRmsnorm {
                        rows,
                        x: Dev::of(&d_x, st),
                        delta: if with_delta {
                            Dev::of(&d_delta, st)
                        } else {
                            Dev::NULL
                        },
                        rows_map: if with_map {
                            Dev::of(&d_map, st)
                        } else {
                            Dev::NULL
                        },
                        w: Dev::of(&d_w, st),
                        out: Dev::of(&d_out, st),
                        hidden,
                        eps,
                    };
                    // SAFETY: `x` and `delta` hold `sources` rows of `hidden`, the map
                    // `rows` indices below `sources`, `out` `rows` rows; the uploads are
                    // on the compute stream.
                    unsafe { launch(&gpu, &k, false) }.unwrap();
                    let mut got = vec![bf16::ZERO; rows * hidden];
                    gpu.download(Dev::of(&d_out, st).addr(), &mut got).unwrap();
                    let mut got_x = vec![0f32; sources * hidden];
                    gpu.download(Dev::of(&d_x, st).addr(), &mut got_x).unwrap();
                    let want = host(
                        &mut x,
                        with_delta.then_some(&delta[..]),
                        with_map.then_some(&map[..]),
                        &w,
                        rows,
                        eps,
                    );
                    // The residual stream: the delta added exactly (one f32 add).
                    let bad_x = got_x
                        .iter()
                        .zip(&x)
                        .position(|(g, w)| g.to_bits() != w.to_bits());
                    assert_eq!(bad_x, None, "{what}: first residual value that differs");
                    // The output: bf16 of a value within f32 rounding of the host's.
                    for (i, (g, w)) in got.iter().zip(&want).enumerate() {
                        let g = g.to_f32();
                        assert!(
                            (g - w).abs() <= 1e-2 * w.abs().max(1e-3),
                            "{what}: out[{}][{}] = {g}, host {w}",
                            i / hidden,
                            i % hidden
                        );
                    }
                }
            }
        }
    }
}
