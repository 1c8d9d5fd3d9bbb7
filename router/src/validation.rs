//! Validation: a client's [`pb::GenerateRequest`] becomes a [`ValidRequest`]
//! that the rest of the router can trust, or an `INVALID_ARGUMENT` /
//! `NOT_FOUND` error whose message names the bad field.
//!
//! The prompt is tokenized here, once, so that nodes only ever see token ids.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

use tandem_cluster::RouterSection;
use tandem_cluster::convert::{checked_sampling_from_pb, sampling_to_pb};
use tandem_engine::{MAX_TOP_LOGPROBS, ModelDir};
use tandem_proto::v1 as pb;
use tandem_proto::v1::generate_request::Prompt;

use crate::error::RouterError;

/// Most stop strings per request.
pub const MAX_STOP_STRINGS: usize = 16;
/// Longest stop string, in bytes.
pub const MAX_STOP_BYTES: usize = 256;
/// Longest client-given request id, in bytes.
pub const MAX_REQUEST_ID_BYTES: usize = 256;

/// A request that passed validation: a tokenized prompt and checked parameters.
#[derive(Debug, Clone, PartialEq)]
pub struct ValidRequest {
    /// The client's id, or one made up here.
    pub request_id: String,
    /// Prompt token ids (BOS included where the tokenizer adds one).
    pub prompt: Vec<u32>,
    /// Sampling parameters with "unset" mapped to neutral values.
    pub sampling: pb::SamplingParams,
    /// Most tokens to generate; at least 1, and within the model's context.
    pub max_tokens: u32,
    /// Stop strings.
    pub stop: Vec<String>,
    /// Stop token ids.
    pub stop_token_ids: Vec<u32>,
    /// Whether EOS is ignored.
    pub ignore_eos: bool,
    /// vLLM's `include_stop_str_in_output`.
    pub include_stop_str_in_output: bool,
    /// vLLM's `skip_special_tokens: false`.
    pub keep_special_tokens: bool,
    /// vLLM's `spaces_between_special_tokens: false` (it acts only with
    /// `keep_special_tokens`).
    pub no_spaces_between_special_tokens: bool,
    /// Top log probabilities per token (at most [`MAX_TOP_LOGPROBS`]); `None`: none.
    pub logprobs: Option<u32>,
    /// The prompt's log probabilities with this many top tokens each (at most
    /// [`MAX_TOP_LOGPROBS`]); `None`: none.
    pub prompt_logprobs: Option<u32>,
    /// Tokens generated before EOS, a stop id or a stop string may end the output.
    pub min_tokens: u32,
    /// What the token at an output index below `min_tokens` may not be: the
    /// model's EOS (unless ignored) and the stop ids. A prefill node sampling
    /// such a token is sent them; empty when `min_tokens` is 0.
    pub min_tokens_banned: Vec<u32>,
    /// Structured output, checked to compile against the model's tokenizer.
    pub constraint: Option<pb::OutputConstraint>,
    /// vLLM's `cache_salt` (empty: none): the prompt's blocks are named in the
    /// nodes' prefix caches, and in the router's index of them, from it.
    pub cache_salt: String,
    /// Parallel samples of the prompt, 1..=`router.max_n` (see `generate/fanout.rs`).
    pub n: u32,
}

/// Checks requests against the served model and the router's limits.
pub struct Validator {
    model: Arc<ModelDir>,
    served_names: Vec<String>,
    /// `router.default_max_tokens` (none: the rest of the context).
    default_max_tokens: Option<u32>,
    max_tokens_limit: u32,
    max_prompt_tokens: Option<u32>,
    max_n: u32,
}

/// vLLM's check of `cache_salt`: absent, or a non-empty string.
pub fn check_cache_salt(cache_salt: Option<&str>) -> Result<(), &'static str> {
    match cache_salt {
        Some("") => Err("cache_salt must be a non-empty string if provided"),
        _ => Ok(()),
    }
}

fn invalid(msg: impl Into<String>) -> RouterError {
    RouterError::InvalidArgument(msg.into())
}

