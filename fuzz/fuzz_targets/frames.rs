//! Fuzzes the rootless NAT's protocol core (`rnat::rootless::core`) with everything it can be
//! given: frames from the guest, host socket readiness, timers and flushes, while a fake [`Host`]
//! answers every socket operation from the fuzz input as well. The core must never panic, and the
//! fake checks a few things the core promises its host (no operation on a closed flow, no consuming
//! data it never sent, well-formed frames to the guest, no leaked flows or buffered bytes).
//!
//! Input layout (every input is a valid program; reads past the end give zeros):
//!
//! ```text
//! [config: 2 bytes] [script length L: 1 byte] [script: L bytes] [events...]
//! ```
//!
//! The script is what the fake host answers (connect results, how much a send takes, peek
//! errors, ...), read in a cycle; byte 0 always means "success", so an empty script is a host
//! where everything works. Each event starts with an opcode byte (see `run`): a guest frame, host
//! readiness (with data or datagrams arriving first), a host-side start (a client of a published
//! TCP port, publishing or withdrawing a UDP port), time passing, a flush, or a repeat of the last
//! frame. Besides raw frames, the harness builds well-formed Ethernet/IPv4/TCP|UDP|ICMP|ARP
//! frames with correct checksums from a few bytes (with optional link- and IP-level defects), and
//! keeps a model of each guest connection (the sequence numbers seen both ways) so that inputs can
//! follow a real handshake into established states.
//!
//! Build it with `--no-cfg-fuzzing` (as `scripts/fuzz.sh` does): under `cfg(fuzzing)` smoltcp
//! accepts every checksum, which would hide the core's checksum handling.

#![no_main]

use std::collections::{BTreeMap, VecDeque};
use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV4};
use std::time::{Duration, Instant};

use libfuzzer_sys::fuzz_target;
use rnat::rootless::core::{
    csum, Config, Core, DgramError, FlowId, Host, Ipv6Config, Peek, Ready, RxMeta, TxMeta,
    Unreachable, GATEWAY_MAC,
};

const GUEST_MAC: [u8; 6] = [0x02, 0x00, 0x00, 0x00, 0x00, 0x64];
const OTHER_MAC: [u8; 6] = [0x02, 0x00, 0x00, 0x00, 0x00, 0x65];
const GUEST: Ipv4Addr = Ipv4Addr::new(10, 0, 2, 100);
const ETH_LEN: usize = 14;
const IP_LEN: usize = 20;
const MAX_FRAME: usize = ETH_LEN + 40 + 65535;
/// Frames sent by "repeat" events, all of one input together (keeps every input fast).
const MAX_REPEATS: usize = 2048;

/// Addresses the guest sends TCP to: outside, the gateway, DNS, inside the network, loopback,
/// the network's broadcast.
const TCP_REMOTES: [([u8; 4], u16); 8] = [
    ([93, 184, 216, 34], 80),
    ([93, 184, 216, 34], 443),
    ([1, 1, 1, 1], 22),
    ([10, 0, 2, 2], 80),
    ([10, 0, 2, 3], 53),
    ([10, 0, 2, 50], 80),
    ([127, 0, 0, 1], 80),
    ([10, 0, 2, 255], 80),
];
const UDP_REMOTES: [([u8; 4], u16); 8] = [
    ([93, 184, 216, 34], 53),
    ([10, 0, 2, 3], 53),
    ([10, 0, 2, 2], 53),
    ([10, 0, 2, 3], 5353),
    ([1, 1, 1, 1], 123),
    ([127, 0, 0, 1], 53),
    ([10, 0, 2, 7], 9),
    ([224, 0, 0, 251], 5353),
];
const ICMP_REMOTES: [[u8; 4]; 8] = [
    [10, 0, 2, 2],
    [10, 0, 2, 3],
    [93, 184, 216, 34],
    [1, 1, 1, 1],
    [10, 0, 2, 50],
    [127, 0, 0, 1],
    [0, 0, 0, 0],
    [255, 255, 255, 255],
];

fn remote(list: &[([u8; 4], u16); 8], i: u8) -> SocketAddrV4 {
    let (ip, port) = list[usize::from(i) % list.len()];
    SocketAddrV4::new(ip.into(), port)
}

fn seq_gt(a: u32, b: u32) -> bool {
    (a.wrapping_sub(b) as i32) > 0
}

/// The event stream: reads past the end yield zeros.
struct Bytes<'a> {
    data: &'a [u8],
    pos: usize,
}

impl<'a> Bytes<'a> {
    fn done(&self) -> bool {
        self.pos >= self.data.len()
    }
    fn u8(&mut self) -> u8 {
        let b = self.data.get(self.pos).copied().unwrap_or(0);
        self.pos = self.pos.saturating_add(1);
        b
    }
    fn u16(&mut self) -> u16 {
        u16::from_be_bytes([self.u8(), self.u8()])
    }
    fn u32(&mut self) -> u32 {
        u32::from_be_bytes([self.u8(), self.u8(), self.u8(), self.u8()])
    }
    fn take(&mut self, n: usize) -> &'a [u8] {
        let start = self.pos.min(self.data.len());
        let end = start.saturating_add(n).min(self.data.len());
        self.pos = self.pos.saturating_add(n);
        &self.data[start..end]
    }
    /// A length: 0..=127 as is, then steps of 512 up to 64 KiB.
    fn len(&mut self) -> usize {
        let b = self.u8();
        if b < 128 {
            usize::from(b)
        } else {
            usize::from(b - 127) * 512
        }
    }
}

/// The host's answers, read in a cycle (zero when there are none).
struct Script<'a> {
    data: &'a [u8],
    pos: usize,
}

impl Script<'_> {
    fn next(&mut self) -> u8 {
        if self.data.is_empty() {
            return 0;
        }
        let b = self.data[self.pos % self.data.len()];
        self.pos = self.pos.wrapping_add(1);
        b
    }
}

fn os(errno: i32) -> io::Error {
    io::Error::from_raw_os_error(errno)
}

/// The host side of one TCP flow: data the "server" sent that the core has not consumed.
#[derive(Default)]
struct TcpSock {
    /// Unread bytes in the receive queue.
    avail: usize,
    /// Where the peek offset is (bytes of `avail` already handed out).
    peeked: usize,
    /// The furthest the peek offset has been since those bytes came (a rewind moves `peeked`
    /// back, not this): what was sent to the guest at some point and may be acknowledged.
    sent: usize,
    /// The server closed its side once `avail` is read.
    eof: bool,
    /// The next peek fails once.
    peek_error: bool,
    shut: bool,
}

