//! KV arriving in a wider dtype than the cache holds: a bf16 (or f32, f16)
//! prefill node feeding an fp8 decode node. The reservation table accepted
//! the frame (`WireDtype::imports_into`); here its payload is quantized to
//! the cache's fp8 frame layout before the import, with the same rule the
//! cache applies to tokens it computes itself
//! (`tandem_engine::kv_quant::quantize_frame`), so the imported cache holds
//! what a local prefill would have written from the same values.

use std::ops::Range;

use tandem_cluster::kv_dtype::{name, wire_dtype};
use tandem_engine::KvLayout;
use tandem_engine::kv_quant::{SourceDtype, quantize_frame};
use tandem_kv_transfer::{Payload, WireDtype};

/// `payload` (blocks `blocks` of the reservation, heads `heads`, in
/// `frame`'s dtype) in the cache's dtype; `context_len` tokens hold KV, which
/// says how many slots of the last block are real (the rest are not quantized).
/// A frame already in the cache's dtype is returned as it is (its pieces).
pub(crate) fn to_cache_dtype(
    frame: WireDtype,
    layout: &KvLayout,
    payload: &Payload,
    blocks: Range<usize>,
    heads: Range<usize>,
    context_len: usize,
) -> Result<Payload, String> {
    let cache = wire_dtype(layout.dtype);
    if frame == cache {
        return Ok(payload.clone());
    }
    let src = match (frame, cache) {
        (WireDtype::F32, WireDtype::Fp8E4m3) => SourceDtype::F32,
        (WireDtype::Bf16, WireDtype::Fp8E4m3) => SourceDtype::Bf16,
        (WireDtype::F16, WireDtype::Fp8E4m3) => SourceDtype::F16,
        _ => {
            return Err(format!(
                "KV arrived as {} but this node's cache holds {}: only a wider dtype into an fp8 cache is converted",
                name(frame),
                name(cache)
            ));
        }
    };
    let bs = layout.block_size;
    let valid: Vec<usize> = blocks
        .map(|b| context_len.saturating_sub(b * bs).min(bs))
        .collect();
    quantize_frame(
        src,
        &payload.to_bytes(),
        heads.len(),
        bs,
        layout.head_dim,
        &valid,
    )
    .map(Payload::from)
    .map_err(|e| e.to_string())
}
