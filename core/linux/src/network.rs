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

/// What `ensure_bridge` changed on the host, so that a run the core does not accept can give
/// it back.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct BridgeMade {
    /// The bridge did not exist: it was created.
    pub created: bool,
    /// The bridge's MAC address before it was set to `bridge_mac` (when it was another).
    pub mac_before: Option<String>,
    /// The gateway address (`A/P`) it added (none when the bridge had it already).
    pub added: Option<String>,
    /// The bridge was down: it was brought up.
    pub brought_up: bool,
}

/// The gateway address of `subnet` on its bridge, as `A/P`.
pub fn gateway_cidr(subnet: &Subnet) -> String {
    format!("{}/{}", subnet.gateway(), subnet.prefix)
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

/// The IPv4 addresses (`A/P`) `ip -j -4 addr show` lists.
fn addresses_of(out: &str) -> Vec<String> {
    first_of(out)
        .and_then(|l| l.get("addr_info").and_then(|a| a.as_array()).cloned())
        .unwrap_or_default()
        .iter()
        .filter_map(|a| {
            Some(format!(
                "{}/{}",
                a.get("local")?.as_str()?,
                a.get("prefixlen")?.as_u64()?
            ))
        })
        .collect()
}

/// The IPv4 addresses (`A/P`) of interface `name`.
async fn addresses(name: &str) -> Result<Vec<String>, String> {
    Ok(addresses_of(
        &run("ip", &["-j", "-4", "addr", "show", "dev", name]).await?,
    ))
}

/// Creates the bridge with the gateway address and a fixed MAC address (if missing) and turns
/// on forwarding; says what it changed. An existing interface that is not a bridge is refused,
/// unchanged.
pub async fn ensure_bridge(bridge: &str, subnet: &Subnet) -> Result<BridgeMade, String> {
    // Agents sharing a bridge may start at once: what another made meanwhile is no error.
    let meanwhile = |e: &str| e.contains("File exists") || e.contains("already assigned");
    let mut made = BridgeMade::default();
    let shown = match link(bridge).await? {
        Some(l) => l,
        None => {
            match run("ip", &["link", "add", bridge, "type", "bridge"]).await {
                Ok(_) => made.created = true,
                Err(e) if meanwhile(&e) => {}
                Err(e) => return Err(e),
            }
            link(bridge)
                .await?
                .ok_or_else(|| format!("the bridge {bridge} is gone right after it was made"))?
        }
    };
    let kind = kind_of(&shown);
    if kind != "bridge" {
        return Err(not_a_bridge(bridge, &kind));
    }
    let mac = bridge_mac(subnet);
    let before = shown.get("address").and_then(|a| a.as_str()).unwrap_or("");
    if !before.eq_ignore_ascii_case(&mac) {
        run("ip", &["link", "set", bridge, "address", &mac]).await?;
        made.mac_before = Some(before.to_string());
    }
    let gw = gateway_cidr(subnet);
    if !addresses(bridge).await?.contains(&gw) {
        match run("ip", &["addr", "add", &gw, "dev", bridge]).await {
            Ok(_) => made.added = Some(gw),
            Err(e) if meanwhile(&e) => {}
            Err(e) => return Err(e),
        }
    }
    let up = shown
        .get("flags")
        .and_then(|f| f.as_array())
        .is_some_and(|f| f.iter().any(|f| f == "UP"));
    if !up {
        run("ip", &["link", "set", bridge, "up"]).await?;
        made.brought_up = !made.created;
    }
    let _ = std::fs::write("/proc/sys/net/ipv4/ip_forward", "1");
    Ok(made)
}

/// Deletes the bridge.
pub async fn remove_bridge(bridge: &str) {
    let _ = run("ip", &["link", "del", bridge]).await;
}

/// Where an agent records the addresses it put on bridges, in its data directory: bridge name
/// to addresses (`A/P`). An agent removes an address again only when it is recorded there.
pub const BRIDGES_RECORD: &str = "bridges.json";

/// The addresses an agent put on bridges, by bridge.
type Recorded = std::collections::BTreeMap<String, Vec<String>>;

/// The addresses recorded that the agent no longer uses (it uses `gateway` on `bridge`): each
/// with its bridge. Only gateway addresses (the first of their subnet, as the agent gives its
/// bridge) count, whatever else a record may say.
fn stale(recorded: &Recorded, bridge: &str, gateway: &str) -> Vec<(String, String)> {
    recorded
        .iter()
        .flat_map(|(b, addrs)| addrs.iter().map(move |a| (b.clone(), a.clone())))
        .filter(|(b, a)| !(b == bridge && a == gateway))
        .filter(|(_, a)| a.parse::<Subnet>().is_ok_and(|s| gateway_cidr(&s) == *a))
        .collect()
}

/// Whether interface `name` on a bridge is one of this agent's: a guest's veth or tap named by
/// `GuestNet` under `prefix` (prefixes of agents on one machine differ, and names of another
/// prefix's length cannot match).
fn own_port(prefix: &str, name: &str) -> bool {
    name.len() == prefix.len() + 9
        && name.starts_with(prefix)
        && name.ends_with('h')
        && name[prefix.len()..name.len() - 1]
            .bytes()
            .all(|b| b.is_ascii_hexdigit())
}

/// The interfaces on `bridge` that are not this agent's (another agent's guests on a shared
/// bridge, an operator's uplink): while there are any, the agent takes no address off it.
async fn foreign_ports(bridge: &str, prefix: &str) -> Vec<String> {
    let out = run("ip", &["-j", "link", "show", "master", bridge])
        .await
        .unwrap_or_default();
    serde_json::from_str::<Vec<serde_json::Value>>(&out)
        .unwrap_or_default()
        .iter()
        .filter_map(|l| l.get("ifname")?.as_str().map(str::to_string))
        .filter(|n| !own_port(prefix, n))
        .collect()
}

/// The bridge an agent runs its guests on, taken for one run: what the run changed, to give
/// back when the core does not accept it, and the record of the addresses the agent put on
/// bridges (`DATA/bridges.json`).
#[derive(Debug)]
pub struct TakenBridge {
    bridge: String,
    gateway: String,
    prefix: String,
    record: std::path::PathBuf,
    made: BridgeMade,
}

impl TakenBridge {
    /// What this run changed on the host.
    pub fn made(&self) -> &BridgeMade {
        &self.made
    }

    fn read(&self) -> Recorded {
        std::fs::read(&self.record)
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok())
            .unwrap_or_default()
    }

    fn write(&self, recorded: &Recorded) -> Result<(), String> {
        let tmp = self.record.with_extension("json.tmp");
        std::fs::write(
            &tmp,
            serde_json::to_vec_pretty(recorded).expect("serializes"),
        )
        .and_then(|()| std::fs::rename(&tmp, &self.record))
        .map_err(|e| format!("cannot write {}: {e}", self.record.display()))
    }

    fn forget(&self, bridge: &str, address: &str) {
        let mut recorded = self.read();
        if let Some(addrs) = recorded.get_mut(bridge) {
            addrs.retain(|a| a != address);
            if addrs.is_empty() {
                recorded.remove(bridge);
            }
        }
        if let Err(e) = self.write(&recorded) {
            tracing::warn!(error = %e, "cannot update the record of the bridges' addresses");
        }
    }

    /// Removes the addresses this agent recorded on bridges that it no longer uses (from a run
    /// with another `--subnet` or `--bridge`), once this run is accepted: an agent refused
    /// (its containers still hold addresses of the old subnet) leaves them. An address on a
    /// bridge other interfaces than this agent's guests are on stays, with a warning.
    pub async fn drop_stale(&self) {
        for (bridge, address) in stale(&self.read(), &self.bridge, &self.gateway) {
            if link(&bridge).await.ok().flatten().is_none() {
                self.forget(&bridge, &address);
                continue;
            }
            let others = foreign_ports(&bridge, &self.prefix).await;
            if !others.is_empty() {
                tracing::warn!(%bridge, %address, others = %others.join(", "), "an address this agent put on a bridge before is no longer its own, but other interfaces are on that bridge: it stays");
                continue;
            }
            match run("ip", &["addr", "del", &address, "dev", &bridge]).await {
                Ok(_) => {
                    tracing::info!(%bridge, %address, "removed an address this agent put on its bridge in an earlier run");
                    self.forget(&bridge, &address);
                }
                Err(e) if e.contains("not found") || e.contains("Cannot assign") => {
                    self.forget(&bridge, &address)
                }
                Err(e) => {
                    tracing::warn!(%bridge, %address, error = %e, "cannot remove an address this agent no longer uses")
                }
            }
        }
    }

    /// Undoes what this run changed (for a run the core refused, or that failed to start): the
    /// gateway address it added, the MAC address it set, the bridge if it created it (or
    /// brought it up). Not while
    /// other interfaces than this agent's guests are on the bridge (another agent shares it).
    pub async fn give_back(&self) {
        let made = &self.made;
        if *made == BridgeMade::default() {
            return;
        }
        let others = foreign_ports(&self.bridge, &self.prefix).await;
        if !others.is_empty() {
            tracing::warn!(bridge = %self.bridge, others = %others.join(", "), "other interfaces are on the bridge: what this run changed on it stays");
            return;
        }
        if made.created {
            remove_bridge(&self.bridge).await;
        } else {
            if let Some(address) = &made.added {
                let _ = run("ip", &["addr", "del", address, "dev", &self.bridge]).await;
            }
            if let Some(mac) = made.mac_before.as_deref().filter(|m| !m.is_empty()) {
                let _ = run("ip", &["link", "set", &self.bridge, "address", mac]).await;
            }
            if made.brought_up {
                let _ = run("ip", &["link", "set", &self.bridge, "down"]).await;
            }
        }
        if let Some(address) = &made.added {
            self.forget(&self.bridge, address);
        }
    }
}

