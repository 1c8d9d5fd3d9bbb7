//! What a node publishes about itself in etcd, and the router's table of
//! those records, kept without any I/O so that it is tested directly.
//!
//! Layout: every node of cluster `C` writes one key,
//! `/tandem/C/nodes/<role>/<id>`, whose value is a JSON [`NodeRecord`], under
//! a lease of its own. The key disappears when the node withdraws (revokes
//! its lease) or stops renewing it (crashed, paused, cut off from etcd).
//! [`MemberTable`] applies a listing and the watch events after it, and turns
//! the records into the [`Member`]s the router routes to.

use std::collections::BTreeMap;
use std::time::Instant;

use serde::{Deserialize, Serialize};
use tracing::warn;

use crate::fingerprint::ModelFingerprint;
use crate::membership::{Member, Role};

impl Role {
    /// The role's name in keys and records: `prefill` or `decode`.
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Prefill => "prefill",
            Role::Decode => "decode",
        }
    }

    /// The role named `name`, if any.
    pub fn from_name(name: &str) -> Option<Role> {
        match name {
            "prefill" => Some(Role::Prefill),
            "decode" => Some(Role::Decode),
            _ => None,
        }
    }
}

/// The prefix under which cluster `cluster`'s nodes register.
pub fn nodes_prefix(cluster: &str) -> String {
    format!("/tandem/{cluster}/nodes/")
}

/// The key of node `id` of `role` in cluster `cluster`.
pub fn node_key(cluster: &str, role: Role, id: &str) -> String {
    format!("{}{}/{id}", nodes_prefix(cluster), role.as_str())
}

/// What one node says about itself.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeRecord {
    /// Node id (unique per role within the cluster).
    pub id: String,
    /// `prefill` or `decode`.
    pub role: Role,
    /// Internal gRPC address, `http://host:port`, or `https://host:port`
    /// when the node serves mutual TLS.
    pub grpc_addr: String,
    /// With mutual TLS, the name the node's certificate is checked against
    /// (its `[tls] server_name`); absent: the host of `grpc_addr`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tls_name: Option<String>,
    /// The decode node's QUIC KV receiver addresses (empty for prefill nodes).
    /// For operators reading etcd (`etcdctl get --prefix /tandem/`): no part
    /// of Tandem reads it, since a prefill node learns where to send KV from
    /// the decode node's `Admitted.kv_target` for each request.
    #[serde(default)]
    pub quic_addrs: Vec<String>,
    /// Name of the served model.
    pub model: String,
    /// What the node serves (see [`crate::fingerprint`]); absent in a record
    /// written before fingerprints existed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fingerprint: Option<ModelFingerprint>,
    /// GPUs the model is sharded over (tensor parallelism).
    pub tp_size: u32,
    /// Static capacity, for operators reading etcd: no part of Tandem reads
    /// it. The router routes on live figures from each node's `WatchLoad`
    /// reports (which carry `kv_blocks_total` and `block_size` too).
    pub capacity: Capacity,
}

/// A node's configured capacity.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Capacity {
    /// KV blocks of the node's cache.
    pub kv_blocks: u64,
    /// Tokens per block.
    pub block_size: u64,
    /// Most sequences per decode step (decode nodes).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_batch: Option<u64>,
    /// Most requests waiting (prefill nodes).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_queue: Option<u64>,
}

impl NodeRecord {
    /// The record as etcd stores it.
    pub fn to_json(&self) -> String {
        serde_json::to_string(self).unwrap_or_else(|_| unreachable!("a record always serializes"))
    }
}

/// Why a key/value pair under the prefix is not a usable member.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum RecordError {
    /// The key is not `<prefix><role>/<id>`.
    #[error("key {0:?} is not <prefix><prefill|decode>/<id>")]
    Key(String),
    /// The value is not a JSON record.
    #[error("value of {key:?} is not a node record: {message}")]
    Value {
        /// The key.
        key: String,
        /// The parser's message.
        message: String,
    },
    /// The record's role or id disagree with its key.
    #[error("record under {0:?} names another role or id")]
    Mismatch(String),
}

