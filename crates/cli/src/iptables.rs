//! `sluice iptables install|uninstall`: the nat rules that send a workload's outbound TCP to the
//! transparent listener and its DNS to the proxy's DNS server.
//!
//! The rules live in chains of their own, jumped to once from the nat table's OUTPUT chain, and
//! are applied in one `iptables-restore --noflush` transaction, so rules other tools keep in the
//! table are left as they are. What to write depends on what is already there (the jump is added
//! only when missing, so installing twice changes nothing): [`NatState`] reads that from
//! `iptables-save`, and [`install_rules`] and [`uninstall_rules`] turn it into restore input
//! without touching the system.

use std::fmt::Write as _;
use std::io::{Read, Write as _};
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode, Stdio};
use std::time::{Duration, Instant};

use clap::{Args, Subcommand};

/// Entered from OUTPUT; picks what is redirected and what returns untouched.
const OUTPUT_CHAIN: &str = "SLUICE_OUTPUT";
/// Sends DNS to the proxy's DNS server.
const DNS_CHAIN: &str = "SLUICE_DNS";
/// Sends TCP to the transparent listener.
const REDIRECT_CHAIN: &str = "SLUICE_REDIRECT";
/// Every chain an install may create, in the order they are declared and removed.
const CHAINS: [&str; 3] = [OUTPUT_CHAIN, DNS_CHAIN, REDIRECT_CHAIN];
/// The one rule outside sluice's chains, as `iptables-save` prints it without its `-A `.
const JUMP: &str = "OUTPUT -j SLUICE_OUTPUT";

/// How long one iptables tool may run; it only talks to the local kernel.
const TOOL_TIMEOUT: Duration = Duration::from_secs(30);

#[derive(Subcommand)]
pub enum Action {
    /// Redirect outbound TCP to the transparent listener and DNS to the proxy's DNS server;
    /// installing again replaces the rules.
    Install(InstallArgs),
    /// Remove what `install` added; the nat table is left as it was before.
    Uninstall(UninstallArgs),
}

#[derive(Args)]
pub struct InstallArgs {
    /// The uid the proxy runs as (`id -u USER`). Its traffic is never redirected, or the proxy
    /// would connect back to itself; required even with --uid, as the first rule.
    #[arg(long, value_name = "UID")]
    proxy_uid: u32,
    /// Redirect only this user's traffic (repeat, or separate with commas). Without it, every
    /// uid but the proxy's is redirected: for a network namespace that holds only the workload.
    #[arg(long = "uid", value_name = "UID", value_delimiter = ',')]
    uids: Vec<u32>,
    /// The port of the transparent TCP listener on loopback.
    #[arg(long, value_name = "PORT", default_value_t = 15001)]
    redirect_port: u16,
    /// The port of the proxy's DNS server on loopback (UDP and TCP).
    #[arg(long, value_name = "PORT", default_value_t = 15053)]
    dns_port: u16,
    /// Leave DNS alone: names resolve as they did before.
    #[arg(long, conflicts_with = "dns_port")]
    no_dns: bool,
    /// TCP destination ports that are never redirected (for example 22).
    #[arg(long, value_name = "PORT,...", value_delimiter = ',')]
    exclude_outbound_ports: Vec<u16>,
    /// Install the same rules for IPv6 too (ip6tables), redirecting to [::1].
    #[arg(long)]
    ipv6: bool,
    /// Print the iptables-restore input instead of applying it; needs no root.
    #[arg(long)]
    dry_run: bool,
}

#[derive(Args)]
pub struct UninstallArgs {
    /// Remove the IPv6 rules (ip6tables) too.
    #[arg(long)]
    ipv6: bool,
    /// Print the iptables-restore input that would remove them instead of applying it.
    #[arg(long)]
    dry_run: bool,
}

/// IPv4 (iptables) or IPv6 (ip6tables).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Family {
    V4,
    V6,
}

impl Family {
    fn name(self) -> &'static str {
        match self {
            Family::V4 => "IPv4",
            Family::V6 => "IPv6",
        }
    }

    fn restore_tool(self) -> &'static str {
        match self {
            Family::V4 => "iptables-restore",
            Family::V6 => "ip6tables-restore",
        }
    }

    fn save_tool(self) -> &'static str {
        match self {
            Family::V4 => "iptables-save",
            Family::V6 => "ip6tables-save",
        }
    }

    /// Loopback: admin calls, other local services and the proxy's own listeners.
    fn loopback(self) -> &'static str {
        match self {
            Family::V4 => "127.0.0.0/8",
            Family::V6 => "::1/128",
        }
    }

    /// Where REDIRECT sends locally generated traffic.
    fn local_address(self) -> &'static str {
        match self {
            Family::V4 => "127.0.0.1",
            Family::V6 => "[::1]",
        }
    }
}

