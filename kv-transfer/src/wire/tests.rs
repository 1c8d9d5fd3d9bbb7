use super::*;
use proptest::prelude::*;

fn shape_strategy() -> impl Strategy<Value = LayerShape> {
    (
        0u16..64,
        0u32..1000,
        1u32..4,
        0u8..3,
        1u16..5,
        1u16..17,
        1u16..9,
    )
        .prop_flat_map(
            |(layer, first_block, block_count, dt, total_heads, head_dim, block_size)| {
                (0..total_heads).prop_flat_map(move |head_start| {
                    (1..=total_heads - head_start).prop_map(move |head_count| LayerShape {
                        layer,
                        first_block,
                        block_count,
                        dtype: WireDtype::from_code(dt).unwrap(),
                        head_start,
                        head_count,
                        total_heads,
                        head_dim,
                        block_size,
                    })
                })
            },
        )
}

fn logprobs_strategy() -> impl Strategy<Value = Option<FirstLogprobs>> {
    prop::option::of(
        (
            -50f32..0.0,
            prop::collection::vec((any::<u32>(), -50f32..0.0), 0..21),
        )
            .prop_map(|(logprob, top)| FirstLogprobs { logprob, top }),
    )
}

fn frame_strategy() -> impl Strategy<Value = Frame> {
    prop_oneof![
        (any::<u64>(), shape_strategy(), any::<u8>(), any::<bool>()).prop_map(
            |(id, shape, seed, checked)| {
                let len = shape.payload_len().unwrap() as usize;
                let payload: Vec<u8> = (0..len)
                    .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
                    .collect();
                let header = if checked {
                    LayerHeader::for_payload(id, shape, &payload).unwrap()
                } else {
                    LayerHeader::unhashed(id, shape, len).unwrap()
                };
                Frame::Layer {
                    header,
                    payload: payload.into(),
                }
            }
        ),
        (
            any::<u64>(),
            any::<u32>(),
            any::<u32>(),
            any::<u32>(),
            any::<u64>(),
            logprobs_strategy(),
        )
            .prop_map(
                |(transfer_id, id, layers_sent, frames_sent, model_fingerprint, logprobs)| {
                    Frame::Final {
                        transfer_id,
                        first: FirstToken { id, logprobs },
                        layers_sent,
                        frames_sent,
                        model_fingerprint,
                    }
                }
            ),
        (any::<u64>(), "\\PC{0,40}").prop_map(|(transfer_id, reason)| Frame::Abort {
            transfer_id,
            reason
        }),
    ]
}

fn encode_all(frames: &[Frame]) -> Vec<u8> {
    let mut out = BytesMut::new();
    for f in frames {
        f.encode(&mut out);
    }
    out.to_vec()
}

/// Decodes `bytes` pushed as slices of one buffer cut at `splits`, as a
/// transport hands over its packets.
fn decode_in_pieces(bytes: &[u8], splits: &[usize]) -> (Vec<Frame>, Result<(), WireError>) {
    let mut d = FrameDecoder::new(1 << 20);
    let mut frames = Vec::new();
    let mut cuts: Vec<usize> = splits.iter().map(|s| s % (bytes.len() + 1)).collect();
    cuts.push(0);
    cuts.push(bytes.len());
    cuts.sort_unstable();
    let all = Bytes::copy_from_slice(bytes);
    for w in cuts.windows(2) {
        d.push(all.slice(w[0]..w[1]));
        loop {
            match d.next_frame() {
                Ok(Some(f)) => frames.push(f),
                Ok(None) => break,
                Err(e) => return (frames, Err(e)),
            }
        }
    }
    (frames, Ok(()))
}

