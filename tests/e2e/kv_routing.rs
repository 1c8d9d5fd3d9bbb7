//! KV-aware routing end to end: two real decode nodes (local prefill, the
//! prefix cache on), routers that learn the nodes' caches from the KV events
//! on their load streams alone.
//!
//! Helper routers that see one node each put a conversation's history on a
//! chosen node; the router under test never saw those turns, so where it
//! sends the next turn shows what its index learned from the events.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tandem_cluster::{Config, DecodeSection, Member, Membership, Role, RouterSection};
use tandem_engine::ModelDir;
use tandem_proto::v1 as pb;
use tandem_router::node_addr::NodeAddr;
use tandem_router::nodes::NodePool;
use tandem_tests::{complete, greedy_request, prompt, small_model};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

type Client = pb::generate_client::GenerateClient<tonic::transport::Channel>;

/// Members the test changes at will.
struct Members(watch::Sender<Vec<Member>>);

impl Membership for Members {
    fn watch(&self) -> watch::Receiver<Vec<Member>> {
        self.0.subscribe()
    }
}

struct Decode {
    addr: SocketAddr,
    stats: Arc<Mutex<tandem_decode::scheduler::Stats>>,
    stop: CancellationToken,
    done: tokio::task::JoinHandle<()>,
}

impl Decode {
    /// Prompt tokens this node prefilled so far: grows when it serves a request.
    fn prompt_tokens(&self) -> u64 {
        self.stats.lock().expect("stats").local_prompt_tokens_total
    }

    fn cached_blocks(&self) -> u32 {
        self.stats.lock().expect("stats").prefix_cache_blocks
    }
}

fn sections() -> (DecodeSection, RouterSection) {
    let mut c = Config::parse(
        "[router]\nlisten = \"127.0.0.1:0\"\nload_interval_ms = 20\n[decode]\nkv_blocks = 256\nprefix_cache = true\n",
    )
    .expect("test config");
    (
        c.decode.take().expect("decode"),
        c.router.take().expect("router"),
    )
}

