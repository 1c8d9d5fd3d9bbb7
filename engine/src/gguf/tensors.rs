//! GGUF tensors under Hugging Face names, dequantized (the names' mapping is
//! the Llama definition's, [`crate::llama::gguf_name`]).
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
use crate::llama::LayerParam;

pub use crate::llama::gguf_name;

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
        let of = |p: LayerParam| {
            gguf_name
                .strip_suffix(p.gguf_name())
                .is_some_and(|s| s.ends_with('.'))
        };
        Ok(if of(LayerParam::QProj) {
            Rotary::Unpermute { heads }
        } else if of(LayerParam::KProj) {
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
