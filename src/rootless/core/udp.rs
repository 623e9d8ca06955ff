//! One guest UDP source port mapped to one unconnected host UDP socket.
//!
//! The mapping is endpoint-independent (one host port for every destination the guest's port
//! talks to, as a well-behaved NAT does), and the filtering is address-and-port dependent: only
//! datagrams from a peer the guest has sent to come back in.

use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, Instant};

/// Peers remembered per flow; the oldest is forgotten first.
const MAX_PEERS: usize = 32;
/// Clients remembered by a published port.
const MAX_PUBLISHED_PEERS: usize = 4096;

pub(super) struct UdpFlow {
    pub guest: SocketAddr,
    /// (host-side peer, the address the guest knows it by)
    peers: Vec<(SocketAddr, SocketAddr)>,
    pub last_active: Instant,
    pub idle_timeout: Duration,
    /// The host socket is a published port's: any client may send, and it never expires.
    pub published: bool,
}

impl UdpFlow {
    pub fn new(guest: SocketAddr, now: Instant, idle_timeout: Duration) -> Self {
        UdpFlow {
            guest,
            peers: Vec::new(),
            last_active: now,
            idle_timeout,
            published: false,
        }
    }

    /// Remembers that the guest sent to `seen`, which the host reaches as `real`.
    pub fn note_peer(&mut self, real: SocketAddr, seen: SocketAddr) {
        if let Some(i) = self.peers.iter().position(|(r, _)| *r == real) {
            self.peers[i].1 = seen;
            return;
        }
        let max = if self.published {
            MAX_PUBLISHED_PEERS
        } else {
            MAX_PEERS
        };
        if self.peers.len() >= max {
            self.peers.remove(0);
        }
        self.peers.push((real, seen));
    }

    /// The address the guest knows a host-side peer by, if the guest has sent to it.
    pub fn seen_as(&self, real: SocketAddr) -> Option<SocketAddr> {
        self.peers
            .iter()
            .rev()
            .find(|(r, _)| *r == real)
            .map(|(_, s)| *s)
    }

    /// The host-side peer behind an address the guest sends to, if it is a known one.
    pub fn real_for(&self, seen: SocketAddr) -> Option<SocketAddr> {
        self.peers
            .iter()
            .rev()
            .find(|(_, s)| *s == seen)
            .map(|(r, _)| *r)
    }
}

pub(super) struct PingFlow {
    pub guest: IpAddr,
    /// The echo identifier the guest used (the kernel picks its own for the host socket).
    pub ident: u16,
    pub last_active: Instant,
}
