//! `tandem-gpu-bench bench`: prefill and decode speed, KV export rates and GPU
//! sampling on a random-weight model of a named shape.

use std::time::Instant;

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use tandem_engine::TokenDraw;
use tandem_engine::backend::{Backend, BackendExt, KvExport, SeqChunk, argmax};
use tandem_engine::block_manager::blocks_for;
use tandem_engine::cuda::bench::named_config;
use tandem_engine::cuda::{BenchControls, CudaBackend, CudaLimits, Gpu, GpuModel};
use tandem_engine::kv_cache::KvLayout;

use super::{Res, arg, block_size_arg, kv_dtype_arg, median, usize_list};

pub(crate) fn bench(args: &[String]) -> Res<()> {
    let shape = arg(args, "--shape").unwrap_or_else(|| "llama3-8b".into());
    let layers = arg(args, "--layers").map(|s| s.parse()).transpose()?;
    let quick = args.iter().any(|a| a == "--quick");
    // `--only decode` (the decode sweep and the sampling check) or `--only
    // prefill` (the prefill sweep and the KV export): one part, in less time.
    let only = arg(args, "--only");
    let (decode, prefill) = match only.as_deref() {
        None => (true, true),
        Some("decode") => (true, false),
        Some("prefill") => (false, true),
        Some(other) => return Err(format!("--only {other}: decode or prefill").into()),
    };
    // `--tables rows,waves`: only those of the tables after the decode sweep
    // (rows, tune, epilogue, waves, sampling); all by default.
    let tables: Option<Vec<String>> =
        arg(args, "--tables").map(|v| v.split(',').map(|t| t.trim().to_string()).collect());
    let known = ["rows", "tune", "epilogue", "waves", "sampling"];
    if let Some(t) = tables
        .iter()
        .flatten()
        .find(|t| !known.contains(&t.as_str()))
    {
        return Err(format!("--tables {t}: one of {}", known.join(", ")).into());
    }
    let wanted = |name: &str| tables.as_ref().is_none_or(|t| t.iter().any(|x| x == name));
    let kv_dtype = kv_dtype_arg(args)?;
    let bs = block_size_arg(args)?;
    let config = named_config(&shape, layers)?;
    let t0 = Instant::now();
    let gpu = Gpu::open(0, &config)?;
    let name = gpu.name();
    // The floor's bandwidth: given, or this GPU's device-to-device copy rate.
    let bw: f64 = match arg(args, "--bandwidth-gbs") {
        Some(s) => s.parse()?,
        None => gpu.copy_bandwidth_gbs(2 << 30)?,
    };
    let model = GpuModel::random(&gpu, &config, 1)?;
    let (free, total) = gpu.mem_info()?;
    // A layer's block in the cache's dtype (fp8: values and scales).
    let layer_block = KvLayout {
        num_layers: config.num_layers,
        num_blocks: 1,
        block_size: bs,
        num_kv_heads: config.num_kv_heads,
        head_dim: config.head_dim,
        dtype: kv_dtype,
    }
    .block_bytes();
    let block_bytes_all = config.num_layers * layer_block;
    let kv_token_bytes = block_bytes_all / bs;
    // `--prefill-chunk N`: a prefill pass's tokens (8192 by default; 32768 runs the
    // 32k prompt in one pass, as transformers does).
    let default_chunk = CudaLimits::default().max_tokens;
    let chunk = match arg(args, "--prefill-chunk") {
        Some(s) => s
            .parse::<usize>()
            .ok()
            .filter(|&n| n > 0)
            .ok_or(format!("--prefill-chunk {s}: a positive number of tokens"))?,
        None => default_chunk,
    };
    // The pass buffers take ~154 KiB a token at the 8B shape (f32 residual and delta,
    // bf16 activations, the gate/up output), 1.3 GB of the 3 GiB kept at 8192.
    let reserve = (3usize << 30) + (160usize << 10) * chunk.saturating_sub(default_chunk);
    let num_blocks = (free.saturating_sub(reserve)) / block_bytes_all;
    let limits = CudaLimits {
        kv_dtype,
        max_tokens: chunk,
        ..CudaLimits::default()
    };
    let weight_bytes = 2 * model.streamed_params();
    let mut be = CudaBackend::new(gpu, model.into(), num_blocks, bs, limits)?;
    be.fill_cache_random(3)?;
    println!(
        "## benchmark: {shape} ({} layers, hidden {}, {} heads, {} KV heads, FFN {}, vocab {}), random bf16 weights on {name}\n",
        config.num_layers,
        config.hidden_size,
        config.num_heads,
        config.num_kv_heads,
        config.intermediate_size,
        config.vocab_size
    );
    println!(
        "GPU memory {:.1} GiB; weights {:.2} GB; KV cache ({}) {num_blocks} blocks of {bs} tokens = {} tokens ({:.1} GB, {kv_token_bytes} B/token); set-up {:.1} s\n",
        total as f64 / (1u64 << 30) as f64,
        weight_bytes as f64 / 1e9,
        kv_dtype.name(),
        num_blocks * bs,
        (num_blocks * block_bytes_all) as f64 / 1e9,
        t0.elapsed().as_secs_f64()
    );

    let mut rng = ChaCha8Rng::seed_from_u64(5);
    if decode {
        // Decode.
        println!(
            "### decode step (CUDA graph replays, greedy sampling on the GPU; median of 10 steps after 3 warm-up)\n"
        );
        println!(
            "Floor bandwidth {bw:.0} GB/s: a 2 GiB device-to-device copy on this GPU, bytes read + written.\n"
        );
        let (peak, sms) = be.gpu().dram_peak()?;
        println!(
            "DRAM peak as the driver reports it: {peak:.0} GB/s, {:.1} GB/s for each of {sms} multiprocessors; decode attention's wave {} blocks.\n",
            peak / sms as f64,
            be.decode_wave()
        );
        println!(
            "| context | batch | step ms | floor ms (weights+KV ÷ {bw:.0} GB/s) | step ÷ floor | tokens/s | without graphs ms | without PDL ms | top-p sampling ms |"
        );
        println!("|---|---|---|---|---|---|---|---|---|");
        // `--batches 1,256`: those batch sizes instead of the sweep's.
        let chosen = usize_list(args, "--batches")?;
        let batches: &[usize] = match &chosen {
            Some(b) => b,
            None if quick => &[1, 64],
            None => &[1, 8, 32, 64, 128, 256],
        };
        for ctx in [1024usize, 4096] {
            for &batch in batches {
                let steps = 13;
                let per_seq = blocks_for(ctx + steps + 1, bs);
                if per_seq * batch > num_blocks {
                    println!(
                        "| {ctx} | {batch} | does not fit ({} blocks needed, {num_blocks} in memory) | | | |",
                        per_seq * batch
                    );
                    continue;
                }
                let tables = consecutive_tables(batch, per_seq);
                let mut toks: Vec<u32> = (0..batch)
                    .map(|_| rng.random_range(0..config.vocab_size as u32))
                    .collect();
                let mut run = |be: &mut CudaBackend, draw: TokenDraw| -> Res<f64> {
                    Ok(time_decode(be, &tables, ctx, &mut toks, draw)? * 1e3)
                };
                let ms = run(&mut be, TokenDraw::GREEDY)?;
                let top_p = TokenDraw {
                    temperature: 0.8,
                    top_k: 0,
                    top_p: 0.95,
                    min_p: 0.0,
                    u01: 0.37,
                };
                let sampled = run(&mut be, top_p)?;
                be.set_graphs(false);
                let direct = run(&mut be, TokenDraw::GREEDY)?;
                be.set_graphs(true);
                be.set_pdl(false);
                let no_pdl = run(&mut be, TokenDraw::GREEDY)?;
                be.set_pdl(true);
                let kv = (batch * (ctx + 8) * kv_token_bytes) as f64;
                let floor = (weight_bytes as f64 + kv) / (bw * 1e9) * 1e3;
                println!(
                    "| {ctx} | {batch} | {ms:.2} | {floor:.2} | {:.2} | {:.0} | {direct:.2} | {no_pdl:.2} | {sampled:.2} |",
                    ms / floor,
                    batch as f64 / ms * 1e3
                );
            }
        }
        println!();
        if wanted("rows") {
            prefetch_table(&mut be, &mut rng, config.vocab_size, bs)?;
        }
        for ab in ABS.iter().filter(|ab| wanted(ab.name)) {
            ab_table(&mut be, &mut rng, config.vocab_size, num_blocks, bs, ab)?;
        }
        if wanted("sampling") {
            sampling_check(&mut be, config.vocab_size, bs)?;
        }
    }

    if !prefill {
        return Ok(());
    }
    // Prefill.
    println!(
        "### prefill (one sequence; chunks of {} tokens; median of 3 after a warm-up)\n",
        limits.max_tokens
    );
    println!(
        "| prompt | time ms | tokens/s | TFLOP/s (linear + causal attention) | of 793 TFLOP/s | with every layer exported as computed, ms | with cuBLAS's own products, ms |"
    );
    println!("|---|---|---|---|---|---|---|");
    let (h, hd, hq, hkv) = (
        config.hidden_size,
        config.head_dim,
        config.num_heads,
        config.num_kv_heads,
    );
    let linear_params = config.num_layers
        * ((hq + 2 * hkv) * hd * h + h * hq * hd + 3 * config.intermediate_size * h);
    let lens: &[usize] = if quick {
        &[1024, 8192]
    } else {
        &[1024, 8192, 32768]
    };
    let mut last_table = Vec::new();
    for &len in lens {
        let blocks = blocks_for(len, bs);
        if blocks > num_blocks {
            println!("| {len} | does not fit | | | | | |");
            continue;
        }
        let table: Vec<u32> = (0..blocks as u32).collect();
        let prompt: Vec<u32> = (0..len)
            .map(|_| rng.random_range(0..config.vocab_size as u32))
            .collect();
        let runs = if len > 8192 { 2 } else { 4 };
        let prefill = |be: &mut CudaBackend, export: bool| -> Res<f64> {
            let mut times = Vec::new();
            let heads = 0..config.num_kv_heads;
            for r in 0..runs {
                // Exports go to a thread that waits for each copy and drops the bytes,
                // as a prefill node's sending task does.
                let (tx, rx) = std::sync::mpsc::sync_channel::<tandem_engine::backend::KvBytes>(64);
                let sink = std::thread::spawn(move || -> usize {
                    rx.into_iter()
                        .map(|b| b.wait().map_or(0, |b| b.len()))
                        .sum()
                });
                let t0 = Instant::now();
                let mut start = 0;
                while start < len {
                    let end = (start + limits.max_tokens).min(len);
                    let chunk_blocks = &table[start / bs..end.div_ceil(bs)];
                    let mut hook = |layer: usize, kv: &dyn KvExport| -> tandem_engine::Result<()> {
                        let b = kv.export_heads_async(layer, chunk_blocks, heads.clone())?;
                        let _ = tx.send(b);
                        Ok(())
                    };
                    let on_layer: Option<tandem_engine::backend::LayerHook<'_>> =
                        if export { Some(&mut hook) } else { None };
                    be.forward_greedy(
                        &[SeqChunk {
                            tokens: &prompt[start..end],
                            start,
                            block_table: &table,
                        }],
                        on_layer,
                    )?;
                    start = end;
                }
                drop(tx);
                let moved = sink.join().map_err(|_| "export sink panicked")?;
                if r > 0 {
                    times.push(t0.elapsed().as_secs_f64());
                }
                if export && moved == 0 {
                    return Err("no KV bytes were exported".into());
                }
            }
            Ok(median(times))
        };
        let t = prefill(&mut be, false)?;
        be.set_gemm_tune(false);
        let t_own = prefill(&mut be, false)?;
        be.set_gemm_tune(true);
        let te = prefill(&mut be, true)?;
        let flops = 2.0 * len as f64 * linear_params as f64
            + config.num_layers as f64
                * 4.0
                * (hq * hd) as f64
                * (len as f64 * (len as f64 + 1.0) / 2.0);
        println!(
            "| {len} | {:.1} | {:.0} | {:.0} | {:.1}% | {:.1} | {:.1} |",
            t * 1e3,
            len as f64 / t,
            flops / t / 1e12,
            flops / t / 793e12 * 100.0,
            te * 1e3,
            t_own * 1e3
        );
        last_table = table;
    }
    println!();

    // KV export of one layer of the longest prompt.
    if !last_table.is_empty() {
        let blocks = &last_table;
        let bytes = (blocks.len() * be.kv_layout().block_bytes()) as f64;
        let mut stage = Vec::new();
        let mut full = Vec::new();
        let mut ring = Vec::new();
        for _ in 0..6 {
            let t0 = Instant::now();
            be.kv().export_with(0, blocks, |_| {})?;
            stage.push(t0.elapsed().as_secs_f64());
            let t0 = Instant::now();
            let v = be.kv().export_layer(0, blocks)?;
            full.push(t0.elapsed().as_secs_f64());
            std::hint::black_box(v);
            if (blocks.len() * be.kv_layout().block_bytes()) <= be.kv().ring_bytes() {
                let t0 = Instant::now();
                let b = be.kv().export_async(0, blocks)?.wait()?;
                ring.push(t0.elapsed().as_secs_f64());
                std::hint::black_box(b);
            }
        }
        let (s, f) = (median(stage), median(full));
        println!(
            "### KV export, one layer of a {}-token prompt ({:.0} MB)\n",
            blocks.len() * bs,
            bytes / 1e6
        );
        println!("| path | ms | GB/s | of 55 GB/s |");
        println!("|---|---|---|---|");
        println!(
            "| GPU blocks → pinned host (copy stream) | {:.2} | {:.1} | {:.0}% |",
            s * 1e3,
            bytes / s / 1e9,
            bytes / s / 55e9 * 100.0
        );
        if !ring.is_empty() {
            let r = median(ring);
            println!(
                "| … → export ring → `Bytes` (`export_heads_async`, what the prefill node sends) | {:.2} | {:.1} | {:.0}% |",
                r * 1e3,
                bytes / r / 1e9,
                bytes / r / 55e9 * 100.0
            );
        }
        println!(
            "| … → `Vec<u8>` (`Backend::export_layer`) | {:.2} | {:.1} | {:.0}% |",
            f * 1e3,
            bytes / f / 1e9,
            bytes / f / 55e9 * 100.0
        );
        println!();
    }
    Ok(())
}

