//! The core on a simulated network (see `sim`): smoltcp's TCP as the guest, an in-memory host,
//! a lossy wire, injected time.

use std::net::{IpAddr, Ipv4Addr, SocketAddr, SocketAddrV4};

use smoltcp::socket::tcp;
use smoltcp::wire::{EthernetAddress, EthernetFrame, IpProtocol, Ipv4Packet, TcpPacket, UdpPacket};

use super::frame::{self, Macs, TcpHeader, ACK, FIN, RST, SYN};
use super::host::Host;
use super::sim::{Impair, Outcome, Sim, SimHost, GUEST_MAC, SERVER, SERVER6};
use super::tcp::Verdict;
use super::{Config, Core, DgramError, Ready, RxMeta, Unreachable, GATEWAY_MAC};

fn cfg() -> Config {
    let mut c = Config::for_cidr("10.0.2.0/24".parse().expect("cidr")).expect("config");
    c.mtu = 1500;
    c.resolvers = vec![Ipv4Addr::new(192, 0, 2, 53).into()];
    c
}

fn pattern(n: usize, seed: u8) -> Vec<u8> {
    (0..n)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed) ^ (i >> 8) as u8)
        .collect()
}

fn guest_socket(
    sim: &mut Sim,
    rx: usize,
    tx: usize,
    port: u16,
    local: u16,
) -> smoltcp::iface::SocketHandle {
    guest_socket_to(sim, SERVER.into(), rx, tx, port, local)
}

fn guest_socket_to(
    sim: &mut Sim,
    server: IpAddr,
    rx: usize,
    tx: usize,
    port: u16,
    local: u16,
) -> smoltcp::iface::SocketHandle {
    let s = tcp::Socket::new(
        tcp::SocketBuffer::new(vec![0; rx]),
        tcp::SocketBuffer::new(vec![0; tx]),
    );
    let h = sim.sockets.add(s);
    let s = sim.sockets.get_mut::<tcp::Socket>(h);
    s.connect(sim.iface.context(), (server, port), local)
        .expect("connect");
    h
}

fn server(sim: &mut Sim, port: u16) -> Option<&mut super::sim::SimSock> {
    sim.host
        .by_dst(SocketAddrV4::new(SERVER, port))
        .map(|(_, s)| s)
}

/// Moves `up` from the guest and `down` to it at once, the server closing after its part and
/// the guest after its own; checks every byte and that the flow is gone at the end.
fn transfer(impair: Impair, n: usize, server_read: Option<usize>) {
    transfer_to(SERVER.into(), impair, n, server_read)
}

fn transfer_to(server_ip: IpAddr, impair: Impair, n: usize, server_read: Option<usize>) {
    let mut c = cfg();
    if server_ip.is_ipv6() {
        c.ipv6 = Some(super::Ipv6Config::slirp());
    }
    let mut sim = Sim::new(c);
    sim.impair = impair;
    sim.server_read = server_read;
    let h = guest_socket_to(&mut sim, server_ip, 256 << 10, 256 << 10, 5001, 40000);
    fn server(sim: &mut Sim, ip: IpAddr, port: u16) -> Option<&mut super::sim::SimSock> {
        sim.host.by_dst(SocketAddr::new(ip, port)).map(|(_, s)| s)
    }
    let (up, down) = (pattern(n, 1), pattern(n, 2));
    let (mut sent, mut got) = (0usize, Vec::new());
    let mut fed = false;
    let done = sim.run_until(120_000, |sim| {
        if !fed {
            if let Some(s) = server(sim, server_ip, 5001) {
                s.rx.extend_from_slice(&down);
                s.eof = true;
                fed = true;
            }
        }
        let s = sim.sockets.get_mut::<tcp::Socket>(h);
        if s.can_send() && sent < up.len() {
            sent += s.send_slice(&up[sent..]).expect("send");
            if sent == up.len() {
                s.close();
            }
        }
        while s.can_recv() {
            let mut buf = [0u8; 8192];
            let k = s.recv_slice(&mut buf).expect("recv");
            got.extend_from_slice(&buf[..k]);
        }
        got.len() == down.len() && sim.core.flow_count() == 0
    });
    let stats = sim.core.stats();
    assert!(
        done,
        "transfer did not finish: got {} of {} down; stats {stats:?}",
        got.len(),
        down.len()
    );
    assert!(got == down, "bytes to the guest differ");
    let s = sim
        .host
        .socks
        .values()
        .find(|s| s.dst.is_some())
        .expect("host socket");
    assert!(
        s.received == up,
        "bytes to the server differ ({} of {})",
        s.received.len(),
        up.len()
    );
    assert!(
        s.shut_wr && s.closed && !s.reset,
        "host socket shut down and closed cleanly"
    );
    assert_eq!(stats.buffered, 0);
    if impair.loss > 0 {
        assert!(
            stats.tcp_out_of_order + stats.tcp_timeout_retransmit + stats.tcp_fast_retransmit > 0,
            "loss was exercised"
        );
    }
}

#[test]
fn bulk_both_ways() {
    transfer(Impair::default(), 400_000, None);
}

#[test]
fn bulk_both_ways_over_loss_duplication_and_reordering() {
    transfer(
        Impair {
            loss: 20,
            dup: 20,
            reorder: 30,
        },
        150_000,
        None,
    );
}

/// Request/response over a lossy wire: each reply is taken out of the host socket (read, not
/// peeked) while nothing is in flight, and held until acknowledged. Replies of one segment or
/// less are taken whole and never peeked, so every retransmission of them comes from rnat's copy;
/// larger ones are taken in part and peeked for the rest. Every byte arrives in order, and
/// nothing stays held.
#[test]
fn replies_are_taken_and_resent_from_rnats_copy_over_loss() {
    // One segment or less (the guest's MSS is 1,460): taken whole.
    let (s, stats) = request_response(&[1, 40, 838, 1460]);
    assert_eq!(s.takes, 30, "one take per reply");
    assert_eq!(s.peeked, 0, "no byte peeked");
    assert!(
        stats.tcp_timeout_retransmit + stats.tcp_fast_retransmit > 0,
        "resent (from the copy): {stats:?}"
    );
    // Larger, and more than `take_max`: a take each, then peeks.
    let (s, _) = request_response(&[4095, 4096, 4097, 9000]);
    assert!(s.takes >= 30, "a take per reply at least: {}", s.takes);
    assert!(s.peeked > 0, "and peeks for the rest");
}

/// 30 rounds of a 40-byte request and a reply of `sizes[round % len]` bytes over 15 % loss,
/// 10 % duplication and 15 % reordering; checks every byte both ways and that the flow ends
/// with nothing buffered. Returns the host socket and the core's counters.
fn request_response(sizes: &[usize]) -> (super::sim::SimSock, super::Stats) {
    let mut sim = Sim::new(cfg());
    sim.impair = Impair {
        loss: 150,
        dup: 100,
        reorder: 150,
    };
    let h = guest_socket(&mut sim, 64 << 10, 64 << 10, 8080, 40000);
    const ROUNDS: usize = 30;
    let (mut round, mut asked, mut answered) = (0usize, false, false);
    let (mut want_up, mut want_down, mut got) = (Vec::new(), Vec::new(), Vec::new());
    let done = sim.run_until(600_000, |sim| {
        if round < ROUNDS {
            let request = pattern(40, round as u8);
            let s = sim.sockets.get_mut::<tcp::Socket>(h);
            if !asked && s.can_send() {
                assert_eq!(s.send_slice(&request).expect("send"), 40);
                want_up.extend_from_slice(&request);
                asked = true;
            }
            let heard = server(sim, 8080).is_some_and(|s| s.received.len() == want_up.len());
            if asked && !answered && heard {
                let reply = pattern(sizes[round % sizes.len()], 100 + round as u8);
                want_down.extend_from_slice(&reply);
                server(sim, 8080)
                    .expect("server")
                    .rx
                    .extend_from_slice(&reply);
                answered = true;
            }
            let s = sim.sockets.get_mut::<tcp::Socket>(h);
            while s.can_recv() {
                let mut buf = [0u8; 4096];
                let k = s.recv_slice(&mut buf).expect("recv");
                got.extend_from_slice(&buf[..k]);
            }
            if answered && got.len() == want_down.len() {
                (round, asked, answered) = (round + 1, false, false);
                if round == ROUNDS {
                    sim.sockets.get_mut::<tcp::Socket>(h).close();
                    server(sim, 8080).expect("server").eof = true;
                }
            }
            return false;
        }
        sim.core.flow_count() == 0
    });
    let stats = sim.core.stats();
    assert!(
        done,
        "round {round} of {ROUNDS} unfinished; stats {stats:?}"
    );
    assert!(got == want_down, "replies to the guest differ");
    let id = sim
        .host
        .socks
        .iter()
        .find(|(_, s)| s.dst.is_some())
        .map(|(id, _)| *id);
    let s = sim
        .host
        .socks
        .remove(&id.expect("host socket"))
        .expect("host socket");
    assert!(s.received == want_up, "requests to the server differ");
    assert_eq!(stats.buffered, 0, "nothing held at the end");
    (s, stats)
}

#[test]
fn slow_server_backpressure_bounds_the_queue() {
    // The server reads 2 KB a millisecond; the guest's data waits in the window, not in memory.
    let mut c = cfg();
    c.flow_window = 32 << 10;
    let mut sim = Sim::new(c);
    sim.host.sock_cap = 8 << 10;
    sim.server_read = Some(2048);
    let h = guest_socket(&mut sim, 64 << 10, 256 << 10, 5002, 40001);
    let up = pattern(200_000, 3);
    let mut sent = 0;
    let mut max_buffered = 0;
    let done = sim.run_until(60_000, |sim| {
        let s = sim.sockets.get_mut::<tcp::Socket>(h);
        if s.can_send() && sent < up.len() {
            sent += s.send_slice(&up[sent..]).expect("send");
        }
        max_buffered = max_buffered.max(sim.core.stats().buffered);
        server(sim, 5002).is_some_and(|s| s.received.len() == up.len())
    });
    assert!(done);
    assert!(server(&mut sim, 5002).expect("sock").received == up);
    assert!(
        max_buffered <= 32 << 10,
        "queued {max_buffered} bytes, more than the window"
    );
}

