//! Every metric Tandem exports: names, labels, units and descriptions.
//!
//! Names follow Prometheus' conventions: `tandem_` first, the unit in the
//! name (`_seconds`, `_bytes`), counters ending in `_total`. [`ALL`] is the
//! list the Grafana dashboard (`cluster-configs/grafana/tandem.json`) is
//! checked against by `cli/tests/configs.rs`: a panel can only chart a metric
//! named here.
//!
//! Who records what:
//!
//! | metric | recorded by | labels |
//! | --- | --- | --- |
//! | [`TIME_TO_FIRST_TOKEN_SECONDS`] | router, when the first token goes to the client | |
//! | [`INTER_TOKEN_LATENCY_SECONDS`] | router, between two token messages to the client | |
//! | [`REQUEST_DURATION_SECONDS`] | router, arrival to the final message (or error) | `status` |
//! | [`REQUESTS_TOTAL`] | router, once per request | `status` |
//! | [`PROMPT_TOKENS_TOTAL`], [`GENERATION_TOKENS_TOTAL`] | router, once per request that reached a node | |
//! | [`QUEUE_DEPTH`] | router (admission; decode_room: waiting for room at a decode node, `router.decode_waiting`), prefill node (prefill queue), decode node (awaiting KV or local prefill) | `role`, `queue` |
//! | [`KV_BLOCKS_USED`], [`KV_BLOCKS_FREE`] | prefill and decode nodes, after every step | `role`, `node` |
//! | [`PREFIX_CACHE_QUERIES_TOTAL`], [`PREFIX_CACHE_HITS_TOTAL`] | prefill and decode nodes, per prompt prefilled there (tokens looked up, tokens found) | `role`, `node` |
//! | [`PREFIX_CACHE_BLOCKS`], [`PREFIX_CACHE_EVICTIONS_TOTAL`] | prefill and decode nodes, after every step | `role`, `node` |
//! | [`KV_TRANSFER_BYTES_TOTAL`] | prefill node (sent), decode node (received) | `direction` |
//! | [`KV_TRANSFER_SKIPPED_BYTES_TOTAL`] | decode node, at admission, per request whose leading blocks its prefix cache holds | `node` |
//! | [`KV_TRANSFER_SECONDS`] | decode node, first accepted frame to the final frame, per request | |
//! | [`BATCH_SIZE`] | decode node (sequences per forward pass), prefill node (prompts per forward pass) | `role` |
//! | [`CONNECTIONS_REJECTED_TOTAL`] | every TCP listener (router gRPC and HTTP, node gRPC), per connection shed or timed out | `listener`, `reason` |
//! | [`ROUTER_INCOMPATIBLE_NODES`] | router, whenever a node's model fingerprint is learnt or the node leaves | |
//! | [`TLS_CERT_RELOADS_TOTAL`] | every TLS listener, per reload of its certificate files | `listener`, `result` |
//! | [`API_KEY_REQUESTS_TOTAL`], [`API_KEY_REFUSALS_TOTAL`] | router, per authenticated request (refused ones again by `reason`) | `key` (, `reason`) |
//! | [`API_KEY_PROMPT_TOKENS_TOTAL`], [`API_KEY_COMPLETION_TOKENS_TOTAL`] | router, per request that reached a node | `key` |
//! | [`ROUTER_BREAKER_STATE`] | router, per node, at every change of its circuit breaker | `role`, `node` |
//! | [`ROUTER_BREAKER_TRANSITIONS_TOTAL`] | router, per node, per change of its circuit breaker | `role`, `node`, `state` |
//! | [`ROUTER_RERUNS_TOTAL`] | router, per re-run of a request after an attempt failed | `reason` |
//! | [`REQUEST_SPAN_SECONDS`] | router, at the end of each finished request, per phase of its time to first token | `span` |
//! | [`PREFILL_DECISIONS_TOTAL`] | decode node, at admission: where the prompt is prefilled and why | `reason` |
//! | [`KV_LINK_RATE_BYTES_PER_SECOND`] | decode node, after each measured transfer: the smoothed rate from that prefill node | `peer` |
//! | [`PREEMPTIONS_TOTAL`] | decode node, per sequence whose KV blocks it gave back for others to grow (prefilled there again later) | `node` |
//! | [`HTTP_REQUESTS_TOTAL`] | router, per answer of its HTTP API (refused ones included) | `endpoint`, `code` |

