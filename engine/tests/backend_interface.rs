//! The `Backend` interface's contract on the CPU backend: logits only for the
//! chunks that ask for them, the synthesizer writing exactly the Llama
//! definition's tensors, and a tensor-parallel model loading the same weights.

use tandem_engine::backend::{Backend, BackendExt, KvIo};
use tandem_engine::llama::{self, LayerParam, ModelParam};
use tandem_engine::synth::{SynthSpec, write_model_dir};
use tandem_engine::{Architecture, ModelDir, SeqChunk};

fn model(arch: Architecture) -> (tempfile::TempDir, ModelDir) {
    let dir = tempfile::tempdir().unwrap();
    let spec = SynthSpec {
        architecture: arch,
        hidden_size: 64,
        intermediate_size: 96,
        num_layers: 2,
        num_heads: 4,
        num_kv_heads: 2,
        max_position_embeddings: 256,
        seed: 5,
        ..Default::default()
    };
    write_model_dir(dir.path(), &spec).unwrap();
    let m = ModelDir::open(dir.path()).unwrap();
    (dir, m)
}

fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

#[test]
fn forward_returns_logits_only_for_the_chunks_that_ask() {
    let (_d, m) = model(Architecture::Llama);
    let prompts: [Vec<u32>; 3] = [vec![3, 9, 27, 81], vec![5, 25], vec![7, 49, 100]];
    let tables: [Vec<u32>; 3] = [vec![0], vec![1], vec![2]];
    let chunks = |_: ()| -> Vec<SeqChunk<'_>> {
        prompts
            .iter()
            .zip(&tables)
            .map(|(p, t)| SeqChunk {
                tokens: p,
                start: 0,
                block_table: t,
            })
            .collect()
    };
    let mut all = m.load_cpu(4, 16).unwrap();
    let every = all.forward_logits(&chunks(()), None).unwrap();
    let mut some = m.load_cpu(4, 16).unwrap();
    let picked = some
        .forward(&chunks(()), &[true, false, true], None)
        .unwrap();
    assert_eq!(picked.len(), 3);
    assert!(picked[1].is_none(), "chunk 1 asked for no logits");
    for i in [0, 2] {
        let got = picked[i].as_ref().expect("asked for");
        assert_eq!(got.len(), m.config.vocab_size);
        assert!(max_abs_diff(got, &every[i]) < 1e-4, "chunk {i}");
    }
    // Nothing asked: the pass still writes the cache, and the next token's
    // logits are the same as after a pass that returned them.
    let mut none = m.load_cpu(4, 16).unwrap();
    let empty = none.forward(&chunks(()), &[false; 3], None).unwrap();
    assert!(empty.iter().all(Option::is_none));
    let next = |b: &mut dyn Backend| b.decode(&[(11, 4, &tables[0][..])]).unwrap().remove(0);
    assert!(max_abs_diff(&next(&mut none), &next(&mut all)) < 1e-4);
    // One flag per chunk, or an error.
    let err = some.forward(&chunks(()), &[true], None).unwrap_err();
    assert!(
        err.to_string().contains("1 logits flags for 3 sequences"),
        "{err}"
    );
}

#[test]
fn every_logit_of_a_chunk_is_what_each_prefix_would_end_with() {
    let (_d, m) = model(Architecture::Qwen2);
    let prompt: Vec<u32> = vec![
        3, 9, 27, 81, 5, 25, 7, 49, 100, 2, 4, 6, 8, 10, 12, 14, 16, 18,
    ];
    let table = [0u32, 1];
    let mut b = m.load_cpu(4, 16).unwrap();
    assert!(b.computes_every_logit());
    // The first 5 tokens, then the rest from position 5 on (a chunked prompt).
    let mut every = b
        .forward_every_logit(&SeqChunk {
            tokens: &prompt[..5],
            start: 0,
            block_table: &table,
        })
        .unwrap();
    every.extend(
        b.forward_every_logit(&SeqChunk {
            tokens: &prompt[5..],
            start: 5,
            block_table: &table,
        })
        .unwrap(),
    );
    assert_eq!(every.len(), prompt.len());
    let mut one = m.load_cpu(4, 16).unwrap();
    for (i, row) in every.iter().enumerate() {
        assert_eq!(row.len(), m.config.vocab_size);
        let last = one.prefill(&prompt[..=i], 0, &table).unwrap();
        assert!(max_abs_diff(row, &last) < 1e-4, "position {i}");
    }
    // The cache holds the prompt's K/V: the next token's logits are a prefill's.
    let next = |b: &mut dyn Backend| {
        b.decode(&[(11, prompt.len(), &table[..])])
            .unwrap()
            .remove(0)
    };
    assert!(max_abs_diff(&next(&mut b), &next(&mut one)) < 1e-4);
    // A chunk that does not fit its block table is refused.
    let err = b
        .forward_every_logit(&SeqChunk {
            tokens: &prompt,
            start: 20,
            block_table: &table,
        })
        .unwrap_err();
    assert!(err.to_string().contains("block"), "{err}");
}

