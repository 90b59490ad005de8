//! Rules for names and addresses that appear in resources.

use std::net::{IpAddr, Ipv6Addr};

/// A DNS host name as RFC 1123 allows it, with an optional trailing dot. A name whose last
/// label is all digits or starts with `0x` is refused: resolvers read such names as numeric
/// addresses (`127.1`, `2130706433`, `0x7f.1`), so they would pass as names yet reach an IP.
pub fn is_dns_name(name: &str) -> bool {
    let name = name.strip_suffix('.').unwrap_or(name);
    if name.is_empty() || name.len() > 253 {
        return false;
    }
    let labels: Vec<&str> = name.split('.').collect();
    let label_ok = |l: &&str| {
        !l.is_empty()
            && l.len() <= 63
            && l.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
            && !l.starts_with('-')
            && !l.ends_with('-')
    };
    labels.iter().all(label_ok) && labels.last().is_some_and(|last| !looks_numeric(last))
}

/// `inet_aton` and URL parsers read a last label like these as part of an address.
fn looks_numeric(label: &str) -> bool {
    label.bytes().all(|b| b.is_ascii_digit())
        || label.get(..2).is_some_and(|p| p.eq_ignore_ascii_case("0x"))
}

/// An IP literal; IPv6 may be written in the brackets it takes in URLs, IPv4 may not.
pub fn parse_ip(s: &str) -> Option<IpAddr> {
    match s.strip_prefix('[').and_then(|r| r.strip_suffix(']')) {
        Some(inner) => inner.parse::<Ipv6Addr>().ok().map(IpAddr::V6),
        None => s.parse().ok(),
    }
}

/// Resource names: what Kuma accepts in universal mode, letters, digits, `-`, `_` and `.`,
/// starting and ending with a letter or digit.
pub fn is_resource_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 253
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
        && name
            .bytes()
            .next()
            .is_some_and(|b| b.is_ascii_alphanumeric())
        && name
            .bytes()
            .last()
            .is_some_and(|b| b.is_ascii_alphanumeric())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dns_names() {
        for (name, ok) in [
            ("httpbin.org", true),
            ("a", true),
            ("localhost", true),
            ("api-1.example.com", true),
            ("example.com.", true),
            ("xn--bcher-kva.de", true),
            ("1password.com", true),
            ("123.example", true),
            ("Upper.Example.COM", true),
            ("", false),
            (".", false),
            ("-a.com", false),
            ("a-.com", false),
            ("a..b", false),
            (".a.com", false),
            ("127.1", false),
            ("127.0.0.1", false),
            ("127.0.0.1.", false),
            ("2130706433", false),
            ("0x7f.1", false),
            ("0x7f000001", false),
            ("0X7F000001", false),
            ("a.0X1", false),
            ("0177.0.0.1", false),
            ("a.0x1", false),
            ("a b", false),
            ("under_score.com", false),
            ("http://x", false),
            ("host:80", false),
            ("[::1]", false),
            ("bücher.de", false),
        ] {
            assert_eq!(is_dns_name(name), ok, "{name:?}");
        }
        let label63 = "a".repeat(63);
        let label64 = "a".repeat(64);
        assert!(is_dns_name(&format!("{label63}.com")));
        assert!(!is_dns_name(&format!("{label64}.com")));
        let long = vec!["abcdefghi"; 26].join(".");
        assert_eq!(long.len(), 259);
        assert!(!is_dns_name(&long));
    }

    #[test]
    fn ips() {
        for (text, want) in [
            ("203.0.113.10", Some("203.0.113.10")),
            ("::1", Some("::1")),
            ("[::1]", Some("::1")),
            ("[2001:db8::1]", Some("2001:db8::1")),
            ("127.1", None),
            ("0x7f.0.0.1", None),
            ("[127.0.0.1]", None),
            ("[::1", None),
            ("::1]", None),
            ("fe80::1%eth0", None),
            ("[::1]:80", None),
            ("", None),
        ] {
            let want: Option<IpAddr> = want.map(|w| w.parse().unwrap());
            assert_eq!(parse_ip(text), want, "{text:?}");
        }
    }

    #[test]
    fn resource_names() {
        for (name, ok) in [
            ("httpbin-tls", true),
            ("a_b.c", true),
            ("a", true),
            ("Db1", true),
            ("-x", false),
            ("x-", false),
            ("x.", false),
            ("_x", false),
            ("a/b", false),
            ("a b", false),
            ("", false),
            ("ä", false),
        ] {
            assert_eq!(is_resource_name(name), ok, "{name:?}");
        }
        assert!(is_resource_name(&"a".repeat(253)));
        assert!(!is_resource_name(&"a".repeat(254)));
    }
}
