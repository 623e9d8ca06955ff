//! ADD: the result in each supported version's format, the kernel state it
//! describes, and real traffic through it (published TCP and UDP ports,
//! one bound to 127.0.0.1, and masqueraded traffic to U).

use super::*;

/// ADD with VERSION, then: the result's shape, addresses and routes in the
/// container, the map elements in H, and traffic (C → published ports,
/// H's 127.0.0.1 → the loopback-only port, the container → U). Ends with a
/// DEL that must leave nothing.
fn add_result_and_traffic(label: &str, version: &str) {
    let ct = cni_topology!(label);
    let ns = ct.netns_add();
    let call = Call::new("addv", &ns);
    let dns = json!({
        "nameservers": ["192.0.2.53"],
        "domain": "example.test",
        "search": ["example.test"],
        "options": ["ndots:2"],
    });
    let mut extra = ports(&[
        pm(8080, 80, "tcp", None),
        pm(8081, 80, "tcp", Some("127.0.0.1")),
        pm(5353, 53, "udp", None),
    ]);
    extra["dns"] = dns.clone();
    if version == "1.1.0" {
        // A one-element list is accepted too.
        extra["subnet"] = json!([SUBNET]);
    }
    let conf = ct.conf(version, extra);
    assert!(ct.snap().is_empty(), "[{label}] state before the first ADD");

    let att = ct.add_ok(&call, &conf, "ADD");
    let r = &att.result;
    assert!(
        in_test_subnet(&att.ip),
        "[{label}] address {} is not a host address of {SUBNET}",
        att.ip
    );
    assert_eq!(
        r["ips"][0]["address"],
        format!("{}/24", att.ip),
        "[{label}] prefix"
    );
    assert_eq!(r["ips"][0]["gateway"], GATEWAY, "[{label}] gateway: {r}");
    assert_eq!(r["dns"], dns, "[{label}] dns is passed through: {r}");
    // Exactly one link was added to the container namespace.
    assert_eq!(
        ct.link_kinds(&ns),
        BTreeSet::from([
            ("lo".to_string(), String::new()),
            (IFNAME.to_string(), "veth".to_string())
        ]),
        "[{label}] links in the container namespace"
    );
    let host = ct.link_json(&ct.h, &att.host_if).expect("host veth");
    assert_eq!(
        host["master"], BRIDGE,
        "[{label}] host veth on the configured bridge"
    );

    // Kernel read-back in H: one element per mapping, nothing else.
    let maps = ct.pub_maps();
    assert_eq!(
        maps.any_elems(),
        BTreeSet::from([
            MapElem::any("tcp", 8080, &att.ip, 80),
            MapElem::any("udp", 5353, &att.ip, 53),
        ]),
        "[{label}] pub_any"
    );
    assert_eq!(
        maps.addr_elems(),
        BTreeSet::from([MapElem::addr("127.0.0.1", "tcp", 8081, &att.ip, 80)]),
        "[{label}] pub_addr"
    );
    let snap = ct.snap();
    assert_eq!(
        snap.ipam
            .iter()
            .map(|(ip, _)| ip.clone())
            .collect::<Vec<_>>(),
        vec![att.ip.clone()],
        "[{label}] rnat's IPAM holds exactly the attachment's address"
    );
    assert_eq!(
        snap.rv_links,
        BTreeSet::from([att.host_if.clone()]),
        "[{label}] rv links"
    );

    // Traffic.
    let _tcp = ct.server(&ns, &tcp_echo_server(80), "tcp", 80);
    let _udp = ct.server(&ns, &udp_echo_server(53), "udp", 53);
    let _peer = ct.server(&ct.u, &peer_addr_server("tcp", 7000), "tcp", 7000);
    ct.wait_tcp_accepts(&ct.c, H_CLIENT_SIDE_IP, 8080);
    let data = payload(64 * 1024, 11);
    assert_tcp_echo(
        &ct,
        &ct.c,
        H_CLIENT_SIDE_IP,
        8080,
        &data,
        "C → published 8080",
    );
    assert_tcp_echo(&ct, &ct.h, "127.0.0.1", 8081, &data, "H's 127.0.0.1 → 8081");
    assert_tcp_no_answer(
        &ct,
        &ct.c,
        H_CLIENT_SIDE_IP,
        8081,
        "8081 is published on 127.0.0.1 only",
    );
    let dgram = payload(1200, 12);
    assert_udp_echo(
        &ct,
        &ct.c,
        H_CLIENT_SIDE_IP,
        5353,
        &dgram,
        "C → published udp 5353",
    );
    ct.assert_reaches_upstream(&ns, 7000, "container → U");

    // DEL leaves nothing, and the published port is gone.
    ct.cni_ok("DEL", &call, &conf, "DEL");
    ct.assert_clean("after DEL");
    assert!(
        ct.link_json(&ns, IFNAME).is_none(),
        "[{label}] eth0 survived DEL"
    );
    assert_tcp_no_answer(&ct, &ct.c, H_CLIENT_SIDE_IP, 8080, "8080 after DEL");
}

