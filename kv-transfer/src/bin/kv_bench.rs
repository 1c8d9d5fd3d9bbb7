//! kv_bench: moves a Llama-3-8B-shaped KV cache (32 layers x 8 KV heads x
//! 128 head_dim, bf16, 16-token blocks: 128 KiB per token) between two
//! processes on loopback, over QUIC (this crate) and over plain TCP with the
//! same framing, and measures how much transfer stays exposed after a
//! simulated layer-by-layer prefill.
//!
//! The binary re-executes itself with `--role receiver` as the receiving
//! child. Each QUIC run connects, makes one untimed transfer of the same size
//! (a prefill node's connections are long-lived, so MTU discovery and the
//! congestion window are warm), then times the next. Usage (all flags optional):
//!
//! ```text
//! kv_bench [--tokens 4096,32768] [--conns 1,4,8] [--tcp-conns 1,4] [--tls]
//!          [--overlap-tokens 8192] [--overlap-conns 4] [--compute-ms 9.39]
//!          [--overlap-chunk-tokens 0,2048]
//!          [--max-udp-payload 1472,8952,65527] [--frame-kib 4096]
//!          [--rx-endpoints 1,0] [--stream-window-mib 32] [--conn-window-mib 128]
//!          [--send-window-mib 128] [--ack-threshold 1,20] [--markdown PATH]
//! ```
//!
//! Each `--max-udp-payload` entry is a datagram size bound (the path MTU
//! less IP and UDP headers: 1472 for a 1500-byte MTU, 8952 for 9000 over
//! IPv6, 65527 loopback's most); for each, the bench runs TCP and then QUIC
//! at every connection count, endpoint count and `--ack-threshold` (the
//! ACK-frequency extension's ack-eliciting threshold the sender asks for),
//! side by side in the same run. `--markdown` appends one Markdown table of
//! the best QUIC against the best TCP per size to PATH. `--overlap-tokens 0`
//! skips the overlap runs.
//!
//! `--concurrent N` sends N requests at once in each timed QUIC run (the
//! rate counts all of them; each request's own end is printed), over
//! streams that round-robin packet by packet with `--fairness` or go in
//! write order without (the default); the receiver says at the end how many
//! frames it kept as the packets' buffers.
//!
//! `--rx-endpoints` lists receiver endpoint counts to try for each QUIC
//! connection count; 0 means "as many as connections" (capped at the
//! receiver's endpoints). The receiver child binds the largest count needed
//! (at least `max(--conns)`) and prints all its addresses; the sender
//! connects round-robin over the first k of them.
//!
//! The overlap runs simulate a prefill of `--overlap-tokens` at
//! `--compute-ms` per layer, once per `--overlap-chunk-tokens` entry: 0 is
//! the whole prompt in one pass (the last layer's whole transfer is exposed
//! by construction), n is chunked prefill in chunks of n tokens, as the
//! prefill node runs it (each chunk's layers are sent as they finish).
//!
//! `--tls` also times TCP under TLS 1.3 (rustls, the QUIC transport's own
//! provider and AES-128-GCM suite: `tls.rs`) at each `--tcp-conns` count:
//! the baseline that encrypts as QUIC does, so the gap between the two ratios
//! is what encryption costs and the rest is QUIC's own.
//!
//! (One file of about 650 lines on purpose: a bench binary whose sender,
//! receiver child and TCP baseline share the same constants and framing.)

use std::io::{BufRead, BufReader, Write};
use std::net::SocketAddr;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail};
use bytes::{Bytes, BytesMut};
use rustls::pki_types::CertificateDer;
use tandem_kv_transfer::tls::{SelfSigned, client_config_trusting};
use tandem_kv_transfer::wire::{DEFAULT_MAX_PAYLOAD, Frame, FrameDecoder, encode_final};
use tandem_kv_transfer::{
    FirstToken, KvReceiver, KvSender, KvSink, LayerHeader, LayerShape, Payload, ReceiverConfig,
    SenderConfig, SinkError, TransportTuning, WireDtype,
};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio_util::either::Either;

const LAYERS: u16 = 32;
const HEADS: u16 = 8;
const HEAD_DIM: u16 = 128;
const BLOCK_SIZE: u16 = 16;
const BLOCK_BYTES: usize = 2 * HEADS as usize * BLOCK_SIZE as usize * HEAD_DIM as usize * 2;

struct Args {
    role_receiver: bool,
    tokens: Vec<usize>,
    conns: Vec<usize>,
    tcp_conns: Vec<usize>,
    overlap_tokens: usize,
    overlap_conns: usize,
    overlap_chunk_tokens: Vec<usize>,
    compute_ms: f64,
    max_udp_payload: Vec<u16>,
    ack_threshold: Vec<u32>,
    send_window: u32,
    markdown: Option<std::path::PathBuf>,
    frame_bytes: u32,
    rx_endpoints: Vec<usize>,
    rx_bind: usize,
    stream_window: u32,
    conn_window: u32,
    checksum: bool,
    concurrent: usize,
    fairness: bool,
    tls: bool,
}

fn default_compute_ms() -> f64 {
    // Llama-3-8B prefill of 8k tokens at 55% of 793 TFLOP/s, per layer.
    2.0 * 8e9 * 8192.0 / (0.55 * 793e12) / 32.0 * 1e3
}

