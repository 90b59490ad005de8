//! Checks between resources (references, duplicates) and resolution into the model.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::Arc;

use crate::diag::{Diagnostic, Diagnostics, DocRef, Severity};
use crate::document::Document;
use crate::istio;
use crate::kuma::{
    self, Backend, DataSource, ExternalServiceResource, MesSpec, MeshExternalServiceResource,
    Sourced,
};
use crate::model::{
    ClientIdentity, ExternalService, LoadBalancer, Material, Outbound, OutboundTrafficPolicy,
    ResourceKey, TlsOrigination,
};
use crate::node::At;
use crate::resource::{Located, Resource, SecretResource};

/// Everything a proxy needs, resolved and checked. Only built when no document has an error.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Registry {
    /// Shared with every config compiled from the registry rather than copied into it.
    pub services: BTreeMap<ResourceKey, Arc<ExternalService>>,
    pub outbounds: Vec<Outbound>,
    /// Every Dataplane, with or without outbounds: a proxy of that name gets only what it uses.
    pub dataplanes: BTreeSet<ResourceKey>,
    /// Set by a Kuma Mesh's `networking.outbound.passthrough`; with several meshes the strictest
    /// wins, since one proxy enforces it for all of them.
    pub outbound_traffic_policy: Option<OutboundTrafficPolicy>,
    /// What transparent mode calls services by.
    pub naming: Naming,
}

/// The names the built-in DNS answers for, before VIPs are given out: generated names, the
/// services generators read, and the names services carry themselves.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Naming {
    /// HostnameGenerators by name, Kuma's default among them unless one replaces it.
    pub generators: Vec<GeneratorSpec>,
    /// MeshExternalServices, in name order, each named by the generators selecting it.
    pub subjects: Vec<NamingSubject>,
    /// Real hostnames (Istio's and Gloo's hosts, a Kuma ExternalService's address) and Kuma's
    /// `SERVICE.mesh`, each at the port the app calls.
    pub fixed: Vec<FixedName>,
}

/// The resource a name or VIP belongs to, as its status shows it.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Origin {
    pub kind: &'static str,
    pub key: ResourceKey,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GeneratorSpec {
    pub name: String,
    pub match_labels: Vec<(String, String)>,
    pub template: crate::hostname::Template,
}

/// What a template reads of a MeshExternalService, and where its traffic goes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NamingSubject {
    pub origin: Origin,
    pub display_name: String,
    pub name: String,
    pub namespace: String,
    pub zone: String,
    /// Its own labels; those Kuma sets on every resource are added when read
    /// ([`crate::hostname::Subject::label`]).
    pub labels: Vec<(String, String)>,
    pub port: u16,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FixedName {
    pub origin: Origin,
    pub name: String,
    pub port: u16,
    /// The internal service the name and port lead to.
    pub service: ResourceKey,
}

/// The outcome of loading a set of documents: the registry if they are all valid, and every
/// diagnostic (errors and warnings) either way.
#[derive(Debug, Default)]
pub struct Loaded {
    pub registry: Option<Registry>,
    /// In the order of the documents given, and for each document in the order found.
    pub diagnostics: Vec<Diagnostic>,
    /// How many valid resources of each kind were read.
    pub counts: BTreeMap<&'static str, usize>,
}

impl Loaded {
    pub fn errors(&self) -> impl Iterator<Item = &Diagnostic> {
        self.diagnostics
            .iter()
            .filter(|d| d.severity == Severity::Error)
    }
}

/// The kind and key a document declares, if they can be read (its other errors aside).
pub fn identify(document: &Document) -> Option<(&'static str, ResourceKey)> {
    parse(document)
        .identity()
        .map(|(kind, key)| (kind, key.clone()))
}

/// One document read on its own: its resource (if it could tell which) and its own problems.
/// Kept per document, so that a set of documents where one changed is checked again without
/// reading the others again.
#[derive(Debug, Clone)]
pub struct Parsed {
    pub doc: DocRef,
    located: Option<Located>,
    diagnostics: Vec<Diagnostic>,
}

impl Parsed {
    /// The kind and key the document declares, if they could be read (its other errors aside).
    pub fn identity(&self) -> Option<(&'static str, &ResourceKey)> {
        self.located
            .as_ref()
            .map(|l| (l.resource.kind(), &l.resource.meta().key))
    }
}

