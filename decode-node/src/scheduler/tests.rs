use std::ops::Range;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{Sender, channel};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tandem_engine::backend::{Backend, KvIo, LayerHook};
use tandem_engine::generation::GenerationParams;
use tandem_engine::kv_cache::KvLayout;
use tandem_engine::model_dir::{BatchLimits, GpuPriority};
use tandem_engine::synth::{SynthSpec, write_model_dir};
use tandem_engine::{
    BlockId, ModelConfig, ModelDir, Result as EngineResult, RowAsk, RowOut, SeqChunk, TokenDraw,
};
use tandem_kv_transfer::{FirstLogprobs, FirstToken, Reservations};
use tandem_proto::v1 as pb;
use tokio::sync::{mpsc, oneshot};

use super::inbox::Inbox;
use super::{Command, Event, KvEndpoint, Limits, Scheduler, Stats};
use crate::admission::Admission;
use crate::errors::Refusal;
use crate::sequence::State;

type Reply = oneshot::Receiver<Result<(), Refusal>>;

/// A scheduler over a small synthesized model on the CPU, every prompt
/// prefilled here.
fn scheduler() -> (
    tempfile::TempDir,
    Scheduler<Box<dyn tandem_engine::backend::Backend>>,
) {
    scheduler_with(|b| b)
}

/// The same over the CPU backend as `wrap` returns it.
fn scheduler_with<B: Backend>(
    wrap: impl FnOnce(Box<dyn Backend>) -> B,
) -> (tempfile::TempDir, Scheduler<B>) {
    let dir = tempfile::tempdir().expect("tempdir");
    let spec = SynthSpec {
        hidden_size: 64,
        intermediate_size: 128,
        num_layers: 2,
        num_heads: 4,
        num_kv_heads: 2,
        max_position_embeddings: 512,
        seed: 5,
        ..Default::default()
    };
    write_model_dir(dir.path(), &spec).expect("synth");
    let model = Arc::new(ModelDir::open(dir.path()).expect("open"));
    let limits = BatchLimits {
        max_tokens: 256,
        max_seqs: 8,
        priority: GpuPriority::Normal,
    };
    let backend = wrap(model.load(64, 4, limits).expect("backend"));
    let endpoint = KvEndpoint {
        quic_addr: "127.0.0.1:1".into(),
        quic_addrs: vec!["127.0.0.1:1".into()],
        server_name: "decode".into(),
        cert_der: Vec::new(),
        model_fingerprint: String::new(),
    };
    let limits = Limits {
        max_batch: 8,
        max_batch_tokens: 256,
        prefix_cache: false,
        local_prefill_below: usize::MAX,
        hold_first_token: true,
    };
    let s = Scheduler::new(
        backend,
        model,
        limits,
        endpoint,
        Arc::new(Mutex::new(Reservations::new())),
        Arc::new(Mutex::new(Stats::default())),
        "test",
    );
    (dir, s)
}

/// Sends an admission of `id` (a 6-token prompt, `max_tokens` to generate),
/// prefilled here.
fn admit(tx: &Sender<Command>, id: &str, max_tokens: usize) -> (Reply, mpsc::Receiver<Event>) {
    admit_as(tx, id, max_tokens, true)
}

/// The same, prefilled here when `local` (else as the scheduler's policy says).
fn admit_as(
    tx: &Sender<Command>,
    id: &str,
    max_tokens: usize,
    local: bool,
) -> (Reply, mpsc::Receiver<Event>) {
    let params = GenerationParams {
        max_tokens,
        ignore_eos: true,
        ..Default::default()
    };
    admit_with(tx, id, params, local)
}

fn admit_with(
    tx: &Sender<Command>,
    id: &str,
    params: GenerationParams,
    local: bool,
) -> (Reply, mpsc::Receiver<Event>) {
    admit_asking(tx, id, params, local, None)
}

/// Admits `id` (the 6-token prompt), asking for its prompt's log
/// probabilities with `prompt_logprobs` top tokens each when set.
fn admit_asking(
    tx: &Sender<Command>,
    id: &str,
    params: GenerationParams,
    local: bool,
    prompt_logprobs: Option<usize>,
) -> (Reply, mpsc::Receiver<Event>) {
    let (a, rx) = admission(id, vec![1, 2, 3, 4, 5, 6], params, local, prompt_logprobs);
    let (reply, answer) = oneshot::channel();
    tx.send(Command::Admit(Box::new(a), reply))
        .expect("loop's channel");
    (answer, rx)
}

