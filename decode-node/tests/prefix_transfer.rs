//! The decode node's prefix cache in disaggregated mode: a real decode node
//! and a real prefill node (QUIC, TLS, a synthesized model with its trained
//! tokenizer) driven over gRPC as the router drives them (`Decode`, then
//! `Prefill` with the `KvTarget` of the `Admitted` answer).
//!
//! Every output is compared token for token with a decode node whose prefix
//! cache is off, and the bytes shipped with the blocks the cache held.

use std::sync::Arc;

use anyhow::{Context, Result, bail};
use tandem_decode::RunningDecode;
use tandem_engine::ModelDir;
use tandem_engine::synth::{SynthSpec, write_model_dir};
use tandem_proto::v1 as pb;
use tandem_proto::v1::decode_node_client::DecodeNodeClient;
use tandem_proto::v1::decode_response::Event;
use tandem_proto::v1::prefill_node_client::PrefillNodeClient;
use tokio_util::sync::CancellationToken;
use tonic::Streaming;

const BLOCK: usize = 4;
const LAYERS: usize = 3;
/// One block of one layer: K and V of 2 heads x 4 slots x 16 dims, f32.
const BLOCK_BYTES: u64 = 2 * 2 * BLOCK as u64 * 16 * 4;

fn model() -> (tempfile::TempDir, Arc<ModelDir>) {
    let dir = tempfile::tempdir().expect("tempdir");
    let spec = SynthSpec {
        hidden_size: 64,
        intermediate_size: 128,
        num_layers: LAYERS,
        num_heads: 4,
        num_kv_heads: 2,
        max_position_embeddings: 1024,
        seed: 11,
        ..Default::default()
    };
    write_model_dir(dir.path(), &spec).expect("synth");
    let model = Arc::new(ModelDir::open(dir.path()).expect("open model"));
    (dir, model)
}

/// A decode node and a prefill node.
struct Pair {
    decode: RunningDecode,
    prefill: std::net::SocketAddr,
    shutdown: CancellationToken,
}

impl Drop for Pair {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

/// A request admitted by the decode node, its stream still open.
struct Admitted {
    stream: Streaming<pb::DecodeResponse>,
    admitted: pb::Admitted,
    prompt: Vec<u32>,
    sampling: Option<pb::SamplingParams>,
    id: String,
}

/// What a request produced.
#[derive(Debug)]
struct Outcome {
    tokens: Vec<u32>,
    /// `KvTarget.cached_blocks` (0 for a local prefill).
    cached_blocks: u32,
    local: bool,
    /// `PrefillResponse.kv_bytes_sent` (0 for a local prefill).
    kv_bytes_sent: u64,
}

impl Pair {
    async fn start(
        model: &Arc<ModelDir>,
        decode_cache: bool,
        local_prefill_below: usize,
        kv_blocks: usize,
    ) -> Pair {
        let shutdown = CancellationToken::new();
        let decode = tandem_cluster::Config::parse(&format!(
            "[decode]\nkv_blocks = {kv_blocks}\nblock_size = {BLOCK}\nlocal_prefill_below = {local_prefill_below}\nprefix_cache = {decode_cache}\n"
        ))
        .expect("decode config")
        .decode
        .expect("decode section");
        // The prefill node's own cache is on: it computes only what it
        // lacks, and still ships only what the decode node lacks.
        let prefill = tandem_cluster::Config::parse(&format!(
            "[prefill]\nkv_blocks = 512\nblock_size = {BLOCK}\nchunk_tokens = 8\n"
        ))
        .expect("prefill config")
        .prefill
        .expect("prefill section");
        let decode = tandem_decode::serve(model.clone(), decode, shutdown.clone())
            .await
            .expect("decode node");
        let prefill = tandem_prefill::serve(model.clone(), prefill, shutdown.clone())
            .await
            .expect("prefill node");
        Pair {
            decode,
            prefill: prefill.addr,
            shutdown,
        }
    }

    async fn admit(
        &self,
        id: &str,
        prompt: &[u32],
        sampling: Option<pb::SamplingParams>,
        max_tokens: u32,
    ) -> Result<Admitted, tonic::Status> {
        let mut client = DecodeNodeClient::connect(format!("http://{}", self.decode.grpc_addr))
            .await
            .map_err(|e| tonic::Status::unavailable(e.to_string()))?;
        let request = pb::DecodeRequest {
            request_id: id.into(),
            prompt: prompt.to_vec(),
            sampling: sampling.clone(),
            max_tokens,
            ignore_eos: true,
            kv_timeout_ms: 30_000,
            ..Default::default()
        };
        let mut stream = client.decode(request).await?.into_inner();
        let first = stream.message().await?;
        let Some(pb::DecodeResponse {
            event: Some(Event::Admitted(admitted)),
        }) = first
        else {
            return Err(tonic::Status::internal("the first message is not Admitted"));
        };
        Ok(Admitted {
            stream,
            admitted,
            prompt: prompt.to_vec(),
            sampling,
            id: id.into(),
        })
    }