/// What to redirect, checked.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Redirect {
    pub proxy_uid: u32,
    /// Empty: every uid but the proxy's.
    pub uids: Vec<u32>,
    pub redirect_port: u16,
    /// None: DNS is left alone.
    pub dns_port: Option<u16>,
    pub excluded_ports: Vec<u16>,
}

impl Redirect {
    /// Checks the options; the error is one line naming the option, the rule and the fix.
    pub(crate) fn new(
        proxy_uid: u32,
        uids: &[u32],
        redirect_port: u16,
        dns_port: Option<u16>,
        excluded_ports: &[u16],
    ) -> Result<Redirect, String> {
        let port_rule = "a port is between 1 and 65535";
        if redirect_port == 0 {
            return Err(format!(
                "--redirect-port 0: {port_rule}; give the transparent listener's port (default 15001)"
            ));
        }
        if dns_port == Some(0) {
            return Err(format!(
                "--dns-port 0: {port_rule}; give the DNS server's port (default 15053), or --no-dns"
            ));
        }
        if excluded_ports.contains(&0) {
            return Err(format!(
                "--exclude-outbound-ports: 0 is not a port ({port_rule}); remove it"
            ));
        }
        if dns_port.is_some() && excluded_ports.contains(&53) {
            return Err(
                "--exclude-outbound-ports 53: DNS (port 53) goes to the DNS server before \
                 any port is excluded; give --no-dns to leave DNS alone"
                    .to_string(),
            );
        }
        if dns_port == Some(redirect_port) {
            return Err(format!(
                "--redirect-port and --dns-port are both {redirect_port}: the DNS server also \
                 answers on TCP, so it needs a port of its own; change one of them"
            ));
        }
        if uids.contains(&proxy_uid) {
            return Err(format!(
                "--uid {proxy_uid} is the proxy's uid (--proxy-uid): the proxy's traffic is never \
                 redirected, or it would come back to the proxy; remove it from --uid"
            ));
        }
        Ok(Redirect {
            proxy_uid,
            uids: without_repeats(uids),
            redirect_port,
            dns_port,
            excluded_ports: without_repeats(excluded_ports),
        })
    }

    /// One line for people: what goes where.
    fn describe(&self, family: Family) -> String {
        let who = if self.uids.is_empty() {
            format!("every uid but {}", self.proxy_uid)
        } else {
            let uids: Vec<String> = self.uids.iter().map(u32::to_string).collect();
            format!("uid {}", uids.join(", "))
        };
        let local = family.local_address();
        let mut line = format!("TCP of {who} to {local}:{}", self.redirect_port);
        if let Some(dns) = self.dns_port {
            let _ = write!(line, ", DNS to {local}:{dns}");
        }
        if !self.excluded_ports.is_empty() {
            let ports: Vec<String> = self.excluded_ports.iter().map(u16::to_string).collect();
            let _ = write!(line, ", except to ports {}", ports.join(","));
        }
        line
    }
}

fn without_repeats<T: PartialEq + Copy>(items: &[T]) -> Vec<T> {
    let mut kept = Vec::with_capacity(items.len());
    for item in items {
        if !kept.contains(item) {
            kept.push(*item);
        }
    }
    kept
}

/// What of sluice's is in a nat table, read from `iptables-save` output.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub(crate) struct NatState {
    /// Sluice's chains that exist, in [`CHAINS`] order.
    chains: Vec<&'static str>,
    /// Rules in other chains that jump to one of sluice's, as saved without the leading `-A `.
    jumps: Vec<String>,
}

impl NatState {
    pub(crate) fn parse(saved: &str) -> NatState {
        let mut state = NatState::default();
        let mut in_nat = false;
        for line in saved.lines().map(str::trim) {
            if let Some(table) = line.strip_prefix('*') {
                in_nat = table == "nat";
            } else if !in_nat {
                continue;
            } else if let Some(declaration) = line.strip_prefix(':') {
                let name = declaration.split_whitespace().next().unwrap_or_default();
                if let Some(chain) = CHAINS.iter().find(|c| **c == name) {
                    if !state.chains.contains(chain) {
                        state.chains.push(chain);
                    }
                }
            } else if let Some(rule) = line.strip_prefix("-A ") {
                let words: Vec<&str> = rule.split_whitespace().collect();
                let in_own_chain = words.first().is_some_and(|c| CHAINS.contains(c));
                let enters_own_chain = words
                    .windows(2)
                    .any(|w| (w[0] == "-j" || w[0] == "-g") && CHAINS.contains(&w[1]));
                // As saved, so that `-D` matches it even with quoted spaces in a comment.
                if enters_own_chain && !in_own_chain {
                    state.jumps.push(rule.trim_end().to_string());
                }
            }
        }
        state
            .chains
            .sort_by_key(|c| CHAINS.iter().position(|o| o == c));
        state
    }

