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
    let mut stream = client.generate(request).await?.into_inner();
    let mut stdout = std::io::stdout();
    if let Some(p) = echo_prompt {
        print!("{p}");
    }
    while let Some(msg) = stream.message().await? {
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
