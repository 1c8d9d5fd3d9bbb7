//! Whole-request generation on a synthesized model: synth speed, seeds, stops.

use std::time::Instant;

use tandem_engine::local::LocalGenerator;
use tandem_engine::synth::{SynthSpec, write_model_dir};
use tandem_engine::{
    BatchLimits, FinishReason, GenerationParams, ModelDir, SamplingParams, StopReason,
};

const LIMITS: BatchLimits = BatchLimits {
    max_tokens: 64,
    max_seqs: 4,
    priority: tandem_engine::GpuPriority::Normal,
};

fn setup() -> (tempfile::TempDir, ModelDir) {
    let dir = tempfile::tempdir().unwrap();
    let start = Instant::now();
    write_model_dir(dir.path(), &SynthSpec::default()).unwrap();
    let took = start.elapsed();
    // The quick-start model is written "in well under a second" even in a debug build.
    assert!(took.as_secs_f64() < 1.0, "synth took {took:?}");
    let m = ModelDir::open(dir.path()).unwrap();
    (dir, m)
}

#[test]
fn seeded_sampling_is_reproducible_and_seeds_differ() {
    let (_d, m) = setup();
    let mut g = LocalGenerator::new(m.load_cpu(64, 16).unwrap());
    let prompt = m.tokenizer.encode("Once upon a time", true).unwrap();
    let run = |g: &mut LocalGenerator<_>, seed| {
        let params = GenerationParams {
            sampling: SamplingParams {
                temperature: 1.0,
                top_p: 0.95,
                top_k: 50,
                seed: Some(seed),
                ..Default::default()
            },
            max_tokens: 24,
            ignore_eos: true,
            ..Default::default()
        };
        g.generate(&prompt, &params, &m.tokenizer, |_| {})
            .unwrap()
            .tokens
    };
    let a = run(&mut g, 42);
    assert_eq!(a, run(&mut g, 42));
    assert_ne!(a, run(&mut g, 43));
    assert_eq!(a.len(), 24);
}

#[test]
fn stop_string_and_stop_token_and_length() {
    let (_d, m) = setup();
    let mut g = LocalGenerator::new(m.load_cpu(64, 16).unwrap());
    let prompt = m.tokenizer.encode("The little fish", true).unwrap();
    let free_run = GenerationParams {
        max_tokens: 20,
        ignore_eos: true,
        ..Default::default()
    };
    let full = g
        .generate(&prompt, &free_run, &m.tokenizer, |_| {})
        .unwrap();
    assert_eq!(full.finish_reason, FinishReason::Length);
    assert_eq!(full.stop_reason, None);
    assert_eq!(full.tokens.len(), 20);
    let streamed_text = m.tokenizer.decode(&full.tokens).unwrap();
    assert_eq!(
        full.text, streamed_text,
        "streamed deltas add up to the decoded text"
    );

    // Stop at a string that starts in the middle of the output, spanning tokens.
    let chars: Vec<char> = full.text.chars().collect();
    assert!(chars.len() > 6, "need some text to cut: {:?}", full.text);
    let stop: String = chars[3..6].iter().collect();
    let expected_text: String = full.text[..full.text.find(&stop).unwrap()].to_string();
    let with_stop = GenerationParams {
        stop: vec![stop.clone()],
        ..free_run.clone()
    };
    let mut streamed = String::new();
    let out = g
        .generate(&prompt, &with_stop, &m.tokenizer, |ev| {
            streamed.push_str(&ev.text)
        })
        .unwrap();
    assert_eq!(out.finish_reason, FinishReason::Stop);
    assert_eq!(out.stop_reason, Some(StopReason::String(stop.clone())));
    assert_eq!(out.text, expected_text);
    assert_eq!(
        streamed, expected_text,
        "no text past the stop string was ever streamed"
    );

    // A stop token id ends generation right after it.
    let third = full.tokens[2];
    let with_stop_id = GenerationParams {
        stop_token_ids: vec![third],
        ..free_run
    };
    let out = g
        .generate(&prompt, &with_stop_id, &m.tokenizer, |_| {})
        .unwrap();
    assert_eq!(out.finish_reason, FinishReason::Stop);
    assert_eq!(out.stop_reason, Some(StopReason::TokenId(third)));
    let cut = full.tokens.iter().position(|&t| t == third).unwrap();
    assert_eq!(out.tokens, full.tokens[..=cut]);

    // vLLM's include_stop_str_in_output: the stop string stays at the end,
    // streamed as well; a stop id's token keeps its text.
    let including = GenerationParams {
        include_stop_str_in_output: true,
        ..with_stop
    };
    let mut streamed = String::new();
    let out = g
        .generate(&prompt, &including, &m.tokenizer, |ev| {
            streamed.push_str(&ev.text)
        })
        .unwrap();
    assert_eq!(out.finish_reason, FinishReason::Stop);
    assert_eq!(out.text, format!("{expected_text}{stop}"));
    assert_eq!(streamed, out.text);
    let out = g
        .generate(
            &prompt,
            &GenerationParams {
                include_stop_str_in_output: true,
                ..with_stop_id
            },
            &m.tokenizer,
            |_| {},
        )
        .unwrap();
    assert_eq!(out.tokens, full.tokens[..=cut]);
    assert_eq!(out.text, m.tokenizer.decode(&full.tokens[..=cut]).unwrap());
}

