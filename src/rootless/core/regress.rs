//! Regression tests for inputs the fuzzer (`fuzz/fuzz_targets/frames.rs`) found to break the core.
//! Each test drives the core with a minimal in-memory host (`FakeHost`) through the input's steps.

use std::io;
use std::net::{IpAddr, Ipv4Addr, SocketAddr, SocketAddrV4};
use std::time::Instant;

use super::{csum, frame, Config, Core, FlowId, Host, Peek, Ready, RxMeta, TxMeta, GATEWAY_MAC};

const GUEST_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0x64];

/// A host whose TCP sockets all read from one peer that has sent `avail` bytes, and accept all
/// they are given but for the flows in `refuse`; everything else succeeds.
/// Frames whose checksums the link vouches for.
const RX: RxMeta = RxMeta { csum_trusted: true };

#[derive(Default)]
struct FakeHost {
    avail: usize,
    peeked: usize,
    /// Flows whose sockets take nothing.
    refuse: Vec<FlowId>,
    /// TCP frames to the guest: (guest port, seq, flags, window).
    sent: Vec<(FlowId, u32, u8, u16)>,
    /// Datagram flows closed.
    closed: Vec<FlowId>,
    /// Whether sockets staged by the driver (published ports) can be adopted.
    adopt_ok: bool,
    /// Peeks made, and whether they answer `Peek::Later`.
    peeks: usize,
    later: bool,
    /// Reads of the front (`tcp_take`) made, and consumes.
    takes: usize,
    consumes: usize,
    /// Connect outcomes asked for, and the error they say (none: connected).
    connect_results: usize,
    connect_error: Option<i32>,
    /// The peer has closed: after the `avail` bytes, the end of the stream.
    eof: bool,
    /// TCP's urgent mark, this many bytes from the front: a peek from before it stops there.
    urgent_mark: Option<usize>,
}

impl Host for FakeHost {
    fn emit(&mut self, f: &[u8], _meta: TxMeta) {
        let t = &f[frame::ETH_LEN + frame::IP_LEN..];
        if f[frame::ETH_LEN + 9] == 6 {
            self.sent.push((
                u16::from_be_bytes([t[2], t[3]]) as usize,
                u32::from_be_bytes([t[4], t[5], t[6], t[7]]),
                t[13],
                u16::from_be_bytes([t[14], t[15]]),
            ));
        }
    }
    fn tcp_connect(&mut self, _: FlowId, _: SocketAddr) -> io::Result<()> {
        Ok(())
    }
    fn tcp_connect_result(&mut self, _: FlowId) -> io::Result<()> {
        self.connect_results += 1;
        match self.connect_error {
            Some(e) => Err(io::Error::from_raw_os_error(e)),
            None => Ok(()),
        }
    }
    fn tcp_send(&mut self, id: FlowId, data: &[u8]) -> io::Result<usize> {
        Ok(if self.refuse.contains(&id) {
            0
        } else {
            data.len()
        })
    }
    fn tcp_peek(&mut self, _: FlowId, buf: &mut [u8]) -> io::Result<Peek> {
        self.peeks += 1;
        if self.later {
            return Ok(Peek::Later);
        }
        if self.peeked == self.avail {
            return Ok(if self.eof {
                Peek::Eof
            } else {
                Peek::WouldBlock
            });
        }
        let end = match self.urgent_mark {
            Some(m) if m > self.peeked => m,
            _ => self.avail,
        };
        let n = buf.len().min(end - self.peeked);
        self.peeked += n;
        Ok(Peek::Data(n))
    }
    fn tcp_take(&mut self, _: FlowId, buf: &mut [u8]) -> io::Result<Peek> {
        assert_eq!(self.peeked, 0, "took with bytes peeked");
        self.takes += 1;
        if self.avail == 0 {
            return Ok(if self.eof {
                Peek::Eof
            } else {
                Peek::WouldBlock
            });
        }
        // A read that has read anything stops at the urgent mark.
        let end = match self.urgent_mark {
            Some(m) if m > 0 => m,
            _ => self.avail,
        };
        let n = buf.len().min(end);
        self.avail -= n;
        self.urgent_mark = self.urgent_mark.and_then(|m| m.checked_sub(n));
        Ok(Peek::Data(n))
    }
    fn tcp_consume(&mut self, _: FlowId, n: usize) {
        self.consumes += 1;
        self.avail -= n;
        // Bytes sent before a rewind may be acknowledged after it: the peek offset stops at
        // the front, as the kernel's does.
        self.peeked = self.peeked.saturating_sub(n);
        self.urgent_mark = self.urgent_mark.and_then(|m| m.checked_sub(n));
    }
    fn tcp_rewind(&mut self, _: FlowId) {
        self.peeked = 0;
    }
    fn tcp_shutdown(&mut self, _: FlowId) {}
    fn tcp_close(&mut self, _: FlowId, _: bool) {}
    fn udp_open(&mut self, _: FlowId, _: bool) -> io::Result<()> {
        Ok(())
    }
    fn udp_send(&mut self, _: FlowId, _: SocketAddr, _: &[u8]) -> io::Result<()> {
        Ok(())
    }
    fn udp_recv(&mut self, _: FlowId, _: &mut [u8]) -> io::Result<Option<(SocketAddr, usize)>> {
        Ok(None)
    }
    fn dgram_error(&mut self, _: FlowId) -> io::Result<Option<super::DgramError>> {
        Ok(None)
    }
    fn ping_open(&mut self, _: FlowId, _: bool) -> io::Result<()> {
        Ok(())
    }
    fn ping_send(&mut self, _: FlowId, _: IpAddr, _: &[u8]) -> io::Result<()> {
        Ok(())
    }
    fn ping_recv(&mut self, _: FlowId, _: &mut [u8]) -> io::Result<Option<(IpAddr, usize)>> {
        Ok(None)
    }
    fn dgram_close(&mut self, id: FlowId) {
        self.closed.push(id);
    }
    fn adopt(&mut self, _: FlowId) -> io::Result<()> {
        if self.adopt_ok {
            Ok(())
        } else {
            Err(io::ErrorKind::Unsupported.into())
        }
    }
}

