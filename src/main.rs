//! The `veer` command line.

use std::io::IsTerminal;
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context};
use clap::{Parser, Subcommand, ValueEnum};
use tracing_subscriber::EnvFilter;

use veer::config::model::Labels;
use veer::routing::{OutboundTrafficPolicy, ProxyIdentity, ProxyMode, Snapshot};

#[derive(Parser)]
#[command(
    name = "veer",
    version,
    about = "A transparent L4 sidecar proxy that speaks Istio's TCP routing API"
)]
struct Cli {
    /// Log format.
    #[arg(long, global = true, value_enum, default_value_t = LogFormat::Text)]
    log_format: LogFormat,
    #[command(subcommand)]
    command: Command,
}

#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
enum InterceptionMode {
    Redirect,
    Tproxy,
}

#[derive(Clone, Copy, ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

#[derive(Subcommand)]
enum Command {
    /// Run the sidecar proxy: capture listeners, routing, admin endpoint.
    Proxy(ProxyArgs),
    /// Run the tcp-echo sample server: replies "PREFIX line" to every line.
    Echo {
        /// Address to listen on (default: all IPv4 and IPv6 addresses).
        #[arg(long)]
        bind: Option<IpAddr>,
        /// Comma-separated ports, e.g. 9000,9001.
        #[arg(value_delimiter = ',', required = true)]
        ports: Vec<u16>,
        /// Prefix of every reply line, e.g. `one`.
        prefix: String,
    },
    /// Print the gateway's Kubernetes Service with one port per Gateway server port, keeping
    /// an existing Service's nodePorts: no hand edit when a Gateway uses a new port.
    GatewayService {
        /// Files or directories with the Gateway resources. Repeatable.
        #[arg(long = "file", short = 'f', required = true, num_args = 1..)]
        files: Vec<PathBuf>,
        /// The Service as it is now (e.g. `kubectl get svc -o yaml`), to keep its nodePorts.
        #[arg(long)]
        service: Option<PathBuf>,
        #[arg(long, default_value = "istio-ingressgateway")]
        name: String,
        #[arg(long, default_value = "istio-system")]
        namespace: String,
        /// Only Gateways whose selector these labels satisfy, `k=v,...`.
        #[arg(long)]
        selector: Option<String>,
    },
    /// Show the trip a connection to IP:PORT would take: owning service, the rules considered
    /// and why each did or did not match, weighted destinations, subsets, endpoints.
    Explain {
        #[command(flatten)]
        source: SourceArgs,
        /// SNI of the connection, for TLS routes.
        #[arg(long)]
        sni: Option<String>,
        /// Print JSON instead of text.
        #[arg(long)]
        json: bool,
        /// The destination as the application dialled it (sidecar) or the gateway port.
        destination: SocketAddr,
    },
    /// Add the veer sidecar to Kubernetes manifests (like `istioctl kube-inject`).
    Inject(veer::inject::InjectArgs),
    /// Wait until this pod's proxy answers GET /ready (the postStart hook of held pods).
    Wait(veer::inject::WaitArgs),
    /// Check config files as the proxy loads them: errors exit 1 (with file:line, document,
    /// resource and field), warnings are printed and exit 0.
    Validate {
        /// Files, directories, or `-` for standard input.
        #[arg(required = true)]
        paths: Vec<String>,
    },
    /// Connect, send messages (or standard input), half-close, print the reply.
    Client {
        addr: SocketAddr,
        /// A line to send (repeatable). Without any, standard input is sent.
        #[arg(long = "message", short = 'm')]
        messages: Vec<String>,
        #[arg(long, default_value_t = 5000)]
        timeout_ms: u64,
    },
}

