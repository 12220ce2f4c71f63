//! End-to-end reliability tests, in the sidecar topology of `e2e_core` (client pod `sleep`
//! with capture and `veer proxy` as uid 1337; `tcp-echo-v1` / `tcp-echo-v2` backends running
//! `veer echo`): connect retries and TCP outlier detection, connect timeouts against a
//! blackholed endpoint, backends and clients dying mid-stream, thousands of concurrent
//! connections without leaked descriptors, running out of descriptors, the process-wide and
//! per-cluster connection limits, idle / half-close / max-duration timeouts with their close
//! reasons, upstream TCP keepalive, graceful shutdown and listeners bound before the config
//! is read.
//!
//! Backends that must behave unlike an echo server (hold a connection silently, send after
//! the client's FIN, sink bytes) are threads of this test process listening inside a pod's
//! network namespace ([`Pod::listen`]). The one that must be SIGKILLed mid-transfer is this
//! test binary re-executed in the backend pod (see [`reliability_helper_process`]), so the
//! kernel, not the test, closes its socket.
//!
//! Needs root, `ip`, `iptables`, `setpriv`, `ss` (iproute2) and `prlimit` (util-linux)
//! (`bash scripts/install-deps.sh`).

mod common;

use std::io::{self, Read, Write};
use std::net::{IpAddr, Ipv4Addr, Shutdown, SocketAddr, TcpStream};
use std::path::Path;
use std::sync::mpsc;
use std::thread;
use std::time::{Duration, Instant};

use common::*;

// ---------------------------------------------------------------------------------------------
// Local helpers

/// ClusterIPs of the extra services some tests add (outside every cluster's pod /24).
const BULK_IP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 102);
const SINK_IP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 103);
const LINGER_IP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 104);

/// The sample's DestinationRule (subsets v1 / v2) with a top-level `trafficPolicy` whose body
/// is `policy` (YAML lines indented by four spaces).
fn destination_rule(policy: &str) -> String {
    format!(
        "---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata:
  name: tcp-echo-destination
spec:
  host: tcp-echo
  trafficPolicy:
{policy}  subsets:
  - name: v1
    labels: {{version: v1}}
  - name: v2
    labels: {{version: v2}}
"
    )
}

fn all_to_v1() -> String {
    tcp_echo_virtual_service("tcp-echo", 9000, &[("v1", 100)])
}

/// A config dir with both tcp-echo pods, `dr` and (if given) a VirtualService, plus `extra`
/// documents (more services).
fn config(w: &MeshWorld, dr: &str, vs: Option<&str>, extra: &str) -> std::path::PathBuf {
    let dir = w.cluster.config_dir("config");
    write_file(&dir.join("endpoints.yaml"), &w.endpoints_yaml(true));
    write_file(&dir.join("destination-rule.yaml"), dr);
    if let Some(vs) = vs {
        write_file(&dir.join("virtual-service.yaml"), vs);
    }
    if !extra.is_empty() {
        write_file(&dir.join("extra.yaml"), extra);
    }
    dir
}

/// A world and its running sidecar.
fn world(
    tag: &str,
    dr: &str,
    vs: Option<&str>,
    extra_yaml: &str,
    flags: &[&str],
) -> (MeshWorld, Sidecar) {
    let w = MeshWorld::new(tag);
    let dir = config(&w, dr, vs, extra_yaml);
    let sidecar = w.start_sidecar(&[&dir], flags);
    (w, sidecar)
}

/// The client's sidecar with capture, its proxy run under `launcher` (see
/// [`Sidecar::launch`]).
fn sidecar_under(w: &MeshWorld, dir: &Path, launcher: &[&str]) -> Sidecar {
    install_capture(&w.client);
    Sidecar::launch(
        &w.client,
        &[dir],
        None,
        launcher,
        &["--pod-labels", "app=sleep"],
    )
}

fn addr(ip: Ipv4Addr, port: u16) -> SocketAddr {
    SocketAddr::new(IpAddr::V4(ip), port)
}

/// `veer_connections_closed_by_reason_total{reason=...}`.
fn closed_by_reason(pod: &Pod, reason: &str) -> f64 {
    let (scrape, _) = scrape_prometheus(pod, "/stats/prometheus");
    metric_sum(&scrape, "veer_connections_closed_by_reason_total", |l| {
        l.get("reason") == Some(reason)
    })
}

/// Every close reason with its count (for messages).
fn close_reasons(pod: &Pod) -> Vec<(String, f64)> {
    let (scrape, _) = scrape_prometheus(pod, "/stats/prometheus");
    scrape
        .samples
        .iter()
        .filter(|s| s.metric == "veer_connections_closed_by_reason_total")
        .map(|s| {
            (
                s.labels.get("reason").unwrap_or("?").to_string(),
                sample_value(s),
            )
        })
        .collect()
}

fn metric(pod: &Pod, name: &str) -> f64 {
    let (scrape, _) = scrape_prometheus(pod, "/stats/prometheus");
    metric_sum(&scrape, name, |_| true)
}

/// Waits for the proxy's access log to show a closed connection with `reason` (its Debug
/// name, e.g. `IdleTimeout`) and returns the line.
fn wait_close_logged(sidecar: &Sidecar, reason: &str) -> String {
    let needle = format!("reason={reason}");
    wait_for(
        &format!("a \"tcp connection closed\" line with {needle}"),
        Duration::from_secs(5),
        || {
            log_lines_with(&sidecar.proxy.stderr(), &["tcp connection closed", &needle])
                .first()
                .map(|l| l.to_string())
        },
    )
}

fn stat(pod: &Pod, key: &str) -> u64 {
    let s = admin_json(pod, "/stats?format=json");
    s[key]
        .as_u64()
        .unwrap_or_else(|| panic!("/stats has no number {key}: {s}"))
}

/// One line exchanged on an open connection; returns the reply.
fn exchange_line(stream: &mut TcpStream, line: &str) -> io::Result<String> {
    stream.write_all(format!("{line}\n").as_bytes())?;
    read_one_line(stream)
}

/// Sends `TERM` to the proxy (the spawned process is the proxy: `ip netns exec` and
/// `setpriv` exec in place).
fn sigterm(sidecar: &Sidecar) {
    signal_proc(&sidecar.proxy, "TERM");
}

// ---------------------------------------------------------------------------------------------
// The helper process

const HELPER_ENV: &str = "VEER_RELIABILITY_HELPER";

