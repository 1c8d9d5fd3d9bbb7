//! Receiving KV over QUIC does not copy what arrives: the datagrams are read
//! into buffers the receiving endpoint reuses once the frames built from them
//! are dropped, and a layer frame is the received packets' bytes (the
//! workspace's quinn, `third_party/quinn/TANDEM.md`). Stock quinn copied every
//! received batch into a new buffer, so a receiver allocated at least as many
//! bytes as it received. This binary counts every allocation of the process
//! (sender and receiver both), so it holds this one test alone.

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use bytes::Bytes;
use tandem_kv_transfer::tls::{SelfSigned, client_config_trusting};
use tandem_kv_transfer::{
    FirstToken, KvReceiver, KvSender, KvSink, LayerHeader, LayerShape, Payload, ReceiverConfig,
    SenderConfig, SinkError, TransportTuning, WireDtype,
};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

/// The system allocator, counting the bytes it hands out.
struct Counting;

static ALLOCATED: AtomicU64 = AtomicU64::new(0);

unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        ALLOCATED.fetch_add(layout.size() as u64, Ordering::Relaxed);
        unsafe { System.alloc(layout) }
    }
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        ALLOCATED.fetch_add(layout.size() as u64, Ordering::Relaxed);
        unsafe { System.alloc_zeroed(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        unsafe { System.dealloc(ptr, layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        ALLOCATED.fetch_add(new_size as u64, Ordering::Relaxed);
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

const LAYERS: u16 = 16;
const BLOCKS: u32 = 64;
const HEADS: u16 = 8;
const HEAD_DIM: u16 = 128;
const BLOCK_SIZE: u16 = 16;
const BLOCK_BYTES: usize = 2 * HEADS as usize * BLOCK_SIZE as usize * HEAD_DIM as usize * 2;
const LAYER_BYTES: usize = BLOCKS as usize * BLOCK_BYTES;

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

/// Counts the layer bytes that arrive and drops them, as a decode node does
/// once they are imported.
struct Discard {
    bytes: AtomicU64,
    finals: mpsc::UnboundedSender<Result<u64, String>>,
}

impl KvSink for Discard {
    fn on_layer(&self, _: &LayerHeader, payload: Payload) -> Result<(), SinkError> {
        self.bytes
            .fetch_add(payload.len() as u64, Ordering::Relaxed);
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

#[tokio::test]
async fn a_receiver_allocates_far_less_than_it_receives() {
    let cert = SelfSigned::generate(&["localhost"]).unwrap();
    let (finals, mut ended) = mpsc::unbounded_channel();
    let sink = Arc::new(Discard {
        bytes: AtomicU64::new(0),
        finals,
    });
    // Jumbo-frame datagrams: a receive buffer (32 batches of up to 64 of them)
    // is 18 MiB, so one buffer more in the counted transfer still passes the
    // bound (the pool grows to what the frames in flight hold, in the first).
    let transport = TransportTuning {
        max_udp_payload: 8952,
        ..TransportTuning::default()
    };
    let (rx, _) = KvReceiver::bind_with(
        "127.0.0.1:0".parse().unwrap(),
        cert.server_config().unwrap(),
        sink.clone(),
        ReceiverConfig {
            transport: transport.clone(),
            ..ReceiverConfig::default()
        },
        CancellationToken::new(),
    )
    .unwrap();
    let sender = KvSender::connect_many_with(
        &rx.local_addrs().unwrap(),
        client_config_trusting(&cert.cert).unwrap(),
        SenderConfig {
            transport,
            ..SenderConfig::default()
        },
    )
    .await
    .unwrap();
    let layers: Vec<Bytes> = (0..LAYERS)
        .map(|l| Bytes::from(vec![l as u8 + 1; LAYER_BYTES]))
        .collect();
    let transfer_bytes = (LAYERS as usize * LAYER_BYTES) as u64;

    // Two untimed transfers warm the connection and the receive buffers up;
    // the third is counted.
    let mut counted = 0;
    for id in 1..=3u64 {
        let before = ALLOCATED.load(Ordering::Relaxed);
        let mut req = sender.open_request(id).await.unwrap();
        for (layer, bytes) in layers.iter().enumerate() {
            req.send_layer(shape(layer as u16), bytes.clone())
                .await
                .unwrap();
        }
        let first = FirstToken {
            id: 1,
            logprobs: None,
        };
        req.finish(&first, u32::from(LAYERS)).await.unwrap();
        let end = tokio::time::timeout(Duration::from_secs(60), ended.recv())
            .await
            .expect("the transfer ends in time")
            .expect("sink alive");
        assert_eq!(end, Ok(id));
        counted = ALLOCATED.load(Ordering::Relaxed) - before;
    }
    assert_eq!(sink.bytes.load(Ordering::Relaxed), 3 * transfer_bytes);
    // Copying each received batch alone would allocate `transfer_bytes` (1.05 times
    // that with stock quinn); with the buffers reused, ~1.5 MB is allocated.
    assert!(
        counted < transfer_bytes / 2,
        "{counted} bytes allocated while {transfer_bytes} were sent and received"
    );
    sender.close().await;
    rx.shutdown().await;
}
