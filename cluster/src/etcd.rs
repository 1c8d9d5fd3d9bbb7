//! etcd membership, the router's side: [`EtcdMembership`] lists
//! `/tandem/<cluster>/nodes/` and watches it from the listing's revision + 1,
//! feeding the [`Membership`] channel the router's node pool follows, so the
//! routing code is the same as with static membership.
//!
//! When etcd cannot be reached (down, restarting, partitioned) the members
//! stay as last known, so routing goes on; the watcher reconnects with
//! backoff, lists again (a restarted etcd may have lost everything, or may
//! have a new revision history) and resumes watching.

use std::sync::Arc;
use std::time::Duration;

use etcd_client::{Client, ConnectOptions, EventType, GetOptions, WatchOptions};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::config::EtcdSection;
use crate::membership::{Member, Membership};
use crate::node_record::{MemberTable, NodeRecord};

/// Longest wait for a connection or a unary call to etcd.
pub const CALL_TIMEOUT: Duration = Duration::from_secs(2);
/// First wait before reconnecting.
pub(crate) const BACKOFF_MIN: Duration = Duration::from_millis(100);
/// Longest wait between reconnection attempts.
pub(crate) const BACKOFF_MAX: Duration = Duration::from_secs(2);

/// A failed conversation with etcd.
#[derive(Debug, thiserror::Error)]
pub enum EtcdError {
    /// The client library's error (connection refused, unavailable, ...).
    #[error("etcd: {0}")]
    Client(#[from] etcd_client::Error),
    /// etcd did not answer in time.
    #[error("etcd did not answer within {0:?}")]
    Timeout(Duration),
    /// A stream ended or etcd said something unusable.
    #[error("etcd: {0}")]
    Protocol(String),
}

/// Runs `call` with [`CALL_TIMEOUT`].
pub(crate) async fn timed<T>(
    call: impl Future<Output = Result<T, etcd_client::Error>>,
) -> Result<T, EtcdError> {
    match tokio::time::timeout(CALL_TIMEOUT, call).await {
        Ok(r) => r.map_err(EtcdError::from),
        Err(_) => Err(EtcdError::Timeout(CALL_TIMEOUT)),
    }
}

/// A client for `endpoints`.
///
/// HTTP/2 keep-alive pings notice a silent etcd (paused, partitioned) on the
/// long-lived watch stream within 15 s. They must stay at least 5 s apart and
/// only ride on open streams: etcd's server (`--grpc-keepalive-min-time`, 5 s
/// by default, no pings without streams) answers more eager pings with
/// GOAWAY, which cut the router's watch every few seconds. A node does not
/// depend on them: it counts its lease as lost when etcd has not answered a
/// keep-alive for a TTL.
pub async fn connect(endpoints: &[String]) -> Result<Client, EtcdError> {
    let options = ConnectOptions::new()
        .with_connect_timeout(CALL_TIMEOUT)
        .with_keep_alive(Duration::from_secs(10), Duration::from_secs(5))
        .with_keep_alive_while_idle(false);
    timed(Client::connect(endpoints, Some(options))).await
}

/// Reads every node registered in cluster `cluster` once (for `tandem status`).
pub async fn list_nodes(config: &EtcdSection) -> Result<Vec<NodeRecord>, EtcdError> {
    let mut client = connect(&config.endpoints).await?;
    let mut table = MemberTable::new(&config.cluster, None);
    let prefix = table.prefix().to_owned();
    let listing = timed(client.get(prefix, Some(GetOptions::new().with_prefix()))).await?;
    table.reset(listing.kvs().iter().map(|kv| (kv.key(), kv.value())));
    Ok(table.records())
}

/// Members registered in etcd, followed by a background task.
pub struct EtcdMembership {
    members: watch::Sender<Vec<Member>>,
    synced: watch::Sender<u64>,
    ready: watch::Sender<bool>,
}

impl EtcdMembership {
    /// Starts following cluster `config.cluster`; with `model`, only nodes
    /// serving that model are members. Returns at once, with no members
    /// until the first listing; the task ends when `shutdown` fires.
    pub fn start(
        config: EtcdSection,
        model: Option<String>,
        shutdown: CancellationToken,
    ) -> Arc<Self> {
        let this = Arc::new(EtcdMembership {
            members: watch::Sender::new(Vec::new()),
            synced: watch::Sender::new(0),
            ready: watch::Sender::new(false),
        });
        let task = this.clone();
        tokio::spawn(async move { task.follow(config, model, shutdown).await });
        this
    }

