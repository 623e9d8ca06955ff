//! The rootless engine's event loop: one thread, one epoll set holding the TAP, every flow's host
//! socket and the loop's own wake-ups (signals, the container's exit). It implements the core's
//! [`Host`] with real sockets and hands it frames and readiness.

use std::io::{self, IoSlice};
use std::net::{IpAddr, SocketAddr, SocketAddrV4, SocketAddrV6};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::time::Instant;

use nix::sys::epoll::{Epoll, EpollCreateFlags, EpollEvent, EpollFlags, EpollTimeout};
use socket2::{Domain, Protocol, SockAddr, Socket, Type};

use super::core::{Core, DgramError, FlowId, Host, Peek, Ready, RxMeta, TxMeta, Unreachable};
use super::ns::Link;
use super::ring::{self, RxRing, Taken};
use super::sys;

/// Tokens above the flow ids: the TAP, then the callers' (`Wake::Token`).
const TAP: u64 = 1 << 40;
/// Frames read from the TAP before host sockets get a turn.
const TAP_BUDGET: usize = 256;
/// virtio_net_hdr (without num_buffers).
const VNET_HDR_LEN: usize = 10;
const VIRTIO_NET_HDR_F_NEEDS_CSUM: u8 = 1;
const VIRTIO_NET_HDR_F_DATA_VALID: u8 = 2;
const VIRTIO_NET_HDR_GSO_TCPV4: u8 = 1;
const VIRTIO_NET_HDR_GSO_TCPV6: u8 = 4;

/// Datagrams kept for a flow whose socket buffer is full, at most (bytes, all flows).
const UDP_BACKLOG_MAX: usize = 1 << 20;

/// Without `SO_PEEK_OFF`, data sent but not yet acknowledged is peeked again on every peek;
/// this caps it.
const FALLBACK_MAX_INFLIGHT: usize = 1 << 20;

/// The core's window on the kernel: sockets by flow id, the TAP, and the epoll set.
pub struct KernelHost {
    epoll: Epoll,
    /// The fd frames are written to: the TAP, or the packet ring link's sending socket.
    tap: Option<OwnedFd>,
    /// The packet ring link's receiving side (with a TAP, frames are read from `tap`).
    ring: Option<RxRing>,
    vnet_hdr: bool,
    socks: Vec<Option<Socket>>,
    /// Per flow: its datagram socket is IPv6 (and takes IPv4 peers as mapped addresses).
    dgram_v6: Vec<bool>,
    /// Per flow: its UDP socket waits for its first destination to be bound (or not) to an
    /// outbound address.
    dgram_unbound: Vec<bool>,
    /// Whether TCP honours `SO_PEEK_OFF` (Linux 6.9 and later); `None` until the first connect.
    peek_off: Option<bool>,
    /// Without `SO_PEEK_OFF`: per flow, the bytes already peeked (skipped by the next peek).
    peeked: Vec<usize>,
    /// Whether accepted sockets inherit `TCP_NODELAY`, `SO_OOBINLINE` and the peek offset from
    /// their listener; `None` until the first is accepted.
    options_inherited: Option<bool>,
    scratch: Vec<u8>,
    /// Datagrams queued by `udp_send` until `flush`: (flow, destination, range in `udp_arena`).
    udp_queue: Vec<(FlowId, SocketAddr, std::ops::Range<usize>)>,
    udp_arena: Vec<u8>,
    /// Flows whose sockets are watched for room (`EPOLLOUT`) because datagrams wait for it.
    udp_armed: Vec<FlowId>,
    /// Armed flows whose sockets reported room since the last flush (the others are not retried).
    udp_woken: Vec<FlowId>,
    /// Whether UDP segmentation offload works here (turned off at its first failure).
    udp_gso: bool,
    /// Datagrams the host's socket buffers refused.
    pub udp_dropped: u64,
    /// The addresses outbound sockets are bound to (slirp4netns' `--outbound-addr` and
    /// `--outbound-addr6`): TCP, UDP and ping alike.
    pub outbound: Option<std::net::Ipv4Addr>,
    pub outbound6: Option<std::net::Ipv6Addr>,
    /// A socket accepted or bound for a published port, waiting for the core to adopt it.
    staged: Option<(Socket, EpollFlags)>,
    /// Frames the TAP refused (its queue full).
    pub tx_dropped: u64,
    /// Frames from the ring link lost: cut short in their slot with no whole copy queued.
    pub rx_lost: u64,
}

fn sock(socks: &[Option<Socket>], id: FlowId) -> io::Result<&Socket> {
    socks
        .get(id)
        .and_then(Option::as_ref)
        .ok_or_else(|| io::Error::from_raw_os_error(libc::EBADF))
}

impl KernelHost {
    /// A host without its link yet (see `attach_link`): ports can be bound before the container
    /// exists.
    pub fn new(vnet_hdr: bool) -> io::Result<KernelHost> {
        let epoll = Epoll::new(EpollCreateFlags::EPOLL_CLOEXEC)?;
        Ok(KernelHost {
            epoll,
            tap: None,
            ring: None,
            vnet_hdr,
            socks: Vec::new(),
            dgram_v6: Vec::new(),
            dgram_unbound: Vec::new(),
            peek_off: std::env::var_os("RNAT_NO_PEEK_OFF").map(|_| false),
            peeked: Vec::new(),
            options_inherited: None,
            scratch: Vec::new(),
            staged: None,
            outbound: None,
            outbound6: None,
            udp_queue: Vec::new(),
            udp_arena: Vec::new(),
            udp_armed: Vec::new(),
            udp_woken: Vec::new(),
            udp_gso: std::env::var_os("RNAT_NO_UDP_GSO").is_none(),
            udp_dropped: 0,
            tx_dropped: 0,
            rx_lost: 0,
        })
    }

