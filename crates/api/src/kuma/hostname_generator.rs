//! Kuma `HostnameGenerator`: the names a MeshExternalService is called by in transparent mode,
//! `spec.selector.meshExternalService.matchLabels` choosing the services and `spec.template`
//! writing each one's name. Sluice has no MeshService or MeshMultiZoneService, so selectors of
//! those select nothing here, with a warning.

use crate::diag::Diagnostics;
use crate::hostname::Template;
use crate::node::Obj;
use crate::resource::Meta;

#[derive(Debug, Clone)]
pub struct HostnameGeneratorResource {
    pub meta: Meta,
    /// The labels a MeshExternalService must carry; `None` when the generator selects no
    /// MeshExternalService.
    pub match_labels: Option<Vec<(String, String)>>,
    /// `None` only when the document has errors.
    pub template: Option<Template>,
}

/// Kuma's default generator for MeshExternalServices of the local zone, present unless a
/// HostnameGenerator of the same name replaces it.
pub const DEFAULT_NAME: &str = "local-mesh-external-service";
pub const DEFAULT_TEMPLATE: &str = "{{ .DisplayName }}.extsvc.mesh.local";

/// Reads the spec (at `spec` in either form).
pub fn parse(
    spec: &mut Obj<'_>,
    d: &mut Diagnostics,
) -> (Option<Vec<(String, String)>>, Option<Template>) {
    let mut match_labels = None;
    if let Some(selector) = spec.required("selector", d) {
        if let Some(mut s) = selector.obj(d) {
            if let Some(mes) = s.get("meshExternalService") {
                if let Some(mut m) = mes.obj(d) {
                    match_labels = Some(
                        m.get("matchLabels")
                            .map(|l| l.string_map(d))
                            .unwrap_or_default(),
                    );
                    m.finish(d);
                }
            }
            for other in ["meshService", "meshMultiZoneService"] {
                if let Some(at) = s.get(other) {
                    d.warn(
                        at.path(),
                        "selects Kuma mesh services, which Sluice does not have; it names nothing here",
                    );
                }
            }
            if !s.has("meshExternalService")
                && !s.has("meshService")
                && !s.has("meshMultiZoneService")
            {
                d.error(
                    s.path(),
                    "must select something: give meshExternalService: {matchLabels: {...}} (an empty matchLabels selects every MeshExternalService)",
                );
            }
            s.finish(d);
        }
    }
    let template = spec.required("template", d).and_then(|t| {
        let text = t.text(d)?;
        match Template::parse(text) {
            Ok(template) => Some(template),
            Err(e) => {
                d.error(t.path(), e);
                None
            }
        }
    });
    if let Some(ext) = spec.get("extension") {
        d.warn(
            ext.path(),
            "is for Kuma's plugins and has no effect in Sluice",
        );
    }
    (match_labels, template)
}
