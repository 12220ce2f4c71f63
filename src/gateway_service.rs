//! `veer gateway-service`: the ingress gateway's Kubernetes Service, derived from Gateways.
//!
//! With Istio, a Gateway server on a port other than the ingress gateway Service's defaults
//! (31400 for TCP) silently does nothing until someone hand-edits
//! `istio-system/istio-ingressgateway` to add the port. veer listens on every Gateway server
//! port itself, so the Service only has to expose them: this module prints that Service,
//! one port per distinct server port, merged into the existing Service when one is given.
//!
//! Merge rules, chosen so applying the output never breaks what already works:
//! - existing ports are kept, including ones no Gateway uses (health, metrics, other tools);
//! - an existing port a Gateway uses keeps its name and nodePort, but its targetPort becomes
//!   the port itself (Istio's Service maps 80 → 8080; veer listens on 80);
//! - missing Gateway ports are added without a nodePort (Kubernetes allocates one);
//! - a header comment says what was added or changed.

use std::borrow::Borrow;
use std::collections::BTreeSet;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use serde_yaml::{Mapping, Value};

use crate::config::model::{IntOrString, Labels, Service, ServicePort};
use crate::config::{load_paths, ConfigErrors, Loaded, Resource};

/// Kubernetes' IANA_SVC_NAME limit. Service port names only need to be DNS-1123 labels (63),
/// but the stricter container-port rule keeps the names reusable on the Deployment's ports.
const MAX_PORT_NAME_LEN: usize = 15;

/// Annotation `kubectl apply` writes; copying it would embed a stale copy of the old Service.
const LAST_APPLIED: &str = "kubectl.kubernetes.io/last-applied-configuration";

/// `spec` fields of an existing Service not carried over: the ones this module writes, and
/// the ones the API server allocates (and keeps on update when they are left out).
const SPEC_FIELDS_REPLACED: [&str; 5] = ["type", "selector", "ports", "clusterIP", "clusterIPs"];

#[derive(Debug, thiserror::Error)]
pub enum GatewayServiceError {
    #[error(transparent)]
    Config(#[from] ConfigErrors),
    #[error("{path}: cannot read: {reason}")]
    Read { path: PathBuf, reason: String },
    #[error("no Gateway{} in {}", selector_phrase(.selector), files_phrase(.files))]
    NoGateways {
        files: Vec<PathBuf>,
        selector: Option<String>,
    },
    #[error("{at} (Gateway {gateway}): server port {number} is not a TCP port number (1-65535)")]
    PortOutOfRange {
        at: String,
        gateway: String,
        number: u32,
    },
    #[error(
        "the Gateways select different workloads ({}); pass --selector to pick the gateway's labels",
        .selectors.join("; ")
    )]
    AmbiguousSelector { selectors: Vec<String> },
    #[error("the Gateways have no selector, so the Service's pods are unknown; pass --selector")]
    NoSelector,
    #[error("{path}: no Service {namespace}/{name} (found: {})", if .found.is_empty() { "no Services".to_string() } else { .found.join(", ") })]
    ServiceNotFound {
        path: PathBuf,
        namespace: String,
        name: String,
        found: Vec<String>,
    },
    #[error("no free name for port {number}: every candidate is taken by an existing port")]
    PortName { number: u16 },
    #[error("bad selector {text:?}: expected key=value[,key=value…]")]
    BadSelector { text: String },
    #[error("cannot write YAML: {0}")]
    Yaml(String),
}

fn selector_phrase(selector: &Option<String>) -> String {
    selector
        .as_ref()
        .map(|s| format!(" selecting {s}"))
        .unwrap_or_default()
}

fn files_phrase(files: &[PathBuf]) -> String {
    if files.is_empty() {
        return "the given resources".into();
    }
    files
        .iter()
        .map(|f| f.display().to_string())
        .collect::<Vec<_>>()
        .join(", ")
}

fn labels_text(labels: &Labels) -> String {
    if labels.is_empty() {
        return "{}".into();
    }
    labels
        .iter()
        .map(|(k, v)| format!("{k}={v}"))
        .collect::<Vec<_>>()
        .join(",")
}

