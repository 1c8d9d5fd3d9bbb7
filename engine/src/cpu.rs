//! The CPU backend: the Llama-family forward pass on candle-core tensors, in f32.
//!
//! This is the reference the CUDA backend is checked against, so it favours
//! plain, obviously-correct code: linear layers over all the batch's tokens at
//! once, then attention per sequence over K/V gathered from its blocks.

use std::ops::Range;

use candle_core::{D, DType, Device, Tensor};

use crate::backend::{Backend, KvExport, LayerHook, SeqChunk, validate_chunks};
use crate::block_manager::BlockId;
use crate::config::ModelConfig;
use crate::error::Result;
use crate::kv_cache::{CpuKvCache, KvDtype, KvLayout};
use crate::rope;
use crate::weights::Weights;

pub(crate) struct Linear {
    /// `[out, in]`, as stored by HF.
    pub(crate) weight: Tensor,
    pub(crate) bias: Option<Tensor>,
}

impl Linear {
    fn load(w: &Weights, prefix: &str, out: usize, inp: usize, bias: bool) -> Result<Self> {
        let weight = w.load(
            &format!("{prefix}.weight"),
            &[out, inp],
            DType::F32,
            &Device::Cpu,
        )?;
        let bias = if bias {
            Some(w.load(&format!("{prefix}.bias"), &[out], DType::F32, &Device::Cpu)?)
        } else {
            None
        };
        Ok(Linear { weight, bias })
    }

    /// `x [n, in] -> [n, out]`.
    pub(crate) fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let y = x.matmul(&self.weight.t()?)?;
        Ok(match &self.bias {
            Some(b) => y.broadcast_add(b)?,
            None => y,
        })
    }
}

struct Layer {
    input_norm: Tensor,
    q: Linear,
    k: Linear,
    v: Linear,
    o: Linear,
    post_norm: Tensor,
    gate: Linear,
    up: Linear,
    down: Linear,
}

/// The model's weights on the CPU.
pub struct CpuModel {
    pub(crate) config: ModelConfig,
    embed: Tensor,
    layers: Vec<Layer>,
    norm: Tensor,
    lm_head: Tensor,
    inv_freq: Vec<f32>,
}

impl CpuModel {
    /// Loads every tensor the config calls for; a missing one is an error naming it.
    pub fn load(config: &ModelConfig, w: &Weights) -> Result<Self> {
        let c = config;
        let (h, hd) = (c.hidden_size, c.head_dim);
        let cpu = &Device::Cpu;
        let embed = w.load(
            "model.embed_tokens.weight",
            &[c.vocab_size, h],
            DType::F32,
            cpu,
        )?;
        let mut layers = Vec::with_capacity(c.num_layers);
        for i in 0..c.num_layers {
            let p = format!("model.layers.{i}");
            layers.push(Layer {
                input_norm: w.load(
                    &format!("{p}.input_layernorm.weight"),
                    &[h],
                    DType::F32,
                    cpu,
                )?,
                q: Linear::load(
                    w,
                    &format!("{p}.self_attn.q_proj"),
                    c.num_heads * hd,
                    h,
                    c.qkv_bias,
                )?,
                k: Linear::load(
                    w,
                    &format!("{p}.self_attn.k_proj"),
                    c.num_kv_heads * hd,
                    h,
                    c.qkv_bias,
                )?,
                v: Linear::load(
                    w,
                    &format!("{p}.self_attn.v_proj"),
                    c.num_kv_heads * hd,
                    h,
                    c.qkv_bias,
                )?,
                o: Linear::load(
                    w,
                    &format!("{p}.self_attn.o_proj"),
                    h,
                    c.num_heads * hd,
                    c.o_bias,
                )?,
                post_norm: w.load(
                    &format!("{p}.post_attention_layernorm.weight"),
                    &[h],
                    DType::F32,
                    cpu,
                )?,
                gate: Linear::load(
                    w,
                    &format!("{p}.mlp.gate_proj"),
                    c.intermediate_size,
                    h,
                    false,
                )?,
                up: Linear::load(
                    w,
                    &format!("{p}.mlp.up_proj"),
                    c.intermediate_size,
                    h,
                    false,
                )?,
                down: Linear::load(
                    w,
                    &format!("{p}.mlp.down_proj"),
                    h,
                    c.intermediate_size,
                    false,
                )?,
            });
        }
        let norm = w.load("model.norm.weight", &[h], DType::F32, cpu)?;
        let lm_head = if c.tie_word_embeddings && !w.contains("lm_head.weight") {
            embed.clone()
        } else {
            w.load("lm_head.weight", &[c.vocab_size, h], DType::F32, cpu)?
        };
        Ok(CpuModel {
            config: config.clone(),
            embed,
            layers,
            norm,
            lm_head,
            inv_freq: rope::inv_freq(config),
        })
    }
}

