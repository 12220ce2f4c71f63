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
    require_prerequisites();
    let mut cluster = Cluster::new("tproxy");
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
    let mut proxy = app_pod.spawn(
        "setpriv",
        &[
            "--reuid=1337",
            "--regid=1337",
            "--clear-groups",
            "--inh-caps=+net_admin",
            "--ambient-caps=+net_admin",
            &veer,
            "proxy",
            "--config",
            &config_arg,
            "--interception-mode",
            "tproxy",
        ],
    );
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
    let app = thread::spawn(move || -> std::io::Result<SocketAddr> {
        let (stream, peer) = listener.accept()?;
        stream.set_read_timeout(Some(IO_TIMEOUT))?;
        let mut line = String::new();
        BufReader::new(&stream).read_line(&mut line)?;
        (&stream).write_all(format!("peer {} said {line}", peer.ip()).as_bytes())?;
        Ok(peer)
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
}
