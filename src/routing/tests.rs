//! Route matching as pure functions: YAML in, decisions out.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;

use super::*;
use crate::addr::{ClientAddr, OrigDst};
use crate::config::model::Labels;
use crate::config::{parse_documents, ConfigSet};

const BASE: &str = r#"
apiVersion: v1
kind: Service
metadata: {name: tcp-echo}
spec:
  clusterIP: 10.96.0.10
  selector: {app: tcp-echo}
  ports: [{name: tcp, port: 9000}, {name: tcp-other, port: 9001}]
---
apiVersion: v1
kind: Pod
metadata: {name: tcp-echo-v1, labels: {app: tcp-echo, version: v1}}
status: {podIP: 10.1.0.2}
---
apiVersion: v1
kind: Pod
metadata: {name: tcp-echo-v2, labels: {app: tcp-echo, version: v2}}
status: {podIP: 10.1.0.3}
---
apiVersion: networking.istio.io/v1beta1
kind: DestinationRule
metadata: {name: tcp-echo-destination}
spec:
  host: tcp-echo
  subsets: [{name: v1, labels: {version: v1}}, {name: v2, labels: {version: v2}}]
"#;

fn vs(name: &str, body: &str) -> String {
    format!("---\napiVersion: networking.istio.io/v1alpha3\nkind: VirtualService\nmetadata: {{name: {name}}}\nspec:\n{body}")
}

fn split(v1: u32, v2: u32) -> String {
    vs(
        "tcp-echo",
        &format!(
            "  hosts: [tcp-echo]\n  tcp:\n  - match: [{{port: 9000}}]\n    route:\n    \
             - destination: {{host: tcp-echo, port: {{number: 9000}}, subset: v1}}\n      weight: {v1}\n    \
             - destination: {{host: tcp-echo, port: {{number: 9000}}, subset: v2}}\n      weight: {v2}\n"
        ),
    )
}

fn snapshot_for(
    yaml: &str,
    labels: &[(&str, &str)],
    ns: &str,
    policy: OutboundTrafficPolicy,
) -> Result<Snapshot, String> {
    snapshot_mode(yaml, labels, ns, policy, ProxyMode::Sidecar)
}

fn snapshot_mode(
    yaml: &str,
    labels: &[(&str, &str)],
    ns: &str,
    policy: OutboundTrafficPolicy,
    mode: ProxyMode,
) -> Result<Snapshot, String> {
    let resources = parse_documents(yaml, Path::new("t.yaml")).map_err(|e| e.to_string())?;
    let identity = ProxyIdentity {
        namespace: ns.into(),
        labels: labels
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect::<Labels>(),
        mode,
    };
    compile(ConfigSet::new(vec![], resources), identity, policy, 1).map_err(|e| e.to_string())
}

fn snapshot(yaml: &str) -> Snapshot {
    snapshot_for(
        yaml,
        &[("app", "sleep")],
        "default",
        OutboundTrafficPolicy::AllowAny,
    )
    .unwrap()
}

fn dst(s: &str) -> OrigDst {
    OrigDst(s.parse().unwrap())
}

const CLIENT: ClientAddr = ClientAddr(SocketAddr::V4(std::net::SocketAddrV4::new(
    std::net::Ipv4Addr::new(10, 1, 0, 9),
    40000,
)));

/// The cluster a connection to `d` is routed to, or "passthrough"/"refused": as the proxy
/// routes it, in the table when that covers the listener.
fn route(s: &Snapshot, d: &str) -> String {
    let d = dst(d);
    match s.route(d, CLIENT) {
        Route::Fast(r) => r.cluster.name.clone(),
        Route::Listener(l) => name_of(l.route(d.0.ip(), None)),
        Route::Passthrough => "passthrough".into(),
        Route::Refused => "refused".into(),
    }
}

fn name_of(r: Option<(Option<&RouteRule>, Arc<Cluster>)>) -> String {
    r.map_or_else(|| "no route".into(), |(_, c)| c.name.clone())
}

fn subset_of(name: &str) -> &str {
    name.split('|').nth(2).unwrap()
}

#[test]
fn seed_split_is_exact_80_20_in_every_window_of_ten() {
    let s = snapshot(&format!("{BASE}{}", split(80, 20)));
    let mut total_v2 = 0;
    for _ in 0..10 {
        let v2 = (0..10)
            .filter(|_| subset_of(&route(&s, "10.96.0.10:9000")) == "v2")
            .count();
        assert_eq!(v2, 2);
        total_v2 += v2;
    }
    assert_eq!(total_v2, 20);
}

/// Reloads that leave the rule alone do not restart its split: with a reload after every
/// second connection, 80/20 stays exact (restarting would send every connection to v1).
/// A reload that changes the weights starts the new split afresh.
#[test]
fn a_split_continues_across_reloads_that_leave_it_alone() {
    let compile_after = |yaml: &str, previous: Option<&Snapshot>, version: u64| {
        let resources = parse_documents(yaml, Path::new("t.yaml")).unwrap();
        let identity = ProxyIdentity {
            namespace: "default".into(),
            labels: [("app".to_string(), "sleep".to_string())]
                .into_iter()
                .collect(),
            mode: ProxyMode::Sidecar,
        };
        let set = ConfigSet::new(vec![], resources);
        recompile(
            set,
            identity,
            OutboundTrafficPolicy::AllowAny,
            version,
            previous,
        )
        .unwrap()
    };
    let config = format!("{BASE}{}", split(80, 20));
    let mut snap = compile_after(&config, None, 1);
    let mut picks = Vec::new();
    for version in 2..=51 {
        for _ in 0..2 {
            picks.push(subset_of(&route(&snap, "10.96.0.10:9000")).to_string());
        }
        // Something else changes (a pod's address), as in a real mesh.
        let edited = config.replace("10.1.0.3", &format!("10.1.1.{version}"));
        snap = compile_after(&edited, Some(&snap), version);
    }
    let v2 = picks.iter().filter(|p| *p == "v2").count();
    assert_eq!((picks.len(), v2), (100, 20), "{picks:?}");
    let l = &snap.listeners[&"10.96.0.10:9000".parse().unwrap()];
    let given = l.rules[0].connections().to_vec();
    assert_eq!(given, vec![80, 20], "per-destination counts carry over too");

    let changed = compile_after(&format!("{BASE}{}", split(50, 50)), Some(&snap), 52);
    let next: Vec<String> = (0..2)
        .map(|_| subset_of(&route(&changed, "10.96.0.10:9000")).to_string())
        .collect();
    assert_eq!(next, vec!["v1", "v2"], "new weights start afresh");
}

#[test]
fn all_v1_and_unequal_weights() {
    let s = snapshot(&format!("{BASE}{}", split(100, 0)));
    assert!((0..20).all(|_| subset_of(&route(&s, "10.96.0.10:9000")) == "v1"));
    let s = snapshot(&format!("{BASE}{}", split(3, 1)));
    let v2 = (0..100)
        .filter(|_| subset_of(&route(&s, "10.96.0.10:9000")) == "v2")
        .count();
    assert_eq!(v2, 25);
}