    /// Starts serving the link (a TAP, or the packet ring link).
    pub fn attach_link(&mut self, link: Link) -> io::Result<()> {
        let wake = EpollEvent::new(EpollFlags::EPOLLIN | EpollFlags::EPOLLET, TAP);
        match link.rx {
            None => self.epoll.add(&link.tx, wake)?,
            Some(rx) => {
                // The shape the child set the ring up with (`ns::make_ring_link`).
                let ring = RxRing::map(rx, ring::Geometry::DEFAULT)?;
                self.epoll.add(&ring, wake)?;
                self.ring = Some(ring);
            }
        }
        self.tap = Some(link.tx);
        Ok(())
    }

    /// Frames lost between the container and the engine: (written to the link but refused,
    /// dropped by the kernel at a full ring, lost in the ring).
    pub fn link_stats(&self) -> (u64, u64, u64) {
        let ring_drops = self.ring.as_ref().map_or(0, RxRing::drops);
        (self.tx_dropped, ring_drops, self.rx_lost)
    }

    /// Adds another fd to wake the loop, with a token the caller's handler recognises.
    pub fn watch(&self, fd: BorrowedFd, token: u64) -> io::Result<()> {
        self.epoll
            .add(fd, EpollEvent::new(EpollFlags::EPOLLIN, token))
            .map_err(io::Error::from)
    }

    /// Registers an fd of the caller's (a listener, a spliced socket) with its own token.
    pub fn register(&self, fd: BorrowedFd, token: u64, flags: EpollFlags) -> io::Result<()> {
        self.epoll
            .add(fd, EpollEvent::new(flags, token))
            .map_err(io::Error::from)
    }

    fn install(&mut self, id: FlowId, s: Socket, flags: EpollFlags) -> io::Result<()> {
        self.epoll.add(&s, EpollEvent::new(flags, id as u64))?;
        if self.socks.len() <= id {
            self.socks.resize_with(id + 1, || None);
            self.peeked.resize(id + 1, 0);
            self.dgram_v6.resize(id + 1, false);
            self.dgram_unbound.resize(id + 1, false);
        }
        self.dgram_v6[id] = false;
        self.dgram_unbound[id] = false;
        self.socks[id] = Some(s);
        self.peeked[id] = 0;
        Ok(())
    }

    fn dgram(&mut self, id: FlowId, domain: Domain, proto: Protocol) -> io::Result<()> {
        let s = Socket::new(domain, Type::DGRAM.nonblocking().cloexec(), Some(proto))?;
        if domain == Domain::IPV6 {
            // An IPv6 guest's flow may also reach IPv4 peers (the DNS address forwards to the
            // host's resolvers): as IPv4-mapped addresses on this one socket.
            s.set_only_v6(false)?;
        }
        // A ping socket's destinations are never the host's loopback: bound now. A UDP
        // socket waits for its first destination (`bind_udp_for`).
        let udp = proto == Protocol::UDP;
        if !udp {
            self.bind_outbound(&s, domain == Domain::IPV6)?;
        }
        let v6 = domain == Domain::IPV6;
        // A UDP socket of either family may reach IPv4 peers; an echo socket only its own.
        sys::set_recv_errors(s.as_raw_fd(), udp || !v6, v6)?;
        self.install(id, s, EpollFlags::EPOLLIN | EpollFlags::EPOLLET)?;
        self.dgram_v6[id] = domain == Domain::IPV6;
        self.dgram_unbound[id] = udp;
        Ok(())
    }

    /// Binds a new UDP flow's socket by its first destination: not at all for the host's
    /// loopback (a resolver there, such as systemd-resolved's 127.0.0.53, answers only local
    /// sources), else to the outbound address of the destination's family (an IPv6 socket
    /// reaching an IPv4 peer takes the IPv4 one, mapped). The socket keeps that source.
    fn bind_udp_for(&mut self, id: FlowId, dst: SocketAddr) -> io::Result<()> {
        if !std::mem::take(&mut self.dgram_unbound[id]) || dst.ip().is_loopback() {
            return Ok(());
        }
        let Some(a) = self.outbound_for(dst.is_ipv6(), self.v6_socket(id)) else {
            return Ok(());
        };
        let bound = sock(&self.socks, id)?.bind(&SockAddr::from(a));
        // A failed bind fails every send after it too: the flow never leaves from another
        // address than the one asked for.
        self.dgram_unbound[id] = bound.is_err();
        bound
    }

    /// The destination as the flow's socket takes it: IPv4 peers of an IPv6 socket are mapped.
    fn dest_for(&self, id: FlowId, dst: SocketAddr) -> SocketAddr {
        match dst {
            SocketAddr::V4(a) if self.v6_socket(id) => {
                SocketAddrV6::new(a.ip().to_ipv6_mapped(), a.port(), 0, 0).into()
            }
            a => a,
        }
    }

    fn v6_socket(&self, id: FlowId) -> bool {
        self.dgram_v6.get(id).copied().unwrap_or(false)
    }
}

impl Host for KernelHost {
    fn emit(&mut self, frame: &[u8], meta: TxMeta) {
        let Some(tap) = &self.tap else { return };
        let r = if self.vnet_hdr {
            let mut h = [0u8; VNET_HDR_LEN];
            if let Some((start, off)) = meta.csum {
                h[0] = VIRTIO_NET_HDR_F_NEEDS_CSUM;
                h[6..8].copy_from_slice(&start.to_ne_bytes());
                h[8..10].copy_from_slice(&off.to_ne_bytes());
            } else {
                h[0] = VIRTIO_NET_HDR_F_DATA_VALID;
            }
            if let Some(mss) = meta.gso_mss {
                // Headers without TCP options: Ethernet, IPv4 or IPv6, TCP.
                let (gso, hdr_len) = if frame.get(12..14) == Some(&[0x86, 0xdd]) {
                    (VIRTIO_NET_HDR_GSO_TCPV6, 74u16)
                } else {
                    (VIRTIO_NET_HDR_GSO_TCPV4, 54u16)
                };
                h[1] = gso;
                h[2..4].copy_from_slice(&hdr_len.to_ne_bytes());
                h[4..6].copy_from_slice(&mss.to_ne_bytes());
            }
            nix::sys::uio::writev(tap, &[IoSlice::new(&h), IoSlice::new(frame)])
        } else {
            nix::unistd::write(tap, frame)
        };
        if let Err(e) = r {
            if self.tx_dropped == 0 {
                tracing::debug!("the link refused a frame of {} bytes: {e}", frame.len());
            }
            self.tx_dropped += 1;
        }
    }

