//! Transparent mode: connections the kernel redirected here (iptables REDIRECT), read for
//! where the app sent them. A VIP and port lead to that service, as an outbound listener
//! would; any other address is the app dialling a real IP, decided by the outbound traffic
//! policy with the same address guards as the forward proxy.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::net::TcpStream;
use tokio_util::sync::CancellationToken;

use crate::access_log::{AccessLog, Entry};
use crate::hello::{fold, read_client_hello, Hello, HelloError};
use crate::metrics::Metrics;
use crate::policy::{self, Decision, Host, Opening};

/// Where the app sent a redirected connection (`SO_ORIGINAL_DST`).
pub fn original_dst(stream: &TcpStream) -> std::io::Result<SocketAddr> {
    let socket = socket2::SockRef::from(stream);
    let addr = match stream.local_addr()? {
        SocketAddr::V4(_) => socket.original_dst_v4()?,
        SocketAddr::V6(_) => socket.original_dst_v6()?,
    };
    addr.as_socket().ok_or_else(|| {
        std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            "the original destination is not an IP address",
        )
    })
}

/// What a redirected connection to a non-VIP address may do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RealIp {
    /// Through the service that opens this address (Istio's and Gloo's `addresses`).
    Service(Arc<str>),
    /// Straight to the address, checked by the guards: unregistered in `allowed` mode, or an
    /// address a service names as its endpoint or carries itself.
    Direct {
        service: Arc<str>,
        passthrough: bool,
    },
    Denied(policy::Denied),
}

/// The decision for `addr`, a pure function of the policy table.
pub fn decide_real(mode: policy::Mode, table: &policy::Table, addr: SocketAddr) -> RealIp {
    let direct = |service: Arc<str>, passthrough: bool| match table.check_address(addr) {
        Ok(()) => RealIp::Direct {
            service,
            passthrough,
        },
        Err(d) => RealIp::Denied(d),
    };
    match policy::decide(mode, table, &Host::Ip(addr.ip()), addr.port()) {
        Decision::Deny(d) => RealIp::Denied(d),
        Decision::Registered(Opening::Service {
            service,
            endpoints: true,
            ..
        }) => RealIp::Service(service),
        Decision::Registered(o) => direct(o.service().clone(), false),
        Decision::Passthrough => direct(Arc::from("passthrough"), true),
    }
}

/// The server name a ClientHello sent to a VIP carries, when it is one of the VIP's `names`:
/// an app cannot reach one service through another's address by naming it in SNI.
pub(crate) fn vip_server_name(
    hello: Hello,
    names: &[String],
) -> Result<String, (&'static str, String)> {
    let first = names.first().map_or("", String::as_str);
    match hello {
        Hello::Tls(Some(sni)) if names.iter().any(|n| *n == fold(&sni)) => Ok(sni),
        Hello::Tls(Some(sni)) => Err((
            "sni_mismatch",
            format!("the ClientHello names {sni}, but this address is {first}'s; call {sni} by its own name"),
        )),
        Hello::Tls(None) => Err((
            "sni_mismatch",
            format!("the ClientHello has no server name; it must name {first}"),
        )),
        Hello::Hidden => Err((
            "ech",
            "the ClientHello is encrypted (ECH), so its server name cannot be checked".into(),
        )),
        Hello::NotTls => Err((
            "not_tls",
            format!("{first} is a TLS port: the app must speak TLS to it"),
        )),
    }
}

/// Reads the app's ClientHello (within `timeout`, without answering it) and checks its server
/// name against the VIP's `names`. Returns the bytes read, to send on first, and the name.
pub(crate) async fn read_vip_hello(
    app: &mut TcpStream,
    names: &[String],
    timeout: Duration,
) -> Result<(Vec<u8>, String), HelloError> {
    let mut buf = Vec::new();
    let hello = tokio::time::timeout(timeout, read_client_hello(app, &mut buf))
        .await
        .unwrap_or_else(|_| {
            Err(HelloError::Refused(
                "hello_timeout",
                format!("no TLS ClientHello within {timeout:?}"),
            ))
        })?;
    let name = vip_server_name(hello, names).map_err(|(r, m)| HelloError::Refused(r, m))?;
    Ok((buf, name))
}

/// What every redirected connection is logged and bounded by.
pub struct Context<'a> {
    pub listener: Arc<str>,
    pub access_log: &'a AccessLog,
    pub metrics: &'a Metrics,
    pub connect_timeout: Duration,
    pub idle_timeout: Duration,
}

