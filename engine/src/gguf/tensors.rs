//! GGUF tensors under Hugging Face names, dequantized.
//!
//! llama.cpp's converter renames every tensor (`model.layers.3.mlp.up_proj.weight`
//! becomes `blk.3.ffn_up.weight`) and, for Llama-style models, interleaves the two
//! rotary halves of every head of the Q and K projections (its RoPE rotates
//! adjacent pairs; Hugging Face's, and this engine's, rotates the two halves).
//! [`GgufFile::load_f32`] undoes both, so a GGUF model is the same model the
//! safetensors loader would read.

use std::io::Cursor;

use candle_core::{Device, Tensor};

use super::GgufFile;
use crate::config::Architecture;
use crate::error::{EngineError, Result};

/// The GGUF name of a Hugging Face tensor name, if the format has one.
pub fn gguf_name(hf: &str) -> Option<String> {
    match hf {
        "model.embed_tokens.weight" => return Some("token_embd.weight".into()),
        "model.norm.weight" => return Some("output_norm.weight".into()),
        "lm_head.weight" => return Some("output.weight".into()),
        _ => {}
    }
    let rest = hf.strip_prefix("model.layers.")?;
    let (layer, name) = rest.split_once('.')?;
    layer.parse::<usize>().ok()?;
    let short = match name {
        "input_layernorm.weight" => "attn_norm.weight",
        "self_attn.q_proj.weight" => "attn_q.weight",
        "self_attn.q_proj.bias" => "attn_q.bias",
        "self_attn.k_proj.weight" => "attn_k.weight",
        "self_attn.k_proj.bias" => "attn_k.bias",
        "self_attn.v_proj.weight" => "attn_v.weight",
        "self_attn.v_proj.bias" => "attn_v.bias",
        "self_attn.o_proj.weight" => "attn_output.weight",
        "self_attn.o_proj.bias" => "attn_output.bias",
        "post_attention_layernorm.weight" => "ffn_norm.weight",
        "mlp.gate_proj.weight" => "ffn_gate.weight",
        "mlp.up_proj.weight" => "ffn_up.weight",
        "mlp.down_proj.weight" => "ffn_down.weight",
        _ => return None,
    };
    Some(format!("blk.{layer}.{short}"))
}

/// How a tensor's rows must be reordered on load.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Rotary {
    None,
    /// Undo llama.cpp's pairwise interleave over this many heads.
    Unpermute {
        heads: usize,
    },
}

impl GgufFile {
    /// Whether the file has the tensor a Hugging Face name stands for.
    pub fn contains(&self, hf_name: &str) -> bool {
        gguf_name(hf_name).is_some_and(|g| self.has_tensor(&g))
    }

    /// Loads a tensor by its Hugging Face name as f32 on the CPU, dequantized,
    /// with its shape checked against `expected` and its rotary layout undone.
    pub fn load_f32(&self, hf_name: &str, expected: &[usize]) -> Result<Tensor> {
        let name = gguf_name(hf_name)
            .filter(|g| self.has_tensor(g))
            .ok_or_else(|| EngineError::MissingTensor {
                name: format!(
                    "{hf_name} (GGUF: {})",
                    gguf_name(hf_name).unwrap_or_default()
                ),
            })?;
        let info = &self.content.tensor_infos[&name];
        if info.shape.dims() != expected {
            return Err(self.error(format!(
                "tensor {name:?} has shape {:?} but the metadata implies {expected:?}",
                info.shape.dims()
            )));
        }
        let q = self
            .content
            .tensor(&mut Cursor::new(&self.map[..]), &name, &Device::Cpu)
            .map_err(|e| self.error(format!("cannot read tensor {name:?}: {e}")))?;
        let t = q
            .dequantize(&Device::Cpu)
            .map_err(|e| self.error(format!("cannot dequantize tensor {name:?}: {e}")))?;
        match self.rotary(&name)? {
            Rotary::None => Ok(t),
            Rotary::Unpermute { heads } => unpermute_rotary(&t, heads),
        }
    }

    fn rotary(&self, gguf_name: &str) -> Result<Rotary> {
        // Qwen2 GGUFs keep Hugging Face's layout (llama.cpp runs them with NeoX RoPE).
        if self.architecture()? == Architecture::Qwen2 || self.keep_rotary_interleave {
            return Ok(Rotary::None);
        }
        let heads = self.arch_usize("attention.head_count")?;
        Ok(if gguf_name.ends_with(".attn_q.weight") {
            Rotary::Unpermute { heads }
        } else if gguf_name.ends_with(".attn_k.weight") {
            let kv_heads = match self.arch_meta("attention.head_count_kv") {
                Some(_) => self.arch_usize("attention.head_count_kv")?,
                None => heads,
            };
            Rotary::Unpermute { heads: kv_heads }
        } else {
            Rotary::None
        })
    }

    /// Loads Q/K weights as stored, without undoing llama.cpp's rotary
    /// interleave: only for the test that shows the model is then wrong.
    #[doc(hidden)]
    pub fn keep_rotary_interleave(&mut self) {
        self.keep_rotary_interleave = true;
    }
}

/// Per head, rows `(head_dim/2, 2)` back to `(2, head_dim/2)`: the inverse of
/// llama.cpp's `permute` (`reshape(heads, 2, hd/2, in).swapaxes(1, 2)`).
fn unpermute_rotary(t: &Tensor, heads: usize) -> Result<Tensor> {
    let (rows, cols) = t.dims2()?;
    if heads == 0 || !rows.is_multiple_of(heads * 2) {
        return Err(EngineError::InvalidInput(format!(
            "cannot split {rows} rows into {heads} rotary heads"
        )));
    }
    let half = rows / heads / 2;
    Ok(t.reshape((heads, half, 2, cols))?
        .transpose(1, 2)?
        .contiguous()?
        .reshape((rows, cols))?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_map_both_ways_of_a_layer() {
        assert_eq!(
            gguf_name("model.layers.12.self_attn.k_proj.weight").as_deref(),
            Some("blk.12.attn_k.weight")
        );
        assert_eq!(
            gguf_name("model.embed_tokens.weight").as_deref(),
            Some("token_embd.weight")
        );
        assert_eq!(gguf_name("model.layers.x.mlp.up_proj.weight"), None);
        assert_eq!(gguf_name("model.layers.1.mlp.bogus"), None);
    }

    #[test]
    fn unpermute_inverts_llama_cpp_permute() {
        // Rows of two heads of dim 4 in HF order: head h, index i -> 10h + i.
        let hf: Vec<f32> = (0..2)
            .flat_map(|h| (0..4).map(move |i| (10 * h + i) as f32))
            .collect();
        let hf = Tensor::from_vec(hf, (8, 1), &Device::Cpu).unwrap();
        // llama.cpp: reshape(heads, 2, hd/2, in).swapaxes(1, 2).
        let gguf = hf
            .reshape((2, 2, 2, 1))
            .unwrap()
            .transpose(1, 2)
            .unwrap()
            .contiguous()
            .unwrap()
            .reshape((8, 1))
            .unwrap();
        let rows: Vec<f32> = gguf.flatten_all().unwrap().to_vec1().unwrap();
        assert_eq!(rows, [0., 2., 1., 3., 10., 12., 11., 13.]);
        let back = unpermute_rotary(&gguf, 2).unwrap();
        assert_eq!(
            back.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
            hf.flatten_all().unwrap().to_vec1::<f32>().unwrap()
        );
    }
}
