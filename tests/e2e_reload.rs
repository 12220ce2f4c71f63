//! End-to-end tests of validation and hot reload, in the sidecar topology of `e2e_core`
//! (client pod `sleep` with capture and `veer proxy` as uid 1337; `tcp-echo-v1` / `-v2`):
//! long-lived connections across many reloads, an invalid write rejected with the old config
//! left in force and the next valid write picked up by the file watcher, a Kubernetes
//! ConfigMap volume's `..data` symlink swap, and endpoints removed under an open connection.
//!
//! Config files are replaced atomically (write a dot-file, rename it over the target), as
//! editors and `kubectl` do, and are world-readable: the proxy runs as uid 1337.
//!
//! Needs root, `ip`, `iptables` and `setpriv` (`bash scripts/install-deps.sh`).

mod common;

use std::fs;
use std::os::unix::fs::symlink;
use std::path::Path;
use std::thread;
use std::time::Duration;

use common::*;

fn config_version(pod: &Pod) -> u64 {
    let dump = admin_json(pod, "/config_dump");
    dump["version"]
        .as_u64()
        .unwrap_or_else(|| panic!("/config_dump has no version"))
}

/// Polls `/config_dump` until its version passes `after` (the file watcher reloaded).
fn wait_for_version_after(pod: &Pod, after: u64, timeout: Duration) -> u64 {
    wait_for(
        &format!("the file watcher to load a config newer than version {after}"),
        timeout,
        || {
            let v = config_version(pod);
            (v > after).then_some(v)
        },
    )
}

fn post_reload(pod: &Pod) -> (u16, String) {
    pod.admin_post("/reload").expect("POST /reload")
}

/// A DestinationRule naming the subsets `names[i]` for `version: v<i+1>`, with a
/// ROUND_ROBIN load balancer so the whole-service cluster alternates deterministically.
fn destination_rule(names: [&str; 2]) -> String {
    format!(
        "---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata:
  name: tcp-echo-destination
spec:
  host: tcp-echo
  trafficPolicy:
    loadBalancer:
      simple: ROUND_ROBIN
  subsets:
  - name: {}
    labels: {{version: v1}}
  - name: {}
    labels: {{version: v2}}
",
        names[0], names[1]
    )
}

// ---------------------------------------------------------------------------------------------

