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
//!   quinn sends up to 10 datagrams in one GSO call and the kernel refuses a
//!   call over 64 KiB, so datagrams are capped at [`GSO_SAFE_PAYLOAD`]
//!   (6550 bytes): larger ones fail whole batches, which looks like 30-40%
//!   loss (measured on loopback at 6551, 8000 and 8952 bytes).
//!   (Those failed batches also made discovery's black-hole detector fall
//!   back to 1200-byte packets.)
//!   GSO/GRO stay on (quinn-udp's default).
//! - **Acknowledgement delay**: a receiver may hold an ACK back for up to
//!   25 ms (QUIC's default `max_ack_delay`), and a transfer's end waits for
//!   the last ACK; with the ACK-frequency extension (both ends are quinn) we
//!   ask the peer for at most `max_ack_delay` (1 ms), so the tail of a
//!   transfer is not 25 ms of waiting.
//! - **Socket buffers**: UDP drops what the receive buffer cannot hold, and
//!   a drop costs a congestion-window cut; we ask for large buffers (the
//!   kernel caps them at `net.core.rmem_max` / `wmem_max`).
//! - **Idle timeout and keep-alive**: a connection between two nodes lives
//!   long; keep-alive keeps NAT/conntrack state warm, the idle timeout
//!   notices a dead peer.

use std::net::{SocketAddr, UdpSocket};
use std::sync::Arc;
use std::time::Duration;

use quinn::{
    AckFrequencyConfig, EndpointConfig, IdleTimeout, MtuDiscoveryConfig, TransportConfig, VarInt,
};
use socket2::{Domain, Protocol, Socket, Type};

/// The largest UDP payload of which quinn's largest GSO batch (10 datagrams)
/// fits one `sendmsg`: an IPv4 packet of at most 65535 bytes, less its 20-byte
/// IP and 8-byte UDP headers (measured: 6550 works, 6551 loses every full batch).
pub const GSO_SAFE_PAYLOAD: u16 = (65_535 - 20 - 8) / 10;

/// Transport knobs; the defaults suit a data-centre network.
#[derive(Debug, Clone)]
pub struct TransportTuning {
    /// Bytes a peer may send on one stream ahead of our reading.
    pub stream_receive_window: u32,
    /// Bytes a peer may send on a connection ahead of our reading.
    pub receive_window: u32,
    /// Bytes we keep unacknowledged per connection.
    pub send_window: u64,
    /// Packet size to start with (1200 is always safe).
    pub initial_mtu: u16,
    /// Largest UDP payload MTU discovery may try (capped at [`GSO_SAFE_PAYLOAD`]).
    pub max_udp_payload: u16,
    /// Longest the peer may delay an acknowledgement.
    pub max_ack_delay: Duration,
    /// SO_RCVBUF / SO_SNDBUF requested for each socket.
    pub socket_buffer_bytes: usize,
    /// A connection silent for this long is dead.
    pub idle_timeout: Duration,
    /// Keep-alive ping interval.
    pub keep_alive: Duration,
}

impl Default for TransportTuning {
    fn default() -> Self {
        TransportTuning {
            stream_receive_window: 32 << 20,
            receive_window: 128 << 20,
            send_window: 128 << 20,
            initial_mtu: 1200,
            max_udp_payload: GSO_SAFE_PAYLOAD,
            max_ack_delay: Duration::from_millis(1),
            socket_buffer_bytes: 16 << 20,
            idle_timeout: Duration::from_secs(30),
            keep_alive: Duration::from_secs(5),
        }
    }
}

impl TransportTuning {
    /// The datagram size bound in effect: `max_udp_payload` within 1200..=[`GSO_SAFE_PAYLOAD`].
    pub fn udp_payload(&self) -> u16 {
        self.max_udp_payload.clamp(1200, GSO_SAFE_PAYLOAD)
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
            .keep_alive_interval(Some(self.keep_alive));
        let mut ack = AckFrequencyConfig::default();
        ack.max_ack_delay(Some(self.max_ack_delay));
        t.ack_frequency_config(Some(ack));
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
