//! Lays out the functions the binary runs together at the front of its text segment, in
//! release builds linked by lld (rustc's default linker on x86_64 Linux since 1.90).
//!
//! The kernel maps a binary's code a neighbourhood at a time, so code that runs at start,
//! scattered over the whole text, maps most of it: laid out together, the proxy starts with
//! about half the resident memory. The order comes from `symbol-order.txt`, which
//! `bench/layout.py` writes from a run under callgrind. Names it lists that a build no longer
//! has are ignored, so a stale list costs memory, never a failed link.

use std::env;
use std::process::Command;

const ORDER_FILE: &str = "symbol-order.txt";

fn main() {
    println!("cargo:rerun-if-changed={ORDER_FILE}");
    println!("cargo:rerun-if-env-changed=SLUICE_SYMBOL_ORDER");
    if links_with_default_lld() && env::var("SLUICE_SYMBOL_ORDER").as_deref() != Ok("off") {
        let dir = env::var("CARGO_MANIFEST_DIR").unwrap_or_default();
        let path = std::path::Path::new(&dir).join(ORDER_FILE);
        if path.is_file() {
            println!(
                "cargo:rustc-link-arg-bins=-Wl,--symbol-ordering-file={}",
                path.display()
            );
            println!("cargo:rustc-link-arg-bins=-Wl,--no-warn-symbol-ordering");
        }
    }
}

/// True for a release build for x86_64 Linux by a rustc that links with its own lld, where
/// neither RUSTFLAGS nor `target.*.linker` picks another linker (GNU ld does not know the option).
fn links_with_default_lld() -> bool {
    let var = |name: &str| env::var(name).unwrap_or_default();
    if var("PROFILE") != "release" || var("TARGET") != "x86_64-unknown-linux-gnu" {
        return false;
    }
    // -C linker, -C linker-flavor, -C linker-features, -C link-self-contained, -fuse-ld.
    let flags = var("CARGO_ENCODED_RUSTFLAGS");
    let picks_linker = ["linker", "link-self-contained", "fuse-ld"]
        .iter()
        .any(|f| flags.contains(f));
    if picks_linker || !var("RUSTC_LINKER").is_empty() {
        return false;
    }
    let rustc = env::var("RUSTC").unwrap_or_else(|_| "rustc".to_string());
    let version = Command::new(rustc)
        .arg("--version")
        .output()
        .map(|out| String::from_utf8_lossy(&out.stdout).into_owned())
        .unwrap_or_default();
    rustc_minor(&version).is_some_and(|minor| minor >= 90)
}

/// The minor version from `rustc 1.95.0 (59807616e 2026-04-14)`.
fn rustc_minor(version: &str) -> Option<u32> {
    let number = version.split_whitespace().nth(1)?;
    let mut parts = number.split('.');
    let (major, minor) = (parts.next()?, parts.next()?);
    if major != "1" {
        return None;
    }
    minor.parse().ok()
}
