//! Validation cases as input/expected-output pairs: `cases/NAME.yaml` is loaded as one
//! configuration and its output must equal, line for line, `cases/NAME.out`. The output is
//! every diagnostic, then, when the input is valid, one `registry:` line per service and
//! outbound it resolved to, so defaults and translations are pinned too. Set `SLUICE_BLESS=1`
//! to write the `.out` files from the current output, then read every one you wrote.

use std::fs;
use std::path::Path;

use sluice_api::model::{
    ExternalService, LoadBalancer, Material, SanMatch, TlsOrigination, TlsVersion,
};

#[test]
fn validation_cases() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/cases");
    let mut inputs: Vec<_> = fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "yaml"))
        .collect();
    inputs.sort();
    assert!(!inputs.is_empty(), "no cases in {}", dir.display());
    let bless = std::env::var_os("SLUICE_BLESS").is_some();
    let mut failures = Vec::new();
    for input in &inputs {
        let name = input.file_name().unwrap().to_string_lossy().to_string();
        let text = fs::read_to_string(input).unwrap();
        let actual = run(&name, &text);
        let expected_path = input.with_extension("out");
        if bless {
            fs::write(&expected_path, &actual).unwrap();
            continue;
        }
        let expected = fs::read_to_string(&expected_path)
            .unwrap_or_else(|_| panic!("{} has no {}", name, expected_path.display()));
        if expected != actual {
            failures.push(format!(
                "{name}\n--- expected\n{expected}--- actual\n{actual}"
            ));
        }
    }
    assert!(
        failures.is_empty(),
        "{} of {} cases differ:\n{}",
        failures.len(),
        inputs.len(),
        failures.join("\n")
    );
}

fn run(name: &str, text: &str) -> String {
    let docs = match sluice_api::parse_documents(name, text) {
        Err(e) => return format!("{e}\n"),
        Ok(docs) => docs,
    };
    let loaded = sluice_api::load(&docs);
    let mut out = String::new();
    for d in &loaded.diagnostics {
        out.push_str(&format!("{d}\n"));
    }
    if let Some(registry) = &loaded.registry {
        for service in registry.services.values() {
            out.push_str(&format!("registry: {}\n", describe(service)));
        }
        for dataplane in &registry.dataplanes {
            out.push_str(&format!("registry: dataplane {dataplane}\n"));
        }
        for o in &registry.outbounds {
            let address = std::net::SocketAddr::new(o.address, o.port);
            out.push_str(&format!(
                "registry: outbound {} {address} -> {}\n",
                o.dataplane, o.service
            ));
        }
        if let Some(policy) = registry.outbound_traffic_policy {
            out.push_str(&format!("registry: outbound traffic policy {policy:?}\n"));
        }
    }
    if !loaded.counts.is_empty() {
        let counts: Vec<String> = loaded
            .counts
            .iter()
            .map(|(kind, n)| format!("{n} {kind}"))
            .collect();
        out.push_str(&format!("valid: {}\n", counts.join(", ")));
    }
    out
}

fn describe(s: &ExternalService) -> String {
    let endpoints: Vec<String> = s.endpoints.iter().map(ToString::to_string).collect();
    let tls = match &s.tls {
        None => "off".to_string(),
        Some(t) => describe_tls(t),
    };
    let mut text = format!(
        "service {} {} port {}; endpoints {}; tls {tls}",
        s.key,
        s.protocol.as_str(),
        s.port,
        endpoints.join(", ")
    );
    if !s.hosts.is_empty() {
        text.push_str(&format!("; hosts {}", s.hosts.join(", ")));
    }
    if !s.addresses.is_empty() {
        let addresses: Vec<String> = s.addresses.iter().map(ToString::to_string).collect();
        text.push_str(&format!("; addresses {}", addresses.join(", ")));
    }
    if s.load_balancer != LoadBalancer::RoundRobin {
        text.push_str(&format!("; lb {:?}", s.load_balancer));
    }
    if !s.endpoint_weights.is_empty() {
        let w: Vec<String> = s.endpoint_weights.iter().map(ToString::to_string).collect();
        text.push_str(&format!("; weights {}", w.join(", ")));
    }
    text
}

fn describe_tls(t: &TlsOrigination) -> String {
    let version = |v: Option<TlsVersion>| match v {
        None => "auto",
        Some(TlsVersion::Tls12) => "TLS12",
        Some(TlsVersion::Tls13) => "TLS13",
    };
    let material = |m: &Material| format!("{} ({} bytes)", m.origin, m.pem.len());
    let sans: Vec<String> = t
        .subject_alt_names
        .iter()
        .map(|s| match s {
            SanMatch::Exact(v) => format!("exact {v}"),
            SanMatch::Prefix(v) => format!("prefix {v}"),
        })
        .collect();
    format!(
        "min {} max {} mode {:?} renegotiation {} serverName {} sans [{}] ca {} client {}",
        version(t.min_version),
        version(t.max_version),
        t.mode,
        t.allow_renegotiation,
        t.server_name.as_deref().unwrap_or("-"),
        sans.join(", "),
        t.ca_cert.as_ref().map_or("system".to_string(), material),
        t.client_cert
            .as_ref()
            .map_or("none".to_string(), |c| format!(
                "{} + {}",
                material(&c.cert),
                material(&c.key)
            )),
    )
}
