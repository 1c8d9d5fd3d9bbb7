use super::*;
use tandem_engine::GpuPriority;

#[test]
fn empty_config_is_the_defaults() {
    let c = Config::parse("").unwrap();
    assert!(c.router.is_none());
    assert_eq!(c.model.path, PathBuf::from(DEFAULT_MODEL_PATH));
    assert_eq!(RouterSection::default().listen.port(), 50051);
}

#[test]
fn unknown_key_is_named() {
    let err = Config::parse("[decode]\nmax_bach = 3\n")
        .unwrap_err()
        .to_string();
    assert!(err.contains("max_bach"), "{err}");
    let err = Config::parse("[decoder]\n").unwrap_err().to_string();
    assert!(err.contains("decoder"), "{err}");
}

#[test]
fn a_file_s_errors_name_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("decode.toml");
    for (text, says) in [
        ("[decode]\nmax_bach = 3\n", "max_bach"),
        ("[decode]\ntp = 0\n", "decode.tp"),
    ] {
        std::fs::write(&path, text).unwrap();
        let err = Config::from_file(&path).unwrap_err().to_string();
        assert!(err.contains("decode.toml") && err.contains(says), "{err}");
    }
}

#[test]
fn tp_is_per_role_and_defaults_to_one() {
    let c = Config::parse("[prefill]\ntp = 2\n[decode]\n").unwrap();
    assert_eq!((c.prefill.unwrap().tp, c.decode.unwrap().tp), (2, 1));
    let err = Config::parse("[decode]\ntp = 0\n").unwrap_err().to_string();
    assert!(err.contains("decode.tp"), "{err}");
    let err = Config::parse("[model]\ntp = 2\n").unwrap_err().to_string();
    assert!(err.contains("tp"), "unknown in [model]: {err}");
}

#[test]
fn metrics_are_off_unless_configured() {
    assert!(Config::parse("").unwrap().metrics.is_none());
    let c = Config::parse("[metrics]\n").unwrap();
    assert_eq!(c.metrics.unwrap().listen.port(), 9090);
    let c = Config::parse("[metrics]\nlisten = \"0.0.0.0:0\"\n").unwrap();
    assert_eq!(c.metrics.unwrap().listen.port(), 0);
    let err = Config::parse("[metrics]\nlisen = \"x\"\n")
        .unwrap_err()
        .to_string();
    assert!(err.contains("lisen"), "{err}");
}

#[test]
fn decode_batch_must_fit_its_token_budget() {
    let err = Config::parse("[decode]\nmax_batch = 512\nmax_batch_tokens = 256\n")
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("decode.max_batch (512)") && err.contains("decode.max_batch_tokens (256)"),
        "{err}"
    );
    Config::parse("[decode]\nmax_batch = 256\nmax_batch_tokens = 256\n").unwrap();
}

#[test]
fn decode_gpu_priority_is_a_cuda_rank() {
    let c = Config::parse("[decode]\n").unwrap();
    assert_eq!(c.decode.unwrap().gpu_priority, GpuPriority::Normal);
    let c =
        Config::parse("[model]\nbackend = \"cuda\"\n[decode]\ngpu_priority = \"high\"\n").unwrap();
    assert_eq!(c.decode.unwrap().gpu_priority, GpuPriority::High);
    let c =
        Config::parse("[model]\nbackend = \"cuda\"\n[decode]\ngpu_priority = \"auto\"\n").unwrap();
    assert_eq!(c.decode.unwrap().gpu_priority, GpuPriority::Auto);
    // The CPU backend has no ranks: refused, not ignored.
    for p in ["high", "auto"] {
        let err = Config::parse(&format!("[decode]\ngpu_priority = \"{p}\"\n"))
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("decode.gpu_priority") && err.contains("cuda"),
            "{err}"
        );
    }
    let err = Config::parse("[model]\nbackend = \"cuda\"\n[decode]\ngpu_priority = \"urgent\"\n")
        .unwrap_err()
        .to_string();
    assert!(err.contains("urgent") && err.contains("high"), "{err}");
}

#[test]
fn chunk_must_align_with_blocks() {
    let err = Config::parse("[prefill]\nchunk_tokens = 100\n")
        .unwrap_err()
        .to_string();
    assert!(err.contains("chunk_tokens"), "{err}");
    let err = Config::parse("[prefill]\nmax_batch_tokens = 0\n")
        .unwrap_err()
        .to_string();
    assert!(err.contains("prefill.max_batch_tokens"), "{err}");
}

#[test]
fn membership_is_static_unless_etcd_is_set() {
    let c = Config::parse("").unwrap();
    assert!(c.membership.etcd.is_none());
    let c = Config::parse(
        "[membership.etcd]\nendpoints = [\"http://127.0.0.1:2379\"]\ncluster = \"lab\"\n",
    )
    .unwrap();
    let etcd = c.membership.etcd.unwrap();
    assert_eq!((etcd.cluster.as_str(), etcd.lease_ttl_s), ("lab", 5));
    // The inline form reads the same.
    let c = Config::parse(
        "membership = { etcd = { endpoints = [\"http://e:2379\"], lease_ttl_s = 2 } }\n",
    )
    .unwrap();
    assert_eq!(c.membership.etcd.unwrap().lease_ttl_s, 2);
}