#[test]
fn port_without_rule_goes_to_the_whole_service() {
    let s = snapshot(&format!("{BASE}{}", split(80, 20)));
    assert_eq!(
        route(&s, "10.96.0.10:9001"),
        "outbound|9001||tcp-echo.default.svc.cluster.local"
    );
    let c = &s.clusters["outbound|9001||tcp-echo.default.svc.cluster.local"];
    assert_eq!(c.endpoints.len(), 2);
}

#[test]
fn unknown_destinations_pass_through_or_are_refused() {
    let yaml = format!("{BASE}{}", split(80, 20));
    let s = snapshot(&yaml);
    assert_eq!(route(&s, "10.1.0.3:9001"), "passthrough");
    assert_eq!(route(&s, "10.96.0.10:9999"), "passthrough");
    let s = snapshot_for(&yaml, &[], "default", OutboundTrafficPolicy::RegistryOnly).unwrap();
    assert_eq!(route(&s, "10.1.0.3:9001"), "refused");
    assert_eq!(subset_of(&route(&s, "10.96.0.10:9000")), "v1");
}

#[test]
fn subset_endpoints_follow_labels() {
    let s = snapshot(&format!("{BASE}{}", split(80, 20)));
    let v2 = &s.clusters["outbound|9000|v2|tcp-echo.default.svc.cluster.local"];
    assert_eq!(v2.endpoints.len(), 1);
    assert_eq!(v2.endpoints[0].address.to_string(), "10.1.0.3:9000");
    assert_eq!(&*v2.pick(CLIENT).unwrap().origin, "Pod default/tcp-echo-v2");
}

#[test]
fn finished_host_network_and_unaddressed_pods_are_not_endpoints() {
    // Non-endpoints first, so a workload numbering that counted them would shift every
    // later workload's labels onto the wrong address.
    let pod = |name: &str, version: &str, extra: &str| {
        format!("---\napiVersion: v1\nkind: Pod\nmetadata: {{name: {name}, labels: {{app: tcp-echo, version: {version}}}}}\n{extra}")
    };
    let mixed = [
        pod("done", "v2", "status: {phase: Succeeded, podIP: 10.1.0.20}\n"),
        pod("host", "v2", "spec: {hostNetwork: true}\nstatus: {podIP: 10.1.0.21}\n"),
        pod("pending", "v2", "status: {phase: Pending}\n"),
        pod("v2-b", "v2", "status: {podIPs: [{ip: 10.1.0.4}]}\n"),
        "---\napiVersion: networking.istio.io/v1beta1\nkind: WorkloadEntry\nmetadata: {name: vm}\nspec: {address: 10.1.0.5, labels: {app: tcp-echo, version: v1}}\n".to_string(),
    ]
    .concat();
    let endpoints = |s: &Snapshot, subset: &str| {
        let mut eps: Vec<String> = s.clusters
            [&format!("outbound|9000|{subset}|tcp-echo.default.svc.cluster.local")]
            .endpoints
            .iter()
            .map(|e| format!("{} {}", e.address, e.origin))
            .collect();
        eps.sort();
        eps
    };
    // Small (serial) and large (indexed on the second thread) compiles agree.
    for filler in [String::new(), filler_pods()] {
        let s = snapshot(&format!("{BASE}{mixed}{}{filler}", split(80, 20)));
        assert_eq!(
            endpoints(&s, "v1"),
            [
                "10.1.0.2:9000 Pod default/tcp-echo-v1",
                "10.1.0.5:9000 WorkloadEntry default/vm"
            ]
        );
        assert_eq!(
            endpoints(&s, "v2"),
            [
                "10.1.0.3:9000 Pod default/tcp-echo-v2",
                "10.1.0.4:9000 Pod default/v2-b"
            ]
        );
    }
}

#[test]
fn source_labels_and_namespace_select_rules() {
    let rules = vs(
        "by-source",
        "  hosts: [tcp-echo]\n  tcp:\n  - match: [{sourceLabels: {app: canary}}]\n    route: [{destination: {host: tcp-echo, subset: v2}}]\n  \
         - match: [{sourceNamespace: other}]\n    route: [{destination: {host: tcp-echo, subset: v2}}]\n  \
         - route: [{destination: {host: tcp-echo, subset: v1}}]\n",
    );
    let yaml = format!("{BASE}{rules}");
    let plain = snapshot_for(
        &yaml,
        &[("app", "sleep")],
        "default",
        OutboundTrafficPolicy::AllowAny,
    )
    .unwrap();
    assert_eq!(subset_of(&route(&plain, "10.96.0.10:9000")), "v1");
    let canary = snapshot_for(
        &yaml,
        &[("app", "canary"), ("x", "y")],
        "default",
        OutboundTrafficPolicy::AllowAny,
    )
    .unwrap();
    assert_eq!(subset_of(&route(&canary, "10.96.0.10:9000")), "v2");
    let other_ns = snapshot_for(&yaml, &[], "other", OutboundTrafficPolicy::AllowAny).unwrap();
    // The VirtualService's short host still means default's tcp-echo.
    assert_eq!(subset_of(&route(&other_ns, "10.96.0.10:9000")), "v2");
}

#[test]
fn gateway_bound_virtual_services_do_not_apply_to_sidecars() {
    let gw_only = vs(
        "gw",
        "  hosts: [tcp-echo]\n  gateways: [tcp-echo-gateway]\n  tcp:\n  - route: [{destination: {host: tcp-echo, subset: v2}}]\n",
    );
    let s = snapshot(&format!("{BASE}{gw_only}"));
    assert_eq!(subset_of(&route(&s, "10.96.0.10:9000")), "");
    let both = vs(
        "both",
        "  hosts: [tcp-echo]\n  gateways: [tcp-echo-gateway, mesh]\n  tcp:\n  \
         - match: [{gateways: [tcp-echo-gateway]}]\n    route: [{destination: {host: tcp-echo, subset: v2}}]\n  \
         - match: [{gateways: [mesh]}]\n    route: [{destination: {host: tcp-echo, subset: v1}}]\n",
    );
    let s = snapshot(&format!("{BASE}{both}"));
    assert_eq!(subset_of(&route(&s, "10.96.0.10:9000")), "v1");
}

#[test]
fn rules_order_by_creation_time_then_name() {
    let mk = |name: &str, ts: &str, subset: &str| {
        format!(
            "---\napiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {{name: {name}, creationTimestamp: \"{ts}\"}}\n\
             spec:\n  hosts: [tcp-echo]\n  tcp:\n  - route: [{{destination: {{host: tcp-echo, subset: {subset}}}}}]\n"
        )
    };
    let s = snapshot(&format!(
        "{BASE}{}{}",
        mk("a-late", "2024-02-01T00:00:00Z", "v2"),
        mk("z-early", "2024-01-01T00:00:00Z", "v1")
    ));
    assert_eq!(subset_of(&route(&s, "10.96.0.10:9000")), "v1");
    let s = snapshot(&format!(
        "{BASE}{}{}",
        mk("b", "2024-01-01T00:00:00Z", "v2"),
        mk("a", "2024-01-01T00:00:00Z", "v1")
    ));
    assert_eq!(subset_of(&route(&s, "10.96.0.10:9000")), "v1");
}

