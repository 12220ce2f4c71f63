//! `veer inject` golden tests: every `tests/inject_golden/NAME.in.yaml` is injected and
//! compared with `NAME.out.yaml` (and the warnings with `NAME.warnings`, when there are any).
//! Names starting with `native-` are injected with `--native-sidecar`. For every case the
//! output must also be a fixed point (injecting it again changes nothing) and must
//! deserialize strictly into the `k8s-openapi` types.
//!
//! Regenerate after an intended change with `VEER_UPDATE_GOLDEN=1 cargo test --test
//! inject_golden` and review the diff (this also rewrites
//! manifests/samples/tcp-echo/injected/).

mod common;

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

use serde::de::DeserializeOwned;
use serde::Serialize;
use veer::inject::{inject_str, Injected, Options};

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn golden_dir() -> PathBuf {
    repo().join("tests/inject_golden")
}

fn updating() -> bool {
    std::env::var_os("VEER_UPDATE_GOLDEN").is_some_and(|v| v != "0")
}

fn options_for(name: &str) -> Options {
    Options {
        native_sidecar: name.starts_with("native-"),
        ..Options::default()
    }
}

fn inject_file(path: &Path, opts: &Options) -> Injected {
    let text = fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let name = path
        .strip_prefix(repo())
        .unwrap_or(path)
        .display()
        .to_string();
    inject_str(&text, &name, opts).unwrap_or_else(|e| panic!("inject {name}: {e}"))
}

/// Compares `actual` with the file at `path`, or writes it there when updating.
fn check_golden(path: &Path, actual: &str) {
    if updating() {
        fs::write(path, actual).unwrap();
        return;
    }
    let expected = fs::read_to_string(path).unwrap_or_else(|e| {
        panic!(
            "{}: {e} (run with VEER_UPDATE_GOLDEN=1 to create it)",
            path.display()
        )
    });
    if expected != actual {
        let diff_at = expected
            .lines()
            .zip(actual.lines())
            .position(|(a, b)| a != b)
            .unwrap_or(expected.lines().count().min(actual.lines().count()));
        panic!(
            "{} is out of date (first difference at line {}); rerun with VEER_UPDATE_GOLDEN=1 \
             and review the diff.\n--- actual output ---\n{actual}",
            path.display(),
            diff_at + 1
        );
    }
}

fn cases() -> Vec<(String, PathBuf)> {
    let mut cases: Vec<(String, PathBuf)> = fs::read_dir(golden_dir())
        .unwrap()
        .filter_map(|e| {
            let path = e.unwrap().path();
            let name = path
                .file_name()?
                .to_str()?
                .strip_suffix(".in.yaml")?
                .to_string();
            Some((name, path))
        })
        .collect();
    cases.sort();
    assert!(cases.len() >= 10, "golden cases missing: {cases:?}");
    cases
}

#[test]
fn golden_outputs() {
    for (name, input) in cases() {
        let result = inject_file(&input, &options_for(&name));
        check_golden(
            &golden_dir().join(format!("{name}.out.yaml")),
            &result.output,
        );
        let warnings_path = golden_dir().join(format!("{name}.warnings"));
        let warnings: String = result.warnings.iter().map(|w| format!("{w}\n")).collect();
        if warnings.is_empty() && !updating() {
            assert!(
                !warnings_path.exists(),
                "{name}: no warnings now, but {} exists",
                warnings_path.display()
            );
        } else if warnings.is_empty() {
            let _ = fs::remove_file(&warnings_path);
        } else {
            check_golden(&warnings_path, &warnings);
        }
    }
}

#[test]
fn every_workload_kind_is_injected() {
    for (name, kind) in [
        ("pod", "Pod"),
        ("deployment", "Deployment"),
        ("replicaset", "ReplicaSet"),
        ("statefulset", "StatefulSet"),
        ("daemonset", "DaemonSet"),
        ("job", "Job"),
        ("cronjob", "CronJob"),
        ("replicationcontroller", "ReplicationController"),
    ] {
        let r = inject_file(
            &golden_dir().join(format!("{name}.in.yaml")),
            &options_for(name),
        );
        assert_eq!(r.injected.len(), 1, "{name}: {:?}", r.injected);
        assert!(r.injected[0].contains(kind), "{name}: {:?}", r.injected);
        assert!(r.output.contains("name: veer-proxy"), "{name}");
        assert!(r.output.contains("name: veer-init"), "{name}");
    }
}