proptest! {
    #[test]
    fn roundtrip_in_arbitrary_pieces(frames in prop::collection::vec(frame_strategy(), 1..6),
                                     splits in prop::collection::vec(any::<usize>(), 0..8)) {
        let bytes = encode_all(&frames);
        let (decoded, r) = decode_in_pieces(&bytes, &splits);
        prop_assert_eq!(r, Ok(()));
        prop_assert_eq!(decoded, frames);
    }

    #[test]
    fn never_panics_on_garbage(bytes in prop::collection::vec(any::<u8>(), 0..512),
                               splits in prop::collection::vec(any::<usize>(), 0..8)) {
        let _ = decode_in_pieces(&bytes, &splits);
    }

    #[test]
    fn never_panics_on_mutated_frames(frames in prop::collection::vec(frame_strategy(), 1..4),
                                      flips in prop::collection::vec((any::<usize>(), any::<u8>()), 1..4),
                                      splits in prop::collection::vec(any::<usize>(), 0..8)) {
        let mut bytes = encode_all(&frames);
        for (at, x) in flips {
            let i = at % bytes.len();
            bytes[i] ^= x;
        }
        let _ = decode_in_pieces(&bytes, &splits);
    }

    #[test]
    fn truncation_needs_more(frame in frame_strategy(), cut in any::<usize>()) {
        let bytes = encode_all(std::slice::from_ref(&frame));
        let cut = cut % bytes.len();
        let mut d = FrameDecoder::new(1 << 20);
        d.extend(&bytes[..cut]);
        prop_assert_eq!(d.next_frame(), Ok(None));
        d.extend(&bytes[cut..]);
        prop_assert_eq!(d.next_frame(), Ok(Some(frame)));
        prop_assert!(d.is_idle());
    }

    #[test]
    fn flipped_payload_byte_is_a_checksum_error(id in any::<u64>(), shape in shape_strategy(),
                                                 at in any::<usize>(), bit in 0u8..8,
                                                 splits in prop::collection::vec(any::<usize>(), 0..8)) {
        let len = shape.payload_len().unwrap() as usize;
        let payload = vec![7u8; len];
        let header = LayerHeader::for_payload(id, shape, &payload).unwrap();
        let mut bytes = encode_all(&[Frame::Layer { header, payload: payload.into() }]);
        let i = LAYER_HEADER_LEN + at % len;
        bytes[i] ^= 1 << bit;
        // In pieces: the checksum is computed as the payload arrives.
        let (frames, r) = decode_in_pieces(&bytes, &splits);
        prop_assert!(frames.is_empty());
        let is_checksum = matches!(r, Err(WireError::ChecksumMismatch { transfer_id, .. }) if transfer_id == id);
        prop_assert!(is_checksum);
    }
}

fn big_shape() -> LayerShape {
    // 4 blocks of 16 KiB (bf16, one head of 128 x 32).
    LayerShape {
        layer: 0,
        first_block: 0,
        block_count: 4,
        dtype: WireDtype::Bf16,
        head_start: 0,
        head_count: 1,
        total_heads: 1,
        head_dim: 128,
        block_size: 32,
    }
}

/// A Layer frame of `big_shape` (unchecked), its payload, and the frame's bytes in one buffer.
fn big_frame() -> (LayerHeader, Vec<u8>, Bytes) {
    let shape = big_shape();
    let payload: Vec<u8> = (0..shape.payload_len().unwrap())
        .map(|i| (i * 7) as u8)
        .collect();
    let header = LayerHeader::unhashed(5, shape, payload.len()).unwrap();
    let mut bytes = header.encode().to_vec();
    bytes.extend_from_slice(&payload);
    (header, payload, Bytes::from(bytes))
}

/// The decoder's next frame, which must be a Layer frame.
fn next_layer(d: &mut FrameDecoder) -> (LayerHeader, Payload) {
    match d.next_frame() {
        Ok(Some(Frame::Layer { header, payload })) => (header, payload),
        other => panic!("no layer frame: {other:?}"),
    }
}

fn decode_cut(all: &Bytes, cuts: impl IntoIterator<Item = usize>) -> (LayerHeader, Payload) {
    let mut d = FrameDecoder::new(1 << 20);
    let mut at = 0;
    for c in cuts.into_iter().chain([all.len()]) {
        d.push(all.slice(at..c));
        at = c;
    }
    let layer = next_layer(&mut d);
    assert!(d.is_idle());
    layer
}

#[test]
fn a_payload_is_the_pushed_buffers_not_a_copy() {
    let (header, payload, all) = big_frame();
    // The header split over two pieces, the payload over packet-sized ones.
    let (got, p) = decode_cut(&all, [30, 60, 1500, 3000, 4500, 6000]);
    assert_eq!(got, header);
    assert_eq!(got.checksum, None);
    assert_eq!(p.to_bytes(), Bytes::from(payload));
    // The 8-byte piece after the header is copied (too short to keep), the
    // others are slices of the pushed buffer.
    assert_eq!(p.parts()[0].len(), 60 - LAYER_HEADER_LEN);
    let starts: Vec<usize> = p.parts()[1..]
        .iter()
        .map(|part| part.as_ptr() as usize - all.as_ptr() as usize)
        .collect();
    assert_eq!(starts, [60, 1500, 3000, 4500, 6000]);
}

