//! One [`KvSender`] per decode node, connected on first use and kept.
//!
//! Keyed by the receiver's address, TLS name and certificate, so a decode
//! node that restarts with a new certificate gets a fresh connection. A
//! sender whose connection failed is forgotten and the next request
//! reconnects.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use rustls::pki_types::CertificateDer;
use tandem_cluster::PrefillSection;
use tandem_kv_transfer::{KvSender, SenderConfig, TransferError, tls};

use crate::error::PrefillError;
use crate::validation::KvDestination;

type Key = (SocketAddr, String, Vec<u8>);

/// The prefill node's connections to decode nodes.
pub(crate) struct SenderCache {
    connections: usize,
    /// With `[tls]`: trust the cluster CA and present this node's certificate
    /// (mutual TLS); without: trust the certificate each decode node hands out.
    cluster_tls: Option<Arc<rustls::ClientConfig>>,
    /// This node's model fingerprint digest, in every transfer's Final frame.
    model_fingerprint: u64,
    /// `[prefill] max_send_rate_mbps` in bytes/s: each sender's cap.
    max_send_rate: Option<f64>,
    /// `[prefill] kv_checksum`.
    checksum: bool,
    senders: Mutex<HashMap<Key, Arc<KvSender>>>,
}

fn key(d: &KvDestination) -> Key {
    (d.addr, d.server_name.clone(), d.cert_der.clone())
}

impl SenderCache {
    /// Senders as `config` (`[prefill]`) says, presenting `cluster_tls`, for
    /// a node serving the model of `model_fingerprint`.
    pub fn new(
        config: &PrefillSection,
        cluster_tls: Option<Arc<rustls::ClientConfig>>,
        model_fingerprint: u64,
    ) -> Self {
        SenderCache {
            connections: config.kv_connections,
            cluster_tls,
            model_fingerprint,
            max_send_rate: config.max_send_rate_mbps.map(|m| m * 1e6 / 8.0),
            checksum: config.kv_checksum,
            senders: Mutex::new(HashMap::new()),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<Key, Arc<KvSender>>> {
        self.senders.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The sender for `dest`, connecting if there is none yet.
    pub async fn get(&self, dest: &KvDestination) -> Result<Arc<KvSender>, PrefillError> {
        let k = key(dest);
        if let Some(s) = self.lock().get(&k) {
            return Ok(s.clone());
        }
        let fail = |source: TransferError| PrefillError::Transfer {
            addr: dest.addr,
            source,
        };
        let client_tls = match &self.cluster_tls {
            Some(c) => c.clone(),
            None => {
                let cert = CertificateDer::from(dest.cert_der.clone());
                tls::client_config_trusting(&cert).map_err(|e| {
                    PrefillError::InvalidRequest(format!("kv_target.server_cert_der: {e}"))
                })?
            }
        };
        let config = SenderConfig {
            // At least one connection per receiver endpoint, to use them all.
            connections: self.connections.max(dest.addrs.len()),
            server_name: dest.server_name.clone(),
            model_fingerprint: self.model_fingerprint,
            checksum_payloads: self.checksum,
            ..SenderConfig::default()
        };
        let mut sender = KvSender::connect_many_with(&dest.addrs, client_tls, config)
            .await
            .map_err(fail)?;
        if let Some(rate) = self.max_send_rate {
            sender = sender.with_send_rate_limit(rate);
        }
        let sender = Arc::new(sender);
        // Two requests may race to connect; the later one wins, the other's
        // connections close when its last request ends.
        self.lock().insert(k, sender.clone());
        Ok(sender)
    }

    /// Drops `sender` for `dest` (if it is still the cached one) after a failure.
    pub fn forget(&self, dest: &KvDestination, sender: &Arc<KvSender>) {
        let k = key(dest);
        let mut map = self.lock();
        if map.get(&k).is_some_and(|s| Arc::ptr_eq(s, sender)) {
            map.remove(&k);
        }
    }

    /// Closes every connection.
    pub async fn close_all(&self) {
        let all: Vec<Arc<KvSender>> = self.lock().drain().map(|(_, s)| s).collect();
        for s in all {
            s.close().await;
        }
    }
}
