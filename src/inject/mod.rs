//! `veer inject`: add the veer sidecar to Kubernetes manifests, the way
//! `istioctl kube-inject` adds Istio's.
//!
//! Input is multi-document YAML (or a `kind: List`). Pods and the pod templates of
//! Deployments, ReplicaSets, StatefulSets, DaemonSets, Jobs, CronJobs and
//! ReplicationControllers get, unless they opt out with Istio's `sidecar.istio.io/inject`
//! label or annotation (the label wins):
//!
//! - an init container `veer-init` with istio-iptables flags derived from the
//!   `traffic.sidecar.istio.io/*` annotations (see [`pod::init_args`]);
//! - the `veer-proxy` container (`veer proxy` as uid/gid 1337, read-only root, no
//!   capabilities), reading its config from a ConfigMap volume and the pod's labels from a
//!   downward-API volume; with `--native-sidecar`, an init container with
//!   `restartPolicy: Always` instead (Kubernetes >= 1.29);
//! - a `sidecar.istio.io/status` annotation listing what was added.
//!
//! Documents are split as text ([`split`]) and every document whose injection changes
//! nothing — Services, ConfigMaps, opted-out or already injected workloads — is written back
//! byte for byte, comments included. A rewritten document keeps the comments before and
//! after its content; comments inside it are lost (serde_yaml drops them). Injecting the
//! output again gives the same output.

pub mod pod;
pub mod split;
pub mod wait;

use std::io::{Read, Write};
use std::path::PathBuf;
use std::process::ExitCode;

use serde_yaml::Value;

pub use wait::WaitArgs;

/// Placeholder image: build one from this repository with `veer` as its entrypoint and
/// `veer-init` on the PATH, and push it where the cluster pulls from.
pub const DEFAULT_IMAGE: &str = "veer:0.1.0";
/// The ConfigMap (in the pod's namespace) mounted at /etc/veer/config.
pub const DEFAULT_CONFIG_MAP: &str = "veer-config";

/// What `veer inject` adds, beyond what the pods' annotations say.
#[derive(Debug, Clone)]
pub struct Options {
    /// Image of both the init container and the proxy.
    pub image: String,
    /// ConfigMap holding the proxy's config files.
    pub config_map: String,
    /// The proxy as a native sidecar (init container with `restartPolicy: Always`).
    pub native_sidecar: bool,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            image: DEFAULT_IMAGE.into(),
            config_map: DEFAULT_CONFIG_MAP.into(),
            native_sidecar: false,
        }
    }
}

/// `veer inject` command-line arguments.
#[derive(clap::Args, Debug, Clone)]
pub struct InjectArgs {
    /// Manifest to inject into (multi-document YAML or a List); `-` for standard input.
    #[arg(long = "filename", short = 'f')]
    pub filename: String,
    /// Where to write the result (default: standard output). Written only on success.
    #[arg(long, short = 'o')]
    pub output: Option<PathBuf>,
    /// Inject the proxy as a native sidecar: an init container with `restartPolicy: Always`
    /// (Kubernetes >= 1.29), started before and stopped after the app, so Jobs complete.
    #[arg(long)]
    pub native_sidecar: bool,
    /// Image of the injected containers (`veer` entrypoint, `veer-init` on the PATH).
    #[arg(long, default_value = DEFAULT_IMAGE)]
    pub image: String,
    /// ConfigMap in the pod's namespace with the proxy's config files.
    #[arg(long, default_value = DEFAULT_CONFIG_MAP)]
    pub config_map: String,
}

/// The result of injecting into one input.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Injected {
    pub output: String,
    /// One line per workload that got the sidecar, e.g. `document 2: Deployment default/web`.
    pub injected: Vec<String>,
    /// Things the user should know (skipped pods, Jobs that will not complete …).
    pub warnings: Vec<String>,
}

#[derive(Debug, thiserror::Error)]
pub enum InjectError {
    #[error("{input}: document {document} (line {line}{}): invalid YAML: {reason}", column.map(|c| format!(", column {c}")).unwrap_or_default())]
    Yaml {
        input: String,
        document: usize,
        line: usize,
        column: Option<usize>,
        reason: String,
    },
    #[error("{input}: document {document} ({what}): {reason}")]
    Workload {
        input: String,
        document: usize,
        what: String,
        reason: String,
    },
    #[error("{path}: {reason}")]
    Io { path: String, reason: String },
}

