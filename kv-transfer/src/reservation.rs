//! The decode node's table of expected KV transfers (sans-I/O).
//!
//! When the router reserves blocks on a decode node for a request, the node
//! [`register`](Reservations::register)s what it expects: how many layers and
//! blocks, in which dtype and shape. Each arriving Layer frame header is then
//! checked with [`on_layer_frame`](Reservations::on_layer_frame) *before* its
//! payload is written into the cache, and the Final frame with
//! [`on_final`](Reservations::on_final), which succeeds only when every
//! (layer, head, block) cell of the reservation has arrived exactly once.
//!
//! Blocks are named by their index within the reservation (`0..num_blocks`);
//! the decode node maps index `i` to its own block id `block_table[i]`.
//!
//! The first [`held_blocks`](Expectation::held_blocks) of a reservation are
//! blocks the decode node already holds (its prefix cache matched them when it
//! admitted the request): they count as received from the start, and a frame
//! carrying any of them is refused ([`Refusal::HeldBlock`]), so the sender
//! ships only the blocks after them.
//!
//! # Contract
//!
//! A [`Refusal`] for a request this table knows means that transfer is
//! broken: the caller must [`release`](Reservations::release) the
//! reservation (and free its blocks), and the sender is told through the
//! stream being stopped. Nothing here releases on its own: a reservation
//! whose KV never arrives is released by the decode node when the request's
//! `kv_timeout_ms` passes (its scheduler's `reap`), with the request's blocks.
//! After a successful `on_final` the request is finished: further frames are
//! refused with [`Refusal::Finished`] until the caller releases it.
//!
//! The table holds no clock and no timer.
//!
//! (The file passes 600 lines only with its unit tests, which cover every
//! refusal; the table itself is under 400.)

use std::collections::HashMap;

use crate::wire::{LayerHeader, WireDtype};

/// What a decode node expects for one request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Expectation {
    /// Decoder layers.
    pub num_layers: u32,
    /// Blocks reserved (indices `0..num_blocks`).
    pub num_blocks: u32,
    /// Bytes of one block of one layer with all heads (K and V).
    pub block_bytes: u64,
    /// Element type.
    pub dtype: WireDtype,
    /// The model's KV heads.
    pub total_heads: u16,
    /// Width of a head.
    pub head_dim: u16,
    /// Tokens per block.
    pub block_size: u16,
    /// Leading blocks (`0..held_blocks`) the decode node already holds: not
    /// to be sent. Less than `num_blocks`.
    pub held_blocks: u32,
}

impl Expectation {
    fn full_block_bytes(&self) -> Option<u64> {
        self.dtype
            .block_bytes(self.total_heads, self.block_size, self.head_dim)
    }
}

/// A Layer frame the table accepted: where its payload goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Accepted {
    /// Decoder layer.
    pub layer: u32,
    /// First block index within the reservation.
    pub first_block: u32,
    /// Blocks carried.
    pub block_count: u32,
    /// First head carried.
    pub head_start: u16,
    /// Heads carried.
    pub head_count: u16,
}

