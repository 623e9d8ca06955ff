//! Host-local address management: which address of a subnet a new container gets.

use std::net::Ipv4Addr;

use ipnet::Ipv4Net;

use crate::state::Allocations;

/// Picks a free host address of `subnet`, skipping the network and broadcast addresses and the
/// gateway, starting after the last one handed out and wrapping around. `None` when all are taken.
pub fn pick(subnet: Ipv4Net, gateway: Ipv4Addr, alloc: &Allocations) -> Option<Ipv4Addr> {
    let first = u32::from(subnet.network()).checked_add(1)?;
    let last = u32::from(subnet.broadcast()).checked_sub(1)?;
    if first > last {
        return None;
    }
    let start = match alloc.last.map(u32::from) {
        Some(l) if (first..=last).contains(&l) => {
            if l == last {
                first
            } else {
                l + 1
            }
        }
        _ => first,
    };
    let span = last - first + 1;
    (0..span)
        .map(|i| Ipv4Addr::from(first + (start - first + i) % span))
        .find(|a| *a != gateway && !alloc.addrs.contains_key(a))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn net(s: &str) -> Ipv4Net {
        s.parse().expect("net")
    }

    #[test]
    fn skips_network_gateway_and_broadcast() {
        let n = net("192.0.2.0/30");
        let gw = Ipv4Addr::new(192, 0, 2, 1);
        let mut a = Allocations::default();
        assert_eq!(pick(n, gw, &a), Some(Ipv4Addr::new(192, 0, 2, 2)));
        a.addrs.insert(Ipv4Addr::new(192, 0, 2, 2), "c1".into());
        assert_eq!(pick(n, gw, &a), None, "a /30 holds one container");
    }

    #[test]
    fn rotates_past_the_last_allocation_and_wraps() {
        let n = net("192.0.2.0/29");
        let gw = Ipv4Addr::new(192, 0, 2, 1);
        let mut a = Allocations {
            last: Some(Ipv4Addr::new(192, 0, 2, 3)),
            ..Default::default()
        };
        assert_eq!(pick(n, gw, &a), Some(Ipv4Addr::new(192, 0, 2, 4)));
        a.last = Some(Ipv4Addr::new(192, 0, 2, 6));
        assert_eq!(
            pick(n, gw, &a),
            Some(Ipv4Addr::new(192, 0, 2, 2)),
            "wraps, skipping the gateway"
        );
    }

    #[test]
    fn exhausts_exactly_when_every_address_is_taken() {
        let n = net("192.0.2.0/26");
        let gw = Ipv4Addr::new(192, 0, 2, 1);
        let mut a = Allocations::default();
        let mut got = std::collections::BTreeSet::new();
        while let Some(ip) = pick(n, gw, &a) {
            assert!(got.insert(ip), "{ip} handed out twice");
            a.addrs.insert(ip, "x".into());
            a.last = Some(ip);
        }
        assert_eq!(got.len(), 64 - 3);
    }

    #[test]
    fn tiny_subnets_have_no_room() {
        assert_eq!(
            pick(
                net("192.0.2.0/31"),
                Ipv4Addr::new(192, 0, 2, 0),
                &Allocations::default()
            ),
            None
        );
        assert_eq!(
            pick(
                net("192.0.2.1/32"),
                Ipv4Addr::new(192, 0, 2, 1),
                &Allocations::default()
            ),
            None
        );
    }
}
