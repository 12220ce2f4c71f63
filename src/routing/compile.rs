//! Config → snapshot, following Istio's semantics (design.md §2).
//!
//! Two passes: `validate` checks every resource on its own (weights, ports, CIDRs, required
//! fields) and reports all problems with their field paths; `Builder` links resources: service
//! registry → listeners per service address:port → ordered rules from mesh VirtualServices →
//! weighted clusters → DestinationRule subsets and policy → endpoints from Pods,
//! WorkloadEntries and ServiceEntries. The result is kept only if validation passed, but a
//! large config is linked while it is validated, so the linker must not fail on bad input.

use std::borrow::Cow;
use std::cell::OnceCell;
use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use ipnet::IpNet;
use rustc_hash::{FxHashMap, FxHashSet};
use smallvec::SmallVec;

use super::fast::FastBuilder;
use super::host;
use super::lb::LbPolicy;
use super::snapshot::*;
use super::weighted::Weight;
use crate::config::model::*;
use crate::config::{ConfigErrors, ConfigSet, Loaded};

/// The gateway name Istio uses for sidecars.
pub const MESH: &str = "mesh";

/// Compiles a loaded config for a proxy with `identity`. Fails with every problem found.
pub fn compile(
    config: ConfigSet,
    identity: ProxyIdentity,
    policy: OutboundTrafficPolicy,
    version: u64,
) -> Result<Snapshot, ConfigErrors> {
    recompile(config, identity, policy, version, None)
}

/// Like [`compile`], taking over state from the snapshot being replaced: endpoints that are
/// still there (same cluster, address and labels) keep their object, and so their active
/// connection counts (least-request balancing) and outlier state; clusters keep their
/// counters (`maxConnections`). A reload therefore forgets nothing about live traffic.
pub fn recompile(
    config: ConfigSet,
    identity: ProxyIdentity,
    policy: OutboundTrafficPolicy,
    version: u64,
    previous: Option<&Snapshot>,
) -> Result<Snapshot, ConfigErrors> {
    let validate = || crate::config::validate::validate(&config);
    // A large config is split over two threads (both only read it; the build is dropped if
    // validation fails): the second indexes routes, hands that over and validates, while
    // this one gathers services and workloads, indexes workloads by label, then links.
    // 10 000 services: 290 → 215 ms (no LTO). A small config is not worth a thread's start
    // (tens of µs against a compile of 100 µs), nor is a second thread on one CPU.
    let parallel = config.resources.len() >= PARALLEL_MIN && crate::config::load::second_cpu();
    let (report, built) = if parallel {
        std::thread::scope(|scope| {
            let (tx, rx) = std::sync::mpsc::sync_channel(1);
            let config = &config;
            let helper = std::thread::Builder::new()
                .name("veer-validate".into())
                .spawn_scoped(scope, move || {
                    let _ = tx.send(Indexes::new(config));
                    validate()
                });
            match helper {
                Ok(helper) => {
                    // A helper that died sends nothing: index here then (its panic is raised
                    // when the scope ends).
                    let built = link(config, &identity, previous, || {
                        rx.recv().unwrap_or_else(|_| Indexes::new(config))
                    });
                    let report = helper
                        .join()
                        .unwrap_or_else(|panic| std::panic::resume_unwind(panic));
                    (report, Some(built))
                }
                // No thread to be had (a process limit): validate first, as small configs do.
                Err(_) => (validate(), None),
            }
        })
    } else {
        (validate(), None)
    };
    if !report.errors.is_empty() {
        return Err(ConfigErrors(report.errors));
    }
    let Built {
        listeners,
        fast,
        cidr_listeners,
        gateway_ports,
        clusters,
        mut warnings,
    } = built.unwrap_or_else(|| link(&config, &identity, previous, || Indexes::new(&config)));
    warnings.extend(report.warnings.iter().map(ToString::to_string));
    Ok(Snapshot {
        fast,
        version,
        loaded_at: SystemTime::now(),
        identity,
        outbound_traffic_policy: policy,
        listeners,
        cidr_listeners,
        gateway_ports,
        clusters,
        warnings,
        config,
    })
}

/// Links `config` into listeners and clusters; `indexes` is called once the services and
/// workloads are gathered. Total: never fails or panics, valid or not, as a large config is
/// linked before validation has given its verdict.
fn link<'a>(
    config: &'a ConfigSet,
    identity: &'a ProxyIdentity,
    previous: Option<&'a Snapshot>,
    indexes: impl FnOnce() -> Indexes<'a>,
) -> Built {
    let mut b = Builder::new(config, identity, indexes);
    b.previous = previous;
    match identity.mode {
        ProxyMode::Sidecar => b.build_listeners(),
        ProxyMode::Gateway => b.build_gateway_listeners(),
    }
    if let Some(old) = previous {
        resume_splits(&b, old);
    }
    Built {
        listeners: b.listeners,
        fast: b.fast.finish(),
        cidr_listeners: b.cidr_listeners,
        gateway_ports: b.gateway_ports,
        clusters: b.clusters,
        warnings: b.warnings,
    }
}

/// Rules unchanged by a reload continue their weighted sequences (see
/// [`Listener::resume_from`]): each listener takes over from the one the old snapshot had
/// at the same address, CIDR or gateway port. Cost: one hash lookup per listener.
fn resume_splits(b: &Builder<'_>, old: &Snapshot) {
    for (addr, l) in &b.listeners {
        if let Some(o) = old.listeners.get(addr) {
            l.resume_from(o);
        }
    }
    for (net, port, l) in &b.cidr_listeners {
        if let Some((_, _, o)) = old
            .cidr_listeners
            .iter()
            .find(|(n, p, _)| n == net && p == port)
        {
            l.resume_from(o);
        }
    }
    for (port, l) in &b.gateway_ports {
        if let Some(o) = old.gateway_ports.get(port) {
            l.resume_from(o);
        }
    }
}