/// GPU sampling against the host's distribution for the same logits: a batch of
/// identical sequences, each drawing with its own variate, many rounds.
fn sampling_check(be: &mut CudaBackend, vocab: usize, bs: usize) -> Res<()> {
    let (batch, ctx, rounds) = (64usize, 256usize, 80usize);
    let table: Vec<u32> = (0..blocks_for(ctx + 1, bs) as u32).collect();
    let tok = [7u32];
    let chunks: Vec<SeqChunk<'_>> = (0..batch)
        .map(|_| SeqChunk {
            tokens: &tok,
            start: ctx,
            block_table: &table,
        })
        .collect();
    be.poison()?;
    let logits = be.forward_logits(&chunks, None)?.swap_remove(0);
    let greedy = be.forward_greedy(&chunks, None)?;
    let greedy_ok = greedy.iter().all(|&t| t == argmax(&logits));
    println!(
        "### sampling on the GPU against the host's distribution ({batch} identical sequences × {rounds} rounds, one variate each; vocabulary {vocab})\n"
    );
    println!(
        "Greedy on the GPU = host argmax of the same logits: {}\n",
        if greedy_ok { "yes" } else { "NO" }
    );
    println!(
        "| cuts | tokens kept (host) | draws | drawn outside the kept set | total variation, GPU vs exact | total variation, host sampler vs exact (same count) |"
    );
    println!("|---|---|---|---|---|---|");
    let configs = [
        ("T 0.7, top-k 40", 0.7, 40, 1.0, 0.0),
        ("T 0.1, top-p 0.9", 0.1, 0, 0.9, 0.0),
        (
            "T 0.2, top-k 200, top-p 0.8, min-p 0.05",
            0.2,
            200,
            0.8,
            0.05,
        ),
        ("T 0.05, min-p 0.1", 0.05, 0, 1.0, 0.1),
    ];
    let mut rng = ChaCha8Rng::seed_from_u64(9);
    let mut bad = !greedy_ok;
    for (name, temperature, top_k, top_p, min_p) in configs {
        let draw = TokenDraw {
            temperature,
            top_k,
            top_p,
            min_p,
            u01: 0.0,
        };
        let dist = draw.distribution(&logits);
        let kept = dist.iter().filter(|&&p| p > 0.0).count();
        let mut gpu_counts = vec![0u64; vocab];
        let mut host_counts = vec![0u64; vocab];
        let mut outside = 0;
        for _ in 0..rounds {
            let draws: Vec<TokenDraw> = (0..batch)
                .map(|_| TokenDraw {
                    u01: rng.random::<f32>(),
                    ..draw
                })
                .collect();
            for (id, d) in be
                .forward_draw(&chunks, &draws, None)?
                .into_iter()
                .zip(&draws)
            {
                let id = id as usize;
                if id >= vocab || dist[id] == 0.0 {
                    outside += 1;
                } else {
                    gpu_counts[id] += 1;
                }
                host_counts[d.choose(&logits) as usize] += 1;
            }
        }
        let n = (rounds * batch) as f64;
        let tv = |counts: &[u64]| -> f64 {
            0.5 * counts
                .iter()
                .zip(&dist)
                .map(|(&c, &p)| (c as f64 / n - p).abs())
                .sum::<f64>()
        };
        let (tg, th) = (tv(&gpu_counts), tv(&host_counts));
        bad |= outside > 0 || tg > 2.0 * th + 0.02;
        println!(
            "| {name} | {kept} | {} | {outside} | {tg:.3} | {th:.3} |",
            rounds * batch
        );
    }
    println!();
    if bad {
        return Err("GPU sampling does not follow the host's distribution".into());
    }
    Ok(())
}