/// Histogram: seconds from a request's arrival at the router to its first token leaving for the client.
pub const TIME_TO_FIRST_TOKEN_SECONDS: &str = "tandem_time_to_first_token_seconds";
/// Histogram: seconds between two consecutive token messages of one request, at the router.
pub const INTER_TOKEN_LATENCY_SECONDS: &str = "tandem_inter_token_latency_seconds";
/// Histogram: seconds from a request's arrival at the router to its end, by `status`.
pub const REQUEST_DURATION_SECONDS: &str = "tandem_request_duration_seconds";
/// Gauge: requests waiting, by `role` and `queue`.
pub const QUEUE_DEPTH: &str = "tandem_queue_depth";
/// Gauge: KV blocks held by requests, by `role` and `node`.
pub const KV_BLOCKS_USED: &str = "tandem_kv_blocks_used";
/// Gauge: KV blocks free, by `role` and `node`.
pub const KV_BLOCKS_FREE: &str = "tandem_kv_blocks_free";
/// Counter: KV cache payload bytes moved over QUIC, by `direction` (`sent`, `received`).
pub const KV_TRANSFER_BYTES_TOTAL: &str = "tandem_kv_transfer_bytes_total";
/// Counter: KV bytes a prefill node did not send because the decode node's
/// prefix cache held the prompt's leading blocks (`KvTarget.cached_blocks`).
pub const KV_TRANSFER_SKIPPED_BYTES_TOTAL: &str = "tandem_kv_transfer_skipped_bytes_total";
/// Histogram: seconds one request's KV transfer took at the decode node, first
/// accepted frame to the final frame (every layer landed and checked). The
/// receiver is the side that always sees a transfer end: the router may drop
/// the prefill call as soon as the decode node finished the request.
pub const KV_TRANSFER_SECONDS: &str = "tandem_kv_transfer_seconds";
/// Counter: prompt tokens looked up in a node's prefix cache, by `role` and `node`.
pub const PREFIX_CACHE_QUERIES_TOTAL: &str = "tandem_prefix_cache_queries_total";
/// Counter: prompt tokens whose KV a node's prefix cache already held (not
/// computed again), by `role` and `node`.
pub const PREFIX_CACHE_HITS_TOTAL: &str = "tandem_prefix_cache_hits_total";
/// Gauge: KV blocks in a node's prefix cache (in use or evictable), by `role` and `node`.
pub const PREFIX_CACHE_BLOCKS: &str = "tandem_prefix_cache_blocks";
/// Counter: cached KV blocks evicted to make room, by `role` and `node`.
pub const PREFIX_CACHE_EVICTIONS_TOTAL: &str = "tandem_prefix_cache_evictions_total";
/// Histogram: sequences in one forward pass, by `role`.
pub const BATCH_SIZE: &str = "tandem_batch_size";
/// Counter: prompt tokens of requests that reached a node.
pub const PROMPT_TOKENS_TOTAL: &str = "tandem_prompt_tokens_total";
/// Counter: tokens generated and sent to clients.
pub const GENERATION_TOKENS_TOTAL: &str = "tandem_generation_tokens_total";
/// Counter: requests by final `status` (a finish reason or an error kind).
pub const REQUESTS_TOTAL: &str = "tandem_requests_total";
/// Counter: connections a listener closed before serving them, by `listener`
/// and `reason` (`limit`: over the listener's cap on open connections;
/// `handshake_timeout`: no HTTP/2 preface in time; `header_timeout`: no
/// complete HTTP/1 request head in time, or an idle kept-alive connection;
/// `tls_handshake`: a TLS handshake that failed or did not finish in time).
pub const CONNECTIONS_REJECTED_TOTAL: &str = "tandem_connections_rejected_total";
/// Gauge: nodes the router holds as serving another model than the cluster's
/// (their fingerprint differs), which get no requests.
pub const ROUTER_INCOMPATIBLE_NODES: &str = "tandem_router_incompatible_nodes";

/// Counter: certificate reloads of a TLS listener, by `listener` and
/// `result` (`ok`: the new certificate is served; `error`: the files could
/// not be used and the old certificate stays).
pub const TLS_CERT_RELOADS_TOTAL: &str = "tandem_tls_cert_reloads_total";
/// Counter: requests authenticated with an API key, by `key` (the key's
/// configured name, never the secret).
pub const API_KEY_REQUESTS_TOTAL: &str = "tandem_api_key_requests_total";
/// Counter: an API key's requests refused before they ran, by `key` and
/// `reason` (the request's status label: `rate_limited`, `invalid`, ...).
pub const API_KEY_REFUSALS_TOTAL: &str = "tandem_api_key_refusals_total";
/// Counter: prompt tokens of an API key's requests that reached a node, by `key`.
pub const API_KEY_PROMPT_TOKENS_TOTAL: &str = "tandem_api_key_prompt_tokens_total";
/// Counter: generated tokens an API key's clients received, by `key`.
pub const API_KEY_COMPLETION_TOKENS_TOTAL: &str = "tandem_api_key_completion_tokens_total";

