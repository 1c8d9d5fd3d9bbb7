//! Accepting TCP connections under limits, for every listener Tandem runs
//! (the router's gRPC and HTTP APIs, each node's internal gRPC service).
//!
//! Without limits a listener keeps whatever a client opens: a connection that
//! never sends a byte, an HTTP request line sent a byte a minute, a truncated
//! HTTP/2 preface. Each holds a file descriptor until the process runs out
//! of them. So, as mini-redis' server does, each listener holds a semaphore
//! of [`ConnectionsSection::max_connections`] permits; a connection takes one
//! when accepted and gives it back when closed. One past the cap is accepted
//! and closed at once (rather than left in the kernel's backlog, where the
//! client would wait without knowing why).
//!
//! A connection must then start within `header_timeout_s`: [`Guarded`]
//! closes it unless its first [`HTTP2_PREFACE_LEN`] bytes (an HTTP/2
//! preface's length, less than any HTTP/1 request head, less than a TLS
//! ClientHello) arrive in time. What follows is the protocol's: hyper's
//! HTTP/1 header-read timeout (the router's HTTP API), the TLS handshake
//! timeout ([`crate::tls_listener`]) and HTTP/2 keep-alive pings (gRPC),
//! which the callers set from the same section. TCP keep-alive finds peers that vanished.
//!
//! Every connection closed unserved is counted in
//! `tandem_connections_rejected_total{listener, reason}`.

use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use tandem_telemetry::names;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc};
use tokio::time::Sleep;
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;

use crate::config::ConnectionsSection;

/// Bytes a connection must send within the header timeout: the length of the
/// HTTP/2 client preface (`PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n`).
pub const HTTP2_PREFACE_LEN: usize = 24;

/// A listener's limits, from `[connections]`.
#[derive(Debug, Clone, Copy)]
pub struct ConnectionLimits {
    /// Open connections at most.
    pub max_connections: usize,
    /// Time for a connection to start (see the module docs).
    pub header_timeout: Duration,
    /// HTTP/2 keep-alive ping interval and TCP keep-alive time.
    pub keepalive_interval: Duration,
    /// Time for a keep-alive ping's acknowledgement.
    pub keepalive_timeout: Duration,
}

impl From<&ConnectionsSection> for ConnectionLimits {
    fn from(c: &ConnectionsSection) -> Self {
        // The config is validated (positive, at most a day), so these cannot panic.
        ConnectionLimits {
            max_connections: c.max_connections,
            header_timeout: Duration::from_secs_f64(c.header_timeout_s),
            keepalive_interval: Duration::from_secs_f64(c.keepalive_interval_s),
            keepalive_timeout: Duration::from_secs_f64(c.keepalive_timeout_s),
        }
    }
}

impl ConnectionLimits {
    /// Applies the HTTP/2 and TCP keep-alive settings to a tonic server.
    pub fn grpc_server(&self, server: tonic::transport::Server) -> tonic::transport::Server {
        server
            .http2_keepalive_interval(Some(self.keepalive_interval))
            .http2_keepalive_timeout(Some(self.keepalive_timeout))
    }
}

/// Counts one connection closed unserved.
pub(crate) fn rejected(listener: &'static str, reason: &'static str) {
    metrics::counter!(
        names::CONNECTIONS_REJECTED_TOTAL,
        names::LISTENER => listener,
        names::REASON => reason
    )
    .increment(1);
}

/// Exports a `reason` of `listener` at 0, so a dashboard's rate has a baseline.
pub(crate) fn rejected_baseline(listener: &'static str, reason: &'static str) {
    metrics::counter!(
        names::CONNECTIONS_REJECTED_TOTAL,
        names::LISTENER => listener,
        names::REASON => reason
    )
    .increment(0);
}

/// Counts an HTTP/1 connection closed because its request head was too slow
/// (hyper's header-read timeout), for servers that see hyper's error.
pub fn count_header_timeout(listener: &'static str) {
    rejected(listener, "header_timeout");
}

/// Accepts connections on `listener` under `limits` until `shutdown` fires
/// (or the stream is dropped), and yields them ready to serve. `name` labels
/// the metric (`router_grpc`, `decode_grpc`, ...).
///
/// The accept loop is its own task, so the listening socket closes as soon as
/// shutdown fires, whatever the server is doing.
pub fn incoming(
    listener: TcpListener,
    name: &'static str,
    limits: ConnectionLimits,
    shutdown: CancellationToken,
) -> ReceiverStream<io::Result<Guarded>> {
    // Connections wait here only while the server takes the previous ones.
    let (tx, rx) = mpsc::channel(64);
    let permits = Arc::new(Semaphore::new(limits.max_connections));
    // Exported from the start (at 0), so a dashboard's rate has a baseline.
    for reason in ["limit", "handshake_timeout"] {
        rejected_baseline(name, reason);
    }
    tokio::spawn(async move {
        loop {
            let accepted = tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tx.closed() => return,
                a = listener.accept() => a,
            };
            let (stream, peer) = match accepted {
                Ok(a) => a,
                Err(e) => {
                    // Out of descriptors, or a connection reset before it was
                    // taken: not the listener's end. Back off a moment.
                    tracing::debug!(listener = name, error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(10)).await;
                    continue;
                }
            };
            let Ok(permit) = permits.clone().try_acquire_owned() else {
                rejected(name, "limit");
                tracing::debug!(listener = name, %peer, "over the connection cap: closed");
                drop(stream);
                continue;
            };
            if let Err(e) = configure(&stream, &limits) {
                tracing::debug!(listener = name, %peer, error = %e, "socket options");
            }
            let guarded = Guarded::new(stream, peer, permit, name, limits.header_timeout);
            if tx.send(Ok(guarded)).await.is_err() {
                return;
            }
        }
    });
    ReceiverStream::new(rx)
}