/// What linking looks up by host: VirtualServices and DestinationRules in rule order and by
/// host. Built on the second thread for a large config.
#[derive(Default)]
struct Indexes<'a> {
    /// In rule order (Istio's: creation time, then name and namespace).
    virtual_services: Vec<&'a Loaded>,
    destination_rules: Vec<&'a Loaded>,
    /// VirtualServices (indexes into `virtual_services`) by expanded exact host, and those
    /// with a wildcard host, so a listener looks only at the VirtualServices that can name
    /// its host.
    vs_by_host: FxHashMap<String, Few>,
    vs_wildcard: Vec<usize>,
    /// The expanded hosts of each VirtualService (parallel to `virtual_services`), expanded
    /// once instead of once per listener that looks at it.
    vs_hosts: Vec<SmallVec<[String; 1]>>,
    /// `namespace/name` of each VirtualService (parallel to `virtual_services`), shared by its
    /// rules in every listener.
    vs_names: Vec<Arc<str>>,
    /// DestinationRules (indexes into `destination_rules`) by expanded exact host; wildcard
    /// ones are few and checked one by one.
    dr_by_host: FxHashMap<String, Few>,
    dr_wildcard: Vec<usize>,
    /// The expanded host of each DestinationRule (parallel to `destination_rules`).
    dr_hosts: Vec<String>,
}

impl<'a> Indexes<'a> {
    fn new(config: &'a ConfigSet) -> Self {
        let mut ix = Indexes::default();
        for loaded in &config.resources {
            match &loaded.resource {
                Resource::VirtualService(_) => ix.virtual_services.push(loaded),
                Resource::DestinationRule(_) => ix.destination_rules.push(loaded),
                _ => {}
            }
        }
        // Istio orders VirtualServices (and so their rules) by creation time, then name and
        // namespace; files without timestamps therefore order by name.
        // Borrowed keys: a sort compares O(n log n) times, and owned keys cost three string
        // allocations per comparison (measured: most of this function at 10 000 services).
        fn key(l: &Loaded) -> (&str, &str, &str) {
            let m = l.resource.metadata();
            (
                m.creation_timestamp.as_deref().unwrap_or(""),
                m.name.as_str(),
                m.namespace(),
            )
        }
        ix.virtual_services.sort_by(|x, y| key(x).cmp(&key(y)));
        ix.destination_rules.sort_by(|x, y| key(x).cmp(&key(y)));
        for (i, loaded) in ix.virtual_services.iter().enumerate() {
            let m = loaded.resource.metadata();
            ix.vs_names
                .push(host::concat(&[m.namespace(), "/", &m.name]).into());
            let Resource::VirtualService(vs) = &loaded.resource else {
                ix.vs_hosts.push(SmallVec::new());
                continue;
            };
            let ns = vs.metadata.namespace();
            let mut wildcard = false;
            let hosts: SmallVec<[String; 1]> =
                vs.spec.hosts.iter().map(|h| host::expand(h, ns)).collect();
            for h in &hosts {
                if h.starts_with('*') {
                    wildcard = true;
                } else {
                    let list = ix.vs_by_host.entry(h.to_ascii_lowercase()).or_default();
                    if list.last() != Some(&i) {
                        list.push(i);
                    }
                }
            }
            ix.vs_hosts.push(hosts);
            if wildcard {
                ix.vs_wildcard.push(i);
            }
        }
        for (i, loaded) in ix.destination_rules.iter().enumerate() {
            let Resource::DestinationRule(dr) = &loaded.resource else {
                ix.dr_hosts.push(String::new());
                continue;
            };
            let h = host::expand(&dr.spec.host, dr.metadata.namespace());
            if h.starts_with('*') {
                ix.dr_wildcard.push(i);
            } else {
                ix.dr_by_host
                    .entry(h.to_ascii_lowercase())
                    .or_default()
                    .push(i);
            }
            ix.dr_hosts.push(h);
        }
        ix
    }
}

/// The address of a pod that is an endpoint: running or pending (not finished), on the pod
/// network (not hostNetwork), with an IP. `None`: not a workload.
fn pod_address(pod: &Pod) -> Option<&str> {
    if matches!(pod.status.phase.as_deref(), Some("Succeeded" | "Failed"))
        || pod.spec.host_network == Some(true)
    {
        return None;
    }
    pod.status
        .pod_ip
        .as_deref()
        .or_else(|| pod.status.pod_ips.first().map(|p| p.ip.as_str()))
}

/// For the fuzz harness: links `config` without validating it, as a large reload does
/// beside validation, so inputs that fail validation still exercise the linker. Returns the
/// number of listeners (gateway ports included) and clusters.
#[doc(hidden)]
pub fn link_unvalidated(config: &ConfigSet, identity: &ProxyIdentity) -> (usize, usize) {
    let built = link(config, identity, None, || Indexes::new(config));
    (
        built.listeners.len() + built.cidr_listeners.len() + built.gateway_ports.len(),
        built.clusters.len(),
    )
}

/// Resources from which indexing and validation run beside gathering and linking.
pub(crate) const PARALLEL_MIN: usize = 256;

/// What linking produces, before validation's verdict is known.
struct Built {
    listeners: FxHashMap<SocketAddr, Arc<Listener>>,
    fast: super::fast::Fast,
    cidr_listeners: Vec<(IpNet, u16, Arc<Listener>)>,
    gateway_ports: BTreeMap<u16, Arc<Listener>>,
    clusters: FxHashMap<String, Arc<Cluster>>,
    warnings: Vec<String>,
}

// ---------------------------------------------------------------------------------------------
// Validation of single resources: see crate::config::validate.

pub use crate::config::validate::parse_net;

// ---------------------------------------------------------------------------------------------
// Linking

/// How a service port maps to an endpoint port.
#[derive(Debug, Clone)]
enum Target<'a> {
    Same,
    Number(u16),
    Named(&'a str),
}

