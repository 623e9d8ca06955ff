//! rnat as a CNI plugin (docs/cni.md), driven the way a runtime drives it:
//! `CNI_*` variables in the environment, the network configuration on
//! stdin, the result or error JSON on stdout, run inside the host namespace
//! H of a throw-away topology (`rig`: the harness's `Topology` under the
//! `rnc` prefix, plus container namespaces, all named `rnc<pid>-<n>…` and
//! torn down by the topology's guard, also on panic).
//!
//! Every test asserts on bytes that crossed the kernel and on kernel state
//! read back (`ip -n`, `nft -j list ruleset` in H), plus rnat's own state
//! files under the configuration's `stateDir` (the topology's state dir).
//!
//! This module holds the CNI-specific machinery (plugin calls, configs,
//! result and error checks, snapshots), `rig` the container namespaces on
//! top of the harness (traffic helpers are the `fixtures` ones); the tests
//! live in `add`
//! (results and traffic), `errors` (failing ADDs), `lifecycle` (DEL, CHECK,
//! STATUS, GC), `chain` (IPAM delegation and a conflist with reference
//! plugins) and `scale` (parallel ADD/DEL).

/// Creates a `Rig` or returns from the test (skips) when not root.
macro_rules! cni_topology {
    ($label:expr) => {
        match $crate::cni::Rig::new($label) {
            Some(t) => t,
            None => return,
        }
    };
}

mod add;
mod chain;
mod errors;
mod lifecycle;
mod rig;
mod scale;

use std::collections::BTreeSet;
use std::net::Ipv4Addr;
use std::path::Path;
use std::time::Duration;

use serde_json::{json, Map, Value};

use crate::fixtures::*;
use crate::harness::{H_CLIENT_SIDE_IP, H_UPLINK_IP, U_IP};
use crate::procs::{self, BgProc, Finished};
use crate::readback::{in_subnet, MapElem};
use crate::rnat::RNAT;
pub use rig::Rig;

/// Where the reference plugins (host-local, tuning, bandwidth, firewall) live.
const PLUGIN_DIR: &str = "/usr/lib/cni";
/// PATH of every plugin call (the firewall plugin runs `iptables`).
const PLUGIN_PATH_ENV: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";
/// Bound on one plugin call. ADDs wait for rnat's state lock, which
/// gives up after 60 s (code 11): the bound must be larger.
const PLUGIN_TIMEOUT: Duration = Duration::from_secs(90);

const NET: &str = "rncnet";
const BRIDGE: &str = "rnc-br0";
const SUBNET: &str = "192.0.2.0/24";
const GATEWAY: &str = "192.0.2.1";
const IFNAME: &str = "eth0";
/// What rnat prints as `cniVersion` in errors must be one of these.
const VERSIONS: [&str; 3] = ["0.4.0", "1.0.0", "1.1.0"];

/// The CNI_* environment of one call (`None`: the variable is not set).
#[derive(Debug, Clone)]
pub struct Call {
    pub cid: Option<String>,
    /// Path of the container namespace (`/run/netns/<name>`).
    pub netns: Option<String>,
    pub ifname: Option<String>,
    pub args: Option<String>,
    /// Other variables (rnat must ignore its own in plugin mode).
    pub other_env: Vec<(&'static str, String)>,
}

impl Call {
    /// Container CID with interface eth0 in the named namespace NS.
    pub fn new(cid: &str, ns: &str) -> Call {
        Call {
            cid: Some(cid.to_string()),
            netns: Some(netns_path(ns)),
            ifname: Some(IFNAME.to_string()),
            args: None,
            other_env: Vec::new(),
        }
    }

    /// No CNI_CONTAINERID, CNI_NETNS, CNI_IFNAME or CNI_ARGS (VERSION,
    /// STATUS, GC).
    pub fn bare() -> Call {
        Call {
            cid: None,
            netns: None,
            ifname: None,
            args: None,
            other_env: Vec::new(),
        }
    }

    pub fn with_args(mut self, args: &str) -> Call {
        self.args = Some(args.to_string());
        self
    }