#[test]
fn zero_window_guest_stalls_then_catches_up() {
    let mut sim = Sim::new(cfg());
    let h = guest_socket(&mut sim, 4096, 4096, 5003, 40002);
    let down = pattern(100_000, 4);
    assert!(sim.run_until(2000, |sim| server(sim, 5003).is_some()));
    server(&mut sim, 5003)
        .expect("sock")
        .rx
        .extend_from_slice(&down);
    // The guest reads nothing for five simulated seconds.
    sim.run_until(5000, |_| false);
    let stalled = sim.core.stats().tcp_bytes_to_guest;
    assert!(
        stalled <= 4096 * 2,
        "sent {stalled} bytes into a 4 KB window"
    );
    let mut got = Vec::new();
    let done = sim.run_until(60_000, |sim| {
        let s = sim.sockets.get_mut::<tcp::Socket>(h);
        while s.can_recv() {
            let mut buf = [0u8; 1024];
            let k = s.recv_slice(&mut buf).expect("recv");
            got.extend_from_slice(&buf[..k]);
        }
        got.len() == down.len()
    });
    assert!(done, "got {} of {}", got.len(), down.len());
    assert!(got == down);
}

#[test]
fn refused_connect_resets_the_guest_at_once() {
    let mut sim = Sim::new(cfg());
    sim.host.outcome = Box::new(|_| Outcome::Refuse);
    let h = guest_socket(&mut sim, 4096, 4096, 9, 40003);
    let closed = sim.run_until(100, |sim| {
        sim.sockets.get::<tcp::Socket>(h).state() == tcp::State::Closed
    });
    assert!(
        closed,
        "state {:?}",
        sim.sockets.get::<tcp::Socket>(h).state()
    );
    assert_eq!(sim.core.stats().tcp_connect_failed, 1);
    assert_eq!(sim.core.flow_count(), 0);
}

/// The ICMP messages emitted, as (type, code, quoted TCP source port).
fn icmp_errors(host: &SimHost) -> Vec<(u8, u8, u16)> {
    host.log
        .iter()
        .filter_map(|f| {
            let eth = EthernetFrame::new_checked(&f[..]).ok()?;
            let ip = Ipv4Packet::new_checked(eth.payload()).ok()?;
            if ip.next_header() != IpProtocol::Icmp {
                return None;
            }
            let m = ip.payload();
            // The quote holds the IP header and 8 bytes of TCP, less than its total length says.
            let quoted = m.get(8..)?;
            let q = quoted.get(usize::from(quoted.first()? & 0x0f) * 4..)?;
            Some((m[0], m[1], u16::from_be_bytes([q[0], q[1]])))
        })
        .collect()
}

#[test]
fn unreachable_destination_gets_icmp_quoting_the_syn() {
    let mut sim = Sim::new(cfg());
    sim.host.log_frames = true;
    sim.host.outcome = Box::new(|_| Outcome::Unreachable);
    guest_socket(&mut sim, 4096, 4096, 80, 40004);
    let failed = sim.run_until(100, |sim| sim.core.stats().tcp_connect_failed == 1);
    assert!(
        failed,
        "{:?} frames {}",
        sim.core.stats(),
        sim.host.log.len()
    );
    assert_eq!(icmp_errors(&sim.host), vec![(3, 1, 40004)]);
    // A connect that fails at once (no route) is reported the same way.
    let mut sim = Sim::new(cfg());
    sim.host.log_frames = true;
    sim.host.outcome = Box::new(|_| Outcome::FailNow(libc::ENETUNREACH));
    guest_socket(&mut sim, 4096, 4096, 80, 40005);
    sim.run_until(100, |sim| sim.core.stats().tcp_connect_failed == 1);
    assert_eq!(icmp_errors(&sim.host), vec![(3, 0, 40005)]);
    assert_eq!(sim.core.flow_count(), 0);
}

#[test]
fn server_reset_mid_stream_resets_the_guest() {
    let mut sim = Sim::new(cfg());
    let h = guest_socket(&mut sim, 65536, 65536, 5004, 40006);
    assert!(
        sim.run_until(2000, |sim| sim.sockets.get::<tcp::Socket>(h).state()
            == tcp::State::Established)
    );
    server(&mut sim, 5004)
        .expect("sock")
        .rx
        .extend_from_slice(b"partial");
    sim.run_until(50, |_| false);
    server(&mut sim, 5004).expect("sock").err = Some(libc::ECONNRESET);
    let closed = sim.run_until(1000, |sim| {
        sim.sockets.get::<tcp::Socket>(h).state() == tcp::State::Closed
    });
    assert!(closed);
    assert_eq!(sim.core.flow_count(), 0);
    assert_eq!(sim.core.stats().tcp_reset, 1);
}

#[test]
fn guest_abort_resets_the_host_socket() {
    let mut sim = Sim::new(cfg());
    let h = guest_socket(&mut sim, 65536, 65536, 5005, 40007);
    assert!(
        sim.run_until(2000, |sim| sim.sockets.get::<tcp::Socket>(h).state()
            == tcp::State::Established)
    );
    sim.sockets.get_mut::<tcp::Socket>(h).abort();
    assert!(sim.run_until(100, |sim| sim.core.flow_count() == 0));
    let s = sim.host.socks.values().next().expect("sock");
    assert!(s.closed && s.reset);
}

#[test]
fn half_close_carries_data_after_the_guests_fin() {
    let mut sim = Sim::new(cfg());
    let h = guest_socket(&mut sim, 256 << 10, 4096, 5006, 40008);
    assert!(
        sim.run_until(2000, |sim| sim.sockets.get::<tcp::Socket>(h).state()
            == tcp::State::Established)
    );
    let s = sim.sockets.get_mut::<tcp::Socket>(h);
    s.send_slice(b"GET /").expect("send");
    s.close();
    assert!(sim.run_until(2000, |sim| server(sim, 5006).is_some_and(|s| s.shut_wr)));
    assert_eq!(server(&mut sim, 5006).expect("sock").received, b"GET /");
    // The server answers after the guest's FIN, then closes.
    let down = pattern(50_000, 5);
    let srv = server(&mut sim, 5006).expect("sock");
    srv.rx.extend_from_slice(&down);
    srv.eof = true;
    let mut got = Vec::new();
    let done = sim.run_until(30_000, |sim| {
        let s = sim.sockets.get_mut::<tcp::Socket>(h);
        while s.can_recv() {
            let mut buf = [0u8; 4096];
            let k = s.recv_slice(&mut buf).expect("recv");
            got.extend_from_slice(&buf[..k]);
        }
        got.len() == down.len() && sim.core.flow_count() == 0
    });
    assert!(
        done,
        "got {} of {}, flows {}",
        got.len(),
        down.len(),
        sim.core.flow_count()
    );
    assert!(got == down);
}

// ---- Raw-frame guest: for thousands of flows, and for what smoltcp cannot send. ----

const GUEST: Ipv4Addr = Ipv4Addr::new(10, 0, 2, 100);

fn guest_macs() -> Macs {
    // frame::tcp writes "ours" as the source: here the guest is the sender.
    Macs {
        ours: EthernetAddress(GUEST_MAC),
        guest: EthernetAddress(GATEWAY_MAC),
    }
}

fn guest_tcp(
    sport: u16,
    dst: SocketAddrV4,
    seq: u32,
    ack: u32,
    flags: u8,
    payload: &[u8],
    options: &[u8],
) -> Vec<u8> {
    let mut buf = vec![0u8; frame::MAX_FRAME];
    let at = frame::TCP_PAYLOAD_AT + options.len();
    buf[at..at + payload.len()].copy_from_slice(payload);
    let h = TcpHeader {
        src: SocketAddrV4::new(GUEST, sport).into(),
        dst: dst.into(),
        seq,
        ack,
        flags,
        window: 65535,
        options,
    };
    let (len, _) = frame::tcp(&mut buf, guest_macs(), &h, payload.len(), 1, false);
    buf.truncate(len);
    buf
}

fn guest_udp(sport: u16, dst: SocketAddrV4, payload: &[u8]) -> Vec<u8> {
    let mut buf = vec![0u8; frame::MAX_FRAME];
    buf[frame::UDP_PAYLOAD_AT..frame::UDP_PAYLOAD_AT + payload.len()].copy_from_slice(payload);
    let (len, _) = frame::udp(
        &mut buf,
        guest_macs(),
        SocketAddrV4::new(GUEST, sport).into(),
        dst.into(),
        payload.len(),
        1,
        false,
    );
    buf.truncate(len);
    buf
}

/// TCP segments to the guest: (dst port, seq, ack, flags, payload length).
fn tcp_out(frames: &[Vec<u8>]) -> Vec<(u16, u32, u32, u8, usize)> {
    frames
        .iter()
        .filter_map(|f| {
            let eth = EthernetFrame::new_checked(&f[..]).ok()?;
            let ip = Ipv4Packet::new_checked(eth.payload()).ok()?;
            let t = TcpPacket::new_checked(ip.payload()).ok()?;
            assert!(t.verify_checksum(&ip.src_addr().into(), &ip.dst_addr().into()));
            let flags = (t.fin() as u8)
                | (t.syn() as u8) << 1
                | (t.rst() as u8) << 2
                | (t.ack() as u8) << 4;
            Some((
                t.dst_port(),
                t.seq_number().0 as u32,
                t.ack_number().0 as u32,
                flags,
                t.payload().len(),
            ))
        })
        .collect()
}

