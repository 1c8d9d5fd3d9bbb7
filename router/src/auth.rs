//! Client authentication and per-key rate limits.
//!
//! Clients present an API key as a bearer token: the gRPC metadata
//! `authorization: Bearer <key>` or the same HTTP header (the HTTP API copies
//! it into the request's metadata, so both go through [`ClientAuth::check`]).
//! With no keys configured (the local default) the router is open and every
//! client shares one anonymous key, to which the rate limits (if any) apply.
//!
//! Each key has two token buckets: requests per second, and tokens per minute
//! (a request costs its prompt tokens plus its `max_tokens`, charged once it
//! is validated). A refusal carries how long to wait, which becomes the
//! `retry-after` metadata / HTTP header.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Instant;

use tandem_cluster::RouterSection;
use tonic::metadata::MetadataMap;

use crate::error::RouterError;

/// A token bucket: `capacity` tokens, refilled at `per_s` tokens a second.
#[derive(Debug)]
struct Bucket {
    capacity: f64,
    per_s: f64,
    tokens: f64,
    last: Instant,
}

impl Bucket {
    fn new(capacity: f64, per_s: f64) -> Self {
        Bucket {
            capacity,
            per_s,
            tokens: capacity,
            last: Instant::now(),
        }
    }

    fn refill(&mut self, now: Instant) {
        let dt = now.saturating_duration_since(self.last).as_secs_f64();
        self.tokens = (self.tokens + dt * self.per_s).min(self.capacity);
        self.last = now;
    }

    /// Takes `n` tokens, or says how many seconds until there are `n`.
    /// A cost above the capacity is capped to it, so a big request is slowed,
    /// never starved forever.
    fn take(&mut self, n: f64, now: Instant) -> Result<(), f64> {
        self.refill(now);
        let n = n.min(self.capacity);
        if self.tokens >= n {
            self.tokens -= n;
            Ok(())
        } else {
            Err((n - self.tokens) / self.per_s)
        }
    }
}

/// One key's limits.
#[derive(Debug)]
struct KeyLimits {
    requests: Option<Bucket>,
    tokens: Option<Bucket>,
}

/// Which key a request came with (an index into the configured keys;
/// 0 for the anonymous key of an open router).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KeyId(usize);

/// The router's API keys and their rate limits.
#[derive(Debug)]
pub struct ClientAuth {
    keys: HashMap<String, KeyId>,
    limits: Vec<Mutex<KeyLimits>>,
    rps: Option<f64>,
    tokens_per_min: Option<f64>,
}

impl ClientAuth {
    /// Keys and limits from the router's config (`api_keys`, and the keys
    /// already read from `api_keys_file` by the config loader).
    pub fn new(config: &RouterSection) -> Self {
        Self::with_keys(
            config.api_keys.iter().cloned(),
            config.rate_limit_rps,
            config.rate_limit_tokens_per_min,
        )
    }

    /// Keys and limits given directly.
    pub fn with_keys(
        keys: impl IntoIterator<Item = String>,
        rps: Option<f64>,
        tokens_per_min: Option<f64>,
    ) -> Self {
        let mut map = HashMap::new();
        for k in keys {
            let next = KeyId(map.len());
            map.entry(k).or_insert(next);
        }
        let n = map.len().max(1);
        let limits = (0..n)
            .map(|_| {
                Mutex::new(KeyLimits {
                    // A burst of one second's worth (at least one request).
                    requests: rps.map(|r| Bucket::new(r.max(1.0), r)),
                    tokens: tokens_per_min.map(|t| Bucket::new(t, t / 60.0)),
                })
            })
            .collect();
        ClientAuth {
            keys: map,
            limits,
            rps,
            tokens_per_min,
        }
    }

    /// Whether clients must present a key.
    pub fn is_open(&self) -> bool {
        self.keys.is_empty()
    }

