//! The container's resolv.conf, derived from the host's.
//!
//! When the host resolves through a loopback stub (systemd-resolved's 127.0.0.53, dnsmasq on
//! 127.0.0.1), the container cannot reach it directly: its resolv.conf names the bridge gateway
//! instead, and the firewall forwards gateway:53 to the stub (see `nft::Firewall::set_dns_forward`).

use std::net::{IpAddr, Ipv4Addr};

/// What the container's resolver configuration needs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ResolvPlan {
    pub contents: String,
    /// A host-loopback resolver that gateway:53 must be forwarded to.
    pub forward_to: Option<Ipv4Addr>,
}

/// Plans the container's resolv.conf from the host's text and the container's gateway.
pub fn plan(host: &str, gateway: Ipv4Addr) -> ResolvPlan {
    let mut others = Vec::new();
    let mut servers: Vec<IpAddr> = Vec::new();
    for line in host.lines() {
        let mut words = line.split_whitespace();
        if words.next() == Some("nameserver") {
            if let Some(Ok(ip)) = words.next().map(str::parse::<IpAddr>) {
                servers.push(ip);
            }
        } else {
            others.push(line);
        }
    }
    // No nameserver line means the resolver library's default: the local host.
    if servers.is_empty() {
        servers.push(IpAddr::V4(Ipv4Addr::LOCALHOST));
    }
    let forward_to = servers.iter().find_map(|s| match s {
        IpAddr::V4(v4) if v4.is_loopback() => Some(*v4),
        _ => None,
    });
    let mut lines: Vec<String> = Vec::new();
    if forward_to.is_some() {
        lines.push(format!("nameserver {gateway}"));
    }
    for s in &servers {
        if !s.is_loopback() {
            lines.push(format!("nameserver {s}"));
        }
    }
    lines.extend(
        others
            .iter()
            .filter(|l| !l.trim().is_empty())
            .map(|l| l.to_string()),
    );
    let mut contents = lines.join("\n");
    contents.push('\n');
    ResolvPlan {
        contents,
        forward_to,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const GW: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 1);

    #[test]
    fn loopback_stub_is_reached_through_the_gateway() {
        let p = plan(
            "# generated\nnameserver 127.0.0.53\noptions edns0 trust-ad\nsearch example.test\n",
            GW,
        );
        assert_eq!(p.forward_to, Some(Ipv4Addr::new(127, 0, 0, 53)));
        assert_eq!(
            p.contents,
            "nameserver 192.0.2.1\n# generated\noptions edns0 trust-ad\nsearch example.test\n"
        );
    }

    #[test]
    fn reachable_servers_are_kept_as_they_are() {
        let p = plan("nameserver 198.51.100.2\nnameserver 2001:db8::53\n", GW);
        assert_eq!(p.forward_to, None);
        assert_eq!(
            p.contents,
            "nameserver 198.51.100.2\nnameserver 2001:db8::53\n"
        );
    }

    #[test]
    fn mixed_keeps_the_remote_ones_after_the_gateway() {
        let p = plan(
            "nameserver 127.0.0.1\nnameserver ::1\nnameserver 203.0.113.53\n",
            GW,
        );
        assert_eq!(p.forward_to, Some(Ipv4Addr::LOCALHOST));
        assert_eq!(
            p.contents,
            "nameserver 192.0.2.1\nnameserver 203.0.113.53\n"
        );
    }

    #[test]
    fn no_nameserver_means_localhost() {
        assert_eq!(plan("", GW).forward_to, Some(Ipv4Addr::LOCALHOST));
    }
}
