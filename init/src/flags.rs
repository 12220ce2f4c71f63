//! Command line, with istio-iptables' flag names and meanings so that an
//! existing injector template can call veer-init unchanged.
//!
//! Values are parsed into typed selections here, so the planner never sees a
//! malformed port or CIDR and clap reports the offending flag by name.

use std::fmt;
use std::net::IpAddr;
use std::str::FromStr;
use std::time::Duration;

use clap::{Parser, ValueEnum};

use crate::Error;

/// The arguments Istio's injector (`istioctl kube-inject`, the webhook) passes to
/// istio-iptables for a default sidecar: outbound to 15001, inbound to 15006, the proxy's
/// uid 1337 exempt, every outbound CIDR and inbound port captured except the proxy's own
/// ports. veer-init must accept them unchanged.
pub const ISTIO_INJECTED_ARGS: &[&str] = &[
    "-p",
    "15001",
    "-z",
    "15006",
    "-u",
    "1337",
    "-m",
    "REDIRECT",
    "-i",
    "*",
    "-x",
    "",
    "-b",
    "*",
    "-d",
    "15090,15021,15020",
];

#[derive(Debug, Clone, Parser)]
#[command(
    name = "veer-init",
    version,
    // Like istio-iptables (pflag): a repeated flag takes its last value.
    args_override_self = true,
    about = "Install the iptables rules that capture a pod's TCP traffic for the veer sidecar",
    long_about = "Install the iptables rules that capture a pod's TCP traffic for the veer sidecar.\n\
                  Flags follow istio-iptables. The rules are applied with one \
                  `iptables-restore --noflush` per IP family (IPv6 when the pod has a global \
                  IPv6 address or with --dual-stack); re-running with the same flags changes \
                  nothing.\n\n\
                  Needs CAP_NET_ADMIN and CAP_NET_RAW, and drops every other capability before \
                  touching the system. Afterwards a self-check proves that a connection from \
                  the proxy uid to 127.0.0.6 (::6) is redirected to the proxy ports, before the \
                  proxy starts; as root this needs CAP_SETUID and CAP_SETGID at start-up to \
                  open that connection as the proxy uid, and is skipped with a warning without \
                  them (or run `--run-validation --skip-rule-apply` as the proxy uid).\n\n\
                  Not supported: DNS capture (--redirect-dns is accepted and ignored)."
)]
pub struct Flags {
    /// Port to which all outbound TCP traffic is redirected (the proxy's outbound listener).
    #[arg(short = 'p', long = "envoy-port", default_value = "15001", value_parser = parse_port)]
    pub envoy_port: u16,

    /// Port to which all inbound TCP traffic is redirected (the proxy's inbound listener).
    #[arg(short = 'z', long = "inbound-capture-port", default_value = "15006", value_parser = parse_port)]
    pub inbound_capture_port: u16,

    /// Tunnel port; inbound traffic to it is never captured.
    #[arg(short = 'e', long = "inbound-tunnel-port", default_value = "15008", value_parser = parse_port)]
    pub inbound_tunnel_port: u16,

    /// Comma separated uids whose traffic is not captured (the proxy's uid).
    #[arg(short = 'u', long = "proxy-uid", default_value = "1337", value_parser = parse_ids)]
    pub proxy_uid: Ids,

    /// Comma separated gids whose traffic is not captured [default: the --proxy-uid values].
    #[arg(short = 'g', long = "proxy-gid", value_parser = parse_ids)]
    pub proxy_gid: Option<Ids>,

