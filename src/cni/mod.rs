//! rnat as a CNI plugin (type `rnat`): ADD, DEL, CHECK, STATUS, GC and VERSION per CNI 1.1.0,
//! answering 0.4.0, 1.0.0 and 1.1.0 configurations in their own result format.
//!
//! ADD goes through the same `Engine::create` as `rnat run`; only the sandbox differs (the
//! runtime's namespace and interface name, owned by the attachment instead of a process).

pub mod config;
pub mod error;
pub mod ipam;
pub mod result;

use std::collections::HashSet;
use std::io::Read;
use std::path::PathBuf;

use serde_json::{json, Value};

use crate::netns::NetNs;
use crate::rootful::{CreateOpts, Engine, NetworkChoice, Sandbox};
use crate::state::{Network, Owner, StateDirs};
use config::{CniEnv, NetConf, SUPPORTED_VERSIONS};
use error::{CniError, Code};

/// Runs one CNI command from the process environment and stdin; prints the result or error JSON on
/// stdout. Returns the exit status.
pub fn main() -> u8 {
    let mut stdin = Vec::new();
    let outcome = CniEnv::read(|k| std::env::var(k).ok()).and_then(|env| {
        std::io::stdin().read_to_end(&mut stdin).map_err(|e| {
            CniError::new(Code::Io, format!("reading the network configuration: {e}"))
        })?;
        dispatch(&env, &stdin)
    });
    match outcome {
        Ok(Some(v)) => {
            println!("{v}");
            0
        }
        Ok(None) => 0,
        Err(e) => {
            tracing::debug!("CNI error: {e}");
            println!("{}", e.to_json());
            1
        }
    }
}

/// Runs one command.
pub fn dispatch(env: &CniEnv, stdin: &[u8]) -> Result<Option<Value>, CniError> {
    match env.command.as_str() {
        "VERSION" => Ok(Some(version(stdin))),
        "ADD" => add(env, &NetConf::parse(stdin)?).map(Some),
        "DEL" => del(env, &NetConf::parse(stdin)?).map(|()| None),
        "CHECK" => check(env, &NetConf::parse(stdin)?).map(|()| None),
        "STATUS" => status(&NetConf::parse(stdin)?).map(|()| None),
        "GC" => gc(env, &NetConf::parse(stdin)?).map(|()| None),
        "" => Err(CniError::new(Code::InvalidEnv, "CNI_COMMAND is not set")),
        other => Err(CniError::new(
            Code::InvalidEnv,
            format!("unknown CNI_COMMAND {other:?}"),
        )),
    }
}

fn version(stdin: &[u8]) -> Value {
    let asked = serde_json::from_slice::<Value>(stdin)
        .ok()
        .and_then(|v| {
            v.get("cniVersion")
                .and_then(Value::as_str)
                .map(str::to_string)
        })
        .filter(|v| SUPPORTED_VERSIONS.contains(&v.as_str()))
        .unwrap_or_else(|| SUPPORTED_VERSIONS[2].to_string());
    json!({ "cniVersion": asked, "supportedVersions": SUPPORTED_VERSIONS })
}

