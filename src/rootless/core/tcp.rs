//! One guest TCP connection spliced onto one host kernel socket.
//!
//! Guest → host: in-order payload is written to the host socket at once and acknowledged; what the
//! socket does not take waits in a per-flow queue that the offered window bounds, so a slow host
//! peer shrinks the guest's window instead of growing memory. Out-of-order segments are dropped
//! and answered with a duplicate ACK (the guest's kernel retransmits).
//!
//! Host → guest: data stays in the host socket's receive queue until the guest acknowledges it.
//! The core peeks at it (the socket's peek offset marks what has been sent), sends it as segments
//! no larger than the guest's window allows, and consumes it from the socket when acknowledged; a
//! retransmission rewinds the peek offset. So the server's kernel sees back-pressure from the
//! guest's window, and rnat holds no copy of bulk in-flight data. The exception is a small reply
//! to a flow with nothing in flight (a request's answer, the usual case in request/response
//! traffic): up to `Config::take_max` bytes are read out of the socket instead of peeked and kept
//! until acknowledged, so that the acknowledgement costs no system call. Those bytes count
//! toward `Config::max_buffered`.

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use super::frame::{self, Macs, TcpHeader, ACK, FIN, PSH, RST, SYN};
use super::host::{FlowId, Host, Peek, TxMeta, Unreachable};
use super::{Config, Stats};

/// Window scale rnat offers: windows up to 8 MiB.
pub const OUR_WSCALE: u8 = 7;
const RTO_INITIAL: Duration = Duration::from_millis(200);
const RTO_MAX: Duration = Duration::from_secs(10);
const SYNACK_RTO: Duration = Duration::from_secs(1);
/// Retransmissions without progress before the flow is reset.
const MAX_RETRIES: u8 = 12;
/// The largest TCP payload in one IPv4 packet (an IPv6 one could carry 20 bytes more).
const MAX_PAYLOAD: usize = frame::MAX_IP_PACKET - frame::IP_LEN - frame::TCP_LEN;

pub(crate) fn seq_lt(a: u32, b: u32) -> bool {
    (a.wrapping_sub(b) as i32) < 0
}
pub(crate) fn seq_gt(a: u32, b: u32) -> bool {
    (a.wrapping_sub(b) as i32) > 0
}

/// A segment from the guest, already parsed and checked.
pub(super) struct Segment<'a> {
    pub seq: u32,
    pub ack: u32,
    pub flags: u8,
    pub window: u16,
    pub payload: &'a [u8],
    pub mss: Option<u16>,
    pub wscale: Option<u8>,
}

/// Whether a flow lives on after an event.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Verdict {
    Keep,
    /// The flow is finished and its host socket closed; the caller forgets it.
    Remove,
}

/// Everything a flow may touch while it handles an event, besides itself.
pub(super) struct Out<'a, H: Host> {
    pub host: &'a mut H,
    pub tx: &'a mut [u8],
    pub macs: Macs,
    pub ip_id: &'a mut u16,
    pub cfg: &'a Config,
    pub stats: &'a mut Stats,
    /// Bytes queued in every flow's guest → host queue together.
    pub buffered: &'a mut usize,
    /// Timers armed during the event: (flow, deadline).
    pub timers: &'a mut Vec<(FlowId, Instant)>,
    /// Flows that owe the guest an ACK, sent when the current batch of frames is done.
    pub acks: &'a mut Vec<FlowId>,
    /// Set when a flow tells the guest a window the global cap shut (`Core::flush` then watches
    /// for the cap to lift).
    pub cap_hit: &'a mut bool,
    pub now: Instant,
}

impl<H: Host> Out<'_, H> {
    fn next_id(&mut self) -> u16 {
        *self.ip_id = self.ip_id.wrapping_add(1);
        *self.ip_id
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// The guest's SYN arrived; the host socket is connecting.
    Connecting,
    /// Connected on the host; our SYN-ACK awaits the guest's ACK.
    SynReceived,
    /// A host client connected to a published port; our SYN awaits the guest's SYN-ACK.
    SynSent,
    Established,
}