/// The byte at `offset` of a helper's stream: a pattern with period 251 (prime, so it never
/// lines up with buffer sizes), so a lost, duplicated or reordered chunk is detected.
fn pattern_byte(offset: u64) -> u8 {
    (offset % 251) as u8
}

/// Not a test: this test binary re-executed inside a backend pod (with `HELPER_ENV` set) to be
/// a process the test can SIGKILL. `send PORT BYTES`: listens on PORT and sends BYTES of the
/// pattern to every connection, never reading. Without the variable it does nothing.
#[test]
fn reliability_helper_process() {
    let Ok(spec) = std::env::var(HELPER_ENV) else {
        return;
    };
    let parts: Vec<&str> = spec.split_whitespace().collect();
    let ["send", port, bytes] = parts[..] else {
        panic!("bad {HELPER_ENV}: {spec:?}");
    };
    let port: u16 = port.parse().expect("port");
    let bytes: u64 = bytes.parse().expect("bytes");
    let listener = std::net::TcpListener::bind(("0.0.0.0", port)).expect("helper bind");
    println!("helper: sending {bytes} bytes to each connection on port {port}");
    for stream in listener.incoming() {
        let Ok(mut stream) = stream else { continue };
        thread::spawn(move || {
            let chunk: Vec<u8> = (0..251 * 256).map(pattern_byte).collect();
            let mut sent = 0u64;
            while sent < bytes {
                // Chunks are a multiple of the period, so each starts at pattern offset 0.
                let n = (bytes - sent).min(chunk.len() as u64) as usize;
                if stream.write_all(&chunk[..n]).is_err() {
                    return;
                }
                sent += n as u64;
            }
        });
    }
}

/// Starts the helper in `pod` (`send PORT BYTES`) and waits until it listens.
fn start_sender(pod: &Pod, port: u16, bytes: u64) -> Proc {
    let exe = std::env::current_exe().expect("current test binary");
    let spec = format!("send {port} {bytes}");
    let p = spawn_with_env(
        pod,
        &exe,
        &[
            "reliability_helper_process",
            "--exact",
            "--nocapture",
            "--test-threads=1",
        ],
        &[(HELPER_ENV, &spec)],
    );
    pod.wait_listening(pod.addr(port), Duration::from_secs(10));
    p
}

// ---------------------------------------------------------------------------------------------
// Connect retries and outlier detection

/// v2's echo server is killed: every connection is still answered (a refused connect is
/// retried on v1), v2 is ejected after 2 consecutive failures and shows as ejected in
/// `/clusters`; once its echo server is back and the 2 s ejection has passed it gets
/// connections again. The counters in `/clusters` and Prometheus say what happened.
#[test]
fn dead_endpoint_is_retried_ejected_and_comes_back() {
    let dr = destination_rule(
        "    loadBalancer: {simple: ROUND_ROBIN}
    outlierDetection:
      consecutive5xxErrors: 2
      baseEjectionTime: 2s
      maxEjectionPercent: 100
",
    );
    // No VirtualService: the Service's port goes to the whole service (both pods).
    let (mut w, sidecar) = world("rel-eject", &dr, None, "", &[]);
    let before = w.prefixes(9000, 4);
    assert!(
        count_of(&before, "one") > 0 && count_of(&before, "two") > 0,
        "round robin over both endpoints: {before:?}"
    );

    w.echo[1].kill(); // v2: nothing listens on 9000 any more (connects are refused)
    let got = w.prefixes(9000, 8); // each one panics unless answered
    assert_eq!(count_of(&got, "one"), 8, "all answered by v1: {got:?}");

    let clusters = admin_json(&w.client, "/clusters");
    let cluster = find_cluster(&clusters, "|9000||tcp-echo.");
    let v2 = find_endpoint(&cluster, w.v2.addr(9000));
    assert_eq!(v2["outlier"]["health"], "ejected", "{cluster}");
    assert_eq!(v2["outlier"]["times_ejected"], 1, "{cluster}");
    let left = v2["outlier"]["ejected_for_seconds"]
        .as_f64()
        .unwrap_or(-1.0);
    assert!(
        left > 0.0 && left <= 2.0,
        "ejected_for_seconds {left}: {cluster}"
    );
    let v1 = find_endpoint(&cluster, w.v1.addr(9000));
    assert_eq!(v1["outlier"]["health"], "healthy", "{cluster}");
    assert_eq!(cluster["counters"]["ejections"], 1, "{cluster}");
    assert_eq!(
        cluster["counters"]["connect_retries"], 2,
        "two refused connects, each retried on v1: {cluster}"
    );
    assert_eq!(metric(&w.client, "veer_outlier_ejections_total"), 1.0);
    assert_eq!(
        metric(&w.client, "veer_upstream_connect_retries_total"),
        2.0
    );
    assert!(
        !log_lines_with(
            &sidecar.proxy.stderr(),
            &["outlier detection: endpoint ejected"]
        )
        .is_empty(),
        "the ejection is logged"
    );

    // v2 comes back, but stays ejected until its ejection time has passed.
    w.echo[1] = start_tcp_echo(&w.v2, "two");
    let ejected_at = Instant::now();
    wait_for(
        "v2 to be healthy again in /clusters",
        Duration::from_secs(4),
        || {
            let c = find_cluster(&admin_json(&w.client, "/clusters"), "|9000||tcp-echo.");
            let ep = find_endpoint(&c, w.v2.addr(9000));
            (ep["outlier"]["health"] == "healthy").then_some(())
        },
    );
    assert!(
        ejected_at.elapsed() <= Duration::from_secs(3),
        "ejection lasted longer than baseEjectionTime"
    );
    let after = w.prefixes(9000, 6);
    assert!(
        count_of(&after, "two") >= 2,
        "v2 receives connections again after its ejection: {after:?}"
    );
    let c = find_cluster(&admin_json(&w.client, "/clusters"), "|9000||tcp-echo.");
    assert_eq!(c["counters"]["connect_retries"], 2, "no new retries: {c}");
}

