//! The CLI's side of the control plane: `apply`, `get` and `delete` over its REST API, and a
//! plain HTTP/1.1 call that the admin endpoint shares.

use std::io::{Read, Write};
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::Args;

/// Where the control plane is and how to prove who we are.
#[derive(Args, Clone)]
pub struct Target {
    /// The control plane's URL.
    #[arg(
        long,
        env = "SLUICE_CONTROL_PLANE",
        default_value = "http://127.0.0.1:5681"
    )]
    control_plane: String,
    /// The API token (an admin token to change resources).
    #[arg(long, env = "SLUICE_TOKEN", hide_env_values = true)]
    token: Option<String>,
}

/// `HOST:PORT` of a control plane URL `http://HOST:PORT[/]`.
pub fn control_plane_address(url: &str) -> Result<&str, String> {
    url.trim()
        .strip_prefix("http://")
        .map(|a| a.trim_end_matches('/'))
        .filter(|a| !a.is_empty())
        .ok_or_else(|| format!("--control-plane {url}: give http://HOST:PORT"))
}

/// One HTTP/1.1 request on a fresh connection; returns the status and the body.
pub fn call(
    address: &str,
    method: &str,
    path: &str,
    token: Option<&str>,
    body: &str,
) -> std::io::Result<(u16, String)> {
    call_with(address, method, path, token, "", body)
}

/// [`call`] with extra header lines (each ending in CRLF).
fn call_with(
    address: &str,
    method: &str,
    path: &str,
    token: Option<&str>,
    headers: &str,
    body: &str,
) -> std::io::Result<(u16, String)> {
    let addr: std::net::SocketAddr = address.parse().or_else(|_| {
        std::net::ToSocketAddrs::to_socket_addrs(address)
            .ok()
            .and_then(|mut a| a.next())
            .ok_or_else(|| std::io::Error::new(std::io::ErrorKind::InvalidInput, "not an address"))
    })?;
    let mut s = std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(5))?;
    s.set_read_timeout(Some(Duration::from_secs(30)))?;
    let auth = token
        .map(|t| format!("Authorization: Bearer {t}\r\n"))
        .unwrap_or_default();
    write!(
        s,
        "{method} {path} HTTP/1.1\r\nHost: {address}\r\n{auth}{headers}Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )?;
    let mut answer = Vec::new();
    s.take(16 * 1024 * 1024).read_to_end(&mut answer)?;
    let answer = String::from_utf8_lossy(&answer);
    let status = answer.get(9..12).and_then(|c| c.parse().ok()).unwrap_or(0);
    let body = answer.split_once("\r\n\r\n").map(|(_, b)| b).unwrap_or("");
    Ok((status, body.to_string()))
}

impl Target {
    pub fn token(&self) -> Option<&str> {
        self.token.as_deref()
    }

    fn address(&self) -> Result<&str, String> {
        control_plane_address(&self.control_plane)
    }

    /// The body of a GET answered 200; otherwise the problem is printed.
    fn read(&self, path: &str) -> Result<String, ExitCode> {
        match self.call("GET", path, "") {
            Ok((200, body)) => Ok(body),
            Ok((status, body)) => Err(refused(status, &body)),
            Err(e) => Err(fail(e)),
        }
    }

    fn call(&self, method: &str, path: &str, body: &str) -> Result<(u16, String), String> {
        self.call_with(method, path, "", body)
    }

    fn call_with(
        &self,
        method: &str,
        path: &str,
        headers: &str,
        body: &str,
    ) -> Result<(u16, String), String> {
        let address = self.address()?;
        call_with(address, method, path, self.token.as_deref(), headers, body).map_err(|e| {
            format!(
                "cannot reach the control plane at {}: {e}; is `sluice control-plane` running there?",
                self.control_plane
            )
        })
    }
}

pub(crate) fn fail(message: impl std::fmt::Display) -> ExitCode {
    eprintln!("sluice: {message}");
    ExitCode::FAILURE
}

/// Prints the server's answer to a failed request, one problem per line.
fn refused(status: u16, body: &str) -> ExitCode {
    for line in body.lines().filter(|l| !l.trim().is_empty()) {
        eprintln!("{line}");
    }
    eprintln!("sluice: the control plane answered {status}");
    ExitCode::FAILURE
}

