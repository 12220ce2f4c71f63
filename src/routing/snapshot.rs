//! The compiled routing snapshot: what a connection is matched against.
//!
//! Built once per config version by [`compile()`](super::compile()), then shared read-only behind an
//! `Arc` (swapped atomically on reload). Lookup is a hash probe on the original destination
//! followed by a walk of that listener's (few) ordered rules; nothing here does I/O. For
//! most IPv4 listeners the whole decision is made in the snapshot's packed table instead
//! ([`Fast`]), on the same state. State that changes per connection (a rule's pick state,
//! an endpoint's active count) is atomics in compact cells ([`super::cells`]), so the data
//! path never locks except for splits over more than two destinations.

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr, SocketAddrV4};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use ipnet::IpNet;
use rustc_hash::FxHashMap;
use serde::Serialize;
use smallvec::SmallVec;

use super::cells::{LoadHandle, RouteHandle, LOADS, ROUTES};
use super::fast::{self, Fast, Route};
use super::lb::{self, Candidate, LbPolicy};
use super::outlier::{FailureOutcome, OutlierPolicy, OutlierState};
use super::weighted::{SmoothWeighted, Weight};
use crate::addr::{ClientAddr, OrigDst};
use crate::config::model::Labels;
use crate::config::ConfigSet;

/// Who this proxy serves: matched against `sourceLabels` / `sourceNamespace`, and in gateway
/// mode against Gateway `selector`s.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct ProxyIdentity {
    pub namespace: String,
    pub labels: Labels,
    pub mode: ProxyMode,
}

/// Sidecar (capture, the `mesh` gateway) or ingress gateway (listens on Gateway server ports).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, clap::ValueEnum)]
#[serde(rename_all = "snake_case")]
pub enum ProxyMode {
    #[default]
    Sidecar,
    Gateway,
}

/// Mesh config `outboundTrafficPolicy.mode`: what happens to destinations no service owns.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, clap::ValueEnum)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum OutboundTrafficPolicy {
    /// Pass through to the original destination (Istio's default).
    #[default]
    AllowAny,
    /// Close connections to destinations outside the registry.
    RegistryOnly,
}

/// Where an endpoint lives.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize)]
#[serde(untagged)]
pub enum EndpointAddr {
    Socket(SocketAddr),
    /// A ServiceEntry endpoint with `resolution: DNS`, resolved at connect time.
    Dns {
        host: String,
        port: u16,
    },
}

impl std::fmt::Display for EndpointAddr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            EndpointAddr::Socket(s) => s.fmt(f),
            EndpointAddr::Dns { host, port } => write!(f, "{host}:{port}"),
        }
    }
}

/// One upstream instance (a Pod, a WorkloadEntry, a ServiceEntry endpoint).
///
/// `repr(C)`, address and load first: a least-request pick reads two endpoints' active
/// counts and connects to one's address. The count itself lives in a dense array
/// ([`LOADS`]), which a lookup reads without coming here (see [`Fast`]).
#[derive(Debug, Serialize)]
#[repr(C)]
pub struct Endpoint {
    pub address: EndpointAddr,
    #[serde(rename = "active_connections", serialize_with = "ser_load")]
    pub load: LoadHandle,
    #[serde(serialize_with = "ser_atomic")]
    pub total_connections: AtomicU64,
    /// What this endpoint came from, e.g. `Pod default/tcp-echo-v1`. Shared (as are the
    /// labels) by the endpoint's copies in every subset cluster: one allocation per workload.
    pub origin: Arc<str>,
    #[serde(skip_serializing_if = "crate::config::model::no_labels")]
    pub labels: Arc<Labels>,
    #[serde(serialize_with = "ser_outlier")]
    pub outlier: OutlierState,
}

impl Endpoint {
    pub fn new(address: EndpointAddr, origin: Arc<str>, labels: Arc<Labels>) -> Self {
        Endpoint {
            address,
            origin,
            labels,
            load: LOADS.alloc(),
            total_connections: AtomicU64::new(0),
            outlier: OutlierState::default(),
        }
    }
}

impl Endpoint {
    /// Connections open to this endpoint now (from this cluster, under any snapshot).
    pub fn active(&self) -> u64 {
        self.load.load(Ordering::Relaxed)
    }
}

