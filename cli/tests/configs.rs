//! Every file under `cluster-configs/` is usable: each TOML parses with the
//! real config parser (unknown keys are errors), each Kubernetes manifest is
//! valid YAML, the TOML inside each ConfigMap parses too, the ports that
//! probes, containers, Services and Prometheus annotations name are the ports
//! the configs listen on, and the Grafana dashboard charts only metrics the
//! code exports (and every one of them).

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use serde::Deserialize;
use serde_json::Value;
use tandem_cluster::Config;

fn configs_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../cluster-configs")
}

fn files(dir: &Path, ext: &str, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            files(&path, ext, out);
        } else if path.extension().is_some_and(|e| e == ext) {
            out.push(path);
        }
    }
    out.sort();
}

#[test]
fn every_toml_config_parses() {
    let mut tomls = Vec::new();
    files(&configs_dir(), "toml", &mut tomls);
    assert!(tomls.len() >= 13, "found only {tomls:?}");
    for path in &tomls {
        let config = Config::from_file(path).unwrap_or_else(|e| panic!("{e}"));
        assert!(
            config.router.is_some() || config.prefill.is_some() || config.decode.is_some(),
            "{} runs no role",
            path.display()
        );
    }
}

/// All documents of all manifests.
fn manifests() -> Vec<(PathBuf, Value)> {
    let mut yamls = Vec::new();
    files(&configs_dir().join("k8s"), "yaml", &mut yamls);
    assert!(!yamls.is_empty());
    let mut docs = Vec::new();
    for path in yamls {
        let text = std::fs::read_to_string(&path).unwrap();
        for doc in serde_norway::Deserializer::from_str(&text) {
            let value = Value::deserialize(doc)
                .unwrap_or_else(|e| panic!("{}: not valid YAML: {e}", path.display()));
            if !value.is_null() {
                assert!(
                    value["apiVersion"].is_string() && value["kind"].is_string(),
                    "{}: a document without apiVersion/kind",
                    path.display()
                );
                docs.push((path.clone(), value));
            }
        }
    }
    docs
}

fn kind<'a>(docs: &'a [(PathBuf, Value)], kind: &str) -> Vec<&'a Value> {
    docs.iter()
        .filter(|(_, d)| d["kind"] == kind)
        .map(|(_, d)| d)
        .collect()
}

fn name(doc: &Value) -> &str {
    doc["metadata"]["name"].as_str().unwrap()
}

/// The ports a role's config listens on, by what they are for.
fn config_ports(config: &Config, role: &str) -> BTreeMap<&'static str, u16> {
    let mut ports = BTreeMap::new();
    match role {
        "router" => {
            let r = config.router.as_ref().expect("a [router] section");
            ports.insert("grpc", r.listen.port());
            if let Some(http) = r.http_listen {
                ports.insert("http", http.port());
            }
        }
        "prefill" => {
            ports.insert(
                "grpc",
                config.prefill.as_ref().expect("[prefill]").listen.port(),
            );
        }
        "decode" => {
            let d = config.decode.as_ref().expect("[decode]");
            ports.insert("grpc", d.listen.port());
            ports.insert("kv", d.quic_listen.port());
        }
        other => panic!("unknown role {other}"),
    }
    if let Some(m) = &config.metrics {
        ports.insert("metrics", m.listen.port());
    }
    ports
}

/// A container port given by number or by name.
fn resolve(port: &Value, container: &Value) -> u16 {
    if let Some(n) = port.as_u64() {
        return n as u16;
    }
    let wanted = port.as_str().expect("a port number or name");
    container["ports"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|p| p["name"] == wanted)
        .and_then(|p| p["containerPort"].as_u64())
        .unwrap_or_else(|| panic!("no container port named {wanted}")) as u16
}

