//! Istio's validation rules for the resources veer reads, and `veer validate`.
//!
//! [`validate()`] is pure: a loaded [`ConfigSet`] in, a [`Report`] out. Errors are the checks
//! Istio's admission webhook makes on each resource (pkg/config/validation in istio/istio), so
//! a config veer accepts is one `kubectl apply` accepts and vice versa, as far as TCP routing
//! is concerned. Warnings are problems that make a valid config not do what its author meant
//! (a subset no DestinationRule defines, a rule that can never match …); they never reject a
//! config. The proxy runs the same validator at start and on every reload (`routing::compile`).
//!
//! Deliberate differences from Istio: `idleTimeout: 0s` is accepted (Istio's API documents it
//! as "no idle timeout" although its webhook refuses it), and a STATIC ServiceEntry with neither
//! endpoints nor a workloadSelector is a warning (Istio accepts it silently).

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::io::{Read, Write};
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use ipnet::IpNet;
use rustc_hash::FxHashMap;

use super::load::{
    self, load_all, write_resource_message, ConfigError, ConfigSet, FieldError, ResourceAt,
};
use super::locate::{self, Position, Query};
use super::model::*;
use crate::routing::host;

/// The gateway name Istio uses for sidecars.
pub const MESH: &str = "mesh";

/// What [`validate()`] found. `errors` reject the config; `warnings` do not.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Report {
    pub errors: Vec<ConfigError>,
    pub warnings: Vec<Warning>,
}

impl Report {
    pub fn is_valid(&self) -> bool {
        self.errors.is_empty()
    }
}

/// A problem that does not make the config invalid but probably makes it wrong.
/// Printed like a [`FieldError`]: `file:LINE:COL: document N (Kind ns/name): field `path`: …`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Warning {
    pub file: PathBuf,
    pub document: usize,
    pub list_item: Option<usize>,
    pub line: Option<usize>,
    pub column: Option<usize>,
    pub kind: String,
    pub namespace: String,
    pub name: String,
    pub field: String,
    pub message: String,
}

impl fmt::Display for Warning {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write_resource_message(
            f,
            &ResourceAt {
                file: &self.file,
                document: self.document,
                list_item: self.list_item,
                line: self.line,
                column: self.column,
                kind: &self.kind,
                namespace: &self.namespace,
                name: &self.name,
            },
            &self.field,
            &self.message,
        )
    }
}

/// Checks every resource on its own (Istio's rules) and the resources against each other.
pub fn validate(set: &ConfigSet) -> Report {
    let mut c = Collector::default();
    for (i, loaded) in set.resources.iter().enumerate() {
        let mut r = c.on(i);
        match &loaded.resource {
            Resource::VirtualService(vs) => {
                validate_vs(&vs.spec, vs.metadata.namespace(), &mut r);
                unreachable_rules(&vs.spec, &mut r);
            }
            Resource::DestinationRule(dr) => validate_dr(&dr.spec, &mut r),
            Resource::Gateway(gw) => validate_gateway(&gw.metadata.name, &gw.spec, &mut r),
            Resource::ServiceEntry(se) => validate_se(&se.spec, &mut r),
            Resource::WorkloadEntry(we) => validate_workload_entry(&we.spec, "spec", None, &mut r),
            Resource::Service(svc) => validate_service(&svc.spec, &mut r),
            Resource::Pod(pod) => {
                if let Some(ip) = &pod.status.pod_ip {
                    if ip.parse::<IpAddr>().is_err() {
                        r.err("status.podIP", format!("{ip:?} is not an IP address"));
                    }
                }
            }
        }
    }
    cross_resource(set, &mut c);
    c.finish(set)
}

// ---------------------------------------------------------------------------------------------
// Collecting findings, then locating them in one pass per file

enum Severity {
    Error,
    Warning,
}

struct Finding {
    resource: usize,
    severity: Severity,
    field: String,
    message: String,
}

#[derive(Default)]
struct Collector {
    findings: Vec<Finding>,
}

/// Reports findings about one resource.
struct Reporter<'c> {
    c: &'c mut Collector,
    res: usize,
}

impl Reporter<'_> {
    fn err(&mut self, field: impl Into<String>, message: impl Into<String>) {
        self.push(Severity::Error, field.into(), message.into());
    }

    fn warn(&mut self, field: impl Into<String>, message: impl Into<String>) {
        self.push(Severity::Warning, field.into(), message.into());
    }

    fn push(&mut self, severity: Severity, field: String, message: String) {
        self.c.findings.push(Finding {
            resource: self.res,
            severity,
            field,
            message,
        });
    }
}

impl Collector {
    fn on(&mut self, res: usize) -> Reporter<'_> {
        Reporter { c: self, res }
    }

    fn finish(self, set: &ConfigSet) -> Report {
        let positions = self.locate(set);
        let mut report = Report::default();
        for (f, pos) in self.findings.into_iter().zip(positions) {
            let loaded = &set.resources[f.resource];
            let meta = loaded.resource.metadata();
            let (line, column) = (pos.map(|p| p.line), pos.map(|p| p.column));
            match f.severity {
                Severity::Error => report.errors.push(ConfigError::Field(Box::new(FieldError {
                    line,
                    column,
                    ..FieldError::unlocated(
                        &loaded.source,
                        loaded.resource.kind(),
                        meta.namespace(),
                        &meta.name,
                        f.field,
                        f.message,
                    )
                }))),
                Severity::Warning => report.warnings.push(Warning {
                    file: loaded.source.file.clone(),
                    document: loaded.source.document,
                    list_item: loaded.source.list_item,
                    line,
                    column,
                    kind: loaded.resource.kind().to_string(),
                    namespace: meta.namespace().to_string(),
                    name: meta.name.clone(),
                    field: f.field,
                    message: f.message,
                }),
            }
        }
        report
    }

    /// Positions of the findings: one parse per file that has any, and none for valid configs.
    fn locate(&self, set: &ConfigSet) -> Vec<Option<Position>> {
        let mut out = vec![None; self.findings.len()];
        // Findings grouped by the file text they point into (shared per file).
        let mut groups: HashMap<usize, Vec<usize>> = HashMap::new();
        for (i, f) in self.findings.iter().enumerate().take(load::MAX_LOCATED) {
            if let Some(text) = &set.resources[f.resource].source.text {
                groups
                    .entry(std::sync::Arc::as_ptr(&text.0) as *const u8 as usize)
                    .or_default()
                    .push(i);
            }
        }
        for idxs in groups.values() {
            let source = &set.resources[self.findings[idxs[0]].resource].source;
            let Some(text) = &source.text else { continue };
            let queries: Vec<Query> = idxs
                .iter()
                .map(|&i| {
                    let s = &set.resources[self.findings[i].resource].source;
                    Query {
                        document: s.document,
                        path: s.document_path(&self.findings[i].field),
                    }
                })
                .collect();
            for (&i, pos) in idxs.iter().zip(locate::locate_all(&text.0, &queries)) {
                out[i] = pos;
            }
        }
        out
    }
}

// ---------------------------------------------------------------------------------------------
// Syntax of names, hosts, ports, durations (Istio's pkg/config/validation/agent and labels)

/// A DNS-1123 label: lower-case letters, digits and `-`, alphanumeric at both ends, ≤ 63.
pub fn is_dns1123_label(s: &str) -> bool {
    let b = s.as_bytes();
    !b.is_empty()
        && b.len() <= 63
        && b.iter()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || *c == b'-')
        && b[0] != b'-'
        && b[b.len() - 1] != b'-'
}

const HOST_HINT: &str =
    "use a DNS name such as `reviews`, `reviews.prod.svc.cluster.local` or `*.example.com`";

