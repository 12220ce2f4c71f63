//! The sidecar itself: what one pod template gets, decided by its labels and annotations.
//!
//! Works on `serde_yaml` values rather than typed structs so that every field of the user's
//! pod spec — including ones newer than any Kubernetes types crate — survives untouched, in
//! its original order. Everything veer adds is listed in the status annotation, which is what
//! makes injection idempotent: an injected template is first stripped of exactly those
//! entries (keys stay where they are) and injected again, giving the same value.

use serde_yaml::{Mapping, Value};

use super::Options;

/// Istio's injection switch: a label (wins) or an annotation on the pod template.
pub const INJECT: &str = "sidecar.istio.io/inject";
/// What was injected, as JSON; Istio's injector skips pods that carry it.
pub const STATUS: &str = "sidecar.istio.io/status";
pub const PROXY_CONFIG: &str = "proxy.istio.io/config";
const INCLUDE_OUTBOUND_IP_RANGES: &str = "traffic.sidecar.istio.io/includeOutboundIPRanges";
const EXCLUDE_OUTBOUND_IP_RANGES: &str = "traffic.sidecar.istio.io/excludeOutboundIPRanges";
const INCLUDE_INBOUND_PORTS: &str = "traffic.sidecar.istio.io/includeInboundPorts";
const EXCLUDE_INBOUND_PORTS: &str = "traffic.sidecar.istio.io/excludeInboundPorts";
const INCLUDE_OUTBOUND_PORTS: &str = "traffic.sidecar.istio.io/includeOutboundPorts";
const EXCLUDE_OUTBOUND_PORTS: &str = "traffic.sidecar.istio.io/excludeOutboundPorts";
const EXCLUDE_INTERFACES: &str = "traffic.sidecar.istio.io/excludeInterfaces";
const KUBEVIRT_INTERFACES: &str = "traffic.sidecar.istio.io/kubevirtInterfaces";
const PROXY_CPU: &str = "sidecar.istio.io/proxyCPU";
const PROXY_MEMORY: &str = "sidecar.istio.io/proxyMemory";
const PROXY_CPU_LIMIT: &str = "sidecar.istio.io/proxyCPULimit";
const PROXY_MEMORY_LIMIT: &str = "sidecar.istio.io/proxyMemoryLimit";
const DEFAULT_CONTAINER: &str = "kubectl.kubernetes.io/default-container";
const INTERCEPTION_MODE: &str = "sidecar.istio.io/interceptionMode";

pub const INIT_NAME: &str = "veer-init";
pub const PROXY_NAME: &str = "veer-proxy";
pub const CONFIG_VOLUME: &str = "veer-config";
pub const PODINFO_VOLUME: &str = "veer-podinfo";
pub const CONFIG_DIR: &str = "/etc/veer/config";
pub const PODINFO_DIR: &str = "/etc/veer/podinfo";

/// The proxy's uid and gid (Istio's), excluded from capture by veer-init.
pub const PROXY_UID: i64 = 1337;
pub const OUTBOUND_PORT: u16 = 15001;
pub const INBOUND_PORT: u16 = 15006;
/// Health port: `GET /healthz/ready`, served on the pod IP for the kubelet's probes.
pub const HEALTH_PORT: u16 = 15021;
/// Prometheus metrics (`GET /stats/prometheus`) on the pod IP, Envoy's port in Istio.
pub const METRICS_PORT: u16 = 15090;
/// Never captured inbound: Prometheus (15090), health (15021), merged metrics (15020).
pub const EXCLUDED_INBOUND_PORTS: &str = "15090,15021,15020";
/// Prometheus's pod annotations (the `kubernetes-pods` scrape job of the community charts).
const SCRAPE: &str = "prometheus.io/scrape";
const SCRAPE_PORT: &str = "prometheus.io/port";
const SCRAPE_PATH: &str = "prometheus.io/path";
/// Namespaces Istio's injector never touches.
const IGNORED_NAMESPACES: [&str; 2] = ["kube-system", "kube-public"];

/// The workload a pod template belongs to, for messages and kind-specific advice.
pub struct Workload<'a> {
    pub kind: &'a str,
    pub namespace: Option<&'a str>,
}

/// What happened to one pod template.
#[derive(Debug, PartialEq, Eq)]
pub enum Outcome {
    Injected,
    /// Opted out (label or annotation `sidecar.istio.io/inject: "false"`); silent, like Istio.
    OptedOut,
    /// Not injected, with the reason (printed as a warning).
    Skipped(String),
}

