//! Reading resources from files and directories.
//!
//! Accepts multi-document YAML, `kind: List` wrappers, and directories (every `.yaml`, `.yml`
//! and `.json` file below, skipping dot-entries so a Kubernetes ConfigMap mount's `..data`
//! indirection is not read twice). Kinds veer does not route on (Deployments, ConfigMaps …)
//! are skipped with a debug log, so a whole application manifest can be given as is.

use std::fmt;
use std::fs;
use std::path::{Path, PathBuf};

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use serde_yaml::{Mapping, Value};

use super::model::*;

/// Largest config file read. Istio configs are kilobytes; a bigger file is almost surely a
/// mistake, and reading it whole would let one bad mount exhaust the sidecar's memory.
pub const MAX_FILE_BYTES: u64 = 16 * 1024 * 1024;

/// Istio API versions that share the networking schema veer reads.
const ISTIO_VERSIONS: [&str; 3] = [
    "networking.istio.io/v1alpha3",
    "networking.istio.io/v1beta1",
    "networking.istio.io/v1",
];

/// Where a resource came from: the file and the 1-based document number within it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Source {
    pub file: PathBuf,
    pub document: usize,
    /// Position inside a `kind: List` (`items[3]`), if the resource came from one.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub list_item: Option<usize>,
}

impl fmt::Display for Source {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: document {}", self.file.display(), self.document)?;
        if let Some(i) = self.list_item {
            write!(f, " items[{i}]")?;
        }
        Ok(())
    }
}

/// One resource and where it came from.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Loaded {
    pub source: Source,
    pub resource: Resource,
}

/// Everything loaded from the configured paths, in file order then document order.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct ConfigSet {
    pub files: Vec<PathBuf>,
    pub resources: Vec<Loaded>,
}

/// A problem with the user's config, precise enough to fix without guessing.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ConfigError {
    #[error("{path}: cannot read: {reason}")]
    Read { path: PathBuf, reason: String },
    #[error("{path}: file is {size} bytes, larger than the {limit}-byte limit for config files")]
    TooLarge {
        path: PathBuf,
        size: u64,
        limit: u64,
    },
    #[error("{path}: no .yaml, .yml or .json files found")]
    Empty { path: PathBuf },
    #[error("{at}: invalid YAML: {reason}")]
    Yaml { at: String, reason: String },
    /// A resource whose fields are wrong.
    #[error(transparent)]
    Field(Box<FieldError>),
}

/// A wrong field of one resource. `field` is a path like `spec.tcp[0].route[1].weight`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{at} ({kind} {namespace}/{name}): field `{field}`: {reason}")]
pub struct FieldError {
    /// The rendered [`Source`]: file, document (and list item).
    pub at: String,
    pub kind: String,
    pub namespace: String,
    pub name: String,
    pub field: String,
    pub reason: String,
}

impl ConfigError {
    /// An error about one field of one loaded resource (used by semantic checks after parsing).
    pub fn field(loaded: &Loaded, field: impl Into<String>, reason: impl Into<String>) -> Self {
        let meta = loaded.resource.metadata();
        ConfigError::Field(Box::new(FieldError {
            at: loaded.source.to_string(),
            kind: loaded.resource.kind().to_string(),
            namespace: meta.namespace().to_string(),
            name: meta.name.clone(),
            field: field.into(),
            reason: reason.into(),
        }))
    }
}

/// All problems found, so a user fixes them in one pass rather than one per restart.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub struct ConfigErrors(pub Vec<ConfigError>);

impl fmt::Display for ConfigErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, e) in self.0.iter().enumerate() {
            if i > 0 {
                writeln!(f)?;
            }
            write!(f, "{e}")?;
        }
        Ok(())
    }
}

impl From<ConfigError> for ConfigErrors {
    fn from(e: ConfigError) -> Self {
        ConfigErrors(vec![e])
    }
}

