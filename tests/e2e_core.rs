//! End-to-end tests of the core path: capture → veer proxy → route → weighted subset → echo.
//!
//! Every test builds its own [`Cluster`] of network-namespace pods (see `tests/common/mod.rs`):
//! a client pod `sleep` with `veer-init` (injected default flags) and `veer proxy` running as
//! uid 1337, and two workload pods `tcp-echo-v1` / `tcp-echo-v2` running `veer echo 9000,9001
//! one|two`, as in Istio's TCP traffic-shifting task. The Service ClusterIP exists nowhere: only
//! capture makes it reachable, so every reply from it proves the whole path.
//!
//! Needs root, `ip`, `iptables` and `setpriv` (`bash scripts/install-deps.sh`).

mod common;

use std::fs;
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::thread;
use std::time::Duration;

use common::*;

/// The seed's world: client pod + two tcp-echo versions, echo servers running.
/// Field order matters: processes are dropped (killed) before the cluster is torn down.
struct EchoWorld {
    _echo_v1: Proc,
    _echo_v2: Proc,
    client: Pod,
    v1: Pod,
    v2: Pod,
    cluster: Cluster,
}

fn echo_world(tag: &str) -> EchoWorld {
    let mut cluster = Cluster::new(tag);
    let client = cluster.add_pod("sleep");
    let v1 = cluster.add_pod("tcp-echo-v1");
    let v2 = cluster.add_pod("tcp-echo-v2");
    let echo_v1 = v1.spawn(veer_bin(), &["echo", "9000,9001", "one"]);
    let echo_v2 = v2.spawn(veer_bin(), &["echo", "9000,9001", "two"]);
    for (pod, port) in [(&v1, 9000), (&v1, 9001), (&v2, 9000), (&v2, 9001)] {
        pod.wait_listening(pod.addr(port), Duration::from_secs(10));
    }
    EchoWorld {
        _echo_v1: echo_v1,
        _echo_v2: echo_v2,
        client,
        v1,
        v2,
        cluster,
    }
}

/// What the API server would know: the Service's ClusterIP and the Pods' IPs and labels.
fn endpoints_yaml(w: &EchoWorld) -> String {
    let pods = tcp_echo_pods_yaml(&[(&w.v1, "v1"), (&w.v2, "v2")]);
    format!("{}{pods}", tcp_echo_service_yaml())
}

/// A mesh VirtualService for `tcp-echo` routing port 9000 to weighted subsets.
fn virtual_service(name: &str, routes: &[(&str, u32)]) -> String {
    tcp_echo_virtual_service(name, 9000, routes)
}

impl EchoWorld {
    /// Writes a config directory: endpoints, the DestinationRule and `virtual_service`.
    fn config(&self, virtual_service: &str) -> PathBuf {
        let dir = self.cluster.config_dir("config");
        write_file(&dir.join("endpoints.yaml"), &endpoints_yaml(self));
        write_file(
            &dir.join("destination-rule.yaml"),
            TCP_ECHO_DESTINATION_RULE,
        );
        write_file(&dir.join("virtual-service.yaml"), virtual_service);
        dir
    }

    /// Installs capture in the client pod and starts its sidecar.
    fn sidecar(&self, configs: &[&Path], extra: &[&str]) -> Sidecar {
        install_capture(&self.client);
        let mut args = vec!["--pod-labels", "app=sleep"];
        args.extend_from_slice(extra);
        Sidecar::start(&self.client, configs, &args)
    }

    /// Makes `n` sequential connections to tcp-echo:9000 from the client pod and returns the
    /// prefix each was answered with, checking each reply is exactly `<prefix> <line>\n`.
    fn prefixes(&self, n: usize) -> Vec<String> {
        (0..n)
            .map(|i| {
                let line = format!("hello {i}");
                let reply = self
                    .client
                    .exchange(tcp_echo_addr(9000), &[&line])
                    .unwrap_or_else(|e| panic!("connection {i} to tcp-echo:9000 failed: {e}"));
                let (prefix, rest) = reply
                    .split_once(' ')
                    .unwrap_or_else(|| panic!("connection {i}: unexpected reply {reply:?}"));
                assert!(
                    (prefix == "one" || prefix == "two") && rest == format!("{line}\n"),
                    "connection {i}: unexpected reply {reply:?}"
                );
                prefix.to_string()
            })
            .collect()
    }
}