    /// Everything a full install leaves, for showing what uninstall removes when the table
    /// cannot be read.
    fn full_install() -> NatState {
        NatState {
            chains: CHAINS.to_vec(),
            jumps: vec![JUMP.to_string()],
        }
    }

    /// What is there, for the line uninstall prints.
    fn describe(&self) -> String {
        let rules = match self.jumps.len() {
            0 => String::new(),
            1 => format!("the rule `-A {}`", self.jumps[0]),
            n => format!("{n} rules entering them"),
        };
        match (self.chains.is_empty(), rules.is_empty()) {
            (false, false) => format!("chains {} and {rules}", self.chains.join(", ")),
            (false, true) => format!("chains {}", self.chains.join(", ")),
            (true, _) => rules,
        }
    }

    fn is_empty(&self) -> bool {
        self.chains.is_empty() && self.jumps.is_empty()
    }
}

/// The `iptables-restore --noflush` input that makes the nat table hold exactly one install of
/// `redirect`, whatever of sluice's `current` holds.
pub(crate) fn install_rules(redirect: &Redirect, family: Family, current: &NatState) -> String {
    let mut wanted = vec![OUTPUT_CHAIN, REDIRECT_CHAIN];
    if redirect.dns_port.is_some() {
        wanted.insert(1, DNS_CHAIN);
    }
    let mut out = String::from("*nat\n");
    for chain in &wanted {
        let _ = writeln!(out, ":{chain} - [0:0]");
    }
    // Declaring an existing chain empties it under --noflush, but older iptables-nft did not.
    for chain in &wanted {
        let _ = writeln!(out, "-F {chain}");
    }
    // A position already taken in OUTPUT is kept; any other entry into sluice's chains goes.
    let keep_jump = current.jumps.iter().filter(|j| *j == JUMP).count() == 1;
    for jump in &current.jumps {
        if !(keep_jump && jump == JUMP) {
            let _ = writeln!(out, "-D {jump}");
        }
    }
    // A chain an earlier install made and this one does not (DNS, after --no-dns).
    for chain in current.chains.iter().filter(|c| !wanted.contains(c)) {
        let _ = writeln!(out, "-F {chain}\n-X {chain}");
    }

    let owners: Vec<String> = if redirect.uids.is_empty() {
        vec![String::new()]
    } else {
        redirect
            .uids
            .iter()
            .map(|uid| format!(" -m owner --uid-owner {uid}"))
            .collect()
    };
    let _ = writeln!(
        out,
        "-A {OUTPUT_CHAIN} -m owner --uid-owner {} -j RETURN",
        redirect.proxy_uid
    );
    // Before the loopback exemption: resolv.conf often names a resolver on loopback.
    if redirect.dns_port.is_some() {
        for owner in &owners {
            for protocol in ["udp", "tcp"] {
                let _ = writeln!(
                    out,
                    "-A {OUTPUT_CHAIN} -p {protocol} --dport 53{owner} -j {DNS_CHAIN}"
                );
            }
        }
    }
    let _ = writeln!(out, "-A {OUTPUT_CHAIN} -d {} -j RETURN", family.loopback());
    for port in &redirect.excluded_ports {
        let _ = writeln!(out, "-A {OUTPUT_CHAIN} -p tcp --dport {port} -j RETURN");
    }
    for owner in &owners {
        let _ = writeln!(out, "-A {OUTPUT_CHAIN} -p tcp{owner} -j {REDIRECT_CHAIN}");
    }
    if let Some(dns_port) = redirect.dns_port {
        for protocol in ["udp", "tcp"] {
            let _ = writeln!(
                out,
                "-A {DNS_CHAIN} -p {protocol} -j REDIRECT --to-ports {dns_port}"
            );
        }
    }
    let _ = writeln!(
        out,
        "-A {REDIRECT_CHAIN} -p tcp -j REDIRECT --to-ports {}",
        redirect.redirect_port
    );
    if !keep_jump {
        let _ = writeln!(out, "-A {JUMP}");
    }
    out.push_str("COMMIT\n");
    out
}

/// The `iptables-restore --noflush` input that removes every jump into sluice's chains and the
/// chains; None when the table holds nothing of sluice's.
pub(crate) fn uninstall_rules(current: &NatState) -> Option<String> {
    if current.is_empty() {
        return None;
    }
    let mut out = String::from("*nat\n");
    for jump in &current.jumps {
        let _ = writeln!(out, "-D {jump}");
    }
    // All emptied before any is deleted: SLUICE_OUTPUT refers to the others.
    for chain in &current.chains {
        let _ = writeln!(out, "-F {chain}");
    }
    for chain in &current.chains {
        let _ = writeln!(out, "-X {chain}");
    }
    out.push_str("COMMIT\n");
    Some(out)
}