#[test]
fn destination_port_defaults() {
    // Two service ports and no port in the destination: the dialled port is used.
    let any_port = vs(
        "p",
        "  hosts: [tcp-echo]\n  tcp:\n  - route: [{destination: {host: tcp-echo, subset: v1}}]\n",
    );
    let s = snapshot(&format!("{BASE}{any_port}"));
    assert_eq!(
        route(&s, "10.96.0.10:9001"),
        "outbound|9001|v1|tcp-echo.default.svc.cluster.local"
    );
    // A single-port destination service: that port, whatever was dialled.
    let single = "---\napiVersion: v1\nkind: Service\nmetadata: {name: one}\nspec: {clusterIP: 10.96.0.20, selector: {app: one}, ports: [{port: 7000, targetPort: 7777}]}\n\
                  ---\napiVersion: v1\nkind: Pod\nmetadata: {name: one-0, labels: {app: one}}\nstatus: {podIP: 10.1.0.7}\n";
    let to_one = vs(
        "to-one",
        "  hosts: [tcp-echo]\n  tcp:\n  - route: [{destination: {host: one}}]\n",
    );
    let s = snapshot(&format!("{BASE}{single}{to_one}"));
    let c = route(&s, "10.96.0.10:9001");
    assert_eq!(c, "outbound|7000||one.default.svc.cluster.local");
    assert_eq!(
        s.clusters[&c].endpoints[0].address.to_string(),
        "10.1.0.7:7777"
    );
}

#[test]
fn named_target_ports_resolve_per_pod() {
    let yaml = "apiVersion: v1\nkind: Service\nmetadata: {name: db, namespace: data}\nspec: {clusterIP: 10.96.0.30, selector: {app: db}, ports: [{port: 5432, targetPort: pg}]}\n\
                ---\napiVersion: v1\nkind: Pod\nmetadata: {name: db-0, namespace: data, labels: {app: db}}\n\
                spec: {containers: [{name: pg, ports: [{name: pg, containerPort: 15432}]}]}\nstatus: {podIP: 10.1.0.8}\n\
                ---\napiVersion: v1\nkind: Pod\nmetadata: {name: db-wrong-ns, labels: {app: db}}\nstatus: {podIP: 10.1.0.9}\n";
    let s = snapshot(yaml);
    let c = route(&s, "10.96.0.30:5432");
    assert_eq!(c, "outbound|5432||db.data.svc.cluster.local");
    let eps: Vec<String> = s.clusters[&c]
        .endpoints
        .iter()
        .map(|e| e.address.to_string())
        .collect();
    assert_eq!(eps, vec!["10.1.0.8:15432"]);
}

#[test]
fn destination_subnets_are_checked_per_connection() {
    let se = "---\napiVersion: networking.istio.io/v1\nkind: ServiceEntry\nmetadata: {name: ext}\n\
              spec: {hosts: [ext.example.com], addresses: [192.0.2.0/24], ports: [{number: 443, name: tls}], resolution: NONE}\n";
    let rules = vs(
        "ext",
        "  hosts: [ext.example.com]\n  tcp:\n  - match: [{destinationSubnets: [192.0.2.128/25]}]\n    \
         route: [{destination: {host: tcp-echo, port: {number: 9000}, subset: v2}}]\n",
    );
    let s = snapshot(&format!("{BASE}{se}{rules}"));
    assert_eq!(
        route(&s, "192.0.2.200:443"),
        "outbound|9000|v2|tcp-echo.default.svc.cluster.local"
    );
    // Not in the rule's subnets: the ServiceEntry's own cluster, which passes through.
    let c = route(&s, "192.0.2.5:443");
    assert_eq!(c, "outbound|443||ext.example.com");
    assert!(s.clusters[&c].original_destination);
    assert_eq!(route(&s, "192.0.3.5:443"), "passthrough");
}

#[test]
fn static_service_entry_endpoints_and_ports() {
    let se = "apiVersion: networking.istio.io/v1\nkind: ServiceEntry\nmetadata: {name: db}\n\
              spec:\n  hosts: [db.internal]\n  addresses: [10.200.0.1]\n  ports: [{number: 5432, name: pg}]\n  resolution: STATIC\n  \
              endpoints: [{address: 10.1.2.3, ports: {pg: 6432}}, {address: 10.1.2.4}]\n";
    let s = snapshot(se);
    let c = route(&s, "10.200.0.1:5432");
    let eps: Vec<String> = s.clusters[&c]
        .endpoints
        .iter()
        .map(|e| e.address.to_string())
        .collect();
    assert_eq!(eps, vec!["10.1.2.3:6432", "10.1.2.4:5432"]);
}

#[test]
fn policy_precedence_port_level_then_subset() {
    let dr = "---\napiVersion: networking.istio.io/v1\nkind: DestinationRule\nmetadata: {name: lb}\nspec:\n  host: tcp-echo\n  \
              trafficPolicy:\n    loadBalancer: {simple: RANDOM}\n    connectionPool: {tcp: {connectTimeout: 3s}}\n    \
              portLevelSettings:\n    - port: {number: 9001}\n      loadBalancer: {simple: ROUND_ROBIN}\n  \
              subsets:\n  - name: v1\n    labels: {version: v1}\n    trafficPolicy: {loadBalancer: {consistentHash: {useSourceIp: true}}}\n  \
              - name: v2\n    labels: {version: v2}\n";
    let base = BASE
        .split("---\napiVersion: networking.istio.io/v1beta1")
        .next()
        .unwrap();
    let s = snapshot(&format!("{base}{dr}{}", split(50, 50)));
    for _ in 0..4 {
        route(&s, "10.96.0.10:9000");
    }
    route(&s, "10.96.0.10:9001");
    let p = |name: &str| s.clusters[name].policy.clone();
    let whole = p("outbound|9000||tcp-echo.default.svc.cluster.local");
    assert_eq!(whole.load_balancer, lb::LbPolicy::Random);
    assert_eq!(whole.connect_timeout, std::time::Duration::from_secs(3));
    // The port-level entry replaces the top level wholesale: the connect timeout is the default.
    let port_level = p("outbound|9001||tcp-echo.default.svc.cluster.local");
    assert_eq!(port_level.load_balancer, lb::LbPolicy::RoundRobin);
    assert_eq!(
        port_level.connect_timeout,
        std::time::Duration::from_secs(10)
    );
    // The subset overrides the load balancer block only.
    let v1 = p("outbound|9000|v1|tcp-echo.default.svc.cluster.local");
    assert_eq!(v1.load_balancer, lb::LbPolicy::SourceIpHash);
    assert_eq!(v1.connect_timeout, std::time::Duration::from_secs(3));
    assert_eq!(
        p("outbound|9000|v2|tcp-echo.default.svc.cluster.local").load_balancer,
        lb::LbPolicy::Random
    );
}