/// Parses one registered node.
pub fn parse_record(prefix: &str, key: &[u8], value: &[u8]) -> Result<NodeRecord, RecordError> {
    let key_text = String::from_utf8_lossy(key).into_owned();
    let (role, id) = key_text
        .strip_prefix(prefix)
        .and_then(|rest| rest.split_once('/'))
        .filter(|(role, id)| Role::from_name(role).is_some() && !id.is_empty())
        .ok_or_else(|| RecordError::Key(key_text.clone()))?;
    let record: NodeRecord = serde_json::from_slice(value).map_err(|e| RecordError::Value {
        key: key_text.clone(),
        message: e.to_string(),
    })?;
    if record.role.as_str() != role || record.id != id {
        return Err(RecordError::Mismatch(key_text));
    }
    Ok(record)
}

/// The registered nodes as the router last heard of them.
///
/// A re-listing after a lost connection may miss nodes that are alive: a
/// blank etcd (restarted without its data) knows nobody until the nodes
/// register again. Nodes missing from such a listing *linger* as members
/// until a deadline, so routing goes on meanwhile; a node that registers
/// again stops lingering, and an explicit delete event removes it at once.
#[derive(Debug)]
pub struct MemberTable {
    prefix: String,
    model: Option<String>,
    records: BTreeMap<Vec<u8>, NodeRecord>,
    lingering: BTreeMap<Vec<u8>, (NodeRecord, Instant)>,
}

impl MemberTable {
    /// A table of cluster `cluster`'s nodes; with `model`, nodes serving
    /// another model are left out (and a warning logged).
    pub fn new(cluster: &str, model: Option<String>) -> Self {
        MemberTable {
            prefix: nodes_prefix(cluster),
            model,
            records: BTreeMap::new(),
            lingering: BTreeMap::new(),
        }
    }

