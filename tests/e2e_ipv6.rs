//! IPv6 and dual-stack pods through capture: veer-init installs ip6tables rules (detected
//! from the pod's IPv6 address), the proxy reads IP6T_SO_ORIGINAL_DST and routes IPv6
//! Service addresses exactly as IPv4 ones. Addresses are ULA (fd00::/8) inside the test's
//! own namespaces.

mod common;

use std::time::Duration;

use common::*;

/// The pod's IPv6 address, derived from its unique IPv4 one (10.a.b.c → fd00:a:b::c).
fn v6_of(pod: &Pod) -> String {
    let o = pod.ip.octets();
    format!("fd00:{}:{}::{}", o[1], o[2], o[3])
}

fn add_v6(pod: &Pod) {
    let addr = format!("{}/64", v6_of(pod));
    pod.run("ip", &["-6", "addr", "add", &addr, "dev", "eth0", "nodad"]);
}

fn config(service_ips: &[&str], v1: &Pod, v2: &Pod, v6_endpoints: bool) -> String {
    let ips = service_ips
        .iter()
        .map(|s| format!("\"{s}\""))
        .collect::<Vec<_>>()
        .join(", ");
    let pod = |name: &str, version: &str, p: &Pod| {
        let primary = if v6_endpoints {
            v6_of(p)
        } else {
            p.ip.to_string()
        };
        format!(
            "---\napiVersion: v1\nkind: Pod\nmetadata: {{name: {name}, labels: {{app: tcp-echo, version: {version}}}}}\n\
             status: {{podIP: \"{primary}\", podIPs: [{{ip: \"{primary}\"}}]}}\n"
        )
    };
    format!(
        "apiVersion: v1\nkind: Service\nmetadata: {{name: tcp-echo}}\n\
         spec: {{clusterIP: \"{first}\", clusterIPs: [{ips}], selector: {{app: tcp-echo}}, ports: [{{name: tcp, port: 9000}}]}}\n\
         {}{}{TCP_ECHO_DESTINATION_RULE}\n{}",
        pod("tcp-echo-v1", "v1", v1),
        pod("tcp-echo-v2", "v2", v2),
        tcp_echo_virtual_service("tcp-echo", 9000, &[("v1", 80), ("v2", 20)]),
        first = service_ips[0],
    )
}

struct World {
    _cluster: Cluster,
    client: Pod,
    _echo: Vec<Proc>,
    _sidecar: Sidecar,
}

fn world(tag: &str, service_ips: &[&str], v6_endpoints: bool) -> World {
    require_prerequisites();
    let mut cluster = Cluster::new(tag);
    let client = cluster.add_pod("client");
    let v1 = cluster.add_pod("v1");
    let v2 = cluster.add_pod("v2");
    for p in [&client, &v1, &v2] {
        add_v6(p);
    }
    // The Service range must be routable for the routing decision that precedes OUTPUT nat.
    client.run("ip", &["-6", "route", "add", "fd00:96::/64", "dev", "eth0"]);
    let echo = vec![start_tcp_echo(&v1, "one"), start_tcp_echo(&v2, "two")];
    let v6_echo: std::net::SocketAddr = format!("[{}]:9000", v6_of(&v1)).parse().unwrap();
    v1.wait_listening(v6_echo, Duration::from_secs(10));
    let dir = cluster.config_dir("ipv6");
    write_file(
        &dir.join("config.yaml"),
        &config(service_ips, &v1, &v2, v6_endpoints),
    );
    let init = install_capture(&client);
    let said =
        String::from_utf8_lossy(&init.stderr).to_string() + &String::from_utf8_lossy(&init.stdout);
    assert!(
        client
            .run("ip6tables-save", &["-t", "nat"])
            .contains("VEER_OUTPUT"),
        "no IPv6 rules; veer-init said:\n{said}"
    );
    let sidecar = Sidecar::start(&client, &[&dir], &["--pod-labels", "app=sleep"]);
    World {
        _cluster: cluster,
        client,
        _echo: echo,
        _sidecar: sidecar,
    }
}

fn split(w: &World, addr: &str, n: usize) -> (usize, usize) {
    let addr: std::net::SocketAddr = addr.parse().unwrap();
    let mut counts = (0, 0);
    for i in 0..n {
        let reply = w
            .client
            .exchange(addr, &[&format!("hello {i}")])
            .unwrap_or_else(|e| panic!("{addr}: {e}"));
        match prefixes(&reply).first().map(String::as_str) {
            Some("one") => counts.0 += 1,
            Some("two") => counts.1 += 1,
            other => panic!("unexpected reply {other:?} ({reply:?})"),
        }
    }
    counts
}

#[test]
fn ipv6_pod_reaches_v1_and_v2_through_capture_with_an_exact_split() {
    let w = world("ipv6", &["fd00:96::10"], true);
    assert_eq!(split(&w, "[fd00:96::10]:9000", 20), (16, 4));
}

#[test]
fn dual_stack_pod_reaches_the_service_on_both_families() {
    let ipv4 = "10.96.66.10";
    let w = world("dual", &[ipv4, "fd00:96::20"], false);
    assert_eq!(split(&w, &format!("{ipv4}:9000"), 10), (8, 2));
    assert_eq!(split(&w, "[fd00:96::20]:9000", 10), (8, 2));
}
