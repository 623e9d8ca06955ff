//! Links, addresses and routes through rtnetlink: the bridge, the veth pairs, and the container's
//! side of them.
//!
//! rtnetlink is asynchronous; rnat's commands are short and sequential, so each `Netlink` owns a
//! current-thread tokio runtime and blocks on one request at a time.

use std::net::{IpAddr, Ipv4Addr};

use futures::TryStreamExt;
use ipnet::Ipv4Net;
use netlink_packet_route::link::{
    AfSpecInet, AfSpecInet6, AfSpecUnspec, In6AddrGenMode, InetDevConf, InfoBridgePort, InfoData,
    InfoVeth, LinkAttribute, LinkMessage,
};
use rtnetlink::{
    Handle, LinkBridge, LinkBridgePort, LinkMessageBuilder, LinkUnspec, LinkVeth,
    RouteMessageBuilder,
};

use crate::netns::NetNs;

/// A failed link operation, with what was being done.
#[derive(Debug, thiserror::Error)]
pub enum LinkError {
    #[error("{what}: {source}")]
    Netlink {
        what: String,
        #[source]
        source: rtnetlink::Error,
    },
    #[error("{what}: {source}")]
    Io {
        what: String,
        #[source]
        source: std::io::Error,
    },
    #[error("link {0} does not exist")]
    Missing(String),
}

impl LinkError {
    /// The errno of a kernel refusal, if that is what this is.
    pub fn errno(&self) -> Option<i32> {
        match self {
            LinkError::Netlink {
                source: rtnetlink::Error::NetlinkError(m),
                ..
            } => m.code.map(|c| -c.get()),
            LinkError::Io { source, .. } => source.raw_os_error(),
            _ => None,
        }
    }
}

/// Whether an rtnetlink error is the kernel refusing with `errno`.
fn is_errno(e: &rtnetlink::Error, errno: i32) -> bool {
    matches!(e, rtnetlink::Error::NetlinkError(m) if m.code.map(|c| -c.get()) == Some(errno))
}

fn nl(what: impl Into<String>) -> impl FnOnce(rtnetlink::Error) -> LinkError {
    let what = what.into();
    move |source| LinkError::Netlink { what, source }
}

/// A veth pair to create.
#[derive(Debug, Clone)]
pub struct VethSpec<'a> {
    pub host: &'a str,
    pub peer: &'a str,
    pub mtu: Option<u32>,
    /// Hairpin mode on the bridge port (a container reaching itself through the host).
    pub hairpin: bool,
    pub peer_mac: Option<[u8; 6]>,
}

/// An rtnetlink connection bound to one network namespace.
pub struct Netlink {
    rt: tokio::runtime::Runtime,
    handle: Handle,
}

impl Netlink {
    /// A connection in the calling thread's namespace.
    pub fn open() -> Result<Netlink, LinkError> {
        let rt = runtime()?;
        let handle = {
            let _guard = rt.enter();
            let (conn, handle, _) =
                rtnetlink::new_connection().map_err(|source| LinkError::Io {
                    what: "rtnetlink socket".into(),
                    source,
                })?;
            rt.spawn(conn);
            handle
        };
        Ok(Netlink { rt, handle })
    }

    /// A connection whose socket lives in `ns` (made on a thread that entered it).
    pub fn open_in(ns: &NetNs) -> Result<Netlink, LinkError> {
        let rt = runtime()?;
        let rt_handle = rt.handle().clone();
        let made = ns
            .run_in(move || {
                let _guard = rt_handle.enter();
                rtnetlink::new_connection()
            })
            .and_then(|r| r)
            .map_err(|source| LinkError::Io {
                what: "rtnetlink socket in container namespace".into(),
                source,
            })?;
        let (conn, handle, _) = made;
        rt.spawn(conn);
        Ok(Netlink { rt, handle })
    }

    /// Link `name`, if it exists (one request, not a dump).
    fn link(&self, name: &str) -> Result<Option<LinkMessage>, LinkError> {
        let h = self.handle.clone();
        let name = name.to_string();
        self.rt.block_on(async move {
            let mut links = h.link().get().match_name(name.clone()).execute();
            match links.try_next().await {
                Ok(found) => Ok(found),
                Err(e) if is_errno(&e, libc::ENODEV) => Ok(None),
                Err(e) => Err(nl(format!("looking up link {name}"))(e)),
            }
        })
    }

