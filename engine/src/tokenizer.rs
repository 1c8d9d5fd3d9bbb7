//! The model's tokenizer (`tokenizer.json`), its chat template
//! (`tokenizer_config.json`), and incremental detokenization for streaming.

use std::path::Path;
use std::sync::{Arc, OnceLock};

use serde::{Deserialize, Serialize};

use crate::config::ModelConfig;
use crate::constraint::ConstraintCompiler;
use crate::error::{EngineError, Result};

/// One message of a chat, as OpenAI's API and HF chat templates take it.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct ChatMessage {
    /// `system`, `user` or `assistant`.
    pub role: String,
    /// The text.
    pub content: String,
}

/// A Hugging Face tokenizer with the model's chat template.
pub struct Tokenizer {
    inner: tokenizers::Tokenizer,
    chat_template: Option<String>,
    bos_token: String,
    eos_token: String,
    /// Built on the first constrained request (see [`Tokenizer::constraints`]).
    constraints: OnceLock<std::result::Result<Arc<ConstraintCompiler>, String>>,
}

fn special_token(v: Option<&serde_json::Value>) -> String {
    match v {
        Some(serde_json::Value::String(s)) => s.clone(),
        Some(serde_json::Value::Object(o)) => o
            .get("content")
            .and_then(|c| c.as_str())
            .unwrap_or_default()
            .to_string(),
        _ => String::new(),
    }
}

impl Tokenizer {
    /// Loads `tokenizer.json` and (if present) `tokenizer_config.json` from `dir`,
    /// and checks that every token id fits the model's vocabulary.
    pub fn from_dir(dir: &Path, config: &ModelConfig) -> Result<Self> {
        let path = dir.join("tokenizer.json");
        if !path.exists() {
            return Err(EngineError::Tokenizer(format!(
                "{} not found",
                path.display()
            )));
        }
        let inner = tokenizers::Tokenizer::from_file(&path)
            .map_err(|e| EngineError::Tokenizer(format!("cannot load {}: {e}", path.display())))?;
        let vocab = inner.get_vocab_size(true);
        if vocab > config.vocab_size {
            return Err(EngineError::Tokenizer(format!(
                "tokenizer has {vocab} tokens but the model's vocab_size is {}",
                config.vocab_size
            )));
        }
        let mut tok = Tokenizer {
            inner,
            chat_template: None,
            bos_token: String::new(),
            eos_token: String::new(),
            constraints: OnceLock::new(),
        };
        let cfg_path = dir.join("tokenizer_config.json");
        if cfg_path.exists() {
            let text = std::fs::read_to_string(&cfg_path).map_err(|source| EngineError::Io {
                path: cfg_path.clone(),
                source,
            })?;
            let cfg: serde_json::Value = serde_json::from_str(&text)
                .map_err(|e| EngineError::Tokenizer(format!("{}: {e}", cfg_path.display())))?;
            tok.chat_template = match cfg.get("chat_template") {
                Some(serde_json::Value::String(s)) => Some(s.clone()),
                // A list of named templates: take the default one.
                Some(serde_json::Value::Array(list)) => list
                    .iter()
                    .find(|t| t.get("name").and_then(|n| n.as_str()) == Some("default"))
                    .and_then(|t| t.get("template"))
                    .and_then(|t| t.as_str())
                    .map(str::to_string),
                _ => None,
            };
            tok.bos_token = special_token(cfg.get("bos_token"));
            tok.eos_token = special_token(cfg.get("eos_token"));
        }
        Ok(tok)
    }

    /// A tokenizer built elsewhere (e.g. from a GGUF file's metadata).
    pub(crate) fn from_parts(
        inner: tokenizers::Tokenizer,
        chat_template: Option<String>,
        bos_token: String,
        eos_token: String,
    ) -> Self {
        Tokenizer {
            inner,
            chat_template,
            bos_token,
            eos_token,
            constraints: OnceLock::new(),
        }
    }

