//! The part of veer-init that changes the system: capabilities, choosing an
//! iptables binary, reading and restoring tables, and the `ip` commands for
//! IPv6 and TPROXY.

use std::collections::BTreeSet;
use std::io::{ErrorKind, Write};
use std::process::{Command, Stdio};

use caps::{CapSet, Capability, CapsHashSet};

use crate::flags::BackendChoice;
use crate::plan::{self, Family, FamilyPlan, IpCommand, State};
use crate::Error;

/// What veer-init needs: NET_ADMIN to change rules, addresses and routes,
/// NET_RAW because iptables (legacy) opens raw sockets.
pub const NEEDED: [Capability; 2] = [Capability::CAP_NET_ADMIN, Capability::CAP_NET_RAW];

fn effective() -> Result<CapsHashSet, Error> {
    caps::read(None, CapSet::Effective).map_err(|e| Error::Capabilities(e.to_string()))
}

/// Fails with one actionable sentence unless CAP_NET_ADMIN and CAP_NET_RAW
/// are effective. Checked up front because iptables' own message for this
/// ("Permission denied (you must be root)") is misleading in a container
/// that is root.
pub fn check_capabilities() -> Result<(), Error> {
    let have = effective()?;
    let missing: Vec<String> = NEEDED
        .iter()
        .filter(|c| !have.contains(c))
        .map(ToString::to_string)
        .collect();
    if missing.is_empty() {
        Ok(())
    } else {
        Err(Error::MissingCapabilities {
            missing: missing.join(" and "),
        })
    }
}

/// Whether this process may start the probe client as another uid.
pub fn can_switch_user() -> bool {
    effective()
        .map(|have| {
            have.contains(&Capability::CAP_SETUID) && have.contains(&Capability::CAP_SETGID)
        })
        .unwrap_or(false)
}

/// Drops every capability except `keep` from every set, so that neither
/// veer-init nor the iptables and ip commands it runs hold more. Returns
/// what was given up, for the log. The bounding set (what root regains on
/// exec) can only be reduced while CAP_SETPCAP is held, so it goes first.
pub fn drop_capabilities(keep: &[Capability]) -> Result<Vec<String>, Error> {
    let fail = |e: caps::errors::CapsError| Error::Capabilities(e.to_string());
    let keep: CapsHashSet = keep.iter().copied().collect();
    let permitted = caps::read(None, CapSet::Permitted).map_err(fail)?;
    let mut dropped: BTreeSet<String> = permitted
        .difference(&keep)
        .map(ToString::to_string)
        .collect();
    if effective()?.contains(&Capability::CAP_SETPCAP) {
        for cap in caps::read(None, CapSet::Bounding).map_err(fail)? {
            if !keep.contains(&cap) {
                caps::drop(None, CapSet::Bounding, cap).map_err(fail)?;
                dropped.insert(cap.to_string());
            }
        }
    }
    caps::clear(None, CapSet::Ambient).map_err(fail)?;
    caps::clear(None, CapSet::Inheritable).map_err(fail)?;
    let kept: CapsHashSet = permitted.intersection(&keep).copied().collect();
    caps::set(None, CapSet::Effective, &kept).map_err(fail)?;
    caps::set(None, CapSet::Permitted, &kept).map_err(fail)?;
    Ok(dropped.into_iter().collect())
}

/// What /proc/net/if_inet6 says about IPv6 in this network namespace.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Ipv6Status {
    /// The kernel has IPv6 (the file exists).
    pub enabled: bool,
    /// `interface address` of global-scope addresses on interfaces other
    /// than lo (ULAs such as fd00::/8 count: they are global scope).
    pub global: Vec<String>,
}

pub fn ipv6_status() -> Ipv6Status {
    match std::fs::read_to_string("/proc/net/if_inet6") {
        Ok(text) => parse_if_inet6(&text),
        Err(_) => Ipv6Status::default(),
    }
}

fn parse_if_inet6(text: &str) -> Ipv6Status {
    let mut status = Ipv6Status {
        enabled: true,
        global: Vec::new(),
    };
    for line in text.lines() {
        let fields: Vec<&str> = line.split_whitespace().collect();
        let [hex, _index, _prefix, scope, _flags, name] = fields[..] else {
            continue;
        };
        if name == "lo" || scope != "00" {
            continue;
        }
        if let Some(addr) = parse_hex_v6(hex) {
            status.global.push(format!("{name} {addr}"));
        }
    }
    status
}

