//! The Llama family's weights as loaded for one rank (or whole): plain
//! structs filled from the definition's table ([`super::LayerParam`],
//! [`super::ModelParam`]) through a [`WeightScope`] and a [`ShardSpec`].

use candle_core::Tensor;

use super::{LAYERS, LayerParam, ModelParam, ShardSpec, WeightScope};
use crate::config::ModelConfig;
use crate::error::Result;

/// A projection: `[out, in]` as stored by Hugging Face, and its bias.
pub struct Linear {
    /// `[out, in]` (a rank's rows or columns of it).
    pub weight: Tensor,
    /// `[out]` (a rank's rows of it, or all of it for a row-parallel weight).
    pub bias: Option<Tensor>,
}

impl Linear {
    fn load(
        vb: &WeightScope<'_>,
        c: &ModelConfig,
        spec: ShardSpec<'_>,
        weight: LayerParam,
        bias: Option<LayerParam>,
    ) -> Result<Self> {
        Ok(Linear {
            weight: weight.load(vb, c, spec)?,
            bias: match bias.filter(|b| b.present(c)) {
                Some(b) => Some(b.load(vb, c, spec)?),
                None => None,
            },
        })
    }

    /// `x [n, in] -> [n, out]`, bias added.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let y = self.product(x)?;
        Ok(match &self.bias {
            Some(b) => y.broadcast_add(b)?,
            None => y,
        })
    }

    /// `x [n, in] -> [n, out]` without the bias: a row-parallel rank's partial sum.
    pub fn product(&self, x: &Tensor) -> Result<Tensor> {
        Ok(x.matmul(&self.weight.t()?)?)
    }
}

/// One decoder layer's weights (one rank's share).
pub struct LayerWeights {
    /// RMSNorm before attention.
    pub input_norm: Tensor,
    /// Query projection.
    pub q: Linear,
    /// Key projection.
    pub k: Linear,
    /// Value projection.
    pub v: Linear,
    /// Output projection (its bias, if any, is whole on every rank).
    pub o: Linear,
    /// RMSNorm before the MLP.
    pub post_norm: Tensor,
    /// MLP gate.
    pub gate: Linear,
    /// MLP up.
    pub up: Linear,
    /// MLP down.
    pub down: Linear,
}

impl LayerWeights {
    /// Loads layer `i` from the root scope `vb`.
    pub fn load(
        vb: &WeightScope<'_>,
        c: &ModelConfig,
        spec: ShardSpec<'_>,
        i: usize,
    ) -> Result<Self> {
        use LayerParam as P;
        let vb = &vb.pp(LAYERS).pp(i);
        let lin = |w, b| Linear::load(vb, c, spec, w, b);
        Ok(LayerWeights {
            input_norm: P::InputNorm.load(vb, c, spec)?,
            q: lin(P::QProj, Some(P::QBias))?,
            k: lin(P::KProj, Some(P::KBias))?,
            v: lin(P::VProj, Some(P::VBias))?,
            o: lin(P::OProj, Some(P::OBias))?,
            post_norm: P::PostNorm.load(vb, c, spec)?,
            gate: lin(P::GateProj, None)?,
            up: lin(P::UpProj, None)?,
            down: lin(P::DownProj, None)?,
        })
    }
}

/// Every weight of the model (one rank's share).
pub struct ModelWeights {
    /// Token embedding (a rank's vocabulary rows).
    pub embed: Tensor,
    /// The decoder layers.
    pub layers: Vec<LayerWeights>,
    /// The final RMSNorm.
    pub norm: Tensor,
    /// The LM head (a rank's vocabulary rows); the embedding when tied.
    pub lm_head: Tensor,
}

impl ModelWeights {
    /// Loads `spec`'s share of every weight from the root scope `vb`.
    pub fn load(vb: &WeightScope<'_>, c: &ModelConfig, spec: ShardSpec<'_>) -> Result<Self> {
        let embed = ModelParam::Embed.load(vb, c, spec)?;
        let layers = (0..c.num_layers)
            .map(|i| LayerWeights::load(vb, c, spec, i))
            .collect::<Result<Vec<_>>>()?;
        let norm = ModelParam::FinalNorm.load(vb, c, spec)?;
        let lm_head = if ModelParam::has_lm_head(vb, c) {
            ModelParam::LmHead.load(vb, c, spec)?
        } else {
            embed.clone()
        };
        Ok(ModelWeights {
            embed,
            layers,
            norm,
            lm_head,
        })
    }
}
