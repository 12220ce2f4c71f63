//! veer-init: run as a Kubernetes init container (or by hand) to install the
//! iptables rules that send a pod's TCP traffic through the veer sidecar,
//! then prove that they do.

#![forbid(unsafe_code)]

use std::process::ExitCode;

use clap::Parser;
use veer_init::apply::{self, Backend};
use veer_init::flags::Flags;
use veer_init::plan::{self, Family, State};
use veer_init::validate::{self, Client, ProbeChild, Target};
use veer_init::Error;

fn main() -> ExitCode {
    let flags = Flags::parse();
    let result = if flags.probe_client {
        validate::probe_client_loop()
    } else {
        run(&flags)
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(message) => {
            eprintln!("veer-init: error: {message}");
            ExitCode::FAILURE
        }
    }
}

fn log(message: &str) {
    eprintln!("veer-init: {message}");
}

fn run(flags: &Flags) -> Result<(), String> {
    // Cleanup does not depend on the capture flags (they may even be ones
    // this version rejects), so it skips planning.
    if flags.cleanup_only && !flags.dry_run {
        apply::check_capabilities().map_err(|e| e.to_string())?;
        drop_privileges()?;
        let backend = choose_backend(flags)?;
        return cleanup(flags, backend);
    }

    let (families, why) = apply::choose_families(flags.dual_stack).map_err(|e| e.to_string())?;
    let plan = plan::build(flags, &families).map_err(|e| e.to_string())?;
    for note in &plan.notes {
        log(&format!("note: {note}"));
    }

    if flags.dry_run {
        print_dry_run(flags, &plan);
        return Ok(());
    }
    let apply_rules = !flags.skip_rule_apply;
    let validate = flags.run_validation || (apply_rules && !flags.skip_validation);
    if !apply_rules && !validate {
        log("--skip-rule-apply without --run-validation: nothing to do");
        return Ok(());
    }
    if apply_rules {
        apply::check_capabilities().map_err(|e| e.to_string())?;
    }
    log(&format!("capturing {why}"));
    // The probe client must be started while veer-init may still change its
    // uid, i.e. before the privileges are dropped.
    let client = if validate {
        Some(probe_client(flags))
    } else {
        None
    };
    drop_privileges()?;

    if apply_rules {
        let backend = choose_backend(flags)?;
        for family in &plan.families {
            let done = apply::install(backend, family)
                .map_err(|e| context("installing", family.family, backend, e))?;
            log(&format!(
                "installed the {} capture rules with:\n{done}",
                family.family.name()
            ));
            // The final tables, as istio-iptables logs them: what an operator
            // wants to see in `kubectl logs` when traffic goes astray.
            if let Ok(saved) = apply::save(backend, family.family) {
                log(&format!("{} tables now:\n{saved}", family.family.name()));
            }
        }
    }

    match client {
        None => Ok(()),
        Some(Ok(mut client)) => self_check(flags, &plan, &mut client),
        Some(Err(reason)) if flags.run_validation => {
            Err(format!("capture self-check cannot run: {reason}"))
        }
        Some(Err(reason)) => {
            log(&format!(
                "warning: capture self-check skipped: {reason} (pass --skip-validation to \
                 silence this)"
            ));
            Ok(())
        }
    }
}

/// Prints the restore input of each family (the headers and the `ip`
/// commands are comments, so each block is valid restore input as is).
fn print_dry_run(flags: &Flags, plan: &plan::Plan) {
    // Offline on purpose: no capabilities or binaries are needed, so the
    // text shown is for a namespace without veer rules yet.
    for family in &plan.families {
        let name = family.family.name();
        let tool = match family.family {
            Family::V4 => "iptables-restore",
            Family::V6 => "ip6tables-restore",
        };
        if flags.cleanup_only {
            let installed = State::parse(&family.render(&State::default()));
            println!("# {name}: input for `{tool} --noflush`");
            print!("{}", plan::render_cleanup(&installed).unwrap_or_default());
            continue;
        }
        for command in &family.ip_commands {
            println!("# {name}: first runs `{}`", command.display(family.family));
        }
        println!("# {name}: input for `{tool} --noflush`");
        print!("{}", family.render(&State::default()));
    }
}