    fn tcp_connect(&mut self, id: FlowId, dst: SocketAddr) -> io::Result<()> {
        let s = Socket::new(
            Domain::for_address(dst),
            Type::STREAM.nonblocking().cloexec(),
            Some(Protocol::TCP),
        )?;
        s.set_tcp_nodelay(true)?;
        // A connection to the host's loopback (the gateway, when allowed) cannot leave from
        // another address.
        if !dst.ip().is_loopback() {
            self.bind_outbound(&s, dst.is_ipv6())?;
        }
        self.prepare_tcp(&s)?;
        match s.connect(&SockAddr::from(dst)) {
            Ok(()) => {}
            Err(e) if e.raw_os_error() == Some(libc::EINPROGRESS) => {}
            Err(e) => return Err(e),
        }
        let flags = EpollFlags::EPOLLIN
            | EpollFlags::EPOLLOUT
            | EpollFlags::EPOLLRDHUP
            | EpollFlags::EPOLLPRI
            | EpollFlags::EPOLLET;
        self.install(id, s, flags)
    }

    fn tcp_connect_result(&mut self, id: FlowId) -> io::Result<()> {
        // Writable after a non-blocking connect: connected unless SO_ERROR says otherwise
        // (connect(2)). The core asks only then, so no getpeername to tell "still connecting".
        match sock(&self.socks, id)?.take_error()? {
            Some(e) => Err(e),
            None => Ok(()),
        }
    }

    fn tcp_send(&mut self, id: FlowId, data: &[u8]) -> io::Result<usize> {
        match sock(&self.socks, id)?.send_with_flags(data, libc::MSG_NOSIGNAL | libc::MSG_DONTWAIT)
        {
            Ok(n) => Ok(n),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => Ok(0),
            Err(e) => Err(e),
        }
    }

    fn tcp_peek(&mut self, id: FlowId, buf: &mut [u8]) -> io::Result<Peek> {
        if self.peek_off == Some(false) {
            return self.peek_skipping(id, buf);
        }
        let s = sock(&self.socks, id)?;
        match nix::sys::socket::recv(
            s.as_raw_fd(),
            buf,
            nix::sys::socket::MsgFlags::MSG_PEEK | nix::sys::socket::MsgFlags::MSG_DONTWAIT,
        ) {
            Ok(0) => Ok(Peek::Eof),
            Ok(n) => Ok(Peek::Data(n)),
            Err(nix::errno::Errno::EAGAIN) => Ok(Peek::WouldBlock),
            Err(e) => Err(e.into()),
        }
    }

    fn tcp_take(&mut self, id: FlowId, buf: &mut [u8]) -> io::Result<Peek> {
        // Nothing is peeked (the core's precondition), so the peek offset, or the fallback's
        // count of peeked bytes, is zero and a read leaves it so.
        let s = sock(&self.socks, id)?;
        match nix::sys::socket::recv(s.as_raw_fd(), buf, nix::sys::socket::MsgFlags::MSG_DONTWAIT) {
            Ok(0) => Ok(Peek::Eof),
            Ok(n) => Ok(Peek::Data(n)),
            Err(nix::errno::Errno::EAGAIN) => Ok(Peek::WouldBlock),
            Err(e) => Err(e.into()),
        }
    }

    fn tcp_consume(&mut self, id: FlowId, mut n: usize) {
        let Ok(s) = sock(&self.socks, id) else { return };
        while n > 0 {
            // SAFETY: with MSG_TRUNC, TCP discards up to `n` bytes without writing to the buffer,
            // so a null buffer is never dereferenced.
            let r = unsafe {
                libc::recv(
                    s.as_raw_fd(),
                    std::ptr::null_mut(),
                    n,
                    libc::MSG_TRUNC | libc::MSG_DONTWAIT,
                )
            };
            if r <= 0 {
                return;
            }
            n -= r as usize;
            if let Some(p) = self.peeked.get_mut(id) {
                *p = p.saturating_sub(r as usize);
            }
        }
    }

    fn tcp_rewind(&mut self, id: FlowId) {
        if let Some(p) = self.peeked.get_mut(id) {
            *p = 0;
        }
        if self.peek_off == Some(true) {
            let failed =
                sock(&self.socks, id).is_ok_and(|s| sys::set_peek_off(s.as_raw_fd(), 0).is_err());
            if failed {
                // Peeking on from the wrong place would send the wrong bytes: reset the
                // connection instead; the flow ends at its next peek (no socket).
                if let Some(s) = self.socks.get_mut(id).and_then(Option::take) {
                    let _ = s.set_linger(Some(std::time::Duration::ZERO));
                }
            }
        }
    }

    fn tcp_shutdown(&mut self, id: FlowId) {
        if let Ok(s) = sock(&self.socks, id) {
            let _ = s.shutdown(std::net::Shutdown::Write);
        }
    }

    fn tcp_close(&mut self, id: FlowId, reset: bool) {
        if let Some(s) = self.socks.get_mut(id).and_then(Option::take) {
            if reset {
                let _ = s.set_linger(Some(std::time::Duration::ZERO));
            }
        }
    }

    fn udp_open(&mut self, id: FlowId, v6: bool) -> io::Result<()> {
        let domain = if v6 { Domain::IPV6 } else { Domain::IPV4 };
        self.dgram(id, domain, Protocol::UDP)
    }

