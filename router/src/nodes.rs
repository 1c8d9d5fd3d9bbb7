//! The node pool: the cluster's members as the router sees them.
//!
//! (Long on purpose: one owner of the per-node state that membership, load
//! streams, model identity, breakers, the prefill rate and the KV index all
//! update under one lock; their logic lives in those modules, this file
//! only wires it. The tests are in `nodes/tests.rs`.)
//!
//! One task follows [`Membership::watch`]; for every member it keeps a lazily
//! connected gRPC [`Channel`] and a load task that subscribes to the node's
//! `WatchLoad` stream and stores each report. A stream that ends is reopened
//! with exponential backoff; a member that leaves is dropped and its load
//! task stopped. The state is a small map behind a std mutex, held only to
//! read or write a few fields, never across `.await`.
//!
//! Each node has a circuit breaker ([`crate::breaker`]): failures of the
//! node open it and keep the node out of [`NodePool::ranked`] until its load
//! reports and a trial request show it works again. Prefill nodes' reports
//! also measure their prefill rate ([`crate::backlog`]), for admission and
//! KV waits. Between reports, each node's figures are corrected by this
//! router's own requests there ([`crate::own_load`]): an [`Assignment`]
//! counts a request from before it is sent until the node is done with it.
//!
//! With `[tls]` every channel is mutual TLS (`tandem_cluster::grpc_tls`): a
//! member must have an `https://` address, its certificate is checked
//! against the cluster CA under its advertised TLS name (or its address's
//! host), and the router presents its own. A member with a plaintext address
//! is not dialed at all; one whose certificate fails never answers a load
//! query, so it stays unreachable and ranks last.
//!
//! A node serving another model than the cluster's (its fingerprint, from
//! its record or its load reports, differs: see [`crate::identity`]) stays
//! in the pool, reporting load, but is never ranked.
//!
//! The KV events on the load reports feed the pool's [`KvIndex`]; a node's
//! entries go when it leaves or its stream breaks (its next stream starts
//! with a snapshot). [`NodePool::ranked_for`] orders a role's nodes for a
//! request by the configured [`routing`](crate::routing) policy.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use tandem_cluster::{GrpcTls, GrpcTlsError, Member, Membership, Role, RoutingPolicy, grpc_tls};
use tandem_proto::v1::WatchLoadRequest;
use tandem_proto::v1::decode_node_client::DecodeNodeClient;
use tandem_proto::v1::prefill_node_client::PrefillNodeClient;
use tandem_telemetry::names;
use tokio_util::sync::CancellationToken;
use tonic::transport::Channel;
use tracing::{debug, info, warn};

use crate::backlog::{Backlog, PrefillRate};
use crate::breaker::{Breaker, BreakerConfig, BreakerState};
use crate::choice::{NodeStatus, rank_decode, rank_prefill};
use crate::decode_queue::DecodeQueue;
use crate::identity::Identity;
use crate::kv_index::KvIndex;
use crate::node_addr::NodeAddr;
use crate::own_load::{OwnLoad, Share};
use crate::routing::{RoutingConfig, rank_kv_aware, rank_round_robin};

/// First wait before reopening a failed load stream.
const BACKOFF_MIN: Duration = Duration::from_millis(50);
/// Longest wait between attempts.
const BACKOFF_MAX: Duration = Duration::from_secs(2);
/// A node still unreachable is named in a warning at most this often (each
/// attempt at [`BACKOFF_MAX`] would be 30 warnings a minute).
const UNREACHABLE_WARN_EVERY: Duration = Duration::from_secs(60);
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
    /// Tells this entry from an earlier one of the same address (a node
    /// that left and came back), so a late [`Assignment`] finds its own.
    id: u64,
    handle: NodeHandle,
    /// The member as the membership gave it (a change of it redials).
    member: Member,
    status: NodeStatus,
    /// When the last load report arrived (or the node joined).
    last_report: Instant,
    /// False while the node serves another model than the cluster's.
    compatible: bool,
    /// Whether the node said what it serves (record or load report); one
    /// that has not ranks after those that did.
    identified: bool,
    stop: CancellationToken,
    breaker: Breaker,
    /// Measured from the reports (prefill nodes).
    rate: PrefillRate,
    /// Prompt tokens sent to the node (prefill nodes), for its rate.
    sent_tokens: u64,
    /// The reported load corrected by this router's requests (see [`crate::own_load`]).
    own: OwnLoad,
}

