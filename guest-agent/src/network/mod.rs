//! The guest's network interfaces (`accordion.agent.v1.Network`): the host found what CNI set up
//! in the pod's network namespace and gave each pod interface a virtio-net twin with the same MAC;
//! this configures the twin identically (MTU, name, addresses, routes).
//!
//! Everything in a request is checked before the first netlink call, so a malformed request
//! changes nothing.

mod netlink;
mod service;

use std::net::IpAddr;

use accordion_proto::agent::v1 as pb;

pub use service::NetworkService;

/// Longest interface name (IFNAMSIZ - 1).
const MAX_NAME: usize = 15;

/// A route to install.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RouteSpec {
    pub destination: IpAddr,
    pub prefix_len: u8,
    pub gateway: Option<IpAddr>,
}

/// One interface to configure, checked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InterfaceSpec {
    pub mac: [u8; 6],
    pub mtu: u32,
    /// The name to give it; None keeps the kernel's.
    pub name: Option<String>,
    pub addresses: Vec<(IpAddr, u8)>,
    pub routes: Vec<RouteSpec>,
}

/// "aa:bb:cc:dd:ee:ff" → bytes.
pub fn parse_mac(s: &str) -> Option<[u8; 6]> {
    let mut mac = [0u8; 6];
    let mut parts = s.split(':');
    for byte in &mut mac {
        let p = parts.next()?;
        if p.len() != 2 {
            return None;
        }
        *byte = u8::from_str_radix(p, 16).ok()?;
    }
    parts.next().is_none().then_some(mac)
}

/// bytes → "aa:bb:cc:dd:ee:ff".
pub fn format_mac(mac: &[u8]) -> String {
    mac.iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}

fn max_prefix(ip: &IpAddr) -> u8 {
    if ip.is_ipv4() {
        32
    } else {
        128
    }
}

/// "10.88.0.0/16" → (address, prefix).
fn parse_prefix(s: &str) -> Option<(IpAddr, u8)> {
    let (addr, len) = s.split_once('/')?;
    let addr: IpAddr = addr.parse().ok()?;
    let len: u8 = len.parse().ok()?;
    (len <= max_prefix(&addr)).then_some((addr, len))
}

/// Checks one interface of a Configure request.
pub fn check(iface: &pb::Interface) -> Result<InterfaceSpec, String> {
    let mac = parse_mac(&iface.mac).ok_or_else(|| format!("invalid MAC {:?}", iface.mac))?;
    let what = format_mac(&mac);
    if !(68..=65535).contains(&iface.mtu) {
        return Err(format!("{what}: MTU {} is not 68 to 65535", iface.mtu));
    }
    let name = match iface.name.as_str() {
        "" => None,
        n if n.len() <= MAX_NAME
            && n != "lo"
            && n.bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b)) =>
        {
            Some(n.to_string())
        }
        n => return Err(format!("{what}: invalid interface name {n:?}")),
    };
    let mut addresses = Vec::new();
    for a in &iface.addresses {
        let ip: IpAddr = a
            .address
            .parse()
            .map_err(|_| format!("{what}: invalid address {:?}", a.address))?;
        let len = u8::try_from(a.prefix_len)
            .ok()
            .filter(|l| *l <= max_prefix(&ip))
            .ok_or_else(|| format!("{what}: invalid prefix length {} for {ip}", a.prefix_len))?;
        addresses.push((ip, len));
    }
    let mut routes = Vec::new();
    for r in &iface.routes {
        let (destination, prefix_len) = parse_prefix(&r.destination)
            .ok_or_else(|| format!("{what}: invalid route destination {:?}", r.destination))?;
        let gateway = match r.gateway.as_str() {
            "" => None,
            g => {
                let gw: IpAddr = g
                    .parse()
                    .map_err(|_| format!("{what}: invalid gateway {g:?}"))?;
                if gw.is_ipv4() != destination.is_ipv4() {
                    return Err(format!(
                        "{what}: gateway {gw} is not of the family of {}",
                        r.destination
                    ));
                }
                Some(gw)
            }
        };
        routes.push(RouteSpec {
            destination,
            prefix_len,
            gateway,
        });
    }
    Ok(InterfaceSpec {
        mac,
        mtu: iface.mtu,
        name,
        addresses,
        routes,
    })
}

