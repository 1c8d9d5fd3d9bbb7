//! A TLS listener's certificate, reloaded when its files change: no restart,
//! no dropped connection.
//!
//! [`ReloadingCert`] is the listener's rustls `ResolvesServerCert`: every
//! handshake asks it for the current [`CertifiedKey`], which sits behind a
//! small lock holding an `Arc` (held for a pointer copy, never across an
//! await). [`ReloadingCert::watch`] starts a task that polls the files'
//! modification times every [`POLL_INTERVAL`]; when they change it reads
//! both files, checks that the key matches the certificate, and swaps the
//! new pair in. Connections already open keep the session they negotiated
//! (their streams are untouched); handshakes from then on get the new
//! certificate.
//!
//! A change that cannot be used (a half-written file, a key that does not
//! match, junk) keeps the old certificate. Writers rarely replace the
//! certificate and the key in one step, so a pair that fails is tried again
//! at every poll while the files keep changing, and reported (an error log
//! and `tandem_tls_cert_reloads_total{result="error"}`) once it stays the
//! same for a poll: a rotation written file by file is not reported as a
//! failure, a bad file is within two polls.
//!
//! Only the certificate and key are reloaded; a CA (`[tls] ca`,
//! `[router.tls] client_ca`) is read at start.

use std::io;
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};
use std::time::{Duration, SystemTime};

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use tandem_telemetry::names;
use tokio_util::sync::CancellationToken;

/// How often the watcher looks at the files' modification times.
pub const POLL_INTERVAL: Duration = Duration::from_secs(1);

/// Why a certificate and key could not be used.
#[derive(Debug, thiserror::Error)]
pub enum CertError {
    /// A file could not be read.
    #[error("{section} {key} = {path}: {source}")]
    Read {
        /// The config section (`[tls]`, `[router.tls]`).
        section: &'static str,
        /// The key naming the file (`cert`, `key`, `client_ca`).
        key: &'static str,
        /// The file.
        path: PathBuf,
        /// Why.
        source: io::Error,
    },
    /// A file holds no usable PEM certificate or key, or the key does not
    /// belong to the certificate.
    #[error("{section} {key} = {path}: {message}")]
    Unusable {
        /// The config section.
        section: &'static str,
        /// The key naming the file.
        key: &'static str,
        /// The file.
        path: PathBuf,
        /// What is wrong with it.
        message: String,
    },
}

/// A listener's certificate chain and private key files (PEM), and the
/// config section that names them (for errors).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CertFiles {
    /// The config section, e.g. `[router.tls]`.
    pub section: &'static str,
    /// The certificate chain, leaf first.
    pub cert: PathBuf,
    /// The private key.
    pub key: PathBuf,
}

impl CertFiles {
    /// Reads both files and checks that the key belongs to the certificate.
    pub fn load(&self) -> Result<CertifiedKey, CertError> {
        let unusable = |key: &'static str, path: &Path, message: String| CertError::Unusable {
            section: self.section,
            key,
            path: path.to_owned(),
            message,
        };
        let chain = read_certs(self.section, "cert", &self.cert)?;
        let key_pem = read(self.section, "key", &self.key)?;
        let key = PrivateKeyDer::from_pem_slice(&key_pem)
            .map_err(|e| unusable("key", &self.key, format!("no usable PEM private key ({e})")))?;
        let provider = rustls::crypto::ring::default_provider();
        CertifiedKey::from_der(chain, key, &provider).map_err(|e| {
            unusable(
                "key",
                &self.key,
                format!("does not fit cert {}: {e}", self.cert.display()),
            )
        })
    }

    /// What the watcher compares between polls: each file's modification
    /// time and length (`None` where a file cannot be looked at).
    fn stamp(&self) -> Stamp {
        let of = |p: &Path| {
            std::fs::metadata(p)
                .ok()
                .map(|m| (m.modified().ok(), m.len()))
        };
        Stamp([of(&self.cert), of(&self.key)])
    }
}

/// Reads a file, naming it and its config key on failure.
pub(crate) fn read(
    section: &'static str,
    key: &'static str,
    path: &Path,
) -> Result<Vec<u8>, CertError> {
    std::fs::read(path).map_err(|source| CertError::Read {
        section,
        key,
        path: path.to_owned(),
        source,
    })
}

