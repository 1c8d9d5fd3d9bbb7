use super::*;
use tandem_cluster::StaticMembership;
use tandem_proto::v1::NodeLoad;

/// Breakers that stay closed, for tests of ranking alone (the load
/// streams to these dead addresses fail over and over).
fn never_open() -> BreakerConfig {
    BreakerConfig {
        failures: u32::MAX,
        ..Default::default()
    }
}

/// A pool over static `prefill` and `decode` addresses whose breakers never
/// open, with default routing.
fn ranking_pool(prefill: &[&str], decode: &[&str], shutdown: &CancellationToken) -> Arc<NodePool> {
    routing_pool(prefill, decode, RoutingConfig::default(), shutdown)
}

/// As [`ranking_pool`], with `routing`.
fn routing_pool(
    prefill: &[&str],
    decode: &[&str],
    routing: RoutingConfig,
    shutdown: &CancellationToken,
) -> Arc<NodePool> {
    let owned = |a: &[&str]| a.iter().map(|s| s.to_string()).collect::<Vec<String>>();
    let membership = StaticMembership::new(&owned(prefill), &owned(decode));
    NodePool::start_with(
        Arc::new(membership),
        10,
        None,
        Identity::new(None),
        never_open(),
        routing,
        shutdown.clone(),
    )
}

