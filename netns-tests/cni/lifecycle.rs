//! DEL, CHECK, STATUS and GC against what ADD made, with the kernel read
//! back after each step.

use super::*;

/// `conf` plus `prevResult`.
fn with_prev(conf: &Value, prev: &Value) -> Value {
    merge(conf.clone(), json!({ "prevResult": prev }))
}

/// DEL removes the veth, the map elements and the allocation; it succeeds
/// a second time, without CNI_NETNS, after the namespace is gone, and with
/// no state at all (where it still finds the veth by its derived name).
#[test]
fn del_is_complete_and_idempotent() {
    let ct = cni_topology!("cni_del");
    let conf = ct.conf(
        "1.0.0",
        ports(&[
            pm(8080, 80, "tcp", None),
            pm(8081, 81, "udp", Some("127.0.0.1")),
        ]),
    );

    // 1. Plain DEL, then DEL again (and once more without CNI_NETNS).
    //    rnat's own RNAT_STATE_DIR must not matter in plugin mode.
    let ns1 = ct.netns_add();
    let decoy = ct.work_path("decoy-state");
    let mut call1 = Call::new("del1", &ns1);
    call1
        .other_env
        .push(("RNAT_STATE_DIR", decoy.to_string_lossy().into_owned()));
    let a1 = ct.add_ok(&call1, &conf, "ADD 1");
    assert!(
        !decoy.exists(),
        "[{}] ADD used RNAT_STATE_DIR instead of the configuration's stateDir",
        ct.label
    );
    let before = ct.snap();
    assert!(
        before.rv_links.contains(&a1.host_if)
            && before.pub_any.len() == 1
            && before.pub_addr.len() == 1
            && before.ipam.iter().any(|(ip, _)| *ip == a1.ip)
            && !before.records.is_empty(),
        "[{}] ADD 1 is visible everywhere: {before:#?}",
        ct.label
    );
    ct.cni_ok("DEL", &a1.call, &conf, "DEL 1");
    ct.assert_clean("after DEL 1");
    assert!(
        ct.link_json(&ns1, IFNAME).is_none(),
        "[{}] eth0 survived DEL",
        ct.label
    );
    ct.cni_ok("DEL", &a1.call, &conf, "DEL 1 again");
    let mut bare = a1.call.clone();
    bare.netns = None;
    ct.cni_ok("DEL", &bare, &conf, "DEL 1 without CNI_NETNS");
    ct.assert_clean("after the repeated DELs");

    // 2. The namespace is deleted before DEL (the veth pair dies with it).
    let ns2 = ct.netns_add();
    let a2 = ct.add_ok(&Call::new("del2", &ns2), &conf, "ADD 2");
    ct.del_ns(&ns2);
    ct.cni_ok("DEL", &a2.call, &conf, "DEL after the netns is gone");
    ct.assert_clean("after DEL of an attachment whose netns is gone");
    ct.cni_ok("DEL", &a2.call, &conf, "DEL again after the netns is gone");

    // 3. No state at all: a fresh stateDir, a container rnat never saw.
    let fresh = ct.work_path("fresh-state");
    let fresh_conf = merge(conf.clone(), json!({"stateDir": fresh.to_string_lossy()}));
    let ns3 = ct.netns_add();
    ct.cni_ok(
        "DEL",
        &Call::new("never-added", &ns3),
        &fresh_conf,
        "DEL with no state",
    );
    assert_eq!(
        ct.link_kinds(&ns3).len(),
        1,
        "[{}] DEL with no state changed the namespace",
        ct.label
    );

    // 4. State lost after ADD: DEL with a fresh stateDir still removes the
    //    veth (its name derives from container id and interface); DEL with
    //    the real state then removes the rest.
    let ns4 = ct.netns_add();
    let a4 = ct.add_ok(&Call::new("del4", &ns4), &conf, "ADD 4");
    let fresh2 = merge(
        conf.clone(),
        json!({"stateDir": ct.work_path("fresh-state-2").to_string_lossy()}),
    );
    ct.cni_ok("DEL", &a4.call, &fresh2, "DEL 4 without state");
    assert!(
        !ct.rv_links().contains(&a4.host_if),
        "[{}] DEL without state left {}",
        ct.label,
        a4.host_if
    );
    assert!(
        ct.link_json(&ns4, IFNAME).is_none(),
        "[{}] eth0 survived DEL without state",
        ct.label
    );
    ct.cni_ok("DEL", &a4.call, &conf, "DEL 4 with state");
    ct.assert_clean("after DEL 4");
}