    /// The index of link `name`, if it exists.
    pub fn index(&self, name: &str) -> Result<Option<u32>, LinkError> {
        Ok(self.link(name)?.map(|m| m.header.index))
    }

    /// The MAC address of link `name`, if it exists.
    pub fn mac(&self, name: &str) -> Result<Option<[u8; 6]>, LinkError> {
        Ok(self.link(name)?.and_then(|m| {
            m.attributes.iter().find_map(|a| match a {
                LinkAttribute::Address(mac) => <[u8; 6]>::try_from(mac.as_slice()).ok(),
                _ => None,
            })
        }))
    }

    /// The IPv4 settings (`net.ipv4.conf.NAME.*`) of link `name`, if it exists, read through
    /// netlink: a path under /proc/sys/net costs a look-up that grows with the number of network
    /// namespaces on the machine.
    pub fn inet_conf(&self, name: &str) -> Result<Option<InetDevConf>, LinkError> {
        Ok(self.link(name)?.and_then(|m| {
            m.attributes.into_iter().find_map(|a| match a {
                LinkAttribute::AfSpecUnspec(specs) => specs.into_iter().find_map(|s| match s {
                    AfSpecUnspec::Inet(v) => v.into_iter().find_map(|i| match i {
                        AfSpecInet::DevConf(c) => Some(c),
                        _ => None,
                    }),
                    _ => None,
                }),
                _ => None,
            })
        }))
    }

    /// Keeps IPv6 from giving link `index` any address of its own (no link-local address, so no
    /// duplicate-address detection, router solicitation or MLD report from it). Must come before
    /// the link goes up. Nothing to do on a kernel without IPv6.
    ///
    /// rnat networks are IPv4: without this, every new bridge port's IPv6 traffic is flooded to
    /// every other port, so each container would add work to all later ones. Netlink rather than
    /// `net.ipv6.conf.NAME.disable_ipv6`: a path under /proc/sys/net costs a look-up that grows
    /// with the number of network namespaces on the machine.
    pub fn no_ipv6_addresses(&self, index: u32, name: &str) -> Result<(), LinkError> {
        let msg = LinkMessageBuilder::<LinkUnspec>::new()
            .index(index)
            .append_extra_attribute(LinkAttribute::AfSpecUnspec(vec![AfSpecUnspec::Inet6(
                vec![AfSpecInet6::AddrGenMode(In6AddrGenMode::None)],
            )]))
            .build();
        let h = self.handle.clone();
        match self.rt.block_on(h.link().set(msg).execute()) {
            Err(e) if is_errno(&e, libc::EAFNOSUPPORT) => Ok(()),
            other => other.map_err(nl(format!("turning off IPv6 addresses on {name}"))),
        }
    }

    /// The index of the bridge (or other controller) link `name` is attached to; `Some(0)` when it
    /// exists without one, `None` when it does not exist.
    pub fn master_of(&self, name: &str) -> Result<Option<u32>, LinkError> {
        Ok(self.link(name)?.map(|m| {
            m.attributes
                .iter()
                .find_map(|a| match a {
                    LinkAttribute::Controller(i) => Some(*i),
                    _ => None,
                })
                .unwrap_or(0)
        }))
    }

    /// Names of the links attached to bridge `index`.
    pub fn ports_of(&self, index: u32) -> Result<Vec<String>, LinkError> {
        let h = self.handle.clone();
        self.rt.block_on(async move {
            let msgs: Vec<LinkMessage> = h
                .link()
                .get()
                .execute()
                .try_collect()
                .await
                .map_err(nl("listing links"))?;
            Ok(msgs
                .iter()
                .filter(|m| {
                    m.attributes
                        .iter()
                        .any(|a| matches!(a, LinkAttribute::Controller(i) if *i == index))
                })
                .filter_map(|m| {
                    m.attributes.iter().find_map(|a| match a {
                        LinkAttribute::IfName(n) => Some(n.clone()),
                        _ => None,
                    })
                })
                .collect())
        })
    }

