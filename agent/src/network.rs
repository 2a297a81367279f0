//! The pod's network in the guest.
//!
//! The host hands over each interface of the pod's network namespace (name, MAC, MTU, IPv4
//! addresses) and the routes through gateways; the VM has one virtio-net device per interface,
//! with that interface's MAC. The agent finds each device by its MAC, renames it, sets its MTU,
//! gives it its addresses (the first on the interface, the others as `name:N` aliases, which
//! is what the classic ioctls offer), brings it up, then adds the routes. The request is
//! checked whole before anything is changed, so a bad one fails clearly instead of leaving the
//! network half set up.

use std::net::Ipv4Addr;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::path::Path;

use husk_protocols::agent::{NetInterface, NetRoute};

use crate::container::ContainerError;

/// An interface to set up.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Interface {
    /// Name to give the device.
    pub name: String,
    /// The device's MAC.
    pub mac: [u8; 6],
    /// MTU (0 = leave the device's).
    pub mtu: u32,
    /// IPv4 addresses with prefix lengths.
    pub addrs: Vec<(Ipv4Addr, u8)>,
}

/// A route through a gateway.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Route {
    /// Destination network.
    pub dest: Ipv4Addr,
    /// Its prefix length.
    pub prefix: u8,
    /// Gateway.
    pub gateway: Ipv4Addr,
    /// Interface name.
    pub device: String,
}

fn invalid(what: String) -> ContainerError {
    ContainerError::InvalidArgument(what)
}

/// `a.b.c.d/len`.
fn parse_cidr(s: &str) -> Result<(Ipv4Addr, u8), ContainerError> {
    let bad = || invalid(format!("bad IPv4 address/prefix {s:?}: use a.b.c.d/len"));
    let (addr, len) = s.split_once('/').ok_or_else(bad)?;
    let addr: Ipv4Addr = addr.parse().map_err(|_| bad())?;
    let len: u8 = len.parse().map_err(|_| bad())?;
    if len > 32 {
        return Err(bad());
    }
    Ok((addr, len))
}

fn parse_mac(s: &str) -> Result<[u8; 6], ContainerError> {
    let bad = || invalid(format!("bad MAC address {s:?}"));
    let parts: Vec<&str> = s.split(':').collect();
    if parts.len() != 6 {
        return Err(bad());
    }
    let mut mac = [0u8; 6];
    for (b, p) in mac.iter_mut().zip(parts) {
        if p.len() != 2 {
            return Err(bad());
        }
        *b = u8::from_str_radix(p, 16).map_err(|_| bad())?;
    }
    Ok(mac)
}

/// An interface name the kernel takes: 1–12 bytes (room for a `:N` alias suffix), no `/`,
/// `:` or whitespace, not `.` or `..`.
fn check_name(name: &str) -> Result<(), ContainerError> {
    let ok = (1..=12).contains(&name.len())
        && name != "."
        && name != ".."
        && name
            .bytes()
            .all(|b| b.is_ascii_graphic() && b != b'/' && b != b':');
    if ok {
        Ok(())
    } else {
        Err(invalid(format!("bad interface name {name:?}")))
    }
}

/// Checks the request's interfaces and routes; nothing is changed yet.
pub fn parse(
    interfaces: &[NetInterface],
    routes: &[NetRoute],
) -> Result<(Vec<Interface>, Vec<Route>), ContainerError> {
    if interfaces.len() > 16 || routes.len() > 256 {
        return Err(invalid(format!(
            "{} interfaces and {} routes: at most 16 and 256",
            interfaces.len(),
            routes.len()
        )));
    }
    let mut out = Vec::new();
    for i in interfaces {
        check_name(&i.name)?;
        if i.mtu != 0 && !(68..=65535).contains(&i.mtu) {
            return Err(invalid(format!("MTU {} of {:?}", i.mtu, i.name)));
        }
        if i.ipv4.len() > 16 {
            return Err(invalid(format!(
                "{} addresses on {:?}",
                i.ipv4.len(),
                i.name
            )));
        }
        let iface = Interface {
            name: i.name.clone(),
            mac: parse_mac(&i.mac)?,
            mtu: i.mtu,
            addrs: i
                .ipv4
                .iter()
                .map(|a| parse_cidr(a))
                .collect::<Result<_, _>>()?,
        };
        if out
            .iter()
            .any(|o: &Interface| o.name == iface.name || o.mac == iface.mac)
        {
            return Err(invalid(format!(
                "interface {:?} or its MAC given twice",
                i.name
            )));
        }
        out.push(iface);
    }
    let mut rs = Vec::new();
    for r in routes {
        let (dest, prefix) = parse_cidr(&r.destination)?;
        let gateway: Ipv4Addr = r
            .gateway
            .parse()
            .map_err(|_| invalid(format!("bad gateway {:?}", r.gateway)))?;
        if !out.iter().any(|i| i.name == r.device) {
            return Err(invalid(format!(
                "route to {} via unknown interface {:?}",
                r.destination, r.device
            )));
        }
        rs.push(Route {
            dest,
            prefix,
            gateway,
            device: r.device.clone(),
        });
    }
    Ok((out, rs))
}

