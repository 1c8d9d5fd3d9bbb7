//! KV dtypes across nodes. bf16 (`kv_dtype = "bf16"`, a CUDA node's own
//! dtype, here on the CPU backend): two bf16 nodes ship bf16 KV and decode
//! it exactly as one process's bf16 cache, and a bf16 prefill node refuses an
//! f32 decode node's target. FP8 (e4m3): an f32 prefill node feeds an fp8 decode
//! node (the decode node quantizes the arriving KV on import, with the rule
//! its cache applies to KV it computes: so the output equals an fp8 run in
//! one process exactly), and an fp8 prefill node paired with an f32 decode
//! node is refused at the prefill node's admission with FAILED_PRECONDITION
//! naming both dtypes (the router then prefills on the decode node, and no
//! block stays taken).

use std::time::{Duration, Instant};

use tandem_cluster::KvCacheDtype;
use tandem_engine::KvDtype;
use tandem_engine::cpu::{CpuBackend, CpuModel};
use tandem_engine::local::LocalGenerator;
use tandem_proto::v1 as pb;
use tandem_proto::v1::prefill_node_client::PrefillNodeClient;
use tandem_tests::{
    Cluster, ClusterSpec, complete, greedy_request, prompt, reference, small_model,
};

/// Greedy continuation in one process with the cache in `dtype`.
fn reference_in(
    model: &tandem_engine::ModelDir,
    p: &[u32],
    max: usize,
    dtype: KvDtype,
) -> Vec<u32> {
    let weights = model.weights().expect("weights");
    let backend = CpuBackend::with_kv_dtype(
        CpuModel::load(&model.config, &weights).expect("model"),
        256,
        16,
        dtype,
    )
    .expect("backend");
    let params = tandem_engine::GenerationParams {
        max_tokens: max,
        ignore_eos: true,
        ..Default::default()
    };
    LocalGenerator::new(backend)
        .generate(p, &params, &model.tokenizer, |_| {})
        .expect("reference generation")
        .tokens
}

