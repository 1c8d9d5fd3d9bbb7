//! QUIC transport settings tuned for bulk KV transfer, shared by both ends.
//!
//! quinn's defaults aim at interactive traffic over the internet: small flow
//! control windows, 1200-byte packets until path MTU discovery proves more,
//! and the kernel's default socket buffers. A KV transfer is the opposite: a
//! few long streams of hundreds of MiB inside a data centre. The choices:
//!
//! - **Flow-control windows** (`stream_receive_window`,
//!   `receive_window`, `send_window`): large enough that a stream never waits
//!   for a window update at data-centre RTTs (7.4 GB/s x 1 ms is ~7 MiB in
//!   flight); still bounded, because the receive window is what a peer may
//!   make us buffer per connection.
//! - **MTU**: discovery stays on, with the upper bound raised to
//!   `max_udp_payload` so jumbo frames (9000) or loopback (64 KiB) are used
//!   when the path carries them: fewer packets means fewer per-packet costs
//!   (crypto, ack processing, syscalls), which dominate quinn's CPU profile.
//!   Both ends' endpoints also accept datagrams that large
//!   ([`endpoint_config`](TransportTuning::endpoint_config)): an endpoint
//!   advertises the largest datagram it takes (quinn's default is 1472) and
//!   the peer's discovery never goes above it, so without this every packet
//!   stays at 1472 bytes whatever the path carries.
//!   Stock quinn sends up to 10 datagrams in one GSO call and the kernel refuses a
//!   call over 64 KiB ([`MAX_UDP_SEND`]) whole: with datagrams over
//!   [`GSO_SAFE_PAYLOAD`] (6550 bytes) that looked like 30-40% loss
//!   (measured on loopback at 6551, 8000 and 8952 bytes) and sent discovery's
//!   black-hole detector back to 1200-byte packets. The endpoints' sockets
//!   ([`endpoint`](TransportTuning::endpoint)) therefore cut each batch into
//!   calls of at most 64 KiB, and datagrams may be as large as one call:
//!   on loopback 64 KiB datagrams moved KV 1.22-1.51x faster than 6550-byte
//!   ones (`kv-transfer/BENCH.md`), the per-packet work being most of what
//!   is not the cipher.
//!   GSO/GRO stay on (quinn-udp's default).
//! - **Acknowledgement delay**: a receiver may hold an ACK back for up to
//!   25 ms (QUIC's default `max_ack_delay`), and a transfer's end waits for
//!   the last ACK; with the ACK-frequency extension (both ends are quinn) we
//!   ask the peer for at most `max_ack_delay` (1 ms), so the tail of a
//!   transfer is not 25 ms of waiting (the last packets under the threshold
//!   wait up to that 1 ms).
//! - **Crypto**: rustls with *ring*, AES-128-GCM first; ring picks its
//!   VAES/AVX2 or AES-NI code at run time (`perf` on the 2-core VM showed
//!   `aes_gcm_enc/dec_update_vaes_avx2`).
//! - **Socket buffers and the send window**: UDP drops what the receive
//!   buffer cannot hold, and a drop costs a retransmission and a
//!   congestion-window cut; we ask for large buffers (the kernel caps them at
//!   `net.core.rmem_max` / `wmem_max`). On loopback Cubic's window grows to
//!   tens of MiB (no loss tells it to stop until the receiver's buffer
//!   overflows), so a receiver that falls behind lost 0.3-4% of its packets
//!   with a 128 MiB send window; a 6 MiB one (`send_window`, which bounds
//!   what a connection has in flight) lost none in the same runs.
//! - **Per-packet work** (1472-byte datagrams: 700 k packets per GiB):
//!   a GSO call carries as many datagrams as fit one 64 KiB `sendmsg` (44
//!   at 1472 bytes, 7 at 8952): the workspace's quinn (`third_party/quinn`)
//!   lifts stock quinn's cap of 10, which at 1472 bytes cost 1.2x the
//!   rate, and the sockets report how many of the current size fit (at
//!   8952 bytes 10 used to be cut 7 + 3); the receiver reads all
//!   the chunks a stream has ready under one lock of the connection (each
//!   packet is one chunk); and the peer may hold its ACK until
//!   `ack_eliciting_threshold` (20) packets arrived (ACK-frequency
//!   extension). A CPU-bound receiver already coalesced ACKs (~120 packets
//!   per ACK on the 2-core VM at either threshold); the threshold bounds
//!   what a fast one sends. The initial congestion window (`initial_window`,
//!   256 KiB) holds more than that many packets, so slow start is not paced
//!   by the ACK delay.
//! - **Idle timeout and keep-alive**: a connection between two nodes lives
//!   long; keep-alive keeps NAT/conntrack state warm, the idle timeout
//!   notices a dead peer.