#[test]
fn tls_reaches_every_role_and_node_schemes_must_match_it() {
    let tls = "[tls]\nca = \"ca.pem\"\ncert = \"n.pem\"\nkey = \"n-key.pem\"\n";
    let c = Config::parse(&format!(
            "[router]\ndecode_nodes = [\"10.0.0.5:7000\", \"https://d1:7000\"]\n[prefill]\n[decode]\n{tls}"
        ))
        .unwrap();
    assert!(c.router.unwrap().tls.is_some());
    assert!(c.prefill.unwrap().tls.is_some() && c.decode.unwrap().tls.is_some());
    let err = Config::parse(&format!(
        "[router]\nprefill_nodes = [\"http://p:7000\"]\n{tls}"
    ))
    .unwrap_err()
    .to_string();
    assert!(
        err.contains("router.prefill_nodes") && err.contains("https://"),
        "{err}"
    );
    let err = Config::parse("[router]\ndecode_nodes = [\"https://d:7000\"]\n")
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("router.decode_nodes") && err.contains("[tls]"),
        "{err}"
    );
}

#[test]
fn routing_keys_have_defaults_and_are_checked() {
    use crate::routing::RoutingPolicy;
    let r = Config::parse("[router]\n").unwrap().router.unwrap();
    assert_eq!(r.decode_waiting, None, "no bound unless asked");
    let bounded = Config::parse("[router]\ndecode_waiting = 8\n")
        .unwrap()
        .router
        .unwrap();
    assert_eq!(bounded.decode_waiting, Some(8));
    assert!(Config::parse("[router]\ndecode_waiting = -1\n").is_err());
    assert_eq!(r.routing, RoutingPolicy::KvAware);
    assert_eq!(
        (
            r.kv_overlap_weight,
            r.kv_load_weight,
            r.kv_overload_threshold
        ),
        (1.0, 1.0, 0.9)
    );
    let r = Config::parse("[router]\nrouting = \"round_robin\"\nkv_load_weight = 0.5\n")
        .unwrap()
        .router
        .unwrap();
    assert_eq!(
        (r.routing, r.kv_load_weight),
        (RoutingPolicy::RoundRobin, 0.5)
    );
    let err = Config::parse("[router]\nrouting = \"random\"\n")
        .unwrap_err()
        .to_string();
    assert!(err.contains("routing"), "{err}");
    let err = Config::parse("[router]\nkv_overload_threshold = 1.5\n")
        .unwrap_err()
        .to_string();
    assert!(err.contains("router.kv_overload_threshold"), "{err}");
    let err = Config::parse("[router]\nkv_overlap_weight = -1.0\n")
        .unwrap_err()
        .to_string();
    assert!(err.contains("router.kv_overlap_weight"), "{err}");
}

#[test]
fn connection_limits_have_defaults_reach_every_role_and_are_checked() {
    let c = Config::parse("[router]\n[decode]\n").unwrap();
    assert_eq!(c.connections.max_connections, 2048);
    assert_eq!(c.connections.header_timeout_s, 10.0);
    let c = Config::parse(
            "[router]\n[prefill]\n[decode]\n[connections]\nmax_connections = 7\nheader_timeout_s = 1.5\n",
        )
        .unwrap();
    assert_eq!(c.router.unwrap().connections.max_connections, 7);
    assert_eq!(c.prefill.unwrap().connections.header_timeout_s, 1.5);
    assert_eq!(c.decode.unwrap().connections.max_connections, 7);
    for (text, key) in [
        ("[connections]\nmax_connections = 0\n", "max_connections"),
        ("[connections]\nheader_timeout_s = 0\n", "header_timeout_s"),
        (
            "[connections]\nkeepalive_interval_s = -1\n",
            "keepalive_interval_s",
        ),
        (
            "[connections]\nkeepalive_timeout_s = 1e30\n",
            "keepalive_timeout_s",
        ),
        ("[connections]\nmax_conections = 3\n", "max_conections"),
    ] {
        let err = Config::parse(text).unwrap_err().to_string();
        assert!(err.contains(key), "{text}: {err}");
    }
}