#[test]
fn a_resumed_generation_continues_exactly_where_the_first_stopped() {
    let (_d, m) = setup();
    let mut g = LocalGenerator::new(m.load_cpu(64, 16).unwrap());
    let prompt = m.tokenizer.encode("Once upon a time", true).unwrap();
    for sampling in [
        SamplingParams::default(),
        SamplingParams {
            temperature: 0.9,
            top_p: 0.9,
            presence_penalty: 0.5,
            frequency_penalty: 0.3,
            seed: Some(7),
            ..Default::default()
        },
    ] {
        let params = GenerationParams {
            sampling,
            max_tokens: 20,
            ignore_eos: true,
            ..Default::default()
        };
        let mut deltas = Vec::new();
        let full = g
            .generate(&prompt, &params, &m.tokenizer, |ev| {
                deltas.push(ev.text.clone())
            })
            .unwrap();
        for k in [1, 7, 19] {
            let mut resumed_text = String::new();
            let resumed = g
                .generate_resumed(&prompt, &full.tokens[..k], &params, &m.tokenizer, |ev| {
                    resumed_text.push_str(&ev.text)
                })
                .unwrap();
            assert_eq!(resumed.tokens, full.tokens, "resumed after {k} tokens");
            assert_eq!(resumed.finish_reason, full.finish_reason);
            assert_eq!(
                format!("{}{resumed_text}", deltas[..k].concat()),
                full.text,
                "the text streamed before and after the resume adds up"
            );
        }
        // Tokens that already finish the request leave nothing to resume.
        let err = g
            .generate_resumed(&prompt, &full.tokens, &params, &m.tokenizer, |_| {})
            .unwrap_err();
        assert!(err.to_string().contains("nothing is left"), "{err}");
        assert_eq!(g.free_blocks(), 64);
    }
}

#[test]
fn chat_template_renders() {
    let (_d, m) = setup();
    let text = m
        .tokenizer
        .apply_chat_template(
            &[tandem_engine::ChatMessage {
                role: "user".into(),
                content: "Hello".into(),
            }],
            true,
        )
        .unwrap();
    assert_eq!(
        text,
        "<|im_start|>user\nHello<|im_end|>\n<|im_start|>assistant\n"
    );
    let ids = m.tokenizer.encode(&text, false).unwrap();
    assert_eq!(
        ids[0],
        m.tokenizer.token_to_id("<|im_start|>").unwrap(),
        "special tokens are atomic"
    );
}

#[test]
fn load_picks_the_device_and_a_boxed_backend_forwards() {
    use tandem_engine::backend::{BackendExt, argmax};
    use tandem_engine::{Device, KvDtype, SeqChunk};
    let (_d, mut m) = setup();
    let mut boxed = m.load(8, 16, LIMITS).unwrap();
    assert_eq!(boxed.kv_layout().dtype, KvDtype::F32);
    let mut plain = m.load_cpu(8, 16).unwrap();
    let chunk = [SeqChunk {
        tokens: &[1, 2, 3],
        start: 0,
        block_table: &[0],
    }];
    let ids = boxed.forward_greedy(&chunk, None).unwrap();
    let logits = plain.forward_logits(&chunk, None).unwrap();
    assert_eq!(ids, vec![argmax(&logits[0])]);
    m.device = Device::Cuda(0);
    if cfg!(not(feature = "cuda")) {
        let err = m
            .load(8, 16, LIMITS)
            .err()
            .expect("no CUDA in this build")
            .to_string();
        assert!(err.contains("--features cuda"), "{err}");
    }
}