use std::io::IoSliceMut;
use std::net::{SocketAddr, UdpSocket};
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use quinn::congestion::CubicConfig;
use quinn::udp::{RecvMeta, Transmit};
use quinn::{
    AckFrequencyConfig, AsyncUdpSocket, Endpoint, EndpointConfig, IdleTimeout, MtuDiscoveryConfig,
    Runtime, ServerConfig, TokioRuntime, TransportConfig, UdpPoller, VarInt,
};
use socket2::{Domain, Protocol, Socket, Type};

/// The largest UDP payload of which stock quinn's largest GSO batch (10 datagrams)
/// fits one `sendmsg` (measured: 6550 works, 6551 loses every full batch
/// unless the batch is cut, as [`TransportTuning::endpoint`]'s sockets do).
pub const GSO_SAFE_PAYLOAD: u16 = MAX_UDP_SEND / 10;

/// The most UDP payload one `sendmsg` may carry, all GSO segments together:
/// an IPv4 packet's 65535 bytes less its IP and UDP headers.
pub const MAX_UDP_SEND: u16 = 65_535 - 20 - 8;

/// Default [`TransportTuning::send_window`]: 6 MiB unacknowledged per
/// connection, under a receiver socket's buffer (8 MiB where
/// `net.core.rmem_max` is 4 MiB) so that a receiver falling behind makes the
/// sender wait rather than the kernel drop; still 6 GB/s per connection at
/// a 1 ms round trip.
pub const DEFAULT_SEND_WINDOW: u64 = 6 << 20;

/// Default [`TransportTuning::ack_eliciting_threshold`]: an ACK per 20
/// packets at most (measured: 1 to 256 cost the same CPU per GB on the 2-core
/// VM, where a busy receiver acknowledges whole receive batches anyway).
pub const DEFAULT_ACK_ELICITING_THRESHOLD: u32 = 20;

/// Transport knobs; the defaults suit a data-centre network.
#[derive(Debug, Clone)]
pub struct TransportTuning {
    /// Bytes a peer may send on one stream ahead of our reading.
    pub stream_receive_window: u32,
    /// Bytes a peer may send on a connection ahead of our reading.
    pub receive_window: u32,
    /// Bytes we keep unacknowledged per connection: the most a connection
    /// has in flight whatever its congestion window. Keep it times the
    /// connections sharing one receiver endpoint under that endpoint's
    /// SO_RCVBUF, or a busy receiver's kernel drops datagrams.
    pub send_window: u64,
    /// Packet size to start with (1200 is always safe).
    pub initial_mtu: u16,
    /// Largest UDP payload MTU discovery may try (capped at [`MAX_UDP_SEND`]).
    pub max_udp_payload: u16,
    /// Longest the peer may delay an acknowledgement.
    pub max_ack_delay: Duration,
    /// Ack-eliciting packets the peer may receive before it must send an
    /// ACK (ACK-frequency extension; QUIC's default is 1: an ACK every
    /// second packet). Each ACK costs the receiver a packet to build, seal
    /// and send and the sender one to open and process, so at 1472-byte
    /// datagrams ACKs are a large share of the per-packet work.
    pub ack_eliciting_threshold: u32,
    /// Out-of-order packets that make the peer acknowledge at once (0:
    /// never, 1: every reordering, as without the extension). Keep it below
    /// quinn's loss `packet_threshold` (3).
    pub ack_reordering_threshold: u32,
    /// Congestion window a connection starts with, bytes (quinn's default
    /// is about 14 KiB, ten 1472-byte packets). It must hold well over
    /// `ack_eliciting_threshold` packets, or a young connection sends a
    /// window, waits `max_ack_delay` for the ACK and crawls through slow
    /// start one delay at a time.
    pub initial_window: u64,
    /// SO_RCVBUF / SO_SNDBUF requested for each socket.
    pub socket_buffer_bytes: usize,
    /// A connection silent for this long is dead.
    pub idle_timeout: Duration,
    /// Keep-alive ping interval.
    pub keep_alive: Duration,
    /// Round-robin between a connection's streams of equal priority, packet
    /// by packet (quinn's default), instead of sending them in the order they
    /// were written. Off: a request's frame goes out in one run, so the
    /// receiver keeps it as the packets' buffers (`wire::Payload`) instead of
    /// copying it out from between other requests' packets, and the earlier
    /// request's KV lands first. A Final frame's stream has a higher priority
    /// and overtakes either way.
    pub send_fairness: bool,
}

