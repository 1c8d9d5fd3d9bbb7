//! End-to-end transfers over real QUIC on 127.0.0.1.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use tandem_kv_transfer::receiver::stop_code;
use tandem_kv_transfer::sender::quinn_client_config;
use tandem_kv_transfer::tls::{SelfSigned, client_config_trusting};
use tandem_kv_transfer::transport::GSO_SAFE_PAYLOAD;
use tandem_kv_transfer::wire::{Frame, encode_final};
use tandem_kv_transfer::{
    Expectation, FirstLogprobs, FirstToken, KvReceiver, KvSender, KvSink, LayerHeader, LayerShape,
    Payload, ReceiverConfig, Reservations, SenderConfig, SinkError, TransferError, TransportTuning,
    WireDtype,
};
use tokio::sync::mpsc;

const LAYERS: u16 = 4;
const BLOCKS: u32 = 8;
const HEADS: u16 = 8;
const HEAD_DIM: u16 = 128;
const BLOCK_SIZE: u16 = 16;

fn block_bytes() -> usize {
    2 * HEADS as usize * BLOCK_SIZE as usize * HEAD_DIM as usize * 2
}

fn layer_bytes(layer: u16) -> Bytes {
    let n = BLOCKS as usize * block_bytes();
    Bytes::from(
        (0..n)
            .map(|i| {
                (i as u32)
                    .wrapping_mul(2654435761)
                    .wrapping_add(u32::from(layer)) as u8
            })
            .collect::<Vec<u8>>(),
    )
}

fn shape(layer: u16) -> LayerShape {
    LayerShape {
        layer,
        first_block: 0,
        block_count: BLOCKS,
        dtype: WireDtype::Bf16,
        head_start: 0,
        head_count: HEADS,
        total_heads: HEADS,
        head_dim: HEAD_DIM,
        block_size: BLOCK_SIZE,
    }
}

#[derive(Debug, PartialEq, Eq)]
enum Ending {
    Final(u64, u32),
    Abort(u64, String),
}

/// A decode node in miniature: a reservation table and a byte store.
struct TestSink {
    reservations: Mutex<Reservations>,
    store: Mutex<HashMap<(u64, u32), Vec<u8>>>,
    endings: mpsc::UnboundedSender<Ending>,
    /// `on_first_token` calls: transfer, token, Layer frames stored by then.
    first_tokens: Mutex<Vec<(u64, FirstToken, usize)>>,
    frames: Mutex<usize>,
    /// Layer frames that carried a checksum (the decoder verified it).
    checked_frames: Mutex<usize>,
}

impl TestSink {
    fn new() -> (Arc<Self>, mpsc::UnboundedReceiver<Ending>) {
        let (tx, rx) = mpsc::unbounded_channel();
        let sink = TestSink {
            reservations: Mutex::new(Reservations::new()),
            store: Mutex::new(HashMap::new()),
            endings: tx,
            first_tokens: Mutex::new(Vec::new()),
            frames: Mutex::new(0),
            checked_frames: Mutex::new(0),
        };
        (Arc::new(sink), rx)
    }

    fn reserve(&self, id: u64) {
        let e = Expectation {
            num_layers: u32::from(LAYERS),
            num_blocks: BLOCKS,
            block_bytes: block_bytes() as u64,
            dtype: WireDtype::Bf16,
            total_heads: HEADS,
            head_dim: HEAD_DIM,
            block_size: BLOCK_SIZE,
            held_blocks: 0,
        };
        self.reservations.lock().unwrap().register(id, e).unwrap();
    }

    fn layer(&self, id: u64, layer: u32) -> Vec<u8> {
        self.store.lock().unwrap()[&(id, layer)].clone()
    }
}

impl KvSink for TestSink {
    fn on_layer(&self, header: &LayerHeader, payload: Payload) -> Result<(), SinkError> {
        let a = self.reservations.lock().unwrap().on_layer_frame(header)?;
        let mut store = self.store.lock().unwrap();
        let buf = store
            .entry((header.transfer_id, a.layer))
            .or_insert_with(|| vec![0; BLOCKS as usize * block_bytes()]);
        let at = a.first_block as usize * block_bytes();
        buf[at..at + payload.len()].copy_from_slice(&payload.to_bytes());
        *self.frames.lock().unwrap() += 1;
        *self.checked_frames.lock().unwrap() += usize::from(header.checksum.is_some());
        Ok(())
    }

