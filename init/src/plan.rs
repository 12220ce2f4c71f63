//! Flags → rule plan → `iptables-restore` text. Pure: no I/O happens here, so
//! every rule set can be checked against golden text in unit tests.
//!
//! The rule set mirrors what istio-iptables installs, under veer's own chain
//! names so the two can never be confused in one namespace. One deliberate
//! difference: istio appends some rules (interface exclusions, TPROXY marks,
//! INVALID drops) straight into the built-in chains; veer keeps every rule in
//! its own chains and puts only jumps into the built-in ones, so that
//! reinstalling and cleaning up never have to recognise rules by their text.

use std::collections::BTreeMap;
use std::fmt::Write as _;

use crate::flags::{CidrSelection, Flags, InterceptionMode, PortSelection};
use crate::Error;

/// nat: inbound traffic enters here from PREROUTING. mangle (TPROXY): the
/// inbound capture decisions.
pub const INBOUND: &str = "VEER_INBOUND";
/// nat: outbound traffic sent here is redirected to the outbound port.
pub const REDIRECT: &str = "VEER_REDIRECT";
/// nat: traffic sent here is redirected to the inbound capture port.
pub const IN_REDIRECT: &str = "VEER_IN_REDIRECT";
/// nat: outbound traffic enters here from OUTPUT. mangle (TPROXY): marks
/// for locally generated packets.
pub const OUTPUT: &str = "VEER_OUTPUT";
/// mangle: everything veer does in PREROUTING.
pub const PREROUTING: &str = "VEER_PREROUTING";
/// mangle (TPROXY): packets of established inbound connections are marked
/// here, so policy routing delivers them to the proxy's socket.
pub const DIVERT: &str = "VEER_DIVERT";
/// mangle (TPROXY): new inbound connections are handed to the proxy here.
pub const TPROXY: &str = "VEER_TPROXY";

/// The nat chains veer-init owns, in declaration order. All of them are
/// always declared, even when empty, so the nat text never depends on which
/// flags an earlier run used.
pub const CHAINS: [&str; 4] = [INBOUND, REDIRECT, IN_REDIRECT, OUTPUT];
/// The mangle chains veer-init owns; only the ones a plan uses are declared.
pub const MANGLE_CHAINS: [&str; 5] = [PREROUTING, INBOUND, DIVERT, TPROXY, OUTPUT];

/// Marks the proxy's own connections to the pod's address in TPROXY mode
/// (istio's fixed "outbound mark"), so they are not taken for app traffic.
pub const OUTBOUND_MARK: u32 = 1338;

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Table {
    Mangle,
    Nat,
}

impl Table {
    /// Restore order, as istio-iptables writes them.
    pub const ALL: [Table; 2] = [Table::Mangle, Table::Nat];

