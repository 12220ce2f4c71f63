//! What the fuzz targets do with one input. Shared, file for file, by the `cargo fuzz` targets
//! (`fuzz/fuzz_targets/*.rs`) and by `tests/fuzz_regressions.rs` (via `#[path]`), so an input
//! saved under `tests/fuzz_inputs/` replays through exactly the code that found it.
//!
//! Depends on `veer` and `serde_json` only (both available to veer's integration tests).
//! Every function must return normally for every input: a panic, a hang or unbounded memory
//! is a bug in veer (or, for the `assert!`s below, a broken invariant the proxy relies on).

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::Path;

use veer::addr::{ClientAddr, OrigDst};
use veer::config::{load, validate, ConfigSet};
use veer::proxy::tls::{parse_client_hello, TlsParseError, MAX_PEEK_BYTES};
use veer::routing::compile::link_unvalidated;
use veer::routing::{compile, OutboundTrafficPolicy, ProxyIdentity, ProxyMode, Snapshot};

/// How many listeners, gateway ports and clusters of a compiled snapshot are looked up, so one
/// input's cost stays bounded however many services it declares.
const LOOKUPS: usize = 8;

/// How many `---` lines of an input are tried as the cut of a two-half parse.
const CUTS: usize = 4;

/// The sidecar the config is compiled for: a client pod in `default`, as in the samples.
pub fn sidecar_identity() -> ProxyIdentity {
    ProxyIdentity {
        namespace: "default".into(),
        labels: [("app", "sleep"), ("version", "v1")]
            .into_iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect(),
        mode: ProxyMode::Sidecar,
    }
}

/// The ingress gateway the config is compiled for (manifests/gateway/veer-ingressgateway.yaml).
pub fn gateway_identity() -> ProxyIdentity {
    ProxyIdentity {
        namespace: "istio-system".into(),
        labels: [("app", "veer-ingressgateway"), ("istio", "ingressgateway")]
            .into_iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect(),
        mode: ProxyMode::Gateway,
    }
}

/// Bytes as a config file: the proxy's and `veer validate`'s path from a file's bytes to a
/// routing table. `read_limited` (size and UTF-8 checks) → `parse_text` (multi-document,
/// `kind: List`) → `validate` → every message rendered (locating fields in the text) →
/// `compile` in sidecar and gateway mode (only when loading succeeded, as `load_paths`
/// requires; the linker alone when validation fails) → JSON dump and `explain`/route/pick on
/// a few listeners, as the admin API does.
pub fn config(data: &[u8]) {
    let path = Path::new("fuzz.yaml");
    let text = match load::read_limited(data, path) {
        Ok(text) => text,
        Err(e) => {
            let _ = e.to_string();
            return;
        }
    };
    let text: std::sync::Arc<str> = text.into();
    let (resources, load_errors) = load::parse_text(text.clone(), path);
    // A large file is parsed in halves cut at a `---` line: any cut must read as the whole.
    let whole = format!("{resources:?} {load_errors:?}");
    for (at, _) in text.match_indices("\n---").take(CUTS) {
        if let Some((r, e)) = load::parse_text_cut_at(text.clone(), path, at + 1) {
            assert_eq!(
                format!("{r:?} {e:?}"),
                whole,
                "parsed in halves cut at byte {}",
                at + 1
            );
        }
    }
    for e in &load_errors {
        let _ = e.to_string();
    }
    // `veer validate` reports on whatever loaded, even when other documents failed.
    let set = ConfigSet::new(vec![path.to_path_buf()], resources);
    let report = validate(&set);
    for e in &report.errors {
        let _ = e.to_string();
    }
    for w in &report.warnings {
        let _ = w.to_string();
    }
    // The proxy compiles only configs that loaded without errors (`load_paths`).
    if !load_errors.is_empty() {
        return;
    }
    for (identity, policy) in [
        (sidecar_identity(), OutboundTrafficPolicy::AllowAny),
        (gateway_identity(), OutboundTrafficPolicy::RegistryOnly),
    ] {
        match compile(set.clone(), identity.clone(), policy, 1) {
            Ok(snapshot) => {
                assert!(
                    report.is_valid(),
                    "compile accepted a config validate rejects: {:?}",
                    report.errors
                );
                exercise(&snapshot);
            }
            Err(errors) => {
                assert!(
                    !report.is_valid(),
                    "compile rejected a config validate accepts: {errors}"
                );
                let _ = errors.to_string();
                // A large config is linked while it is validated, so the linker meets
                // invalid configs too: it must not panic on any.
                let _ = link_unvalidated(&set, &identity);
            }
        }
    }
}