#[test]
fn undefined_subset_has_no_endpoints_and_a_warning() {
    let rules = vs(
        "bad",
        "  hosts: [tcp-echo]\n  tcp:\n  - route: [{destination: {host: tcp-echo, subset: v3}}]\n",
    );
    let s = snapshot(&format!("{BASE}{rules}"));
    let c = Arc::clone(&s.clusters[&route(&s, "10.96.0.10:9000")]);
    assert!(c.pick(CLIENT).is_none());
    assert!(
        s.warnings.iter().any(|w| w.contains("subset \"v3\"")),
        "{:?}",
        s.warnings
    );
}

fn invalid_route_cases() -> [(String, &'static str); 6] {
    [
        (split(80, 20).replace("weight: 20", "weight: -5"), "spec.tcp[0].route[1].weight"),
        (split(0, 0), "spec.tcp[0].route`"),
        (vs("w", "  hosts: ['*']\n  tcp:\n  - route: [{destination: {host: tcp-echo}}]\n"), "spec.hosts[0]"),
        (
            vs("c", "  hosts: [tcp-echo]\n  tcp:\n  - match: [{destinationSubnets: [10.0.0.0/33]}]\n    route: [{destination: {host: a}}]\n"),
            "spec.tcp[0].match[0].destinationSubnets[0]",
        ),
        (vs("p", "  hosts: [tcp-echo]\n  tcp:\n  - match: [{port: 70000}]\n    route: [{destination: {host: a}}]\n"), "spec.tcp[0].match[0].port"),
        (vs("e", "  hosts: [tcp-echo]\n  tcp:\n  - route: []\n"), "spec.tcp[0].route`"),
    ]
}

#[test]
fn invalid_routes_are_rejected_with_field_paths() {
    for (body, field) in invalid_route_cases() {
        let err = snapshot_for(
            &format!("{BASE}{body}"),
            &[],
            "default",
            OutboundTrafficPolicy::AllowAny,
        )
        .unwrap_err();
        assert!(err.contains(field), "expected {field} in: {err}");
        assert!(
            err.contains("t.yaml:") && err.contains(": document 5 (VirtualService default/"),
            "{err}"
        );
    }
}

/// Pods enough to make a config large, so it is validated beside linking.
fn filler_pods() -> String {
    let n = compile::PARALLEL_MIN;
    (0..n)
        .map(|i| {
            format!(
                "---\napiVersion: v1\nkind: Pod\nmetadata: {{name: filler-{i}, labels: {{app: filler}}}}\nstatus: {{podIP: 10.2.{}.{}}}\n",
                i / 250,
                i % 250 + 1
            )
        })
        .collect()
}

#[test]
fn large_configs_validated_beside_linking_get_the_same_verdicts() {
    let filler = filler_pods();
    for (body, field) in invalid_route_cases() {
        let small = format!("{BASE}{body}");
        let large = format!("{BASE}{body}{filler}");
        let small_err =
            snapshot_for(&small, &[], "default", OutboundTrafficPolicy::AllowAny).unwrap_err();
        let large_err =
            snapshot_for(&large, &[], "default", OutboundTrafficPolicy::AllowAny).unwrap_err();
        assert!(
            large_err.contains(field),
            "expected {field} in: {large_err}"
        );
        assert_eq!(small_err, large_err);
    }
    // And a valid large config routes as the small one does, warnings included.
    let small = snapshot(&format!("{BASE}{}", split(80, 20)));
    let large = snapshot(&format!("{BASE}{}{filler}", split(80, 20)));
    assert_eq!(small.warnings, large.warnings);
    let picks: Vec<String> = (0..10).map(|_| route(&large, "10.96.0.10:9000")).collect();
    assert_eq!(
        picks.iter().filter(|p| subset_of(p) == "v1").count(),
        8,
        "{picks:?}"
    );
}

#[test]
fn a_single_destination_takes_everything_whatever_its_weight() {
    let one = vs("one", "  hosts: [tcp-echo]\n  tcp:\n  - route: [{destination: {host: tcp-echo, subset: v2}, weight: 0}]\n");
    let s = snapshot(&format!("{BASE}{one}"));
    assert!((0..5).all(|_| subset_of(&route(&s, "10.96.0.10:9000")) == "v2"));
}

// ---------------------------------------------------------------------------------------------
// Gateway mode

/// The seed's ingress config (000_…): Gateway on 31400 with hosts `*`, VirtualService bound
/// to it matching port 31400 and splitting 80/20.
const SEED_GATEWAY: &str = concat!(
    "\n---\n",
    include_str!("../../tests/fixtures/seed/tcp-echo-gateway.yaml")
);

fn gateway(yaml: &str) -> Snapshot {
    snapshot_mode(
        yaml,
        &[("istio", "ingressgateway")],
        "default",
        OutboundTrafficPolicy::AllowAny,
        ProxyMode::Gateway,
    )
    .unwrap()
}

fn at_gateway(s: &Snapshot, port: u16, sni: Option<&str>) -> String {
    let l = s.gateway_ports.get(&port).expect("gateway port");
    name_of(l.route("10.1.0.100".parse().unwrap(), sni))
}

#[test]
fn seed_gateway_listens_on_31400_and_splits_exactly() {
    let s = gateway(&format!("{BASE}{SEED_GATEWAY}"));
    assert_eq!(
        s.gateway_ports.keys().copied().collect::<Vec<_>>(),
        vec![31400]
    );
    assert!(
        s.listeners.is_empty(),
        "a gateway does not capture service addresses"
    );
    for _ in 0..5 {
        let v2 = (0..10)
            .filter(|_| subset_of(&at_gateway(&s, 31400, None)) == "v2")
            .count();
        assert_eq!(v2, 2);
    }
}

#[test]
fn any_port_works_the_same() {
    let other = SEED_GATEWAY.replace("31400", "28674");
    let s = gateway(&format!("{BASE}{other}"));
    assert_eq!(
        s.gateway_ports.keys().copied().collect::<Vec<_>>(),
        vec![28674]
    );
    assert_eq!(subset_of(&at_gateway(&s, 28674, None)), "v1");
}

#[test]
fn gateway_mode_needs_a_matching_selector_and_binding() {
    let s = snapshot_mode(
        &format!("{BASE}{SEED_GATEWAY}"),
        &[("istio", "egressgateway")],
        "default",
        OutboundTrafficPolicy::AllowAny,
        ProxyMode::Gateway,
    )
    .unwrap();
    assert!(s.gateway_ports.is_empty());
    assert!(s.warnings.iter().any(|w| w.contains("no Gateway selects")));
    // A sidecar ignores Gateways and gateway-only VirtualServices.
    let s = snapshot(&format!("{BASE}{SEED_GATEWAY}"));
    assert!(s.gateway_ports.is_empty());
    assert_eq!(
        route(&s, "10.96.0.10:9000"),
        "outbound|9000||tcp-echo.default.svc.cluster.local"
    );
    // Unbound VirtualService at a gateway: the port is open but nothing routes.
    let unbound = SEED_GATEWAY.replace(
        "  gateways:\n  - tcp-echo-gateway\n",
        "  gateways: [other-gateway]\n",
    );
    let s = gateway(&format!("{BASE}{unbound}"));
    assert_eq!(at_gateway(&s, 31400, None), "no route");
}

#[test]
fn gateway_references_resolve_namespaces() {
    let gw = "---\napiVersion: networking.istio.io/v1\nkind: Gateway\nmetadata: {name: gw, namespace: istio-system}\n\
              spec: {selector: {istio: ingressgateway}, servers: [{port: {number: 5000, name: tcp, protocol: TCP}, hosts: ['*']}]}\n";
    let vs_same_ns = vs("short", "  hosts: [tcp-echo]\n  gateways: [gw]\n  tcp:\n  - route: [{destination: {host: tcp-echo, subset: v2}}]\n");
    let s = gateway(&format!("{BASE}{gw}{vs_same_ns}"));
    assert_eq!(
        at_gateway(&s, 5000, None),
        "no route",
        "`gw` means default/gw here, not istio-system/gw"
    );
    let vs_qualified = vs(
        "qualified",
        "  hosts: [tcp-echo]\n  gateways: [istio-system/gw]\n  tcp:\n  - route: [{destination: {host: tcp-echo, port: {number: 9000}, subset: v2}}]\n",
    );
    let s = gateway(&format!("{BASE}{gw}{vs_qualified}"));
    assert_eq!(
        at_gateway(&s, 5000, None),
        "outbound|9000|v2|tcp-echo.default.svc.cluster.local"
    );
}

#[test]
fn match_level_gateways_and_ports_select_rules() {
    let two_servers =
        "---\napiVersion: networking.istio.io/v1\nkind: Gateway\nmetadata: {name: gw}\n\
                       spec:\n  selector: {istio: ingressgateway}\n  servers:\n  \
                       - {port: {number: 31400, name: tcp, protocol: TCP}, hosts: ['*']}\n  \
                       - {port: {number: 31401, name: tcp-2, protocol: TCP}, hosts: ['*']}\n";
    let rules = vs(
        "r",
        "  hosts: [tcp-echo]\n  gateways: [gw, mesh]\n  tcp:\n  \
         - match: [{port: 31401, gateways: [gw]}]\n    route: [{destination: {host: tcp-echo, port: {number: 9000}, subset: v2}}]\n  \
         - match: [{gateways: [mesh]}]\n    route: [{destination: {host: tcp-echo, port: {number: 9000}, subset: v2}}]\n  \
         - route: [{destination: {host: tcp-echo, port: {number: 9000}, subset: v1}}]\n",
    );
    let s = gateway(&format!("{BASE}{two_servers}{rules}"));
    assert_eq!(subset_of(&at_gateway(&s, 31400, None)), "v1");
    assert_eq!(subset_of(&at_gateway(&s, 31401, None)), "v2");
}

#[test]
fn tls_passthrough_routes_by_sni() {
    let gw = "---\napiVersion: networking.istio.io/v1\nkind: Gateway\nmetadata: {name: tls-gw}\n\
              spec:\n  selector: {istio: ingressgateway}\n  servers:\n  \
              - port: {number: 8443, name: tls, protocol: TLS}\n    tls: {mode: PASSTHROUGH}\n    hosts: ['*.example']\n";
    let rules = vs(
        "sni",
        "  hosts: ['*.example']\n  gateways: [tls-gw]\n  tls:\n  \
         - match: [{sniHosts: [a.example]}]\n    route: [{destination: {host: tcp-echo, port: {number: 9000}, subset: v1}}]\n  \
         - match: [{sniHosts: ['*.b.example', b.example]}]\n    route: [{destination: {host: tcp-echo, port: {number: 9000}, subset: v2}}]\n",
    );
    let s = gateway(&format!("{BASE}{gw}{rules}"));
    let l = &s.gateway_ports[&8443];
    assert!(l.tls);
    assert_eq!(subset_of(&at_gateway(&s, 8443, Some("a.example"))), "v1");
    assert_eq!(subset_of(&at_gateway(&s, 8443, Some("b.example"))), "v2");
    assert_eq!(subset_of(&at_gateway(&s, 8443, Some("x.b.example"))), "v2");
    assert_eq!(at_gateway(&s, 8443, Some("c.example")), "no route");
    assert_eq!(at_gateway(&s, 8443, None), "no route");
}

#[test]
fn sidecar_tls_ports_use_tls_rules_then_tcp_then_the_service() {
    let svc = "---\napiVersion: v1\nkind: Service\nmetadata: {name: web}\n\
               spec: {clusterIP: 10.96.0.40, selector: {app: tcp-echo}, ports: [{name: tls, port: 443, targetPort: 9000}]}\n";
    let rules = vs(
        "web",
        "  hosts: [web, a.example]\n  tls:\n  - match: [{sniHosts: [a.example]}]\n    \
         route: [{destination: {host: tcp-echo, port: {number: 9000}, subset: v2}}]\n",
    );
    let s = snapshot(&format!("{BASE}{svc}{rules}"));
    let l = match s.route_outbound(dst("10.96.0.40:443")) {
        Outbound::Service(l) => l.clone(),
        other => panic!("{other:?}"),
    };
    assert!(l.tls);
    // The SNI must be read before a rule can be chosen: not in the table.
    assert_eq!(routed_in(&s, "10.96.0.40:443"), "listener");
    assert_eq!(
        subset_of(&name_of(
            l.route("10.96.0.40".parse().unwrap(), Some("a.example"))
        )),
        "v2"
    );
    // No SNI match: the whole service.
    assert_eq!(
        name_of(l.route("10.96.0.40".parse().unwrap(), Some("z.example"))),
        "outbound|443||web.default.svc.cluster.local"
    );
}

// ---------------------------------------------------------------------------------------------
// Explain

#[test]
fn explain_shows_owner_rules_shares_and_endpoints_without_picking() {
    let s = snapshot(&format!("{BASE}{}", split(80, 20)));
    let e = s.explain("10.96.0.10:9000".parse().unwrap(), None);
    assert_eq!(
        e.owner.as_deref(),
        Some("tcp-echo.default.svc.cluster.local port 9000")
    );
    assert_eq!(e.verdict, "routed by default/tcp-echo/tcp[0]");
    let shares: Vec<f64> = e.destinations.iter().map(|d| d.share_percent).collect();
    assert_eq!(shares, vec![80.0, 20.0]);
    assert_eq!(
        e.destinations[1].endpoints,
        vec!["10.1.0.3:9000 (Pod default/tcp-echo-v2)"]
    );
    let text = e.to_string();
    assert!(
        text.contains("verdict: routed by default/tcp-echo/tcp[0]"),
        "{text}"
    );
    // Explaining does not advance the weighted pick: the first real picks are still a a b.
    let seq: Vec<String> = (0..3)
        .map(|_| subset_of(&route(&s, "10.96.0.10:9000")).to_string())
        .collect();
    assert_eq!(seq, vec!["v1", "v1", "v2"]);
}

#[test]
fn explain_says_why_rules_were_skipped() {
    let rules = vs(
        "by-source",
        "  hosts: [tcp-echo]\n  tcp:\n  - match: [{sourceLabels: {app: canary}}]\n    route: [{destination: {host: tcp-echo, subset: v2}}]\n  \
         - match: [{port: 9001}]\n    route: [{destination: {host: tcp-echo, subset: v2}}]\n",
    );
    let s = snapshot(&format!("{BASE}{rules}"));
    let e = s.explain("10.96.0.10:9000".parse().unwrap(), None);
    let reasons: Vec<String> = e
        .considered
        .iter()
        .map(|c| format!("{}: {}", c.rule(), c.outcome))
        .collect();
    assert!(
        reasons
            .iter()
            .any(|r| r.contains("tcp[0]: skipped") && r.contains("sourceLabels")),
        "{reasons:?}"
    );
    assert!(
        reasons
            .iter()
            .any(|r| r.contains("tcp[1]: skipped") && r.contains("port 9001 is not 9000")),
        "{reasons:?}"
    );
    // Kept as data, shown (admin API, `veer explain --json`) as the two strings.
    let json = serde_json::to_value(&e.considered[1]).unwrap();
    assert_eq!(
        json,
        serde_json::json!({
            "rule": "default/by-source/tcp[1]",
            "outcome": "skipped: match[0]: port 9001 is not 9000",
        })
    );
    assert!(
        e.verdict
            .starts_with("no rule matched: sent to the whole service"),
        "{}",
        e.verdict
    );
}

#[test]
fn explain_passthrough_refusal_and_gateway() {
    let yaml = format!("{BASE}{}", split(80, 20));
    let s = snapshot(&yaml);
    assert!(s
        .explain("10.1.0.3:9001".parse().unwrap(), None)
        .verdict
        .starts_with("passed through"));
    let s = snapshot_for(&yaml, &[], "default", OutboundTrafficPolicy::RegistryOnly).unwrap();
    assert!(s
        .explain("10.1.0.3:9001".parse().unwrap(), None)
        .verdict
        .starts_with("refused"));
    let g = gateway(&format!("{BASE}{SEED_GATEWAY}"));
    let e = g.explain("10.1.0.100:31400".parse().unwrap(), None);
    assert_eq!(e.verdict, "routed by default/tcp-echo/tcp[0]");
    assert!(g
        .explain("10.1.0.100:8080".parse().unwrap(), None)
        .verdict
        .contains("no Gateway server"));
}

#[test]
fn a_service_applied_without_cluster_ip_takes_the_allocated_one() {
    // The sample as written (no clusterIP) and the same Service as `kubectl get` reports it.
    let as_written = "---\napiVersion: v1\nkind: Service\nmetadata: {name: tcp-echo}\n\
                      spec: {selector: {app: tcp-echo}, ports: [{name: tcp, port: 9000}, {name: tcp-other, port: 9001}]}\n";
    let s = snapshot(&format!("{BASE}{as_written}{}", split(80, 20)));
    assert!(s.warnings.is_empty(), "{:?}", s.warnings);
    assert_eq!(subset_of(&route(&s, "10.96.0.10:9000")), "v1");
    // Loaded the other way round, too.
    let s = snapshot(&format!(
        "{}---{BASE}{}",
        as_written.trim_start_matches("---\n"),
        split(80, 20)
    ));
    assert!(s.warnings.is_empty(), "{:?}", s.warnings);
    assert_eq!(subset_of(&route(&s, "10.96.0.10:9000")), "v1");
    // Two different addresses for one Service is a conflict worth a warning.
    let other_ip = as_written.replace("spec: {selector", "spec: {clusterIP: 10.96.0.99, selector");
    let s = snapshot(&format!("{BASE}{other_ip}"));
    assert!(
        s.warnings
            .iter()
            .any(|w| w.contains("defined more than once")),
        "{:?}",
        s.warnings
    );
}

#[test]
fn cluster_names_follow_envoy_outbound_form() {
    use crate::routing::snapshot::cluster_name;
    assert_eq!(cluster_name("a.b", 0, None), "outbound|0||a.b");
    assert_eq!(cluster_name("a.b", 9, Some("v1")), "outbound|9|v1|a.b");
    assert_eq!(cluster_name("a.b", 9000, None), "outbound|9000||a.b");
    assert_eq!(
        cluster_name("a.b", 65535, Some("v2")),
        "outbound|65535|v2|a.b"
    );
}

#[test]
fn lower_copies_only_upper_case_hosts() {
    use crate::routing::host::lower;
    assert!(matches!(
        lower("a.example.com"),
        std::borrow::Cow::Borrowed(_)
    ));
    assert_eq!(lower("A.Example.com"), "a.example.com");
}

/// The hot-first memory layouts (`repr(C)`) leave listeners, rules and clusters shown as
/// before: keys in their usual order, empty lists and absent problems left out. (An
/// endpoint now shows its load right after its address.)
#[test]
fn listeners_and_clusters_show_their_fields_in_the_usual_order() {
    let s = snapshot(&format!("{BASE}{}", split(80, 20)));
    let listener = serde_json::to_string(&s.listeners[&dst("10.96.0.10:9000").0]).unwrap();
    let keys = |json: &str, names: &[&str]| {
        let at: Vec<usize> = names
            .iter()
            .map(|k| {
                json.find(&format!("\"{k}\":"))
                    .unwrap_or_else(|| panic!("{k} missing from {json}"))
            })
            .collect();
        assert!(
            at.windows(2).all(|w| w[0] < w[1]),
            "{names:?} out of order in {json}"
        );
    };
    keys(
        &listener,
        &[
            "host",
            "port",
            "tls",
            "rules",
            "considered",
            "default_cluster",
            "unmatched_connections",
        ],
    );
    keys(
        &listener,
        &[
            "virtual_service",
            "kind",
            "index",
            "destinations",
            "cluster",
            "weight",
            "connections",
        ],
    );
    assert!(!listener.contains("\"conditions\""), "{listener}");
    assert!(
        listener
            .contains("\"default_cluster\":\"outbound|9000||tcp-echo.default.svc.cluster.local\""),
        "{listener}"
    );
    let cluster =
        serde_json::to_string(&s.clusters["outbound|9000|v1|tcp-echo.default.svc.cluster.local"])
            .unwrap();
    keys(
        &cluster,
        &[
            "name",
            "host",
            "port",
            "subset",
            "policy",
            "original_destination",
            "endpoints",
            "counters",
        ],
    );
    keys(
        &cluster,
        &[
            "address",
            "active_connections",
            "total_connections",
            "origin",
            "labels",
            "outlier",
        ],
    );
    assert!(!cluster.contains("\"problem\""), "{cluster}");
}

/// Which way `d` is routed: "table" (decided in [`fast::Fast`]) or "listener".
/// The endpoint the table picked, which these tests expect it to.
fn picked(r: &Routed) -> Picked {
    r.endpoint.expect("the table picked the endpoint")
}

fn routed_in(s: &Snapshot, d: &str) -> &'static str {
    match s.route(dst(d), CLIENT) {
        Route::Fast(_) => "table",
        Route::Listener(_) => "listener",
        Route::Passthrough | Route::Refused => "nothing",
    }
}