    pub fn name(self) -> &'static str {
        match self {
            Table::Mangle => "mangle",
            Table::Nat => "nat",
        }
    }

    fn from_name(name: &str) -> Option<Table> {
        Table::ALL.into_iter().find(|t| t.name() == name)
    }

    fn owns(self, chain: &str) -> bool {
        match self {
            Table::Mangle => MANGLE_CHAINS.contains(&chain),
            Table::Nat => CHAINS.contains(&chain),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
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

    /// `-4` / `-6` for the `ip` command.
    pub fn ip_flag(self) -> &'static str {
        match self {
            Family::V4 => "-4",
            Family::V6 => "-6",
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
    pub fn inbound_source(self) -> &'static str {
        match self {
            Family::V4 => "127.0.0.6/32",
            Family::V6 => "::6/128",
        }
    }

    fn default_route(self) -> &'static str {
        match self {
            Family::V4 => "0.0.0.0/0",
            Family::V6 => "::/0",
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

/// What one table should hold.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TablePlan {
    pub table: Table,
    /// veer's chains in this table, declared (created or flushed) on install.
    pub chains: Vec<&'static str>,
    /// Rules inside veer's own chains, in order.
    pub rules: Vec<Rule>,
    /// Jumps from built-in chains into veer's chains. Their text is exactly
    /// what iptables-save prints, so installed ones can be recognised.
    pub jumps: Vec<Rule>,
}

impl TablePlan {
    fn new(table: Table) -> Self {
        TablePlan {
            table,
            chains: Vec::new(),
            rules: Vec::new(),
            jumps: Vec::new(),
        }
    }

    fn add(&mut self, chain: &'static str, spec: impl Into<String>) {
        if !self.chains.contains(&chain) {
            self.chains.push(chain);
        }
        self.rules.push(Rule::new(chain, spec));
    }

    fn jump(&mut self, builtin: &str, spec: impl Into<String>) {
        self.jumps.push(Rule::new(builtin, spec));
    }
}

/// A change outside iptables, run with the `ip` command.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum IpCommand {
    /// `ip -6 addr add ::6/128 dev lo`: the inbound forwarder's IPv6 source
    /// (IPv4 has all of 127.0.0.0/8 on lo already). Existing is fine.
    AddInboundSource,
    /// `ip rule add fwmark MARK lookup TABLE`, unless that rule exists.
    Rule { mark: u32, table: u32 },
    /// `ip route replace local DEFAULT dev lo table TABLE`.
    LocalRoute { table: u32 },
}

impl IpCommand {
    pub fn args(&self, family: Family) -> Vec<String> {
        let text = match self {
            IpCommand::AddInboundSource => {
                format!("-6 addr add {} dev lo", family.inbound_source())
            }
            IpCommand::Rule { mark, table } => {
                format!("{} rule add fwmark {mark} lookup {table}", family.ip_flag())
            }
            IpCommand::LocalRoute { table } => format!(
                "{} route replace local {} dev lo table {table}",
                family.ip_flag(),
                family.default_route()
            ),
        };
        text.split(' ').map(str::to_string).collect()
    }

    pub fn display(&self, family: Family) -> String {
        format!("ip {}", self.args(family).join(" "))
    }
}

/// Everything for one IP family.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FamilyPlan {
    pub family: Family,
    /// nat always, mangle when TPROXY or --drop-invalid needs it.
    pub tables: Vec<TablePlan>,
    /// Run before the rules are restored.
    pub ip_commands: Vec<IpCommand>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Plan {
    pub families: Vec<FamilyPlan>,
    /// Things the operator should know, e.g. flag values that had no effect.
    pub notes: Vec<String>,
}

/// Whether TPROXY rules are planned: the mode is TPROXY and some inbound
/// port is captured (istio installs neither rules nor routes otherwise).
pub fn tproxy_active(flags: &Flags) -> bool {
    flags.interception_mode == InterceptionMode::Tproxy && !flags.inbound_ports.is_none()
}

/// Plans the given families (IPv4 is always expected among them; IPv6 when
/// the pod has IPv6 or --dual-stack says so).
pub fn build(flags: &Flags, families: &[Family]) -> Result<Plan, Error> {
    let mut notes = Vec::new();
    let v6_given = match &flags.service_cidr {
        CidrSelection::All => false,
        CidrSelection::Only(list) => list.0.iter().any(|c| !c.is_ipv4()),
    } || flags.service_exclude_cidr.0.iter().any(|c| !c.is_ipv4());
    if v6_given && !families.contains(&Family::V6) {
        notes.push(
            "IPv6 CIDRs were given but IPv6 is not captured in this pod (no global IPv6 \
             address; pass --dual-stack to capture it anyway); they are ignored"
                .into(),
        );
    }
    if !flags.inbound_exclude_ports.0.is_empty() && flags.inbound_ports != PortSelection::All {
        notes.push(
            "--istio-local-exclude-ports only applies with --istio-inbound-ports '*'; ignored"
                .into(),
        );
    }
    if flags.interception_mode == InterceptionMode::Tproxy && flags.inbound_ports.is_none() {
        notes.push("-m TPROXY has no effect: no inbound port is captured (-b is empty)".into());
    }
    if flags.redirect_dns {
        notes.push(
            "--redirect-dns is not supported (veer has no DNS proxy); DNS is not redirected".into(),
        );
    }
    let mut families: Vec<Family> = families.to_vec();
    families.sort();
    families.dedup();
    Ok(Plan {
        families: families.iter().map(|f| family_plan(flags, *f)).collect(),
        notes,
    })
}

/// The rules for one family, in the order istio-iptables appends them
/// (order matters: the first matching RETURN or jump wins).
pub fn family_plan(flags: &Flags, family: Family) -> FamilyPlan {
    let mut tables = vec![nat_plan(flags, family)];
    if let Some(mangle) = mangle_plan(flags, family) {
        tables.insert(0, mangle);
    }
    let mut ip_commands = Vec::new();
    if family == Family::V6 {
        ip_commands.push(IpCommand::AddInboundSource);
    }
    if tproxy_active(flags) {
        ip_commands.push(IpCommand::Rule {
            mark: flags.tproxy_mark,
            table: flags.tproxy_route_table,
        });
        ip_commands.push(IpCommand::LocalRoute {
            table: flags.tproxy_route_table,
        });
    }
    FamilyPlan {
        family,
        tables,
        ip_commands,
    }
}

fn nat_plan(flags: &Flags, family: Family) -> TablePlan {
    let mut nat = TablePlan::new(Table::Nat);
    nat.chains = CHAINS.to_vec();
    let tunnel = flags.inbound_tunnel_port;
    let redirect_mode = flags.interception_mode == InterceptionMode::Redirect;

    let (include_all, includes): (bool, Vec<_>) = match &flags.service_cidr {
        CidrSelection::All => (true, Vec::new()),
        CidrSelection::Only(list) => (false, list.0.iter().filter(|c| family.holds(c)).collect()),
    };

    // Traffic arriving from a virtual interface (a VM's tap) is the VM's
    // outbound traffic: capture it like the app's, and never as inbound.
    for iface in &flags.kube_virt_interfaces.0 {
        if include_all {
            nat.add(INBOUND, format!("-i {iface} -j {REDIRECT}"));
        }
        for cidr in &includes {
            nat.add(INBOUND, format!("-i {iface} -d {cidr} -j {REDIRECT}"));
        }
    }
    for iface in &flags.kube_virt_interfaces.0 {
        nat.add(INBOUND, format!("-i {iface} -j RETURN"));
    }
    if redirect_mode {
        for iface in &flags.exclude_interfaces.0 {
            nat.add(INBOUND, format!("-i {iface} -j RETURN"));
        }
    }

    // Inbound. The tunnel port is always left alone: the proxy itself
    // listens there for mTLS tunnels.
    nat.add(INBOUND, format!("-p tcp --dport {tunnel} -j RETURN"));
    if redirect_mode {
        match &flags.inbound_ports {
            PortSelection::All => {
                for port in &flags.inbound_exclude_ports.0 {
                    nat.add(INBOUND, format!("-p tcp --dport {port} -j RETURN"));
                }
                nat.add(INBOUND, format!("-p tcp -j {IN_REDIRECT}"));
            }
            PortSelection::Only(ports) => {
                for port in &ports.0 {
                    nat.add(INBOUND, format!("-p tcp --dport {port} -j {IN_REDIRECT}"));
                }
            }
        }
    }
    if (redirect_mode && !flags.inbound_ports.is_none()) || !flags.kube_virt_interfaces.0.is_empty()
    {
        nat.jump("PREROUTING", format!("-p tcp -j {INBOUND}"));
    }

    nat.add(
        REDIRECT,
        format!("-p tcp -j REDIRECT --to-ports {}", flags.envoy_port),
    );
    nat.add(
        IN_REDIRECT,
        format!(
            "-p tcp -j REDIRECT --to-ports {}",
            flags.inbound_capture_port
        ),
    );

    // Outbound. Interface and port exclusions come first so they win over
    // everything, including the app-to-itself redirect below. Only TCP is
    // captured (the OUTPUT jump matches tcp), so istio's extra UDP RETURN
    // would be dead.
    for iface in &flags.exclude_interfaces.0 {
        nat.add(OUTPUT, format!("-o {iface} -j RETURN"));
    }
    for port in &flags.outbound_exclude_ports.0 {
        nat.add(OUTPUT, format!("-p tcp --dport {port} -j RETURN"));
    }
    nat.add(
        OUTPUT,
        format!("-s {} -o lo -j RETURN", family.inbound_source()),
    );
    // TPROXY: the proxy's inbound forwarder connects to the app from the client's own
    // address with the TPROXY mark (not from 127.0.0.6), so the mark is what exempts it from
    // the proxy-uid rule below, which would otherwise redirect it back into the inbound port.
    if tproxy_active(flags) {
        nat.add(
            OUTPUT,
            format!("-p tcp -m mark --mark {} -j RETURN", flags.tproxy_mark),
        );
    }

    // If the operator asked to capture loopback destinations, app-to-app
    // traffic on lo must not be waved through (istio does the same).
    let loopback_included = includes.iter().any(|c| c.is_loopback());
    let loopback = family.loopback();
    for (owner, id) in owners(flags) {
        // The proxy dialing the pod's own (non-loopback) address leaves via
        // lo: that is an app calling itself through a service, so hand it to
        // the inbound side.
        nat.add(
            OUTPUT,
            format!(
                "! -d {loopback} -o lo -p tcp ! --dport {tunnel} -m owner {owner} {id} -j {IN_REDIRECT}"
            ),
        );
        // Other users' traffic on lo is app-to-app inside the pod.
        if !loopback_included {
            nat.add(OUTPUT, format!("-o lo -m owner ! {owner} {id} -j RETURN"));
        }
        // Never capture the proxy's own upstream connections: that would loop.
        nat.add(OUTPUT, format!("-m owner {owner} {id} -j RETURN"));
    }
    nat.add(OUTPUT, format!("-d {loopback} -j RETURN"));
    for cidr in flags
        .service_exclude_cidr
        .0
        .iter()
        .filter(|c| family.holds(c))
    {
        nat.add(OUTPUT, format!("-d {cidr} -j RETURN"));
    }
    for port in &flags.outbound_ports.0 {
        nat.add(OUTPUT, format!("-p tcp --dport {port} -j {REDIRECT}"));
    }
    if include_all {
        nat.add(OUTPUT, format!("-j {REDIRECT}"));
    } else {
        for cidr in includes {
            nat.add(OUTPUT, format!("-d {cidr} -j {REDIRECT}"));
        }
    }
    nat.jump("OUTPUT", format!("-p tcp -j {OUTPUT}"));
    nat
}

/// The proxy's uids, then its gids, as `-m owner` arguments.
fn owners(flags: &Flags) -> impl Iterator<Item = (&'static str, u32)> + '_ {
    flags
        .proxy_uid
        .0
        .iter()
        .map(|uid| ("--uid-owner", *uid))
        .chain(flags.proxy_gids().0.iter().map(|gid| ("--gid-owner", *gid)))
}

/// The mangle table: INVALID drops and the TPROXY inbound path, as istio
/// installs them, or `None` when neither is asked for.
fn mangle_plan(flags: &Flags, family: Family) -> Option<TablePlan> {
    let tproxy = tproxy_active(flags);
    if !tproxy && !flags.drop_invalid {
        return None;
    }
    let mut mangle = TablePlan::new(Table::Mangle);
    let mark = flags.tproxy_mark;
    let loopback = family.loopback();

    if tproxy {
        for iface in &flags.exclude_interfaces.0 {
            mangle.add(PREROUTING, format!("-i {iface} -j RETURN"));
        }
    }
    if flags.drop_invalid {
        mangle.add(PREROUTING, "-m conntrack --ctstate INVALID -j DROP");
    }
    mangle.jump("PREROUTING", format!("-j {PREROUTING}"));
    if !tproxy {
        return Some(mangle);
    }
    mangle.add(PREROUTING, format!("-p tcp -j {INBOUND}"));
    // Keep the mark of marked connections on their later packets.
    mangle.add(
        PREROUTING,
        format!("-p tcp -m mark --mark {mark} -j CONNMARK --save-mark"),
    );

    // Already diverted: do not divert again.
    mangle.add(INBOUND, format!("-p tcp -m mark --mark {mark} -j RETURN"));
    // The proxy's inbound forwarder talking to the app.
    mangle.add(
        INBOUND,
        format!("-p tcp -s {} -i lo -j RETURN", family.inbound_source()),
    );
    // Other traffic over lo is app-to-app, except the proxy calling the pod's
    // own address, which OUTPUT marked.
    mangle.add(
        INBOUND,
        format!("-p tcp -i lo -m mark ! --mark {OUTBOUND_MARK} -j RETURN"),
    );
    // Unlike istio, the tunnel port is left alone here too, as in nat.
    mangle.add(
        INBOUND,
        format!("-p tcp --dport {} -j RETURN", flags.inbound_tunnel_port),
    );
    match &flags.inbound_ports {
        PortSelection::All => {
            for port in &flags.inbound_exclude_ports.0 {
                mangle.add(INBOUND, format!("-p tcp --dport {port} -j RETURN"));
            }
            mangle.add(
                INBOUND,
                format!("-p tcp -m conntrack --ctstate RELATED,ESTABLISHED -j {DIVERT}"),
            );
            mangle.add(INBOUND, format!("-p tcp -j {TPROXY}"));
        }
        PortSelection::Only(ports) => {
            for port in &ports.0 {
                mangle.add(
                    INBOUND,
                    format!(
                        "-p tcp --dport {port} -m conntrack --ctstate RELATED,ESTABLISHED -j {DIVERT}"
                    ),
                );
                mangle.add(INBOUND, format!("-p tcp --dport {port} -j {TPROXY}"));
            }
        }
    }
    mangle.add(DIVERT, format!("-j MARK --set-mark {mark}"));
    mangle.add(DIVERT, "-j ACCEPT");
    mangle.add(
        TPROXY,
        format!(
            "! -d {loopback} -p tcp -j TPROXY --tproxy-mark {mark}/0xffffffff --on-port {}",
            flags.inbound_capture_port
        ),
    );

    for iface in &flags.exclude_interfaces.0 {
        mangle.add(OUTPUT, format!("-o {iface} -j RETURN"));
    }
    mangle.add(
        OUTPUT,
        format!("-p tcp -o lo -m mark --mark {mark} -j RETURN"),
    );
    for (owner, id) in owners(flags) {
        mangle.add(
            OUTPUT,
            format!(
                "! -d {loopback} -p tcp -o lo -m owner {owner} {id} -j MARK --set-mark {OUTBOUND_MARK}"
            ),
        );
    }
    // Replies of marked connections follow the mark back to the proxy.
    mangle.add(
        OUTPUT,
        format!("-p tcp -m connmark --mark {mark} -j CONNMARK --restore-mark"),
    );
    mangle.jump("OUTPUT", format!("-j {OUTPUT}"));
    // Declaration order is fixed, whatever order the rules came in.
    mangle.chains = MANGLE_CHAINS
        .into_iter()
        .filter(|c| mangle.chains.contains(c))
        .collect();
    Some(mangle)
}

/// What one table currently holds that concerns veer-init.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TableState {
    /// veer's chains that exist, with their rule specs.
    pub chains: BTreeMap<String, Vec<String>>,
    /// Rules in other chains (normally built-in ones) that jump to one of
    /// veer's chains.
    pub references: Vec<Rule>,
}

impl TableState {
    fn is_empty(&self) -> bool {
        self.chains.is_empty() && self.references.is_empty()
    }
}

/// What the nat and mangle tables of one family hold that concerns
/// veer-init, read from `iptables-save`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct State {
    pub tables: BTreeMap<Table, TableState>,
}

