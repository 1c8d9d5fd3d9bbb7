//! vLLM's beam search on the HTTP API (`use_beam_search`, `n` beams,
//! `length_penalty`), done as vLLM's OpenAI server does it: above the engine,
//! one token at a time.
//!
//! Each step asks the cluster, for every live beam, for one greedy token with
//! the log probabilities of the `2 · n` most likely next tokens, the prompt
//! being the prompt and the beam so far (the nodes' prefix caches hold all of
//! it but its last block, so a step prefills little). Every beam's
//! continuations are ranked by cumulative log probability: one by an
//! end-of-sequence token is a finished beam, and the `n` best of the others
//! live on. After `max_tokens` steps (or when no beam lives) the finished and
//! live beams are ranked by `cumulative log probability / length ^
//! length_penalty`, the length counting the prompt and the beam's tokens but
//! not its EOS (as vLLM and transformers count it), and the `n` best are the
//! choices, best first: `finish_reason` `stop` for a beam that ended with EOS,
//! `length` for one that ran to `max_tokens`.
//!
//! The log probabilities are the model's raw ones (those of a greedy step), as
//! vLLM V1 scores beams, so `temperature` and `seed` do not change the result.
//! What would shape the sampling (penalties, `top_p`, `logit_bias`, stop
//! conditions, structured output, ...) or ask for what a beam does not carry
//! (log probabilities) is refused with HTTP 400 naming the field, where vLLM
//! drops it. Streamed, the whole answer comes when the search ends, one chunk
//! per choice, as from vLLM.

use std::future::Future;

use super::answer::{Responses, grpc_call, respond};
use super::*;
use crate::prepaid::Prepaid;
use crate::request_metrics::Tokens;
use tandem_engine::tokenizer::{Detokenizer, Tokenizer};

/// A beam search's settings (vLLM's `BeamSearchParams`).
#[derive(Debug, Clone, Copy, PartialEq)]
pub(super) struct BeamSearch {
    /// Beams kept at each step, and choices returned (`n`).
    pub width: u32,
    /// A beam's score is its log probability over its length to this power.
    pub length_penalty: f64,
    /// EOS is a token like any other (beams never finish before `max_tokens`).
    pub ignore_eos: bool,
    /// A beam that ended with EOS returns that token among its ids
    /// (`include_stop_str_in_output`); its text never holds it.
    pub include_eos: bool,
    /// `skip_special_tokens` (default true).
    pub skip_special: bool,
    /// `spaces_between_special_tokens` (default true; acts only with special
    /// tokens kept).
    pub spaced_special: bool,
}

/// The most beams: each step reads `2 · n` log probabilities a beam.
pub(super) const MAX_BEAMS: usize = MAX_TOP_LOGPROBS / 2;