impl Entry {
    /// Whether a request may go to the node now: its breaker allows it, its
    /// load stream works, and it has reported lately.
    fn usable(&self, now: Instant, stale_after: Duration) -> bool {
        self.compatible
            && self.breaker.allows(now)
            && self.status.reachable
            && now.saturating_duration_since(self.last_report) < stale_after
    }

    /// The node's status, its load figures corrected by what this router
    /// saw since the report.
    fn status_now(&self) -> NodeStatus {
        NodeStatus {
            load: self.status.load.as_ref().map(|l| self.own.corrected(l)),
            reachable: self.status.reachable,
        }
    }

    /// Records a breaker change in the log and the metrics.
    fn breaker_changed(&self, state: Option<BreakerState>) {
        let Some(state) = state else { return };
        let role = role_label(self.handle.role);
        match state {
            BreakerState::Open => {
                warn!(node = %self.handle.addr, role, "circuit breaker open: the node gets no requests")
            }
            _ => info!(node = %self.handle.addr, role, "circuit breaker {}", state.name()),
        }
        let node = self.handle.addr.to_string();
        metrics::gauge!(names::ROUTER_BREAKER_STATE, names::ROLE => role, names::NODE => node.clone())
            .set(state.gauge());
        metrics::counter!(names::ROUTER_BREAKER_TRANSITIONS_TOTAL, names::ROLE => role, names::NODE => node, names::STATE => state.name())
            .increment(1);
    }
}

fn role_label(role: Role) -> &'static str {
    match role {
        Role::Decode => "decode",
        Role::Prefill => "prefill",
    }
}

/// A decode node's batch and waiting room are full (`router.decode_waiting`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NoRoom;

/// The nodes of the cluster and their last load reports.
pub struct NodePool {
    nodes: Mutex<HashMap<NodeAddr, Entry>>,
    load_interval_ms: u32,
    tls: Option<GrpcTls>,
    identity: Identity,
    breakers: BreakerConfig,
    /// Which node holds which cached blocks; locked after `nodes` when both are.
    kv: Mutex<KvIndex>,
    routing: RoutingConfig,
    /// Round-robin turns, decode and prefill.
    turns: [AtomicUsize; 2],
    /// The next [`Entry::id`].
    next_id: AtomicU64,
    /// Requests waiting for room at a decode node (`router.decode_waiting`).
    decode_queue: DecodeQueue,
}

impl std::fmt::Debug for NodePool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NodePool")
            .field("nodes", &self.lock().len())
            .finish_non_exhaustive()
    }
}

/// A request of this router at a node: counted in the node's load (see
/// [`crate::own_load`]) until dropped, when the node is done with it (it
/// answered, finished, or the request was given up there).
#[must_use = "the request counts at the node only while this is held"]
pub struct Assignment {
    pool: Arc<NodePool>,
    addr: NodeAddr,
    entry: u64,
    share: Share,
    /// The node refused the request: it never held it.
    refused: bool,
}

impl Assignment {
    /// The node refused the request (it holds nothing of it): it stops
    /// counting as if it had never been sent.
    pub fn refused(mut self) {
        self.refused = true;
    }
}

impl std::fmt::Debug for Assignment {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Assignment")
            .field("addr", &self.addr)
            .field("share", &self.share)
            .finish()
    }
}

