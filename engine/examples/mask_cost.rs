//! Benchmark (not a test) of structured output's costs, for
//! docs/STRUCTURED_OUTPUT.md:
//!
//! - `mask`: the per-token cost on the host of llguidance's mask for one JSON
//!   schema (`ConstraintState::allowed`) over each tokenizer given (a GGUF
//!   model's or a `tokenizer.json` directory's), walking the tokens of a
//!   valid document through the grammar.
//! - `tpot`: decode time per step of a batch of 8 on the CPU backend, with no
//!   constrained request, with one whose mask is computed at sampling time, and
//!   with one whose mask is computed while the pass runs
//!   (`tandem_engine::mask_overlap`), run round-robin in one process.
//!
//! ```text
//! cargo run -p tandem-engine --example mask_cost -- mask models/SmolLM2-135M-Instruct.Q4_1.gguf DIR_WITH_TOKENIZER_JSON
//! cargo run -p tandem-engine --example mask_cost -- tpot models/SmolLM2-135M-Instruct.Q4_1.gguf
//! ```

use std::path::Path;
use std::time::{Duration, Instant};

use tandem_engine::block_manager::{BlockManager, blocks_for};
use tandem_engine::mask_overlap::{MaskJob, overlap};
use tandem_engine::{
    BackendExt, Constraint, Generation, GenerationParams, ModelConfig, ModelDir, SamplingParams,
    SeqChunk, Tokenizer,
};

type Res<T> = Result<T, Box<dyn std::error::Error>>;

const SCHEMA: &str = r#"{"type": "object", "x-guidance": {"whitespace_flexible": false},
  "properties": {"name": {"type": "string"}, "age": {"type": "integer"},
                 "email": {"type": "string", "format": "email"},
                 "tags": {"type": "array", "items": {"type": "string"}},
                 "address": {"type": "object", "properties": {"city": {"type": "string"}, "zip": {"type": "string", "pattern": "^[0-9]{5}$"}},
                             "required": ["city", "zip"], "additionalProperties": false}},
  "required": ["name", "age", "email", "tags", "address"], "additionalProperties": false}"#;

const DOCUMENT: &str = r#"{"name":"Ada Lovelace, Countess of Lovelace","age":36,"email":"ada@analytical.engine","tags":["mathematics","poetry of science","first programmer"],"address":{"city":"London","zip":"12345"}}"#;

fn tokenizer(path: &Path) -> Res<Tokenizer> {
    if path.is_dir() {
        // A bare tokenizer directory: a config just big enough for its vocabulary.
        let config = ModelConfig::from_json(
            r#"{"architectures": ["LlamaForCausalLM"], "vocab_size": 128256, "hidden_size": 64,
                "intermediate_size": 128, "num_hidden_layers": 1, "num_attention_heads": 2,
                "num_key_value_heads": 1, "max_position_embeddings": 1024, "rms_norm_eps": 1e-5,
                "eos_token_id": 128001}"#,
        )?;
        Ok(Tokenizer::from_dir(path, &config)?)
    } else {
        Ok(ModelDir::open(path)?.tokenizer)
    }
}

fn mask(paths: &[String]) -> Res<()> {
    println!(
        "| tokenizer | vocab | compile (ms) | tokens | mask mean (µs) | p50 | p90 | p99 | max |"
    );
    println!("| --- | --- | --- | --- | --- | --- | --- | --- | --- |");
    for path in paths {
        let tk = tokenizer(Path::new(path))?;
        let t = Instant::now();
        let compiler = tk.constraints()?;
        let trie_ms = t.elapsed().as_secs_f64() * 1e3;
        let tokens = tk.encode(DOCUMENT, false)?;
        let constraint = Constraint::JsonSchema(SCHEMA.into());
        let mut times: Vec<Duration> = Vec::new();
        let mut compile = Duration::ZERO;
        for _ in 0..10 {
            let c0 = Instant::now();
            let mut state = compiler.start(&constraint)?;
            compile += c0.elapsed();
            for &tok in &tokens {
                let t0 = Instant::now();
                let allowed = state.allowed()?;
                times.push(t0.elapsed());
                if !allowed.allows(tok) {
                    return Err(format!("the grammar refused token {tok} of the document").into());
                }
                state.advance(tok)?;
            }
        }
        times.sort_unstable();
        let us = |d: Duration| d.as_secs_f64() * 1e6;
        let mean = times.iter().map(|&d| us(d)).sum::<f64>() / times.len() as f64;
        println!(
            "| {path} | {} | trie {trie_ms:.0}, schema {:.1} | {} | {mean:.1} | {:.1} | {:.1} | {:.1} | {:.1} |",
            tk.vocab_size(),
            compile.as_secs_f64() * 1e3 / 10.0,
            tokens.len(),
            us(times[times.len() / 2]),
            us(times[times.len() * 9 / 10]),
            us(times[times.len() * 99 / 100]),
            us(times[times.len() - 1]),
        );
    }
    Ok(())
}

