//! The equivalences disaggregation relies on, on the CPU backend.

use tandem_engine::backend::{BackendExt, KvIo};
use tandem_engine::block_manager::{BlockManager, blocks_for};
use tandem_engine::cpu::CpuBackend;
use tandem_engine::sampling::argmax;
use tandem_engine::synth::{SynthSpec, write_model_dir};
use tandem_engine::{Architecture, ModelDir, SeqChunk};

const BLOCK: usize = 16;

fn model(arch: Architecture) -> (tempfile::TempDir, ModelDir) {
    let dir = tempfile::tempdir().unwrap();
    let spec = SynthSpec {
        architecture: arch,
        hidden_size: 64,
        intermediate_size: 128,
        num_layers: 3,
        num_heads: 4,
        num_kv_heads: 2,
        max_position_embeddings: 512,
        seed: 11,
        ..Default::default()
    };
    write_model_dir(dir.path(), &spec).unwrap();
    let m = ModelDir::open(dir.path()).unwrap();
    (dir, m)
}

fn prompt(len: usize, salt: u32) -> Vec<u32> {
    (0..len as u32)
        .map(|i| (i * 131 + salt * 17 + 5) % 500)
        .collect()
}

fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

fn greedy(
    backend: &mut CpuBackend,
    table: &[u32],
    prompt: &[u32],
    first_logits: Vec<f32>,
    n: usize,
) -> Vec<u32> {
    let mut logits = first_logits;
    let mut out = Vec::new();
    for i in 0..n {
        let t = argmax(&logits);
        out.push(t);
        logits = backend
            .decode(&[(t, prompt.len() + i, table)])
            .unwrap()
            .remove(0);
    }
    out
}

#[test]
fn chunked_prefill_equals_one_shot() {
    for arch in [Architecture::Llama, Architecture::Qwen2] {
        let (_d, m) = model(arch);
        let p = prompt(150, 1);
        let mut a = m.load_cpu(32, BLOCK).unwrap();
        let table: Vec<u32> = (0..blocks_for(200, BLOCK) as u32).collect();
        let one_shot = a.prefill(&p, 0, &table).unwrap();
        let mut b = m.load_cpu(32, BLOCK).unwrap();
        let mut chunked = Vec::new();
        // Uneven chunks, crossing block boundaries mid-block.
        let mut start = 0;
        for len in [1, 20, 16, 50, 63] {
            chunked = b.prefill(&p[start..start + len], start, &table).unwrap();
            start += len;
        }
        assert_eq!(start, p.len());
        let d = max_abs_diff(&one_shot, &chunked);
        assert!(
            d < 1e-4,
            "{arch:?}: chunked vs one-shot logits differ by {d}"
        );
        assert_eq!(
            greedy(&mut a, &table, &p, one_shot, 16),
            greedy(&mut b, &table, &p, chunked, 16),
            "{arch:?}"
        );
    }
}

#[test]
fn paged_decode_equals_full_recompute() {
    let (_d, m) = model(Architecture::Llama);
    let p = prompt(37, 2);
    let mut paged = m.load_cpu(16, BLOCK).unwrap();
    // Scattered, non-monotonic blocks.
    let table = [9, 2, 14, 5];
    let mut logits = paged.prefill(&p, 0, &table).unwrap();
    let mut seq = p.clone();
    let mut fresh = m.load_cpu(16, BLOCK).unwrap();
    for _ in 0..20 {
        let t = argmax(&logits);
        seq.push(t);
        logits = paged
            .decode(&[(t, seq.len() - 1, &table)])
            .unwrap()
            .remove(0);
        // Recompute the whole sequence from scratch in a fresh cache.
        let full = fresh.prefill(&seq, 0, &[0, 1, 3, 4]).unwrap();
        let d = max_abs_diff(&logits, &full);
        assert!(
            d < 1e-4,
            "paged decode vs recompute at length {}: {d}",
            seq.len()
        );
    }
}