/// Batch-1 decode steps with each setting of the `gemv` row prefetch
/// (`BenchControls::set_prefetch`), taking turns three times, at 1k and 4k context.
fn prefetch_table(be: &mut CudaBackend, rng: &mut ChaCha8Rng, vocab: usize, bs: usize) -> Res<()> {
    println!(
        "### L2 prefetch of each gemv weight row's start at batch 1 (graph replays; ms per step, three rounds taking turns)\n"
    );
    println!("| context | none | 512 B | 1 KiB | 2 KiB | whole rows |");
    println!("|---|---|---|---|---|---|");
    let settings = [0usize, 512, 1024, 2048, 1 << 20];
    let before = be.prefetch();
    for ctx in [1024usize, 4096] {
        let tables = consecutive_tables(1, blocks_for(ctx + 14, bs));
        let mut toks = vec![rng.random_range(0..vocab as u32)];
        let mut ms: [Vec<f64>; 5] = Default::default();
        for _round in 0..3 {
            for (m, &bytes) in ms.iter_mut().zip(&settings) {
                be.set_prefetch(bytes);
                m.push(time_decode(be, &tables, ctx, &mut toks, TokenDraw::GREEDY)? * 1e3);
            }
        }
        let cells: Vec<String> = ms
            .iter()
            .map(|m| {
                let v: Vec<String> = m.iter().map(|t| format!("{t:.3}")).collect();
                v.join(", ")
            })
            .collect();
        println!("| {ctx} | {} |", cells.join(" | "));
    }
    be.set_prefetch(before);
    println!();
    Ok(())
}