/// Gauge: a node's circuit breaker at the router (`node`: its gRPC address):
/// 0 closed, 1 half-open (trial requests), 2 open (no requests).
pub const ROUTER_BREAKER_STATE: &str = "tandem_router_breaker_state";
/// Counter: changes of a node's circuit breaker, by the `state` entered
/// (`closed`, `half-open`, `open`).
pub const ROUTER_BREAKER_TRANSITIONS_TOTAL: &str = "tandem_router_breaker_transitions_total";
/// Counter: requests re-run on other nodes, by `reason`: `node_failure` (a
/// node failed the attempt) or `kv_timeout` (the decode node's KV wait expired).
pub const ROUTER_RERUNS_TOTAL: &str = "tandem_router_reruns_total";
/// Histogram: seconds a phase of a request's time to first token took, by
/// `span`: `route` (arrival to the decode node's admission), `prefill_queue`,
/// `prefill_compute` (first chunk start to last chunk end), `kv_send_tail`
/// (compute end to the last KV byte sent), `kv_import_tail` (last byte sent
/// to the last layer landed at the decode node), `first_token` (KV landed,
/// or local prefill done, to the first token sent to the client),
/// `first_step` (KV landed, or local prefill done, to the first decode step).
pub const REQUEST_SPAN_SECONDS: &str = "tandem_request_span_seconds";
/// Counter: prompts admitted at a decode node, by where they are prefilled
/// and why (`reason`: `forced`, `short_prompt`, `link_slow`, `probe` (local);
/// `remote`, `tpot_budget` (prefill node)).
pub const PREFILL_DECISIONS_TOTAL: &str = "tandem_prefill_decisions_total";
/// Gauge: the smoothed KV rate a decode node measured from a prefill node
/// (`peer`, its address as the router names it), bytes per second.
pub const KV_LINK_RATE_BYTES_PER_SECOND: &str = "tandem_kv_link_rate_bytes_per_second";
/// Counter: sequences a decode node preempted: their KV blocks given back
/// when a running sequence needed one and none was free (vLLM's
/// `num_preemptions`); each is prefilled there again once blocks are free.
pub const PREEMPTIONS_TOTAL: &str = "tandem_preemptions_total";
/// Counter: answers of the router's HTTP API, by `endpoint` (the route's
/// template, `unmatched` for a path with none) and `code` (the HTTP status):
/// what vLLM's `http_requests_total` counts, refusals before a request runs
/// included.
pub const HTTP_REQUESTS_TOTAL: &str = "tandem_http_requests_total";

/// Every metric name, in the order of the table above.
pub const ALL: [&str; 32] = [
    TIME_TO_FIRST_TOKEN_SECONDS,
    INTER_TOKEN_LATENCY_SECONDS,
    REQUEST_DURATION_SECONDS,
    REQUESTS_TOTAL,
    PROMPT_TOKENS_TOTAL,
    GENERATION_TOKENS_TOTAL,
    QUEUE_DEPTH,
    KV_BLOCKS_USED,
    KV_BLOCKS_FREE,
    PREFIX_CACHE_QUERIES_TOTAL,
    PREFIX_CACHE_HITS_TOTAL,
    PREFIX_CACHE_BLOCKS,
    PREFIX_CACHE_EVICTIONS_TOTAL,
    KV_TRANSFER_BYTES_TOTAL,
    KV_TRANSFER_SKIPPED_BYTES_TOTAL,
    KV_TRANSFER_SECONDS,
    BATCH_SIZE,
    CONNECTIONS_REJECTED_TOTAL,
    ROUTER_INCOMPATIBLE_NODES,
    TLS_CERT_RELOADS_TOTAL,
    API_KEY_REQUESTS_TOTAL,
    API_KEY_REFUSALS_TOTAL,
    API_KEY_PROMPT_TOKENS_TOTAL,
    API_KEY_COMPLETION_TOKENS_TOTAL,
    ROUTER_BREAKER_STATE,
    ROUTER_BREAKER_TRANSITIONS_TOTAL,
    ROUTER_RERUNS_TOTAL,
    REQUEST_SPAN_SECONDS,
    PREFILL_DECISIONS_TOTAL,
    KV_LINK_RATE_BYTES_PER_SECOND,
    PREEMPTIONS_TOTAL,
    HTTP_REQUESTS_TOTAL,
];

