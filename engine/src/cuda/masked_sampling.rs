//! Structured output and log probabilities on the device: rows of logits
//! that are already on the GPU get their grammar masks applied
//! (`mask_logits`), are sampled (`sample_rows`), and have their log
//! probabilities computed (`row_logprobs`) there; only the token ids and the
//! requested numbers (the chosen token's log probability and the top-N,
//! N <= [`MAX_TOP_LOGPROBS`]) come back, never a row of logits.
//!
//! The masks are the host's packed bitmasks
//! ([`AllowedTokens::packed`](crate::constraint::AllowedTokens::packed), through
//! [`Generation::next_mask_bits`](crate::Generation::next_mask_bits)), computed
//! while the forward pass runs ([`crate::mask_overlap`]). The host path
//! ([`AllowedTokens::apply`](crate::constraint::AllowedTokens::apply), then
//! [`TokenDraw`] and [`TokenLogprobs::of`]) is the oracle: the GPU tests in
//! `check_sampling` compare the two on the same logits.

use cudarc::driver::CudaSlice;

use super::device::Gpu;
use super::error::CudaError;
use super::launch::{self, Dev, MaskLogits, RowLogprobs, SampleRows};
use crate::sampling::{MAX_TOP_LOGPROBS, TokenDraw, TokenLogprobs};

/// One row's request to [`sample_rows_masked`].
#[derive(Debug, Clone)]
pub struct RowDraw<'a> {
    /// The draw (temperature, cuts, variate).
    pub draw: TokenDraw,
    /// The packed allowed-token bitmask (`vocab.div_ceil(32)` words), if the
    /// row is constrained.
    pub mask: Option<&'a [u32]>,
    /// How many top log probabilities to report; `None` reports none.
    pub logprobs: Option<usize>,
}

/// Applies each row's mask to `rows` rows of `vocab` logits at `logits` (in
/// place), samples each row as its draw says, and computes the log
/// probabilities the rows asked for; returns each row's token and log
/// probabilities. Waits for the compute stream.
///
/// # Safety
/// `logits` must hold `draws.len()` rows of `vocab` f32 on `gpu`'s device,
/// written by work already queued on its compute stream (or done).
pub(crate) unsafe fn sample_rows_masked(
    gpu: &Gpu,
    logits: Dev<f32>,
    vocab: usize,
    draws: &[RowDraw<'_>],
) -> Result<Vec<(u32, Option<TokenLogprobs>)>, CudaError> {
    let rows = draws.len();
    if rows == 0 {
        return Ok(Vec::new());
    }
    let words = vocab.div_ceil(32);
    let st = &gpu.compute;
    let mut bits: Vec<u32> = Vec::new();
    let mut masks: Vec<i32> = Vec::with_capacity(rows);
    for d in draws {
        match d.mask {
            Some(m) if m.len() == words => {
                masks.push((bits.len() / words) as i32);
                bits.extend_from_slice(m);
            }
            Some(m) => {
                return Err(CudaError::Unsupported(format!(
                    "a grammar mask of {} words for a vocabulary of {vocab} ({words} words)",
                    m.len()
                )));
            }
            None => masks.push(-1),
        }
    }
    let words5: Vec<i32> = draws
        .iter()
        .flat_map(|d| {
            let t = d.draw;
            [
                t.temperature.to_bits() as i32,
                t.top_k as i32,
                t.top_p.to_bits() as i32,
                t.min_p.to_bits() as i32,
                t.u01.to_bits() as i32,
            ]
        })
        .collect();
    let top_n = draws
        .iter()
        .filter_map(|d| d.logprobs)
        .max()
        .map(|n| n.min(MAX_TOP_LOGPROBS));
    let ids: CudaSlice<u32> = gpu.zeros(rows)?;
    let draws_dev = gpu.upload(&words5)?;
    let _keep_bits = if !bits.is_empty() {
        let bits_dev = gpu.upload(&bits)?;
        let masks_dev = gpu.upload(&masks)?;
        let k = MaskLogits {
            rows,
            logits,
            bits: Dev::of(&bits_dev, st),
            masks: Dev::of(&masks_dev, st),
            vocab,
        };
        // SAFETY: `logits` holds `rows` rows of `vocab` f32 (the caller's
        // promise), `bits` a mask of `words` words for each index in `masks`,
        // `masks` one index a row; both live until the stream is synchronised below.
        unsafe { launch::launch(gpu, &k, false) }?;
        Some((bits_dev, masks_dev))
    } else {
        None
    };
    let sample = SampleRows {
        rows,
        logits,
        draws: Dev::of(&draws_dev, st),
        ids: Dev::of(&ids, st),
        vocab,
    };
    // SAFETY: `logits` as above, `draws` 5 words a row, `ids` room for `rows` ids.
    unsafe { launch::launch(gpu, &sample, false) }?;
    let mut lps_host = Vec::new();
    let mut top_host = Vec::new();
    if let Some(n) = top_n {
        let lps: CudaSlice<f32> = gpu.zeros(rows * (1 + MAX_TOP_LOGPROBS))?;
        let top: CudaSlice<u32> = gpu.zeros(rows * MAX_TOP_LOGPROBS)?;
        let k = RowLogprobs {
            rows,
            logits,
            draws: Dev::of(&draws_dev, st),
            ids: Dev::of(&ids, st),
            lps: Dev::of(&lps, st),
            top_ids: Dev::of(&top, st),
            vocab,
            top_n: n,
        };
        // SAFETY: `lps` holds 1 + MAX_TOP_LOGPROBS floats a row and `top`
        // MAX_TOP_LOGPROBS ids a row (the kernel's strides); the rest as above.
        unsafe { launch::launch(gpu, &k, false) }?;
        lps_host = vec![0f32; rows * (1 + MAX_TOP_LOGPROBS)];
        top_host = vec![0u32; rows * MAX_TOP_LOGPROBS];
        gpu.download(Dev::of(&lps, st).addr(), &mut lps_host)?;
        gpu.download(Dev::of(&top, st).addr(), &mut top_host)?;
    }
    let mut ids_host = vec![0u32; rows];
    gpu.download(Dev::of(&ids, st).addr(), &mut ids_host)?;
    Ok(draws
        .iter()
        .enumerate()
        .map(|(r, d)| {
            let token = ids_host[r];
            let logprobs = d.logprobs.map(|n| {
                let lp = &lps_host[r * (1 + MAX_TOP_LOGPROBS)..][..1 + MAX_TOP_LOGPROBS];
                let ids = &top_host[r * MAX_TOP_LOGPROBS..][..MAX_TOP_LOGPROBS];
                TokenLogprobs {
                    token,
                    logprob: lp[0],
                    top: ids
                        .iter()
                        .zip(&lp[1..])
                        .take(n.min(MAX_TOP_LOGPROBS).min(vocab))
                        .map(|(&id, &l)| (id, l))
                        .collect(),
                }
            });
            (token, logprobs)
        })
        .collect())
}

#[cfg(test)]
mod tests {
    use crate::cuda::program;
    use crate::sampling::MAX_TOP_LOGPROBS;

    #[test]
    fn the_kernel_reports_as_many_top_logprobs_as_the_api_allows() {
        let want = format!("#define MAX_TOP_LOGPROBS {MAX_TOP_LOGPROBS}\n");
        let src = program::source().expect("the compiled-in kernels");
        assert!(src.contains(&want), "{want}");
    }
}
