//! `tandem up | router | prefill | decode`: running cluster roles from a config.
//!
//! With `[membership.etcd]`, nodes register themselves in etcd (see
//! `tandem_cluster::registration`) and the router follows etcd; without it
//! the router's node lists are the membership. A node asked to stop (Ctrl-C,
//! SIGTERM) that is registered drains: it leaves etcd first, so the router
//! sends it nothing new, finishes what it has (at most
//! `membership.drain_timeout_s`), then stops.
//!
//! `tandem up` (router and nodes in one process) drains in this order:
//! its router stops admitting (new requests get UNAVAILABLE, health says
//! NOT_SERVING) and the requests it admitted run to their end; only then do
//! its nodes leave etcd (other routers' requests still running on them
//! finish too), and everything stops. One `drain_timeout_s` bounds it all.

use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use tandem_cluster::membership::{Member, Membership, Role as MemberRole};
use tandem_cluster::{
    Capacity, Config, DEFAULT_MODEL_PATH, EtcdMembership, ModelFingerprint, ModelSection,
    NodeRecord, Registration, SYNTH_MODEL_DIR, StaticMembership, grpc_tls,
};
use tandem_engine::ModelDir;
use tokio_util::sync::CancellationToken;

/// The config `tandem up` uses when given none: the whole cluster on loopback.
pub const LOCAL_CONFIG: &str = include_str!("../../cluster-configs/local.toml");

/// Reads `path`, or the embedded local config.
pub fn load_config(path: Option<&Path>) -> anyhow::Result<Config> {
    Ok(match path {
        Some(p) => Config::from_file(p)?,
        None => Config::parse(LOCAL_CONFIG)?,
    })
}

/// Opens the configured model; the default one is fetched on first use (see
/// [`crate::model_cmd::default_model`]) and the synthesized one written.
pub fn open_model(section: &ModelSection) -> anyhow::Result<Arc<ModelDir>> {
    let device = match section.backend {
        tandem_cluster::config::BackendKind::Cpu => tandem_engine::Device::Cpu,
        #[cfg(feature = "cuda")]
        tandem_cluster::config::BackendKind::Cuda => tandem_engine::Device::Cuda(section.device),
        #[cfg(not(feature = "cuda"))]
        tandem_cluster::config::BackendKind::Cuda => anyhow::bail!(
            "model.backend = \"cuda\" needs a build with `--features cuda` (this one has only the CPU backend)"
        ),
    };
    let path = if section.path == Path::new(DEFAULT_MODEL_PATH) {
        crate::model_cmd::default_model()?
    } else if section.path == Path::new(SYNTH_MODEL_DIR) {
        crate::model_cmd::synth_model()?
    } else {
        section.path.clone()
    };
    let mut model =
        ModelDir::open(&path).with_context(|| format!("opening model {}", path.display()))?;
    model.device = device;
    Ok(Arc::new(model))
}

/// Fires on Ctrl-C or SIGTERM (what Kubernetes sends a pod it stops).
fn stop_signal() -> CancellationToken {
    let token = CancellationToken::new();
    let t = token.clone();
    tokio::spawn(async move {
        #[cfg(unix)]
        {
            use tokio::signal::unix::{SignalKind, signal};
            match signal(SignalKind::terminate()) {
                Ok(mut term) => {
                    tokio::select! {
                        _ = tokio::signal::ctrl_c() => {}
                        _ = term.recv() => {}
                    }
                }
                Err(_) => {
                    let _ = tokio::signal::ctrl_c().await;
                }
            }
        }
        #[cfg(not(unix))]
        let _ = tokio::signal::ctrl_c().await;
        eprintln!("shutting down");
        t.cancel();
    });
    token
}

/// Flags that override the config for one node.
#[derive(clap::Args, Default, Clone)]
pub struct NodeFlags {
    /// Node id, overriding the config's (ids must be unique per role in a cluster).
    #[arg(long)]
    pub id: Option<String>,
    /// IP address other hosts reach this node at (overrides membership.advertise_ip).
    #[arg(long)]
    pub advertise_ip: Option<IpAddr>,
}

