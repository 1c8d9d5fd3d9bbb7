//! The model's weights in GPU memory, in bf16: loaded from a model's files
//! through the Llama definition ([`crate::llama`]), or random of a named shape
//! (benchmarks of real shapes without carrying weights).
//!
//! Projections that read the same input are fused into one matrix so each is
//! one GEMM: q, k and v rows stacked (`[q; k; v]`), and gate and up rows
//! stacked (`[gate; up]`).

use cudarc::driver::CudaSlice;
use half::bf16;

use super::device::{Gpu, ptr};
use super::error::CudaError;
use crate::config::{Architecture, Llama3RopeScaling, ModelConfig};
use crate::error::{EngineError, Result};
use crate::llama::{Kind, LayerParam, LayerWeights, ModelParam, ShardSpec, WeightScope};
use crate::weights::Weights;
use candle_core::{DType, Device, Tensor};

/// One decoder layer's weights.
pub(crate) struct GpuLayer {
    pub input_norm: CudaSlice<bf16>,
    /// `[(hq + 2 hkv) hd, hidden]`.
    pub qkv: CudaSlice<bf16>,
    pub qkv_bias: Option<CudaSlice<bf16>>,
    /// `[hidden, hq hd]`.
    pub o: CudaSlice<bf16>,
    pub post_norm: CudaSlice<bf16>,
    /// `[2 inter, hidden]`.
    pub gate_up: CudaSlice<bf16>,
    /// `[hidden, inter]`.
    pub down: CudaSlice<bf16>,
}

/// Every weight of the model on the GPU.
pub struct GpuModel {
    pub(crate) config: ModelConfig,
    pub(crate) embed: CudaSlice<bf16>,
    pub(crate) layers: Vec<GpuLayer>,
    pub(crate) norm: CudaSlice<bf16>,
    /// `None`: tied to the embedding.
    pub(crate) lm_head: Option<CudaSlice<bf16>>,
}

/// Model shapes that can be initialised with random weights by name.
pub const NAMED_SHAPES: &[&str] = &["llama3-8b", "llama3-1b", "tiny"];

/// The config of a named model shape, optionally with fewer or more layers.
pub fn named_config(name: &str, layers: Option<usize>) -> Result<ModelConfig> {
    let llama3 = |hidden, inter, layers, heads, kv_heads, tie| ModelConfig {
        architecture: Architecture::Llama,
        vocab_size: 128256,
        hidden_size: hidden,
        intermediate_size: inter,
        num_layers: layers,
        num_heads: heads,
        num_kv_heads: kv_heads,
        head_dim: hidden / heads,
        rms_norm_eps: 1e-5,
        rope_theta: 500_000.0,
        rope_scaling: Some(Llama3RopeScaling {
            factor: 8.0,
            low_freq_factor: 1.0,
            high_freq_factor: 4.0,
            original_max_position_embeddings: 8192,
        }),
        max_position_embeddings: 131_072,
        tie_word_embeddings: tie,
        qkv_bias: false,
        o_bias: false,
        sliding_window: None,
        bos_token_id: Some(128_000),
        eos_token_ids: vec![128_001, 128_008, 128_009],
    };
    let mut c = match name {
        "llama3-8b" => llama3(4096, 14336, 32, 32, 8, false),
        "llama3-1b" => llama3(2048, 8192, 16, 32, 8, true),
        "tiny" => ModelConfig {
            vocab_size: 1024,
            ..llama3(512, 1408, 2, 8, 2, true)
        },
        other => {
            return Err(EngineError::InvalidInput(format!(
                "unknown model shape {other:?}; known: {}",
                NAMED_SHAPES.join(", ")
            )));
        }
    };
    if let Some(l) = layers {
        c.num_layers = l;
    }
    Ok(c)
}

fn check_supported(c: &ModelConfig) -> Result<()> {
    if c.o_bias {
        return Err(CudaError::Unsupported(
            "a bias on the attention output projection is not supported on CUDA".into(),
        )
        .into());
    }
    if c.num_heads / c.num_kv_heads > 8 {
        return Err(CudaError::Unsupported(format!(
            "{} query heads per KV head: the CUDA kernels take at most 8",
            c.num_heads / c.num_kv_heads
        ))
        .into());
    }
    Ok(())
}

/// Elements of a weight outside the layers.
fn numel_of(p: ModelParam, c: &ModelConfig) -> usize {
    p.shape(c).iter().product()
}

/// A tensor's elements as bf16 (loaded as bf16 from whatever the file holds).
fn host_bf16(t: &Tensor) -> Result<Vec<bf16>> {
    Ok(t.flatten_all()?.to_vec1::<bf16>()?)
}

/// Rows stacked: the fused projections' layout.
fn stacked(parts: &[&Tensor]) -> Result<Vec<bf16>> {
    let mut out = Vec::new();
    for t in parts {
        out.extend(host_bf16(t)?);
    }
    Ok(out)
}