/// v2 silently drops every packet to port 9000 (iptables DROP in its pod): with
/// `connectTimeout: 300ms` a connection that picks v2 gives up on it after 300 ms and is
/// retried on v1, so every client gets its reply within a second.
#[test]
fn blackholed_endpoint_times_out_and_is_retried_elsewhere() {
    let dr = destination_rule(
        "    loadBalancer: {simple: ROUND_ROBIN}
    connectionPool:
      tcp: {connectTimeout: 300ms}
",
    );
    let (w, sidecar) = world("rel-blackhole", &dr, None, "", &[]);
    w.v2.run(
        "iptables",
        &["-A", "INPUT", "-p", "tcp", "--dport", "9000", "-j", "DROP"],
    );
    let mut slow = 0;
    for i in 0..6 {
        let line = format!("through the blackhole {i}");
        let t = Instant::now();
        let reply = w
            .client
            .exchange(tcp_echo_addr(9000), &[&line])
            .unwrap_or_else(|e| panic!("connection {i}: {e}"));
        let took = t.elapsed();
        assert_eq!(reply, format!("one {line}\n"), "connection {i}");
        assert!(
            took < Duration::from_secs(1),
            "connection {i} took {took:?} (connect timeout 300ms, then a retry)"
        );
        if took >= Duration::from_millis(280) {
            slow += 1;
        }
    }
    assert!(
        slow >= 2,
        "round robin sent some connections to v2 first: {slow} slow"
    );
    let c = find_cluster(&admin_json(&w.client, "/clusters"), "|9000||tcp-echo.");
    assert!(
        c["counters"]["connect_retries"].as_u64().unwrap_or(0) >= 2,
        "{c}"
    );
    assert!(
        !log_lines_with(
            &sidecar.proxy.stderr(),
            &["upstream connect failed", "timed out"]
        )
        .is_empty(),
        "the connect timeout is logged"
    );
}

// ---------------------------------------------------------------------------------------------
// Peers dying mid-stream

/// The backend (a separate process) streams 100 MB; after 20 MB the client stops reading for
/// a moment (so the transfer is certainly in flight), the backend is SIGKILLed, and the client
/// sees the end of the stream within a second: every byte it got is the backend's, in order.
#[test]
fn backend_killed_mid_transfer_ends_the_client_promptly() {
    const TOTAL: u64 = 100 * 1024 * 1024;
    let w = MeshWorld::new("rel-bkill");
    let bulk = service_with_pods_yaml("bulk", BULK_IP, 9100, &[("bulk-0", w.v1.ip)]);
    let dir = config(&w, TCP_ECHO_DESTINATION_RULE, None, &bulk);
    let mut sender = start_sender(&w.v1, 9100, TOTAL);
    let sidecar = w.start_sidecar(&[&dir], &[]);

    let mut stream = w
        .client
        .connect(addr(BULK_IP, 9100))
        .expect("connect to bulk");
    const READ: usize = 256 * 1024;
    let mut buf = vec![0u8; READ];
    // One period-aligned copy of the pattern longer than any read: compared with memcmp (a
    // byte-by-byte check in a debug build would be slower than the transfer itself).
    let pattern: Vec<u8> = (0..(READ as u64 + 251)).map(pattern_byte).collect();
    let mut got = 0u64;
    let check = |data: &[u8], got: &mut u64| {
        let start = (*got % 251) as usize;
        assert!(
            data == &pattern[start..start + data.len()],
            "bytes {}..{} of the stream are wrong",
            *got,
            *got + data.len() as u64
        );
        *got += data.len() as u64;
    };
    while got < 20 * 1024 * 1024 {
        let n = stream.read(&mut buf).expect("reading the first 20 MB");
        assert!(n > 0, "stream ended after {got} bytes");
        check(&buf[..n], &mut got);
    }
    thread::sleep(Duration::from_millis(300)); // buffers fill up; the sender blocks
    sender.kill();
    let killed = Instant::now();
    let end = loop {
        match stream.read(&mut buf) {
            Ok(0) => break Ok(()),
            Ok(n) => check(&buf[..n], &mut got),
            Err(e) => break Err(e),
        }
    };
    let took = killed.elapsed();
    assert!(
        took < Duration::from_secs(1),
        "the client saw the end {took:?} after the backend was killed ({end:?})"
    );
    if let Err(e) = &end {
        assert!(
            matches!(
                e.kind(),
                io::ErrorKind::ConnectionReset | io::ErrorKind::ConnectionAborted
            ),
            "the stream ended with {e} ({:?}) instead of EOF or reset",
            e.kind()
        );
    }
    assert!(
        got < TOTAL,
        "the whole stream arrived: the kill was not mid-transfer"
    );
    eprintln!("backend killed after the client got {got} bytes; end {end:?} after {took:?}");
    drop(stream);
    wait_for(
        "the connection to leave the proxy",
        Duration::from_secs(5),
        || (stat(&w.client, "connections_active") == 0).then_some(()),
    );
    drop(sidecar);
}

/// The client aborts (SO_LINGER 0: RST) while the backend is waiting for more: the backend
/// sees its connection end (EOF or reset) within a second.
#[test]
fn client_reset_closes_the_upstream_promptly() {
    let w = MeshWorld::new("rel-ckill");
    let sink = service_with_pods_yaml("sink", SINK_IP, 9101, &[("sink-0", w.v1.ip)]);
    let dir = config(&w, TCP_ECHO_DESTINATION_RULE, None, &sink);
    let listener = w.v1.listen(w.v1.addr(9101)).expect("sink listener");
    let (tx, rx) = mpsc::channel::<(u64, Result<(), String>, Instant)>();
    let (got_tx, got_rx) = mpsc::channel::<()>();
    thread::spawn(move || {
        let Ok((mut s, _)) = listener.accept() else {
            return;
        };
        let _ = s.set_read_timeout(Some(Duration::from_secs(10)));
        let mut n = 0u64;
        let mut buf = [0u8; 64 * 1024];
        let end = loop {
            match s.read(&mut buf) {
                Ok(0) => break Ok(()),
                Ok(k) => {
                    n += k as u64;
                    if n >= 64 * 1024 {
                        let _ = got_tx.send(());
                    }
                }
                Err(e) => break Err(format!("{e} ({:?})", e.kind())),
            }
        };
        let _ = tx.send((n, end, Instant::now()));
    });
    let sidecar = w.start_sidecar(&[&dir], &[]);
    let mut client = w
        .client
        .connect(addr(SINK_IP, 9101))
        .expect("connect to sink");
    client
        .write_all(&vec![b'x'; 64 * 1024])
        .expect("send 64 KiB");
    got_rx
        .recv_timeout(Duration::from_secs(5))
        .expect("the sink received the client's bytes");
    let aborted = Instant::now();
    abort_stream(client);
    let (n, end, at) = rx
        .recv_timeout(Duration::from_secs(5))
        .expect("the sink's connection ended after the client's reset");
    let took = at.duration_since(aborted);
    assert!(
        took < Duration::from_secs(1),
        "the upstream saw the end {took:?} after the client's reset ({end:?})"
    );
    if let Err(e) = &end {
        assert!(
            e.contains("ConnectionReset"),
            "the upstream's read ended with {e}"
        );
    }
    assert_eq!(n, 64 * 1024, "bytes before the reset all arrived");
    let line = wait_close_logged(&sidecar, "ClientReset");
    assert!(line.contains("response_flags=\"DC\""), "{line}");
}

