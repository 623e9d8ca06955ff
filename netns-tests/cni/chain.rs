//! rnat with the reference plugins of containernetworking-plugins: a
//! delegated IPAM plugin (host-local), and a conflist chain executed the
//! way libcni executes it.

use std::path::PathBuf;

use super::*;

/// Files of host-local's data directory for network NET (its allocations
/// are files named after the address).
fn host_local_files(dir: &Path) -> BTreeSet<String> {
    let net_dir = dir.join(NET);
    std::fs::read_dir(&net_dir)
        .map(|rd| {
            rd.flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .filter(|n| n.parse::<Ipv4Addr>().is_ok())
                .collect()
        })
        .unwrap_or_default()
}

/// `ipam: {type: host-local}` without a top-level subnet: ADD takes its
/// address from host-local (recorded in host-local's dataDir), traffic
/// works, a failed ADD gives the address back, a failing host-local is
/// code 105, DEL releases the address there too; `ipam` without `type`
/// means rnat's own IPAM.
#[test]
fn delegated_host_local_ipam() {
    let ct = cni_topology!("cni_ipam");
    let data_dir = ct.work_path("host-local");
    let mk = |extra: Value| {
        let base = ct.conf(
            "1.0.0",
            json!({
                "subnet": null,
                "ipam": {
                    "type": "host-local",
                    "subnet": SUBNET,
                    "dataDir": data_dir.to_string_lossy(),
                },
            }),
        );
        merge(base, extra)
    };
    let conf = mk(ports(&[pm(8080, 80, "tcp", None)]));
    let ns = ct.netns_add();
    let call = Call::new("ipam1", &ns);
    let att = ct.add_ok(&call, &conf, "ADD with host-local");
    assert!(in_test_subnet(&att.ip), "[{}] {}", ct.label, att.ip);
    assert_eq!(
        att.result["ips"][0]["gateway"], GATEWAY,
        "[{}] gateway from host-local",
        ct.label
    );
    assert_eq!(
        host_local_files(&data_dir),
        BTreeSet::from([att.ip.clone()]),
        "[{}] host-local recorded the address",
        ct.label
    );
    let owner = std::fs::read_to_string(data_dir.join(NET).join(&att.ip)).unwrap_or_default();
    assert!(
        owner.contains("ipam1"),
        "[{}] host-local's record names another container: {owner:?}",
        ct.label
    );

    let _web = ct.server(&ns, &tcp_echo_server(80), "tcp", 80);
    let _peer = ct.server(&ct.u, &peer_addr_server("tcp", 7000), "tcp", 7000);
    ct.assert_published_echo(8080, 51, "published port, host-local address");
    ct.assert_reaches_upstream(&ns, 7000, "container → U, host-local address");

    // A failed ADD (port already published) hands the address back to
    // host-local and leaves nothing in rnat either.
    let ns2 = ct.netns_add();
    let call2 = Call::new("ipam2", &ns2);
    let before = ct.snap();
    let out = ct.cni("ADD", &call2, &conf);
    assert_cni_error(&out, 102, "ADD with host-local and a taken port");
    assert_eq!(
        ct.snap(),
        before,
        "[{}] the failed ADD changed something",
        ct.label
    );
    assert_eq!(
        host_local_files(&data_dir),
        BTreeSet::from([att.ip.clone()]),
        "[{}] the failed ADD kept an address in host-local",
        ct.label
    );

    // A second container gets another address from host-local.
    let conf2 = mk(ports(&[pm(8081, 80, "tcp", None)]));
    let att2 = ct.add_ok(&call2, &conf2, "second ADD with host-local");
    assert_ne!(att2.ip, att.ip, "[{}] distinct addresses", ct.label);
    let _web2 = ct.server(&ns2, &tcp_echo_server(80), "tcp", 80);
    ct.assert_published_echo(8081, 52, "second container");

    // The IPAM plugin fails (no subnet in its section): 105, nothing left.
    let ns3 = ct.netns_add();
    let broken = merge(
        conf2.clone(),
        json!({"ipam": {"type": "host-local", "dataDir": data_dir.to_string_lossy()}}),
    );
    let before = ct.snap();
    let out = ct.cni("ADD", &Call::new("ipam3", &ns3), &broken);
    assert_cni_error(&out, 105, "ADD with a failing host-local");
    assert_eq!(
        ct.snap(),
        before,
        "[{}] the failed ADD changed something",
        ct.label
    );
    assert_eq!(ct.link_kinds(&ns3).len(), 1, "[{}] links in ns3", ct.label);

    ct.cni_ok("DEL", &call, &conf, "DEL 1");
    assert_eq!(
        host_local_files(&data_dir),
        BTreeSet::from([att2.ip.clone()]),
        "[{}] DEL released the address in host-local",
        ct.label
    );
    ct.cni_ok("DEL", &call2, &conf2, "DEL 2");
    ct.cni_ok("DEL", &call2, &conf2, "DEL 2 again");
    assert!(
        host_local_files(&data_dir).is_empty(),
        "[{}] host-local still holds addresses: {:?}",
        ct.label,
        host_local_files(&data_dir)
    );
    ct.assert_clean("after DEL with host-local");

    // `ipam` without `type`: rnat's own IPAM allocates from `subnet`.
    let own = ct.conf(
        "1.0.0",
        json!({"ipam": {"dataDir": data_dir.to_string_lossy()}}),
    );
    let att3 = ct.add_ok(&Call::new("ipam4", &ns3), &own, "ADD with an untyped ipam");
    assert!(
        ct.ipam_allocations().iter().any(|(ip, _)| *ip == att3.ip),
        "[{}] rnat's own IPAM does not hold {}",
        ct.label,
        att3.ip
    );
    assert!(
        host_local_files(&data_dir).is_empty(),
        "[{}] host-local was used without ipam.type",
        ct.label
    );
    ct.cni_ok("DEL", &att3.call, &own, "DEL 4");
    ct.assert_clean("after DEL with rnat's own IPAM");
}