fn ser_load<S: serde::Serializer>(l: &LoadHandle, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_u64(l.load(Ordering::Relaxed))
}

fn ser_outlier<S: serde::Serializer>(o: &OutlierState, s: S) -> Result<S::Ok, S::Error> {
    serde::Serialize::serialize(&o.describe(Instant::now()), s)
}

/// Per-cluster counters that outlive a reload (the next snapshot's cluster of the same name
/// takes them over), so `maxConnections` counts connections opened under older configs.
#[derive(Debug, Default, Serialize)]
pub struct ClusterCounters {
    #[serde(serialize_with = "ser_atomic")]
    pub active_connections: AtomicU64,
    /// Connections refused because `maxConnections` was reached (Envoy's `UO`).
    #[serde(serialize_with = "ser_atomic")]
    pub overflows: AtomicU64,
    #[serde(serialize_with = "ser_atomic")]
    pub connect_retries: AtomicU64,
    #[serde(serialize_with = "ser_atomic")]
    pub ejections: AtomicU64,
}

impl Candidate for &Arc<Endpoint> {
    fn active(&self) -> u64 {
        Endpoint::active(self)
    }
    fn hash_key(&self) -> String {
        self.address.to_string()
    }
}

impl Candidate for Arc<Endpoint> {
    fn active(&self) -> u64 {
        Endpoint::active(self)
    }
    fn hash_key(&self) -> String {
        self.address.to_string()
    }
}

/// TCP settings in effect for a cluster, after DestinationRule precedence was applied.
///
/// `repr(C)`, the two fields every pick reads first (see [`Cluster`]).
#[derive(Debug, Clone, PartialEq, Serialize)]
#[repr(C)]
pub struct ClusterPolicy {
    pub load_balancer: LbPolicy,
    pub outlier_detection: Option<OutlierPolicy>,
    #[serde(with = "ser_duration")]
    pub connect_timeout: Duration,
    /// `None`: no idle timeout (`idleTimeout: 0s`).
    #[serde(with = "ser_opt_duration")]
    pub idle_timeout: Option<Duration>,
    #[serde(with = "ser_opt_duration")]
    pub max_connection_duration: Option<Duration>,
    pub max_connections: Option<u32>,
    pub tcp_keepalive: Option<Keepalive>,
}