/// Injects the sidecar into `template` (a Pod, or a workload's `spec.template`).
pub fn inject_template(
    template: &mut Mapping,
    workload: &Workload<'_>,
    opts: &Options,
    warnings: &mut Vec<String>,
) -> Result<Outcome, String> {
    let labels = string_map(template, &["metadata", "labels"])?;
    let annotations = string_map(template, &["metadata", "annotations"])?;
    let spec = match template.get("spec") {
        Some(Value::Mapping(m)) => m,
        _ => return Err("the pod template has no `spec`".into()),
    };

    if spec.get("hostNetwork").and_then(Value::as_bool) == Some(true) {
        return Ok(Outcome::Skipped(
            "not injected: hostNetwork pods share the node's network namespace, where \
             veer-init would capture the node's traffic"
                .into(),
        ));
    }
    if let Some(ns) = workload
        .namespace
        .filter(|ns| IGNORED_NAMESPACES.contains(ns))
    {
        return Ok(Outcome::Skipped(format!(
            "not injected: namespace {ns} is never injected (as with Istio)"
        )));
    }
    let switch = labels
        .iter()
        .find(|(k, _)| k == INJECT)
        .or_else(|| annotations.iter().find(|(k, _)| k == INJECT));
    if let Some((_, value)) = switch {
        match value.to_ascii_lowercase().as_str() {
            "y" | "yes" | "true" | "on" | "enable" | "enabled" => {}
            "" => {}
            "n" | "no" | "false" | "off" | "disable" | "disabled" => return Ok(Outcome::OptedOut),
            other => {
                warnings.push(format!(
                    "{INJECT}: {other:?} is not a boolean; taken as \"false\" (as Istio does)"
                ));
                return Ok(Outcome::OptedOut);
            }
        }
    }

    // Already injected: undo exactly what the status annotation lists, then inject again, so
    // the result depends only on the user's part of the template and the options.
    if let Some((_, status)) = annotations.iter().find(|(k, _)| k == STATUS) {
        match Status::parse(status) {
            Some(status) => status.strip(template),
            None => {
                return Ok(Outcome::Skipped(format!(
                    "not injected: already injected by something else ({STATUS} does not \
                     come from veer)"
                )))
            }
        }
    }

    let Some(mode) = interception(&annotations)? else {
        return Ok(Outcome::Skipped(format!(
            "not injected: {INTERCEPTION_MODE} NONE (no capture) is not supported: veer \
             proxies captured traffic only"
        )));
    };
    let init_args = init_args(&annotations, mode)?;
    let hold = hold_application(&annotations, warnings)?;
    let resources = resources(&annotations);

    let spec = mapping_at(template, &["spec"])?;
    check_names(spec)?;
    let first_app = match spec.get("containers") {
        Some(Value::Sequence(c)) if !c.is_empty() => {
            c[0].get("name").and_then(Value::as_str).map(str::to_string)
        }
        None | Some(Value::Null) | Some(Value::Sequence(_)) => {
            return Err("the pod template has no `spec.containers`".into())
        }
        Some(_) => return Err("`spec.containers` is not a list".into()),
    };

    let init = init_container(opts, init_args, resources.clone());
    let mut proxy = proxy_container(opts, resources, mode);
    let mut status = Status::default();
    if opts.native_sidecar {
        // Kubernetes >= 1.29: an init container with restartPolicy Always runs for the pod's
        // whole life, starts before the app containers (after its startupProbe passes, so the
        // app never starts before the proxy) and is stopped after them: Jobs complete.
        let p = proxy.as_mapping_mut().expect("container is a mapping");
        insert_after(p, "name", "restartPolicy", s("Always"));
        p.insert(
            s("startupProbe"),
            map([
                ("httpGet", health_get()),
                ("periodSeconds", n(1)),
                ("timeoutSeconds", n(3)),
                ("failureThreshold", n(600)),
            ]),
        );
        let inits = seq_at(spec, "initContainers")?;
        inits.insert(0, proxy);
        inits.insert(0, init);
        status.init_containers = vec![INIT_NAME.into(), PROXY_NAME.into()];
    } else {
        // After the app's own init containers, which so keep their network: nothing would
        // answer on 15001 while init containers run.
        seq_at(spec, "initContainers")?.push(init);
        status.init_containers = vec![INIT_NAME.into()];
        let containers = seq_at(spec, "containers")?;
        if hold {
            // The kubelet starts containers in order and waits for a postStart hook to
            // finish before starting the next one: the app starts once the proxy is ready.
            let p = proxy.as_mapping_mut().expect("container is a mapping");
            p.insert(
                s("lifecycle"),
                map([(
                    "postStart",
                    map([("exec", map([("command", list(["veer", "wait"]))]))]),
                )]),
            );
            containers.insert(0, proxy);
        } else {
            containers.push(proxy);
        }
        status.containers = vec![PROXY_NAME.into()];
        if matches!(workload.kind, "Job" | "CronJob") {
            warnings.push(
                "the veer-proxy container keeps running after the job's containers exit, so \
                 the Job never completes: use --native-sidecar (Kubernetes >= 1.29), or have \
                 the job end with `POST http://127.0.0.1:15000/quitquitquit`"
                    .into(),
            );
        }
    }
    let volumes = seq_at(spec, "volumes")?;
    volumes.push(map([
        ("name", s(CONFIG_VOLUME)),
        ("configMap", map([("name", s(&opts.config_map))])),
    ]));
    volumes.push(map([
        ("name", s(PODINFO_VOLUME)),
        (
            "downwardAPI",
            map([(
                "items",
                Value::Sequence(vec![map([
                    ("path", s("labels")),
                    ("fieldRef", field_ref("metadata.labels")),
                ])]),
            )]),
        ),
    ]));
    status.volumes = vec![CONFIG_VOLUME.into(), PODINFO_VOLUME.into()];

    let annotations = mapping_at(template, &["metadata", "annotations"])?;
    if let Some(app) = first_app {
        // So `kubectl logs/exec` without -c picks the app, not the proxy.
        if !annotations.contains_key(DEFAULT_CONTAINER) {
            annotations.insert(s(DEFAULT_CONTAINER), s(&app));
            status.annotations.push(DEFAULT_CONTAINER.into());
        }
    }
    // Prometheus finds the proxy's metrics by the usual pod annotations, as with Istio. A
    // template that has any of its own keeps them all: they point at the app's metrics, and
    // veer does not merge the two on one port as Istio's 15020 does.
    let own = [SCRAPE, SCRAPE_PORT, SCRAPE_PATH]
        .iter()
        .any(|k| annotations.contains_key(*k));
    let opted_out = annotations
        .get(SCRAPE)
        .and_then(scalar_text)
        .is_some_and(|v| v.eq_ignore_ascii_case("false"));
    if !own {
        for (key, value) in [
            (SCRAPE, "true".to_string()),
            (SCRAPE_PORT, METRICS_PORT.to_string()),
            (SCRAPE_PATH, "/stats/prometheus".to_string()),
        ] {
            annotations.insert(s(key), s(&value));
            status.annotations.push(key.into());
        }
    } else if !opted_out {
        warnings.push(format!(
            "the pod's own prometheus.io annotations are kept (they describe the app's metrics): \
             the proxy's metrics (port {METRICS_PORT} `http-envoy-prom`, /stats/prometheus) \
             are not merged into the app's as Istio's port 15020 does; scrape them with a \
             second job or PodMonitor"
        ));
    }
    annotations.insert(s(STATUS), s(&status.to_json()));
    Ok(Outcome::Injected)
}

