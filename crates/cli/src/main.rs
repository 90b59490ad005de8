#![forbid(unsafe_code)]
//! `sluice`: egress control for service meshes, control plane and proxy in one binary.

mod control_plane;
mod load;
mod run;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "sluice",
    version,
    about = "Egress control: a registry of external services and the proxy that carries traffic to them"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Load resources from files and run the proxy, reloading when the files change or on SIGHUP.
    Run(Box<run::RunArgs>),
    /// Serve the registry's REST API over a store (SQLite by default, or PostgreSQL).
    ControlPlane(control_plane::ControlPlaneArgs),
    /// Set the mesh-wide outbound traffic policy of a running `sluice run`, live.
    OutboundTrafficPolicy {
        /// `allowed` (unregistered destinations pass through, logged) or `restricted`
        /// (registered destinations only).
        #[arg(value_parser = run::parse_mode)]
        mode: sluice_proxy::policy::Mode,
        /// The admin endpoint of the running proxy.
        #[arg(long, default_value = "127.0.0.1:9901")]
        admin: String,
    },
    /// Check resources and print every problem; exits non-zero if any is an error.
    Validate {
        /// Files or directories of YAML resources; `-` reads standard input.
        #[arg(short = 'f', long = "filename", required = true, num_args = 1..)]
        files: Vec<PathBuf>,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::Validate { files } => validate(&files),
        Command::Run(args) => run::main(*args),
        Command::ControlPlane(args) => control_plane::main(args),
        Command::OutboundTrafficPolicy { mode, admin } => set_policy(mode, &admin),
    }
}

fn validate(files: &[PathBuf]) -> ExitCode {
    let (documents, mut problems) = load::read_documents(files);
    let loaded = sluice_api::load(&documents);
    problems.extend(loaded.diagnostics.iter().map(|d| d.to_string()));
    let errors = problems
        .iter()
        .filter(|p| !p.starts_with("warning: "))
        .count();
    for p in &problems {
        eprintln!("{p}");
    }
    if errors > 0 {
        eprintln!("{errors} error(s); nothing is valid until they are fixed");
        return ExitCode::FAILURE;
    }
    let counts: Vec<String> = loaded
        .counts
        .iter()
        .map(|(kind, n)| format!("{n} {kind}"))
        .collect();
    println!(
        "valid: {}",
        if counts.is_empty() {
            "no resources".to_string()
        } else {
            counts.join(", ")
        }
    );
    ExitCode::SUCCESS
}

/// Asks the running proxy's admin endpoint to change the policy; prints its one-line answer.
fn set_policy(mode: sluice_proxy::policy::Mode, admin: &str) -> ExitCode {
    use std::io::{Read, Write};
    let body = match mode {
        sluice_proxy::policy::Mode::Allowed => "allowed",
        sluice_proxy::policy::Mode::Restricted => "restricted",
    };
    let result = (|| -> std::io::Result<String> {
        let addr: std::net::SocketAddr = admin.parse().map_err(|_| {
            std::io::Error::new(std::io::ErrorKind::InvalidInput, "not an IP:PORT address")
        })?;
        let mut s = std::net::TcpStream::connect_timeout(&addr, std::time::Duration::from_secs(5))?;
        s.set_read_timeout(Some(std::time::Duration::from_secs(10)))?;
        write!(
            s,
            "PUT /outbound-traffic-policy HTTP/1.1\r\nHost: {admin}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
            body.len()
        )?;
        let mut answer = String::new();
        s.take(64 * 1024).read_to_string(&mut answer)?;
        Ok(answer)
    })();
    match result {
        Ok(answer) => {
            let ok = answer.starts_with("HTTP/1.1 200");
            let text = answer.split("\r\n\r\n").nth(1).unwrap_or("").trim();
            if ok {
                println!("{text}");
                ExitCode::SUCCESS
            } else {
                eprintln!("sluice: the proxy at {admin} refused: {text}");
                ExitCode::FAILURE
            }
        }
        Err(e) => {
            eprintln!("sluice: cannot reach the admin endpoint at {admin}: {e}; is sluice run running there (--admin)?");
            ExitCode::FAILURE
        }
    }
}