#[test]
fn a_payload_interleaved_with_other_data_is_copied_into_one_buffer() {
    let (header, payload, frame) = big_frame();
    // Packets of this frame's stream alternating with another stream's in the
    // same receive buffer: 1400-byte pieces, each followed by 1400 foreign bytes.
    let mut mixed = Vec::new();
    for chunk in frame.chunks(1400) {
        mixed.extend_from_slice(chunk);
        mixed.extend_from_slice(&[0xEE; 1400]);
    }
    let mixed = Bytes::from(mixed);
    let mut d = FrameDecoder::new(1 << 20);
    for (i, chunk) in frame.chunks(1400).enumerate() {
        d.push(mixed.slice(i * 2800..i * 2800 + chunk.len()));
    }
    let (got, p) = next_layer(&mut d);
    assert_eq!(got, header);
    assert_eq!(p.parts().len(), 1, "copied into one buffer");
    assert_eq!(p.to_bytes(), Bytes::from(payload));
    let inside = |b: &Bytes| {
        let (a, m) = (b.as_ptr() as usize, mixed.as_ptr() as usize);
        a >= m && a < m + mixed.len()
    };
    assert!(!inside(&p.parts()[0]), "not a slice of the shared buffer");
}

#[test]
fn tiny_pieces_are_copied_together_not_kept_one_by_one() {
    let (header, payload, all) = big_frame();
    // A peer cutting its data into 3-byte pieces, then one large piece.
    let (got, p) = decode_cut(&all, (LAYER_HEADER_LEN..6000).step_by(3));
    assert_eq!(got, header);
    assert_eq!(p.to_bytes(), Bytes::from(payload));
    // The tiny ones joined into one piece, the large one kept.
    assert_eq!(
        p.parts().len(),
        2,
        "{:?}",
        p.parts().iter().map(Bytes::len).collect::<Vec<_>>()
    );
}

#[test]
fn a_version_3_peer_is_understood_and_a_version_5_one_refused() {
    let (header, payload, _) = big_frame();
    let checked = LayerHeader::for_payload(5, header.shape, &payload).unwrap();
    let mut frame = checked.encode().to_vec();
    frame.extend_from_slice(&payload);
    // Version 3 sent the same frames, always checksummed.
    frame[4] = 3;
    let mut d = FrameDecoder::new(1 << 20);
    d.extend(&frame);
    let (got, p) = next_layer(&mut d);
    assert_eq!((got, p.to_bytes()), (checked, Bytes::from(payload)));
    frame[4] = 5;
    let mut d = FrameDecoder::new(1 << 20);
    d.extend(&frame);
    assert_eq!(d.next_frame(), Err(WireError::UnsupportedVersion(5)));
    assert_eq!(
        d.last_transfer_id(),
        Some(5),
        "named, so its transfer can be ended"
    );
}

#[test]
fn an_unchecked_frame_carries_no_checksum_and_nothing_else_in_its_flags() {
    let shape = LayerShape {
        layer: 1,
        first_block: 0,
        block_count: 1,
        dtype: WireDtype::Bf16,
        head_start: 0,
        head_count: 1,
        total_heads: 1,
        head_dim: 4,
        block_size: 2,
    };
    let payload = vec![3u8; shape.payload_len().unwrap() as usize];
    let header = LayerHeader::unhashed(9, shape, payload.len()).unwrap();
    let encoded = header.encode();
    assert_eq!(encoded[49], 1, "the unchecked flag");
    assert_eq!(&encoded[16..24], &[0; 8], "no checksum");
    let decode = |h: [u8; LAYER_HEADER_LEN]| {
        let mut d = FrameDecoder::new(1 << 20);
        d.extend(&h);
        d.extend(&payload);
        d.next_frame()
    };
    // A flipped payload byte goes unnoticed: nothing to check it against.
    assert!(matches!(decode(encoded), Ok(Some(Frame::Layer { .. }))));
    let mut with_sum = encoded;
    with_sum[16] = 1;
    assert_eq!(
        decode(with_sum),
        Err(WireError::BadHeader("a checksum on an unchecked frame"))
    );
    let mut unknown_flag = encoded;
    unknown_flag[49] = 3;
    assert_eq!(decode(unknown_flag), Err(WireError::ReservedNotZero));
    let mut reserved = encoded;
    reserved[51] = 1;
    assert_eq!(decode(reserved), Err(WireError::ReservedNotZero));
}

#[test]
fn refuses_oversized_payload_before_buffering_it() {
    let shape = LayerShape {
        layer: 0,
        first_block: 0,
        block_count: 1024,
        dtype: WireDtype::Bf16,
        head_start: 0,
        head_count: 8,
        total_heads: 8,
        head_dim: 128,
        block_size: 16,
    };
    let payload = vec![0u8; shape.payload_len().unwrap() as usize];
    let header = LayerHeader::for_payload(1, shape, &payload).unwrap();
    let mut d = FrameDecoder::new(1 << 20);
    d.extend(&header.encode());
    assert!(matches!(
        d.next_frame(),
        Err(WireError::PayloadTooLarge { .. })
    ));
    // Poisoned: stays an error.
    assert!(d.next_frame().is_err());
}

