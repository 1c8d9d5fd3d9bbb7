//! `tandem-gpu-bench`: checks the CUDA backend against the CPU backend (and
//! against Hugging Face logits) and measures it, in one process, so that one
//! call on a GPU machine does everything. Built with `--features cuda`.
//!
//! ```text
//! tandem-gpu-bench check  [--dir DIR]                  CPU vs GPU on synthesized models
//! tandem-gpu-bench hf     --dir DIR                    GPU vs HF logits (scripts/hf_reference.py)
//! tandem-gpu-bench real   --model PATH                 CPU vs GPU on a real model (GGUF or directory)
//! tandem-gpu-bench bench  [--shape llama3-8b] [--layers N] [--quick]
//! tandem-gpu-bench kernels [--shape llama3-8b]          where a decode step's time goes
//! ```

use std::path::{Path, PathBuf};
use std::time::Instant;

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use tandem_engine::ModelDir;
use tandem_engine::TokenDraw;
use tandem_engine::backend::{Backend, BackendExt, KvExport, KvIo, SeqChunk, argmax};
use tandem_engine::block_manager::blocks_for;
use tandem_engine::config::{Architecture, ModelConfig};
use tandem_engine::cpu::{CpuBackend, CpuModel};
use tandem_engine::cuda::{CudaBackend, CudaLimits, Gpu, GpuModel, named_config};
use tandem_engine::synth::{SynthDtype, SynthSpec, write_model_dir};
use tandem_engine::weights::Weights;

type Res<T> = Result<T, Box<dyn std::error::Error>>;

const BS: usize = 16;

fn arg(args: &[String], name: &str) -> Option<String> {
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1).cloned())
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let result = match args.first().map(String::as_str) {
        Some("check") => check(&args),
        Some("hf") => hf(&args),
        Some("real") => real(&args),
        Some("bench") => bench(&args),
        Some("kernels") => kernels(&args),
        _ => Err("usage: tandem-gpu-bench check|hf|real|bench|kernels [options]".into()),
    };
    if let Err(e) = result {
        eprintln!("error: {e}");
        std::process::exit(1);
    }
}

/// max |a - b| / max |b|: the error relative to the logits' scale.
fn rel_err(gpu: &[f32], cpu: &[f32]) -> f32 {
    let scale = cpu.iter().fold(0f32, |m, v| m.max(v.abs())).max(1e-6);
    let diff = gpu.iter().zip(cpu).fold(0f32, |m, (a, b)| {
        if (a - b).is_nan() {
            f32::INFINITY
        } else {
            m.max((a - b).abs())
        }
    });
    diff / scale
}