/// The flags, as clap parses them; [`Args`] holds them in the units the bench uses.
#[derive(Debug, clap::Parser)]
#[command(
    name = "kv_bench",
    about = "QUIC vs TCP KV transfer of a Llama-3-8B-shaped cache on loopback"
)]
struct Flags {
    /// Which end this process is (`receiver` is the child the bench starts itself).
    #[arg(long, value_enum, default_value_t = BenchRole::Sender)]
    role: BenchRole,
    /// Prompt sizes to transfer, in tokens.
    #[arg(long, value_delimiter = ',', default_values_t = [4096usize, 32768])]
    tokens: Vec<usize>,
    /// QUIC connection counts to try.
    #[arg(long, value_delimiter = ',', default_values_t = [1usize, 4, 8])]
    conns: Vec<usize>,
    /// TCP connection counts to try.
    #[arg(long, value_delimiter = ',', default_values_t = [1usize, 4])]
    tcp_conns: Vec<usize>,
    /// Prompt size of the simulated layer-by-layer prefill.
    #[arg(long, default_value_t = 8192)]
    overlap_tokens: usize,
    /// QUIC connections of the overlap runs.
    #[arg(long, default_value_t = 4)]
    overlap_conns: usize,
    /// Chunk sizes of the overlap runs (0: the whole prompt in one pass).
    #[arg(long, value_delimiter = ',', default_values_t = [0usize, 2048])]
    overlap_chunk_tokens: Vec<usize>,
    /// Simulated compute per layer, milliseconds (default: Llama-3-8B, 8k
    /// tokens at 55% of 793 TFLOP/s).
    #[arg(long, default_value_t = default_compute_ms())]
    compute_ms: f64,
    /// Largest UDP payloads QUIC may use, one run of everything per entry.
    #[arg(long, value_delimiter = ',', default_values_t = [TransportTuning::default().max_udp_payload])]
    max_udp_payload: Vec<u16>,
    /// ACK-frequency ack-eliciting thresholds to try (QUIC runs only).
    #[arg(long, value_delimiter = ',', default_values_t = [TransportTuning::default().ack_eliciting_threshold])]
    ack_threshold: Vec<u32>,
    /// QUIC per-connection send window (unacknowledged bytes), MiB.
    #[arg(long, default_value_t = (TransportTuning::default().send_window >> 20) as u32)]
    send_window_mib: u32,
    /// Append a Markdown table of the results to this file.
    #[arg(long)]
    markdown: Option<std::path::PathBuf>,
    /// Largest frame payload, KiB.
    #[arg(long, default_value_t = 4096)]
    frame_kib: u32,
    /// Receiver endpoint counts to try per connection count (0: as many as connections).
    #[arg(long, value_delimiter = ',', default_values_t = [1usize, 0])]
    rx_endpoints: Vec<usize>,
    /// Endpoints the receiver child binds (set by the parent).
    #[arg(long, default_value_t = 0)]
    rx_bind: usize,
    /// QUIC per-stream receive window, MiB.
    #[arg(long, default_value_t = TransportTuning::default().stream_receive_window >> 20)]
    stream_window_mib: u32,
    /// QUIC per-connection receive window, MiB.
    #[arg(long, default_value_t = TransportTuning::default().receive_window >> 20)]
    conn_window_mib: u32,
    /// Layer frames carry their xxh3 checksum, over QUIC and TCP alike (a
    /// prefill node's default is without: `SenderConfig::checksum_payloads`).
    #[arg(long)]
    checksum: bool,
    /// Requests each timed QUIC run sends at once over the same connections
    /// (as a prefill node does for concurrent prompts).
    #[arg(long, default_value_t = 1)]
    concurrent: usize,
    /// Round-robin between a connection's streams packet by packet
    /// (`TransportTuning::send_fairness`; off by default).
    #[arg(long)]
    fairness: bool,
    /// Also time TCP under TLS 1.3 (the QUIC transport's rustls provider),
    /// at each `--tcp-conns` count.
    #[arg(long)]
    tls: bool,
}

/// `--role`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum BenchRole {
    Sender,
    Receiver,
}

fn parse_args() -> Result<Args> {
    let f = <Flags as clap::Parser>::parse();
    for (name, counts) in [
        ("conns", &f.conns[..]),
        ("tcp-conns", &f.tcp_conns[..]),
        ("overlap-conns", &[f.overlap_conns][..]),
        ("concurrent", &[f.concurrent][..]),
    ] {
        if counts.contains(&0) {
            bail!("--{name} takes counts of 1 or more");
        }
    }
    let mib = |name: &str, v: u32| {
        v.checked_mul(1 << 20)
            .ok_or_else(|| anyhow!("--{name} {v} is too large"))
    };
    Ok(Args {
        role_receiver: f.role == BenchRole::Receiver,
        tokens: f.tokens,
        conns: f.conns,
        tcp_conns: f.tcp_conns,
        overlap_tokens: f.overlap_tokens,
        overlap_conns: f.overlap_conns,
        overlap_chunk_tokens: f.overlap_chunk_tokens,
        compute_ms: f.compute_ms,
        max_udp_payload: f.max_udp_payload,
        ack_threshold: f.ack_threshold,
        send_window: mib("send-window-mib", f.send_window_mib)?,
        markdown: f.markdown,
        frame_bytes: f
            .frame_kib
            .checked_mul(1024)
            .ok_or_else(|| anyhow!("--frame-kib {} is too large", f.frame_kib))?,
        rx_endpoints: f.rx_endpoints,
        rx_bind: f.rx_bind,
        stream_window: mib("stream-window-mib", f.stream_window_mib)?,
        conn_window: mib("conn-window-mib", f.conn_window_mib)?,
        checksum: f.checksum,
        concurrent: f.concurrent.max(1),
        fairness: f.fairness,
        tls: f.tls,
    })
}