/// `sluice apply -f ...`: every document is checked locally first; if any is invalid nothing is
/// sent. Then all are sent in one request, created or replaced together or not at all, and
/// reported as kubectl does.
pub fn apply(files: &[PathBuf], target: &Target) -> ExitCode {
    let (documents, problems) = crate::load::read_documents(files);
    if !problems.is_empty() {
        for p in &problems {
            eprintln!("{p}");
        }
        return fail(format!("{} error(s); nothing was applied", problems.len()));
    }
    // One request for all of them: the control plane writes them all or none.
    let body: String = documents
        .iter()
        .map(|d| format!("---\n{}\n", d.value))
        .collect();
    match target.call("POST", "/api/v1/apply", &body) {
        Err(e) => return fail(e),
        Ok((200, answer)) => {
            let Ok(answer) = serde_json::from_str::<serde_json::Value>(&answer) else {
                return fail("the control plane's answer is not JSON");
            };
            for r in answer["results"].as_array().into_iter().flatten() {
                println!(
                    "{}/{} {}",
                    r["kind"].as_str().unwrap_or("").to_ascii_lowercase(),
                    r["name"].as_str().unwrap_or(""),
                    r["result"].as_str().unwrap_or("")
                );
            }
        }
        Ok((422, answer)) => {
            // The control plane checked them against what it stores; name the files again.
            let mut errors = 0;
            for line in answer.lines().filter(|l| !l.trim().is_empty()) {
                errors += 1;
                eprintln!("{}", with_file_names(line, &documents));
            }
            return fail(format!("{errors} error(s); nothing was applied"));
        }
        Ok((status, answer)) => {
            let code = refused(status, &answer);
            eprintln!("sluice: nothing was applied");
            return code;
        }
    }
    ExitCode::SUCCESS
}

pub fn get(kind: &str, name: Option<&str>, mesh: &str, output: &str, target: &Target) -> ExitCode {
    let path = match name {
        Some(n) => format!("/api/v1/{kind}/{mesh}/{n}"),
        None => format!("/api/v1/{kind}?mesh={mesh}"),
    };
    let body = match target.read(&path) {
        Ok(b) => b,
        Err(code) => return code,
    };
    match (name, output) {
        (Some(_), "yaml") => match yaml_of(&body) {
            Some(y) => print!("{y}"),
            None => print!("{body}"),
        },
        (Some(_), _) => print!("{body}"),
        (None, "json") => print!("{body}"),
        (None, _) => {
            let Ok(list) = serde_json::from_str::<serde_json::Value>(&body) else {
                return fail("the control plane sent a list that is not JSON");
            };
            println!("{:<20} {:<40} VERSION", "MESH", "NAME");
            for item in list["items"].as_array().into_iter().flatten() {
                println!(
                    "{:<20} {:<40} {}",
                    item["mesh"].as_str().unwrap_or(""),
                    item["name"].as_str().unwrap_or(""),
                    item["resourceVersion"]
                );
            }
        }
    }
    if !body.ends_with('\n') {
        println!();
    }
    ExitCode::SUCCESS
}

/// `request[N] ...` as the control plane says it, with the N-th document's file and index.
fn with_file_names(line: &str, documents: &[sluice_api::Document]) -> String {
    let index = line
        .strip_prefix("request[")
        .and_then(|rest| rest.split_once(']'))
        .and_then(|(n, rest)| Some((n.parse::<usize>().ok()?, rest)));
    match index.and_then(|(n, rest)| Some((documents.get(n)?, rest))) {
        Some((doc, rest)) => format!("{}{rest}", doc.doc),
        None => line.to_string(),
    }
}

/// A stored document (JSON or YAML) as YAML.
fn yaml_of(body: &str) -> Option<String> {
    let value: serde_json::Value = serde_saphyr::from_str(body).ok()?;
    serde_saphyr::to_string(&value).ok()
}

/// `sluice delete -f FILE...`: every resource the files declare.
pub fn delete_files(files: &[PathBuf], target: &Target) -> ExitCode {
    let (documents, problems) = crate::load::read_documents(files);
    if let Some(p) = problems.first() {
        return fail(p);
    }
    let mut status = ExitCode::SUCCESS;
    for document in &documents {
        let Some((kind, key)) = sluice_api::identify(document) else {
            eprintln!("{}: cannot tell which resource this is", document.doc);
            status = ExitCode::FAILURE;
            continue;
        };
        if delete(kind, &key.name, &key.mesh, target) != ExitCode::SUCCESS {
            status = ExitCode::FAILURE;
        }
    }
    status
}