    /// How inbound connections reach the proxy.
    #[arg(
        short = 'm',
        long = "istio-inbound-interception-mode",
        value_enum,
        ignore_case = true,
        default_value = "REDIRECT"
    )]
    pub interception_mode: InterceptionMode,

    /// Outbound CIDRs to capture: `*` for all, a comma separated list, or empty for none.
    #[arg(short = 'i', long = "istio-service-cidr", default_value = "", value_parser = parse_cidr_selection)]
    pub service_cidr: CidrSelection,

    /// Outbound CIDRs never to capture (comma separated).
    #[arg(short = 'x', long = "istio-service-exclude-cidr", default_value = "", value_parser = parse_cidr_list)]
    pub service_exclude_cidr: CidrList,

    /// Inbound ports to capture: `*` for all, a comma separated list, or empty for none.
    #[arg(short = 'b', long = "istio-inbound-ports", default_value = "", value_parser = parse_port_selection)]
    pub inbound_ports: PortSelection,

    /// Inbound ports never to capture; only used with `-b '*'`.
    #[arg(short = 'd', long = "istio-local-exclude-ports", default_value = "", value_parser = parse_port_list)]
    pub inbound_exclude_ports: PortList,

    /// Outbound ports to capture even when their destination is not in --istio-service-cidr.
    #[arg(
        short = 'q',
        long = "istio-outbound-ports",
        alias = "istio-include-outbound-ports",
        default_value = "",
        value_parser = parse_port_list
    )]
    pub outbound_ports: PortList,

    /// Outbound ports never to capture.
    #[arg(short = 'o', long = "istio-local-outbound-ports-exclude", default_value = "", value_parser = parse_port_list)]
    pub outbound_exclude_ports: PortList,

    /// Print the iptables-restore input for each IP family and change nothing.
    #[arg(short = 'n', long = "dry-run")]
    pub dry_run: bool,

    /// Remove the rules and chains veer-init installed, then exit.
    #[arg(long = "cleanup-only")]
    pub cleanup_only: bool,

    /// Which iptables implementation to drive (veer-only; istio-iptables has no such flag).
    #[arg(
        long = "iptables-backend",
        env = "VEER_IPTABLES_BACKEND",
        value_enum,
        default_value = "auto"
    )]
    pub iptables_backend: BackendChoice,

    /// TPROXY mode: the packet mark that routes captured inbound packets to the proxy.
    #[arg(short = 't', long = "istio-inbound-tproxy-mark", default_value = "1337", value_parser = parse_mark)]
    pub tproxy_mark: u32,

    /// TPROXY mode: the routing table that delivers marked packets locally.
    #[arg(short = 'r', long = "istio-inbound-tproxy-route-table", default_value = "133", value_parser = parse_route_table)]
    pub tproxy_route_table: u32,

    /// Interfaces whose traffic is never captured, in either direction (comma separated).
    #[arg(short = 'c', long = "istio-exclude-interfaces", default_value = "", value_parser = parse_interfaces)]
    pub exclude_interfaces: Interfaces,

    /// Virtual interfaces (e.g. KubeVirt's) whose incoming traffic is treated as outbound: sent
    /// to --envoy-port when its destination is in --istio-service-cidr, never to the inbound port.
    #[arg(
        short = 'k',
        long = "kube-virt-interfaces",
        alias = "reroute-virtual-interfaces",
        default_value = "",
        value_parser = parse_interfaces
    )]
    pub kube_virt_interfaces: Interfaces,

    /// Drop packets conntrack marks INVALID (e.g. out-of-window segments) instead of letting
    /// them reset captured connections.
    #[arg(long = "drop-invalid", env = "INVALID_DROP")]
    pub drop_invalid: bool,

    /// Capture IPv6 as well (ip6tables), even when the pod has no global IPv6 address yet.
    /// Without it, IPv6 is captured when an interface other than lo has a global IPv6 address.
    #[arg(long = "dual-stack")]
    pub dual_stack: bool,

    /// Accepted for istio-iptables compatibility and ignored: veer has no DNS proxy on 15053,
    /// so DNS is never redirected.
    #[arg(long = "redirect-dns", alias = "capture-all-dns")]
    pub redirect_dns: bool,

    /// Make the capture self-check mandatory: fail if it cannot run. With --skip-rule-apply it
    /// is the only thing done (istio's validation container, run as the proxy uid).
    #[arg(long = "run-validation")]
    pub run_validation: bool,

    /// Do not install rules (istio-iptables compatible); combine with --run-validation.
    #[arg(long = "skip-rule-apply")]
    pub skip_rule_apply: bool,

    /// Do not run the capture self-check after installing the rules.
    #[arg(long = "skip-validation", conflicts_with = "run_validation")]
    pub skip_validation: bool,

    /// Self-check: the port of the probe connection to 127.0.0.6 (and ::6), which the rules
    /// must redirect to the proxy ports. Nothing needs to listen on it.
    #[arg(long = "iptables-probe-port", default_value = "15002", value_parser = parse_port)]
    pub probe_port: u16,

    /// Self-check: how long the probe may take, e.g. `5s`, `500ms`.
    #[arg(long = "probe-timeout", default_value = "5s", value_parser = parse_duration)]
    pub probe_timeout: Duration,

    /// Internal: the self-check's probe client, started by veer-init as the proxy uid.
    #[arg(long = "probe-client", hide = true)]
    pub probe_client: bool,
}