/// Why a frame or registration was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    /// No reservation for this request (never registered, released or expired).
    #[error("no reservation for transfer {0}")]
    UnknownRequest(u64),
    /// The request already completed.
    #[error("transfer {0} already completed")]
    Finished(u64),
    /// A second registration under the same id.
    #[error("transfer {0} is already registered")]
    AlreadyRegistered(u64),
    /// The expectation contradicts itself.
    #[error("inconsistent expectation: {0}")]
    BadExpectation(&'static str),
    /// A layer beyond the model.
    #[error("layer {layer} is beyond the expected {num_layers}")]
    LayerOutOfRange {
        /// The frame's layer.
        layer: u32,
        /// Expected layers.
        num_layers: u32,
    },
    /// Blocks beyond the reservation.
    #[error("blocks {first}..{end} exceed the reservation's {num_blocks}")]
    BlocksOutOfRange {
        /// First block.
        first: u32,
        /// One past the last block.
        end: u64,
        /// Reserved blocks.
        num_blocks: u32,
    },
    /// Heads beyond the model's.
    #[error("heads {start}..{end} exceed the model's {total}")]
    HeadsOutOfRange {
        /// First head.
        start: u16,
        /// One past the last head.
        end: u32,
        /// The model's heads.
        total: u16,
    },
    /// A field differs from the expectation.
    #[error("{field} mismatch: expected {expected}, got {got}")]
    Mismatch {
        /// Which field.
        field: &'static str,
        /// Expected value.
        expected: u64,
        /// Received value.
        got: u64,
    },
    /// Some (layer, head, block) cell of the frame already arrived.
    #[error("duplicate KV for layer {layer}")]
    Duplicate {
        /// The layer.
        layer: u32,
    },
    /// The frame carries a block the decode node said it already holds.
    #[error("block {block} is held by the receiver already (it holds blocks 0..{held})")]
    HeldBlock {
        /// The first held block the frame carries.
        block: u32,
        /// Blocks held.
        held: u32,
    },
    /// Final arrived before every cell did.
    #[error("final for transfer {transfer_id} with {missing} (layer, head, block) cells missing")]
    Incomplete {
        /// The request.
        transfer_id: u64,
        /// Cells not received.
        missing: u64,
    },
}

#[derive(Debug)]
struct Entry {
    expect: Expectation,
    /// One bit per (layer, block, head), in that order.
    received: Vec<u64>,
    received_count: u64,
    finished: bool,
}

impl Entry {
    fn cells(&self) -> u64 {
        u64::from(self.expect.num_layers)
            * u64::from(self.expect.num_blocks)
            * u64::from(self.expect.total_heads)
    }

    fn cell(&self, layer: u32, block: u32, head: u16) -> usize {
        ((layer as usize * self.expect.num_blocks as usize + block as usize)
            * self.expect.total_heads as usize)
            + head as usize
    }

    fn get(&self, i: usize) -> bool {
        self.received[i / 64] & (1 << (i % 64)) != 0
    }

    fn set(&mut self, i: usize) {
        self.received[i / 64] |= 1 << (i % 64);
    }
}

/// The decode node's expected transfers, keyed by request id.
#[derive(Debug, Default)]
pub struct Reservations {
    entries: HashMap<u64, Entry>,
}

impl Reservations {
    /// An empty table.
    pub fn new() -> Self {
        Self::default()
    }

    /// Reservations held.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// Whether no reservation is held.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Expects a transfer for `transfer_id`.
    pub fn register(&mut self, transfer_id: u64, expect: Expectation) -> Result<(), Refusal> {
        if self.entries.contains_key(&transfer_id) {
            return Err(Refusal::AlreadyRegistered(transfer_id));
        }
        if expect.num_layers == 0 || expect.num_blocks == 0 || expect.total_heads == 0 {
            return Err(Refusal::BadExpectation(
                "layers, blocks and heads must be nonzero",
            ));
        }
        if expect.held_blocks >= expect.num_blocks {
            return Err(Refusal::BadExpectation(
                "held_blocks must leave at least one block to receive",
            ));
        }
        if expect.full_block_bytes() != Some(expect.block_bytes) {
            return Err(Refusal::BadExpectation(
                "block_bytes must be one block of total_heads heads in dtype (WireDtype::block_bytes)",
            ));
        }
        let cells = u64::from(expect.num_layers)
            * u64::from(expect.num_blocks)
            * u64::from(expect.total_heads);
        let words = usize::try_from(cells.div_ceil(64))
            .map_err(|_| Refusal::BadExpectation("too many cells"))?;
        let mut entry = Entry {
            expect,
            received: vec![0; words],
            received_count: 0,
            finished: false,
        };
        // Held blocks are there already: every head of every layer.
        for layer in 0..expect.num_layers {
            for b in 0..expect.held_blocks {
                for head in 0..expect.total_heads {
                    let i = entry.cell(layer, b, head);
                    entry.set(i);
                }
            }
        }
        entry.received_count = u64::from(expect.num_layers)
            * u64::from(expect.held_blocks)
            * u64::from(expect.total_heads);
        self.entries.insert(transfer_id, entry);
        Ok(())
    }