#[test]
fn prompt_logprobs_are_the_raw_distribution_with_ranks() {
    let rows = vec![vec![2.0f32, 0.0, 1.0, 1.0], vec![0.0, 0.0, 0.0, 0.0]];
    let got = tandem_engine::prompt_logprobs(&rows, &[3, 1], 2);
    assert_eq!(got.len(), 2);
    let z = (2f64.exp() + 1.0 + 2.0 * 1f64.exp()).ln();
    assert!((f64::from(got[0].logprobs.logprob) - (1.0 - z)).abs() < 1e-6);
    // Token 2 ties token 3 and is more likely than nothing else but token 0.
    assert_eq!(got[0].rank, 2);
    assert_eq!(
        got[0].logprobs.top.iter().map(|t| t.0).collect::<Vec<_>>(),
        [0, 2]
    );
    assert_eq!(got[1].rank, 1);
    assert!((got[1].logprobs.logprob - 0.25f32.ln()).abs() < 1e-6);
}

#[test]
fn the_synthesizer_writes_the_llama_definition() {
    for arch in [Architecture::Llama, Architecture::Qwen2] {
        let (_d, m) = model(arch);
        let w = m.weights().unwrap();
        let names = llama::tensors(&m.config);
        for (name, _, _) in &names {
            assert!(w.contains(name), "{arch:?}: {name} missing");
        }
        let biases = names
            .iter()
            .filter(|(n, _, _)| n.ends_with(LayerParam::QBias.name()))
            .count();
        assert_eq!(biases, if arch == Architecture::Qwen2 { 2 } else { 0 });
        assert_eq!(
            w.contains(ModelParam::LmHead.name()),
            !m.config.tie_word_embeddings
        );
    }
}

#[test]
fn sharded_ranks_compute_what_one_rank_does() {
    let (_d, m) = model(Architecture::Qwen2);
    let prompt = [4u32, 8, 15, 16, 23, 42];
    let mut one = m.load_cpu(2, 16).unwrap();
    let mut two = m.load_cpu_tp(2, 2, 16).unwrap();
    let a = one.prefill(&prompt, 0, &[0]).unwrap();
    let b = two.prefill(&prompt, 0, &[0]).unwrap();
    assert!(max_abs_diff(&a, &b) < 1e-4);
    assert_eq!(two.kv_head_shards(), vec![0..1, 1..2]);
}

/// On a GPU (`--features cuda` and `TANDEM_GPU_TESTS=1`; CI without a GPU
/// compiles it): the CUDA backend copies off the device exactly the rows asked
/// for, each equal to that row of a pass that copied them all.
#[cfg(feature = "cuda")]
#[test]
fn gpu_forward_copies_only_the_rows_asked_for() {
    if std::env::var("TANDEM_GPU_TESTS").as_deref() != Ok("1") {
        eprintln!("TANDEM_GPU_TESTS is not 1: GPU test compiled, not run");
        return;
    }
    let (_d, mut m) = model(Architecture::Llama);
    m.device = tandem_engine::Device::Cuda(0);
    let limits = tandem_engine::BatchLimits {
        max_tokens: 256,
        max_seqs: 8,
        priority: tandem_engine::GpuPriority::Normal,
    };
    let prompts: Vec<Vec<u32>> = (0..5u32)
        .map(|i| (0..3 + i).map(|t| (t * 7 + i) % 300).collect())
        .collect();
    let tables: Vec<Vec<u32>> = (0..5).map(|i| vec![i]).collect();
    let chunks: Vec<SeqChunk<'_>> = prompts
        .iter()
        .zip(&tables)
        .map(|(p, t)| SeqChunk {
            tokens: p,
            start: 0,
            block_table: t,
        })
        .collect();
    let mut all = m.load(8, 16, limits).unwrap();
    let every = all.forward_logits(&chunks, None).unwrap();
    for flags in [
        [true, false, true, true, false],
        [false, false, false, false, true],
        [false; 5],
    ] {
        let mut gpu = m.load(8, 16, limits).unwrap();
        let got = gpu.forward(&chunks, &flags, None).unwrap();
        for (i, (row, &want)) in got.iter().zip(&flags).enumerate() {
            match row {
                Some(row) => {
                    assert!(want, "row {i} not asked for");
                    assert_eq!(row, &every[i], "row {i}");
                }
                None => assert!(!want, "row {i} asked for"),
            }
        }
    }
}