/// CHECK passes right after ADD and fails with 104, naming the problem,
/// once the host veth, the container's address, a map element, the veth's
/// place on the bridge or the default route is gone.
/// CHECK of an unknown attachment fails with 3.
#[test]
fn check_detects_drift() {
    let ct = cni_topology!("cni_check");
    let mk = |port: u16| ct.conf("1.0.0", ports(&[pm(port.into(), 80, "tcp", None)]));
    let mut atts = Vec::new();
    for (i, port) in [8081u16, 8082, 8080, 8083, 8084].into_iter().enumerate() {
        let ns = ct.netns_add();
        let conf = mk(port);
        let a = ct.add_ok(&Call::new(&format!("chk{i}"), &ns), &conf, "ADD");
        ct.cni_ok(
            "CHECK",
            &a.call,
            &with_prev(&conf, &a.result),
            "CHECK right after ADD",
        );
        atts.push((a, conf));
    }

    // A prevResult that is not what ADD returned.
    let (a0, c0) = &atts[0];
    let mut wrong = a0.result.clone();
    wrong["ips"][0]["address"] = json!("192.0.2.250/24");
    let out = ct.cni("CHECK", &a0.call, &with_prev(c0, &wrong));
    assert_cni_error(&out, 104, "CHECK with a foreign prevResult");

    // 1. The host veth is deleted.
    ct.ip(&ct.h, &["link", "del", &a0.host_if]);
    let out = ct.cni("CHECK", &a0.call, &with_prev(c0, &a0.result));
    let err = assert_cni_error(&out, 104, "CHECK after deleting the host veth");
    assert!(
        msg(&err).contains(&a0.host_if),
        "[{}] the message should name {}: {err}",
        ct.label,
        a0.host_if
    );

    // 2. The address is removed inside the container.
    let (a1, c1) = &atts[1];
    ct.ip(
        &a1.ns,
        &["addr", "del", &format!("{}/24", a1.ip), "dev", IFNAME],
    );
    let out = ct.cni("CHECK", &a1.call, &with_prev(c1, &a1.result));
    let err = assert_cni_error(&out, 104, "CHECK after removing the address");
    assert!(
        msg(&err).contains(&a1.ip),
        "[{}] the message should name {}: {err}",
        ct.label,
        a1.ip
    );

    // 3. A published port's map element is deleted.
    let (a2, c2) = &atts[2];
    ct.exec_ok(
        &ct.h,
        &["nft", "delete element ip rnat pub_any { tcp . 8080 }"],
    );
    let out = ct.cni("CHECK", &a2.call, &with_prev(c2, &a2.result));
    let err = assert_cni_error(&out, 104, "CHECK after deleting a map element");
    assert!(
        msg(&err).contains("8080"),
        "[{}] the message should name port 8080: {err}",
        ct.label
    );

    // 4. The host veth is taken off the bridge.
    let (a3, c3) = &atts[3];
    ct.ip(&ct.h, &["link", "set", &a3.host_if, "nomaster"]);
    let out = ct.cni("CHECK", &a3.call, &with_prev(c3, &a3.result));
    let err = assert_cni_error(&out, 104, "CHECK after taking the veth off the bridge");
    assert!(
        msg(&err).contains(&a3.host_if) && msg(&err).contains(BRIDGE),
        "[{}] the message should name {} and {BRIDGE}: {err}",
        ct.label,
        a3.host_if
    );

    // 5. The default route is deleted inside the container.
    let (a4, c4) = &atts[4];
    ct.ip(&a4.ns, &["route", "del", "default"]);
    let out = ct.cni("CHECK", &a4.call, &with_prev(c4, &a4.result));
    let err = assert_cni_error(&out, 104, "CHECK after deleting the default route");
    assert!(
        msg(&err).contains("default route"),
        "[{}] the message should name the default route: {err}",
        ct.label
    );

    // CHECK changed nothing: the other elements are all there is.
    assert_eq!(
        ct.pub_maps().any_elems(),
        BTreeSet::from([
            MapElem::any("tcp", 8081, &a0.ip, 80),
            MapElem::any("tcp", 8082, &a1.ip, 80),
            MapElem::any("tcp", 8083, &a3.ip, 80),
            MapElem::any("tcp", 8084, &a4.ip, 80),
        ]),
        "[{}] map elements after the CHECKs",
        ct.label
    );

    // Unknown attachment: 3.
    let ns = ct.netns_add();
    let out = ct.cni(
        "CHECK",
        &Call::new("nobody", &ns),
        &with_prev(c0, &a0.result),
    );
    assert_cni_error(&out, 3, "CHECK of an unknown container");

    // Drifted attachments still DEL cleanly.
    for (a, c) in &atts {
        ct.cni_ok("DEL", &a.call, c, "DEL of a drifted attachment");
    }
    ct.assert_clean("after DEL of the drifted attachments");
}

