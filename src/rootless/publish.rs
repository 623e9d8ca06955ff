//! Published ports in rootless mode: a listening socket on the host per port, and for each client
//! the cheaper of two paths.
//!
//! - A client on the host's loopback goes kernel to kernel: the keeper makes a socket inside the
//!   container that connects to its 127.0.0.1, and `splice(2)` moves bytes between the two sockets
//!   through pipes, never through rnat's memory.
//! - Any other client goes through the engine (`Core::tcp_inbound`), so the container sees the
//!   client's real address and port. UDP always goes through the engine.
//!
//! A mapping without a host address listens on both families (`0.0.0.0` and `[::]`, the latter
//! IPv6-only), as Docker and pasta do; `0.0.0.0` or `[::]` given explicitly means that family
//! alone. IPv6 clients reach the container's IPv6 address when it has one (`--enable-ipv6`).
//! Without one, an IPv6 TCP client is spliced to the container's 127.0.0.1 like a loopback client
//! (its address is not kept), and UDP is published on IPv4 only (an IPv6 host address for UDP is
//! refused).

use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::time::Instant;

use nix::fcntl::{splice, SpliceFFlags};
use nix::sys::epoll::EpollFlags;
use slab::Slab;
use socket2::{Domain, Protocol as SockProto, SockAddr, Socket, Type};

use super::core::Core;
use super::driver::KernelHost;
use super::keeper::Keeper;
use super::sys;
use crate::spec::{PortMapping, Protocol};

/// Listener tokens start here (two per mapping: its IPv4 and IPv6 sockets); spliced
/// connections' at `SPLICE_BASE`.
pub const LISTEN_BASE: u64 = 1 << 41;
pub const SPLICE_BASE: u64 = 1 << 42;
/// Connections accepted per readiness event of a listener before others get a turn.
const ACCEPT_BUDGET: usize = 64;
/// The size a splice's pipes ask for while the pipe budget is less than half used.
const PIPE_SIZE: libc::c_int = 256 << 10;
/// The kernel's default pipe size (16 pages), which later splices keep.
const PIPE_DEFAULT: libc::c_int = 64 << 10;
/// Times a socket maker that died is replaced before loopback clients all go through the engine.
const KEEPER_RESTARTS: u32 = 3;