impl State {
    pub fn parse(save: &str) -> Self {
        let mut state = State::default();
        let mut table = None;
        for line in save.lines().map(str::trim) {
            if let Some(name) = line.strip_prefix('*') {
                table = Table::from_name(name.trim());
            } else if line == "COMMIT" {
                table = None;
            } else if let Some(table) = table {
                if let Some(decl) = line.strip_prefix(':') {
                    let name = decl.split_whitespace().next().unwrap_or_default();
                    if table.owns(name) {
                        state
                            .table_mut(table)
                            .chains
                            .entry(name.to_string())
                            .or_default();
                    }
                } else if let Some(rest) = line.strip_prefix("-A ") {
                    let (chain, spec) = rest.split_once(' ').unwrap_or((rest, ""));
                    if table.owns(chain) {
                        state
                            .table_mut(table)
                            .chains
                            .entry(chain.to_string())
                            .or_default()
                            .push(spec.to_string());
                    } else if targets_ours(table, spec) {
                        state
                            .table_mut(table)
                            .references
                            .push(Rule::new(chain, spec));
                    }
                }
            }
        }
        state.tables.retain(|_, t| !t.is_empty());
        state
    }

    fn table_mut(&mut self, table: Table) -> &mut TableState {
        self.tables.entry(table).or_default()
    }

