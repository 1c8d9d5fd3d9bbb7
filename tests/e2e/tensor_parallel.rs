//! KV transfer between nodes of different tensor-parallel sizes: a router, a
//! prefill node and a decode node on loopback over real gRPC and QUIC, each
//! prefill rank shipping its own KV heads and the decode node's ranks taking
//! theirs. The greedy output equals TP=1 → TP=1 (the single-process engine).

use std::time::{Duration, Instant};

use tandem_proto::v1 as pb;
use tandem_tests::*;

async fn same_output_as_tp1(prefill_tp: usize, decode_tp: usize) {
    let (_dir, model) = small_model();
    let mut spec = ClusterSpec::default();
    spec.prefill.as_mut().expect("prefill").tp = prefill_tp;
    spec.decode.tp = decode_tp;
    let cluster = Cluster::start(model.clone(), spec).await;
    let mut client = cluster.client().await;
    // Above the local-prefill threshold (8), across blocks and prefill chunks (64).
    for (i, &len) in [9, 16, 17, 40, 65, 130].iter().enumerate() {
        let p = prompt(len, i as u32);
        let expected = reference(&model, &p, 10);
        let got = complete(&mut client, greedy_request(&p, 10))
            .await
            .expect("generate");
        assert_eq!(
            got.tokens, expected,
            "prefill TP={prefill_tp} -> decode TP={decode_tp}, prompt of {len} tokens"
        );
        assert_eq!(got.reason, pb::FinishReason::Length);
    }
    assert_eq!(cluster.prefill_load().await.tp_size, prefill_tp as u32);
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let (free, total) = cluster.decode_blocks();
        if free == total && total > 0 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "leaked blocks: {free} of {total}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn prefill_tp2_feeds_decode_tp1() {
    same_output_as_tp1(2, 1).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn prefill_tp1_feeds_decode_tp2() {
    same_output_as_tp1(1, 2).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn prefill_tp4_with_replicated_kv_heads_feeds_decode_tp2() {
    // The test model has 2 KV heads: at TP=4 each lives on two ranks and ships once.
    same_output_as_tp1(4, 2).await;
}
