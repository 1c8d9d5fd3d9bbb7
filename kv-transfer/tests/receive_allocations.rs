//! Receiving KV over QUIC does not copy what arrives: the datagrams are read
//! into buffers the receiving endpoint reuses once the frames built from them
//! are dropped, and a layer frame is the received packets' bytes (the
//! workspace's quinn, `third_party/quinn/TANDEM.md`). Stock quinn copied every
//! received batch into a new buffer, so a receiver allocated at least as many
//! bytes as it received. This binary counts every allocation of the process
//! (sender and receiver both), so it holds only these tests, and they take
//! turns (`ONE_AT_A_TIME`).

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
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

/// The system allocator, counting the bytes it hands out and those not yet
/// given back.
struct Counting;

static ALLOCATED: AtomicU64 = AtomicU64::new(0);
static LIVE: AtomicI64 = AtomicI64::new(0);

fn counted(bytes: usize) {
    ALLOCATED.fetch_add(bytes as u64, Ordering::Relaxed);
    LIVE.fetch_add(bytes as i64, Ordering::Relaxed);
}

unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        counted(layout.size());
        unsafe { System.alloc(layout) }
    }
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        counted(layout.size());
        unsafe { System.alloc_zeroed(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        LIVE.fetch_sub(layout.size() as i64, Ordering::Relaxed);
        unsafe { System.dealloc(ptr, layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        counted(new_size);
        LIVE.fetch_sub(layout.size() as i64, Ordering::Relaxed);
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

/// The tests read process-wide counters, so they run one at a time.
static ONE_AT_A_TIME: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

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
/// once they are imported; or, while `held` is `Some`, keeps them there, as a
/// decode node whose import stalls does.
struct Sink {
    bytes: AtomicU64,
    held: Mutex<Option<Vec<Payload>>>,
    finals: mpsc::UnboundedSender<Result<u64, String>>,
}

impl KvSink for Sink {
    fn on_layer(&self, _: &LayerHeader, payload: Payload) -> Result<(), SinkError> {
        self.bytes
            .fetch_add(payload.len() as u64, Ordering::Relaxed);
        if let Some(held) = self.held.lock().unwrap().as_mut() {
            held.push(payload);
        }
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

/// A receiver and a sender connected to it over loopback, with jumbo-frame
/// datagrams: a receive buffer (32 batches of up to 64 of them) is 18 MiB.
struct Pair {
    sink: Arc<Sink>,
    ended: mpsc::UnboundedReceiver<Result<u64, String>>,
    rx: KvReceiver,
    sender: KvSender,
    layers: Vec<Bytes>,
}

/// Bytes of one receive buffer at 8952-byte datagrams (the endpoint's
/// `RecvState`: 32 slots of 64 datagrams).
const RECV_BUF_BYTES: i64 = 32 * 64 * 8952;
const TRANSFER_BYTES: u64 = (LAYERS as usize * LAYER_BYTES) as u64;

impl Pair {
    async fn new() -> Pair {
        let cert = SelfSigned::generate(&["localhost"]).unwrap();
        let (finals, ended) = mpsc::unbounded_channel();
        let sink = Arc::new(Sink {
            bytes: AtomicU64::new(0),
            held: Mutex::new(None),
            finals,
        });
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
        let layers = (0..LAYERS)
            .map(|l| Bytes::from(vec![l as u8 + 1; LAYER_BYTES]))
            .collect();
        Pair {
            sink,
            ended,
            rx,
            sender,
            layers,
        }
    }

    /// Sends every layer as transfer `id` and waits for its end at the receiver.
    async fn transfer(&mut self, id: u64) {
        let mut req = self.sender.open_request(id).await.unwrap();
        for (layer, bytes) in self.layers.iter().enumerate() {
            req.send_layer(shape(layer as u16), bytes.clone())
                .await
                .unwrap();
        }
        let first = FirstToken {
            id: 1,
            logprobs: None,
        };
        req.finish(&first, u32::from(LAYERS)).await.unwrap();
        let end = tokio::time::timeout(Duration::from_secs(60), self.ended.recv())
            .await
            .expect("the transfer ends in time")
            .expect("sink alive");
        assert_eq!(end, Ok(id));
    }

    async fn close(self) {
        self.sender.close().await;
        self.rx.shutdown().await;
    }
}

#[tokio::test]
async fn a_receiver_allocates_far_less_than_it_receives() {
    let _turn = ONE_AT_A_TIME.lock().await;
    let mut pair = Pair::new().await;
    // Two untimed transfers warm the connection and the receive buffers up;
    // the third is counted.
    let mut counted = 0;
    for id in 1..=3u64 {
        let before = ALLOCATED.load(Ordering::Relaxed);
        pair.transfer(id).await;
        counted = ALLOCATED.load(Ordering::Relaxed) - before;
    }
    assert_eq!(pair.sink.bytes.load(Ordering::Relaxed), 3 * TRANSFER_BYTES);
    // Copying each received batch alone would allocate `TRANSFER_BYTES` (1.05 times
    // that with stock quinn); with the buffers reused, ~1.5 MB is allocated (one
    // buffer more, 18 MiB, would still pass).
    assert!(
        counted < TRANSFER_BYTES / 2,
        "{counted} bytes allocated while {TRANSFER_BYTES} were sent and received"
    );
    pair.close().await;
}

#[tokio::test]
async fn the_receive_buffers_go_back_once_held_frames_are_dropped() {
    let _turn = ONE_AT_A_TIME.lock().await;
    let mut pair = Pair::new().await;
    for id in 1..=2u64 {
        pair.transfer(id).await;
    }
    let base = LIVE.load(Ordering::Relaxed);
    // The frames of two transfers (64 MiB) held: every receive buffer they
    // point into stays, and the endpoint takes new ones (a slot holds what one
    // `sendmsg` sent, at most 64 KiB, so that is dozens of buffers).
    *pair.sink.held.lock().unwrap() = Some(Vec::new());
    for id in 3..=4u64 {
        pair.transfer(id).await;
    }
    let held = LIVE.load(Ordering::Relaxed) - base;
    assert!(
        held > 8 * RECV_BUF_BYTES,
        "holding 64 MiB of frames kept only {held} bytes more: the test's premise is gone"
    );
    *pair.sink.held.lock().unwrap() = None;
    // The endpoint looks at its free buffers when it needs one: in the next
    // transfer, and in the one after they have gone unused for a second.
    pair.transfer(5).await;
    tokio::time::sleep(Duration::from_millis(1200)).await;
    pair.transfer(6).await;
    let after = LIVE.load(Ordering::Relaxed) - base;
    // What is left: the buffer received into, the four free ones used last, and
    // what the last transfer's frames in flight needed.
    assert!(
        after < 8 * RECV_BUF_BYTES,
        "{after} bytes still allocated after the held frames went (up to {held} while held)"
    );
    pair.close().await;
}