    pub fn table(&self, table: Table) -> Option<&TableState> {
        self.tables.get(&table)
    }

    pub fn is_empty(&self) -> bool {
        self.tables.values().all(TableState::is_empty)
    }
}

fn targets_ours(table: Table, spec: &str) -> bool {
    let tokens: Vec<&str> = spec.split_whitespace().collect();
    tokens
        .windows(2)
        .any(|w| (w[0] == "-j" || w[0] == "-g") && table.owns(w[1]))
}

impl FamilyPlan {
    fn table(&self, table: Table) -> Option<&TablePlan> {
        self.tables.iter().find(|t| t.table == table)
    }

    /// The `iptables-restore --noflush` input that takes the tables from
    /// `state` to this plan, one transaction per family.
    ///
    /// Idempotency: declaring a chain (`:NAME - [0:0]`) creates it or, if it
    /// exists, flushes it, so veer's chains are rebuilt from scratch. Jumps
    /// in built-in chains cannot be handled that way without flushing other
    /// people's rules, so the current jumps (from `state`) are reconciled:
    /// ones that match the plan are kept in place, stale or duplicate ones
    /// are deleted, missing ones are appended. veer chains an earlier run
    /// created but this plan does not use are flushed and deleted.
    pub fn render(&self, state: &State) -> String {
        let mut out = String::new();
        let empty = TableState::default();
        for table in Table::ALL {
            let plan = self.table(table);
            let current = state.table(table).unwrap_or(&empty);
            if plan.is_none() && current.is_empty() {
                continue;
            }
            let (chains, rules, jumps): (&[&str], &[Rule], &[Rule]) = match plan {
                Some(p) => (&p.chains, &p.rules, &p.jumps),
                None => (&[], &[], &[]),
            };
            let mut kept = vec![false; current.references.len()];
            let mut missing = Vec::new();
            for jump in jumps {
                match current
                    .references
                    .iter()
                    .enumerate()
                    .position(|(i, r)| !kept[i] && r == jump)
                {
                    Some(i) => kept[i] = true,
                    None => missing.push(jump),
                }
            }
            let stale: Vec<&String> = current
                .chains
                .keys()
                .filter(|c| !chains.contains(&c.as_str()))
                .collect();

            let _ = writeln!(out, "*{}", table.name());
            for chain in chains
                .iter()
                .copied()
                .chain(stale.iter().map(|c| c.as_str()))
            {
                let _ = writeln!(out, ":{chain} - [0:0]");
            }
            for (reference, _) in current.references.iter().zip(&kept).filter(|(_, k)| !**k) {
                let _ = writeln!(out, "-D {} {}", reference.chain, reference.spec);
            }
            for rule in rules.iter().chain(missing) {
                let _ = writeln!(out, "-A {} {}", rule.chain, rule.spec);
            }
            for chain in stale {
                let _ = writeln!(out, "-X {chain}");
            }
            out.push_str("COMMIT\n");
        }
        out
    }

