//! Istio's validation rules, table-driven through the public API, and `veer validate`.
//!
//! Each case is one inline YAML config and what validation must say about it: valid, an error
//! at a field path (with a message fragment, and for some the line), or a warning.

use std::io::Write;
use std::path::Path;
use std::process::{Command, Stdio};

use veer::config::{parse_documents, validate, ConfigError, ConfigSet, Report};

/// A namespaced Istio resource; its `spec` starts on line 7.
fn istio(kind: &str, name: &str, spec: &str) -> String {
    format!(
        "apiVersion: networking.istio.io/v1beta1\nkind: {kind}\nmetadata:\n  name: {name}\n  namespace: prod\nspec:\n{spec}"
    )
}

fn vs(spec: &str) -> String {
    istio("VirtualService", "r", spec)
}

fn dr(spec: &str) -> String {
    istio("DestinationRule", "d", spec)
}

fn gw(spec: &str) -> String {
    istio("Gateway", "g", spec)
}

fn se(spec: &str) -> String {
    istio("ServiceEntry", "e", spec)
}

const SVC: &str = "apiVersion: v1\nkind: Service\nmetadata: {name: echo, namespace: prod}\nspec:\n  clusterIP: 10.96.0.10\n  ports: [{name: tcp, port: 9000}]\n";

const ROUTE: &str = "  hosts: [echo]\n  tcp:\n  - route: [{destination: {host: echo}}]\n";

fn with_svc(doc: String) -> String {
    format!("{SVC}---\n{doc}")
}

enum Expect {
    /// No errors (warnings allowed unless `clean`).
    Valid { clean: bool },
    /// An error at `field` whose message contains `text`, at `line` when given.
    Error {
        field: &'static str,
        text: &'static str,
        line: Option<usize>,
    },
    /// No errors, and a warning at `field` containing `text`.
    Warning {
        field: &'static str,
        text: &'static str,
    },
}

use Expect::*;

fn err(field: &'static str, text: &'static str) -> Expect {
    Error {
        field,
        text,
        line: None,
    }
}

fn err_at(field: &'static str, text: &'static str, line: usize) -> Expect {
    Error {
        field,
        text,
        line: Some(line),
    }
}

fn warn(field: &'static str, text: &'static str) -> Expect {
    Warning { field, text }
}

fn run(yaml: &str) -> Report {
    match parse_documents(yaml, Path::new("case.yaml")) {
        Ok(resources) => validate(&ConfigSet::new(vec![], resources)),
        Err(e) => Report {
            errors: e.0,
            warnings: vec![],
        },
    }
}