/// How inbound traffic is intercepted (`sidecar.istio.io/interceptionMode`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Interception {
    /// NAT: the app sees connections from 127.0.0.6 (Istio's default).
    Redirect,
    /// The app sees the real client; the proxy needs CAP_NET_ADMIN.
    Tproxy,
}

impl Interception {
    fn flag(self) -> &'static str {
        match self {
            Interception::Redirect => "REDIRECT",
            Interception::Tproxy => "TPROXY",
        }
    }
}

/// The template's interception mode; `None` for `NONE` (no capture at all).
pub fn interception(annotations: &[(String, String)]) -> Result<Option<Interception>, String> {
    let Some((_, value)) = annotations.iter().find(|(k, _)| k == INTERCEPTION_MODE) else {
        return Ok(Some(Interception::Redirect));
    };
    match value.trim().to_ascii_uppercase().as_str() {
        "REDIRECT" => Ok(Some(Interception::Redirect)),
        "TPROXY" => Ok(Some(Interception::Tproxy)),
        "NONE" => Ok(None),
        _ => Err(format!(
            "annotation {INTERCEPTION_MODE}: {value:?} is not an interception mode (expected \
             REDIRECT or TPROXY)"
        )),
    }
}

/// `veer-init`'s arguments: istio-iptables flags from the template's annotations, with the
/// defaults of Istio's injection template.
pub fn init_args(
    annotations: &[(String, String)],
    mode: Interception,
) -> Result<Vec<String>, String> {
    // Lists are passed on normalised (`a, b` → `a,b`); Istio passes them as written.
    let get = |key: &str| {
        annotations.iter().find(|(k, _)| k == key).map(|(_, v)| {
            v.split(',')
                .map(str::trim)
                .filter(|x| !x.is_empty())
                .collect::<Vec<_>>()
                .join(",")
        })
    };
    let include_ranges = get(INCLUDE_OUTBOUND_IP_RANGES).unwrap_or_else(|| "*".into());
    check_cidrs(INCLUDE_OUTBOUND_IP_RANGES, &include_ranges, true)?;
    let exclude_ranges = get(EXCLUDE_OUTBOUND_IP_RANGES).unwrap_or_default();
    check_cidrs(EXCLUDE_OUTBOUND_IP_RANGES, &exclude_ranges, false)?;
    let include_inbound = get(INCLUDE_INBOUND_PORTS).unwrap_or_else(|| "*".into());
    check_ports(INCLUDE_INBOUND_PORTS, &include_inbound, true)?;
    let mut exclude_inbound = EXCLUDED_INBOUND_PORTS.to_string();
    if let Some(extra) = get(EXCLUDE_INBOUND_PORTS) {
        check_ports(EXCLUDE_INBOUND_PORTS, &extra, false)?;
        for port in extra.split(',').map(str::trim).filter(|p| !p.is_empty()) {
            if !exclude_inbound.split(',').any(|p| p == port) {
                exclude_inbound.push(',');
                exclude_inbound.push_str(port);
            }
        }
    }
    let mut args: Vec<String> = [
        "-p",
        &OUTBOUND_PORT.to_string(),
        "-z",
        &INBOUND_PORT.to_string(),
        "-u",
        &PROXY_UID.to_string(),
        "-m",
        mode.flag(),
        "-i",
        &include_ranges,
        "-x",
        &exclude_ranges,
        "-b",
        &include_inbound,
        "-d",
        &exclude_inbound,
    ]
    .iter()
    .map(|a| a.to_string())
    .collect();
    for (flag, key) in [
        ("-q", INCLUDE_OUTBOUND_PORTS),
        ("-o", EXCLUDE_OUTBOUND_PORTS),
    ] {
        if let Some(v) = get(key) {
            check_ports(key, &v, false)?;
            args.extend([flag.to_string(), v]);
        }
    }
    for (flag, key) in [("-k", KUBEVIRT_INTERFACES), ("-c", EXCLUDE_INTERFACES)] {
        if let Some(v) = get(key) {
            args.extend([flag.to_string(), v]);
        }
    }
    Ok(args)
}

