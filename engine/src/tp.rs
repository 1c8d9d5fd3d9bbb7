//! Tensor parallelism on the CPU: one model sharded Megatron-style over
//! `tp` ranks, each rank a thread, summing partial results through an
//! in-process all-reduce.
//!
//! What each rank holds (sliced at load time from the mapped safetensors, so a
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
//! layout restricted to those heads. [`TpBackend`] implements [`Backend`] for
//! the whole model (its [`KvLayout`] has every KV head; whole-layer export and
//! import gather and scatter heads across the ranks) and ships per-rank head
//! ranges ([`Backend::kv_head_shards`], [`Backend::export_heads`],
//! [`Backend::import_heads`]) so that transfers between nodes of different TP
//! sizes move each rank's heads as they are.
//!
//! Threads: each forward pass runs the ranks as scoped threads (rank 0 on the
//! caller's thread), synchronised by a barrier-based all-reduce. Spawning a
//! few threads per forward pass costs tens of microseconds, noise beside the
//! matmuls of a CPU forward pass, and in exchange the ranks borrow the weights
//! and caches directly (no `Arc`s, no long-lived pool to shut down), and a
//! forward pass cannot outlive its inputs. Every rank reaches every
//! synchronisation point even when it has failed (it deposits its failure
//! instead of a tensor), so one rank's error ends the pass on all ranks
//! instead of leaving the others blocked on the barrier. The sum runs in rank
//! order on every rank, so all ranks hold bitwise-identical activations.
//!
//! TP=1 is [`CpuBackend`](crate::cpu::CpuBackend), unchanged.

use std::ops::Range;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Barrier, Mutex, MutexGuard};

use candle_core::{DType, Device, Tensor};

use crate::backend::{Backend, KvExport, LayerHook, SeqChunk, validate_chunks};
use crate::block_manager::BlockId;
use crate::config::ModelConfig;
use crate::cpu::{Linear, apply_rope, attend, rms_norm};
use crate::error::{EngineError, Result};
use crate::kv_cache::{CpuKvCache, KvDtype, KvLayout, frame_block_bytes};
use crate::rope;
use crate::weights::Weights;

/// How a model splits over `tp` ranks.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TpPlan {
    /// Number of ranks.
    pub tp: usize,
    num_heads: usize,
    num_kv_heads: usize,
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
}

struct ShardLayer {
    input_norm: Tensor,
    q: Linear,
    k: Linear,
    v: Linear,
    /// Columns of o_proj for the rank's query heads, without bias.
    o: Tensor,
    post_norm: Tensor,
    gate: Linear,
    up: Linear,
    /// Columns of down_proj for the rank's MLP slice.
    down: Tensor,
}

/// One rank's shard of the weights.
struct Shard {
    embed: Tensor,
    layers: Vec<ShardLayer>,
    norm: Tensor,
    lm_head: Tensor,
}

/// Replicated weights added after a reduction.
struct Replicated {
    o_bias: Vec<Option<Tensor>>,
}

