//! Resource YAML for tests: services, endpoints and TLS verification blocks.

use std::net::SocketAddr;

use super::pki::pki;

/// A MeshExternalService with the given endpoints (YAML list items) and optional `tls:` body.
pub fn mes(name: &str, protocol: &str, endpoints: &[String], tls: Option<&str>) -> String {
    let mut y = format!(
        "type: MeshExternalService\nname: {name}\nmesh: default\nspec:\n  match:\n    type: HostnameGenerator\n    port: 443\n    protocol: {protocol}\n  endpoints:\n"
    );
    for e in endpoints {
        y.push_str(e);
    }
    if let Some(tls) = tls {
        y.push_str("  tls:\n    enabled: true\n");
        for line in tls.lines() {
            y.push_str("    ");
            y.push_str(line);
            y.push('\n');
        }
    }
    y
}

pub fn ep(addr: SocketAddr) -> String {
    format!(
        "    - address: {}\n      port: {}\n",
        addr.ip(),
        addr.port()
    )
}

/// `key:` followed by the PEM as an inlineString block, indented under `verification:`.
pub fn pem_source(key: &str, pem: &str) -> String {
    let mut y = format!("  {key}:\n    inlineString: |\n");
    for line in pem.lines() {
        y.push_str("      ");
        y.push_str(line);
        y.push('\n');
    }
    y
}

/// `verification:` trusting the test CA with the given mode and extra lines.
pub fn verification(mode: &str, server_name: Option<&str>, extra: &str) -> String {
    let mut y = format!("verification:\n  mode: {mode}\n");
    if let Some(n) = server_name {
        y.push_str(&format!("  serverName: {n}\n"));
    }
    y.push_str(&pem_source("caCert", pki().ca_pem()));
    y.push_str(extra);
    y
}

/// A Dataplane `name` in the default mesh with one outbound per (port, service).
pub fn dataplane(name: &str, outbounds: &[(u16, &str)]) -> String {
    let mut y = format!("type: Dataplane\nname: {name}\nmesh: default\nnetworking:\n  outbound:\n");
    for (port, service) in outbounds {
        y.push_str(&format!(
            "    - port: {port}\n      backendRef:\n        kind: MeshExternalService\n        name: {service}\n"
        ));
    }
    y
}
