//! Structured output: the generated text constrained to a JSON schema, any
//! JSON object, a regular expression, one of a list of strings, or a Lark
//! grammar, with [llguidance] (the library vLLM and SGLang use).
//!
//! Three pieces, from the longest-lived to the shortest:
//!
//! - [`ConstraintCompiler`]: the tokenizer's vocabulary as a byte trie
//!   ([`toktrie`]) and llguidance's parser factory. Built once per tokenizer
//!   (lazily, by [`Tokenizer::constraints`]) and shared by every request.
//! - [`Constraint`]: what a request asks for, plain data that travels on the wire.
//! - [`ConstraintState`]: one sequence's parser. Each step it gives the set of
//!   tokens the grammar allows next ([`ConstraintState::allowed`]), which
//!   [`crate::Generation`] turns into -inf logits before sampling, and it
//!   consumes every token the sequence gets ([`ConstraintState::advance`]),
//!   including those replayed after a failover, so its state is a function of
//!   the tokens alone.
//!
//! The model's EOS and the request's stop token ids are not the grammar's:
//! they are allowed exactly when the grammar accepts the text so far
//! (llguidance's own EOS bit is ignored). When the grammar can take no further
//! byte the generation ends with `stop` right away (see `Generation`).

use std::collections::HashMap;
use std::sync::Arc;

use llguidance::api::TopLevelGrammar;
use llguidance::{Matcher, ParserFactory};
use toktrie::{SimpleVob, TokEnv, TokRxInfo, TokTrie, TokenId, TokenizerEnv};

use crate::error::{EngineError, Result};
use crate::tokenizer::Tokenizer;

/// What the generated text must match.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Constraint {
    /// Any JSON object (OpenAI's `response_format: {"type": "json_object"}`).
    JsonObject,
    /// A JSON schema, as JSON text.
    JsonSchema(String),
    /// A regular expression the whole output matches.
    Regex(String),
    /// Exactly one of these strings.
    Choice(Vec<String>),
    /// A grammar in llguidance's Lark syntax.
    LarkGrammar(String),
    /// Only these token ids may be drawn, at every step (vLLM's
    /// `allowed_token_ids`; EOS too only when listed). Not a grammar: the
    /// output is never complete by it.
    AllowedTokenIds(Vec<u32>),
    /// Token sequences whose last token cannot be drawn right after the rest
    /// (a one-token sequence: never) (vLLM's `bad_words`, tokenized). Not a
    /// grammar either.
    BadWords(Vec<Vec<u32>>),
}

impl Constraint {
    /// The request field it came from, for error messages (vLLM's names).
    pub fn field(&self) -> &'static str {
        match self {
            Constraint::JsonObject => "response_format",
            Constraint::JsonSchema(_) => "guided_json",
            Constraint::Regex(_) => "guided_regex",
            Constraint::Choice(_) => "guided_choice",
            Constraint::LarkGrammar(_) => "guided_grammar",
            Constraint::AllowedTokenIds(_) => "allowed_token_ids",
            Constraint::BadWords(_) => "bad_words",
        }
    }

    fn grammar(&self) -> Result<TopLevelGrammar> {
        let invalid = |m: String| EngineError::InvalidInput(format!("{}: {m}", self.field()));
        Ok(match self {
            Constraint::JsonObject => {
                TopLevelGrammar::from_json_schema(serde_json::json!({ "type": "object" }))
            }
            Constraint::JsonSchema(text) => {
                let schema: serde_json::Value = serde_json::from_str(text)
                    .map_err(|e| invalid(format!("the schema is not valid JSON: {e}")))?;
                if !(schema.is_object() || schema.is_boolean()) {
                    return Err(invalid(format!(
                        "a JSON schema is an object or a boolean, got {schema}"
                    )));
                }
                TopLevelGrammar::from_json_schema(schema)
            }
            Constraint::Regex(rx) => TopLevelGrammar::from_regex(rx),
            Constraint::Choice(choices) => {
                if choices.is_empty() {
                    return Err(invalid("the list of choices is empty".into()));
                }
                let alternatives: Vec<String> = choices.iter().map(|c| escape_regex(c)).collect();
                TopLevelGrammar::from_regex(&format!("({})", alternatives.join("|")))
            }
            Constraint::LarkGrammar(lark) => TopLevelGrammar::from_lark(lark.clone()),
            Constraint::AllowedTokenIds(_) | Constraint::BadWords(_) => {
                return Err(invalid("token ids are not a grammar".into()));
            }
        })
    }
}

