//! TLS for the KV transport: rustls configurations (ring provider, TLS 1.3,
//! ALPN `tandem-kv/1`) that the receiver and sender wrap into quinn configs.
//!
//! Two ways to get them:
//!
//! - **Local** ([`SelfSigned`]): the receiver makes a self-signed certificate
//!   at start with rcgen; the sender trusts exactly that certificate, whose
//!   DER the receiver hands out (in-process, or through the cluster config).
//!   Fit for `tandem up` and tests.
//! - **From files** ([`server_config_from_pem`], [`client_config_from_pem`]):
//!   a certificate chain and key for the receiver, a CA bundle for the
//!   sender. [`ClientAuth`] lets the receiver require client certificates
//!   signed by a CA (mutual TLS); the sender then presents its own chain via
//!   [`client_config_from_pem`]'s `identity`.

use std::path::Path;
use std::sync::Arc;

use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use rustls::server::WebPkiClientVerifier;
use rustls::{ClientConfig, RootCertStore, ServerConfig};

/// The ALPN protocol both ends must agree on.
pub const ALPN: &[u8] = b"tandem-kv/1";

/// Why a TLS configuration could not be built.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// Certificate generation failed.
    #[error("generating a self-signed certificate: {0}")]
    Generate(#[from] rcgen::Error),
    /// A PEM file could not be read or parsed.
    #[error("reading {path}: {message}")]
    Pem {
        /// The file.
        path: String,
        /// What went wrong.
        message: String,
    },
    /// rustls refused the material.
    #[error("rustls: {0}")]
    Rustls(#[from] rustls::Error),
    /// The client-certificate verifier could not be built.
    #[error("client certificate verifier: {0}")]
    Verifier(String),
}

/// ring with TLS 1.3's AES-128-GCM suite first. Every KV byte is sealed and
/// opened once; AES-128 runs 10 rounds per block to AES-256's 14, and the
/// cipher is the largest item in a transfer's CPU profile (see BENCH.md).
/// AES-256-GCM stays on offer for peers that insist on it. aws-lc-rs in ring's
/// place moved 6-14% more at 8952-byte datagrams on the 16-core GPU host and
/// 15% less at 1472 (docs/GPU_BENCH.md, twenty-third session), so ring stays.
fn provider() -> Arc<CryptoProvider> {
    use rustls::crypto::ring::cipher_suite::{TLS13_AES_128_GCM_SHA256, TLS13_AES_256_GCM_SHA384};
    Arc::new(CryptoProvider {
        cipher_suites: vec![TLS13_AES_128_GCM_SHA256, TLS13_AES_256_GCM_SHA384],
        ..rustls::crypto::ring::default_provider()
    })
}

/// A self-signed certificate and its key, made at start.
pub struct SelfSigned {
    /// The certificate (DER); hand it to senders.
    pub cert: CertificateDer<'static>,
    key: PrivatePkcs8KeyDer<'static>,
}

impl SelfSigned {
    /// A fresh certificate for the given DNS names (e.g. `["localhost"]`).
    pub fn generate(names: &[&str]) -> Result<Self, TlsError> {
        let names: Vec<String> = names.iter().map(|s| (*s).to_owned()).collect();
        let ck = rcgen::generate_simple_self_signed(names)?;
        Ok(SelfSigned {
            cert: ck.cert.der().clone(),
            key: PrivatePkcs8KeyDer::from(ck.signing_key.serialize_der()),
        })
    }

    /// The receiver's config, presenting this certificate.
    pub fn server_config(&self) -> Result<Arc<ServerConfig>, TlsError> {
        server_config(
            vec![self.cert.clone()],
            PrivateKeyDer::Pkcs8(self.key.clone_key()),
            ClientAuth::None,
        )
    }
}

/// A cluster certificate authority, made with rcgen: it signs one
/// certificate per node, valid both as a TLS server (receiver) and as a
/// client (sender), so one cert/key pair serves a node in either role.
/// Used by `tandem certs` and by tests.
pub struct ClusterCa {
    issuer: rcgen::CertifiedIssuer<'static, rcgen::KeyPair>,
}

/// A node certificate and its key, both PEM.
pub struct NodeCert {
    /// The certificate (PEM).
    pub cert_pem: String,
    /// The private key (PKCS#8 PEM).
    pub key_pem: String,
}

impl ClusterCa {
    /// A fresh CA named `common_name`.
    pub fn generate(common_name: &str) -> Result<Self, TlsError> {
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new())?;
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, common_name);
        params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        params.key_usages = vec![
            rcgen::KeyUsagePurpose::KeyCertSign,
            rcgen::KeyUsagePurpose::CrlSign,
            rcgen::KeyUsagePurpose::DigitalSignature,
        ];
        let key = rcgen::KeyPair::generate()?;
        Ok(ClusterCa {
            issuer: rcgen::CertifiedIssuer::self_signed(params, key)?,
        })
    }

    /// The CA certificate (PEM): every node's `[tls] ca`.
    pub fn cert_pem(&self) -> String {
        self.issuer.pem()
    }

    /// The CA's private key (PEM); keep it off the nodes.
    pub fn key_pem(&self) -> String {
        self.issuer.key().serialize_pem()
    }

    /// The CA certificate (DER).
    pub fn cert_der(&self) -> CertificateDer<'static> {
        self.issuer.der().clone()
    }

    /// A node certificate for `names` (DNS names or IP addresses, its SANs;
    /// the first is also its common name), for server and client auth.
    pub fn issue(&self, names: &[String]) -> Result<NodeCert, TlsError> {
        let mut params = rcgen::CertificateParams::new(names.to_vec())?;
        if let Some(first) = names.first() {
            params
                .distinguished_name
                .push(rcgen::DnType::CommonName, first.as_str());
        }
        params.is_ca = rcgen::IsCa::NoCa;
        params.key_usages = vec![rcgen::KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![
            rcgen::ExtendedKeyUsagePurpose::ServerAuth,
            rcgen::ExtendedKeyUsagePurpose::ClientAuth,
        ];
        let key = rcgen::KeyPair::generate()?;
        let cert = params.signed_by(&key, &self.issuer)?;
        Ok(NodeCert {
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
        })
    }
}

