//! Published-port specifications, in the syntax of Docker's and Podman's `-p`:
//! `[HOSTIP:][HOSTPORT[-END]:]CONTAINERPORT[-END][/tcp|/udp]`.
//!
//! A spec expands to one [`PortMapping`] per port: ranges map one to one, and a missing host port means
//! the same as the container port. IPv6 host addresses are written in brackets (`[2001:db8::1]:80:80`).

use std::fmt;
use std::net::IpAddr;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

/// Transport protocol of a published port.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Protocol {
    Tcp,
    Udp,
}

impl Protocol {
    /// The IP protocol number (`meta l4proto`).
    pub fn number(self) -> u8 {
        match self {
            Protocol::Tcp => 6,
            Protocol::Udp => 17,
        }
    }
}

impl fmt::Display for Protocol {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Protocol::Tcp => "tcp",
            Protocol::Udp => "udp",
        })
    }
}

/// One published port: traffic to `host_ip:host_port` (any local address when `host_ip` is `None`)
/// goes to the container's `container_port`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct PortMapping {
    pub host_ip: Option<IpAddr>,
    pub host_port: u16,
    pub container_port: u16,
    pub protocol: Protocol,
}

impl PortMapping {
    /// True when both mappings claim the same host socket (protocol and port, and overlapping addresses).
    pub fn conflicts_with(&self, other: &PortMapping) -> bool {
        self.protocol == other.protocol
            && self.host_port == other.host_port
            && match (self.host_ip, other.host_ip) {
                (None, _) | (_, None) => true,
                (Some(a), Some(b)) => a == b,
            }
    }
}

impl fmt::Display for PortMapping {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.host_ip {
            Some(IpAddr::V6(ip)) => write!(f, "[{ip}]:")?,
            Some(IpAddr::V4(ip)) => write!(f, "{ip}:")?,
            None => {}
        }
        write!(
            f,
            "{}:{}/{}",
            self.host_port, self.container_port, self.protocol
        )
    }
}

/// Why a port spec was rejected.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SpecError {
    #[error("empty port spec")]
    Empty,
    #[error("unknown protocol {0:?} (expected tcp or udp)")]
    Protocol(String),
    #[error("invalid port {0:?} (expected 1-65535)")]
    Port(String),
    #[error("invalid port range {0:?} (start must not exceed end)")]
    Range(String),
    #[error("host range has {host} ports but container range has {container}")]
    RangeLength { host: usize, container: usize },
    #[error("invalid host address {0:?}")]
    HostIp(String),
    #[error("host port {0} is given twice")]
    Duplicate(u16),
    #[error("too many fields (expected [HOSTIP:][HOSTPORT:]CONTAINERPORT[/PROTO])")]
    Fields,
}

/// A parsed `-p` spec, before expansion into single ports.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PortSpec {
    pub host_ip: Option<IpAddr>,
    /// Inclusive host range; `None` means "same as the container range".
    pub host: Option<(u16, u16)>,
    /// Inclusive container range.
    pub container: (u16, u16),
    pub protocol: Protocol,
}

impl PortSpec {
    /// The single-port mappings this spec stands for, in port order.
    pub fn mappings(&self) -> impl Iterator<Item = PortMapping> + '_ {
        let (cstart, cend) = self.container;
        let hstart = self.host.map_or(cstart, |h| h.0);
        (cstart..=cend).map(move |cport| PortMapping {
            host_ip: self.host_ip,
            host_port: hstart + (cport - cstart),
            container_port: cport,
            protocol: self.protocol,
        })
    }
}

impl FromStr for PortSpec {
    type Err = SpecError;

    fn from_str(s: &str) -> Result<Self, SpecError> {
        let s = s.trim();
        if s.is_empty() {
            return Err(SpecError::Empty);
        }
        let (rest, protocol) = match s.rsplit_once('/') {
            Some((rest, proto)) => (rest, parse_protocol(proto)?),
            None => (s, Protocol::Tcp),
        };
        let (host_ip, ports) = split_host_ip(rest)?;
        let fields: Vec<&str> = ports.split(':').collect();
        let (host, container) = match fields.as_slice() {
            [c] => (None, parse_range(c)?),
            [h, c] => (Some(parse_range(h)?), parse_range(c)?),
            // Docker's `HOSTIP::CONTAINERPORT`: an address with an empty host port.
            _ => return Err(SpecError::Fields),
        };
        if let Some(h) = host {
            let hl = usize::from(h.1 - h.0) + 1;
            let cl = usize::from(container.1 - container.0) + 1;
            if hl != cl {
                return Err(SpecError::RangeLength {
                    host: hl,
                    container: cl,
                });
            }
        }
        Ok(PortSpec {
            host_ip,
            host,
            container,
            protocol,
        })
    }
}

