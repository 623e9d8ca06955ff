//! The result of ADD, in the format of the version the runtime asked for.

use std::net::Ipv4Addr;

use serde_json::{json, Value};

use super::config::format_mac;

/// What an attachment consists of, for the result.
#[derive(Debug, Clone)]
pub struct Attached {
    pub host_if: String,
    pub host_mac: Option<[u8; 6]>,
    pub ifname: String,
    pub mac: Option<[u8; 6]>,
    pub sandbox: String,
    pub ip: Ipv4Addr,
    pub prefix: u8,
    pub gateway: Ipv4Addr,
    /// Whether the attachment installed the default route (a second network does not).
    pub default_route: bool,
}

/// The ADD result. 0.4.0 marks each IP with `"version": "4"`; 1.x does not. `interface` is the
/// index of the container's interface in `interfaces`, which runtimes use to show the address.
pub fn add_result(version: &str, a: &Attached, dns: Option<&Value>) -> Value {
    let mac = |m: &Option<[u8; 6]>| m.as_ref().map(format_mac).unwrap_or_default();
    let mut ip = json!({ "address": format!("{}/{}", a.ip, a.prefix), "gateway": a.gateway.to_string(), "interface": 1 });
    if version == "0.4.0" {
        ip["version"] = json!("4");
    }
    let mut r = json!({
        "cniVersion": version,
        "interfaces": [
            { "name": a.host_if, "mac": mac(&a.host_mac) },
            { "name": a.ifname, "mac": mac(&a.mac), "sandbox": a.sandbox },
        ],
        "ips": [ip],
    });
    r["routes"] = if a.default_route {
        json!([{ "dst": "0.0.0.0/0", "gw": a.gateway.to_string() }])
    } else {
        json!([])
    };
    r["dns"] = dns.cloned().unwrap_or_else(|| json!({}));
    r
}

/// The IPv4 address, prefix and gateway of the first IPv4 entry of a result (a delegated IPAM
/// plugin's, or a prevResult).
pub fn first_ipv4(result: &Value) -> Option<(Ipv4Addr, u8, Option<Ipv4Addr>)> {
    result.get("ips")?.as_array()?.iter().find_map(|ip| {
        let net: ipnet::Ipv4Net = ip.get("address")?.as_str()?.parse().ok()?;
        let gw = ip
            .get("gateway")
            .and_then(Value::as_str)
            .and_then(|g| g.parse().ok());
        Some((net.addr(), net.prefix_len(), gw))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn attached() -> Attached {
        Attached {
            host_if: "rv01234567".into(),
            host_mac: Some([2, 0, 0, 0, 0, 1]),
            ifname: "eth0".into(),
            mac: Some([2, 0, 0, 0, 0, 2]),
            sandbox: "/run/netns/x".into(),
            ip: Ipv4Addr::new(192, 0, 2, 2),
            prefix: 24,
            gateway: Ipv4Addr::new(192, 0, 2, 1),
            default_route: true,
        }
    }

    #[test]
    fn result_points_ips_at_the_container_interface() {
        for v in ["0.4.0", "1.0.0", "1.1.0"] {
            let r = add_result(v, &attached(), None);
            assert_eq!(r["cniVersion"], v);
            assert_eq!(r["ips"][0]["interface"], 1);
            assert_eq!(r["interfaces"][1]["sandbox"], "/run/netns/x");
            assert_eq!(r["ips"][0].get("version").is_some(), v == "0.4.0");
            assert_eq!(
                first_ipv4(&r),
                Some((
                    Ipv4Addr::new(192, 0, 2, 2),
                    24,
                    Some(Ipv4Addr::new(192, 0, 2, 1))
                ))
            );
        }
    }
}