#[test]
fn refuses_inconsistent_payload_length() {
    let shape = LayerShape {
        layer: 0,
        first_block: 0,
        block_count: 1,
        dtype: WireDtype::F32,
        head_start: 0,
        head_count: 1,
        total_heads: 1,
        head_dim: 2,
        block_size: 2,
    };
    let payload = vec![0u8; 32];
    let mut header = LayerHeader::for_payload(1, shape, &payload).unwrap();
    header.payload_len = 16;
    let mut d = FrameDecoder::new(1 << 20);
    d.extend(&header.encode());
    assert!(matches!(d.next_frame(), Err(WireError::BadHeader(_))));
}

#[test]
fn garbage_fails_on_first_bytes() {
    let mut d = FrameDecoder::new(1 << 20);
    d.extend(b"GET");
    assert!(matches!(d.next_frame(), Err(WireError::BadMagic(_))));
}

#[test]
fn long_abort_reason_is_cut() {
    let reason = "é".repeat(MAX_REASON_LEN);
    let bytes = encode_abort(3, &reason);
    let mut d = FrameDecoder::new(16);
    d.extend(&bytes);
    match d.next_frame() {
        Ok(Some(Frame::Abort {
            transfer_id: 3,
            reason,
        })) => assert!(reason.len() <= MAX_REASON_LEN),
        other => panic!("unexpected {other:?}"),
    }
}

fn final_with(top: usize) -> Vec<u8> {
    let first = FirstToken {
        id: 9,
        logprobs: Some(FirstLogprobs {
            logprob: -0.5,
            top: (0..top as u32).map(|t| (t, -1.0 - t as f32)).collect(),
        }),
    };
    encode_final(4, &first, 2, 6, 0).to_vec()
}

#[test]
fn final_frame_carries_the_first_tokens_logprobs() {
    let bytes = final_with(3);
    assert_eq!(bytes.len(), FINAL_LEN + 3 * 8);
    let mut d = FrameDecoder::new(16);
    d.extend(&bytes);
    let Ok(Some(Frame::Final { first, .. })) = d.next_frame() else {
        panic!("not a final frame");
    };
    assert_eq!(first.id, 9);
    let l = first.logprobs.expect("logprobs");
    assert_eq!(l.logprob, -0.5);
    assert_eq!(l.top, vec![(0, -1.0), (1, -2.0), (2, -3.0)]);
    // None asked: none carried, and the frame is the fixed part only.
    let plain = encode_final(
        4,
        &FirstToken {
            id: 9,
            logprobs: None,
        },
        2,
        6,
        0,
    );
    assert_eq!(plain.len(), FINAL_LEN);
}

#[test]
fn final_frame_cuts_top_logprobs_at_the_limit() {
    let bytes = final_with(MAX_TOP_LOGPROBS + 5);
    assert_eq!(bytes.len(), FINAL_LEN + MAX_TOP_LOGPROBS * 8);
    let mut d = FrameDecoder::new(16);
    d.extend(&bytes);
    let Ok(Some(Frame::Final { first, .. })) = d.next_frame() else {
        panic!("not a final frame");
    };
    assert_eq!(
        first.logprobs.expect("logprobs").top.len(),
        MAX_TOP_LOGPROBS
    );
}

#[test]
fn final_frame_refuses_a_bad_logprobs_section() {
    let decode = |bytes: &[u8]| {
        let mut d = FrameDecoder::new(16);
        d.extend(bytes);
        d.next_frame()
    };
    let mut flag = final_with(0);
    flag[36] = 2;
    assert_eq!(decode(&flag), Err(WireError::BadLogprobsFlag(2)));
    let mut reserved = final_with(0);
    reserved[37] = 1;
    assert_eq!(decode(&reserved), Err(WireError::ReservedNotZero));
    // A count above the limit fails before any of it is awaited.
    let mut many = final_with(0);
    many[38..40].copy_from_slice(&(MAX_TOP_LOGPROBS as u16 + 1).to_le_bytes());
    assert_eq!(
        decode(&many),
        Err(WireError::TooManyLogprobs(MAX_TOP_LOGPROBS + 1))
    );
    // Top entries without the flag.
    let mut unflagged = final_with(1);
    unflagged[36] = 0;
    assert_eq!(decode(&unflagged), Err(WireError::TooManyLogprobs(1)));
}
