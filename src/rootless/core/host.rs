//! The core's only way to the outside world: the host socket operations it asks for and the frames
//! it hands out. The real implementation is `rootless::driver`; tests implement it in memory.

use std::io;
use std::net::{IpAddr, SocketAddr};

/// Index of a flow; the driver uses it as the token of the flow's host socket.
pub type FlowId = usize;

/// How a frame handed to [`Host::emit`] may use the TAP device's offloads.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct TxMeta {
    /// The L4 checksum field holds only the pseudo-header sum; the checksum starts at `.0` and
    /// its field is at `.0 + .1` (virtio `NEEDS_CSUM`). `None`: the frame is complete.
    pub csum: Option<(u16, u16)>,
    /// A TCP segment larger than the guest's MSS, to be cut at this size (virtio GSO TCPv4 or
    /// TCPv6, as the frame's ethertype says).
    pub gso_mss: Option<u16>,
}

/// What the TAP device said about a frame it gave us.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RxMeta {
    /// The guest's kernel vouches for the L4 checksum (virtio `NEEDS_CSUM` or `DATA_VALID`).
    pub csum_trusted: bool,
}

/// Result of peeking at a host TCP socket's unread data.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Peek {
    /// This many bytes were copied, starting at the peek offset, which moved past them.
    Data(usize),
    /// Nothing beyond the peek offset yet: the socket reports readiness when more comes.
    WouldBlock,
    /// Nothing can be peeked now, though the socket may hold more: ask again after a consume
    /// (no readiness will come for it).
    Later,
    /// The peer closed its side and everything has been peeked.
    Eof,
}

/// Which host readiness a flow's socket reported.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Ready {
    pub readable: bool,
    pub writable: bool,
    /// Error or hang-up.
    pub error: bool,
    /// The peer shut down its sending side (EPOLLRDHUP): read on to the end of the stream.
    pub hup: bool,
    /// TCP urgent data is pending (EPOLLPRI): a read stops short at its mark.
    pub urgent: bool,
}

impl Ready {
    /// Readable and nothing else (the report of arriving data).
    pub const READABLE: Ready = Ready {
        readable: true,
        writable: false,
        error: false,
        hup: false,
        urgent: false,
    };
    /// Writable and nothing else (room in the send buffer, or a connect that completed).
    pub const WRITABLE: Ready = Ready {
        readable: false,
        writable: true,
        error: false,
        hup: false,
        urgent: false,
    };
}

/// Why a packet could not be delivered: a destination-unreachable message's code as the
/// network sent it, so that a guest of the same family gets it unchanged (Linux treats some
/// codes as fatal to a connected socket and others not), and a guest of the other family the
/// nearest code of its own.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Unreachable {
    /// ICMP destination unreachable (type 3; RFC 792, RFC 1812 5.2.7.1) with this code.
    V4(u8),
    /// ICMPv6 destination unreachable (type 1; RFC 4443 3.1) with this code.
    V6(u8),
}

impl Unreachable {
    pub const NETWORK: Unreachable = Unreachable::V4(0);
    pub const HOST: Unreachable = Unreachable::V4(1);
    pub const PORT: Unreachable = Unreachable::V4(3);
    pub const PROHIBITED: Unreachable = Unreachable::V4(13);

    /// The code for an ICMP message.
    pub fn icmp_code(self) -> u8 {
        match self {
            Unreachable::V4(c) => c,
            Unreachable::V6(0) => 0,          // no route
            Unreachable::V6(1 | 5 | 6) => 13, // prohibited, policy, reject route
            Unreachable::V6(4) => 3,          // port
            Unreachable::V6(_) => 1,          // address unreachable and the rest
        }
    }

    /// The code for an ICMPv6 message.
    pub fn icmpv6_code(self) -> u8 {
        match self {
            Unreachable::V6(c) => c,
            Unreachable::V4(0 | 6 | 11) => 0, // network: no route
            Unreachable::V4(3) => 4,          // port
            Unreachable::V4(9 | 10 | 13..=15) => 1, // administratively prohibited
            Unreachable::V4(_) => 3,          // host and the rest: address unreachable
        }
    }

    /// A port unreachable, which the destination itself sends.
    pub fn is_port(self) -> bool {
        matches!(self, Unreachable::V4(3) | Unreachable::V6(4))
    }
}