/// Reads one document; references to other resources are checked by [`resolve`].
pub fn parse(document: &Document) -> Parsed {
    let mut d = Diagnostics::for_doc(document.doc.clone());
    let root = At::root(&document.value);
    let parsed = if crate::istio::claims(&document.value) {
        crate::istio::parse(&root, &mut d)
    } else if crate::gloo::claims(&document.value) {
        crate::gloo::parse(&root, &mut d)
    } else {
        kuma::parse(&root, &mut d)
    };
    let located = parsed.map(|resource| Located {
        doc: document.doc.clone(),
        resource,
        valid: !d.has_errors(),
    });
    Parsed {
        doc: document.doc.clone(),
        located,
        diagnostics: d.into_vec(),
    }
}

/// Reads, checks and resolves a set of documents as one configuration.
pub fn load<'a>(documents: impl IntoIterator<Item = &'a Document>) -> Loaded {
    let parsed: Vec<Parsed> = documents.into_iter().map(parse).collect();
    resolve(&parsed)
}

/// Checks documents read with [`parse`] against each other and resolves them into the
/// registry; diagnostics follow the order given.
pub fn resolve<'a>(parsed: impl IntoIterator<Item = &'a Parsed>) -> Loaded {
    let parsed: Vec<&Parsed> = parsed.into_iter().collect();
    let mut diagnostics: Vec<Diagnostic> = parsed
        .iter()
        .flat_map(|p| p.diagnostics.iter().cloned())
        .collect();
    let located: Vec<&Located> = parsed.iter().filter_map(|p| p.located.as_ref()).collect();
    let mut counts = BTreeMap::new();
    for l in located.iter().filter(|l| l.valid) {
        *counts.entry(l.resource.kind()).or_insert(0) += 1;
    }
    let registry = resolve_located(&located, &mut diagnostics);
    // Problems found between resources belong with the other problems of their document.
    if !diagnostics.is_empty() {
        let position: HashMap<&DocRef, usize> = parsed
            .iter()
            .enumerate()
            .map(|(i, p)| (&p.doc, i))
            .collect();
        diagnostics.sort_by_key(|d| {
            d.doc
                .as_ref()
                .and_then(|doc| position.get(doc).copied())
                .unwrap_or(usize::MAX)
        });
    }
    let has_errors = diagnostics.iter().any(|d| d.severity == Severity::Error);
    Loaded {
        registry: (!has_errors).then_some(registry),
        diagnostics,
        counts,
    }
}

/// Resources of one kind by mesh and name, to resolve references and explain misses. A
/// resource whose document has errors is present with `None`: references to it are not
/// checked further, as its own errors already say what to fix.
struct Index<'a, T> {
    kind: &'static str,
    by_key: HashMap<&'a ResourceKey, Option<T>>,
}

impl<'a, T> Index<'a, T> {
    fn new(kind: &'static str) -> Self {
        Self {
            kind,
            by_key: HashMap::new(),
        }
    }

