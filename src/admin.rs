//! The admin endpoint (default 127.0.0.1:15000): what the proxy believes and does.
//!
//! Read-only views answer GET; endpoints that change the proxy (`/logging`,
//! `/drain_listeners`, `/quitquitquit`) take POST only and only from loopback clients, so an
//! admin port exposed for probes cannot be used to stop the proxy.

use std::collections::HashMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;

use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use serde_json::json;
use tokio::net::TcpListener;

use crate::proxy::Shared;

type Body = Full<Bytes>;

const INDEX: &str = "veer admin endpoints\n\
GET  /                     this index\n\
GET  /ready, /healthz/ready 200 once listeners are bound and config is loaded, else 503 with the reason\n\
GET  /live                 200 while the process runs\n\
GET  /config_dump          resources loaded (with source file), compiled listeners, routes and clusters,\n\
                           identity, config version and load time, last reload error (JSON)\n\
GET  /listeners            what is listened on and which service addresses are routed (JSON)\n\
GET  /routes               per rule: configured weights and connections each destination got (JSON)\n\
GET  /clusters             clusters with endpoints, active and total connections per endpoint (JSON)\n\
GET  /connections          live connection table: client, original destination, route, subset,\n\
                           upstream, bytes each way, age, state (JSON)\n\
GET  /explain?dst=IP:PORT  the trip a connection there would take and why (&sni=, &format=text)\n\
GET  /stats                counters (text; ?format=json for JSON)\n\
GET  /stats/prometheus     Prometheus metrics (also /metrics), Istio's TCP metric names\n\
POST /logging?level=L      change the log filter at run time (e.g. debug, or veer::access=debug,info)\n\
POST /drain_listeners      stop accepting; open connections keep running\n\
POST /reload               reload the config now (also on file change and SIGHUP); 400 with the errors\n\
                           if the new config is invalid (the previous one stays in effect)\n\
POST /quitquitquit         drain, wait for connections up to the drain timeout, exit 0\n";

/// Serves the admin API on an already-bound listener until the process ends.
pub async fn serve(listener: TcpListener, shared: Arc<Shared>) {
    serve_with(listener, shared, Scope::Admin).await
}

/// Serves only the readiness check (`/healthz/ready`, `/ready`): the status port that probes
/// reach on the pod IP, exposing nothing else.
pub async fn serve_health(listener: TcpListener, shared: Arc<Shared>) {
    serve_with(listener, shared, Scope::Health).await
}

/// Serves only the Prometheus metrics (`/stats/prometheus`, `/metrics`): the port a
/// Prometheus server scrapes on the pod IP (Istio's sidecar: 15090), exposing nothing else.
pub async fn serve_metrics(listener: TcpListener, shared: Arc<Shared>) {
    serve_with(listener, shared, Scope::Metrics).await
}

/// What one listener of the admin server answers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Scope {
    /// Everything (the admin endpoint).
    Admin,
    Health,
    Metrics,
}

impl Scope {
    /// `None` when `path` is served here; else the 404 body saying what is.
    fn refuses(self, path: &str) -> Option<&'static str> {
        match self {
            Scope::Admin => None,
            Scope::Health if matches!(path, "/healthz/ready" | "/ready") => None,
            Scope::Health => Some("only /healthz/ready is served here\n"),
            Scope::Metrics if matches!(path, "/stats/prometheus" | "/metrics") => None,
            Scope::Metrics => Some("only /stats/prometheus is served here\n"),
        }
    }
}

async fn serve_with(listener: TcpListener, shared: Arc<Shared>, scope: Scope) {
    loop {
        let (stream, peer) = match listener.accept().await {
            Ok(x) => x,
            Err(e) => {
                tracing::warn!(error = %e, "admin accept failed");
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                continue;
            }
        };
        let shared = shared.clone();
        tokio::spawn(async move {
            let svc = hyper::service::service_fn(move |req| {
                let shared = shared.clone();
                async move {
                    if let Some(only) = scope.refuses(req.uri().path()) {
                        return Ok::<_, Infallible>(text(StatusCode::NOT_FOUND, only.into()));
                    }
                    Ok::<_, Infallible>(handle(&req, &shared, peer).await)
                }
            });
            if let Err(e) = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(stream), svc)
                .await
            {
                tracing::debug!(error = %e, "admin connection ended with an error");
            }
        });
    }
}

fn query(req: &Request<Incoming>) -> HashMap<String, String> {
    req.uri()
        .query()
        .unwrap_or("")
        .split('&')
        .filter(|kv| !kv.is_empty())
        .map(|kv| {
            let (k, v) = kv.split_once('=').unwrap_or((kv, ""));
            (percent_decode(k), percent_decode(v))
        })
        .collect()
}

