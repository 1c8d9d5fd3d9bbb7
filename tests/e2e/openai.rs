//! The OpenAI-compatible HTTP API, driven by the official `openai` Python client
//! (installed by scripts/test.sh) against a real cluster on loopback.

use std::process::Command;

use tandem_tests::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_openai_client_library_works_against_the_router() {
    let (_dir, model) = small_model();
    let mut spec = ClusterSpec::default();
    spec.router.http_listen = Some("127.0.0.1:0".parse().unwrap());
    let cluster = Cluster::start(model.clone(), spec).await;
    let base = format!(
        "http://{}/v1",
        cluster.http.expect("the router serves HTTP")
    );
    // A token greedy decoding generates, not generated before it: stop_token_ids
    // over HTTP must end the completion there.
    let prompt = model.tokenizer.encode("Once upon a time", true).unwrap();
    let greedy = reference(&model, &prompt, 8);
    let stop_at = (1..greedy.len())
        .find(|&i| !greedy[..i].contains(&greedy[i]))
        .expect("greedy decoding generates two distinct tokens");
    let stop_token = greedy[stop_at].to_string();
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/e2e/openai_client.py");
    let output = tokio::task::spawn_blocking(move || {
        Command::new("python3")
            .args([script, &base, &stop_token])
            .output()
    })
    .await
    .unwrap()
    .expect("python3 must be installed (scripts/test.sh installs the openai package)");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        output.status.success(),
        "the openai client script failed:\n{stderr}"
    );
    let seen: serde_json::Value =
        serde_json::from_slice(&output.stdout).expect("script output is JSON");

    assert_eq!(seen["models"][0], model.name());
    // Greedy completion equals the engine's own, in one piece and streamed.
    let expected = model.tokenizer.decode(&greedy).unwrap();
    assert_eq!(seen["completion"]["text"], expected.as_str());
    assert_eq!(seen["completion"]["finish_reason"], "length");
    assert_eq!(seen["completion"]["prompt_tokens"], prompt.len());
    assert_eq!(seen["completion"]["completion_tokens"], 8);
    assert_eq!(seen["completion_stream"]["text"], expected.as_str());
    assert_eq!(seen["completion_stream"]["finish_reason"], "length");
    assert!(
        seen["completion_stream"]["chunks"].as_u64().unwrap() >= 2,
        "streamed in pieces"
    );
    // Chat: the template is applied, the answer is the assistant's, streamed or not.
    let messages = [
        tandem_engine::ChatMessage {
            role: "system".into(),
            content: "Be brief.".into(),
        },
        tandem_engine::ChatMessage {
            role: "user".into(),
            content: "Tell me a story.".into(),
        },
    ];
    let chat_prompt = model
        .tokenizer
        .encode(
            &model
                .tokenizer
                .apply_chat_template(&messages, true)
                .unwrap(),
            false,
        )
        .unwrap();
    let chat_expected = model
        .tokenizer
        .decode(&reference(&model, &chat_prompt, 6))
        .unwrap();
    assert_eq!(seen["chat"]["content"], chat_expected.as_str());
    assert_eq!(seen["chat"]["role"], "assistant");
    assert_eq!(seen["chat"]["prompt_tokens"], chat_prompt.len());
    assert_eq!(seen["chat_stream"]["content"], chat_expected.as_str());
    assert_eq!(
        seen["chat_stream"]["roles"],
        serde_json::json!(["assistant"])
    );
    // A repeated prompt reports its cached tokens, streamed or not; the first, none.
    let cached = &seen["cached_tokens"];
    assert!(cached["prompt_tokens"].as_u64().unwrap() > 32, "{cached}");
    for case in ["completion", "chat"] {
        assert_eq!(cached[format!("{case}_first")], 0, "{case}: {cached}");
        for again in ["second", "stream"] {
            let n = cached[format!("{case}_{again}")].as_u64().unwrap_or(0);
            assert!(n > 0, "{case}_{again}: {cached}");
        }
    }
    // Errors: OpenAI's shape, the right status, a message naming the problem.
    let errors = &seen["errors"];
    for (case, status, word) in [
        ("negative_temperature", 400, "temperature"),
        ("top_p_zero_point", 400, "top_p"),
        ("unknown_model", 404, "no-such-model"),
        ("too_many_tokens", 400, "max_tokens"),
        ("invalid_utf8", 400, "invalid request body"),
        ("invalid_json", 400, "invalid request body"),
    ] {
        let e = &errors[case];
        assert_eq!(e["status"], status, "{case}: {e}");
        let message = e["message"]
            .as_str()
            .or(e["body"]["error"]["message"].as_str())
            .unwrap_or_default();
        assert!(
            message.contains(word),
            "{case}: {message:?} should mention {word}"
        );
    }

    // Past the context: vLLM's message, with the numbers.
    let e = &errors["past_the_context"];
    assert_eq!(e["status"], 400, "{e}");
    let message = e["message"].as_str().unwrap_or_default();
    let context = model.config.max_position_embeddings;
    assert!(
        message.starts_with(&format!(
            "This model's maximum context length is {context} tokens. However, you requested {} tokens ({} in the messages, 1024 in the completion).",
            chat_prompt.len() + 1024,
            chat_prompt.len()
        )),
        "{message}"
    );

    // Each field Tandem cannot honour: 400 naming it, and the next request is served.
    let refused = seen["refused"].as_object().unwrap();
    assert_eq!(refused.len(), 18, "{refused:?}");
    for (case, got) in refused {
        let field = case.split_once('.').unwrap().1;
        let e = &got["error"];
        assert_eq!(e["status"], 400, "{case}: {got}");
        assert_eq!(e["param"], field, "{case}: {got}");
        let message = e["message"].as_str().unwrap_or_default();
        assert!(
            message.contains(&format!("`{field}`"))
                && (message.contains("not supported") || message.contains("unknown field")),
            "{case}: {message:?}"
        );
        assert_eq!(got["next_tokens"], 2, "{case}: the next request: {got}");
    }
    assert!(
        refused["completions.max_token"]["error"]["message"]
            .as_str()
            .unwrap()
            .contains("unknown field")
    );
    // Their neutral values pass.
    assert_eq!(seen["neutral"]["completion_tokens"], 2);
    assert_eq!(seen["neutral"]["chat_tokens"], 2);

    // stop_token_ids ends the completion at that token, its text left out.
    let stopped = &seen["stop_token_ids"];
    let before = model.tokenizer.decode(&greedy[..stop_at]).unwrap();
    assert_eq!(stopped["text"], before.as_str(), "{stopped}");
    assert_eq!(stopped["finish_reason"], "stop", "{stopped}");
    assert_eq!(stopped["completion_tokens"], stop_at + 1, "{stopped}");

    // A seed makes sampling reproducible; other seeds sample otherwise.
    let seeded = &seen["seeded"];
    assert_eq!(seeded["first"], seeded["again"], "{seeded}");
    assert!(
        seeded["others"]
            .as_array()
            .unwrap()
            .iter()
            .any(|o| *o != seeded["first"]),
        "{seeded}"
    );

    // Unknown routes and methods answer in OpenAI's error shape too.
    let routes = &seen["routes"];
    for (case, status, word) in [
        ("not_found", 404, "/v1/no-such-route"),
        ("wrong_method", 405, "GET"),
    ] {
        let r = &routes[case];
        assert_eq!(r["status"], status, "{case}: {r}");
        let message = r["body"]["error"]["message"].as_str().unwrap_or_default();
        assert!(message.contains(word), "{case}: {r}");
        assert!(r["body"]["error"]["type"].is_string(), "{case}: {r}");
    }
}
