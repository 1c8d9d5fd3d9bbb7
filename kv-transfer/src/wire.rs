//! The KV transfer wire format: frames, their encoder, and a sans-I/O
//! incremental decoder.
//!
//! (Long on purpose: most of it is the format's specification below, and
//! the encoder and decoder are one unit that must change together; the
//! tests are in `wire/tests.rs`.)
//!
//! A prefill node pushes a request's KV cache to a decode node as a sequence
//! of frames on one or more QUIC unidirectional streams. Every frame starts
//! with the same 16-byte prefix; the kind decides what follows. All integers
//! are **little-endian** (every host we target is little-endian, so encoding
//! is a plain store). Reserved bytes must be zero and are checked, so a later
//! version can give them a meaning.
//!
//! # Common prefix (16 bytes)
//!
//! | offset | size | field        | notes                                   |
//! | ------ | ---- | ------------ | --------------------------------------- |
//! | 0      | 4    | magic        | ASCII `TDKV`                            |
//! | 4      | 1    | version      | `4` (3: no unchecked flag; 2: no logprobs in Final; 1: no model fingerprint) |
//! | 5      | 1    | kind         | `1` Layer, `2` Final, `3` Abort         |
//! | 6      | 2    | reserved     | zero                                    |
//! | 8      | 8    | transfer id  | u64                                     |
//!
//! The transfer id names one request's transfer on the wire: the decode node
//! picks it when it reserves the blocks and hands it out in
//! `KvTarget.transfer_id` (it is not the router's string request id).
//!
//! # Layer frame (52-byte header, then the payload)
//!
//! | offset | size | field         | notes                                          |
//! | ------ | ---- | ------------- | ---------------------------------------------- |
//! | 0      | 16   | prefix        | kind = 1                                       |
//! | 16     | 8    | checksum      | u64, xxh3-64 (seed 0) of the payload; 0 if unchecked |
//! | 24     | 4    | payload len   | u32, bytes that follow the header              |
//! | 28     | 4    | first block   | u32, index within the request's reservation    |
//! | 32     | 4    | block count   | u32, >= 1                                      |
//! | 36     | 2    | layer         | u16                                            |
//! | 38     | 2    | head start    | u16, first KV head carried                     |
//! | 40     | 2    | head count    | u16, >= 1; `head start + head count <= total`  |
//! | 42     | 2    | total heads   | u16, the model's KV heads                      |
//! | 44     | 2    | head dim      | u16, >= 1                                      |
//! | 46     | 2    | block size    | u16, tokens per block, >= 1                    |
//! | 48     | 1    | dtype         | `0` f32, `1` bf16, `2` f16, `3` fp8 e4m3       |
//! | 49     | 1    | flags         | bit 0: unchecked (no checksum); others zero    |
//! | 50     | 2    | reserved      | zero                                           |
//! | 52     | len  | payload       | `block count` blocks, concatenated             |
//!
//! The payload length must equal `block_count * block_bytes`, where
//! `block_bytes` is `2 * head_count * block_size * head_dim * dtype_size`
//! (f32, bf16, f16) or, for fp8 e4m3, `2 * head_count * (block_size *
//! head_dim + 4)`: the e4m3 values, then the **scales section** of the block,
//! one f32 per (K or V, carried head), `[K heads][V heads]` (see
//! `tandem_engine::kv_quant`). A receiver that predates code `3` refuses such
//! frames as an unknown dtype (the frame's error names the code), so fp8
//! needs no new version: old peers fail clearly, never misread. Each
//! block is laid out exactly as the engine's cache block
//! (`[K: head][slot][dim]` then `[V: head][slot][dim]`) restricted to the
//! carried heads, so a tensor-parallel rank ships its own cache blocks
//! unchanged and a full-head frame (`head start = 0`, `head count = total`)
//! is a verbatim copy of `export_layer`'s bytes.
//!
//! An **unchecked** frame (flag bit 0) carries no checksum: its checksum
//! field is zero and the receiver verifies nothing. QUIC authenticates every
//! packet (AEAD), so on it the checksum guards only against a bug in the
//! sender's or the receiver's framing, and costs a pass over every byte on
//! both sides; senders leave it out unless asked (`SenderConfig`). The flag
//! came with version 4: a receiver accepts versions 3 and 4 (a version-3
//! sender never sets it), and a version-3 receiver refuses a version-4 peer
//! by its version, ending the transfer with a reason that says so.
//!
//! # Final frame (44 bytes + 8 per top log probability)
//!
//! | offset | size | field        | notes                                         |
//! | ------ | ---- | ------------ | --------------------------------------------- |
//! | 0      | 16   | prefix       | kind = 2                                      |
//! | 16     | 4    | first token  | u32, the token prefill sampled                |
//! | 20     | 4    | layers sent  | u32                                           |
//! | 24     | 4    | frames sent  | u32, Layer frames of this request, all lanes  |
//! | 28     | 8    | model        | u64, the sender's model fingerprint digest    |
//! | 36     | 1    | logprobs     | `0` none (not asked), `1` present             |
//! | 37     | 1    | reserved     | zero                                          |
//! | 38     | 2    | top count    | u16, at most [`MAX_TOP_LOGPROBS`]; 0 if none  |
//! | 40     | 4    | logprob      | f32, the first token's; 0 if none             |
//! | 44     | 8n   | top          | `top count` × (u32 token, f32 logprob)        |
//!
//! `model` is `ModelFingerprint::digest` of what the
//! prefill node serves (`tandem_cluster::fingerprint`), 0 when the sender
//! does not know it; a receiver configured with its own refuses a transfer
//! whose Final names another model, so KV of one model is never decoded by
//! another even if the router paired the wrong nodes. `frames sent` lets a receiver whose request was striped
//! over several streams hold the Final back until every Layer frame landed.
//! The log probabilities are the first token's when the request asked for
//! them (its `logprobs`, most likely first), so the decode node streams the
//! first token complete, whenever the Final arrives.
//!
//! # Abort frame (18 bytes + reason)
//!
//! | offset | size | field        | notes                                   |
//! | ------ | ---- | ------------ | --------------------------------------- |
//! | 0      | 16   | prefix       | kind = 3                                |
//! | 16     | 2    | reason len   | u16, at most [`MAX_REASON_LEN`]          |
//! | 18     | len  | reason       | UTF-8                                   |
//!
//! # Decoding
//!
//! [`FrameDecoder`] is fed bytes in whatever pieces the transport delivers
//! and yields whole frames. It validates every header field before it
//! accepts a payload length, refuses payloads above its configured maximum
//! (so a peer cannot make it allocate without bound), and checks the
//! checksum (if any) before handing the payload out. Incomplete input is
//! never an error: it is "need more" (`Ok(None)`). Pieces given as [`Bytes`]
//! are not copied: a Layer frame's [`Payload`] is the received buffers'
//! slices, and the one copy is the one into the cache.