/// What [`ab_table`] compares: its heading, the two settings' column names
/// (off, on; on is the backend's default), how to switch between them and the
/// batch sizes it times.
struct Ab {
    /// Its name in `--tables`.
    name: &'static str,
    heading: &'static str,
    off: &'static str,
    on: &'static str,
    set: fn(&mut CudaBackend, bool),
    batches: &'static [usize],
}

/// The A/B tables of `bench`'s decode part: the products' tuned cuBLASLt
/// algorithms against cuBLAS's own, the residual added in the o and down
/// products' epilogue against the norms adding it, and decode attention's
/// blocks aimed at ten waves against the rule's four (docs/GPU_BENCH.md,
/// twentieth session).
const ABS: [Ab; 3] = [
    Ab {
        name: "tune",
        heading: "products with tuned cuBLASLt algorithms against cuBLAS's own",
        off: "cuBLAS's own",
        on: "tuned",
        set: |be, on| be.set_gemm_tune(on),
        batches: &[64, 256],
    },
    Ab {
        name: "epilogue",
        heading: "the residual added in the o and down products' epilogue against the norms adding it",
        off: "norms add",
        on: "epilogue adds",
        set: |be, on| be.set_residual_epilogue(on),
        batches: &[64, 256],
    },
    Ab {
        name: "waves",
        heading: "decode attention's blocks aimed at 4096 (about ten waves, the rule until the twentieth session) against the backend's rule (four waves)",
        off: "4096 blocks",
        on: "rule",
        set: |be, on| be.set_decode_blocks((!on).then_some(4096)),
        batches: &[32, 64, 128, 256],
    },
];