fn check_dns_labels(host: &str, labels: &str) -> Result<(), String> {
    let parts: Vec<&str> = labels.split('.').collect();
    if let Some(tld) = parts.last() {
        if !tld.is_empty() && tld.bytes().all(|c| c.is_ascii_digit()) {
            return Err(format!(
                "{host:?} is not a valid host name: the last label {tld:?} cannot be all digits"
            ));
        }
    }
    for (i, label) in parts.iter().enumerate() {
        if i == parts.len() - 1 && label.is_empty() && i > 0 {
            return Ok(()); // a trailing dot
        }
        if *label == "*" || label.contains('*') {
            return Err(format!(
                "{host:?} is not a valid host name: a wildcard is only allowed as the whole first label (`*.example.com`)"
            ));
        }
        if !is_dns1123_label(label) {
            return Err(format!(
                "{host:?} is not a valid host name: label {label:?} must be 1-63 lower-case letters, digits or '-' ({HOST_HINT})"
            ));
        }
    }
    Ok(())
}

fn check_length(host: &str) -> Result<(), String> {
    if host.is_empty() {
        return Err("an empty host name is not allowed".into());
    }
    if host.len() > 255 {
        return Err(format!(
            "host name is {} characters long; the limit is 255",
            host.len()
        ));
    }
    Ok(())
}

/// A fully qualified (or short) DNS name without wildcards (Istio's `ValidateFQDN`).
pub fn check_fqdn(host: &str) -> Result<(), String> {
    check_length(host)?;
    check_dns_labels(host, host)
}

/// A DNS name whose first label may be a wildcard: `*`, `*.example.com`, `*foo.example.com`
/// (Istio's `ValidateWildcardDomain`).
pub fn check_wildcard_domain(host: &str) -> Result<(), String> {
    check_length(host)?;
    let (first, rest) = match host.split_once('.') {
        Some((f, r)) => (f, Some(r)),
        None => (host, None),
    };
    let bare = first
        .strip_prefix("*-")
        .or_else(|| first.strip_prefix('*'))
        .unwrap_or(first);
    let first_ok = first == "*" || is_dns1123_label(bare);
    if !first_ok {
        return Err(if first.contains('*') {
            format!("{host:?} is not a valid host name: a wildcard is only allowed at the start of the first label (`*.example.com`)")
        } else {
            format!(
                "{host:?} is not a valid host name: label {first:?} must be 1-63 lower-case letters, digits or '-' ({HOST_HINT})"
            )
        });
    }
    match rest {
        Some(r) => check_dns_labels(host, r),
        None => Ok(()),
    }
}

/// A Gateway server host: `host`, `ns/host`, `*/host` or `./host` (Istio's
/// `ValidateNamespaceSlashWildcardHostname` for gateways).
fn check_gateway_host(h: &str) -> Result<(), String> {
    let host = match h.split_once('/') {
        Some((ns, host)) => {
            if ns.is_empty() || host.is_empty() {
                return Err(format!(
                    "{h:?}: namespace and host around '/' must not be empty"
                ));
            }
            if ns != "*" && ns != "." && !is_dns1123_label(ns) {
                return Err(format!(
                    "{h:?}: {ns:?} is not a namespace (a DNS label, `*` or `.`)"
                ));
            }
            host
        }
        None => h,
    };
    if host == "*" {
        return Ok(());
    }
    check_wildcard_domain(host)
}

/// Istio's `validateGatewayNames`: `mesh`, `name`, `ns/name`, or the legacy `name.ns…`.
fn check_gateway_refs(refs: &[String], at: impl Fn() -> String, r: &mut Reporter<'_>) {
    for (i, g) in refs.iter().enumerate() {
        let field = || format!("{}[{i}]", at());
        match g.split_once('/') {
            None => {
                if g.contains('.') {
                    let mut parts = g.split('.');
                    let (name, ns) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
                    r.warn(
                        field(),
                        format!(
                            "{g:?} uses the legacy gateway reference format; prefer `{ns}/{name}`"
                        ),
                    );
                }
                if let Err(e) = check_fqdn(g) {
                    r.err(
                        field(),
                        format!(
                            "not a gateway reference (`mesh`, `name` or `namespace/name`): {e}"
                        ),
                    );
                }
            }
            Some((ns, name)) => {
                if ns.is_empty() || name.is_empty() {
                    r.err(
                        field(),
                        format!("{g:?}: namespace and gateway name must not be empty"),
                    );
                    continue;
                }
                if !is_dns1123_label(ns) {
                    r.err(
                        field(),
                        format!("{g:?}: {ns:?} is not a valid namespace (a DNS-1123 label)"),
                    );
                }
                if !is_dns1123_label(name) {
                    r.err(
                        field(),
                        format!("{g:?}: {name:?} is not a valid gateway name (a DNS-1123 label)"),
                    );
                }
            }
        }
    }
}

fn check_port(port: u32, field: impl FnOnce() -> String, r: &mut Reporter<'_>) {
    if !(1..=65535).contains(&port) {
        r.err(field(), format!("port {port} is out of range 1-65535"));
    }
}

/// Istio's `ValidateDuration`: at least 1ms, and whole milliseconds.
fn check_duration(d: IstioDuration, field: impl FnOnce() -> String, r: &mut Reporter<'_>) {
    if d.0 < Duration::from_millis(1) {
        r.err(
            field(),
            format!("duration {d} is too short: the minimum is 1ms"),
        );
    } else if d.0.subsec_nanos() % 1_000_000 != 0 {
        r.err(
            field(),
            format!(
                "duration {d} is finer than a millisecond; only whole milliseconds are supported"
            ),
        );
    }
}

/// Kubernetes label syntax: `[prefix/]name` keys and ≤ 63-character values.
fn check_labels(labels: &Labels, at: impl Fn() -> String, r: &mut Reporter<'_>) {
    fn name_ok(s: &str) -> bool {
        let b = s.as_bytes();
        !b.is_empty()
            && b.len() <= 63
            && b.iter()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, b'-' | b'_' | b'.'))
            && b[0].is_ascii_alphanumeric()
            && b[b.len() - 1].is_ascii_alphanumeric()
    }
    for (k, v) in labels {
        let field = || format!("{}.{k}", at());
        let key_ok = match k.rsplit_once('/') {
            Some((prefix, name)) => {
                prefix.len() <= 253
                    && !prefix.is_empty()
                    && prefix.split('.').all(is_dns1123_label)
                    && name_ok(name)
            }
            None => name_ok(k),
        };
        if !key_ok {
            r.err(
                field(),
                format!("{k:?} is not a valid label key ([prefix/]name, name 1-63 characters of letters, digits, '-', '_' or '.')"),
            );
        }
        if !v.is_empty() && !name_ok(v) {
            r.err(
                field(),
                format!("{v:?} is not a valid label value (at most 63 letters, digits, '-', '_' or '.', alphanumeric at both ends)"),
            );
        }
    }
}

/// An IP (as a host route) or a CIDR.
pub fn parse_net(s: &str) -> Option<IpNet> {
    s.parse::<IpNet>()
        .ok()
        .or_else(|| s.parse::<IpAddr>().ok().map(IpNet::from))
}

fn check_subnet(s: &str, field: impl FnOnce() -> String, r: &mut Reporter<'_>) {
    if parse_net(s).is_none() {
        r.err(field(), format!("{s:?} is not an IP address or CIDR"));
    }
}

impl ServiceSpec {
    /// `clusterIPs`, or `clusterIP` when only that is given.
    pub fn cluster_ips(&self) -> Vec<&str> {
        if !self.cluster_ips.is_empty() {
            self.cluster_ips.iter().map(String::as_str).collect()
        } else {
            self.cluster_ip.iter().map(String::as_str).collect()
        }
    }
}

/// Protocols Istio accepts on ports (`protocol.Parse`, case-insensitive).
const PROTOCOLS: [&str; 12] = [
    "TCP",
    "UDP",
    "HTTP",
    "HTTP2",
    "HTTPS",
    "TLS",
    "GRPC",
    "GRPC-WEB",
    "HTTP_PROXY",
    "MONGO",
    "REDIS",
    "MYSQL",
];