#[test]
fn multi_document_input_keeps_order_and_untouched_bytes() {
    let input = fs::read_to_string(golden_dir().join("multi.in.yaml")).unwrap();
    let r = inject_file(&golden_dir().join("multi.in.yaml"), &Options::default());
    assert_eq!(r.injected, ["document 5 (Deployment default/web)"]);
    // Every document but the fifth comes out exactly as it went in, in the same place.
    let docs_in: Vec<&str> = input.split("\n---\n").collect();
    let docs_out: Vec<&str> = r.output.split("\n---\n").collect();
    assert_eq!(docs_in.len(), docs_out.len());
    for (i, (a, b)) in docs_in.iter().zip(&docs_out).enumerate() {
        if i == 4 {
            assert_ne!(a, b);
            assert!(b.starts_with("# Injected.\n"), "leading comment kept: {b}");
        } else {
            assert_eq!(a, b, "document {} changed", i + 1);
        }
    }
    assert!(r
        .warnings
        .iter()
        .any(|w| w.contains("document 4") && w.contains("hostNetwork")));
    assert!(r
        .warnings
        .iter()
        .any(|w| w.contains("document 6") && w.contains("already injected")));
}

#[test]
fn injection_is_idempotent() {
    for (name, input) in cases() {
        let opts = options_for(&name);
        let once = inject_file(&input, &opts);
        let twice = inject_str(&once.output, &name, &opts).unwrap();
        assert_eq!(
            twice.output, once.output,
            "{name}: second injection changed it"
        );
        assert_eq!(twice.injected, once.injected, "{name}");
    }
}

#[test]
fn reinjecting_with_other_options_replaces_the_sidecar() {
    let classic = inject_file(&golden_dir().join("job.in.yaml"), &Options::default());
    let native = inject_file(&golden_dir().join("job.in.yaml"), &options_for("native-"));
    let converted = inject_str(&classic.output, "job", &options_for("native-")).unwrap();
    assert_eq!(converted.output, native.output);
}

#[test]
fn invalid_yaml_is_an_error_with_the_document_index() {
    let text =
        "apiVersion: v1\nkind: ConfigMap\n---\napiVersion: v1\nkind: Pod\nmetadata: {name: [\n";
    let e = inject_str(text, "bad.yaml", &Options::default()).unwrap_err();
    let msg = e.to_string();
    // The position is in the whole input (the unclosed `[` runs to the end, line 7).
    assert!(
        msg.starts_with("bad.yaml: document 2 (line 7, column 1): invalid YAML"),
        "{msg}"
    );
    let text = "apiVersion: v1\nkind: Pod\nmetadata: {name: p}\nspec:\n  containers: 3\n";
    let msg = inject_str(text, "bad.yaml", &Options::default())
        .unwrap_err()
        .to_string();
    assert_eq!(
        msg,
        "bad.yaml: document 1 (Pod default/p): `spec.containers` is not a list"
    );
}

// ---------------------------------------------------------------------------------------------
// Strict round trip through k8s-openapi

/// Deserializes `value` as `T`, failing on any field `T` does not know, then checks that
/// serializing it back gives the same JSON (nothing dropped, nothing reshaped).
fn strict<T: DeserializeOwned + Serialize>(value: &serde_json::Value, what: &str) {
    let mut unknown = Vec::new();
    let typed: T = serde_ignored::deserialize(value.clone(), |path| unknown.push(path.to_string()))
        .unwrap_or_else(|e| panic!("{what}: does not deserialize: {e}"));
    assert!(unknown.is_empty(), "{what}: unknown fields {unknown:?}");
    let mut back = serde_json::to_value(&typed).unwrap();
    drop_added_type_meta(&mut back, value);
    assert_eq!(&back, value, "{what}: round trip changed the object");
}

/// k8s-openapi writes `apiVersion`/`kind` on every resource it serializes, also nested ones
/// (a StatefulSet's volumeClaimTemplates); those are not a difference of the input's.
fn drop_added_type_meta(back: &mut serde_json::Value, orig: &serde_json::Value) {
    match (back, orig) {
        (serde_json::Value::Object(b), serde_json::Value::Object(o)) => {
            for key in ["apiVersion", "kind"] {
                if !o.contains_key(key) {
                    b.remove(key);
                }
            }
            for (k, v) in b.iter_mut() {
                if let Some(ov) = o.get(k) {
                    drop_added_type_meta(v, ov);
                }
            }
        }
        (serde_json::Value::Array(b), serde_json::Value::Array(o)) => {
            for (bv, ov) in b.iter_mut().zip(o) {
                drop_added_type_meta(bv, ov);
            }
        }
        _ => {}
    }
}