fn load_shard(c: &ModelConfig, w: &Weights, plan: &TpPlan, r: usize) -> Result<Shard> {
    let (h, hd, cpu, f32) = (c.hidden_size, c.head_dim, &Device::Cpu, DType::F32);
    let rows = |name: &str, full: &[usize], range: &Range<usize>| {
        w.load_narrow(name, full, 0, range.clone(), f32, cpu)
    };
    let linear_rows = |p: &str, out: usize, range: Range<usize>, bias: bool| -> Result<Linear> {
        Ok(Linear {
            weight: rows(&format!("{p}.weight"), &[out, h], &range)?,
            bias: if bias {
                Some(rows(&format!("{p}.bias"), &[out], &range)?)
            } else {
                None
            },
        })
    };
    let scale = |r: Range<usize>, by: usize| r.start * by..r.end * by;
    let (qh, kvh, inter, vocab) = (
        plan.q_heads(r),
        plan.kv_heads(r),
        plan.intermediate(r),
        plan.vocab(r),
    );
    let embed = rows("model.embed_tokens.weight", &[c.vocab_size, h], &vocab)?;
    let mut layers = Vec::with_capacity(c.num_layers);
    for i in 0..c.num_layers {
        let p = format!("model.layers.{i}");
        let a = format!("{p}.self_attn");
        let m = format!("{p}.mlp");
        layers.push(ShardLayer {
            input_norm: w.load(&format!("{p}.input_layernorm.weight"), &[h], f32, cpu)?,
            q: linear_rows(
                &format!("{a}.q_proj"),
                c.num_heads * hd,
                scale(qh.clone(), hd),
                c.qkv_bias,
            )?,
            k: linear_rows(
                &format!("{a}.k_proj"),
                c.num_kv_heads * hd,
                scale(kvh.clone(), hd),
                c.qkv_bias,
            )?,
            v: linear_rows(
                &format!("{a}.v_proj"),
                c.num_kv_heads * hd,
                scale(kvh.clone(), hd),
                c.qkv_bias,
            )?,
            o: w.load_narrow(
                &format!("{a}.o_proj.weight"),
                &[h, c.num_heads * hd],
                1,
                qh.start * hd..qh.end * hd,
                f32,
                cpu,
            )?,
            post_norm: w.load(
                &format!("{p}.post_attention_layernorm.weight"),
                &[h],
                f32,
                cpu,
            )?,
            gate: linear_rows(
                &format!("{m}.gate_proj"),
                c.intermediate_size,
                inter.clone(),
                false,
            )?,
            up: linear_rows(
                &format!("{m}.up_proj"),
                c.intermediate_size,
                inter.clone(),
                false,
            )?,
            down: w.load_narrow(
                &format!("{m}.down_proj.weight"),
                &[h, c.intermediate_size],
                1,
                inter.clone(),
                f32,
                cpu,
            )?,
        });
    }
    let norm = w.load("model.norm.weight", &[h], f32, cpu)?;
    let lm_head = if c.tie_word_embeddings && !w.contains("lm_head.weight") {
        embed.clone()
    } else {
        rows("lm_head.weight", &[c.vocab_size, h], &vocab)?
    };
    Ok(Shard {
        embed,
        layers,
        norm,
        lm_head,
    })
}

/// The failure a rank reports when another rank failed first.
const PEER_FAILED: &str = "another rank failed";

/// The ranks' meeting point: an all-reduce (sum) and an all-gather over a
/// barrier, tolerant of a rank arriving with an error.
struct Collective {
    barrier: Barrier,
    slots: Vec<Mutex<Option<Tensor>>>,
    failed: AtomicBool,
}

impl Collective {
    fn new(tp: usize) -> Self {
        Collective {
            barrier: Barrier::new(tp),
            slots: (0..tp).map(|_| Mutex::new(None)).collect(),
            failed: AtomicBool::new(false),
        }
    }

    /// Every rank's tensor, in rank order; an error on every rank if any rank
    /// arrived with one (the failing rank gets its own error back).
    fn exchange(&self, rank: usize, part: Result<Tensor>) -> Result<Vec<Tensor>> {
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
            Err(EngineError::TensorParallel(PEER_FAILED.into()))
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
    fn all_reduce(&self, rank: usize, part: Result<Tensor>) -> Result<Tensor> {
        let parts = self.exchange(rank, part)?;
        let mut sum = parts[0].clone();
        for p in &parts[1..] {
            sum = (sum + p)?;
        }
        Ok(sum)
    }

    /// A synchronisation point carrying only success or failure.
    fn sync(&self, rank: usize, status: Result<()>) -> Result<()> {
        self.exchange(
            rank,
            status.and_then(|()| Ok(Tensor::zeros(1, DType::U8, &Device::Cpu)?)),
        )
        .map(|_| ())
    }
}

fn is_peer_failure(e: &EngineError) -> bool {
    matches!(e, EngineError::TensorParallel(m) if m == PEER_FAILED)
}

fn lock<T>(m: &Mutex<T>) -> Result<MutexGuard<'_, T>> {
    m.lock()
        .map_err(|_| EngineError::TensorParallel("a rank panicked holding a lock".into()))
}

/// The ranks' KV caches seen as one cache of all heads.
struct RankCaches<'a> {
    plan: &'a TpPlan,
    caches: &'a [Mutex<CpuKvCache>],
    layout: KvLayout,
}

