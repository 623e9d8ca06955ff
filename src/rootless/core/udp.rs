//! One guest UDP source port mapped to one unconnected host UDP socket.
//!
//! The mapping is endpoint-independent (one host port for every destination the guest's port
//! talks to, as a well-behaved NAT does), and the filtering is address-and-port dependent: only
//! datagrams from a peer the guest has sent to come back in.

use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, Instant};

/// Peers remembered per flow; the least recently used is forgotten first.
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

    /// Remembers that the guest sent to `seen`, which the host reaches as `real`: the peer
    /// becomes the most recently used, the last to be forgotten.
    pub fn note_peer(&mut self, real: SocketAddr, seen: SocketAddr) {
        if let Some(i) = self.peers.iter().rposition(|(r, _)| *r == real) {
            if i + 1 == self.peers.len() {
                self.peers[i].1 = seen;
            } else {
                self.peers.remove(i);
                self.peers.push((real, seen));
            }
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

#[cfg(test)]
mod tests {
    use super::*;

    /// A peer the guest keeps using is not the one forgotten when the table is full.
    #[test]
    fn the_least_recently_used_peer_is_forgotten() {
        let guest = "10.0.2.100:5000".parse().expect("addr");
        let mut f = UdpFlow::new(guest, Instant::now(), Duration::from_secs(60));
        let peer = |i: u16| SocketAddr::from(([198, 51, 100, 2], 1000 + i));
        for i in 0..MAX_PEERS as u16 {
            f.note_peer(peer(i), peer(i));
        }
        f.note_peer(peer(0), peer(0)); // in use again
        f.note_peer(peer(100), peer(100)); // the table is full: one goes
        assert_eq!(f.seen_as(peer(0)), Some(peer(0)), "the peer in use stays");
        assert_eq!(f.seen_as(peer(1)), None, "the least recently used goes");
        assert_eq!(f.seen_as(peer(100)), Some(peer(100)));
        assert_eq!(f.peers.len(), MAX_PEERS);
    }
}