    /// Who the request is from: its bearer token must be a configured key
    /// (unless the router is open).
    pub fn authenticate(&self, metadata: &MetadataMap) -> Result<KeyId, RouterError> {
        if self.is_open() {
            return Ok(KeyId(0));
        }
        let Some(value) = metadata.get("authorization") else {
            return Err(RouterError::Unauthenticated(
                "missing API key: send the header `authorization: Bearer <key>`".into(),
            ));
        };
        let value = value.to_str().map_err(|_| {
            RouterError::Unauthenticated("the authorization header is not ASCII".into())
        })?;
        let token = value
            .strip_prefix("Bearer ")
            .or_else(|| value.strip_prefix("bearer "))
            .ok_or_else(|| {
                RouterError::Unauthenticated(
                    "the authorization header must be `Bearer <key>`".into(),
                )
            })?
            .trim();
        self.keys
            .get(token)
            .copied()
            .ok_or_else(|| RouterError::Unauthenticated("invalid API key".into()))
    }

    /// Authenticates and counts one request against the key's requests/s.
    pub fn check(&self, metadata: &MetadataMap) -> Result<KeyId, RouterError> {
        let key = self.authenticate(metadata)?;
        let mut limits = self.lock(key);
        if let Some(b) = limits.requests.as_mut() {
            b.take(1.0, Instant::now())
                .map_err(|wait| RouterError::RateLimited {
                    message: format!(
                        "rate limit of {} requests/s for this API key exceeded",
                        self.rps.unwrap_or(0.0)
                    ),
                    retry_after_s: wait,
                })?;
        }
        Ok(key)
    }

    /// Charges a validated request's tokens (prompt + max_tokens) to its key.
    pub fn charge_tokens(&self, key: KeyId, tokens: u64) -> Result<(), RouterError> {
        let mut limits = self.lock(key);
        if let Some(b) = limits.tokens.as_mut() {
            b.take(tokens as f64, Instant::now())
                .map_err(|wait| RouterError::RateLimited {
                    message: format!(
                        "rate limit of {} tokens/min for this API key exceeded \
                         (this request costs {tokens} tokens: prompt + max_tokens)",
                        self.tokens_per_min.unwrap_or(0.0)
                    ),
                    retry_after_s: wait,
                })?;
        }
        Ok(())
    }

    fn lock(&self, key: KeyId) -> std::sync::MutexGuard<'_, KeyLimits> {
        // A poisoned bucket is still a valid bucket.
        self.limits[key.0.min(self.limits.len() - 1)]
            .lock()
            .unwrap_or_else(|e| e.into_inner())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tonic::Code;

    fn md(auth: Option<&str>) -> MetadataMap {
        let mut m = MetadataMap::new();
        if let Some(a) = auth {
            m.insert("authorization", a.parse().unwrap());
        }
        m
    }

    #[test]
    fn open_router_needs_no_key() {
        let a = ClientAuth::with_keys(Vec::new(), None, None);
        assert!(a.check(&md(None)).is_ok());
        assert!(a.check(&md(Some("Bearer whatever"))).is_ok());
    }

    #[test]
    fn keys_are_checked() {
        let a = ClientAuth::with_keys(["k1".to_string(), "k2".to_string()], None, None);
        assert_eq!(a.check(&md(Some("Bearer k2"))).unwrap(), KeyId(1));
        for bad in [None, Some("Bearer nope"), Some("k1"), Some("Basic k1")] {
            let s = tonic::Status::from(a.check(&md(bad)).unwrap_err());
            assert_eq!(s.code(), Code::Unauthenticated, "{bad:?}");
        }
    }

    #[test]
    fn requests_per_second_are_limited_with_a_retry_hint() {
        let a = ClientAuth::with_keys(["k".to_string()], Some(2.0), None);
        let m = md(Some("Bearer k"));
        a.check(&m).unwrap();
        a.check(&m).unwrap();
        let s = tonic::Status::from(a.check(&m).unwrap_err());
        assert_eq!(s.code(), Code::ResourceExhausted);
        assert!(s.metadata().get("retry-after").is_some(), "{s:?}");
    }

    #[test]
    fn tokens_per_minute_are_limited() {
        let a = ClientAuth::with_keys(["k".to_string()], None, Some(600.0));
        let k = a.check(&md(Some("Bearer k"))).unwrap();
        a.charge_tokens(k, 500).unwrap();
        let e = a.charge_tokens(k, 500).unwrap_err();
        match e {
            RouterError::RateLimited { retry_after_s, .. } => {
                // 400 tokens missing at 10 tokens/s.
                assert!((retry_after_s - 40.0).abs() < 1.0, "{retry_after_s}");
            }
            other => panic!("{other:?}"),
        }
    }
}