/// Why a port could not be published or unpublished.
#[derive(Debug, thiserror::Error)]
pub enum PortError {
    #[error("{0}: UDP on an IPv6 host address needs --enable-ipv6 (the container has no IPv6 address to forward to)")]
    UdpIpv6(PortMapping),
    #[error("{0}: host port {1} is below net.ipv4.ip_unprivileged_port_start ({2}); lower that sysctl or use a higher port")]
    Privileged(PortMapping, u16, u16),
    #[error("{0}: already published")]
    Published(PortMapping),
    #[error("{0}: container port {1}/udp is already published on another host port (a container UDP port takes one host port)")]
    UdpContainerPort(PortMapping, u16),
    #[error("{0}: not published")]
    NotPublished(PortMapping),
    #[error("{0}: {1}")]
    Io(PortMapping, #[source] io::Error),
}

struct Entry {
    mapping: PortMapping,
    /// TCP: the listeners, by family (IPv4, IPv6). UDP: none; the sockets belong to the
    /// engine's flows.
    listeners: [Option<Socket>; 2],
    /// UDP: the families published (IPv4, IPv6).
    udp: [bool; 2],
}

/// The host addresses a mapping binds: its own, or both wildcards (`[::]` only where the host has
/// IPv6 and, for UDP, the container too).
fn bind_addresses(m: &PortMapping, container_v6: bool) -> Vec<IpAddr> {
    match m.host_ip {
        Some(ip) => vec![ip],
        None => {
            let mut v = vec![IpAddr::V4(Ipv4Addr::UNSPECIFIED)];
            let host_v6 = std::path::Path::new("/proc/net/if_inet6").exists();
            if host_v6 && (m.protocol == Protocol::Tcp || container_v6) {
                v.push(IpAddr::V6(Ipv6Addr::UNSPECIFIED));
            }
            v
        }
    }
}

/// One direction of a spliced connection: source socket → pipe → destination socket.
struct Pipe {
    r: OwnedFd,
    w: OwnedFd,
    /// What the pipe holds at most (its size), and holds now.
    cap: usize,
    held: usize,
    eof: bool,
    shut: bool,
    /// The source socket has reported urgent data: `splice` stops at its mark, so the byte
    /// there is read and written into the pipe by hand.
    urgent: bool,
}

impl Pipe {
    /// A non-blocking pipe of `size` bytes, or of what the kernel allows (past the user's soft
    /// limit, `fs.pipe-user-pages-soft`, a new pipe gets 2 pages and cannot grow).
    fn new(size: libc::c_int) -> io::Result<Pipe> {
        use nix::fcntl::{fcntl, FcntlArg, OFlag};
        let (r, w) = nix::unistd::pipe2(OFlag::O_NONBLOCK | OFlag::O_CLOEXEC)?;
        let cap = fcntl(&w, FcntlArg::F_SETPIPE_SZ(size))
            .or_else(|_| fcntl(&w, FcntlArg::F_GETPIPE_SZ))?;
        Ok(Pipe {
            r,
            w,
            cap: usize::try_from(cap).unwrap_or(0),
            held: 0,
            eof: false,
            shut: false,
            urgent: false,
        })
    }
}

struct Splice {
    client: Socket,
    inner: Socket,
    connected: bool,
    /// 0: client → container, 1: container → client.
    pipes: [Pipe; 2],
}

impl Splice {
    fn pipe_bytes(&self) -> usize {
        self.pipes.iter().map(|p| p.cap).sum()
    }
}

/// Counters of the published-port paths.
#[derive(Debug, Default, Clone, serde::Serialize)]
pub struct PortStats {
    pub accepted: u64,
    pub spliced: u64,
    pub via_engine: u64,
    pub refused: u64,
    pub splices_open: usize,
    /// Bytes of pipe the open splices hold (bounded by half the user's pipe soft limit).
    pub splice_pipe_bytes: usize,
}

pub struct Ports {
    entries: Vec<Option<Entry>>,
    splices: Slab<Splice>,
    max_splices: usize,
    /// Bytes of pipe the open splices hold, and may hold (`pipe_budget`): big pipes while less
    /// than half is used, default ones up to the budget, and past it loopback clients go
    /// through the engine.
    pipe_bytes: usize,
    pipe_budget: usize,
    /// Opens the namespaces the keeper joins (made on the first loopback client).
    keeper_target: Box<dyn Fn() -> io::Result<(Option<OwnedFd>, OwnedFd)>>,
    keeper: Option<Keeper>,
    keeper_restarts: u32,
    /// An fd held in reserve: when accept fails for want of descriptors, closing it makes room
    /// to accept the client and reset it, so the listener is drained instead of staying readable
    /// (which would spin the loop) and the client hears "refused" at once instead of hanging.
    spare_fd: Option<OwnedFd>,
    stats: PortStats,
}

fn open_spare_fd() -> Option<OwnedFd> {
    std::fs::File::open("/dev/null").ok().map(OwnedFd::from)
}

fn unprivileged_port_start() -> u16 {
    std::fs::read_to_string("/proc/sys/net/ipv4/ip_unprivileged_port_start")
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(1024)
}

/// Bytes of pipe rnat's splices may hold together: half the per-user soft limit on pipe pages
/// (`fs.pipe-user-pages-soft`), which the user's other processes share, those in the container
/// among them: past that limit every new pipe of the user is cut to 2 pages. Unlimited if the
/// limit is off (0).
fn pipe_budget() -> usize {
    let page = nix::unistd::sysconf(nix::unistd::SysconfVar::PAGE_SIZE)
        .ok()
        .flatten()
        .and_then(|p| usize::try_from(p).ok())
        .unwrap_or(4096);
    let soft = std::fs::read_to_string("/proc/sys/fs/pipe-user-pages-soft")
        .ok()
        .and_then(|s| s.trim().parse::<usize>().ok())
        .unwrap_or(16384);
    match soft {
        0 => usize::MAX,
        pages => pages.saturating_mul(page) / 2,
    }
}

impl Ports {
    pub fn new(
        max_splices: usize,
        keeper_target: Box<dyn Fn() -> io::Result<(Option<OwnedFd>, OwnedFd)>>,
    ) -> Ports {
        Ports {
            entries: Vec::new(),
            splices: Slab::new(),
            max_splices,
            pipe_bytes: 0,
            pipe_budget: pipe_budget(),
            keeper_target,
            keeper: None,
            keeper_restarts: 0,
            spare_fd: open_spare_fd(),
            stats: PortStats::default(),
        }
    }

