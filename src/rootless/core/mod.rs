//! The rootless NAT's protocol core: frames from the guest in, host socket operations and frames
//! to the guest out, time passed in. It does no I/O of its own (see [`Host`]), so the same code is
//! driven by the epoll loop in `rootless::driver` and by the simulated network in its tests.
//!
//! smoltcp's `wire` module parses and emits the packets; the flow tables are rnat's own (one hash
//! lookup per frame), because a NAT must see every new flow first and decide what to do with it.

pub mod csum;
pub mod frame;
pub mod host;
mod tcp;
mod udp;

#[cfg(test)]
mod regress;
#[cfg(test)]
mod sim;
#[cfg(test)]
mod tests;

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::time::{Duration, Instant};

use ipnet::Ipv4Net;
use serde::Serialize;
use slab::Slab;
use smoltcp::wire::{
    ArpOperation, ArpPacket, ArpRepr, EthernetAddress, EthernetFrame, EthernetProtocol, IpProtocol,
    Ipv4Packet, TcpPacket, UdpPacket,
};

use frame::Macs;
pub use host::{DgramError, FlowId, Host, Peek, Ready, RxMeta, TxMeta, Unreachable};
use tcp::{Out, Segment, TcpFlow, Verdict};
use udp::{PingFlow, UdpFlow};

/// The MAC address the gateway and DNS addresses answer with (slirp's convention).
pub const GATEWAY_MAC: [u8; 6] = [0x52, 0x55, 0x0a, 0x00, 0x02, 0x02];

/// The router's link-local address: where router advertisements come from and the default route
/// they give points.
pub const ROUTER_LL: Ipv6Addr = Ipv6Addr::new(0xfe80, 0, 0, 0, 0, 0, 0, 2);
/// All nodes on the link.
const ALL_NODES: Ipv6Addr = Ipv6Addr::new(0xff02, 0, 0, 0, 0, 0, 0, 1);
/// Unsolicited router advertisements, once a guest has asked for one: well within the lifetimes
/// they give (30 minutes for the route and DNS server, 1 and 2 hours for the prefix).
const RA_INTERVAL: Duration = Duration::from_secs(600);
/// How long an inbound flow on a reused 4-tuple waits for the old flow on it to finish with the
/// guest (one round trip to the guest, usually) before the old flow is reset.
const REUSE_WAIT: Duration = Duration::from_secs(1);

/// The Ethernet address an IPv6 multicast address maps to (RFC 2464 7).
fn multicast_mac(ip: Ipv6Addr) -> EthernetAddress {
    let o = ip.octets();
    EthernetAddress([0x33, 0x33, o[12], o[13], o[14], o[15]])
}

/// The solicited-node multicast address of `ip` (RFC 4291 2.7.1).
fn solicited_node(ip: Ipv6Addr) -> Ipv6Addr {
    let o = ip.octets();
    Ipv6Addr::from([
        0xff, 0x02, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1, 0xff, o[13], o[14], o[15],
    ])
}

/// IPv6 on the guest's link: a /64 with slirp4netns' layout (`--enable-ipv6`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Ipv6Config {
    /// The /64 prefix, announced for autoconfiguration.
    pub prefix: Ipv6Addr,
    /// The address rnat configures on the guest's interface (prefix::100).
    pub guest: Ipv6Addr,
    pub gateway: Ipv6Addr,
    pub dns: Ipv6Addr,
}

impl Ipv6Config {
    /// slirp4netns' layout: fd00::/64, guest fd00::100, gateway fd00::2, DNS fd00::3.
    pub fn slirp() -> Ipv6Config {
        let at = |n| Ipv6Addr::new(0xfd00, 0, 0, 0, 0, 0, 0, n);
        Ipv6Config {
            prefix: at(0),
            guest: at(0x100),
            gateway: at(2),
            dns: at(3),
        }
    }

    /// Whether `ip` lies in the guest's /64.
    pub fn on_link(&self, ip: Ipv6Addr) -> bool {
        ip.octets()[..8] == self.prefix.octets()[..8]
    }

    /// Addresses rnat answers for itself: the gateway's two and the DNS server's.
    fn is_ours(&self, ip: Ipv6Addr) -> bool {
        ip == self.gateway || ip == self.dns || ip == ROUTER_LL
    }

    /// A source the guest may use on the link: its /64, or link-local (not multicast or `::`).
    fn guest_source(&self, ip: Ipv6Addr) -> bool {
        self.on_link(ip) || ip.is_unicast_link_local()
    }
}

/// What the core needs to know about the guest's network and its limits.
#[derive(Debug, Clone)]
pub struct Config {
    pub cidr: Ipv4Net,
    pub guest: Ipv4Addr,
    pub gateway: Ipv4Addr,
    pub dns: Ipv4Addr,
    /// IPv6 on the link; `None`: the guest's IPv6 frames are dropped (and counted).
    pub ipv6: Option<Ipv6Config>,
    pub mtu: u16,
    /// Connections to the gateway address reach the host's 127.0.0.1.
    pub allow_host_loopback: bool,
    /// Where DNS sent to `dns` goes (the host's resolvers, in order; a flow uses the first of
    /// its own family, an IPv6 flow falling back to the first of any).
    pub resolvers: Vec<IpAddr>,
    /// Flows of every kind together.
    pub max_flows: usize,
    /// Bytes rnat holds for all flows together: queued from the guest toward host sockets, and
    /// small replies taken out of host sockets until the guest acknowledges them.
    pub max_buffered: usize,
    /// The most bytes a TCP flow with nothing in flight reads out of its host socket (instead of
    /// peeking) and holds until acknowledged; 0: always peek.
    pub take_max: usize,
    /// The most a single flow queues (and so the window it offers the guest).
    pub flow_window: u32,
    /// Frames to the guest use checksum and segmentation offload (a TAP with a virtio header).
    pub offload: bool,
    pub udp_timeout: Duration,
    pub dns_timeout: Duration,
    pub ping_timeout: Duration,
    /// Seeds initial sequence numbers.
    pub seed: u64,
}

impl Config {
    /// slirp4netns' layout in `cidr`: guest .100, gateway .2, DNS .3.
    pub fn for_cidr(cidr: Ipv4Net) -> Result<Config, String> {
        if cidr.addr() != cidr.network() {
            // As slirp4netns refuses it: the address was probably meant for something else.
            return Err(format!(
                "{cidr}: host bits are set (the network would be {})",
                cidr.trunc()
            ));
        }
        if cidr.prefix_len() > 25 {
            return Err(format!(
                "{cidr}: the network needs at least 128 addresses (/25 or larger)"
            ));
        }
        let base = u32::from(cidr.network());
        Ok(Config {
            cidr: cidr.trunc(),
            guest: Ipv4Addr::from(base + 100),
            gateway: Ipv4Addr::from(base + 2),
            dns: Ipv4Addr::from(base + 3),
            ipv6: None,
            mtu: 65520,
            allow_host_loopback: false,
            resolvers: Vec::new(),
            max_flows: 32768,
            max_buffered: 64 << 20,
            take_max: 4096,
            flow_window: 1 << 20,
            offload: false,
            udp_timeout: Duration::from_secs(60),
            dns_timeout: Duration::from_secs(10),
            ping_timeout: Duration::from_secs(30),
            seed: 0x9e37_79b9_7f4a_7c15,
        })
    }