/// Runs `veer inject`: 0 on success, 2 for an input that cannot be injected, 1 for I/O.
pub fn run(args: &InjectArgs) -> ExitCode {
    let opts = Options {
        image: args.image.clone(),
        config_map: args.config_map.clone(),
        native_sidecar: args.native_sidecar,
    };
    let result = read_input(&args.filename).and_then(|text| {
        let name = if args.filename == "-" {
            "<stdin>"
        } else {
            &args.filename
        };
        inject_str(&text, name, &opts)
    });
    let injected = match result {
        Ok(i) => i,
        Err(e) => {
            eprintln!("veer inject: {e}");
            return ExitCode::from(if matches!(e, InjectError::Io { .. }) {
                1
            } else {
                2
            });
        }
    };
    for w in &injected.warnings {
        eprintln!("veer inject: warning: {w}");
    }
    let written = match &args.output {
        Some(path) => std::fs::write(path, &injected.output).map_err(|e| InjectError::Io {
            path: path.display().to_string(),
            reason: e.to_string(),
        }),
        None => std::io::stdout()
            .lock()
            .write_all(injected.output.as_bytes())
            .map_err(|e| InjectError::Io {
                path: "<stdout>".into(),
                reason: e.to_string(),
            }),
    };
    match written {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("veer inject: {e}");
            ExitCode::FAILURE
        }
    }
}

fn read_input(filename: &str) -> Result<String, InjectError> {
    let mut text = String::new();
    let res = if filename == "-" {
        std::io::stdin()
            .lock()
            .read_to_string(&mut text)
            .map(|_| ())
    } else {
        std::fs::File::open(filename).and_then(|mut f| f.read_to_string(&mut text).map(|_| ()))
    };
    res.map_err(|e| InjectError::Io {
        path: filename.to_string(),
        reason: e.to_string(),
    })?;
    Ok(text)
}

/// Injects into every workload of `text` (`input` names it in messages).
pub fn inject_str(text: &str, input: &str, opts: &Options) -> Result<Injected, InjectError> {
    let mut out = String::with_capacity(text.len() * 2);
    let mut injected = Vec::new();
    let mut warnings = Vec::new();
    let mut document = 0;
    for piece in split::split(text) {
        if !piece.is_document {
            out.push_str(piece.text);
            continue;
        }
        document += 1;
        let original: Value = serde_yaml::from_str(piece.text).map_err(|e| {
            let loc = e.location();
            InjectError::Yaml {
                input: input.to_string(),
                document,
                line: piece.first_line + loc.as_ref().map_or(0, |l| l.line().saturating_sub(1)),
                column: loc.as_ref().map(|l| l.column()),
                reason: strip_location(&e.to_string()),
            }
        })?;
        let mut value = original.clone();
        let mut doc = DocCtx {
            input,
            document,
            opts,
            injected: &mut injected,
            warnings: &mut warnings,
        };
        doc.object(&mut value, None)?;
        if value == original {
            out.push_str(piece.text);
            continue;
        }
        let (lead, tail) = split::surrounding_comments(&piece);
        if piece.has_marker {
            out.push_str("---\n");
        } else if !out.is_empty() && !out.ends_with('\n') {
            out.push('\n');
        }
        out.push_str(&lead);
        out.push_str(
            &serde_yaml::to_string(&value).map_err(|e| InjectError::Workload {
                input: input.to_string(),
                document,
                what: "output".into(),
                reason: e.to_string(),
            })?,
        );
        out.push_str(&tail);
    }
    Ok(Injected {
        output: out,
        injected,
        warnings,
    })
}

/// serde_yaml appends " at line L column C" to its messages; the position is reported
/// separately (relative to the whole input).
fn strip_location(message: &str) -> String {
    match message.find(" at line ") {
        Some(i) => message[..i].to_string(),
        None => message.to_string(),
    }
}

struct DocCtx<'a> {
    input: &'a str,
    document: usize,
    opts: &'a Options,
    injected: &'a mut Vec<String>,
    warnings: &'a mut Vec<String>,
}