/// Loads every path (file or directory). Fails with every error found; never partially.
pub fn load_paths(paths: &[PathBuf]) -> Result<ConfigSet, ConfigErrors> {
    let mut files = Vec::new();
    let mut errors = Vec::new();
    for path in paths {
        if let Err(e) = collect_files(path, &mut files) {
            errors.push(e);
        }
    }
    let mut set = ConfigSet::default();
    for file in &files {
        match read_file(file) {
            Ok(text) => match parse_documents(&text, file) {
                Ok(mut loaded) => set.resources.append(&mut loaded),
                Err(ConfigErrors(mut es)) => errors.append(&mut es),
            },
            Err(e) => errors.push(e),
        }
    }
    set.files = files;
    if errors.is_empty() {
        Ok(set)
    } else {
        Err(ConfigErrors(errors))
    }
}

fn collect_files(path: &Path, out: &mut Vec<PathBuf>) -> Result<(), ConfigError> {
    let meta = fs::metadata(path).map_err(|e| read_err(path, &e))?;
    if !meta.is_dir() {
        out.push(path.to_path_buf());
        return Ok(());
    }
    let before = out.len();
    walk_dir(path, out)?;
    if out.len() == before {
        return Err(ConfigError::Empty {
            path: path.to_path_buf(),
        });
    }
    Ok(())
}

fn walk_dir(dir: &Path, out: &mut Vec<PathBuf>) -> Result<(), ConfigError> {
    let mut entries: Vec<PathBuf> = fs::read_dir(dir)
        .map_err(|e| read_err(dir, &e))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| {
            !p.file_name()
                .is_some_and(|n| n.to_string_lossy().starts_with('.'))
        })
        .collect();
    // Sorted so the load order, and therefore rule order among equal timestamps, is stable.
    entries.sort();
    for p in entries {
        let meta = fs::metadata(&p).map_err(|e| read_err(&p, &e))?;
        if meta.is_dir() {
            walk_dir(&p, out)?;
        } else if matches!(
            p.extension().and_then(|e| e.to_str()),
            Some("yaml" | "yml" | "json")
        ) {
            out.push(p);
        }
    }
    Ok(())
}

fn read_err(path: &Path, e: &std::io::Error) -> ConfigError {
    ConfigError::Read {
        path: path.to_path_buf(),
        reason: e.to_string(),
    }
}

fn read_file(path: &Path) -> Result<String, ConfigError> {
    let size = fs::metadata(path).map_err(|e| read_err(path, &e))?.len();
    if size > MAX_FILE_BYTES {
        return Err(ConfigError::TooLarge {
            path: path.to_path_buf(),
            size,
            limit: MAX_FILE_BYTES,
        });
    }
    let bytes = fs::read(path).map_err(|e| read_err(path, &e))?;
    String::from_utf8(bytes).map_err(|e| ConfigError::Read {
        path: path.to_path_buf(),
        reason: format!(
            "not UTF-8 text (invalid byte at offset {})",
            e.utf8_error().valid_up_to()
        ),
    })
}

/// Parses one file's text (`file` is only used in messages). Multi-document, `List`-aware.
pub fn parse_documents(text: &str, file: &Path) -> Result<Vec<Loaded>, ConfigErrors> {
    let mut out = Vec::new();
    let mut errors = Vec::new();
    for (i, doc) in serde_yaml::Deserializer::from_str(text).enumerate() {
        let source = Source {
            file: file.to_path_buf(),
            document: i + 1,
            list_item: None,
        };
        let value = match Value::deserialize(doc) {
            Ok(v) => v,
            Err(e) => {
                errors.push(ConfigError::Yaml {
                    at: source.to_string(),
                    reason: e.to_string(),
                });
                // A syntax error leaves the stream position unknown; later documents are not
                // trustworthy, so stop here (serde_yaml would stop anyway).
                break;
            }
        };
        if value.is_null() {
            continue; // empty document, e.g. a trailing `---`
        }
        if value.get("kind").and_then(Value::as_str) == Some("List") {
            let items = value
                .get("items")
                .and_then(Value::as_sequence)
                .cloned()
                .unwrap_or_default();
            for (j, item) in items.into_iter().enumerate() {
                let source = Source {
                    list_item: Some(j),
                    ..source.clone()
                };
                match parse_resource(item, &source) {
                    Ok(Some(r)) => out.push(Loaded {
                        source,
                        resource: r,
                    }),
                    Ok(None) => {}
                    Err(e) => errors.push(e),
                }
            }
            continue;
        }
        match parse_resource(value, &source) {
            Ok(Some(r)) => out.push(Loaded {
                source,
                resource: r,
            }),
            Ok(None) => {}
            Err(e) => errors.push(e),
        }
    }
    if errors.is_empty() {
        Ok(out)
    } else {
        Err(ConfigErrors(errors))
    }
}

