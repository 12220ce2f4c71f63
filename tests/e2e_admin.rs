//! End-to-end tests of the admin endpoint and observability, in the sidecar topology of
//! `e2e_core` (client pod `sleep` with capture and `veer proxy` as uid 1337; `tcp-echo-v1` /
//! `tcp-echo-v2` backends): counters, Istio's Prometheus metrics and byte totals against what
//! real clients sent and received, the per-destination split in `/routes`, the live
//! connection table, `/explain`, draining with `/quitquitquit`, and the POST-only /
//! loopback-only rules of the mutating endpoints.
//!
//! Needs root, `ip`, `iptables` and `setpriv` (`bash scripts/install-deps.sh`).

mod common;

use std::net::SocketAddr;
use std::thread;
use std::time::{Duration, Instant};

use common::*;

fn split_80_20() -> String {
    tcp_echo_virtual_service("tcp-echo", 9000, &[("v1", 80), ("v2", 20)])
}

/// A world with the 80/20 VirtualService and a running sidecar.
fn world_8020(tag: &str, extra: &[&str]) -> (MeshWorld, Sidecar) {
    let w = MeshWorld::new(tag);
    let dir = w.config_dir("config", &split_80_20());
    let sidecar = w.start_sidecar(&[&dir], extra);
    (w, sidecar)
}

fn is_tcp_echo(l: &prometheus_parse::Labels) -> bool {
    l.get("destination_service")
        .is_some_and(|s| s.starts_with("tcp-echo."))
}

fn stat(stats: &serde_json::Value, key: &str) -> u64 {
    stats[key]
        .as_u64()
        .unwrap_or_else(|| panic!("/stats has no number {key}: {stats}"))
}

// ---------------------------------------------------------------------------------------------

/// N connections, each sending K lines: `/stats` and the Istio metrics count exactly N opened
/// and closed, and the byte totals are what the clients sent (received_bytes) and got back
/// (sent_bytes). The Prometheus text is checked against the exposition format and parsed.
#[test]
fn counters_and_istio_metrics_match_what_clients_saw() {
    let (w, sidecar) = world_8020("adm-counts", &[]);
    const N: usize = 12;
    const K: usize = 7;
    let (mut sent, mut received) = (0u64, 0u64);
    let mut prefixes = Vec::new();
    for i in 0..N {
        let lines: Vec<String> = (0..K)
            .map(|k| format!("conn {i} line {k} {}", "x".repeat(i * 3 + k)))
            .collect();
        let refs: Vec<&str> = lines.iter().map(String::as_str).collect();
        let reply = w
            .client
            .exchange(tcp_echo_addr(9000), &refs)
            .unwrap_or_else(|e| panic!("connection {i}: {e}"));
        let prefix = reply.split(' ').next().unwrap_or("").to_string();
        let want: String = lines.iter().map(|l| format!("{prefix} {l}\n")).collect();
        assert_eq!(reply, want, "connection {i}");
        sent += lines.iter().map(|l| l.len() as u64 + 1).sum::<u64>();
        received += reply.len() as u64;
        prefixes.push(prefix);
    }
    let twos = count_of(&prefixes, "two") as f64;

    // The close is recorded when the relay task ends, just after the client saw EOF.
    let stats = wait_for(
        "/stats to count every connection closed",
        Duration::from_secs(5),
        || {
            let s = admin_json(&w.client, "/stats?format=json");
            (stat(&s, "connections_closed") == N as u64).then_some(s)
        },
    );
    assert_eq!(stat(&stats, "connections_opened"), N as u64, "{stats}");
    assert_eq!(stat(&stats, "connections_active"), 0, "{stats}");
    assert_eq!(stat(&stats, "bytes_to_upstream"), sent, "{stats}");
    assert_eq!(stat(&stats, "bytes_to_client"), received, "{stats}");

    for path in ["/stats/prometheus", "/metrics"] {
        let (scrape, text) = scrape_prometheus(&w.client, path);
        let sum = |m: &str| metric_sum(&scrape, m, is_tcp_echo);
        assert_eq!(
            sum("istio_tcp_connections_opened_total"),
            N as f64,
            "{path}:\n{text}"
        );
        assert_eq!(
            sum("istio_tcp_connections_closed_total"),
            N as f64,
            "{path}:\n{text}"
        );
        assert_eq!(
            sum("istio_tcp_received_bytes_total"),
            sent as f64,
            "{path}: client→upstream bytes\n{text}"
        );
        assert_eq!(
            sum("istio_tcp_sent_bytes_total"),
            received as f64,
            "{path}: upstream→client bytes\n{text}"
        );
        let v2 = metric_sum(&scrape, "istio_tcp_connections_opened_total", |l| {
            is_tcp_echo(l)
                && l.get("destination_subset") == Some("v2")
                && l.get("destination_version") == Some("v2")
        });
        assert_eq!(
            v2, twos,
            "{path}: connections labelled subset/version v2\n{text}"
        );
        let closed_ok = metric_sum(&scrape, "istio_tcp_connections_closed_total", |l| {
            is_tcp_echo(l) && l.get("response_flags") == Some("-")
        });
        assert_eq!(closed_ok, N as f64, "{path}: response_flags=\"-\"\n{text}");
        assert_eq!(
            metric_sum(&scrape, "veer_active_connections", |_| true),
            0.0,
            "{path}:\n{text}"
        );
    }
    drop(sidecar);
}