/// A guest TCP segment from 10.0.2.100:40000 to 93.184.216.34:80, window 65535, no options.
fn guest_segment(seq: u32, ack: u32, flags: u8) -> Vec<u8> {
    tseg(40000, seq, ack, flags, &[])
}

/// A guest connection from 10.0.2.100:40000 whose host socket connected and holds 35 bytes: the
/// core has answered the guest's SYN (the SYN-ACK is the last frame sent). The core peeks at the
/// socket (these tests were written for peeks), never takes from it (`take_max` 0).
fn connected_with_35_bytes() -> (Core, FakeHost, Instant, RxMeta) {
    connected_with_35_bytes_and(|c| c.take_max = 0)
}

/// The same with the configuration `set` changes.
fn connected_with_35_bytes_and(set: impl FnOnce(&mut Config)) -> (Core, FakeHost, Instant, RxMeta) {
    connected_with(35, set)
}

/// The same with `avail` bytes waiting (none: the socket reports only the connect).
fn connected_with(
    avail: usize,
    set: impl FnOnce(&mut Config),
) -> (Core, FakeHost, Instant, RxMeta) {
    let mut cfg = Config::for_cidr("10.0.2.0/24".parse().unwrap()).unwrap();
    set(&mut cfg);
    let mut core = Core::new(cfg);
    let mut host = FakeHost {
        avail,
        ..FakeHost::default()
    };
    let now = Instant::now();
    let rx = RxMeta::default();
    core.on_frame(&mut host, &guest_segment(1000, 0, frame::SYN), rx, now);
    // Connected, with the bytes already there: the socket reports both.
    let connected = Ready {
        writable: true,
        readable: host.avail > 0,
        ..Ready::default()
    };
    core.on_ready(&mut host, 0, connected, now);
    (core, host, now, rx)
}

/// More than 255 duplicate ACKs for data in flight overflowed the flow's `u8` duplicate-ACK
/// counter (a panic with overflow checks; without them the counter wrapped and fast retransmit
/// fired again at the 259th). Found by the fuzzer; the guest sends only ACKs, so any guest can do
/// it. Now the counter saturates: one fast retransmit per run of duplicates.
#[test]
fn many_duplicate_acks_do_not_overflow() {
    let (mut core, mut host, now, rx) = connected_with_35_bytes();
    let &(_, iss, flags, _) = host.sent.last().expect("a SYN-ACK");
    assert_eq!(flags, frame::SYN | frame::ACK);
    // The ACK completes the handshake and the core sends the 35 bytes it has.
    let ack = guest_segment(1001, iss.wrapping_add(1), frame::ACK);
    core.on_frame(&mut host, &ack, rx, now);
    assert_eq!(host.peeked, 35);
    // The guest never acknowledges them: every later ACK is a duplicate.
    for _ in 0..300 {
        core.on_frame(&mut host, &ack, rx, now);
    }
    core.flush(&mut host, now);
    let stats = core.stats();
    assert_eq!(stats.tcp_fast_retransmit, 1);
    assert_eq!(stats.flows, 1);
}
// ---- Found by profiling: system calls per request ----