impl Drop for Assignment {
    fn drop(&mut self) {
        let mut decode = false;
        if let Some(e) = self.pool.lock().get_mut(&self.addr)
            && e.id == self.entry
        {
            if self.refused {
                e.own.on_refused(self.share);
            } else {
                e.own.on_done(self.share);
            }
            decode = e.handle.role == Role::Decode;
        }
        if decode && !self.refused {
            // The request waiting longest for room at a decode node looks again
            // (a refusal freed nothing there: it would only wake the head that
            // was just refused).
            self.pool.decode_queue.wake_head();
        }
    }
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
        Self::start_with(
            membership,
            load_interval_ms,
            tls,
            Identity::new(None),
            BreakerConfig::default(),
            routing,
            shutdown,
        )
    }

    /// As [`NodePool::start`], routing only to nodes `identity` finds
    /// compatible with the cluster's model, with every node's circuit breaker
    /// set by `breakers`.
    pub fn start_with(
        membership: Arc<dyn Membership>,
        load_interval_ms: u32,
        tls: Option<GrpcTls>,
        identity: Identity,
        breakers: BreakerConfig,
        routing: RoutingConfig,
        shutdown: CancellationToken,
    ) -> Arc<Self> {
        let pool = Arc::new(NodePool {
            nodes: Mutex::new(HashMap::new()),
            load_interval_ms,
            tls,
            identity,
            breakers,
            kv: Mutex::new(KvIndex::new()),
            routing,
            turns: [AtomicUsize::new(0), AtomicUsize::new(0)],
            next_id: AtomicU64::new(0),
            decode_queue: DecodeQueue::default(),
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
                self.identity.forget(addr);
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
            let fingerprint = m.fingerprint.map(|f| f.to_string());
            let compatible = self.identity.note(&m.grpc_addr, fingerprint.as_deref());
            let role = role_label(m.role);
            metrics::gauge!(names::ROUTER_BREAKER_STATE, names::ROLE => role, names::NODE => m.grpc_addr.clone())
                .set(BreakerState::Closed.gauge());
            // Registered at zero, so the series exist before a first change.
            metrics::counter!(names::ROUTER_BREAKER_TRANSITIONS_TOTAL, names::ROLE => role, names::NODE => m.grpc_addr.clone(), names::STATE => BreakerState::Open.name())
                .increment(0);
            tokio::spawn(watch_load(
                self.clone(),
                handle.clone(),
                self.load_interval_ms,
                stop.clone(),
            ));
            nodes.insert(
                handle.addr.clone(),
                Entry {
                    id: self.next_id.fetch_add(1, Ordering::Relaxed),
                    handle,
                    member: m.clone(),
                    status: NodeStatus::default(),
                    last_report: Instant::now(),
                    compatible,
                    identified: fingerprint.is_some(),
                    stop,
                    breaker: Breaker::new(self.breakers),
                    rate: PrefillRate::default(),
                    sent_tokens: 0,
                    own: OwnLoad::default(),
                },
            );
        }
    }

    /// Nodes of `role`, best choice first for a request over `tokens` (its
    /// prompt, and any tokens generated before a retry) with `cache_salt`
    /// (empty: none), by the configured routing policy.
    pub fn ranked_for(&self, role: Role, tokens: &[u32], cache_salt: &str) -> Vec<NodeHandle> {
        let (handles, statuses, identified) = self.statuses(role);
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
                let cached = self.kv_lock().cached_tokens(tokens, cache_salt, &refs);
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
        Self::in_order(order, &handles, &identified)
    }

    /// Nodes of `role` whose breaker lets a request through, in address
    /// order (so ties break the same way every time), with their statuses (a
    /// stale node unreachable) and whether each is known to serve the
    /// cluster's model.
    fn statuses(&self, role: Role) -> (Vec<NodeHandle>, Vec<NodeStatus>, Vec<bool>) {
        let nodes = self.lock();
        let now = Instant::now();
        let mut entries: Vec<&Entry> = nodes
            .values()
            .filter(|e| e.handle.role == role && e.compatible && e.breaker.allows(now))
            .collect();
        entries.sort_by(|a, b| a.handle.addr.cmp(&b.handle.addr));
        let stale_after = self.stale_after();
        let mut handles = Vec::with_capacity(entries.len());
        let mut statuses = Vec::with_capacity(entries.len());
        let mut identified = Vec::with_capacity(entries.len());
        for e in entries {
            handles.push(e.handle.clone());
            let status = e.status_now();
            statuses.push(NodeStatus {
                reachable: status.reachable && e.last_report.elapsed() < stale_after,
                ..status
            });
            identified.push(e.identified);
        }
        (handles, statuses, identified)
    }

    /// `order` as handles, a node not known to serve the cluster's model
    /// (static membership, before its first report) moved last as a last
    /// resort (stable: ranks otherwise kept).
    fn in_order(order: Vec<usize>, handles: &[NodeHandle], identified: &[bool]) -> Vec<NodeHandle> {
        let mut order = order;
        order.sort_by_key(|&i| !identified[i]);
        order.into_iter().map(|i| handles[i].clone()).collect()
    }

    /// The load of `addr` as this router sees it now: its last report,
    /// corrected by this router's requests since (for status listings and
    /// tests); `None` before its first report.
    pub fn load_of(&self, addr: &str) -> Option<tandem_proto::v1::NodeLoad> {
        self.lock().get(addr).and_then(|e| e.status_now().load)
    }

    /// Hashes the KV index credits to `addr`.
    pub fn cached_blocks_of(&self, addr: &str) -> usize {
        self.kv_lock().blocks_of(&NodeAddr::from(addr))
    }

    /// Nodes of `role` whose circuit breaker lets a request through, least
    /// loaded first (blind to the routing policy).
    pub fn ranked(&self, role: Role) -> Vec<NodeHandle> {
        let (handles, statuses, identified) = self.statuses(role);
        let order = match role {
            Role::Decode => rank_decode(&statuses),
            Role::Prefill => rank_prefill(&statuses),
        };
        Self::in_order(order, &handles, &identified)
    }

    /// How long without a load report makes a node stale.
    pub fn stale_after(&self) -> Duration {
        (Duration::from_millis(u64::from(self.load_interval_ms)) * STALE_INTERVALS).max(STALE_MIN)
    }

    /// Whether `addr` has sent no load report for [`stale_after`](Self::stale_after)
    /// (false for a node not in the pool: there is nothing to wait for).
    pub fn is_stale(&self, addr: &str) -> bool {
        self.silent_for(addr)
            .is_some_and(|silent| silent >= self.stale_after())
    }

    /// Whether `addr` is in the pool and sent a load report within
    /// [`stale_after`](Self::stale_after): the process is alive, however long
    /// its engine loop takes to answer a request.
    pub fn is_reporting(&self, addr: &str) -> bool {
        self.silent_for(addr)
            .is_some_and(|silent| silent < self.stale_after())
    }

    /// How long since `addr`'s last load report; `None` for a node not in the pool.
    fn silent_for(&self, addr: &str) -> Option<Duration> {
        self.lock().get(addr).map(|e| e.last_report.elapsed())
    }

    /// Marks `addr` unreachable after it failed a request (a failure of the
    /// node, not a refusal of the request); its next load report marks it
    /// reachable again. The failure counts towards opening its breaker.
    pub fn mark_failed(&self, addr: &str) {
        if let Some(e) = self.lock().get_mut(addr) {
            e.status.reachable = false;
            let changed = e.breaker.on_failure(Instant::now());
            e.breaker_changed(changed);
        }
    }

    /// Records that `addr` served a request (or answered one as a healthy
    /// node does): a half-open breaker closes, a closed one forgets failures,
    /// and the node is reachable again (a load stream that failed while the
    /// node was starting marked it unreachable until its next report, though
    /// requests already reach it).
    pub fn record_success(&self, addr: &str) {
        if let Some(e) = self.lock().get_mut(addr) {
            e.status.reachable = true;
            let changed = e.breaker.on_success();
            e.breaker_changed(changed);
        }
    }

    /// A request is about to go to `addr`: while its breaker is half-open,
    /// the request takes one of the trial slots.
    pub fn note_sent(&self, addr: &str) {
        if let Some(e) = self.lock().get_mut(addr) {
            e.breaker.on_sent(Instant::now());
        }
    }

    /// Whether a node of `role` not in `avoid` is usable now: its breaker
    /// lets requests through, its load stream works and it reports.
    pub fn usable(&self, role: Role, avoid: &[NodeAddr]) -> bool {
        let now = Instant::now();
        let stale_after = self.stale_after();
        self.lock().values().any(|e| {
            e.handle.role == role && !avoid.contains(&e.handle.addr) && e.usable(now, stale_after)
        })
    }

    /// Each node's breaker state, by address (for status listings and tests).
    pub fn breaker_states(&self) -> Vec<(NodeAddr, Role, BreakerState)> {
        let mut states: Vec<_> = self
            .lock()
            .values()
            .map(|e| (e.handle.addr.clone(), e.handle.role, e.breaker.state()))
            .collect();
        states.sort_by(|a, b| a.0.cmp(&b.0));
        states
    }

    /// The retry hint when no node of a role is usable: the breakers' first
    /// open time, after which a load report lets a trial through (at least 1 s).
    pub fn retry_after_s(&self) -> u64 {
        (self.breakers.open.as_secs_f64().ceil() as u64).max(1)
    }

    /// The prompt tokens queued at the usable prefill nodes and their
    /// summed measured rate.
    pub fn prefill_backlog(&self) -> Backlog {
        let now = Instant::now();
        let stale_after = self.stale_after();
        let nodes = self.lock();
        let mut backlog = Backlog::default();
        for e in nodes.values() {
            if e.handle.role != Role::Prefill || !e.usable(now, stale_after) {
                continue;
            }
            backlog.nodes += 1;
            if e.status.load.is_some() {
                backlog.queued_tokens = backlog.queued_tokens.saturating_add(e.own.queued_tokens());
            }
            backlog.tokens_per_s += e.rate.tokens_per_s().unwrap_or(0.0);
        }
        backlog
    }

    /// Prompt tokens queued at prefill node `addr` and its measured rate.
    pub fn prefill_queue(&self, addr: &str) -> Option<(u64, Option<f64>)> {
        let nodes = self.lock();
        let e = nodes.get(addr)?;
        let queued = match e.status.load {
            Some(_) => e.own.queued_tokens(),
            None => 0,
        };
        Some((queued, e.rate.tokens_per_s()))
    }

    /// As [`assign`](Self::assign), unless `addr` is a decode node whose
    /// batch and waiting room are full: with `router.decode_waiting` set, its
    /// sequences (its last report corrected by this router's requests since,
    /// [`crate::own_load`]) may reach its reported `max_batch` plus that
    /// many, and no more (`Err(NoRoom)`). Checked and counted under one lock,
    /// so a burst cannot overfill a node. A node that reports no `max_batch`
    /// always has room.
    pub fn assign_with_room(
        self: &Arc<Self>,
        addr: &str,
        prompt_tokens: usize,
    ) -> Result<Option<Assignment>, NoRoom> {
        let mut nodes = self.lock();
        if let (Some(waiting), Some(e)) = (self.routing.decode_waiting, nodes.get(addr)) {
            let max_batch = e.status.load.as_ref().map_or(0, |l| l.max_batch);
            if e.handle.role == Role::Decode
                && max_batch > 0
                && e.own.sequences() >= u64::from(max_batch) + waiting as u64
            {
                return Err(NoRoom);
            }
        }
        Ok(self.assign_locked(&mut nodes, addr, prompt_tokens))
    }

    /// Requests waiting for room at a decode node: woken by a request of
    /// this router ending at one, and by the decode nodes' load reports.
    pub fn decode_queue(&self) -> &DecodeQueue {
        &self.decode_queue
    }

    /// Prompts with fewer tokens than this are prefilled at whichever usable
    /// decode node they go to (the least `local_prefill_below` the decode
    /// nodes report; 0 if one reports none).
    pub fn local_prefill_below(&self) -> u64 {
        let now = Instant::now();
        let stale_after = self.stale_after();
        self.lock()
            .values()
            .filter(|e| e.handle.role == Role::Decode && e.usable(now, stale_after))
            .map(|e| {
                e.status
                    .load
                    .as_ref()
                    .map_or(0, |l| u64::from(l.local_prefill_below))
            })
            .min()
            .unwrap_or(0)
    }

    /// Whether the pool holds any node of `role`.
    pub fn has(&self, role: Role) -> bool {
        self.lock()
            .values()
            .any(|e| e.handle.role == role && e.compatible)
    }

    /// Counts a request of `prompt_tokens` (its prompt and any tokens
    /// generated before a re-run) about to be sent to `addr` in the node's
    /// load until the returned [`Assignment`] is dropped, so that a burst
    /// between reports spreads over the nodes and a finished request stops
    /// counting before the node's next report; `None` for a node not in the
    /// pool. Call it before the request goes out: a report that already
    /// shows the request must find it counted as this router's.
    pub fn assign(self: &Arc<Self>, addr: &str, prompt_tokens: usize) -> Option<Assignment> {
        self.assign_locked(&mut self.lock(), addr, prompt_tokens)
    }

    fn assign_locked(
        self: &Arc<Self>,
        nodes: &mut HashMap<NodeAddr, Entry>,
        addr: &str,
        prompt_tokens: usize,
    ) -> Option<Assignment> {
        let entry = nodes.get_mut(addr)?;
        if entry.handle.role == Role::Prefill {
            entry.sent_tokens = entry.sent_tokens.saturating_add(prompt_tokens as u64);
        }
        let block_size = match entry.status.load.as_ref().map_or(0, |l| l.block_size) {
            0 => FALLBACK_BLOCK_SIZE,
            n => n,
        };
        let share = Share {
            // A decode node prefills only some prompts itself (short ones,
            // or with no prefill node): its queued tokens are its reports'.
            tokens: match entry.handle.role {
                Role::Prefill => prompt_tokens as u64,
                Role::Decode => 0,
            },
            blocks: (prompt_tokens as u64).div_ceil(u64::from(block_size)),
        };
        entry.own.on_sent(share);
        Some(Assignment {
            pool: self.clone(),
            addr: entry.handle.addr.clone(),
            entry: entry.id,
            share,
            refused: false,
        })
    }

    /// Stores a load report of `addr`, and what it says the node serves; the
    /// report is also the probe of an open breaker.
    fn on_report(&self, addr: &str, mut load: tandem_proto::v1::NodeLoad) {
        let published = Some(load.model_fingerprint.clone()).filter(|f| !f.is_empty());
        // A record's fingerprint stands until a report says otherwise.
        let compatible = published
            .as_deref()
            .is_none_or(|f| self.identity.note(addr, Some(f)));
        let mut nodes = self.lock();
        // Events of a node that left are dropped with it.
        if let Some(e) = nodes.get_mut(addr) {
            self.kv_lock().apply(&e.handle.addr, &load);
            // The status keeps the figures, not the events.
            load.blocks_gained = Vec::new();
            load.blocks_dropped = Vec::new();
            if published.is_some() {
                e.compatible = compatible;
                e.identified = true;
            }
            let now = Instant::now();
            if e.handle.role == Role::Prefill {
                e.rate.on_report(&load, e.sent_tokens, now);
            }
            e.own.on_report(&load);
            if e.handle.role == Role::Decode && self.routing.decode_waiting.is_some() {
                // Other routers' requests may have ended there.
                self.decode_queue.wake_head();
            }
            e.status.load = Some(load);
            e.status.reachable = true;
            e.last_report = now;
            let changed = e.breaker.on_report(now);
            e.breaker_changed(changed);
        }
    }

    #[cfg(test)]
    fn set_status(&self, addr: &str, update: impl FnOnce(&mut NodeStatus)) {
        if let Some(e) = self.lock().get_mut(addr) {
            update(&mut e.status);
            // As a report would.
            if let Some(load) = &e.status.load {
                e.own.on_report(load);
            }
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

/// Whether a failed attempt to reach a node is worth a warning: once the
/// backoff is at its longest, and then once every [`UNREACHABLE_WARN_EVERY`]
/// (`warned`: the last warning of this outage).
fn unreachable_warning_due(backoff: Duration, warned: Option<Instant>, now: Instant) -> bool {
    backoff == BACKOFF_MAX
        && warned.is_none_or(|at| now.duration_since(at) >= UNREACHABLE_WARN_EVERY)
}

/// Follows one node's load reports until `stop` fires.
async fn watch_load(
    pool: Arc<NodePool>,
    node: NodeHandle,
    interval_ms: u32,
    stop: CancellationToken,
) {
    let mut backoff = BACKOFF_MIN;
    let mut warned: Option<Instant> = None;
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
                        Ok(Some(load)) => {
                            backoff = BACKOFF_MIN;
                            warned = None;
                            pool.on_report(&node.addr, load);
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
                // node) or a node that is down shows here, again and again:
                // say it once the backoff is at its longest, so a
                // misconfiguration is seen, then once a minute.
                let now = Instant::now();
                if unreachable_warning_due(backoff, warned, now) {
                    warned = Some(now);
                    warn!(node = %node.addr, "cannot watch load: {}", status_chain(&status));
                } else {
                    debug!(node = %node.addr, "cannot watch load: {}", status_chain(&status));
                }
            }
        }
        // A node that cannot be reached, or ends its stream, has failed.
        pool.mark_failed(&node.addr);
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

#[cfg(test)]
mod tests;
