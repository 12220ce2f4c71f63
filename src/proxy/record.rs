//! Recording connections: counters, Istio metrics, the live connection table and the access
//! log, kept by an RAII guard so every exit path (refusal, connect failure, relay error, task
//! cancellation) is recorded exactly once.

use std::collections::BTreeMap;
use std::io;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Instant, SystemTime};

use prometheus_client::metrics::counter::Counter;
use serde::Serialize;
use serde_json::json;

use super::metrics::{ClusterLabels, DestMetrics, Meter, Metrics, ReasonLabels, TcpLabels};
use super::relay::RelayEnd;
use crate::addr::{ClientAddr, OrigDst};
use crate::routing::{Cluster, Endpoint, RouteName};

/// Process-wide counters (the unlabelled summary behind `/stats`).
#[derive(Debug, Default, Serialize)]
pub struct Stats {
    #[serde(serialize_with = "ser")]
    pub connections_opened: AtomicU64,
    #[serde(serialize_with = "ser")]
    pub connections_closed: AtomicU64,
    #[serde(serialize_with = "ser")]
    pub connections_active: AtomicU64,
    #[serde(serialize_with = "ser")]
    pub bytes_to_upstream: AtomicU64,
    #[serde(serialize_with = "ser")]
    pub bytes_to_client: AtomicU64,
    #[serde(serialize_with = "ser")]
    pub passthrough: AtomicU64,
    #[serde(serialize_with = "ser")]
    pub refused_registry_only: AtomicU64,
    #[serde(serialize_with = "ser")]
    pub no_route: AtomicU64,
    #[serde(serialize_with = "ser")]
    pub no_healthy_upstream: AtomicU64,
    #[serde(serialize_with = "ser")]
    pub connect_failures: AtomicU64,
    #[serde(serialize_with = "ser")]
    pub loops_refused: AtomicU64,
}

fn ser<S: serde::Serializer>(v: &AtomicU64, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_u64(v.load(Ordering::Relaxed))
}

/// Why a connection ended, in the access log, `/connections` and metrics.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum CloseReason {
    /// Both sides closed normally (FIN both ways).
    Done,
    ClientReset,
    UpstreamReset,
    ConnectTimeout,
    ConnectRefused,
    ConnectFailed,
    NoHealthyUpstream,
    /// No rule matched and there is no default (gateways, TLS without a matching SNI).
    NoRoute,
    RegistryOnly,
    /// The original destination is one of the proxy's own listeners.
    Loop,
    NoOriginalDestination,
    /// Closed because the proxy was shutting down and the drain deadline passed.
    Drain,
    IdleTimeout,
    HalfCloseTimeout,
    MaxConnectionDuration,
    /// `maxConnections` of the cluster reached.
    Overflow,
}

impl CloseReason {
    /// Envoy's response flags, as Istio's `response_flags` label carries them.
    pub fn response_flags(self) -> &'static str {
        match self {
            CloseReason::Done => "-",
            CloseReason::ClientReset => "DC",
            CloseReason::UpstreamReset => "UC",
            CloseReason::ConnectTimeout
            | CloseReason::ConnectRefused
            | CloseReason::ConnectFailed => "UF",
            CloseReason::NoHealthyUpstream => "UH",
            CloseReason::NoRoute
            | CloseReason::RegistryOnly
            | CloseReason::Loop
            | CloseReason::NoOriginalDestination => "NR",
            CloseReason::Drain | CloseReason::MaxConnectionDuration => "DT",
            CloseReason::IdleTimeout | CloseReason::HalfCloseTimeout => "SI",
            CloseReason::Overflow => "UO",
        }
    }

    fn name(self) -> String {
        serde_json::to_value(self)
            .ok()
            .and_then(|v| v.as_str().map(str::to_string))
            .unwrap_or_default()
    }
}