    /// The Hugging Face tokenizer (for the constraint compiler's byte trie).
    pub(crate) fn hf(&self) -> &tokenizers::Tokenizer {
        &self.inner
    }

    /// The EOS token's text (empty when unknown).
    pub(crate) fn eos_token(&self) -> &str {
        &self.eos_token
    }

    /// The structured-output compiler over this vocabulary, built on first use
    /// (tens of milliseconds) and shared afterwards.
    pub fn constraints(&self) -> Result<Arc<ConstraintCompiler>> {
        self.constraints
            .get_or_init(|| {
                ConstraintCompiler::new(self)
                    .map(Arc::new)
                    .map_err(|e| e.to_string())
            })
            .clone()
            .map_err(EngineError::Tokenizer)
    }

    /// Tokens in the tokenizer's vocabulary, special tokens included.
    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }

    /// The id of a token given as text, if it is in the vocabulary.
    pub fn token_to_id(&self, token: &str) -> Option<u32> {
        self.inner.token_to_id(token)
    }

    /// Tokenizes `text`; `add_special_tokens` adds what the tokenizer's post-processor
    /// adds (e.g. a BOS token).
    pub fn encode(&self, text: &str, add_special_tokens: bool) -> Result<Vec<u32>> {
        let enc = self
            .inner
            .encode(text, add_special_tokens)
            .map_err(|e| EngineError::Tokenizer(format!("cannot encode: {e}")))?;
        Ok(enc.get_ids().to_vec())
    }

    /// Text of `ids`, special tokens left out.
    pub fn decode(&self, ids: &[u32]) -> Result<String> {
        self.decode_with(ids, true)
    }

    /// Text of `ids`, special tokens left out or (`skip_special` false) kept.
    pub fn decode_with(&self, ids: &[u32], skip_special: bool) -> Result<String> {
        self.inner
            .decode(ids, skip_special)
            .map_err(|e| EngineError::Tokenizer(format!("cannot decode: {e}")))
    }

    /// The vocabulary's string for token `id` as the tokenizer stores it
    /// (byte-level pieces such as `Ġthe`, as transformers'
    /// `convert_ids_to_tokens`); `None` outside the vocabulary.
    pub fn id_to_token(&self, id: u32) -> Option<String> {
        self.inner.id_to_token(id)
    }

    /// The content of added token `id` (a special token, or another token the
    /// tokenizer adds to the model's vocabulary); `None` for any other.
    pub fn added_token(&self, id: u32) -> Option<&str> {
        let added = self.inner.get_added_vocabulary().get_added_tokens_decoder();
        added.get(&id).map(|t| t.content.as_str())
    }

    /// The text of one token on its own, special tokens included (what
    /// log probabilities name a token by, as vLLM does); a token holding part
    /// of a multi-byte character gives U+FFFD for it.
    pub fn token_text(&self, id: u32) -> Result<String> {
        self.inner
            .decode(&[id], false)
            .map_err(|e| EngineError::Tokenizer(format!("cannot decode: {e}")))
    }

    /// Whether the model ships a chat template.
    pub fn has_chat_template(&self) -> bool {
        self.chat_template.is_some()
    }

    /// Renders a chat into the prompt text the model was trained on.
    pub fn apply_chat_template(
        &self,
        messages: &[ChatMessage],
        add_generation_prompt: bool,
    ) -> Result<String> {
        self.render_chat(
            minijinja::Value::from_serialize(messages),
            None,
            &ChatOptions {
                add_generation_prompt,
                ..ChatOptions::default()
            },
        )
    }

    /// Whether the chat template reads a `tools` variable (function
    /// definitions offered to the model), as tool-calling templates do.
    pub fn chat_template_takes_tools(&self) -> bool {
        self.chat_template
            .as_deref()
            .is_some_and(|t| t.contains("tools"))
    }

    /// Renders a chat given as OpenAI-shaped JSON messages (which may carry
    /// `tool_calls`, `tool_call_id` and a `null` content) with `tools` (a
    /// list of OpenAI tool definitions) in the template's context, as
    /// transformers' `apply_chat_template(messages, tools=..., **options)` does.
    pub fn apply_chat_template_json(
        &self,
        messages: &serde_json::Value,
        tools: Option<&serde_json::Value>,
        options: &ChatOptions<'_>,
    ) -> Result<String> {
        let rendered = self.render_chat(
            minijinja::Value::from_serialize(messages),
            tools.map(minijinja::Value::from_serialize),
            options,
        )?;
        if !options.continue_final_message {
            return Ok(rendered);
        }
        let last = messages
            .as_array()
            .and_then(|m| m.last())
            .and_then(|m| m.get("content"))
            .and_then(serde_json::Value::as_str)
            .unwrap_or_default();
        open_final_message(rendered, last)
    }

    fn render_chat(
        &self,
        messages: minijinja::Value,
        tools: Option<minijinja::Value>,
        options: &ChatOptions<'_>,
    ) -> Result<String> {
        let bad = |m: String| EngineError::ChatTemplate(m);
        let template = self
            .chat_template
            .as_deref()
            .ok_or_else(|| bad("the model has no chat template".into()))?;
        if options.continue_final_message && options.add_generation_prompt {
            return Err(bad(
                "continue_final_message and add_generation_prompt are not \
                 compatible: continue_final_message continues the final message, \
                 add_generation_prompt starts a new assistant message (set it to false)"
                    .into(),
            ));
        }
        let mut env = minijinja::Environment::new();
        minijinja_contrib::add_to_environment(&mut env);
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_function(
            "raise_exception",
            |msg: String| -> std::result::Result<String, minijinja::Error> {
                Err(minijinja::Error::new(
                    minijinja::ErrorKind::InvalidOperation,
                    msg,
                ))
            },
        );
        env.add_template("chat", template)
            .map_err(|e| bad(e.to_string()))?;
        let tmpl = env.get_template("chat").map_err(|e| bad(e.to_string()))?;
        // What the template reads: a document or keyword argument it does not
        // read is refused, not dropped.
        let reads = tmpl.undeclared_variables(false);
        if options.documents.is_some() && !reads.contains("documents") {
            return Err(bad(
                "documents: this model's chat template does not read documents".into(),
            ));
        }
        // `tools` and `documents` are left undefined (not `none`) when not
        // given, as transformers leaves them, so `{% if tools is defined %}`
        // reads right.
        let mut ctx = minijinja::context! {
            messages => messages,
            add_generation_prompt => options.add_generation_prompt,
            bos_token => self.bos_token,
            eos_token => self.eos_token,
        };
        if let Some(tools) = tools {
            ctx = minijinja::context! { tools => tools, ..ctx };
        }
        if let Some(documents) = options.documents {
            ctx = minijinja::context! { documents => minijinja::Value::from_serialize(documents), ..ctx };
        }
        for key in options.template_kwargs.into_iter().flat_map(|m| m.keys()) {
            if RESERVED_TEMPLATE_VARIABLES.contains(&key.as_str()) {
                return Err(bad(format!(
                    "chat_template_kwargs: `{key}` is set by the request itself, not as a \
                     template keyword argument"
                )));
            }
            if !reads.contains(key.as_str()) {
                return Err(bad(format!(
                    "chat_template_kwargs: this model's chat template does not read `{key}`"
                )));
            }
        }
        if let Some(kwargs) = options.template_kwargs {
            ctx = minijinja::context! { ..ctx, ..minijinja::Value::from_serialize(kwargs) };
        }
        tmpl.render(ctx).map_err(|e| bad(e.to_string()))
    }
}

