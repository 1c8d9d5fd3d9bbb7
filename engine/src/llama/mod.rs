//! The Llama family (Llama, Mistral, Qwen2), written once: the name, shape,
//! tensor-parallel split and GGUF name of every weight ([`LayerParam`],
//! [`ModelParam`]; this file), the loaded weights of one rank
//! ([`weights`]), and the forward pass of one rank ([`forward`]).
//!
//! Every consumer reads this table instead of spelling names itself: the CPU
//! backend (any tensor parallelism, TP = 1 included), the CUDA backend's
//! weight upload, the synthesizer (`tandem model synth`) and the GGUF loader's
//! name mapping. Weights come from [`Weights`](crate::weights::Weights)
//! (safetensors or GGUF) through a [`WeightScope`] (candle's `vb.pp()` idea)
//! and a [`ShardSpec`] saying which rows or columns a rank loads.
//!
//! Adding an architecture of this family (a new bias, a renamed tensor) is a
//! change here and in [`config`](crate::config); a family with another layer
//! shape gets a sibling module of its own.

pub mod forward;
pub mod scope;
pub mod weights;

use candle_core::Tensor;

pub use forward::Activations;
pub use scope::{Shard, WeightScope};
pub use weights::{LayerWeights, Linear, ModelWeights};

use crate::config::ModelConfig;
use crate::error::Result;
use crate::tp::TpPlan;

/// What a weight is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// The token embedding table `[vocab, hidden]`.
    Embedding,
    /// An RMSNorm scale `[hidden]`.
    Norm,
    /// A projection matrix `[out, in]`.
    Projection,
    /// A projection's bias `[out]`.
    Bias,
    /// The LM head `[vocab, hidden]` (absent when tied to the embedding).
    LmHead,
}

/// A dimension a weight is cut along over tensor-parallel ranks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Part {
    /// Query heads (`head_dim` rows or columns each).
    QueryHeads,
    /// KV heads (`head_dim` rows each; replicated when ranks outnumber them).
    KvHeads,
    /// MLP width.
    Mlp,
    /// Vocabulary.
    Vocab,
}

/// How a weight splits over tensor-parallel ranks (Megatron style).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Split {
    /// Every rank holds all of it.
    Replicated,
    /// Each rank holds the rows of its share (column-parallel).
    Rows(Part),
    /// Each rank holds the columns of its share (row-parallel: ranks' products
    /// are partial sums of the output).
    Cols(Part),
}

/// The weights of one decoder layer, in the order the synthesizer writes them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LayerParam {
    /// RMSNorm before attention.
    InputNorm,
    /// Query projection.
    QProj,
    /// Query bias (Qwen2).
    QBias,
    /// Key projection.
    KProj,
    /// Key bias (Qwen2).
    KBias,
    /// Value projection.
    VProj,
    /// Value bias (Qwen2).
    VBias,
    /// Attention output projection.
    OProj,
    /// Attention output bias (none of the supported architectures has one;
    /// the config may ask for it).
    OBias,
    /// RMSNorm before the MLP.
    PostNorm,
    /// MLP gate.
    GateProj,
    /// MLP up.
    UpProj,
    /// MLP down.
    DownProj,
}

/// The model's weights outside the layers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ModelParam {
    /// Token embedding.
    Embed,
    /// The final RMSNorm.
    FinalNorm,
    /// The LM head.
    LmHead,
}

/// The scope of decoder layer `i`'s weights.
pub const LAYERS: &str = "model.layers";
/// The scope of layer `i`'s weights in a GGUF file (`blk.{i}`).
pub const GGUF_LAYERS: &str = "blk";

impl LayerParam {
    /// Every layer weight, in file order.
    pub const ALL: [LayerParam; 13] = [
        LayerParam::InputNorm,
        LayerParam::QProj,
        LayerParam::QBias,
        LayerParam::KProj,
        LayerParam::KBias,
        LayerParam::VProj,
        LayerParam::VBias,
        LayerParam::OProj,
        LayerParam::OBias,
        LayerParam::PostNorm,
        LayerParam::GateProj,
        LayerParam::UpProj,
        LayerParam::DownProj,
    ];

