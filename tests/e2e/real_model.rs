//! A real trained model through the whole cluster: SmolLM2-135M-Instruct (GGUF)
//! answers the chat question with "Paris", prefilled on the prefill node, its
//! KV shipped over QUIC to the decode node, over gRPC and over the OpenAI API
//! (the official `openai` Python client). The model file comes from
//! `tandem model fetch smollm2` (scripts/test.sh runs it); a missing file
//! fails the test.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;

use tandem_engine::{ChatMessage, ModelDir};
use tandem_proto::v1 as pb;
use tandem_tests::*;

const QUESTION: &str = "What is the capital of France?";

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

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn smollm2_answers_paris_through_the_cluster() {
    let model = smollm2();
    let mut spec = ClusterSpec::default();
    spec.router.http_listen = Some("127.0.0.1:0".parse().unwrap());
    // Everything past 8 prompt tokens goes through the prefill node and QUIC.
    spec.decode.local_prefill_below = 8;
    let cluster = Cluster::start(model.clone(), spec).await;

    let prompt = model
        .tokenizer
        .apply_chat_template(
            &[ChatMessage {
                role: "user".into(),
                content: QUESTION.into(),
            }],
            true,
        )
        .unwrap();
    let prompt_ids = model.tokenizer.encode(&prompt, false).unwrap();
    assert!(prompt_ids.len() > 8, "{} prompt tokens", prompt_ids.len());
    let im_end = model.tokenizer.token_to_id("<|im_end|>").unwrap();

    // gRPC, the prompt as token ids (a client that renders the template itself).
    let mut client = cluster.client().await;
    let request = pb::GenerateRequest {
        prompt: Some(pb::generate_request::Prompt::TokenIds(pb::TokenIds {
            ids: prompt_ids.clone(),
        })),
        max_tokens: 48,
        ..Default::default()
    };
    let done = complete(&mut client, request).await.expect("generate");
    assert!(done.text.contains("Paris"), "{:?}", done.text);
    assert_eq!(done.reason, pb::FinishReason::Eos, "{:?}", done.text);
    assert_eq!(done.tokens.last(), Some(&im_end));
    let load = cluster.prefill_load().await;
    assert_eq!(
        load.kv_blocks_free, load.kv_blocks_total,
        "prefill KV freed"
    );

    // The same through /v1/chat/completions with the official client.
    let base = format!("http://{}/v1", cluster.http.expect("HTTP API"));
    let name = model.name();
    let script = format!(
        "import json, sys\n\
         from openai import OpenAI\n\
         c = OpenAI(base_url=sys.argv[1], api_key='unused')\n\
         r = c.chat.completions.create(model=sys.argv[2], max_tokens=48, temperature=0,\n\
             messages=[{{'role': 'user', 'content': {QUESTION:?}}}])\n\
         print(json.dumps({{'content': r.choices[0].message.content,\n\
             'finish_reason': r.choices[0].finish_reason, 'prompt_tokens': r.usage.prompt_tokens}}))\n"
    );
    let output = tokio::task::spawn_blocking(move || {
        Command::new("python3")
            .args(["-c", &script, &base, &name])
            .output()
    })
    .await
    .unwrap()
    .expect("python3 must be installed (scripts/test.sh installs the openai package)");
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let seen: serde_json::Value = serde_json::from_slice(&output.stdout).expect("JSON");
    let content = seen["content"].as_str().unwrap();
    assert!(content.contains("Paris"), "{content:?}");
    assert_eq!(content, done.text);
    assert_eq!(seen["finish_reason"], "stop");
    assert_eq!(seen["prompt_tokens"], prompt_ids.len());
}
