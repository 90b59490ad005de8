//! Names and VIPs for transparent mode: every HostnameGenerator applied to the
//! MeshExternalServices it selects (oldest first, so a name stays with the service that had
//! it), the names services carry themselves, one VIP per MeshExternalService and per other
//! name, and the status each resource shows for it. Pure: the pool is stored by the caller.

use std::collections::{BTreeMap, BTreeSet, HashSet};
use std::net::IpAddr;

use serde_json::{json, Value};
use sluice_api::hostname::{self, Failure, Generator, Service, Subject};
use sluice_api::model::ResourceKey;
use sluice_api::registry::{Naming, Origin};

use crate::vip::Pool;
use crate::{service_label, VirtualIp};

/// Who holds one VIP, and what it answers for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Owner {
    /// The pool's key: `KIND/MESH/NAME` for a MeshExternalService, `name/MESH/HOST` otherwise.
    pub key: String,
    pub names: Vec<String>,
    /// In port order. Vectors rather than a map and a set: most owners have one port and one
    /// resource, and a B-tree's smallest node is ten times the size of one entry.
    pub ports: Vec<(u16, ResourceKey)>,
    /// The resources whose status shows this VIP, in order, each once.
    pub origins: Vec<Origin>,
    /// For a MeshExternalService's own VIP: each selecting generator and its name or why none.
    /// Kept with its owner, not in a map by resource: the map's keys and nodes were 2 MiB at
    /// 10,000 services.
    pub generated: Vec<(String, Generated)>,
}

/// What one generator made of one MeshExternalService (Kuma's condition `Generated`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Generated {
    Name(String),
    TemplateError(String),
    /// The name is the older `holder`'s.
    Collision {
        hostname: String,
        holder: Origin,
    },
}

/// Who gets a VIP, with what every generator made of every MeshExternalService: names everything
/// in `naming`; `created` orders resources (the store's creation revision), ties broken by kind
/// and key.
pub fn owners(naming: &Naming, created: &dyn Fn(&Origin) -> i64) -> Vec<Owner> {
    let mut subjects: Vec<_> = naming.subjects.iter().collect();
    subjects.sort_by_key(|s| (created(&s.origin), &s.origin));
    let services: Vec<Service<'_>> = subjects
        .iter()
        .map(|s| Service {
            mesh: &s.origin.key.mesh,
            subject: Subject {
                display_name: &s.display_name,
                name: &s.name,
                namespace: &s.namespace,
                mesh: &s.origin.key.mesh,
                zone: &s.zone,
                labels: &s.labels,
            },
        })
        .collect();
    let generators: Vec<Generator<'_>> = naming
        .generators
        .iter()
        .map(|g| Generator {
            name: &g.name,
            match_labels: &g.match_labels,
            template: &g.template,
        })
        .collect();
    let outcomes = hostname::generate(&generators, &services);
    drop(services);
    // Sized before they are filled: grown by pushing, most services' one outcome and one name
    // took room for four, 4 MiB at 10,000 services.
    let mut sizes = vec![(0, 0); subjects.len()];
    for outcome in &outcomes {
        sizes[outcome.service].0 += 1;
        sizes[outcome.service].1 += usize::from(outcome.result.is_ok());
    }
    let (mut generated, mut by_subject): (Vec<Vec<_>>, Vec<Vec<String>>) = sizes
        .into_iter()
        .map(|(outcomes, names)| (Vec::with_capacity(outcomes), Vec::with_capacity(names)))
        .unzip();
    for outcome in outcomes {
        let subject = subjects[outcome.service];
        let result = match outcome.result {
            Ok(name) => {
                if !by_subject[outcome.service].contains(&name) {
                    by_subject[outcome.service].push(name.clone());
                }
                Generated::Name(name)
            }
            Err(Failure::TemplateError(e)) => Generated::TemplateError(e),
            Err(Failure::Collision { hostname, holder }) => Generated::Collision {
                hostname,
                holder: subjects
                    .get(holder)
                    .map_or_else(|| subject.origin.clone(), |h| h.origin.clone()),
            },
        };
        generated[outcome.service].push((outcome.generator, result));
    }
    let mut fixed: Vec<_> = naming.fixed.iter().collect();
    let mut owners = Vec::with_capacity(subjects.len() + fixed.len());
    for ((subject, names), generated) in subjects.iter().zip(by_subject).zip(generated) {
        owners.push(Owner {
            key: format!(
                "{}/{}/{}",
                subject.origin.kind, subject.origin.key.mesh, subject.origin.key.name
            ),
            names,
            ports: vec![(subject.port, subject.origin.key.clone())],
            origins: vec![subject.origin.clone()],
            generated,
        });
    }
    fixed.sort_by_key(|f| (created(&f.origin), &f.origin, &f.name, f.port));
    // A generated name belongs to its service; the same name carried by another is left to it.
    let taken: HashSet<(&str, &str)> = owners
        .iter()
        .zip(&subjects)
        .flat_map(|(owner, subject)| {
            let mesh = subject.origin.key.mesh.as_str();
            owner.names.iter().map(move |n| (mesh, n.as_str()))
        })
        .collect();
    let mut by_name: BTreeMap<(&str, &str), Owner> = BTreeMap::new();
    for f in fixed {
        let mesh = f.origin.key.mesh.as_str();
        if taken.contains(&(mesh, f.name.as_str())) {
            continue;
        }
        let owner = by_name
            .entry((mesh, f.name.as_str()))
            .or_insert_with(|| Owner {
                key: format!("name/{mesh}/{}", f.name),
                names: vec![f.name.clone()],
                ports: Vec::new(),
                origins: Vec::new(),
                generated: Vec::new(),
            });
        // The older resource keeps a name's port.
        if let Err(at) = owner.ports.binary_search_by_key(&f.port, |(p, _)| *p) {
            owner.ports.insert(at, (f.port, f.service.clone()));
            if let Err(at) = owner.origins.binary_search(&f.origin) {
                owner.origins.insert(at, f.origin.clone());
            }
        }
    }
    owners.extend(by_name.into_values());
    owners
}