/// Borrows its names from the config (as the other build-time definitions do): nothing here
/// outlives the compile.
#[derive(Debug, Clone)]
struct PortDef<'a> {
    number: u16,
    name: &'a str,
    target: Target<'a>,
    /// Carries TLS (Istio's protocol selection: port name `tls`/`tls-*`, appProtocol or
    /// ServiceEntry protocol TLS), so `tls:` rules route it by SNI.
    tls: bool,
}

#[derive(Debug)]
enum ServiceKind<'a> {
    Kubernetes { selector: &'a Labels },
    Entry { spec: &'a ServiceEntrySpec },
}

#[derive(Debug)]
struct ServiceDef<'a> {
    /// Shared with its listeners and clusters (one allocation per service, not per object).
    host: Arc<str>,
    namespace: &'a str,
    vips: SmallVec<[IpAddr; 2]>,
    cidrs: Vec<IpNet>,
    ports: SmallVec<[PortDef<'a>; 2]>,
    kind: ServiceKind<'a>,
    /// The workloads (indexes into `Builder::workloads`) its selector picks, found once for
    /// all of its ports and subsets (a service has several clusters).
    selected: OnceCell<Workloads>,
}

/// Workload indexes (into `Builder::workloads`) of one label or selector. Inline up to a
/// handful: a Deployment's replicas fit, and 10 000 services' lists were 10 000 small
/// allocations to make and, on the reload's critical path, to free.
type Workloads = SmallVec<[usize; 6]>;

/// The VirtualServices or DestinationRules naming one host: nearly always one.
type Few = SmallVec<[usize; 1]>;

#[derive(Debug)]
struct Workload<'a> {
    namespace: &'a str,
    labels: &'a Labels,
    /// The labels again, shared by this workload's endpoints: a Pod's are already shared
    /// and are borrowed (a clone here was 50 000 reference-count round trips to scattered
    /// lines at 10 000 services, for the reload's critical path).
    shared_labels: Cow<'a, Arc<Labels>>,
    /// Parsed once (a workload is an endpoint of several clusters); `None`: not an IP.
    ip: Option<IpAddr>,
    origin: Arc<str>,
    /// Pod container ports by name.
    named_ports: BTreeMap<&'a str, u16>,
    /// A WorkloadEntry's `ports` (by service port name) — preferred over the target port.
    entry_ports: Option<&'a BTreeMap<String, u32>>,
}