/// After 20 connections with 80/20, `/routes` shows 16 and 4 connections for the two
/// destinations of the rule.
#[test]
fn routes_show_the_actual_split() {
    let (w, _sidecar) = world_8020("adm-routes", &[]);
    let got = w.prefixes(9000, 20);
    assert_eq!(
        (count_of(&got, "one"), count_of(&got, "two")),
        (16, 4),
        "{got:?}"
    );
    let routes = admin_json(&w.client, "/routes");
    let rule = &routes["listeners"][format!("{TCP_ECHO_CLUSTER_IP}:9000")]["rules"][0];
    assert_eq!(
        rule["virtual_service"].as_str(),
        Some("default/tcp-echo"),
        "{routes}"
    );
    let dests = rule["destinations"]
        .as_array()
        .unwrap_or_else(|| panic!("no destinations: {routes}"));
    let find = |subset: &str| {
        dests
            .iter()
            .find(|d| {
                d["cluster"]
                    .as_str()
                    .is_some_and(|c| c.contains(&format!("|{subset}|")))
            })
            .unwrap_or_else(|| panic!("no destination for subset {subset}: {routes}"))
    };
    assert_eq!(
        (
            find("v1")["weight"].as_u64(),
            find("v1")["connections"].as_u64()
        ),
        (Some(80), Some(16)),
        "{routes}"
    );
    assert_eq!(
        (
            find("v2")["weight"].as_u64(),
            find("v2")["connections"].as_u64()
        ),
        (Some(20), Some(4)),
        "{routes}"
    );
}