/// A network configuration list, executed as libcni does: each plugin gets
/// the list's `cniVersion` and `name` plus its own entry, the previous
/// result as `prevResult`, and the runtime's `runtimeConfig` restricted to
/// the capabilities it declares.
struct ConfList<'a> {
    ct: &'a Rig,
    list: Value,
    runtime: Value,
}

impl ConfList<'_> {
    fn plugins(&self) -> Vec<Value> {
        self.list["plugins"]
            .as_array()
            .cloned()
            .expect("conflist has plugins")
    }

    fn plugin_conf(&self, entry: &Value, prev: Option<&Value>) -> Value {
        let mut c = entry.clone();
        c["cniVersion"] = self.list["cniVersion"].clone();
        c["name"] = self.list["name"].clone();
        if let Some(p) = prev {
            c["prevResult"] = p.clone();
        }
        let mut rc = Map::new();
        for (cap, on) in entry["capabilities"].as_object().into_iter().flatten() {
            if on == true {
                if let Some(v) = self.runtime.get(cap) {
                    rc.insert(cap.clone(), v.clone());
                }
            }
        }
        if !rc.is_empty() {
            c["runtimeConfig"] = Value::Object(rc);
        }
        c
    }

    fn program(entry: &Value) -> String {
        match entry["type"].as_str() {
            Some("rnat") => RNAT.to_string(),
            Some(t) => format!("{PLUGIN_DIR}/{t}"),
            None => panic!("plugin entry without type: {entry}"),
        }
    }

    fn run(&self, entry: &Value, command: &str, call: &Call, conf: &Value) -> Finished {
        self.ct.run_plugin(
            &Self::program(entry),
            command,
            call,
            conf.to_string().as_bytes(),
        )
    }

    /// ADD through every plugin in order; returns the final result.
    fn add(&self, call: &Call) -> Value {
        let mut prev: Option<Value> = None;
        for entry in self.plugins() {
            let conf = self.plugin_conf(&entry, prev.as_ref());
            let out = self.run(&entry, "ADD", call, &conf);
            let what = format!("[{}] chain ADD, plugin {}", self.ct.label, entry["type"]);
            prev = Some(parse_success(&out, &what));
        }
        prev.expect("a conflist has at least one plugin")
    }

    /// CHECK or DEL through every plugin (DEL in reverse order), each with
    /// the cached final ADD result as prevResult.
    fn each(&self, command: &str, call: &Call, cached: &Value) {
        let mut plugins = self.plugins();
        if command == "DEL" {
            plugins.reverse();
        }
        for entry in plugins {
            let conf = self.plugin_conf(&entry, Some(cached));
            let out = self.run(&entry, command, call, &conf);
            assert!(
                out.success(),
                "[{}] chain {command}, plugin {}\n{}",
                self.ct.label,
                entry["type"],
                out.describe()
            );
        }
    }
}

/// IfB links in H (the bandwidth plugin's egress shaping devices).
fn ifb_links(ct: &Rig) -> Vec<String> {
    let out = ct.ip(&ct.h, &["-j", "link", "show", "type", "ifb"]);
    let v: Value = serde_json::from_str(&out).unwrap_or(Value::Array(Vec::new()));
    v.as_array()
        .into_iter()
        .flatten()
        .filter_map(|l| l["ifname"].as_str().map(str::to_string))
        .collect()
}