#[test]
fn kv_moved_layer_by_layer_continues_identically() {
    let (_d, m) = model(Architecture::Qwen2);
    let p = prompt(45, 3);
    let mut prefill_node = m.load_cpu(16, BLOCK).unwrap();
    let src_table = [4, 7, 1];
    // Export each layer as soon as the forward pass has written it.
    let mut exported: Vec<(usize, Vec<u8>)> = Vec::new();
    let mut hook = |layer: usize, kv: &dyn tandem_engine::backend::KvExport| {
        exported.push((layer, kv.export_layer(layer, &src_table)?));
        Ok(())
    };
    let logits = prefill_node
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
    assert_eq!(
        exported.iter().map(|e| e.0).collect::<Vec<_>>(),
        vec![0, 1, 2]
    );

    let mut decode_node = m.load_cpu(16, BLOCK).unwrap();
    let dst_table = [10, 0, 12, 13];
    for (layer, bytes) in &exported {
        if layer % 2 == 0 {
            decode_node
                .import_layer(*layer, &dst_table[..3], bytes)
                .unwrap();
        } else {
            // As a frame arrives: in pieces that cut elements and blocks.
            let pieces: Vec<&[u8]> = bytes.chunks(1001).collect();
            let heads = 0..m.config.num_kv_heads;
            decode_node
                .import_heads_vectored(*layer, &dst_table[..3], heads, &pieces)
                .unwrap();
        }
    }
    let remote = greedy(&mut decode_node, &dst_table, &p, logits.clone(), 18);
    let mut local_table = src_table.to_vec();
    local_table.push(9);
    let local = greedy(&mut prefill_node, &local_table, &p, logits, 18);
    assert_eq!(remote, local);
}

#[test]
#[allow(clippy::needless_range_loop)] // steps and sequences index several parallel arrays
fn decode_alone_equals_decode_in_a_batch_of_eight() {
    let (_d, m) = model(Architecture::Llama);
    let mut backend = m.load_cpu(128, BLOCK).unwrap();
    let mut blocks = BlockManager::new(128);
    let prompts: Vec<Vec<u32>> = (0..8).map(|i| prompt(5 + 13 * i, i as u32)).collect();
    let tables: Vec<Vec<u32>> = prompts
        .iter()
        .map(|_| blocks.allocate(8).unwrap())
        .collect();
    let steps = 12;

    // Alone: each sequence prefilled and decoded by itself.
    let mut alone_tokens = Vec::new();
    let mut alone_logits = Vec::new();
    for (p, t) in prompts.iter().zip(&tables) {
        let mut logits = backend.prefill(p, 0, t).unwrap();
        let mut toks = Vec::new();
        let mut rows = Vec::new();
        for i in 0..steps {
            let tok = argmax(&logits);
            toks.push(tok);
            logits = backend.decode(&[(tok, p.len() + i, t)]).unwrap().remove(0);
            rows.push(logits.clone());
        }
        alone_tokens.push(toks);
        alone_logits.push(rows);
    }

    // Batched: the same sequences, re-prefilled, then decoded together in one batch per step.
    let mut logits: Vec<Vec<f32>> = prompts
        .iter()
        .zip(&tables)
        .map(|(p, t)| backend.prefill(p, 0, t).unwrap())
        .collect();
    let mut batch_tokens = vec![Vec::new(); 8];
    let mut bitwise = true;
    for i in 0..steps {
        let toks: Vec<u32> = logits.iter().map(|l| argmax(l)).collect();
        for (s, &t) in toks.iter().enumerate() {
            batch_tokens[s].push(t);
        }
        let batch: Vec<(u32, usize, &[u32])> = (0..8)
            .map(|s| (toks[s], prompts[s].len() + i, tables[s].as_slice()))
            .collect();
        logits = backend.decode(&batch).unwrap();
        for s in 0..8 {
            bitwise &= logits[s] == alone_logits[s][i];
        }
    }
    assert_eq!(batch_tokens, alone_tokens);
    eprintln!("batch-of-8 logits bitwise equal to alone: {bitwise}");
}