fn check_object(value: &serde_json::Value, what: &str) {
    use k8s_openapi::api::{apps::v1 as apps, batch::v1 as batch, core::v1 as core};
    let kind = value["kind"].as_str().unwrap_or_default();
    let what = format!("{what} ({kind})");
    match kind {
        "Pod" => strict::<core::Pod>(value, &what),
        "ReplicationController" => strict::<core::ReplicationController>(value, &what),
        "Service" => strict::<core::Service>(value, &what),
        "ConfigMap" => strict::<core::ConfigMap>(value, &what),
        "Deployment" => strict::<apps::Deployment>(value, &what),
        "ReplicaSet" => strict::<apps::ReplicaSet>(value, &what),
        "StatefulSet" => strict::<apps::StatefulSet>(value, &what),
        "DaemonSet" => strict::<apps::DaemonSet>(value, &what),
        "Job" => strict::<batch::Job>(value, &what),
        "CronJob" => strict::<batch::CronJob>(value, &what),
        "List" => {
            for (i, item) in value["items"].as_array().unwrap().iter().enumerate() {
                check_object(item, &format!("{what} items[{i}]"));
            }
        }
        other => panic!("{what}: no k8s-openapi type mapped for kind {other:?}"),
    }
}

fn check_stream(text: &str, what: &str) -> usize {
    let mut n = 0;
    for (i, doc) in serde_yaml::Deserializer::from_str(text).enumerate() {
        let value = serde_json::Value::deserialize(doc).unwrap();
        if value.is_null() {
            continue;
        }
        check_object(&value, &format!("{what} document {}", i + 1));
        n += 1;
    }
    n
}

use serde::Deserialize;

#[test]
fn output_deserializes_strictly_into_k8s_openapi_types() {
    for (name, input) in cases() {
        let r = inject_file(&input, &options_for(&name));
        assert!(check_stream(&r.output, &name) > 0, "{name}: no documents");
    }
    let sample = repo().join("manifests/samples/tcp-echo/injected/tcp-echo-services.yaml");
    check_stream(&fs::read_to_string(sample).unwrap(), "tcp-echo injected");
}

#[test]
fn strict_check_catches_unknown_fields() {
    let pod = serde_json::json!({
        "apiVersion": "v1", "kind": "Pod", "metadata": {"name": "p"},
        "spec": {"containers": [{"name": "a", "image": "a", "readinesProbe": {}}]}
    });
    let r = std::panic::catch_unwind(|| check_object(&pod, "typo"));
    assert!(r.is_err(), "a misspelt field must fail the strict check");
}

// ---------------------------------------------------------------------------------------------
// The sample manifests

#[test]
fn tcp_echo_injected_sample_is_current() {
    let dir = repo().join("manifests/samples/tcp-echo");
    let r = inject_file(&dir.join("tcp-echo-services.yaml"), &Options::default());
    assert_eq!(r.injected.len(), 2, "{:?}", r.injected);
    check_golden(&dir.join("injected/tcp-echo-services.yaml"), &r.output);
}

#[test]
fn sidecar_config_map_carries_the_samples_verbatim() {
    // manifests/veer/sidecar-config.yaml shows the ConfigMap layout with the tcp-echo routing
    // files as its data: they must stay identical to the sample files.
    let text = fs::read_to_string(repo().join("manifests/veer/sidecar-config.yaml")).unwrap();
    let cm: serde_yaml::Value = serde_yaml::from_str(&text).unwrap();
    let data = cm["data"].as_mapping().expect("data");
    let samples = repo().join("manifests/samples/tcp-echo");
    for (key, file) in [
        ("destination-rule-all.yaml", "destination-rule-all.yaml"),
        ("tcp-echo-vs.yaml", "tcp-echo-all-v1.yaml"),
    ] {
        let expected = fs::read_to_string(samples.join(file)).unwrap();
        assert_eq!(
            data[key].as_str(),
            Some(expected.as_str()),
            "data key {key}"
        );
    }
    check_object(&serde_json::to_value(&cm).unwrap(), "sidecar-config.yaml");
}

// ---------------------------------------------------------------------------------------------
// The injected init container's arguments, run for real by `veer-init --dry-run`

fn init_args(output: &str) -> Vec<String> {
    for doc in serde_yaml::Deserializer::from_str(output) {
        let value = serde_yaml::Value::deserialize(doc).unwrap();
        let mut stack = vec![value];
        while let Some(v) = stack.pop() {
            if let Some(inits) = v.get("initContainers").and_then(|x| x.as_sequence()) {
                for c in inits {
                    if c["name"].as_str() == Some("veer-init") {
                        return c["args"]
                            .as_sequence()
                            .unwrap()
                            .iter()
                            .map(|a| a.as_str().unwrap().to_string())
                            .collect();
                    }
                }
            }
            match v {
                serde_yaml::Value::Mapping(m) => stack.extend(m.into_iter().map(|(_, v)| v)),
                serde_yaml::Value::Sequence(s) => stack.extend(s),
                _ => {}
            }
        }
    }
    panic!("no veer-init container in the output");
}

