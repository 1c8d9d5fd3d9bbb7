//! The model's shape, read from a Hugging Face `config.json`.
//!
//! HF configs differ between architectures (Qwen2 always has q/k/v biases,
//! Mistral may have a sliding window, Llama 3 scales its rotary frequencies);
//! [`ModelConfig`] is the one normalized shape the rest of the engine reads.

use std::path::Path;

use serde::Deserialize;

use crate::error::{EngineError, Result};

/// The architectures the engine implements; all are decoder-only Llama-family models.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Architecture {
    /// Llama 2 / 3 / 3.x, SmolLM, TinyLlama.
    Llama,
    /// Mistral (optionally with a sliding attention window).
    Mistral,
    /// Qwen2 / Qwen2.5: biases on the q, k and v projections.
    Qwen2,
}

impl Architecture {
    /// The HF class name of this architecture.
    pub fn hf_name(self) -> &'static str {
        match self {
            Architecture::Llama => "LlamaForCausalLM",
            Architecture::Mistral => "MistralForCausalLM",
            Architecture::Qwen2 => "Qwen2ForCausalLM",
        }
    }

    fn from_hf(name: &str) -> Result<Self> {
        match name {
            "LlamaForCausalLM" => Ok(Architecture::Llama),
            "MistralForCausalLM" => Ok(Architecture::Mistral),
            "Qwen2ForCausalLM" => Ok(Architecture::Qwen2),
            other => Err(EngineError::UnsupportedArchitecture(other.to_string())),
        }
    }
}

/// Llama-3-style rotary frequency scaling (`rope_scaling.rope_type = "llama3"`).
#[derive(Debug, Clone, PartialEq)]
pub struct Llama3RopeScaling {
    /// Overall factor by which low frequencies are stretched.
    pub factor: f64,
    /// Wavelengths above `original_max_position_embeddings / low_freq_factor` are scaled fully.
    pub low_freq_factor: f64,
    /// Wavelengths below `original_max_position_embeddings / high_freq_factor` are kept.
    pub high_freq_factor: f64,
    /// The context length the model was pre-trained with.
    pub original_max_position_embeddings: usize,
}

/// The normalized model shape.
#[derive(Debug, Clone, PartialEq)]
pub struct ModelConfig {
    /// Which architecture.
    pub architecture: Architecture,
    /// Rows of the embedding and of the LM head.
    pub vocab_size: usize,
    /// Width of the residual stream.
    pub hidden_size: usize,
    /// Width of the MLP's hidden layer.
    pub intermediate_size: usize,
    /// Number of decoder layers.
    pub num_layers: usize,
    /// Query heads.
    pub num_heads: usize,
    /// Key/value heads (fewer than query heads under GQA).
    pub num_kv_heads: usize,
    /// Width of one head.
    pub head_dim: usize,
    /// Epsilon of every RMSNorm.
    pub rms_norm_eps: f64,
    /// Base of the rotary frequencies.
    pub rope_theta: f64,
    /// Llama-3 frequency scaling, if any.
    pub rope_scaling: Option<Llama3RopeScaling>,
    /// Longest sequence (prompt + output) the model takes.
    pub max_position_embeddings: usize,
    /// Whether the LM head reuses the embedding matrix.
    pub tie_word_embeddings: bool,
    /// Biases on the q, k and v projections.
    pub qkv_bias: bool,
    /// Bias on the attention output projection.
    pub o_bias: bool,
    /// Sliding attention window (Mistral), in tokens.
    pub sliding_window: Option<usize>,
    /// Beginning-of-sequence token.
    pub bos_token_id: Option<u32>,
    /// End-of-sequence tokens (several in Llama 3 instruct models).
    pub eos_token_ids: Vec<u32>,
}

/// `config.json` as HF writes it; every field optional so that a missing one
/// gets an error naming it.
#[derive(Debug, Deserialize)]
struct HfConfig {
    architectures: Option<Vec<String>>,
    model_type: Option<String>,
    vocab_size: Option<usize>,
    hidden_size: Option<usize>,
    intermediate_size: Option<usize>,
    num_hidden_layers: Option<usize>,
    num_attention_heads: Option<usize>,
    num_key_value_heads: Option<usize>,
    head_dim: Option<usize>,
    rms_norm_eps: Option<f64>,
    rope_theta: Option<f64>,
    rope_scaling: Option<serde_json::Value>,
    /// transformers 5 writes `rope_theta` and the scaling here instead.
    rope_parameters: Option<serde_json::Value>,
    max_position_embeddings: Option<usize>,
    tie_word_embeddings: Option<bool>,
    attention_bias: Option<bool>,
    mlp_bias: Option<bool>,
    sliding_window: Option<usize>,
    use_sliding_window: Option<bool>,
    bos_token_id: Option<u32>,
    eos_token_id: Option<serde_json::Value>,
}

