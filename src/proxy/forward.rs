//! The common tail of every routed connection: pick an endpoint of the chosen cluster,
//! connect, relay, and record how it ended.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::net::TcpStream;

use super::connect::{connect, connect_endpoint};
use super::listen::Permit;
use super::record::{CloseReason, ClusterRef, ConnRecord, Destination, EndpointGuard, Upstream};
use super::relay::{relay, Limits};
use crate::addr::OrigDst;
use crate::routing::outlier::FailureOutcome;
use crate::routing::snapshot::ClusterCounters;
use crate::routing::{Cluster, Listener, RouteName, RouteRule};

/// How long a TLS listener waits for the ClientHello. Clients send it immediately after the
/// handshake, so a second covers slow links; a client that says nothing (or speaks
/// something else) is then routed without SNI — by `tcp:` rules or the service default —
/// instead of being held open.
const SNI_PEEK_TIMEOUT: Duration = Duration::from_secs(1);

/// The SNI to route by, if the listener looks at SNI. The ClientHello stays in the socket and
/// is relayed unchanged. A malformed or absent hello means "no SNI", never an error.
pub async fn sni_for(listener: &Listener, stream: &TcpStream, rec: &ConnRecord) -> Option<String> {
    if !listener.tls {
        return None;
    }
    match super::tls::peek_sni(stream, SNI_PEEK_TIMEOUT).await {
        Ok(sni) => sni,
        Err(e) => {
            tracing::debug!(client = %rec.client(), error = %e, "no SNI: routing without it");
            None
        }
    }
}

/// Records the routing decision on the connection's record.
pub fn note_route(rec: &ConnRecord, listener: &Listener, rule: Option<&RouteRule>) {
    rec.set_route(RouteName::of(listener, rule));
}

/// Connect attempts per connection when endpoints refuse, reset or time out: each retry
/// goes to an endpoint not yet tried, so this is also bounded by the endpoint count.
const MAX_CONNECT_ATTEMPTS: usize = 3;

/// Connects to an endpoint of `cluster` (or to `dst` for original-destination clusters) and
/// relays until both sides are done. Failed connects feed outlier detection and are retried
/// on other endpoints of the same cluster. `first`: the endpoint the routing table already
/// picked (the same choice [`Cluster::pick_excluding`] makes with nothing excluded).
pub async fn to_cluster(
    mut rec: ConnRecord,
    client: TcpStream,
    cluster: Arc<Cluster>,
    dst: OrigDst,
    mut first: Option<usize>,
) -> Option<Connected> {
    let timeout = cluster.policy.connect_timeout;
    let keepalive = cluster.policy.tcp_keepalive.clone();
    let destination = |ep| Destination {
        service: Some(&cluster.host),
        cluster: ClusterRef::Cluster(cluster.clone()),
        endpoint: ep,
    };
    // maxConnections: refuse fast instead of queueing (Istio's circuit breaker).
    let counters = cluster.counters.clone();
    let active = counters.active_connections.fetch_add(1, Ordering::Relaxed) + 1;
    let active_guard = ActiveGuard(counters.clone());
    if cluster
        .policy
        .max_connections
        .is_some_and(|max| active > u64::from(max))
    {
        counters.overflows.fetch_add(1, Ordering::Relaxed);
        rec.routed(destination(None));
        tracing::warn!(client = %rec.client(), cluster = %cluster.name, "maxConnections reached: connection refused");
        rec.reason = CloseReason::Overflow;
        return None;
    }
    let (upstream, endpoint) = if cluster.original_destination {
        rec.routed(destination(None));
        rec.set_upstream(Upstream::Addr(dst.0));
        match connect(dst.0, timeout, None).await {
            Ok(s) => (s, None),
            Err(e) => {
                rec.connect_failed(&e);
                return None;
            }
        }
    } else {
        let mut tried = Vec::new();
        let mut local_retries = 0;
        loop {
            let picked = first
                .take()
                .or_else(|| cluster.pick_excluding(rec.client(), &tried, Instant::now));
            let Some(index) = picked else {
                if tried.is_empty() {
                    rec.routed(destination(None));
                    tracing::warn!(
                        client = %rec.client(),
                        cluster = %cluster.name,
                        problem = cluster.problem.as_deref().unwrap_or("-"),
                        "no healthy upstream"
                    );
                    rec.stats()
                        .no_healthy_upstream
                        .fetch_add(1, Ordering::Relaxed);
                    rec.reason = CloseReason::NoHealthyUpstream;
                }
                return None; // every endpoint tried: the last failure is already recorded
            };
            let ep = cluster.endpoints[index].clone();
            if tried.is_empty() {
                rec.routed(destination(Some(&cluster.endpoints[index])));
            } else {
                counters.connect_retries.fetch_add(1, Ordering::Relaxed);
                rec.retried();
            }
            rec.set_upstream(Upstream::Endpoint(ep.clone()));
            let guard = EndpointGuard::new(ep.clone());
            match connect_endpoint(&ep.address, timeout, keepalive.as_ref()).await {
                Ok(s) => {
                    cluster.report_connect(index, true, Instant::now);
                    break (s, Some(guard));
                }
                Err(e) if is_out_of_descriptors(&e) && local_retries < LOCAL_RETRIES => {
                    // Our own limit, not the endpoint's fault: no outlier report, no move to
                    // another endpoint; wait for descriptors to free up and try again.
                    local_retries += 1;
                    tracing::warn!(error = %e, "out of file descriptors for an upstream socket; retrying shortly");
                    tokio::time::sleep(Duration::from_millis(50 << local_retries)).await;
                    continue;
                }
                Err(e) if is_out_of_descriptors(&e) => {
                    rec.connect_failed(&e);
                    return None;
                }
                Err(e) => {
                    if let Some(FailureOutcome::Ejected { for_ }) =
                        cluster.report_connect(index, false, Instant::now)
                    {
                        rec.ejected();
                        tracing::warn!(cluster = %cluster.name, endpoint = %ep.address, ejected_for = ?for_, "outlier detection: endpoint ejected");
                    }
                    rec.connect_failed(&e);
                    tried.push(index);
                    if tried.len() >= MAX_CONNECT_ATTEMPTS.min(cluster.endpoints.len()) {
                        return None;
                    }
                }
            }
        }
    };
    // The cluster (and through it the snapshot's endpoints) stays alive only as long as this
    // connection needs its counters; a reload never waits for it.
    let limits = Limits::from(&cluster.policy);
    drop(cluster);
    Some(Connected {
        _endpoint: endpoint,
        _active: Some(active_guard),
        ..Connected::new(rec, client, upstream, limits)
    })
}