impl Default for TransportTuning {
    fn default() -> Self {
        TransportTuning {
            stream_receive_window: 32 << 20,
            receive_window: 128 << 20,
            send_window: DEFAULT_SEND_WINDOW,
            initial_mtu: 1200,
            max_udp_payload: MAX_UDP_SEND,
            max_ack_delay: Duration::from_millis(1),
            ack_eliciting_threshold: DEFAULT_ACK_ELICITING_THRESHOLD,
            ack_reordering_threshold: 2,
            initial_window: 256 << 10,
            socket_buffer_bytes: 16 << 20,
            idle_timeout: Duration::from_secs(30),
            keep_alive: Duration::from_secs(5),
            send_fairness: false,
        }
    }
}

impl TransportTuning {
    /// The datagram size bound in effect: `max_udp_payload` within 1200..=[`MAX_UDP_SEND`].
    pub fn udp_payload(&self) -> u16 {
        self.max_udp_payload.clamp(1200, MAX_UDP_SEND)
    }

    /// A quinn endpoint on a socket from [`udp_socket`](Self::udp_socket)
    /// whose GSO batches are cut to fit one `sendmsg` each.
    pub fn endpoint(
        &self,
        addr: SocketAddr,
        server: Option<ServerConfig>,
    ) -> std::io::Result<Endpoint> {
        let runtime = Arc::new(TokioRuntime);
        let socket = Arc::new(BoundedGso {
            inner: runtime.wrap_udp_socket(self.udp_socket(addr)?)?,
            segment: AtomicUsize::new(0),
        });
        Endpoint::new_with_abstract_socket(self.endpoint_config(), server, socket, runtime)
    }

    /// The quinn transport config; `max_uni_streams` is how many streams the
    /// peer may open to us at once (0 for a sender).
    pub fn transport_config(&self, max_uni_streams: u32) -> Arc<TransportConfig> {
        let mut t = TransportConfig::default();
        t.stream_receive_window(VarInt::from_u32(self.stream_receive_window))
            .receive_window(VarInt::from_u32(self.receive_window))
            .send_window(self.send_window)
            .max_concurrent_uni_streams(VarInt::from_u32(max_uni_streams))
            .max_concurrent_bidi_streams(VarInt::from_u32(0))
            .keep_alive_interval(Some(self.keep_alive))
            .send_fairness(self.send_fairness);
        let mut ack = AckFrequencyConfig::default();
        ack.max_ack_delay(Some(self.max_ack_delay))
            .ack_eliciting_threshold(VarInt::from_u32(self.ack_eliciting_threshold))
            .reordering_threshold(VarInt::from_u32(self.ack_reordering_threshold));
        t.ack_frequency_config(Some(ack));
        let mut cubic = CubicConfig::default();
        cubic.initial_window(self.initial_window);
        t.congestion_controller_factory(Arc::new(cubic));
        let mut mtu = MtuDiscoveryConfig::default();
        mtu.upper_bound(self.udp_payload());
        t.initial_mtu(self.initial_mtu.max(1200))
            .mtu_discovery_config(Some(mtu));
        // The conversion fails only for durations beyond 2^62 ms.
        if let Ok(idle) = IdleTimeout::try_from(self.idle_timeout) {
            t.max_idle_timeout(Some(idle));
        }
        Arc::new(t)
    }

    /// The endpoint config: datagrams of up to `max_udp_payload` bytes accepted
    /// (and advertised to the peer, whose MTU discovery stops there).
    pub fn endpoint_config(&self) -> EndpointConfig {
        let mut e = EndpointConfig::default();
        // In quinn's range (1200..=65527) by construction.
        let _ = e.max_udp_payload_size(self.udp_payload());
        e
    }

    /// A bound UDP socket with the requested buffer sizes (best effort).
    pub fn udp_socket(&self, addr: SocketAddr) -> std::io::Result<UdpSocket> {
        let socket = Socket::new(Domain::for_address(addr), Type::DGRAM, Some(Protocol::UDP))?;
        // Best effort: the kernel caps these; a smaller buffer still works.
        let _ = socket.set_recv_buffer_size(self.socket_buffer_bytes);
        let _ = socket.set_send_buffer_size(self.socket_buffer_bytes);
        socket.bind(&addr.into())?;
        Ok(socket.into())
    }
}