#[test]
fn thousands_of_flows_and_the_flow_limit() {
    const N: u16 = 3000;
    let mut c = cfg();
    c.max_flows = usize::from(N);
    let mut core = Core::new(c);
    let mut host = SimHost::new();
    let now = std::time::Instant::now();
    let dst = SocketAddrV4::new(SERVER, 80);
    let rx = RxMeta::default();
    for p in 0..N {
        core.on_frame(
            &mut host,
            &guest_tcp(20000 + p, dst, 1000, 0, SYN, &[], &[2, 4, 5, 180]),
            rx,
            now,
        );
    }
    assert_eq!(core.flow_count(), usize::from(N));
    assert_eq!(host.connects.len(), usize::from(N));
    // One more is refused with RST and counted; the others go on.
    core.on_frame(
        &mut host,
        &guest_tcp(19999, dst, 1000, 0, SYN, &[], &[]),
        rx,
        now,
    );
    assert_eq!(core.stats().refused_limit, 1);
    assert_eq!(
        tcp_out(&host.to_guest),
        vec![(19999, 0, 1001, RST | ACK, 0)]
    );
    host.to_guest.clear();
    let ids: Vec<usize> = host.socks.keys().copied().collect();
    for &id in &ids {
        host.socks.get_mut(&id).expect("sock").connected = true;
        core.on_ready(&mut host, id, Ready::WRITABLE, now);
    }
    let synacks = tcp_out(&host.to_guest);
    assert_eq!(synacks.len(), usize::from(N));
    host.to_guest.clear();
    for &(port, iss, ack, flags, _) in &synacks {
        assert_eq!((ack, flags), (1001, SYN | ACK));
        let msg = format!("hello {port}");
        core.on_frame(
            &mut host,
            &guest_tcp(port, dst, 1001, iss + 1, ACK, msg.as_bytes(), &[]),
            rx,
            now,
        );
    }
    core.flush(&mut host, now);
    for s in host.socks.values() {
        assert!(
            s.received.starts_with(b"hello "),
            "data reached every server socket"
        );
    }
    let acks = tcp_out(&host.to_guest);
    assert_eq!(acks.len(), usize::from(N), "one ACK per flow for its data");
    assert!(acks.iter().all(|&(port, _, ack, flags, _)| flags == ACK
        && ack == 1001 + format!("hello {port}").len() as u32));
    host.to_guest.clear();
    // Every server closes; every guest answers the FIN with its own.
    for &id in &ids {
        host.socks.get_mut(&id).expect("sock").eof = true;
        core.on_ready(&mut host, id, Ready::READABLE, now);
    }
    let fins = tcp_out(&host.to_guest);
    host.to_guest.clear();
    assert_eq!(fins.len(), usize::from(N));
    for &(port, seq, ack, flags, _) in &fins {
        assert_eq!(flags, FIN | ACK);
        core.on_frame(
            &mut host,
            &guest_tcp(port, dst, ack, seq + 1, FIN | ACK, &[], &[]),
            rx,
            now,
        );
    }
    core.flush(&mut host, now);
    assert_eq!(core.flow_count(), 0);
    assert!(host
        .socks
        .values()
        .all(|s| s.closed && s.shut_wr && !s.reset));
}

#[test]
fn segments_for_no_flow_are_reset() {
    let mut core = Core::new(cfg());
    let mut host = SimHost::new();
    let now = std::time::Instant::now();
    let dst = SocketAddrV4::new(SERVER, 80);
    core.on_frame(
        &mut host,
        &guest_tcp(30000, dst, 5, 77, ACK, b"x", &[]),
        RxMeta::default(),
        now,
    );
    assert_eq!(tcp_out(&host.to_guest), vec![(30000, 77, 0, RST, 0)]);
    assert_eq!(core.stats().tcp_no_flow, 1);
}

#[test]
fn gateway_reaches_host_loopback_only_when_allowed() {
    let gw = SocketAddrV4::new(Ipv4Addr::new(10, 0, 2, 2), 22);
    let now = std::time::Instant::now();
    let mut core = Core::new(cfg());
    let mut host = SimHost::new();
    core.on_frame(
        &mut host,
        &guest_tcp(30001, gw, 9, 0, SYN, &[], &[]),
        RxMeta::default(),
        now,
    );
    assert!(host.connects.is_empty());
    assert_eq!(tcp_out(&host.to_guest), vec![(30001, 0, 10, RST | ACK, 0)]);
    assert_eq!(core.stats().tcp_refused_policy, 1);

    let mut c = cfg();
    c.allow_host_loopback = true;
    let mut core = Core::new(c);
    let mut host = SimHost::new();
    core.on_frame(
        &mut host,
        &guest_tcp(30001, gw, 9, 0, SYN, &[], &[]),
        RxMeta::default(),
        now,
    );
    assert_eq!(
        host.connects,
        vec![SocketAddrV4::new(Ipv4Addr::LOCALHOST, 22).into()]
    );
}

/// UDP datagrams to the guest: (source, destination, payload).
fn udp_out(frames: &[Vec<u8>]) -> Vec<(SocketAddrV4, SocketAddrV4, Vec<u8>)> {
    frames
        .iter()
        .filter_map(|f| {
            let eth = EthernetFrame::new_checked(&f[..]).ok()?;
            let ip = Ipv4Packet::new_checked(eth.payload()).ok()?;
            let u = UdpPacket::new_checked(ip.payload()).ok()?;
            assert!(u.verify_checksum(&ip.src_addr().into(), &ip.dst_addr().into()));
            Some((
                SocketAddrV4::new(ip.src_addr(), u.src_port()),
                SocketAddrV4::new(ip.dst_addr(), u.dst_port()),
                u.payload().to_vec(),
            ))
        })
        .collect()
}

#[test]
fn dns_is_forwarded_to_the_host_resolver_and_strangers_are_filtered() {
    let mut core = Core::new(cfg());
    let mut host = SimHost::new();
    let t0 = std::time::Instant::now();
    let dns = SocketAddrV4::new(Ipv4Addr::new(10, 0, 2, 3), 53);
    let resolver = SocketAddrV4::new(Ipv4Addr::new(192, 0, 2, 53), 53);
    core.on_frame(
        &mut host,
        &guest_udp(5353, dns, b"query"),
        RxMeta::default(),
        t0,
    );
    let (&id, s) = host.socks.iter_mut().next().expect("a UDP socket");
    assert_eq!(s.udp_out, vec![(resolver.into(), b"query".to_vec())]);
    s.udp_in.push_back((resolver.into(), b"answer".to_vec()));
    s.udp_in.push_back((
        SocketAddrV4::new(Ipv4Addr::new(203, 0, 113, 9), 53).into(),
        b"spoof".to_vec(),
    ));
    core.on_ready(&mut host, id, Ready::READABLE, t0);
    assert_eq!(
        udp_out(&host.to_guest),
        vec![(dns, SocketAddrV4::new(GUEST, 5353), b"answer".to_vec())]
    );
    assert_eq!(core.stats().udp_filtered, 1);
    // Idle DNS flows expire.
    core.on_timer(&mut host, t0 + std::time::Duration::from_secs(11));
    core.on_timer(&mut host, t0 + std::time::Duration::from_secs(12));
    assert_eq!(core.flow_count(), 0);
    assert!(host.socks[&id].closed);
}

#[test]
fn udp_to_a_refused_destination_gets_port_unreachable() {
    let mut core = Core::new(cfg());
    let mut host = SimHost::new();
    host.log_frames = true;
    let gw = SocketAddrV4::new(Ipv4Addr::new(10, 0, 2, 2), 53);
    core.on_frame(
        &mut host,
        &guest_udp(5354, gw, b"q"),
        RxMeta::default(),
        std::time::Instant::now(),
    );
    assert_eq!(icmp_errors(&host), vec![(3, 3, 5354)]);
    assert!(host.socks.is_empty());
}

/// Errors the host's network reports for the guest's datagrams reach the guest as the
/// destination-unreachable messages its kernel matches to the socket: from the destination as
/// the guest knows it (port unreachable) or from the gateway (the rest), quoting a well-formed
/// IP header and the UDP ports. A receive failing for the pending error loses no datagram.
#[test]
fn udp_errors_from_the_network_reach_the_guest_as_icmp() {
    use smoltcp::wire::{Icmpv4DstUnreachable, Icmpv4Message, Icmpv4Packet};
    let mut c = cfg();
    c.allow_host_loopback = true;
    let mut core = Core::new(c);
    let mut host = SimHost::new();
    host.log_frames = true;
    let t0 = std::time::Instant::now();
    let server = SocketAddrV4::new(Ipv4Addr::new(192, 0, 2, 10), 9);
    let gw = SocketAddrV4::new(Ipv4Addr::new(10, 0, 2, 2), 7);
    let loopback = SocketAddrV4::new(Ipv4Addr::LOCALHOST, 7);
    for dst in [server, gw] {
        core.on_frame(
            &mut host,
            &guest_udp(5355, dst, b"hello"),
            RxMeta::default(),
            t0,
        );
    }
    let (&id, s) = host.socks.iter_mut().next().expect("a UDP socket");
    assert_eq!(
        s.udp_out,
        vec![
            (server.into(), b"hello".to_vec()),
            (loopback.into(), b"hello".to_vec())
        ]
    );
    let stranger = SocketAddr::from((Ipv4Addr::new(203, 0, 113, 5), 9));
    for (dst, why) in [
        (server.into(), Some(Unreachable::PORT)),
        (loopback.into(), Some(Unreachable::PORT)),
        (server.into(), Some(Unreachable::HOST)),
        (stranger, Some(Unreachable::PORT)), // a peer the guest never sent to: not told
        (server.into(), None),               // e.g. time exceeded: not told
        (server.into(), Some(Unreachable::PROHIBITED)),
        (server.into(), Some(Unreachable::V4(7))), // host unknown: passed on as it came
    ] {
        s.dgram_errors.push_back(DgramError {
            dst,
            unreachable: why,
            len: 5,
            head: *b"hello\0\0\0",
        });
    }
    s.dgram_error_pending = true;
    s.udp_in.push_back((server.into(), b"answer".to_vec()));
    // Readable only: the failed receive sends the core to the error queue.
    core.on_ready(&mut host, id, Ready::READABLE, t0);
    let mut got = Vec::new();
    for f in &host.log {
        let eth = EthernetFrame::new_checked(&f[..]).expect("frame");
        let ip = Ipv4Packet::new_checked(eth.payload()).expect("IPv4");
        assert!(ip.verify_checksum());
        if ip.next_header() != IpProtocol::Icmp {
            continue;
        }
        let icmp = Icmpv4Packet::new_checked(ip.payload()).expect("ICMP");
        assert!(icmp.verify_checksum());
        assert_eq!(icmp.msg_type(), Icmpv4Message::DstUnreachable);
        let reason = Icmpv4DstUnreachable::from(icmp.msg_code());
        // The quote: the guest's IP header and the UDP header, rebuilt with the lengths of
        // the payload that came back with the error (here all of it; a router's error may
        // bring back less, so the lengths may be short of what the guest sent).
        let quoted = Ipv4Packet::new_unchecked(icmp.data());
        assert!(quoted.verify_checksum(), "quoted IPv4 header checksum");
        assert_eq!(quoted.header_len(), 20);
        assert_eq!(quoted.total_len(), 20 + 13, "IP length: 20 + 8 + 5");
        assert_eq!(quoted.src_addr(), GUEST);
        assert_eq!(quoted.next_header(), IpProtocol::Udp);
        let data = &icmp.data()[20..];
        assert_eq!(data.len(), 8);
        assert_eq!(&data[..2], &5355u16.to_be_bytes());
        assert_eq!(&data[4..6], &13u16.to_be_bytes(), "UDP length: 8 + 5");
        assert_eq!(ip.dst_addr(), GUEST);
        let dport = u16::from_be_bytes([data[2], data[3]]);
        got.push((ip.src_addr(), reason, quoted.dst_addr(), dport));
    }
    let s_ip = *server.ip();
    let g_ip = *gw.ip();
    assert_eq!(
        got,
        vec![
            (s_ip, Icmpv4DstUnreachable::PortUnreachable, s_ip, 9),
            (g_ip, Icmpv4DstUnreachable::PortUnreachable, g_ip, 7),
            (g_ip, Icmpv4DstUnreachable::HostUnreachable, s_ip, 9),
            (g_ip, Icmpv4DstUnreachable::CommProhibited, s_ip, 9),
            (g_ip, Icmpv4DstUnreachable::DstHostUnknown, s_ip, 9),
        ]
    );
    assert_eq!(core.stats().udp_unreachable, 5);
    assert_eq!(core.stats().udp_error_ignored, 2);
    // The datagram that waited behind the error still reached the guest.
    assert_eq!(
        udp_out(&host.to_guest),
        vec![(server, SocketAddrV4::new(GUEST, 5355), b"answer".to_vec())]
    );
}