impl Default for ClusterPolicy {
    fn default() -> Self {
        ClusterPolicy {
            load_balancer: LbPolicy::LeastRequest,
            connect_timeout: Duration::from_secs(10),
            idle_timeout: Some(Duration::from_secs(3600)),
            max_connection_duration: None,
            max_connections: None,
            tcp_keepalive: None,
            outlier_detection: None,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Keepalive {
    pub probes: Option<u32>,
    #[serde(with = "ser_opt_duration")]
    pub time: Option<Duration>,
    #[serde(with = "ser_opt_duration")]
    pub interval: Option<Duration>,
}

/// A cluster's endpoints, up to four inline: the list is read on every pick, and its own
/// allocation was one more miss to memory per lookup at thousands of services.
pub type EndpointList = SmallVec<[Arc<Endpoint>; 4]>;

/// A service port, optionally narrowed to a subset: Envoy's `outbound|PORT|SUBSET|HOST`.
///
/// `repr(C)`, what a pick reads first: the endpoint list, the round-robin cursor, the
/// balancing policy and whether outlier detection is on then sit in the allocation's first
/// 64 bytes with the reference count a route takes. At 10 000 services they were spread
/// over three cache lines, each a miss to memory. Shown in the usual order (see the
/// `Serialize` impl).
#[derive(Debug)]
#[repr(C)]
pub struct Cluster {
    pub endpoints: EndpointList,
    /// The round-robin cursor, for the policies that use one: in the loads slab, so that
    /// the lookup table ([`Fast`]) and [`Cluster::pick`] advance one sequence.
    rr: Option<LoadHandle>,
    pub policy: ClusterPolicy,
    pub name: String,
    /// Shared with the service's other clusters and listeners.
    pub host: Arc<str>,
    pub port: u16,
    pub subset: Option<String>,
    /// Connect to the connection's original destination (ServiceEntry `resolution: NONE`, or
    /// `loadBalancer.simple: PASSTHROUGH`) rather than to a listed endpoint.
    pub original_destination: bool,
    /// Why this cluster cannot carry traffic (unknown host, undefined subset), if it cannot.
    pub problem: Option<String>,
    pub counters: Arc<ClusterCounters>,
}

impl Serialize for Cluster {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeStruct;
        let mut st = s.serialize_struct("Cluster", 9)?;
        st.serialize_field("name", &self.name)?;
        st.serialize_field("host", &self.host)?;
        st.serialize_field("port", &self.port)?;
        st.serialize_field("subset", &self.subset)?;
        st.serialize_field("policy", &self.policy)?;
        st.serialize_field("original_destination", &self.original_destination)?;
        st.serialize_field("endpoints", &self.endpoints)?;
        match &self.problem {
            Some(p) => st.serialize_field("problem", p)?,
            None => st.skip_field("problem")?,
        }
        st.serialize_field("counters", &self.counters)?;
        st.end()
    }
}

impl Cluster {
    pub fn new(host: Arc<str>, port: u16, subset: Option<String>, policy: ClusterPolicy) -> Self {
        let name = cluster_name(&host, port, subset.as_deref());
        Self::named(name, host, port, subset, policy)
    }

    /// [`Cluster::new`] with its [`cluster_name`] already built (the compiler has it from the
    /// lookup that found the cluster missing).
    pub(crate) fn named(
        name: String,
        host: Arc<str>,
        port: u16,
        subset: Option<String>,
        policy: ClusterPolicy,
    ) -> Self {
        Cluster {
            name,
            host,
            port,
            subset,
            original_destination: false,
            endpoints: SmallVec::new(),
            problem: None,
            counters: Arc::default(),
            rr: matches!(
                policy.load_balancer,
                LbPolicy::RoundRobin | LbPolicy::Passthrough
            )
            .then(|| LOADS.alloc()),
            policy,
        }
    }

    /// The round-robin cursor; clusters whose policy reads none get a shared, unused one.
    pub fn cursor(&self) -> &AtomicU64 {
        static UNUSED: AtomicU64 = AtomicU64::new(0);
        self.rr.as_deref().unwrap_or(&UNUSED)
    }

    /// Where the lookup table finds the round-robin cursor; `None` when the cluster has
    /// none or it is on the heap.
    pub(super) fn cursor_index(&self) -> Option<u32> {
        self.rr.as_ref().and_then(|c| c.index())
    }

    /// Chooses an endpoint for a new connection by the cluster's load-balancing policy.
    pub fn pick(&self, client: ClientAddr) -> Option<&Arc<Endpoint>> {
        self.pick_excluding(client, &[], Instant::now)
            .map(|i| &self.endpoints[i])
    }

    /// Chooses an endpoint index, skipping `tried` (earlier attempts of this connection) and
    /// endpoints ejected now. If every untried endpoint is ejected, ejection is ignored
    /// (Envoy's panic mode): better to try a suspect endpoint than to refuse outright.
    ///
    /// `now` is called only when the cluster has outlier detection: reading the clock was
    /// ~20 ns of a ~140 ns lookup (route_hot bench) that most clusters never need.
    pub fn pick_excluding(
        &self,
        client: ClientAddr,
        tried: &[usize],
        now: impl FnOnce() -> Instant,
    ) -> Option<usize> {
        let policy = self.policy.load_balancer;
        let now = self.policy.outlier_detection.as_ref().map(|_| now());
        let ejected = |e: &Endpoint| now.is_some_and(|now| e.outlier.is_ejected(now));
        // Common case first: nothing to skip, so no candidate list is built.
        if tried.is_empty() && !self.endpoints.iter().any(|e| ejected(e)) {
            return lb::pick(policy, &self.endpoints, self.cursor(), client.0.ip());
        }
        let mut candidates: Vec<usize> = (0..self.endpoints.len())
            .filter(|i| !tried.contains(i) && !ejected(&self.endpoints[*i]))
            .collect();
        if candidates.is_empty() {
            candidates = (0..self.endpoints.len())
                .filter(|i| !tried.contains(i))
                .collect();
        }
        let view: Vec<&Arc<Endpoint>> = candidates.iter().map(|&i| &self.endpoints[i]).collect();
        lb::pick(policy, &view, self.cursor(), client.0.ip()).map(|k| candidates[k])
    }

    /// How many endpoints are ejected at `now`.
    pub fn ejected_count(&self, now: Instant) -> usize {
        if self.policy.outlier_detection.is_none() {
            return 0;
        }
        self.endpoints
            .iter()
            .filter(|e| e.outlier.is_ejected(now))
            .count()
    }

    /// Feeds a connect result to outlier detection; returns what a failure did. `now` is
    /// called only for a failure in a cluster with outlier detection.
    pub fn report_connect(
        &self,
        index: usize,
        ok: bool,
        now: impl FnOnce() -> Instant,
    ) -> Option<FailureOutcome> {
        let ep = &self.endpoints[index];
        if ok {
            ep.outlier.success();
            return None;
        }
        let policy = self.policy.outlier_detection.as_ref()?;
        let now = now();
        let outcome =
            ep.outlier
                .failure(policy, now, self.ejected_count(now), self.endpoints.len());
        if let FailureOutcome::Ejected { .. } = outcome {
            self.counters.ejections.fetch_add(1, Ordering::Relaxed);
        }
        Some(outcome)
    }
}

pub fn cluster_name(host: &str, port: u16, subset: Option<&str>) -> String {
    // Not `format!`: built for every cluster of every compile (40 000 at 10 000 services).
    let port = port.to_string();
    super::host::concat(&["outbound|", &port, "|", subset.unwrap_or(""), "|", host])
}

/// One destination of a rule. The connections it was given are derived from the rule's
/// pick state ([`RouteRule::connections`]).
#[derive(Debug)]
pub struct WeightedCluster {
    pub cluster: Arc<Cluster>,
    pub weight: Weight,
}

/// Which routes a rule came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum RuleKind {
    Tcp,
    Tls,
}

/// `namespace/name/tcp[i]`: how rules are named in logs, `/routes` and `veer explain`.
fn rule_name(virtual_service: &str, kind: RuleKind, index: usize) -> String {
    RuleLabel(virtual_service, kind, index).to_string()
}

struct RuleLabel<'a>(&'a str, RuleKind, usize);