/// The network device (not `lo`) whose MAC is `mac`, from `/sys/class/net`.
fn device_with_mac(sys_class_net: &Path, mac: &[u8; 6]) -> Option<String> {
    let want = mac
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":");
    std::fs::read_dir(sys_class_net)
        .ok()?
        .flatten()
        .find(|e| {
            e.file_name() != "lo"
                && std::fs::read_to_string(e.path().join("address"))
                    .is_ok_and(|a| a.trim().eq_ignore_ascii_case(&want))
        })
        .map(|e| e.file_name().to_string_lossy().into_owned())
}

/// An `AF_INET` datagram socket for the interface ioctls.
fn ioctl_socket() -> Result<OwnedFd, ContainerError> {
    // SAFETY: plain socket(2); the result is checked before it is owned.
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(os_error("socket(AF_INET)"));
    }
    // SAFETY: `fd` is a new descriptor nobody else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

fn os_error(what: &str) -> ContainerError {
    ContainerError::Internal(format!("{what}: {}", std::io::Error::last_os_error()))
}

fn ifreq(name: &str) -> libc::ifreq {
    // SAFETY: ifreq is plain data (a name and a union of plain data); all zeros is valid.
    let mut r: libc::ifreq = unsafe { std::mem::zeroed() };
    for (d, s) in r
        .ifr_name
        .iter_mut()
        .zip(name.bytes().take(libc::IFNAMSIZ - 1))
    {
        *d = s as libc::c_char;
    }
    r
}

fn sockaddr_in(addr: Ipv4Addr) -> libc::sockaddr {
    let sin = libc::sockaddr_in {
        sin_family: libc::AF_INET as libc::sa_family_t,
        sin_port: 0,
        sin_addr: libc::in_addr {
            s_addr: u32::from(addr).to_be(),
        },
        sin_zero: [0; 8],
    };
    // SAFETY: sockaddr_in and sockaddr are both 16 bytes of plain data; this is how the socket
    // API passes an IPv4 address as a generic sockaddr.
    unsafe { std::mem::transmute::<libc::sockaddr_in, libc::sockaddr>(sin) }
}

fn netmask(prefix: u8) -> Ipv4Addr {
    Ipv4Addr::from(u32::MAX.checked_shl(32 - u32::from(prefix)).unwrap_or(0))
}

/// One interface ioctl on `sock`.
fn ioctl(
    sock: &OwnedFd,
    req: libc::c_ulong,
    r: &mut libc::ifreq,
    what: &str,
) -> Result<(), ContainerError> {
    // SAFETY: every request used here reads or writes one `struct ifreq`, which `r` is.
    let rc = unsafe { libc::ioctl(sock.as_raw_fd(), req as _, r as *mut libc::ifreq) };
    if rc < 0 {
        return Err(os_error(what));
    }
    Ok(())
}

fn set_up(sock: &OwnedFd, name: &str) -> Result<(), ContainerError> {
    let mut r = ifreq(name);
    ioctl(
        sock,
        libc::SIOCGIFFLAGS,
        &mut r,
        &format!("flags of {name}"),
    )?;
    // SAFETY: SIOCGIFFLAGS filled the flags member of the union.
    let flags = unsafe { r.ifr_ifru.ifru_flags };
    r.ifr_ifru.ifru_flags = flags | libc::IFF_UP as libc::c_short;
    ioctl(
        sock,
        libc::SIOCSIFFLAGS,
        &mut r,
        &format!("bringing {name} up"),
    )
}