impl RankCaches<'_> {
    fn export(&self, layer: usize, blocks: &[BlockId], heads: Range<usize>) -> Result<Vec<u8>> {
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

    fn import(
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

/// What every rank of one forward pass reads.
struct Pass<'a> {
    config: &'a ModelConfig,
    plan: &'a TpPlan,
    layout: KvLayout,
    chunks: &'a [SeqChunk<'a>],
    ids: &'a [u32],
    cos: &'a Tensor,
    sin: &'a Tensor,
    replicated: &'a Replicated,
    caches: &'a [Mutex<CpuKvCache>],
    coll: &'a Collective,
    with_hook: bool,
}

impl Pass<'_> {
    /// Runs rank `r`'s share of the pass; every rank returns the full logits.
    fn run_rank(&self, r: usize, shard: &Shard, mut hook: Option<LayerHook<'_>>) -> Result<Tensor> {
        let (c, coll, cpu) = (self.config, self.coll, &Device::Cpu);
        let n = self.ids.len();
        let hd = c.head_dim;
        let (qh, kvh) = (self.plan.q_heads(r).len(), self.plan.kv_heads(r).len());

        // Embedding: each row comes from the one rank owning its token id.
        let vocab = self.plan.vocab(r);
        let embedded = (|| -> Result<Tensor> {
            let local: Vec<u32> = self
                .ids
                .iter()
                .map(|&t| {
                    let t = t as usize;
                    if vocab.contains(&t) {
                        (t - vocab.start) as u32
                    } else {
                        0
                    }
                })
                .collect();
            let mask: Vec<f32> = self
                .ids
                .iter()
                .map(|&t| f32::from(u8::from(vocab.contains(&(t as usize)))))
                .collect();
            let rows = shard
                .embed
                .index_select(&Tensor::new(local.as_slice(), cpu)?, 0)?;
            Ok(rows.broadcast_mul(&Tensor::from_vec(mask, (n, 1), cpu)?)?)
        })();
        let mut x = coll.all_reduce(r, embedded)?;

        for li in 0..c.num_layers {
            let layer = &shard.layers[li];
            let qkv = (|| -> Result<Tensor> {
                let h = rms_norm(&x, &layer.input_norm, c.rms_norm_eps)?;
                let q = layer.q.forward(&h)?.reshape((n, qh, hd))?;
                let k = layer.k.forward(&h)?.reshape((n, kvh, hd))?;
                let v = layer.v.forward(&h)?.reshape((n, kvh, hd))?;
                let q = apply_rope(&q, self.cos, self.sin)?;
                let k = apply_rope(&k, self.cos, self.sin)?
                    .flatten_all()?
                    .to_vec1::<f32>()?;
                let v = v.flatten_all()?.to_vec1::<f32>()?;
                let row = kvh * hd;
                let mut cache = lock(&self.caches[r])?;
                let mut offset = 0;
                for ch in self.chunks {
                    for i in 0..ch.tokens.len() {
                        let span = (offset + i) * row..(offset + i + 1) * row;
                        cache.write_token(
                            li,
                            ch.block_table,
                            ch.start + i,
                            &k[span.clone()],
                            &v[span],
                        )?;
                    }
                    offset += ch.tokens.len();
                }
                Ok(q)
            })();
            let q: Result<Option<Tensor>> = if self.with_hook {
                // Every rank's K/V of this layer must be in before the hook reads it.
                let (q, status) = match qkv {
                    Ok(q) => (Some(q), Ok(())),
                    Err(e) => (None, Err(e)),
                };
                coll.sync(r, status)?;
                let caches = RankCaches {
                    plan: self.plan,
                    caches: self.caches,
                    layout: self.layout,
                };
                match hook.as_mut() {
                    Some(hook) => (*hook)(li, &caches).map(|()| q),
                    None => Ok(q),
                }
            } else {
                qkv.map(Some)
            };
            let attn = q.and_then(|q| {
                let q = q.ok_or_else(|| EngineError::TensorParallel(PEER_FAILED.into()))?;
                let cache = lock(&self.caches[r])?;
                let mut outs = Vec::with_capacity(self.chunks.len());
                let mut offset = 0;
                for ch in self.chunks {
                    let q_chunk = q.narrow(0, offset, ch.tokens.len())?;
                    outs.push(attend(&cache, li, &q_chunk, ch, qh, hd, c.sliding_window)?);
                    offset += ch.tokens.len();
                }
                let attn = Tensor::cat(&outs, 0)?;
                Ok(attn.matmul(&layer.o.t()?)?)
            });
            let mut o = coll.all_reduce(r, attn)?;
            if let Some(b) = &self.replicated.o_bias[li] {
                o = o.broadcast_add(b)?;
            }
            x = (x + o)?;
            let mlp = (|| -> Result<Tensor> {
                let h = rms_norm(&x, &layer.post_norm, c.rms_norm_eps)?;
                let act = (layer.gate.forward(&h)?.silu()? * layer.up.forward(&h)?)?;
                Ok(act.matmul(&layer.down.t()?)?)
            })();
            x = (x + coll.all_reduce(r, mlp)?)?;
        }

        let logits = (|| -> Result<Tensor> {
            let mut last_rows = Vec::with_capacity(self.chunks.len());
            let mut end = 0;
            for ch in self.chunks {
                end += ch.tokens.len();
                last_rows.push((end - 1) as u32);
            }
            let last = x.index_select(&Tensor::new(last_rows.as_slice(), cpu)?, 0)?;
            let h = rms_norm(&last, &shard.norm, c.rms_norm_eps)?;
            Ok(h.matmul(&shard.lm_head.t()?)?)
        })();
        let parts = coll.exchange(r, logits)?;
        Ok(Tensor::cat(&parts, 1)?)
    }
}