impl std::fmt::Display for RuleLabel<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}[{}]", self.0, self.1.list(), self.2)
    }
}

/// Which way a connection was routed, kept as shared references and rendered when shown
/// (access log, `/connections`): formatting the name for every connection cost an
/// allocation that most connections never show.
#[derive(Debug, Clone)]
pub enum RouteName {
    /// A VirtualService rule: `namespace/name/tcp[i]`.
    Rule {
        virtual_service: Arc<str>,
        kind: RuleKind,
        index: usize,
    },
    /// No rule applied at the listener of `host:port`: its default cluster.
    Unmatched { host: Arc<str>, port: u16 },
    /// `PassthroughCluster`, `BlackHoleCluster`, `inbound`.
    Fixed(&'static str),
}

impl RouteName {
    /// `rule` when one routed the connection, else the listener's default.
    pub fn of(listener: &Listener, rule: Option<&RouteRule>) -> Self {
        match rule {
            Some(r) => RouteName::Rule {
                virtual_service: r.virtual_service.clone(),
                kind: r.kind,
                index: r.index,
            },
            None => RouteName::Unmatched {
                host: listener.host.clone(),
                port: listener.port,
            },
        }
    }
}

impl std::fmt::Display for RouteName {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            RouteName::Rule {
                virtual_service,
                kind,
                index,
            } => RuleLabel(virtual_service, *kind, *index).fmt(f),
            RouteName::Unmatched { host, port } => write!(f, "{host}:{port} (no rule matched)"),
            RouteName::Fixed(name) => f.write_str(name),
        }
    }
}

impl RuleKind {
    /// The VirtualService field holding these rules.
    pub fn list(self) -> &'static str {
        match self {
            RuleKind::Tcp => "tcp",
            RuleKind::Tls => "tls",
        }
    }
}

/// What is left to check per connection for one `match` block (the rest — port, source
/// labels and namespace, gateways — is fixed per proxy and listener and decided at compile
/// time). Empty lists mean "any".
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct Condition {
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub sni_hosts: Vec<String>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub destination_subnets: Vec<IpNet>,
}

impl Condition {
    fn holds(&self, ip: IpAddr, sni: Option<&str>) -> bool {
        (self.sni_hosts.is_empty()
            || sni.is_some_and(|s| self.sni_hosts.iter().any(|p| super::host::matches(p, s))))
            && (self.destination_subnets.is_empty()
                || self.destination_subnets.iter().any(|n| n.contains(&ip)))
    }
}