/// What the proxy and the admin API do with a snapshot, on the first few listeners.
fn exercise(snapshot: &Snapshot) {
    let _ = serde_json::to_vec(snapshot);
    for w in &snapshot.warnings {
        let _ = w.len();
    }
    let client = ClientAddr(SocketAddr::new(
        IpAddr::V4(Ipv4Addr::new(10, 1, 2, 3)),
        40000,
    ));

    let mut addrs: Vec<SocketAddr> = snapshot.listeners.keys().copied().collect();
    addrs.sort();
    addrs.truncate(LOOKUPS);
    addrs.extend(
        snapshot
            .gateway_ports
            .keys()
            .take(LOOKUPS)
            .map(|&port| SocketAddr::new(IpAddr::V4(Ipv4Addr::UNSPECIFIED), port)),
    );
    addrs.extend(
        snapshot
            .cidr_listeners
            .iter()
            .take(LOOKUPS)
            .map(|(net, port, _)| SocketAddr::new(net.network(), *port)),
    );
    for addr in addrs {
        if snapshot.identity.mode == ProxyMode::Sidecar {
            routed_in_the_table_as_the_listener_would(snapshot, OrigDst(addr), client);
        }
        let listener = match snapshot.identity.mode {
            ProxyMode::Gateway => snapshot.gateway_ports.get(&addr.port()).cloned(),
            ProxyMode::Sidecar => match snapshot.route_outbound(OrigDst(addr)) {
                veer::routing::Outbound::Service(l) => Some(l.clone()),
                _ => None,
            },
        };
        // An SNI some rule matches, if any, and one none does.
        let sni = listener
            .as_ref()
            .and_then(|l| {
                l.rules
                    .iter()
                    .flat_map(|r| r.conditions.iter())
                    .flat_map(|c| c.sni_hosts.iter())
                    .next()
                    .map(|h| h.replace('*', "x"))
            })
            .unwrap_or_else(|| "nothing.example.com".to_string());
        for sni in [None, Some(sni.as_str())] {
            let _ = snapshot.explain(addr, sni).to_string();
            if let Some(l) = &listener {
                for _ in 0..3 {
                    if let Some((_, cluster)) = l.route(addr.ip(), sni) {
                        let _ = cluster.pick(client);
                    }
                }
            }
        }
    }
    for cluster in snapshot.clusters.values().take(LOOKUPS) {
        for _ in 0..3 {
            let _ = cluster.pick(client);
        }
    }
}

/// The per-connection table's decision must be one the listener could have made: the same
/// listener, a destination of the rule it names (or the listener's own cluster), and an
/// endpoint of that cluster at the address given.
fn routed_in_the_table_as_the_listener_would(
    snapshot: &Snapshot,
    dst: OrigDst,
    client: ClientAddr,
) {
    let veer::routing::Route::Fast(r) = snapshot.route(dst, client) else {
        return;
    };
    let veer::routing::Outbound::Service(listener) = snapshot.route_outbound(dst) else {
        panic!("{dst}: decided in the table, but no service owns it");
    };
    assert!(
        std::sync::Arc::ptr_eq(listener, r.listener),
        "{dst}: another listener"
    );
    let allowed: Vec<&std::sync::Arc<veer::routing::Cluster>> = match r.rule() {
        Some(rule) => rule.destinations.iter().map(|d| &d.cluster).collect(),
        None => listener.default_cluster.iter().collect(),
    };
    assert!(
        allowed.iter().any(|c| std::sync::Arc::ptr_eq(c, r.cluster)),
        "{dst}: cluster {} is not a destination of the route",
        r.cluster.name
    );
    // The table picks the endpoint only from a cluster whose own pick it can make.
    let Some(picked) = r.endpoint else {
        return;
    };
    assert!(
        r.cluster.policy.outlier_detection.is_none() && !r.cluster.original_destination,
        "{dst}: the table picked in {}, which picks for itself",
        r.cluster.name
    );
    assert_eq!(
        r.cluster.endpoints[picked.index].address,
        veer::routing::EndpointAddr::Socket(picked.addr),
        "{dst}: endpoint {} of {}",
        picked.index,
        r.cluster.name
    );
}

/// Bytes as a connection's first flight: `parse_client_hello` must not panic, and its answer
/// must be one `peek_sni` can act on — a hello no longer than the bytes, a need for more bytes
/// that is really more (and within the peek buffer), and the same verdict from any prefix
/// long enough to hold the hello.
pub fn tls_client_hello(data: &[u8]) {
    let verdict = parse_client_hello(data);
    match &verdict {
        Ok(hello) => {
            assert!(
                hello.wire_len <= data.len(),
                "wire_len past the end: {hello:?}"
            );
            assert!(
                hello.wire_len <= MAX_PEEK_BYTES,
                "wire_len past the peek limit: {hello:?}"
            );
            if let Some(sni) = &hello.sni {
                assert!(!sni.is_empty() && sni.len() <= 253, "bad SNI {sni:?}");
                assert!(
                    sni.bytes().all(|b| !b.is_ascii_uppercase()),
                    "SNI not lowercased"
                );
            }
            // The hello alone parses the same (bytes after it are not looked at) …
            assert_eq!(parse_client_hello(&data[..hello.wire_len]), verdict);
            // … and a shorter prefix only asks for more bytes (never gives up on a hello that
            // is on its way), and given them gets further. The need may pass `wire_len`: it is
            // the end of the record the hello ends in, which peek_sni waits for whole.
            for cut in [hello.wire_len - 1, hello.wire_len / 2] {
                match parse_client_hello(&data[..cut]) {
                    Err(TlsParseError::Incomplete { needed }) => {
                        assert!(
                            needed > cut && needed <= MAX_PEEK_BYTES,
                            "prefix of {cut} bytes needs {needed}"
                        );
                        let more = needed.min(data.len());
                        match parse_client_hello(&data[..more]) {
                            Ok(h) => assert_eq!(&h, hello, "prefix of {more} bytes"),
                            Err(TlsParseError::Incomplete { needed: next }) => assert!(
                                next > more && next <= MAX_PEEK_BYTES,
                                "prefix of {more} bytes needs {next}"
                            ),
                            other => panic!(
                                "prefix of {more} bytes of a {}-byte hello: {other:?}",
                                hello.wire_len
                            ),
                        }
                    }
                    other => panic!(
                        "prefix of {cut} bytes of a {}-byte hello: {other:?}",
                        hello.wire_len
                    ),
                }
            }
        }
        Err(TlsParseError::Incomplete { needed }) => {
            assert!(
                *needed > data.len(),
                "asks for {needed} bytes, has {}",
                data.len()
            );
            assert!(
                *needed <= MAX_PEEK_BYTES,
                "asks for {needed} bytes, past the peek limit"
            );
        }
        Err(e) => {
            let _ = e.to_string();
        }
    }
}