/// A long-lived connection shows in `/connections` while it is open (route, subset,
/// upstream, growing bytes), and Istio's byte counter grows between two scrapes before it
/// closes: bytes are counted as they move, not at close.
#[test]
fn long_lived_connection_is_visible_while_open() {
    let (w, _sidecar) = world_8020("adm-live", &[]);
    let session = EchoSession::start(
        &w.client,
        tcp_echo_addr(9000),
        "long-lived",
        Duration::from_millis(200),
    )
    .expect("long-lived connection");
    let (subset, upstream) = match session.prefix() {
        "one" => ("v1", w.v1.addr(9000)),
        "two" => ("v2", w.v2.addr(9000)),
        other => panic!("unexpected prefix {other}"),
    };
    let row = |conns: &serde_json::Value| -> Option<serde_json::Value> {
        conns["connections"]
            .as_array()?
            .iter()
            .find(|c| c["original_destination"].as_str() == Some("10.96.0.100:9000"))
            .cloned()
    };
    let first = wait_for(
        "the connection in /connections",
        Duration::from_secs(3),
        || row(&admin_json(&w.client, "/connections")),
    );
    assert_eq!(
        first["route"].as_str(),
        Some("default/tcp-echo/tcp[0]"),
        "{first}"
    );
    assert_eq!(first["subset"].as_str(), Some(subset), "{first}");
    assert_eq!(
        first["upstream"].as_str(),
        Some(upstream.to_string().as_str()),
        "{first}"
    );
    assert_eq!(first["state"].as_str(), Some("open"), "{first}");
    assert!(
        first["client"]
            .as_str()
            .is_some_and(|c| c.starts_with(&format!("{}:", w.client.ip))),
        "{first}"
    );
    let (scrape1, _) = scrape_prometheus(&w.client, "/metrics");
    let received1 = metric_sum(&scrape1, "istio_tcp_received_bytes_total", is_tcp_echo);
    let sent1 = metric_sum(&scrape1, "istio_tcp_sent_bytes_total", is_tcp_echo);
    let b1 = first["bytes_to_upstream"]
        .as_u64()
        .expect("bytes_to_upstream");

    thread::sleep(Duration::from_millis(700));
    assert!(session.is_alive(), "the session is still echoing");
    let second = row(&admin_json(&w.client, "/connections")).expect("still listed");
    let b2 = second["bytes_to_upstream"]
        .as_u64()
        .expect("bytes_to_upstream");
    assert!(
        b2 > b1,
        "bytes_to_upstream grows while open: {b1} then {b2}"
    );
    assert!(
        second["bytes_to_client"].as_u64() > first["bytes_to_client"].as_u64(),
        "bytes_to_client grows: {first} then {second}"
    );
    assert_eq!(second["id"], first["id"], "the same connection");
    let (scrape2, text2) = scrape_prometheus(&w.client, "/metrics");
    let received2 = metric_sum(&scrape2, "istio_tcp_received_bytes_total", is_tcp_echo);
    let sent2 = metric_sum(&scrape2, "istio_tcp_sent_bytes_total", is_tcp_echo);
    assert!(
        received2 > received1 && sent2 > sent1,
        "Istio byte counters grow while the connection is open: received {received1} → \
         {received2}, sent {sent1} → {sent2}\n{text2}"
    );
    assert_eq!(
        metric_sum(&scrape2, "istio_tcp_connections_closed_total", is_tcp_echo),
        0.0,
        "not closed yet"
    );
    assert_eq!(
        metric_sum(&scrape2, "veer_active_connections", |_| true),
        1.0
    );

    let report = session.finish().expect("session ends cleanly");
    let stats = wait_for("the connection to close", Duration::from_secs(5), || {
        let s = admin_json(&w.client, "/stats?format=json");
        (stat(&s, "connections_closed") == 1).then_some(s)
    });
    assert_eq!(
        stat(&stats, "bytes_to_upstream"),
        report.bytes_sent,
        "{stats}"
    );
    assert_eq!(
        stat(&stats, "bytes_to_client"),
        report.bytes_received,
        "{stats}"
    );
    let conns = admin_json(&w.client, "/connections");
    assert_eq!(conns["count"].as_u64(), Some(0), "{conns}");
}

