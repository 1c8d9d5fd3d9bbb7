//! Which prompt tokens go into the next forward pass: the chunked-prefill
//! policy, with no I/O so it is tested on its own.
//!
//! Every step takes, round-robin over the active jobs, a chunk of at most
//! `chunk_tokens` tokens of each, until `max_batch_tokens` are taken; budget
//! left after that round goes to the step's jobs in the same order, so a
//! prompt prefilled alone takes as few passes as the budget allows (a
//! prefill node has no decode batch to protect: chunking only shares its
//! passes fairly between prompts). A chunk ends on a block boundary unless
//! it ends the prompt, so the next chunk starts at a multiple of
//! `block_size` and every block of every layer is written (and shipped) by
//! exactly one chunk. The job after the last one served goes first next
//! step, so a long prompt never starves short ones.

/// Token budget of a step.
#[derive(Debug, Clone, Copy)]
pub struct StepLimits {
    /// One job's share of a step while other jobs wait (a multiple of
    /// `block_size`); a job takes more only from budget the others left.
    pub chunk_tokens: usize,
    /// Most tokens per step over all jobs.
    pub max_batch_tokens: usize,
    /// Tokens per KV block.
    pub block_size: usize,
    /// Most jobs per step (the backend's buffers are sized for this many
    /// sequences in one pass).
    pub max_seqs: usize,
}

/// One job's chunk in a step: prompt tokens `start..end` of job `job`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PlannedChunk {
    /// Index of the job in the caller's list.
    pub job: usize,
    /// First prompt position.
    pub start: usize,
    /// One past the last prompt position.
    pub end: usize,
}

/// Plans one step over jobs given as `(computed, prompt_len)`, starting the
/// round-robin at `cursor`. Returns the chunks and the next cursor. At least
/// one chunk is planned whenever some job has tokens left, whatever the budget.
pub fn plan_step(
    jobs: &[(usize, usize)],
    cursor: usize,
    limits: StepLimits,
) -> (Vec<PlannedChunk>, usize) {
    let n = jobs.len();
    let mut chunks = Vec::new();
    if n == 0 {
        return (chunks, 0);
    }
    let bs = limits.block_size.max(1);
    let per_job = (limits.chunk_tokens / bs * bs).max(bs);
    let mut budget = limits.max_batch_tokens;
    let mut next = cursor % n;
    for k in 0..n {
        if chunks.len() >= limits.max_seqs.max(1) {
            break;
        }
        let j = (cursor + k) % n;
        let (computed, len) = jobs[j];
        if computed >= len {
            continue;
        }
        let left = len - computed;
        let take = if left <= per_job.min(budget) {
            left
        } else {
            // Not the prompt's end: stop on a block boundary.
            per_job.min(budget) / bs * bs
        };
        let take = if take == 0 && chunks.is_empty() {
            // A budget below one block still makes progress.
            left.min(bs)
        } else {
            take
        };
        if take == 0 {
            break;
        }
        chunks.push(PlannedChunk {
            job: j,
            start: computed,
            end: computed + take,
        });
        budget = budget.saturating_sub(take);
        next = (j + 1) % n;
        if budget == 0 {
            break;
        }
    }
    // Work-conserving: budget the round left extends the planned chunks, in
    // the order they were served, still ending on block boundaries.
    for ch in chunks.iter_mut() {
        if budget < bs {
            break;
        }
        let left = jobs[ch.job].1 - ch.end;
        if left == 0 || ch.end % bs != 0 {
            continue;
        }
        let more = if left <= budget {
            left
        } else {
            budget / bs * bs
        };
        ch.end += more;
        budget -= more;
    }
    (chunks, next)
}

#[cfg(test)]
mod tests {
    use super::*;

    const LIMITS: StepLimits = StepLimits {
        chunk_tokens: 32,
        max_batch_tokens: 48,
        block_size: 16,
        max_seqs: 256,
    };

    #[test]
    fn a_step_holds_at_most_max_seqs_jobs() {
        let limits = StepLimits {
            max_seqs: 2,
            ..LIMITS
        };
        let jobs = [(0, 1); 5];
        let (chunks, next) = plan_step(&jobs, 1, limits);
        let served: Vec<usize> = chunks.iter().map(|c| c.job).collect();
        assert_eq!((served, next), (vec![1, 2], 3));
    }

    #[test]
    fn long_prompt_is_cut_into_block_aligned_chunks() {
        let mut jobs = vec![(0, 100)];
        let mut seen = Vec::new();
        let mut cursor = 0;
        while jobs[0].0 < 100 {
            let (chunks, c) = plan_step(&jobs, cursor, LIMITS);
            cursor = c;
            assert_eq!(chunks.len(), 1);
            let ch = chunks[0];
            assert_eq!(ch.start % 16, 0);
            seen.push((ch.start, ch.end));
            jobs[0].0 = ch.end;
        }
        // Alone, a job takes the whole step budget (48), not one chunk (32).
        assert_eq!(seen, vec![(0, 48), (48, 96), (96, 100)]);
    }

    #[test]
    fn budget_is_shared_round_robin() {
        let jobs = [(0, 100), (0, 100), (0, 5)];
        let (chunks, next) = plan_step(&jobs, 0, LIMITS);
        assert_eq!(
            chunks,
            vec![
                PlannedChunk {
                    job: 0,
                    start: 0,
                    end: 32
                },
                PlannedChunk {
                    job: 1,
                    start: 0,
                    end: 16
                },
            ]
        );
        assert_eq!(next, 2);
        let (chunks, _) = plan_step(&jobs, next, LIMITS);
        assert_eq!(
            chunks[0],
            PlannedChunk {
                job: 2,
                start: 0,
                end: 5
            }
        );
        assert_eq!(
            chunks.iter().map(|c| c.end - c.start).sum::<usize>(),
            5 + 32
        );
    }

    #[test]
    fn budget_left_by_short_jobs_extends_long_ones() {
        let limits = StepLimits {
            max_batch_tokens: 96,
            ..LIMITS
        };
        let (chunks, next) = plan_step(&[(0, 100), (0, 5)], 0, limits);
        // 32 + 5 in the round; the 59 left extend job 0 by 48 (block-aligned).
        assert_eq!(
            chunks,
            vec![
                PlannedChunk {
                    job: 0,
                    start: 0,
                    end: 80
                },
                PlannedChunk {
                    job: 1,
                    start: 0,
                    end: 5
                },
            ]
        );
        assert_eq!(next, 0);
    }

    #[test]
    fn tiny_budget_still_progresses() {
        let limits = StepLimits {
            max_batch_tokens: 3,
            ..LIMITS
        };
        let (chunks, _) = plan_step(&[(16, 100)], 0, limits);
        assert_eq!(
            chunks,
            vec![PlannedChunk {
                job: 0,
                start: 16,
                end: 32
            }]
        );
    }

    #[test]
    fn nothing_to_do() {
        assert!(plan_step(&[], 3, LIMITS).0.is_empty());
        assert!(plan_step(&[(5, 5)], 0, LIMITS).0.is_empty());
    }
}