    pub fn stats(&self) -> PortStats {
        let mut s = self.stats.clone();
        s.splices_open = self.splices.len();
        s.splice_pipe_bytes = self.pipe_bytes;
        s
    }

    /// The published ports, in the order they were published.
    pub fn list(&self) -> Vec<PortMapping> {
        self.entries.iter().flatten().map(|e| e.mapping).collect()
    }

    /// Publishes `m`: binds its host socket (nothing changes if that fails).
    pub fn publish(
        &mut self,
        core: &mut Core,
        host: &mut KernelHost,
        m: &PortMapping,
        now: Instant,
    ) -> Result<(), PortError> {
        if self
            .entries
            .iter()
            .flatten()
            .any(|e| e.mapping.conflicts_with(m))
        {
            return Err(PortError::Published(*m));
        }
        if m.protocol == Protocol::Udp
            && matches!(m.host_ip, Some(IpAddr::V6(_)))
            && !core.has_ipv6()
        {
            return Err(PortError::UdpIpv6(*m));
        }
        let io = |e: io::Error| {
            let start = unprivileged_port_start();
            if e.raw_os_error() == Some(libc::EACCES) && m.host_port < start {
                PortError::Privileged(*m, m.host_port, start)
            } else {
                PortError::Io(*m, e)
            }
        };
        let slot = self
            .entries
            .iter()
            .position(Option::is_none)
            .unwrap_or(self.entries.len());
        let mut entry = Entry {
            mapping: *m,
            listeners: [None, None],
            udp: [false, false],
        };
        // On an error, dropping `entry` closes its listeners; UDP flows are taken back below.
        let result = (|| {
            for ip in bind_addresses(m, core.has_ipv6()) {
                let fam = usize::from(ip.is_ipv6());
                let domain = if ip.is_ipv6() {
                    Domain::IPV6
                } else {
                    Domain::IPV4
                };
                let addr = SockAddr::from(SocketAddr::new(ip, m.host_port));
                let kind = match m.protocol {
                    Protocol::Tcp => Type::STREAM,
                    Protocol::Udp => Type::DGRAM,
                };
                let proto = match m.protocol {
                    Protocol::Tcp => SockProto::TCP,
                    Protocol::Udp => SockProto::UDP,
                };
                let s =
                    Socket::new(domain, kind.nonblocking().cloexec(), Some(proto)).map_err(io)?;
                if ip.is_ipv6() {
                    s.set_only_v6(true).map_err(io)?;
                }
                match m.protocol {
                    Protocol::Tcp => {
                        s.set_reuse_address(true).map_err(io)?;
                        host.prepare_listener(&s).map_err(io)?;
                        s.bind(&addr).map_err(io)?;
                        s.listen(4096).map_err(io)?;
                        let token = LISTEN_BASE + ((slot as u64) << 1) + fam as u64;
                        host.register(s.as_fd(), token, EpollFlags::EPOLLIN)
                            .map_err(io)?;
                        entry.listeners[fam] = Some(s);
                    }
                    Protocol::Udp => {
                        s.bind(&addr).map_err(io)?;
                        host.stage_bound_udp(s);
                        core.udp_publish(host, m.container_port, ip.is_ipv6(), now)
                            .map_err(|e| {
                                // Refused before adoption: the bound socket must not stay
                                // staged (and the port bound) until the next adoption.
                                host.discard_staged();
                                match e {
                                    super::core::PublishError::Published => {
                                        PortError::UdpContainerPort(*m, m.container_port)
                                    }
                                    super::core::PublishError::NoIpv6 => PortError::UdpIpv6(*m),
                                    super::core::PublishError::Host(e) => PortError::Io(*m, e),
                                }
                            })?;
                        entry.udp[fam] = true;
                    }
                }
            }
            Ok(())
        })();
        if let Err(e) = result {
            for (fam, on) in entry.udp.iter().enumerate() {
                if *on {
                    core.udp_unpublish(host, m.container_port, fam == 1);
                }
            }
            return Err(e);
        }
        if slot == self.entries.len() {
            self.entries.push(Some(entry));
        } else {
            self.entries[slot] = Some(entry);
        }
        Ok(())
    }