/// 100 connections open at once, each sending a line every 100–300 ms and checking every
/// reply, stay up across 20 reloads that change weights, subset names and endpoints. None is
/// reset, each keeps its backend, and `/routes` shows the last config.
#[test]
fn hundred_connections_survive_twenty_reloads() {
    let w = MeshWorld::new("rl-100");
    let dir = w.config_dir(
        "config",
        &tcp_echo_virtual_service("tcp-echo", 9000, &[("v1", 80), ("v2", 20)]),
    );
    let _sidecar = w.start_sidecar(&[&dir], &[]);

    let sessions: Vec<EchoSession> = (0..100)
        .map(|i| {
            let interval = Duration::from_millis(100 + (i as u64 * 37) % 201);
            EchoSession::start(&w.client, tcp_echo_addr(9000), &format!("c{i}"), interval)
                .unwrap_or_else(|e| panic!("connection c{i}: {e}"))
        })
        .collect();
    let prefixes: Vec<String> = sessions.iter().map(|s| s.prefix().to_string()).collect();
    assert_eq!(
        (count_of(&prefixes, "one"), count_of(&prefixes, "two")),
        (80, 20),
        "{prefixes:?}"
    );

    let version_before = config_version(&w.client);
    // (weights, subset names, v2 pod in the endpoints)
    let mut last = None;
    for round in 0..20usize {
        let weights = [(80, 20), (50, 50), (100, 0), (30, 70), (1, 3)][round % 5];
        let names = if round % 3 == 1 {
            ["stable", "canary"]
        } else {
            ["v1", "v2"]
        };
        let with_v2 = round % 4 != 2;
        let vs = tcp_echo_virtual_service(
            "tcp-echo",
            9000,
            &[(names[0], weights.0), (names[1], weights.1)],
        );
        replace_file(&dir.join("destination-rule.yaml"), &destination_rule(names));
        replace_file(&dir.join("endpoints.yaml"), &w.endpoints_yaml(with_v2));
        replace_file(&dir.join("virtual-service.yaml"), &vs);
        let (code, body) = post_reload(&w.client);
        assert_eq!(code, 200, "reload {round}: {body}");
        last = Some((weights, names));
        thread::sleep(Duration::from_millis(200));
        let dead: Vec<&str> = sessions
            .iter()
            .filter(|s| !s.is_alive())
            .map(|s| s.tag.as_str())
            .collect();
        assert!(
            dead.is_empty(),
            "after reload {round}, sessions ended: {dead:?}"
        );
    }
    let (weights, names) = last.expect("reloaded");
    let version_after = config_version(&w.client);
    assert!(
        version_after >= version_before + 20,
        "each of the 20 writes differs from the one before, so each swaps the config: \
         version {version_before} → {version_after}"
    );

    // Every connection still echoes after the last reload.
    let marks: Vec<u64> = sessions.iter().map(EchoSession::echoed).collect();
    thread::sleep(Duration::from_millis(800));
    for (s, mark) in sessions.iter().zip(&marks) {
        assert!(
            s.echoed() > *mark,
            "{} made no progress after the last reload",
            s.tag
        );
    }
    let mut failures = Vec::new();
    for (s, prefix) in sessions.into_iter().zip(&prefixes) {
        match s.finish() {
            Ok(r) if &r.prefix == prefix && r.lines >= 10 => {}
            Ok(r) => failures.push(format!("{r:?}")),
            Err(e) => failures.push(e),
        }
    }
    assert!(failures.is_empty(), "connections failed: {failures:#?}");

    let routes = admin_json(&w.client, "/routes");
    let dests = routes["listeners"][format!("{TCP_ECHO_CLUSTER_IP}:9000")]["rules"][0]
        ["destinations"]
        .as_array()
        .unwrap_or_else(|| panic!("no rule destinations: {routes}"))
        .clone();
    let got: Vec<(String, u64)> = dests
        .iter()
        .map(|d| {
            (
                d["cluster"].as_str().unwrap_or("").to_string(),
                d["weight"].as_u64().unwrap_or(0),
            )
        })
        .collect();
    assert_eq!(got.len(), 2, "{routes}");
    assert!(
        got[0].0.contains(&format!("|{}|", names[0]))
            && got[0].1 == u64::from(weights.0)
            && got[1].0.contains(&format!("|{}|", names[1]))
            && got[1].1 == u64::from(weights.1),
        "/routes shows the last config ({names:?} {weights:?}): {got:?}"
    );
    // And new connections follow it: the last round is 1:3 with both endpoints.
    assert_eq!(weights, (1, 3));
    let got = w.prefixes(9000, 8);
    assert_eq!(
        count_of(&got, "two"),
        6,
        "1:3 split after the reloads: {got:?}"
    );
}

/// An invalid write (`wieght`) is rejected: POST /reload answers 400 naming the file and the
/// field, `/config_dump` shows the error, traffic keeps the old split. The next valid write is
/// picked up by the file watcher alone.
#[test]
fn invalid_write_is_rejected_and_the_next_valid_one_is_watched_in() {
    let w = MeshWorld::new("rl-invalid");
    let dir = w.config_dir(
        "config",
        &tcp_echo_virtual_service("tcp-echo", 9000, &[("v1", 80), ("v2", 20)]),
    );
    let _sidecar = w.start_sidecar(&[&dir], &[]);
    let v0 = config_version(&w.client);
    let got = w.prefixes(9000, 10);
    assert_eq!(count_of(&got, "two"), 2, "{got:?}");

    let vs_file = dir.join("virtual-service.yaml");
    let broken = tcp_echo_virtual_service("tcp-echo", 9000, &[("v1", 50), ("v2", 50)])
        .replace("weight: 50", "wieght: 50");
    replace_file(&vs_file, &broken);
    let (code, body) = post_reload(&w.client);
    assert_eq!(code, 400, "an invalid config must be rejected: {body}");
    let file = vs_file.display().to_string();
    assert!(
        body.contains(&file) && body.contains("wieght"),
        "the rejection names the file and the field: {body}"
    );
    let dump = admin_json(&w.client, "/config_dump");
    let err = dump["last_reload_error"].to_string();
    assert!(
        err.contains(&file) && err.contains("wieght"),
        "/config_dump last_reload_error: {err}"
    );
    assert_eq!(dump["version"].as_u64(), Some(v0), "the old config stays");
    assert_eq!(w.client.admin_get("/ready").expect("GET /ready").0, 200);
    let got = w.prefixes(9000, 20);
    assert_eq!(count_of(&got, "two"), 4, "still 80/20: {got:?}");

    // A valid write, no POST: the watcher must find it.
    replace_file(
        &vs_file,
        &tcp_echo_virtual_service("tcp-echo", 9000, &[("v1", 50), ("v2", 50)]),
    );
    wait_for_version_after(&w.client, v0, Duration::from_secs(5));
    let dump = admin_json(&w.client, "/config_dump");
    assert!(
        dump["last_reload_error"].is_null(),
        "a good reload clears the error: {}",
        dump["last_reload_error"]
    );
    let got = w.prefixes(9000, 10);
    assert_eq!(
        count_of(&got, "two"),
        5,
        "50/50 after the watched reload: {got:?}"
    );
    let (scrape, text) = scrape_prometheus(&w.client, "/metrics");
    let reloads = |result: &str| {
        metric_sum(&scrape, "veer_config_reloads_total", |l| {
            l.get("result") == Some(result)
        })
    };
    assert!(reloads("failure") >= 1.0, "{text}");
    assert!(reloads("success") >= 1.0, "{text}");
}