#[test]
fn manifests_parse_and_agree_with_their_configs() {
    let docs = manifests();
    let config_maps: BTreeMap<&str, &Value> = kind(&docs, "ConfigMap")
        .into_iter()
        .map(|c| (name(c), c))
        .collect();
    // Every TOML in every ConfigMap parses with the real parser.
    for (cm, doc) in &config_maps {
        for (key, text) in doc["data"].as_object().unwrap() {
            if key.ends_with(".toml") {
                Config::parse(text.as_str().unwrap())
                    .unwrap_or_else(|e| panic!("ConfigMap {cm}, {key}: {e}"));
            }
        }
    }

    let etcd = kind(&docs, "StatefulSet")
        .into_iter()
        .find(|s| name(s) == "etcd")
        .expect("an etcd StatefulSet");
    let etcd_replicas = etcd["spec"]["replicas"].as_u64().unwrap();
    let etcd_client_port = resolve(
        &Value::from("client"),
        &etcd["spec"]["template"]["spec"]["containers"][0],
    );

    let deployments = kind(&docs, "Deployment");
    let mut roles_seen = BTreeSet::new();
    for deployment in &deployments {
        let pod = &deployment["spec"]["template"]["spec"];
        let container = &pod["containers"][0];
        let args: Vec<&str> = container["args"]
            .as_array()
            .unwrap()
            .iter()
            .map(|a| a.as_str().unwrap())
            .collect();
        let role = args[0];
        roles_seen.insert(role.to_string());
        // --config names a file of the ConfigMap mounted at its directory.
        let config_path = Path::new(args[args.iter().position(|a| *a == "--config").unwrap() + 1]);
        let mount = container["volumeMounts"]
            .as_array()
            .unwrap()
            .iter()
            .find(|m| Path::new(m["mountPath"].as_str().unwrap()) == config_path.parent().unwrap())
            .unwrap_or_else(|| {
                panic!(
                    "{}: nothing mounted at the config's directory",
                    name(deployment)
                )
            });
        let volume = pod["volumes"]
            .as_array()
            .unwrap()
            .iter()
            .find(|v| v["name"] == mount["name"])
            .unwrap();
        let cm = config_maps[volume["configMap"]["name"].as_str().unwrap()];
        let key = config_path.file_name().unwrap().to_str().unwrap();
        let config = Config::parse(cm["data"][key].as_str().unwrap()).unwrap();
        let wanted = config_ports(&config, role);

        // Container ports are exactly the config's, under the same names.
        let declared: BTreeMap<String, u16> = container["ports"]
            .as_array()
            .unwrap()
            .iter()
            .map(|p| {
                (
                    p["name"].as_str().unwrap().to_string(),
                    p["containerPort"].as_u64().unwrap() as u16,
                )
            })
            .collect();
        let wanted_named: BTreeMap<String, u16> =
            wanted.iter().map(|(k, v)| (k.to_string(), *v)).collect();
        assert_eq!(
            declared,
            wanted_named,
            "{}: container ports",
            name(deployment)
        );

        // Probes: gRPC health on the gRPC port, HTTP /health on the router's HTTP port.
        for probe in ["readinessProbe", "livenessProbe"] {
            let p = &container[probe];
            assert!(p.is_object(), "{}: no {probe}", name(deployment));
            if p["grpc"].is_object() {
                assert_eq!(
                    resolve(&p["grpc"]["port"], container),
                    wanted["grpc"],
                    "{}: {probe}",
                    name(deployment)
                );
            } else {
                assert_eq!(
                    p["httpGet"]["path"],
                    "/health",
                    "{}: {probe}",
                    name(deployment)
                );
                assert_eq!(
                    resolve(&p["httpGet"]["port"], container),
                    wanted["http"],
                    "{}: {probe}",
                    name(deployment)
                );
            }
        }

        // Prometheus scrapes the port the config serves /metrics on.
        let annotations = &deployment["spec"]["template"]["metadata"]["annotations"];
        assert_eq!(
            annotations["prometheus.io/scrape"],
            "true",
            "{}",
            name(deployment)
        );
        assert_eq!(
            annotations["prometheus.io/port"]
                .as_str()
                .map(str::parse::<u16>),
            Some(Ok(wanted["metrics"])),
            "{}: prometheus.io/port",
            name(deployment)
        );
        assert_eq!(annotations["prometheus.io/path"], "/metrics");

        // Nodes listening on every interface tell others their pod IP; GPU nodes ask for a GPU.
        if role != "router" {
            assert!(
                args.contains(&"--advertise-ip") && args.contains(&"--id"),
                "{}: {args:?}",
                name(deployment)
            );
            assert_eq!(
                container["resources"]["limits"]["nvidia.com/gpu"],
                1,
                "{}",
                name(deployment)
            );
        }

        // etcd endpoints name the StatefulSet's members on its client port.
        let endpoints = &config
            .membership
            .etcd
            .as_ref()
            .expect("etcd membership")
            .endpoints;
        for e in endpoints {
            let host_port = e.strip_prefix("http://").unwrap();
            let (host, port) = host_port.split_once(':').unwrap();
            assert_eq!(port.parse::<u16>().unwrap(), etcd_client_port, "{e}");
            let ordinal: u64 = host
                .strip_prefix("etcd-")
                .and_then(|h| h.strip_suffix(".etcd"))
                .and_then(|n| n.parse().ok())
                .unwrap_or_else(|| panic!("{e} is not an etcd pod"));
            assert!(ordinal < etcd_replicas, "{e}");
        }

        // Services in front of this Deployment point at its ports.
        let app = &deployment["spec"]["selector"]["matchLabels"]["app"];
        let services: Vec<&Value> = kind(&docs, "Service")
            .into_iter()
            .filter(|s| &s["spec"]["selector"]["app"] == app)
            .collect();
        assert!(!services.is_empty(), "{}: no Service", name(deployment));
        for s in services {
            for port in s["spec"]["ports"].as_array().unwrap() {
                let target = resolve(&port["targetPort"], container);
                assert!(
                    wanted.values().any(|p| *p == target),
                    "Service {}: port {port}",
                    name(s)
                );
                assert_eq!(
                    port["port"].as_u64().unwrap() as u16,
                    target,
                    "Service {}",
                    name(s)
                );
            }
        }
    }
    assert_eq!(
        roles_seen,
        ["decode", "prefill", "router"]
            .map(String::from)
            .into_iter()
            .collect()
    );
}

