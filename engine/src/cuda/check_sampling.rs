//! GPU tests (`--ignored`) of structured output and log probabilities on the
//! device ([`masked_sampling`](super::masked_sampling)) against the host path
//! on the same logits: masked greedy picks the host's token, a masked draw
//! only picks tokens the mask allows, and the device's log probabilities
//! (chosen token and top-N) match [`TokenLogprobs::of`] to 1e-4.

#[cfg(test)]
mod tests {
    use rand::{Rng, SeedableRng};
    use rand_chacha::ChaCha8Rng;

    use crate::config::ModelConfig;
    use crate::cuda::device::Gpu;
    use crate::cuda::launch::Dev;
    use crate::cuda::masked_sampling::{RowDraw, sample_rows_masked};
    use crate::cuda::model::named_config;
    use crate::sampling::{MAX_TOP_LOGPROBS, SamplingParams, TokenDraw, TokenLogprobs, argmax};

    /// Not a multiple of 32: the last mask word is partial.
    const VOCAB: usize = 49_157;

    fn gpu() -> Gpu {
        let config = ModelConfig {
            vocab_size: VOCAB,
            ..named_config("tiny", None).unwrap()
        };
        Gpu::open(0, &config).expect("a CUDA GPU")
    }

    /// A random mask allowing about one token in `one_in`, and at least one.
    fn mask(rng: &mut ChaCha8Rng, one_in: u32) -> Vec<u32> {
        let mut bits = vec![0u32; VOCAB.div_ceil(32)];
        for t in 0..VOCAB {
            if rng.random_range(0..one_in) == 0 {
                bits[t / 32] |= 1 << (t % 32);
            }
        }
        bits[0] |= 1;
        bits
    }

    /// The host's masking: -inf where the bit is clear.
    fn masked(row: &[f32], bits: Option<&[u32]>) -> Vec<f32> {
        row.iter()
            .enumerate()
            .map(|(t, &l)| match bits {
                Some(b) if (b[t / 32] >> (t % 32)) & 1 == 0 => f32::NEG_INFINITY,
                _ => l,
            })
            .collect()
    }

    #[test]
    #[ignore = "needs an NVIDIA GPU: cargo test -p tandem-engine --features cuda --lib cuda::check -- --ignored"]
    fn gpu_mask_sample_and_logprobs_match_the_host() {
        let gpu = gpu();
        let mut rng = ChaCha8Rng::seed_from_u64(5);
        let rows = 8;
        let logits: Vec<f32> = (0..rows * VOCAB)
            .map(|_| rng.random_range(-8.0f32..8.0))
            .collect();
        let masks: Vec<Option<Vec<u32>>> = (0..rows)
            .map(|r| (r % 4 != 3).then(|| mask(&mut rng, [2, 50, 5000][r % 3])))
            .collect();
        for temperature in [0.0f32, 0.7, 1.0] {
            let draws: Vec<TokenDraw> = (0..rows)
                .map(|r| {
                    let params = SamplingParams {
                        temperature,
                        top_k: if r % 2 == 0 { 0 } else { 40 },
                        top_p: if r % 3 == 0 { 0.9 } else { 1.0 },
                        ..Default::default()
                    };
                    TokenDraw::new(&params, rng.random())
                })
                .collect();
            let asks: Vec<RowDraw<'_>> = (0..rows)
                .map(|r| RowDraw {
                    draw: draws[r],
                    mask: masks[r].as_deref(),
                    logprobs: Some([0, 5, MAX_TOP_LOGPROBS][r % 3]),
                })
                .collect();
            let dev = gpu.upload(&logits).unwrap();
            // SAFETY: `dev` holds `rows` rows of VOCAB f32, uploaded on the compute stream.
            let got =
                unsafe { sample_rows_masked(&gpu, Dev::of(&dev, &gpu.compute), VOCAB, &asks) }
                    .unwrap();
            for (r, (token, lp)) in got.into_iter().enumerate() {
                let row = masked(&logits[r * VOCAB..][..VOCAB], masks[r].as_deref());
                let dist = draws[r].distribution(&row);
                assert!(
                    dist[token as usize] > 0.0,
                    "row {r} T {temperature}: {token}"
                );
                if temperature == 0.0 {
                    assert_eq!(token, argmax(&row), "row {r}");
                }
                let want = TokenLogprobs::of(&row, temperature, token, asks[r].logprobs.unwrap());
                let lp = lp.expect("asked for logprobs");
                assert_eq!(lp.token, token);
                assert!(
                    (lp.logprob - want.logprob).abs() < 1e-4,
                    "row {r}: {} vs {}",
                    lp.logprob,
                    want.logprob
                );
                assert_eq!(lp.top.len(), want.top.len(), "row {r}");
                for (g, w) in lp.top.iter().zip(&want.top) {
                    assert_eq!(g.0, w.0, "row {r}");
                    // Masked tokens rank too when fewer are allowed than asked: -inf on both sides.
                    assert!(
                        g.1 == w.1 || (g.1 - w.1).abs() < 1e-4,
                        "row {r}: {g:?} vs {w:?}"
                    );
                }
            }
        }
    }

