//! `sluice convert`: what resources become in Sluice's internal model, or as Kuma resources
//! where they fit, and what does not translate. Key material is never printed.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::ExitCode;

use serde_json::{json, Map, Value};
use sluice_api::model::{
    Endpoint, ExternalService, LoadBalancer, Material, Protocol, SanMatch, TlsOrigination,
    TlsVersion, VerificationMode,
};
use sluice_api::Registry;

use crate::load;

/// A mapping written in the order its keys were given (resources read best with `type` and
/// `name` first).
struct Ordered(Vec<(&'static str, Node)>);

/// A value of an [`Ordered`] mapping: plain, another ordered mapping, or a list of them.
enum Node {
    Plain(Value),
    Map(Ordered),
    List(Vec<Ordered>),
}

impl<T: Into<Value>> From<T> for Node {
    fn from(v: T) -> Self {
        Node::Plain(v.into())
    }
}

impl serde::Serialize for Node {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self {
            Node::Plain(v) => v.serialize(s),
            Node::Map(o) => o.serialize(s),
            Node::List(items) => s.collect_seq(items),
        }
    }
}

impl serde::Serialize for Ordered {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeMap;
        let mut map = s.serialize_map(Some(self.0.len()))?;
        for (k, v) in &self.0 {
            map.serialize_entry(k, v)?;
        }
        map.end()
    }
}

/// `(key, value)` for an [`Ordered`] mapping.
fn kv(key: &'static str, value: impl Into<Value>) -> (&'static str, Node) {
    (key, Node::Plain(value.into()))
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Target {
    /// Sluice's internal model: one entry per service, with where its traffic goes.
    Sluice,
    /// Kuma's MeshExternalService, Dataplane and Mesh, for what they can express.
    Kuma,
}

pub fn main(files: &[PathBuf], to: Target) -> ExitCode {
    let (documents, mut problems) = load::read_documents(files);
    let loaded = sluice_api::load(&documents);
    problems.extend(loaded.diagnostics.iter().map(ToString::to_string));
    for p in &problems {
        eprintln!("{p}");
    }
    let Some(registry) = loaded
        .registry
        .filter(|_| problems.iter().all(|p| p.starts_with("warning: ")))
    else {
        let errors = problems
            .iter()
            .filter(|p| !p.starts_with("warning: "))
            .count();
        eprintln!("{errors} error(s); nothing is converted until they are fixed");
        return ExitCode::FAILURE;
    };
    let mut notes = Vec::new();
    let documents: Vec<Ordered> = match to {
        Target::Sluice => vec![model(&registry)],
        Target::Kuma => kuma(&registry, &mut notes),
    };
    for n in &notes {
        eprintln!("not converted: {n}");
    }
    let warnings = problems.len();
    if warnings > 0 {
        eprintln!("{warnings} warning(s): the fields they name have no effect and were left out");
    }
    let mut out = String::new();
    for (i, doc) in documents.iter().enumerate() {
        if i > 0 {
            out.push_str("---\n");
        }
        match serde_saphyr::to_string(doc) {
            Ok(text) => out.push_str(&text),
            Err(e) => {
                eprintln!("sluice: cannot write YAML: {e}");
                return ExitCode::FAILURE;
            }
        }
    }
    print!("{out}");
    ExitCode::SUCCESS
}

/// The internal model, one entry per service.
fn model(registry: &Registry) -> Ordered {
    let services: Vec<Ordered> = registry
        .services
        .values()
        .map(|s| service_view(s))
        .collect();
    let outbounds: Vec<Value> = registry
        .outbounds
        .iter()
        .map(|o| {
            json!({
                "dataplane": o.dataplane.to_string(),
                "listen": std::net::SocketAddr::new(o.address, o.port).to_string(),
                "service": o.service.to_string(),
            })
        })
        .collect();
    let mut top = vec![("services", Node::List(services))];
    if !outbounds.is_empty() {
        top.push(kv("outbounds", Value::Array(outbounds)));
    }
    if let Some(p) = registry.outbound_traffic_policy {
        top.push(kv("outboundTrafficPolicy", Value::from(p.as_str())));
    }
    Ordered(top)
}

fn service_view(s: &ExternalService) -> Ordered {
    let mut m = vec![
        kv("name", s.key.name.clone()),
        kv("mesh", s.key.mesh.clone()),
        kv("port", s.port),
        kv(
            "protocol",
            match s.protocol {
                Protocol::Tls => "tls (the app's own TLS, passed through)",
                p => p.as_str(),
            },
        ),
    ];
    if !s.hosts.is_empty() {
        m.push(kv("hosts", json!(s.hosts)));
    }
    if !s.addresses.is_empty() {
        let a: Vec<String> = s.addresses.iter().map(ToString::to_string).collect();
        m.push(kv("addresses", json!(a)));
    }
    if s.endpoints.is_empty() {
        m.push(kv(
            "endpoints",
            "none: to the host or address the app names, resolved and checked by the proxy",
        ));
    } else {
        let e: Vec<String> = s.endpoints.iter().map(ToString::to_string).collect();
        m.push(kv("endpoints", json!(e)));
    }
    if !s.endpoint_weights.is_empty() {
        m.push(kv("endpointWeights", json!(s.endpoint_weights)));
    }
    if s.endpoints.len() > 1 {
        m.push(kv(
            "loadBalancer",
            match s.load_balancer {
                LoadBalancer::RoundRobin => "roundRobin",
                LoadBalancer::LeastRequest => "leastRequest",
                LoadBalancer::Random => "random",
            },
        ));
    }
    if let Some(t) = &s.tls {
        m.push(("tls", Node::Map(tls_view(t))));
    }
    Ordered(m)
}

fn version(v: Option<TlsVersion>) -> &'static str {
    match v {
        None => "TLSAuto",
        Some(TlsVersion::Tls12) => "TLS12",
        Some(TlsVersion::Tls13) => "TLS13",
    }
}