pub(super) struct TcpFlow {
    pub guest: SocketAddr,
    /// The address the guest connected to (before any translation).
    pub remote: SocketAddr,
    state: State,
    // guest → host
    rcv_nxt: u32,
    rcv_wscale: u8,
    guest_fin: bool,
    host_shut: bool,
    pending: VecDeque<u8>,
    last_window: u32,
    /// Bytes read out of the host socket (taken, not peeked) and sent, not yet acknowledged:
    /// they start at `snd_una`, and the socket's unread data follows them.
    held: Vec<u8>,
    // host → guest
    iss: u32,
    snd_una: u32,
    snd_nxt: u32,
    /// The highest sequence number sent (snd_nxt before any rewind).
    snd_max: u32,
    /// The sequence number our FIN took, once sent.
    fin_seq: Option<u32>,
    snd_wnd: u32,
    snd_wscale: u8,
    mss: usize,
    fin_sent: bool,
    fin_acked: bool,
    window_blocked: bool,
    /// The host peer has shut down its side: peeks go on to the end of the stream.
    host_hup: bool,
    /// The last read found nothing past what was sent (EAGAIN), or stopped short of the room it
    /// had, or there was no read yet: read again only once the socket reports data
    /// (edge-triggered readiness comes with every arrival) or after a rewind.
    host_drained: bool,
    /// The host socket has reported urgent data: a peek may stop short at the urgent mark with
    /// more queued behind it, so a short peek is no longer taken for drained.
    host_urgent: bool,
    /// The host socket has reported an error or a hang-up of both directions (`Ready::error`):
    /// a short read is not taken for the end of the stream, the flow reads on to the error or
    /// the end.
    host_error: bool,
    dupacks: u8,
    rto: Duration,
    retries: u8,
    /// When the flow's timer should fire, and the core's pending wake-up for the flow, if any
    /// (never later than `timer`; see `arm`).
    pub timer: Option<Instant>,
    pub wake: Option<Instant>,
    pub ack_queued: bool,
}

impl TcpFlow {
    /// A flow for a guest SYN; the caller starts the host connect.
    pub fn new(
        guest: SocketAddr,
        remote: SocketAddr,
        syn: &Segment,
        iss: u32,
        cfg: &Config,
    ) -> Self {
        let (snd_wscale, rcv_wscale) = match syn.wscale {
            Some(ws) => (ws.min(14), OUR_WSCALE),
            None => (0, 0),
        };
        let mtu_mss = usize::from(cfg.mtu) - frame::ip_len(guest.ip()) - frame::TCP_LEN;
        TcpFlow {
            guest,
            remote,
            state: State::Connecting,
            rcv_nxt: syn.seq.wrapping_add(1),
            rcv_wscale,
            guest_fin: false,
            host_shut: false,
            pending: VecDeque::new(),
            last_window: 0,
            held: Vec::new(),
            iss,
            snd_una: iss,
            snd_nxt: iss,
            snd_max: iss,
            fin_seq: None,
            snd_wnd: u32::from(syn.window),
            snd_wscale,
            mss: usize::from(syn.mss.unwrap_or(536)).clamp(64, mtu_mss),
            fin_sent: false,
            fin_acked: false,
            window_blocked: false,
            host_hup: false,
            // Nothing to read until the socket says so: it is registered (edge-triggered)
            // before it could hold data, or, accepted, with it (a registration reports what is
            // already there).
            host_drained: true,
            host_urgent: false,
            host_error: false,
            dupacks: 0,
            rto: RTO_INITIAL,
            retries: 0,
            timer: None,
            wake: None,
            ack_queued: false,
        }
    }

    /// A flow for a host client of a published port (already accepted on the host): the caller
    /// sends the SYN with `open_to_guest`.
    pub fn inbound(guest: SocketAddr, client: SocketAddr, iss: u32, cfg: &Config) -> Self {
        let syn = Segment {
            seq: 0,
            ack: 0,
            flags: SYN,
            window: 0,
            payload: &[],
            mss: None,
            wscale: None,
        };
        let mut f = TcpFlow::new(guest, client, &syn, iss, cfg);
        f.state = State::SynSent;
        f.rcv_nxt = 0;
        f.rcv_wscale = OUR_WSCALE;
        f
    }

