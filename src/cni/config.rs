//! The network configuration a runtime hands a CNI plugin on stdin, and the environment it sets.
//!
//! Unknown keys are ignored (runtimes add their own); known keys with invalid values are errors with
//! code 7. Every setting comes from the configuration: runtimes call DEL with a minimal
//! environment, so nothing here reads rnat's own environment variables.

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr};
use std::path::PathBuf;

use ipnet::{IpNet, Ipv4Net};
use serde_json::Value;

use super::error::{CniError, Code};
use crate::spec::{PortMapping, Protocol};

/// The versions whose configuration and result formats rnat speaks.
pub const SUPPORTED_VERSIONS: [&str; 3] = ["0.4.0", "1.0.0", "1.1.0"];
/// The bridge a CNI network uses when its configuration names none.
pub const DEFAULT_BRIDGE: &str = "rnat-cni0";

/// The CNI_* environment of one call.
#[derive(Debug, Clone, Default)]
pub struct CniEnv {
    pub command: String,
    pub container_id: Option<String>,
    pub netns: Option<String>,
    pub ifname: Option<String>,
    pub args: BTreeMap<String, String>,
    pub path: Vec<PathBuf>,
}

impl CniEnv {
    /// Reads the environment through `get` (the process environment in production).
    pub fn read(get: impl Fn(&str) -> Option<String>) -> Result<CniEnv, CniError> {
        let command = get("CNI_COMMAND").unwrap_or_default();
        let nonempty = |k: &str| get(k).filter(|v| !v.is_empty());
        let mut args = BTreeMap::new();
        for kv in nonempty("CNI_ARGS")
            .unwrap_or_default()
            .split(';')
            .filter(|s| !s.is_empty())
        {
            let (k, v) = kv.split_once('=').ok_or_else(|| {
                CniError::new(
                    Code::InvalidEnv,
                    format!("CNI_ARGS entry {kv:?} is not KEY=VALUE"),
                )
            })?;
            args.insert(k.to_string(), v.to_string());
        }
        let path = nonempty("CNI_PATH")
            .map(|p| p.split(':').map(PathBuf::from).collect())
            .unwrap_or_default();
        Ok(CniEnv {
            command,
            container_id: nonempty("CNI_CONTAINERID"),
            netns: nonempty("CNI_NETNS"),
            ifname: nonempty("CNI_IFNAME"),
            args,
            path,
        })
    }

    /// A variable the command cannot do without.
    pub fn need<'a>(&self, v: &'a Option<String>, name: &str) -> Result<&'a str, CniError> {
        v.as_deref()
            .ok_or_else(|| CniError::new(Code::InvalidEnv, format!("{name} is not set")))
    }

    /// `IP=` from CNI_ARGS.
    pub fn requested_ip(&self) -> Result<Option<Ipv4Addr>, CniError> {
        self.args
            .get("IP")
            .map(|ip| {
                ip.parse::<Ipv4Addr>().map_err(|_| {
                    CniError::new(
                        Code::InvalidEnv,
                        format!("CNI_ARGS IP={ip:?} is not an IPv4 address"),
                    )
                })
            })
            .transpose()
    }

    /// `MAC=` from CNI_ARGS.
    pub fn requested_mac(&self) -> Result<Option<[u8; 6]>, CniError> {
        self.args
            .get("MAC")
            .map(|m| {
                parse_mac(m).ok_or_else(|| {
                    CniError::new(
                        Code::InvalidEnv,
                        format!("CNI_ARGS MAC={m:?} is not a MAC address"),
                    )
                })
            })
            .transpose()
    }
}

pub fn parse_mac(s: &str) -> Option<[u8; 6]> {
    let parts: Vec<&str> = s.split([':', '-']).collect();
    if parts.len() != 6 {
        return None;
    }
    let mut mac = [0u8; 6];
    for (b, p) in mac.iter_mut().zip(parts) {
        if p.len() != 2 {
            return None;
        }
        *b = u8::from_str_radix(p, 16).ok()?;
    }
    // A multicast address cannot be an interface's.
    (mac[0] & 1 == 0).then_some(mac)
}

pub fn format_mac(mac: &[u8; 6]) -> String {
    mac.iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}

/// One entry of `cni.dev/valid-attachments` (GC).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Attachment {
    pub container_id: String,
    pub ifname: String,
}