fn parse_protocol(p: &str) -> Result<Protocol, SpecError> {
    match p.to_ascii_lowercase().as_str() {
        "tcp" => Ok(Protocol::Tcp),
        "udp" => Ok(Protocol::Udp),
        _ => Err(SpecError::Protocol(p.to_string())),
    }
}

/// Splits off a leading host address: `[v6]:rest`, `a.b.c.d:rest`, `HOSTIP::port` (empty host port).
fn split_host_ip(s: &str) -> Result<(Option<IpAddr>, &str), SpecError> {
    if let Some(inner) = s.strip_prefix('[') {
        let (addr, rest) = inner
            .split_once(']')
            .ok_or_else(|| SpecError::HostIp(s.to_string()))?;
        let ip: IpAddr = addr
            .parse()
            .map_err(|_| SpecError::HostIp(addr.to_string()))?;
        if !ip.is_ipv6() {
            return Err(SpecError::HostIp(addr.to_string()));
        }
        let rest = rest.strip_prefix(':').ok_or(SpecError::Fields)?;
        return Ok((Some(ip), rest.strip_prefix(':').unwrap_or(rest)));
    }
    let fields: Vec<&str> = s.split(':').collect();
    match fields.as_slice() {
        [ip, "", port] => {
            let ip = parse_v4_host(ip)?;
            Ok((Some(ip), port))
        }
        [ip, _, _] => {
            let ip = parse_v4_host(ip)?;
            Ok((Some(ip), &s[ip_len(s)..]))
        }
        [_] | [_, _] => Ok((None, s)),
        _ => Err(SpecError::Fields),
    }
}

fn ip_len(s: &str) -> usize {
    s.find(':').map_or(0, |i| i + 1)
}

fn parse_v4_host(ip: &str) -> Result<IpAddr, SpecError> {
    ip.parse::<std::net::Ipv4Addr>()
        .map(IpAddr::V4)
        .map_err(|_| SpecError::HostIp(ip.to_string()))
}

fn parse_port(p: &str) -> Result<u16, SpecError> {
    if p.is_empty() || !p.bytes().all(|b| b.is_ascii_digit()) {
        return Err(SpecError::Port(p.to_string()));
    }
    match p.parse::<u16>() {
        Ok(0) | Err(_) => Err(SpecError::Port(p.to_string())),
        Ok(n) => Ok(n),
    }
}

fn parse_range(r: &str) -> Result<(u16, u16), SpecError> {
    match r.split_once('-') {
        None => {
            let p = parse_port(r)?;
            Ok((p, p))
        }
        Some((a, b)) => {
            let (a, b) = (parse_port(a)?, parse_port(b)?);
            if a > b {
                return Err(SpecError::Range(r.to_string()));
            }
            Ok((a, b))
        }
    }
}

/// Parses every spec and expands it, rejecting mappings that collide with each other.
pub fn expand_all<S: AsRef<str>>(specs: &[S]) -> Result<Vec<PortMapping>, SpecParseError> {
    let mut out: Vec<PortMapping> = Vec::new();
    for s in specs {
        let spec: PortSpec = s.as_ref().parse().map_err(|source| SpecParseError {
            spec: s.as_ref().to_string(),
            source,
        })?;
        out.extend(spec.mappings());
    }
    let mut sorted = out.clone();
    sorted.sort_by_key(|m| (m.protocol, m.host_port));
    for w in sorted.windows(2) {
        if w[0].conflicts_with(&w[1]) {
            return Err(SpecParseError {
                spec: w[1].to_string(),
                source: SpecError::Duplicate(w[0].host_port),
            });
        }
    }
    Ok(out)
}

/// A spec that failed to parse, with the text the user wrote.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid port spec {spec:?}: {source}")]
pub struct SpecParseError {
    pub spec: String,
    #[source]
    pub source: SpecError,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn one(s: &str) -> Vec<PortMapping> {
        s.parse::<PortSpec>()
            .unwrap_or_else(|e| panic!("{s}: {e}"))
            .mappings()
            .collect()
    }