#[test]
fn add_result_v0_4_0() {
    add_result_and_traffic("cni_add_040", "0.4.0");
}

#[test]
fn add_result_v1_0_0() {
    add_result_and_traffic("cni_add_100", "1.0.0");
}

#[test]
fn add_result_v1_1_0() {
    add_result_and_traffic("cni_add_110", "1.1.0");
}

/// VERSION answers with the supported versions (no state, no namespace).
#[test]
fn version_lists_supported_versions() {
    let ct = cni_topology!("cni_version");
    let call = Call::bare();
    let out = ct.run_plugin(RNAT, "VERSION", &call, br#"{"cniVersion":"1.0.0"}"#);
    let v = parse_success(&out, "VERSION");
    assert_eq!(v["cniVersion"], "1.0.0", "{v}");
    let listed: BTreeSet<&str> = v["supportedVersions"]
        .as_array()
        .unwrap_or_else(|| panic!("no supportedVersions: {v}"))
        .iter()
        .filter_map(Value::as_str)
        .collect();
    for want in VERSIONS {
        assert!(listed.contains(want), "{want} not listed: {v}");
    }
}

/// The `hairpin` flag of host veth DEV as a bridge port in H.
fn bridge_port_hairpin(ct: &Rig, dev: &str) -> Option<bool> {
    let v: Value = serde_json::from_str(&ct.ip(&ct.h, &["-d", "-j", "link", "show", "dev", dev]))
        .expect("`ip -j link` is JSON");
    v[0]["linkinfo"]["info_slave_data"]["hairpin"].as_bool()
}

/// `gateway`, `mtu`, `hairpinMode` and `ipMasq` take effect, on two
/// networks side by side: the gateway on the bridge and in the container,
/// the MTU on both veth ends, a container reaching itself through
/// its own published port, and U seeing the container's own address when
/// masquerade is off (and H's when it is on).
#[test]
fn network_options_take_effect() {
    let ct = cni_topology!("cni_options");
    let a_conf = ct.conf(
        "1.0.0",
        merge(
            json!({"name": "rncmtu", "bridge": "rnc-br1", "subnet": "192.0.2.0/25",
                   "gateway": "192.0.2.126", "mtu": 1400, "hairpinMode": true}),
            ports(&[pm(8080, 80, "tcp", None)]),
        ),
    );
    let b_conf = ct.conf(
        "1.0.0",
        json!({"name": "rncnomasq", "bridge": "rnc-br2", "subnet": "192.0.2.128/25",
               "ipMasq": false, "hairpinMode": false}),
    );
    let (a_ns, b_ns) = (ct.netns_add(), ct.netns_add());
    let a = ct.add_ok(&Call::new("opta", &a_ns), &a_conf, "ADD mtu/hairpin");
    let b = ct.add_ok(&Call::new("optb", &b_ns), &b_conf, "ADD no masquerade");
    let b_ip: Ipv4Addr = b.ip.parse().expect("IPv4");
    assert!(
        in_subnet(b_ip, "192.0.2.128/25"),
        "[{}] {} is not in 192.0.2.128/25",
        ct.label,
        b.ip
    );

    // gateway: the bridge's address, the result's and the route's.
    assert_eq!(
        a.result["ips"][0]["gateway"], "192.0.2.126",
        "[{}] gateway in the result",
        ct.label
    );
    assert_eq!(
        ct.default_gateway(&a_ns).as_deref(),
        Some("192.0.2.126"),
        "[{}] default route",
        ct.label
    );
    let br = ct.ip(&ct.h, &["-4", "-o", "addr", "show", "dev", "rnc-br1"]);
    assert!(
        br.contains("192.0.2.126/25"),
        "[{}] bridge address: {br}",
        ct.label
    );

    // mtu on both ends of A's pair; the kernel's default on B's.
    for (ns, dev, want) in [
        (&a_ns, IFNAME, 1400),
        (&ct.h, a.host_if.as_str(), 1400),
        (&b_ns, IFNAME, 1500),
    ] {
        let link = ct.link_json(ns, dev).expect("link");
        assert_eq!(link["mtu"], want, "[{}] mtu of {dev} in {ns}", ct.label);
    }
    // hairpinMode on the bridge ports, and a container reaching itself.
    assert_eq!(
        bridge_port_hairpin(&ct, &a.host_if),
        Some(true),
        "[{}] hairpin on",
        ct.label
    );
    assert_eq!(
        bridge_port_hairpin(&ct, &b.host_if),
        Some(false),
        "[{}] hairpin off",
        ct.label
    );
    let _web = ct.server(&a_ns, &tcp_echo_server(80), "tcp", 80);
    let data = payload(8192, 71);
    assert_tcp_echo(
        &ct,
        &a_ns,
        H_CLIENT_SIDE_IP,
        8080,
        &data,
        "container → its own published port",
    );
    ct.assert_published_echo(8080, 72, "C → A");

    // ipMasq: U routes the container subnets back via H, so only
    // masquerade decides which source U sees.
    ct.ip(&ct.u, &["route", "add", "192.0.2.0/24", "via", H_UPLINK_IP]);
    let _peer = ct.server(&ct.u, &peer_addr_server("tcp", 7000), "tcp", 7000);
    ct.assert_reaches_upstream(&a_ns, 7000, "A (ipMasq default) → U");
    assert_eq!(
        ct.container_peer_seen(&b_ns, U_IP, 7000),
        vec![b.ip.clone()],
        "[{}] with ipMasq false U must see the container's own address",
        ct.label
    );

    ct.cni_ok("DEL", &a.call, &a_conf, "DEL A");
    ct.cni_ok("DEL", &b.call, &b_conf, "DEL B");
    ct.assert_clean("after DEL of both");
}

/// A second network on the same container (eth1): the first network's default route stays, the
/// second ADD installs none and says so (no default route in its result), CHECK passes for both,
/// and DEL of either leaves the other working.
#[test]
fn second_network_keeps_the_first_default_route() {
    let ct = cni_topology!("cni_second_net");
    let ns = ct.netns_add();
    let first = ct.conf("1.0.0", json!({"subnet": "192.0.2.0/25"}));
    let second = ct.conf(
        "1.0.0",
        json!({"name": "rncnet2", "bridge": "rnc-br1", "subnet": "192.0.2.128/25"}),
    );
    let call0 = Call::new("multi", &ns);
    let mut call1 = Call::new("multi", &ns);
    call1.ifname = Some("eth1".to_string());

    let r0 = parse_success(&ct.cni("ADD", &call0, &first), "ADD eth0");
    let r1 = parse_success(&ct.cni("ADD", &call1, &second), "ADD eth1");
    assert_eq!(
        r0["routes"][0]["gw"], "192.0.2.1",
        "first network sets the default route: {r0}"
    );
    assert_eq!(
        r1["routes"],
        json!([]),
        "second network must not claim a default route: {r1}"
    );
    assert_eq!(r1["interfaces"][1]["name"], "eth1");
    assert_eq!(ct.default_gateway(&ns).as_deref(), Some("192.0.2.1"));
    let eth1 = ct.addrs(&ns, "eth1");
    assert!(
        eth1.iter().any(|a| a.starts_with("192.0.2.130/25")),
        "eth1 addresses: {eth1:?}"
    );

    for (call, conf, prev) in [(&call0, &first, &r0), (&call1, &second, &r1)] {
        let with_prev = merge(conf.clone(), json!({ "prevResult": prev }));
        ct.cni_ok("CHECK", call, &with_prev, "CHECK of each attachment");
    }
    // Removing the second network leaves the first untouched, and the reverse.
    ct.cni_ok("DEL", &call1, &second, "DEL eth1");
    assert_eq!(ct.default_gateway(&ns).as_deref(), Some("192.0.2.1"));
    assert!(ct
        .addrs(&ns, "eth0")
        .iter()
        .any(|a| a.starts_with("192.0.2.2/25")));
    ct.cni_ok("DEL", &call0, &first, "DEL eth0");
    assert!(
        ct.rv_links().is_empty(),
        "no host veth left: {:?}",
        ct.rv_links()
    );
}

/// `subnet` as a list: addresses come from the first subnet with room, each container routes
/// through the gateway of its own subnet (both on the bridge), and both answer on published ports.
#[test]
fn subnet_list_fills_the_first_subnet_then_the_next() {
    let ct = cni_topology!("cni_subnet_list");
    let conf = |port: u32| {
        ct.conf(
            "1.0.0",
            merge(
                json!({"subnet": ["192.0.2.0/30", "192.0.2.64/26"]}),
                ports(&[pm(port, 80, "tcp", None)]),
            ),
        )
    };
    let (a, b) = (ct.netns_add(), ct.netns_add());
    let (ca, cb) = (conf(8080), conf(8081));
    let ra = parse_success(&ct.cni("ADD", &Call::new("pool-a", &a), &ca), "ADD a");
    let rb = parse_success(&ct.cni("ADD", &Call::new("pool-b", &b), &cb), "ADD b");
    assert_eq!(ra["ips"][0]["address"], "192.0.2.2/30", "{ra}");
    assert_eq!(rb["ips"][0]["address"], "192.0.2.66/26", "{rb}");
    assert_eq!(rb["ips"][0]["gateway"], "192.0.2.65");
    assert_eq!(ct.default_gateway(&b).as_deref(), Some("192.0.2.65"));
    let bridge = ct.ip(&ct.h, &["-4", "-o", "addr", "show", "dev", BRIDGE]);
    assert!(
        bridge.contains("192.0.2.1/30") && bridge.contains("192.0.2.65/26"),
        "bridge: {bridge}"
    );
    let _sa = ct.server(&a, &tcp_echo_server(80), "tcp", 80);
    let _sb = ct.server(&b, &tcp_echo_server(80), "tcp", 80);
    ct.assert_published_echo(8080, 1, "pool a");
    ct.assert_published_echo(8081, 2, "pool b");
    let _peer = ct.server(&ct.u, &peer_addr_server("tcp", 7300), "tcp", 7300);
    ct.assert_reaches_upstream(&b, 7300, "pool b reaches upstream masqueraded");
    let with_prev = merge(cb.clone(), json!({ "prevResult": rb }));
    ct.cni_ok(
        "CHECK",
        &Call::new("pool-b", &b),
        &with_prev,
        "CHECK of the second pool's attachment",
    );
    ct.cni_ok("DEL", &Call::new("pool-a", &a), &ca, "DEL a");
    ct.cni_ok("DEL", &Call::new("pool-b", &b), &cb, "DEL b");
    ct.assert_clean("after both DELs");
}

/// Runtimes may use long container ids (CNI sets no limit): a 200-character id attaches, serves
/// and detaches like any other.
#[test]
fn long_container_ids_attach_and_detach() {
    let ct = cni_topology!("cni_long_id");
    let ns = ct.netns_add();
    let cid = "k".repeat(200);
    let call = Call::new(&cid, &ns);
    let conf = ct.conf("1.0.0", ports(&[pm(8080, 80, "tcp", None)]));
    let r = parse_success(
        &ct.cni("ADD", &call, &conf),
        "ADD with a 200-character container id",
    );
    assert_eq!(r["interfaces"][1]["name"], "eth0", "{r}");
    let _web = ct.server(&ns, &tcp_echo_server(80), "tcp", 80);
    ct.assert_published_echo(8080, 7, "long id");
    ct.cni_ok("DEL", &call, &conf, "DEL with a 200-character container id");
    ct.assert_clean("after DEL");
}
