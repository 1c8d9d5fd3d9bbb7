//! End-to-end tests of the prefill node: a real `serve` on port 0, called over
//! gRPC, shipping KV over QUIC to a real `KvReceiver` whose sink imports it
//! into a second engine, as a decode node does. The receiving engine then
//! decodes from the imported cache and must agree with a local run.
//!
//! (Long on purpose: one file per test binary; these tests share one harness,
//! a real prefill node shipping KV to a fake decode sink and a local reference.)

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow};
use tandem_cluster::PrefillSection;
use tandem_engine::block_manager::blocks_for;
use tandem_engine::cpu::CpuBackend;
use tandem_engine::sampling::Sampler;
use tandem_engine::synth::{SynthSpec, write_model_dir};
use tandem_engine::{Backend, BackendExt, BlockId, BlockManager, KvIo, ModelDir, SamplingParams};
use tandem_kv_transfer::{
    Expectation, FirstToken, KvReceiver, KvSink, LayerHeader, Payload, Reservations, SelfSigned,
    SinkError, WireDtype,
};
use tandem_prefill::RunningPrefill;
use tandem_proto::v1 as pb;
use tandem_proto::v1::prefill_node_client::PrefillNodeClient;
use tokio_util::sync::CancellationToken;
use tonic::transport::Channel;

/// A request being received.
struct Incoming {
    table: Vec<BlockId>,
    /// What the Final frame announced.
    first: Option<FirstToken>,
    /// Every layer is in.
    complete: bool,
    aborted: Option<String>,
    /// Layer frames taken in.
    frames: u32,
}

struct DecodeState {
    reservations: Reservations,
    backend: CpuBackend,
    blocks: BlockManager,
    requests: HashMap<u64, Incoming>,
}

/// The receiving side: a reservation table and an engine, like a decode node.
struct Decode(Mutex<DecodeState>);

impl Decode {
    fn lock(&self) -> std::sync::MutexGuard<'_, DecodeState> {
        self.0.lock().unwrap_or_else(|p| p.into_inner())
    }
}

impl KvSink for Decode {
    fn on_layer(&self, h: &LayerHeader, payload: Payload) -> Result<(), SinkError> {
        if h.checksum.is_none() {
            return Err(SinkError::Store(
                "a frame without the checksum asked for".into(),
            ));
        }
        let mut s = self.lock();
        let s = &mut *s;
        let acc = s.reservations.on_layer_frame(h)?;
        let incoming = s
            .requests
            .get_mut(&h.transfer_id)
            .ok_or(SinkError::Store("unknown transfer".into()))?;
        incoming.frames += 1;
        let table = &incoming.table;
        let (first, count) = (acc.first_block as usize, acc.block_count as usize);
        s.backend
            .import_layer(
                acc.layer as usize,
                &table[first..first + count],
                &payload.to_bytes(),
            )
            .map_err(|e| SinkError::Store(e.to_string()))
    }

    fn on_first_token(&self, transfer_id: u64, first: FirstToken) {
        if let Some(r) = self.lock().requests.get_mut(&transfer_id) {
            r.first = Some(first);
        }
    }

    fn on_final(&self, transfer_id: u64, layers_sent: u32) -> Result<(), SinkError> {
        let mut s = self.lock();
        s.reservations.on_final(transfer_id, layers_sent)?;
        s.reservations.release(transfer_id);
        if let Some(r) = s.requests.get_mut(&transfer_id) {
            r.complete = true;
        }
        Ok(())
    }

    fn on_abort(&self, transfer_id: u64, reason: &str) {
        let mut s = self.lock();
        s.reservations.release(transfer_id);
        if let Some(r) = s.requests.get_mut(&transfer_id) {
            r.aborted = Some(reason.to_owned());
        }
    }
}

struct Cluster {
    model: Arc<ModelDir>,
    _dir: tempfile::TempDir,
    prefill: RunningPrefill,
    shutdown: CancellationToken,
    decode: Arc<Decode>,
    receiver: KvReceiver,
    quic_addr: SocketAddr,
    cert: Vec<u8>,
    client: PrefillNodeClient<Channel>,
    next_transfer: Mutex<u64>,
}

const BLOCK: usize = 16;
const DECODE_STEPS: usize = 8;