use std::collections::VecDeque;

use bytes::{Buf, BufMut, Bytes, BytesMut};
use xxhash_rust::xxh3::{Xxh3, xxh3_64};

/// The four bytes every frame starts with.
pub const MAGIC: [u8; 4] = *b"TDKV";
/// The wire format version this crate sends.
pub const VERSION: u8 = 4;
/// The oldest version it still decodes (3: every Layer frame checksummed).
pub const OLDEST_VERSION: u8 = 3;
/// Bytes in the common prefix.
pub const PREFIX_LEN: usize = 16;
/// Bytes in a Layer frame's header (payload excluded).
pub const LAYER_HEADER_LEN: usize = 52;
/// Bytes in a Final frame before its top log probabilities.
pub const FINAL_LEN: usize = 44;
/// Most top log probabilities a Final frame carries.
pub const MAX_TOP_LOGPROBS: usize = 256;
/// Bytes in an Abort frame before its reason.
pub const ABORT_HEADER_LEN: usize = 18;
/// Longest abort reason, in bytes.
pub const MAX_REASON_LEN: usize = 1024;
/// A decoder's default payload limit: 64 MiB.
pub const DEFAULT_MAX_PAYLOAD: u32 = 64 << 20;

const KIND_LAYER: u8 = 1;
const KIND_FINAL: u8 = 2;
const KIND_ABORT: u8 = 3;
/// Layer header flag: the frame carries no checksum.
const FLAG_UNCHECKED: u8 = 1;

/// Element type of the KV cache on the wire.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum WireDtype {
    /// 32-bit float.
    F32 = 0,
    /// bfloat16.
    Bf16 = 1,
    /// IEEE half.
    F16 = 2,
    /// FP8 e4m3 with an f32 scale per (block, K or V, head) after each block's values.
    Fp8E4m3 = 3,
}

impl WireDtype {
    /// Bytes per element (fp8 blocks add their scales: see [`block_bytes`](Self::block_bytes)).
    pub fn size(self) -> usize {
        match self {
            WireDtype::F32 => 4,
            WireDtype::Bf16 | WireDtype::F16 => 2,
            WireDtype::Fp8E4m3 => 1,
        }
    }

    /// Bytes of one block (K and V) of `heads` heads, with an fp8 block's
    /// scales section; `None` on overflow.
    pub fn block_bytes(self, heads: u16, block_size: u16, head_dim: u16) -> Option<u64> {
        let run = u64::from(block_size).checked_mul(u64::from(head_dim))?;
        let per_head = match self {
            WireDtype::Fp8E4m3 => run.checked_add(4)?,
            d => run.checked_mul(d.size() as u64)?,
        };
        2u64.checked_mul(u64::from(heads))?.checked_mul(per_head)
    }

