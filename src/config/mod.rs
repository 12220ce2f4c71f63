//! Configuration as the user writes it: Kubernetes and Istio resources in YAML files.
//!
//! Config flows one way: files → [`load`] (parse, with errors naming file, document, resource
//! and field) → `routing::compile` (semantic checks, snapshot) → atomic swap. Nothing here
//! touches a socket.

pub mod load;
pub mod model;

pub use load::{
    load_paths, parse_documents, ConfigError, ConfigErrors, ConfigSet, FieldError, Loaded, Source,
};
pub use model::Resource;