#[derive(clap::Args)]
/// Where config comes from and who this proxy is: shared by `proxy` and `explain`.
struct SourceArgs {
    /// Config files or directories (YAML: Istio VirtualService, DestinationRule, ServiceEntry,
    /// WorkloadEntry, Gateway; Kubernetes Service and Pod). Repeat for more: `-c a.yaml -c dir/`.
    #[arg(long, short = 'c', required = true, action = clap::ArgAction::Append)]
    config: Vec<PathBuf>,
    /// This pod's labels, `k=v,k2=v2` (matched against `sourceLabels`).
    #[arg(long, value_delimiter = ',')]
    pod_labels: Vec<String>,
    /// A downward-API labels file (`key="value"` per line), added to --pod-labels.
    #[arg(long)]
    pod_labels_file: Option<PathBuf>,
    /// This pod's namespace (matched against `sourceNamespace`; resolves short host names).
    #[arg(long, env = "POD_NAMESPACE", default_value = "default")]
    namespace: String,
    /// What to do with destinations no Service or ServiceEntry owns.
    #[arg(long, value_enum, default_value_t = OutboundTrafficPolicy::AllowAny)]
    outbound_traffic_policy: OutboundTrafficPolicy,
    /// `sidecar` (capture listeners) or `gateway` (listen on the server ports of the Gateways
    /// whose selector matches --gateway-selector; no capture).
    #[arg(long, value_enum, default_value_t = ProxyMode::Sidecar)]
    mode: ProxyMode,
    /// This gateway's workload labels, `k=v,...` (Gateway `selector`s are matched against them).
    #[arg(long, value_delimiter = ',', required_if_eq("mode", "gateway"))]
    gateway_selector: Vec<String>,
}

#[derive(clap::Args)]
struct ProxyArgs {
    #[command(flatten)]
    source: SourceArgs,
    /// Admin endpoint address.
    #[arg(long, default_value = "127.0.0.1:15000")]
    admin: SocketAddr,
    /// Also serve `GET /healthz/ready` (only that) here, e.g. `0.0.0.0:15021` as Istio's
    /// status port, so kubelet probes need no access to the admin endpoint.
    #[arg(long)]
    health_addr: Option<SocketAddr>,
    /// Also serve the Prometheus metrics (`GET /stats/prometheus`, only that) here, e.g.
    /// `0.0.0.0:15090` as Istio's sidecar does, for a Prometheus server to scrape the pod
    /// (`veer inject` sets it, with the `prometheus.io/*` annotations).
    #[arg(long)]
    metrics_addr: Option<SocketAddr>,
    /// How veer-init intercepts inbound traffic (`-m`): REDIRECT (NAT; the app sees
    /// 127.0.0.6) or TPROXY (the app sees the real client; needs CAP_NET_ADMIN).
    #[arg(long, value_enum, default_value_t = InterceptionMode::Redirect)]
    interception_mode: InterceptionMode,
    /// Mark of TPROXY'd connections (veer-init `-t`).
    #[arg(long, default_value_t = 1337)]
    tproxy_mark: u32,
    /// Port the outbound capture rule redirects to.
    #[arg(long, default_value_t = 15001)]
    outbound_port: u16,
    /// Port the inbound capture rule redirects to.
    #[arg(long, default_value_t = 15006)]
    inbound_port: u16,
    /// After one side closes its write half, close the pair if nothing moves for this long
    /// (`0s`: never). Below conntrack's 60 s CLOSE_WAIT timeout, after which the NAT entry of
    /// a captured connection is gone anyway.
    #[arg(long, default_value = "50s", value_parser = parse_duration)]
    half_close_timeout: Duration,
    /// Most connections open at once, process-wide; beyond it new connections wait in the
    /// accept backlog. Default: what the open-file limit can hold.
    #[arg(long)]
    max_connections: Option<u64>,
    /// Reload when the config files change (also on SIGHUP and `POST /reload`).
    #[arg(long, default_value_t = true, action = clap::ArgAction::Set)]
    watch: bool,
    /// How long a shutdown (SIGTERM, `/quitquitquit`) waits for open connections to finish
    /// after the listeners close, e.g. `5s` (Istio's default drain duration).
    #[arg(long, default_value = "5s", value_parser = parse_duration)]
    drain_timeout: Duration,
    /// Also log a line for every connection still open at this interval (e.g. `60s`), so
    /// long-lived connections show up before they close. `0s` (default): only at close.
    #[arg(long, default_value = "0s", value_parser = parse_duration)]
    access_log_interval: Duration,
    /// Also log a line when a connection is established upstream (Envoy's
    /// `flush_access_log_on_connected`). Default: one line per connection, at close.
    #[arg(long, env = "VEER_ACCESS_LOG_ON_CONNECT")]
    access_log_on_connect: bool,
    /// Worker threads (Istio's `concurrency`). 1: a single-threaded runtime, no cross-thread
    /// wake-ups. Default: VEER_CONCURRENCY, else 2 or the number of CPUs if fewer.
    #[arg(long, env = "VEER_CONCURRENCY")]
    concurrency: Option<usize>,
    /// Busy polling: after its last piece of work, the worker keeps checking for events this
    /// long (e.g. `50us`) before it sleeps, so a request arriving meanwhile skips the wake-up
    /// (lower round-trip latency for more CPU; the time spun is `busy_poll_seconds` in
    /// `/stats`). Needs one worker (implies `--concurrency 1`). `0s` (default): off.
    #[arg(long, env = "VEER_BUSY_POLL", default_value = "0s", value_parser = parse_duration)]
    busy_poll: Duration,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    // Held until main returns: dropping it writes out what the log thread still holds.
    let (log, _log_flush) = init_tracing(cli.log_format);
    match cli.command {
        Command::Proxy(args) => run_proxy(args, log),
        Command::Echo {
            bind,
            ports,
            prefix,
        } => {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("tokio runtime");
            match rt.block_on(veer::echo::run(bind, &ports, prefix)) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("veer echo: {e}");
                    ExitCode::FAILURE
                }
            }
        }
        Command::GatewayService {
            files,
            service,
            name,
            namespace,
            selector,
        } => {
            let result = selector
                .as_deref()
                .map(veer::gateway_service::parse_selector)
                .transpose()
                .and_then(|sel| {
                    veer::gateway_service::run(&files, service.as_deref(), &name, &namespace, sel)
                });
            match result {
                Ok(yaml) => {
                    print!("{yaml}");
                    ExitCode::SUCCESS
                }
                Err(e) => {
                    eprintln!("veer gateway-service: {e}");
                    ExitCode::from(2)
                }
            }
        }
        Command::Inject(args) => veer::inject::run(&args),
        Command::Wait(args) => veer::inject::wait::run(&args),
        Command::Validate { paths } => {
            let code = veer::config::run_validate(
                &paths,
                &mut std::io::stdout().lock(),
                &mut std::io::stderr().lock(),
            );
            ExitCode::from(u8::try_from(code).unwrap_or(1))
        }
        Command::Explain {
            source,
            sni,
            json,
            destination,
        } => {
            let snapshot = source_identity(&source)
                .map_err(|e| e.to_string())
                .and_then(|id| {
                    veer::config::load_paths(&source.config)
                        .and_then(|set| {
                            veer::routing::compile(set, id, source.outbound_traffic_policy, 1)
                        })
                        .map_err(|e| format!("invalid config:\n{e}"))
                });
            match snapshot {
                Ok(snap) => {
                    let e = snap.explain(destination, sni.as_deref());
                    if json {
                        println!("{}", serde_json::to_string_pretty(&e).unwrap_or_default());
                    } else {
                        print!("{e}");
                    }
                    ExitCode::SUCCESS
                }
                Err(e) => {
                    eprintln!("veer explain: {e}");
                    ExitCode::from(2)
                }
            }
        }
        Command::Client {
            addr,
            messages,
            timeout_ms,
        } => {
            match veer::client::run(
                addr,
                &messages,
                Duration::from_millis(timeout_ms),
                &mut std::io::stdout(),
            ) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("veer client: {e}");
                    ExitCode::FAILURE
                }
            }
        }
    }
}