/// One `tcp:` or `tls:` rule of a VirtualService, as it applies to one listener.
///
/// Its pick state is word 0 of its cell ([`ROUTES`]); a listener's first rule without
/// conditions also has there what a lookup needs to finish without reading the rule (see
/// [`Fast`]).
#[derive(Debug)]
pub struct RouteRule {
    /// `namespace/name` of the VirtualService.
    pub virtual_service: Arc<str>,
    pub kind: RuleKind,
    /// Index into its `tcp:` or `tls:` list.
    pub index: usize,
    pub(super) picker: SmoothWeighted,
    pub(super) hot: RouteHandle,
    /// The match blocks that apply here, ORed; empty when the rule has no `match` (catch-all).
    pub conditions: Vec<Condition>,
    /// Inline for up to two (an A/B split).
    pub destinations: SmallVec<[WeightedCluster; 2]>,
}

/// As `{"virtual_service", "kind", "index", "conditions"?, "destinations": [{"cluster",
/// "weight", "connections"}]}`.
impl Serialize for RouteRule {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeStruct;
        #[derive(Serialize)]
        struct Dest<'a> {
            cluster: &'a str,
            weight: Weight,
            connections: u64,
        }
        let picks = self.connections();
        let dests: Vec<Dest<'_>> = self
            .destinations
            .iter()
            .zip(picks)
            .map(|(d, connections)| Dest {
                cluster: &d.cluster.name,
                weight: d.weight,
                connections,
            })
            .collect();
        let mut st = s.serialize_struct("RouteRule", 5)?;
        st.serialize_field("virtual_service", &self.virtual_service)?;
        st.serialize_field("kind", &self.kind)?;
        st.serialize_field("index", &self.index)?;
        if self.conditions.is_empty() {
            st.skip_field("conditions")?;
        } else {
            st.serialize_field("conditions", &self.conditions)?;
        }
        st.serialize_field("destinations", &dests)?;
        st.end()
    }
}

impl RouteRule {
    pub fn new(
        virtual_service: Arc<str>,
        kind: RuleKind,
        index: usize,
        conditions: Vec<Condition>,
        destinations: Vec<(Arc<Cluster>, Weight)>,
    ) -> Option<Self> {
        let weights: Vec<Weight> = destinations.iter().map(|(_, w)| *w).collect();
        let picker = SmoothWeighted::new(&weights)?;
        Some(RouteRule {
            virtual_service,
            kind,
            index,
            conditions,
            destinations: destinations
                .into_iter()
                .map(|(cluster, weight)| WeightedCluster { cluster, weight })
                .collect(),
            picker,
            hot: ROUTES.alloc(),
        })
    }

    pub fn name(&self) -> String {
        rule_name(&self.virtual_service, self.kind, self.index)
    }

    /// Whether `other` is this rule in another snapshot: same VirtualService, list and index.
    fn same_rule(&self, other: &RouteRule) -> bool {
        self.index == other.index
            && self.kind == other.kind
            && self.virtual_service == other.virtual_service
    }

    /// Takes over `old`'s (the same rule's, see [`Listener::resume_from`]) weighted-pick
    /// position, and with it the connections each destination had, when its destinations
    /// and weights are the same: after a reload that did not touch it, the rule's split
    /// continues instead of restarting. Copied when the new snapshot is compiled: picks the
    /// old one makes until the swap (a compile's worth of connections, once per reload) are
    /// not seen by the new one. Sharing the state instead would cost a pointer chase on
    /// every pick.
    fn resume_from(&self, old: &RouteRule) {
        let same = self.destinations.len() == old.destinations.len()
            && self
                .destinations
                .iter()
                .zip(&old.destinations)
                .all(|(n, o)| n.weight == o.weight && n.cluster.name == o.cluster.name);
        if same {
            self.picker
                .resume_from(&self.hot.words[0], &old.picker, &old.hot.words[0]);
        }
    }

    /// The connections each destination has been given (in `destinations` order).
    pub fn connections(&self) -> SmallVec<[u64; 2]> {
        self.picker.picks(&self.hot.words[0])
    }

