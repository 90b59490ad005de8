//! Where bytes may go: address classes that are refused unless an external service names them,
//! after unwrapping the IPv6 forms that carry an IPv4 address (mapped, NAT64, 6to4, Teredo).
//! Pure functions, so every rule sits in a table test.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

/// Why an address is not reachable by default.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refused {
    Loopback,
    Private,
    LinkLocal,
    SharedAddressSpace,
    Multicast,
    Broadcast,
    Unspecified,
    UniqueLocal,
    Reserved,
}

impl Refused {
    pub fn as_str(self) -> &'static str {
        match self {
            Refused::Loopback => "loopback",
            Refused::Private => "private (RFC 1918)",
            Refused::LinkLocal => "link-local",
            Refused::SharedAddressSpace => "carrier-grade NAT (100.64.0.0/10)",
            Refused::Multicast => "multicast",
            Refused::Broadcast => "broadcast",
            Refused::Unspecified => "unspecified",
            Refused::UniqueLocal => "unique local (fc00::/7)",
            Refused::Reserved => "reserved",
        }
    }
}

/// The IPv4 addresses an IPv6 address stands for, if it is one of the forms that embed one.
pub fn embedded_v4(ip: Ipv6Addr) -> Vec<Ipv4Addr> {
    let s = ip.segments();
    let o = ip.octets();
    let tail = Ipv4Addr::new(o[12], o[13], o[14], o[15]);
    match s {
        // ::ffff:a.b.c.d (mapped) and ::a.b.c.d (the deprecated compatible form, not :: or ::1)
        [0, 0, 0, 0, 0, 0xffff, _, _] => vec![tail],
        [0, 0, 0, 0, 0, 0, hi, _] if hi != 0 => vec![tail],
        // 64:ff9b::/96 (NAT64 well-known prefix) and 64:ff9b:1::/48 (local-use NAT64)
        [0x64, 0xff9b, 0, 0, 0, 0, _, _] => vec![tail],
        // ::ffff:0:a.b.c.d (SIIT, RFC 6052 / 7915)
        [0, 0, 0, 0, 0xffff, 0, _, _] => vec![tail],
        // 2002:AABB:CCDD::/48 (6to4)
        [0x2002, hi, lo, ..] => vec![Ipv4Addr::from((u32::from(hi) << 16) | u32::from(lo))],
        // 2001:0000::/32 (Teredo): server in bits 32..64, client inverted in the last 32 bits
        [0x2001, 0, hi, lo, ..] => vec![
            Ipv4Addr::from((u32::from(hi) << 16) | u32::from(lo)),
            Ipv4Addr::from(!u32::from(tail)),
        ],
        _ => Vec::new(),
    }
}

/// The reason `ip` is refused by default, or `None` for a public address.
pub fn refused(ip: IpAddr) -> Option<Refused> {
    match ip {
        IpAddr::V4(v4) => refused_v4(v4),
        IpAddr::V6(v6) => {
            if let Some(r) = embedded_v4(v6).into_iter().find_map(refused_v4) {
                return Some(r);
            }
            refused_v6(v6)
        }
    }
}

fn refused_v4(ip: Ipv4Addr) -> Option<Refused> {
    let o = ip.octets();
    Some(match o {
        [127, ..] => Refused::Loopback,
        [10, ..] | [172, 16..=31, ..] | [192, 168, ..] => Refused::Private,
        [169, 254, ..] => Refused::LinkLocal,
        [100, 64..=127, ..] => Refused::SharedAddressSpace,
        [224..=239, ..] => Refused::Multicast,
        [255, 255, 255, 255] => Refused::Broadcast,
        [0, ..] => Refused::Unspecified,
        // IETF protocol assignments, documentation-free benchmarking and future use.
        [192, 0, 0, _] | [198, 18..=19, ..] | [240..=255, ..] => Refused::Reserved,
        _ => return None,
    })
}

