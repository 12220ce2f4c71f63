//! The routing core's cost as the number of services grows: what a reload costs
//! (`routing::compile`, from resources already parsed, and from YAML text) and what one new
//! connection costs (`Snapshot::route_outbound` + `Listener::route` + `Cluster::pick`).
//!
//! ```sh
//! cargo bench --bench routing                 # everything, about two minutes
//! cargo bench --bench routing -- route/       # only the per-connection lookup
//! VEER_BENCH_QUICK=1 cargo bench --bench routing   # shorter runs (scripts/bench.sh --quick)
//! ```
//!
//! The mesh is generated in memory, `N` ∈ {10, 1 000, 10 000} services, each with:
//! a Service (ClusterIP `10.96.x.y`, ports 9000 `tcp` and 9001 `tcp-other`), a DestinationRule
//! with subsets `v1`/`v2`, a VirtualService sending port 9000 80/20 to `v1`/`v2`, and 5 Pods
//! (3 labelled `v1`, 2 `v2`). So 10 000 services are 20 000 listeners and 50 000 endpoints.
//!
//! Targets (scripts/bench.sh prints them beside the figures): the lookup stays flat within 2×
//! from 10 to 10 000 services, and compiling 10 000 services takes under 200 ms.

use std::hint::black_box;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::time::Duration;

use criterion::{
    criterion_group, criterion_main, BatchSize, BenchmarkId, Criterion, SamplingMode, Throughput,
};

use veer::addr::{ClientAddr, OrigDst};
use veer::config::model::*;
use veer::config::{parse_documents, ConfigSet, Loaded, Source};
use veer::routing::{compile, Outbound, OutboundTrafficPolicy, ProxyIdentity, ProxyMode, Snapshot};

const SIZES: [usize; 3] = [10, 1_000, 10_000];
const PODS_PER_SERVICE: usize = 5;
/// Pods `0..V1_PODS` of a service are `version: v1`, the rest `v2`.
const V1_PODS: usize = 3;
/// Destinations cycled through by the lookup bench: enough that 10 000 services are visited
/// in a cache-unfriendly order, a power of two so the index is a mask.
const LOOKUP_SEQUENCE: usize = 1 << 14;

/// Warm-up and measurement time per benchmark; `VEER_BENCH_QUICK=1` shortens them.
fn timing(warm_up: Duration, measure: Duration) -> (Duration, Duration) {
    if std::env::var("VEER_BENCH_QUICK").is_ok_and(|v| v == "1") {
        (Duration::from_millis(300), Duration::from_secs(1))
    } else {
        (warm_up, measure)
    }
}

fn nth_ip(base: Ipv4Addr, n: usize) -> Ipv4Addr {
    Ipv4Addr::from(u32::from(base) + 1 + u32::try_from(n).expect("small index"))
}

fn service_ip(i: usize) -> Ipv4Addr {
    nth_ip(Ipv4Addr::new(10, 96, 0, 0), i)
}

fn pod_ip(i: usize, k: usize) -> Ipv4Addr {
    nth_ip(Ipv4Addr::new(10, 128, 0, 0), i * PODS_PER_SERVICE + k)
}

fn name(i: usize) -> String {
    format!("svc-{i:05}")
}

fn labels(pairs: &[(&str, &str)]) -> Labels {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

fn meta(name: String, labels: Labels) -> ObjectMeta {
    ObjectMeta {
        name,
        namespace: Some("default".into()),
        labels,
        ..ObjectMeta::default()
    }
}

fn version(k: usize) -> &'static str {
    if k < V1_PODS {
        "v1"
    } else {
        "v2"
    }
}

