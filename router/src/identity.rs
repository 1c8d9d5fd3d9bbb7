//! Which nodes serve the cluster's model: the router pairs only nodes whose
//! model fingerprint (`tandem_cluster::fingerprint`) is the cluster's.
//!
//! **The cluster's fingerprint** for the router's model is the operator's
//! `[model] fingerprint` when set, else the fingerprint of the router's own
//! model files, which it opens anyway: it tokenizes prompts and renders chat
//! templates with them, so a node that disagrees with it is wrong whatever
//! the other nodes hold. It is fixed for the router's life, so traffic never
//! moves between two sets of nodes as nodes come and go, whatever their
//! number. Two models coexist under two names, each behind its own router
//! (a router's members are the nodes serving its model's name).
//!
//! A node's fingerprint is known from its membership record (etcd: before
//! the router ever dials it) or from its load reports (static membership:
//! from the first report on). A node whose fingerprint differs is
//! *incompatible*: it gets no request, it is logged once (per fingerprint),
//! and it counts in [`ROUTER_INCOMPATIBLE_NODES`]. A node whose
//! fingerprint is not known yet (static membership, before its first
//! report) ranks after every node known to serve the cluster's model; one
//! that predates fingerprints is routed to that way.

use std::collections::HashMap;
use std::sync::Mutex;

use tandem_cluster::ModelFingerprint;
use tandem_telemetry::names::ROUTER_INCOMPATIBLE_NODES;
use tracing::{info, warn};

/// What the router makes of one node's fingerprint.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// The cluster's model (or no reference to compare with).
    Compatible,
    /// The node has not said what it serves (yet).
    Unknown,
    /// Another model; the reason says what differs.
    Incompatible(String),
}

/// The cluster's fingerprint, and which nodes differ from it.
pub struct Identity {
    reference: Option<ModelFingerprint>,
    /// Incompatible nodes by address, with the fingerprint last logged.
    incompatible: Mutex<HashMap<String, String>>,
    gauge: metrics::Gauge,
}

impl Identity {
    /// Pairs nodes against `reference`; `None` takes every node (a pool in
    /// a test without a model).
    pub fn new(reference: Option<ModelFingerprint>) -> Self {
        if let Some(r) = &reference {
            info!(fingerprint = %r, "the cluster's model fingerprint");
        }
        let gauge = metrics::gauge!(ROUTER_INCOMPATIBLE_NODES);
        gauge.set(0.0);
        Identity {
            reference,
            incompatible: Mutex::new(HashMap::new()),
            gauge,
        }
    }

    /// The cluster's fingerprint, if the router has one.
    pub fn reference(&self) -> Option<&ModelFingerprint> {
        self.reference.as_ref()
    }

    /// The verdict on a node that published `fingerprint` (none: unknown).
    pub fn verdict(&self, fingerprint: Option<&str>) -> Verdict {
        verdict(self.reference.as_ref(), fingerprint)
    }

    /// Records the verdict on node `addr` (logging a newly incompatible node
    /// or fingerprint once, and a node that became compatible), keeps the
    /// gauge in step, and returns whether the node may get requests.
    pub fn note(&self, addr: &str, fingerprint: Option<&str>) -> bool {
        let verdict = self.verdict(fingerprint);
        let mut bad = self.lock();
        match &verdict {
            Verdict::Incompatible(reason) => {
                let text = fingerprint.unwrap_or_default();
                if bad.get(addr).map(String::as_str) != Some(text) {
                    warn!(
                        node = %addr,
                        fingerprint = %text,
                        "node serves another model ({reason}); not routing to it"
                    );
                    bad.insert(addr.to_string(), text.to_string());
                }
            }
            Verdict::Compatible | Verdict::Unknown => {
                if bad.remove(addr).is_some() {
                    info!(node = %addr, "node now serves the cluster's model");
                }
            }
        }
        self.gauge.set(bad.len() as f64);
        !matches!(verdict, Verdict::Incompatible(_))
    }

    /// Forgets a node that left the cluster.
    pub fn forget(&self, addr: &str) {
        let mut bad = self.lock();
        bad.remove(addr);
        self.gauge.set(bad.len() as f64);
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, String>> {
        self.incompatible.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// The verdict on `fingerprint` against `reference` (pure, for tests and
/// `tandem status`).
pub fn verdict(reference: Option<&ModelFingerprint>, fingerprint: Option<&str>) -> Verdict {
    let Some(text) = fingerprint.filter(|t| !t.is_empty()) else {
        return Verdict::Unknown;
    };
    let Some(reference) = reference else {
        return Verdict::Compatible;
    };
    match text.parse::<ModelFingerprint>() {
        Ok(theirs) => match reference.difference(&theirs) {
            None => Verdict::Compatible,
            Some(d) => Verdict::Incompatible(d),
        },
        Err(_) => Verdict::Incompatible(format!("unreadable fingerprint {text:?}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fp(weights: u64, config: u64) -> ModelFingerprint {
        ModelFingerprint {
            config,
            tokenizer: 2,
            chat_template: 3,
            weights,
        }
    }

    #[test]
    fn nodes_are_judged_against_the_reference() {
        let ours = fp(10, 1);
        let r = Some(&ours);
        assert_eq!(verdict(r, Some(&ours.to_string())), Verdict::Compatible);
        assert_eq!(verdict(r, None), Verdict::Unknown);
        assert_eq!(verdict(r, Some("")), Verdict::Unknown);
        assert_eq!(
            verdict(r, Some(&fp(11, 1).to_string())),
            Verdict::Incompatible("weights differ".into())
        );
        assert_eq!(
            verdict(r, Some(&fp(11, 9).to_string())),
            Verdict::Incompatible("model config (shape), weights differ".into())
        );
        assert!(matches!(
            verdict(r, Some("garbage")),
            Verdict::Incompatible(why) if why.contains("unreadable")
        ));
        // Without a reference every published fingerprint is taken.
        assert_eq!(
            verdict(None, Some(&fp(11, 9).to_string())),
            Verdict::Compatible
        );
    }

    #[test]
    fn notes_track_incompatible_nodes_until_they_change_or_leave() {
        let ours = fp(10, 1);
        let id = Identity::new(Some(ours));
        let other = fp(11, 1).to_string();
        assert!(id.note("a", Some(&ours.to_string())));
        assert!(!id.note("b", Some(&other)));
        assert!(!id.note("b", Some(&other)));
        assert!(!id.note("c", Some("nonsense")));
        assert_eq!(id.lock().len(), 2);
        // b restarted with the right weights.
        assert!(id.note("b", Some(&ours.to_string())));
        assert_eq!(id.lock().len(), 1);
        id.forget("c");
        assert!(id.lock().is_empty());
        assert!(id.note("d", None));
    }
}