/// Owners with addresses: what proxies get, and the status of each resource.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Addressed {
    pub virtual_ips: Vec<VirtualIp>,
    pub status: BTreeMap<Origin, Status>,
    /// Owners left without an address (the range is full).
    pub errors: Vec<String>,
}

/// Gives every one of `owners` its address from `pool` (keeping the ones they have) and
/// releases the addresses of owners gone since. The owners' names and generator outcomes move
/// into what is returned rather than being copied: both at once were 18 MiB at 10,000 services.
pub fn address(owners: Vec<Owner>, pool: &mut Pool, now: u64) -> Addressed {
    let wanted: BTreeSet<&str> = owners.iter().map(|o| o.key.as_str()).collect();
    let gone: Vec<String> = pool
        .owners()
        .filter(|(o, _)| !wanted.contains(o))
        .map(|(o, _)| o.to_string())
        .collect();
    for owner in gone {
        pool.release(&owner, now);
    }
    let mut out = Addressed::default();
    let mut others: BTreeMap<Origin, Vec<(String, IpAddr)>> = BTreeMap::new();
    for mut owner in owners {
        let ip = match pool.assign(&owner.key, now) {
            Ok(ip) => Some(ip),
            Err(e) => {
                out.errors.push(format!("{}: no VIP: {e}", owner.key));
                None
            }
        };
        for origin in owner.origins {
            if origin.kind == "MeshExternalService" {
                let generated = match out.status.get(&origin) {
                    // Named by an owner before: the same outcomes, this owner's VIP.
                    Some(Status::MeshExternalService { generated, .. }) => generated.clone(),
                    _ => compact(std::mem::take(&mut owner.generated)),
                };
                let status = Status::MeshExternalService { vip: ip, generated };
                out.status.insert(origin, status);
            } else if let Some(ip) = ip {
                let names = owner.names.iter().map(|n| (n.clone(), ip));
                others.entry(origin).or_default().extend(names);
            }
        }
        if let Some(ip) = ip.filter(|_| !owner.names.is_empty()) {
            out.virtual_ips.push(VirtualIp {
                ip,
                names: owner.names,
                ports: owner
                    .ports
                    .iter()
                    .map(|(p, s)| (*p, service_label(s)))
                    .collect(),
            });
        }
    }
    out.virtual_ips.sort_by_key(|v| v.ip);
    for (origin, addresses) in others {
        out.status.insert(origin, Status::Addresses(addresses));
    }
    out
}

