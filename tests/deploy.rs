//! Static checks of the deployment assets (there is no Docker engine or Kubernetes cluster
//! here; `docker-compose config` and `kubectl kustomize` were run by hand, see the README):
//! the configs they ship are valid Spillway configs, and every metric the Grafana dashboard
//! and the Prometheus alerts query is one that Spillway exports.

use std::collections::HashSet;
use std::path::Path;

fn read(path: &str) -> String {
    let full = Path::new(env!("CARGO_MANIFEST_DIR")).join(path);
    std::fs::read_to_string(&full).unwrap_or_else(|e| panic!("{}: {e}", full.display()))
}

/// `spillway_*` names in `text`.
fn metric_names(text: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut rest = text;
    while let Some(i) = rest.find("spillway_") {
        let tail = &rest[i..];
        let end = tail
            .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
            .unwrap_or(tail.len());
        out.push(tail[..end].to_string());
        rest = &tail[end..];
    }
    out
}

/// Every metric the processor and the ingress define (their names are literals in
/// `src/telemetry/`, the only module that constructs metrics).
fn exported() -> HashSet<String> {
    ["src/telemetry/mod.rs", "src/telemetry/ingress.rs"]
        .map(read)
        .join("\n")
        .split('"')
        .filter(|s| {
            s.starts_with("spillway_") && metric_names(s).first().map(String::as_str) == Some(*s)
        })
        .map(str::to_string)
        .collect()
}

fn family(name: &str) -> &str {
    ["_bucket", "_sum", "_count"]
        .iter()
        .find_map(|s| name.strip_suffix(s))
        .unwrap_or(name)
}

#[test]
fn every_metric_the_dashboard_and_the_alerts_query_is_exported() {
    let exported = exported();
    assert!(
        exported.len() > 30,
        "found the metric definitions: {exported:?}"
    );
    for path in [
        "deploy/grafana/dashboards/spillway.json",
        "deploy/prometheus/alerts.yml",
    ] {
        let names = metric_names(&read(path));
        assert!(!names.is_empty(), "{path} queries metrics");
        for n in names {
            assert!(
                exported.contains(&n) || exported.contains(family(&n)),
                "{path} queries {n}, which Spillway does not export"
            );
        }
    }
}

#[test]
fn the_dashboard_covers_the_six_signals_with_unique_panel_ids() {
    let dash: serde_json::Value =
        serde_json::from_str(&read("deploy/grafana/dashboards/spillway.json")).expect("JSON");
    assert_eq!(dash["uid"], "spillway");
    let panels = dash["panels"].as_array().expect("panels");
    let ids: HashSet<u64> = panels.iter().map(|p| p["id"].as_u64().unwrap()).collect();
    assert_eq!(ids.len(), panels.len(), "panel ids are unique");
    let text = read("deploy/grafana/dashboards/spillway.json");
    for signal in [
        "spillway_consumer_lag",
        "spillway_llm_request_duration_seconds",
        "spillway_events_total",
        "spillway_dlq_records_total",
        "spillway_event_llm_cost_usd",
        "spillway_end_to_end_seconds",
    ] {
        assert!(text.contains(signal), "the dashboard charts {signal}");
    }
    for p in panels.iter().filter(|p| p["type"] != "row") {
        assert_eq!(p["datasource"]["uid"], "prometheus", "{}", p["title"]);
        assert!(
            !p["targets"].as_array().unwrap().is_empty(),
            "{}",
            p["title"]
        );
    }
}

#[test]
fn the_shipped_configs_are_valid_spillway_configs() {
    for path in [
        "deploy/compose/processor.toml",
        "deploy/k8s/config/processor.toml",
        "load-tests/config/spike-processor.toml",
    ] {
        spillway::config::Config::from_toml(&read(path)).unwrap_or_else(|e| panic!("{path}: {e}"));
    }
    for path in [
        "deploy/compose/ingress.toml",
        "deploy/k8s/config/ingress.toml",
        "load-tests/config/spike-ingress.toml",
    ] {
        spillway::ingress::config::IngressConfig::from_toml(&read(path))
            .unwrap_or_else(|e| panic!("{path}: {e}"));
    }
}