impl DocCtx<'_> {
    /// Injects into one object (a whole document, or a List item).
    fn object(&mut self, value: &mut Value, item: Option<usize>) -> Result<(), InjectError> {
        let Value::Mapping(obj) = value else {
            return Ok(());
        };
        let kind = obj
            .get("kind")
            .and_then(Value::as_str)
            .unwrap_or_default()
            .to_string();
        let at = match item {
            Some(i) => format!("items[{i}] "),
            None => String::new(),
        };
        if kind == "List" || (kind.ends_with("List") && obj.get("items").is_some()) {
            if let Some(Value::Sequence(items)) = obj.get_mut("items") {
                for (i, it) in items.iter_mut().enumerate() {
                    self.object(it, Some(i))?;
                }
            }
            return Ok(());
        }
        let template_path: &[&str] = match kind.as_str() {
            "Pod" => &[],
            "Deployment"
            | "ReplicaSet"
            | "StatefulSet"
            | "DaemonSet"
            | "Job"
            | "ReplicationController" => &["spec", "template"],
            "CronJob" => &["spec", "jobTemplate", "spec", "template"],
            _ => return Ok(()),
        };
        let namespace = obj
            .get("metadata")
            .and_then(|m| m.get("namespace"))
            .and_then(Value::as_str)
            .map(str::to_string);
        let name = obj
            .get("metadata")
            .and_then(|m| m.get("name").or_else(|| m.get("generateName")))
            .and_then(Value::as_str)
            .unwrap_or("<no name>")
            .to_string();
        let what = format!(
            "{at}{kind} {}/{name}",
            namespace.as_deref().unwrap_or("default")
        );
        let err = |reason: String| InjectError::Workload {
            input: self.input.to_string(),
            document: self.document,
            what: what.clone(),
            reason,
        };

        let mut template = &mut *obj;
        for (i, key) in template_path.iter().enumerate() {
            template = match template.get_mut(*key) {
                Some(Value::Mapping(m)) => m,
                None | Some(Value::Null) if kind == "ReplicationController" => {
                    // An RC's template is optional (it then adopts existing pods).
                    self.warnings.push(format!(
                        "{}: document {} ({what}): not injected: no spec.template",
                        self.input, self.document
                    ));
                    return Ok(());
                }
                _ => {
                    return Err(err(format!(
                        "`{}` is missing or not a mapping",
                        template_path[..=i].join(".")
                    )))
                }
            };
        }
        let workload = pod::Workload {
            kind: &kind,
            namespace: namespace.as_deref(),
        };
        let mut warnings = Vec::new();
        let outcome =
            pod::inject_template(template, &workload, self.opts, &mut warnings).map_err(err)?;
        let prefix = format!("{}: document {} ({what})", self.input, self.document);
        if let pod::Outcome::Skipped(reason) = &outcome {
            warnings.push(reason.clone());
        }
        self.warnings
            .extend(warnings.into_iter().map(|w| format!("{prefix}: {w}")));
        if outcome == pod::Outcome::Injected {
            self.injected
                .push(format!("document {} ({what})", self.document));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn inject(text: &str) -> Injected {
        inject_str(text, "test.yaml", &Options::default()).unwrap()
    }

    const POD: &str = "apiVersion: v1\nkind: Pod\nmetadata:\n  name: p\nspec:\n  containers:\n  - name: app\n    image: app\n";

    #[test]
    fn untouched_documents_are_byte_for_byte() {
        let text = "# head\n---\napiVersion: v1\nkind: Service   # trailing\nmetadata: {name: s}\n---\n\n...\n";
        assert_eq!(inject(text).output, text);
    }

    #[test]
    fn invalid_yaml_names_the_document_and_line() {
        let text = format!("{POD}---\napiVersion: v1\nkind: [\n");
        let e = inject_str(&text, "in.yaml", &Options::default()).unwrap_err();
        let msg = e.to_string();
        assert!(msg.starts_with("in.yaml: document 2 (line 1"), "{msg}");
        assert!(matches!(e, InjectError::Yaml { document: 2, .. }));
    }

    #[test]
    fn injects_and_is_idempotent() {
        let once = inject(POD);
        assert_eq!(once.injected, ["document 1 (Pod default/p)"]);
        assert!(once.output.contains("veer-proxy"));
        let twice = inject(&once.output);
        assert_eq!(twice.output, once.output);
    }

    #[test]
    fn host_network_is_skipped_with_a_warning() {
        let text = POD.replace("spec:\n", "spec:\n  hostNetwork: true\n");
        let r = inject(&text);
        assert_eq!(r.output, text);
        assert!(r.warnings[0].contains("hostNetwork"), "{:?}", r.warnings);
    }

    #[test]
    fn label_wins_over_annotation() {
        let with = |label: &str, annotation: &str| {
            POD.replace(
                "  name: p\n",
                &format!(
                    "  name: p\n  labels:\n    sidecar.istio.io/inject: \"{label}\"\n  \
                     annotations:\n    sidecar.istio.io/inject: \"{annotation}\"\n"
                ),
            )
        };
        let off = with("false", "true");
        assert_eq!(inject(&off).output, off);
        assert_eq!(inject(&with("true", "false")).injected.len(), 1);
        let ann_only = POD.replace(
            "  name: p\n",
            "  name: p\n  annotations:\n    sidecar.istio.io/inject: \"false\"\n",
        );
        assert_eq!(inject(&ann_only).output, ann_only);
    }

    #[test]
    fn cli_args_parse_and_run_writes_the_output_file() {
        use clap::{Args, FromArgMatches};
        let dir = std::env::temp_dir().join(format!("veer-inject-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let input = dir.join("in.yaml");
        let output = dir.join("out.yaml");
        std::fs::write(&input, POD).unwrap();
        let cmd = InjectArgs::augment_args(clap::Command::new("inject"));
        let matches = cmd
            .try_get_matches_from([
                "inject",
                "-f",
                input.to_str().unwrap(),
                "-o",
                output.to_str().unwrap(),
                "--native-sidecar",
            ])
            .unwrap();
        let args = InjectArgs::from_arg_matches(&matches).unwrap();
        assert!(args.native_sidecar);
        assert_eq!(args.image, DEFAULT_IMAGE);
        assert_eq!(run(&args), ExitCode::SUCCESS);
        let written = std::fs::read_to_string(&output).unwrap();
        assert!(written.contains("restartPolicy: Always"), "{written}");
        std::fs::write(&input, "kind: [").unwrap();
        std::fs::remove_file(&output).unwrap();
        assert_eq!(run(&args), ExitCode::from(2));
        assert!(!output.exists(), "no output file on error");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