impl BeamSearch {
    /// `use_beam_search`'s settings, from a request's fields (`s`) and the
    /// wire request built from them (`r`), or `None` without it. What a beam
    /// search cannot honour is refused naming its field; so is a
    /// `length_penalty` without a beam search, which would change nothing.
    pub(super) fn from_request(
        s: &Sampling,
        r: &pb::GenerateRequest,
    ) -> Result<Option<BeamSearch>, ApiError> {
        if !s.use_beam_search {
            return match s.length_penalty {
                Some(p) if p != 1.0 => Err(ApiError::bad_field(
                    "length_penalty",
                    "length_penalty applies only to a beam search (use_beam_search: true)",
                )),
                _ => Ok(None),
            };
        }
        let refuse = |field: &str| {
            Err(ApiError::bad_field(
                field,
                format!("{field} is not supported with use_beam_search"),
            ))
        };
        let p = r.sampling.clone().unwrap_or_default();
        let sampling_fields = [
            ("top_p", p.top_p != 1.0),
            ("top_k", p.top_k > 0),
            ("min_p", p.min_p != 0.0),
            ("presence_penalty", p.presence_penalty != 0.0),
            ("frequency_penalty", p.frequency_penalty != 0.0),
            ("repetition_penalty", p.repetition_penalty != 1.0),
            ("logit_bias", !p.logit_bias.is_empty()),
            ("stop", !r.stop.is_empty()),
            ("stop_token_ids", !r.stop_token_ids.is_empty()),
            ("min_tokens", r.min_tokens > 0),
            ("logprobs", r.logprobs.is_some()),
            ("prompt_logprobs", r.prompt_logprobs.is_some()),
        ];
        if let Some((field, _)) = sampling_fields.iter().find(|(_, set)| *set) {
            return refuse(field);
        }
        if r.constraint.is_some() {
            return Err(ApiError::bad_field(
                "use_beam_search",
                "use_beam_search cannot be combined with structured output (response_format, \
                 guided_*, structured_outputs), allowed_token_ids or bad_words",
            ));
        }
        let width = s.n.unwrap_or(1);
        if width as usize > MAX_BEAMS {
            return Err(ApiError::bad_field(
                "n",
                format!(
                    "n = {width}: a beam search keeps at most {MAX_BEAMS} beams (each step reads \
                     the 2 · n most likely next tokens of each beam, at most {MAX_TOP_LOGPROBS})"
                ),
            ));
        }
        let length_penalty = s.length_penalty.unwrap_or(1.0);
        if !length_penalty.is_finite() {
            return Err(ApiError::bad_field(
                "length_penalty",
                format!("length_penalty must be a finite number, got {length_penalty}"),
            ));
        }
        Ok(Some(BeamSearch {
            width: width.max(1),
            length_penalty,
            ignore_eos: r.ignore_eos,
            include_eos: r.include_stop_str_in_output,
            skip_special: r.skip_special_tokens.unwrap_or(true),
            spaced_special: r.spaces_between_special_tokens.unwrap_or(true),
        }))
    }
}

/// One hypothesis: its tokens after the prompt and their summed log
/// probability.
#[derive(Debug, Clone, PartialEq)]
pub(super) struct Beam {
    pub tokens: Vec<u32>,
    pub cum_logprob: f64,
    /// Ended by an end-of-sequence token (the last of `tokens`).
    pub eos: bool,
}

impl Beam {
    /// vLLM's (and transformers') score: the log probability over the
    /// length, prompt included and EOS not, to the power `length_penalty`.
    fn score(&self, prompt_len: usize, length_penalty: f64) -> f64 {
        let len = (prompt_len + self.tokens.len() - usize::from(self.eos)).max(1);
        self.cum_logprob / (len as f64).powf(length_penalty)
    }
}

/// The beam search of a prompt of `prompt_len` tokens for up to `max_tokens`
/// tokens: the `b.width` best beams, best first. `next(tokens, step, i)`
/// answers for live beam `i` of step `step` (its tokens after the prompt) the
/// `2 · width` most likely next tokens as (id, log probability), most likely
/// first; a step asks for every live beam at once.
pub(super) async fn search<F, Fut, E>(
    prompt_len: usize,
    max_tokens: u32,
    eos: &[u32],
    b: &BeamSearch,
    next: F,
) -> Result<Vec<Beam>, E>
where
    F: Fn(Vec<u32>, u32, usize) -> Fut,
    Fut: Future<Output = Result<Vec<(u32, f32)>, E>>,
{
    let width = b.width as usize;
    let mut live = vec![Beam {
        tokens: Vec::new(),
        cum_logprob: 0.0,
        eos: false,
    }];
    let mut done = Vec::new();
    for step in 0..max_tokens {
        let asked = live
            .iter()
            .enumerate()
            .map(|(i, beam)| next(beam.tokens.clone(), step, i));
        let tops = futures::future::try_join_all(asked).await?;
        // (cumulative log probability, token, beam it continues)
        let mut continued = Vec::new();
        for (beam, top) in live.iter().zip(tops) {
            for (token, logprob) in top {
                let cum_logprob = beam.cum_logprob + f64::from(logprob);
                if eos.contains(&token) && !b.ignore_eos {
                    let mut tokens = beam.tokens.clone();
                    tokens.push(token);
                    done.push(Beam {
                        tokens,
                        cum_logprob,
                        eos: true,
                    });
                } else {
                    continued.push((cum_logprob, token, beam));
                }
            }
        }
        // Stable: equal sums keep the earlier beam's, then the likelier token's, first.
        continued.sort_by(|a, b| b.0.total_cmp(&a.0));
        live = continued
            .into_iter()
            .take(width)
            .map(|(cum_logprob, token, beam)| {
                let mut tokens = beam.tokens.clone();
                tokens.push(token);
                Beam {
                    tokens,
                    cum_logprob,
                    eos: false,
                }
            })
            .collect();
        if live.is_empty() {
            break;
        }
    }
    done.extend(live);
    done.sort_by(|x, y| {
        let score = |beam: &Beam| beam.score(prompt_len, b.length_penalty);
        score(y).total_cmp(&score(x))
    });
    done.truncate(width);
    Ok(done)
}