impl From<RelayEnd> for CloseReason {
    fn from(end: RelayEnd) -> Self {
        match end {
            RelayEnd::Closed => CloseReason::Done,
            RelayEnd::ClientError => CloseReason::ClientReset,
            RelayEnd::UpstreamError => CloseReason::UpstreamReset,
            RelayEnd::IdleTimeout => CloseReason::IdleTimeout,
            RelayEnd::HalfCloseTimeout => CloseReason::HalfCloseTimeout,
            RelayEnd::MaxDuration => CloseReason::MaxConnectionDuration,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Direction {
    Outbound,
    Inbound,
    Gateway,
}

impl Direction {
    fn name(self) -> &'static str {
        match self {
            Direction::Outbound => "outbound",
            Direction::Inbound => "inbound",
            Direction::Gateway => "gateway",
        }
    }
}

thread_local! {
    /// Scratch space for [`Metrics::dest`] keys: no allocation per connection.
    static DEST_KEY: std::cell::RefCell<String> = const { std::cell::RefCell::new(String::new()) };
}

/// Live byte counts and FIN state of one connection, written by the relay.
#[derive(Debug, Default)]
pub struct Transfer {
    /// Client → upstream (Istio's "received" bytes: the request direction).
    pub to_upstream: Meter,
    /// Upstream → client (Istio's "sent" bytes: the response direction).
    pub to_client: Meter,
    pub client_fin: AtomicBool,
    pub upstream_fin: AtomicBool,
}

/// What is known about a connection so far; filled in as it is routed. Shared references
/// and addresses, rendered as text only when shown (access log, `/connections`): no
/// allocation per connection for names most connections never show.
#[derive(Debug, Default, Clone)]
pub struct ConnMeta {
    pub dst: Option<OrigDst>,
    pub route: Option<RouteName>,
    pub cluster: Option<ClusterRef>,
    pub upstream: Option<Upstream>,
    pub phase: &'static str,
}

/// The cluster a connection was given.
#[derive(Debug, Clone)]
pub enum ClusterRef {
    Cluster(Arc<Cluster>),
    /// `PassthroughCluster`, `inbound`: no cluster in the snapshot.
    Fixed(&'static str),
}

impl ClusterRef {
    pub fn name(&self) -> &str {
        match self {
            ClusterRef::Cluster(c) => &c.name,
            ClusterRef::Fixed(name) => name,
        }
    }

    pub fn subset(&self) -> Option<&str> {
        match self {
            ClusterRef::Cluster(c) => c.subset.as_deref(),
            ClusterRef::Fixed(_) => None,
        }
    }
}

/// Where the proxy connects (or connected) a connection.
#[derive(Debug, Clone)]
pub enum Upstream {
    /// The original destination (pass-through, inbound) or a resolved address.
    Addr(std::net::SocketAddr),
    Endpoint(Arc<Endpoint>),
}

impl std::fmt::Display for Upstream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Upstream::Addr(a) => a.fmt(f),
            Upstream::Endpoint(e) => e.address.fmt(f),
        }
    }
}

/// One live connection, shared between its task and the connection table.
#[derive(Debug)]
pub struct ConnInfo {
    pub id: u64,
    pub direction: Direction,
    pub client: ClientAddr,
    pub opened_at: SystemTime,
    started: Instant,
    pub meta: Mutex<ConnMeta>,
    pub transfer: Transfer,
    /// Set when the drain deadline passes with this connection still open: it is about to
    /// be closed by the proxy's exit, and its log line should say so.
    pub drained: AtomicBool,
}

impl ConnInfo {
    fn meta(&self) -> std::sync::MutexGuard<'_, ConnMeta> {
        // A poisoned lock only means a writer panicked; the strings inside are still valid.
        self.meta.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The `/connections` row.
    pub fn describe(&self) -> serde_json::Value {
        let m = self.meta().clone();
        let t = &self.transfer;
        let (cf, uf) = (
            t.client_fin.load(Ordering::Relaxed),
            t.upstream_fin.load(Ordering::Relaxed),
        );
        json!({
            "id": self.id,
            "direction": self.direction,
            "client": self.client.to_string(),
            "original_destination": m.dst.map(|d| d.to_string()),
            "route": m.route.map(|r| r.to_string()),
            "cluster": m.cluster.as_ref().map(ClusterRef::name),
            "subset": m.cluster.as_ref().and_then(ClusterRef::subset),
            "upstream": m.upstream.map(|u| u.to_string()),
            "bytes_to_upstream": t.to_upstream.get(),
            "bytes_to_client": t.to_client.get(),
            "age_seconds": self.started.elapsed().as_secs_f64(),
            "state": match (m.phase, cf, uf) {
                ("relaying", false, false) => "open",
                ("relaying", true, false) => "half-closed (client sent FIN)",
                ("relaying", false, true) => "half-closed (upstream sent FIN)",
                ("relaying", true, true) => "closing",
                (phase, _, _) => phase,
            },
        })
    }
}