    /// Sends the SYN of an inbound flow (again, on a timeout).
    pub fn open_to_guest(&mut self, id: FlowId, out: &mut Out<impl Host>) {
        let mss = self.our_mss(out.cfg);
        let [hi, lo] = mss.to_be_bytes();
        self.snd_nxt = self.iss.wrapping_add(1);
        self.snd_max = self.snd_nxt;
        // The window in a SYN is never scaled.
        let window = self.window_bytes(out.cfg, *out.buffered).min(65535);
        self.last_window = window;
        let h = TcpHeader {
            src: self.remote,
            dst: self.guest,
            seq: self.iss,
            ack: 0,
            flags: SYN,
            window: window as u16,
            options: &[2, 4, hi, lo, 1, 3, 3, OUR_WSCALE],
        };
        let ipid = out.next_id();
        let (len, meta) = frame::tcp(out.tx, out.macs, &h, 0, ipid, out.cfg.offload);
        out.host.emit(&out.tx[..len], meta);
        out.stats.frames_out += 1;
        let backoff = SYNACK_RTO * u32::from(self.retries.max(1));
        self.arm(id, out, backoff);
    }

    /// Holds an inbound flow back before its SYN: its timer fires after `wait` (the core then
    /// decides).
    pub fn hold(&mut self, id: FlowId, out: &mut Out<impl Host>, wait: Duration) {
        self.arm(id, out, wait);
    }

    /// Whether the host connection is over: closed both ways (the peer's FIN reported and ours
    /// sent), or failed or hung up.
    pub fn host_over(&self) -> bool {
        self.host_error || self.host_hup && self.host_shut
    }

    /// Whether the guest was last told the window is shut.
    pub fn told_zero_window(&self) -> bool {
        self.last_window == 0 && self.state == State::Established
    }

    /// The MSS rnat announces: what the guest's MTU leaves after the headers.
    fn our_mss(&self, cfg: &Config) -> u16 {
        (usize::from(cfg.mtu) - frame::ip_len(self.guest.ip()) - frame::TCP_LEN).min(65535) as u16
    }

    /// The guest's initial sequence number (for an ICMP error quoting its SYN).
    pub fn guest_isn(&self) -> u32 {
        self.rcv_nxt.wrapping_sub(1)
    }

    /// Sets the flow's timer. The core's heap holds at most one wake-up per flow, the earliest
    /// asked for: a later deadline (the usual case, a retransmission timer pushed back on every
    /// send) waits for that wake-up, which hands it on (`Core::on_timer`).
    fn arm(&mut self, id: FlowId, out: &mut Out<impl Host>, after: Duration) {
        let at = out.now + after;
        self.timer = Some(at);
        if self.wake.is_none_or(|w| at < w) {
            self.wake = Some(at);
            out.timers.push((id, at));
        }
    }

    /// The receive window to offer the guest, in bytes.
    fn window_bytes(&self, cfg: &Config, buffered: usize) -> u32 {
        if buffered >= cfg.max_buffered {
            return 0;
        }
        (cfg.flow_window as usize).saturating_sub(self.pending.len()) as u32
    }

    /// The window field of a segment to the guest (scaled). A window the global cap shut is
    /// noted in `Out::cap_hit`, so that the core tells the flow when the cap lifts.
    fn window_field(&mut self, out: &mut Out<impl Host>) -> u16 {
        let bytes = self.window_bytes(out.cfg, *out.buffered);
        self.last_window = bytes;
        if bytes == 0 && *out.buffered >= out.cfg.max_buffered {
            *out.cap_hit = true;
        }
        (bytes >> self.rcv_wscale).min(65535) as u16
    }

    /// Sends a segment with no payload.
    fn send_ctl(&mut self, out: &mut Out<impl Host>, flags: u8, seq: u32, options: &[u8]) {
        let window = if flags & SYN != 0 {
            // The window in a SYN segment is never scaled (RFC 7323 2.2).
            let bytes = self.window_bytes(out.cfg, *out.buffered).min(65535);
            self.last_window = bytes;
            bytes as u16
        } else {
            self.window_field(out)
        };
        let h = TcpHeader {
            src: self.remote,
            dst: self.guest,
            seq,
            ack: self.rcv_nxt,
            flags,
            window,
            options,
        };
        let id = out.next_id();
        let (len, meta) = frame::tcp(out.tx, out.macs, &h, 0, id, out.cfg.offload);
        out.host.emit(&out.tx[..len], meta);
        out.stats.frames_out += 1;
        if flags & ACK != 0 {
            self.ack_queued = false;
        }
    }

    /// Sends an ACK now (not batched).
    pub fn send_ack(&mut self, out: &mut Out<impl Host>) {
        self.send_ctl(out, ACK, self.snd_nxt, &[]);
    }

