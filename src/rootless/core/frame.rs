//! Building the frames the core sends to the guest: Ethernet + IPv4 or IPv6 + TCP/UDP/ICMP(v6),
//! written in place into one transmit buffer so that a payload copied there once is never copied
//! again.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use smoltcp::wire::{
    ArpOperation, ArpPacket, ArpRepr, EthernetAddress, EthernetFrame, EthernetProtocol, IpProtocol,
    Ipv4Packet, TcpPacket, TcpSeqNumber, UdpPacket,
};

use super::csum;
use super::host::{TxMeta, Unreachable};

pub const ETH_LEN: usize = 14;
pub const IP_LEN: usize = 20;
pub const IP6_LEN: usize = 40;
pub const TCP_LEN: usize = 20;
pub const UDP_LEN: usize = 8;
/// Where a TCP segment's payload starts when the header has no options.
pub const TCP_PAYLOAD_AT: usize = ETH_LEN + IP_LEN + TCP_LEN;
/// Where a UDP datagram's payload starts.
pub const UDP_PAYLOAD_AT: usize = ETH_LEN + IP_LEN + UDP_LEN;
/// Where an ICMP message starts.
pub const ICMP_AT: usize = ETH_LEN + IP_LEN;
/// Where an ICMPv6 message starts.
pub const ICMP6_AT: usize = ETH_LEN + IP6_LEN;
/// The largest IPv4 packet (and the largest IPv6 payload).
pub const MAX_IP_PACKET: usize = 65535;
/// The transmit buffer's size: the largest frame (an IPv6 header and the largest payload).
pub const MAX_FRAME: usize = ETH_LEN + IP6_LEN + MAX_IP_PACKET;

/// The IP header's length for packets between addresses of `ip`'s family.
pub fn ip_len(ip: IpAddr) -> usize {
    if ip.is_ipv4() {
        IP_LEN
    } else {
        IP6_LEN
    }
}

/// Where a TCP segment's payload starts (no options) for `ip`'s family.
pub fn tcp_payload_at(ip: IpAddr) -> usize {
    ETH_LEN + ip_len(ip) + TCP_LEN
}

/// Where a UDP datagram's payload starts for `ip`'s family.
pub fn udp_payload_at(ip: IpAddr) -> usize {
    ETH_LEN + ip_len(ip) + UDP_LEN
}

pub const FIN: u8 = 0x01;
pub const SYN: u8 = 0x02;
pub const RST: u8 = 0x04;
pub const PSH: u8 = 0x08;
pub const ACK: u8 = 0x10;

/// The two link-layer addresses of every frame to the guest.
#[derive(Debug, Clone, Copy)]
pub struct Macs {
    pub ours: EthernetAddress,
    pub guest: EthernetAddress,
}

/// Options are written as given (already padded to a multiple of 4).
pub struct TcpHeader<'a> {
    pub src: SocketAddr,
    pub dst: SocketAddr,
    pub seq: u32,
    pub ack: u32,
    pub flags: u8,
    pub window: u16,
    pub options: &'a [u8],
}

fn write_eth(buf: &mut [u8], macs: Macs, proto: EthernetProtocol) {
    let mut eth = EthernetFrame::new_unchecked(&mut buf[..ETH_LEN]);
    eth.set_dst_addr(macs.guest);
    eth.set_src_addr(macs.ours);
    eth.set_ethertype(proto);
}

fn write_ipv4(
    buf: &mut [u8],
    src: Ipv4Addr,
    dst: Ipv4Addr,
    proto: IpProtocol,
    total: usize,
    id: u16,
) {
    let mut ip = Ipv4Packet::new_unchecked(&mut buf[..IP_LEN]);
    ip.set_version(4);
    ip.set_header_len(IP_LEN as u8);
    ip.set_dscp(0);
    ip.set_ecn(0);
    ip.set_total_len(total as u16);
    ip.set_ident(id);
    ip.clear_flags();
    ip.set_dont_frag(proto == IpProtocol::Tcp);
    ip.set_frag_offset(0);
    ip.set_hop_limit(64);
    ip.set_next_header(proto);
    ip.set_src_addr(src);
    ip.set_dst_addr(dst);
    ip.set_checksum(0);
    let sum = csum::finish(csum::add(0, &buf[..IP_LEN]));
    Ipv4Packet::new_unchecked(&mut buf[..IP_LEN]).set_checksum(sum);
}