fn check_cidrs(key: &str, value: &str, star_ok: bool) -> Result<(), String> {
    if star_ok && value == "*" {
        return Ok(());
    }
    for item in value.split(',').map(str::trim).filter(|c| !c.is_empty()) {
        let ok = item.parse::<ipnet::IpNet>().is_ok() || item.parse::<std::net::IpAddr>().is_ok();
        if !ok {
            return Err(format!(
                "annotation {key}: {item:?} is not a CIDR (expected e.g. 10.96.0.0/12{})",
                if star_ok { ", or *" } else { "" }
            ));
        }
    }
    Ok(())
}

fn check_ports(key: &str, value: &str, star_ok: bool) -> Result<(), String> {
    if star_ok && value == "*" {
        return Ok(());
    }
    for item in value.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        if !matches!(item.parse::<u16>(), Ok(p) if p > 0) {
            return Err(format!(
                "annotation {key}: {item:?} is not a port number (expected a comma-separated \
                 list like 8080,8443{})",
                if star_ok { ", or *" } else { "" }
            ));
        }
    }
    Ok(())
}

/// `holdApplicationUntilProxyStarts` from `proxy.istio.io/config` (YAML or JSON ProxyConfig).
fn hold_application(
    annotations: &[(String, String)],
    warnings: &mut Vec<String>,
) -> Result<bool, String> {
    let Some((_, text)) = annotations.iter().find(|(k, _)| k == PROXY_CONFIG) else {
        return Ok(false);
    };
    let config: Value = serde_yaml::from_str(text)
        .map_err(|e| format!("annotation {PROXY_CONFIG}: not YAML or JSON: {e}"))?;
    let Value::Mapping(config) = config else {
        if config.is_null() {
            return Ok(false);
        }
        return Err(format!(
            "annotation {PROXY_CONFIG}: expected a ProxyConfig mapping"
        ));
    };
    let mut hold = false;
    let mut ignored = Vec::new();
    for (k, v) in &config {
        match k.as_str() {
            Some("holdApplicationUntilProxyStarts") => {
                hold = match v {
                    Value::Bool(b) => *b,
                    Value::String(s) if s == "true" || s == "false" => s == "true",
                    _ => {
                        return Err(format!(
                            "annotation {PROXY_CONFIG}: holdApplicationUntilProxyStarts must \
                             be true or false"
                        ))
                    }
                }
            }
            Some(other) => ignored.push(other.to_string()),
            None => ignored.push(format!("{k:?}")),
        }
    }
    if !ignored.is_empty() {
        warnings.push(format!(
            "annotation {PROXY_CONFIG}: veer only honours holdApplicationUntilProxyStarts; \
             ignored: {}",
            ignored.join(", ")
        ));
    }
    Ok(hold)
}

