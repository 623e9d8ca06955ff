//! Pure parsers for what rnat and the kernel report: `rnat ps --json`,
//! the `ip rnat` maps in `nft -j list ruleset`, and IPAM state files.
//! No processes are started here.

use std::collections::BTreeSet;
use std::net::Ipv4Addr;

use serde_json::Value;

#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct PortMapping {
    pub host_ip: String,
    pub host_port: u16,
    pub container_port: u16,
    pub protocol: String,
}

/// One entry of `rnat ps --json`.
#[derive(Debug, Clone)]
pub struct Container {
    pub id: String,
    pub name: Option<String>,
    pub network: String,
    pub ip: String,
    /// `None` (JSON null) while rnat is still setting the container up.
    pub pid: Option<u32>,
    /// `None` (JSON null) while rnat is still setting the container up.
    pub netns: Option<String>,
    pub ports: Vec<PortMapping>,
}

impl Container {
    /// Parses one entry; panics with the entry on any contract violation.
    pub fn from_json(v: &Value) -> Container {
        let s = |k: &str| -> String {
            v.get(k)
                .and_then(Value::as_str)
                .unwrap_or_else(|| panic!("`rnat ps --json` entry lacks string field {k:?}: {v}"))
                .to_string()
        };
        let ports = v
            .get("ports")
            .and_then(Value::as_array)
            .unwrap_or_else(|| panic!("`rnat ps --json` entry lacks array \"ports\": {v}"))
            .iter()
            .map(|p| {
                let num = |k: &str| -> u16 {
                    p.get(k)
                        .and_then(Value::as_u64)
                        .and_then(|n| u16::try_from(n).ok())
                        .unwrap_or_else(|| panic!("port entry lacks u16 {k:?}: {p}"))
                };
                let text = |k: &str| -> String {
                    p.get(k)
                        .and_then(Value::as_str)
                        .unwrap_or_else(|| panic!("port entry lacks string {k:?}: {p}"))
                        .to_string()
                };
                PortMapping {
                    host_ip: text("host_ip"),
                    host_port: num("host_port"),
                    container_port: num("container_port"),
                    protocol: text("protocol"),
                }
            })
            .collect();
        Container {
            id: s("id"),
            name: v.get("name").and_then(Value::as_str).map(str::to_string),
            network: s("network"),
            ip: s("ip"),
            pid: match v.get("pid") {
                Some(Value::Null) => None,
                Some(n) => Some(
                    n.as_u64()
                        .and_then(|n| u32::try_from(n).ok())
                        .unwrap_or_else(|| {
                            panic!("`rnat ps --json` entry has a non-numeric \"pid\": {v}")
                        }),
                ),
                None => panic!("`rnat ps --json` entry lacks \"pid\": {v}"),
            },
            netns: match v.get("netns") {
                Some(Value::Null) => None,
                Some(Value::String(p)) => Some(p.clone()),
                _ => panic!("`rnat ps --json` entry lacks string/null \"netns\": {v}"),
            },
            ports,
        }
    }

    pub fn ipv4(&self) -> Ipv4Addr {
        self.ip
            .parse()
            .unwrap_or_else(|e| panic!("container ip {:?} is not IPv4: {e}", self.ip))
    }

    /// True once rnat reports the container's process and namespace.
    pub fn is_started(&self) -> bool {
        self.pid.is_some() && self.netns.is_some()
    }

    /// PID reported by `rnat ps` (panics if the container is not started).
    pub fn pid(&self) -> u32 {
        self.pid
            .unwrap_or_else(|| panic!("container {} has no pid yet", self.label()))
    }

    /// Netns path reported by `rnat ps` (panics if the container is not started).
    pub fn netns(&self) -> &str {
        self.netns
            .as_deref()
            .unwrap_or_else(|| panic!("container {} has no netns yet", self.label()))
    }

    pub fn label(&self) -> String {
        format!(
            "{} ({})",
            self.name.as_deref().unwrap_or("<unnamed>"),
            self.id
        )
    }
}

/// One element of an `ip rnat` map, normalised to strings:
/// pub_any key = [proto, port]; pub_addr key = [addr, proto, port];
/// value = [container ip, container port].
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct MapElem {
    pub key: Vec<String>,
    pub value: Vec<String>,
}

