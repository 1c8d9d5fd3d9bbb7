//! The one conversion between the three names of a KV cache's element type:
//! the engine's [`KvDtype`](tandem_engine::KvDtype) (what a backend's cache
//! holds), the KV wire format's [`WireDtype`] (what a frame header carries)
//! and the internal proto's [`pb::KvDtype`] (what `KvTarget.dtype` carries).
//!
//! A new KV dtype is added to the three enums and to the three matches here;
//! every node converts through these functions.

use tandem_engine::KvDtype;
use tandem_kv_transfer::WireDtype;
use tandem_proto::v1 as pb;

/// The wire's dtype for a cache dtype.
pub fn wire_dtype(d: KvDtype) -> WireDtype {
    match d {
        KvDtype::F32 => WireDtype::F32,
        KvDtype::Bf16 => WireDtype::Bf16,
        KvDtype::F16 => WireDtype::F16,
        KvDtype::Fp8E4m3 => WireDtype::Fp8E4m3,
    }
}

/// The proto's dtype for a wire dtype (`KvTarget.dtype`).
pub fn wire_to_pb(d: WireDtype) -> pb::KvDtype {
    match d {
        WireDtype::F32 => pb::KvDtype::F32,
        WireDtype::Bf16 => pb::KvDtype::Bf16,
        WireDtype::F16 => pb::KvDtype::F16,
        WireDtype::Fp8E4m3 => pb::KvDtype::Fp8E4m3,
    }
}

/// The wire dtype a proto value names (`KvTarget.dtype` as received), if
/// the value is one this build knows.
pub fn wire_from_pb(value: i32) -> Option<WireDtype> {
    match pb::KvDtype::try_from(value).ok()? {
        pb::KvDtype::F32 => Some(WireDtype::F32),
        pb::KvDtype::Bf16 => Some(WireDtype::Bf16),
        pb::KvDtype::F16 => Some(WireDtype::F16),
        pb::KvDtype::Fp8E4m3 => Some(WireDtype::Fp8E4m3),
    }
}

/// A dtype's short name, for messages.
pub fn name(d: WireDtype) -> &'static str {
    match d {
        WireDtype::F32 => "f32",
        WireDtype::Bf16 => "bf16",
        WireDtype::F16 => "f16",
        WireDtype::Fp8E4m3 => "fp8_e4m3",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_dtype_round_trips_with_the_wire_codes_as_proto_values() {
        for d in [KvDtype::F32, KvDtype::Bf16, KvDtype::F16, KvDtype::Fp8E4m3] {
            let wire = wire_dtype(d);
            assert_eq!(wire.size(), d.size());
            let pb = wire_to_pb(wire);
            // The proto field was a uint32 holding the wire code: same numbers.
            assert_eq!(pb as i32, wire as i32);
            assert_eq!(wire_from_pb(pb as i32), Some(wire));
        }
        assert_eq!(wire_from_pb(4), None);
        assert_eq!(wire_from_pb(-1), None);
    }
}
