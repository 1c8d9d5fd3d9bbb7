//! vLLM's `/tokenize` and `/detokenize`: the served model's tokenizer and chat
//! template over HTTP, so a client counts and reads tokens as the cluster does.
//!
//! - `POST /tokenize` `{"prompt": text}` (special tokens added unless
//!   `add_special_tokens: false`) or `{"messages": [...]}` (rendered by the
//!   chat template, the assistant header added unless `add_generation_prompt:
//!   false`, `continue_final_message` and `chat_template_kwargs` as for chat
//!   completions, no special tokens added unless asked, as vLLM): `{"count",
//!   "max_model_len", "tokens", "token_strs"}` (each token's vocabulary
//!   string, as transformers' `convert_ids_to_tokens`, with
//!   `return_token_strs: true`, else `null`).
//! - `POST /detokenize` `{"tokens": [...]}`: `{"prompt": text}`.
//!
//! Both take `model` (refused when it names another model) and refuse any
//! other field by name.

use super::*;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct TokenizeRequest {
    #[serde(default)]
    model: String,
    prompt: Option<String>,
    messages: Option<Vec<ChatTurn>>,
    add_special_tokens: Option<bool>,
    add_generation_prompt: Option<bool>,
    #[serde(default)]
    continue_final_message: bool,
    chat_template_kwargs: Option<serde_json::Map<String, Value>>,
    #[serde(default)]
    return_token_strs: bool,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct DetokenizeRequest {
    #[serde(default)]
    model: String,
    tokens: Vec<u32>,
}

pub(super) async fn tokenize(
    State(st): State<AppState>,
    headers: HeaderMap,
    req: Result<Json<Value>, JsonRejection>,
) -> Result<Response, ApiError> {
    authorization(&st, &headers)?;
    let Json(req) = req?;
    let req: TokenizeRequest = typed_body(req)?;
    st.service.check_model(&req.model)?;
    let tokenizer = &st.model.tokenizer;
    let tokens = match (req.prompt, req.messages) {
        (Some(prompt), None) => {
            let chat_only = [
                ("add_generation_prompt", req.add_generation_prompt.is_some()),
                ("continue_final_message", req.continue_final_message),
                ("chat_template_kwargs", req.chat_template_kwargs.is_some()),
            ];
            if let Some((field, _)) = chat_only.into_iter().find(|(_, set)| *set) {
                return Err(ApiError::bad_field(
                    field,
                    format!("{field} applies to messages, not to a prompt"),
                ));
            }
            tokenizer.encode(&prompt, req.add_special_tokens.unwrap_or(true))
        }
        (None, Some(messages)) => {
            if messages.is_empty() {
                return Err(ApiError::bad_field(
                    "messages",
                    "messages must not be empty",
                ));
            }
            openai_tools::check_messages(&messages)?;
            let text = crate::openai_tools_prompt::render(
                tokenizer,
                &messages,
                None,
                &tandem_engine::ChatOptions {
                    add_generation_prompt: req.add_generation_prompt.unwrap_or(true),
                    continue_final_message: req.continue_final_message,
                    documents: None,
                    template_kwargs: req.chat_template_kwargs.as_ref(),
                },
            )
            .map_err(|e| ApiError::bad_request(e.to_string()))?;
            tokenizer.encode(&text, req.add_special_tokens.unwrap_or(false))
        }
        _ => {
            return Err(ApiError::bad_request(
                "give either prompt (a string) or messages, not both and not neither",
            ));
        }
    }
    .map_err(|e| ApiError::bad_request(e.to_string()))?;
    let token_strs = if req.return_token_strs {
        // The tokenizer's own ids, so each is in its vocabulary.
        let strs: Vec<String> = tokens
            .iter()
            .map(|&t| tokenizer.id_to_token(t).unwrap_or_default())
            .collect();
        json!(strs)
    } else {
        Value::Null
    };
    Ok(Json(json!({
        "count": tokens.len(),
        "max_model_len": st.model.config.max_position_embeddings,
        "tokens": tokens,
        "token_strs": token_strs,
    }))
    .into_response())
}

pub(super) async fn detokenize(
    State(st): State<AppState>,
    headers: HeaderMap,
    req: Result<Json<Value>, JsonRejection>,
) -> Result<Response, ApiError> {
    authorization(&st, &headers)?;
    let Json(req) = req?;
    let req: DetokenizeRequest = typed_body(req)?;
    st.service.check_model(&req.model)?;
    let vocab = st.model.config.vocab_size;
    if let Some((i, id)) = req
        .tokens
        .iter()
        .enumerate()
        .find(|&(_, &id)| id as usize >= vocab)
    {
        return Err(ApiError::bad_field(
            "tokens",
            format!("tokens[{i}] = {id} is outside the vocabulary (size {vocab})"),
        ));
    }
    let prompt = st
        .model
        .tokenizer
        .decode(&req.tokens)
        .map_err(|e| ApiError::bad_field("tokens", e.to_string()))?;
    Ok(Json(json!({ "prompt": prompt })).into_response())
}
