//! A scoped view of a model's weights, in the spirit of candle's `VarBuilder`:
//! [`WeightScope::pp`] pushes a name prefix (`model`, then `layers`, then `3`),
//! so the code that loads a layer names its tensors as the layer sees them
//! (`self_attn.q_proj.weight`) and never spells the full path.
//!
//! Every load states the tensor's full shape (checked against the file) and a
//! [`Shard`]: all of it, or the rows or columns one tensor-parallel rank
//! holds. Only the shard's bytes are copied out of the mapped file.

use std::fmt::Display;
use std::ops::Range;

use candle_core::{DType, Device, Tensor};

use crate::error::Result;
use crate::weights::Weights;

/// The part of a weight one load takes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Shard {
    /// The whole tensor.
    Whole,
    /// Rows `range` (dimension 0): a column-parallel weight's share.
    Rows(Range<usize>),
    /// Columns `range` (dimension 1): a row-parallel weight's share.
    Cols(Range<usize>),
}

/// [`Weights`] under a name prefix, loading as one dtype onto one device.
#[derive(Clone)]
pub struct WeightScope<'a> {
    weights: &'a Weights,
    prefix: String,
    dtype: DType,
    device: Device,
}

impl<'a> WeightScope<'a> {
    /// The root scope of `weights`, loading as `dtype` on `device`.
    pub fn new(weights: &'a Weights, dtype: DType, device: &Device) -> Self {
        WeightScope {
            weights,
            prefix: String::new(),
            dtype,
            device: device.clone(),
        }
    }

    /// The scope `name` inside this one (`pp` as in candle: "push prefix").
    pub fn pp(&self, name: impl Display) -> Self {
        WeightScope {
            prefix: self.path(&name.to_string()),
            ..self.clone()
        }
    }

    /// The full name of `name` in this scope.
    pub fn path(&self, name: &str) -> String {
        if self.prefix.is_empty() {
            name.to_string()
        } else {
            format!("{}.{name}", self.prefix)
        }
    }

    /// Whether the weights hold `name` in this scope.
    pub fn contains(&self, name: &str) -> bool {
        self.weights.contains(&self.path(name))
    }

    /// Loads `shard` of tensor `name`, whose full shape must be `shape`.
    pub fn get(&self, name: &str, shape: &[usize], shard: &Shard) -> Result<Tensor> {
        let full = self.path(name);
        let (dtype, device) = (self.dtype, &self.device);
        match shard {
            Shard::Whole => self.weights.load(&full, shape, dtype, device),
            Shard::Rows(r) => self
                .weights
                .load_narrow(&full, shape, 0, r.clone(), dtype, device),
            Shard::Cols(r) => self
                .weights
                .load_narrow(&full, shape, 1, r.clone(), dtype, device),
        }
    }
}