/// Runs 8 sequences for `steps` decode steps; `constrained`: the first one has
/// the schema; `overlapped`: its mask is computed during the pass. Returns the
/// mean time per decode step over the steps where all 8 were in the batch,
/// and how many such steps there were.
fn decode_batch(
    m: &ModelDir,
    constrained: bool,
    overlapped: bool,
    steps: usize,
) -> Res<(Duration, u32)> {
    const BLOCK: usize = 16;
    let mut backend = m.load_cpu(128, BLOCK)?;
    let mut blocks = BlockManager::new(128);
    let tk = &m.tokenizer;
    let mut gens = Vec::new();
    let mut tables = Vec::new();
    for i in 0..8 {
        let prompt = tk.encode(&format!("Write about person number {i} as JSON:"), true)?;
        tables.push(blocks.allocate(blocks_for(prompt.len() + steps + 2, BLOCK))?);
        let params = GenerationParams {
            sampling: SamplingParams {
                temperature: 1.0,
                seed: Some(i),
                ..Default::default()
            },
            max_tokens: steps + 1,
            ignore_eos: true,
            constraint: (constrained && i == 0).then(|| Constraint::JsonSchema(SCHEMA.into())),
            ..Default::default()
        };
        gens.push(Generation::new(prompt, params, &m.config.eos_token_ids)?);
    }
    let mut decode_time = Duration::ZERO;
    let mut decode_steps = 0;
    for step in 0..=steps {
        let live: Vec<usize> = (0..8).filter(|&i| gens[i].finished().is_none()).collect();
        if live.is_empty() {
            break;
        }
        let t = Instant::now();
        let mut lent: Vec<(usize, MaskJob)> = Vec::new();
        if overlapped {
            for &i in &live {
                if let Some(job) = gens[i].lend_mask_job(tk)? {
                    lent.push((i, job));
                }
            }
        }
        let (ids, mut jobs): (Vec<usize>, Vec<MaskJob>) = lent.into_iter().unzip();
        let chunks: Vec<SeqChunk<'_>> = live
            .iter()
            .map(|&i| {
                let g = &gens[i];
                let start = if g.output().is_empty() {
                    0
                } else {
                    g.tokens().len() - 1
                };
                SeqChunk {
                    tokens: &g.tokens()[start..],
                    start,
                    block_table: &tables[i],
                }
            })
            .collect();
        let logits = overlap(&mut jobs, || backend.forward_logits(&chunks, None))?;
        drop(chunks);
        for (i, job) in ids.into_iter().zip(jobs) {
            gens[i].return_mask_job(job);
        }
        for (&i, mut row) in live.iter().zip(logits) {
            gens[i].step(&mut row, tk)?;
        }
        // Step 0 is the prefill; a batch a sequence has left is not counted.
        if step > 0 && live.len() == 8 {
            decode_time += t.elapsed();
            decode_steps += 1;
        }
    }
    Ok((decode_time / decode_steps.max(1), decode_steps))
}

fn tpot(model: &str) -> Res<()> {
    let m = ModelDir::open(Path::new(model))?;
    let steps = 48;
    let configs = [
        ("8 free", false, false),
        ("7 free + 1 schema, mask at sampling", true, false),
        ("7 free + 1 schema, mask during the pass", true, true),
    ];
    let mut sums = [Duration::ZERO; 3];
    let mut counted = [0u32; 3];
    let rounds = 3;
    // Warm-up, then round-robin so that the machine's load falls on all alike.
    decode_batch(&m, false, false, 4)?;
    for _ in 0..rounds {
        for (k, &(_, c, o)) in configs.iter().enumerate() {
            let (t, n) = decode_batch(&m, c, o, steps)?;
            sums[k] += t;
            counted[k] += n;
        }
    }
    println!(
        "| batch of 8, up to {steps} decode steps x {rounds} rounds | TPOT (ms) | steps with all 8 |"
    );
    println!("| --- | --- | --- |");
    for (k, (name, _, _)) in configs.iter().enumerate() {
        println!(
            "| {name} | {:.1} | {} |",
            (sums[k] / rounds).as_secs_f64() * 1e3,
            counted[k]
        );
    }
    Ok(())
}

fn main() -> Res<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match args.first().map(String::as_str) {
        Some("mask") if args.len() > 1 => mask(&args[1..]),
        Some("tpot") if args.len() == 2 => tpot(&args[1]),
        _ => Err("usage: mask_cost mask TOKENIZER... | mask_cost tpot MODEL".into()),
    }
}