fn write_ipv6(buf: &mut [u8], src: Ipv6Addr, dst: Ipv6Addr, proto: IpProtocol, payload: usize) {
    let h = &mut buf[..IP6_LEN];
    h[..4].copy_from_slice(&[0x60, 0, 0, 0]); // version 6, no traffic class, no flow label
    h[4..6].copy_from_slice(&(payload as u16).to_be_bytes());
    h[6] = u8::from(proto);
    h[7] = if proto == IpProtocol::Icmpv6 { 255 } else { 64 }; // NDP needs 255 (RFC 4861)
    h[8..24].copy_from_slice(&src.octets());
    h[24..40].copy_from_slice(&dst.octets());
}

/// Writes the Ethernet and IP headers of a packet from `src` to `dst` whose L4 part is `l4_len`
/// bytes; returns the IP header's length. The addresses are of one family (a stray IPv4 one
/// beside an IPv6 one is written as IPv4-mapped).
fn write_l2_l3(
    buf: &mut [u8],
    macs: Macs,
    src: IpAddr,
    dst: IpAddr,
    proto: IpProtocol,
    l4_len: usize,
    id: u16,
) -> usize {
    match (src, dst) {
        (IpAddr::V4(s), IpAddr::V4(d)) => {
            write_eth(buf, macs, EthernetProtocol::Ipv4);
            write_ipv4(&mut buf[ETH_LEN..], s, d, proto, IP_LEN + l4_len, id);
            IP_LEN
        }
        (s, d) => {
            write_eth(buf, macs, EthernetProtocol::Ipv6);
            write_ipv6(&mut buf[ETH_LEN..], v6(s), v6(d), proto, l4_len);
            IP6_LEN
        }
    }
}

fn v6(ip: IpAddr) -> Ipv6Addr {
    match ip {
        IpAddr::V4(a) => a.to_ipv6_mapped(),
        IpAddr::V6(a) => a,
    }
}

/// Fills in an L4 checksum at `field` (offset within `seg`), fully or, with `offload`, only the
/// pseudo-header part for the guest's kernel to trust. `seg` starts `l3_len` bytes after the
/// Ethernet header.
fn l4_checksum(
    seg: &mut [u8],
    field: usize,
    pseudo: u64,
    offload: bool,
    l3_len: usize,
) -> Option<(u16, u16)> {
    seg[field..field + 2].copy_from_slice(&[0, 0]);
    if offload {
        let p = csum::fold(pseudo);
        seg[field..field + 2].copy_from_slice(&p.to_be_bytes());
        Some(((ETH_LEN + l3_len) as u16, field as u16))
    } else {
        let mut sum = csum::finish(csum::add(pseudo, seg));
        if sum == 0 && field == 6 {
            sum = 0xffff; // UDP: zero means "no checksum"
        }
        seg[field..field + 2].copy_from_slice(&sum.to_be_bytes());
        None
    }
}

/// Writes the headers of a TCP segment whose `payload_len` bytes already sit after the header
/// (at `tcp_payload_at(..) + options.len()`). Returns the frame's length and how to send it.
pub fn tcp(
    buf: &mut [u8],
    macs: Macs,
    h: &TcpHeader,
    payload_len: usize,
    id: u16,
    offload: bool,
) -> (usize, TxMeta) {
    let tcp_len = TCP_LEN + h.options.len();
    let seg_len = tcp_len + payload_len;
    let l3 = write_l2_l3(
        buf,
        macs,
        h.src.ip(),
        h.dst.ip(),
        IpProtocol::Tcp,
        seg_len,
        id,
    );
    let total = l3 + seg_len;
    let seg = &mut buf[ETH_LEN + l3..ETH_LEN + total];
    {
        let mut t = TcpPacket::new_unchecked(&mut seg[..tcp_len]);
        t.set_src_port(h.src.port());
        t.set_dst_port(h.dst.port());
        t.set_seq_number(TcpSeqNumber(h.seq as i32));
        t.set_ack_number(TcpSeqNumber(h.ack as i32));
        t.set_header_len(tcp_len as u8);
        t.clear_flags();
        t.set_fin(h.flags & FIN != 0);
        t.set_syn(h.flags & SYN != 0);
        t.set_rst(h.flags & RST != 0);
        t.set_psh(h.flags & PSH != 0);
        t.set_ack(h.flags & ACK != 0);
        t.set_window_len(h.window);
        t.set_urgent_at(0);
        t.options_mut().copy_from_slice(h.options);
    }
    let pseudo = csum::pseudo(h.src.ip(), h.dst.ip(), 6, seg_len);
    let csum = l4_checksum(seg, 16, pseudo, offload, l3);
    (
        ETH_LEN + total,
        TxMeta {
            csum,
            gso_mss: None,
        },
    )
}