    /// Stops publishing `m`; connections already made go on.
    pub fn unpublish(
        &mut self,
        core: &mut Core,
        host: &mut KernelHost,
        m: &PortMapping,
    ) -> Result<(), PortError> {
        let slot = self
            .entries
            .iter()
            .position(|e| e.as_ref().is_some_and(|e| &e.mapping == m))
            .ok_or(PortError::NotPublished(*m))?;
        let entry = self.entries[slot]
            .take()
            .ok_or(PortError::NotPublished(*m))?;
        for (fam, on) in entry.udp.iter().enumerate() {
            if *on {
                core.udp_unpublish(host, entry.mapping.container_port, fam == 1);
            }
        }
        Ok(()) // dropping the listeners closes them (and takes them out of epoll)
    }

    /// A spliced connection's socket with this token reported urgent data (its `on_event`
    /// follows).
    pub fn on_urgent(&mut self, token: u64) {
        if !(SPLICE_BASE..SPLICE_BASE * 2).contains(&token) {
            return;
        }
        let n = (token - SPLICE_BASE) as usize;
        if let Some(s) = self.splices.get_mut(n >> 1) {
            // Token 0 is the client's socket, the source of pipe 0; token 1 the container's.
            s.pipes[n & 1].urgent = true;
        }
    }

    /// Handles a token of ours; false if it is not one.
    pub fn on_event(
        &mut self,
        core: &mut Core,
        host: &mut KernelHost,
        token: u64,
        now: Instant,
    ) -> bool {
        if (LISTEN_BASE..SPLICE_BASE).contains(&token) {
            let n = (token - LISTEN_BASE) as usize;
            self.accept(core, host, n >> 1, n & 1, now);
            true
        } else if (SPLICE_BASE..SPLICE_BASE * 2).contains(&token) {
            self.pump((token - SPLICE_BASE) as usize >> 1);
            true
        } else {
            false
        }
    }

