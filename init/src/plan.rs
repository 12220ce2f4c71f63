//! Flags → rule plan → `iptables-restore` text. Pure: no I/O happens here, so
//! every rule set can be checked against golden text in unit tests.
//!
//! The rule set mirrors what istio-iptables installs in REDIRECT mode, under
//! veer's own chain names so the two can never be confused in one namespace.

use std::collections::BTreeMap;
use std::fmt::Write as _;

use crate::flags::{CidrSelection, Flags, InterceptionMode, PortSelection};
use crate::Error;

/// Inbound traffic enters here from PREROUTING.
pub const INBOUND: &str = "VEER_INBOUND";
/// Outbound traffic is sent here to be redirected to the outbound port.
pub const REDIRECT: &str = "VEER_REDIRECT";
/// Traffic sent here is redirected to the inbound capture port.
pub const IN_REDIRECT: &str = "VEER_IN_REDIRECT";
/// Outbound traffic enters here from OUTPUT.
pub const OUTPUT: &str = "VEER_OUTPUT";

/// Every chain veer-init owns, in declaration order. All of them are always
/// declared, even when empty, so that install and cleanup never depend on
/// which flags an earlier run used.
pub const CHAINS: [&str; 4] = [INBOUND, REDIRECT, IN_REDIRECT, OUTPUT];

/// The families veer-init manages. IPv6 (ip6tables, with ::6 as the
/// inbound source) is a later step; `family_plan` already takes a family.
pub const FAMILIES: &[Family] = &[Family::V4];

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Family {
    V4,
    V6,
}

impl Family {
    pub fn name(self) -> &'static str {
        match self {
            Family::V4 => "IPv4",
            Family::V6 => "IPv6",
        }
    }

    /// The address apps and the proxy use to talk to each other directly.
    fn loopback(self) -> &'static str {
        match self {
            Family::V4 => "127.0.0.1/32",
            Family::V6 => "::1/128",
        }
    }

    /// The source address of the proxy's inbound forwarder (Istio's
    /// convention), whose connections to the app must not be captured again.
    fn inbound_source(self) -> &'static str {
        match self {
            Family::V4 => "127.0.0.6/32",
            Family::V6 => "::6/128",
        }
    }

    fn holds(self, cidr: &crate::flags::Cidr) -> bool {
        cidr.is_ipv4() == (self == Family::V4)
    }
}

/// One rule: the chain it is appended to and the rest of its `-A` line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rule {
    pub chain: String,
    pub spec: String,
}

impl Rule {
    fn new(chain: &str, spec: impl Into<String>) -> Self {
        Rule {
            chain: chain.to_string(),
            spec: spec.into(),
        }
    }
}

/// The nat-table rules for one IP family.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FamilyPlan {
    pub family: Family,
    /// Rules inside veer's own chains, in order.
    pub rules: Vec<Rule>,
    /// Jumps from built-in chains into veer's chains.
    pub jumps: Vec<Rule>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Plan {
    /// One entry per member of [`FAMILIES`].
    pub families: Vec<FamilyPlan>,
    /// Things the operator should know, e.g. flag values that had no effect.
    pub notes: Vec<String>,
}

pub fn build(flags: &Flags) -> Result<Plan, Error> {
    if flags.interception_mode == InterceptionMode::Tproxy {
        return Err(Error::TproxyUnsupported);
    }
    let mut notes = Vec::new();
    let v6_given = match &flags.service_cidr {
        CidrSelection::All => false,
        CidrSelection::Only(list) => list.0.iter().any(|c| !c.is_ipv4()),
    } || flags.service_exclude_cidr.0.iter().any(|c| !c.is_ipv4());
    if v6_given {
        notes.push(
            "IPv6 CIDRs were given but IPv6 capture is not implemented yet; they are ignored"
                .into(),
        );
    }
    if !flags.inbound_exclude_ports.0.is_empty() && flags.inbound_ports != PortSelection::All {
        notes.push(
            "--istio-local-exclude-ports only applies with --istio-inbound-ports '*'; ignored"
                .into(),
        );
    }
    Ok(Plan {
        families: FAMILIES.iter().map(|f| family_plan(flags, *f)).collect(),
        notes,
    })
}

