//! Tensor parallelism on the CPU: how one model splits Megatron-style over
//! `tp` ranks ([`TpPlan`]), the ranks' in-process collective ([`Collective`]:
//! all-reduce, all-gather, barrier) and their KV caches seen as one
//! ([`RankCaches`]). The CPU backend ([`CpuBackend`](crate::cpu::CpuBackend))
//! runs the ranks; the Llama definition ([`llama`](crate::llama)) says which
//! weight splits along which dimension.
//!
//! What each rank holds (sliced at load time from the mapped weights, so a
//! rank materialises only its shard):
//!
//! - Q, K, V, gate and up: column-parallel (rows of the HF `[out, in]`
//!   matrices): the rank's query heads, its KV heads, its slice of the MLP.
//! - o_proj and down_proj: row-parallel (columns): each rank's product is a
//!   partial sum of the full output; an all-reduce adds them (biases are added
//!   once, after the sum).
//! - Embedding and LM head: split by vocabulary; the embedding lookup is a
//!   masked lookup plus all-reduce (one rank contributes each row), the logits
//!   are gathered by concatenation.
//! - Norm weights: replicated.
//! - KV heads: split evenly when `tp` divides them; when `tp` exceeds them
//!   (`tp` a multiple of the KV head count) each KV head is replicated on
//!   `tp / num_kv_heads` consecutive ranks, as in vLLM. Query heads must divide by `tp`.
//!
//! Each rank owns a [`CpuKvCache`] for the heads it owns: the shared block
//! layout restricted to those heads; [`RankCaches`] gathers and scatters
//! heads across them, so that transfers between nodes of different TP sizes
//! move each rank's heads as they are. The sum runs in rank order on every
//! rank, so all ranks hold bitwise-identical activations; a rank that fails
//! still reaches every meeting point (the others then get
//! [`EngineError::PeerRankFailed`]).

use std::ops::Range;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Barrier, Mutex, MutexGuard};

use candle_core::{DType, Device, Tensor};

use crate::backend::KvExport;
use crate::block_manager::BlockId;
use crate::config::ModelConfig;
use crate::error::{EngineError, Result};
use crate::kv_cache::{CpuKvCache, KvLayout, frame_block_bytes};
use crate::llama::Part;

/// How a model splits over `tp` ranks.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TpPlan {
    /// Number of ranks.
    pub tp: usize,
    num_heads: usize,
    num_kv_heads: usize,
    head_dim: usize,
    vocab: usize,
    intermediate: usize,
}

/// `start..end` of part `r` of `total` split as evenly as possible in `parts`.
fn even_split(total: usize, parts: usize, r: usize) -> Range<usize> {
    total * r / parts..total * (r + 1) / parts
}

impl TpPlan {
    /// The split of `config` over `tp` ranks, or an error saying why it cannot be split.
    pub fn new(config: &ModelConfig, tp: usize) -> Result<Self> {
        let err = |m: String| Err(EngineError::TensorParallel(m));
        if tp == 0 {
            return err("tp must be at least 1".into());
        }
        if !config.num_heads.is_multiple_of(tp) {
            return err(format!(
                "tp = {tp} does not divide the model's {} query heads",
                config.num_heads
            ));
        }
        let kvh = config.num_kv_heads;
        if !(kvh.is_multiple_of(tp) || tp.is_multiple_of(kvh)) {
            return err(format!(
                "tp = {tp} neither divides the model's {kvh} KV heads nor is a multiple of them"
            ));
        }
        if config.vocab_size < tp || config.intermediate_size < tp {
            return err(format!(
                "tp = {tp} exceeds the vocabulary ({}) or the MLP width ({})",
                config.vocab_size, config.intermediate_size
            ));
        }
        Ok(TpPlan {
            tp,
            num_heads: config.num_heads,
            num_kv_heads: kvh,
            head_dim: config.head_dim,
            vocab: config.vocab_size,
            intermediate: config.intermediate_size,
        })
    }

    /// Query heads of rank `r`.
    pub fn q_heads(&self, r: usize) -> Range<usize> {
        let per = self.num_heads / self.tp;
        r * per..(r + 1) * per
    }

    /// KV heads rank `r` holds (one replicated head when `tp` exceeds the KV heads).
    pub fn kv_heads(&self, r: usize) -> Range<usize> {
        if self.tp <= self.num_kv_heads {
            let per = self.num_kv_heads / self.tp;
            r * per..(r + 1) * per
        } else {
            let head = r / (self.tp / self.num_kv_heads);
            head..head + 1
        }
    }