/// One QUIC configuration of a run: the datagram bound and the ACK threshold.
#[derive(Debug, Clone, Copy)]
struct Quic {
    max_udp_payload: u16,
    ack_threshold: u32,
}

fn tuning(a: &Args, q: Quic) -> TransportTuning {
    TransportTuning {
        max_udp_payload: q.max_udp_payload,
        ack_eliciting_threshold: q.ack_threshold,
        stream_receive_window: a.stream_window,
        receive_window: a.conn_window,
        send_window: u64::from(a.send_window),
        send_fairness: a.fairness,
        ..TransportTuning::default()
    }
}

/// The receiver child's transport: it accepts the largest datagrams of any run.
fn receiver_tuning(a: &Args) -> TransportTuning {
    let q = Quic {
        max_udp_payload: a.max_udp_payload.iter().copied().max().unwrap_or(1472),
        ack_threshold: TransportTuning::default().ack_eliciting_threshold,
    };
    tuning(a, q)
}

#[tokio::main]
async fn main() -> Result<()> {
    // As the node binaries do; TANDEM_KEEP_FREED_MEMORY=0 measures without.
    tandem_kv_transfer::memory::keep_freed_memory();
    let args = parse_args()?;
    if args.role_receiver {
        receiver(&args).await
    } else {
        sender(&args).await
    }
}

// ---------------------------------------------------------------- receiver

/// Counts bytes; the decoder has already verified each checksum (if any).
struct CountingSink {
    bytes: AtomicU64,
    frames: AtomicU64,
    /// Frames whose payload came as the packets' buffers (not copied into one
    /// because they were scattered: `wire::Payload`).
    kept: AtomicU64,
}

impl KvSink for CountingSink {
    fn on_layer(&self, _header: &LayerHeader, payload: Payload) -> Result<(), SinkError> {
        self.bytes
            .fetch_add(payload.len() as u64, Ordering::Relaxed);
        self.frames.fetch_add(1, Ordering::Relaxed);
        if payload.parts().len() > 1 {
            self.kept.fetch_add(1, Ordering::Relaxed);
        }
        Ok(())
    }
    fn on_final(&self, _transfer_id: u64, _layers_sent: u32) -> Result<(), SinkError> {
        Ok(())
    }
    fn on_abort(&self, transfer_id: u64, reason: &str) {
        eprintln!("receiver: transfer {transfer_id} aborted: {reason}");
    }
    fn on_first_token(&self, _transfer_id: u64, _first: FirstToken) {}
}

/// The first token the bench's transfers carry.
const FIRST: FirstToken = FirstToken {
    id: 1,
    logprobs: None,
};

async fn receiver(args: &Args) -> Result<()> {
    let cert = SelfSigned::generate(&["localhost"])?;
    let sink = Arc::new(CountingSink {
        bytes: AtomicU64::new(0),
        frames: AtomicU64::new(0),
        kept: AtomicU64::new(0),
    });
    let config = ReceiverConfig {
        transport: receiver_tuning(args),
        endpoints: args.rx_bind.max(1),
        ..ReceiverConfig::default()
    };
    let (rx, _) = KvReceiver::bind_with(
        "127.0.0.1:0".parse()?,
        cert.server_config()?,
        sink.clone(),
        config,
        tokio_util::sync::CancellationToken::new(),
    )?;
    let tcp = TcpListener::bind("127.0.0.1:0").await?;
    let tcp_addr = tcp.local_addr()?;
    let tls = TcpListener::bind("127.0.0.1:0").await?;
    let tls_addr = tls.local_addr()?;
    let hex: String = cert.cert.iter().map(|b| format!("{b:02x}")).collect();
    let quic_addrs: Vec<String> = rx.local_addrs()?.iter().map(|a| a.to_string()).collect();
    println!("READY {} {tcp_addr} {tls_addr} {hex}", quic_addrs.join(","));
    // UDP drops what the receive buffer cannot hold; the kernel caps the
    // buffer we ask for at net.core.rmem_max.
    let probe = receiver_tuning(args).udp_socket("127.0.0.1:0".parse()?)?;
    let rcvbuf = socket2::SockRef::from(&probe).recv_buffer_size()?;
    let rmem_max = std::fs::read_to_string("/proc/sys/net/core/rmem_max").unwrap_or_default();
    eprintln!(
        "receiver: asked SO_RCVBUF {} KiB, got {} KiB (net.core.rmem_max {})",
        receiver_tuning(args).socket_buffer_bytes >> 10,
        rcvbuf >> 10,
        rmem_max.trim()
    );
    std::io::stdout().flush()?;
    tokio::spawn(async move {
        while let Ok((sock, _)) = tcp.accept().await {
            let _ = sock.set_nodelay(true);
            tokio::spawn(tcp_serve(sock));
        }
    });
    let acceptor = tokio_rustls::TlsAcceptor::from(cert.server_config()?);
    tokio::spawn(async move {
        while let Ok((sock, _)) = tls.accept().await {
            let _ = sock.set_nodelay(true);
            let acceptor = acceptor.clone();
            tokio::spawn(async move {
                match acceptor.accept(sock).await {
                    Ok(sock) => tcp_serve(sock).await,
                    Err(e) => eprintln!("tls receiver: handshake: {e}"),
                }
            });
        }
    });
    // Run until the parent closes our stdin.
    let mut stdin = tokio::io::stdin();
    let mut buf = [0u8; 64];
    while stdin.read(&mut buf).await.map(|n| n > 0).unwrap_or(false) {}
    rx.shutdown().await;
    eprintln!(
        "receiver: {} layer frames, {} kept as the packets' buffers (the rest copied into one)",
        sink.frames.load(Ordering::Relaxed),
        sink.kept.load(Ordering::Relaxed)
    );
    Ok(())
}

