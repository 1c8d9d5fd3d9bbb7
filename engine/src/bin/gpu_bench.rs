//! `tandem-gpu-bench`: checks the CUDA backend against the CPU backend (and
//! against Hugging Face logits) and measures it, in one process, so that one
//! call on a GPU machine does everything. Built with `--features cuda`.
//!
//! ```text
//! tandem-gpu-bench check  [--dir DIR]                  CPU vs GPU on synthesized models
//! tandem-gpu-bench hf     --dir DIR                    GPU vs HF logits (scripts/hf_reference.py)
//! tandem-gpu-bench real   --model PATH                 CPU vs GPU on a real model (GGUF or directory)
//! tandem-gpu-bench bench  [--shape llama3-8b] [--layers N] [--quick] [--kv-dtype bf16|fp8_e4m3]
//!                         [--only decode|prefill] [--block-size N] [--batches B,..]
//!                         [--prefill-chunk N]
//!                         [--tables rows,tune,epilogue,waves,sampling]
//! tandem-gpu-bench kernels [--shape llama3-8b] [--block-size N]
//!                         [--decode-blocks N,..|--decode-splits S,..
//!                          [--decode-shapes CTX:BATCH[+CTX:BATCH..],..]]
//!                                                      where a decode step's time goes
//! tandem-gpu-bench attn   [--shape llama3-8b] [--layers 2] [--speed] [--kv-dtype bf16|fp8_e4m3]
//!                         [--window W] [--block-size N]
//!                                                      wgmma vs mma.sync prefill attention
//! tandem-gpu-bench rows   [--shape llama3-8b]          decode steps by draw, with masked / logprobs rows
//! ```

use std::path::{Path, PathBuf};
use std::time::Instant;

use tandem_engine::ModelDir;
use tandem_engine::backend::{BackendExt, SeqChunk, argmax};
use tandem_engine::block_manager::blocks_for;
use tandem_engine::config::ModelConfig;
use tandem_engine::cpu::{CpuBackend, CpuModel};
use tandem_engine::cuda::check::{
    CHECK_MODELS, CheckReport, check_model, decode_alone, l2_err, rel_err, synthesize,
};
use tandem_engine::cuda::{BenchControls, CudaBackend, CudaLimits};
use tandem_engine::kv_cache::KvDtype;
use tandem_engine::weights::Weights;

#[path = "gpu_bench/attn.rs"]
mod attn;
#[path = "gpu_bench/kernels.rs"]
mod kernels;
#[path = "gpu_bench/rows.rs"]
mod rows;
#[path = "gpu_bench/speed.rs"]
mod speed;

use kernels::kernels;
use speed::bench;

type Res<T> = Result<T, Box<dyn std::error::Error>>;

/// Cache block size of the correctness checks (`check`, `hf`, `real`): the
/// CPU backend's, so a block boundary falls inside their short prompts.
const BS: usize = 16;
/// Cache block size the timings default to: the GPU node configs' (fewer TMA
/// boxes per prefill attention tile; docs/GPU_BENCH.md, fourteenth session).
const BENCH_BS: usize = 64;

fn arg(args: &[String], name: &str) -> Option<String> {
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1).cloned())
}

/// The comma-separated numbers after `name` (`--batches 1,64,256`); `None` when absent.
fn usize_list(args: &[String], name: &str) -> Res<Option<Vec<usize>>> {
    let Some(list) = arg(args, name) else {
        return Ok(None);
    };
    let parsed: Result<Vec<usize>, _> = list.split(',').map(|n| n.trim().parse()).collect();
    Ok(Some(parsed.map_err(|e| format!("{name} {list}: {e}"))?))
}

/// `--kv-dtype bf16|fp8_e4m3` (bf16 when absent).
fn kv_dtype_arg(args: &[String]) -> Res<KvDtype> {
    match arg(args, "--kv-dtype").as_deref() {
        None | Some("bf16") => Ok(KvDtype::Bf16),
        Some("fp8_e4m3") => Ok(KvDtype::Fp8E4m3),
        Some(other) => Err(format!("--kv-dtype {other}: bf16 or fp8_e4m3").into()),
    }
}