/// Every panel of a dashboard, rows' nested panels included.
fn panels(dashboard: &Value) -> Vec<&Value> {
    let mut out = Vec::new();
    let mut stack: Vec<&Value> = dashboard["panels"].as_array().unwrap().iter().collect();
    while let Some(p) = stack.pop() {
        if let Some(nested) = p["panels"].as_array() {
            stack.extend(nested);
        }
        if p["type"] != "row" {
            out.push(p);
        }
    }
    out
}

/// The `tandem_*` series names a PromQL expression reads.
fn series_in(expr: &str) -> Vec<&str> {
    let mut out = Vec::new();
    let mut rest = expr;
    while let Some(i) = rest.find("tandem_") {
        let tail = &rest[i..];
        let end = tail
            .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
            .unwrap_or(tail.len());
        out.push(&tail[..end]);
        rest = &tail[end..];
    }
    out
}

#[test]
fn the_grafana_dashboard_charts_exported_metrics() {
    use tandem_telemetry::names::{ALL, HISTOGRAMS};
    let path = configs_dir().join("grafana/tandem.json");
    let text = std::fs::read_to_string(&path).unwrap();
    let dashboard: Value = serde_json::from_str(&text).expect("the dashboard is JSON");
    assert!(dashboard["title"].is_string() && dashboard["uid"].is_string());
    let panels = panels(&dashboard);
    assert!(panels.len() >= 8, "only {} panels", panels.len());
    let mut used = BTreeSet::new();
    for panel in &panels {
        let title = panel["title"].as_str().expect("every panel has a title");
        let targets = panel["targets"]
            .as_array()
            .unwrap_or_else(|| panic!("{title}: no targets"));
        assert!(!targets.is_empty(), "{title}: no queries");
        for target in targets {
            let expr = target["expr"]
                .as_str()
                .unwrap_or_else(|| panic!("{title}: a target without expr"));
            let series = series_in(expr);
            assert!(!series.is_empty(), "{title}: {expr} reads no tandem metric");
            for s in series {
                let metric = if ALL.contains(&s) {
                    s
                } else {
                    ["_bucket", "_sum", "_count"]
                        .iter()
                        .find_map(|suffix| s.strip_suffix(suffix))
                        .filter(|base| HISTOGRAMS.contains(base))
                        .unwrap_or_else(|| panic!("{title}: {s} is not a metric Tandem exports"))
                };
                if expr.contains("histogram_quantile") {
                    assert!(
                        s.ends_with("_bucket"),
                        "{title}: histogram_quantile over {s}"
                    );
                }
                used.insert(metric);
            }
        }
    }
    let unused: Vec<&str> = ALL.iter().copied().filter(|m| !used.contains(m)).collect();
    assert!(unused.is_empty(), "no panel charts {unused:?}");
}