/// The IPv4 `iptables-restore` input `veer-init --dry-run` prints for `args`.
fn dry_run_v4(args: &[String]) -> Vec<String> {
    let out = Command::new(common::veer_init_bin())
        .arg("--dry-run")
        .args(args)
        .output()
        .expect("run veer-init");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "veer-init --dry-run {args:?} failed: {}{}",
        stdout,
        String::from_utf8_lossy(&out.stderr)
    );
    stdout
        .lines()
        .skip_while(|l| !l.starts_with("# IPv4"))
        .skip(1)
        .take_while(|l| !l.starts_with("# IPv6"))
        .filter(|l| l.starts_with("-A "))
        .map(str::to_string)
        .collect()
}

#[test]
fn default_init_args_install_istios_default_rules() {
    let r = inject_file(&golden_dir().join("pod.in.yaml"), &Options::default());
    let args = init_args(&r.output);
    assert_eq!(
        args,
        common::INJECTED_INIT_FLAGS
            .iter()
            .map(|s| s.to_string())
            .collect::<Vec<_>>()
    );
    let rules = dry_run_v4(&args);
    for rule in [
        "-A VEER_INBOUND -p tcp --dport 15090 -j RETURN",
        "-A VEER_INBOUND -p tcp --dport 15021 -j RETURN",
        "-A VEER_INBOUND -p tcp --dport 15020 -j RETURN",
        "-A VEER_INBOUND -p tcp -j VEER_IN_REDIRECT",
        "-A VEER_REDIRECT -p tcp -j REDIRECT --to-ports 15001",
        "-A VEER_IN_REDIRECT -p tcp -j REDIRECT --to-ports 15006",
        "-A VEER_OUTPUT -m owner --uid-owner 1337 -j RETURN",
        "-A VEER_OUTPUT -m owner --gid-owner 1337 -j RETURN",
        "-A VEER_OUTPUT -j VEER_REDIRECT",
    ] {
        assert!(
            rules.iter().any(|r| r == rule),
            "missing {rule:?} in {rules:#?}"
        );
    }
}

#[test]
fn annotations_change_the_installed_rules() {
    let r = inject_file(
        &golden_dir().join("annotations.in.yaml"),
        &Options::default(),
    );
    let args = init_args(&r.output);
    assert_eq!(
        args.join(" "),
        "-p 15001 -z 15006 -u 1337 -m REDIRECT -i 10.96.0.0/12,10.244.0.0/16 -x 10.96.0.1/32 \
         -b 8080,8443 -d 15090,15021,15020,8443 -q 5432 -o 6379,11211"
    );
    let rules = dry_run_v4(&args);
    let has = |rule: &str| rules.iter().any(|r| r == rule);
    // includeInboundPorts: only 8080 and 8443 are captured, not every port.
    assert!(
        !has("-A VEER_INBOUND -p tcp -j VEER_IN_REDIRECT"),
        "{rules:#?}"
    );
    assert!(
        rules
            .iter()
            .any(|r| r.starts_with("-A VEER_INBOUND") && r.contains("8080")),
        "{rules:#?}"
    );
    // includeOutboundIPRanges: only the two CIDRs are redirected, not everything.
    assert!(!has("-A VEER_OUTPUT -j VEER_REDIRECT"), "{rules:#?}");
    for cidr in ["10.96.0.0/12", "10.244.0.0/16"] {
        assert!(
            rules
                .iter()
                .any(|r| r.contains(&format!("-d {cidr}")) && r.ends_with("-j VEER_REDIRECT")),
            "no redirect for {cidr}: {rules:#?}"
        );
    }
    // excludeOutboundIPRanges and excludeOutboundPorts return before any redirect.
    assert!(
        rules
            .iter()
            .any(|r| r.contains("-d 10.96.0.1/32") && r.ends_with("-j RETURN")),
        "{rules:#?}"
    );
    for port in ["6379", "11211"] {
        assert!(
            rules
                .iter()
                .any(|r| r.contains(&format!("--dport {port}")) && r.ends_with("-j RETURN")),
            "excluded outbound port {port}: {rules:#?}"
        );
    }
    // includeOutboundPorts: 5432 is redirected whatever its destination.
    assert!(
        rules
            .iter()
            .any(|r| r.contains("--dport 5432") && r.ends_with("-j VEER_REDIRECT")),
        "{rules:#?}"
    );
}
