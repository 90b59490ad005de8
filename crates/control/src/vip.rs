//! Virtual IPs for external services: one address per service out of a range (Kuma's
//! `242.0.0.0/8` by default). A service keeps its address for as long as it exists; an address
//! given up is held back for a while before another service may get it, so that a DNS answer
//! still cached somewhere cannot send an app to the wrong service. Pure bookkeeping: the caller
//! stores it and says what time it is.

use std::collections::{BTreeMap, BTreeSet};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use sluice_api::model::Cidr;

/// Kuma's default range for external services.
pub const DEFAULT_RANGE: &str = "242.0.0.0/8";

/// How long an address given up stays unused: well past the 30 s TTL the DNS server answers
/// with, and past resolvers that stretch it.
pub const HOLD_SECONDS: u64 = 600;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Pool {
    range: Cidr,
    /// By owner: a resource (`KIND/MESH/NAME`) or a name (`name/MESH/HOST`).
    assigned: BTreeMap<String, IpAddr>,
    used: BTreeSet<IpAddr>,
    /// Addresses given up, with the time (seconds) they may be handed out again.
    held: BTreeMap<IpAddr, u64>,
    /// Where the next search for a free address starts, so addresses go round the range
    /// rather than the lowest free one coming back at once.
    next: u128,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum VipError {
    #[error("the VIP range {range} is too small: it must hold at least 2 addresses")]
    TooSmall { range: Cidr },
    #[error("the VIP range {range} is full ({used} in use, {held} held back after release); give a larger range")]
    Full {
        range: Cidr,
        used: usize,
        held: usize,
    },
}

impl Pool {
    pub fn new(range: Cidr) -> Result<Pool, VipError> {
        if size(&range) < 2 {
            return Err(VipError::TooSmall { range });
        }
        Ok(Pool {
            range,
            assigned: BTreeMap::new(),
            used: BTreeSet::new(),
            held: BTreeMap::new(),
            next: 1,
        })
    }

    pub fn range(&self) -> Cidr {
        self.range
    }

    /// The address of `service`, if it has one.
    pub fn get(&self, service: &str) -> Option<IpAddr> {
        self.assigned.get(service).copied()
    }

    /// The address of `service`, given one now if it has none.
    pub fn assign(&mut self, service: &str, now: u64) -> Result<IpAddr, VipError> {
        if let Some(ip) = self.assigned.get(service) {
            return Ok(*ip);
        }
        self.held.retain(|_, until| *until > now);
        let total = size(&self.range);
        // The range's first address is its network address and is never handed out; for IPv4
        // the last (broadcast) is not either.
        let last = if self.range.ip.is_ipv4() {
            total - 1
        } else {
            total
        };
        for step in 0..last {
            let offset = 1 + (self.next - 1 + step) % (last - 1).max(1);
            let ip = at(&self.range, offset);
            if !self.used.contains(&ip) && !self.held.contains_key(&ip) {
                self.next = offset + 1;
                self.used.insert(ip);
                self.assigned.insert(service.to_string(), ip);
                return Ok(ip);
            }
        }
        Err(VipError::Full {
            range: self.range,
            used: self.used.len(),
            held: self.held.len(),
        })
    }

    /// `service` is gone: its address is held back until `now + HOLD_SECONDS`.
    pub fn release(&mut self, service: &str, now: u64) {
        if let Some(ip) = self.assigned.remove(service) {
            self.used.remove(&ip);
            self.held.insert(ip, now + HOLD_SECONDS);
        }
    }
}

impl Pool {
    /// Takes back an address as stored. Addresses outside the range (the range was changed)
    /// are left out, so their owners get new ones.
    pub fn restore(&mut self, owner: &str, ip: IpAddr) -> bool {
        if !self.range.contains(ip) || self.used.contains(&ip) || self.assigned.contains_key(owner)
        {
            return false;
        }
        self.used.insert(ip);
        self.assigned.insert(owner.to_string(), ip);
        true
    }

    /// Holds back an address as stored.
    pub fn restore_hold(&mut self, ip: IpAddr, until: u64) {
        if !self.used.contains(&ip) {
            self.held.insert(ip, until);
        }
    }

    /// Everyone holding an address.
    pub fn owners(&self) -> impl Iterator<Item = (&str, IpAddr)> {
        self.assigned.iter().map(|(o, ip)| (o.as_str(), *ip))
    }

    /// Every address given out or held back: its owner, or when its hold ends.
    pub fn state(&self) -> BTreeMap<IpAddr, (Option<&str>, Option<u64>)> {
        let mut state: BTreeMap<IpAddr, (Option<&str>, Option<u64>)> = self
            .held
            .iter()
            .map(|(ip, until)| (*ip, (None, Some(*until))))
            .collect();
        for (owner, ip) in &self.assigned {
            state.insert(*ip, (Some(owner.as_str()), None));
        }
        state
    }
}

/// How many addresses `range` holds (saturated for the largest IPv6 ranges).
fn size(range: &Cidr) -> u128 {
    let width: u32 = if range.ip.is_ipv4() { 32 } else { 128 };
    let bits = width - u32::from(range.prefix);
    1u128.checked_shl(bits).unwrap_or(u128::MAX)
}

fn at(range: &Cidr, offset: u128) -> IpAddr {
    match range.network() {
        IpAddr::V4(v4) => IpAddr::V4(Ipv4Addr::from(u32::from(v4).wrapping_add(offset as u32))),
        IpAddr::V6(v6) => IpAddr::V6(Ipv6Addr::from(u128::from(v6).wrapping_add(offset))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(name: &str) -> String {
        format!("MeshExternalService/default/{name}")
    }

    fn pool(range: &str) -> Pool {
        Pool::new(Cidr::parse(range).unwrap()).unwrap()
    }

    #[test]
    fn each_service_keeps_its_address() {
        let mut p = pool(DEFAULT_RANGE);
        let a = p.assign(&key("a"), 0).unwrap();
        let b = p.assign(&key("b"), 0).unwrap();
        assert_eq!(a, "242.0.0.1".parse::<IpAddr>().unwrap());
        assert_eq!(b, "242.0.0.2".parse::<IpAddr>().unwrap());
        assert_eq!(p.assign(&key("a"), 5).unwrap(), a);
        assert_eq!(p.get(&key("b")), Some(b));
    }

    #[test]
    fn a_released_address_is_held_back_for_its_time() {
        // Room for two: 10.0.0.1 and 10.0.0.2 (.0 is the network, .3 the broadcast).
        let mut p = pool("10.0.0.0/30");
        let a = p.assign(&key("a"), 0).unwrap();
        p.assign(&key("b"), 0).unwrap();
        p.release(&key("a"), 100);
        // Held: the range is full until the hold ends.
        assert_eq!(
            p.assign(&key("c"), 100 + HOLD_SECONDS - 1),
            Err(VipError::Full {
                range: Cidr::parse("10.0.0.0/30").unwrap(),
                used: 1,
                held: 1
            })
        );
        assert_eq!(p.assign(&key("c"), 100 + HOLD_SECONDS).unwrap(), a);
    }

    #[test]
    fn addresses_go_round_the_range() {
        let mut p = pool("10.0.0.0/29");
        let first = p.assign(&key("a"), 0).unwrap();
        p.release(&key("a"), 0);
        // After the hold the freed address could come back, but the next ones come first.
        let again = p.assign(&key("b"), HOLD_SECONDS).unwrap();
        assert_ne!(first, again);
        let all: BTreeSet<IpAddr> = (0..5)
            .map(|i| p.assign(&key(&format!("s{i}")), HOLD_SECONDS).unwrap())
            .collect();
        assert_eq!(all.len(), 5);
        assert!(all
            .iter()
            .all(|ip| Cidr::parse("10.0.0.0/29").unwrap().contains(*ip)));
        assert!(!all.contains(&"10.0.0.0".parse::<IpAddr>().unwrap()));
        assert!(!all.contains(&"10.0.0.7".parse::<IpAddr>().unwrap()));
    }

    #[test]
    fn ranges_too_small_and_ipv6() {
        assert_eq!(
            Pool::new(Cidr::parse("10.0.0.1").unwrap()),
            Err(VipError::TooSmall {
                range: Cidr::parse("10.0.0.1").unwrap()
            })
        );
        let mut p = pool("fd00:242::/112");
        assert_eq!(
            p.assign(&key("a"), 0).unwrap(),
            "fd00:242::1".parse::<IpAddr>().unwrap()
        );
    }
}
