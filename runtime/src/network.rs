//! The pod's network, as CNI left it, carried into the microVM (Kata's "tcfilter" model).
//!
//! CNI (driven by containerd's CRI plugin) creates the pod's network namespace with its
//! interfaces before the sandbox starts. For each interface but `lo` the shim, inside that
//! namespace:
//! - reads its MAC, MTU, addresses and routes;
//! - creates a tap (`tap<N>_acc`) with the same MTU, which becomes the VM's virtio-net device;
//! - redirects everything arriving on the interface to the tap and everything arriving on the tap
//!   to the interface (tc ingress qdisc + u32 match-all + mirred egress redirect, both ways).
//!
//! The interface keeps its addresses, so kubelet and CNI see the pod as they made it; the guest
//! configures its twin (same MAC) identically, and frames pass through untouched. Teardown removes
//! the filters and the taps; the namespace stays CNI's to delete.

use std::fs::File;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::path::{Path, PathBuf};

use accordion_proto::agent::v1 as pb;
use accordion_vmm::devices::virtio::net::tap::{Tap, TapError};
use futures_util::TryStreamExt;
use rtnetlink::packet_route::address::AddressAttribute;
use rtnetlink::packet_route::link::{LinkAttribute, LinkFlags, LinkLayerType, LinkMessage};
use rtnetlink::packet_route::route::{
    RouteAddress, RouteAttribute, RouteHeader, RouteMessage, RouteProtocol, RouteType,
};
use rtnetlink::packet_route::tc::TcHandle;
use rtnetlink::{Handle, LinkUnspec, RouteMessageBuilder};

/// ETH_P_ALL in network byte order, as tc's `protocol all` sends it.
const PROTOCOL_ALL: u16 = 0x0003u16.to_be();