/// One document → a resource, `None` for kinds veer does not read.
fn parse_resource(value: Value, source: &Source) -> Result<Option<Resource>, ConfigError> {
    let name = value
        .get("metadata")
        .and_then(|m| m.get("name"))
        .and_then(Value::as_str)
        .unwrap_or("<unnamed>")
        .to_string();
    let namespace = value
        .get("metadata")
        .and_then(|m| m.get("namespace"))
        .and_then(Value::as_str)
        .unwrap_or("default")
        .to_string();
    let kind = value
        .get("kind")
        .and_then(Value::as_str)
        .unwrap_or("")
        .to_string();
    let api_version = value
        .get("apiVersion")
        .and_then(Value::as_str)
        .unwrap_or("")
        .to_string();
    let field_err = |field: &str, reason: String| {
        ConfigError::Field(Box::new(FieldError {
            at: source.to_string(),
            kind: if kind.is_empty() {
                "<no kind>".into()
            } else {
                kind.clone()
            },
            namespace: namespace.clone(),
            name: name.clone(),
            field: field.to_string(),
            reason,
        }))
    };
    let Value::Mapping(mut map) = value else {
        return Err(field_err("", "a resource must be a YAML mapping".into()));
    };
    if kind.is_empty() {
        return Err(field_err(
            "kind",
            "missing: every resource needs `kind`".into(),
        ));
    }
    if api_version.is_empty() {
        return Err(field_err(
            "apiVersion",
            "missing: every resource needs `apiVersion`".into(),
        ));
    }
    let group = api_version.rsplit_once('/').map(|(g, _)| g).unwrap_or("");
    let istio_kind = matches!(
        kind.as_str(),
        "VirtualService" | "DestinationRule" | "Gateway" | "ServiceEntry" | "WorkloadEntry"
    );
    if group == "networking.istio.io" {
        if !istio_kind {
            tracing::debug!(%kind, %name, "{source}: skipping Istio kind veer does not use");
            return Ok(None);
        }
        if !ISTIO_VERSIONS.contains(&api_version.as_str()) {
            return Err(field_err(
                "apiVersion",
                format!(
                    "unsupported version {api_version:?}; use one of {}",
                    ISTIO_VERSIONS.join(", ")
                ),
            ));
        }
        // Written by the API server, not part of the schema the user controls.
        map.remove("status");
    } else if !(api_version == "v1" && matches!(kind.as_str(), "Service" | "Pod")) {
        tracing::debug!(%api_version, %kind, %name, "{source}: skipping kind veer does not route on");
        return Ok(None);
    }
    map.remove("apiVersion");
    map.remove("kind");
    let typed = |map: Mapping| -> Result<Resource, ConfigError> {
        let v = Value::Mapping(map);
        Ok(match kind.as_str() {
            "VirtualService" => Resource::VirtualService(typed_from(v, &field_err)?),
            "DestinationRule" => Resource::DestinationRule(typed_from(v, &field_err)?),
            "Gateway" => Resource::Gateway(typed_from(v, &field_err)?),
            "ServiceEntry" => Resource::ServiceEntry(typed_from(v, &field_err)?),
            "WorkloadEntry" => Resource::WorkloadEntry(typed_from(v, &field_err)?),
            "Service" => Resource::Service(typed_from(v, &field_err)?),
            "Pod" => Resource::Pod(typed_from(v, &field_err)?),
            _ => unreachable!("kind filtered above"),
        })
    };
    typed(map).map(Some)
}

