//! The forward pass of one tensor-parallel rank, on candle-core tensors in
//! f32: the CPU backend runs it on each of its ranks, and at TP = 1 on its
//! only rank (the collective then is a no-op: a barrier of one, a sum of one).
//!
//! It favours plain, obviously-correct code, as the reference the CUDA
//! backend is checked against: linear layers over all the batch's tokens at
//! once, then attention per sequence over K/V gathered from its blocks. With
//! [`Activations::Bf16`] it rounds to bf16 where the CUDA backend stores bf16
//! (engine/src/cuda/pass.rs), so a check can tell the kernels' own error from
//! what any bf16 pipeline loses against f32.
//!
//! Every rank reaches every synchronisation point even when it has failed (it
//! deposits its failure instead of a tensor), so one rank's error ends the
//! pass on all ranks instead of leaving the others blocked on the barrier.

use std::sync::Mutex;

use candle_core::{D, DType, Device, Tensor};

use super::{LayerWeights, Linear, ModelWeights};
use crate::backend::{LayerHook, SeqChunk};
use crate::config::ModelConfig;
use crate::error::{EngineError, Result};
use crate::kv_cache::{CpuKvCache, KvLayout};
use crate::tp::{Collective, RankCaches, TpPlan, lock};

/// `x * weight / rms(x)` over the last dimension.
pub fn rms_norm(x: &Tensor, weight: &Tensor, eps: f64) -> Result<Tensor> {
    let inv_rms = (x.sqr()?.mean_keepdim(D::Minus1)? + eps)?.sqrt()?.recip()?;
    Ok(x.broadcast_mul(&inv_rms)?.broadcast_mul(weight)?)
}

/// Rotates `x [n, heads, head_dim]` by the angles in `cos`/`sin` `[n, 1, head_dim/2]`.
pub fn apply_rope(x: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
    let half = x.dim(D::Minus1)? / 2;
    let x1 = x.narrow(D::Minus1, 0, half)?;
    let x2 = x.narrow(D::Minus1, half, half)?;
    let a = (x1.broadcast_mul(cos)? - x2.broadcast_mul(sin)?)?;
    let b = (x2.broadcast_mul(cos)? + x1.broadcast_mul(sin)?)?;
    Ok(Tensor::cat(&[a, b], D::Minus1)?)
}

/// The precision of the activations between the forward pass's steps.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum Activations {
    /// f32 throughout (the CPU backend's own).
    #[default]
    F32,
    /// Rounded to bf16 (nearest even) where the CUDA backend keeps bf16: the
    /// norms' outputs, the q/k/v and gate/up products (before any bias), q
    /// after RoPE, attention's probabilities (unnormalised, as flash attention
    /// feeds them to its P·V product) and output, and the SiLU product. The
    /// residual stream, the o/down products and the logits stay f32, as there.
    Bf16,
}

impl Activations {
    /// `t` as this precision keeps it (a copy of `t` rounded, or `t`).
    pub fn round(self, t: Tensor) -> Result<Tensor> {
        Ok(match self {
            Activations::F32 => t,
            Activations::Bf16 => t.to_dtype(DType::BF16)?.to_dtype(DType::F32)?,
        })
    }
}

/// Softmax over the last dimension, its numerator rounded as `act` says
/// before it weights V (the denominator sums the unrounded terms).
fn softmax_last_dim(x: &Tensor, act: Activations) -> Result<Tensor> {
    let max = x.max_keepdim(D::Minus1)?;
    let e = x.broadcast_sub(&max)?.exp()?;
    let sum = e.sum_keepdim(D::Minus1)?;
    Ok(act.round(e)?.broadcast_div(&sum)?)
}

/// Attention of one chunk's queries `q [n, num_heads, hd]` over its whole
/// sequence so far, whose K/V (all of `cache`'s heads) are in `cache`; the
/// query heads are grouped evenly over the cache's KV heads. Returns `[n, num_heads * hd]`.
#[allow(clippy::too_many_arguments)]
pub fn attend(
    cache: &CpuKvCache,
    layer: usize,
    q: &Tensor,
    chunk: &SeqChunk<'_>,
    num_heads: usize,
    hd: usize,
    sliding_window: Option<usize>,
    act: Activations,
) -> Result<Tensor> {
    let (n, kvh) = (chunk.tokens.len(), cache.layout().num_kv_heads);
    let group = num_heads / kvh;
    let total = chunk.start + n;
    let (k, v) = cache.gather(layer, chunk.block_table, total)?;
    let k = Tensor::from_vec(k, (kvh, total, hd), &Device::Cpu)?;
    let v = Tensor::from_vec(v, (kvh, total, hd), &Device::Cpu)?;
    // Heads g*group .. (g+1)*group share KV head g: fold them into the row dimension.
    let q = q
        .transpose(0, 1)?
        .contiguous()?
        .reshape((kvh, group * n, hd))?;
    let scores = (q.matmul(&k.t()?)? * (1.0 / (hd as f64).sqrt()))?;
    let mut mask = vec![0f32; n * total];
    for i in 0..n {
        let qp = chunk.start + i;
        for (j, m) in mask[i * total..(i + 1) * total].iter_mut().enumerate() {
            let outside_window = sliding_window.is_some_and(|w| qp >= j + w);
            if j > qp || outside_window {
                *m = f32::NEG_INFINITY;
            }
        }
    }
    let mask = Tensor::from_vec(mask, (1, 1, n, total), &Device::Cpu)?;
    let scores = scores
        .reshape((kvh, group, n, total))?
        .broadcast_add(&mask)?;
    let probs = softmax_last_dim(&scores, act)?.reshape((kvh, group * n, total))?;
    let out = probs.matmul(&v)?.reshape((num_heads, n, hd))?;
    act.round(out.transpose(0, 1)?.reshape((n, num_heads * hd))?)
}

