//! A completions request's prompts as vLLM takes them: one or a batch, text
//! or token ids. They are encoded here when the answer returns their ids
//! (`return_token_ids`), cuts them (`truncate_prompt_tokens`) or asks for no
//! special tokens (`add_special_tokens: false`), as the service would encode
//! them otherwise (special tokens added), so the ids returned or cut are the
//! ones run; and each one's text for `echo`.

use super::*;

/// The prompts to run, their ids (with `return_token_ids`) and the text each
/// one's choices start with (`echo`; empty without).
pub(super) struct Prompts {
    pub(super) prompts: Vec<pb::generate_request::Prompt>,
    pub(super) ids: Option<Vec<Vec<u32>>>,
    pub(super) echo: Vec<String>,
}

/// `input` checked and prepared for `s`, text encoded with the tokenizer's
/// special tokens or (`add_special` false, vLLM's `add_special_tokens`)
/// without; what cannot be honoured is refused naming its field.
pub(super) fn completion_prompts(
    input: PromptInput,
    echo: bool,
    add_special: bool,
    s: &Sampling,
    model: &ModelDir,
) -> Result<Prompts, ApiError> {
    // A batch of prompts is answered as vLLM does: each prompt's `n` choices
    // in turn, in one answer.
    let prompts: Vec<pb::generate_request::Prompt> = match input {
        PromptInput::Text(t) => vec![pb::generate_request::Prompt::Text(t)],
        PromptInput::Tokens(ids) => {
            vec![pb::generate_request::Prompt::TokenIds(pb::TokenIds { ids })]
        }
        PromptInput::Texts(t) => t
            .into_iter()
            .map(pb::generate_request::Prompt::Text)
            .collect(),
        PromptInput::TokenLists(t) => t
            .into_iter()
            .map(|ids| pb::generate_request::Prompt::TokenIds(pb::TokenIds { ids }))
            .collect(),
        PromptInput::Other(v) => {
            let got = match v {
                serde_json::Value::Object(_) => "an object",
                serde_json::Value::Array(_) => "a list of other values",
                serde_json::Value::Null => "null",
                _ => "a number or a boolean",
            };
            return Err(ApiError::bad_field(
                "prompt",
                format!(
                    "prompt must be a string, a list of token ids, or a batch (a list) of either, got {got}"
                ),
            ));
        }
    };
    if echo && s.return_token_ids {
        // vLLM then moves the prompt from the text into the token ids.
        return Err(ApiError::bad_field(
            "return_token_ids",
            "return_token_ids together with echo is not supported yet",
        ));
    }
    let keep = kept_prompt_tokens(s, model)?;
    // A prompt's text as sent, for `echo` when it runs whole.
    let texts: Vec<Option<String>> = prompts
        .iter()
        .map(|p| match p {
            pb::generate_request::Prompt::Text(t) if keep.is_none() => Some(t.clone()),
            _ => None,
        })
        .collect();
    // The service encodes a text prompt with special tokens; encoded here
    // otherwise, and where the ids are returned or cut.
    let prompts = if s.return_token_ids || keep.is_some() || !add_special {
        prompts
            .into_iter()
            .map(|p| {
                let ids = match p {
                    pb::generate_request::Prompt::Text(t) => model
                        .tokenizer
                        .encode(&t, add_special)
                        .map_err(|e| ApiError::bad_field("prompt", e.to_string()))?,
                    pb::generate_request::Prompt::TokenIds(ids) => ids.ids,
                };
                Ok(pb::generate_request::Prompt::TokenIds(pb::TokenIds {
                    ids: last_tokens(ids, keep),
                }))
            })
            .collect::<Result<Vec<_>, ApiError>>()?
    } else {
        prompts
    };
    let prompt_ids = s.return_token_ids.then(|| {
        prompts
            .iter()
            .map(|p| match p {
                pb::generate_request::Prompt::TokenIds(ids) => ids.ids.clone(),
                pb::generate_request::Prompt::Text(_) => Vec::new(),
            })
            .collect()
    });
    let echo = if echo {
        prompts
            .iter()
            .zip(texts)
            .map(|(p, text)| match (p, text) {
                (_, Some(t)) => Ok(t),
                (pb::generate_request::Prompt::Text(t), None) => Ok(t.clone()),
                (pb::generate_request::Prompt::TokenIds(ids), None) => model
                    .tokenizer
                    .decode(&ids.ids)
                    .map_err(|e| ApiError::bad_field("prompt", e.to_string())),
            })
            .collect::<Result<Vec<_>, _>>()?
    } else {
        Vec::new()
    };
    Ok(Prompts {
        prompts,
        ids: prompt_ids,
        echo,
    })
}

/// vLLM's `truncate_prompt_tokens`: how many of a prompt's last tokens run
/// (`None`: all); -1 is the model's context length; 0, below -1 or past the
/// context: HTTP 400 naming it.
pub(super) fn kept_prompt_tokens(
    s: &Sampling,
    model: &ModelDir,
) -> Result<Option<usize>, ApiError> {
    let max = model.config.max_position_embeddings;
    match s.truncate_prompt_tokens {
        None => Ok(None),
        Some(-1) => Ok(Some(max)),
        Some(k) if k >= 1 && k as usize <= max => Ok(Some(k as usize)),
        Some(k) => Err(ApiError::bad_field(
            "truncate_prompt_tokens",
            format!(
                "truncate_prompt_tokens must be -1 (the model's context, {max}) or from 1 to {max}, got {k}"
            ),
        )),
    }
}

/// The last `keep` of `ids` (all of them with `None`).
pub(super) fn last_tokens(mut ids: Vec<u32>, keep: Option<usize>) -> Vec<u32> {
    if let Some(k) = keep
        && ids.len() > k
    {
        ids.drain(..ids.len() - k);
    }
    ids
}