/// `/quitquitquit` with a connection open: `/ready` turns 503, new connections are refused,
/// the open one finishes (its last line and half-close inside the drain timeout) with every
/// reply delivered, and then the proxy exits 0.
#[test]
fn quitquitquit_drains_the_open_connection_then_exits_0() {
    let (w, mut sidecar) = world_8020("adm-quit", &["--drain-timeout", "8s"]);
    let session = EchoSession::start(
        &w.client,
        tcp_echo_addr(9000),
        "draining",
        Duration::from_millis(100),
    )
    .expect("connection before the drain");
    thread::sleep(Duration::from_millis(300));
    let (code, body) = w
        .client
        .admin_post("/quitquitquit")
        .expect("POST /quitquitquit");
    assert_eq!(code, 200, "POST /quitquitquit: {body}");
    let asked = Instant::now();

    let (code, body) = w
        .client
        .admin_get("/ready")
        .expect("GET /ready while draining");
    assert_eq!(code, 503, "/ready while draining: {body}");
    assert_eq!(
        w.client
            .admin_get("/healthz/ready")
            .expect("GET /healthz/ready")
            .0,
        503
    );
    // The capture listener is closed: a new connection is refused (or closed unanswered).
    if let Ok(reply) = w.client.exchange(tcp_echo_addr(9000), &["too late"]) {
        assert!(
            reply.is_empty(),
            "a new connection was served while draining: {reply:?}"
        );
    }
    let before = session.echoed();
    thread::sleep(Duration::from_millis(500));
    assert!(
        session.echoed() > before,
        "the open connection keeps echoing while draining"
    );
    assert!(
        sidecar.proxy.is_running(),
        "the proxy must wait for the open connection (exited {:?} after {:?})",
        sidecar.proxy.try_wait(),
        asked.elapsed()
    );
    let report = session
        .finish()
        .expect("the open connection completes, every reply delivered");
    assert!(report.lines >= 5, "{report:?}");
    let status = sidecar
        .proxy
        .wait_timeout(Duration::from_secs(5))
        .unwrap_or_else(|| panic!("the proxy did not exit after its last connection finished"));
    assert_eq!(status.code(), Some(0), "exit status {status}");
    assert!(
        asked.elapsed() < Duration::from_secs(7),
        "the proxy exited when the connection finished, not at the drain deadline: {:?}",
        asked.elapsed()
    );
}

/// Mutating endpoints take POST only: GET answers 405 and changes nothing.
#[test]
fn mutating_endpoints_are_post_only() {
    let (w, mut sidecar) = world_8020("adm-post", &[]);
    for path in [
        "/quitquitquit",
        "/drain_listeners",
        "/reload",
        "/logging?level=debug",
    ] {
        let (code, body) = w.client.admin_get(path).expect("GET");
        assert_eq!(code, 405, "GET {path}: {body}");
    }
    let (code, body) = w
        .client
        .admin_post("/logging?level=debug")
        .expect("POST /logging");
    assert_eq!(code, 200, "POST /logging?level=debug: {body}");
    let (code, body) = w
        .client
        .admin_post("/logging?level=info")
        .expect("POST /logging");
    assert_eq!(code, 200, "POST /logging?level=info: {body}");
    thread::sleep(Duration::from_millis(200));
    assert!(
        sidecar.proxy.is_running(),
        "GET /quitquitquit must not stop the proxy"
    );
    assert_eq!(w.client.admin_get("/ready").expect("GET /ready").0, 200);
    assert_eq!(w.prefixes(9000, 5).len(), 5, "still routing");
}

/// POSTs from another pod, straight to the admin port (`--admin 0.0.0.0:15000`, no capture in
/// the proxy's pod): 403, and the proxy keeps running. Reads are allowed.
#[test]
fn admin_mutations_from_another_pod_are_refused() {
    let w = MeshWorld::new("adm-remote");
    let dir = w.config_dir("config", &split_80_20());
    // No capture: the request reaches the admin listener from v1's pod IP.
    let mut sidecar = Sidecar::launch(&w.client, &[&dir], Some("0.0.0.0:15000"), &[], &[]);
    assert_remote_admin_refused(&w, &mut sidecar);
}