    /// Hugging Face name within the layer's scope, llama.cpp's GGUF name
    /// within `blk.{i}`, kind and split.
    const fn def(self) -> (&'static str, &'static str, Kind, Split) {
        use Kind::*;
        use Part::*;
        use Split::*;
        match self {
            LayerParam::InputNorm => (
                "input_layernorm.weight",
                "attn_norm.weight",
                Norm,
                Replicated,
            ),
            LayerParam::QProj => (
                "self_attn.q_proj.weight",
                "attn_q.weight",
                Projection,
                Rows(QueryHeads),
            ),
            LayerParam::QBias => (
                "self_attn.q_proj.bias",
                "attn_q.bias",
                Bias,
                Rows(QueryHeads),
            ),
            LayerParam::KProj => (
                "self_attn.k_proj.weight",
                "attn_k.weight",
                Projection,
                Rows(KvHeads),
            ),
            LayerParam::KBias => ("self_attn.k_proj.bias", "attn_k.bias", Bias, Rows(KvHeads)),
            LayerParam::VProj => (
                "self_attn.v_proj.weight",
                "attn_v.weight",
                Projection,
                Rows(KvHeads),
            ),
            LayerParam::VBias => ("self_attn.v_proj.bias", "attn_v.bias", Bias, Rows(KvHeads)),
            LayerParam::OProj => (
                "self_attn.o_proj.weight",
                "attn_output.weight",
                Projection,
                Cols(QueryHeads),
            ),
            // Added once, after the ranks' partial sums are reduced.
            LayerParam::OBias => (
                "self_attn.o_proj.bias",
                "attn_output.bias",
                Bias,
                Replicated,
            ),
            LayerParam::PostNorm => (
                "post_attention_layernorm.weight",
                "ffn_norm.weight",
                Norm,
                Replicated,
            ),
            LayerParam::GateProj => (
                "mlp.gate_proj.weight",
                "ffn_gate.weight",
                Projection,
                Rows(Mlp),
            ),
            LayerParam::UpProj => ("mlp.up_proj.weight", "ffn_up.weight", Projection, Rows(Mlp)),
            LayerParam::DownProj => (
                "mlp.down_proj.weight",
                "ffn_down.weight",
                Projection,
                Cols(Mlp),
            ),
        }
    }

    /// The Hugging Face name within the layer's scope.
    pub const fn name(self) -> &'static str {
        self.def().0
    }

    /// llama.cpp's name within the layer's GGUF scope.
    pub const fn gguf_name(self) -> &'static str {
        self.def().1
    }

    /// What the weight is.
    pub const fn kind(self) -> Kind {
        self.def().2
    }

    /// How it splits over tensor-parallel ranks.
    pub const fn split(self) -> Split {
        self.def().3
    }

    /// Whether a model of `c` has this weight.
    pub fn present(self, c: &ModelConfig) -> bool {
        match self {
            LayerParam::QBias | LayerParam::KBias | LayerParam::VBias => c.qkv_bias,
            LayerParam::OBias => c.o_bias,
            _ => true,
        }
    }

    /// Its full shape in a model of `c`.
    pub fn shape(self, c: &ModelConfig) -> Vec<usize> {
        let (h, q, kv, f) = (
            c.hidden_size,
            c.num_heads * c.head_dim,
            c.num_kv_heads * c.head_dim,
            c.intermediate_size,
        );
        match self {
            LayerParam::InputNorm | LayerParam::PostNorm | LayerParam::OBias => vec![h],
            LayerParam::QProj => vec![q, h],
            LayerParam::QBias => vec![q],
            LayerParam::KProj | LayerParam::VProj => vec![kv, h],
            LayerParam::KBias | LayerParam::VBias => vec![kv],
            LayerParam::OProj => vec![h, q],
            LayerParam::GateProj | LayerParam::UpProj => vec![f, h],
            LayerParam::DownProj => vec![h, f],
        }
    }

    /// Loads the share `spec` says of this weight of the layer in scope `vb`.
    pub fn load(
        self,
        vb: &WeightScope<'_>,
        c: &ModelConfig,
        spec: ShardSpec<'_>,
    ) -> Result<Tensor> {
        let shape = self.shape(c);
        vb.get(self.name(), &shape, &spec.shard(self.split(), &shape))
    }
}