    fn queue_ack(&mut self, id: FlowId, out: &mut Out<impl Host>) {
        if !self.ack_queued {
            self.ack_queued = true;
            out.acks.push(id);
        }
    }

    fn send_synack(&mut self, out: &mut Out<impl Host>) {
        let mss = self.our_mss(out.cfg);
        let [hi, lo] = mss.to_be_bytes();
        if self.rcv_wscale > 0 {
            self.send_ctl(
                out,
                SYN | ACK,
                self.iss,
                &[2, 4, hi, lo, 1, 3, 3, self.rcv_wscale],
            );
        } else {
            self.send_ctl(out, SYN | ACK, self.iss, &[2, 4, hi, lo]);
        }
    }

    /// Resets the guest's side and closes the host socket.
    pub(super) fn abort(
        &mut self,
        id: FlowId,
        out: &mut Out<impl Host>,
        reset_host: bool,
    ) -> Verdict {
        self.send_ctl(out, RST | ACK, self.snd_nxt, &[]);
        out.host.tcp_close(id, reset_host);
        self.release(out);
        out.stats.tcp_reset += 1;
        Verdict::Remove
    }

    /// Closes an inbound flow that never sent its SYN, resetting its client; the guest is told
    /// nothing (the 4-tuple is another flow's as far as it knows).
    pub fn drop_unopened(&mut self, id: FlowId, out: &mut Out<impl Host>) -> Verdict {
        out.host.tcp_close(id, true);
        self.release(out);
        out.stats.tcp_reset += 1;
        Verdict::Remove
    }

    /// Gives back the flow's share of the buffered bytes (it is going away).
    fn release(&mut self, out: &mut Out<impl Host>) {
        *out.buffered -= self.pending.len() + self.held.len();
    }

    fn finish(&mut self, id: FlowId, out: &mut Out<impl Host>) -> Verdict {
        if self.ack_queued {
            self.send_ack(out);
        }
        out.host.tcp_close(id, false);
        self.release(out);
        out.stats.tcp_closed += 1;
        Verdict::Remove
    }

    /// The host connect has reported readiness.
    pub fn on_connect_ready(&mut self, id: FlowId, out: &mut Out<impl Host>) -> Verdict {
        match out.host.tcp_connect_result(id) {
            Ok(()) => {
                self.state = State::SynReceived;
                self.snd_nxt = self.iss.wrapping_add(1);
                self.snd_max = self.snd_nxt;
                self.send_synack(out);
                self.arm(id, out, SYNACK_RTO);
                Verdict::Keep
            }
            Err(e) if is_in_progress(&e) => Verdict::Keep,
            Err(e) => {
                self.refuse_connect(out, &e);
                out.host.tcp_close(id, false);
                Verdict::Remove
            }
        }
    }

    /// Tells the guest its connection attempt failed: RST for a refused port, ICMP unreachable
    /// for an address the host cannot reach.
    pub fn refuse_connect(&mut self, out: &mut Out<impl Host>, e: &std::io::Error) {
        out.stats.tcp_connect_failed += 1;
        let why = match e.raw_os_error() {
            Some(libc::ECONNREFUSED) | None => {
                self.send_ctl(out, RST | ACK, 0, &[]);
                return;
            }
            Some(libc::ENETUNREACH) => Unreachable::NETWORK,
            Some(libc::EACCES) | Some(libc::EPERM) => Unreachable::PROHIBITED,
            Some(_) => Unreachable::HOST,
        };
        let id = out.next_id();
        let quote = frame::Quote::syn(self.guest, self.remote, self.guest_isn());
        let from = out.cfg.gateway_for(self.guest.ip());
        let len = frame::unreachable(out.tx, out.macs, from, why, &quote, id);
        out.host.emit(&out.tx[..len], TxMeta::default());
        out.stats.frames_out += 1;
    }