/// The same through the sidecar's inbound capture (`veer-init` + `--admin 0.0.0.0:15000`):
/// the request is redirected to the inbound listener, which forwards it to the admin port from
/// 127.0.0.6. It still comes from another pod and must still be refused.
#[test]
fn admin_mutations_from_another_pod_are_refused_through_inbound_capture() {
    let w = MeshWorld::new("adm-remote-cap");
    let dir = w.config_dir("config", &split_80_20());
    install_capture(&w.client);
    let mut sidecar = Sidecar::launch(
        &w.client,
        &[&dir],
        Some("0.0.0.0:15000"),
        &[],
        &["--pod-labels", "app=sleep"],
    );
    assert_remote_admin_refused(&w, &mut sidecar);
    assert_eq!(w.prefixes(9000, 10).len(), 10, "still routing");
}

fn assert_remote_admin_refused(w: &MeshWorld, sidecar: &mut Sidecar) {
    let admin = SocketAddr::new(w.client.ip.into(), ADMIN_PORT);
    let (code, body) = w.v1.http_get(admin, "/ready").expect("GET /ready from v1");
    assert_eq!(code, 200, "reads are allowed from other pods: {body}");
    // Every answer is collected first, so a failure shows the whole picture.
    let answers: Vec<String> = [
        "/logging?level=trace",
        "/reload",
        "/quitquitquit",
        "/drain_listeners",
    ]
    .iter()
    .map(|path| match w.v1.http_request("POST", admin, path) {
        Ok((code, body)) => format!("POST {path} -> {code} {}", body.trim()),
        Err(e) => format!("POST {path} -> error {e}"),
    })
    .collect();
    thread::sleep(Duration::from_millis(300));
    let running = sidecar.proxy.is_running();
    let ready = w.client.admin_get("/ready").map(|(c, _)| c).ok();
    let refused = answers.iter().all(|a| a.contains(" -> 403 "));
    assert!(
        refused && running && ready == Some(200),
        "mutating admin requests from another pod must get 403 and change nothing;\n\
         answers: {answers:#?}\nproxy still running: {running} ({:?}), GET /ready: {ready:?}",
        sidecar.proxy.try_wait()
    );
}

/// `/explain?dst=CLUSTERIP:9000` names the VirtualService rule and both subsets with their
/// 80/20 shares; `veer explain` says the same from the config files.
#[test]
fn explain_names_the_rule_and_both_subsets() {
    let (w, _sidecar) = world_8020("adm-explain", &[]);
    let dst = format!("{TCP_ECHO_CLUSTER_IP}:9000");
    let e = admin_json(&w.client, &format!("/explain?dst={dst}"));
    let text = e.to_string();
    assert!(
        e["verdict"]
            .as_str()
            .is_some_and(|v| v.contains("default/tcp-echo/tcp[0]")),
        "verdict names the rule: {text}"
    );
    assert!(
        e["checked"].as_array().is_some_and(|c| c
            .iter()
            .any(|r| r["rule"] == "default/tcp-echo/tcp[0]" && r["applies"] == true)),
        "{text}"
    );
    let shares: Vec<(String, f64)> = e["destinations"]
        .as_array()
        .unwrap_or_else(|| panic!("no destinations: {text}"))
        .iter()
        .map(|d| {
            (
                d["cluster"].as_str().unwrap_or("").to_string(),
                d["share_percent"].as_f64().unwrap_or(-1.0),
            )
        })
        .collect();
    assert_eq!(shares.len(), 2, "{text}");
    assert!(
        shares[0].0.contains("|v1|") && shares[0].1 == 80.0,
        "{shares:?}"
    );
    assert!(
        shares[1].0.contains("|v2|") && shares[1].1 == 20.0,
        "{shares:?}"
    );
    for d in e["destinations"].as_array().expect("destinations") {
        let eps = d["endpoints"].to_string();
        let pod = if d["cluster"].as_str().unwrap_or("").contains("|v1|") {
            &w.v1
        } else {
            &w.v2
        };
        assert!(eps.contains(&pod.addr(9000).to_string()), "{d}");
    }

    let (code, plain) = w
        .client
        .admin_get(&format!("/explain?dst={dst}&format=text"))
        .expect("GET /explain text");
    assert_eq!(code, 200, "{plain}");
    for needle in ["default/tcp-echo", "v1", "v2", "80", "20"] {
        assert!(
            plain.contains(needle),
            "text explain lacks {needle:?}:\n{plain}"
        );
    }

    let dir = w.cluster.dir.join("config").display().to_string();
    let mut cmd = std::process::Command::new(veer_bin());
    cmd.args(["explain", "--config", &dir, "--json", &dst]);
    let out = must(cmd);
    let cli: serde_json::Value =
        serde_json::from_slice(&out.stdout).expect("veer explain --json prints JSON");
    assert_eq!(cli["verdict"], e["verdict"], "CLI and admin agree");
    assert_eq!(
        cli["destinations"].as_array().map(Vec::len),
        Some(2),
        "{cli}"
    );
}