    /// Whether a frame in this dtype can be imported into a cache of
    /// `cache`: the same dtype, or a wider one into an fp8 cache (the
    /// receiver quantizes it). fp8 never widens into a wider cache: its
    /// values are already rounded, and the receiver would hold less than it
    /// advertises.
    pub fn imports_into(self, cache: WireDtype) -> bool {
        self == cache || cache == WireDtype::Fp8E4m3
    }

    /// The dtype a wire code names, if any.
    pub fn from_code(code: u8) -> Option<Self> {
        match code {
            0 => Some(WireDtype::F32),
            1 => Some(WireDtype::Bf16),
            2 => Some(WireDtype::F16),
            3 => Some(WireDtype::Fp8E4m3),
            _ => None,
        }
    }
}

/// What a Layer frame carries: which request, layer, blocks and heads, in
/// which shape, and the payload's length and checksum.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct LayerHeader {
    /// The request the KV belongs to.
    pub transfer_id: u64,
    /// Which layer, blocks and heads, in which shape.
    pub shape: LayerShape,
    /// Payload bytes.
    pub payload_len: u32,
    /// xxh3-64 of the payload; `None` for an unchecked frame.
    pub checksum: Option<u64>,
}

/// The shape of a Layer frame, without the payload-derived fields; what a
/// sender describes and [`LayerHeader::for_payload`] completes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct LayerShape {
    /// Decoder layer.
    pub layer: u16,
    /// First block, as an index within the request's reservation.
    pub first_block: u32,
    /// Consecutive blocks carried.
    pub block_count: u32,
    /// Element type.
    pub dtype: WireDtype,
    /// First KV head carried.
    pub head_start: u16,
    /// KV heads carried.
    pub head_count: u16,
    /// The model's KV heads.
    pub total_heads: u16,
    /// Width of a head.
    pub head_dim: u16,
    /// Tokens per block.
    pub block_size: u16,
}

impl LayerShape {
    /// Bytes of one block restricted to the carried heads, or `None` on overflow.
    pub fn block_bytes(&self) -> Option<u64> {
        self.dtype
            .block_bytes(self.head_count, self.block_size, self.head_dim)
    }

    /// Payload bytes this shape implies, or `None` on overflow.
    pub fn payload_len(&self) -> Option<u64> {
        self.block_bytes()?.checked_mul(u64::from(self.block_count))
    }
}

impl LayerHeader {
    /// The header for `payload` in `shape`, with length and checksum computed.
    pub fn for_payload(
        transfer_id: u64,
        shape: LayerShape,
        payload: &[u8],
    ) -> Result<Self, WireError> {
        let mut header = Self::unhashed(transfer_id, shape, payload.len())?;
        header.checksum = Some(xxh3_64(payload));
        Ok(header)
    }

    /// The header for a payload of `len` bytes in `shape`, validated, without
    /// a checksum: an unchecked frame, or one whose sender hashes the payload
    /// elsewhere (on the connection's task, in parallel with other connections).
    pub fn unhashed(transfer_id: u64, shape: LayerShape, len: usize) -> Result<Self, WireError> {
        let payload_len = u32::try_from(len).map_err(|_| WireError::PayloadTooLarge {
            len: len as u64,
            max: u32::MAX,
        })?;
        let header = LayerHeader {
            transfer_id,
            shape,
            payload_len,
            checksum: None,
        };
        header.validate()?;
        Ok(header)
    }

    /// Checks the fields against each other (not the payload).
    pub fn validate(&self) -> Result<(), WireError> {
        let bad = |what: &'static str| Err(WireError::BadHeader(what));
        if self.shape.block_count == 0 {
            return bad("block count is zero");
        }
        if self.shape.head_count == 0 {
            return bad("head count is zero");
        }
        if u32::from(self.shape.head_start) + u32::from(self.shape.head_count)
            > u32::from(self.shape.total_heads)
        {
            return bad("head range exceeds total heads");
        }
        if self.shape.head_dim == 0 {
            return bad("head dim is zero");
        }
        if self.shape.block_size == 0 {
            return bad("block size is zero");
        }
        if self.shape.payload_len() != Some(u64::from(self.payload_len)) {
            return bad("payload length does not match the shape");
        }
        Ok(())
    }