    /// The gateway's address in `ip`'s family (where ICMP errors to the guest come from).
    pub fn gateway_for(&self, ip: IpAddr) -> IpAddr {
        match (ip, self.ipv6) {
            (IpAddr::V6(_), Some(v6)) => v6.gateway.into(),
            (IpAddr::V6(_), None) => ROUTER_LL.into(),
            (IpAddr::V4(_), _) => self.gateway.into(),
        }
    }

    fn is_dns(&self, ip: IpAddr) -> bool {
        match ip {
            IpAddr::V4(a) => a == self.dns,
            IpAddr::V6(a) => self.ipv6.is_some_and(|v6| a == v6.dns),
        }
    }
}

/// Counters: every frame the core drops is counted under a reason.
#[derive(Debug, Default, Clone, Serialize)]
pub struct Stats {
    pub frames_in: u64,
    pub frames_out: u64,
    pub drop_malformed: u64,
    pub drop_checksum: u64,
    pub drop_fragment: u64,
    pub drop_not_for_us: u64,
    pub drop_unsupported: u64,
    pub drop_too_big: u64,
    pub tcp_opened: u64,
    /// Flows opened by host clients of published ports.
    pub tcp_inbound: u64,
    /// SYNs to the guest sent again at once because an old connection was in TIME_WAIT.
    pub tcp_syn_after_timewait: u64,
    /// Host clients of published ports whose 4-tuple (as the guest sees it) another flow held:
    /// their flows waited for it to go (`Core::tcp_inbound`).
    pub tcp_inbound_waited: u64,
    /// ... of which reset, because the flow holding the tuple was a live connection.
    pub tcp_inbound_tuple_busy: u64,
    pub tcp_closed: u64,
    pub tcp_reset: u64,
    pub tcp_reset_by_guest: u64,
    pub tcp_connect_failed: u64,
    pub tcp_refused_policy: u64,
    pub tcp_no_flow: u64,
    pub tcp_out_of_order: u64,
    pub tcp_beyond_window: u64,
    pub tcp_bad_ack: u64,
    pub tcp_fast_retransmit: u64,
    pub tcp_timeout_retransmit: u64,
    pub tcp_bytes_from_guest: u64,
    pub tcp_bytes_to_guest: u64,
    pub udp_opened: u64,
    pub udp_expired: u64,
    pub udp_refused_policy: u64,
    pub udp_filtered: u64,
    pub udp_send_failed: u64,
    /// Destination-unreachable messages passed on to the guest for its datagrams.
    pub udp_unreachable: u64,
    /// Errors for datagrams the guest is not told of (too big, time exceeded, local, or for a
    /// peer the flow no longer remembers).
    pub udp_error_ignored: u64,
    pub icmp_echo_local: u64,
    pub icmp_echo_forwarded: u64,
    pub icmp_unavailable: u64,
    /// Destination-unreachable messages passed on to the guest for its echo requests, and
    /// errors for them it is not told of.
    pub icmp_unreachable: u64,
    pub icmp_error_ignored: u64,
    /// Neighbour and router solicitations answered (IPv6).
    pub ndp_answered: u64,
    /// New flows refused because `max_flows` or `max_buffered` was reached.
    pub refused_limit: u64,
    pub flows: usize,
    pub buffered: usize,
}

enum Flow {
    Tcp(TcpFlow),
    Udp(UdpFlow),
    Ping(PingFlow),
}

/// Why a port cannot be published.
#[derive(Debug, thiserror::Error)]
pub enum PublishError {
    #[error("the port is already published")]
    Published,
    #[error("the container has no IPv6 (--enable-ipv6 gives it some)")]
    NoIpv6,
    #[error(transparent)]
    Host(#[from] std::io::Error),
}

/// The address the guest sees a host client by: a loopback client appears as the gateway of its
/// family (the IPv4 one when the guest has no IPv6).
fn client_as_seen(client: SocketAddr, cfg: &Config) -> SocketAddr {
    if !client.ip().is_loopback() {
        return client;
    }
    let gateway = match (client, &cfg.ipv6) {
        (SocketAddr::V6(_), Some(v6)) => v6.gateway.into(),
        _ => cfg.gateway.into(),
    };
    SocketAddr::new(gateway, client.port())
}

/// Where a guest's packet to `dst` goes on the host, or why it goes nowhere.
enum Route {
    To(SocketAddr),
    Refuse,
}

fn ipv6_from(b: &[u8]) -> Ipv6Addr {
    let mut a = [0u8; 16];
    a.copy_from_slice(&b[..16]);
    Ipv6Addr::from(a)
}

pub struct Core {
    cfg: Config,
    guest_mac: Option<EthernetAddress>,
    flows: Slab<Flow>,
    tcp: HashMap<(SocketAddr, SocketAddr), FlowId>,
    /// Inbound flows waiting for the flow that still holds their 4-tuple in `tcp` to finish.
    parked: HashMap<(SocketAddr, SocketAddr), FlowId>,
    udp: HashMap<SocketAddr, FlowId>,
    ping: HashMap<(IpAddr, u16), FlowId>,
    timers: BinaryHeap<Reverse<(Instant, FlowId)>>,
    new_timers: Vec<(FlowId, Instant)>,
    acks: Vec<FlowId>,
    tx: Box<[u8]>,
    ip_id: u16,
    rng: u64,
    buffered: usize,
    next_sweep: Option<Instant>,
    /// When the ISN clock started.
    epoch: Option<Instant>,
    /// The global queue cap was reached (windows were shut) and has not lifted yet.
    cap_hit: bool,
    /// Datagram flows with something for the guest before its MAC address was known.
    mac_waiters: Vec<FlowId>,
    /// When the next unsolicited router advertisement is due (IPv6, once the guest asked).
    ra_next: Option<Instant>,
    stats: Stats,
}

impl Core {
    pub fn new(cfg: Config) -> Core {
        Core {
            rng: cfg.seed | 1,
            cfg,
            guest_mac: None,
            flows: Slab::new(),
            tcp: HashMap::new(),
            parked: HashMap::new(),
            udp: HashMap::new(),
            ping: HashMap::new(),
            timers: BinaryHeap::new(),
            new_timers: Vec::new(),
            acks: Vec::new(),
            tx: vec![0u8; frame::MAX_FRAME].into_boxed_slice(),
            ip_id: 0,
            buffered: 0,
            next_sweep: None,
            epoch: None,
            cap_hit: false,
            mac_waiters: Vec::new(),
            ra_next: None,
            stats: Stats::default(),
        }
    }

    pub fn config(&self) -> &Config {
        &self.cfg
    }

    pub fn stats(&self) -> Stats {
        let mut s = self.stats.clone();
        s.flows = self.flows.len();
        s.buffered = self.buffered;
        s
    }