impl ModelConfig {
    /// Reads and validates `config.json`.
    pub fn from_file(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|source| EngineError::Io {
            path: path.to_owned(),
            source,
        })?;
        Self::from_json(&text).map_err(|e| match e {
            EngineError::Config { message, .. } => EngineError::Config {
                path: path.to_owned(),
                message,
            },
            other => other,
        })
    }

    /// Parses and validates the text of a `config.json`.
    pub fn from_json(text: &str) -> Result<Self> {
        let bad = |message: String| EngineError::Config {
            path: "config.json".into(),
            message,
        };
        let hf: HfConfig = serde_json::from_str(text).map_err(|e| bad(e.to_string()))?;
        let arch_name = match (&hf.architectures, &hf.model_type) {
            (Some(a), _) if !a.is_empty() => a[0].clone(),
            (_, Some(t)) => match t.as_str() {
                "llama" => "LlamaForCausalLM".into(),
                "mistral" => "MistralForCausalLM".into(),
                "qwen2" => "Qwen2ForCausalLM".into(),
                other => other.to_string(),
            },
            _ => return Err(bad("missing field `architectures`".into())),
        };
        let architecture = Architecture::from_hf(&arch_name)?;
        let need = |v: Option<usize>, key: &str| -> Result<usize> {
            match v {
                Some(0) => Err(bad(format!("field `{key}` must be positive"))),
                Some(v) => Ok(v),
                None => Err(bad(format!("missing field `{key}`"))),
            }
        };
        let hidden_size = need(hf.hidden_size, "hidden_size")?;
        let num_heads = need(hf.num_attention_heads, "num_attention_heads")?;
        let num_kv_heads = need(
            hf.num_key_value_heads.or(hf.num_attention_heads),
            "num_key_value_heads",
        )?;
        if !num_heads.is_multiple_of(num_kv_heads) {
            return Err(bad(format!(
                "num_attention_heads ({num_heads}) is not a multiple of num_key_value_heads ({num_kv_heads})"
            )));
        }
        let head_dim = match hf.head_dim {
            Some(d) => need(Some(d), "head_dim")?,
            None if hidden_size.is_multiple_of(num_heads) => hidden_size / num_heads,
            None => {
                return Err(bad(format!(
                    "hidden_size ({hidden_size}) is not a multiple of num_attention_heads ({num_heads})"
                )));
            }
        };
        if !head_dim.is_multiple_of(2) {
            return Err(bad(format!(
                "head_dim ({head_dim}) must be even for rotary embeddings"
            )));
        }
        if hf.mlp_bias == Some(true) {
            return Err(bad("mlp_bias = true is not supported".into()));
        }
        let params = hf.rope_parameters.as_ref().filter(|v| v.is_object());
        let scaling = match &hf.rope_scaling {
            None | Some(serde_json::Value::Null) => params.filter(|p| {
                p.get("rope_type")
                    .and_then(|t| t.as_str())
                    .is_some_and(|t| t != "default")
            }),
            Some(v) => Some(v),
        };
        let rope_scaling = match scaling {
            None => None,
            Some(v) => Some(parse_rope_scaling(v).map_err(bad)?),
        };
        let rope_theta = hf.rope_theta.or_else(|| {
            params
                .and_then(|p| p.get("rope_theta"))
                .and_then(|t| t.as_f64())
        });
        let eos_token_ids = match &hf.eos_token_id {
            None | Some(serde_json::Value::Null) => Vec::new(),
            Some(serde_json::Value::Number(n)) => vec![as_token_id(n).map_err(bad)?],
            Some(serde_json::Value::Array(a)) => a
                .iter()
                .map(|v| match v {
                    serde_json::Value::Number(n) => as_token_id(n),
                    _ => Err("eos_token_id entries must be integers".to_string()),
                })
                .collect::<std::result::Result<_, _>>()
                .map_err(bad)?,
            Some(_) => return Err(bad("eos_token_id must be an integer or a list".into())),
        };
        let sliding_window = match architecture {
            Architecture::Mistral => hf.sliding_window,
            Architecture::Qwen2 if hf.use_sliding_window == Some(true) => hf.sliding_window,
            _ => None,
        };
        let attention_bias = hf.attention_bias.unwrap_or(false);
        let config = ModelConfig {
            architecture,
            vocab_size: need(hf.vocab_size, "vocab_size")?,
            hidden_size,
            intermediate_size: need(hf.intermediate_size, "intermediate_size")?,
            num_layers: need(hf.num_hidden_layers, "num_hidden_layers")?,
            num_heads,
            num_kv_heads,
            head_dim,
            rms_norm_eps: hf.rms_norm_eps.unwrap_or(1e-6),
            rope_theta: rope_theta.unwrap_or(10_000.0),
            rope_scaling,
            max_position_embeddings: need(hf.max_position_embeddings, "max_position_embeddings")?,
            tie_word_embeddings: hf.tie_word_embeddings.unwrap_or(false),
            qkv_bias: architecture == Architecture::Qwen2 || attention_bias,
            o_bias: architecture != Architecture::Qwen2 && attention_bias,
            sliding_window,
            bos_token_id: hf.bos_token_id,
            eos_token_ids,
        };
        Ok(config)
    }

    /// Bytes of K and V one token occupies in one layer, at `bytes_per_element`.
    pub fn kv_bytes_per_token_per_layer(&self, bytes_per_element: usize) -> usize {
        2 * self.num_kv_heads * self.head_dim * bytes_per_element
    }
}

