//! The node pool: the cluster's members as the router sees them.
//!
//! One task follows [`Membership::watch`]; for every member it keeps a lazily
//! connected gRPC [`Channel`] and a load task that subscribes to the node's
//! `WatchLoad` stream and stores each report. A stream that ends is reopened
//! with exponential backoff; a member that leaves is dropped and its load
//! task stopped. The state is a small map behind a std mutex, held only to
//! read or write a few fields, never across `.await`.
//!
//! With `[tls]` every channel is mutual TLS (`tandem_cluster::grpc_tls`): a
//! member must have an `https://` address, its certificate is checked
//! against the cluster CA under its advertised TLS name (or its address's
//! host), and the router presents its own. A member with a plaintext address
//! is not dialed at all; one whose certificate fails never answers a load
//! query, so it stays unreachable and ranks last.
//!
//! The KV events on the load reports feed the pool's [`KvIndex`]; a node's
//! entries go when it leaves or its stream breaks (its next stream starts
//! with a snapshot). [`NodePool::ranked_for`] orders a role's nodes for a
//! request by the configured [`routing`](crate::routing) policy.

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use tandem_cluster::{GrpcTls, GrpcTlsError, Member, Membership, Role, RoutingPolicy, grpc_tls};
use tandem_proto::v1::WatchLoadRequest;
use tandem_proto::v1::decode_node_client::DecodeNodeClient;
use tandem_proto::v1::prefill_node_client::PrefillNodeClient;
use tokio_util::sync::CancellationToken;
use tonic::transport::Channel;
use tracing::{debug, info, warn};

use crate::choice::{NodeStatus, rank_decode, rank_prefill};
use crate::kv_index::KvIndex;
use crate::node_addr::NodeAddr;
use crate::routing::{RoutingConfig, rank_kv_aware, rank_round_robin};

/// First wait before reopening a failed load stream.
const BACKOFF_MIN: Duration = Duration::from_millis(50);
/// Longest wait between attempts.
const BACKOFF_MAX: Duration = Duration::from_secs(2);
/// Block size assumed when estimating a new request's KV use between reports
/// for a node whose reports carry none (one that predates `block_size`).
const FALLBACK_BLOCK_SIZE: u32 = 16;
/// A node with no load report for this many intervals (and at least
/// [`STALE_MIN`]) has stopped answering: it ranks last and requests on it are
/// re-run elsewhere. A paused process keeps its connections open, so this,
/// not a failed stream, is how one is noticed.
const STALE_INTERVALS: u32 = 40;
/// The shortest time without a report that makes a node stale.
const STALE_MIN: Duration = Duration::from_secs(2);

/// A node to call: its address (its identity) and a channel to it.
#[derive(Debug, Clone)]
pub struct NodeHandle {
    /// gRPC address, `http://host:port`.
    pub addr: NodeAddr,
    /// Its role.
    pub role: Role,
    /// A lazily connected channel, shared by every call to the node.
    pub channel: Channel,
}

struct Entry {
    handle: NodeHandle,
    /// The member as the membership gave it (a change of it redials).
    member: Member,
    status: NodeStatus,
    /// When the last load report arrived (or the node joined).
    last_report: Instant,
    stop: CancellationToken,
}

/// The nodes of the cluster and their last load reports.
pub struct NodePool {
    nodes: Mutex<HashMap<NodeAddr, Entry>>,
    load_interval_ms: u32,
    tls: Option<GrpcTls>,
    /// Which node holds which cached blocks; locked after `nodes` when both are.
    kv: Mutex<KvIndex>,
    routing: RoutingConfig,
    /// Round-robin turns, decode and prefill.
    turns: [AtomicUsize; 2],
}