impl Context<'_> {
    /// Relays the app's connection to `addr`, already checked by the guards.
    pub async fn relay_direct(
        &self,
        mut app: TcpStream,
        peer: SocketAddr,
        addr: SocketAddr,
        service: Arc<str>,
        passthrough: bool,
        kill: &CancellationToken,
    ) {
        let started = Instant::now();
        let mut entry = Entry::new("tcp", self.listener.clone(), peer, service);
        entry.authority = Some(addr.to_string());
        if passthrough {
            self.metrics.count_decision("passthrough", "transparent");
            self.metrics
                .count_passthrough(addr.ip().to_string(), addr.port());
        } else {
            self.metrics.count_decision("allowed", "transparent");
        }
        match tokio::time::timeout(self.connect_timeout, TcpStream::connect(addr)).await {
            Ok(Ok(mut upstream)) => {
                let _ = upstream.set_nodelay(true);
                entry.upstream = Some(Arc::from(addr.to_string()));
                let relayed =
                    crate::tcp::relay(&mut app, &mut upstream, self.idle_timeout, kill).await;
                self.metrics.count_relay(relayed.pooled);
                entry.bytes_in = relayed.up;
                entry.bytes_out = relayed.down;
                entry.error = relayed.ended;
            }
            Ok(Err(e)) => entry.error = Some(format!("{addr}: {e}")),
            Err(_) => entry.error = Some(format!("{addr}: connect timed out")),
        }
        entry.duration = started.elapsed();
        self.access_log.log(entry);
    }

    /// Logs and counts a redirected connection that is closed without being carried.
    pub fn refuse(&self, peer: SocketAddr, dest: SocketAddr, reason: &'static str, message: &str) {
        tracing::info!(%peer, destination = %dest, "transparent connection refused: {message}");
        self.metrics.count_decision("denied", reason);
        let mut entry = Entry::new("tcp", self.listener.clone(), peer, Arc::from("denied"));
        entry.authority = Some(dest.to_string());
        entry.error = Some(format!("refused: {message}"));
        self.access_log.log(entry);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use sluice_control::ProxyConfig;

    #[test]
    fn a_vip_takes_only_hellos_naming_it() {
        let names = vec!["api.example.com".to_string(), "242.0.0.7".to_string()];
        let show = |h: Hello| match vip_server_name(h, &names) {
            Ok(n) => format!("ok {n}"),
            Err((reason, why)) => format!("{reason}: {why}"),
        };
        let sni = |s: &str| Hello::Tls(Some(s.to_string()));
        let cases = [
            (sni("api.example.com"), "ok api.example.com"),
            (sni("API.Example.com."), "ok API.Example.com."),
            (
                sni("other.example.com"),
                "sni_mismatch: the ClientHello names other.example.com, but this address is api.example.com's; call other.example.com by its own name",
            ),
            (
                sni("api.example.com.evil"),
                "sni_mismatch: the ClientHello names api.example.com.evil, but this address is api.example.com's; call api.example.com.evil by its own name",
            ),
            (
                Hello::Tls(None),
                "sni_mismatch: the ClientHello has no server name; it must name api.example.com",
            ),
            (
                Hello::Hidden,
                "ech: the ClientHello is encrypted (ECH), so its server name cannot be checked",
            ),
            (
                Hello::NotTls,
                "not_tls: api.example.com is a TLS port: the app must speak TLS to it",
            ),
        ];
        for (hello, want) in cases {
            assert_eq!(show(hello), want);
        }
    }

    #[test]
    fn real_addresses_follow_the_policy() {
        let registry = {
            let docs = sluice_api::parse_documents(
                "t.yaml",
                r#"
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: db, namespace: default}
spec:
  hosts: [db.internal]
  addresses: [10.20.0.0/16]
  ports: [{number: 5432, name: pg, protocol: TCP}]
  location: MESH_EXTERNAL
  resolution: STATIC
  endpoints: [{address: 10.20.0.5}]
---
type: MeshExternalService
name: api
spec:
  match: {port: 443, protocol: tcp}
  endpoints: [{address: 203.0.113.10, port: 443}]
"#,
            )
            .unwrap();
            let loaded = sluice_api::load(&docs);
            assert!(loaded.errors().next().is_none(), "{:?}", loaded.diagnostics);
            loaded.registry.unwrap()
        };
        let config: ProxyConfig = sluice_control::compile(&registry);
        let table = policy::Table::new(&config, []);
        use policy::Mode::{Allowed, Restricted};
        let addr = |s: &str| s.parse::<SocketAddr>().unwrap();
        let show = |r: RealIp| match r {
            RealIp::Service(s) => format!("service {s}"),
            RealIp::Direct {
                service,
                passthrough,
            } => format!("direct {service} passthrough={passthrough}"),
            RealIp::Denied(d) => format!("denied {}", d.reason()),
        };
        let cases = [
            (Restricted, "10.20.3.4:5432", "service db_5432"),
            (Restricted, "10.20.3.4:5433", "denied not_registered"),
            (
                Restricted,
                "203.0.113.10:443",
                "direct api passthrough=false",
            ),
            (Restricted, "198.51.100.7:443", "denied not_registered"),
            (
                Allowed,
                "198.51.100.7:443",
                "direct passthrough passthrough=true",
            ),
            (Allowed, "10.1.2.3:80", "denied address_refused"),
            (Allowed, "127.0.0.1:9901", "denied address_refused"),
        ];
        for (mode, dest, want) in cases {
            assert_eq!(
                show(decide_real(mode, &table, addr(dest))),
                want,
                "{mode:?} {dest}"
            );
        }
    }
}
