//! `n` and `best_of` on the HTTP API: the checks vLLM makes, and the
//! assembly of a non-streamed answer's choices from the samples' interleaved
//! responses (each tagged with its `index`, see `generate/fanout.rs`).
//!
//! `best_of` > `n` runs `best_of` samples and returns the `n` with the
//! highest cumulative log probability (the sum of their tokens' log
//! probabilities, as vLLM ranks them), re-indexed 0..n in that order. The
//! router asks the nodes for the chosen tokens' log probabilities to rank
//! them, and returns them only if the client asked. Usage counts the prompt
//! once and the completion tokens of the returned choices (as vLLM does).

use super::*;

/// How many samples to run and return.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Samples {
    /// Choices returned.
    pub n: u32,
    /// Samples run (`>= n`).
    pub best_of: u32,
}

impl Samples {
    /// Checks `n` and `best_of` as vLLM does, each error naming its field;
    /// `max` is the router's `max_n`.
    pub(super) fn check(
        n: Option<u32>,
        best_of: Option<u32>,
        stream: bool,
        max: u32,
    ) -> Result<Samples, ApiError> {
        let n = n.unwrap_or(1);
        if n < 1 {
            return Err(ApiError::bad_field("n", "n must be at least 1"));
        }
        if n > max {
            return Err(ApiError::bad_field(
                "n",
                format!("n = {n}: at most {max} samples per request (router.max_n)"),
            ));
        }
        let best_of = best_of.unwrap_or(n);
        if best_of < n {
            return Err(ApiError::bad_field(
                "best_of",
                format!(
                    "best_of must be greater than or equal to n, got n={n} and best_of={best_of}"
                ),
            ));
        }
        if best_of > max {
            return Err(ApiError::bad_field(
                "best_of",
                format!("best_of = {best_of}: at most {max} samples per request (router.max_n)"),
            ));
        }
        if stream && best_of > n {
            return Err(ApiError::bad_field(
                "best_of",
                "best_of > n is not supported with stream: the best samples are known only at the end",
            ));
        }
        Ok(Samples { n, best_of })
    }

    /// Whether the samples must be ranked (so their log probabilities are needed).
    pub(super) fn ranks(&self) -> bool {
        self.best_of > self.n
    }
}

/// One sample's answer, as its responses arrive.
#[derive(Default)]
pub(super) struct Choice {
    pub text: String,
    /// The generated tokens' ids.
    pub ids: Vec<u32>,
    pub logprobs: Vec<pb::TokenLogprobs>,
    pub finished: Option<pb::Finished>,
}

impl Choice {
    /// The sum of the sampled tokens' log probabilities.
    fn cumulative_logprob(&self) -> f64 {
        self.logprobs.iter().map(|l| f64::from(l.logprob)).sum()
    }
}

/// Every sample's answer, by index.
pub(super) struct Choices {
    samples: Vec<Choice>,
    /// The prompt's log probabilities, when asked (they come once, with sample 0).
    pub prompt_logprobs: Option<pb::PromptLogprobs>,
}

impl Choices {
    /// `count` samples, each starting with `echo` (completions' `echo`).
    pub(super) fn new(count: u32, echo: Option<&str>) -> Self {
        let samples = (0..count)
            .map(|_| Choice {
                text: echo.unwrap_or_default().to_string(),
                ..Default::default()
            })
            .collect();
        Choices {
            samples,
            prompt_logprobs: None,
        }
    }

    /// Takes one response of sample `index`.
    pub(super) fn add(
        &mut self,
        index: u32,
        event: pb::generate_response::Event,
    ) -> Result<(), Status> {
        let choice = self.samples.get_mut(index as usize).ok_or_else(|| {
            Status::internal(format!(
                "a response for sample {index}, which was not asked for"
            ))
        })?;
        match event {
            pb::generate_response::Event::Token(t) => {
                choice.text.push_str(&t.text);
                choice.ids.extend(&t.ids);
                choice.logprobs.extend(t.logprobs);
            }
            pb::generate_response::Event::Finished(f) => choice.finished = Some(f),
            pb::generate_response::Event::PromptLogprobs(p) => self.prompt_logprobs = Some(p),
        }
        Ok(())
    }