/// The attachment's id: stable for a (container, interface) pair, so DEL finds what ADD made even
/// without state.
pub fn attachment_id(container_id: &str, ifname: &str) -> String {
    // FNV-1a, 64 bits: stable across builds and platforms.
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in container_id.bytes().chain([0u8]).chain(ifname.bytes()) {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    format!("{:012x}", h & 0xffff_ffff_ffff)
}

fn dirs(conf: &NetConf) -> StateDirs {
    match &conf.state_dir {
        Some(d) => StateDirs {
            lib: d.join("lib"),
            run: d.join("run"),
        },
        None => StateDirs {
            lib: PathBuf::from("/var/lib/rnat"),
            run: PathBuf::from("/run/rnat"),
        },
    }
}

fn engine(conf: &NetConf) -> Result<Engine, CniError> {
    Engine::open(dirs(conf)).map_err(|e| CniError::from(e).with_version(&conf.cni_version))
}

fn add(env: &CniEnv, conf: &NetConf) -> Result<Value, CniError> {
    let v = |e: CniError| e.with_version(&conf.cni_version);
    let cid = env.need(&env.container_id, "CNI_CONTAINERID").map_err(v)?;
    let netns_path = env.need(&env.netns, "CNI_NETNS").map_err(v)?;
    let ifname = env.need(&env.ifname, "CNI_IFNAME").map_err(v)?;
    let requested_ip = env.requested_ip().map_err(v)?;
    let mac = env.requested_mac().map_err(v)?;
    crate::timing::mark("start");
    let netns = NetNs::open(netns_path.as_ref()).map_err(|e| {
        v(CniError::new(
            Code::Io,
            format!("opening network namespace {netns_path}: {e}"),
        ))
    })?;
    let mut engine = engine(conf)?;

    // A delegated IPAM plugin picks the address (and with it the subnet); rnat's own otherwise.
    let delegated = match &conf.ipam_type {
        Some(t) => Some(ipam::exec(env, t, "ADD", &conf.raw).map_err(v)?),
        None => None,
    };
    let undo_ipam = || {
        if let Some(t) = &conf.ipam_type {
            if let Err(e) = ipam::exec(env, t, "DEL", &conf.raw) {
                tracing::error!("IPAM rollback: {e}");
            }
        }
    };
    let (ip, subnet, extra, gateway) = match &delegated {
        Some(r) => {
            let Some((ip, prefix, gw)) = result::first_ipv4(r) else {
                undo_ipam();
                return Err(v(CniError::new(
                    Code::Delegate,
                    "the IPAM plugin returned no IPv4 address",
                )));
            };
            let net = ipnet::Ipv4Net::new(ip, prefix)
                .map(|n| n.trunc())
                .map_err(|e| v(CniError::new(Code::Delegate, e.to_string())))?;
            (Some(ip), net, Vec::new(), conf.gateway.or(gw))
        }
        None => {
            let (first, rest) = conf
                .subnets
                .split_first()
                .ok_or_else(|| v(CniError::new(Code::InvalidConfig, "subnet is required")))?;
            let extra: Vec<crate::state::Pool> = rest
                .iter()
                .map(|s| crate::state::Pool {
                    subnet: *s,
                    gateway: std::net::Ipv4Addr::from(u32::from(s.network()) + 1),
                })
                .collect();
            (requested_ip, *first, extra, conf.gateway)
        }
    };
    let gateway =
        gateway.unwrap_or_else(|| std::net::Ipv4Addr::from(u32::from(subnet.network()) + 1));
    let network = Network {
        name: conf.name.clone(),
        bridge: conf.bridge.clone(),
        subnet,
        gateway,
        mtu: conf.mtu,
        masquerade: conf.ip_masq,
        hairpin: conf.hairpin,
        extra,
    };
    let opts = CreateOpts {
        // Unique by construction, as the attachment is: (container id, interface).
        name: Some(format!("{cid}/{ifname}")),
        network: NetworkChoice::Defined(network),
        ports: conf.port_mappings.clone(),
        resolv: false,
        ip,
        mac,
    };
    let sandbox = Sandbox {
        netns,
        ifname: ifname.to_string(),
        owner: Owner::Cni {
            container_id: cid.to_string(),
            ifname: ifname.to_string(),
            netns: netns_path.to_string(),
        },
        id: Some(attachment_id(cid, ifname)),
    };
    let prepared = match engine.create(&opts, sandbox) {
        Ok(p) => p,
        Err(e) => {
            undo_ipam();
            return Err(v(e.into()));
        }
    };
    crate::timing::mark("create");
    let rec = &prepared.record;
    let attached = result::Attached {
        host_if: rec.veth.clone(),
        host_mac: engine.host_mac(&rec.veth).ok().flatten(),
        ifname: rec.ifname.clone(),
        mac: crate::link::Netlink::open_in(&prepared.netns)
            .ok()
            .and_then(|nl| nl.mac(&rec.ifname).ok().flatten()),
        sandbox: netns_path.to_string(),
        ip: rec.ip,
        prefix: rec.prefix,
        gateway: rec.gateway,
        default_route: rec.default_route,
    };
    crate::timing::mark("result");
    crate::timing::flush();
    Ok(result::add_result(
        &conf.cni_version,
        &attached,
        conf.dns.as_ref(),
    ))
}

fn del(env: &CniEnv, conf: &NetConf) -> Result<(), CniError> {
    let v = |e: CniError| e.with_version(&conf.cni_version);
    let cid = env.need(&env.container_id, "CNI_CONTAINERID").map_err(v)?;
    let ifname = env.need(&env.ifname, "CNI_IFNAME").map_err(v)?;
    let mut engine = engine(conf)?;
    engine
        .remove_attachment(&attachment_id(cid, ifname))
        .map_err(|e| v(e.into()))?;
    if let Some(t) = &conf.ipam_type {
        ipam::exec(env, t, "DEL", &conf.raw).map_err(v)?;
    }
    Ok(())
}

fn check(env: &CniEnv, conf: &NetConf) -> Result<(), CniError> {
    let v = |e: CniError| e.with_version(&conf.cni_version);
    let cid = env.need(&env.container_id, "CNI_CONTAINERID").map_err(v)?;
    let netns_path = env.need(&env.netns, "CNI_NETNS").map_err(v)?;
    let ifname = env.need(&env.ifname, "CNI_IFNAME").map_err(v)?;
    let prev = conf
        .prev_result
        .as_ref()
        .ok_or_else(|| v(CniError::new(Code::InvalidConfig, "CHECK needs prevResult")))?;
    let mut engine = engine(conf)?;
    let rec = engine
        .attachment(&attachment_id(cid, ifname))
        .map_err(|e| v(e.into()))?
        .ok_or_else(|| {
            v(CniError::new(
                Code::UnknownContainer,
                format!("no attachment for container {cid} interface {ifname}"),
            ))
        })?;
    let mut drift = Vec::new();
    match result::first_ipv4(prev) {
        Some((ip, prefix, _)) if ip == rec.ip && prefix == rec.prefix => {}
        other => drift.push(format!(
            "prevResult address {other:?} is not the attachment's {}/{}",
            rec.ip, rec.prefix
        )),
    }
    match NetNs::open(netns_path.as_ref()) {
        Ok(ns) => drift.extend(engine.verify(&rec, &ns).map_err(|e| v(e.into()))?),
        Err(e) => drift.push(format!("network namespace {netns_path}: {e}")),
    }
    if drift.is_empty() {
        Ok(())
    } else {
        Err(v(CniError::new(
            Code::Drift,
            format!(
                "attachment differs from what ADD made: {}",
                drift.join("; ")
            ),
        )))
    }
}

fn status(conf: &NetConf) -> Result<(), CniError> {
    let v = |code: Code, msg: String| CniError::new(code, msg).with_version(&conf.cni_version);
    if !crate::rootful::has_net_admin() {
        return Err(v(Code::NotAvailable, "rnat needs CAP_NET_ADMIN".into()));
    }
    let mut engine = engine(conf).map_err(|e| v(Code::NotAvailable, e.msg))?;
    if let Err(e) = engine.probe_firewall() {
        return Err(v(
            Code::NotAvailableDegraded,
            format!("nftables is not usable: {e}"),
        ));
    }
    let free = engine
        .has_free_address(&conf.name, &conf.subnets)
        .map_err(|e| v(Code::NotAvailable, e.to_string()))?;
    if conf.ipam_type.is_none() && !free {
        return Err(v(
            Code::NotAvailable,
            format!("network {:?} has no free address", conf.name),
        ));
    }
    Ok(())
}

fn gc(env: &CniEnv, conf: &NetConf) -> Result<(), CniError> {
    let v = |e: CniError| e.with_version(&conf.cni_version);
    let valid = conf.valid_attachments.as_ref().ok_or_else(|| {
        v(CniError::new(
            Code::InvalidConfig,
            "GC needs cni.dev/valid-attachments",
        ))
    })?;
    let keep: HashSet<String> = valid
        .iter()
        .map(|a| attachment_id(&a.container_id, &a.ifname))
        .collect();
    let mut engine = engine(conf)?;
    let removed = engine
        .gc(&conf.name, &conf.bridge, &keep)
        .map_err(|e| v(e.into()))?;
    tracing::info!("GC removed {} attachment(s)", removed.len());
    let _ = env;
    Ok(())
}

/// Copies the running binary into a CNI plugin directory as `rnat` (atomically: a temporary file
/// renamed into place, so a runtime never executes half a file).
pub fn install(dir: &std::path::Path) -> std::io::Result<PathBuf> {
    use std::os::unix::fs::PermissionsExt;
    std::fs::create_dir_all(dir)?;
    let exe = std::env::current_exe()?;
    let dest = dir.join("rnat");
    let tmp = dir.join(format!(".rnat.tmp{}", std::process::id()));
    std::fs::copy(&exe, &tmp)?;
    std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o755))?;
    std::fs::rename(&tmp, &dest)?;
    Ok(dest)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn attachment_ids_are_stable_and_distinct() {
        assert_eq!(attachment_id("c1", "eth0"), attachment_id("c1", "eth0"));
        assert_ne!(attachment_id("c1", "eth0"), attachment_id("c1", "eth1"));
        assert_ne!(attachment_id("c1e", "th0"), attachment_id("c1", "eth0"));
        assert_eq!(attachment_id("c1", "eth0").len(), 12);
    }

    #[test]
    fn version_answers_the_asked_version_when_supported() {
        assert_eq!(version(br#"{"cniVersion":"0.4.0"}"#)["cniVersion"], "0.4.0");
        assert_eq!(version(b"")["cniVersion"], "1.1.0");
        assert_eq!(
            version(br#"{"cniVersion":"0.1.0"}"#)["supportedVersions"][2],
            "1.1.0"
        );
    }

    #[test]
    fn unknown_or_missing_command_is_an_environment_error() {
        let env = CniEnv {
            command: "FROB".into(),
            ..Default::default()
        };
        assert_eq!(
            dispatch(&env, b"{}").expect_err("unknown").code,
            Code::InvalidEnv
        );
        let env = CniEnv::default();
        assert_eq!(
            dispatch(&env, b"{}").expect_err("missing").code,
            Code::InvalidEnv
        );
    }
}