    fn m(host_ip: Option<&str>, h: u16, c: u16, p: Protocol) -> PortMapping {
        PortMapping {
            host_ip: host_ip.map(|s| s.parse().expect("ip")),
            host_port: h,
            container_port: c,
            protocol: p,
        }
    }

    #[test]
    fn container_port_only_means_same_host_port() {
        assert_eq!(one("80"), vec![m(None, 80, 80, Protocol::Tcp)]);
    }

    #[test]
    fn host_and_container() {
        assert_eq!(one("8080:80"), vec![m(None, 8080, 80, Protocol::Tcp)]);
        assert_eq!(one("8080:80/udp"), vec![m(None, 8080, 80, Protocol::Udp)]);
        assert_eq!(one("8080:80/TCP"), vec![m(None, 8080, 80, Protocol::Tcp)]);
    }

    #[test]
    fn host_ip_v4_and_v6() {
        assert_eq!(
            one("127.0.0.1:8080:80"),
            vec![m(Some("127.0.0.1"), 8080, 80, Protocol::Tcp)]
        );
        assert_eq!(
            one("[2001:db8::1]:8080:80/udp"),
            vec![m(Some("2001:db8::1"), 8080, 80, Protocol::Udp)]
        );
        assert_eq!(
            one("[::1]::80"),
            vec![m(Some("::1"), 80, 80, Protocol::Tcp)]
        );
        assert_eq!(
            one("192.0.2.1::53/udp"),
            vec![m(Some("192.0.2.1"), 53, 53, Protocol::Udp)]
        );
    }

    #[test]
    fn ranges_map_one_to_one() {
        assert_eq!(
            one("9000-9002:7000-7002"),
            vec![
                m(None, 9000, 7000, Protocol::Tcp),
                m(None, 9001, 7001, Protocol::Tcp),
                m(None, 9002, 7002, Protocol::Tcp)
            ]
        );
        assert_eq!(one("7000-7001").len(), 2);
        assert_eq!(one("1-65535").len(), 65535);
    }

    #[test]
    fn malformed_specs_are_rejected_with_the_reason() {
        let cases: &[(&str, SpecError)] = &[
            ("", SpecError::Empty),
            ("abc", SpecError::Port("abc".into())),
            ("70000:80", SpecError::Port("70000".into())),
            ("0:80", SpecError::Port("0".into())),
            ("80:", SpecError::Port("".into())),
            (":80", SpecError::Port("".into())),
            ("+80", SpecError::Port("+80".into())),
            ("80/sctp", SpecError::Protocol("sctp".into())),
            ("80/", SpecError::Protocol("".into())),
            ("5-1", SpecError::Range("5-1".into())),
            (
                "1-5:1-3",
                SpecError::RangeLength {
                    host: 5,
                    container: 3,
                },
            ),
            ("300.0.0.1:80:80", SpecError::HostIp("300.0.0.1".into())),
            (
                "[2001:db8::1:80:80",
                SpecError::HostIp("[2001:db8::1:80:80".into()),
            ),
            ("[192.0.2.1]:80:80", SpecError::HostIp("192.0.2.1".into())),
            ("1:2:3:4", SpecError::Fields),
        ];
        for (s, want) in cases {
            assert_eq!(s.parse::<PortSpec>().as_ref(), Err(want), "spec {s:?}");
        }
    }

    #[test]
    fn expand_all_rejects_collisions_between_specs() {
        let err = expand_all(&["8080:80", "8080:81"]).expect_err("duplicate host port");
        assert_eq!(err.source, SpecError::Duplicate(8080));
        // Same port, different protocol, is fine; so are distinct addresses.
        assert_eq!(
            expand_all(&["8080:80", "8080:80/udp"]).expect("ok").len(),
            2
        );
        assert_eq!(
            expand_all(&["192.0.2.1:80:80", "192.0.2.2:80:80"])
                .expect("ok")
                .len(),
            2
        );
        // A wildcard collides with a specific address.
        assert!(expand_all(&["192.0.2.1:80:80", "80:80"]).is_err());
    }

    #[test]
    fn display_round_trips() {
        for s in [
            "8080:80/tcp",
            "127.0.0.1:53:53/udp",
            "[2001:db8::1]:443:8443/tcp",
        ] {
            let mapping = one(s)[0];
            assert_eq!(mapping.to_string(), s);
            assert_eq!(one(&mapping.to_string()), vec![mapping]);
        }
    }
}