    fn udp_send(&mut self, id: FlowId, dst: SocketAddr, data: &[u8]) -> io::Result<()> {
        sock(&self.socks, id)?;
        self.bind_udp_for(id, dst)?;
        let dst = self.dest_for(id, dst);
        // Queued for one sendmmsg per flow at the end of the batch; the arena is bounded by
        // what one batch of frames can carry.
        let start = self.udp_arena.len();
        self.udp_arena.extend_from_slice(data);
        self.udp_queue.push((id, dst, start..self.udp_arena.len()));
        if self.udp_arena.len() > (4 << 20) {
            self.flush();
        }
        Ok(())
    }

    fn flush(&mut self) {
        if self.udp_queue.is_empty() {
            return;
        }
        // Datagrams a full socket buffer refused stay queued, in order, until their socket
        // drains (`EPOLLOUT`); a flow blocked once sends nothing more in this pass.
        let mut blocked: Vec<FlowId> = Vec::new();
        let mut kept: Vec<std::ops::Range<usize>> = Vec::new();
        let mut i = 0;
        while i < self.udp_queue.len() {
            let id = self.udp_queue[i].0;
            let mut j = i;
            while j < self.udp_queue.len() && self.udp_queue[j].0 == id {
                j += 1;
            }
            let waiting = self.udp_armed.contains(&id) && !self.udp_woken.contains(&id);
            if waiting || blocked.contains(&id) {
                // Still no room reported (or blocked earlier in this pass): not tried.
                if !blocked.contains(&id) {
                    blocked.push(id);
                }
                kept.push(i..j);
                i = j;
                continue;
            }
            let fd = match sock(&self.socks, id) {
                Ok(s) => s.as_raw_fd(),
                Err(_) => {
                    self.udp_dropped += (j - i) as u64;
                    i = j;
                    continue;
                }
            };
            let unsent = if self.udp_gso {
                self.send_runs(fd, i..j)
            } else {
                self.send_queued_one_by_one(fd, i..j)
            };
            if let Some(k) = unsent {
                blocked.push(id);
                kept.push(k..j);
            }
            i = j;
        }
        self.udp_woken.clear();
        self.keep_unsent(&kept);
        self.arm_writable(&blocked);
    }

    fn udp_recv(&mut self, id: FlowId, buf: &mut [u8]) -> io::Result<Option<(SocketAddr, usize)>> {
        let s = sock(&self.socks, id)?;
        let r = nix::sys::socket::recvfrom::<nix::sys::socket::SockaddrStorage>(s.as_raw_fd(), buf);
        let (n, from) = match r {
            Ok((n, Some(from))) => (n, from),
            Ok((_, None)) => return Ok(None),
            Err(nix::errno::Errno::EAGAIN) => return Ok(None),
            Err(e) => return Err(e.into()),
        };
        Ok(sys::storage_to_std(&from).map(|from| (from, n)))
    }

    fn dgram_error(&mut self, id: FlowId) -> io::Result<Option<DgramError>> {
        let fd = sock(&self.socks, id)?.as_raw_fd();
        // Entries without a destination say nothing usable: skipped (the queue is bounded by
        // the socket's receive buffer).
        while let Some(e) = sys::take_dgram_error(fd)? {
            let Some(dst) = e.dst else { continue };
            return Ok(Some(DgramError {
                dst,
                unreachable: e.cause.and_then(unreachable_from),
                len: e.len,
                head: e.head,
            }));
        }
        Ok(None)
    }

    fn ping_open(&mut self, id: FlowId, v6: bool) -> io::Result<()> {
        if v6 {
            self.dgram(id, Domain::IPV6, Protocol::ICMPV6)
        } else {
            self.dgram(id, Domain::IPV4, Protocol::ICMPV4)
        }
    }

    fn ping_send(&mut self, id: FlowId, dst: IpAddr, icmp: &[u8]) -> io::Result<()> {
        let s = sock(&self.socks, id)?;
        let to = SockAddr::from(SocketAddr::new(dst, 0));
        match s.send_to(icmp, &to) {
            Ok(_) => Ok(()),
            // The failure may be an ICMP error the socket reports once, not this send's.
            Err(e) if e.kind() != io::ErrorKind::WouldBlock => s.send_to(icmp, &to).map(drop),
            Err(e) => Err(e),
        }
    }

    fn ping_recv(&mut self, id: FlowId, buf: &mut [u8]) -> io::Result<Option<(IpAddr, usize)>> {
        Ok(self.udp_recv(id, buf)?.map(|(a, n)| (a.ip(), n)))
    }

    fn dgram_close(&mut self, id: FlowId) {
        if let Some(s) = self.socks.get_mut(id) {
            s.take();
        }
        // Datagrams still queued for the flow go with it (its id may be reused).
        if self.udp_queue.iter().any(|q| q.0 == id) {
            let before = self.udp_queue.len();
            self.udp_queue.retain(|q| q.0 != id);
            self.udp_dropped += (before - self.udp_queue.len()) as u64;
        }
        self.udp_armed.retain(|a| *a != id);
    }

    fn adopt(&mut self, id: FlowId) -> io::Result<()> {
        let (s, flags) = self
            .staged
            .take()
            .ok_or_else(|| io::Error::from_raw_os_error(libc::EBADF))?;
        self.install(id, s, flags)
    }
}

/// What an ICMP (origin `SO_EE_ORIGIN_ICMP`) or ICMPv6 (`SO_EE_ORIGIN_ICMP6`) error from the
/// error queue means for the guest; `None` for the errors it is not told of (packet too big,
/// time exceeded, parameter problems, local errors).
fn unreachable_from((origin, kind, code): (u8, u8, u8)) -> Option<Unreachable> {
    match (origin, kind) {
        // Fragmentation needed is about the host's path MTU, not the guest's concern.
        (libc::SO_EE_ORIGIN_ICMP, 3) => (code != 4).then_some(Unreachable::V4(code)),
        (libc::SO_EE_ORIGIN_ICMP6, 1) => Some(Unreachable::V6(code)),
        _ => None,
    }
}