/// Parses `--selector k=v[,k2=v2]`.
pub fn parse_selector(text: &str) -> Result<Labels, GatewayServiceError> {
    let bad = || GatewayServiceError::BadSelector { text: text.into() };
    let mut labels = Labels::new();
    for pair in text.split(',').filter(|p| !p.trim().is_empty()) {
        let (k, v) = pair.split_once('=').ok_or_else(bad)?;
        if k.trim().is_empty() {
            return Err(bad());
        }
        labels.insert(k.trim().to_string(), v.trim().to_string());
    }
    if labels.is_empty() {
        return Err(bad());
    }
    Ok(labels)
}

/// Loads Gateways from `files` (files or directories; other kinds are ignored) and the
/// existing Service `namespace/name` from `service`, and renders the merged Service.
///
/// `selector`: the gateway pods' labels; only Gateways whose selector they satisfy count.
/// Without it, the existing Service's selector is used the same way, and without that every
/// Gateway counts.
pub fn run(
    files: &[PathBuf],
    service: Option<&Path>,
    name: &str,
    namespace: &str,
    selector: Option<Labels>,
) -> Result<String, GatewayServiceError> {
    let set = load_paths(files)?;
    let existing = match service {
        Some(path) => Some(existing_service(path, name, namespace)?),
        None => None,
    };
    let (existing, extra_spec) = existing.unzip();
    render_with(
        &set.resources,
        selector.as_ref(),
        existing.as_ref(),
        extra_spec.as_ref(),
        name,
        namespace,
    )
    .map_err(|e| match e {
        GatewayServiceError::NoGateways { selector, .. } => GatewayServiceError::NoGateways {
            files: set.files.clone(),
            selector,
        },
        e => e,
    })
}

/// The Service `namespace/name` in `path` (e.g. `kubectl get svc -n istio-system
/// istio-ingressgateway -o yaml`), with the `spec` fields veer's model does not carry
/// (externalTrafficPolicy, loadBalancerIP, sessionAffinity …) so they survive the rewrite.
fn existing_service(
    path: &Path,
    name: &str,
    namespace: &str,
) -> Result<(Service, Mapping), GatewayServiceError> {
    let loaded = load_paths(&[path.to_path_buf()])?;
    let mut found = Vec::new();
    let mut hit = None;
    for l in loaded.resources {
        let l = Arc::unwrap_or_clone(l);
        if let Resource::Service(svc) = l.resource {
            let ns = svc.metadata.namespace().to_string();
            found.push(format!("{ns}/{}", svc.metadata.name));
            if svc.metadata.name == name && ns == namespace && hit.is_none() {
                hit = Some((svc, l.source));
            }
        }
    }
    let Some((svc, source)) = hit else {
        return Err(GatewayServiceError::ServiceNotFound {
            path: path.to_path_buf(),
            namespace: namespace.into(),
            name: name.into(),
            found,
        });
    };
    // The loader has validated the file; re-read its raw YAML for the untyped fields.
    let text = std::fs::read_to_string(&source.file).map_err(|e| GatewayServiceError::Read {
        path: source.file.clone(),
        reason: e.to_string(),
    })?;
    let extra = raw_spec(&text, source.document, source.list_item).unwrap_or_default();
    Ok((svc, extra))
}

/// The `spec` of document `document` (1-based), or of its `items[list_item]`, minus the
/// fields this module writes or the API server allocates.
fn raw_spec(text: &str, document: usize, list_item: Option<usize>) -> Option<Mapping> {
    use serde::Deserialize;
    let doc = serde_yaml::Deserializer::from_str(text).nth(document - 1)?;
    let value = Value::deserialize(doc).ok()?;
    let value = match list_item {
        Some(i) => value.get("items")?.get(i)?.clone(),
        None => value,
    };
    let mut spec = value.get("spec")?.as_mapping()?.clone();
    // `shift_remove` keeps the user's field order (plain `remove` swaps the last key in).
    for key in SPEC_FIELDS_REPLACED {
        spec.shift_remove(key);
    }
    Some(spec)
}