async fn start(max_pos: usize, chunk_tokens: usize, max_batch_tokens: usize) -> Result<Cluster> {
    start_with(max_pos, chunk_tokens, max_batch_tokens, true, 256).await
}

async fn start_with(
    max_pos: usize,
    chunk_tokens: usize,
    max_batch_tokens: usize,
    prefix_cache: bool,
    kv_blocks: usize,
) -> Result<Cluster> {
    let dir = tempfile::tempdir()?;
    write_model_dir(
        dir.path(),
        &SynthSpec {
            hidden_size: 64,
            intermediate_size: 128,
            num_layers: 2,
            num_heads: 4,
            num_kv_heads: 2,
            max_position_embeddings: max_pos,
            ..Default::default()
        },
    )?;
    let model = Arc::new(ModelDir::open(dir.path())?);
    let config = PrefillSection {
        id: "prefill-test".into(),
        listen: "127.0.0.1:0".parse()?,
        kv_blocks,
        kv_dtype: Default::default(),
        block_size: BLOCK,
        chunk_tokens,
        max_batch_tokens,
        max_queue: 16,
        kv_connections: 2,
        tp: 1,
        prefix_cache,
        max_send_rate_mbps: None,
        // Every frame checksummed (the sink below refuses any that is not):
        // the option reaches the wire, and the decoder verifies the sums.
        kv_checksum: true,
        tls: None,
        connections: Default::default(),
    };
    let shutdown = CancellationToken::new();
    let prefill = tandem_prefill::serve(model.clone(), config, shutdown.clone()).await?;
    let tls = SelfSigned::generate(&["localhost"])?;
    let decode = Arc::new(Decode(Mutex::new(DecodeState {
        reservations: Reservations::new(),
        backend: model.load_cpu(512, BLOCK)?,
        blocks: BlockManager::new(512),
        requests: HashMap::new(),
    })));
    let (receiver, quic_addr) =
        KvReceiver::bind("127.0.0.1:0".parse()?, tls.server_config()?, decode.clone())?;
    let client = PrefillNodeClient::connect(format!("http://{}", prefill.addr)).await?;
    Ok(Cluster {
        model,
        _dir: dir,
        prefill,
        shutdown,
        decode,
        receiver,
        quic_addr,
        cert: tls.cert.to_vec(),
        client,
        next_transfer: Mutex::new(1),
    })
}

fn prompt_of(len: usize, salt: u32) -> Vec<u32> {
    (0..len as u32)
        .map(|i| (i * 31 + salt * 7 + 3) % 500 + 1)
        .collect()
}

/// Greedy tokens after `first`, decoded from a cache holding `prompt_len` tokens.
fn decode_greedy(
    backend: &mut CpuBackend,
    table: &[BlockId],
    prompt: &[u32],
    first: u32,
) -> Result<Vec<u32>> {
    let mut sampler = Sampler::new(SamplingParams::default(), prompt);
    sampler.resume_after(first);
    let mut out = Vec::new();
    let mut token = first;
    for pos in prompt.len()..prompt.len() + DECODE_STEPS {
        let mut logits = backend.decode(&[(token, pos, table)])?;
        token = sampler.sample(&mut logits[0]);
        out.push(token);
    }
    Ok(out)
}

/// The first token and greedy continuation computed in one process.
fn local_reference(
    model: &ModelDir,
    prompt: &[u32],
    params: &SamplingParams,
) -> Result<(u32, Vec<u32>)> {
    let mut backend = model.load_cpu(blocks_for(prompt.len() + DECODE_STEPS + 1, BLOCK), BLOCK)?;
    let table: Vec<BlockId> = (0..backend.kv_layout().num_blocks as BlockId).collect();
    let mut logits = backend.prefill(prompt, 0, &table)?;
    let first = Sampler::new(params.clone(), prompt).sample(&mut logits);
    let rest = decode_greedy(&mut backend, &table, prompt, first)?;
    Ok((first, rest))
}

