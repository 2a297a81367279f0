//! The pod's network, carried into the VM.
//!
//! CNI (run by containerd's CRI plugin, or by podman) prepares a network namespace on the host
//! with the pod's interfaces: typically a veth `eth0` with the pod's address and a default
//! route. A VM cannot join a namespace, so husk carries what it needs across, as Kata's
//! "tcfilter" model does:
//!
//! - every interface with a MAC (not `lo`) gets a tap device beside it in that namespace,
//!   opened by husk; QEMU's virtio-net device takes the tap's fd and the interface's MAC;
//! - tc ingress filters redirect every frame from the interface to the tap and back (`mirred`),
//!   so the namespace's own stack never sees the pod's traffic, though it keeps its addresses;
//! - the guest agent gives the virtio-net device the interface's name, MTU, IPv4 and global
//!   IPv6 addresses, and adds the routes through gateways (`CreateSandbox`).
//!
//! Nothing is left on the host: the taps go when the last fd (QEMU's) closes, the filters with
//! the namespace, which its owner removes. The namespace is read with `ip -j` and changed with
//! `ip` and `tc` (iproute2), run from a thread that entered it.

use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::path::{Path, PathBuf};
use std::process::Command;

use husk_protocols::agent::{NetInterface, NetRoute};

use crate::error::{Error, Result};

/// The end of husk's tap names (`tap0_husk`).
const TAP_SUFFIX: &str = "_husk";

/// One pod interface and the tap that carries it into the VM.
#[derive(Debug)]
pub struct PodInterface {
    /// Name in the pod's namespace (e.g. `eth0`).
    pub name: String,
    /// Its MAC, `aa:bb:cc:dd:ee:ff`: the VM's NIC gets the same.
    pub mac: String,
    /// Its MTU.
    pub mtu: u32,
    /// Its IPv4 addresses, `a.b.c.d/len`.
    pub ipv4: Vec<String>,
    /// Its global IPv6 addresses, `x:y::z/len` (link-local ones the guest makes itself).
    pub ipv6: Vec<String>,
    /// The tap device's name in the namespace.
    pub tap_name: String,
    /// The open tap (IFF_TAP | IFF_NO_PI | IFF_VNET_HDR), for QEMU's `-netdev tap,fd=`.
    pub tap: OwnedFd,
}

/// A route through a gateway, IPv4 or IPv6.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PodRoute {
    /// Destination with prefix length (`0.0.0.0/0`, `::/0` for the default routes).
    pub destination: String,
    /// Gateway address.
    pub gateway: String,
    /// Interface name.
    pub device: String,
}

/// The pod's network as carried into one VM.
#[derive(Debug, Default)]
pub struct PodNetwork {
    /// The interfaces, each with its tap.
    pub interfaces: Vec<PodInterface>,
    /// Routes through gateways.
    pub routes: Vec<PodRoute>,
}

fn net_err(netns: &Path, what: impl std::fmt::Display) -> Error {
    Error::Config(format!(
        "pod network namespace {netns:?}: {what} (pod networking needs iproute2's `ip` and `tc` \
         on the host, and tun, veth ingress and mirred support in its kernel)"
    ))
}

impl PodNetwork {
    /// Reads the interfaces and routes of the network namespace at `netns` and attaches a tap
    /// to each interface. A namespace with only `lo` gives an empty network.
    pub fn attach(netns: &Path) -> Result<PodNetwork> {
        let ns = std::fs::File::open(netns).map_err(|e| net_err(netns, e))?;
        let path = netns.to_path_buf();
        // setns(2) changes the calling thread only: a short-lived thread enters the namespace,
        // and the tools it runs start there too.
        std::thread::scope(|s| {
            s.spawn(move || {
                nix::sched::setns(&ns, nix::sched::CloneFlags::CLONE_NEWNET)
                    .map_err(|e| net_err(&path, format!("entering it: {e}")))?;
                attach_here(&path)
            })
            .join()
            .unwrap_or_else(|_| Err(net_err(netns, "the thread setting it up panicked")))
        })
    }