    fn on_first_token(&self, transfer_id: u64, first: FirstToken) {
        let frames = *self.frames.lock().unwrap();
        self.first_tokens
            .lock()
            .unwrap()
            .push((transfer_id, first, frames));
    }

    fn on_final(&self, transfer_id: u64, layers_sent: u32) -> Result<(), SinkError> {
        self.reservations
            .lock()
            .unwrap()
            .on_final(transfer_id, layers_sent)?;
        // The first token was announced before (u32::MAX: it was not).
        let first = self
            .first_tokens
            .lock()
            .unwrap()
            .iter()
            .find(|(id, ..)| *id == transfer_id)
            .map_or(u32::MAX, |(_, first, _)| first.id);
        let _ = self.endings.send(Ending::Final(transfer_id, first));
        Ok(())
    }

    fn on_abort(&self, transfer_id: u64, reason: &str) {
        self.reservations.lock().unwrap().release(transfer_id);
        let _ = self
            .endings
            .send(Ending::Abort(transfer_id, reason.to_owned()));
    }
}

struct Setup {
    receiver: KvReceiver,
    addr: SocketAddr,
    cert: SelfSigned,
    sink: Arc<TestSink>,
    endings: mpsc::UnboundedReceiver<Ending>,
}

fn start() -> Setup {
    let cert = SelfSigned::generate(&["localhost"]).unwrap();
    let (sink, endings) = TestSink::new();
    let (receiver, addr) = KvReceiver::bind(
        "127.0.0.1:0".parse().unwrap(),
        cert.server_config().unwrap(),
        sink.clone(),
    )
    .unwrap();
    Setup {
        receiver,
        addr,
        cert,
        sink,
        endings,
    }
}

async fn next_ending(rx: &mut mpsc::UnboundedReceiver<Ending>) -> Ending {
    tokio::time::timeout(Duration::from_secs(10), rx.recv())
        .await
        .expect("an ending in time")
        .expect("sink alive")
}

/// The first token every good transfer carries.
fn first_token() -> FirstToken {
    FirstToken {
        id: 1234,
        logprobs: Some(FirstLogprobs {
            logprob: -0.25,
            top: vec![(1234, -0.25), (7, -1.5), (99, -3.0)],
        }),
    }
}

async fn good_transfer(s: &mut Setup, sender: &KvSender, id: u64) {
    s.sink.reserve(id);
    let mut req = sender.open_request(id).await.unwrap();
    for layer in 0..LAYERS {
        req.send_layer(shape(layer), layer_bytes(layer))
            .await
            .unwrap();
    }
    req.finish(&first_token(), u32::from(LAYERS)).await.unwrap();
    assert_eq!(next_ending(&mut s.endings).await, Ending::Final(id, 1234));
    let announced = s.sink.first_tokens.lock().unwrap().clone();
    let announced: Vec<_> = announced.iter().filter(|(t, ..)| *t == id).collect();
    assert_eq!(announced.len(), 1, "announced once: {announced:?}");
    assert_eq!(announced[0].1, first_token(), "with its log probabilities");
    for layer in 0..LAYERS {
        assert!(
            s.sink.layer(id, u32::from(layer)) == layer_bytes(layer).to_vec(),
            "layer {layer} byte-exact"
        );
    }
}

/// The Final frame overtakes the Layer frames still queued (it has a stream
/// of its own): with the layers held to 4 MB/s, the receiver announces the
/// first token while most of them are still to come, and delivers the Final
/// only after every one of them, byte-exact.
#[tokio::test]
async fn the_first_token_is_announced_ahead_of_the_layers() {
    let mut s = start();
    let tls = client_config_trusting(&s.cert.cert).unwrap();
    let sender = KvSender::connect(s.addr, tls, 2)
        .await
        .unwrap()
        .with_send_rate_limit(4e6);
    let id = 77;
    good_transfer(&mut s, &sender, id).await;
    let announced = s.sink.first_tokens.lock().unwrap().clone();
    assert_eq!(announced.len(), 1, "{announced:?}");
    let (tid, first, frames_by_then) = announced[0].clone();
    assert_eq!((tid, first.id), (id, 1234));
    let frames = *s.sink.frames.lock().unwrap();
    assert!(
        frames_by_then < frames,
        "announced after {frames_by_then} of {frames} frames"
    );
}