/// [rnat, tuning, bandwidth, firewall (iptables)]: ADD through all,
/// tuning's sysctl and MAC visible in the namespace, bandwidth's qdiscs and
/// firewall's rules in H, traffic still flowing, CHECK through all; DEL in
/// reverse leaves no rv* link, map element, allocation or record.
#[test]
fn conflist_chain_with_reference_plugins() {
    let ct = cni_topology!("cni_chain");
    let tuning_dir: PathBuf = ct.work_path("tuning");
    let mac = "0a:58:c0:00:02:63";
    let list = json!({
        "cniVersion": "1.0.0",
        "name": NET,
        "plugins": [
            {
                "type": "rnat",
                "bridge": BRIDGE,
                "subnet": SUBNET,
                "stateDir": ct.state_dir.to_string_lossy(),
                "capabilities": {"portMappings": true},
            },
            {
                "type": "tuning",
                "sysctl": {"net.ipv4.conf.eth0.accept_local": "1"},
                "mac": mac,
                "dataDir": tuning_dir.to_string_lossy(),
            },
            {
                "type": "bandwidth",
                "ingressRate": 200_000_000u64,
                "ingressBurst": 4_000_000u64,
                "egressRate": 200_000_000u64,
                "egressBurst": 4_000_000u64,
            },
            {"type": "firewall", "backend": "iptables"},
        ],
    });
    let chain = ConfList {
        ct: &ct,
        list,
        runtime: json!({
            "portMappings": [pm(8080, 80, "tcp", None), pm(5353, 53, "udp", None)],
        }),
    };
    let ns = ct.netns_add();
    let call = Call::new("chain1", &ns);
    let result = chain.add(&call);
    let att = ct.assert_add_result(&result, "1.0.0", &call, "chain ADD final result");

    // tuning: the sysctl and the MAC, in the namespace and in the result.
    let accept_local = ct.exec(&ns, &["cat", "/proc/sys/net/ipv4/conf/eth0/accept_local"]);
    assert_eq!(
        accept_local.stdout_str().trim(),
        "1",
        "[{}] tuning's sysctl\n{}",
        ct.label,
        accept_local.describe()
    );
    let link = ct.link_json(&ns, IFNAME).expect("eth0");
    assert_eq!(link["address"], mac, "[{}] tuning's MAC", ct.label);
    assert_eq!(
        result["interfaces"][1]["mac"], mac,
        "[{}] the final result carries tuning's MAC: {result}",
        ct.label
    );
    // bandwidth: shaping on the host veth found through rnat's result.
    let qdiscs = ct.exec_ok(&ct.h, &["tc", "qdisc", "show", "dev", &att.host_if]);
    assert!(
        qdiscs.contains("tbf") && qdiscs.contains("ingress"),
        "[{}] bandwidth did not shape {}: {qdiscs}",
        ct.label,
        att.host_if
    );
    assert_eq!(ifb_links(&ct).len(), 1, "[{}] bandwidth's ifb", ct.label);
    // firewall: rules for the container's address in H.
    let rules = ct.exec_ok(&ct.h, &["iptables", "-w", "5", "-S", "CNI-FORWARD"]);
    assert!(
        rules.contains(&att.ip),
        "[{}] firewall has no rule for {}: {rules}",
        ct.label,
        att.ip
    );
    // rnat's part is intact.
    assert_eq!(
        ct.pub_maps().any_elems(),
        BTreeSet::from([
            MapElem::any("tcp", 8080, &att.ip, 80),
            MapElem::any("udp", 5353, &att.ip, 53),
        ]),
        "[{}] map elements after the chain",
        ct.label
    );

    // Traffic still works through all of it.
    let _web = ct.server(&ns, &tcp_echo_server(80), "tcp", 80);
    let _udp = ct.server(&ns, &udp_echo_server(53), "udp", 53);
    let _peer = ct.server(&ct.u, &peer_addr_server("tcp", 7000), "tcp", 7000);
    let data = payload(256 * 1024, 61);
    assert_tcp_echo(
        &ct,
        &ct.c,
        H_CLIENT_SIDE_IP,
        8080,
        &data,
        "C → published port through the chain",
    );
    assert_udp_echo(
        &ct,
        &ct.c,
        H_CLIENT_SIDE_IP,
        5353,
        &payload(900, 62),
        "C → published udp port through the chain",
    );
    ct.assert_reaches_upstream(&ns, 7000, "container → U through the chain");

    chain.each("CHECK", &call, &result);

    chain.each("DEL", &call, &result);
    ct.assert_clean("after the chain's DEL");
    assert!(
        ct.link_json(&ns, IFNAME).is_none(),
        "[{}] eth0 survived the chain's DEL",
        ct.label
    );
    assert!(
        ifb_links(&ct).is_empty(),
        "[{}] bandwidth's ifb survived DEL",
        ct.label
    );
    let rules = ct.exec_ok(&ct.h, &["iptables", "-w", "5", "-S"]);
    assert!(
        !rules.contains(&att.ip),
        "[{}] firewall rules for {} survived DEL: {rules}",
        ct.label,
        att.ip
    );
    // A second DEL of the whole chain is harmless too.
    chain.each("DEL", &call, &result);
    ct.assert_clean("after a second chain DEL");
}