impl Validator {
    /// A validator for `model`, accepting its directory name and `model_name`
    /// (the configured name, if any) as the request's `model`.
    pub fn new(model: Arc<ModelDir>, model_name: Option<String>, config: &RouterSection) -> Self {
        let mut served_names = Vec::new();
        served_names.extend(model_name);
        let dir_name = model.name();
        if !served_names.contains(&dir_name) {
            served_names.push(dir_name);
        }
        Validator {
            model,
            served_names,
            default_max_tokens: config.default_max_tokens,
            max_tokens_limit: config.max_tokens_limit,
            max_prompt_tokens: config.max_prompt_tokens,
            max_n: config.max_n,
        }
    }

    /// The most samples (`n`, `best_of`) one request may ask for.
    pub fn max_n(&self) -> u32 {
        self.max_n
    }

    /// The name the cluster serves its model under (the first accepted one).
    pub fn model_name(&self) -> &str {
        self.served_names.first().map(String::as_str).unwrap_or("")
    }

    /// Compiles a structured-output constraint once, so that a bad schema,
    /// regex or grammar is refused here rather than failing on a node.
    fn check_constraint(&self, c: &pb::OutputConstraint) -> Result<(), RouterError> {
        let Some(constraint) = tandem_cluster::convert::constraint_from_pb(Some(c)) else {
            return Ok(());
        };
        let compiler = self
            .model
            .tokenizer
            .constraints()
            .map_err(|e| RouterError::Tokenizer(e.to_string()))?;
        compiler
            .start(&constraint)
            .map(drop)
            .map_err(|e| invalid(format!("constraint: {e}")))
    }

    /// Whether `requested` (empty: any) names the served model.
    pub fn check_model(&self, requested: &str) -> Result<(), RouterError> {
        if requested.is_empty() || self.served_names.iter().any(|n| n == requested) {
            return Ok(());
        }
        Err(RouterError::ModelNotFound {
            requested: requested.to_string(),
            served: self.model_name().to_string(),
        })
    }

    /// How many tokens a prompt of `prompt_len` tokens generates when `asked`
    /// for (0: the router's default, cut to what fits), or why it cannot: the
    /// prompt past `router.max_prompt_tokens` or the model's context, or an
    /// asked length over `router.max_tokens_limit` or past the context.
    pub fn max_tokens(&self, prompt_len: usize, asked: u32) -> Result<u32, RouterError> {
        let config = &self.model.config;
        if let Some(limit) = self.max_prompt_tokens
            && prompt_len > limit as usize
        {
            return Err(invalid(format!(
                "prompt has {prompt_len} tokens; the limit is {limit} (router.max_prompt_tokens)"
            )));
        }
        let context = config.max_position_embeddings;
        if prompt_len >= context {
            return Err(invalid(format!(
                "prompt has {prompt_len} tokens; the model's context of {context} leaves no room to generate"
            )));
        }

        let room = u32::try_from(context - prompt_len).unwrap_or(u32::MAX);
        Ok(match asked {
            // The default: the rest of the context, as vLLM's, within the
            // limit; or the configured one, cut to what fits.
            0 => match self.default_max_tokens {
                None => room.min(self.max_tokens_limit),
                Some(n) => n.min(room),
            }
            .max(1),
            n if n > self.max_tokens_limit => {
                return Err(invalid(format!(
                    "max_tokens {n} exceeds the limit of {}",
                    self.max_tokens_limit
                )));
            }
            // An explicit length that cannot fit is refused, in vLLM's words
            // (clients match on "maximum context length").
            n if n > room => {
                return Err(invalid(format!(
                    "This model's maximum context length is {context} tokens. However, you \
                     requested {} tokens ({prompt_len} in the messages, {n} in the completion). \
                     Please reduce the length of the messages or completion (max_tokens).",
                    prompt_len + n as usize
                )));
            }
            n => n,
        })
    }