impl ConnInfo {
    /// An access-log line for a connection still open (`--access-log-interval`).
    pub fn log_progress(&self) {
        self.access_log("tcp connection open", None);
    }

    /// One access-log line; every line has the same fields so they can be joined by `id`.
    /// `closed` carries the close reason for the last line.
    fn access_log(&self, event: &str, closed: Option<CloseReason>) {
        // Checked first: with the access log off (RUST_LOG=warn) a connection pays nothing
        // for it, not even the clone of its metadata.
        if !tracing::enabled!(target: "veer::access", tracing::Level::INFO) {
            return;
        }
        let m = self.meta().clone();
        let (route, upstream) = (
            m.route.map(|r| r.to_string()),
            m.upstream.map(|u| u.to_string()),
        );
        tracing::info!(
            target: "veer::access",
            id = self.id,
            direction = ?self.direction,
            client = %self.client,
            dst = %m.dst.map_or_else(|| "-".to_string(), |d| d.to_string()),
            route = route.as_deref().unwrap_or("-"),
            cluster = m.cluster.as_ref().map_or("-", ClusterRef::name),
            upstream = upstream.as_deref().unwrap_or("-"),
            bytes_to_upstream = self.transfer.to_upstream.get(),
            bytes_to_client = self.transfer.to_client.get(),
            duration_ms = self.started.elapsed().as_millis() as u64,
            reason = %closed.map_or_else(|| "-".to_string(), |r| format!("{r:?}")),
            response_flags = closed.map_or("-", CloseReason::response_flags),
            "{event}"
        );
    }
}

/// Every open connection, for `/connections`, drain and periodic access logs. One mutex
/// operation per connection open and close.
#[derive(Debug, Default)]
pub struct ConnTable {
    next_id: AtomicU64,
    live: Mutex<BTreeMap<u64, Arc<ConnInfo>>>,
}