    fn accept(
        &mut self,
        core: &mut Core,
        host: &mut KernelHost,
        slot: usize,
        fam: usize,
        now: Instant,
    ) {
        for _ in 0..ACCEPT_BUDGET {
            let Some(Some(entry)) = self.entries.get(slot) else {
                return;
            };
            let Some(listener) = &entry.listeners[fam] else {
                return;
            };
            let guest_port = entry.mapping.container_port;
            let (sock, peer) = match sys::accept_nonblocking(listener.as_raw_fd()) {
                Ok((fd, peer)) => (Socket::from(fd), peer),
                Err(e) if is_out_of_fds(&e) => {
                    // Out of descriptors: reset this client with the reserve fd's room.
                    if self.spare_fd.take().is_none() {
                        return;
                    }
                    if let Ok((sock, _)) = sys::accept_nonblocking(listener.as_raw_fd()) {
                        let sock = Socket::from(sock);
                        let _ = sock.set_linger(Some(std::time::Duration::ZERO));
                        self.stats.refused += 1;
                    }
                    self.spare_fd = open_spare_fd();
                    continue;
                }
                Err(_) => return, // EAGAIN: drained
            };
            self.stats.accepted += 1;
            let Some(peer) = peer else {
                continue;
            };
            // An IPv6 client of a container without IPv6 can only be spliced (to its IPv4).
            let splice_only = peer.is_ipv6() && !core.has_ipv6();
            let room = self.splices.len() < self.max_splices
                && self.pipe_bytes + 2 * PIPE_DEFAULT as usize <= self.pipe_budget;
            if (peer.ip().is_loopback() || splice_only) && room {
                match self.splice_to(host, sock, guest_port) {
                    Ok(()) => {
                        self.stats.spliced += 1;
                    }
                    // No keeper (or no fds): the engine carries it instead, if it can.
                    Err(Some(sock)) if !splice_only => {
                        self.via_engine(core, host, sock, peer, guest_port, now);
                    }
                    Err(Some(sock)) => refuse(&mut self.stats, sock),
                    Err(None) => {}
                }
                continue;
            }
            if splice_only {
                refuse(&mut self.stats, sock);
                continue;
            }
            self.via_engine(core, host, sock, peer, guest_port, now);
        }
    }

    fn via_engine(
        &mut self,
        core: &mut Core,
        host: &mut KernelHost,
        sock: Socket,
        peer: SocketAddr,
        guest_port: u16,
        now: Instant,
    ) {
        if host.stage_accepted(sock).is_err() {
            self.stats.refused += 1;
            return;
        }
        match core.tcp_inbound(host, peer, guest_port, now) {
            Some(_) => self.stats.via_engine += 1,
            None => {
                host.drop_staged_with_reset();
                self.stats.refused += 1;
            }
        }
    }