enum DgramKind {
    Udp,
    Ping,
}

impl Dgram {
    fn new(kind: DgramKind) -> Dgram {
        Dgram {
            kind,
            queue: VecDeque::new(),
            sent_to: Vec::new(),
            recv_error: false,
            errors: VecDeque::new(),
        }
    }
}

/// A UDP or ICMP echo socket: datagrams waiting to be received.
struct Dgram {
    kind: DgramKind,
    /// (source, length, first byte (ICMP type), fill byte)
    queue: VecDeque<(SocketAddr, usize, u8, u8)>,
    /// The last few destinations sent to, so that replies can come from them.
    sent_to: Vec<SocketAddr>,
    recv_error: bool,
    /// ICMP errors the network reported for the socket's datagrams.
    errors: VecDeque<DgramError>,
}

/// What the guest knows of one of its TCP connections, learned from the frames both ways.
#[derive(Default, Clone, Copy)]
struct GuestConn {
    /// The guest's next sequence number.
    nxt: u32,
    /// The last sequence number the guest used.
    last_seq: u32,
    /// The core's next sequence number as the guest has seen it.
    peer_nxt: u32,
    /// The last acknowledgment the guest sent.
    last_ack: u32,
}

struct FakeHost<'a> {
    script: Script<'a>,
    tcp: BTreeMap<FlowId, TcpSock>,
    dgram: BTreeMap<FlowId, Dgram>,
    conns: BTreeMap<(u16, SocketAddrV4), GuestConn>,
    mtu: usize,
    /// The core runs with IPv6 on.
    ipv6: bool,
    /// While the harness publishes a port or accepts a client: the kind of socket `adopt` takes
    /// (TCP: true).
    adopting: Option<bool>,
}

impl FakeHost<'_> {
    fn tcp(&mut self, id: FlowId, op: &str) -> &mut TcpSock {
        match self.tcp.get_mut(&id) {
            Some(s) => s,
            None => panic!("core called {op} on flow {id}, which has no open TCP socket"),
        }
    }
    fn dgram(&mut self, id: FlowId, op: &str) -> &mut Dgram {
        match self.dgram.get_mut(&id) {
            Some(s) => s,
            None => panic!("core called {op} on flow {id}, which has no open datagram socket"),
        }
    }
    fn check_new(&self, id: FlowId) {
        assert!(
            !self.tcp.contains_key(&id) && !self.dgram.contains_key(&id),
            "core opened flow {id} while its previous socket is still open"
        );
    }
    fn open_flows(&self) -> usize {
        self.tcp.len() + self.dgram.len()
    }

    /// Checks a frame to the guest and learns the core's sequence numbers from it.
    fn check_frame(&mut self, f: &[u8], meta: TxMeta) {
        assert!(
            f.len() >= ETH_LEN && f.len() <= MAX_FRAME,
            "frame length {}",
            f.len()
        );
        assert_eq!(f[6..12], GATEWAY_MAC, "source MAC");
        match u16::from_be_bytes([f[12], f[13]]) {
            0x0806 => {
                assert!(f.len() >= ETH_LEN + 28, "short ARP");
                return;
            }
            0x0800 => {}
            0x86dd => return self.check_ipv6(f, meta),
            t => panic!("ethertype {t:#x} to the guest"),
        }
        let ip = &f[ETH_LEN..];
        assert!(ip.len() >= IP_LEN && ip[0] == 0x45, "IPv4 header");
        let total = usize::from(u16::from_be_bytes([ip[2], ip[3]]));
        assert_eq!(total, ip.len(), "IPv4 total length");
        assert_eq!(
            csum::fold(csum::add(0, &ip[..IP_LEN])),
            0xffff,
            "IPv4 checksum"
        );
        let src = Ipv4Addr::new(ip[12], ip[13], ip[14], ip[15]);
        let dst = Ipv4Addr::new(ip[16], ip[17], ip[18], ip[19]);
        let proto = ip[9];
        let seg = &ip[IP_LEN..];
        let l4_ok = |field: usize| match meta.csum {
            None => {
                csum::fold(csum::add(
                    csum::pseudo(src.into(), dst.into(), proto, seg.len()),
                    seg,
                )) == 0xffff
            }
            Some((start, at)) => usize::from(start) == ETH_LEN + IP_LEN && usize::from(at) == field,
        };
        match proto {
            6 => {
                assert!(seg.len() >= 20, "short TCP");
                let hl = usize::from(seg[12] >> 4) * 4;
                assert!(hl >= 20 && hl <= seg.len(), "TCP header length");
                assert!(l4_ok(16), "TCP checksum {meta:?}");
                if meta.gso_mss.is_none() {
                    assert!(total <= self.mtu, "TCP packet of {total} over the MTU");
                }
                let sport = u16::from_be_bytes([seg[0], seg[1]]);
                let dport = u16::from_be_bytes([seg[2], seg[3]]);
                let seq = u32::from_be_bytes([seg[4], seg[5], seg[6], seg[7]]);
                let flags = seg[13];
                let (syn, fin, rst) = (flags & 2 != 0, flags & 1 != 0, flags & 4 != 0);
                if dst == GUEST && !rst {
                    let key = (dport, SocketAddrV4::new(src, sport));
                    let c = self.conns.entry(key).or_default();
                    let end = seq
                        .wrapping_add((seg.len() - hl) as u32)
                        .wrapping_add(u32::from(syn) + u32::from(fin));
                    if syn || seq_gt(end, c.peer_nxt) {
                        c.peer_nxt = end;
                    }
                }
            }
            17 => {
                assert!(seg.len() >= 8, "short UDP");
                assert_eq!(usize::from(u16::from_be_bytes([seg[4], seg[5]])), seg.len());
                assert!(l4_ok(6), "UDP checksum");
                if meta.gso_mss.is_none() {
                    assert!(total <= self.mtu, "UDP packet of {total} over the MTU");
                }
            }
            1 => {
                assert!(seg.len() >= 8, "short ICMP");
                assert_eq!(csum::fold(csum::add(0, seg)), 0xffff, "ICMP checksum");
                if seg[0] == 3 {
                    // An error quotes the guest's packet: an IPv4 header from the guest, whole.
                    let q = &seg[8..];
                    assert!(q.len() >= IP_LEN && q[0] >> 4 == 4, "quoted IPv4 header");
                    let ihl = usize::from(q[0] & 15) * 4;
                    assert!(ihl >= IP_LEN && q.len() >= ihl + 8, "short quote");
                    assert_eq!(
                        csum::fold(csum::add(0, &q[..ihl])),
                        0xffff,
                        "quoted IPv4 checksum"
                    );
                    assert_eq!(q[12..16], GUEST.octets(), "quoted source");
                }
            }
            p => panic!("IP protocol {p} to the guest"),
        }
    }
}

