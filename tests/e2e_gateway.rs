//! End-to-end tests of gateway mode (`veer proxy --mode gateway`): the seed's ingress
//! gateway for TCP (Istio's "TCP Traffic Shifting" through `istio-ingressgateway`), a second
//! Gateway port (the seed's 28674), TLS passthrough routed by SNI, Gateway servers added and
//! removed by reload, `veer gateway-service`, and a privileged port the proxy cannot bind.
//!
//! Topology (network-namespace pods, see `tests/common/mod.rs`): `istio-ingressgateway` runs
//! `veer proxy --mode gateway --gateway-selector istio=ingressgateway` as uid 1337, without
//! capture; `external` is a client outside the mesh that dials the gateway pod's IP on the
//! Gateway server port; `tcp-echo-v1` / `tcp-echo-v2` run `veer echo 9000,9001 one|two`.
//!
//! Needs root, `ip`, `iptables` and `setpriv` (`bash scripts/install-deps.sh`).

mod common;

use std::io::{ErrorKind, Write};
use std::net::Shutdown;
use std::path::{Path, PathBuf};
use std::thread;
use std::time::Duration;

use common::*;

/// The seed's manifests (the blog post "Istio - TCP Traffic (TCP Routing)"), as written,
/// blank lines and the `extensions/v1beta1` Deployments (which veer skips) included. The only
/// fix: the post's indentation is made of non-breaking spaces (U+00A0, a web-copy artifact
/// YAML does not accept as indentation), replaced here by plain spaces.
const SEED: &str = concat!(
    include_str!("fixtures/seed/tcp-echo-workloads.yaml"),
    "---\n",
    include_str!("fixtures/seed/tcp-echo-gateway.yaml"),
    "---\n",
    include_str!("fixtures/seed/tcp-echo-destination-rule.yaml"),
);

/// The seed's second half: the same Gateway and VirtualService on port 28674 instead of 31400
/// ("if you want to use ports other than 31400 in Gateway (e.g. 28674, etc.)").
fn seed_on_28674() -> String {
    let s = SEED.replace("31400", "28674");
    assert_eq!(s.matches("28674").count(), 2, "Gateway port and match port");
    s
}

const GATEWAY_SELECTOR: &str = "istio=ingressgateway";

/// The ingress topology; field order: processes die before the cluster is torn down.
struct Ingress {
    _echo: Vec<Proc>,
    gateway: Pod,
    external: Pod,
    v1: Pod,
    v2: Pod,
    cluster: Cluster,
}

impl Ingress {
    fn new(tag: &str) -> Ingress {
        let mut cluster = Cluster::new(tag);
        let gateway = cluster.add_pod("istio-ingressgateway");
        let external = cluster.add_pod("external");
        let v1 = cluster.add_pod("tcp-echo-v1");
        let v2 = cluster.add_pod("tcp-echo-v2");
        let echo = vec![start_tcp_echo(&v1, "one"), start_tcp_echo(&v2, "two")];
        Ingress {
            _echo: echo,
            gateway,
            external,
            v1,
            v2,
            cluster,
        }
    }

    /// The Pods the Deployments would have created (labels and `status.podIP`).
    fn pods_yaml(&self) -> String {
        tcp_echo_pods_yaml(&[(&self.v1, "v1"), (&self.v2, "v2")])
    }

    /// A config dir holding `gateway.yaml` (the given manifests) and the generated Pods.
    fn config(&self, manifests: &str) -> PathBuf {
        let dir = self.cluster.config_dir("config");
        write_file(&dir.join("gateway.yaml"), manifests);
        write_file(&dir.join("pods.yaml"), &self.pods_yaml());
        dir
    }

    /// Starts the gateway proxy (uid 1337, no capture) and waits for `/ready`.
    fn start(&self, config: &Path, extra: &[&str]) -> Sidecar {
        let mut args = vec!["--mode", "gateway", "--gateway-selector", GATEWAY_SELECTOR];
        args.extend_from_slice(extra);
        Sidecar::start(&self.gateway, &[config], &args)
    }