/// The histograms among [`ALL`] (exported with `_bucket`, `_sum` and `_count` series).
pub const HISTOGRAMS: [&str; 6] = [
    TIME_TO_FIRST_TOKEN_SECONDS,
    REQUEST_SPAN_SECONDS,
    INTER_TOKEN_LATENCY_SECONDS,
    REQUEST_DURATION_SECONDS,
    KV_TRANSFER_SECONDS,
    BATCH_SIZE,
];

/// Label: the role of the process part that records (`router`, `prefill`, `decode`).
pub const ROLE: &str = "role";
/// Label: which queue: `admission` (router), `prefill` (prefill node), `decode`
/// (decode node: sequences waiting for their KV or being prefilled there).
pub const QUEUE: &str = "queue";
/// Label: the node's id (`prefill.id`, `decode.id`).
pub const NODE: &str = "node";
/// Label: `sent` or `received`.
pub const DIRECTION: &str = "direction";
/// Label: how a request ended: `length`, `stop`, `eos`, `cancelled`, or an
/// error kind named like its gRPC code (`invalid_argument`, `unauthenticated`,
/// `not_found`, `resource_exhausted`, `unavailable`, `deadline_exceeded`, `internal`).
pub const STATUS: &str = "status";
/// Label: an HTTP route's template (see [`HTTP_REQUESTS_TOTAL`]).
pub const ENDPOINT: &str = "endpoint";
/// Label: an HTTP status code, as digits (see [`HTTP_REQUESTS_TOTAL`]).
pub const CODE: &str = "code";
/// Label: which listener: `router_grpc`, `router_http`, `prefill_grpc`, `decode_grpc`.
pub const LISTENER: &str = "listener";
/// Label: why a connection was closed unserved (see [`CONNECTIONS_REJECTED_TOTAL`]).
pub const REASON: &str = "reason";
/// Label: an API key's name (`[[router.api_key]] name`), never the key itself.
pub const KEY: &str = "key";
/// Label: how something ended (`ok`, `error`).
pub const RESULT: &str = "result";
/// Label: a circuit breaker state entered (see [`ROUTER_BREAKER_TRANSITIONS_TOTAL`]).
pub const STATE: &str = "state";
/// Label: a phase of a request's time to first token (see [`REQUEST_SPAN_SECONDS`]).
pub const SPAN: &str = "span";
/// Label: a prefill node as a decode node measures its link (see [`KV_LINK_RATE_BYTES_PER_SECOND`]).
pub const PEER: &str = "peer";