struct Builder<'a> {
    identity: &'a ProxyIdentity,
    /// Hashed: looked up several times per cluster, and ordered lookups compared the long
    /// shared suffixes (`.default.svc.cluster.local`) of FQDNs at every level.
    services: FxHashMap<Arc<str>, ServiceDef<'a>>,
    /// Service hosts in load order, so listener conflicts resolve the same way every time.
    service_order: Vec<Arc<str>>,
    workloads: Vec<Workload<'a>>,
    /// Workloads by `(namespace, label key, label value)`: a selector only looks at the
    /// workloads carrying its rarest label instead of at every workload (what made compile
    /// quadratic in services × pods). Built on this thread from the workloads it has just
    /// gathered: when the helper built it beside `ix`, this thread waited 17-35 ms for it
    /// at 10 000 services.
    workloads_by_label: FxHashMap<(&'a str, &'a str, &'a str), Workloads>,
    /// Routes in rule order and by host.
    ix: Indexes<'a>,
    /// Gateways whose selector this proxy matches (gateway mode), as `namespace/name`.
    gateways: Vec<(String, &'a Gateway)>,
    listeners: FxHashMap<SocketAddr, Arc<Listener>>,
    /// The IPv4 listeners again, for the per-connection lookup.
    fast: FastBuilder,
    cidr_listeners: Vec<(IpNet, u16, Arc<Listener>)>,
    gateway_ports: BTreeMap<u16, Arc<Listener>>,
    clusters: FxHashMap<String, Arc<Cluster>>,
    warnings: Vec<String>,
    previous: Option<&'a Snapshot>,
}

fn u16_port(p: u32) -> u16 {
    u16::try_from(p).unwrap_or(0)
}

fn subset_of(want: &Labels, have: &Labels) -> bool {
    want.iter().all(|(k, v)| have.get(k) == Some(v))
}

impl<'a> Builder<'a> {
    /// Gathers services and workloads, then takes `indexes` (built meanwhile on another
    /// thread for a large config).
    fn new(
        config: &'a ConfigSet,
        identity: &'a ProxyIdentity,
        indexes: impl FnOnce() -> Indexes<'a>,
    ) -> Self {
        // Gateways are only read in gateway mode; a sidecar serves `mesh` alone.
        let gateway_mode = identity.mode == ProxyMode::Gateway;
        let mut b = Builder {
            identity,
            services: FxHashMap::default(),
            service_order: Vec::new(),
            workloads: Vec::new(),
            workloads_by_label: FxHashMap::default(),
            ix: Indexes::default(),
            gateways: Vec::new(),
            listeners: FxHashMap::default(),
            fast: FastBuilder::default(),
            cidr_listeners: Vec::new(),
            gateway_ports: BTreeMap::new(),
            clusters: FxHashMap::default(),
            warnings: Vec::new(),
            previous: None,
        };
        // Only label keys some selector uses are indexed: pods carry many labels
        // (pod-template-hash, team, …) that no Service selects on.
        let mut selector_keys: FxHashSet<&str> = FxHashSet::default();
        for loaded in &config.resources {
            let ns = loaded.resource.metadata().namespace();
            match &loaded.resource {
                Resource::Service(svc) => {
                    selector_keys.extend(svc.spec.selector.keys().map(String::as_str));
                    let ports = svc
                        .spec
                        .ports
                        .iter()
                        .map(|p| PortDef {
                            number: u16_port(p.port),
                            name: p.name.as_deref().unwrap_or(""),
                            tls: p
                                .app_protocol
                                .as_deref()
                                .is_some_and(|a| a.eq_ignore_ascii_case("tls"))
                                || p.name
                                    .as_deref()
                                    .is_some_and(|n| n == "tls" || n.starts_with("tls-")),
                            target: match &p.target_port {
                                None => Target::Same,
                                Some(IntOrString::Int(n)) => Target::Number(u16_port(*n)),
                                Some(IntOrString::String(s)) => match s.parse::<u32>() {
                                    Ok(n) => Target::Number(u16_port(n)),
                                    Err(_) => Target::Named(s),
                                },
                            },
                        })
                        .collect();
                    let vips = svc
                        .spec
                        .cluster_ips()
                        .iter()
                        .filter_map(|ip| ip.parse().ok())
                        .collect();
                    b.add_service(ServiceDef {
                        host: host::service_fqdn(&svc.metadata.name, ns).into(),
                        namespace: ns,
                        vips,
                        cidrs: Vec::new(),
                        ports,
                        kind: ServiceKind::Kubernetes {
                            selector: &svc.spec.selector,
                        },
                        selected: OnceCell::new(),
                    });
                }
                Resource::ServiceEntry(se) => {
                    if let Some(ws) = &se.spec.workload_selector {
                        selector_keys.extend(ws.match_labels.keys().map(String::as_str));
                    }
                    let mut vips = SmallVec::new();
                    let mut cidrs = Vec::new();
                    for a in &se.spec.addresses {
                        match parse_net(a) {
                            Some(net) if net.prefix_len() == net.max_prefix_len() => {
                                vips.push(net.addr())
                            }
                            Some(net) => cidrs.push(net),
                            None => {}
                        }
                    }
                    let ports: SmallVec<[PortDef<'a>; 2]> = se
                        .spec
                        .ports
                        .iter()
                        .map(|p| PortDef {
                            number: u16_port(p.number),
                            name: &p.name,
                            tls: p
                                .protocol
                                .as_deref()
                                .is_some_and(|pr| pr.eq_ignore_ascii_case("TLS")),
                            target: p
                                .target_port
                                .map_or(Target::Same, |t| Target::Number(u16_port(t))),
                        })
                        .collect();
                    for h in &se.spec.hosts {
                        b.add_service(ServiceDef {
                            host: host::expand(h, ns).into(),
                            namespace: ns,
                            vips: vips.clone(),
                            cidrs: cidrs.clone(),
                            ports: ports.clone(),
                            kind: ServiceKind::Entry { spec: &se.spec },
                            selected: OnceCell::new(),
                        });
                    }
                }
                Resource::Pod(pod) => {
                    let Some(address) = pod_address(pod) else {
                        continue;
                    };
                    let named_ports = pod
                        .spec
                        .containers
                        .iter()
                        .flat_map(|c| &c.ports)
                        .filter_map(|p| Some((p.name.as_deref()?, u16_port(p.container_port))))
                        .collect();
                    b.workloads.push(Workload {
                        namespace: ns,
                        labels: &pod.metadata.labels,
                        shared_labels: Cow::Borrowed(&pod.metadata.labels),
                        ip: address.parse().ok(),
                        origin: host::concat(&["Pod ", ns, "/", &pod.metadata.name]).into(),
                        named_ports,
                        entry_ports: None,
                    });
                }
                Resource::WorkloadEntry(we) => b.workloads.push(Workload {
                    namespace: ns,
                    labels: &we.spec.labels,
                    shared_labels: Cow::Owned(Arc::new(we.spec.labels.clone())),
                    ip: we.spec.address.parse().ok(),
                    origin: format!("WorkloadEntry {ns}/{}", we.metadata.name).into(),
                    named_ports: BTreeMap::new(),
                    entry_ports: Some(&we.spec.ports),
                }),
                // Indexed by `Indexes::new`.
                Resource::VirtualService(_) | Resource::DestinationRule(_) => {}
                Resource::Gateway(gw) => {
                    if gateway_mode && subset_of(&gw.spec.selector, &identity.labels) {
                        b.gateways.push((format!("{ns}/{}", gw.metadata.name), gw));
                    }
                }
            }
        }
        for (i, w) in b.workloads.iter().enumerate() {
            for (k, v) in w.labels {
                if selector_keys.contains(k.as_str()) {
                    b.workloads_by_label
                        .entry((w.namespace, k.as_str(), v.as_str()))
                        .or_default()
                        .push(i);
                }
            }
        }
        b.ix = indexes();
        b
    }

    fn add_service(&mut self, def: ServiceDef<'a>) {
        if let Some(first) = self.services.get_mut(&*def.host) {
            // The same Service as applied (no clusterIP) and as the API server reports it
            // (clusterIP allocated) is one Service: take the address from the definition
            // that has one. Anything else is a real conflict; the first definition wins.
            let both_kubernetes = matches!(
                (&first.kind, &def.kind),
                (
                    ServiceKind::Kubernetes { .. },
                    ServiceKind::Kubernetes { .. }
                )
            );
            if both_kubernetes
                && (first.vips.is_empty() || def.vips.is_empty() || first.vips == def.vips)
            {
                if first.vips.is_empty() {
                    first.vips = def.vips;
                }
                return;
            }
            self.warnings.push(format!(
                "host {} is defined more than once; the first definition is used",
                def.host
            ));
            return;
        }
        self.service_order.push(def.host.clone());
        self.services.insert(def.host.clone(), def);
    }

    fn build_listeners(&mut self) {
        let order = std::mem::take(&mut self.service_order);
        let mesh = [MESH.to_string()];
        for host in &order {
            let (vips, cidrs, ports) = {
                let s = &self.services[host];
                (
                    s.vips.clone(),
                    s.cidrs.clone(),
                    s.ports
                        .iter()
                        .map(|p| p.number)
                        .collect::<SmallVec<[u16; 4]>>(),
                )
            };
            if vips.is_empty() && cidrs.is_empty() {
                continue; // headless, or a ServiceEntry without addresses: nothing to capture by IP
            }
            for port in ports {
                let listener = Arc::new(self.listener(host, port, &mesh));
                let added = self.fast.add(&listener);
                for ip in &vips {
                    let addr = SocketAddr::new(ip.to_canonical(), port);
                    if let Some(other) = self.listeners.get(&addr) {
                        self.warnings.push(format!(
                            "{addr} is claimed by both {} and {host}; {} wins",
                            other.host, other.host
                        ));
                        continue;
                    }
                    self.listeners.insert(addr, listener.clone());
                    self.fast.index(addr, added);
                }
                for net in &cidrs {
                    self.cidr_listeners.push((*net, port, listener.clone()));
                }
            }
        }
        self.service_order = order;
    }

    /// The rules for traffic to `host:port`, from mesh-bound VirtualServices: `tls:` rules
    /// first on TLS ports (they look at SNI), then `tcp:` rules.
    fn listener(&mut self, host: &str, port: u16, mesh: &[String]) -> Listener {
        let tls_port = self.services[host]
            .ports
            .iter()
            .any(|p| p.number == port && p.tls);
        let mut acc = RuleSet::default();
        for i in self.virtual_services_for(host) {
            let Resource::VirtualService(vs) = &self.ix.virtual_services[i].resource else {
                continue;
            };
            if !self.ix.vs_hosts[i].iter().any(|h| host::matches(h, host)) {
                continue;
            }
            let name = self.ix.vs_names[i].clone();
            if !(vs.spec.gateways.is_empty() || vs.spec.gateways.iter().any(|g| g == MESH)) {
                acc.considered.push(Considered::skipped(
                    name,
                    None,
                    format!("bound to gateways {:?}, not mesh", vs.spec.gateways),
                ));
                continue;
            }
            self.add_rules(&mut acc, vs, name, port, mesh, tls_port);
        }
        Listener {
            host: self.services[host].host.clone(),
            port,
            tls: acc.rules.iter().any(|r| r.kind == RuleKind::Tls),
            unmatched: Unmatched::new(acc.rules.is_empty()),
            rules: acc.rules.into_iter().collect(),
            considered: acc.considered,
            default_cluster: Some(self.cluster(host, port, None)),
        }
    }

    /// The VirtualServices (indexes into `virtual_services`) that may name `host` (exact or
    /// wildcard), in rule order.
    fn virtual_services_for(&self, host: &str) -> Vec<usize> {
        let exact = self
            .ix
            .vs_by_host
            .get(&*host::lower(host))
            .map_or(&[][..], SmallVec::as_slice);
        let mut idx: Vec<usize> = exact.to_vec();
        if !self.ix.vs_wildcard.is_empty() {
            idx.extend(self.ix.vs_wildcard.iter().copied());
            idx.sort_unstable();
            idx.dedup();
        }
        idx
    }

    /// Gateway mode: one listener per server port of the Gateways this proxy serves, with the
    /// rules of VirtualServices bound to those Gateways.
    fn build_gateway_listeners(&mut self) {
        let mut by_port: BTreeMap<u16, Vec<(String, &'a Server)>> = BTreeMap::new();
        for (key, gw) in &self.gateways {
            for server in &gw.spec.servers {
                by_port
                    .entry(u16_port(server.port.number))
                    .or_default()
                    .push((key.clone(), server));
            }
        }
        for (port, servers) in by_port {
            let bound: Vec<String> = servers.iter().map(|(k, _)| k.clone()).collect();
            let tls = servers.iter().any(|(_, s)| is_tls_passthrough(s));
            let mut acc = RuleSet::default();
            for (i, loaded) in self.ix.virtual_services.clone().into_iter().enumerate() {
                let Resource::VirtualService(vs) = &loaded.resource else {
                    continue;
                };
                let name = self.ix.vs_names[i].clone();
                let ns = vs.metadata.namespace();
                let vs_gateways: Vec<String> = vs
                    .spec
                    .gateways
                    .iter()
                    .map(|g| gateway_key(g, ns))
                    .collect();
                let here: Vec<String> = bound
                    .iter()
                    .filter(|k| vs_gateways.contains(k))
                    .cloned()
                    .collect();
                if here.is_empty() {
                    continue;
                }
                // The VirtualService's hosts must be exposed by one of those servers.
                let exposed =
                    servers
                        .iter()
                        .filter(|(k, _)| here.contains(k))
                        .any(|(k, server)| {
                            let gw_ns = k.split('/').next().unwrap_or("");
                            server.hosts.iter().any(|sh| {
                                let (allowed_ns, pattern) =
                                    sh.split_once('/').unwrap_or(("*", sh.as_str()));
                                let ns_ok = allowed_ns == "*"
                                    || allowed_ns == ns
                                    || (allowed_ns == "." && ns == gw_ns);
                                ns_ok
                                    && vs.spec.hosts.iter().any(|h| {
                                        let h = host::expand(h, ns);
                                        host::matches(pattern, &h) || host::matches(&h, pattern)
                                    })
                            })
                        });
                if !exposed {
                    acc.considered.push(Considered::skipped(
                        name,
                        None,
                        format!(
                            "hosts {:?} are not exposed by the servers on port {port}",
                            vs.spec.hosts
                        ),
                    ));
                    continue;
                }
                self.add_rules(&mut acc, vs, name, port, &here, tls);
            }
            let names: Vec<&str> = bound.iter().map(String::as_str).collect();
            self.gateway_ports.insert(
                port,
                Arc::new(Listener {
                    host: format!("gateway {}", names.join(",")).into(),
                    port,
                    tls,
                    rules: acc.rules.into_iter().collect(),
                    considered: acc.considered,
                    default_cluster: None,
                    // Gateway ports are not in the table: no cell.
                    unmatched: Unmatched::new(false),
                }),
            );
        }
        if self.gateways.is_empty() {
            self.warnings.push(format!(
                "no Gateway selects this proxy's labels {:?}",
                self.identity.labels
            ));
        }
    }

    /// Appends the rules of `vs` that apply at `port` for the given gateway bindings
    /// (`mesh` or `namespace/name` keys): `tls:` rules when the port carries TLS, then `tcp:`.
    fn add_rules(
        &mut self,
        acc: &mut RuleSet,
        vs: &VirtualService,
        name: Arc<str>,
        port: u16,
        bound: &[String],
        tls: bool,
    ) {
        let ns = vs.metadata.namespace();
        let tls_rules = vs.spec.tls.iter().map(|r| {
            (
                RuleKind::Tls,
                &r.route,
                r.matches.iter().map(MatchView::from).collect(),
            )
        });
        let tcp_rules = vs.spec.tcp.iter().map(|r| {
            (
                RuleKind::Tcp,
                &r.route,
                r.matches.iter().map(MatchView::from).collect(),
            )
        });
        let mut index = [0usize, 0usize];
        let all: Vec<(RuleKind, &Vec<RouteDestination>, Vec<MatchView>)> =
            tls_rules.chain(tcp_rules).collect();
        for (kind, route, blocks) in all {
            let slot = usize::from(kind == RuleKind::Tcp);
            let i = index[slot];
            index[slot] += 1;
            let rule = Some((kind, i));
            if kind == RuleKind::Tls && !tls {
                acc.considered.push(Considered::skipped(
                    name.clone(),
                    rule,
                    "tls rules only apply to TLS ports".into(),
                ));
                continue;
            }
            match self.conditions(&blocks, port, bound, ns) {
                Ok(conditions) => {
                    let dests = self.destinations(route, ns, port);
                    if let Some(r) = RouteRule::new(name.clone(), kind, i, conditions, dests) {
                        acc.considered.push(Considered {
                            virtual_service: name.clone(),
                            rule,
                            outcome: Outcome::Kept {
                                position: acc.rules.len(),
                            },
                        });
                        acc.rules.push(r);
                    }
                }
                Err(why) => acc
                    .considered
                    .push(Considered::skipped(name.clone(), rule, why)),
            }
        }
    }

    fn destinations(
        &mut self,
        route: &[RouteDestination],
        ns: &str,
        port: u16,
    ) -> Vec<(Arc<Cluster>, Weight)> {
        route
            .iter()
            .map(|d| {
                let dhost = host::expand(&d.destination.host, ns);
                let dport = d
                    .destination
                    .port
                    .as_ref()
                    .and_then(|p| p.number)
                    .map(u16_port)
                    .unwrap_or_else(|| {
                        // Istio: the destination service's only port, else the dialled port.
                        match self
                            .services
                            .get(dhost.as_str())
                            .map(|s| s.ports.as_slice())
                        {
                            Some([only]) => only.number,
                            _ => port,
                        }
                    });
                let cluster = self.cluster(&dhost, dport, d.destination.subset.as_deref());
                // A lone destination takes everything whatever its weight.
                let w = if route.len() == 1 {
                    1
                } else {
                    d.weight.unwrap_or(0)
                };
                (cluster, Weight(u32::try_from(w).unwrap_or(0)))
            })
            .collect()
    }

    /// Which match blocks of a rule apply to this proxy at `port` under `bound` gateways:
    /// `None` if none does (or the rule has blocks and none applies); `Some(vec![])` if the
    /// rule applies unconditionally; otherwise the per-connection conditions left to check.
    fn conditions(
        &self,
        blocks: &[MatchView],
        port: u16,
        bound: &[String],
        vs_ns: &str,
    ) -> Result<Vec<Condition>, String> {
        if blocks.is_empty() {
            return Ok(Vec::new());
        }
        let mut out = Vec::new();
        // Why each block does not apply, `; `-separated: written straight into one string.
        let mut why_not = String::new();
        for (k, m) in blocks.iter().enumerate() {
            let gateway_ok = m.gateways.is_empty()
                || m.gateways
                    .iter()
                    .any(|g| bound.contains(&gateway_key(g, vs_ns)));
            let reason = if m.port.is_some_and(|p| u16_port(p) != port) {
                Some(format!(
                    "match[{k}]: port {} is not {port}",
                    m.port.unwrap_or(0)
                ))
            } else if !subset_of(m.source_labels, &self.identity.labels) {
                Some(format!(
                    "match[{k}]: sourceLabels {:?} not all on this workload",
                    m.source_labels
                ))
            } else if m
                .source_namespace
                .is_some_and(|n| *n != self.identity.namespace)
            {
                Some(format!(
                    "match[{k}]: sourceNamespace is not {}",
                    self.identity.namespace
                ))
            } else if !gateway_ok {
                Some(format!(
                    "match[{k}]: gateways {:?} do not include {}",
                    m.gateways,
                    bound.join(",")
                ))
            } else {
                None
            };
            if let Some(r) = reason {
                if !why_not.is_empty() {
                    why_not.push_str("; ");
                }
                why_not.push_str(&r);
                continue;
            }
            let c = Condition {
                sni_hosts: m.sni_hosts.iter().map(|h| host::expand(h, vs_ns)).collect(),
                destination_subnets: m
                    .destination_subnets
                    .iter()
                    .filter_map(|s| parse_net(s))
                    .collect(),
            };
            if c == Condition::default() {
                return Ok(Vec::new()); // this block alone lets everything through
            }
            out.push(c);
        }
        if out.is_empty() {
            Err(why_not)
        } else {
            Ok(out)
        }
    }

    /// The DestinationRule for a host: exact host over wildcard, then this proxy's namespace,
    /// then the service's namespace, then any other.
    fn destination_rule(
        &self,
        host: &str,
        service_ns: Option<&str>,
    ) -> Option<&'a DestinationRuleSpec> {
        let mut best: Option<((bool, usize), u8, &'a DestinationRuleSpec)> = None;
        let exact = self
            .ix
            .dr_by_host
            .get(&*host::lower(host))
            .map(SmallVec::as_slice)
            .unwrap_or(&[]);
        for &i in exact.iter().chain(&self.ix.dr_wildcard) {
            let loaded = self.ix.destination_rules[i];
            let Resource::DestinationRule(dr) = &loaded.resource else {
                continue;
            };
            let ns = dr.metadata.namespace();
            let pattern = &self.ix.dr_hosts[i];
            if !host::matches(pattern, host) {
                continue;
            }
            let rank = if ns == self.identity.namespace {
                2
            } else if Some(ns) == service_ns {
                1
            } else {
                0
            };
            let key = (host::specificity(pattern), rank);
            if best.as_ref().is_none_or(|(s, r, _)| key > (*s, *r)) {
                best = Some((key.0, key.1, &dr.spec));
            }
        }
        best.map(|(_, _, s)| s)
    }

    fn cluster(&mut self, host: &str, port: u16, subset: Option<&str>) -> Arc<Cluster> {
        let name = cluster_name(host, port, subset);
        if let Some(c) = self.clusters.get(&name) {
            return c.clone();
        }
        let mut c = self.make_cluster(name.clone(), host, port, subset);
        if let Some(old) = self.previous.and_then(|p| p.clusters.get(&name)) {
            c.counters = old.counters.clone();
            for ep in &mut c.endpoints {
                if let Some(same) = old
                    .endpoints
                    .iter()
                    .find(|o| o.address == ep.address && o.labels == ep.labels)
                {
                    *ep = same.clone();
                }
            }
        }
        let c = Arc::new(c);
        if let Some(p) = &c.problem {
            self.warnings.push(format!("{}: {p}", c.name));
        }
        self.clusters.insert(name, c.clone());
        c
    }

    fn make_cluster(
        &self,
        name: String,
        host: &str,
        port: u16,
        subset_name: Option<&str>,
    ) -> Cluster {
        let svc = self.services.get(host);
        let dr = self.destination_rule(host, svc.map(|s| s.namespace));
        let subset = match (subset_name, dr) {
            (Some(name), Some(dr)) => dr.subsets.iter().find(|s| s.name == name),
            _ => None,
        };
        let policy = effective_policy(
            dr.and_then(|d| d.traffic_policy.as_ref()),
            subset.and_then(|s| s.traffic_policy.as_ref()),
            port,
        );
        let mut c = Cluster::named(
            name,
            svc.map_or_else(|| host.into(), |s| s.host.clone()),
            port,
            subset_name.map(str::to_string),
            policy,
        );
        let Some(svc) = svc else {
            c.problem = Some(format!("no Service or ServiceEntry has host {host}"));
            return c;
        };
        let Some(pdef) = svc.ports.iter().find(|p| p.number == port) else {
            c.problem = Some(format!("{host} has no port {port}"));
            return c;
        };
        if let Some(name) = subset_name {
            if subset.is_none() {
                c.problem = Some(format!(
                    "subset {name:?} is not defined in any DestinationRule for {host}"
                ));
                return c;
            }
        }
        let empty = Labels::new();
        let subset_labels = subset.map_or(&empty, |s| &s.labels);
        let resolution_none = matches!(&svc.kind, ServiceKind::Entry { spec } if matches!(spec.resolution, None | Some(Resolution::None)));
        if c.policy.load_balancer == LbPolicy::Passthrough || resolution_none {
            c.original_destination = true;
            return c;
        }
        c.endpoints = self.endpoints(svc, pdef, subset_labels);
        if c.endpoints.is_empty() {
            c.problem = Some("no endpoints".to_string());
        }
        c
    }

    /// The workloads in `ns` that `selector` picks (an empty selector picks none).
    fn select(&self, selector: &Labels, ns: &str) -> Workloads {
        if selector.is_empty() {
            return Workloads::new();
        }
        // Only the workloads carrying the selector's rarest label can match.
        let candidates: &[usize] = selector
            .iter()
            .map(|(k, v)| {
                self.workloads_by_label
                    .get(&(ns, k.as_str(), v.as_str()))
                    .map_or(&[][..], SmallVec::as_slice)
            })
            .min_by_key(|l| l.len())
            .unwrap_or(&[]);
        // Indexed by namespace too, so every candidate is in `ns`.
        candidates
            .iter()
            .copied()
            .filter(|&i| subset_of(selector, self.workloads[i].labels))
            .collect()
    }

    fn endpoints(&self, svc: &ServiceDef<'a>, pdef: &PortDef<'a>, subset: &Labels) -> EndpointList {
        let selected = |selector: &Labels, ns: &str| {
            svc.selected
                .get_or_init(|| self.select(selector, ns))
                .iter()
                .map(|&i| &self.workloads[i])
                .filter(|w| subset_of(subset, w.labels))
                .filter_map(|w| {
                    let port = match (w.entry_ports.and_then(|p| p.get(pdef.name)), &pdef.target) {
                        (Some(p), _) => u16_port(*p),
                        (None, Target::Same) => pdef.number,
                        (None, Target::Number(n)) => *n,
                        (None, Target::Named(name)) => *w.named_ports.get(name)?,
                    };
                    Some(Arc::new(Endpoint::new(
                        EndpointAddr::Socket(SocketAddr::new(w.ip?, port)),
                        w.origin.clone(),
                        Arc::clone(&w.shared_labels),
                    )))
                })
                .collect::<EndpointList>()
        };
        match &svc.kind {
            ServiceKind::Kubernetes { selector } => selected(selector, svc.namespace),
            ServiceKind::Entry { spec } => {
                let target = match pdef.target {
                    Target::Number(n) => n,
                    _ => pdef.number,
                };
                let dns = matches!(
                    spec.resolution,
                    Some(Resolution::Dns | Resolution::DnsRoundRobin)
                );
                if !spec.endpoints.is_empty() {
                    spec.endpoints
                        .iter()
                        .filter(|e| subset_of(subset, &e.labels))
                        .filter_map(|e| {
                            let port = e.ports.get(pdef.name).map_or(target, |p| u16_port(*p));
                            let address = match e.address.parse::<IpAddr>() {
                                Ok(ip) => EndpointAddr::Socket(SocketAddr::new(ip, port)),
                                Err(_) if dns => EndpointAddr::Dns {
                                    host: e.address.clone(),
                                    port,
                                },
                                Err(_) => return None,
                            };
                            Some(Arc::new(Endpoint::new(
                                address,
                                format!("ServiceEntry {} endpoint", svc.host).into(),
                                Arc::new(e.labels.clone()),
                            )))
                        })
                        .collect()
                } else if let Some(sel) = &spec.workload_selector {
                    selected(&sel.match_labels, svc.namespace)
                } else if dns && subset.is_empty() {
                    spec.hosts
                        .iter()
                        .filter(|h| !h.starts_with('*'))
                        .map(|h| {
                            Arc::new(Endpoint::new(
                                EndpointAddr::Dns {
                                    host: h.clone(),
                                    port: target,
                                },
                                format!("ServiceEntry host {h}").into(),
                                Arc::default(),
                            ))
                        })
                        .collect()
                } else {
                    EndpointList::new()
                }
            }
        }
    }
}

/// The rules a listener gets, and what was considered on the way (for `veer explain`).
#[derive(Default)]
struct RuleSet {
    rules: Vec<RouteRule>,
    considered: Vec<Considered>,
}

/// The fields `tcp:` and `tls:` match blocks share, so both are compiled by one function.
struct MatchView<'m> {
    port: Option<u32>,
    source_labels: &'m Labels,
    source_namespace: Option<&'m String>,
    gateways: &'m [String],
    destination_subnets: &'m [String],
    sni_hosts: &'m [String],
}

impl<'m> From<&'m L4MatchAttributes> for MatchView<'m> {
    fn from(m: &'m L4MatchAttributes) -> Self {
        MatchView {
            port: m.port,
            source_labels: &m.source_labels,
            source_namespace: m.source_namespace.as_ref(),
            gateways: &m.gateways,
            destination_subnets: &m.destination_subnets,
            sni_hosts: &[],
        }
    }
}

impl<'m> From<&'m TlsMatchAttributes> for MatchView<'m> {
    fn from(m: &'m TlsMatchAttributes) -> Self {
        MatchView {
            port: m.port,
            source_labels: &m.source_labels,
            source_namespace: m.source_namespace.as_ref(),
            gateways: &m.gateways,
            destination_subnets: &m.destination_subnets,
            sni_hosts: &m.sni_hosts,
        }
    }
}