    /// One connection from the external client to the gateway's `port`: a line, half-close,
    /// the reply. Returns the backend's prefix after checking the reply.
    fn prefix_via(&self, port: u16, i: usize) -> String {
        let line = format!("hello {port} {i}");
        let reply = self
            .external
            .exchange(self.gateway.addr(port), &[&line])
            .unwrap_or_else(|e| panic!("connection {i} to the gateway's port {port}: {e}"));
        match reply.split_once(' ') {
            Some((p, rest)) if (p == "one" || p == "two") && rest == format!("{line}\n") => {
                p.to_string()
            }
            _ => panic!("connection {i} to the gateway's port {port}: unexpected reply {reply:?}"),
        }
    }

    fn prefixes_via(&self, port: u16, n: usize) -> Vec<String> {
        (0..n).map(|i| self.prefix_via(port, i)).collect()
    }
}

/// `got` holds `per_window` of `want` in every consecutive window of `window` connections.
fn assert_windows(got: &[String], window: usize, want: &str, per_window: usize, what: &str) {
    for (i, w) in got.chunks(window).enumerate() {
        assert_eq!(
            count_of(w, want),
            per_window,
            "{what}: connections {}-{} carried {w:?} (whole sequence {got:?})",
            i * window + 1,
            i * window + w.len()
        );
    }
}

fn assert_80_20(got: &[String], what: &str) {
    assert_eq!(
        (count_of(got, "one"), count_of(got, "two")),
        (80, 20),
        "{what}: sequence {got:?}"
    );
    assert_windows(got, 10, "two", 2, what);
}

// ---------------------------------------------------------------------------------------------

/// The seed as written: 100 connections through the gateway's port 31400 split 80/20, and
/// exactly 2 of every 10 go to v2.
#[test]
fn seed_gateway_on_31400_splits_80_20_exactly() {
    let w = Ingress::new("gw-seed");
    let config = w.config(SEED);
    let gw = w.start(&config, &[]);
    assert_80_20(&w.prefixes_via(31400, 100), "port 31400");
    let listeners = admin_json(&gw.pod, "/listeners");
    assert!(
        listeners["gateway_ports"].get("31400").is_some(),
        "/listeners should show the Gateway port: {listeners}"
    );
}

/// The seed's second half: the same Gateway on 28674 (no Service edit needed: veer listens
/// on whatever port the Gateway names).
#[test]
fn seed_gateway_on_28674_splits_80_20_exactly() {
    let w = Ingress::new("gw-28674");
    let config = w.config(&seed_on_28674());
    let _gw = w.start(&config, &[]);
    assert_80_20(&w.prefixes_via(28674, 100), "port 28674");
    let err = w
        .external
        .connect(w.gateway.addr(31400))
        .expect_err("no Gateway server on 31400 any more");
    assert_eq!(err.kind(), ErrorKind::ConnectionRefused, "{err}");
}

/// Both halves at once: two Gateways (31400 and 28674), each with its own VirtualService
/// (80/20 and 50/50), driven concurrently; each port keeps its own exact split.
#[test]
fn two_gateways_serve_both_ports_at_once() {
    let w = Ingress::new("gw-both");
    let second = seed_on_28674()
        .split("---\n")
        .filter(|d| d.contains("kind: Gateway") || d.contains("kind: VirtualService"))
        .map(|d| {
            d.replace("name: tcp-echo-gateway", "name: tcp-echo-gateway-28674")
                .replace("- tcp-echo-gateway\n", "- tcp-echo-gateway-28674\n")
                .replace("name: tcp-echo\nspec", "name: tcp-echo-28674\nspec")
                .replace("weight: 80", "weight: 50")
                .replace("weight: 20", "weight: 50")
        })
        .collect::<Vec<_>>()
        .join("---\n");
    assert!(second.contains("tcp-echo-gateway-28674") && second.contains("tcp-echo-28674\n"));
    let config = w.config(&format!("{SEED}---\n{second}"));
    let _gw = w.start(&config, &[]);
    let (a, b) = thread::scope(|s| {
        let a = s.spawn(|| w.prefixes_via(31400, 100));
        let b = s.spawn(|| w.prefixes_via(28674, 100));
        (
            a.join().expect("31400 thread"),
            b.join().expect("28674 thread"),
        )
    });
    assert_80_20(&a, "port 31400");
    assert_eq!(
        (count_of(&b, "one"), count_of(&b, "two")),
        (50, 50),
        "port 28674: {b:?}"
    );
    assert_windows(&b, 2, "two", 1, "port 28674 (50/50)");
}