/// A small reply to a flow with nothing in flight is taken (read out of the socket) and held:
/// its acknowledgement then costs no consume, and the held bytes count as buffered until it
/// comes. A short take drains the socket as a short peek does.
#[test]
fn a_small_reply_is_taken_and_its_acknowledgement_costs_no_system_call() {
    // With offloads, a segment is not cut at the MSS: the whole 4,096 bytes fit in one take.
    let (mut core, mut host, now, rx) = connected_with_35_bytes_and(|c| c.offload = true);
    assert_eq!(
        Config::for_cidr("10.0.2.0/24".parse().unwrap())
            .unwrap()
            .take_max,
        4096
    );
    let &(_, iss, _, _) = host.sent.last().expect("a SYN-ACK");
    let ack = |n: u32| guest_segment(1001, iss.wrapping_add(1).wrapping_add(n), frame::ACK);
    core.on_frame(&mut host, &ack(0), rx, now);
    assert_eq!((host.takes, host.peeks, host.avail), (1, 0, 0), "one take");
    assert_eq!(core.stats().buffered, 35, "held until acknowledged");
    core.on_frame(&mut host, &ack(35), rx, now);
    assert_eq!(
        (host.takes, host.peeks, host.consumes),
        (1, 0, 0),
        "no call"
    );
    assert_eq!(core.stats().buffered, 0);
    // More than `take_max`: the first 4,096 bytes are taken, the rest peeked.
    host.avail = 5000;
    let readable = Ready::READABLE;
    core.on_ready(&mut host, 0, readable, now);
    assert_eq!((host.takes, host.peeks), (2, 1));
    assert_eq!((host.avail, host.peeked), (904, 904));
    assert_eq!(core.stats().buffered, 4096);
    // An acknowledgement past the held bytes consumes only the socket's part.
    core.on_frame(&mut host, &ack(35 + 5000), rx, now);
    assert_eq!(
        (host.consumes, host.avail, core.stats().buffered),
        (1, 0, 0)
    );
}

// ---- Found by profiling: a connect's outcome asked for only when it has one ----

/// A connecting socket's outcome is asked for (SO_ERROR) only once the socket reports
/// writability or an error, when connect(2) says it is known: other readiness leaves the flow
/// connecting, and the driver needs no getpeername to tell "still connecting".
#[test]
fn a_connect_is_asked_for_its_outcome_only_when_writable_or_failed() {
    let cfg = Config::for_cidr("10.0.2.0/24".parse().unwrap()).unwrap();
    let mut core = Core::new(cfg);
    let mut host = FakeHost::default();
    let now = Instant::now();
    let rx = RxMeta::default();
    core.on_frame(&mut host, &guest_segment(1000, 0, frame::SYN), rx, now);
    let readable = Ready {
        readable: true,
        hup: true,
        ..Ready::default()
    };
    core.on_ready(&mut host, 0, readable, now);
    assert_eq!(
        (host.connect_results, host.sent.len()),
        (0, 0),
        "still connecting"
    );
    let writable = Ready::WRITABLE;
    core.on_ready(&mut host, 0, writable, now);
    assert_eq!(host.connect_results, 1);
    let &(_, _, flags, _) = host.sent.last().expect("a SYN-ACK");
    assert_eq!(flags, frame::SYN | frame::ACK);
    // A refused connect reports an error alone (no writability): asked, and the guest reset.
    let mut core = Core::new(Config::for_cidr("10.0.2.0/24".parse().unwrap()).unwrap());
    let mut host = FakeHost {
        connect_error: Some(libc::ECONNREFUSED),
        ..FakeHost::default()
    };
    core.on_frame(&mut host, &guest_segment(1000, 0, frame::SYN), rx, now);
    let failed = Ready {
        error: true,
        ..Ready::default()
    };
    core.on_ready(&mut host, 0, failed, now);
    assert_eq!(host.connect_results, 1);
    let &(_, _, flags, _) = host.sent.last().expect("a RST");
    assert_eq!(flags, frame::RST | frame::ACK);
}