/// Routes ten connections to `d`, the table and the listener's own route taking turns
/// (the table first); returns the subset each reached. `check` sees every table decision.
fn alternate_table_and_listener(s: &Snapshot, d: OrigDst, check: impl Fn(&Routed)) -> Vec<String> {
    let Outbound::Service(l) = s.route_outbound(d) else {
        panic!("a service")
    };
    (0..10)
        .map(|i| {
            if i % 2 == 0 {
                let Route::Fast(r) = s.route(d, CLIENT) else {
                    panic!("in the table")
                };
                check(&r);
                r.cluster.name.clone()
            } else {
                name_of(l.route(d.0.ip(), None))
            }
        })
        .map(|c| subset_of(&c).to_string())
        .collect()
}

#[test]
fn the_table_and_the_listener_share_one_split() {
    let s = snapshot(&format!("{BASE}{}", split(80, 20)));
    let d = dst("10.96.0.10:9000");
    let Outbound::Service(l) = s.route_outbound(d) else {
        panic!("a service")
    };
    // Alternate the table and the listener's own route: one sequence, exact, and counted
    // once per connection whichever way it went.
    assert_eq!(
        alternate_table_and_listener(&s, d, |_| {}),
        ["v1", "v1", "v2", "v1", "v1", "v1", "v1", "v2", "v1", "v1"]
    );
    assert_eq!(l.rules[0].connections().to_vec(), vec![8, 2]);
    assert_eq!(routed_in(&s, "10.96.0.10:9000"), "table");

    // The decision is complete: rule, cluster, endpoint and its address.
    let Route::Fast(r) = s.route(d, CLIENT) else {
        panic!("in the table")
    };
    let rule = r.rule().expect("the VirtualService rule");
    assert_eq!(rule.name(), "default/tcp-echo/tcp[0]");
    assert_eq!(
        r.cluster.name,
        "outbound|9000|v1|tcp-echo.default.svc.cluster.local"
    );
    let ep = &r.cluster.endpoints[picked(&r).index];
    assert_eq!(ep.address.to_string(), picked(&r).addr.to_string());
    assert_eq!(picked(&r).addr.to_string(), "10.1.0.2:9000");

    // The port without a rule: the service's cluster, counted as unmatched.
    let other = dst("10.96.0.10:9001");
    let Route::Fast(r) = s.route(other, CLIENT) else {
        panic!("in the table")
    };
    assert!(r.rule.is_none());
    assert_eq!(
        r.cluster.name,
        "outbound|9001||tcp-echo.default.svc.cluster.local"
    );
    assert_eq!(r.listener.unmatched_connections(), 1);
    // An IPv4-mapped IPv6 destination is the same service address.
    let mapped = OrigDst("[::ffff:10.96.0.10]:9001".parse().unwrap());
    assert!(matches!(s.route(mapped, CLIENT), Route::Fast(_)));
}