/// Bytes a TCP read asks for.
const TCP_READ: usize = 1 << 20;

/// TCP (plain or under TLS): same frames, same decoder (each read's buffer is
/// handed to it, not copied); one ack byte per Final.
async fn tcp_serve<S: AsyncRead + AsyncWrite + Unpin>(mut sock: S) {
    let mut dec = FrameDecoder::new(DEFAULT_MAX_PAYLOAD);
    let mut buf = BytesMut::new();
    loop {
        if buf.capacity() < TCP_READ / 4 {
            buf = BytesMut::with_capacity(TCP_READ);
        }
        match sock.read_buf(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(_) => {}
        }
        dec.push(buf.split().freeze());
        loop {
            match dec.next_frame() {
                Ok(Some(Frame::Final { .. })) => {
                    if sock.write_all(&[1]).await.is_err() || sock.flush().await.is_err() {
                        return;
                    }
                }
                Ok(Some(_)) => {}
                Ok(None) => break,
                Err(e) => {
                    eprintln!("tcp receiver: {e}");
                    return;
                }
            }
        }
    }
}

// ------------------------------------------------------------------ sender

/// A request's KV: one buffer per layer, each with its own bytes, as an
/// engine's per-layer caches are (one buffer resent for every layer would
/// stay in the CPU caches at small sizes and flatter a copy-bound transport).
struct Kv {
    layers: Vec<Bytes>,
    blocks: u32,
}

impl Kv {
    fn new(tokens: usize) -> Kv {
        let blocks = tokens.div_ceil(BLOCK_SIZE as usize);
        let layers = (0..u64::from(LAYERS))
            .map(|layer| {
                let words = blocks * BLOCK_BYTES / 8;
                let mut v = Vec::with_capacity(words * 8);
                for i in 0..words as u64 {
                    let x = (i ^ (layer << 48))
                        .wrapping_mul(0x9E37_79B9_7F4A_7C15)
                        .rotate_left(17);
                    v.extend_from_slice(&x.to_le_bytes());
                }
                Bytes::from(v)
            })
            .collect();
        Kv {
            layers,
            blocks: blocks as u32,
        }
    }

    fn layer_bytes(&self) -> u64 {
        self.layers.first().map_or(0, |l| l.len() as u64)
    }

    fn bytes(&self) -> u64 {
        self.layer_bytes() * self.layers.len() as u64
    }
}

fn shape(layer: u16, first_block: u32, blocks: u32) -> LayerShape {
    LayerShape {
        layer,
        first_block,
        block_count: blocks,
        dtype: WireDtype::Bf16,
        head_start: 0,
        head_count: HEADS,
        total_heads: HEADS,
        head_dim: HEAD_DIM,
        block_size: BLOCK_SIZE,
    }
}

struct Child {
    quic: Vec<SocketAddr>,
    tcp: SocketAddr,
    tls: SocketAddr,
    cert: CertificateDer<'static>,
    proc: std::process::Child,
}

fn spawn_receiver(args: &Args) -> Result<Child> {
    let exe = std::env::current_exe()?;
    let most_conns = args
        .conns
        .iter()
        .copied()
        .chain([args.overlap_conns])
        .max()
        .unwrap_or(1);
    let rx_bind = args
        .rx_endpoints
        .iter()
        .map(|&k| if k == 0 { most_conns } else { k })
        .max()
        .unwrap_or(1)
        .max(1);
    let mut cmd = Command::new(exe);
    cmd.args([
        "--role",
        "receiver",
        "--max-udp-payload",
        &receiver_tuning(args).max_udp_payload.to_string(),
        "--rx-bind",
        &rx_bind.to_string(),
        "--stream-window-mib",
        &(args.stream_window >> 20).to_string(),
        "--conn-window-mib",
        &(args.conn_window >> 20).to_string(),
        "--send-window-mib",
        &(args.send_window >> 20).to_string(),
    ]);
    let mut proc = cmd.stdin(Stdio::piped()).stdout(Stdio::piped()).spawn()?;
    let out = proc.stdout.take().context("child stdout")?;
    let mut line = String::new();
    BufReader::new(out).read_line(&mut line)?;
    let parts: Vec<&str> = line.split_whitespace().collect();
    if parts.len() != 5 || parts[0] != "READY" {
        bail!("receiver said {line:?}");
    }
    let der = (0..parts[4].len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&parts[4][i..i + 2], 16))
        .collect::<Result<Vec<u8>, _>>()?;
    Ok(Child {
        quic: parts[1]
            .split(',')
            .map(|a| a.parse())
            .collect::<Result<Vec<SocketAddr>, _>>()?,
        tcp: parts[2].parse()?,
        tls: parts[3].parse()?,
        cert: CertificateDer::from(der),
        proc,
    })
}