#[tokio::test]
async fn a_dead_node_opens_its_breaker_and_leaves_the_choice() {
    let shutdown = CancellationToken::new();
    // Nothing listens at the prefill address.
    let membership = StaticMembership::new(&["127.0.0.1:1".into()], &["127.0.0.1:2".into()]);
    let breakers = BreakerConfig {
        failures: 2,
        open: Duration::from_secs(60),
        probes: 1,
    };
    let pool = NodePool::start_with(
        Arc::new(membership),
        10,
        None,
        Identity::new(None),
        breakers,
        RoutingConfig::default(),
        shutdown.clone(),
    );
    let p = "http://127.0.0.1:1";
    for _ in 0..200 {
        if pool.ranked(Role::Prefill).is_empty() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(
        pool.ranked(Role::Prefill).is_empty(),
        "the failing load stream opened it"
    );
    assert!(!pool.usable(Role::Prefill, &[]));
    assert_eq!(pool.prefill_backlog().nodes, 0);
    let states = pool.breaker_states();
    assert!(
        states.contains(&(NodeAddr::from(p), Role::Prefill, BreakerState::Open)),
        "{states:?}"
    );
    shutdown.cancel();
}

#[tokio::test]
async fn members_join_and_leave() {
    let shutdown = CancellationToken::new();
    let members =
        tokio::sync::watch::Sender::new(vec![Member::new(Role::Decode, "http://127.0.0.1:1")]);
    struct Source(tokio::sync::watch::Sender<Vec<Member>>);
    impl Membership for Source {
        fn watch(&self) -> tokio::sync::watch::Receiver<Vec<Member>> {
            self.0.subscribe()
        }
    }
    let pool = NodePool::start(
        Arc::new(Source(members.clone())),
        10,
        None,
        RoutingConfig::default(),
        shutdown.clone(),
    );
    assert!(pool.has(Role::Decode));
    assert!(!pool.has(Role::Prefill));

    members.send_replace(vec![Member::new(Role::Prefill, "http://127.0.0.1:2")]);
    for _ in 0..100 {
        if pool.has(Role::Prefill) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    assert!(pool.has(Role::Prefill));
    assert!(!pool.has(Role::Decode));
    assert_eq!(pool.ranked(Role::Prefill).len(), 1);
    shutdown.cancel();
}

#[tokio::test]
async fn nodes_of_another_model_are_never_ranked_and_unidentified_ones_rank_last() {
    let ours = tandem_cluster::ModelFingerprint {
        config: 1,
        tokenizer: 2,
        chat_template: 3,
        weights: 4,
    };
    let theirs = tandem_cluster::ModelFingerprint { weights: 5, ..ours };
    let shutdown = CancellationToken::new();
    let membership = StaticMembership::new(
        &["127.0.0.1:4".into()],
        &[
            "127.0.0.1:1".into(),
            "127.0.0.1:2".into(),
            "127.0.0.1:3".into(),
        ],
    );
    let pool = NodePool::start_with(
        Arc::new(membership),
        10,
        None,
        Identity::new(Some(ours)),
        BreakerConfig::default(),
        RoutingConfig::default(),
        shutdown.clone(),
    );
    let (a, b, c, p) = (
        "http://127.0.0.1:1",
        "http://127.0.0.1:2",
        "http://127.0.0.1:3",
        "http://127.0.0.1:4",
    );
    let report = |fingerprint: Option<&tandem_cluster::ModelFingerprint>, free: u32| NodeLoad {
        role: tandem_proto::v1::Role::Decode.into(),
        kv_blocks_free: free,
        model_fingerprint: fingerprint.map(|f| f.to_string()).unwrap_or_default(),
        ..Default::default()
    };
    // a has said nothing (static membership, no report yet), though it
    // has the most room; b serves the cluster's model; c another one.
    pool.on_report(a, report(None, 100));
    pool.on_report(b, report(Some(&ours), 10));
    pool.on_report(c, report(Some(&theirs), 1000));
    let ranked: Vec<String> = pool
        .ranked(Role::Decode)
        .into_iter()
        .map(|n| n.addr.to_string())
        .collect();
    assert_eq!(ranked, vec![b.to_string(), a.to_string()]);
    // The only prefill node serves another model: there is none.
    pool.on_report(
        p,
        NodeLoad {
            role: tandem_proto::v1::Role::Prefill.into(),
            ..report(Some(&theirs), 0)
        },
    );
    assert!(!pool.has(Role::Prefill));
    assert!(pool.ranked(Role::Prefill).is_empty());
    // c restarted with the right weights: back in the ranking.
    pool.on_report(c, report(Some(&ours), 1000));
    assert_eq!(&*pool.ranked(Role::Decode)[0].addr, c);
    shutdown.cancel();
}

#[tokio::test]
async fn unreachable_nodes_rank_last_and_assignments_count() {
    let shutdown = CancellationToken::new();
    let pool = ranking_pool(&[], &["127.0.0.1:1", "127.0.0.1:2"], &shutdown);
    let a = "http://127.0.0.1:1";
    let b = "http://127.0.0.1:2";
    // Nothing listens on these ports: the load tasks mark both unreachable.
    tokio::time::sleep(Duration::from_millis(100)).await;
    pool.set_status(b, |s| {
        s.reachable = true;
        s.load = Some(NodeLoad {
            role: tandem_proto::v1::Role::Decode.into(),
            kv_blocks_total: 10,
            kv_blocks_free: 10,
            ..Default::default()
        });
    });
    let ranked: Vec<String> = pool
        .ranked(Role::Decode)
        .into_iter()
        .map(|n| n.addr.to_string())
        .collect();
    assert_eq!(ranked, vec![b.to_string(), a.to_string()]);

    let assigned = pool.assign(b, 33);
    let load = pool.load_of(b).unwrap();
    assert_eq!((load.queued, load.kv_blocks_free), (1, 7));
    // Done with it: it stops counting before the node's next report.
    drop(assigned);
    let load = pool.load_of(b).unwrap();
    assert_eq!((load.queued, load.kv_blocks_free), (0, 10));
    shutdown.cancel();
}

#[tokio::test]
async fn a_node_that_served_a_request_is_reachable_before_its_next_report() {
    let shutdown = CancellationToken::new();
    let pool = ranking_pool(&["127.0.0.1:1"], &[], &shutdown);
    let p = "http://127.0.0.1:1";
    // Nothing listens: the load task's failures mark it unreachable. (Its
    // task is then stopped, so that no later failure races the asserts.)
    tokio::time::sleep(Duration::from_millis(100)).await;
    pool.lock()[p].stop.cancel();
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert!(!pool.usable(Role::Prefill, &[]));
    // A request it served says otherwise (as when its load stream failed
    // while it started, and a request reached it after it listened).
    pool.record_success(p);
    assert!(pool.usable(Role::Prefill, &[]));
    // A later failure marks it unreachable again.
    pool.mark_failed(p);
    assert!(!pool.usable(Role::Prefill, &[]));
    shutdown.cancel();
}

#[tokio::test]
async fn assignments_count_blocks_of_the_nodes_block_size() {
    let shutdown = CancellationToken::new();
    let pool = ranking_pool(&[], &["127.0.0.1:1"], &shutdown);
    let a = "http://127.0.0.1:1";
    tokio::time::sleep(Duration::from_millis(100)).await;
    pool.set_status(a, |s| {
        s.load = Some(NodeLoad {
            role: tandem_proto::v1::Role::Decode.into(),
            kv_blocks_total: 10,
            kv_blocks_free: 10,
            block_size: 32,
            ..Default::default()
        });
    });
    // 33 tokens are two blocks of 32 (three of the old fixed 16).
    let _first = pool.assign(a, 33);
    assert_eq!(pool.load_of(a).unwrap().kv_blocks_free, 8);
    let _second = pool.assign(a, 64);
    assert_eq!(pool.load_of(a).unwrap().kv_blocks_free, 6);
    shutdown.cancel();
}

#[tokio::test]
async fn a_stale_prefill_report_does_not_outlive_the_requests_it_counted() {
    let shutdown = CancellationToken::new();
    let pool = ranking_pool(&["127.0.0.1:1"], &[], &shutdown);
    let p = "http://127.0.0.1:1";
    tokio::time::sleep(Duration::from_millis(100)).await;
    let report = |queued: u64| NodeLoad {
        role: tandem_proto::v1::Role::Prefill.into(),
        kv_blocks_total: 512,
        kv_blocks_free: 512,
        queued_prefill_tokens: queued,
        ..Default::default()
    };
    pool.set_status(p, |s| s.load = Some(report(0)));
    let first = pool.assign(p, 200);
    let second = pool.assign(p, 200);
    assert_eq!(pool.prefill_queue(p).map(|q| q.0), Some(400));
    // The last report before the queue drained: one prompt half done.
    pool.set_status(p, |s| s.load = Some(report(300)));
    assert_eq!(pool.prefill_queue(p).map(|q| q.0), Some(300));
    drop(first);
    assert_eq!(pool.prefill_queue(p).map(|q| q.0), Some(200));
    drop(second);
    // Both answered, no report since: nothing is queued there.
    assert_eq!(pool.prefill_queue(p).map(|q| q.0), Some(0));
    shutdown.cancel();
}

/// An idle decode node's report: 100 free blocks, `max_batch`.
fn decode_load(max_batch: u32) -> NodeLoad {
    NodeLoad {
        role: tandem_proto::v1::Role::Decode.into(),
        kv_blocks_total: 100,
        kv_blocks_free: 100,
        max_batch,
        ..Default::default()
    }
}

#[tokio::test]
async fn a_decode_node_takes_max_batch_plus_decode_waiting_and_wakes_a_waiter_per_end() {
    let shutdown = CancellationToken::new();
    let routing = RoutingConfig {
        decode_waiting: Some(1),
        ..RoutingConfig::default()
    };
    let pool = routing_pool(&[], &["127.0.0.1:1"], routing, &shutdown);
    let a = "http://127.0.0.1:1";
    tokio::time::sleep(Duration::from_millis(100)).await;
    let unknown: Vec<_> = (0..5).map(|_| pool.assign_with_room(a, 4)).collect();
    assert!(
        unknown.iter().all(|r| matches!(r, Ok(Some(_)))),
        "no report yet: no max_batch known, no limit"
    );
    drop(unknown);
    pool.set_status(a, |s| s.load = Some(decode_load(2)));
    // max_batch 2 + 1 waiting: the fourth request finds no room.
    let held: Vec<_> = (0..3)
        .map(|_| {
            pool.assign_with_room(a, 4)
                .expect("room")
                .expect("in the pool")
        })
        .collect();
    assert_eq!(pool.assign_with_room(a, 4).err(), Some(NoRoom));
    let place = pool.decode_queue().join();
    drop(held);
    tokio::time::timeout(Duration::from_secs(1), place.woken())
        .await
        .expect("a request ending wakes the waiting one");
    assert!(pool.assign_with_room(a, 4).is_ok());
    shutdown.cancel();
}

#[tokio::test]
async fn a_refused_assignment_does_not_wake_the_waiting_head() {
    let shutdown = CancellationToken::new();
    let pool = ranking_pool(&[], &["127.0.0.1:1"], &shutdown);
    let a = "http://127.0.0.1:1";
    tokio::time::sleep(Duration::from_millis(100)).await;
    let place = pool.decode_queue().join();
    let refused = pool
        .assign_with_room(a, 4)
        .expect("room")
        .expect("in the pool");
    refused.refused();
    assert!(
        tokio::time::timeout(Duration::from_millis(50), place.woken())
            .await
            .is_err(),
        "a refusal freed nothing at the node"
    );
    let ended = pool
        .assign_with_room(a, 4)
        .expect("room")
        .expect("in the pool");
    drop(ended);
    tokio::time::timeout(Duration::from_secs(1), place.woken())
        .await
        .expect("a request ending at the node wakes the head");
    shutdown.cancel();
}

#[tokio::test]
async fn without_decode_waiting_a_decode_node_always_has_room() {
    let shutdown = CancellationToken::new();
    let pool = ranking_pool(&[], &["127.0.0.1:1"], &shutdown);
    let a = "http://127.0.0.1:1";
    tokio::time::sleep(Duration::from_millis(100)).await;
    pool.set_status(a, |s| s.load = Some(decode_load(1)));
    let held: Vec<_> = (0..5).map(|_| pool.assign_with_room(a, 4)).collect();
    assert!(held.iter().all(|r| matches!(r, Ok(Some(_)))));
    shutdown.cancel();
}

#[test]
fn an_unreachable_node_is_warned_of_once_a_minute() {
    let t0 = Instant::now();
    // Still backing off: the first attempts of an outage stay at debug.
    assert!(!unreachable_warning_due(BACKOFF_MIN, None, t0));
    assert!(!unreachable_warning_due(BACKOFF_MAX / 2, None, t0));
    // At the longest backoff: a warning, then none for a minute.
    assert!(unreachable_warning_due(BACKOFF_MAX, None, t0));
    let later = |s| t0 + Duration::from_secs(s);
    assert!(!unreachable_warning_due(BACKOFF_MAX, Some(t0), later(2)));
    assert!(!unreachable_warning_due(BACKOFF_MAX, Some(t0), later(59)));
    assert!(unreachable_warning_due(BACKOFF_MAX, Some(t0), later(60)));
}
