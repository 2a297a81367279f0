//! The pod's network in the guest.
//!
//! The host hands over each interface of the pod's network namespace (name, MAC, MTU, IPv4 and
//! global IPv6 addresses) and the routes through gateways; the VM has one virtio-net device
//! per interface, with that interface's MAC. The agent finds each device by its MAC, renames
//! it, sets its MTU, gives it its IPv4 addresses (the first on the interface, the others as
//! `name:N` aliases, which is what the classic ioctls offer), brings it up, adds its IPv6
//! addresses (`in6_ifreq`), then adds the routes (`rtentry`, `in6_rtmsg`). The request is
//! checked whole before anything is changed, so a bad one fails clearly instead of leaving the
//! network half set up.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
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
    /// IPv6 addresses with prefix lengths.
    pub addrs6: Vec<(Ipv6Addr, u8)>,
}

/// A route through a gateway.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Route {
    /// Destination network.
    pub dest: IpAddr,
    /// Its prefix length.
    pub prefix: u8,
    /// Gateway, of the destination's family.
    pub gateway: IpAddr,
    /// Interface name.
    pub device: String,
}

fn invalid(what: String) -> ContainerError {
    ContainerError::InvalidArgument(what)
}

/// `address/len`, IPv4 or IPv6.
fn parse_cidr(s: &str) -> Result<(IpAddr, u8), ContainerError> {
    let bad = || {
        invalid(format!(
            "bad address/prefix {s:?}: use a.b.c.d/len or x:y::z/len"
        ))
    };
    let (addr, len) = s.split_once('/').ok_or_else(bad)?;
    let addr: IpAddr = addr.parse().map_err(|_| bad())?;
    let len: u8 = len.parse().map_err(|_| bad())?;
    if len > if addr.is_ipv4() { 32 } else { 128 } {
        return Err(bad());
    }
    Ok((addr, len))
}

/// `a.b.c.d/len`.
fn parse_cidr4(s: &str) -> Result<(Ipv4Addr, u8), ContainerError> {
    match parse_cidr(s)? {
        (IpAddr::V4(a), len) => Ok((a, len)),
        _ => Err(invalid(format!("{s:?} is not an IPv4 address/prefix"))),
    }
}

