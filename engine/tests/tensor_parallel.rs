//! Tensor parallelism on the CPU gives the tokens of TP=1 and its logits up to
//! f32 rounding (row-parallel sums add partials in another order), and a
//! rank's KV heads move between backends of different TP sizes.

use tandem_engine::backend::{Backend, BackendExt, KvExport, KvIo};
use tandem_engine::block_manager::BlockManager;
use tandem_engine::sampling::argmax;
use tandem_engine::synth::{SynthSpec, write_model_dir};
use tandem_engine::{Architecture, EngineError, ModelDir, SeqChunk};

const BLOCK: usize = 16;
const PROMPTS: usize = 20;
const STEPS: usize = 8;
/// Largest |logit(TP=n) - logit(TP=1)| allowed. Logits are O(10) on these
/// models; the measured differences are printed by each test (`--nocapture`).
const TOLERANCE: f32 = 1e-3;

fn model(arch: Architecture, heads: usize, kv_heads: usize) -> (tempfile::TempDir, ModelDir) {
    let dir = tempfile::tempdir().unwrap();
    let spec = SynthSpec {
        architecture: arch,
        hidden_size: 64,
        intermediate_size: 96,
        num_layers: 2,
        num_heads: heads,
        num_kv_heads: kv_heads,
        max_position_embeddings: 256,
        seed: 7,
        ..Default::default()
    };
    write_model_dir(dir.path(), &spec).unwrap();
    let m = ModelDir::open(dir.path()).unwrap();
    (dir, m)
}

fn prompt(i: usize) -> Vec<u32> {
    (0..5 + 3 * i as u32)
        .map(|j| (j * 131 + i as u32 * 17 + 5) % 500)
        .collect()
}

/// Greedy decoding of the 20 prompts, prefilled one by one (the last with
/// every position's logits, as prompt log probabilities are computed) and
/// decoded in one batch per step: the tokens and every logits row.
fn run(backend: &mut dyn Backend) -> (Vec<Vec<u32>>, Vec<Vec<f32>>) {
    let mut blocks = BlockManager::new(backend.kv_layout().num_blocks);
    let prompts: Vec<Vec<u32>> = (0..PROMPTS).map(prompt).collect();
    let tables: Vec<Vec<u32>> = prompts
        .iter()
        .map(|p| blocks.allocate((p.len() + STEPS).div_ceil(BLOCK)).unwrap())
        .collect();
    let mut all_logits = Vec::new();
    let mut logits: Vec<Vec<f32>> = prompts
        .iter()
        .zip(&tables)
        .map(|(p, t)| {
            if p.len() < prompts[PROMPTS - 1].len() {
                return backend.prefill(p, 0, t).unwrap();
            }
            let mut every = backend
                .forward_every_logit(&SeqChunk {
                    tokens: p,
                    start: 0,
                    block_table: t,
                })
                .unwrap();
            let last = every.pop().unwrap();
            all_logits.extend(every);
            last
        })
        .collect();
    let mut tokens = vec![Vec::new(); PROMPTS];
    for step in 0..STEPS {
        all_logits.extend(logits.iter().cloned());
        let next: Vec<u32> = logits.iter().map(|l| argmax(l)).collect();
        for (s, &t) in next.iter().enumerate() {
            tokens[s].push(t);
        }
        let batch: Vec<(u32, usize, &[u32])> = (0..PROMPTS)
            .map(|s| (next[s], prompts[s].len() + step, tables[s].as_slice()))
            .collect();
        logits = backend.decode(&batch).unwrap();
    }
    (tokens, all_logits)
}

