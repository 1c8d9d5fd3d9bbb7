//! Rotary position embedding frequencies, computed as Hugging Face does
//! (in f32, `rotate_half` convention, optional Llama-3 scaling).

use crate::config::ModelConfig;

/// Inverse frequencies of the rotary embedding, one per pair of dimensions.
pub fn inv_freq(config: &ModelConfig) -> Vec<f32> {
    let dim = config.head_dim;
    let base = config.rope_theta as f32;
    let mut inv: Vec<f32> = (0..dim / 2)
        .map(|i| 1.0 / base.powf((2 * i) as f32 / dim as f32))
        .collect();
    if let Some(s) = &config.rope_scaling {
        let old = s.original_max_position_embeddings as f32;
        let (factor, lo, hi) = (
            s.factor as f32,
            s.low_freq_factor as f32,
            s.high_freq_factor as f32,
        );
        let low_freq_wavelen = old / lo;
        let high_freq_wavelen = old / hi;
        for f in &mut inv {
            let wavelen = 2.0 * std::f32::consts::PI / *f;
            if wavelen > low_freq_wavelen {
                *f /= factor;
            } else if wavelen >= high_freq_wavelen {
                let smooth = (old / wavelen - lo) / (hi - lo);
                *f = (1.0 - smooth) * *f / factor + smooth * *f;
            }
        }
    }
    inv
}

/// `cos` and `sin` tables, `[positions.len(), head_dim / 2]` row-major, for the given positions.
pub fn cos_sin(inv_freq: &[f32], positions: &[usize]) -> (Vec<f32>, Vec<f32>) {
    let mut cos = Vec::with_capacity(positions.len() * inv_freq.len());
    let mut sin = Vec::with_capacity(cos.capacity());
    for &p in positions {
        for &f in inv_freq {
            let angle = p as f32 * f;
            cos.push(angle.cos());
            sin.push(angle.sin());
        }
    }
    (cos, sin)
}