    fn env(&self, command: &str) -> Vec<(&'static str, String)> {
        let mut env = vec![
            ("CNI_COMMAND", command.to_string()),
            ("CNI_PATH", PLUGIN_DIR.to_string()),
        ];
        for (k, v) in [
            ("CNI_CONTAINERID", &self.cid),
            ("CNI_NETNS", &self.netns),
            ("CNI_IFNAME", &self.ifname),
            ("CNI_ARGS", &self.args),
        ] {
            if let Some(v) = v {
                env.push((k, v.clone()));
            }
        }
        env.extend(self.other_env.iter().cloned());
        env
    }
}

pub fn netns_path(ns: &str) -> String {
    format!("/run/netns/{ns}")
}

/// What rnat (and the reference plugins) leave in H and in rnat's state:
/// compared before/after an operation that must change nothing.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Snap {
    pub rv_links: BTreeSet<String>,
    pub pub_any: BTreeSet<MapElem>,
    pub pub_addr: BTreeSet<MapElem>,
    /// (ip, owner) of rnat's IPAM files.
    pub ipam: BTreeSet<(String, String)>,
    /// Keys of rnat's container index plus entries under run/containers.
    pub records: BTreeSet<String>,
}

impl Snap {
    fn is_empty(&self) -> bool {
        self.rv_links.is_empty()
            && self.pub_any.is_empty()
            && self.pub_addr.is_empty()
            && self.ipam.is_empty()
            && self.records.is_empty()
    }
}

/// What a successful ADD produced, as read from its result.
#[derive(Debug, Clone)]
pub struct Attachment {
    pub call: Call,
    /// Name of the container namespace.
    pub ns: String,
    pub result: Value,
    /// The container's address (without prefix).
    pub ip: String,
    /// The host end of the veth pair (`interfaces[0].name`).
    pub host_if: String,
}

impl Rig {
    /// The `peer=` address a TCP `peer_addr_server` at ADDR:PORT reports
    /// when container namespace NS connects to it.
    pub fn container_peer_seen(&self, ns: &str, addr: &str, port: u16) -> Vec<String> {
        let out = tcp_exchange(self, ns, addr, port, b"");
        assert!(
            out.success(),
            "[{}] connection from container {ns} to {addr}:{port} failed\n{}",
            self.label,
            out.describe()
        );
        peer_lines(&out.stdout_str())
    }

    /// The base configuration of the test network for VERSION, with the
    /// members of EXTRA merged in (a `null` member removes the key).
    pub fn conf(&self, version: &str, extra: Value) -> Value {
        let base = json!({
            "cniVersion": version,
            "name": NET,
            "type": "rnat",
            "bridge": BRIDGE,
            "subnet": SUBNET,
            "stateDir": self.state_dir.to_string_lossy(),
            "capabilities": {"portMappings": true},
        });
        merge(base, extra)
    }

    /// Runs plugin PROGRAM (a path) with COMMAND inside H, the way a
    /// runtime does: a clean environment with only PATH and CNI_*, the
    /// configuration on stdin.
    pub fn run_plugin(&self, program: &str, command: &str, call: &Call, stdin: &[u8]) -> Finished {
        let mut cmd = self.ns_command(&self.h, &[program]);
        cmd.env_clear().env("PATH", PLUGIN_PATH_ENV);
        for (k, v) in call.env(command) {
            cmd.env(k, v);
        }
        procs::run_bounded(cmd, Some(stdin), PLUGIN_TIMEOUT)
    }

    /// rnat as a CNI plugin, with configuration CONF.
    pub fn cni(&self, command: &str, call: &Call, conf: &Value) -> Finished {
        self.run_plugin(RNAT, command, call, conf.to_string().as_bytes())
    }

    /// Asserts that COMMAND succeeded with no output (DEL, CHECK, STATUS, GC).
    pub fn cni_ok(&self, command: &str, call: &Call, conf: &Value, what: &str) {
        let out = self.cni(command, call, conf);
        assert!(
            out.success(),
            "[{}] {what}: {command} failed\n{}",
            self.label,
            out.describe()
        );
        assert!(
            out.stdout_str().trim().is_empty(),
            "[{}] {what}: {command} succeeded but printed something on stdout\n{}",
            self.label,
            out.describe()
        );
    }