fn typed_from<T: DeserializeOwned>(
    value: Value,
    field_err: &dyn Fn(&str, String) -> ConfigError,
) -> Result<T, ConfigError> {
    serde_path_to_error::deserialize(value).map_err(|e| {
        let path = e.path().to_string();
        let field = if path == "." { String::new() } else { path };
        field_err(&field, e.into_inner().to_string())
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<Vec<Loaded>, ConfigErrors> {
        parse_documents(text, Path::new("test.yaml"))
    }

    const VS: &str = r#"
apiVersion: networking.istio.io/v1alpha3
kind: VirtualService
metadata:
  name: tcp-echo
spec:
  hosts: [tcp-echo]
  tcp:
  - match:
    - port: 9000
    route:
    - destination: {host: tcp-echo, port: {number: 9000}, subset: v1}
      weight: 80
    - destination: {host: tcp-echo, port: {number: 9000}, subset: v2}
      weight: 20
"#;

    #[test]
    fn parses_virtual_service() {
        let loaded = parse(VS).unwrap();
        assert_eq!(loaded.len(), 1);
        let Resource::VirtualService(vs) = &loaded[0].resource else {
            panic!()
        };
        assert_eq!(vs.metadata.name, "tcp-echo");
        assert_eq!(vs.spec.tcp[0].route[1].weight, Some(20));
        assert_eq!(vs.spec.tcp[0].matches[0].port, Some(9000));
        assert_eq!(loaded[0].source.document, 1);
    }

    #[test]
    fn multi_document_list_and_skipped_kinds() {
        let text = format!(
            "{VS}\n---\napiVersion: apps/v1\nkind: Deployment\nmetadata: {{name: x}}\nspec: {{replicas: 1}}\n---\n\
             apiVersion: v1\nkind: List\nitems:\n- apiVersion: v1\n  kind: Service\n  metadata: {{name: s, namespace: ns1}}\n  \
             spec: {{clusterIP: 10.0.0.1, ports: [{{port: 80, name: http}}]}}\n---\n"
        );
        let loaded = parse(&text).unwrap();
        assert_eq!(loaded.len(), 2);
        assert_eq!(loaded[1].source.document, 3);
        assert_eq!(loaded[1].source.list_item, Some(0));
        assert_eq!(loaded[1].resource.metadata().namespace(), "ns1");
    }

    #[test]
    fn typo_names_file_document_resource_and_field() {
        let text = format!("{VS}---\n{}", VS.replace("weight: 20", "wieght: 20"));
        let err = parse(&text).unwrap_err();
        assert_eq!(err.0.len(), 1);
        let msg = err.to_string();
        assert!(msg.contains("test.yaml: document 2"), "{msg}");
        assert!(msg.contains("VirtualService default/tcp-echo"), "{msg}");
        assert!(msg.contains("spec.tcp[0].route[1]"), "{msg}");
        assert!(msg.contains("wieght"), "{msg}");
    }

    #[test]
    fn wrong_type_names_the_field() {
        let err = parse(&VS.replace("weight: 80", "weight: eighty"))
            .unwrap_err()
            .to_string();
        assert!(err.contains("spec.tcp[0].route[0].weight"), "{err}");
    }

    #[test]
    fn bad_duration_names_the_field() {
        let text = "apiVersion: networking.istio.io/v1\nkind: DestinationRule\nmetadata: {name: d}\nspec:\n  host: a\n  \
                    trafficPolicy: {connectionPool: {tcp: {connectTimeout: 10}}}\n";
        let err = parse(text).unwrap_err().to_string();
        assert!(
            err.contains("spec.trafficPolicy.connectionPool.tcp.connectTimeout"),
            "{err}"
        );
    }

    #[test]
    fn unsupported_istio_version_and_missing_kind() {
        let err = parse(&VS.replace("v1alpha3", "v9"))
            .unwrap_err()
            .to_string();
        assert!(err.contains("apiVersion"), "{err}");
        let err = parse("apiVersion: v1\nmetadata: {name: x}\n")
            .unwrap_err()
            .to_string();
        assert!(err.contains("field `kind`"), "{err}");
    }

    #[test]
    fn invalid_yaml_is_an_error_not_a_panic() {
        let err = parse("a: [unclosed\n").unwrap_err().to_string();
        assert!(err.contains("test.yaml: document 1: invalid YAML"), "{err}");
        assert!(parse("\u{0}\u{1}garbage: : :").is_err());
    }

    #[test]
    fn istio_status_is_ignored() {
        let text = format!("{VS}status: {{validationMessages: []}}\n");
        assert!(parse(&text).is_ok());
    }
}