impl NodePool {
    /// Starts following `membership`, dialing its members over mutual TLS
    /// with `tls` (plaintext without); the pool's tasks end when `shutdown`
    /// fires. Must be called inside a tokio runtime.
    pub fn start(
        membership: Arc<dyn Membership>,
        load_interval_ms: u32,
        tls: Option<GrpcTls>,
        routing: RoutingConfig,
        shutdown: CancellationToken,
    ) -> Arc<Self> {
        let pool = Arc::new(NodePool {
            nodes: Mutex::new(HashMap::new()),
            load_interval_ms,
            tls,
            kv: Mutex::new(KvIndex::new()),
            routing,
            turns: [AtomicUsize::new(0), AtomicUsize::new(0)],
        });
        let mut members = membership.watch();
        pool.apply(&members.borrow_and_update().clone(), &shutdown);
        let p = pool.clone();
        tokio::spawn(async move {
            loop {
                tokio::select! {
                    _ = shutdown.cancelled() => break,
                    changed = members.changed() => {
                        if changed.is_err() {
                            // The source is gone; keep the last members until shutdown.
                            shutdown.cancelled().await;
                            break;
                        }
                        let now = members.borrow_and_update().clone();
                        p.apply(&now, &shutdown);
                    }
                }
            }
            p.lock().drain().for_each(|(_, e)| e.stop.cancel());
        });
        pool
    }

    fn lock(&self) -> MutexGuard<'_, HashMap<NodeAddr, Entry>> {
        // A panic while holding this lock cannot leave the map inconsistent.
        self.nodes.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn kv_lock(&self) -> MutexGuard<'_, KvIndex> {
        // The index is consistent between statements: a panic cannot break it.
        self.kv.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Brings the pool in line with `members`.
    fn apply(self: &Arc<Self>, members: &[Member], shutdown: &CancellationToken) {
        let mut nodes = self.lock();
        nodes.retain(|addr, e| {
            let keep = members.contains(&e.member);
            if !keep {
                info!(node = %addr, "node left the cluster");
                e.stop.cancel();
                self.kv_lock().remove_node(addr);
            }
            keep
        });
        for m in members {
            if nodes.contains_key(m.grpc_addr.as_str()) {
                continue;
            }
            let channel = match channel_to(m, self.tls.as_ref()) {
                Ok(c) => c,
                Err(e) => {
                    warn!(node = %m.grpc_addr, "not dialing this node: {e}");
                    continue;
                }
            };
            let handle = NodeHandle {
                addr: NodeAddr::from(m.grpc_addr.as_str()),
                role: m.role,
                channel,
            };
            let stop = shutdown.child_token();
            info!(node = %m.grpc_addr, role = ?m.role, "node joined the cluster");
            tokio::spawn(watch_load(
                self.clone(),
                handle.clone(),
                self.load_interval_ms,
                stop.clone(),
            ));
            nodes.insert(
                handle.addr.clone(),
                Entry {
                    handle,
                    member: m.clone(),
                    status: NodeStatus::default(),
                    last_report: Instant::now(),
                    stop,
                },
            );
        }
    }

    /// Nodes of `role`, best choice first for a request over `tokens` (its
    /// prompt, and any tokens generated before a retry), by the configured
    /// routing policy.
    pub fn ranked_for(&self, role: Role, tokens: &[u32]) -> Vec<NodeHandle> {
        let (handles, statuses) = self.statuses(role);
        let least_loaded = match role {
            Role::Decode => rank_decode(&statuses),
            Role::Prefill => rank_prefill(&statuses),
        };
        let order = match self.routing.policy {
            RoutingPolicy::LeastLoaded => least_loaded,
            RoutingPolicy::RoundRobin => {
                let slot = match role {
                    Role::Decode => 0,
                    Role::Prefill => 1,
                };
                let turn = self.turns[slot].fetch_add(1, Ordering::Relaxed);
                rank_round_robin(&statuses, turn)
            }
            RoutingPolicy::KvAware => {
                let refs: Vec<&NodeAddr> = handles.iter().map(|h| &h.addr).collect();
                let cached = self.kv_lock().cached_tokens(tokens, &refs);
                let order = rank_kv_aware(
                    &statuses,
                    least_loaded,
                    tokens.len(),
                    &cached,
                    &self.routing,
                );
                if let Some(&best) = order.first() {
                    debug!(
                        node = %handles[best].addr,
                        cached_tokens = cached[best],
                        "kv-aware choice"
                    );
                }
                order
            }
        };
        order.into_iter().map(|i| handles[i].clone()).collect()
    }