pub fn main(action: Action) -> ExitCode {
    let result = match action {
        Action::Install(args) => install(&args),
        Action::Uninstall(args) => uninstall(&args),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => crate::client::fail(e),
    }
}

fn families(ipv6: bool) -> Vec<Family> {
    // IPv6 first: when its nat table is missing, nothing has changed yet.
    if ipv6 {
        vec![Family::V6, Family::V4]
    } else {
        vec![Family::V4]
    }
}

fn install(args: &InstallArgs) -> Result<(), String> {
    let redirect = Redirect::new(
        args.proxy_uid,
        &args.uids,
        args.redirect_port,
        (!args.no_dns).then_some(args.dns_port),
        &args.exclude_outbound_ports,
    )?;
    if args.dry_run {
        for family in families(args.ipv6) {
            let current = read_state_for_dry_run(family, NatState::default);
            print_restore_input(family, &install_rules(&redirect, family, &current));
        }
        return Ok(());
    }
    check_tools(&families(args.ipv6))?;
    let mut done: Vec<(Family, NatState)> = Vec::new();
    for family in families(args.ipv6) {
        let applied = read_state(family).and_then(|current| {
            apply(family, &install_rules(&redirect, family, &current))?;
            Ok(current)
        });
        match applied {
            Ok(before) => done.push((family, before)),
            Err(e) => return Err(undo_partial_install(&done, e)),
        }
    }
    let uninstall = if args.ipv6 {
        "sluice iptables uninstall --ipv6"
    } else {
        "sluice iptables uninstall"
    };
    for (family, _) in &done {
        println!(
            "installed ({}): {}; `{uninstall}` removes it",
            family.name(),
            redirect.describe(*family)
        );
    }
    Ok(())
}

/// After one family failed: removes what this run installed for the others, where they held
/// nothing of sluice's before, and says what is left.
fn undo_partial_install(done: &[(Family, NatState)], error: String) -> String {
    let mut message = error;
    for (family, before) in done {
        let name = family.name();
        if !before.is_empty() {
            let _ = write!(
                message,
                "; the {name} rules were replaced and stay (`sluice iptables uninstall --ipv6` removes them)"
            );
            continue;
        }
        let removed = read_state(*family).and_then(|now| match uninstall_rules(&now) {
            Some(rules) => apply(*family, &rules),
            None => Ok(()),
        });
        match removed {
            Ok(()) => {
                let _ = write!(message, "; the {name} rules it had installed were removed");
            }
            Err(e) => {
                let _ = write!(message, "; the {name} rules stay installed ({e})");
            }
        }
    }
    message
}

fn uninstall(args: &UninstallArgs) -> Result<(), String> {
    if args.dry_run {
        for family in families(args.ipv6) {
            let current = read_state_for_dry_run(family, NatState::full_install);
            match uninstall_rules(&current) {
                Some(rules) => print_restore_input(family, &rules),
                None => println!("# nothing installed ({}): nothing to remove", family.name()),
            }
        }
        return Ok(());
    }
    // IPv4 first: a missing IPv6 nat table must not keep the IPv4 rules in place.
    let mut families = families(args.ipv6);
    families.reverse();
    check_tools(&families)?;
    for family in families {
        let current = read_state(family)?;
        match uninstall_rules(&current) {
            Some(rules) => {
                apply(family, &rules)?;
                println!("removed ({}): {}", family.name(), current.describe());
            }
            None => println!(
                "nothing installed ({}): the nat table holds no sluice chains",
                family.name()
            ),
        }
    }
    Ok(())
}

fn print_restore_input(family: Family, rules: &str) {
    // A comment line: the output stays valid restore input.
    println!("# {} --noflush", family.restore_tool());
    print!("{rules}");
}

/// The table as it is when it can be read; otherwise `assumed`, saying so on stderr.
fn read_state_for_dry_run(family: Family, assumed: fn() -> NatState) -> NatState {
    match read_state(family) {
        Ok(state) => state,
        Err(e) => {
            let reason = if e == needs_root() {
                "reading it needs root (CAP_NET_ADMIN)".to_string()
            } else {
                e
            };
            let assumption = if assumed().is_empty() {
                "a table holding nothing of sluice's"
            } else {
                "a table holding a full install"
            };
            eprintln!(
                "sluice: cannot read the {} nat table ({reason}); showing the input for {assumption}",
                family.name()
            );
            assumed()
        }
    }
}

/// Everything a change needs, before the first family is changed.
fn check_tools(families: &[Family]) -> Result<(), String> {
    require_net_admin()?;
    for family in families {
        find_tool(family.restore_tool())?;
        find_tool(family.save_tool())?;
    }
    Ok(())
}

fn read_state(family: Family) -> Result<NatState, String> {
    require_net_admin()?;
    let tool = find_tool(family.save_tool())?;
    let output = run_tool(&tool, &["-t", "nat"], None)?;
    if !output.success {
        return Err(tool_failure(
            family.save_tool(),
            "could not read the nat table",
            &output,
        ));
    }
    Ok(NatState::parse(&output.stdout))
}