impl Flags {
    /// The gids to exempt: istio defaults them to the uids.
    pub fn proxy_gids(&self) -> &Ids {
        self.proxy_gid.as_ref().unwrap_or(&self.proxy_uid)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum InterceptionMode {
    #[value(name = "REDIRECT")]
    Redirect,
    #[value(name = "TPROXY")]
    Tproxy,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum BackendChoice {
    /// iptables-legacy if it already holds rules, else iptables-nft, else iptables.
    Auto,
    /// Always iptables-legacy.
    Legacy,
    /// Always iptables-nft.
    Nft,
}

/// A list of numeric uids or gids.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Ids(pub Vec<u32>);

/// A list of ports, deduplicated, in the order given.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PortList(pub Vec<u16>);

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PortSelection {
    All,
    Only(PortList),
}

impl PortSelection {
    pub fn is_none(&self) -> bool {
        matches!(self, PortSelection::Only(list) if list.0.is_empty())
    }
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CidrList(pub Vec<Cidr>);

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CidrSelection {
    All,
    Only(CidrList),
}

/// An address prefix with its host bits cleared, so the text we hand to
/// iptables is the text iptables-save prints back.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cidr {
    addr: IpAddr,
    prefix: u8,
}

impl Cidr {
    pub fn addr(&self) -> IpAddr {
        self.addr
    }

    pub fn prefix(&self) -> u8 {
        self.prefix
    }

    pub fn is_ipv4(&self) -> bool {
        self.addr.is_ipv4()
    }

    pub fn is_loopback(&self) -> bool {
        self.addr.is_loopback()
    }
}

impl FromStr for Cidr {
    type Err = Error;

    fn from_str(s: &str) -> Result<Self, Error> {
        let invalid = |reason: &str| Error::InvalidCidr {
            value: s.to_string(),
            reason: reason.to_string(),
        };
        let (addr, prefix) = s
            .split_once('/')
            .ok_or_else(|| invalid("missing the `/prefix` length"))?;
        let addr: IpAddr = addr
            .parse()
            .map_err(|_| invalid("the address part is not an IP address"))?;
        let prefix: u8 = prefix
            .parse()
            .map_err(|_| invalid("the prefix length is not a number"))?;
        let addr = match addr {
            IpAddr::V4(v4) => {
                if prefix > 32 {
                    return Err(invalid("an IPv4 prefix length is at most 32"));
                }
                let mask = u32::MAX.checked_shl(32 - u32::from(prefix)).unwrap_or(0);
                IpAddr::V4((u32::from(v4) & mask).into())
            }
            IpAddr::V6(v6) => {
                if prefix > 128 {
                    return Err(invalid("an IPv6 prefix length is at most 128"));
                }
                let mask = u128::MAX.checked_shl(128 - u32::from(prefix)).unwrap_or(0);
                IpAddr::V6((u128::from(v6) & mask).into())
            }
        };
        Ok(Cidr { addr, prefix })
    }
}

impl fmt::Display for Cidr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.addr, self.prefix)
    }
}

/// Splits istio's comma separated lists; blank entries (e.g. a trailing
/// comma from a templated annotation) are skipped rather than rejected.
fn items(s: &str) -> impl Iterator<Item = &str> {
    s.split(',').map(str::trim).filter(|item| !item.is_empty())
}

