//! `tandem status`: who is in the cluster and how loaded each node is.
//!
//! Members come from etcd (`--etcd`, or a config with `[membership.etcd]`)
//! or from a config's static node lists; each node is then asked for one
//! load report over its `WatchLoad` stream, as the router does. With a
//! config that has `[tls]` (the router's, say), nodes are asked over mutual
//! TLS with that certificate.
//!
//! Each node's MODEL ID is the start of its fingerprint's weights digest
//! (`tandem_cluster::fingerprint`); the last column says whether the node
//! serves the cluster's model, and if not what differs. The cluster's
//! fingerprint is the config's `[model] fingerprint`, else that of the
//! config's model files (as the router decides), else, with `--etcd`
//! only, the one most nodes of the model's name hold (see [`reference`]).

use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use tandem_cluster::{Config, EtcdSection, GrpcTls, ModelFingerprint, NodeRecord, grpc_tls};
use tandem_proto::v1 as pb;
use tandem_router::identity::{Verdict, verdict};
use tokio::task::JoinSet;

/// How long one node may take to send its first load report.
const LOAD_TIMEOUT: Duration = Duration::from_secs(2);

#[derive(clap::Args)]
pub struct StatusArgs {
    /// A config file: its [membership.etcd], else its router's node lists;
    /// its [tls] certificate, if any, for asking the nodes.
    #[arg(long)]
    config: Option<PathBuf>,
    /// etcd endpoint (repeatable), instead of a config.
    #[arg(long)]
    etcd: Vec<String>,
    /// Cluster name in etcd (with --etcd).
    #[arg(long, default_value = "tandem")]
    cluster: String,
    /// The router's metrics endpoint (HOST:PORT of its `[metrics] listen`):
    /// also show its circuit breaker for each node.
    #[arg(long)]
    router_metrics: Option<String>,
}

/// One member as listed, before its load is known.
struct Listed {
    role: String,
    id: Option<String>,
    addr: String,
    /// The name its certificate is checked against (`None`: the address's host).
    tls_name: Option<String>,
    model: Option<String>,
    tp_size: Option<u32>,
    /// Its model fingerprint, from its record.
    fingerprint: Option<String>,
}

pub async fn run(args: StatusArgs) -> anyhow::Result<()> {
    let config = match &args.config {
        Some(p) => Some(Config::from_file(p)?),
        None => None,
    };
    let tls = match config.as_ref().and_then(|c| c.tls.as_ref()) {
        Some(t) => Some(GrpcTls::load(t)?),
        None => None,
    };
    let pinned = config.as_ref().and_then(reference_of_config);
    let listed = members(&args, config).await?;
    if listed.is_empty() {
        println!("no members");
    } else {
        print_members(listed, tls, pinned).await?;
    }
    if let Some(addr) = &args.router_metrics {
        crate::status_breakers::print(addr).await?;
    }
    Ok(())
}

