//! rtnetlink calls that configure and list the guest's interfaces.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use accordion_proto::agent::v1 as pb;
use futures_util::TryStreamExt;
use rtnetlink::packet_route::address::AddressAttribute;
use rtnetlink::packet_route::link::{LinkAttribute, LinkMessage};
use rtnetlink::packet_route::route::{RouteAddress, RouteAttribute, RouteHeader, RouteMessage};
use rtnetlink::{Handle, IpVersion, LinkUnspec, RouteMessageBuilder};

use super::{format_mac, gateway_on_link, InterfaceSpec};

/// A failed step, naming the interface and what was being done.
#[derive(Debug, thiserror::Error)]
pub enum NetlinkError {
    #[error("Cannot open a netlink socket")]
    Connect(#[source] std::io::Error),
    #[error("{iface}: cannot {step}: {source}")]
    Step {
        iface: String,
        step: String,
        #[source]
        source: rtnetlink::Error,
    },
    #[error("No guest interface has MAC {0} (is its virtio-net device attached?)")]
    NoSuchMac(String),
}

fn connect() -> Result<Handle, NetlinkError> {
    let (conn, handle, _) = rtnetlink::new_connection().map_err(NetlinkError::Connect)?;
    tokio::spawn(conn);
    Ok(handle)
}

fn step(iface: &str, step: impl Into<String>) -> impl FnOnce(rtnetlink::Error) -> NetlinkError {
    let iface = iface.to_string();
    let step = step.into();
    move |source| NetlinkError::Step {
        iface,
        step,
        source,
    }
}

async fn links(handle: &Handle) -> Result<Vec<LinkMessage>, NetlinkError> {
    handle
        .link()
        .get()
        .execute()
        .try_collect()
        .await
        .map_err(step("*", "list links"))
}

fn link_mac(link: &LinkMessage) -> Option<&[u8]> {
    link.attributes.iter().find_map(|a| match a {
        LinkAttribute::Address(m) => Some(m.as_slice()),
        _ => None,
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

/// Brings `lo` up, then configures every interface in order.
pub async fn configure(specs: &[InterfaceSpec]) -> Result<(), NetlinkError> {
    let handle = connect()?;
    let all = links(&handle).await?;
    if let Some(lo) = all.iter().find(|l| link_name(l) == "lo") {
        handle
            .link()
            .set(LinkUnspec::new_with_index(lo.header.index).up().build())
            .execute()
            .await
            .map_err(step("lo", "bring it up"))?;
    }
    for spec in specs {
        let mac = format_mac(&spec.mac);
        let link = all
            .iter()
            .find(|l| link_mac(l) == Some(&spec.mac[..]))
            .ok_or_else(|| NetlinkError::NoSuchMac(mac.clone()))?;
        let index = link.header.index;
        let current = link_name(link);
        let set = |msg| handle.link().set(msg).execute();
        // A name can only change while the link is down.
        if let Some(name) = spec.name.as_ref().filter(|n| **n != current) {
            set(LinkUnspec::new_with_index(index).down().build())
                .await
                .map_err(step(&mac, "take it down"))?;
            set(LinkUnspec::new_with_index(index).name(name.clone()).build())
                .await
                .map_err(step(&mac, format!("rename {current} to {name}")))?;
        }
        let name = spec.name.clone().unwrap_or(current);
        set(LinkUnspec::new_with_index(index).mtu(spec.mtu).up().build())
            .await
            .map_err(step(&name, format!("set MTU {} and bring it up", spec.mtu)))?;
        for (ip, len) in &spec.addresses {
            handle
                .address()
                .add(index, *ip, *len)
                .replace()
                .execute()
                .await
                .map_err(step(&name, format!("add address {ip}/{len}")))?;
        }
        for r in &spec.routes {
            let what = format!("add route {}/{}", r.destination, r.prefix_len);
            let msg = route_message(index, r, &spec.addresses);
            handle
                .route()
                .add(msg)
                .replace()
                .execute()
                .await
                .map_err(step(&name, what))?;
        }
    }
    Ok(())
}

fn route_message(index: u32, r: &super::RouteSpec, addresses: &[(IpAddr, u8)]) -> RouteMessage {
    let onlink = r.gateway.is_some_and(|gw| !gateway_on_link(&gw, addresses));
    match (r.destination, r.gateway) {
        (IpAddr::V4(dst), gw) => {
            let mut b = RouteMessageBuilder::<Ipv4Addr>::new()
                .destination_prefix(dst, r.prefix_len)
                .output_interface(index);
            if let Some(IpAddr::V4(gw)) = gw {
                b = b.gateway(gw);
            }
            if onlink {
                b = b.onlink();
            }
            b.build()
        }
        (IpAddr::V6(dst), gw) => {
            let mut b = RouteMessageBuilder::<Ipv6Addr>::new()
                .destination_prefix(dst, r.prefix_len)
                .output_interface(index);
            if let Some(IpAddr::V6(gw)) = gw {
                b = b.gateway(gw);
            }
            if onlink {
                b = b.onlink();
            }
            b.build()
        }
    }
}

fn route_addr(a: &RouteAddress) -> Option<IpAddr> {
    match a {
        RouteAddress::Inet(v4) => Some(IpAddr::V4(*v4)),
        RouteAddress::Inet6(v6) => Some(IpAddr::V6(*v6)),
        _ => None,
    }
}

/// Every interface but lo with its addresses and main-table routes.
pub async fn list() -> Result<Vec<pb::Interface>, NetlinkError> {
    let handle = connect()?;
    let mut out = Vec::new();
    let addresses: Vec<_> = handle
        .address()
        .get()
        .execute()
        .try_collect()
        .await
        .map_err(step("*", "list addresses"))?;
    let mut routes: Vec<RouteMessage> = Vec::new();
    for v in [IpVersion::V4, IpVersion::V6] {
        let msg = match v {
            IpVersion::V4 => RouteMessageBuilder::<Ipv4Addr>::new().build(),
            IpVersion::V6 => RouteMessageBuilder::<Ipv6Addr>::new().build(),
        };
        let got: Vec<RouteMessage> = handle
            .route()
            .get(msg)
            .execute()
            .try_collect()
            .await
            .map_err(step("*", "list routes"))?;
        routes.extend(got);
    }
    for link in links(&handle).await? {
        let name = link_name(&link);
        if name == "lo" {
            continue;
        }
        let index = link.header.index;
        let mtu = link
            .attributes
            .iter()
            .find_map(|a| match a {
                LinkAttribute::Mtu(m) => Some(*m),
                _ => None,
            })
            .unwrap_or(0);
        let addrs = addresses
            .iter()
            .filter(|a| a.header.index == index)
            .filter_map(|a| {
                a.attributes.iter().find_map(|attr| match attr {
                    AddressAttribute::Address(ip) => Some(pb::IpAddress {
                        address: ip.to_string(),
                        prefix_len: u32::from(a.header.prefix_len),
                    }),
                    _ => None,
                })
            })
            .collect();
        let routes = routes
            .iter()
            .filter(|r| r.header.table == RouteHeader::RT_TABLE_MAIN)
            .filter(|r| {
                r.attributes
                    .iter()
                    .any(|a| matches!(a, RouteAttribute::Oif(i) if *i == index))
            })
            .map(|r| {
                let family_any: IpAddr =
                    if r.header.address_family == rtnetlink::packet_route::AddressFamily::Inet6 {
                        IpAddr::V6(Ipv6Addr::UNSPECIFIED)
                    } else {
                        IpAddr::V4(Ipv4Addr::UNSPECIFIED)
                    };
                let mut dst = family_any;
                let mut gateway = String::new();
                for a in &r.attributes {
                    match a {
                        RouteAttribute::Destination(d) => dst = route_addr(d).unwrap_or(dst),
                        RouteAttribute::Gateway(g) => {
                            gateway = route_addr(g).map(|g| g.to_string()).unwrap_or_default()
                        }
                        _ => {}
                    }
                }
                pb::Route {
                    destination: format!("{dst}/{}", r.header.destination_prefix_length),
                    gateway,
                }
            })
            .collect();
        out.push(pb::Interface {
            mac: link_mac(&link).map(format_mac).unwrap_or_default(),
            mtu,
            addresses: addrs,
            routes,
            name,
        });
    }
    Ok(out)
}
