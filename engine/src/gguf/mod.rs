//! GGUF model files (llama.cpp, Ollama, LM Studio): one file holding the
//! config, the tokenizer, the chat template and the (usually quantized) weights.
//!
//! The file is memory-mapped and its header read with candle's
//! `quantized::gguf_file`; every tensor's byte range is checked against the
//! file's length when it is opened, so a truncated file fails at once with the
//! tensor it cuts. Weights are dequantized at load into the backend's dtype
//! (the engine runs no quantized kernels), under the same Hugging Face tensor
//! names the safetensors loader uses ([`tensors`]), so every backend loads
//! either format through [`crate::weights::Weights`]. The tokenizer is rebuilt
//! from the vocabulary and merges in the metadata ([`tokenizer`]).

pub mod tensors;
pub mod tokenizer;

use std::io::Cursor;
use std::path::{Path, PathBuf};

use candle_core::quantized::gguf_file::{Content, Value};
use memmap2::Mmap;

use crate::config::{Architecture, ModelConfig};
use crate::error::{EngineError, Result};
use crate::llama::ModelParam;

/// An opened GGUF file: its mapping and parsed header.
pub struct GgufFile {
    path: PathBuf,
    map: Mmap,
    content: Content,
    /// `general.architecture`, which prefixes the model's metadata keys.
    arch: String,
    /// See [`GgufFile::keep_rotary_interleave`].
    keep_rotary_interleave: bool,
}

/// Whether `path` is a GGUF file rather than a model directory.
pub fn is_gguf(path: &Path) -> bool {
    path.is_file()
}

impl GgufFile {
    /// Maps `path`, reads its header and checks that every tensor lies inside the file.
    pub fn open(path: &Path) -> Result<Self> {
        let handle = std::fs::File::open(path).map_err(|source| EngineError::Io {
            path: path.to_owned(),
            source,
        })?;
        // SAFETY: mapped read-only; Tandem never writes model files while serving them,
        // and every tensor's range is checked against the file's length below.
        let map = unsafe { Mmap::map(&handle) }.map_err(|source| EngineError::Io {
            path: path.to_owned(),
            source,
        })?;
        let bad = |message: String| EngineError::Gguf {
            path: path.to_owned(),
            message,
        };
        let content = Content::read(&mut Cursor::new(&map[..])).map_err(|e| {
            let e = e.to_string();
            // candle's words for a ggml type id it has no dequantizer for.
            match e.strip_prefix("unknown dtype for tensor ") {
                Some(id) => bad(format!(
                    "a tensor uses ggml type {id}, which this loader cannot read (it reads F32, F16, BF16, Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q8_1 and Q2_K to Q8_K)"
                )),
                None => bad(format!("not a readable GGUF file: {e}")),
            }
        })?;
        let file_len = map.len() as u64;
        for (name, info) in &content.tensor_infos {
            let elems = info.shape.elem_count();
            let block = info.ggml_dtype.block_size();
            if !elems.is_multiple_of(block) {
                return Err(bad(format!(
                    "tensor {name:?} has {elems} elements, not a multiple of its {:?} block of {block}",
                    info.ggml_dtype
                )));
            }
            let bytes = (elems / block * info.ggml_dtype.type_size()) as u64;
            let start = content.tensor_data_offset.saturating_add(info.offset);
            let end = start.saturating_add(bytes);
            if end > file_len {
                return Err(bad(format!(
                    "truncated: tensor {name:?} needs bytes {start}..{end} but the file has {file_len}"
                )));
            }
        }
        let arch = match content.metadata.get("general.architecture") {
            Some(Value::String(s)) => s.clone(),
            _ => {
                return Err(bad(
                    "no `general.architecture` string in the metadata".into()
                ));
            }
        };
        Ok(GgufFile {
            path: path.to_owned(),
            map,
            content,
            arch,
            keep_rotary_interleave: false,
        })
    }

    /// Where the file is.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// An error about this file.
    pub(crate) fn error(&self, message: impl Into<String>) -> EngineError {
        EngineError::Gguf {
            path: self.path.clone(),
            message: message.into(),
        }
    }

    /// A metadata value, if present.
    pub fn meta(&self, key: &str) -> Option<&Value> {
        self.content.metadata.get(key)
    }

