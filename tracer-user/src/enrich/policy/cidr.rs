//! CIDR blocks for ipBlock peers.
use std::{
    fmt,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    str::FromStr,
};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Cidr {
    /// Host bits cleared.
    network: IpAddr,
    prefix: u8,
}

impl Cidr {
    /// The single-address block of `ip` (/32 or /128).
    pub fn host(ip: IpAddr) -> Self {
        let ip = ip.to_canonical();
        Self {
            network: ip,
            prefix: if ip.is_ipv4() { 32 } else { 128 },
        }
    }

    pub fn contains(&self, ip: IpAddr) -> bool {
        match (self.network, ip.to_canonical()) {
            (IpAddr::V4(net), IpAddr::V4(ip)) => {
                u32::from(ip) & mask32(self.prefix) == u32::from(net)
            }
            (IpAddr::V6(net), IpAddr::V6(ip)) => {
                u128::from(ip) & mask128(self.prefix) == u128::from(net)
            }
            _ => false,
        }
    }

    /// The address of a single-address block (/32, /128).
    pub fn single_address(&self) -> Option<IpAddr> {
        let full = if self.network.is_ipv4() { 32 } else { 128 };
        (self.prefix == full).then_some(self.network)
    }

    /// Whether `other` lies entirely inside this block.
    pub fn covers(&self, other: &Cidr) -> bool {
        other.prefix >= self.prefix && self.contains(other.network)
    }
}

fn mask32(prefix: u8) -> u32 {
    u32::MAX.checked_shl(32 - u32::from(prefix)).unwrap_or(0)
}

fn mask128(prefix: u8) -> u128 {
    u128::MAX.checked_shl(128 - u32::from(prefix)).unwrap_or(0)
}

impl FromStr for Cidr {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bad = || format!("{s:?} is not a CIDR block (like 10.0.0.0/8)");
        let (addr, prefix) = s.split_once('/').ok_or_else(bad)?;
        let addr: IpAddr = addr.parse().map_err(|_| bad())?;
        let prefix: u8 = prefix.parse().map_err(|_| bad())?;
        let network = match addr {
            IpAddr::V4(a) if prefix <= 32 => {
                IpAddr::V4(Ipv4Addr::from(u32::from(a) & mask32(prefix)))
            }
            IpAddr::V6(a) if prefix <= 128 => {
                IpAddr::V6(Ipv6Addr::from(u128::from(a) & mask128(prefix)))
            }
            _ => return Err(bad()),
        };
        Ok(Self { network, prefix })
    }
}

impl fmt::Display for Cidr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.network, self.prefix)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn contains() {
        let c: Cidr = "10.1.0.0/16".parse().unwrap();
        assert!(c.contains(ip("10.1.255.3")));
        assert!(!c.contains(ip("10.2.0.1")));
        assert!(!c.contains(ip("fd00::1")));
        assert!(c.contains(ip("::ffff:10.1.0.9")));
        let all: Cidr = "0.0.0.0/0".parse().unwrap();
        assert!(all.contains(ip("192.0.2.1")));
        let host: Cidr = "10.1.2.3/32".parse().unwrap();
        assert!(host.contains(ip("10.1.2.3")) && !host.contains(ip("10.1.2.4")));
        let v6: Cidr = "fd00:10::/64".parse().unwrap();
        assert!(v6.contains(ip("fd00:10::abcd")) && !v6.contains(ip("fd00:11::1")));
        assert!(c.covers(&"10.1.3.0/24".parse().unwrap()));
        assert!(!c.covers(&"10.0.0.0/8".parse().unwrap()));
    }

    #[test]
    fn parses_and_masks() {
        assert_eq!(
            "10.1.2.3/16".parse::<Cidr>().unwrap().to_string(),
            "10.1.0.0/16"
        );
        assert_eq!(Cidr::host(ip("10.0.0.7")).to_string(), "10.0.0.7/32");
        for bad in [
            "10.0.0.0",
            "10.0.0.0/33",
            "x/8",
            "fd00::/129",
            "10.0.0.0/-1",
            "",
        ] {
            assert!(bad.parse::<Cidr>().is_err(), "{bad}");
        }
    }
}