impl FakeHost<'_> {
    fn check_ipv6(&mut self, f: &[u8], meta: TxMeta) {
        assert!(self.ipv6, "IPv6 to the guest with IPv6 off");
        let ip = &f[ETH_LEN..];
        assert!(ip.len() >= 40 && ip[0] >> 4 == 6, "IPv6 header");
        let plen = usize::from(u16::from_be_bytes([ip[4], ip[5]]));
        assert_eq!(plen + 40, ip.len(), "IPv6 payload length");
        let mut a = [0u8; 16];
        a.copy_from_slice(&ip[8..24]);
        let src = IpAddr::V6(Ipv6Addr::from(a));
        a.copy_from_slice(&ip[24..40]);
        let dst = IpAddr::V6(Ipv6Addr::from(a));
        let seg = &ip[40..];
        let whole =
            || csum::fold(csum::add(csum::pseudo(src, dst, ip[6], seg.len()), seg)) == 0xffff;
        let l4_ok = |field: usize| match meta.csum {
            None => whole(),
            Some((start, at)) => usize::from(start) == ETH_LEN + 40 && usize::from(at) == field,
        };
        match ip[6] {
            6 => assert!(seg.len() >= 20 && l4_ok(16), "TCP over IPv6"),
            17 => assert!(seg.len() >= 8 && l4_ok(6), "UDP over IPv6"),
            58 => {
                assert!(seg.len() >= 8 && meta.csum.is_none() && whole(), "ICMPv6");
                if seg[0] == 1 {
                    // An error quotes an IPv6 header from the guest and 8 bytes after it.
                    let q = &seg[8..];
                    assert!(q.len() >= 48 && q[0] >> 4 == 6, "quoted IPv6 header");
                    assert_eq!(&q[8..10], &[0xfd, 0x00], "quoted source: the guest's");
                }
            }
            p => panic!("IPv6 next header {p} to the guest"),
        }
        if meta.gso_mss.is_none() {
            assert!(
                ip.len() <= self.mtu,
                "IPv6 packet of {} over the MTU",
                ip.len()
            );
        }
    }
}