    /// A segment from the guest for this flow.
    pub fn on_segment(&mut self, id: FlowId, seg: &Segment, out: &mut Out<impl Host>) -> Verdict {
        if seg.flags & RST != 0 {
            out.host.tcp_close(id, true);
            self.release(out);
            out.stats.tcp_reset_by_guest += 1;
            return Verdict::Remove;
        }
        match self.state {
            State::Connecting => return Verdict::Keep, // SYN retransmissions: the connect goes on
            State::SynSent => {
                // Only the guest's SYN-ACK for our SYN moves things on.
                if seg.flags & (SYN | ACK) != SYN | ACK || seg.ack != self.iss.wrapping_add(1) {
                    if seg.flags & ACK != 0 && seg.flags & SYN == 0 {
                        // The guest answered our SYN with a bare ACK: an old connection on this
                        // 4-tuple is in its TIME_WAIT. The RST ends it, and the SYN goes again
                        // at once rather than after the retransmission timer.
                        self.send_ctl(out, RST, seg.ack, &[]);
                        self.retries += 1;
                        if self.retries > 6 {
                            out.host.tcp_close(id, true);
                            self.release(out);
                            out.stats.tcp_reset += 1;
                            return Verdict::Remove;
                        }
                        out.stats.tcp_syn_after_timewait += 1;
                        self.open_to_guest(id, out);
                    }
                    return Verdict::Keep;
                }
                self.rcv_nxt = seg.seq.wrapping_add(1);
                match seg.wscale {
                    Some(ws) => self.snd_wscale = ws.min(14),
                    None => {
                        self.snd_wscale = 0;
                        self.rcv_wscale = 0;
                    }
                }
                let mtu_mss = usize::from(self.our_mss(out.cfg));
                self.mss = usize::from(seg.mss.unwrap_or(536)).clamp(64, mtu_mss);
                self.snd_wnd = u32::from(seg.window); // unscaled in a SYN
                self.snd_una = seg.ack;
                self.state = State::Established;
                self.timer = None;
                self.retries = 0;
                // The client's first bytes (often already waiting) carry the ACK of the guest's
                // SYN-ACK; a pure ACK goes only if there is nothing to send.
                let before = self.snd_nxt;
                if let Verdict::Remove = self.try_send(id, out) {
                    return Verdict::Remove;
                }
                if self.snd_nxt == before {
                    self.send_ack(out);
                }
                return self.check_done(id, out);
            }
            State::SynReceived => {
                if seg.flags & SYN != 0 {
                    self.send_synack(out);
                    return Verdict::Keep;
                }
                if seg.flags & ACK == 0 {
                    return Verdict::Keep;
                }
                if seg.ack != self.iss.wrapping_add(1) {
                    self.send_ctl(out, RST, seg.ack, &[]);
                    return Verdict::Keep;
                }
                self.state = State::Established;
                self.snd_una = seg.ack;
                self.timer = None;
                self.rto = RTO_INITIAL;
                self.retries = 0;
            }
            State::Established => {
                if seg.flags & SYN != 0 {
                    self.send_ack(out); // a stray SYN: tell the guest where we are
                    return Verdict::Keep;
                }
            }
        }
        if seg.flags & ACK != 0 {
            self.on_ack(id, seg, out);
        }
        if let Verdict::Remove = self.on_data(id, seg, out) {
            return Verdict::Remove;
        }
        if let Verdict::Remove = self.try_send(id, out) {
            return Verdict::Remove;
        }
        self.check_done(id, out)
    }

    fn check_done(&mut self, id: FlowId, out: &mut Out<impl Host>) -> Verdict {
        if self.guest_fin && self.host_shut && self.fin_acked {
            return self.finish(id, out);
        }
        Verdict::Keep
    }

    fn on_ack(&mut self, id: FlowId, seg: &Segment, out: &mut Out<impl Host>) {
        let wnd = u32::from(seg.window) << self.snd_wscale;
        let ack = seg.ack;
        if seq_gt(ack, self.snd_nxt) {
            if seq_gt(ack, self.snd_max) {
                out.stats.tcp_bad_ack += 1;
                self.queue_ack(id, out);
                return;
            }
            // After a rewind the guest acknowledges what it had before: take it, and go on
            // from there (the consume below moves the peek offset past it).
            self.snd_nxt = ack;
            if self.fin_seq == Some(ack.wrapping_sub(1)) {
                self.fin_sent = true;
            }
        }
        if seq_gt(ack, self.snd_una) {
            let mut n = ack.wrapping_sub(self.snd_una) as usize;
            if self.fin_sent && ack == self.snd_nxt {
                self.fin_acked = true;
                n -= 1;
            }
            let from_held = n.min(self.held.len());
            if from_held > 0 {
                self.held.drain(..from_held);
                *out.buffered -= from_held;
                if self.held.is_empty() {
                    self.held = Vec::new(); // give the memory back
                }
            }
            if n > from_held {
                out.host.tcp_consume(id, n - from_held);
            }
            self.snd_una = ack;
            self.dupacks = 0;
            self.retries = 0;
            self.rto = RTO_INITIAL;
            if self.snd_una == self.snd_nxt {
                self.timer = None;
            } else {
                self.arm(id, out, self.rto);
            }
        } else if ack == self.snd_una
            && seg.payload.is_empty()
            && seg.flags & FIN == 0
            && self.snd_nxt != self.snd_una
            && wnd == self.snd_wnd
        {
            self.dupacks = self.dupacks.saturating_add(1);
            if self.dupacks == 3 {
                out.stats.tcp_fast_retransmit += 1;
                self.rewind(out, id);
            }
        }
        self.snd_wnd = wnd;
    }