/// A sender config trusting exactly `cert` (a [`SelfSigned::cert`]).
pub fn client_config_trusting(
    cert: &CertificateDer<'static>,
) -> Result<Arc<ClientConfig>, TlsError> {
    let mut roots = RootCertStore::empty();
    roots.add(cert.clone())?;
    client_config(roots, None)
}

/// Whether the receiver asks senders for certificates.
#[derive(Debug, Clone)]
pub enum ClientAuth {
    /// Any sender that completes the handshake may send.
    None,
    /// Senders must present a certificate chaining to one of these roots.
    Require(Vec<CertificateDer<'static>>),
}

/// A receiver config from a certificate chain and key.
pub fn server_config(
    chain: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
    client_auth: ClientAuth,
) -> Result<Arc<ServerConfig>, TlsError> {
    let cfg = server_builder(client_auth)?.with_single_cert(chain, key)?;
    Ok(finish_server_config(cfg))
}

/// A receiver config whose certificate comes from `resolver` at each
/// handshake (a certificate reloaded when its files change: new KV
/// connections get the new one, open ones go on). `client_ca`, when given,
/// makes client certificates signed by it mandatory.
pub fn server_config_with_resolver(
    resolver: Arc<dyn rustls::server::ResolvesServerCert>,
    client_ca: Option<&Path>,
) -> Result<Arc<ServerConfig>, TlsError> {
    let auth = match client_ca {
        None => ClientAuth::None,
        Some(ca) => ClientAuth::Require(read_certs(ca)?),
    };
    let cfg = server_builder(auth)?.with_cert_resolver(resolver);
    Ok(finish_server_config(cfg))
}

fn server_builder(
    client_auth: ClientAuth,
) -> Result<rustls::ConfigBuilder<ServerConfig, rustls::server::WantsServerCert>, TlsError> {
    let builder = ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])?;
    let builder = match client_auth {
        ClientAuth::None => builder.with_no_client_auth(),
        ClientAuth::Require(roots) => {
            let mut store = RootCertStore::empty();
            for c in roots {
                store.add(c)?;
            }
            let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(store), provider())
                .build()
                .map_err(|e| TlsError::Verifier(e.to_string()))?;
            builder.with_client_cert_verifier(verifier)
        }
    };
    Ok(builder)
}

fn finish_server_config(mut cfg: ServerConfig) -> Arc<ServerConfig> {
    cfg.alpn_protocols = vec![ALPN.to_vec()];
    // 0-RTT would let a replayed first flight re-send KV; not worth it.
    cfg.max_early_data_size = 0;
    Arc::new(cfg)
}