/// Takes `bridge` for an agent whose data directory is `data_dir`: `ensure_bridge`, and the
/// gateway address it added recorded as the agent's (`BRIDGES_RECORD`). `prefix` names the
/// agent's guests' interfaces.
pub async fn take_bridge(
    data_dir: &std::path::Path,
    bridge: &str,
    subnet: &Subnet,
    prefix: &str,
) -> Result<TakenBridge, String> {
    let made = ensure_bridge(bridge, subnet).await?;
    let taken = TakenBridge {
        bridge: bridge.to_string(),
        gateway: gateway_cidr(subnet),
        prefix: prefix.to_string(),
        record: data_dir.join(BRIDGES_RECORD),
        made,
    };
    if let Some(address) = &taken.made.added {
        let mut recorded = taken.read();
        let addrs = recorded.entry(bridge.to_string()).or_default();
        if !addrs.contains(address) {
            addrs.push(address.clone());
        }
        if let Err(e) = taken.write(&recorded) {
            taken.give_back().await;
            return Err(e);
        }
    }
    Ok(taken)
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
    fn a_bridge_s_addresses_are_read_whole() {
        let out = r#"[{"ifname":"b","addr_info":[{"family":"inet","local":"10.48.0.1","prefixlen":24},{"family":"inet","local":"10.48.0.1","prefixlen":25}]}]"#;
        assert_eq!(addresses_of(out), ["10.48.0.1/24", "10.48.0.1/25"]);
        assert!(addresses_of("[]").is_empty());
    }

    /// Stale: every recorded gateway address but the one in use, on any bridge; nothing that
    /// is not a gateway address, whatever the record says.
    #[test]
    fn stale_addresses_are_the_recorded_gateways_not_in_use() {
        let recorded: Recorded = serde_json::from_str(
            r#"{"br0":["10.210.1.129/25","10.48.0.1/24","10.48.0.7/24"],"old":["10.9.0.1/16"]}"#,
        )
        .unwrap();
        assert_eq!(
            stale(&recorded, "br0", "10.48.0.1/24"),
            [
                ("br0".to_string(), "10.210.1.129/25".to_string()),
                ("old".to_string(), "10.9.0.1/16".to_string())
            ]
        );
        assert!(stale(&Recorded::new(), "br0", "10.48.0.1/24").is_empty());
    }

    /// A guest's interface of this agent is named by `GuestNet`; another prefix's, even one
    /// this prefix begins, is not.
    #[test]
    fn own_ports_are_this_prefix_s_guests() {
        let net = GuestNet::new("c48", "web-1");
        assert!(own_port("c48", &net.host_if));
        assert!(!own_port("c48", &GuestNet::new("c48a", "web-1").host_if));
        assert!(!own_port("c48a", &net.host_if));
        assert!(!own_port("c48", "eth0"));
        assert!(!own_port("c48", "c48zzzzzzzzh"));
    }

    #[test]
    fn a_bridge_has_a_fixed_mac_of_its_gateway() {
        let s: super::Subnet = "10.48.7.0/24".parse().unwrap();
        assert_eq!(super::bridge_mac(&s), "02:48:0a:30:07:01");
    }
}