impl ConnTable {
    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeMap<u64, Arc<ConnInfo>>> {
        self.live.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn list(&self) -> Vec<Arc<ConnInfo>> {
        self.lock().values().cloned().collect()
    }

    pub fn len(&self) -> usize {
        self.lock().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Where connections are recorded: counters, metrics, the table, and who this proxy is (for
/// the `source_*` labels).
#[derive(Default)]
pub struct Recorder {
    pub stats: Stats,
    pub metrics: Metrics,
    pub table: ConnTable,
    pub source_namespace: String,
    pub source_app: String,
    pub source_version: String,
    /// `veer_connections_closed_by_reason` by [`CloseReason`], created on first use.
    close_counters: [OnceLock<Counter>; CLOSE_REASONS],
    /// Also log a line when a connection starts relaying (Envoy's
    /// `flush_access_log_on_connected`). Off by default, as in Envoy and Istio: one line per
    /// connection, at close, which halves the log volume and the log's CPU cost per
    /// connection (scripts/bench.sh: 0.127-0.144 → 0.110 s of proxy CPU per 1000 logged
    /// connections across runs; this VM's noise is of the same order).
    pub log_on_connect: bool,
}

/// How many [`CloseReason`]s there are (`Overflow` is the last).
pub(crate) const CLOSE_REASONS: usize = CloseReason::Overflow as usize + 1;

impl Recorder {
    /// A recorder for a proxy in `namespace` whose workload has these `app` and `version`
    /// labels (the `source_*` labels of its metrics).
    pub fn new(namespace: String, app: String, version: String) -> Self {
        Recorder {
            source_namespace: namespace,
            source_app: app,
            source_version: version,
            ..Default::default()
        }
    }

    fn close_reason_counter(&self, reason: CloseReason) -> &Counter {
        self.close_counters[reason as usize].get_or_init(|| {
            let labels = ReasonLabels {
                reason: reason.name(),
            };
            self.metrics.close_reasons.get_or_create(&labels).clone()
        })
    }
}

/// Holds an endpoint's active-connection count up for as long as it lives.
pub struct EndpointGuard(Arc<Endpoint>);

impl EndpointGuard {
    pub fn new(ep: Arc<Endpoint>) -> Self {
        ep.load.fetch_add(1, Ordering::Relaxed);
        ep.total_connections.fetch_add(1, Ordering::Relaxed);
        EndpointGuard(ep)
    }
}

impl Drop for EndpointGuard {
    fn drop(&mut self) {
        self.0.load.fetch_sub(1, Ordering::Relaxed);
    }
}

/// The destination side of a routed connection, for labels and logs.
pub struct Destination<'a> {
    /// `None` for pass-through: no service owns the address (labelled `unknown`, and named
    /// after the cluster, as Istio does).
    pub service: Option<&'a str>,
    pub cluster: ClusterRef,
    pub endpoint: Option<&'a Endpoint>,
}

/// One connection's record; logs, counts and leaves the table on drop.
pub struct ConnRecord {
    rec: Arc<Recorder>,
    pub info: Arc<ConnInfo>,
    dest: Option<Arc<DestMetrics>>,
    pub reason: CloseReason,
}

impl ConnRecord {
    pub fn open(rec: Arc<Recorder>, direction: Direction, client: ClientAddr) -> Self {
        rec.stats.connections_opened.fetch_add(1, Ordering::Relaxed);
        rec.stats.connections_active.fetch_add(1, Ordering::Relaxed);
        rec.metrics.active_connections.inc();
        let info = Arc::new(ConnInfo {
            id: rec.table.next_id.fetch_add(1, Ordering::Relaxed) + 1,
            direction,
            client,
            opened_at: SystemTime::now(),
            started: Instant::now(),
            meta: Mutex::new(ConnMeta {
                phase: "routing",
                ..Default::default()
            }),
            transfer: Transfer::default(),
            drained: AtomicBool::new(false),
        });
        rec.table.lock().insert(info.id, info.clone());
        ConnRecord {
            rec,
            info,
            dest: None,
            reason: CloseReason::Done,
        }
    }

    pub fn stats(&self) -> &Stats {
        &self.rec.stats
    }

    pub fn client(&self) -> ClientAddr {
        self.info.client
    }

    pub fn set_dst(&self, dst: OrigDst) {
        self.info.meta().dst = Some(dst);
    }

    pub fn set_route(&self, route: RouteName) {
        self.info.meta().route = Some(route);
    }

    pub fn set_upstream(&self, upstream: Upstream) {
        let mut m = self.info.meta();
        m.upstream = Some(upstream);
        m.phase = "connecting";
    }

    pub fn upstream(&self) -> Option<Upstream> {
        self.info.meta().upstream.clone()
    }

    /// The labels every connection of this proxy shares: who reports and who the source is.
    fn base_labels(&self) -> TcpLabels {
        let inbound = self.info.direction == Direction::Inbound;
        TcpLabels {
            reporter: if inbound { "destination" } else { "source" }.into(),
            source_workload_namespace: self.rec.source_namespace.clone(),
            source_app: self.rec.source_app.clone(),
            source_version: self.rec.source_version.clone(),
            request_protocol: "tcp".into(),
            connection_security_policy: if inbound { "none" } else { "unknown" }.into(),
            ..Default::default()
        }
    }

    /// Records where the connection goes: Istio labels are fixed from here on and the byte
    /// counters start feeding the metrics.
    pub fn routed(&mut self, d: Destination<'_>) {
        let ep_label = |k: &str| {
            d.endpoint
                .and_then(|e| e.labels.get(k))
                .map_or("unknown", String::as_str)
        };
        let workload = d.endpoint.map_or("unknown", |e| {
            e.origin.rsplit('/').next().unwrap_or("unknown")
        });
        let (app, version) = (ep_label("app"), ep_label("version"));
        let subset = d.cluster.subset().unwrap_or("");
        let direction = self.info.direction;
        let dest = DEST_KEY.with(|key| {
            // Everything the labels below depend on (the rest is fixed per process).
            let mut key = key.borrow_mut();
            key.clear();
            let service = d.service.unwrap_or("unknown");
            for part in [direction.name(), service, subset, workload, app, version] {
                key.push_str(part);
                key.push('\0');
            }
            self.rec.metrics.dest(&key, || {
                let (name, namespace) = match d.service.map(|s| (s, s.split_once(".svc."))) {
                    Some((_, Some((head, _)))) => head
                        .split_once('.')
                        .map_or((head, "unknown"), |(n, ns)| (n, ns)),
                    Some((s, None)) => (s, "unknown"),
                    None => (d.cluster.name(), "unknown"),
                };
                TcpLabels {
                    destination_workload: workload.into(),
                    destination_app: app.into(),
                    destination_version: version.into(),
                    destination_service: service.into(),
                    destination_service_name: name.into(),
                    destination_service_namespace: namespace.into(),
                    destination_subset: subset.into(),
                    response_flags: "-".into(),
                    ..self.base_labels()
                }
            })
        });
        dest.opened.inc();
        self.info.meta().cluster = Some(d.cluster);
        let t = &self.info.transfer;
        t.to_upstream.attach(dest.received_bytes.clone());
        t.to_client.attach(dest.sent_bytes.clone());
        self.dest = Some(dest);
    }

    /// The connection is about to relay; logs the open line of the access log if asked to.
    pub fn relaying(&self) {
        self.info.meta().phase = "relaying";
        if self.rec.log_on_connect {
            self.info.access_log("tcp connection opened", None);
        }
    }

    /// Another endpoint is being tried after a failed connect.
    pub fn retried(&self) {
        self.rec.metrics.connect_retries.inc();
    }

    /// A failed connect ejected its endpoint.
    pub fn ejected(&self) {
        self.rec.metrics.ejections.inc();
    }

    /// Records a failed upstream connect with the reason the error implies.
    pub fn connect_failed(&mut self, e: &io::Error) {
        self.rec
            .stats
            .connect_failures
            .fetch_add(1, Ordering::Relaxed);
        let cluster = self.info.meta().cluster.clone();
        if let Some(cluster) = cluster {
            self.rec
                .metrics
                .connect_failures
                .get_or_create(&ClusterLabels {
                    cluster: cluster.name().to_string(),
                })
                .inc();
        }
        self.reason = match e.kind() {
            io::ErrorKind::TimedOut => CloseReason::ConnectTimeout,
            io::ErrorKind::ConnectionRefused => CloseReason::ConnectRefused,
            _ => CloseReason::ConnectFailed,
        };
        let upstream = self
            .upstream()
            .map_or_else(|| "-".to_string(), |u| u.to_string());
        tracing::warn!(client = %self.info.client, %upstream, error = %e, "upstream connect failed");
    }
}

impl Drop for ConnRecord {
    fn drop(&mut self) {
        if self.info.drained.load(Ordering::Relaxed) && self.reason == CloseReason::Done {
            self.reason = CloseReason::Drain;
        }
        let r = &self.rec;
        r.table.lock().remove(&self.info.id);
        let t = &self.info.transfer;
        let (up, down) = (t.to_upstream.get(), t.to_client.get());
        r.stats.connections_closed.fetch_add(1, Ordering::Relaxed);
        r.stats.connections_active.fetch_sub(1, Ordering::Relaxed);
        r.stats.bytes_to_upstream.fetch_add(up, Ordering::Relaxed);
        r.stats.bytes_to_client.fetch_add(down, Ordering::Relaxed);
        r.metrics.active_connections.dec();
        r.close_reason_counter(self.reason).inc();
        match &self.dest {
            Some(dest) => {
                dest.closed(&r.metrics, self.reason).inc();
            }
            None => {
                // A connection refused before routing still counts as opened and closed,
                // labelled with what is known (Istio does the same for BlackHole/NR
                // connections). Rare: built per connection.
                let m = self.info.meta().clone();
                let l = TcpLabels {
                    destination_service: m.dst.map_or_else(|| "unknown".into(), |d| d.to_string()),
                    destination_service_name: m
                        .route
                        .map_or_else(|| "unknown".into(), |r| r.to_string()),
                    ..self.base_labels()
                };
                r.metrics.tcp_opened.get_or_create(&l).inc();
                let closed = TcpLabels {
                    response_flags: self.reason.response_flags().into(),
                    ..l
                };
                r.metrics.tcp_closed.get_or_create(&closed).inc();
            }
        }
        self.info
            .access_log("tcp connection closed", Some(self.reason));
    }
}