type LogHandle = tracing_subscriber::reload::Handle<EnvFilter, tracing_subscriber::Registry>;

/// Lines the log channel holds before a logger waits for the writer thread. The channel
/// allocates and touches every slot up front: tracing-appender's default of 128 000 lines
/// was 4.5 MiB of the proxy's resident memory (peak RSS 7.4 → 11.9 MiB). 4 096 lines are
/// 0.4 s of access log at 10 000 connections/s (one line each), and the writer drains them
/// continuously.
const LOG_BUFFERED_LINES: usize = 4_096;

/// Logs go to stderr, filtered like `RUST_LOG` (default `info`); the filter can be replaced
/// at run time through the returned handle (`POST /logging`).
///
/// Lines are handed to a writer thread that writes them through a buffer, flushed whenever
/// it has caught up: the connection path pays a channel send per line instead of a write(2)
/// (the access log then wrote two lines per connection, ~25 µs of proxy CPU per connection
/// with direct writes; now one by default). Nothing is dropped: a full channel makes the
/// logger wait.
fn init_tracing(format: LogFormat) -> (LogHandle, tracing_appender::non_blocking::WorkerGuard) {
    use tracing_subscriber::layer::SubscriberExt;
    use tracing_subscriber::util::SubscriberInitExt;
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let (filter, handle) = tracing_subscriber::reload::Layer::new(filter);
    let ansi = std::io::stderr().is_terminal();
    let (writer, guard) = tracing_appender::non_blocking::NonBlockingBuilder::default()
        .lossy(false)
        .buffered_lines_limit(LOG_BUFFERED_LINES)
        .thread_name("veer-log")
        .finish(std::io::BufWriter::new(std::io::stderr()));
    let (text, json) = match format {
        LogFormat::Text => (
            Some(
                tracing_subscriber::fmt::layer()
                    .with_ansi(ansi)
                    .with_writer(writer),
            ),
            None,
        ),
        LogFormat::Json => (
            None,
            Some(tracing_subscriber::fmt::layer().json().with_writer(writer)),
        ),
    };
    tracing_subscriber::registry()
        .with(filter)
        .with(text)
        .with(json)
        .init();
    (handle, guard)
}