    async fn finish(&self, mut a: Admitted) -> Result<Outcome> {
        let prefill = match a.admitted.kv_target.clone() {
            Some(target) => {
                let mut client =
                    PrefillNodeClient::connect(format!("http://{}", self.prefill)).await?;
                let request = pb::PrefillRequest {
                    request_id: a.id.clone(),
                    prompt: a.prompt.clone(),
                    sampling: a.sampling.clone(),
                    kv_target: Some(target),
                    ..Default::default()
                };
                Some(tokio::spawn(async move { client.prefill(request).await }))
            }
            None => None,
        };
        let mut tokens = Vec::new();
        loop {
            match a.stream.message().await?.map(|m| m.event) {
                Some(Some(Event::Token(t))) => tokens.extend(t.ids),
                Some(Some(Event::Finished(_))) => break,
                Some(_) => {}
                None => bail!("the stream ended without Finished"),
            }
        }
        let kv_bytes_sent = match prefill {
            Some(call) => call.await?.context("prefill")?.into_inner().kv_bytes_sent,
            None => 0,
        };
        Ok(Outcome {
            tokens,
            cached_blocks: a.admitted.kv_target.as_ref().map_or(0, |t| t.cached_blocks),
            local: a.admitted.local_prefill,
            kv_bytes_sent,
        })
    }

    async fn generate(
        &self,
        id: &str,
        prompt: &[u32],
        sampling: Option<pb::SamplingParams>,
        max_tokens: u32,
    ) -> Result<Outcome> {
        let a = self.admit(id, prompt, sampling, max_tokens).await?;
        self.finish(a).await
    }

    fn skipped_bytes(&self) -> u64 {
        self.decode.stats.lock().unwrap().kv_skipped_bytes_total
    }

