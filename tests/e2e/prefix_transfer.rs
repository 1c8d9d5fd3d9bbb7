//! A multi-turn chat through the whole cluster (router, prefill node, decode
//! node on loopback): the second turn's prompt, the whole history, finds the
//! first turn's blocks in the decode node's prefix cache, so the prefill node
//! ships only the new turn's blocks, and the output is token for token the
//! output of a cluster whose decode node caches nothing.

use tandem_proto::v1 as pb;
use tandem_tests::*;

fn prompt(seed: u32, n: usize) -> Vec<u32> {
    (0..n as u32)
        .map(|i| 3 + (i.wrapping_mul(2_654_435_761).wrapping_add(seed * 131) >> 9) % 400)
        .collect()
}

async fn cluster(decode_cache: bool) -> (tempfile::TempDir, Cluster) {
    let (dir, model) = small_model();
    let mut spec = ClusterSpec::default();
    spec.decode.prefix_cache = decode_cache;
    (dir, Cluster::start(model, spec).await)
}

fn skipped(c: &Cluster) -> u64 {
    c.decode_stats.lock().expect("stats").kv_skipped_bytes_total
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_second_turn_ships_only_its_new_blocks_through_the_router() {
    let (_a, cached) = cluster(true).await;
    let (_b, plain) = cluster(false).await;
    let seeded = pb::SamplingParams {
        temperature: 0.8,
        seed: Some(99),
        ..Default::default()
    };
    for (seed, sampling) in [(1, None), (2, Some(seeded))] {
        let turn1 = prompt(seed, 70);
        let mut request = greedy_request(&turn1, 12);
        request.sampling = sampling.clone();
        let a1 = complete(&mut cached.client().await, request.clone())
            .await
            .expect("turn 1");
        let b1 = complete(&mut plain.client().await, request)
            .await
            .expect("turn 1");
        assert_eq!(a1.tokens, b1.tokens);
        let mut turn2 = turn1.clone();
        turn2.extend(&a1.tokens);
        turn2.extend(prompt(seed + 10, 30));
        let mut request = greedy_request(&turn2, 12);
        request.sampling = sampling;
        let before = skipped(&cached);
        let a2 = complete(&mut cached.client().await, request.clone())
            .await
            .expect("turn 2");
        let b2 = complete(&mut plain.client().await, request)
            .await
            .expect("turn 2");
        assert_eq!(a2.tokens, b2.tokens, "turn 2 differs with the cache");
        // 16-token blocks: 70 + 12 - 1 = 81 tokens of history have KV on the
        // decode node (the answer's last token was never fed), 5 full
        // blocks, not shipped. A block of the small model's KV: 3 layers x
        // K and V x 2 heads x 16 slots x 16 dims x 4 bytes = 12288 bytes.
        assert_eq!(skipped(&cached) - before, 5 * 12288);
    }
    assert_eq!(skipped(&plain), 0);
}