// ---------------------------------------------------------------------------------------------
// TLS passthrough

const TLS_CONFIG: &str = "---
apiVersion: networking.istio.io/v1beta1
kind: Gateway
metadata:
  name: tls-gateway
spec:
  selector:
    istio: ingressgateway
  servers:
  - port:
      number: 8443
      name: tls
      protocol: TLS
    tls:
      mode: PASSTHROUGH
    hosts:
    - a.example
    - b.example
---
apiVersion: networking.istio.io/v1beta1
kind: VirtualService
metadata:
  name: tls-echo
spec:
  hosts:
  - a.example
  - b.example
  gateways:
  - tls-gateway
  tls:
  - match:
    - port: 8443
      sniHosts:
      - a.example
    route:
    - destination:
        host: tcp-echo
        port:
          number: 9000
        subset: v1
  - match:
    - port: 8443
      sniHosts:
      - b.example
    route:
    - destination:
        host: tcp-echo
        port:
          number: 9000
        subset: v2
";

/// What `veer echo` answers to `payload`: each complete line, prefixed.
fn echo_of(prefix: &str, payload: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    for line in payload.split_inclusive(|&b| b == b'\n') {
        if line.ends_with(b"\n") {
            out.extend_from_slice(prefix.as_bytes());
            out.push(b' ');
            out.extend_from_slice(line);
        }
    }
    out
}

impl Ingress {
    /// Sends `payload` to the gateway's `port`, half-closes, returns what came back.
    fn send_raw(&self, port: u16, payload: &[u8]) -> (Vec<u8>, std::io::Result<()>) {
        let mut s = self
            .external
            .connect(self.gateway.addr(port))
            .unwrap_or_else(|e| panic!("connect to the gateway's port {port}: {e}"));
        s.write_all(payload).expect("write");
        let _ = s.shutdown(Shutdown::Write);
        read_until_closed(&mut s)
    }

    /// A ClientHello with `sni`, then "\nhello\n": the echo backend must get it all, unchanged.
    fn tls_hello(&self, sni: &str, want_prefix: &str) {
        let mut payload = tls_client_hello(Some(sni));
        payload.extend_from_slice(b"\nhello\n");
        let (reply, end) = self.send_raw(8443, &payload);
        end.unwrap_or_else(|e| panic!("SNI {sni}: reading the reply: {e}"));
        let last = String::from_utf8_lossy(&reply)
            .lines()
            .last()
            .unwrap_or("")
            .to_string();
        assert_eq!(
            last,
            format!("{want_prefix} hello"),
            "SNI {sni}: last reply line"
        );
        assert_eq!(
            reply,
            echo_of(want_prefix, &payload),
            "SNI {sni}: the backend must see the ClientHello byte for byte"
        );
    }
}