    /// Checks a Layer frame's header and records its cells as received.
    pub fn on_layer_frame(&mut self, h: &LayerHeader) -> Result<Accepted, Refusal> {
        let entry = self
            .entries
            .get_mut(&h.transfer_id)
            .ok_or(Refusal::UnknownRequest(h.transfer_id))?;
        if entry.finished {
            return Err(Refusal::Finished(h.transfer_id));
        }
        let e = entry.expect;
        let s = h.shape;
        let layer = u32::from(s.layer);
        if layer >= e.num_layers {
            return Err(Refusal::LayerOutOfRange {
                layer,
                num_layers: e.num_layers,
            });
        }
        let mismatch = |field, expected: u64, got: u64| Refusal::Mismatch {
            field,
            expected,
            got,
        };
        // A wider dtype into an fp8 cache is quantized on import.
        if !s.dtype.imports_into(e.dtype) {
            return Err(mismatch("dtype", e.dtype as u64, s.dtype as u64));
        }
        if s.total_heads != e.total_heads {
            return Err(mismatch(
                "total_heads",
                e.total_heads.into(),
                s.total_heads.into(),
            ));
        }
        if s.head_dim != e.head_dim {
            return Err(mismatch("head_dim", e.head_dim.into(), s.head_dim.into()));
        }
        if s.block_size != e.block_size {
            return Err(mismatch(
                "block_size",
                e.block_size.into(),
                s.block_size.into(),
            ));
        }
        let head_end = u32::from(s.head_start) + u32::from(s.head_count);
        if s.head_count == 0 || head_end > u32::from(e.total_heads) {
            return Err(Refusal::HeadsOutOfRange {
                start: s.head_start,
                end: head_end,
                total: e.total_heads,
            });
        }
        let block_end = u64::from(s.first_block) + u64::from(s.block_count);
        if s.block_count == 0 || block_end > u64::from(e.num_blocks) {
            return Err(Refusal::BlocksOutOfRange {
                first: s.first_block,
                end: block_end,
                num_blocks: e.num_blocks,
            });
        }
        if s.first_block < e.held_blocks {
            return Err(Refusal::HeldBlock {
                block: s.first_block,
                held: e.held_blocks,
            });
        }
        // Full-head block bytes scaled to the carried heads; exact because
        // block_bytes is a multiple of total_heads (checked at registration).
        // A frame in another dtype (to be quantized on import) is sized by
        // its own dtype.
        let expected_len = if s.dtype == e.dtype {
            e.block_bytes / u64::from(e.total_heads)
                * u64::from(s.head_count)
                * u64::from(s.block_count)
        } else {
            s.payload_len().unwrap_or(u64::MAX)
        };
        if u64::from(h.payload_len) != expected_len {
            return Err(mismatch("payload_len", expected_len, h.payload_len.into()));
        }
        for b in s.first_block..s.first_block + s.block_count {
            for head in s.head_start..s.head_start + s.head_count {
                if entry.get(entry.cell(layer, b, head)) {
                    return Err(Refusal::Duplicate { layer });
                }
            }
        }
        for b in s.first_block..s.first_block + s.block_count {
            for head in s.head_start..s.head_start + s.head_count {
                let i = entry.cell(layer, b, head);
                entry.set(i);
            }
        }
        entry.received_count += u64::from(s.block_count) * u64::from(s.head_count);
        Ok(Accepted {
            layer,
            first_block: s.first_block,
            block_count: s.block_count,
            head_start: s.head_start,
            head_count: s.head_count,
        })
    }