/// Template variables a request sets through fields of its own.
const RESERVED_TEMPLATE_VARIABLES: &[&str] = &[
    "messages",
    "tools",
    "documents",
    "add_generation_prompt",
    "continue_final_message",
    "bos_token",
    "eos_token",
];

/// How a chat is rendered beyond its messages: transformers'
/// `apply_chat_template` keyword arguments (vLLM's chat request fields of the
/// same names).
#[derive(Debug, Default, Clone, Copy)]
pub struct ChatOptions<'a> {
    /// End with the template's header of a new assistant message.
    pub add_generation_prompt: bool,
    /// End right after the final message's content, open for the model to
    /// continue it (its end-of-turn left out).
    pub continue_final_message: bool,
    /// `documents` for templates that read them (retrieval-augmented chats).
    pub documents: Option<&'a serde_json::Value>,
    /// Further variables for the template (vLLM's `chat_template_kwargs`,
    /// e.g. `enable_thinking`); each must be one the template reads.
    pub template_kwargs: Option<&'a serde_json::Map<String, serde_json::Value>>,
}

/// `rendered` cut right after the last occurrence of the final message's
/// `content`, as transformers' `continue_final_message` cuts it (the stripped
/// content where the template strips it).
fn open_final_message(mut rendered: String, content: &str) -> Result<String> {
    let at = match rendered.rfind(content) {
        Some(at) if !content.is_empty() => at + content.len(),
        _ => {
            let trimmed = content.trim();
            match rendered.rfind(trimmed) {
                Some(at) if !trimmed.is_empty() => at + trimmed.len(),
                _ => {
                    return Err(EngineError::ChatTemplate(
                        "continue_final_message: the final message's content does not appear \
                         in the chat the template renders (it must be a non-empty string)"
                            .into(),
                    ));
                }
            }
        }
    };
    rendered.truncate(at);
    Ok(rendered)
}