/// The members' load table.
async fn print_members(
    listed: Vec<Listed>,
    tls: Option<GrpcTls>,
    pinned: Option<ModelFingerprint>,
) -> anyhow::Result<()> {
    let mut loads = JoinSet::new();
    for (i, m) in listed.iter().enumerate() {
        let (role, addr, name) = (m.role.clone(), m.addr.clone(), m.tls_name.clone());
        let tls = tls.clone();
        loads.spawn(async move {
            (
                i,
                load_of(&role, &addr, tls.as_ref(), name.as_deref()).await,
            )
        });
    }
    let mut results: Vec<Option<Result<pb::NodeLoad, String>>> = vec![None; listed.len()];
    while let Some(done) = loads.join_next().await {
        let (i, load) = done.context("a load query panicked")?;
        results[i] = Some(load);
    }
    // What each node serves: its record's fingerprint, else its report's.
    let fingerprints: Vec<Option<String>> = listed
        .iter()
        .zip(&results)
        .map(|(m, load)| {
            m.fingerprint.clone().or_else(|| match load {
                Some(Ok(l)) if !l.model_fingerprint.is_empty() => Some(l.model_fingerprint.clone()),
                _ => None,
            })
        })
        .collect();
    let models: Vec<Option<String>> = listed
        .iter()
        .zip(&results)
        .map(|(m, load)| {
            m.model.clone().or_else(|| match load {
                Some(Ok(l)) => Some(l.model.clone()),
                _ => None,
            })
        })
        .collect();
    println!(
        "{:<8} {:<16} {:<26} {:<16} {:>2} {:>7} {:>6} {:>13} {:>14} {:>13} {:>9} {:<8} SERVES",
        "ROLE",
        "ID",
        "ADDRESS",
        "MODEL",
        "TP",
        "RUNNING",
        "QUEUED",
        "KV FREE/TOTAL",
        "PREFILL TOKENS",
        "CACHED BLOCKS",
        "CACHE HIT",
        "MODEL ID",
    );
    for (i, (m, load)) in listed.iter().zip(results).enumerate() {
        let dash = || "-".to_string();
        let fingerprint = fingerprints[i].as_deref();
        let reference = pinned.or_else(|| reference(&models, &fingerprints, models[i].as_deref()));
        let model_id = fingerprint
            .and_then(|f| f.parse::<ModelFingerprint>().ok())
            .map_or_else(dash, |f| f.short());
        let serves = match verdict(reference.as_ref(), fingerprint) {
            Verdict::Compatible if reference.is_some() => "cluster model".to_string(),
            Verdict::Compatible => "? (no majority)".to_string(),
            Verdict::Unknown => "? (no fingerprint)".to_string(),
            Verdict::Incompatible(why) => format!("INCOMPATIBLE: {why}; gets no requests"),
        };
        match load.unwrap_or_else(|| Err("no answer".into())) {
            Ok(l) => println!(
                "{:<8} {:<16} {:<26} {:<16} {:>2} {:>7} {:>6} {:>13} {:>14} {:>13} {:>9} {:<8} {}",
                m.role,
                m.id.clone().unwrap_or(l.node_id.clone()),
                m.addr,
                m.model.clone().unwrap_or(l.model.clone()),
                m.tp_size.unwrap_or(l.tp_size.max(1)),
                l.running,
                l.queued,
                format!("{}/{}", l.kv_blocks_free, l.kv_blocks_total),
                l.queued_prefill_tokens,
                l.prefix_cache_blocks,
                hit_rate(&l),
                model_id,
                serves
            ),
            Err(e) => println!(
                "{:<8} {:<16} {:<26} {:<16} {:>2} unreachable: {e} ({model_id}: {serves})",
                m.role,
                m.id.clone().unwrap_or_else(dash),
                m.addr,
                m.model.clone().unwrap_or_else(dash),
                m.tp_size.map(|t| t.to_string()).unwrap_or_else(dash),
            ),
        }
    }
    Ok(())
}

/// The cluster's fingerprint by the config: its `[model] fingerprint`, else
/// that of its model files when they are here (the router's own choice).
fn reference_of_config(config: &Config) -> Option<ModelFingerprint> {
    if let Some(pinned) = config.model.fingerprint {
        return Some(pinned);
    }
    let path = &config.model.path;
    if !path.exists() {
        return None;
    }
    let model = tandem_engine::ModelDir::open(path).ok()?;
    ModelFingerprint::of(&model).ok()
}

/// Without a config: the fingerprint most nodes serving `model` hold (a
/// strict majority; `None` on a tie, when nobody can say which is right).
fn reference(
    models: &[Option<String>],
    fingerprints: &[Option<String>],
    model: Option<&str>,
) -> Option<ModelFingerprint> {
    let mut counts: Vec<(&str, usize)> = Vec::new();
    for (m, f) in models.iter().zip(fingerprints) {
        let Some(f) = f.as_deref().filter(|_| m.as_deref() == model) else {
            continue;
        };
        match counts.iter_mut().find(|(g, _)| *g == f) {
            Some((_, n)) => *n += 1,
            None => counts.push((f, 1)),
        }
    }
    counts.sort_by_key(|(_, n)| std::cmp::Reverse(*n));
    match counts.as_slice() {
        [(top, n), rest @ ..] if rest.first().is_none_or(|(_, m)| m < n) => top.parse().ok(),
        _ => None,
    }
}