/// Errors attaching or detaching the pod network.
#[derive(Debug, thiserror::Error)]
pub enum NetworkError {
    #[error("Cannot open the pod's network namespace {0}")]
    OpenNetns(PathBuf, #[source] std::io::Error),
    #[error("Cannot enter the pod's network namespace {0}")]
    Setns(PathBuf, #[source] nix::Error),
    #[error("Cannot start the network worker")]
    Worker(#[source] std::io::Error),
    #[error("Cannot open a netlink socket in the pod's network namespace")]
    Connect(#[source] std::io::Error),
    #[error("{iface}: cannot {step}")]
    Netlink {
        iface: String,
        step: String,
        #[source]
        source: rtnetlink::Error,
    },
    #[error("{0}: cannot create its tap")]
    Tap(String, #[source] TapError),
    #[error("{0}: it has no MAC address (not an Ethernet interface); accordion cannot carry it into the VM")]
    NoMac(String),
    #[error("The pod's network namespace has {0} interfaces; a VM takes at most {1}")]
    TooMany(usize, usize),
}

/// One pod interface and its tap.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PodInterface {
    pub name: String,
    pub index: u32,
    pub mac: [u8; 6],
    pub mtu: u32,
    pub addresses: Vec<(IpAddr, u8)>,
    /// (destination, prefix length, gateway).
    pub routes: Vec<(IpAddr, u8, Option<IpAddr>)>,
    pub tap_name: String,
}

/// What `attach` set up.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PodNetwork {
    pub netns: PathBuf,
    pub interfaces: Vec<PodInterface>,
}

impl PodNetwork {
    /// The agent's Configure request for these interfaces.
    pub fn to_proto(&self) -> Vec<pb::Interface> {
        self.interfaces
            .iter()
            .map(|i| pb::Interface {
                mac: accordion_vmm::devices::virtio::net::format_mac(&i.mac),
                mtu: i.mtu,
                addresses: i
                    .addresses
                    .iter()
                    .map(|(a, l)| pb::IpAddress {
                        address: a.to_string(),
                        prefix_len: u32::from(*l),
                    })
                    .collect(),
                routes: i
                    .routes
                    .iter()
                    .map(|(d, l, g)| pb::Route {
                        destination: format!("{d}/{l}"),
                        gateway: g.map(|g| g.to_string()).unwrap_or_default(),
                    })
                    .collect(),
                name: i.name.clone(),
            })
            .collect()
    }
}

fn nl(iface: &str, step: impl Into<String>) -> impl FnOnce(rtnetlink::Error) -> NetworkError {
    let (iface, step) = (iface.to_string(), step.into());
    move |source| NetworkError::Netlink {
        iface,
        step,
        source,
    }
}

/// Runs `work` on a thread inside the network namespace at `netns`, with a netlink handle there.
fn in_netns<T, F, Fut>(netns: &Path, work: F) -> Result<T, NetworkError>
where
    T: Send + 'static,
    F: FnOnce(Handle) -> Fut + Send + 'static,
    Fut: std::future::Future<Output = Result<T, NetworkError>>,
{
    let file = File::open(netns).map_err(|e| NetworkError::OpenNetns(netns.to_path_buf(), e))?;
    let path = netns.to_path_buf();
    // A thread of its own: setns changes only the calling thread, which then serves nothing else.
    let thread = std::thread::Builder::new()
        .name("netns".into())
        .spawn(move || {
            nix::sched::setns(&file, nix::sched::CloneFlags::CLONE_NEWNET)
                .map_err(|e| NetworkError::Setns(path, e))?;
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .map_err(NetworkError::Worker)?;
            rt.block_on(async move {
                let (conn, handle, _) =
                    rtnetlink::new_connection().map_err(NetworkError::Connect)?;
                tokio::spawn(conn);
                work(handle).await
            })
        })
        .map_err(NetworkError::Worker)?;
    thread.join().unwrap_or_else(|_| {
        Err(NetworkError::Worker(std::io::Error::other(
            "network worker panicked",
        )))
    })
}

fn link_name(link: &LinkMessage) -> String {
    link.attributes
        .iter()
        .find_map(|a| match a {
            LinkAttribute::IfName(n) => Some(n.clone()),
            _ => None,
        })
        .unwrap_or_default()
}

fn route_addr(a: &RouteAddress) -> Option<IpAddr> {
    match a {
        RouteAddress::Inet(v4) => Some(IpAddr::V4(*v4)),
        RouteAddress::Inet6(v6) => Some(IpAddr::V6(*v6)),
        _ => None,
    }
}

/// The tap name of the `n`th pod interface.
pub fn tap_name(n: usize) -> String {
    format!("tap{n}_acc")
}

/// Whether a route of the main table is one the guest must be given: not the kernel's own prefix
/// routes (the guest's kernel makes those from the addresses), not IPv6 link-local or multicast.
fn wanted_route(r: &RouteMessage, dst: IpAddr, prefix: u8) -> bool {
    if r.header.table != RouteHeader::RT_TABLE_MAIN
        || r.header.kind != RouteType::Unicast
        || r.header.protocol == RouteProtocol::Kernel
    {
        return false;
    }
    match dst {
        IpAddr::V6(v6) => !(prefix >= 10 && (v6.segments()[0] & 0xffc0) == 0xfe80),
        IpAddr::V4(_) => true,
    }
}

/// Reads the pod's interfaces in `netns`, creates a tap for each and redirects traffic both ways.
/// Returns the interfaces and their taps (for the VM's virtio-net devices, in the same order).
pub fn attach(netns: &Path, max: usize) -> Result<(PodNetwork, Vec<Tap>), NetworkError> {
    let path = netns.to_path_buf();
    let (interfaces, taps) = in_netns(netns, move |handle| async move {
        let links: Vec<LinkMessage> = handle
            .link()
            .get()
            .execute()
            .try_collect()
            .await
            .map_err(nl("*", "list links"))?;
        // CNI's interfaces: Ethernet and up. Not lo, not the fallback tunnels (sit0, tunl0) a
        // namespace gets when their modules are loaded, not our own taps.
        let pod_links: Vec<&LinkMessage> = links
            .iter()
            .filter(|l| l.header.link_layer_type == LinkLayerType::Ether)
            .filter(|l| l.header.flags.contains(LinkFlags::Up))
            .filter(|l| !link_name(l).ends_with("_acc"))
            .collect();
        if pod_links.len() > max {
            return Err(NetworkError::TooMany(pod_links.len(), max));
        }
        let addresses: Vec<_> = handle
            .address()
            .get()
            .execute()
            .try_collect()
            .await
            .map_err(nl("*", "list addresses"))?;
        let mut routes: Vec<RouteMessage> = Vec::new();
        for msg in [
            RouteMessageBuilder::<Ipv4Addr>::new().build(),
            RouteMessageBuilder::<Ipv6Addr>::new().build(),
        ] {
            let got: Vec<RouteMessage> = handle
                .route()
                .get(msg)
                .execute()
                .try_collect()
                .await
                .map_err(nl("*", "list routes"))?;
            routes.extend(got);
        }
        let mut interfaces = Vec::new();
        let mut taps = Vec::new();
        for (n, link) in pod_links.into_iter().enumerate() {
            let name = link_name(link);
            let index = link.header.index;
            let mut mac = None;
            let mut mtu = 1500;
            for a in &link.attributes {
                match a {
                    LinkAttribute::Address(m) if m.len() == 6 => {
                        let mut b = [0u8; 6];
                        b.copy_from_slice(m);
                        mac = Some(b);
                    }
                    LinkAttribute::Mtu(m) => mtu = *m,
                    _ => {}
                }
            }
            let mac = mac.ok_or_else(|| NetworkError::NoMac(name.clone()))?;
            let addrs: Vec<(IpAddr, u8)> = addresses
                .iter()
                .filter(|a| a.header.index == index)
                .filter_map(|a| {
                    a.attributes.iter().find_map(|attr| match attr {
                        AddressAttribute::Address(ip) => Some((*ip, a.header.prefix_len)),
                        _ => None,
                    })
                })
                .filter(|(ip, _)| match ip {
                    IpAddr::V6(v6) => (v6.segments()[0] & 0xffc0) != 0xfe80,
                    IpAddr::V4(_) => true,
                })
                .collect();
            let mut link_routes = Vec::new();
            for r in &routes {
                if !r
                    .attributes
                    .iter()
                    .any(|a| matches!(a, RouteAttribute::Oif(i) if *i == index))
                {
                    continue;
                }
                let v6 = r.header.address_family == rtnetlink::packet_route::AddressFamily::Inet6;
                let mut dst: IpAddr = if v6 {
                    IpAddr::V6(Ipv6Addr::UNSPECIFIED)
                } else {
                    IpAddr::V4(Ipv4Addr::UNSPECIFIED)
                };
                let mut gateway = None;
                for a in &r.attributes {
                    match a {
                        RouteAttribute::Destination(d) => dst = route_addr(d).unwrap_or(dst),
                        RouteAttribute::Gateway(g) => gateway = route_addr(g),
                        _ => {}
                    }
                }
                let prefix = r.header.destination_prefix_length;
                if wanted_route(r, dst, prefix) {
                    link_routes.push((dst, prefix, gateway));
                }
            }

            // The tap, up, with the interface's MTU; then the redirects both ways.
            let tap_name = tap_name(n);
            let tap = Tap::open(&tap_name).map_err(|e| NetworkError::Tap(name.clone(), e))?;
            let tap_link: Vec<LinkMessage> = handle
                .link()
                .get()
                .match_name(tap_name.clone())
                .execute()
                .try_collect()
                .await
                .map_err(nl(&tap_name, "find it"))?;
            let tap_index = tap_link
                .first()
                .map(|l| l.header.index)
                .ok_or_else(|| NetworkError::Tap(name.clone(), TapError::Name(tap_name.clone())))?;
            handle
                .link()
                .set(LinkUnspec::new_with_index(tap_index).mtu(mtu).up().build())
                .execute()
                .await
                .map_err(nl(&tap_name, "bring it up"))?;
            for (from, to, what) in [(index, tap_index, &name), (tap_index, index, &tap_name)] {
                let from_i32 = i32::try_from(from).unwrap_or(i32::MAX);
                handle
                    .qdisc()
                    .add(from_i32)
                    .ingress()
                    .execute()
                    .await
                    .map_err(nl(what, "add an ingress qdisc"))?;
                handle
                    .traffic_filter(from_i32)
                    .add()
                    .ingress()
                    .protocol(PROTOCOL_ALL)
                    .redirect(to)
                    .map_err(nl(what, "build the redirect filter"))?
                    .execute()
                    .await
                    .map_err(nl(what, "add the redirect filter"))?;
            }
            interfaces.push(PodInterface {
                name,
                index,
                mac,
                mtu,
                addresses: addrs,
                routes: link_routes,
                tap_name,
            });
            taps.push(tap);
        }
        Ok((interfaces, taps))
    })?;
    Ok((
        PodNetwork {
            netns: path,
            interfaces,
        },
        taps,
    ))
}

/// Removes the redirects and the taps. A namespace already gone (CNI deleted it) is not an error:
/// everything in it went with it.
pub fn detach(net: &PodNetwork) -> Result<(), NetworkError> {
    if !net.netns.exists() {
        return Ok(());
    }
    let interfaces = net.interfaces.clone();
    in_netns(&net.netns, move |handle| async move {
        for i in &interfaces {
            let mut del = handle
                .qdisc()
                .del(i32::try_from(i.index).unwrap_or(i32::MAX));
            del.message_mut().header.parent = TcHandle::INGRESS;
            // The interface may be gone already (CNI DEL ran first): nothing to remove then.
            let _ = del.execute().await;
            let taps: Vec<LinkMessage> = handle
                .link()
                .get()
                .match_name(i.tap_name.clone())
                .execute()
                .try_collect()
                .await
                .unwrap_or_default();
            for t in taps {
                handle
                    .link()
                    .del(t.header.index)
                    .execute()
                    .await
                    .map_err(nl(&i.tap_name, "delete it"))?;
            }
        }
        Ok(())
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_tap_names_fit_ifnamsiz() {
        assert_eq!(tap_name(0), "tap0_acc");
        assert!(tap_name(15).len() <= 15);
    }

    #[test]
    fn test_protocol_all_is_in_network_order() {
        assert_eq!(PROTOCOL_ALL.to_ne_bytes(), [0x00, 0x03]);
    }

    #[test]
    fn test_proto_form_of_a_cni_interface() {
        let net = PodNetwork {
            netns: "/var/run/netns/cni-1".into(),
            interfaces: vec![PodInterface {
                name: "eth0".into(),
                index: 2,
                mac: [0x02, 0x42, 0x0a, 0x58, 0, 5],
                mtu: 1450,
                addresses: vec![("10.88.0.5".parse().unwrap(), 16)],
                routes: vec![(
                    "0.0.0.0".parse().unwrap(),
                    0,
                    Some("10.88.0.1".parse().unwrap()),
                )],
                tap_name: "tap0_acc".into(),
            }],
        };
        let p = net.to_proto();
        assert_eq!(p[0].mac, "02:42:0a:58:00:05");
        assert_eq!(p[0].mtu, 1450);
        assert_eq!(p[0].addresses[0].address, "10.88.0.5");
        assert_eq!(p[0].routes[0].destination, "0.0.0.0/0");
        assert_eq!(p[0].routes[0].gateway, "10.88.0.1");
        assert_eq!(p[0].name, "eth0");
    }

    #[test]
    fn test_missing_netns_is_an_error_naming_it() {
        let err = attach(Path::new("/nonexistent/netns"), 4)
            .unwrap_err()
            .to_string();
        assert!(err.contains("/nonexistent/netns"), "{err}");
    }
}