impl KernelHost {
    /// Binds an outbound socket (`v6`: of family IPv6) to the outbound address of its family,
    /// if one was given.
    fn bind_outbound(&self, s: &Socket, v6: bool) -> io::Result<()> {
        match self.outbound_for(v6, v6) {
            Some(a) => s.bind(&SockAddr::from(a)),
            None => Ok(()),
        }
    }

    /// The address to bind a socket (`socket_v6`: an IPv6 one) to for peers of one family
    /// (`peer_v6`): the outbound address of the peer's family, IPv4-mapped on an IPv6 socket.
    fn outbound_for(&self, peer_v6: bool, socket_v6: bool) -> Option<SocketAddr> {
        match (peer_v6, socket_v6) {
            (true, _) => self
                .outbound6
                .map(|ip| SocketAddrV6::new(ip, 0, 0, 0).into()),
            (false, false) => self.outbound.map(|ip| SocketAddrV4::new(ip, 0).into()),
            (false, true) => self
                .outbound
                .map(|ip| SocketAddrV6::new(ip.to_ipv6_mapped(), 0, 0, 0).into()),
        }
    }

    /// Gives a host TCP socket what peeking needs: urgent data in line, and the peek offset,
    /// learning on the first socket whether TCP has one. Once flows peek with offsets, a socket
    /// that refuses one is refused (switching modes under them would send the wrong bytes).
    fn prepare_tcp(&mut self, s: &Socket) -> io::Result<()> {
        sys::set_oob_inline(s.as_raw_fd())?;
        if self.peek_off == Some(false) {
            return Ok(());
        }
        match sys::set_peek_off(s.as_raw_fd(), 0) {
            Ok(()) => self.peek_off = Some(true),
            Err(e) if self.peek_off == Some(true) => return Err(e),
            Err(e) => {
                tracing::info!("TCP has no SO_PEEK_OFF here ({e}): peeking past sent data instead");
                self.peek_off = Some(false);
            }
        }
        Ok(())
    }

    /// Sends the queued datagrams in `range` one by one (`sendmmsg`); returns where a full
    /// socket buffer stopped it. Datagrams refused for other reasons are dropped.
    fn send_queued_one_by_one(
        &mut self,
        fd: std::os::fd::RawFd,
        range: std::ops::Range<usize>,
    ) -> Option<usize> {
        let mut k = range.start;
        while k < range.end {
            let msgs: Vec<(SocketAddr, &[u8])> = self.udp_queue[k..range.end]
                .iter()
                .map(|(_, d, r)| (*d, &self.udp_arena[r.clone()]))
                .collect();
            let (sent, full) = sys::send_datagrams(fd, &msgs);
            k += sent;
            if k == range.end {
                break;
            }
            if full {
                return Some(k);
            }
            self.udp_dropped += 1;
            k += 1;
        }
        None
    }

    /// Sends the queued datagrams in `range` as runs under UDP segmentation offload; returns
    /// where a full socket buffer stopped it.
    fn send_runs(
        &mut self,
        fd: std::os::fd::RawFd,
        range: std::ops::Range<usize>,
    ) -> Option<usize> {
        let j = range.end;
        let mut k = range.start;
        while k < j {
            // A run of datagrams to one destination, all of one size but the last: one send
            // with UDP segmentation offload (the kernel cuts it as late as it can).
            let (dst, size) = (self.udp_queue[k].1, self.udp_queue[k].2.len());
            let mut end = k + 1;
            let mut bytes = size;
            while end < j
                && end - k < 64
                && self.udp_queue[end].1 == dst
                && self.udp_queue[end - 1].2.len() == size
                && self.udp_queue[end].2.len() <= size
                && bytes + self.udp_queue[end].2.len() <= 65000
            {
                bytes += self.udp_queue[end].2.len();
                end += 1;
            }
            if end - k == 1 || size == 0 {
                let one = [(dst, &self.udp_arena[self.udp_queue[k].2.clone()])];
                match sys::send_datagrams(fd, &one) {
                    (1, _) => {}
                    (_, true) => return Some(k),
                    _ => self.udp_dropped += 1,
                }
                k += 1;
                continue;
            }
            // The arena holds a run's datagrams back to back.
            let run = self.udp_queue[k].2.start..self.udp_queue[end - 1].2.end;
            match sys::send_segmented(fd, dst, &self.udp_arena[run], size as u16) {
                Ok(_) => k = end,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Some(k),
                Err(e)
                    if matches!(
                        e.raw_os_error(),
                        Some(libc::EINVAL | libc::EIO | libc::ENOPROTOOPT | libc::EOPNOTSUPP)
                    ) =>
                {
                    // No GSO here (or not for this route): one by one from now on.
                    tracing::info!(
                        "UDP segmentation offload refused ({e}): sending datagrams one by one"
                    );
                    self.udp_gso = false;
                    return self.send_queued_one_by_one(fd, k..j);
                }
                Err(_) => {
                    // The destination failed (unreachable, say), not the offload: the run is
                    // lost, as its datagrams would be one by one.
                    self.udp_dropped += (end - k) as u64;
                    k = end;
                }
            }
        }
        None
    }

    /// Keeps the queued datagrams in `kept` (in order) for the next flush and forgets the rest;
    /// what exceeds `UDP_BACKLOG_MAX` bytes is dropped, oldest first.
    fn keep_unsent(&mut self, kept: &[std::ops::Range<usize>]) {
        if kept.is_empty() {
            self.udp_queue.clear();
            self.udp_arena.clear();
            return;
        }
        if kept.len() == 1
            && kept[0] == (0..self.udp_queue.len())
            && self.udp_arena.len() <= UDP_BACKLOG_MAX
        {
            return; // nothing went and the cap holds: the queue stands as it is
        }
        let mut total: usize = kept
            .iter()
            .flat_map(|r| self.udp_queue[r.clone()].iter())
            .map(|(_, _, b)| b.len())
            .sum();
        let mut queue = Vec::new();
        let mut arena = Vec::new();
        for (id, dst, bytes) in kept.iter().flat_map(|r| self.udp_queue[r.clone()].iter()) {
            if total > UDP_BACKLOG_MAX {
                total -= bytes.len();
                self.udp_dropped += 1;
                continue;
            }
            let start = arena.len();
            arena.extend_from_slice(&self.udp_arena[bytes.clone()]);
            queue.push((*id, *dst, start..arena.len()));
        }
        self.udp_queue = queue;
        self.udp_arena = arena;
    }