/// Brings `lo` up, then sets up every interface and route. Fails naming the first step that
/// failed; a device missing for a MAC means the VM was started without it.
pub fn configure(interfaces: &[Interface], routes: &[Route]) -> Result<(), ContainerError> {
    configure_in(Path::new("/sys/class/net"), interfaces, routes)
}

fn configure_in(
    sys_class_net: &Path,
    interfaces: &[Interface],
    routes: &[Route],
) -> Result<(), ContainerError> {
    let sock = ioctl_socket()?;
    set_up(&sock, "lo")?;
    let rename = |from: &str, to: &str| {
        let mut r = ifreq(from);
        r.ifr_ifru.ifru_newname = ifreq(to).ifr_name;
        ioctl(
            &sock,
            libc::SIOCSIFNAME,
            &mut r,
            &format!("renaming {from} to {to}"),
        )
    };
    // Every device first gets a name no pod interface has, so that giving one its name never
    // collides with another that the kernel happened to name so (eth0 and eth1 swapped).
    for (n, i) in interfaces.iter().enumerate() {
        let dev = device_with_mac(sys_class_net, &i.mac).ok_or_else(|| {
            ContainerError::Internal(format!(
                "no network device with MAC {:02x?} for {:?}: the VM has no NIC for it",
                i.mac, i.name
            ))
        })?;
        if dev != i.name {
            rename(&dev, &format!("husknic{n}"))?;
        }
    }
    for (n, i) in interfaces.iter().enumerate() {
        if device_with_mac(sys_class_net, &i.mac).as_deref() != Some(i.name.as_str()) {
            rename(&format!("husknic{n}"), &i.name)?;
        }
        if i.mtu != 0 {
            let mut r = ifreq(&i.name);
            r.ifr_ifru.ifru_mtu = i.mtu as libc::c_int;
            ioctl(
                &sock,
                libc::SIOCSIFMTU,
                &mut r,
                &format!("MTU of {}", i.name),
            )?;
        }
        for (n, (addr, prefix)) in i.addrs.iter().enumerate() {
            let label = if n == 0 {
                i.name.clone()
            } else {
                format!("{}:{n}", i.name)
            };
            let mut r = ifreq(&label);
            r.ifr_ifru.ifru_addr = sockaddr_in(*addr);
            ioctl(
                &sock,
                libc::SIOCSIFADDR,
                &mut r,
                &format!("address {addr} on {label}"),
            )?;
            let mut r = ifreq(&label);
            r.ifr_ifru.ifru_netmask = sockaddr_in(netmask(*prefix));
            ioctl(
                &sock,
                libc::SIOCSIFNETMASK,
                &mut r,
                &format!("netmask /{prefix} on {label}"),
            )?;
        }
        set_up(&sock, &i.name)?;
    }
    for r in routes {
        add_route(&sock, r)?;
    }
    Ok(())
}

