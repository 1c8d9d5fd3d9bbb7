//! A model's identity across nodes: what a node serves, as four digests.
//!
//! Two nodes that serve "the same model" by name may hold other weights (a
//! different fine-tune, another seed) or another shape; paired, one computes a
//! prompt's KV and the other decodes with it, and the client gets wrong tokens
//! without any error. So every node computes a [`ModelFingerprint`] at start,
//! publishes it with its membership record and its load reports, and the
//! router pairs only nodes whose fingerprint is the cluster's
//! (`router/src/identity.rs`). The parts, each an xxh3-64:
//!
//! - `config`: the normalized model config as Tandem reads it (architecture,
//!   every size, rope, EOS ids): another shape differs here;
//! - `tokenizer`: every token's text and a probe's encoding;
//! - `chat_template`: a probe conversation rendered by the template;
//! - `weights`: every byte of the weight files (a GGUF file whole, or the
//!   directory's `*.safetensors` in name order).
//!
//! The weights digest reads the whole model once (xxh3 runs at memory speed;
//! a large model is bound by the disk), so it is cached beside the model:
//! `<file>.tandem-fingerprint` for a GGUF file, `<dir>/.tandem-fingerprint`
//! for a directory, or, when that place is read-only, under the cache
//! directory (`$TANDEM_CACHE_DIR`, `$XDG_CACHE_HOME/tandem`,
//! `~/.cache/tandem`) in `fingerprints/`. An entry is keyed by each weight
//! file's name, size and modification time: a rewritten file invalidates it.

use std::fmt;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::time::UNIX_EPOCH;

use serde::{Deserialize, Serialize};
use tandem_engine::{ChatMessage, ModelDir};
use tracing::{debug, info, warn};
use xxhash_rust::xxh3::{Xxh3, xxh3_64};

/// Version of the cache entry's layout and of how digests are computed;
/// entries of another version are recomputed.
const CACHE_VERSION: u32 = 1;
/// Bytes read at a time while hashing weights.
const READ_CHUNK: usize = 1 << 20;

/// Why a fingerprint could not be computed or parsed.
#[derive(Debug, thiserror::Error)]
pub enum FingerprintError {
    /// A weight file could not be listed or read.
    #[error("{path}: {source}")]
    Io {
        /// The file or directory.
        path: PathBuf,
        /// What the OS said.
        source: std::io::Error,
    },
    /// The model directory holds no weight file.
    #[error("{0}: no weight file (*.safetensors) to fingerprint")]
    NoWeights(PathBuf),
    /// The tokenizer failed on a probe.
    #[error("tokenizer: {0}")]
    Tokenizer(String),
    /// Text that is not a fingerprint.
    #[error("{0:?} is not a model fingerprint (c<16 hex>.t<16 hex>.p<16 hex>.w<16 hex>)")]
    Parse(String),
}

/// What a node serves: digests of its config, tokenizer, chat template and
/// weights. Written as `c<hex>.t<hex>.p<hex>.w<hex>` (16 hex digits each).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct ModelFingerprint {
    /// The normalized model config (shape).
    pub config: u64,
    /// The tokenizer's vocabulary and behaviour.
    pub tokenizer: u64,
    /// The chat template's rendering of a probe conversation.
    pub chat_template: u64,
    /// Every byte of the weight files.
    pub weights: u64,
}

/// Where a fingerprint's weights digest came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WeightsSource {
    /// Read from a cache entry that matches the files.
    Cached,
    /// Computed by reading the weights.
    Computed,
}

impl ModelFingerprint {
    /// The fingerprint of `model`, its weights digest from the cache when the
    /// files have not changed.
    pub fn of(model: &ModelDir) -> Result<Self, FingerprintError> {
        Self::of_with_source(model).map(|(f, _)| f)
    }

    /// [`of`](Self::of), saying whether the weights were read.
    pub fn of_with_source(model: &ModelDir) -> Result<(Self, WeightsSource), FingerprintError> {
        let (weights, source) = weights_digest(&model.path)?;
        let fingerprint = ModelFingerprint {
            config: xxh3_64(format!("{:?}", model.config).as_bytes()),
            tokenizer: tokenizer_digest(model)?,
            chat_template: template_digest(model),
            weights,
        };
        Ok((fingerprint, source))
    }

    /// One number for the whole fingerprint, as the KV wire carries it.
    pub fn digest(&self) -> u64 {
        let mut bytes = [0u8; 32];
        for (i, part) in [
            self.config,
            self.tokenizer,
            self.chat_template,
            self.weights,
        ]
        .iter()
        .enumerate()
        {
            bytes[i * 8..i * 8 + 8].copy_from_slice(&part.to_le_bytes());
        }
        xxh3_64(&bytes)
    }

