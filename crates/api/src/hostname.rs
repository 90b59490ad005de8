//! Hostname templates, as Kuma's `HostnameGenerator` writes them: Go template actions over the
//! service's identity, `{{ .DisplayName }}.extsvc.mesh.local`. Only what names need is read:
//! the fields `.DisplayName`, `.Name`, `.Namespace`, `.Mesh`, `.Zone` and the function
//! `label "KEY"`, with `{{-` and `-}}` trimming as in Go. Parsed once; rendering is a walk over
//! the parts.

use std::fmt;

/// A parsed template.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Template {
    parts: Vec<Part>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Part {
    Text(String),
    Field(Field),
    Label(String),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Field {
    DisplayName,
    Name,
    Namespace,
    Mesh,
    Zone,
}

const FIELDS: &str = ".DisplayName, .Name, .Namespace, .Mesh, .Zone";

/// What a template is rendered for.
#[derive(Debug, Clone, Copy)]
pub struct Subject<'a> {
    pub display_name: &'a str,
    pub name: &'a str,
    pub namespace: &'a str,
    pub mesh: &'a str,
    pub zone: &'a str,
    /// The resource's own labels; see [`Subject::label`] for those Kuma adds.
    pub labels: &'a [(String, String)],
}

impl Subject<'_> {
    /// A label of the service: its own, else one Kuma sets on every resource (`kuma.io/origin:
    /// zone`, `kuma.io/mesh`, `kuma.io/display-name`, and `k8s.kuma.io/namespace` when it has a
    /// namespace). Worked out here rather than stored with every service.
    pub fn label(&self, key: &str) -> Option<&str> {
        if let Some((_, v)) = self.labels.iter().find(|(k, _)| k == key) {
            return Some(v);
        }
        match key {
            "kuma.io/origin" => Some("zone"),
            "kuma.io/mesh" => Some(self.mesh),
            "kuma.io/display-name" => Some(self.display_name),
            "k8s.kuma.io/namespace" if !self.namespace.is_empty() => Some(self.namespace),
            _ => None,
        }
    }
}

/// Why a template could not name a service (Kuma's `TemplateError`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RenderError(pub String);

impl fmt::Display for RenderError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// Templates longer than this are refused: no hostname needs one.
pub const MAX_TEMPLATE: usize = 1024;

impl Template {
    /// Reads `text`; the error says what is wrong and where, as one line.
    pub fn parse(text: &str) -> Result<Template, String> {
        if text.len() > MAX_TEMPLATE {
            return Err(format!(
                "is {} bytes, more than the {MAX_TEMPLATE} a hostname template may have",
                text.len()
            ));
        }
        let mut parts = Vec::new();
        let mut rest = text;
        let mut text_part = String::new();
        while let Some(open) = rest.find("{{") {
            let mut before = &rest[..open];
            let mut action = &rest[open + 2..];
            if let Some(a) = action.strip_prefix('-') {
                before = before.trim_end();
                action = a;
            }
            text_part.push_str(before);
            let Some(close) = action.find("}}") else {
                return Err(format!(
                    "{{{{ at byte {open} is not closed with }}}}; write actions as {{{{ .DisplayName }}}}"
                ));
            };
            let mut inner = &action[..close];
            let mut after = &action[close + 2..];
            if let Some(i) = inner.strip_suffix('-') {
                inner = i;
                after = after.trim_start();
            }
            if !text_part.is_empty() {
                parts.push(Part::Text(std::mem::take(&mut text_part)));
            }
            parts.push(action_part(inner.trim())?);
            rest = after;
        }
        if rest.contains("}}") {
            return Err("}} without {{ before it; remove it".into());
        }
        text_part.push_str(rest);
        if !text_part.is_empty() {
            parts.push(Part::Text(text_part));
        }
        Ok(Template { parts })
    }

    /// The hostname for `subject`, folded to lower case; an error when a label is missing or the
    /// result is not a DNS name.
    pub fn render(&self, subject: &Subject<'_>) -> Result<String, RenderError> {
        let mut out = String::new();
        for part in &self.parts {
            match part {
                Part::Text(t) => out.push_str(t),
                Part::Field(f) => out.push_str(match f {
                    Field::DisplayName => subject.display_name,
                    Field::Name => subject.name,
                    Field::Namespace => subject.namespace,
                    Field::Mesh => subject.mesh,
                    Field::Zone => subject.zone,
                }),
                Part::Label(key) => match subject.label(key) {
                    Some(v) => out.push_str(v),
                    None => {
                        return Err(RenderError(format!(
                            "the service has no label {key:?}, which the template uses"
                        )))
                    }
                },
            }
        }
        let name = out.to_ascii_lowercase();
        if crate::names::is_dns_name(&name) && !name.ends_with('.') {
            Ok(name)
        } else {
            Err(RenderError(format!(
                "{out:?} is not a valid DNS name: labels of letters, digits and '-', at most 63 each, 253 in all"
            )))
        }
    }
}