    /// Watches the sockets of `blocked` flows for room (and stops watching the others).
    fn arm_writable(&mut self, blocked: &[FlowId]) {
        let mut armed = std::mem::take(&mut self.udp_armed);
        armed.retain(|id| {
            if blocked.contains(id) {
                return true;
            }
            if let Ok(s) = sock(&self.socks, *id) {
                let mut ev = EpollEvent::new(EpollFlags::EPOLLIN | EpollFlags::EPOLLET, *id as u64);
                let _ = self.epoll.modify(s, &mut ev);
            }
            false
        });
        for id in blocked {
            if armed.contains(id) {
                continue;
            }
            if let Ok(s) = sock(&self.socks, *id) {
                let flags = EpollFlags::EPOLLIN | EpollFlags::EPOLLOUT | EpollFlags::EPOLLET;
                let _ = self
                    .epoll
                    .modify(s, &mut EpollEvent::new(flags, *id as u64));
                armed.push(*id);
            }
        }
        self.udp_armed = armed;
    }

    /// Gives a published port's listener what its accepted sockets need (`TCP_NODELAY`, urgent
    /// data in line, the peek offset), so that they inherit it instead of setting it each.
    pub fn prepare_listener(&mut self, s: &Socket) -> io::Result<()> {
        s.set_tcp_nodelay(true)?;
        self.prepare_tcp(s)
    }

    /// Makes sure a socket accepted on a `prepare_listener` listener has its options: Linux
    /// copies them from the listener, which the first accepted socket confirms; should they not
    /// be inherited, each socket gets them here.
    pub fn accepted_options(&mut self, s: &Socket) -> io::Result<()> {
        let peek_off = self.peek_off;
        let fd = s.as_raw_fd();
        let inherits = *self.options_inherited.get_or_insert_with(|| {
            s.tcp_nodelay().unwrap_or(false)
                && sys::oob_inline(fd).unwrap_or(false)
                && (peek_off != Some(true) || sys::peek_off(fd).is_ok_and(|o| o == 0))
        });
        if !inherits {
            s.set_tcp_nodelay(true)?;
            self.prepare_tcp(s)?;
        }
        Ok(())
    }

    /// Stages an accepted TCP socket (non-blocking, from `sys::accept_nonblocking`) for
    /// `Core::tcp_inbound`.
    pub fn stage_accepted(&mut self, s: Socket) -> io::Result<()> {
        self.accepted_options(&s)?;
        let flags = EpollFlags::EPOLLIN
            | EpollFlags::EPOLLOUT
            | EpollFlags::EPOLLRDHUP
            | EpollFlags::EPOLLPRI
            | EpollFlags::EPOLLET;
        self.staged = Some((s, flags));
        Ok(())
    }

    /// Drops a staged socket the core did not take, resetting its peer.
    pub fn drop_staged_with_reset(&mut self) {
        if let Some((s, _)) = self.staged.take() {
            let _ = s.set_linger(Some(std::time::Duration::ZERO));
        }
    }

    /// Closes a staged socket the core did not adopt.
    pub fn discard_staged(&mut self) {
        self.staged = None;
    }

    /// Stages a bound UDP socket for `Core::udp_publish`. It hears of the ICMP errors its
    /// datagrams meet, as the engine's own UDP sockets do.
    pub fn stage_bound_udp(&mut self, s: Socket) {
        let v6 = matches!(s.local_addr().ok().and_then(|a| a.as_socket()), Some(a) if a.is_ipv6());
        if let Err(e) = sys::set_recv_errors(s.as_raw_fd(), true, v6) {
            tracing::debug!("published UDP socket: no ICMP errors: {e}");
        }
        self.staged = Some((s, EpollFlags::EPOLLIN | EpollFlags::EPOLLET));
    }

    /// `tcp_peek` without `SO_PEEK_OFF`: peeks the already-sent bytes into a scratch buffer and
    /// the new ones into `buf`.
    fn peek_skipping(&mut self, id: FlowId, buf: &mut [u8]) -> io::Result<Peek> {
        let skip = self.peeked.get(id).copied().unwrap_or(0);
        if skip >= FALLBACK_MAX_INFLIGHT {
            return Ok(Peek::Later);
        }
        if self.scratch.len() < skip {
            self.scratch.resize(skip, 0);
        }
        let s = sock(&self.socks, id)?;
        let fd = s.as_raw_fd();
        let mut iov = [
            std::io::IoSliceMut::new(&mut self.scratch[..skip]),
            std::io::IoSliceMut::new(buf),
        ];
        let flags = nix::sys::socket::MsgFlags::MSG_PEEK | nix::sys::socket::MsgFlags::MSG_DONTWAIT;
        let n = match nix::sys::socket::recvmsg::<()>(fd, &mut iov, None, flags) {
            Ok(m) => m.bytes,
            Err(nix::errno::Errno::EAGAIN) => return Ok(Peek::WouldBlock),
            Err(e) => return Err(e.into()),
        };
        if n > skip {
            self.peeked[id] = n;
            return Ok(Peek::Data(n - skip));
        }
        // Nothing new: end of stream if the peer has closed, else wait. Not if urgent data
        // waits: the peek may have stopped at its mark with more behind it (the core reads on
        // at the next ACK; once the mark is consumed, the next read finds the end).
        Ok(if n == skip && sys::peer_closed_no_urgent(fd) {
            Peek::Eof
        } else {
            Peek::WouldBlock
        })
    }
}