    /// An initial sequence number as RFC 6528 makes them: a 4 µs clock plus a keyed hash of the
    /// connection's addresses. A new connection on a 4-tuple the guest still holds in TIME_WAIT
    /// (a client reusing its port) then starts past the old one, and the guest accepts its SYN.
    fn next_iss(&mut self, a: SocketAddr, b: SocketAddr, now: Instant) -> u32 {
        let epoch = *self.epoch.get_or_insert(now);
        let clock = (now.saturating_duration_since(epoch).as_micros() / 4) as u32;
        let mut h = self.rng;
        let mut mix = |word: u32| {
            h = (h ^ u64::from(word)).wrapping_mul(0x9e37_79b9_7f4a_7c15);
            h ^= h >> 29;
        };
        for end in [a, b] {
            match end.ip() {
                IpAddr::V4(ip) => mix(u32::from(ip)),
                IpAddr::V6(ip) => {
                    for w in ip.octets().chunks_exact(4) {
                        mix(u32::from_be_bytes([w[0], w[1], w[2], w[3]]));
                    }
                }
            }
            mix(u32::from(end.port()));
        }
        clock.wrapping_add((h >> 32) as u32)
    }

    fn macs(&self) -> Option<Macs> {
        Some(Macs {
            ours: EthernetAddress(GATEWAY_MAC),
            guest: self.guest_mac?,
        })
    }

    /// Runs `f` on TCP flow `id` with everything it may touch, then applies its verdict.
    fn with_tcp<H: Host>(
        &mut self,
        host: &mut H,
        id: FlowId,
        now: Instant,
        f: impl FnOnce(&mut TcpFlow, &mut Out<H>) -> Verdict,
    ) {
        // Before the guest's address is known, frames go to everyone (and its TCP ignores them);
        // the flow's timers keep running until the ARP answer arrives.
        let macs = self.macs().unwrap_or(Macs {
            ours: EthernetAddress(GATEWAY_MAC),
            guest: EthernetAddress::BROADCAST,
        });
        let Some(Flow::Tcp(flow)) = self.flows.get_mut(id) else {
            return;
        };
        let mut out = Out {
            host,
            tx: &mut self.tx,
            macs,
            ip_id: &mut self.ip_id,
            cfg: &self.cfg,
            stats: &mut self.stats,
            buffered: &mut self.buffered,
            timers: &mut self.new_timers,
            acks: &mut self.acks,
            cap_hit: &mut self.cap_hit,
            now,
        };
        let mut next = None;
        if f(flow, &mut out) == Verdict::Remove {
            let key = (flow.guest, flow.remote);
            if self.tcp.get(&key) == Some(&id) {
                self.tcp.remove(&key);
                next = self.parked.remove(&key).map(|next| (key, next));
            } else if self.parked.get(&key) == Some(&id) {
                self.parked.remove(&key);
            }
            self.flows.remove(id);
        }
        for (id, at) in self.new_timers.drain(..) {
            self.timers.push(Reverse((at, id)));
        }
        if let Some((key, next)) = next {
            self.unpark(host, key, next, now);
        }
    }

    /// Inbound flow `id` has waited `REUSE_WAIT` for the flow holding its 4-tuple: a flow whose
    /// host connection is over is reset (its guest has been slow to finish), and the new flow
    /// opens; a live one stays, and the new flow's client is reset.
    fn reuse_waited<H: Host>(
        &mut self,
        host: &mut H,
        key: (SocketAddr, SocketAddr),
        id: FlowId,
        now: Instant,
    ) {
        let Some(old) = self.tcp.get(&key).copied() else {
            self.parked.remove(&key);
            return self.unpark(host, key, id, now);
        };
        if matches!(self.flows.get(old), Some(Flow::Tcp(f)) if f.host_over()) {
            self.with_tcp(host, old, now, |f, out| f.abort(old, out, true));
        } else {
            self.stats.tcp_inbound_tuple_busy += 1;
            self.with_tcp(host, id, now, |f, out| f.drop_unopened(id, out));
        }
    }

    /// The 4-tuple `key` is free again: the inbound flow `id` that waited for it opens.
    fn unpark<H: Host>(
        &mut self,
        host: &mut H,
        key: (SocketAddr, SocketAddr),
        id: FlowId,
        now: Instant,
    ) {
        self.tcp.insert(key, id);
        self.with_tcp(host, id, now, |f, out| {
            f.open_to_guest(id, out);
            Verdict::Keep
        });
    }

    /// A frame from the guest.
    pub fn on_frame<H: Host>(&mut self, host: &mut H, frame: &[u8], rx: RxMeta, now: Instant) {
        self.stats.frames_in += 1;
        let Ok(eth) = EthernetFrame::new_checked(frame) else {
            self.stats.drop_malformed += 1;
            return;
        };
        let dst = eth.dst_addr();
        if dst != EthernetAddress(GATEWAY_MAC) && !dst.is_broadcast() && !dst.is_multicast() {
            self.stats.drop_not_for_us += 1;
            return;
        }
        let src_mac = eth.src_addr();
        // The guest is alone on its TAP: any unicast source is its address (IPv6 neighbour
        // discovery right after the link comes up teaches it early, before any IPv4).
        if src_mac.is_unicast() && self.guest_mac != Some(src_mac) {
            self.guest_mac = Some(src_mac);
            for id in std::mem::take(&mut self.mac_waiters) {
                // A datagram socket's error queue may hold errors whose wake-up went by too.
                let dgram = matches!(self.flows.get(id), Some(Flow::Udp(_) | Flow::Ping(_)));
                let ready = Ready {
                    readable: true,
                    error: dgram,
                    ..Default::default()
                };
                self.on_ready(host, id, ready, now);
            }
        }
        match eth.ethertype() {
            EthernetProtocol::Arp => self.on_arp(host, src_mac, eth.payload()),
            EthernetProtocol::Ipv4 if dst == EthernetAddress(GATEWAY_MAC) => {
                self.on_ipv4(host, eth.payload(), rx, now)
            }
            EthernetProtocol::Ipv6 if self.cfg.ipv6.is_some() => {
                self.on_ipv6(host, eth.payload(), dst.is_multicast(), rx, now)
            }
            _ => self.stats.drop_unsupported += 1,
        }
    }

    fn on_arp<H: Host>(&mut self, host: &mut H, src_mac: EthernetAddress, payload: &[u8]) {
        let Ok(repr) = ArpPacket::new_checked(payload).and_then(|p| ArpRepr::parse(&p)) else {
            self.stats.drop_malformed += 1;
            return;
        };
        let ArpRepr::EthernetIpv4 {
            operation,
            source_hardware_addr,
            source_protocol_addr,
            target_protocol_addr,
            ..
        } = repr
        else {
            self.stats.drop_unsupported += 1;
            return;
        };
        if source_protocol_addr != self.cfg.guest || !source_hardware_addr.is_unicast() {
            self.stats.drop_not_for_us += 1;
            return;
        }
        self.guest_mac = Some(source_hardware_addr);
        let _ = src_mac;
        if operation != ArpOperation::Request
            || (target_protocol_addr != self.cfg.gateway && target_protocol_addr != self.cfg.dns)
        {
            return; // gratuitous ARP, or a neighbour that does not exist
        }
        let Some(macs) = self.macs() else { return };
        let len = frame::arp_reply(&mut self.tx, macs, target_protocol_addr, self.cfg.guest);
        host.emit(&self.tx[..len], TxMeta::default());
        self.stats.frames_out += 1;
    }