/// Turns a growing list of token ids into text deltas, holding back an
/// incomplete UTF-8 character until its last byte arrives.
///
/// Decoding only the newest token is wrong for byte-level and sentencepiece
/// tokenizers (spaces and multi-byte characters span tokens), and decoding
/// everything each step is quadratic; like vLLM and TGI, decode a small
/// window before the new tokens and emit the difference.
#[derive(Debug, Default, Clone)]
pub struct Detokenizer {
    prefix_offset: usize,
    read_offset: usize,
    /// Special tokens' text is kept (vLLM's `skip_special_tokens: false`).
    keep_special: bool,
    /// An added token that follows another is emitted as its bare content
    /// (vLLM's `spaces_between_special_tokens: false`, with `keep_special`).
    bare_added: bool,
    /// The last token emitted was an added token (with `bare_added`).
    last_added: bool,
}

impl Detokenizer {
    /// A detokenizer whose text starts after `ids[..start]` (e.g. after the prompt).
    pub fn starting_at(start: usize) -> Self {
        Detokenizer {
            prefix_offset: start,
            read_offset: start,
            ..Detokenizer::default()
        }
    }

    /// The same, keeping special tokens' text when `keep` (vLLM's
    /// `skip_special_tokens: false`).
    pub fn keeping_special(self, keep: bool) -> Self {
        Detokenizer {
            keep_special: keep,
            ..self
        }
    }

    /// With special tokens kept, `spaced` false emits an added token that
    /// follows another as its bare content, as vLLM's fast detokenizer does for
    /// `spaces_between_special_tokens: false` (a decoder such as WordPiece's
    /// would put a space before it); true, the default, leaves the decoder's text.
    pub fn spacing_special(self, spaced: bool) -> Self {
        Detokenizer {
            bare_added: !spaced,
            ..self
        }
    }

    fn decode(&self, tokenizer: &Tokenizer, ids: &[u32]) -> Result<String> {
        tokenizer.decode_with(ids, !self.keep_special)
    }

