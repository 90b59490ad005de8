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

/// One HTTP/1.1 request on a fresh connection; returns the status and the body.
pub fn call(
    address: &str,
    method: &str,
    path: &str,
    token: Option<&str>,
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
        "{method} {path} HTTP/1.1\r\nHost: {address}\r\n{auth}Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
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
    fn address(&self) -> Result<&str, String> {
        self.control_plane
            .strip_prefix("http://")
            .map(|a| a.trim_end_matches('/'))
            .ok_or_else(|| {
                format!(
                    "--control-plane {}: give http://HOST:PORT",
                    self.control_plane
                )
            })
    }

    fn call(&self, method: &str, path: &str, body: &str) -> Result<(u16, String), String> {
        let address = self.address()?;
        call(address, method, path, self.token.as_deref(), body).map_err(|e| {
            format!(
                "cannot reach the control plane at {}: {e}; is `sluice control-plane` running there?",
                self.control_plane
            )
        })
    }
}

fn fail(message: impl std::fmt::Display) -> ExitCode {
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
/// sent. Then each is created or replaced, and reported as kubectl does.
pub fn apply(files: &[PathBuf], target: &Target) -> ExitCode {
    let (documents, problems) = crate::load::read_documents(files);
    let loaded = sluice_api::load(&documents);
    let errors: Vec<String> = problems
        .into_iter()
        .chain(
            loaded
                .diagnostics
                .iter()
                .filter(|d| d.severity == sluice_api::Severity::Error)
                .map(|d| d.to_string()),
        )
        .collect();
    if !errors.is_empty() {
        for e in &errors {
            eprintln!("{e}");
        }
        return fail(format!("{} error(s); nothing was applied", errors.len()));
    }
    for document in &documents {
        let Some((kind, key)) = sluice_api::identify(document) else {
            continue;
        };
        let path = format!("/api/v1/{kind}/{}/{}", key.mesh, key.name);
        let body = document.value.to_string();
        match target.call("PUT", &path, &body) {
            Err(e) => return fail(e),
            Ok((200 | 201, answer)) => {
                let result = serde_json::from_str::<serde_json::Value>(&answer)
                    .ok()
                    .and_then(|v| v["result"].as_str().map(str::to_string))
                    .unwrap_or_else(|| "applied".into());
                println!("{}/{} {result}", kind.to_ascii_lowercase(), key.name);
            }
            Ok((status, answer)) => return refused(status, &answer),
        }
    }
    ExitCode::SUCCESS
}

pub fn get(kind: &str, name: Option<&str>, mesh: &str, output: &str, target: &Target) -> ExitCode {
    let path = match name {
        Some(n) => format!("/api/v1/{kind}/{mesh}/{n}"),
        None => format!("/api/v1/{kind}?mesh={mesh}"),
    };
    let (status, body) = match target.call("GET", &path, "") {
        Ok(a) => a,
        Err(e) => return fail(e),
    };
    if status != 200 {
        return refused(status, &body);
    }
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