    fn on_ipv4<H: Host>(&mut self, host: &mut H, packet: &[u8], rx: RxMeta, now: Instant) {
        let Ok(ip) = Ipv4Packet::new_checked(packet) else {
            self.stats.drop_malformed += 1;
            return;
        };
        if ip.version() != 4 {
            self.stats.drop_malformed += 1;
            return;
        }
        if !ip.verify_checksum() {
            self.stats.drop_checksum += 1;
            return;
        }
        if ip.more_frags() || ip.frag_offset() != 0 {
            self.stats.drop_fragment += 1;
            return;
        }
        let (src, dst) = (ip.src_addr(), ip.dst_addr());
        if src != self.cfg.guest {
            self.stats.drop_not_for_us += 1;
            return;
        }
        if dst.is_broadcast()
            || dst.is_multicast()
            || dst == self.cfg.cidr.broadcast()
            || dst.is_unspecified()
        {
            self.stats.drop_unsupported += 1;
            return;
        }
        let ip_packet = &packet[..usize::from(ip.total_len())];
        let (s, d) = (IpAddr::V4(src), IpAddr::V4(dst));
        match ip.next_header() {
            IpProtocol::Tcp => self.on_tcp(host, s, d, ip.payload(), rx, now),
            IpProtocol::Udp => self.on_udp(host, s, d, ip.payload(), ip_packet, rx, now),
            IpProtocol::Icmp => self.on_icmp(host, src, dst, ip.payload(), now),
            _ => self.stats.drop_unsupported += 1,
        }
    }

    fn on_ipv6<H: Host>(
        &mut self,
        host: &mut H,
        packet: &[u8],
        multicast: bool,
        rx: RxMeta,
        now: Instant,
    ) {
        let Some(v6) = self.cfg.ipv6 else { return };
        if packet.len() < frame::IP6_LEN || packet[0] >> 4 != 6 {
            self.stats.drop_malformed += 1;
            return;
        }
        let end = frame::IP6_LEN + usize::from(u16::from_be_bytes([packet[4], packet[5]]));
        if end > packet.len() {
            self.stats.drop_malformed += 1;
            return;
        }
        let (next, hops) = (packet[6], packet[7]);
        let src = ipv6_from(&packet[8..24]);
        let dst = ipv6_from(&packet[24..40]);
        let payload = &packet[frame::IP6_LEN..end];
        if next == 58 {
            return self.on_icmpv6(host, src, dst, hops, payload, multicast, now);
        }
        if multicast || dst.is_multicast() {
            self.stats.drop_unsupported += 1;
            return;
        }
        if !v6.on_link(src) {
            self.stats.drop_not_for_us += 1;
            return;
        }
        let (s, d) = (IpAddr::V6(src), IpAddr::V6(dst));
        match next {
            6 => self.on_tcp(host, s, d, payload, rx, now),
            17 => self.on_udp(host, s, d, payload, &packet[..end], rx, now),
            44 => self.stats.drop_fragment += 1,
            _ => self.stats.drop_unsupported += 1,
        }
    }

    /// Neighbour discovery for the gateway's and DNS server's addresses, router solicitations,
    /// and echo requests (answered for those addresses, forwarded for the others).
    #[allow(clippy::too_many_arguments)]
    fn on_icmpv6<H: Host>(
        &mut self,
        host: &mut H,
        src: Ipv6Addr,
        dst: Ipv6Addr,
        hops: u8,
        msg: &[u8],
        multicast: bool,
        now: Instant,
    ) {
        let Some(v6) = self.cfg.ipv6 else { return };
        if msg.len() < 8 {
            self.stats.drop_malformed += 1;
            return;
        }
        let pseudo = csum::pseudo(src.into(), dst.into(), 58, msg.len());
        if csum::fold(csum::add(pseudo, msg)) != 0xffff {
            self.stats.drop_checksum += 1;
            return;
        }
        let Some(macs) = self.macs() else { return };
        let to_all = Macs {
            ours: macs.ours,
            guest: multicast_mac(ALL_NODES),
        };
        match msg[0] {
            // Router solicitation (RFC 4861 6.1.1: hop limit 255, code 0), from the guest's own
            // address or from `::` (answered to all nodes).
            133 if hops == 255 && msg[1] == 0 => {
                if src.is_unspecified() {
                    self.send_ra(host, to_all, ALL_NODES);
                } else if v6.guest_source(src) {
                    self.send_ra(host, macs, src);
                } else {
                    self.stats.drop_not_for_us += 1;
                    return;
                }
                self.stats.ndp_answered += 1;
                self.ra_next = Some(now + RA_INTERVAL);
            }
            // Neighbour solicitation for one of our addresses, sent to it or to its
            // solicited-node group (RFC 4861 7.1.1, 7.2.4).
            135 if hops == 255 && msg[1] == 0 && msg.len() >= 24 => {
                let target = ipv6_from(&msg[8..24]);
                let to_target = dst == target || dst == solicited_node(target);
                if !v6.is_ours(target) || !to_target {
                    self.stats.drop_not_for_us += 1;
                    return;
                }
                let router = target != v6.dns;
                let len = if src.is_unspecified() {
                    // The guest probes for a duplicate of one of our addresses: defend it, to
                    // all nodes (RFC 4862 5.4.3).
                    frame::neighbour_advert(&mut self.tx, to_all, target, ALL_NODES, router, false)
                } else if v6.guest_source(src) {
                    frame::neighbour_advert(&mut self.tx, macs, target, src, router, true)
                } else {
                    self.stats.drop_not_for_us += 1;
                    return;
                };
                host.emit(&self.tx[..len], TxMeta::default());
                self.stats.frames_out += 1;
                self.stats.ndp_answered += 1;
            }
            // Echo request, from the guest's own address.
            128 if !multicast && !dst.is_multicast() && msg[1] == 0 => {
                if !v6.guest_source(src) {
                    self.stats.drop_not_for_us += 1;
                    return;
                }
                if v6.is_ours(dst) {
                    self.stats.icmp_echo_local += 1;
                    if msg.len() > self.tx.len() - frame::ICMP6_AT {
                        return;
                    }
                    let at = frame::ICMP6_AT;
                    self.tx[at..at + msg.len()].copy_from_slice(msg);
                    self.tx[at] = 129;
                    let len = frame::icmpv6(&mut self.tx, macs, dst, src, msg.len());
                    host.emit(&self.tx[..len], TxMeta::default());
                    self.stats.frames_out += 1;
                } else if v6.on_link(src) {
                    self.ping_forward(host, src.into(), dst.into(), msg, now);
                } else {
                    self.stats.drop_not_for_us += 1;
                }
            }
            // Neighbour advertisements, multicast listener reports and the rest.
            _ => self.stats.drop_unsupported += 1,
        }
    }

    /// A router advertisement (for the link, with its prefix, MTU and DNS server) to `to`.
    fn send_ra<H: Host>(&mut self, host: &mut H, macs: Macs, to: Ipv6Addr) {
        let Some(v6) = self.cfg.ipv6 else { return };
        let ra = frame::RouterAdvert {
            from: ROUTER_LL,
            to,
            prefix: v6.prefix,
            mtu: u32::from(self.cfg.mtu),
            dns: v6.dns,
        };
        let len = frame::router_advert(&mut self.tx, macs, &ra);
        host.emit(&self.tx[..len], TxMeta::default());
        self.stats.frames_out += 1;
    }