/// `text` as a regular expression matching exactly it (the metacharacters of
/// Rust's `regex-syntax`, which llguidance's regexes follow, escaped).
fn escape_regex(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        if "\\.+*?()|[]{}^$#&-~".contains(c) {
            out.push('\\');
        }
        out.push(c);
    }
    out
}

/// The tokenizer's vocabulary as llguidance needs it, and its parser factory:
/// built once per tokenizer, shared by every constrained request.
pub struct ConstraintCompiler {
    factory: ParserFactory,
    vocab_size: usize,
}

impl ConstraintCompiler {
    /// Builds the byte trie of `tokenizer`'s vocabulary (byte-level BPE or
    /// SentencePiece with byte fallback) and the parser factory over it.
    pub fn new(tokenizer: &Tokenizer) -> Result<Self> {
        let env = VocabEnv::new(tokenizer)?;
        let vocab_size = env.trie.vocab_size();
        let env: TokEnv = Arc::new(env);
        let mut factory = ParserFactory::new_simple(&env)
            .map_err(|e| EngineError::Tokenizer(format!("llguidance: {e}")))?;
        // llguidance logs grammar warnings to stderr by default; Tandem reports
        // errors through its own results and logs.
        factory.quiet();
        Ok(ConstraintCompiler {
            factory,
            vocab_size,
        })
    }

    /// Compiles `constraint` into a fresh parser for one sequence; a bad
    /// schema, regex or grammar is `InvalidInput` naming the field.
    pub fn start(&self, constraint: &Constraint) -> Result<ConstraintState> {
        match constraint {
            Constraint::AllowedTokenIds(ids) => return self.token_set(ids),
            Constraint::BadWords(words) => return self.bad_words(words),
            _ => {}
        }
        let grammar = constraint.grammar()?;
        let parser = self.factory.create_parser(grammar).map_err(|e| {
            EngineError::InvalidInput(format!("{}: cannot compile: {e}", constraint.field()))
        })?;
        let matcher = Matcher::new(Ok(parser));
        if let Some(e) = matcher.get_error() {
            return Err(EngineError::InvalidInput(format!(
                "{}: cannot compile: {e}",
                constraint.field()
            )));
        }
        Ok(ConstraintState {
            kind: StateKind::Grammar(Box::new(matcher)),
            field: constraint.field(),
            vocab_size: self.vocab_size,
        })
    }

    /// The state of `allowed_token_ids`: a fixed mask.
    fn token_set(&self, ids: &[u32]) -> Result<ConstraintState> {
        if ids.is_empty() {
            return Err(EngineError::InvalidInput(
                "allowed_token_ids: the list is empty".into(),
            ));
        }
        self.check_vocabulary("allowed_token_ids", ids)?;
        let mut mask = SimpleVob::alloc(self.vocab_size);
        for &id in ids {
            mask.allow_token(id);
        }
        Ok(ConstraintState {
            kind: StateKind::Tokens(mask),
            field: "allowed_token_ids",
            vocab_size: self.vocab_size,
        })
    }

    /// The state of `bad_words`: the sequences, and the tokens drawn so far
    /// that could start one.
    fn bad_words(&self, words: &[Vec<u32>]) -> Result<ConstraintState> {
        for w in words {
            if w.is_empty() {
                return Err(EngineError::InvalidInput(
                    "bad_words: a word has no tokens".into(),
                ));
            }
            self.check_vocabulary("bad_words", w)?;
        }
        Ok(ConstraintState {
            kind: StateKind::BadWords {
                words: words.to_vec(),
                tail: Vec::new(),
            },
            field: "bad_words",
            vocab_size: self.vocab_size,
        })
    }