/// ||a - b|| / ||b||.
fn l2_err(gpu: &[f32], cpu: &[f32]) -> f32 {
    let (mut d, mut r) = (0f64, 0f64);
    for (a, b) in gpu.iter().zip(cpu) {
        d += ((a - b) as f64).powi(2);
        r += (*b as f64).powi(2);
    }
    (d.sqrt() / r.sqrt().max(1e-12)) as f32
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

// ---------------------------------------------------------------------------
// Correctness against the CPU backend.

fn check(args: &[String]) -> Res<()> {
    let root = PathBuf::from(arg(args, "--dir").unwrap_or_else(|| "/tmp/tandem-check".into()));
    let models = [
        ("llama-hd32", Architecture::Llama, 256, 8, 4, 2048),
        ("llama-hd128", Architecture::Llama, 1024, 8, 2, 2048),
        ("qwen2-hd64", Architecture::Qwen2, 512, 8, 2, 2048),
        ("mistral-window256", Architecture::Mistral, 256, 8, 4, 512),
    ];
    let mut failed = false;
    println!("## correctness: CUDA (bf16) vs CPU (f32) on synthesized bf16-weight models\n");
    println!(
        "| model | prompts | prefill logits: max abs err / max abs | prefill logits: L2 rel err | decode step 1 (batched): max abs err / max abs | greedy continuations differing (of 20, 16 steps) | where (prompt, step) |"
    );
    println!("|---|---|---|---|---|---|---|");
    for (name, arch, hidden, heads, kv_heads, max_pos) in models {
        let dir = root.join(name);
        if !dir.join("config.json").exists() {
            write_model_dir(
                &dir,
                &SynthSpec {
                    architecture: arch,
                    hidden_size: hidden,
                    intermediate_size: hidden * 11 / 4,
                    num_heads: heads,
                    num_kv_heads: kv_heads,
                    max_position_embeddings: max_pos,
                    dtype: SynthDtype::Bf16,
                    seed: 7,
                    ..SynthSpec::default()
                },
            )?;
        }
        let r = check_model(&dir)?;
        failed |= !(r.0 < 5e-2 && r.1 < 5e-2 && r.4 < 1e-2);
        println!(
            "| {name} | 20 (1..400 tokens, every 3rd prefilled in 2 chunks) | {:.2e} | {:.2e} | {:.2e} | {} | {} |",
            r.0, r.4, r.1, r.2, r.3
        );
    }
    println!();
    if failed {
        return Err("logits error above tolerance (L2 1e-2, max 5e-2)".into());
    }
    Ok(())
}

/// (max prefill rel err, max decode rel err, continuations differing, divergence
/// steps, max prefill L2 rel err).
fn check_model(dir: &Path) -> Res<(f32, f32, usize, String, f32)> {
    let config = ModelDir::open(dir)?.config;
    let weights = Weights::open(dir)?;
    let steps = 16;
    let mut rng = ChaCha8Rng::seed_from_u64(11);
    let max_len = 400.min(config.max_position_embeddings - steps - 1);
    let prompts: Vec<Vec<u32>> = (0..20)
        .map(|i| {
            let len = if i == 0 {
                1
            } else {
                rng.random_range(2..=max_len)
            };
            (0..len)
                .map(|_| rng.random_range(0..config.vocab_size as u32))
                .collect()
        })
        .collect();
    // Each sequence gets its own blocks, in reverse order, so paging is exercised.
    let per_seq = blocks_for(max_len + steps + 1, BS);
    let num_blocks = per_seq * prompts.len() + 8;
    let tables: Vec<Vec<u32>> = (0..prompts.len())
        .map(|i| {
            (0..per_seq)
                .rev()
                .map(|j| (i * per_seq + j) as u32)
                .collect()
        })
        .collect();
    let mut cpu = CpuBackend::new(CpuModel::load(&config, &weights)?, num_blocks, BS)?;
    let limits = CudaLimits {
        max_tokens: 1024,
        max_seqs: 64,
        staging_blocks: 64,
        ..CudaLimits::default()
    };
    let mut gpu = CudaBackend::load(0, &config, &weights, num_blocks, BS, limits)?;
    gpu.poison()?;

    let mut prefill_err = 0f32;
    let mut prefill_l2 = 0f32;
    let mut cpu_next = Vec::new();
    let mut gpu_next = Vec::new();
    for (i, p) in prompts.iter().enumerate() {
        let c = cpu.prefill(p, 0, &tables[i])?;
        let g = if i % 3 == 0 && p.len() > 1 {
            let half = p.len() / 2;
            gpu.prefill(&p[..half], 0, &tables[i])?;
            gpu.prefill(&p[half..], half, &tables[i])?
        } else {
            gpu.prefill(p, 0, &tables[i])?
        };
        prefill_err = prefill_err.max(rel_err(&g, &c));
        prefill_l2 = prefill_l2.max(l2_err(&g, &c));
        cpu_next.push(argmax(&c));
        gpu_next.push(argmax(&g));
    }

    // KV wire: the GPU's exported layer (bf16) against the CPU's (f32).
    let cpu_kv = cpu.export_layer(1, &tables[5][..2])?;
    let gpu_kv = gpu.export_layer(1, &tables[5][..2])?;
    let as_f32: Vec<f32> = gpu_kv
        .chunks_exact(2)
        .map(|b| half::bf16::from_le_bytes([b[0], b[1]]).to_f32())
        .collect();
    let cpu_f32: Vec<f32> = cpu_kv
        .chunks_exact(4)
        .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
        .collect();
    let used = prompts[5].len().min(2 * BS);
    let kv_err = rel_err(&as_f32, &cpu_f32);
    // Import into spare blocks and read back: byte-identical.
    let spare: Vec<u32> = (num_blocks as u32 - 2..num_blocks as u32).collect();
    gpu.import_layer(1, &spare, &gpu_kv)?;
    let back = gpu.export_layer(1, &spare)?;
    eprintln!(
        "{}: KV layer export rel err vs CPU {kv_err:.2e} ({used} tokens), import/export roundtrip {}",
        dir.display(),
        if back == gpu_kv {
            "identical"
        } else {
            "DIFFERS"
        }
    );
    if back != gpu_kv {
        return Err("KV import/export roundtrip differs".into());
    }

    // Greedy continuations: the GPU decodes all 20 in one batch per step, on the
    // device (forward_greedy), first kernel by kernel, then as graph replays (the
    // same K/V is rewritten where the two agree); the CPU one sequence at a time.
    let mut decode_err = 0f32;
    let mut cpu_cont = vec![Vec::new(); prompts.len()];
    let mut cpu_step0 = Vec::new();
    let first_tokens = gpu_next.clone();
    let mut conts = Vec::new();
    for graphs in [false, true] {
        gpu.set_graphs(graphs);
        let mut next = first_tokens.clone();
        let mut cont = vec![Vec::new(); prompts.len()];
        for step in 0..steps {
            let mut batch = Vec::new();
            for (i, p) in prompts.iter().enumerate() {
                let pos = p.len() + step;
                if !graphs {
                    let c = cpu.decode(&[(cpu_next[i], pos, &tables[i])])?;
                    cpu_cont[i].push(cpu_next[i]);
                    cpu_next[i] = argmax(&c[0]);
                    if step == 0 {
                        cpu_step0.push(c.into_iter().next().unwrap_or_default());
                    }
                }
                batch.push((next[i], pos, tables[i].as_slice()));
            }
            let toks: Vec<[u32; 1]> = batch.iter().map(|b| [b.0]).collect();
            let chunks: Vec<SeqChunk<'_>> = batch
                .iter()
                .zip(&toks)
                .map(|(b, t)| SeqChunk {
                    tokens: t,
                    start: b.1,
                    block_table: b.2,
                })
                .collect();
            if step == 0 && !graphs {
                // The batched decode step's logits against the CPU's, where both were
                // fed the same token (forward_greedy below rewrites the same K/V).
                let g = gpu.forward_logits(&chunks, None)?;
                for i in 0..prompts.len() {
                    if cpu_cont[i][0] == next[i] {
                        decode_err = decode_err.max(rel_err(&g[i], &cpu_step0[i]));
                    }
                }
            }
            let ids = gpu.forward_greedy(&chunks, None)?;
            for (i, id) in ids.into_iter().enumerate() {
                cont[i].push(next[i]);
                next[i] = id;
            }
        }
        conts.push(cont);
    }
    let graph_differ = (0..prompts.len())
        .filter(|&i| conts[0][i] != conts[1][i])
        .count();
    eprintln!(
        "{}: greedy continuations, graph replays vs kernel-by-kernel: {graph_differ} of {} differ ({} graphs captured)",
        dir.display(),
        prompts.len(),
        gpu.graphs_captured()
    );
    let gpu_cont = conts.pop().unwrap_or_default();
    // The first six sequences decoded alone (one-token passes take the fused
    // single-row path), against the CPU.
    // Then again without programmatic dependent launches: the same tokens, or the
    // kernels' ordering is wrong.
    let mut alone_differ = Vec::new();
    let mut pdl_differ = 0;
    for i in 0..6.min(prompts.len()) {
        let mut conts = Vec::new();
        for pdl in [true, false] {
            gpu.set_pdl(pdl);
            conts.push(decode_alone(
                &mut gpu,
                first_tokens[i],
                prompts[i].len(),
                &tables[i],
                steps,
            )?);
        }
        gpu.set_pdl(true);
        let cont = &conts[0];
        if conts[1] != *cont {
            pdl_differ += 1;
        }
        if let Some(k) = (0..steps).find(|&k| cont[k] != cpu_cont[i][k]) {
            alone_differ.push(format!("#{i}@{k}"));
        }
    }
    eprintln!(
        "{}: sequences decoded alone, with vs without programmatic dependent launches: {pdl_differ} of 6 differ",
        dir.display()
    );
    if pdl_differ > 0 {
        return Err("programmatic dependent launches change decode results".into());
    }
    eprintln!(
        "{}: sequences decoded alone vs the CPU: {} of 6 differ {}",
        dir.display(),
        alone_differ.len(),
        alone_differ.join(", ")
    );
    let mut differ = 0;
    let mut where_ = Vec::new();
    for i in 0..prompts.len() {
        if let Some(k) = (0..steps).find(|&k| cpu_cont[i][k] != gpu_cont[i][k]) {
            differ += 1;
            where_.push(format!("#{i}(len {})@{k}", prompts[i].len()));
        }
    }
    let where_ = if where_.is_empty() {
        "-".into()
    } else {
        where_.join(", ")
    };
    Ok((prefill_err, decode_err, differ, where_, prefill_l2))
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
    let r = check_model(&path)?;
    println!(
        "| prompts | prefill logits: max abs err / max abs | prefill logits: L2 rel err | decode step 1 (batched): max abs err / max abs | greedy continuations differing (of 20, 16 steps) | where |"
    );
    println!("|---|---|---|---|---|---|");
    println!(
        "| 20 random (1..400 tokens) | {:.2e} | {:.2e} | {:.2e} | {} | {} |\n",
        r.0, r.4, r.1, r.2, r.3
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

// ---------------------------------------------------------------------------
// Benchmarks on a random-weight model of a named shape.

fn bench(args: &[String]) -> Res<()> {
    let shape = arg(args, "--shape").unwrap_or_else(|| "llama3-8b".into());
    let layers = arg(args, "--layers").map(|s| s.parse()).transpose()?;
    let quick = args.iter().any(|a| a == "--quick");
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
    let kv_token_bytes = config.num_layers * config.kv_bytes_per_token_per_layer(2);
    let block_bytes_all = kv_token_bytes * BS;
    let reserve = 3usize << 30;
    let num_blocks = (free.saturating_sub(reserve)) / block_bytes_all;
    let limits = CudaLimits::default();
    let weight_bytes = 2 * model.streamed_params();
    let mut be = CudaBackend::new(gpu, model, num_blocks, BS, limits)?;
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
        "GPU memory {:.1} GiB; weights {:.2} GB; KV cache {num_blocks} blocks of {BS} tokens ({:.1} GB, {} KiB/token); set-up {:.1} s\n",
        total as f64 / (1u64 << 30) as f64,
        weight_bytes as f64 / 1e9,
        (num_blocks * block_bytes_all) as f64 / 1e9,
        kv_token_bytes / 1024,
        t0.elapsed().as_secs_f64()
    );

    // Decode.
    println!(
        "### decode step (CUDA graph replays, greedy sampling on the GPU; median of 10 steps after 3 warm-up)\n"
    );
    println!(
        "Floor bandwidth {bw:.0} GB/s: a 2 GiB device-to-device copy on this GPU, bytes read + written.\n"
    );
    println!(
        "| context | batch | step ms | floor ms (weights+KV ÷ {bw:.0} GB/s) | step ÷ floor | tokens/s | without graphs ms | without PDL ms | top-p sampling ms |"
    );
    println!("|---|---|---|---|---|---|---|---|---|");
    let batches: &[usize] = if quick {
        &[1, 64]
    } else {
        &[1, 8, 32, 64, 128, 256]
    };
    let mut rng = ChaCha8Rng::seed_from_u64(5);
    for ctx in [1024usize, 4096] {
        for &batch in batches {
            let steps = 13;
            let per_seq = blocks_for(ctx + steps + 1, BS);
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

    sampling_check(&mut be, config.vocab_size)?;

    // Prefill.
    println!(
        "### prefill (one sequence; chunks of {} tokens; median of 3 after a warm-up)\n",
        limits.max_tokens
    );
    println!(
        "| prompt | time ms | tokens/s | TFLOP/s (linear + causal attention) | of 793 TFLOP/s | with every layer exported as computed, ms |"
    );
    println!("|---|---|---|---|---|---|");
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
        let blocks = blocks_for(len, BS);
        if blocks > num_blocks {
            println!("| {len} | does not fit | | | | |");
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
                    let chunk_blocks = &table[start / BS..end.div_ceil(BS)];
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
        let te = prefill(&mut be, true)?;
        let flops = 2.0 * len as f64 * linear_params as f64
            + config.num_layers as f64
                * 4.0
                * (hq * hd) as f64
                * (len as f64 * (len as f64 + 1.0) / 2.0);
        println!(
            "| {len} | {:.1} | {:.0} | {:.0} | {:.1}% | {:.1} |",
            t * 1e3,
            len as f64 / t,
            flops / t / 1e12,
            flops / t / 793e12 * 100.0,
            te * 1e3
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
            blocks.len() * BS,
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
fn sampling_check(be: &mut CudaBackend, vocab: usize) -> Res<()> {
    let (batch, ctx, rounds) = (64usize, 256usize, 80usize);
    let table: Vec<u32> = (0..blocks_for(ctx + 1, BS) as u32).collect();
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

/// Where a decode step's time goes: each weight product alone (as the `gemv`
/// kernel at batch 1 and cuBLAS at batch 64) against the copy bandwidth, and the
/// cost of one decoder layer (steps of a 4-layer model minus a 0-layer one).
fn kernels(args: &[String]) -> Res<()> {
    let shape = arg(args, "--shape").unwrap_or_else(|| "llama3-8b".into());
    let config = named_config(&shape, Some(4))?;
    let gpu = Gpu::open(0, &config)?;
    let bw = gpu.copy_bandwidth_gbs(2 << 30)?;
    let (h, inter, v) = (
        config.hidden_size,
        config.intermediate_size,
        config.vocab_size,
    );
    let qkvw = (config.num_heads + 2 * config.num_kv_heads) * config.head_dim;
    println!(
        "## where a decode step's time goes ({shape}, {})\n",
        gpu.name()
    );
    println!("Copy bandwidth {bw:.0} GB/s.\n");
    println!("| product (out × in) | rows | µs | weight GB/s | of copy bandwidth |");
    println!("|---|---|---|---|---|");
    for (name, out, k) in [
        ("qkv", qkvw, h),
        ("o", h, config.num_heads * config.head_dim),
        ("gate_up", 2 * inter, h),
        ("down", h, inter),
        ("lm_head", v, h),
    ] {
        let w = gpu.zeros::<half::bf16>(out * k)?;
        let x = gpu.zeros::<half::bf16>(64 * k)?;
        let y = gpu.zeros::<f32>(64 * out)?;
        let st = gpu.device_ptr(&w);
        gpu.fill_uniform(st, out * k, 3, -0.05, 0.05)?;
        gpu.fill_uniform(gpu.device_ptr(&x), 64 * k, 4, -1.0, 1.0)?;
        for rows in [1usize, 64] {
            let mut times = Vec::new();
            for i in 0..25 {
                gpu.sync()?;
                let t0 = Instant::now();
                for _ in 0..10 {
                    gpu.gemm(
                        gpu.device_ptr(&x),
                        st,
                        gpu.device_ptr(&y),
                        rows,
                        k,
                        out,
                        true,
                    )?;
                }
                gpu.sync()?;
                if i >= 5 {
                    times.push(t0.elapsed().as_secs_f64() / 10.0);
                }
            }
            let t = median(times);
            let gbs = (out * k * 2) as f64 / t / 1e9;
            println!(
                "| {name} ({out} × {k}) | {rows} | {:.1} | {gbs:.0} | {:.0}% |",
                t * 1e6,
                gbs / bw * 100.0
            );
        }
    }
    println!();
    println!(
        "| layers | context | batch | step ms | per layer ms | layer bytes (weights + KV) GB/s | of copy bandwidth |"
    );
    println!("|---|---|---|---|---|---|---|");
    let mut steps = Vec::new();
    let mut profiles = Vec::new();
    let mut be_wave = 0;
    for layers in [0usize, 4] {
        let c = named_config(&shape, Some(layers))?;
        let g = Gpu::open(0, &c)?;
        let model = GpuModel::random(&g, &c, 1)?;
        let mut be = CudaBackend::new(g, model, 64 * 260 + 8, BS, CudaLimits::default())?;
        be.fill_cache_random(3)?;
        for (ctx, batch) in [(1024usize, 1usize), (4096, 64)] {
            let per_seq = blocks_for(ctx + 20, BS);
            let tables = consecutive_tables(batch, per_seq);
            let mut toks = vec![1u32; batch];
            let t = time_decode(&mut be, &tables, ctx, &mut toks, TokenDraw::GREEDY)?;
            steps.push((layers, ctx, batch, t));
        }
        if layers > 0 {
            be_wave = be.decode_wave();
            // Decode attention split as the backend chooses (None), or aiming at
            // 4096 blocks (the rule before 2026-12-02) for comparison.
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
            ] {
                be.set_decode_blocks(blocks);
                let per_seq = blocks_for(ctx + 20, BS);
                let tables = consecutive_tables(batch, per_seq);
                let toks = vec![[1u32]; batch];
                let chunks: Vec<SeqChunk<'_>> = toks
                    .iter()
                    .zip(&tables)
                    .map(|(t, table)| SeqChunk {
                        tokens: t,
                        start: ctx,
                        block_table: table,
                    })
                    .collect();
                // The fastest of 5 runs per kernel, after a warm-up.
                let mut best: Vec<(&'static str, f64)> = be.profile(&chunks)?;
                for _ in 0..5 {
                    for (slot, (_, us)) in best.iter_mut().zip(be.profile(&chunks)?) {
                        slot.1 = slot.1.min(us);
                    }
                }
                let mut toks = vec![1u32; batch];
                let t = time_decode(&mut be, &tables, ctx, &mut toks, TokenDraw::GREEDY)?;
                profiles.push((ctx, batch, layers, blocks, t, best));
            }
            be.set_decode_blocks(None);
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
        println!("| kernel | µs per step | µs per layer | share |");
        println!("|---|---|---|---|");
        for (name, us) in prof {
            println!(
                "| {name} | {us:.1} | {:.1} | {:.0}% |",
                us / *layers as f64,
                us / total * 100.0
            );
        }
        println!();
    }
    Ok(())
}

/// Block tables for `batch` sequences of `per_seq` blocks each, side by side in
/// the cache: sequence i owns blocks `i * per_seq .. (i + 1) * per_seq`.
fn consecutive_tables(batch: usize, per_seq: usize) -> Vec<Vec<u32>> {
    (0..batch)
        .map(|i| ((i * per_seq) as u32..((i + 1) * per_seq) as u32).collect())
        .collect()
}

/// `steps` greedy tokens of one sequence decoded alone (batch 1) from `first`
/// at position `start`: `first` and the tokens it leads to, each fed back.
fn decode_alone(
    be: &mut CudaBackend,
    first: u32,
    start: usize,
    table: &[u32],
    steps: usize,
) -> Res<Vec<u32>> {
    let mut next = first;
    let mut cont = Vec::with_capacity(steps);
    for k in 0..steps {
        cont.push(next);
        let t = [next];
        let chunk = SeqChunk {
            tokens: &t,
            start: start + k,
            block_table: table,
        };
        next = be.forward_greedy(&[chunk], None)?[0];
    }
    Ok(cont)
}

/// Median seconds of a decode step, of 13 after 3 warm-up: one sequence per block
/// table at positions `ctx..`, each step fed the tokens the last one chose with `draw`.
fn time_decode(
    be: &mut CudaBackend,
    tables: &[Vec<u32>],
    ctx: usize,
    toks: &mut Vec<u32>,
    draw: TokenDraw,
) -> Res<f64> {
    let mut times = Vec::new();
    for step in 0..13 {
        let t: Vec<[u32; 1]> = toks.iter().map(|&x| [x]).collect();
        let chunks: Vec<SeqChunk<'_>> = t
            .iter()
            .zip(tables)
            .map(|(t, table)| SeqChunk {
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
