//! `tandem-gpu-bench attn`: the Hopper prefill attention (wgmma, compiled for
//! `sm_90a`) against the portable mma.sync kernel (the same program compiled
//! for `sm_90`) on long prompts, in one process: backends with the same random
//! weights prefill the same prompts, whole, in chunks and from a cached prefix,
//! and the logits at each chunk's end (and of a decode step after the prompt,
//! which reads the KV the prefill wrote) must agree. Where the Hopper kernel
//! loads its tiles by TMA (a bf16 cache, blocks of 8, 16, 32, 64 or 128), a third
//! backend runs it with its copies instead (`TANDEM_CUDA_TMA=0`), checked and
//! timed beside the other two.

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use tandem_engine::backend::{BackendExt, SeqChunk};
use tandem_engine::block_manager::blocks_for;
use tandem_engine::cuda::bench::named_config;
use tandem_engine::cuda::{CudaBackend, CudaLimits, Gpu, GpuModel};
use tandem_engine::kv_cache::KvDtype;

use super::{Res, arg, block_size_arg, kv_dtype_arg, l2_err};

/// Largest L2 relative error of the logits the two kernels may differ by (both
/// bf16 attention with f32 accumulation; they differ in summation order).
const BOUND: f64 = 1e-2;

fn backend(
    arch: Option<&str>,
    tma: bool,
    config: &tandem_engine::ModelConfig,
    (blocks, block_size): (usize, usize),
    kv_dtype: KvDtype,
) -> Res<CudaBackend> {
    // SAFETY: set before any thread of this process reads the environment; the
    // program is compiled by Gpu::open, which reads it once.
    unsafe {
        match arch {
            Some(a) => std::env::set_var("TANDEM_CUDA_ARCH", a),
            None => std::env::remove_var("TANDEM_CUDA_ARCH"),
        }
        std::env::set_var("TANDEM_CUDA_TMA", if tma { "1" } else { "0" });
    }
    let gpu = Gpu::open(0, config)?;
    let (target, regs) = gpu.kernel_target()?;
    println!("kernels compiled for {target}: prefill_attn uses {regs} registers a thread\n");
    let model = GpuModel::random(&gpu, config, 1)?;
    Ok(CudaBackend::new(
        gpu,
        model.into(),
        blocks,
        block_size,
        CudaLimits {
            kv_dtype,
            ..CudaLimits::default()
        },
    )?)
}