    /// Validates and tokenizes one request.
    pub fn validate(&self, req: pb::GenerateRequest) -> Result<ValidRequest, RouterError> {
        self.check_model(&req.model)?;
        let n = req.n.max(1);
        if n > self.max_n {
            return Err(invalid(format!(
                "n = {n}: at most {} samples per request (router.max_n)",
                self.max_n
            )));
        }
        let request_id = if req.request_id.is_empty() {
            new_request_id()
        } else if req.request_id.len() > MAX_REQUEST_ID_BYTES {
            return Err(invalid(format!(
                "request_id is {} bytes; the limit is {MAX_REQUEST_ID_BYTES}",
                req.request_id.len()
            )));
        } else {
            req.request_id
        };

        let config = &self.model.config;
        let vocab = config.vocab_size;
        let prompt = match req.prompt {
            None => return Err(invalid("prompt is missing: set text or token_ids")),
            Some(Prompt::Text(text)) => {
                if text.is_empty() {
                    return Err(invalid("prompt text is empty"));
                }
                self.model
                    .tokenizer
                    .encode(&text, true)
                    .map_err(|e| RouterError::Tokenizer(e.to_string()))?
            }
            Some(Prompt::TokenIds(ids)) => {
                if let Some((i, id)) = ids
                    .ids
                    .iter()
                    .enumerate()
                    .find(|&(_, &id)| id as usize >= vocab)
                {
                    return Err(invalid(format!(
                        "token_ids[{i}] = {id} is outside the vocabulary (size {vocab})"
                    )));
                }
                ids.ids
            }
        };
        if prompt.is_empty() {
            return Err(invalid("prompt is empty (no tokens)"));
        }
        let max_tokens = self.max_tokens(prompt.len(), req.max_tokens)?;

        // The message names the field's path: "sampling.top_p must be ...".
        let sampling = checked_sampling_from_pb(req.sampling.as_ref())
            .map_err(|e| invalid(format!("sampling.{e}")))?;

        if req.stop.len() > MAX_STOP_STRINGS {
            return Err(invalid(format!(
                "stop has {} strings; the limit is {MAX_STOP_STRINGS}",
                req.stop.len()
            )));
        }
        for (i, s) in req.stop.iter().enumerate() {
            if s.is_empty() {
                return Err(invalid(format!("stop[{i}] is empty")));
            }
            if s.len() > MAX_STOP_BYTES {
                return Err(invalid(format!(
                    "stop[{i}] is {} bytes; the limit is {MAX_STOP_BYTES}",
                    s.len()
                )));
            }
        }
        if let Some((i, id)) = req
            .stop_token_ids
            .iter()
            .enumerate()
            .find(|&(_, &id)| id as usize >= vocab)
        {
            return Err(invalid(format!(
                "stop_token_ids[{i}] = {id} is outside the vocabulary (size {vocab})"
            )));
        }

        if let Some((&id, _)) = req
            .sampling
            .as_ref()
            .and_then(|s| s.logit_bias.iter().find(|&(&id, _)| id as usize >= vocab))
        {
            return Err(invalid(format!(
                "sampling.logit_bias: token id {id} is outside the vocabulary (size {vocab})"
            )));
        }
        if req.min_tokens > max_tokens {
            return Err(invalid(format!(
                "min_tokens ({}) must be at most max_tokens ({max_tokens})",
                req.min_tokens
            )));
        }
        let min_tokens_banned = if req.min_tokens > 0 {
            let params = tandem_engine::GenerationParams {
                stop_token_ids: req.stop_token_ids.clone(),
                ignore_eos: req.ignore_eos,
                min_tokens: req.min_tokens as usize,
                ..Default::default()
            };
            tandem_engine::banned_before_min_tokens(&params, &config.eos_token_ids, 0)
        } else {
            Vec::new()
        };

        if let Some(n) = req.logprobs
            && n as usize > MAX_TOP_LOGPROBS
        {
            return Err(invalid(format!(
                "logprobs {n} exceeds the limit of {MAX_TOP_LOGPROBS} top log probabilities per token"
            )));
        }

        if let Some(n) = req.prompt_logprobs
            && n as usize > MAX_TOP_LOGPROBS
        {
            return Err(invalid(format!(
                "prompt_logprobs {n} exceeds the limit of {MAX_TOP_LOGPROBS} top log probabilities per token"
            )));
        }

        check_cache_salt(req.cache_salt.as_deref()).map_err(invalid)?;

        let constraint = match req.constraint {
            Some(c) if c.kind.is_some() => {
                self.check_constraint(&c)?;
                Some(c)
            }
            _ => None,
        };

        Ok(ValidRequest {
            constraint,
            request_id,
            prompt,
            sampling: sampling_to_pb(&sampling),
            max_tokens,
            stop: req.stop,
            stop_token_ids: req.stop_token_ids,
            ignore_eos: req.ignore_eos,
            include_stop_str_in_output: req.include_stop_str_in_output,
            keep_special_tokens: req.skip_special_tokens == Some(false),
            no_spaces_between_special_tokens: req.spaces_between_special_tokens == Some(false),
            logprobs: req.logprobs,
            prompt_logprobs: req.prompt_logprobs,
            min_tokens: req.min_tokens,
            min_tokens_banned,
            cache_salt: req.cache_salt.unwrap_or_default(),
            n,
        })
    }
}

