//! `tandem certs`: a cluster CA and one certificate per node, as PEM files,
//! for the `[tls]` section of each node's config (mutual TLS on the QUIC KV
//! transport and on the internal gRPC services).
//!
//! Every certificate is valid as a TLS server and as a client. The router
//! needs one too (it is the nodes' gRPC client): `--node router=NAME`. A
//! node's SANs must hold the name it is checked under: its `[tls]
//! server_name` with etcd membership, else the host of the address the
//! router dials. Servers check only that a client's certificate chains to
//! the CA, not its name.
//!
//! The CA key is written too, but nothing here reads it back: run the
//! command once with every node, or make a new CA to add nodes later.

use std::path::{Path, PathBuf};

use anyhow::{Context, bail};
use tandem_kv_transfer::ClusterCa;

/// Arguments of `tandem certs`.
#[derive(clap::Args)]
pub struct CertsArgs {
    /// Directory to write `ca.pem`, `ca-key.pem`, `<node>.pem`, `<node>-key.pem` into.
    #[arg(long, default_value = "certs")]
    out: PathBuf,
    /// A node: `NAME=SAN[,SAN...]`, SANs being DNS names or IP addresses
    /// the node is reached by (repeatable), e.g. `decode-0=decode-0.tandem,10.0.0.5`;
    /// the router needs one too, e.g. `router=tandem-router`.
    #[arg(long = "node", required = true)]
    nodes: Vec<String>,
    /// The CA's common name.
    #[arg(long, default_value = "tandem cluster CA")]
    ca_name: String,
    /// Overwrite existing files.
    #[arg(long)]
    force: bool,
}

fn write(path: &Path, text: &str, force: bool) -> anyhow::Result<()> {
    if path.exists() && !force {
        bail!("{} exists; pass --force to overwrite", path.display());
    }
    std::fs::write(path, text).with_context(|| format!("writing {}", path.display()))?;
    Ok(())
}

fn write_key(path: &Path, text: &str, force: bool) -> anyhow::Result<()> {
    write(path, text, force)?;
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))
            .with_context(|| format!("restricting {}", path.display()))?;
    }
    Ok(())
}

/// Parses `NAME=SAN,SAN`.
fn parse_node(spec: &str) -> anyhow::Result<(String, Vec<String>)> {
    let (name, sans) = spec
        .split_once('=')
        .with_context(|| format!("--node {spec:?}: expected NAME=SAN[,SAN...]"))?;
    let sans: Vec<String> = sans
        .split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(str::to_owned)
        .collect();
    let ok_name = !name.is_empty()
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_' || c == '.');
    if !ok_name || sans.is_empty() {
        bail!("--node {spec:?}: NAME must be [A-Za-z0-9._-]+ and at least one SAN is needed");
    }
    Ok((name.to_owned(), sans))
}

/// Runs `tandem certs`.
pub fn run(args: &CertsArgs) -> anyhow::Result<()> {
    let nodes = args
        .nodes
        .iter()
        .map(|s| parse_node(s))
        .collect::<anyhow::Result<Vec<_>>>()?;
    std::fs::create_dir_all(&args.out)
        .with_context(|| format!("creating {}", args.out.display()))?;
    let ca = ClusterCa::generate(&args.ca_name)?;
    write(&args.out.join("ca.pem"), &ca.cert_pem(), args.force)?;
    write_key(&args.out.join("ca-key.pem"), &ca.key_pem(), args.force)?;
    for (name, sans) in &nodes {
        let cert = ca.issue(sans)?;
        write(
            &args.out.join(format!("{name}.pem")),
            &cert.cert_pem,
            args.force,
        )?;
        write_key(
            &args.out.join(format!("{name}-key.pem")),
            &cert.key_pem,
            args.force,
        )?;
        println!(
            "{name}: {} ({})",
            args.out.join(format!("{name}.pem")).display(),
            sans.join(", ")
        );
    }
    println!("CA: {}", args.out.join("ca.pem").display());
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn node_specs_parse() {
        let (n, s) = parse_node("decode-0=localhost,127.0.0.1").unwrap();
        assert_eq!(n, "decode-0");
        assert_eq!(s, ["localhost", "127.0.0.1"]);
        assert!(parse_node("nosans").is_err());
        assert!(parse_node("../x=localhost").is_err());
        assert!(parse_node("a=").is_err());
    }
}