/// An admission of `prompt` and its response stream.
fn admission(
    id: &str,
    prompt: Vec<u32>,
    params: GenerationParams,
    local: bool,
    prompt_logprobs: Option<usize>,
) -> (Admission, mpsc::Receiver<Event>) {
    let (events, rx) = mpsc::channel(params.max_tokens + 5);
    let a = Admission {
        request_id: id.into(),
        prompt,
        generated: Vec::new(),
        prompt_logprobs,
        params,
        force_local: local,
        kv_timeout: Duration::from_secs(10),
        prefill_peer: String::new(),
        prefill_queue: Duration::ZERO,
        cache_salt: String::new(),
        events,
        span: tracing::Span::none(),
    };
    (a, rx)
}

#[test]
fn commands_arriving_during_a_step_are_taken_and_a_cancel_waits_for_its_end() {
    let (_dir, mut s) = scheduler();
    let (tx, rx) = channel();
    let mut rx = Inbox::new(rx);
    let (mut a_reply, _a_events) = admit(&tx, "a", 32);
    s.handle(rx.try_recv().expect("admission of a"));
    assert_eq!(a_reply.try_recv().ok(), Some(Ok(())));

    // An admission waiting while a's prompt is prefilled is taken during
    // the step: answered when the step returns.
    let (mut b_reply, _b_events) = admit(&tx, "b", 32);
    s.step(&mut rx);
    assert_eq!(
        b_reply.try_recv().ok(),
        Some(Ok(())),
        "b admitted during the step"
    );
    assert!(s.held.is_none());

    // A cancel of a (in the next step) waits for that step's end, and the
    // admission behind it waits with it, so the order holds.
    let (cancelled, mut found) = oneshot::channel();
    tx.send(Command::Cancel("a".into(), cancelled))
        .expect("loop's channel");
    let (mut c_reply, _c_events) = admit(&tx, "c", 32);
    s.step(&mut rx);
    assert!(
        matches!(s.held, Some(Command::Cancel(..))),
        "the cancel is held"
    );
    assert!(s.by_request.contains_key("a"), "a ran its step to the end");
    assert!(found.try_recv().is_err(), "not yet answered");
    assert!(c_reply.try_recv().is_err(), "c waits behind the cancel");
    let held = s.held.take().expect("held cancel");
    s.handle(held);
    assert_eq!(found.try_recv().ok(), Some(true));
    assert!(!s.by_request.contains_key("a"));
    s.handle(rx.try_recv().expect("admission of c"));
    assert_eq!(c_reply.try_recv().ok(), Some(Ok(())));
}

/// The CPU backend, reporting its step as running on a device until the
/// test says it is done: the scheduler's side of a GPU step, isolated.
struct DeviceLike {
    inner: Box<dyn Backend>,
    running: Arc<AtomicBool>,
}

impl KvIo for DeviceLike {
    fn export_layer(&self, layer: usize, blocks: &[BlockId]) -> EngineResult<Vec<u8>> {
        self.inner.export_layer(layer, blocks)
    }
    fn import_layer(&mut self, layer: usize, blocks: &[BlockId], b: &[u8]) -> EngineResult<()> {
        self.inner.import_layer(layer, blocks, b)
    }
    fn kv_head_shards(&self) -> Vec<Range<usize>> {
        self.inner.kv_head_shards()
    }
    fn export_heads(
        &self,
        layer: usize,
        blocks: &[BlockId],
        heads: Range<usize>,
    ) -> EngineResult<Vec<u8>> {
        self.inner.export_heads(layer, blocks, heads)
    }
    fn import_heads(
        &mut self,
        layer: usize,
        blocks: &[BlockId],
        heads: Range<usize>,
        b: &[u8],
    ) -> EngineResult<()> {
        self.inner.import_heads(layer, blocks, heads, b)
    }
}

