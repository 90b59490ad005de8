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

/// `*` matches any run of characters, everything else itself. Linear in the text for each star
/// (a star only ever moves forward), so no pattern can make it slow.
fn glob(pattern: &str, text: &str) -> bool {
    let (p, t) = (pattern.as_bytes(), text.as_bytes());
    let (mut pi, mut ti) = (0, 0);
    // The last star seen, and where in the text its match ends so far.
    let mut star: Option<(usize, usize)> = None;
    while ti < t.len() {
        if pi < p.len() && p[pi] == b'*' {
            star = Some((pi, ti));
            pi += 1;
        } else if pi < p.len() && p[pi] == t[ti] {
            pi += 1;
            ti += 1;
        } else if let Some((sp, st)) = star {
            pi = sp + 1;
            ti = st + 1;
            star = Some((sp, st + 1));
        } else {
            return false;
        }
    }
    p[pi..].iter().all(|&c| c == b'*')
}

/// Sluice reads every selected namespace's resources: turning that off is not supported.
fn config_enabled(o: &mut crate::node::Obj<'_>, d: &mut Diagnostics) {
    if let Some(ce) = o.get("configEnabled") {
        if ce.bool(d) == Some(false) {
            d.warn(
                ce.path(),
                "false has no effect: Sluice reads the resources of every namespace the workspace selects; leave the namespace out instead",
            );
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
            config_enabled(&mut c, d);
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
                    config_enabled(&mut n, d);
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
            ("", "", true),
            ("*", "", true),
            ("a*", "a", true),
            ("*a", "ba", true),
            ("*a", "ab", false),
        ] {
            assert_eq!(glob(pattern, text), want, "{pattern} {text}");
        }
        // Many stars against a long name that almost matches: answered at once.
        let pattern = format!("{}*b", "*a".repeat(25));
        assert!(!glob(&pattern, &"a".repeat(60)));
    }
}