    /// IPv4 addresses (with prefix lengths) of link `name`.
    pub fn addresses(&self, name: &str) -> Result<Vec<(Ipv4Addr, u8)>, LinkError> {
        let Some(index) = self.index(name)? else {
            return Ok(Vec::new());
        };
        let h = self.handle.clone();
        self.rt.block_on(async move {
            let msgs: Vec<netlink_packet_route::address::AddressMessage> = h
                .address()
                .get()
                .set_link_index_filter(index)
                .execute()
                .try_collect()
                .await
                .map_err(nl("listing addresses"))?;
            Ok(msgs
                .iter()
                .filter_map(|m| {
                    m.attributes.iter().find_map(|a| match a {
                        netlink_packet_route::address::AddressAttribute::Address(IpAddr::V4(
                            ip,
                        )) => Some((*ip, m.header.prefix_len)),
                        _ => None,
                    })
                })
                .collect())
        })
    }

    /// The gateway of the IPv4 default route, if there is one.
    pub fn default_gateway(&self) -> Result<Option<Ipv4Addr>, LinkError> {
        use netlink_packet_route::route::{RouteAddress, RouteAttribute};
        let h = self.handle.clone();
        self.rt.block_on(async move {
            let req = RouteMessageBuilder::<Ipv4Addr>::new().build();
            let msgs: Vec<netlink_packet_route::route::RouteMessage> = h
                .route()
                .get(req)
                .execute()
                .try_collect()
                .await
                .map_err(nl("listing routes"))?;
            Ok(msgs
                .iter()
                .filter(|m| m.header.destination_prefix_length == 0)
                .find_map(|m| {
                    m.attributes.iter().find_map(|a| match a {
                        RouteAttribute::Gateway(RouteAddress::Inet(gw)) => Some(*gw),
                        _ => None,
                    })
                }))
        })
    }

    /// Makes sure bridge `name` exists, holds `gateway/prefix` and is up. Returns its index and
    /// whether this call created it.
    pub fn ensure_bridge(
        &self,
        name: &str,
        gateway: Ipv4Addr,
        prefix: u8,
    ) -> Result<(u32, bool), LinkError> {
        let (index, created) = match self.index(name)? {
            Some(i) => (i, false),
            None => {
                let h = self.handle.clone();
                self.rt
                    .block_on(h.link().add(LinkBridge::new(name).build()).execute())
                    .map_err(nl(format!("creating bridge {name}")))?;
                (
                    self.index(name)?
                        .ok_or_else(|| LinkError::Missing(name.to_string()))?,
                    true,
                )
            }
        };
        self.add_address(index, gateway, prefix)?;
        self.set_up(index, name)?;
        Ok((index, created))
    }

    /// Adds an address to a link; an address already there is fine.
    pub fn add_address(&self, index: u32, addr: Ipv4Addr, prefix: u8) -> Result<(), LinkError> {
        let h = self.handle.clone();
        match self
            .rt
            .block_on(h.address().add(index, IpAddr::V4(addr), prefix).execute())
        {
            Err(e) if is_errno(&e, libc::EEXIST) => Ok(()),
            other => other.map_err(nl(format!("adding {addr}/{prefix}"))),
        }
    }

    pub fn set_up(&self, index: u32, name: &str) -> Result<(), LinkError> {
        let h = self.handle.clone();
        self.rt
            .block_on(
                h.link()
                    .set(LinkUnspec::new_with_index(index).up().build())
                    .execute(),
            )
            .map_err(nl(format!("bringing {name} up")))
    }