/// Who will open the probe connections, or why nobody can.
fn probe_client(flags: &Flags) -> Result<Client, String> {
    let euid = current_euid();
    if flags.proxy_uid.0.contains(&euid) {
        return Ok(Client::InProcess);
    }
    let (uid, gid) = (flags.proxy_uid.0[0], flags.proxy_gids().0[0]);
    if !apply::can_switch_user() {
        return Err(format!(
            "veer-init runs as uid {euid} without CAP_SETUID and CAP_SETGID, so it cannot open \
             the probe connection as the proxy uid {uid}; add SETUID and SETGID to the init \
             container's capabilities (veer-init uses them only to start the probe client and \
             then drops them), or run `veer-init --run-validation --skip-rule-apply` in a second \
             init container with `runAsUser: {uid}`, which needs no capabilities"
        ));
    }
    ProbeChild::spawn(uid, gid)
        .map(Client::Child)
        .map_err(|e| format!("starting the probe client as uid {uid}: {e}"))
}

fn current_euid() -> u32 {
    nix::unistd::geteuid().as_raw()
}

fn self_check(flags: &Flags, plan: &plan::Plan, client: &mut Client) -> Result<(), String> {
    for family in &plan.families {
        let target = Target::new(flags, family.family);
        match validate::check(flags, &target, client).map_err(|e| e.to_string())? {
            Ok(how) => log(&format!(
                "capture self-check passed for {}: {how}",
                family.family.name()
            )),
            Err(validate::Unavailable(reason)) if flags.run_validation => {
                return Err(format!("capture self-check cannot run: {reason}"))
            }
            Err(validate::Unavailable(reason)) => {
                log(&format!("warning: capture self-check skipped: {reason}"));
                return Ok(());
            }
        }
    }
    Ok(())
}

/// Keeps CAP_NET_ADMIN and CAP_NET_RAW and nothing else, before anything in
/// the system is touched.
fn drop_privileges() -> Result<(), String> {
    let dropped = apply::drop_capabilities(&apply::NEEDED)
        .map_err(|e| format!("dropping capabilities: {e}"))?;
    if !dropped.is_empty() {
        log(&format!(
            "keeping only CAP_NET_ADMIN and CAP_NET_RAW; dropped {} other capabilities",
            dropped.len()
        ));
    }
    Ok(())
}

/// Picks the backend and logs the choice with its reason.
fn choose_backend(flags: &Flags) -> Result<Backend, String> {
    let detection = apply::detect_backend(flags.iptables_backend).map_err(|e| match e {
        Error::MissingIptables { .. } => e.to_string(),
        other => format!("choosing an iptables backend: {other}"),
    })?;
    log(&format!(
        "using {} ({})",
        detection.backend.name(),
        detection.reason
    ));
    Ok(detection.backend)
}

fn cleanup(flags: &Flags, backend: Backend) -> Result<(), String> {
    for family in [Family::V4, Family::V6] {
        if family == Family::V6 && !apply::ipv6_status().enabled {
            continue;
        }
        let removed =
            apply::cleanup(backend, family).map_err(|e| context("removing", family, backend, e))?;
        match removed {
            Some(input) => log(&format!(
                "removed the {} capture rules with:\n{input}",
                family.name()
            )),
            None => log(&format!(
                "no {} capture rules were installed; nothing to remove",
                family.name()
            )),
        }
        // Best effort: an image without iproute2 never installed routes.
        match apply::cleanup_routes(family, flags.tproxy_mark, flags.tproxy_route_table) {
            Ok(done) => {
                for line in done {
                    log(&format!("removed TPROXY routing: {line}"));
                }
            }
            Err(Error::Spawn { .. }) => {}
            Err(e) => {
                return Err(format!(
                    "removing the {} TPROXY routing: {e}",
                    family.name()
                ))
            }
        }
    }
    Ok(())
}

fn context(verb: &str, family: Family, backend: Backend, e: Error) -> String {
    format!(
        "{verb} the {} capture rules with {}: {e}",
        family.name(),
        backend.restore_command(family)
    )
}