/// `x:y::z/len`, not link-local (the kernel makes those itself).
fn parse_cidr6(s: &str) -> Result<(Ipv6Addr, u8), ContainerError> {
    match parse_cidr(s)? {
        (IpAddr::V6(a), len) if a.segments()[0] & 0xffc0 != 0xfe80 => Ok((a, len)),
        _ => Err(invalid(format!(
            "{s:?} is not a global IPv6 address/prefix"
        ))),
    }
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
        if i.ipv4.len() > 16 || i.ipv6.len() > 16 {
            return Err(invalid(format!(
                "{} IPv4 and {} IPv6 addresses on {:?}",
                i.ipv4.len(),
                i.ipv6.len(),
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
                .map(|a| parse_cidr4(a))
                .collect::<Result<_, _>>()?,
            addrs6: i
                .ipv6
                .iter()
                .map(|a| parse_cidr6(a))
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
        let gateway: IpAddr = r
            .gateway
            .parse()
            .map_err(|_| invalid(format!("bad gateway {:?}", r.gateway)))?;
        if gateway.is_ipv4() != dest.is_ipv4() {
            return Err(invalid(format!(
                "route to {} via {}: families differ",
                r.destination, r.gateway
            )));
        }
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

/// A datagram socket of `family` (`AF_INET`, `AF_INET6`) for the interface ioctls.
fn ioctl_socket(family: libc::c_int) -> Result<OwnedFd, ContainerError> {
    // SAFETY: plain socket(2); the result is checked before it is owned.
    let fd = unsafe { libc::socket(family, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(os_error(&format!("socket(family {family})")));
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

/// One ioctl on `sock` whose argument is a `T`: callers pair each request with its struct
/// (`ifreq`, `in6_ifreq`, `rtentry`, [`In6Rtmsg`]).
fn ioctl<T>(
    sock: &OwnedFd,
    req: libc::c_ulong,
    r: &mut T,
    what: &str,
) -> Result<(), ContainerError> {
    // SAFETY: every request used here reads or writes one struct of the type its caller
    // passes, and `r` is a valid, exclusive pointer to one.
    let rc = unsafe { libc::ioctl(sock.as_raw_fd(), req as _, r as *mut T) };
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
    let sock = ioctl_socket(libc::AF_INET)?;
    let wants_v6 =
        interfaces.iter().any(|i| !i.addrs6.is_empty()) || routes.iter().any(|r| r.dest.is_ipv6());
    let sock6 = if wants_v6 {
        Some(ioctl_socket(libc::AF_INET6)?)
    } else {
        None
    };
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
    let mut renamed = Vec::with_capacity(interfaces.len());
    for (n, i) in interfaces.iter().enumerate() {
        let dev = device_with_mac(sys_class_net, &i.mac).ok_or_else(|| {
            ContainerError::Internal(format!(
                "no network device with MAC {:02x?} for {:?}: the VM has no NIC for it",
                i.mac, i.name
            ))
        })?;
        let rename_it = dev != i.name;
        if rename_it {
            rename(&dev, &format!("husknic{n}"))?;
        }
        renamed.push(rename_it);
    }
    for (n, (i, renamed)) in interfaces.iter().zip(renamed).enumerate() {
        if renamed {
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
        if let Some(sock6) = &sock6 {
            let index = ifindex(&sock, &i.name)?;
            for (addr, prefix) in &i.addrs6 {
                let mut r = libc::in6_ifreq {
                    ifr6_addr: in6_addr(*addr),
                    ifr6_prefixlen: u32::from(*prefix),
                    ifr6_ifindex: index,
                };
                ioctl(
                    sock6,
                    libc::SIOCSIFADDR,
                    &mut r,
                    &format!("address {addr}/{prefix} on {}", i.name),
                )?;
            }
        }
    }
    for r in routes {
        match (r.dest, r.gateway, &sock6) {
            (IpAddr::V4(dest), IpAddr::V4(gateway), _) => {
                add_route(&sock, dest, r.prefix, gateway, &r.device)?
            }
            (IpAddr::V6(dest), IpAddr::V6(gateway), Some(sock6)) => {
                let mut m = In6Rtmsg {
                    dst: in6_addr(dest),
                    src: in6_addr(Ipv6Addr::UNSPECIFIED),
                    gateway: in6_addr(gateway),
                    rtype: 0,
                    dst_len: u16::from(r.prefix),
                    src_len: 0,
                    metric: 1,
                    info: 0,
                    flags: u32::from(libc::RTF_UP | libc::RTF_GATEWAY),
                    ifindex: ifindex(&sock, &r.device)?,
                };
                ioctl(
                    sock6,
                    libc::SIOCADDRT,
                    &mut m,
                    &format!("route {dest}/{} via {gateway} dev {}", r.prefix, r.device),
                )?;
            }
            _ => unreachable!("parse() checked each route's families"),
        }
    }
    Ok(())
}

/// The kernel's `struct in6_rtmsg` (linux/ipv6_route.h), the argument of SIOCADDRT on an
/// `AF_INET6` socket (libc declares it with private fields).
#[repr(C)]
struct In6Rtmsg {
    dst: libc::in6_addr,
    src: libc::in6_addr,
    gateway: libc::in6_addr,
    rtype: u32,
    dst_len: u16,
    src_len: u16,
    metric: u32,
    info: libc::c_ulong,
    flags: u32,
    ifindex: libc::c_int,
}

fn in6_addr(a: Ipv6Addr) -> libc::in6_addr {
    libc::in6_addr {
        s6_addr: a.octets(),
    }
}

/// The index of interface `name`.
fn ifindex(sock: &OwnedFd, name: &str) -> Result<libc::c_int, ContainerError> {
    let mut r = ifreq(name);
    ioctl(
        sock,
        libc::SIOCGIFINDEX,
        &mut r,
        &format!("index of {name}"),
    )?;
    // SAFETY: SIOCGIFINDEX filled the index member of the union.
    Ok(unsafe { r.ifr_ifru.ifru_ifindex })
}

fn add_route(
    sock: &OwnedFd,
    dest: Ipv4Addr,
    prefix: u8,
    gateway: Ipv4Addr,
    device: &str,
) -> Result<(), ContainerError> {
    let mut dev: Vec<libc::c_char> = device.bytes().map(|b| b as libc::c_char).collect();
    dev.push(0);
    // SAFETY: rtentry is plain data plus a device-name pointer; all zeros is valid.
    let mut rt: libc::rtentry = unsafe { std::mem::zeroed() };
    rt.rt_dst = sockaddr_in(dest);
    rt.rt_genmask = sockaddr_in(netmask(prefix));
    rt.rt_gateway = sockaddr_in(gateway);
    rt.rt_flags = libc::RTF_UP | libc::RTF_GATEWAY;
    rt.rt_dev = dev.as_mut_ptr();
    // `rt_dev` points at `dev`, a NUL-terminated name that outlives the call.
    ioctl(
        sock,
        libc::SIOCADDRT,
        &mut rt,
        &format!("route {dest}/{prefix} via {gateway} dev {device}"),
    )
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
    fn ipv6_addresses_and_routes_parse_and_mixed_families_do_not() {
        let mut i = iface("eth0", "0a:58:0a:58:4d:02", &["10.88.77.2/24"]);
        i.ipv6 = vec!["fd00:88:77::2/64".into()];
        let (ifs, rs) = parse(
            std::slice::from_ref(&i),
            &[
                route("0.0.0.0/0", "10.88.77.1", "eth0"),
                route("::/0", "fd00:88:77::1", "eth0"),
            ],
        )
        .unwrap();
        assert_eq!(ifs[0].addrs6, vec![("fd00:88:77::2".parse().unwrap(), 64)]);
        assert_eq!(rs[1].gateway, "fd00:88:77::1".parse::<IpAddr>().unwrap());
        assert!(parse(&[i.clone()], &[route("::/0", "10.88.77.1", "eth0")]).is_err());
        let mut link_local = i.clone();
        link_local.ipv6 = vec!["fe80::858:aff:fe58:4d02/64".into()];
        assert!(
            parse(&[link_local], &[]).is_err(),
            "the kernel makes link-local addresses"
        );
        let mut too_long = i;
        too_long.ipv6 = vec!["fd00::2/129".into()];
        assert!(parse(&[too_long], &[]).is_err());
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