    #[test]
    #[ignore = "needs an NVIDIA GPU: cargo test -p tandem-engine --features cuda --lib cuda::check -- --ignored"]
    fn gpu_mask_with_one_allowed_token_forces_it() {
        let gpu = gpu();
        let mut bits = vec![0u32; VOCAB.div_ceil(32)];
        let only = VOCAB - 1;
        bits[only / 32] |= 1 << (only % 32);
        let logits: Vec<f32> = (0..VOCAB).map(|t| (t % 97) as f32).collect();
        let dev = gpu.upload(&logits).unwrap();
        for temperature in [0.0f32, 1.5] {
            let params = SamplingParams {
                temperature,
                ..Default::default()
            };
            let ask = [RowDraw {
                draw: TokenDraw::new(&params, 0.99),
                mask: Some(&bits),
                logprobs: Some(3),
            }];
            // SAFETY: `dev` holds one row of VOCAB f32.
            let got = unsafe { sample_rows_masked(&gpu, Dev::of(&dev, &gpu.compute), VOCAB, &ask) }
                .unwrap();
            let (token, lp) = &got[0];
            assert_eq!(*token as usize, only);
            let lp = lp.as_ref().unwrap();
            // log(1), through the device's f32 max and sum of exponentials.
            assert!(lp.logprob.abs() < 1e-5, "{}", lp.logprob);
            assert_eq!(lp.top[0], (only as u32, lp.logprob));
            // The rest are -inf, lowest ids first.
            assert_eq!(lp.top[1], (0, f32::NEG_INFINITY));
            assert_eq!(lp.top[2], (1, f32::NEG_INFINITY));
        }
    }

    /// A whole step through the backend: `start_step`, then `finish_step`
    /// with a plain row, a masked row, a logits row and a logprobs row,
    /// against the logits `forward_logits` gives for the same chunks.
    #[test]
    #[ignore = "needs an NVIDIA GPU: cargo test -p tandem-engine --features cuda --lib cuda::check -- --ignored"]
    fn gpu_step_rows_come_back_as_asked() {
        use crate::backend::{Backend, BackendExt, SeqChunk};
        use crate::cuda::{BenchControls, CudaBackend, CudaLimits, GpuModel};
        use crate::row_sampling::{RowAsk, RowOut};

        let config = named_config("tiny", None).unwrap();
        let vocab = config.vocab_size;
        let gpu = Gpu::open(0, &config).expect("a CUDA GPU");
        let model = GpuModel::random(&gpu, &config, 7).unwrap();
        let mut be = CudaBackend::new(gpu, model.into(), 64, 16, CudaLimits::default()).unwrap();
        be.fill_cache_random(3).unwrap();
        let tables: Vec<Vec<u32>> = (0..4u32).map(|s| vec![2 * s, 2 * s + 1]).collect();
        let toks = [[5u32], [17], [29], [3]];
        let chunks: Vec<SeqChunk<'_>> = toks
            .iter()
            .zip(&tables)
            .map(|(t, table)| SeqChunk {
                tokens: t,
                start: 20,
                block_table: table,
            })
            .collect();
        let logits = be.forward_logits(&chunks, None).unwrap();
        // Allow every third token, but not row 1's own best.
        let best1 = argmax(&logits[1]);
        let mut bits = vec![0u32; vocab.div_ceil(32)];
        for t in (0..vocab).step_by(3).filter(|&t| t as u32 != best1) {
            bits[t / 32] |= 1 << (t % 32);
        }
        let asks = [
            RowAsk::default(),
            RowAsk {
                mask: Some(&bits),
                ..Default::default()
            },
            RowAsk {
                logits: true,
                ..Default::default()
            },
            RowAsk {
                logprobs: Some(3),
                ..Default::default()
            },
        ];
        for _ in 0..2 {
            // Twice: the first decode step of a bucket captures its graph, the second replays it.
            be.start_step(&chunks, &[TokenDraw::GREEDY; 4], None)
                .unwrap();
            // The step is done on the device within a second (it is tiny), and
            // step_running says so without waiting for it.
            let queued = std::time::Instant::now();
            while be.step_running() {
                assert!(
                    queued.elapsed().as_secs() < 1,
                    "step_running never turns false"
                );
                std::hint::spin_loop();
            }
            let out = be.finish_step(&asks).unwrap();
            assert!(!be.step_running(), "no step in flight after finish_step");
            assert_eq!(
                out[0],
                RowOut::Token {
                    token: argmax(&logits[0]),
                    logprobs: None
                }
            );
            let RowOut::Token { token, .. } = out[1] else {
                panic!("{:?}", out[1])
            };
            assert_eq!(token, argmax(&masked(&logits[1], Some(&bits))));
            assert_ne!(token, best1);
            let RowOut::Logits(l) = &out[2] else {
                panic!("logits asked for")
            };
            let diff = l
                .iter()
                .zip(&logits[2])
                .map(|(a, b)| (a - b).abs())
                .fold(0f32, f32::max);
            assert!(diff < 1e-3, "logits row differs by {diff}");
            let RowOut::Token {
                token,
                logprobs: Some(lp),
            } = &out[3]
            else {
                panic!("{:?}", out[3])
            };
            let want = TokenLogprobs::of(&logits[3], 0.0, *token, 3);
            assert_eq!(*token, argmax(&logits[3]));
            assert!(
                (lp.logprob - want.logprob).abs() < 1e-3,
                "{lp:?} vs {want:?}"
            );
            assert_eq!(
                lp.top.iter().map(|t| t.0).collect::<Vec<_>>(),
                want.top.iter().map(|t| t.0).collect::<Vec<_>>()
            );
        }
        // A step asked for with the wrong number of rows or a short mask is
        // refused, and the next step is served.
        be.start_step(&chunks, &[TokenDraw::GREEDY; 4], None)
            .unwrap();
        assert!(be.finish_step(&asks[..2]).is_err());
        assert!(be.finish_step(&asks).is_err(), "the refused step is gone");
        let ids = be.forward_greedy(&chunks, None).unwrap();
        assert_eq!(ids[0], argmax(&logits[0]));
    }