// ---- Found by profiling: a read to hear the end of a stream whose end was reported ----

/// After the peer's close was reported, a read that stops short has reached the end of the
/// stream (the FIN comes after all the peer's data): the core sends its FIN at once instead of
/// reading again for the end. Not with an error reported (a reset: the flow reads on to it) nor
/// with urgent data (a read also stops at the mark).
#[test]
fn a_short_read_after_the_peers_close_ends_the_stream_without_another_read() {
    // (error, urgent, take_max, reads): with urgent data the mark is 20 bytes in, and the flow
    // reads on past it to the end; every case must send all 35 bytes before its FIN.
    let cases = [
        (false, false, 0, 1),
        (true, false, 0, 2),
        (false, true, 0, 3),
        (false, false, 4096, 1),
        (true, false, 4096, 2),
        (false, true, 4096, 3),
    ];
    for (error, urgent, take_max, reads) in cases {
        let (mut core, mut host, now, rx) = connected_with(35, |c| c.take_max = take_max);
        host.eof = true;
        if urgent {
            host.urgent_mark = Some(20);
        }
        let closed = Ready {
            readable: true,
            hup: true,
            error,
            urgent,
            ..Ready::default()
        };
        core.on_ready(&mut host, 0, closed, now);
        let &(_, iss, _, _) = host.sent.last().expect("a SYN-ACK");
        let ack = guest_segment(1001, iss.wrapping_add(1), frame::ACK);
        core.on_frame(&mut host, &ack, rx, now);
        let what = format!("error {error}, urgent {urgent}, take_max {take_max}");
        assert_eq!(host.peeks + host.takes, reads, "{what}");
        let &(_, seq, flags, _) = host.sent.last().expect("a FIN");
        assert_eq!(flags, frame::FIN | frame::ACK, "{what}");
        assert_eq!(
            seq,
            iss.wrapping_add(1 + 35),
            "{what}: the FIN after the 35 bytes"
        );
    }
}

// ---- Found by profiling: peeks that could only say EAGAIN ----

/// A new flow reads its socket only once the socket has reported data: the handshake with the
/// guest makes no read that could only say EAGAIN (a client of a published port is accepted
/// before its request arrives, as a rule).
#[test]
fn a_new_flow_reads_nothing_until_its_socket_reports_data() {
    // Bytes reported with the connect are read at the handshake; with none, nothing is read.
    for (avail, reads) in [(35, 1), (0, 0)] {
        let (mut core, mut host, now, rx) = connected_with(avail, |c| c.take_max = 0);
        let &(_, iss, _, _) = host.sent.last().expect("a SYN-ACK");
        let ack = guest_segment(1001, iss.wrapping_add(1), frame::ACK);
        core.on_frame(&mut host, &ack, rx, now);
        assert_eq!(host.peeks, reads, "{avail} bytes reported with the connect");
        if avail == 0 {
            // Until the socket reports data.
            host.avail = 10;
            let readable = Ready::READABLE;
            core.on_ready(&mut host, 0, readable, now);
            assert_eq!((host.peeks, host.peeked), (1, 10));
        }
    }
}