/// Exit codes: 2 for bad config or arguments (the user must fix something), 1 for anything
/// else that stops the proxy from starting.
fn run_proxy(args: ProxyArgs, log: LogHandle) -> ExitCode {
    // Capture listeners first, before config is read: an application that starts before the
    // proxy is ready waits in the accept backlog instead of being refused.
    let capture = if args.source.mode == ProxyMode::Sidecar {
        match veer::proxy::bind_capture(
            args.outbound_port,
            args.inbound_port,
            args.interception_mode == InterceptionMode::Tproxy,
        ) {
            Ok(l) => l,
            Err(e) => {
                eprintln!("veer proxy: {e}");
                return ExitCode::FAILURE;
            }
        }
    } else {
        Vec::new()
    };
    let identity = match identity(&args) {
        Ok(i) => i,
        Err(e) => {
            eprintln!("veer proxy: {e:#}");
            return ExitCode::from(2);
        }
    };
    let snapshot = match load_snapshot(&args, identity, 1) {
        Ok(s) => s,
        Err(errors) => {
            eprintln!(
                "veer proxy: invalid config ({} problem{}):",
                errors.0.len(),
                if errors.0.len() == 1 { "" } else { "s" }
            );
            for e in &errors.0 {
                eprintln!("  {e}");
            }
            return ExitCode::from(2);
        }
    };
    for w in &snapshot.warnings {
        tracing::warn!("config: {w}");
    }
    // Least privilege: keep CAP_NET_BIND_SERVICE only for a gateway serving a port below 1024.
    let low_port = snapshot.gateway_ports.keys().any(|p| *p < 1024);
    // TPROXY keeps CAP_NET_ADMIN: the inbound forwarder binds the client's address
    // (IP_TRANSPARENT) and marks its socket, as Envoy does in Istio's TPROXY mode.
    let mut keep = Vec::new();
    if low_port {
        keep.push(caps::Capability::CAP_NET_BIND_SERVICE);
    }
    if args.interception_mode == InterceptionMode::Tproxy {
        keep.push(caps::Capability::CAP_NET_ADMIN);
    }
    if let Err(e) = veer::sys::drop_capabilities(&keep) {
        tracing::warn!(error = %e, "could not drop capabilities");
    }
    let nofile = match veer::sys::raise_nofile_limit() {
        Ok(n) => {
            tracing::debug!(limit = n, "open-file limit");
            Some(n)
        }
        Err(e) => {
            tracing::warn!(error = %e, "could not raise the open-file limit");
            None
        }
    };
    veer::proxy::relay::set_half_close_timeout(
        (!args.half_close_timeout.is_zero()).then_some(args.half_close_timeout),
    );
    // Two workers: a sidecar shares its pod's CPU with the application; more threads than
    // cores only adds cross-thread wakeups. Busy polling runs on one.
    let busy_poll = (!args.busy_poll.is_zero()).then_some(args.busy_poll);
    let workers = match args.concurrency.filter(|n| *n > 0) {
        Some(n) => n,
        None if busy_poll.is_some() => 1,
        None => std::thread::available_parallelism().map_or(1, |n| n.get().min(2)),
    };
    let rt = match veer::runtime::build(workers, busy_poll) {
        Ok((rt, state)) => {
            match state {
                veer::runtime::BusyPoll::Off => {}
                veer::runtime::BusyPoll::On { .. } => {
                    tracing::info!(budget = ?args.busy_poll, "busy polling")
                }
                veer::runtime::BusyPoll::Unavailable(why) => {
                    tracing::warn!(%why, "busy polling unavailable; the worker sleeps between events")
                }
            }
            rt
        }
        Err(e) => {
            eprintln!("veer proxy: cannot start the runtime (--concurrency, --busy-poll): {e}");
            return ExitCode::FAILURE;
        }
    };
    // Default connection limit: what the open-file limit can hold (two descriptors per
    // proxied connection, plus headroom for pipes, the admin server and config files).
    let max_connections = args
        .max_connections
        .or_else(|| nofile.map(|n| (n - (n / 4).min(256)) / 2))
        .filter(|n| *n > 0);
    match rt.block_on(serve(args, snapshot, log, capture, max_connections)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("veer proxy: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn load_snapshot(
    args: &ProxyArgs,
    identity: ProxyIdentity,
    version: u64,
) -> Result<Snapshot, veer::config::ConfigErrors> {
    let set = veer::config::load_paths(&args.source.config)?;
    veer::routing::compile(set, identity, args.source.outbound_traffic_policy, version)
}

fn parse_duration(s: &str) -> Result<Duration, String> {
    veer::config::model::IstioDuration::parse(s).map(|d| d.0)
}

async fn serve(
    args: ProxyArgs,
    snapshot: Snapshot,
    log: LogHandle,
    capture: Vec<(std::net::TcpListener, bool)>,
    max_connections: Option<u64>,
) -> anyhow::Result<()> {
    let identity = snapshot.identity.clone();
    let label = |k: &str| {
        identity
            .labels
            .get(k)
            .cloned()
            .unwrap_or_else(|| "unknown".into())
    };
    let mut recorder = veer::proxy::record::Recorder::new(
        identity.namespace.clone(),
        label("app"),
        label("version"),
    );
    recorder.log_on_connect = args.access_log_on_connect;
    let mut shared =
        veer::proxy::Shared::new(snapshot, recorder, args.outbound_port, args.inbound_port);
    shared.set_log_filter = Box::new(move |f| {
        let filter = EnvFilter::try_new(f).map_err(|e| e.to_string())?;
        log.reload(filter).map_err(|e| e.to_string())
    });
    shared.tproxy =
        (args.interception_mode == InterceptionMode::Tproxy).then_some(args.tproxy_mark);
    shared.connection_limit = max_connections.map(|n| {
        Arc::new(tokio::sync::Semaphore::new(
            usize::try_from(n)
                .unwrap_or(usize::MAX)
                .min(tokio::sync::Semaphore::MAX_PERMITS),
        ))
    });
    let shared = Arc::new(shared);
    let mut gateway = veer::proxy::gateway::GatewayListeners::default();
    match args.source.mode {
        ProxyMode::Sidecar => veer::proxy::spawn_listeners(&shared, capture)?,
        ProxyMode::Gateway => gateway.reconcile(&shared),
    }
    let admin = veer::proxy::listen::bind(args.admin)
        .with_context(|| format!("cannot bind the admin endpoint {}", args.admin))?;
    if !args.admin.ip().is_loopback() {
        tracing::warn!(admin = %args.admin, "admin endpoint bound beyond loopback (read-only views are reachable from the network; mutating endpoints still answer loopback only)");
    }
    tokio::spawn(veer::admin::serve(admin, shared.clone()));
    if let Some(addr) = args.health_addr {
        let health = veer::proxy::listen::bind(addr)
            .with_context(|| format!("cannot bind the health endpoint {addr}"))?;
        tokio::spawn(veer::admin::serve_health(health, shared.clone()));
    }
    if let Some(addr) = args.metrics_addr {
        let metrics = veer::proxy::listen::bind(addr)
            .with_context(|| format!("cannot bind the metrics endpoint {addr}"))?;
        tokio::spawn(veer::admin::serve_metrics(metrics, shared.clone()));
    }

    // Reloads: one task, fed by SIGHUP, POST /reload and the file watcher.
    let (reload_tx, reload_rx) = tokio::sync::mpsc::unbounded_channel();
    let _ = shared.reload.set(reload_tx.clone());
    let source = veer::reload::ConfigSource {
        paths: args.source.config.clone(),
        identity: identity.clone(),
        policy: args.source.outbound_traffic_policy,
    };
    let _watcher = if args.watch {
        match veer::reload::watch(&args.source.config, reload_tx.clone()) {
            Ok(w) => Some(w),
            Err(e) => {
                tracing::warn!(error = %e, "cannot watch config files; reload with SIGHUP or POST /reload");
                None
            }
        }
    } else {
        None
    };
    let mode = args.source.mode;
    tokio::spawn(veer::reload::run(
        shared.clone(),
        source,
        reload_rx,
        move |shared| {
            if mode == ProxyMode::Gateway {
                gateway.reconcile(shared);
            }
        },
    ));

    if !args.access_log_interval.is_zero() {
        let (shared, every) = (shared.clone(), args.access_log_interval);
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(every);
            tick.tick().await;
            loop {
                tick.tick().await;
                for c in shared.recorder.table.list() {
                    c.log_progress();
                }
            }
        });
    }
    shared.ready.store(true, Ordering::Release);
    tracing::info!(
        mode = ?args.source.mode,
        outbound = args.outbound_port,
        inbound = args.inbound_port,
        admin = %args.admin,
        "veer proxy ready"
    );
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate())?;
    let mut hup = signal(SignalKind::hangup())?;
    loop {
        tokio::select! {
            _ = tokio::signal::ctrl_c() => break,
            _ = term.recv() => break,
            _ = shared.quit.notified() => break,
            _ = hup.recv() => {
                let _ = reload_tx.send(veer::reload::Trigger::Signal);
            }
        }
    }
    // Drain: stop accepting, let open connections finish up to the deadline, then exit.
    shared.draining.send_replace(true);
    let deadline = tokio::time::Instant::now() + args.drain_timeout;
    let table = &shared.recorder.table;
    tracing::info!(open = table.len(), timeout = ?args.drain_timeout, "draining before exit");
    while !table.is_empty() && tokio::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    if !table.is_empty() {
        tracing::warn!(
            open = table.len(),
            "drain deadline passed; closing the remaining connections"
        );
        for c in table.list() {
            c.drained.store(true, Ordering::Relaxed);
        }
    }
    tracing::info!("exiting");
    Ok(())
}