/// Registers every metric's description and unit with the installed recorder
/// (the `# HELP` lines of the scrape).
pub fn describe() {
    use metrics::{Unit, describe_counter, describe_gauge, describe_histogram};
    describe_histogram!(
        TIME_TO_FIRST_TOKEN_SECONDS,
        Unit::Seconds,
        "Arrival at the router to the first token sent to the client"
    );
    describe_histogram!(
        INTER_TOKEN_LATENCY_SECONDS,
        Unit::Seconds,
        "Time between consecutive token messages of a request, at the router"
    );
    describe_histogram!(
        REQUEST_DURATION_SECONDS,
        Unit::Seconds,
        "Arrival at the router to the request's end, by status"
    );
    describe_counter!(REQUESTS_TOTAL, "Requests by final status");
    describe_counter!(
        PROMPT_TOKENS_TOTAL,
        Unit::Count,
        "Prompt tokens of requests that reached a node"
    );
    describe_counter!(
        GENERATION_TOKENS_TOTAL,
        Unit::Count,
        "Generated tokens sent to clients"
    );
    describe_gauge!(QUEUE_DEPTH, "Requests waiting, by role and queue");
    describe_gauge!(KV_BLOCKS_USED, "KV cache blocks held by requests");
    describe_gauge!(KV_BLOCKS_FREE, "KV cache blocks free");
    describe_counter!(
        KV_TRANSFER_BYTES_TOTAL,
        Unit::Bytes,
        "KV cache bytes moved over QUIC, by direction"
    );
    describe_counter!(
        KV_TRANSFER_SKIPPED_BYTES_TOTAL,
        Unit::Bytes,
        "KV cache bytes not sent because the decode node's prefix cache held them"
    );
    describe_histogram!(
        KV_TRANSFER_SECONDS,
        Unit::Seconds,
        "One request's KV transfer at the decode node, first accepted frame to the final frame"
    );
    describe_histogram!(
        BATCH_SIZE,
        Unit::Count,
        "Sequences in one forward pass, by role"
    );
    describe_counter!(
        CONNECTIONS_REJECTED_TOTAL,
        "Connections closed unserved (over the cap, or too slow to start), by listener and reason"
    );
    describe_gauge!(
        ROUTER_INCOMPATIBLE_NODES,
        "Nodes whose model fingerprint differs from the cluster's; they get no requests"
    );
    describe_counter!(
        TLS_CERT_RELOADS_TOTAL,
        "Reloads of a TLS listener's certificate files, by listener and result"
    );
    describe_counter!(
        API_KEY_REQUESTS_TOTAL,
        "Requests authenticated with an API key, by key name"
    );
    describe_counter!(
        API_KEY_REFUSALS_TOTAL,
        "An API key's requests refused before they ran, by key name and reason"
    );
    describe_counter!(
        API_KEY_PROMPT_TOKENS_TOTAL,
        Unit::Count,
        "Prompt tokens of an API key's requests that reached a node, by key name"
    );
    describe_counter!(
        API_KEY_COMPLETION_TOKENS_TOTAL,
        Unit::Count,
        "Generated tokens sent to an API key's clients, by key name"
    );
    describe_gauge!(
        ROUTER_BREAKER_STATE,
        "A node's circuit breaker at the router: 0 closed, 1 half-open, 2 open"
    );
    describe_counter!(
        ROUTER_BREAKER_TRANSITIONS_TOTAL,
        "Changes of a node's circuit breaker at the router, by the state entered"
    );
    describe_counter!(
        ROUTER_RERUNS_TOTAL,
        "Requests re-run on other nodes after a failed attempt, by reason"
    );
    describe_histogram!(
        REQUEST_SPAN_SECONDS,
        Unit::Seconds,
        "Phases of a request's time to first token, by span"
    );
    describe_counter!(
        PREFILL_DECISIONS_TOTAL,
        "Prompts admitted at a decode node, by where they are prefilled and why (reason)"
    );
    describe_gauge!(
        KV_LINK_RATE_BYTES_PER_SECOND,
        "Smoothed KV transfer rate a decode node measured from a prefill node, bytes/s"
    );
    describe_counter!(
        PREEMPTIONS_TOTAL,
        "Sequences whose KV blocks a decode node gave back for others to grow (recomputed later)"
    );
    describe_counter!(
        HTTP_REQUESTS_TOTAL,
        "Answers of the router's HTTP API, by route (endpoint) and HTTP status (code)"
    );
}

/// Upper bounds of the histogram buckets of `name` (one of [`HISTOGRAMS`]).
pub fn buckets(name: &str) -> &'static [f64] {
    match name {
        TIME_TO_FIRST_TOKEN_SECONDS | REQUEST_SPAN_SECONDS => &[
            0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.5, 0.75, 1.0,
            2.5, 5.0, 10.0, 30.0, 60.0,
        ],
        INTER_TOKEN_LATENCY_SECONDS => &[
            0.0005, 0.001, 0.0025, 0.005, 0.0075, 0.01, 0.015, 0.02, 0.03, 0.04, 0.05, 0.075, 0.1,
            0.2, 0.5, 1.0, 2.5,
        ],
        REQUEST_DURATION_SECONDS => &[
            0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 30.0, 60.0, 120.0,
            300.0,
        ],
        KV_TRANSFER_SECONDS => &[
            0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
        ],
        BATCH_SIZE => &[1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0, 512.0],
        _ => &[0.001, 0.01, 0.1, 1.0, 10.0],
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_follow_the_conventions() {
        for name in ALL {
            assert!(name.starts_with("tandem_"), "{name}");
            assert!(
                name.chars()
                    .all(|c| c.is_ascii_lowercase() || c == '_' || c.is_ascii_digit()),
                "{name}"
            );
        }
        for name in HISTOGRAMS {
            assert!(ALL.contains(&name), "{name}");
            let b = buckets(name);
            assert!(
                b.windows(2).all(|w| w[0] < w[1]),
                "{name}: buckets must rise"
            );
        }
        let mut sorted = ALL.to_vec();
        sorted.sort_unstable();
        sorted.dedup();
        assert_eq!(sorted.len(), ALL.len(), "a name is listed twice");
    }
}