    /// Whether rank `r` is the first holder of its KV heads (the one that ships them).
    pub fn ships_kv(&self, r: usize) -> bool {
        r == 0 || self.kv_heads(r - 1) != self.kv_heads(r)
    }

    /// Vocabulary rows (embedding and LM head) of rank `r`.
    pub fn vocab(&self, r: usize) -> Range<usize> {
        even_split(self.vocab, self.tp, r)
    }

    /// MLP columns of rank `r`.
    pub fn intermediate(&self, r: usize) -> Range<usize> {
        even_split(self.intermediate, self.tp, r)
    }

    /// The rows (or columns) of a weight cut along `part` that rank `r` holds.
    pub fn part(&self, part: Part, r: usize) -> Range<usize> {
        let scale = |h: Range<usize>| h.start * self.head_dim..h.end * self.head_dim;
        match part {
            Part::QueryHeads => scale(self.q_heads(r)),
            Part::KvHeads => scale(self.kv_heads(r)),
            Part::Mlp => self.intermediate(r),
            Part::Vocab => self.vocab(r),
        }
    }
}

/// The ranks' meeting point: an all-reduce (sum) and an all-gather over a
/// barrier, tolerant of a rank arriving with an error.
pub(crate) struct Collective {
    barrier: Barrier,
    slots: Vec<Mutex<Option<Tensor>>>,
    failed: AtomicBool,
}

impl Collective {
    pub(crate) fn new(tp: usize) -> Self {
        Collective {
            barrier: Barrier::new(tp),
            slots: (0..tp).map(|_| Mutex::new(None)).collect(),
            failed: AtomicBool::new(false),
        }
    }

    /// Every rank's tensor, in rank order; an error on every rank if any rank
    /// arrived with one (the failing rank gets its own error back).
    pub(crate) fn exchange(&self, rank: usize, part: Result<Tensor>) -> Result<Vec<Tensor>> {
        let own_error = match part {
            Ok(t) => {
                *lock(&self.slots[rank])? = Some(t);
                None
            }
            Err(e) => {
                self.failed.store(true, Ordering::SeqCst);
                Some(e)
            }
        };
        self.barrier.wait();
        let out = if let Some(e) = own_error {
            Err(e)
        } else if self.failed.load(Ordering::SeqCst) {
            Err(EngineError::PeerRankFailed)
        } else {
            self.slots
                .iter()
                .map(|s| {
                    lock(s)?
                        .clone()
                        .ok_or_else(|| EngineError::TensorParallel("a rank left no tensor".into()))
                })
                .collect()
        };
        // No rank overwrites its slot before every rank has read them all.
        self.barrier.wait();
        out
    }

    /// The sum of every rank's `part`, added in rank order (identical on every rank).
    pub(crate) fn all_reduce(&self, rank: usize, part: Result<Tensor>) -> Result<Tensor> {
        let parts = self.exchange(rank, part)?;
        let mut sum = parts[0].clone();
        for p in &parts[1..] {
            sum = (sum + p)?;
        }
        Ok(sum)
    }

    /// A synchronisation point carrying only success or failure.
    pub(crate) fn sync(&self, rank: usize, status: Result<()>) -> Result<()> {
        self.exchange(
            rank,
            status.and_then(|()| Ok(Tensor::zeros(1, DType::U8, &Device::Cpu)?)),
        )
        .map(|_| ())
    }
}

pub(crate) fn lock<T>(m: &Mutex<T>) -> Result<MutexGuard<'_, T>> {
    m.lock()
        .map_err(|_| EngineError::TensorParallel("a rank panicked holding a lock".into()))
}

/// The ranks' KV caches seen as one cache of all heads.
pub(crate) struct RankCaches<'a> {
    pub plan: &'a TpPlan,
    pub caches: &'a [Mutex<CpuKvCache>],
    pub layout: KvLayout,
}