    /// Counts the listings done so far (1 after the first sync, +1 after
    /// each re-sync following a lost connection); for tests and readiness.
    pub fn syncs(&self) -> watch::Receiver<u64> {
        self.synced.subscribe()
    }

    async fn follow(
        &self,
        config: EtcdSection,
        model: Option<String>,
        shutdown: CancellationToken,
    ) {
        let mut table = MemberTable::new(&config.cluster, model);
        let mut backoff = BACKOFF_MIN;
        let mut first = true;
        loop {
            let result = tokio::select! {
                _ = shutdown.cancelled() => return,
                r = self.follow_once(&config, &mut table, &mut backoff, &mut first) => r,
            };
            let Err(e) = result;
            warn!(
                members = table.members().len(),
                "etcd membership: {e}; routing on the last known members, retrying in {backoff:?}"
            );
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tokio::time::sleep(backoff) => {}
            }
            backoff = (backoff * 2).min(BACKOFF_MAX);
        }
    }

    /// Lists, then watches until the connection fails.
    async fn follow_once(
        &self,
        config: &EtcdSection,
        table: &mut MemberTable,
        backoff: &mut Duration,
        first: &mut bool,
    ) -> Result<std::convert::Infallible, EtcdError> {
        let mut client = connect(&config.endpoints).await?;
        let prefix = table.prefix().to_owned();
        let listing =
            timed(client.get(prefix.clone(), Some(GetOptions::new().with_prefix()))).await?;
        let revision = listing
            .header()
            .map(|h| h.revision())
            .ok_or_else(|| EtcdError::Protocol("a listing without a header".into()))?;
        // After a reconnection, nodes missing from the listing may just not have
        // registered again yet (a blank etcd): they stay members for a lease TTL
        // plus the nodes' longest retry interval.
        let linger = (!*first).then(|| {
            std::time::Instant::now() + Duration::from_secs(config.lease_ttl_s.into()) + BACKOFF_MAX
        });
        *first = false;
        table.resync(
            listing.kvs().iter().map(|kv| (kv.key(), kv.value())),
            linger,
        );
        self.publish(table);
        self.synced.send_modify(|n| *n += 1);
        self.ready
            .send_if_modified(|ready| !std::mem::replace(ready, true));
        info!(
            members = table.members().len(),
            revision, "etcd membership listed; watching"
        );
        *backoff = BACKOFF_MIN;
        let options = WatchOptions::new()
            .with_prefix()
            .with_start_revision(revision + 1);
        let mut stream = timed(client.watch(prefix, Some(options))).await?;
        loop {
            let expiry = table.next_expiry();
            let next = tokio::select! {
                next = stream.message() => next?,
                _ = sleep_until(expiry) => {
                    if table.expire(std::time::Instant::now()) {
                        self.publish(table);
                    }
                    continue;
                }
            };
            let Some(response) = next else {
                return Err(EtcdError::Protocol("the watch stream ended".into()));
            };
            if response.canceled() {
                return Err(EtcdError::Protocol(format!(
                    "the watch was cancelled ({}; compacted at revision {})",
                    response.cancel_reason(),
                    response.compact_revision()
                )));
            }
            let mut changed = false;
            for event in response.events() {
                let Some(kv) = event.kv() else { continue };
                changed |= match event.event_type() {
                    EventType::Put => table.put(kv.key(), kv.value()),
                    EventType::Delete => table.delete(kv.key()),
                };
            }
            if changed {
                self.publish(table);
            }
        }
    }

    fn publish(&self, table: &MemberTable) {
        let members = table.members();
        self.members.send_if_modified(|now| {
            if *now == members {
                return false;
            }
            info!(
                prefill = members
                    .iter()
                    .filter(|m| m.role == crate::Role::Prefill)
                    .count(),
                decode = members
                    .iter()
                    .filter(|m| m.role == crate::Role::Decode)
                    .count(),
                "cluster members changed"
            );
            *now = members;
            true
        });
    }
}

/// Sleeps until `deadline`, or forever without one.
async fn sleep_until(deadline: Option<std::time::Instant>) {
    match deadline {
        Some(d) => tokio::time::sleep_until(d.into()).await,
        None => std::future::pending().await,
    }
}

impl Membership for EtcdMembership {
    fn watch(&self) -> watch::Receiver<Vec<Member>> {
        self.members.subscribe()
    }

    /// `true` from the first successful listing on (an etcd outage later
    /// keeps the last members, and the router stays ready).
    fn ready(&self) -> watch::Receiver<bool> {
        self.ready.subscribe()
    }
}