    /// Every id of `ids` is in the vocabulary; else `InvalidInput` naming `field`.
    fn check_vocabulary(&self, field: &str, ids: &[u32]) -> Result<()> {
        match ids.iter().find(|&&id| id as usize >= self.vocab_size) {
            Some(id) => Err(EngineError::InvalidInput(format!(
                "{field}: token id {id} is outside the vocabulary (size {})",
                self.vocab_size
            ))),
            None => Ok(()),
        }
    }
}

/// One sequence's constraint state.
pub struct ConstraintState {
    kind: StateKind,
    field: &'static str,
    vocab_size: usize,
}

/// A grammar's parser, a fixed set of tokens, or bad words and the tokens
/// drawn last (as many as the longest word's prefix).
enum StateKind {
    Grammar(Box<Matcher>),
    Tokens(SimpleVob),
    BadWords {
        words: Vec<Vec<u32>>,
        tail: Vec<u32>,
    },
}

/// The tokens a constrained sequence may take next.
pub struct AllowedTokens {
    mask: SimpleVob,
    vocab_size: usize,
    /// The text so far is complete under the grammar: EOS (and stop token ids) may end it.
    pub accepting: bool,
}

impl AllowedTokens {
    /// Whether the grammar allows `token` next (EOS and stop ids aside: see
    /// [`accepting`](Self::accepting)).
    pub fn allows(&self, token: u32) -> bool {
        (token as usize) < self.vocab_size && self.mask.is_allowed(token)
    }

    /// Whether the grammar allows any token at all (EOS aside).
    pub fn any(&self) -> bool {
        self.mask.num_set() > 0
    }

    /// Sets to -inf the logits of the tokens not allowed next; the `ends`
    /// (EOS, stop ids) keep theirs only where the grammar accepts the text so
    /// far. False when nothing but an end is allowed.
    pub fn apply(&self, logits: &mut [f32], ends: &[u32]) -> bool {
        let kept: Vec<(usize, f32)> = if self.accepting {
            ends.iter()
                .filter_map(|&t| logits.get(t as usize).map(|&l| (t as usize, l)))
                .collect()
        } else {
            Vec::new()
        };
        for (t, l) in logits.iter_mut().enumerate() {
            if !self.allows(t as u32) {
                *l = f32::NEG_INFINITY;
            }
        }
        for (t, l) in kept {
            logits[t] = l;
        }
        self.any()
    }

    /// The tokens [`apply`](Self::apply) keeps as a packed bitmask over
    /// `vocab` logits (bit `t % 32` of word `t / 32` set when token `t` may be
    /// drawn): what a device applies to a row of logits in place of `apply`.
    /// `banned` ids are cleared too (`min_tokens`), unless only an end is left.
    pub fn packed(&self, vocab: usize, ends: &[u32], banned: &[u32]) -> Vec<u32> {
        let words = vocab.div_ceil(32);
        let mut bits = vec![0u32; words];
        let own = self.mask.as_slice();
        let n = words.min(own.len());
        bits[..n].copy_from_slice(&own[..n]);
        // The trie's vocabulary can be shorter or longer than the logits: no
        // bit past either.
        for t in self.vocab_size.min(vocab)..words * 32 {
            bits[t / 32] &= !(1 << (t % 32));
        }
        if self.accepting {
            for &t in ends.iter().filter(|&&t| (t as usize) < vocab) {
                bits[t as usize / 32] |= 1 << (t % 32);
            }
        }
        if self.any() {
            for &t in banned.iter().filter(|&&t| (t as usize) < vocab) {
                bits[t as usize / 32] &= !(1 << (t % 32));
            }
        }
        bits
    }
}