/// The same over IPv6: ICMPv6 port unreachable from the destination, quoting the IPv6 header
/// (an ICMP error mapped to its ICMPv6 code), then an ICMPv6 error with its code as it came.
#[test]
fn udp_errors_over_ipv6_reach_the_guest_as_icmpv6() {
    let (v6, mut core, mut host, t0, rx) = ipv6_core();
    let server = std::net::Ipv6Addr::new(0x2001, 0xdb8, 5, 0, 0, 0, 0, 1);
    let mut udp = vec![0x15, 0xbb, 0, 9, 0, 13, 0, 0];
    udp.extend_from_slice(b"hello");
    let f = guest_ipv6(GATEWAY_MAC, v6.guest, server, 17, 64, &udp, Some(6));
    core.on_frame(&mut host, &f, rx, t0);
    let (&id, s) = host.socks.iter_mut().next().expect("a UDP socket");
    assert_eq!(s.udp_out.len(), 1);
    for why in [Unreachable::PORT, Unreachable::V6(5)] {
        s.dgram_errors.push_back(DgramError {
            dst: SocketAddr::from((server, 9)),
            unreachable: Some(why),
            len: 5,
            head: *b"hello\0\0\0",
        });
    }
    core.on_ready(
        &mut host,
        id,
        Ready {
            error: true,
            ..Default::default()
        },
        t0,
    );
    let out = icmp6_out(&host.to_guest);
    assert_eq!(out.len(), 2, "{out:?}");
    let (src, dst, kind, msg) = &out[1];
    assert_eq!((*src, *dst, *kind, msg[1]), (v6.gateway, v6.guest, 1, 5));
    let (src, dst, kind, msg) = &out[0];
    assert_eq!((*src, *dst, *kind, msg[1]), (server, v6.guest, 1, 4));
    let q = &msg[8..];
    assert_eq!(q[0] >> 4, 6, "a quoted IPv6 header");
    assert_eq!(q[6], 17);
    assert_eq!(&q[8..24], &v6.guest.octets());
    assert_eq!(&q[24..40], &server.octets());
    assert_eq!(&q[40..46], &[0x15, 0xbb, 0, 9, 0, 13]);
    assert_eq!(core.stats().udp_unreachable, 2);
}

fn guest_echo(dst: Ipv4Addr, ident: u16) -> Vec<u8> {
    let mut buf = vec![0u8; 200];
    let msg = [
        8u8,
        0,
        0,
        0,
        (ident >> 8) as u8,
        ident as u8,
        0,
        1,
        b'p',
        b'i',
        b'n',
        b'g',
    ];
    buf[frame::ICMP_AT..frame::ICMP_AT + msg.len()].copy_from_slice(&msg);
    let len = frame::icmp(&mut buf, guest_macs(), GUEST, dst, msg.len(), 1);
    buf.truncate(len);
    buf
}

/// ICMP messages to the guest: (source, type, identifier).
fn icmp_out(frames: &[Vec<u8>]) -> Vec<(Ipv4Addr, u8, u16)> {
    frames
        .iter()
        .filter_map(|f| {
            let eth = EthernetFrame::new_checked(&f[..]).ok()?;
            let ip = Ipv4Packet::new_checked(eth.payload()).ok()?;
            (ip.next_header() == IpProtocol::Icmp).then(|| {
                let m = ip.payload();
                assert_eq!(
                    super::csum::fold(super::csum::add(0, m)),
                    0xffff,
                    "ICMP checksum"
                );
                (ip.src_addr(), m[0], u16::from_be_bytes([m[4], m[5]]))
            })
        })
        .collect()
}

#[test]
fn echo_to_the_gateway_is_answered_and_others_go_through_ping_sockets() {
    let now = std::time::Instant::now();
    let gw = Ipv4Addr::new(10, 0, 2, 2);
    let mut core = Core::new(cfg());
    let mut host = SimHost::new();
    core.on_frame(&mut host, &guest_echo(gw, 0x77), RxMeta::default(), now);
    assert_eq!(icmp_out(&host.to_guest), vec![(gw, 0, 0x77)]);
    host.to_guest.clear();
    core.on_frame(&mut host, &guest_echo(SERVER, 0x78), RxMeta::default(), now);
    let (&id, s) = host.socks.iter_mut().next().expect("ping socket");
    assert_eq!(s.udp_out.len(), 1);
    // The kernel's reply carries its own identifier; the guest gets its own back.
    s.udp_in.push_back((
        SocketAddrV4::new(SERVER, 0).into(),
        vec![0, 0, 0, 0, 0x12, 0x34, 0, 1, b'p'],
    ));
    core.on_ready(&mut host, id, Ready::READABLE, now);
    assert_eq!(icmp_out(&host.to_guest), vec![(SERVER, 0, 0x78)]);

    let mut core = Core::new(cfg());
    let mut host = SimHost::new();
    host.ping_allowed = false;
    core.on_frame(&mut host, &guest_echo(SERVER, 0x79), RxMeta::default(), now);
    assert_eq!(core.stats().icmp_unavailable, 1);
    assert_eq!(core.flow_count(), 0);
}

/// An error the host's network reports for an echo request reaches the guest from the gateway,
/// quoting the request with the guest's own identifier (the host socket's is the kernel's) and
/// the request's sequence number; a receive failing for the pending error loses no reply.
#[test]
fn echo_errors_reach_the_guest_with_its_identifier() {
    let now = std::time::Instant::now();
    let mut core = Core::new(cfg());
    let mut host = SimHost::new();
    core.on_frame(&mut host, &guest_echo(SERVER, 0x78), RxMeta::default(), now);
    let (&id, s) = host.socks.iter_mut().next().expect("ping socket");
    // The request as the host socket sent it: the kernel's identifier 0x1234, sequence 1.
    let head = [8, 0, 0xab, 0xcd, 0x12, 0x34, 0, 1];
    for why in [Some(Unreachable::HOST), None] {
        s.dgram_errors.push_back(DgramError {
            dst: SocketAddrV4::new(SERVER, 0).into(),
            unreachable: why,
            len: 12,
            head,
        });
    }
    s.dgram_error_pending = true;
    s.udp_in.push_back((
        SocketAddrV4::new(SERVER, 0).into(),
        vec![0, 0, 0, 0, 0x12, 0x34, 0, 2, b'p'],
    ));
    core.on_ready(&mut host, id, Ready::READABLE, now);
    let gw = Ipv4Addr::new(10, 0, 2, 2);
    assert_eq!(
        icmp_out(&host.to_guest),
        vec![(gw, 3, 0), (SERVER, 0, 0x78)],
        "the error, then the reply that waited behind it"
    );
    let f = &host.to_guest[0];
    let m = &f[frame::ICMP_AT..];
    assert_eq!(m[1], 1, "host unreachable");
    let quoted = Ipv4Packet::new_unchecked(&m[8..]);
    assert!(quoted.verify_checksum());
    assert_eq!(quoted.src_addr(), GUEST);
    assert_eq!(quoted.dst_addr(), SERVER);
    assert_eq!(quoted.next_header(), IpProtocol::Icmp);
    assert_eq!(quoted.total_len(), 20 + 12);
    assert_eq!(
        &m[28..36],
        &[8, 0, 0, 0, 0, 0x78, 0, 1],
        "type, identifier, sequence"
    );
    assert_eq!(core.stats().icmp_unreachable, 1);
    assert_eq!(core.stats().icmp_error_ignored, 1);
}

#[test]
fn bad_frames_are_counted_not_fatal() {
    let mut core = Core::new(cfg());
    let mut host = SimHost::new();
    let now = std::time::Instant::now();
    let good = guest_tcp(30002, SocketAddrV4::new(SERVER, 80), 1, 0, SYN, &[], &[]);
    core.on_frame(&mut host, &good[..10], RxMeta::default(), now); // runt
    let mut bad_ip = good.clone();
    bad_ip[14 + 10] ^= 0xff; // IP header checksum
    core.on_frame(&mut host, &bad_ip, RxMeta::default(), now);
    let mut bad_tcp = good.clone();
    let last = bad_tcp.len() - 1;
    bad_tcp[last] ^= 0x01; // TCP checksum (the last option byte)
    core.on_frame(&mut host, &bad_tcp, RxMeta::default(), now);
    let mut short = good.clone();
    short.truncate(14 + 20 + 10); // TCP header cut short
    core.on_frame(&mut host, &short, RxMeta::default(), now);
    let s = core.stats();
    assert_eq!((s.drop_malformed, s.drop_checksum), (2, 2), "{s:?}");
    assert!(host.connects.is_empty());
    // Arbitrary bytes, every length up to 200.
    for len in 0..200 {
        let junk: Vec<u8> = (0..len).map(|i| (i * 7 + len) as u8).collect();
        core.on_frame(
            &mut host,
            &junk,
            RxMeta {
                csum_trusted: len % 2 == 0,
            },
            now,
        );
    }
}

// ---- Published ports: host clients reach the guest with their own address. ----