impl GpuModel {
    /// Uploads a model's weights (converted to bf16), a layer at a time, as
    /// the Llama definition names them.
    pub fn load(gpu: &Gpu, config: &ModelConfig, w: &Weights) -> Result<Self> {
        check_supported(config)?;
        let c = config;
        let vb = WeightScope::new(w, DType::BF16, &Device::Cpu);
        let whole = ShardSpec::Whole;
        let up = |v: &[bf16]| gpu.upload(v).map_err(EngineError::from);
        let tensor = |t: &Tensor| up(&host_bf16(t)?);
        let embed = tensor(&ModelParam::Embed.load(&vb, c, whole)?)?;
        let mut layers = Vec::with_capacity(c.num_layers);
        for i in 0..c.num_layers {
            let l = LayerWeights::load(&vb, c, whole, i)?;
            let qkv_bias = match (&l.q.bias, &l.k.bias, &l.v.bias) {
                (Some(q), Some(k), Some(v)) => Some(up(&stacked(&[q, k, v])?)?),
                _ => None,
            };
            layers.push(GpuLayer {
                input_norm: tensor(&l.input_norm)?,
                qkv: up(&stacked(&[&l.q.weight, &l.k.weight, &l.v.weight])?)?,
                qkv_bias,
                o: tensor(&l.o.weight)?,
                post_norm: tensor(&l.post_norm)?,
                gate_up: up(&stacked(&[&l.gate.weight, &l.up.weight])?)?,
                down: tensor(&l.down.weight)?,
            });
        }
        let norm = tensor(&ModelParam::FinalNorm.load(&vb, c, whole)?)?;
        let lm_head = if ModelParam::has_lm_head(&vb, c) {
            Some(tensor(&ModelParam::LmHead.load(&vb, c, whole)?)?)
        } else {
            None
        };
        Ok(GpuModel {
            config: config.clone(),
            embed,
            layers,
            norm,
            lm_head,
        })
    }

    /// Random weights of `config`'s shape, made on the GPU (no host memory, no files):
    /// projections uniform in ±1/√fan_in, norms near 1, embeddings in ±1.
    pub fn random(gpu: &Gpu, config: &ModelConfig, seed: u64) -> Result<Self> {
        check_supported(config)?;
        use LayerParam as P;
        let c = config;
        let numel = |ps: &[LayerParam]| -> usize {
            ps.iter()
                .map(|p| p.shape(c).iter().product::<usize>())
                .sum()
        };
        // Projections uniform in ±1/√fan_in (fan_in: the `[out, in]` shape's `in`).
        let bound = |p: LayerParam| 1.0 / (p.shape(c)[1] as f32).sqrt();
        let mut n = 0u64;
        let mut rand = |len: usize, lo: f32, hi: f32| -> Result<CudaSlice<bf16>> {
            let buf = gpu.zeros::<bf16>(len)?;
            n += 1;
            gpu.fill_uniform(
                ptr(&buf, &gpu.compute),
                len,
                seed.wrapping_mul(1_000_003).wrapping_add(n),
                lo,
                hi,
            )?;
            Ok(buf)
        };
        let h = c.hidden_size;
        let embed = rand(numel_of(ModelParam::Embed, c), -1.0, 1.0)?;
        let mut layers = Vec::with_capacity(c.num_layers);
        for _ in 0..c.num_layers {
            let (s, o, down) = (bound(P::QProj), bound(P::OProj), bound(P::DownProj));
            layers.push(GpuLayer {
                input_norm: rand(numel(&[P::InputNorm]), 0.9, 1.1)?,
                qkv: rand(numel(&[P::QProj, P::KProj, P::VProj]), -s, s)?,
                qkv_bias: if c.qkv_bias {
                    Some(rand(numel(&[P::QBias, P::KBias, P::VBias]), -0.1, 0.1)?)
                } else {
                    None
                },
                o: rand(numel(&[P::OProj]), -o, o)?,
                post_norm: rand(numel(&[P::PostNorm]), 0.9, 1.1)?,
                gate_up: rand(numel(&[P::GateProj, P::UpProj]), -s, s)?,
                down: rand(numel(&[P::DownProj]), -down, down)?,
            });
        }
        let norm = rand(numel_of(ModelParam::FinalNorm, c), 0.9, 1.1)?;
        let lm_head = if c.tie_word_embeddings {
            None
        } else {
            let b = 1.0 / (h as f32).sqrt();
            Some(rand(numel_of(ModelParam::LmHead, c), -b, b)?)
        };
        gpu.sync()?;
        Ok(GpuModel {
            config: config.clone(),
            embed,
            layers,
            norm,
            lm_head,
        })
    }

    /// Parameters read by one decode step (every weight but the embedding table,
    /// of which only a row per token is read).
    pub fn streamed_params(&self) -> usize {
        let c = &self.config;
        let per_layer: usize = LayerParam::ALL
            .into_iter()
            .filter(|p| matches!(p.kind(), Kind::Norm | Kind::Projection))
            .map(|p| p.shape(c).iter().product::<usize>())
            .sum();
        c.num_layers * per_layer
            + numel_of(ModelParam::FinalNorm, c)
            + numel_of(ModelParam::LmHead, c)
    }

    /// The model's shape.
    pub fn config(&self) -> &ModelConfig {
        &self.config
    }
}