/// rnat's network configuration, parsed and checked.
#[derive(Debug, Clone)]
pub struct NetConf {
    pub cni_version: String,
    pub name: String,
    pub bridge: String,
    /// The network's subnets, in the order addresses are taken from them; empty when an `ipam`
    /// plugin hands out the addresses.
    pub subnets: Vec<Ipv4Net>,
    pub gateway: Option<Ipv4Addr>,
    pub ip_masq: bool,
    pub mtu: Option<u32>,
    pub hairpin: bool,
    /// The delegated IPAM plugin's type, if any.
    pub ipam_type: Option<String>,
    pub state_dir: Option<PathBuf>,
    pub port_mappings: Vec<PortMapping>,
    pub valid_attachments: Option<Vec<Attachment>>,
    pub prev_result: Option<Value>,
    pub dns: Option<Value>,
    /// The configuration as received (passed to a delegated IPAM plugin unchanged).
    pub raw: Vec<u8>,
}

fn invalid(msg: impl Into<String>) -> CniError {
    CniError::new(Code::InvalidConfig, msg)
}

fn opt_str<'a>(v: &'a Value, key: &str) -> Result<Option<&'a str>, CniError> {
    match v.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) => Ok(Some(s)),
        Some(_) => Err(invalid(format!("{key} must be a string"))),
    }
}

fn opt_bool(v: &Value, key: &str, default: bool) -> Result<bool, CniError> {
    match v.get(key) {
        None | Some(Value::Null) => Ok(default),
        Some(Value::Bool(b)) => Ok(*b),
        Some(_) => Err(invalid(format!("{key} must be true or false"))),
    }
}

/// The cniVersion of a configuration, checked against what rnat supports (code 1 otherwise).
pub fn check_version(v: &Value) -> Result<String, CniError> {
    let version = opt_str(v, "cniVersion")?.unwrap_or("0.4.0").to_string();
    if !SUPPORTED_VERSIONS.contains(&version.as_str()) {
        return Err(CniError::new(
            Code::IncompatibleVersion,
            format!(
                "cniVersion {version} is not supported (supported: {})",
                SUPPORTED_VERSIONS.join(", ")
            ),
        )
        .with_version(SUPPORTED_VERSIONS[2]));
    }
    Ok(version)
}

impl NetConf {
    /// Parses stdin: code 6 if it is not JSON, 1 for an unsupported version, 7 for bad values.
    pub fn parse(raw: &[u8]) -> Result<NetConf, CniError> {
        let v: Value = serde_json::from_slice(raw).map_err(|e| {
            CniError::new(
                Code::Decode,
                format!("network configuration is not valid JSON: {e}"),
            )
        })?;
        if !v.is_object() {
            return Err(CniError::new(
                Code::Decode,
                "network configuration must be a JSON object",
            ));
        }
        let cni_version = check_version(&v)?;
        let err = |e: CniError| e.with_version(&cni_version);
        let name = opt_str(&v, "name")
            .map_err(err)?
            .ok_or_else(|| err(invalid("name is required")))?
            .to_string();
        let bridge = opt_str(&v, "bridge")
            .map_err(err)?
            .unwrap_or(DEFAULT_BRIDGE)
            .to_string();
        let subnets = parse_subnets(v.get("subnet")).map_err(err)?;
        let gateway = opt_str(&v, "gateway")
            .map_err(err)?
            .map(|g| {
                g.parse::<Ipv4Addr>()
                    .map_err(|_| err(invalid(format!("gateway {g:?} is not an IPv4 address"))))
            })
            .transpose()?;
        let mtu = match v.get("mtu") {
            None | Some(Value::Null) => None,
            Some(m) => match m.as_u64() {
                Some(m @ 68..=65535) => Some(m as u32),
                _ => {
                    return Err(err(invalid(format!(
                        "mtu {m} must be a number from 68 to 65535"
                    ))))
                }
            },
        };
        let ipam_type = match v.get("ipam") {
            None | Some(Value::Null) => None,
            Some(i) if i.is_object() => opt_str(i, "type")
                .map_err(err)?
                .filter(|t| !t.is_empty())
                .map(str::to_string),
            Some(_) => return Err(err(invalid("ipam must be an object"))),
        };
        if subnets.is_empty() && ipam_type.is_none() {
            return Err(err(invalid(
                "either subnet or an ipam plugin (ipam.type) is required",
            )));
        }
        let runtime = v.get("runtimeConfig").cloned().unwrap_or(Value::Null);
        let port_mappings = parse_port_mappings(runtime.get("portMappings")).map_err(err)?;
        let valid_attachments =
            parse_attachments(v.get("cni.dev/valid-attachments")).map_err(err)?;
        let state_dir = opt_str(&v, "stateDir").map_err(err)?.map(PathBuf::from);
        Ok(NetConf {
            ip_masq: opt_bool(&v, "ipMasq", true).map_err(err)?,
            hairpin: opt_bool(&v, "hairpinMode", true).map_err(err)?,
            cni_version,
            name,
            bridge,
            subnets,
            gateway,
            mtu,
            ipam_type,
            state_dir,
            port_mappings,
            valid_attachments,
            prev_result: v.get("prevResult").cloned().filter(|p| !p.is_null()),
            dns: v.get("dns").cloned().filter(|d| !d.is_null()),
            raw: raw.to_vec(),
        })
    }
}