#[test]
fn inbound_tcp_carries_the_clients_address_and_bytes_both_ways() {
    let client = SocketAddr::from((Ipv4Addr::new(203, 0, 113, 2), 5555));
    inbound_tcp(client, client);
    // A loopback client (spliced in practice, unless splicing is unavailable) is the gateway.
    inbound_tcp(
        SocketAddr::from((Ipv4Addr::LOCALHOST, 5556)),
        SocketAddr::from((Ipv4Addr::new(10, 0, 2, 2), 5556)),
    );
}

#[test]
fn inbound_tcp_over_ipv6_reaches_the_guests_ipv6_address() {
    let client = SocketAddr::from((SERVER6, 5557));
    inbound_tcp(client, client);
    let fd00_2 = super::Ipv6Config::slirp().gateway;
    inbound_tcp(
        SocketAddr::from((std::net::Ipv6Addr::LOCALHOST, 5558)),
        SocketAddr::from((fd00_2, 5558)),
    );
    // Without IPv6 in the guest there is nowhere to take an IPv6 client: no flow.
    let mut sim = Sim::new(cfg());
    sim.host.staged = Some(super::sim::SimSock::default());
    let now = sim.now();
    assert!(sim
        .core
        .tcp_inbound(&mut sim.host, client, 80, now)
        .is_none());
    assert_eq!(sim.core.flow_count(), 0);
}

/// A host `client` of published port 80: the guest (with IPv6 when the client is IPv6) sees it as
/// `seen`; 120 kB go up, a reply comes back, and both sides close.
fn inbound_tcp(client: SocketAddr, seen: SocketAddr) {
    let mut c = cfg();
    if client.is_ipv6() {
        c.ipv6 = Some(super::Ipv6Config::slirp());
    }
    let mut sim = Sim::new(c);
    let mut listener = tcp::Socket::new(
        tcp::SocketBuffer::new(vec![0; 65536]),
        tcp::SocketBuffer::new(vec![0; 65536]),
    );
    listener.listen(80).expect("listen");
    let h = sim.sockets.add(listener);
    // The guest speaks first (as a kernel does when its link comes up): its MAC is learned.
    sim.run_until(5, |_| false);
    let up = pattern(120_000, 7);
    sim.host.staged = Some(super::sim::SimSock {
        dst: Some(client),
        connected: true,
        cap: 1 << 20,
        rx: up.clone(),
        eof: true,
        ..Default::default()
    });
    let now = sim.now();
    let id = sim
        .core
        .tcp_inbound(&mut sim.host, client, 80, now)
        .expect("a flow");
    let mut got = Vec::new();
    let mut replied = false;
    let mut local = None;
    let done = sim.run_until(20_000, |sim| {
        let s = sim.sockets.get_mut::<tcp::Socket>(h);
        if let Some(ep) = s.remote_endpoint() {
            assert_eq!(
                (ep.addr, ep.port),
                (seen.ip().into(), seen.port()),
                "the guest sees the client as {seen}"
            );
            local = s.local_endpoint();
        }
        while s.can_recv() {
            let mut buf = [0u8; 8192];
            let k = s.recv_slice(&mut buf).expect("recv");
            got.extend_from_slice(&buf[..k]);
        }
        if got.len() == up.len() && !replied && s.can_send() {
            s.send_slice(b"thanks").expect("send");
            s.close();
            replied = true;
        }
        sim.core.flow_count() == 0
    });
    assert!(
        done,
        "inbound flow from {client} did not finish: got {} of {}",
        got.len(),
        up.len()
    );
    assert!(got == up);
    let want_local: IpAddr = if client.is_ipv6() {
        super::Ipv6Config::slirp().guest.into()
    } else {
        Ipv4Addr::new(10, 0, 2, 100).into()
    };
    assert_eq!(local.map(|e| e.addr), Some(want_local.into()));
    let s = &sim.host.socks[&id];
    assert_eq!(s.received, b"thanks");
    assert!(s.closed && !s.reset);
    assert_eq!(sim.core.stats().tcp_inbound, 1);
}

#[test]
fn inbound_tcp_to_a_closed_guest_port_resets_the_client() {
    let mut sim = Sim::new(cfg());
    sim.run_until(5, |_| false);
    let client = SocketAddrV4::new(Ipv4Addr::new(203, 0, 113, 2), 5556);
    sim.host.staged = Some(super::sim::SimSock {
        dst: Some(client.into()),
        connected: true,
        cap: 1 << 20,
        ..Default::default()
    });
    let now = sim.now();
    let id = sim
        .core
        .tcp_inbound(&mut sim.host, client.into(), 81, now)
        .expect("a flow");
    assert!(sim.run_until(1000, |sim| sim.core.flow_count() == 0));
    assert!(
        sim.host.socks[&id].reset,
        "the client's connection is reset"
    );
}

#[test]
fn published_udp_reaches_the_guest_from_the_client_and_replies_go_back() {
    published_udp(
        SocketAddr::from((Ipv4Addr::new(203, 0, 113, 2), 4444)),
        SocketAddr::from((Ipv4Addr::LOCALHOST, 4445)),
        Ipv4Addr::new(10, 0, 2, 2).into(),
    );
}

#[test]
fn published_udp_over_ipv6_reaches_the_guests_ipv6_address() {
    published_udp(
        SocketAddr::from((SERVER6, 4444)),
        SocketAddr::from((std::net::Ipv6Addr::LOCALHOST, 4445)),
        super::Ipv6Config::slirp().gateway.into(),
    );
    // A guest without IPv6 cannot have an IPv6 port published.
    let mut sim = Sim::new(cfg());
    sim.host.staged = Some(super::sim::SimSock::default());
    let now = sim.now();
    assert!(matches!(
        sim.core.udp_publish(&mut sim.host, 5353, true, now),
        Err(super::PublishError::NoIpv6)
    ));
    assert!(!sim.core.udp_unpublish(&mut sim.host, 5353, true));
}

/// Publishes UDP 5353 in the family of `external` and `local` (a loopback client, seen by the
/// guest at `gateway`); both clients' datagrams reach the guest, and its replies go back to them.
fn published_udp(external: SocketAddr, local: SocketAddr, gateway: IpAddr) {
    let v6 = external.is_ipv6();
    let mut c = cfg();
    if v6 {
        c.ipv6 = Some(super::Ipv6Config::slirp());
    }
    let mut sim = Sim::new(c);
    let rx = smoltcp::socket::udp::PacketBuffer::new(
        vec![smoltcp::socket::udp::PacketMetadata::EMPTY; 8],
        vec![0; 8192],
    );
    let tx = smoltcp::socket::udp::PacketBuffer::new(
        vec![smoltcp::socket::udp::PacketMetadata::EMPTY; 8],
        vec![0; 8192],
    );
    let mut sock = smoltcp::socket::udp::Socket::new(rx, tx);
    sock.bind(5353).expect("bind");
    let h = sim.sockets.add(sock);
    sim.run_until(5, |_| false);
    sim.host.staged = Some(super::sim::SimSock::default());
    let now = sim.now();
    let id = sim
        .core
        .udp_publish(&mut sim.host, 5353, v6, now)
        .expect("published");
    let s = sim.host.socks.get_mut(&id).expect("sock");
    s.udp_in.push_back((external, b"from-outside".to_vec()));
    s.udp_in.push_back((local, b"from-loopback".to_vec()));
    let mut seen = Vec::new();
    let mut at = Vec::new();
    sim.run_until(200, |sim| {
        let s = sim.sockets.get_mut::<smoltcp::socket::udp::Socket>(h);
        while let Ok((data, meta)) = s.recv() {
            seen.push((meta.endpoint, data.to_vec()));
            at.push(meta.local_address);
            let reply = [b"re:".as_slice(), data].concat();
            let ep = meta.endpoint;
            s.send_slice(&reply, ep).expect("reply");
        }
        seen.len() == 2 && sim.host.socks[&id].udp_out.len() == 2
    });
    let ep = |ip: IpAddr, port| smoltcp::wire::IpEndpoint::new(ip.into(), port);
    assert_eq!(
        seen,
        vec![
            (ep(external.ip(), external.port()), b"from-outside".to_vec()),
            (ep(gateway, local.port()), b"from-loopback".to_vec()),
        ],
        "the guest sees the external client, and a loopback client as the gateway"
    );
    let guest: IpAddr = if v6 {
        super::Ipv6Config::slirp().guest.into()
    } else {
        Ipv4Addr::new(10, 0, 2, 100).into()
    };
    assert!(
        at.iter().all(|a| *a == Some(guest.into())),
        "sent to the guest's address of the family: {at:?}"
    );
    // Replies leave through the published socket, the loopback one too (no host-loopback grant
    // is needed to answer a client).
    assert_eq!(
        sim.host.socks[&id].udp_out,
        vec![
            (external, b"re:from-outside".to_vec()),
            (local, b"re:from-loopback".to_vec())
        ]
    );
    assert!(sim.core.udp_unpublish(&mut sim.host, 5353, v6));
    assert!(sim.host.socks[&id].closed);
}

/// A core whose guest has spoken (so its MAC is known), the host, and the time it spoke.
fn core_with_guest() -> (Core, SimHost, std::time::Instant) {
    let mut core = Core::new(cfg());
    let mut host = SimHost::new();
    let t0 = std::time::Instant::now();
    core.on_frame(
        &mut host,
        &guest_udp(5000, SocketAddrV4::new(SERVER, 9), b"x"),
        RxMeta::default(),
        t0,
    );
    (core, host, t0)
}

/// The accepted socket of a host `client` of a published port, as the driver stages it.
fn stage_client(host: &mut SimHost, client: SocketAddrV4) {
    host.staged = Some(super::sim::SimSock {
        dst: Some(client.into()),
        connected: true,
        cap: 1 << 20,
        ..Default::default()
    });
}

/// An inbound flow from `client` to the guest's port 80, established by the guest's SYN-ACK
/// (its ISN 1000): the flow's id and rnat's ISN.
fn inbound_established(
    core: &mut Core,
    host: &mut SimHost,
    client: SocketAddrV4,
    now: std::time::Instant,
) -> (super::host::FlowId, u32) {
    stage_client(host, client);
    let id = core
        .tcp_inbound(host, client.into(), 80, now)
        .expect("a flow");
    let iss = tcp_out(&host.to_guest)[0].1;
    core.on_frame(
        host,
        &guest_tcp(80, client, 1000, iss.wrapping_add(1), SYN | ACK, &[], &[]),
        RxMeta::default(),
        now,
    );
    (id, iss)
}