impl Cluster {
    /// Reserves blocks at the receiver (in reverse order, so block ids differ
    /// from the prefill node's) and returns the KV target for the prompt.
    fn reserve(&self, prompt_len: usize) -> Result<pb::KvTarget> {
        let transfer_id = {
            let mut n = self.next_transfer.lock().unwrap_or_else(|p| p.into_inner());
            *n += 1;
            *n
        };
        let needed = blocks_for(prompt_len, BLOCK);
        let mut s = self.decode.lock();
        let layout = s.backend.kv_layout();
        let mut table = s
            .blocks
            .allocate(blocks_for(prompt_len + DECODE_STEPS + 1, BLOCK))?;
        table.reverse();
        s.reservations
            .register(
                transfer_id,
                Expectation {
                    num_layers: layout.num_layers as u32,
                    num_blocks: needed as u32,
                    block_bytes: layout.block_bytes() as u64,
                    dtype: WireDtype::F32,
                    total_heads: layout.num_kv_heads as u16,
                    head_dim: layout.head_dim as u16,
                    block_size: BLOCK as u16,
                    held_blocks: 0,
                },
            )
            .map_err(|e| anyhow!("{e:?}"))?;
        s.requests.insert(
            transfer_id,
            Incoming {
                table,
                first: None,
                complete: false,
                aborted: None,
                frames: 0,
            },
        );
        Ok(pb::KvTarget {
            quic_addr: self.quic_addr.to_string(),
            server_name: "localhost".into(),
            server_cert_der: self.cert.clone(),
            num_blocks: needed as u32,
            block_size: BLOCK as u32,
            num_layers: layout.num_layers as u32,
            num_kv_heads: layout.num_kv_heads as u32,
            head_dim: layout.head_dim as u32,
            dtype: pb::KvDtype::F32 as i32,
            transfer_id,
            quic_addrs: Vec::new(),
            cached_blocks: 0,
            // The same model as the prefill node's: checked, and accepted.
            model_fingerprint: tandem_cluster::ModelFingerprint::of(&self.model)?.to_string(),
        })
    }

    fn request(
        &self,
        id: &str,
        prompt: &[u32],
        sampling: Option<pb::SamplingParams>,
    ) -> Result<pb::PrefillRequest> {
        Ok(pb::PrefillRequest {
            request_id: id.into(),
            prompt: prompt.to_vec(),
            sampling,
            kv_target: Some(self.reserve(prompt.len().max(1))?),
            generated: Vec::new(),
            logprobs: None,
            attempt: 0,
            banned_token_ids: Vec::new(),
            constraint: None,
            cache_salt: String::new(),
        })
    }