// ---------------------------------------------------------------------------------------------
// Scale and descriptors

/// 3 000 connections held open at once through one proxy, each echoing twice; then all are
/// closed. Every reply is right, every close is a clean `done`, and the proxy's descriptors
/// return to where they were (sockets exactly; the splice pipe pool may keep up to 32 pipes).
#[test]
fn three_thousand_concurrent_connections_leave_no_descriptors_behind() {
    const N: usize = 3000;
    let limit = raise_nofile_soft_limit(20_000);
    assert!(
        limit >= N as u64 + 1000,
        "this test holds {N} sockets: the open-file limit {limit} is too low (raise the hard \
         limit, e.g. `ulimit -Hn 20000`)"
    );
    let (w, sidecar) = world("rel-3000", TCP_ECHO_DESTINATION_RULE, None, "", &[]);
    let pid = sidecar.proxy.pid();
    assert_eq!(w.prefixes(9000, 2).len(), 2); // warm-up: lazily created state exists
    wait_for("warm-up closed", Duration::from_secs(5), || {
        (stat(&w.client, "connections_active") == 0).then_some(())
    });
    let baseline = fd_counts(pid);

    let started = Instant::now();
    let mut streams: Vec<TcpStream> = connect_many(&w.client, tcp_echo_addr(9000), N)
        .into_iter()
        .enumerate()
        .map(|(i, s)| s.unwrap_or_else(|e| panic!("connection {i}: {e}")))
        .collect();
    let mut ones = 0;
    for round in 0..2 {
        for (i, s) in streams.iter_mut().enumerate() {
            s.write_all(format!("c{i} r{round}\n").as_bytes())
                .unwrap_or_else(|e| panic!("connection {i} round {round}: write: {e}"));
        }
        for (i, s) in streams.iter_mut().enumerate() {
            let reply =
                read_one_line(s).unwrap_or_else(|e| panic!("connection {i} round {round}: {e}"));
            let want = format!(" c{i} r{round}\n");
            assert!(
                reply.ends_with(&want) && (reply.starts_with("one ") || reply.starts_with("two ")),
                "connection {i} round {round}: {reply:?}"
            );
            if round == 0 && reply.starts_with("one ") {
                ones += 1;
            }
        }
    }
    assert_eq!(stat(&w.client, "connections_active"), N as u64);
    let during = fd_counts(pid);
    // (The baseline may include an admin connection still closing, hence the slack of 2.)
    assert!(
        during.sockets + 2 >= baseline.sockets + 2 * N,
        "two sockets per connection: {baseline:?} → {during:?}"
    );
    eprintln!(
        "{N} connections open and echoed twice in {:?} ({ones} to v1); proxy fds {baseline:?} → \
         {during:?}",
        started.elapsed()
    );

    drop(streams);
    wait_for("every connection closed", Duration::from_secs(20), || {
        (stat(&w.client, "connections_active") == 0).then_some(())
    });
    let after = wait_for(
        "the proxy's sockets back to the baseline",
        Duration::from_secs(10),
        || {
            let c = fd_counts(pid);
            (c.sockets <= baseline.sockets).then_some(c)
        },
    );
    assert!(
        after.pipes <= baseline.pipes + 64 && after.other == baseline.other,
        "descriptors left behind: {baseline:?} → {after:?}"
    );
    let reasons = close_reasons(&w.client);
    let done: f64 = reasons
        .iter()
        .filter(|(r, _)| r == "done")
        .map(|(_, v)| v)
        .sum();
    let total: f64 = reasons.iter().map(|(_, v)| v).sum();
    assert_eq!(done, (N + 2) as f64, "{reasons:?}");
    assert_eq!(total, done, "only clean closes: {reasons:?}");
    assert_eq!(stat(&w.client, "connect_failures"), 0);
}