    /// Where traffic to `dst` goes, as the policy says (gateway, DNS, everything else).
    fn route(&self, dst: SocketAddr) -> Route {
        let (gateway, loopback) = match dst.ip() {
            IpAddr::V4(ip) => (ip == self.cfg.gateway, IpAddr::from(Ipv4Addr::LOCALHOST)),
            IpAddr::V6(ip) => match self.cfg.ipv6 {
                Some(v6) => (
                    ip == v6.gateway || ip == ROUTER_LL,
                    IpAddr::from(Ipv6Addr::LOCALHOST),
                ),
                None => return Route::Refuse,
            },
        };
        if gateway {
            if self.cfg.allow_host_loopback {
                return Route::To(SocketAddr::new(loopback, dst.port()));
            }
            return Route::Refuse;
        }
        if self.cfg.is_dns(dst.ip()) {
            // A resolver of the flow's own family first; an IPv6 flow falls back to an IPv4
            // one (its UDP socket is dual-stack), an IPv4 flow cannot reach an IPv6 one.
            let same = |r: &&IpAddr| r.is_ipv6() == dst.is_ipv6();
            let resolvers = &self.cfg.resolvers;
            let pick = resolvers
                .iter()
                .find(same)
                .or_else(|| resolvers.first().filter(|_| dst.is_ipv6()));
            return match pick {
                Some(r) if dst.port() == 53 => Route::To(SocketAddr::new(*r, 53)),
                _ => Route::Refuse,
            };
        }
        let refused = match dst.ip() {
            IpAddr::V4(ip) => self.cfg.cidr.contains(&ip) || ip.is_loopback(),
            IpAddr::V6(ip) => {
                // The link itself, loopback, link-local and multicast addresses, and IPv4 in
                // disguise (mapped or compatible: ::ffff:127.0.0.1 would be the host's loopback).
                let o = ip.octets();
                self.cfg.ipv6.is_some_and(|v6| v6.on_link(ip))
                    || ip.is_loopback()
                    || ip.is_unspecified()
                    || ip.is_multicast()
                    || ip.is_unicast_link_local()
                    || o[..12] == [0; 12]
                    || ip.to_ipv4_mapped().is_some()
            }
        };
        if refused {
            return Route::Refuse;
        }
        Route::To(dst)
    }

    fn at_limit(&self) -> bool {
        self.flows.len() >= self.cfg.max_flows || self.buffered >= self.cfg.max_buffered
    }

    fn on_tcp<H: Host>(
        &mut self,
        host: &mut H,
        src: IpAddr,
        dst: IpAddr,
        seg: &[u8],
        rx: RxMeta,
        now: Instant,
    ) {
        let Ok(tcp) = TcpPacket::new_checked(seg) else {
            self.stats.drop_malformed += 1;
            return;
        };
        if !rx.csum_trusted && !tcp.verify_checksum(&src.into(), &dst.into()) {
            self.stats.drop_checksum += 1;
            return;
        }
        let mut flags = 0;
        for (set, bit) in [
            (tcp.fin(), frame::FIN),
            (tcp.syn(), frame::SYN),
            (tcp.rst(), frame::RST),
            (tcp.psh(), frame::PSH),
            (tcp.ack(), frame::ACK),
        ] {
            if set {
                flags |= bit;
            }
        }
        let (mss, wscale) = if flags & frame::SYN != 0 {
            match tcp.options_summary() {
                Ok(o) => (o.max_segment_size, o.window_scale),
                Err(_) => {
                    self.stats.drop_malformed += 1;
                    return;
                }
            }
        } else {
            (None, None)
        };
        let s = Segment {
            seq: tcp.seq_number().0 as u32,
            ack: tcp.ack_number().0 as u32,
            flags,
            window: tcp.window_len(),
            payload: tcp.payload(),
            mss,
            wscale,
        };
        let guest = SocketAddr::new(src, tcp.src_port());
        let remote = SocketAddr::new(dst, tcp.dst_port());
        if let Some(&id) = self.tcp.get(&(guest, remote)) {
            self.with_tcp(host, id, now, |f, out| f.on_segment(id, &s, out));
            return;
        }
        self.tcp_new(host, guest, remote, &s, now);
    }

    /// A segment for no known flow: a SYN opens one; anything else is answered with RST.
    fn tcp_new<H: Host>(
        &mut self,
        host: &mut H,
        guest: SocketAddr,
        remote: SocketAddr,
        s: &Segment,
        now: Instant,
    ) {
        let Some(macs) = self.macs() else { return };
        let is_syn = s.flags & (frame::SYN | frame::ACK | frame::RST) == frame::SYN;
        if !is_syn {
            if s.flags & frame::RST == 0 {
                self.stats.tcp_no_flow += 1;
                self.rst_reply(host, macs, guest, remote, s);
            }
            return;
        }
        if self.at_limit() {
            self.stats.refused_limit += 1;
            self.rst_reply(host, macs, guest, remote, s);
            return;
        }
        let Route::To(real) = self.route(remote) else {
            self.stats.tcp_refused_policy += 1;
            self.rst_reply(host, macs, guest, remote, s);
            return;
        };
        let iss = self.next_iss(guest, remote, now);
        let flow = TcpFlow::new(guest, remote, s, iss, &self.cfg);
        let id = self.flows.insert(Flow::Tcp(flow));
        self.tcp.insert((guest, remote), id);
        self.stats.tcp_opened += 1;
        if let Err(e) = host.tcp_connect(id, real) {
            self.with_tcp(host, id, now, |f, out| {
                f.refuse_connect(out, &e);
                out.host.tcp_close(id, false);
                Verdict::Remove
            });
        }
    }

    /// RST for a segment that belongs to no connection (RFC 9293 3.10.7.1).
    fn rst_reply<H: Host>(
        &mut self,
        host: &mut H,
        macs: Macs,
        guest: SocketAddr,
        remote: SocketAddr,
        s: &Segment,
    ) {
        let (seq, ack, flags) = if s.flags & frame::ACK != 0 {
            (s.ack, 0, frame::RST)
        } else {
            let len = s.payload.len() as u32
                + u32::from(s.flags & frame::SYN != 0)
                + u32::from(s.flags & frame::FIN != 0);
            (0, s.seq.wrapping_add(len), frame::RST | frame::ACK)
        };
        let h = frame::TcpHeader {
            src: remote,
            dst: guest,
            seq,
            ack,
            flags,
            window: 0,
            options: &[],
        };
        self.ip_id = self.ip_id.wrapping_add(1);
        let (len, meta) = frame::tcp(&mut self.tx, macs, &h, 0, self.ip_id, self.cfg.offload);
        host.emit(&self.tx[..len], meta);
        self.stats.frames_out += 1;
    }