    /// A metadata value of the model's architecture (`<arch>.<key>`).
    pub(crate) fn arch_meta(&self, key: &str) -> Option<&Value> {
        self.meta(&format!("{}.{key}", self.arch))
    }

    /// An optional non-negative integer.
    pub(crate) fn get_usize(&self, key: &str) -> Result<Option<usize>> {
        self.meta(key).map(|v| as_usize(v, key, self)).transpose()
    }

    /// A required architecture integer (`<arch>.<key>`).
    pub(crate) fn arch_usize(&self, key: &str) -> Result<usize> {
        let full = format!("{}.{key}", self.arch);
        match self.arch_meta(key) {
            Some(v) => as_usize(v, &full, self),
            None => Err(self.error(format!("missing metadata key `{full}`"))),
        }
    }

    fn arch_f64(&self, key: &str) -> Result<Option<f64>> {
        let full = format!("{}.{key}", self.arch);
        self.arch_meta(key)
            .map(|v| match v {
                Value::F32(x) => Ok(f64::from(*x)),
                Value::F64(x) => Ok(*x),
                other => Err(self.error(format!("`{full}` is {other:?}, expected a float"))),
            })
            .transpose()
    }

    /// An optional string.
    pub(crate) fn get_str(&self, key: &str) -> Result<Option<&str>> {
        match self.meta(key) {
            None => Ok(None),
            Some(Value::String(s)) => Ok(Some(s)),
            Some(other) => Err(self.error(format!(
                "`{key}` is a {:?}, expected a string",
                other.value_type()
            ))),
        }
    }

    /// An optional boolean.
    pub(crate) fn get_bool(&self, key: &str) -> Result<Option<bool>> {
        match self.meta(key) {
            None => Ok(None),
            Some(Value::Bool(b)) => Ok(Some(*b)),
            Some(other) => Err(self.error(format!(
                "`{key}` is a {:?}, expected a boolean",
                other.value_type()
            ))),
        }
    }

    /// An optional array.
    pub(crate) fn get_array(&self, key: &str) -> Result<Option<&[Value]>> {
        match self.meta(key) {
            None => Ok(None),
            Some(Value::Array(a)) => Ok(Some(a)),
            Some(other) => Err(self.error(format!(
                "`{key}` is a {:?}, expected an array",
                other.value_type()
            ))),
        }
    }

    /// The model's name: `general.name`, else the file's stem.
    pub fn name(&self) -> String {
        match self.meta("general.name") {
            Some(Value::String(s)) if !s.trim().is_empty() => s.trim().to_string(),
            _ => self
                .path
                .file_stem()
                .map(|s| s.to_string_lossy().into_owned())
                .unwrap_or_else(|| "model".into()),
        }
    }

    /// Whether the file holds a tensor of this GGUF name.
    pub(crate) fn has_tensor(&self, gguf_name: &str) -> bool {
        self.content.tensor_infos.contains_key(gguf_name)
    }

    /// Which [`Architecture`] `general.architecture` names.
    pub fn architecture(&self) -> Result<Architecture> {
        match self.arch.as_str() {
            "llama" => Ok(Architecture::Llama),
            "mistral" => Ok(Architecture::Mistral),
            "qwen2" => Ok(Architecture::Qwen2),
            other => Err(self.error(format!(
                "architecture {other:?} is not supported (Tandem reads llama, mistral and qwen2 GGUF files)"
            ))),
        }
    }