/// Renders the gateway's Service as YAML a user can `kubectl apply`.
///
/// `gateways`: loaded resources (non-Gateways are ignored). `selector`: the gateway pods'
/// labels, filtering Gateways as in [`run`]. `existing`: the Service as it is now, whose ports,
/// nodePorts, type, labels and annotations are kept. `name`/`namespace` name the Service.
pub fn render(
    gateways: &[Loaded],
    selector: Option<&Labels>,
    existing: Option<&Service>,
    name: &str,
    namespace: &str,
) -> Result<String, GatewayServiceError> {
    render_with(gateways, selector, existing, None, name, namespace)
}

/// One Gateway server port to expose.
struct Wanted {
    number: u16,
    /// The port name of the first server (in load order) on this number.
    name: String,
}

fn render_with<L: Borrow<Loaded>>(
    resources: &[L],
    selector: Option<&Labels>,
    existing: Option<&Service>,
    extra_spec: Option<&Mapping>,
    name: &str,
    namespace: &str,
) -> Result<String, GatewayServiceError> {
    let filter = selector.or(existing.map(|s| &s.spec.selector).filter(|s| !s.is_empty()));
    let gateways: Vec<&Loaded> = resources
        .iter()
        .map(Borrow::borrow)
        .filter(|l: &&Loaded| match &l.resource {
            Resource::Gateway(gw) => filter.is_none_or(|f| subset_of(&gw.spec.selector, f)),
            _ => false,
        })
        .collect();
    if gateways.is_empty() {
        let mut files: Vec<PathBuf> = resources
            .iter()
            .map(|l| l.borrow().source.file.clone())
            .collect();
        files.dedup();
        return Err(GatewayServiceError::NoGateways {
            files,
            selector: filter.map(labels_text),
        });
    }

    // In load order, so names are handed out first come first served: the seed's `tcp` on
    // 31400 keeps `tcp` when a later Gateway also names its port `tcp`.
    let mut wanted: Vec<Wanted> = Vec::new();
    let mut gateway_names = Vec::new();
    let mut gateway_selectors: BTreeSet<&Labels> = BTreeSet::new();
    for l in &gateways {
        let Resource::Gateway(gw) = &l.resource else {
            continue;
        };
        let id = format!("{}/{}", gw.metadata.namespace(), gw.metadata.name);
        gateway_selectors.insert(&gw.spec.selector);
        for server in &gw.spec.servers {
            let number = u16::try_from(server.port.number)
                .ok()
                .filter(|&n| n != 0)
                .ok_or_else(|| GatewayServiceError::PortOutOfRange {
                    at: l.source.to_string(),
                    gateway: id.clone(),
                    number: server.port.number,
                })?;
            if !wanted.iter().any(|w| w.number == number) {
                wanted.push(Wanted {
                    number,
                    name: server.port.name.clone(),
                });
            }
        }
        gateway_names.push(id);
    }

    let pod_selector = match existing.map(|s| &s.spec.selector).filter(|s| !s.is_empty()) {
        Some(s) => s.clone(),
        None => match selector {
            Some(s) => s.clone(),
            None => {
                let non_empty: Vec<&&Labels> =
                    gateway_selectors.iter().filter(|s| !s.is_empty()).collect();
                match non_empty.as_slice() {
                    [] => return Err(GatewayServiceError::NoSelector),
                    [one] => (**one).clone(),
                    many => {
                        return Err(GatewayServiceError::AmbiguousSelector {
                            selectors: many.iter().map(|s| labels_text(s)).collect(),
                        })
                    }
                }
            }
        },
    };

    let merged = merge_ports(
        existing.map(|s| s.spec.ports.as_slice()).unwrap_or(&[]),
        &wanted,
    )?;
    let added = merged.list(|c| matches!(c, Change::Added).then(String::new));
    let retargeted = merged.list(|c| match c {
        Change::Retargeted(was) => Some(format!(": {was} -> port")),
        _ => None,
    });
    let unused = merged.list(|c| matches!(c, Change::Unused).then(String::new));

    // Header: what a reviewer of the diff wants to know before applying it.
    let mut out = String::new();
    let _ = writeln!(
        out,
        "# Generated by `veer gateway-service` from Gateway{} {}.",
        if gateway_names.len() == 1 { "" } else { "s" },
        gateway_names.join(", ")
    );
    out.push_str("# veer listens on each Gateway server port itself, so targetPort = port.\n");
    let list = |ports: &[String]| {
        if ports.is_empty() {
            "none".to_string()
        } else {
            ports.join(", ")
        }
    };
    if existing.is_some() {
        let _ = writeln!(out, "# Added ports: {}", list(&added));
        if !retargeted.is_empty() {
            let _ = writeln!(out, "# targetPort changed: {}", list(&retargeted));
        }
        if !unused.is_empty() {
            let _ = writeln!(out, "# Kept, no Gateway uses: {}", list(&unused));
        }
    } else {
        let _ = writeln!(out, "# Ports: {}", list(&added));
    }

    let mut metadata = Mapping::new();
    metadata.insert("name".into(), name.into());
    metadata.insert("namespace".into(), namespace.into());
    let labels = match existing
        .map(|s| &*s.metadata.labels)
        .filter(|l| !l.is_empty())
    {
        Some(l) => l,
        None => &pod_selector,
    };
    metadata.insert("labels".into(), labels_value(labels));
    if let Some(svc) = existing {
        let annotations: Labels = svc
            .metadata
            .annotations
            .iter()
            .filter(|(k, _)| k.as_str() != LAST_APPLIED)
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        if !annotations.is_empty() {
            metadata.insert("annotations".into(), labels_value(&annotations));
        }
    }

    let mut spec = Mapping::new();
    let type_ = existing
        .and_then(|s| s.spec.type_.clone())
        .unwrap_or_else(|| "LoadBalancer".into());
    spec.insert("type".into(), type_.into());
    spec.insert("selector".into(), labels_value(&pod_selector));
    spec.insert(
        "ports".into(),
        Value::Sequence(merged.ports.iter().map(|(p, _)| port_value(p)).collect()),
    );
    for (k, v) in extra_spec.into_iter().flatten() {
        spec.insert(k.clone(), v.clone());
    }

    let mut doc = Mapping::new();
    doc.insert("apiVersion".into(), "v1".into());
    doc.insert("kind".into(), "Service".into());
    doc.insert("metadata".into(), Value::Mapping(metadata));
    doc.insert("spec".into(), Value::Mapping(spec));
    let yaml = serde_yaml::to_string(&Value::Mapping(doc))
        .map_err(|e| GatewayServiceError::Yaml(e.to_string()))?;
    out.push_str(&yaml);
    Ok(out)
}