/// The PEM certificates in a file; at least one.
pub(crate) fn read_certs(
    section: &'static str,
    key: &'static str,
    path: &Path,
) -> Result<Vec<CertificateDer<'static>>, CertError> {
    let pem = read(section, key, path)?;
    let unusable = |message: String| CertError::Unusable {
        section,
        key,
        path: path.to_owned(),
        message,
    };
    let certs = CertificateDer::pem_slice_iter(&pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| unusable(e.to_string()))?;
    if certs.is_empty() {
        return Err(unusable("no PEM certificate in it".into()));
    }
    Ok(certs)
}

type FileStamp = Option<(Option<SystemTime>, u64)>;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Stamp([FileStamp; 2]);

/// A listener's current certificate, swapped when its files change.
#[derive(Debug)]
pub struct ReloadingCert {
    files: CertFiles,
    current: RwLock<Arc<CertifiedKey>>,
}

impl ReloadingCert {
    /// Loads `files`; a file that is missing or unusable is an error here,
    /// at start (later, a bad file only keeps the old certificate).
    pub fn load(files: CertFiles) -> Result<Arc<Self>, CertError> {
        let key = files.load()?;
        Ok(Arc::new(ReloadingCert {
            files,
            current: RwLock::new(Arc::new(key)),
        }))
    }

    /// The config section naming the files (`[tls]`, `[router.tls]`).
    pub fn section(&self) -> &'static str {
        self.files.section
    }

    /// The certificate handshakes get now.
    pub fn current(&self) -> Arc<CertifiedKey> {
        // A poisoned lock still holds a valid certificate.
        self.current
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    fn swap(&self, key: CertifiedKey) {
        *self.current.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(key);
    }

    /// Starts the task that reloads the files when they change, polling
    /// every `interval` ([`POLL_INTERVAL`] in the servers), until `shutdown`
    /// fires. `listener` labels logs and the metric.
    pub fn watch(
        self: &Arc<Self>,
        listener: &'static str,
        interval: Duration,
        shutdown: CancellationToken,
    ) {
        // Exported from the start (at 0), so a dashboard's rate has a baseline.
        for result in ["ok", "error"] {
            reloads(listener, result).increment(0);
        }
        let cert = Arc::downgrade(self);
        let mut watch = Watch::new(self.files.stamp());
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(interval);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tokio::select! {
                    _ = shutdown.cancelled() => return,
                    _ = tick.tick() => {}
                }
                // The listener is gone: nothing to reload for.
                let Some(cert) = cert.upgrade() else { return };
                let stamp = cert.files.stamp();
                if !watch.changed(stamp) {
                    continue;
                }
                let files = cert.files.clone();
                let loaded = tokio::task::spawn_blocking(move || files.load()).await;
                let loaded = loaded.unwrap_or_else(|e| {
                    Err(CertError::Unusable {
                        section: cert.files.section,
                        key: "cert",
                        path: cert.files.cert.clone(),
                        message: format!("the reload task failed: {e}"),
                    })
                });
                match loaded {
                    Ok(key) => {
                        cert.swap(key);
                        watch.applied(stamp);
                        reloads(listener, "ok").increment(1);
                        tracing::info!(
                            listener,
                            cert = %cert.files.cert.display(),
                            "TLS certificate reloaded"
                        );
                    }
                    Err(e) => {
                        if watch.failed(stamp) {
                            reloads(listener, "error").increment(1);
                            tracing::error!(
                                listener,
                                "TLS certificate not reloaded, the old one stays in use: {e}"
                            );
                        }
                    }
                }
            }
        });
    }
}

fn reloads(listener: &'static str, result: &'static str) -> metrics::Counter {
    metrics::counter!(
        names::TLS_CERT_RELOADS_TOTAL,
        names::LISTENER => listener,
        names::RESULT => result
    )
}

impl ResolvesServerCert for ReloadingCert {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.current())
    }
}

/// The watcher's memory between polls (no I/O, so its rules are tested
/// directly): the files' stamp when the served certificate was loaded, and
/// the last stamp that failed.
#[derive(Debug)]
struct Watch {
    applied: Stamp,
    /// A stamp that failed to load, and whether that failure was reported.
    failing: Option<(Stamp, bool)>,
}

impl Watch {
    fn new(applied: Stamp) -> Self {
        Watch {
            applied,
            failing: None,
        }
    }

    /// Whether the files should be (re)loaded: they differ from what is
    /// served and are not a failure already reported.
    fn changed(&self, stamp: Stamp) -> bool {
        stamp != self.applied && self.failing != Some((stamp, true))
    }