/// Decode steps at `ab`'s batch sizes with its setting off and on, taking
/// turns three times, at 1k and 4k context (graph replays).
fn ab_table(
    be: &mut CudaBackend,
    rng: &mut ChaCha8Rng,
    vocab: usize,
    num_blocks: usize,
    bs: usize,
    ab: &Ab,
) -> Res<()> {
    println!(
        "### {} (graph replays; ms per step, three rounds taking turns)\n",
        ab.heading
    );
    println!(
        "| context | batch | {} | {} | {} ÷ {} (median) |",
        ab.off, ab.on, ab.on, ab.off
    );
    println!("|---|---|---|---|---|");
    for ctx in [1024usize, 4096] {
        for &batch in ab.batches {
            let per_seq = blocks_for(ctx + 14, bs);
            if per_seq * batch > num_blocks {
                continue;
            }
            let tables = consecutive_tables(batch, per_seq);
            let mut toks: Vec<u32> = (0..batch)
                .map(|_| rng.random_range(0..vocab as u32))
                .collect();
            let (mut off, mut on) = (Vec::new(), Vec::new());
            for _round in 0..3 {
                for (setting, ms) in [(false, &mut off), (true, &mut on)] {
                    (ab.set)(be, setting);
                    ms.push(time_decode(be, &tables, ctx, &mut toks, TokenDraw::GREEDY)? * 1e3);
                }
            }
            let cell = |m: &[f64]| {
                let v: Vec<String> = m.iter().map(|t| format!("{t:.3}")).collect();
                v.join(", ")
            };
            println!(
                "| {ctx} | {batch} | {} | {} | {:.3} |",
                cell(&off),
                cell(&on),
                median(on.clone()) / median(off.clone())
            );
        }
    }
    (ab.set)(be, true);
    println!();
    Ok(())
}