    /// The 52 header bytes.
    pub fn encode(&self) -> [u8; LAYER_HEADER_LEN] {
        let mut out = [0u8; LAYER_HEADER_LEN];
        let mut b = &mut out[..];
        put_prefix(&mut b, KIND_LAYER, self.transfer_id);
        b.put_u64_le(self.checksum.unwrap_or(0));
        b.put_u32_le(self.payload_len);
        b.put_u32_le(self.shape.first_block);
        b.put_u32_le(self.shape.block_count);
        b.put_u16_le(self.shape.layer);
        b.put_u16_le(self.shape.head_start);
        b.put_u16_le(self.shape.head_count);
        b.put_u16_le(self.shape.total_heads);
        b.put_u16_le(self.shape.head_dim);
        b.put_u16_le(self.shape.block_size);
        b.put_u8(self.shape.dtype as u8);
        b.put_u8(if self.checksum.is_some() {
            0
        } else {
            FLAG_UNCHECKED
        });
        b.put_bytes(0, 2);
        out
    }
}

/// The first token of a request, as the prefill node sampled it.
#[derive(Debug, Clone, PartialEq)]
pub struct FirstToken {
    /// The token.
    pub id: u32,
    /// Its log probabilities, when the request asked for them.
    pub logprobs: Option<FirstLogprobs>,
}

/// The first token's log probabilities.
#[derive(Debug, Clone, PartialEq)]
pub struct FirstLogprobs {
    /// The token's own.
    pub logprob: f32,
    /// The most likely tokens and theirs, most likely first; at most
    /// [`MAX_TOP_LOGPROBS`] (more are cut when encoding).
    pub top: Vec<(u32, f32)>,
}

/// A Layer frame's payload: the blocks' bytes as the pieces they arrived
/// in (slices of the transport's receive buffers, not copied).
#[derive(Debug, Clone, Default)]
pub struct Payload {
    parts: Vec<Bytes>,
    len: usize,
}

impl Payload {
    /// Bytes in all parts.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether it holds no byte.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The pieces, in order; none is empty.
    pub fn parts(&self) -> &[Bytes] {
        &self.parts
    }

    /// The bytes in one buffer: the part itself when there is one, else a copy.
    pub fn to_bytes(&self) -> Bytes {
        match &self.parts[..] {
            [] => Bytes::new(),
            [one] => one.clone(),
            parts => {
                let mut out = BytesMut::with_capacity(self.len);
                for p in parts {
                    out.extend_from_slice(p);
                }
                out.freeze()
            }
        }
    }

    fn push(&mut self, part: Bytes) {
        if !part.is_empty() {
            self.len += part.len();
            self.parts.push(part);
        }
    }
}

impl From<Bytes> for Payload {
    fn from(b: Bytes) -> Self {
        let mut p = Payload::default();
        p.push(b);
        p
    }
}

impl From<Vec<u8>> for Payload {
    fn from(v: Vec<u8>) -> Self {
        Bytes::from(v).into()
    }
}

/// Equal bytes, however they are cut into parts.
impl PartialEq for Payload {
    fn eq(&self, other: &Self) -> bool {
        self.len == other.len
            && self
                .parts
                .iter()
                .flat_map(|p| p.iter())
                .eq(other.parts.iter().flat_map(|p| p.iter()))
    }
}

impl Eq for Payload {}

/// One decoded frame.
#[derive(Debug, Clone, PartialEq)]
pub enum Frame {
    /// Some blocks of one layer.
    Layer {
        /// What the payload is.
        header: LayerHeader,
        /// The blocks' bytes, checksum (if any) verified.
        payload: Payload,
    },
    /// Every Layer frame of the request has been sent.
    Final {
        /// The request.
        transfer_id: u64,
        /// The first token prefill sampled.
        first: FirstToken,
        /// Layers sent.
        layers_sent: u32,
        /// Layer frames sent, over all of the request's streams.
        frames_sent: u32,
        /// The sender's model fingerprint digest (0: unknown).
        model_fingerprint: u64,
    },
    /// The sender gives the request up.
    Abort {
        /// The request.
        transfer_id: u64,
        /// Why, for logs.
        reason: String,
    },
}

impl Frame {
    /// The request this frame belongs to.
    pub fn transfer_id(&self) -> u64 {
        match self {
            Frame::Layer { header, .. } => header.transfer_id,
            Frame::Final { transfer_id, .. } | Frame::Abort { transfer_id, .. } => *transfer_id,
        }
    }

    /// Appends the encoded frame to `out`. A Layer frame's header must match
    /// its payload (use [`LayerHeader::for_payload`]); an abort reason longer
    /// than [`MAX_REASON_LEN`] is cut at a character boundary.
    pub fn encode(&self, out: &mut BytesMut) {
        match self {
            Frame::Layer { header, payload } => {
                out.extend_from_slice(&header.encode());
                for p in payload.parts() {
                    out.extend_from_slice(p);
                }
            }
            Frame::Final {
                transfer_id,
                first,
                layers_sent,
                frames_sent,
                model_fingerprint,
            } => {
                out.extend_from_slice(&encode_final(
                    *transfer_id,
                    first,
                    *layers_sent,
                    *frames_sent,
                    *model_fingerprint,
                ));
            }
            Frame::Abort {
                transfer_id,
                reason,
            } => {
                out.extend_from_slice(&encode_abort(*transfer_id, reason));
            }
        }
    }
}

