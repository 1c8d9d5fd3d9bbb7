//! Conversions between wire messages and engine types, in one place.

use tandem_engine::{
    Constraint, FinishReason, GenerationParams, SamplingError, SamplingParams, StopReason,
};
use tandem_proto::v1 as pb;

/// Engine sampling parameters from the wire's, mapping "unset" (0) to neutral values.
pub fn sampling_from_pb(s: Option<&pb::SamplingParams>) -> SamplingParams {
    let Some(s) = s else {
        return SamplingParams::default();
    };
    SamplingParams {
        temperature: s.temperature,
        // -1 (vLLM's "disabled") is 0's no cut; validation refuses the rest.
        top_k: s.top_k.max(0) as usize,
        top_p: if s.top_p == 0.0 { 1.0 } else { s.top_p },
        min_p: s.min_p,
        repetition_penalty: if s.repetition_penalty == 0.0 {
            1.0
        } else {
            s.repetition_penalty
        },
        presence_penalty: s.presence_penalty,
        frequency_penalty: s.frequency_penalty,
        seed: s.seed,
        logit_bias: s.logit_bias.iter().map(|(&t, &b)| (t, b)).collect(),
    }
}

/// [`sampling_from_pb`], checked: a wire `top_k` the engine type cannot
/// represent, then every range ([`SamplingParams::validate`]).
pub fn checked_sampling_from_pb(
    s: Option<&pb::SamplingParams>,
) -> Result<SamplingParams, SamplingError> {
    if let Some(s) = s
        && s.top_k < -1
    {
        return Err(SamplingError {
            field: "top_k",
            message: format!(
                "top_k must be 0 or -1 (no cut) or at least 1, got {}",
                s.top_k
            ),
        });
    }
    let sampling = sampling_from_pb(s);
    sampling.validate()?;
    Ok(sampling)
}

/// The wire form of engine sampling parameters.
pub fn sampling_to_pb(s: &SamplingParams) -> pb::SamplingParams {
    pb::SamplingParams {
        temperature: s.temperature,
        top_k: s.top_k.min(i32::MAX as usize) as i32,
        top_p: s.top_p,
        min_p: s.min_p,
        repetition_penalty: s.repetition_penalty,
        presence_penalty: s.presence_penalty,
        frequency_penalty: s.frequency_penalty,
        seed: s.seed,
        logit_bias: s.logit_bias.iter().map(|(&t, &b)| (t, b)).collect(),
    }
}

/// Engine generation parameters from a decode request.
pub fn generation_params(r: &pb::DecodeRequest) -> GenerationParams {
    GenerationParams {
        sampling: sampling_from_pb(r.sampling.as_ref()),
        max_tokens: r.max_tokens as usize,
        stop: r.stop.clone(),
        stop_token_ids: r.stop_token_ids.clone(),
        ignore_eos: r.ignore_eos,
        include_stop_str_in_output: r.include_stop_str_in_output,
        skip_special_tokens: !r.keep_special_tokens,
        spaces_between_special_tokens: !r.no_spaces_between_special_tokens,
        min_tokens: r.min_tokens as usize,
        logprobs: r.logprobs.map(|n| n as usize),
        constraint: constraint_from_pb(r.constraint.as_ref()),
    }
}

/// The engine's structured-output constraint from the wire's (`None`: the
/// message is absent or sets no kind).
pub fn constraint_from_pb(c: Option<&pb::OutputConstraint>) -> Option<Constraint> {
    use pb::output_constraint::Kind;
    Some(match c?.kind.as_ref()? {
        Kind::JsonObject(_) => Constraint::JsonObject,
        Kind::JsonSchema(s) => Constraint::JsonSchema(s.clone()),
        Kind::Regex(r) => Constraint::Regex(r.clone()),
        Kind::Choice(list) => Constraint::Choice(list.choices.clone()),
        Kind::LarkGrammar(g) => Constraint::LarkGrammar(g.clone()),
        Kind::AllowedTokenIds(ids) => Constraint::AllowedTokenIds(ids.ids.clone()),
        Kind::BadWords(b) => Constraint::BadWords(b.words.iter().map(|w| w.ids.clone()).collect()),
    })
}

/// The wire form of a structured-output constraint.
pub fn constraint_to_pb(c: &Constraint) -> pb::OutputConstraint {
    use pb::output_constraint::Kind;
    let kind = match c {
        Constraint::JsonObject => Kind::JsonObject(true),
        Constraint::JsonSchema(s) => Kind::JsonSchema(s.clone()),
        Constraint::Regex(r) => Kind::Regex(r.clone()),
        Constraint::Choice(choices) => Kind::Choice(pb::ChoiceList {
            choices: choices.clone(),
        }),
        Constraint::LarkGrammar(g) => Kind::LarkGrammar(g.clone()),
        Constraint::AllowedTokenIds(ids) => {
            Kind::AllowedTokenIds(pb::TokenIds { ids: ids.clone() })
        }
        Constraint::BadWords(words) => Kind::BadWords(pb::BadWords {
            words: words
                .iter()
                .map(|ids| pb::TokenIds { ids: ids.clone() })
                .collect(),
        }),
    };
    pb::OutputConstraint { kind: Some(kind) }
}

/// The wire form of a token's log probabilities.
pub fn logprobs_to_pb(l: &tandem_engine::TokenLogprobs) -> pb::TokenLogprobs {
    pb::TokenLogprobs {
        id: l.token,
        logprob: l.logprob,
        top: l
            .top
            .iter()
            .map(|&(id, logprob)| pb::TopLogprob { id, logprob })
            .collect(),
        rank: 0,
    }
}

/// The wire form of a prompt's log probabilities: `entries` are those of its
/// tokens from the second on, `first_id` its first token.
pub fn prompt_logprobs_to_pb(
    first_id: u32,
    entries: &[tandem_engine::PromptLogprob],
) -> pb::PromptLogprobs {
    pb::PromptLogprobs {
        first_id,
        tokens: entries
            .iter()
            .map(|e| pb::TokenLogprobs {
                rank: e.rank,
                ..logprobs_to_pb(&e.logprobs)
            })
            .collect(),
    }
}

/// The wire stop reason.
pub fn stop_reason_to_pb(r: StopReason) -> pb::finished::StopReason {
    match r {
        StopReason::String(s) => pb::finished::StopReason::StopString(s),
        StopReason::TokenId(t) => pb::finished::StopReason::StopTokenId(t),
    }
}

/// The wire finish reason.
pub fn finish_reason_to_pb(r: FinishReason) -> pb::FinishReason {
    match r {
        FinishReason::Length => pb::FinishReason::Length,
        FinishReason::Stop => pb::FinishReason::Stop,
        FinishReason::Eos => pb::FinishReason::Eos,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_decode_request_s_special_token_fields_reach_the_engine() {
        let p = generation_params(&pb::DecodeRequest::default());
        assert!(p.skip_special_tokens && p.spaces_between_special_tokens);
        let p = generation_params(&pb::DecodeRequest {
            keep_special_tokens: true,
            no_spaces_between_special_tokens: true,
            ..Default::default()
        });
        assert!(!p.skip_special_tokens && !p.spaces_between_special_tokens);
    }
}
