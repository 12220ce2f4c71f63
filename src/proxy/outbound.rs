//! Connections the application makes, captured by the outbound REDIRECT rule.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpStream;

use super::connect::connect;
use super::forward::{note_route, sni_for, to_cluster, Connected};
use super::record::{CloseReason, ClusterRef, ConnRecord, Destination, Direction, Upstream};
use super::relay::Limits;
use super::Shared;
use crate::addr::ClientAddr;
use crate::routing::{Route, RouteName};

/// Connect timeout for passthrough traffic, which has no DestinationRule (Istio's default).
const PASSTHROUGH_CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

pub async fn handle(
    shared: Arc<Shared>,
    stream: TcpStream,
    client: ClientAddr,
) -> Option<Connected> {
    // TCP_NODELAY: inherited from the listener (listen::bind_std_with).
    let stats = &shared.recorder.stats;
    let mut rec = ConnRecord::open(shared.recorder.clone(), Direction::Outbound, client);
    let dst = match shared.orig_dst.lookup(&stream, client) {
        Ok(d) => d,
        Err(e) => {
            tracing::warn!(%client, error = %e, "no original destination (connection not captured by iptables?)");
            rec.reason = CloseReason::NoOriginalDestination;
            return None;
        }
    };
    rec.set_dst(dst);
    if shared.is_loop(&stream, dst) {
        tracing::warn!(%client, %dst, "refusing a connection addressed to the proxy itself");
        stats.loops_refused.fetch_add(1, Ordering::Relaxed);
        rec.reason = CloseReason::Loop;
        return None;
    }
    // Hold the snapshot only while deciding: the connection keeps just the cluster it uses,
    // so a reload can drop the old snapshot without touching this connection.
    let snapshot = shared.snapshot.load_full();
    let (cluster, first) = match snapshot.route(dst, client) {
        Route::Refused => {
            stats.refused_registry_only.fetch_add(1, Ordering::Relaxed);
            rec.set_route(RouteName::Fixed("BlackHoleCluster"));
            rec.reason = CloseReason::RegistryOnly;
            return None;
        }
        Route::Passthrough => {
            drop(snapshot);
            stats.passthrough.fetch_add(1, Ordering::Relaxed);
            rec.set_route(RouteName::Fixed("PassthroughCluster"));
            // No service, as Istio labels it: one label set per external address would grow
            // without bound.
            rec.routed(Destination {
                service: None,
                cluster: ClusterRef::Fixed("PassthroughCluster"),
                endpoint: None,
            });
            rec.set_upstream(Upstream::Addr(dst.0));
            match connect(dst.0, PASSTHROUGH_CONNECT_TIMEOUT, None).await {
                Ok(upstream) => {
                    return Some(Connected::new(rec, stream, upstream, Limits::default()))
                }
                Err(e) => {
                    rec.connect_failed(&e);
                    return None;
                }
            }
        }
        // Decided in the routing table, endpoint included unless the cluster picks its own.
        Route::Fast(r) => {
            note_route(&rec, r.listener, r.rule());
            (r.cluster.clone(), r.endpoint.map(|p| p.index))
        }
        Route::Listener(listener) => {
            let sni = sni_for(listener, &stream, &rec).await;
            match listener.route(dst.0.ip(), sni.as_deref()) {
                Some((rule, cluster)) => {
                    note_route(&rec, listener, rule);
                    (cluster, None)
                }
                None => {
                    stats.no_route.fetch_add(1, Ordering::Relaxed);
                    rec.reason = CloseReason::NoRoute;
                    return None;
                }
            }
        }
    };
    drop(snapshot);
    to_cluster(rec, stream, cluster, dst, first).await
}
