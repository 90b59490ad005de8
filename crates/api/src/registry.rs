//! Checks between resources (references, duplicates, port clashes) and resolution into the model.

use std::collections::{BTreeMap, HashMap};

use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};

use crate::diag::{Diagnostic, Diagnostics, DocRef};
use crate::document::Document;
use crate::kuma::{self, DataSource, MeshExternalServiceResource, Sourced};
use crate::model::{
    ClientIdentity, ExternalService, Material, Outbound, ResourceKey, TlsOrigination,
};
use crate::node::At;
use crate::resource::{Located, Resource};

/// Everything a proxy needs, resolved and checked. Only built when no document has an error.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Registry {
    pub services: BTreeMap<ResourceKey, ExternalService>,
    pub outbounds: Vec<Outbound>,
}

/// The outcome of loading a set of documents: the registry if they are all valid, and every
/// diagnostic (errors and warnings) either way.
#[derive(Debug, Default)]
pub struct Loaded {
    pub registry: Option<Registry>,
    pub diagnostics: Vec<Diagnostic>,
    /// How many resources of each kind were read.
    pub counts: BTreeMap<&'static str, usize>,
}

impl Loaded {
    pub fn errors(&self) -> impl Iterator<Item = &Diagnostic> {
        self.diagnostics
            .iter()
            .filter(|d| d.severity == crate::diag::Severity::Error)
    }
}

/// Reads, checks and resolves a set of documents as one configuration.
pub fn load(documents: &[Document]) -> Loaded {
    let mut diagnostics = Vec::new();
    let mut located = Vec::new();
    for document in documents {
        let mut d = Diagnostics::for_doc(document.doc.clone());
        if let Some(resource) = kuma::parse(&At::root(&document.value), &mut d) {
            located.push(Located {
                doc: document.doc.clone(),
                resource,
            });
        }
        diagnostics.extend(d.into_vec());
    }
    let mut counts = BTreeMap::new();
    for l in &located {
        *counts.entry(l.resource.kind()).or_insert(0) += 1;
    }
    let registry = resolve(&located, &mut diagnostics);
    let has_errors = diagnostics
        .iter()
        .any(|d| d.severity == crate::diag::Severity::Error);
    Loaded {
        registry: registry.filter(|_| !has_errors),
        diagnostics,
        counts,
    }
}

