//! What the router asks of its clients, as configured: API keys with their
//! names and limits (`[[router.keys]]`, and the unnamed `api_keys`), and TLS
//! on the client-facing listeners (`[router.tls]`).
//!
//! Its own module, next to `config` (which holds them in `RouterSection`
//! and re-exports them), so the config file does not keep growing; it
//! imports nothing from `config`.

use std::path::PathBuf;

use serde::Deserialize;

/// `[[router.keys]]`: one API key, its name and its limits.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ApiKeySection {
    /// The key's name: the `key` label of its usage metrics and what logs
    /// show (letters, digits, `-`, `_`, `.`). Never the secret.
    pub name: String,
    /// The secret clients send as `authorization: Bearer <key>`.
    pub key: String,
    /// This key's requests per second; absent: `router.rate_limit_rps`.
    #[serde(default)]
    pub requests_per_s: Option<f64>,
    /// This key's tokens per minute; absent: `router.rate_limit_tokens_per_min`.
    #[serde(default)]
    pub tokens_per_min: Option<f64>,
}

/// `[router.tls]`: TLS on the router's client-facing listeners, the gRPC
/// API (`listen`) and the OpenAI-compatible HTTP API (`http_listen`). Both
/// present `cert`; it and `key` are reloaded when the files change, without
/// a restart and without closing open streams. Separate from `[tls]`, the
/// cluster's internal mutual TLS: clients need not hold cluster
/// certificates.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClientTlsSection {
    /// The certificate chain clients see (PEM, leaf first).
    pub cert: PathBuf,
    /// Its private key (PEM).
    pub key: PathBuf,
    /// A CA (PEM): with it every client must present a certificate signed by
    /// it (mutual TLS), on top of any API key; absent: no client certificate
    /// is asked for.
    #[serde(default)]
    pub client_ca: Option<PathBuf>,
}

/// Checks a router's keys (as `RouterSection::all_keys` lists them): each
/// secret non-empty without whitespace, names well-formed and unique, no
/// secret twice, limits positive. The message names the key by its name.
pub fn validate_keys(keys: &[ApiKeySection]) -> Result<(), String> {
    let bad = |m: String| Err(m);
    for (i, k) in keys.iter().enumerate() {
        if k.key.is_empty() || k.key.contains(char::is_whitespace) {
            return bad(format!(
                "router API key {:?} (api_keys, api_keys_file, keys): empty or contains whitespace",
                k.name
            ));
        }
        let bad_char = |c: char| !(c.is_ascii_alphanumeric() || "-_.".contains(c));
        if k.name.is_empty() || k.name.contains(bad_char) {
            return bad(format!(
                "router.keys: name {:?} must be letters, digits, '-', '_' or '.'",
                k.name
            ));
        }
        if keys[..i].iter().any(|o| o.name == k.name) {
            return bad(format!("router.keys: the name {:?} is used twice", k.name));
        }
        if keys[..i].iter().any(|o| o.key == k.key) {
            return bad(format!(
                "router.keys: the key named {:?} is also configured as {:?}",
                k.name,
                keys[..i].iter().find(|o| o.key == k.key).map(|o| &o.name)
            ));
        }
        for (field, v) in [
            ("requests_per_s", k.requests_per_s),
            ("tokens_per_min", k.tokens_per_min),
        ] {
            if v.is_some_and(|v| !(v > 0.0 && v.is_finite())) {
                return bad(format!(
                    "router.keys: {field} of the key named {:?} must be positive",
                    k.name
                ));
            }
        }
    }
    Ok(())
}
