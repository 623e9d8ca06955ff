//! One guest UDP source port mapped to one unconnected host UDP socket.
//!
//! The mapping is endpoint-independent (one host port for every destination the guest's port
//! talks to, as a well-behaved NAT does), and the filtering is address-and-port dependent: only
//! datagrams from a peer the guest has sent to come back in.

use std::collections::{BTreeMap, HashMap};
use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, Instant};

/// Peers remembered per flow; the least recently used is forgotten first.
const MAX_PEERS: usize = 32;
/// Clients remembered by a published port.
const MAX_PUBLISHED_PEERS: usize = 4096;

pub(super) struct UdpFlow {
    pub guest: SocketAddr,
    peers: Peers,
    pub last_active: Instant,
    pub idle_timeout: Duration,
    /// The host socket is a published port's: any client may send, and it never expires.
    pub published: bool,
}

impl UdpFlow {
    pub fn new(guest: SocketAddr, now: Instant, idle_timeout: Duration) -> Self {
        UdpFlow {
            guest,
            peers: Peers::default(),
            last_active: now,
            idle_timeout,
            published: false,
        }
    }

    /// Remembers that the guest sent to `seen`, which the host reaches as `real`: the peer
    /// becomes the most recently used, the last to be forgotten.
    pub fn note_peer(&mut self, real: SocketAddr, seen: SocketAddr) {
        let max = if self.published {
            MAX_PUBLISHED_PEERS
        } else {
            MAX_PEERS
        };
        self.peers.note(real, seen, max);
    }

    /// The address the guest knows a host-side peer by, if the guest has sent to it.
    pub fn seen_as(&self, real: SocketAddr) -> Option<SocketAddr> {
        self.peers.by_real.get(&real).map(|&(seen, _)| seen)
    }

    /// The host-side peer behind an address the guest sends to, if it is a known one.
    pub fn real_for(&self, seen: SocketAddr) -> Option<SocketAddr> {
        self.peers.by_seen.get(&seen).copied()
    }
}

/// The peers a flow remembers, the least recently used forgotten first. Every look-up is a hash
/// look-up and forgetting one is a tree's first entry, whatever the count (a published port
/// remembers thousands of clients, and looks one up for every datagram).
#[derive(Default)]
struct Peers {
    /// Host-side peer → (the address the guest knows it by, when it was last used).
    by_real: HashMap<SocketAddr, (SocketAddr, u64)>,
    /// The address the guest knows a peer by → the peer last noted under it.
    by_seen: HashMap<SocketAddr, SocketAddr>,
    /// When last used → peer: the oldest first.
    order: BTreeMap<u64, SocketAddr>,
    clock: u64,
}

impl Peers {
    fn note(&mut self, real: SocketAddr, seen: SocketAddr, max: usize) {
        self.clock += 1;
        let now = self.clock;
        if let Some((known_as, used)) = self.by_real.get_mut(&real) {
            self.order.remove(used);
            *used = now;
            if *known_as != seen && self.by_seen.get(known_as) == Some(&real) {
                self.by_seen.remove(known_as);
            }
            *known_as = seen;
        } else {
            if self.by_real.len() >= max {
                self.forget_oldest();
            }
            self.by_real.insert(real, (seen, now));
        }
        self.order.insert(now, real);
        self.by_seen.insert(seen, real);
    }

    fn forget_oldest(&mut self) {
        let Some((_, gone)) = self.order.pop_first() else {
            return;
        };
        if let Some((seen, _)) = self.by_real.remove(&gone) {
            if self.by_seen.get(&seen) == Some(&gone) {
                self.by_seen.remove(&seen);
            }
        }
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
        assert_eq!(f.peers.by_real.len(), MAX_PEERS);
        assert_eq!(
            (f.peers.by_seen.len(), f.peers.order.len()),
            (MAX_PEERS, MAX_PEERS)
        );
        assert_eq!(f.real_for(peer(100)), Some(peer(100)));
        assert_eq!(f.real_for(peer(1)), None);
    }

    /// A peer the guest comes to know by another address is found by the new one only.
    #[test]
    fn a_peer_seen_anew_is_found_by_its_new_address() {
        let guest = "10.0.2.100:5000".parse().expect("addr");
        let mut f = UdpFlow::new(guest, Instant::now(), Duration::from_secs(60));
        let real: SocketAddr = "127.0.0.1:4000".parse().expect("addr");
        let (old, new): (SocketAddr, SocketAddr) = (
            "10.0.2.2:4000".parse().expect("addr"),
            "10.0.2.2:4001".parse().expect("addr"),
        );
        f.note_peer(real, old);
        f.note_peer(real, new);
        assert_eq!(f.seen_as(real), Some(new));
        assert_eq!((f.real_for(new), f.real_for(old)), (Some(real), None));
        assert_eq!(f.peers.by_real.len(), 1);
    }
}