/// A TLS PASSTHROUGH server routes by the ClientHello's SNI through the VirtualService's
/// `tls:` rules; no SNI or an unknown one is closed without a reply; garbage too, and the
/// gateway stays up.
#[test]
fn tls_passthrough_routes_by_sni() {
    let w = Ingress::new("gw-tls");
    let mut manifests = tcp_echo_service_yaml();
    manifests.push_str(TCP_ECHO_DESTINATION_RULE);
    manifests.push_str(TLS_CONFIG);
    let config = w.config(&manifests);
    let gw = w.start(&config, &[]);

    for _ in 0..3 {
        w.tls_hello("a.example", "one");
        w.tls_hello("b.example", "two");
    }
    // Upper case SNI: host names are case-insensitive.
    w.tls_hello("B.Example", "two");

    let refused =
        |what: &str, payload: &[u8]| {
            let (reply, end) = w.send_raw(8443, payload);
            assert!(
                reply.is_empty(),
                "{what}: expected no reply, got {:?}",
                String::from_utf8_lossy(&reply)
            );
            if let Err(e) = end {
                assert!(
                matches!(e.kind(), ErrorKind::ConnectionReset | ErrorKind::ConnectionAborted),
                "{what}: the gateway should close the connection, reading ended with {e} ({:?})",
                e.kind()
            );
            }
        };
    let mut no_sni = tls_client_hello(None);
    no_sni.extend_from_slice(b"\nhello\n");
    refused("ClientHello without SNI", &no_sni);
    let mut c = tls_client_hello(Some("c.example"));
    c.extend_from_slice(b"\nhello\n");
    refused("ClientHello for c.example", &c);
    refused(
        "plain text",
        b"GET / HTTP/1.1\r\nHost: a.example\r\n\r\nhello\n",
    );
    refused("random bytes", &[0x8d, 0x02, 0xff, 0x00, 0x13, 0x37, b'\n']);
    refused(
        "a ServerHello where a ClientHello belongs",
        &[
            0x16, 0x03, 0x03, 0x00, 0x06, 0x02, 0x00, 0x00, 0x02, 0x03, 0x03, b'\n',
        ],
    );
    let full = tls_client_hello(Some("a.example"));
    refused("a truncated ClientHello, then EOF", &full[..full.len() / 2]);

    // A client that opens the connection and never sends: closed (by the hello timeout) or
    // still waiting; either way the gateway keeps serving others meanwhile.
    let _idle = w
        .external
        .connect(w.gateway.addr(8443))
        .expect("connect idle client");
    let (code, body) = gw.pod.admin_get("/ready").expect("GET /ready");
    assert_eq!(code, 200, "the gateway stays ready: {body}");
    w.tls_hello("a.example", "one");
    w.tls_hello("b.example", "two");
    let stats = admin_json(&gw.pod, "/stats?format=json");
    assert!(
        stats["no_route"].as_u64().unwrap_or(0) >= 2,
        "no SNI and c.example count as no_route: {stats}"
    );
}

// ---------------------------------------------------------------------------------------------
// Reload: Gateway servers come and go

/// The seed's Gateway with a second server on 28674, and a VirtualService rule for each port.
fn two_server_gateway(with_28674: bool) -> String {
    let server_28674 = "  - port:
      number: 28674
      name: tcp-28674
      protocol: TCP
    hosts:
    - \"*\"
";
    format!(
        "---
apiVersion: networking.istio.io/v1alpha3
kind: Gateway
metadata:
  name: tcp-echo-gateway
spec:
  selector:
    istio: ingressgateway
  servers:
  - port:
      number: 31400
      name: tcp
      protocol: TCP
    hosts:
    - \"*\"
{}---
apiVersion: networking.istio.io/v1alpha3
kind: VirtualService
metadata:
  name: tcp-echo
spec:
  hosts:
  - \"*\"
  gateways:
  - tcp-echo-gateway
  tcp:
  - match:
    - port: 31400
    route:
    - destination:
        host: tcp-echo
        port:
          number: 9000
        subset: v1
      weight: 80
    - destination:
        host: tcp-echo
        port:
          number: 9000
        subset: v2
      weight: 20
  - match:
    - port: 28674
    route:
    - destination:
        host: tcp-echo
        port:
          number: 9000
        subset: v2
{}{}",
        if with_28674 { server_28674 } else { "" },
        tcp_echo_service_yaml().replace("  clusterIP: 10.96.0.100\n", ""),
        TCP_ECHO_DESTINATION_RULE
    )
}