fn add_route(sock: &OwnedFd, r: &Route) -> Result<(), ContainerError> {
    let mut dev: Vec<libc::c_char> = r.device.bytes().map(|b| b as libc::c_char).collect();
    dev.push(0);
    // SAFETY: rtentry is plain data plus a device-name pointer; all zeros is valid.
    let mut rt: libc::rtentry = unsafe { std::mem::zeroed() };
    rt.rt_dst = sockaddr_in(r.dest);
    rt.rt_genmask = sockaddr_in(netmask(r.prefix));
    rt.rt_gateway = sockaddr_in(r.gateway);
    rt.rt_flags = libc::RTF_UP | libc::RTF_GATEWAY;
    rt.rt_dev = dev.as_mut_ptr();
    // SAFETY: SIOCADDRT reads one `struct rtentry`; `rt_dev` points at `dev`, a NUL-terminated
    // name that outlives the call.
    let rc = unsafe {
        libc::ioctl(
            sock.as_raw_fd(),
            libc::SIOCADDRT as _,
            &mut rt as *mut libc::rtentry,
        )
    };
    if rc < 0 {
        return Err(os_error(&format!(
            "route {}/{} via {} dev {}",
            r.dest, r.prefix, r.gateway, r.device
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn iface(name: &str, mac: &str, ipv4: &[&str]) -> NetInterface {
        let mut i = NetInterface::new();
        i.name = name.into();
        i.mac = mac.into();
        i.mtu = 1500;
        i.ipv4 = ipv4.iter().map(|s| s.to_string()).collect();
        i
    }

    fn route(dest: &str, gw: &str, dev: &str) -> NetRoute {
        let mut r = NetRoute::new();
        r.destination = dest.into();
        r.gateway = gw.into();
        r.device = dev.into();
        r
    }

    #[test]
    fn a_pod_interface_and_its_default_route_parse() {
        let (i, r) = parse(
            &[iface("eth0", "0a:58:0A:58:4d:02", &["10.88.77.2/24"])],
            &[route("0.0.0.0/0", "10.88.77.1", "eth0")],
        )
        .unwrap();
        assert_eq!(i[0].mac, [0x0a, 0x58, 0x0a, 0x58, 0x4d, 0x02]);
        assert_eq!(i[0].addrs, vec![(Ipv4Addr::new(10, 88, 77, 2), 24)]);
        assert_eq!(r[0].prefix, 0);
        assert_eq!(r[0].gateway, Ipv4Addr::new(10, 88, 77, 1));
    }

    #[test]
    fn bad_requests_fail_before_anything_changes() {
        let ok = iface("eth0", "0a:58:0a:58:4d:02", &["10.0.0.2/24"]);
        for bad in [
            iface("eth0", "0a:58:0a:58:4d", &[]),
            iface("eth0", "zz:58:0a:58:4d:02", &[]),
            iface("eth0", "0a:58:0a:58:4d:02", &["10.0.0.2"]),
            iface("eth0", "0a:58:0a:58:4d:02", &["10.0.0.2/33"]),
            iface("eth0", "0a:58:0a:58:4d:02", &["fe80::1/64"]),
            iface("../x", "0a:58:0a:58:4d:02", &[]),
            iface("eth0:1", "0a:58:0a:58:4d:02", &[]),
            iface("averyveryverylongname", "0a:58:0a:58:4d:02", &[]),
            iface("", "0a:58:0a:58:4d:02", &[]),
        ] {
            assert!(parse(std::slice::from_ref(&bad), &[]).is_err(), "{bad:?}");
        }
        assert!(parse(&[ok.clone(), ok.clone()], &[]).is_err(), "twice");
        assert!(parse(
            std::slice::from_ref(&ok),
            &[route("0.0.0.0/0", "10.0.0.1", "eth1")]
        )
        .is_err());
        assert!(parse(
            std::slice::from_ref(&ok),
            &[route("0.0.0.0/0", "gw", "eth0")]
        )
        .is_err());
        let mut huge = ok;
        huge.mtu = 10;
        assert!(parse(&[huge], &[]).is_err());
    }

    #[test]
    fn netmasks_from_prefix_lengths() {
        assert_eq!(netmask(0), Ipv4Addr::new(0, 0, 0, 0));
        assert_eq!(netmask(24), Ipv4Addr::new(255, 255, 255, 0));
        assert_eq!(netmask(32), Ipv4Addr::new(255, 255, 255, 255));
    }

    #[test]
    fn devices_are_found_by_mac_in_sysfs() {
        let d = tempfile::tempdir().unwrap();
        for (name, mac) in [("lo", "00:00:00:00:00:00"), ("eth7", "0a:58:0a:58:4d:02")] {
            std::fs::create_dir(d.path().join(name)).unwrap();
            std::fs::write(d.path().join(name).join("address"), format!("{mac}\n")).unwrap();
        }
        let mac = parse_mac("0A:58:0A:58:4D:02").unwrap();
        assert_eq!(device_with_mac(d.path(), &mac).as_deref(), Some("eth7"));
        assert_eq!(
            device_with_mac(d.path(), &[0; 6]),
            None,
            "lo is never a pod device"
        );
    }
}