fn apply(family: Family, rules: &str) -> Result<(), String> {
    require_net_admin()?;
    let tool = find_tool(family.restore_tool())?;
    // --wait: the legacy backend takes a lock other iptables runs may hold.
    let output = run_tool(&tool, &["--noflush", "--wait=10"], Some(rules))?;
    if !output.success {
        return Err(tool_failure(
            family.restore_tool(),
            "refused the rules (nothing was changed)",
            &output,
        ));
    }
    Ok(())
}

fn tool_failure(tool: &str, what: &str, output: &ToolOutput) -> String {
    let stderr = output.stderr.trim();
    if stderr.contains("Permission denied") || stderr.contains("you must be root") {
        return needs_root();
    }
    let details: Vec<&str> = stderr
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with("Try `"))
        .collect();
    let mut message = format!("{tool} {what}: {}", details.join("; "));
    if tool.starts_with("ip6tables") && stderr.contains("table") {
        message
            .push_str("; is IPv6 NAT available in this kernel (ip6table_nat)? or leave out --ipv6");
    }
    message
}

fn needs_root() -> String {
    "needs root (CAP_NET_ADMIN) to change the nat table: run as root or use --dry-run".to_string()
}

/// Fails early when the effective capabilities lack CAP_NET_ADMIN: the restore tools accept an
/// empty transaction without it, so their own refusal is not always seen.
fn require_net_admin() -> Result<(), String> {
    const CAP_NET_ADMIN: u32 = 12;
    let Ok(status) = std::fs::read_to_string("/proc/self/status") else {
        return Ok(());
    };
    let effective = status
        .lines()
        .find_map(|l| l.strip_prefix("CapEff:"))
        .and_then(|hex| u64::from_str_radix(hex.trim(), 16).ok());
    match effective {
        Some(caps) if caps & (1 << CAP_NET_ADMIN) == 0 => Err(needs_root()),
        _ => Ok(()),
    }
}

/// The tool on PATH, or in the sbin directories a non-root PATH often leaves out.
fn find_tool(name: &str) -> Result<PathBuf, String> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    let sbin = ["/usr/sbin", "/sbin", "/usr/local/sbin"].map(PathBuf::from);
    std::env::split_paths(&path)
        .chain(sbin)
        .map(|dir| dir.join(name))
        .find(|candidate| candidate.is_file())
        .ok_or_else(|| format!("{name} not found: install the iptables package"))
}

struct ToolOutput {
    success: bool,
    stdout: String,
    stderr: String,
}

/// Runs a tool with `input` on stdin, reading its output as it comes (a busy host's nat table
/// is larger than a pipe holds) and stopping it after [`TOOL_TIMEOUT`].
fn run_tool(tool: &Path, args: &[&str], input: Option<&str>) -> Result<ToolOutput, String> {
    let name = tool.display();
    let mut child = Command::new(tool)
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| format!("cannot run {name}: {e}"))?;
    let stdout = child.stdout.take().map(read_in_background);
    let stderr = child.stderr.take().map(read_in_background);
    if let Some(mut stdin) = child.stdin.take() {
        if let Some(input) = input {
            // A write error means the tool exited early; its status and stderr say why.
            let _ = stdin.write_all(input.as_bytes());
        }
    }
    let deadline = Instant::now() + TOOL_TIMEOUT;
    let status = loop {
        match child.try_wait() {
            Ok(Some(status)) => break status,
            Ok(None) if Instant::now() >= deadline => {
                let _ = child.kill();
                let _ = child.wait();
                return Err(format!(
                    "{name} did not finish within {}s: is another iptables run holding the table?",
                    TOOL_TIMEOUT.as_secs()
                ));
            }
            Ok(None) => std::thread::sleep(Duration::from_millis(10)),
            Err(e) => return Err(format!("cannot wait for {name}: {e}")),
        }
    };
    let collect = |reader: Option<std::thread::JoinHandle<String>>| {
        reader.and_then(|r| r.join().ok()).unwrap_or_default()
    };
    Ok(ToolOutput {
        success: status.success(),
        stdout: collect(stdout),
        stderr: collect(stderr),
    })
}

