//! `TransportTuning` knobs reach real QUIC connections on 127.0.0.1: a
//! 1500-byte-MTU bound keeps datagrams at 1472 bytes and transfers striped
//! over several connections stay complete and byte-exact, in GSO batches of
//! up to 64 KiB; the initial congestion window is the configured one.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use tandem_kv_transfer::tls::{SelfSigned, client_config_trusting};
use tandem_kv_transfer::{
    FirstToken, KvReceiver, KvSender, KvSink, LayerHeader, LayerShape, Payload, ReceiverConfig,
    SenderConfig, SinkError, TransportTuning, WireDtype,
};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

const LAYERS: u16 = 4;
const BLOCKS: u32 = 32;
const HEADS: u16 = 8;
const HEAD_DIM: u16 = 128;
const BLOCK_SIZE: u16 = 16;
const BLOCK_BYTES: usize = 2 * HEADS as usize * BLOCK_SIZE as usize * HEAD_DIM as usize * 2;

fn layer_bytes(id: u64, layer: u16) -> Bytes {
    (0..BLOCKS as usize * BLOCK_BYTES)
        .map(|i| {
            (i as u64)
                .wrapping_mul(2654435761)
                .wrapping_add(id * 31 + u64::from(layer)) as u8
        })
        .collect::<Vec<u8>>()
        .into()
}

fn shape(layer: u16, first_block: u32, block_count: u32) -> LayerShape {
    LayerShape {
        layer,
        first_block,
        block_count,
        dtype: WireDtype::Bf16,
        head_start: 0,
        head_count: HEADS,
        total_heads: HEADS,
        head_dim: HEAD_DIM,
        block_size: BLOCK_SIZE,
    }
}

/// Stores every frame's bytes where its header says they belong.
struct Store {
    layers: Mutex<HashMap<(u64, u32), Vec<u8>>>,
    finals: mpsc::UnboundedSender<Result<u64, String>>,
}

impl KvSink for Store {
    fn on_layer(&self, header: &LayerHeader, payload: Payload) -> Result<(), SinkError> {
        let mut layers = self.layers.lock().unwrap();
        let layer = layers
            .entry((header.transfer_id, u32::from(header.shape.layer)))
            .or_insert_with(|| vec![0; BLOCKS as usize * BLOCK_BYTES]);
        let at = header.shape.first_block as usize * BLOCK_BYTES;
        layer[at..at + payload.len()].copy_from_slice(&payload.to_bytes());
        Ok(())
    }
    fn on_first_token(&self, _: u64, _: FirstToken) {}

    fn on_final(&self, transfer_id: u64, _: u32) -> Result<(), SinkError> {
        let _ = self.finals.send(Ok(transfer_id));
        Ok(())
    }
    fn on_abort(&self, transfer_id: u64, reason: &str) {
        let _ = self.finals.send(Err(format!("{transfer_id}: {reason}")));
    }
}

fn tuning_1500() -> TransportTuning {
    TransportTuning {
        max_udp_payload: 1472,
        ..TransportTuning::default()
    }
}

/// A receiver with `connections` endpoints and a sender with as many
/// connections to them, both bounded to 1472-byte datagrams.
struct Pair1500 {
    rx: KvReceiver,
    sender: KvSender,
    store: Arc<Store>,
    ended: mpsc::UnboundedReceiver<Result<u64, String>>,
}

async fn pair_1500(connections: usize) -> Pair1500 {
    let cert = SelfSigned::generate(&["localhost"]).unwrap();
    let (finals, ended) = mpsc::unbounded_channel();
    let store = Arc::new(Store {
        layers: Mutex::new(HashMap::new()),
        finals,
    });
    let (rx, _) = KvReceiver::bind_with(
        "127.0.0.1:0".parse().unwrap(),
        cert.server_config().unwrap(),
        store.clone(),
        ReceiverConfig {
            endpoints: connections,
            transport: tuning_1500(),
            ..ReceiverConfig::default()
        },
        CancellationToken::new(),
    )
    .unwrap();
    let addrs = rx.local_addrs().unwrap();
    let sender = KvSender::connect_many_with(
        &addrs,
        client_config_trusting(&cert.cert).unwrap(),
        SenderConfig {
            connections,
            // Frames of 4 blocks: each layer piece spreads over all lanes.
            max_frame_payload: (4 * BLOCK_BYTES) as u32,
            transport: tuning_1500(),
            ..SenderConfig::default()
        },
    )
    .await
    .unwrap();
    Pair1500 {
        rx,
        sender,
        store,
        ended,
    }
}