pub(crate) fn rms_norm(x: &Tensor, weight: &Tensor, eps: f64) -> Result<Tensor> {
    let inv_rms = (x.sqr()?.mean_keepdim(D::Minus1)? + eps)?.sqrt()?.recip()?;
    Ok(x.broadcast_mul(&inv_rms)?.broadcast_mul(weight)?)
}

/// Rotates `x [n, heads, head_dim]` by the angles in `cos`/`sin` `[n, 1, head_dim/2]`.
pub(crate) fn apply_rope(x: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
    let half = x.dim(D::Minus1)? / 2;
    let x1 = x.narrow(D::Minus1, 0, half)?;
    let x2 = x.narrow(D::Minus1, half, half)?;
    let a = (x1.broadcast_mul(cos)? - x2.broadcast_mul(sin)?)?;
    let b = (x2.broadcast_mul(cos)? + x1.broadcast_mul(sin)?)?;
    Ok(Tensor::cat(&[a, b], D::Minus1)?)
}

fn softmax_last_dim(x: &Tensor) -> Result<Tensor> {
    let max = x.max_keepdim(D::Minus1)?;
    let e = x.broadcast_sub(&max)?.exp()?;
    Ok(e.broadcast_div(&e.sum_keepdim(D::Minus1)?)?)
}

/// The CPU model together with its KV cache.
pub struct CpuBackend {
    model: CpuModel,
    cache: CpuKvCache,
}

impl CpuBackend {
    /// A backend with a zeroed cache of `num_blocks` blocks of `block_size` tokens.
    pub fn new(model: CpuModel, num_blocks: usize, block_size: usize) -> Result<Self> {
        let c = &model.config;
        let cache = CpuKvCache::new(KvLayout {
            num_layers: c.num_layers,
            num_blocks,
            block_size,
            num_kv_heads: c.num_kv_heads,
            head_dim: c.head_dim,
            dtype: KvDtype::F32,
        })?;
        Ok(CpuBackend { model, cache })
    }

    /// Attention of one chunk's queries `q [n, heads, hd]` over its whole sequence so far.
    fn attend(&self, layer: usize, q: &Tensor, chunk: &SeqChunk<'_>) -> Result<Tensor> {
        let c = &self.model.config;
        attend(
            &self.cache,
            layer,
            q,
            chunk,
            c.num_heads,
            c.head_dim,
            c.sliding_window,
        )
    }
}

/// Attention of one chunk's queries `q [n, num_heads, hd]` over its whole
/// sequence so far, whose K/V (all of `cache`'s heads) are in `cache`; the
/// query heads are grouped evenly over the cache's KV heads. Returns `[n, num_heads * hd]`.
pub(crate) fn attend(
    cache: &CpuKvCache,
    layer: usize,
    q: &Tensor,
    chunk: &SeqChunk<'_>,
    num_heads: usize,
    hd: usize,
    sliding_window: Option<usize>,
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
    let probs = softmax_last_dim(&scores)?.reshape((kvh, group * n, total))?;
    let out = probs.matmul(&v)?.reshape((num_heads, n, hd))?;
    Ok(out.transpose(0, 1)?.reshape((n, num_heads * hd))?)
}

impl KvExport for CpuKvCache {
    fn export_layer(&self, layer: usize, blocks: &[BlockId]) -> Result<Vec<u8>> {
        CpuKvCache::export_layer(self, layer, blocks)
    }

    fn export_heads(
        &self,
        layer: usize,
        blocks: &[BlockId],
        heads: Range<usize>,
    ) -> Result<Vec<u8>> {
        CpuKvCache::export_heads(self, layer, blocks, heads)
    }
}

impl Backend for CpuBackend {
    fn config(&self) -> &ModelConfig {
        &self.model.config
    }

    fn kv_layout(&self) -> KvLayout {
        *self.cache.layout()
    }