/// Block tables for `batch` sequences of `per_seq` blocks each, side by side in
/// the cache: sequence i owns blocks `i * per_seq .. (i + 1) * per_seq`.
pub(crate) fn consecutive_tables(batch: usize, per_seq: usize) -> Vec<Vec<u32>> {
    tables_of(&vec![per_seq; batch])
}

/// Block tables of sequences holding `blocks[i]` blocks each, side by side in
/// the cache in that order.
pub(crate) fn tables_of(blocks: &[usize]) -> Vec<Vec<u32>> {
    let mut next = 0u32;
    blocks
        .iter()
        .map(|&n| {
            let first = next;
            next += n as u32;
            (first..next).collect()
        })
        .collect()
}

/// Median seconds of a decode step, of 13 after 3 warm-up: one sequence per block
/// table at positions `ctx..`, each step fed the tokens the last one chose with `draw`.
pub(crate) fn time_decode(
    be: &mut CudaBackend,
    tables: &[Vec<u32>],
    ctx: usize,
    toks: &mut Vec<u32>,
    draw: TokenDraw,
) -> Res<f64> {
    time_decode_at(be, tables, &vec![ctx; tables.len()], toks, draw)
}

/// As [`time_decode`], sequence `i` at positions `ctxs[i]..`.
pub(crate) fn time_decode_at(
    be: &mut CudaBackend,
    tables: &[Vec<u32>],
    ctxs: &[usize],
    toks: &mut Vec<u32>,
    draw: TokenDraw,
) -> Res<f64> {
    let mut times = Vec::new();
    for step in 0..13 {
        let t: Vec<[u32; 1]> = toks.iter().map(|&x| [x]).collect();
        let chunks: Vec<SeqChunk<'_>> = t
            .iter()
            .zip(tables)
            .zip(ctxs)
            .map(|((t, table), &ctx)| SeqChunk {
                tokens: t,
                start: ctx + step,
                block_table: table,
            })
            .collect();
        let draws = vec![draw; chunks.len()];
        let t0 = Instant::now();
        *toks = be.forward_draw(&chunks, &draws, None)?;
        if step >= 3 {
            times.push(t0.elapsed().as_secs_f64());
        }
    }
    Ok(median(times))
}
