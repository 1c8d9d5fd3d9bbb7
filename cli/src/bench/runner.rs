//! One benchmark run at one request rate: send on schedule, collect records.
//!
//! Every request is its own task: it sleeps until its arrival offset, waits
//! for a `--max-concurrency` permit (when set), then sends. The run ends when
//! all tasks are done or at `--timeout-s`, whichever comes first; at the
//! deadline the remaining tasks are aborted (dropping their streams cancels
//! the RPCs) and their requests count as failed. The duration is from the
//! start of the run to the last finished request (or to the deadline).

use std::sync::Arc;
use std::time::{Duration, Instant};

use indicatif::{ProgressBar, ProgressStyle};
use tokio::sync::Semaphore;
use tokio::task::JoinSet;

use super::dataset::BenchPrompt;
use super::{record::RequestRecord, request::Target};

/// How one run sends its requests.
pub struct RunPlan<'a> {
    pub prompts: &'a [BenchPrompt],
    /// Send time of each prompt, seconds from the start.
    pub offsets: &'a [f64],
    pub max_concurrency: Option<usize>,
    pub timeout: Duration,
    pub model: &'a str,
    pub progress: bool,
}

/// Records of every request (in dataset order) and the run's duration in seconds.
pub async fn run(target: &Target, plan: &RunPlan<'_>) -> (Vec<RequestRecord>, f64) {
    let bar = progress_bar(plan.prompts.len(), plan.progress);
    let permits = plan
        .max_concurrency
        .map(|n| Arc::new(Semaphore::new(n.max(1))));
    let start = Instant::now();
    let deadline = tokio::time::Instant::from_std(start + plan.timeout);
    let mut tasks = JoinSet::new();
    for (index, (prompt, &offset)) in plan.prompts.iter().zip(plan.offsets).enumerate() {
        let target = target.clone();
        let prompt = prompt.clone();
        let model = plan.model.to_string();
        let permits = permits.clone();
        let send_at = tokio::time::Instant::from_std(start + Duration::from_secs_f64(offset));
        tasks.spawn(async move {
            tokio::time::sleep_until(send_at).await;
            let _permit = match &permits {
                // The semaphore is never closed, so acquire only fails if it were.
                Some(p) => p.clone().acquire_owned().await.ok(),
                None => None,
            };
            target.send(index, &prompt, &model, start).await
        });
    }
    let mut records: Vec<RequestRecord> = plan
        .prompts
        .iter()
        .enumerate()
        .map(|(i, p)| RequestRecord::unfinished(i, p))
        .collect();
    let mut last_finish = start;
    loop {
        match tokio::time::timeout_at(deadline, tasks.join_next()).await {
            Ok(Some(Ok(record))) => {
                last_finish = Instant::now();
                bar.inc(1);
                let i = record.index;
                records[i] = record;
            }
            // A panicked request task leaves its record as unfinished.
            Ok(Some(Err(_))) => bar.inc(1),
            Ok(None) => break,
            Err(_elapsed) => {
                tasks.abort_all();
                last_finish = Instant::now();
                break;
            }
        }
    }
    bar.finish_and_clear();
    (records, (last_finish - start).as_secs_f64())
}

pub(crate) fn progress_bar(len: usize, enabled: bool) -> ProgressBar {
    if !enabled || !std::io::IsTerminal::is_terminal(&std::io::stderr()) {
        return ProgressBar::hidden();
    }
    let bar = ProgressBar::new(len as u64);
    if let Ok(style) =
        ProgressStyle::with_template("{elapsed_precise} [{bar:40}] {pos}/{len} requests {msg}")
    {
        bar.set_style(style.progress_chars("=> "));
    }
    bar
}