fn action_part(inner: &str) -> Result<Part, String> {
    if let Some(field) = inner.strip_prefix('.') {
        return match field {
            "DisplayName" => Ok(Part::Field(Field::DisplayName)),
            "Name" => Ok(Part::Field(Field::Name)),
            "Namespace" => Ok(Part::Field(Field::Namespace)),
            "Mesh" => Ok(Part::Field(Field::Mesh)),
            "Zone" => Ok(Part::Field(Field::Zone)),
            other => Err(format!(
                "{{{{ .{other} }}}}: there is no field {other}; use one of {FIELDS}, or label \"KEY\""
            )),
        };
    }
    if let Some(arg) = inner.strip_prefix("label") {
        let arg = arg.trim();
        let quoted = arg
            .strip_prefix('"')
            .and_then(|a| a.strip_suffix('"'))
            .filter(|k| !k.is_empty() && !k.contains('"'));
        return match quoted {
            Some(key) => Ok(Part::Label(key.to_string())),
            None => Err(format!(
                "{{{{ label {arg} }}}}: give the label's key in double quotes, as {{{{ label \"kuma.io/zone\" }}}}"
            )),
        };
    }
    Err(format!(
        "{{{{ {inner} }}}} is not supported: a hostname template takes the fields {FIELDS} and label \"KEY\""
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn subject(labels: &[(String, String)]) -> Subject<'_> {
        Subject {
            display_name: "httpbin",
            name: "httpbin.kuma-system",
            namespace: "kuma-system",
            mesh: "default",
            zone: "zone-1",
            labels,
        }
    }

    #[test]
    fn labels_are_the_services_own_then_those_kuma_sets() {
        let own = vec![("kuma.io/mesh".to_string(), "mine".to_string())];
        let no_namespace = Subject {
            namespace: "",
            ..subject(&[])
        };
        for (subject, key, want) in [
            (subject(&[]), "kuma.io/origin", Some("zone")),
            (subject(&[]), "kuma.io/mesh", Some("default")),
            (subject(&own), "kuma.io/mesh", Some("mine")),
            (subject(&[]), "kuma.io/display-name", Some("httpbin")),
            (subject(&[]), "k8s.kuma.io/namespace", Some("kuma-system")),
            (no_namespace, "k8s.kuma.io/namespace", None),
            (subject(&[]), "kuma.io/zone", None),
            (subject(&own), "team", None),
        ] {
            assert_eq!(subject.label(key), want, "{key} of {:?}", subject.labels);
        }
    }

    #[test]
    fn templates_render_to_hostnames() {
        let labels = vec![("team".to_string(), "Payments".to_string())];
        for (template, want) in [
            ("{{ .DisplayName }}.extsvc.mesh.local", Ok("httpbin.extsvc.mesh.local")),
            ("{{.DisplayName}}.{{ .Mesh }}", Ok("httpbin.default")),
            ("{{ .DisplayName }}.{{ .Zone }}.{{ label \"team\" }}.example", Ok("httpbin.zone-1.payments.example")),
            ("{{ .Name }}.svc", Ok("httpbin.kuma-system.svc")),
            ("{{- .DisplayName -}} .ext", Ok("httpbin.ext")),
            ("api. {{- .Mesh }}", Ok("api.default")),
            ("{{ label \"missing\" }}.x", Err("the service has no label \"missing\", which the template uses")),
            ("{{ .DisplayName }}_bad.example", Err("\"httpbin_bad.example\" is not a valid DNS name: labels of letters, digits and '-', at most 63 each, 253 in all")),
            ("{{ .DisplayName }}.", Err("\"httpbin.\" is not a valid DNS name: labels of letters, digits and '-', at most 63 each, 253 in all")),
        ] {
            let t = Template::parse(template).unwrap();
            let got = t.render(&subject(&labels));
            let want = want.map(str::to_string).map_err(|e| RenderError(e.to_string()));
            assert_eq!(got, want, "{template}");
        }
    }

    #[test]
    fn malformed_templates_say_what_is_wrong() {
        for (template, want) in [
            ("{{ .DisplayName", "{{ at byte 0 is not closed with }}; write actions as {{ .DisplayName }}"),
            ("a }}", "}} without {{ before it; remove it"),
            ("{{ .Port }}", "{{ .Port }}: there is no field Port; use one of .DisplayName, .Name, .Namespace, .Mesh, .Zone, or label \"KEY\""),
            ("{{ label team }}", "{{ label team }}: give the label's key in double quotes, as {{ label \"kuma.io/zone\" }}"),
            ("{{ printf \"%s\" .Name }}", "{{ printf \"%s\" .Name }} is not supported: a hostname template takes the fields .DisplayName, .Name, .Namespace, .Mesh, .Zone and label \"KEY\""),
        ] {
            assert_eq!(Template::parse(template), Err(want.to_string()), "{template}");
        }
        let huge = "a".repeat(MAX_TEMPLATE + 1);
        assert!(Template::parse(&huge).is_err());
    }
}

/// A generator as the naming step sees it.
#[derive(Debug, Clone)]
pub struct Generator<'a> {
    pub name: &'a str,
    /// Labels a service must carry to be named by it; empty selects every service.
    pub match_labels: &'a [(String, String)],
    pub template: &'a Template,
}