/// Once a peek has found the socket drained (EAGAIN, or fewer bytes than it had room for), the
/// core peeks again only when the socket reports data (the driver's readiness is edge-triggered:
/// every arrival reports), not on every ACK from the guest nor at its FIN. Exceptions:
/// `Peek::Later` (nothing peekable now, though data may wait) leaves the next ACK to try again,
/// and a flow whose socket has reported urgent data is never marked drained (a peek stops at the
/// urgent mark with more queued behind it, and the peek without `SO_PEEK_OFF` then says
/// EAGAIN), so it peeks at every ACK.
#[test]
fn a_drained_socket_is_peeked_again_only_when_it_reports_data() {
    let (mut core, mut host, now, rx) = connected_with_35_bytes();
    let &(_, iss, _, _) = host.sent.last().expect("a SYN-ACK");
    let ack = |seq: u32, n: u32, flags: u8| {
        guest_segment(seq, iss.wrapping_add(1).wrapping_add(n), frame::ACK | flags)
    };
    // Each step: what the core is handed, then the host's (bytes peeked, peeks made).
    let frame_then = |core: &mut Core, host: &mut FakeHost, f: Vec<u8>| {
        core.on_frame(host, &f, rx, now);
        (host.peeked, host.peeks)
    };
    let ready_then = |core: &mut Core, host: &mut FakeHost, urgent: bool| {
        let ready = Ready {
            readable: true,
            urgent,
            ..Ready::default()
        };
        core.on_ready(host, 0, ready, now);
        (host.peeked, host.peeks)
    };
    let (c, h) = (&mut core, &mut host);
    assert_eq!(
        frame_then(c, h, ack(1001, 0, 0)),
        (35, 1),
        "one short peek sends all"
    );
    // The short peek drained the socket: the ACK of the 35 bytes, and another, make no peek.
    assert_eq!(
        frame_then(c, h, ack(1001, 35, 0)).1,
        1,
        "no peek after a short one"
    );
    assert_eq!(
        frame_then(c, h, ack(1001, 35, 0)).1,
        1,
        "nor without a report of data"
    );
    // Data arrives and is reported: peeked and sent.
    h.avail += 10;
    assert_eq!(ready_then(c, h, false), (10, 2));
    // A peek that says Later leaves the flow ready to peek at the next ACK.
    h.avail += 10;
    h.later = true;
    assert_eq!(ready_then(c, h, false), (10, 3), "Later sends nothing");
    h.later = false;
    assert_eq!(
        frame_then(c, h, ack(1001, 45, 0)),
        (10, 4),
        "the ACK sent the 10 new bytes"
    );
    // The guest's FIN makes no read: a close of the peer's reports when it comes.
    assert_eq!(
        frame_then(c, h, ack(1001, 45, frame::FIN)).1,
        4,
        "no read at the FIN"
    );
    // Urgent data: 20 more bytes, the mark 5 bytes in. The peek stops at the mark; the flow is
    // not drained, so the next ACK peeks on past the mark, and every later ACK looks again,
    // EAGAIN or not.
    h.avail += 20;
    h.urgent_mark = Some(15);
    assert_eq!(ready_then(c, h, true), (15, 5), "stopped at the mark");
    assert_eq!(
        frame_then(c, h, ack(1002, 60, 0)),
        (15, 6),
        "the rest after the mark"
    );
    assert_eq!(frame_then(c, h, ack(1002, 75, 0)).1, 7, "EAGAIN");
    assert_eq!(
        frame_then(c, h, ack(1002, 75, 0)).1,
        8,
        "an urgent flow looks at every ACK"
    );
    let data_frames = host.sent.iter().filter(|s| s.2 & frame::PSH != 0).count();
    assert_eq!(data_frames, 5);
}

// ---- Found by review: a published UDP port expiring, a zero window that never reopened ----
fn ip_frame(proto: u8, dst: Ipv4Addr, l4: &[u8]) -> Vec<u8> {
    let src = Ipv4Addr::new(10, 0, 2, 100);
    let mut f = Vec::new();
    f.extend_from_slice(&GATEWAY_MAC);
    f.extend_from_slice(&GUEST_MAC);
    f.extend_from_slice(&[0x08, 0x00]);
    let mut ip = [0u8; 20];
    ip[0] = 0x45;
    ip[2..4].copy_from_slice(&((20 + l4.len()) as u16).to_be_bytes());
    ip[8] = 64;
    ip[9] = proto;
    ip[12..16].copy_from_slice(&src.octets());
    ip[16..20].copy_from_slice(&dst.octets());
    let sum = csum::finish(csum::add(0, &ip));
    ip[10..12].copy_from_slice(&sum.to_be_bytes());
    f.extend_from_slice(&ip);
    f.extend_from_slice(l4);
    f
}
fn tseg(sport: u16, seq: u32, ack: u32, flags: u8, payload: &[u8]) -> Vec<u8> {
    let mut t = vec![0u8; 20];
    t[0..2].copy_from_slice(&sport.to_be_bytes());
    t[2..4].copy_from_slice(&80u16.to_be_bytes());
    t[4..8].copy_from_slice(&seq.to_be_bytes());
    t[8..12].copy_from_slice(&ack.to_be_bytes());
    t[12] = 5 << 4;
    t[13] = flags;
    t[14..16].copy_from_slice(&65535u16.to_be_bytes());
    t.extend_from_slice(payload);
    let (src, dst) = (
        Ipv4Addr::new(10, 0, 2, 100),
        Ipv4Addr::new(93, 184, 216, 34),
    );
    let sum = csum::finish(csum::add(
        csum::pseudo(src.into(), dst.into(), 6, t.len()),
        &t,
    ));
    t[16..18].copy_from_slice(&sum.to_be_bytes());
    ip_frame(6, dst, &t)
}
fn useg(sport: u16, dst: SocketAddrV4, payload: &[u8]) -> Vec<u8> {
    let mut u = vec![0u8; 8];
    u[0..2].copy_from_slice(&sport.to_be_bytes());
    u[2..4].copy_from_slice(&dst.port().to_be_bytes());
    u[4..6].copy_from_slice(&((8 + payload.len()) as u16).to_be_bytes());
    u.extend_from_slice(payload);
    ip_frame(17, *dst.ip(), &u)
}

