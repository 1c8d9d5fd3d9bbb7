//! What a step gives back for each row once its pass has run
//! ([`Backend::finish_step`](crate::Backend::finish_step)): the token its draw
//! chose, under the row's grammar mask and with the log probabilities it asked
//! for, or its logits on the host (when the host samples it: penalties and
//! `logit_bias` need the request's history).
//!
//! A step is split in two ([`Backend::start_step`](crate::Backend::start_step),
//! then `finish_step`) so that the host computes the grammar masks while the
//! pass runs ([`crate::mask_overlap`]) and a GPU backend applies them, samples
//! and computes the log probabilities on the device: only token ids and the
//! requested numbers cross to the host. [`HostStep`] is the same on the host
//! (the CPU backend), and the oracle the device is checked against.

use crate::error::{EngineError, Result};
use crate::sampling::{TokenDraw, TokenLogprobs};

/// What [`finish_step`](crate::Backend::finish_step) returns for one row,
/// beyond the token its draw picks from the raw logits (the default).
#[derive(Debug, Clone, Copy, Default)]
pub struct RowAsk<'a> {
    /// The allowed tokens as a packed bitmask (`vocab.div_ceil(32)` words, bit
    /// `t % 32` of word `t / 32` set when token `t` may come next): the others
    /// get logit −∞ before the draw (see
    /// [`Generation::next_mask_bits`](crate::Generation::next_mask_bits)).
    pub mask: Option<&'a [u32]>,
    /// Report the chosen token's log probability and the top N
    /// (N ≤ [`MAX_TOP_LOGPROBS`](crate::MAX_TOP_LOGPROBS)), under the
    /// distribution it was drawn from (the mask applied).
    pub logprobs: Option<usize>,
    /// Return the row's logits instead of a token (the host samples it).
    pub logits: bool,
}

impl RowAsk<'_> {
    /// Whether the row wants no more than its draw's token.
    pub fn is_plain(&self) -> bool {
        self.mask.is_none() && self.logprobs.is_none() && !self.logits
    }
}

/// One row's result of a step.
#[derive(Debug, Clone, PartialEq)]
pub enum RowOut {
    /// The token the row's draw chose, with its log probabilities if asked.
    Token {
        /// The token.
        token: u32,
        /// Its log probabilities, when [`RowAsk::logprobs`] asked for them.
        logprobs: Option<TokenLogprobs>,
    },
    /// The row's last-token logits ([`RowAsk::logits`]).
    Logits(Vec<f32>),
}

/// Sets the logits of the tokens `bits` does not allow to −∞ (tokens past the
/// mask's words too).
pub fn apply_mask_bits(logits: &mut [f32], bits: &[u32]) {
    for (t, l) in logits.iter_mut().enumerate() {
        let allowed = bits.get(t / 32).is_some_and(|w| (w >> (t % 32)) & 1 == 1);
        if !allowed {
            *l = f32::NEG_INFINITY;
        }
    }
}

/// Chooses one row on the host as a device does: the mask, then the draw, then
/// the log probabilities of what was drawn from.
pub fn choose_on_host(mut logits: Vec<f32>, draw: &TokenDraw, ask: &RowAsk<'_>) -> RowOut {
    if ask.logits {
        return RowOut::Logits(logits);
    }
    if let Some(bits) = ask.mask {
        apply_mask_bits(&mut logits, bits);
    }
    let token = draw.choose(&logits);
    let logprobs = ask
        .logprobs
        .map(|n| TokenLogprobs::of(&logits, draw.temperature, token, n));
    RowOut::Token { token, logprobs }
}