    /// Nodes of `role` in address order, with their statuses (a stale node
    /// unreachable).
    fn statuses(&self, role: Role) -> (Vec<NodeHandle>, Vec<NodeStatus>) {
        let nodes = self.lock();
        let mut entries: Vec<&Entry> = nodes.values().filter(|e| e.handle.role == role).collect();
        entries.sort_by(|a, b| a.handle.addr.cmp(&b.handle.addr));
        let stale_after = self.stale_after();
        entries
            .iter()
            .map(|e| {
                let status = NodeStatus {
                    reachable: e.status.reachable && e.last_report.elapsed() < stale_after,
                    ..e.status.clone()
                };
                (e.handle.clone(), status)
            })
            .unzip()
    }

    /// Hashes the KV index credits to `addr`.
    pub fn cached_blocks_of(&self, addr: &str) -> usize {
        self.kv_lock().blocks_of(&NodeAddr::from(addr))
    }

    /// Nodes of `role`, least loaded first (blind to the routing policy).
    pub fn ranked(&self, role: Role) -> Vec<NodeHandle> {
        let nodes = self.lock();
        let mut entries: Vec<&Entry> = nodes.values().filter(|e| e.handle.role == role).collect();
        // A stable base order, so that ties break the same way every time.
        entries.sort_by(|a, b| a.handle.addr.cmp(&b.handle.addr));
        let stale_after = self.stale_after();
        let statuses: Vec<NodeStatus> = entries
            .iter()
            .map(|e| NodeStatus {
                reachable: e.status.reachable && e.last_report.elapsed() < stale_after,
                ..e.status.clone()
            })
            .collect();
        let order = match role {
            Role::Decode => rank_decode(&statuses),
            Role::Prefill => rank_prefill(&statuses),
        };
        order
            .into_iter()
            .map(|i| entries[i].handle.clone())
            .collect()
    }

    /// How long without a load report makes a node stale.
    pub fn stale_after(&self) -> Duration {
        (Duration::from_millis(u64::from(self.load_interval_ms)) * STALE_INTERVALS).max(STALE_MIN)
    }

    /// Whether `addr` has sent no load report for [`stale_after`](Self::stale_after)
    /// (false for a node not in the pool: there is nothing to wait for).
    pub fn is_stale(&self, addr: &str) -> bool {
        let stale_after = self.stale_after();
        self.lock()
            .get(addr)
            .is_some_and(|e| e.last_report.elapsed() >= stale_after)
    }

    /// Marks `addr` unreachable after a request failed on it; its next load
    /// report marks it reachable again.
    pub fn mark_failed(&self, addr: &str) {
        self.set_status(addr, |s| s.reachable = false);
    }

    /// Whether the pool holds any node of `role`.
    pub fn has(&self, role: Role) -> bool {
        self.lock().values().any(|e| e.handle.role == role)
    }

    /// Counts a request just sent to `addr` in its load until the node's next
    /// report, so that a burst between reports spreads over the nodes.
    pub fn note_assigned(&self, addr: &str, prompt_tokens: usize) {
        let mut nodes = self.lock();
        let Some(load) = nodes.get_mut(addr).and_then(|e| e.status.load.as_mut()) else {
            return;
        };
        load.queued = load.queued.saturating_add(1);
        match load.role.as_str() {
            "prefill" => {
                load.queued_prefill_tokens = load
                    .queued_prefill_tokens
                    .saturating_add(prompt_tokens as u64);
            }
            _ => {
                let block_size = match load.block_size {
                    0 => FALLBACK_BLOCK_SIZE,
                    n => n,
                };
                let blocks = u32::try_from(prompt_tokens)
                    .unwrap_or(u32::MAX)
                    .div_ceil(block_size);
                load.kv_blocks_free = load.kv_blocks_free.saturating_sub(blocks);
            }
        }
    }