    /// Goes back to the first unacknowledged byte; the next `try_send` sends it again.
    fn rewind(&mut self, out: &mut Out<impl Host>, id: FlowId) {
        out.host.tcp_rewind(id);
        self.host_drained = false;
        self.snd_nxt = self.snd_una;
        if self.fin_sent && !self.fin_acked {
            self.fin_sent = false;
        }
    }

    fn on_data(&mut self, id: FlowId, seg: &Segment, out: &mut Out<impl Host>) -> Verdict {
        let mut data = seg.payload;
        let mut fin = seg.flags & FIN != 0;
        if data.is_empty() && !fin {
            // An empty segment off rcv_nxt (a zero-window probe at rcv_nxt-1) gets an ACK with
            // the current window (RFC 9293 3.10.7.4): that is how a closed window reopens.
            if seg.seq != self.rcv_nxt {
                self.queue_ack(id, out);
            }
            return Verdict::Keep;
        }
        if self.guest_fin {
            self.queue_ack(id, out); // a retransmission after the FIN
            return Verdict::Keep;
        }
        let mut seq = seg.seq;
        if seq_lt(seq, self.rcv_nxt) {
            let skip = self.rcv_nxt.wrapping_sub(seq) as usize;
            if skip > data.len() || (skip == data.len() && !fin) {
                self.queue_ack(id, out); // all old: the guest missed our ACK
                return Verdict::Keep;
            }
            data = &data[skip..];
            seq = self.rcv_nxt;
        }
        if seq != self.rcv_nxt {
            out.stats.tcp_out_of_order += 1;
            self.send_ack(out);
            return Verdict::Keep;
        }
        let room = self.window_bytes(out.cfg, *out.buffered) as usize;
        if data.len() > room {
            data = &data[..room];
            fin = false;
            out.stats.tcp_beyond_window += 1;
        }
        let accepted = data.len();
        if accepted > 0 {
            let mut rest = data;
            if self.pending.is_empty() {
                match out.host.tcp_send(id, rest) {
                    Ok(n) => rest = &rest[n..],
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
                    Err(_) => return self.abort(id, out, true),
                }
            }
            self.pending.extend(rest);
            *out.buffered += rest.len();
            self.rcv_nxt = self.rcv_nxt.wrapping_add(accepted as u32);
            out.stats.tcp_bytes_from_guest += accepted as u64;
        }
        if fin {
            self.rcv_nxt = self.rcv_nxt.wrapping_add(1);
            self.guest_fin = true;
            // No look at the host socket here: the peer's close reports as it arrives (one not
            // reported yet comes with the next wait), and a close in reply to the guest's FIN
            // cannot have come yet, as that FIN goes out below. Looking cost an EAGAIN per
            // connection.
            if self.pending.is_empty() {
                out.host.tcp_shutdown(id);
                self.host_shut = true;
            }
        }
        self.queue_ack(id, out);
        Verdict::Keep
    }

