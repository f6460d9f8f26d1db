//! Guest networking: a bridge per agent with the gateway address of its subnet, and for each
//! running guest a network namespace joined to the bridge by a veth pair. Uses iproute2.

use std::net::Ipv4Addr;
use std::process::Stdio;

use tokio::process::Command;

pub use cloud48_driver::address::{AddressRange, Subnet, address_clash, pick_address};

/// The MAC address of the guest at `ip`: derived from the address, so that a guest restarted,
/// replaced or moved at the same address keeps its neighbours' ARP entries right (a new
/// random one left them pointing at the old interface for up to a minute).
pub fn guest_mac(ip: Ipv4Addr) -> String {
    let [a, b, c, d] = ip.octets();
    format!("52:54:{a:02x}:{b:02x}:{c:02x}:{d:02x}")
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

/// The interface `name` as `ip -j -d link show` describes it; `None` when there is none.
/// (Through netlink, so in this process's network namespace: `/sys/class/net` shows the one
/// sysfs was mounted in, not the one an agent started with `nsenter --net` runs in.)
async fn link(name: &str) -> Result<Option<serde_json::Value>, String> {
    match run("ip", &["-j", "-d", "link", "show", "dev", name]).await {
        Ok(out) => Ok(first_of(&out)),
        Err(e) if e.contains("does not exist") => Ok(None),
        Err(e) => Err(e),
    }
}

/// The first object of `ip -j`'s answer (a list).
fn first_of(out: &str) -> Option<serde_json::Value> {
    serde_json::from_str::<Vec<serde_json::Value>>(out)
        .ok()?
        .into_iter()
        .next()
}

/// What kind of interface `ip -j -d link show` describes: its link kind (`bridge`, `veth`,
/// `vlan`, …), else `loopback` or `physical device`.
fn kind_of(link: &serde_json::Value) -> String {
    if let Some(kind) = link.pointer("/linkinfo/info_kind").and_then(|k| k.as_str()) {
        return kind.to_string();
    }
    match link.get("link_type").and_then(|t| t.as_str()) {
        Some("loopback") => "loopback".into(),
        _ => "physical device".into(),
    }
}

/// Why an existing interface that is not a bridge is not taken as one: the driver would give
/// it the bridge's MAC address and the gateway address of its subnet.
fn not_a_bridge(name: &str, kind: &str) -> String {
    format!(
        "--bridge {name} is an existing interface that is not a bridge ({kind}); give the name of a bridge for the agent to own, or a new name and the agent creates it"
    )
}

/// Creates the bridge with the gateway address and a fixed MAC address (if missing) and turns
/// on forwarding. An existing interface that is not a bridge is refused, unchanged.
pub async fn ensure_bridge(bridge: &str, subnet: &Subnet) -> Result<(), String> {
    // Agents sharing a bridge may start at once: what another made meanwhile is no error.
    let made_meanwhile = |r: Result<String, String>| match r {
        Err(e) if e.contains("File exists") || e.contains("already assigned") => Ok(String::new()),
        other => other,
    };
    match link(bridge).await? {
        Some(l) if kind_of(&l) != "bridge" => return Err(not_a_bridge(bridge, &kind_of(&l))),
        Some(_) => {}
        None => {
            made_meanwhile(run("ip", &["link", "add", bridge, "type", "bridge"]).await)?;
        }
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
    use super::*;

    /// An interface's kind: its link kind, else a loopback or a physical device (eth0).
    #[test]
    fn an_interface_s_kind_is_its_link_kind_or_physical() {
        let veth: serde_json::Value = serde_json::from_str(
            r#"{"ifname":"tav0","link_type":"ether","address":"4a:58:af:0c:cb:eb","linkinfo":{"info_kind":"veth"}}"#,
        )
        .unwrap();
        assert_eq!(kind_of(&veth), "veth");
        let eth0: serde_json::Value =
            serde_json::from_str(r#"{"ifname":"eth0","link_type":"ether"}"#).unwrap();
        assert_eq!(kind_of(&eth0), "physical device");
        let lo: serde_json::Value =
            serde_json::from_str(r#"{"ifname":"lo","link_type":"loopback"}"#).unwrap();
        assert_eq!(kind_of(&lo), "loopback");
        assert_eq!(
            not_a_bridge("tav0", "veth"),
            "--bridge tav0 is an existing interface that is not a bridge (veth); give the name of a bridge for the agent to own, or a new name and the agent creates it"
        );
    }

    #[test]
    fn a_bridge_has_a_fixed_mac_of_its_gateway() {
        let s: super::Subnet = "10.48.7.0/24".parse().unwrap();
        assert_eq!(super::bridge_mac(&s), "02:48:0a:30:07:01");
    }
}