/// What the connections saw, summed: losses and congestion events say whether
/// the link or the CPU is the limit; datagrams per send call say whether GSO
/// batches.
fn print_path_stats(stats: &[quinn::ConnectionStats]) {
    let sum = |f: &dyn Fn(&quinn::ConnectionStats) -> u64| stats.iter().map(f).sum::<u64>();
    let sent = sum(&|s| s.path.sent_packets);
    let lost = sum(&|s| s.path.lost_packets);
    let events = sum(&|s| s.path.congestion_events);
    let datagrams = sum(&|s| s.udp_tx.datagrams);
    let ios = sum(&|s| s.udp_tx.ios).max(1);
    let cwnd = sum(&|s| s.path.cwnd) / stats.len().max(1) as u64;
    let mtu = stats.iter().map(|s| s.path.current_mtu).min().unwrap_or(0);
    let mtu_max = stats.iter().map(|s| s.path.current_mtu).max().unwrap_or(0);
    let rtt = stats.iter().map(|s| s.path.rtt).max().unwrap_or_default();
    let acks = sum(&|s| s.frame_rx.acks);
    println!(
        "      packets sent {sent}, lost {lost} ({:.3}%), ACK frames received {acks} ({:.1} packets/ACK), congestion events {events}, datagrams/send call {:.1}, mean cwnd {} KiB, mtu {mtu}..{mtu_max}, max rtt {:.0} us",
        100.0 * lost as f64 / sent.max(1) as f64,
        sent as f64 / acks.max(1) as f64,
        datagrams as f64 / ios as f64,
        cwnd >> 10,
        rtt.as_secs_f64() * 1e6
    );
}

fn gbps(bytes: u64, d: Duration) -> f64 {
    bytes as f64 / d.as_secs_f64() / 1e9
}

/// CPU time (user + system, all threads) of process `pid` so far, from
/// `/proc/<pid>/stat` (clock ticks of 10 ms); zero where there is no `/proc`.
fn cpu_time(pid: u32) -> Duration {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // The fields after the command name (which may hold spaces), from field 3 on.
    let rest = stat.rsplit_once(')').map_or("", |(_, r)| r);
    let ticks: u64 = rest
        .split_whitespace()
        .skip(11)
        .take(2)
        .filter_map(|f| f.parse::<u64>().ok())
        .sum();
    Duration::from_millis(ticks * 10)
}

/// The CPU both ends of a run spent, for the CPU cost of a GB moved (a
/// figure that, unlike the rate, does not depend on how many cores are free).
#[derive(Clone, Copy)]
struct CpuClock {
    child: u32,
    at: (Duration, Duration),
}

impl CpuClock {
    fn start(child: &Child) -> Self {
        let child = child.proc.id();
        CpuClock {
            child,
            at: (cpu_time(std::process::id()), cpu_time(child)),
        }
    }

    /// CPU seconds per GB of `bytes` since `start`, sender and receiver together.
    fn per_gb(&self, bytes: u64) -> f64 {
        let sender = cpu_time(std::process::id()).saturating_sub(self.at.0);
        let receiver = cpu_time(self.child).saturating_sub(self.at.1);
        (sender + receiver).as_secs_f64() / (bytes as f64 / 1e9)
    }
}

/// The simulated prefill of an overlap run: `compute` per layer for the
/// whole prompt, in chunks of `chunk_blocks` blocks (all layers of a chunk,
/// then the next chunk, as chunked prefill runs; each chunk-layer takes its
/// share of `compute` by token count).
#[derive(Clone, Copy)]
struct Pace {
    compute: Duration,
    chunk_blocks: u32,
}

/// One timed QUIC transfer.
struct QuicRun {
    total: Duration,
    /// What outlasted the simulated compute (overlap runs).
    exposed: Duration,
    stats: Vec<quinn::ConnectionStats>,
    /// CPU seconds per GB, both processes.
    cpu_per_gb: f64,
}