    /// Sends what the host socket has and the guest's window allows.
    pub fn try_send(&mut self, id: FlowId, out: &mut Out<impl Host>) -> Verdict {
        if self.state != State::Established {
            return Verdict::Keep;
        }
        let max_seg = if out.cfg.offload {
            MAX_PAYLOAD
        } else {
            self.mss
        };
        while !self.fin_sent {
            let inflight = self.snd_nxt.wrapping_sub(self.snd_una);
            if inflight >= self.snd_wnd {
                self.window_blocked = true;
                if self.snd_wnd == 0 && self.timer.is_none() {
                    self.arm(id, out, self.rto);
                }
                break;
            }
            self.window_blocked = false;
            let room = ((self.snd_wnd - inflight) as usize).min(max_seg);
            let at = frame::tcp_payload_at(self.guest.ip());
            let off = inflight as usize;
            // Where the next bytes come from: what was taken (sent again after a rewind), else
            // the socket, taken when nothing is in flight and there is room to hold it. `asked`
            // is what a read of the socket had room for (`None`: no read).
            let (read, asked) = if off < self.held.len() {
                let n = room.min(self.held.len() - off);
                out.tx[at..at + n].copy_from_slice(&self.held[off..off + n]);
                (Ok(Peek::Data(n)), None)
            } else if self.host_drained && !self.host_hup {
                break;
            } else if off == 0
                && out.cfg.take_max > 0
                && *out.buffered + out.cfg.take_max <= out.cfg.max_buffered
            {
                let want = room.min(out.cfg.take_max);
                let read = out.host.tcp_take(id, &mut out.tx[at..at + want]);
                if let Ok(Peek::Data(n)) = read {
                    self.held.extend_from_slice(&out.tx[at..at + n]);
                    *out.buffered += n;
                }
                (read, Some(want))
            } else {
                (
                    out.host.tcp_peek(id, &mut out.tx[at..at + room]),
                    Some(room),
                )
            };
            match read {
                Ok(Peek::Data(0)) | Ok(Peek::WouldBlock) => {
                    // With urgent data about, the next ACK looks again: the driver's peek
                    // without SO_PEEK_OFF cannot tell a read stopped at the urgent mark right
                    // after what was sent from one that found nothing new.
                    self.host_drained = !self.host_urgent;
                    break;
                }
                Ok(Peek::Later) => break,
                Ok(Peek::Data(n)) => {
                    let window = self.window_field(out);
                    let h = TcpHeader {
                        src: self.remote,
                        dst: self.guest,
                        seq: self.snd_nxt,
                        ack: self.rcv_nxt,
                        flags: ACK | PSH,
                        window,
                        options: &[],
                    };
                    let ipid = out.next_id();
                    let (len, mut meta) =
                        frame::tcp(out.tx, out.macs, &h, n, ipid, out.cfg.offload);
                    if n > self.mss {
                        meta.gso_mss = Some(self.mss as u16);
                    }
                    out.host.emit(&out.tx[..len], meta);
                    out.stats.frames_out += 1;
                    out.stats.tcp_bytes_to_guest += n as u64;
                    self.ack_queued = false;
                    self.snd_nxt = self.snd_nxt.wrapping_add(n as u32);
                    if seq_gt(self.snd_nxt, self.snd_max) {
                        self.snd_max = self.snd_nxt;
                    }
                    if self.timer.is_none() {
                        self.arm(id, out, self.rto);
                    }
                    // A short read drained the socket: a read stops short only at the end of the
                    // queue, at the end of the stream or at an urgent mark (reported as urgent
                    // first). Anything that arrives later is reported, so peeking again now
                    // would only say EAGAIN. After the peer's close was reported, the end of the
                    // queue is the end of the stream (the peer's FIN comes after all its data):
                    // our FIN goes at once, without a read to hear it, unless urgent data (the
                    // mark) or an error (a reset) is about, when the flow reads on.
                    if asked.is_some_and(|a| n < a) {
                        if !self.host_hup {
                            self.host_drained = !self.host_urgent;
                            break;
                        }
                        if !self.host_urgent && !self.host_error {
                            self.send_fin(id, out);
                        }
                    }
                }
                Ok(Peek::Eof) => self.send_fin(id, out),
                Err(_) => return self.abort(id, out, false),
            }
        }
        Verdict::Keep
    }

    /// Sends our FIN (the host peer's end of the stream) after everything sent so far.
    fn send_fin(&mut self, id: FlowId, out: &mut Out<impl Host>) {
        self.send_ctl(out, FIN | ACK, self.snd_nxt, &[]);
        self.fin_seq = Some(self.snd_nxt);
        self.snd_nxt = self.snd_nxt.wrapping_add(1);
        if seq_gt(self.snd_nxt, self.snd_max) {
            self.snd_max = self.snd_nxt;
        }
        self.fin_sent = true;
        if self.timer.is_none() {
            self.arm(id, out, self.rto);
        }
    }