    fn forward(
        &mut self,
        chunks: &[SeqChunk<'_>],
        mut on_layer: Option<LayerHook<'_>>,
    ) -> Result<Vec<Vec<f32>>> {
        validate_chunks(&self.model.config, self.cache.layout(), chunks)?;
        if chunks.is_empty() {
            return Ok(Vec::new());
        }
        let c = self.model.config.clone();
        let (hd, cpu) = (c.head_dim, &Device::Cpu);
        let ids: Vec<u32> = chunks
            .iter()
            .flat_map(|ch| ch.tokens.iter().copied())
            .collect();
        let positions: Vec<usize> = chunks
            .iter()
            .flat_map(|ch| ch.start..ch.start + ch.tokens.len())
            .collect();
        let n = ids.len();
        let (cos, sin) = rope::cos_sin(&self.model.inv_freq, &positions);
        let cos = Tensor::from_vec(cos, (n, 1, hd / 2), cpu)?;
        let sin = Tensor::from_vec(sin, (n, 1, hd / 2), cpu)?;
        let mut x = self
            .model
            .embed
            .index_select(&Tensor::new(ids.as_slice(), cpu)?, 0)?;

        for li in 0..c.num_layers {
            let layer = &self.model.layers[li];
            let h = rms_norm(&x, &layer.input_norm, c.rms_norm_eps)?;
            let q = layer.q.forward(&h)?.reshape((n, c.num_heads, hd))?;
            let k = layer.k.forward(&h)?.reshape((n, c.num_kv_heads, hd))?;
            let v = layer.v.forward(&h)?.reshape((n, c.num_kv_heads, hd))?;
            let q = apply_rope(&q, &cos, &sin)?;
            let k = apply_rope(&k, &cos, &sin)?
                .flatten_all()?
                .to_vec1::<f32>()?;
            let v = v.flatten_all()?.to_vec1::<f32>()?;
            let row = c.num_kv_heads * hd;
            let mut offset = 0;
            for ch in chunks {
                for i in 0..ch.tokens.len() {
                    let r = (offset + i) * row..(offset + i + 1) * row;
                    self.cache.write_token(
                        li,
                        ch.block_table,
                        ch.start + i,
                        &k[r.clone()],
                        &v[r],
                    )?;
                }
                offset += ch.tokens.len();
            }
            if let Some(hook) = on_layer.as_mut() {
                hook(li, &self.cache)?;
            }
            let mut outs = Vec::with_capacity(chunks.len());
            let mut offset = 0;
            for ch in chunks {
                let q_chunk = q.narrow(0, offset, ch.tokens.len())?;
                outs.push(self.attend(li, &q_chunk, ch)?);
                offset += ch.tokens.len();
            }
            let attn = Tensor::cat(&outs, 0)?;
            let layer = &self.model.layers[li];
            x = (x + layer.o.forward(&attn)?)?;
            let h = rms_norm(&x, &layer.post_norm, c.rms_norm_eps)?;
            let mlp = layer
                .down
                .forward(&(layer.gate.forward(&h)?.silu()? * layer.up.forward(&h)?)?)?;
            x = (x + mlp)?;
        }

        let mut last_rows = Vec::with_capacity(chunks.len());
        let mut end = 0;
        for ch in chunks {
            end += ch.tokens.len();
            last_rows.push((end - 1) as u32);
        }
        let last = x.index_select(&Tensor::new(last_rows.as_slice(), cpu)?, 0)?;
        let h = rms_norm(&last, &self.model.norm, c.rms_norm_eps)?;
        let logits = h.matmul(&self.model.lm_head.t()?)?;
        Ok(logits.to_vec2::<f32>()?)
    }

    fn export_layer(&self, layer: usize, blocks: &[BlockId]) -> Result<Vec<u8>> {
        self.cache.export_layer(layer, blocks)
    }

    fn import_layer(&mut self, layer: usize, blocks: &[BlockId], bytes: &[u8]) -> Result<()> {
        self.cache.import_layer(layer, blocks, bytes)
    }

    fn export_heads(
        &self,
        layer: usize,
        blocks: &[BlockId],
        heads: Range<usize>,
    ) -> Result<Vec<u8>> {
        self.cache.export_heads(layer, blocks, heads)
    }

    fn import_heads(
        &mut self,
        layer: usize,
        blocks: &[BlockId],
        heads: Range<usize>,
        bytes: &[u8],
    ) -> Result<()> {
        self.cache.import_heads(layer, blocks, 0, heads, bytes)
    }
}