impl Host for FakeHost<'_> {
    fn emit(&mut self, frame: &[u8], meta: TxMeta) {
        if trace() && frame.len() >= ETH_LEN + IP_LEN + 14 && frame[ETH_LEN + 9] == 6 {
            let t = &frame[ETH_LEN + IP_LEN..];
            eprintln!(
                "  emit TCP flags {:#04x} seq {} ack {} len {}",
                t[13],
                u32::from_be_bytes([t[4], t[5], t[6], t[7]]),
                u32::from_be_bytes([t[8], t[9], t[10], t[11]]),
                t.len() - usize::from(t[12] >> 4) * 4
            );
        }
        self.check_frame(frame, meta);
    }

    fn tcp_connect(&mut self, flow: FlowId, _dst: SocketAddr) -> io::Result<()> {
        self.check_new(flow);
        // The socket exists (and must be closed) whatever the connect says.
        self.tcp.insert(flow, TcpSock::default());
        match self.script.next() & 7 {
            0..=3 => Ok(()),
            4 => Err(os(libc::ECONNREFUSED)),
            5 => Err(os(libc::ENETUNREACH)),
            6 => Err(os(libc::EPERM)),
            _ => Err(io::Error::other("no such thing")),
        }
    }

    fn tcp_connect_result(&mut self, flow: FlowId) -> io::Result<()> {
        self.tcp(flow, "tcp_connect_result");
        match self.script.next() & 7 {
            0..=2 => Ok(()),
            3 => Err(os(libc::EINPROGRESS)),
            4 => Err(io::ErrorKind::WouldBlock.into()),
            5 => Err(os(libc::ECONNREFUSED)),
            6 => Err(os(libc::EHOSTUNREACH)),
            _ => Err(os(libc::ETIMEDOUT)),
        }
    }

    fn tcp_send(&mut self, flow: FlowId, data: &[u8]) -> io::Result<usize> {
        let b = self.script.next();
        let s = self.tcp(flow, "tcp_send");
        assert!(!s.shut, "tcp_send on flow {flow} after tcp_shutdown");
        match b >> 6 {
            0 => Ok(data.len()),
            1 => Ok(data.len().min(usize::from(b & 63) * 64)),
            2 if b & 1 == 0 => Ok(0),
            2 => Err(io::ErrorKind::WouldBlock.into()),
            _ if b & 1 == 0 => Err(os(libc::EPIPE)),
            _ => Err(os(libc::ECONNRESET)),
        }
    }

    fn tcp_peek(&mut self, flow: FlowId, buf: &mut [u8]) -> io::Result<Peek> {
        let b = self.script.next();
        let s = self.tcp(flow, "tcp_peek");
        if b == 0xff || std::mem::take(&mut s.peek_error) {
            return Err(os(libc::ECONNRESET));
        }
        if b == 0xfe {
            // A host that cannot peek now for a reason of its own (the driver's in-flight cap).
            return Ok(Peek::Later);
        }
        if s.peeked < s.avail {
            let n = buf.len().min(s.avail - s.peeked);
            buf[..n].fill(0x5a);
            s.peeked += n;
            s.sent = s.sent.max(s.peeked);
            Ok(Peek::Data(n))
        } else if s.eof {
            Ok(Peek::Eof)
        } else {
            Ok(Peek::WouldBlock)
        }
    }

    fn tcp_take(&mut self, flow: FlowId, buf: &mut [u8]) -> io::Result<Peek> {
        let b = self.script.next();
        let s = self.tcp(flow, "tcp_take");
        assert_eq!(s.peeked, 0, "flow {flow}: tcp_take with bytes peeked");
        if b == 0xff || std::mem::take(&mut s.peek_error) {
            return Err(os(libc::ECONNRESET));
        }
        if s.avail > 0 {
            let n = buf.len().min(s.avail);
            buf[..n].fill(0x5a);
            s.avail -= n;
            s.sent = s.sent.saturating_sub(n);
            Ok(Peek::Data(n))
        } else if s.eof {
            Ok(Peek::Eof)
        } else {
            Ok(Peek::WouldBlock)
        }
    }

    fn tcp_consume(&mut self, flow: FlowId, n: usize) {
        let s = self.tcp(flow, "tcp_consume");
        // Acknowledged bytes were sent once, though perhaps before a rewind; as the kernel does,
        // the peek offset moves back and stops at the front.
        assert!(
            n <= s.sent,
            "flow {flow}: consumed {n} bytes but only {} were sent",
            s.sent
        );
        s.avail -= n;
        s.sent -= n;
        s.peeked = s.peeked.saturating_sub(n);
    }

    fn tcp_rewind(&mut self, flow: FlowId) {
        self.tcp(flow, "tcp_rewind").peeked = 0;
    }

    fn tcp_shutdown(&mut self, flow: FlowId) {
        self.tcp(flow, "tcp_shutdown").shut = true;
    }

    fn tcp_close(&mut self, flow: FlowId, _reset: bool) {
        self.tcp(flow, "tcp_close");
        self.tcp.remove(&flow);
    }

    fn udp_open(&mut self, flow: FlowId, v6: bool) -> io::Result<()> {
        assert!(self.ipv6 || !v6, "IPv6 socket with IPv6 off");
        self.check_new(flow);
        if self.script.next() & 15 == 15 {
            return Err(os(libc::EMFILE));
        }
        self.dgram.insert(flow, Dgram::new(DgramKind::Udp));
        Ok(())
    }

    fn udp_send(&mut self, flow: FlowId, dst: SocketAddr, _data: &[u8]) -> io::Result<()> {
        let fail = self.script.next() & 15 == 15;
        let d = self.dgram(flow, "udp_send");
        assert!(
            matches!(d.kind, DgramKind::Udp),
            "udp_send on a ping socket"
        );
        if !d.sent_to.contains(&dst) {
            if d.sent_to.len() == 4 {
                d.sent_to.remove(0);
            }
            d.sent_to.push(dst);
        }
        if fail {
            return Err(os(libc::ENETUNREACH));
        }
        Ok(())
    }

    fn udp_recv(
        &mut self,
        flow: FlowId,
        buf: &mut [u8],
    ) -> io::Result<Option<(SocketAddr, usize)>> {
        let d = self.dgram(flow, "udp_recv");
        assert!(
            matches!(d.kind, DgramKind::Udp),
            "udp_recv on a ping socket"
        );
        if std::mem::take(&mut d.recv_error) {
            return Err(os(libc::ECONNREFUSED));
        }
        let Some((from, len, _, fill)) = d.queue.pop_front() else {
            return Ok(None);
        };
        let n = len.min(buf.len());
        buf[..n].fill(fill);
        Ok(Some((from, n)))
    }

    fn dgram_error(&mut self, flow: FlowId) -> io::Result<Option<DgramError>> {
        Ok(self.dgram(flow, "dgram_error").errors.pop_front())
    }

    fn ping_open(&mut self, flow: FlowId, v6: bool) -> io::Result<()> {
        assert!(self.ipv6 || !v6, "ICMPv6 socket with IPv6 off");
        self.check_new(flow);
        if self.script.next() & 15 == 15 {
            return Err(os(libc::EACCES));
        }
        self.dgram.insert(flow, Dgram::new(DgramKind::Ping));
        Ok(())
    }

    fn ping_send(&mut self, flow: FlowId, dst: IpAddr, icmp: &[u8]) -> io::Result<()> {
        let fail = self.script.next() & 15 == 15;
        let d = self.dgram(flow, "ping_send");
        assert!(
            matches!(d.kind, DgramKind::Ping),
            "ping_send on a UDP socket"
        );
        assert!(icmp.len() >= 8, "ping_send of {} bytes", icmp.len());
        let dst = SocketAddr::new(dst, 0);
        if !d.sent_to.contains(&dst) {
            if d.sent_to.len() == 4 {
                d.sent_to.remove(0);
            }
            d.sent_to.push(dst);
        }
        if fail {
            return Err(os(libc::EHOSTUNREACH));
        }
        Ok(())
    }

    fn ping_recv(&mut self, flow: FlowId, buf: &mut [u8]) -> io::Result<Option<(IpAddr, usize)>> {
        let d = self.dgram(flow, "ping_recv");
        assert!(
            matches!(d.kind, DgramKind::Ping),
            "ping_recv on a UDP socket"
        );
        if std::mem::take(&mut d.recv_error) {
            return Err(os(libc::EHOSTUNREACH));
        }
        let Some((from, len, first, _)) = d.queue.pop_front() else {
            return Ok(None);
        };
        let n = len.min(buf.len());
        buf[..n].fill(0x33);
        if n > 0 {
            buf[0] = first;
        }
        Ok(Some((from.ip(), n)))
    }

    fn dgram_close(&mut self, flow: FlowId) {
        self.dgram(flow, "dgram_close");
        self.dgram.remove(&flow);
    }

    fn adopt(&mut self, flow: FlowId) -> io::Result<()> {
        let Some(tcp) = self.adopting else {
            panic!("core adopted a socket for flow {flow} when none was accepted or bound");
        };
        self.check_new(flow);
        if self.script.next() & 15 == 15 {
            return Err(os(libc::EBADF));
        }
        if tcp {
            self.tcp.insert(flow, TcpSock::default());
        } else {
            self.dgram.insert(flow, Dgram::new(DgramKind::Udp));
        }
        Ok(())
    }
}

/// Variations of a well-formed frame's link and IP layers, one bit each (0: none).
mod ipmod {
    /// Two bits: the source MAC is the guest's, another unicast one, multicast, broadcast.
    pub const MAC: u8 = 0x03;
    pub const BAD_CSUM: u8 = 0x04;
    pub const MORE_FRAGS: u8 = 0x08;
    pub const FRAG_OFFSET: u8 = 0x10;
    pub const OTHER_SRC: u8 = 0x20;
    /// Ethernet padding after the IP packet.
    pub const PADDING: u8 = 0x40;
    /// Four bytes of IP options.
    pub const OPTIONS: u8 = 0x80;
}