/// The proxy's resources; Istio's `sidecar.istio.io/proxy{CPU,Memory}[Limit]` override them.
fn resources(annotations: &[(String, String)]) -> Value {
    let get = |key: &str, default: &str| {
        annotations
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.trim().to_string())
            .unwrap_or_else(|| default.to_string())
    };
    map([
        (
            "requests",
            map([
                ("cpu", s(&get(PROXY_CPU, "100m"))),
                ("memory", s(&get(PROXY_MEMORY, "64Mi"))),
            ]),
        ),
        (
            "limits",
            map([
                ("cpu", s(&get(PROXY_CPU_LIMIT, "2"))),
                ("memory", s(&get(PROXY_MEMORY_LIMIT, "1Gi"))),
            ]),
        ),
    ])
}

fn init_container(opts: &Options, args: Vec<String>, resources: Value) -> Value {
    map([
        ("name", s(INIT_NAME)),
        ("image", s(&opts.image)),
        ("imagePullPolicy", s("IfNotPresent")),
        ("command", list(["veer-init"])),
        ("args", list(args.iter().map(String::as_str))),
        ("resources", resources),
        (
            "securityContext",
            map([
                ("allowPrivilegeEscalation", Value::Bool(false)),
                (
                    "capabilities",
                    map([
                        ("add", list(["NET_ADMIN", "NET_RAW"])),
                        ("drop", list(["ALL"])),
                    ]),
                ),
                ("privileged", Value::Bool(false)),
                // iptables-restore takes its lock under /run.
                ("readOnlyRootFilesystem", Value::Bool(false)),
                ("runAsGroup", n(0)),
                ("runAsNonRoot", Value::Bool(false)),
                ("runAsUser", n(0)),
            ]),
        ),
    ])
}

