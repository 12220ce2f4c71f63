//! Prometheus metrics, with Istio's TCP metric and label names so existing dashboards work,
//! plus veer's own.
//!
//! Byte counters are incremented as bytes move (see [`Meter`]), not at close as Envoy's
//! TCP stats are, so a long-lived connection shows its traffic while it lasts.

use std::collections::HashMap;
use std::sync::{Arc, OnceLock, RwLock};

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

use super::record::{CloseReason, CLOSE_REASONS};

/// Istio's standard TCP labels, plus `destination_subset` (veer: which subset the route
/// picked, so a canary split can be read off directly).
#[derive(Clone, Debug, Default, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct TcpLabels {
    pub reporter: String,
    pub source_workload_namespace: String,
    pub source_app: String,
    pub source_version: String,
    pub destination_workload: String,
    pub destination_app: String,
    pub destination_version: String,
    pub destination_service: String,
    pub destination_service_name: String,
    pub destination_service_namespace: String,
    pub destination_subset: String,
    pub request_protocol: String,
    pub response_flags: String,
    pub connection_security_policy: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ClusterLabels {
    pub cluster: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ResultLabels {
    pub result: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReasonLabels {
    pub reason: String,
}

/// Every metric the proxy exports.
pub struct Metrics {
    registry: Registry,
    pub tcp_opened: Family<TcpLabels, Counter>,
    pub tcp_closed: Family<TcpLabels, Counter>,
    pub tcp_sent_bytes: Family<TcpLabels, Counter>,
    pub tcp_received_bytes: Family<TcpLabels, Counter>,
    pub active_connections: Gauge,
    pub connect_failures: Family<ClusterLabels, Counter>,
    pub close_reasons: Family<ReasonLabels, Counter>,
    pub reloads: Family<ResultLabels, Counter>,
    pub accept_errors: Counter,
    pub connect_retries: Counter,
    pub ejections: Counter,
    pub accept_paused: Counter,
    /// [`DestMetrics`] by destination key (see [`Metrics::dest`]). Grows with the number of
    /// distinct destinations, as the Istio families themselves do.
    dests: RwLock<HashMap<Box<str>, Arc<DestMetrics>>>,
}

/// The Istio counters of one destination label set (direction, service, subset, endpoint),
/// shared by all its connections: the 14 labels are built and hashed once per destination
/// instead of four times per connection, and a connection holds one pointer, not its labels.
pub struct DestMetrics {
    labels: TcpLabels,
    pub opened: Counter,
    pub sent_bytes: Counter,
    pub received_bytes: Counter,
    /// `istio_tcp_connections_closed_total` by close reason (several reasons share a
    /// response flag, and so the same counter), created on first use.
    closed: [OnceLock<Counter>; CLOSE_REASONS],
}

impl DestMetrics {
    /// The closed-connections counter of these labels for a connection closed by `reason`.
    pub fn closed(&self, metrics: &Metrics, reason: CloseReason) -> &Counter {
        self.closed[reason as usize].get_or_init(|| {
            let labels = TcpLabels {
                response_flags: reason.response_flags().into(),
                ..self.labels.clone()
            };
            metrics.tcp_closed.get_or_create(&labels).clone()
        })
    }
}

impl Default for Metrics {
    fn default() -> Self {
        let mut registry = Registry::default();
        let m = Metrics {
            tcp_opened: Family::default(),
            tcp_closed: Family::default(),
            tcp_sent_bytes: Family::default(),
            tcp_received_bytes: Family::default(),
            active_connections: Gauge::default(),
            connect_failures: Family::default(),
            close_reasons: Family::default(),
            reloads: Family::default(),
            accept_errors: Counter::default(),
            connect_retries: Counter::default(),
            ejections: Counter::default(),
            accept_paused: Counter::default(),
            registry: Registry::default(),
            dests: RwLock::default(),
        };
        registry.register(
            "istio_tcp_connections_opened",
            "TCP connections opened",
            m.tcp_opened.clone(),
        );
        registry.register(
            "istio_tcp_connections_closed",
            "TCP connections closed",
            m.tcp_closed.clone(),
        );
        registry.register(
            "istio_tcp_sent_bytes",
            "Bytes sent to the client (response direction), counted as they move",
            m.tcp_sent_bytes.clone(),
        );
        registry.register(
            "istio_tcp_received_bytes",
            "Bytes received from the client (request direction), counted as they move",
            m.tcp_received_bytes.clone(),
        );
        registry.register(
            "veer_active_connections",
            "Connections open now",
            m.active_connections.clone(),
        );
        registry.register(
            "veer_upstream_connect_failures",
            "Failed upstream connects per cluster",
            m.connect_failures.clone(),
        );
        registry.register(
            "veer_connections_closed_by_reason",
            "Closed connections by close reason",
            m.close_reasons.clone(),
        );
        registry.register(
            "veer_config_reloads",
            "Config reloads by result (success, failure)",
            m.reloads.clone(),
        );
        registry.register(
            "veer_accept_errors",
            "Failed accept() calls (e.g. out of file descriptors)",
            m.accept_errors.clone(),
        );
        registry.register(
            "veer_upstream_connect_retries",
            "Connects retried on another endpoint",
            m.connect_retries.clone(),
        );
        registry.register(
            "veer_outlier_ejections",
            "Endpoints ejected by outlier detection",
            m.ejections.clone(),
        );
        registry.register(
            "veer_accept_paused",
            "Times accepting paused because the process-wide connection limit was reached",
            m.accept_paused.clone(),
        );
        Metrics { registry, ..m }
    }
}

impl Metrics {
    /// The counters of the destination `key` names (a string that determines its labels),
    /// made with `labels` the first time. Cost per connection: one hash of `key` under a
    /// read lock.
    pub fn dest(&self, key: &str, labels: impl FnOnce() -> TcpLabels) -> Arc<DestMetrics> {
        if let Some(d) = self
            .dests
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .get(key)
        {
            return d.clone();
        }
        let labels = labels();
        let d = Arc::new(DestMetrics {
            opened: self.tcp_opened.get_or_create(&labels).clone(),
            sent_bytes: self.tcp_sent_bytes.get_or_create(&labels).clone(),
            received_bytes: self.tcp_received_bytes.get_or_create(&labels).clone(),
            closed: Default::default(),
            labels,
        });
        self.dests
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .entry(key.into())
            .or_insert(d)
            .clone()
    }

    /// Prometheus/OpenMetrics text exposition.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        // Writing to a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }
}

/// Counts one direction's bytes: the connection's own total (for the connection table and
/// access log) and, once the route is known, the Istio byte counter of its label set.
/// Cost per read: two relaxed atomic adds.
#[derive(Debug, Default)]
pub struct Meter {
    pub bytes: std::sync::atomic::AtomicU64,
    metric: OnceLock<Counter>,
}

impl Meter {
    pub fn add(&self, n: u64) {
        self.bytes
            .fetch_add(n, std::sync::atomic::Ordering::Relaxed);
        if let Some(c) = self.metric.get() {
            c.inc_by(n);
        }
    }

    pub fn get(&self) -> u64 {
        self.bytes.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Attaches the metric counter (once); bytes counted before are carried over.
    pub fn attach(&self, counter: Counter) {
        let before = self.get();
        if self.metric.set(counter.clone()).is_ok() && before > 0 {
            counter.inc_by(before);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn meter_counts_before_and_after_attach() {
        let m = Metrics::default();
        let labels = TcpLabels {
            destination_service: "a".into(),
            ..Default::default()
        };
        let meter = Meter::default();
        meter.add(5);
        meter.attach(m.tcp_sent_bytes.get_or_create(&labels).clone());
        meter.add(7);
        assert_eq!(meter.get(), 12);
        assert_eq!(m.tcp_sent_bytes.get_or_create(&labels).get(), 12);
        let text = m.encode();
        assert!(text.contains("istio_tcp_sent_bytes_total{"), "{text}");
        assert!(text.contains("destination_service=\"a\""), "{text}");
    }

    #[test]
    fn destinations_share_one_label_set() {
        let m = Metrics::default();
        let labels = || TcpLabels {
            destination_service: "tcp-echo.default.svc.cluster.local".into(),
            destination_subset: "v1".into(),
            response_flags: "-".into(),
            ..Default::default()
        };
        let a = m.dest("k1", labels);
        let b = m.dest("k1", || unreachable!("built once per key"));
        assert!(Arc::ptr_eq(&a, &b));
        a.opened.inc();
        b.opened.inc();
        a.closed(&m, CloseReason::Done).inc();
        b.closed(&m, CloseReason::ConnectRefused).inc();
        let text = m.encode();
        let line = |name: &str, flags: &str| {
            text.lines()
                .find(|l| {
                    l.starts_with(name)
                        && l.contains("destination_subset=\"v1\"")
                        && l.contains(&format!("response_flags=\"{flags}\""))
                })
                .map(|l| l.rsplit(' ').next().unwrap().to_string())
        };
        assert_eq!(
            line("istio_tcp_connections_opened_total", "-").as_deref(),
            Some("2")
        );
        assert_eq!(
            line("istio_tcp_connections_closed_total", "-").as_deref(),
            Some("1")
        );
        assert_eq!(
            line("istio_tcp_connections_closed_total", "UF").as_deref(),
            Some("1")
        );
        // Another key is another label set.
        let c = m.dest("k2", labels);
        assert!(!Arc::ptr_eq(&a, &c));
    }
}
