#![forbid(unsafe_code)]
//! `sluice`: egress control for service meshes, control plane and proxy in one binary.

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
    Run(run::RunArgs),
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
        Command::Run(args) => run::main(args),
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