#[test]
fn a_syn_refused_by_time_wait_is_sent_again_at_once_with_a_later_isn() {
    let (mut core, mut host, t0) = core_with_guest();
    let client = SocketAddrV4::new(Ipv4Addr::new(203, 0, 113, 2), 40000);
    let stage = |host: &mut SimHost| stage_client(host, client);
    stage(&mut host);
    core.tcp_inbound(&mut host, client.into(), 80, t0)
        .expect("a flow");
    let first = tcp_out(&host.to_guest);
    host.to_guest.clear();
    assert_eq!(first.len(), 1);
    let (port, iss1, _, flags, _) = first[0];
    assert_eq!((port, flags), (80, SYN));
    // The guest's old connection on this 4-tuple is in TIME_WAIT: it answers with a bare ACK.
    core.on_frame(
        &mut host,
        &guest_tcp(80, client, 5555, 777, ACK, &[], &[]),
        RxMeta::default(),
        t0,
    );
    let answer = tcp_out(&host.to_guest);
    assert_eq!(
        answer,
        vec![(80, 777, 0, RST, 0), (80, iss1, 0, SYN, 0)],
        "RST, then the SYN again at once"
    );
    assert_eq!(core.stats().tcp_syn_after_timewait, 1);
    // A second connection on the same 4-tuple a second later starts well past the first.
    let mut core2 = Core::new(cfg());
    let mut host2 = SimHost::new();
    core2.on_frame(
        &mut host2,
        &guest_udp(5000, SocketAddrV4::new(SERVER, 9), b"x"),
        RxMeta::default(),
        t0,
    );
    stage(&mut host2);
    core2
        .tcp_inbound(&mut host2, client.into(), 80, t0)
        .expect("a flow");
    let a = tcp_out(&host2.to_guest)[0].1;
    host2.to_guest.clear();
    let key = (
        SocketAddrV4::new(Ipv4Addr::new(10, 0, 2, 100), 80).into(),
        client.into(),
    );
    let id = core2.tcp[&key];
    core2.with_tcp(&mut host2, id, t0, |_, out| {
        out.host.tcp_close(id, true);
        Verdict::Remove
    });
    stage(&mut host2);
    core2
        .tcp_inbound(
            &mut host2,
            client.into(),
            80,
            t0 + std::time::Duration::from_secs(1),
        )
        .expect("a flow");
    let b = tcp_out(&host2.to_guest)[0].1;
    let ahead = b.wrapping_sub(a);
    assert!(
        (200_000..300_000).contains(&ahead),
        "ISN moved by {ahead} in 1 s (a 4 µs clock)"
    );
}

/// A host client that reuses its port at once (its kernel's side of the old connection is over)
/// while the guest's side of the old flow is still closing: the new connection is taken, and its
/// SYN waits for the old flow to finish (the guest's ACK of our FIN), or at most `REUSE_WAIT`,
/// after which the old flow is reset.
#[test]
fn a_client_reusing_its_port_waits_for_the_old_flow_to_finish() {
    let ms = std::time::Duration::from_millis;
    let client = SocketAddrV4::new(Ipv4Addr::new(203, 0, 113, 2), 40000);
    for guest_acks in [true, false] {
        let (mut core, mut host, t0) = core_with_guest();
        let stage = |host: &mut SimHost| stage_client(host, client);
        let udp_flows = core.flow_count();
        let (old, iss) = inbound_established(&mut core, &mut host, client, t0);
        let guest =
            |seq: u32, ack: u32, flags: u8| guest_tcp(80, client, seq, ack, flags, &[], &[]);
        // The guest closes first (as a web server does), and rnat passes its FIN on to the
        // client.
        core.on_frame(
            &mut host,
            &guest(1001, iss.wrapping_add(1), FIN | ACK),
            RxMeta::default(),
            t0,
        );
        core.flush(&mut host, t0);
        assert!(
            host.socks[&old].shut_wr,
            "the guest's FIN went to the client"
        );
        // The client closes too: rnat's FIN goes to the guest.
        host.socks.get_mut(&old).expect("old socket").eof = true;
        let hup = Ready {
            hup: true,
            ..Ready::READABLE
        };
        core.on_ready(&mut host, old, hup, t0);
        let fin = (80, iss.wrapping_add(1), 1002, FIN | ACK, 0);
        assert!(tcp_out(&host.to_guest).contains(&fin), "our FIN");
        host.to_guest.clear();
        // Before the guest has acknowledged it, the client is back on the same port.
        stage(&mut host);
        let new = core
            .tcp_inbound(&mut host, client.into(), 80, t0 + ms(1))
            .expect("the reused port is taken, not refused");
        assert_ne!(new, old);
        assert_eq!(core.stats().tcp_inbound_waited, 1);
        assert!(
            tcp_out(&host.to_guest).is_empty(),
            "no SYN while the old flow holds the tuple"
        );
        let syn_of_new = |host: &SimHost| {
            tcp_out(&host.to_guest)
                .into_iter()
                .find(|s| s.3 == SYN)
                .map(|s| s.1)
        };
        if guest_acks {
            core.on_frame(
                &mut host,
                &guest(1002, iss.wrapping_add(2), ACK),
                RxMeta::default(),
                t0 + ms(2),
            );
            assert!(host.socks[&old].closed && !host.socks[&old].reset);
            let iss2 = syn_of_new(&host).expect("the new SYN as soon as the old flow is gone");
            assert_ne!(iss2, iss);
        } else {
            core.on_timer(&mut host, t0 + ms(900));
            assert_eq!(syn_of_new(&host), None, "still waiting at 0.9 s");
            assert!(!host.socks[&old].closed);
            core.on_timer(&mut host, t0 + ms(1001));
            let out = tcp_out(&host.to_guest);
            let rst = out
                .iter()
                .position(|s| s.3 & RST != 0 && s.1 == iss.wrapping_add(2));
            let syn = out.iter().position(|s| s.3 == SYN);
            assert!(
                matches!((rst, syn), (Some(r), Some(s)) if r < s),
                "the old flow reset, then the new SYN: {out:?}"
            );
            assert!(host.socks[&old].closed);
        }
        assert_eq!(core.flow_count(), udp_flows + 1, "the old flow is gone");
        assert_eq!(core.stats().refused_limit, 0);
        // The new flow is the tuple's now: the guest's SYN-ACK opens it.
        let iss2 = syn_of_new(&host).expect("SYN");
        host.to_guest.clear();
        host.socks.get_mut(&new).expect("new socket").rx = b"GET /".to_vec();
        core.on_ready(&mut host, new, Ready::READABLE, t0 + ms(1002));
        core.on_frame(
            &mut host,
            &guest(5000, iss2.wrapping_add(1), SYN | ACK),
            RxMeta::default(),
            t0 + ms(1002),
        );
        let out = tcp_out(&host.to_guest);
        assert!(
            out.contains(&(80, iss2.wrapping_add(1), 5001, ACK, 5)),
            "the new client's bytes reach the guest: {out:?}"
        );
    }
}

/// Another host connection that the guest would see on the same 4-tuple as a live flow (the
/// client's port reused towards a second host port published to the same guest port, or through a
/// second host address): the newcomer waits, and after `REUSE_WAIT` it is the one reset, the live
/// flow left alone, whether open both ways or half-closed. A waiting client that resets goes at
/// once. A flow whose host connection ends while a newcomer waits is the one reset.
#[test]
fn a_second_host_connection_on_a_live_flows_tuple_waits_then_is_reset() {
    let ms = std::time::Duration::from_millis;
    let client = SocketAddrV4::new(Ipv4Addr::new(203, 0, 113, 2), 40000);
    let (mut core, mut host, t0) = core_with_guest();
    let stage = |host: &mut SimHost| stage_client(host, client);
    let (live, iss) = inbound_established(&mut core, &mut host, client, t0);
    let guest = |seq: u32, ack: u32, flags: u8| guest_tcp(80, client, seq, ack, flags, &[], &[]);
    let newcomer = |core: &mut Core, host: &mut SimHost, now| {
        stage(host);
        host.to_guest.clear();
        let id = core
            .tcp_inbound(host, client.into(), 80, now)
            .expect("taken, to wait");
        assert!(tcp_out(&host.to_guest).is_empty(), "no SYN while waiting");
        id
    };
    let untouched = |host: &SimHost| {
        assert!(
            !host.socks[&live].closed,
            "the live flow's socket stays open"
        );
        assert!(tcp_out(&host.to_guest).iter().all(|s| s.3 & RST == 0));
    };
    // Open both ways: the newcomer waits, then its client is reset.
    let a = newcomer(&mut core, &mut host, t0);
    core.on_timer(&mut host, t0 + ms(1001));
    assert!(host.socks[&a].closed && host.socks[&a].reset);
    untouched(&host);
    assert_eq!(core.stats().tcp_inbound_tuple_busy, 1);
    // Half-closed (the guest's FIN went to the client, whose side goes on): the same.
    core.on_frame(
        &mut host,
        &guest(1001, iss.wrapping_add(1), FIN | ACK),
        RxMeta::default(),
        t0 + ms(1100),
    );
    core.flush(&mut host, t0 + ms(1100));
    assert!(host.socks[&live].shut_wr);
    let b = newcomer(&mut core, &mut host, t0 + ms(1200));
    core.on_timer(&mut host, t0 + ms(2201));
    assert!(host.socks[&b].closed && host.socks[&b].reset);
    untouched(&host);
    assert_eq!(core.stats().tcp_inbound_tuple_busy, 2);
    // A waiting client that resets is closed at once, the guest told nothing.
    let c = newcomer(&mut core, &mut host, t0 + ms(2300));
    let failed = Ready {
        error: true,
        ..Ready::READABLE
    };
    core.on_ready(&mut host, c, failed, t0 + ms(2400));
    assert!(host.socks[&c].closed);
    untouched(&host);
    // The live flow's host connection ends while a newcomer waits (its report came after the
    // newcomer): the old flow, still waiting for the guest's ACK of our FIN, is reset at the
    // deadline, and the newcomer opens.
    let d = newcomer(&mut core, &mut host, t0 + ms(2500));
    host.socks.get_mut(&live).expect("socket").eof = true;
    let hup = Ready {
        hup: true,
        ..Ready::READABLE
    };
    core.on_ready(&mut host, live, hup, t0 + ms(2600));
    core.on_timer(&mut host, t0 + ms(3501));
    let out = tcp_out(&host.to_guest);
    let rst = out.iter().position(|s| s.3 & RST != 0);
    let syn = out.iter().position(|s| s.3 == SYN);
    assert!(
        matches!((rst, syn), (Some(r), Some(s)) if r < s),
        "the old flow reset, then the new SYN: {out:?}"
    );
    assert!(host.socks[&live].closed && !host.socks[&d].closed);
    assert_eq!(core.stats().tcp_inbound_tuple_busy, 2);
    assert_eq!(core.stats().tcp_inbound_waited, 4);
}