/// `subnet`: one IPv4 CIDR or a list of them (IPv6 entries are refused: networks are IPv4).
fn parse_subnets(v: Option<&Value>) -> Result<Vec<Ipv4Net>, CniError> {
    let list: Vec<&Value> = match v {
        None | Some(Value::Null) => return Ok(Vec::new()),
        Some(Value::Array(a)) => a.iter().collect(),
        Some(one) => vec![one],
    };
    list.iter()
        .map(|item| {
            let s = item
                .as_str()
                .ok_or_else(|| invalid("subnet must be a CIDR string or a list of them"))?;
            match s.parse::<IpNet>() {
                Ok(IpNet::V4(n)) if n.prefix_len() <= 30 => Ok(n.trunc()),
                Ok(IpNet::V4(_)) => Err(invalid(format!("subnet {s} is too small (at most /30)"))),
                Ok(IpNet::V6(_)) => Err(invalid(format!(
                    "subnet {s}: rnat networks are IPv4-only for now"
                ))),
                Err(_) => Err(invalid(format!("subnet {s:?} is not a CIDR"))),
            }
        })
        .collect()
}

fn parse_port_mappings(v: Option<&Value>) -> Result<Vec<PortMapping>, CniError> {
    let Some(list) = v.filter(|v| !v.is_null()) else {
        return Ok(Vec::new());
    };
    let list = list
        .as_array()
        .ok_or_else(|| invalid("runtimeConfig.portMappings must be a list"))?;
    let port = |m: &Value, key: &str| -> Result<u16, CniError> {
        match m.get(key).and_then(Value::as_u64) {
            Some(p @ 1..=65535) => Ok(p as u16),
            _ => Err(invalid(format!(
                "portMappings: {key} must be a port from 1 to 65535 in {m}"
            ))),
        }
    };
    let mut out = Vec::with_capacity(list.len());
    for m in list {
        let protocol = match m
            .get("protocol")
            .and_then(Value::as_str)
            .map(str::to_ascii_lowercase)
            .as_deref()
        {
            None | Some("") | Some("tcp") => Protocol::Tcp,
            Some("udp") => Protocol::Udp,
            Some(p) => {
                return Err(invalid(format!(
                    "portMappings: protocol {p:?} is not tcp or udp"
                )))
            }
        };
        let host_ip = match m
            .get("hostIP")
            .and_then(Value::as_str)
            .filter(|s| !s.is_empty())
        {
            None => None,
            Some(ip) => {
                let ip: IpAddr = ip.parse().map_err(|_| {
                    invalid(format!("portMappings: hostIP {ip:?} is not an address"))
                })?;
                (!ip.is_unspecified()).then_some(ip)
            }
        };
        out.push(PortMapping {
            host_ip,
            host_port: port(m, "hostPort")?,
            container_port: port(m, "containerPort")?,
            protocol,
        });
    }
    Ok(out)
}