/// No Nagle (token messages are small, latency is the product) and TCP
/// keep-alive (a peer that vanished without a FIN is found).
fn configure(stream: &TcpStream, limits: &ConnectionLimits) -> io::Result<()> {
    stream.set_nodelay(true)?;
    let keepalive = socket2::TcpKeepalive::new()
        .with_time(limits.keepalive_interval)
        .with_interval(limits.keepalive_interval);
    socket2::SockRef::from(stream).set_tcp_keepalive(&keepalive)
}

/// An accepted connection: holds its listener's permit until dropped, and
/// fails its reads unless the first [`HTTP2_PREFACE_LEN`] bytes arrive
/// within the header timeout.
pub struct Guarded {
    stream: TcpStream,
    peer: SocketAddr,
    _permit: OwnedSemaphorePermit,
    listener: &'static str,
    /// Bytes still owed before the deadline stops applying.
    owed: usize,
    deadline: Option<Pin<Box<Sleep>>>,
}

impl Guarded {
    fn new(
        stream: TcpStream,
        peer: SocketAddr,
        permit: OwnedSemaphorePermit,
        listener: &'static str,
        header_timeout: Duration,
    ) -> Self {
        Guarded {
            stream,
            peer,
            _permit: permit,
            listener,
            owed: HTTP2_PREFACE_LEN,
            deadline: Some(Box::pin(tokio::time::sleep(header_timeout))),
        }
    }

    /// The peer's address.
    pub fn peer(&self) -> SocketAddr {
        self.peer
    }
}

impl AsyncRead for Guarded {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let before = buf.filled().len();
        let read = Pin::new(&mut this.stream).poll_read(cx, buf);
        if let Some(deadline) = this.deadline.as_mut() {
            if let Poll::Ready(Ok(())) = read {
                let got = buf.filled().len() - before;
                this.owed = this.owed.saturating_sub(got);
                if this.owed == 0 || got == 0 {
                    // Started (or closed by the peer): no deadline any more.
                    this.deadline = None;
                }
                return read;
            }
            if read.is_pending() && deadline.as_mut().poll(cx).is_ready() {
                this.deadline = None;
                rejected(this.listener, "handshake_timeout");
                tracing::debug!(listener = this.listener, peer = %this.peer, "connection did not start in time: closed");
                return Poll::Ready(Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    "the connection did not start within the header timeout",
                )));
            }
        }
        read
    }
}

impl AsyncWrite for Guarded {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().stream).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().stream).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.stream.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().stream).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().stream).poll_shutdown(cx)
    }
}

impl tonic::transport::server::Connected for Guarded {
    type ConnectInfo = tonic::transport::server::TcpConnectInfo;

    fn connect_info(&self) -> Self::ConnectInfo {
        self.stream.connect_info()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio_stream::StreamExt;

    fn limits(max: usize, timeout_ms: u64) -> ConnectionLimits {
        ConnectionLimits {
            max_connections: max,
            header_timeout: Duration::from_millis(timeout_ms),
            keepalive_interval: Duration::from_secs(30),
            keepalive_timeout: Duration::from_secs(10),
        }
    }

    async fn listen(l: ConnectionLimits) -> (SocketAddr, ReceiverStream<io::Result<Guarded>>) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        (
            addr,
            incoming(listener, "test", l, CancellationToken::new()),
        )
    }

    #[tokio::test]
    async fn a_silent_connection_fails_its_read_at_the_deadline() {
        let (addr, mut conns) = listen(limits(4, 100)).await;
        let _client = TcpStream::connect(addr).await.unwrap();
        let mut server = conns.next().await.unwrap().unwrap();
        let started = std::time::Instant::now();
        let err = server.read(&mut [0; 8]).await.unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::TimedOut);
        assert!(started.elapsed() < Duration::from_secs(2));
    }

    #[tokio::test]
    async fn a_connection_that_started_has_no_deadline() {
        let (addr, mut conns) = listen(limits(4, 100)).await;
        let mut client = TcpStream::connect(addr).await.unwrap();
        let mut server = conns.next().await.unwrap().unwrap();
        client.write_all(&[7; HTTP2_PREFACE_LEN]).await.unwrap();
        let mut got = [0; HTTP2_PREFACE_LEN];
        server.read_exact(&mut got).await.unwrap();
        // Idle past the deadline, then more bytes: still read.
        tokio::time::sleep(Duration::from_millis(250)).await;
        client.write_all(b"x").await.unwrap();
        assert_eq!(server.read(&mut [0; 8]).await.unwrap(), 1);
    }

    #[tokio::test]
    async fn past_the_cap_connections_are_closed_until_one_goes() {
        let (addr, mut conns) = listen(limits(2, 10_000)).await;
        let _a = TcpStream::connect(addr).await.unwrap();
        let _b = TcpStream::connect(addr).await.unwrap();
        let first = conns.next().await.unwrap().unwrap();
        let _second = conns.next().await.unwrap().unwrap();
        let mut over = TcpStream::connect(addr).await.unwrap();
        // The listener closes it: the client reads end-of-stream (or a reset).
        let n = tokio::time::timeout(Duration::from_secs(5), over.read(&mut [0; 1]))
            .await
            .expect("closed promptly");
        assert!(matches!(n, Ok(0) | Err(_)), "{n:?}");
        drop(first);
        let _c = TcpStream::connect(addr).await.unwrap();
        tokio::time::timeout(Duration::from_secs(5), conns.next())
            .await
            .expect("accepted once a permit is free")
            .unwrap()
            .unwrap();
    }
}