    /// The key prefix the table follows.
    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    /// Replaces everything with a fresh listing. Returns whether the members changed.
    pub fn reset<'a>(&mut self, kvs: impl IntoIterator<Item = (&'a [u8], &'a [u8])>) -> bool {
        self.resync(kvs, None)
    }

    /// Replaces the records with a listing taken after a reconnection; nodes
    /// it lacks linger until `linger_until` (or go at once with `None`).
    /// Returns whether the members changed.
    pub fn resync<'a>(
        &mut self,
        kvs: impl IntoIterator<Item = (&'a [u8], &'a [u8])>,
        linger_until: Option<Instant>,
    ) -> bool {
        let before = self.members();
        let old = std::mem::take(&mut self.records);
        for (key, value) in kvs {
            self.put(key, value);
        }
        if let Some(deadline) = linger_until {
            for (key, record) in old {
                if !self.records.contains_key(&key) {
                    self.lingering.insert(key, (record, deadline));
                }
            }
        }
        self.members() != before
    }

    /// Drops lingering nodes whose deadline has passed. Returns whether the members changed.
    pub fn expire(&mut self, now: Instant) -> bool {
        let before = self.lingering.len();
        self.lingering.retain(|_, (_, deadline)| *deadline > now);
        self.lingering.len() != before
    }

    /// When the next lingering node is due to go.
    pub fn next_expiry(&self) -> Option<Instant> {
        self.lingering.values().map(|(_, d)| *d).min()
    }

    /// A key was written. Returns whether the members changed.
    pub fn put(&mut self, key: &[u8], value: &[u8]) -> bool {
        let lingered = self.lingering.remove(key);
        match parse_record(&self.prefix, key, value) {
            Ok(record) => {
                if let Some(model) = &self.model
                    && &record.model != model
                {
                    warn!(
                        node = %record.grpc_addr,
                        "node serves model {:?}, not {model:?}; not routing to it",
                        record.model
                    );
                    return self.records.remove(key).is_some();
                }
                let old = self
                    .records
                    .insert(key.to_vec(), record.clone())
                    .or(lingered.map(|(r, _)| r));
                old.is_none_or(|o| {
                    o.grpc_addr != record.grpc_addr
                        || o.tls_name != record.tls_name
                        || o.fingerprint != record.fingerprint
                })
            }
            Err(e) => {
                warn!("ignoring a registration: {e}");
                self.records.remove(key).is_some() || lingered.is_some()
            }
        }
    }

    /// A key was deleted (or its lease expired). Returns whether the members changed.
    pub fn delete(&mut self, key: &[u8]) -> bool {
        let lingered = self.lingering.remove(key).is_some();
        self.records.remove(key).is_some() || lingered
    }

    /// The registered nodes, in key order.
    pub fn records(&self) -> Vec<NodeRecord> {
        self.records.values().cloned().collect()
    }

    /// The members to route to, in key order (one per gRPC address).
    pub fn members(&self) -> Vec<Member> {
        let mut out: Vec<Member> = Vec::with_capacity(self.records.len());
        let lingering = self.lingering.values().map(|(r, _)| r);
        for r in self.records.values().chain(lingering) {
            let member = Member {
                role: r.role,
                grpc_addr: r.grpc_addr.clone(),
                tls_name: r.tls_name.clone(),
                fingerprint: r.fingerprint,
            };
            if !out.contains(&member) {
                out.push(member);
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(role: &str, id: &str, port: u16) -> NodeRecord {
        NodeRecord {
            id: id.into(),
            role: Role::from_name(role).unwrap(),
            grpc_addr: format!("http://127.0.0.1:{port}"),
            tls_name: None,
            quic_addrs: vec![],
            model: "m".into(),
            fingerprint: None,
            tp_size: 1,
            capacity: Capacity {
                kv_blocks: 64,
                block_size: 16,
                max_batch: Some(8),
                max_queue: None,
            },
        }
    }

    fn put(t: &mut MemberTable, r: &NodeRecord) -> bool {
        let key = node_key("c", r.role, &r.id);
        t.put(key.as_bytes(), r.to_json().as_bytes())
    }

    #[test]
    fn keys_name_cluster_role_and_id() {
        assert_eq!(
            node_key("lab", Role::Decode, "d-1"),
            "/tandem/lab/nodes/decode/d-1"
        );
        let r = record("decode", "d-1", 5);
        let back = parse_record(
            &nodes_prefix("lab"),
            b"/tandem/lab/nodes/decode/d-1",
            r.to_json().as_bytes(),
        )
        .unwrap();
        assert_eq!(back, r);
    }

    #[test]
    fn bad_keys_and_values_are_refused() {
        let p = nodes_prefix("c");
        let json = record("decode", "d", 1).to_json();
        for key in [
            "/tandem/c/nodes/decode",
            "/tandem/c/nodes/router/d",
            "/tandem/c/nodes/decode/",
            "/other/decode/d",
        ] {
            assert!(matches!(
                parse_record(&p, key.as_bytes(), json.as_bytes()),
                Err(RecordError::Key(_))
            ));
        }
        assert!(matches!(
            parse_record(&p, b"/tandem/c/nodes/decode/d", b"{"),
            Err(RecordError::Value { .. })
        ));
        assert!(matches!(
            parse_record(&p, b"/tandem/c/nodes/prefill/d", json.as_bytes()),
            Err(RecordError::Mismatch(_))
        ));
    }

    #[test]
    fn puts_and_deletes_follow_the_nodes() {
        let mut t = MemberTable::new("c", None);
        let (p, d1, d2) = (
            record("prefill", "p", 1),
            record("decode", "d1", 2),
            record("decode", "d2", 3),
        );
        assert!(put(&mut t, &p));
        assert!(put(&mut t, &d1));
        assert!(put(&mut t, &d2));
        // A lease renewal rewrites nothing that matters.
        assert!(!put(&mut t, &d2));
        assert_eq!(t.members().len(), 3);
        assert!(t.delete(b"/tandem/c/nodes/decode/d1"));
        assert!(!t.delete(b"/tandem/c/nodes/decode/d1"));
        let members = t.members();
        assert_eq!(
            members,
            vec![
                Member::new(Role::Decode, d2.grpc_addr.clone()),
                Member::new(Role::Prefill, p.grpc_addr.clone()),
            ]
        );
        // A corrupt rewrite removes the node rather than keeping a stale address.
        assert!(t.put(b"/tandem/c/nodes/decode/d2", b"not json"));
        assert_eq!(t.members().len(), 1);
    }

    #[test]
    fn a_listing_replaces_everything() {
        let mut t = MemberTable::new("c", None);
        put(&mut t, &record("decode", "gone", 9));
        let d = record("decode", "d", 2);
        let (k, v) = (node_key("c", Role::Decode, "d"), d.to_json());
        assert!(t.reset([(k.as_bytes(), v.as_bytes())]));
        assert_eq!(t.records(), vec![d]);
        assert!(!t.reset([(k.as_bytes(), v.as_bytes())]));
    }

    #[test]
    fn nodes_missing_from_a_relisting_linger_until_they_register_again() {
        let mut t = MemberTable::new("c", None);
        let (d1, d2) = (record("decode", "d1", 1), record("decode", "d2", 2));
        put(&mut t, &d1);
        put(&mut t, &d2);
        // A blank etcd lists nobody: both stay members for now.
        let t0 = Instant::now();
        let deadline = t0 + std::time::Duration::from_secs(5);
        assert!(!t.resync([], Some(deadline)));
        assert_eq!(t.members().len(), 2);
        assert_eq!(t.next_expiry(), Some(deadline));
        // d1 registers again: no change to the members, and it no longer lingers.
        assert!(!put(&mut t, &d1));
        assert!(!t.expire(t0));
        // d2 never comes back and goes at the deadline.
        assert!(t.expire(deadline));
        assert_eq!(t.records(), vec![d1.clone()]);
        assert_eq!(t.next_expiry(), None);
        // A delete event is authoritative, lingering or not.
        assert!(!t.resync([], Some(deadline)));
        assert!(t.delete(b"/tandem/c/nodes/decode/d1"));
        assert!(t.members().is_empty());
    }

    #[test]
    fn tls_names_reach_the_members_and_old_records_still_parse() {
        let mut t = MemberTable::new("c", None);
        let mut d = record("decode", "d", 7);
        d.grpc_addr = "https://10.0.0.5:7".into();
        d.tls_name = Some("decode-0.tandem".into());
        assert!(d.to_json().contains("\"tls_name\":\"decode-0.tandem\""));
        assert!(put(&mut t, &d));
        assert_eq!(t.members()[0].tls_name.as_deref(), Some("decode-0.tandem"));
        // A new name at the same address is a change (the channel must be redone).
        d.tls_name = Some("decode-1.tandem".into());
        assert!(put(&mut t, &d));
        // A record written before names existed has none.
        let plain = record("decode", "old", 8);
        let json = plain.to_json();
        assert!(!json.contains("tls_name"));
        let back = parse_record(
            &nodes_prefix("c"),
            b"/tandem/c/nodes/decode/old",
            json.as_bytes(),
        )
        .unwrap();
        assert_eq!(back.tls_name, None);
    }

    #[test]
    fn other_models_are_left_out() {
        let mut t = MemberTable::new("c", Some("m".into()));
        let mut other = record("decode", "x", 4);
        other.model = "other".into();
        assert!(!put(&mut t, &other));
        assert!(put(&mut t, &record("decode", "y", 5)));
        assert_eq!(t.members().len(), 1);
    }
}