    /// The NICs for the VM: (tap fd, MAC) per interface.
    pub fn nics(&self) -> Vec<(RawFd, String)> {
        self.interfaces
            .iter()
            .map(|i| (i.tap.as_raw_fd(), i.mac.clone()))
            .collect()
    }

    /// What the guest agent is told (CreateSandbox).
    pub fn to_agent(&self) -> (Vec<NetInterface>, Vec<NetRoute>) {
        let ifs = self
            .interfaces
            .iter()
            .map(|i| {
                let mut n = NetInterface::new();
                n.name = i.name.clone();
                n.mac = i.mac.clone();
                n.mtu = i.mtu;
                n.ipv4 = i.ipv4.clone();
                n.ipv6 = i.ipv6.clone();
                n
            })
            .collect();
        let routes = self
            .routes
            .iter()
            .map(|r| {
                let mut n = NetRoute::new();
                n.destination = r.destination.clone();
                n.gateway = r.gateway.clone();
                n.device = r.device.clone();
                n
            })
            .collect();
        (ifs, routes)
    }
}

/// Runs `prog args` in the current thread's namespaces; its stdout, or an error naming it.
fn run(netns: &Path, prog: &str, args: &[&str]) -> Result<String> {
    let out = Command::new(prog)
        .args(args)
        .output()
        .map_err(|e| net_err(netns, format!("running {prog}: {e}")))?;
    if !out.status.success() {
        return Err(net_err(
            netns,
            format!(
                "`{prog} {}` failed: {}",
                args.join(" "),
                String::from_utf8_lossy(&out.stderr).trim()
            ),
        ));
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// An interface as `ip -j addr` shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
struct SeenInterface {
    name: String,
    mac: String,
    mtu: u32,
    ipv4: Vec<String>,
    ipv6: Vec<String>,
}

/// The interfaces worth carrying from `ip -j addr show`: those with an Ethernet MAC.
fn parse_addrs(json: &str) -> std::result::Result<Vec<SeenInterface>, String> {
    let v: serde_json::Value =
        serde_json::from_str(json).map_err(|e| format!("`ip -j addr` gave bad JSON: {e}"))?;
    let mut out = Vec::new();
    for i in v.as_array().ok_or("`ip -j addr` gave no list")? {
        if i["link_type"] != "ether" {
            continue;
        }
        let name = i["ifname"].as_str().unwrap_or_default().to_string();
        let mac = i["address"].as_str().unwrap_or_default().to_string();
        if name.is_empty() || mac.len() != 17 {
            return Err(format!("interface without a name or MAC: {i}"));
        }
        let addrs = |family: &str| -> Vec<String> {
            i["addr_info"]
                .as_array()
                .map(|a| {
                    a.iter()
                        .filter(|x| x["family"] == family && x["scope"] != "link")
                        .filter_map(|x| {
                            Some(format!("{}/{}", x["local"].as_str()?, x["prefixlen"]))
                        })
                        .collect()
                })
                .unwrap_or_default()
        };
        out.push(SeenInterface {
            name,
            mac,
            mtu: i["mtu"].as_u64().unwrap_or(0) as u32,
            ipv4: addrs("inet"),
            ipv6: addrs("inet6"),
        });
    }
    Ok(out)
}

/// The routes through a gateway from `ip -j -4 route show` or `ip -j -6 route show`
/// (`v6`: which one, for how the default route is written).
fn parse_routes(json: &str, v6: bool) -> std::result::Result<Vec<PodRoute>, String> {
    let v: serde_json::Value =
        serde_json::from_str(json).map_err(|e| format!("`ip -j route` gave bad JSON: {e}"))?;
    let mut out = Vec::new();
    for r in v.as_array().ok_or("`ip -j route` gave no list")? {
        let (Some(dst), Some(gw), Some(dev)) =
            (r["dst"].as_str(), r["gateway"].as_str(), r["dev"].as_str())
        else {
            continue;
        };
        let destination = match dst {
            "default" if v6 => "::/0".to_string(),
            "default" => "0.0.0.0/0".to_string(),
            d if d.contains('/') => d.to_string(),
            d if v6 => format!("{d}/128"),
            d => format!("{d}/32"),
        };
        out.push(PodRoute {
            destination,
            gateway: gw.to_string(),
            device: dev.to_string(),
        });
    }
    Ok(out)
}

/// Opens tap `name` in the current thread's network namespace (created if absent; it goes
/// when its last fd closes).
fn open_tap(netns: &Path, name: &str) -> Result<OwnedFd> {
    let tun = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/net/tun")
        .map_err(|e| net_err(netns, format!("opening /dev/net/tun: {e}")))?;
    // SAFETY: ifreq is plain data; all zeros is valid.
    let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
    for (d, s) in req
        .ifr_name
        .iter_mut()
        .zip(name.bytes().take(libc::IFNAMSIZ - 1))
    {
        *d = s as libc::c_char;
    }
    req.ifr_ifru.ifru_flags =
        (libc::IFF_TAP | libc::IFF_NO_PI | libc::IFF_VNET_HDR) as libc::c_short;
    // SAFETY: TUNSETIFF reads and writes one `struct ifreq`, which `req` is; `tun` is open.
    let rc = unsafe {
        libc::ioctl(
            tun.as_raw_fd(),
            libc::TUNSETIFF as _,
            &mut req as *mut libc::ifreq,
        )
    };
    if rc < 0 {
        return Err(net_err(
            netns,
            format!("creating tap {name}: {}", std::io::Error::last_os_error()),
        ));
    }
    Ok(OwnedFd::from(tun))
}

/// [`PodNetwork::attach`] from inside the namespace.
fn attach_here(netns: &Path) -> Result<PodNetwork> {
    let seen =
        parse_addrs(&run(netns, "ip", &["-j", "addr", "show"])?).map_err(|e| net_err(netns, e))?;
    let mut routes = parse_routes(&run(netns, "ip", &["-j", "-4", "route", "show"])?, false)
        .map_err(|e| net_err(netns, e))?;
    // A namespace without IPv6 (disabled on the host) has no IPv6 routes to read.
    if let Ok(json) = run(netns, "ip", &["-j", "-6", "route", "show"]) {
        routes.extend(parse_routes(&json, true).map_err(|e| net_err(netns, e))?);
    }
    let mut interfaces = Vec::new();
    // Taps of an earlier VM of this pod, still open somewhere, are not pod interfaces.
    let seen = seen.into_iter().filter(|i| !i.name.ends_with(TAP_SUFFIX));
    for (n, i) in seen.enumerate() {
        let tap_name = format!("tap{n}{TAP_SUFFIX}");
        let tap = open_tap(netns, &tap_name)?;
        let mtu = i.mtu.to_string();
        run(
            netns,
            "ip",
            &["link", "set", "dev", &tap_name, "mtu", &mtu, "up"],
        )?;
        for (from, to) in [(&i.name, &tap_name), (&tap_name, &i.name)] {
            run(netns, "tc", &["qdisc", "replace", "dev", from, "ingress"])?;
            run(
                netns,
                "tc",
                &[
                    "filter", "add", "dev", from, "parent", "ffff:", "protocol", "all", "u32",
                    "match", "u8", "0", "0", "action", "mirred", "egress", "redirect", "dev", to,
                ],
            )?;
        }
        interfaces.push(PodInterface {
            name: i.name,
            mac: i.mac,
            mtu: i.mtu,
            ipv4: i.ipv4,
            ipv6: i.ipv6,
            tap_name,
            tap,
        });
    }
    let routes = routes
        .into_iter()
        .filter(|r| interfaces.iter().any(|i| i.name == r.device))
        .collect();
    Ok(PodNetwork { interfaces, routes })
}

/// The network namespace path in an OCI spec (`linux.namespaces[type=network].path`), if the
/// spec joins an existing one: the pod's, made by CNI.
pub fn netns_of_spec(spec: &serde_json::Value) -> Option<PathBuf> {
    spec["linux"]["namespaces"]
        .as_array()?
        .iter()
        .find(|n| n["type"] == "network")
        .and_then(|n| n["path"].as_str())
        .filter(|p| !p.is_empty())
        .map(PathBuf::from)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ip_json_gives_the_ethernet_interfaces_and_gateway_routes() {
        let addrs = r#"[
          {"ifindex":1,"ifname":"lo","flags":["LOOPBACK","UP"],"mtu":65536,"link_type":"loopback",
           "address":"00:00:00:00:00:00","addr_info":[{"family":"inet","local":"127.0.0.1","prefixlen":8}]},
          {"ifindex":3,"link_index":5,"ifname":"eth0","mtu":1450,"link_type":"ether",
           "address":"0a:58:0a:58:4d:02","addr_info":[
             {"family":"inet","local":"10.88.77.2","prefixlen":24},
             {"family":"inet6","local":"fd00:88:77::2","prefixlen":64,"scope":"global"},
             {"family":"inet6","local":"fe80::858:aff:fe58:4d02","prefixlen":64,"scope":"link"}]}]"#;
        let seen = parse_addrs(addrs).unwrap();
        assert_eq!(
            seen,
            vec![SeenInterface {
                name: "eth0".into(),
                mac: "0a:58:0a:58:4d:02".into(),
                mtu: 1450,
                ipv4: vec!["10.88.77.2/24".into()],
                ipv6: vec!["fd00:88:77::2/64".into()],
            }]
        );
        let routes = r#"[
          {"dst":"default","gateway":"10.88.77.1","dev":"eth0","flags":[]},
          {"dst":"10.88.77.0/24","dev":"eth0","protocol":"kernel","scope":"link","prefsrc":"10.88.77.2"},
          {"dst":"10.96.0.10","gateway":"10.88.77.1","dev":"eth0"}]"#;
        assert_eq!(
            parse_routes(routes, false).unwrap(),
            vec![
                PodRoute {
                    destination: "0.0.0.0/0".into(),
                    gateway: "10.88.77.1".into(),
                    device: "eth0".into()
                },
                PodRoute {
                    destination: "10.96.0.10/32".into(),
                    gateway: "10.88.77.1".into(),
                    device: "eth0".into()
                },
            ]
        );
        let routes6 = r#"[
          {"dst":"fd00:88:77::/64","dev":"eth0","protocol":"kernel","metric":256},
          {"dst":"default","gateway":"fd00:88:77::1","dev":"eth0","metric":1024}]"#;
        assert_eq!(
            parse_routes(routes6, true).unwrap(),
            vec![PodRoute {
                destination: "::/0".into(),
                gateway: "fd00:88:77::1".into(),
                device: "eth0".into()
            }]
        );
        assert!(parse_addrs("nope").is_err());
        assert!(parse_addrs(r#"[{"link_type":"ether","ifname":"x","address":"1"}]"#).is_err());
    }

    #[test]
    fn the_netns_path_comes_from_the_spec() {
        let spec = serde_json::json!({"linux": {"namespaces": [
            {"type": "pid"}, {"type": "network", "path": "/var/run/netns/cni-1"}]}});
        assert_eq!(
            netns_of_spec(&spec),
            Some(PathBuf::from("/var/run/netns/cni-1"))
        );
        let own = serde_json::json!({"linux": {"namespaces": [{"type": "network"}]}});
        assert_eq!(netns_of_spec(&own), None);
        assert_eq!(netns_of_spec(&serde_json::json!({})), None);
    }

    #[test]
    fn a_missing_namespace_is_a_clear_error() {
        let e = PodNetwork::attach(Path::new("/nonexistent/netns")).unwrap_err();
        assert!(e.to_string().contains("/nonexistent/netns"), "{e}");
    }
}