fn check_protocol(p: &str, field: impl FnOnce() -> String, r: &mut Reporter<'_>) {
    if !PROTOCOLS.iter().any(|k| k.eq_ignore_ascii_case(p)) {
        let hint = load::suggest(p, PROTOCOLS)
            .map(|s| format!("did you mean `{s}`? "))
            .unwrap_or_default();
        r.err(
            field(),
            format!(
                "unknown protocol {p:?}; {hint}(use one of: {})",
                PROTOCOLS.join(", ")
            ),
        );
    }
}

fn is_http(p: &str) -> bool {
    ["HTTP", "HTTP2", "GRPC", "GRPC-WEB", "HTTP_PROXY"]
        .iter()
        .any(|k| k.eq_ignore_ascii_case(p))
}

fn is_tls(p: &str) -> bool {
    p.eq_ignore_ascii_case("HTTPS") || p.eq_ignore_ascii_case("TLS")
}

// ---------------------------------------------------------------------------------------------
// VirtualService

fn validate_vs(spec: &VirtualServiceSpec, ns: &str, r: &mut Reporter<'_>) {
    if spec.hosts.is_empty() {
        r.err("spec.hosts", "at least one host is required");
    }
    let mesh_bound = spec.gateways.is_empty() || spec.gateways.iter().any(|g| g == MESH);
    let mut all_valid = true;
    for (i, h) in spec.hosts.iter().enumerate() {
        let field = || format!("spec.hosts[{i}]");
        if h == "*" && mesh_bound {
            r.err(
                field(),
                "wildcard host \"*\" is not allowed for VirtualServices bound to the mesh (add `gateways:` naming a Gateway)",
            );
            all_valid = false;
        } else if h.parse::<IpAddr>().is_err() {
            if let Err(e) = check_wildcard_domain(h) {
                r.err(field(), e);
                all_valid = false;
            }
        }
    }
    if all_valid {
        for (j, b) in spec.hosts.iter().enumerate() {
            if let Some(i) = spec.hosts[..j]
                .iter()
                .position(|a| host::matches(a, b) || host::matches(b, a))
            {
                r.err(
                    format!("spec.hosts[{j}]"),
                    format!(
                        "duplicate host: {b:?} overlaps spec.hosts[{i}] ({:?})",
                        spec.hosts[i]
                    ),
                );
            }
        }
    }
    check_gateway_refs(&spec.gateways, || "spec.gateways".to_string(), r);
    if spec.http.is_empty() && spec.tcp.is_empty() && spec.tls.is_empty() {
        r.err(
            "spec",
            "at least one of `tcp`, `tls` or `http` routes is required",
        );
    }
    // Field paths are built only for findings (closures): a valid config has none, and
    // formatting them eagerly was a visible part of a 10 000-service compile.
    for (i, rule) in spec.tcp.iter().enumerate() {
        let at = || format!("spec.tcp[{i}]");
        for (k, m) in rule.matches.iter().enumerate() {
            let at = || format!("{}.match[{k}]", at());
            let l4 = L4Match {
                port: m.port,
                destination_subnets: &m.destination_subnets,
                source_subnet: m.source_subnet.as_ref(),
                source_labels: &m.source_labels,
                gateways: &m.gateways,
            };
            l4.check(&at, r);
        }
        validate_route(&rule.route, &at, r);
    }
    for (i, rule) in spec.tls.iter().enumerate() {
        let at = || format!("spec.tls[{i}]");
        if rule.matches.is_empty() {
            r.err(
                format!("{}.match", at()),
                "TLS routes need at least one match with sniHosts",
            );
        }
        for (k, m) in rule.matches.iter().enumerate() {
            let at = || format!("{}.match[{k}]", at());
            if m.sni_hosts.is_empty() {
                r.err(
                    format!("{}.sniHosts", at()),
                    "at least one SNI host is required",
                );
            }
            for (n, sni) in m.sni_hosts.iter().enumerate() {
                check_sni_host(sni, spec, ns, || format!("{}.sniHosts[{n}]", at()), r);
            }
            let l4 = L4Match {
                port: m.port,
                destination_subnets: &m.destination_subnets,
                source_subnet: None,
                source_labels: &m.source_labels,
                gateways: &m.gateways,
            };
            l4.check(&at, r);
        }
        validate_route(&rule.route, &at, r);
    }
}

/// The match fields `tcp:` and `tls:` rules share (`tls:` has no `sourceSubnet`).
struct L4Match<'m> {
    port: Option<u32>,
    destination_subnets: &'m [String],
    source_subnet: Option<&'m String>,
    source_labels: &'m Labels,
    gateways: &'m [String],
}

impl L4Match<'_> {
    fn check(&self, at: &dyn Fn() -> String, r: &mut Reporter<'_>) {
        if let Some(p) = self.port {
            check_port(p, || format!("{}.port", at()), r);
        }
        for (n, s) in self.destination_subnets.iter().enumerate() {
            check_subnet(s, || format!("{}.destinationSubnets[{n}]", at()), r);
        }
        if let Some(s) = self.source_subnet {
            check_subnet(s, || format!("{}.sourceSubnet", at()), r);
        }
        check_labels(self.source_labels, || format!("{}.sourceLabels", at()), r);
        check_gateway_refs(self.gateways, || format!("{}.gateways", at()), r);
    }
}

/// Istio's `validateSniHost`: a (wildcard) DNS name that one of the VirtualService's hosts
/// covers, since the rule only ever sees connections for those hosts.
fn check_sni_host(
    sni: &str,
    spec: &VirtualServiceSpec,
    ns: &str,
    field: impl Fn() -> String,
    r: &mut Reporter<'_>,
) {
    if let Err(e) = check_wildcard_domain(sni) {
        if sni.parse::<IpAddr>().is_ok() {
            r.warn(
                field(),
                format!("{sni:?} is an IP address; SNI carries host names and most clients never send an IP"),
            );
        } else {
            r.err(field(), e);
        }
        return;
    }
    // Compared as written (as Istio does) and also with short names expanded in the
    // VirtualService's namespace, so `reviews` covers `reviews.<ns>.svc.cluster.local`.
    let covered = spec.hosts.iter().any(|h| {
        host::matches(h, sni) || host::matches(&host::expand(h, ns), &host::expand(sni, ns))
    });
    if !covered && !spec.hosts.is_empty() {
        r.err(
            field(),
            format!(
                "SNI host {sni:?} is not covered by any of the VirtualService's hosts [{}]; connections for it never reach this rule",
                spec.hosts.join(", ")
            ),
        );
    }
}

fn validate_route(route: &[RouteDestination], at: &dyn Fn() -> String, r: &mut Reporter<'_>) {
    if route.is_empty() {
        r.err(
            format!("{}.route", at()),
            "at least one destination is required",
        );
        return;
    }
    for (j, d) in route.iter().enumerate() {
        let at = || format!("{}.route[{j}]", at());
        let h = &d.destination.host;
        if h.is_empty() {
            r.err(format!("{}.destination.host", at()), "required");
        } else if h == "*" {
            r.err(
                format!("{}.destination.host", at()),
                "\"*\" is not a destination; name a service host",
            );
        } else if let Err(e) = check_wildcard_domain(h) {
            r.err(format!("{}.destination.host", at()), e);
        }
        if let Some(s) = &d.destination.subset {
            if !is_dns1123_label(s) {
                r.err(
                    format!("{}.destination.subset", at()),
                    format!("{s:?} is not a valid subset name (a DNS-1123 label: lower-case letters, digits, '-')"),
                );
            }
        }
        if let Some(p) = &d.destination.port {
            match p.number {
                Some(n) => check_port(n, || format!("{}.destination.port.number", at()), r),
                None => r.err(
                    format!("{}.destination.port.number", at()),
                    "required when `port` is given",
                ),
            }
        }
        if let Some(w) = d.weight {
            if !(0..=i64::from(i32::MAX)).contains(&w) {
                r.err(
                    format!("{}.weight", at()),
                    if w < 0 {
                        format!("weight {w} must be zero or positive")
                    } else {
                        format!("weight {w} is larger than {}", i32::MAX)
                    },
                );
            }
        }
    }
    if route.len() > 1 && route.iter().all(|d| d.weight.unwrap_or(0) == 0) {
        r.err(
            format!("{}.route", at()),
            "every destination has weight 0 (a missing weight is 0), so nothing can be routed",
        );
    }
}