fn proxy_container(opts: &Options, resources: Value, mode: Interception) -> Value {
    let mut args = vec![
        "proxy".to_string(),
        "--config".into(),
        CONFIG_DIR.into(),
        "--pod-labels-file".into(),
        format!("{PODINFO_DIR}/labels"),
        "--health-addr".into(),
        format!("0.0.0.0:{HEALTH_PORT}"),
        "--metrics-addr".into(),
        format!("0.0.0.0:{METRICS_PORT}"),
    ];
    if mode == Interception::Tproxy {
        args.extend(["--interception-mode".into(), "tproxy".into()]);
    }
    map([
        ("name", s(PROXY_NAME)),
        ("image", s(&opts.image)),
        ("imagePullPolicy", s("IfNotPresent")),
        ("args", list(args.iter().map(String::as_str))),
        (
            "env",
            Value::Sequence(vec![
                env_field("POD_NAME", "metadata.name"),
                // Read by `veer proxy --namespace` (sourceNamespace, short host names).
                env_field("POD_NAMESPACE", "metadata.namespace"),
                env_field("INSTANCE_IP", "status.podIP"),
            ]),
        ),
        (
            "ports",
            Value::Sequence(vec![map([
                ("containerPort", n(i64::from(METRICS_PORT))),
                // Istio's name for it, which scrape configs and PodMonitors select.
                ("name", s("http-envoy-prom")),
                ("protocol", s("TCP")),
            ])]),
        ),
        (
            "readinessProbe",
            map([
                ("httpGet", health_get()),
                ("initialDelaySeconds", n(1)),
                ("periodSeconds", n(2)),
                ("timeoutSeconds", n(3)),
                ("failureThreshold", n(30)),
            ]),
        ),
        ("resources", resources),
        ("securityContext", proxy_security(mode)),
        (
            "volumeMounts",
            Value::Sequence(vec![
                map([
                    ("name", s(CONFIG_VOLUME)),
                    ("mountPath", s(CONFIG_DIR)),
                    ("readOnly", Value::Bool(true)),
                ]),
                map([
                    ("name", s(PODINFO_VOLUME)),
                    ("mountPath", s(PODINFO_DIR)),
                    ("readOnly", Value::Bool(true)),
                ]),
            ]),
        ),
    ])
}

/// Uid/gid 1337 and no capabilities; with TPROXY, as Istio: CAP_NET_ADMIN (the inbound
/// forwarder connects to the app from the client's address) and therefore uid 0, because
/// Kubernetes grants a non-root user no capabilities it could use (no ambient set). The
/// group stays 1337, which is how veer-init's rules tell the proxy's own traffic apart; the
/// proxy drops every capability but CAP_NET_ADMIN once its listeners are bound.
fn proxy_security(mode: Interception) -> Value {
    let tproxy = mode == Interception::Tproxy;
    let capabilities = if tproxy {
        map([("add", list(["NET_ADMIN"])), ("drop", list(["ALL"]))])
    } else {
        map([("drop", list(["ALL"]))])
    };
    map([
        ("allowPrivilegeEscalation", Value::Bool(false)),
        ("capabilities", capabilities),
        ("privileged", Value::Bool(false)),
        ("readOnlyRootFilesystem", Value::Bool(true)),
        ("runAsGroup", n(PROXY_UID)),
        ("runAsNonRoot", Value::Bool(!tproxy)),
        ("runAsUser", n(if tproxy { 0 } else { PROXY_UID })),
    ])
}

fn health_get() -> Value {
    map([
        ("path", s("/healthz/ready")),
        ("port", n(i64::from(HEALTH_PORT))),
    ])
}

fn field_ref(path: &str) -> Value {
    map([("apiVersion", s("v1")), ("fieldPath", s(path))])
}

fn env_field(name: &str, path: &str) -> Value {
    map([
        ("name", s(name)),
        ("valueFrom", map([("fieldRef", field_ref(path))])),
    ])
}

/// What veer added to a template, kept in the status annotation as JSON (Istio's shape, plus
/// `"proxy":"veer"` to tell it from Istio's own).
#[derive(Default, Debug, PartialEq, Eq)]
struct Status {
    init_containers: Vec<String>,
    containers: Vec<String>,
    volumes: Vec<String>,
    annotations: Vec<String>,
}

impl Status {
    fn to_json(&self) -> String {
        let list = |v: &[String]| serde_json::to_string(v).expect("strings serialize");
        format!(
            "{{\"proxy\":\"veer\",\"initContainers\":{},\"containers\":{},\"volumes\":{},\"annotations\":{}}}",
            list(&self.init_containers),
            list(&self.containers),
            list(&self.volumes),
            list(&self.annotations),
        )
    }

    fn parse(text: &str) -> Option<Status> {
        let v: serde_json::Value = serde_json::from_str(text).ok()?;
        if v.get("proxy")?.as_str()? != "veer" {
            return None;
        }
        let names = |key: &str| -> Vec<String> {
            v.get(key)
                .and_then(serde_json::Value::as_array)
                .map(|a| {
                    a.iter()
                        .filter_map(|x| x.as_str().map(str::to_string))
                        .collect()
                })
                .unwrap_or_default()
        };
        Some(Status {
            init_containers: names("initContainers"),
            containers: names("containers"),
            volumes: names("volumes"),
            annotations: names("annotations"),
        })
    }