fn mode(m: VerificationMode) -> &'static str {
    match m {
        VerificationMode::Secured => "Secured",
        VerificationMode::SkipSAN => "SkipSAN",
        VerificationMode::SkipCA => "SkipCA",
        VerificationMode::SkipAll => "SkipAll",
    }
}

fn sans(t: &TlsOrigination) -> Vec<Value> {
    t.subject_alt_names
        .iter()
        .map(|s| match s {
            SanMatch::Exact(v) => json!({"type": "Exact", "value": v}),
            SanMatch::Prefix(v) => json!({"type": "Prefix", "value": v}),
        })
        .collect()
}

/// Where material comes from, never what it holds.
fn origin(m: &Material) -> String {
    match &m.file {
        Some(_) => format!("{} (read by the proxy)", m.origin),
        None => m.origin.clone(),
    }
}

fn tls_view(t: &TlsOrigination) -> Ordered {
    let mut m = vec![
        kv("verification", mode(t.mode)),
        kv(
            "serverName",
            t.server_name
                .clone()
                .unwrap_or_else(|| "each endpoint's own name".into()),
        ),
        kv(
            "versions",
            format!("{} to {}", version(t.min_version), version(t.max_version)),
        ),
    ];
    if !t.subject_alt_names.is_empty() {
        m.push(kv("subjectAltNames", Value::Array(sans(t))));
    }
    m.push(kv(
        "ca",
        t.ca_cert
            .as_ref()
            .map_or("the system's roots".to_string(), origin),
    ));
    if let Some(c) = &t.client_cert {
        m.push(kv(
            "clientCertificate",
            json!({"cert": origin(&c.cert), "key": origin(&c.key)}),
        ));
    }
    Ordered(m)
}

