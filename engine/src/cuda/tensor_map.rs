//! TMA tensor maps of the KV cache: how the Hopper prefill attention's producer
//! has the Tensor Memory Accelerator copy whole cache blocks into its shared
//! memory ring (one instruction per box, no thread per 16 bytes).
//!
//! One map per layer of a bf16 cache, kept in device memory (128 bytes each).
//! The layer's blocks as a 4-dimensional tensor, innermost first: head
//! dimension, slot in the block, K/V head (K heads `0 .. hkv`, then V heads),
//! block (the scratch block included). A box is 64 dimensions × one block's
//! slots of one head: 128-byte rows in the 128-byte swizzle, the layout the
//! kernel's `sw128_offset` writes and its `wgmma` descriptors read, as long as
//! every box lands on a 1024-byte boundary (the block size a multiple of 8).

use cudarc::driver::sys::{
    self, CUtensorMap, CUtensorMapDataType, CUtensorMapFloatOOBfill, CUtensorMapInterleave,
    CUtensorMapL2promotion, CUtensorMapSwizzle,
};

use super::error::{CudaError, DriverContext};
use super::launch::{Elem, PREFILL_WS_BK};
use crate::kv_cache::{KvDtype, KvLayout};

/// The element type of a device address holding tensor maps (`CUtensorMap*`
/// in the kernels).
pub(crate) struct TensorMap;

impl Elem for TensorMap {
    const C: &'static str = "CUtensorMap";
}

/// Bytes of one map in device memory.
pub(crate) const MAP_BYTES: usize = std::mem::size_of::<CUtensorMap>();
const _: () = assert!(MAP_BYTES == 128);

/// Dimensions of a box: the swizzle's 128-byte rows hold 64 bf16.
const BOX_DIMS: u32 = 64;

/// Whether the warp-specialized prefill attention can load `layout`'s blocks by
/// TMA: a bf16 cache, head_dim 64 or 128 (whole 64-dimension boxes), blocks of
/// a multiple of 8 slots (boxes on the swizzle's period) that tile a
/// [`PREFILL_WS_BK`]-key tile exactly.
pub(crate) fn kv_fits(layout: &KvLayout) -> bool {
    let bs = layout.block_size;
    layout.dtype == KvDtype::Bf16
        && matches!(layout.head_dim, 64 | 128)
        && bs > 0
        && bs.is_multiple_of(8)
        && PREFILL_WS_BK.is_multiple_of(bs)
}

/// The map of one layer whose blocks (and scratch block) start at device
/// address `addr`; `layout` must [fit](kv_fits).
pub(crate) fn encode_kv_layer(addr: u64, layout: &KvLayout) -> Result<CUtensorMap, CudaError> {
    let (hd, bs) = (layout.head_dim as u64, layout.block_size as u64);
    let heads = 2 * layout.num_kv_heads as u64;
    let dims = [hd, bs, heads, layout.num_blocks as u64 + 1];
    // Byte strides of dimensions 1.. (dimension 0 is contiguous bf16).
    let strides = [hd * 2, bs * hd * 2, heads * bs * hd * 2];
    let boxes = [BOX_DIMS, layout.block_size as u32, 1, 1];
    let steps = [1u32; 4];
    let mut map = CUtensorMap { opaque: [0; 16] };
    // SAFETY: every array holds the rank's (4) entries (strides one fewer) and
    // `map` is a live, aligned CUtensorMap; the driver only writes `map`.
    unsafe {
        sys::cuTensorMapEncodeTiled(
            &mut map,
            CUtensorMapDataType::CU_TENSOR_MAP_DATA_TYPE_BFLOAT16,
            4,
            addr as *mut std::ffi::c_void,
            dims.as_ptr(),
            strides.as_ptr(),
            boxes.as_ptr(),
            steps.as_ptr(),
            CUtensorMapInterleave::CU_TENSOR_MAP_INTERLEAVE_NONE,
            CUtensorMapSwizzle::CU_TENSOR_MAP_SWIZZLE_128B,
            CUtensorMapL2promotion::CU_TENSOR_MAP_L2_PROMOTION_L2_256B,
            CUtensorMapFloatOOBfill::CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE,
        )
    }
    .result()
    .op("cuTensorMapEncodeTiled")?;
    Ok(map)
}

/// The bytes of `maps`, one after the other, as device memory holds them.
pub(crate) fn bytes(maps: &[CUtensorMap]) -> Vec<u8> {
    maps.iter()
        .flat_map(|m| m.opaque.iter().flat_map(|w| w.to_le_bytes()))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn layout(dtype: KvDtype, head_dim: usize, block_size: usize) -> KvLayout {
        KvLayout {
            num_layers: 2,
            num_blocks: 10,
            block_size,
            num_kv_heads: 8,
            head_dim,
            dtype,
        }
    }

    #[test]
    fn tma_takes_bf16_caches_whose_blocks_tile_a_key_tile_in_whole_swizzle_periods() {
        for bs in [8, 16, 32, 64, 128] {
            assert!(kv_fits(&layout(KvDtype::Bf16, 128, bs)), "block size {bs}");
        }
        assert!(kv_fits(&layout(KvDtype::Bf16, 64, 16)));
        // 24 does not divide the 128-key tile, 4 is off the 1024-byte period, 256
        // spans two tiles.
        for bs in [4, 24, 256] {
            assert!(!kv_fits(&layout(KvDtype::Bf16, 128, bs)), "block size {bs}");
        }
        assert!(!kv_fits(&layout(KvDtype::Bf16, 32, 16)));
        assert!(!kv_fits(&layout(KvDtype::Fp8E4m3, 128, 16)));
    }
}
