//! The prompts a benchmark sends: synthetic token ids or text, or ShareGPT.
//!
//! `synthetic` follows `vllm bench serve --dataset-name random`: input and
//! output lengths are drawn uniformly from `[len * (1 - r), len * (1 + r)]`
//! for a range ratio `r`, an optional shared prefix of `--prefix-len` random
//! tokens starts every prompt, and the rest of prompt `i` is the run of ids
//! `(offset_i + i + j) % vocab`, so prompts differ and do not share a cache.
//! As `--prompt-format text` the same ids become words from a fixed list
//! (a word is one or a few tokens, depending on the tokenizer; the server's
//! count of prompt tokens is what gets reported).
//!
//! `sharegpt` reads the ShareGPT JSON (a list of `{conversations: [{from,
//! value}, ...]}`): the first `human` turn is the prompt, the `gpt` turn after
//! it sets the output length. Without a tokenizer, lengths are approximated
//! as `ceil(chars / 4)` tokens; vLLM's filters are applied to those
//! approximations (both at least 4, prompt at most 1024, sum at most 2048).
//! Conversations are shuffled with the seed, then the first `--num-prompts` kept.

use std::path::Path;

use anyhow::Context;
use rand::Rng;
use rand::seq::SliceRandom;
use serde::Deserialize;

/// What is sent as the prompt.
#[derive(Clone, Debug, PartialEq)]
pub enum PromptInput {
    Text(String),
    TokenIds(Vec<u32>),
}

/// One request's prompt and how many tokens to generate for it.
#[derive(Clone, Debug, PartialEq)]
pub struct BenchPrompt {
    pub input: PromptInput,
    /// Prompt length in tokens (approximate for text).
    pub input_len: usize,
    pub output_len: usize,
}

/// Shape of synthetic prompts.
#[derive(Clone, Copy, Debug)]
pub struct SyntheticSpec {
    pub num_prompts: usize,
    pub input_len: usize,
    pub output_len: usize,
    pub input_range_ratio: f64,
    pub output_range_ratio: f64,
    pub prefix_len: usize,
    pub vocab_size: u32,
    pub as_text: bool,
}

/// The words text prompts are made of; id `i` becomes `WORDS[i % len]`.
pub(crate) const WORDS: &[&str] = &[
    "the", "river", "stone", "light", "green", "slow", "house", "bird", "cold", "open", "north",
    "paper", "quiet", "table", "small", "water", "bright", "road", "window", "summer",
];

/// Length `len` spread by `ratio` either way, as vLLM's random dataset: `[lo, hi]`.
fn length_range(len: usize, ratio: f64) -> (usize, usize) {
    let lo = (len as f64 * (1.0 - ratio)).max(0.0) as usize;
    let hi = (len as f64 * (1.0 + ratio)) as usize;
    (lo, hi.max(lo))
}

/// Synthetic prompts drawn from `rng`.
pub fn synthetic(spec: &SyntheticSpec, rng: &mut impl Rng) -> anyhow::Result<Vec<BenchPrompt>> {
    anyhow::ensure!(spec.vocab_size > 0, "--vocab-size must be positive");
    for (name, r) in [
        ("--input-len-range", spec.input_range_ratio),
        ("--output-len-range", spec.output_range_ratio),
    ] {
        anyhow::ensure!((0.0..1.0).contains(&r), "{name} must be in [0, 1), got {r}");
    }
    let vocab = spec.vocab_size;
    let prefix: Vec<u32> = (0..spec.prefix_len)
        .map(|_| rng.random_range(0..vocab))
        .collect();
    let (in_lo, in_hi) = length_range(spec.input_len, spec.input_range_ratio);
    let (out_lo, out_hi) = length_range(spec.output_len, spec.output_range_ratio);
    let mut prompts = Vec::with_capacity(spec.num_prompts);
    for i in 0..spec.num_prompts {
        let input_len = rng.random_range(in_lo..=in_hi);
        let output_len = rng.random_range(out_lo..=out_hi).max(1);
        let offset = rng.random_range(0..vocab);
        let mut ids = prefix.clone();
        ids.extend(
            (0..input_len).map(|j| ((offset as u64 + (i + j) as u64) % vocab as u64) as u32),
        );
        let input = if spec.as_text {
            let words: Vec<&str> = ids
                .iter()
                .map(|&id| WORDS[id as usize % WORDS.len()])
                .collect();
            PromptInput::Text(words.join(" "))
        } else {
            PromptInput::TokenIds(ids)
        };
        prompts.push(BenchPrompt {
            input,
            input_len: spec.prefix_len + input_len,
            output_len,
        });
    }
    Ok(prompts)
}