fn cases() -> Vec<(&'static str, String, Expect)> {
    vec![
        // ---- VirtualService ------------------------------------------------------------------
        (
            "seed 80/20 split",
            with_svc(vs("  hosts: [echo]\n  tcp:\n  - match: [{port: 9000}]\n    route:\n    - destination: {host: echo, port: {number: 9000}}\n      weight: 80\n    - destination: {host: echo.prod.svc.cluster.local}\n      weight: 20\n")),
            Valid { clean: true },
        ),
        (
            "weight typo",
            vs("  hosts: [echo]\n  tcp:\n  - route:\n    - destination: {host: echo}\n      wieght: 80\n"),
            err_at("spec.tcp[0].route[0].wieght", "did you mean `weight`?", 11),
        ),
        (
            "destinationSubnet typo",
            vs("  hosts: [echo]\n  tcp:\n  - match: [{destinationSubnet: [10.0.0.0/8]}]\n    route: [{destination: {host: echo}}]\n"),
            err_at("spec.tcp[0].match[0].destinationSubnet", "did you mean `destinationSubnets`?", 9),
        ),
        (
            "sni_hosts typo",
            vs("  hosts: [a.example.com]\n  tls:\n  - match: [{sni_hosts: [a.example.com]}]\n    route: [{destination: {host: echo}}]\n"),
            err("spec.tls[0].match[0].sni_hosts", "did you mean `sniHosts`?"),
        ),
        (
            "negative weight",
            vs("  hosts: [echo]\n  tcp:\n  - route:\n    - destination: {host: a}\n      weight: 100\n    - destination: {host: b}\n      weight: -5\n"),
            err_at("spec.tcp[0].route[1].weight", "must be zero or positive", 13),
        ),
        (
            "all weights zero",
            vs("  hosts: [echo]\n  tcp:\n  - route: [{destination: {host: a}}, {destination: {host: b}, weight: 0}]\n"),
            err("spec.tcp[0].route", "every destination has weight 0"),
        ),
        (
            "missing destination host",
            vs("  hosts: [echo]\n  tcp:\n  - route: [{destination: {subset: v1}}]\n"),
            err("spec.tcp[0].route[0].destination.host", "required"),
        ),
        (
            "star host with mesh",
            vs("  hosts: ['*']\n  tcp:\n  - route: [{destination: {host: echo}}]\n"),
            err("spec.hosts[0]", "not allowed for VirtualServices bound to the mesh"),
        ),
        (
            "wildcard in the middle",
            vs("  hosts: [foo.*.com]\n  tcp:\n  - route: [{destination: {host: echo}}]\n"),
            err("spec.hosts[0]", "wildcard"),
        ),
        (
            "port out of range",
            vs("  hosts: [echo]\n  tcp:\n  - match: [{port: 70000}]\n    route: [{destination: {host: echo}}]\n"),
            err("spec.tcp[0].match[0].port", "out of range 1-65535"),
        ),
        (
            "bad CIDR",
            vs("  hosts: [echo]\n  tcp:\n  - match: [{destinationSubnets: [10.0.0.0/33]}]\n    route: [{destination: {host: echo}}]\n"),
            err("spec.tcp[0].match[0].destinationSubnets[0]", "not an IP address or CIDR"),
        ),
        (
            "TLS route without match",
            vs("  hosts: [a.example.com]\n  tls:\n  - route: [{destination: {host: echo}}]\n"),
            err("spec.tls[0].match", "sniHosts"),
        ),
        (
            "SNI host outside the VirtualService hosts",
            vs("  hosts: ['*.example.com']\n  gateways: [g]\n  tls:\n  - match: [{sniHosts: [a.example.org]}]\n    route: [{destination: {host: echo}}]\n"),
            err("spec.tls[0].match[0].sniHosts[0]", "not covered by any of the VirtualService's hosts"),
        ),
        (
            "SNI host under a wildcard host",
            with_svc(vs("  hosts: ['*.example.com']\n  tls:\n  - match: [{sniHosts: [a.example.com, '*.b.example.com']}]\n    route: [{destination: {host: echo}}]\n")),
            Valid { clean: true },
        ),
        (
            "empty gateway reference",
            vs(&format!("  gateways: ['']\n{ROUTE}")),
            err("spec.gateways[0]", "not a gateway reference"),
        ),
        (
            "bad gateway name",
            vs(&format!("  gateways: [prod/Bad_Name]\n{ROUTE}")),
            err("spec.gateways[0]", "not a valid gateway name"),
        ),
        (
            "no routes",
            vs("  hosts: [echo]\n"),
            err("spec", "at least one of `tcp`, `tls` or `http`"),
        ),
        (
            "subset not a DNS label",
            vs("  hosts: [echo]\n  tcp:\n  - route: [{destination: {host: echo, subset: V_1}}]\n"),
            err("spec.tcp[0].route[0].destination.subset", "DNS-1123 label"),
        ),
        (
            "port selector without number",
            vs("  hosts: [echo]\n  tcp:\n  - route: [{destination: {host: echo, port: {}}}]\n"),
            err("spec.tcp[0].route[0].destination.port.number", "required"),
        ),
        // ---- DestinationRule -----------------------------------------------------------------
        (
            "full TCP policy",
            dr("  host: echo\n  trafficPolicy:\n    loadBalancer: {simple: ROUND_ROBIN}\n    connectionPool:\n      tcp: {maxConnections: 100, connectTimeout: 30ms, idleTimeout: 0s, maxConnectionDuration: 1h, tcpKeepalive: {time: 7200s, interval: 75s, probes: 9}}\n    outlierDetection: {consecutiveGatewayErrors: 5, interval: 10s, baseEjectionTime: 30s, maxEjectionPercent: 100}\n    portLevelSettings:\n    - port: {number: 9000}\n      loadBalancer: {consistentHash: {useSourceIp: true}}\n  subsets:\n  - name: v1\n    labels: {version: v1}\n    trafficPolicy: {loadBalancer: {simple: RANDOM}}\n"),
            Valid { clean: true },
        ),
        ("missing host", dr("  subsets: [{name: v1}]\n"), err("spec.host", "required")),
        (
            "duplicate subset",
            dr("  host: echo\n  subsets: [{name: v1}, {name: v1}]\n"),
            err("spec.subsets[1].name", "duplicate subset name"),
        ),
        (
            "subset name with capitals",
            dr("  host: echo\n  subsets: [{name: V1}]\n"),
            err("spec.subsets[0].name", "not a valid subset name"),
        ),
        (
            "connectTimeout 0s",
            dr("  host: echo\n  trafficPolicy: {connectionPool: {tcp: {connectTimeout: 0s}}}\n"),
            err("spec.trafficPolicy.connectionPool.tcp.connectTimeout", "minimum is 1ms"),
        ),
        (
            "sub-millisecond interval",
            dr("  host: echo\n  trafficPolicy: {outlierDetection: {interval: 1500us}}\n"),
            err("spec.trafficPolicy.outlierDetection.interval", "whole milliseconds"),
        ),
        (
            "negative maxConnections",
            dr("  host: echo\n  trafficPolicy: {connectionPool: {tcp: {maxConnections: -1}}}\n"),
            err("spec.trafficPolicy.connectionPool.tcp.maxConnections", "zero or positive"),
        ),
        (
            "maxEjectionPercent above 100",
            dr("  host: echo\n  trafficPolicy: {outlierDetection: {maxEjectionPercent: 150}}\n"),
            err("spec.trafficPolicy.outlierDetection.maxEjectionPercent", "0-100"),
        ),
        (
            "two consistent hash keys",
            dr("  host: echo\n  trafficPolicy: {loadBalancer: {consistentHash: {useSourceIp: true, httpHeaderName: x}}}\n"),
            err("spec.trafficPolicy.loadBalancer.consistentHash", "only one hash key"),
        ),
        (
            "load balancer enum typo",
            dr("  host: echo\n  trafficPolicy:\n    loadBalancer:\n      simple: ROUND_ROBN\n"),
            err_at("spec.trafficPolicy.loadBalancer.simple", "did you mean `ROUND_ROBIN`?", 10),
        ),
        (
            "empty traffic policy",
            dr("  host: echo\n  trafficPolicy: {}\n"),
            err("spec.trafficPolicy", "at least one field"),
        ),
        (
            "keepalive time 0s",
            dr("  host: echo\n  trafficPolicy: {connectionPool: {tcp: {tcpKeepalive: {time: 0s}}}}\n"),
            err("spec.trafficPolicy.connectionPool.tcp.tcpKeepalive.time", "1ms"),
        ),
        (
            "port-level settings without port",
            dr("  host: echo\n  trafficPolicy: {portLevelSettings: [{loadBalancer: {simple: RANDOM}}]}\n"),
            err("spec.trafficPolicy.portLevelSettings[0].port", "required"),
        ),
        (
            "deprecated consecutiveErrors",
            dr("  host: echo\n  trafficPolicy: {outlierDetection: {consecutiveErrors: 5}}\n"),
            warn("spec.trafficPolicy.outlierDetection.consecutiveErrors", "deprecated"),
        ),
        // ---- Gateway -------------------------------------------------------------------------
        (
            "gateway with a bound route",
            format!(
                "{}---\n{}",
                gw("  selector: {istio: ingressgateway}\n  servers:\n  - port: {number: 31400, name: tcp, protocol: TCP}\n    hosts: ['*']\n"),
                with_svc(vs("  hosts: ['*']\n  gateways: [g]\n  tcp:\n  - match: [{port: 31400}]\n    route: [{destination: {host: echo}}]\n"))
            ),
            Valid { clean: true },
        ),
        (
            "server without hosts",
            gw("  servers:\n  - port: {number: 31400, name: tcp, protocol: TCP}\n"),
            err("spec.servers[0].hosts", "at least one host"),
        ),
        (
            "server port without number",
            gw("  servers:\n  - port: {name: tcp, protocol: TCP}\n    hosts: ['*']\n"),
            err("spec.servers[0].port.number", "required"),
        ),
        (
            "protocol typo",
            gw("  servers:\n  - port: {number: 1, name: tcp, protocol: TPC}\n    hosts: ['*']\n"),
            err("spec.servers[0].port.protocol", "did you mean `TCP`?"),
        ),
        (
            "TLS server without tls settings",
            gw("  servers:\n  - port: {number: 443, name: tls, protocol: TLS}\n    hosts: ['*']\n"),
            err("spec.servers[0].tls", "required for TLS servers"),
        ),
        (
            "duplicate server port names",
            gw("  servers:\n  - port: {number: 1, name: tcp, protocol: TCP}\n    hosts: ['*']\n  - port: {number: 2, name: tcp, protocol: TCP}\n    hosts: ['*']\n"),
            err("spec.servers[1].port.name", "duplicate port name"),
        ),
        (
            "gateway port nobody routes",
            gw("  servers:\n  - port: {number: 31400, name: tcp, protocol: TCP}\n    hosts: ['*']\n"),
            warn("spec.servers[0].port", "no VirtualService routes port 31400"),
        ),
        // ---- ServiceEntry and WorkloadEntry --------------------------------------------------
        (
            "DNS service entry",
            se("  hosts: [db.example.com]\n  ports: [{number: 5432, name: tcp, protocol: TCP}]\n  resolution: DNS\n  endpoints: [{address: db1.example.com}, {address: 10.0.0.7, ports: {tcp: 15432}}]\n"),
            Valid { clean: true },
        ),
        (
            "NONE with endpoints",
            se("  hosts: [db.example.com]\n  ports: [{number: 5432, name: tcp}]\n  resolution: NONE\n  endpoints: [{address: 10.0.0.7}]\n"),
            err("spec.endpoints", "not allowed with resolution NONE"),
        ),
        (
            "duplicate port numbers",
            se("  hosts: [db.example.com]\n  ports: [{number: 5432, name: a}, {number: 5432, name: b}]\n"),
            err("spec.ports[1].number", "defined twice"),
        ),
        (
            "STATIC endpoint with a name",
            se("  hosts: [db.example.com]\n  ports: [{number: 5432, name: tcp}]\n  resolution: STATIC\n  endpoints: [{address: db1.example.com}]\n"),
            err("spec.endpoints[0].address", "resolution STATIC needs IPs"),
        ),
        (
            "DNS endpoint that is no name",
            se("  hosts: [db.example.com]\n  ports: [{number: 5432, name: tcp}]\n  resolution: DNS\n  endpoints: [{address: 'not a host!'}]\n"),
            err("spec.endpoints[0].address", "not an IP address or a DNS name"),
        ),
        (
            "star host",
            se("  hosts: ['*']\n  ports: [{number: 5432, name: tcp}]\n"),
            err("spec.hosts[0]", "not allowed in a ServiceEntry"),
        ),
        (
            "CIDR with DNS resolution",
            se("  hosts: [db.example.com]\n  addresses: [10.0.0.0/24]\n  ports: [{number: 5432, name: tcp}]\n  resolution: DNS\n"),
            err("spec.resolution", "CIDR addresses are allowed only"),
        ),
        (
            "workload entry without address",
            istio("WorkloadEntry", "w", "  labels: {app: echo}\n"),
            err("spec.address", "required"),
        ),
        (
            "workload entry",
            istio("WorkloadEntry", "w", "  address: 10.0.0.9\n  labels: {app: echo}\n  ports: {tcp: 9000}\n"),
            Valid { clean: true },
        ),
        // ---- cross-resource warnings -----------------------------------------------------------
        (
            "subset no DestinationRule defines",
            format!(
                "{}---\n{}",
                dr("  host: echo\n  subsets: [{name: v1}]\n"),
                with_svc(vs("  hosts: [echo]\n  tcp:\n  - route: [{destination: {host: echo, subset: v2}}]\n"))
            ),
            warn("spec.tcp[0].route[0].destination.subset", "subset \"v2\" is not defined"),
        ),
        (
            "destination no service owns",
            vs("  hosts: [echo]\n  tcp:\n  - route: [{destination: {host: nowhere}}]\n"),
            warn("spec.tcp[0].route[0].destination.host", "nowhere.prod.svc.cluster.local is not a Service or ServiceEntry host"),
        ),
        (
            "rule after a catch-all",
            with_svc(vs("  hosts: [echo]\n  tcp:\n  - route: [{destination: {host: echo}}]\n  - match: [{port: 9000}]\n    route: [{destination: {host: echo}}]\n")),
            warn("spec.tcp[1]", "can never match"),
        ),
        (
            "rule with a repeated match block",
            with_svc(vs("  hosts: [echo]\n  tcp:\n  - match: [{port: 9000}]\n    route: [{destination: {host: echo}}]\n  - match: [{port: 9000}]\n    route: [{destination: {host: echo}}]\n")),
            warn("spec.tcp[1]", "repeats one of an earlier rule"),
        ),
    ]
}

