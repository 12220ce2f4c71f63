//! The routing core's cost as the number of services grows: what a reload costs
//! (`routing::compile`, from resources already parsed, and from YAML text) and what one new
//! connection costs (`Snapshot::route`: the routing table's decision, endpoint included), to
//! services in a pseudo-random order (`route/N`) and always to the same one (`route_hot/N`).
//!
//! ```sh
//! cargo bench --bench routing                 # everything, about two minutes
//! cargo bench --bench routing -- route        # only the per-connection lookups
//! VEER_BENCH_QUICK=1 cargo bench --bench routing   # shorter runs (scripts/bench.sh --quick)
//! ```
//!
//! The mesh is generated in memory, `N` ∈ {10, 1 000, 10 000} services, each with:
//! a Service (ClusterIP `10.96.x.y`, ports 9000 `tcp` and 9001 `tcp-other`), a DestinationRule
//! with subsets `v1`/`v2`, a VirtualService sending port 9000 80/20 to `v1`/`v2`, and 5 Pods
//! (3 labelled `v1`, 2 `v2`). So 10 000 services are 20 000 listeners and 50 000 endpoints.
//!
//! `reload_edit/N` is a reload as the proxy runs it after one of 10 files was edited
//! (`ConfigSource::load` against the running snapshot: every file read, the edited one parsed,
//! the rest reused, then a compile).
//!
//! Each size starts with one timed compile (printed as `routing-bench-single compile N MS`).
//! A compile slower than 1 s is reported as that single run instead of being sampled, and
//! one that overruns `VEER_BENCH_COMPILE_BUDGET_S` (60 s; 20 s with `VEER_BENCH_QUICK=1`)
//! stops the bench there, so it always ends in bounded time. `VEER_BENCH_SIZES=10,1000`
//! picks other sizes.
//!
//! `miss/N` is the random order's baseline, measured in the same run: one dependent load to
//! a random cache line of a buffer as large as the memory the compile of `N` services made
//! resident (`routing-bench-resident N MB`, where the snapshot's structures lie). At 10 000 services the snapshot no
//! longer fits in the caches, so a lookup in random order costs its hot time plus one such
//! miss per line it reads that is not cached: `(route − route_hot) ÷ miss` counts them.
//!
//! Targets (scripts/bench.sh prints them beside the figures): the lookup stays flat within 2×
//! from 10 to 10 000 services, and compiling 10 000 services takes under 200 ms.

use std::hint::black_box;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::time::{Duration, Instant};

use criterion::measurement::WallTime;
use criterion::{BatchSize, BenchmarkGroup, BenchmarkId, Criterion, SamplingMode, Throughput};

use veer::addr::{ClientAddr, OrigDst};
use veer::config::model::*;
use veer::config::{parse_documents, ConfigSet, Loaded, Source};
use veer::routing::{
    compile, Outbound, OutboundTrafficPolicy, ProxyIdentity, ProxyMode, Route, Snapshot,
};

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
        labels: labels.into(),
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
    ConfigSet::new(vec![file], resources)
}

/// The same mesh as one multi-document YAML file, as a user would keep it on disk.
fn config_yaml(n: usize) -> String {
    services_yaml(0..n)
}