/// The ports `veer inject` opens on the pod IP, as Istio's sidecar does: the status port
/// (`--health-addr 0.0.0.0:15021`) for the kubelet's probes and the metrics port
/// (`--metrics-addr 0.0.0.0:15090`) for Prometheus, both excluded from inbound capture.
/// From another pod each answers its own path and nothing else: no config, no connection
/// table, no way to stop the proxy.
#[test]
fn status_and_metrics_ports_answer_other_pods_with_their_path_only() {
    let (w, mut sidecar) = world_8020(
        "adm-ports",
        &[
            "--health-addr",
            "0.0.0.0:15021",
            "--metrics-addr",
            "0.0.0.0:15090",
        ],
    );
    const N: usize = 6;
    assert_eq!(w.prefixes(9000, N).len(), N);
    let at = |port| SocketAddr::new(w.client.ip.into(), port);
    let (code, body) =
        w.v1.http_get(at(15021), "/healthz/ready")
            .expect("GET :15021/healthz/ready from v1");
    assert_eq!(code, 200, "{body}");

    // Prometheus's view: the Istio metrics of the connections just made.
    let opened = wait_for(
        "the metrics port to count every connection",
        Duration::from_secs(5),
        || {
            let (code, text) =
                w.v1.http_get(at(15090), "/stats/prometheus")
                    .expect("GET :15090/stats/prometheus from v1");
            assert_eq!(code, 200, "{text}");
            let lines = text.lines().map(|l| Ok(l.to_string()));
            let scrape = prometheus_parse::Scrape::parse(lines).expect("exposition format");
            let n = metric_sum(&scrape, "istio_tcp_connections_closed_total", is_tcp_echo);
            (n == N as f64).then_some(metric_sum(
                &scrape,
                "istio_tcp_connections_opened_total",
                is_tcp_echo,
            ))
        },
    );
    assert_eq!(opened, N as f64);

    let mut answers = Vec::new();
    for (method, port, path) in [
        ("GET", 15021, "/config_dump"),
        ("GET", 15021, "/stats/prometheus"),
        ("GET", 15090, "/config_dump"),
        ("GET", 15090, "/connections"),
        ("GET", 15090, "/healthz/ready"),
        ("POST", 15090, "/quitquitquit"),
        ("POST", 15021, "/drain_listeners"),
    ] {
        let (code, body) =
            w.v1.http_request(method, at(port), path)
                .unwrap_or_else(|e| panic!("{method} :{port}{path}: {e}"));
        if code != 404 {
            answers.push(format!("{method} :{port}{path} -> {code} {}", body.trim()));
        }
    }
    assert!(answers.is_empty(), "served beyond their path: {answers:#?}");
    thread::sleep(Duration::from_millis(200));
    assert!(sidecar.proxy.is_running());
    assert_eq!(w.prefixes(9000, 3).len(), 3, "still routing");
}