/// `--block-size N`: cache blocks of N tokens ([`BENCH_BS`] when absent).
fn block_size_arg(args: &[String]) -> Res<usize> {
    Ok(arg(args, "--block-size")
        .map(|s| s.parse())
        .transpose()?
        .unwrap_or(BENCH_BS))
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let result = match args.first().map(String::as_str) {
        Some("check") => check(&args),
        Some("hf") => hf(&args),
        Some("real") => real(&args),
        Some("bench") => bench(&args),
        Some("kernels") => kernels(&args),
        Some("attn") => attn::attn(&args),
        Some("rows") => rows::rows(&args),
        _ => Err("usage: tandem-gpu-bench check|hf|real|bench|kernels|attn|rows [options]".into()),
    };
    if let Err(e) = result {
        eprintln!("error: {e}");
        std::process::exit(1);
    }
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

// ---------------------------------------------------------------------------
// Correctness against the CPU backend.

fn check(args: &[String]) -> Res<()> {
    let root = PathBuf::from(arg(args, "--dir").unwrap_or_else(|| "/tmp/tandem-check".into()));
    let mut failed = Vec::new();
    for (kv, title) in [
        (
            KvDtype::Bf16,
            "CUDA (bf16 KV) vs CPU (bf16 KV, bf16-rounded activations)",
        ),
        (
            KvDtype::Fp8E4m3,
            "CUDA (fp8_e4m3 KV) vs CPU (fp8_e4m3 KV, bf16-rounded activations)",
        ),
    ] {
        println!("## correctness: {title} on synthesized bf16-weight models\n");
        println!(
            "| model | prompts | prefill logits: max abs err / max abs | prefill logits: L2 rel err (bound) | the same against the CPU in f32 | the CPU's bf16 run against its f32 run (bf16 noise) | decode step 1 (batched): max abs err / max abs | greedy continuations differing (of 20, 16 steps) | where (prompt, step) |"
        );
        println!("|---|---|---|---|---|---|---|---|---|");
        for model in &CHECK_MODELS {
            let dir = synthesize(&root, model)?;
            let r = checked_model(&dir, kv)?;
            let (max_rel, l2) = r.bounds();
            for f in r.failures() {
                failed.push(format!(
                    "{} ({}, bounds L2 {l2:.0e}, max {max_rel:.0e}): {f}",
                    model.name,
                    kv.name()
                ));
            }
            println!(
                "| {} | {} (1..400 tokens, every 3rd prefilled in 2 chunks) | {:.2e} | {:.2e} ({l2:.2e}) | {} | {} | {:.2e} | {} | {} |",
                model.name,
                r.prompts,
                r.prefill_max_rel,
                r.prefill_l2,
                r.prefill_l2_f32.map_or("–".into(), |e| format!("{e:.2e}")),
                r.bf16_noise.map_or("–".into(), |e| format!("{e:.2e}")),
                r.decode_max_rel,
                r.greedy_differ.len(),
                where_(&r.greedy_differ)
            );
        }
        println!();
    }
    if !failed.is_empty() {
        return Err(format!("logits error above tolerance: {}", failed.join("; ")).into());
    }
    Ok(())
}

/// `check_model` with its side findings on stderr; an error when the KV round
/// trip differs or PDL changes decode results (the logits bounds are the caller's).
fn checked_model(dir: &Path, kv: KvDtype) -> Res<CheckReport> {
    let r = check_model(dir, kv)?;
    let d = format!("{} ({})", dir.display(), kv.name());
    eprintln!(
        "{d}: KV layer export rel err vs CPU {:.2e}, import/export roundtrip {}",
        r.kv_export_rel,
        if r.kv_roundtrip_identical {
            "identical"
        } else {
            "DIFFERS"
        }
    );
    if !r.kv_roundtrip_identical {
        return Err("KV import/export roundtrip differs".into());
    }
    if let Some((dec, pre)) = r.same_cache_rel {
        eprintln!(
            "{d}: over the CPU's own fp8 cache bytes: decode step max rel err {dec:.2e}, 2-token prefill chunk {pre:.2e}"
        );
    }
    eprintln!(
        "{d}: greedy continuations, graph replays vs kernel-by-kernel: {} of {} differ ({} graphs captured)",
        r.graph_differ, r.prompts, r.graphs_captured
    );
    eprintln!(
        "{d}: sequences decoded alone, with vs without programmatic dependent launches: {} of 6 differ",
        r.pdl_differ
    );
    if r.pdl_differ > 0 {
        return Err("programmatic dependent launches change decode results".into());
    }
    eprintln!(
        "{d}: sequences decoded alone vs the CPU: {} of 6 differ {}",
        r.alone_differ.len(),
        r.alone_differ.join(", ")
    );
    Ok(r)
}

/// Where continuations diverge, or `-`.
fn where_(differ: &[String]) -> String {
    if differ.is_empty() {
        "-".into()
    } else {
        differ.join(", ")
    }
}

// ---------------------------------------------------------------------------
// A real model (e.g. SmolLM2 from its GGUF file): the CPU comparison on random
// prompts, the chat question answered by both backends, and the GPU's speed.

fn real(args: &[String]) -> Res<()> {
    let path = PathBuf::from(arg(args, "--model").ok_or("--model is required")?);
    let start = Instant::now();
    let model = ModelDir::open(&path)?;
    let opened = start.elapsed().as_secs_f64();
    let c = &model.config;
    println!(
        "## {} ({}): {} layers, hidden {}, {} heads / {} KV heads of {}, vocab {}\n",
        model.name(),
        path.display(),
        c.num_layers,
        c.hidden_size,
        c.num_heads,
        c.num_kv_heads,
        c.head_dim,
        c.vocab_size
    );
    let r = checked_model(&path, KvDtype::Bf16)?;
    println!(
        "| prompts | prefill logits: max abs err / max abs | prefill logits: L2 rel err | decode step 1 (batched): max abs err / max abs | greedy continuations differing (of 20, 16 steps) | where |"
    );
    println!("|---|---|---|---|---|---|");
    println!(
        "| 20 random (1..400 tokens) | {:.2e} | {:.2e} | {:.2e} | {} | {} |\n",
        r.prefill_max_rel,
        r.prefill_l2,
        r.decode_max_rel,
        r.greedy_differ.len(),
        where_(&r.greedy_differ)
    );

    let weights = Weights::open(&path)?;
    let blocks = 80;
    let mut cpu = CpuBackend::new(CpuModel::load(c, &weights)?, blocks, BS)?;
    let limits = CudaLimits {
        max_tokens: 1024,
        max_seqs: 64,
        staging_blocks: 64,
        ..CudaLimits::default()
    };
    let t = Instant::now();
    let mut gpu = CudaBackend::load(0, c, &weights, blocks, BS, limits)?;
    println!(
        "model opened (config, tokenizer) in {opened:.2} s; weights dequantized and uploaded to the GPU in {:.2} s\n",
        t.elapsed().as_secs_f64()
    );
    let chat = model.tokenizer.apply_chat_template(
        &[tandem_engine::ChatMessage {
            role: "user".into(),
            content: "What is the capital of France?".into(),
        }],
        true,
    )?;
    let prompt = model.tokenizer.encode(&chat, false)?;
    let table: Vec<u32> = (0..blocks_for(prompt.len() + 33, BS) as u32).collect();
    // The CPU's greedy answer, then the GPU fed the same tokens (teacher forcing):
    // at each step its logits against the CPU's and whether it picks the same token.
    // A different pick is a bf16 rounding only where the CPU's top two are close.
    let mut cpu_logits = vec![cpu.prefill(&prompt, 0, &table)?];
    let mut answer = Vec::new();
    while answer.len() < 32 {
        let next = argmax(cpu_logits.last().ok_or("no logits")?);
        answer.push(next);
        if c.eos_token_ids.contains(&next) {
            break;
        }
        let pos = prompt.len() + answer.len() - 1;
        cpu_logits.push(cpu.decode(&[(next, pos, &table)])?.remove(0));
    }
    let mut gpu_logits = vec![gpu.prefill(&prompt, 0, &table)?];
    for (k, &t) in answer.iter().enumerate().take(cpu_logits.len() - 1) {
        gpu_logits.push(gpu.decode(&[(t, prompt.len() + k, &table)])?.remove(0));
    }
    let margin = |l: &[f32]| {
        let mut v = l.to_vec();
        v.sort_by(|a, b| b.total_cmp(a));
        v[0] - v[1]
    };
    let mut worst = (0f32, 0f32);
    let mut flips = Vec::new();
    for (k, (g, cl)) in gpu_logits.iter().zip(&cpu_logits).enumerate() {
        worst = (worst.0.max(rel_err(g, cl)), worst.1.max(l2_err(g, cl)));
        if argmax(g) != answer[k] {
            flips.push((k, margin(cl)));
        }
    }
    println!(
        "chat question, CPU (f32) answer: {:?} ({} tokens)",
        model.tokenizer.decode(&answer)?,
        answer.len()
    );
    println!(
        "GPU (bf16) fed the same tokens: logits max abs err / max abs {:.2e}, L2 rel err {:.2e}; picks a different token at {} of {} steps {:?} (step, CPU top-2 margin)",
        worst.0,
        worst.1,
        flips.len(),
        answer.len(),
        flips
    );
    let mut next = argmax(&gpu_logits[0]);
    let mut free = Vec::new();
    while free.len() < 32 {
        free.push(next);
        if c.eos_token_ids.contains(&next) {
            break;
        }
        let pos = prompt.len() + free.len() - 1;
        next = argmax(&gpu.decode(&[(next, pos, &table)])?[0]);
    }
    println!(
        "GPU free-running answer: {:?}\n",
        model.tokenizer.decode(&free)?
    );
    if flips.iter().any(|&(_, m)| m > 0.5) {
        return Err("the GPU picks another token where the CPU's choice is clear".into());
    }

    // Speed: a 1024-token prefill and batch-1 decode steps at 1k context.
    let long: Vec<u32> = (0..1024u32)
        .map(|i| (i * 7919 + 13) % c.vocab_size as u32)
        .collect();
    let table: Vec<u32> = (0..blocks_for(long.len() + 64, BS) as u32).collect();
    let mut prefill = Vec::new();
    for _ in 0..5 {
        let t = Instant::now();
        gpu.prefill(&long, 0, &table)?;
        prefill.push(t.elapsed().as_secs_f64());
    }
    let mut decode = Vec::new();
    let mut next = 1u32;
    for k in 0..48 {
        let t = Instant::now();
        let t1 = [next];
        let chunk = SeqChunk {
            tokens: &t1,
            start: long.len() + k,
            block_table: &table,
        };
        next = gpu.forward_greedy(&[chunk], None)?[0];
        if k >= 16 {
            decode.push(t.elapsed().as_secs_f64());
        }
    }
    let (p, d) = (median(prefill), median(decode));
    println!(
        "GPU: prefill 1024 tokens {:.2} ms ({:.0} tokens/s); decode batch 1 at 1k context {:.3} ms/step ({:.0} tokens/s), medians",
        p * 1e3,
        1024.0 / p,
        d * 1e3,
        1.0 / d
    );
    Ok(())
}

// ---------------------------------------------------------------------------
// Against Hugging Face transformers (reference files written by scripts/hf_reference.py).

fn hf(args: &[String]) -> Res<()> {
    let dir = PathBuf::from(arg(args, "--dir").ok_or("--dir is required")?);
    let config = ModelConfig::from_file(&dir.join("config.json"))?;
    let weights = Weights::open(&dir)?;
    let refs: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("hf_ref.json"))?)?;
    let prompts: Vec<Vec<u32>> = serde_json::from_value(refs["prompts"].clone())?;
    let hf_greedy: Vec<Vec<u32>> = serde_json::from_value(refs["greedy"].clone())?;
    let read = |name: &str| -> Res<Vec<f32>> {
        Ok(std::fs::read(dir.join(name))?
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
            .collect())
    };
    let hf_logits = read("hf_logits.f32")?;
    let hf_f32 = read("hf_logits_fp32.f32").ok();
    let v = config.vocab_size;
    if hf_logits.len() != prompts.len() * v {
        return Err("hf_logits.f32 does not hold one row per prompt".into());
    }
    let max_len = prompts.iter().map(Vec::len).max().unwrap_or(1);
    let steps = hf_greedy.first().map_or(0, Vec::len);
    let per_seq = blocks_for(max_len + steps + 1, BS);
    let mut gpu = CudaBackend::load(
        0,
        &config,
        &weights,
        per_seq * prompts.len() + 1,
        BS,
        CudaLimits {
            max_tokens: 8192,
            max_seqs: 64,
            staging_blocks: 16,
            ..CudaLimits::default()
        },
    )?;
    gpu.poison()?;
    let mut worst = 0f32;
    let mut worst_l2 = 0f32;
    let (mut ours_f32, mut hf_vs_f32) = ((0f32, 0f32), (0f32, 0f32));
    let mut differ = Vec::new();
    for (i, p) in prompts.iter().enumerate() {
        let table: Vec<u32> = (0..per_seq).map(|j| (i * per_seq + j) as u32).collect();
        let logits = gpu.prefill(p, 0, &table)?;
        let row = |x: &[f32]| x[i * v..(i + 1) * v].to_vec();
        worst = worst.max(rel_err(&logits, &row(&hf_logits)));
        worst_l2 = worst_l2.max(l2_err(&logits, &row(&hf_logits)));
        if let Some(f) = &hf_f32 {
            ours_f32.0 = ours_f32.0.max(rel_err(&logits, &row(f)));
            ours_f32.1 = ours_f32.1.max(l2_err(&logits, &row(f)));
            hf_vs_f32.0 = hf_vs_f32.0.max(rel_err(&row(&hf_logits), &row(f)));
            hf_vs_f32.1 = hf_vs_f32.1.max(l2_err(&row(&hf_logits), &row(f)));
        }
        let cont = decode_alone(&mut gpu, argmax(&logits), p.len(), &table, steps)?;
        if let Some(k) = (0..steps).find(|&k| cont[k] != hf_greedy[i][k]) {
            differ.push(format!("#{i}(len {})@{k}", p.len()));
        }
    }
    println!("## correctness: CUDA vs Hugging Face transformers (bf16, SDPA)\n");
    println!("| logits of | against | max abs err / max abs | L2 rel err |");
    println!("|---|---|---|---|");
    println!("| Tandem CUDA (bf16) | HF bf16 (SDPA) | {worst:.2e} | {worst_l2:.2e} |");
    if hf_f32.is_some() {
        println!(
            "| Tandem CUDA (bf16) | HF fp32 (same weights) | {:.2e} | {:.2e} |",
            ours_f32.0, ours_f32.1
        );
        println!(
            "| HF bf16 (SDPA) | HF fp32 (same weights) | {:.2e} | {:.2e} |",
            hf_vs_f32.0, hf_vs_f32.1
        );
    }
    println!();
    println!(
        "model {} ({} layers, hidden {}, {} heads, {} KV heads, vocab {}), {} prompts (lengths {:?}); greedy continuations ({steps} tokens) differing from HF bf16: {} {}\n",
        dir.display(),
        config.num_layers,
        config.hidden_size,
        config.num_heads,
        config.num_kv_heads,
        config.vocab_size,
        prompts.len(),
        prompts.iter().map(Vec::len).collect::<Vec<_>>(),
        differ.len(),
        differ.join(", ")
    );
    Ok(())
}
