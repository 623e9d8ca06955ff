//! A simulated network for the core's tests: smoltcp's TCP/IP stack plays the guest, an
//! in-memory host plays the kernel's sockets, and the wire between them drops, duplicates and
//! reorders frames on a seeded schedule. Time advances only when a test says so.

use std::collections::{HashMap, VecDeque};
use std::io;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::time::{Duration, Instant};

use smoltcp::iface::{Config as IfaceConfig, Interface, SocketSet};
use smoltcp::phy::{Device, DeviceCapabilities, Medium};
use smoltcp::wire::{EthernetAddress, HardwareAddress, IpCidr};

use super::{Config, Core, DgramError, FlowId, Host, Peek, Ready, RxMeta, TxMeta};

pub const GUEST_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0x64];
pub const SERVER: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 2);
pub const SERVER6: std::net::Ipv6Addr = std::net::Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, 2);

/// What a host connect does.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    Connect,
    Refuse,
    Unreachable,
    /// connect(2) itself fails at once.
    FailNow(i32),
}

#[derive(Debug, Default)]
pub struct SimSock {
    pub dst: Option<SocketAddr>,
    pub connecting: Option<Outcome>,
    pub connected: bool,
    /// Server → guest bytes not yet consumed; `peek` of them already peeked.
    pub rx: Vec<u8>,
    pub peek: usize,
    /// The furthest `peek` has been (bytes sent at some point, rewinds aside).
    pub sent: usize,
    /// The server closed its side.
    pub eof: bool,
    /// Bytes consumed so far, and how far arrivals (consumed + `rx`) and the end of stream had
    /// been reported as readiness (edge-triggered, as the driver's epoll is).
    pub consumed: usize,
    pub reported: usize,
    /// Bytes read out with `tcp_take` (counted in `consumed` too), the takes that returned
    /// data, and the bytes peeks returned (a byte peeked twice counts twice).
    pub taken: usize,
    pub takes: usize,
    pub peeked: usize,
    pub eof_reported: bool,
    /// A socket error (ECONNRESET...) to report on the next operation.
    pub err: Option<i32>,
    /// Guest → server bytes the server has not read yet, and all it has read.
    pub unread: usize,
    pub received: Vec<u8>,
    /// How many unread bytes the socket takes before it refuses more.
    pub cap: usize,
    pub shut_wr: bool,
    pub closed: bool,
    pub reset: bool,
    pub udp_out: Vec<(SocketAddr, Vec<u8>)>,
    pub udp_in: VecDeque<(SocketAddr, Vec<u8>)>,
    /// ICMP errors for the socket's datagrams (the error queue), and whether the newest is
    /// still to fail the next receive once, as the kernel's pending socket error does.
    pub dgram_errors: VecDeque<DgramError>,
    pub dgram_error_pending: bool,
}

pub struct SimHost {
    pub to_guest: Vec<Vec<u8>>,
    pub socks: HashMap<FlowId, SimSock>,
    pub outcome: Box<dyn Fn(SocketAddr) -> Outcome>,
    pub sock_cap: usize,
    pub ping_allowed: bool,
    pub connects: Vec<SocketAddr>,
    /// Every frame emitted, when `log_frames` is set.
    pub log_frames: bool,
    pub log: Vec<Vec<u8>>,
    /// The socket the next `adopt` takes.
    pub staged: Option<SimSock>,
}

impl SimHost {
    pub fn new() -> SimHost {
        SimHost {
            to_guest: Vec::new(),
            socks: HashMap::new(),
            outcome: Box::new(|_| Outcome::Connect),
            sock_cap: 1 << 20,
            ping_allowed: true,
            connects: Vec::new(),
            log_frames: false,
            log: Vec::new(),
            staged: None,
        }
    }

    fn sock(&mut self, id: FlowId) -> io::Result<&mut SimSock> {
        match self.socks.get_mut(&id) {
            Some(s) if !s.closed => Ok(s),
            _ => Err(io::Error::from_raw_os_error(libc::EBADF)),
        }
    }

    /// The open TCP socket connected to `dst`, if any.
    pub fn by_dst(&mut self, dst: impl Into<SocketAddr>) -> Option<(FlowId, &mut SimSock)> {
        let dst = dst.into();
        self.socks
            .iter_mut()
            .find(|(_, s)| s.dst == Some(dst) && !s.closed)
            .map(|(id, s)| (*id, s))
    }
}

