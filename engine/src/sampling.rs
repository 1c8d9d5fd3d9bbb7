//! Turning logits into the next token: penalties, temperature, top-k, top-p,
//! min-p, and a per-request seeded random stream.
//!
//! The order is vLLM's: penalties on the raw logits, then the request's
//! `logit_bias` (added, as OpenAI applies it), then temperature, then the
//! top-k / top-p / min-p cuts on the resulting distribution, then a draw.
//! Temperature 0 is greedy (the lowest token id wins a tie). Ids the caller
//! bans for this step (`min_tokens`: EOS and stop ids until enough tokens were
//! generated) are set to -inf with the penalties.
//!
//! Log probabilities ([`TokenLogprobs`]) are computed here too, from the
//! distribution the draw uses: the log-softmax of the logits after penalties,
//! bias and temperature (for greedy, of the biased logits alone), before the
//! top-k / top-p / min-p cuts. That is vLLM's V0 default and what its V1
//! calls `processed_logprobs` less the cuts (V1's default, `raw_logprobs`,
//! is the same when there are no penalties and the temperature is 0 or 1).

use std::collections::{BTreeMap, HashMap};

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

/// Sampling parameters of one request. The default is greedy decoding.
#[derive(Debug, Clone, PartialEq)]
pub struct SamplingParams {
    /// 0 is greedy; otherwise logits are divided by it.
    pub temperature: f32,
    /// Keep only the `top_k` most likely tokens; 0 keeps all.
    pub top_k: usize,
    /// Keep the smallest set of tokens whose probability reaches `top_p`; 1 keeps all.
    pub top_p: f32,
    /// Drop tokens less likely than `min_p` times the most likely one; 0 keeps all.
    pub min_p: f32,
    /// > 1 discourages every token seen in the prompt or output (1 is none).
    pub repetition_penalty: f32,
    /// Subtracted from the logit of every token already generated.
    pub presence_penalty: f32,
    /// Subtracted from a token's logit once per time it was generated.
    pub frequency_penalty: f32,
    /// Seed of the request's random stream; `None` draws one.
    pub seed: Option<u64>,
    /// Added to a token's logit after the penalties (OpenAI's `logit_bias`, each
    /// in [-100, 100]; -100 in effect bans the token). Ids outside the
    /// vocabulary are the caller's to refuse; here they are skipped.
    pub logit_bias: BTreeMap<u32, f32>,
}

/// Largest `logit_bias` magnitude (OpenAI's and vLLM's limit).
pub const MAX_LOGIT_BIAS: f32 = 100.0;

impl Default for SamplingParams {
    fn default() -> Self {
        SamplingParams {
            temperature: 0.0,
            top_k: 0,
            top_p: 1.0,
            min_p: 0.0,
            repetition_penalty: 1.0,
            presence_penalty: 0.0,
            frequency_penalty: 0.0,
            seed: None,
            logit_bias: BTreeMap::new(),
        }
    }
}

/// A sampling parameter out of its range: which one, and why.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("{message}")]
pub struct SamplingError {
    /// The parameter's name as the APIs spell it (`temperature`, `logit_bias`, ...).
    pub field: &'static str,
    /// What is wrong, naming the parameter and the value given.
    pub message: String,
}

impl SamplingParams {
    /// Checks every parameter's range; the error names the bad one.
    pub fn validate(&self) -> std::result::Result<(), SamplingError> {
        let bad = |field: &'static str, message: String| Err(SamplingError { field, message });
        if !self.temperature.is_finite() || self.temperature < 0.0 {
            return bad(
                "temperature",
                format!(
                    "temperature must be a finite number >= 0, got {}",
                    self.temperature
                ),
            );
        }
        if !(self.top_p > 0.0 && self.top_p <= 1.0) {
            return bad(
                "top_p",
                format!("top_p must be in (0, 1], got {}", self.top_p),
            );
        }
        if !(0.0..=1.0).contains(&self.min_p) {
            return bad(
                "min_p",
                format!("min_p must be in [0, 1], got {}", self.min_p),
            );
        }
        if !self.repetition_penalty.is_finite() || self.repetition_penalty <= 0.0 {
            return bad(
                "repetition_penalty",
                format!(
                    "repetition_penalty must be > 0, got {}",
                    self.repetition_penalty
                ),
            );
        }
        for (name, v) in [
            ("presence_penalty", self.presence_penalty),
            ("frequency_penalty", self.frequency_penalty),
        ] {
            if !v.is_finite() || !(-2.0..=2.0).contains(&v) {
                return bad(name, format!("{name} must be in [-2, 2], got {v}"));
            }
        }
        if let Some((id, v)) = self
            .logit_bias
            .iter()
            .find(|(_, v)| !(v.is_finite() && v.abs() <= MAX_LOGIT_BIAS))
        {
            return bad(
                "logit_bias",
                format!(
                    "logit_bias[{id}] must be in [-{MAX_LOGIT_BIAS}, {MAX_LOGIT_BIAS}], got {v}"
                ),
            );
        }
        Ok(())
    }