fn parse_attachments(v: Option<&Value>) -> Result<Option<Vec<Attachment>>, CniError> {
    let Some(list) = v.filter(|v| !v.is_null()) else {
        return Ok(None);
    };
    let list = list
        .as_array()
        .ok_or_else(|| invalid("cni.dev/valid-attachments must be a list"))?;
    list.iter()
        .map(|a| {
            let get = |k: &str| a.get(k).and_then(Value::as_str).map(str::to_string);
            match (get("containerID"), get("ifname")) {
                (Some(container_id), Some(ifname)) => Ok(Attachment {
                    container_id,
                    ifname,
                }),
                _ => Err(invalid(format!(
                    "valid-attachments entry {a} needs containerID and ifname"
                ))),
            }
        })
        .collect::<Result<Vec<_>, _>>()
        .map(Some)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(s: &str) -> Result<NetConf, CniError> {
        NetConf::parse(s.as_bytes())
    }

    #[test]
    fn minimal_config_gets_defaults() {
        let c = parse(r#"{"cniVersion":"1.0.0","name":"n","type":"rnat","subnet":"192.0.2.0/24","x-unknown":1}"#).expect("ok");
        assert_eq!(
            (c.bridge.as_str(), c.ip_masq, c.hairpin),
            (DEFAULT_BRIDGE, true, true)
        );
        assert_eq!(
            c.subnets,
            vec!["192.0.2.0/24".parse::<Ipv4Net>().expect("net")]
        );
        assert!(c.port_mappings.is_empty());
    }

    #[test]
    fn codes_for_bad_input() {
        assert_eq!(parse("{not json").expect_err("decode").code, Code::Decode);
        assert_eq!(
            parse(r#"{"cniVersion":"0.2.0","name":"n","subnet":"192.0.2.0/24"}"#)
                .expect_err("v")
                .code,
            Code::IncompatibleVersion
        );
        for bad in [
            r#"{"cniVersion":"1.0.0","subnet":"192.0.2.0/24"}"#,
            r#"{"cniVersion":"1.0.0","name":"n","subnet":"192.0.2.0/33"}"#,
            r#"{"cniVersion":"1.0.0","name":"n","subnet":"2001:db8::/64"}"#,
            r#"{"cniVersion":"1.0.0","name":"n","subnet":"192.0.2.0/24","mtu":20}"#,
            r#"{"cniVersion":"1.0.0","name":"n","subnet":"192.0.2.0/24","ipMasq":"yes"}"#,
            r#"{"cniVersion":"1.0.0","name":"n","subnet":"192.0.2.0/24","gateway":"x"}"#,
            r#"{"cniVersion":"1.0.0","name":"n"}"#,
            r#"{"cniVersion":"1.0.0","name":"n","subnet":"192.0.2.0/24","runtimeConfig":{"portMappings":[{"hostPort":0,"containerPort":80}]}}"#,
            r#"{"cniVersion":"1.0.0","name":"n","subnet":"192.0.2.0/24","runtimeConfig":{"portMappings":[{"hostPort":80,"containerPort":80,"protocol":"sctp"}]}}"#,
        ] {
            let e = parse(bad).expect_err(bad);
            assert_eq!(e.code, Code::InvalidConfig, "{bad}: {e:?}");
        }
    }

    #[test]
    fn subnet_lists_become_pools_in_order() {
        let c =
            parse(r#"{"cniVersion":"1.0.0","name":"n","subnet":["192.0.2.0/26","192.0.2.64/26"]}"#)
                .expect("ok");
        assert_eq!(c.subnets.len(), 2);
        assert_eq!(
            c.subnets[1],
            "192.0.2.64/26".parse::<Ipv4Net>().expect("net")
        );
    }

    #[test]
    fn port_mappings_and_attachments() {
        let c = parse(
            r#"{"cniVersion":"1.1.0","name":"n","subnet":["192.0.2.0/24"],
                "runtimeConfig":{"portMappings":[{"hostPort":8080,"containerPort":80,"protocol":"tcp"},
                                                 {"hostPort":53,"containerPort":53,"protocol":"udp","hostIP":"127.0.0.1"},
                                                 {"hostPort":81,"containerPort":81,"hostIP":"0.0.0.0"}]},
                "cni.dev/valid-attachments":[{"containerID":"c1","ifname":"eth0"}]}"#,
        )
        .expect("ok");
        assert_eq!(c.port_mappings.len(), 3);
        assert_eq!(
            c.port_mappings[1].host_ip,
            Some("127.0.0.1".parse().expect("ip"))
        );
        assert_eq!(c.port_mappings[2].host_ip, None);
        assert_eq!(
            c.valid_attachments,
            Some(vec![Attachment {
                container_id: "c1".into(),
                ifname: "eth0".into()
            }])
        );
    }

    #[test]
    fn environment_and_args() {
        let vars: BTreeMap<&str, &str> = [
            ("CNI_COMMAND", "ADD"),
            (
                "CNI_ARGS",
                "IgnoreUnknown=1;K8S_POD_NAME=p;IP=192.0.2.9;MAC=02:00:00:00:00:01",
            ),
            ("CNI_PATH", "/a:/b"),
        ]
        .into();
        let env = CniEnv::read(|k| vars.get(k).map(|v| v.to_string())).expect("env");
        assert_eq!(
            env.requested_ip().expect("ip"),
            Some(Ipv4Addr::new(192, 0, 2, 9))
        );
        assert_eq!(env.requested_mac().expect("mac"), Some([2, 0, 0, 0, 0, 1]));
        assert_eq!(env.path.len(), 2);
        assert_eq!(
            env.need(&env.netns, "CNI_NETNS").expect_err("missing").code,
            Code::InvalidEnv
        );
        let bad = CniEnv::read(|k| (k == "CNI_ARGS").then(|| "novalue".to_string()))
            .expect_err("bad args");
        assert_eq!(bad.code, Code::InvalidEnv);
        assert_eq!(parse_mac("01:00:00:00:00:01"), None, "multicast");
    }
}