    /// Removes what this status lists. Keys stay (possibly as empty lists), so injecting
    /// again puts everything back where it was.
    fn strip(&self, template: &mut Mapping) {
        if let Some(Value::Mapping(spec)) = template.get_mut("spec") {
            for (key, names) in [
                ("initContainers", &self.init_containers),
                ("containers", &self.containers),
                ("volumes", &self.volumes),
            ] {
                if let Some(Value::Sequence(items)) = spec.get_mut(key) {
                    items.retain(|item| {
                        !item
                            .get("name")
                            .and_then(Value::as_str)
                            .is_some_and(|n| names.iter().any(|x| x == n))
                    });
                }
            }
        }
        if let Some(Value::Mapping(meta)) = template.get_mut("metadata") {
            if let Some(Value::Mapping(ann)) = meta.get_mut("annotations") {
                ann.shift_remove(STATUS);
                for key in &self.annotations {
                    ann.shift_remove(key.as_str());
                }
            }
        }
    }
}

/// Fails when the template already has a container or volume by one of veer's names.
fn check_names(spec: &Mapping) -> Result<(), String> {
    for (key, names) in [
        ("initContainers", &[INIT_NAME, PROXY_NAME][..]),
        ("containers", &[INIT_NAME, PROXY_NAME][..]),
        ("volumes", &[CONFIG_VOLUME, PODINFO_VOLUME][..]),
    ] {
        if let Some(Value::Sequence(items)) = spec.get(key) {
            for item in items {
                if let Some(name) = item.get("name").and_then(Value::as_str) {
                    if names.contains(&name) {
                        return Err(format!(
                            "`spec.{key}` already has an entry named {name:?}, which veer \
                             injects (and the template has no veer status annotation)"
                        ));
                    }
                }
            }
        }
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Small helpers over serde_yaml values.

fn s(text: &str) -> Value {
    Value::String(text.to_string())
}

fn n(number: i64) -> Value {
    Value::Number(number.into())
}

fn list<'a>(items: impl IntoIterator<Item = &'a str>) -> Value {
    Value::Sequence(items.into_iter().map(s).collect())
}

fn map<const N: usize>(entries: [(&str, Value); N]) -> Value {
    Value::Mapping(entries.into_iter().map(|(k, v)| (s(k), v)).collect())
}

/// Inserts `key` right after `after` (serde_yaml mappings keep insertion order).
fn insert_after(m: &mut Mapping, after: &str, key: &str, value: Value) {
    let entries: Vec<(Value, Value)> = std::mem::take(m).into_iter().collect();
    for (k, v) in entries {
        let is_anchor = k.as_str() == Some(after);
        m.insert(k, v);
        if is_anchor {
            m.insert(s(key), value.clone());
        }
    }
    if !m.contains_key(key) {
        m.insert(s(key), value);
    }
}

/// The mapping at `path`, created (at the end of its parent) when absent or null.
pub fn mapping_at<'a>(root: &'a mut Mapping, path: &[&str]) -> Result<&'a mut Mapping, String> {
    let mut cur = root;
    for (i, key) in path.iter().enumerate() {
        let entry = cur
            .entry(s(key))
            .or_insert_with(|| Value::Mapping(Mapping::new()));
        if entry.is_null() {
            *entry = Value::Mapping(Mapping::new());
        }
        cur = match entry {
            Value::Mapping(m) => m,
            _ => return Err(format!("`{}` is not a mapping", path[..=i].join("."))),
        };
    }
    Ok(cur)
}

/// The list at `spec.<key>`, created when absent or null.
fn seq_at<'a>(spec: &'a mut Mapping, key: &str) -> Result<&'a mut Vec<Value>, String> {
    let entry = spec
        .entry(s(key))
        .or_insert_with(|| Value::Sequence(Vec::new()));
    if entry.is_null() {
        *entry = Value::Sequence(Vec::new());
    }
    match entry {
        Value::Sequence(items) => Ok(items),
        _ => Err(format!("`spec.{key}` is not a list")),
    }
}