fn percent_decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        match b[i] {
            b'%' if i + 2 < b.len() => {
                match u8::from_str_radix(std::str::from_utf8(&b[i + 1..i + 3]).unwrap_or("zz"), 16)
                {
                    Ok(v) => {
                        out.push(v);
                        i += 3;
                        continue;
                    }
                    Err(_) => out.push(b'%'),
                }
            }
            b'+' => out.push(b' '),
            c => out.push(c),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Whether a client may change the proxy: a loopback peer that is not the inbound
/// forwarder. Connections from 127.0.0.6 / ::6 are remote clients relayed by the proxy's own
/// inbound capture, so they must not count as local (otherwise any pod could stop the proxy
/// whenever the admin listens beyond loopback).
fn is_local_client(peer: SocketAddr) -> bool {
    let ip = peer.ip().to_canonical();
    ip.is_loopback()
        && ip != crate::proxy::INBOUND_SOURCE_V4
        && ip != crate::proxy::INBOUND_SOURCE_V6
}

const MUTATING: [&str; 4] = ["/logging", "/drain_listeners", "/quitquitquit", "/reload"];

async fn handle(req: &Request<Incoming>, shared: &Shared, peer: SocketAddr) -> Response<Body> {
    let path = req.uri().path();
    if MUTATING.contains(&path) {
        if req.method() != Method::POST {
            return text(
                StatusCode::METHOD_NOT_ALLOWED,
                format!("{path} changes the proxy: use POST\n"),
            );
        }
        if !is_local_client(peer) {
            return text(
                StatusCode::FORBIDDEN,
                format!("{path} only answers loopback clients\n"),
            );
        }
        return mutate(path, req, shared).await;
    }
    if req.method() != Method::GET && req.method() != Method::HEAD {
        return text(
            StatusCode::METHOD_NOT_ALLOWED,
            "only GET is supported here\n".into(),
        );
    }
    let snap = shared.snapshot.load();
    let rec = &shared.recorder;
    match path {
        "/" => text(StatusCode::OK, INDEX.into()),
        "/live" => text(StatusCode::OK, "LIVE\n".into()),
        "/ready" | "/healthz/ready" => match shared.not_ready() {
            None => text(StatusCode::OK, "LIVE\n".into()),
            Some(why) => text(
                StatusCode::SERVICE_UNAVAILABLE,
                format!("not ready: {why}\n"),
            ),
        },
        "/config_dump" => {
            let mut v = serde_json::to_value(&**snap).unwrap_or_default();
            v["files"] = json!(snap.config.files);
            v["resources"] = json!(snap.config.resources);
            v["last_reload_error"] = json!(*shared
                .last_reload_error
                .lock()
                .unwrap_or_else(|e| e.into_inner()));
            json_response(&v)
        }
        "/listeners" => {
            let services: serde_json::Map<String, serde_json::Value> = snap
                .listeners
                .iter()
                .map(|(addr, l)| (addr.to_string(), json!({"host": l.host, "port": l.port, "tls": l.tls, "rules": l.rules.len()})))
                .collect();
            json_response(&json!({
                "mode": snap.identity.mode,
                "listening": shared.listening.lock().unwrap_or_else(|e| e.into_inner()).clone(),
                "draining": *shared.draining.borrow(),
                "service_addresses": services,
                "gateway_ports": snap.gateway_ports.iter().map(|(p, l)| (p.to_string(), json!({"gateways": l.host, "tls": l.tls, "rules": l.rules.len()}))).collect::<serde_json::Map<_, _>>(),
            }))
        }
        "/routes" => {
            let v = serde_json::to_value(&**snap).unwrap_or_default();
            json_response(
                &json!({"listeners": v["listeners"], "gateway_ports": v["gateway_ports"]}),
            )
        }
        "/explain" => {
            let q = query(req);
            match q.get("dst").and_then(|d| d.parse::<SocketAddr>().ok()) {
                Some(dst) => {
                    let e = snap.explain(dst, q.get("sni").map(String::as_str));
                    if q.get("format").map(String::as_str) == Some("text") {
                        text(StatusCode::OK, e.to_string())
                    } else {
                        json_response(&serde_json::to_value(&e).unwrap_or_default())
                    }
                }
                None => text(
                    StatusCode::BAD_REQUEST,
                    "give ?dst=IP:PORT (and optionally &sni=NAME, &format=text)\n".into(),
                ),
            }
        }
        "/clusters" => json_response(
            &serde_json::to_value(crate::routing::snapshot::sorted_clusters(&snap.clusters))
                .unwrap_or_default(),
        ),
        "/connections" => {
            let rows: Vec<_> = rec.table.list().iter().map(|c| c.describe()).collect();
            json_response(&json!({"count": rows.len(), "connections": rows}))
        }
        "/stats" => {
            let mut v = serde_json::to_value(&rec.stats).unwrap_or_default();
            if let Some(map) = v.as_object_mut() {
                map.insert(
                    "busy_poll_seconds".into(),
                    json!(crate::runtime::busy_poll_seconds()),
                );
            }
            if query(req).get("format").map(String::as_str) == Some("json") {
                json_response(&v)
            } else {
                let mut out = String::new();
                if let Some(map) = v.as_object() {
                    for (k, v) in map {
                        out.push_str(&format!("veer.{k}: {v}\n"));
                    }
                }
                out.push_str(&format!("veer.config_version: {}\n", snap.version));
                text(StatusCode::OK, out)
            }
        }
        "/stats/prometheus" | "/metrics" => Response::builder()
            .status(StatusCode::OK)
            .header(
                "content-type",
                "application/openmetrics-text; version=1.0.0; charset=utf-8",
            )
            .body(Full::new(Bytes::from(rec.metrics.encode())))
            .expect("static response parts are valid"),
        _ => text(
            StatusCode::NOT_FOUND,
            format!("no such endpoint {path}\n\n{INDEX}"),
        ),
    }
}

async fn mutate(path: &str, req: &Request<Incoming>, shared: &Shared) -> Response<Body> {
    match path {
        "/logging" => {
            let q = query(req);
            let Some(level) = q.get("level").filter(|l| !l.is_empty()) else {
                return text(
                    StatusCode::BAD_REQUEST,
                    "give ?level=FILTER, e.g. ?level=debug or ?level=veer::access=debug,info\n"
                        .into(),
                );
            };
            match (shared.set_log_filter)(level) {
                Ok(()) => {
                    tracing::info!(filter = %level, "log filter changed via admin");
                    text(StatusCode::OK, format!("log filter is now {level}\n"))
                }
                Err(e) => text(
                    StatusCode::BAD_REQUEST,
                    format!("invalid filter {level:?}: {e}\n"),
                ),
            }
        }
        "/drain_listeners" => {
            shared.draining.send_replace(true);
            text(
                StatusCode::OK,
                format!(
                    "draining: listeners closed, {} connections still open\n",
                    shared.recorder.table.len()
                ),
            )
        }
        "/reload" => {
            let Some(tx) = shared.reload.get() else {
                return text(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "reloading is not running yet\n".into(),
                );
            };
            let (reply, answer) = tokio::sync::oneshot::channel();
            if tx.send(crate::reload::Trigger::Admin(reply)).is_err() {
                return text(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "reloading has stopped\n".into(),
                );
            }
            match answer.await {
                Ok(Ok(crate::reload::Outcome::Swapped { version })) => text(
                    StatusCode::OK,
                    format!("reloaded: config version {version}\n"),
                ),
                Ok(Ok(crate::reload::Outcome::Unchanged { version })) => text(
                    StatusCode::OK,
                    format!("unchanged: config version {version} stays in effect\n"),
                ),
                Ok(Err(e)) => text(
                    StatusCode::BAD_REQUEST,
                    format!("reload rejected; the previous config stays in effect:\n{e}\n"),
                ),
                Err(_) => text(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "reload task ended\n".into(),
                ),
            }
        }
        "/quitquitquit" => {
            // Draining starts before the answer: a caller that asks `/ready` next must get
            // 503, not the 200 of a proxy whose main task has not yet woken to the request.
            shared.draining.send_replace(true);
            shared.quit.notify_one();
            text(StatusCode::OK, "draining and exiting\n".into())
        }
        _ => text(StatusCode::NOT_FOUND, INDEX.into()),
    }
}

fn text(status: StatusCode, body: String) -> Response<Body> {
    Response::builder()
        .status(status)
        .header("content-type", "text/plain; charset=utf-8")
        .body(Full::new(Bytes::from(body)))
        .expect("static response parts are valid")
}

fn json_response(v: &serde_json::Value) -> Response<Body> {
    let body = serde_json::to_vec_pretty(v)
        .unwrap_or_else(|e| format!("{{\"error\": \"{e}\"}}").into_bytes());
    Response::builder()
        .status(StatusCode::OK)
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(body)))
        .expect("static response parts are valid")
}