    fn set_status(&self, addr: &str, update: impl FnOnce(&mut NodeStatus)) {
        if let Some(e) = self.lock().get_mut(addr) {
            update(&mut e.status);
        }
    }
}

/// A lazily connected channel with keep-alives, so a dead node is noticed;
/// mutual TLS with `tls`.
fn channel_to(member: &Member, tls: Option<&GrpcTls>) -> Result<Channel, GrpcTlsError> {
    Ok(
        grpc_tls::endpoint(&member.grpc_addr, tls, member.tls_name.as_deref())?
            .connect_timeout(Duration::from_secs(2))
            .tcp_nodelay(true)
            .http2_keep_alive_interval(Duration::from_secs(5))
            .keep_alive_timeout(Duration::from_secs(5))
            .keep_alive_while_idle(true)
            .connect_lazy(),
    )
}

/// Follows one node's load reports until `stop` fires.
async fn watch_load(
    pool: Arc<NodePool>,
    node: NodeHandle,
    interval_ms: u32,
    stop: CancellationToken,
) {
    let mut backoff = BACKOFF_MIN;
    let request = WatchLoadRequest { interval_ms };
    while !stop.is_cancelled() {
        let opened = match node.role {
            Role::Decode => {
                DecodeNodeClient::new(node.channel.clone())
                    .watch_load(request)
                    .await
            }
            Role::Prefill => {
                PrefillNodeClient::new(node.channel.clone())
                    .watch_load(request)
                    .await
            }
        };
        match opened {
            Ok(response) => {
                let mut stream = response.into_inner();
                loop {
                    let next = tokio::select! {
                        _ = stop.cancelled() => return,
                        next = stream.message() => next,
                    };
                    match next {
                        Ok(Some(mut load)) => {
                            backoff = BACKOFF_MIN;
                            let mut nodes = pool.lock();
                            // Events of a node that left are dropped with it.
                            if let Some(e) = nodes.get_mut(&node.addr) {
                                pool.kv_lock().apply(&node.addr, &load);
                                // The status keeps the figures, not the events.
                                load.blocks_gained = Vec::new();
                                load.blocks_dropped = Vec::new();
                                e.status.load = Some(load);
                                e.status.reachable = true;
                                e.last_report = Instant::now();
                            }
                        }
                        Ok(None) => {
                            debug!(node = %node.addr, "load stream ended");
                            break;
                        }
                        Err(status) => {
                            debug!(node = %node.addr, "load stream failed: {}", status_chain(&status));
                            break;
                        }
                    }
                }
            }
            Err(status) => {
                // A refused TLS handshake (wrong certificate, plaintext
                // node) shows here, again and again: say it once the
                // backoff is at its longest, so a misconfiguration is seen.
                if backoff == BACKOFF_MAX {
                    warn!(node = %node.addr, "cannot watch load: {}", status_chain(&status));
                } else {
                    debug!(node = %node.addr, "cannot watch load: {}", status_chain(&status));
                }
            }
        }
        pool.set_status(&node.addr, |s| s.reachable = false);
        // It may come back empty: forget its blocks until its next snapshot.
        pool.kv_lock().remove_node(&node.addr);
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep(backoff) => {}
        }
        backoff = (backoff * 2).min(BACKOFF_MAX);
    }
}

/// A status with the transport error behind it, if any (a failed TLS
/// handshake is only "transport error" at the top).
fn status_chain(status: &tonic::Status) -> String {
    match std::error::Error::source(status) {
        Some(source) => format!("{status}: {}", grpc_tls::error_chain(source)),
        None => status.to_string(),
    }
}

