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

use std::collections::{HashMap, HashSet};
use std::io;
use std::net::{IpAddr, Ipv4Addr, SocketAddr, TcpListener, UdpSocket};
use std::path::PathBuf;

use ipnet::Ipv4Net;

use crate::dns;
use crate::ipam;
use crate::link::{set_sysctl, LinkError, Netlink, VethSpec};
use crate::netns::NetNs;
use crate::nft::{Dnat, Firewall, NftError, Op};
use crate::process;
use crate::spec::{PortMapping, Protocol, SpecParseError};
use crate::state::{
    self, Allocations, Container, Network, Owner, StateDirs, StateError, StateLock,
};

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
    #[error("an attachment for this container and interface already exists ({0})")]
    AttachmentExists(String),
    #[error("interface {0:?} already exists in the container's namespace")]
    IfaceExists(String),
    #[error("address {ip} is not available in network {network:?}")]
    AddressUnavailable { ip: Ipv4Addr, network: String },
    #[error("invalid container name {0:?}: use 1-64 letters, digits, '-', '_' or '.', starting with a letter or digit")]
    InvalidName(String),
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

/// Which network a container joins.
#[derive(Debug, Clone)]
pub enum NetworkChoice {
    /// A network defined with `rnat network create` (`None`: the default network).
    Named(Option<String>),
    /// A network defined by the caller (a CNI configuration): recorded, or updated, as given.
    Defined(Network),
}

/// What `create` needs to know about a new container.
#[derive(Debug, Clone)]
pub struct CreateOpts {
    pub name: Option<String>,
    pub network: NetworkChoice,
    pub ports: Vec<PortMapping>,
    /// Write a resolv.conf for the container (and forward DNS to a host loopback stub if needed).
    pub resolv: bool,
    /// A specific address instead of the next free one.
    pub ip: Option<Ipv4Addr>,
    /// A specific MAC address for the container's interface.
    pub mac: Option<[u8; 6]>,
}

/// Where the container's interface goes, and who owns the result.
#[derive(Debug)]
pub struct Sandbox {
    pub netns: NetNs,
    pub ifname: String,
    pub owner: Owner,
    /// A stable id (CNI derives it from the container id and interface); random when `None`.
    pub id: Option<String>,
}

impl Sandbox {
    /// A new namespace owned by this process, with the container's interface named `eth0`.
    pub fn new_process() -> Result<Sandbox> {
        let pid = std::process::id();
        Ok(Sandbox {
            netns: NetNs::create().map_err(io_ctx("creating network namespace"))?,
            ifname: CONTAINER_IF.to_string(),
            // The slot is chosen by `create`, under the state lock.
            owner: Owner::Process { pid, slot: 0 },
            id: None,
        })
    }
}

/// A container whose network is ready and whose command has not started yet.
pub struct Prepared {
    pub record: Container,
    pub netns: NetNs,
    pub resolv: Option<PathBuf>,
    /// Held for the container's life when a process owns it.
    pub owner_lock: Option<state::OwnerLock>,
}