    fn applied(&mut self, stamp: Stamp) {
        self.applied = stamp;
        self.failing = None;
    }

    /// Records a failed load of `stamp`; true when it is to be reported
    /// (the same files failed at the poll before: they stopped changing).
    fn failed(&mut self, stamp: Stamp) -> bool {
        let report = matches!(self.failing, Some((s, false)) if s == stamp);
        self.failing = Some((stamp, report));
        report
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn stamp(n: u64) -> Stamp {
        Stamp([Some((None, n)), Some((None, n))])
    }

    #[test]
    fn a_failure_is_retried_while_the_files_change_and_reported_once_they_settle() {
        let mut w = Watch::new(stamp(1));
        assert!(!w.changed(stamp(1)));
        // The certificate was written, the key not yet: fails, not reported.
        assert!(w.changed(stamp(2)));
        assert!(!w.failed(stamp(2)));
        // The key was written: loads.
        assert!(w.changed(stamp(3)));
        w.applied(stamp(3));
        assert!(!w.changed(stamp(3)));
        // A bad file: not reported at the first poll, reported at the second,
        // then left alone until it changes again.
        assert!(w.changed(stamp(4)));
        assert!(!w.failed(stamp(4)));
        assert!(w.changed(stamp(4)));
        assert!(w.failed(stamp(4)));
        assert!(!w.changed(stamp(4)));
        assert!(w.changed(stamp(5)));
    }

    fn write_pair(dir: &Path, name: &str) -> (CertFiles, String) {
        let ck = rcgen::generate_simple_self_signed(vec![name.to_owned()]).unwrap();
        let files = CertFiles {
            section: "[test.tls]",
            cert: dir.join("cert.pem"),
            key: dir.join("key.pem"),
        };
        std::fs::write(&files.cert, ck.cert.pem()).unwrap();
        std::fs::write(&files.key, ck.signing_key.serialize_pem()).unwrap();
        (files, ck.cert.pem())
    }

    fn served_der(cert: &ReloadingCert) -> Vec<u8> {
        cert.current().cert[0].to_vec()
    }

    fn der_of(pem: &str) -> Vec<u8> {
        CertificateDer::from_pem_slice(pem.as_bytes())
            .unwrap()
            .to_vec()
    }

    #[tokio::test]
    async fn new_files_are_served_and_bad_ones_keep_the_old_certificate() {
        let dir = tempfile::tempdir().unwrap();
        let (files, first) = write_pair(dir.path(), "one.test");
        let cert = ReloadingCert::load(files.clone()).unwrap();
        assert_eq!(served_der(&cert), der_of(&first));
        let shutdown = CancellationToken::new();
        cert.watch("test", Duration::from_millis(20), shutdown.clone());

        let wait_for = |want: Vec<u8>| {
            let cert = cert.clone();
            async move {
                let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
                while served_der(&cert) != want {
                    assert!(tokio::time::Instant::now() < deadline, "not reloaded");
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
            }
        };
        let (_, second) = write_pair(dir.path(), "two.test");
        wait_for(der_of(&second)).await;

        // Junk in the key file: the second certificate stays.
        std::fs::write(&files.key, "not a key").unwrap();
        tokio::time::sleep(Duration::from_millis(200)).await;
        assert_eq!(served_der(&cert), der_of(&second));
        // A key from another pair: refused too.
        let other = rcgen::generate_simple_self_signed(vec!["x".to_owned()]).unwrap();
        std::fs::write(&files.key, other.signing_key.serialize_pem()).unwrap();
        tokio::time::sleep(Duration::from_millis(200)).await;
        assert_eq!(served_der(&cert), der_of(&second));

        let (_, third) = write_pair(dir.path(), "three.test");
        wait_for(der_of(&third)).await;
        shutdown.cancel();
    }

    #[test]
    fn bad_files_at_start_are_named_with_their_section_and_key() {
        let dir = tempfile::tempdir().unwrap();
        let (mut files, _) = write_pair(dir.path(), "a.test");
        files.key = dir.path().join("missing.pem");
        let err = ReloadingCert::load(files.clone()).unwrap_err().to_string();
        assert!(
            err.contains("[test.tls] key") && err.contains("missing.pem"),
            "{err}"
        );
        std::fs::write(dir.path().join("junk.pem"), "junk").unwrap();
        files.cert = dir.path().join("junk.pem");
        let err = ReloadingCert::load(files).unwrap_err().to_string();
        assert!(err.contains("[test.tls] cert"), "{err}");
    }
}