/// Istio's selector semantics: every label of `selector` is on the workload.
fn subset_of(selector: &Labels, labels: &Labels) -> bool {
    selector.iter().all(|(k, v)| labels.get(k) == Some(v))
}

fn labels_value(labels: &Labels) -> Value {
    Value::Mapping(
        labels
            .iter()
            .map(|(k, v)| (Value::from(k.as_str()), Value::from(v.as_str())))
            .collect(),
    )
}

fn port_value(p: &ServicePort) -> Value {
    let mut m = Mapping::new();
    if let Some(name) = &p.name {
        m.insert("name".into(), name.as_str().into());
    }
    m.insert("port".into(), p.port.into());
    match &p.target_port {
        Some(IntOrString::Int(n)) => {
            m.insert("targetPort".into(), (*n).into());
        }
        Some(IntOrString::String(s)) => {
            m.insert("targetPort".into(), s.as_str().into());
        }
        None => {}
    }
    m.insert(
        "protocol".into(),
        p.protocol.as_deref().unwrap_or("TCP").into(),
    );
    if let Some(n) = p.node_port {
        m.insert("nodePort".into(), n.into());
    }
    if let Some(a) = &p.app_protocol {
        m.insert("appProtocol".into(), a.as_str().into());
    }
    Value::Mapping(m)
}

/// What happened to each port of the result, for the header comment.
enum Change {
    Added,
    /// An existing port a Gateway uses whose targetPort was not the port; the old value.
    Retargeted(String),
    /// An existing port a Gateway uses, already right.
    Unchanged,
    /// An existing port no Gateway uses.
    Unused,
}

struct Merged {
    /// Sorted by number.
    ports: Vec<(ServicePort, Change)>,
}

impl Merged {
    /// "28674 (tcp-28674), …" for the ports with the given change, by number.
    fn list(&self, pick: impl Fn(&Change) -> Option<String>) -> Vec<String> {
        self.ports
            .iter()
            .filter_map(|(p, c)| pick(c).map(|extra| format!("{}{extra}", describe(p))))
            .collect()
    }
}