fn as_token_id(n: &serde_json::Number) -> std::result::Result<u32, String> {
    n.as_u64()
        .and_then(|v| u32::try_from(v).ok())
        .ok_or_else(|| format!("token id {n} is not a valid id"))
}

fn parse_rope_scaling(v: &serde_json::Value) -> std::result::Result<Llama3RopeScaling, String> {
    let kind = v
        .get("rope_type")
        .or_else(|| v.get("type"))
        .and_then(|t| t.as_str())
        .unwrap_or("");
    if kind != "llama3" {
        return Err(format!(
            "rope_scaling type {kind:?} is not supported (only \"llama3\")"
        ));
    }
    let num = |key: &str| {
        v.get(key)
            .and_then(|x| x.as_f64())
            .ok_or_else(|| format!("rope_scaling.{key} is missing"))
    };
    Ok(Llama3RopeScaling {
        factor: num("factor")?,
        low_freq_factor: num("low_freq_factor")?,
        high_freq_factor: num("high_freq_factor")?,
        original_max_position_embeddings: num("original_max_position_embeddings")? as usize,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const LLAMA3: &str = r#"{
        "architectures": ["LlamaForCausalLM"], "vocab_size": 128256, "hidden_size": 4096,
        "intermediate_size": 14336, "num_hidden_layers": 32, "num_attention_heads": 32,
        "num_key_value_heads": 8, "rms_norm_eps": 1e-5, "rope_theta": 500000.0,
        "max_position_embeddings": 131072, "bos_token_id": 128000,
        "eos_token_id": [128001, 128008, 128009],
        "rope_scaling": {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                         "original_max_position_embeddings": 8192, "rope_type": "llama3"}
    }"#;

    #[test]
    fn parses_llama3() {
        let c = ModelConfig::from_json(LLAMA3).unwrap();
        assert_eq!(c.architecture, Architecture::Llama);
        assert_eq!(c.head_dim, 128);
        assert_eq!(c.eos_token_ids, vec![128001, 128008, 128009]);
        assert_eq!(c.rope_scaling.as_ref().unwrap().factor, 8.0);
        assert!(!c.qkv_bias);
        assert_eq!(c.kv_bytes_per_token_per_layer(2), 4096);
    }

    #[test]
    fn qwen2_has_qkv_bias() {
        let text = LLAMA3
            .replace("LlamaForCausalLM", "Qwen2ForCausalLM")
            .replace(
                r#""rope_scaling": {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                         "original_max_position_embeddings": 8192, "rope_type": "llama3"}"#,
                r#""rope_scaling": null"#,
            );
        let c = ModelConfig::from_json(&text).unwrap();
        assert!(c.qkv_bias && !c.o_bias);
    }

    #[test]
    fn reads_transformers5_rope_parameters() {
        let text = LLAMA3
            .replace(r#""rope_theta": 500000.0,"#, "")
            .replace(r#""rope_scaling""#, r#""rope_parameters""#)
            .replace(
                r#""rope_type": "llama3""#,
                r#""rope_type": "llama3", "rope_theta": 500000.0"#,
            );
        let c = ModelConfig::from_json(&text).unwrap();
        assert_eq!(c.rope_theta, 500000.0);
        assert_eq!(c.rope_scaling.as_ref().unwrap().factor, 8.0);
        let plain = LLAMA3.replace(
            r#""rope_scaling": {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                         "original_max_position_embeddings": 8192, "rope_type": "llama3"}"#,
            r#""rope_parameters": {"rope_type": "default", "rope_theta": 10000.0}"#,
        );
        assert!(
            ModelConfig::from_json(&plain)
                .unwrap()
                .rope_scaling
                .is_none()
        );
    }

    #[test]
    fn missing_field_is_named() {
        let text = LLAMA3.replace(r#""intermediate_size": 14336,"#, "");
        let err = ModelConfig::from_json(&text).unwrap_err().to_string();
        assert!(err.contains("intermediate_size"), "{err}");
    }

    #[test]
    fn unknown_architecture_is_named() {
        let text = LLAMA3.replace("LlamaForCausalLM", "GPT2LMHeadModel");
        let err = ModelConfig::from_json(&text).unwrap_err().to_string();
        assert!(err.contains("GPT2LMHeadModel"), "{err}");
    }

    #[test]
    fn bad_head_split_is_an_error() {
        let text = LLAMA3.replace(r#""num_key_value_heads": 8"#, r#""num_key_value_heads": 5"#);
        assert!(ModelConfig::from_json(&text).is_err());
    }
}