/// A service's generator outcomes as its status keeps them. Names built piece by piece have
/// room to spare, which copying them used to drop.
fn compact(mut generated: Vec<(String, Generated)>) -> Vec<(String, Generated)> {
    for (generator, result) in &mut generated {
        generator.shrink_to_fit();
        match result {
            Generated::Name(text) | Generated::TemplateError(text) => text.shrink_to_fit(),
            Generated::Collision { hostname, .. } => hostname.shrink_to_fit(),
        }
    }
    generated
}

/// What a resource's `status` shows, kept as the facts it is made of and written as JSON only
/// when a resource is read: as a JSON tree it took several KiB per service.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Status {
    /// As Kuma shows a MeshExternalService's: its VIP and each generator's name or failure.
    MeshExternalService {
        vip: Option<IpAddr>,
        generated: Vec<(String, Generated)>,
    },
    /// As Istio shows a ServiceEntry's: each host and its VIP.
    Addresses(Vec<(String, IpAddr)>),
}

impl Status {
    pub fn to_json(&self) -> Value {
        match self {
            Status::MeshExternalService { vip, generated } => mes_status(vip.as_ref(), generated),
            Status::Addresses(addresses) => {
                let addresses: Vec<Value> = addresses
                    .iter()
                    .map(|(host, ip)| json!({"host": host, "value": ip.to_string()}))
                    .collect();
                json!({ "addresses": addresses })
            }
        }
    }
}

fn mes_status(ip: Option<&IpAddr>, generated: &[(String, Generated)]) -> Value {
    let mut addresses = Vec::new();
    let mut generators = Vec::new();
    for (generator, result) in generated {
        let reference = json!({ "coreName": generator });
        let (reason, message) = match result {
            Generated::Name(hostname) => {
                addresses.push(json!({
                    "hostname": hostname,
                    "origin": "HostnameGenerator",
                    "hostnameGeneratorRef": reference,
                }));
                ("Generated", String::new())
            }
            Generated::TemplateError(e) => ("TemplateError", e.clone()),
            Generated::Collision { hostname, holder } => (
                "Collision",
                format!(
                    "{hostname} is already the name of {} {}, which had it first",
                    holder.kind, holder.key
                ),
            ),
        };
        let status = if reason == "Generated" {
            "True"
        } else {
            "False"
        };
        generators.push(json!({
            "hostnameGeneratorRef": reference,
            "conditions": [{"type": "Generated", "status": status, "reason": reason, "message": message}],
        }));
    }
    let mut status = json!({ "addresses": addresses, "hostnameGenerators": generators });
    if let Some(ip) = ip {
        status["vip"] = json!({ "ip": ip.to_string() });
    }
    status
}

#[cfg(test)]
mod tests {
    use super::*;
    use sluice_api::model::Cidr;

    fn naming(yaml: &str) -> Naming {
        crate::load(yaml).naming
    }

    const TWO: &str = r#"
type: MeshExternalService
name: httpbin
labels: {team: web}
spec:
  match: {port: 80, protocol: http}
  endpoints: [{address: httpbin.org, port: 80}]
---
type: MeshExternalService
name: other
labels: {team: web}
spec:
  match: {port: 80, protocol: http}
  endpoints: [{address: example.com, port: 80}]
---
type: HostnameGenerator
name: by-team
spec:
  selector: {meshExternalService: {matchLabels: {team: web}}}
  template: '{{ label "team" }}.example.internal'
---
type: ExternalService
name: legacy
tags: {kuma.io/service: legacy-api}
networking: {address: "api.example.com:443", tls: {enabled: true}}
"#;

    fn pool() -> Pool {
        Pool::new(Cidr::parse("242.0.0.0/8").unwrap()).unwrap()
    }