#[derive(Deserialize)]
struct Conversation {
    #[serde(default)]
    conversations: Vec<Turn>,
}

#[derive(Deserialize)]
struct Turn {
    from: String,
    value: String,
}

/// Approximate token count of text without a tokenizer: one per four chars.
pub fn approx_tokens(text: &str) -> usize {
    text.chars().count().div_ceil(4)
}

/// Prompts from ShareGPT JSON text. `output_len` overrides the reply's length.
pub fn sharegpt_from_str(
    json: &str,
    num_prompts: usize,
    output_len: Option<usize>,
    rng: &mut impl Rng,
) -> anyhow::Result<Vec<BenchPrompt>> {
    let mut conversations: Vec<Conversation> = serde_json::from_str(json)
        .context("not ShareGPT JSON (a list of {conversations: [...]})")?;
    conversations.shuffle(rng);
    let mut prompts = Vec::with_capacity(num_prompts);
    for conv in conversations {
        if prompts.len() == num_prompts {
            break;
        }
        let turns = &conv.conversations;
        let Some(h) = turns.iter().position(|t| t.from == "human") else {
            continue;
        };
        let Some(reply) = turns.get(h + 1).filter(|t| t.from == "gpt") else {
            continue;
        };
        let prompt = &turns[h].value;
        let input_len = approx_tokens(prompt);
        let out = output_len.unwrap_or_else(|| approx_tokens(&reply.value));
        // vLLM's filters: drop tiny and over-long pairs (the reply floor only
        // applies when its length is taken from the data).
        if input_len < 4 || (output_len.is_none() && out < 4) {
            continue;
        }
        if input_len > 1024 || input_len + out > 2048 {
            continue;
        }
        prompts.push(BenchPrompt {
            input: PromptInput::Text(prompt.clone()),
            input_len,
            output_len: out.max(1),
        });
    }
    anyhow::ensure!(
        !prompts.is_empty(),
        "no usable conversations in the ShareGPT file"
    );
    Ok(prompts)
}

