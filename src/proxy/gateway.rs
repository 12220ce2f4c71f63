//! Gateway mode: no capture; listeners on the server ports of the Gateways this proxy serves,
//! derived from config so they follow it on reload.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Arc;

use tokio::net::TcpStream;
use tokio::task::AbortHandle;

use super::forward::{self, note_route, sni_for, to_cluster, Connected};
use super::listen;
use super::record::{CloseReason, ConnRecord, Direction};
use super::Shared;
use crate::addr::{ClientAddr, OrigDst};

/// The gateway's open listening sockets, by port.
#[derive(Default)]
pub struct GatewayListeners {
    open: BTreeMap<u16, Vec<AbortHandle>>,
}

impl GatewayListeners {
    /// Opens listeners for ports the current snapshot has and this set does not, and closes
    /// the ones it no longer has. Only listening sockets change: connections already
    /// accepted run in their own tasks and are not touched. A port that cannot be bound is
    /// reported and skipped; the others keep serving.
    pub fn reconcile(&mut self, shared: &Arc<Shared>) {
        let wanted: Vec<u16> = shared
            .snapshot
            .load()
            .gateway_ports
            .keys()
            .copied()
            .collect();
        self.open.retain(|port, handles| {
            let keep = wanted.contains(port);
            if !keep {
                tracing::info!(
                    port,
                    "gateway server removed from config: closing its listener"
                );
                handles.iter().for_each(AbortHandle::abort);
                let suffix = format!(":{port} (gateway)");
                shared
                    .listening
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .retain(|l| !l.ends_with(&suffix));
            }
            keep
        });
        for port in wanted {
            if self.open.contains_key(&port) {
                continue;
            }
            match listen::bind_dual(port) {
                Ok(listeners) => {
                    tracing::info!(port, "gateway listening");
                    let mut listening = shared.listening.lock().unwrap_or_else(|e| e.into_inner());
                    listening.retain(|l| !l.ends_with(&format!(":{port} (gateway)")));
                    listening.extend(
                        listeners
                            .iter()
                            .filter_map(|l| l.local_addr().ok())
                            .map(|a| format!("{a} (gateway)")),
                    );
                    drop(listening);
                    let handles = listeners
                        .into_iter()
                        .map(|l| {
                            let shared = shared.clone();
                            tokio::spawn(listen::accept_loop(
                                l,
                                shared.draining.subscribe(),
                                shared.limit(),
                                move |stream, client, permit| {
                                    let shared = shared.clone();
                                    forward::spawn(handle(shared, stream, client), permit);
                                },
                            ))
                            .abort_handle()
                        })
                        .collect();
                    self.open.insert(port, handles);
                }
                Err(e) => {
                    let why = if e.kind() == std::io::ErrorKind::PermissionDenied && port < 1024 {
                        " (ports below 1024 need CAP_NET_BIND_SERVICE: add it to the container's securityContext capabilities and give the binary the file capability (setcap cap_net_bind_service=+ep), or set the pod sysctl net.ipv4.ip_unprivileged_port_start to the lowest port)"
                    } else {
                        ""
                    };
                    tracing::error!(port, error = %e, "cannot listen on gateway port {port}{why}; other ports keep serving");
                }
            }
        }
    }

    pub fn ports(&self) -> Vec<u16> {
        self.open.keys().copied().collect()
    }
}

pub async fn handle(
    shared: Arc<Shared>,
    stream: TcpStream,
    client: ClientAddr,
) -> Option<Connected> {
    // TCP_NODELAY: inherited from the listener (listen::bind_std_with).
    let mut rec = ConnRecord::open(shared.recorder.clone(), Direction::Gateway, client);
    let local = match stream.local_addr() {
        Ok(a) => a,
        Err(_) => return None,
    };
    // At a gateway the "destination" is the gateway's own address and server port.
    let dst = OrigDst(SocketAddr::new(local.ip().to_canonical(), local.port()));
    rec.set_dst(dst);
    let snapshot = shared.snapshot.load_full();
    let Some(listener) = snapshot.gateway_ports.get(&local.port()) else {
        rec.reason = CloseReason::NoRoute;
        return None;
    };
    let sni = sni_for(listener, &stream, &rec).await;
    let Some((rule, cluster)) = listener.route(dst.0.ip(), sni.as_deref()) else {
        tracing::debug!(%client, port = local.port(), "no route at the gateway");
        shared
            .recorder
            .stats
            .no_route
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        rec.reason = CloseReason::NoRoute;
        return None;
    };
    note_route(&rec, listener, rule);
    drop(snapshot);
    to_cluster(rec, stream, cluster, dst, None).await
}