/// Runs a beam search for each request's prompt (one per prompt of a
/// completions batch; chat has one) and answers as `out` says: prompt `p`'s
/// beams are choices `p · n ..`, best first. The client's request is counted
/// and charged to its key once, for its prompts and `n · max_tokens` each
/// (`prepaid`); the steps are not.
pub(super) async fn run(
    st: AppState,
    auth: Option<HeaderValue>,
    headers: &HeaderMap,
    requests: Vec<pb::GenerateRequest>,
    out: Output,
    kind: Kind,
    b: BeamSearch,
) -> Result<Response, ApiError> {
    let prompt_count = requests.len();
    let batch = prompt_count > 1;
    let prompts = requests
        .iter()
        .map(|r| beam_prompt(&st, r))
        .collect::<Result<Vec<_>, _>>()?;
    let reserve: u64 = prompts
        .iter()
        .map(|(prompt, max_tokens)| {
            prompt.len() as u64 + u64::from(b.width) * u64::from(*max_tokens)
        })
        .sum();
    let mut metadata = tonic::metadata::MetadataMap::new();
    if let Some(v) = answer::authorization(auth.as_ref()) {
        metadata.insert("authorization", v);
    }
    let reservation = st
        .service
        .prepay(&metadata, reserve)
        .map_err(Status::from)?;
    let searches = requests
        .iter()
        .zip(&prompts)
        .enumerate()
        .map(|(p, (r, prompt))| {
            prompt_search(
                &st,
                auth.as_ref(),
                headers,
                r,
                prompt,
                &b,
                batch.then_some(p),
            )
        });
    let found = futures::future::try_join_all(searches).await?;
    let mut responses = Vec::new();
    let mut used = Tokens {
        prompt: 0,
        generated: 0,
    };
    for (p, (prompt, beams)) in prompts
        .iter()
        .map(|(prompt, _)| prompt)
        .zip(found)
        .enumerate()
    {
        if beams.len() < b.width as usize {
            return Err(Status::internal(format!(
                "the beam search found {} beams, fewer than n = {}",
                beams.len(),
                b.width
            ))
            .into());
        }
        used.prompt += prompt.len();
        for (i, beam) in beams.into_iter().enumerate() {
            used.generated += beam.tokens.len();
            let index = (p * b.width as usize + i) as u32;
            responses.extend(beam_responses(&st.model, index, prompt.len(), beam, &b)?);
        }
    }
    reservation.settle(used);
    let responses: Responses = Box::pin(futures::stream::iter(responses.into_iter().map(Ok)));
    respond(st, responses, prompt_count, false, out, kind).await
}

/// A request's prompt as token ids (a text prompt encoded as the service
/// encodes it, special tokens added) and the most tokens a beam may take.
fn beam_prompt(st: &AppState, r: &pb::GenerateRequest) -> Result<(Vec<u32>, u32), ApiError> {
    let prompt = match &r.prompt {
        Some(pb::generate_request::Prompt::TokenIds(ids)) => ids.ids.clone(),
        Some(pb::generate_request::Prompt::Text(t)) => st
            .model
            .tokenizer
            .encode(t, true)
            .map_err(|e| ApiError::bad_field("prompt", e.to_string()))?,
        None => return Err(ApiError::bad_field("prompt", "prompt is missing")),
    };
    let max_tokens = st.service.max_tokens(prompt.len(), r.max_tokens)?;
    Ok((prompt, max_tokens))
}