/// The rules for one family, in the order istio-iptables appends them
/// (order matters: the first matching RETURN or jump wins).
pub fn family_plan(flags: &Flags, family: Family) -> FamilyPlan {
    let mut rules = Vec::new();
    let mut jumps = Vec::new();
    let tunnel = flags.inbound_tunnel_port;

    // Inbound. The tunnel port is always left alone: the proxy itself
    // listens there for mTLS tunnels.
    rules.push(Rule::new(
        INBOUND,
        format!("-p tcp --dport {tunnel} -j RETURN"),
    ));
    match &flags.inbound_ports {
        PortSelection::All => {
            for port in &flags.inbound_exclude_ports.0 {
                rules.push(Rule::new(
                    INBOUND,
                    format!("-p tcp --dport {port} -j RETURN"),
                ));
            }
            rules.push(Rule::new(INBOUND, format!("-p tcp -j {IN_REDIRECT}")));
        }
        PortSelection::Only(ports) => {
            for port in &ports.0 {
                rules.push(Rule::new(
                    INBOUND,
                    format!("-p tcp --dport {port} -j {IN_REDIRECT}"),
                ));
            }
        }
    }
    if !flags.inbound_ports.is_none() {
        jumps.push(Rule::new("PREROUTING", format!("-p tcp -j {INBOUND}")));
    }

    rules.push(Rule::new(
        REDIRECT,
        format!("-p tcp -j REDIRECT --to-ports {}", flags.envoy_port),
    ));
    rules.push(Rule::new(
        IN_REDIRECT,
        format!(
            "-p tcp -j REDIRECT --to-ports {}",
            flags.inbound_capture_port
        ),
    ));

    // Outbound. Port exclusions come first so they win over everything,
    // including the app-to-itself redirect below. Only TCP is captured (the
    // OUTPUT jump matches tcp), so istio's extra UDP RETURN would be dead.
    for port in &flags.outbound_exclude_ports.0 {
        rules.push(Rule::new(
            OUTPUT,
            format!("-p tcp --dport {port} -j RETURN"),
        ));
    }
    rules.push(Rule::new(
        OUTPUT,
        format!("-s {} -o lo -j RETURN", family.inbound_source()),
    ));

    let (include_all, includes): (bool, Vec<_>) = match &flags.service_cidr {
        CidrSelection::All => (true, Vec::new()),
        CidrSelection::Only(list) => (false, list.0.iter().filter(|c| family.holds(c)).collect()),
    };
    // If the operator asked to capture loopback destinations, app-to-app
    // traffic on lo must not be waved through (istio does the same).
    let loopback_included = includes.iter().any(|c| c.is_loopback());
    let loopback = family.loopback();
    let owners = flags
        .proxy_uid
        .0
        .iter()
        .map(|uid| ("--uid-owner", *uid))
        .chain(flags.proxy_gids().0.iter().map(|gid| ("--gid-owner", *gid)));
    for (owner, id) in owners {
        // The proxy dialing the pod's own (non-loopback) address leaves via
        // lo: that is an app calling itself through a service, so hand it to
        // the inbound side.
        rules.push(Rule::new(
            OUTPUT,
            format!(
                "! -d {loopback} -o lo -p tcp ! --dport {tunnel} -m owner {owner} {id} -j {IN_REDIRECT}"
            ),
        ));
        // Other users' traffic on lo is app-to-app inside the pod.
        if !loopback_included {
            rules.push(Rule::new(
                OUTPUT,
                format!("-o lo -m owner ! {owner} {id} -j RETURN"),
            ));
        }
        // Never capture the proxy's own upstream connections: that would loop.
        rules.push(Rule::new(
            OUTPUT,
            format!("-m owner {owner} {id} -j RETURN"),
        ));
    }
    rules.push(Rule::new(OUTPUT, format!("-d {loopback} -j RETURN")));
    for cidr in flags
        .service_exclude_cidr
        .0
        .iter()
        .filter(|c| family.holds(c))
    {
        rules.push(Rule::new(OUTPUT, format!("-d {cidr} -j RETURN")));
    }
    for port in &flags.outbound_ports.0 {
        rules.push(Rule::new(
            OUTPUT,
            format!("-p tcp --dport {port} -j {REDIRECT}"),
        ));
    }
    if include_all {
        rules.push(Rule::new(OUTPUT, format!("-j {REDIRECT}")));
    } else {
        for cidr in includes {
            rules.push(Rule::new(OUTPUT, format!("-d {cidr} -j {REDIRECT}")));
        }
    }
    jumps.push(Rule::new("OUTPUT", format!("-p tcp -j {OUTPUT}")));

    FamilyPlan {
        family,
        rules,
        jumps,
    }
}

