//! Rootful containers: the bridge, veth, address, published ports and masquerade of each one, made
//! and unmade as a unit under the state lock.
//!
//! Invariants:
//! - every change happens under the state lock, in the namespace rnat was started in;
//! - a container record exists before any kernel object of that container, so a crash at any point
//!   leaves something the next command's `reap` finds and removes;
//! - `teardown` is idempotent and keeps going past failures, reporting them all; a failed setup is
//!   rolled back by the same `teardown`;
//! - a record lists only the ports whose map elements were added, so a rollback never removes
//!   elements that belong to someone else.

use std::collections::HashMap;
use std::io;
use std::net::{IpAddr, Ipv4Addr, SocketAddr, TcpListener, UdpSocket};
use std::path::PathBuf;

use ipnet::Ipv4Net;

use crate::dns;
use crate::ipam;
use crate::link::{set_sysctl, LinkError, Netlink};
use crate::netns::NetNs;
use crate::nft::{Dnat, Firewall, NftError, Op};
use crate::process;
use crate::spec::{PortMapping, Protocol, SpecParseError};
use crate::state::{self, Allocations, Container, Network, StateDirs, StateError, StateLock};

/// The network used when none is named.
pub const DEFAULT_NETWORK: &str = "default";
pub const DEFAULT_BRIDGE: &str = "rnat0";
pub const DEFAULT_SUBNET: &str = "10.123.0.0/24";
/// The container's end of its veth pair.
pub const CONTAINER_IF: &str = "eth0";

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Spec(#[from] SpecParseError),
    #[error("rootful networking needs CAP_NET_ADMIN: run rnat as root")]
    Privilege,
    #[error("no network named {0:?} (create it with `rnat network create`)")]
    NoNetwork(String),
    #[error("network {0:?} already exists")]
    NetworkExists(String),
    #[error("invalid network: {0}")]
    NetworkInvalid(String),
    #[error("network {0:?} is in use by {1}")]
    NetworkInUse(String, String),
    #[error("network {network:?} ({subnet}) has no free address")]
    Exhausted { network: String, subnet: Ipv4Net },
    #[error("a container named {0:?} is already running")]
    NameTaken(String),
    #[error("no running container named {0:?}")]
    NoContainer(String),
    #[error("{0} running containers: name one with --name")]
    Ambiguous(usize),
    #[error("host port {mapping} is already published by container {owner:?}")]
    PortPublished { mapping: String, owner: String },
    #[error("host port {mapping} is already in use on this host: {source}")]
    PortBound {
        mapping: String,
        #[source]
        source: io::Error,
    },
    #[error("{mapping} is not published by container {name:?}")]
    NotPublished { mapping: String, name: String },
    #[error("{0}: rootful networks are IPv4-only, so IPv6 host addresses cannot be published yet")]
    Ipv6(String),
    #[error(transparent)]
    Link(#[from] LinkError),
    #[error(transparent)]
    Nft(#[from] NftError),
    #[error(transparent)]
    State(#[from] StateError),
    #[error("{what}: {source}")]
    Io {
        what: String,
        #[source]
        source: io::Error,
    },
    #[error("{0}")]
    Teardown(String),
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

fn io_ctx(what: impl Into<String>) -> impl FnOnce(io::Error) -> Error {
    let what = what.into();
    move |source| Error::Io { what, source }
}

/// Whether this process may change the network (CAP_NET_ADMIN in its effective set).
pub fn has_net_admin() -> bool {
    const CAP_NET_ADMIN: u32 = 12;
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("CapEff:"))
                .and_then(|v| u64::from_str_radix(v.trim(), 16).ok())
        })
        .is_some_and(|caps| caps & (1 << CAP_NET_ADMIN) != 0)
}

/// What `create` needs to know about a new container.
#[derive(Debug, Clone)]
pub struct CreateOpts {
    pub name: Option<String>,
    pub network: Option<String>,
    pub ports: Vec<PortMapping>,
}

/// A container whose network is ready and whose command has not started yet.
pub struct Prepared {
    pub record: Container,
    pub netns: NetNs,
    pub resolv: PathBuf,
}

/// The host side: state, links and firewall of the namespace rnat runs in.
pub struct Engine {
    dirs: StateDirs,
    nl: Netlink,
    fw: Firewall,
}

impl Engine {
    pub fn open(dirs: StateDirs) -> Result<Engine> {
        if !has_net_admin() {
            return Err(Error::Privilege);
        }
        Ok(Engine {
            dirs,
            nl: Netlink::open()?,
            fw: Firewall::open()?,
        })
    }

    pub fn dirs(&self) -> &StateDirs {
        &self.dirs
    }

    fn record_path(&self, id: &str) -> PathBuf {
        self.dirs.containers().join(format!("{id}.json"))
    }

    fn ipam_path(&self, network: &str) -> PathBuf {
        self.dirs.ipam().join(format!("{network}.json"))
    }

    fn network_path(&self, name: &str) -> PathBuf {
        self.dirs.networks().join(format!("{name}.json"))
    }

    /// Tears down every container whose owner died without doing it. Returns the reaped records.
    pub fn reap(&mut self, _lock: &StateLock) -> Result<Vec<Container>> {
        let mut reaped = Vec::new();
        for rec in state::read_all::<Container>(&self.dirs.containers())? {
            if !rec.owner_alive() {
                tracing::info!(container = %rec.name, "owner process is gone; cleaning up");
                self.teardown_locked(&rec)?;
                reaped.push(rec);
            }
        }
        Ok(reaped)
    }

    /// Containers whose owner is alive.
    pub fn containers(&self) -> Result<Vec<Container>> {
        Ok(state::read_all::<Container>(&self.dirs.containers())?
            .into_iter()
            .filter(Container::owner_alive)
            .collect())
    }

    pub fn networks(&self) -> Result<Vec<Network>> {
        Ok(state::read_all(&self.dirs.networks())?)
    }

    /// The named network; the default one is defined on first use.
    fn network(&self, name: Option<&str>) -> Result<Network> {
        let name = name.unwrap_or(DEFAULT_NETWORK);
        if let Some(n) = state::read_json::<Network>(&self.network_path(name))? {
            return Ok(n);
        }
        if name != DEFAULT_NETWORK {
            return Err(Error::NoNetwork(name.to_string()));
        }
        let subnet: Ipv4Net = DEFAULT_SUBNET
            .parse()
            .map_err(|_| Error::NetworkInvalid(DEFAULT_SUBNET.into()))?;
        let net = validate_network(
            DEFAULT_NETWORK,
            Some(DEFAULT_BRIDGE),
            subnet,
            None,
            &self.networks()?,
        )?;
        state::write_json(&self.network_path(&net.name), &net)?;
        Ok(net)
    }

    /// Makes sure the kernel side of a network exists: forwarding, rnat's table, the bridge, the
    /// masquerade rules. Returns the bridge's index.
    fn ensure_dataplane(&mut self, net: &Network) -> Result<u32> {
        set_sysctl("net.ipv4.ip_forward", "1")?;
        let created_table = self.fw.ensure_table()?;
        let (bridge, created_bridge) =
            self.nl
                .ensure_bridge(&net.bridge, net.gateway, net.subnet.prefix_len())?;
        // Packets to or from 127.0.0.0/8 may cross the bridge: published on 127.0.0.1 (DNAT in
        // output) and DNS forwarded to a loopback stub (DNAT in prerouting).
        set_sysctl(&format!("net.ipv4.conf.{}.route_localnet", net.bridge), "1")?;
        if created_table || created_bridge {
            let nets: Vec<Ipv4Net> = self.networks()?.iter().map(|n| n.subnet).collect();
            self.fw.set_networks(&nets)?;
        }
        Ok(bridge)
    }

    /// Rejects ports already taken, by a container or by a socket on this host. Linear in the
    /// number of ports involved: published ports are indexed by protocol and port first.
    fn check_ports(&self, ports: &[PortMapping], live: &[Container]) -> Result<()> {
        let mut taken: HashMap<(Protocol, u16), Vec<(&PortMapping, &str)>> = HashMap::new();
        for c in live {
            for p in &c.ports {
                taken
                    .entry((p.protocol, p.host_port))
                    .or_default()
                    .push((p, c.name.as_str()));
            }
        }
        for m in ports {
            if matches!(m.host_ip, Some(IpAddr::V6(_))) {
                return Err(Error::Ipv6(m.to_string()));
            }
            let clash = taken
                .get(&(m.protocol, m.host_port))
                .and_then(|v| v.iter().find(|(p, _)| p.conflicts_with(m)));
            if let Some((_, owner)) = clash {
                return Err(Error::PortPublished {
                    mapping: m.to_string(),
                    owner: owner.to_string(),
                });
            }
            probe_bind(m)?;
        }
        Ok(())
    }

    /// Sets up a container's network. On failure nothing of it is left.
    pub fn create(&mut self, opts: &CreateOpts) -> Result<Prepared> {
        let lock = self.dirs.lock()?;
        self.reap(&lock)?;
        let live = self.containers()?;
        let id = new_id();
        let name = opts
            .name
            .clone()
            .unwrap_or_else(|| format!("rnat-{}", &id[..6]));
        if live.iter().any(|c| c.name == name) {
            return Err(Error::NameTaken(name));
        }
        self.check_ports(&opts.ports, &live)?;
        let net = self.network(opts.network.as_deref())?;
        let bridge = self.ensure_dataplane(&net)?;

        let netns = NetNs::create().map_err(io_ctx("creating network namespace"))?;
        let mut rec = Container {
            id: id.clone(),
            name,
            network: net.name.clone(),
            ip: Ipv4Addr::UNSPECIFIED,
            prefix: net.subnet.prefix_len(),
            veth: format!("rv{}", &id[..8]),
            owner_pid: std::process::id(),
            owner_start: state::process_start_time(std::process::id()).unwrap_or(0),
            pid: None,
            netns_inode: netns.inode().map_err(io_ctx("reading namespace inode"))?,
            ports: Vec::new(),
        };
        rec.ip = self.allocate(&net, &id)?;
        let setup = self.setup_locked(&mut rec, &net, bridge, &netns, &opts.ports);
        match setup {
            Ok(resolv) => Ok(Prepared {
                record: rec,
                netns,
                resolv,
            }),
            Err(e) => {
                if let Err(t) = self.teardown_locked(&rec) {
                    tracing::error!("rollback after failed setup: {t}");
                }
                Err(e)
            }
        }
    }

    fn setup_locked(
        &mut self,
        rec: &mut Container,
        net: &Network,
        bridge: u32,
        netns: &NetNs,
        ports: &[PortMapping],
    ) -> Result<PathBuf> {
        state::write_json(&self.record_path(&rec.id), rec)?;
        self.nl
            .create_veth(&rec.veth, CONTAINER_IF, netns, bridge, None)?;
        let inside = Netlink::open_in(netns)?;
        inside.configure_container(
            CONTAINER_IF,
            Ipv4Net::new(rec.ip, rec.prefix).map_err(|e| Error::NetworkInvalid(e.to_string()))?,
            net.gateway,
        )?;
        let dnats = dnats_for(ports, rec.ip)?;
        self.fw.add_dnats(&dnats)?;
        rec.ports = ports.to_vec();
        state::write_json(&self.record_path(&rec.id), rec)?;

        let host_resolv = std::fs::read_to_string("/etc/resolv.conf").unwrap_or_default();
        let plan = dns::plan(&host_resolv, net.gateway);
        if let Some(stub) = plan.forward_to {
            self.fw.set_dns_forward(net.gateway, stub, Op::Create)?;
        }
        let dir = self.dirs.container_dir(&rec.id);
        let resolv = dir.join("resolv.conf");
        state::write_atomic(&resolv, plan.contents.as_bytes())?;
        Ok(resolv)
    }

    fn allocate(&self, net: &Network, id: &str) -> Result<Ipv4Addr> {
        let path = self.ipam_path(&net.name);
        let mut alloc: Allocations = state::read_json(&path)?.unwrap_or_default();
        let ip = ipam::pick(net.subnet, net.gateway, &alloc).ok_or_else(|| Error::Exhausted {
            network: net.name.clone(),
            subnet: net.subnet,
        })?;
        alloc.addrs.insert(ip, id.to_string());
        alloc.last = Some(ip);
        state::write_json(&path, &alloc)?;
        Ok(ip)
    }

    fn release(&self, rec: &Container) -> Result<(), StateError> {
        let path = self.ipam_path(&rec.network);
        let Some(mut alloc) = state::read_json::<Allocations>(&path)? else {
            return Ok(());
        };
        if alloc.addrs.get(&rec.ip) == Some(&rec.id) {
            alloc.addrs.remove(&rec.ip);
            state::write_json(&path, &alloc)?;
        }
        Ok(())
    }

    /// Records the container's main process.
    pub fn started(&mut self, rec: &mut Container, pid: u32) -> Result<()> {
        let _lock = self.dirs.lock()?;
        rec.pid = Some(pid);
        state::write_json(&self.record_path(&rec.id), rec)?;
        Ok(())
    }

    /// Removes everything of a container, reporting every step that failed.
    pub fn destroy(&mut self, rec: &Container) -> Result<()> {
        let _lock = self.dirs.lock()?;
        self.teardown_locked(rec)
    }

    fn teardown_locked(&mut self, rec: &Container) -> Result<()> {
        let mut errors: Vec<String> = Vec::new();
        // Processes the command left behind. Only while the veth exists is the namespace
        // certainly still the container's (the pair dies with the namespace).
        match self.nl.index(&rec.veth) {
            Ok(Some(_)) => {
                let n = process::kill_netns_processes(rec.netns_inode);
                if n > 0 {
                    tracing::info!(container = %rec.name, "killed {n} leftover process(es)");
                }
            }
            Ok(None) => {}
            Err(e) => errors.push(format!("looking up {}: {e}", rec.veth)),
        }
        match dnats_for(&rec.ports, rec.ip) {
            Ok(d) => {
                if let Err(e) = self.fw.remove_dnats(&d) {
                    errors.push(format!("removing published ports: {e}"));
                }
            }
            Err(e) => errors.push(e.to_string()),
        }
        if let Err(e) = self.nl.delete(&rec.veth) {
            errors.push(e.to_string());
        }
        if let Err(e) = self.release(rec) {
            errors.push(format!("releasing {}: {e}", rec.ip));
        }
        if let Err(e) = state::remove_file(&self.record_path(&rec.id)) {
            errors.push(e.to_string());
        }
        let dir = self.dirs.container_dir(&rec.id);
        if let Err(e) = std::fs::remove_dir_all(&dir) {
            if e.kind() != io::ErrorKind::NotFound {
                errors.push(format!("{}: {e}", dir.display()));
            }
        }
        if errors.is_empty() {
            Ok(())
        } else {
            Err(Error::Teardown(format!(
                "teardown of {} incomplete: {}",
                rec.name,
                errors.join("; ")
            )))
        }
    }

    fn find(&self, name: Option<&str>) -> Result<Container> {
        let live = self.containers()?;
        match name {
            Some(n) => live
                .into_iter()
                .find(|c| c.name == n)
                .ok_or_else(|| Error::NoContainer(n.to_string())),
            None if live.len() == 1 => live.into_iter().next().ok_or(Error::Ambiguous(0)),
            None => Err(Error::Ambiguous(live.len())),
        }
    }

    /// Adds published ports to a running container, in one transaction.
    pub fn publish(&mut self, name: Option<&str>, ports: &[PortMapping]) -> Result<Container> {
        let lock = self.dirs.lock()?;
        self.reap(&lock)?;
        let mut rec = self.find(name)?;
        self.check_ports(ports, &self.containers()?)?;
        let dnats = dnats_for(ports, rec.ip)?;
        self.fw.add_dnats(&dnats)?;
        rec.ports.extend_from_slice(ports);
        if let Err(e) = state::write_json(&self.record_path(&rec.id), &rec) {
            if let Err(r) = self.fw.remove_dnats(&dnats) {
                tracing::error!("rollback of published ports: {r}");
            }
            return Err(e.into());
        }
        Ok(rec)
    }

    /// Removes published ports from a running container, in one transaction.
    pub fn unpublish(&mut self, name: Option<&str>, ports: &[PortMapping]) -> Result<Container> {
        let lock = self.dirs.lock()?;
        self.reap(&lock)?;
        let mut rec = self.find(name)?;
        for m in ports {
            if !rec.ports.contains(m) {
                return Err(Error::NotPublished {
                    mapping: m.to_string(),
                    name: rec.name.clone(),
                });
            }
        }
        let dnats = dnats_for(ports, rec.ip)?;
        self.fw.remove_dnats(&dnats)?;
        rec.ports.retain(|p| !ports.contains(p));
        state::write_json(&self.record_path(&rec.id), &rec)?;
        Ok(rec)
    }

    /// Defines a network (its bridge is made when a container first uses it).
    pub fn network_create(
        &mut self,
        name: &str,
        subnet: Ipv4Net,
        gateway: Option<Ipv4Addr>,
        bridge: Option<&str>,
    ) -> Result<Network> {
        let _lock = self.dirs.lock()?;
        let existing = self.networks()?;
        let net = validate_network(name, bridge, subnet, gateway, &existing)?;
        state::write_json(&self.network_path(name), &net)?;
        Ok(net)
    }

    /// Removes a network: its bridge, DNS forwarding, masquerade rules and records.
    pub fn network_rm(&mut self, name: &str) -> Result<()> {
        let lock = self.dirs.lock()?;
        self.reap(&lock)?;
        let Some(net) = state::read_json::<Network>(&self.network_path(name))? else {
            return Err(Error::NoNetwork(name.to_string()));
        };
        let users: Vec<String> = self
            .containers()?
            .into_iter()
            .filter(|c| c.network == name)
            .map(|c| c.name)
            .collect();
        if !users.is_empty() {
            return Err(Error::NetworkInUse(name.to_string(), users.join(", ")));
        }
        let mut errors = Vec::new();
        if let Err(e) = self.nl.delete(&net.bridge) {
            errors.push(e.to_string());
        }
        if let Err(e) = self
            .fw
            .set_dns_forward(net.gateway, Ipv4Addr::UNSPECIFIED, Op::Delete)
        {
            // A namespace where rnat never made its table has nothing to remove.
            if e.errno() != Some(libc::ENOENT) {
                errors.push(format!("removing DNS forwarding: {e}"));
            }
        }
        for p in [self.network_path(name), self.ipam_path(name)] {
            if let Err(e) = state::remove_file(&p) {
                errors.push(e.to_string());
            }
        }
        let nets: Vec<Ipv4Net> = self.networks()?.iter().map(|n| n.subnet).collect();
        match self.fw.set_networks(&nets) {
            Err(e) if e.errno() == Some(libc::ENOENT) => {}
            Err(e) => errors.push(format!("updating masquerade rules: {e}")),
            Ok(()) => {}
        }
        if errors.is_empty() {
            Ok(())
        } else {
            Err(Error::Teardown(format!(
                "removal of network {name} incomplete: {}",
                errors.join("; ")
            )))
        }
    }
}

/// The DNATs for `ports` to `ip`; IPv6 host addresses are refused.
fn dnats_for(ports: &[PortMapping], ip: Ipv4Addr) -> Result<Vec<Dnat>> {
    ports
        .iter()
        .map(|m| Dnat::for_mapping(m, ip).ok_or_else(|| Error::Ipv6(m.to_string())))
        .collect()
}

/// Fails if a socket on this host already holds the port (bind and drop at once).
fn probe_bind(m: &PortMapping) -> Result<()> {
    let ip = m.host_ip.unwrap_or(IpAddr::V4(Ipv4Addr::UNSPECIFIED));
    let addr = SocketAddr::new(ip, m.host_port);
    let res = match m.protocol {
        Protocol::Tcp => TcpListener::bind(addr).map(drop),
        Protocol::Udp => UdpSocket::bind(addr).map(drop),
    };
    res.map_err(|source| Error::PortBound {
        mapping: m.to_string(),
        source,
    })
}

/// Checks a network definition against the others.
pub fn validate_network(
    name: &str,
    bridge: Option<&str>,
    subnet: Ipv4Net,
    gateway: Option<Ipv4Addr>,
    existing: &[Network],
) -> Result<Network> {
    let bad = |m: String| Err(Error::NetworkInvalid(m));
    if name.is_empty()
        || name.len() > 32
        || !name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
    {
        return bad(format!(
            "name {name:?} must be 1-32 letters, digits, '-' or '_'"
        ));
    }
    let bridge = bridge
        .map(str::to_string)
        .unwrap_or_else(|| format!("rn-{name}"));
    if bridge.is_empty() || bridge.len() > 15 || bridge.contains(['/', ' ', ':']) {
        return bad(format!("bridge name {bridge:?} must be 1-15 characters without '/', ':' or spaces (use --bridge)"));
    }
    if subnet.prefix_len() > 30 {
        return bad(format!("subnet {subnet} is too small (at most /30)"));
    }
    let subnet = subnet.trunc();
    let gateway = gateway.unwrap_or_else(|| Ipv4Addr::from(u32::from(subnet.network()) + 1));
    if !subnet.contains(&gateway) || gateway == subnet.network() || gateway == subnet.broadcast() {
        return bad(format!(
            "gateway {gateway} is not a host address of {subnet}"
        ));
    }
    for n in existing {
        if n.name == name {
            return Err(Error::NetworkExists(name.to_string()));
        }
        if n.subnet.contains(&subnet.network()) || subnet.contains(&n.subnet.network()) {
            return bad(format!(
                "subnet {subnet} overlaps network {:?} ({})",
                n.name, n.subnet
            ));
        }
        if n.bridge == bridge {
            return bad(format!(
                "bridge {bridge} is already used by network {:?}",
                n.name
            ));
        }
    }
    Ok(Network {
        name: name.to_string(),
        bridge,
        subnet,
        gateway,
    })
}

/// A fresh random container id (12 hex digits).
fn new_id() -> String {
    format!("{:012x}", rand::random::<u64>() & 0xffff_ffff_ffff)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn net(s: &str) -> Ipv4Net {
        s.parse().expect("net")
    }

    #[test]
    fn network_defaults_and_validation() {
        let n = validate_network("t", None, net("192.0.2.0/24"), None, &[]).expect("valid");
        assert_eq!(
            (n.bridge.as_str(), n.gateway),
            ("rn-t", Ipv4Addr::new(192, 0, 2, 1))
        );
        assert!(validate_network("t", None, net("192.0.2.0/31"), None, &[]).is_err());
        assert!(validate_network("bad name", None, net("192.0.2.0/24"), None, &[]).is_err());
        assert!(
            validate_network("averylongnetworkname", None, net("192.0.2.0/24"), None, &[]).is_err()
        );
        assert!(validate_network(
            "t",
            None,
            net("192.0.2.0/24"),
            Some(Ipv4Addr::new(198, 51, 100, 1)),
            &[]
        )
        .is_err());
        let other = [n.clone()];
        assert!(matches!(
            validate_network("t", Some("x"), net("198.51.100.0/24"), None, &other),
            Err(Error::NetworkExists(_))
        ));
        assert!(
            validate_network("u", None, net("192.0.2.128/25"), None, &other).is_err(),
            "overlap"
        );
        assert!(validate_network("u", None, net("198.51.100.0/24"), None, &other).is_ok());
    }

    #[test]
    fn ids_are_twelve_hex_digits() {
        let id = new_id();
        assert_eq!(id.len(), 12);
        assert!(id.chars().all(|c| c.is_ascii_hexdigit()));
    }
}