impl Pair1500 {
    /// Sends request `id` (every layer in two pieces, as chunked prefill
    /// sends them) and checks that it arrives complete and byte-exact.
    async fn transfer(&mut self, id: u64) {
        let mut req = self.sender.open_request(id).await.unwrap();
        for (first, count) in [(0, BLOCKS / 2), (BLOCKS / 2, BLOCKS / 2)] {
            for layer in 0..LAYERS {
                let all = layer_bytes(id, layer);
                let piece =
                    all.slice(first as usize * BLOCK_BYTES..(first + count) as usize * BLOCK_BYTES);
                req.send_layer(shape(layer, first, count), piece)
                    .await
                    .unwrap();
            }
        }
        let first = FirstToken {
            id: 1,
            logprobs: None,
        };
        req.finish(&first, u32::from(LAYERS)).await.unwrap();
        let end = tokio::time::timeout(Duration::from_secs(10), self.ended.recv())
            .await
            .expect("an ending in time")
            .expect("sink alive");
        assert_eq!(end, Ok(id));
        let layers = self.store.layers.lock().unwrap();
        for layer in 0..LAYERS {
            assert!(
                layers.get(&(id, u32::from(layer))).map(Vec::as_slice)
                    == Some(&layer_bytes(id, layer)[..]),
                "request {id} layer {layer} byte-exact"
            );
        }
    }

    async fn close(self) {
        self.sender.close().await;
        self.rx.shutdown().await;
    }
}

/// A plain 1500-byte-MTU path: MTU discovery stops at the configured bound
/// (it never tries larger datagrams the NIC would drop), and a request
/// striped over three connections on three receiver endpoints, its layers
/// sent in several pieces, arrives complete and byte-exact, in order of
/// completion (the Final after every layer).
#[tokio::test]
async fn a_1500_byte_mtu_bound_keeps_datagrams_at_1472_and_stripes_byte_exact() {
    let mut pair = pair_1500(3).await;
    for id in 1..=3u64 {
        pair.transfer(id).await;
    }
    let stats = pair.sender.connection_stats();
    assert_eq!(stats.len(), 3);
    for s in &stats {
        // Discovery found the bound (1472) and went no further.
        assert_eq!(
            s.path.current_mtu, 1472,
            "after {} packets",
            s.path.sent_packets
        );
        assert!(
            s.path.sent_packets > 100,
            "every connection carried a stripe"
        );
    }
    pair.close().await;
}

/// At 1472-byte datagrams a send call carries as many as fit 64 KiB (44),
/// not quinn's stock 10 (the vendored quinn's patch, third_party/quinn): the
/// per-datagram cost is most of what such a path costs in CPU.
#[tokio::test]
async fn a_1500_byte_mtu_path_sends_more_than_ten_datagrams_per_call() {
    let mut pair = pair_1500(1).await;
    pair.transfer(1).await;
    let tx = pair.sender.connection_stats()[0].udp_tx;
    // The handshake's and the ACKs' lone datagrams lower the mean a little.
    let per_call = tx.datagrams as f64 / tx.ios.max(1) as f64;
    assert!(
        per_call > 15.0,
        "{} datagrams in {} send calls ({per_call:.1} per call)",
        tx.datagrams,
        tx.ios
    );
    pair.close().await;
}

/// The configured initial congestion window is what a fresh connection
/// starts with (quinn's own default is about 14 KiB; the handshake's few
/// ACKed packets grow it by a few KiB at most).
#[tokio::test]
async fn the_initial_window_knob_reaches_the_connection() {
    let cert = SelfSigned::generate(&["localhost"]).unwrap();
    let (finals, _ended) = mpsc::unbounded_channel();
    let store = Arc::new(Store {
        layers: Mutex::new(HashMap::new()),
        finals,
    });
    let (rx, addr) = KvReceiver::bind(
        "127.0.0.1:0".parse().unwrap(),
        cert.server_config().unwrap(),
        store,
    )
    .unwrap();
    for window in [64u64 << 10, 2 << 20] {
        let sender = KvSender::connect_with(
            addr,
            client_config_trusting(&cert.cert).unwrap(),
            SenderConfig {
                transport: TransportTuning {
                    initial_window: window,
                    ..TransportTuning::default()
                },
                ..SenderConfig::default()
            },
        )
        .await
        .unwrap();
        let cwnd = sender.connection_stats()[0].path.cwnd;
        assert!(
            (window..window + (32 << 10)).contains(&cwnd),
            "initial window {window}, connection's window {cwnd}"
        );
        sender.close().await;
    }
    rx.shutdown().await;
}
