//! Gloo's `Workspace.spec`: which namespaces work together. ExternalServices of one workspace
//! may not claim the same host or address; in different workspaces they may.

use crate::diag::Diagnostics;
use crate::node::At;

#[derive(Debug, Clone)]
pub struct WorkspaceResource {
    pub meta: crate::resource::Meta,
    pub spec: WorkspaceSpec,
}

#[derive(Debug, Clone, Default)]
pub struct WorkspaceSpec {
    /// Namespace names, with `*` matching any run of characters.
    pub namespaces: Vec<String>,
}

impl WorkspaceSpec {
    pub fn selects(&self, namespace: &str) -> bool {
        self.namespaces.iter().any(|g| glob(g, namespace))
    }
}

/// `*` matches any run of characters, everything else itself.
fn glob(pattern: &str, text: &str) -> bool {
    match pattern.split_once('*') {
        None => pattern == text,
        Some((head, rest)) => {
            let Some(after) = text.strip_prefix(head) else {
                return false;
            };
            (0..=after.len())
                .filter(|i| after.is_char_boundary(*i))
                .any(|i| glob(rest, &after[i..]))
        }
    }
}

pub fn parse(spec: &At<'_>, d: &mut Diagnostics) -> Option<WorkspaceSpec> {
    let mut s = spec.obj(d)?;
    let mut out = WorkspaceSpec::default();
    if let Some(list) = s.required("workloadClusters", d) {
        for cluster in list.list(d) {
            let Some(mut c) = cluster.obj(d) else {
                continue;
            };
            // Sluice is one cluster: every cluster selector stands for it.
            if let Some(n) = c.get("name") {
                n.text(d);
            }
            if let Some(sel) = c.get("selector") {
                sel.string_map(d);
            }
            if let Some(ce) = c.get("configEnabled") {
                ce.bool(d);
            }
            if let Some(namespaces) = c.get("namespaces") {
                for ns in namespaces.list(d) {
                    let Some(mut n) = ns.obj(d) else { continue };
                    if let Some(name) = n.get("name").and_then(|n| n.text(d)) {
                        out.namespaces.push(name.to_string());
                    }
                    n.refuse(
                        "labels",
                        "is not supported: Sluice selects a workspace's namespaces by name; list them by name",
                        d,
                    );
                    if let Some(ce) = n.get("configEnabled") {
                        ce.bool(d);
                    }
                    n.finish(d);
                }
            }
            c.finish(d);
        }
    }
    if out.namespaces.is_empty() {
        d.error(
            &s.child_path("workloadClusters"),
            "selects no namespace: give namespaces: [{name: NAME}] (names may use *)",
        );
    }
    s.finish(d);
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::glob;

    #[test]
    fn globs() {
        for (pattern, text, want) in [
            ("ns1*", "ns1-prod", true),
            ("ns1*", "ns2", false),
            ("*", "anything", true),
            ("a*b*c", "axxbyyc", true),
            ("a*b*c", "axxbyy", false),
            ("prod", "prod", true),
            ("prod", "prod2", false),
        ] {
            assert_eq!(glob(pattern, text), want, "{pattern} {text}");
        }
    }
}