    /// What differs between `self` and `other`, in words (`None`: nothing).
    pub fn difference(&self, other: &ModelFingerprint) -> Option<String> {
        let mut parts = Vec::new();
        if self.config != other.config {
            parts.push("model config (shape)");
        }
        if self.weights != other.weights {
            parts.push("weights");
        }
        if self.tokenizer != other.tokenizer {
            parts.push("tokenizer");
        }
        if self.chat_template != other.chat_template {
            parts.push("chat template");
        }
        (!parts.is_empty()).then(|| format!("{} differ", parts.join(", ")))
    }

    /// A short form for tables: the weights digest's first 8 hex digits.
    pub fn short(&self) -> String {
        format!("{:08x}", self.weights >> 32)
    }
}

impl fmt::Display for ModelFingerprint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "c{:016x}.t{:016x}.p{:016x}.w{:016x}",
            self.config, self.tokenizer, self.chat_template, self.weights
        )
    }
}

impl FromStr for ModelFingerprint {
    type Err = FingerprintError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bad = || FingerprintError::Parse(s.to_string());
        let parts: Vec<&str> = s.split('.').collect();
        let [c, t, p, w] = parts.as_slice() else {
            return Err(bad());
        };
        let part = |text: &str, tag: char| -> Result<u64, FingerprintError> {
            let hex = text.strip_prefix(tag).ok_or_else(bad)?;
            if hex.len() != 16 {
                return Err(bad());
            }
            u64::from_str_radix(hex, 16).map_err(|_| bad())
        };
        Ok(ModelFingerprint {
            config: part(c, 'c')?,
            tokenizer: part(t, 't')?,
            chat_template: part(p, 'p')?,
            weights: part(w, 'w')?,
        })
    }
}

impl Serialize for ModelFingerprint {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for ModelFingerprint {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let text = String::deserialize(d)?;
        text.parse().map_err(serde::de::Error::custom)
    }
}

/// Every token's text, the vocabulary size and a probe's encoding.
fn tokenizer_digest(model: &ModelDir) -> Result<u64, FingerprintError> {
    let tokenizer = &model.tokenizer;
    let mut h = Xxh3::new();
    let vocab = tokenizer.vocab_size();
    h.update(&(vocab as u64).to_le_bytes());
    for id in 0..vocab as u32 {
        // A hole in the vocabulary is part of its identity too.
        let text = tokenizer.token_text(id).unwrap_or_default();
        h.update(&(text.len() as u32).to_le_bytes());
        h.update(text.as_bytes());
    }
    let probe = tokenizer
        .encode(
            "Tandem's fingerprint probe: héllo, 世界! 12345\n\tend",
            true,
        )
        .map_err(|e| FingerprintError::Tokenizer(e.to_string()))?;
    for id in probe {
        h.update(&id.to_le_bytes());
    }
    Ok(h.digest())
}

/// A probe conversation rendered by the chat template (a fixed value when
/// the model has none; a template that fails on the probe hashes its error).
fn template_digest(model: &ModelDir) -> u64 {
    if !model.tokenizer.has_chat_template() {
        return xxh3_64(b"no chat template");
    }
    let message = |role: &str, content: &str| ChatMessage {
        role: role.into(),
        content: content.into(),
    };
    let probe = [
        message("system", "You are a fingerprint probe."),
        message("user", "Hello?"),
        message("assistant", "Hi."),
        message("user", "Again."),
    ];
    let rendered = match model.tokenizer.apply_chat_template(&probe, true) {
        Ok(text) => text,
        Err(e) => format!("error: {e}"),
    };
    xxh3_64(rendered.as_bytes())
}

/// The files whose bytes are the weights: a GGUF file itself, or a
/// directory's `*.safetensors` in name order.
fn weight_files(path: &Path) -> Result<Vec<PathBuf>, FingerprintError> {
    if path.is_file() {
        return Ok(vec![path.to_owned()]);
    }
    let io = |source| FingerprintError::Io {
        path: path.to_owned(),
        source,
    };
    let mut files = Vec::new();
    for entry in std::fs::read_dir(path).map_err(io)? {
        let p = entry.map_err(io)?.path();
        if p.extension().is_some_and(|e| e == "safetensors") {
            files.push(p);
        }
    }
    files.sort();
    if files.is_empty() {
        return Err(FingerprintError::NoWeights(path.to_owned()));
    }
    Ok(files)
}