fn count(prefixes: &[String], want: &str) -> usize {
    prefixes.iter().filter(|p| *p == want).count()
}

/// A connection the proxy refused: either the connect/read failed (reset) or it was closed
/// without a byte of reply.
fn assert_refused(result: std::io::Result<String>, what: &str) {
    if let Ok(reply) = result {
        assert!(
            reply.is_empty(),
            "{what}: expected refusal, got reply {reply:?}"
        );
    }
}

// ---------------------------------------------------------------------------------------------

#[test]
fn harness_pods_are_isolated_and_cleaned_up() {
    let names;
    {
        let mut c = Cluster::new("harness");
        let a = c.add_pod("a");
        let b = c.add_pod("b");
        names = c.namespaces();
        let listener = b.listen(b.addr(7000)).expect("listen in pod b");
        let _stream = a.connect(b.addr(7000)).expect("pod a reaches pod b");
        let (_, peer) = listener.accept().expect("accept");
        assert_eq!(peer.ip(), IpAddr::V4(a.ip), "no NAT between pods");
        let err = a.connect(b.addr(9)).expect_err("nothing listens on b:9");
        assert_eq!(err.kind(), std::io::ErrorKind::ConnectionRefused, "{err}");
        // Without capture a ClusterIP leads nowhere, and fails fast inside the node.
        let err = a
            .connect(tcp_echo_addr(9000))
            .expect_err("ClusterIP is not routable");
        assert!(
            matches!(err.raw_os_error(), Some(113 | 101)),
            "expected EHOSTUNREACH/ENETUNREACH, got {err}"
        );
        let _sleeper = a.spawn("sleep", &["300"]);
    }
    let list = must({
        let mut c = std::process::Command::new("ip");
        c.args(["netns", "list"]);
        c
    });
    let list = String::from_utf8_lossy(&list.stdout);
    for n in names {
        assert!(
            !list
                .lines()
                .any(|l| l.split_whitespace().next() == Some(&n)),
            "{n} leaked"
        );
    }
}

/// Seed step 1: all traffic to v1. A port without a rule (9001) goes to the whole service.
#[test]
fn all_traffic_to_v1() {
    let w = echo_world("allv1");
    let config = w.config(&virtual_service("tcp-echo", &[("v1", 100)]));
    let _sidecar = w.sidecar(&[&config], &[]);
    let got = w.prefixes(10);
    assert_eq!(
        count(&got, "one"),
        10,
        "all ten connections to v1, got {got:?}"
    );
    for i in 0..4 {
        let reply = w
            .client
            .exchange(tcp_echo_addr(9001), &["other"])
            .expect("tcp-echo:9001");
        assert!(
            reply == "one other\n" || reply == "two other\n",
            "tcp-echo:9001 connection {i}: {reply:?}"
        );
    }
}

/// Seed step 2: 80/20, exact in every window of 10 consecutive connections.
#[test]
fn split_80_20_is_exact_in_every_window_of_10() {
    let w = echo_world("split8020");
    let config = w.config(&virtual_service("tcp-echo", &[("v1", 80), ("v2", 20)]));
    let _sidecar = w.sidecar(&[&config], &[]);
    let got = w.prefixes(100);
    assert_eq!(
        (count(&got, "one"), count(&got, "two")),
        (80, 20),
        "sequence: {got:?}"
    );
    for (i, window) in got.chunks(10).enumerate() {
        assert_eq!(
            count(window, "two"),
            2,
            "connections {}-{} carried {window:?}",
            i * 10 + 1,
            i * 10 + 10
        );
    }
}

/// Weights are relative: 3 and 1 is 75/25.
#[test]
fn weights_need_not_sum_to_100() {
    let w = echo_world("weights31");
    let config = w.config(&virtual_service("tcp-echo", &[("v1", 3), ("v2", 1)]));
    let _sidecar = w.sidecar(&[&config], &[]);
    let got = w.prefixes(100);
    assert_eq!(
        (count(&got, "one"), count(&got, "two")),
        (75, 25),
        "sequence: {got:?}"
    );
    for window in got.chunks(4) {
        assert_eq!(
            count(window, "two"),
            1,
            "every 4 connections carry one to v2: {got:?}"
        );
    }
}

