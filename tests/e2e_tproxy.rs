//! TPROXY inbound interception end to end: veer-init `-m TPROXY` in the app's pod, `veer
//! proxy --interception-mode tproxy` as uid 1337 holding only CAP_NET_ADMIN, and an app that
//! reports the peer it sees. With REDIRECT the app sees 127.0.0.6 (see e2e_core); with
//! TPROXY it must see the real client.

mod common;

use std::io::{BufRead, BufReader, Write};
use std::net::SocketAddr;
use std::thread;
use std::time::{Duration, Instant};

use common::*;

const CONFIG: &str = "apiVersion: v1
kind: Service
metadata: {name: unrelated}
spec: {clusterIP: 10.96.77.1, ports: [{port: 80}]}
";

#[test]
fn tproxy_inbound_keeps_the_client_address_for_the_app() {
    // uid 1337 with the capability handed over as an ambient one, as a process manager can;
    // the checks are tproxy_pods' own.
    let _pods = tproxy_pods(
        "tproxy",
        &["--reuid=1337", "--regid=1337", "--ambient-caps=+net_admin"],
    );
}

/// As `veer inject` runs it for `sidecar.istio.io/interceptionMode: TPROXY` (and Istio its
/// proxy): uid 0, gid 1337, `NET_ADMIN` its only capability, since Kubernetes grants no
/// ambient capabilities to a non-root user. Capture must then exclude the proxy by its group:
/// an outbound connection from the pod reaches its destination once, not the proxy again.
#[test]
fn tproxy_as_injected_root_with_group_1337_is_not_captured_again() {
    let t = tproxy_pods(
        "tproxy-root",
        &[
            "--reuid=0",
            "--regid=1337",
            "--bounding-set=-all,+net_admin",
        ],
    );
    let listener = t
        .client
        .listen(t.client.addr(9300))
        .expect("listen in the client pod");
    let server = answer_one_line(listener, |_, line| format!("got {line}"));
    let reply = t
        .app_pod
        .exchange(t.client.addr(9300), &["out"])
        .expect("outbound from the TPROXY pod, passed through");
    assert_eq!(reply, "got out\n");
    let peer = server.join().expect("server thread").expect("server");
    assert_eq!(peer.ip(), std::net::IpAddr::from(t.app_pod.ip));
    let stats = admin_json(&t.app_pod, "/stats?format=json");
    assert_eq!(
        stats["passthrough"].as_u64(),
        Some(1),
        "one pass-through connection, not a loop: {stats}"
    );
}

/// An app pod with veer-init `-m TPROXY` and the proxy started through `setpriv` with
/// `identity`, checked end to end for inbound (the app sees the real client) and least
/// privilege (only CAP_NET_ADMIN left).
struct TproxyPods {
    app_pod: Pod,
    client: Pod,
    _proxy: Proc,
    _cluster: Cluster,
}

fn tproxy_pods(tag: &str, identity: &[&str]) -> TproxyPods {
    require_prerequisites();
    let mut cluster = Cluster::new(tag);
    let app_pod = cluster.add_pod("app");
    let client = cluster.add_pod("client");
    let config = cluster.config_dir("tproxy");
    write_file(&config.join("config.yaml"), CONFIG);

    let mut flags: Vec<&str> = INJECTED_INIT_FLAGS.to_vec();
    let m = flags
        .iter()
        .position(|f| *f == "-m")
        .expect("-m in the injected flags");
    flags[m + 1] = "TPROXY";
    let out = app_pod.output(veer_init_bin(), &flags);
    assert!(
        out.status.success(),
        "veer-init -m TPROXY: {}",
        String::from_utf8_lossy(&out.stderr)
    );

    let config_arg = config.display().to_string();
    let veer = veer_bin().display().to_string();
    let mut args: Vec<&str> = identity.to_vec();
    args.extend([
        "--clear-groups",
        "--inh-caps=+net_admin",
        &veer,
        "proxy",
        "--config",
        &config_arg,
        "--interception-mode",
        "tproxy",
    ]);
    let mut proxy = app_pod.spawn("setpriv", &args);
    let deadline = Instant::now() + READY_TIMEOUT;
    while !matches!(app_pod.admin_get("/ready"), Ok((200, _))) {
        assert!(proxy.is_running(), "proxy exited: {}", proxy.stderr());
        assert!(
            Instant::now() < deadline,
            "proxy not ready: {}",
            proxy.stderr()
        );
        thread::sleep(Duration::from_millis(50));
    }

    // The app listens on the pod IP and answers with the peer address it sees.
    let listener = app_pod
        .listen(app_pod.addr(9200))
        .expect("listen on the pod IP");
    let app = answer_one_line(listener, |peer, line| {
        format!("peer {} said {line}", peer.ip())
    });
    let reply = client
        .exchange(app_pod.addr(9200), &["hello"])
        .expect("inbound through TPROXY");
    let peer = app.join().expect("app thread").expect("app");
    assert_eq!(
        reply,
        format!("peer {} said hello\n", client.ip),
        "the app must see the client, saw {peer}"
    );

    // And it went through the proxy: the inbound connection is in its access log (written
    // when the connection closes, just after the exchange).
    let client_field = format!("client={}", client.ip);
    wait_for(
        "an inbound access log line for the client",
        Duration::from_secs(5),
        || {
            let log = proxy.stderr();
            (log.contains("direction=Inbound") && log.contains(&client_field)).then_some(())
        },
    );
    // Least privilege: the running proxy holds CAP_NET_ADMIN (bit 12) and nothing else.
    let status =
        std::fs::read_to_string(format!("/proc/{}/status", proxy.pid())).unwrap_or_default();
    let eff = status
        .lines()
        .find(|l| l.starts_with("CapEff:"))
        .unwrap_or("")
        .to_string();
    assert!(
        eff.ends_with("0000000000001000"),
        "effective capabilities: {eff}"
    );
    TproxyPods {
        app_pod,
        client,
        _proxy: proxy,
        _cluster: cluster,
    }
}

/// Accepts one connection on `listener` in a thread, reads a line and writes back
/// `answer(peer, line)`; the thread returns the peer address.
fn answer_one_line(
    listener: std::net::TcpListener,
    answer: impl FnOnce(SocketAddr, &str) -> String + Send + 'static,
) -> thread::JoinHandle<std::io::Result<SocketAddr>> {
    thread::spawn(move || {
        let (stream, peer) = listener.accept()?;
        stream.set_read_timeout(Some(IO_TIMEOUT))?;
        let mut line = String::new();
        BufReader::new(&stream).read_line(&mut line)?;
        (&stream).write_all(answer(peer, &line).as_bytes())?;
        Ok(peer)
    })
}