async fn start_decode(model: &Arc<ModelDir>, listen: Option<SocketAddr>) -> Decode {
    let (mut section, _) = sections();
    if let Some(addr) = listen {
        section.listen = addr;
    }
    let stop = CancellationToken::new();
    // A restarted node may find its old port briefly taken.
    let mut tries = 0;
    let d = loop {
        match tandem_decode::serve(model.clone(), section.clone(), stop.clone()).await {
            Ok(d) => break d,
            Err(e) if tries < 50 => {
                tries += 1;
                eprintln!("decode node not up yet: {e}");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            Err(e) => panic!("decode node: {e}"),
        }
    };
    Decode {
        addr: d.grpc_addr,
        stats: d.stats,
        stop,
        done: d.done,
    }
}

fn member(d: &Decode) -> Member {
    Member::new(Role::Decode, format!("http://{}", d.addr))
}

/// A router over `members`; returns its client and its view of the nodes.
async fn start_router(
    model: &Arc<ModelDir>,
    members: Arc<Members>,
    shutdown: &CancellationToken,
) -> (Client, Arc<NodePool>) {
    let (_, section) = sections();
    let r = tandem_router::serve(model.clone(), None, section, members, shutdown.clone())
        .await
        .expect("router");
    let client = Client::connect(format!("http://{}", r.addr))
        .await
        .expect("connect router");
    (client, r.nodes)
}

/// Waits until `what` holds of the router's view, or fails the test after
/// 20 s (the router's load streams may still be connecting on a loaded
/// machine: a fixed sleep once was too short).
async fn wait_for(what: &str, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while !done() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Waits until the router's view of `nodes` is current: it credits each
/// with exactly the blocks its prefix cache holds (it heard every KV event
/// they published) and sees it idle (a report from after the last turn,
/// which a helper router sent and this one cannot know finished).
async fn wait_until_known(router: &NodePool, nodes: &[&Decode]) {
    wait_for("the router to learn the nodes' caches and load", || {
        nodes.iter().all(|d| {
            let addr = member(d).grpc_addr;
            let idle = router
                .load_of(&addr)
                .is_some_and(|l| l.running == 0 && l.queued == 0);
            idle && router.cached_blocks_of(&addr) == d.cached_blocks() as usize
        })
    })
    .await;
}

fn members_of(nodes: &[&Decode]) -> Arc<Members> {
    Arc::new(Members(watch::Sender::new(
        nodes.iter().map(|d| member(d)).collect(),
    )))
}

/// Sends `p` and returns its answer and cached prompt tokens.
async fn turn(client: &mut Client, p: &[u32]) -> (Vec<u32>, u32) {
    let done = complete(client, greedy_request(p, 4))
        .await
        .expect("request");
    (done.tokens, done.usage.cached_tokens)
}

/// Which of `nodes` served the request `run` sends.
async fn served_by<F: std::future::Future<Output = u32>>(
    nodes: &[&Decode],
    run: F,
) -> (usize, u32) {
    let before: Vec<u64> = nodes.iter().map(|d| d.prompt_tokens()).collect();
    let cached = run.await;
    let grew: Vec<usize> = (0..nodes.len())
        .filter(|&i| nodes[i].prompt_tokens() > before[i])
        .collect();
    assert_eq!(grew.len(), 1, "exactly one node served it: {grew:?}");
    (grew[0], cached)
}

/// Lets every router hear a few load reports (the KV events ride on them):
/// 50 report intervals, so a router whose report streams are still
/// connecting on a loaded machine has them too (300 ms once was not enough
/// while other builds ran).
async fn let_reports_flow() {
    tokio::time::sleep(Duration::from_millis(1000)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn later_turns_follow_their_history_and_a_restarted_node_loses_its_claim() {
    let (_dir, model) = small_model();
    let shutdown = CancellationToken::new();
    let a = start_decode(&model, None).await;
    let b = start_decode(&model, None).await;

    // Helpers that see one node each, and the router under test that sees both.
    let (mut via_a, _) = start_router(&model, members_of(&[&a]), &shutdown).await;
    let (mut via_b, _) = start_router(&model, members_of(&[&b]), &shutdown).await;
    let both = members_of(&[&a, &b]);
    let (mut router, view) = start_router(&model, both.clone(), &shutdown).await;

    // Two conversations' first turns: one on each node, behind the router's back.
    let conv1 = prompt(200, 1);
    let conv2 = prompt(200, 2);
    let (answer1, _) = turn(&mut via_a, &conv1).await;
    let (answer2, _) = turn(&mut via_b, &conv2).await;
    eprintln!("first turns done");
    assert!(a.cached_blocks() > 0 && b.cached_blocks() > 0);
    wait_until_known(&view, &[&a, &b]).await;

    // Their second turns (history + answer + a new message) go where the history is.
    let next = |history: &[u32], answer: &[u32], salt: u32| -> Vec<u32> {
        [history, answer, &prompt(40, salt)].concat()
    };
    let conv1_t2 = next(&conv1, &answer1, 11);
    let conv2_t2 = next(&conv2, &answer2, 12);
    let nodes = [&a, &b];
    for _ in 0..2 {
        let (who, cached) = served_by(&nodes, async { turn(&mut router, &conv1_t2).await.1 }).await;
        assert_eq!(who, 0, "conversation 1 continues on node a");
        assert!(cached >= 192, "its history was reused: {cached} cached");
        let (who, cached) = served_by(&nodes, async { turn(&mut router, &conv2_t2).await.1 }).await;
        assert_eq!(who, 1, "conversation 2 continues on node b");
        assert!(cached >= 192, "its history was reused: {cached} cached");
    }

    // Node a restarts empty at the same address; b learns conversation 1's
    // first turn only. A router that still believed a's old claim (turn 2's
    // longer prefix) would send turn 3 to a; the snapshot on reconnect says
    // a holds nothing, so b (which holds turn 1) wins.
    eprintln!("second turns done");
    a.stop.cancel();
    a.done.await.expect("node a stopped");
    eprintln!("node a stopped");
    let a = start_decode(&model, Some(a.addr)).await;
    let _ = turn(&mut via_b, &conv1).await;
    eprintln!("node a restarted");
    // The router's stream to the old a broke (which marks a failed and
    // drops its claim), and it learnt b's new blocks...
    wait_until_known(&view, &[&a, &b]).await;
    // ...then it redials: a report of the new a (its stream starts with its
    // empty snapshot) makes it usable again.
    let b_addr = NodeAddr::from(member(&b).grpc_addr.as_str());
    wait_for("the router to redial the restarted node", || {
        view.usable(tandem_cluster::Role::Decode, std::slice::from_ref(&b_addr))
    })
    .await;
    let conv1_t3 = next(&conv1_t2, &[], 13);
    let nodes = [&a, &b];
    let (who, cached) = served_by(&nodes, async { turn(&mut router, &conv1_t3).await.1 }).await;
    assert_eq!(
        who, 1,
        "turn 3 goes to b, which holds turn 1; the restarted a lost turn 2"
    );
    assert!(cached >= 192, "{cached} cached");

    // b leaves the cluster (still running, still holding conversation 2):
    // its events are dropped with it and nothing more goes there.
    both.0.send_replace(vec![member(&a)]);
    wait_for("the router to drop the node that left", || {
        view.ranked(tandem_cluster::Role::Decode).len() == 1
    })
    .await;
    let before_b = b.prompt_tokens();
    let conv2_t3 = next(&conv2_t2, &[], 14);
    let (_, cached) = turn(&mut router, &conv2_t3).await;
    assert_eq!(
        b.prompt_tokens(),
        before_b,
        "no request reaches a node that left"
    );
    assert_eq!(cached, 0, "a never held conversation 2");
    shutdown.cancel();
    a.stop.cancel();
    b.stop.cancel();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn round_robin_ignores_the_caches_and_least_loaded_too() {
    // The comparison policies still serve every request, blind to history:
    // with round robin, a conversation's turns alternate between the nodes.
    let (_dir, model) = small_model();
    let shutdown = CancellationToken::new();
    let a = start_decode(&model, None).await;
    let b = start_decode(&model, None).await;
    let (_, mut section) = sections();
    section.routing = tandem_cluster::RoutingPolicy::RoundRobin;
    let r = tandem_router::serve(
        model.clone(),
        None,
        section,
        members_of(&[&a, &b]),
        shutdown.clone(),
    )
    .await
    .expect("router");
    let mut router = Client::connect(format!("http://{}", r.addr))
        .await
        .expect("connect");
    let p = prompt(100, 3);
    let nodes = [&a, &b];
    // Both nodes' first load reports in before the first turn: a node the
    // router has not heard from yet is ranked last, whatever the policy.
    let_reports_flow().await;
    let mut seen = Vec::new();
    for _ in 0..4 {
        let (who, _) = served_by(&nodes, async { turn(&mut router, &p).await.1 }).await;
        seen.push(who);
        let_reports_flow().await;
    }
    assert!(seen.contains(&0) && seen.contains(&1), "{seen:?}");
    assert!(
        seen.windows(2).all(|w| w[0] != w[1]),
        "turns alternate: {seen:?}"
    );
    shutdown.cancel();
    a.stop.cancel();
    b.stop.cancel();
}