/// The YAML of services `range` (see [`config_yaml`]).
fn services_yaml(range: std::ops::Range<usize>) -> String {
    let mut y = String::with_capacity(range.len() * 1_600);
    for i in range {
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

/// One connection's routing work, as the outbound listener does it: the table's decision
/// (rule, destination, endpoint), or the listener's route and the cluster's pick where the
/// table does not cover the listener.
fn route_one(snap: &Snapshot, dst: OrigDst, client: ClientAddr) -> Option<SocketAddr> {
    // What the outbound path does when the table leaves the pick to the cluster.
    let cluster_pick = |cluster: &veer::routing::Cluster| match &cluster.pick(client)?.address {
        veer::routing::EndpointAddr::Socket(s) => Some(*s),
        veer::routing::EndpointAddr::Dns { .. } => None,
    };
    match snap.route(dst, client) {
        Route::Fast(routed) => match routed.endpoint {
            Some(picked) => Some(picked.addr),
            None => cluster_pick(routed.cluster),
        },
        Route::Listener(listener) => {
            let (_rule, cluster) = listener.route(dst.0.ip(), None)?;
            cluster_pick(&cluster)
        }
        Route::Passthrough | Route::Refused => None,
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
    let Route::Fast(routed) = snap.route(dst, client) else {
        panic!("{dst}: the routing table covers the bench's listeners")
    };
    assert!(routed.rule.is_some() && routed.cluster.subset.is_some());
    assert!(route_one(snap, dst, client).is_some(), "to an endpoint");
    eprintln!(
        "routing bench: {n} services → {} listeners, {} clusters, {endpoints} endpoints",
        snap.listeners.len(),
        snap.clusters.len()
    );
}

/// A first compile slower than this is reported as that one run instead of being sampled
/// (criterion takes at least 10 samples plus warm-up).
const SAMPLE_LIMIT: Duration = Duration::from_secs(1);

/// `VEER_BENCH_SIZES=10,1000` overrides the service counts.
fn sizes() -> Vec<usize> {
    match std::env::var("VEER_BENCH_SIZES") {
        Ok(v) => v
            .split(',')
            .map(|n| n.trim().parse().expect("VEER_BENCH_SIZES: numbers"))
            .collect(),
        Err(_) => SIZES.to_vec(),
    }
}

/// How long the first compile of one size may take before the bench gives up on that size
/// and larger ones (`VEER_BENCH_COMPILE_BUDGET_S`, default 60 s, 20 s when quick).
fn compile_budget() -> Duration {
    let quick = std::env::var("VEER_BENCH_QUICK").is_ok_and(|v| v == "1");
    let secs = std::env::var("VEER_BENCH_COMPILE_BUDGET_S")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(if quick { 20 } else { 60 });
    Duration::from_secs(secs)
}

/// Compiles `n` services once on a helper thread, waiting at most `budget`. The time is
/// printed (`routing-bench-single compile N MS`) so scripts/bench.sh has a figure even when
/// the size is too slow to sample.
/// Also returns how much the resident memory grew during the compile (the memory the
/// snapshot's structures were laid out in).
fn first_compile(n: usize, budget: Duration) -> Option<(Snapshot, Duration, Option<usize>)> {
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let cfg = config(n);
        // compile() starts with validate(); timed alone too, so a slow reload can be split
        // into validation and linking.
        let start = Instant::now();
        let report = veer::config::validate(&cfg);
        println!(
            "routing-bench-single validate {n} {:.3}",
            ms(start.elapsed())
        );
        assert!(report.errors.is_empty(), "generated config validates");
        let before = resident_bytes();
        let start = Instant::now();
        let snap = build(cfg);
        let took = start.elapsed();
        let grown = before
            .zip(resident_bytes())
            .map(|(b, a)| a.saturating_sub(b));
        let _ = tx.send((snap, took, grown));
    });
    rx.recv_timeout(budget).ok()
}

/// This process's resident memory (`/proc/self/statm`, 4 KiB pages).
fn resident_bytes() -> Option<usize> {
    let statm = std::fs::read_to_string("/proc/self/statm").ok()?;
    let pages: usize = statm.split_whitespace().nth(1)?.parse().ok()?;
    Some(pages * 4096)
}

/// A buffer of `bytes` whose cache lines form one random cycle: following it, each load
/// depends on the one before and lands on a line anywhere in the buffer. The lookup's
/// baseline: what one pointer costs when its target is somewhere in that much memory.
fn miss_chain(bytes: usize) -> Vec<u32> {
    const PER_LINE: usize = 64 / std::mem::size_of::<u32>();
    let lines = (bytes / 64).max(2);
    let mut next: Vec<u32> = (0..lines)
        .map(|i| u32::try_from(i).expect("under 256 GiB"))
        .collect();
    // Sattolo's shuffle: a single cycle through every line.
    let mut x: u64 = 0x2545_F491_4F6C_DD1D;
    for i in (1..lines).rev() {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        let j = usize::try_from(x % i as u64).expect("index fits");
        next.swap(i, j);
    }
    let mut chain = vec![0u32; lines * PER_LINE];
    for (line, to) in next.into_iter().enumerate() {
        chain[line * PER_LINE] = to * PER_LINE as u32;
    }
    chain
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

/// Every measurement for `n` services. `false`: the compile overran its budget.
fn bench_size(c: &mut Criterion, n: usize) -> bool {
    let budget = compile_budget();
    let Some((snap, first, grown)) = first_compile(n, budget) else {
        println!(
            "routing-bench-timeout {n} {} (compile of {n} services did not finish within {budget:?}; \
             nothing measured for {n} services or more)",
            budget.as_secs()
        );
        return false;
    };
    println!("routing-bench-single compile {n} {:.3}", ms(first));
    if let Some(bytes) = grown {
        println!(
            "routing-bench-resident {n} {:.1}",
            bytes as f64 / (1 << 20) as f64
        );
    }
    let client = ClientAddr(SocketAddr::from(([10, 250, 0, 10], 40_000)));
    sanity_check(n, &snap, client);
    let sampled = first <= SAMPLE_LIMIT;

    // Per connection: Snapshot::route, as the outbound listener calls it.
    let mut group = c.benchmark_group("route");
    group.throughput(Throughput::Elements(1));
    let (warm_up, measure) = timing(Duration::from_secs(1), Duration::from_secs(3));
    group.warm_up_time(warm_up);
    group.measurement_time(measure);
    let dsts = destinations(n);
    group.bench_with_input(BenchmarkId::from_parameter(n), &n, |b, _| {
        let mut i = 0usize;
        b.iter(|| {
            let dst = dsts[i & (LOOKUP_SEQUENCE - 1)];
            i = i.wrapping_add(1);
            black_box(route_one(&snap, black_box(dst), client))
        });
    });
    group.finish();

    // The same, always to one service: the lookup's own work with warm caches (the random
    // order above also pays for cache misses, which grow with the table).
    let mut group = c.benchmark_group("route_hot");
    group.throughput(Throughput::Elements(1));
    group.warm_up_time(warm_up);
    group.measurement_time(measure);
    let hot = OrigDst(SocketAddr::new(IpAddr::V4(service_ip(n / 2)), 9000));
    group.bench_with_input(BenchmarkId::from_parameter(n), &n, |b, _| {
        b.iter(|| black_box(route_one(&snap, black_box(hot), client)));
    });
    group.finish();
    drop(snap);

    // The baseline for the random order: one dependent load anywhere in as much memory as
    // the compile made resident. (random − hot) ÷ this is how many trips to memory the
    // random order adds to a lookup.
    if let Some(bytes) = grown {
        let chain = miss_chain(bytes);
        let mut group = c.benchmark_group("miss");
        group.throughput(Throughput::Elements(1));
        group.warm_up_time(warm_up);
        group.measurement_time(measure);
        group.bench_with_input(BenchmarkId::from_parameter(n), &n, |b, _| {
            let mut at = 0usize;
            b.iter(|| {
                at = chain[at] as usize;
                black_box(at)
            });
        });
        group.finish();
    }

    // Reload: compile from parsed resources.
    let cfg = config(n);
    if sampled {
        let mut group = reload_group(c, "compile", n);
        group.bench_with_input(BenchmarkId::from_parameter(n), &cfg, |b, cfg| {
            // The clone (what the loader hands over) is set-up; the snapshot's drop is not
            // timed either (criterion drops batched outputs after measuring).
            b.iter_batched(|| cfg.clone(), build, BatchSize::PerIteration);
        });
        group.finish();
    } else {
        println!(
            "routing-bench: compile/{n}: {:.1} ms in one run (over {SAMPLE_LIMIT:?}: not sampled)",
            ms(first)
        );
    }

    // Reload from YAML text: parse, then compile.
    let file = PathBuf::from("generated.yaml");
    let text = config_yaml(n);
    let start = Instant::now();
    let parsed = parse_documents(&text, &file).expect("generated YAML parses");
    let parse_time = start.elapsed();
    assert_eq!(parsed.len(), n * (3 + PODS_PER_SERVICE));
    drop(parsed);
    println!("routing-bench-single parse_yaml {n} {:.3}", ms(parse_time));
    if sampled {
        let mut group = reload_group(c, "reload_yaml", n);
        group.bench_with_input(BenchmarkId::from_parameter(n), &text, |b, text| {
            b.iter(|| {
                let resources = parse_documents(text, &file).expect("parses");
                build(ConfigSet::new(vec![file.clone()], resources))
            });
        });
        group.finish();
    } else {
        println!(
            "routing-bench-single reload_yaml {n} {:.3}",
            ms(parse_time + first)
        );
    }

    // Reload after editing one file of ten: only that file is parsed again.
    if let Some(once) = reload_edit(c, n, sampled) {
        println!("routing-bench-single reload_edit {n} {:.3}", ms(once));
    }
    true
}

/// A group for reload-sized work on `n` services: few samples of a flat loop, as each
/// iteration takes milliseconds to a second.
fn reload_group<'c>(c: &'c mut Criterion, name: &str, n: usize) -> BenchmarkGroup<'c, WallTime> {
    let mut group = c.benchmark_group(name);
    group.sample_size(10);
    group.sampling_mode(SamplingMode::Flat);
    let (warm_up, measure) = timing(Duration::from_secs(1), Duration::from_secs(4));
    group.warm_up_time(warm_up);
    group.measurement_time(measure);
    group.throughput(Throughput::Elements(n as u64));
    group
}