impl ModelParam {
    /// Every weight outside the layers: `Embed` comes before the layers in
    /// file order, the others after.
    pub const ALL: [ModelParam; 3] = [ModelParam::Embed, ModelParam::FinalNorm, ModelParam::LmHead];

    /// Hugging Face name, GGUF name, kind and split.
    const fn def(self) -> (&'static str, &'static str, Kind, Split) {
        match self {
            ModelParam::Embed => (
                "model.embed_tokens.weight",
                "token_embd.weight",
                Kind::Embedding,
                Split::Rows(Part::Vocab),
            ),
            ModelParam::FinalNorm => (
                "model.norm.weight",
                "output_norm.weight",
                Kind::Norm,
                Split::Replicated,
            ),
            ModelParam::LmHead => (
                "lm_head.weight",
                "output.weight",
                Kind::LmHead,
                Split::Rows(Part::Vocab),
            ),
        }
    }

    /// The Hugging Face name.
    pub const fn name(self) -> &'static str {
        self.def().0
    }

    /// llama.cpp's GGUF name.
    pub const fn gguf_name(self) -> &'static str {
        self.def().1
    }

    /// What the weight is.
    pub const fn kind(self) -> Kind {
        self.def().2
    }

    /// Its full shape in a model of `c`.
    pub fn shape(self, c: &ModelConfig) -> Vec<usize> {
        match self {
            ModelParam::Embed | ModelParam::LmHead => vec![c.vocab_size, c.hidden_size],
            ModelParam::FinalNorm => vec![c.hidden_size],
        }
    }

    /// Loads the share `spec` says of this weight from the root scope `vb`.
    pub fn load(
        self,
        vb: &WeightScope<'_>,
        c: &ModelConfig,
        spec: ShardSpec<'_>,
    ) -> Result<Tensor> {
        let shape = self.shape(c);
        vb.get(self.name(), &shape, &spec.shard(self.def().3, &shape))
    }

    /// Whether the model reads its LM head from the file (otherwise the LM
    /// head is the embedding: tied, and no separate tensor stored).
    pub fn has_lm_head(vb: &WeightScope<'_>, c: &ModelConfig) -> bool {
        !c.tie_word_embeddings || vb.contains(ModelParam::LmHead.name())
    }
}

/// Every weight of a model of `c`, in file order: its full Hugging Face name,
/// shape and kind (what the synthesizer writes).
pub fn tensors(c: &ModelConfig) -> Vec<(String, Vec<usize>, Kind)> {
    let top = |p: ModelParam| (p.name().to_string(), p.shape(c), p.kind());
    let mut out = vec![top(ModelParam::Embed)];
    for i in 0..c.num_layers {
        for p in LayerParam::ALL.into_iter().filter(|p| p.present(c)) {
            out.push((format!("{LAYERS}.{i}.{}", p.name()), p.shape(c), p.kind()));
        }
    }
    out.push(top(ModelParam::FinalNorm));
    if !c.tie_word_embeddings {
        out.push(top(ModelParam::LmHead));
    }
    out
}

/// The GGUF name of a Hugging Face tensor name, if the format has one.
pub fn gguf_name(hf: &str) -> Option<String> {
    if let Some(p) = ModelParam::ALL.into_iter().find(|p| p.name() == hf) {
        return Some(p.gguf_name().to_string());
    }
    let rest = hf.strip_prefix(LAYERS)?.strip_prefix('.')?;
    let (layer, name) = rest.split_once('.')?;
    layer.parse::<usize>().ok()?;
    let p = LayerParam::ALL.into_iter().find(|p| p.name() == name)?;
    Some(format!("{GGUF_LAYERS}.{layer}.{}", p.gguf_name()))
}