/// Prompts from a ShareGPT JSON file.
pub fn sharegpt(
    path: &Path,
    num_prompts: usize,
    output_len: Option<usize>,
    rng: &mut impl Rng,
) -> anyhow::Result<Vec<BenchPrompt>> {
    let json = std::fs::read_to_string(path)
        .with_context(|| format!("reading the ShareGPT file {}", path.display()))?;
    sharegpt_from_str(&json, num_prompts, output_len, rng)
        .with_context(|| format!("in {}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;
    use rand::rngs::StdRng;

    fn spec() -> SyntheticSpec {
        SyntheticSpec {
            num_prompts: 50,
            input_len: 100,
            output_len: 20,
            input_range_ratio: 0.0,
            output_range_ratio: 0.0,
            prefix_len: 0,
            vocab_size: 500,
            as_text: false,
        }
    }

    #[test]
    fn fixed_lengths_are_exact_and_ids_in_vocab() {
        let p = synthetic(&spec(), &mut StdRng::seed_from_u64(0)).unwrap();
        assert_eq!(p.len(), 50);
        for bp in &p {
            assert_eq!(bp.input_len, 100);
            assert_eq!(bp.output_len, 20);
            let PromptInput::TokenIds(ids) = &bp.input else {
                panic!("ids expected")
            };
            assert_eq!(ids.len(), 100);
            assert!(ids.iter().all(|&id| id < 500));
        }
        assert_ne!(p[0].input, p[1].input);
    }

    #[test]
    fn ranges_and_shared_prefix() {
        let s = SyntheticSpec {
            input_range_ratio: 0.5,
            output_range_ratio: 0.25,
            prefix_len: 8,
            ..spec()
        };
        let p = synthetic(&s, &mut StdRng::seed_from_u64(3)).unwrap();
        let prefix = |bp: &BenchPrompt| match &bp.input {
            PromptInput::TokenIds(ids) => ids[..8].to_vec(),
            PromptInput::Text(_) => unreachable!(),
        };
        for bp in &p {
            assert!((8 + 50..=8 + 150).contains(&bp.input_len));
            assert!((15..=25).contains(&bp.output_len));
            assert_eq!(prefix(bp), prefix(&p[0]));
        }
        assert!(p.iter().any(|bp| bp.input_len != p[0].input_len));
        assert!(
            synthetic(
                &SyntheticSpec {
                    input_range_ratio: 1.5,
                    ..spec()
                },
                &mut StdRng::seed_from_u64(0)
            )
            .is_err()
        );
    }

    #[test]
    fn text_prompts_have_one_word_per_token() {
        let s = SyntheticSpec {
            as_text: true,
            num_prompts: 2,
            ..spec()
        };
        let p = synthetic(&s, &mut StdRng::seed_from_u64(0)).unwrap();
        let PromptInput::Text(t) = &p[0].input else {
            panic!("text expected")
        };
        assert_eq!(t.split(' ').count(), 100);
    }

    const SHAREGPT: &str = r#"[
        {"id": "a", "conversations": [
            {"from": "human", "value": "Tell me about rivers and where they go."},
            {"from": "gpt", "value": "Rivers flow downhill until they reach a lake or the sea."}]},
        {"id": "b", "conversations": [{"from": "human", "value": "only a question, no reply"}]},
        {"id": "c", "conversations": [
            {"from": "system", "value": "be brief"},
            {"from": "human", "value": "What is two plus two, exactly?"},
            {"from": "gpt", "value": "It is four, of course."}]},
        {"id": "d", "conversations": [
            {"from": "human", "value": "hi"},
            {"from": "gpt", "value": "Hello there, how can I help?"}]}
    ]"#;

    #[test]
    fn sharegpt_takes_first_human_turn_and_reply_length() {
        let mut p = sharegpt_from_str(SHAREGPT, 10, None, &mut StdRng::seed_from_u64(0)).unwrap();
        // b has no reply, d's prompt is under 4 tokens: two usable conversations.
        assert_eq!(p.len(), 2);
        p.sort_by_key(|bp| bp.input_len);
        assert_eq!(
            p[0].input,
            PromptInput::Text("What is two plus two, exactly?".into())
        );
        assert_eq!(p[0].input_len, 8);
        assert_eq!(p[0].output_len, 6);
        assert_eq!(
            p[1].output_len,
            approx_tokens("Rivers flow downhill until they reach a lake or the sea.")
        );
    }

    #[test]
    fn sharegpt_output_override_and_limit() {
        let p = sharegpt_from_str(SHAREGPT, 1, Some(64), &mut StdRng::seed_from_u64(0)).unwrap();
        assert_eq!(p.len(), 1);
        assert_eq!(p[0].output_len, 64);
        assert!(sharegpt_from_str("{}", 1, None, &mut StdRng::seed_from_u64(0)).is_err());
        assert!(sharegpt_from_str("[]", 1, None, &mut StdRng::seed_from_u64(0)).is_err());
    }

    #[test]
    fn approximates_four_chars_per_token() {
        assert_eq!(approx_tokens(""), 0);
        assert_eq!(approx_tokens("abcd"), 1);
        assert_eq!(approx_tokens("abcde"), 2);
    }
}