impl Backend for DeviceLike {
    fn config(&self) -> &ModelConfig {
        self.inner.config()
    }
    fn kv_layout(&self) -> KvLayout {
        self.inner.kv_layout()
    }
    fn forward(
        &mut self,
        chunks: &[SeqChunk<'_>],
        logits: &[bool],
        on_layer: Option<LayerHook<'_>>,
    ) -> EngineResult<Vec<Option<Vec<f32>>>> {
        self.inner.forward(chunks, logits, on_layer)
    }
    fn start_step(
        &mut self,
        chunks: &[SeqChunk<'_>],
        draws: &[TokenDraw],
        on_layer: Option<LayerHook<'_>>,
    ) -> EngineResult<()> {
        self.inner.start_step(chunks, draws, on_layer)
    }
    fn finish_step(&mut self, asks: &[RowAsk<'_>]) -> EngineResult<Vec<RowOut>> {
        self.inner.finish_step(asks)
    }
    fn step_running(&self) -> bool {
        self.running.load(Ordering::Acquire)
    }
}

#[test]
fn commands_keep_being_taken_until_the_step_is_done_on_the_device() {
    let running = Arc::new(AtomicBool::new(false));
    let r = running.clone();
    let (_dir, mut s) = scheduler_with(move |inner| DeviceLike { inner, running: r });
    let (tx, rx) = channel();
    let mut rx = Inbox::new(rx);
    let (mut a_reply, _a_events) = admit(&tx, "a", 32);
    s.handle(rx.try_recv().expect("admission of a"));
    assert_eq!(a_reply.try_recv().ok(), Some(Ok(())));
    // The step "runs on the device" while b's admission arrives, then ends.
    running.store(true, Ordering::Release);
    let late = std::thread::spawn({
        let (tx, running) = (tx.clone(), running.clone());
        move || {
            std::thread::sleep(Duration::from_millis(30));
            let b = admit(&tx, "b", 32);
            std::thread::sleep(Duration::from_millis(30));
            running.store(false, Ordering::Release);
            b
        }
    });
    s.step(&mut rx);
    let (mut b_reply, _b_events) = late.join().expect("sender thread");
    assert_eq!(
        b_reply.try_recv().ok(),
        Some(Ok(())),
        "b, sent after the step started, was admitted before it ended"
    );
    // With the step done, nothing is waited for: a command sent now stays
    // in the channel for the loop's next turn.
    let (mut c_reply, _c_events) = admit(&tx, "c", 32);
    let started = std::time::Instant::now();
    s.take_commands_during_step(&mut rx);
    assert!(started.elapsed() < Duration::from_millis(20));
    assert_eq!(
        c_reply.try_recv().ok(),
        Some(Ok(())),
        "queued commands are still taken"
    );
}

/// The events on a stream so far: token ids, and whether it finished.
fn drain(rx: &mut mpsc::Receiver<Event>) -> (Vec<u32>, bool) {
    let (mut ids, mut finished) = (Vec::new(), false);
    while let Ok(Ok(m)) = rx.try_recv() {
        match m.event {
            Some(pb::decode_response::Event::Token(t)) => ids.extend(t.ids),
            Some(pb::decode_response::Event::Finished(_)) => finished = true,
            _ => {}
        }
    }
    (ids, finished)
}

#[test]
fn a_first_token_ahead_of_the_kv_goes_out_once_and_an_answered_request_waits_for_its_kv() {
    let (_dir, mut s) = scheduler();
    s.policy.local_prefill_below = 0;
    let (tx, rx) = channel();
    let mut rx = Inbox::new(rx);
    let free = s.blocks.num_free();

    // Four tokens: the first leaves at FirstToken, not again at KvComplete.
    let (mut reply, mut events) = admit_as(&tx, "four", 4, false);
    s.handle(rx.try_recv().expect("admission"));
    assert_eq!(reply.try_recv().ok(), Some(Ok(())));
    let id = s.by_request["four"];
    assert!(matches!(s.seqs[&id].state, State::AwaitingKv { .. }));
    s.handle(Command::FirstToken {
        transfer_id: id,
        first: first(42),
    });
    assert_eq!(drain(&mut events), (vec![42], false));
    assert!(
        matches!(s.seqs[&id].state, State::AwaitingKv { .. }),
        "not in a step yet"
    );
    s.handle(Command::KvComplete { transfer_id: id });
    assert!(matches!(s.seqs[&id].state, State::Running));
    assert_eq!(drain(&mut events), (vec![], false), "no second first token");
    s.step(&mut rx);
    assert_eq!(
        drain(&mut events).0.len(),
        1,
        "the first decode step's token"
    );
    s.handle(Command::Cancel("four".into(), oneshot::channel().0));

    // One token: answered at FirstToken; the caller goes away; the blocks
    // and the reservation stay until the KV is in, then all are free.
    let (mut reply, mut events) = admit_as(&tx, "one", 1, false);
    s.handle(rx.try_recv().expect("admission"));
    assert_eq!(reply.try_recv().ok(), Some(Ok(())));
    let id = s.by_request["one"];
    s.handle(Command::FirstToken {
        transfer_id: id,
        first: first(7),
    });
    assert_eq!(drain(&mut events), (vec![7], true));
    drop(events);
    s.reap(std::time::Instant::now());
    assert!(s.seqs[&id].answered, "held for its KV");
    assert!(s.blocks.num_free() < free);
    s.handle(Command::KvComplete { transfer_id: id });
    assert!(!s.seqs.contains_key(&id));
    assert_eq!(s.blocks.num_free(), free, "every block free");

    // A KvComplete before any first token fails the request.
    let (_reply, mut events) = admit_as(&tx, "odd", 4, false);
    s.handle(rx.try_recv().expect("admission"));
    let id = s.by_request["odd"];
    s.handle(Command::KvComplete { transfer_id: id });
    assert!(!s.seqs.contains_key(&id));
    let mut failed = false;
    while let Ok(m) = events.try_recv() {
        failed |= m.is_err();
    }
    assert!(failed, "the stream ends in an error");
    assert_eq!(s.blocks.num_free(), free);
}

#[test]
fn a_first_token_waits_for_a_place_in_the_batch_and_goes_out_with_the_second() {
    let (_dir, mut s) = scheduler();
    s.policy.local_prefill_below = 0;
    s.limits.max_batch = 2;
    let (tx, rx) = channel();
    let mut rx = Inbox::new(rx);
    let free = s.blocks.num_free();
    let mut streams = Vec::new();
    let mut ids = Vec::new();
    for (name, max_tokens) in [("a", 8), ("b", 8), ("c", 8), ("d", 8), ("e", 1)] {
        let (_reply, events) = admit_as(&tx, name, max_tokens, false);
        s.handle(rx.try_recv().expect("admission"));
        let id = s.by_request[name];
        s.handle(Command::FirstToken {
            transfer_id: id,
            first: first(40 + ids.len() as u32),
        });
        streams.push(events);
        ids.push(id);
    }
    let [a, b, c, d, e] = ids[..] else {
        unreachable!()
    };
    // a and b take the two places; c and d wait; e's token ends it, so it
    // needs no place and is answered now.
    assert_eq!(drain(&mut streams[0]), (vec![40], false));
    assert_eq!(drain(&mut streams[1]), (vec![41], false));
    assert_eq!(
        drain(&mut streams[2]),
        (vec![], false),
        "c waits for a place"
    );
    assert_eq!(
        drain(&mut streams[3]),
        (vec![], false),
        "d waits for a place"
    );
    assert_eq!(drain(&mut streams[4]), (vec![44], true));
    for id in [a, b, c, d, e] {
        s.handle(Command::KvComplete { transfer_id: id });
    }
    s.step(&mut rx);
    assert_eq!(drain(&mut streams[0]).0.len(), 1, "a decodes");
    assert_eq!(
        drain(&mut streams[2]),
        (vec![], false),
        "no place for c yet"
    );

    // a ends: c's first token goes out with the step that computes its second.
    s.handle(Command::Cancel("a".into(), oneshot::channel().0));
    s.step(&mut rx);
    let (c_tokens, _) = drain(&mut streams[2]);
    assert_eq!(c_tokens.len(), 2, "first and second token together");
    assert_eq!(c_tokens[0], 42);
    assert_eq!(drain(&mut streams[3]), (vec![], false), "d still waits");

    // d's caller goes away while it waits: its row is dropped when its place
    // comes, and everything is freed.
    drop(streams.remove(3));
    s.handle(Command::Cancel("b".into(), oneshot::channel().0));
    s.step(&mut rx);
    assert!(!s.seqs.contains_key(&d));
    s.handle(Command::Cancel("c".into(), oneshot::channel().0));
    assert!(s.seqs.is_empty());
    assert_eq!(s.blocks.num_free(), free, "every block free");

    // With `hold_first_token` off the token goes out on arrival, place or not.
    s.limits.hold_first_token = false;
    let mut streams = Vec::new();
    for name in ["f", "g", "h"] {
        let (_reply, events) = admit_as(&tx, name, 8, false);
        s.handle(rx.try_recv().expect("admission"));
        s.handle(Command::FirstToken {
            transfer_id: s.by_request[name],
            first: first(50),
        });
        streams.push(events);
    }
    for events in &mut streams {
        assert_eq!(drain(events), (vec![50], false));
    }
}

fn first(id: u32) -> FirstToken {
    FirstToken { id, logprobs: None }
}

#[test]
fn the_first_token_goes_out_with_its_log_probabilities_and_one_without_them_fails() {
    let (_dir, mut s) = scheduler();
    s.policy.local_prefill_below = 0;
    let (tx, rx) = channel();
    let mut rx = Inbox::new(rx);
    let free = s.blocks.num_free();
    let params = GenerationParams {
        max_tokens: 4,
        ignore_eos: true,
        logprobs: Some(2),
        ..Default::default()
    };

    let (_reply, mut events) = admit_with(&tx, "with", params.clone(), false);
    s.handle(rx.try_recv().expect("admission"));
    let id = s.by_request["with"];
    let logprobs = FirstLogprobs {
        logprob: -0.5,
        top: vec![(42, -0.5), (3, -1.25)],
    };
    s.handle(Command::FirstToken {
        transfer_id: id,
        first: FirstToken {
            id: 42,
            logprobs: Some(logprobs),
        },
    });
    let chunk = loop {
        let message = events.try_recv().expect("a token").expect("no error");
        if let Some(pb::decode_response::Event::Token(chunk)) = message.event {
            break chunk;
        }
    };
    assert_eq!(chunk.ids, vec![42]);
    let expected = pb::TokenLogprobs {
        id: 42,
        logprob: -0.5,
        top: vec![
            pb::TopLogprob {
                id: 42,
                logprob: -0.5,
            },
            pb::TopLogprob {
                id: 3,
                logprob: -1.25,
            },
        ],
        rank: 0,
    };
    assert_eq!(chunk.logprobs, vec![expected]);
    s.handle(Command::Cancel("with".into(), oneshot::channel().0));

    // Asked for, not sent: the request fails, its blocks come back.
    let (_reply, mut events) = admit_with(&tx, "without", params, false);
    s.handle(rx.try_recv().expect("admission"));
    let id = s.by_request["without"];
    s.handle(Command::FirstToken {
        transfer_id: id,
        first: first(42),
    });
    assert!(!s.seqs.contains_key(&id));
    let error = loop {
        match events.try_recv() {
            Ok(Err(status)) => break status,
            Ok(Ok(_)) => continue,
            Err(e) => panic!("the stream ended without an error: {e:?}"),
        }
    };
    assert!(error.to_string().contains("log probabilities"), "{error}");
    assert_eq!(s.blocks.num_free(), free, "every block free");
}

/// An ImportLayer of a transfer this node does not hold (handled at once: dropped).
fn stray_import(layer: usize) -> Command {
    Command::ImportLayer {
        transfer_id: 999_999,
        layer,
        first_block: 0,
        block_count: 1,
        heads: 0..1,
        dtype: tandem_kv_transfer::WireDtype::F32,
        payload: tandem_kv_transfer::Payload::default(),
    }
}

#[test]
fn imports_waiting_before_a_step_stop_after_the_slice_while_sequences_run() {
    let (_dir, mut s) = scheduler();
    let (tx, rx) = channel();
    let mut rx = Inbox::new(rx);
    s.import_slice = Duration::ZERO;
    // Nothing runs: every waiting command is taken.
    for layer in 0..3 {
        tx.send(stray_import(layer)).expect("open");
    }
    s.take_waiting_commands(&mut rx);
    assert!(rx.try_recv().is_err(), "all taken");
    // A sequence runs: the first import spends the (empty) slice, the
    // rest wait for the step's device time, in order.
    let (mut a_reply, _a_events) = admit(&tx, "a", 32);
    s.handle(rx.try_recv().expect("admission of a"));
    assert_eq!(a_reply.try_recv().ok(), Some(Ok(())));
    for layer in 0..3 {
        tx.send(stray_import(layer)).expect("open");
    }
    s.take_waiting_commands(&mut rx);
    for layer in 1..3 {
        match rx.try_recv() {
            Ok(Command::ImportLayer { layer: l, .. }) => assert_eq!(l, layer),
            _ => panic!("import of layer {layer} should be waiting"),
        }
    }
}

/// Admits `id` (the 6-token prompt, 2 tokens to generate) asking for its
/// prompt's log probabilities with 2 top tokens each.
fn admit_scored(tx: &Sender<Command>, id: &str) -> (Reply, mpsc::Receiver<Event>) {
    let params = GenerationParams {
        max_tokens: 2,
        ignore_eos: true,
        ..Default::default()
    };
    admit_asking(tx, id, params, false, Some(2))
}

#[test]
fn prompt_logprobs_come_before_the_first_token_or_are_refused_where_not_computed() {
    // The CPU backend: prefilled here whatever the policy, the prompt's
    // log probabilities first, then the tokens.
    let (_dir, mut s) = scheduler();
    s.policy.local_prefill_below = 0;
    let (tx, rx) = channel();
    let mut rx = Inbox::new(rx);
    let (mut reply, mut events) = admit_scored(&tx, "scored");
    s.handle(rx.try_recv().expect("admission"));
    assert_eq!(reply.try_recv().ok(), Some(Ok(())));
    let admitted = events.try_recv().expect("Admitted").expect("not an error");
    assert!(matches!(
        admitted.event,
        Some(pb::decode_response::Event::Admitted(pb::Admitted {
            local_prefill: true,
            ..
        }))
    ));
    for _ in 0..4 {
        s.step(&mut rx);
    }
    let first = events.try_recv().expect("a message").expect("not an error");
    let Some(pb::decode_response::Event::PromptLogprobs(p)) = first.event else {
        panic!("the prompt's log probabilities first, got {first:?}");
    };
    assert_eq!(p.first_id, 1);
    assert_eq!(
        p.tokens.iter().map(|t| t.id).collect::<Vec<_>>(),
        [2, 3, 4, 5, 6]
    );
    assert!(p.tokens.iter().all(|t| t.top.len() == 2 && t.rank >= 1));
    let (ids, finished) = drain(&mut events);
    assert_eq!(ids.len(), 2);
    assert!(finished);

    // A backend that computes only a prompt's last logits (as CUDA's does
    // today): refused at admission, holding nothing.
    let running = Arc::new(AtomicBool::new(false));
    let (_dir, mut s) = scheduler_with(move |inner| DeviceLike { inner, running });
    let free = s.blocks.num_free();
    let (mut reply, _events) = admit_scored(&tx, "refused");
    s.handle(rx.try_recv().expect("admission"));
    match reply.try_recv().ok() {
        Some(Err(Refusal::InvalidRequest(m))) => assert!(m.contains("prompt_logprobs"), "{m}"),
        other => panic!("expected a refusal, got {other:?}"),
    }
    assert_eq!(s.blocks.num_free(), free);
    assert!(s.seqs.is_empty());
}

#[test]
fn each_kv_frame_that_lands_moves_the_kv_deadline_and_a_silent_transfer_still_times_out() {
    let (_dir, mut s) = scheduler();
    s.policy.local_prefill_below = 0;
    let (tx, rx) = channel();
    let free = s.blocks.num_free();
    let (mut reply, mut events) = admit_as(&tx, "long", 4, false);
    s.handle(rx.try_recv().expect("admission"));
    assert_eq!(reply.try_recv().ok(), Some(Ok(())));
    let id = s.by_request["long"];
    // As if its KV wait were nearly over when the first frame lands.
    let now = std::time::Instant::now();
    let patience = Duration::from_secs(10);
    s.seqs.get_mut(&id).expect("admitted").state = State::AwaitingKv {
        deadline: now + Duration::from_millis(1),
        patience,
    };
    let layout = s.backend.kv_layout();
    s.handle(Command::ImportLayer {
        transfer_id: id,
        layer: 0,
        first_block: 0,
        block_count: 1,
        heads: 0..layout.num_kv_heads,
        dtype: tandem_cluster::kv_dtype::wire_dtype(layout.dtype),
        payload: vec![0u8; layout.block_bytes()].into(),
    });
    let State::AwaitingKv { deadline, .. } = s.seqs[&id].state else {
        panic!("the frame was refused: {:?}", s.seqs[&id].state);
    };
    assert!(deadline >= now + patience, "the frame moved the deadline");
    s.reap(now + Duration::from_secs(5));
    assert!(
        s.seqs.contains_key(&id),
        "still waiting after the old deadline"
    );
    // No frame for `patience` after the last one: the wait ends.
    s.reap(deadline);
    assert!(!s.seqs.contains_key(&id), "a silent transfer times out");
    let mut timed_out = false;
    while let Ok(m) = events.try_recv() {
        timed_out |= m.is_err_and(|e| matches!(e, crate::errors::RequestError::KvTimeout));
    }
    assert!(timed_out, "the stream ends with the KV timeout");
    assert_eq!(s.blocks.num_free(), free, "every block free");
}

/// Steps until every stream of `streams` has finished (at most `limit`
/// steps); their tokens.
fn run_to_end(
    s: &mut Scheduler<Box<dyn Backend>>,
    rx: &mut Inbox,
    streams: &mut [mpsc::Receiver<Event>],
    limit: usize,
) -> Vec<Vec<u32>> {
    let mut out = vec![Vec::new(); streams.len()];
    let mut done = vec![false; streams.len()];
    for _ in 0..limit {
        if done.iter().all(|&d| d) {
            break;
        }
        s.step(rx);
        for ((events, out), done) in streams.iter_mut().zip(&mut out).zip(&mut done) {
            let (ids, finished) = drain(events);
            out.extend(ids);
            *done |= finished;
        }
    }
    assert!(done.iter().all(|&d| d), "every stream finished");
    out
}

/// Seeded sampling with a penalty on the tokens so far: what a sequence draws
/// depends on its whole history and its sampler's state.
fn seeded(seed: u64, max_tokens: usize) -> GenerationParams {
    GenerationParams {
        max_tokens,
        ignore_eos: true,
        sampling: tandem_engine::SamplingParams {
            temperature: 0.8,
            frequency_penalty: 0.5,
            seed: Some(seed),
            ..Default::default()
        },
        ..Default::default()
    }
}

#[test]
fn the_newest_sequence_is_preempted_for_an_older_one_to_grow_and_resumes_with_the_same_tokens() {
    // 64 blocks of 4 tokens. A 6-token prompt and 150 tokens take 39 blocks:
    // each request fits alone, two do not fit together.
    let alone = |seed: u64| {
        let (_dir, mut s) = scheduler();
        let (tx, rx) = channel();
        let mut rx = Inbox::new(rx);
        let (_reply, events) = admit_with(&tx, "alone", seeded(seed, 150), true);
        s.handle(rx.try_recv().expect("admission"));
        let out = run_to_end(&mut s, &mut rx, &mut [events], 400);
        assert_eq!(s.stats().preemptions_total, 0);
        out.into_iter().next().expect("one stream")
    };
    let (a_alone, b_alone) = (alone(1), alone(2));
    assert_eq!((a_alone.len(), b_alone.len()), (150, 150));

    let (_dir, mut s) = scheduler();
    let (tx, rx) = channel();
    let mut rx = Inbox::new(rx);
    let total = s.blocks.total();
    let mut streams = Vec::new();
    for (id, seed) in [("a", 1), ("b", 2)] {
        let (mut reply, events) = admit_with(&tx, id, seeded(seed, 150), true);
        s.handle(rx.try_recv().expect("admission"));
        assert_eq!(reply.try_recv().ok(), Some(Ok(())));
        assert_eq!(
            s.seqs[&s.by_request[id]].table.len(),
            2,
            "its prompt's blocks"
        );
        streams.push(events);
    }
    // Until the cache is full both decode; then b, the newer, gives its
    // blocks back for a to grow.
    let b = s.by_request["b"];
    let mut steps = 0;
    while !matches!(s.seqs[&b].state, State::Preempted) {
        s.step(&mut rx);
        steps += 1;
        assert!(steps < 200, "b was never preempted");
    }
    assert_eq!(s.stats().preemptions_total, 1);
    assert!(s.seqs[&b].table.is_empty(), "its blocks are given back");
    // While b waits for blocks, a new request is refused.
    let (mut reply, _c) = admit(&tx, "c", 8);
    s.handle(rx.try_recv().expect("admission"));
    match reply.try_recv().ok() {
        Some(Err(Refusal::OutOfBlocks(m))) => assert!(m.contains("preempted"), "{m}"),
        other => panic!("expected OutOfBlocks, got {other:?}"),
    }
    // a finishes; b is prefilled again and goes on where it stopped.
    let out = run_to_end(&mut s, &mut rx, &mut streams, 400);
    assert_eq!(out[0], a_alone, "a's tokens");
    assert_eq!(out[1], b_alone, "b's tokens, across its preemption");
    assert!(s.seqs.is_empty());
    assert_eq!(s.blocks.num_free(), total, "every block free");
}

#[test]
fn a_preempted_sequence_takes_its_full_blocks_back_from_the_prefix_cache() {
    let (_dir, mut s) = scheduler();
    let total = s.blocks.total();
    s.blocks = tandem_engine::BlockManager::with_prefix_cache(total);
    s.limits.prefix_cache = true;
    let (tx, rx) = channel();
    let mut rx = Inbox::new(rx);
    let mut streams = Vec::new();
    for (id, seed) in [("a", 1), ("b", 2)] {
        let (_reply, events) = admit_with(&tx, id, seeded(seed, 150), true);
        s.handle(rx.try_recv().expect("admission"));
        streams.push(events);
    }
    let b = s.by_request["b"];
    let mut steps = 0;
    let resumed_at = loop {
        s.step(&mut rx);
        steps += 1;
        assert!(steps < 400, "b never resumed");
        // What the next step would do first, here to see its outcome.
        s.resume_preempted();
        if s.stats().preemptions_total == 1
            && let State::Prefilling { done } = s.seqs[&b].state
        {
            break done;
        }
    };
    // Its blocks were released leaves first, so a's growth evicted the end
    // of b's context and left the start named in the cache.
    let context = s.seqs[&b].generation.tokens().len();
    assert!(
        resumed_at >= 40 && resumed_at % 4 == 0 && resumed_at < context,
        "resumed after {resumed_at} cached tokens of {context}"
    );
    let out = run_to_end(&mut s, &mut rx, &mut streams, 400);
    assert_eq!(out[1].len(), 150);
    assert_eq!(s.blocks.num_free(), total, "every block free or evictable");
}

#[test]
fn a_cache_smaller_than_the_model_context_is_the_context_served() {
    // 64 blocks of 4 tokens: 256 tokens, against the model's 512.
    let (_dir, mut s) = scheduler();
    let (tx, rx) = channel();
    let mut rx = Inbox::new(rx);
    assert_eq!(s.max_context(), 256);
    let (mut reply, events) = admit(&tx, "long", 400);
    s.handle(rx.try_recv().expect("admission"));
    assert_eq!(reply.try_recv().ok(), Some(Ok(())));
    let out = run_to_end(&mut s, &mut rx, &mut [events], 400);
    assert_eq!(out[0].len(), 256 - 6, "it ends where the cache does");
    assert_eq!(s.blocks.num_free(), s.blocks.total());
    let params = GenerationParams {
        max_tokens: 4,
        ..Default::default()
    };
    let (a, _events) = admission("full", vec![7; 256], params, true, None);
    match s.admit(a) {
        Err(Refusal::ContextFull {
            context_len: 256,
            max_context: 256,
        }) => {}
        other => panic!("expected ContextFull, got {:?}", other.err()),
    }
}