    /// Checks what iptables reports after applying against the plan. Rule
    /// text is not compared, because iptables rewrites it (e.g. adds
    /// `-m tcp`, prints marks in hex); counts and jump targets are enough to
    /// catch a half-applied or duplicated rule set.
    pub fn verify(&self, state: &State) -> Result<(), String> {
        let empty = TableState::default();
        for table in Table::ALL {
            let current = state.table(table).unwrap_or(&empty);
            let Some(plan) = self.table(table) else {
                if !current.is_empty() {
                    return Err(format!(
                        "the {} table still holds veer chains or jumps",
                        table.name()
                    ));
                }
                continue;
            };
            let name = table.name();
            for chain in &plan.chains {
                let want = plan.rules.iter().filter(|r| r.chain == *chain).count();
                match current.chains.get(*chain) {
                    None => return Err(format!("{name} chain {chain} is missing")),
                    Some(have) if have.len() != want => {
                        return Err(format!(
                            "{name} chain {chain} has {} rules, expected {want}",
                            have.len()
                        ))
                    }
                    Some(_) => {}
                }
            }
            if let Some(extra) = current
                .chains
                .keys()
                .find(|c| !plan.chains.contains(&c.as_str()))
            {
                return Err(format!("stale {name} chain {extra} is still present"));
            }
            if current.references.len() != plan.jumps.len() {
                return Err(format!(
                    "{} jumps into veer chains in the {name} table, expected {}",
                    current.references.len(),
                    plan.jumps.len()
                ));
            }
            for jump in &plan.jumps {
                if !current.references.iter().any(|r| r == jump) {
                    return Err(format!(
                        "missing jump `-t {name} -A {} {}`",
                        jump.chain, jump.spec
                    ));
                }
            }
        }
        Ok(())
    }
}