/// Whether `gw` lies in one of `addresses`' subnets (else the route needs `onlink`).
pub fn gateway_on_link(gw: &IpAddr, addresses: &[(IpAddr, u8)]) -> bool {
    addresses.iter().any(|(a, len)| match (a, gw) {
        (IpAddr::V4(a), IpAddr::V4(g)) => {
            let mask = u32::MAX.checked_shl(32 - u32::from(*len)).unwrap_or(0);
            u32::from(*a) & mask == u32::from(*g) & mask
        }
        (IpAddr::V6(a), IpAddr::V6(g)) => {
            let mask = u128::MAX.checked_shl(128 - u32::from(*len)).unwrap_or(0);
            u128::from(*a) & mask == u128::from(*g) & mask
        }
        _ => false,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn iface() -> pb::Interface {
        pb::Interface {
            mac: "02:42:0a:58:00:05".into(),
            mtu: 1500,
            addresses: vec![
                pb::IpAddress {
                    address: "10.88.0.5".into(),
                    prefix_len: 16,
                },
                pb::IpAddress {
                    address: "fd00::5".into(),
                    prefix_len: 64,
                },
            ],
            routes: vec![
                pb::Route {
                    destination: "0.0.0.0/0".into(),
                    gateway: "10.88.0.1".into(),
                },
                pb::Route {
                    destination: "::/0".into(),
                    gateway: "fd00::1".into(),
                },
            ],
            name: "eth0".into(),
        }
    }

    #[test]
    fn test_a_cni_interface_is_checked_into_its_spec() {
        let spec = check(&iface()).unwrap();
        assert_eq!(spec.mac, [0x02, 0x42, 0x0a, 0x58, 0, 5]);
        assert_eq!(spec.name.as_deref(), Some("eth0"));
        assert_eq!(spec.addresses.len(), 2);
        assert_eq!(spec.routes[0].prefix_len, 0);
        assert_eq!(spec.routes[1].gateway, Some("fd00::1".parse().unwrap()));
    }

    /// Breaks one field of a good interface.
    type Breakage = Box<dyn Fn(&mut pb::Interface)>;

    #[test]
    fn test_malformed_fields_are_errors_naming_the_field() {
        let cases: Vec<(Breakage, &str)> = vec![
            (Box::new(|i| i.mac = "02:42:0a:58:00".into()), "invalid MAC"),
            (
                Box::new(|i| i.mac = "zz:42:0a:58:00:05".into()),
                "invalid MAC",
            ),
            (Box::new(|i| i.mtu = 20), "MTU 20"),
            (
                Box::new(|i| i.name = "../x".into()),
                "invalid interface name",
            ),
            (Box::new(|i| i.name = "lo".into()), "invalid interface name"),
            (
                Box::new(|i| i.addresses[0].address = "10.88.0".into()),
                "invalid address",
            ),
            (
                Box::new(|i| i.addresses[0].prefix_len = 33),
                "invalid prefix length 33",
            ),
            (
                Box::new(|i| i.routes[0].destination = "0.0.0.0".into()),
                "invalid route destination",
            ),
            (
                Box::new(|i| i.routes[0].destination = "::/129".into()),
                "invalid route destination",
            ),
            (
                Box::new(|i| i.routes[0].gateway = "fd00::1".into()),
                "not of the family",
            ),
        ];
        for (break_it, want) in cases {
            let mut i = iface();
            break_it(&mut i);
            let err = check(&i).unwrap_err();
            assert!(err.contains(want), "{err} (wanted {want})");
        }
    }

    #[test]
    fn test_mac_round_trip() {
        let mac = parse_mac("02:AC:c0:00:00:02").unwrap();
        assert_eq!(format_mac(&mac), "02:ac:c0:00:00:02");
        assert_eq!(parse_mac("02:ac:c0:00:00:02:03"), None);
        assert_eq!(parse_mac(""), None);
    }

    #[test]
    fn test_gateway_in_a_subnet_or_not() {
        let addrs = [
            ("10.88.0.5".parse().unwrap(), 16u8),
            ("fd00::5".parse().unwrap(), 64),
        ];
        assert!(gateway_on_link(&"10.88.0.1".parse().unwrap(), &addrs));
        assert!(!gateway_on_link(&"169.254.1.1".parse().unwrap(), &addrs));
        assert!(gateway_on_link(&"fd00::1".parse().unwrap(), &addrs));
        assert!(!gateway_on_link(&"fd01::1".parse().unwrap(), &addrs));
        // A /32 address covers only itself; a /0 covers everything.
        assert!(!gateway_on_link(
            &"10.0.0.2".parse().unwrap(),
            &[("10.0.0.1".parse().unwrap(), 32)]
        ));
        assert!(gateway_on_link(
            &"1.2.3.4".parse().unwrap(),
            &[("10.0.0.1".parse().unwrap(), 0)]
        ));
    }
}
