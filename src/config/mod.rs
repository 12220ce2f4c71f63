//! Configuration as the user writes it: Kubernetes and Istio resources in YAML files.
//!
//! Config flows one way: files → [`load`] (parse, with errors naming file, line, document,
//! resource and field) → [`validate()`](validate::validate) (Istio's rules per resource, plus cross-resource
//! warnings) → `routing::compile` (snapshot) → atomic swap. Nothing here touches a socket.

pub mod load;
pub mod locate;
pub mod model;
pub mod validate;

pub use load::{
    load_all, load_paths, parse_documents, ConfigError, ConfigErrors, ConfigSet, FieldError,
    Loaded, Source, SourceText, MAX_FILE_BYTES,
};
pub use model::Resource;
pub use validate::{run_validate, validate, Report, Warning};