/// Writes the headers of a UDP datagram whose payload already sits at `udp_payload_at(..)`.
pub fn udp(
    buf: &mut [u8],
    macs: Macs,
    src: SocketAddr,
    dst: SocketAddr,
    payload_len: usize,
    id: u16,
    offload: bool,
) -> (usize, TxMeta) {
    let seg_len = UDP_LEN + payload_len;
    let l3 = write_l2_l3(buf, macs, src.ip(), dst.ip(), IpProtocol::Udp, seg_len, id);
    let total = l3 + seg_len;
    let seg = &mut buf[ETH_LEN + l3..ETH_LEN + total];
    {
        let mut u = UdpPacket::new_unchecked(&mut seg[..UDP_LEN]);
        u.set_src_port(src.port());
        u.set_dst_port(dst.port());
        u.set_len(seg_len as u16);
    }
    let pseudo = csum::pseudo(src.ip(), dst.ip(), 17, seg_len);
    let csum = l4_checksum(seg, 6, pseudo, offload, l3);
    (
        ETH_LEN + total,
        TxMeta {
            csum,
            gso_mss: None,
        },
    )
}

/// Writes the headers of an ICMP message of `icmp_len` bytes already at `ICMP_AT`, and its
/// checksum.
pub fn icmp(
    buf: &mut [u8],
    macs: Macs,
    src: Ipv4Addr,
    dst: Ipv4Addr,
    icmp_len: usize,
    id: u16,
) -> usize {
    let total = IP_LEN + icmp_len;
    write_eth(buf, macs, EthernetProtocol::Ipv4);
    write_ipv4(&mut buf[ETH_LEN..], src, dst, IpProtocol::Icmp, total, id);
    let msg = &mut buf[ICMP_AT..ICMP_AT + icmp_len];
    msg[2..4].copy_from_slice(&[0, 0]);
    let sum = csum::finish(csum::add(0, msg));
    msg[2..4].copy_from_slice(&sum.to_be_bytes());
    ETH_LEN + total
}

/// Writes the headers of an ICMPv6 message of `len` bytes already at `ICMP6_AT`, and its
/// checksum.
pub fn icmpv6(buf: &mut [u8], macs: Macs, src: Ipv6Addr, dst: Ipv6Addr, len: usize) -> usize {
    write_eth(buf, macs, EthernetProtocol::Ipv6);
    write_ipv6(&mut buf[ETH_LEN..], src, dst, IpProtocol::Icmpv6, len);
    let msg = &mut buf[ICMP6_AT..ICMP6_AT + len];
    msg[2..4].copy_from_slice(&[0, 0]);
    let pseudo = csum::pseudo(src.into(), dst.into(), 58, len);
    let sum = csum::finish(csum::add(pseudo, msg));
    msg[2..4].copy_from_slice(&sum.to_be_bytes());
    ETH_LEN + IP6_LEN + len
}

/// A neighbour advertisement (RFC 4861 4.4) saying `target` is at `macs.ours`, to `to`: the
/// R flag for a router's address, the S flag in answer to a solicitation, always O.
pub fn neighbour_advert(
    buf: &mut [u8],
    macs: Macs,
    target: Ipv6Addr,
    to: Ipv6Addr,
    router: bool,
    solicited: bool,
) -> usize {
    let m = &mut buf[ICMP6_AT..ICMP6_AT + 32];
    m[..4].copy_from_slice(&[136, 0, 0, 0]);
    let flags = 0x20 | if router { 0x80 } else { 0 } | if solicited { 0x40 } else { 0 };
    m[4..8].copy_from_slice(&[flags, 0, 0, 0]);
    m[8..24].copy_from_slice(&target.octets());
    m[24..26].copy_from_slice(&[2, 1]); // target link-layer address, 8 bytes
    m[26..32].copy_from_slice(macs.ours.as_bytes());
    icmpv6(buf, macs, target, to, 32)
}

/// What a router advertisement announces.
pub struct RouterAdvert {
    /// The router's link-local address (the source).
    pub from: Ipv6Addr,
    pub to: Ipv6Addr,
    /// The on-link prefix the guest configures an address from (a /64).
    pub prefix: Ipv6Addr,
    pub mtu: u32,
    pub dns: Ipv6Addr,
}

