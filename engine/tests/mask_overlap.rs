//! The grammar mask computed while the forward pass runs
//! (`tandem_engine::mask_overlap`) gives the same tokens as the mask computed
//! at sampling time: a batch of constrained and free sequences decoded on the
//! synthesized model's CPU backend both ways, with seeded sampling.

use tandem_engine::block_manager::{BlockId, BlockManager, blocks_for};
use tandem_engine::mask_overlap::{MaskJob, overlap};
use tandem_engine::synth::{SynthSpec, write_model_dir};
use tandem_engine::{
    BackendExt, Constraint, Generation, GenerationParams, ModelDir, SamplingParams, SeqChunk,
};

const SCHEMA: &str = r#"{"type": "object", "x-guidance": {"whitespace_flexible": false},
  "properties": {"name": {"type": "string", "maxLength": 12},
                 "age": {"type": "integer", "minimum": 0, "maximum": 150}},
  "required": ["name", "age"], "additionalProperties": false}"#;

const BLOCK: usize = 16;
const MAX_TOKENS: usize = 48;

/// Decodes four sequences (three constrained) in one batch; `overlapped`
/// computes each step's masks during the forward pass. Returns each
/// sequence's output and how many masks were computed during a pass.
fn decode(m: &ModelDir, overlapped: bool) -> (Vec<Vec<u32>>, usize) {
    let mut backend = m.load_cpu(64, BLOCK).unwrap();
    let mut blocks = BlockManager::new(64);
    let requests = [
        (
            "Describe a person:",
            Some(Constraint::JsonSchema(SCHEMA.into())),
        ),
        (
            "Three words:",
            Some(Constraint::Regex("[a-z]{2,6}( [a-z]{2,6}){2}".into())),
        ),
        ("An object:", Some(Constraint::JsonObject)),
        ("Free text", None),
    ];
    let tk = &m.tokenizer;
    let mut gens = Vec::new();
    let mut tables: Vec<Vec<BlockId>> = Vec::new();
    for (i, (prompt, constraint)) in requests.into_iter().enumerate() {
        let prompt = tk.encode(prompt, true).unwrap();
        tables.push(
            blocks
                .allocate(blocks_for(prompt.len() + MAX_TOKENS, BLOCK))
                .unwrap(),
        );
        let params = GenerationParams {
            sampling: SamplingParams {
                temperature: 1.0,
                seed: Some(11 + i as u64),
                ..Default::default()
            },
            max_tokens: MAX_TOKENS,
            constraint,
            ..Default::default()
        };
        gens.push(Generation::new(prompt, params, &m.config.eos_token_ids).unwrap());
    }
    let mut overlapped_masks = 0;
    // Step 0 prefills every prompt; each later step decodes one token a sequence.
    loop {
        let live: Vec<usize> = (0..gens.len())
            .filter(|&i| gens[i].finished().is_none())
            .collect();
        if live.is_empty() {
            break;
        }
        let mut jobs: Vec<(usize, MaskJob)> = Vec::new();
        if overlapped {
            for &i in &live {
                if let Some(job) = gens[i].lend_mask_job(tk).unwrap() {
                    jobs.push((i, job));
                }
            }
        }
        let (ids, mut lent): (Vec<usize>, Vec<MaskJob>) = jobs.into_iter().unzip();
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
        let logits = overlap(&mut lent, || backend.forward_logits(&chunks, None)).unwrap();
        drop(chunks);
        overlapped_masks += lent.iter().filter(|j| j.is_done()).count();
        for (i, job) in ids.into_iter().zip(lent) {
            gens[i].return_mask_job(job);
        }
        for (&i, mut row) in live.iter().zip(logits) {
            gens[i].step(&mut row, tk).unwrap();
        }
    }
    (
        gens.iter().map(|g| g.output().to_vec()).collect(),
        overlapped_masks,
    )
}

#[test]
fn masks_computed_during_the_pass_give_the_same_tokens() {
    let dir = tempfile::tempdir().unwrap();
    write_model_dir(dir.path(), &SynthSpec::default()).unwrap();
    let m = ModelDir::open(dir.path()).unwrap();
    let (plain, none) = decode(&m, false);
    let (overlapped, masks) = decode(&m, true);
    assert_eq!(none, 0);
    assert_eq!(plain, overlapped);
    // Every constrained token's mask was computed during a pass.
    let constrained: usize = plain[..3].iter().map(Vec::len).sum();
    assert_eq!(masks, constrained);
    // The constraints held: the schema's output is JSON with its keys.
    let text = m.tokenizer.decode(&plain[0]).unwrap();
    if plain[0].len() < MAX_TOKENS {
        let v: serde_json::Value = serde_json::from_str(&text).unwrap();
        assert!(v.get("name").is_some() && v.get("age").is_some(), "{text}");
    }
}

/// The packed bitmask a device applies (`Generation::next_mask_bits`) keeps
/// exactly the tokens the host's masking in `Generation::step` leaves finite,
/// `min_tokens`' bans and the ends included, step after step.
#[test]
fn packed_masks_keep_what_the_host_mask_keeps() {
    let dir = tempfile::tempdir().unwrap();
    write_model_dir(dir.path(), &SynthSpec::default()).unwrap();
    let m = ModelDir::open(dir.path()).unwrap();
    let tk = &m.tokenizer;
    let vocab = m.config.vocab_size;
    let params = GenerationParams {
        sampling: SamplingParams {
            temperature: 1.0,
            seed: Some(3),
            ..Default::default()
        },
        max_tokens: 30,
        min_tokens: 2,
        constraint: Some(Constraint::JsonSchema(SCHEMA.into())),
        ..Default::default()
    };
    let prompt = tk.encode("A person:", true).unwrap();
    let mut g = Generation::new(prompt, params, &m.config.eos_token_ids).unwrap();
    let mut step = 0u64;
    while g.finished().is_none() {
        let bits = g.next_mask_bits(vocab, tk).unwrap().expect("constrained");
        assert_eq!(bits.len(), vocab.div_ceil(32));
        let mut logits: Vec<f32> = (0..vocab as u64)
            .map(|i| ((i * 2_654_435_761 + step * 97) % 1000) as f32 / 100.0)
            .collect();
        g.step(&mut logits, tk).unwrap();
        let allowed = (0..vocab).filter(|&t| logits[t].is_finite()).count();
        assert!(allowed > 0, "step {step}");
        for (t, l) in logits.iter().enumerate() {
            let bit = (bits[t / 32] >> (t % 32)) & 1 == 1;
            assert_eq!(bit, l.is_finite(), "token {t} at step {step}");
        }
        assert!(
            bits.iter()
                .enumerate()
                .all(|(w, &b)| w * 32 + 32 <= vocab || b >> (vocab - w * 32) == 0),
            "no bit past the vocabulary"
        );
        step += 1;
    }
    assert!(step >= 2);
}
