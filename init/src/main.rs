//! veer-init: run as a Kubernetes init container (or by hand) to install the
//! iptables rules that send a pod's TCP traffic through the veer sidecar.

#![forbid(unsafe_code)]

use std::process::ExitCode;

use clap::Parser;
use veer_init::apply::{self, Backend};
use veer_init::flags::Flags;
use veer_init::plan::{self, Family, NatState};
use veer_init::Error;

fn main() -> ExitCode {
    let flags = Flags::parse();
    match run(&flags) {
        Ok(()) => ExitCode::SUCCESS,
        Err(message) => {
            eprintln!("veer-init: error: {message}");
            ExitCode::FAILURE
        }
    }
}

fn run(flags: &Flags) -> Result<(), String> {
    // Cleanup does not depend on the capture flags (they may even be ones
    // this version rejects), so it skips planning.
    if flags.cleanup_only && !flags.dry_run {
        let backend = prepare(flags)?;
        return cleanup(backend);
    }

    let plan = plan::build(flags).map_err(|e| e.to_string())?;
    for note in &plan.notes {
        eprintln!("veer-init: note: {note}");
    }

    if flags.dry_run {
        // Offline on purpose: no capabilities or binaries are needed, so the
        // text shown is for a namespace without veer rules yet. The output is
        // itself valid restore input (the headers are comments).
        for family in &plan.families {
            let text = if flags.cleanup_only {
                let installed = NatState::parse(&family.render(&NatState::default()));
                plan::render_cleanup(&installed).unwrap_or_default()
            } else {
                family.render(&NatState::default())
            };
            println!(
                "# {} nat table: input for `iptables-restore --noflush`",
                family.family.name()
            );
            print!("{text}");
        }
        return Ok(());
    }

    let backend = prepare(flags)?;
    for family in &plan.families {
        let input = apply::install(backend, family)
            .map_err(|e| context("installing", family.family, backend, e))?;
        eprintln!(
            "veer-init: installed the {} capture rules with:\n{input}",
            family.family.name()
        );
        // The final table, as istio-iptables logs it: what an operator wants
        // to see in `kubectl logs` when traffic goes astray.
        if let Ok(saved) = apply::save_nat(backend, family.family) {
            eprintln!(
                "veer-init: {} nat table now:\n{saved}",
                family.family.name()
            );
        }
    }
    Ok(())
}

/// Checks the preconditions for touching iptables and picks the backend.
fn prepare(flags: &Flags) -> Result<Backend, String> {
    // Both precondition errors are complete sentences on their own, so they
    // are passed through without a context prefix.
    apply::check_net_admin().map_err(|e| e.to_string())?;
    let detection = apply::detect_backend(flags.iptables_backend).map_err(|e| match e {
        Error::MissingIptables { .. } => e.to_string(),
        other => format!("choosing an iptables backend: {other}"),
    })?;
    eprintln!(
        "veer-init: using {} ({})",
        detection.backend.name(),
        detection.reason
    );
    Ok(detection.backend)
}

fn cleanup(backend: Backend) -> Result<(), String> {
    for &family in plan::FAMILIES {
        let removed =
            apply::cleanup(backend, family).map_err(|e| context("removing", family, backend, e))?;
        match removed {
            Some(input) => eprintln!(
                "veer-init: removed the {} capture rules with:\n{input}",
                family.name()
            ),
            None => eprintln!(
                "veer-init: no {} capture rules were installed; nothing to remove",
                family.name()
            ),
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