/// Removing a Gateway server closes its listener (connections are refused) while the other
/// port keeps serving, including a connection open across the reload; adding it back
/// listens again.
#[test]
fn removed_gateway_server_stops_listening_and_comes_back() {
    let w = Ingress::new("gw-reload");
    let config = w.config(&two_server_gateway(true));
    let gw = w.start(&config, &[]);
    assert_eq!(w.prefix_via(28674, 0), "two");
    let session = EchoSession::start(
        &w.external,
        w.gateway.addr(31400),
        "across-reload",
        Duration::from_millis(100),
    )
    .expect("long-lived connection through 31400");

    replace_file(&config.join("gateway.yaml"), &two_server_gateway(false));
    let (code, body) = gw.pod.admin_post("/reload").expect("POST /reload");
    assert_eq!(code, 200, "POST /reload: {body}");
    wait_for(
        "connections to the removed server's port 28674 to be refused",
        Duration::from_secs(5),
        || match w.external.connect(w.gateway.addr(28674)) {
            Err(e) if e.kind() == ErrorKind::ConnectionRefused => Some(()),
            _ => None,
        },
    );
    let listeners = admin_json(&gw.pod, "/listeners");
    assert!(
        listeners["gateway_ports"].get("28674").is_none()
            && !listeners["listening"].to_string().contains(":28674"),
        "/listeners still shows 28674: {listeners}"
    );
    let got = w.prefixes_via(31400, 10);
    assert_eq!(
        count_of(&got, "two"),
        2,
        "31400 still splits 80/20: {got:?}"
    );
    let before = session.echoed();
    thread::sleep(Duration::from_millis(400));
    assert!(
        session.is_alive() && session.echoed() > before,
        "the connection open on 31400 keeps echoing across the reload"
    );

    replace_file(&config.join("gateway.yaml"), &two_server_gateway(true));
    let (code, body) = gw.pod.admin_post("/reload").expect("POST /reload");
    assert_eq!(code, 200, "POST /reload: {body}");
    w.external
        .wait_listening(w.gateway.addr(28674), Duration::from_secs(5));
    assert_eq!(w.prefix_via(28674, 1), "two", "28674 serves again");
    let report = session
        .finish()
        .expect("the long-lived connection ends cleanly");
    assert!(report.lines >= 5, "{report:?}");
}

// ---------------------------------------------------------------------------------------------
// Privileged ports

/// A Gateway server on port 80 cannot be bound by uid 1337 without CAP_NET_BIND_SERVICE: the
/// proxy says which port and why, and serves the others.
#[test]
fn privileged_port_fails_alone_and_is_explained() {
    let w = Ingress::new("gw-port80");
    let with_80 = SEED.replace(
        "  servers:\n",
        "  servers:\n  - port:\n      number: 80\n      name: tcp-80\n      protocol: TCP\n    hosts:\n    - \"*\"\n",
    );
    assert!(with_80.contains("number: 80\n"));
    let config = w.config(&with_80);
    let gw = w.start(&config, &[]);
    assert_80_20(
        &w.prefixes_via(31400, 100),
        "port 31400 next to a failed port 80",
    );
    let err = w
        .external
        .connect(w.gateway.addr(80))
        .expect_err("nothing can listen on 80");
    assert_eq!(err.kind(), ErrorKind::ConnectionRefused, "{err}");
    let (code, body) = gw.pod.admin_get("/ready").expect("GET /ready");
    assert_eq!(code, 200, "ready with the ports it could bind: {body}");
    let log = gw.proxy.stderr();
    let line = log
        .lines()
        .find(|l| l.contains("80") && l.to_ascii_lowercase().contains("permission denied"))
        .unwrap_or_else(|| panic!("no log line names port 80 and the reason:\n{log}"));
    assert!(
        line.contains("CAP_NET_BIND_SERVICE") || line.contains("ip_unprivileged_port_start"),
        "the log line should say how to fix it: {line}"
    );
}

