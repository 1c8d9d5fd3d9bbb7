//! Who is in the cluster. The router asks a [`Membership`] for the current
//! members and watches for changes; static membership comes from the config,
//! and a dynamic source (etcd) implements the same trait.

use serde::{Deserialize, Serialize};
use tandem_proto::v1 as pb;
use tokio::sync::watch;

use crate::fingerprint::ModelFingerprint;
use crate::node_scheme::with_scheme;

/// A node's role (`prefill` or `decode` in keys and JSON records).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// Computes prompts' KV caches.
    Prefill,
    /// Generates tokens with continuous batching.
    Decode,
}

impl From<Role> for pb::Role {
    fn from(role: Role) -> pb::Role {
        match role {
            Role::Prefill => pb::Role::Prefill,
            Role::Decode => pb::Role::Decode,
        }
    }
}

impl Role {
    /// The role a load report names: its `role`, or the `legacy_role` string
    /// of a node that predates the enum; `None` when neither names one.
    pub fn of_load(load: &pb::NodeLoad) -> Option<Role> {
        match load.role() {
            pb::Role::Prefill => Some(Role::Prefill),
            pb::Role::Decode => Some(Role::Decode),
            pb::Role::Unspecified => Role::from_name(&load.legacy_role),
        }
    }
}

/// One node of the cluster.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Member {
    /// Its role.
    pub role: Role,
    /// Its internal gRPC address, `http://host:port` (`https://` with
    /// `[tls]`); also its identity here.
    pub grpc_addr: String,
    /// The name its TLS certificate is checked against, when it advertised
    /// one (its `[tls] server_name`, through etcd); `None`: the host of
    /// `grpc_addr`.
    pub tls_name: Option<String>,
    /// What it serves, when its membership record says
    /// (`NodeRecord.fingerprint`); `None` with static membership, where the
    /// router learns it from the node's load reports.
    pub fingerprint: Option<ModelFingerprint>,
}

impl Member {
    /// A member whose certificate, if any, is checked against its address's host.
    pub fn new(role: Role, grpc_addr: impl Into<String>) -> Self {
        Member {
            role,
            grpc_addr: grpc_addr.into(),
            tls_name: None,
            fingerprint: None,
        }
    }
}

/// A source of the cluster's members.
pub trait Membership: Send + Sync + 'static {
    /// The members now, and every change after.
    fn watch(&self) -> watch::Receiver<Vec<Member>>;

    /// `true` once the members have been read from their source at least
    /// once. Until then an empty [`Membership::watch`] means "not known yet",
    /// not "no nodes", and the router answers neither health checks nor
    /// requests. Static membership is known from the start (this default).
    fn ready(&self) -> watch::Receiver<bool> {
        watch::channel(true).1
    }
}

/// Members fixed at start (from the config).
pub struct StaticMembership {
    tx: watch::Sender<Vec<Member>>,
}

impl StaticMembership {
    /// Membership of these prefill and decode nodes (plaintext: a bare
    /// `host:port` gets `http://`).
    pub fn new(prefill: &[String], decode: &[String]) -> Self {
        Self::with_tls(prefill, decode, false)
    }

    /// Membership of these prefill and decode nodes; a bare `host:port` gets
    /// `https://` when `tls` is set, `http://` otherwise.
    pub fn with_tls(prefill: &[String], decode: &[String], tls: bool) -> Self {
        let members = prefill
            .iter()
            .map(|a| Member::new(Role::Prefill, with_scheme(a, tls)))
            .chain(
                decode
                    .iter()
                    .map(|a| Member::new(Role::Decode, with_scheme(a, tls))),
            )
            .collect();
        Self::from_members(members)
    }

    /// Exactly these members.
    pub fn from_members(members: Vec<Member>) -> Self {
        StaticMembership {
            tx: watch::Sender::new(members),
        }
    }
}

impl Membership for StaticMembership {
    fn watch(&self) -> watch::Receiver<Vec<Member>> {
        self.tx.subscribe()
    }
}