fn src_mac(mods: u8) -> [u8; 6] {
    match mods & ipmod::MAC {
        0 => GUEST_MAC,
        1 => OTHER_MAC,
        2 => [0x01, 0x00, 0x5e, 0x00, 0x00, 0x01],
        _ => [0xff; 6],
    }
}

/// Writes Ethernet and IPv4 headers (valid checksum, DF unless `mods` say otherwise) around
/// `l4` into `out`.
fn ipv4_frame(out: &mut Vec<u8>, mods: u8, dst: Ipv4Addr, proto: u8, l4: &[u8]) {
    out.clear();
    out.extend_from_slice(&GATEWAY_MAC);
    out.extend_from_slice(&src_mac(mods));
    out.extend_from_slice(&[0x08, 0x00]);
    let hl = if mods & ipmod::OPTIONS != 0 {
        IP_LEN + 4
    } else {
        IP_LEN
    };
    let total = (hl + l4.len()).min(65535);
    let mut ip = [0u8; IP_LEN + 4];
    ip[0] = 0x40 | (hl / 4) as u8;
    ip[2..4].copy_from_slice(&(total as u16).to_be_bytes());
    ip[4..6].copy_from_slice(&0x1234u16.to_be_bytes());
    ip[6] = if mods & ipmod::MORE_FRAGS != 0 {
        0x20
    } else {
        0x40
    };
    if mods & ipmod::FRAG_OFFSET != 0 {
        ip[7] = 0xb9;
    }
    ip[8] = 64;
    ip[9] = proto;
    let src = if mods & ipmod::OTHER_SRC != 0 {
        Ipv4Addr::new(10, 0, 2, 101)
    } else {
        GUEST
    };
    ip[12..16].copy_from_slice(&src.octets());
    ip[16..20].copy_from_slice(&dst.octets());
    ip[20..24].copy_from_slice(&[1, 1, 1, 0]);
    let mut sum = csum::finish(csum::add(0, &ip[..hl]));
    if mods & ipmod::BAD_CSUM != 0 {
        sum ^= 0x0100;
    }
    ip[10..12].copy_from_slice(&sum.to_be_bytes());
    out.extend_from_slice(&ip[..hl]);
    out.extend_from_slice(&l4[..total - hl]);
    if mods & ipmod::PADDING != 0 {
        out.extend_from_slice(&[0; 8]);
    }
}

/// Fills in the L4 checksum at `field` of `seg` (TCP and UDP: with the pseudo-header; ICMP:
/// without).
fn l4_csum(seg: &mut [u8], field: usize, src: Ipv4Addr, dst: Ipv4Addr, proto: u8) {
    if seg.len() < field + 2 {
        return;
    }
    seg[field..field + 2].copy_from_slice(&[0, 0]);
    let pseudo = if proto == 1 {
        0
    } else {
        csum::pseudo(src.into(), dst.into(), proto, seg.len())
    };
    let sum = csum::finish(csum::add(pseudo, seg));
    seg[field..field + 2].copy_from_slice(&sum.to_be_bytes());
}

/// Payload bytes that fit in one IPv4 packet after `hdr` bytes of L4 header.
fn fit(len: usize, hdr: usize) -> usize {
    len.min(65535 - IP_LEN - hdr)
}

struct Sim<'a> {
    core: Core,
    host: FakeHost<'a>,
    now: Instant,
    deadline: Option<Instant>,
    autoflush: bool,
    /// The last frame sent, for "repeat".
    last: Vec<u8>,
    last_rx: RxMeta,
    repeats: usize,
    l4: Vec<u8>,
    frame: Vec<u8>,
}