/// What every rank of one forward pass reads.
pub(crate) struct Pass<'a> {
    pub config: &'a ModelConfig,
    pub plan: &'a TpPlan,
    pub layout: KvLayout,
    pub chunks: &'a [SeqChunk<'a>],
    /// Rows (flattened token indices) whose logits the pass returns.
    pub logit_rows: &'a [u32],
    pub ids: &'a [u32],
    pub cos: &'a Tensor,
    pub sin: &'a Tensor,
    pub caches: &'a [Mutex<CpuKvCache>],
    pub coll: &'a Collective,
    pub with_hook: bool,
    pub act: Activations,
}

impl Pass<'_> {
    /// Runs rank `r`'s share of the pass; every rank returns the full logits
    /// of `logit_rows` (`None` when there are none).
    pub fn run_rank(
        &self,
        r: usize,
        weights: &ModelWeights,
        mut hook: Option<LayerHook<'_>>,
    ) -> Result<Option<Tensor>> {
        let (c, coll, cpu) = (self.config, self.coll, &Device::Cpu);
        let n = self.ids.len();

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
            let rows = weights
                .embed
                .index_select(&Tensor::new(local.as_slice(), cpu)?, 0)?;
            Ok(rows.broadcast_mul(&Tensor::from_vec(mask, (n, 1), cpu)?)?)
        })();
        let mut x = coll.all_reduce(r, embedded)?;

        for (li, layer) in weights.layers.iter().enumerate() {
            x = self.layer(r, li, layer, x, &mut hook)?;
        }

        if self.logit_rows.is_empty() {
            return Ok(None);
        }
        let logits = (|| -> Result<Tensor> {
            let last = x.index_select(&Tensor::new(self.logit_rows, cpu)?, 0)?;
            let h = self
                .act
                .round(rms_norm(&last, &weights.norm, c.rms_norm_eps)?)?;
            Ok(h.matmul(&weights.lm_head.t()?)?)
        })();
        let parts = coll.exchange(r, logits)?;
        Ok(Some(Tensor::cat(&parts, 1)?))
    }

    /// One decoder layer on rank `r`: the residual stream `x` in, out.
    fn layer(
        &self,
        r: usize,
        li: usize,
        layer: &LayerWeights,
        x: Tensor,
        hook: &mut Option<LayerHook<'_>>,
    ) -> Result<Tensor> {
        let (c, coll, act) = (self.config, self.coll, self.act);
        let (n, hd) = (self.ids.len(), c.head_dim);
        let (qh, kvh) = (self.plan.q_heads(r).len(), self.plan.kv_heads(r).len());
        // A projection's product, rounded, then its bias.
        let project = |l: &Linear, h: &Tensor| -> Result<Tensor> {
            let y = act.round(l.product(h)?)?;
            Ok(match &l.bias {
                Some(b) => y.broadcast_add(b)?,
                None => y,
            })
        };
        let qkv = (|| -> Result<Tensor> {
            let h = act.round(rms_norm(&x, &layer.input_norm, c.rms_norm_eps)?)?;
            let q = project(&layer.q, &h)?.reshape((n, qh, hd))?;
            let k = project(&layer.k, &h)?.reshape((n, kvh, hd))?;
            let v = project(&layer.v, &h)?.reshape((n, kvh, hd))?;
            let q = act.round(apply_rope(&q, self.cos, self.sin)?)?;
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
            let q = q.ok_or(EngineError::PeerRankFailed)?;
            let cache = lock(&self.caches[r])?;
            let mut outs = Vec::with_capacity(self.chunks.len());
            let mut offset = 0;
            for ch in self.chunks {
                let q_chunk = q.narrow(0, offset, ch.tokens.len())?;
                outs.push(attend(
                    &cache,
                    li,
                    &q_chunk,
                    ch,
                    qh,
                    hd,
                    c.sliding_window,
                    act,
                )?);
                offset += ch.tokens.len();
            }
            layer.o.product(&Tensor::cat(&outs, 0)?)
        });
        // o_proj is row-parallel: ranks' products are partial sums; its bias is added once.
        let mut o = coll.all_reduce(r, attn)?;
        if let Some(b) = &layer.o.bias {
            o = o.broadcast_add(b)?;
        }
        let x = (x + o)?;
        let mlp = (|| -> Result<Tensor> {
            let h = act.round(rms_norm(&x, &layer.post_norm, c.rms_norm_eps)?)?;
            let gated = (project(&layer.gate, &h)?.silu()? * project(&layer.up, &h)?)?;
            layer.down.product(&act.round(gated)?)
        })();
        Ok((x + coll.all_reduce(r, mlp)?)?)
    }
}
