//! Building the frames the core sends to the guest: Ethernet + IPv4 + TCP/UDP/ICMP, written in
//! place into one transmit buffer so that a payload copied there once is never copied again.

use std::net::{Ipv4Addr, SocketAddrV4};

use smoltcp::wire::{
    ArpOperation, ArpPacket, ArpRepr, EthernetAddress, EthernetFrame, EthernetProtocol, IpProtocol,
    Ipv4Packet, TcpPacket, TcpSeqNumber, UdpPacket,
};

use super::csum;
use super::host::TxMeta;

pub const ETH_LEN: usize = 14;
pub const IP_LEN: usize = 20;
pub const TCP_LEN: usize = 20;
pub const UDP_LEN: usize = 8;
/// Where a TCP segment's payload starts when the header has no options.
pub const TCP_PAYLOAD_AT: usize = ETH_LEN + IP_LEN + TCP_LEN;
/// Where a UDP datagram's payload starts.
pub const UDP_PAYLOAD_AT: usize = ETH_LEN + IP_LEN + UDP_LEN;
/// Where an ICMP message starts.
pub const ICMP_AT: usize = ETH_LEN + IP_LEN;
/// The largest IPv4 packet.
pub const MAX_IP_PACKET: usize = 65535;
/// The transmit buffer's size: the largest frame.
pub const MAX_FRAME: usize = ETH_LEN + MAX_IP_PACKET;

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
    pub src: SocketAddrV4,
    pub dst: SocketAddrV4,
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

/// Fills in an L4 checksum at `field` (offset within `seg`), fully or, with `offload`, only the
/// pseudo-header part for the guest's kernel to trust.
fn l4_checksum(seg: &mut [u8], field: usize, pseudo: u64, offload: bool) -> Option<(u16, u16)> {
    seg[field..field + 2].copy_from_slice(&[0, 0]);
    if offload {
        let p = csum::fold(pseudo);
        seg[field..field + 2].copy_from_slice(&p.to_be_bytes());
        Some(((ETH_LEN + IP_LEN) as u16, field as u16))
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
/// (at `TCP_PAYLOAD_AT + options.len()`). Returns the frame's length and how to send it.
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
    let total = IP_LEN + seg_len;
    write_eth(buf, macs, EthernetProtocol::Ipv4);
    write_ipv4(
        &mut buf[ETH_LEN..],
        *h.src.ip(),
        *h.dst.ip(),
        IpProtocol::Tcp,
        total,
        id,
    );
    let seg = &mut buf[ETH_LEN + IP_LEN..ETH_LEN + total];
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
    let pseudo = csum::pseudo(*h.src.ip(), *h.dst.ip(), 6, seg_len);
    let csum = l4_checksum(seg, 16, pseudo, offload);
    (
        ETH_LEN + total,
        TxMeta {
            csum,
            gso_mss: None,
        },
    )
}

/// Writes the headers of a UDP datagram whose payload already sits at `UDP_PAYLOAD_AT`.
pub fn udp(
    buf: &mut [u8],
    macs: Macs,
    src: SocketAddrV4,
    dst: SocketAddrV4,
    payload_len: usize,
    id: u16,
    offload: bool,
) -> (usize, TxMeta) {
    let seg_len = UDP_LEN + payload_len;
    let total = IP_LEN + seg_len;
    write_eth(buf, macs, EthernetProtocol::Ipv4);
    write_ipv4(
        &mut buf[ETH_LEN..],
        *src.ip(),
        *dst.ip(),
        IpProtocol::Udp,
        total,
        id,
    );
    let seg = &mut buf[ETH_LEN + IP_LEN..ETH_LEN + total];
    {
        let mut u = UdpPacket::new_unchecked(&mut seg[..UDP_LEN]);
        u.set_src_port(src.port());
        u.set_dst_port(dst.port());
        u.set_len(seg_len as u16);
    }
    let pseudo = csum::pseudo(*src.ip(), *dst.ip(), 17, seg_len);
    let csum = l4_checksum(seg, 6, pseudo, offload);
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

/// An ICMP destination-unreachable message quoting a TCP SYN the guest sent (IP header and the
/// first 8 bytes of TCP, which is what the guest's kernel matches on). Returns the frame length.
#[allow(clippy::too_many_arguments)]
pub fn unreachable_for_syn(
    buf: &mut [u8],
    macs: Macs,
    from: Ipv4Addr,
    code: u8,
    guest: SocketAddrV4,
    remote: SocketAddrV4,
    guest_seq: u32,
    id: u16,
) -> usize {
    let quote_at = ICMP_AT + 8;
    let msg = &mut buf[ICMP_AT..quote_at];
    msg.copy_from_slice(&[3, code, 0, 0, 0, 0, 0, 0]);
    write_ipv4(
        &mut buf[quote_at..],
        *guest.ip(),
        *remote.ip(),
        IpProtocol::Tcp,
        IP_LEN + TCP_LEN,
        0,
    );
    let t = quote_at + IP_LEN;
    buf[t..t + 2].copy_from_slice(&guest.port().to_be_bytes());
    buf[t + 2..t + 4].copy_from_slice(&remote.port().to_be_bytes());
    buf[t + 4..t + 8].copy_from_slice(&guest_seq.to_be_bytes());
    icmp(buf, macs, from, *guest.ip(), 8 + IP_LEN + 8, id)
}

/// An ICMP port-unreachable message quoting the start of a datagram the guest sent
/// (`original` is its IP packet).
pub fn port_unreachable(
    buf: &mut [u8],
    macs: Macs,
    from: Ipv4Addr,
    guest: Ipv4Addr,
    original: &[u8],
    id: u16,
) -> usize {
    let quote = original.len().min(IP_LEN + 8 + 40);
    buf[ICMP_AT..ICMP_AT + 8].copy_from_slice(&[3, 3, 0, 0, 0, 0, 0, 0]);
    buf[ICMP_AT + 8..ICMP_AT + 8 + quote].copy_from_slice(&original[..quote]);
    icmp(buf, macs, from, guest, 8 + quote, id)
}