impl MapElem {
    pub fn any(proto: &str, host_port: u16, ip: &str, port: u16) -> MapElem {
        MapElem {
            key: vec![proto.to_string(), host_port.to_string()],
            value: vec![ip.to_string(), port.to_string()],
        }
    }

    pub fn addr(host_ip: &str, proto: &str, host_port: u16, ip: &str, port: u16) -> MapElem {
        MapElem {
            key: vec![
                host_ip.to_string(),
                proto.to_string(),
                host_port.to_string(),
            ],
            value: vec![ip.to_string(), port.to_string()],
        }
    }
}

/// Contents of the two maps; `None` when the map (or table) does not exist.
#[derive(Debug, Clone, Default)]
pub struct PubMaps {
    pub pub_any: Option<Vec<MapElem>>,
    pub pub_addr: Option<Vec<MapElem>>,
}

impl PubMaps {
    pub fn any_elems(&self) -> BTreeSet<MapElem> {
        self.pub_any.iter().flatten().cloned().collect()
    }
    pub fn addr_elems(&self) -> BTreeSet<MapElem> {
        self.pub_addr.iter().flatten().cloned().collect()
    }
}

/// Extracts pub_any/pub_addr of table `ip rnat` from `nft -j list ruleset`.
pub fn parse_pub_maps(ruleset: &Value) -> PubMaps {
    let mut maps = PubMaps::default();
    let items = ruleset
        .get("nftables")
        .and_then(Value::as_array)
        .unwrap_or_else(|| panic!("nft -j output has no \"nftables\" array: {ruleset}"));
    for item in items {
        let Some(map) = item.get("map") else { continue };
        if map.get("family").and_then(Value::as_str) != Some("ip")
            || map.get("table").and_then(Value::as_str) != Some("rnat")
        {
            continue;
        }
        let (slot, proto_idx) = match map.get("name").and_then(Value::as_str) {
            Some("pub_any") => (&mut maps.pub_any, 0),
            Some("pub_addr") => (&mut maps.pub_addr, 1),
            _ => continue,
        };
        let elems = map
            .get("elem")
            .and_then(Value::as_array)
            .map(|es| es.iter().map(|e| parse_elem(e, proto_idx)).collect())
            .unwrap_or_default();
        *slot = Some(elems);
    }
    maps
}

fn parse_elem(e: &Value, proto_idx: usize) -> MapElem {
    let pair = e
        .as_array()
        .filter(|a| a.len() == 2)
        .unwrap_or_else(|| panic!("unexpected map element shape: {e}"));
    let mut key = parts(&pair[0]);
    if let Some(p) = key.get_mut(proto_idx) {
        *p = match p.as_str() {
            "6" => "tcp".to_string(),
            "17" => "udp".to_string(),
            _ => p.clone(),
        };
    }
    MapElem {
        key,
        value: parts(&pair[1]),
    }
}

fn parts(v: &Value) -> Vec<String> {
    if let Some(inner) = v.get("elem") {
        return parts(inner.get("val").unwrap_or(inner));
    }
    match v.get("concat").and_then(Value::as_array) {
        Some(items) => items.iter().map(atom).collect(),
        None => vec![atom(v)],
    }
}

fn atom(v: &Value) -> String {
    match v {
        Value::String(s) => s.clone(),
        Value::Number(n) => n.to_string(),
        Value::Object(o) => {
            if let Some(r) = o.get("range").and_then(Value::as_array) {
                let r: Vec<String> = r.iter().map(atom).collect();
                return r.join("-");
            }
            if let Some(p) = o.get("prefix") {
                let addr = p.get("addr").map(atom).unwrap_or_default();
                let len = p.get("len").map(atom).unwrap_or_default();
                return format!("{addr}/{len}");
            }
            v.to_string()
        }
        other => other.to_string(),
    }
}

/// Collects IPAM allocations from a JSON tree: every object member whose
/// key is an IPv4 address ("ip -> container id"), at any depth. The owner is
/// the string value, or the `id` of an object value, or the value's JSON.
pub fn collect_allocations(v: &Value, out: &mut BTreeSet<(String, String)>) {
    match v {
        Value::Object(o) => {
            for (k, child) in o {
                if k.parse::<Ipv4Addr>().is_ok() {
                    let owner = match child {
                        Value::String(s) => s.clone(),
                        Value::Object(inner) => inner
                            .get("id")
                            .and_then(Value::as_str)
                            .map(str::to_string)
                            .unwrap_or_else(|| child.to_string()),
                        other => other.to_string(),
                    };
                    out.insert((k.clone(), owner));
                } else {
                    collect_allocations(child, out);
                }
            }
        }
        Value::Array(a) => a.iter().for_each(|child| collect_allocations(child, out)),
        _ => {}
    }
}

