//! `tandem status`: who is in the cluster and how loaded each node is.
//!
//! Members come from etcd (`--etcd`, or a config with `[membership.etcd]`)
//! or from a config's static node lists; each node is then asked for one
//! load report over its `WatchLoad` stream, as the router does. With a
//! config that has `[tls]` (the router's, say), nodes are asked over mutual
//! TLS with that certificate.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use tandem_cluster::{Config, EtcdSection, GrpcTls, NodeRecord, grpc_tls};
use tandem_proto::v1 as pb;
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
    let listed = members(&args, config).await?;
    if listed.is_empty() {
        println!("no members");
    } else {
        print_members(listed, tls).await?;
    }
    if let Some(addr) = &args.router_metrics {
        crate::status_breakers::print(addr).await?;
    }
    Ok(())
}

/// The members' load table.
async fn print_members(listed: Vec<Listed>, tls: Option<GrpcTls>) -> anyhow::Result<()> {
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
    println!(
        "{:<8} {:<16} {:<26} {:<16} {:>2} {:>7} {:>6} {:>13} {:>14} {:>13} {:>9}",
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
        "CACHE HIT"
    );
    for (m, load) in listed.iter().zip(results) {
        let dash = || "-".to_string();
        match load.unwrap_or_else(|| Err("no answer".into())) {
            Ok(l) => println!(
                "{:<8} {:<16} {:<26} {:<16} {:>2} {:>7} {:>6} {:>13} {:>14} {:>13} {:>9}",
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
                hit_rate(&l)
            ),
            Err(e) => println!(
                "{:<8} {:<16} {:<26} {:<16} {:>2} unreachable: {e}",
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
            })
            .collect()
    };
    let mut out = listed("prefill", &router.prefill_nodes);
    out.extend(listed("decode", &router.decode_nodes));
    Ok(out)
}

fn from_record(r: NodeRecord) -> Listed {
    Listed {
        role: r.role,
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