    /// Whether sampling is greedy (and so needs no random stream).
    pub fn is_greedy(&self) -> bool {
        self.temperature == 0.0
    }
}

/// The sampler of one request: its parameters, random stream, and the counts
/// of the tokens it has seen (for penalties).
pub struct Sampler {
    params: SamplingParams,
    rng: ChaCha8Rng,
    /// Tokens of the prompt (for the repetition penalty).
    prompt_seen: HashMap<u32, ()>,
    /// Times each token was generated.
    output_counts: HashMap<u32, u32>,
}

impl Sampler {
    /// A sampler for a request with this prompt.
    pub fn new(params: SamplingParams, prompt: &[u32]) -> Self {
        let seed = params.seed.unwrap_or_else(|| rand::rng().random());
        let prompt_seen = if params.repetition_penalty != 1.0 {
            prompt.iter().map(|&t| (t, ())).collect()
        } else {
            HashMap::new()
        };
        Sampler {
            params,
            rng: ChaCha8Rng::seed_from_u64(seed),
            prompt_seen,
            output_counts: HashMap::new(),
        }
    }

    /// Records a generated token (for penalties); [`sample`](Self::sample) does this itself.
    pub fn observe(&mut self, token: u32) {
        *self.output_counts.entry(token).or_default() += 1;
    }

    /// Brings this sampler to the state it would have after sampling `token` itself:
    /// used where the first token was sampled on another node (the prefill node).
    pub fn resume_after(&mut self, token: u32) {
        if !self.params.is_greedy() {
            let _: f32 = self.rng.random();
        }
        self.observe(token);
    }

    /// Chooses the next token from `logits` (modified in place) and records it.
    pub fn sample(&mut self, logits: &mut [f32]) -> u32 {
        self.sample_with_logprobs(logits, None).0
    }

    /// Like [`sample`](Self::sample), and with `top_n` set also the log
    /// probabilities of the chosen token and of the `top_n` most likely ones,
    /// under the distribution the token was drawn from (see the module docs).
    pub fn sample_with_logprobs(
        &mut self,
        logits: &mut [f32],
        top_n: Option<usize>,
    ) -> (u32, Option<TokenLogprobs>) {
        self.sample_banning(logits, top_n, &[])
    }

    /// Like [`sample_with_logprobs`](Self::sample_with_logprobs), with the
    /// `banned` ids made impossible (their logits -inf, log probabilities too).
    pub fn sample_banning(
        &mut self,
        logits: &mut [f32],
        top_n: Option<usize>,
        banned: &[u32],
    ) -> (u32, Option<TokenLogprobs>) {
        self.apply_penalties(logits);
        self.apply_bias(logits);
        for &t in banned {
            if let Some(l) = logits.get_mut(t as usize) {
                *l = f32::NEG_INFINITY;
            }
        }
        let token = if self.params.is_greedy() {
            argmax(logits)
        } else {
            self.draw(logits)
        };
        self.observe(token);
        let logprobs = top_n.map(|n| TokenLogprobs::of(logits, self.params.temperature, token, n));
        (token, logprobs)
    }

    fn apply_penalties(&self, logits: &mut [f32]) {
        let p = &self.params;
        if p.repetition_penalty != 1.0 {
            let seen = self.prompt_seen.keys().chain(self.output_counts.keys());
            let mut done = std::collections::HashSet::new();
            for &t in seen {
                if let Some(l) = logits.get_mut(t as usize)
                    && done.insert(t)
                {
                    *l = if *l > 0.0 {
                        *l / p.repetition_penalty
                    } else {
                        *l * p.repetition_penalty
                    };
                }
            }
        }
        if p.presence_penalty != 0.0 || p.frequency_penalty != 0.0 {
            for (&t, &n) in &self.output_counts {
                if let Some(l) = logits.get_mut(t as usize) {
                    *l -= p.presence_penalty + p.frequency_penalty * n as f32;
                }
            }
        }
    }

    fn apply_bias(&self, logits: &mut [f32]) {
        for (&t, &b) in &self.params.logit_bias {
            if let Some(l) = logits.get_mut(t as usize) {
                *l += b;
            }
        }
    }