    /// Sets up a spliced connection; on failure gives the client socket back (if still usable).
    fn splice_to(
        &mut self,
        host: &mut KernelHost,
        client: Socket,
        guest_port: u16,
    ) -> Result<(), Option<Socket>> {
        if self.keeper.is_none() {
            let keeper = (self.keeper_target)().and_then(|(u, n)| Keeper::spawn(u, n));
            match keeper {
                Ok(k) => self.keeper = Some(k),
                // Out of descriptors for now: this client goes through the engine, a later one
                // tries again.
                Err(e) if is_out_of_fds(&e) => return Err(Some(client)),
                Err(e) => {
                    tracing::warn!("no socket maker in the container ({e}): loopback clients go through the engine");
                    self.max_splices = 0;
                    return Err(Some(client));
                }
            }
        }
        let Some(keeper) = &self.keeper else {
            return Err(Some(client));
        };
        let inner = match keeper.connect_local(guest_port) {
            Ok(fd) => Socket::from(fd),
            Err(e) if e.raw_os_error() == Some(libc::ECONNREFUSED) => {
                let _ = client.set_linger(Some(std::time::Duration::ZERO));
                self.stats.refused += 1;
                return Err(None);
            }
            Err(e) if e.kind() == io::ErrorKind::BrokenPipe => {
                // The socket maker is gone: the next loopback client starts another (a few times).
                self.keeper = None;
                self.keeper_restarts += 1;
                if self.keeper_restarts > KEEPER_RESTARTS {
                    tracing::warn!("the socket maker keeps dying ({e}): loopback clients go through the engine");
                    self.max_splices = 0;
                } else {
                    tracing::warn!("the socket maker is gone ({e}); a new one starts with the next loopback client");
                }
                return Err(Some(client));
            }
            Err(_) => return Err(Some(client)),
        };
        // The container's server has accepted `inner`: if the splice cannot be set up, it hears
        // a reset (the client goes through the engine), not an empty, orderly connection.
        let abandon = |inner: Socket| {
            let _ = inner.set_linger(Some(std::time::Duration::ZERO));
        };
        let size = if self.pipe_bytes + 2 * PIPE_SIZE as usize <= self.pipe_budget / 2 {
            PIPE_SIZE
        } else {
            PIPE_DEFAULT
        };
        let (Ok(a), Ok(b)) = (Pipe::new(size), Pipe::new(size)) else {
            abandon(inner);
            return Err(Some(client));
        };
        // Urgent data comes in line on both sides, as on the engine's sockets (`pump_one`).
        if host.accepted_options(&client).is_err()
            || sys::set_oob_inline(inner.as_raw_fd()).is_err()
        {
            abandon(inner);
            return Err(Some(client));
        }
        let entry = self.splices.vacant_entry();
        let idx = entry.key() as u64;
        let flags = EpollFlags::EPOLLIN
            | EpollFlags::EPOLLOUT
            | EpollFlags::EPOLLRDHUP
            | EpollFlags::EPOLLPRI
            | EpollFlags::EPOLLET;
        if host
            .register(client.as_fd(), SPLICE_BASE + (idx << 1), flags)
            .is_err()
            || host
                .register(inner.as_fd(), SPLICE_BASE + (idx << 1) + 1, flags)
                .is_err()
        {
            // Half set up: both ends hear a reset, not an orderly close of a working connection.
            let _ = client.set_linger(Some(std::time::Duration::ZERO));
            abandon(inner);
            self.stats.refused += 1;
            return Err(None);
        }
        entry.insert(Splice {
            client,
            inner,
            connected: false,
            pipes: [a, b],
        });
        self.pipe_bytes += self.splices[idx as usize].pipe_bytes();
        Ok(())
    }

    /// Moves whatever can move in both directions of spliced connection `idx`.
    fn pump(&mut self, idx: usize) {
        let Some(s) = self.splices.get_mut(idx) else {
            return;
        };
        if !s.connected {
            match s.inner.take_error() {
                Ok(None) if s.inner.peer_addr().is_ok() => s.connected = true,
                Ok(None) => return, // still connecting
                _ => {
                    let _ = s.client.set_linger(Some(std::time::Duration::ZERO));
                    self.end_splice(idx);
                    return;
                }
            }
        }
        let mut failed = false;
        for dir in 0..2 {
            let (src, dst) = if dir == 0 {
                (&s.client, &s.inner)
            } else {
                (&s.inner, &s.client)
            };
            if pump_one(&mut s.pipes[dir], src, dst).is_err() {
                failed = true;
            }
        }
        if failed {
            // One side failed (a reset, most often): the other hears a reset too, not an orderly
            // end of a stream that was cut short (whatever the pipes held is lost).
            let _ = s.client.set_linger(Some(std::time::Duration::ZERO));
            let _ = s.inner.set_linger(Some(std::time::Duration::ZERO));
            self.end_splice(idx);
        } else if s.pipes.iter().all(|p| p.shut) {
            self.end_splice(idx);
        }
    }