    /// Runs a successful ADD and returns what it attached, after checking
    /// the result's shape against docs/cni.md and the kernel.
    pub fn add_ok(&self, call: &Call, conf: &Value, what: &str) -> Attachment {
        let out = self.cni("ADD", call, conf);
        let result = parse_success(&out, &format!("[{}] {what}", self.label));
        let version = conf["cniVersion"].as_str().unwrap_or("1.0.0");
        assert_eq!(
            result["interfaces"].as_array().map(Vec::len),
            Some(2),
            "[{}] {what}: rnat's result lists [host veth, container interface]: {result}",
            self.label
        );
        self.assert_add_result(&result, version, call, what)
    }

    /// Checks an ADD result (rnat's own or a chain's final one, VERSION
    /// format) against docs/cni.md and against the kernel, and returns the
    /// attachment it describes.
    pub fn assert_add_result(
        &self,
        result: &Value,
        version: &str,
        call: &Call,
        what: &str,
    ) -> Attachment {
        let ns = call
            .netns
            .as_deref()
            .and_then(|p| p.strip_prefix("/run/netns/"))
            .unwrap_or_else(|| panic!("{what}: ADD call without a named netns: {call:?}"));
        let ctx = format!("[{}] {what}: ADD result {result}", self.label);
        assert_eq!(result["cniVersion"], version, "{ctx}: cniVersion");
        let ifaces = result["interfaces"]
            .as_array()
            .unwrap_or_else(|| panic!("{ctx}: no interfaces list"));
        // Plugins chained after rnat may append interfaces (bandwidth's ifb).
        assert!(
            ifaces.len() >= 2,
            "{ctx}: expected [host veth, container interface, ...]"
        );
        let host_if = ifaces[0]["name"]
            .as_str()
            .unwrap_or_else(|| panic!("{ctx}: interfaces[0] has no name"))
            .to_string();
        assert!(
            host_if.starts_with("rv"),
            "{ctx}: host veth is not an rv* link"
        );
        assert!(
            ifaces[0]
                .get("sandbox")
                .is_none_or(|s| s.as_str() == Some("")),
            "{ctx}: the host veth must have no sandbox"
        );
        assert_eq!(
            ifaces[1]["name"], IFNAME,
            "{ctx}: interfaces[1] is the container's"
        );
        assert_eq!(
            ifaces[1]["sandbox"],
            netns_path(ns),
            "{ctx}: interfaces[1].sandbox"
        );
        let ips = result["ips"]
            .as_array()
            .unwrap_or_else(|| panic!("{ctx}: no ips list"));
        assert_eq!(ips.len(), 1, "{ctx}: one IPv4 address expected");
        let ipc = &ips[0];
        assert_eq!(ipc["interface"], 1, "{ctx}: ips[0].interface must be 1");
        match version {
            "0.4.0" => assert_eq!(ipc["version"], "4", "{ctx}: 0.4.0 marks the IP version"),
            _ => assert!(
                ipc.get("version").is_none(),
                "{ctx}: {version} results carry no ips[].version"
            ),
        }
        let cidr = ipc["address"]
            .as_str()
            .unwrap_or_else(|| panic!("{ctx}: ips[0].address"));
        let (ip, prefix) = cidr
            .split_once('/')
            .unwrap_or_else(|| panic!("{ctx}: address {cidr} has no prefix"));
        let gw = ipc["gateway"]
            .as_str()
            .unwrap_or_else(|| panic!("{ctx}: ips[0].gateway"))
            .to_string();
        let routes = result["routes"]
            .as_array()
            .unwrap_or_else(|| panic!("{ctx}: no routes list"));
        assert!(
            routes
                .iter()
                .any(|r| r["dst"] == "0.0.0.0/0" && r["gw"] == gw.as_str()),
            "{ctx}: no default route via {gw}"
        );

        // The kernel agrees: container side.
        assert_eq!(
            self.addrs(ns, IFNAME),
            vec![cidr.to_string()],
            "{ctx}: addresses of {IFNAME} in {ns}"
        );
        let link = self
            .link_json(ns, IFNAME)
            .unwrap_or_else(|| panic!("{ctx}: {IFNAME} missing from {ns}"));
        assert!(
            link["flags"]
                .as_array()
                .is_some_and(|f| f.iter().any(|x| x == "UP")),
            "{ctx}: {IFNAME} is not up: {link}"
        );
        if let Some(mac) = ifaces[1]["mac"].as_str().filter(|m| !m.is_empty()) {
            assert_eq!(link["address"], mac, "{ctx}: container MAC");
        }
        assert_eq!(
            self.default_gateway(ns),
            Some(gw.clone()),
            "{ctx}: default route in {ns}"
        );
        // Host side: the veth exists in H, on the bridge, with that MAC.
        let host = self
            .link_json(&self.h, &host_if)
            .unwrap_or_else(|| panic!("{ctx}: {host_if} missing from H"));
        if let Some(mac) = ifaces[0]["mac"].as_str().filter(|m| !m.is_empty()) {
            assert_eq!(host["address"], mac, "{ctx}: host veth MAC");
        }
        assert!(
            host.get("master").and_then(Value::as_str).is_some(),
            "{ctx}: {host_if} is not on a bridge: {host}"
        );
        let addr: Ipv4Addr = ip
            .parse()
            .unwrap_or_else(|e| panic!("{ctx}: address {ip} is not IPv4: {e}"));
        assert!(
            prefix.parse::<u8>().is_ok_and(|p| p <= 32) && in_subnet(addr, cidr),
            "{ctx}: bad prefix in {cidr}"
        );
        Attachment {
            call: call.clone(),
            ns: ns.to_string(),
            result: result.clone(),
            ip: ip.to_string(),
            host_if,
        }
    }

