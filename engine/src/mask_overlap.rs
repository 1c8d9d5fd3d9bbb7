//! The grammar mask of a step computed on the host while the step's forward
//! pass runs.
//!
//! The tokens a constrained sequence may take at step t depend only on its
//! tokens up to t-1, which are known before the pass that yields step t's
//! logits starts. So a step loop lends each constrained sequence's parser out
//! ([`crate::Generation::lend_mask_job`]) before it launches the forward pass,
//! [`overlap`] runs those jobs (llguidance's `compute_mask`) on a second
//! thread while the pass runs on the first, and the loop gives each job back
//! ([`crate::Generation::return_mask_job`]) before sampling. [`crate::Generation::step`]
//! then applies the mask already computed; without one (the single-process
//! generator, the CPU backend's plain path) it computes it itself, on the
//! same parser, so both paths give the same tokens.

use crate::constraint::{AllowedTokens, ConstraintState};
use crate::error::Result;

/// One constrained sequence's parser, lent out of its [`crate::Generation`] to
/// compute the next step's mask elsewhere.
pub struct MaskJob {
    pub(crate) state: ConstraintState,
    /// Tokens (prompt and output) the mask follows.
    pub(crate) at: usize,
    pub(crate) allowed: Option<Result<AllowedTokens>>,
}

impl MaskJob {
    /// Computes the mask (once; again is a no-op).
    pub fn run(&mut self) {
        if self.allowed.is_none() {
            self.allowed = Some(self.state.allowed());
        }
    }

    /// Whether the mask has been computed.
    pub fn is_done(&self) -> bool {
        self.allowed.is_some()
    }
}

/// Runs `forward` on this thread and every job on another, concurrently;
/// returns what `forward` returned once both are done. With no job it is
/// `forward()` alone (no thread is started).
pub fn overlap<T>(jobs: &mut [MaskJob], forward: impl FnOnce() -> T) -> T {
    if jobs.is_empty() {
        return forward();
    }
    std::thread::scope(|s| {
        let masks = s.spawn(|| jobs.iter_mut().for_each(MaskJob::run));
        let out = forward();
        if masks.join().is_err() {
            // The mask thread panicked (a parser bug): the jobs left without a
            // mask compute it at sampling time, where an error is the request's.
            tracing::error!("grammar mask thread panicked");
        }
        out
    })
}