/// Files the mesh is split into for the edit-one-file reload.
const RELOAD_FILES: usize = 10;

/// A reload after one of [`RELOAD_FILES`] files was edited, as the proxy does it
/// (`ConfigSource::load` with the running snapshot): read every file, parse only the edited
/// one, compile. Returns the single-run time, or `None` when nothing could be set up.
fn reload_edit(c: &mut Criterion, n: usize, sampled: bool) -> Option<Duration> {
    let dir = std::env::temp_dir().join(format!("veer-bench-reload-{}-{n}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).ok()?;
    let per_file = n.div_ceil(RELOAD_FILES);
    for f in 0..RELOAD_FILES {
        let range = (f * per_file).min(n)..((f + 1) * per_file).min(n);
        std::fs::write(dir.join(format!("mesh-{f}.yaml")), services_yaml(range)).ok()?;
    }
    let source = veer::reload::ConfigSource {
        paths: vec![dir.clone()],
        identity: identity(),
        policy: OutboundTrafficPolicy::AllowAny,
    };
    let running = source.load(1, None).expect("generated config loads")?;
    // The edit: one more service in the first file.
    let mut first = std::fs::read_to_string(dir.join("mesh-0.yaml")).ok()?;
    first.push_str(&services_yaml(n + 1..n + 2));
    std::fs::write(dir.join("mesh-0.yaml"), first).ok()?;
    let start = Instant::now();
    let reloaded = source.load(2, Some(&running)).expect("edited config loads");
    let once = start.elapsed();
    assert!(reloaded.is_some(), "an edit is a change");
    drop(reloaded);
    if sampled && once < SAMPLE_LIMIT {
        let mut group = reload_group(c, "reload_edit", n);
        group.bench_function(BenchmarkId::from_parameter(n), |b| {
            b.iter_with_large_drop(|| source.load(2, Some(&running)).expect("loads"))
        });
        group.finish();
    }
    let _ = std::fs::remove_dir_all(&dir);
    Some(once)
}

fn main() {
    let mut c = Criterion::default().configure_from_args();
    for n in sizes() {
        if !bench_size(&mut c, n) {
            break;
        }
    }
    c.final_summary();
    // A compile that overran its budget is still running on its thread: do not wait for it.
    std::process::exit(0);
}