pub fn parse_port(s: &str) -> Result<u16, Error> {
    let invalid = |reason: &str| Error::InvalidPort {
        value: s.to_string(),
        reason: reason.to_string(),
    };
    let n: u32 = s
        .trim()
        .parse()
        .map_err(|_| invalid("expected a number from 1 to 65535"))?;
    match u16::try_from(n) {
        Ok(port) if port != 0 => Ok(port),
        _ => Err(invalid("ports range from 1 to 65535")),
    }
}

pub fn parse_port_list(s: &str) -> Result<PortList, Error> {
    let mut ports = Vec::new();
    for item in items(s) {
        if item == "*" {
            return Err(Error::WildcardNotAllowed(
                "this flag takes an explicit list of ports",
            ));
        }
        let port = parse_port(item)?;
        if !ports.contains(&port) {
            ports.push(port);
        }
    }
    Ok(PortList(ports))
}

pub fn parse_port_selection(s: &str) -> Result<PortSelection, Error> {
    if s.trim() == "*" {
        Ok(PortSelection::All)
    } else {
        parse_port_list(s).map(PortSelection::Only)
    }
}

pub fn parse_cidr_list(s: &str) -> Result<CidrList, Error> {
    let mut cidrs = Vec::new();
    for item in items(s) {
        if item == "*" {
            // istio-iptables refuses this too: excluding everything would
            // silently disable outbound capture; say so with -i "" instead.
            return Err(Error::WildcardNotAllowed(
                "to capture no outbound traffic, pass an empty --istio-service-cidr instead",
            ));
        }
        let cidr: Cidr = item.parse()?;
        if !cidrs.contains(&cidr) {
            cidrs.push(cidr);
        }
    }
    Ok(CidrList(cidrs))
}

pub fn parse_cidr_selection(s: &str) -> Result<CidrSelection, Error> {
    if s.trim() == "*" {
        Ok(CidrSelection::All)
    } else {
        parse_cidr_list(s).map(CidrSelection::Only)
    }
}

/// Interface names as iptables takes them (`-i`/`-o`): at most 15 bytes, with
/// iptables' trailing `+` wildcard allowed.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Interfaces(pub Vec<String>);

pub fn parse_interfaces(s: &str) -> Result<Interfaces, Error> {
    let mut names = Vec::new();
    for item in items(s) {
        let invalid = |reason: &str| Error::InvalidInterface {
            value: item.to_string(),
            reason: reason.to_string(),
        };
        if item.len() > 15 {
            return Err(invalid("interface names are at most 15 bytes long"));
        }
        if item == "." || item == ".." {
            return Err(invalid("not an interface name"));
        }
        if let Some(c) = item
            .chars()
            .find(|c| !(c.is_ascii_alphanumeric() || "-_.@:+".contains(*c)))
        {
            return Err(invalid(&format!(
                "`{c}` cannot appear in an interface name"
            )));
        }
        if !names.iter().any(|n| n == item) {
            names.push(item.to_string());
        }
    }
    Ok(Interfaces(names))
}

pub fn parse_mark(s: &str) -> Result<u32, Error> {
    let n = parse_u32(s)?;
    if n == 0 {
        return Err(Error::InvalidNumber {
            value: s.to_string(),
            reason: "the mark must not be 0 (unmarked packets carry 0)".to_string(),
        });
    }
    Ok(n)
}

pub fn parse_route_table(s: &str) -> Result<u32, Error> {
    let n = parse_u32(s)?;
    // 0 is "unspec"; 253-255 are the kernel's default, main and local tables.
    if n == 0 || (253..=255).contains(&n) {
        return Err(Error::InvalidNumber {
            value: s.to_string(),
            reason: "0, 253 (default), 254 (main) and 255 (local) are reserved route tables"
                .to_string(),
        });
    }
    Ok(n)
}

fn parse_u32(s: &str) -> Result<u32, Error> {
    let t = s.trim();
    let parsed = match t.strip_prefix("0x").or_else(|| t.strip_prefix("0X")) {
        Some(hex) => u32::from_str_radix(hex, 16),
        None => t.parse(),
    };
    parsed.map_err(|_| Error::InvalidNumber {
        value: s.to_string(),
        reason: "expected a number from 1 to 4294967295".to_string(),
    })
}