async fn quic_run(
    child: &Child,
    args: &Args,
    quic: Quic,
    (conns, rx_endpoints): (usize, usize),
    kv: &Kv,
    transfer_id: u64,
    pace: Option<Pace>,
) -> Result<QuicRun> {
    let cfg = SenderConfig {
        connections: conns,
        max_frame_payload: args.frame_bytes,
        transport: tuning(args, quic),
        timeout: Duration::from_secs(120),
        checksum_payloads: args.checksum,
        ..SenderConfig::default()
    };
    let addrs = &child.quic[..rx_endpoints.clamp(1, child.quic.len())];
    let sender =
        KvSender::connect_many_with(addrs, client_config_trusting(&child.cert)?, cfg).await?;
    // A prefill node keeps its connections to a decode node: warm them up
    // (MTU discovery, congestion window) with one untimed transfer.
    send_request(&sender, transfer_id + (1 << 40), kv, None).await?;
    let cpu = CpuClock::start(child);
    let start = Instant::now();
    let n = if pace.is_some() { 1 } else { args.concurrent };
    // Each of `n` requests, timed to its own end.
    let sender_ref = &sender;
    let ends = futures::future::try_join_all((0..n as u64).map(|i| async move {
        send_request(
            sender_ref,
            transfer_id + (i << 48),
            kv,
            pace.map(|p| (start, p)),
        )
        .await?;
        anyhow::Ok(start.elapsed())
    }))
    .await?;
    let total = start.elapsed();
    let cpu_per_gb = cpu.per_gb(kv.bytes() * n as u64);
    if n > 1 {
        let mean = ends.iter().sum::<Duration>() / n as u32;
        println!(
            "      {n} requests at once: each done after {:.1} ms on average (first {:.1}, last {:.1})",
            mean.as_secs_f64() * 1e3,
            ends.iter().min().unwrap_or(&total).as_secs_f64() * 1e3,
            total.as_secs_f64() * 1e3
        );
    }
    let stats = sender.connection_stats();
    let compute_end = pace
        .map(|p| p.compute * u32::from(LAYERS))
        .unwrap_or_default();
    sender.close().await;
    Ok(QuicRun {
        total,
        exposed: total.saturating_sub(compute_end),
        stats,
        cpu_per_gb,
    })
}

/// Sends every layer of one request and finishes it. With `pace`, each
/// chunk-layer is queued only when the simulated GPU has finished it (the
/// GPU timeline does not wait for the network); without, all at once as
/// whole layers.
async fn send_request(
    sender: &KvSender,
    transfer_id: u64,
    kv: &Kv,
    pace: Option<(Instant, Pace)>,
) -> Result<()> {
    let chunk = pace.map_or(kv.blocks, |(_, p)| p.chunk_blocks.clamp(1, kv.blocks));
    let mut req = sender.open_request(transfer_id).await?;
    let mut first = 0;
    while first < kv.blocks {
        let n = chunk.min(kv.blocks - first);
        for layer in 0..LAYERS {
            if let Some((start, p)) = pace {
                // Done after the layers of the chunks before, and this
                // chunk's layers up to this one.
                let done = p.compute.as_secs_f64()
                    * (f64::from(first) + f64::from(n) * f64::from(layer + 1) / f64::from(LAYERS))
                    / f64::from(kv.blocks)
                    * f64::from(LAYERS);
                tokio::time::sleep_until((start + Duration::from_secs_f64(done)).into()).await;
            }
            let bytes = kv.layers[usize::from(layer)]
                .slice(first as usize * BLOCK_BYTES..(first + n) as usize * BLOCK_BYTES);
            req.send_layer(shape(layer, first, n), bytes).await?;
        }
        first += n;
    }
    req.finish(&FIRST, u32::from(LAYERS)).await?;
    Ok(())
}

/// One TCP connection's sending task: the frames it is handed (like the QUIC
/// sender's lanes, it hashes its own frames), then a Final, then the
/// receiver's ack byte.
async fn tcp_lane<S: AsyncRead + AsyncWrite + Unpin>(
    mut sock: S,
    mut rx: mpsc::Receiver<(LayerShape, Bytes)>,
    checksum: bool,
) -> Result<()> {
    while let Some((shape, piece)) = rx.recv().await {
        let header = if checksum {
            LayerHeader::for_payload(2, shape, &piece)?
        } else {
            LayerHeader::unhashed(2, shape, piece.len())?
        };
        sock.write_all(&header.encode()).await?;
        sock.write_all(&piece).await?;
    }
    sock.write_all(&encode_final(2, &FIRST, u32::from(LAYERS), 0, 0))
        .await?;
    sock.flush().await?;
    let mut ack = [0u8; 1];
    sock.read_exact(&mut ack).await?;
    Ok(())
}

/// A timed TCP run over `conns` connections, under TLS 1.3 when `tls`
/// (handshakes before the clock starts, as QUIC's connections are warm).
async fn tcp_run(
    child: &Child,
    conns: usize,
    kv: &Kv,
    args: &Args,
    tls: bool,
) -> Result<(Duration, f64)> {
    let (frame_bytes, checksum) = (args.frame_bytes, args.checksum);
    let blocks = kv.blocks;
    let per_frame = (frame_bytes as usize / BLOCK_BYTES).max(1) as u32;
    let connector = if tls {
        Some(tokio_rustls::TlsConnector::from(client_config_trusting(
            &child.cert,
        )?))
    } else {
        None
    };
    let mut socks = Vec::new();
    for _ in 0..conns {
        let sock = TcpStream::connect(if tls { child.tls } else { child.tcp }).await?;
        sock.set_nodelay(true)?;
        socks.push(match &connector {
            Some(c) => {
                let name = rustls::pki_types::ServerName::try_from("localhost")?;
                Either::Right(c.connect(name, sock).await?)
            }
            None => Either::Left(sock),
        });
    }
    let cpu = CpuClock::start(child);
    let start = Instant::now();
    let mut lanes = Vec::new();
    for sock in socks {
        let (tx, rx) = mpsc::channel::<(LayerShape, Bytes)>(16);
        lanes.push((tx, tokio::spawn(tcp_lane(sock, rx, checksum))));
    }
    let mut next = 0;
    for layer in 0..LAYERS {
        let mut b = 0;
        while b < blocks {
            let n = per_frame.min(blocks - b);
            let piece = kv.layers[usize::from(layer)]
                .slice(b as usize * BLOCK_BYTES..(b + n) as usize * BLOCK_BYTES);
            lanes[next % conns]
                .0
                .send((shape(layer, b, n), piece))
                .await?;
            next += 1;
            b += n;
        }
    }
    let mut tasks = Vec::new();
    for (tx, task) in lanes {
        drop(tx);
        tasks.push(task);
    }
    for t in tasks {
        t.await??;
    }
    Ok((start.elapsed(), cpu.per_gb(kv.bytes())))
}