/// A service to name: its mesh (names are unique per mesh) and what templates read.
#[derive(Debug, Clone, Copy)]
pub struct Service<'a> {
    pub mesh: &'a str,
    pub subject: Subject<'a>,
}

/// What one generator made of one service (Kuma's status `Generated`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Outcome {
    pub service: usize,
    pub generator: String,
    pub result: Result<String, Failure>,
}

/// Why a service has no name from a generator.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Failure {
    /// The template could not be rendered for it.
    TemplateError(String),
    /// Another service (an index into the services given) already has the name.
    Collision { hostname: String, holder: usize },
}

impl Failure {
    /// Kuma's reason names.
    pub fn reason(&self) -> &'static str {
        match self {
            Failure::TemplateError(_) => "TemplateError",
            Failure::Collision { .. } => "Collision",
        }
    }
}

/// Names every service by every generator that selects it. `services` come oldest first: of
/// two services a name fits, the older keeps it and the younger gets a collision, so adding a
/// service never takes a name away from one that had it.
pub fn generate(generators: &[Generator<'_>], services: &[Service<'_>]) -> Vec<Outcome> {
    let mut taken: std::collections::HashMap<(&str, String), usize> =
        std::collections::HashMap::new();
    let mut out = Vec::new();
    for (i, s) in services.iter().enumerate() {
        for g in generators {
            let selected = g
                .match_labels
                .iter()
                .all(|(k, v)| s.subject.label(k) == Some(v.as_str()));
            if !selected {
                continue;
            }
            let result = match g.template.render(&s.subject) {
                Err(e) => Err(Failure::TemplateError(e.0)),
                Ok(hostname) => match taken.get(&(s.mesh, hostname.clone())) {
                    Some(&holder) if holder != i => Err(Failure::Collision { hostname, holder }),
                    Some(_) => Ok(hostname),
                    None => {
                        taken.insert((s.mesh, hostname.clone()), i);
                        Ok(hostname)
                    }
                },
            };
            out.push(Outcome {
                service: i,
                generator: g.name.to_string(),
                result,
            });
        }
    }
    out
}

#[cfg(test)]
mod generate_tests {
    use super::*;

    fn service<'a>(mesh: &'a str, name: &'a str, labels: &'a [(String, String)]) -> Service<'a> {
        Service {
            mesh,
            subject: Subject {
                display_name: name,
                name,
                namespace: "",
                mesh,
                zone: "default",
                labels,
            },
        }
    }

    #[test]
    fn the_older_service_keeps_a_name_and_meshes_are_apart() {
        let default = Template::parse("{{ .DisplayName }}.extsvc.mesh.local").unwrap();
        let by_team = Template::parse("{{ label \"team\" }}.api.example").unwrap();
        let payments = vec![("team".to_string(), "payments".to_string())];
        let none: Vec<(String, String)> = Vec::new();
        let select = vec![("team".to_string(), "payments".to_string())];
        let generators = [
            Generator {
                name: "default",
                match_labels: &[],
                template: &default,
            },
            Generator {
                name: "teams",
                match_labels: &select,
                template: &by_team,
            },
        ];
        let services = [
            service("default", "billing", &payments),
            service("default", "ledger", &payments),
            service("other", "billing", &none),
            service("default", "Bad_Name", &none),
        ];
        let got: Vec<(usize, String, Result<String, String>)> = generate(&generators, &services)
            .into_iter()
            .map(|o| {
                let result = o.result.map_err(|f| format!("{}: {f:?}", f.reason()));
                (o.service, o.generator, result)
            })
            .collect();
        let ok = |s: usize, g: &str, h: &str| (s, g.to_string(), Ok(h.to_string()));
        let err = |s: usize, g: &str, e: &str| (s, g.to_string(), Err(e.to_string()));
        assert_eq!(
            got,
            vec![
                ok(0, "default", "billing.extsvc.mesh.local"),
                ok(0, "teams", "payments.api.example"),
                ok(1, "default", "ledger.extsvc.mesh.local"),
                err(
                    1,
                    "teams",
                    "Collision: Collision { hostname: \"payments.api.example\", holder: 0 }"
                ),
                ok(2, "default", "billing.extsvc.mesh.local"),
                err(
                    3,
                    "default",
                    "TemplateError: TemplateError(\"\\\"Bad_Name.extsvc.mesh.local\\\" is not a valid DNS name: labels of letters, digits and '-', at most 63 each, 253 in all\")"
                ),
            ]
        );
    }
}