/// The proxy runs with an open-file limit of 200 (`prlimit`) and gets 300 connections: it
/// runs out of descriptors, keeps running (accepting pauses with backoff), the connections
/// it holds keep working, and once the clients close, new connections are served again and
/// `/ready` answers 200.
#[test]
fn out_of_descriptors_pauses_accepting_and_recovers() {
    const N: usize = 300;
    raise_nofile_soft_limit(20_000);
    let w = MeshWorld::new("rel-emfile");
    let dir = config(&w, TCP_ECHO_DESTINATION_RULE, Some(&all_to_v1()), "");
    // `prlimit --nofile=200:200 veer proxy ...`: prlimit sets its own limit and execs in
    // place, so the proxy starts with a hard limit of 200 it cannot raise.
    let mut sidecar = sidecar_under(&w, &dir, &["prlimit", "--nofile=200:200"]);
    let pid = sidecar.proxy.pid();
    let limits = std::fs::read_to_string(format!("/proc/{pid}/limits")).unwrap_or_default();
    assert!(
        log_lines_with(&limits, &["Max open files", "200", "200"]).len() == 1,
        "the proxy runs with nofile 200:\n{limits}"
    );

    let mut streams: Vec<TcpStream> = connect_many(&w.client, tcp_echo_addr(9000), N)
        .into_iter()
        .enumerate()
        .map(|(i, s)| {
            s.unwrap_or_else(|e| {
                panic!("connection {i} refused (it should wait in the backlog): {e}")
            })
        })
        .collect();
    for (i, s) in streams.iter_mut().enumerate() {
        s.write_all(format!("fd {i}\n").as_bytes())
            .unwrap_or_else(|e| panic!("connection {i}: write: {e}"));
    }
    // The default connection limit is derived from the descriptor limit, so the proxy
    // normally pauses at that limit before accept() itself runs out; either way it must
    // pause, not drop connections.
    wait_for(
        "the proxy to log that accepting paused (connection limit or out of descriptors)",
        Duration::from_secs(10),
        || {
            let log = sidecar.proxy.stderr();
            (!log_lines_with(&log, &["accept failed", "open files"]).is_empty()
                || !log_lines_with(&log, &["connection limit reached"]).is_empty())
            .then_some(())
        },
    );
    thread::sleep(Duration::from_millis(500));
    // Which connections are answered, which were closed unanswered, which still wait.
    let (mut answered, mut closed, mut waiting) = (Vec::new(), Vec::new(), Vec::new());
    for (i, s) in streams.iter_mut().enumerate() {
        s.set_nonblocking(true).expect("nonblocking");
        let mut buf = [0u8; 256];
        match s.read(&mut buf) {
            Ok(0) => closed.push(i),
            Ok(n) => {
                assert_eq!(
                    &buf[..n],
                    format!("one fd {i}\n").as_bytes(),
                    "connection {i}"
                );
                answered.push(i);
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => waiting.push(i),
            Err(_) => closed.push(i),
        }
        s.set_nonblocking(false).expect("blocking");
    }
    eprintln!(
        "at the descriptor limit: {} answered, {} closed unanswered, {} waiting; proxy fds {:?}",
        answered.len(),
        closed.len(),
        waiting.len(),
        fd_counts(pid)
    );
    assert!(
        sidecar.proxy.is_running(),
        "the proxy died at its descriptor limit"
    );
    assert!(!answered.is_empty(), "no connection was served at all");
    assert!(
        !waiting.is_empty(),
        "every connection was answered or closed: the limit was never reached"
    );
    // Connections already relayed keep working.
    for &i in answered.iter().take(20) {
        let reply = exchange_line(&mut streams[i], &format!("again {i}"))
            .unwrap_or_else(|e| panic!("held connection {i} stopped working: {e}"));
        assert_eq!(reply, format!("one again {i}\n"));
    }

    drop(streams);
    let recovered = Instant::now();
    let reply = wait_for(
        "a new connection to be served after the clients closed",
        Duration::from_secs(15),
        || {
            w.client
                .exchange(tcp_echo_addr(9000), &["recovered"])
                .ok()
                .filter(|r| !r.is_empty())
        },
    );
    assert_eq!(reply, "one recovered\n");
    eprintln!(
        "recovered {:?} after the clients closed",
        recovered.elapsed()
    );
    let (code, body) = w.client.admin_get("/ready").expect("GET /ready");
    assert_eq!(code, 200, "/ready after recovering: {body}");
    assert!(sidecar.proxy.is_running(), "the proxy exited");
    let log = sidecar.proxy.stderr();
    assert!(!log.contains("panicked"), "the proxy panicked:\n{log}");
    assert!(
        closed.is_empty(),
        "{} connections were closed unanswered at the descriptor limit instead of waiting \
         in the backlog: {closed:?}; close reasons {:?}",
        closed.len(),
        close_reasons(&w.client)
    );
}

/// The proxy raises its soft open-file limit to the hard limit at start (a sidecar holds two
/// descriptors per connection; the usual soft default of 1024 is far too low).
#[test]
fn open_file_limit_is_raised_at_start() {
    let w = MeshWorld::new("rel-nofile");
    let dir = config(&w, TCP_ECHO_DESTINATION_RULE, Some(&all_to_v1()), "");
    let sidecar = sidecar_under(&w, &dir, &["prlimit", "--nofile=1024:4096"]);
    let limits =
        std::fs::read_to_string(format!("/proc/{}/limits", sidecar.proxy.pid())).expect("limits");
    let line = log_lines_with(&limits, &["Max open files"]).join("");
    let fields: Vec<&str> = line.split_whitespace().collect();
    assert_eq!(
        fields.get(3..5),
        Some(&["4096", "4096"][..]),
        "soft limit raised to the hard limit: {line}"
    );
    assert_eq!(
        w.client
            .exchange(tcp_echo_addr(9000), &["limit"])
            .expect("exchange"),
        "one limit\n"
    );
}

/// `--max-connections 10`: with 10 connections open, an 11th is not refused: it waits in the
/// backlog unanswered, and is served as soon as one of the 10 closes.
/// `veer_accept_paused_total` counts the pause.
#[test]
fn process_connection_limit_makes_the_eleventh_wait() {
    let (w, _sidecar) = world(
        "rel-maxconn",
        TCP_ECHO_DESTINATION_RULE,
        Some(&all_to_v1()),
        "",
        &["--max-connections", "10"],
    );
    let mut sessions: Vec<EchoSession> = (0..10)
        .map(|i| {
            EchoSession::start(
                &w.client,
                tcp_echo_addr(9000),
                &format!("held{i}"),
                Duration::from_millis(200),
            )
            .unwrap_or_else(|e| {
                panic!(
                    "connection {} of 10 was not served under --max-connections 10 (the limit \
                     should let 10 connections through): {e}",
                    i + 1
                )
            })
        })
        .collect();
    let mut eleventh = w
        .client
        .connect(tcp_echo_addr(9000))
        .expect("the 11th connection is not refused");
    eleventh
        .write_all(b"eleventh\n")
        .expect("write on the 11th");
    eleventh
        .set_read_timeout(Some(Duration::from_millis(800)))
        .expect("timeout");
    let mut buf = [0u8; 64];
    match eleventh.read(&mut buf) {
        Err(e)
            if matches!(
                e.kind(),
                io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
            ) => {}
        other => panic!("the 11th connection should wait unanswered, got {other:?}"),
    }
    assert!(
        metric(&w.client, "veer_accept_paused_total") > 0.0,
        "veer_accept_paused_total counts the pause"
    );
    for s in &sessions {
        assert!(s.is_alive(), "{} failed while the 11th waited", s.tag);
    }
    let first = sessions.remove(0);
    first.finish().expect("closing one of the 10");
    let freed = Instant::now();
    eleventh
        .set_read_timeout(Some(Duration::from_secs(3)))
        .expect("timeout");
    let reply = read_one_line(&mut eleventh).expect("the 11th is served once one closes");
    assert_eq!(reply, "one eleventh\n");
    assert!(
        freed.elapsed() < Duration::from_secs(2),
        "{:?}",
        freed.elapsed()
    );
    eleventh.shutdown(Shutdown::Write).expect("half-close");
    let (rest, end) = read_until_closed(&mut eleventh);
    assert!(rest.is_empty() && end.is_ok(), "{rest:?} {end:?}");
    for s in sessions {
        s.finish().expect("a held connection");
    }
}

/// DestinationRule `maxConnections: 2`: with two connections open, a third is closed at once
/// without a reply (never queued), counted as an overflow in `/clusters` and logged with
/// `UO`; after one closes, connections are served again.
#[test]
fn cluster_max_connections_refuses_the_overflow_fast() {
    let dr = destination_rule(
        "    connectionPool:
      tcp: {maxConnections: 2}
",
    );
    let (w, sidecar) = world("rel-overflow", &dr, Some(&all_to_v1()), "", &[]);
    let sessions: Vec<EchoSession> = (0..2)
        .map(|i| {
            EchoSession::start(
                &w.client,
                tcp_echo_addr(9000),
                &format!("held{i}"),
                Duration::from_millis(200),
            )
            .unwrap_or_else(|e| panic!("connection {i}: {e}"))
        })
        .collect();
    let t = Instant::now();
    let mut third = w.client.connect(tcp_echo_addr(9000)).expect("connect");
    let _ = third.write_all(b"third\n");
    assert_closed_without_reply(&mut third, "the 3rd connection over maxConnections 2");
    assert!(
        t.elapsed() < Duration::from_millis(500),
        "refused fast, not queued: {:?}",
        t.elapsed()
    );
    let c = find_cluster(&admin_json(&w.client, "/clusters"), "|9000|v1|");
    assert_eq!(c["counters"]["overflows"], 1, "{c}");
    assert_eq!(c["counters"]["active_connections"], 2, "{c}");
    let line = wait_close_logged(&sidecar, "Overflow");
    assert!(line.contains("response_flags=\"UO\""), "{line}");
    assert_eq!(closed_by_reason(&w.client, "overflow"), 1.0);
    let (scrape, _) = scrape_prometheus(&w.client, "/stats/prometheus");
    assert_eq!(
        metric_sum(&scrape, "istio_tcp_connections_closed_total", |l| {
            l.get("response_flags") == Some("UO")
        }),
        1.0
    );
    for s in &sessions {
        assert!(s.is_alive(), "{} failed", s.tag);
    }
    let mut sessions = sessions;
    sessions.pop().expect("one").finish().expect("closing one");
    let reply = wait_for("a connection served again", Duration::from_secs(3), || {
        w.client.exchange(tcp_echo_addr(9000), &["fits again"]).ok()
    });
    assert_eq!(reply, "one fits again\n");
    for s in sessions {
        s.finish().expect("held connection");
    }
}

// ---------------------------------------------------------------------------------------------
// Timeouts

/// `idleTimeout: 1s`: a connection with nothing moving either way is closed after about a
/// second (reason `IdleTimeout` in the access log and the metric), while a connection with a
/// line every 300 ms outlives it.
#[test]
fn idle_timeout_closes_only_the_idle_connection() {
    let dr = destination_rule(
        "    connectionPool:
      tcp: {idleTimeout: 1s}
",
    );
    let (w, sidecar) = world("rel-idle", &dr, Some(&all_to_v1()), "", &[]);
    let busy = EchoSession::start(
        &w.client,
        tcp_echo_addr(9000),
        "busy",
        Duration::from_millis(300),
    )
    .expect("busy connection");
    let mut idle = w.client.connect(tcp_echo_addr(9000)).expect("connect");
    assert_eq!(
        exchange_line(&mut idle, "then quiet").expect("exchange"),
        "one then quiet\n"
    );
    let quiet_since = Instant::now();
    let (rest, end) = read_until_closed(&mut idle);
    let took = quiet_since.elapsed();
    assert!(rest.is_empty() && end.is_ok(), "{rest:?} {end:?}");
    assert!(
        // The watchdog notices activity when it wakes, so the close comes between one and
        // two idle timeouts after the last byte.
        took >= Duration::from_millis(900) && took < Duration::from_millis(2500),
        "the idle connection was closed after {took:?}"
    );
    let line = wait_close_logged(&sidecar, "IdleTimeout");
    assert!(line.contains("response_flags=\"SI\""), "{line}");
    assert_eq!(closed_by_reason(&w.client, "idle_timeout"), 1.0);
    thread::sleep(Duration::from_millis(800));
    assert!(busy.is_alive(), "the busy connection was closed");
    let report = busy
        .finish()
        .expect("the busy connection outlives the idle timeout");
    assert!(report.lines >= 6, "{report:?}");
    assert_eq!(closed_by_reason(&w.client, "idle_timeout"), 1.0);
}

/// The access log has one line per connection, at close (Envoy's and Istio's default);
/// `--access-log-on-connect` adds one when the upstream connection is made.
#[test]
fn access_log_has_one_line_per_connection_unless_the_open_line_is_asked_for() {
    for (tag, flags, opened) in [
        ("rel-log1", &[][..], 0),
        ("rel-log2", &["--access-log-on-connect"][..], 1),
    ] {
        let (w, sidecar) = world(
            tag,
            TCP_ECHO_DESTINATION_RULE,
            Some(&all_to_v1()),
            "",
            flags,
        );
        let mut conn = w.client.connect(tcp_echo_addr(9000)).expect("connect");
        assert_eq!(
            exchange_line(&mut conn, "logged").expect("exchange"),
            "one logged\n"
        );
        drop(conn);
        let line = wait_close_logged(&sidecar, "Done");
        assert!(line.contains("bytes_to_upstream=7"), "{line}");
        let log = sidecar.proxy.stderr();
        let open_lines = log_lines_with(&log, &["tcp connection opened"]);
        assert_eq!(open_lines.len(), opened, "{flags:?}: {open_lines:?}");
    }
}

/// `--half-close-timeout 1s`: after the client's FIN the backend keeps sending for 2.4 s (a
/// tick every 200 ms), which all arrives; then the backend goes quiet without closing, and
/// about a second later the proxy ends the pair (reason `HalfCloseTimeout`), closing the
/// upstream too.
#[test]
fn half_close_keeps_flowing_then_times_out() {
    let w = MeshWorld::new("rel-halfclose");
    let linger = service_with_pods_yaml("linger", LINGER_IP, 9102, &[("linger-0", w.v1.ip)]);
    let dir = config(&w, TCP_ECHO_DESTINATION_RULE, None, &linger);
    let listener = w.v1.listen(w.v1.addr(9102)).expect("listener");
    let (tx, rx) = mpsc::channel::<String>();
    let (probe_tx, probe_rx) = mpsc::channel::<()>();
    thread::spawn(move || {
        let Ok((mut s, _)) = listener.accept() else {
            return;
        };
        let _ = s.set_read_timeout(Some(Duration::from_secs(10)));
        let (got, end) = read_until_closed(&mut s); // until the client's FIN
        if end.is_err() || got != b"bye\n" {
            let _ = tx.send(format!("reading the request: {got:?} {end:?}"));
            return;
        }
        for k in 0..12 {
            if s.write_all(format!("tick {k}\n").as_bytes()).is_err() {
                let _ = tx.send(format!("tick {k} failed"));
                return;
            }
            thread::sleep(Duration::from_millis(200));
        }
        // Silent now, never closing. Once the client has seen the end, writing shows whether
        // the proxy closed this side too (the first write draws a reset, the next fails).
        let _ = probe_rx.recv_timeout(Duration::from_secs(15));
        let mut result = "the upstream side is still open".to_string();
        for _ in 0..10 {
            if let Err(e) = s.write_all(b"late\n") {
                result = format!("upstream closed: {e}");
                break;
            }
            thread::sleep(Duration::from_millis(50));
        }
        let _ = tx.send(result);
    });
    let sidecar = w.start_sidecar(&[&dir], &["--half-close-timeout", "1s"]);
    let mut client = w.client.connect(addr(LINGER_IP, 9102)).expect("connect");
    client.write_all(b"bye\n").expect("write");
    client.shutdown(Shutdown::Write).expect("half-close");
    let fin = Instant::now();
    let (got, end) = read_until_closed(&mut client);
    let took = fin.elapsed();
    let _ = probe_tx.send(());
    let want: String = (0..12).map(|k| format!("tick {k}\n")).collect();
    assert_eq!(String::from_utf8_lossy(&got), want, "{end:?}");
    assert!(end.is_ok(), "{end:?}");
    // Last tick at 2.2 s, then 1 s (up to 2 s: see the idle test) of silence.
    assert!(
        took >= Duration::from_millis(3100) && took < Duration::from_millis(5500),
        "closed {took:?} after the client's FIN (2.4 s of ticks, then ~1 s quiet)"
    );
    let upstream = rx
        .recv_timeout(Duration::from_secs(5))
        .expect("the backend thread reports");
    assert!(upstream.starts_with("upstream closed"), "{upstream}");
    let line = wait_close_logged(&sidecar, "HalfCloseTimeout");
    assert!(line.contains("response_flags=\"SI\""), "{line}");
    assert_eq!(closed_by_reason(&w.client, "half_close_timeout"), 1.0);
}

/// `maxConnectionDuration: 1s`: a connection exchanging a line every 100 ms is closed after
/// about a second anyway (reason `MaxConnectionDuration`).
#[test]
fn max_connection_duration_closes_an_active_connection() {
    let dr = destination_rule(
        "    connectionPool:
      tcp: {maxConnectionDuration: 1s}
",
    );
    let (w, sidecar) = world("rel-maxdur", &dr, Some(&all_to_v1()), "", &[]);
    let started = Instant::now();
    let session = EchoSession::start(
        &w.client,
        tcp_echo_addr(9000),
        "active",
        Duration::from_millis(100),
    )
    .expect("connection");
    wait_for(
        "the active connection to be closed",
        Duration::from_secs(4),
        || (!session.is_alive()).then_some(()),
    );
    let took = started.elapsed();
    assert!(
        took >= Duration::from_millis(900) && took < Duration::from_secs(3),
        "closed after {took:?}"
    );
    let echoed = session.echoed();
    assert!(echoed >= 5, "the connection was active: {echoed} lines");
    let err = session.finish().expect_err("the connection was cut");
    eprintln!("session ended: {err}");
    let line = wait_close_logged(&sidecar, "MaxConnectionDuration");
    assert!(line.contains("response_flags=\"DT\""), "{line}");
    assert_eq!(closed_by_reason(&w.client, "max_connection_duration"), 1.0);
}

/// `tcpKeepalive` is applied to upstream sockets: `ss -o` in the proxy's pod shows a
/// keepalive timer on the socket to the backend.
#[test]
fn tcp_keepalive_is_set_on_the_upstream_socket() {
    let dr = destination_rule(
        "    connectionPool:
      tcp:
        tcpKeepalive: {time: 7s, interval: 3s, probes: 2}
",
    );
    let (w, _sidecar) = world("rel-keepalive", &dr, Some(&all_to_v1()), "", &[]);
    let session = EchoSession::start(
        &w.client,
        tcp_echo_addr(9000),
        "kept",
        Duration::from_millis(500),
    )
    .expect("connection");
    let upstream = w.v1.addr(9000).to_string();
    let line = wait_for("the upstream socket in ss", Duration::from_secs(3), || {
        let out = w.client.run("ss", &["-Htno", "state", "established"]);
        out.lines()
            .find(|l| l.split_whitespace().any(|f| f == upstream))
            .map(str::to_string)
    });
    assert!(
        line.contains("timer:(keepalive,"),
        "no keepalive timer on the upstream socket: {line}"
    );
    // The timer counts down from `time` (7 s), not the kernel default (2 h).
    let secs: f64 = line
        .split("timer:(keepalive,")
        .nth(1)
        .and_then(|r| r.split(',').next())
        .map(|t| {
            if let Some(ms) = t.strip_suffix("ms") {
                ms.parse::<f64>().unwrap_or(f64::MAX) / 1000.0
            } else if let Some(s) = t.strip_suffix("sec") {
                s.parse().unwrap_or(f64::MAX)
            } else if let Some(m) = t.strip_suffix("min") {
                m.parse::<f64>().unwrap_or(f64::MAX) * 60.0
            } else {
                f64::MAX
            }
        })
        .unwrap_or(f64::MAX);
    assert!(secs <= 7.0, "keepalive timer {secs}s: {line}");
    session.finish().expect("connection");
}

// ---------------------------------------------------------------------------------------------
// Shutdown and start-up

/// SIGTERM with a connection open: the connection keeps working during the drain, finishes
/// (last line, half-close, reply, EOF) within `--drain-timeout`, and the proxy then exits 0
/// without waiting for the deadline.
#[test]
fn sigterm_lets_the_open_connection_finish_then_exits_0() {
    let (w, mut sidecar) = world(
        "rel-term",
        TCP_ECHO_DESTINATION_RULE,
        Some(&all_to_v1()),
        "",
        &["--drain-timeout", "4s"],
    );
    let session = EchoSession::start(
        &w.client,
        tcp_echo_addr(9000),
        "draining",
        Duration::from_millis(100),
    )
    .expect("connection");
    thread::sleep(Duration::from_millis(200));
    sigterm(&sidecar);
    let term = Instant::now();
    let echoed = session.echoed();
    thread::sleep(Duration::from_millis(500));
    assert!(
        session.echoed() > echoed,
        "the connection kept working during the drain"
    );
    let report = session
        .finish()
        .expect("the connection finishes during the drain");
    assert_eq!(report.prefix, "one");
    let status = sidecar
        .proxy
        .wait_timeout(Duration::from_secs(4))
        .expect("the proxy exits after its last connection closed");
    let took = term.elapsed();
    assert_eq!(status.code(), Some(0), "exit status {status}");
    assert!(
        took < Duration::from_millis(2500),
        "exited {took:?} after SIGTERM: it should not wait for the 4 s deadline"
    );
    assert!(
        !log_lines_with(&sidecar.proxy.stderr(), &["draining before exit"]).is_empty(),
        "the drain is logged"
    );
}

/// SIGTERM with a connection that never finishes: the proxy exits 0 at the drain deadline
/// (2 s, give or take a second), and the connection is closed.
#[test]
fn sigterm_closes_what_is_left_at_the_drain_deadline() {
    let (w, mut sidecar) = world(
        "rel-deadline",
        TCP_ECHO_DESTINATION_RULE,
        Some(&all_to_v1()),
        "",
        &["--drain-timeout", "2s"],
    );
    let session = EchoSession::start(
        &w.client,
        tcp_echo_addr(9000),
        "stubborn",
        Duration::from_millis(100),
    )
    .expect("connection");
    thread::sleep(Duration::from_millis(200));
    sigterm(&sidecar);
    let term = Instant::now();
    let status = sidecar
        .proxy
        .wait_timeout(Duration::from_secs(6))
        .expect("the proxy exits at the drain deadline");
    let took = term.elapsed();
    assert_eq!(status.code(), Some(0), "exit status {status}");
    assert!(
        took >= Duration::from_millis(1900) && took < Duration::from_millis(3200),
        "exited {took:?} after SIGTERM (drain timeout 2s)"
    );
    wait_for(
        "the connection to be closed",
        Duration::from_secs(2),
        || (!session.is_alive()).then_some(()),
    );
    session
        .finish()
        .expect_err("the connection was closed at the deadline");
    assert!(
        !log_lines_with(&sidecar.proxy.stderr(), &["drain deadline passed"]).is_empty(),
        "the deadline is logged"
    );
    // The access log says why the connection ended (CloseReason::Drain, flag DT).
    let closed = log_lines_with(&sidecar.proxy.stderr(), &["tcp connection closed"]).join("\n");
    assert!(
        closed.contains("reason=Drain") && closed.contains("response_flags=\"DT\""),
        "the connection cut at the drain deadline is logged with reason=Drain, DT: {closed}"
    );
}

/// The capture listeners are bound before the config is read: while the proxy is blocked
/// reading its config (a FIFO nobody has written yet), an application's connections are not
/// refused but wait in the backlog, and are served once the config arrives.
#[test]
fn connections_made_before_the_config_is_loaded_wait_and_are_served() {
    let w = MeshWorld::new("rel-early");
    let dir = w.cluster.config_dir("config");
    write_file(&dir.join("endpoints.yaml"), &w.endpoints_yaml(true));
    write_file(
        &dir.join("destination-rule.yaml"),
        TCP_ECHO_DESTINATION_RULE,
    );
    let fifo = w.cluster.dir.join("late-virtual-service.yaml");
    let mut mk = std::process::Command::new("mkfifo");
    mk.args(["-m", "0644"]).arg(&fifo);
    must(mk);
    install_capture(&w.client);
    let dir_s = dir.display().to_string();
    let fifo_s = fifo.display().to_string();
    let proxy = w.client.spawn_as(
        PROXY_UID,
        PROXY_UID,
        veer_bin(),
        &[
            "proxy",
            "--config",
            &dir_s,
            "--config",
            &fifo_s,
            "--watch",
            "false",
            "--admin",
            "127.0.0.1:15000",
            "--pod-labels",
            "app=sleep",
        ],
    );
    let mut sidecar = Sidecar {
        proxy,
        pod: w.client.clone(),
    };
    wait_for(
        "the outbound capture port to listen",
        Duration::from_secs(10),
        || {
            let out = w.client.run("ss", &["-Htln", "sport = :15001"]);
            (!out.trim().is_empty()).then_some(())
        },
    );
    assert!(sidecar.proxy.is_running(), "{}", sidecar.proxy.stderr());
    assert!(
        !matches!(w.client.admin_get("/ready"), Ok((200, _))),
        "ready before the config was read"
    );
    let mut early: Vec<TcpStream> = (0..5)
        .map(|i| {
            let mut s = w
                .client
                .connect(tcp_echo_addr(9000))
                .unwrap_or_else(|e| panic!("early connection {i} refused: {e}"));
            s.write_all(format!("early {i}\n").as_bytes())
                .expect("write");
            s
        })
        .collect();
    thread::sleep(Duration::from_millis(300));
    {
        let s = &mut early[0];
        s.set_nonblocking(true).expect("nonblocking");
        let mut b = [0u8; 16];
        assert!(
            matches!(s.read(&mut b), Err(e) if e.kind() == io::ErrorKind::WouldBlock),
            "answered before the config was loaded?"
        );
        s.set_nonblocking(false).expect("blocking");
    }
    write_fifo(&fifo, &all_to_v1());
    let loaded = Instant::now();
    for (i, s) in early.iter_mut().enumerate() {
        let reply = read_one_line(s).unwrap_or_else(|e| panic!("early connection {i}: {e}"));
        assert_eq!(
            reply,
            format!("one early {i}\n"),
            "routed by the late VirtualService"
        );
    }
    eprintln!(
        "early connections served {:?} after the config arrived",
        loaded.elapsed()
    );
    sidecar.wait_ready(READY_TIMEOUT);
}

/// Writes `text` into a FIFO whose reader is waiting (non-blocking open: fails fast with
/// ENXIO instead of hanging if the reader is gone).
fn write_fifo(path: &Path, text: &str) {
    use std::os::unix::fs::OpenOptionsExt;
    let deadline = Instant::now() + Duration::from_secs(5);
    let mut f = loop {
        match std::fs::OpenOptions::new()
            .write(true)
            .custom_flags(nix::libc::O_NONBLOCK)
            .open(path)
        {
            Ok(f) => break f,
            Err(e) if Instant::now() < deadline => {
                eprintln!("opening the FIFO: {e}; retrying");
                thread::sleep(Duration::from_millis(50));
            }
            Err(e) => panic!("nobody reads the FIFO {}: {e}", path.display()),
        }
    };
    f.write_all(text.as_bytes()).expect("write the FIFO");
}