/// A request id unique within this process and very likely across routers:
/// the process's start time and a counter.
fn new_request_id() -> String {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    static EPOCH: std::sync::OnceLock<u64> = std::sync::OnceLock::new();
    let epoch = *EPOCH.get_or_init(|| {
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64 ^ u64::from(std::process::id()) << 32)
            .unwrap_or(0)
    });
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    format!("req-{epoch:016x}-{n}")
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::OnceLock;
    use tandem_engine::synth::{SynthSpec, write_model_dir};
    use tonic::Code;

    const CONTEXT: usize = 64;

    fn model() -> Arc<ModelDir> {
        static MODEL: OnceLock<(tempfile::TempDir, Arc<ModelDir>)> = OnceLock::new();
        MODEL
            .get_or_init(|| {
                let dir = tempfile::Builder::new()
                    .prefix("tiny-model")
                    .tempdir()
                    .expect("tempdir");
                let spec = SynthSpec {
                    vocab_size: 300,
                    hidden_size: 32,
                    intermediate_size: 64,
                    num_layers: 1,
                    num_heads: 2,
                    num_kv_heads: 1,
                    max_position_embeddings: CONTEXT,
                    ..SynthSpec::default()
                };
                write_model_dir(dir.path(), &spec).expect("synth model");
                let model = Arc::new(ModelDir::open(dir.path()).expect("open model"));
                (dir, model)
            })
            .1
            .clone()
    }

    fn validator() -> Validator {
        let config = RouterSection {
            default_max_tokens: Some(20),
            max_tokens_limit: 100,
            ..RouterSection::default()
        };
        Validator::new(model(), Some("tiny".into()), &config)
    }

    fn ids(ids: &[u32]) -> pb::GenerateRequest {
        pb::GenerateRequest {
            prompt: Some(Prompt::TokenIds(pb::TokenIds { ids: ids.to_vec() })),
            ..Default::default()
        }
    }

    fn text(t: &str) -> pb::GenerateRequest {
        pb::GenerateRequest {
            prompt: Some(Prompt::Text(t.into())),
            ..Default::default()
        }
    }

    /// The status a request fails with, and its message.
    fn fails(req: pb::GenerateRequest) -> (Code, String) {
        let status = tonic::Status::from(validator().validate(req).unwrap_err());
        (status.code(), status.message().to_string())
    }

    fn assert_invalid(req: pb::GenerateRequest, field: &str) {
        let (code, msg) = fails(req);
        assert_eq!(code, Code::InvalidArgument, "{msg}");
        assert!(msg.contains(field), "{msg:?} should name {field}");
    }

    #[test]
    fn text_is_tokenized_with_bos() {
        let v = validator().validate(text("hello world")).unwrap();
        let bos = model().config.bos_token_id.expect("synth has BOS");
        assert_eq!(v.prompt.first(), Some(&bos));
        assert!(v.prompt.len() > 1);
        assert_eq!(v.max_tokens, 20, "0 means the default");
        assert!(v.request_id.starts_with("req-"));
    }

    #[test]
    fn special_token_text_and_its_spacing_follow_vllm_s_fields() {
        let v = validator().validate(ids(&[5])).unwrap();
        assert!(!v.keep_special_tokens && !v.no_spaces_between_special_tokens);
        let v = validator()
            .validate(pb::GenerateRequest {
                skip_special_tokens: Some(false),
                spaces_between_special_tokens: Some(false),
                ..ids(&[5])
            })
            .unwrap();
        assert!(v.keep_special_tokens && v.no_spaces_between_special_tokens);
        let v = validator()
            .validate(pb::GenerateRequest {
                spaces_between_special_tokens: Some(true),
                ..ids(&[5])
            })
            .unwrap();
        assert!(!v.no_spaces_between_special_tokens);
    }

    #[test]
    fn token_ids_pass_unchanged() {
        let v = validator().validate(ids(&[5, 6, 7])).unwrap();
        assert_eq!(v.prompt, vec![5, 6, 7]);
    }

    #[test]
    fn request_ids_are_kept_or_made_unique() {
        let mut r = ids(&[1]);
        r.request_id = "mine".into();
        assert_eq!(validator().validate(r).unwrap().request_id, "mine");
        let a = validator().validate(ids(&[1])).unwrap().request_id;
        let b = validator().validate(ids(&[1])).unwrap().request_id;
        assert_ne!(a, b);
        let mut r = ids(&[1]);
        r.request_id = "x".repeat(MAX_REQUEST_ID_BYTES + 1);
        assert_invalid(r, "request_id");
    }

    #[test]
    fn a_cache_salt_is_kept_and_an_empty_one_refused() {
        let mut r = ids(&[1, 2]);
        r.cache_salt = Some("tenant".into());
        assert_eq!(validator().validate(r).unwrap().cache_salt, "tenant");
        assert_eq!(validator().validate(ids(&[1, 2])).unwrap().cache_salt, "");
        let mut r = ids(&[1, 2]);
        r.cache_salt = Some(String::new());
        assert_invalid(r, "cache_salt");
    }

    #[test]
    fn empty_prompts_are_refused() {
        assert_invalid(text(""), "prompt");
        assert_invalid(ids(&[]), "prompt");
        assert_invalid(pb::GenerateRequest::default(), "prompt");
    }

    #[test]
    fn token_ids_must_be_in_the_vocabulary() {
        let vocab = model().config.vocab_size as u32;
        assert_invalid(ids(&[1, vocab]), "token_ids[1]");
        let mut r = ids(&[1]);
        r.stop_token_ids = vec![vocab + 5];
        assert_invalid(r, "stop_token_ids[0]");
    }

    #[test]
    fn prompt_must_leave_room_in_the_context() {
        assert_invalid(ids(&vec![1; CONTEXT]), "context");
        let v = validator().validate(ids(&vec![1; CONTEXT - 1])).unwrap();
        assert_eq!(
            v.max_tokens, 1,
            "the default max_tokens is cut to the room left"
        );
    }

    #[test]
    fn explicit_max_tokens_past_the_context_is_refused_with_the_numbers() {
        let mut r = ids(&vec![1; CONTEXT - 10]);
        r.max_tokens = 11;
        let (code, msg) = fails(r);
        assert_eq!(code, Code::InvalidArgument);
        assert_eq!(
            msg,
            format!(
                "This model's maximum context length is {CONTEXT} tokens. However, you requested \
                 {} tokens ({} in the messages, 11 in the completion). Please reduce the length \
                 of the messages or completion (max_tokens).",
                CONTEXT + 1,
                CONTEXT - 10
            )
        );
        let mut r = ids(&vec![1; CONTEXT - 10]);
        r.max_tokens = 10;
        assert_eq!(
            validator().validate(r).unwrap().max_tokens,
            10,
            "exactly fits"
        );
    }

    #[test]
    fn without_a_configured_default_max_tokens_is_the_rest_of_the_context() {
        let mut v = validator();
        v.default_max_tokens = None;
        assert_eq!(v.max_tokens(CONTEXT - 40, 0).unwrap(), 40);
        // Never past the limit on what a request may ask for.
        v.max_tokens_limit = 30;
        assert_eq!(v.max_tokens(10, 0).unwrap(), 30);
        assert_eq!(v.max_tokens(CONTEXT - 1, 0).unwrap(), 1);
        // An explicit length is the request's.
        assert_eq!(v.max_tokens(10, 7).unwrap(), 7);
    }

    #[test]
    fn max_tokens_limits() {
        let mut r = ids(&[1]);
        r.max_tokens = 101;
        assert_invalid(r, "max_tokens");
        let mut r = ids(&[1]);
        r.max_tokens = 7;
        assert_eq!(validator().validate(r).unwrap().max_tokens, 7);
    }

    fn with_sampling(s: pb::SamplingParams) -> pb::GenerateRequest {
        pb::GenerateRequest {
            sampling: Some(s),
            ..ids(&[1])
        }
    }

    #[test]
    fn sampling_is_validated() {
        let bad = [
            (
                pb::SamplingParams {
                    top_k: -2,
                    ..Default::default()
                },
                "top_k",
            ),
            (
                pb::SamplingParams {
                    temperature: f32::NAN,
                    ..Default::default()
                },
                "temperature",
            ),
            (
                pb::SamplingParams {
                    temperature: -0.5,
                    ..Default::default()
                },
                "temperature",
            ),
            (
                pb::SamplingParams {
                    top_p: 1.5,
                    ..Default::default()
                },
                "top_p",
            ),
            (
                pb::SamplingParams {
                    top_p: -0.1,
                    ..Default::default()
                },
                "top_p",
            ),
            (
                pb::SamplingParams {
                    min_p: 2.0,
                    ..Default::default()
                },
                "min_p",
            ),
        ];
        for (s, field) in bad {
            let (code, msg) = fails(with_sampling(s));
            assert_eq!(code, Code::InvalidArgument, "{msg}");
            assert!(msg.contains(&format!("sampling.{field} must")), "{msg:?}");
        }
        let ok = validator()
            .validate(with_sampling(pb::SamplingParams {
                temperature: 0.7,
                top_p: 0.0,
                top_k: 40,
                seed: Some(3),
                ..Default::default()
            }))
            .unwrap();
        assert_eq!(ok.sampling.top_p, 1.0, "top_p 0 means no cut");
        assert_eq!(ok.sampling.top_k, 40);
        assert_eq!(ok.sampling.seed, Some(3));
    }

    #[test]
    fn stop_strings_are_bounded() {
        let mut r = ids(&[1]);
        r.stop = vec!["x".into(); MAX_STOP_STRINGS + 1];
        assert_invalid(r, "stop");
        let mut r = ids(&[1]);
        r.stop = vec!["ok".into(), "y".repeat(MAX_STOP_BYTES + 1)];
        assert_invalid(r, "stop[1]");
        let mut r = ids(&[1]);
        r.stop = vec![String::new()];
        assert_invalid(r, "stop[0]");
        let mut r = ids(&[1]);
        r.stop = vec!["z".repeat(MAX_STOP_BYTES); MAX_STOP_STRINGS];
        assert!(validator().validate(r).is_ok());
    }

    #[test]
    fn unknown_models_are_not_found() {
        let mut r = ids(&[1]);
        r.model = "gpt-17".into();
        let (code, msg) = fails(r);
        assert_eq!(code, Code::NotFound);
        assert!(msg.contains("gpt-17"), "{msg}");
        for name in ["tiny".to_string(), model().name(), String::new()] {
            let mut r = ids(&[1]);
            r.model = name;
            assert!(validator().validate(r).is_ok());
        }
    }
}