    /// Waits for the receiver's Final, then decodes from the imported KV.
    async fn received(&self, transfer_id: u64, prompt: &[u32]) -> Result<(u32, Vec<u32>)> {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            {
                let mut s = self.decode.lock();
                let s = &mut *s;
                let r = s.requests.get(&transfer_id).context("no such transfer")?;
                if let Some(reason) = &r.aborted {
                    return Err(anyhow!("transfer aborted: {reason}"));
                }
                if let (true, Some(first)) = (r.complete, r.first.as_ref().map(|f| f.id)) {
                    let table = r.table.clone();
                    let rest = decode_greedy(&mut s.backend, &table, prompt, first)?;
                    s.blocks.release(&table)?;
                    return Ok((first, rest));
                }
            }
            if Instant::now() > deadline {
                return Err(anyhow!("the Final frame never arrived"));
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// Prefills `prompt` remotely and checks it against a local run.
    async fn check(
        &self,
        id: &str,
        prompt: &[u32],
        sampling: Option<pb::SamplingParams>,
    ) -> Result<pb::PrefillResponse> {
        let req = self.request(id, prompt, sampling)?;
        self.check_request(req, prompt).await
    }

    /// As `check`, for a request made by `request` and then changed.
    async fn check_request(
        &self,
        req: pb::PrefillRequest,
        prompt: &[u32],
    ) -> Result<pb::PrefillResponse> {
        let transfer_id = req.kv_target.as_ref().map(|t| t.transfer_id).unwrap_or(0);
        let params = tandem_cluster::convert::sampling_from_pb(req.sampling.as_ref());
        let resp = self.client.clone().prefill(req).await?.into_inner();
        self.verify(transfer_id, prompt, &params, &resp).await?;
        Ok(resp)
    }

    async fn verify(
        &self,
        transfer_id: u64,
        prompt: &[u32],
        params: &SamplingParams,
        resp: &pb::PrefillResponse,
    ) -> Result<()> {
        let (local_first, local_rest) = local_reference(&self.model, prompt, params)?;
        assert_eq!(
            resp.first_token,
            local_first,
            "first token of a {}-token prompt",
            prompt.len()
        );
        let (recv_first, recv_rest) = self.received(transfer_id, prompt).await?;
        assert_eq!(
            recv_first, local_first,
            "first token carried in the Final frame"
        );
        assert_eq!(
            recv_rest,
            local_rest,
            "decoding from the shipped KV of a {}-token prompt",
            prompt.len()
        );
        let layout_bytes = 2 * 2 * BLOCK * 16 * 4; // kv * heads * block * head_dim * f32
        assert_eq!(
            resp.kv_bytes_sent as usize,
            2 * blocks_for(prompt.len(), BLOCK) * layout_bytes,
            "each block of each layer sent once"
        );
        Ok(())
    }

    async fn stop(self) -> Result<()> {
        self.shutdown.cancel();
        tokio::time::timeout(Duration::from_secs(10), self.prefill.wait())
            .await
            .context("prefill node did not stop")??;
        self.receiver.shutdown().await;
        Ok(())
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prompts_of_every_shape_match_a_local_run() -> Result<()> {
    let c = start(1024, 64, 256).await?;
    for (i, len) in [1usize, 16, 17, 700].into_iter().enumerate() {
        let prompt = prompt_of(len, i as u32);
        let resp = c.check(&format!("req-{len}"), &prompt, None).await?;
        assert!(resp.compute_seconds > 0.0);
    }
    // A seeded random draw: the first token must come from the same Sampler.
    let sampling = pb::SamplingParams {
        temperature: 0.9,
        seed: Some(7),
        ..Default::default()
    };
    c.check("sampled", &prompt_of(33, 9), Some(sampling))
        .await?;
    let load = c.prefill.load();
    assert_eq!(load.kv_blocks_free, load.kv_blocks_total, "no block leaked");
    assert_eq!(load.running + load.queued, 0);
    // 1, 16, 17 and 33 tokens take a step each; 700 tokens prefilled alone
    // take the whole step budget (256) a pass, not one 64-token chunk: 3 passes.
    let expected_steps = 4 + 700u64.div_ceil(256);
    assert_eq!(load.steps_total, expected_steps);
    c.stop().await
}

/// The first token's log probabilities travel in the Final frame (the decode
/// node streams the token with them), only when asked.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_final_frame_carries_the_first_tokens_log_probabilities() -> Result<()> {
    let c = start(1024, 64, 256).await?;
    let prompt = prompt_of(20, 3);
    for asked in [Some(4u32), None] {
        let mut req = c.request("lp", &prompt, None)?;
        req.logprobs = asked;
        let transfer_id = req.kv_target.as_ref().map_or(0, |t| t.transfer_id);
        let resp = c.client.clone().prefill(req).await?.into_inner();
        let (first, _) = c.received(transfer_id, &prompt).await?;
        assert_eq!(first, resp.first_token);
        let announced = c.decode.lock().requests[&transfer_id].first.clone();
        let logprobs = announced.context("announced")?.logprobs;
        match (asked, logprobs) {
            (Some(n), Some(l)) => {
                assert_eq!(l.top.len(), n as usize);
                // Greedy: the token is the most likely one.
                assert_eq!(l.top[0], (first, l.logprob));
                assert!(l.logprob <= 0.0 && l.logprob > -30.0, "{}", l.logprob);
                assert!(l.top.windows(2).all(|w| w[0].1 >= w[1].1), "{:?}", l.top);
            }
            (None, None) => {}
            (asked, got) => panic!("asked {asked:?}, got {got:?}"),
        }
    }
    c.stop().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_short_prompt_overtakes_a_long_one() -> Result<()> {
    let c = Arc::new(start(2048, 32, 64).await?);
    let long = prompt_of(1500, 1);
    let short = prompt_of(16, 2);
    let long_req = c.request("long", &long, None)?;
    let short_req = c.request("short", &short, None)?;
    let (long_id, short_id) = (
        long_req
            .kv_target
            .as_ref()
            .map(|t| t.transfer_id)
            .unwrap_or(0),
        short_req
            .kv_target
            .as_ref()
            .map(|t| t.transfer_id)
            .unwrap_or(0),
    );
    let mut client = c.client.clone();
    let long_call = tokio::spawn(async move {
        let r = client.prefill(long_req).await;
        (r, Instant::now())
    });
    // Let the long one start computing first.
    let deadline = Instant::now() + Duration::from_secs(5);
    while c.prefill.load().steps_total == 0 {
        assert!(Instant::now() < deadline, "the long prompt never started");
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    let short_resp = c.client.clone().prefill(short_req).await?.into_inner();
    let short_done = Instant::now();
    let (long_resp, long_done) = long_call.await?;
    let long_resp = long_resp?.into_inner();
    assert!(
        short_done < long_done,
        "chunked prefill lets the short prompt finish first"
    );
    let greedy = SamplingParams::default();
    c.verify(short_id, &short, &greedy, &short_resp).await?;
    c.verify(long_id, &long, &greedy, &long_resp).await?;
    assert!(
        c.prefill.load().max_batch_seen >= 2,
        "both prompts shared a forward pass"
    );
    let c = Arc::into_inner(c).context("cluster still shared")?;
    c.stop().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_requests_are_refused_and_the_node_keeps_serving() -> Result<()> {
    let c = start(512, 64, 256).await?;
    let prompt = prompt_of(20, 3);
    let mut client = c.client.clone();

    let mut req = c.request("bad-layers", &prompt, None)?;
    if let Some(t) = req.kv_target.as_mut() {
        t.num_layers = 5;
    }
    let e = client.prefill(req).await.expect_err("wrong layer count");
    assert_eq!(e.code(), tonic::Code::InvalidArgument);
    assert!(e.message().contains("num_layers"), "{}", e.message());

    let mut req = c.request("few-blocks", &prompt, None)?;
    if let Some(t) = req.kv_target.as_mut() {
        t.num_blocks = 1;
    }
    let e = client.prefill(req).await.expect_err("too few blocks");
    assert_eq!(e.code(), tonic::Code::InvalidArgument);

    let req = c.request("empty", &[], None)?;
    let e = client.prefill(req).await.expect_err("empty prompt");
    assert_eq!(e.code(), tonic::Code::InvalidArgument);
    assert!(e.message().contains("empty"), "{}", e.message());

    let req = c.request("oov", &[1, 2, 100_000], None)?;
    let e = client
        .prefill(req)
        .await
        .expect_err("token out of vocabulary");
    assert_eq!(e.code(), tonic::Code::InvalidArgument);
    assert!(e.message().contains("100000"), "{}", e.message());

    // Claiming the block of the last token (or beyond) leaves nothing to ship.
    let mut req = c.request("held-all", &prompt, None)?;
    if let Some(t) = req.kv_target.as_mut() {
        t.cached_blocks = t.num_blocks;
    }
    let e = client.prefill(req).await.expect_err("every block held");
    assert_eq!(e.code(), tonic::Code::InvalidArgument);
    assert!(e.message().contains("cached_blocks"), "{}", e.message());

    let mut req = c.request("bad-dtype", &prompt, None)?;
    if let Some(t) = req.kv_target.as_mut() {
        t.dtype = 7;
    }
    let e = client.prefill(req).await.expect_err("unknown dtype");
    assert_eq!(e.code(), tonic::Code::InvalidArgument);
    assert!(e.message().contains("dtype 7"), "{}", e.message());

    let mut req = c.request("no-cert", &prompt, None)?;
    if let Some(t) = req.kv_target.as_mut() {
        t.server_cert_der.clear();
    }
    let e = client.prefill(req).await.expect_err("no certificate");
    assert_eq!(e.code(), tonic::Code::FailedPrecondition);

    // A decode node serving other weights (or another shape) under the same
    // name: refused before any work, as a pairing error, not the client's.
    let ours = tandem_cluster::ModelFingerprint::of(&c.model)?;
    let other_weights = tandem_cluster::ModelFingerprint {
        weights: ours.weights ^ 1,
        ..ours
    };
    let other_shape = tandem_cluster::ModelFingerprint {
        config: ours.config ^ 1,
        ..other_weights
    };
    for (theirs, why) in [
        (other_weights, "(weights differ)"),
        (other_shape, "(model config (shape), weights differ)"),
    ] {
        let mut req = c.request("other-model", &prompt, None)?;
        if let Some(t) = req.kv_target.as_mut() {
            t.model_fingerprint = theirs.to_string();
            // Another shape would also fail the shape checks; the model
            // check comes first and says what is wrong.
            t.num_layers = 5;
        }
        let e = client.prefill(req).await.expect_err("another model");
        assert_eq!(e.code(), tonic::Code::FailedPrecondition, "{e:?}");
        assert!(e.message().contains(why), "{}", e.message());
    }

    let found = client
        .cancel(pb::CancelRequest {
            request_id: "nobody".into(),
            attempt: 0,
        })
        .await?
        .into_inner()
        .found;
    assert!(!found);

    c.check("good", &prompt, None).await?;
    c.stop().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancel_stops_a_running_prefill_and_frees_its_blocks() -> Result<()> {
    let c = start(2048, 16, 16).await?;
    let prompt = prompt_of(1500, 4);
    let req = c.request("doomed", &prompt, None)?;
    let transfer_id = req.kv_target.as_ref().map(|t| t.transfer_id).unwrap_or(0);
    let mut client = c.client.clone();
    let call = tokio::spawn(async move { client.prefill(req).await });
    // Cancel once the transfer is under way (a layer has reached the receiver):
    // a request cancelled before its first layer opens no stream, and the
    // decode node then learns of it only at its KV timeout.
    let deadline = Instant::now() + Duration::from_secs(5);
    while c.prefill.load().steps_total < 2
        || c.decode
            .lock()
            .requests
            .get(&transfer_id)
            .map_or(0, |r| r.frames)
            == 0
    {
        assert!(Instant::now() < deadline, "the prefill never started");
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    let found = c
        .client
        .clone()
        .cancel(pb::CancelRequest {
            request_id: "doomed".into(),
            attempt: 0,
        })
        .await?
        .into_inner()
        .found;
    assert!(found);
    let e = call.await?.expect_err("cancelled call fails");
    assert_eq!(e.code(), tonic::Code::Cancelled);
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let load = c.prefill.load();
        if load.kv_blocks_free == load.kv_blocks_total && load.running == 0 {
            break;
        }
        assert!(Instant::now() < deadline, "blocks not freed: {load:?}");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    // The receiver was told (abort frame or reset streams).
    let deadline = Instant::now() + Duration::from_secs(35);
    loop {
        if c.decode.lock().requests[&transfer_id].aborted.is_some() {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the receiver never heard of the abort"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }

    // WatchLoad reports this node.
    let mut loads = c
        .client
        .clone()
        .watch_load(pb::WatchLoadRequest { interval_ms: 10 })
        .await?
        .into_inner();
    let load = loads.message().await?.context("no load report")?;
    assert_eq!(load.role(), pb::Role::Prefill);
    let fingerprint = tandem_cluster::ModelFingerprint::of(&c.model)?;
    assert_eq!(load.model_fingerprint, fingerprint.to_string());
    assert_eq!(load.node_id, "prefill-test");
    assert_eq!(load.kv_blocks_total, 256);
    assert!(load.steps_total >= 2);
    c.stop().await
}

/// Prompt tokens the node computed (not found in its prefix cache) so far.
fn computed_tokens(c: &Cluster) -> u64 {
    let l = c.prefill.load();
    l.prompt_tokens_total - l.cached_tokens_total
}

/// Every prompt is checked against a local run with no cache (first token,
/// and greedy decoding from the KV the node shipped, cached blocks included).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cached_prefixes_are_reused_and_outputs_do_not_change() -> Result<()> {
    let c = start(1024, 32, 256).await?;
    let base = prompt_of(100, 3);
    c.check("first", &base, None).await?;
    assert_eq!(computed_tokens(&c), 100);
    // The same prompt again: 6 full blocks (96 tokens) come from the cache.
    c.check("repeat", &base, None).await?;
    assert_eq!(
        computed_tokens(&c),
        100 + 4,
        "the second identical prompt computes only its partial block"
    );
    // Seeded sampling of the first token over cached KV.
    let seeded = pb::SamplingParams {
        temperature: 0.9,
        seed: Some(11),
        ..Default::default()
    };
    c.check("repeat-seeded", &base, Some(seeded)).await?;
    assert_eq!(computed_tokens(&c), 100 + 4 + 4);
    // Extending the cached prompt mid-block (110 tokens) and to a block boundary (128).
    c.check("mid-block", &prompt_of(110, 3), None).await?;
    assert_eq!(computed_tokens(&c), 108 + 14);
    c.check("boundary", &prompt_of(128, 3), None).await?;
    assert_eq!(computed_tokens(&c), 122 + 32);
    // Fully cached prompts: the block of the last token is computed again.
    c.check("all-cached", &prompt_of(128, 3), None).await?;
    assert_eq!(computed_tokens(&c), 154 + 16);
    c.check("all-cached-short", &prompt_of(96, 3), None).await?;
    assert_eq!(computed_tokens(&c), 170 + 16);
    // A multi-turn chat: each turn's prompt is the last one, its answer and a
    // new message; each turn reuses the full blocks the turn before computed.
    let mut chat = prompt_of(40, 5);
    let mut reused = Vec::new();
    for turn in 0..3u32 {
        let before = c.prefill.load().cached_tokens_total;
        let resp = c.check(&format!("turn-{turn}"), &chat, None).await?;
        reused.push(c.prefill.load().cached_tokens_total - before);
        chat.push(resp.first_token);
        chat.extend(prompt_of(20, 50 + turn));
    }
    // Turns of 40, 61 and 82 tokens: 0, then 40 / 16 and 61 / 16 full blocks.
    assert_eq!(reused, vec![0, 32, 48]);
    let l = c.prefill.load();
    assert_eq!(
        l.kv_blocks_free, l.kv_blocks_total,
        "cached blocks are evictable"
    );
    c.stop().await
}

/// vLLM's `cache_salt`: a prompt reuses only the blocks computed under its
/// own salt (none: the shared cache), and its output is the same.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cache_salt_shares_blocks_only_with_the_same_salt() -> Result<()> {
    let c = start_with(1024, 32, 256, true, 256).await?;
    let base = prompt_of(100, 3);
    c.check("plain", &base, None).await?;
    // 100 tokens: 6 full blocks of 16 before the last token's.
    for (id, salt, reused) in [
        ("tenant-a", "a", 0),
        ("tenant-a-again", "a", 96),
        ("tenant-b", "b", 0),
        ("plain-again", "", 96),
    ] {
        let mut req = c.request(id, &base, None)?;
        req.cache_salt = salt.into();
        let before = c.prefill.load().cached_tokens_total;
        c.check_request(req, &base).await?;
        assert_eq!(
            c.prefill.load().cached_tokens_total - before,
            reused,
            "{id}"
        );
    }
    c.stop().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_the_cache_off_every_prompt_is_computed() -> Result<()> {
    let c = start_with(1024, 32, 256, false, 256).await?;
    let base = prompt_of(100, 3);
    c.check("first", &base, None).await?;
    c.check("repeat", &base, None).await?;
    assert_eq!(computed_tokens(&c), 200);
    c.stop().await
}

/// More distinct prompts than the cache holds: every one that fits is served
/// (cached blocks are evicted, never one in use), outputs stay right, and the
/// cache is all available again once idle.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn eviction_under_pressure_never_fails_a_prompt_that_fits() -> Result<()> {
    let c = Arc::new(start_with(1024, 32, 256, true, 16).await?);
    // Two at a time, 7 blocks each, 12 distinct prompts: 84 blocks through 16.
    for pair in 0..6u32 {
        let (a, b) = (
            prompt_of(100, 100 + 2 * pair),
            prompt_of(100, 101 + 2 * pair),
        );
        let (c1, c2) = (c.clone(), c.clone());
        let t1 = tokio::spawn(async move { c1.check(&format!("p{pair}a"), &a, None).await });
        let t2 = tokio::spawn(async move { c2.check(&format!("p{pair}b"), &b, None).await });
        t1.await??;
        t2.await??;
    }
    // The most recent prompt is still cached; an older one was evicted.
    let before = c.prefill.load().cached_tokens_total;
    c.check("recent", &prompt_of(100, 111), None).await?;
    assert_eq!(c.prefill.load().cached_tokens_total - before, 96);
    let l = c.prefill.load();
    assert!(l.prefix_cache_evictions > 0, "{l:?}");
    assert!(l.prefix_cache_blocks <= 16);
    assert_eq!(
        l.kv_blocks_free, l.kv_blocks_total,
        "idle after the drain: {l:?}"
    );
    assert_eq!(l.running + l.queued, 0);
    Arc::try_unwrap(c)
        .map_err(|_| anyhow!("cluster still shared"))?
        .stop()
        .await
}