/// Kuma documents for what they can express; the rest is told in `notes`.
fn kuma(registry: &Registry, notes: &mut Vec<String>) -> Vec<Ordered> {
    let mut docs = Vec::new();
    let mut secrets: BTreeMap<String, String> = BTreeMap::new();
    for s in registry.services.values() {
        let who = format!("service {}", s.key);
        if s.endpoints.is_empty() {
            notes.push(format!(
                "{who} goes to the host the app names (resolution NONE, a wildcard or a range): a MeshExternalService needs endpoints; it is left out"
            ));
            continue;
        }
        if !s.hosts.is_empty() || !s.addresses.is_empty() {
            let mut names: Vec<String> = s.hosts.clone();
            names.extend(s.addresses.iter().map(ToString::to_string));
            notes.push(format!(
                "{who}: apps call it as {}; Kuma names a MeshExternalService with a HostnameGenerator instead, so those names are not written",
                names.join(", ")
            ));
        }
        if !s.endpoint_weights.is_empty() {
            notes.push(format!(
                "{who}: its endpoint weights have no place in a MeshExternalService; not written"
            ));
        }
        if s.load_balancer != LoadBalancer::RoundRobin {
            notes.push(format!(
                "{who}: its load balancing ({:?}) is a MeshLoadBalancingStrategy policy in Kuma; not written",
                s.load_balancer
            ));
        }
        let endpoints: Vec<Value> = s
            .endpoints
            .iter()
            .map(|e| match e {
                Endpoint::Ip { ip, port } => json!({"address": ip.to_string(), "port": port}),
                Endpoint::Dns { host, port } => json!({"address": host, "port": port}),
                Endpoint::Unix { path } => json!({"address": format!("unix://{}", path.display())}),
            })
            .collect();
        let protocol = match s.protocol {
            // The app's own TLS is bytes to Kuma.
            Protocol::Tls => "tcp",
            p => p.as_str(),
        };
        let mut spec = vec![
            (
                "match",
                Node::Map(Ordered(vec![
                    kv("type", "HostnameGenerator"),
                    kv("port", s.port),
                    kv("protocol", protocol),
                ])),
            ),
            kv("endpoints", Value::Array(endpoints)),
        ];
        if let Some(t) = &s.tls {
            spec.push(kv("tls", kuma_tls(t, s, notes, &mut secrets)));
        }
        docs.push(Ordered(vec![
            kv("type", "MeshExternalService"),
            kv("name", s.key.name.clone()),
            kv("mesh", s.key.mesh.clone()),
            ("spec", Node::Map(Ordered(spec))),
        ]));
    }
    let mut dataplanes: BTreeMap<String, (String, String, Vec<Value>)> = BTreeMap::new();
    for dp in &registry.dataplanes {
        dataplanes.insert(
            dp.to_string(),
            (dp.mesh.clone(), dp.name.clone(), Vec::new()),
        );
    }
    for o in &registry.outbounds {
        if let Some((_, _, outbounds)) = dataplanes.get_mut(&o.dataplane.to_string()) {
            outbounds.push(json!({
                "port": o.port,
                "address": o.address.to_string(),
                "backendRef": {"kind": "MeshExternalService", "name": o.service.name},
            }));
        }
    }
    for (_, (mesh, name, outbounds)) in dataplanes {
        docs.push(Ordered(vec![
            kv("type", "Dataplane"),
            kv("name", name),
            kv("mesh", mesh),
            kv(
                "networking",
                json!({"address": "127.0.0.1", "outbound": outbounds}),
            ),
        ]));
    }
    if let Some(p) = registry.outbound_traffic_policy {
        docs.push(Ordered(vec![
            kv("type", "Mesh"),
            kv("name", "default"),
            kv(
                "networking",
                json!({"outbound": {"passthrough": p == sluice_api::model::OutboundTrafficPolicy::Allowed}}),
            ),
        ]));
    }
    for (secret, what) in secrets {
        notes.push(format!(
            "the {what} is not printed: create Secret {secret:?} holding it, which the output refers to"
        ));
    }
    docs
}

fn kuma_tls(
    t: &TlsOrigination,
    s: &ExternalService,
    notes: &mut Vec<String>,
    secrets: &mut BTreeMap<String, String>,
) -> Value {
    let mut v = Map::new();
    if let Some(n) = &t.server_name {
        v.insert("serverName".into(), n.clone().into());
    }
    v.insert("mode".into(), mode(t.mode).into());
    if !t.subject_alt_names.is_empty() {
        v.insert("subjectAltNames".into(), Value::Array(sans(t)));
    }
    let mut source = |m: &Material, role: &str, public: bool| -> Value {
        // A Kuma Secret named by its resource, as the origin says.
        if let Some(name) = m
            .origin
            .strip_prefix("secret ")
            .filter(|n| !n.contains(' '))
        {
            return json!({"secret": name});
        }
        // Certificates are public; a bundle that also holds a key is not.
        let holds_key = sluice_api::resource::Pem::PrivateKey.found_in(&m.pem);
        if public && m.file.is_none() && !holds_key {
            if let Ok(text) = std::str::from_utf8(&m.pem) {
                return json!({"inlineString": text});
            }
        }
        let name = format!("{}-{role}", s.key.name);
        secrets.insert(
            name.clone(),
            format!("{role} of service {} ({})", s.key, m.origin),
        );
        if m.file.is_some() {
            notes.push(format!(
                "service {}: its {role} is a file on the proxy's host ({}); Kuma reads no files",
                s.key, m.origin
            ));
        }
        json!({"secret": name})
    };
    if let Some(ca) = &t.ca_cert {
        v.insert("caCert".into(), source(ca, "ca-cert", true));
    }
    if let Some(c) = &t.client_cert {
        v.insert("clientCert".into(), source(&c.cert, "client-cert", true));
        v.insert("clientKey".into(), source(&c.key, "client-key", false));
    }
    let mut tls = json!({"enabled": true, "verification": Value::Object(v)});
    if t.min_version.is_some() || t.max_version.is_some() {
        tls["version"] = json!({"min": version(t.min_version), "max": version(t.max_version)});
    }
    tls
}