impl Host for SimHost {
    fn emit(&mut self, frame: &[u8], _meta: TxMeta) {
        self.to_guest.push(frame.to_vec());
        if self.log_frames {
            self.log.push(frame.to_vec());
        }
    }
    fn tcp_connect(&mut self, id: FlowId, dst: SocketAddr) -> io::Result<()> {
        let outcome = (self.outcome)(dst);
        self.connects.push(dst);
        if let Outcome::FailNow(errno) = outcome {
            return Err(io::Error::from_raw_os_error(errno));
        }
        self.socks.insert(
            id,
            SimSock {
                dst: Some(dst),
                connecting: Some(outcome),
                cap: self.sock_cap,
                ..Default::default()
            },
        );
        Ok(())
    }
    fn tcp_connect_result(&mut self, id: FlowId) -> io::Result<()> {
        let s = self.sock(id)?;
        match (s.connected, s.connecting) {
            (true, _) => Ok(()),
            (false, Some(Outcome::Refuse)) => Err(io::Error::from_raw_os_error(libc::ECONNREFUSED)),
            (false, Some(Outcome::Unreachable)) => {
                Err(io::Error::from_raw_os_error(libc::EHOSTUNREACH))
            }
            _ => Err(io::Error::from_raw_os_error(libc::EINPROGRESS)),
        }
    }
    fn tcp_send(&mut self, id: FlowId, data: &[u8]) -> io::Result<usize> {
        let s = self.sock(id)?;
        if let Some(e) = s.err {
            return Err(io::Error::from_raw_os_error(e));
        }
        assert!(!s.shut_wr, "send after shutdown");
        let n = data.len().min(s.cap - s.unread);
        s.received.extend_from_slice(&data[..n]);
        s.unread += n;
        Ok(n)
    }
    fn tcp_peek(&mut self, id: FlowId, buf: &mut [u8]) -> io::Result<Peek> {
        let s = self.sock(id)?;
        if let Some(e) = s.err {
            return Err(io::Error::from_raw_os_error(e));
        }
        let avail = s.rx.len() - s.peek;
        if avail == 0 {
            return Ok(if s.eof { Peek::Eof } else { Peek::WouldBlock });
        }
        let n = avail.min(buf.len());
        buf[..n].copy_from_slice(&s.rx[s.peek..s.peek + n]);
        s.peek += n;
        s.sent = s.sent.max(s.peek);
        s.peeked += n;
        Ok(Peek::Data(n))
    }
    fn tcp_take(&mut self, id: FlowId, buf: &mut [u8]) -> io::Result<Peek> {
        let s = self.sock(id)?;
        assert_eq!(s.peek, 0, "took from a socket with bytes peeked");
        if let Some(e) = s.err {
            return Err(io::Error::from_raw_os_error(e));
        }
        if s.rx.is_empty() {
            return Ok(if s.eof { Peek::Eof } else { Peek::WouldBlock });
        }
        let n = s.rx.len().min(buf.len());
        buf[..n].copy_from_slice(&s.rx[..n]);
        s.rx.drain(..n);
        s.consumed += n;
        s.sent = s.sent.saturating_sub(n);
        s.taken += n;
        s.takes += 1;
        Ok(Peek::Data(n))
    }
    fn tcp_consume(&mut self, id: FlowId, n: usize) {
        let s = self.sock(id).expect("consume on a closed socket");
        // Acknowledged bytes were sent once, though perhaps before a rewind.
        assert!(n <= s.sent, "consumed {n} bytes, only {} were sent", s.sent);
        s.rx.drain(..n);
        s.consumed += n;
        s.sent -= n;
        s.peek = s.peek.saturating_sub(n);
    }
    fn tcp_rewind(&mut self, id: FlowId) {
        if let Ok(s) = self.sock(id) {
            s.peek = 0;
        }
    }
    fn tcp_shutdown(&mut self, id: FlowId) {
        if let Ok(s) = self.sock(id) {
            s.shut_wr = true;
        }
    }
    fn tcp_close(&mut self, id: FlowId, reset: bool) {
        if let Ok(s) = self.sock(id) {
            s.closed = true;
            s.reset = reset;
        }
    }
    fn udp_open(&mut self, id: FlowId, _v6: bool) -> io::Result<()> {
        self.socks.insert(id, SimSock::default());
        Ok(())
    }
    fn udp_send(&mut self, id: FlowId, dst: SocketAddr, data: &[u8]) -> io::Result<()> {
        self.sock(id)?.udp_out.push((dst, data.to_vec()));
        Ok(())
    }
    fn udp_recv(&mut self, id: FlowId, buf: &mut [u8]) -> io::Result<Option<(SocketAddr, usize)>> {
        let s = self.sock(id)?;
        if std::mem::take(&mut s.dgram_error_pending) {
            return Err(io::Error::from_raw_os_error(libc::ECONNREFUSED));
        }
        Ok(s.udp_in.pop_front().map(|(from, d)| {
            buf[..d.len()].copy_from_slice(&d);
            (from, d.len())
        }))
    }
    fn dgram_error(&mut self, id: FlowId) -> io::Result<Option<DgramError>> {
        let s = self.sock(id)?;
        let e = s.dgram_errors.pop_front();
        // Taking an error leaves the next one (if any) pending, as the kernel does.
        s.dgram_error_pending = !s.dgram_errors.is_empty();
        Ok(e)
    }
    fn ping_open(&mut self, id: FlowId, _v6: bool) -> io::Result<()> {
        if !self.ping_allowed {
            return Err(io::Error::from_raw_os_error(libc::EACCES));
        }
        self.socks.insert(id, SimSock::default());
        Ok(())
    }
    fn ping_send(&mut self, id: FlowId, dst: IpAddr, icmp: &[u8]) -> io::Result<()> {
        self.sock(id)?
            .udp_out
            .push((SocketAddr::new(dst, 0), icmp.to_vec()));
        Ok(())
    }
    fn ping_recv(&mut self, id: FlowId, buf: &mut [u8]) -> io::Result<Option<(IpAddr, usize)>> {
        Ok(self.udp_recv(id, buf)?.map(|(a, n)| (a.ip(), n)))
    }
    fn adopt(&mut self, id: FlowId) -> io::Result<()> {
        let s = self
            .staged
            .take()
            .ok_or_else(|| io::Error::from_raw_os_error(libc::EBADF))?;
        self.socks.insert(id, s);
        Ok(())
    }
    fn dgram_close(&mut self, id: FlowId) {
        if let Ok(s) = self.sock(id) {
            s.closed = true;
        }
    }
}