/// Flags for the process's Prometheus endpoint.
#[derive(clap::Args, Default, Clone)]
pub struct MetricsFlags {
    /// Serve Prometheus `/metrics` on this address (overrides `[metrics] listen`;
    /// port 0 picks a free one, printed at start).
    #[arg(long)]
    pub metrics_listen: Option<SocketAddr>,
}

/// Serves this process's `/metrics` when `--metrics-listen` or `[metrics]`
/// asks for it. Called before any role starts, so every role records into
/// the one recorder.
async fn start_metrics(
    config: &Config,
    flags: &MetricsFlags,
    shutdown: &CancellationToken,
) -> anyhow::Result<()> {
    let Some(addr) = flags
        .metrics_listen
        .or(config.metrics.as_ref().map(|m| m.listen))
    else {
        return Ok(());
    };
    let endpoint = tandem_telemetry::serve_metrics(addr, shutdown.clone()).await?;
    println!("metrics listening on http://{}/metrics", endpoint.addr);
    Ok(())
}

/// The name the router and nodes use for the model.
fn model_name(config: &Config, model: &ModelDir) -> String {
    config.model.name.clone().unwrap_or_else(|| model.name())
}

/// `http://ip:port` (`https://` with `tls`) that other hosts use for a
/// node listening on `bound`.
fn advertised_url(
    bound: SocketAddr,
    advertise: Option<IpAddr>,
    tls: bool,
) -> anyhow::Result<String> {
    let ip = match advertise {
        Some(ip) => ip,
        None if bound.ip().is_unspecified() => anyhow::bail!(
            "the node listens on {bound}, which other hosts cannot dial: set membership.advertise_ip or --advertise-ip"
        ),
        None => bound.ip(),
    };
    Ok(format!(
        "{}://{}",
        grpc_tls::scheme(tls),
        SocketAddr::new(ip, bound.port())
    ))
}

/// The name this node's certificate is checked against, with `[tls]`.
fn tls_name(config: &Config) -> Option<String> {
    config.tls.as_ref().map(|t| t.server_name.clone())
}

/// Registers the node `record` describes when the config has etcd membership.
fn register(
    config: &Config,
    record: impl FnOnce() -> anyhow::Result<NodeRecord>,
) -> anyhow::Result<Option<Registration>> {
    let Some(etcd) = &config.membership.etcd else {
        return Ok(None);
    };
    let record = record()?;
    eprintln!(
        "registering {} {} ({}, model {}) in etcd cluster {:?}",
        record.role.as_str(),
        record.id,
        record.grpc_addr,
        record
            .fingerprint
            .map_or_else(|| "-".to_string(), |f| f.to_string()),
        etcd.cluster
    );
    Ok(Some(Registration::start(etcd.clone(), record)?))
}

/// Leaves etcd, then waits (at most `timeout`) until `in_flight` is zero.
async fn drain(registration: Registration, timeout: Duration, in_flight: impl Fn() -> usize) {
    eprintln!("draining: leaving the cluster");
    registration.withdraw().await;
    wait_idle(timeout, in_flight).await;
}