fn refused_v6(ip: Ipv6Addr) -> Option<Refused> {
    let s = ip.segments();
    Some(match s {
        [0, 0, 0, 0, 0, 0, 0, 1] => Refused::Loopback,
        [0, 0, 0, 0, 0, 0, 0, 0] => Refused::Unspecified,
        [a, ..] if a & 0xfe00 == 0xfc00 => Refused::UniqueLocal,
        [a, ..] if a & 0xffc0 == 0xfe80 => Refused::LinkLocal,
        [a, ..] if a & 0xff00 == 0xff00 => Refused::Multicast,
        // fec0::/10, the withdrawn site-local range.
        [a, ..] if a & 0xffc0 == 0xfec0 => Refused::Private,
        // 64:ff9b:1::/48, local-use NAT64: the embedded IPv4 address may sit anywhere in it.
        [0x64, 0xff9b, 1, ..] => Refused::Private,
        // 2001:db8::/32 (documentation) and 100::/64 (discard-only).
        [0x2001, 0xdb8, ..] | [0x100, 0, 0, 0, ..] => Refused::Reserved,
        _ => return None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refused_addresses() {
        let cases: &[(&str, Option<Refused>)] = &[
            ("8.8.8.8", None),
            ("203.0.113.10", None),
            ("127.0.0.1", Some(Refused::Loopback)),
            ("127.255.255.254", Some(Refused::Loopback)),
            ("10.1.2.3", Some(Refused::Private)),
            ("172.16.0.1", Some(Refused::Private)),
            ("172.31.255.255", Some(Refused::Private)),
            ("172.32.0.1", None),
            ("192.168.1.1", Some(Refused::Private)),
            ("169.254.169.254", Some(Refused::LinkLocal)),
            ("100.64.0.1", Some(Refused::SharedAddressSpace)),
            ("100.127.255.255", Some(Refused::SharedAddressSpace)),
            ("100.128.0.1", None),
            ("224.0.0.1", Some(Refused::Multicast)),
            ("255.255.255.255", Some(Refused::Broadcast)),
            ("0.0.0.0", Some(Refused::Unspecified)),
            ("240.0.0.1", Some(Refused::Reserved)),
            ("::1", Some(Refused::Loopback)),
            ("::", Some(Refused::Unspecified)),
            ("fc00::1", Some(Refused::UniqueLocal)),
            ("fd12:3456::1", Some(Refused::UniqueLocal)),
            ("fe80::1", Some(Refused::LinkLocal)),
            ("ff02::1", Some(Refused::Multicast)),
            ("2606:4700::1111", None),
            // IPv4 hidden in IPv6.
            ("::ffff:127.0.0.1", Some(Refused::Loopback)),
            ("::ffff:169.254.169.254", Some(Refused::LinkLocal)),
            ("::ffff:8.8.8.8", None),
            ("::127.0.0.1", Some(Refused::Loopback)),
            ("64:ff9b::7f00:1", Some(Refused::Loopback)),
            ("64:ff9b::a9fe:a9fe", Some(Refused::LinkLocal)),
            ("64:ff9b:1::a00:1", Some(Refused::Private)),
            ("64:ff9b:1:7f00:0:100:808:808", Some(Refused::Private)),
            ("::ffff:0:7f00:1", Some(Refused::Loopback)),
            ("::ffff:0:808:808", None),
            ("2001:db8::1", Some(Refused::Reserved)),
            ("100::1", Some(Refused::Reserved)),
            ("64:ff9b::808:808", None),
            ("2002:7f00:1::", Some(Refused::Loopback)),
            ("2002:a9fe:a9fe::1", Some(Refused::LinkLocal)),
            ("2002:808:808::1", None),
            // Teredo with client 127.0.0.1 (inverted: 80ff:fffe) and a public server.
            ("2001:0:808:808:0:0:80ff:fffe", Some(Refused::Loopback)),
            // Teredo with a private server.
            ("2001:0:a00:1:0:0:f7f7:f7f7", Some(Refused::Private)),
            ("2001:0:808:808:0:0:f7f7:f7f7", None),
        ];
        for (text, want) in cases {
            let ip: IpAddr = text.parse().unwrap();
            assert_eq!(refused(ip), *want, "{text}");
        }
    }
}
