//! etcd membership, a node's side: [`Registration`] writes the node's
//! [`NodeRecord`] under a lease of `lease_ttl_s` and renews the lease every
//! third of its TTL.
//!
//! If etcd goes away, or the lease expires (the process was paused, the
//! network cut), the task retries with backoff and registers again under a
//! new lease once etcd answers. [`Registration::withdraw`] revokes the lease,
//! which deletes the key at once: the first step of draining a node.

use std::time::Duration;

use etcd_client::{Client, PutOptions};
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::config::EtcdSection;
use crate::etcd::{BACKOFF_MAX, BACKOFF_MIN, EtcdError, connect, timed};
use crate::node_record::{NodeRecord, node_key};

/// A node's registration in etcd, kept alive by a background task.
pub struct Registration {
    key: String,
    stop: CancellationToken,
    registered: watch::Receiver<bool>,
    task: JoinHandle<()>,
}

impl Registration {
    /// Starts registering `record` in cluster `config.cluster`. Returns at once;
    /// the node serves whether or not etcd answers.
    pub fn start(config: EtcdSection, record: NodeRecord) -> Result<Registration, EtcdError> {
        let key = node_key(&config.cluster, record.role, &record.id);
        let (registered_tx, registered) = watch::channel(false);
        let stop = CancellationToken::new();
        let task = tokio::spawn(keep_registered(
            config,
            key.clone(),
            record.to_json(),
            stop.clone(),
            registered_tx,
        ));
        Ok(Registration {
            key,
            stop,
            registered,
            task,
        })
    }

    /// The node's key.
    pub fn key(&self) -> &str {
        &self.key
    }

    /// True while the key is in etcd under a live lease (as far as the node knows).
    pub fn registered(&self) -> watch::Receiver<bool> {
        self.registered.clone()
    }

    /// Leaves the cluster: revokes the lease (deleting the key) and stops
    /// renewing it. Returns once etcd confirmed, or after a bounded wait
    /// when etcd does not answer (the lease then expires by itself).
    pub async fn withdraw(self) {
        self.stop.cancel();
        if tokio::time::timeout(Duration::from_secs(5), self.task)
            .await
            .is_err()
        {
            warn!(key = %self.key, "withdrawing from etcd took too long; the lease will expire by itself");
        }
    }
}

async fn keep_registered(
    config: EtcdSection,
    key: String,
    value: String,
    stop: CancellationToken,
    registered: watch::Sender<bool>,
) {
    let mut backoff = BACKOFF_MIN;
    loop {
        let mut lease = None;
        let result = hold(
            &config,
            &key,
            &value,
            &stop,
            &registered,
            &mut lease,
            &mut backoff,
        )
        .await;
        registered.send_replace(false);
        if let Err(e) = result {
            warn!(%key, "etcd registration: {e}; registering again in {backoff:?}");
        }
        if stop.is_cancelled() {
            if let Some((mut client, id)) = lease {
                match timed(client.lease_revoke(id)).await {
                    Ok(_) => info!(%key, "left the cluster (lease revoked)"),
                    Err(e) => warn!(%key, "could not revoke the lease ({e}); it expires by itself"),
                }
            }
            return;
        }
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep(backoff) => {}
        }
        backoff = (backoff * 2).min(BACKOFF_MAX);
    }
}

/// Grants a lease, writes the key and renews the lease until `stop` fires
/// (`Ok`) or the lease is lost (`Err`). Leaves the lease in `lease` so the
/// caller can revoke it.
async fn hold(
    config: &EtcdSection,
    key: &str,
    value: &str,
    stop: &CancellationToken,
    registered: &watch::Sender<bool>,
    lease: &mut Option<(Client, i64)>,
    backoff: &mut Duration,
) -> Result<(), EtcdError> {
    let ttl = i64::from(config.lease_ttl_s);
    let mut client = connect(&config.endpoints).await?;
    let granted = timed(client.lease_grant(ttl, None)).await?;
    let id = granted.id();
    *lease = Some((client.clone(), id));
    timed(client.put(key, value, Some(PutOptions::new().with_lease(id)))).await?;
    // etcd may grant more than asked (its minimum TTL); renew on its clock.
    let ttl = Duration::from_secs(granted.ttl().max(1) as u64);
    registered.send_replace(true);
    *backoff = BACKOFF_MIN;
    info!(%key, lease = id, ?ttl, "registered in etcd");

    let (mut keeper, mut answers) = timed(client.lease_keep_alive(id)).await?;
    let mut renew = tokio::time::interval(ttl / 3);
    let mut last_answer = Instant::now();
    loop {
        tokio::select! {
            _ = stop.cancelled() => return Ok(()),
            _ = renew.tick() => {
                if last_answer.elapsed() >= ttl {
                    return Err(EtcdError::Protocol(format!(
                        "no keep-alive answer for {:?}; the lease has expired",
                        last_answer.elapsed()
                    )));
                }
                keeper.keep_alive().await?;
            }
            answer = answers.message() => match answer? {
                Some(a) if a.ttl() > 0 => last_answer = Instant::now(),
                Some(_) => {
                    *lease = None;
                    return Err(EtcdError::Protocol(format!("lease {id} expired")));
                }
                None => return Err(EtcdError::Protocol("the keep-alive stream ended".into())),
            },
        }
    }
}
