//! The nodes' own counters around a run: `tandem bench --metrics-url URL`
//! scrapes each Prometheus endpoint before and after every run and reports
//! the difference, so a run's figures include what the client cannot see:
//! prompt tokens the nodes computed (prefix-cache queries minus hits) and
//! KV bytes shipped over QUIC.
//!
//! Only plain `http://host:port/path` is read (the nodes' `[metrics]`
//! endpoint), with a short timeout; the text format is parsed just enough to
//! sum a counter over its label sets.

use std::time::Duration;

use anyhow::Context;
use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use hyper::Request;
use hyper::header::HOST;
use hyper_util::rt::TokioIo;
use serde::Serialize;
use tandem_telemetry::names;

/// Longest wait for one scrape.
const SCRAPE_TIMEOUT: Duration = Duration::from_secs(10);

/// The counters a run reads, summed over every scraped endpoint.
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize)]
pub struct NodeCounters {
    /// Prompt tokens looked up in the nodes' prefix caches.
    pub prefix_queries: f64,
    /// Of those, tokens the caches held (not computed).
    pub prefix_hits: f64,
    /// KV payload bytes sent over QUIC (prefill side).
    pub kv_bytes_sent: f64,
}

impl NodeCounters {
    /// The counters of Prometheus text `text`.
    pub fn parse(text: &str) -> Self {
        let mut c = NodeCounters::default();
        for line in text.lines() {
            if line.starts_with('#') {
                continue;
            }
            let Some((series, value)) = line.rsplit_once(' ') else {
                continue;
            };
            let Ok(value) = value.trim().parse::<f64>() else {
                continue;
            };
            let (name, labels) = match series.split_once('{') {
                Some((n, l)) => (n, l),
                None => (series, ""),
            };
            match name {
                n if n == names::PREFIX_CACHE_QUERIES_TOTAL => c.prefix_queries += value,
                n if n == names::PREFIX_CACHE_HITS_TOTAL => c.prefix_hits += value,
                n if n == names::KV_TRANSFER_BYTES_TOTAL
                    && labels.contains("direction=\"sent\"") =>
                {
                    c.kv_bytes_sent += value
                }
                _ => {}
            }
        }
        c
    }

    /// `self - before`, counter by counter.
    pub fn since(&self, before: &NodeCounters) -> NodeCounters {
        NodeCounters {
            prefix_queries: self.prefix_queries - before.prefix_queries,
            prefix_hits: self.prefix_hits - before.prefix_hits,
            kv_bytes_sent: self.kv_bytes_sent - before.kv_bytes_sent,
        }
    }

    fn add(&mut self, other: NodeCounters) {
        self.prefix_queries += other.prefix_queries;
        self.prefix_hits += other.prefix_hits;
        self.kv_bytes_sent += other.kv_bytes_sent;
    }
}

/// What the nodes did during one run (the difference of two scrapes).
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize)]
pub struct NodeWork {
    /// Prompt tokens the nodes computed: looked up minus found cached.
    pub prefill_tokens_computed: f64,
    /// Prompt tokens the nodes found cached.
    pub prefill_tokens_cached: f64,
    /// KV bytes shipped from prefill to decode nodes over QUIC.
    pub kv_bytes_over_quic: f64,
}

impl From<NodeCounters> for NodeWork {
    fn from(d: NodeCounters) -> Self {
        NodeWork {
            prefill_tokens_computed: d.prefix_queries - d.prefix_hits,
            prefill_tokens_cached: d.prefix_hits,
            kv_bytes_over_quic: d.kv_bytes_sent,
        }
    }
}

/// Scrapes every URL in `urls` and sums their counters.
pub async fn scrape_all(urls: &[String]) -> anyhow::Result<NodeCounters> {
    let mut total = NodeCounters::default();
    for url in urls {
        let text = tokio::time::timeout(SCRAPE_TIMEOUT, get(url))
            .await
            .with_context(|| format!("scraping {url}: timed out"))??;
        total.add(NodeCounters::parse(&text));
    }
    Ok(total)
}

/// `GET url` over plain HTTP/1.1.
async fn get(url: &str) -> anyhow::Result<String> {
    let rest = url
        .strip_prefix("http://")
        .with_context(|| format!("--metrics-url {url:?} must start with http://"))?;
    let (authority, path) = match rest.find('/') {
        Some(i) => (&rest[..i], &rest[i..]),
        None => (rest, "/metrics"),
    };
    let tcp = tokio::net::TcpStream::connect(authority)
        .await
        .with_context(|| format!("cannot reach {url}"))?;
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tcp)).await?;
    tokio::spawn(conn);
    let req = Request::get(path)
        .header(HOST, authority)
        .body(Empty::<Bytes>::new())?;
    let resp = sender.send_request(req).await?;
    anyhow::ensure!(
        resp.status().is_success(),
        "{url} answered HTTP {}",
        resp.status().as_u16()
    );
    let body = resp.into_body().collect().await?.to_bytes();
    Ok(String::from_utf8_lossy(&body).into_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counters_sum_over_label_sets_and_skip_the_rest() {
        let text = "\
# TYPE tandem_prefix_cache_queries_total counter
tandem_prefix_cache_queries_total{role=\"prefill\",node=\"p0\"} 1000
tandem_prefix_cache_queries_total{role=\"decode\",node=\"d0\"} 24
tandem_prefix_cache_hits_total{role=\"prefill\",node=\"p0\"} 600
tandem_kv_transfer_bytes_total{direction=\"sent\"} 4096
tandem_kv_transfer_bytes_total{direction=\"received\"} 4096
tandem_prefix_cache_queries_total_bogus 7
garbage line
tandem_prefix_cache_hits_total{role=\"decode\"} not-a-number
";
        let c = NodeCounters::parse(text);
        assert_eq!(
            c,
            NodeCounters {
                prefix_queries: 1024.0,
                prefix_hits: 600.0,
                kv_bytes_sent: 4096.0,
            }
        );
        let later = NodeCounters {
            prefix_queries: 2024.0,
            prefix_hits: 1400.0,
            kv_bytes_sent: 5096.0,
        };
        let work = NodeWork::from(later.since(&c));
        assert_eq!(work.prefill_tokens_computed, 200.0);
        assert_eq!(work.prefill_tokens_cached, 800.0);
        assert_eq!(work.kv_bytes_over_quic, 1000.0);
    }
}