impl RankCaches<'_> {
    pub(crate) fn export(
        &self,
        layer: usize,
        blocks: &[BlockId],
        heads: Range<usize>,
    ) -> Result<Vec<u8>> {
        if heads.is_empty() || heads.end > self.layout.num_kv_heads {
            return Err(EngineError::KvCache(format!(
                "head range {heads:?} is not within the model's {} KV heads",
                self.layout.num_kv_heads
            )));
        }
        let mut out = vec![0u8; blocks.len() * frame_block_bytes(&self.layout, heads.len())];
        for r in 0..self.plan.tp {
            let own = self.plan.kv_heads(r);
            if self.plan.ships_kv(r) && own.start < heads.end && heads.start < own.end {
                lock(&self.caches[r])?.export_heads_into(
                    layer,
                    blocks,
                    own.start,
                    heads.clone(),
                    &mut out,
                )?;
            }
        }
        Ok(out)
    }

    pub(crate) fn import(
        &self,
        layer: usize,
        blocks: &[BlockId],
        heads: Range<usize>,
        bytes: &[u8],
    ) -> Result<()> {
        if heads.is_empty() || heads.end > self.layout.num_kv_heads {
            return Err(EngineError::KvCache(format!(
                "head range {heads:?} is not within the model's {} KV heads",
                self.layout.num_kv_heads
            )));
        }
        // Check the size once, so a bad frame leaves every rank untouched.
        let want = blocks.len() * frame_block_bytes(&self.layout, heads.len());
        if bytes.len() != want {
            return Err(EngineError::KvCache(format!(
                "{} bytes do not fill {} blocks of heads {heads:?} ({want} bytes)",
                bytes.len(),
                blocks.len()
            )));
        }
        for r in 0..self.plan.tp {
            let own = self.plan.kv_heads(r);
            if own.start < heads.end && heads.start < own.end {
                lock(&self.caches[r])?.import_heads(
                    layer,
                    blocks,
                    own.start,
                    heads.clone(),
                    bytes,
                )?;
            }
        }
        Ok(())
    }
}

impl KvExport for RankCaches<'_> {
    fn export_layer(&self, layer: usize, blocks: &[BlockId]) -> Result<Vec<u8>> {
        self.export(layer, blocks, 0..self.layout.num_kv_heads)
    }

    fn export_heads(
        &self,
        layer: usize,
        blocks: &[BlockId],
        heads: Range<usize>,
    ) -> Result<Vec<u8>> {
        self.export(layer, blocks, heads)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(heads: usize, kv: usize) -> ModelConfig {
        let mut c = ModelConfig::from_json(
            r#"{"architectures":["LlamaForCausalLM"],"vocab_size":100,"hidden_size":32,
            "intermediate_size":50,"num_hidden_layers":1,"num_attention_heads":4,
            "num_key_value_heads":2,"max_position_embeddings":64,"rms_norm_eps":1e-5}"#,
        )
        .unwrap();
        c.num_heads = heads;
        c.num_kv_heads = kv;
        c
    }

    #[test]
    fn plan_splits_and_replicates_kv_heads() {
        let p = TpPlan::new(&config(8, 4), 2).unwrap();
        assert_eq!((p.q_heads(1), p.kv_heads(1)), (4..8, 2..4));
        let p = TpPlan::new(&config(8, 2), 4).unwrap();
        let kv: Vec<_> = (0..4).map(|r| p.kv_heads(r)).collect();
        assert_eq!(kv, vec![0..1, 0..1, 1..2, 1..2]);
        let ships: Vec<_> = (0..4).map(|r| p.ships_kv(r)).collect();
        assert_eq!(ships, vec![true, false, true, false]);
        assert_eq!((p.vocab(3), p.intermediate(0)), (75..100, 0..12));
    }

    #[test]
    fn a_failed_rank_ends_the_exchange_on_every_rank_with_a_typed_error() {
        let coll = Collective::new(2);
        let (own, peer) = std::thread::scope(|s| {
            let failing = s.spawn(|| {
                coll.all_reduce(1, Err(EngineError::InvalidInput("rank 1 broke".into())))
            });
            let healthy =
                coll.all_reduce(0, Ok(Tensor::ones(2, DType::F32, &Device::Cpu).unwrap()));
            (failing.join().unwrap(), healthy)
        });
        assert!(matches!(own, Err(EngineError::InvalidInput(_))), "{own:?}");
        assert!(matches!(peer, Err(EngineError::PeerRankFailed)), "{peer:?}");
        // A healthy pass sums in rank order on every rank.
        let coll = Collective::new(2);
        let ones = || Ok(Tensor::ones(2, DType::F32, &Device::Cpu)?);
        let (a, b) = std::thread::scope(|s| {
            let other = s.spawn(|| coll.all_reduce(1, ones()));
            (coll.all_reduce(0, ones()), other.join().unwrap())
        });
        for sum in [a, b] {
            assert_eq!(sum.unwrap().to_vec1::<f32>().unwrap(), vec![2.0, 2.0]);
        }
    }

    #[test]
    fn plan_refuses_what_does_not_split() {
        for (heads, kv, tp) in [(6, 2, 4), (8, 4, 3), (8, 8, 0), (12, 6, 4)] {
            let e = TpPlan::new(&config(heads, kv), tp).unwrap_err();
            assert!(matches!(e, EngineError::TensorParallel(_)), "{e}");
        }
    }
}