    /// Whatever text the tokens not yet turned into text make, for the end of
    /// a generation, less an unfinished character at its end (which decodes
    /// as U+FFFD): vLLM's detokenizers never emit one, so a generation cut
    /// mid-character ends before it.
    pub fn flush(&mut self, tokenizer: &Tokenizer, ids: &[u32]) -> Result<String> {
        let prefix = self.decode(tokenizer, &ids[self.prefix_offset..self.read_offset])?;
        let full = self.decode(tokenizer, &ids[self.prefix_offset..])?;
        self.prefix_offset = ids.len();
        self.read_offset = ids.len();
        let tail = full.get(prefix.len()..).unwrap_or_default();
        Ok(tail.trim_end_matches('\u{FFFD}').to_string())
    }

    /// The text completed by the tokens of `ids` not yet turned into text.
    pub fn step(&mut self, tokenizer: &Tokenizer, ids: &[u32]) -> Result<String> {
        let new = self.read_offset..ids.len();
        let prefix = self.decode(tokenizer, &ids[self.prefix_offset..self.read_offset])?;
        let full = self.decode(tokenizer, &ids[self.prefix_offset..])?;
        let mut delta = String::new();
        if full.len() > prefix.len()
            && !full.ends_with('\u{FFFD}')
            && full.is_char_boundary(prefix.len())
        {
            delta = full[prefix.len()..].to_string();
            self.prefix_offset = self.read_offset;
            self.read_offset = ids.len();
        }
        if self.bare_added && self.keep_special {
            // vLLM's rule, token by token: an added token after an added token
            // is its content alone.
            let new = ids.get(new).unwrap_or_default();
            let last = new.last().and_then(|&id| tokenizer.added_token(id));
            if let (Some(content), [_], true) = (last, new, self.last_added)
                && !delta.is_empty()
            {
                delta = content.to_string();
            }
            self.last_added = last.is_some();
        }
        Ok(delta)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn with_template(template: &str) -> Tokenizer {
        let model = tokenizers::models::wordlevel::WordLevel::builder()
            .vocab([("a".to_string(), 0)].into_iter().collect())
            .unk_token("a".into())
            .build()
            .unwrap();
        Tokenizer::from_parts(
            tokenizers::Tokenizer::new(model),
            Some(template.into()),
            String::new(),
            String::new(),
        )
    }

    #[test]
    fn tools_reach_the_template_and_calls_render() {
        let tok = with_template(
            "{% if tools is defined %}T:{% for t in tools %}{{ t.function.name }};{% endfor %}{% endif %}\
             {% for m in messages %}{{ m.role }}={% if m.tool_calls %}\
             {% for c in m.tool_calls %}{{ c.function.name }}({{ c.function.arguments | tojson }}){% endfor %}\
             {% else %}{{ m.content }}{% endif %}|{% endfor %}",
        );
        assert!(tok.chat_template_takes_tools());
        let messages = serde_json::json!([
            {"role": "user", "content": "hi"},
            {"role": "assistant", "content": null, "tool_calls": [
                {"id": "call_1", "type": "function", "function": {"name": "f", "arguments": {"x": 1}}}]},
            {"role": "tool", "tool_call_id": "call_1", "content": "2"},
        ]);
        let tools = serde_json::json!([{"type": "function", "function": {"name": "f"}}]);
        let text = tok
            .apply_chat_template_json(&messages, Some(&tools), &ChatOptions::default())
            .unwrap();
        assert_eq!(text, "T:f;user=hi|assistant=f({\"x\":1})|tool=2|");
        let text = tok
            .apply_chat_template_json(&messages, None, &ChatOptions::default())
            .unwrap();
        assert!(text.starts_with("user=hi|"), "{text}");
    }

    /// A ChatML-like template that strips contents and reads `enable_thinking`
    /// and `documents`.
    const CHATML: &str = "{% for d in documents or [] %}doc:{{ d.text }}\n{% endfor %}\
        {% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content | trim }}<|im_end|>\n{% endfor %}\
        {% if add_generation_prompt %}<|im_start|>assistant\n\
        {% if enable_thinking is defined and not enable_thinking %}<think></think>{% endif %}{% endif %}";

    #[test]
    fn continue_final_message_leaves_the_last_message_open() {
        let tok = with_template(CHATML);
        let messages = serde_json::json!([
            {"role": "user", "content": "Name a colour."},
            {"role": "assistant", "content": "The colour is "},
        ]);
        let open = ChatOptions {
            continue_final_message: true,
            ..ChatOptions::default()
        };
        // The template strips the content: cut after its stripped form.
        let text = tok
            .apply_chat_template_json(&messages, None, &open)
            .unwrap();
        assert_eq!(
            text,
            "<|im_start|>user\nName a colour.<|im_end|>\n<|im_start|>assistant\nThe colour is"
        );
        let closed = tok
            .apply_chat_template_json(&messages, None, &ChatOptions::default())
            .unwrap();
        assert!(closed.ends_with("The colour is<|im_end|>\n"), "{closed}");
        // Both at once is a contradiction, refused as transformers refuses it.
        let both = ChatOptions {
            add_generation_prompt: true,
            ..open
        };
        let err = tok
            .apply_chat_template_json(&messages, None, &both)
            .unwrap_err();
        assert!(err.to_string().contains("not compatible"), "{err}");
        // A final message the rendering does not contain cannot be continued.
        let empty = serde_json::json!([{"role": "assistant", "content": "  "}]);
        let err = tok
            .apply_chat_template_json(&empty, None, &open)
            .unwrap_err();
        assert!(err.to_string().contains("continue_final_message"), "{err}");
    }

    #[test]
    fn template_kwargs_and_documents_reach_the_template_or_are_refused() {
        let tok = with_template(CHATML);
        let messages = serde_json::json!([{"role": "user", "content": "hi"}]);
        let kwargs = |v: serde_json::Value| v.as_object().cloned().unwrap();
        let off = kwargs(serde_json::json!({"enable_thinking": false}));
        let generate = ChatOptions {
            add_generation_prompt: true,
            ..ChatOptions::default()
        };
        let text = tok
            .apply_chat_template_json(
                &messages,
                None,
                &ChatOptions {
                    template_kwargs: Some(&off),
                    ..generate
                },
            )
            .unwrap();
        assert!(
            text.ends_with("<|im_start|>assistant\n<think></think>"),
            "{text}"
        );
        let plain = tok
            .apply_chat_template_json(&messages, None, &generate)
            .unwrap();
        assert!(plain.ends_with("<|im_start|>assistant\n"), "{plain}");
        // A variable the template never reads, or one a field of its own sets.
        for (bad, says) in [
            (
                serde_json::json!({"enable_thinkin": false}),
                "does not read `enable_thinkin`",
            ),
            (
                serde_json::json!({"add_generation_prompt": false}),
                "set by the request itself",
            ),
        ] {
            let bad = kwargs(bad);
            let err = tok
                .apply_chat_template_json(
                    &messages,
                    None,
                    &ChatOptions {
                        template_kwargs: Some(&bad),
                        ..generate
                    },
                )
                .unwrap_err();
            assert!(err.to_string().contains(says), "{err}");
        }
        let docs = serde_json::json!([{"text": "Paris is in France."}]);
        let text = tok
            .apply_chat_template_json(
                &messages,
                None,
                &ChatOptions {
                    documents: Some(&docs),
                    ..generate
                },
            )
            .unwrap();
        assert!(
            text.starts_with("doc:Paris is in France.\n<|im_start|>user"),
            "{text}"
        );
        let no_docs = with_template("{% for m in messages %}{{ m.content }}{% endfor %}");
        let err = no_docs
            .apply_chat_template_json(
                &messages,
                None,
                &ChatOptions {
                    documents: Some(&docs),
                    ..ChatOptions::default()
                },
            )
            .unwrap_err();
        assert!(err.to_string().contains("does not read documents"), "{err}");
    }

    #[test]
    fn a_template_without_tools_says_so() {
        let tok = with_template("{% for m in messages %}{{ m.content }}{% endfor %}");
        assert!(!tok.chat_template_takes_tools());
    }

    /// A word-level tokenizer without a decoder (its tokens' text joined by
    /// spaces, as BERT-style decoders do), with `[A]` and `[B]` added as
    /// special tokens.
    fn spaced_words() -> (Tokenizer, [u32; 4]) {
        let vocab = [("x", 0), ("y", 1), ("p", 2)]
            .into_iter()
            .map(|(w, i)| (w.to_string(), i))
            .collect();
        let model = tokenizers::models::wordlevel::WordLevel::builder()
            .vocab(vocab)
            .unk_token("p".into())
            .build()
            .unwrap();
        let mut inner = tokenizers::Tokenizer::new(model);
        inner.add_special_tokens(&[
            tokenizers::AddedToken::from("[A]", true),
            tokenizers::AddedToken::from("[B]", true),
        ]);
        let id = |t: &str| inner.token_to_id(t).unwrap();
        let ids = [id("x"), id("[A]"), id("[B]"), id("y")];
        let tok = Tokenizer::from_parts(inner, None, String::new(), String::new());
        (tok, ids)
    }

    #[test]
    fn a_generation_cut_mid_character_ends_before_it() {
        let dir = tempfile::tempdir().expect("tempdir");
        crate::synth::write_model_dir(dir.path(), &crate::synth::SynthSpec::default())
            .expect("synth");
        let tok = crate::ModelDir::open(dir.path()).expect("open").tokenizer;
        let ids = tok.encode("ok 🎉", false).expect("encode");
        assert!(ids.len() >= 3, "the emoji is several byte tokens: {ids:?}");
        // All but the emoji's last byte: its first bytes are held back.
        let cut = &ids[..ids.len() - 1];
        let mut detok = Detokenizer::starting_at(0);
        let mut text = String::new();
        for end in 1..=cut.len() {
            text += &detok.step(&tok, &cut[..end]).expect("step");
        }
        text += &detok.flush(&tok, cut).expect("flush");
        assert_eq!(text, "ok ", "no U+FFFD for the unfinished character");
        // Whole, the emoji comes out.
        let mut detok = Detokenizer::starting_at(0);
        let mut whole = String::new();
        for end in 1..=ids.len() {
            whole += &detok.step(&tok, &ids[..end]).expect("step");
        }
        whole += &detok.flush(&tok, &ids).expect("flush");
        assert_eq!(whole, "ok 🎉");
    }

    /// The text deltas of `ids` generated one at a time after a one-token prompt.
    fn deltas(tok: &Tokenizer, mut detok: Detokenizer, ids: &[u32]) -> Vec<String> {
        let mut all = vec![2u32];
        ids.iter()
            .map(|&id| {
                all.push(id);
                detok.step(tok, &all).unwrap()
            })
            .collect()
    }

    #[test]
    fn spaces_between_special_tokens_false_gives_added_tokens_after_added_tokens_bare() {
        let (tok, ids) = spaced_words();
        assert_eq!(tok.added_token(ids[1]), Some("[A]"));
        assert_eq!(tok.added_token(ids[0]), None);
        let kept = Detokenizer::starting_at(1).keeping_special(true);
        // The decoder's spacing, as vLLM leaves it by default.
        assert_eq!(
            deltas(&tok, kept.clone(), &ids),
            ["x", " [A]", " [B]", " y"]
        );
        // vLLM's `spaces_between_special_tokens: false`: only `[B]`, which
        // follows an added token, loses its space.
        let bare = kept.spacing_special(false);
        assert_eq!(deltas(&tok, bare.clone(), &ids), ["x", " [A]", "[B]", " y"]);
        // With special tokens skipped the setting changes nothing.
        let skipped = Detokenizer::starting_at(1).spacing_special(false);
        assert_eq!(deltas(&tok, skipped, &ids), ["x", "", "", " y"]);
    }
}