fn max_abs_diff(a: &[Vec<f32>], b: &[Vec<f32>]) -> f32 {
    a.iter()
        .flatten()
        .zip(b.iter().flatten())
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

fn check(arch: Architecture, heads: usize, kv_heads: usize, tps: &[usize]) {
    let (_d, m) = model(arch, heads, kv_heads);
    let (want_tokens, want_logits) = run(&mut m.load_cpu(64, BLOCK).unwrap());
    for &tp in tps {
        let (tokens, logits) = run(m.load_cpu_tp(tp, 64, BLOCK).unwrap().as_mut());
        let d = max_abs_diff(&logits, &want_logits);
        let scale = want_logits
            .iter()
            .flatten()
            .fold(0f32, |a, x| a.max(x.abs()));
        eprintln!(
            "{arch:?} heads={heads} kv_heads={kv_heads} TP={tp}: max |logit diff| vs TP=1 = {d:e} (max |logit| {scale})"
        );
        assert_eq!(tokens, want_tokens, "{arch:?} TP={tp} tokens");
        assert!(d <= TOLERANCE, "{arch:?} TP={tp}: logits differ by {d}");
    }
}

#[test]
fn tp2_and_tp4_match_tp1_when_tp_divides_kv_heads() {
    check(Architecture::Llama, 8, 4, &[2, 4]);
}

#[test]
fn tp4_matches_tp1_with_kv_heads_replicated() {
    // 2 KV heads over 4 ranks: each KV head lives on two ranks.
    check(Architecture::Llama, 4, 2, &[2, 4]);
}

#[test]
fn tp_matches_tp1_with_biases_and_an_untied_lm_head() {
    check(Architecture::Qwen2, 4, 2, &[2, 4]);
}

#[test]
fn indivisible_heads_are_a_typed_error() {
    let (_d, m) = model(Architecture::Llama, 4, 2);
    for tp in [3, 8] {
        match m.load_cpu_tp(tp, 8, BLOCK) {
            Err(EngineError::TensorParallel(msg)) => eprintln!("TP={tp}: {msg}"),
            Err(e) => panic!("TP={tp}: wrong error {e}"),
            Ok(_) => panic!("TP={tp} accepted"),
        }
    }
}

/// Prefill on one TP size, ship each rank's heads as separate frames from the
/// layer hook, import them on another TP size, and decode: same tokens as
/// never moving.
#[test]
fn kv_heads_move_between_tp_sizes() {
    let (_d, m) = model(Architecture::Llama, 4, 2);
    let p = prompt(9);
    let src_table = [3, 1];
    let dst_table = [5, 0, 6];
    for (from, to) in [(2, 1), (1, 2), (4, 2), (2, 4), (4, 1)] {
        let mut src = m.load_cpu_tp(from, 8, BLOCK).unwrap();
        let shards = src.kv_head_shards();
        let mut frames = Vec::new();
        let mut hook = |layer: usize, kv: &dyn KvExport| {
            for heads in &shards {
                frames.push((
                    layer,
                    heads.clone(),
                    kv.export_heads(layer, &src_table, heads.clone())?,
                ));
            }
            Ok(())
        };
        let logits = src
            .forward_logits(
                &[SeqChunk {
                    tokens: &p,
                    start: 0,
                    block_table: &src_table,
                }],
                Some(&mut hook),
            )
            .unwrap()
            .remove(0);
        assert_eq!(frames.len(), 2 * shards.len(), "{from}->{to}");
        let mut dst = m.load_cpu_tp(to, 8, BLOCK).unwrap();
        // Frames arrive in any order; each fills only its heads.
        for (layer, heads, bytes) in frames.iter().rev() {
            dst.import_heads(*layer, &dst_table[..2], heads.clone(), bytes)
                .unwrap();
        }
        for layer in 0..2 {
            assert_eq!(
                dst.export_layer(layer, &dst_table[..2]).unwrap(),
                src.export_layer(layer, &src_table).unwrap(),
                "{from}->{to} layer {layer}"
            );
        }
        let mut t_src = Vec::new();
        let mut t_dst = Vec::new();
        let (mut ls, mut ld) = (logits.clone(), logits);
        let mut src_table = src_table.to_vec();
        src_table.push(7);
        for i in 0..10 {
            let (a, b) = (argmax(&ls), argmax(&ld));
            t_src.push(a);
            t_dst.push(b);
            ls = src
                .decode(&[(a, p.len() + i, src_table.as_slice())])
                .unwrap()
                .remove(0);
            ld = dst
                .decode(&[(b, p.len() + i, &dst_table[..])])
                .unwrap()
                .remove(0);
        }
        assert_eq!(t_src, t_dst, "{from}->{to}");
    }
}

/// A failing layer hook ends the pass on every rank with the hook's error
/// (no rank is left waiting on the others).
#[test]
fn a_failing_hook_fails_the_pass_without_hanging() {
    let (_d, m) = model(Architecture::Llama, 4, 2);
    let mut b = m.load_cpu_tp(4, 8, BLOCK).unwrap();
    let mut hook = |layer: usize, _: &dyn KvExport| {
        if layer == 1 {
            Err(EngineError::KvCache("receiver went away".into()))
        } else {
            Ok(())
        }
    };
    let err = b
        .forward_logits(
            &[SeqChunk {
                tokens: &[1, 2, 3],
                start: 0,
                block_table: &[0],
            }],
            Some(&mut hook),
        )
        .unwrap_err();
    assert!(err.to_string().contains("receiver went away"), "{err}");
    // The backend still works afterwards.
    assert_eq!(b.prefill(&[1, 2, 3], 0, &[0]).unwrap().len(), 512);
}
