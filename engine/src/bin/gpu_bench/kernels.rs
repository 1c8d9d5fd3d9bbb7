//! `tandem-gpu-bench kernels`: where a decode step's time goes.

use std::time::Instant;

use tandem_engine::TokenDraw;
use tandem_engine::backend::SeqChunk;
use tandem_engine::block_manager::blocks_for;
use tandem_engine::config::ModelConfig;
use tandem_engine::cuda::bench::named_config;
use tandem_engine::cuda::{BenchControls, CudaBackend, CudaLimits, Gpu, GpuModel};

use super::speed::{consecutive_tables, tables_of, time_decode, time_decode_at};
use super::{Res, arg, block_size_arg, median, usize_list};

/// Where a decode step's time goes: each weight product alone (as the `gemv`
/// kernel at batch 1 and cuBLAS at batch 64 and 256) against the copy bandwidth, and the
/// cost of one decoder layer (steps of a 4-layer model minus a 0-layer one).
///
/// With `--decode-blocks N,N,..` it only times decode attention's split: the
/// 4-layer model's kernels and step at b256 1k and b64 4k (`--decode-shapes
/// CTX:BATCH,..` for others; `CTX:N+CTX:N` a batch of mixed lengths), as the
/// backend splits them and aiming at each N blocks; `--decode-splits S,S,..`
/// aims at S splits a sequence instead.
pub(crate) fn kernels(args: &[String]) -> Res<()> {
    let shape = arg(args, "--shape").unwrap_or_else(|| "llama3-8b".into());
    let config = named_config(&shape, Some(4))?;
    let bs = block_size_arg(args)?;
    let aims: Option<Vec<Aim>> = match (
        usize_list(args, "--decode-blocks")?,
        usize_list(args, "--decode-splits")?,
    ) {
        (Some(_), Some(_)) => return Err("--decode-blocks or --decode-splits, not both".into()),
        (Some(b), None) => Some(b.into_iter().map(Aim::Blocks).collect()),
        (None, Some(s)) => Some(s.into_iter().map(Aim::Splits).collect()),
        (None, None) => None,
    };
    if let Some(aims) = aims {
        // A shape is a batch: CTX:BATCH, or sequences of several contexts
        // (CTX:N+CTX:N, e.g. 4096:63+32768:1).
        let shapes: Vec<Vec<(usize, usize)>> = match arg(args, "--decode-shapes") {
            None => vec![vec![(1024, 256)], vec![(4096, 64)]],
            Some(list) => list
                .split(',')
                .map(|shape| {
                    shape
                        .split('+')
                        .map(|group| {
                            let (c, n) = group.trim().split_once(':').ok_or("CTX:BATCH")?;
                            Ok((c.parse()?, n.parse()?))
                        })
                        .collect::<Res<Vec<(usize, usize)>>>()
                })
                .collect::<Res<Vec<_>>>()
                .map_err(|e| format!("--decode-shapes {list}: {e}"))?,
        };
        return decode_blocks_sweep(&config, bs, &shapes, &aims);
    }
    let gpu = Gpu::open(0, &config)?;
    let bw = gpu.copy_bandwidth_gbs(2 << 30)?;
    let (h, inter) = (config.hidden_size, config.intermediate_size);
    let qkvw = (config.num_heads + 2 * config.num_kv_heads) * config.head_dim;
    println!(
        "## where a decode step's time goes ({shape}, {})\n",
        gpu.name()
    );
    println!("Copy bandwidth {bw:.0} GB/s.\n");
    println!("| product (out × in) | rows | µs | weight GB/s | of copy bandwidth | TFLOP/s |");
    println!("|---|---|---|---|---|---|");
    for (name, out, k) in products(&config) {
        let mut w = gpu.zeros::<half::bf16>(out * k)?;
        let mut x = gpu.zeros::<half::bf16>(256 * k)?;
        let mut y = gpu.zeros::<f32>(256 * out)?;
        gpu.fill_uniform_slice(&mut w, 3, -0.05, 0.05)?;
        gpu.fill_uniform_slice(&mut x, 4, -1.0, 1.0)?;
        for rows in [1usize, 64, 256] {
            let mut times = Vec::new();
            for i in 0..25 {
                gpu.sync()?;
                let t0 = Instant::now();
                for _ in 0..10 {
                    gpu.gemm_f32(&x, &w, &mut y, rows, k, out)?;
                }
                gpu.sync()?;
                if i >= 5 {
                    times.push(t0.elapsed().as_secs_f64() / 10.0);
                }
            }
            let t = median(times);
            let gbs = (out * k * 2) as f64 / t / 1e9;
            println!(
                "| {name} ({out} × {k}) | {rows} | {:.1} | {gbs:.0} | {:.0}% | {:.0} |",
                t * 1e6,
                gbs / bw * 100.0,
                (2 * rows * out * k) as f64 / t / 1e12
            );
        }
    }
    println!();
    tuning_table(&gpu, &config)?;
    println!(
        "| layers | context | batch | step ms | per layer ms | layer bytes (weights + KV) GB/s | of copy bandwidth |"
    );
    println!("|---|---|---|---|---|---|---|");
    let mut steps = Vec::new();
    let mut profiles = Vec::new();
    let mut be_wave = 0;
    let mut prefill_profiles = Vec::new();
    for layers in [0usize, 4] {
        let c = named_config(&shape, Some(layers))?;
        let mut be = random_backend(&c, bs, blocks_for(32768, bs))?;
        for (ctx, batch) in [(1024usize, 1usize), (4096, 64), (1024, 256)] {
            let tables = consecutive_tables(batch, step_blocks(ctx, bs));
            let mut toks = vec![1u32; batch];
            let t = time_decode(&mut be, &tables, ctx, &mut toks, TokenDraw::GREEDY)?;
            steps.push((layers, ctx, batch, t));
        }
        if layers > 0 {
            be_wave = be.decode_wave();
            // Decode attention split as the backend chooses (None), or aiming at
            // 4096 blocks (the rule for every batch before 2026-12-02, and for
            // large ones until the twentieth session) for comparison.
            for (ctx, batch, blocks) in [
                (1024usize, 1usize, None),
                (1024, 1, Some(4096usize)),
                (4096, 1, None),
                (4096, 1, Some(4096)),
                (4096, 8, None),
                (4096, 8, Some(4096)),
                (4096, 32, None),
                (4096, 32, Some(4096)),
                (4096, 64, None),
                (4096, 64, Some(4096)),
                (1024, 256, None),
                (1024, 256, Some(4096)),
            ] {
                let (best, t) = profile_decode(&mut be, bs, &vec![ctx; batch], blocks)?;
                profiles.push((ctx, batch, layers, blocks, t, best));
            }
            be.set_decode_blocks(None);
            // Prefill chunks of a full pass: a prompt's first, and the last of a
            // 32k prompt (24k cached tokens before it). Attention is not in the
            // layer figures above; here it is beside the products it shares a pass with.
            let len = CudaLimits::default().max_tokens;
            for start in [0usize, 24576] {
                let table: Vec<u32> = (0..blocks_for(start + len, bs) as u32).collect();
                let prompt: Vec<u32> = (0..len as u32).map(|i| (i * 7919) % 1000).collect();
                let chunk = [SeqChunk {
                    tokens: &prompt,
                    start,
                    block_table: &table,
                }];
                let mut best: Vec<(&'static str, f64)> = be.profile(&chunk)?;
                for _ in 0..3 {
                    for (slot, (_, us)) in best.iter_mut().zip(be.profile(&chunk)?) {
                        slot.1 = slot.1.min(us);
                    }
                }
                prefill_profiles.push((start, len, layers, best));
            }
        }
    }
    let layer_weights =
        (qkvw * h + h * config.num_heads * config.head_dim + 3 * inter * h + 2 * h) * 2;
    for &(layers, ctx, batch, t) in &steps {
        let base = steps
            .iter()
            .find(|s| s.0 == 0 && s.1 == ctx && s.2 == batch)
            .map_or(0.0, |s| s.3);
        if layers == 0 {
            println!("| 0 | {ctx} | {batch} | {:.3} | | | |", t * 1e3);
            continue;
        }
        let per = (t - base) / layers as f64;
        let kv = batch * (ctx + 8) * config.kv_bytes_per_token_per_layer(2);
        let gbs = (layer_weights + kv) as f64 / per / 1e9;
        println!(
            "| {layers} | {ctx} | {batch} | {:.3} | {:.3} | {gbs:.0} | {:.0}% |",
            t * 1e3,
            per * 1e3,
            gbs / bw * 100.0
        );
    }
    println!();
    for (ctx, batch, layers, blocks, step, prof) in &profiles {
        let total: f64 = prof.iter().map(|p| p.1).sum();
        println!(
            "Kernel by kernel, an event after each launch (no graph, no PDL; each figure holds its launch gap): context {ctx}, batch {batch}, {layers} layers, decode attention blocks aimed at: {}: {total:.1} µs in all (graph replay of the step: {:.1} µs)\n",
            blocks.map_or(format!("the backend's rule (one wave = {be_wave})"), |b| b
                .to_string()),
            step * 1e6
        );
        profile_table(prof, *layers, "step");
    }
    for (start, len, layers, prof) in &prefill_profiles {
        let total: f64 = prof.iter().map(|p| p.1).sum();
        println!(
            "Kernel by kernel, a prefill chunk of {len} tokens after {start} cached, {layers} layers (events, no PDL; the fastest of 4): {total:.1} µs in all\n"
        );
        profile_table(prof, *layers, "pass");
    }
    Ok(())
}

/// A backend of `config` with random weights and a random cache of blocks of
/// `bs` tokens, enough for 256 sequences of 1k or 64 of 4k, and at least
/// `min_blocks` (a long prompt's).
fn random_backend(config: &ModelConfig, bs: usize, min_blocks: usize) -> Res<CudaBackend> {
    let g = Gpu::open(0, config)?;
    let model = GpuModel::random(&g, config, 1)?;
    let blocks = (256 * blocks_for(1024 + 20, bs))
        .max(64 * blocks_for(4096 + 20, bs))
        .max(min_blocks)
        + 8;
    let mut be = CudaBackend::new(g, model.into(), blocks, bs, CudaLimits::default())?;
    be.fill_cache_random(3)?;
    Ok(be)
}

/// Cache blocks of `bs` tokens a timed sequence at context `ctx` holds (its
/// steps' tokens included).
fn step_blocks(ctx: usize, bs: usize) -> usize {
    blocks_for(ctx + 20, bs)
}

/// A decode step of sequences at contexts `ctxs` with decode attention aiming
/// at `blocks` (`None`: the backend's rule): each kernel's fastest of 5 runs
/// after a warm-up (an event after each launch), and the graph-replayed step's
/// time.
fn profile_decode(
    be: &mut CudaBackend,
    bs: usize,
    ctxs: &[usize],
    blocks: Option<usize>,
) -> Res<(Vec<(&'static str, f64)>, f64)> {
    be.set_decode_blocks(blocks);
    let per_seq: Vec<usize> = ctxs.iter().map(|&ctx| step_blocks(ctx, bs)).collect();
    let tables = tables_of(&per_seq);
    let toks = vec![[1u32]; ctxs.len()];
    let chunks: Vec<SeqChunk<'_>> = toks
        .iter()
        .zip(&tables)
        .zip(ctxs)
        .map(|((t, table), &ctx)| SeqChunk {
            tokens: t,
            start: ctx,
            block_table: table,
        })
        .collect();
    let mut best: Vec<(&'static str, f64)> = be.profile(&chunks)?;
    for _ in 0..5 {
        for (slot, (_, us)) in best.iter_mut().zip(be.profile(&chunks)?) {
            slot.1 = slot.1.min(us);
        }
    }
    let mut toks = vec![1u32; ctxs.len()];
    let t = time_decode_at(be, &tables, ctxs, &mut toks, TokenDraw::GREEDY)?;
    Ok((best, t))
}

/// What a `kernels --decode-blocks` / `--decode-splits` sweep aims decode
/// attention at.
#[derive(Clone, Copy)]
enum Aim {
    /// About this many blocks.
    Blocks(usize),
    /// This many splits a sequence.
    Splits(usize),
}

/// `kernels --decode-blocks`: decode attention and its split merge (µs a layer)
/// and the graph-replayed 4-layer step for each batch of `shapes` (groups of
/// (context, sequences)), split by the backend's rule and as each of `aims`
/// asks, in turns: the rule, then each aim, three rounds.
fn decode_blocks_sweep(
    config: &ModelConfig,
    bs: usize,
    shapes: &[Vec<(usize, usize)>],
    aims: &[Aim],
) -> Res<()> {
    let most = shapes
        .iter()
        .map(|groups| {
            let blocks = groups.iter().map(|&(ctx, n)| n * step_blocks(ctx, bs));
            blocks.sum::<usize>()
        })
        .max()
        .unwrap_or(0);
    let mut be = random_backend(config, bs, most)?;
    let layers = config.num_layers;
    println!(
        "## decode attention's split ({}, {layers} layers; one wave = {} blocks)\n",
        be.gpu().name(),
        be.decode_wave()
    );
    println!(
        "| context | batch | blocks aimed at | round | decode_attn µs/layer | attn_combine µs/layer | both | step µs (graph) |"
    );
    println!("|---|---|---|---|---|---|---|---|");
    let aims: Vec<Option<Aim>> = std::iter::once(None)
        .chain(aims.iter().map(|&a| Some(a)))
        .collect();
    for groups in shapes {
        let ctxs: Vec<usize> = groups
            .iter()
            .flat_map(|&(ctx, n)| std::iter::repeat_n(ctx, n))
            .collect();
        let batch = ctxs.len();
        let ctx = match groups.as_slice() {
            [(ctx, _)] => ctx.to_string(),
            _ => groups
                .iter()
                .map(|(ctx, n)| format!("{ctx}×{n}"))
                .collect::<Vec<_>>()
                .join(" + "),
        };
        for round in 1..=3 {
            for &aim in &aims {
                let blocks = aim.map(|a| match a {
                    Aim::Blocks(b) => b,
                    Aim::Splits(s) => s * batch * config.num_kv_heads,
                });
                let (prof, t) = profile_decode(&mut be, bs, &ctxs, blocks)?;
                let us = |k: &str| {
                    prof.iter().filter(|p| p.0 == k).map(|p| p.1).sum::<f64>() / layers as f64
                };
                let (a, c) = (us("decode_attn"), us("attn_combine"));
                println!(
                    "| {ctx} | {batch} | {} | {round} | {a:.1} | {c:.1} | {:.1} | {:.1} |",
                    match aim {
                        None => "rule".to_string(),
                        Some(Aim::Blocks(b)) => b.to_string(),
                        Some(Aim::Splits(s)) => format!("{s} splits"),
                    },
                    a + c,
                    t * 1e6
                );
            }
        }
    }
    be.set_decode_blocks(None);
    Ok(())
}

/// A profile's table: each kernel's µs summed over the layers, per layer, and its share.
fn profile_table(prof: &[(&'static str, f64)], layers: usize, per: &str) {
    let total: f64 = prof.iter().map(|p| p.1).sum();
    println!("| kernel | µs per {per} | µs per layer | share |");
    println!("|---|---|---|---|");
    for (name, us) in prof {
        println!(
            "| {name} | {us:.1} | {:.1} | {:.0}% |",
            us / layers as f64,
            us / total * 100.0
        );
    }
    println!();
}

/// Each product at decode batch sizes and a full pass: cuBLAS's own algorithm against the
/// fastest of cuBLASLt's candidates (`Gpu::tune_f32`, events around 10 launches
/// back to back, so no launch gaps: smaller figures than the table above's).
fn tuning_table(gpu: &Gpu, config: &ModelConfig) -> Res<()> {
    println!(
        "cuBLASLt candidates timed against cuBLAS's own pick (µs per launch, 10 back to back; rank 0 is the heuristic's first):\n"
    );
    println!(
        "| product | rows | cuBLAS's own µs | best candidate µs | its rank of | own ÷ best | kept | TFLOP/s kept |"
    );
    println!("|---|---|---|---|---|---|---|---|");
    // Decode batch sizes, and a full prefill pass (not for the LM head, which
    // prefill runs on each chunk's last token only).
    let decode_rows = [16usize, 32, 64, 128, 256];
    let pass_rows = [16usize, 32, 64, 128, 256, 8192];
    for (name, out, k) in products(config) {
        let rows_tuned: &[usize] = if name == "lm_head" {
            &decode_rows
        } else {
            &pass_rows
        };
        let max_rows = rows_tuned.iter().copied().max().unwrap_or(1);
        let mut w = gpu.zeros::<half::bf16>(out * k)?;
        let mut x = gpu.zeros::<half::bf16>(max_rows * k)?;
        let mut y = gpu.zeros::<f32>(max_rows * out)?;
        gpu.fill_uniform_slice(&mut w, 3, -0.05, 0.05)?;
        gpu.fill_uniform_slice(&mut x, 4, -1.0, 1.0)?;
        for &rows in rows_tuned {
            let t = gpu.tune_f32(&x, &w, &mut y, rows, k, out)?;
            let (best, rank) = t.best.unwrap_or((f32::NAN, 0));
            let kept = if t.picked { best } else { t.default_us };
            println!(
                "| {name} | {rows} | {:.1} | {best:.1} | {rank} of {} | {:.3} | {} | {:.0} |",
                t.default_us,
                t.candidates,
                t.default_us / best,
                if t.picked { "candidate" } else { "own" },
                (2 * rows * out * k) as f64 / (f64::from(kept) * 1e-6) / 1e12
            );
        }
    }
    println!();
    Ok(())
}

/// A layer's products and the LM head: name, outputs, inputs.
fn products(config: &ModelConfig) -> [(&'static str, usize, usize); 5] {
    let (h, inter) = (config.hidden_size, config.intermediate_size);
    let qd = config.num_heads * config.head_dim;
    let qkvw = (config.num_heads + 2 * config.num_kv_heads) * config.head_dim;
    [
        ("qkv", qkvw, h),
        ("o", h, qd),
        ("gate_up", 2 * inter, h),
        ("down", h, inter),
        ("lm_head", config.vocab_size, h),
    ]
}
