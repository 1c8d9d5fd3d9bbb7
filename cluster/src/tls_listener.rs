//! TLS on Tandem's TCP listeners, with certificates that reload.
//!
//! tonic's own server TLS takes a fixed certificate, so listeners that serve
//! TLS terminate it here instead: [`incoming`] accepts connections under the
//! listener's limits ([`crate::listener`]), runs each TLS handshake in its
//! own task (a slow handshake never holds up the others; one that does not
//! finish within the header timeout is closed and counted with `reason =
//! "tls_handshake"`), and yields [`Conn`]s that tonic and hyper serve like
//! plain sockets. The certificate comes from a [`ReloadingCert`], so a
//! rotated certificate is served from the next handshake on while open
//! connections and their streams go on.
//!
//! [`ServerTls`] builds the rustls configuration: the certificate resolver,
//! ALPN for the protocol served (`h2` for gRPC, `http/1.1` for the HTTP
//! API), and optionally client certificates required and checked against a
//! CA (mutual TLS).

use std::io;
use std::path::Path;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use rustls::ServerConfig;
use rustls::server::WebPkiClientVerifier;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpListener;
use tokio::sync::mpsc;
use tokio_rustls::TlsAcceptor;
use tokio_rustls::server::TlsStream;
use tokio_stream::StreamExt;
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;

use crate::cert_reload::{CertError, CertFiles, POLL_INTERVAL, ReloadingCert, read_certs};
use crate::listener::{self, ConnectionLimits, Guarded};

/// ALPN for gRPC (HTTP/2).
pub const ALPN_GRPC: &[&[u8]] = &[b"h2"];
/// ALPN for the HTTP/1.1 API.
pub const ALPN_HTTP1: &[&[u8]] = &[b"http/1.1"];

/// Why a listener's TLS could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum ServerTlsError {
    /// A certificate, key or CA file.
    #[error(transparent)]
    Files(#[from] CertError),
    /// rustls refused the material.
    #[error("{section}: {message}")]
    Rustls {
        /// The config section.
        section: &'static str,
        /// rustls' message.
        message: String,
    },
}

/// A listener's TLS: its reloading certificate and rustls configuration.
#[derive(Debug, Clone)]
pub struct ServerTls {
    cert: Arc<ReloadingCert>,
    config: Arc<ServerConfig>,
}

impl ServerTls {
    /// Loads `files` (an error names the bad file), and with `client_ca`
    /// requires every client to present a certificate signed by it. `alpn`
    /// is [`ALPN_GRPC`] or [`ALPN_HTTP1`].
    pub fn load(
        files: CertFiles,
        client_ca: Option<(&'static str, &Path)>,
        alpn: &[&[u8]],
    ) -> Result<Self, ServerTlsError> {
        let cert = ReloadingCert::load(files)?;
        Self::with_cert(cert, client_ca, alpn)
    }

    /// A configuration over a certificate another listener also serves
    /// (the router's gRPC and HTTP APIs share `[router.tls]`).
    pub fn with_cert(
        cert: Arc<ReloadingCert>,
        client_ca: Option<(&'static str, &Path)>,
        alpn: &[&[u8]],
    ) -> Result<Self, ServerTlsError> {
        let section = cert.section();
        let rustls_err = |e: &dyn std::fmt::Display| ServerTlsError::Rustls {
            section,
            message: e.to_string(),
        };
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let builder = ServerConfig::builder_with_provider(provider.clone())
            .with_safe_default_protocol_versions()
            .map_err(|e| rustls_err(&e))?;
        let builder = match client_ca {
            None => builder.with_no_client_auth(),
            Some((key, path)) => {
                let mut roots = rustls::RootCertStore::empty();
                for c in read_certs(section, key, path)? {
                    roots.add(c).map_err(|e| CertError::Unusable {
                        section,
                        key,
                        path: path.to_owned(),
                        message: e.to_string(),
                    })?;
                }
                let verifier =
                    WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider)
                        .build()
                        .map_err(|e| rustls_err(&e))?;
                builder.with_client_cert_verifier(verifier)
            }
        };
        let mut config = builder.with_cert_resolver(cert.clone());
        config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
        Ok(ServerTls {
            cert,
            config: Arc::new(config),
        })
    }

    /// The certificate this listener serves.
    pub fn cert(&self) -> &Arc<ReloadingCert> {
        &self.cert
    }

    /// Starts reloading the certificate when its files change (every
    /// [`POLL_INTERVAL`]) until `shutdown` fires.
    pub fn watch(&self, listener: &'static str, shutdown: CancellationToken) {
        self.cert.watch(listener, POLL_INTERVAL, shutdown);
    }
}

/// An accepted connection, plain or TLS.
pub enum Conn {
    /// Plaintext.
    Plain(Guarded),
    /// TLS, handshake done.
    Tls(Box<TlsStream<Guarded>>),
}

impl Conn {
    fn tcp(&self) -> &Guarded {
        match self {
            Conn::Plain(g) => g,
            Conn::Tls(t) => t.get_ref().0,
        }
    }