/// quinn's socket, with each GSO batch cut into `sendmsg` calls of at most
/// [`MAX_UDP_SEND`] bytes: stock quinn batches up to 10 datagrams of the
/// current MTU per transmit, and the kernel refuses (and quinn drops) a batch
/// over 64 KiB whole (the workspace's quinn bounds its batches to one call
/// itself; the cut stays as a guard, and for a stock quinn).
///
/// It also tells quinn (through `max_transmit_segments`, which quinn asks
/// before each batch) how many datagrams of the last batch's size fit one
/// call, so batches come already sized: at 8952-byte datagrams 7 per
/// `sendmsg`, where 10 would be cut into 7 + 3 (two calls per 10 datagrams).
#[derive(Debug)]
struct BoundedGso {
    inner: Arc<dyn AsyncUdpSocket>,
    /// The GSO segment size of the last batch sent (0: none yet).
    segment: AtomicUsize,
}

impl AsyncUdpSocket for BoundedGso {
    fn create_io_poller(self: Arc<Self>) -> Pin<Box<dyn UdpPoller>> {
        self.inner.clone().create_io_poller()
    }

    fn try_send(&self, transmit: &Transmit) -> std::io::Result<()> {
        let max = usize::from(MAX_UDP_SEND);
        if let Some(segment) = transmit.segment_size {
            self.segment.store(segment, Ordering::Relaxed);
        }
        let Some(segment) = transmit
            .segment_size
            .filter(|_| transmit.contents.len() > max)
        else {
            return self.inner.try_send(transmit);
        };
        let per_call = (max / segment).max(1) * segment;
        for (i, piece) in transmit.contents.chunks(per_call).enumerate() {
            let part = Transmit {
                contents: piece,
                segment_size: (piece.len() > segment).then_some(segment),
                ..*transmit
            };
            match self.inner.try_send(&part) {
                // Part of the batch went: the rest counts as lost, and QUIC
                // sends it again (rare: UDP sockets seldom block).
                Err(e) if i > 0 && e.kind() == std::io::ErrorKind::WouldBlock => return Ok(()),
                r => r?,
            }
        }
        Ok(())
    }

    fn poll_recv(
        &self,
        cx: &mut Context,
        bufs: &mut [IoSliceMut<'_>],
        meta: &mut [RecvMeta],
    ) -> Poll<std::io::Result<usize>> {
        self.inner.poll_recv(cx, bufs, meta)
    }

    fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.inner.local_addr()
    }

    fn max_transmit_segments(&self) -> usize {
        let inner = self.inner.max_transmit_segments();
        match self.segment.load(Ordering::Relaxed) {
            0 => inner,
            segment => inner.min((usize::from(MAX_UDP_SEND) / segment).max(1)),
        }
    }

    fn max_receive_segments(&self) -> usize {
        self.inner.max_receive_segments()
    }

