//! The common tail of every routed connection: pick an endpoint of the chosen cluster,
//! connect, relay, and record how it ended.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpStream;

use super::connect::{connect, connect_endpoint};
use super::record::{CloseReason, ConnRecord, Destination, EndpointGuard};
use super::relay::relay;
use crate::addr::OrigDst;
use crate::routing::{Cluster, Listener, RouteRule};

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
pub fn note_route(rec: &ConnRecord, listener: &Listener, rule: Option<&Arc<RouteRule>>) {
    rec.set_route(rule.map_or_else(
        || format!("{}:{} (no rule matched)", listener.host, listener.port),
        |r| r.name(),
    ));
}

/// Connects to an endpoint of `cluster` (or to `dst` for original-destination clusters) and
/// relays until both sides are done.
pub async fn to_cluster(
    mut rec: ConnRecord,
    client: TcpStream,
    cluster: Arc<Cluster>,
    dst: OrigDst,
) {
    let timeout = cluster.policy.connect_timeout;
    let destination = |ep| Destination {
        service: &cluster.host,
        cluster: &cluster.name,
        subset: cluster.subset.as_deref(),
        endpoint: ep,
    };
    let (upstream, _endpoint) = if cluster.original_destination {
        rec.routed(destination(None));
        rec.set_upstream(dst.to_string());
        match connect(dst.0, timeout, None).await {
            Ok(s) => (s, None),
            Err(e) => return rec.connect_failed(&e),
        }
    } else {
        let Some(ep) = cluster.pick(rec.client()).cloned() else {
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
            return;
        };
        rec.routed(destination(Some(&ep)));
        rec.set_upstream(ep.address.to_string());
        let guard = EndpointGuard::new(ep.clone());
        match connect_endpoint(&ep.address, timeout).await {
            Ok(s) => (s, Some(guard)),
            Err(e) => return rec.connect_failed(&e),
        }
    };
    // The cluster (and through it the snapshot's endpoints) stays alive only as long as this
    // connection needs its counters; a reload never waits for it.
    drop(cluster);
    relay_to_end(rec, client, upstream).await;
}

/// Relays and records the close reason.
pub async fn relay_to_end(mut rec: ConnRecord, client: TcpStream, upstream: TcpStream) {
    rec.relaying();
    let info = rec.info.clone();
    let (end, err) = relay(client, upstream, &info.transfer).await;
    rec.reason = end.into();
    if let Some(e) = err {
        tracing::debug!(client = %rec.client(), error = %e, "relay ended with an error");
    }
}