#[cfg(test)]
mod tests {
    use super::Scope;

    #[test]
    fn the_inbound_forwarder_is_not_a_local_client() {
        let local = |s: &str| super::is_local_client(s.parse().unwrap());
        assert!(local("127.0.0.1:5000"));
        assert!(local("[::1]:5000"));
        assert!(!local("127.0.0.6:5000"));
        assert!(!local("[::6]:5000"));
        assert!(!local("10.0.0.7:5000"));
    }

    #[test]
    fn status_and_metrics_ports_serve_only_their_paths() {
        for path in [
            "/",
            "/config_dump",
            "/stats",
            "/quitquitquit",
            "/connections",
        ] {
            assert!(Scope::Health.refuses(path).is_some(), "{path}");
            assert!(Scope::Metrics.refuses(path).is_some(), "{path}");
            assert!(Scope::Admin.refuses(path).is_none(), "{path}");
        }
        assert!(Scope::Health.refuses("/healthz/ready").is_none());
        assert!(Scope::Health.refuses("/stats/prometheus").is_some());
        assert!(Scope::Metrics.refuses("/stats/prometheus").is_none());
        assert!(Scope::Metrics.refuses("/metrics").is_none());
        assert!(Scope::Metrics.refuses("/healthz/ready").is_some());
    }

    #[test]
    fn percent_decoding() {
        assert_eq!(
            super::percent_decode("veer%3A%3Aaccess%3Ddebug"),
            "veer::access=debug"
        );
        assert_eq!(super::percent_decode("a+b"), "a b");
        assert_eq!(super::percent_decode("100%"), "100%");
        assert_eq!(super::percent_decode("%zz"), "%zz");
    }
}