/// STATUS succeeds on a usable network and fails with 50 once a /30 is
/// full; an ADD into the full network fails with 103 and changes nothing.
#[test]
fn status_and_exhausted_subnet() {
    let ct = cni_topology!("cni_status");
    let call0 = Call::bare();
    let big = ct.conf("1.1.0", json!({}));
    ct.cni_ok("STATUS", &call0, &big, "STATUS before any ADD");
    // A stateDir rnat cannot use (a regular file): 50.
    let file = ct.work_path("not-a-dir");
    std::fs::write(&file, b"x").expect("write scratch file");
    let unusable = merge(big.clone(), json!({"stateDir": file.to_string_lossy()}));
    let out = ct.cni("STATUS", &call0, &unusable);
    assert_cni_error(&out, 50, "STATUS with an unusable stateDir");

    let small = ct.conf(
        "1.1.0",
        json!({"name": "rncsmall", "bridge": "rnc-br1", "subnet": "192.0.2.0/30"}),
    );
    ct.cni_ok("STATUS", &call0, &small, "STATUS of an empty /30");
    let ns1 = ct.netns_add();
    let a1 = ct.add_ok(&Call::new("only", &ns1), &small, "ADD into the /30");
    assert_eq!(a1.ip, "192.0.2.2", "[{}] the /30's only address", ct.label);

    let ns2 = ct.netns_add();
    let call2 = Call::new("second", &ns2);
    let before = ct.snap();
    let out = ct.cni("ADD", &call2, &small);
    assert_cni_error(&out, 103, "ADD into a full /30");
    assert_eq!(
        ct.snap(),
        before,
        "[{}] the refused ADD changed something",
        ct.label
    );
    assert_eq!(ct.link_kinds(&ns2).len(), 1, "[{}] links in ns2", ct.label);

    let out = ct.cni("STATUS", &call0, &small);
    let err = assert_cni_error(&out, 50, "STATUS of a full /30");
    assert_eq!(err["cniVersion"], "1.1.0", "{err}");

    // After DEL the network can serve again.
    ct.cni_ok("DEL", &a1.call, &small, "DEL the /30's container");
    ct.cni_ok("STATUS", &call0, &small, "STATUS after DEL");
    let a2 = ct.add_ok(&call2, &small, "ADD after DEL");
    assert_eq!(
        a2.ip, "192.0.2.2",
        "[{}] the address is free again",
        ct.label
    );
    ct.cni_ok("DEL", &a2.call, &small, "DEL");
    ct.assert_clean("after DEL");
}