/// The beam search of one request's `prompt`, `max_tokens` at most
/// ([`beam_prompt`]; prompt `batch_prompt` of a batch): its beams. Its steps'
/// calls are prepaid: `run` counted and charged the request.
async fn prompt_search(
    st: &AppState,
    auth: Option<&HeaderValue>,
    headers: &HeaderMap,
    r: &pb::GenerateRequest,
    (prompt, max_tokens): &(Vec<u32>, u32),
    b: &BeamSearch,
    batch_prompt: Option<usize>,
) -> Result<Vec<Beam>, ApiError> {
    // Each step's requests get ids of their own, after the request's (and
    // the prompt's, in a batch: ids the nodes key requests by must differ).
    let base = match (r.request_id.as_str(), headers.get(REQUEST_ID_HEADER)) {
        ("", Some(v)) => String::from_utf8_lossy(v.as_bytes()).into_owned(),
        ("", None) => format!("beam-{:x}", answer::rand_id()),
        (id, _) => id.to_string(),
    };
    let mut base: String = base.chars().take(200).collect();
    if let Some(p) = batch_prompt {
        base = format!("{base}-{p}");
    }
    let next = |tokens: Vec<u32>, step: u32, beam: usize| {
        let request = step_request(r, prompt, tokens, b, format!("{base}-beam{step}.{beam}"));
        let mut call = grpc_call(request, auth, headers, None);
        call.extensions_mut().insert(Prepaid::RequestAndTokens);
        async move { next_tokens(st, call).await }
    };
    search(
        prompt.len(),
        *max_tokens,
        &st.model.config.eos_token_ids,
        b,
        next,
    )
    .await
}

/// The request of one step of one beam: a greedy token after the prompt and
/// the beam's `tokens`, with the `2 · width` most likely next tokens' log
/// probabilities.
fn step_request(
    r: &pb::GenerateRequest,
    prompt: &[u32],
    tokens: Vec<u32>,
    b: &BeamSearch,
    request_id: String,
) -> pb::GenerateRequest {
    let mut ids = Vec::with_capacity(prompt.len() + tokens.len());
    ids.extend_from_slice(prompt);
    ids.extend(tokens);
    pb::GenerateRequest {
        request_id,
        model: r.model.clone(),
        prompt: Some(pb::generate_request::Prompt::TokenIds(pb::TokenIds { ids })),
        sampling: Some(pb::SamplingParams {
            temperature: 0.0,
            ..Default::default()
        }),
        max_tokens: 1,
        // The step's token is only a carrier for the log probabilities.
        ignore_eos: true,
        logprobs: Some(2 * b.width),
        cache_salt: r.cache_salt.clone(),
        n: 1,
        ..Default::default()
    }
}

/// A step's answer: its token's most likely alternatives as (id, log
/// probability), most likely first.
async fn next_tokens(
    st: &AppState,
    call: tonic::Request<pb::GenerateRequest>,
) -> Result<Vec<(u32, f32)>, ApiError> {
    let mut responses = st.service.generate(call).await?.into_inner();
    let mut top = None;
    while let Some(msg) = responses.next().await {
        if let Some(pb::generate_response::Event::Token(t)) = msg?.event
            && top.is_none()
        {
            top = t
                .logprobs
                .into_iter()
                .next()
                .map(|l| l.top.into_iter().map(|t| (t.id, t.logprob)).collect());
        }
    }
    top.ok_or_else(|| {
        Status::internal("a beam search step ended without its token's log probabilities").into()
    })
}

/// A beam's text: its tokens decoded as `b` asks. Special tokens kept without
/// spaces between them go through the streaming detokenizer, token by token,
/// as a node would stream them.
fn beam_text(tok: &Tokenizer, ids: &[u32], b: &BeamSearch) -> tandem_engine::Result<String> {
    if b.skip_special || b.spaced_special {
        return tok.decode_with(ids, b.skip_special);
    }
    let mut d = Detokenizer::starting_at(0)
        .keeping_special(true)
        .spacing_special(false);
    let mut text = String::new();
    for n in 1..=ids.len() {
        text += &d.step(tok, &ids[..n])?;
    }
    text += &d.flush(tok, ids)?;
    Ok(text)
}