/// Why the loop handed control back.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Wake {
    /// A watched fd with this token is readable.
    Token(u64),
    /// ... and a TCP socket among them has urgent data (`EPOLLPRI`, which only spliced
    /// connections' sockets watch).
    Urgent(u64),
    /// The TAP device went away (its namespace is gone).
    TapGone,
}

/// Runs the engine until `on_wake` returns `false` for a wake-up or the TAP goes away.
pub fn serve(
    core: &mut Core,
    host: &mut KernelHost,
    mut on_wake: impl FnMut(&mut Core, &mut KernelHost, Wake, Instant) -> bool,
) -> io::Result<()> {
    let mut events = vec![EpollEvent::empty(); 256];
    let mut frame = vec![0u8; VNET_HDR_LEN + super::core::frame::MAX_FRAME];
    let mut tap_more = true;
    loop {
        let now = Instant::now();
        let next = core.on_timer(host, now);
        let timeout = if tap_more {
            EpollTimeout::ZERO
        } else {
            match next {
                Some(t) => {
                    let ms = t
                        .saturating_duration_since(now)
                        .as_micros()
                        .div_ceil(1000)
                        .min(60_000) as u16;
                    EpollTimeout::from(ms.max(1))
                }
                None => EpollTimeout::NONE,
            }
        };
        let n = match host.epoll.wait(&mut events, timeout) {
            Ok(n) => n,
            Err(nix::errno::Errno::EINTR) => 0,
            Err(e) => return Err(e.into()),
        };
        let now = Instant::now();
        for ev in &events[..n] {
            let flags = ev.events();
            match ev.data() {
                TAP => {
                    tap_more = true;
                    // The ring link's socket reports its link's end as an error (ENETDOWN).
                    if flags.contains(EpollFlags::EPOLLERR)
                        && host.ring.as_ref().and_then(RxRing::error).is_some()
                    {
                        on_wake(core, host, Wake::TapGone, now);
                        return Ok(());
                    }
                }
                t if t >= TAP => {
                    let wake = if flags.contains(EpollFlags::EPOLLPRI) {
                        Wake::Urgent(t)
                    } else {
                        Wake::Token(t)
                    };
                    if !on_wake(core, host, wake, now) {
                        finish(core, host, &mut frame);
                        return Ok(());
                    }
                }
                id => {
                    if flags.contains(EpollFlags::EPOLLOUT)
                        && host.udp_armed.contains(&(id as usize))
                    {
                        host.udp_woken.push(id as usize);
                    }
                    let ready = Ready {
                        readable: flags.intersects(
                            EpollFlags::EPOLLIN | EpollFlags::EPOLLRDHUP | EpollFlags::EPOLLPRI,
                        ),
                        writable: flags.contains(EpollFlags::EPOLLOUT),
                        error: flags.intersects(EpollFlags::EPOLLERR | EpollFlags::EPOLLHUP),
                        hup: flags.intersects(EpollFlags::EPOLLRDHUP | EpollFlags::EPOLLHUP),
                        urgent: flags.contains(EpollFlags::EPOLLPRI),
                    };
                    core.on_ready(host, id as usize, ready, now);
                }
            }
        }
        if tap_more {
            let taken = if host.ring.is_some() {
                take_from_ring(core, host, &mut frame, now)
            } else {
                take_from_tap(core, host, &mut frame, now)
            };
            match taken {
                Some(more) => tap_more = more,
                None => {
                    on_wake(core, host, Wake::TapGone, now);
                    return Ok(());
                }
            }
        }
        core.flush(host, now);
    }
}

/// Hands up to `TAP_BUDGET` frames read from the TAP to the core; returns whether more may wait,
/// or `None` if the TAP is gone.
fn take_from_tap(
    core: &mut Core,
    host: &mut KernelHost,
    frame: &mut [u8],
    now: Instant,
) -> Option<bool> {
    for _ in 0..TAP_BUDGET {
        let Some(tap) = &host.tap else {
            return Some(false);
        };
        match nix::unistd::read(tap.as_fd(), frame) {
            Ok(len) => {
                let (rx, body) = if host.vnet_hdr {
                    if len < VNET_HDR_LEN {
                        continue;
                    }
                    let f = frame[0];
                    let trusted =
                        f & (VIRTIO_NET_HDR_F_NEEDS_CSUM | VIRTIO_NET_HDR_F_DATA_VALID) != 0;
                    (
                        RxMeta {
                            csum_trusted: trusted,
                        },
                        &frame[VNET_HDR_LEN..len],
                    )
                } else {
                    (RxMeta::default(), &frame[..len])
                };
                core.on_frame(host, body, rx, now);
            }
            Err(nix::errno::Errno::EAGAIN) => return Some(false),
            Err(nix::errno::Errno::EINTR) => {}
            Err(_) => return None,
        }
    }
    Some(true)
}

/// How long a stopping engine goes on handing over what the container sent before it ended.
const FINISH_WAIT: std::time::Duration = std::time::Duration::from_millis(500);

/// The engine stops (the container's command ended): frames the container sent are still
/// handed on, those the link holds and datagrams waiting for room in a host socket, for at most
/// `FINISH_WAIT`.
fn finish(core: &mut Core, host: &mut KernelHost, frame: &mut [u8]) {
    let deadline = Instant::now() + FINISH_WAIT;
    loop {
        let now = Instant::now();
        let more = if host.ring.is_some() {
            take_from_ring(core, host, frame, now)
        } else {
            take_from_tap(core, host, frame, now)
        }
        .unwrap_or(false);
        core.flush(host, now);
        if !more || now >= deadline {
            break;
        }
    }
    // Datagrams waiting for room: wait on those sockets alone (the epoll set holds fds that stay
    // ready now, the container's exit among them).
    while !host.udp_queue.is_empty() && Instant::now() < deadline {
        let armed: Vec<FlowId> = host.udp_armed.clone();
        let socks: Vec<&Socket> = armed
            .iter()
            .filter_map(|id| sock(&host.socks, *id).ok())
            .collect();
        let mut fds: Vec<nix::poll::PollFd> = socks
            .iter()
            .map(|s| nix::poll::PollFd::new(s.as_fd(), nix::poll::PollFlags::POLLOUT))
            .collect();
        if fds.is_empty() {
            break;
        }
        match nix::poll::poll(&mut fds, 10u16) {
            Ok(_) | Err(nix::errno::Errno::EINTR) => {}
            Err(_) => break,
        }
        host.udp_woken = armed;
        host.flush();
    }
}