fn is_tcp(p: &ServicePort) -> bool {
    p.protocol.as_deref().is_none_or(|s| s == "TCP")
}

fn merge_ports(existing: &[ServicePort], wanted: &[Wanted]) -> Result<Merged, GatewayServiceError> {
    let mut taken: BTreeSet<String> = existing.iter().filter_map(|p| p.name.clone()).collect();
    let mut ports = Vec::new();
    for p in existing {
        let mut p = p.clone();
        let used = is_tcp(&p) && wanted.iter().any(|w| u32::from(w.number) == p.port);
        let change = if !used {
            Change::Unused
        } else {
            let target = IntOrString::Int(p.port);
            let was = match p.target_port.replace(target.clone()) {
                Some(t) if t == target => None,
                Some(IntOrString::Int(n)) => Some(n.to_string()),
                Some(IntOrString::String(s)) => Some(s),
                None => Some("unset".into()),
            };
            was.map_or(Change::Unchanged, Change::Retargeted)
        };
        ports.push((p, change));
    }
    for w in wanted {
        let present = ports
            .iter()
            .any(|(p, _)| is_tcp(p) && p.port == u32::from(w.number));
        if present {
            continue;
        }
        let name = port_name(&w.name, w.number, &taken)?;
        taken.insert(name.clone());
        let port = ServicePort {
            name: Some(name),
            port: u32::from(w.number),
            target_port: Some(IntOrString::Int(u32::from(w.number))),
            protocol: Some("TCP".into()),
            node_port: None,
            app_protocol: None,
        };
        ports.push((port, Change::Added));
    }
    // By number (TCP before UDP on a shared number); stable, so equal keys keep their order.
    ports.sort_by_key(|(p, _)| (p.port, !is_tcp(p)));
    Ok(Merged { ports })
}

fn describe(p: &ServicePort) -> String {
    match &p.name {
        Some(n) => format!("{} ({n})", p.port),
        None => p.port.to_string(),
    }
}

/// A Kubernetes port name for a Gateway port: the Gateway's name made a valid IANA_SVC_NAME
/// (lowercase letters, digits, single hyphens, at most 15, at least one letter), then made
/// unique by trying fixed fallbacks in order, so the same input always gives the same names.
fn port_name(
    gateway_name: &str,
    number: u16,
    taken: &BTreeSet<String>,
) -> Result<String, GatewayServiceError> {
    let base = sanitize(gateway_name, MAX_PORT_NAME_LEN);
    let suffix = format!("-{number}");
    let mut candidates = Vec::new();
    if let Some(b) = &base {
        candidates.push(b.clone());
        if let Some(short) = sanitize(b, MAX_PORT_NAME_LEN - suffix.len()) {
            candidates.push(format!("{short}{suffix}"));
        }
    }
    candidates.extend([
        format!("tcp{suffix}"),
        format!("port{suffix}"),
        format!("gw{suffix}"),
    ]);
    candidates
        .into_iter()
        .find(|c| !taken.contains(c))
        .ok_or(GatewayServiceError::PortName { number })
}

