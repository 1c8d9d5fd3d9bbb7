//! `n` > 1 and `best_of` through the whole cluster with a real model
//! (SmolLM2-135M-Instruct, GGUF): parallel samples over the OpenAI API (the
//! official `openai` Python client) and gRPC, the prompt's KV shipped once
//! (the decode node's counters), refusals, and a cancelled `n = 4` stream
//! leaving no KV block held; vLLM's beam search (`use_beam_search`, `n`
//! beams) against the same algorithm over the engine's own logits.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use serde_json::Value;
use tandem_engine::ModelDir;
use tandem_proto::v1 as pb;
use tandem_tests::*;

fn smollm2() -> Arc<ModelDir> {
    let path = std::env::var_os("TANDEM_SMOLLM2_GGUF")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            Path::new(env!("CARGO_MANIFEST_DIR")).join("../models/SmolLM2-135M-Instruct.Q4_1.gguf")
        });
    assert!(
        path.is_file(),
        "{} is missing: run `cargo run -- model fetch smollm2` (scripts/test.sh does)",
        path.display()
    );
    Arc::new(ModelDir::open(&path).expect("open SmolLM2"))
}

/// A seeded request for `n` samples of `prompt` at temperature 0.8.
fn sampled(prompt: &[u32], n: u32, max_tokens: u32) -> pb::GenerateRequest {
    let mut r = greedy_request(prompt, max_tokens);
    r.sampling = Some(pb::SamplingParams {
        temperature: 0.8,
        seed: Some(77),
        ..Default::default()
    });
    r.n = n;
    r
}

/// Each sample's tokens and final message, by index.
async fn samples(
    client: &mut pb::generate_client::GenerateClient<tonic::transport::Channel>,
    request: pb::GenerateRequest,
) -> Result<BTreeMap<u32, (Vec<u32>, Option<pb::Finished>)>, tonic::Status> {
    let mut stream = client.generate(request).await?.into_inner();
    let mut out: BTreeMap<u32, (Vec<u32>, Option<pb::Finished>)> = BTreeMap::new();
    while let Some(msg) = stream.message().await? {
        let entry = out.entry(msg.index).or_default();
        match msg.event {
            Some(pb::generate_response::Event::Token(t)) => {
                assert!(
                    entry.1.is_none(),
                    "a token after sample {}'s Finished",
                    msg.index
                );
                entry.0.extend(t.ids);
            }
            Some(pb::generate_response::Event::Finished(f)) => entry.1 = Some(f),
            Some(pb::generate_response::Event::PromptLogprobs(_)) | None => {}
        }
    }
    Ok(out)
}

/// The decode node's counters: KV bytes received, prompt tokens it
/// prefilled itself (with their cached part), and prompt tokens it found cached.
fn decode_counters(c: &Cluster) -> (u64, u64, u64) {
    let s = c.decode_stats.lock().expect("stats");
    (
        s.kv_received_bytes_total,
        s.local_prompt_tokens_total,
        s.cached_tokens_total,
    )
}