#[test]
fn validation_table() {
    let cases = cases();
    assert!(cases.len() >= 30);
    let mut failures = Vec::new();
    for (name, yaml, expect) in &cases {
        let report = run(yaml);
        let errors: Vec<String> = report.errors.iter().map(|e| e.to_string()).collect();
        let warnings: Vec<String> = report.warnings.iter().map(|w| w.to_string()).collect();
        let ok = match expect {
            Valid { clean } => errors.is_empty() && (!clean || warnings.is_empty()),
            Error { field, text, line } => report.errors.iter().any(|e| match e {
                ConfigError::Field(f) => {
                    f.field == *field
                        && e.to_string().contains(text)
                        && line.is_none_or(|l| f.line == Some(l))
                        // Every error names the file, the document and the resource.
                        && e.to_string().starts_with("case.yaml:")
                        && e.to_string().contains(": document ")
                }
                _ => false,
            }),
            Warning { field, text } => {
                errors.is_empty()
                    && report
                        .warnings
                        .iter()
                        .any(|w| w.field == *field && w.message.contains(text) && w.line.is_some())
            }
        };
        if !ok {
            failures.push(format!(
                "{name}:\n  errors: {errors:#?}\n  warnings: {warnings:#?}"
            ));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

#[test]
fn the_proxy_compiler_uses_the_same_rules() {
    use veer::routing::{compile, OutboundTrafficPolicy, ProxyIdentity, ProxyMode};
    let compile_yaml = |yaml: &str| {
        let resources = parse_documents(yaml, Path::new("case.yaml")).unwrap();
        compile(
            ConfigSet::new(vec![], resources),
            ProxyIdentity {
                namespace: "prod".into(),
                labels: Default::default(),
                mode: ProxyMode::Sidecar,
            },
            OutboundTrafficPolicy::AllowAny,
            1,
        )
    };
    let err = compile_yaml(&dr("  host: echo\n  subsets: [{name: v1}, {name: v1}]\n"))
        .unwrap_err()
        .to_string();
    assert!(err.contains("spec.subsets[1].name"), "{err}");
    let snap = compile_yaml(&with_svc(vs(
        "  hosts: [echo]\n  tcp:\n  - route: [{destination: {host: echo, subset: v9}}]\n",
    )))
    .unwrap();
    assert!(
        snap.warnings.iter().any(|w| w.contains("subset \"v9\"")),
        "{:?}",
        snap.warnings
    );
}

// ---- the `veer validate` command ------------------------------------------------------------

fn veer_validate(args: &[&str], stdin: Option<&str>) -> (i32, String, String) {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_veer"));
    cmd.arg("validate")
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = cmd.spawn().expect("run veer");
    let mut input = child.stdin.take().unwrap();
    if let Some(text) = stdin {
        // A veer that exits early (usage error) closes the pipe; the exit code tells.
        let _ = input.write_all(text.as_bytes());
    }
    drop(input);
    let out = child.wait_with_output().unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn temp_file(name: &str, text: &str) -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(format!("veer-validate-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join(name);
    std::fs::write(&path, text).unwrap();
    path
}

#[test]
fn cli_valid_file_exits_0() {
    let path = temp_file(
        "good.yaml",
        &with_svc(vs(
            "  hosts: [echo]\n  tcp:\n  - route: [{destination: {host: echo}}]\n",
        )),
    );
    let (code, out, err) = veer_validate(&[path.to_str().unwrap()], None);
    assert_eq!(code, 0, "stdout: {out}\nstderr: {err}");
    assert!(out.contains("valid"), "{out}");
    assert!(!err.contains("error:"), "{err}");
}

#[test]
fn cli_typo_exits_1_with_position_and_suggestion() {
    let text = with_svc(vs(
        "  hosts: [echo]\n  tcp:\n  - route:\n    - destination: {host: echo}\n      wieght: 80\n",
    ));
    let path = temp_file("typo.yaml", &text);
    let (code, _out, err) = veer_validate(&[path.to_str().unwrap()], None);
    assert_eq!(code, 1, "{err}");
    // The Service takes 6 lines and `---` one, so the VirtualService starts on line 8 and
    // `wieght` is its 11th line.
    let want = format!("error: {}:18:7: document 2 (VirtualService prod/r): field `spec.tcp[0].route[0].wieght`: unknown field `wieght`; did you mean `weight`?", path.display());
    assert!(err.contains(&want), "want {want}\nin {err}");
}

#[test]
fn cli_reads_stdin_and_prints_warnings() {
    let text = vs("  hosts: [echo]\n  tcp:\n  - route: [{destination: {host: echo}}]\n");
    let (code, out, err) = veer_validate(&["-"], Some(&text));
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("1 resource"), "{out}");
    assert!(
        err.contains("warning: <stdin>:9:28: document 1 (VirtualService prod/r): field `spec.tcp[0].route[0].destination.host`"),
        "{err}"
    );
    let (code, _, err) = veer_validate(&["-"], Some("kind: [unclosed\n"));
    assert_eq!(code, 1, "{err}");
    assert!(
        err.contains("error: <stdin>:2:1: document 1: invalid YAML"),
        "{err}"
    );
}

#[test]
fn cli_usage_errors_exit_2() {
    let (code, _, _) = veer_validate(&[], None);
    assert_eq!(code, 2);
}