pub(crate) fn attn(args: &[String]) -> Res<()> {
    let shape = arg(args, "--shape").unwrap_or_else(|| "llama3-8b".into());
    let layers = arg(args, "--layers")
        .map(|s| s.parse())
        .transpose()?
        .or(Some(2));
    let mut config = named_config(&shape, layers)?;
    // `--window W`: a sliding attention window (the kernels' windowed path);
    // `--block-size N`: cache blocks of N tokens (one that does not divide the
    // warp-specialized kernel's 128-key tile takes its per-row block lookup).
    if let Some(w) = arg(args, "--window") {
        config.sliding_window = Some(w.parse()?);
    }
    let bs = block_size_arg(args)?;
    // `--kv-dtype fp8_e4m3`: both kernels' fp8-cache instances (e4m3 tiles
    // expanded to the same bf16 tiles, so they too should agree).
    let kv_dtype = kv_dtype_arg(args)?;
    let max_len = 32768 + 64;
    let blocks = blocks_for(max_len, bs) + 8;
    let mut fallback = backend(Some("sm_90"), false, &config, (blocks, bs), kv_dtype)?;
    let mut hopper = backend(None, true, &config, (blocks, bs), kv_dtype)?;
    // The same kernel without TMA, where it would take it.
    let tma = hopper.kv().uses_tma();
    let mut copies = if tma {
        Some(backend(None, false, &config, (blocks, bs), kv_dtype)?)
    } else {
        None
    };
    println!(
        "## prefill attention: wgmma (sm_90a, tiles by {}) vs mma.sync (sm_90), {shape} with {} layers, random weights, {} KV cache, blocks of {bs}, window {:?}\n",
        if tma { "TMA, and by copies" } else { "copies" },
        config.num_layers,
        kv_dtype.name(),
        config.sliding_window
    );
    println!(
        "| prompt | chunks (start..end) | logits L2 rel err per chunk end | decode step after it | wgmma by copies: per chunk end, decode step |"
    );
    println!("|---|---|---|---|---|");
    let mut rng = ChaCha8Rng::seed_from_u64(11);
    let table: Vec<u32> = (0..blocks as u32).collect();
    // (length, chunk boundaries): whole, 8192-token chunks, a cached prefix that
    // ends off a tile boundary.
    let cases: Vec<(usize, Vec<usize>)> = vec![
        (1, vec![]),
        (77, vec![]),
        (1000, vec![]),
        (4097, vec![1000]),
        (8192, vec![]),
        (12345, vec![8192]),
        (16384, vec![3001, 8192 + 3001]),
        (32768, vec![8192, 16384, 24576]),
    ];
    let mut worst: f64 = 0.0;
    // `--speed`: only the timings (e.g. under a profiler).
    let cases = if args.iter().any(|a| a == "--speed") {
        Vec::new()
    } else {
        cases
    };
    for (len, cuts) in cases {
        let prompt: Vec<u32> = (0..len)
            .map(|_| rng.random_range(0..config.vocab_size as u32))
            .collect();
        let mut bounds = vec![0];
        bounds.extend(cuts.iter().copied());
        bounds.push(len);
        let mut errs = Vec::new();
        let mut errs_copies = Vec::new();
        for w in bounds.windows(2) {
            let (s, e) = (w[0], w[1]);
            let a = fallback.prefill(&prompt[s..e], s, &table)?;
            let b = hopper.prefill(&prompt[s..e], s, &table)?;
            errs.push(l2_err(&b, &a) as f64);
            if let Some(c) = copies.as_mut() {
                errs_copies.push(l2_err(&c.prefill(&prompt[s..e], s, &table)?, &a) as f64);
            }
        }
        let step = |be: &mut CudaBackend| -> Res<Vec<f32>> {
            let chunk = [SeqChunk {
                tokens: &prompt[len - 1..len],
                start: len,
                block_table: &table,
            }];
            Ok(be.forward_logits(&chunk, None)?.remove(0))
        };
        let reference = step(&mut fallback)?;
        let d = l2_err(&step(&mut hopper)?, &reference) as f64;
        if let Some(c) = copies.as_mut() {
            errs_copies.push(l2_err(&step(c)?, &reference) as f64);
        }
        for &e in errs.iter().chain([&d]).chain(&errs_copies) {
            worst = worst.max(e);
        }
        let spans: Vec<String> = bounds
            .windows(2)
            .map(|w| format!("{}..{}", w[0], w[1]))
            .collect();
        let show = |v: &[f64]| -> String {
            let s: Vec<String> = v.iter().map(|e| format!("{e:.2e}")).collect();
            s.join(", ")
        };
        println!(
            "| {len} | {} | {} | {d:.2e} | {} |",
            spans.join(", "),
            show(&errs),
            if tma { show(&errs_copies) } else { "-".into() }
        );
    }
    println!();
    // Speed: the attention's share of a prefill differs by kernel; same prompts,
    // same weights, one after the other, median of 3 after a warm-up.
    println!(
        "| prompt (one chunk of 8192 at the end of it) | mma.sync ms | wgmma ms | mma.sync ÷ wgmma | wgmma by copies ms | copies ÷ TMA |"
    );
    println!("|---|---|---|---|---|---|");
    for len in [8192usize, 32768] {
        let prompt: Vec<u32> = (0..len)
            .map(|_| rng.random_range(0..config.vocab_size as u32))
            .collect();
        let s = len - 8192;
        let time = |be: &mut CudaBackend| -> Res<f64> {
            if s > 0 {
                for c in (0..s).step_by(8192) {
                    be.prefill(&prompt[c..c + 8192], c, &table)?;
                }
            }
            let mut v = Vec::new();
            for r in 0..4 {
                let t0 = std::time::Instant::now();
                be.prefill(&prompt[s..len], s, &table)?;
                if r > 0 {
                    v.push(t0.elapsed().as_secs_f64() * 1e3);
                }
            }
            Ok(super::median(v))
        };
        let (a, b) = (time(&mut fallback)?, time(&mut hopper)?);
        match copies.as_mut() {
            Some(c) => {
                let c = time(c)?;
                println!(
                    "| {len} | {a:.2} | {b:.2} | {:.2} | {c:.2} | {:.2} |",
                    a / b,
                    c / b
                );
            }
            None => println!("| {len} | {a:.2} | {b:.2} | {:.2} | - | - |", a / b),
        }
    }
    println!();
    if worst.is_nan() || worst > BOUND {
        return Err(
            format!("the kernels' logits differ by L2 {worst:.2e} (bound {BOUND:.0e})").into(),
        );
    }
    println!("worst L2 rel err {worst:.2e} (bound {BOUND:.0e})\n");
    Ok(())
}