#[test]
fn a_published_udp_port_does_not_expire_after_the_guest_answers() {
    let cfg = Config::for_cidr("10.0.2.0/24".parse().unwrap()).unwrap();
    let mut core = Core::new(cfg);
    let mut host = FakeHost {
        adopt_ok: true,
        ..FakeHost::default()
    };
    let t0 = Instant::now();
    let rx = RX;
    let pid = core
        .udp_publish(&mut host, 5353, false, t0)
        .expect("published");
    // The guest answers a client from its published port; and some other UDP flow exists.
    let client = SocketAddrV4::new(Ipv4Addr::new(203, 0, 113, 2), 4444);
    core.on_frame(&mut host, &useg(5353, client, b"reply"), rx, t0);
    core.on_frame(
        &mut host,
        &useg(7000, SocketAddrV4::new(Ipv4Addr::new(8, 8, 8, 8), 53), b"q"),
        rx,
        t0,
    );
    let mut t = t0;
    for _ in 0..70 {
        t += std::time::Duration::from_secs(1);
        core.on_timer(&mut host, t);
    }
    assert!(
        !host.closed.contains(&pid),
        "published UDP socket {pid} closed by the idle sweep: {:?}",
        host.closed
    );
}

/// Two established flows, A (port 40000, id 0) and B (port 40001, id 1), under a global queue
/// cap of 1000 bytes: rnat's ISNs for them.
fn two_flows() -> (Core, FakeHost, [u32; 2], Instant) {
    let mut cfg = Config::for_cidr("10.0.2.0/24".parse().unwrap()).unwrap();
    cfg.max_buffered = 1000;
    let mut core = Core::new(cfg);
    let mut host = FakeHost::default();
    let t0 = Instant::now();
    let rx = RX;
    let w = Ready::WRITABLE;
    let mut iss = [0u32; 2];
    for (i, port) in [40000u16, 40001].into_iter().enumerate() {
        core.on_frame(&mut host, &tseg(port, 1000, 0, frame::SYN, &[]), rx, t0);
        core.on_ready(&mut host, i, w, t0);
        iss[i] = host
            .sent
            .iter()
            .rev()
            .find(|s| s.0 == port as usize)
            .unwrap()
            .1;
        core.on_frame(
            &mut host,
            &tseg(port, 1001, iss[i].wrapping_add(1), frame::ACK, &[]),
            rx,
            t0,
        );
    }
    (core, host, iss, t0)
}

/// A's host socket refuses: 2000 bytes of A's queue, and the global cap is reached.
fn a_fills_the_cap(core: &mut Core, host: &mut FakeHost, iss: [u32; 2], t0: Instant) {
    host.refuse.push(0);
    core.on_frame(
        host,
        &tseg(40000, 1001, iss[0] + 1, frame::ACK, &[7u8; 2000]),
        RX,
        t0,
    );
}

/// `two_flows` with the global queue cap reached by A's refused data and B told window 0.
fn two_flows_at_the_cap() -> (Core, FakeHost, [u32; 2], Instant) {
    let (mut core, mut host, iss, t0) = two_flows();
    let rx = RX;
    a_fills_the_cap(&mut core, &mut host, iss, t0);
    core.flush(&mut host, t0);
    // B sends while at the cap: nothing accepted, ACK with window 0.
    core.on_frame(
        &mut host,
        &tseg(40001, 1001, iss[1] + 1, frame::ACK, &[8u8; 100]),
        rx,
        t0,
    );
    core.flush(&mut host, t0);
    assert_eq!(
        host.sent.iter().rev().find(|s| s.0 == 40001).unwrap().3,
        0,
        "B told window 0"
    );
    (core, host, iss, t0)
}