/// A router advertisement (RFC 4861 4.2): the default router, the link's MTU, a /64 prefix for
/// stateless address autoconfiguration, and the DNS server (RFC 8106).
pub fn router_advert(buf: &mut [u8], macs: Macs, ra: &RouterAdvert) -> usize {
    const LIFETIME: u32 = 1800;
    let len = 16 + 8 + 8 + 32 + 24;
    let m = &mut buf[ICMP6_AT..ICMP6_AT + len];
    m.fill(0);
    m[0] = 134;
    m[4] = 64; // current hop limit
    m[6..8].copy_from_slice(&(LIFETIME as u16).to_be_bytes()); // router lifetime
                                                               // source link-layer address
    m[16..18].copy_from_slice(&[1, 1]);
    m[18..24].copy_from_slice(macs.ours.as_bytes());
    // MTU
    m[24..26].copy_from_slice(&[5, 1]);
    m[28..32].copy_from_slice(&ra.mtu.to_be_bytes());
    // prefix information: on-link and autonomous
    let p = &mut m[32..64];
    p[..4].copy_from_slice(&[3, 4, 64, 0xc0]);
    p[4..8].copy_from_slice(&(LIFETIME * 4).to_be_bytes()); // valid
    p[8..12].copy_from_slice(&(LIFETIME * 2).to_be_bytes()); // preferred
    p[16..32].copy_from_slice(&ra.prefix.octets());
    // recursive DNS server
    let d = &mut m[64..88];
    d[..2].copy_from_slice(&[25, 3]);
    d[4..8].copy_from_slice(&LIFETIME.to_be_bytes());
    d[8..24].copy_from_slice(&ra.dns.octets());
    icmpv6(buf, macs, ra.from, ra.to, len)
}

/// An ICMPv6 destination-unreachable message (RFC 4443 3.1) of `code`, quoting `quote_len` bytes
/// of the guest's packet already written at `ICMP6_AT + 8`.
pub fn unreachable6(
    buf: &mut [u8],
    macs: Macs,
    from: Ipv6Addr,
    to: Ipv6Addr,
    code: u8,
    quote_len: usize,
) -> usize {
    buf[ICMP6_AT..ICMP6_AT + 8].copy_from_slice(&[1, code, 0, 0, 0, 0, 0, 0]);
    icmpv6(buf, macs, from, to, 8 + quote_len)
}

/// Writes an ARP reply saying `ip` is at `macs.ours`, to the guest at `guest_ip`.
pub fn arp_reply(buf: &mut [u8], macs: Macs, ip: Ipv4Addr, guest_ip: Ipv4Addr) -> usize {
    write_eth(buf, macs, EthernetProtocol::Arp);
    let repr = ArpRepr::EthernetIpv4 {
        operation: ArpOperation::Reply,
        source_hardware_addr: macs.ours,
        source_protocol_addr: ip,
        target_hardware_addr: macs.guest,
        target_protocol_addr: guest_ip,
    };
    let len = repr.buffer_len();
    repr.emit(&mut ArpPacket::new_unchecked(
        &mut buf[ETH_LEN..ETH_LEN + len],
    ));
    ETH_LEN + len
}

/// Writes an ARP request from `ours` at `ip` for `target`, to everyone.
pub fn arp_request(buf: &mut [u8], ours: EthernetAddress, ip: Ipv4Addr, target: Ipv4Addr) -> usize {
    let macs = Macs {
        ours,
        guest: EthernetAddress::BROADCAST,
    };
    write_eth(buf, macs, EthernetProtocol::Arp);
    let repr = ArpRepr::EthernetIpv4 {
        operation: ArpOperation::Request,
        source_hardware_addr: ours,
        source_protocol_addr: ip,
        target_hardware_addr: EthernetAddress([0; 6]),
        target_protocol_addr: target,
    };
    let len = repr.buffer_len();
    repr.emit(&mut ArpPacket::new_unchecked(
        &mut buf[ETH_LEN..ETH_LEN + len],
    ));
    ETH_LEN + len
}

/// The start of a packet the guest sent, as a destination-unreachable message quotes it: the IP
/// header (rebuilt from the flow) and the transport header's first eight bytes, which is what
/// the guest's kernel matches on to find its socket.
pub struct Quote {
    proto: IpProtocol,
    src: IpAddr,
    dst: IpAddr,
    /// The transport segment's length (header and payload), for the quoted IP header.
    l4_len: usize,
    head: [u8; 8],
}

impl Quote {
    /// A TCP SYN the guest sent from `guest` to `remote` with sequence number `seq`.
    pub fn syn(guest: SocketAddr, remote: SocketAddr, seq: u32) -> Quote {
        Quote::ports(IpProtocol::Tcp, guest, remote, TCP_LEN, seq.to_be_bytes())
    }