    /// `ip -j link show dev DEV` in NS, or `None` if there is no such link.
    pub fn link_json(&self, ns: &str, dev: &str) -> Option<Value> {
        let out = self.ip_try(ns, &["-j", "link", "show", "dev", dev]);
        if !out.success() {
            return None;
        }
        let v: Value = serde_json::from_slice(&out.stdout)
            .unwrap_or_else(|e| panic!("`ip -j link` is not JSON ({e})\n{}", out.describe()));
        v.as_array().and_then(|a| a.first()).cloned()
    }

    /// The gateway of the default IPv4 route in NS.
    pub fn default_gateway(&self, ns: &str) -> Option<String> {
        let v: Value = serde_json::from_str(&self.ip(ns, &["-j", "-4", "route", "show"]))
            .expect("`ip -j route` is JSON");
        v.as_array()?
            .iter()
            .find(|r| r["dst"] == "default")
            .and_then(|r| r["gateway"].as_str().map(str::to_string))
    }

    /// (name, kind) of every link in container namespace NS.
    pub fn link_kinds(&self, ns: &str) -> BTreeSet<(String, String)> {
        let v: Value = serde_json::from_str(&self.ip(ns, &["-j", "-d", "link", "show"]))
            .expect("`ip -j link` is JSON");
        v.as_array()
            .into_iter()
            .flatten()
            .map(|l| {
                (
                    l["ifname"].as_str().unwrap_or("?").to_string(),
                    l["linkinfo"]["info_kind"]
                        .as_str()
                        .unwrap_or("")
                        .to_string(),
                )
            })
            .collect()
    }

    /// Keys of rnat's container index (`run/containers.json`) and the
    /// entries under `run/containers/`.
    fn records(&self) -> BTreeSet<String> {
        let mut out: BTreeSet<String> = self
            .container_dirs()
            .into_iter()
            .map(|name| format!("run/containers/{name}"))
            .collect();
        let index = self.state_dir.join("run").join("containers.json");
        if let Ok(text) = std::fs::read_to_string(&index) {
            let v: Value = serde_json::from_str(&text)
                .unwrap_or_else(|e| panic!("{} is not JSON ({e}): {text}", index.display()));
            if let Some(o) = v.as_object() {
                out.extend(o.keys().map(|k| format!("index:{k}")));
            }
        }
        out
    }

    pub fn snap(&self) -> Snap {
        let maps = self.pub_maps();
        Snap {
            rv_links: self.rv_links(),
            pub_any: maps.any_elems(),
            pub_addr: maps.addr_elems(),
            ipam: self.ipam_allocations(),
            records: self.records(),
        }
    }

    /// Asserts that rnat left nothing: no rv* link in H, no map element,
    /// no allocation, no record.
    pub fn assert_clean(&self, what: &str) {
        let s = self.snap();
        assert!(
            s.is_empty(),
            "[{}] {what}: something was left behind: {s:#?}",
            self.label
        );
    }

