//! Structured output through the whole cluster on SmolLM2-135M-Instruct (GGUF):
//! JSON schema, JSON object, regex and choice constraints over the OpenAI API
//! (the official `openai` client, outputs checked with `jsonschema`), prompts
//! long enough to be prefilled on the prefill node (whose first token obeys the
//! grammar too); bad schemas and regexes are HTTP 400 and gRPC
//! INVALID_ARGUMENT naming the field, and the next request is served.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use tandem_engine::ModelDir;
use tandem_proto::v1 as pb;
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

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn constrained_outputs_obey_their_constraint_on_smollm2() {
    let model = smollm2();
    let mut spec = ClusterSpec::default();
    spec.router.http_listen = Some("127.0.0.1:0".parse().unwrap());
    // Past 4 prompt tokens the prefill node samples the first token.
    spec.decode.local_prefill_below = 4;
    let cluster = Cluster::start(model.clone(), spec).await;

    // gRPC: a regex through the prefill node; a bad one refused.
    let mut client = cluster.client().await;
    let regex = |r: &str| pb::OutputConstraint {
        kind: Some(pb::output_constraint::Kind::Regex(r.into())),
    };
    let request = pb::GenerateRequest {
        prompt: Some(pb::generate_request::Prompt::Text(
            "The answer to everything, in digits, is".into(),
        )),
        max_tokens: 12,
        constraint: Some(regex("(yes|no) [0-9]{2}")),
        ..Default::default()
    };
    let (text, finished) = collect(&mut client, request.clone()).await;
    assert!(
        text.len() == 5 || text.len() == 6,
        "{text:?} does not match (yes|no) [0-9]{{2}}"
    );
    assert!(
        text.starts_with("yes ") || text.starts_with("no "),
        "{text:?}"
    );
    assert_eq!(finished.reason, pb::FinishReason::Stop as i32);
    let bad = pb::GenerateRequest {
        constraint: Some(regex("(unclosed")),
        ..request.clone()
    };
    let Err(status) = client.generate(bad).await else {
        panic!("a bad regex was accepted");
    };
    assert_eq!(status.code(), tonic::Code::InvalidArgument);
    assert!(
        status.message().contains("guided_regex"),
        "{}",
        status.message()
    );

    let base = format!(
        "http://{}/v1",
        cluster.http.expect("the router serves HTTP")
    );
    let seen = run_client_script("structured_client.py", vec![base]).await;

    for r in seen["json_schema"].as_array().unwrap() {
        assert_eq!(r["valid"], true, "{r}");
        assert_eq!(r["finish_reason"], "stop", "{r}");
    }
    assert_eq!(seen["json_schema_stream"]["valid"], true, "{seen}");
    assert_eq!(seen["completion_guided_json"], true, "{seen}");
    let object = seen["json_object"]["text"].as_str().unwrap();
    if seen["json_object"]["finish_reason"] == "stop" {
        let v: serde_json::Value = serde_json::from_str(object).expect("a JSON object");
        assert!(v.is_object(), "{object}");
    } else {
        assert!(object.starts_with('{'), "{object}");
    }
    assert_eq!(seen["regex"]["matches"], true, "{seen}");
    let choice = seen["choice"].as_str().unwrap();
    assert!(
        ["positive", "negative", "neutral"].contains(&choice),
        "{choice}"
    );
    let yes_no = seen["structured_outputs_choice"].as_str().unwrap();
    assert!(yes_no == "yes" || yes_no == "no", "{yes_no}");
    for (case, field) in [
        ("bad_schema", "guided_json"),
        ("bad_regex", "guided_regex"),
        ("two_constraints", "guided_choice"),
    ] {
        assert_eq!(seen[case]["status"], 400, "{case}: {seen}");
        let message = seen[case]["message"].as_str().unwrap();
        assert!(message.contains(field), "{case}: {message}");
    }
    // JSON whitespace: the biased space shows where whitespace is free, and
    // never where only newlines or no whitespace are allowed; those outputs
    // are the schema's JSON.
    let ws = &seen["whitespace"];
    assert!(!ws["space_tokens"].as_array().unwrap().is_empty(), "{ws}");
    let text = |case: &str| ws[case]["text"].as_str().unwrap().to_string();
    assert!(text("free").contains(' '), "{ws}");
    assert!(!text("newlines").contains(' '), "{ws}");
    assert!(!text("none").contains(|c: char| c.is_whitespace()), "{ws}");
    for case in ["newlines", "none"] {
        assert_eq!(ws[case]["valid"], true, "{case}: {ws}");
        assert_eq!(ws[case]["finish"], "stop", "{case}: {ws}");
    }
    for (case, word) in [
        ("other_backend", "guided_decoding_backend"),
        ("not_json", "guided_whitespace_pattern"),
    ] {
        assert_eq!(ws[case]["status"], 400, "{case}: {ws}");
        let message = ws[case]["message"].as_str().unwrap();
        assert!(message.contains(word), "{case}: {message}");
    }
    assert_eq!(seen["after"], "length");
}

async fn collect(
    client: &mut tandem_proto::v1::generate_client::GenerateClient<tonic::transport::Channel>,
    request: pb::GenerateRequest,
) -> (String, pb::Finished) {
    let mut stream = client
        .generate(request)
        .await
        .expect("generate")
        .into_inner();
    let mut text = String::new();
    while let Some(msg) = stream.message().await.expect("stream") {
        match msg.event {
            Some(pb::generate_response::Event::Token(t)) => text.push_str(&t.text),
            Some(pb::generate_response::Event::Finished(f)) => return (text, f),
            Some(pb::generate_response::Event::PromptLogprobs(_)) | None => {}
        }
    }
    panic!("the stream ended without Finished");
}