    #[test]
    fn the_older_service_keeps_a_generated_name() {
        let naming = naming(TWO);
        // `other` created first.
        let created = |o: &Origin| if o.key.name == "other" { 1 } else { 2 };
        let owners = owners(&naming, &created);
        let show = |name: &str| -> Vec<String> {
            let key = format!("MeshExternalService/default/{name}");
            let owner = owners.iter().find(|o| o.key == key).unwrap();
            owner
                .generated
                .iter()
                .map(|(g, r)| match r {
                    Generated::Name(n) => format!("{g}: {n}"),
                    Generated::TemplateError(_) => format!("{g}: TemplateError"),
                    Generated::Collision { .. } => format!("{g}: Collision"),
                })
                .collect()
        };
        assert_eq!(
            show("other"),
            [
                "by-team: web.example.internal",
                "local-mesh-external-service: other.extsvc.mesh.local"
            ]
        );
        assert_eq!(
            show("httpbin"),
            [
                "by-team: Collision",
                "local-mesh-external-service: httpbin.extsvc.mesh.local"
            ]
        );
        let addressed = address(owners, &mut pool(), 0);
        let httpbin = addressed.status[&Origin {
            kind: "MeshExternalService",
            key: ResourceKey {
                mesh: "default".into(),
                name: "httpbin".into(),
            },
        }]
            .to_json();
        assert_eq!(httpbin["vip"]["ip"], "242.0.0.2");
        assert_eq!(
            httpbin["hostnameGenerators"][0]["conditions"][0]["message"],
            "web.example.internal is already the name of MeshExternalService default/other, which had it first"
        );
        assert_eq!(
            httpbin["addresses"],
            json!([{"hostname": "httpbin.extsvc.mesh.local", "origin": "HostnameGenerator",
                    "hostnameGeneratorRef": {"coreName": "local-mesh-external-service"}}])
        );
    }

    #[test]
    fn legacy_names_and_real_names_get_vips_with_their_ports() {
        let naming = naming(TWO);
        let addressed = address(owners(&naming, &|_| 0), &mut pool(), 0);
        let table: Vec<String> = addressed
            .virtual_ips
            .iter()
            .map(|v| {
                format!(
                    "{} {} {:?}",
                    v.ip,
                    v.names.join(","),
                    v.ports.iter().collect::<Vec<_>>()
                )
            })
            .collect();
        assert_eq!(
            table,
            [
                "242.0.0.1 web.example.internal,httpbin.extsvc.mesh.local [(80, \"httpbin\")]",
                "242.0.0.2 other.extsvc.mesh.local [(80, \"other\")]",
                "242.0.0.3 api.example.com [(443, \"legacy\")]",
                "242.0.0.4 legacy-api.mesh [(80, \"legacy\")]",
            ]
        );
        let legacy = addressed.status[&Origin {
            kind: "ExternalService",
            key: ResourceKey {
                mesh: "default".into(),
                name: "legacy".into(),
            },
        }]
            .to_json();
        assert_eq!(
            legacy["addresses"],
            json!([{"host": "api.example.com", "value": "242.0.0.3"},
                   {"host": "legacy-api.mesh", "value": "242.0.0.4"}])
        );
    }

    #[test]
    fn a_deleted_service_frees_its_vip_only_after_the_hold() {
        let mut pool = pool();
        let full = owners(&naming(TWO), &|_| 0);
        address(full.clone(), &mut pool, 0);
        address(full[1..].to_vec(), &mut pool, 10);
        let state = pool.state();
        let first: IpAddr = "242.0.0.1".parse().unwrap();
        assert_eq!(
            state.get(&first),
            Some(&(None, Some(10 + crate::vip::HOLD_SECONDS)))
        );
        // Back again: a new address, not the held one.
        let again = address(full, &mut pool, 20);
        assert!(again.virtual_ips.iter().all(|v| v.ip != first));
    }

    #[test]
    fn template_errors_are_reported_per_service() {
        let naming = naming(
            r#"
type: MeshExternalService
name: a
spec:
  match: {port: 80}
  endpoints: [{address: a.example, port: 80}]
---
type: HostnameGenerator
name: needs-label
spec:
  selector: {meshExternalService: {matchLabels: {}}}
  template: '{{ label "team" }}.example'
"#,
        );
        let addressed = address(owners(&naming, &|_| 0), &mut pool(), 0);
        let a = addressed.status.values().next().unwrap().to_json();
        let conditions: Vec<&Value> = a["hostnameGenerators"]
            .as_array()
            .unwrap()
            .iter()
            .map(|g| &g["conditions"][0])
            .collect();
        assert_eq!(conditions[0]["reason"], "Generated");
        assert_eq!(conditions[1]["reason"], "TemplateError");
        assert_eq!(conditions[1]["status"], "False");
        assert!(
            conditions[1]["message"].as_str().unwrap().contains("team"),
            "{}",
            conditions[1]["message"]
        );
    }
}
