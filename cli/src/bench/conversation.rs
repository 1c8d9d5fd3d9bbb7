//! The multi-turn workload: conversations that share a system prompt and
//! send their whole history every turn, as a chat client does.
//!
//! Every session starts with the same `--system-prompt-len` random tokens;
//! each of its `--turns` user turns is `--turn-len` tokens built as the
//! synthetic dataset builds a prompt (a run of ids from a random offset, so
//! turns differ and share no cache). Turn `k`'s prompt is the system prompt,
//! every earlier turn and every earlier answer, then turn `k`: what a prefix
//! cache can serve is everything but the newest turn. Answers go back as the
//! token ids that were streamed (or, as `--prompt-format text`, as their text).

use rand::Rng;

use super::dataset::{BenchPrompt, PromptInput, WORDS};
use super::record::RequestRecord;

/// Shape of the conversations.
#[derive(Clone, Copy, Debug)]
pub struct MultiTurnSpec {
    pub sessions: usize,
    pub turns: usize,
    pub system_prompt_len: usize,
    pub turn_len: usize,
    pub output_len: usize,
    pub vocab_size: u32,
    pub as_text: bool,
}

/// Every session's user turns and the system prompt they share.
#[derive(Clone, Debug)]
pub struct Conversations {
    pub system_prompt: Vec<u32>,
    /// `sessions[s][k]`: the token ids of session `s`'s turn `k`.
    pub sessions: Vec<Vec<Vec<u32>>>,
    /// A turn no session sends: the probe request's, so the probe warms
    /// only the shared system prompt.
    pub probe_turn: Vec<u32>,
    pub output_len: usize,
    pub as_text: bool,
}

impl Conversations {
    /// Draws the conversations `spec` describes from `rng`.
    pub fn synthetic(spec: &MultiTurnSpec, rng: &mut impl Rng) -> anyhow::Result<Self> {
        anyhow::ensure!(spec.vocab_size > 0, "--vocab-size must be positive");
        anyhow::ensure!(spec.sessions > 0, "--sessions must be positive");
        anyhow::ensure!(spec.turns > 0, "--turns must be positive");
        anyhow::ensure!(spec.turn_len > 0, "--turn-len must be positive");
        let vocab = spec.vocab_size as u64;
        let system_prompt = (0..spec.system_prompt_len)
            .map(|_| rng.random_range(0..spec.vocab_size))
            .collect();
        let n = spec.sessions * spec.turns;
        let mut turns = (0..=n).map(|i| turn_ids(i, spec.turn_len, vocab, rng));
        let sessions = (0..spec.sessions)
            .map(|_| turns.by_ref().take(spec.turns).collect())
            .collect();
        let probe_turn = turns.next().unwrap_or_default();
        Ok(Conversations {
            system_prompt,
            sessions,
            probe_turn,
            output_len: spec.output_len.max(1),
            as_text: spec.as_text,
        })
    }

    pub fn turns(&self) -> usize {
        self.sessions.first().map_or(0, Vec::len)
    }

    /// Requests in a whole run: every turn of every session.
    pub fn num_requests(&self) -> usize {
        self.sessions.len() * self.turns()
    }

    /// The probe request: the system prompt and a turn of its own.
    pub fn probe(&self) -> BenchPrompt {
        let mut h = self.history();
        h.push_turn(&self.probe_turn);
        h.prompt(self.output_len)
    }

    /// A new session's history: the system prompt alone.
    pub fn history(&self) -> History {
        let mut h = History {
            ids: Vec::new(),
            text: String::new(),
            tokens: 0,
            as_text: self.as_text,
        };
        h.push_turn(&self.system_prompt);
        h
    }
}

/// Turn `i`: `len` ids running on from a random offset, as a synthetic prompt.
fn turn_ids(i: usize, len: usize, vocab: u64, rng: &mut impl Rng) -> Vec<u32> {
    let offset = rng.random_range(0..vocab);
    (0..len as u64)
        .map(|j| ((offset + i as u64 + j) % vocab) as u32)
        .collect()
}

/// What one session has said and heard so far: the next prompt's prefix.
#[derive(Clone, Debug)]
pub struct History {
    ids: Vec<u32>,
    text: String,
    /// Length in tokens (exact for ids, approximate for text).
    tokens: usize,
    as_text: bool,
}