    fn applies_to(&self, ip: IpAddr, sni: Option<&str>) -> bool {
        self.conditions.is_empty() || self.conditions.iter().any(|c| c.holds(ip, sni))
    }

    /// The next destination by smooth weighted round-robin (counted by the pick itself).
    pub fn pick(&self) -> &Arc<Cluster> {
        &self.destinations[self.picker.pick(&self.hot.words[0])].cluster
    }
}

/// A rule (or a whole VirtualService) looked at while compiling a listener. Kept as data and
/// rendered when shown: a compile records one per rule per listener (20 000 at 10 000
/// services), and only `veer explain` and the admin API print them.
#[derive(Debug, Clone, PartialEq)]
pub struct Considered {
    /// `namespace/name` of the VirtualService (shared with its rules).
    pub virtual_service: Arc<str>,
    /// Which of its rules; `None` for the VirtualService as a whole.
    pub rule: Option<(RuleKind, usize)>,
    pub outcome: Outcome,
}

/// What became of a [`Considered`] rule.
#[derive(Debug, Clone, PartialEq)]
pub enum Outcome {
    /// In the listener's rule list at this position.
    Kept {
        position: usize,
    },
    Skipped(String),
}

impl Considered {
    pub fn skipped(
        virtual_service: Arc<str>,
        rule: Option<(RuleKind, usize)>,
        why: String,
    ) -> Self {
        Considered {
            virtual_service,
            rule,
            outcome: Outcome::Skipped(why),
        }
    }

    /// `namespace/name`, or `namespace/name/tcp[i]` for one rule.
    pub fn rule(&self) -> String {
        match self.rule {
            Some((kind, i)) => rule_name(&self.virtual_service, kind, i),
            None => self.virtual_service.to_string(),
        }
    }
}

impl std::fmt::Display for Outcome {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Outcome::Kept { position } => write!(f, "kept at position {position}"),
            Outcome::Skipped(why) => write!(f, "skipped: {why}"),
        }
    }
}

/// As `{"rule": "ns/name/tcp[0]", "outcome": "kept at position 0"}`.
impl Serialize for Considered {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeStruct;
        let mut st = s.serialize_struct("Considered", 2)?;
        st.serialize_field("rule", &self.rule())?;
        st.serialize_field("outcome", &self.outcome.to_string())?;
        st.end()
    }
}

/// Everything reachable at one service address and port (sidecar), or on one Gateway server
/// port (gateway).
///
/// `repr(C)`, the first rule first: with [`RouteRule`]'s own order, a route reads one
/// stretch of the listener, from the first rule's pick state to the rule list's length
/// (stored after the inline rule). Shown in the usual order (see the `Serialize` impl).
#[derive(Debug)]
#[repr(C)]
pub struct Listener {
    /// The first rule inline, in the listener's own allocation: most listeners have one, and
    /// each pointer a lookup follows is a cache miss at thousands of services.
    pub rules: SmallVec<[RouteRule; 1]>,
    /// Whether rules here look at the TLS ClientHello's SNI (so it must be peeked first).
    pub tls: bool,
    pub port: u16,
    /// Where traffic goes when no rule matches: the whole service, no subset (sidecar). A
    /// gateway has none: unmatched connections are closed, as Istio's gateways do.
    pub default_cluster: Option<Arc<Cluster>>,
    /// Connections no rule matched.
    pub(crate) unmatched: Unmatched,
    /// The service host owning this address (Service FQDN or ServiceEntry host), or the
    /// Gateways served on this port.
    pub host: Arc<str>,
    /// Every VirtualService rule looked at for this listener, kept or skipped and why.
    pub considered: Vec<Considered>,
}

impl Serialize for Listener {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeStruct;
        let mut st = s.serialize_struct("Listener", 7)?;
        st.serialize_field("host", &self.host)?;
        st.serialize_field("port", &self.port)?;
        st.serialize_field("tls", &self.tls)?;
        st.serialize_field("rules", &self.rules)?;
        if self.considered.is_empty() {
            st.skip_field("considered")?;
        } else {
            st.serialize_field("considered", &self.considered)?;
        }
        st.serialize_field(
            "default_cluster",
            &self.default_cluster.as_ref().map(|c| &*c.name),
        )?;
        st.serialize_field("unmatched_connections", &self.unmatched_connections())?;
        st.end()
    }
}

