//! Rules for names and addresses that appear in resources.

use std::net::IpAddr;

/// A DNS host name as RFC 1123 allows it, without a trailing dot. A name whose last label is
/// all digits is refused, so numeric spellings of addresses (`127.1`, `2130706433`) never pass
/// as names.
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
    labels.iter().all(label_ok)
        && labels
            .last()
            .is_some_and(|tld| !tld.bytes().all(|b| b.is_ascii_digit()) && !tld.starts_with("0x"))
}

/// An IP literal, with or without the brackets IPv6 takes in URLs.
pub fn parse_ip(s: &str) -> Option<IpAddr> {
    let s = s
        .strip_prefix('[')
        .and_then(|r| r.strip_suffix(']'))
        .unwrap_or(s);
    s.parse().ok()
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
        for ok in [
            "httpbin.org",
            "a",
            "api-1.example.com",
            "example.com.",
            "xn--bcher-kva.de",
        ] {
            assert!(is_dns_name(ok), "{ok}");
        }
        for bad in [
            "",
            "-a.com",
            "a-.com",
            "a..b",
            "127.1",
            "2130706433",
            "0x7f.1",
            "0177.0.0.1",
            "a b",
            "under_score.com",
            "http://x",
            "a.0x1",
        ] {
            assert!(!is_dns_name(bad), "{bad}");
        }
    }

    #[test]
    fn ips() {
        assert_eq!(parse_ip("[::1]"), Some("::1".parse().unwrap()));
        assert_eq!(
            parse_ip("203.0.113.10"),
            Some("203.0.113.10".parse().unwrap())
        );
        assert_eq!(parse_ip("127.1"), None);
    }

    #[test]
    fn resource_names() {
        assert!(is_resource_name("httpbin-tls"));
        assert!(is_resource_name("a_b.c"));
        assert!(!is_resource_name("-x"));
        assert!(!is_resource_name("a/b"));
        assert!(!is_resource_name(""));
    }
}
