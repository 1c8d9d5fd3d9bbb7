//! Tool calling through the whole cluster on SmolLM2-135M-Instruct (GGUF)
//! with the official `openai` client: forced calls (`tool_choice` named and
//! `required`, streamed and not) whose arguments parse and validate against
//! the function's schema (`jsonschema`), `finish_reason: "tool_calls"`; a
//! second turn carrying the call and the `tool` result; `tool_choice: "none"`
//! giving plain content (the tools in the prompt, as vLLM renders them); `auto` served; and each bad tool field refused with
//! HTTP 400 naming it, the next request served.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use serde_json::Value;
use tandem_engine::ModelDir;
use tandem_tests::*;

fn smollm2() -> Arc<ModelDir> {
    let path = std::env::var_os("TANDEM_SMOLLM2_GGUF")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            Path::new(env!("CARGO_MANIFEST_DIR")).join("../models/SmolLM2-135M-Instruct.Q4_1.gguf")
        });
    assert!(path.is_file(), "{} is missing", path.display());
    Arc::new(ModelDir::open(&path).expect("open SmolLM2"))
}

/// A forced call's answer: calls only, each valid, finish reason `tool_calls`.
fn assert_forced(case: &str, answer: &Value) {
    assert_eq!(answer["finish_reason"], "tool_calls", "{case}: {answer}");
    assert!(answer["content"].is_null(), "{case}: {answer}");
    let calls = answer["calls"].as_array().expect("calls");
    assert!(!calls.is_empty(), "{case}: no tool call in {answer}");
    for c in calls {
        assert_eq!(c["valid"], true, "{case}: {c}");
        let id = c["id"].as_str().expect("an id");
        assert!(id.starts_with("call_"), "{case}: {id}");
        assert_eq!(c["type"], "function", "{case}: {c}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn tool_calls_through_the_openai_client_on_smollm2() {
    let model = smollm2();
    let mut spec = ClusterSpec::default();
    spec.router.http_listen = Some("127.0.0.1:0".parse().unwrap());
    // The tool prompts are long: prefilled on the prefill node, whose first
    // token obeys the forced call's grammar too.
    spec.decode.local_prefill_below = 4;
    let cluster = Cluster::start(model.clone(), spec).await;
    let base = format!(
        "http://{}/v1",
        cluster.http.expect("the router serves HTTP")
    );
    let seen = run_client_script("tools_client.py", vec![base]).await;
    eprintln!("seconds per request: {}", seen["seconds"]);

    // Named: exactly that function.
    for case in ["named", "named_stream"] {
        assert_forced(case, &seen[case]);
        let calls = seen[case]["calls"].as_array().unwrap();
        assert_eq!(calls.len(), 1, "{case}: {}", seen[case]);
        assert_eq!(calls[0]["name"], "get_weather", "{case}");
    }
    // Streamed as OpenAI does: the role first, the id and name on the call's
    // first delta, the arguments over several deltas.
    assert_eq!(seen["named_stream"]["role"], "assistant");
    for case in ["named_stream", "required_stream"] {
        let deltas = seen[case]["calls"][0]["deltas"].as_u64().unwrap();
        assert!(deltas > 1, "{case}: arguments came in {deltas} delta(s)");
    }
    for case in ["required", "required_stream"] {
        assert_forced(case, &seen[case]);
        assert_eq!(
            seen[case]["calls"].as_array().unwrap().len(),
            1,
            "{case}: parallel_tool_calls: false made more than one call: {}",
            seen[case]
        );
    }

    // The Responses API: the same forced call as the chat API's (same prompt,
    // same greedy arguments), whole and streamed, and the second turn from the
    // call and its output as input items.
    let rn = &seen["responses_named"];
    assert_eq!(rn["status"], "completed", "{rn}");
    assert_eq!(rn["messages"], serde_json::json!([]), "{rn}");
    let calls = rn["calls"].as_array().unwrap();
    assert_eq!(calls.len(), 1, "{rn}");
    assert_eq!(calls[0]["name"], "get_weather", "{rn}");
    assert_eq!(calls[0]["valid"], true, "{rn}");
    assert_eq!(
        calls[0]["arguments"], seen["named"]["calls"][0]["arguments"],
        "{rn}"
    );
    assert!(
        calls[0]["call_id"].as_str().unwrap().starts_with("call_"),
        "{rn}"
    );
    assert!(calls[0]["id"].as_str().unwrap().starts_with("fc_"), "{rn}");
    let rs = &seen["responses_named_stream"];
    assert_eq!(
        rs["arguments"],
        serde_json::json!([calls[0]["arguments"]]),
        "{rs}"
    );
    assert_eq!(rs["calls"][0]["arguments"], calls[0]["arguments"], "{rs}");
    let types = rs["types"].as_array().unwrap();
    assert_eq!(types.first().unwrap(), "response.created", "{rs}");
    assert_eq!(types.last().unwrap(), "response.completed", "{rs}");
    assert!(
        types.contains(&serde_json::json!("response.function_call_arguments.delta")),
        "{rs}"
    );
    let second = &seen["responses_second_turn"];
    assert!(second["tokens"].as_u64().unwrap() > 0, "{second}");
    assert!(!second["output"].as_array().unwrap().is_empty(), "{second}");

    // The second turn (the call and its result in the history) is answered.
    {
        let case = "second_turn";
        let a = &seen[case];
        let reason = a["finish_reason"].as_str().unwrap();
        assert!(
            ["stop", "length", "tool_calls"].contains(&reason),
            "{case}: {a}"
        );
        let said = a["content"].as_str().is_some_and(|c| !c.is_empty())
            || !a["calls"].as_array().unwrap().is_empty();
        assert!(said, "{case}: an empty answer: {a}");
    }
    // Logprobs with tools: one entry per generated token, streamed (each
    // token's entry once, held-back text's on a later chunk) or not.
    {
        let a = &seen["logprobs"];
        assert_eq!(a["calls"][0]["valid"], true, "logprobs: {a}");
        let b = &seen["logprobs_stream"];
        assert_eq!(b["valid"], true, "logprobs_stream: {b}");
        // Continuous usage: every chunk counts the tokens so far, never
        // fewer than the chunk before, ending at the answer's count.
        let running: Vec<u64> = b["running"]
            .as_array()
            .map(|r| r.iter().map(|v| v.as_u64().unwrap_or(0)).collect())
            .unwrap_or_default();
        assert!(!running.is_empty(), "logprobs_stream: {b}");
        assert!(
            running.windows(2).all(|w| w[0] <= w[1]) && running[0] > 0,
            "logprobs_stream: {b}"
        );
        assert_eq!(
            running.last(),
            b["tokens"].as_u64().as_ref(),
            "logprobs_stream: {b}"
        );
        for (case, x) in [("logprobs", a), ("logprobs_stream", b)] {
            assert!(x["tokens"].as_u64().unwrap_or(0) > 0, "{case}: {x}");
            assert_eq!(x["entries"], x["tokens"], "{case}: {x}");
        }
    }
    // Auto: served; whatever calls the model made are valid ones.
    for c in seen["auto_stream"]["calls"].as_array().unwrap() {
        assert_eq!(c["valid"], true, "auto_stream: {c}");
    }
    // None: plain content, no calls.
    {
        let case = "none";
        let a = &seen[case];
        assert!(a["calls"].as_array().unwrap().is_empty(), "{case}: {a}");
        assert!(
            a["content"].as_str().is_some_and(|c| !c.is_empty()),
            "{case}: {a}"
        );
        assert_ne!(a["finish_reason"], "tool_calls", "{case}: {a}");
        // The tools are in its prompt all the same, as vLLM renders them.
        let bare = seen["no_tools"]["prompt_tokens"].as_u64().unwrap();
        assert!(
            a["prompt_tokens"].as_u64().unwrap() > bare + 20,
            "{case}: {a}, without tools {bare}"
        );
    }

    for (case, field) in [
        ("unknown_name", "tool_choice"),
        ("choice_without_tools", "tool_choice"),
        ("bad_schema", "tools[0].function.parameters"),
        ("no_tool_call_id", "messages[1].tool_call_id"),
        ("bad_tool_type", "tools[0].type"),
        ("with_response_format", "tool_choice"),
        ("bad_parallel", "parallel_tool_calls"),
        ("n_with_tools", "n"),
    ] {
        let r = &seen["refused"][case];
        assert_eq!(r["status"], 400, "{case}: {r}");
        assert_eq!(r["param"], field, "{case}: {r}");
        assert!(
            r["message"].as_str().unwrap().contains(field),
            "{case}: {r}"
        );
    }
    assert_eq!(seen["after"], "length");
}