impl Listener {
    /// Connections no rule matched (sent to the default cluster, or closed).
    pub fn unmatched_connections(&self) -> u64 {
        self.unmatched.counter().load(Ordering::Relaxed)
    }

    /// Continues the weighted sequence of each rule that `old` (this listener's predecessor at
    /// the same address or port) also has.
    pub fn resume_from(&self, old: &Listener) {
        for rule in &self.rules {
            if let Some(o) = old.rules.iter().find(|o| rule.same_rule(o)) {
                rule.resume_from(o);
            }
        }
    }

    /// The first rule that applies (and the cluster it picks), else the default cluster.
    /// `None`: nothing applies and there is no default.
    pub fn route(
        &self,
        ip: IpAddr,
        sni: Option<&str>,
    ) -> Option<(Option<&RouteRule>, Arc<Cluster>)> {
        let ip = ip.to_canonical();
        for rule in &self.rules {
            if rule.applies_to(ip, sni) {
                return Some((Some(rule), rule.pick().clone()));
            }
        }
        self.unmatched.counter().fetch_add(1, Ordering::Relaxed);
        self.default_cluster.clone().map(|c| (None, c))
    }
}

/// Where a listener counts the connections no rule matched. A sidecar listener without
/// rules counts them in word 0 of its own cell ([`ROUTES`]), beside what a lookup needs to
/// route it there (see [`Fast`]); one with rules routes from its first rule's cell, and
/// keeps the count here: a cell for every listener would spread the cells lookups read
/// over 50% more memory.
#[derive(Debug)]
pub enum Unmatched {
    Cell(RouteHandle),
    Plain(AtomicU64),
}

impl Unmatched {
    /// In a cell when the table may route the listener from it (`no_rules`).
    pub fn new(no_rules: bool) -> Self {
        if no_rules {
            Unmatched::Cell(ROUTES.alloc())
        } else {
            Unmatched::Plain(AtomicU64::new(0))
        }
    }

    pub fn counter(&self) -> &AtomicU64 {
        match self {
            Unmatched::Cell(c) => &c.words[0],
            Unmatched::Plain(n) => n,
        }
    }

    pub(super) fn cell(&self) -> Option<&RouteHandle> {
        match self {
            Unmatched::Cell(c) => Some(c),
            Unmatched::Plain(_) => None,
        }
    }
}

/// The answer for one outbound connection.
#[derive(Debug)]
pub enum Outbound<'a> {
    /// A service owns the destination.
    Service(&'a Arc<Listener>),
    /// No service owns the destination and the policy is ALLOW_ANY.
    Passthrough,
    /// No service owns the destination and the policy is REGISTRY_ONLY.
    Refused,
}

/// A compiled, immutable routing table plus the config it came from.
#[derive(Debug, Serialize)]
pub struct Snapshot {
    pub version: u64,
    #[serde(serialize_with = "ser_time")]
    pub loaded_at: SystemTime,
    pub identity: ProxyIdentity,
    pub outbound_traffic_policy: OutboundTrafficPolicy,
    /// Exact service address → listener. Fx-hashed: looked up once per new connection, with
    /// keys from the config (an app can choose what it looks up, not what is stored, so no
    /// flooding defence is needed), and SipHash of the address was ~10 ns of the ~160 ns
    /// routing took (route_hot bench).
    #[serde(serialize_with = "ser_listeners")]
    pub listeners: FxHashMap<SocketAddr, Arc<Listener>>,
    /// ServiceEntry `addresses` given as CIDRs, checked after the exact map.
    #[serde(skip)]
    pub cidr_listeners: Vec<(IpNet, u16, Arc<Listener>)>,
    /// Gateway mode: Gateway server port → listener. The proxy listens on exactly these.
    pub gateway_ports: BTreeMap<u16, Arc<Listener>>,
    /// By name. Hashed, not ordered: a compile of 10 000 services looks clusters up ~100 000
    /// times, and ordered lookups compared long common prefixes (`outbound|9000|v1|…`) at
    /// every level. Shown sorted ([`sorted_clusters`]).
    #[serde(serialize_with = "ser_sorted_clusters")]
    pub clusters: FxHashMap<String, Arc<Cluster>>,
    /// Things that load but probably do not do what the user meant.
    pub warnings: Vec<String>,
    #[serde(skip)]
    pub config: ConfigSet,
    /// The IPv4 service addresses again, packed for the per-connection lookup.
    #[serde(skip)]
    pub fast: Fast,
}

