//! Client authentication and per-key rate limits.
//!
//! Clients present an API key as a bearer token: the gRPC metadata
//! `authorization: Bearer <key>` or the same HTTP header (the HTTP API copies
//! it into the request's metadata, so both go through [`ClientAuth::check`]).
//! With no keys configured (the local default) the router is open and every
//! client shares one anonymous key, to which the rate limits (if any) apply.
//!
//! Each key has a name (`[[router.keys]] name`; `key-N` for the unnamed
//! ones, `anonymous` for an open router's), the `key` label of its usage
//! metrics ([`crate::usage`]), and two token buckets: requests per second,
//! and tokens per minute. A request reserves its prompt tokens plus its
//! `max_tokens` once it is validated, and when it ends gets back what it did
//! not use (the tokens it did not generate; everything if it never reached a
//! node). A refusal (RESOURCE_EXHAUSTED) carries how long to wait, which
//! becomes the `retry-after` metadata / HTTP `Retry-After` header (HTTP 429).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use tandem_cluster::RouterSection;
use tonic::metadata::MetadataMap;

use crate::error::RouterError;
use crate::request_metrics::Tokens;
use crate::usage;

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

    /// Puts `n` tokens back (at most up to the capacity).
    fn give_back(&mut self, n: f64, now: Instant) {
        self.refill(now);
        self.tokens = (self.tokens + n).min(self.capacity);
    }

    /// Takes `n` tokens, or says how many seconds until there are `n`.
    /// A cost above the capacity is capped to it, so a big request is slowed,
    /// never starved forever.
    /// Returns what was taken.
    fn take(&mut self, n: f64, now: Instant) -> Result<f64, f64> {
        self.refill(now);
        let n = n.min(self.capacity);
        if self.tokens >= n {
            self.tokens -= n;
            Ok(n)
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

/// The name of the one key of an open router (no keys configured).
pub const ANONYMOUS: &str = "anonymous";

/// One configured key.
#[derive(Debug)]
struct Key {
    name: String,
    rps: Option<f64>,
    tokens_per_min: Option<f64>,
    limits: Mutex<KeyLimits>,
}

/// The router's API keys and their rate limits.
#[derive(Debug)]
pub struct ClientAuth {
    by_secret: HashMap<String, KeyId>,
    /// At least one: the anonymous key when none is configured.
    keys: Vec<Key>,
}

impl ClientAuth {
    /// Keys and limits from the router's config (`api_keys`,
    /// `[[router.keys]]`, and the keys already read from `api_keys_file` by
    /// the config loader), each key's own limits over the router's.
    pub fn new(config: &RouterSection) -> Self {
        Self::with_named_keys(
            config.all_keys().into_iter().map(|k| NamedKey {
                name: k.name,
                secret: k.key,
                rps: k.requests_per_s.or(config.rate_limit_rps),
                tokens_per_min: k.tokens_per_min.or(config.rate_limit_tokens_per_min),
            }),
            config.rate_limit_rps,
            config.rate_limit_tokens_per_min,
        )
    }

    /// Unnamed keys (named `key-1`, `key-2`, ...) sharing one set of limits.
    pub fn with_keys(
        keys: impl IntoIterator<Item = String>,
        rps: Option<f64>,
        tokens_per_min: Option<f64>,
    ) -> Self {
        Self::with_named_keys(
            keys.into_iter().enumerate().map(|(i, secret)| NamedKey {
                name: format!("key-{}", i + 1),
                secret,
                rps,
                tokens_per_min,
            }),
            rps,
            tokens_per_min,
        )
    }

    /// Named keys with their own limits; `anonymous_*` are the limits of an
    /// open router's anonymous key (used when `keys` is empty).
    pub fn with_named_keys(
        keys: impl IntoIterator<Item = NamedKey>,
        anonymous_rps: Option<f64>,
        anonymous_tokens_per_min: Option<f64>,
    ) -> Self {
        let mut by_secret = HashMap::new();
        let mut list = Vec::new();
        for k in keys {
            if by_secret.contains_key(&k.secret) {
                continue;
            }
            by_secret.insert(k.secret, KeyId(list.len()));
            list.push(Key::new(k.name, k.rps, k.tokens_per_min));
        }
        if list.is_empty() {
            list.push(Key::new(
                ANONYMOUS.into(),
                anonymous_rps,
                anonymous_tokens_per_min,
            ));
        }
        ClientAuth {
            by_secret,
            keys: list,
        }
    }

    /// Whether clients must present a key.
    pub fn is_open(&self) -> bool {
        self.by_secret.is_empty()
    }

    /// The configured name of `key` (the metrics' `key` label).
    pub fn name(&self, key: KeyId) -> &str {
        &self.key(key).name
    }

    /// Every key's name, in order.
    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.keys.iter().map(|k| k.name.as_str())
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
        self.by_secret
            .get(token)
            .copied()
            .ok_or_else(|| RouterError::Unauthenticated("invalid API key".into()))
    }

    /// Authenticates and counts one request against the key's requests/s.
    pub fn check(&self, metadata: &MetadataMap) -> Result<KeyId, RouterError> {
        let key = self.authenticate(metadata)?;
        self.take_request(key)?;
        Ok(key)
    }

    /// Counts one request against `key`'s requests/s.
    pub fn take_request(&self, key: KeyId) -> Result<(), RouterError> {
        let k = self.key(key);
        let mut limits = k.lock();
        if let Some(b) = limits.requests.as_mut() {
            b.take(1.0, Instant::now())
                .map_err(|wait| RouterError::RateLimited {
                    message: format!(
                        "rate limit of {} requests/s for this API key exceeded",
                        k.rps.unwrap_or(0.0)
                    ),
                    retry_after_s: wait,
                })?;
        }
        Ok(())
    }

    /// Reserves a validated request's tokens (prompt + max_tokens) from its
    /// key's tokens per minute; returns what was taken (at most a minute's
    /// worth; all of `tokens` for a key without a quota), of which
    /// [`ClientAuth::refund`] gives back what the request did not use.
    pub fn charge_tokens(&self, key: KeyId, tokens: u64) -> Result<u64, RouterError> {
        let k = self.key(key);
        let mut limits = k.lock();
        if let Some(b) = limits.tokens.as_mut() {
            return b
                .take(tokens as f64, Instant::now())
                .map(|taken| taken as u64)
                .map_err(|wait| RouterError::RateLimited {
                    message: format!(
                        "quota of {} tokens/min for this API key exceeded \
                         (this request reserves {tokens} tokens: prompt + max_tokens)",
                        k.tokens_per_min.unwrap_or(0.0)
                    ),
                    retry_after_s: wait,
                });
        }
        Ok(tokens)
    }

    /// [`charge_tokens`](Self::charge_tokens) as a [`Reservation`], which
    /// gives back what the request does not use when it ends.
    pub fn reserve(self: &Arc<Self>, key: KeyId, tokens: u64) -> Result<Reservation, RouterError> {
        let reserved = self.charge_tokens(key, tokens)?;
        Ok(Reservation {
            auth: self.clone(),
            key,
            reserved,
        })
    }

    /// Gives `tokens` of a reservation back to `key` (a request that ended
    /// before its `max_tokens`, or was refused after its reservation).
    pub fn refund(&self, key: KeyId, tokens: u64) {
        if let Some(b) = self.key(key).lock().tokens.as_mut() {
            b.give_back(tokens as f64, Instant::now());
        }
    }

    fn key(&self, key: KeyId) -> &Key {
        // Ids are only made here, so in range; the last key is a safe fallback.
        &self.keys[key.0.min(self.keys.len() - 1)]
    }
}

/// Tokens a request reserved from its key's quota ([`ClientAuth::reserve`]).
/// [`settle`](Self::settle) keeps what the request used and counts it in the
/// key's usage; dropped unsettled (the request was refused, or ended before
/// reaching a node or with nothing for its client), it gives all of it back.
pub struct Reservation {
    auth: Arc<ClientAuth>,
    key: KeyId,
    reserved: u64,
}

impl Reservation {
    /// Ends the request: the quota keeps `used` (the prompt and the tokens the
    /// client received) and gets the rest back; the key's token counters
    /// count `used`.
    pub fn settle(mut self, used: Tokens) {
        let kept = (used.prompt + used.generated) as u64;
        self.auth
            .refund(self.key, self.reserved.saturating_sub(kept));
        self.reserved = 0;
        usage::tokens(self.auth.name(self.key), used);
    }
}

impl Drop for Reservation {
    fn drop(&mut self) {
        if self.reserved > 0 {
            self.auth.refund(self.key, self.reserved);
        }
    }
}

/// A key given to [`ClientAuth::with_named_keys`].
#[derive(Debug, Clone)]
pub struct NamedKey {
    /// Its name (metrics label).
    pub name: String,
    /// The secret clients send.
    pub secret: String,
    /// Requests per second; `None`: unlimited.
    pub rps: Option<f64>,
    /// Tokens per minute; `None`: unlimited.
    pub tokens_per_min: Option<f64>,
}

impl Key {
    fn new(name: String, rps: Option<f64>, tokens_per_min: Option<f64>) -> Self {
        Key {
            name,
            rps,
            tokens_per_min,
            limits: Mutex::new(KeyLimits {
                // A burst of one second's worth (at least one request).
                requests: rps.map(|r| Bucket::new(r.max(1.0), r)),
                tokens: tokens_per_min.map(|t| Bucket::new(t, t / 60.0)),
            }),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, KeyLimits> {
        // A poisoned bucket is still a valid bucket.
        self.limits.lock().unwrap_or_else(|e| e.into_inner())
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
        assert_eq!(a.name(KeyId(1)), "key-2");
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
        // What a request did not generate comes back.
        a.refund(k, 450);
        a.charge_tokens(k, 500).unwrap();
    }

    #[test]
    fn keys_have_names_and_their_own_limits() {
        let config = tandem_cluster::Config::parse(
            "[router]\napi_keys = [\"plain\"]\nrate_limit_tokens_per_min = 6000\n\
             [[router.keys]]\nname = \"team-a\"\nkey = \"sk-a\"\ntokens_per_min = 60\n\
             [[router.keys]]\nname = \"team-b\"\nkey = \"sk-b\"\n",
        )
        .unwrap()
        .router
        .unwrap();
        let a = ClientAuth::new(&config);
        assert_eq!(a.names().collect::<Vec<_>>(), ["key-1", "team-a", "team-b"]);
        let team_a = a.check(&md(Some("Bearer sk-a"))).unwrap();
        let team_b = a.check(&md(Some("Bearer sk-b"))).unwrap();
        assert_eq!((a.name(team_a), a.name(team_b)), ("team-a", "team-b"));
        // team-a's own 60/min, team-b the router's 6000/min. A request
        // reserving more than a minute's worth waits for a full bucket.
        a.charge_tokens(team_a, 30).unwrap();
        let s = tonic::Status::from(a.charge_tokens(team_a, 100).unwrap_err());
        assert_eq!(s.code(), Code::ResourceExhausted);
        assert!(s.message().contains("60 tokens/min"), "{}", s.message());
        let wait: u64 = s
            .metadata()
            .get("retry-after")
            .unwrap()
            .to_str()
            .unwrap()
            .parse()
            .unwrap();
        assert!((29..=31).contains(&wait), "{wait}");
        a.charge_tokens(team_b, 5000).unwrap();
    }

    #[test]
    fn an_open_router_has_one_anonymous_key() {
        let a = ClientAuth::with_keys(Vec::new(), None, Some(60.0));
        let k = a.check(&md(None)).unwrap();
        assert_eq!(a.name(k), ANONYMOUS);
        a.charge_tokens(k, 60).unwrap();
        assert!(a.charge_tokens(k, 60).is_err());
    }
}