    /// Asserts that HOST_PORT, published to a TCP echo server, answers from
    /// C through H's client-side address with exact bytes.
    pub fn assert_published_echo(&self, host_port: u16, seed: u64, what: &str) {
        let data = payload(16 * 1024, seed);
        assert_tcp_echo(self, &self.c, H_CLIENT_SIDE_IP, host_port, &data, what);
    }

    /// Asserts that container namespace NS reaches a `peer_addr_server` in U
    /// on PORT and that U sees H's uplink address (masquerade).
    pub fn assert_reaches_upstream(&self, ns: &str, port: u16, what: &str) {
        assert_eq!(
            self.container_peer_seen(ns, U_IP, port),
            vec![H_UPLINK_IP.to_string()],
            "[{}] {what}: U must see the container's traffic from H's address",
            self.label
        );
    }
}

/// BASE with EXTRA's members merged in; `null` members remove keys.
pub fn merge(mut base: Value, extra: Value) -> Value {
    let obj = base.as_object_mut().expect("base config is an object");
    if let Value::Object(extra) = extra {
        for (k, v) in extra {
            if v.is_null() {
                obj.remove(&k);
            } else {
                obj.insert(k, v);
            }
        }
    }
    base
}

/// A `runtimeConfig.portMappings` entry.
pub fn pm(host_port: u32, container_port: u32, protocol: &str, host_ip: Option<&str>) -> Value {
    let mut m = Map::new();
    m.insert("hostPort".into(), json!(host_port));
    m.insert("containerPort".into(), json!(container_port));
    m.insert("protocol".into(), json!(protocol));
    if let Some(ip) = host_ip {
        m.insert("hostIP".into(), json!(ip));
    }
    Value::Object(m)
}

/// `{"runtimeConfig": {"portMappings": [...]}}`, to merge into a config.
pub fn ports(mappings: &[Value]) -> Value {
    json!({"runtimeConfig": {"portMappings": mappings}})
}

/// A successful plugin call's stdout, parsed (it must be a JSON object).
pub fn parse_success(out: &Finished, what: &str) -> Value {
    assert!(
        out.success(),
        "{what}: the plugin failed\n{}",
        out.describe()
    );
    let v: Value = serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("{what}: stdout is not JSON ({e})\n{}", out.describe()));
    assert!(v.is_object(), "{what}: result is not an object: {v}");
    v
}

/// Asserts the CNI error convention of docs/cni.md: exit status 1 and a
/// JSON object on stdout with `cniVersion`, `code` CODE and a non-empty
/// `msg`. Returns the object.
pub fn assert_cni_error(out: &Finished, code: u64, what: &str) -> Value {
    assert!(
        !out.timed_out(),
        "{what}: the plugin timed out\n{}",
        out.describe()
    );
    let v: Value = serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "{what}: expected an error object on stdout ({e})\n{}",
            out.describe()
        )
    });
    assert_eq!(
        v["code"].as_u64(),
        Some(code),
        "{what}: expected error code {code}\n{}",
        out.describe()
    );
    assert_eq!(
        out.code(),
        Some(1),
        "{what}: errors exit with status 1\n{}",
        out.describe()
    );
    assert!(
        v["msg"].as_str().is_some_and(|m| !m.trim().is_empty()),
        "{what}: the error has no msg\n{}",
        out.describe()
    );
    assert!(
        v["cniVersion"]
            .as_str()
            .is_some_and(|s| VERSIONS.contains(&s)),
        "{what}: the error has no supported cniVersion\n{}",
        out.describe()
    );
    v
}

/// The `msg` of an error object.
pub fn msg(err: &Value) -> String {
    err["msg"].as_str().unwrap_or_default().to_string()
}

/// Argv of a TCP server that answers every connection with `tag=TAG\n`
/// followed by an echo of what it receives: tells which container answered.
pub fn tagged_echo_server(port: u16, tag: &str) -> Vec<String> {
    vec![
        "socat".into(),
        format!("TCP-LISTEN:{port},fork,reuseaddr"),
        format!("SYSTEM:echo tag={tag}; exec cat"),
    ]
}

/// True if IP is a host address of the test subnet other than the gateway.
pub fn in_test_subnet(ip: &str) -> bool {
    ip.parse::<Ipv4Addr>()
        .is_ok_and(|a| in_subnet(a, SUBNET) && ip != GATEWAY)
}