impl ConstraintState {
    /// The tokens the grammar allows after the tokens consumed so far.
    pub fn allowed(&mut self) -> Result<AllowedTokens> {
        let matcher = match &mut self.kind {
            StateKind::Grammar(m) => m,
            // The listed ids, EOS among them only if listed: the ends are
            // never added (`accepting` false).
            StateKind::Tokens(mask) => {
                return Ok(AllowedTokens {
                    mask: mask.clone(),
                    vocab_size: self.vocab_size,
                    accepting: false,
                });
            }
            // Everything but the last token of each word whose rest was just
            // drawn; EOS and stop ids as without a constraint.
            StateKind::BadWords { words, tail } => {
                let mut mask = SimpleVob::alloc_ones(self.vocab_size);
                for w in words.iter() {
                    let Some((last, rest)) = w.split_last() else {
                        continue;
                    };
                    if tail.ends_with(rest) {
                        mask.disallow_token(*last);
                    }
                }
                return Ok(AllowedTokens {
                    mask,
                    vocab_size: self.vocab_size,
                    accepting: true,
                });
            }
        };
        let field = self.field;
        let mut mask = matcher.compute_mask().map_err(|e| Self::error(field, e))?;
        let eos = matcher.tok_env().map_err(|e| Self::error(field, e))?;
        let trie_eos = eos.tok_trie().eos_token();
        let accepting = matcher.is_accepting().map_err(|e| Self::error(field, e))?;
        // The trie's EOS placeholder stands for "the grammar may end"; the
        // generation decides which real ids that allows.
        if (trie_eos as usize) < self.vocab_size {
            mask.disallow_token(trie_eos);
        }
        Ok(AllowedTokens {
            mask,
            vocab_size: self.vocab_size,
            accepting,
        })
    }

    /// Sets to -inf the logits of the tokens the grammar does not allow next;
    /// the `ends` (EOS, stop ids) keep theirs only where the grammar accepts
    /// the text so far. False when nothing but an end is allowed.
    pub fn mask_logits(&mut self, logits: &mut [f32], ends: &[u32]) -> Result<bool> {
        Ok(self.allowed()?.apply(logits, ends))
    }

    /// Consumes tokens already generated (on a node that then failed, or
    /// sampled elsewhere), in order.
    pub fn replay(&mut self, tokens: &[u32]) -> Result<()> {
        tokens.iter().try_for_each(|&t| self.advance(t))
    }

    /// Consumes the sequence's next token. A token the grammar does not allow
    /// (only a token sampled elsewhere without the constraint could be one) is
    /// `InvalidInput`.
    pub fn advance(&mut self, token: u32) -> Result<()> {
        let field = self.field;
        match &mut self.kind {
            StateKind::Grammar(m) => m.consume_token(token).map_err(|e| Self::error(field, e)),
            StateKind::Tokens(mask) if mask.is_allowed(token) => Ok(()),
            StateKind::BadWords { words, tail } => {
                tail.push(token);
                let keep = words.iter().map(|w| w.len() - 1).max().unwrap_or(0);
                if tail.len() > keep {
                    tail.drain(..tail.len() - keep);
                }
                Ok(())
            }
            StateKind::Tokens(_) => Err(EngineError::InvalidInput(format!(
                "{field}: token {token} is not one of the allowed ids"
            ))),
        }
    }

    /// Whether the grammar can take no further token: the output is complete
    /// (never, for allowed ids or bad words).
    pub fn is_stopped(&self) -> bool {
        match &self.kind {
            StateKind::Grammar(m) => m.is_stopped(),
            StateKind::Tokens(_) | StateKind::BadWords { .. } => false,
        }
    }

    /// An llguidance error as `InvalidInput` naming the request's field.
    fn error(field: &str, e: impl std::fmt::Display) -> EngineError {
        EngineError::InvalidInput(format!("{field}: {e}"))
    }
}

/// The vocabulary as bytes for llguidance's trie, tokenizing through the
/// model's tokenizer when llguidance needs a string's canonical tokens.
struct VocabEnv {
    trie: TokTrie,
    tokenizer: tokenizers::Tokenizer,
}

