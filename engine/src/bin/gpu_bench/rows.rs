//! `tandem-gpu-bench rows`: what a decode step costs when some of its rows ask
//! for more than a token: a grammar mask, log probabilities (both applied and
//! computed on the device by `finish_step`), against a step of plain rows and
//! against the host path (every row's logits downloaded, chosen on the host),
//! which is what a constrained or logprobs request cost before the device did it;
//! and what the draw itself costs (greedy, temperature, top-k with top-p), each
//! a different number of passes of `sample_rows` over every row's logits.

use std::time::Instant;

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use tandem_engine::backend::{Backend, BackendExt, SeqChunk};
use tandem_engine::block_manager::blocks_for;
use tandem_engine::cuda::bench::named_config;
use tandem_engine::cuda::{BenchControls, CudaBackend, CudaLimits, Gpu, GpuModel};
use tandem_engine::{RowAsk, RowOut, TokenDraw};

use super::speed::consecutive_tables;
use super::{BENCH_BS, Res, arg, median};

/// How a step's rows are asked for.
#[derive(Clone, Copy, PartialEq)]
enum Kind {
    Plain,
    Greedy,
    TopKTopP,
    OneMasked,
    OneMaskedLogprobs,
    AllLogprobs,
    AllTop20,
    HostLogits,
}

const KINDS: [(Kind, &str); 8] = [
    (Kind::Plain, "every row plain (ids only)"),
    (Kind::Greedy, "every row plain, greedy"),
    (Kind::TopKTopP, "every row plain, top-k 50 and top-p 0.9"),
    (Kind::OneMasked, "1 row with a grammar mask"),
    (
        Kind::OneMaskedLogprobs,
        "1 row with a mask and top-5 logprobs",
    ),
    (Kind::AllLogprobs, "every row top-5 logprobs"),
    (Kind::AllTop20, "every row top-20 logprobs"),
    (
        Kind::HostLogits,
        "host path: every row's logits to the host, chosen there",
    ),
];

/// Decode step times (median of 3 rounds × 10 steps, the kinds round-robin)
/// at batch 1, 8 and 64, 1k context, sampling at temperature 0.7 unless the
/// kind says otherwise.
pub(crate) fn rows(args: &[String]) -> Res<()> {
    let shape = arg(args, "--shape").unwrap_or_else(|| "llama3-8b".into());
    let layers = arg(args, "--layers").map(|l| l.parse()).transpose()?;
    let config = named_config(&shape, layers)?;
    let vocab = config.vocab_size;
    let gpu = Gpu::open(0, &config)?;
    let model = GpuModel::random(&gpu, &config, 1)?;
    let ctx = 1024;
    let per_seq = blocks_for(ctx + 64, BENCH_BS);
    let mut be = CudaBackend::new(
        gpu,
        model.into(),
        64 * per_seq + 8,
        BENCH_BS,
        CudaLimits::default(),
    )?;
    be.fill_cache_random(3)?;
    // A mask allowing one token in 16, scattered (a grammar allows few).
    let mut rng = ChaCha8Rng::seed_from_u64(5);
    let mut bits = vec![0u32; vocab.div_ceil(32)];
    for t in 0..vocab {
        if rng.random::<u32>() % 16 == 0 {
            bits[t / 32] |= 1 << (t % 32);
        }
    }
    println!(
        "## decode step with rows asking for more ({shape}, {} layers, {ctx} context, T 0.7)\n",
        config.num_layers
    );
    println!("| batch | rows | step ms | ÷ plain |");
    println!("|---|---|---|---|");
    let mut outside = 0usize;
    for batch in [1usize, 8, 64] {
        let tables = consecutive_tables(batch, per_seq);
        let mut times: Vec<Vec<f64>> = vec![Vec::new(); KINDS.len()];
        let mut step = 0;
        for _round in 0..3 {
            for (k, &(kind, _)) in KINDS.iter().enumerate() {
                for i in 0..13 {
                    let toks: Vec<[u32; 1]> = (0..batch)
                        .map(|b| [(b * 31 + step) as u32 % 1000])
                        .collect();
                    let chunks: Vec<SeqChunk<'_>> = toks
                        .iter()
                        .zip(&tables)
                        .map(|(t, table)| SeqChunk {
                            tokens: t,
                            start: ctx + (step % 40),
                            block_table: table,
                        })
                        .collect();
                    step += 1;
                    let draws: Vec<TokenDraw> = (0..batch)
                        .map(|_| match kind {
                            Kind::Greedy => TokenDraw::GREEDY,
                            _ => TokenDraw {
                                temperature: 0.7,
                                top_k: if kind == Kind::TopKTopP { 50 } else { 0 },
                                top_p: if kind == Kind::TopKTopP { 0.9 } else { 1.0 },
                                min_p: 0.0,
                                u01: rng.random(),
                            },
                        })
                        .collect();
                    let asks: Vec<RowAsk<'_>> = (0..batch)
                        .map(|r| match kind {
                            Kind::OneMasked if r == 0 => RowAsk {
                                mask: Some(&bits),
                                ..Default::default()
                            },
                            Kind::OneMaskedLogprobs if r == 0 => RowAsk {
                                mask: Some(&bits),
                                logprobs: Some(5),
                                logits: false,
                            },
                            Kind::AllLogprobs => RowAsk {
                                logprobs: Some(5),
                                ..Default::default()
                            },
                            Kind::AllTop20 => RowAsk {
                                logprobs: Some(20),
                                ..Default::default()
                            },
                            _ => RowAsk::default(),
                        })
                        .collect();
                    let t0 = Instant::now();
                    if kind == Kind::HostLogits {
                        let logits = be.forward_logits(&chunks, None)?;
                        let ids: Vec<u32> = logits
                            .iter()
                            .zip(&draws)
                            .map(|(l, d)| d.choose(l))
                            .collect();
                        std::hint::black_box(ids);
                    } else {
                        be.start_step(&chunks, &draws, None)?;
                        let out = be.finish_step(&asks)?;
                        if let (Some(RowOut::Token { token, .. }), true) =
                            (out.first(), asks[0].mask.is_some())
                        {
                            let t = *token as usize;
                            if (bits[t / 32] >> (t % 32)) & 1 == 0 {
                                outside += 1;
                            }
                        }
                    }
                    if i >= 3 {
                        times[k].push(t0.elapsed().as_secs_f64());
                    }
                }
            }
        }
        let plain = median(times[0].clone());
        for ((_, name), t) in KINDS.iter().zip(times) {
            let t = median(t);
            println!("| {batch} | {name} | {:.3} | {:.3} |", t * 1e3, t / plain);
        }
    }
    println!();
    if outside > 0 {
        return Err(format!("{outside} masked rows drew a token the mask does not allow").into());
    }
    println!("Every masked row drew an allowed token.\n");
    Ok(())
}