impl Sim<'_> {
    fn send(&mut self, rx: RxMeta) {
        self.core
            .on_frame(&mut self.host, &self.frame, rx, self.now);
        std::mem::swap(&mut self.last, &mut self.frame);
        self.last_rx = rx;
        if self.autoflush {
            self.core.flush(&mut self.host, self.now);
        }
    }

    fn check(&mut self) {
        let stats = self.core.stats();
        assert_eq!(
            self.core.flow_count(),
            self.host.open_flows(),
            "the core's flows and the host's open sockets differ"
        );
        if stats.flows == 0 {
            assert_eq!(stats.buffered, 0, "bytes buffered with no flow");
        }
    }

    /// A raw frame: whole, as an IPv4 packet behind a valid Ethernet header, or as an L4
    /// segment behind valid headers (optionally with its checksum fixed up).
    fn raw(&mut self, ev: &mut Bytes, op: u8) {
        let mode = ev.u8();
        let len = usize::from(ev.u16());
        let body = ev.take(len);
        let rx = RxMeta {
            csum_trusted: op & 0x10 != 0,
        };
        match mode & 3 {
            0 | 1 => {
                self.frame.clear();
                let v6 = mode & 3 == 1 && mode & 8 != 0;
                if mode & 3 == 1 {
                    self.frame.extend_from_slice(&GATEWAY_MAC);
                    self.frame.extend_from_slice(&GUEST_MAC);
                    self.frame
                        .extend_from_slice(if v6 { &[0x86, 0xdd] } else { &[0x08, 0x00] });
                }
                let n = body.len().min(MAX_FRAME - self.frame.len());
                self.frame.extend_from_slice(&body[..n]);
                if v6 {
                    // An IPv6 packet of the fuzzer's own: its length made right and, for TCP,
                    // UDP and ICMPv6, its checksum too.
                    fix_ipv6(&mut self.frame[ETH_LEN..], mode & 4 != 0);
                    self.send(rx);
                    return;
                }
                // An IP packet of the fuzzer's own, with its header checksum made right.
                let hl = usize::from(self.frame.get(ETH_LEN).map_or(0, |b| b & 15)) * 4;
                if mode & 3 == 1 && mode & 4 != 0 && hl >= 12 && self.frame.len() >= ETH_LEN + hl {
                    let ip = &mut self.frame[ETH_LEN..ETH_LEN + hl];
                    ip[10..12].copy_from_slice(&[0, 0]);
                    let sum = csum::finish(csum::add(0, ip));
                    ip[10..12].copy_from_slice(&sum.to_be_bytes());
                }
            }
            _ => {
                let proto = match (mode >> 2) & 3 {
                    0 => 6,
                    1 => 17,
                    2 => 1,
                    _ => mode >> 4,
                };
                let dst = *remote(&TCP_REMOTES, mode >> 5).ip();
                self.l4.clear();
                self.l4.extend_from_slice(&body[..fit(body.len(), 0)]);
                if mode & 3 == 3 {
                    match proto {
                        6 => l4_csum(&mut self.l4, 16, GUEST, dst, 6),
                        17 => l4_csum(&mut self.l4, 6, GUEST, dst, 17),
                        1 => l4_csum(&mut self.l4, 2, GUEST, dst, 1),
                        _ => {}
                    }
                }
                ipv4_frame(&mut self.frame, 0, dst, proto, &self.l4);
            }
        }
        self.send(rx);
    }

    /// A TCP segment built from a few bytes, with sequence numbers taken from the guest's
    /// model of the connection unless the input gives them outright.
    fn tcp(&mut self, ev: &mut Bytes) {
        let sel = ev.u8();
        let flags = ev.u8();
        let modes = ev.u8();
        let port = 40000 + u16::from(sel & 3);
        let to = remote(&TCP_REMOTES, (sel >> 2) & 7);
        let key = (port, to);
        let mut c = self.host.conns.get(&key).copied().unwrap_or(GuestConn {
            nxt: 1000,
            last_seq: 1000,
            peer_nxt: 0,
            last_ack: 0,
        });
        let seq = match modes & 3 {
            0 => c.nxt,
            1 => c.nxt.wrapping_add(ev.u8() as i8 as i32 as u32),
            2 => c.last_seq,
            _ => ev.u32(),
        };
        let ack = match (modes >> 2) & 3 {
            0 => c.peer_nxt,
            1 => c.last_ack,
            2 => c.peer_nxt.wrapping_add(ev.u8() as i8 as i32 as u32),
            _ => ev.u32(),
        };
        let window = match (modes >> 4) & 3 {
            0 => 65535,
            1 => 0,
            2 => ev.u16(),
            _ => u16::from(ev.u8()),
        };
        let mut opts = Vec::new();
        match modes >> 6 {
            0 if flags & 2 != 0 => opts.extend_from_slice(&[2, 4, 5, 0xb4, 1, 3, 3, 7]),
            0 | 1 => {}
            2 => {
                let mss = ev.u16().to_be_bytes();
                let ws = ev.u8();
                opts.extend_from_slice(&[2, 4, mss[0], mss[1], 1, 3, 3, ws]);
            }
            _ => {
                let n = usize::from(ev.u8()) % 41;
                opts.extend_from_slice(ev.take(n));
                while opts.len() % 4 != 0 {
                    opts.push(0);
                }
            }
        }
        let misc = ev.u8();
        let mods = if misc & 2 != 0 { ev.u8() } else { 0 };
        let payload = fit(ev.len(), 20 + opts.len() + 4);
        self.l4.clear();
        self.l4.extend_from_slice(&port.to_be_bytes());
        self.l4.extend_from_slice(&to.port().to_be_bytes());
        self.l4.extend_from_slice(&seq.to_be_bytes());
        self.l4.extend_from_slice(&ack.to_be_bytes());
        self.l4.push((((20 + opts.len()) / 4) as u8) << 4);
        self.l4.push(flags);
        self.l4.extend_from_slice(&window.to_be_bytes());
        self.l4.extend_from_slice(&[0, 0, 0, 0]);
        self.l4.extend_from_slice(&opts);
        self.l4.resize(self.l4.len() + payload, b'g');
        l4_csum(&mut self.l4, 16, GUEST, *to.ip(), 6);
        if misc & 1 != 0 {
            self.l4[16] ^= 0x55; // a bad checksum
        }
        ipv4_frame(&mut self.frame, mods, *to.ip(), 6, &self.l4);
        self.send(RxMeta {
            csum_trusted: misc & 4 != 0,
        });
        let (syn, fin) = (flags & 2 != 0, flags & 1 != 0);
        let end = seq
            .wrapping_add(payload as u32)
            .wrapping_add(u32::from(syn) + u32::from(fin));
        if (syn && flags & 0x10 == 0) || seq_gt(end, c.nxt) {
            c.nxt = end;
        }
        c.last_seq = seq;
        if flags & 0x10 != 0 {
            c.last_ack = ack;
        }
        self.host.conns.insert(key, c);
    }

    fn udp(&mut self, ev: &mut Bytes) {
        let sel = ev.u8();
        let var = ev.u8();
        let mods = if var & 0x40 != 0 { ev.u8() } else { 0 };
        let payload = fit(ev.len(), 8 + 4);
        let port = 50000 + u16::from(sel & 3);
        let base = remote(&UDP_REMOTES, (sel >> 2) & 7);
        // Many destinations from one port: up to 64 one at a time, or 40 at once (more peers
        // than a flow remembers).
        let burst = if var & 0x80 != 0 { 40 } else { 1 };
        for i in 0..burst {
            let off = u16::from(var & 0x3f) + i;
            let to = SocketAddrV4::new(*base.ip(), base.port().wrapping_add(off));
            self.udp_to(sel, mods, port, to, payload);
        }
    }

    fn udp_to(&mut self, sel: u8, mods: u8, port: u16, to: SocketAddrV4, payload: usize) {
        self.l4.clear();
        self.l4.extend_from_slice(&port.to_be_bytes());
        self.l4.extend_from_slice(&to.port().to_be_bytes());
        self.l4
            .extend_from_slice(&((8 + payload) as u16).to_be_bytes());
        self.l4.extend_from_slice(&[0, 0]);
        self.l4.resize(8 + payload, b'u');
        if sel & 0x20 == 0 {
            l4_csum(&mut self.l4, 6, GUEST, *to.ip(), 17);
        }
        if sel & 0x40 != 0 {
            self.l4[6] ^= 0x11;
        }
        ipv4_frame(&mut self.frame, mods, *to.ip(), 17, &self.l4);
        self.send(RxMeta {
            csum_trusted: sel & 0x80 != 0,
        });
    }

    fn icmp(&mut self, ev: &mut Bytes) {
        let sel = ev.u8();
        let mods = if sel & 0x80 != 0 { ev.u8() } else { 0 };
        let payload = fit(ev.len(), 8 + 4);
        let ty = if sel & 0x20 != 0 { ev.u8() } else { 8 };
        let ident = 0x100 + u16::from(sel & 3);
        let to: Ipv4Addr = ICMP_REMOTES[usize::from((sel >> 2) & 7)].into();
        self.l4.clear();
        self.l4.extend_from_slice(&[ty, 0, 0, 0]);
        self.l4.extend_from_slice(&ident.to_be_bytes());
        self.l4.extend_from_slice(&u16::from(sel).to_be_bytes());
        self.l4.resize(8 + payload, b'p');
        l4_csum(&mut self.l4, 2, GUEST, to, 1);
        if sel & 0x40 != 0 {
            self.l4[2] ^= 0x22;
        }
        ipv4_frame(&mut self.frame, mods, to, 1, &self.l4);
        self.send(RxMeta::default());
    }

    fn arp(&mut self, ev: &mut Bytes) {
        let sel = ev.u8();
        let target: Ipv4Addr = [[10, 0, 2, 2], [10, 0, 2, 3], [10, 0, 2, 9], [10, 0, 2, 100]]
            [usize::from(sel & 3)]
        .into();
        let sender = if sel & 4 != 0 {
            Ipv4Addr::new(10, 0, 2, 101)
        } else {
            GUEST
        };
        let mac = if sel & 8 != 0 { OTHER_MAC } else { GUEST_MAC };
        let dst_mac = if sel & 0x10 != 0 {
            GATEWAY_MAC
        } else {
            [0xff; 6]
        };
        let op: u16 = if sel & 0x20 != 0 { 2 } else { 1 };
        self.frame.clear();
        self.frame.extend_from_slice(&dst_mac);
        self.frame.extend_from_slice(&mac);
        self.frame
            .extend_from_slice(&[0x08, 0x06, 0, 1, 8, 0, 6, 4]);
        self.frame.extend_from_slice(&op.to_be_bytes());
        self.frame.extend_from_slice(&mac);
        self.frame.extend_from_slice(&sender.octets());
        self.frame.extend_from_slice(&[0; 6]);
        self.frame.extend_from_slice(&target.octets());
        self.send(RxMeta::default());
    }

    /// Readiness for a flow the host knows (or any id), with data arriving first.
    fn ready(&mut self, ev: &mut Bytes) {
        let pick = ev.u8();
        let bits = ev.u8();
        let ids: Vec<FlowId> = self
            .host
            .tcp
            .keys()
            .chain(self.host.dgram.keys())
            .copied()
            .collect();
        let id = if pick < 0xf0 && !ids.is_empty() {
            ids[usize::from(pick) % ids.len()]
        } else {
            usize::from(pick & 0x7f)
        };
        if let Some(s) = self.host.tcp.get_mut(&id) {
            let amount = ev.len();
            if !s.eof {
                s.avail += amount;
                s.eof = bits & 8 != 0;
            }
            s.peek_error |= bits & 0x10 != 0;
        } else if let Some(d) = self.host.dgram.get_mut(&id) {
            d.recv_error |= bits & 0x10 != 0;
            if bits & 0x10 != 0 {
                // An ICMP error for a datagram to a peer the flow sent to, or to a stranger.
                let b = ev.u8();
                let seq = ev.u8();
                let dst = match d.sent_to.len() {
                    0 => SocketAddr::from((Ipv4Addr::new(1, 2, 3, 4), 5678)),
                    n => d.sent_to[usize::from(b) % n],
                };
                let unreachable = match b >> 5 {
                    0 => None,
                    1..=3 => Some(Unreachable::V4(seq & 15)),
                    _ => Some(Unreachable::V6(seq & 7)),
                };
                d.errors.push_back(DgramError {
                    dst,
                    unreachable,
                    len: usize::from(b & 0x1f) * 100,
                    head: [8, 0, 0, 0, 0, 0, 0, seq],
                });
            }
            for _ in 0..(bits >> 5) {
                let b = ev.u8();
                let detail = ev.u8();
                // From a peer the flow sent to, or from a stranger (loopback appears as the
                // gateway on a published port).
                let from = match (b >> 6, d.sent_to.len()) {
                    (3, _) | (_, 0) => [
                        SocketAddr::from((Ipv4Addr::new(1, 2, 3, 4), 5678)),
                        SocketAddr::from((Ipv4Addr::LOCALHOST, 4000)),
                        SocketAddr::from((Ipv4Addr::new(93, 184, 216, 34), 53)),
                        SocketAddr::from((Ipv4Addr::new(192, 0, 2, 53), 53)),
                    ][usize::from(detail & 3)],
                    (i, n) => d.sent_to[usize::from(i) % n],
                };
                let class = usize::from(b & 63);
                let len = if class < 48 {
                    class * 16
                } else {
                    (class - 47) * 4096
                };
                // An echo reply (type 0) unless the input says otherwise.
                let first = if detail & 0x80 != 0 { detail & 0x7f } else { 0 };
                d.queue.push_back((from, len, first, detail));
            }
        }
        let ready = Ready {
            readable: bits & 1 != 0,
            writable: bits & 2 != 0,
            error: bits & 4 != 0,
            hup: bits & 8 != 0,
            urgent: bits & 0x21 == 0x21,
        };
        self.core.on_ready(&mut self.host, id, ready, self.now);
    }

    /// The host side starts something: a client connects to a published TCP port, or a UDP
    /// port is published or withdrawn.
    fn control(&mut self, ev: &mut Bytes) {
        let b = ev.u8();
        match b & 3 {
            0 | 1 => {
                // Clients the guest's TCP events can answer: two outside, one on the host's
                // loopback (seen as the gateway); with bit 6, their IPv6 counterparts (refused
                // when the guest has no IPv6).
                let i = usize::from((b >> 2) & 3);
                let client = if b & 0x40 != 0 {
                    SocketAddr::from((
                        [
                            Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, 0x34),
                            Ipv6Addr::new(0x2001, 0xdb8, 1, 0, 0, 0, 0, 1),
                            Ipv6Addr::LOCALHOST,
                            Ipv6Addr::new(0xfd00, 0, 0, 0, 0, 0, 0, 2),
                        ][i],
                        80,
                    ))
                } else {
                    SocketAddr::V4(
                        [
                            SocketAddrV4::new(Ipv4Addr::new(93, 184, 216, 34), 80),
                            SocketAddrV4::new(Ipv4Addr::new(1, 1, 1, 1), 22),
                            SocketAddrV4::new(Ipv4Addr::LOCALHOST, 80),
                            SocketAddrV4::new(Ipv4Addr::new(10, 0, 2, 2), 80),
                        ][i],
                    )
                };
                let port = 40000 + u16::from((b >> 4) & 3);
                self.host.adopting = Some(true);
                self.core
                    .tcp_inbound(&mut self.host, client, port, self.now);
            }
            2 => {
                let port = 50000 + u16::from((b >> 4) & 3);
                self.host.adopting = Some(false);
                let _ = self
                    .core
                    .udp_publish(&mut self.host, port, b & 0x40 != 0, self.now);
            }
            _ => {
                let port = 50000 + u16::from((b >> 4) & 3);
                self.core.udp_unpublish(&mut self.host, port, b & 0x40 != 0);
            }
        }
        self.host.adopting = None;
    }

    fn timer(&mut self, ev: &mut Bytes) {
        let b = ev.u8();
        self.now = match b {
            0..=63 => self.now + Duration::from_millis(u64::from(b)),
            64..=127 => self.now + Duration::from_millis(50 * u64::from(b - 63)),
            128..=191 => self.now + Duration::from_secs(u64::from(b - 127)),
            _ => match self.deadline {
                Some(d) if d > self.now => d,
                _ => self.now + Duration::from_secs(1),
            },
        };
        self.deadline = self.core.on_timer(&mut self.host, self.now);
    }

    fn repeat(&mut self, ev: &mut Bytes) {
        let n = usize::from(ev.u8()) + 1;
        let flush_every = usize::from(ev.u8() & 7);
        for i in 0..n {
            if self.repeats >= MAX_REPEATS {
                return;
            }
            self.repeats += 1;
            self.core
                .on_frame(&mut self.host, &self.last, self.last_rx, self.now);
            if flush_every != 0 && i % flush_every == 0 {
                self.core.flush(&mut self.host, self.now);
            }
        }
    }
}