    /// Closes spliced connection `idx` and gives its pipes back to the budget.
    fn end_splice(&mut self, idx: usize) {
        let s = self.splices.remove(idx);
        self.pipe_bytes -= s.pipe_bytes();
    }
}

/// One direction: socket → pipe → socket until either side would block.
///
/// TCP urgent data: a `splice` from a socket stops at the urgent mark and reads nothing there
/// (`EAGAIN`, or 0 once the peer has closed), whatever follows. So a splice that moved nothing
/// asks whether it stands at the mark (on `EAGAIN` only once the source has reported urgent
/// data; before taking 0 for the end, always), and if so the byte there is read (in line,
/// `SO_OOBINLINE`) and written into the empty pipe; splicing then goes on past it. The byte
/// arrives in order; its urgency is not passed on.
fn pump_one(p: &mut Pipe, src: &Socket, dst: &Socket) -> io::Result<()> {
    let flags = SpliceFFlags::SPLICE_F_MOVE | SpliceFFlags::SPLICE_F_NONBLOCK;
    loop {
        let mut moved = false;
        if !p.eof && p.held < p.cap {
            let stalled = match splice(src.as_fd(), None, p.w.as_fd(), None, p.cap - p.held, flags)
            {
                Ok(0) => {
                    // Asked whatever the flag says: the pump runs for either socket's report,
                    // and the source's report of urgent data may come later in the same batch,
                    // after an end taken here would have dropped the rest.
                    let at = sys::at_urgent_mark(src.as_raw_fd())?;
                    p.urgent |= at;
                    p.eof = !at;
                    at
                }
                Ok(n) => {
                    p.held += n;
                    moved = true;
                    false
                }
                Err(nix::errno::Errno::EAGAIN) if p.urgent => {
                    let at = sys::at_urgent_mark(src.as_raw_fd())?;
                    // Past the mark only if the socket, not a pipe full of small segments'
                    // slots, said EAGAIN: with bytes in the pipe the mark may still be ahead,
                    // and later wakes (the destination's) do not report it again.
                    p.urgent = at || p.held > 0;
                    at
                }
                Err(nix::errno::Errno::EAGAIN) => false,
                Err(e) => return Err(e.into()),
            };
            if stalled && p.held == 0 {
                let mut byte = [0u8; 1];
                // Both sockets are non-blocking.
                match io::Read::read(&mut &*src, &mut byte) {
                    Ok(1) => {
                        if nix::unistd::write(&p.w, &byte)? != 1 {
                            return Err(io::ErrorKind::WriteZero.into());
                        }
                        p.held = 1;
                        moved = true;
                    }
                    Ok(_) => {}
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                    Err(e) => return Err(e),
                }
            }
        }
        if p.held > 0 {
            match splice(p.r.as_fd(), None, dst.as_fd(), None, p.held, flags) {
                Ok(n) => {
                    p.held -= n;
                    moved |= n > 0;
                }
                Err(nix::errno::Errno::EAGAIN) => {}
                Err(e) => return Err(e.into()),
            }
        }
        if p.eof && p.held == 0 && !p.shut {
            let _ = dst.shutdown(std::net::Shutdown::Write);
            p.shut = true;
        }
        if !moved {
            return Ok(());
        }
    }
}

/// Resets a client no path can carry.
fn refuse(stats: &mut PortStats, sock: Socket) {
    let _ = sock.set_linger(Some(std::time::Duration::ZERO));
    stats.refused += 1;
}

/// Whether an error means this process (or the system) has no descriptor to spare.
fn is_out_of_fds(e: &io::Error) -> bool {
    matches!(e.raw_os_error(), Some(libc::EMFILE | libc::ENFILE))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Write};
    use std::net::{TcpListener, TcpStream};

    /// A connected pair of TCP sockets on the test process's loopback: (ours, the peer).
    fn tcp_pair() -> (Socket, TcpStream) {
        let l = TcpListener::bind("127.0.0.1:0").expect("listen");
        let peer = TcpStream::connect(l.local_addr().expect("addr")).expect("connect");
        let (ours, _) = l.accept().expect("accept");
        ours.set_nonblocking(true).expect("nonblocking");
        sys::set_oob_inline(ours.as_raw_fd()).expect("oobinline");
        (Socket::from(OwnedFd::from(ours)), peer)
    }