#[test]
fn the_table_balances_by_least_request_on_the_endpoints_counts() {
    let s = snapshot(BASE);
    let d = dst("10.96.0.10:9000");
    let Route::Fast(r) = s.route(d, CLIENT) else {
        panic!("in the table")
    };
    let busy = &r.cluster.endpoints[0];
    let other = r.cluster.endpoints[1].address.to_string();
    // Two endpoints: least-request compares both, so the busy one is never chosen.
    busy.load.fetch_add(5, std::sync::atomic::Ordering::Relaxed);
    for _ in 0..20 {
        let Route::Fast(r) = s.route(d, CLIENT) else {
            panic!("in the table")
        };
        assert_eq!(picked(&r).addr.to_string(), other);
    }
    busy.load.fetch_sub(5, std::sync::atomic::Ordering::Relaxed);
}

/// A service `rr` at 10.96.0.20:9000 with `pods` endpoints, balanced by round robin.
fn round_robin_service(pods: u8) -> String {
    let mut y = String::from(
        "---\napiVersion: v1\nkind: Service\nmetadata: {name: rr}\n\
         spec: {clusterIP: 10.96.0.20, selector: {app: rr}, ports: [{name: tcp, port: 9000}]}\n\
         ---\napiVersion: networking.istio.io/v1beta1\nkind: DestinationRule\n\
         metadata: {name: rr}\nspec: {host: rr, trafficPolicy: {loadBalancer: {simple: ROUND_ROBIN}}}\n",
    );
    for i in 0..pods {
        y += &format!(
            "---\napiVersion: v1\nkind: Pod\nmetadata: {{name: rr-{i}, labels: {{app: rr}}}}\n\
             status: {{podIP: 10.1.2.{}}}\n",
            10 + i
        );
    }
    y
}