    /// The host socket became writable: move queued guest data into it.
    fn drain(&mut self, id: FlowId, out: &mut Out<impl Host>) -> Verdict {
        let before = self.last_window;
        while !self.pending.is_empty() {
            let (a, _) = self.pending.as_slices();
            match out.host.tcp_send(id, a) {
                Ok(0) => break,
                Ok(n) => {
                    self.pending.drain(..n);
                    *out.buffered -= n;
                }
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
                Err(_) => return self.abort(id, out, true),
            }
        }
        if self.pending.is_empty() {
            self.pending = VecDeque::new(); // give the memory back
            if self.guest_fin && !self.host_shut {
                out.host.tcp_shutdown(id);
                self.host_shut = true;
            }
        }
        // Reopen a window the guest may be waiting on.
        let now_wnd = self.window_bytes(out.cfg, *out.buffered);
        if self.state == State::Established
            && now_wnd >= before.saturating_add(self.mss as u32)
            && before < out.cfg.flow_window / 2
        {
            self.send_ack(out);
        }
        self.check_done(id, out)
    }

    /// The host socket reported readiness.
    pub fn on_ready(
        &mut self,
        id: FlowId,
        ready: super::host::Ready,
        out: &mut Out<impl Host>,
    ) -> Verdict {
        if ready.hup {
            self.host_hup = true;
        }
        if ready.urgent {
            self.host_urgent = true;
        }
        if ready.error {
            self.host_error = true;
        }
        if ready.readable || ready.error || ready.hup {
            self.host_drained = false;
        }
        if self.state == State::Connecting {
            // A connect ends in writability (connected) or an error: only then ask how.
            if ready.writable || ready.error {
                return self.on_connect_ready(id, out);
            }
            return Verdict::Keep;
        }
        if self.state == State::SynSent {
            // The host client may already send or close; that waits for the guest's SYN-ACK.
            return Verdict::Keep;
        }
        if (ready.writable || ready.error) && !self.pending.is_empty()
            || (self.guest_fin && !self.host_shut)
        {
            if let Verdict::Remove = self.drain(id, out) {
                return Verdict::Remove;
            }
        }
        if ready.readable || ready.error {
            if let Verdict::Remove = self.try_send(id, out) {
                return Verdict::Remove;
            }
            return self.check_done(id, out);
        }
        Verdict::Keep
    }

    /// The flow's timer fired.
    pub fn on_timer(&mut self, id: FlowId, out: &mut Out<impl Host>) -> Verdict {
        match self.timer {
            Some(at) if at <= out.now => self.timer = None,
            _ => return Verdict::Keep,
        }
        match self.state {
            State::Connecting => Verdict::Keep,
            State::SynSent => {
                self.retries += 1;
                if self.retries > 6 {
                    out.host.tcp_close(id, true);
                    self.release(out);
                    out.stats.tcp_reset += 1;
                    return Verdict::Remove;
                }
                self.open_to_guest(id, out);
                Verdict::Keep
            }
            State::SynReceived => {
                self.retries += 1;
                if self.retries > 6 {
                    return self.abort(id, out, true);
                }
                self.send_synack(out);
                self.arm(id, out, SYNACK_RTO * u32::from(self.retries));
                Verdict::Keep
            }
            State::Established => {
                if self.snd_nxt != self.snd_una {
                    self.retries += 1;
                    if self.retries > MAX_RETRIES {
                        return self.abort(id, out, true);
                    }
                    out.stats.tcp_timeout_retransmit += 1;
                    self.rto = (self.rto * 2).min(RTO_MAX);
                    self.rewind(out, id);
                    let v = self.try_send(id, out);
                    if self.timer.is_none() && self.snd_nxt != self.snd_una {
                        self.arm(id, out, self.rto);
                    }
                    v
                } else if self.snd_wnd == 0 && self.window_blocked {
                    // Zero-window probe: an old sequence number makes the guest answer with its
                    // current window.
                    self.send_ctl(out, ACK, self.snd_nxt.wrapping_sub(1), &[]);
                    self.rto = (self.rto * 2).min(RTO_MAX);
                    self.arm(id, out, self.rto);
                    Verdict::Keep
                } else {
                    Verdict::Keep
                }
            }
        }
    }
}

fn is_in_progress(e: &std::io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc::EINPROGRESS) | Some(libc::EALREADY)
    ) || e.kind() == std::io::ErrorKind::WouldBlock
}