/// True if any string anywhere in the JSON tree equals NEEDLE.
pub fn json_contains_string(v: &Value, needle: &str) -> bool {
    match v {
        Value::String(s) => s == needle,
        Value::Object(o) => o.values().any(|x| json_contains_string(x, needle)),
        Value::Array(a) => a.iter().any(|x| json_contains_string(x, needle)),
        _ => false,
    }
}

/// True if IP lies in CIDR (IPv4 only).
pub fn in_subnet(ip: Ipv4Addr, cidr: &str) -> bool {
    let (net, len) = cidr
        .split_once('/')
        .unwrap_or_else(|| panic!("bad cidr {cidr}"));
    let net: Ipv4Addr = net
        .parse()
        .unwrap_or_else(|e| panic!("bad cidr {cidr}: {e}"));
    let len: u32 = len
        .parse()
        .unwrap_or_else(|e| panic!("bad cidr {cidr}: {e}"));
    let mask = if len == 0 { 0 } else { u32::MAX << (32 - len) };
    (u32::from(ip) & mask) == (u32::from(net) & mask)
}

#[cfg(test)]
mod unit {
    use super::*;

    #[test]
    fn parses_pub_maps_from_nft_json() {
        // Shape printed by nft 1.0.6 (`nft -j list ruleset`), trimmed.
        let v: Value = serde_json::from_str(
            r#"{"nftables": [
              {"metainfo": {"version": "1.0.6"}},
              {"table": {"family": "ip", "name": "rnat", "handle": 1}},
              {"map": {"family": "ip", "name": "pub_any", "table": "rnat",
                "type": ["inet_proto", "inet_service"], "map": "ipv4_addr . inet_service",
                "elem": [[{"concat": ["tcp", 8080]}, {"concat": ["192.0.2.2", 80]}],
                         [{"concat": [17, 5353]}, {"concat": ["192.0.2.2", 53]}]]}},
              {"map": {"family": "ip", "name": "pub_addr", "table": "rnat",
                "type": ["ipv4_addr", "inet_proto", "inet_service"], "map": "ipv4_addr . inet_service"}},
              {"map": {"family": "ip", "name": "pub_any", "table": "other",
                "elem": [[{"concat": ["tcp", 1]}, {"concat": ["192.0.2.9", 1]}]]}}
            ]}"#,
        )
        .expect("valid JSON");
        let maps = parse_pub_maps(&v);
        let any: Vec<MapElem> = maps.any_elems().into_iter().collect();
        assert_eq!(
            any,
            vec![
                MapElem::any("tcp", 8080, "192.0.2.2", 80),
                MapElem::any("udp", 5353, "192.0.2.2", 53)
            ]
        );
        assert_eq!(
            maps.pub_addr,
            Some(vec![]),
            "a map without elements is empty, not absent"
        );
        assert!(parse_pub_maps(&serde_json::json!({"nftables": []}))
            .pub_any
            .is_none());
    }

    #[test]
    fn parses_ps_entries_and_allocations() {
        let v: Value = serde_json::from_str(
            r#"{"id":"68ec33823a84","ip":"192.0.2.2","name":"web","netns":null,"network":"t",
                "pid":null,"ports":[{"container_port":80,"host_ip":"0.0.0.0","host_port":8080,"protocol":"tcp"}]}"#,
        )
        .expect("valid JSON");
        let c = Container::from_json(&v);
        assert!(!c.is_started());
        assert_eq!(c.ports.len(), 1);
        let ipam: Value =
            serde_json::from_str(r#"{"addrs":{"192.0.2.2":"68ec33823a84"},"last":"192.0.2.9"}"#)
                .expect("valid JSON");
        let mut found = BTreeSet::new();
        collect_allocations(&ipam, &mut found);
        assert_eq!(
            found,
            BTreeSet::from([("192.0.2.2".to_string(), "68ec33823a84".to_string())])
        );
        assert!(in_subnet("192.0.2.3".parse().expect("ip"), "192.0.2.0/30"));
        assert!(!in_subnet("192.0.2.4".parse().expect("ip"), "192.0.2.0/30"));
    }
}
