//! The per-token cost of structured output's grammar mask on the host: a JSON
//! schema compiled against a model's tokenizer, then, token after token, the
//! mask computed and applied to a vocabulary-sized logits row (what
//! `Generation::step` adds for a constrained request), the token chosen at
//! random among the allowed ones. No forward pass runs.
//!
//! `cargo run --release -p tandem-engine --example constraint_mask -- MODEL [TOKENS]`
//! (MODEL: a model directory or a GGUF file).

use std::time::{Duration, Instant};

use tandem_engine::{Constraint, ModelDir};

const SCHEMA: &str = r#"{"type": "object",
  "properties": {"name": {"type": "string"}, "age": {"type": "integer"},
                 "email": {"type": "string", "format": "email"},
                 "tags": {"type": "array", "items": {"type": "string"}},
                 "address": {"type": "object", "properties": {"street": {"type": "string"},
                             "city": {"type": "string"}, "zip": {"type": "string", "pattern": "^[0-9]{5}$"}},
                             "required": ["street", "city", "zip"]}},
  "required": ["name", "age", "email", "tags", "address"]}"#;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let path = args.next().ok_or("usage: constraint_mask MODEL [TOKENS]")?;
    let tokens: usize = args.next().map_or(Ok(2000), |t| t.parse())?;
    let model = ModelDir::open(std::path::Path::new(&path))?;
    let vocab = model.config.vocab_size;
    let start = Instant::now();
    let compiler = model.tokenizer.constraints()?;
    println!(
        "vocabulary {vocab} tokens; trie + parser factory built in {:?}",
        start.elapsed()
    );
    let eos = model.config.eos_token_ids.clone();
    let mut logits = vec![0f32; vocab];
    let mut times: Vec<Duration> = Vec::with_capacity(tokens);
    let mut compile = Duration::ZERO;
    let mut rng: u64 = 0x9E37_79B9_7F4A_7C15;
    let mut sequences = 0;
    while times.len() < tokens {
        let t = Instant::now();
        let mut state = compiler.start(&Constraint::JsonSchema(SCHEMA.into()))?;
        compile += t.elapsed();
        sequences += 1;
        while times.len() < tokens && !state.is_stopped() {
            logits.iter_mut().for_each(|l| *l = 0.0);
            let t = Instant::now();
            state.mask_logits(&mut logits, &eos)?;
            times.push(t.elapsed());
            let allowed: Vec<u32> = (0..vocab as u32)
                .filter(|&i| logits[i as usize].is_finite() && !eos.contains(&i))
                .collect();
            if allowed.is_empty() {
                break;
            }
            rng ^= rng << 13;
            rng ^= rng >> 7;
            rng ^= rng << 17;
            state.advance(allowed[(rng % allowed.len() as u64) as usize])?;
        }
    }
    times.sort_unstable();
    let us = |d: Duration| d.as_secs_f64() * 1e6;
    let mean = times.iter().map(|&d| us(d)).sum::<f64>() / times.len() as f64;
    println!(
        "{} tokens in {sequences} sequences: mask {mean:.1} µs/token mean, p50 {:.1}, p99 {:.1}; compile {:.0} µs/sequence",
        times.len(),
        us(times[times.len() / 2]),
        us(times[times.len() * 99 / 100]),
        us(compile) / sequences as f64
    );
    Ok(())
}