/// A flow's timer pushed back (a SYN sent again before its timeout) fires at the later time:
/// the core's one wake-up per flow, due first, hands the deadline on.
#[test]
fn a_timer_pushed_back_fires_at_its_new_deadline() {
    let (mut core, mut host, t0) = core_with_guest();
    let ms = std::time::Duration::from_millis;
    let client = SocketAddrV4::new(Ipv4Addr::new(203, 0, 113, 2), 40000);
    stage_client(&mut host, client);
    core.tcp_inbound(&mut host, client.into(), 80, t0)
        .expect("a flow");
    // The SYN's timer is due at 1 s; a bare ACK at 0.5 s sends it again and moves the timer to
    // 1.5 s.
    core.on_frame(
        &mut host,
        &guest_tcp(80, client, 5555, 777, ACK, &[], &[]),
        RxMeta::default(),
        t0 + ms(500),
    );
    let syns = |host: &SimHost| {
        tcp_out(&host.to_guest)
            .iter()
            .filter(|s| s.3 == SYN)
            .count()
    };
    assert_eq!(syns(&host), 2);
    core.on_timer(&mut host, t0 + ms(1000));
    assert_eq!(syns(&host), 2, "not due yet at 1 s");
    let next = core.on_timer(&mut host, t0 + ms(1200));
    assert_eq!(syns(&host), 2, "not due yet at 1.2 s");
    assert_eq!(
        next,
        Some(t0 + ms(1500)),
        "the next wake-up is the new deadline"
    );
    core.on_timer(&mut host, t0 + ms(1500));
    assert_eq!(syns(&host), 3, "the SYN again at 1.5 s");
}

// ---- IPv6 (`Config::ipv6`) ----

/// smoltcp's guest finds the gateway by neighbour discovery (answered by the core), then moves
/// bytes both ways to an IPv6 server over a lossy wire, every byte checked.
#[test]
fn ipv6_bulk_both_ways_over_loss() {
    transfer_to(SERVER6.into(), Impair::default(), 200_000, None);
    transfer_to(
        SERVER6.into(),
        Impair {
            loss: 20,
            dup: 20,
            reorder: 30,
        },
        100_000,
        None,
    );
}

/// A guest IPv6 frame: Ethernet to the gateway's MAC (or `dst_mac`), IPv6 with `hops`, and an
/// L4 part whose checksum field (at `csum_at`, if any) is filled in.
fn guest_ipv6(
    dst_mac: [u8; 6],
    src: std::net::Ipv6Addr,
    dst: std::net::Ipv6Addr,
    next: u8,
    hops: u8,
    l4: &[u8],
    csum_at: Option<usize>,
) -> Vec<u8> {
    let mut f = Vec::new();
    f.extend_from_slice(&dst_mac);
    f.extend_from_slice(&GUEST_MAC);
    f.extend_from_slice(&[0x86, 0xdd, 0x60, 0, 0, 0]);
    f.extend_from_slice(&(l4.len() as u16).to_be_bytes());
    f.extend_from_slice(&[next, hops]);
    f.extend_from_slice(&src.octets());
    f.extend_from_slice(&dst.octets());
    let at = f.len();
    f.extend_from_slice(l4);
    if let Some(c) = csum_at {
        let pseudo = super::csum::pseudo(src.into(), dst.into(), next, l4.len());
        let sum = super::csum::finish(super::csum::add(pseudo, &f[at..]));
        f[at + c..at + c + 2].copy_from_slice(&sum.to_be_bytes());
    }
    f
}

/// ICMPv6 frames to the guest: (source, destination, type, message).
fn icmp6_out(frames: &[Vec<u8>]) -> Vec<(std::net::Ipv6Addr, std::net::Ipv6Addr, u8, Vec<u8>)> {
    let a = |b: &[u8]| {
        let mut o = [0u8; 16];
        o.copy_from_slice(b);
        std::net::Ipv6Addr::from(o)
    };
    frames
        .iter()
        .filter(|f| f.len() >= 62 && f[12..14] == [0x86, 0xdd] && f[20] == 58)
        .map(|f| {
            let (src, dst, msg) = (a(&f[22..38]), a(&f[38..54]), f[54..].to_vec());
            let pseudo = super::csum::pseudo(src.into(), dst.into(), 58, msg.len());
            assert_eq!(
                super::csum::fold(super::csum::add(pseudo, &msg)),
                0xffff,
                "ICMPv6 checksum"
            );
            assert_eq!(f[21], 255, "hop limit of our ICMPv6");
            (src, dst, msg[0], msg)
        })
        .collect()
}

/// A core with IPv6 on (slirp4netns' layout), a simulated host, the time and the frames' metadata.
fn ipv6_core() -> (super::Ipv6Config, Core, SimHost, std::time::Instant, RxMeta) {
    let v6 = super::Ipv6Config::slirp();
    let mut c = cfg();
    c.ipv6 = Some(v6);
    let now = std::time::Instant::now();
    (v6, Core::new(c), SimHost::new(), now, RxMeta::default())
}

#[test]
fn ipv6_neighbours_router_and_echo_are_answered_for_the_gateway() {
    use std::net::Ipv6Addr;
    let (v6, mut core, mut host, now, rx) = ipv6_core();
    let ip = |s: &str| s.parse::<Ipv6Addr>().expect("address");
    let guest_ll = ip("fe80::64");
    let ns = |target: Ipv6Addr| {
        let mut m = vec![135, 0, 0, 0, 0, 0, 0, 0];
        m.extend_from_slice(&target.octets());
        m.extend_from_slice(&[1, 1]);
        m.extend_from_slice(&GUEST_MAC);
        m
    };
    let group = |t: Ipv6Addr| {
        let o = t.octets();
        Ipv6Addr::from([
            0xff, 2, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1, 0xff, o[13], o[14], o[15],
        ])
    };
    let mcast = [0x33, 0x33, 0xff, 0, 0, 2];
    // Neighbour solicitations (to the target's solicited-node group): for the gateway and the
    // DNS server answered, at our MAC, solicited, the router flag for the gateway only; for
    // another address on the link, or sent to another group, not.
    let nine = ip("fd00::9");
    for (target, to, answer) in [
        (v6.gateway, group(v6.gateway), Some(0xe0u8)),
        (v6.dns, group(v6.dns), Some(0x60)),
        (nine, group(nine), None),
        (v6.gateway, group(nine), None),
    ] {
        host.to_guest.clear();
        let f = guest_ipv6(mcast, guest_ll, to, 58, 255, &ns(target), Some(2));
        core.on_frame(&mut host, &f, rx, now);
        let out = icmp6_out(&host.to_guest);
        let Some(flags) = answer else {
            assert!(out.is_empty(), "{target} via {to} answered");
            continue;
        };
        assert_eq!(out.len(), 1, "{target}");
        let (src, dst, kind, msg) = &out[0];
        assert_eq!((*src, *dst, *kind), (target, guest_ll, 136));
        assert_eq!(msg[4], flags, "{target}: R, S and O flags");
        assert_eq!(&msg[8..24], &target.octets(), "target");
        let option = [&[2u8, 1][..], &GATEWAY_MAC[..]].concat();
        assert_eq!(&msg[24..32], &option[..], "our MAC");
    }
    let solicited = group(v6.gateway);
    // A solicitation with a hop limit below 255 came from off the link: ignored.
    host.to_guest.clear();
    let f = guest_ipv6(mcast, guest_ll, solicited, 58, 64, &ns(v6.gateway), Some(2));
    core.on_frame(&mut host, &f, rx, now);
    assert!(
        icmp6_out(&host.to_guest).is_empty(),
        "off-link solicitation answered"
    );
    // The guest probing for a duplicate of the gateway's address (from ::) is told it is
    // taken, to all nodes.
    host.to_guest.clear();
    let f = guest_ipv6(
        mcast,
        ip("::"),
        solicited,
        58,
        255,
        &ns(v6.gateway),
        Some(2),
    );
    core.on_frame(&mut host, &f, rx, now);
    let out = icmp6_out(&host.to_guest);
    assert_eq!(out.len(), 1);
    assert_eq!(
        (out[0].1, out[0].3[4]),
        (ip("ff02::1"), 0xa0),
        "unsolicited, to all"
    );
    assert_eq!(
        &host.to_guest[0][..6],
        &[0x33, 0x33, 0, 0, 0, 1],
        "all-nodes MAC"
    );
    // A router solicitation gets the prefix, the MTU and the DNS server.
    host.to_guest.clear();
    let rs = [133, 0, 0, 0, 0, 0, 0, 0];
    let f = guest_ipv6(
        [0x33, 0x33, 0, 0, 0, 2],
        guest_ll,
        ip("ff02::2"),
        58,
        255,
        &rs,
        Some(2),
    );
    core.on_frame(&mut host, &f, rx, now);
    let out = icmp6_out(&host.to_guest);
    assert_eq!(out.len(), 1);
    let (src, dst, kind, ra) = &out[0];
    assert_eq!((*src, *dst, *kind), (super::ROUTER_LL, guest_ll, 134));
    let prefix = ra
        .windows(4)
        .position(|w| w == [3, 4, 64, 0xc0])
        .expect("prefix option");
    assert_eq!(&ra[prefix + 16..prefix + 32], &v6.prefix.octets());
    let mtu = ra
        .windows(4)
        .position(|w| w == [5, 1, 0, 0])
        .expect("MTU option");
    assert_eq!(&ra[mtu + 4..mtu + 8], &1500u32.to_be_bytes());
    assert!(ra.windows(16).any(|w| w == v6.dns.octets()), "DNS server");
    // Then unsolicited, to all nodes, every ten minutes: the lifetimes it gives never run out.
    host.to_guest.clear();
    let later = now + std::time::Duration::from_secs(601);
    let next = core.on_timer(&mut host, later).expect("a timer");
    assert!(next <= later + std::time::Duration::from_secs(600));
    let out = icmp6_out(&host.to_guest);
    assert_eq!(out.len(), 1, "an unsolicited advertisement");
    assert_eq!((out[0].1, out[0].2), (ip("ff02::1"), 134));
    // Echo to the gateway is answered by rnat, echo elsewhere goes out on a ping socket.
    host.to_guest.clear();
    let echo = [128, 0, 0, 0, 0x12, 0x34, 0, 1, b'h', b'i'];
    let f = guest_ipv6(GATEWAY_MAC, v6.guest, v6.gateway, 58, 64, &echo, Some(2));
    core.on_frame(&mut host, &f, rx, now);
    let out = icmp6_out(&host.to_guest);
    assert_eq!(out.len(), 1);
    assert_eq!((out[0].0, out[0].1, out[0].2), (v6.gateway, v6.guest, 129));
    assert_eq!(
        &out[0].3[4..],
        &echo[4..],
        "identifier, sequence and data echoed"
    );
    let f = guest_ipv6(GATEWAY_MAC, v6.guest, SERVER6, 58, 64, &echo, Some(2));
    core.on_frame(&mut host, &f, rx, now);
    let sent: Vec<_> = host
        .socks
        .values()
        .flat_map(|s| s.udp_out.clone())
        .collect();
    assert_eq!(sent.len(), 1);
    assert_eq!(sent[0].0, SocketAddr::new(SERVER6.into(), 0));
    assert_eq!((&sent[0].1[..2], &sent[0].1[4..]), (&echo[..2], &echo[4..]));
    // The reply (with the host socket's own identifier) reaches the guest with the guest's.
    let (&id, s) = host
        .socks
        .iter_mut()
        .find(|(_, s)| !s.udp_out.is_empty())
        .expect("the ping socket");
    s.udp_in.push_back((
        SocketAddr::new(SERVER6.into(), 0),
        vec![129, 0, 0, 0, 0x77, 0x77, 0, 1, b'h', b'i'],
    ));
    host.to_guest.clear();
    let readable = Ready::READABLE;
    core.on_ready(&mut host, id, readable, now);
    let out = icmp6_out(&host.to_guest);
    assert_eq!(out.len(), 1);
    assert_eq!((out[0].0, out[0].1, out[0].2), (SERVER6, v6.guest, 129));
    assert_eq!(&out[0].3[4..], &echo[4..], "the guest's identifier back");
    // An error for the request comes back from the gateway as ICMPv6, quoting an echo request
    // (type 128) with the guest's identifier and the request's sequence number.
    let s = host.socks.get_mut(&id).expect("the ping socket");
    s.dgram_errors.push_back(DgramError {
        dst: SocketAddr::new(SERVER6.into(), 0),
        unreachable: Some(Unreachable::V6(3)),
        len: 10,
        head: [128, 0, 0xab, 0xcd, 0x77, 0x77, 0, 1],
    });
    host.to_guest.clear();
    let error = Ready {
        error: true,
        ..Ready::default()
    };
    core.on_ready(&mut host, id, error, now);
    let out = icmp6_out(&host.to_guest);
    assert_eq!(out.len(), 1);
    assert_eq!((out[0].0, out[0].1, out[0].2), (v6.gateway, v6.guest, 1));
    let m = &out[0].3;
    assert_eq!(m[1], 3, "address unreachable, as it came");
    let q = &m[8..];
    assert_eq!(
        (q[0] >> 4, q[6]),
        (6, 58),
        "a quoted IPv6 header of an ICMPv6 packet"
    );
    assert_eq!(u16::from_be_bytes([q[4], q[5]]), 10, "its payload length");
    assert_eq!(&q[8..24], &v6.guest.octets());
    assert_eq!(&q[24..40], &SERVER6.octets());
    assert_eq!(&q[40..48], &[128, 0, 0, 0, 0x12, 0x34, 0, 1]);
    // Echo from :: is nobody's to answer.
    host.to_guest.clear();
    let f = guest_ipv6(GATEWAY_MAC, ip("::"), v6.gateway, 58, 64, &echo, Some(2));
    core.on_frame(&mut host, &f, rx, now);
    assert!(
        icmp6_out(&host.to_guest).is_empty(),
        "echo from :: answered"
    );
    // With IPv6 off, none of this is answered.
    let mut off = Core::new(cfg());
    host.to_guest.clear();
    let f = guest_ipv6(
        mcast,
        guest_ll,
        solicited,
        58,
        255,
        &ns(v6.gateway),
        Some(2),
    );
    off.on_frame(&mut host, &f, rx, now);
    assert!(host.to_guest.is_empty());
    assert_eq!(off.stats().drop_unsupported, 1);
}

