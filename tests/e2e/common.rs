//! Helpers for end-to-end tests: a synthesized model, a whole cluster on
//! loopback, and a real etcd ([`etcd_server`]).

pub mod etcd_server;
pub mod ports;

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use tandem_cluster::{
    DecodeSection, GrpcTls, PrefillSection, RouterSection, StaticMembership, TlsSection, grpc_tls,
};
use tandem_engine::ModelDir;
use tandem_engine::synth::{SynthSpec, write_model_dir};
use tandem_proto::v1 as pb;
use tokio_util::sync::CancellationToken;

/// A small model written into a temporary directory.
pub fn small_model() -> (tempfile::TempDir, Arc<ModelDir>) {
    let dir = tempfile::tempdir().expect("tempdir");
    let spec = SynthSpec {
        hidden_size: 64,
        intermediate_size: 128,
        num_layers: 3,
        num_heads: 4,
        num_kv_heads: 2,
        max_position_embeddings: 1024,
        seed: 5,
        ..Default::default()
    };
    write_model_dir(dir.path(), &spec).expect("synth");
    let model = Arc::new(ModelDir::open(dir.path()).expect("open model"));
    (dir, model)
}

/// Sizes of a test cluster.
pub struct ClusterSpec {
    /// Decode node settings.
    pub decode: DecodeSection,
    /// Prefill node settings; `None` runs without prefill nodes.
    pub prefill: Option<PrefillSection>,
    /// Router settings. With `router.tls` the router dials the nodes at
    /// `https://` addresses (give the nodes `tls` too).
    pub router: RouterSection,
}

impl Default for ClusterSpec {
    fn default() -> Self {
        let mut config = tandem_cluster::Config::parse("[router]\nlisten = \"127.0.0.1:0\"\n[prefill]\nchunk_tokens = 64\nkv_blocks = 512\n[decode]\nkv_blocks = 2048\nlocal_prefill_below = 8\n")
            .expect("test config");
        ClusterSpec {
            decode: config.decode.take().expect("decode"),
            prefill: config.prefill.take(),
            router: config.router.take().expect("router"),
        }
    }
}

/// A running cluster; everything stops when it is dropped.
pub struct Cluster {
    /// The router's address.
    pub router: SocketAddr,
    /// The router's OpenAI-compatible HTTP address, when configured.
    pub http: Option<SocketAddr>,
    /// The decode node's gRPC address.
    pub decode_grpc: SocketAddr,
    /// The decode node's QUIC address.
    pub decode_quic: SocketAddr,
    /// The decode node's load figures.
    pub decode_stats: Arc<Mutex<tandem_decode::scheduler::Stats>>,
    /// The prefill node's gRPC address.
    pub prefill_grpc: Option<SocketAddr>,
    /// The router's `[tls]`: how this harness talks to the nodes itself.
    pub node_tls: Option<GrpcTls>,
    shutdown: CancellationToken,
}

impl Drop for Cluster {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

impl Cluster {
    /// Starts a decode node, a prefill node (if any) and a router on loopback.
    pub async fn start(model: Arc<ModelDir>, spec: ClusterSpec) -> Cluster {
        let shutdown = CancellationToken::new();
        let tls = spec.router.tls.is_some();
        let node_tls = spec
            .router
            .tls
            .as_ref()
            .map(|t| GrpcTls::load(t).expect("the router's [tls]"));
        let d = tandem_decode::serve(model.clone(), spec.decode, shutdown.clone())
            .await
            .expect("decode node");
        let mut prefill_grpc = None;
        let mut prefill_nodes = Vec::new();
        if let Some(p) = spec.prefill {
            let p = tandem_prefill::serve(model.clone(), p, shutdown.clone())
                .await
                .expect("prefill node");
            prefill_nodes.push(format!("{}://{}", grpc_tls::scheme(tls), p.addr));
            prefill_grpc = Some(p.addr);
        }
        let decode_nodes = vec![format!("{}://{}", grpc_tls::scheme(tls), d.grpc_addr)];
        let membership = Arc::new(StaticMembership::new(&prefill_nodes, &decode_nodes));
        let r = tandem_router::serve(model, None, spec.router, membership, shutdown.clone())
            .await
            .expect("router");
        Cluster {
            router: r.addr,
            http: r.http_addr,
            decode_grpc: d.grpc_addr,
            decode_quic: d.quic_addr,
            decode_stats: d.stats,
            prefill_grpc,
            node_tls,
            shutdown,
        }
    }