/// The best of each transport for one datagram size and prompt size.
struct Row {
    max_udp_payload: u16,
    tokens: usize,
    tcp: f64,
    tcp_conns: usize,
    /// CPU seconds per GB of the best TCP run.
    tcp_cpu: f64,
    /// The best TCP-under-TLS run (`--tls`; 0 without), its connections and CPU per GB.
    tls: f64,
    tls_conns: usize,
    tls_cpu: f64,
    quic: f64,
    quic_label: String,
    /// CPU seconds per GB of the best QUIC run.
    quic_cpu: f64,
}

async fn sender(args: &Args) -> Result<()> {
    let mut child = spawn_receiver(args)?;
    println!(
        "KV shape: {LAYERS} layers x {HEADS} KV heads x {HEAD_DIM} head_dim, bf16, block {BLOCK_SIZE} ({} KiB/token), a distinct buffer per layer; frames <= {} KiB; max UDP payloads {:?}; {} cores",
        BLOCK_BYTES * LAYERS as usize / BLOCK_SIZE as usize / 1024,
        args.frame_bytes / 1024,
        args.max_udp_payload,
        std::thread::available_parallelism().map_or(1, |n| n.get())
    );
    let mut id = 100;
    let mut rows = Vec::new();
    for &payload in &args.max_udp_payload {
        for &tokens in &args.tokens {
            id += 1000;
            rows.push(compare(&child, args, payload, tokens, &mut id).await?);
        }
    }
    let table = markdown(&rows);
    println!("\n{table}");
    if let Some(path) = &args.markdown {
        let mut f = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
            .with_context(|| format!("opening {}", path.display()))?;
        f.write_all(table.as_bytes())?;
    }
    if args.overlap_tokens > 0 {
        for &payload in &args.max_udp_payload {
            id += 1000;
            overlap(&child, args, payload, &mut id).await?;
        }
    }
    drop(child.proc.stdin.take());
    let _ = child.proc.wait();
    Ok(())
}

/// TCP, then QUIC at every connection count, endpoint count and ACK
/// threshold, for one datagram size and prompt size.
async fn compare(
    child: &Child,
    args: &Args,
    payload: u16,
    tokens: usize,
    id: &mut u64,
) -> Result<Row> {
    let kv = Kv::new(tokens);
    let bytes = kv.bytes();
    println!(
        "\n{tokens} tokens: {:.2} GiB, max UDP payload {}",
        bytes as f64 / (1u64 << 30) as f64,
        payload_label(payload)
    );
    let mut row = Row {
        max_udp_payload: payload,
        tokens,
        tcp: 0.0,
        tcp_conns: 0,
        tcp_cpu: 0.0,
        tls: 0.0,
        tls_conns: 0,
        tls_cpu: 0.0,
        quic: 0.0,
        quic_label: String::new(),
        quic_cpu: 0.0,
    };
    for &c in &args.tcp_conns {
        let (d, cpu) = tcp_run(child, c, &kv, args, false).await?;
        let g = gbps(bytes, d);
        if g > row.tcp {
            (row.tcp, row.tcp_conns, row.tcp_cpu) = (g, c, cpu);
        }
        println!(
            "  tcp  conns={c}: {:>7.1} ms  {g:>6.2} GB/s  cpu {cpu:.2} s/GB",
            d.as_secs_f64() * 1e3
        );
    }
    for &c in args.tcp_conns.iter().filter(|_| args.tls) {
        let (d, cpu) = tcp_run(child, c, &kv, args, true).await?;
        let g = gbps(bytes, d);
        if g > row.tls {
            (row.tls, row.tls_conns, row.tls_cpu) = (g, c, cpu);
        }
        println!(
            "  tls  conns={c}: {:>7.1} ms  {g:>6.2} GB/s  ({:.2}x of best tcp)  cpu {cpu:.2} s/GB",
            d.as_secs_f64() * 1e3,
            g / row.tcp
        );
    }
    for &ack_threshold in &args.ack_threshold {
        let quic = Quic {
            max_udp_payload: payload,
            ack_threshold,
        };
        for &c in &args.conns {
            let mut tried = Vec::new();
            for &k in &args.rx_endpoints {
                let k = if k == 0 { c } else { k }.clamp(1, child.quic.len());
                if tried.contains(&k) {
                    continue;
                }
                tried.push(k);
                *id += 1;
                let run = quic_run(child, args, quic, (c, k), &kv, *id, None).await?;
                let g = gbps(bytes * args.concurrent as u64, run.total);
                if g > row.quic {
                    row.quic = g;
                    row.quic_label =
                        format!("{c} conns, {k} rx endpoints, ack threshold {ack_threshold}");
                    row.quic_cpu = run.cpu_per_gb;
                }
                println!(
                    "  quic conns={c} rx_endpoints={k} ack_threshold={ack_threshold}: {:>7.1} ms  {g:>6.2} GB/s  ({:.2}x of best tcp)  cpu {:.2} s/GB",
                    run.total.as_secs_f64() * 1e3,
                    g / row.tcp,
                    run.cpu_per_gb
                );
                print_path_stats(&run.stats);
            }
        }
    }
    println!("  best quic / best tcp = {:.2}", row.quic / row.tcp);
    if args.tls {
        println!("  best quic / best tls = {:.2}", row.quic / row.tls);
    }
    Ok(row)
}