/// The policy holds for IPv6: the gateway reaches the host's ::1 only when allowed, IPv4-mapped
/// and -compatible addresses (::ffff:127.0.0.1 would be the host's loopback), `::` and the link
/// are refused; DNS at fd00::3 goes to the host's (IPv4) resolver and answers come back from
/// fd00::3; a UDP datagram without a checksum is dropped.
#[test]
fn ipv6_policy_and_dns() {
    use std::net::Ipv6Addr;
    let (v6, mut core, mut host, now, rx) = ipv6_core();
    let ip = |s: &str| s.parse::<Ipv6Addr>().expect("address");
    let syn = |sport: u16, dport: u16| {
        let mut t = vec![0u8; 20];
        t[0..2].copy_from_slice(&sport.to_be_bytes());
        t[2..4].copy_from_slice(&dport.to_be_bytes());
        t[4..8].copy_from_slice(&1000u32.to_be_bytes());
        t[12] = 5 << 4;
        t[13] = SYN;
        t[14..16].copy_from_slice(&65535u16.to_be_bytes());
        t
    };
    let f = guest_ipv6(
        GATEWAY_MAC,
        v6.guest,
        SERVER6,
        6,
        64,
        &syn(40000, 80),
        Some(16),
    );
    core.on_frame(&mut host, &f, rx, now);
    assert_eq!(host.connects, vec![SocketAddr::new(SERVER6.into(), 80)]);
    for (dst, what) in [
        (v6.gateway, "the gateway without --allow-host-loopback"),
        (ip("::ffff:127.0.0.1"), "IPv4-mapped loopback"),
        (ip("::127.0.0.1"), "IPv4-compatible loopback"),
        (ip("::"), "the unspecified address"),
        (ip("::1"), "loopback"),
        (ip("fd00::9"), "the link"),
        (ip("fe80::1"), "link-local"),
    ] {
        host.to_guest.clear();
        let f = guest_ipv6(GATEWAY_MAC, v6.guest, dst, 6, 64, &syn(40001, 22), Some(16));
        core.on_frame(&mut host, &f, rx, now);
        assert_eq!(host.connects.len(), 1, "{what} connected");
        let rst = host
            .to_guest
            .iter()
            .any(|f| f.len() >= 74 && f[20] == 6 && f[54 + 13] & RST != 0);
        assert!(rst, "{what}: no RST");
    }
    // With permission, the gateway is the host's ::1.
    let mut c = cfg();
    c.ipv6 = Some(v6);
    c.allow_host_loopback = true;
    let mut allowed = Core::new(c);
    let f = guest_ipv6(
        GATEWAY_MAC,
        v6.guest,
        v6.gateway,
        6,
        64,
        &syn(40002, 22),
        Some(16),
    );
    allowed.on_frame(&mut host, &f, rx, now);
    assert_eq!(
        host.connects[1],
        "[::1]:22".parse::<SocketAddr>().expect("address")
    );
    // DNS over IPv6 to fd00::3, forwarded to the IPv4 resolver; the answer comes back as from
    // fd00::3, over IPv6.
    let mut q = vec![0u8; 8];
    q[0..2].copy_from_slice(&5353u16.to_be_bytes());
    q[2..4].copy_from_slice(&53u16.to_be_bytes());
    q[4..6].copy_from_slice(&13u16.to_be_bytes());
    q.extend_from_slice(b"query");
    // Without a checksum (which IPv6 requires): dropped.
    let f = guest_ipv6(GATEWAY_MAC, v6.guest, v6.dns, 17, 64, &q, None);
    core.on_frame(&mut host, &f, rx, now);
    assert_eq!(
        core.stats().drop_checksum,
        1,
        "a zero UDP checksum over IPv6"
    );
    let f = guest_ipv6(GATEWAY_MAC, v6.guest, v6.dns, 17, 64, &q, Some(6));
    core.on_frame(&mut host, &f, rx, now);
    let resolver: SocketAddr = "192.0.2.53:53".parse().expect("address");
    let (&id, s) = host
        .socks
        .iter_mut()
        .find(|(_, s)| !s.udp_out.is_empty())
        .expect("a UDP socket");
    assert_eq!(s.udp_out, vec![(resolver, b"query".to_vec())]);
    s.udp_in.push_back((resolver, b"answer".to_vec()));
    host.to_guest.clear();
    let readable = Ready::READABLE;
    core.on_ready(&mut host, id, readable, now);
    let f = host.to_guest.first().expect("the answer");
    assert_eq!(&f[12..14], &[0x86, 0xdd]);
    assert_eq!(&f[22..38], &v6.dns.octets(), "from fd00::3");
    assert_eq!(&f[38..54], &v6.guest.octets());
    assert_eq!(&f[54..56], &53u16.to_be_bytes());
    assert_eq!(&f[62..], b"answer");
    let pseudo = super::csum::pseudo(v6.dns.into(), v6.guest.into(), 17, f.len() - 54);
    assert_eq!(
        super::csum::fold(super::csum::add(pseudo, &f[54..])),
        0xffff,
        "UDP checksum"
    );
}

/// `--cidr` names a network: one with host bits set is refused (as slirp4netns refuses it), and
/// so is one too small for the guest's fixed addresses.
#[test]
fn a_cidr_with_host_bits_or_too_small_is_refused() {
    let cidr = |s: &str| Config::for_cidr(s.parse().expect("cidr"));
    let ok = cidr("192.0.2.0/24").expect("a network");
    assert_eq!(
        (ok.gateway, ok.dns, ok.guest),
        (
            Ipv4Addr::new(192, 0, 2, 2),
            Ipv4Addr::new(192, 0, 2, 3),
            Ipv4Addr::new(192, 0, 2, 100)
        )
    );
    let err = cidr("192.0.2.5/24").err().unwrap_or_default();
    assert!(
        err.contains("host bits") && err.contains("192.0.2.0/24"),
        "{err}"
    );
    assert!(cidr("192.0.2.0/26").is_err());
}