    #[allow(clippy::too_many_arguments)]
    fn on_udp<H: Host>(
        &mut self,
        host: &mut H,
        src: IpAddr,
        dst: IpAddr,
        seg: &[u8],
        ip_packet: &[u8],
        rx: RxMeta,
        now: Instant,
    ) {
        let Ok(udp) = UdpPacket::new_checked(seg) else {
            self.stats.drop_malformed += 1;
            return;
        };
        // An IPv6 datagram must carry a checksum (RFC 8200 8.1); an IPv4 one may leave it out
        // (smoltcp's check passes a zero checksum whatever the version).
        let zero = udp.checksum() == 0;
        let bad = if zero {
            src.is_ipv6()
        } else {
            !udp.verify_checksum(&src.into(), &dst.into())
        };
        if !rx.csum_trusted && bad {
            self.stats.drop_checksum += 1;
            return;
        }
        let guest = SocketAddr::new(src, udp.src_port());
        let remote = SocketAddr::new(dst, udp.dst_port());
        // A client of a published port is answered where it came from, whatever the policy.
        let known = match self.udp.get(&guest).and_then(|id| self.flows.get(*id)) {
            Some(Flow::Udp(f)) => f.real_for(remote),
            _ => None,
        };
        let Some(real) = known.or(match self.route(remote) {
            Route::To(r) => Some(r),
            Route::Refuse => None,
        }) else {
            self.stats.udp_refused_policy += 1;
            if let Some(macs) = self.macs() {
                self.ip_id = self.ip_id.wrapping_add(1);
                let len =
                    frame::port_unreachable(&mut self.tx, macs, dst, src, ip_packet, self.ip_id);
                host.emit(&self.tx[..len], TxMeta::default());
                self.stats.frames_out += 1;
            }
            return;
        };
        let id = match self.udp.get(&guest) {
            Some(&id) => id,
            None => {
                if self.at_limit() {
                    self.stats.refused_limit += 1;
                    return;
                }
                let timeout = if self.cfg.is_dns(remote.ip()) {
                    self.cfg.dns_timeout
                } else {
                    self.cfg.udp_timeout
                };
                let id = self
                    .flows
                    .insert(Flow::Udp(UdpFlow::new(guest, now, timeout)));
                if host.udp_open(id, guest.is_ipv6()).is_err() {
                    self.flows.remove(id);
                    self.stats.udp_send_failed += 1;
                    return;
                }
                self.udp.insert(guest, id);
                self.stats.udp_opened += 1;
                self.sweep_soon(now);
                id
            }
        };
        if let Some(Flow::Udp(f)) = self.flows.get_mut(id) {
            f.note_peer(real, remote);
            f.last_active = now;
            if !self.cfg.is_dns(remote.ip()) && !f.published {
                f.idle_timeout = self.cfg.udp_timeout;
            }
        }
        if host.udp_send(id, real, udp.payload()).is_err() {
            self.stats.udp_send_failed += 1;
        }
    }

    fn on_icmp<H: Host>(
        &mut self,
        host: &mut H,
        src: Ipv4Addr,
        dst: Ipv4Addr,
        msg: &[u8],
        now: Instant,
    ) {
        if msg.len() < 8 || crate::rootless::core::csum::fold(csum::add(0, msg)) != 0xffff {
            self.stats.drop_malformed += 1;
            return;
        }
        if msg[0] != 8 || msg[1] != 0 {
            self.stats.drop_unsupported += 1; // only echo requests are forwarded
            return;
        }
        let Some(macs) = self.macs() else { return };
        if dst == self.cfg.gateway || dst == self.cfg.dns {
            self.stats.icmp_echo_local += 1;
            if msg.len() > self.tx.len() - frame::ICMP_AT {
                return;
            }
            self.tx[frame::ICMP_AT..frame::ICMP_AT + msg.len()].copy_from_slice(msg);
            self.tx[frame::ICMP_AT] = 0; // echo reply
            self.ip_id = self.ip_id.wrapping_add(1);
            let len = frame::icmp(&mut self.tx, macs, dst, src, msg.len(), self.ip_id);
            host.emit(&self.tx[..len], TxMeta::default());
            self.stats.frames_out += 1;
            return;
        }
        self.ping_forward(host, src.into(), dst.into(), msg, now);
    }

    /// Sends the guest's echo request `msg` (ICMP or ICMPv6) on through the flow for its
    /// identifier.
    fn ping_forward<H: Host>(
        &mut self,
        host: &mut H,
        src: IpAddr,
        dst: IpAddr,
        msg: &[u8],
        now: Instant,
    ) {
        if !matches!(self.route(SocketAddr::new(dst, 0)), Route::To(_)) {
            self.stats.drop_unsupported += 1;
            return;
        }
        let ident = u16::from_be_bytes([msg[4], msg[5]]);
        let id = match self.ping.get(&(src, ident)) {
            Some(&id) => id,
            None => {
                if self.at_limit() {
                    self.stats.refused_limit += 1;
                    return;
                }
                let id = self.flows.insert(Flow::Ping(PingFlow {
                    guest: src,
                    ident,
                    last_active: now,
                }));
                if host.ping_open(id, src.is_ipv6()).is_err() {
                    self.flows.remove(id);
                    self.stats.icmp_unavailable += 1;
                    return;
                }
                self.ping.insert((src, ident), id);
                self.sweep_soon(now);
                id
            }
        };
        if let Some(Flow::Ping(p)) = self.flows.get_mut(id) {
            p.last_active = now;
        }
        if host.ping_send(id, dst, msg).is_ok() {
            self.stats.icmp_echo_forwarded += 1;
        }
    }

    /// A host socket reported readiness.
    pub fn on_ready<H: Host>(&mut self, host: &mut H, id: FlowId, ready: Ready, now: Instant) {
        match self.flows.get(id) {
            Some(Flow::Tcp(f))
                if ready.error
                    && !self.parked.is_empty()
                    && self.parked.get(&(f.guest, f.remote)) == Some(&id) =>
            {
                // A waiting flow's client gave up: it goes without a word to the guest (which
                // knows the tuple as the old flow's).
                self.with_tcp(host, id, now, |f, out| f.drop_unopened(id, out));
            }
            Some(Flow::Tcp(_)) => self.with_tcp(host, id, now, |f, out| f.on_ready(id, ready, out)),
            Some(Flow::Udp(_)) => self.udp_readable(host, id, ready, now),
            Some(Flow::Ping(_)) => self.ping_readable(host, id, ready, now),
            None => {}
        }
    }

    /// Nothing can go to the guest before its MAC address is known: ask for it, and hand the
    /// flow's readiness back when it comes.
    fn wait_for_mac<H: Host>(&mut self, host: &mut H, id: FlowId) {
        if !self.mac_waiters.contains(&id) {
            self.mac_waiters.push(id);
        }
        self.arp_for_guest(host);
    }

    fn udp_readable<H: Host>(&mut self, host: &mut H, id: FlowId, ready: Ready, now: Instant) {
        let Some(macs) = self.macs() else {
            return self.wait_for_mac(host, id);
        };
        let Some(Flow::Udp(f)) = self.flows.get(id) else {
            return;
        };
        let family = f.guest.ip();
        let max = usize::from(self.cfg.mtu) - frame::ip_len(family) - frame::UDP_LEN;
        if ready.error {
            self.udp_errors(host, id, macs);
        }
        // A receive fails once for each error the network reports (the socket's pending
        // error); the errors themselves are then waiting to be taken.
        let mut failures = 0;
        loop {
            let at = frame::udp_payload_at(family);
            let room = self.tx.len() - at;
            let (from, n) = match host.udp_recv(id, &mut self.tx[at..at + room]) {
                Ok(Some(r)) => r,
                Ok(None) => return,
                Err(_) => {
                    failures += 1;
                    if failures > 8 {
                        return;
                    }
                    self.udp_errors(host, id, macs);
                    continue;
                }
            };
            let Some(Flow::Udp(f)) = self.flows.get_mut(id) else {
                return;
            };
            let seen = match f.seen_as(from) {
                Some(s) => s,
                None if f.published => {
                    let seen = client_as_seen(from, &self.cfg);
                    f.note_peer(from, seen);
                    seen
                }
                None => {
                    self.stats.udp_filtered += 1;
                    continue;
                }
            };
            f.last_active = now;
            let guest = f.guest;
            if n > max {
                self.stats.drop_too_big += 1;
                continue;
            }
            self.ip_id = self.ip_id.wrapping_add(1);
            let (len, meta) = frame::udp(
                &mut self.tx,
                macs,
                seen,
                guest,
                n,
                self.ip_id,
                self.cfg.offload,
            );
            host.emit(&self.tx[..len], meta);
            self.stats.frames_out += 1;
        }
    }