/// The `iptables-restore --noflush` input that removes everything veer-init
/// installed, or `None` when there is nothing to remove (so a cleanup of a
/// clean namespace touches nothing at all).
pub fn render_cleanup(state: &State) -> Option<String> {
    if state.is_empty() {
        return None;
    }
    let mut out = String::new();
    for (table, current) in &state.tables {
        let _ = writeln!(out, "*{}", table.name());
        // Flush first, so no veer chain is still referenced from another veer
        // chain when it is deleted.
        for chain in current.chains.keys() {
            let _ = writeln!(out, ":{chain} - [0:0]");
        }
        for reference in &current.references {
            let _ = writeln!(out, "-D {} {}", reference.chain, reference.spec);
        }
        for chain in current.chains.keys() {
            let _ = writeln!(out, "-X {chain}");
        }
        out.push_str("COMMIT\n");
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    use crate::flags::ISTIO_INJECTED_ARGS as INJECTED;

    fn flags(args: &[&str]) -> Flags {
        Flags::try_parse_from(std::iter::once("veer-init").chain(args.iter().copied()))
            .unwrap_or_else(|e| panic!("{args:?}: {e}"))
    }

    /// The injected default with some flags overridden (later flags win).
    fn injected_with(extra: &[&str]) -> Flags {
        flags(&[INJECTED, extra].concat())
    }

    const V4: &[Family] = &[Family::V4];
    const BOTH: &[Family] = &[Family::V4, Family::V6];

    fn build4(args: &Flags) -> Plan {
        build(args, V4).unwrap()
    }

    /// The IPv4 restore input for a namespace without veer rules.
    fn fresh(args: Flags) -> String {
        let plan = build4(&args);
        assert_eq!(plan.families.len(), 1);
        assert_eq!(plan.families[0].family, Family::V4);
        plan.families[0].render(&State::default())
    }

    /// Both families' restore input, for a namespace without veer rules.
    fn fresh_both(args: &Flags) -> (String, String) {
        let plan = build(args, BOTH).unwrap();
        assert_eq!(plan.families.len(), 2);
        (
            plan.families[0].render(&State::default()),
            plan.families[1].render(&State::default()),
        )
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
        let plan = build4(&injected_with(&["-x", "fd00::/8"]));
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
        assert!(build4(&args).notes[0].contains("--istio-local-exclude-ports"));
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
        let state = State::parse(SAVED);
        assert_eq!(state.tables.len(), 1, "no mangle rules of ours");
        let state = state.table(Table::Nat).unwrap();
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
        let plan = build4(&flags(INJECTED));
        let text = plan.families[0].render(&State::parse(SAVED));
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
        let plan = build4(&injected_with(&["-b", ""]));
        let text = plan.families[0].render(&State::parse(SAVED));
        assert!(
            text.contains("-D PREROUTING -p tcp -j VEER_INBOUND\n"),
            "{text}"
        );
    }

    #[test]
    fn cleanup_text() {
        assert_eq!(render_cleanup(&State::default()), None);
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
        assert_eq!(render_cleanup(&State::parse(SAVED)).as_deref(), Some(want));
    }

    /// What iptables-save would print right after installing `fp` (before
    /// iptables' own rewriting, which verify does not depend on).
    fn saved_after(fp: &FamilyPlan) -> String {
        let mut save = String::new();
        for table in &fp.tables {
            save += &format!("*{}\n", table.table.name());
            for chain in &table.chains {
                save += &format!(":{chain} - [0:0]\n");
            }
            for rule in table.rules.iter().chain(&table.jumps) {
                save += &format!("-A {} {}\n", rule.chain, rule.spec);
            }
            save += "COMMIT\n";
        }
        save
    }

    #[test]
    fn verify_counts_rules_and_jumps() {
        let plan = build4(&injected_with(&["-b", "", "-d", ""]));
        let fp = &plan.families[0];
        let save = saved_after(fp);
        assert_eq!(fp.verify(&State::parse(&save)), Ok(()));
        let doubled = save.replace("COMMIT", "-A OUTPUT -p tcp -j VEER_OUTPUT\nCOMMIT");
        assert!(fp.verify(&State::parse(&doubled)).is_err());
        assert!(fp.verify(&State::default()).is_err());
    }

    /// The nat table of the injected default for IPv6: the IPv4 rules with
    /// ::1 and ::6 (istio's ipv6 goldens), after adding ::6 to lo.
    #[test]
    fn ipv6_injected_default() {
        let (v4, v6) = fresh_both(&flags(INJECTED));
        assert_eq!(
            v4,
            fresh(flags(INJECTED)),
            "IPv4 is unchanged by dual-stack"
        );
        let want = format!(
            "{HEADER}-A VEER_INBOUND -p tcp --dport 15008 -j RETURN
-A VEER_INBOUND -p tcp --dport 15090 -j RETURN
-A VEER_INBOUND -p tcp --dport 15021 -j RETURN
-A VEER_INBOUND -p tcp --dport 15020 -j RETURN
-A VEER_INBOUND -p tcp -j VEER_IN_REDIRECT
-A VEER_REDIRECT -p tcp -j REDIRECT --to-ports 15001
-A VEER_IN_REDIRECT -p tcp -j REDIRECT --to-ports 15006
-A VEER_OUTPUT -s ::6/128 -o lo -j RETURN
{}{}-A VEER_OUTPUT -d ::1/128 -j RETURN
-A VEER_OUTPUT -j VEER_REDIRECT
-A PREROUTING -p tcp -j VEER_INBOUND
-A OUTPUT -p tcp -j VEER_OUTPUT
COMMIT
",
            owner_rules("uid", 1337).replace("127.0.0.1/32", "::1/128"),
            owner_rules("gid", 1337).replace("127.0.0.1/32", "::1/128")
        );
        assert_eq!(v6, want);
        let plan = build(&flags(INJECTED), BOTH).unwrap();
        assert_eq!(plan.families[0].ip_commands, vec![]);
        assert_eq!(
            plan.families[1].ip_commands,
            vec![IpCommand::AddInboundSource]
        );
        assert_eq!(
            IpCommand::AddInboundSource.display(Family::V6),
            "ip -6 addr add ::6/128 dev lo"
        );
    }

    #[test]
    fn dual_stack_splits_cidrs_by_family() {
        let args = injected_with(&[
            "-i",
            "10.96.0.0/12,fd00:10:96::/112",
            "-x",
            "10.0.0.0/8,fd00::/8",
        ]);
        let (v4, v6) = fresh_both(&args);
        assert!(
            v4.ends_with(
                "-A VEER_OUTPUT -d 127.0.0.1/32 -j RETURN
-A VEER_OUTPUT -d 10.0.0.0/8 -j RETURN
-A VEER_OUTPUT -d 10.96.0.0/12 -j VEER_REDIRECT
-A PREROUTING -p tcp -j VEER_INBOUND
-A OUTPUT -p tcp -j VEER_OUTPUT
COMMIT
"
            ),
            "{v4}"
        );
        assert!(
            v6.ends_with(
                "-A VEER_OUTPUT -d ::1/128 -j RETURN
-A VEER_OUTPUT -d fd00::/8 -j RETURN
-A VEER_OUTPUT -d fd00:10:96::/112 -j VEER_REDIRECT
-A PREROUTING -p tcp -j VEER_INBOUND
-A OUTPUT -p tcp -j VEER_OUTPUT
COMMIT
"
            ),
            "{v6}"
        );
        // With both families captured, IPv6 CIDRs are not worth a note.
        assert!(build(&args, BOTH).unwrap().notes.is_empty());
        // A loopback include only affects its own family.
        let (v4, v6) = fresh_both(&injected_with(&["-i", "::1/128"]));
        assert!(v4.contains("-o lo -m owner ! --uid-owner 1337 -j RETURN"));
        assert!(!v6.contains("-o lo -m owner ! --uid-owner 1337 -j RETURN"));
    }

    const TPROXY_MANGLE_V4: &str = "*mangle
:VEER_PREROUTING - [0:0]
:VEER_INBOUND - [0:0]
:VEER_DIVERT - [0:0]
:VEER_TPROXY - [0:0]
:VEER_OUTPUT - [0:0]
-A VEER_PREROUTING -p tcp -j VEER_INBOUND
-A VEER_PREROUTING -p tcp -m mark --mark 1337 -j CONNMARK --save-mark
-A VEER_INBOUND -p tcp -m mark --mark 1337 -j RETURN
-A VEER_INBOUND -p tcp -s 127.0.0.6/32 -i lo -j RETURN
-A VEER_INBOUND -p tcp -i lo -m mark ! --mark 1338 -j RETURN
-A VEER_INBOUND -p tcp --dport 15008 -j RETURN
-A VEER_INBOUND -p tcp --dport 15090 -j RETURN
-A VEER_INBOUND -p tcp --dport 15021 -j RETURN
-A VEER_INBOUND -p tcp --dport 15020 -j RETURN
-A VEER_INBOUND -p tcp -m conntrack --ctstate RELATED,ESTABLISHED -j VEER_DIVERT
-A VEER_INBOUND -p tcp -j VEER_TPROXY
-A VEER_DIVERT -j MARK --set-mark 1337
-A VEER_DIVERT -j ACCEPT
-A VEER_TPROXY ! -d 127.0.0.1/32 -p tcp -j TPROXY --tproxy-mark 1337/0xffffffff --on-port 15006
-A VEER_OUTPUT -p tcp -o lo -m mark --mark 1337 -j RETURN
-A VEER_OUTPUT ! -d 127.0.0.1/32 -p tcp -o lo -m owner --uid-owner 1337 -j MARK --set-mark 1338
-A VEER_OUTPUT ! -d 127.0.0.1/32 -p tcp -o lo -m owner --gid-owner 1337 -j MARK --set-mark 1338
-A VEER_OUTPUT -p tcp -m connmark --mark 1337 -j CONNMARK --restore-mark
-A PREROUTING -j VEER_PREROUTING
-A OUTPUT -j VEER_OUTPUT
COMMIT
";

    /// TPROXY (istio's tproxy golden, in veer's chains): inbound in mangle,
    /// nat keeps only the outbound side, plus policy routing for the mark.
    #[test]
    fn tproxy_injected() {
        let args = injected_with(&["-m", "TPROXY"]);
        let nat = format!(
            "{HEADER}-A VEER_INBOUND -p tcp --dport 15008 -j RETURN
-A VEER_REDIRECT -p tcp -j REDIRECT --to-ports 15001
-A VEER_IN_REDIRECT -p tcp -j REDIRECT --to-ports 15006
-A VEER_OUTPUT -s 127.0.0.6/32 -o lo -j RETURN
-A VEER_OUTPUT -p tcp -m mark --mark 1337 -j RETURN
{}{}-A VEER_OUTPUT -d 127.0.0.1/32 -j RETURN
-A VEER_OUTPUT -j VEER_REDIRECT
-A OUTPUT -p tcp -j VEER_OUTPUT
COMMIT
",
            owner_rules("uid", 1337),
            owner_rules("gid", 1337)
        );
        assert_eq!(fresh(args.clone()), format!("{TPROXY_MANGLE_V4}{nat}"));

        let plan = build(&args, BOTH).unwrap();
        assert!(plan.notes.is_empty(), "{:?}", plan.notes);
        let v4_commands: Vec<String> = plan.families[0]
            .ip_commands
            .iter()
            .map(|c| c.display(Family::V4))
            .collect();
        assert_eq!(
            v4_commands,
            [
                "ip -4 rule add fwmark 1337 lookup 133",
                "ip -4 route replace local 0.0.0.0/0 dev lo table 133"
            ]
        );
        let v6_commands: Vec<String> = plan.families[1]
            .ip_commands
            .iter()
            .map(|c| c.display(Family::V6))
            .collect();
        assert_eq!(
            v6_commands,
            [
                "ip -6 addr add ::6/128 dev lo",
                "ip -6 rule add fwmark 1337 lookup 133",
                "ip -6 route replace local ::/0 dev lo table 133"
            ]
        );
        let v6 = plan.families[1].render(&State::default());
        let v6_mangle = TPROXY_MANGLE_V4
            .replace("127.0.0.1/32", "::1/128")
            .replace("127.0.0.6/32", "::6/128");
        assert!(v6.starts_with(&v6_mangle), "{v6}");
    }

    #[test]
    fn tproxy_custom_mark_table_and_ports() {
        let args = injected_with(&[
            "-m",
            "tproxy",
            "-t",
            "0x100",
            "-r",
            "200",
            "-b",
            "8080,9090",
        ]);
        let text = fresh(args.clone());
        let inbound = "-A VEER_INBOUND -p tcp --dport 15008 -j RETURN
-A VEER_INBOUND -p tcp --dport 8080 -m conntrack --ctstate RELATED,ESTABLISHED -j VEER_DIVERT
-A VEER_INBOUND -p tcp --dport 8080 -j VEER_TPROXY
-A VEER_INBOUND -p tcp --dport 9090 -m conntrack --ctstate RELATED,ESTABLISHED -j VEER_DIVERT
-A VEER_INBOUND -p tcp --dport 9090 -j VEER_TPROXY
-A VEER_DIVERT -j MARK --set-mark 256
";
        assert!(text.contains(inbound), "{text}");
        assert!(text.contains("--tproxy-mark 256/0xffffffff --on-port 15006\n"));
        assert!(
            !text.contains("--dport 15090"),
            "-d only applies with -b '*'"
        );
        let plan = build4(&args);
        assert_eq!(
            plan.families[0].ip_commands[0].display(Family::V4),
            "ip -4 rule add fwmark 256 lookup 200"
        );
    }

    #[test]
    fn tproxy_without_inbound_ports_is_plain_nat() {
        let args = injected_with(&["-m", "TPROXY", "-b", ""]);
        assert_eq!(fresh(args.clone()), fresh(injected_with(&["-b", ""])));
        let plan = build4(&args);
        assert!(plan.families[0].ip_commands.is_empty());
        assert!(
            plan.notes
                .iter()
                .any(|n| n.contains("-m TPROXY has no effect")),
            "{:?}",
            plan.notes
        );
    }

    #[test]
    fn excluded_interfaces() {
        let text = fresh(injected_with(&["-c", "eth1,tun+"]));
        assert!(
            text.contains(
                ":VEER_OUTPUT - [0:0]
-A VEER_INBOUND -i eth1 -j RETURN
-A VEER_INBOUND -i tun+ -j RETURN
-A VEER_INBOUND -p tcp --dport 15008 -j RETURN
"
            ),
            "{text}"
        );
        assert!(
            text.contains(
                "-A VEER_IN_REDIRECT -p tcp -j REDIRECT --to-ports 15006
-A VEER_OUTPUT -o eth1 -j RETURN
-A VEER_OUTPUT -o tun+ -j RETURN
-A VEER_OUTPUT -s 127.0.0.6/32 -o lo -j RETURN
"
            ),
            "{text}"
        );
        assert!(!text.contains("*mangle"), "{text}");

        // TPROXY: the same interfaces are skipped in mangle too.
        let text = fresh(injected_with(&["-c", "eth1", "-m", "TPROXY"]));
        assert!(
            text.contains(
                ":VEER_OUTPUT - [0:0]
-A VEER_PREROUTING -i eth1 -j RETURN
-A VEER_PREROUTING -p tcp -j VEER_INBOUND
"
            ),
            "{text}"
        );
        assert!(
            text.contains(
                "-A VEER_OUTPUT -o eth1 -j RETURN
-A VEER_OUTPUT -p tcp -o lo -m mark --mark 1337 -j RETURN
"
            ),
            "{text}"
        );
        assert!(text.contains("-A VEER_OUTPUT -o eth1 -j RETURN\n-A VEER_OUTPUT -s 127.0.0.6/32"));
    }

    #[test]
    fn kube_virt_interfaces() {
        let text = fresh(injected_with(&["-k", "vm0,vm1"]));
        assert!(
            text.contains(
                ":VEER_OUTPUT - [0:0]
-A VEER_INBOUND -i vm0 -j VEER_REDIRECT
-A VEER_INBOUND -i vm1 -j VEER_REDIRECT
-A VEER_INBOUND -i vm0 -j RETURN
-A VEER_INBOUND -i vm1 -j RETURN
-A VEER_INBOUND -p tcp --dport 15008 -j RETURN
"
            ),
            "{text}"
        );
        // Specific CIDRs, and no inbound capture: the PREROUTING jump stays
        // because the VM's traffic must still be captured.
        let text = fresh(injected_with(&[
            "-k",
            "vm0",
            "-i",
            "10.0.0.0/8,fd00::/8",
            "-b",
            "",
        ]));
        let want = format!(
            "{HEADER}-A VEER_INBOUND -i vm0 -d 10.0.0.0/8 -j VEER_REDIRECT
-A VEER_INBOUND -i vm0 -j RETURN
-A VEER_INBOUND -p tcp --dport 15008 -j RETURN
-A VEER_REDIRECT -p tcp -j REDIRECT --to-ports 15001
-A VEER_IN_REDIRECT -p tcp -j REDIRECT --to-ports 15006
-A VEER_OUTPUT -s 127.0.0.6/32 -o lo -j RETURN
{}{}-A VEER_OUTPUT -d 127.0.0.1/32 -j RETURN
-A VEER_OUTPUT -d 10.0.0.0/8 -j VEER_REDIRECT
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
    fn drop_invalid() {
        let text = fresh(injected_with(&["--drop-invalid"]));
        let mangle = "*mangle
:VEER_PREROUTING - [0:0]
-A VEER_PREROUTING -m conntrack --ctstate INVALID -j DROP
-A PREROUTING -j VEER_PREROUTING
COMMIT
";
        assert_eq!(text, format!("{mangle}{}", fresh(flags(INJECTED))));
        let (_, v6) = fresh_both(&injected_with(&["--drop-invalid"]));
        assert!(v6.starts_with(mangle), "{v6}");
        // With TPROXY, the drop comes after the interface exclusions and
        // before the inbound jump, as in istio.
        let text = fresh(injected_with(&[
            "--drop-invalid",
            "-m",
            "TPROXY",
            "-c",
            "eth9",
        ]));
        assert!(
            text.contains(
                "-A VEER_PREROUTING -i eth9 -j RETURN
-A VEER_PREROUTING -m conntrack --ctstate INVALID -j DROP
-A VEER_PREROUTING -p tcp -j VEER_INBOUND
"
            ),
            "{text}"
        );
    }

    #[test]
    fn redirect_dns_is_accepted_and_noted() {
        let plan = build4(&injected_with(&["--redirect-dns"]));
        assert!(plan.notes[0].contains("--redirect-dns is not supported"));
        assert_eq!(
            plan.families[0].render(&State::default()),
            fresh(flags(INJECTED))
        );
    }

    #[test]
    fn leaving_tproxy_removes_the_mangle_chains() {
        let tproxy = build4(&injected_with(&["-m", "TPROXY", "--drop-invalid"]));
        let installed = State::parse(&saved_after(&tproxy.families[0]));
        assert_eq!(tproxy.families[0].verify(&installed), Ok(()));
        // Re-installing the same is stable: same chains, jumps kept.
        let again = tproxy.families[0].render(&installed);
        assert!(!again.contains("-D "), "{again}");
        assert!(!again.contains("-A PREROUTING"), "{again}");

        // Back to REDIRECT with --drop-invalid: only VEER_PREROUTING stays.
        let redirect = build4(&injected_with(&["--drop-invalid"]));
        let text = redirect.families[0].render(&installed);
        let mangle = "*mangle
:VEER_PREROUTING - [0:0]
:VEER_DIVERT - [0:0]
:VEER_INBOUND - [0:0]
:VEER_OUTPUT - [0:0]
:VEER_TPROXY - [0:0]
-D OUTPUT -j VEER_OUTPUT
-A VEER_PREROUTING -m conntrack --ctstate INVALID -j DROP
-X VEER_DIVERT
-X VEER_INBOUND
-X VEER_OUTPUT
-X VEER_TPROXY
COMMIT
";
        assert!(text.starts_with(mangle), "{text}");
        assert!(text.contains("-A PREROUTING -p tcp -j VEER_INBOUND\n"));

        // And to plain REDIRECT: the whole mangle part goes.
        let plain = build4(&flags(INJECTED));
        let text = plain.families[0].render(&installed);
        assert!(
            text.contains("-D PREROUTING -j VEER_PREROUTING\n"),
            "{text}"
        );
        assert!(text.contains("-X VEER_PREROUTING\n"), "{text}");
        assert!(
            plain.families[0].verify(&installed).is_err(),
            "stale mangle chains are reported"
        );
    }

    #[test]
    fn cleanup_covers_mangle() {
        let tproxy = build4(&injected_with(&["-m", "TPROXY"]));
        let installed = State::parse(&saved_after(&tproxy.families[0]));
        let text = render_cleanup(&installed).unwrap();
        assert!(text.starts_with("*mangle\n"), "{text}");
        for line in [
            "-D PREROUTING -j VEER_PREROUTING",
            "-D OUTPUT -j VEER_OUTPUT",
            "-X VEER_TPROXY",
            "*nat",
            "-D OUTPUT -p tcp -j VEER_OUTPUT",
            "-X VEER_REDIRECT",
        ] {
            assert!(text.lines().any(|l| l == line), "`{line}` in\n{text}");
        }
        assert!(
            !text.contains("-D PREROUTING -p tcp -j VEER_INBOUND"),
            "{text}"
        );
    }
}