/// The guest's NIC: frames queued each way.
#[derive(Default)]
pub struct QueueDev {
    pub rx: VecDeque<Vec<u8>>,
    pub tx: VecDeque<Vec<u8>>,
    pub mtu: usize,
}

pub struct Rx(Vec<u8>);
pub struct Tx<'a>(&'a mut VecDeque<Vec<u8>>);

impl smoltcp::phy::RxToken for Rx {
    fn consume<R, F: FnOnce(&[u8]) -> R>(self, f: F) -> R {
        f(&self.0)
    }
}

impl smoltcp::phy::TxToken for Tx<'_> {
    fn consume<R, F: FnOnce(&mut [u8]) -> R>(self, len: usize, f: F) -> R {
        let mut buf = vec![0u8; len];
        let r = f(&mut buf);
        self.0.push_back(buf);
        r
    }
}

impl Device for QueueDev {
    type RxToken<'a> = Rx;
    type TxToken<'a> = Tx<'a>;
    fn receive(&mut self, _: smoltcp::time::Instant) -> Option<(Rx, Tx<'_>)> {
        let f = self.rx.pop_front()?;
        Some((Rx(f), Tx(&mut self.tx)))
    }
    fn transmit(&mut self, _: smoltcp::time::Instant) -> Option<Tx<'_>> {
        Some(Tx(&mut self.tx))
    }
    fn capabilities(&self) -> DeviceCapabilities {
        let mut c = DeviceCapabilities::default();
        c.medium = Medium::Ethernet;
        c.max_transmission_unit = self.mtu + 14;
        c
    }
}

/// Wire impairments, applied to frames in both directions.
#[derive(Debug, Clone, Copy, Default)]
pub struct Impair {
    /// Per-mille chances.
    pub loss: u32,
    pub dup: u32,
    pub reorder: u32,
}

pub struct Sim {
    pub core: Core,
    pub host: SimHost,
    pub iface: Interface,
    pub dev: QueueDev,
    pub sockets: SocketSet<'static>,
    pub impair: Impair,
    rng: u64,
    held: Vec<(bool, Vec<u8>)>,
    pub base: Instant,
    pub ms: u64,
    /// Bytes the server side reads per step from each socket (None: everything).
    pub server_read: Option<usize>,
}

impl Sim {
    pub fn new(cfg: Config) -> Sim {
        let mut dev = QueueDev {
            mtu: usize::from(cfg.mtu),
            ..Default::default()
        };
        let mut icfg = IfaceConfig::new(HardwareAddress::Ethernet(EthernetAddress(GUEST_MAC)));
        icfg.random_seed = 7;
        let mut iface = Interface::new(icfg, &mut dev, smoltcp::time::Instant::from_millis(0));
        let (guest, prefix, gw) = (cfg.guest, cfg.cidr.prefix_len(), cfg.gateway);
        iface.update_ip_addrs(|a| {
            a.push(IpCidr::new(guest.into(), prefix))
                .expect("one address");
            if let Some(v6) = cfg.ipv6 {
                a.push(IpCidr::new(v6.guest.into(), 64))
                    .expect("room for an IPv6 address");
            }
        });
        iface
            .routes_mut()
            .add_default_ipv4_route(gw)
            .expect("default route");
        if let Some(v6) = cfg.ipv6 {
            // Through the gateway's global address: its neighbour entry comes from the core's
            // answer to smoltcp's solicitation.
            iface
                .routes_mut()
                .add_default_ipv6_route(v6.gateway)
                .expect("default IPv6 route");
        }
        Sim {
            core: Core::new(cfg),
            host: SimHost::new(),
            iface,
            dev,
            sockets: SocketSet::new(Vec::new()),
            impair: Impair::default(),
            rng: 0x1234_5678_9abc_def1,
            held: Vec::new(),
            base: Instant::now(),
            ms: 0,
            server_read: None,
        }
    }