    /// Tells the guest of the errors the host's network reported for a UDP flow's datagrams:
    /// a destination-unreachable message, as if from the destination (port unreachable) or
    /// from the gateway (the rest), for each datagram to a peer the guest knows.
    fn udp_errors<H: Host>(&mut self, host: &mut H, id: FlowId, macs: Macs) {
        while let Ok(Some(err)) = host.dgram_error(id) {
            let Some(Flow::Udp(f)) = self.flows.get(id) else {
                return;
            };
            let (Some(why), Some(seen)) = (err.unreachable, f.seen_as(err.dst)) else {
                self.stats.udp_error_ignored += 1;
                continue;
            };
            let guest = f.guest;
            let from = if why.is_port() {
                seen.ip()
            } else {
                self.cfg.gateway_for(guest.ip())
            };
            self.ip_id = self.ip_id.wrapping_add(1);
            let quote = frame::Quote::udp(guest, seen, err.len);
            let len = frame::unreachable(&mut self.tx, macs, from, why, &quote, self.ip_id);
            host.emit(&self.tx[..len], TxMeta::default());
            self.stats.frames_out += 1;
            self.stats.udp_unreachable += 1;
        }
    }

    /// Tells the guest of the errors the host's network reported for its echo requests: a
    /// destination-unreachable message from the gateway quoting the request (the guest's
    /// identifier, the request's sequence number).
    fn ping_errors<H: Host>(&mut self, host: &mut H, id: FlowId, macs: Macs) {
        while let Ok(Some(err)) = host.dgram_error(id) {
            let Some(Flow::Ping(p)) = self.flows.get(id) else {
                return;
            };
            let (guest, ident) = (p.guest, p.ident);
            let Some(why) = err.unreachable.filter(|_| err.len >= 8) else {
                self.stats.icmp_error_ignored += 1;
                continue;
            };
            let seq = u16::from_be_bytes([err.head[6], err.head[7]]);
            self.ip_id = self.ip_id.wrapping_add(1);
            let quote = frame::Quote::echo(guest, err.dst.ip(), ident, seq, err.len);
            let from = self.cfg.gateway_for(guest);
            let len = frame::unreachable(&mut self.tx, macs, from, why, &quote, self.ip_id);
            host.emit(&self.tx[..len], TxMeta::default());
            self.stats.frames_out += 1;
            self.stats.icmp_unreachable += 1;
        }
    }

    fn ping_readable<H: Host>(&mut self, host: &mut H, id: FlowId, ready: Ready, now: Instant) {
        let Some(macs) = self.macs() else {
            return self.wait_for_mac(host, id);
        };
        let Some(Flow::Ping(p)) = self.flows.get(id) else {
            return;
        };
        let family = p.guest;
        let (at, reply_type) = if family.is_ipv4() {
            (frame::ICMP_AT, 0)
        } else {
            (frame::ICMP6_AT, 129)
        };
        let room = usize::from(self.cfg.mtu) - frame::ip_len(family);
        if ready.error {
            self.ping_errors(host, id, macs);
        }
        let mut failures = 0;
        loop {
            let (from, n) = match host.ping_recv(id, &mut self.tx[at..at + room]) {
                Ok(Some(r)) => r,
                Ok(None) => return,
                Err(_) => {
                    // As for UDP: a pending error fails one receive.
                    failures += 1;
                    if failures > 8 {
                        return;
                    }
                    self.ping_errors(host, id, macs);
                    continue;
                }
            };
            let Some(Flow::Ping(p)) = self.flows.get_mut(id) else {
                return;
            };
            if n < 8 || self.tx[at] != reply_type {
                continue; // only echo replies come back
            }
            p.last_active = now;
            let (guest, ident) = (p.guest, p.ident);
            self.tx[at + 4..at + 6].copy_from_slice(&ident.to_be_bytes());
            let len = match (from, guest) {
                (IpAddr::V4(from), IpAddr::V4(guest)) => {
                    self.ip_id = self.ip_id.wrapping_add(1);
                    frame::icmp(&mut self.tx, macs, from, guest, n, self.ip_id)
                }
                (IpAddr::V6(from), IpAddr::V6(guest)) => {
                    frame::icmpv6(&mut self.tx, macs, from, guest, n)
                }
                _ => continue,
            };
            host.emit(&self.tx[..len], TxMeta::default());
            self.stats.frames_out += 1;
        }
    }

    fn sweep_soon(&mut self, now: Instant) {
        if self.next_sweep.is_none() {
            self.next_sweep = Some(now + Duration::from_secs(1));
        }
    }

    /// Sends the ACKs owed for the frames handled since the last call. The driver calls this
    /// after each batch of frames, so that a burst of segments is acknowledged once.
    pub fn flush<H: Host>(&mut self, host: &mut H, now: Instant) {
        // The global queue cap shuts every flow's window; when it lifts, tell the flows that
        // were told 0 (their probes would find out too, but only after their backoff).
        if self.buffered >= self.cfg.max_buffered {
            self.cap_hit = true;
        } else if self.cap_hit {
            self.cap_hit = false;
            let shut: Vec<FlowId> = self
                .flows
                .iter()
                .filter_map(|(id, f)| match f {
                    Flow::Tcp(t) if t.told_zero_window() => Some(id),
                    _ => None,
                })
                .collect();
            for id in shut {
                self.with_tcp(host, id, now, |f, out| {
                    f.send_ack(out);
                    Verdict::Keep
                });
            }
        }
        let acks = std::mem::take(&mut self.acks);
        for &id in &acks {
            self.with_tcp(host, id, now, |f, out| {
                if f.ack_queued {
                    f.send_ack(out);
                }
                Verdict::Keep
            });
        }
        let mut acks = acks;
        acks.clear();
        if self.acks.is_empty() {
            self.acks = acks;
        }
        host.flush();
    }