/// Waits (at most `timeout`) until `in_flight` is zero, after a moment for
/// requests already on their way.
async fn wait_idle(timeout: Duration, in_flight: impl Fn() -> usize) {
    // A request the router chose just before it heard of the withdrawal may
    // still be on its way.
    let deadline = tokio::time::Instant::now() + timeout;
    tokio::time::sleep(Duration::from_millis(250).min(timeout)).await;
    let mut idle_checks = 0;
    while tokio::time::Instant::now() < deadline {
        let n = in_flight();
        idle_checks = if n == 0 { idle_checks + 1 } else { 0 };
        if idle_checks >= 2 {
            eprintln!("drained");
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    eprintln!(
        "drain timeout ({timeout:?}) with {} requests in flight; stopping",
        in_flight()
    );
}

/// The router's membership: etcd when configured, else its node lists
/// (bare `host:port`s get `https://` with `[tls]`) and `in_process`, the
/// nodes `tandem up` started.
fn router_membership(
    config: &Config,
    model: &ModelDir,
    prefill: &[String],
    decode: &[String],
    in_process: Vec<Member>,
    shutdown: &CancellationToken,
) -> Arc<dyn Membership> {
    match &config.membership.etcd {
        Some(etcd) => {
            eprintln!(
                "router follows etcd cluster {:?} at {}",
                etcd.cluster,
                etcd.endpoints.join(",")
            );
            EtcdMembership::start(
                etcd.clone(),
                Some(model_name(config, model)),
                shutdown.clone(),
            )
        }
        None => {
            let tls = config.tls.is_some();
            let mut members = in_process;
            members.extend(
                prefill
                    .iter()
                    .map(|a| Member::new(MemberRole::Prefill, grpc_tls::with_scheme(a, tls))),
            );
            members.extend(
                decode
                    .iter()
                    .map(|a| Member::new(MemberRole::Decode, grpc_tls::with_scheme(a, tls))),
            );
            Arc::new(StaticMembership::from_members(members))
        }
    }
}

fn decode_record(
    config: &Config,
    model: &ModelDir,
    d: &tandem_decode::RunningDecode,
    id: &str,
    advertise: Option<IpAddr>,
) -> anyhow::Result<NodeRecord> {
    let section = config.decode.as_ref().context("no [decode] section")?;
    Ok(NodeRecord {
        id: id.to_string(),
        role: MemberRole::Decode,
        grpc_addr: advertised_url(d.grpc_addr, advertise, config.tls.is_some())?,
        tls_name: tls_name(config),
        quic_addrs: d.quic_addrs.clone(),
        model: model_name(config, model),
        fingerprint: Some(ModelFingerprint::of(model)?),
        tp_size: section.tp as u32,
        capacity: Capacity {
            kv_blocks: section.kv_blocks as u64,
            block_size: section.block_size as u64,
            max_batch: Some(section.max_batch as u64),
            max_queue: None,
        },
    })
}

fn prefill_record(
    config: &Config,
    model: &ModelDir,
    addr: SocketAddr,
    id: &str,
    advertise: Option<IpAddr>,
) -> anyhow::Result<NodeRecord> {
    let section = config.prefill.as_ref().context("no [prefill] section")?;
    Ok(NodeRecord {
        id: id.to_string(),
        role: MemberRole::Prefill,
        grpc_addr: advertised_url(addr, advertise, config.tls.is_some())?,
        tls_name: tls_name(config),
        quic_addrs: Vec::new(),
        model: model_name(config, model),
        fingerprint: Some(ModelFingerprint::of(model)?),
        tp_size: section.tp as u32,
        capacity: Capacity {
            kv_blocks: section.kv_blocks as u64,
            block_size: section.block_size as u64,
            max_batch: None,
            max_queue: Some(section.max_queue as u64),
        },
    })
}

/// `tandem up`: every role in the config, in this process.
pub async fn up(config_path: Option<PathBuf>, metrics: MetricsFlags) -> anyhow::Result<()> {
    let config = load_config(config_path.as_deref())?;
    let model = open_model(&config.model)?;
    let stop = stop_signal();
    let shutdown = CancellationToken::new();
    start_metrics(&config, &metrics, &shutdown).await?;
    let advertise = config.membership.advertise_ip;
    let mut router = config.router.clone().unwrap_or_default();
    // `[tls]` covers every role of the file, the router included.
    router.tls = config.tls.clone();
    let tls = config.tls.is_some();
    // The nodes started here, checked under this file's `[tls] server_name`.
    let mut in_process = Vec::new();
    let mut registrations = Vec::new();
    let mut decode_done = None;
    let mut decode_stats = None;
    if let Some(decode) = config.decode.clone() {
        let (id, tp) = (decode.id.clone(), decode.tp);
        let d =
            tandem_decode::serve_advertising(model.clone(), decode, advertise, shutdown.clone())
                .await?;
        eprintln!(
            "decode node (tp = {tp}): gRPC {} KV/QUIC {}",
            d.grpc_addr, d.quic_addr
        );
        in_process.push(Member {
            tls_name: tls_name(&config),
            ..Member::new(
                MemberRole::Decode,
                format!("{}://{}", grpc_tls::scheme(tls), d.grpc_addr),
            )
        });
        registrations.extend(register(&config, || {
            decode_record(&config, &model, &d, &id, advertise)
        })?);
        decode_stats = Some(d.stats.clone());
        decode_done = Some(d.done);
    }
    let mut prefill_done = None;
    if let Some(prefill) = config.prefill.clone() {
        let (id, tp) = (prefill.id.clone(), prefill.tp);
        let p = tandem_prefill::serve(model.clone(), prefill, shutdown.clone()).await?;
        eprintln!("prefill node (tp = {tp}): gRPC {}", p.addr);
        in_process.push(Member {
            tls_name: tls_name(&config),
            ..Member::new(
                MemberRole::Prefill,
                format!("{}://{}", grpc_tls::scheme(tls), p.addr),
            )
        });
        registrations.extend(register(&config, || {
            prefill_record(&config, &model, p.addr, &id, advertise)
        })?);
        prefill_done = Some(p);
    }
    let membership = router_membership(
        &config,
        &model,
        &router.prefill_nodes,
        &router.decode_nodes,
        in_process,
        &shutdown,
    );
    let r = tandem_router::serve(
        model.clone(),
        config.model.name.clone(),
        router,
        membership,
        shutdown.clone(),
    )
    .await?;
    println!(
        "Tandem is up: model {} ({}), router listening on {}",
        model.name(),
        model.config.architecture.hf_name(),
        r.addr
    );
    println!(
        "try: tandem generate --router http://{} \"Once upon a time\"",
        r.addr
    );
    stop.cancelled().await;
    // Drain: stop admitting, let what was admitted finish, then leave etcd.
    let timeout = Duration::from_secs_f64(config.membership.drain_timeout_s);
    let started = tokio::time::Instant::now();
    eprintln!("draining: the router admits no more requests");
    r.drain.stop_admitting();
    match r.drain.wait_idle(timeout).await {
        0 => eprintln!("draining: the router's requests finished"),
        n => eprintln!("drain timeout ({timeout:?}) with {n} router requests in flight"),
    }
    if !registrations.is_empty() {
        eprintln!("draining: leaving the cluster");
        for registration in registrations {
            registration.withdraw().await;
        }
        // Other routers' requests on these nodes.
        let nodes_in_flight = || {
            let decode = decode_stats.as_ref().map_or(0, |s| {
                let s = s.lock().unwrap_or_else(|e| e.into_inner());
                (s.running + s.queued) as usize
            });
            let prefill = prefill_done.as_ref().map_or(0, |p| {
                let load = p.load();
                load.running + load.queued
            });
            decode + prefill
        };
        wait_idle(timeout.saturating_sub(started.elapsed()), nodes_in_flight).await;
    }
    shutdown.cancel();
    let _ = r.join.await;
    if let Some(p) = prefill_done {
        let _ = p.wait().await;
    }
    if let Some(d) = decode_done {
        let _ = d.await;
    }
    Ok(())
}

/// Which single role to run.
pub enum Role {
    Router,
    Prefill,
    Decode,
}

/// `tandem router|prefill|decode --config FILE`.
pub async fn run_role(
    role: Role,
    config_path: PathBuf,
    flags: NodeFlags,
    metrics: MetricsFlags,
) -> anyhow::Result<()> {
    let config = load_config(Some(&config_path))?;
    let model = open_model(&config.model)?;
    let stop = stop_signal();
    let shutdown = CancellationToken::new();
    start_metrics(&config, &metrics, &shutdown).await?;
    let advertise = flags.advertise_ip.or(config.membership.advertise_ip);
    let drain_timeout = Duration::from_secs_f64(config.membership.drain_timeout_s);
    match role {
        Role::Router => {
            let router = config
                .router
                .clone()
                .context("the config has no [router] section")?;
            let membership = router_membership(
                &config,
                &model,
                &router.prefill_nodes,
                &router.decode_nodes,
                Vec::new(),
                &shutdown,
            );
            let r = tandem_router::serve(
                model,
                config.model.name.clone(),
                router,
                membership,
                shutdown.clone(),
            )
            .await?;
            println!("router listening on {}", r.addr);
            let mut join = r.join;
            let ended = tokio::select! {
                _ = stop.cancelled() => None,
                ended = &mut join => Some(ended),
            };
            shutdown.cancel();
            match ended {
                Some(Ok(result)) => result?,
                Some(Err(e)) => anyhow::bail!("the router task failed: {e}"),
                None => join.await??,
            }
        }
        Role::Prefill => {
            let mut prefill = config
                .prefill
                .clone()
                .context("the config has no [prefill] section")?;
            if let Some(id) = &flags.id {
                prefill.id = id.clone();
            }
            let id = prefill.id.clone();
            let p = tandem_prefill::serve(model.clone(), prefill, shutdown.clone()).await?;
            println!("prefill node listening on {}", p.addr);
            let registration = register(&config, || {
                prefill_record(&config, &model, p.addr, &id, advertise)
            })?;
            stop.cancelled().await;
            if let Some(registration) = registration {
                drain(registration, drain_timeout, || {
                    let load = p.load();
                    load.running + load.queued
                })
                .await;
            }
            shutdown.cancel();
            p.wait().await?;
        }
        Role::Decode => {
            let mut decode = config
                .decode
                .clone()
                .context("the config has no [decode] section")?;
            if let Some(id) = &flags.id {
                decode.id = id.clone();
            }
            let id = decode.id.clone();
            let d = tandem_decode::serve_advertising(
                model.clone(),
                decode,
                advertise,
                shutdown.clone(),
            )
            .await?;
            println!(
                "decode node listening on {} (KV over QUIC on {})",
                d.grpc_addr, d.quic_addr
            );
            let registration = register(&config, || {
                decode_record(&config, &model, &d, &id, advertise)
            })?;
            stop.cancelled().await;
            if let Some(registration) = registration {
                let stats = d.stats.clone();
                drain(registration, drain_timeout, move || {
                    let s = stats.lock().unwrap_or_else(|e| e.into_inner());
                    (s.running + s.queued) as usize
                })
                .await;
            }
            shutdown.cancel();
            let _ = d.done.await;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn advertised_addresses_are_dialable() {
        let bound: SocketAddr = "127.0.0.1:7000".parse().unwrap();
        assert_eq!(
            advertised_url(bound, None, false).unwrap(),
            "http://127.0.0.1:7000"
        );
        assert_eq!(
            advertised_url(bound, None, true).unwrap(),
            "https://127.0.0.1:7000"
        );
        let any: SocketAddr = "0.0.0.0:7000".parse().unwrap();
        let err = advertised_url(any, None, false).unwrap_err().to_string();
        assert!(err.contains("advertise_ip"), "{err}");
        let pod: IpAddr = "10.1.2.3".parse().unwrap();
        assert_eq!(
            advertised_url(any, Some(pod), false).unwrap(),
            "http://10.1.2.3:7000"
        );
        let v6: IpAddr = "fd00::5".parse().unwrap();
        assert_eq!(
            advertised_url("[::]:7000".parse().unwrap(), Some(v6), false).unwrap(),
            "http://[fd00::5]:7000"
        );
    }
}