/// A Gateway reference as `namespace/name`: `name` is relative to the referring resource's
/// namespace; `ns/name` and the reserved `mesh` are taken as written.
fn gateway_key(reference: &str, namespace: &str) -> String {
    if reference.contains('/') || reference == MESH {
        reference.to_string()
    } else {
        format!("{namespace}/{reference}")
    }
}

/// A Gateway server that routes TLS by SNI without terminating it.
fn is_tls_passthrough(server: &Server) -> bool {
    server.port.protocol.eq_ignore_ascii_case("TLS")
        && server.tls.as_ref().and_then(|t| t.mode) == Some(ServerTlsMode::Passthrough)
}

/// The TCP-relevant blocks of a traffic policy.
#[derive(Default)]
struct Blocks<'p> {
    lb: Option<&'p LoadBalancerSettings>,
    pool: Option<&'p ConnectionPoolSettings>,
    outlier: Option<&'p OutlierDetection>,
}

/// A matching `portLevelSettings` entry replaces the policy wholesale (Istio: port-level
/// settings are not merged with the destination-level ones).
fn at_port(policy: &TrafficPolicy, port: u16) -> Blocks<'_> {
    match policy
        .port_level_settings
        .iter()
        .find(|p| p.port.as_ref().and_then(|p| p.number) == Some(u32::from(port)))
    {
        Some(p) => Blocks {
            lb: p.load_balancer.as_ref(),
            pool: p.connection_pool.as_ref(),
            outlier: p.outlier_detection.as_ref(),
        },
        None => Blocks {
            lb: policy.load_balancer.as_ref(),
            pool: policy.connection_pool.as_ref(),
            outlier: policy.outlier_detection.as_ref(),
        },
    }
}