impl Snapshot {
    /// Finds what owns an outbound connection's original destination.
    pub fn route_outbound(&self, dst: OrigDst) -> Outbound<'_> {
        let exact = match fast::v4(dst.0.ip()) {
            Some(ip) => self.fast.listener(SocketAddrV4::new(ip, dst.0.port())),
            None => self.v6_listener(dst),
        };
        match exact.or_else(|| self.cidr_listener(dst)) {
            Some(l) => Outbound::Service(l),
            None => self.no_service(),
        }
    }

    /// Routes an outbound connection: in the table ([`Fast`]) when it covers the
    /// destination's listener, else to the listener for [`Listener::route`].
    pub fn route(&self, dst: OrigDst, client: ClientAddr) -> Route<'_> {
        let exact = match fast::v4(dst.0.ip()) {
            Some(ip) => match self.fast.route(SocketAddrV4::new(ip, dst.0.port()), client) {
                Some(Ok(routed)) => return Route::Fast(routed),
                Some(Err(listener)) => Some(listener),
                None => None,
            },
            None => self.v6_listener(dst),
        };
        match exact.or_else(|| self.cidr_listener(dst)) {
            Some(l) => Route::Listener(l),
            None => match self.no_service() {
                Outbound::Refused => Route::Refused,
                _ => Route::Passthrough,
            },
        }
    }

    /// The listener at an IPv6 service address (IPv4 ones are in the table). Keyed by
    /// address and port alone: the original destination may carry a flow label or scope.
    fn v6_listener(&self, dst: OrigDst) -> Option<&Arc<Listener>> {
        self.listeners
            .get(&SocketAddr::new(dst.0.ip(), dst.0.port()))
    }

    /// A ServiceEntry CIDR listener owning `dst`, checked after the exact addresses.
    fn cidr_listener(&self, dst: OrigDst) -> Option<&Arc<Listener>> {
        let ip = dst.0.ip().to_canonical();
        self.cidr_listeners
            .iter()
            .find(|(net, port, _)| *port == dst.0.port() && net.contains(&ip))
            .map(|(_, _, l)| l)
    }

    fn no_service(&self) -> Outbound<'_> {
        match self.outbound_traffic_policy {
            OutboundTrafficPolicy::AllowAny => Outbound::Passthrough,
            OutboundTrafficPolicy::RegistryOnly => Outbound::Refused,
        }
    }
}

fn ser_atomic<S: serde::Serializer>(v: &AtomicU64, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_u64(v.load(Ordering::Relaxed))
}

fn ser_time<S: serde::Serializer>(t: &SystemTime, s: S) -> Result<S::Ok, S::Error> {
    let secs = t
        .duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or(0.0);
    s.serialize_f64(secs)
}

fn ser_sorted_clusters<S: serde::Serializer>(
    m: &FxHashMap<String, Arc<Cluster>>,
    s: S,
) -> Result<S::Ok, S::Error> {
    serde::Serialize::serialize(&sorted_clusters(m), s)
}

/// Clusters by name, in name order (admin output).
pub fn sorted_clusters(m: &FxHashMap<String, Arc<Cluster>>) -> BTreeMap<&str, &Arc<Cluster>> {
    m.iter().map(|(k, v)| (k.as_str(), v)).collect()
}

fn ser_listeners<S: serde::Serializer>(
    m: &FxHashMap<SocketAddr, Arc<Listener>>,
    s: S,
) -> Result<S::Ok, S::Error> {
    let sorted: BTreeMap<String, &Arc<Listener>> =
        m.iter().map(|(k, v)| (k.to_string(), v)).collect();
    serde::Serialize::serialize(&sorted, s)
}

mod ser_duration {
    use std::time::Duration;
    pub fn serialize<S: serde::Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(&crate::config::model::IstioDuration(*d))
    }
}

mod ser_opt_duration {
    use std::time::Duration;
    pub fn serialize<S: serde::Serializer>(d: &Option<Duration>, s: S) -> Result<S::Ok, S::Error> {
        match d {
            Some(d) => s.collect_str(&crate::config::model::IstioDuration(*d)),
            None => s.serialize_none(),
        }
    }
}