/// Which share of the weights a load takes: all of them, or one
/// tensor-parallel rank's.
#[derive(Debug, Clone, Copy)]
pub enum ShardSpec<'a> {
    /// Every weight whole (one device holds the model).
    Whole,
    /// Rank `rank`'s share under `plan`.
    Rank {
        /// The split.
        plan: &'a TpPlan,
        /// The rank.
        rank: usize,
    },
}

impl ShardSpec<'_> {
    /// The [`Shard`] of a weight of full shape `shape` split as `split`.
    pub fn shard(&self, split: Split, shape: &[usize]) -> Shard {
        let ShardSpec::Rank { plan, rank } = *self else {
            return Shard::Whole;
        };
        let (dim, part) = match split {
            Split::Replicated => return Shard::Whole,
            Split::Rows(part) => (0, part),
            Split::Cols(part) => (1, part),
        };
        let range = plan.part(part, rank);
        if range == (0..shape[dim]) {
            Shard::Whole
        } else if dim == 0 {
            Shard::Rows(range)
        } else {
            Shard::Cols(range)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(qwen: bool) -> ModelConfig {
        let arch = if qwen {
            "Qwen2ForCausalLM"
        } else {
            "LlamaForCausalLM"
        };
        ModelConfig::from_json(&format!(
            r#"{{"architectures":["{arch}"],"vocab_size":100,"hidden_size":32,
            "intermediate_size":50,"num_hidden_layers":2,"num_attention_heads":4,
            "num_key_value_heads":2,"max_position_embeddings":64,"rms_norm_eps":1e-5,
            "tie_word_embeddings":{}}}"#,
            !qwen
        ))
        .unwrap()
    }

    #[test]
    fn the_table_lists_every_weight_once_in_file_order() {
        let llama: Vec<String> = tensors(&config(false)).into_iter().map(|t| t.0).collect();
        assert_eq!(llama.len(), 1 + 2 * 9 + 1, "{llama:?}");
        assert_eq!(llama[0], "model.embed_tokens.weight");
        assert_eq!(llama[2], "model.layers.0.self_attn.q_proj.weight");
        assert_eq!(llama.last().map(String::as_str), Some("model.norm.weight"));
        let qwen = tensors(&config(true));
        assert_eq!(qwen.len(), 1 + 2 * 12 + 2);
        assert_eq!(qwen[3].0, "model.layers.0.self_attn.q_proj.bias");
        assert_eq!(qwen[3].1, vec![32]);
        assert_eq!(qwen[4].1, vec![16, 32], "k_proj: 2 KV heads of 8");
    }

    #[test]
    fn gguf_names_come_from_the_table() {
        assert_eq!(
            gguf_name("model.layers.12.self_attn.k_proj.weight").as_deref(),
            Some("blk.12.attn_k.weight")
        );
        assert_eq!(
            gguf_name("lm_head.weight").as_deref(),
            Some("output.weight")
        );
        assert_eq!(gguf_name("model.layers.x.mlp.up_proj.weight"), None);
        assert_eq!(gguf_name("model.layers.1.mlp.bogus"), None);
    }

    #[test]
    fn a_rank_takes_its_rows_or_columns() {
        let c = config(false);
        let plan = TpPlan::new(&c, 2).unwrap();
        let r1 = ShardSpec::Rank {
            plan: &plan,
            rank: 1,
        };
        let shard = |p: LayerParam| r1.shard(p.split(), &p.shape(&c));
        assert_eq!(shard(LayerParam::QProj), Shard::Rows(16..32));
        assert_eq!(shard(LayerParam::KProj), Shard::Rows(8..16));
        assert_eq!(shard(LayerParam::OProj), Shard::Cols(16..32));
        assert_eq!(shard(LayerParam::DownProj), Shard::Cols(25..50));
        assert_eq!(shard(LayerParam::InputNorm), Shard::Whole);
        let one = TpPlan::new(&c, 1).unwrap();
        let r0 = ShardSpec::Rank {
            plan: &one,
            rank: 0,
        };
        assert_eq!(r0.shard(LayerParam::QProj.split(), &[32, 32]), Shard::Whole);
    }
}