    pub fn now(&self) -> Instant {
        self.base + Duration::from_millis(self.ms)
    }

    fn roll(&mut self, per_mille: u32) -> bool {
        if per_mille == 0 {
            return false;
        }
        self.rng ^= self.rng << 13;
        self.rng ^= self.rng >> 7;
        self.rng ^= self.rng << 17;
        (self.rng % 1000) < u64::from(per_mille)
    }

    /// Passes frames across the impaired wire; `to_core` says which way.
    fn carry(&mut self, frames: Vec<Vec<u8>>, to_core: bool) -> Vec<Vec<u8>> {
        let mut out = Vec::new();
        // Frames held back last time go out after this batch's first frame.
        let held: Vec<Vec<u8>> = {
            let (mine, rest): (Vec<_>, Vec<_>) =
                self.held.drain(..).partition(|(d, _)| *d == to_core);
            self.held = rest;
            mine.into_iter().map(|(_, f)| f).collect()
        };
        for f in frames {
            let (loss, dup, reorder) = (self.impair.loss, self.impair.dup, self.impair.reorder);
            if self.roll(loss) {
                continue;
            }
            if self.roll(reorder) {
                self.held.push((to_core, f));
                continue;
            }
            if self.roll(dup) {
                out.push(f.clone());
            }
            out.push(f);
        }
        out.extend(held);
        out
    }

    /// One millisecond of simulated time: the guest runs, frames cross, the host's sockets
    /// report readiness, timers run.
    pub fn step(&mut self) {
        self.ms += 1;
        let now = self.now();
        let t = smoltcp::time::Instant::from_millis(self.ms as i64);
        self.iface.poll(t, &mut self.dev, &mut self.sockets);
        let frames: Vec<Vec<u8>> = self.dev.tx.drain(..).collect();
        for f in self.carry(frames, true) {
            self.core
                .on_frame(&mut self.host, &f, RxMeta::default(), now);
        }
        self.core.flush(&mut self.host, now);
        // The server side: connects complete, data is read, readiness is reported.
        let ids: Vec<FlowId> = self.host.socks.keys().copied().collect();
        for id in ids {
            let Some(s) = self.host.socks.get_mut(&id) else {
                continue;
            };
            if s.closed {
                continue;
            }
            let mut ready = Ready::default();
            if let Some(o) = s.connecting.take() {
                match o {
                    Outcome::Connect => s.connected = true,
                    other => s.connecting = Some(other),
                }
                ready.writable = true;
                ready.error = s.connecting.is_some();
            } else if s.dst.is_some() {
                let n = self.server_read.unwrap_or(usize::MAX).min(s.unread);
                s.unread -= n;
                // Edge-triggered, as the driver's epoll: readable only when data (or the end
                // of the stream) arrived since the last report, not while unread data waits.
                let arrived = s.consumed + s.rx.len();
                ready.readable =
                    arrived > s.reported || (s.eof && !s.eof_reported) || s.err.is_some();
                // EPOLLRDHUP comes with every report once the server has closed.
                ready.hup = ready.readable && s.eof;
                s.reported = arrived;
                s.eof_reported |= s.eof;
                ready.writable = s.unread < s.cap;
                ready.error = s.err.is_some();
            } else {
                ready.readable = !s.udp_in.is_empty();
                ready.error = !s.dgram_errors.is_empty();
            }
            if ready != Ready::default() {
                self.core.on_ready(&mut self.host, id, ready, now);
            }
        }
        self.core.on_timer(&mut self.host, now);
        let frames = std::mem::take(&mut self.host.to_guest);
        for f in self.carry(frames, false) {
            self.dev.rx.push_back(f);
        }
    }

    /// Steps until `done` holds or `max_ms` simulated milliseconds pass; returns whether it held.
    pub fn run_until(&mut self, max_ms: u64, mut done: impl FnMut(&mut Sim) -> bool) -> bool {
        for _ in 0..max_ms {
            if done(self) {
                return true;
            }
            self.step();
        }
        done(self)
    }
}