/// Reverting a rejected edit brings the files back to the config in effect: the reload finds
/// nothing to change (no new version), and the rejection no longer describes the files, so
/// `/config_dump` stops showing it.
#[test]
fn reverting_a_rejected_edit_clears_the_error() {
    let w = MeshWorld::new("rl-revert");
    let good = tcp_echo_virtual_service("tcp-echo", 9000, &[("v1", 80), ("v2", 20)]);
    let dir = w.config_dir("config", &good);
    let _sidecar = w.start_sidecar(&[&dir], &[]);
    let v0 = config_version(&w.client);
    let vs_file = dir.join("virtual-service.yaml");

    replace_file(&vs_file, &good.replace("weight: 80", "wieght: 80"));
    let (code, body) = post_reload(&w.client);
    assert_eq!(code, 400, "an invalid config must be rejected: {body}");
    let dump = admin_json(&w.client, "/config_dump");
    assert!(
        dump["last_reload_error"].to_string().contains("wieght"),
        "the rejection is shown: {}",
        dump["last_reload_error"]
    );

    replace_file(&vs_file, &good);
    let (code, body) = post_reload(&w.client);
    assert_eq!(code, 200, "the reverted files load: {body}");
    let dump = admin_json(&w.client, "/config_dump");
    assert!(
        dump["last_reload_error"].is_null(),
        "the reverted files clear the error: {}",
        dump["last_reload_error"]
    );
    assert_eq!(
        dump["version"].as_u64(),
        Some(v0),
        "the files match the config in effect: no new version"
    );
    let got = w.prefixes(9000, 10);
    assert_eq!(count_of(&got, "two"), 2, "still 80/20: {got:?}");
}

/// A Kubernetes ConfigMap volume: the files are symlinks into `..data/`, itself a symlink to
/// a timestamped directory; an update writes a new directory and renames a `..data_tmp`
/// symlink over `..data`. `--config DIR` sees the swap through the watcher.
#[test]
fn configmap_data_symlink_swap_is_picked_up() {
    let w = MeshWorld::new("rl-configmap");
    let root = w.cluster.config_dir("configmap");
    let write_generation = |name: &str, vs: &str| {
        let gen = root.join(name);
        fs::create_dir(&gen).expect("create generation dir");
        set_world_readable_dir(&gen);
        write_file(&gen.join("endpoints.yaml"), &w.endpoints_yaml(true));
        write_file(
            &gen.join("destination-rule.yaml"),
            TCP_ECHO_DESTINATION_RULE,
        );
        write_file(&gen.join("virtual-service.yaml"), vs);
    };
    let gen1 = "..2024_05_01_10_00_00.000000001";
    write_generation(
        gen1,
        &tcp_echo_virtual_service("tcp-echo", 9000, &[("v1", 100)]),
    );
    symlink(gen1, root.join("..data")).expect("..data symlink");
    for f in [
        "endpoints.yaml",
        "destination-rule.yaml",
        "virtual-service.yaml",
    ] {
        symlink(Path::new("..data").join(f), root.join(f)).expect("file symlink");
    }

    let _sidecar = w.start_sidecar(&[&root], &[]);
    let got = w.prefixes(9000, 5);
    assert_eq!(count_of(&got, "one"), 5, "{got:?}");
    let v0 = config_version(&w.client);

    let gen2 = "..2024_05_01_10_05_00.000000002";
    write_generation(
        gen2,
        &tcp_echo_virtual_service("tcp-echo", 9000, &[("v2", 100)]),
    );
    symlink(gen2, root.join("..data_tmp")).expect("..data_tmp symlink");
    fs::rename(root.join("..data_tmp"), root.join("..data")).expect("swap ..data");
    fs::remove_dir_all(root.join(gen1)).expect("remove the old generation");

    wait_for_version_after(&w.client, v0, Duration::from_secs(5));
    let got = w.prefixes(9000, 5);
    assert_eq!(
        count_of(&got, "two"),
        5,
        "the swapped-in config sends all to v2: {got:?}"
    );
}

