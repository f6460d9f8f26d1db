//! IPv4 addressing shared by every driver that hands its guests addresses: subnets, the
//! ranges servers of one shared network each give, whether two servers could give one address
//! twice, and which address a new guest gets.

use std::net::Ipv4Addr;

/// An IPv4 subnet in CIDR form.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Subnet {
    /// Network address.
    pub network: Ipv4Addr,
    /// Prefix length, 8-30.
    pub prefix: u8,
}

impl std::str::FromStr for Subnet {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let bad = || format!("'{s}' is not an IPv4 subnet like 10.48.1.0/24 (prefix 8-30)");
        let (addr, prefix) = s.split_once('/').ok_or_else(bad)?;
        let addr: Ipv4Addr = addr.parse().map_err(|_| bad())?;
        let prefix: u8 = prefix.parse().map_err(|_| bad())?;
        if !(8..=30).contains(&prefix) {
            return Err(bad());
        }
        let mask = u32::MAX << (32 - prefix);
        Ok(Subnet {
            network: Ipv4Addr::from(u32::from(addr) & mask),
            prefix,
        })
    }
}

impl std::fmt::Display for Subnet {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.network, self.prefix)
    }
}

/// The part of a subnet one server hands out (`FIRST-LAST`, both included): servers that
/// share a network (one bridge and subnet, so that a VM moving live keeps its address) each
/// give disjoint ranges of it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AddressRange {
    /// First address handed out.
    pub first: Ipv4Addr,
    /// Last address handed out.
    pub last: Ipv4Addr,
}

impl std::str::FromStr for AddressRange {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let bad = || format!("'{s}' is not an address range like 10.48.1.10-10.48.1.99");
        let (first, last) = s.split_once('-').ok_or_else(bad)?;
        let first: Ipv4Addr = first.trim().parse().map_err(|_| bad())?;
        let last: Ipv4Addr = last.trim().parse().map_err(|_| bad())?;
        if u32::from(first) > u32::from(last) {
            return Err(format!("{s}: the first address comes after the last"));
        }
        Ok(AddressRange { first, last })
    }
}

impl std::fmt::Display for AddressRange {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}-{}", self.first, self.last)
    }
}

impl AddressRange {
    /// True when `ip` is in the range.
    pub fn contains(&self, ip: Ipv4Addr) -> bool {
        (u32::from(self.first)..=u32::from(self.last)).contains(&u32::from(ip))
    }

    /// How many addresses it holds.
    pub fn address_count(&self) -> u64 {
        u64::from(u32::from(self.last) - u32::from(self.first)) + 1
    }

    /// True when the two ranges share an address.
    pub fn overlaps(&self, other: &AddressRange) -> bool {
        u32::from(self.first) <= u32::from(other.last)
            && u32::from(other.first) <= u32::from(self.last)
    }

    /// Why the range cannot be handed out in `subnet`, if it cannot: it must hold only guest
    /// addresses of it (not the network, gateway or broadcast address).
    pub fn check_within(&self, subnet: &Subnet) -> Result<(), String> {
        if subnet.contains(self.first) && subnet.contains(self.last) {
            Ok(())
        } else {
            Err(format!(
                "the address range {self} is not within the guest addresses of {subnet} (from {} on, the gateway is {})",
                Ipv4Addr::from(u32::from(subnet.gateway()) + 1),
                subnet.gateway()
            ))
        }
    }
}

/// Why servers handing addresses from `mine` (in its range, if any) and `theirs` could give
/// two containers one address, or `None`: their subnets do not overlap, or they are one
/// network whose ranges are disjoint.
pub fn address_clash(
    mine: (&Subnet, Option<&AddressRange>),
    theirs: (&Subnet, Option<&AddressRange>),
) -> Option<String> {
    if !mine.0.overlaps(theirs.0) {
        return None;
    }
    match (mine, theirs) {
        ((a, Some(x)), (b, Some(y))) if a == b && !x.overlaps(y) => None,
        ((a, Some(x)), (b, Some(y))) if a == b => Some(format!(
            "the address range {x} overlaps {y} on the shared network {a}"
        )),
        ((a, _), (b, _)) if a == b => Some(format!(
            "both hand out addresses of {a}; servers sharing a network each give a range of their own (--addresses)"
        )),
        ((a, _), (b, _)) => Some(format!("the subnet {a} overlaps {b}")),
    }
}

/// The address of a new guest of a server handing out `subnet` (in `range`, if any), whose
/// guests hold `used`: the one `asked` (a guest moving in keeps its address) when it is in the
/// subnet and free, else the first free host address in range that `avoid` (held on the other
/// servers of a shared network) does not name; `Err` says the pool is exhausted.
pub fn pick_address(
    subnet: &Subnet,
    range: Option<AddressRange>,
    used: &[Ipv4Addr],
    asked: Option<&str>,
    avoid: &[String],
) -> Result<Ipv4Addr, String> {
    let asked = asked
        .and_then(|w| w.parse::<Ipv4Addr>().ok())
        .filter(|ip| subnet.contains(*ip) && !used.contains(ip));
    let avoided: Vec<Ipv4Addr> = avoid.iter().filter_map(|a| a.parse().ok()).collect();
    asked
        .or_else(|| {
            subnet
                .hosts()
                .filter(|ip| range.is_none_or(|r| r.contains(*ip)))
                .find(|ip| !used.contains(ip) && !avoided.contains(ip))
        })
        .ok_or_else(|| match range {
            Some(r) => format!("no free address left in {r}"),
            None => format!("no free address left in {subnet}"),
        })
}