    fn may_fragment(&self) -> bool {
        self.inner.may_fragment()
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;

    use super::*;

    /// Records what it is asked to send; refuses the sends listed in `block`.
    #[derive(Debug, Default)]
    struct Recorder {
        sent: Mutex<Vec<(Vec<u8>, Option<usize>)>>,
        block: Vec<usize>,
        calls: Mutex<usize>,
    }

    #[derive(Debug)]
    struct Ready;

    impl UdpPoller for Ready {
        fn poll_writable(self: Pin<&mut Self>, _: &mut Context) -> Poll<std::io::Result<()>> {
            Poll::Ready(Ok(()))
        }
    }

    impl AsyncUdpSocket for Recorder {
        fn create_io_poller(self: Arc<Self>) -> Pin<Box<dyn UdpPoller>> {
            Box::pin(Ready)
        }
        fn try_send(&self, t: &Transmit) -> std::io::Result<()> {
            let mut calls = self.calls.lock().unwrap();
            *calls += 1;
            if self.block.contains(&(*calls - 1)) {
                return Err(std::io::ErrorKind::WouldBlock.into());
            }
            self.sent
                .lock()
                .unwrap()
                .push((t.contents.to_vec(), t.segment_size));
            Ok(())
        }
        fn poll_recv(
            &self,
            _: &mut Context,
            _: &mut [IoSliceMut<'_>],
            _: &mut [RecvMeta],
        ) -> Poll<std::io::Result<usize>> {
            Poll::Pending
        }
        fn local_addr(&self) -> std::io::Result<SocketAddr> {
            Ok(([127, 0, 0, 1], 1).into())
        }
        fn max_transmit_segments(&self) -> usize {
            10
        }
    }

    fn send(
        block: Vec<usize>,
        segment: usize,
        count: usize,
    ) -> (std::io::Result<()>, Arc<Recorder>) {
        let (r, rec, _) = send_on(block, segment, count);
        (r, rec)
    }

    fn send_on(
        block: Vec<usize>,
        segment: usize,
        count: usize,
    ) -> (std::io::Result<()>, Arc<Recorder>, BoundedGso) {
        let rec = Arc::new(Recorder {
            block,
            ..Recorder::default()
        });
        let socket = BoundedGso {
            inner: rec.clone(),
            segment: AtomicUsize::new(0),
        };
        let contents: Vec<u8> = (0..segment * count).map(|i| (i % 251) as u8).collect();
        let t = Transmit {
            destination: ([127, 0, 0, 1], 2).into(),
            ecn: None,
            contents: &contents,
            segment_size: Some(segment),
            src_ip: None,
        };
        (socket.try_send(&t), rec, socket)
    }

    #[test]
    fn batches_are_sized_to_one_call_after_the_first() {
        // Before any batch: the inner socket's own limit (10 here).
        let (_, _, socket) = send_on(vec![], 1472, 1);
        assert_eq!(
            socket.max_transmit_segments(),
            10,
            "1472-byte datagrams: 44 fit, quinn's 10 stay"
        );
        let (_, _, socket) = send_on(vec![], 8952, 10);
        assert_eq!(
            socket.max_transmit_segments(),
            7,
            "7 x 8952 = 62664 bytes per call"
        );
        let (_, _, socket) = send_on(vec![], 65_000, 2);
        assert_eq!(socket.max_transmit_segments(), 1);
    }

    #[test]
    fn transport_config_carries_the_ack_frequency_knobs() {
        let t = TransportTuning {
            ack_eliciting_threshold: 37,
            ack_reordering_threshold: 5,
            max_ack_delay: Duration::from_micros(700),
            ..TransportTuning::default()
        };
        let debug = format!("{:?}", t.transport_config(0));
        for want in [
            "ack_eliciting_threshold: 37,",
            "reordering_threshold: 5 }",
            "initial_mtu: 1200",
            "max_ack_delay: Some(700µs)",
            "send_fairness: false",
        ] {
            assert!(debug.contains(want), "{want} not in {debug}");
        }
    }

    #[test]
    fn batches_over_64k_are_cut_into_whole_datagrams_in_order() {
        let (r, rec) = send(vec![], 20_000, 10);
        assert!(r.is_ok());
        let sent = rec.sent.lock().unwrap();
        // Three 20 000-byte datagrams fit one call: 3 + 3 + 3 + 1.
        let sizes: Vec<(usize, Option<usize>)> = sent.iter().map(|(b, s)| (b.len(), *s)).collect();
        assert_eq!(
            sizes,
            [
                (60_000, Some(20_000)),
                (60_000, Some(20_000)),
                (60_000, Some(20_000)),
                (20_000, None)
            ]
        );
        let joined: Vec<u8> = sent.iter().flat_map(|(b, _)| b.clone()).collect();
        let expected: Vec<u8> = (0..200_000).map(|i| (i % 251) as u8).collect();
        assert!(joined == expected);
    }

    #[test]
    fn small_batches_pass_through_whole() {
        let (r, rec) = send(vec![], 6550, 10);
        assert!(r.is_ok());
        let sent = rec.sent.lock().unwrap();
        assert_eq!(sent.len(), 1);
        assert_eq!((sent[0].0.len(), sent[0].1), (65_500, Some(6550)));
    }

    #[test]
    fn a_blocked_first_call_is_retried_later_a_blocked_later_one_is_dropped() {
        let (r, rec) = send(vec![0], 65_000, 4);
        assert_eq!(r.unwrap_err().kind(), std::io::ErrorKind::WouldBlock);
        assert!(rec.sent.lock().unwrap().is_empty());
        // quinn must not resend the first datagram, so the rest is dropped
        // (QUIC's loss recovery sends it again).
        let (r, rec) = send(vec![1], 65_000, 4);
        assert!(r.is_ok());
        assert_eq!(rec.sent.lock().unwrap().len(), 1);
    }
}