    /// The peer's address.
    pub fn peer(&self) -> std::net::SocketAddr {
        self.tcp().peer()
    }
}

/// Accepts connections on `tcp` under `limits` until `shutdown` fires; with
/// `tls`, each completes a TLS handshake (within the header timeout) first.
/// `name` labels the metrics (`router_grpc`, `decode_grpc`, ...).
pub fn incoming(
    tcp: TcpListener,
    name: &'static str,
    limits: ConnectionLimits,
    tls: Option<&ServerTls>,
    shutdown: CancellationToken,
) -> ReceiverStream<io::Result<Conn>> {
    let mut accepted = listener::incoming(tcp, name, limits, shutdown.clone());
    let (tx, rx) = mpsc::channel(64);
    let acceptor = tls.map(|t| TlsAcceptor::from(t.config.clone()));
    if acceptor.is_some() {
        listener::rejected_baseline(name, "tls_handshake");
    }
    tokio::spawn(async move {
        // Ends when the accept task stops (shutdown) or the server goes.
        while let Some(conn) = accepted.next().await {
            let conn = match conn {
                Ok(c) => c,
                Err(e) => {
                    if tx.send(Err(e)).await.is_err() {
                        return;
                    }
                    continue;
                }
            };
            let Some(acceptor) = acceptor.clone() else {
                if tx.send(Ok(Conn::Plain(conn))).await.is_err() {
                    return;
                }
                continue;
            };
            let tx = tx.clone();
            let shutdown = shutdown.clone();
            tokio::spawn(async move {
                let peer = conn.peer();
                let handshake = tokio::time::timeout(limits.header_timeout, acceptor.accept(conn));
                let stream = tokio::select! {
                    _ = shutdown.cancelled() => return,
                    h = handshake => h,
                };
                match stream {
                    Ok(Ok(stream)) => {
                        let _ = tx.send(Ok(Conn::Tls(Box::new(stream)))).await;
                    }
                    Ok(Err(e)) => {
                        listener::rejected(name, "tls_handshake");
                        tracing::debug!(listener = name, %peer, error = %e, "TLS handshake failed");
                    }
                    Err(_) => {
                        listener::rejected(name, "tls_handshake");
                        tracing::debug!(listener = name, %peer, "TLS handshake timed out");
                    }
                }
            });
        }
    });
    ReceiverStream::new(rx)
}

impl AsyncRead for Conn {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Conn::Plain(s) => Pin::new(s).poll_read(cx, buf),
            Conn::Tls(s) => Pin::new(s.as_mut()).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for Conn {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Conn::Plain(s) => Pin::new(s).poll_write(cx, buf),
            Conn::Tls(s) => Pin::new(s.as_mut()).poll_write(cx, buf),
        }
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Conn::Plain(s) => Pin::new(s).poll_write_vectored(cx, bufs),
            Conn::Tls(s) => Pin::new(s.as_mut()).poll_write_vectored(cx, bufs),
        }
    }

    fn is_write_vectored(&self) -> bool {
        match self {
            Conn::Plain(s) => s.is_write_vectored(),
            Conn::Tls(s) => s.is_write_vectored(),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Conn::Plain(s) => Pin::new(s).poll_flush(cx),
            Conn::Tls(s) => Pin::new(s.as_mut()).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Conn::Plain(s) => Pin::new(s).poll_shutdown(cx),
            Conn::Tls(s) => Pin::new(s.as_mut()).poll_shutdown(cx),
        }
    }
}

impl tonic::transport::server::Connected for Conn {
    type ConnectInfo = tonic::transport::server::TcpConnectInfo;

    fn connect_info(&self) -> Self::ConnectInfo {
        self.tcp().connect_info()
    }
}