    fn draw(&mut self, logits: &[f32]) -> u32 {
        // Exactly one draw per sampled token, whatever the logits, so a stream can be
        // resumed on another node by replaying the count (see `resume_after`).
        let u01 = self.rng.random::<f32>();
        TokenDraw::new(&self.params, u01).choose(logits)
    }

    /// Whether the next token can be drawn from the raw logits alone (no penalty
    /// needs this request's history, no bias moves them), so a device can sample
    /// it without the logits ever leaving it.
    pub fn draws_from_raw_logits(&self) -> bool {
        let p = &self.params;
        p.repetition_penalty == 1.0
            && p.presence_penalty == 0.0
            && p.frequency_penalty == 0.0
            && p.logit_bias.is_empty()
    }

    /// The next token's draw, taking this step's uniform variate from the
    /// request's stream exactly as [`sample`](Self::sample) does. Only valid when
    /// [`draws_from_raw_logits`](Self::draws_from_raw_logits); record the token the
    /// draw chose with [`observe`](Self::observe).
    pub fn next_draw(&mut self) -> TokenDraw {
        let u01 = if self.params.is_greedy() {
            0.0
        } else {
            self.rng.random::<f32>()
        };
        TokenDraw::new(&self.params, u01)
    }
}

/// Everything needed to choose one token from raw logits: the request's cuts
/// and this step's uniform variate. A GPU backend ships these to the device and
/// samples there; [`choose`](Self::choose) is the host's version.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct TokenDraw {
    /// 0 is greedy.
    pub temperature: f32,
    /// 0 keeps all.
    pub top_k: u32,
    /// 1 keeps all.
    pub top_p: f32,
    /// 0 keeps all.
    pub min_p: f32,
    /// Uniform in [0, 1): where the draw lands in the kept probability mass.
    pub u01: f32,
}

impl TokenDraw {
    /// The greedy draw.
    pub const GREEDY: TokenDraw = TokenDraw {
        temperature: 0.0,
        top_k: 0,
        top_p: 1.0,
        min_p: 0.0,
        u01: 0.0,
    };

    /// A draw with `params`' cuts at variate `u01`.
    pub fn new(params: &SamplingParams, u01: f32) -> Self {
        TokenDraw {
            temperature: params.temperature,
            top_k: params.top_k.min(u32::MAX as usize) as u32,
            top_p: params.top_p,
            min_p: params.min_p,
            u01,
        }
    }

    /// The token this draw picks from `logits`: temperature, then the top-k, top-p
    /// and min-p cuts (in that order, as vLLM applies them), then the token where
    /// `u01` lands in the kept mass, walking from the most likely down.
    pub fn choose(&self, logits: &[f32]) -> u32 {
        let cand = self.kept(logits);
        let Some(&(last, _)) = cand.last() else {
            return argmax(logits);
        };
        let total: f32 = cand.iter().map(|c| c.1).sum();
        let mut u = self.u01 * total;
        for &(t, w) in &cand {
            if u < w {
                return t;
            }
            u -= w;
        }
        last
    }

    /// The tokens the cuts keep with their unnormalised weights, most likely
    /// first (lower id first on ties); empty for greedy or when nothing has weight.
    fn kept(&self, logits: &[f32]) -> Vec<(u32, f32)> {
        if self.temperature == 0.0 {
            return Vec::new();
        }
        let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        let mut cand: Vec<(u32, f32)> = logits
            .iter()
            .enumerate()
            .map(|(i, &l)| (i as u32, ((l - max) / self.temperature).exp()))
            .filter(|&(_, w)| w > 0.0)
            .collect();
        if cand.is_empty() {
            return cand;
        }
        cand.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
        if self.top_k > 0 {
            cand.truncate(self.top_k as usize);
        }
        let sum: f32 = cand.iter().map(|c| c.1).sum();
        if self.top_p < 1.0 {
            let mut acc = 0.0;
            let mut keep = cand.len();
            for (i, c) in cand.iter().enumerate() {
                acc += c.1 / sum;
                if acc >= self.top_p {
                    keep = i + 1;
                    break;
                }
            }
            cand.truncate(keep);
        }
        if self.min_p > 0.0 {
            let threshold = cand[0].1 * self.min_p;
            cand.retain(|c| c.1 >= threshold);
        }
        cand
    }

    /// The probability of each token under this draw's cuts (zero outside the
    /// kept set): what a correct sampler with these cuts picks with, whatever
    /// order it walks the kept mass in; for checking a device's sampler.
    pub fn distribution(&self, logits: &[f32]) -> Vec<f64> {
        let mut out = vec![0f64; logits.len()];
        let cand = self.kept(logits);
        if cand.is_empty() {
            if let Some(v) = out.get_mut(argmax(logits) as usize) {
                *v = 1.0;
            }
            return out;
        }
        let total: f64 = cand.iter().map(|c| c.1 as f64).sum();
        for &(t, w) in &cand {
            out[t as usize] = w as f64 / total;
        }
        out
    }
}