/// A destination no Service owns is passed through to the original destination (ALLOW_ANY).
#[test]
fn unknown_destination_passes_through_with_allow_any() {
    let w = echo_world("allowany");
    let config = w.config(&virtual_service("tcp-echo", &[("v1", 100)]));
    let _sidecar = w.sidecar(&[&config], &[]);
    // v2's pod IP on 9001: an endpoint address, but no Service or ServiceEntry owns it.
    let reply = w
        .client
        .exchange(w.v2.addr(9001), &["direct"])
        .expect("pass-through to v2:9001");
    assert_eq!(reply, "two direct\n");
    let reply = w
        .client
        .exchange(w.v1.addr(9000), &["direct"])
        .expect("pass-through to v1:9000");
    assert_eq!(reply, "one direct\n");
    // Istio's labels for pass-through: no service, named after the cluster; both addresses
    // share one label set (one per external address would grow without bound).
    let (scrape, text) = scrape_prometheus(&w.client, "/stats/prometheus");
    let passthrough = |l: &prometheus_parse::Labels| {
        l.get("destination_service") == Some("unknown")
            && l.get("destination_service_name") == Some("PassthroughCluster")
    };
    assert_eq!(
        metric_sum(&scrape, "istio_tcp_connections_opened_total", passthrough),
        2.0,
        "{text}"
    );
    for addr in [w.v2.addr(9001), w.v1.addr(9000)] {
        assert!(
            !text.contains(&addr.to_string()),
            "{addr} is no label:\n{text}"
        );
    }
}

/// REGISTRY_ONLY: the same pass-through connection is refused; known services still work.
#[test]
fn unknown_destination_refused_with_registry_only() {
    let w = echo_world("regonly");
    let config = w.config(&virtual_service("tcp-echo", &[("v1", 100)]));
    let _sidecar = w.sidecar(&[&config], &["--outbound-traffic-policy", "registry-only"]);
    assert_refused(
        w.client.exchange(w.v2.addr(9001), &["direct"]),
        "v2 pod IP:9001",
    );
    assert_eq!(
        w.prefixes(3),
        ["one", "one", "one"],
        "tcp-echo:9000 still routed"
    );
}

/// Inbound: a connection from another pod to an app bound only to the pod IP is redirected to
/// the proxy's inbound listener (:15006), which forwards it to the app from 127.0.0.6. With the
/// proxy gone, the same connection fails: it really went through the proxy.
#[test]
fn inbound_is_captured_and_forwarded_by_the_proxy() {
    let w = echo_world("inbound");
    let ip = w.client.ip.to_string();
    let _app = w
        .client
        .spawn(veer_bin(), &["echo", "--bind", &ip, "9100", "local"]);
    w.client
        .wait_listening(w.client.addr(9100), Duration::from_secs(10));
    let config = w.config(&virtual_service("tcp-echo", &[("v1", 100)]));
    let mut sidecar = w.sidecar(&[&config], &[]);

    for i in 0..3 {
        let line = format!("inbound {i}");
        let reply =
            w.v1.exchange(w.client.addr(9100), &[&line])
                .expect("inbound via proxy");
        assert_eq!(reply, format!("local {line}\n"));
    }

    // An app that reports its peer: the forwarder connects from 127.0.0.6, not from v1's IP.
    let listener = w
        .client
        .listen(w.client.addr(9200))
        .expect("listen on pod IP:9200");
    let peer_app = thread::spawn(move || -> std::io::Result<SocketAddr> {
        use std::io::{BufRead, BufReader, Write};
        listener.set_nonblocking(true)?;
        let deadline = std::time::Instant::now() + IO_TIMEOUT;
        let (stream, peer) = loop {
            match listener.accept() {
                Ok(conn) => break conn,
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                    if std::time::Instant::now() >= deadline {
                        return Err(e);
                    }
                    thread::sleep(Duration::from_millis(10));
                }
                Err(e) => return Err(e),
            }
        };
        stream.set_nonblocking(false)?;
        stream.set_read_timeout(Some(IO_TIMEOUT))?;
        let mut line = String::new();
        BufReader::new(&stream).read_line(&mut line)?;
        (&stream).write_all(format!("peer {}\n", peer.ip()).as_bytes())?;
        Ok(peer)
    });
    let reply =
        w.v1.exchange(w.client.addr(9200), &["who"])
            .expect("inbound to 9200");
    let peer = peer_app.join().expect("peer app thread").expect("peer app");
    assert_eq!(
        reply, "peer 127.0.0.6\n",
        "the app sees the inbound forwarder, peer {peer}"
    );

    sidecar.proxy.kill();
    assert_refused(
        w.v1.exchange(w.client.addr(9100), &["no proxy"]),
        "inbound without proxy",
    );
}

