//! Guest networking: a bridge per agent with the gateway address of its subnet, and for each
//! running guest a network namespace joined to the bridge by a veth pair. Uses iproute2.

use std::net::Ipv4Addr;
use std::process::Stdio;

use tokio::process::Command;

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

/// The MAC address of the guest at `ip`: derived from the address, so that a guest restarted,
/// replaced or moved at the same address keeps its neighbours' ARP entries right (a new
/// random one left them pointing at the old interface for up to a minute).
pub fn guest_mac(ip: Ipv4Addr) -> String {
    let [a, b, c, d] = ip.octets();
    format!("52:54:{a:02x}:{b:02x}:{c:02x}:{d:02x}")
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

/// Runs a program and returns its standard output, or an error with its standard error.
pub async fn run(program: &str, args: &[&str]) -> Result<String, String> {
    let out = Command::new(program)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .await
        .map_err(|e| match e.kind() {
            std::io::ErrorKind::NotFound => format!(
                "{program} is not installed on this server (Debian: apt-get install {})",
                package_of(program)
            ),
            _ => format!("cannot run {program}: {e}"),
        })?;
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    } else {
        Err(failed(
            &format!("{program} {}", args.join(" ")),
            &out.stderr,
        ))
    }
}

/// What a failed command said, with a hint when privileges are missing.
fn failed(what: &str, stderr: &[u8]) -> String {
    let err = String::from_utf8_lossy(stderr);
    let hint = if err.contains("Operation not permitted") {
        " (the linux driver must run as root)"
    } else {
        ""
    };
    format!("{what} failed: {}{hint}", err.trim())
}

/// The Debian package that carries a program the driver uses.
pub fn package_of(program: &str) -> &str {
    match program {
        "ip" => "iproute2",
        "unshare" | "nsenter" | "mount" => "util-linux",
        "nginx" => "nginx-light",
        other => other,
    }
}

/// Names of one guest's network objects, derived from its id.
#[derive(Debug, Clone)]
pub struct GuestNet {
    /// Network namespace.
    pub netns: String,
    /// Host side of the veth pair (on the bridge).
    pub host_if: String,
    /// Guest side before it is renamed `eth0` in the namespace.
    pub peer_if: String,
}

impl GuestNet {
    /// Names for `guest` under the driver's name prefix (at most 5 characters).
    pub fn new(prefix: &str, guest: &str) -> GuestNet {
        use sha2::{Digest, Sha256};
        let h = hex::encode(&Sha256::digest(guest.as_bytes())[..4]);
        GuestNet {
            netns: format!("{prefix}-{h}"),
            host_if: format!("{prefix}{h}h"),
            peer_if: format!("{prefix}{h}g"),
        }
    }
}

/// The bridge's own MAC address: fixed, derived from its gateway address. A bridge without
/// one takes the lowest of its ports' addresses and changes it as ports come and go, and a
/// guest whose ARP entry still names the old one loses its traffic to the host until the entry
/// expires (seen when a VM's tap left the bridge after a live migration).
pub fn bridge_mac(subnet: &Subnet) -> String {
    let [a, b, c, d] = subnet.gateway().octets();
    format!("02:48:{a:02x}:{b:02x}:{c:02x}:{d:02x}")
}

/// Creates the bridge with the gateway address and a fixed MAC address (if missing) and turns
/// on forwarding.
pub async fn ensure_bridge(bridge: &str, subnet: &Subnet) -> Result<(), String> {
    // Agents sharing a bridge may start at once: what another made meanwhile is no error.
    let made_meanwhile = |r: Result<String, String>| match r {
        Err(e) if e.contains("File exists") || e.contains("already assigned") => Ok(String::new()),
        other => other,
    };
    if run("ip", &["link", "show", bridge]).await.is_err() {
        made_meanwhile(run("ip", &["link", "add", bridge, "type", "bridge"]).await)?;
    }
    let mac = bridge_mac(subnet);
    let shown = run("ip", &["link", "show", bridge]).await?;
    if !shown.contains(&mac) {
        run("ip", &["link", "set", bridge, "address", &mac]).await?;
    }
    let addrs = run("ip", &["-4", "addr", "show", "dev", bridge]).await?;
    let gw = format!("{}/{}", subnet.gateway(), subnet.prefix);
    if !addrs.contains(&format!("inet {gw}")) {
        made_meanwhile(run("ip", &["addr", "add", &gw, "dev", bridge]).await)?;
    }
    run("ip", &["link", "set", bridge, "up"]).await?;
    let _ = std::fs::write("/proc/sys/net/ipv4/ip_forward", "1");
    Ok(())
}