#[test]
fn api_keys_get_names_and_bad_ones_are_named() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("keys");
    std::fs::write(&file, "# keys\nsk-plain\nbatch sk-batch\n\n").unwrap();
    let c = Config::parse(&format!(
        "[router]\napi_keys = [\"sk-0\"]\napi_keys_file = {:?}\n\
             [[router.keys]]\nname = \"team-a\"\nkey = \"sk-a\"\ntokens_per_min = 100\n\
             [router.tls]\ncert = \"c.pem\"\nkey = \"k.pem\"\n",
        file.display().to_string()
    ))
    .unwrap();
    let r = c.router.unwrap();
    let names: Vec<_> = r.all_keys().into_iter().map(|k| k.name).collect();
    assert_eq!(names, ["key-1", "key-2", "team-a", "batch"]);
    let tls = r.client_tls.unwrap();
    assert_eq!((tls.cert.to_str(), tls.client_ca), (Some("c.pem"), None));
    assert!(r.tls.is_none(), "[router.tls] is not the cluster's [tls]");
    for (text, needle) in [
        ("[[router.keys]]\nname = \"a b\"\nkey = \"k\"\n", "\"a b\""),
        (
            "[router]\napi_keys = [\"k\"]\n[[router.keys]]\nname = \"x\"\nkey = \"k\"\n",
            "also configured",
        ),
        (
            "[[router.keys]]\nname = \"x\"\nkey = \"k1\"\n[[router.keys]]\nname = \"x\"\nkey = \"k2\"\n",
            "used twice",
        ),
        (
            "[[router.keys]]\nname = \"x\"\nkey = \"k\"\ntokens_per_min = 0\n",
            "tokens_per_min",
        ),
        ("[router.tls]\ncert = \"c\"\n", "key"),
        (
            "[router.tls]\ncert = \"c\"\nkey = \"k\"\nca = \"x\"\n",
            "ca",
        ),
    ] {
        let err = Config::parse(text).unwrap_err().to_string();
        assert!(err.contains(needle), "{text}: {err}");
    }
    std::fs::write(&file, "a b c\n").unwrap();
    let err = Config::parse(&format!(
        "[router]\napi_keys_file = {:?}\n",
        file.display().to_string()
    ))
    .unwrap_err()
    .to_string();
    assert!(err.contains("line 1"), "{err}");
}

#[test]
fn overload_and_breaker_settings_have_defaults_and_are_checked() {
    let r = RouterSection::default();
    assert_eq!((r.kv_timeout_ms, r.kv_timeout_max_ms), (30_000, 120_000));
    assert_eq!(r.max_prefill_backlog_s, 10.0);
    assert_eq!(
        (r.breaker_failures, r.breaker_open_ms, r.breaker_probes),
        (3, 5_000, 1)
    );
    for (text, key) in [
        (
            "[router]
kv_timeout_max_ms = 100
",
            "kv_timeout_max_ms",
        ),
        (
            "[router]
max_prefill_backlog_s = -1
",
            "max_prefill_backlog_s",
        ),
        (
            "[router]
breaker_failures = 0
",
            "breaker_failures",
        ),
        (
            "[router]
breaker_probes = 0
",
            "breaker_probes",
        ),
    ] {
        let err = Config::parse(text).unwrap_err().to_string();
        assert!(err.contains(key), "{text}: {err}");
    }
}

#[test]
fn bad_membership_is_named() {
    for (text, key) in [
        ("[membership.etcd]\nendpoints = []\n", "endpoints"),
        (
            "[membership.etcd]\nendpoints = [\"e\"]\nlease_ttl_s = 0\n",
            "lease_ttl_s",
        ),
        (
            "[membership.etcd]\nendpoints = [\"e\"]\ncluster = \"a/b\"\n",
            "cluster",
        ),
        ("[membership.etcd]\nendpoint = [\"e\"]\n", "endpoint"),
        ("[membership]\ndrain_timeout_s = -1\n", "drain_timeout_s"),
    ] {
        let err = Config::parse(text).unwrap_err().to_string();
        assert!(err.contains(key), "{text}: {err}");
    }
}

#[test]
fn kv_checksum_is_off_unless_asked() {
    let on = Config::parse("[prefill]\nkv_checksum = true\n").unwrap();
    assert!(on.prefill.unwrap().kv_checksum);
    let off = Config::parse("[prefill]\n").unwrap();
    assert!(!off.prefill.unwrap().kv_checksum);
    assert!(Config::parse("[prefill]\nkv_checksum = \"yes\"\n").is_err());
}

#[test]
fn link_cost_keys_parse_and_bad_rates_are_named() {
    let c = Config::parse(
        "[prefill]\nmax_send_rate_mbps = 100\n[decode]\nlink_cost_prefill = false\ndefault_link_rate_mbps = 2500.5\ntpot_budget_ms = 20\n",
    )
    .unwrap();
    assert_eq!(c.prefill.unwrap().max_send_rate_mbps, Some(100.0));
    let d = c.decode.unwrap();
    assert!(!d.link_cost_prefill);
    assert_eq!(d.default_link_rate_mbps, Some(2500.5));
    assert_eq!(d.tpot_budget_ms, 20);
    let d = Config::parse("[decode]\n").unwrap().decode.unwrap();
    assert!(d.link_cost_prefill && d.default_link_rate_mbps.is_none());
    for (text, key) in [
        ("[prefill]\nmax_send_rate_mbps = 0\n", "max_send_rate_mbps"),
        ("[prefill]\nmax_send_rate_mbps = -5\n", "max_send_rate_mbps"),
        (
            "[decode]\ndefault_link_rate_mbps = 0\n",
            "default_link_rate_mbps",
        ),
    ] {
        let err = Config::parse(text).unwrap_err().to_string();
        assert!(err.contains(key), "{text}: {err}");
    }
}