/// Loads as the pool holds them, for tests.
#[cfg(test)]
impl NodePool {
    fn load_of(&self, addr: &str) -> Option<tandem_proto::v1::NodeLoad> {
        self.lock().get(addr).and_then(|e| e.status.load.clone())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tandem_cluster::StaticMembership;
    use tandem_proto::v1::NodeLoad;

    #[tokio::test]
    async fn members_join_and_leave() {
        let shutdown = CancellationToken::new();
        let members =
            tokio::sync::watch::Sender::new(vec![Member::new(Role::Decode, "http://127.0.0.1:1")]);
        struct Source(tokio::sync::watch::Sender<Vec<Member>>);
        impl Membership for Source {
            fn watch(&self) -> tokio::sync::watch::Receiver<Vec<Member>> {
                self.0.subscribe()
            }
        }
        let pool = NodePool::start(
            Arc::new(Source(members.clone())),
            10,
            None,
            RoutingConfig::default(),
            shutdown.clone(),
        );
        assert!(pool.has(Role::Decode));
        assert!(!pool.has(Role::Prefill));

        members.send_replace(vec![Member::new(Role::Prefill, "http://127.0.0.1:2")]);
        for _ in 0..100 {
            if pool.has(Role::Prefill) {
                break;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        assert!(pool.has(Role::Prefill));
        assert!(!pool.has(Role::Decode));
        assert_eq!(pool.ranked(Role::Prefill).len(), 1);
        shutdown.cancel();
    }

    #[tokio::test]
    async fn unreachable_nodes_rank_last_and_assignments_count() {
        let shutdown = CancellationToken::new();
        let membership = StaticMembership::new(&[], &["127.0.0.1:1".into(), "127.0.0.1:2".into()]);
        let pool = NodePool::start(
            Arc::new(membership),
            10,
            None,
            RoutingConfig::default(),
            shutdown.clone(),
        );
        let a = "http://127.0.0.1:1";
        let b = "http://127.0.0.1:2";
        // Nothing listens on these ports: the load tasks mark both unreachable.
        tokio::time::sleep(Duration::from_millis(100)).await;
        pool.set_status(b, |s| {
            s.reachable = true;
            s.load = Some(NodeLoad {
                role: "decode".into(),
                kv_blocks_free: 10,
                ..Default::default()
            });
        });
        let ranked: Vec<String> = pool
            .ranked(Role::Decode)
            .into_iter()
            .map(|n| n.addr.to_string())
            .collect();
        assert_eq!(ranked, vec![b.to_string(), a.to_string()]);

        pool.note_assigned(b, 33);
        let load = pool.load_of(b).unwrap();
        assert_eq!((load.queued, load.kv_blocks_free), (1, 7));
        shutdown.cancel();
    }

    #[tokio::test]
    async fn assignments_count_blocks_of_the_nodes_block_size() {
        let shutdown = CancellationToken::new();
        let membership = StaticMembership::new(&[], &["127.0.0.1:1".into()]);
        let pool = NodePool::start(
            Arc::new(membership),
            10,
            None,
            RoutingConfig::default(),
            shutdown.clone(),
        );
        let a = "http://127.0.0.1:1";
        tokio::time::sleep(Duration::from_millis(100)).await;
        pool.set_status(a, |s| {
            s.load = Some(NodeLoad {
                role: "decode".into(),
                kv_blocks_free: 10,
                block_size: 32,
                ..Default::default()
            });
        });
        // 33 tokens are two blocks of 32 (three of the old fixed 16).
        pool.note_assigned(a, 33);
        assert_eq!(pool.load_of(a).unwrap().kv_blocks_free, 8);
        pool.note_assigned(a, 64);
        assert_eq!(pool.load_of(a).unwrap().kv_blocks_free, 6);
        shutdown.cancel();
    }
}