/// GC with three attachments and valid-attachments naming one: the other
/// two go (links, elements, allocations), and so does an unexplained rv*
/// veth on the bridge; the listed one keeps working, and another network's
/// attachment in the same stateDir is not touched.
#[test]
fn gc_removes_unlisted_attachments() {
    let ct = cni_topology!("cni_gc");
    let mut atts = Vec::new();
    for i in 0..3u16 {
        let ns = ct.netns_add();
        let conf = ct.conf(
            "1.1.0",
            merge(
                json!({"subnet": "192.0.2.0/25"}),
                ports(&[pm(8080 + u32::from(i), 80, "tcp", None)]),
            ),
        );
        atts.push(ct.add_ok(&Call::new(&format!("gc{i}"), &ns), &conf, "ADD"));
    }
    // Another network in the same stateDir: not GC's business.
    let other_conf = ct.conf(
        "1.1.0",
        merge(
            json!({"name": "rncother", "bridge": "rnc-br9", "subnet": "192.0.2.128/25"}),
            ports(&[pm(9090, 80, "tcp", None)]),
        ),
    );
    let other_ns = ct.netns_add();
    let other = ct.add_ok(
        &Call::new("gc-other", &other_ns),
        &other_conf,
        "ADD other network",
    );
    let keep = &atts[1];
    let _web = ct.server(&keep.ns, &tcp_echo_server(80), "tcp", 80);
    let _peer = ct.server(&ct.u, &peer_addr_server("tcp", 7000), "tcp", 7000);
    ct.assert_published_echo(8081, 41, "before GC");

    // A stray rv* veth on the bridge (no record explains it), and an rv*
    // link that is not on the bridge (not the network's: left alone).
    ct.ip(
        &ct.h,
        &[
            "link",
            "add",
            "rv0badbeef",
            "master",
            BRIDGE,
            "type",
            "veth",
            "peer",
            "name",
            "rncpeer0",
        ],
    );
    ct.ip(
        &ct.h,
        &[
            "link",
            "add",
            "rv0ffbridg",
            "type",
            "veth",
            "peer",
            "name",
            "rncpeer1",
        ],
    );

    let gc = ct.conf(
        "1.1.0",
        json!({"subnet": "192.0.2.0/25",
               "cni.dev/valid-attachments": [{"containerID": "gc1", "ifname": IFNAME}]}),
    );
    let call0 = Call::bare();
    ct.cni_ok("GC", &call0, &gc, "GC");

    let s = ct.snap();
    assert_eq!(
        s.rv_links,
        BTreeSet::from([
            keep.host_if.clone(),
            other.host_if.clone(),
            "rv0ffbridg".to_string()
        ]),
        "[{}] rv links after GC",
        ct.label
    );
    assert_eq!(
        s.pub_any,
        BTreeSet::from([
            MapElem::any("tcp", 8081, &keep.ip, 80),
            MapElem::any("tcp", 9090, &other.ip, 80)
        ]),
        "[{}] map elements after GC",
        ct.label
    );
    assert_eq!(
        s.ipam
            .iter()
            .map(|(ip, _)| ip.as_str())
            .collect::<BTreeSet<_>>(),
        BTreeSet::from([keep.ip.as_str(), other.ip.as_str()]),
        "[{}] allocations after GC",
        ct.label
    );
    for gone in [&atts[0], &atts[2]] {
        assert!(
            ct.link_json(&gone.ns, IFNAME).is_none(),
            "[{}] {} still has eth0 after GC",
            ct.label,
            gone.ns
        );
    }
    // The kept one still works, both ways, and CHECK agrees.
    ct.assert_published_echo(8081, 42, "kept attachment after GC");
    ct.assert_reaches_upstream(&keep.ns, 7000, "kept attachment → U after GC");
    let keep_conf = ct.conf(
        "1.1.0",
        merge(
            json!({"subnet": "192.0.2.0/25"}),
            ports(&[pm(8081, 80, "tcp", None)]),
        ),
    );
    ct.cni_ok(
        "CHECK",
        &keep.call,
        &with_prev(&keep_conf, &keep.result),
        "CHECK of the kept attachment",
    );
    ct.cni_ok("DEL", &keep.call, &keep_conf, "DEL the kept one");
    ct.cni_ok("DEL", &other.call, &other_conf, "DEL the other network's");
    ct.ip(&ct.h, &["link", "del", "rv0ffbridg"]);
    ct.assert_clean("after GC and DEL");
}
