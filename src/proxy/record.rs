//! Recording connections: counters and the access log, kept by an RAII guard so every exit
//! path (refusal, connect failure, relay error, task cancellation) is recorded exactly once.

use std::io;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Instant;

use serde::Serialize;

use super::relay::{RelayEnd, Transfer};
use crate::addr::{ClientAddr, OrigDst};
use crate::routing::Endpoint;

/// Process-wide counters.
#[derive(Debug, Default, Serialize)]
pub struct Stats {
    #[serde(serialize_with = "ser")]
    pub connections_opened: AtomicU64,
    #[serde(serialize_with = "ser")]
    pub connections_closed: AtomicU64,
    #[serde(serialize_with = "ser")]
    pub connections_active: AtomicU64,
    #[serde(serialize_with = "ser")]
    pub bytes_sent: AtomicU64,
    #[serde(serialize_with = "ser")]
    pub bytes_received: AtomicU64,
    #[serde(serialize_with = "ser")]
    pub passthrough: AtomicU64,
    #[serde(serialize_with = "ser")]
    pub refused_registry_only: AtomicU64,
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

/// Why a connection ended, in the access log.
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
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Direction {
    Outbound,
    Inbound,
    Gateway,
}

/// Holds an endpoint's active-connection count up for as long as it lives.
pub struct EndpointGuard(Arc<Endpoint>);

impl EndpointGuard {
    pub fn new(ep: Arc<Endpoint>) -> Self {
        ep.active_connections.fetch_add(1, Ordering::Relaxed);
        ep.total_connections.fetch_add(1, Ordering::Relaxed);
        EndpointGuard(ep)
    }
}

impl Drop for EndpointGuard {
    fn drop(&mut self) {
        self.0.active_connections.fetch_sub(1, Ordering::Relaxed);
    }
}

/// One connection's record; logs and counts on drop.
pub struct ConnRecord {
    stats: Arc<Stats>,
    pub direction: Direction,
    pub client: ClientAddr,
    pub dst: Option<OrigDst>,
    pub route: Option<String>,
    pub cluster: Option<String>,
    pub upstream: Option<String>,
    pub transfer: Transfer,
    pub reason: CloseReason,
    started: Instant,
}

impl ConnRecord {
    pub fn open(stats: Arc<Stats>, direction: Direction, client: ClientAddr) -> Self {
        stats.connections_opened.fetch_add(1, Ordering::Relaxed);
        stats.connections_active.fetch_add(1, Ordering::Relaxed);
        ConnRecord {
            stats,
            direction,
            client,
            dst: None,
            route: None,
            cluster: None,
            upstream: None,
            transfer: Transfer::default(),
            reason: CloseReason::Done,
            started: Instant::now(),
        }
    }

    pub fn stats(&self) -> &Stats {
        &self.stats
    }

    /// Records a failed upstream connect with the reason the error implies.
    pub fn connect_failed(&mut self, e: &io::Error) {
        self.stats.connect_failures.fetch_add(1, Ordering::Relaxed);
        self.reason = match e.kind() {
            io::ErrorKind::TimedOut => CloseReason::ConnectTimeout,
            io::ErrorKind::ConnectionRefused => CloseReason::ConnectRefused,
            _ => CloseReason::ConnectFailed,
        };
        tracing::warn!(client = %self.client, upstream = self.upstream.as_deref().unwrap_or("-"), error = %e, "upstream connect failed");
    }
}

impl From<RelayEnd> for CloseReason {
    fn from(end: RelayEnd) -> Self {
        match end {
            RelayEnd::Closed => CloseReason::Done,
            RelayEnd::ClientError => CloseReason::ClientReset,
            RelayEnd::UpstreamError => CloseReason::UpstreamReset,
        }
    }
}

impl Drop for ConnRecord {
    fn drop(&mut self) {
        let s = &self.stats;
        let sent = self.transfer.sent.load(Ordering::Relaxed);
        let received = self.transfer.received.load(Ordering::Relaxed);
        s.connections_closed.fetch_add(1, Ordering::Relaxed);
        s.connections_active.fetch_sub(1, Ordering::Relaxed);
        s.bytes_sent.fetch_add(sent, Ordering::Relaxed);
        s.bytes_received.fetch_add(received, Ordering::Relaxed);
        tracing::info!(
            target: "veer::access",
            direction = ?self.direction,
            client = %self.client,
            dst = %self.dst.map(|d| d.to_string()).unwrap_or_else(|| "-".into()),
            route = self.route.as_deref().unwrap_or("-"),
            cluster = self.cluster.as_deref().unwrap_or("-"),
            upstream = self.upstream.as_deref().unwrap_or("-"),
            sent,
            received,
            duration_ms = self.started.elapsed().as_millis() as u64,
            reason = ?self.reason,
            "tcp connection closed"
        );
    }
}