    /// Prompt log probabilities' logits on the device: every row of
    /// `forward_every_logit` (split into passes of `max_seqs` tokens) against
    /// the same prompt prefilled then decoded token by token in another
    /// sequence of the same backend, and the cache it wrote against a
    /// prefill's (the next token's logits).
    #[test]
    #[ignore = "needs an NVIDIA GPU: cargo test -p tandem-engine --features cuda --lib cuda::check -- --ignored"]
    fn gpu_every_logit_rows_are_each_prefix_s_last() {
        use crate::backend::{Backend, BackendExt, SeqChunk};
        use crate::cuda::{CudaBackend, CudaLimits, GpuModel};

        let config = named_config("tiny", None).unwrap();
        let gpu = Gpu::open(0, &config).expect("a CUDA GPU");
        let model = GpuModel::random(&gpu, &config, 11).unwrap();
        let limits = CudaLimits {
            max_tokens: 256,
            max_seqs: 16,
            ..CudaLimits::default()
        };
        let mut be = CudaBackend::new(gpu, model.into(), 64, 16, limits).unwrap();
        let prompt: Vec<u32> = (0..45u32).map(|i| (i * 37 + 11) % 500).collect();
        let (scored, forced): (Vec<u32>, Vec<u32>) = ((0..4).collect(), (4..8).collect());
        // Two pieces: the first 20 tokens, then the rest (3 passes of <= 16).
        let mut every = be
            .forward_every_logit(&SeqChunk {
                tokens: &prompt[..20],
                start: 0,
                block_table: &scored,
            })
            .unwrap();
        every.extend(
            be.forward_every_logit(&SeqChunk {
                tokens: &prompt[20..],
                start: 20,
                block_table: &scored,
            })
            .unwrap(),
        );
        assert_eq!(every.len(), prompt.len());
        let mut want = vec![be.prefill(&prompt[..10], 0, &forced).unwrap()];
        for (pos, &t) in prompt.iter().enumerate().skip(10) {
            want.extend(be.decode(&[(t, pos, &forced[..])]).unwrap());
        }
        let diff = |a: &[f32], b: &[f32]| {
            a.iter()
                .zip(b)
                .map(|(x, y)| (x - y).abs())
                .fold(0f32, f32::max)
        };
        let scale = want.iter().flatten().fold(0f32, |m, x| m.max(x.abs()));
        for (i, w) in want.iter().take(prompt.len() - 9).enumerate() {
            let d = diff(&every[9 + i], w);
            // bf16 activations: the prefill and decode kernels round differently.
            assert!(
                d <= 0.05 * scale.max(1.0),
                "position {}: {d} (max |logit| {scale})",
                9 + i
            );
            // The same best token, or a near tie of the two.
            let (got, best) = (argmax(&every[9 + i]) as usize, argmax(w) as usize);
            assert!(got == best || w[best] - w[got] <= 0.02 * scale.max(1.0));
        }
        // The cache holds the prompt's K/V: the next token's logits agree.
        let next = |be: &mut CudaBackend, table: &[u32]| {
            be.decode(&[(7, prompt.len(), table)]).unwrap().remove(0)
        };
        let (a, b) = (next(&mut be, &scored), next(&mut be, &forced));
        assert!(diff(&a, &b) <= 0.05 * scale.max(1.0));
    }
}
