//! Who is in the cluster. The router asks a [`Membership`] for the current
//! members and watches for changes; static membership comes from the config,
//! and a dynamic source (etcd) implements the same trait.

use tokio::sync::watch;

/// A node's role.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Role {
    /// Computes prompts' KV caches.
    Prefill,
    /// Generates tokens with continuous batching.
    Decode,
}

/// One node of the cluster.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Member {
    /// Its role.
    pub role: Role,
    /// Its internal gRPC address, `http://host:port`; also its identity here.
    pub grpc_addr: String,
}

/// A source of the cluster's members.
pub trait Membership: Send + Sync + 'static {
    /// The members now, and every change after.
    fn watch(&self) -> watch::Receiver<Vec<Member>>;
}

/// Members fixed at start (from the config).
pub struct StaticMembership {
    tx: watch::Sender<Vec<Member>>,
}

impl StaticMembership {
    /// Membership of these prefill and decode nodes.
    pub fn new(prefill: &[String], decode: &[String]) -> Self {
        let members = prefill
            .iter()
            .map(|a| Member {
                role: Role::Prefill,
                grpc_addr: normalize(a),
            })
            .chain(decode.iter().map(|a| Member {
                role: Role::Decode,
                grpc_addr: normalize(a),
            }))
            .collect();
        StaticMembership {
            tx: watch::Sender::new(members),
        }
    }
}

/// Adds `http://` to a bare `host:port`.
fn normalize(addr: &str) -> String {
    if addr.contains("://") {
        addr.to_string()
    } else {
        format!("http://{addr}")
    }
}

impl Membership for StaticMembership {
    fn watch(&self) -> watch::Receiver<Vec<Member>> {
        self.tx.subscribe()
    }
}
