//! The admin endpoint (default 127.0.0.1:15000): what the proxy believes and does.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::Ordering;
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

const INDEX: &str = "veer admin\n\
GET /ready          200 once listeners are bound and config is loaded\n\
GET /config_dump    resources loaded (with source), compiled listeners, routes and clusters (JSON)\n\
GET /routes         per rule: weights and connections each destination received (JSON)\n\
GET /clusters       clusters with endpoints and their connection counts (JSON)\n\
GET /stats          process-wide counters (JSON)\n";

/// Serves the admin API on an already-bound listener until the process ends.
pub async fn serve(listener: TcpListener, shared: Arc<Shared>) {
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
                async move { Ok::<_, Infallible>(handle(&req, &shared, peer)) }
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

fn handle(req: &Request<Incoming>, shared: &Shared, _peer: SocketAddr) -> Response<Body> {
    if req.method() != Method::GET && req.method() != Method::HEAD {
        return text(
            StatusCode::METHOD_NOT_ALLOWED,
            "only GET is supported here\n",
        );
    }
    let snap = shared.snapshot.load();
    match req.uri().path() {
        "/" => text(StatusCode::OK, INDEX),
        "/ready" | "/healthz/ready" => {
            if shared.ready.load(Ordering::Acquire) {
                text(StatusCode::OK, "LIVE\n")
            } else {
                text(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "not ready: listeners not bound yet\n",
                )
            }
        }
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
        "/routes" => json_response(
            &serde_json::to_value(&**snap)
                .map(|v| v["listeners"].clone())
                .unwrap_or_default(),
        ),
        "/clusters" => json_response(&serde_json::to_value(&snap.clusters).unwrap_or_default()),
        "/stats" => json_response(&serde_json::to_value(&*shared.stats).unwrap_or_default()),
        _ => text(StatusCode::NOT_FOUND, INDEX),
    }
}

fn text(status: StatusCode, body: &'static str) -> Response<Body> {
    Response::builder()
        .status(status)
        .header("content-type", "text/plain; charset=utf-8")
        .body(Full::new(Bytes::from_static(body.as_bytes())))
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