/// Top-level policy (port-level aware), then the subset's policy overriding block by block.
fn effective_policy(
    top: Option<&TrafficPolicy>,
    subset: Option<&TrafficPolicy>,
    port: u16,
) -> ClusterPolicy {
    let mut b = top.map(|t| at_port(t, port)).unwrap_or_default();
    if let Some(s) = subset.map(|s| at_port(s, port)) {
        b.lb = s.lb.or(b.lb);
        b.pool = s.pool.or(b.pool);
        b.outlier = s.outlier.or(b.outlier);
    }
    let mut p = ClusterPolicy {
        outlier_detection: b
            .outlier
            .and_then(super::outlier::OutlierPolicy::from_config),
        ..ClusterPolicy::default()
    };
    if let Some(lb) = b.lb {
        p.load_balancer = match (lb.simple, &lb.consistent_hash) {
            (_, Some(ch)) if ch.use_source_ip == Some(true) => LbPolicy::SourceIpHash,
            (Some(SimpleLb::RoundRobin), _) => LbPolicy::RoundRobin,
            (Some(SimpleLb::Random), _) => LbPolicy::Random,
            (Some(SimpleLb::Passthrough), _) => LbPolicy::Passthrough,
            _ => LbPolicy::LeastRequest,
        };
    }
    if let Some(tcp) = b.pool.and_then(|p| p.tcp.as_ref()) {
        if let Some(d) = tcp.connect_timeout {
            p.connect_timeout = d.0;
        }
        if let Some(d) = tcp.idle_timeout {
            p.idle_timeout = (d.0 != Duration::ZERO).then_some(d.0);
        }
        p.max_connection_duration = tcp
            .max_connection_duration
            .map(|d| d.0)
            .filter(|d| *d != Duration::ZERO);
        p.max_connections = tcp.max_connections.and_then(|m| u32::try_from(m).ok());
        p.tcp_keepalive = tcp.tcp_keepalive.as_ref().map(|k| Keepalive {
            probes: k.probes,
            time: k.time.map(|d| d.0),
            interval: k.interval.map(|d| d.0),
        });
    }
    p
}
