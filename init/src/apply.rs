//! The only part of veer-init that touches the system: the capability check,
//! choosing an iptables binary, reading the nat table, and applying restore
//! input.

use std::io::{ErrorKind, Write};
use std::process::{Command, Stdio};

use caps::{CapSet, Capability};

use crate::flags::BackendChoice;
use crate::plan::{self, Family, FamilyPlan, NatState};
use crate::Error;

/// Fails with one actionable sentence unless CAP_NET_ADMIN is effective.
/// Checked up front because iptables' own message for this ("Permission
/// denied (you must be root)") is misleading in a container that is root.
pub fn check_net_admin() -> Result<(), Error> {
    let has = caps::has_cap(None, CapSet::Effective, Capability::CAP_NET_ADMIN)
        .map_err(|e| Error::Capabilities(e.to_string()))?;
    if has {
        Ok(())
    } else {
        Err(Error::MissingNetAdmin)
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

/// The current nat table of one family, as iptables-save prints it.
pub fn save_nat(backend: Backend, family: Family) -> Result<String, Error> {
    run(&backend.save_command(family), &["-t", "nat"], None)
}

pub fn read_state(backend: Backend, family: Family) -> Result<NatState, Error> {
    save_nat(backend, family).map(|save| NatState::parse(&save))
}

/// Feeds restore input to `iptables-restore --noflush`: one call per family,
/// so the kernel sees the whole change or none of it.
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

/// Brings the nat table of `plan.family` to the plan and checks the result.
/// Returns the restore input that was applied.
pub fn install(backend: Backend, plan: &FamilyPlan) -> Result<String, Error> {
    let before = read_state(backend, plan.family)?;
    let input = plan.render(&before);
    restore(backend, plan.family, &input)?;
    let after = read_state(backend, plan.family)?;
    plan.verify(&after).map_err(Error::Verify)?;
    Ok(input)
}

/// Removes veer's jumps and chains from the nat table of `family`. Returns
/// the restore input applied, or `None` when there was nothing to remove.
pub fn cleanup(backend: Backend, family: Family) -> Result<Option<String>, Error> {
    let before = read_state(backend, family)?;
    let Some(input) = plan::render_cleanup(&before) else {
        return Ok(None);
    };
    restore(backend, family, &input)?;
    let after = read_state(backend, family)?;
    if after != NatState::default() {
        return Err(Error::Verify(format!(
            "veer chains or jumps are still present after cleanup: {after:?}"
        )));
    }
    Ok(Some(input))
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