// ---------------------------------------------------------------------------------------------
// veer gateway-service

/// Runs `veer gateway-service ARGS`, asserts success, parses stdout as a Service.
fn gateway_service(args: &[&str]) -> serde_yaml::Value {
    let mut cmd = std::process::Command::new(veer_bin());
    cmd.arg("gateway-service").args(args);
    let out = must(cmd);
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let svc: serde_yaml::Value = serde_yaml::from_str(&text)
        .unwrap_or_else(|e| panic!("gateway-service output is not YAML ({e}):\n{text}"));
    assert_eq!(svc["kind"].as_str(), Some("Service"), "{text}");
    assert_eq!(svc["apiVersion"].as_str(), Some("v1"), "{text}");
    svc
}

/// `(port, targetPort, nodePort)` for each port of a Service.
fn service_ports(svc: &serde_yaml::Value) -> Vec<(u64, Option<u64>, Option<u64>)> {
    svc["spec"]["ports"]
        .as_sequence()
        .unwrap_or_else(|| panic!("no spec.ports: {svc:?}"))
        .iter()
        .map(|p| {
            (
                p["port"].as_u64().expect("port"),
                p["targetPort"].as_u64(),
                p["nodePort"].as_u64(),
            )
        })
        .collect()
}

#[test]
fn gateway_service_exposes_every_gateway_port_and_keeps_node_ports() {
    let cluster = Cluster::new("gw-svc");
    let dir = cluster.config_dir("gateways");
    let gateways = dir.join("gateways.yaml");
    let second = seed_on_28674()
        .split("---\n")
        .find(|d| d.contains("kind: Gateway"))
        .expect("Gateway document")
        .replace("name: tcp-echo-gateway", "name: tcp-echo-gateway-28674");
    write_file(&gateways, &format!("{SEED}---\n{second}"));
    let file = gateways.display().to_string();

    let svc = gateway_service(&["-f", &file]);
    let ports = service_ports(&svc);
    for want in [31400, 28674] {
        let p = ports
            .iter()
            .find(|p| p.0 == want)
            .unwrap_or_else(|| panic!("no port {want} in {ports:?}"));
        assert_eq!(
            p.1,
            Some(want),
            "targetPort of {want} (veer listens on the port itself)"
        );
    }
    assert_eq!(
        ports.len(),
        2,
        "one port per Gateway server port: {ports:?}"
    );
    assert_eq!(
        svc["spec"]["selector"]["istio"].as_str(),
        Some("ingressgateway"),
        "the Service selects the Gateways' workloads: {svc:?}"
    );

    let existing = dir.join("existing.yaml");
    write_file(
        &existing,
        "apiVersion: v1
kind: Service
metadata:
  name: istio-ingressgateway
  namespace: istio-system
spec:
  type: LoadBalancer
  selector: {istio: ingressgateway}
  ports:
  - {name: status-port, port: 15021, targetPort: 15021, protocol: TCP, nodePort: 30021}
  - {name: tcp, port: 31400, targetPort: 31400, protocol: TCP, nodePort: 30400}
",
    );
    let existing_arg = existing.display().to_string();
    let svc = gateway_service(&["-f", &file, "--service", &existing_arg]);
    let ports = service_ports(&svc);
    let find = |n: u64| {
        *ports
            .iter()
            .find(|p| p.0 == n)
            .unwrap_or_else(|| panic!("no port {n} in {ports:?}"))
    };
    assert_eq!(
        find(31400),
        (31400, Some(31400), Some(30400)),
        "nodePort kept"
    );
    assert_eq!(find(28674).1, Some(28674));
    assert_eq!(
        find(28674).2,
        None,
        "a new port gets its nodePort from Kubernetes"
    );
    assert_eq!(find(15021).2, Some(30021), "ports no Gateway uses are kept");
    drop(cluster);
}