impl Subnet {
    /// The bridge's address: the first host address.
    pub fn gateway(&self) -> Ipv4Addr {
        Ipv4Addr::from(u32::from(self.network) + 1)
    }

    /// Guest addresses: every host address after the gateway.
    pub fn hosts(&self) -> impl Iterator<Item = Ipv4Addr> {
        let base = u32::from(self.network);
        let size = 1u32 << (32 - self.prefix);
        (2..size - 1).map(move |i| Ipv4Addr::from(base + i))
    }

    /// How many guest addresses it has (what `hosts` yields).
    pub fn host_count(&self) -> u64 {
        (1u64 << (32 - self.prefix)) - 3
    }

    /// True when the two subnets share an address.
    pub fn overlaps(&self, other: &Subnet) -> bool {
        let prefix = self.prefix.min(other.prefix);
        let mask = u32::MAX << (32 - prefix);
        u32::from(self.network) & mask == u32::from(other.network) & mask
    }

    /// True when `ip` is a guest address of this subnet.
    pub fn contains(&self, ip: Ipv4Addr) -> bool {
        self.hosts()
            .next()
            .is_some_and(|first| u32::from(ip) >= u32::from(first))
            && u32::from(ip) < u32::from(self.network) + (1u32 << (32 - self.prefix)) - 1
    }
}

#[cfg(test)]
mod tests {
    use super::{AddressRange, Subnet, address_clash, pick_address};
    use std::net::Ipv4Addr;

    #[test]
    fn a_new_address_is_the_one_asked_or_the_first_free_in_range_nobody_holds() {
        let subnet: Subnet = "10.9.0.0/29".parse().unwrap();
        let range: AddressRange = "10.9.0.3-10.9.0.5".parse().unwrap();
        let ip = |s: &str| s.parse::<Ipv4Addr>().unwrap();
        let used = [ip("10.9.0.3")];
        let avoid = ["10.9.0.4".to_string()];
        let pick = |asked| pick_address(&subnet, Some(range), &used, asked, &avoid);
        assert_eq!(pick(None), Ok(ip("10.9.0.5")));
        assert_eq!(
            pick(Some("10.9.0.6")),
            Ok(ip("10.9.0.6")),
            "a mover keeps its own"
        );
        assert_eq!(pick(Some("10.9.0.3")), Ok(ip("10.9.0.5")), "not a used one");
        assert_eq!(
            pick(Some("10.1.0.3")),
            Ok(ip("10.9.0.5")),
            "not another subnet's"
        );
        assert_eq!(
            pick_address(&subnet, None, &used, None, &[]),
            Ok(ip("10.9.0.2"))
        );
        let full = [ip("10.9.0.3"), ip("10.9.0.5")];
        let e = pick_address(&subnet, Some(range), &full, None, &avoid).unwrap_err();
        assert_eq!(e, "no free address left in 10.9.0.3-10.9.0.5");
    }

    #[test]
    fn subnets_and_ranges_clash_when_they_share_an_address() {
        let s = |t: &str| t.parse::<Subnet>().unwrap();
        assert!(s("10.0.4.0/24").overlaps(&s("10.0.4.0/24")));
        assert!(s("10.0.0.0/16").overlaps(&s("10.0.4.0/24")));
        assert!(s("10.0.4.0/24").overlaps(&s("10.0.0.0/16")));
        assert!(!s("10.0.4.0/24").overlaps(&s("10.0.5.0/24")));
        let r = |t: &str| t.parse::<AddressRange>().unwrap();
        assert!(r("10.0.4.10-10.0.4.20").overlaps(&r("10.0.4.20-10.0.4.30")));
        assert!(!r("10.0.4.10-10.0.4.19").overlaps(&r("10.0.4.20-10.0.4.30")));
        assert!(
            "10.0.4.9-10.0.4.2"
                .parse::<AddressRange>()
                .unwrap_err()
                .contains("comes after")
        );
        assert!(
            "10.0.4.9"
                .parse::<AddressRange>()
                .unwrap_err()
                .contains("like")
        );
        assert!(
            r("10.0.4.2-10.0.4.254")
                .check_within(&s("10.0.4.0/24"))
                .is_ok()
        );
        assert!(
            r("10.0.4.1-10.0.4.9")
                .check_within(&s("10.0.4.0/24"))
                .unwrap_err()
                .contains("gateway")
        );
        let net = s("10.0.4.0/24");
        let (a, b) = (r("10.0.4.10-10.0.4.99"), r("10.0.4.100-10.0.4.199"));
        // One network, disjoint ranges: no clash; anything else over shared addresses clashes.
        assert_eq!(address_clash((&net, Some(&a)), (&net, Some(&b))), None);
        assert!(
            address_clash((&net, Some(&a)), (&net, Some(&a)))
                .unwrap()
                .contains("overlaps")
        );
        assert!(
            address_clash((&net, Some(&a)), (&net, None))
                .unwrap()
                .contains("--addresses")
        );
        assert!(
            address_clash((&s("10.0.0.0/16"), None), (&net, Some(&a)))
                .unwrap()
                .contains("10.0.0.0/16 overlaps 10.0.4.0/24")
        );
        assert_eq!(address_clash((&s("10.0.5.0/24"), None), (&net, None)), None);
        assert!(!s("10.0.4.0/23").overlaps(&s("10.0.6.0/24")));
        assert!(s("10.0.4.0/23").overlaps(&s("10.0.5.0/24")));
    }
}
