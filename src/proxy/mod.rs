//! The data path: listen → original destination → route → connect → relay → record.

pub mod connect;
pub mod forward;
pub mod gateway;
pub mod inbound;
pub mod listen;
pub mod metrics;
pub mod orig_dst;
pub mod outbound;
pub mod record;
pub mod relay;
pub mod tls;

use std::net::IpAddr;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;

use arc_swap::ArcSwap;
use tokio::net::TcpStream;

use crate::addr::OrigDst;
use crate::routing::Snapshot;
use orig_dst::OrigDstLookup;
use record::Recorder;

/// Source address of the inbound forwarder (as Istio): the capture rules return traffic from
/// it on `lo`, so connections the proxy makes to the local app are not captured again.
pub const INBOUND_SOURCE_V4: IpAddr = IpAddr::V4(std::net::Ipv4Addr::new(127, 0, 0, 6));
pub const INBOUND_SOURCE_V6: IpAddr = IpAddr::V6(std::net::Ipv6Addr::new(0, 0, 0, 0, 0, 0, 0, 6));

/// Replaces the process's log filter; `Err` says why a filter was rejected.
pub type LogFilterSetter = Box<dyn Fn(&str) -> Result<(), String> + Send + Sync>;

/// State shared by every connection task and the admin server.
pub struct Shared {
    /// The routing snapshot in effect; swapped whole on reload, read lock-free per connection.
    pub snapshot: ArcSwap<Snapshot>,
    /// Counters, metrics and the live connection table.
    pub recorder: Arc<Recorder>,
    pub orig_dst: Box<dyn OrigDstLookup>,
    pub outbound_port: u16,
    pub inbound_port: u16,
    /// Set once the capture listeners are bound and config is loaded.
    pub ready: AtomicBool,
    /// Set to `true` to stop accepting (drain); accept loops watch it.
    pub draining: tokio::sync::watch::Sender<bool>,
    /// Why the last reload was rejected, if it was (the previous config stays in effect).
    pub last_reload_error: std::sync::Mutex<Option<crate::reload::ReloadError>>,
    /// Where `POST /reload` sends its request; `None` until the reload task runs.
    pub reload: std::sync::OnceLock<tokio::sync::mpsc::UnboundedSender<crate::reload::Trigger>>,
    /// Addresses actually listened on, for `/listeners`.
    pub listening: std::sync::Mutex<Vec<String>>,
    /// Signalled by `/quitquitquit`: drain, then exit.
    pub quit: tokio::sync::Notify,
    /// Replaces the log filter (`/logging`); returns why a filter was rejected.
    pub set_log_filter: LogFilterSetter,
    /// TPROXY inbound interception: the forwarder connects to the app from the client's own
    /// address (transparent socket, this mark: `--tproxy-mark`, Istio's 1337) instead of 127.0.0.6.
    pub tproxy: Option<u32>,
    /// Process-wide connection limit (`--max-connections`); `None`: unlimited.
    pub connection_limit: Option<Arc<tokio::sync::Semaphore>>,
}

impl Shared {
    /// A proxy with `snapshot`, not yet ready, not draining, with the kernel's
    /// original-destination lookup and a log filter that cannot be changed.
    pub fn new(
        snapshot: Snapshot,
        recorder: Recorder,
        outbound_port: u16,
        inbound_port: u16,
    ) -> Self {
        Shared {
            snapshot: ArcSwap::from_pointee(snapshot),
            recorder: Arc::new(recorder),
            orig_dst: Box::new(orig_dst::Kernel),
            outbound_port,
            inbound_port,
            ready: AtomicBool::new(false),
            draining: tokio::sync::watch::channel(false).0,
            last_reload_error: Default::default(),
            reload: Default::default(),
            listening: Default::default(),
            quit: Default::default(),
            set_log_filter: Box::new(|_| {
                Err("the log filter cannot be changed in this process".into())
            }),
            connection_limit: None,
            tproxy: None,
        }
    }

    /// The connection limit with the counter of times it paused accepting.
    pub fn limit(
        &self,
    ) -> Option<(
        Arc<tokio::sync::Semaphore>,
        prometheus_client::metrics::counter::Counter,
    )> {
        self.connection_limit
            .clone()
            .map(|s| (s, self.recorder.metrics.accept_paused.clone()))
    }

    /// Why the proxy is not ready, or `None` when it is.
    pub fn not_ready(&self) -> Option<&'static str> {
        if *self.draining.borrow() {
            Some("draining")
        } else if !self.ready.load(std::sync::atomic::Ordering::Acquire) {
            Some("listeners not bound or config not loaded yet")
        } else {
            None
        }
    }

    /// Whether `dst` is one of the proxy's own listeners: either the connection was not
    /// redirected at all (its original destination is the socket's own address) or it names
    /// a capture port. Relaying it would connect the proxy to itself forever.
    pub fn is_loop(&self, stream: &TcpStream, dst: OrigDst) -> bool {
        // A connection that was not redirected reports the listener's own address (or, for
        // a direct dial of a capture port, that port); relaying it would connect the proxy
        // to itself forever.
        // The local address (a syscall) is asked only for a capture port.
        (dst.0.port() == self.outbound_port || dst.0.port() == self.inbound_port)
            && (dst.0.ip().is_loopback()
                || dst.0.ip().is_unspecified()
                || stream.local_addr().ok().map(|l| l.ip()) == Some(dst.0.ip()))
    }
}

/// Binds the capture listeners (outbound, inbound) without a runtime, so it can happen
/// before anything else: an application that starts first waits in the backlog instead of
/// being refused. Returns `(listener, inbound?)` pairs. With `tproxy`, the inbound listeners
/// are transparent (TPROXY interception).
pub fn bind_capture(
    outbound_port: u16,
    inbound_port: u16,
    tproxy: bool,
) -> std::io::Result<Vec<(std::net::TcpListener, bool)>> {
    let mut out = Vec::new();
    for (port, inbound) in [(outbound_port, false), (inbound_port, true)] {
        let listeners = listen::bind_dual_std_with(port, inbound && tproxy).map_err(|e| {
            std::io::Error::new(e.kind(), format!("cannot listen on port {port}: {e}"))
        })?;
        out.extend(listeners.into_iter().map(|l| (l, inbound)));
    }
    Ok(out)
}

/// Serves already-bound capture listeners until drained.
pub fn spawn_listeners(
    shared: &Arc<Shared>,
    bound: Vec<(std::net::TcpListener, bool)>,
) -> std::io::Result<()> {
    for (l, inbound) in bound {
        let l = tokio::net::TcpListener::from_std(l)?;
        if let Ok(a) = l.local_addr() {
            let what = if inbound { "inbound" } else { "outbound" };
            shared
                .listening
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .push(format!("{a} ({what})"));
        }
        let s = shared.clone();
        tokio::spawn(listen::accept_loop(
            l,
            shared.draining.subscribe(),
            shared.limit(),
            move |stream, client, permit| {
                let shared = s.clone();
                if inbound {
                    forward::spawn(inbound::handle(shared, stream, client), permit);
                } else {
                    forward::spawn(outbound::handle(shared, stream, client), permit);
                }
            },
        ));
    }
    Ok(())
}