/// The bytes of a Final frame; top log probabilities beyond
/// [`MAX_TOP_LOGPROBS`] are cut.
pub fn encode_final(
    transfer_id: u64,
    first: &FirstToken,
    layers_sent: u32,
    frames_sent: u32,
    model_fingerprint: u64,
) -> Bytes {
    let top = first
        .logprobs
        .as_ref()
        .map_or(&[][..], |l| &l.top[..l.top.len().min(MAX_TOP_LOGPROBS)]);
    let mut out = BytesMut::with_capacity(FINAL_LEN + 8 * top.len());
    put_prefix(&mut out, KIND_FINAL, transfer_id);
    out.put_u32_le(first.id);
    out.put_u32_le(layers_sent);
    out.put_u32_le(frames_sent);
    out.put_u64_le(model_fingerprint);
    out.put_u8(u8::from(first.logprobs.is_some()));
    out.put_u8(0);
    // At most MAX_TOP_LOGPROBS, within u16.
    out.put_u16_le(top.len() as u16);
    out.put_f32_le(first.logprobs.as_ref().map_or(0.0, |l| l.logprob));
    for &(token, logprob) in top {
        out.put_u32_le(token);
        out.put_f32_le(logprob);
    }
    out.freeze()
}

/// The bytes of an Abort frame; the reason is cut to [`MAX_REASON_LEN`] bytes
/// at a character boundary.
pub fn encode_abort(transfer_id: u64, reason: &str) -> Bytes {
    let reason = truncate_utf8(reason, MAX_REASON_LEN);
    let mut out = BytesMut::with_capacity(ABORT_HEADER_LEN + reason.len());
    put_prefix(&mut out, KIND_ABORT, transfer_id);
    // The cut above keeps the length within u16.
    out.put_u16_le(reason.len() as u16);
    out.extend_from_slice(reason.as_bytes());
    out.freeze()
}

fn truncate_utf8(s: &str, max: usize) -> &str {
    if s.len() <= max {
        return s;
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

fn put_prefix(b: &mut impl BufMut, kind: u8, transfer_id: u64) {
    b.put_slice(&MAGIC);
    b.put_u8(VERSION);
    b.put_u8(kind);
    b.put_u16_le(0);
    b.put_u64_le(transfer_id);
}

/// Why bytes could not be decoded. Every variant is final for the stream:
/// the decoder does not resynchronise.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum WireError {
    /// The frame does not start with [`MAGIC`].
    #[error("bad magic {0:02x?}")]
    BadMagic([u8; 4]),
    /// A version this decoder does not speak.
    #[error(
        "KV wire version {0} from the peer, this node speaks {OLDEST_VERSION} to {VERSION} (nodes of different releases)"
    )]
    UnsupportedVersion(u8),
    /// An unknown frame kind.
    #[error("unknown frame kind {0}")]
    UnknownKind(u8),
    /// An unknown dtype code.
    #[error("unknown dtype code {0}")]
    UnknownDtype(u8),
    /// Reserved bytes were not zero.
    #[error("reserved bytes are not zero")]
    ReservedNotZero,
    /// Header fields contradict each other.
    #[error("bad layer header: {0}")]
    BadHeader(&'static str),
    /// A payload above the decoder's limit.
    #[error("payload of {len} bytes exceeds the limit of {max}")]
    PayloadTooLarge {
        /// Announced length.
        len: u64,
        /// The limit.
        max: u32,
    },
    /// The payload does not hash to the header's checksum.
    #[error(
        "checksum mismatch for transfer {transfer_id} layer {layer}: header {expected:#018x}, payload {actual:#018x}"
    )]
    ChecksumMismatch {
        /// The request.
        transfer_id: u64,
        /// The layer.
        layer: u16,
        /// From the header.
        expected: u64,
        /// Of the payload.
        actual: u64,
    },
    /// An abort reason above [`MAX_REASON_LEN`].
    #[error("abort reason of {0} bytes is too long")]
    ReasonTooLong(usize),
    /// An abort reason that is not UTF-8.
    #[error("abort reason is not UTF-8")]
    ReasonNotUtf8,
    /// A Final frame's logprobs flag other than 0 or 1.
    #[error("final frame logprobs flag {0} (0 or 1)")]
    BadLogprobsFlag(u8),
    /// A Final frame with more top log probabilities than
    /// [`MAX_TOP_LOGPROBS`], or some without its logprobs flag.
    #[error(
        "final frame with {0} top log probabilities (at most {MAX_TOP_LOGPROBS}, none without the flag)"
    )]
    TooManyLogprobs(usize),
}