    /// The `n` choices to return, best first when `best_of` > `n`, and the
    /// request's usage: the prompt once, the returned choices' tokens summed.
    pub(super) fn pick(
        self,
        s: Samples,
    ) -> Result<(Vec<(Choice, pb::Finished)>, pb::Usage), Status> {
        let mut done = Vec::with_capacity(self.samples.len());
        for (i, mut c) in self.samples.into_iter().enumerate() {
            let f = c.finished.take().ok_or_else(|| {
                Status::internal(format!("sample {i} ended without a final message"))
            })?;
            done.push((c, f));
        }
        let first_usage = done.first().and_then(|(_, f)| f.usage).unwrap_or_default();
        if s.ranks() {
            // Stable: equal sums keep the lower index first.
            done.sort_by(|(a, _), (b, _)| {
                b.cumulative_logprob().total_cmp(&a.cumulative_logprob())
            });
        }
        done.truncate(s.n as usize);
        let usage = pb::Usage {
            prompt_tokens: first_usage.prompt_tokens,
            completion_tokens: done
                .iter()
                .map(|(_, f)| f.usage.map_or(0, |u| u.completion_tokens))
                .sum(),
            cached_tokens: first_usage.cached_tokens,
        };
        Ok((done, usage))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn token(text: &str, logprob: f32) -> pb::generate_response::Event {
        pb::generate_response::Event::Token(pb::TokenChunk {
            ids: vec![1],
            text: text.into(),
            logprobs: vec![pb::TokenLogprobs {
                id: 1,
                logprob,
                top: Vec::new(),
                rank: 0,
            }],
            prompt_tokens: 0,
        })
    }

    fn finished(prompt: u32, completion: u32) -> pb::generate_response::Event {
        pb::generate_response::Event::Finished(pb::Finished {
            usage: Some(pb::Usage {
                prompt_tokens: prompt,
                completion_tokens: completion,
                cached_tokens: 0,
            }),
            ..Default::default()
        })
    }

    #[test]
    fn checks_name_the_field() {
        let field = |r: Result<Samples, ApiError>| r.err().and_then(|e| e.param);
        assert_eq!(
            field(Samples::check(Some(0), None, false, 16)).as_deref(),
            Some("n")
        );
        assert_eq!(
            field(Samples::check(Some(17), None, false, 16)).as_deref(),
            Some("n")
        );
        assert_eq!(
            field(Samples::check(Some(3), Some(2), false, 16)).as_deref(),
            Some("best_of")
        );
        assert_eq!(
            field(Samples::check(Some(1), Some(17), false, 16)).as_deref(),
            Some("best_of")
        );
        assert_eq!(
            field(Samples::check(Some(1), Some(2), true, 16)).as_deref(),
            Some("best_of")
        );
        assert_eq!(
            Samples::check(Some(2), Some(2), true, 16).ok(),
            Some(Samples { n: 2, best_of: 2 })
        );
        assert_eq!(
            Samples::check(None, Some(3), false, 16).ok(),
            Some(Samples { n: 1, best_of: 3 })
        );
    }

    #[test]
    fn best_of_returns_the_highest_cumulative_logprob() {
        let mut c = Choices::new(3, None);
        c.add(0, token("a", -3.0)).unwrap();
        c.add(1, token("b", -0.5)).unwrap();
        c.add(2, token("c", -1.0)).unwrap();
        c.add(2, token("c", -1.0)).unwrap();
        for (i, n) in [(0, 1), (1, 1), (2, 2)] {
            c.add(i, finished(5, n)).unwrap();
        }
        let (picked, usage) = c.pick(Samples { n: 2, best_of: 3 }).unwrap();
        let texts: Vec<_> = picked.iter().map(|(c, _)| c.text.as_str()).collect();
        assert_eq!(texts, ["b", "cc"]);
        assert_eq!((usage.prompt_tokens, usage.completion_tokens), (5, 3));
    }

    #[test]
    fn n_keeps_index_order_and_sums_usage() {
        let mut c = Choices::new(2, Some("P"));
        c.add(1, token("y", -0.1)).unwrap();
        c.add(0, token("x", -9.0)).unwrap();
        c.add(1, finished(4, 1)).unwrap();
        c.add(0, finished(4, 1)).unwrap();
        assert!(c.add(2, finished(4, 1)).is_err());
        let (picked, usage) = c.pick(Samples { n: 2, best_of: 2 }).unwrap();
        let texts: Vec<_> = picked.iter().map(|(c, _)| c.text.as_str()).collect();
        assert_eq!(texts, ["Px", "Py"]);
        assert_eq!((usage.prompt_tokens, usage.completion_tokens), (4, 2));
    }

    #[test]
    fn a_sample_without_finish_is_an_error() {
        let mut c = Choices::new(2, None);
        c.add(0, finished(4, 1)).unwrap();
        assert!(c.pick(Samples { n: 2, best_of: 2 }).is_err());
    }
}