#[test]
fn a_zero_window_probe_is_answered_so_the_window_reopens() {
    let (mut core, mut host, iss, t0) = two_flows_at_the_cap();
    let rx = RX;
    let w = Ready::WRITABLE;
    // A drains: the cap is lifted.
    host.refuse.clear();
    core.on_ready(&mut host, 0, w, t0);
    core.flush(&mut host, t0);
    assert_eq!(core.stats().buffered, 0);
    let before = host.sent.len();
    // B's zero-window probe (seq = rcv_nxt - 1, no data).
    core.on_frame(
        &mut host,
        &tseg(40001, 1000, iss[1] + 1, frame::ACK, &[]),
        rx,
        t0,
    );
    core.flush(&mut host, t0);
    core.on_timer(&mut host, t0 + std::time::Duration::from_secs(5));
    let b_after: Vec<_> = host.sent[before..]
        .iter()
        .filter(|s| s.0 == 40001)
        .collect();
    assert!(
        !b_after.is_empty(),
        "B never learns its window reopened; frames after: {:?}",
        &host.sent[before..]
    );
}

#[test]
fn windows_shut_by_the_global_cap_reopen_when_it_lifts() {
    // Without a probe: lifting the cap itself sends the window update.
    let (mut core, mut host, _, t0) = two_flows_at_the_cap();
    let w = Ready::WRITABLE;
    host.refuse.clear();
    core.on_ready(&mut host, 0, w, t0);
    flush_and_expect_b_open(&mut core, &mut host, t0);
}

/// Ends the batch, in which the global cap lifted: B (port 40001) must hear of its window.
fn flush_and_expect_b_open(core: &mut Core, host: &mut FakeHost, t0: Instant) {
    let before = host.sent.len();
    core.flush(host, t0);
    let b_open = host.sent[before..].iter().any(|s| s.0 == 40001 && s.3 > 0);
    assert!(
        b_open,
        "B gets a window update when the cap lifts: {:?}",
        &host.sent[before..]
    );
}

#[test]
fn a_window_the_cap_shut_reopens_though_the_cap_lifted_between_batches() {
    // The cap is reached and lifted within one batch, with no `flush` seeing it: B is told a
    // shut window on a data segment meanwhile, and still hears when the cap lifts.
    let (mut core, mut host, iss, t0) = two_flows();
    let w = Ready::WRITABLE;
    core.flush(&mut host, t0);
    a_fills_the_cap(&mut core, &mut host, iss, t0); // no flush yet
                                                    // B's server sends: the segment to the guest carries window 0.
    host.avail = 100;
    core.on_ready(&mut host, 1, Ready::READABLE, t0);
    let b_data = host.sent.iter().rev().find(|s| s.0 == 40001).unwrap();
    assert_eq!(b_data.3, 0, "B's segment tells window 0: {b_data:?}");
    // A drains before the batch ends: the cap lifts.
    host.refuse.clear();
    core.on_ready(&mut host, 0, w, t0);
    assert_eq!(core.stats().buffered, 0);
    flush_and_expect_b_open(&mut core, &mut host, t0);
}

#[test]
fn a_syn_with_rst_opens_nothing() {
    let cfg = Config::for_cidr("10.0.2.0/24".parse().unwrap()).unwrap();
    let mut core = Core::new(cfg);
    let mut host = FakeHost::default();
    let t0 = Instant::now();
    let rx = RX;
    core.on_frame(
        &mut host,
        &tseg(40000, 1000, 0, frame::SYN | frame::RST, &[]),
        rx,
        t0,
    );
    assert_eq!((core.stats().tcp_opened, core.stats().flows), (0, 0));
    assert!(host.sent.is_empty(), "an RST is not answered");
    // The same without RST opens a flow (the frame itself is fine).
    core.on_frame(&mut host, &tseg(40000, 1000, 0, frame::SYN, &[]), rx, t0);
    assert_eq!(core.stats().tcp_opened, 1);
}