/// Lowercases, turns runs of other characters into one hyphen, trims hyphens, cuts to `max`.
/// `None` if nothing valid is left or it has no letter (IANA_SVC_NAME requires one).
fn sanitize(raw: &str, max: usize) -> Option<String> {
    let mut s = String::new();
    for c in raw.chars() {
        let c = c.to_ascii_lowercase();
        if c.is_ascii_lowercase() || c.is_ascii_digit() {
            s.push(c);
        } else if !s.is_empty() && !s.ends_with('-') {
            s.push('-');
        }
    }
    s.truncate(max);
    let s = s.trim_end_matches('-').to_string();
    (!s.is_empty() && s.chars().any(|c| c.is_ascii_lowercase())).then_some(s)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::parse_documents;

    /// The seed's Gateway, as written there.
    const SEED_GATEWAY: &str = "\
apiVersion: networking.istio.io/v1alpha3
kind: Gateway
metadata:
  name: tcp-echo-gateway
spec:
  selector:
    istio: ingressgateway
  servers:
  - port:
      number: 31400

      name: tcp
      protocol: TCP
    hosts:
    - \"*\"
";

    fn gateway(name: &str, ports: &[(u32, &str)]) -> String {
        let servers: String = ports
            .iter()
            .map(|(n, pn)| {
                format!(
                    "  - port: {{number: {n}, name: {pn:?}, protocol: TCP}}\n    hosts: ['*']\n"
                )
            })
            .collect();
        format!(
            "apiVersion: networking.istio.io/v1alpha3\nkind: Gateway\nmetadata: {{name: {name}}}\n\
             spec:\n  selector: {{istio: ingressgateway}}\n  servers:\n{servers}"
        )
    }

    fn load(text: &str) -> Vec<Loaded> {
        parse_documents(text, Path::new("gw.yaml")).unwrap()
    }

    /// Renders and parses the result back, as `kubectl apply` would need it to.
    fn render_service(text: &str, existing: Option<&Service>) -> (String, Service) {
        let out = render(
            &load(text),
            None,
            existing,
            "istio-ingressgateway",
            "istio-system",
        )
        .unwrap();
        let back = parse_documents(&out, Path::new("out.yaml")).unwrap();
        assert_eq!(back.len(), 1, "{out}");
        let Resource::Service(svc) = back.into_iter().next().unwrap().resource else {
            panic!("not a Service:\n{out}")
        };
        (out, svc)
    }

    fn port(svc: &Service, number: u32) -> &ServicePort {
        svc.spec.ports.iter().find(|p| p.port == number).unwrap()
    }

    #[test]
    fn seed_gateway_alone() {
        let (out, svc) = render_service(SEED_GATEWAY, None);
        assert_eq!(svc.metadata.name, "istio-ingressgateway");
        assert_eq!(svc.metadata.namespace.as_deref(), Some("istio-system"));
        assert_eq!(svc.spec.type_.as_deref(), Some("LoadBalancer"));
        assert_eq!(
            svc.spec.selector,
            Labels::from([("istio".into(), "ingressgateway".into())])
        );
        assert_eq!(
            svc.spec.ports,
            vec![ServicePort {
                name: Some("tcp".into()),
                port: 31400,
                target_port: Some(IntOrString::Int(31400)),
                protocol: Some("TCP".into()),
                node_port: None,
                app_protocol: None,
            }]
        );
        assert!(out.starts_with(
            "# Generated by `veer gateway-service` from Gateway default/tcp-echo-gateway.\n"
        ));
        assert!(out.contains("# Ports: 31400 (tcp)\n"), "{out}");
    }

    #[test]
    fn two_gateways_give_both_ports_in_order() {
        let text = format!(
            "{}---\n{SEED_GATEWAY}",
            gateway("tcp-echo-gateway-28674", &[(28674, "tcp")])
        );
        let (out, svc) = render_service(&text, None);
        let ports: Vec<(u32, Option<&str>)> = svc
            .spec
            .ports
            .iter()
            .map(|p| (p.port, p.name.as_deref()))
            .collect();
        // Both servers are named `tcp`: the first loaded keeps it; ports are by number.
        assert_eq!(
            ports,
            vec![(28674, Some("tcp")), (31400, Some("tcp-31400"))],
            "{out}"
        );
        let (_, svc) = render_service(
            &format!("{SEED_GATEWAY}---\n{}", gateway("b", &[(28674, "tcp")])),
            None,
        );
        assert_eq!(port(&svc, 31400).name.as_deref(), Some("tcp"));
        assert_eq!(port(&svc, 28674).name.as_deref(), Some("tcp-28674"));
        assert!(
            out.contains("from Gateways default/tcp-echo-gateway-28674, default/tcp-echo-gateway.")
        );
    }

    #[test]
    fn existing_service_keeps_node_ports_and_other_ports() {
        let existing_yaml = "\
apiVersion: v1
kind: Service
metadata:
  name: istio-ingressgateway
  namespace: istio-system
  labels: {app: istio-ingressgateway, istio: ingressgateway}
  annotations:
    kubectl.kubernetes.io/last-applied-configuration: '{}'
    cloud.example/lb: internal
spec:
  type: NodePort
  clusterIP: 10.96.0.9
  selector: {app: istio-ingressgateway, istio: ingressgateway}
  ports:
  - {name: status-port, port: 15021, targetPort: 15021, protocol: TCP, nodePort: 30021}
  - {name: tcp, port: 31400, targetPort: 31400, protocol: TCP, nodePort: 31400}
  - {name: http2, port: 80, targetPort: 8080, protocol: TCP, nodePort: 31380}
";
        let Resource::Service(existing) = load(existing_yaml).remove(0).resource else {
            panic!()
        };
        let text = format!(
            "{SEED_GATEWAY}---\n{}",
            gateway("more", &[(28674, "tcp-28674"), (80, "http")])
        );
        let (out, svc) = render_service(&text, Some(&existing));
        let numbers: Vec<u32> = svc.spec.ports.iter().map(|p| p.port).collect();
        assert_eq!(numbers, vec![80, 15021, 28674, 31400], "{out}");
        assert_eq!(port(&svc, 31400).node_port, Some(31400));
        assert_eq!(port(&svc, 28674).node_port, None);
        assert_eq!(port(&svc, 28674).name.as_deref(), Some("tcp-28674"));
        assert_eq!(
            port(&svc, 80).target_port,
            Some(IntOrString::Int(80)),
            "veer listens on the Gateway port itself"
        );
        assert_eq!(port(&svc, 80).node_port, Some(31380));
        assert_eq!(port(&svc, 80).name.as_deref(), Some("http2"));
        assert_eq!(port(&svc, 15021), &existing.spec.ports[0]);
        assert_eq!(svc.spec.type_.as_deref(), Some("NodePort"));
        assert_eq!(svc.spec.selector, existing.spec.selector);
        assert_eq!(svc.metadata.labels, existing.metadata.labels);
        assert_eq!(svc.spec.cluster_ip, None, "allocated by the API server");
        assert_eq!(
            svc.metadata.annotations.keys().collect::<Vec<_>>(),
            vec!["cloud.example/lb"]
        );
        assert!(out.contains("# Added ports: 28674 (tcp-28674)\n"), "{out}");
        assert!(
            out.contains("# targetPort changed: 80 (http2): 8080 -> port\n"),
            "{out}"
        );
        assert!(
            out.contains("# Kept, no Gateway uses: 15021 (status-port)\n"),
            "{out}"
        );
    }

    #[test]
    fn port_names_are_sanitized_and_unique() {
        let text = gateway(
            "names",
            &[
                (1000, "TCP_Echo Server.Primary"),
                (1001, "TCP_Echo Server.Primary"),
                (1002, "31400"),
                (1003, ""),
                (1004, ""),
                (1005, "tcp-1004"),
                (1006, "--x--"),
            ],
        );
        let (out, svc) = render_service(&text, None);
        let names: Vec<&str> = svc
            .spec
            .ports
            .iter()
            .map(|p| p.name.as_deref().unwrap())
            .collect();
        assert_eq!(
            names,
            vec![
                "tcp-echo-server",
                "tcp-echo-s-1001",
                "tcp-1002",
                "tcp-1003",
                "tcp-1004",
                "tcp-1004-1005",
                "x",
            ],
            "{out}"
        );
        for n in &names {
            assert!(n.len() <= MAX_PORT_NAME_LEN && !n.contains("--"), "{n}");
        }
        // Deterministic: the same input gives the same output.
        assert_eq!(render_service(&text, None).0, out);
    }

    #[test]
    fn names_avoid_existing_ports() {
        let existing = Service {
            metadata: Default::default(),
            spec: crate::config::model::ServiceSpec {
                ports: vec![ServicePort {
                    name: Some("tcp".into()),
                    port: 9,
                    ..Default::default()
                }],
                ..Default::default()
            },
        };
        let (_, svc) = render_service(SEED_GATEWAY, Some(&existing));
        assert_eq!(port(&svc, 31400).name.as_deref(), Some("tcp-31400"));
        assert_eq!(port(&svc, 9).name.as_deref(), Some("tcp"));
    }

    #[test]
    fn selector_filters_gateways() {
        let egress = SEED_GATEWAY
            .replace("ingressgateway", "egressgateway")
            .replace("31400", "5555")
            .replace("tcp-echo-gateway", "egress");
        let loaded = load(&format!("{SEED_GATEWAY}---\n{egress}"));
        let ingress = parse_selector("istio=ingressgateway,app=x").unwrap();
        let out = render(&loaded, Some(&ingress), None, "gw", "ns").unwrap();
        assert!(out.contains("31400") && !out.contains("5555"), "{out}");
        // Two selectors and nothing to choose between them.
        let err = render(&loaded, None, None, "gw", "ns").unwrap_err();
        assert!(
            matches!(err, GatewayServiceError::AmbiguousSelector { .. }),
            "{err}"
        );
        let none = parse_selector("istio=other").unwrap();
        let err = render(&loaded, Some(&none), None, "gw", "ns")
            .unwrap_err()
            .to_string();
        assert_eq!(err, "no Gateway selecting istio=other in gw.yaml");
        assert!(parse_selector("novalue").is_err());
        assert!(parse_selector("").is_err());
    }

    #[test]
    fn bad_port_names_the_file() {
        let text = gateway("big", &[(70000, "tcp")]);
        let err = render(&load(&text), None, None, "gw", "ns")
            .unwrap_err()
            .to_string();
        assert!(
            err.starts_with("gw.yaml: document 1 (Gateway default/big): server port 70000"),
            "{err}"
        );
    }

    /// manifests/gateway/veer-ingressgateway.yaml ends with this tool's output for the two
    /// Gateway files next to it; regenerating must not change it.
    #[test]
    fn gateway_manifest_service_is_current() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("manifests/gateway");
        let files = [
            dir.join("tcp-echo-gateway-31400.yaml"),
            dir.join("tcp-echo-gateway-28674.yaml"),
        ];
        let generated = run(&files, None, "istio-ingressgateway", "istio-system", None).unwrap();
        let manifest_path = dir.join("veer-ingressgateway.yaml");
        let manifest = std::fs::read_to_string(&manifest_path).unwrap();
        assert!(
            manifest.ends_with(&generated),
            "{} is stale; its last document should be:\n{generated}",
            manifest_path.display()
        );
        // Everything in the directory loads (kinds veer does not read are skipped).
        let loaded = load_paths(&[dir]).unwrap();
        let kinds: Vec<&str> = loaded.resources.iter().map(|l| l.resource.kind()).collect();
        assert_eq!(kinds.iter().filter(|k| **k == "Gateway").count(), 2);
        assert_eq!(kinds.iter().filter(|k| **k == "Service").count(), 1);
    }

    #[test]
    fn run_loads_files_and_keeps_untyped_service_fields() {
        let dir = std::env::temp_dir().join(format!("veer-gwsvc-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let gw = dir.join("gw.yaml");
        std::fs::write(
            &gw,
            format!("{SEED_GATEWAY}---\n{}", gateway("b", &[(28674, "tcp")])),
        )
        .unwrap();
        let svc = dir.join("svc.yaml");
        std::fs::write(
            &svc,
            "apiVersion: v1\nkind: List\nitems:\n- apiVersion: v1\n  kind: Service\n  \
             metadata: {name: istio-ingressgateway, namespace: istio-system}\n  \
             spec:\n    externalTrafficPolicy: Local\n    clusterIPs: [10.0.0.1]\n    \
             selector: {istio: ingressgateway}\n    ports: [{name: tcp, port: 31400, nodePort: 31400}]\n",
        )
        .unwrap();
        let out = run(
            std::slice::from_ref(&gw),
            Some(&svc),
            "istio-ingressgateway",
            "istio-system",
            None,
        )
        .unwrap();
        assert!(out.contains("externalTrafficPolicy: Local"), "{out}");
        assert!(!out.contains("clusterIPs"), "{out}");
        assert!(out.contains("nodePort: 31400"), "{out}");
        assert!(out.contains("# Added ports: 28674 (tcp-28674)"), "{out}");

        let err = run(
            std::slice::from_ref(&gw),
            Some(&svc),
            "other",
            "istio-system",
            None,
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains("svc.yaml: no Service istio-system/other (found: istio-system/istio-ingressgateway)"), "{err}");
        let err = run(std::slice::from_ref(&svc), None, "x", "y", None)
            .unwrap_err()
            .to_string();
        assert!(
            err.starts_with("no Gateway in ") && err.contains("svc.yaml"),
            "{err}"
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