/// An error the host's network reported for a datagram a flow's socket sent.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DgramError {
    /// Where the datagram was going (an IPv4 destination as IPv4, never IPv4-mapped).
    pub dst: SocketAddr,
    /// `None`: an error the guest is not told of (packet too big, time exceeded, a local
    /// error).
    pub unreachable: Option<Unreachable>,
    /// Bytes of the datagram's payload that came back with the error (perhaps fewer than were
    /// sent), and the first eight of them (zeros beyond `len`): for an echo socket, the
    /// request's ICMP header.
    pub len: usize,
    pub head: [u8; 8],
}

/// Host socket operations, one socket per flow. Every call is non-blocking.
pub trait Host {
    /// Hands a frame to the guest.
    fn emit(&mut self, frame: &[u8], meta: TxMeta);

    /// Starts a non-blocking connect; completion is reported as writability.
    fn tcp_connect(&mut self, flow: FlowId, dst: SocketAddr) -> io::Result<()>;
    /// The outcome of a connect whose socket has reported writability or an error: `Ok` once
    /// connected (an error is pending otherwise).
    fn tcp_connect_result(&mut self, flow: FlowId) -> io::Result<()>;
    /// Writes as much of `data` as the socket takes; `Ok(0)` when it takes nothing now.
    fn tcp_send(&mut self, flow: FlowId, data: &[u8]) -> io::Result<usize>;
    /// Copies unread data from the peek offset on, without consuming it.
    fn tcp_peek(&mut self, flow: FlowId, buf: &mut [u8]) -> io::Result<Peek>;
    /// Reads (consumes) unread data from the front, as `tcp_peek` would return it; called only
    /// when nothing has been peeked since the last rewind or consume of everything peeked (the
    /// peek offset is at the front, and stays there).
    fn tcp_take(&mut self, flow: FlowId, buf: &mut [u8]) -> io::Result<Peek>;
    /// Consumes (drops) `n` bytes from the front of the unread data; the peek offset moves back by
    /// as much, stopping at the front. `n` never exceeds what was peeked at some point (bytes sent
    /// before a rewind may be acknowledged after it).
    fn tcp_consume(&mut self, flow: FlowId, n: usize);
    /// Moves the peek offset back to the front of the unread data.
    fn tcp_rewind(&mut self, flow: FlowId);
    /// Shuts down the sending side (FIN to the peer).
    fn tcp_shutdown(&mut self, flow: FlowId);
    /// Closes the socket; `reset` sends RST to the peer instead of FIN.
    fn tcp_close(&mut self, flow: FlowId, reset: bool);

    /// Opens an unconnected UDP socket for the flow. With `v6`, it sends to both families (an
    /// IPv6 guest's flow may reach an IPv4 resolver through the DNS address).
    fn udp_open(&mut self, flow: FlowId, v6: bool) -> io::Result<()>;
    fn udp_send(&mut self, flow: FlowId, dst: SocketAddr, data: &[u8]) -> io::Result<()>;
    /// Receives one datagram: its source (an IPv4 source as IPv4, never IPv4-mapped) and length,
    /// or `None` when there is none.
    fn udp_recv(&mut self, flow: FlowId, buf: &mut [u8])
        -> io::Result<Option<(SocketAddr, usize)>>;
    /// Opens an unprivileged ICMP (`v6`: ICMPv6) echo socket for the flow.
    fn ping_open(&mut self, flow: FlowId, v6: bool) -> io::Result<()>;
    /// Sends an echo request (type, code, id, seq and data; the kernel sets id and checksum).
    fn ping_send(&mut self, flow: FlowId, dst: IpAddr, icmp: &[u8]) -> io::Result<()>;
    /// Receives one echo reply (the ICMP or ICMPv6 message): its source and length.
    fn ping_recv(&mut self, flow: FlowId, buf: &mut [u8]) -> io::Result<Option<(IpAddr, usize)>>;

    /// Takes the oldest error the network reported for a UDP or echo socket's datagrams (the
    /// socket reports them as `Ready::error`, and `udp_recv`/`ping_recv` may fail once for
    /// each), or `None` when there is none.
    fn dgram_error(&mut self, flow: FlowId) -> io::Result<Option<DgramError>>;

    /// Closes a UDP or ICMP socket.
    fn dgram_close(&mut self, flow: FlowId);

    /// Called at the end of every batch: sends whatever the host queued (datagrams are batched).
    fn flush(&mut self) {}

    /// Takes the socket the driver has just accepted (TCP) or bound (UDP) for a published port
    /// as the socket of `flow`.
    fn adopt(&mut self, flow: FlowId) -> io::Result<()> {
        let _ = flow;
        Err(io::Error::from(io::ErrorKind::Unsupported))
    }
}