/// Rules an earlier rule of the same VirtualService always wins over (Istio's
/// `analyzeUnreachableTCPRules`/`…TLSRules`, reported as warnings like Istio does).
fn unreachable_rules(spec: &VirtualServiceSpec, r: &mut Reporter<'_>) {
    fn analyze<M: PartialEq>(rules: Vec<&[M]>, kind: &str, r: &mut Reporter<'_>) {
        let mut catch_all: Option<usize> = None;
        let mut seen: Vec<(&M, usize, usize)> = Vec::new();
        for (i, matches) in rules.iter().enumerate() {
            let at = format!("spec.{kind}[{i}]");
            if let Some(c) = catch_all {
                r.warn(
                    at,
                    format!("this rule can never match: spec.{kind}[{c}] has no `match` and takes every connection first"),
                );
                continue;
            }
            if matches.is_empty() {
                catch_all = Some(i);
                continue;
            }
            let mut dups = Vec::new();
            for (k, m) in matches.iter().enumerate() {
                match seen.iter().find(|(s, _, _)| *s == m) {
                    Some(&(_, ri, mk)) => dups.push((k, ri, mk)),
                    None => seen.push((m, i, k)),
                }
            }
            if !dups.is_empty() && dups.len() == matches.len() {
                let (_, ri, mk) = dups[0];
                r.warn(
                    at,
                    format!("this rule can never match: each of its match blocks repeats one of an earlier rule (e.g. spec.{kind}[{ri}].match[{mk}])"),
                );
            } else {
                for (k, ri, mk) in dups {
                    r.warn(
                        format!("{at}.match[{k}]"),
                        format!("this match block repeats spec.{kind}[{ri}].match[{mk}] and never applies"),
                    );
                }
            }
        }
    }
    analyze(
        spec.tcp.iter().map(|t| t.matches.as_slice()).collect(),
        "tcp",
        r,
    );
    analyze(
        spec.tls.iter().map(|t| t.matches.as_slice()).collect(),
        "tls",
        r,
    );
}

// ---------------------------------------------------------------------------------------------
// DestinationRule

fn validate_dr(spec: &DestinationRuleSpec, r: &mut Reporter<'_>) {
    if spec.host.is_empty() {
        r.err("spec.host", "required: the host this rule applies to");
    } else if let Err(e) = check_wildcard_domain(&spec.host) {
        r.err("spec.host", e);
    }
    if let Some(tp) = &spec.traffic_policy {
        validate_traffic_policy(tp, "spec.trafficPolicy", r);
    }
    let mut seen: Vec<&String> = Vec::new();
    for (i, s) in spec.subsets.iter().enumerate() {
        // Field paths are formatted only for findings: most configs have none.
        let at = || format!("spec.subsets[{i}]");
        if s.name.is_empty() {
            r.err(format!("{}.name", at()), "required");
        } else if seen.contains(&&s.name) {
            r.err(
                format!("{}.name", at()),
                format!("duplicate subset name {:?}", s.name),
            );
        } else if !is_dns1123_label(&s.name) {
            r.err(
                format!("{}.name", at()),
                format!("{:?} is not a valid subset name (a DNS-1123 label: lower-case letters, digits, '-')", s.name),
            );
        }
        seen.push(&s.name);
        check_labels(&s.labels, || format!("{}.labels", at()), r);
        if let Some(tp) = &s.traffic_policy {
            validate_traffic_policy(tp, &format!("{}.trafficPolicy", at()), r);
        }
    }
    if let Some(ws) = &spec.workload_selector {
        check_workload_selector(ws, "spec.workloadSelector", r);
    }
}

fn check_workload_selector(ws: &WorkloadSelector, at: &str, r: &mut Reporter<'_>) {
    if ws.match_labels.is_empty() {
        r.warn(
            at,
            "workload selector has no labels, so it selects every workload in the namespace",
        );
    }
    for (k, v) in &ws.match_labels {
        if k.is_empty() || k.contains('*') || v.contains('*') {
            r.err(
                format!("{at}.matchLabels"),
                format!("{k}={v}: selector labels need a key and cannot contain wildcards"),
            );
        }
    }
}

fn validate_traffic_policy(tp: &TrafficPolicy, at: &str, r: &mut Reporter<'_>) {
    if tp.load_balancer.is_none()
        && tp.connection_pool.is_none()
        && tp.outlier_detection.is_none()
        && tp.tls.is_none()
        && tp.port_level_settings.is_empty()
        && tp.tunnel.is_none()
        && tp.proxy_protocol.is_none()
    {
        r.err(at, "traffic policy must set at least one field");
        return;
    }
    if tp.tunnel.is_some() && tp.proxy_protocol.is_some() {
        r.err(at, "`tunnel` and `proxyProtocol` cannot be set together");
    }
    if let Some(lb) = &tp.load_balancer {
        validate_lb(lb, &format!("{at}.loadBalancer"), r);
    }
    if let Some(cp) = &tp.connection_pool {
        validate_pool(cp, &format!("{at}.connectionPool"), r);
    }
    if let Some(od) = &tp.outlier_detection {
        validate_outlier(od, &format!("{at}.outlierDetection"), r);
    }
    for (i, p) in tp.port_level_settings.iter().enumerate() {
        let at = format!("{at}.portLevelSettings[{i}]");
        match p.port.as_ref().and_then(|p| p.number) {
            Some(n) => check_port(n, || format!("{at}.port.number"), r),
            None => r.err(
                format!("{at}.port"),
                "required: the port these settings apply to",
            ),
        }
        if p.load_balancer.is_none()
            && p.connection_pool.is_none()
            && p.outlier_detection.is_none()
            && p.tls.is_none()
        {
            r.err(
                at,
                "port traffic policy must set at least one field besides `port`",
            );
            continue;
        }
        if let Some(lb) = &p.load_balancer {
            validate_lb(lb, &format!("{at}.loadBalancer"), r);
        }
        if let Some(cp) = &p.connection_pool {
            validate_pool(cp, &format!("{at}.connectionPool"), r);
        }
        if let Some(od) = &p.outlier_detection {
            validate_outlier(od, &format!("{at}.outlierDetection"), r);
        }
    }
}

fn validate_lb(lb: &LoadBalancerSettings, at: &str, r: &mut Reporter<'_>) {
    if lb.simple.is_some() && lb.consistent_hash.is_some() {
        r.err(at, "set either `simple` or `consistentHash`, not both");
    }
    let Some(ch) = &lb.consistent_hash else {
        return;
    };
    let at = format!("{at}.consistentHash");
    let keys: Vec<&str> = [
        ("useSourceIp", ch.use_source_ip.is_some()),
        ("httpHeaderName", ch.http_header_name.is_some()),
        ("httpCookie", ch.http_cookie.is_some()),
        (
            "httpQueryParameterName",
            ch.http_query_parameter_name.is_some(),
        ),
    ]
    .into_iter()
    .filter_map(|(k, set)| set.then_some(k))
    .collect();
    if keys.len() > 1 {
        r.err(
            at.clone(),
            format!("only one hash key can be set, found {}", keys.join(", ")),
        );
    } else if let Some(k) = keys.first().filter(|k| **k != "useSourceIp") {
        r.warn(
            format!("{at}.{k}"),
            format!(
                "`{k}` hashes on HTTP data, which TCP connections do not carry; use `useSourceIp`"
            ),
        );
    }
    if let Some(n) = ch.minimum_ring_size {
        if n != 0 {
            r.warn(
                format!("{at}.minimumRingSize"),
                "`minimumRingSize` is deprecated; use `ringHash.minimumRingSize`",
            );
            if ch.ring_hash.is_some() || ch.maglev.is_some() {
                r.err(
                    format!("{at}.minimumRingSize"),
                    "cannot be combined with `ringHash` or `maglev`",
                );
            }
        }
    }
}