/// Asks the cluster's prefill node, whose cache holds `ours`, to ship to an
/// f32 cache: refused at admission with FAILED_PRECONDITION naming both dtypes.
async fn refused_f32_target(cluster: &Cluster, model: &tandem_engine::ModelDir, ours: &str) {
    let c = &model.config;
    let target = pb::KvTarget {
        quic_addr: cluster.decode_quic.to_string(),
        server_name: "localhost".into(),
        num_blocks: 8,
        block_size: 16,
        num_layers: c.num_layers as u32,
        num_kv_heads: c.num_kv_heads as u32,
        head_dim: c.head_dim as u32,
        dtype: pb::KvDtype::F32 as i32,
        transfer_id: 1,
        ..Default::default()
    };
    let addr = cluster.prefill_grpc.expect("a prefill node");
    let mut prefill = PrefillNodeClient::connect(format!("http://{addr}"))
        .await
        .expect("connect prefill node");
    let err = prefill
        .prefill(pb::PrefillRequest {
            request_id: format!("{ours}-to-f32"),
            prompt: prompt(100, 1),
            kv_target: Some(target),
            ..Default::default()
        })
        .await
        .expect_err("the pairing is refused");
    assert_eq!(err.code(), tonic::Code::FailedPrecondition, "{err:?}");
    let m = err.message();
    assert!(m.contains(ours) && m.contains("f32"), "{m}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_f32_prefill_node_feeds_an_fp8_decode_node() {
    let (_dir, model) = small_model();
    let mut spec = ClusterSpec::default();
    spec.decode.kv_dtype = KvCacheDtype::Fp8E4m3;
    let cluster = Cluster::start(model.clone(), spec).await;
    let mut client = cluster.client().await;
    let (mut same, mut total) = (0, 0);
    for salt in 0..3 {
        let p = prompt(90 + 17 * salt as usize, salt);
        let got = complete(&mut client, greedy_request(&p, 12))
            .await
            .expect("the request completes");
        let fp8 = reference_in(&model, &p, 12, KvDtype::Fp8E4m3);
        assert_eq!(
            got.tokens, fp8,
            "imported-and-quantized KV decodes as a local fp8 cache"
        );
        let f32_tokens = reference(&model, &p, 12);
        same += f32_tokens
            .iter()
            .zip(&got.tokens)
            .filter(|(a, b)| a == b)
            .count();
        total += f32_tokens.len();
    }
    let received = cluster
        .decode_stats
        .lock()
        .expect("stats")
        .kv_received_bytes_total;
    assert!(received > 0, "the KV came from the prefill node");
    println!(
        "f32 prefill -> fp8 decode: {same}/{total} greedy tokens identical to an f32 cache ({:.1}%)",
        100.0 * same as f64 / total as f64
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_fp8_prefill_node_is_refused_by_an_f32_decode_node() {
    let (_dir, model) = small_model();
    let mut spec = ClusterSpec::default();
    if let Some(p) = spec.prefill.as_mut() {
        p.kv_dtype = KvCacheDtype::Fp8E4m3;
    }
    let cluster = Cluster::start(model.clone(), spec).await;
    // The prefill node refuses the f32 decode node's target at admission,
    // naming both dtypes.
    refused_f32_target(&cluster, &model, "fp8_e4m3").await;
    // Through the router the refusal is a pairing failure, not the
    // client's: the router prefills on the decode node instead, the answer is
    // the f32 one, and the decode node's blocks are all free afterwards.
    let mut client = cluster.client().await;
    let p = prompt(100, 1);
    let got = complete(&mut client, greedy_request(&p, 8))
        .await
        .expect("the router falls back to a local prefill");
    assert_eq!(got.tokens, reference(&model, &p, 8));
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let (free, total) = cluster.decode_blocks();
        if free == total && total > 0 {
            break;
        }
        assert!(Instant::now() < deadline, "{free} of {total} blocks free");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Both nodes' caches in `dtype`: a 100-token prompt's KV crosses QUIC as
/// `dtype`, imported byte for byte, and decodes exactly as one process's
/// cache of that dtype; 7 blocks x the layers of `block(config)` bytes arrive.
/// Returns the cluster for more checks.
async fn same_dtype_nodes(
    cache: KvCacheDtype,
    dtype: KvDtype,
    salt: u32,
    block: impl Fn(&tandem_engine::ModelConfig) -> usize,
) -> (
    tempfile::TempDir,
    std::sync::Arc<tandem_engine::ModelDir>,
    Cluster,
) {
    let (dir, model) = small_model();
    let mut spec = ClusterSpec::default();
    spec.decode.kv_dtype = cache;
    if let Some(p) = spec.prefill.as_mut() {
        p.kv_dtype = cache;
        p.prefix_cache = false;
    }
    let cluster = Cluster::start(model.clone(), spec).await;
    let mut client = cluster.client().await;
    let p = prompt(100, salt);
    let got = complete(&mut client, greedy_request(&p, 12))
        .await
        .expect("the request completes");
    assert_eq!(got.tokens, reference_in(&model, &p, 12, dtype));
    let c = &model.config;
    let received = cluster
        .decode_stats
        .lock()
        .expect("stats")
        .kv_received_bytes_total;
    assert_eq!(received, (7 * c.num_layers * block(c)) as u64);
    (dir, model, cluster)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fp8_nodes_ship_fp8_kv_and_decode_it_exactly() {
    // The prefill node's quantized KV, shipped with its scales: per block
    // and head, 16 slots of e4m3 values and one f32 scale, for K and V.
    same_dtype_nodes(KvCacheDtype::Fp8E4m3, KvDtype::Fp8E4m3, 3, |c| {
        2 * c.num_kv_heads * (16 * c.head_dim + 4)
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bf16_nodes_ship_bf16_kv_and_decode_it_exactly() {
    // K/V rounded to bf16 once, on the prefill node: K and V, 2 bytes a value.
    let (_dir, model, cluster) = same_dtype_nodes(KvCacheDtype::Bf16, KvDtype::Bf16, 4, |c| {
        2 * c.num_kv_heads * 16 * c.head_dim * 2
    })
    .await;
    // An f32 decode node's target is refused at the bf16 prefill node's
    // admission, naming both dtypes (bf16 KV is not widened on import).
    refused_f32_target(&cluster, &model, "bf16").await;
}