    /// A client of the router.
    pub async fn client(&self) -> pb::generate_client::GenerateClient<tonic::transport::Channel> {
        pb::generate_client::GenerateClient::connect(format!("http://{}", self.router))
            .await
            .expect("connect router")
    }

    /// Free and total KV blocks and running jobs of the prefill node, from its load reports.
    pub async fn prefill_load(&self) -> pb::NodeLoad {
        let addr = self.prefill_grpc.expect("the cluster has a prefill node");
        let tls = self.node_tls.as_ref();
        let url = format!("{}://{addr}", grpc_tls::scheme(tls.is_some()));
        let channel = grpc_tls::endpoint(&url, tls, None)
            .expect("prefill node endpoint")
            .connect()
            .await
            .expect("connect prefill node");
        let mut client = pb::prefill_node_client::PrefillNodeClient::new(channel);
        let mut stream = client
            .watch_load(pb::WatchLoadRequest { interval_ms: 10 })
            .await
            .expect("watch load")
            .into_inner();
        stream
            .message()
            .await
            .expect("load report")
            .expect("a load report")
    }

    /// Free and total KV blocks of the decode node.
    pub fn decode_blocks(&self) -> (u32, u32) {
        let s = self.decode_stats.lock().expect("stats");
        (s.kv_blocks_free, s.kv_blocks_total)
    }
}

/// What a finished stream produced.
#[derive(Debug, Clone, PartialEq)]
pub struct Completion {
    /// Token ids in order.
    pub tokens: Vec<u32>,
    /// Text, including the final message's tail.
    pub text: String,
    /// Finish reason.
    pub reason: pb::FinishReason,
    /// The final message's usage.
    pub usage: pb::Usage,
    /// The stop string or stop token id that ended it, if one did.
    pub stop_reason: Option<pb::finished::StopReason>,
    /// The prompt's log probabilities, when asked (`prompt_logprobs`).
    pub prompt_logprobs: Option<pb::PromptLogprobs>,
}

/// A greedy request for these token ids.
pub fn greedy_request(prompt: &[u32], max_tokens: u32) -> pb::GenerateRequest {
    pb::GenerateRequest {
        prompt: Some(pb::generate_request::Prompt::TokenIds(pb::TokenIds {
            ids: prompt.to_vec(),
        })),
        max_tokens,
        ignore_eos: true,
        ..Default::default()
    }
}

/// Runs a request to the end.
pub async fn complete(
    client: &mut pb::generate_client::GenerateClient<tonic::transport::Channel>,
    request: pb::GenerateRequest,
) -> Result<Completion, tonic::Status> {
    complete_request(client, tonic::Request::new(request)).await
}

/// Runs a request with its metadata (an API key, ...) to the end.
pub async fn complete_request(
    client: &mut pb::generate_client::GenerateClient<tonic::transport::Channel>,
    request: tonic::Request<pb::GenerateRequest>,
) -> Result<Completion, tonic::Status> {
    let mut stream = client.generate(request).await?.into_inner();
    let mut out = Completion {
        tokens: Vec::new(),
        text: String::new(),
        reason: pb::FinishReason::Unspecified,
        usage: pb::Usage::default(),
        stop_reason: None,
        prompt_logprobs: None,
    };
    while let Some(msg) = stream.message().await? {
        match msg.event {
            Some(pb::generate_response::Event::Token(t)) => {
                out.tokens.extend(t.ids);
                out.text.push_str(&t.text);
            }
            Some(pb::generate_response::Event::Finished(f)) => {
                out.reason =
                    pb::FinishReason::try_from(f.reason).unwrap_or(pb::FinishReason::Unspecified);
                out.usage = f.usage.unwrap_or_default();
                out.stop_reason = f.stop_reason;
            }
            Some(pb::generate_response::Event::PromptLogprobs(p)) => {
                assert!(
                    out.tokens.is_empty() && out.prompt_logprobs.is_none(),
                    "the prompt's log probabilities come once, before the first token"
                );
                out.prompt_logprobs = Some(p);
            }
            None => {}
        }
    }
    Ok(out)
}

/// The text a generation of `ids` answers with: their decoding, less an
/// unfinished character at its end, which the server leaves out as vLLM does.
pub fn generated_text(model: &ModelDir, ids: &[u32]) -> String {
    let text = model.tokenizer.decode(ids).expect("decode");
    text.trim_end_matches('\u{FFFD}').to_string()
}

/// The engine's own greedy continuation, in one process: the reference.
pub fn reference(model: &ModelDir, prompt: &[u32], max_tokens: usize) -> Vec<u32> {
    let backend = model.load_cpu(256, 16).expect("backend");
    let mut g = tandem_engine::local::LocalGenerator::new(backend);
    let params = tandem_engine::GenerationParams {
        max_tokens,
        ignore_eos: true,
        ..Default::default()
    };
    g.generate(prompt, &params, &model.tokenizer, |_| {})
        .expect("reference generation")
        .tokens
}

/// The engine's own logits before each token of its greedy continuation of
/// `prompt`, computed in this process on the CPU backend, forward pass by
/// forward pass: what greedy log probabilities must be the log-softmax of.
pub fn reference_logits(model: &ModelDir, prompt: &[u32], max_tokens: usize) -> Vec<Vec<f32>> {
    use tandem_engine::BackendExt;
    let block_size = 16;
    let mut backend = model.load_cpu(256, block_size).expect("backend");
    let table: Vec<u32> = (0..(prompt.len() + max_tokens).div_ceil(block_size) as u32).collect();
    let mut logits = backend.prefill(prompt, 0, &table).expect("prefill");
    let mut out = Vec::with_capacity(max_tokens);
    for i in 0..max_tokens {
        let token = tandem_engine::sampling::argmax(&logits);
        out.push(std::mem::take(&mut logits));
        if i + 1 < max_tokens {
            logits = backend
                .decode(&[(token, prompt.len() + i, &table)])
                .expect("decode")
                .remove(0);
        }
    }
    out
}

/// The log-softmax after each of `prompt`'s tokens but the last, teacher
/// forced token by token through the engine's decode path on the CPU: entry
/// `i` is the distribution `prompt[i + 1]` was drawn from, what its prompt log
/// probability must be taken from.
pub fn reference_prompt_logprobs(model: &ModelDir, prompt: &[u32]) -> Vec<Vec<f64>> {
    use tandem_engine::BackendExt;
    let block_size = 16;
    let mut backend = model.load_cpu(256, block_size).expect("backend");
    let table: Vec<u32> = (0..prompt.len().div_ceil(block_size) as u32).collect();
    let mut logits = backend.prefill(&prompt[..1], 0, &table).expect("prefill");
    let mut out = Vec::with_capacity(prompt.len());
    for (pos, &token) in prompt.iter().enumerate().skip(1) {
        out.push(log_softmax(&logits));
        if pos + 1 < prompt.len() {
            logits = backend
                .decode(&[(token, pos, &table)])
                .expect("decode")
                .remove(0);
        }
    }
    out
}

/// `log_softmax(logits)`, written out plainly in f64.
pub fn log_softmax(logits: &[f32]) -> Vec<f64> {
    let max = logits
        .iter()
        .fold(f64::NEG_INFINITY, |m, &l| m.max(f64::from(l)));
    let z = logits
        .iter()
        .map(|&l| (f64::from(l) - max).exp())
        .sum::<f64>()
        .ln()
        + max;
    logits.iter().map(|&l| f64::from(l) - z).collect()
}

/// Runs a request to the end, keeping every token's log probabilities (and
/// checking each chunk has one entry per token, or none).
pub async fn complete_with_logprobs(
    client: &mut pb::generate_client::GenerateClient<tonic::transport::Channel>,
    request: pb::GenerateRequest,
) -> Result<(Vec<u32>, Vec<pb::TokenLogprobs>), tonic::Status> {
    let mut stream = client.generate(request).await?.into_inner();
    let (mut tokens, mut logprobs) = (Vec::new(), Vec::new());
    while let Some(msg) = stream.message().await? {
        if let Some(pb::generate_response::Event::Token(t)) = msg.event {
            assert!(
                t.logprobs.is_empty() || t.logprobs.len() == t.ids.len(),
                "a chunk's ids and logprobs: {t:?}"
            );
            tokens.extend(t.ids);
            logprobs.extend(t.logprobs);
        }
    }
    Ok((tokens, logprobs))
}

/// A deterministic prompt of `len` token ids.
pub fn prompt(len: usize, salt: u32) -> Vec<u32> {
    (0..len as u32)
        .map(|i| (i.wrapping_mul(2654435761).wrapping_add(salt * 97)) % 500)
        .collect()
}

/// Writes the CA's certificate and one certificate for `name` with the
/// SANs `sans` (the first is also its `server_name`) into `dir`, as
/// `tandem certs` would; returns the `[tls]` section naming them.
pub fn write_certs(
    dir: &std::path::Path,
    ca: &tandem_kv_transfer::ClusterCa,
    name: &str,
    sans: &[&str],
) -> TlsSection {
    let sans: Vec<String> = sans.iter().map(|s| (*s).to_owned()).collect();
    let node = ca.issue(&sans).expect("issue a node certificate");
    let (ca_p, cert_p, key_p) = (
        dir.join(format!("{name}-ca.pem")),
        dir.join(format!("{name}.pem")),
        dir.join(format!("{name}-key.pem")),
    );
    std::fs::write(&ca_p, ca.cert_pem()).expect("write the CA");
    std::fs::write(&cert_p, &node.cert_pem).expect("write the certificate");
    std::fs::write(&key_p, &node.key_pem).expect("write the key");
    TlsSection {
        ca: ca_p,
        cert: cert_p,
        key: key_p,
        server_name: sans.first().cloned().unwrap_or_else(|| "localhost".into()),
    }
}

/// Runs the Python client script `tests/e2e/<script>` with `args` (the
/// official client libraries against a cluster: scripts/test.sh installs
/// `openai` and `jsonschema`) and returns the JSON it printed; fails the test
/// with the script's stderr when it fails.
pub async fn run_client_script(script: &str, args: Vec<String>) -> serde_json::Value {
    let path = format!("{}/e2e/{script}", env!("CARGO_MANIFEST_DIR"));
    let output = tokio::task::spawn_blocking(move || {
        std::process::Command::new("python3")
            .arg(path)
            .args(&args)
            .output()
    })
    .await
    .expect("the script's task")
    .expect("python3 must be installed (scripts/test.sh installs openai and jsonschema)");
    assert!(
        output.status.success(),
        "the client script {script} failed:\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
    serde_json::from_slice(&output.stdout).expect("script output is JSON")
}

/// `POST /v1/completions` with `body` on the router's HTTP listener at `addr`,
/// as raw HTTP/1.1 (no client library's checks in the way): the status and
/// the body.
pub async fn post_completions(addr: SocketAddr, body: &[u8]) -> (u16, String) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    let head = format!(
        "POST /v1/completions HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\nconnection: close\r\ncontent-length: {}\r\n\r\n",
        body.len()
    );
    s.write_all(head.as_bytes()).await.unwrap();
    let _ = s.write_all(body).await; // the server may answer 413 and close early
    let mut out = Vec::new();
    let _ = s.read_to_end(&mut out).await;
    let text = String::from_utf8_lossy(&out).to_string();
    let status = text
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let body = text
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default();
    (status, body)
}