fn validate_pool(cp: &ConnectionPoolSettings, at: &str, r: &mut Reporter<'_>) {
    let Some(tcp) = &cp.tcp else {
        if cp.http.is_none() {
            r.err(at, "connection pool must set `tcp` or `http`");
        }
        return;
    };
    let at = format!("{at}.tcp");
    if let Some(n) = tcp.max_connections {
        if n < 0 {
            r.err(
                format!("{at}.maxConnections"),
                format!("{n} must be zero or positive"),
            );
        } else if n > i64::from(i32::MAX) {
            r.err(
                format!("{at}.maxConnections"),
                format!("{n} is larger than {}", i32::MAX),
            );
        }
    }
    if let Some(d) = tcp.connect_timeout {
        check_duration(d, || format!("{at}.connectTimeout"), r);
    }
    if let Some(d) = tcp.max_connection_duration {
        check_duration(d, || format!("{at}.maxConnectionDuration"), r);
    }
    if let Some(d) = tcp.idle_timeout {
        // 0s is Istio's documented "no idle timeout".
        if !d.0.is_zero() {
            check_duration(d, || format!("{at}.idleTimeout"), r);
        }
    }
    if let Some(ka) = &tcp.tcp_keepalive {
        if let Some(d) = ka.time {
            check_duration(d, || format!("{at}.tcpKeepalive.time"), r);
        }
        if let Some(d) = ka.interval {
            check_duration(d, || format!("{at}.tcpKeepalive.interval"), r);
        }
    }
}