/// Where the decoder is within the current frame.
enum State {
    /// Waiting for a header.
    Header,
    /// Header parsed; the payload's pieces taken so far, hashed as they are
    /// taken (while they are in cache) when the frame is checked. Pieces
    /// shorter than [`KEEP_PIECES_FROM`] are copied into `small` (which
    /// becomes one piece) rather than kept.
    Payload {
        header: LayerHeader,
        payload: Payload,
        small: BytesMut,
        hasher: Option<Box<Xxh3>>,
    },
}

/// The shortest received piece a payload keeps as it is (pinning its
/// packet's buffer); shorter ones are copied. A data packet carries a piece
/// of a datagram's size (1.4 KiB on a 1500-byte MTU path, more on others),
/// so this copies only the pieces at frame boundaries in a real transfer,
/// while a peer that cuts its data into tiny stream frames cannot make a
/// frame of n bytes cost more than about n / 1 KiB pieces.
const KEEP_PIECES_FROM: usize = 1024;

/// Bytes between two pieces that still count as one run of a buffer: a
/// packet's header and the previous one's tag (tens of bytes), not another
/// stream's data.
const RUN_GAP: usize = 256;

/// The least average run a payload keeps its pieces for. A frame whose pieces
/// sit in runs this short was interleaved packet by packet with other
/// streams' data in the same receive buffers; keeping it would keep that data
/// alive too, as long as the frame waits for its import (up to as many times
/// the frame's size as streams shared the connection), so it is copied into
/// one buffer instead, as every frame once was.
const KEEP_RUNS_FROM: usize = 16 * 1024;

/// `payload` as it is, or in one buffer when its pieces are scattered
/// ([`KEEP_RUNS_FROM`]).
fn compact_if_scattered(payload: Payload) -> Payload {
    let runs = 1 + payload
        .parts
        .windows(2)
        .filter(|w| {
            let end = w[0].as_ptr() as usize + w[0].len();
            let next = w[1].as_ptr() as usize;
            next < end || next - end > RUN_GAP
        })
        .count();
    if payload.parts.len() > 1 && payload.len < KEEP_RUNS_FROM * runs {
        Payload::from(payload.to_bytes())
    } else {
        payload
    }
}

impl std::fmt::Debug for State {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            State::Header => f.write_str("Header"),
            State::Payload {
                header,
                payload,
                small,
                ..
            } => f
                .debug_struct("Payload")
                .field("header", header)
                .field("have", &(payload.len() + small.len()))
                .finish(),
        }
    }
}

/// A sans-I/O incremental frame decoder. Feed it bytes with
/// [`push`](Self::push) (no copy) or [`extend`](Self::extend), take frames
/// with [`next_frame`](Self::next_frame).
///
/// After an error the decoder is poisoned: it keeps returning that error.
#[derive(Debug)]
pub struct FrameDecoder {
    /// Received pieces not yet taken into a frame, in order; none empty.
    input: VecDeque<Bytes>,
    /// Bytes in `input`.
    input_len: usize,
    state: State,
    max_payload: u32,
    last_transfer_id: Option<u64>,
    error: Option<WireError>,
}

impl FrameDecoder {
    /// A decoder refusing payloads above `max_payload` bytes.
    pub fn new(max_payload: u32) -> Self {
        FrameDecoder {
            input: VecDeque::new(),
            input_len: 0,
            state: State::Header,
            max_payload,
            last_transfer_id: None,
            error: None,
        }
    }

    /// Appends received bytes; a payload keeps `data` itself, not a copy.
    pub fn push(&mut self, data: Bytes) {
        if self.error.is_none() && !data.is_empty() {
            self.input_len += data.len();
            self.input.push_back(data);
        }
    }

    /// Appends a copy of received bytes.
    pub fn extend(&mut self, data: &[u8]) {
        self.push(Bytes::copy_from_slice(data));
    }

    /// Bytes buffered but not yet returned as frames; nonzero at the end of a
    /// stream means the stream was truncated.
    pub fn buffered(&self) -> usize {
        let partial = match &self.state {
            State::Header => 0,
            State::Payload { payload, small, .. } => payload.len() + small.len(),
        };
        self.input_len + partial
    }

    /// Whether the decoder sits between frames with nothing buffered.
    pub fn is_idle(&self) -> bool {
        matches!(self.state, State::Header) && self.input_len == 0
    }

    /// The request id of the last frame whose header passed validation.
    pub fn last_transfer_id(&self) -> Option<u64> {
        self.last_transfer_id
    }