/// One weight file as the cache keys it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct FileStamp {
    name: String,
    len: u64,
    mtime_ns: u128,
}

/// A cache entry: the files' stamps when they were hashed, and the digest.
#[derive(Debug, Serialize, Deserialize)]
struct CacheEntry {
    version: u32,
    files: Vec<FileStamp>,
    weights: String,
}

fn stamp(path: &Path) -> Result<FileStamp, FingerprintError> {
    let meta = std::fs::metadata(path).map_err(|source| FingerprintError::Io {
        path: path.to_owned(),
        source,
    })?;
    let mtime_ns = meta
        .modified()
        .ok()
        .and_then(|t| t.duration_since(UNIX_EPOCH).ok())
        .map_or(0, |d| d.as_nanos());
    Ok(FileStamp {
        name: path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default(),
        len: meta.len(),
        mtime_ns,
    })
}

/// Where the cache entry of the model at `path` goes: beside it, and the
/// cache directory's copy for when that place is read-only.
pub fn cache_paths(path: &Path) -> [PathBuf; 2] {
    let beside = if path.is_file() {
        let mut name = path.as_os_str().to_owned();
        name.push(".tandem-fingerprint");
        PathBuf::from(name)
    } else {
        path.join(".tandem-fingerprint")
    };
    let canonical = std::fs::canonicalize(path).unwrap_or_else(|_| path.to_owned());
    let key = xxh3_64(canonical.to_string_lossy().as_bytes());
    let fallback = cache_dir()
        .join("fingerprints")
        .join(format!("{key:016x}.json"));
    [beside, fallback]
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

/// The weights digest of the model at `path`, from a matching cache entry
/// or computed (and then cached).
pub fn weights_digest(path: &Path) -> Result<(u64, WeightsSource), FingerprintError> {
    let files = weight_files(path)?;
    let stamps = files
        .iter()
        .map(|f| stamp(f))
        .collect::<Result<Vec<_>, _>>()?;
    let places = cache_paths(path);
    for place in &places {
        if let Some(digest) = read_cache(place, &stamps) {
            debug!(cache = %place.display(), "model fingerprint from the cache");
            return Ok((digest, WeightsSource::Cached));
        }
    }
    let started = std::time::Instant::now();
    let mut h = Xxh3::new();
    let mut buf = vec![0u8; READ_CHUNK];
    let mut bytes = 0u64;
    for file in &files {
        let io = |source| FingerprintError::Io {
            path: file.clone(),
            source,
        };
        let mut f = std::fs::File::open(file).map_err(io)?;
        // The name too: two shards swapped are another model.
        if let Some(name) = file.file_name() {
            h.update(name.to_string_lossy().as_bytes());
        }
        loop {
            let n = f.read(&mut buf).map_err(io)?;
            if n == 0 {
                break;
            }
            h.update(&buf[..n]);
            bytes += n as u64;
        }
    }
    let digest = h.digest();
    info!(
        model = %path.display(),
        bytes,
        seconds = started.elapsed().as_secs_f64(),
        "computed the model's weights fingerprint"
    );
    let entry = CacheEntry {
        version: CACHE_VERSION,
        files: stamps,
        weights: format!("{digest:016x}"),
    };
    write_cache(&places, &entry);
    Ok((digest, WeightsSource::Computed))
}

fn read_cache(place: &Path, stamps: &[FileStamp]) -> Option<u64> {
    let text = std::fs::read(place).ok()?;
    let entry: CacheEntry = serde_json::from_slice(&text).ok()?;
    if entry.version != CACHE_VERSION || entry.files != stamps {
        return None;
    }
    u64::from_str_radix(&entry.weights, 16).ok()
}

/// Writes the entry to the first place that takes it (a temporary file
/// renamed, so a reader never sees half an entry).
fn write_cache(places: &[PathBuf], entry: &CacheEntry) {
    let Ok(json) = serde_json::to_vec(entry) else {
        return;
    };
    for place in places {
        let Some(dir) = place.parent() else { continue };
        let tmp = place.with_extension(format!("tmp{}", std::process::id()));
        let written = std::fs::create_dir_all(dir)
            .and_then(|()| std::fs::write(&tmp, &json))
            .and_then(|()| std::fs::rename(&tmp, place));
        match written {
            Ok(()) => return,
            Err(e) => {
                let _ = std::fs::remove_file(&tmp);
                debug!(cache = %place.display(), "cannot cache the fingerprint here: {e}");
            }
        }
    }
    warn!(
        "could not cache the model's fingerprint anywhere; it is computed again at the next start"
    );
}

#[cfg(test)]
mod tests;