/// Checks that `asks` has one entry per row of the step and that each mask
/// covers `vocab` tokens.
pub fn check_asks(asks: &[RowAsk<'_>], rows: usize, vocab: usize) -> Result<()> {
    if asks.len() != rows {
        return Err(EngineError::InvalidInput(format!(
            "{} row requests for a step of {rows} rows",
            asks.len()
        )));
    }
    let words = vocab.div_ceil(32);
    if let Some(m) = asks
        .iter()
        .filter_map(|a| a.mask)
        .find(|m| m.len() != words)
    {
        return Err(EngineError::InvalidInput(format!(
            "a token mask of {} words for a vocabulary of {vocab} tokens ({words} words)",
            m.len()
        )));
    }
    Ok(())
}

/// A step sampled on the host: the logits computed by `start_step`, kept for
/// `finish_step`.
#[derive(Debug, Default)]
pub struct HostStep {
    pending: Option<(Vec<Vec<f32>>, Vec<TokenDraw>)>,
}

impl HostStep {
    /// Keeps a started step's logits (one row per chunk) and draws.
    pub fn keep(&mut self, logits: Vec<Vec<f32>>, draws: &[TokenDraw]) {
        self.pending = Some((logits, draws.to_vec()));
    }

    /// Finishes the kept step as `asks` say.
    pub fn finish(&mut self, asks: &[RowAsk<'_>]) -> Result<Vec<RowOut>> {
        let (rows, draws) = self.pending.take().ok_or_else(|| {
            EngineError::InvalidInput("finish_step without a started step".into())
        })?;
        let vocab = rows.first().map_or(0, Vec::len);
        check_asks(asks, rows.len(), vocab)?;
        Ok(rows
            .into_iter()
            .zip(&draws)
            .zip(asks)
            .map(|((row, draw), ask)| choose_on_host(row, draw, ask))
            .collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sampling::SamplingParams;

    fn bits_allowing(vocab: usize, allowed: &[u32]) -> Vec<u32> {
        let mut bits = vec![0u32; vocab.div_ceil(32)];
        for &t in allowed {
            bits[t as usize / 32] |= 1 << (t % 32);
        }
        bits
    }

    #[test]
    fn a_mask_turns_greedy_to_the_best_allowed_token() {
        let logits = vec![0.0, 5.0, 1.0, 4.0, -2.0];
        let bits = bits_allowing(5, &[2, 3]);
        let ask = RowAsk {
            mask: Some(&bits),
            logprobs: Some(2),
            logits: false,
        };
        let RowOut::Token { token, logprobs } = choose_on_host(logits, &TokenDraw::GREEDY, &ask)
        else {
            panic!("a token")
        };
        assert_eq!(token, 3);
        let lp = logprobs.expect("asked for");
        // Over the two allowed tokens only: log softmax of [1, 4].
        let want = 4.0 - (1f32.exp() + 4f32.exp()).ln();
        assert!((lp.logprob - want).abs() < 1e-6, "{} vs {want}", lp.logprob);
        assert_eq!(lp.top.iter().map(|t| t.0).collect::<Vec<_>>(), vec![3, 2]);
    }

    #[test]
    fn a_masked_draw_only_picks_allowed_tokens() {
        let logits: Vec<f32> = (0..100).map(|i| (i % 7) as f32).collect();
        let bits = bits_allowing(100, &[10, 50, 99]);
        let params = SamplingParams {
            temperature: 1.0,
            ..Default::default()
        };
        for k in 0..50 {
            let draw = TokenDraw::new(&params, k as f32 / 50.0);
            let ask = RowAsk {
                mask: Some(&bits),
                ..Default::default()
            };
            match choose_on_host(logits.clone(), &draw, &ask) {
                RowOut::Token { token, .. } => assert!([10, 50, 99].contains(&token), "{token}"),
                other => panic!("{other:?}"),
            }
        }
    }

    #[test]
    fn a_host_step_answers_each_row_as_asked_and_refuses_a_bad_mask() {
        let mut step = HostStep::default();
        step.keep(
            vec![vec![1.0, 2.0, 0.0], vec![3.0, 0.0, 1.0]],
            &[TokenDraw::GREEDY; 2],
        );
        let out = step
            .finish(&[
                RowAsk::default(),
                RowAsk {
                    logits: true,
                    ..Default::default()
                },
            ])
            .unwrap();
        assert_eq!(
            out,
            vec![
                RowOut::Token {
                    token: 1,
                    logprobs: None
                },
                RowOut::Logits(vec![3.0, 0.0, 1.0])
            ]
        );
        assert!(step.finish(&[]).is_err(), "nothing is pending any more");
        step.keep(vec![vec![1.0; 40]], &[TokenDraw::GREEDY]);
        let short = [0u32; 1];
        let err = step
            .finish(&[RowAsk {
                mask: Some(&short),
                ..Default::default()
            }])
            .unwrap_err();
        assert!(err.to_string().contains("1 words"), "{err}");
    }
}