/// A model sharded over `tp` CPU ranks, with each rank's KV cache.
pub struct TpBackend {
    config: ModelConfig,
    plan: TpPlan,
    shards: Vec<Shard>,
    replicated: Replicated,
    caches: Vec<Mutex<CpuKvCache>>,
    layout: KvLayout,
    inv_freq: Vec<f32>,
}

impl TpBackend {
    /// Loads each rank's shard of the weights and a zeroed cache of
    /// `num_blocks` blocks of `block_size` tokens per rank (for its heads).
    pub fn load(
        config: &ModelConfig,
        w: &Weights,
        tp: usize,
        num_blocks: usize,
        block_size: usize,
    ) -> Result<Self> {
        let plan = TpPlan::new(config, tp)?;
        let shards = (0..tp)
            .map(|r| load_shard(config, w, &plan, r))
            .collect::<Result<Vec<_>>>()?;
        let h = config.hidden_size;
        let o_bias = (0..config.num_layers)
            .map(|i| {
                config
                    .o_bias
                    .then(|| {
                        w.load(
                            &format!("model.layers.{i}.self_attn.o_proj.bias"),
                            &[h],
                            DType::F32,
                            &Device::Cpu,
                        )
                    })
                    .transpose()
            })
            .collect::<Result<Vec<_>>>()?;
        let layout = KvLayout {
            num_layers: config.num_layers,
            num_blocks,
            block_size,
            num_kv_heads: config.num_kv_heads,
            head_dim: config.head_dim,
            dtype: KvDtype::F32,
        };
        let caches = (0..tp)
            .map(|r| {
                CpuKvCache::new(KvLayout {
                    num_kv_heads: plan.kv_heads(r).len(),
                    ..layout
                })
                .map(Mutex::new)
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(TpBackend {
            config: config.clone(),
            plan,
            shards,
            replicated: Replicated { o_bias },
            caches,
            layout,
            inv_freq: rope::inv_freq(config),
        })
    }

    /// The split.
    pub fn plan(&self) -> &TpPlan {
        &self.plan
    }

    fn rank_caches(&self) -> RankCaches<'_> {
        RankCaches {
            plan: &self.plan,
            caches: &self.caches,
            layout: self.layout,
        }
    }
}

impl Backend for TpBackend {
    fn config(&self) -> &ModelConfig {
        &self.config
    }

    fn kv_layout(&self) -> KvLayout {
        self.layout
    }