#[test]
fn the_table_balances_by_round_robin_on_the_clusters_own_cursor() {
    let s = snapshot(&format!("{BASE}{}", round_robin_service(3)));
    let d = dst("10.96.0.20:9000");
    assert_eq!(routed_in(&s, "10.96.0.20:9000"), "table");
    let Route::Fast(first) = s.route(d, CLIENT) else {
        panic!("in the table")
    };
    let cluster = first.cluster.clone();
    let order: Vec<String> = cluster
        .endpoints
        .iter()
        .map(|e| e.address.to_string())
        .collect();
    // Alternate the table and the cluster's own pick: one cursor, so one exact cycle that
    // carries on from the first pick above.
    let seq: Vec<String> = (0..8)
        .map(|i| {
            if i % 2 == 0 {
                let Route::Fast(r) = s.route(d, CLIENT) else {
                    panic!("in the table")
                };
                assert!(Arc::ptr_eq(r.cluster, &cluster));
                assert_eq!(picked(&r).addr.to_string(), order[picked(&r).index]);
                picked(&r).addr.to_string()
            } else {
                cluster.pick(CLIENT).unwrap().address.to_string()
            }
        })
        .collect();
    let k = order
        .iter()
        .position(|a| *a == picked(&first).addr.to_string())
        .unwrap();
    let expected: Vec<String> = (1..=8).map(|i| order[(k + i) % 3].clone()).collect();
    assert_eq!(seq, expected);
}

