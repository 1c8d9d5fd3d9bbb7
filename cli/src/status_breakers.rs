//! `tandem status --router-metrics HOST:PORT`: the router's circuit breakers,
//! read from its Prometheus endpoint (`tandem_router_breaker_state`), shown
//! after the members' load. The breakers live in the router, not in the
//! nodes, so this is the one place they can be read from.

use std::time::Duration;

use anyhow::Context;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// How long the scrape may take.
const SCRAPE_TIMEOUT: Duration = Duration::from_secs(2);
/// The gauge scraped.
const BREAKER_STATE: &str = tandem_telemetry::names::ROUTER_BREAKER_STATE;

/// One node's breaker as the router reports it.
#[derive(Debug, PartialEq)]
pub struct BreakerRow {
    /// `prefill` or `decode`.
    pub role: String,
    /// The node's gRPC address.
    pub node: String,
    /// `closed`, `half-open` or `open`.
    pub state: &'static str,
}

/// Prints the breakers of the router whose metrics listen at `addr`.
pub async fn print(addr: &str) -> anyhow::Result<()> {
    let body = tokio::time::timeout(SCRAPE_TIMEOUT, scrape(addr))
        .await
        .map_err(|_| anyhow::anyhow!("no answer from {addr} within {SCRAPE_TIMEOUT:?}"))??;
    let rows = parse(&body);
    println!();
    if rows.is_empty() {
        println!("circuit breakers at the router ({addr}): none reported");
        return Ok(());
    }
    println!("circuit breakers at the router ({addr}):");
    println!("{:<8} {:<40} STATE", "ROLE", "NODE");
    for r in rows {
        println!("{:<8} {:<40} {}", r.role, r.node, r.state);
    }
    Ok(())
}

/// `GET /metrics` from `addr` over plain HTTP/1.1; the body.
async fn scrape(addr: &str) -> anyhow::Result<String> {
    let mut conn = tokio::net::TcpStream::connect(addr)
        .await
        .with_context(|| format!("connecting to the router's metrics at {addr}"))?;
    conn.write_all(b"GET /metrics HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
        .await?;
    let mut response = String::new();
    conn.read_to_string(&mut response).await?;
    let (head, body) = response
        .split_once("\r\n\r\n")
        .context("the metrics endpoint sent no HTTP response")?;
    anyhow::ensure!(
        head.starts_with("HTTP/1.1 200"),
        "the metrics endpoint answered {}",
        head.lines().next().unwrap_or("")
    );
    Ok(body.to_string())
}

/// The breaker rows in a Prometheus text exposition, by role and node.
pub fn parse(text: &str) -> Vec<BreakerRow> {
    let mut rows: Vec<BreakerRow> = text
        .lines()
        .filter_map(|line| {
            let rest = line.strip_prefix(BREAKER_STATE)?.strip_prefix('{')?;
            let (labels, value) = rest.rsplit_once("} ")?;
            let label = |key: &str| {
                labels.split(',').find_map(|kv| {
                    let (k, v) = kv.split_once('=')?;
                    (k == key).then(|| v.trim_matches('"').to_string())
                })
            };
            let state = match value.trim().parse::<f64>().ok()? as u8 {
                0 => "closed",
                1 => "half-open",
                _ => "open",
            };
            Some(BreakerRow {
                role: label("role")?,
                node: label("node")?,
                state,
            })
        })
        .collect();
    rows.sort_by(|a, b| (&a.role, &a.node).cmp(&(&b.role, &b.node)));
    rows
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn breaker_rows_are_read_from_the_exposition() {
        let text = "# HELP tandem_router_breaker_state x\n\
            tandem_router_breaker_state{role=\"prefill\",node=\"http://p:1\"} 2\n\
            tandem_router_breaker_state{role=\"decode\",node=\"http://d:1\"} 0\n\
            tandem_router_breaker_transitions_total{role=\"decode\",node=\"http://d:1\",state=\"open\"} 0\n\
            tandem_router_breaker_state{role=\"decode\",node=\"http://d:2\"} 1\n";
        let rows = parse(text);
        let got: Vec<(&str, &str, &str)> = rows
            .iter()
            .map(|r| (r.role.as_str(), r.node.as_str(), r.state))
            .collect();
        assert_eq!(
            got,
            vec![
                ("decode", "http://d:1", "closed"),
                ("decode", "http://d:2", "half-open"),
                ("prefill", "http://p:1", "open"),
            ]
        );
    }
}
