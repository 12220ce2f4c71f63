//! Connections the application makes, captured by the outbound REDIRECT rule.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpStream;

use super::connect::{connect, connect_endpoint};
use super::record::{CloseReason, ConnRecord, Direction, EndpointGuard};
use super::relay::relay;
use super::Shared;
use crate::addr::ClientAddr;
use crate::routing::Outbound;

/// Connect timeout for passthrough traffic, which has no DestinationRule (Istio's default).
const PASSTHROUGH_CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

pub async fn handle(shared: Arc<Shared>, stream: TcpStream, client: ClientAddr) {
    let _ = stream.set_nodelay(true);
    let mut rec = ConnRecord::open(shared.stats.clone(), Direction::Outbound, client);
    let dst = match shared.orig_dst.lookup(&stream) {
        Ok(d) => d,
        Err(e) => {
            tracing::warn!(%client, error = %e, "no original destination (connection not captured by iptables?)");
            rec.reason = CloseReason::NoOriginalDestination;
            return;
        }
    };
    rec.dst = Some(dst);
    if shared.is_loop(&stream, dst) {
        tracing::warn!(%client, %dst, "refusing a connection addressed to the proxy itself");
        shared.stats.loops_refused.fetch_add(1, Ordering::Relaxed);
        rec.reason = CloseReason::Loop;
        return;
    }
    // Hold the snapshot only while deciding: the relay keeps just the clusters it uses, so a
    // reload can drop the old snapshot without touching this connection.
    let snapshot = shared.snapshot.load_full();
    let (upstream, _endpoint_guard) = match snapshot.route_outbound(dst) {
        Outbound::Refused => {
            shared
                .stats
                .refused_registry_only
                .fetch_add(1, Ordering::Relaxed);
            rec.route = Some("BlackHoleCluster".into());
            rec.reason = CloseReason::RegistryOnly;
            return;
        }
        Outbound::Passthrough => {
            shared.stats.passthrough.fetch_add(1, Ordering::Relaxed);
            rec.route = Some("PassthroughCluster".into());
            rec.upstream = Some(dst.to_string());
            match connect(dst.0, PASSTHROUGH_CONNECT_TIMEOUT, None).await {
                Ok(s) => (s, None),
                Err(e) => return rec.connect_failed(&e),
            }
        }
        Outbound::Route {
            listener,
            rule,
            cluster,
        } => {
            rec.route = Some(rule.map_or_else(
                || format!("{}:{} (no rule matched)", listener.host, listener.port),
                |r| r.name(),
            ));
            rec.cluster = Some(cluster.name.clone());
            let timeout = cluster.policy.connect_timeout;
            if cluster.original_destination {
                rec.upstream = Some(dst.to_string());
                match connect(dst.0, timeout, None).await {
                    Ok(s) => (s, None),
                    Err(e) => return rec.connect_failed(&e),
                }
            } else {
                let Some(ep) = cluster.pick(client).cloned() else {
                    tracing::warn!(%client, %dst, cluster = %cluster.name, problem = cluster.problem.as_deref().unwrap_or("-"), "no healthy upstream");
                    shared
                        .stats
                        .no_healthy_upstream
                        .fetch_add(1, Ordering::Relaxed);
                    rec.reason = CloseReason::NoHealthyUpstream;
                    return;
                };
                rec.upstream = Some(ep.address.to_string());
                let guard = EndpointGuard::new(ep.clone());
                match connect_endpoint(&ep.address, timeout).await {
                    Ok(s) => (s, Some(guard)),
                    Err(e) => return rec.connect_failed(&e),
                }
            }
        }
    };
    drop(snapshot);
    let (end, err) = relay(stream, upstream, &rec.transfer).await;
    rec.reason = end.into();
    if let Some(e) = err {
        tracing::debug!(%client, %dst, error = %e, "relay ended with an error");
    }
}