/// What the nat table currently holds that concerns veer-init, read from
/// `iptables-save -t nat`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct NatState {
    /// veer's chains that exist, with their rule specs.
    pub chains: BTreeMap<String, Vec<String>>,
    /// Rules in other chains (normally PREROUTING/OUTPUT) that jump to one of
    /// veer's chains.
    pub references: Vec<Rule>,
}

impl NatState {
    pub fn parse(save: &str) -> Self {
        let mut state = NatState::default();
        let mut in_nat = false;
        for line in save.lines().map(str::trim) {
            if let Some(table) = line.strip_prefix('*') {
                in_nat = table == "nat";
            } else if line == "COMMIT" {
                in_nat = false;
            } else if !in_nat {
                continue;
            } else if let Some(decl) = line.strip_prefix(':') {
                let name = decl.split_whitespace().next().unwrap_or_default();
                if CHAINS.contains(&name) {
                    state.chains.entry(name.to_string()).or_default();
                }
            } else if let Some(rest) = line.strip_prefix("-A ") {
                let (chain, spec) = rest.split_once(' ').unwrap_or((rest, ""));
                if CHAINS.contains(&chain) {
                    state
                        .chains
                        .entry(chain.to_string())
                        .or_default()
                        .push(spec.to_string());
                } else if targets_ours(spec) {
                    state.references.push(Rule::new(chain, spec));
                }
            }
        }
        state
    }
}

fn targets_ours(spec: &str) -> bool {
    let tokens: Vec<&str> = spec.split_whitespace().collect();
    tokens
        .windows(2)
        .any(|w| (w[0] == "-j" || w[0] == "-g") && CHAINS.contains(&w[1]))
}

impl FamilyPlan {
    /// The `iptables-restore --noflush` input that takes the nat table from
    /// `state` to this plan in one transaction.
    ///
    /// Idempotency: declaring a chain (`:NAME - [0:0]`) creates it or, if it
    /// exists, flushes it, so veer's chains are rebuilt from scratch. Jumps
    /// in built-in chains cannot be handled that way without flushing other
    /// people's rules, so the current jumps (from `state`) are reconciled:
    /// ones that match the plan are kept in place, stale or duplicate ones
    /// are deleted, missing ones are appended.
    pub fn render(&self, state: &NatState) -> String {
        let mut kept = vec![false; state.references.len()];
        let mut missing = Vec::new();
        for jump in &self.jumps {
            match state
                .references
                .iter()
                .enumerate()
                .position(|(i, r)| !kept[i] && r == jump)
            {
                Some(i) => kept[i] = true,
                None => missing.push(jump),
            }
        }

        let mut out = String::from("*nat\n");
        for chain in CHAINS {
            let _ = writeln!(out, ":{chain} - [0:0]");
        }
        for (reference, _) in state.references.iter().zip(&kept).filter(|(_, k)| !**k) {
            let _ = writeln!(out, "-D {} {}", reference.chain, reference.spec);
        }
        for rule in self.rules.iter().chain(missing) {
            let _ = writeln!(out, "-A {} {}", rule.chain, rule.spec);
        }
        out.push_str("COMMIT\n");
        out
    }