    /// The next whole frame, `Ok(None)` when more bytes are needed, or the
    /// error that poisons the stream.
    pub fn next_frame(&mut self) -> Result<Option<Frame>, WireError> {
        if let Some(e) = &self.error {
            return Err(e.clone());
        }
        let r = self.step();
        if let Err(e) = &r {
            self.error = Some(e.clone());
            self.input.clear();
            self.input_len = 0;
            self.state = State::Header;
        }
        r
    }

    /// The first `n` buffered bytes in one slice, or `None` while fewer have
    /// arrived. Pieces shorter than `n` at the front are joined (a header's
    /// worth of bytes, never a payload).
    fn front(&mut self, n: usize) -> Option<&[u8]> {
        if self.input_len < n {
            return None;
        }
        if self.input.front().map_or(0, Bytes::len) < n {
            let mut joined = BytesMut::with_capacity(n);
            while joined.len() < n {
                let Some(piece) = self.input.front_mut() else {
                    break;
                };
                let take = (n - joined.len()).min(piece.len());
                joined.extend_from_slice(&piece[..take]);
                piece.advance(take);
                if piece.is_empty() {
                    self.input.pop_front();
                }
            }
            self.input.push_front(joined.freeze());
        }
        self.input.front().map(|f| &f[..n])
    }

    /// Drops the first `n` buffered bytes (at most what [`front`](Self::front) returned).
    fn consume(&mut self, mut n: usize) {
        self.input_len -= n;
        while n > 0 {
            let Some(piece) = self.input.front_mut() else {
                return;
            };
            if piece.len() > n {
                piece.advance(n);
                return;
            }
            n -= piece.len();
            self.input.pop_front();
        }
    }

    fn step(&mut self) -> Result<Option<Frame>, WireError> {
        if let State::Header = self.state {
            let Some(p) = self.front(PREFIX_LEN) else {
                // Check what we have early so garbage fails fast.
                let mut m = [0u8; 4];
                let n = self.input_len.min(4);
                for (slot, byte) in m.iter_mut().zip(self.input.iter().flatten()).take(n) {
                    *slot = *byte;
                }
                if m[..n] != MAGIC[..n] {
                    return Err(WireError::BadMagic(m));
                }
                return Ok(None);
            };
            let magic = [p[0], p[1], p[2], p[3]];
            if magic != MAGIC {
                return Err(WireError::BadMagic(magic));
            }
            let transfer_id = (&p[8..16]).get_u64_le();
            let (version, kind, reserved) = (p[4], p[5], [p[6], p[7]]);
            if !(OLDEST_VERSION..=VERSION).contains(&version) {
                // Named, so the receiver ends that transfer with this reason
                // (a peer of another version) instead of letting it time out.
                self.last_transfer_id = Some(transfer_id);
                return Err(WireError::UnsupportedVersion(version));
            }
            if reserved != [0, 0] {
                return Err(WireError::ReservedNotZero);
            }
            match kind {
                KIND_LAYER => {
                    let max_payload = self.max_payload;
                    let Some(h) = self.front(LAYER_HEADER_LEN) else {
                        return Ok(None);
                    };
                    let header = parse_layer_header(h, transfer_id, max_payload)?;
                    self.last_transfer_id = Some(transfer_id);
                    self.consume(LAYER_HEADER_LEN);
                    self.state = State::Payload {
                        header,
                        payload: Payload::default(),
                        small: BytesMut::new(),
                        hasher: header.checksum.map(|_| Box::new(Xxh3::new())),
                    };
                }
                KIND_FINAL => {
                    let Some(f) = self.front(FINAL_LEN) else {
                        return Ok(None);
                    };
                    let mut b = &f[PREFIX_LEN..FINAL_LEN];
                    let first_token = b.get_u32_le();
                    let layers_sent = b.get_u32_le();
                    let frames_sent = b.get_u32_le();
                    let model_fingerprint = b.get_u64_le();
                    let has_logprobs = b.get_u8();
                    let reserved = b.get_u8();
                    let top_count = usize::from(b.get_u16_le());
                    let logprob = b.get_f32_le();
                    if has_logprobs > 1 {
                        return Err(WireError::BadLogprobsFlag(has_logprobs));
                    }
                    if reserved != 0 {
                        return Err(WireError::ReservedNotZero);
                    }
                    if top_count > MAX_TOP_LOGPROBS || (has_logprobs == 0 && top_count != 0) {
                        return Err(WireError::TooManyLogprobs(top_count));
                    }
                    self.last_transfer_id = Some(transfer_id);
                    let len = FINAL_LEN + 8 * top_count;
                    let Some(f) = self.front(len) else {
                        return Ok(None);
                    };
                    let mut b = &f[FINAL_LEN..len];
                    let logprobs = (has_logprobs == 1).then(|| FirstLogprobs {
                        logprob,
                        top: (0..top_count)
                            .map(|_| (b.get_u32_le(), b.get_f32_le()))
                            .collect(),
                    });
                    self.consume(len);
                    return Ok(Some(Frame::Final {
                        transfer_id,
                        first: FirstToken {
                            id: first_token,
                            logprobs,
                        },
                        layers_sent,
                        frames_sent,
                        model_fingerprint,
                    }));
                }
                KIND_ABORT => {
                    let Some(a) = self.front(ABORT_HEADER_LEN) else {
                        return Ok(None);
                    };
                    let len = usize::from((&a[PREFIX_LEN..ABORT_HEADER_LEN]).get_u16_le());
                    if len > MAX_REASON_LEN {
                        return Err(WireError::ReasonTooLong(len));
                    }
                    self.last_transfer_id = Some(transfer_id);
                    let Some(a) = self.front(ABORT_HEADER_LEN + len) else {
                        return Ok(None);
                    };
                    let reason = std::str::from_utf8(&a[ABORT_HEADER_LEN..])
                        .map_err(|_| WireError::ReasonNotUtf8)?
                        .to_owned();
                    self.consume(ABORT_HEADER_LEN + len);
                    return Ok(Some(Frame::Abort {
                        transfer_id,
                        reason,
                    }));
                }
                other => return Err(WireError::UnknownKind(other)),
            }
        }
        let State::Payload {
            header,
            payload,
            small,
            hasher,
        } = &mut self.state
        else {
            return Ok(None);
        };
        let len = header.payload_len as usize;
        while payload.len() + small.len() < len {
            let need = len - payload.len() - small.len();
            let piece = match self.input.front_mut() {
                None => return Ok(None),
                Some(front) if front.len() > need => front.split_to(need),
                Some(_) => match self.input.pop_front() {
                    Some(piece) => piece,
                    None => return Ok(None),
                },
            };
            self.input_len -= piece.len();
            if let Some(h) = hasher {
                h.update(&piece);
            }
            if piece.len() < KEEP_PIECES_FROM {
                small.extend_from_slice(&piece);
            } else {
                if !small.is_empty() {
                    payload.push(small.split().freeze());
                }
                payload.push(piece);
            }
        }
        if !small.is_empty() {
            payload.push(small.split().freeze());
        }
        let (header, payload) = (*header, compact_if_scattered(std::mem::take(payload)));
        let actual = hasher.as_ref().map(|h| h.digest());
        self.state = State::Header;
        if let (Some(expected), Some(actual)) = (header.checksum, actual)
            && actual != expected
        {
            return Err(WireError::ChecksumMismatch {
                transfer_id: header.transfer_id,
                layer: header.shape.layer,
                expected,
                actual,
            });
        }
        Ok(Some(Frame::Layer { header, payload }))
    }
}

