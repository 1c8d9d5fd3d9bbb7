//! One multi-turn run: every session a task that holds a conversation.
//!
//! Sessions start on the arrival schedule (`--request-rate` is then sessions
//! started per second; `inf` starts them all at once). A session sends turn
//! `k + 1` once turn `k`'s answer has fully arrived and `--think-time-ms`
//! has passed, its prompt the whole history so far (see
//! [`conversation`](super::conversation)). `--max-concurrency` bounds the
//! requests in flight, not the sessions. A failed turn ends its session: the
//! turns it never sent count as failed, as do those the `--timeout-s`
//! deadline cuts off (the tasks are then aborted, cancelling their RPCs).
//! Records reach the collector through a bounded channel as each turn ends,
//! so finished turns of an aborted session are kept.

use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::{Semaphore, mpsc};
use tokio::task::JoinSet;

use super::conversation::Conversations;
use super::runner::progress_bar;
use super::{record::RequestRecord, request::Target};

/// How one multi-turn run sends its sessions.
pub struct SessionPlan<'a> {
    pub conversations: &'a Conversations,
    /// Start time of each session, seconds from the start of the run.
    pub offsets: &'a [f64],
    pub think_time: Duration,
    pub max_concurrency: Option<usize>,
    pub timeout: Duration,
    pub model: &'a str,
    pub progress: bool,
}

/// Records of every turn (index `session * turns + turn`) and the run's
/// duration in seconds (start to the last finished turn, or the deadline).
pub async fn run(target: &Target, plan: &SessionPlan<'_>) -> (Vec<RequestRecord>, f64) {
    let convs = plan.conversations;
    let turns = convs.turns();
    let total = convs.num_requests();
    let bar = progress_bar(total, plan.progress);
    let permits = plan
        .max_concurrency
        .map(|n| Arc::new(Semaphore::new(n.max(1))));
    let start = Instant::now();
    let deadline = tokio::time::Instant::from_std(start + plan.timeout);
    let (tx, mut rx) = mpsc::channel::<RequestRecord>(total.max(1));
    let mut tasks = JoinSet::new();
    for (session, (user_turns, &offset)) in convs.sessions.iter().zip(plan.offsets).enumerate() {
        let target = target.clone();
        let user_turns = user_turns.clone();
        let mut history = convs.history();
        let output_len = convs.output_len;
        let model = plan.model.to_string();
        let permits = permits.clone();
        let tx = tx.clone();
        let think_time = plan.think_time;
        let start_at = tokio::time::Instant::from_std(start + Duration::from_secs_f64(offset));
        tasks.spawn(async move {
            tokio::time::sleep_until(start_at).await;
            for (turn, user) in user_turns.iter().enumerate() {
                if turn > 0 && !think_time.is_zero() {
                    tokio::time::sleep(think_time).await;
                }
                history.push_turn(user);
                let prompt = history.prompt(output_len);
                let mut record = {
                    let _permit = match &permits {
                        // The semaphore is never closed, so acquire only fails if it were.
                        Some(p) => p.clone().acquire_owned().await.ok(),
                        None => None,
                    };
                    target
                        .send(session * turns + turn, &prompt, &model, start)
                        .await
                };
                record.session = Some(session);
                record.turn = Some(turn);
                let ok = record.success;
                if ok {
                    history.push_answer(&record);
                }
                // The receiver outlives every task unless the run is over.
                if tx.send(record).await.is_err() || !ok {
                    return;
                }
            }
        });
    }
    drop(tx);
    let mut records: Vec<RequestRecord> = (0..total)
        .map(|i| {
            let (session, turn) = (i / turns, i % turns);
            let mut history = convs.history();
            for user in &convs.sessions[session][..=turn] {
                history.push_turn(user);
            }
            let mut r = RequestRecord::unfinished(i, &history.prompt(convs.output_len));
            r.session = Some(session);
            r.turn = Some(turn);
            r
        })
        .collect();
    let mut last_finish = start;
    loop {
        match tokio::time::timeout_at(deadline, rx.recv()).await {
            Ok(Some(record)) => {
                last_finish = Instant::now();
                bar.inc(1);
                let i = record.index;
                records[i] = record;
            }
            // Every session is done (a panicked one leaves its turns unfinished).
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