pub fn delete(kind: &str, name: &str, mesh: &str, target: &Target) -> ExitCode {
    match target.call("DELETE", &format!("/api/v1/{kind}/{mesh}/{name}"), "") {
        Err(e) => fail(e),
        Ok((200, _)) => {
            println!("{}/{name} deleted", kind.to_ascii_lowercase());
            ExitCode::SUCCESS
        }
        Ok((status, body)) => refused(status, &body),
    }
}

/// `sluice inspect proxy [NAME]`: one proxy's status and config, or a table of all of them.
pub fn inspect_proxy(name: Option<&str>, mesh: &str, output: &str, target: &Target) -> ExitCode {
    let path = match name {
        Some(n) => format!("/api/v1/proxies/{mesh}/{n}"),
        None => "/api/v1/proxies".to_string(),
    };
    let body = match target.read(&path) {
        Ok(b) => b,
        Err(code) => return code,
    };
    match (name, output) {
        (_, "json") => print!("{body}"),
        (Some(_), _) => match yaml_of(&body) {
            Some(y) => print!("{y}"),
            None => print!("{body}"),
        },
        (None, _) => {
            let Ok(list) = serde_json::from_str::<serde_json::Value>(&body) else {
                return fail("the control plane sent a list that is not JSON");
            };
            println!(
                "{:<16} {:<32} {:<10} {:>8} {:>8}  REFUSED",
                "MESH", "NAME", "CONNECTED", "RUNNING", "SENT"
            );
            for p in list["items"].as_array().into_iter().flatten() {
                println!(
                    "{:<16} {:<32} {:<10} {:>8} {:>8}  {}",
                    p["mesh"].as_str().unwrap_or(""),
                    p["name"].as_str().unwrap_or(""),
                    p["connected"],
                    p["ackedVersion"],
                    p["sentVersion"],
                    p["nack"]["version"]
                        .as_u64()
                        .map(|v| format!("version {v}"))
                        .unwrap_or_else(|| "-".into()),
                );
            }
        }
    }
    ExitCode::SUCCESS
}

/// `sluice outbound-traffic-policy MODE`: sets `networking.outbound.passthrough` in the mesh's
/// Mesh resource (creating it if there is none), keeping everything else it says. The write is
/// conditional on the version read, so a concurrent change is not overwritten.
pub fn set_mesh_policy(mode: sluice_proxy::policy::Mode, mesh: &str, target: &Target) -> ExitCode {
    let restricted = mode == sluice_proxy::policy::Mode::Restricted;
    let listed = match target.read("/api/v1/Mesh?mesh=default") {
        Ok(b) => b,
        Err(code) => return code,
    };
    let Ok(listed) = serde_json::from_str::<serde_json::Value>(&listed) else {
        return fail("the control plane sent a list that is not JSON");
    };
    let version = listed["items"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|i| i["name"] == mesh)
        .and_then(|i| i["resourceVersion"].as_i64());
    let path = format!("/api/v1/Mesh/default/{mesh}");
    let mut resource = match version {
        Some(_) => {
            let body = match target.read(&path) {
                Ok(b) => b,
                Err(code) => return code,
            };
            match serde_saphyr::from_str::<serde_json::Value>(&body) {
                Ok(v) => v,
                Err(_) => return fail(format!("Mesh {mesh}: the stored resource is not YAML")),
            }
        }
        None => serde_json::json!({"type": "Mesh", "name": mesh}),
    };
    // Kubernetes form keeps its settings under spec.
    let body = if resource.get("spec").is_some() {
        &mut resource["spec"]
    } else {
        &mut resource
    };
    let Some(settings) = body.as_object_mut() else {
        return fail(format!("Mesh {mesh}: the stored resource is not a mapping"));
    };
    let networking = settings
        .entry("networking")
        .or_insert_with(|| serde_json::json!({}));
    if !networking.is_object() {
        *networking = serde_json::json!({});
    }
    let outbound = &mut networking["outbound"];
    if !outbound.is_object() {
        *outbound = serde_json::json!({});
    }
    outbound["passthrough"] = serde_json::Value::Bool(!restricted);
    // Version 0: only if there is still none.
    let condition = format!("If-Match: {}\r\n", version.unwrap_or(0));
    match target.call_with("PUT", &path, &condition, &resource.to_string()) {
        Err(e) => fail(e),
        Ok((200 | 201, _)) => {
            println!(
                "mesh wide outbound traffic policy is set to '{}'",
                mode.istio_name()
            );
            ExitCode::SUCCESS
        }
        Ok((status, body)) => refused(status, &body),
    }
}