#[test]
fn compose_prometheus_and_kubernetes_agree_on_files_and_ports() {
    let compose = read("docker-compose.yml");
    let dockerfile = read("Dockerfile");
    assert!(dockerfile.contains("COPY deploy/compose /etc/spillway"));
    for service in ["processor.toml", "ingress.toml"] {
        assert!(compose.contains(&format!("/etc/spillway/{service}")));
    }
    let prometheus = read("deploy/prometheus/prometheus.yml");
    assert!(read("deploy/compose/processor.toml").contains("metrics_addr = \"0.0.0.0:9464\""));
    assert!(read("deploy/compose/ingress.toml").contains("metrics_addr = \"0.0.0.0:9465\""));
    assert!(prometheus.contains("processor:9464") && prometheus.contains("ingress:9465"));
    assert!(compose.contains("./deploy/prometheus:/etc/prometheus"));
    let kustomization = read("deploy/k8s/kustomization.yaml");
    // Every resource and every generated file it names exists (`key=path` or `path`).
    let mut named = 0;
    for line in kustomization.lines().map(str::trim) {
        let Some(item) = line.strip_prefix("- ") else {
            continue;
        };
        let file = item.rsplit('=').next().unwrap_or(item);
        if file.ends_with(".yaml") || file.ends_with(".toml") {
            named += 1;
            assert!(
                Path::new(env!("CARGO_MANIFEST_DIR"))
                    .join("deploy/k8s")
                    .join(file)
                    .exists(),
                "kustomization names {file}"
            );
        }
    }
    assert_eq!(named, 5, "3 resources and 2 config files");
    let processor = read("deploy/k8s/processor.yaml");
    assert!(processor.contains("path: /healthz") && processor.contains("path: /readyz"));
    // Static membership: a StatefulSet whose pod name is the group instance id.
    assert!(processor.contains("kind: StatefulSet"));
    assert!(processor.contains(
        "- name: SPILLWAY_KAFKA__GROUP_INSTANCE_ID\n              valueFrom: {fieldRef: {fieldPath: metadata.name}}"
    ));
}

/// The compose file creates the journal topic with the settings the processor would create it
/// with for the TTLs of deploy/compose/processor.toml, and gives the stores a volume.
#[test]
fn compose_creates_the_journal_topic_with_the_retention_its_ttls_need() {
    let config = spillway::config::Config::from_toml(&read("deploy/compose/processor.toml"))
        .expect("valid config");
    let journal = config.journal.expect("the compose processor has a journal");
    let compose = read("docker-compose.yml");
    for (key, value) in spillway::kafka::journal_topic_settings(&journal) {
        assert!(
            compose.contains(&format!("--config {key}={value}")),
            "docker-compose.yml creates {} without {key}={value}",
            journal.topic
        );
    }
    assert!(
        compose.contains(&format!("processor-state:{}", journal.state_dir.display())),
        "the state directory {} is a volume",
        journal.state_dir.display()
    );
    let k8s = read("deploy/k8s/processor.yaml");
    assert!(
        k8s.contains("volumeClaimTemplates")
            && k8s.contains(&format!("mountPath: {}", journal.state_dir.display())),
        "the StatefulSet gives the state directory a volume claim"
    );
}

/// The KEDA overlay scales the StatefulSet the base defines, on the group and topic the
/// processor's Kubernetes config consumes, never past the input topic's partitions (as
/// `docker-compose.yml` creates it) nor past what the LLM accounts' `share` allows, keeps idle
/// consumers off, and leaves the replica count to KEDA. (`kubectl kustomize deploy/keda` was
/// run by hand; see the README.)
#[test]
fn the_keda_scaler_targets_the_processors_group_and_never_exceeds_the_partitions() {
    let scaled = read("deploy/keda/scaledobject.yaml");
    let value = |key: &str| -> String {
        let line = (scaled.lines().map(str::trim))
            .find(|l| l.starts_with(&format!("{key}:")))
            .unwrap_or_else(|| panic!("{key} in the ScaledObject"));
        line[key.len() + 1..].trim().trim_matches('"').to_string()
    };
    let config = spillway::config::Config::from_toml(&read("deploy/k8s/config/processor.toml"))
        .expect("valid config");
    assert_eq!(value("consumerGroup"), config.kafka.group_id);
    assert!(config.kafka.topics.contains(&value("topic")));
    assert_eq!(value("kind"), "ScaledObject");
    assert!(scaled.contains(
        "scaleTargetRef:\n    apiVersion: apps/v1\n    kind: StatefulSet\n    name: spillway-processor\n"
    ));
    assert!(read("deploy/k8s/processor.yaml")
        .contains("kind: StatefulSet\nmetadata:\n  name: spillway-processor"));
    let max: f64 = value("maxReplicaCount").parse().unwrap();
    let compose = read("docker-compose.yml");
    let partitions: f64 = compose
        .split("--topic $$t --partitions ")
        .nth(1)
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .expect("the input topics' partitions in docker-compose.yml");
    assert!(max <= partitions, "{max} replicas, {partitions} partitions");
    for (name, account) in &config.llm.providers {
        // 3 x 0.34 = 1.02: the base rounds its share up.
        assert!(
            max * account.share <= 1.05,
            "{name}: {max} x {}",
            account.share
        );
    }
    assert!(max >= value("minReplicaCount").parse().unwrap());
    assert_eq!(value("allowIdleConsumers"), "false");
    let overlay = read("deploy/keda/kustomization.yaml");
    assert!(overlay.contains("- ../k8s") && overlay.contains("- scaledobject.yaml"));
    assert!(overlay.contains("op: remove\n        path: /spec/replicas"));
}