fn set_world_readable_dir(dir: &Path) {
    use std::os::unix::fs::PermissionsExt;
    fs::set_permissions(dir, fs::Permissions::from_mode(0o755)).expect("chmod");
}

/// Endpoints removed from config: a connection open to v2 keeps echoing after v2's Pod is
/// gone from the config; new connections go only to v1.
#[test]
fn removed_endpoint_keeps_its_open_connection_new_ones_go_elsewhere() {
    let w = MeshWorld::new("rl-endpoints");
    // No VirtualService: port 9000 goes to the whole service, round-robin over both pods.
    let dir = w.cluster.config_dir("config");
    write_file(&dir.join("endpoints.yaml"), &w.endpoints_yaml(true));
    write_file(
        &dir.join("destination-rule.yaml"),
        &destination_rule(["v1", "v2"]),
    );
    let _sidecar = w.start_sidecar(&[&dir], &[]);

    let mut sessions = Vec::new();
    let on_v2 = loop {
        assert!(sessions.len() < 6, "no connection reached v2 in 6 tries");
        let s = EchoSession::start(
            &w.client,
            tcp_echo_addr(9000),
            &format!("probe{}", sessions.len()),
            Duration::from_millis(100),
        )
        .expect("connection");
        if s.prefix() == "two" {
            break s;
        }
        sessions.push(s);
    };

    replace_file(&dir.join("endpoints.yaml"), &w.endpoints_yaml(false));
    let (code, body) = post_reload(&w.client);
    assert_eq!(code, 200, "POST /reload: {body}");
    let clusters = admin_json(&w.client, "/clusters").to_string();
    assert!(
        !clusters.contains(&w.v2.addr(9000).to_string()),
        "v2's endpoint is gone from /clusters: {clusters}"
    );

    let got = w.prefixes(9000, 10);
    assert_eq!(
        count_of(&got, "one"),
        10,
        "new connections go to v1 only: {got:?}"
    );
    let mark = on_v2.echoed();
    thread::sleep(Duration::from_millis(400));
    assert!(
        on_v2.is_alive() && on_v2.echoed() > mark,
        "the connection to v2 keeps echoing"
    );
    let report = on_v2.finish().expect("the connection to v2 ends cleanly");
    assert_eq!(report.prefix, "two");
    for s in sessions {
        s.finish().expect("the other connections end cleanly");
    }
}

/// With `--watch false` a file change alone does nothing; SIGHUP reloads.
#[test]
fn sighup_reloads_when_the_watcher_is_off() {
    let w = MeshWorld::new("rl-sighup");
    let dir = w.config_dir(
        "config",
        &tcp_echo_virtual_service("tcp-echo", 9000, &[("v1", 100)]),
    );
    let sidecar = w.start_sidecar(&[&dir], &["--watch", "false"]);
    let v0 = config_version(&w.client);
    replace_file(
        &dir.join("virtual-service.yaml"),
        &tcp_echo_virtual_service("tcp-echo", 9000, &[("v2", 100)]),
    );
    thread::sleep(Duration::from_millis(1000));
    assert_eq!(
        config_version(&w.client),
        v0,
        "--watch false: no reload on file change"
    );
    assert_eq!(count_of(&w.prefixes(9000, 3), "one"), 3);

    let mut kill = std::process::Command::new("kill");
    kill.args(["-HUP", &sidecar.proxy.pid().to_string()]);
    must(kill);
    wait_for_version_after(&w.client, v0, Duration::from_secs(5));
    assert_eq!(
        count_of(&w.prefixes(9000, 3), "two"),
        3,
        "SIGHUP loaded the new file"
    );
}