/// A string-to-string map (labels, annotations) at `path`, in order; empty when absent.
/// Non-string scalars are taken as written (`true` → "true").
fn string_map(root: &Mapping, path: &[&str]) -> Result<Vec<(String, String)>, String> {
    let mut cur = root;
    for (i, key) in path.iter().enumerate() {
        match cur.get(*key) {
            None | Some(Value::Null) => return Ok(Vec::new()),
            Some(Value::Mapping(m)) => cur = m,
            Some(_) => return Err(format!("`{}` is not a mapping", path[..=i].join("."))),
        }
    }
    let mut out = Vec::new();
    for (k, v) in cur {
        let key = scalar_text(k)
            .ok_or_else(|| format!("`{}` has a key that is not a string", path.join(".")))?;
        let value =
            scalar_text(v).ok_or_else(|| format!("`{}.{key}` is not a string", path.join(".")))?;
        out.push((key, value));
    }
    Ok(out)
}

fn scalar_text(v: &Value) -> Option<String> {
    match v {
        Value::String(s) => Some(s.clone()),
        Value::Bool(b) => Some(b.to_string()),
        Value::Number(n) => Some(n.to_string()),
        Value::Null => Some(String::new()),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ann(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn default_init_args_are_istios() {
        let args = init_args(&[], Interception::Redirect).unwrap();
        assert_eq!(
            args.join(" "),
            "-p 15001 -z 15006 -u 1337 -m REDIRECT -i * -x  -b * -d 15090,15021,15020"
        );
        // The list veer-init's own tests run with.
        assert_eq!(args, veer_init::flags::ISTIO_INJECTED_ARGS);
    }

    #[test]
    fn annotations_change_init_args() {
        let args = init_args(
            &ann(&[
                (INCLUDE_OUTBOUND_IP_RANGES, "10.96.0.0/12, 10.244.0.0/16"),
                (EXCLUDE_OUTBOUND_IP_RANGES, "10.96.0.1/32"),
                (INCLUDE_INBOUND_PORTS, "9000,9001"),
                (EXCLUDE_INBOUND_PORTS, "15020,8081"),
                (INCLUDE_OUTBOUND_PORTS, "5432"),
                (EXCLUDE_OUTBOUND_PORTS, "3306,6379"),
            ]),
            Interception::Redirect,
        )
        .unwrap();
        assert_eq!(
            args.join(" "),
            "-p 15001 -z 15006 -u 1337 -m REDIRECT -i 10.96.0.0/12,10.244.0.0/16 \
             -x 10.96.0.1/32 -b 9000,9001 -d 15090,15021,15020,8081 -q 5432 -o 3306,6379"
        );
    }

    #[test]
    fn interception_mode_annotation() {
        assert_eq!(interception(&[]), Ok(Some(Interception::Redirect)));
        let mode = |v: &str| interception(&ann(&[(INTERCEPTION_MODE, v)]));
        assert_eq!(mode("TPROXY"), Ok(Some(Interception::Tproxy)));
        assert_eq!(mode("redirect"), Ok(Some(Interception::Redirect)));
        assert_eq!(mode("NONE"), Ok(None));
        let e = mode("TPROX").unwrap_err();
        assert!(
            e.contains(INTERCEPTION_MODE) && e.contains("\"TPROX\""),
            "{e}"
        );
        let args = init_args(&[], Interception::Tproxy).unwrap().join(" ");
        assert!(args.contains("-m TPROXY"), "{args}");
    }

    #[test]
    fn bad_annotations_are_errors() {
        let e = init_args(
            &ann(&[(EXCLUDE_INBOUND_PORTS, "80,http")]),
            Interception::Redirect,
        )
        .unwrap_err();
        assert!(
            e.contains("excludeInboundPorts") && e.contains("\"http\""),
            "{e}"
        );
        let e = init_args(
            &ann(&[(INCLUDE_OUTBOUND_IP_RANGES, "10.0.0.0/33")]),
            Interception::Redirect,
        )
        .unwrap_err();
        assert!(e.contains("not a CIDR"), "{e}");
        assert!(init_args(
            &ann(&[(EXCLUDE_OUTBOUND_IP_RANGES, "*")]),
            Interception::Redirect
        )
        .is_err());
    }

    #[test]
    fn status_round_trips() {
        let st = Status {
            init_containers: vec![INIT_NAME.into()],
            containers: vec![PROXY_NAME.into()],
            volumes: vec![CONFIG_VOLUME.into()],
            annotations: vec![],
        };
        assert_eq!(Status::parse(&st.to_json()), Some(st));
        assert_eq!(
            Status::parse(r#"{"initContainers":["istio-init"],"containers":["istio-proxy"]}"#),
            None
        );
    }
}