    /// Runs what is due at `now`; returns when to call again.
    pub fn on_timer<H: Host>(&mut self, host: &mut H, now: Instant) -> Option<Instant> {
        while let Some(Reverse((at, id))) = self.timers.peek().copied() {
            if at > now {
                break;
            }
            self.timers.pop();
            // A flow's wake-up is its earliest deadline; a later one comes due in its turn.
            let Some(Flow::Tcp(f)) = self.flows.get_mut(id) else {
                continue;
            };
            if f.wake != Some(at) {
                continue; // stale: an earlier wake-up replaced it, or the id was reused
            }
            f.wake = None;
            match f.timer {
                Some(t) if t <= now => {
                    let key = (f.guest, f.remote);
                    if !self.parked.is_empty() && self.parked.get(&key) == Some(&id) {
                        f.timer = None;
                        self.reuse_waited(host, key, id, now);
                        continue;
                    }
                    self.with_tcp(host, id, now, |f, out| f.on_timer(id, out));
                }
                Some(t) => {
                    f.wake = Some(t);
                    self.timers.push(Reverse((t, id)));
                }
                None => {}
            }
        }
        if self.next_sweep.is_some_and(|t| t <= now) {
            self.sweep(host, now);
        }
        if self.ra_next.is_some_and(|t| t <= now) {
            // Unsolicited, to all nodes: renews the route, prefix and DNS server the guest
            // learnt, which would otherwise expire (it solicits only when its link comes up).
            if let Some(macs) = self.macs() {
                let to_all = Macs {
                    ours: macs.ours,
                    guest: multicast_mac(ALL_NODES),
                };
                self.send_ra(host, to_all, ALL_NODES);
            }
            self.ra_next = Some(now + RA_INTERVAL);
        }
        self.flush(host, now);
        let t = self.timers.peek().map(|Reverse((at, _))| *at);
        [t, self.next_sweep, self.ra_next]
            .into_iter()
            .flatten()
            .min()
    }

    /// Expires idle UDP and ICMP flows.
    fn sweep<H: Host>(&mut self, host: &mut H, now: Instant) {
        let cfg = &self.cfg;
        let expired: Vec<FlowId> = self
            .flows
            .iter()
            .filter(|(_, f)| match f {
                Flow::Udp(u) => now.duration_since(u.last_active) >= u.idle_timeout,
                Flow::Ping(p) => now.duration_since(p.last_active) >= cfg.ping_timeout,
                Flow::Tcp(_) => false,
            })
            .map(|(id, _)| id)
            .collect();
        for id in expired {
            match self.flows.remove(id) {
                Flow::Udp(u) => {
                    self.udp.remove(&u.guest);
                    self.stats.udp_expired += 1;
                }
                Flow::Ping(p) => {
                    self.ping.remove(&(p.guest, p.ident));
                }
                Flow::Tcp(_) => {}
            }
            host.dgram_close(id);
        }
        let any = self.flows.iter().any(|(_, f)| !matches!(f, Flow::Tcp(_)));
        self.next_sweep = any.then(|| now + Duration::from_secs(1));
    }

    /// The guest's address in the family of `v6`, if it has one.
    fn guest_addr(&self, v6: bool) -> Option<IpAddr> {
        if v6 {
            self.cfg.ipv6.map(|c| c.guest.into())
        } else {
            Some(self.cfg.guest.into())
        }
    }

    /// Whether the guest has IPv6 (`--enable-ipv6`).
    pub fn has_ipv6(&self) -> bool {
        self.cfg.ipv6.is_some()
    }

    /// A host client accepted on a published TCP port: opens a flow to `guest_port` at the
    /// guest's address of the client's family, as if from `client` (a loopback client appears as
    /// the gateway). The host adopts the accepted socket for the new flow. Returns `None` (the
    /// caller closes the socket) at a limit, or for an IPv6 client when the guest has no IPv6.
    pub fn tcp_inbound<H: Host>(
        &mut self,
        host: &mut H,
        client: SocketAddr,
        guest_port: u16,
        now: Instant,
    ) -> Option<FlowId> {
        let guest = SocketAddr::new(self.guest_addr(client.is_ipv6())?, guest_port);
        let seen = client_as_seen(client, &self.cfg);
        let key = (guest, seen);
        let busy = self.tcp.contains_key(&key);
        if self.at_limit() || busy && self.parked.contains_key(&key) {
            self.stats.refused_limit += 1;
            return None;
        }
        let iss = self.next_iss(guest, seen, now);
        let flow = TcpFlow::inbound(guest, seen, iss, &self.cfg);
        let id = self.flows.insert(Flow::Tcp(flow));
        if host.adopt(id).is_err() {
            self.flows.remove(id);
            return None;
        }
        self.stats.tcp_inbound += 1;
        if busy {
            // Another flow holds this 4-tuple. Most often it is the client's last connection
            // from this port, over on the host (whose kernel took a new one on the tuple) but
            // still closing with the guest. It may also be a live connection that the guest sees
            // the same way: the client's port reused towards another host port or address
            // published to the same guest port. The new flow waits, without a SYN, for the old
            // one to go; after `REUSE_WAIT` the old one is reset if its host connection is over,
            // and the new one otherwise (`Core::on_timer`).
            self.parked.insert(key, id);
            self.stats.tcp_inbound_waited += 1;
            self.with_tcp(host, id, now, |f, out| {
                f.hold(id, out, REUSE_WAIT);
                Verdict::Keep
            });
            return Some(id);
        }
        self.tcp.insert(key, id);
        if self.macs().is_none() {
            self.arp_for_guest(host);
        }
        self.with_tcp(host, id, now, |f, out| {
            f.open_to_guest(id, out);
            Verdict::Keep
        });
        Some(id)
    }

    /// Asks the guest for its MAC address.
    fn arp_for_guest<H: Host>(&mut self, host: &mut H) {
        let len = frame::arp_request(
            &mut self.tx,
            EthernetAddress(GATEWAY_MAC),
            self.cfg.gateway,
            self.cfg.guest,
        );
        host.emit(&self.tx[..len], TxMeta::default());
        self.stats.frames_out += 1;
    }

    /// Publishes UDP `guest_port` on a socket the driver has bound: the host adopts it as the
    /// socket of a flow for the guest's port, which any client may reach and which never expires.
    /// `v6`: the socket is IPv6 and its clients reach the guest's IPv6 address.
    pub fn udp_publish<H: Host>(
        &mut self,
        host: &mut H,
        guest_port: u16,
        v6: bool,
        now: Instant,
    ) -> Result<FlowId, PublishError> {
        let ip = self.guest_addr(v6).ok_or(PublishError::NoIpv6)?;
        let guest = SocketAddr::new(ip, guest_port);
        if let Some(&id) = self.udp.get(&guest) {
            match self.flows.get(id) {
                Some(Flow::Udp(f)) if f.published => return Err(PublishError::Published),
                _ => {
                    // The guest's own flow from that port gives way to the published one.
                    self.flows.remove(id);
                    self.udp.remove(&guest);
                    host.dgram_close(id);
                }
            }
        }
        let mut flow = UdpFlow::new(guest, now, Duration::MAX);
        flow.published = true;
        let id = self.flows.insert(Flow::Udp(flow));
        if let Err(e) = host.adopt(id) {
            self.flows.remove(id);
            return Err(PublishError::Host(e));
        }
        self.udp.insert(guest, id);
        Ok(id)
    }

    /// Stops publishing UDP `guest_port`; the host socket is closed.
    pub fn udp_unpublish<H: Host>(&mut self, host: &mut H, guest_port: u16, v6: bool) -> bool {
        let Some(ip) = self.guest_addr(v6) else {
            return false;
        };
        let guest = SocketAddr::new(ip, guest_port);
        match self.udp.get(&guest).copied() {
            Some(id) if matches!(self.flows.get(id), Some(Flow::Udp(f)) if f.published) => {
                self.flows.remove(id);
                self.udp.remove(&guest);
                host.dgram_close(id);
                true
            }
            _ => false,
        }
    }

    /// Number of flows of every kind.
    pub fn flow_count(&self) -> usize {
        self.flows.len()
    }
}