fn resolve(located: &[Located], out: &mut Vec<Diagnostic>) -> Option<Registry> {
    let mut seen: HashMap<(&'static str, &ResourceKey), &DocRef> = HashMap::new();
    let mut secrets: HashMap<&ResourceKey, &[u8]> = HashMap::new();
    let mut services: Vec<(&DocRef, &MeshExternalServiceResource)> = Vec::new();
    let mut dataplanes = Vec::new();
    for l in located {
        let key = &l.resource.meta().key;
        if let Some(first) = seen.insert((l.resource.kind(), key), &l.doc) {
            let mut d = Diagnostics::for_doc(l.doc.clone());
            d.error(
                "",
                format!(
                    "{} \"{}\" in mesh \"{}\" is already defined at {first}; rename one of them",
                    l.resource.kind(),
                    key.name,
                    key.mesh
                ),
            );
            out.extend(d.into_vec());
            continue;
        }
        match &l.resource {
            Resource::Secret(s) => {
                secrets.insert(key, &s.data);
            }
            Resource::MeshExternalService(m) => services.push((&l.doc, m)),
            Resource::Dataplane(dp) => dataplanes.push((&l.doc, dp)),
        }
    }

    let mut registry = Registry::default();
    for (doc, mes) in services {
        let mut d = Diagnostics::for_doc(doc.clone());
        let tls = mes.spec.tls.as_ref().map(|t| {
            let mesh = &mes.meta.key.mesh;
            let mut material = |s: &Option<Sourced>, want: Pem| {
                s.as_ref()
                    .and_then(|s| resolve_material(s, mesh, &secrets, want, &mut d))
            };
            let ca_cert = material(&t.ca_cert, Pem::Certificates);
            let cert = material(&t.client_cert, Pem::Certificates);
            let key = material(&t.client_key, Pem::PrivateKey);
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
        out.extend(d.into_vec());
        registry.services.insert(
            mes.meta.key.clone(),
            ExternalService {
                key: mes.meta.key.clone(),
                port: mes.spec.port,
                protocol: mes.spec.protocol,
                endpoints: mes.spec.endpoints.clone(),
                tls,
            },
        );
    }

    let mut listening: HashMap<(std::net::IpAddr, u16), (String, &DocRef)> = HashMap::new();
    for (doc, dp) in dataplanes {
        let mut d = Diagnostics::for_doc(doc.clone());
        for o in &dp.outbounds {
            let service = ResourceKey {
                mesh: dp.meta.key.mesh.clone(),
                name: o.backend.name.clone(),
            };
            match registry.services.get(&service) {
                None => d.error(
                    &format!("{}.backendRef.name", o.path),
                    format!(
                        "no MeshExternalService named \"{}\" in mesh \"{}\"; define it or fix the name",
                        service.name, service.mesh
                    ),
                ),
                Some(s) => {
                    if let Some(p) = o.backend.port.filter(|p| *p != s.port) {
                        d.error(
                            &format!("{}.backendRef.port", o.path),
                            format!(
                                "{p} is not the port of MeshExternalService \"{}\" (match.port is {}); remove it or use {}",
                                service.name, s.port, s.port
                            ),
                        );
                    }
                }
            }
            let here = format!("{} of Dataplane \"{}\"", o.path, dp.meta.key.name);
            if let Some((other, other_doc)) = listening.get(&(o.address, o.port)) {
                d.error(
                    &format!("{}.port", o.path),
                    format!(
                        "{}:{} is already used by {other} ({other_doc}); give each outbound its own port",
                        o.address, o.port
                    ),
                );
            } else {
                listening.insert((o.address, o.port), (here, doc));
            }
            registry.outbounds.push(Outbound {
                dataplane: dp.meta.key.clone(),
                address: o.address,
                port: o.port,
                service,
            });
        }
        out.extend(d.into_vec());
    }
    Some(registry)
}

#[derive(Clone, Copy)]
enum Pem {
    Certificates,
    PrivateKey,
}

fn resolve_material(
    s: &Sourced,
    mesh: &str,
    secrets: &HashMap<&ResourceKey, &[u8]>,
    want: Pem,
    d: &mut Diagnostics,
) -> Option<Material> {
    let (origin, bytes) = match &s.source {
        DataSource::Inline(b) => ("inline".to_string(), b.clone()),
        DataSource::InlineString(text) => ("inlineString".to_string(), text.as_bytes().to_vec()),
        DataSource::Secret(name) => {
            let key = ResourceKey {
                mesh: mesh.to_string(),
                name: name.clone(),
            };
            let Some(data) = secrets.get(&key) else {
                d.error(
                    &format!("{}.secret", s.path),
                    format!(
                        "no Secret named \"{name}\" in mesh \"{mesh}\"; define it or fix the name"
                    ),
                );
                return None;
            };
            (format!("secret {name}"), data.to_vec())
        }
    };
    match want {
        Pem::Certificates => {
            let certs = CertificateDer::pem_slice_iter(&bytes).collect::<Result<Vec<_>, _>>();
            match certs {
                Ok(c) if !c.is_empty() => {}
                _ => {
                    d.error(
                        &s.path,
                        format!("{origin} holds no readable PEM certificate (expected -----BEGIN CERTIFICATE-----)"),
                    );
                    return None;
                }
            }
        }
        Pem::PrivateKey => {
            if PrivateKeyDer::from_pem_slice(&bytes).is_err() {
                d.error(
                    &s.path,
                    format!("{origin} holds no readable PEM private key (expected -----BEGIN PRIVATE KEY----- or an RSA/EC key)"),
                );
                return None;
            }
        }
    }
    Some(Material { origin, pem: bytes })
}