impl VocabEnv {
    fn new(tokenizer: &Tokenizer) -> Result<Self> {
        let hf = tokenizer.hf();
        let vocab_size = hf.get_vocab_size(true);
        let specials: HashMap<u32, String> = hf
            .get_added_tokens_decoder()
            .into_iter()
            .filter(|(_, t)| t.special)
            .map(|(id, t)| (id, t.content))
            .collect();
        let byte_level = !is_byte_fallback(hf);
        let char_map = byte_level_chars();
        let mut words = vec![Vec::new(); vocab_size];
        for (id, word) in words.iter_mut().enumerate() {
            let id = id as u32;
            let Some(name) = hf.id_to_token(id) else {
                continue;
            };
            *word = if let Some(content) = specials.get(&id) {
                // Special tokens are never text: the trie keeps them apart.
                let mut b = vec![TokTrie::SPECIAL_TOKEN_MARKER];
                b.extend_from_slice(content.as_bytes());
                b
            } else if byte_level {
                match name.chars().map(|c| char_map.get(&c).copied()).collect() {
                    Some(bytes) => bytes,
                    // An added (non-special) token is stored as plain text.
                    None => name.into_bytes(),
                }
            } else if let Some(byte) = byte_fallback(&name) {
                vec![byte]
            } else {
                name.replace('\u{2581}', " ").into_bytes()
            };
        }
        let eos = specials
            .iter()
            .find(|(_, c)| c.as_str() == tokenizer.eos_token())
            .map_or(0, |(&id, _)| id);
        let info = TokRxInfo::new(vocab_size as u32, eos);
        Ok(VocabEnv {
            trie: TokTrie::from(&info, &words),
            tokenizer: hf.clone(),
        })
    }
}

impl TokenizerEnv for VocabEnv {
    fn tok_trie(&self) -> &TokTrie {
        &self.trie
    }

    fn tokenize_bytes(&self, s: &[u8]) -> Vec<TokenId> {
        self.trie.tokenize_with_greedy_fallback(s, |s| {
            // On a tokenizer error the trie's greedy tokenization stands.
            self.tokenizer
                .encode(s, false)
                .map(|e| e.get_ids().to_vec())
                .unwrap_or_default()
        })
    }
}

/// Whether the tokenizer's decoder is SentencePiece's byte fallback
/// (`<0x41>` tokens, `▁` for a space) rather than byte-level BPE.
fn is_byte_fallback(hf: &tokenizers::Tokenizer) -> bool {
    hf.get_decoder()
        .and_then(|d| serde_json::to_string(d).ok())
        .is_some_and(|d| d.contains("\"ByteFallback\""))
}

/// The byte a `<0xNN>` token stands for.
fn byte_fallback(name: &str) -> Option<u8> {
    let hex = name.strip_prefix("<0x")?.strip_suffix('>')?;
    if hex.len() != 2 {
        return None;
    }
    u8::from_str_radix(hex, 16).ok()
}

/// Byte-level BPE's character for each byte (GPT-2's table), inverted.
fn byte_level_chars() -> HashMap<char, u8> {
    let printable = |b: u8| matches!(b, b'!'..=b'~' | 0xA1..=0xAC | 0xAE..=0xFF);
    let mut next = 0x100u32;
    let mut map = HashMap::with_capacity(256);
    for b in 0..=255u8 {
        if printable(b) {
            map.insert(b as char, b);
        } else {
            if let Some(c) = char::from_u32(next) {
                map.insert(c, b);
            }
            next += 1;
        }
    }
    map
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn escaped_choices_are_literal() {
        assert_eq!(escape_regex("a.b"), "a\\.b");
        assert_eq!(escape_regex("(x|y)"), "\\(x\\|y\\)");
        assert_eq!(escape_regex("plain text"), "plain text");
    }

    #[test]
    fn byte_tokens() {
        assert_eq!(byte_fallback("<0x41>"), Some(0x41));
        assert_eq!(byte_fallback("<0x4>"), None);
        assert_eq!(byte_fallback("abc"), None);
        let chars = byte_level_chars();
        assert_eq!(chars.len(), 256);
        assert_eq!(chars.get(&'\u{120}'), Some(&b' '));
        assert_eq!(chars.get(&'a'), Some(&b'a'));
    }
}