async fn wait_all_blocks_free(c: &Cluster) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let (free, total) = c.decode_blocks();
        if free == total {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "decode node still holds {} of {total} KV blocks",
            total - free
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn n_samples_share_the_prompt_kv_over_grpc_and_the_openai_client() {
    let model = smollm2();
    let mut spec = ClusterSpec::default();
    spec.router.http_listen = Some("127.0.0.1:0".parse().unwrap());
    let cluster = Cluster::start(model.clone(), spec).await;
    let mut client = cluster.client().await;

    // The prompt's KV crosses QUIC once: an n = 3 request receives as many
    // KV bytes as an n = 1 request of the same length; its two later samples
    // claim the prompt's 4 full 16-token blocks from the decode node's cache
    // and compute only the 6 tokens after them.
    let (b0, l0, _) = decode_counters(&cluster);
    let one = samples(&mut client, sampled(&prompt(70, 1), 1, 6))
        .await
        .expect("n = 1");
    assert_eq!(one.keys().copied().collect::<Vec<_>>(), [0]);
    let (b1, l1, c1) = decode_counters(&cluster);
    assert!(b1 > b0, "the prompt's KV came from the prefill node");
    assert_eq!(l1, l0, "nothing prefilled on the decode node");
    let three = samples(&mut client, sampled(&prompt(70, 2), 3, 6))
        .await
        .expect("n = 3");
    let (b3, l3, c3) = decode_counters(&cluster);
    assert_eq!(b3 - b1, b1 - b0, "the n = 3 prompt's KV was shipped once");
    assert_eq!(c3 - c1, 2 * 64, "two samples claimed the 4 cached blocks");
    assert_eq!((l3 - l1) - (c3 - c1), 2 * 6, "and computed 6 tokens each");

    // gRPC: indices 0..3, each finished with its usage; distinct samples,
    // the same again on a repeat call.
    assert_eq!(three.keys().copied().collect::<Vec<_>>(), [0, 1, 2]);
    for (tokens, finished) in three.values() {
        let f = finished.as_ref().expect("each sample finishes");
        let usage = f.usage.expect("usage");
        assert_eq!(usage.prompt_tokens, 70);
        assert_eq!(usage.completion_tokens as usize, tokens.len());
        assert_eq!(tokens.len(), 6);
    }
    let texts: Vec<&Vec<u32>> = three.values().map(|(t, _)| t).collect();
    assert!(
        texts[0] != texts[1] && texts[1] != texts[2] && texts[0] != texts[2],
        "{texts:?}"
    );
    let again = samples(&mut client, sampled(&prompt(70, 2), 3, 6))
        .await
        .expect("n = 3 again");
    assert_eq!(
        again.values().map(|(t, _)| t).collect::<Vec<_>>(),
        texts,
        "seeded samples are reproducible"
    );

    // Too many samples: INVALID_ARGUMENT naming n; the next request is served.
    let status = samples(&mut client, sampled(&prompt(20, 3), 17, 4))
        .await
        .expect_err("n = 17");
    assert_eq!(status.code(), tonic::Code::InvalidArgument);
    assert!(
        status.message().starts_with("n = 17"),
        "{}",
        status.message()
    );
    complete(&mut client, greedy_request(&prompt(20, 3), 2))
        .await
        .expect("served after the refusal");

    // The official client: n, streamed and not, best_of, refusals.
    let base = format!("http://{}/v1", cluster.http.expect("HTTP API"));
    let name = model.name();
    let seen = run_client_script("nbest_client.py", vec![base, name]).await;
    let three_distinct = |v: &Value, what: &str| {
        assert_eq!(v["indices"], serde_json::json!([0, 1, 2]), "{what}: {v}");
        let t = v["texts"].as_array().expect("texts");
        assert!(t[0] != t[1] && t[1] != t[2] && t[0] != t[2], "{what}: {v}");
    };
    for what in ["n3", "n3_stream", "chat_n3", "chat_n3_stream"] {
        three_distinct(&seen[what], what);
    }
    // Reproducible: each call repeats the same seeded samples.
    assert_eq!(
        seen["n3"]["texts"], seen["n3_stream"]["texts"],
        "streamed = not streamed"
    );
    assert_eq!(seen["n3"]["texts"], seen["n3_logprobs"]["texts"]);
    assert_eq!(seen["chat_n3"]["texts"], seen["chat_n3_stream"]["texts"]);
    // Usage: the prompt once, every choice's tokens.
    let usage = &seen["n3"]["usage"];
    assert_eq!(usage["completion"], 24, "{usage}");
    assert_eq!(seen["n3_stream"]["usage"], *usage);
    // Streamed chunks are interleaved: some choice's chunk comes between
    // two of another's.
    let order: Vec<u64> = seen["n3_stream"]["order"]
        .as_array()
        .expect("order")
        .iter()
        .filter_map(Value::as_u64)
        .collect();
    assert!(
        order.windows(2).filter(|w| w[0] != w[1]).count() > 2,
        "{order:?}"
    );
    // best_of = 3, n = 1: the one of the three samples (the same seeds as
    // n = 3) with the highest cumulative log probability.
    let sums: Vec<f64> = seen["n3_logprobs"]["sums"]
        .as_array()
        .expect("sums")
        .iter()
        .map(|v| v.as_f64().expect("a sum"))
        .collect();
    let best = (0..3)
        .max_by(|&a, &b| sums[a].total_cmp(&sums[b]).then(b.cmp(&a)))
        .expect("three");
    assert_eq!(seen["best_of3"]["indices"], serde_json::json!([0]));
    assert_eq!(
        seen["best_of3"]["texts"][0],
        seen["n3_logprobs"]["texts"][best]
    );
    assert_eq!(
        seen["best_of3"]["sums"][0],
        Value::Null,
        "logprobs not asked"
    );
    assert_eq!(seen["best_of3"]["usage"]["completion"], 8);
    for (name, param) in [
        ("n_too_large", "n"),
        ("best_of_below_n", "best_of"),
        ("best_of_too_large", "best_of"),
        ("stream_best_of", "best_of"),
        ("chat_n_too_large", "n"),
    ] {
        let e = &seen["errors"][name];
        assert_eq!(e["status"], 400, "{name}: {e}");
        assert_eq!(e["param"], param, "{name}: {e}");
    }
    assert_eq!(seen["after_errors"]["indices"], serde_json::json!([0, 1]));

    // A cancelled n = 4 stream: every sample's blocks come back.
    wait_all_blocks_free(&cluster).await;
    let mut stream = client
        .generate(sampled(&prompt(70, 4), 4, 200))
        .await
        .expect("n = 4")
        .into_inner();
    let mut started = std::collections::BTreeSet::new();
    while started.len() < 4 {
        let msg = stream.message().await.expect("stream").expect("a message");
        started.insert(msg.index);
    }
    let (free, total) = cluster.decode_blocks();
    assert!(free < total, "the four samples hold blocks");
    drop(stream);
    wait_all_blocks_free(&cluster).await;
    let load = cluster.prefill_load().await;
    assert_eq!(
        load.kv_blocks_free, load.kv_blocks_total,
        "prefill KV freed"
    );
    complete(&mut client, greedy_request(&prompt(20, 5), 2))
        .await
        .expect("served after the cancel");
}

/// vLLM's beam search written out plainly over the engine's own logits on the
/// CPU (the oracle): `width` beams, each step reading every beam's `2 · width`
/// most likely next tokens (lower id first on ties), a continuation by EOS a
/// finished beam; the best `width` by log probability over the length
/// (prompt included, EOS not) to the power `length_penalty`. Each beam's
/// tokens as the API returns them (its EOS left out) and whether it ended
/// with EOS.
fn oracle_beams(
    model: &ModelDir,
    prompt: &[u32],
    width: usize,
    max_tokens: usize,
    length_penalty: f64,
) -> Vec<(Vec<u32>, bool)> {
    use tandem_engine::BackendExt;
    let mut backend = model.load_cpu(64, 16).expect("backend");
    let mut next = |tokens: &[u32]| -> Vec<(u32, f64)> {
        let table: Vec<u32> = (0..tokens.len().div_ceil(16) as u32).collect();
        let lp = log_softmax(&backend.prefill(tokens, 0, &table).expect("prefill"));
        let mut ids: Vec<u32> = (0..lp.len() as u32).collect();
        ids.sort_by(|&a, &b| lp[b as usize].total_cmp(&lp[a as usize]).then(a.cmp(&b)));
        ids.truncate(2 * width);
        ids.into_iter().map(|t| (t, lp[t as usize])).collect()
    };
    let eos = &model.config.eos_token_ids;
    let mut live: Vec<(Vec<u32>, f64)> = vec![(Vec::new(), 0.0)];
    let mut done: Vec<(Vec<u32>, f64, bool)> = Vec::new();
    for _ in 0..max_tokens {
        let mut continued = Vec::new();
        for (tokens, sum) in &live {
            for (t, lp) in next(&[prompt, tokens].concat()) {
                let longer = [tokens.as_slice(), &[t]].concat();
                if eos.contains(&t) {
                    done.push((longer, sum + lp, true));
                } else {
                    continued.push((longer, sum + lp));
                }
            }
        }
        continued.sort_by(|a, b| b.1.total_cmp(&a.1));
        continued.truncate(width);
        live = continued;
        if live.is_empty() {
            break;
        }
    }
    done.extend(live.into_iter().map(|(t, s)| (t, s, false)));
    let score = |(t, s, eos): &(Vec<u32>, f64, bool)| {
        s / ((prompt.len() + t.len() - usize::from(*eos)) as f64).powf(length_penalty)
    };
    done.sort_by(|a, b| score(b).total_cmp(&score(a)));
    done.truncate(width);
    done.into_iter()
        .map(|(t, _, eos)| (t[..t.len() - usize::from(eos)].to_vec(), eos))
        .collect()
}

/// A JSON list of token-id lists.
fn id_lists(v: &Value) -> Vec<Vec<u32>> {
    serde_json::from_value(v.clone()).expect("lists of token ids")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn beam_search_over_the_openai_client_matches_vllms_algorithm() {
    let model = smollm2();
    let mut spec = ClusterSpec::default();
    spec.router.http_listen = Some("127.0.0.1:0".parse().unwrap());
    let cluster = Cluster::start(model.clone(), spec).await;
    let base = format!("http://{}/v1", cluster.http.expect("HTTP API"));
    let seen = run_client_script("beam_client.py", vec![base, model.name()]).await;

    let prompt: Vec<u32> = serde_json::from_value(seen["n3"]["prompt_ids"].clone()).unwrap();
    assert_eq!(
        prompt,
        model
            .tokenizer
            .encode("The capital of France is", true)
            .unwrap()
    );
    for (case, width, length_penalty) in [("n3", 3, 1.0), ("n2_lp0", 2, 0.0), ("n1", 1, 1.0)] {
        let got = &seen[case];
        let oracle = oracle_beams(&model, &prompt, width, 6, length_penalty);
        let ids = id_lists(&got["ids"]);
        let expected: Vec<Vec<u32>> = oracle.iter().map(|(t, _)| t.clone()).collect();
        assert_eq!(ids, expected, "{case}: {got}");
        let indices: Vec<usize> = (0..width).collect();
        assert_eq!(got["indices"], serde_json::json!(indices), "{case}: {got}");
        for (i, (tokens, eos)) in oracle.iter().enumerate() {
            let text = generated_text(&model, tokens);
            assert_eq!(got["texts"][i], text.as_str(), "{case} beam {i}: {got}");
            let reason = if *eos { "stop" } else { "length" };
            assert_eq!(got["finish"][i], reason, "{case} beam {i}: {tokens:?}");
        }
        assert_eq!(got["usage"]["prompt"], prompt.len(), "{case}: {got}");
        let completion: usize = expected.iter().map(Vec::len).sum();
        assert_eq!(got["usage"]["completion"], completion, "{case}: {got}");
    }
    // A batch: prompt p's beams are choices 2p, 2p + 1.
    let batch = &seen["batch"];
    assert_eq!(batch["indices"], serde_json::json!([0, 1, 2, 3]), "{batch}");
    let (ids, prompts) = (id_lists(&batch["ids"]), id_lists(&batch["prompt_ids"]));
    let mut completion = 0;
    for p in 0..2 {
        assert_eq!(prompts[2 * p], prompts[2 * p + 1], "{batch}");
        let beams: Vec<Vec<u32>> = oracle_beams(&model, &prompts[2 * p], 2, 4, 1.0)
            .into_iter()
            .map(|(t, _)| t)
            .collect();
        assert_eq!(ids[2 * p..2 * p + 2], beams, "prompt {p}: {batch}");
        completion += beams.iter().map(Vec::len).sum::<usize>();
    }
    assert_eq!(prompts[0], prompt);
    assert_eq!(batch["usage"]["completion"], completion, "{batch}");
    // temperature and seed change nothing; streamed, the same choices.
    assert_eq!(seen["n3_hot"]["ids"], seen["n3"]["ids"]);
    assert_eq!(seen["n3_stream"]["texts"], seen["n3"]["texts"]);
    assert_eq!(seen["n3_stream"]["finish"], seen["n3"]["finish"]);
    assert_eq!(seen["n3_stream"]["usage"], seen["n3"]["usage"]);

    // Chat: the rendered prompt's beams.
    let chat = &seen["chat_n2"];
    let chat_prompt: Vec<u32> = serde_json::from_value(chat["prompt_ids"].clone()).unwrap();
    let oracle = oracle_beams(&model, &chat_prompt, 2, 5, 1.0);
    let expected: Vec<Vec<u32>> = oracle.into_iter().map(|(t, _)| t).collect();
    assert_eq!(id_lists(&chat["ids"]), expected, "{chat}");
    for (i, ids) in expected.iter().enumerate() {
        let text = generated_text(&model, ids);
        assert_eq!(chat["texts"][i], text.as_str(), "{chat}");
    }

    // Each refusal names the field it was sent for.
    for field in [
        "top_p",
        "logprobs",
        "stop",
        "n",
        "best_of",
        "length_penalty",
        "tools",
    ] {
        let e = &seen["refused"][field];
        assert_eq!(e["status"], 400, "{field}: {e}");
        assert_eq!(e["param"], field, "{field}: {e}");
    }
    assert_eq!(seen["next_tokens"], 2);
    // Every step's request released its blocks.
    wait_all_blocks_free(&cluster).await;

    // A client that goes away ends its search: no step is asked after it.
    use tokio::io::AsyncWriteExt;
    let activity = || {
        let (received, local, _) = decode_counters(&cluster);
        received + local
    };
    let body = serde_json::json!({"prompt": "The capital of France is", "n": 4,
        "max_tokens": 300, "use_beam_search": true})
    .to_string();
    let mut conn = tokio::net::TcpStream::connect(cluster.http.expect("HTTP API"))
        .await
        .expect("connect");
    let head = format!(
        "POST /v1/completions HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n",
        body.len()
    );
    conn.write_all(format!("{head}{body}").as_bytes())
        .await
        .expect("send");
    let before = activity();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while activity() < before + 1000 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the beam search's steps run"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    drop(conn);
    tokio::time::sleep(Duration::from_secs(1)).await;
    let after_close = activity();
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(
        activity(),
        after_close,
        "steps went on after the client left"
    );
    wait_all_blocks_free(&cluster).await;
}