/// Deletes the bridge.
pub async fn remove_bridge(bridge: &str) {
    let _ = run("ip", &["link", "del", bridge]).await;
}

/// Runs `ip -batch -` (optionally inside a namespace) with one command per line.
async fn batch(netns: Option<&str>, lines: &[String]) -> Result<(), String> {
    use tokio::io::AsyncWriteExt;
    let mut cmd = Command::new("ip");
    if let Some(ns) = netns {
        cmd.args(["-n", ns]);
    }
    let mut child = cmd
        .args(["-batch", "-"])
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| format!("cannot run ip (Debian: apt-get install iproute2): {e}"))?;
    let mut stdin = child.stdin.take().expect("piped");
    stdin
        .write_all(lines.join("\n").as_bytes())
        .await
        .map_err(|e| e.to_string())?;
    drop(stdin);
    let out = child.wait_with_output().await.map_err(|e| e.to_string())?;
    if out.status.success() {
        return Ok(());
    }
    Err(failed(
        &format!("ip -batch ({})", lines.join("; ")),
        &out.stderr,
    ))
}

/// Creates the guest's namespace and veth pair with `ip` on the bridge (after removing leftovers).
pub async fn attach(
    net: &GuestNet,
    bridge: &str,
    subnet: &Subnet,
    ip: Ipv4Addr,
) -> Result<(), String> {
    // /proc/net shows this process's network namespace (unlike /sys under nsenter).
    let interfaces = tokio::fs::read_to_string("/proc/net/dev")
        .await
        .unwrap_or_default();
    if interfaces.contains(&format!("{}:", net.host_if))
        || std::path::Path::new(&format!("/run/netns/{}", net.netns)).exists()
    {
        detach(net).await;
    }
    run("ip", &["netns", "add", &net.netns]).await?;
    wire(net, bridge, subnet, ip).await
}

/// Names the network namespace of process `pid` (a container runc created with a new, empty
/// one) as the guest's, and joins it to the bridge like `attach` does.
pub async fn attach_pid(
    net: &GuestNet,
    bridge: &str,
    subnet: &Subnet,
    ip: Ipv4Addr,
    pid: i32,
) -> Result<(), String> {
    detach(net).await;
    run("ip", &["netns", "attach", &net.netns, &pid.to_string()]).await?;
    wire(net, bridge, subnet, ip).await
}

/// The veth pair between the bridge and the guest's named namespace, with its address and
/// default route; removes both on failure.
async fn wire(net: &GuestNet, bridge: &str, subnet: &Subnet, ip: Ipv4Addr) -> Result<(), String> {
    let host = [
        format!(
            "link add {} type veth peer name {}",
            net.host_if, net.peer_if
        ),
        format!("link set {} master {bridge} up", net.host_if),
        format!("link set {} netns {}", net.peer_if, net.netns),
    ];
    let inside = [
        format!("link set {} name eth0", net.peer_if),
        format!("link set eth0 address {}", guest_mac(ip)),
        format!("addr add {ip}/{} dev eth0", subnet.prefix),
        "link set eth0 up".to_string(),
        "link set lo up".to_string(),
        format!("route add default via {}", subnet.gateway()),
    ];
    let made = match batch(None, &host).await {
        Ok(()) => batch(Some(&net.netns), &inside).await,
        Err(e) => Err(e),
    };
    if made.is_err() {
        detach(net).await;
    }
    made
}

/// Removes the guest's namespace and veth pair; missing ones are fine.
pub async fn detach(net: &GuestNet) {
    let _ = run("ip", &["link", "del", &net.host_if]).await;
    let _ = run("ip", &["netns", "del", &net.netns]).await;
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
    fn a_bridge_has_a_fixed_mac_of_its_gateway() {
        let s: super::Subnet = "10.48.7.0/24".parse().unwrap();
        assert_eq!(super::bridge_mac(&s), "02:48:0a:30:07:01");
    }

    #[test]
    fn subnets_and_ranges_clash_when_they_share_an_address() {
        let s = |t: &str| t.parse::<super::Subnet>().unwrap();
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