/// The resources of service `i`, in the order a `kubectl get -o yaml` dump would list them.
fn service_resources(i: usize) -> Vec<Resource> {
    let app = name(i);
    let mut out = vec![
        Resource::Service(Service {
            metadata: meta(app.clone(), labels(&[("app", &app)])),
            spec: ServiceSpec {
                cluster_ip: Some(service_ip(i).to_string()),
                ports: vec![
                    ServicePort {
                        name: Some("tcp".into()),
                        port: 9000,
                        ..ServicePort::default()
                    },
                    ServicePort {
                        name: Some("tcp-other".into()),
                        port: 9001,
                        ..ServicePort::default()
                    },
                ],
                selector: labels(&[("app", &app)]),
                ..ServiceSpec::default()
            },
        }),
        Resource::DestinationRule(DestinationRule {
            metadata: meta(app.clone(), Labels::new()),
            spec: DestinationRuleSpec {
                host: app.clone(),
                subsets: ["v1", "v2"]
                    .iter()
                    .map(|v| Subset {
                        name: v.to_string(),
                        labels: labels(&[("version", v)]),
                        traffic_policy: None,
                    })
                    .collect(),
                ..DestinationRuleSpec::default()
            },
        }),
        Resource::VirtualService(VirtualService {
            metadata: meta(app.clone(), Labels::new()),
            spec: VirtualServiceSpec {
                hosts: vec![app.clone()],
                tcp: vec![TcpRoute {
                    matches: vec![L4MatchAttributes {
                        port: Some(9000),
                        ..L4MatchAttributes::default()
                    }],
                    route: [("v1", 80), ("v2", 20)]
                        .iter()
                        .map(|(subset, weight)| RouteDestination {
                            destination: Destination {
                                host: app.clone(),
                                subset: Some(subset.to_string()),
                                port: Some(PortSelector { number: Some(9000) }),
                            },
                            weight: Some(*weight),
                        })
                        .collect(),
                }],
                ..VirtualServiceSpec::default()
            },
        }),
    ];
    for k in 0..PODS_PER_SERVICE {
        out.push(Resource::Pod(Pod {
            metadata: meta(
                format!("{app}-{k}"),
                labels(&[("app", &app), ("version", version(k))]),
            ),
            spec: PodSpec::default(),
            status: PodStatus {
                pod_ip: Some(pod_ip(i, k).to_string()),
                ..PodStatus::default()
            },
        }));
    }
    out
}

/// `n` services built directly from the model (what `load_paths` would have produced).
fn config(n: usize) -> ConfigSet {
    let file = PathBuf::from("generated.yaml");
    let resources = (0..n)
        .flat_map(service_resources)
        .enumerate()
        .map(|(doc, resource)| Loaded {
            source: Source {
                file: file.clone(),
                document: doc + 1,
                list_item: None,
                text: None,
            },
            resource,
        })
        .collect();
    ConfigSet {
        files: vec![file],
        resources,
    }
}

/// The same mesh as one multi-document YAML file, as a user would keep it on disk.
fn config_yaml(n: usize) -> String {
    let mut y = String::with_capacity(n * 1_600);
    for i in 0..n {
        let app = name(i);
        let ip = service_ip(i);
        y.push_str(&format!(
            "---\napiVersion: v1\nkind: Service\nmetadata: {{name: {app}, labels: {{app: {app}}}}}\n\
             spec:\n  clusterIP: {ip}\n  selector: {{app: {app}}}\n  \
             ports: [{{name: tcp, port: 9000}}, {{name: tcp-other, port: 9001}}]\n\
             ---\napiVersion: networking.istio.io/v1beta1\nkind: DestinationRule\n\
             metadata: {{name: {app}}}\nspec:\n  host: {app}\n  \
             subsets: [{{name: v1, labels: {{version: v1}}}}, {{name: v2, labels: {{version: v2}}}}]\n\
             ---\napiVersion: networking.istio.io/v1beta1\nkind: VirtualService\n\
             metadata: {{name: {app}}}\nspec:\n  hosts: [{app}]\n  tcp:\n  - match: [{{port: 9000}}]\n    \
             route:\n    - destination: {{host: {app}, subset: v1, port: {{number: 9000}}}}\n      weight: 80\n    \
             - destination: {{host: {app}, subset: v2, port: {{number: 9000}}}}\n      weight: 20\n"
        ));
        for k in 0..PODS_PER_SERVICE {
            y.push_str(&format!(
                "---\napiVersion: v1\nkind: Pod\nmetadata: {{name: {app}-{k}, labels: {{app: {app}, version: {}}}}}\n\
                 status: {{podIP: {}}}\n",
                version(k),
                pod_ip(i, k)
            ));
        }
    }
    y
}

fn identity() -> ProxyIdentity {
    ProxyIdentity {
        namespace: "default".into(),
        labels: labels(&[("app", "bench-client")]),
        mode: ProxyMode::Sidecar,
    }
}

fn build(cfg: ConfigSet) -> Snapshot {
    compile(cfg, identity(), OutboundTrafficPolicy::AllowAny, 1).expect("generated config compiles")
}

/// Service-port destinations in a fixed pseudo-random order (xorshift), all on port 9000 so
/// every lookup walks the VirtualService rule, the 80/20 pick and a subset's endpoints.
fn destinations(n: usize) -> Vec<OrigDst> {
    let mut x: u64 = 0x9E37_79B9_7F4A_7C15;
    (0..LOOKUP_SEQUENCE)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            let i = usize::try_from(x % n as u64).expect("index fits");
            OrigDst(SocketAddr::new(IpAddr::V4(service_ip(i)), 9000))
        })
        .collect()
}