/// Most top log probabilities a request may ask for per token (vLLM's default
/// `max_logprobs`).
pub const MAX_TOP_LOGPROBS: usize = 20;

/// The log probabilities of one generated token.
#[derive(Debug, Clone, PartialEq)]
pub struct TokenLogprobs {
    /// The token chosen.
    pub token: u32,
    /// Its log probability.
    pub logprob: f32,
    /// The most likely tokens with their log probabilities, most likely first
    /// (the lower id first on ties); the chosen token is among them only when
    /// it ranks there.
    pub top: Vec<(u32, f32)>,
}

impl TokenLogprobs {
    /// The log probabilities of `token` and of the `top_n` most likely tokens
    /// under `log_softmax(logits / temperature)` (temperature 0 counts as 1:
    /// greedy decoding reports the model's own, penalised, distribution).
    /// `logits` are the ones sampling chose from, penalties applied.
    pub fn of(logits: &[f32], temperature: f32, token: u32, top_n: usize) -> Self {
        let scale = if temperature > 0.0 {
            1.0 / f64::from(temperature)
        } else {
            1.0
        };
        let log_z = log_sum_exp(logits, scale);
        let logprob_of = |l: f32| (f64::from(l) * scale - log_z) as f32;
        let logprob = logits
            .get(token as usize)
            .map_or(f32::NEG_INFINITY, |&l| logprob_of(l));
        let by_rank = |a: &u32, b: &u32| {
            logits[*b as usize]
                .total_cmp(&logits[*a as usize])
                .then(a.cmp(b))
        };
        let mut ids: Vec<u32> = (0..logits.len() as u32).collect();
        let n = top_n.min(ids.len());
        if n > 0 && n < ids.len() {
            ids.select_nth_unstable_by(n - 1, by_rank);
        }
        ids.truncate(n);
        ids.sort_unstable_by(by_rank);
        TokenLogprobs {
            token,
            logprob,
            top: ids
                .into_iter()
                .map(|id| (id, logprob_of(logits[id as usize])))
                .collect(),
        }
    }
}

/// One prompt token's log probability given the tokens before it (vLLM's
/// `prompt_logprobs`).
#[derive(Debug, Clone, PartialEq)]
pub struct PromptLogprob {
    /// The token, its log probability and the most likely tokens at its place.
    pub logprobs: TokenLogprobs,
    /// Its rank among all tokens, 1 for the most likely (1 + how many tokens
    /// have a larger logit).
    pub rank: u32,
}

/// The log probabilities of `targets[i]` and of the `top_n` most likely
/// tokens under `rows[i]`, the logits that followed the token before it: a
/// prompt's, from the model's raw logits (no penalty, bias or temperature),
/// as vLLM reports prompt log probabilities. Extra rows or targets are left out.
pub fn prompt_logprobs(rows: &[Vec<f32>], targets: &[u32], top_n: usize) -> Vec<PromptLogprob> {
    rows.iter()
        .zip(targets)
        .map(|(row, &token)| {
            let own = row
                .get(token as usize)
                .copied()
                .unwrap_or(f32::NEG_INFINITY);
            PromptLogprob {
                logprobs: TokenLogprobs::of(row, 1.0, token, top_n),
                rank: 1 + row.iter().filter(|&&l| l > own).count() as u32,
            }
        })
        .collect()
}

/// `log(sum(exp(l * scale)))` over the finite logits, in f64.
fn log_sum_exp(logits: &[f32], scale: f64) -> f64 {
    let max = logits
        .iter()
        .filter(|l| l.is_finite())
        .fold(f64::NEG_INFINITY, |m, &l| m.max(f64::from(l) * scale));
    if max == f64::NEG_INFINITY {
        return 0.0;
    }
    let sum: f64 = logits
        .iter()
        .filter(|l| !l.is_nan())
        .map(|&l| (f64::from(l) * scale - max).exp())
        .sum();
    max + sum.ln()
}

/// Index of the largest logit (the lowest index on a tie; NaN never wins).
pub fn argmax(logits: &[f32]) -> u32 {
    let mut best = 0;
    for (i, &l) in logits.iter().enumerate() {
        if l > logits[best] || logits[best].is_nan() {
            best = i;
        }
    }
    best as u32
}

#[cfg(test)]
mod tests;