    /// A datagram of `payload_len` bytes the guest sent from `guest` to `remote`.
    pub fn udp(guest: SocketAddr, remote: SocketAddr, payload_len: usize) -> Quote {
        let len = u16::try_from(UDP_LEN + payload_len).unwrap_or(u16::MAX);
        let [hi, lo] = len.to_be_bytes();
        // the checksum (the last two bytes) is not matched on
        Quote::ports(
            IpProtocol::Udp,
            guest,
            remote,
            usize::from(len),
            [hi, lo, 0, 0],
        )
    }

    /// An echo request of `len` bytes the guest sent from `guest` to `remote` with identifier
    /// `ident` and sequence number `seq`.
    pub fn echo(guest: IpAddr, remote: IpAddr, ident: u16, seq: u16, len: usize) -> Quote {
        let (proto, kind) = if guest.is_ipv4() {
            (IpProtocol::Icmp, 8)
        } else {
            (IpProtocol::Icmpv6, 128)
        };
        let mut head = [kind, 0, 0, 0, 0, 0, 0, 0]; // the checksum (2..4) is not matched on
        head[4..6].copy_from_slice(&ident.to_be_bytes());
        head[6..].copy_from_slice(&seq.to_be_bytes());
        Quote {
            proto,
            src: guest,
            dst: remote,
            l4_len: len.max(8),
            head,
        }
    }

    /// A TCP or UDP quote: the ports, then `rest`.
    fn ports(
        proto: IpProtocol,
        guest: SocketAddr,
        remote: SocketAddr,
        l4_len: usize,
        rest: [u8; 4],
    ) -> Quote {
        let mut head = [0; 8];
        head[..2].copy_from_slice(&guest.port().to_be_bytes());
        head[2..4].copy_from_slice(&remote.port().to_be_bytes());
        head[4..].copy_from_slice(&rest);
        Quote {
            proto,
            src: guest.ip(),
            dst: remote.ip(),
            l4_len,
            head,
        }
    }
}

/// A destination-unreachable message (ICMP, or ICMPv6 for a quote of an IPv6 packet) from
/// `from` telling the guest that the packet `q` quotes could not be delivered, with the code
/// for `why`. Returns the frame length.
pub fn unreachable(
    buf: &mut [u8],
    macs: Macs,
    from: IpAddr,
    why: Unreachable,
    q: &Quote,
    id: u16,
) -> usize {
    match (from, q.src, q.dst) {
        (IpAddr::V4(from), IpAddr::V4(g), IpAddr::V4(r)) => {
            let quote_at = ICMP_AT + 8;
            buf[ICMP_AT..quote_at].copy_from_slice(&[3, why.icmp_code(), 0, 0, 0, 0, 0, 0]);
            let total = (IP_LEN + q.l4_len).min(usize::from(u16::MAX));
            write_ipv4(&mut buf[quote_at..], g, r, q.proto, total, 0);
            buf[quote_at + IP_LEN..quote_at + IP_LEN + 8].copy_from_slice(&q.head);
            icmp(buf, macs, from, g, 8 + IP_LEN + 8, id)
        }
        (from, g, r) => {
            let quote_at = ICMP6_AT + 8;
            let payload = q.l4_len.min(usize::from(u16::MAX));
            write_ipv6(&mut buf[quote_at..], v6(g), v6(r), q.proto, payload);
            buf[quote_at + IP6_LEN..quote_at + IP6_LEN + 8].copy_from_slice(&q.head);
            unreachable6(buf, macs, v6(from), v6(g), why.icmpv6_code(), IP6_LEN + 8)
        }
    }
}

/// An ICMP port-unreachable message quoting the start of a datagram the guest sent
/// (`original` is its IP packet).
pub fn port_unreachable(
    buf: &mut [u8],
    macs: Macs,
    from: IpAddr,
    guest: IpAddr,
    original: &[u8],
    id: u16,
) -> usize {
    match (from, guest) {
        (IpAddr::V4(from), IpAddr::V4(guest)) => {
            let quote = original.len().min(IP_LEN + 8 + 40);
            buf[ICMP_AT..ICMP_AT + 8].copy_from_slice(&[3, 3, 0, 0, 0, 0, 0, 0]);
            buf[ICMP_AT + 8..ICMP_AT + 8 + quote].copy_from_slice(&original[..quote]);
            icmp(buf, macs, from, guest, 8 + quote, id)
        }
        (from, guest) => {
            let quote = original.len().min(IP6_LEN + 8 + 40);
            buf[ICMP6_AT + 8..ICMP6_AT + 8 + quote].copy_from_slice(&original[..quote]);
            unreachable6(buf, macs, v6(from), v6(guest), 4, quote)
        }
    }
}