impl History {
    /// Appends user (or system) tokens.
    pub fn push_turn(&mut self, ids: &[u32]) {
        self.tokens += ids.len();
        if self.as_text {
            for &id in ids {
                if !self.text.is_empty() {
                    self.text.push(' ');
                }
                self.text.push_str(WORDS[id as usize % WORDS.len()]);
            }
        } else {
            self.ids.extend_from_slice(ids);
        }
    }

    /// Appends the answer a request streamed.
    pub fn push_answer(&mut self, answer: &RequestRecord) {
        if self.as_text {
            if !answer.answer_text.starts_with(char::is_whitespace) {
                self.text.push(' ');
            }
            self.text.push_str(&answer.answer_text);
            self.tokens += answer.output_tokens as usize;
        } else {
            self.ids.extend_from_slice(&answer.answer_ids);
            self.tokens += answer.answer_ids.len();
        }
    }

    /// The whole history as a prompt asking for `output_len` tokens.
    pub fn prompt(&self, output_len: usize) -> BenchPrompt {
        BenchPrompt {
            input: if self.as_text {
                PromptInput::Text(self.text.clone())
            } else {
                PromptInput::TokenIds(self.ids.clone())
            },
            input_len: self.tokens,
            output_len,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;
    use rand::rngs::StdRng;

    fn spec() -> MultiTurnSpec {
        MultiTurnSpec {
            sessions: 3,
            turns: 2,
            system_prompt_len: 8,
            turn_len: 5,
            output_len: 4,
            vocab_size: 500,
            as_text: false,
        }
    }

    fn ids(p: &BenchPrompt) -> Vec<u32> {
        match &p.input {
            PromptInput::TokenIds(ids) => ids.clone(),
            PromptInput::Text(_) => panic!("ids expected"),
        }
    }

    #[test]
    fn sessions_share_only_the_system_prompt() {
        let c = Conversations::synthetic(&spec(), &mut StdRng::seed_from_u64(0)).unwrap();
        assert_eq!(c.num_requests(), 6);
        let first: Vec<Vec<u32>> = c
            .sessions
            .iter()
            .map(|s| {
                let mut h = c.history();
                h.push_turn(&s[0]);
                ids(&h.prompt(4))
            })
            .collect();
        for p in &first {
            assert_eq!(p.len(), 13);
            assert_eq!(p[..8], c.system_prompt[..]);
            assert!(p.iter().all(|&id| id < 500));
        }
        assert_ne!(first[0][8..], first[1][8..]);
        assert_ne!(ids(&c.probe())[8..], first[0][8..]);
    }

    #[test]
    fn each_turn_resends_the_whole_history() {
        let c = Conversations::synthetic(&spec(), &mut StdRng::seed_from_u64(1)).unwrap();
        let s = &c.sessions[0];
        let mut h = c.history();
        h.push_turn(&s[0]);
        let turn0 = ids(&h.prompt(4));
        h.push_answer(&RequestRecord {
            answer_ids: vec![7, 8, 9, 10],
            ..Default::default()
        });
        h.push_turn(&s[1]);
        let turn1 = h.prompt(4);
        assert_eq!(turn1.input_len, 8 + 5 + 4 + 5);
        let turn1 = ids(&turn1);
        assert_eq!(turn1[..13], turn0[..]);
        assert_eq!(turn1[13..17], [7, 8, 9, 10]);
        assert_eq!(turn1[17..], s[1][..]);
    }

    #[test]
    fn text_history_has_one_word_per_token() {
        let spec = MultiTurnSpec {
            as_text: true,
            ..spec()
        };
        let c = Conversations::synthetic(&spec, &mut StdRng::seed_from_u64(0)).unwrap();
        let mut h = c.history();
        h.push_turn(&c.sessions[0][0]);
        let PromptInput::Text(t) = h.prompt(4).input else {
            panic!("text expected")
        };
        assert_eq!(t.split(' ').count(), 13);
        assert!(
            Conversations::synthetic(
                &MultiTurnSpec { turns: 0, ..spec },
                &mut StdRng::seed_from_u64(0)
            )
            .is_err()
        );
    }
}
