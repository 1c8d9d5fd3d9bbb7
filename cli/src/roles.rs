//! `tandem up | router | prefill | decode`: running cluster roles from a config.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::Context;
use tandem_cluster::{Config, DEFAULT_MODEL_DIR_PATH, ModelSection, StaticMembership};
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

/// Opens the configured model; the default path is synthesized on first use.
pub fn open_model(section: &ModelSection) -> anyhow::Result<Arc<ModelDir>> {
    if section.backend != tandem_cluster::config::BackendKind::Cpu {
        anyhow::bail!("this build has only the CPU backend (model.backend = \"cpu\")");
    }
    let path: &Path = &section.path;
    if path == Path::new(DEFAULT_MODEL_DIR_PATH) {
        crate::model_cmd::default_model()?;
    }
    let model =
        ModelDir::open(path).with_context(|| format!("opening model {}", path.display()))?;
    Ok(Arc::new(model))
}

/// Stops on Ctrl-C.
fn shutdown_on_ctrl_c() -> CancellationToken {
    let token = CancellationToken::new();
    let t = token.clone();
    tokio::spawn(async move {
        let _ = tokio::signal::ctrl_c().await;
        eprintln!("shutting down");
        t.cancel();
    });
    token
}

/// `tandem up`: every role in the config, in this process.
pub async fn up(config_path: Option<PathBuf>) -> anyhow::Result<()> {
    let config = load_config(config_path.as_deref())?;
    let model = open_model(&config.model)?;
    let shutdown = shutdown_on_ctrl_c();
    let mut router = config.router.clone().unwrap_or_default();
    let mut decode_done = None;
    if let Some(decode) = config.decode.clone() {
        let tp = decode.tp;
        let d = tandem_decode::serve(model.clone(), decode, shutdown.clone()).await?;
        router.decode_nodes.push(format!("http://{}", d.grpc_addr));
        eprintln!(
            "decode node (tp = {tp}): gRPC {} KV/QUIC {}",
            d.grpc_addr, d.quic_addr
        );
        decode_done = Some(d.done);
    }
    let mut prefill_done = None;
    if let Some(prefill) = config.prefill.clone() {
        let tp = prefill.tp;
        let p = tandem_prefill::serve(model.clone(), prefill, shutdown.clone()).await?;
        router.prefill_nodes.push(format!("http://{}", p.addr));
        eprintln!("prefill node (tp = {tp}): gRPC {}", p.addr);
        prefill_done = Some(p);
    }
    let membership = Arc::new(StaticMembership::new(
        &router.prefill_nodes,
        &router.decode_nodes,
    ));
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
pub async fn run_role(role: Role, config_path: PathBuf) -> anyhow::Result<()> {
    let config = load_config(Some(&config_path))?;
    let model = open_model(&config.model)?;
    let shutdown = shutdown_on_ctrl_c();
    match role {
        Role::Router => {
            let router = config
                .router
                .context("the config has no [router] section")?;
            let membership = Arc::new(StaticMembership::new(
                &router.prefill_nodes,
                &router.decode_nodes,
            ));
            let r = tandem_router::serve(
                model,
                config.model.name.clone(),
                router,
                membership,
                shutdown,
            )
            .await?;
            println!("router listening on {}", r.addr);
            let _ = r.join.await;
        }
        Role::Prefill => {
            let prefill = config
                .prefill
                .context("the config has no [prefill] section")?;
            let p = tandem_prefill::serve(model, prefill, shutdown).await?;
            println!("prefill node listening on {}", p.addr);
            p.wait().await?;
        }
        Role::Decode => {
            let decode = config
                .decode
                .context("the config has no [decode] section")?;
            let d = tandem_decode::serve(model, decode, shutdown).await?;
            println!(
                "decode node listening on {} (KV over QUIC on {})",
                d.grpc_addr, d.quic_addr
            );
            let _ = d.done.await;
        }
    }
    Ok(())
}
