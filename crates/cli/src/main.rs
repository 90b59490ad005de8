#![forbid(unsafe_code)]
//! `sluice`: egress control for service meshes, control plane and proxy in one binary.

mod client;
mod control_plane;
mod convert;
mod iptables;
mod load;
mod proxy;
mod run;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

/// jemalloc rather than glibc's malloc: glibc keeps each thread arena's peak, so a proxy holding
/// 10,000 services grew from 35 to 110 MiB over a few config applies (jemalloc: 38 MiB), and
/// applies run 2.8 times faster.
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

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
    /// Serve the registry's REST API and the proxies' config stream over a store (SQLite by
    /// default, or PostgreSQL).
    ControlPlane(control_plane::ControlPlaneArgs),
    /// Run a proxy that takes its config from a control plane, starting from the last config it
    /// had when no control plane answers.
    Proxy(Box<proxy::ProxyArgs>),
    /// Show what a proxy runs: its config (secrets redacted), version, and any config it refused.
    Inspect {
        #[command(subcommand)]
        what: Inspect,
    },
    /// Create or replace resources in the control plane; nothing is sent if any is invalid.
    Apply {
        #[arg(short = 'f', long = "filename", required = true, num_args = 1..)]
        files: Vec<PathBuf>,
        #[command(flatten)]
        target: client::Target,
    },
    /// List resources of a kind, or show one.
    Get {
        kind: String,
        name: Option<String>,
        #[arg(long, default_value = "default")]
        mesh: String,
        /// `table` or `json` for lists; `yaml` or `json` for one resource.
        #[arg(short = 'o', long, default_value = "table")]
        output: String,
        #[command(flatten)]
        target: client::Target,
    },
    /// Delete a resource, or every resource the files declare (-f).
    Delete {
        #[arg(required_unless_present = "files")]
        kind: Option<String>,
        #[arg(required_unless_present = "files")]
        name: Option<String>,
        #[arg(short = 'f', long = "filename", num_args = 1.., conflicts_with_all = ["kind", "name"])]
        files: Vec<PathBuf>,
        #[arg(long, default_value = "default")]
        mesh: String,
        #[command(flatten)]
        target: client::Target,
    },
    /// Set the mesh-wide outbound traffic policy: in the control plane's Mesh resource, which
    /// every proxy of the mesh follows, or (--admin) on one running proxy only.
    OutboundTrafficPolicy {
        /// `allowed` (unregistered destinations pass through, logged) or `restricted`
        /// (registered destinations only).
        #[arg(value_parser = run::parse_mode)]
        mode: sluice_proxy::policy::Mode,
        /// The mesh whose Mesh resource is changed (created if missing).
        #[arg(long, default_value = "default")]
        mesh: String,
        /// Change one proxy's setting through its admin endpoint (IP:PORT) instead; the next
        /// config from a Mesh resource that sets the policy replaces it.
        #[arg(long)]
        admin: Option<String>,
        #[command(flatten)]
        target: client::Target,
    },
    /// Print what resources become: Sluice's internal model, or Kuma resources (--to kuma);
    /// what does not translate is told on standard error. Keys are never printed.
    Convert {
        /// Files or directories of YAML resources; `-` reads standard input.
        #[arg(short = 'f', long = "filename", required = true, num_args = 1..)]
        files: Vec<PathBuf>,
        #[arg(long, value_enum, default_value = "sluice")]
        to: convert::Target,
    },
    /// Install or remove the kernel rules (iptables nat table) that send a workload's outbound
    /// TCP and DNS to the transparent proxy on loopback.
    Iptables {
        #[command(subcommand)]
        action: iptables::Action,
    },
    /// Check resources and print every problem; exits non-zero if any is an error.
    Validate {
        /// Files or directories of YAML resources; `-` reads standard input.
        #[arg(short = 'f', long = "filename", required = true, num_args = 1..)]
        files: Vec<PathBuf>,
    },
}

#[derive(Subcommand)]
enum Inspect {
    /// One proxy by name, or every connected proxy without a name.
    Proxy {
        name: Option<String>,
        #[arg(long, default_value = "default")]
        mesh: String,
        /// `yaml` or `json`.
        #[arg(short = 'o', long, default_value = "yaml")]
        output: String,
        #[command(flatten)]
        target: client::Target,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::Validate { files } => validate(&files),
        Command::Convert { files, to } => convert::main(&files, to),
        Command::Run(args) => run::main(*args),
        Command::Iptables { action } => iptables::main(action),
        Command::ControlPlane(args) => control_plane::main(args),
        Command::Proxy(args) => proxy::main(*args),
        Command::Inspect {
            what:
                Inspect::Proxy {
                    name,
                    mesh,
                    output,
                    target,
                },
        } => client::inspect_proxy(name.as_deref(), &mesh, &output, &target),
        Command::Apply { files, target } => client::apply(&files, &target),
        Command::Get {
            kind,
            name,
            mesh,
            output,
            target,
        } => client::get(&kind, name.as_deref(), &mesh, &output, &target),
        Command::Delete {
            kind,
            name,
            files,
            mesh,
            target,
        } => match (kind, name) {
            (Some(kind), Some(name)) => client::delete(&kind, &name, &mesh, &target),
            _ => client::delete_files(&files, &target),
        },
        Command::OutboundTrafficPolicy {
            mode,
            mesh,
            admin,
            target,
        } => match admin {
            Some(admin) => set_policy(mode, &admin, &target),
            None => client::set_mesh_policy(mode, &mesh, &target),
        },
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
fn set_policy(mode: sluice_proxy::policy::Mode, admin: &str, target: &client::Target) -> ExitCode {
    let body = mode.as_str();
    match client::call(
        admin,
        "PUT",
        "/outbound-traffic-policy",
        target.token(),
        body,
    ) {
        Ok((200, answer)) => {
            println!("{}", answer.trim());
            ExitCode::SUCCESS
        }
        Ok((_, answer)) => {
            eprintln!("sluice: the proxy at {admin} refused: {}", answer.trim());
            ExitCode::FAILURE
        }
        Err(e) => {
            eprintln!("sluice: cannot reach the admin endpoint at {admin}: {e}; is sluice run running there (--admin)?");
            ExitCode::FAILURE
        }
    }
}