/// The share of the prompt tokens a node prefilled whose KV came from its
/// prefix cache, since it started; "-" before its first prompt.
fn hit_rate(l: &pb::NodeLoad) -> String {
    if l.prompt_tokens_total == 0 {
        return "-".into();
    }
    format!(
        "{:.1}%",
        100.0 * l.cached_tokens_total as f64 / l.prompt_tokens_total as f64
    )
}

/// The members, from etcd or from the config's router lists.
async fn members(args: &StatusArgs, config: Option<Config>) -> anyhow::Result<Vec<Listed>> {
    let etcd = if !args.etcd.is_empty() {
        Some(EtcdSection {
            endpoints: args.etcd.clone(),
            cluster: args.cluster.clone(),
            lease_ttl_s: 1,
        })
    } else {
        None
    };
    let etcd = etcd.or_else(|| config.as_ref().and_then(|c| c.membership.etcd.clone()));
    if let Some(etcd) = etcd {
        let records = tandem_cluster::etcd::list_nodes(&etcd)
            .await
            .with_context(|| {
                format!("listing the members in etcd ({})", etcd.endpoints.join(","))
            })?;
        return Ok(records.into_iter().map(from_record).collect());
    }
    let tls = config.as_ref().is_some_and(|c| c.tls.is_some());
    let Some(router) = config.and_then(|c| c.router) else {
        anyhow::bail!(
            "give --etcd URL, or --config FILE with [membership.etcd] or a [router] section"
        );
    };
    let listed = |role: &str, addrs: &[String]| -> Vec<Listed> {
        addrs
            .iter()
            .map(|a| Listed {
                role: role.to_string(),
                id: None,
                addr: grpc_tls::with_scheme(a, tls),
                tls_name: None,
                model: None,
                tp_size: None,
                fingerprint: None,
            })
            .collect()
    };
    let mut out = listed("prefill", &router.prefill_nodes);
    out.extend(listed("decode", &router.decode_nodes));
    Ok(out)
}

fn from_record(r: NodeRecord) -> Listed {
    Listed {
        role: r.role.as_str().to_string(),
        fingerprint: r.fingerprint.map(|f| f.to_string()),
        id: Some(r.id),
        addr: r.grpc_addr,
        tls_name: r.tls_name,
        model: Some(r.model),
        tp_size: Some(r.tp_size),
    }
}

/// One load report from the node at `addr`, over mutual TLS with `tls`
/// (checking its certificate under `tls_name`, or the address's host).
async fn load_of(
    role: &str,
    addr: &str,
    tls: Option<&GrpcTls>,
    tls_name: Option<&str>,
) -> Result<pb::NodeLoad, String> {
    let query = async {
        let channel = grpc_tls::endpoint(addr, tls, tls_name)
            .map_err(|e| e.to_string())?
            .connect_timeout(LOAD_TIMEOUT)
            .connect()
            .await
            .map_err(|e| grpc_tls::error_chain(&e))?;
        let request = pb::WatchLoadRequest { interval_ms: 100 };
        let mut stream = match role {
            "prefill" => pb::prefill_node_client::PrefillNodeClient::new(channel)
                .watch_load(request)
                .await
                .map_err(|s| status_text(&s))?
                .into_inner(),
            _ => pb::decode_node_client::DecodeNodeClient::new(channel)
                .watch_load(request)
                .await
                .map_err(|s| status_text(&s))?
                .into_inner(),
        };
        stream
            .message()
            .await
            .map_err(|s| status_text(&s))?
            .ok_or_else(|| "the load stream ended".to_string())
    };
    tokio::time::timeout(LOAD_TIMEOUT, query)
        .await
        .unwrap_or_else(|_| Err(format!("no load report within {LOAD_TIMEOUT:?}")))
}

/// A status's message and the transport error behind it, if any (a refused
/// TLS handshake is only "transport error" at the top).
fn status_text(status: &tonic::Status) -> String {
    match std::error::Error::source(status) {
        Some(source) => grpc_tls::error_chain(source),
        None => status.message().to_string(),
    }
}