fn read_in_background(mut pipe: impl Read + Send + 'static) -> std::thread::JoinHandle<String> {
    std::thread::spawn(move || {
        let mut bytes = Vec::new();
        let _ = pipe.read_to_end(&mut bytes);
        String::from_utf8_lossy(&bytes).into_owned()
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn redirect(proxy_uid: u32, uids: &[u32]) -> Redirect {
        Redirect::new(proxy_uid, uids, 15001, Some(15053), &[]).unwrap()
    }

    const SAVED_EMPTY: &str =
        "# Generated by iptables-save v1.8.9 (nf_tables) on Tue Dec  1 20:37:13 2026
*nat
:PREROUTING ACCEPT [0:0]
:INPUT ACCEPT [0:0]
:OUTPUT ACCEPT [0:0]
:POSTROUTING ACCEPT [0:0]
-A OUTPUT -d 192.0.2.8/32 -j RETURN
COMMIT
# Completed on Tue Dec  1 20:37:13 2026
";

    const SAVED_INSTALLED: &str = "*nat
:PREROUTING ACCEPT [0:0]
:INPUT ACCEPT [0:0]
:OUTPUT ACCEPT [3:180]
:POSTROUTING ACCEPT [0:0]
:SLUICE_DNS - [0:0]
:SLUICE_OUTPUT - [0:0]
:SLUICE_REDIRECT - [0:0]
-A OUTPUT -d 192.0.2.8/32 -j RETURN
-A OUTPUT -j SLUICE_OUTPUT
-A SLUICE_DNS -p udp -j REDIRECT --to-ports 15053
-A SLUICE_OUTPUT -m owner --uid-owner 1234 -j RETURN
-A SLUICE_OUTPUT -p udp -m udp --dport 53 -j SLUICE_DNS
-A SLUICE_OUTPUT -p tcp -j SLUICE_REDIRECT
-A SLUICE_REDIRECT -p tcp -j REDIRECT --to-ports 15001
COMMIT
";

    #[test]
    fn generated_rules_for_option_combinations() {
        let fresh = NatState::default();
        let installed = NatState::parse(SAVED_INSTALLED);
        let cases: Vec<(&str, Redirect, Family, &NatState, &str)> = vec![
            (
                "every uid but the proxy's, into an empty table",
                redirect(1234, &[]),
                Family::V4,
                &fresh,
                "*nat
:SLUICE_OUTPUT - [0:0]
:SLUICE_DNS - [0:0]
:SLUICE_REDIRECT - [0:0]
-F SLUICE_OUTPUT
-F SLUICE_DNS
-F SLUICE_REDIRECT
-A SLUICE_OUTPUT -m owner --uid-owner 1234 -j RETURN
-A SLUICE_OUTPUT -p udp --dport 53 -j SLUICE_DNS
-A SLUICE_OUTPUT -p tcp --dport 53 -j SLUICE_DNS
-A SLUICE_OUTPUT -d 127.0.0.0/8 -j RETURN
-A SLUICE_OUTPUT -p tcp -j SLUICE_REDIRECT
-A SLUICE_DNS -p udp -j REDIRECT --to-ports 15053
-A SLUICE_DNS -p tcp -j REDIRECT --to-ports 15053
-A SLUICE_REDIRECT -p tcp -j REDIRECT --to-ports 15001
-A OUTPUT -j SLUICE_OUTPUT
COMMIT
",
            ),
            (
                "again over an install: the jump stays where it is",
                redirect(1234, &[]),
                Family::V4,
                &installed,
                "*nat
:SLUICE_OUTPUT - [0:0]
:SLUICE_DNS - [0:0]
:SLUICE_REDIRECT - [0:0]
-F SLUICE_OUTPUT
-F SLUICE_DNS
-F SLUICE_REDIRECT
-A SLUICE_OUTPUT -m owner --uid-owner 1234 -j RETURN
-A SLUICE_OUTPUT -p udp --dport 53 -j SLUICE_DNS
-A SLUICE_OUTPUT -p tcp --dport 53 -j SLUICE_DNS
-A SLUICE_OUTPUT -d 127.0.0.0/8 -j RETURN
-A SLUICE_OUTPUT -p tcp -j SLUICE_REDIRECT
-A SLUICE_DNS -p udp -j REDIRECT --to-ports 15053
-A SLUICE_DNS -p tcp -j REDIRECT --to-ports 15053
-A SLUICE_REDIRECT -p tcp -j REDIRECT --to-ports 15001
COMMIT
",
            ),
            (
                "chosen uids, excluded ports, other ports",
                Redirect::new(
                    999,
                    &[1000, 1001, 1000],
                    16001,
                    Some(16053),
                    &[22, 5432, 22],
                )
                .unwrap(),
                Family::V4,
                &fresh,
                "*nat
:SLUICE_OUTPUT - [0:0]
:SLUICE_DNS - [0:0]
:SLUICE_REDIRECT - [0:0]
-F SLUICE_OUTPUT
-F SLUICE_DNS
-F SLUICE_REDIRECT
-A SLUICE_OUTPUT -m owner --uid-owner 999 -j RETURN
-A SLUICE_OUTPUT -p udp --dport 53 -m owner --uid-owner 1000 -j SLUICE_DNS
-A SLUICE_OUTPUT -p tcp --dport 53 -m owner --uid-owner 1000 -j SLUICE_DNS
-A SLUICE_OUTPUT -p udp --dport 53 -m owner --uid-owner 1001 -j SLUICE_DNS
-A SLUICE_OUTPUT -p tcp --dport 53 -m owner --uid-owner 1001 -j SLUICE_DNS
-A SLUICE_OUTPUT -d 127.0.0.0/8 -j RETURN
-A SLUICE_OUTPUT -p tcp --dport 22 -j RETURN
-A SLUICE_OUTPUT -p tcp --dport 5432 -j RETURN
-A SLUICE_OUTPUT -p tcp -m owner --uid-owner 1000 -j SLUICE_REDIRECT
-A SLUICE_OUTPUT -p tcp -m owner --uid-owner 1001 -j SLUICE_REDIRECT
-A SLUICE_DNS -p udp -j REDIRECT --to-ports 16053
-A SLUICE_DNS -p tcp -j REDIRECT --to-ports 16053
-A SLUICE_REDIRECT -p tcp -j REDIRECT --to-ports 16001
-A OUTPUT -j SLUICE_OUTPUT
COMMIT
",
            ),
            (
                "no DNS over an install that had it: its chain goes",
                Redirect::new(1234, &[], 15001, None, &[]).unwrap(),
                Family::V4,
                &installed,
                "*nat
:SLUICE_OUTPUT - [0:0]
:SLUICE_REDIRECT - [0:0]
-F SLUICE_OUTPUT
-F SLUICE_REDIRECT
-F SLUICE_DNS
-X SLUICE_DNS
-A SLUICE_OUTPUT -m owner --uid-owner 1234 -j RETURN
-A SLUICE_OUTPUT -d 127.0.0.0/8 -j RETURN
-A SLUICE_OUTPUT -p tcp -j SLUICE_REDIRECT
-A SLUICE_REDIRECT -p tcp -j REDIRECT --to-ports 15001
COMMIT
",
            ),
            (
                "IPv6",
                redirect(1234, &[65534]),
                Family::V6,
                &fresh,
                "*nat
:SLUICE_OUTPUT - [0:0]
:SLUICE_DNS - [0:0]
:SLUICE_REDIRECT - [0:0]
-F SLUICE_OUTPUT
-F SLUICE_DNS
-F SLUICE_REDIRECT
-A SLUICE_OUTPUT -m owner --uid-owner 1234 -j RETURN
-A SLUICE_OUTPUT -p udp --dport 53 -m owner --uid-owner 65534 -j SLUICE_DNS
-A SLUICE_OUTPUT -p tcp --dport 53 -m owner --uid-owner 65534 -j SLUICE_DNS
-A SLUICE_OUTPUT -d ::1/128 -j RETURN
-A SLUICE_OUTPUT -p tcp -m owner --uid-owner 65534 -j SLUICE_REDIRECT
-A SLUICE_DNS -p udp -j REDIRECT --to-ports 15053
-A SLUICE_DNS -p tcp -j REDIRECT --to-ports 15053
-A SLUICE_REDIRECT -p tcp -j REDIRECT --to-ports 15001
-A OUTPUT -j SLUICE_OUTPUT
COMMIT
",
            ),
        ];
        for (name, redirect, family, current, expected) in cases {
            assert_eq!(
                install_rules(&redirect, family, current),
                expected,
                "{name}"
            );
        }
    }

    #[test]
    fn stray_and_repeated_jumps_are_replaced_by_one() {
        let current = NatState::parse(
            "*nat
:OUTPUT ACCEPT [0:0]
:SLUICE_OUTPUT - [0:0]
:SLUICE_REDIRECT - [0:0]
-A OUTPUT -j SLUICE_OUTPUT
-A OUTPUT -j SLUICE_OUTPUT
-A PREROUTING -p tcp -g SLUICE_REDIRECT
COMMIT
",
        );
        let rules = install_rules(
            &Redirect::new(1, &[], 15001, None, &[]).unwrap(),
            Family::V4,
            &current,
        );
        assert_eq!(
            rules,
            "*nat
:SLUICE_OUTPUT - [0:0]
:SLUICE_REDIRECT - [0:0]
-F SLUICE_OUTPUT
-F SLUICE_REDIRECT
-D OUTPUT -j SLUICE_OUTPUT
-D OUTPUT -j SLUICE_OUTPUT
-D PREROUTING -p tcp -g SLUICE_REDIRECT
-A SLUICE_OUTPUT -m owner --uid-owner 1 -j RETURN
-A SLUICE_OUTPUT -d 127.0.0.0/8 -j RETURN
-A SLUICE_OUTPUT -p tcp -j SLUICE_REDIRECT
-A SLUICE_REDIRECT -p tcp -j REDIRECT --to-ports 15001
-A OUTPUT -j SLUICE_OUTPUT
COMMIT
"
        );
    }

    #[test]
    fn uninstall_removes_the_jump_then_empties_and_deletes_the_chains() {
        let cases: Vec<(&str, &str, Option<&str>)> = vec![
            (
                "a full install",
                SAVED_INSTALLED,
                Some(
                    "*nat
-D OUTPUT -j SLUICE_OUTPUT
-F SLUICE_OUTPUT
-F SLUICE_DNS
-F SLUICE_REDIRECT
-X SLUICE_OUTPUT
-X SLUICE_DNS
-X SLUICE_REDIRECT
COMMIT
",
                ),
            ),
            (
                "chains left without their jump",
                "*nat\n:SLUICE_REDIRECT - [0:0]\n:SLUICE_OUTPUT - [0:0]\nCOMMIT\n",
                Some("*nat\n-F SLUICE_OUTPUT\n-F SLUICE_REDIRECT\n-X SLUICE_OUTPUT\n-X SLUICE_REDIRECT\nCOMMIT\n"),
            ),
            ("nothing installed", SAVED_EMPTY, None),
            ("no nat table", "", None),
        ];
        for (name, saved, expected) in cases {
            let state = NatState::parse(saved);
            assert_eq!(uninstall_rules(&state).as_deref(), expected, "{name}");
        }
    }

    #[test]
    fn reading_a_saved_table_finds_only_sluices_chains_and_the_jumps_into_them() {
        let state = NatState::parse(
            "*filter
:SLUICE_OUTPUT - [0:0]
-A INPUT -j SLUICE_OUTPUT
COMMIT
*nat
:OUTPUT ACCEPT [0:0]
:SLUICE_OUTPUT_OLD - [0:0]
:SLUICE_OUTPUT - [0:0]
-A OUTPUT -j SLUICE_OUTPUT_OLD
-A OUTPUT -m comment --comment sluice -j SLUICE_OUTPUT
-A SLUICE_OUTPUT -p tcp -j SLUICE_REDIRECT
COMMIT
",
        );
        assert_eq!(
            state,
            NatState {
                chains: vec![OUTPUT_CHAIN],
                jumps: vec!["OUTPUT -m comment --comment sluice -j SLUICE_OUTPUT".to_string()],
            }
        );
        assert_eq!(NatState::parse(SAVED_EMPTY), NatState::default());
        assert_eq!(NatState::parse(SAVED_INSTALLED), NatState::full_install());
    }

    #[test]
    fn options_that_cannot_work_are_refused_in_one_line() {
        let cases: Vec<(&str, Result<Redirect, String>, &str)> = vec![
            (
                "redirect port 0",
                Redirect::new(1, &[], 0, Some(15053), &[]),
                "--redirect-port 0: a port is between 1 and 65535",
            ),
            (
                "dns port 0",
                Redirect::new(1, &[], 15001, Some(0), &[]),
                "--dns-port 0: a port is between 1 and 65535",
            ),
            (
                "excluded port 0",
                Redirect::new(1, &[], 15001, None, &[22, 0]),
                "--exclude-outbound-ports: 0 is not a port",
            ),
            (
                "DNS excluded while redirected",
                Redirect::new(1, &[], 15001, Some(15053), &[53]),
                "--exclude-outbound-ports 53: DNS (port 53) goes to the DNS server",
            ),
            (
                "shared port",
                Redirect::new(1, &[], 15001, Some(15001), &[]),
                "--redirect-port and --dns-port are both 15001",
            ),
            (
                "proxy among the redirected",
                Redirect::new(1234, &[1000, 1234], 15001, Some(15053), &[]),
                "--uid 1234 is the proxy's uid (--proxy-uid)",
            ),
        ];
        for (name, result, start) in cases {
            let error = result.expect_err(name);
            assert!(error.starts_with(start), "{name}: {error}");
            assert!(!error.contains('\n'), "{name}: {error}");
        }
    }

    #[test]
    fn description_names_who_and_where() {
        let every = redirect(1234, &[]);
        assert_eq!(
            every.describe(Family::V4),
            "TCP of every uid but 1234 to 127.0.0.1:15001, DNS to 127.0.0.1:15053"
        );
        let chosen = Redirect::new(1, &[1000, 1001], 15001, None, &[22]).unwrap();
        assert_eq!(
            chosen.describe(Family::V6),
            "TCP of uid 1000, 1001 to [::1]:15001, except to ports 22"
        );
        assert_eq!(
            NatState::full_install().describe(),
            "chains SLUICE_OUTPUT, SLUICE_DNS, SLUICE_REDIRECT and the rule `-A OUTPUT -j SLUICE_OUTPUT`"
        );
        let leftover = NatState::parse("*nat\n:SLUICE_REDIRECT - [0:0]\nCOMMIT\n");
        assert_eq!(leftover.describe(), "chains SLUICE_REDIRECT");
    }
}