/// Go-style durations as istio-iptables takes them (`5s`, `500ms`, `1m`), or plain seconds.
pub fn parse_duration(s: &str) -> Result<Duration, Error> {
    let t = s.trim();
    let invalid = || Error::InvalidDuration(s.to_string());
    let split = t
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(t.len());
    let (number, unit) = t.split_at(split);
    let number: f64 = number.parse().map_err(|_| invalid())?;
    let seconds = match unit {
        "" | "s" => number,
        "ms" => number / 1000.0,
        "m" => number * 60.0,
        _ => return Err(invalid()),
    };
    if !(seconds > 0.0 && seconds <= 3600.0) {
        return Err(invalid());
    }
    Ok(Duration::from_secs_f64(seconds))
}

pub fn parse_ids(s: &str) -> Result<Ids, Error> {
    let mut ids = Vec::new();
    for item in items(s) {
        let id: u32 = item.parse().map_err(|_| Error::InvalidId {
            value: item.to_string(),
            reason: "expected a non-negative number".to_string(),
        })?;
        if !ids.contains(&id) {
            ids.push(id);
        }
    }
    if ids.is_empty() {
        return Err(Error::InvalidId {
            value: s.to_string(),
            reason: "at least one id is required".to_string(),
        });
    }
    Ok(Ids(ids))
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    fn parse(args: &[&str]) -> Result<Flags, clap::Error> {
        Flags::try_parse_from(std::iter::once("veer-init").chain(args.iter().copied()))
    }

    #[test]
    fn defaults_match_istio_iptables() {
        let f = parse(&[]).unwrap();
        assert_eq!(f.envoy_port, 15001);
        assert_eq!(f.inbound_capture_port, 15006);
        assert_eq!(f.inbound_tunnel_port, 15008);
        assert_eq!(f.proxy_uid, Ids(vec![1337]));
        assert_eq!(f.proxy_gids(), &Ids(vec![1337]));
        assert_eq!(f.interception_mode, InterceptionMode::Redirect);
        assert_eq!(f.service_cidr, CidrSelection::Only(CidrList::default()));
        assert!(f.inbound_ports.is_none());
        assert!(!f.dry_run && !f.cleanup_only);
    }

    #[test]
    fn injected_default_parses() {
        let f = parse(ISTIO_INJECTED_ARGS).unwrap();
        assert_eq!(f.service_cidr, CidrSelection::All);
        assert_eq!(f.inbound_ports, PortSelection::All);
        assert_eq!(f.inbound_exclude_ports, PortList(vec![15090, 15021, 15020]));
    }

    #[test]
    fn long_names_and_alias() {
        let f = parse(&[
            "--envoy-port=1",
            "--inbound-capture-port=2",
            "--inbound-tunnel-port=3",
            "--proxy-uid=10,11",
            "--proxy-gid=12",
            "--istio-inbound-interception-mode=tproxy",
            "--istio-service-cidr=10.1.2.3/16, 192.168.0.0/24,",
            "--istio-service-exclude-cidr=fd00::1/8",
            "--istio-inbound-ports=80,443,80",
            "--istio-local-exclude-ports=22",
            "--istio-include-outbound-ports=5432",
            "--istio-local-outbound-ports-exclude=25",
            "--dry-run",
            "--cleanup-only",
            "--iptables-backend=legacy",
        ])
        .unwrap();
        assert_eq!(
            (f.envoy_port, f.inbound_capture_port, f.inbound_tunnel_port),
            (1, 2, 3)
        );
        assert_eq!(f.proxy_uid, Ids(vec![10, 11]));
        assert_eq!(f.proxy_gids(), &Ids(vec![12]));
        assert_eq!(f.interception_mode, InterceptionMode::Tproxy);
        let CidrSelection::Only(list) = &f.service_cidr else {
            panic!("expected a list")
        };
        let shown: Vec<String> = list.0.iter().map(ToString::to_string).collect();
        assert_eq!(shown, ["10.1.0.0/16", "192.168.0.0/24"]);
        assert_eq!(f.service_exclude_cidr.0[0].to_string(), "fd00::/8");
        assert_eq!(
            f.inbound_ports,
            PortSelection::Only(PortList(vec![80, 443]))
        );
        assert_eq!(f.outbound_ports, PortList(vec![5432]));
        assert_eq!(f.outbound_exclude_ports, PortList(vec![25]));
        assert!(f.dry_run && f.cleanup_only);
        assert_eq!(f.iptables_backend, BackendChoice::Legacy);
    }

    #[test]
    fn hardening_flags() {
        let f = parse(&[]).unwrap();
        assert_eq!((f.tproxy_mark, f.tproxy_route_table), (1337, 133));
        assert!(f.exclude_interfaces.0.is_empty() && f.kube_virt_interfaces.0.is_empty());
        assert!(!f.drop_invalid && !f.dual_stack && !f.redirect_dns);
        assert!(!f.run_validation && !f.skip_rule_apply && !f.skip_validation);
        assert_eq!(f.probe_port, 15002);
        assert_eq!(f.probe_timeout, Duration::from_secs(5));

        let f = parse(&[
            "-t",
            "0x200",
            "-r",
            "100",
            "-c",
            "eth1, tun+,eth1",
            "-k",
            "vm0",
            "--drop-invalid",
            "--dual-stack",
            "--redirect-dns",
            "--run-validation",
            "--skip-rule-apply",
            "--iptables-probe-port",
            "16000",
            "--probe-timeout",
            "250ms",
        ])
        .unwrap();
        assert_eq!((f.tproxy_mark, f.tproxy_route_table), (512, 100));
        assert_eq!(f.exclude_interfaces.0, ["eth1", "tun+"]);
        assert_eq!(f.kube_virt_interfaces.0, ["vm0"]);
        assert!(f.drop_invalid && f.dual_stack && f.redirect_dns);
        assert!(f.run_validation && f.skip_rule_apply);
        assert_eq!(f.probe_port, 16000);
        assert_eq!(f.probe_timeout, Duration::from_millis(250));
        // istio's newer name for -k.
        let f = parse(&["--reroute-virtual-interfaces=vm1"]).unwrap();
        assert_eq!(f.kube_virt_interfaces.0, ["vm1"]);
        for (text, want) in [("2", 2000), ("1.5s", 1500), ("1m", 60_000)] {
            assert_eq!(
                parse_duration(text).unwrap(),
                Duration::from_millis(want),
                "{text}"
            );
        }
    }

    #[test]
    fn bad_values_name_the_flag_and_the_value() {
        let cases: &[(&[&str], &str)] = &[
            (&["-p", "0"], "ports range from 1 to 65535"),
            (&["-p", "65536"], "ports range from 1 to 65535"),
            (&["-z", "http"], "`http` is not a port"),
            (&["-b", "80,x"], "`x` is not a port"),
            (&["-d", "*"], "`*` is not allowed"),
            (&["-i", "10.0.0.0"], "missing the `/prefix` length"),
            (&["-i", "10.0.0.0/33"], "at most 32"),
            (&["-x", "*"], "pass an empty --istio-service-cidr"),
            (&["-x", "nope/8"], "not an IP address"),
            (&["-u", "istio"], "not a numeric uid/gid"),
            (&["-g", ""], "at least one id"),
            (&["-m", "BOGUS"], "invalid value 'BOGUS'"),
            (&["-t", "0"], "must not be 0"),
            (&["-t", "x"], "expected a number"),
            (&["-r", "254"], "reserved route tables"),
            (&["-c", "eth0 x"], "cannot appear in an interface name"),
            (&["-k", "a-very-long-interface"], "at most 15 bytes"),
            (&["--probe-timeout", "5h"], "not a duration"),
            (&["--probe-timeout", "0s"], "not a duration"),
            (
                &["--run-validation", "--skip-validation"],
                "cannot be used with",
            ),
        ];
        for (args, needle) in cases {
            let err = parse(args).unwrap_err().to_string();
            assert!(err.contains(needle), "{args:?}: {err}");
        }
        let err = parse(&["-p", "0"]).unwrap_err().to_string();
        assert!(err.contains("--envoy-port"), "{err}");
    }
}