fn identity(args: &ProxyArgs) -> anyhow::Result<ProxyIdentity> {
    source_identity(&args.source)
}

fn source_identity(source: &SourceArgs) -> anyhow::Result<ProxyIdentity> {
    let args = source;
    let mut labels = Labels::new();
    if let Some(path) = &args.pod_labels_file {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("reading --pod-labels-file {}", path.display()))?;
        labels.extend(
            parse_labels_file(&text)
                .with_context(|| format!("in --pod-labels-file {}", path.display()))?,
        );
    }
    for kv in args.pod_labels.iter().filter(|s| !s.is_empty()) {
        let Some((k, v)) = kv.split_once('=') else {
            bail!("--pod-labels: {kv:?} is not key=value")
        };
        labels.insert(k.trim().to_string(), v.trim().to_string());
    }
    if args.mode == ProxyMode::Gateway {
        for kv in args.gateway_selector.iter().filter(|s| !s.is_empty()) {
            let Some((k, v)) = kv.split_once('=') else {
                bail!("--gateway-selector: {kv:?} is not key=value")
            };
            labels.insert(k.trim().to_string(), v.trim().to_string());
        }
    }
    Ok(ProxyIdentity {
        namespace: args.namespace.clone(),
        labels,
        mode: args.mode,
    })
}

/// The Kubernetes downward-API labels file: one `key="value"` per line, value Go-quoted.
fn parse_labels_file(text: &str) -> anyhow::Result<Labels> {
    let mut labels = Labels::new();
    for (n, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() {
            continue;
        }
        let Some((k, v)) = line.split_once('=') else {
            bail!("line {}: {line:?} is not key=\"value\"", n + 1)
        };
        let v = v.trim();
        let v = match v.strip_prefix('"').and_then(|v| v.strip_suffix('"')) {
            Some(inner) => inner.replace("\\\"", "\"").replace("\\\\", "\\"),
            None => v.to_string(),
        };
        labels.insert(k.trim().to_string(), v);
    }
    Ok(labels)
}

#[cfg(test)]
mod tests {
    #[test]
    fn downward_api_labels_file() {
        let l = super::parse_labels_file("app=\"sleep\"\nversion=\"v1\"\n\nquote=\"a\\\"b\"\n")
            .unwrap();
        assert_eq!(l["app"], "sleep");
        assert_eq!(l["version"], "v1");
        assert_eq!(l["quote"], "a\"b");
        assert!(super::parse_labels_file("nonsense").is_err());
    }
}