/// A datagram bound as asked, and as used where the transport caps it
/// (at one `sendmsg`'s 65507 bytes).
fn payload_label(asked: u16) -> String {
    let used = TransportTuning {
        max_udp_payload: asked,
        ..TransportTuning::default()
    }
    .udp_payload();
    if used == asked {
        asked.to_string()
    } else {
        format!("{asked} ({used} used)")
    }
}

fn markdown(rows: &[Row]) -> String {
    let tls = rows.iter().any(|r| r.tls > 0.0);
    let mut t = String::from(
        "| max UDP payload | KV tokens | best TCP GB/s | best QUIC GB/s | QUIC / TCP | best QUIC setting | CPU s/GB: TCP, QUIC |",
    );
    t.push_str(if tls {
        " best TLS/TCP GB/s | QUIC / TLS | TLS CPU s/GB |\n|---|---|---|---|---|---|---|---|---|---|\n"
    } else {
        "\n|---|---|---|---|---|---|---|\n"
    });
    for r in rows {
        t.push_str(&format!(
            "| {} | {} | {:.2} ({} conns) | {:.2} | {:.2} | {} | {:.2}, {:.2} |",
            payload_label(r.max_udp_payload),
            r.tokens,
            r.tcp,
            r.tcp_conns,
            r.quic,
            r.quic / r.tcp,
            r.quic_label,
            r.tcp_cpu,
            r.quic_cpu
        ));
        if tls {
            t.push_str(&format!(
                " {:.2} ({} conns) | {:.2} | {:.2} |",
                r.tls,
                r.tls_conns,
                r.quic / r.tls,
                r.tls_cpu
            ));
        }
        t.push('\n');
    }
    t
}

/// Overlap: the simulated GPU finishes each chunk-layer in turn; each is
/// queued as soon as it is ready. One receiver endpoint per connection.
async fn overlap(child: &Child, args: &Args, payload: u16, id: &mut u64) -> Result<()> {
    let quic = Quic {
        max_udp_payload: payload,
        ack_threshold: args
            .ack_threshold
            .last()
            .copied()
            .unwrap_or(TransportTuning::default().ack_eliciting_threshold),
    };
    let compute = Duration::from_secs_f64(args.compute_ms / 1e3);
    let tokens = args.overlap_tokens;
    let kv = Kv::new(tokens);
    let layer_bytes = kv.layer_bytes();
    let oc = args.overlap_conns;
    *id += 1;
    let alone = quic_run(child, args, quic, (oc, oc), &kv, *id, None)
        .await?
        .total;
    let rate = gbps(kv.bytes(), alone);
    let one_layer = Duration::from_secs_f64(layer_bytes as f64 / (rate * 1e9));
    println!(
        "\noverlap: {tokens} tokens, max UDP payload {payload}, quic conns={oc} (rx endpoints = conns), compute {:.2} ms/layer ({:.1} ms total), layer = {:.1} MiB",
        args.compute_ms,
        args.compute_ms * f64::from(LAYERS),
        layer_bytes as f64 / (1 << 20) as f64
    );
    println!(
        "  transfer alone: {:.1} ms ({rate:.2} GB/s); one layer's transfer: {:.1} ms",
        alone.as_secs_f64() * 1e3,
        one_layer.as_secs_f64() * 1e3
    );
    let needed = layer_bytes as f64 / compute.as_secs_f64() / 1e9;
    println!("  rate needed to hide the transfer: {needed:.2} GB/s");
    for &chunk in &args.overlap_chunk_tokens {
        let chunk = if chunk == 0 {
            tokens
        } else {
            chunk.min(tokens)
        };
        let pace = Pace {
            compute,
            chunk_blocks: chunk.div_ceil(usize::from(BLOCK_SIZE)) as u32,
        };
        *id += 1;
        let QuicRun {
            total,
            exposed,
            stats,
            ..
        } = quic_run(child, args, quic, (oc, oc), &kv, *id, Some(pace)).await?;
        println!(
            "  prefill chunks of {chunk} tokens: total {:.1} ms; exposed after the last compute: {:.1} ms = {:.2} layer-transfers",
            total.as_secs_f64() * 1e3,
            exposed.as_secs_f64() * 1e3,
            exposed.as_secs_f64() / one_layer.as_secs_f64()
        );
        print_path_stats(&stats);
    }
    Ok(())
}
