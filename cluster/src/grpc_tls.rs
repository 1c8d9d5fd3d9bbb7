//! Mutual TLS on the internal gRPC services: the decode and prefill nodes'
//! `DecodeNode` / `PrefillNode` (and their health service), called by the
//! router and by `tandem status`.
//!
//! With `[tls]` in a config, [`GrpcTls`] holds the cluster CA and the
//! process's own certificate and key (the same files the QUIC KV transport
//! uses). A node's server ([`node_server_tls`], served through
//! [`crate::tls_listener`]) presents its certificate, reloaded when the
//! files change, and refuses any client without a certificate signed by the
//! CA; a client presents its own and
//! verifies the server against the CA, under the name the node advertises
//! (its `[tls] server_name`, in its etcd record) or else the host of its
//! address. Addresses are `https://` when TLS is on and `http://` when it is
//! off; [`endpoint`] refuses a mix, so a TLS client never falls back to
//! plaintext (tonic would dial an `http://` address in the clear even with a
//! TLS config).
//!
//! The rustls provider is ring, as everywhere in the workspace: tonic builds
//! its server configuration with the process-wide default provider, so
//! [`GrpcTls::load`] installs ring as that default when none is set.

use std::path::{Path, PathBuf};
use std::time::Duration;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use tonic::transport::{Certificate, ClientTlsConfig, Endpoint, Identity};

use crate::cert_reload::CertFiles;
use crate::config::TlsSection;
use crate::tls_listener::{ALPN_GRPC, ServerTls, ServerTlsError};

/// Longest wait for a TLS handshake, on either side. A peer that connects
/// and says nothing (or speaks plaintext and waits) is dropped after it.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// Why TLS for gRPC could not be set up, or an address does not fit it.
#[derive(Debug, thiserror::Error)]
pub enum GrpcTlsError {
    /// A `[tls]` file could not be read.
    #[error("[tls] {key} = {path}: {source}")]
    Read {
        /// The `[tls]` key naming the file (`ca`, `cert`, `key`).
        key: &'static str,
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// A `[tls]` file holds no usable PEM certificate or key.
    #[error("[tls] {key} = {path}: {message}")]
    Pem {
        /// The `[tls]` key naming the file.
        key: &'static str,
        /// The file.
        path: PathBuf,
        /// What is wrong with it.
        message: String,
    },
    /// An address that does not fit the TLS setting, or that tonic refuses.
    #[error("node address {addr:?}: {message}")]
    Address {
        /// The address.
        addr: String,
        /// Why it cannot be dialed.
        message: String,
    },
}

/// The cluster CA and this process's certificate, ready for gRPC servers
/// and clients. Cheap to clone (the PEM bytes are shared).
#[derive(Debug, Clone)]
pub struct GrpcTls {
    ca: Certificate,
    identity: Identity,
    server_name: String,
}

fn read(key: &'static str, path: &Path) -> Result<Vec<u8>, GrpcTlsError> {
    std::fs::read(path).map_err(|source| GrpcTlsError::Read {
        key,
        path: path.to_owned(),
        source,
    })
}

impl GrpcTls {
    /// Reads and checks the PEM files `section` names.
    pub fn load(section: &TlsSection) -> Result<Self, GrpcTlsError> {
        install_ring_provider();
        let pem_err = |key: &'static str, path: &Path, message: String| GrpcTlsError::Pem {
            key,
            path: path.to_owned(),
            message,
        };
        let certs = |key: &'static str, path: &Path| -> Result<Vec<u8>, GrpcTlsError> {
            let pem = read(key, path)?;
            let n = CertificateDer::pem_slice_iter(&pem)
                .collect::<Result<Vec<_>, _>>()
                .map_err(|e| pem_err(key, path, e.to_string()))?
                .len();
            if n == 0 {
                return Err(pem_err(key, path, "no PEM certificate in it".into()));
            }
            Ok(pem)
        };
        let ca = certs("ca", &section.ca)?;
        let cert = certs("cert", &section.cert)?;
        let key = read("key", &section.key)?;
        PrivateKeyDer::from_pem_slice(&key)
            .map_err(|e| pem_err("key", &section.key, e.to_string()))?;
        Ok(GrpcTls {
            ca: Certificate::from_pem(ca),
            identity: Identity::from_pem(cert, key),
            server_name: section.server_name.clone(),
        })
    }

    /// This process's own name (`[tls] server_name`), which peers check its
    /// certificate against; a node advertises it in its etcd record.
    pub fn server_name(&self) -> &str {
        &self.server_name
    }

    /// A client's TLS: verify the server against the CA under `server_name`
    /// (`None`: the host of the address dialed), present this certificate.
    pub fn client_config(&self, server_name: Option<&str>) -> ClientTlsConfig {
        let config = ClientTlsConfig::new()
            .ca_certificate(self.ca.clone())
            .identity(self.identity.clone())
            .timeout(HANDSHAKE_TIMEOUT);
        match server_name {
            Some(name) => config.domain_name(name),
            None => config,
        }
    }
}