fn parse_hex_v6(hex: &str) -> Option<std::net::Ipv6Addr> {
    u128::from_str_radix(hex, 16).ok().map(Into::into)
}

/// Whether ::6 (the inbound forwarder's IPv6 source) is on lo.
pub fn ipv6_inbound_source_present() -> bool {
    std::fs::read_to_string("/proc/net/if_inet6")
        .map(|text| {
            text.lines().any(|line| {
                let fields: Vec<&str> = line.split_whitespace().collect();
                fields.first().and_then(|h| parse_hex_v6(h))
                    == Some(std::net::Ipv6Addr::new(0, 0, 0, 0, 0, 0, 0, 6))
                    && fields.last() == Some(&"lo")
            })
        })
        .unwrap_or(false)
}

/// The families to capture and why: IPv4 always (as istio), IPv6 with
/// --dual-stack or when the pod has a global IPv6 address.
pub fn choose_families(dual_stack: bool) -> Result<(Vec<Family>, String), Error> {
    let status = ipv6_status();
    if dual_stack {
        if !status.enabled {
            return Err(Error::NoIpv6);
        }
        return Ok((
            vec![Family::V4, Family::V6],
            "IPv4 and IPv6 (--dual-stack)".to_string(),
        ));
    }
    match status.global.first() {
        Some(addr) => Ok((
            vec![Family::V4, Family::V6],
            format!("IPv4 and IPv6 (the pod has IPv6 address {addr})"),
        )),
        None => Ok((
            vec![Family::V4],
            "IPv4 only (no global IPv6 address in this pod; --dual-stack forces IPv6)".to_string(),
        )),
    }
}

/// Which iptables implementation to drive.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    Legacy,
    Nft,
    /// Whatever `iptables` on PATH is; the last resort.
    Plain,
}