/// The host side: state, links and firewall of the namespace rnat runs in.
pub struct Engine {
    dirs: StateDirs,
    nl: Netlink,
    fw: Firewall,
    /// Ids of the running containers, as `live` last found them (under the lock).
    live_ids: HashSet<String>,
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
            live_ids: HashSet::new(),
        })
    }

    pub fn dirs(&self) -> &StateDirs {
        &self.dirs
    }

    /// Writes a container's record (one file, O(1) whatever else runs).
    fn put_record(&mut self, rec: &Container) -> Result<(), StateError> {
        self.dirs.write_record(rec)
    }

    fn ipam_path(&self, network: &str) -> PathBuf {
        self.dirs.ipam().join(format!("{network}.json"))
    }

    fn network_path(&self, name: &str) -> PathBuf {
        self.dirs.networks().join(format!("{name}.json"))
    }

    /// The running containers, after tearing down every one whose owner died without doing it.
    /// Reads no record of a live container: the listing names each record's owner slot, and a
    /// slot is checked with one `fcntl`.
    pub fn live(&mut self, _lock: &StateLock) -> Result<Vec<state::Entry>> {
        let probe = state::OwnerProbe::open(&self.dirs);
        let mut live = Vec::new();
        for e in self.dirs.list_records()? {
            if e.slot.is_none_or(|s| probe.held(s)) {
                live.push(self.dirs.migrate_record(e)?);
            } else if let Some(rec) = self.dirs.read_record(&e)? {
                tracing::info!(container = %rec.name, "owner process is gone; cleaning up");
                self.teardown_locked(&rec)?;
            }
        }
        self.live_ids = live.iter().map(|e| e.id.clone()).collect();
        Ok(live)
    }

    /// The records of the running containers (after `live`'s clean-up).
    pub fn live_records(&mut self, lock: &StateLock) -> Result<Vec<Container>> {
        let mut out = Vec::new();
        for e in self.live(lock)? {
            out.extend(self.dirs.read_record(&e)?);
        }
        Ok(out)
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
            &[],
            None,
            &self.networks()?,
        )?;
        state::write_json(&self.network_path(&net.name), &net)?;
        Ok(net)
    }

    /// Makes sure the kernel side of a network exists: forwarding, rnat's table, the bridge, the
    /// masquerade rules. Returns the bridge's index.
    fn ensure_dataplane(&mut self, net: &Network) -> Result<u32> {
        let created_table = self.fw.ensure_table()?;
        let (bridge, created_bridge) =
            self.nl
                .ensure_bridge(&net.bridge, net.gateway, net.subnet.prefix_len())?;
        for pool in &net.extra {
            self.nl
                .add_address(bridge, pool.gateway, pool.subnet.prefix_len())?;
        }
        // Read through netlink (a /proc/sys/net path costs a look-up that grows with the number
        // of network namespaces), written only when they are off. `ip_forward` turns forwarding on
        // for every link, the bridge included, so the bridge's flag tells whether it is on.
        let conf = self.nl.inet_conf(&net.bridge)?;
        if conf.as_ref().is_none_or(|c| c.forwarding != 1) {
            set_sysctl("net.ipv4.ip_forward", "1")?;
        }
        // Packets to or from 127.0.0.0/8 may cross the bridge: published on 127.0.0.1 (DNAT in
        // output) and DNS forwarded to a loopback stub (DNAT in prerouting).
        if conf.as_ref().is_none_or(|c| c.route_localnet != 1) {
            set_sysctl(&format!("net/ipv4/conf/{}/route_localnet", net.bridge), "1")?;
        }
        if created_table || created_bridge {
            self.fw.set_networks(&masq_nets(&self.networks()?))?;
        }
        Ok(bridge)
    }

    /// Rejects ports already taken, by a container or by a socket on this host. Reads only the
    /// port index buckets the new ports fall in, each once.
    fn check_ports(&self, ports: &[PortMapping]) -> Result<()> {
        let mut buckets: HashMap<(Protocol, u16), Vec<state::PortOwner>> = HashMap::new();
        for m in ports {
            if matches!(m.host_ip, Some(IpAddr::V6(_))) {
                return Err(Error::Ipv6(m.to_string()));
            }
            let owners = match buckets.entry((m.protocol, m.host_port / 64)) {
                std::collections::hash_map::Entry::Occupied(o) => o.into_mut(),
                std::collections::hash_map::Entry::Vacant(v) => {
                    v.insert(self.dirs.ports_in_bucket(m.protocol, m.host_port)?)
                }
            };
            let clash = owners
                .iter()
                .find(|o| self.live_ids.contains(&o.id) && o.mapping.conflicts_with(m));
            if let Some(o) = clash {
                return Err(Error::PortPublished {
                    mapping: m.to_string(),
                    owner: o.name.clone(),
                });
            }
            probe_bind(m)?;
        }
        Ok(())
    }

    /// Sets up a container's network in `sandbox`. On failure nothing of it is left.
    pub fn create(&mut self, opts: &CreateOpts, sandbox: Sandbox) -> Result<Prepared> {
        let lock = self.dirs.lock()?;
        crate::timing::mark("lock");
        let live = self.live(&lock)?;
        crate::timing::mark("list");
        let id = sandbox.id.clone().unwrap_or_else(new_id);
        if live.iter().any(|e| e.id == id) {
            return Err(Error::AttachmentExists(id));
        }
        let name = opts
            .name
            .clone()
            .unwrap_or_else(|| format!("rnat-{}", &id[..6]));
        if matches!(sandbox.owner, Owner::Process { .. }) {
            validate_name(&name)?;
        }
        if live.iter().any(|e| e.name.as_ref() == Some(&name)) {
            return Err(Error::NameTaken(name));
        }
        self.check_ports(&opts.ports)?;
        crate::timing::mark("ports");
        let net = match &opts.network {
            NetworkChoice::Named(n) => self.network(n.as_deref())?,
            NetworkChoice::Defined(n) => self.define_network(n, &live)?,
        };
        let bridge = self.ensure_dataplane(&net)?;
        crate::timing::mark("dataplane");
        let inside = Netlink::open_in(&sandbox.netns)?;
        if inside.index(&sandbox.ifname)?.is_some() {
            return Err(Error::IfaceExists(sandbox.ifname.clone()));
        }

        let mut rec = Container {
            id: id.clone(),
            name,
            network: net.name.clone(),
            ip: Ipv4Addr::UNSPECIFIED,
            prefix: net.subnet.prefix_len(),
            gateway: net.gateway,
            veth: format!("rv{}", &id[..8]),
            ifname: sandbox.ifname.clone(),
            default_route: inside.default_gateway()?.is_none(),
            owner: sandbox.owner.clone(),
            netns_inode: sandbox
                .netns
                .inode()
                .map_err(io_ctx("reading namespace inode"))?,
            ports: Vec::new(),
        };
        crate::timing::mark("inside");
        let (ip, pool) = self.allocate(&net, &id, opts.ip)?;
        crate::timing::mark("ipam");
        (rec.ip, rec.prefix, rec.gateway) = (ip, pool.subnet.prefix_len(), pool.gateway);
        let owner_lock = match &mut rec.owner {
            Owner::Process { slot, .. } => match state::take_owner_lock(&self.dirs, {
                *slot = free_slot(&live);
                *slot
            }) {
                Ok(l) => Some(l),
                Err(e) => {
                    let _ = self.teardown_locked(&rec);
                    return Err(e.into());
                }
            },
            Owner::Cni { .. } => None,
        };
        match self.setup_locked(&mut rec, &net, bridge, &sandbox.netns, &inside, opts) {
            Ok(resolv) => Ok(Prepared {
                record: rec,
                netns: sandbox.netns,
                resolv,
                owner_lock,
            }),
            Err(e) => {
                if let Err(t) = self.teardown_locked(&rec) {
                    tracing::error!("rollback after failed setup: {t}");
                }
                Err(e)
            }
        }
    }

    /// Records a caller-defined network, or checks it against the recorded one. A network whose
    /// definition changed may be replaced only while no container uses it.
    fn define_network(&mut self, want: &Network, live: &[state::Entry]) -> Result<Network> {
        let path = self.network_path(&want.name);
        let existing = state::read_json::<Network>(&path)?;
        if existing.as_ref() == Some(want) {
            return Ok(want.clone());
        }
        if existing.is_some() {
            // Only when a definition changes are the running containers' records read.
            let mut users: Vec<String> = Vec::new();
            for e in live {
                users.extend(
                    self.dirs
                        .read_record(e)?
                        .filter(|c| c.network == want.name)
                        .map(|c| c.name),
                );
            }
            if !users.is_empty() {
                return Err(Error::NetworkInvalid(format!(
                    "network {:?} is defined differently while {} use(s) it",
                    want.name,
                    users.join(", ")
                )));
            }
        }
        let others: Vec<Network> = self
            .networks()?
            .into_iter()
            .filter(|n| n.name != want.name)
            .collect();
        let extra: Vec<Ipv4Net> = want.extra.iter().map(|p| p.subnet).collect();
        let mut net = validate_network(
            &want.name,
            Some(&want.bridge),
            want.subnet,
            &extra,
            Some(want.gateway),
            &others,
        )?;
        net.mtu = want.mtu;
        net.masquerade = want.masquerade;
        net.hairpin = want.hairpin;
        state::write_json(&path, &net)?;
        // The masquerade rules depend on every network's definition.
        self.fw.ensure_table()?;
        self.fw.set_networks(&masq_nets(&self.networks()?))?;
        Ok(net)
    }

    fn setup_locked(
        &mut self,
        rec: &mut Container,
        net: &Network,
        bridge: u32,
        netns: &NetNs,
        inside: &Netlink,
        opts: &CreateOpts,
    ) -> Result<Option<PathBuf>> {
        // One record write, before any kernel object, listing the ports too: they were checked
        // against every live record under this lock, so a rollback can only remove map elements
        // that no live container owns.
        rec.ports = opts.ports.clone();
        self.put_record(rec)?;
        self.dirs
            .index_ports(&rec.id, &rec.name, &rec.ports, true)?;
        crate::timing::mark("record");
        let veth = VethSpec {
            host: &rec.veth,
            peer: &rec.ifname,
            mtu: net.mtu,
            hairpin: net.hairpin,
            peer_mac: opts.mac,
        };
        self.nl.create_veth(&veth, netns, bridge)?;
        crate::timing::mark("veth");
        // The container's end drops IPv6 altogether (a bridge port, the host's end only needs no
        // addresses of its own: `create_veth`).
        let ifname = rec.ifname.clone();
        netns
            .run_in(move || crate::link::disable_ipv6(&ifname))
            .map_err(io_ctx("entering the container's namespace"))??;
        let addr =
            Ipv4Net::new(rec.ip, rec.prefix).map_err(|e| Error::NetworkInvalid(e.to_string()))?;
        inside.configure_container(&rec.ifname, addr, rec.gateway, rec.default_route)?;
        crate::timing::mark("configure");
        let dnats = dnats_for(&opts.ports, rec.ip)?;
        self.fw.add_dnats(&dnats)?;
        crate::timing::mark("dnat");
        if !opts.resolv {
            return Ok(None);
        }
        let host_resolv = std::fs::read_to_string("/etc/resolv.conf").unwrap_or_default();
        let plan = dns::plan(&host_resolv, rec.gateway);
        if let Some(stub) = plan.forward_to {
            self.fw.set_dns_forward(rec.gateway, stub, Op::Create)?;
        }
        // One file per gateway, not per container: set-up makes no new file for it (see
        // `write_replace` on why new files are worth avoiding).
        let resolv = self.dirs.resolv(rec.gateway);
        state::write_runtime_shared(&resolv, plan.contents.as_bytes())?;
        crate::timing::mark("resolv");
        Ok(Some(resolv))
    }

    /// Picks an address: the requested one, or the next free one of the first subnet with room.
    fn allocate(
        &self,
        net: &Network,
        id: &str,
        want: Option<Ipv4Addr>,
    ) -> Result<(Ipv4Addr, state::Pool)> {
        let path = self.ipam_path(&net.name);
        let mut alloc: Allocations = state::read_json(&path)?.unwrap_or_default();
        // An allocation whose container has no record was left by a crash between allocating and
        // recording: it is free again. (`self.live_ids` holds every running container here.)
        alloc.addrs.retain(|_, owner| self.live_ids.contains(owner));
        let pools = net.pools();
        let (ip, pool) = match want {
            Some(ip) => {
                let pool = pools.iter().find(|p| {
                    p.subnet.contains(&ip)
                        && ip != p.subnet.network()
                        && ip != p.subnet.broadcast()
                        && ip != p.gateway
                });
                match pool {
                    Some(p) if !alloc.addrs.contains_key(&ip) => (ip, *p),
                    _ => {
                        return Err(Error::AddressUnavailable {
                            ip,
                            network: net.name.clone(),
                        })
                    }
                }
            }
            None => pools
                .iter()
                .find_map(|p| ipam::pick(p.subnet, p.gateway, &alloc).map(|ip| (ip, *p)))
                .ok_or_else(|| Error::Exhausted {
                    network: net.name.clone(),
                    subnet: net.subnet,
                })?,
        };
        alloc.addrs.insert(ip, id.to_string());
        alloc.last = Some(ip);
        state::write_json(&path, &alloc)?;
        Ok((ip, pool))
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

    /// Removes everything of a container, reporting every step that failed. What is removed is
    /// the stored record (`rec` as `publish` and `unpublish` left it), not the caller's copy.
    pub fn destroy(&mut self, rec: &Container) -> Result<()> {
        let _lock = self.dirs.lock()?;
        let current = self.attachment(&rec.id)?.unwrap_or_else(|| rec.clone());
        self.teardown_locked(&current)
    }

    fn teardown_locked(&mut self, rec: &Container) -> Result<()> {
        let mut errors: Vec<String> = Vec::new();
        // Processes the command left behind. Only while the veth exists is the namespace
        // certainly still the container's (the pair dies with the namespace).
        let owns_processes = matches!(rec.owner, Owner::Process { .. });
        match self.nl.index(&rec.veth) {
            Ok(Some(_)) if owns_processes => {
                let n = process::kill_netns_processes(rec.netns_inode);
                if n > 0 {
                    tracing::info!(container = %rec.name, "killed {n} leftover process(es)");
                }
            }
            Ok(_) => {}
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
        if let Err(e) = self.dirs.index_ports(&rec.id, &rec.name, &rec.ports, false) {
            errors.push(e.to_string());
        }
        if let Err(e) = self.dirs.remove_record(rec) {
            errors.push(e.to_string());
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

    /// The running container named `name` (or the only one when no name is given).
    fn find(&self, live: &[state::Entry], name: Option<&str>) -> Result<Container> {
        let entry = match name {
            Some(n) => live
                .iter()
                .find(|e| e.name.as_deref() == Some(n))
                .ok_or_else(|| Error::NoContainer(n.to_string()))?,
            None if live.len() == 1 => &live[0],
            None => return Err(Error::Ambiguous(live.len())),
        };
        self.dirs
            .read_record(entry)?
            .ok_or_else(|| Error::NoContainer(name.unwrap_or_default().to_string()))
    }

    /// Adds published ports to a running container, in one transaction.
    pub fn publish(&mut self, name: Option<&str>, ports: &[PortMapping]) -> Result<Container> {
        let lock = self.dirs.lock()?;
        let live = self.live(&lock)?;
        let mut rec = self.find(&live, name)?;
        self.check_ports(ports)?;
        let dnats = dnats_for(ports, rec.ip)?;
        self.fw.add_dnats(&dnats)?;
        rec.ports.extend_from_slice(ports);
        if let Err(e) = self.put_record(&rec) {
            if let Err(r) = self.fw.remove_dnats(&dnats) {
                tracing::error!("rollback of published ports: {r}");
            }
            return Err(e.into());
        }
        self.dirs.index_ports(&rec.id, &rec.name, ports, true)?;
        Ok(rec)
    }

    /// Removes published ports from a running container, in one transaction.
    pub fn unpublish(&mut self, name: Option<&str>, ports: &[PortMapping]) -> Result<Container> {
        let lock = self.dirs.lock()?;
        let live = self.live(&lock)?;
        let mut rec = self.find(&live, name)?;
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
        self.put_record(&rec)?;
        self.dirs.index_ports(&rec.id, &rec.name, ports, false)?;
        Ok(rec)
    }

    /// Defines a network (its bridge is made when a container first uses it).
    pub fn network_create(
        &mut self,
        name: &str,
        subnets: &[Ipv4Net],
        gateway: Option<Ipv4Addr>,
        bridge: Option<&str>,
    ) -> Result<Network> {
        let _lock = self.dirs.lock()?;
        let existing = self.networks()?;
        let Some((subnet, extra)) = subnets.split_first() else {
            return Err(Error::NetworkInvalid("a network needs a subnet".into()));
        };
        let subnet = *subnet;
        let net = validate_network(name, bridge, subnet, extra, gateway, &existing)?;
        state::write_json(&self.network_path(name), &net)?;
        Ok(net)
    }

    /// Removes a network: its bridge, DNS forwarding, masquerade rules and records.
    pub fn network_rm(&mut self, name: &str) -> Result<()> {
        let lock = self.dirs.lock()?;
        let live = self.live_records(&lock)?;
        let Some(net) = state::read_json::<Network>(&self.network_path(name))? else {
            return Err(Error::NoNetwork(name.to_string()));
        };
        let users: Vec<String> = live
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
            .set_dns_forwards_removed(&net.pools().iter().map(|p| p.gateway).collect::<Vec<_>>())
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
        match self.fw.set_networks(&masq_nets(&self.networks()?)) {
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

/// Operations on attachments by id (the CNI plugin's view).
impl Engine {
    /// The record of attachment `id`, if there is one.
    pub fn attachment(&mut self, id: &str) -> Result<Option<Container>> {
        match self.dirs.list_records()?.into_iter().find(|e| e.id == id) {
            Some(e) => Ok(self.dirs.read_record(&e)?),
            None => Ok(None),
        }
    }

    /// Removes attachment `id`. Idempotent: a missing record is fine, and the host veth the id
    /// names is removed even without one (a crash between veth and record, or lost state).
    pub fn remove_attachment(&mut self, id: &str) -> Result<()> {
        let _lock = self.dirs.lock()?;
        match self.attachment(id)? {
            Some(rec) => self.teardown_locked(&rec),
            None => {
                self.nl.delete(&format!("rv{}", &id[..8.min(id.len())]))?;
                Ok(())
            }
        }
    }

    /// The MAC address of a host link.
    pub fn host_mac(&self, name: &str) -> Result<Option<[u8; 6]>> {
        Ok(self.nl.mac(name)?)
    }

    /// What differs between an attachment's record and the kernel: host veth on its bridge,
    /// the container interface with its address and default route, the published ports' elements.
    pub fn verify(&self, rec: &Container, netns: &NetNs) -> Result<Vec<String>> {
        let mut drift = Vec::new();
        let net = state::read_json::<Network>(&self.network_path(&rec.network))?;
        match (self.nl.master_of(&rec.veth)?, &net) {
            (None, _) => drift.push(format!("host interface {} is missing", rec.veth)),
            (Some(master), Some(net)) => {
                if self.nl.index(&net.bridge)? != Some(master) {
                    drift.push(format!(
                        "{} is not a port of bridge {}",
                        rec.veth, net.bridge
                    ));
                }
            }
            (Some(_), None) => drift.push(format!("network {} is not defined", rec.network)),
        }
        let inside = Netlink::open_in(netns)?;
        if inside.index(&rec.ifname)?.is_none() {
            drift.push(format!(
                "interface {} is missing from the container",
                rec.ifname
            ));
        } else {
            if !inside
                .addresses(&rec.ifname)?
                .contains(&(rec.ip, rec.prefix))
            {
                drift.push(format!("{} lacks {}/{}", rec.ifname, rec.ip, rec.prefix));
            }
            if let (Some(net), true) = (&net, rec.default_route) {
                let _ = net;
                if inside.default_gateway()? != Some(rec.gateway) {
                    drift.push(format!("the default route is not via {}", rec.gateway));
                }
            }
        }
        let dnats = dnats_for(&rec.ports, rec.ip)?;
        let mut fw = Firewall::open()?;
        for (d, present) in dnats.iter().zip(fw.dnats_present(&dnats)?) {
            if !present {
                drift.push(format!(
                    "published port {}/{} is missing from map {}",
                    d.host_port,
                    d.protocol,
                    d.map()
                ));
            }
        }
        Ok(drift)
    }

    /// Removes every CNI attachment of `network` whose id is not in `keep`, and host veths on its
    /// bridge that no record explains. Returns what it removed.
    pub fn gc(
        &mut self,
        network: &str,
        bridge: &str,
        keep: &HashSet<String>,
    ) -> Result<Vec<String>> {
        let _lock = self.dirs.lock()?;
        let mut removed = Vec::new();
        let mut errors = Vec::new();
        let mut records: Vec<Container> = Vec::new();
        for e in self.dirs.list_records()? {
            records.extend(self.dirs.read_record(&e)?);
        }
        for rec in &records {
            let stale =
                rec.network == network && rec.cni_key().is_some() && !keep.contains(&rec.id);
            if stale {
                match self.teardown_locked(rec) {
                    Ok(()) => removed.push(rec.name.clone()),
                    Err(e) => errors.push(e.to_string()),
                }
            }
        }
        let known: HashSet<&str> = records.iter().map(|r| r.veth.as_str()).collect();
        if let Some(bridge_index) = self.nl.index(bridge)? {
            for port in self.nl.ports_of(bridge_index)? {
                let ours = port.starts_with("rv") && port.len() == 10;
                if ours && !known.contains(port.as_str()) {
                    match self.nl.delete(&port) {
                        Ok(_) => removed.push(port),
                        Err(e) => errors.push(e.to_string()),
                    }
                }
            }
        }
        if errors.is_empty() {
            Ok(removed)
        } else {
            Err(Error::Teardown(format!(
                "garbage collection incomplete: {}",
                errors.join("; ")
            )))
        }
    }

    /// Whether nftables answers (an empty transaction).
    pub fn probe_firewall(&mut self) -> Result<()> {
        Ok(self.fw.probe()?)
    }

    /// Whether a network (by name, or a subnet not yet recorded) has an address to give.
    pub fn has_free_address(&self, network: &str, subnets: &[Ipv4Net]) -> Result<bool> {
        let alloc: Allocations = state::read_json(&self.ipam_path(network))?.unwrap_or_default();
        let pools: Vec<(Ipv4Net, Ipv4Addr)> =
            match state::read_json::<Network>(&self.network_path(network))? {
                Some(n) => n.pools().iter().map(|p| (p.subnet, p.gateway)).collect(),
                None if subnets.is_empty() => return Ok(true),
                None => subnets
                    .iter()
                    .map(|s| (*s, Ipv4Addr::from(u32::from(s.network()) + 1)))
                    .collect(),
            };
        Ok(pools
            .iter()
            .any(|(s, g)| ipam::pick(*s, *g, &alloc).is_some()))
    }
}

/// The smallest owner-lock slot no live container uses.
fn free_slot(live: &[state::Entry]) -> u32 {
    let used: HashSet<u32> = live.iter().filter_map(|e| e.slot).collect();
    (0..).find(|s| !used.contains(s)).unwrap_or(u32::MAX)
}

/// Each network's subnets and whether its outbound traffic is masqueraded.
fn masq_nets(nets: &[Network]) -> Vec<(Ipv4Net, bool)> {
    nets.iter()
        .flat_map(|n| n.pools().into_iter().map(move |p| (p.subnet, n.masquerade)))
        .collect()
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

/// A container name: 1-64 letters, digits, '-', '_' or '.', starting with a letter or digit.
pub fn validate_name(name: &str) -> Result<()> {
    let ok = (1..=64).contains(&name.len())
        && name.starts_with(|c: char| c.is_ascii_alphanumeric())
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'));
    if ok {
        Ok(())
    } else {
        Err(Error::InvalidName(name.to_string()))
    }
}

/// Checks a network definition against the others.
pub fn validate_network(
    name: &str,
    bridge: Option<&str>,
    subnet: Ipv4Net,
    extra_subnets: &[Ipv4Net],
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
    for s in std::iter::once(&subnet).chain(extra_subnets) {
        if s.prefix_len() > 30 {
            return bad(format!("subnet {s} is too small (at most /30)"));
        }
    }
    let subnet = subnet.trunc();
    let extra: Vec<state::Pool> = extra_subnets
        .iter()
        .map(|s| state::Pool {
            subnet: s.trunc(),
            gateway: Ipv4Addr::from(u32::from(s.trunc().network()) + 1),
        })
        .collect();
    let mine: Vec<Ipv4Net> = std::iter::once(subnet)
        .chain(extra.iter().map(|p| p.subnet))
        .collect();
    for (i, a) in mine.iter().enumerate() {
        if let Some(b) = mine[i + 1..].iter().find(|b| overlap(a, b)) {
            return bad(format!("subnets {a} and {b} overlap"));
        }
    }
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
        for theirs in n.pools() {
            if let Some(a) = mine.iter().find(|a| overlap(a, &theirs.subnet)) {
                return bad(format!(
                    "subnet {a} overlaps network {:?} ({})",
                    n.name, theirs.subnet
                ));
            }
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
        mtu: None,
        masquerade: true,
        hairpin: true,
        extra,
    })
}

fn overlap(a: &Ipv4Net, b: &Ipv4Net) -> bool {
    a.contains(&b.network()) || b.contains(&a.network())
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
        let n = validate_network("t", None, net("192.0.2.0/24"), &[], None, &[]).expect("valid");
        assert_eq!(
            (n.bridge.as_str(), n.gateway),
            ("rn-t", Ipv4Addr::new(192, 0, 2, 1))
        );
        assert!(validate_network("t", None, net("192.0.2.0/31"), &[], None, &[]).is_err());
        assert!(validate_network("bad name", None, net("192.0.2.0/24"), &[], None, &[]).is_err());
        assert!(validate_network(
            "averylongnetworkname",
            None,
            net("192.0.2.0/24"),
            &[],
            None,
            &[]
        )
        .is_err());
        assert!(validate_network(
            "t",
            None,
            net("192.0.2.0/24"),
            &[],
            Some(Ipv4Addr::new(198, 51, 100, 1)),
            &[]
        )
        .is_err());
        let other = [n.clone()];
        assert!(matches!(
            validate_network("t", Some("x"), net("198.51.100.0/24"), &[], None, &other),
            Err(Error::NetworkExists(_))
        ));
        assert!(
            validate_network("u", None, net("192.0.2.128/25"), &[], None, &other).is_err(),
            "overlap"
        );
        assert!(validate_network("u", None, net("198.51.100.0/24"), &[], None, &other).is_ok());
    }

    #[test]
    fn several_subnets_make_pools_that_must_not_overlap() {
        let n = validate_network(
            "p",
            None,
            net("192.0.2.0/26"),
            &[net("192.0.2.64/26")],
            None,
            &[],
        )
        .expect("valid");
        assert_eq!(n.pools().len(), 2);
        assert_eq!(n.pools()[1].gateway, Ipv4Addr::new(192, 0, 2, 65));
        assert!(validate_network(
            "p",
            None,
            net("192.0.2.0/25"),
            &[net("192.0.2.64/26")],
            None,
            &[]
        )
        .is_err());
        let other = [n];
        assert!(validate_network(
            "q",
            None,
            net("198.51.100.0/24"),
            &[net("192.0.2.96/27")],
            None,
            &other
        )
        .is_err());
    }

    #[test]
    fn container_names_are_checked() {
        for good in ["web", "web-1", "a.b_c", "0x"] {
            assert!(validate_name(good).is_ok(), "{good}");
        }
        let long = "x".repeat(65);
        for bad in [
            "",
            "-web",
            ".hidden",
            "a b",
            "a/b",
            "new\nline",
            long.as_str(),
        ] {
            assert!(validate_name(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn ids_are_twelve_hex_digits() {
        let id = new_id();
        assert_eq!(id.len(), 12);
        assert!(id.chars().all(|c| c.is_ascii_hexdigit()));
    }
}