/// `RNAT_FUZZ_TRACE=1` prints each event (for working out what a crashing input does).
fn trace() -> bool {
    static TRACE: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *TRACE.get_or_init(|| std::env::var_os("RNAT_FUZZ_TRACE").is_some())
}

fn run(data: &[u8]) {
    let mut ev = Bytes { data, pos: 0 };
    let c0 = ev.u8();
    let c1 = ev.u8();
    let script_len = usize::from(ev.u8());
    let script = ev.take(script_len);

    let mut cfg = Config::for_cidr("10.0.2.0/24".parse().unwrap()).unwrap();
    if c1 & 0x80 != 0 {
        cfg.ipv6 = Some(Ipv6Config::slirp());
    }
    let ipv6 = cfg.ipv6.is_some();
    cfg.offload = c0 & 1 != 0;
    cfg.allow_host_loopback = c0 & 2 != 0;
    if c0 & 4 != 0 {
        cfg.resolvers = vec![Ipv4Addr::new(192, 0, 2, 53).into()];
    }
    cfg.max_flows = [64, 1, 4, 16][usize::from((c0 >> 4) & 3)];
    cfg.max_buffered = [1 << 16, 1, 4096, 1 << 20][usize::from(c0 >> 6)];
    cfg.mtu = [1500, 65520, 576, 9000][usize::from(c1 & 3)];
    cfg.flow_window = [65535, 2048, 1 << 20, 300][usize::from((c1 >> 2) & 3)];
    cfg.seed ^= u64::from(c1 >> 4);
    cfg.take_max = [4096, 0, 1, 300][usize::from(c1 >> 6)];
    let mtu = usize::from(cfg.mtu);

    let mut sim = Sim {
        core: Core::new(cfg),
        host: FakeHost {
            script: Script {
                data: script,
                pos: 0,
            },
            tcp: BTreeMap::new(),
            dgram: BTreeMap::new(),
            conns: BTreeMap::new(),
            mtu,
            ipv6,
            adopting: None,
        },
        now: Instant::now(),
        deadline: None,
        autoflush: c0 & 8 != 0,
        last: Vec::new(),
        last_rx: RxMeta::default(),
        repeats: 0,
        l4: Vec::new(),
        frame: Vec::new(),
    };

    let trace = trace();
    while !ev.done() {
        let at = ev.pos;
        let op = ev.u8();
        if trace {
            let end = (at + 16).min(data.len());
            eprintln!(
                "event {op:#04x} at {at}: {:02x?}, flows {}",
                &data[at..end],
                sim.core.flow_count()
            );
        }
        match op & 15 {
            0..=2 => sim.tcp(&mut ev),
            3 => sim.control(&mut ev),
            4 => sim.raw(&mut ev, op),
            5 => sim.udp(&mut ev),
            6 => sim.icmp(&mut ev),
            7 => sim.arp(&mut ev),
            8..=10 => sim.ready(&mut ev),
            11..=12 => sim.timer(&mut ev),
            13 => sim.core.flush(&mut sim.host, sim.now),
            14 => sim.repeat(&mut ev),
            _ => {
                // A quiet period: everything the timers have left to do.
                for _ in 0..64 {
                    sim.now += Duration::from_secs(5);
                    sim.deadline = sim.core.on_timer(&mut sim.host, sim.now);
                    if sim.deadline.is_none() {
                        break;
                    }
                }
            }
        }
        sim.check();
    }
    sim.core.flush(&mut sim.host, sim.now);
    sim.check();
    if trace {
        eprintln!("{:?}", sim.core.stats());
    }
}

fuzz_target!(|data: &[u8]| run(data));

/// Sets an IPv6 packet's payload length to what follows its header, and with `csum` the
/// checksum of a TCP, UDP or ICMPv6 payload.
fn fix_ipv6(ip: &mut [u8], csum_too: bool) {
    if ip.len() < 40 {
        return;
    }
    let plen = (ip.len() - 40).min(65535);
    ip[4..6].copy_from_slice(&(plen as u16).to_be_bytes());
    let field = match ip[6] {
        6 => 16,
        17 => 6,
        58 => 2,
        _ => return,
    };
    if !csum_too || plen < field + 2 {
        return;
    }
    let mut a = [0u8; 16];
    a.copy_from_slice(&ip[8..24]);
    let src = IpAddr::V6(Ipv6Addr::from(a));
    a.copy_from_slice(&ip[24..40]);
    let dst = IpAddr::V6(Ipv6Addr::from(a));
    let proto = ip[6];
    let seg = &mut ip[40..40 + plen];
    seg[field..field + 2].copy_from_slice(&[0, 0]);
    let sum = csum::finish(csum::add(csum::pseudo(src, dst, proto, plen), seg));
    seg[field..field + 2].copy_from_slice(&sum.to_be_bytes());
}