/// A sender of frames of at most three blocks (a layer is three frames).
async fn three_block_frames(s: &Setup) -> KvSender {
    let tls = client_config_trusting(&s.cert.cert).unwrap();
    let cfg = SenderConfig {
        connections: 2,
        max_frame_payload: 3 * block_bytes() as u32,
        ..SenderConfig::default()
    };
    KvSender::connect_with(s.addr, tls, cfg).await.unwrap()
}

/// The Final can leave before any layer is queued (as a prefill node sends
/// it once the first token is sampled, while earlier layers still wait for
/// their device copies): it announces every frame the layers will be cut
/// into, the first token is announced before a single Layer frame landed,
/// and the transfer ends once they all did, byte-exact.
#[tokio::test]
async fn a_final_sent_before_any_layer_announces_the_first_token_at_once() {
    let mut s = start();
    let sender = three_block_frames(&s).await;
    let id = 78;
    s.sink.reserve(id);
    let mut req = sender.open_request(id).await.unwrap();
    let ahead = req.final_ahead();
    let frames: u32 = (0..LAYERS)
        .map(|l| ahead.frames_for(&shape(l)).unwrap())
        .sum();
    // Eight blocks in frames of three: 3 frames a layer.
    assert_eq!(frames, 3 * u32::from(LAYERS));
    let sent = ahead.send(&first_token(), u32::from(LAYERS), frames);
    assert!(sent.went_ahead());
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while s.sink.first_tokens.lock().unwrap().is_empty() {
        assert!(std::time::Instant::now() < deadline, "no first token");
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    let (tid, first, frames_by_then) = s.sink.first_tokens.lock().unwrap()[0].clone();
    assert_eq!((tid, first, frames_by_then), (id, first_token(), 0));
    for layer in 0..LAYERS {
        req.send_layer(shape(layer), layer_bytes(layer))
            .await
            .unwrap();
    }
    req.finish_after(sent).await.unwrap();
    assert_eq!(next_ending(&mut s.endings).await, Ending::Final(id, 1234));
    for layer in 0..LAYERS {
        assert!(s.sink.layer(id, u32::from(layer)) == layer_bytes(layer).to_vec());
    }
    assert_eq!(
        s.sink.first_tokens.lock().unwrap().len(),
        1,
        "announced once"
    );
}

/// A Final that announced fewer frames than were then queued is a broken
/// transfer: the sender says so and the receiver ends it with an abort
/// (its blocks released), not a delivery.
#[tokio::test]
async fn a_final_announcing_the_wrong_frame_count_ends_in_an_abort() {
    let mut s = start();
    let sender = three_block_frames(&s).await;
    let id = 79;
    s.sink.reserve(id);
    let mut req = sender.open_request(id).await.unwrap();
    let ahead = req.final_ahead();
    let sent = ahead.send(&first_token(), u32::from(LAYERS), 3 * u32::from(LAYERS) - 1);
    for layer in 0..LAYERS {
        // The receiver may refuse the frame beyond the announced count.
        if req
            .send_layer(shape(layer), layer_bytes(layer))
            .await
            .is_err()
        {
            break;
        }
    }
    let e = req.finish_after(sent).await.unwrap_err();
    assert!(
        matches!(e, TransferError::InvalidArgument(_))
            || matches!(e, TransferError::Refused { .. }),
        "{e:?}"
    );
    assert!(matches!(
        next_ending(&mut s.endings).await,
        Ending::Abort(79, _)
    ));
    assert_eq!(s.sink.reservations.lock().unwrap().len(), 0, "released");
}

/// A raw QUIC connection for writing arbitrary bytes.
async fn raw_connection(s: &Setup) -> quinn::Connection {
    let tls = client_config_trusting(&s.cert.cert).unwrap();
    let mut ep = quinn::Endpoint::client("127.0.0.1:0".parse().unwrap()).unwrap();
    ep.set_default_client_config(quinn_client_config(tls, &TransportTuning::default()).unwrap());
    ep.connect(s.addr, "localhost").unwrap().await.unwrap()
}

async fn raw_stream(conn: &quinn::Connection, bytes: &[u8]) -> Option<u64> {
    let mut send = conn.open_uni().await.unwrap();
    let _ = send.write_all(bytes).await;
    let _ = send.finish();
    tokio::time::timeout(Duration::from_secs(10), send.stopped())
        .await
        .unwrap()
        .unwrap()
        .map(|c| c.into_inner())
}

/// Byte-exact over one and three connections, with frames unchecked (the
/// default: QUIC authenticates the packets) and checksummed when asked.
#[tokio::test]
async fn layer_by_layer_transfer_is_byte_exact() {
    let mut s = start();
    for (connections, checksum_payloads) in [(1, false), (3, false), (3, true)] {
        let tls = client_config_trusting(&s.cert.cert).unwrap();
        let cfg = SenderConfig {
            connections,
            max_frame_payload: 3 * block_bytes() as u32,
            checksum_payloads,
            ..SenderConfig::default()
        };
        let sender = KvSender::connect_with(s.addr, tls, cfg).await.unwrap();
        let (frames, checked) = (
            *s.sink.frames.lock().unwrap(),
            *s.sink.checked_frames.lock().unwrap(),
        );
        let id = 10 + connections as u64 + 100 * u64::from(checksum_payloads);
        good_transfer(&mut s, &sender, id).await;
        let frames = *s.sink.frames.lock().unwrap() - frames;
        let checked = *s.sink.checked_frames.lock().unwrap() - checked;
        // Eight blocks a layer in frames of three.
        assert_eq!(frames, 3 * usize::from(LAYERS));
        assert_eq!(checked, if checksum_payloads { frames } else { 0 });
        sender.close().await;
    }
    s.receiver.shutdown().await;
}

#[tokio::test]
async fn transfer_striped_over_three_receiver_endpoints_is_byte_exact() {
    let cert = SelfSigned::generate(&["localhost"]).unwrap();
    let (sink, endings) = TestSink::new();
    let (receiver, addr) = KvReceiver::bind_with(
        "127.0.0.1:0".parse().unwrap(),
        cert.server_config().unwrap(),
        sink.clone(),
        ReceiverConfig {
            endpoints: 3,
            ..ReceiverConfig::default()
        },
        tokio_util::sync::CancellationToken::new(),
    )
    .unwrap();
    let addrs = receiver.local_addrs().unwrap();
    assert_eq!(addrs.len(), 3);
    assert_eq!(addrs[0], addr, "bind returns the first endpoint's address");
    assert_eq!(receiver.local_addr().unwrap(), addr);
    let distinct: std::collections::HashSet<_> = addrs.iter().collect();
    assert_eq!(distinct.len(), 3, "{addrs:?}");
    let mut s = Setup {
        receiver,
        addr,
        cert,
        sink,
        endings,
    };
    let tls = client_config_trusting(&s.cert.cert).unwrap();
    let cfg = SenderConfig {
        connections: 6,
        max_frame_payload: block_bytes() as u32,
        ..SenderConfig::default()
    };
    let sender = KvSender::connect_many_with(&addrs, tls, cfg).await.unwrap();
    assert_eq!(sender.connection_count(), 6);
    let remotes = sender.remote_addrs();
    for a in &addrs {
        assert_eq!(
            remotes.iter().filter(|r| *r == a).count(),
            2,
            "two connections to each endpoint: {remotes:?}"
        );
    }
    // One frame per block: every request stripes 8 frames per layer over
    // the 6 connections, i.e. over all three endpoints.
    good_transfer(&mut s, &sender, 40).await;
    good_transfer(&mut s, &sender, 41).await;
    sender.close().await;
    // The old single-address API still reaches the first endpoint.
    let tls = client_config_trusting(&s.cert.cert).unwrap();
    let sender = KvSender::connect(s.addr, tls, 2).await.unwrap();
    good_transfer(&mut s, &sender, 42).await;
    sender.close().await;
    s.receiver.shutdown().await;
}

#[tokio::test]
async fn garbage_and_truncation_are_refused_and_service_continues() {
    let mut s = start();
    let conn = raw_connection(&s).await;
    // Garbage: stopped as malformed (the code reaches us only if the stop
    // beats the acknowledgement of the last byte); no request named, so no abort.
    let code = raw_stream(&conn, b"this is not a kv frame at all").await;
    assert!(matches!(code, None | Some(2)), "{code:?}");
    assert_eq!(u64::from(stop_code::MALFORMED), 2);
    // A truncated Layer frame of a reserved request: aborted.
    s.sink.reserve(7);
    let payload = layer_bytes(0);
    let header = LayerHeader::for_payload(7, shape(0), &payload).unwrap();
    let mut bytes = BytesMut::new();
    Frame::Layer {
        header,
        payload: payload.into(),
    }
    .encode(&mut bytes);
    let cut = bytes.len() / 2;
    let _ = raw_stream(&conn, &bytes[..cut]).await;
    match next_ending(&mut s.endings).await {
        Ending::Abort(7, reason) => assert!(reason.contains("inside a frame"), "{reason}"),
        other => panic!("unexpected {other:?}"),
    }
    // The same connection and the receiver keep serving.
    let tls = client_config_trusting(&s.cert.cert).unwrap();
    let sender = KvSender::connect(s.addr, tls, 2).await.unwrap();
    good_transfer(&mut s, &sender, 8).await;
    s.sink.reserve(9);
    let payload = layer_bytes(1);
    let header = LayerHeader::for_payload(9, shape(1), &payload).unwrap();
    let mut bytes = BytesMut::new();
    Frame::Layer {
        header,
        payload: payload.into(),
    }
    .encode(&mut bytes);
    assert_eq!(
        raw_stream(&conn, &bytes).await,
        None,
        "a good frame on the old connection is accepted"
    );
    s.receiver.shutdown().await;
}

#[tokio::test]
async fn corrupted_checksum_aborts_the_request() {
    let mut s = start();
    s.sink.reserve(5);
    let conn = raw_connection(&s).await;
    let payload = layer_bytes(0);
    let header = LayerHeader::for_payload(5, shape(0), &payload).unwrap();
    let mut bytes = BytesMut::new();
    Frame::Layer {
        header,
        payload: payload.into(),
    }
    .encode(&mut bytes);
    let last = bytes.len() - 1;
    bytes[last] ^= 0x40;
    let _ = raw_stream(&conn, &bytes).await;
    match next_ending(&mut s.endings).await {
        Ending::Abort(5, reason) => assert!(reason.contains("checksum"), "{reason}"),
        other => panic!("unexpected {other:?}"),
    }
    s.receiver.shutdown().await;
}

#[tokio::test]
async fn sink_refusal_reaches_the_sender_and_aborts_once() {
    let mut s = start();
    let tls = client_config_trusting(&s.cert.cert).unwrap();
    let sender = KvSender::connect(s.addr, tls, 2).await.unwrap();
    // Not reserved: the sink refuses the first frame.
    let mut req = sender.open_request(99).await.unwrap();
    for layer in 0..LAYERS {
        if req
            .send_layer(shape(layer), layer_bytes(layer))
            .await
            .is_err()
        {
            break;
        }
    }
    let r = req.finish(&first_token(), u32::from(LAYERS)).await;
    assert!(
        matches!(r, Err(TransferError::Refused { .. }) | Ok(_)),
        "{r:?}"
    );
    match next_ending(&mut s.endings).await {
        Ending::Abort(99, reason) => assert!(reason.contains("no reservation"), "{reason}"),
        other => panic!("unexpected {other:?}"),
    }
    assert!(
        tokio::time::timeout(Duration::from_millis(300), s.endings.recv())
            .await
            .is_err(),
        "one ending only"
    );
    // A Final for a request whose frames never came is held, then a sender abort ends it.
    s.sink.reserve(100);
    let conn = raw_connection(&s).await;
    let _ = raw_stream(&conn, &encode_final(100, &first_token(), 4, 4, 0)).await;
    let req = sender.open_request(100).await.unwrap();
    req.abort("prefill node lost its GPU").await.unwrap();
    match next_ending(&mut s.endings).await {
        Ending::Abort(100, reason) => assert!(reason.contains("lost its GPU"), "{reason}"),
        other => panic!("unexpected {other:?}"),
    }
    // A peer of another wire version: its transfer ends at once, saying so.
    s.sink.reserve(101);
    let mut old = encode_final(101, &first_token(), 4, 4, 0).to_vec();
    old[4] = 2;
    let _ = raw_stream(&conn, &old).await;
    match next_ending(&mut s.endings).await {
        Ending::Abort(101, reason) => assert!(reason.contains("wire version 2"), "{reason}"),
        other => panic!("unexpected {other:?}"),
    }
    s.receiver.shutdown().await;
}

#[tokio::test]
async fn wrong_certificate_cannot_connect() {
    let s = start();
    let other = SelfSigned::generate(&["localhost"]).unwrap();
    let tls = client_config_trusting(&other.cert).unwrap();
    let cfg = SenderConfig {
        connections: 1,
        timeout: Duration::from_secs(5),
        ..SenderConfig::default()
    };
    let r = KvSender::connect_with(s.addr, tls, cfg).await;
    assert!(
        matches!(r, Err(TransferError::Connection(_))),
        "{:?}",
        r.err()
    );
    s.receiver.shutdown().await;
}

/// Loopback carries 64 KiB datagrams, so discovery must take packets past
/// quinn's 1472-byte endpoint default and past the size at which stock quinn's
/// 10-datagram GSO batches exceed 64 KiB: the kernel refuses such a batch
/// whole, which shows as a third of the packets lost (and sends discovery
/// back to 1200 bytes) unless the socket cuts batches to size.
#[tokio::test]
async fn loopback_transfers_use_large_datagrams_without_loss() {
    let mut s = start();
    let tls = client_config_trusting(&s.cert.cert).unwrap();
    let sender = KvSender::connect_with(s.addr, tls, SenderConfig::default())
        .await
        .unwrap();
    for id in 0..16 {
        good_transfer(&mut s, &sender, 500 + id).await;
    }
    let stats = &sender.connection_stats()[0];
    let path = &stats.path;
    assert!(
        path.current_mtu > GSO_SAFE_PAYLOAD,
        "MTU only {} after {} packets",
        path.current_mtu,
        path.sent_packets
    );
    assert!(
        path.lost_packets * 10 < path.sent_packets,
        "{} of {} packets lost",
        path.lost_packets,
        path.sent_packets
    );
    sender.close().await;
    s.receiver.shutdown().await;
}

/// A receiver that knows its model refuses a transfer whose Final frame
/// names another (KV computed by other weights), releasing the reservation;
/// the same model, or a sender that does not say, is accepted.
#[tokio::test]
async fn kv_of_another_model_is_refused_at_the_final_frame() {
    const OURS: u64 = 0x5eed_0001;
    let cert = SelfSigned::generate(&["localhost"]).unwrap();
    let (sink, endings) = TestSink::new();
    let (receiver, addr) = KvReceiver::bind_with(
        "127.0.0.1:0".parse().unwrap(),
        cert.server_config().unwrap(),
        sink.clone(),
        ReceiverConfig {
            model_fingerprint: OURS,
            ..ReceiverConfig::default()
        },
        tokio_util::sync::CancellationToken::new(),
    )
    .unwrap();
    let mut s = Setup {
        receiver,
        addr,
        cert,
        sink,
        endings,
    };
    let sender_for = |fingerprint: u64| {
        let tls = client_config_trusting(&s.cert.cert).unwrap();
        let cfg = SenderConfig {
            model_fingerprint: fingerprint,
            ..SenderConfig::default()
        };
        KvSender::connect_with(s.addr, tls, cfg)
    };
    let other = sender_for(0x5eed_0002).await.unwrap();
    let same = sender_for(OURS).await.unwrap();
    let unknown = sender_for(0).await.unwrap();

    s.sink.reserve(7);
    let mut req = other.open_request(7).await.unwrap();
    for layer in 0..LAYERS {
        req.send_layer(shape(layer), layer_bytes(layer))
            .await
            .unwrap();
    }
    let r = req.finish(&first_token(), u32::from(LAYERS)).await;
    assert!(
        matches!(r, Err(TransferError::Refused { .. }) | Ok(_)),
        "{r:?}"
    );
    match next_ending(&mut s.endings).await {
        Ending::Abort(7, reason) => {
            assert!(
                reason.starts_with(tandem_kv_transfer::receiver::MODEL_MISMATCH),
                "{reason}"
            );
            assert!(reason.contains("000000005eed0002"), "{reason}");
        }
        other => panic!("unexpected {other:?}"),
    }
    // The reservation is gone: a late frame for it is refused.
    assert!(
        s.sink
            .reservations
            .lock()
            .unwrap()
            .on_final(7, u32::from(LAYERS))
            .is_err()
    );
    good_transfer(&mut s, &same, 8).await;
    good_transfer(&mut s, &unknown, 9).await;
    s.receiver.shutdown().await;
}