/// A node's gRPC server TLS: presents `[tls] cert` (reloaded when the files
/// change), requires a client certificate signed by `[tls] ca`.
pub fn node_server_tls(section: &TlsSection) -> Result<ServerTls, ServerTlsError> {
    ServerTls::load(
        CertFiles {
            section: "[tls]",
            cert: section.cert.clone(),
            key: section.key.clone(),
        },
        Some(("ca", &section.ca)),
        ALPN_GRPC,
    )
}

/// Makes ring the process's default rustls provider if none is set yet, so
/// that tonic's server (which asks rustls for the default) never finds the
/// choice ambiguous should another provider enter the dependency tree.
fn install_ring_provider() {
    if rustls::crypto::CryptoProvider::get_default().is_none() {
        // Losing a race with another thread installing one is fine.
        let _ = rustls::crypto::ring::default_provider().install_default();
    }
}

pub use crate::node_scheme::{check_scheme, scheme, with_scheme};

/// An endpoint for the node at `addr`, not yet connected. With `tls`, `addr`
/// must be `https://` and the node's certificate is checked under
/// `server_name` (`None`: the address's host); without, it must be `http://`.
pub fn endpoint(
    addr: &str,
    tls: Option<&GrpcTls>,
    server_name: Option<&str>,
) -> Result<Endpoint, GrpcTlsError> {
    check_scheme(addr, tls.is_some()).map_err(|e| GrpcTlsError::Address {
        addr: e.addr,
        message: e.message.into(),
    })?;
    let bad = |e: tonic::transport::Error| GrpcTlsError::Address {
        addr: addr.to_string(),
        message: error_chain(&e),
    };
    let endpoint = Endpoint::from_shared(addr.to_string()).map_err(bad)?;
    match tls {
        Some(tls) => endpoint
            .tls_config(tls.client_config(server_name))
            .map_err(bad),
        None => Ok(endpoint),
    }
}

/// An error and its sources, `a: b: c`, each source only where the text
/// before it does not end with it already (most of the project's errors put
/// their cause in their own message; tonic's transport errors say only
/// "transport error" at the top).
pub fn error_chain(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        let text = s.to_string();
        if !out.ends_with(&text) {
            out.push_str(": ");
            out.push_str(&text);
        }
        source = s.source();
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_error_chain_says_each_cause_once() {
        #[derive(Debug, thiserror::Error)]
        #[error("cannot read a.toml: {0}")]
        struct Read(#[source] std::io::Error);
        #[derive(Debug, thiserror::Error)]
        #[error("loading the config")]
        struct Load(#[source] Read);
        let io = || std::io::Error::new(std::io::ErrorKind::NotFound, "no such file");
        assert_eq!(
            error_chain(&Load(Read(io()))),
            "loading the config: cannot read a.toml: no such file"
        );
    }

    #[test]
    fn endpoints_follow_the_tls_setting() {
        // Without TLS no client config is needed.
        endpoint("http://127.0.0.1:1", None, None).unwrap();
        assert!(endpoint("https://127.0.0.1:1", None, None).is_err());
    }

    #[test]
    fn cluster_certificates_load_into_server_and_client_configs() {
        let ca = tandem_kv_transfer::ClusterCa::generate("test CA").unwrap();
        let node = ca.issue(&["decode-0.tandem".into()]).unwrap();
        let dir = tempfile::tempdir().unwrap();
        let path = |f: &str| dir.path().join(f);
        std::fs::write(path("ca.pem"), ca.cert_pem()).unwrap();
        std::fs::write(path("n.pem"), &node.cert_pem).unwrap();
        std::fs::write(path("n-key.pem"), &node.key_pem).unwrap();
        let tls = GrpcTls::load(&TlsSection {
            ca: path("ca.pem"),
            cert: path("n.pem"),
            key: path("n-key.pem"),
            server_name: "decode-0.tandem".into(),
        })
        .unwrap();
        assert_eq!(tls.server_name(), "decode-0.tandem");
        node_server_tls(&TlsSection {
            ca: path("ca.pem"),
            cert: path("n.pem"),
            key: path("n-key.pem"),
            server_name: "decode-0.tandem".into(),
        })
        .unwrap();
        endpoint("https://10.0.0.5:7000", Some(&tls), Some("decode-0.tandem")).unwrap();
        endpoint("https://10.0.0.5:7000", Some(&tls), None).unwrap();
        let err = endpoint("http://10.0.0.5:7000", Some(&tls), None)
            .unwrap_err()
            .to_string();
        assert!(err.contains("plaintext"), "{err}");
        // A key file that is not a key is named.
        let err = GrpcTls::load(&TlsSection {
            ca: path("ca.pem"),
            cert: path("n.pem"),
            key: path("n.pem"),
            server_name: "x".into(),
        })
        .unwrap_err()
        .to_string();
        assert!(err.contains("[tls] key"), "{err}");
    }

    #[test]
    fn bad_files_are_named_with_their_key() {
        let dir = tempfile::tempdir().unwrap();
        let junk = dir.path().join("junk.pem");
        std::fs::write(&junk, "not pem").unwrap();
        let section = TlsSection {
            ca: junk.clone(),
            cert: junk.clone(),
            key: dir.path().join("missing.pem"),
            server_name: "localhost".into(),
        };
        let err = GrpcTls::load(&section).unwrap_err().to_string();
        assert!(
            err.contains("[tls] ca") && err.contains("junk.pem"),
            "{err}"
        );
    }
}