    /// The node's stats once they were published with `seqs` sequences on
    /// the node. The engine loop publishes after each iteration, after its
    /// replies and events went out: a client that just got its answer (a
    /// `Finished`, an admission) can read stats from before it.
    async fn stats_with(&self, seqs: u32) -> Result<tandem_decode::scheduler::Stats> {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        loop {
            let stats = self.decode.stats.lock().unwrap().clone();
            if stats.running + stats.queued == seqs {
                return Ok(stats);
            }
            if std::time::Instant::now() > deadline {
                bail!("the node never published {seqs} sequences: {stats:?}");
            }
            tokio::time::sleep(std::time::Duration::from_millis(5)).await;
        }
    }
}

/// Deterministic prompt tokens (the synthesized vocabulary has 512).
fn tokens(seed: u32, n: usize) -> Vec<u32> {
    (0..n as u32)
        .map(|i| 3 + (i.wrapping_mul(2_654_435_761).wrapping_add(seed * 97) >> 7) % 500)
        .collect()
}

fn seeded() -> Option<pb::SamplingParams> {
    Some(pb::SamplingParams {
        temperature: 0.9,
        top_p: 0.95,
        seed: Some(1234),
        ..Default::default()
    })
}

fn shipped(blocks: usize) -> u64 {
    blocks as u64 * BLOCK_BYTES * LAYERS as u64
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cached_prefix_on_the_decode_node_ships_only_the_rest_with_identical_output() -> Result<()>
{
    let (_dir, model) = model();
    // local_prefill_below = 0: every prompt goes through the prefill node.
    let cached = Pair::start(&model, true, 0, 256).await;
    let plain = Pair::start(&model, false, 0, 256).await;
    let base = tokens(1, 22);
    // Extending mid-block (22 -> 27 tokens) and at a block boundary (the
    // first 20 tokens, 5 whole blocks, then 6 more).
    let mid_block: Vec<u32> = base.iter().copied().chain(tokens(2, 5)).collect();
    let boundary: Vec<u32> = base[..20].iter().copied().chain(tokens(3, 6)).collect();
    for (round, (name, sampling)) in [("greedy", None), ("seeded", seeded())]
        .into_iter()
        .enumerate()
    {
        for (i, prompt) in [&base, &mid_block, &boundary].into_iter().enumerate() {
            let id = format!("{name}-{i}");
            let skipped_before = cached.skipped_bytes();
            let with = cached.generate(&id, prompt, sampling.clone(), 10).await?;
            let without = plain.generate(&id, prompt, sampling.clone(), 10).await?;
            assert_eq!(with.tokens, without.tokens, "{id}: output differs");
            assert_eq!(with.tokens.len(), 10);
            assert!(!with.local && !without.local);
            assert_eq!(without.cached_blocks, 0);
            let blocks = prompt.len().div_ceil(BLOCK);
            assert_eq!(without.kv_bytes_sent, shipped(blocks), "{id}");
            // The first prompt finds nothing; the extensions find base's 5
            // full blocks (the block of a prompt's last token is never
            // claimed), and in the second round also their own sixth block,
            // cached by the first round.
            let expected: u32 = match (round, i) {
                (0, 0) => 0,
                (0, _) | (_, 0) => 5,
                _ => 6,
            };
            assert_eq!(with.cached_blocks, expected, "{id}");
            assert_eq!(
                with.kv_bytes_sent,
                shipped(blocks - expected as usize),
                "{id}"
            );
            assert_eq!(
                cached.skipped_bytes() - skipped_before,
                shipped(expected as usize),
                "{id}: tandem_kv_transfer_skipped_bytes_total"
            );
        }
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn second_turn_of_a_chat_ships_only_the_new_turn() -> Result<()> {
    let (_dir, model) = model();
    let cached = Pair::start(&model, true, 0, 256).await;
    let plain = Pair::start(&model, false, 0, 256).await;
    for (name, sampling) in [("greedy", None), ("seeded", seeded())] {
        let turn1 = tokens(if name == "greedy" { 10 } else { 20 }, 17);
        let a1 = cached
            .generate(&format!("{name}-1"), &turn1, sampling.clone(), 9)
            .await?;
        let b1 = plain
            .generate(&format!("{name}-1"), &turn1, sampling.clone(), 9)
            .await?;
        assert_eq!(a1.tokens, b1.tokens);
        // Turn 2: the whole history (prompt, the answer, a new message).
        let mut turn2 = turn1.clone();
        turn2.extend(&a1.tokens);
        turn2.extend(tokens(30, 7));
        let a2 = cached
            .generate(&format!("{name}-2"), &turn2, sampling.clone(), 9)
            .await?;
        let b2 = plain
            .generate(&format!("{name}-2"), &turn2, sampling.clone(), 9)
            .await?;
        assert_eq!(a2.tokens, b2.tokens, "{name}: turn 2 differs");
        // The answer's last token was never fed, so its KV is not cached:
        // the history's full blocks before it are (17 + 9 - 1 = 25 tokens).
        let held = (turn1.len() + a1.tokens.len() - 1) / BLOCK;
        assert_eq!(a2.cached_blocks as usize, held, "{name}");
        let blocks = turn2.len().div_ceil(BLOCK);
        assert_eq!(a2.kv_bytes_sent, shipped(blocks - held));
        assert_eq!(b2.kv_bytes_sent, shipped(blocks));
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_prompt_mostly_cached_here_needs_no_prefill_node() -> Result<()> {
    let (_dir, model) = model();
    // Prompts with fewer than 12 tokens left to compute are prefilled here.
    let cached = Pair::start(&model, true, 12, 256).await;
    let plain = Pair::start(&model, false, 12, 256).await;
    let base = tokens(5, 40);
    let first = cached.generate("first", &base, None, 6).await?;
    assert!(!first.local, "40 uncached tokens go to the prefill node");
    let longer: Vec<u32> = base.iter().copied().chain(tokens(6, 3)).collect();
    let with = cached.generate("longer", &longer, seeded(), 6).await?;
    let without = plain.generate("longer", &longer, seeded(), 6).await?;
    // 40 of 43 tokens cached: 3 left, prefilled locally.
    assert!(
        with.local,
        "a long prompt whose prefix is cached is prefilled here"
    );
    assert!(!without.local, "without the cache it needs a prefill node");
    assert_eq!(with.tokens, without.tokens);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn claimed_blocks_survive_eviction_pressure_before_the_transfer() -> Result<()> {
    let (_dir, model) = model();
    // 64 blocks: the warm-up (22 + 10 tokens) leaves 7 full blocks cached.
    let cached = Pair::start(&model, true, 0, 64).await;
    let plain = Pair::start(&model, false, 0, 64).await;
    let base = tokens(7, 22);
    cached.generate("warm", &base, None, 10).await?;
    let extended: Vec<u32> = base.iter().copied().chain(tokens(8, 5)).collect();
    let claimed = cached.admit("claimed", &extended, None, 10).await?;
    let held = claimed
        .admitted
        .kv_target
        .as_ref()
        .map_or(0, |t| t.cached_blocks);
    assert_eq!(held, 5, "the answer claims base's full blocks");
    // Between the answer and the transfer, a long prompt takes every free
    // block and one of the cached blocks nobody references (the warm-up's 2
    // blocks holding generated tokens): the claimed ones are not evicted.
    // It leaves one block for the claimed request to grow into, and the next
    // request is refused: one more block would leave none for each
    // sequence here.
    let before = cached.stats_with(1).await?;
    assert_eq!(before.prefix_cache_blocks, 7, "{before:?}");
    let long = before.kv_blocks_free as usize - 1;
    let flood = cached
        .admit("flood", &tokens(100, long * BLOCK), None, 4)
        .await?;
    let stats = cached.stats_with(2).await?;
    assert_eq!(
        (stats.kv_blocks_free, stats.prefix_cache_blocks),
        (1, 6),
        "one unreferenced cached block evicted: {stats:?}"
    );
    let refused = cached.admit("one more", &tokens(101, 4), None, 4).await;
    let refused = refused
        .err()
        .context("the node kept no block to grow into")?;
    assert_eq!(refused.code(), tonic::Code::ResourceExhausted);
    assert!(refused.message().contains("to grow"), "{refused:?}");
    // The long prompt's caller goes away, and its blocks come back.
    drop(flood);
    // The claimed blocks are still the request's: the transfer fills the rest.
    let with = cached.finish(claimed).await?;
    let without = plain.generate("claimed", &extended, None, 10).await?;
    assert_eq!(with.tokens, without.tokens, "output corrupted by eviction");
    assert_eq!(
        with.kv_bytes_sent,
        shipped(extended.len().div_ceil(BLOCK) - 5)
    );
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    loop {
        let free = cached.decode.stats.lock().unwrap().kv_blocks_free;
        if free == 64 {
            break;
        }
        if std::time::Instant::now() > deadline {
            bail!("blocks leaked: {free} of 64 free");
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_frame_for_a_held_block_fails_the_request_and_frees_its_blocks() -> Result<()> {
    use tandem_kv_transfer::tls::client_config_trusting;
    use tandem_kv_transfer::{KvSender, LayerShape, WireDtype};

    let (_dir, model) = model();
    let node = Pair::start(&model, true, 0, 64).await;
    let base = tokens(9, 22);
    node.generate("warm", &base, None, 4).await?;
    let free_idle = node.stats_with(0).await?.kv_blocks_free;
    let mut a = node.admit("liar", &base, None, 4).await?;
    let target = a.admitted.kv_target.clone().context("a KV target")?;
    assert_eq!(target.cached_blocks, 5);
    // A sender that ignores cached_blocks and ships block 0.
    let cert = rustls::pki_types::CertificateDer::from(target.server_cert_der.clone());
    let sender =
        KvSender::connect(target.quic_addr.parse()?, client_config_trusting(&cert)?, 1).await?;
    let mut stream = sender.open_request(target.transfer_id).await?;
    let shape = LayerShape {
        layer: 0,
        first_block: 0,
        block_count: 1,
        dtype: WireDtype::F32,
        head_start: 0,
        head_count: 2,
        total_heads: 2,
        head_dim: 16,
        block_size: BLOCK as u16,
    };
    stream
        .send_layer(shape, bytes::Bytes::from(vec![0u8; BLOCK_BYTES as usize]))
        .await?;
    let status = loop {
        match a.stream.message().await {
            Err(status) => break status,
            Ok(Some(_)) => continue,
            Ok(None) => bail!("the stream ended without an error"),
        }
    };
    assert_eq!(status.code(), tonic::Code::Unavailable, "{status}");
    assert!(status.message().contains("held"), "{status}");
    // The engine loop released the request's blocks (and its reservation).
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while node.decode.stats.lock().unwrap().kv_blocks_free != free_idle {
        if std::time::Instant::now() > deadline {
            let stats = node.decode.stats.lock().unwrap().clone();
            bail!(
                "the refused request's blocks were not freed: {free_idle} free before it, now {stats:?}"
            );
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    Ok(())
}