fn validate_outlier(od: &OutlierDetection, at: &str, r: &mut Reporter<'_>) {
    for (name, v) in [
        ("consecutiveErrors", od.consecutive_errors),
        ("consecutiveGatewayErrors", od.consecutive_gateway_errors),
        ("consecutive5xxErrors", od.consecutive_5xx_errors),
        (
            "consecutiveLocalOriginFailures",
            od.consecutive_local_origin_failures,
        ),
    ] {
        if let Some(n) = v {
            if n < 0 {
                r.err(
                    format!("{at}.{name}"),
                    format!("{n} must be zero or positive"),
                );
            } else if n > i64::from(u32::MAX) {
                r.err(format!("{at}.{name}"), format!("{n} is out of range"));
            }
        }
    }
    if od.consecutive_errors.is_some_and(|n| n != 0) {
        r.warn(
            format!("{at}.consecutiveErrors"),
            "`consecutiveErrors` is deprecated; use `consecutiveGatewayErrors` or `consecutive5xxErrors`",
        );
    }
    if od.consecutive_local_origin_failures.is_some_and(|n| n > 0)
        && od.split_external_local_origin_errors != Some(true)
    {
        r.err(
            format!("{at}.consecutiveLocalOriginFailures"),
            "only takes effect with `splitExternalLocalOriginErrors: true`",
        );
    }
    if let Some(d) = od.interval {
        check_duration(d, || format!("{at}.interval"), r);
    }
    if let Some(d) = od.base_ejection_time {
        check_duration(d, || format!("{at}.baseEjectionTime"), r);
    }
    for (name, v) in [
        ("maxEjectionPercent", od.max_ejection_percent),
        ("minHealthPercent", od.min_health_percent),
    ] {
        if let Some(p) = v {
            if !(0..=100).contains(&p) {
                r.err(
                    format!("{at}.{name}"),
                    format!("{p} is not a percentage (0-100)"),
                );
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Gateway

fn validate_gateway(name: &str, spec: &GatewaySpec, r: &mut Reporter<'_>) {
    if !is_dns1123_label(name) {
        r.err(
            "metadata.name",
            format!("{name:?} is not a valid Gateway name (a DNS-1123 label: lower-case letters, digits, '-', no dots)"),
        );
    }
    if spec.servers.is_empty() {
        r.err("spec.servers", "at least one server is required");
    }
    let mut names: Vec<&str> = Vec::new();
    for (i, s) in spec.servers.iter().enumerate() {
        let at = format!("spec.servers[{i}]");
        if s.hosts.is_empty() {
            r.err(
                format!("{at}.hosts"),
                "at least one host is required (`\"*\"` for any)",
            );
        }
        for (k, h) in s.hosts.iter().enumerate() {
            if let Err(e) = check_gateway_host(h) {
                r.err(format!("{at}.hosts[{k}]"), e);
            }
        }
        let p = &s.port;
        let unix = s.bind.as_deref().is_some_and(|b| b.starts_with("unix://"));
        if p.number == 0 && !unix {
            r.err(format!("{at}.port.number"), "required");
        } else if p.number != 0 {
            check_port(p.number, || format!("{at}.port.number"), r);
        }
        if p.name.is_empty() {
            r.err(format!("{at}.port.name"), "required");
        } else if names.contains(&p.name.as_str()) {
            r.err(
                format!("{at}.port.name"),
                format!(
                    "duplicate port name {:?}: server port names must be unique",
                    p.name
                ),
            );
        }
        names.push(&p.name);
        if p.protocol.is_empty() {
            r.err(
                format!("{at}.port.protocol"),
                "required (e.g. TCP, TLS, HTTP)",
            );
        } else {
            check_protocol(&p.protocol, || format!("{at}.port.protocol"), r);
        }
        if p.target_port.is_some_and(|t| t != 0) {
            r.err(
                format!("{at}.port.targetPort"),
                "targetPort has no effect on Gateways",
            );
        }
        if let Some(b) = s
            .bind
            .as_deref()
            .filter(|b| !b.is_empty() && !b.starts_with("unix://"))
        {
            if b.parse::<IpAddr>().is_err() {
                r.err(format!("{at}.bind"), format!("{b:?} is not an IP address"));
            }
        }
        validate_server_tls(s, &at, r);
    }
}

fn validate_server_tls(s: &Server, at: &str, r: &mut Reporter<'_>) {
    let proto = s.port.protocol.as_str();
    let Some(tls) = &s.tls else {
        if is_tls(proto) {
            r.err(
                format!("{at}.tls"),
                format!("required for {proto} servers (e.g. `tls: {{mode: PASSTHROUGH}}`)"),
            );
        }
        return;
    };
    let at = format!("{at}.tls");
    if !is_tls(proto) && !proto.is_empty() {
        let redirect_only = is_http(proto)
            && tls.mode.is_none()
            && tls.server_certificate.is_none()
            && tls.private_key.is_none()
            && tls.ca_certificates.is_none();
        if !redirect_only {
            r.err(
                at.clone(),
                format!("TLS settings are only allowed on HTTPS and TLS servers, not {proto}"),
            );
        }
    }
    let has = |o: &Option<String>| o.as_deref().is_some_and(|s| !s.is_empty());
    let creds = has(&tls.credential_name);
    match tls.mode {
        Some(ServerTlsMode::IstioMutual) => {
            for (f, v) in [
                ("serverCertificate", &tls.server_certificate),
                ("privateKey", &tls.private_key),
                ("caCertificates", &tls.ca_certificates),
                ("credentialName", &tls.credential_name),
            ] {
                if has(v) {
                    r.err(format!("{at}.{f}"), "not allowed with mode ISTIO_MUTUAL");
                }
            }
        }
        Some(ServerTlsMode::Passthrough | ServerTlsMode::AutoPassthrough)
            if has(&tls.server_certificate)
                || has(&tls.private_key)
                || has(&tls.ca_certificates)
                || creds =>
        {
            r.warn(
                at,
                "passthrough mode does not terminate TLS; the certificates are ignored",
            );
        }
        Some(
            m @ (ServerTlsMode::Simple | ServerTlsMode::Mutual | ServerTlsMode::OptionalMutual),
        ) if !creds => {
            if !has(&tls.server_certificate) {
                r.err(
                    format!("{at}.serverCertificate"),
                    format!("required for mode {m:?} without credentialName"),
                );
            }
            if !has(&tls.private_key) {
                r.err(
                    format!("{at}.privateKey"),
                    format!("required for mode {m:?} without credentialName"),
                );
            }
            if m != ServerTlsMode::Simple && !has(&tls.ca_certificates) {
                r.err(
                    format!("{at}.caCertificates"),
                    format!("required for mode {m:?} without credentialName"),
                );
            }
        }
        _ => {}
    }
}

// ---------------------------------------------------------------------------------------------
// ServiceEntry, WorkloadEntry, Service

fn validate_se(spec: &ServiceEntrySpec, r: &mut Reporter<'_>) {
    if spec.hosts.is_empty() {
        r.err("spec.hosts", "at least one host is required");
    }
    for (i, h) in spec.hosts.iter().enumerate() {
        let field = format!("spec.hosts[{i}]");
        if h == "*" {
            r.err(
                field,
                "\"*\" is not allowed in a ServiceEntry; name the hosts",
            );
        } else if let Err(e) = check_wildcard_domain(h) {
            r.err(field, e);
        } else if h.starts_with('*') && !h.starts_with("*.") {
            r.warn(
                field,
                format!("{h:?} is a partial wildcard; only `*.` prefixes match as wildcards"),
            );
        }
    }
    let resolution = spec.resolution.unwrap_or(Resolution::None);
    let mut cidr = false;
    for (i, a) in spec.addresses.iter().enumerate() {
        cidr |= a.contains('/');
        check_subnet(a, || format!("spec.addresses[{i}]"), r);
    }
    if cidr && !matches!(resolution, Resolution::None | Resolution::Static) {
        r.err(
            "spec.resolution",
            "CIDR addresses are allowed only with resolution NONE or STATIC",
        );
    }
    if spec.workload_selector.is_some() && !spec.endpoints.is_empty() {
        r.err(
            "spec.workloadSelector",
            "set either `workloadSelector` or `endpoints`, not both",
        );
    }
    if let Some(ws) = &spec.workload_selector {
        check_workload_selector(ws, "spec.workloadSelector", r);
    }
    let mut names: Vec<&str> = Vec::new();
    let mut numbers: Vec<u32> = Vec::new();
    for (i, p) in spec.ports.iter().enumerate() {
        let at = format!("spec.ports[{i}]");
        check_port(p.number, || format!("{at}.number"), r);
        if numbers.contains(&p.number) {
            r.err(
                format!("{at}.number"),
                format!("port {} is defined twice", p.number),
            );
        }
        numbers.push(p.number);
        if !is_dns1123_label(&p.name) {
            r.err(
                format!("{at}.name"),
                format!("{:?} is not a valid port name (a DNS-1123 label)", p.name),
            );
        } else if names.contains(&p.name.as_str()) {
            r.err(
                format!("{at}.name"),
                format!("port name {:?} is defined twice", p.name),
            );
        }
        names.push(&p.name);
        if let Some(proto) = &p.protocol {
            if !proto.is_empty() {
                check_protocol(proto, || format!("{at}.protocol"), r);
            }
        }
        if let Some(t) = p.target_port.filter(|t| *t != 0) {
            check_port(t, || format!("{at}.targetPort"), r);
        }
    }
    match resolution {
        Resolution::None => {
            if !spec.endpoints.is_empty() {
                r.err(
                    "spec.endpoints",
                    "endpoints are not allowed with resolution NONE (connections go to the address the client dialled); use STATIC or DNS",
                );
            }
            if spec.workload_selector.is_some() {
                r.warn(
                    "spec.workloadSelector",
                    "has no effect with resolution NONE",
                );
            }
        }
        Resolution::Static => {
            if spec.endpoints.is_empty() && spec.workload_selector.is_none() {
                r.warn(
                    "spec.endpoints",
                    "resolution STATIC with neither endpoints nor workloadSelector: the service has no endpoints",
                );
            }
            for (i, e) in spec.endpoints.iter().enumerate() {
                validate_workload_entry(
                    e,
                    &format!("spec.endpoints[{i}]"),
                    Some((&names, false)),
                    r,
                );
            }
        }
        Resolution::Dns | Resolution::DnsRoundRobin => {
            if spec.endpoints.is_empty() {
                for (i, h) in spec.hosts.iter().enumerate() {
                    if h != "*" && check_fqdn(h).is_err() && check_wildcard_domain(h).is_ok() {
                        r.err(
                            format!("spec.hosts[{i}]"),
                            "with resolution DNS and no endpoints, hosts are resolved and must be names without wildcards",
                        );
                    }
                }
            }
            if resolution == Resolution::DnsRoundRobin && spec.endpoints.len() > 1 {
                r.err(
                    "spec.endpoints",
                    "resolution DNS_ROUND_ROBIN allows at most one endpoint",
                );
            }
            for (i, e) in spec.endpoints.iter().enumerate() {
                validate_workload_entry(
                    e,
                    &format!("spec.endpoints[{i}]"),
                    Some((&names, true)),
                    r,
                );
            }
        }
    }
    // Plain TCP cannot tell hosts apart, so one address:port cannot serve several of them
    // unless connections just go where the client dialled (NONE).
    if resolution != Resolution::None && spec.hosts.len() > 1 {
        if let Some(i) = spec.ports.iter().position(|p| {
            let proto = p.protocol.as_deref().unwrap_or("");
            !is_http(proto) && !is_tls(proto)
        }) {
            r.err(
                format!("spec.ports[{i}]"),
                "several hosts with a non-HTTP, non-TLS port: TCP cannot tell the hosts apart; use one ServiceEntry per host or resolution NONE",
            );
        }
    }
}

/// A WorkloadEntry spec, standalone (`ports` unchecked against a service) or as a
/// ServiceEntry endpoint (`service_ports` = port names, and whether names are allowed).
fn validate_workload_entry(
    we: &WorkloadEntrySpec,
    at: &str,
    service_ports: Option<(&[&str], bool)>,
    r: &mut Reporter<'_>,
) {
    let allow_names = service_ports.is_none_or(|(_, names)| names);
    let addr = we.address.as_str();
    if addr.is_empty() {
        if we.network.as_deref().is_some_and(|n| !n.is_empty()) {
            r.warn(
                format!("{at}.address"),
                "unset: reachable only through its network's gateway",
            );
        } else {
            r.err(format!("{at}.address"), "required");
        }
    } else if let Some(path) = addr.strip_prefix("unix://") {
        if !(path.starts_with('/') || path.starts_with('@')) || path.ends_with('/') {
            r.err(
                format!("{at}.address"),
                format!("{addr:?} is not an absolute socket path"),
            );
        }
        if !we.ports.is_empty() {
            r.err(format!("{at}.ports"), "a unix socket endpoint has no ports");
        }
    } else if addr.parse::<IpAddr>().is_err() {
        if !allow_names {
            r.err(
                format!("{at}.address"),
                format!("{addr:?} is not an IP address (resolution STATIC needs IPs; use DNS for names)"),
            );
        } else if check_fqdn(addr).is_err() {
            r.err(
                format!("{at}.address"),
                format!("{addr:?} is not an IP address or a DNS name"),
            );
        }
    }
    for (name, port) in &we.ports {
        let field = format!("{at}.ports.{name}");
        if let Some((names, _)) = service_ports {
            if !names.contains(&name.as_str()) {
                r.err(
                    field.clone(),
                    format!(
                        "{name:?} is not a port name of this ServiceEntry ({})",
                        names.join(", ")
                    ),
                );
            }
        }
        if !is_dns1123_label(name) {
            r.err(
                field.clone(),
                format!("{name:?} is not a valid port name (a DNS-1123 label)"),
            );
        }
        check_port(*port, || field, r);
    }
    check_labels(&we.labels, || format!("{at}.labels"), r);
}

fn validate_service(spec: &ServiceSpec, r: &mut Reporter<'_>) {
    for (i, ip) in spec.cluster_ips().iter().enumerate() {
        if *ip != "None" && !ip.is_empty() && ip.parse::<IpAddr>().is_err() {
            let field = if spec.cluster_ips.is_empty() && i == 0 {
                "spec.clusterIP".to_string()
            } else {
                format!("spec.clusterIPs[{i}]")
            };
            r.err(field, format!("{ip:?} is not an IP address"));
        }
    }
    for (i, p) in spec.ports.iter().enumerate() {
        check_port(p.port, || format!("spec.ports[{i}].port"), r);
        if let Some(IntOrString::Int(t)) = p.target_port {
            check_port(t, || format!("spec.ports[{i}].targetPort"), r);
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Cross-resource warnings

/// `namespace/name` of the Gateway a VirtualService's `gateways` entry names, `None` for `mesh`.
fn gateway_key(reference: &str, namespace: &str) -> Option<String> {
    if reference == MESH {
        return None;
    }
    Some(match reference.split_once('/') {
        Some((ns, name)) => format!("{ns}/{name}"),
        // Legacy `name.namespace[.svc.cluster.local]`.
        None => match reference.split_once('.') {
            Some((name, rest)) => {
                format!("{}/{name}", rest.split('.').next().unwrap_or(namespace))
            }
            None => format!("{namespace}/{reference}"),
        },
    })
}

/// Host patterns → values, looked up by host: exact names by hash, wildcards by scan, so
/// configs with thousands of services validate in linear time.
struct HostIndex<T> {
    exact: FxHashMap<String, Vec<T>>,
    wildcards: Vec<(String, T)>,
}

impl<T> HostIndex<T> {
    fn new() -> Self {
        HostIndex {
            exact: FxHashMap::default(),
            wildcards: Vec::new(),
        }
    }

    fn insert(&mut self, pattern: String, value: T) {
        if pattern.starts_with('*') {
            self.wildcards.push((pattern, value));
        } else {
            self.exact
                .entry(pattern.to_ascii_lowercase())
                .or_default()
                .push(value);
        }
    }

    /// Values of every pattern that covers `host`.
    fn lookup<'s>(&'s self, host: &'s str) -> impl Iterator<Item = &'s T> + 's {
        let exact = self.exact.get(&*host::lower(host)).into_iter().flatten();
        let wild = self
            .wildcards
            .iter()
            .filter(move |(p, _)| host::matches(p, host))
            .map(|(_, v)| v);
        exact.chain(wild)
    }
}

fn cross_resource(set: &ConfigSet, c: &mut Collector) {
    // Known service hosts: Services by FQDN, ServiceEntry hosts (maybe wildcards).
    let mut services: HostIndex<()> = HostIndex::new();
    // Subsets defined per DestinationRule host pattern.
    let mut subsets: HostIndex<Vec<&str>> = HostIndex::new();
    let mut gateways: BTreeMap<String, (usize, &Gateway)> = BTreeMap::new();
    for (i, l) in set.resources.iter().enumerate() {
        let ns = l.resource.metadata().namespace();
        match &l.resource {
            Resource::Service(s) => services.insert(host::service_fqdn(&s.metadata.name, ns), ()),
            Resource::ServiceEntry(se) => {
                for h in &se.spec.hosts {
                    services.insert(host::expand(h, ns), ());
                }
            }
            Resource::DestinationRule(dr) if !dr.spec.host.is_empty() => subsets.insert(
                host::expand(&dr.spec.host, ns),
                dr.spec.subsets.iter().map(|s| s.name.as_str()).collect(),
            ),
            Resource::Gateway(g) => {
                gateways.insert(format!("{ns}/{}", g.metadata.name), (i, g));
            }
            _ => {}
        }
    }
    let known = |h: &str| services.lookup(h).next().is_some();

    // Which gateway ports some VirtualService routes: (gateway key, port) → routed.
    let mut routed: Vec<(String, Option<u32>, bool)> = Vec::new();

    for (i, l) in set.resources.iter().enumerate() {
        let Resource::VirtualService(vs) = &l.resource else {
            continue;
        };
        let ns = l.resource.metadata().namespace();
        let mut r = c.on(i);
        for (k, g) in vs.spec.gateways.iter().enumerate() {
            if let Some(key) = gateway_key(g, ns) {
                if !gateways.contains_key(&key) {
                    r.warn(
                        format!("spec.gateways[{k}]"),
                        format!("no Gateway {key} is defined in this config, so these routes serve nothing there"),
                    );
                }
            }
        }
        let rules = vs
            .spec
            .tcp
            .iter()
            .map(|t| {
                (
                    "tcp",
                    t.matches
                        .iter()
                        .map(|m| (m.port, &m.gateways))
                        .collect::<Vec<_>>(),
                    &t.route,
                )
            })
            .chain(vs.spec.tls.iter().map(|t| {
                (
                    "tls",
                    t.matches
                        .iter()
                        .map(|m| (m.port, &m.gateways))
                        .collect::<Vec<_>>(),
                    &t.route,
                )
            }));
        for (ri, (kind, matches, route)) in rules.enumerate() {
            let ri = if kind == "tcp" {
                ri
            } else {
                ri - vs.spec.tcp.len()
            };
            // Record the gateway ports this rule can serve.
            for g in &vs.spec.gateways {
                let Some(key) = gateway_key(g, ns) else {
                    continue;
                };
                if matches.is_empty() {
                    routed.push((key.clone(), None, true));
                }
                for (port, mgws) in &matches {
                    let applies = mgws.is_empty()
                        || mgws
                            .iter()
                            .any(|m| gateway_key(m, ns).as_deref() == Some(&key));
                    if applies {
                        routed.push((key.clone(), *port, true));
                    }
                }
            }
            for (j, d) in route.iter().enumerate() {
                let h = &d.destination.host;
                if h.is_empty() || h.contains('*') {
                    continue;
                }
                let dest = host::expand(h, ns);
                let at = || format!("spec.{kind}[{ri}].route[{j}].destination");
                if !known(&dest) {
                    r.warn(
                        format!("{}.host", at()),
                        format!("{dest} is not a Service or ServiceEntry host in this config; connections to it go to the original destination (ALLOW_ANY) or are refused (REGISTRY_ONLY)"),
                    );
                }
                if let Some(s) = &d.destination.subset {
                    if !subsets
                        .lookup(&dest)
                        .any(|names| names.contains(&s.as_str()))
                    {
                        let rules: Vec<&Vec<&str>> = subsets.lookup(&dest).collect();
                        let defined: Vec<&str> =
                            rules.iter().flat_map(|n| n.iter().copied()).collect();
                        let msg = if rules.is_empty() {
                            format!("subset {s:?} is used but no DestinationRule for {dest} defines subsets; connections routed here fail")
                        } else {
                            format!(
                                "subset {s:?} is not defined by the DestinationRules for {dest} (defined: {}); connections routed here fail",
                                if defined.is_empty() { "none".to_string() } else { defined.join(", ") }
                            )
                        };
                        r.warn(format!("{}.subset", at()), msg);
                    }
                }
            }
        }
        // HTTP routes count for HTTP servers (veer ignores them, but they do bind the port).
        if !vs.spec.http.is_empty() {
            for g in &vs.spec.gateways {
                if let Some(key) = gateway_key(g, ns) {
                    routed.push((key, None, false));
                }
            }
        }
    }

    for (key, (i, g)) in &gateways {
        let mut r = c.on(*i);
        for (k, s) in g.spec.servers.iter().enumerate() {
            let port = s.port.number;
            let http = is_http(&s.port.protocol);
            let served = routed
                .iter()
                .any(|(gk, p, l4)| gk == key && p.is_none_or(|p| p == port) && (*l4 || http));
            if !served && port != 0 {
                r.warn(
                    format!("spec.servers[{k}].port"),
                    format!("no VirtualService routes port {port} of this Gateway: bind one with `gateways: [{key}]` and a `tcp` or `tls` rule for the port"),
                );
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// `veer validate`

/// `veer validate PATH...`: files, directories, or `-` for standard input. Prints errors
/// (`error: …`) and warnings (`warning: …`) to `err` and a summary to `out`. Returns the exit
/// code: 0 valid (warnings allowed), 1 errors, 2 usage.
pub fn run_validate(paths: &[String], out: &mut impl Write, err: &mut impl Write) -> i32 {
    run_validate_with(paths, &mut std::io::stdin().lock(), out, err)
}

/// [`run_validate`] with standard input given explicitly (for tests).
pub fn run_validate_with(
    paths: &[String],
    stdin: &mut impl Read,
    out: &mut impl Write,
    err: &mut impl Write,
) -> i32 {
    const USAGE: &str =
        "usage: veer validate PATH... (files, directories, or - for standard input)";
    if paths.is_empty() {
        let _ = writeln!(err, "{USAGE}");
        return 2;
    }
    if let Some(p) = paths
        .iter()
        .find(|p| p.starts_with('-') && p.as_str() != "-")
    {
        let _ = writeln!(err, "veer validate: unknown option {p:?}\n{USAGE}");
        return 2;
    }
    if paths.iter().filter(|p| p.as_str() == "-").count() > 1 {
        let _ = writeln!(
            err,
            "veer validate: standard input (-) can be read only once\n{USAGE}"
        );
        return 2;
    }
    let mut set = ConfigSet::default();
    let mut errors = Vec::new();
    for p in paths {
        if p == "-" {
            let name = Path::new("<stdin>");
            match load::read_limited(&mut *stdin, name) {
                Ok(text) => {
                    let (loaded, mut es) = load::parse_text(text.into(), name);
                    set.files.push(name.to_path_buf());
                    set.add_parsed(loaded);
                    errors.append(&mut es);
                }
                Err(e) => errors.push(e),
            }
        } else {
            let (mut s, mut es) = load_all(&[PathBuf::from(p)]);
            set.files.append(&mut s.files);
            set.resources.append(&mut s.resources);
            errors.append(&mut es);
        }
    }
    let load_failed = !errors.is_empty();
    let report = validate(&set);
    errors.extend(report.errors);
    // In file order, as an editor would walk them.
    errors.sort_by_key(error_order);
    let mut warnings = report.warnings;
    warnings.sort_by(|a, b| (&a.file, a.document, a.line).cmp(&(&b.file, b.document, b.line)));
    for e in &errors {
        let _ = writeln!(err, "error: {e}");
    }
    // With files that failed to load, cross-resource warnings would be guesses.
    if load_failed {
        warnings.clear();
    }
    for w in &warnings {
        let _ = writeln!(err, "warning: {w}");
    }
    let files = set.files.len();
    let plural = |n: usize, word: &str| format!("{n} {word}{}", if n == 1 { "" } else { "s" });
    if errors.is_empty() {
        let _ = writeln!(
            out,
            "valid: {} in {}, {}",
            plural(set.resources.len(), "resource"),
            plural(files, "file"),
            plural(warnings.len(), "warning")
        );
        0
    } else {
        let _ = writeln!(
            err,
            "invalid: {}, {}",
            plural(errors.len(), "error"),
            plural(warnings.len(), "warning")
        );
        1
    }
}

fn error_order(e: &ConfigError) -> (PathBuf, usize, usize) {
    match e {
        ConfigError::Read { path, .. }
        | ConfigError::TooLarge { path, .. }
        | ConfigError::Empty { path } => (path.clone(), 0, 0),
        ConfigError::Yaml {
            file,
            document,
            line,
            ..
        } => (file.clone(), *document, line.unwrap_or(0)),
        ConfigError::Field(f) => (f.file.clone(), f.document, f.line.unwrap_or(0)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::parse_documents;

    fn report(yaml: &str) -> Report {
        let resources = parse_documents(yaml, Path::new("v.yaml")).unwrap();
        validate(&ConfigSet::new(vec![], resources))
    }

    #[test]
    fn host_syntax() {
        for ok in [
            "reviews",
            "reviews.prod.svc.cluster.local",
            "*.example.com",
            "*",
            "*foo.example.com",
            "a.b.",
        ] {
            assert!(check_wildcard_domain(ok).is_ok(), "{ok}");
        }
        for bad in [
            "",
            "foo.*.com",
            "a..b",
            "Reviews",
            "-a.b",
            "a.123",
            "*.*.example.com",
            "a_b",
        ] {
            assert!(check_wildcard_domain(bad).is_err(), "{bad}");
        }
        assert!(check_fqdn("*.example.com").is_err());
        assert!(check_fqdn("db.example.com").is_ok());
        assert!(check_gateway_host("prod/*.example.com").is_ok());
        assert!(check_gateway_host("*/foo.com").is_ok());
        assert!(check_gateway_host("./*").is_ok());
        assert!(check_gateway_host("/foo").is_err());
        assert!(check_gateway_host("Prod/foo").is_err());
    }

    #[test]
    fn labels_and_names() {
        assert!(is_dns1123_label("v1"));
        assert!(is_dns1123_label("a-b"));
        assert!(!is_dns1123_label("V1"));
        assert!(!is_dns1123_label("v1."));
        assert!(!is_dns1123_label(&"a".repeat(64)));
    }

    #[test]
    fn gateway_keys() {
        assert_eq!(gateway_key("mesh", "default"), None);
        assert_eq!(gateway_key("gw", "default").as_deref(), Some("default/gw"));
        assert_eq!(
            gateway_key("prod/gw", "default").as_deref(),
            Some("prod/gw")
        );
        assert_eq!(
            gateway_key("gw.prod.svc.cluster.local", "default").as_deref(),
            Some("prod/gw")
        );
    }

    #[test]
    fn valid_config_has_no_findings() {
        let r = report(
            "apiVersion: v1\nkind: Service\nmetadata: {name: a}\nspec: {clusterIP: 10.0.0.1, ports: [{port: 80}]}\n---\n\
             apiVersion: networking.istio.io/v1\nkind: DestinationRule\nmetadata: {name: a}\nspec: {host: a, subsets: [{name: v1, labels: {v: '1'}}]}\n---\n\
             apiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {name: a}\nspec:\n  hosts: [a]\n  tcp:\n  - match: [{port: 80}]\n    route: [{destination: {host: a, subset: v1}}]\n  - route: [{destination: {host: a}}]\n",
        );
        assert_eq!(r, Report::default());
    }

    #[test]
    fn errors_and_warnings_carry_positions() {
        let r = report(
            "apiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {name: a}\nspec:\n  hosts: [a]\n  tcp:\n  - route:\n    - destination: {host: a, subset: V1}\n  - route: [{destination: {host: a}}]\n",
        );
        assert_eq!(r.errors.len(), 1, "{:?}", r.errors);
        let e = r.errors[0].to_string();
        assert!(e.starts_with("v.yaml:8:30: document 1 (VirtualService default/a): field `spec.tcp[0].route[0].destination.subset`"), "{e}");
        let w: Vec<String> = r.warnings.iter().map(|w| w.to_string()).collect();
        assert!(w.iter().any(|w| w.starts_with("v.yaml:9:5: document 1 (VirtualService default/a): field `spec.tcp[1]`: this rule can never match")), "{w:#?}");
    }

    #[test]
    fn run_validate_exit_codes() {
        let mut out = Vec::new();
        let mut err = Vec::new();
        assert_eq!(run_validate_with(&[], &mut &b""[..], &mut out, &mut err), 2);
        assert_eq!(
            run_validate_with(&["--bogus".into()], &mut &b""[..], &mut out, &mut err),
            2
        );
        let good =
            b"apiVersion: v1\nkind: Service\nmetadata: {name: a}\nspec: {ports: [{port: 80}]}\n";
        err.clear();
        assert_eq!(
            run_validate_with(&["-".into()], &mut &good[..], &mut out, &mut err),
            0,
            "{}",
            String::from_utf8_lossy(&err)
        );
        let bad =
            b"apiVersion: v1\nkind: Service\nmetadata: {name: a}\nspec: {ports: [{port: 0}]}\n";
        err.clear();
        assert_eq!(
            run_validate_with(&["-".into()], &mut &bad[..], &mut out, &mut err),
            1
        );
        let msg = String::from_utf8_lossy(&err);
        assert!(
            msg.contains(
                "error: <stdin>:4:17: document 1 (Service default/a): field `spec.ports[0].port`"
            ),
            "{msg}"
        );
    }
}