/// Hands up to `TAP_BUDGET` frames from the ring link to the core; returns whether more may wait,
/// or `None` if the link is gone.
fn take_from_ring(
    core: &mut Core,
    host: &mut KernelHost,
    frame: &mut [u8],
    now: Instant,
) -> Option<bool> {
    // The ring leaves the host while the core runs, which may write frames through the host.
    let mut ring = host.ring.take()?;
    let mut more = Some(true);
    for _ in 0..TAP_BUDGET {
        let rx = |trusted| RxMeta {
            csum_trusted: trusted,
        };
        match ring.take() {
            None => {
                more = Some(false);
                break;
            }
            Some(Taken::Frame(body, trusted)) => core.on_frame(host, body, rx(trusted), now),
            Some(Taken::Queued(trusted)) => match ring.recv_queued(frame) {
                Ok(len) => core.on_frame(host, &frame[..len], rx(trusted), now),
                Err(e) if matches!(e.raw_os_error(), Some(libc::ENETDOWN | libc::ENXIO)) => {
                    more = None;
                    break;
                }
                Err(e) => {
                    tracing::debug!("ring: a frame too large for its slot was lost: {e}");
                    host.rx_lost += 1;
                }
            },
            Some(Taken::Lost) => {
                tracing::debug!("ring: a frame was cut short (no room to queue it whole)");
                host.rx_lost += 1;
            }
        }
        ring.release();
    }
    host.ring = Some(ring);
    more
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    /// A host with one TCP flow (id 0) whose peer has sent `data`, all of it already in the
    /// socket, over the loopback.
    fn host_with_stream(data: &[u8]) -> (KernelHost, std::net::TcpStream) {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let mut peer =
            std::net::TcpStream::connect(listener.local_addr().expect("addr")).expect("connect");
        let (ours, _) = listener.accept().expect("accept");
        peer.write_all(data).expect("write");
        let mut all = vec![0u8; data.len()];
        for _ in 0..200 {
            if ours.peek(&mut all).expect("peek") == data.len() {
                break;
            }
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
        let s = Socket::from(ours);
        s.set_nonblocking(true).expect("nonblocking");
        let mut host = KernelHost::new(false).expect("host");
        host.prepare_tcp(&s).expect("prepare");
        host.install(0, s, EpollFlags::EPOLLIN | EpollFlags::EPOLLET)
            .expect("install");
        (host, peer)
    }

    /// Peeks `n` bytes through the host.
    fn peek(host: &mut KernelHost, n: usize) -> Vec<u8> {
        let mut buf = vec![0u8; n];
        match host.tcp_peek(0, &mut buf).expect("peek") {
            Peek::Data(got) if got == n => buf,
            other => panic!("peeking {n} bytes gave {other:?}"),
        }
    }

    /// Urgent data (`send(MSG_OOB)`) reaches the guest in line, in its place: out of line a peek
    /// skips the urgent byte without counting it in the peek offset, and the next peek would
    /// start one byte early.
    #[test]
    fn urgent_data_is_peeked_in_line_and_in_place() {
        let (mut host, peer) = host_with_stream(b"abc");
        if host.peek_off != Some(true) {
            return;
        }
        let fd = peer.as_raw_fd();
        for (bytes, flags) in [(&b"X"[..], libc::MSG_OOB), (&b"def"[..], 0)] {
            // SAFETY: send(2) of a live buffer of the stated length on our own socket.
            let n = unsafe { libc::send(fd, bytes.as_ptr().cast(), bytes.len(), flags) };
            assert_eq!(n, bytes.len() as isize);
        }
        // A peek stops at the urgent mark: gather until all seven bytes came.
        let mut got = Vec::new();
        for _ in 0..200 {
            let mut buf = [0u8; 64];
            match host.tcp_peek(0, &mut buf).expect("peek") {
                Peek::Data(n) => got.extend_from_slice(&buf[..n]),
                _ => std::thread::sleep(std::time::Duration::from_millis(5)),
            }
            if got.len() >= 7 {
                break;
            }
        }
        assert_eq!(got, b"abcXdef");
        host.tcp_consume(0, 4);
        host.tcp_rewind(0);
        assert_eq!(peek(&mut host, 3), b"def");
    }

    /// The stream position of each byte, as the peer sent it.
    fn pattern(len: usize) -> Vec<u8> {
        (0..len).map(|i| (i % 251) as u8).collect()
    }

    #[test]
    fn peeks_stay_on_the_stream_across_consumes_and_rewinds() {
        let data = pattern(64 << 10);
        let (mut host, _peer) = host_with_stream(&data);
        if host.peek_off != Some(true) {
            return; // no SO_PEEK_OFF on this kernel: the fallback, covered by the netns tests
        }
        // Sent 0..4000, 1000 acknowledged: the next peek goes on at 4000.
        assert_eq!(peek(&mut host, 4000), data[..4000]);
        host.tcp_consume(0, 1000);
        assert_eq!(peek(&mut host, 1000), data[4000..5000]);
        // A rewind goes back to the first unacknowledged byte (1000).
        host.tcp_rewind(0);
        assert_eq!(peek(&mut host, 500), data[1000..1500]);
        // The guest acknowledges up to 3000, past what was peeked again (bytes it had from
        // before the rewind): the kernel moves the offset back to the front, and the next peek
        // starts at 3000, as the core expects.
        host.tcp_consume(0, 2000);
        assert_eq!(peek(&mut host, 1000), data[3000..4000]);
    }
}