fn client_config(
    roots: RootCertStore,
    identity: Option<(Vec<CertificateDer<'static>>, PrivateKeyDer<'static>)>,
) -> Result<Arc<ClientConfig>, TlsError> {
    let builder = ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_root_certificates(roots);
    let mut cfg = match identity {
        None => builder.with_no_client_auth(),
        Some((chain, key)) => builder.with_client_auth_cert(chain, key)?,
    };
    cfg.alpn_protocols = vec![ALPN.to_vec()];
    Ok(Arc::new(cfg))
}

fn pem_err(path: &Path, e: impl std::fmt::Display) -> TlsError {
    TlsError::Pem {
        path: path.display().to_string(),
        message: e.to_string(),
    }
}

fn read_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let certs = CertificateDer::pem_file_iter(path)
        .map_err(|e| pem_err(path, e))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| pem_err(path, e))?;
    if certs.is_empty() {
        return Err(pem_err(path, "no certificates found"));
    }
    Ok(certs)
}

fn read_key(path: &Path) -> Result<PrivateKeyDer<'static>, TlsError> {
    PrivateKeyDer::from_pem_file(path).map_err(|e| pem_err(path, e))
}

/// A receiver config from PEM files: `cert_chain` (leaf first) and `key`;
/// `client_ca`, when given, makes client certificates signed by it mandatory.
pub fn server_config_from_pem(
    cert_chain: &Path,
    key: &Path,
    client_ca: Option<&Path>,
) -> Result<Arc<ServerConfig>, TlsError> {
    let auth = match client_ca {
        None => ClientAuth::None,
        Some(ca) => ClientAuth::Require(read_certs(ca)?),
    };
    server_config(read_certs(cert_chain)?, read_key(key)?, auth)
}

/// A sender config trusting the CAs in `ca`; `identity` (chain, key) is the
/// client certificate for receivers that require one.
pub fn client_config_from_pem(
    ca: &Path,
    identity: Option<(&Path, &Path)>,
) -> Result<Arc<ClientConfig>, TlsError> {
    let mut roots = RootCertStore::empty();
    for c in read_certs(ca)? {
        roots.add(c)?;
    }
    let identity = match identity {
        None => None,
        Some((chain, key)) => Some((read_certs(chain)?, read_key(key)?)),
    };
    client_config(roots, identity)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn self_signed_configs_build() {
        let s = SelfSigned::generate(&["localhost"]).unwrap();
        let server = s.server_config().unwrap();
        assert_eq!(server.alpn_protocols, vec![ALPN.to_vec()]);
        let client = client_config_trusting(&s.cert).unwrap();
        assert_eq!(client.alpn_protocols, vec![ALPN.to_vec()]);
    }

    #[test]
    fn a_cluster_ca_signs_node_certificates_that_load() {
        let ca = ClusterCa::generate("test CA").unwrap();
        let node = ca.issue(&["localhost".into(), "127.0.0.1".into()]).unwrap();
        let dir = tempfile::tempdir().unwrap();
        let (ca_p, cert_p, key_p) = (
            dir.path().join("ca.pem"),
            dir.path().join("n.pem"),
            dir.path().join("n-key.pem"),
        );
        std::fs::write(&ca_p, ca.cert_pem()).unwrap();
        std::fs::write(&cert_p, &node.cert_pem).unwrap();
        std::fs::write(&key_p, &node.key_pem).unwrap();
        server_config_from_pem(&cert_p, &key_p, Some(&ca_p)).unwrap();
        client_config_from_pem(&ca_p, Some((&cert_p, &key_p))).unwrap();
    }

    #[test]
    fn pem_files_load_and_missing_files_are_named() {
        let ck = rcgen::generate_simple_self_signed(vec!["localhost".to_owned()]).unwrap();
        let dir = tempfile::tempdir().unwrap();
        let cert = dir.path().join("cert.pem");
        let key = dir.path().join("key.pem");
        std::fs::write(&cert, ck.cert.pem()).unwrap();
        std::fs::write(&key, ck.signing_key.serialize_pem()).unwrap();
        server_config_from_pem(&cert, &key, None).unwrap();
        server_config_from_pem(&cert, &key, Some(&cert)).unwrap();
        client_config_from_pem(&cert, None).unwrap();
        client_config_from_pem(&cert, Some((&cert, &key))).unwrap();
        let missing = dir.path().join("nope.pem");
        match server_config_from_pem(&missing, &key, None) {
            Err(TlsError::Pem { path, .. }) => assert!(path.ends_with("nope.pem")),
            other => panic!("unexpected {:?}", other.map(|_| ())),
        }
    }
}
