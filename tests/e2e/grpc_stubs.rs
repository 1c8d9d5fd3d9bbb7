//! The gRPC API driven by Python stubs that grpcio-tools generates from
//! `proto/` (installed by scripts/test.sh), against a real cluster on loopback:
//! what a client outside the project sees.

use tandem_tests::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn stubs_generated_from_the_proto_work_against_the_router() {
    let (_dir, model) = small_model();
    let cluster = Cluster::start(model.clone(), ClusterSpec::default()).await;
    let proto = format!("{}/../proto/proto", env!("CARGO_MANIFEST_DIR"));
    let seen = run_client_script(
        "grpc_client.py",
        vec![
            cluster.router.to_string(),
            proto,
            model.config.vocab_size.to_string(),
        ],
    )
    .await;

    // Greedy text over the stubs is the engine's own, by text and by token ids.
    let prompt = model.tokenizer.encode("Once upon a time", true).unwrap();
    let greedy = reference(&model, &prompt, 8);
    let g = &seen["greedy"];
    assert_eq!(g["ids"], serde_json::json!(greedy), "{g}");
    assert_eq!(g["text"], generated_text(&model, &greedy).as_str(), "{g}");
    assert_eq!(g["finished"]["reason"], "FINISH_REASON_LENGTH", "{g}");
    assert_eq!(g["finished"]["prompt_tokens"], prompt.len(), "{g}");
    assert_eq!(g["finished"]["completion_tokens"], 8, "{g}");
    let by_ids = &seen["by_ids"];
    assert_eq!(
        by_ids["ids"],
        serde_json::json!(reference(&model, &greedy[..3], 4)),
        "{by_ids}"
    );
    assert_eq!(seen["logprobs_ok"], true);
    // The prompt's log probabilities: one message before the first token, one
    // entry per prompt token after the first, each the engine's own.
    let p = &seen["prompt_logprobs"]["prompt_logprobs"];
    assert_eq!(p["before_tokens"], true, "{p}");
    assert_eq!(p["first_id"], prompt[0], "{p}");
    let entries = p["tokens"].as_array().unwrap();
    let want = reference_prompt_logprobs(&model, &prompt);
    assert_eq!(entries.len(), prompt.len() - 1, "{p}");
    for (i, (e, w)) in entries.iter().zip(&want).enumerate() {
        assert_eq!(e["id"], prompt[i + 1], "{p}");
        let got = e["logprob"].as_f64().unwrap();
        assert!(
            (got - w[prompt[i + 1] as usize]).abs() < 1e-4,
            "position {i}: {p}"
        );
        assert!(e["rank"].as_u64().unwrap() >= 1, "{p}");
        assert_eq!(e["top"].as_array().unwrap().len(), 2, "{p}");
    }
    // Bad input: the right status code, a message that says what is wrong.
    for (case, code, word) in [
        ("token_outside_vocab", "INVALID_ARGUMENT", "vocabulary"),
        ("too_many_logprobs", "INVALID_ARGUMENT", "logprobs"),
        (
            "too_many_prompt_logprobs",
            "INVALID_ARGUMENT",
            "prompt_logprobs",
        ),
        ("no_prompt", "INVALID_ARGUMENT", "prompt"),
        ("unknown_model", "NOT_FOUND", "no-such-model"),
        ("negative_temperature", "INVALID_ARGUMENT", "temperature"),
        ("empty_cache_salt", "INVALID_ARGUMENT", "cache_salt"),
    ] {
        let e = &seen["bad"][case]["error"];
        assert_eq!(e["code"], code, "{case}: {e}");
        assert!(
            e["message"].as_str().unwrap_or_default().contains(word),
            "{case}: {e}"
        );
    }
    // vLLM's cache_salt: the same greedy tokens.
    assert_eq!(
        seen["salted"]["ids"],
        serde_json::json!(greedy),
        "{}",
        seen["salted"]
    );
    // A cancelled stream costs the others nothing.
    assert_eq!(seen["after_cancel"]["ids"], serde_json::json!(greedy));
}