/// Choice `index`'s responses, as a node would send them: the beam's tokens
/// and text in one chunk, then its end and usage.
fn beam_responses(
    model: &ModelDir,
    index: u32,
    prompt_len: usize,
    beam: Beam,
    b: &BeamSearch,
) -> Result<Vec<pb::GenerateResponse>, ApiError> {
    let mut ids = beam.tokens;
    let text_ids = &ids[..ids.len() - usize::from(beam.eos)];
    let text = beam_text(&model.tokenizer, text_ids, b)
        .map_err(|e| ApiError::from(Status::internal(e.to_string())))?;
    if beam.eos && !b.include_eos {
        ids.pop();
    }
    let prompt_tokens = u32::try_from(prompt_len).unwrap_or(u32::MAX);
    let finished = pb::Finished {
        reason: if beam.eos {
            pb::FinishReason::Eos
        } else {
            pb::FinishReason::Length
        } as i32,
        usage: Some(pb::Usage {
            prompt_tokens,
            completion_tokens: ids.len() as u32,
            cached_tokens: 0,
        }),
        ..Default::default()
    };
    let mut out = Vec::with_capacity(2);
    if !ids.is_empty() || !text.is_empty() {
        out.push(pb::GenerateResponse {
            event: Some(pb::generate_response::Event::Token(pb::TokenChunk {
                ids,
                text,
                logprobs: Vec::new(),
                prompt_tokens,
            })),
            index,
        });
    }
    out.push(pb::GenerateResponse {
        event: Some(pb::generate_response::Event::Finished(finished)),
        index,
    });
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    const EOS: u32 = 99;

    fn settings(width: u32, length_penalty: f64, ignore_eos: bool) -> BeamSearch {
        BeamSearch {
            width,
            length_penalty,
            ignore_eos,
            include_eos: false,
            skip_special: true,
            spaced_special: true,
        }
    }

    /// A toy model: the log probabilities of the next tokens after `tokens`
    /// (most likely first), cut to the `2 · width` a step reads.
    fn toy(tokens: &[u32], width: usize) -> Vec<(u32, f32)> {
        let table: Vec<(u32, f32)> = match tokens {
            // Greedy takes 1 (-0.4) and then can only go on badly; 2 (-0.6)
            // leads to a sure continuation.
            [] => vec![(1, -0.4), (2, -0.6), (3, -3.0), (4, -4.0)],
            [1] => vec![(5, -1.6), (6, -1.7), (EOS, -2.0), (7, -3.0)],
            [2] => vec![(8, -0.05), (EOS, -3.5), (9, -4.0), (7, -5.0)],
            [.., last] if *last == 8 => vec![(EOS, -0.01), (9, -5.0), (5, -6.0), (6, -7.0)],
            _ => vec![(EOS, -0.5), (7, -1.5), (5, -3.0), (6, -4.0)],
        };
        table.into_iter().take(2 * width).collect()
    }

    async fn run_toy(b: BeamSearch, max_tokens: u32) -> Vec<Beam> {
        let width = b.width as usize;
        search(3, max_tokens, &[EOS], &b, |tokens, _, _| async move {
            Ok::<_, ()>(toy(&tokens, width))
        })
        .await
        .unwrap()
    }

    #[tokio::test]
    async fn width_one_keeps_the_greedy_path_and_finished_beams() {
        let beams = run_toy(settings(1, 1.0, false), 2).await;
        // Greedy: 1 then 5 (-2.0 in all); a step reads two tokens, and the
        // EOS after 1 is the third.
        assert_eq!(beams.len(), 1);
        assert_eq!(beams[0].tokens, [1, 5]);
        assert!(!beams[0].eos);
        assert!((beams[0].cum_logprob - -2.0).abs() < 1e-6);
    }

    #[tokio::test]
    async fn a_wider_search_finds_the_likelier_sequence() {
        let beams = run_toy(settings(2, 1.0, false), 3).await;
        // 2, 8, EOS: -0.66 over 5 tokens beats the greedy start.
        assert_eq!(beams[0].tokens, [2, 8, EOS]);
        assert!(beams[0].eos);
        assert!((beams[0].cum_logprob - -0.66).abs() < 1e-6);
        // 1, 5, EOS (-2.5 over 5) beats 1, 5, 7 (-3.5 over 6) and 1, EOS (-2.4 over 4).
        assert_eq!(beams.len(), 2);
        assert_eq!(beams[1].tokens, [1, 5, EOS]);
    }

    #[tokio::test]
    async fn ignore_eos_keeps_eos_as_a_plain_token() {
        let beams = run_toy(settings(2, 1.0, true), 3).await;
        assert!(
            beams.iter().all(|b| !b.eos && b.tokens.len() == 3),
            "{beams:?}"
        );
        assert_eq!(beams[0].tokens, [2, 8, EOS]);
    }

    #[tokio::test]
    async fn the_length_penalty_weighs_the_length() {
        // The runner-up: without length normalisation (0) the shortest
        // finished beam (1, EOS: -2.4) beats 1, 5, EOS (-2.5); divided by the
        // squared length (2; 3 prompt tokens), -2.4 / 16 loses to -2.5 / 25.
        let plain = run_toy(settings(2, 0.0, false), 4).await;
        let squared = run_toy(settings(2, 2.0, false), 4).await;
        assert_eq!(plain[0].tokens, [2, 8, EOS]);
        assert_eq!(plain[1].tokens, [1, EOS]);
        assert_eq!(squared[0].tokens, [2, 8, EOS]);
        assert_eq!(squared[1].tokens, [1, 5, EOS]);
    }

    #[tokio::test]
    async fn a_failed_step_fails_the_search() {
        let b = settings(2, 1.0, false);
        let r = search(3, 4, &[EOS], &b, |tokens, _, _| async move {
            if tokens.len() == 2 {
                Err("node gone")
            } else {
                Ok(toy(&tokens, 2))
            }
        })
        .await;
        assert_eq!(r, Err("node gone"));
    }

    fn request(s: &str) -> (Sampling, pb::GenerateRequest) {
        let s: Sampling = serde_json::from_str(s).unwrap();
        let r = to_request(
            pb::generate_request::Prompt::TokenIds(pb::TokenIds { ids: vec![1] }),
            &s,
            Kind::Completion,
            &crate::openai_tools::tests::model(),
        )
        .unwrap();
        (s, r)
    }

    fn refused_field(body: &str) -> Option<String> {
        let (s, r) = request(body);
        BeamSearch::from_request(&s, &r).err().and_then(|e| e.param)
    }

    #[test]
    fn what_a_beam_search_cannot_honour_is_refused_by_name() {
        for (body, field) in [
            (r#"{"use_beam_search": true, "top_p": 0.5}"#, "top_p"),
            (r#"{"use_beam_search": true, "top_k": 5}"#, "top_k"),
            (
                r#"{"use_beam_search": true, "presence_penalty": 1}"#,
                "presence_penalty",
            ),
            (
                r#"{"use_beam_search": true, "logit_bias": {"3": 5}}"#,
                "logit_bias",
            ),
            (r#"{"use_beam_search": true, "stop": "x"}"#, "stop"),
            (
                r#"{"use_beam_search": true, "stop_token_ids": [3]}"#,
                "stop_token_ids",
            ),
            (
                r#"{"use_beam_search": true, "min_tokens": 2}"#,
                "min_tokens",
            ),
            (r#"{"use_beam_search": true, "logprobs": 2}"#, "logprobs"),
            (r#"{"use_beam_search": true, "n": 11}"#, "n"),
            (
                r#"{"use_beam_search": true, "guided_regex": "a+"}"#,
                "use_beam_search",
            ),
            (r#"{"length_penalty": 0.5}"#, "length_penalty"),
        ] {
            assert_eq!(refused_field(body).as_deref(), Some(field), "{body}");
        }
    }

    #[test]
    fn a_beam_search_reads_its_settings() {
        let (s, r) = request(
            r#"{"use_beam_search": true, "n": 3, "length_penalty": 0.5, "temperature": 0.7,
                "seed": 4, "ignore_eos": true, "include_stop_str_in_output": true,
                "skip_special_tokens": false}"#,
        );
        assert_eq!(
            BeamSearch::from_request(&s, &r).unwrap(),
            Some(BeamSearch {
                width: 3,
                length_penalty: 0.5,
                ignore_eos: true,
                include_eos: true,
                skip_special: false,
                spaced_special: true,
            })
        );
        let (s, r) = request(r#"{"length_penalty": 1.0}"#);
        assert_eq!(BeamSearch::from_request(&s, &r).unwrap(), None);
    }
}