#[test]
fn logit_bias_bans_or_promotes_tokens_under_greedy() {
    let (_d, m) = setup();
    let mut g = LocalGenerator::new(m.load_cpu(64, 16).unwrap());
    let prompt = m.tokenizer.encode("Once upon a time", true).unwrap();
    let one = |g: &mut LocalGenerator<_>, bias: &[(u32, f32)]| {
        let params = GenerationParams {
            sampling: SamplingParams {
                logit_bias: bias.iter().copied().collect(),
                ..Default::default()
            },
            max_tokens: 1,
            ignore_eos: true,
            logprobs: Some(3),
            ..Default::default()
        };
        let mut lps = Vec::new();
        let out = g
            .generate(&prompt, &params, &m.tokenizer, |ev| {
                lps.extend(ev.logprobs.clone())
            })
            .unwrap();
        (out.tokens[0], lps.remove(0))
    };
    // The model's own ranking of the first token.
    let (greedy, lp) = one(&mut g, &[]);
    assert_eq!(lp.top[0].0, greedy);
    let (runner_up, third) = (lp.top[1].0, lp.top[2].0);
    assert_ne!(greedy, runner_up);
    // -100 on the greedy token: the runner-up wins, and the log probabilities
    // are of the biased distribution.
    let (t, lp) = one(&mut g, &[(greedy, -100.0)]);
    assert_eq!(t, runner_up);
    assert_eq!(lp.top[0].0, runner_up);
    // A large positive bias on the third most likely token makes greedy pick it.
    let (t, _) = one(&mut g, &[(third, 100.0)]);
    assert_eq!(t, third);
}

#[test]
fn min_tokens_holds_back_stop_ids_and_eos() {
    let (_d, m) = setup();
    let mut g = LocalGenerator::new(m.load_cpu(64, 16).unwrap());
    let prompt = m.tokenizer.encode("The little fish", true).unwrap();
    let free = GenerationParams {
        max_tokens: 12,
        ignore_eos: true,
        ..Default::default()
    };
    let full = g.generate(&prompt, &free, &m.tokenizer, |_| {}).unwrap();
    // The greedy first token as a stop id (and the model's EOS honoured): without
    // min_tokens the output is that one token.
    let stopping = GenerationParams {
        stop_token_ids: vec![full.tokens[0]],
        ignore_eos: false,
        ..free.clone()
    };
    let out = g
        .generate(&prompt, &stopping, &m.tokenizer, |_| {})
        .unwrap();
    assert_eq!(out.tokens, full.tokens[..1]);
    assert_eq!(out.finish_reason, FinishReason::Stop);
    // With min_tokens 6: at least 6 tokens, none of the first 6 a stop id or EOS.
    let held = GenerationParams {
        min_tokens: 6,
        ..stopping.clone()
    };
    let out = g.generate(&prompt, &held, &m.tokenizer, |_| {}).unwrap();
    assert!(out.tokens.len() >= 6, "{:?}", out.tokens);
    let eos = &m.config.eos_token_ids;
    assert!(
        out.tokens[..6]
            .iter()
            .all(|t| *t != full.tokens[0] && !eos.contains(t)),
        "{:?}",
        out.tokens
    );
    // A stop string does not end the output before min_tokens either.
    let first_text = m.tokenizer.decode(&full.tokens[..1]).unwrap();
    if !first_text.is_empty() {
        let by_string = GenerationParams {
            stop: vec![first_text],
            min_tokens: 4,
            ..free.clone()
        };
        let out = g
            .generate(&prompt, &by_string, &m.tokenizer, |_| {})
            .unwrap();
        assert!(out.tokens.len() >= 4, "{:?}", out.tokens);
    }
    // min_tokens beyond max_tokens is refused.
    let bad = GenerationParams {
        min_tokens: 13,
        ..free
    };
    assert!(
        bad.validate()
            .unwrap_err()
            .to_string()
            .contains("min_tokens")
    );
}

#[test]
fn load_refuses_empty_batch_limits() {
    let (_d, m) = setup();
    for limits in [
        BatchLimits {
            max_tokens: 0,
            max_seqs: 4,
            priority: tandem_engine::GpuPriority::Normal,
        },
        BatchLimits {
            max_tokens: 64,
            max_seqs: 0,
            priority: tandem_engine::GpuPriority::Normal,
        },
    ] {
        let err = m.load(8, 16, limits).err().expect("refused").to_string();
        assert!(err.contains("batch limits"), "{err}");
        let err = m
            .load_tp(2, 8, 16, limits)
            .err()
            .expect("refused")
            .to_string();
        assert!(err.contains("batch limits"), "{err}");
    }
}
