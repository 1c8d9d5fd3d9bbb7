//! `tandem generate`: a streaming gRPC client of the router.

use std::io::Write;

use anyhow::Context;
use tandem_proto::v1 as pb;
use tandem_proto::v1::generate_client::GenerateClient;

/// Streams one completion from the router at `router`, printing text as it arrives.
pub async fn generate(
    router: &str,
    request: pb::GenerateRequest,
    echo_prompt: Option<&str>,
) -> anyhow::Result<()> {
    let mut client = GenerateClient::connect(router.to_string())
        .await
        .with_context(|| {
            format!("cannot reach the router at {router} (is `tandem up` running?)")
        })?;
    let mut stream = client
        .generate(request)
        .await
        .map_err(router_error)?
        .into_inner();
    let mut stdout = std::io::stdout();
    if let Some(p) = echo_prompt {
        print!("{p}");
    }
    while let Some(msg) = stream.message().await.map_err(router_error)? {
        match msg.event {
            Some(pb::generate_response::Event::Token(t)) => {
                print!("{}", t.text);
                let _ = stdout.flush();
            }
            Some(pb::generate_response::Event::Finished(f)) => {
                println!();
                let reason =
                    pb::FinishReason::try_from(f.reason).unwrap_or(pb::FinishReason::Unspecified);
                let usage = f.usage.unwrap_or_default();
                let t = f.timings.unwrap_or_default();
                eprintln!(
                    "[{} prompt tokens, {} generated, finish: {}, TTFT {:.1} ms, total {:.1} ms]",
                    usage.prompt_tokens,
                    usage.completion_tokens,
                    reason
                        .as_str_name()
                        .trim_start_matches("FINISH_REASON_")
                        .to_lowercase(),
                    t.time_to_first_token_seconds * 1e3,
                    t.total_seconds * 1e3
                );
            }
            // Not asked for (the request sets no prompt_logprobs).
            Some(pb::generate_response::Event::PromptLogprobs(_)) | None => {}
        }
    }
    Ok(())
}

/// A refusal or failure from the router as a person reads it: the gRPC code
/// in words, then the router's message (or the transport error behind it).
fn router_error(status: tonic::Status) -> anyhow::Error {
    let detail = match std::error::Error::source(&status) {
        Some(source) => tandem_cluster::grpc_tls::error_chain(source),
        None => status.message().to_string(),
    };
    let code = tandem_router::error::code_label(status.code()).replace('_', " ");
    anyhow::anyhow!("{code}: {detail}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_router_error_names_its_code_in_words_and_says_the_message() {
        let e = router_error(tonic::Status::invalid_argument(
            "max_tokens 100000 exceeds the limit of 8192",
        ));
        assert_eq!(
            e.to_string(),
            "invalid argument: max_tokens 100000 exceeds the limit of 8192"
        );
        let e = router_error(tonic::Status::deadline_exceeded("too slow"));
        assert_eq!(e.to_string(), "deadline exceeded: too slow");
    }
}