    /// Marks the request finished if every cell arrived and the sender's
    /// layer count matches.
    pub fn on_final(&mut self, transfer_id: u64, layers_sent: u32) -> Result<(), Refusal> {
        let entry = self
            .entries
            .get_mut(&transfer_id)
            .ok_or(Refusal::UnknownRequest(transfer_id))?;
        if entry.finished {
            return Err(Refusal::Finished(transfer_id));
        }
        if layers_sent != entry.expect.num_layers {
            return Err(Refusal::Mismatch {
                field: "layers_sent",
                expected: entry.expect.num_layers.into(),
                got: layers_sent.into(),
            });
        }
        let missing = entry.cells() - entry.received_count;
        if missing != 0 {
            return Err(Refusal::Incomplete {
                transfer_id,
                missing,
            });
        }
        entry.finished = true;
        Ok(())
    }

    /// Forgets a reservation; returns whether it existed.
    pub fn release(&mut self, transfer_id: u64) -> bool {
        self.entries.remove(&transfer_id).is_some()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wire::LayerShape;

    const HEADS: u16 = 4;

    fn expect() -> Expectation {
        Expectation {
            num_layers: 2,
            num_blocks: 3,
            block_bytes: 2 * u64::from(HEADS) * 2 * 8 * 2,
            dtype: WireDtype::Bf16,
            total_heads: HEADS,
            head_dim: 8,
            block_size: 2,
            held_blocks: 0,
        }
    }

    fn shape(
        layer: u16,
        first_block: u32,
        block_count: u32,
        head_start: u16,
        head_count: u16,
    ) -> LayerShape {
        LayerShape {
            layer,
            first_block,
            block_count,
            dtype: WireDtype::Bf16,
            head_start,
            head_count,
            total_heads: HEADS,
            head_dim: 8,
            block_size: 2,
        }
    }

    fn header(id: u64, s: LayerShape) -> LayerHeader {
        let len = s.payload_len().unwrap() as usize;
        LayerHeader::for_payload(id, s, &vec![0; len]).unwrap()
    }

    fn table() -> Reservations {
        let mut r = Reservations::new();
        r.register(1, expect()).unwrap();
        r
    }

    #[test]
    fn full_and_split_transfers_complete() {
        let mut r = table();
        r.on_layer_frame(&header(1, shape(0, 0, 3, 0, HEADS)))
            .unwrap();
        // Layer 1 in two TP halves, blocks split too.
        r.on_layer_frame(&header(1, shape(1, 0, 2, 0, 2))).unwrap();
        r.on_layer_frame(&header(1, shape(1, 2, 1, 0, 2))).unwrap();
        assert!(matches!(
            r.on_final(1, 2),
            Err(Refusal::Incomplete { missing: 6, .. })
        ));
        let a = r.on_layer_frame(&header(1, shape(1, 0, 3, 2, 2))).unwrap();
        assert_eq!(
            a,
            Accepted {
                layer: 1,
                first_block: 0,
                block_count: 3,
                head_start: 2,
                head_count: 2
            }
        );
        assert_eq!(r.on_final(1, 2), Ok(()));
        assert_eq!(
            r.on_layer_frame(&header(1, shape(0, 0, 1, 0, 1))),
            Err(Refusal::Finished(1))
        );
        assert_eq!(r.on_final(1, 2), Err(Refusal::Finished(1)));
        assert!(r.release(1));
        assert_eq!(
            r.on_layer_frame(&header(1, shape(0, 0, 1, 0, 1))),
            Err(Refusal::UnknownRequest(1))
        );
    }

    #[test]
    fn refuses_unknown_request() {
        let mut r = table();
        assert_eq!(
            r.on_layer_frame(&header(9, shape(0, 0, 1, 0, HEADS))),
            Err(Refusal::UnknownRequest(9))
        );
        assert_eq!(r.on_final(9, 2), Err(Refusal::UnknownRequest(9)));
    }

    #[test]
    fn refuses_layer_out_of_range() {
        let mut r = table();
        assert!(matches!(
            r.on_layer_frame(&header(1, shape(2, 0, 1, 0, HEADS))),
            Err(Refusal::LayerOutOfRange {
                layer: 2,
                num_layers: 2
            })
        ));
    }

    #[test]
    fn refuses_duplicates_including_overlaps() {
        let mut r = table();
        r.on_layer_frame(&header(1, shape(0, 0, 2, 0, 2))).unwrap();
        assert_eq!(
            r.on_layer_frame(&header(1, shape(0, 0, 2, 0, 2))),
            Err(Refusal::Duplicate { layer: 0 })
        );
        // Overlapping block and head ranges.
        assert_eq!(
            r.on_layer_frame(&header(1, shape(0, 1, 2, 1, 2))),
            Err(Refusal::Duplicate { layer: 0 })
        );
        // Disjoint ones are fine.
        r.on_layer_frame(&header(1, shape(0, 2, 1, 0, 2))).unwrap();
        r.on_layer_frame(&header(1, shape(0, 0, 3, 2, 2))).unwrap();
    }

    #[test]
    fn refuses_blocks_beyond_reservation() {
        let mut r = table();
        assert!(matches!(
            r.on_layer_frame(&header(1, shape(0, 2, 2, 0, HEADS))),
            Err(Refusal::BlocksOutOfRange {
                first: 2,
                end: 4,
                num_blocks: 3
            })
        ));
        assert!(matches!(
            r.on_layer_frame(&header(1, shape(0, u32::MAX, 1, 0, HEADS))),
            Err(Refusal::BlocksOutOfRange { .. })
        ));
    }

    #[test]
    fn an_fp8_reservation_takes_wider_frames_but_a_wider_one_refuses_fp8() {
        assert_eq!(WireDtype::from_code(3), Some(WireDtype::Fp8E4m3));
        assert_eq!(WireDtype::from_code(4), None);
        let mut e = expect();
        e.dtype = WireDtype::Fp8E4m3;
        e.block_bytes = WireDtype::Fp8E4m3.block_bytes(HEADS, 2, 8).unwrap();
        assert_eq!(
            e.block_bytes,
            2 * 4 * (2 * 8 + 4),
            "values, then a scale per K/V head"
        );
        let mut r = Reservations::new();
        r.register(1, e).unwrap();
        // bf16, sized as bf16: taken, to be quantized on import.
        r.on_layer_frame(&header(1, shape(0, 0, 1, 0, HEADS)))
            .unwrap();
        let mut s = shape(1, 0, 1, 0, HEADS);
        s.dtype = WireDtype::Fp8E4m3;
        r.on_layer_frame(&header(1, s)).unwrap();
        // An fp8 frame whose length is not its blocks and scales is refused.
        let mut s = shape(0, 1, 1, 0, HEADS);
        s.dtype = WireDtype::Fp8E4m3;
        let mut h = header(1, s);
        h.payload_len -= 4;
        assert!(matches!(
            r.on_layer_frame(&h),
            Err(Refusal::Mismatch {
                field: "payload_len",
                ..
            })
        ));
        // A bf16 reservation refuses fp8: it is never widened.
        let mut r = table();
        let mut s = shape(0, 0, 1, 0, HEADS);
        s.dtype = WireDtype::Fp8E4m3;
        assert!(matches!(
            r.on_layer_frame(&header(1, s)),
            Err(Refusal::Mismatch { field: "dtype", .. })
        ));
    }

    #[test]
    fn refuses_shape_mismatches() {
        let mut r = table();
        let mut s = shape(0, 0, 1, 0, HEADS);
        s.dtype = WireDtype::F16;
        assert!(matches!(
            r.on_layer_frame(&header(1, s)),
            Err(Refusal::Mismatch { field: "dtype", .. })
        ));
        let mut s = shape(0, 0, 1, 0, HEADS);
        s.head_dim = 16;
        assert!(matches!(
            r.on_layer_frame(&header(1, s)),
            Err(Refusal::Mismatch {
                field: "head_dim",
                ..
            })
        ));
        let mut s = shape(0, 0, 1, 0, HEADS);
        s.block_size = 4;
        assert!(matches!(
            r.on_layer_frame(&header(1, s)),
            Err(Refusal::Mismatch {
                field: "block_size",
                ..
            })
        ));
        let mut s = shape(0, 0, 1, 0, 2);
        s.total_heads = 2;
        assert!(matches!(
            r.on_layer_frame(&header(1, s)),
            Err(Refusal::Mismatch {
                field: "total_heads",
                ..
            })
        ));
        // A header whose payload length disagrees (the decoder would also refuse it).
        let mut h = header(1, shape(0, 0, 1, 0, HEADS));
        h.payload_len += 2;
        assert!(matches!(
            r.on_layer_frame(&h),
            Err(Refusal::Mismatch {
                field: "payload_len",
                ..
            })
        ));
        // Nothing was recorded by the refused frames.
        r.on_layer_frame(&header(1, shape(0, 0, 1, 0, HEADS)))
            .unwrap();
    }

    #[test]
    fn refuses_heads_out_of_range() {
        let mut r = table();
        let mut h = header(1, shape(0, 0, 1, 3, 1));
        h.shape.head_count = 2;
        assert!(matches!(
            r.on_layer_frame(&h),
            Err(Refusal::HeadsOutOfRange { .. })
        ));
    }

    #[test]
    fn final_checks_layer_count() {
        let mut r = table();
        r.on_layer_frame(&header(1, shape(0, 0, 3, 0, HEADS)))
            .unwrap();
        r.on_layer_frame(&header(1, shape(1, 0, 3, 0, HEADS)))
            .unwrap();
        assert!(matches!(
            r.on_final(1, 1),
            Err(Refusal::Mismatch {
                field: "layers_sent",
                ..
            })
        ));
        assert!(r.on_final(1, 2).is_ok());
    }

    #[test]
    fn registration_checks() {
        let mut r = table();
        assert_eq!(r.register(1, expect()), Err(Refusal::AlreadyRegistered(1)));
        let mut e = expect();
        e.block_bytes += 1;
        assert!(matches!(r.register(2, e), Err(Refusal::BadExpectation(_))));
        let mut e = expect();
        e.num_blocks = 0;
        assert!(matches!(r.register(2, e), Err(Refusal::BadExpectation(_))));
    }

    #[test]
    fn held_blocks_count_as_received_and_may_not_be_sent() {
        let mut r = Reservations::new();
        let held = Expectation {
            held_blocks: 2,
            ..expect()
        };
        r.register(9, held).unwrap();
        for layer in 0..2 {
            assert_eq!(
                r.on_layer_frame(&header(9, shape(layer, 1, 2, 0, HEADS))),
                Err(Refusal::HeldBlock { block: 1, held: 2 })
            );
        }
        // Only block 2 is missing: one frame per layer completes the transfer.
        assert!(matches!(
            r.on_final(9, 2),
            Err(Refusal::Incomplete { missing: 8, .. })
        ));
        for layer in 0..2 {
            r.on_layer_frame(&header(9, shape(layer, 2, 1, 0, HEADS)))
                .unwrap();
        }
        assert_eq!(r.on_final(9, 2), Ok(()));
        // Holding every block leaves nothing to receive: refused at registration.
        let all = Expectation {
            held_blocks: 3,
            ..expect()
        };
        assert!(matches!(
            Reservations::new().register(1, all),
            Err(Refusal::BadExpectation(_))
        ));
    }
}