    fn forward(
        &mut self,
        chunks: &[SeqChunk<'_>],
        on_layer: Option<LayerHook<'_>>,
    ) -> Result<Vec<Vec<f32>>> {
        validate_chunks(&self.config, &self.layout, chunks)?;
        if chunks.is_empty() {
            return Ok(Vec::new());
        }
        let cpu = &Device::Cpu;
        let hd = self.config.head_dim;
        let ids: Vec<u32> = chunks
            .iter()
            .flat_map(|ch| ch.tokens.iter().copied())
            .collect();
        let positions: Vec<usize> = chunks
            .iter()
            .flat_map(|ch| ch.start..ch.start + ch.tokens.len())
            .collect();
        let n = ids.len();
        let (cos, sin) = rope::cos_sin(&self.inv_freq, &positions);
        let cos = Tensor::from_vec(cos, (n, 1, hd / 2), cpu)?;
        let sin = Tensor::from_vec(sin, (n, 1, hd / 2), cpu)?;
        let coll = Collective::new(self.plan.tp);
        let pass = Pass {
            config: &self.config,
            plan: &self.plan,
            layout: self.layout,
            chunks,
            ids: &ids,
            cos: &cos,
            sin: &sin,
            replicated: &self.replicated,
            caches: &self.caches,
            coll: &coll,
            with_hook: on_layer.is_some(),
        };
        let shards = &self.shards;
        let results: Vec<Result<Tensor>> = std::thread::scope(|s| {
            let handles: Vec<_> = (1..self.plan.tp)
                .map(|r| {
                    let pass = &pass;
                    std::thread::Builder::new()
                        .name(format!("tp-rank-{r}"))
                        .spawn_scoped(s, move || pass.run_rank(r, &shards[r], None))
                })
                .collect();
            let mut results = vec![pass.run_rank(0, &shards[0], on_layer)];
            for h in handles {
                results.push(match h {
                    Ok(h) => h.join().unwrap_or_else(|_| {
                        Err(EngineError::TensorParallel("a rank thread panicked".into()))
                    }),
                    Err(e) => Err(EngineError::TensorParallel(format!(
                        "cannot start a rank thread: {e}"
                    ))),
                });
            }
            results
        });
        // The first rank's own error (not a "another rank failed" echo) is the one to report.
        let mut logits = None;
        let mut first_error: Option<EngineError> = None;
        for res in results {
            match res {
                Ok(t) => logits = logits.or(Some(t)),
                Err(e) => {
                    if first_error.as_ref().is_none_or(is_peer_failure) {
                        first_error = Some(e);
                    }
                }
            }
        }
        if let Some(e) = first_error {
            return Err(e);
        }
        let logits =
            logits.ok_or_else(|| EngineError::TensorParallel("no rank returned logits".into()))?;
        Ok(logits.to_vec2::<f32>()?)
    }

    fn export_layer(&self, layer: usize, blocks: &[BlockId]) -> Result<Vec<u8>> {
        self.rank_caches()
            .export(layer, blocks, 0..self.layout.num_kv_heads)
    }

    fn import_layer(&mut self, layer: usize, blocks: &[BlockId], bytes: &[u8]) -> Result<()> {
        self.rank_caches()
            .import(layer, blocks, 0..self.layout.num_kv_heads, bytes)
    }

    fn kv_head_shards(&self) -> Vec<Range<usize>> {
        (0..self.plan.tp)
            .filter(|&r| self.plan.ships_kv(r))
            .map(|r| self.plan.kv_heads(r))
            .collect()
    }

    fn export_heads(
        &self,
        layer: usize,
        blocks: &[BlockId],
        heads: Range<usize>,
    ) -> Result<Vec<u8>> {
        self.rank_caches().export(layer, blocks, heads)
    }

    fn import_heads(
        &mut self,
        layer: usize,
        blocks: &[BlockId],
        heads: Range<usize>,
        bytes: &[u8],
    ) -> Result<()> {
        self.rank_caches().import(layer, blocks, heads, bytes)
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
    fn plan_refuses_what_does_not_split() {
        for (heads, kv, tp) in [(6, 2, 4), (8, 4, 3), (8, 8, 0), (12, 6, 4)] {
            let e = TpPlan::new(&config(heads, kv), tp).unwrap_err();
            assert!(matches!(e, EngineError::TensorParallel(_)), "{e}");
        }
    }
}