    /// The model's shape from the `<arch>.*` metadata keys and the tokenizer's ids.
    pub fn config(&self) -> Result<ModelConfig> {
        let architecture = self.architecture()?;
        let hidden_size = self.arch_usize("embedding_length")?;
        let num_heads = self.arch_usize("attention.head_count")?;
        let num_kv_heads = match self.arch_meta("attention.head_count_kv") {
            Some(_) => self.arch_usize("attention.head_count_kv")?,
            None => num_heads,
        };
        if num_heads == 0 || num_kv_heads == 0 || !num_heads.is_multiple_of(num_kv_heads) {
            return Err(self.error(format!(
                "{num_heads} attention heads cannot be grouped over {num_kv_heads} KV heads"
            )));
        }
        let head_dim = match self.arch_meta("attention.key_length") {
            Some(_) => self.arch_usize("attention.key_length")?,
            None if hidden_size.is_multiple_of(num_heads) => hidden_size / num_heads,
            None => {
                return Err(self.error(format!(
                    "embedding_length {hidden_size} is not a multiple of head_count {num_heads}"
                )));
            }
        };
        if head_dim == 0 || !head_dim.is_multiple_of(2) {
            return Err(self.error(format!("head dimension {head_dim} must be even")));
        }
        if let Some(rope_dims) = self.arch_meta("rope.dimension_count") {
            let rope_dims = as_usize(rope_dims, "rope.dimension_count", self)?;
            if rope_dims != head_dim {
                return Err(self.error(format!(
                    "rope.dimension_count {rope_dims} differs from the head dimension {head_dim}: partial rotary embeddings are not supported"
                )));
            }
        }
        if self.has_tensor("rope_freqs.weight") {
            return Err(self.error(
                "the file scales rotary frequencies with a `rope_freqs` tensor (Llama 3.1 style), which is not supported yet",
            ));
        }
        let tokens = self.get_array("tokenizer.ggml.tokens")?.map(<[_]>::len);
        let vocab_size = match self.arch_meta("vocab_size") {
            Some(_) => self.arch_usize("vocab_size")?,
            None => tokens.ok_or_else(|| {
                self.error("neither `<arch>.vocab_size` nor `tokenizer.ggml.tokens` is present")
            })?,
        };
        let token_id = |key: &str| -> Result<Option<u32>> {
            self.get_usize(key)?
                .map(|id| {
                    u32::try_from(id)
                        .ok()
                        .filter(|&id| (id as usize) < vocab_size)
                        .ok_or_else(|| {
                            self.error(format!("`{key}` = {id} is outside the vocabulary"))
                        })
                })
                .transpose()
        };
        let mut eos_token_ids: Vec<u32> = Vec::new();
        for key in [
            "tokenizer.ggml.eos_token_id",
            "tokenizer.ggml.eot_token_id",
            "tokenizer.ggml.eom_token_id",
        ] {
            if let Some(id) = token_id(key)?
                && !eos_token_ids.contains(&id)
            {
                eos_token_ids.push(id);
            }
        }
        for id in tokenizer::end_of_turn_tokens(self)? {
            if !eos_token_ids.contains(&id) {
                eos_token_ids.push(id);
            }
        }
        let attention_bias = architecture == Architecture::Qwen2;
        Ok(ModelConfig {
            architecture,
            vocab_size,
            hidden_size,
            intermediate_size: self.arch_usize("feed_forward_length")?,
            num_layers: self.arch_usize("block_count")?,
            num_heads,
            num_kv_heads,
            head_dim,
            rms_norm_eps: self
                .arch_f64("attention.layer_norm_rms_epsilon")?
                .unwrap_or(1e-5),
            rope_theta: self.arch_f64("rope.freq_base")?.unwrap_or(10_000.0),
            rope_scaling: None,
            max_position_embeddings: self.arch_usize("context_length")?,
            tie_word_embeddings: !self.has_tensor(ModelParam::LmHead.gguf_name()),
            qkv_bias: attention_bias,
            o_bias: false,
            sliding_window: match self.arch_meta("attention.sliding_window") {
                Some(_) if architecture == Architecture::Mistral => {
                    Some(self.arch_usize("attention.sliding_window")?)
                }
                _ => None,
            },
            bos_token_id: token_id("tokenizer.ggml.bos_token_id")?,
            eos_token_ids,
        })
    }
}

fn as_usize(v: &Value, key: &str, file: &GgufFile) -> Result<usize> {
    let n: Option<u64> = match v {
        Value::U8(x) => Some(u64::from(*x)),
        Value::U16(x) => Some(u64::from(*x)),
        Value::U32(x) => Some(u64::from(*x)),
        Value::U64(x) => Some(*x),
        Value::I8(x) => u64::try_from(*x).ok(),
        Value::I16(x) => u64::try_from(*x).ok(),
        Value::I32(x) => u64::try_from(*x).ok(),
        Value::I64(x) => u64::try_from(*x).ok(),
        _ => None,
    };
    n.and_then(|n| usize::try_from(n).ok())
        .ok_or_else(|| file.error(format!("`{key}` is {v:?}, expected a non-negative integer")))
}