#[test]
fn round_robin_over_more_endpoints_than_a_cell_holds_is_picked_by_the_cluster() {
    let s = snapshot(&format!("{BASE}{}", round_robin_service(7)));
    let d = dst("10.96.0.20:9000");
    // The table names the cluster; the cluster picks, on the same cursor.
    let Route::Fast(r) = s.route(d, CLIENT) else {
        panic!("in the table")
    };
    assert!(r.endpoint.is_none());
    assert_eq!(r.cluster.endpoints.len(), 7);
    let seen: std::collections::HashSet<String> = (0..7)
        .map(|_| r.cluster.pick(CLIENT).unwrap().address.to_string())
        .collect();
    assert_eq!(seen.len(), 7, "seven picks, seven endpoints");
}

#[test]
fn with_outlier_detection_the_table_splits_and_the_cluster_picks() {
    let dr = "---\napiVersion: networking.istio.io/v1beta1\nkind: DestinationRule\n\
              metadata: {name: tcp-echo-destination}\nspec:\n  host: tcp-echo\n  \
              trafficPolicy: {outlierDetection: {consecutive5xxErrors: 3}}\n  \
              subsets: [{name: v1, labels: {version: v1}}, {name: v2, labels: {version: v2}}]\n";
    let base = &BASE[..BASE.find("---\napiVersion: networking.istio.io").unwrap()];
    let s = snapshot(&format!("{base}{dr}{}", split(80, 20)));
    let d = dst("10.96.0.10:9000");
    let Outbound::Service(l) = s.route_outbound(d) else {
        panic!("a service")
    };
    // The split is the table's, exact and shared with the listener's own route; the
    // endpoint is left to the cluster, which knows the ejections and reads the clock.
    let seq = alternate_table_and_listener(&s, d, |r| {
        assert!(r.endpoint.is_none(), "the cluster picks");
        assert!(r.cluster.policy.outlier_detection.is_some());
    });
    assert_eq!(
        seq,
        ["v1", "v1", "v2", "v1", "v1", "v1", "v1", "v2", "v1", "v1"]
    );
    assert_eq!(l.rules[0].connections().to_vec(), vec![8, 2]);
}

#[test]
fn the_table_leaves_what_it_cannot_decide_to_the_listener() {
    let three_way = vs(
        "tcp-echo",
        "  hosts: [tcp-echo]\n  tcp:\n  - route:\n    \
         - destination: {host: tcp-echo, port: {number: 9000}, subset: v1}\n      weight: 50\n    \
         - destination: {host: tcp-echo, port: {number: 9000}, subset: v2}\n      weight: 30\n    \
         - destination: {host: tcp-echo, port: {number: 9000}}\n      weight: 20\n",
    );
    let subnet = vs(
        "tcp-echo",
        "  hosts: [tcp-echo]\n  tcp:\n  - match: [{destinationSubnets: [10.96.0.0/16]}]\n    route:\n    \
         - destination: {host: tcp-echo, subset: v1}\n",
    );
    let cases = [
        (format!("{BASE}{three_way}"), "three destinations"),
        (format!("{BASE}{subnet}"), "a condition to check"),
    ];
    for (yaml, why) in cases {
        let s = snapshot(&yaml);
        assert_eq!(routed_in(&s, "10.96.0.10:9000"), "listener", "{why}");
        // Routed the same way all the same.
        assert_ne!(route(&s, "10.96.0.10:9000"), "no route", "{why}");
    }
}

#[test]
fn ipv6_service_addresses_match_whatever_flow_label_or_scope_the_destination_carries() {
    let svc = "---\napiVersion: v1\nkind: Service\nmetadata: {name: six}\n\
               spec: {clusterIP: 10.96.0.60, clusterIPs: [10.96.0.60, 'fd00::60'], selector: {app: tcp-echo},\n\
               \x20 ports: [{name: tcp, port: 9000}]}\n";
    let s = snapshot(&format!("{BASE}{svc}"));
    let v6 = std::net::SocketAddrV6::new("fd00::60".parse().unwrap(), 9000, 7, 3);
    let d = OrigDst(SocketAddr::V6(v6));
    assert!(matches!(s.route_outbound(d), Outbound::Service(_)));
    // IPv6 is not in the table: the listener routes it.
    assert!(matches!(s.route(d, CLIENT), Route::Listener(_)));
}

/// `n` more `tcp-echo` pods labelled `version: v1`, at 10.1.2.0 and up.
fn more_v1_pods(n: usize) -> String {
    (0..n)
        .map(|i| {
            format!(
                "---\napiVersion: v1\nkind: Pod\nmetadata: {{name: extra-{i}, labels: {{app: tcp-echo, version: v1}}}}\n\
                 status: {{podIP: 10.1.2.{i}}}\n"
            )
        })
        .collect()
}

#[test]
fn destinations_with_more_endpoints_than_a_cell_holds_are_decided_in_the_table_too() {
    // v1: 9 endpoints, past the cell's six; v2 keeps its one, in the cell.
    let s = snapshot(&format!("{BASE}{}{}", more_v1_pods(8), split(80, 20)));
    let d = dst("10.96.0.10:9000");
    let mut seen = std::collections::BTreeSet::new();
    let mut v2 = 0;
    for _ in 0..500 {
        let Route::Fast(r) = s.route(d, CLIENT) else {
            panic!("in the table")
        };
        assert_eq!(
            r.cluster.endpoints[picked(&r).index].address.to_string(),
            picked(&r).addr.to_string()
        );
        if r.cluster.subset.as_deref() == Some("v2") {
            v2 += 1;
            assert_eq!(picked(&r).addr.to_string(), "10.1.0.3:9000");
        }
        seen.insert(picked(&r).addr);
    }
    assert_eq!(v2, 100, "the split is exact");
    assert_eq!(
        seen.len(),
        10,
        "every endpoint of both subsets is picked: {seen:?}"
    );

    // Least-request on the spilled endpoints' counts: with every other one idle, a busy
    // endpoint always loses the comparison.
    let Route::Fast(r) = s.route(d, CLIENT) else {
        panic!("in the table")
    };
    let v1 = r.cluster.clone(); // a new period of a a b a a starts with v1
    assert_eq!((v1.subset.as_deref(), v1.endpoints.len()), (Some("v1"), 9));
    let busy = &v1.endpoints[4];
    busy.load.fetch_add(3, std::sync::atomic::Ordering::Relaxed);
    for _ in 0..200 {
        let Route::Fast(r) = s.route(d, CLIENT) else {
            panic!("in the table")
        };
        assert_ne!(picked(&r).addr.to_string(), busy.address.to_string());
    }
    busy.load.fetch_sub(3, std::sync::atomic::Ordering::Relaxed);
    // The whole service, without a rule: 11 endpoints, all spilled.
    assert_eq!(routed_in(&s, "10.96.0.10:9001"), "table");
}
