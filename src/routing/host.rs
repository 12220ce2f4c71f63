//! Host names as Istio reads them.

/// The cluster DNS suffix Kubernetes uses by default.
pub const CLUSTER_DOMAIN: &str = "cluster.local";

/// Expands a host written in a resource of `namespace`: a short name (no dot) is relative to
/// that namespace (`tcp-echo` in `default` → `tcp-echo.default.svc.cluster.local`); a name with
/// a dot, `*` and wildcards are taken as written.
pub fn expand(host: &str, namespace: &str) -> String {
    if host.contains('.') || host == "*" {
        host.to_string()
    } else {
        service_fqdn(host, namespace)
    }
}

/// The FQDN of a Kubernetes Service.
pub fn service_fqdn(name: &str, namespace: &str) -> String {
    // Concatenated rather than `format!`: a compile of 10 000 services builds ~100 000 of
    // these, and the formatting machinery was a tenth of its time.
    concat(&[name, ".", namespace, ".svc.", CLUSTER_DOMAIN])
}

/// The parts joined into one string, allocated once at its final size.
pub fn concat(parts: &[&str]) -> String {
    let mut s = String::with_capacity(parts.iter().map(|p| p.len()).sum());
    for p in parts {
        s.push_str(p);
    }
    s
}

/// `host` in lower case, copied only when it has upper-case letters (host names almost
/// never do, and indexes keyed by lower-case host are looked up once per cluster).
pub fn lower(host: &str) -> std::borrow::Cow<'_, str> {
    if host.bytes().any(|b| b.is_ascii_uppercase()) {
        host.to_ascii_lowercase().into()
    } else {
        host.into()
    }
}

/// Whether an (expanded) host pattern covers `host`: equal, `*`, or a `*.suffix` wildcard
/// (any depth below the suffix, not the suffix itself). Case-insensitive and blind to a
/// trailing root dot, as DNS names are. Used for VirtualService hosts and SNI alike.
pub fn matches(pattern: &str, host: &str) -> bool {
    let pattern = pattern.strip_suffix('.').unwrap_or(pattern);
    let host = host.strip_suffix('.').unwrap_or(host);
    if pattern == "*" || pattern.eq_ignore_ascii_case(host) {
        return true;
    }
    match pattern.strip_prefix('*') {
        Some(suffix) if suffix.starts_with('.') => {
            host.len() > suffix.len()
                && host
                    .to_ascii_lowercase()
                    .ends_with(&suffix.to_ascii_lowercase())
        }
        _ => false,
    }
}

/// How specific a pattern is, for picking the most specific of several matches.
pub fn specificity(pattern: &str) -> (bool, usize) {
    (!pattern.starts_with('*'), pattern.len())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn short_names_expand_relative_to_the_resource_namespace() {
        assert_eq!(
            expand("tcp-echo", "default"),
            "tcp-echo.default.svc.cluster.local"
        );
        assert_eq!(
            expand("tcp-echo", "prod"),
            "tcp-echo.prod.svc.cluster.local"
        );
        assert_eq!(
            expand("tcp-echo.prod.svc.cluster.local", "default"),
            "tcp-echo.prod.svc.cluster.local"
        );
        assert_eq!(expand("db.example.com", "default"), "db.example.com");
        assert_eq!(expand("*", "default"), "*");
        assert_eq!(expand("*.example.com", "default"), "*.example.com");
    }

    #[test]
    fn wildcards_match_suffixes_only() {
        assert!(matches("*", "a.b"));
        assert!(matches("*.example.com", "a.example.com"));
        assert!(matches("*.example.com", "a.b.example.com"));
        assert!(!matches("*.example.com", "example.com"));
        assert!(!matches("*.example.com", "aexample.com"));
        assert!(matches("A.example.com", "a.EXAMPLE.com"));
        assert!(!matches("a.example.com", "b.example.com"));
        assert!(specificity("a.example.com") > specificity("*.example.com"));
        // SNI forms: case, depth, trailing root dot, look-alike suffixes.
        assert!(matches("*.example.com", "a.b.EXAMPLE.com"));
        assert!(!matches("*.example.com", "badexample.com"));
        assert!(!matches("*.example.com", ".example.com"));
        assert!(!matches("a.example", "b.a.example"));
        assert!(matches("a.example.", "a.example"));
    }
}