/// Waits for descriptors before failing a connection that could not get an upstream socket
/// (about 0.7 s in all with the doubling pauses).
const LOCAL_RETRIES: u32 = 3;

fn is_out_of_descriptors(e: &std::io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(nix::libc::EMFILE) | Some(nix::libc::ENFILE)
    )
}

/// Holds one of a cluster's active connections (for `maxConnections`) until dropped.
struct ActiveGuard(Arc<ClusterCounters>);

impl Drop for ActiveGuard {
    fn drop(&mut self) {
        self.0.active_connections.fetch_sub(1, Ordering::Relaxed);
    }
}

/// A connection ready to relay: both sockets, its record, and what must live as long as
/// the relay (the endpoint's and the cluster's active-connection counts).
pub struct Connected {
    rec: ConnRecord,
    client: TcpStream,
    upstream: TcpStream,
    limits: Limits,
    /// Counted as active on the endpoint and the cluster while the relay lasts.
    _endpoint: Option<EndpointGuard>,
    _active: Option<ActiveGuard>,
}

impl Connected {
    pub fn new(rec: ConnRecord, client: TcpStream, upstream: TcpStream, limits: Limits) -> Self {
        Connected {
            rec,
            client,
            upstream,
            limits,
            _endpoint: None,
            _active: None,
        }
    }

    /// Relays and records the close reason.
    pub async fn relay(self) {
        let Connected {
            mut rec,
            client,
            upstream,
            limits,
            _endpoint,
            _active,
        } = self;
        rec.relaying();
        let info = rec.info.clone();
        let (end, err) = relay(client, upstream, &info.transfer, limits).await;
        rec.reason = end.into();
        if let Some(e) = err {
            tracing::debug!(client = %rec.client(), error = %e, "relay ended with an error");
        }
    }
}

/// Runs one accepted connection in its own task. `setup` (routing and connecting: most of
/// the code, and several KiB of future state) is boxed here and freed once it has connected,
/// so for the rest of the connection's life its task holds only the relay, a few hundred
/// bytes: a sidecar holds thousands of mostly idle connections. Cost: one short-lived
/// allocation per connection.
pub fn spawn<F>(setup: F, permit: Permit)
where
    F: std::future::Future<Output = Option<Connected>> + Send + 'static,
{
    let setup = Box::pin(setup);
    tokio::spawn(async move {
        let _permit = permit;
        if let Some(connected) = setup.await {
            connected.relay().await;
        }
    });
}