impl Backend {
    pub fn name(self) -> &'static str {
        match self {
            Backend::Legacy => "iptables-legacy",
            Backend::Nft => "iptables-nft",
            Backend::Plain => "iptables",
        }
    }

    fn command(self, family: Family, tool: &str) -> String {
        let base = match family {
            Family::V4 => "iptables",
            Family::V6 => "ip6tables",
        };
        match self {
            Backend::Legacy => format!("{base}-legacy-{tool}"),
            Backend::Nft => format!("{base}-nft-{tool}"),
            Backend::Plain => format!("{base}-{tool}"),
        }
    }

    pub fn save_command(self, family: Family) -> String {
        self.command(family, "save")
    }

    pub fn restore_command(self, family: Family) -> String {
        self.command(family, "restore")
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Detection {
    pub backend: Backend,
    /// Why this backend, for the log.
    pub reason: String,
}

/// Picks the backend as design.md §3 (and istio) does: iptables-legacy only
/// if it works and already holds rules in this namespace (someone set the
/// namespace up with it, and mixing the two would split the rule set), else
/// iptables-nft if it works, else plain `iptables`.
pub fn detect_backend(choice: BackendChoice) -> Result<Detection, Error> {
    let probe = |backend: Backend| run(&backend.save_command(Family::V4), &[], None);
    match choice {
        BackendChoice::Legacy | BackendChoice::Nft => {
            let backend = if choice == BackendChoice::Legacy {
                Backend::Legacy
            } else {
                Backend::Nft
            };
            probe(backend)
                .map(|_| Detection {
                    backend,
                    reason: "requested with --iptables-backend".to_string(),
                })
                .map_err(|e| Error::BackendUnusable {
                    backend: backend.name().to_string(),
                    detail: e.to_string(),
                })
        }
        BackendChoice::Auto => {
            let mut missing = 0;
            let mut failures = Vec::new();
            let mut note = |backend: Backend, e: Error| {
                if matches!(&e, Error::Spawn { source, .. } if source.kind() == ErrorKind::NotFound)
                {
                    missing += 1;
                }
                failures.push(format!("{}: {e}", backend.name()));
                format!("{} does not work", backend.name())
            };
            let legacy = match probe(Backend::Legacy) {
                Ok(out) if holds_rules(&out) => {
                    return Ok(Detection {
                        backend: Backend::Legacy,
                        reason: "iptables-legacy already holds rules in this network namespace"
                            .to_string(),
                    })
                }
                Ok(_) => "iptables-legacy holds no rules here".to_string(),
                Err(e) => note(Backend::Legacy, e),
            };
            let nft = match probe(Backend::Nft) {
                Ok(_) => {
                    return Ok(Detection {
                        backend: Backend::Nft,
                        reason: format!("{legacy}, and iptables-nft works"),
                    })
                }
                Err(e) => note(Backend::Nft, e),
            };
            match probe(Backend::Plain) {
                Ok(_) => Ok(Detection {
                    backend: Backend::Plain,
                    reason: format!("{legacy}, {nft}, falling back to iptables"),
                }),
                Err(e) => {
                    note(Backend::Plain, e);
                    if missing == 3 {
                        Err(Error::MissingIptables {
                            tried: "iptables-legacy-save, iptables-nft-save and iptables-save"
                                .to_string(),
                        })
                    } else {
                        Err(Error::BackendUnusable {
                            backend: "any".to_string(),
                            detail: failures.join("; "),
                        })
                    }
                }
            }
        }
    }
}

/// Whether iptables-save output contains at least one rule.
fn holds_rules(save: &str) -> bool {
    save.lines().any(|line| line.starts_with("-A "))
}

/// The current tables of one family, as iptables-save prints them.
pub fn save(backend: Backend, family: Family) -> Result<String, Error> {
    run(&backend.save_command(family), &[], None)
}

pub fn read_state(backend: Backend, family: Family) -> Result<State, Error> {
    save(backend, family).map(|save| State::parse(&save))
}

/// Feeds restore input to `iptables-restore --noflush`: one call per family.
pub fn restore(backend: Backend, family: Family, input: &str) -> Result<(), Error> {
    // --wait: the legacy backend takes a host-wide lock file; wait for it
    // rather than fail if another process holds it.
    run(
        &backend.restore_command(family),
        &["--noflush", "--wait=30"],
        Some(input),
    )
    .map(drop)
}

/// Runs the plan's `ip` commands, then brings the tables of `plan.family`
/// to the plan and checks the result. Returns what was done, for the log.
pub fn install(backend: Backend, plan: &FamilyPlan) -> Result<String, Error> {
    let mut done = String::new();
    for command in &plan.ip_commands {
        if let Some(line) = run_ip(plan.family, command)? {
            done.push_str(&format!("{line}\n"));
        }
    }
    let before = read_state(backend, plan.family)?;
    let input = plan.render(&before);
    restore(backend, plan.family, &input)?;
    let after = read_state(backend, plan.family)?;
    plan.verify(&after).map_err(Error::Verify)?;
    done.push_str(&input);
    Ok(done)
}

/// Runs one `ip` command idempotently; `None` when there was nothing to do.
fn run_ip(family: Family, command: &IpCommand) -> Result<Option<String>, Error> {
    let args = command.args(family);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let shown = command.display(family);
    match command {
        IpCommand::Rule { mark, table } => {
            let (mark, table) = (mark.to_string(), table.to_string());
            let existing = run(
                "ip",
                &[
                    family.ip_flag(),
                    "rule",
                    "show",
                    "fwmark",
                    &mark,
                    "lookup",
                    &table,
                ],
                None,
            )?;
            if !existing.trim().is_empty() {
                return Ok(None);
            }
            run("ip", &args, None)?;
        }
        IpCommand::AddInboundSource => {
            if ipv6_inbound_source_present() {
                return Ok(None);
            }
            match run("ip", &args, None) {
                // Added meanwhile: fine.
                Err(Error::CommandFailed { stderr, .. })
                    if stderr.contains("File exists") || stderr.contains("already assigned") =>
                {
                    return Ok(None)
                }
                other => {
                    other?;
                }
            }
        }
        IpCommand::LocalRoute { .. } => {
            run("ip", &args, None)?;
        }
    }
    Ok(Some(format!("# {shown}")))
}

/// Removes veer's jumps and chains from the tables of `family`. Returns the
/// restore input applied, or `None` when there was nothing to remove.
pub fn cleanup(backend: Backend, family: Family) -> Result<Option<String>, Error> {
    let before = read_state(backend, family)?;
    let Some(input) = plan::render_cleanup(&before) else {
        return Ok(None);
    };
    restore(backend, family, &input)?;
    let after = read_state(backend, family)?;
    if !after.is_empty() {
        return Err(Error::Verify(format!(
            "veer chains or jumps are still present after cleanup: {after:?}"
        )));
    }
    Ok(Some(input))
}

/// Removes the TPROXY policy routing (`ip rule` and the local route) for
/// `mark`/`table`, if present. Returns what was removed.
pub fn cleanup_routes(family: Family, mark: u32, table: u32) -> Result<Vec<String>, Error> {
    let (mark, table) = (mark.to_string(), table.to_string());
    let flag = family.ip_flag();
    let mut removed = Vec::new();
    // `ip rule add` does not refuse duplicates, so there may be several.
    for _ in 0..16 {
        let rule = ["rule", "show", "fwmark", &mark, "lookup", &table];
        if run("ip", &[&[flag][..], &rule[..]].concat(), None)?
            .trim()
            .is_empty()
        {
            break;
        }
        let del = ["rule", "del", "fwmark", &mark, "lookup", &table];
        run("ip", &[&[flag][..], &del[..]].concat(), None)?;
        removed.push(format!("ip {flag} rule del fwmark {mark} lookup {table}"));
    }
    let routes = run("ip", &[flag, "route", "show", "table", &table], None).unwrap_or_default();
    if routes
        .lines()
        .any(|l| l.starts_with("local default dev lo"))
    {
        let default = if family == Family::V4 {
            "0.0.0.0/0"
        } else {
            "::/0"
        };
        run(
            "ip",
            &[
                flag, "route", "del", "local", default, "dev", "lo", "table", &table,
            ],
            None,
        )?;
        removed.push(format!(
            "ip {flag} route del local {default} dev lo table {table}"
        ));
    }
    Ok(removed)
}

/// Runs a command to completion, returning its stdout; stderr goes into the
/// error so the operator sees iptables' own explanation.
fn run(program: &str, args: &[&str], stdin: Option<&str>) -> Result<String, Error> {
    let command = std::iter::once(program)
        .chain(args.iter().copied())
        .collect::<Vec<_>>()
        .join(" ");
    let spawn_error = |source| Error::Spawn {
        command: command.clone(),
        source,
    };
    let mut child = Command::new(program)
        .args(args)
        .stdin(if stdin.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(spawn_error)?;
    if let (Some(input), Some(mut pipe)) = (stdin, child.stdin.take()) {
        // Dropping the pipe at the end of this block closes it, which is
        // what tells iptables-restore the input is complete.
        pipe.write_all(input.as_bytes()).map_err(spawn_error)?;
    }
    let output = child.wait_with_output().map_err(spawn_error)?;
    if output.status.success() {
        Ok(String::from_utf8_lossy(&output.stdout).into_owned())
    } else {
        Err(Error::CommandFailed {
            command,
            status: output.status,
            stderr: String::from_utf8_lossy(&output.stderr).trim().to_string(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn command_names_per_backend_and_family() {
        assert_eq!(
            Backend::Legacy.restore_command(Family::V4),
            "iptables-legacy-restore"
        );
        assert_eq!(Backend::Nft.save_command(Family::V4), "iptables-nft-save");
        assert_eq!(
            Backend::Plain.restore_command(Family::V6),
            "ip6tables-restore"
        );
        assert_eq!(
            Backend::Nft.restore_command(Family::V6),
            "ip6tables-nft-restore"
        );
    }

    #[test]
    fn rules_are_detected_in_save_output() {
        assert!(!holds_rules(
            "# comment\n*nat\n:OUTPUT ACCEPT [0:0]\nCOMMIT\n"
        ));
        assert!(holds_rules(
            "*filter\n:INPUT ACCEPT [0:0]\n-A INPUT -j ACCEPT\nCOMMIT\n"
        ));
    }

    #[test]
    fn ipv6_addresses_are_read_from_if_inet6() {
        let text = "00000000000000000000000000000001 01 80 10 80       lo
00000000000000000000000000000006 01 80 80 80       lo
fe800000000000000000000000000001 02 40 20 80     eth0
fd000099000000000000000000000002 02 40 00 80     eth0
";
        let status = parse_if_inet6(text);
        assert!(status.enabled);
        assert_eq!(status.global, ["eth0 fd00:99::2"]);
        let link_local_only =
            parse_if_inet6("fe800000000000000000000000000001 02 40 20 80     eth0\n");
        assert!(link_local_only.global.is_empty());
    }

    #[test]
    fn missing_program_is_a_spawn_error() {
        let err = run("veer-init-no-such-program", &[], None).unwrap_err();
        assert!(
            matches!(&err, Error::Spawn { source, .. } if source.kind() == ErrorKind::NotFound),
            "{err:?}"
        );
    }

    #[test]
    fn failing_program_reports_its_stderr() {
        let err = run("sh", &["-c", "echo nope >&2; exit 3"], None).unwrap_err();
        assert!(err.to_string().contains("nope"), "{err}");
        let out = run("cat", &[], Some("restore input")).unwrap();
        assert_eq!(out, "restore input");
    }
}