/// One connection's routing work, as the outbound listener does it.
fn route_one(snap: &Snapshot, dst: OrigDst, client: ClientAddr) -> Option<SocketAddr> {
    match snap.route_outbound(dst) {
        Outbound::Service(listener) => {
            let (_rule, cluster) = listener.route(dst.0.ip(), None)?;
            match &cluster.pick(client)?.address {
                veer::routing::EndpointAddr::Socket(s) => Some(*s),
                veer::routing::EndpointAddr::Dns { .. } => None,
            }
        }
        Outbound::Passthrough | Outbound::Refused => None,
    }
}

/// Checks once per size that the generated mesh compiles to what the bench claims to measure.
fn sanity_check(n: usize, snap: &Snapshot, client: ClientAddr) {
    assert_eq!(snap.listeners.len(), 2 * n, "two listeners per service");
    let endpoints: usize = snap
        .clusters
        .values()
        .filter(|c| c.subset.is_none() && c.port == 9001)
        .map(|c| c.endpoints.len())
        .sum();
    assert_eq!(
        endpoints,
        PODS_PER_SERVICE * n,
        "five endpoints per service"
    );
    let dst = OrigDst(SocketAddr::new(IpAddr::V4(service_ip(n - 1)), 9000));
    let Outbound::Service(listener) = snap.route_outbound(dst) else {
        panic!("{dst} is not a service")
    };
    let (rule, cluster) = listener.route(dst.0.ip(), None).expect("routed");
    assert!(
        rule.is_some(),
        "port 9000 goes through the VirtualService rule"
    );
    assert!(cluster.subset.is_some(), "to a subset");
    assert!(route_one(snap, dst, client).is_some(), "to an endpoint");
    eprintln!(
        "routing bench: {n} services → {} listeners, {} clusters, {endpoints} endpoints",
        snap.listeners.len(),
        snap.clusters.len()
    );
}

fn bench_route(c: &mut Criterion) {
    let client = ClientAddr(SocketAddr::from(([10, 250, 0, 10], 40_000)));
    let mut group = c.benchmark_group("route");
    group.throughput(Throughput::Elements(1));
    let (warm_up, measure) = timing(Duration::from_secs(1), Duration::from_secs(3));
    group.warm_up_time(warm_up);
    group.measurement_time(measure);
    for n in SIZES {
        let snap = build(config(n));
        sanity_check(n, &snap, client);
        let dsts = destinations(n);
        group.bench_with_input(BenchmarkId::from_parameter(n), &n, |b, _| {
            let mut i = 0usize;
            b.iter(|| {
                let dst = dsts[i & (LOOKUP_SEQUENCE - 1)];
                i = i.wrapping_add(1);
                black_box(route_one(&snap, black_box(dst), client))
            });
        });
    }
    group.finish();
}

fn bench_compile(c: &mut Criterion) {
    let mut group = c.benchmark_group("compile");
    group.sample_size(10);
    group.sampling_mode(SamplingMode::Flat);
    let (warm_up, measure) = timing(Duration::from_secs(1), Duration::from_secs(4));
    group.warm_up_time(warm_up);
    group.measurement_time(measure);
    for n in SIZES {
        let cfg = config(n);
        group.throughput(Throughput::Elements(n as u64));
        group.bench_with_input(BenchmarkId::from_parameter(n), &cfg, |b, cfg| {
            // The clone (what the loader hands over) is set-up; the snapshot's drop is not
            // timed either (criterion drops batched outputs after measuring).
            b.iter_batched(|| cfg.clone(), build, BatchSize::PerIteration);
        });
    }
    group.finish();
}

/// A reload from disk minus the file read: parse the YAML, then compile.
fn bench_reload_yaml(c: &mut Criterion) {
    let mut group = c.benchmark_group("reload_yaml");
    group.sample_size(10);
    group.sampling_mode(SamplingMode::Flat);
    let (warm_up, measure) = timing(Duration::from_secs(1), Duration::from_secs(4));
    group.warm_up_time(warm_up);
    group.measurement_time(measure);
    let file = PathBuf::from("generated.yaml");
    for n in SIZES {
        let text = config_yaml(n);
        let parsed = parse_documents(&text, &file).expect("generated YAML parses");
        assert_eq!(parsed.len(), n * (3 + PODS_PER_SERVICE));
        group.throughput(Throughput::Elements(n as u64));
        group.bench_with_input(BenchmarkId::from_parameter(n), &text, |b, text| {
            b.iter(|| {
                let resources = parse_documents(text, &file).expect("parses");
                build(ConfigSet {
                    files: vec![file.clone()],
                    resources,
                })
            });
        });
    }
    group.finish();
}

criterion_group!(benches, bench_route, bench_compile, bench_reload_yaml);
criterion_main!(benches);