/// A Layer header's fields after the prefix, validated.
fn parse_layer_header(
    h: &[u8],
    transfer_id: u64,
    max_payload: u32,
) -> Result<LayerHeader, WireError> {
    let mut b = &h[PREFIX_LEN..LAYER_HEADER_LEN];
    let checksum = b.get_u64_le();
    let payload_len = b.get_u32_le();
    let first_block = b.get_u32_le();
    let block_count = b.get_u32_le();
    let layer = b.get_u16_le();
    let head_start = b.get_u16_le();
    let head_count = b.get_u16_le();
    let total_heads = b.get_u16_le();
    let head_dim = b.get_u16_le();
    let block_size = b.get_u16_le();
    let dtype_code = b.get_u8();
    let flags = b.get_u8();
    if flags & !FLAG_UNCHECKED != 0 || b.chunk() != [0, 0] {
        return Err(WireError::ReservedNotZero);
    }
    let checksum = if flags & FLAG_UNCHECKED == 0 {
        Some(checksum)
    } else if checksum == 0 {
        None
    } else {
        return Err(WireError::BadHeader("a checksum on an unchecked frame"));
    };
    if payload_len > max_payload {
        return Err(WireError::PayloadTooLarge {
            len: u64::from(payload_len),
            max: max_payload,
        });
    }
    let dtype = WireDtype::from_code(dtype_code).ok_or(WireError::UnknownDtype(dtype_code))?;
    let header = LayerHeader {
        transfer_id,
        shape: LayerShape {
            layer,
            first_block,
            block_count,
            dtype,
            head_start,
            head_count,
            total_heads,
            head_dim,
            block_size,
        },
        payload_len,
        checksum,
    };
    header.validate()?;
    Ok(header)
}

#[cfg(test)]
mod tests;