    /// Creates a veth pair: the host end here, attached to `bridge` and up; the peer created
    /// directly inside `peer_ns` (so it may be named `eth0` whatever this namespace holds).
    pub fn create_veth(
        &self,
        spec: &VethSpec<'_>,
        peer_ns: &NetNs,
        bridge: u32,
    ) -> Result<(), LinkError> {
        let (host, peer) = (spec.host, spec.peer);
        let mut peer_msg = LinkMessageBuilder::<LinkUnspec>::new()
            .name(peer.to_string())
            .setns_by_fd(peer_ns.raw_fd());
        let mut host_msg = LinkVeth::new(host, peer).controller(bridge);
        if let Some(m) = spec.mtu {
            peer_msg = peer_msg.mtu(m);
            host_msg = host_msg.mtu(m);
        }
        if let Some(mac) = spec.peer_mac {
            peer_msg = peer_msg.address(mac.to_vec());
        }
        let mut msg = host_msg.build();
        let mut peer_built = Some(peer_msg.build());
        // Replace the peer the builder made with one that names the target namespace.
        for attr in msg.attributes.iter_mut() {
            if let LinkAttribute::LinkInfo(infos) = attr {
                for info in infos.iter_mut() {
                    if let netlink_packet_route::link::LinkInfo::Data(d) = info {
                        if let Some(p) = peer_built.take() {
                            *d = InfoData::Veth(InfoVeth::Peer(p));
                        }
                    }
                }
            }
        }
        let h = self.handle.clone();
        self.rt
            .block_on(h.link().add(msg).execute())
            .map_err(nl(format!("creating veth {host}")))?;
        let index = self
            .index(host)?
            .ok_or_else(|| LinkError::Missing(host.to_string()))?;
        let h = self.handle.clone();
        self.rt
            .block_on(
                h.link()
                    .set_port(
                        LinkBridgePort::new(index)
                            .append_info_data(InfoBridgePort::HairpinMode(spec.hairpin))
                            .build(),
                    )
                    .execute(),
            )
            .map_err(nl(format!("enabling hairpin on {host}")))?;
        self.no_ipv6_addresses(index, host)?;
        self.set_up(index, host)
    }

    /// Deletes a link. Returns false if it was already gone.
    pub fn delete(&self, name: &str) -> Result<bool, LinkError> {
        let Some(index) = self.index(name)? else {
            return Ok(false);
        };
        let h = self.handle.clone();
        match self.rt.block_on(h.link().del(index).execute()) {
            Err(e) if is_errno(&e, libc::ENODEV) => Ok(false),
            other => other
                .map(|_| true)
                .map_err(nl(format!("deleting link {name}"))),
        }
    }

    /// Inside a container: `lo` up, `ifname` with `addr` up, and (if asked) the default route via
    /// `gateway`.
    pub fn configure_container(
        &self,
        ifname: &str,
        addr: Ipv4Net,
        gateway: Ipv4Addr,
        default_route: bool,
    ) -> Result<(), LinkError> {
        let lo = self
            .index("lo")?
            .ok_or_else(|| LinkError::Missing("lo".into()))?;
        self.set_up(lo, "lo")?;
        let eth = self
            .index(ifname)?
            .ok_or_else(|| LinkError::Missing(ifname.to_string()))?;
        self.add_address(eth, addr.addr(), addr.prefix_len())?;
        self.set_up(eth, ifname)?;
        if !default_route {
            return Ok(());
        }
        let route = RouteMessageBuilder::<Ipv4Addr>::new()
            .gateway(gateway)
            .output_interface(eth)
            .build();
        let h = self.handle.clone();
        self.rt
            .block_on(h.route().add(route).execute())
            .map_err(nl(format!("default route via {gateway}")))
    }
}

fn runtime() -> Result<tokio::runtime::Runtime, LinkError> {
    tokio::runtime::Builder::new_current_thread()
        .enable_io()
        .build()
        .map_err(|source| LinkError::Io {
            what: "tokio runtime".into(),
            source,
        })
}

/// Turns IPv6 off on a link of the current namespace with one write (nothing to do on a kernel
/// without IPv6): the link then drops every IPv6 packet it receives, router advertisements from a
/// rogue neighbour on the bridge included. One write, not a read first: a path under /proc/sys/net
/// costs a look-up that grows with the number of network namespaces on the machine.
pub fn disable_ipv6(ifname: &str) -> Result<(), LinkError> {
    match std::fs::write(
        format!("/proc/sys/net/ipv6/conf/{ifname}/disable_ipv6"),
        "1",
    ) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(LinkError::Io {
            what: format!("turning IPv6 off on {ifname}"),
            source: e,
        }),
        _ => Ok(()),
    }
}

/// Writes a sysctl of the current network namespace (`/proc/sys/net/...`).
pub fn set_sysctl(path: &str, value: &str) -> Result<(), LinkError> {
    // Dotted names are split on dots; a path with slashes is taken as is (link names may hold dots).
    let full = if path.contains('/') {
        format!("/proc/sys/{path}")
    } else {
        format!("/proc/sys/{}", path.replace('.', "/"))
    };
    let current = std::fs::read_to_string(&full).unwrap_or_default();
    if current.trim() == value {
        return Ok(());
    }
    std::fs::write(&full, value).map_err(|source| LinkError::Io {
        what: format!("setting {path}={value}"),
        source,
    })
}