    /// The sender's urgent byte, more data and its close are all queued before the source's
    /// report of urgent data is handled (the pump ran for the other socket's report): the 0 the
    /// splice returns at the mark is not the end, and everything arrives.
    #[test]
    fn an_end_at_the_urgent_mark_is_not_taken_for_the_end() {
        let (src, mut client) = tcp_pair();
        let (dst, mut server) = tcp_pair();
        let mut p = Pipe::new(PIPE_DEFAULT).expect("pipe");
        client.write_all(b"before").expect("send");
        nix::sys::socket::send(
            client.as_raw_fd(),
            b"!",
            nix::sys::socket::MsgFlags::MSG_OOB,
        )
        .expect("send urgent");
        client.write_all(b"after").expect("send");
        client
            .shutdown(std::net::Shutdown::Write)
            .expect("shutdown");
        std::thread::sleep(std::time::Duration::from_millis(50)); // let loopback deliver
        assert!(!p.urgent, "no report of urgent data handled yet");
        for _ in 0..10 {
            pump_one(&mut p, &src, &dst).expect("pump");
            if p.shut {
                break;
            }
        }
        assert!(p.shut, "the end reached, after the urgent byte");
        let mut got = Vec::new();
        server
            .set_read_timeout(Some(std::time::Duration::from_secs(5)))
            .expect("timeout");
        server.read_to_end(&mut got).expect("read");
        assert_eq!(got, b"before!after");
    }

    /// Urgent data reported while the pipe is full by its slots (not by bytes) and the
    /// destination is blocked: the EAGAIN came from the pipe, the mark is still ahead, and once
    /// everything drains the byte at the mark and what follows it still arrive.
    #[test]
    fn urgent_data_behind_a_full_pipe_is_not_forgotten() {
        let (src, mut client) = tcp_pair();
        let (dst, mut server) = tcp_pair();
        // The destination cannot take anything: its send buffer is full, the server not reading.
        dst.set_send_buffer_size(4096).expect("sndbuf");
        let filler = [0u8; 4096];
        let mut stuffed = 0usize;
        for _ in 0..100_000 {
            match (&dst).write(&filler) {
                Ok(n) => stuffed += n,
                Err(_) => break,
            }
        }
        // A one-slot pipe, holding one byte: full by slots, with room by bytes.
        let mut p = Pipe::new(4096).expect("pipe");
        nix::unistd::write(&p.w, b"<").expect("prefill");
        p.held = 1;
        client.write_all(b"before").expect("send");
        nix::sys::socket::send(
            client.as_raw_fd(),
            b"!",
            nix::sys::socket::MsgFlags::MSG_OOB,
        )
        .expect("send urgent");
        client.write_all(b"after").expect("send");
        client
            .shutdown(std::net::Shutdown::Write)
            .expect("shutdown");
        std::thread::sleep(std::time::Duration::from_millis(50)); // let loopback deliver
        p.urgent = true; // EPOLLPRI was reported
        pump_one(&mut p, &src, &dst).expect("pump");
        assert!(p.urgent, "forgot the urgent data while the pipe was full");
        // The server reads everything; the pump runs as each wake would make it.
        server.set_nonblocking(true).expect("nonblocking");
        let mut got = Vec::new();
        let mut buf = [0u8; 65536];
        for _ in 0..2000 {
            while let Ok(n) = server.read(&mut buf) {
                if n == 0 {
                    break;
                }
                got.extend_from_slice(&buf[..n]);
            }
            pump_one(&mut p, &src, &dst).expect("pump");
            if p.shut {
                break;
            }
            std::thread::sleep(std::time::Duration::from_millis(1));
        }
        server.set_nonblocking(false).expect("blocking");
        server
            .set_read_timeout(Some(std::time::Duration::from_secs(5)))
            .expect("timeout");
        while let Ok(n) = server.read(&mut buf) {
            if n == 0 {
                break;
            }
            got.extend_from_slice(&buf[..n]);
        }
        assert_eq!(got.len(), stuffed + b"<before!after".len());
        assert_eq!(&got[stuffed..], b"<before!after");
    }
}