    /// `Ok(None)` for a target with its own errors; `Err` with the message for a miss.
    fn find(&self, mesh: &str, name: &str, from: &str) -> Result<Option<&T>, String> {
        let key = ResourceKey {
            mesh: mesh.to_string(),
            name: name.to_string(),
        };
        if let Some(t) = self.by_key.get(&key) {
            return Ok(t.as_ref());
        }
        let kind = self.kind;
        let mut elsewhere: Vec<&str> = self
            .by_key
            .keys()
            .filter(|k| k.name == name)
            .map(|k| k.mesh.as_str())
            .collect();
        elsewhere.sort_unstable();
        Err(match elsewhere.as_slice() {
            [] => format!("no {kind} named {name:?} in mesh {mesh:?}; define it or fix the name"),
            meshes => format!(
                "no {kind} named {name:?} in mesh {mesh:?} (there is one in mesh {}, but a {from} only refers to its own mesh); define it in mesh {mesh:?} or fix the name",
                meshes
                    .iter()
                    .map(|m| format!("{m:?}"))
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
        })
    }
}

fn resolve_located(located: &[&Located], out: &mut Vec<Diagnostic>) -> Registry {
    let mut policy: Option<OutboundTrafficPolicy> = None;
    let mut seen: HashMap<(&'static str, &ResourceKey), &DocRef> = HashMap::new();
    let mut secrets: Index<&SecretResource> = Index::new("Secret");
    // A valid MeshExternalService always has its match.port.
    let mut services: Index<u16> = Index::new("MeshExternalService");
    let mut mes: Vec<(&DocRef, &MeshExternalServiceResource, bool)> = Vec::new();
    let mut dataplanes = Vec::new();
    let mut legacy: Vec<(&DocRef, &ExternalServiceResource, bool)> = Vec::new();
    // Kuma ExternalServices by mesh and kuma.io/service tag: the first one's name and document.
    let mut tags: HashMap<(&str, &str), (&str, &DocRef)> = HashMap::new();
    let mut tag_keys: HashMap<(&str, &str), Option<&ResourceKey>> = HashMap::new();
    let mut istio = istio::translate::Inputs::default();
    let mut gloo = crate::gloo::translate::Inputs::default();
    let mut generators: Vec<GeneratorSpec> = Vec::new();
    // Every generator defined, valid or not: one named like the default replaces it.
    let mut generator_names: BTreeSet<&str> = BTreeSet::new();
    let origins: HashMap<&DocRef, Origin> = located
        .iter()
        .map(|l| {
            (
                &l.doc,
                Origin {
                    kind: l.resource.kind(),
                    key: l.resource.meta().key.clone(),
                },
            )
        })
        .collect();
    for l in located {
        let key = &l.resource.meta().key;
        if let Some(first) = seen.get(&(l.resource.kind(), key)) {
            // The first definition stands; a later one is reported and otherwise ignored.
            let mut d = Diagnostics::for_doc(l.doc.clone());
            d.error(
                "",
                format!(
                    "{} {:?} in mesh {:?} is already defined at {first}; rename one of them or remove this one",
                    l.resource.kind(),
                    key.name,
                    key.mesh
                ),
            );
            out.extend(d.into_vec());
            continue;
        }
        seen.insert((l.resource.kind(), key), &l.doc);
        match &l.resource {
            Resource::Secret(s) => {
                secrets.by_key.insert(key, l.valid.then_some(s));
            }
            Resource::MeshExternalService(m) => {
                let value = m.spec.port.filter(|_| l.valid);
                services.by_key.insert(key, value);
                mes.push((&l.doc, m, l.valid));
            }
            Resource::ExternalService(es) => {
                if let Some(tag) = &es.service {
                    let mesh = es.meta.key.mesh.as_str();
                    if let Some((first, at)) = tags.get(&(mesh, tag.as_str())) {
                        let mut d = Diagnostics::for_doc(l.doc.clone());
                        d.error(
                            &format!("tags[\"{}\"]", kuma::SERVICE_TAG),
                            format!("{tag:?} is already the kuma.io/service of ExternalService {first:?} at {at}; Sluice sends one tag to one ExternalService: give this one its own kuma.io/service"),
                        );
                        out.extend(d.into_vec());
                    } else {
                        tags.insert((mesh, tag.as_str()), (es.meta.key.name.as_str(), &l.doc));
                        tag_keys.insert((mesh, tag.as_str()), l.valid.then_some(&es.meta.key));
                    }
                }
                legacy.push((&l.doc, es.as_ref(), l.valid));
            }
            Resource::Dataplane(dp) => dataplanes.push((&l.doc, dp)),
            Resource::HostnameGenerator(g) => {
                // One selecting no MeshExternalService names nothing here.
                if let (true, Some(template), Some(labels)) =
                    (l.valid, &g.template, &g.match_labels)
                {
                    generators.push(GeneratorSpec {
                        name: g.meta.key.name.clone(),
                        match_labels: labels.clone(),
                        template: template.clone(),
                    });
                }
                generator_names.insert(g.meta.key.name.as_str());
            }
            Resource::ServiceEntry(r) if l.valid => istio.entries.push((&l.doc, r)),
            Resource::DestinationRule(r) if l.valid => istio.rules.push((&l.doc, r)),
            Resource::VirtualService(r) if l.valid => istio.virtual_services.push((&l.doc, r)),
            Resource::GlooExternalService(r) if l.valid => gloo.services.push((&l.doc, r)),
            Resource::ExternalEndpoint(r) if l.valid => gloo.endpoints.push(r),
            Resource::Workspace(r) if l.valid => gloo.workspaces.push(r),
            // Their own errors say what to fix; nothing is made of them.
            Resource::ServiceEntry(_)
            | Resource::DestinationRule(_)
            | Resource::VirtualService(_)
            | Resource::GlooExternalService(_)
            | Resource::ExternalEndpoint(_)
            | Resource::Workspace(_) => {}
            Resource::Mesh(m) => {
                // One proxy enforces it for every mesh: the strictest setting wins.
                policy = match (policy, m.outbound_traffic_policy) {
                    (Some(OutboundTrafficPolicy::Restricted), _) => policy,
                    (_, Some(p)) => Some(p),
                    (current, None) => current,
                };
            }
        }
    }

    let mut registry = Registry {
        outbound_traffic_policy: policy,
        ..Registry::default()
    };
    // Which document made each internal service, so two kinds cannot claim one name.
    let mut made: HashMap<ResourceKey, (&'static str, DocRef)> = HashMap::new();
    let mut add = |registry: &mut Registry,
                   kind: &'static str,
                   doc: &DocRef,
                   service: ExternalService,
                   d: &mut Diagnostics| {
        if let Some((other, at)) = made.get(&service.key) {
            d.error(
                "",
                format!(
                    "{kind} {:?} in mesh {:?} has the name of {other} {:?} at {at}: they would be one service; rename one of them",
                    service.key.name, service.key.mesh, service.key.name
                ),
            );
            return;
        }
        made.insert(service.key.clone(), (kind, doc.clone()));
        registry
            .services
            .insert(service.key.clone(), Arc::new(service));
    };
    let mes_named: Vec<&MeshExternalServiceResource> = mes.iter().map(|(_, m, _)| *m).collect();
    for (doc, m, valid) in mes {
        let mut d = Diagnostics::for_doc(doc.clone());
        let service = external_service(&m.meta, &m.spec, &secrets, &mut d);
        if let (true, Some(service)) = (valid, service) {
            add(&mut registry, "MeshExternalService", doc, service, &mut d);
        }
        out.extend(d.into_vec());
    }
    for (doc, es, valid) in &legacy {
        let mut d = Diagnostics::for_doc((*doc).clone());
        let service = external_service(&es.meta, &es.spec, &secrets, &mut d);
        if let (true, Some(service)) = (valid, service) {
            add(&mut registry, "ExternalService", doc, service, &mut d);
        }
        out.extend(d.into_vec());
    }
    // A Secret of the rule's (or the ExternalService's) own namespace.
    let credentials = |mesh: &str, name: &str| {
        secrets
            .find(mesh, name, "credentialName")
            .map(|found| found.copied())
    };
    for (doc, service) in istio::translate::services(&istio, &credentials, out) {
        let mut d = Diagnostics::for_doc(doc.clone());
        add(&mut registry, "ServiceEntry", &doc, service, &mut d);
        out.extend(d.into_vec());
    }
    for (doc, service) in crate::gloo::translate::services(&gloo, &credentials, out) {
        let mut d = Diagnostics::for_doc(doc.clone());
        add(&mut registry, "Gloo ExternalService", &doc, service, &mut d);
        out.extend(d.into_vec());
    }

    if !generator_names.contains(kuma::DEFAULT_NAME) {
        if let Ok(template) = crate::hostname::Template::parse(kuma::DEFAULT_TEMPLATE) {
            generators.push(GeneratorSpec {
                name: kuma::DEFAULT_NAME.to_string(),
                match_labels: vec![("kuma.io/origin".to_string(), "zone".to_string())],
                template,
            });
        }
    }
    generators.sort_by(|a, b| a.name.cmp(&b.name));
    registry.naming.generators = generators;
    registry.naming.subjects = naming_subjects(&mes_named, &registry);
    registry.naming.fixed = fixed_names(&legacy, &made, &origins, &registry);

    for (doc, dp) in dataplanes {
        let mut d = Diagnostics::for_doc(doc.clone());
        let mesh = &dp.meta.key.mesh;
        registry.dataplanes.insert(dp.meta.key.clone());
        for o in &dp.outbounds {
            let name = &o.backend.name;
            let service = match o.backend.kind {
                Backend::MeshExternalService => {
                    match services.find(mesh, name, "Dataplane") {
                        Err(message) => d.error(&format!("{}.backendRef.name", o.path), message),
                        Ok(Some(port)) => {
                            if let Some(p) = o.backend.port.filter(|p| p != port) {
                                d.error(
                                    &format!("{}.backendRef.port", o.path),
                                    format!(
                                        "{p} is not the port of MeshExternalService {name:?} (its match.port is {port}); use {port} or remove backendRef.port"
                                    ),
                                );
                            }
                        }
                        Ok(_) => {}
                    }
                    ResourceKey {
                        mesh: mesh.clone(),
                        name: name.clone(),
                    }
                }
                Backend::ServiceTag => match tag_keys.get(&(mesh.as_str(), name.as_str())) {
                    Some(Some(key)) => (*key).clone(),
                    // The ExternalService's own errors say what to fix.
                    Some(None) => continue,
                    None => {
                        d.error(
                            &format!("{}.tags[\"{}\"]", o.path, kuma::SERVICE_TAG),
                            format!("no ExternalService in mesh {mesh:?} has kuma.io/service {name:?}; define one with that tag or fix the tag"),
                        );
                        continue;
                    }
                },
            };
            registry.outbounds.push(Outbound {
                dataplane: dp.meta.key.clone(),
                address: o.address,
                port: o.port,
                service,
            });
        }
        out.extend(d.into_vec());
    }
    registry
}

/// Every MeshExternalService that made a service, with what generator templates read of it.
fn naming_subjects(
    mes: &[&MeshExternalServiceResource],
    registry: &Registry,
) -> Vec<NamingSubject> {
    let mut subjects: Vec<NamingSubject> = mes
        .iter()
        .filter_map(|m| {
            let service = registry.services.get(&m.meta.key)?;
            let meta = &m.meta;
            let label = |k: &str| {
                meta.labels
                    .iter()
                    .find(|(l, _)| l == k)
                    .map(|(_, v)| v.clone())
            };
            let namespace = meta.namespace.clone().unwrap_or_default();
            let display_name =
                label("kuma.io/display-name").unwrap_or_else(|| meta.key.name.clone());
            Some(NamingSubject {
                origin: Origin {
                    kind: "MeshExternalService",
                    key: meta.key.clone(),
                },
                // Kuma's name of a namespaced resource carries its namespace.
                name: if namespace.is_empty() {
                    meta.key.name.clone()
                } else {
                    format!("{}.{namespace}", meta.key.name)
                },
                display_name,
                namespace,
                zone: label("kuma.io/zone").unwrap_or_default(),
                labels: meta.labels.clone(),
                port: service.port,
            })
        })
        .collect();
    subjects.sort_by(|a, b| a.origin.cmp(&b.origin));
    subjects
}

/// The names services carry themselves: a Kuma ExternalService's `SERVICE.mesh` on port 80 and
/// its address's hostname on the address's port; Istio's and Gloo's exact hosts on each port
/// (wildcards name no single address, and entries with addresses are reached by them).
fn fixed_names(
    legacy: &[(&DocRef, &ExternalServiceResource, bool)],
    made: &HashMap<ResourceKey, (&'static str, DocRef)>,
    origins: &HashMap<&DocRef, Origin>,
    registry: &Registry,
) -> Vec<FixedName> {
    let mut fixed = Vec::new();
    for (_, es, _) in legacy {
        let Some(service) = registry.services.get(&es.meta.key) else {
            continue;
        };
        let origin = Origin {
            kind: "ExternalService",
            key: es.meta.key.clone(),
        };
        if let Some(tag) = &es.service {
            fixed.push(FixedName {
                origin: origin.clone(),
                name: format!("{}.mesh", tag.to_ascii_lowercase()),
                port: service.port,
                service: service.key.clone(),
            });
        }
        for e in &service.endpoints {
            if let crate::model::Endpoint::Dns { host, port } = e {
                fixed.push(FixedName {
                    origin: origin.clone(),
                    name: host.to_ascii_lowercase(),
                    port: *port,
                    service: service.key.clone(),
                });
            }
        }
    }
    for service in registry.services.values() {
        if service.hosts.is_empty() || !service.addresses.is_empty() {
            continue;
        }
        let Some(origin) = made.get(&service.key).and_then(|(_, doc)| origins.get(doc)) else {
            continue;
        };
        for host in service.hosts.iter().filter(|h| !h.starts_with('*')) {
            fixed.push(FixedName {
                origin: origin.clone(),
                name: host.to_ascii_lowercase(),
                port: service.port,
                service: service.key.clone(),
            });
        }
    }
    fixed
}

/// The internal service a MeshExternalService's (or a Kuma ExternalService's) spec makes, with
/// its certificates and keys resolved; `None` without a port (an error was reported).
fn external_service(
    meta: &crate::resource::Meta,
    spec: &MesSpec,
    secrets: &Index<&SecretResource>,
    d: &mut Diagnostics,
) -> Option<ExternalService> {
    let tls = spec.tls.as_ref().map(|t| {
        let mesh = &meta.key.mesh;
        let mut material = |s: &Option<Sourced>| {
            s.as_ref()
                .and_then(|s| resolve_material(s, mesh, secrets, d))
        };
        let ca_cert = material(&t.ca_cert);
        let cert = material(&t.client_cert);
        let key = material(&t.client_key);
        TlsOrigination {
            min_version: t.min,
            max_version: t.max,
            allow_renegotiation: t.allow_renegotiation,
            mode: t.mode,
            server_name: t.server_name.clone(),
            subject_alt_names: t.subject_alt_names.clone(),
            ca_cert,
            client_cert: cert
                .zip(key)
                .map(|(cert, key)| ClientIdentity { cert, key }),
        }
    });
    Some(ExternalService {
        key: meta.key.clone(),
        port: spec.port?,
        protocol: spec.protocol,
        endpoints: spec.endpoints.clone(),
        tls,
        hosts: Vec::new(),
        addresses: Vec::new(),
        load_balancer: LoadBalancer::RoundRobin,
        endpoint_weights: Vec::new(),
    })
}

/// The material a data source names. Inline material was checked when its document was read;
/// a Secret is checked here, against what this reference needs.
fn resolve_material(
    s: &Sourced,
    mesh: &str,
    secrets: &Index<&SecretResource>,
    d: &mut Diagnostics,
) -> Option<Material> {
    let (origin, pem) = match &s.source {
        DataSource::Inline(b) => ("inline".to_string(), b.clone()),
        DataSource::InlineString(text) => ("inlineString".to_string(), text.as_bytes().to_vec()),
        DataSource::Secret(name) => match secrets.find(mesh, name, "MeshExternalService") {
            Err(message) => {
                d.error(&s.path, message);
                return None;
            }
            // The Secret's own errors are reported at its document.
            Ok(None) => return None,
            Ok(Some(secret)) if !secret.holds(s.want) => {
                d.error(
                    &s.path,
                    format!("Secret {name:?} holds {}", s.want.missing()),
                );
                return None;
            }
            Ok(Some(secret)) => (format!("secret {name}"), secret.data.clone()),
        },
    };
    Some(Material::inline(origin, pem))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::document::parse_documents;

    const MES: &str = "type: MeshExternalService\nname: api\nspec:\n  match: {port: 80}\n  endpoints: [{address: api.example.com, port: 80}]\n";

    #[test]
    fn diagnostics_follow_the_order_of_the_documents_given() {
        let mut docs = parse_documents(
            "z.yaml",
            "type: Dataplane\nname: dp\nnetworking:\n  outbound: [{port: 1, backendRef: {kind: MeshExternalService, name: nothing}}]\n",
        )
        .unwrap();
        docs.extend(parse_documents("a.yaml", "type: Secret\nname: s\n").unwrap());
        let loaded = load(&docs);
        let text: Vec<String> = loaded.diagnostics.iter().map(ToString::to_string).collect();
        assert_eq!(
            text,
            [
                "z.yaml[0] networking.outbound[0].backendRef.name: no MeshExternalService named \"nothing\" in mesh \"default\"; define it or fix the name",
                "a.yaml[0] data: is required",
            ]
        );
        assert!(loaded.registry.is_none());
    }

    #[test]
    fn counts_only_valid_resources_and_registry_only_without_errors() {
        let text =
            format!("{MES}---\ntype: Secret\nname: s\n---\ntype: Secret\nname: t\ndata: aGk=\n");
        let loaded = load(&parse_documents("c.yaml", &text).unwrap());
        assert_eq!(loaded.counts.get("MeshExternalService"), Some(&1));
        assert_eq!(loaded.counts.get("Secret"), Some(&1));
        assert!(loaded.registry.is_none());

        let loaded = load(&parse_documents("ok.yaml", MES).unwrap());
        let registry = loaded.registry.unwrap();
        assert_eq!(registry.services.len(), 1);
        assert!(loaded.diagnostics.is_empty());
    }
}