    /// Checks what iptables reports after applying against the plan. Rule
    /// text is not compared, because iptables rewrites it (e.g. adds
    /// `-m tcp`); counts and jump targets are enough to catch a half-applied
    /// or duplicated rule set.
    pub fn verify(&self, state: &NatState) -> Result<(), String> {
        for chain in CHAINS {
            let want = self.rules.iter().filter(|r| r.chain == chain).count();
            match state.chains.get(chain) {
                None => return Err(format!("chain {chain} is missing")),
                Some(have) if have.len() != want => {
                    return Err(format!(
                        "chain {chain} has {} rules, expected {want}",
                        have.len()
                    ))
                }
                Some(_) => {}
            }
        }
        if state.references.len() != self.jumps.len() {
            return Err(format!(
                "{} jumps into veer chains, expected {}",
                state.references.len(),
                self.jumps.len()
            ));
        }
        for jump in &self.jumps {
            if !state.references.iter().any(|r| r == jump) {
                return Err(format!("missing jump `-A {} {}`", jump.chain, jump.spec));
            }
        }
        Ok(())
    }
}

/// The `iptables-restore --noflush` input that removes everything veer-init
/// installed, or `None` when there is nothing to remove (so a cleanup of a
/// clean namespace touches nothing at all).
pub fn render_cleanup(state: &NatState) -> Option<String> {
    if state.chains.is_empty() && state.references.is_empty() {
        return None;
    }
    let mut out = String::from("*nat\n");
    // Flush first, so no veer chain is still referenced from another veer
    // chain when it is deleted.
    for chain in state.chains.keys() {
        let _ = writeln!(out, ":{chain} - [0:0]");
    }
    for reference in &state.references {
        let _ = writeln!(out, "-D {} {}", reference.chain, reference.spec);
    }
    for chain in state.chains.keys() {
        let _ = writeln!(out, "-X {chain}");
    }
    out.push_str("COMMIT\n");
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    const INJECTED: &[&str] = &[
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

    fn flags(args: &[&str]) -> Flags {
        Flags::try_parse_from(std::iter::once("veer-init").chain(args.iter().copied()))
            .unwrap_or_else(|e| panic!("{args:?}: {e}"))
    }

    /// The injected default with some flags overridden (later flags win).
    fn injected_with(extra: &[&str]) -> Flags {
        flags(&[INJECTED, extra].concat())
    }

    fn fresh(args: Flags) -> String {
        let plan = build(&args).unwrap();
        assert_eq!(plan.families.len(), 1, "only IPv4 is planned for now");
        assert_eq!(plan.families[0].family, Family::V4);
        plan.families[0].render(&NatState::default())
    }

    const HEADER: &str = "*nat
:VEER_INBOUND - [0:0]
:VEER_REDIRECT - [0:0]
:VEER_IN_REDIRECT - [0:0]
:VEER_OUTPUT - [0:0]
";

    /// The lines for one owner (uid or gid) with the default tunnel port.
    fn owner_rules(owner: &str, id: u32) -> String {
        format!(
            "-A VEER_OUTPUT ! -d 127.0.0.1/32 -o lo -p tcp ! --dport 15008 -m owner --{owner}-owner {id} -j VEER_IN_REDIRECT
-A VEER_OUTPUT -o lo -m owner ! --{owner}-owner {id} -j RETURN
-A VEER_OUTPUT -m owner --{owner}-owner {id} -j RETURN
"
        )
    }

    #[test]
    fn injected_default() {
        let want = format!(
            "{HEADER}-A VEER_INBOUND -p tcp --dport 15008 -j RETURN
-A VEER_INBOUND -p tcp --dport 15090 -j RETURN
-A VEER_INBOUND -p tcp --dport 15021 -j RETURN
-A VEER_INBOUND -p tcp --dport 15020 -j RETURN
-A VEER_INBOUND -p tcp -j VEER_IN_REDIRECT
-A VEER_REDIRECT -p tcp -j REDIRECT --to-ports 15001
-A VEER_IN_REDIRECT -p tcp -j REDIRECT --to-ports 15006
-A VEER_OUTPUT -s 127.0.0.6/32 -o lo -j RETURN
{}{}-A VEER_OUTPUT -d 127.0.0.1/32 -j RETURN
-A VEER_OUTPUT -j VEER_REDIRECT
-A PREROUTING -p tcp -j VEER_INBOUND
-A OUTPUT -p tcp -j VEER_OUTPUT
COMMIT
",
            owner_rules("uid", 1337),
            owner_rules("gid", 1337)
        );
        assert_eq!(fresh(flags(INJECTED)), want);
    }

    #[test]
    fn specific_service_cidrs() {
        let text = fresh(injected_with(&["-i", "10.96.0.0/12,172.20.1.7/16"]));
        let tail = "-A VEER_OUTPUT -d 127.0.0.1/32 -j RETURN
-A VEER_OUTPUT -d 10.96.0.0/12 -j VEER_REDIRECT
-A VEER_OUTPUT -d 172.20.0.0/16 -j VEER_REDIRECT
-A PREROUTING -p tcp -j VEER_INBOUND
-A OUTPUT -p tcp -j VEER_OUTPUT
COMMIT
";
        assert!(text.ends_with(tail), "{text}");
        assert!(!text.contains("-A VEER_OUTPUT -j VEER_REDIRECT"), "{text}");
    }

    #[test]
    fn excluded_cidrs_come_before_the_catch_all() {
        let text = fresh(injected_with(&[
            "-x",
            "10.0.0.0/8,169.254.169.254/32,fd00::/8",
        ]));
        let tail = "-A VEER_OUTPUT -d 127.0.0.1/32 -j RETURN
-A VEER_OUTPUT -d 10.0.0.0/8 -j RETURN
-A VEER_OUTPUT -d 169.254.169.254/32 -j RETURN
-A VEER_OUTPUT -j VEER_REDIRECT
-A PREROUTING -p tcp -j VEER_INBOUND
-A OUTPUT -p tcp -j VEER_OUTPUT
COMMIT
";
        assert!(text.ends_with(tail), "{text}");
        assert!(
            !text.contains("fd00"),
            "IPv6 ranges stay out of the IPv4 plan"
        );
        let plan = build(&injected_with(&["-x", "fd00::/8"])).unwrap();
        assert!(plan.notes[0].contains("IPv6"), "{:?}", plan.notes);
    }

    #[test]
    fn specific_inbound_ports() {
        let args = injected_with(&["-b", "8080,9090"]);
        let text = fresh(args.clone());
        let inbound = "-A VEER_INBOUND -p tcp --dport 15008 -j RETURN
-A VEER_INBOUND -p tcp --dport 8080 -j VEER_IN_REDIRECT
-A VEER_INBOUND -p tcp --dport 9090 -j VEER_IN_REDIRECT
-A VEER_REDIRECT";
        assert!(text.contains(inbound), "{text}");
        // -d only applies with -b '*'.
        assert!(!text.contains("--dport 15090"), "{text}");
        assert!(text.contains("-A PREROUTING -p tcp -j VEER_INBOUND\n"));
        assert!(build(&args).unwrap().notes[0].contains("--istio-local-exclude-ports"));
    }

    #[test]
    fn no_inbound_ports_means_no_prerouting_jump() {
        let text = fresh(injected_with(&["-b", "", "-d", ""]));
        let want = format!(
            "{HEADER}-A VEER_INBOUND -p tcp --dport 15008 -j RETURN
-A VEER_REDIRECT -p tcp -j REDIRECT --to-ports 15001
-A VEER_IN_REDIRECT -p tcp -j REDIRECT --to-ports 15006
-A VEER_OUTPUT -s 127.0.0.6/32 -o lo -j RETURN
{}{}-A VEER_OUTPUT -d 127.0.0.1/32 -j RETURN
-A VEER_OUTPUT -j VEER_REDIRECT
-A OUTPUT -p tcp -j VEER_OUTPUT
COMMIT
",
            owner_rules("uid", 1337),
            owner_rules("gid", 1337)
        );
        assert_eq!(text, want);
    }

    #[test]
    fn outbound_port_include_and_exclude() {
        // No CIDRs captured: only the included ports go to the proxy.
        let text = fresh(injected_with(&["-i", "", "-q", "5432,6379", "-o", "22,25"]));
        let want = format!(
            "{HEADER}-A VEER_INBOUND -p tcp --dport 15008 -j RETURN
-A VEER_INBOUND -p tcp --dport 15090 -j RETURN
-A VEER_INBOUND -p tcp --dport 15021 -j RETURN
-A VEER_INBOUND -p tcp --dport 15020 -j RETURN
-A VEER_INBOUND -p tcp -j VEER_IN_REDIRECT
-A VEER_REDIRECT -p tcp -j REDIRECT --to-ports 15001
-A VEER_IN_REDIRECT -p tcp -j REDIRECT --to-ports 15006
-A VEER_OUTPUT -p tcp --dport 22 -j RETURN
-A VEER_OUTPUT -p tcp --dport 25 -j RETURN
-A VEER_OUTPUT -s 127.0.0.6/32 -o lo -j RETURN
{}{}-A VEER_OUTPUT -d 127.0.0.1/32 -j RETURN
-A VEER_OUTPUT -p tcp --dport 5432 -j VEER_REDIRECT
-A VEER_OUTPUT -p tcp --dport 6379 -j VEER_REDIRECT
-A PREROUTING -p tcp -j VEER_INBOUND
-A OUTPUT -p tcp -j VEER_OUTPUT
COMMIT
",
            owner_rules("uid", 1337),
            owner_rules("gid", 1337)
        );
        assert_eq!(text, want);
    }

    #[test]
    fn gid_differs_from_uid() {
        let text = fresh(injected_with(&["-u", "1337", "-g", "2000"]));
        let want = format!(
            "-A VEER_OUTPUT -s 127.0.0.6/32 -o lo -j RETURN\n{}{}-A VEER_OUTPUT -d 127.0.0.1/32",
            owner_rules("uid", 1337),
            owner_rules("gid", 2000)
        );
        assert!(text.contains(&want), "{text}");
    }

    #[test]
    fn custom_ports_and_loopback_capture() {
        let text = fresh(flags(&[
            "-p",
            "7001",
            "-z",
            "7006",
            "-e",
            "7008",
            "-u",
            "99",
            "-i",
            "127.0.0.0/8",
            "-b",
            "*",
        ]));
        assert!(text.contains("-A VEER_INBOUND -p tcp --dport 7008 -j RETURN\n"));
        assert!(text.contains("-j REDIRECT --to-ports 7001\n"));
        assert!(text.contains("-j REDIRECT --to-ports 7006\n"));
        assert!(text.contains("! --dport 7008 -m owner --uid-owner 99 -j VEER_IN_REDIRECT\n"));
        // Capturing loopback destinations drops the "app-to-app on lo" RETURN.
        assert!(!text.contains("! --uid-owner"), "{text}");
        assert!(text.contains("-A VEER_OUTPUT -d 127.0.0.0/8 -j VEER_REDIRECT\n"));
    }

    #[test]
    fn tproxy_is_rejected_clearly() {
        let err = build(&injected_with(&["-m", "TPROXY"])).unwrap_err();
        assert!(err.to_string().contains("TPROXY"), "{err}");
        assert!(err.to_string().contains("not supported yet"), "{err}");
    }

    /// What iptables-save prints after installing the injected default (the
    /// text iptables normalises: `-m tcp`, option order).
    const SAVED: &str = "# Generated by iptables-save v1.8.9 on Sat Nov 21 00:00:00 2026
*nat
:PREROUTING ACCEPT [10:600]
:INPUT ACCEPT [0:0]
:OUTPUT ACCEPT [3:180]
:POSTROUTING ACCEPT [3:180]
:KUBE-THING - [0:0]
:VEER_INBOUND - [0:0]
:VEER_IN_REDIRECT - [0:0]
:VEER_OUTPUT - [0:0]
:VEER_REDIRECT - [0:0]
-A PREROUTING -p tcp -j VEER_INBOUND
-A PREROUTING -p udp -j KUBE-THING
-A OUTPUT -p tcp -j VEER_OUTPUT
-A OUTPUT -p tcp -j VEER_OUTPUT
-A KUBE-THING -m comment --comment \"-j VEER_OUTPUT\" -j RETURN
-A VEER_INBOUND -p tcp -m tcp --dport 15008 -j RETURN
-A VEER_INBOUND -p tcp -j VEER_IN_REDIRECT
-A VEER_IN_REDIRECT -p tcp -j REDIRECT --to-ports 15006
-A VEER_OUTPUT -j VEER_REDIRECT
-A VEER_REDIRECT -p tcp -j REDIRECT --to-ports 15001
COMMIT
*filter
:OUTPUT ACCEPT [0:0]
-A OUTPUT -p tcp -j VEER_OUTPUT
COMMIT
";

    #[test]
    fn parses_state_from_iptables_save() {
        let state = NatState::parse(SAVED);
        assert_eq!(state.chains.len(), 4);
        assert_eq!(state.chains[INBOUND].len(), 2);
        assert_eq!(
            state.chains[INBOUND][0],
            "-p tcp -m tcp --dport 15008 -j RETURN"
        );
        assert_eq!(
            state.references,
            vec![
                Rule::new("PREROUTING", "-p tcp -j VEER_INBOUND"),
                Rule::new("OUTPUT", "-p tcp -j VEER_OUTPUT"),
                Rule::new("OUTPUT", "-p tcp -j VEER_OUTPUT"),
            ],
            "a quoted comment is not a jump, and only the nat table counts"
        );
    }

    #[test]
    fn reinstall_keeps_jumps_and_drops_duplicates() {
        let plan = build(&flags(INJECTED)).unwrap();
        let text = plan.families[0].render(&NatState::parse(SAVED));
        // Chains are re-declared (flushed) and refilled; the existing
        // PREROUTING/OUTPUT jumps stay put, the duplicate goes.
        assert!(text.starts_with(HEADER), "{text}");
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines[5], "-D OUTPUT -p tcp -j VEER_OUTPUT");
        assert_eq!(lines.iter().filter(|l| l.starts_with("-D ")).count(), 1);
        assert!(!text.contains("-A PREROUTING"), "{text}");
        assert!(!text.contains("-A OUTPUT"), "{text}");
        assert!(
            text.ends_with("-A VEER_OUTPUT -j VEER_REDIRECT\nCOMMIT\n"),
            "{text}"
        );
    }

    #[test]
    fn changed_flags_remove_a_stale_jump() {
        let plan = build(&injected_with(&["-b", ""])).unwrap();
        let text = plan.families[0].render(&NatState::parse(SAVED));
        assert!(
            text.contains("-D PREROUTING -p tcp -j VEER_INBOUND\n"),
            "{text}"
        );
    }

    #[test]
    fn cleanup_text() {
        assert_eq!(render_cleanup(&NatState::default()), None);
        let want = "*nat
:VEER_INBOUND - [0:0]
:VEER_IN_REDIRECT - [0:0]
:VEER_OUTPUT - [0:0]
:VEER_REDIRECT - [0:0]
-D PREROUTING -p tcp -j VEER_INBOUND
-D OUTPUT -p tcp -j VEER_OUTPUT
-D OUTPUT -p tcp -j VEER_OUTPUT
-X VEER_INBOUND
-X VEER_IN_REDIRECT
-X VEER_OUTPUT
-X VEER_REDIRECT
COMMIT
";
        assert_eq!(
            render_cleanup(&NatState::parse(SAVED)).as_deref(),
            Some(want)
        );
    }

    #[test]
    fn verify_counts_rules_and_jumps() {
        let plan = build(&injected_with(&["-b", "", "-d", ""])).unwrap();
        let fp = &plan.families[0];
        let mut save = String::from("*nat\n");
        for chain in CHAINS {
            save += &format!(":{chain} - [0:0]\n");
        }
        for rule in fp.rules.iter().chain(&fp.jumps) {
            save += &format!("-A {} {}\n", rule.chain, rule.spec);
        }
        save += "COMMIT\n";
        assert_eq!(fp.verify(&NatState::parse(&save)), Ok(()));
        let doubled = save.replace("COMMIT", "-A OUTPUT -p tcp -j VEER_OUTPUT\nCOMMIT");
        assert!(fp.verify(&NatState::parse(&doubled)).is_err());
        assert!(fp.verify(&NatState::default()).is_err());
    }
}