/// Traffic of uid 1337 (the proxy's own) is not captured: with REGISTRY_ONLY a 1337 client
/// reaches v1's pod IP directly while the same connection from root is refused by the proxy.
#[test]
fn proxy_uid_traffic_is_not_captured() {
    let w = echo_world("uid1337");
    let config = w.config(&virtual_service("tcp-echo", &[("v1", 100)]));
    let _sidecar = w.sidecar(&[&config], &["--outbound-traffic-policy", "registry-only"]);
    let target = w.v1.addr(9000).to_string();
    let out = w.client.output_as(
        PROXY_UID,
        PROXY_UID,
        veer_bin(),
        &[
            "client",
            &target,
            "--message",
            "as-1337",
            "--timeout-ms",
            "5000",
        ],
    );
    assert!(
        out.status.success(),
        "veer client as uid 1337 failed ({}): {}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(String::from_utf8_lossy(&out.stdout), "one as-1337\n");
    assert_refused(
        w.client.exchange(w.v1.addr(9000), &["as-root"]),
        "root to v1 pod IP",
    );
}

/// veer-init is idempotent, and `--cleanup-only` restores the nat table.
#[test]
fn init_twice_then_cleanup_restores_nat_table() {
    let mut cluster = Cluster::new("init");
    let pod = cluster.add_pod("app");
    let before = nat_rules(&pod);
    install_capture(&pod);
    let first = nat_rules(&pod);
    assert!(
        first.contains("--to-ports 15001") && first.contains("--to-ports 15006"),
        "capture rules not visible in iptables-save:\n{first}"
    );
    assert!(
        first.contains("--uid-owner 1337"),
        "proxy uid exemption missing:\n{first}"
    );
    install_capture(&pod);
    let second = nat_rules(&pod);
    assert_eq!(
        first, second,
        "re-running veer-init with the same flags must be a no-op"
    );

    let cleanup = |label: &str| {
        let out = pod.output(veer_init_bin(), &["--cleanup-only"]);
        assert!(
            out.status.success(),
            "veer-init --cleanup-only ({label}) failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    };
    cleanup("first");
    assert_eq!(
        nat_rules(&pod),
        before,
        "cleanup must restore the nat table"
    );
    cleanup("nothing to remove");
    assert_eq!(nat_rules(&pod), before);
}

/// Half-close: the client sends 2000 lines and shuts down its write side; the reply to every
/// line still arrives before the proxy closes the connection.
#[test]
fn half_close_delivers_the_full_reply() {
    let w = echo_world("halfclose");
    let config = w.config(&virtual_service("tcp-echo", &[("v1", 100)]));
    let _sidecar = w.sidecar(&[&config], &[]);
    let lines: Vec<String> = (0..2000)
        .map(|i| format!("line {i:04} {}", "x".repeat(40)))
        .collect();
    let refs: Vec<&str> = lines.iter().map(String::as_str).collect();
    let reply = w
        .client
        .exchange(tcp_echo_addr(9000), &refs)
        .expect("exchange");
    let got: Vec<&str> = reply.lines().collect();
    assert_eq!(
        got.len(),
        lines.len(),
        "reply lines ({} bytes received)",
        reply.len()
    );
    for (i, (g, l)) in got.iter().zip(&lines).enumerate() {
        assert_eq!(*g, format!("one {l}"), "reply line {i}");
    }
    assert!(reply.ends_with('\n'));
}

/// With busy polling (one worker spinning on its epoll between events) the proxy relays as
/// without: the exact 80/20 split, a half-closed exchange answered in full, and the time
/// it spun in `/stats`. A multi-worker runtime with busy polling is refused at start.
#[test]
fn busy_polling_relays_as_without_and_counts_its_spin() {
    let w = echo_world("busypoll");
    let config = w.config(&virtual_service("tcp-echo", &[("v1", 80), ("v2", 20)]));
    let config_arg = config.display().to_string();
    let mut refused = w.client.spawn_as(
        PROXY_UID,
        PROXY_UID,
        veer_bin(),
        &[
            "proxy",
            "--config",
            &config_arg,
            "--busy-poll",
            "50us",
            "--concurrency",
            "2",
        ],
    );
    let status = refused
        .wait_timeout(Duration::from_secs(10))
        .expect("veer proxy must exit");
    let err = refused.stderr();
    assert!(!status.success(), "{status}: {err}");
    assert!(err.contains("busy polling needs a single worker"), "{err}");

    let _sidecar = w.sidecar(&[&config], &["--busy-poll", "50us"]);
    let got: Vec<String> = (0..10)
        .map(|i| {
            let line = format!("busy {i}");
            let reply = w
                .client
                .exchange(tcp_echo_addr(9000), &[&line])
                .expect("exchange");
            reply.split_whitespace().next().unwrap_or("").to_string()
        })
        .collect();
    assert_eq!((count(&got, "one"), count(&got, "two")), (8, 2), "{got:?}");
    let lines: Vec<String> = (0..500).map(|i| format!("line {i:03}")).collect();
    let refs: Vec<&str> = lines.iter().map(String::as_str).collect();
    let reply = w
        .client
        .exchange(tcp_echo_addr(9000), &refs)
        .expect("exchange");
    assert_eq!(reply.lines().count(), lines.len(), "every line answered");
    let stats = admin_json(&w.client, "/stats?format=json");
    let spun = stats["busy_poll_seconds"].as_f64().unwrap_or(0.0);
    assert!(spun > 0.0, "busy_poll_seconds counts the spin: {stats}");
}

/// A typo in a VirtualService is rejected at start with exit code 2 and a precise message.
#[test]
fn invalid_config_is_rejected_with_exit_2() {
    let mut cluster = Cluster::new("invalid");
    let pod = cluster.add_pod("sleep");
    let dir = cluster.config_dir("config");
    let file = dir.join("broken.yaml");
    let mut yaml = String::from(TCP_ECHO_DESTINATION_RULE);
    yaml.push_str("---\n");
    yaml.push_str(
        "apiVersion: v1
kind: Service
metadata: {name: tcp-echo}
spec:
  clusterIP: 10.96.0.100
  ports: [{name: tcp, port: 9000}]
  selector: {app: tcp-echo}
",
    );
    yaml.push_str(
        &virtual_service("tcp-echo-typo", &[("v1", 80), ("v2", 20)])
            .replace("weight: 20", "wieght: 20"),
    );
    write_file(&file, &yaml);
    let file_arg = file.display().to_string();
    let mut proxy = pod.spawn_as(
        PROXY_UID,
        PROXY_UID,
        veer_bin(),
        &["proxy", "--config", &file_arg, "--admin", "127.0.0.1:15000"],
    );
    let status = proxy
        .wait_timeout(Duration::from_secs(10))
        .expect("veer proxy must exit");
    let stderr = proxy.stderr();
    assert_eq!(
        status.code(),
        Some(2),
        "exit status {status}; stderr:\n{stderr}"
    );
    for needle in [
        file_arg.as_str(),
        "document 3",
        "VirtualService",
        "tcp-echo-typo",
        "wieght",
    ] {
        assert!(
            stderr.contains(needle),
            "stderr should name {needle:?}:\n{stderr}"
        );
    }
}

/// The admin endpoint dumps the loaded config as JSON.
#[test]
fn config_dump_is_json_and_names_the_virtual_service() {
    let w = echo_world("configdump");
    let config = w.config(&virtual_service(
        "tcp-echo-e2e-split",
        &[("v1", 80), ("v2", 20)],
    ));
    let sidecar = w.sidecar(&[&config], &[]);
    let dump = sidecar.config_dump();
    let text = dump.to_string();
    assert!(
        text.contains("tcp-echo-e2e-split"),
        "VirtualService name not in /config_dump:\n{text}"
    );
    assert!(
        text.contains("tcp-echo-destination"),
        "DestinationRule not in /config_dump"
    );
}

/// The repository's sample manifests, loaded exactly as written (plus the generated file that
/// stands in for the API server: the Service's ClusterIP and the Pods' IPs), split 80/20.
#[test]
fn sample_manifests_split_80_20() {
    let w = echo_world("samples");
    let samples = Path::new(env!("CARGO_MANIFEST_DIR")).join("manifests/samples/tcp-echo");
    let dir = w.cluster.config_dir("config");
    for f in [
        "tcp-echo-services.yaml",
        "destination-rule-all.yaml",
        "tcp-echo-20-v2.yaml",
    ] {
        let text = fs::read_to_string(samples.join(f)).unwrap_or_else(|e| panic!("{f}: {e}"));
        write_file(&dir.join(f), &text);
    }
    // Sorts before the samples (files load in name order): its Service document, with the
    // ClusterIP the API server would have allocated, is the first definition of `tcp-echo`,
    // which veer uses (it warns about the sample's second, address-less definition).
    write_file(
        &dir.join("00-generated-endpoints.yaml"),
        &endpoints_yaml(&w),
    );
    let _sidecar = w.sidecar(&[&dir], &[]);
    let got = w.prefixes(100);
    assert_eq!(
        (count(&got, "one"), count(&got, "two")),
        (80, 20),
        "sequence: {got:?}"
    );
    for window in got.chunks(10) {
        assert_eq!(count(window, "two"), 2, "window {window:?}");
    }
}

/// Connections in parallel still all get answered (the relay is not serialised).
#[test]
fn concurrent_connections_are_all_answered() {
    let w = echo_world("concurrent");
    let config = w.config(&virtual_service("tcp-echo", &[("v1", 80), ("v2", 20)]));
    let _sidecar = w.sidecar(&[&config], &[]);
    let handles: Vec<_> = (0..20)
        .map(|i| {
            let client = w.client.clone();
            thread::spawn(move || {
                let line = format!("parallel {i}");
                let reply = client
                    .exchange(tcp_echo_addr(9000), &[&line])
                    .expect("exchange");
                assert!(reply.ends_with(&format!(" {line}\n")), "{reply:?}");
                reply.split_whitespace().next().unwrap_or("").to_string()
            })
        })
        .collect();
    let got: Vec<String> = handles
        .into_iter()
        .map(|h| h.join().expect("thread"))
        .collect();
    assert_eq!((count(&got, "one"), count(&got, "two")), (16, 4), "{got:?}");
}

/// The seed's step from all-v1 to 80/20 without a restart: the VirtualService file is replaced
/// and `POST /reload` swaps the config; a broken edit is rejected and the split stays in force.
#[test]
fn reload_shifts_traffic_and_keeps_the_last_valid_config() {
    let w = echo_world("reload");
    let config = w.config(&virtual_service("tcp-echo", &[("v1", 100)]));
    let sidecar = w.sidecar(&[&config], &[]);
    let got = w.prefixes(10);
    assert_eq!(count(&got, "one"), 10, "before the reload: {got:?}");

    let vs_file = config.join("virtual-service.yaml");
    replace_file(
        &vs_file,
        &virtual_service("tcp-echo", &[("v1", 80), ("v2", 20)]),
    );
    // The file watcher may have swapped already; then the explicit reload finds no change.
    let (code, body) = w.client.admin_post("/reload").expect("POST /reload");
    assert_eq!(code, 200, "POST /reload: {body}");
    let got = w.prefixes(100);
    assert_eq!(
        (count(&got, "one"), count(&got, "two")),
        (80, 20),
        "after the reload: {got:?}"
    );
    for window in got.chunks(10) {
        assert_eq!(count(window, "two"), 2, "window {window:?}");
    }

    let broken = virtual_service("tcp-echo", &[("v1", 50), ("v2", 50)]).replace("weight", "wieght");
    replace_file(&vs_file, &broken);
    let (code, body) = w.client.admin_post("/reload").expect("POST /reload");
    assert_eq!(code, 400, "a broken config must be rejected: {body}");
    assert!(body.contains("wieght"), "rejection names the field: {body}");
    assert_eq!(w.client.admin_get("/ready").expect("GET /ready").0, 200);
    let got = w.prefixes(10);
    assert_eq!(
        count(&got, "two"),
        2,
        "the 80/20 config stays in force: {got:?}"
    );
    drop(sidecar);
}
