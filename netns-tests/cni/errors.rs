//! ADDs that must fail: each prints the specification's error object with
//! the code of docs/cni.md, exits with status 1, and changes nothing (no
//! new rv* link, map element, allocation or record, no new link in the
//! container namespace). Also the CNI_ARGS an ADD honours.

use super::*;

/// Runs an ADD with raw STDIN that must fail with one of CODES (the first
/// is the one reported when none matches) and change nothing (compared
/// with a snapshot taken just before). NS, if given, is the container
/// namespace whose links must stay as they were. Returns the error object.
fn assert_add_refused(
    ct: &Rig,
    call: &Call,
    stdin: &[u8],
    ns: Option<&str>,
    codes: &[u64],
    what: &str,
) -> Value {
    let what = format!("[{}] {what}", ct.label);
    let before = ct.snap();
    let links_before = ns.map(|n| ct.link_kinds(n));
    let out = ct.run_plugin(RNAT, "ADD", call, stdin);
    let got = serde_json::from_slice::<Value>(&out.stdout)
        .ok()
        .and_then(|v| v["code"].as_u64());
    let code = codes
        .iter()
        .copied()
        .find(|&c| Some(c) == got)
        .unwrap_or(codes[0]);
    let err = assert_cni_error(&out, code, &what);
    assert_eq!(
        ct.snap(),
        before,
        "{what}: the failed ADD changed something"
    );
    if let (Some(n), Some(links)) = (ns, links_before) {
        assert_eq!(
            ct.link_kinds(n),
            links,
            "{what}: the failed ADD changed the links of the container namespace"
        );
    }
    err
}

fn refused_conf(ct: &Rig, call: &Call, conf: &Value, ns: &str, code: u64, what: &str) -> Value {
    assert_add_refused(
        ct,
        call,
        conf.to_string().as_bytes(),
        Some(ns),
        &[code],
        what,
    )
}

/// Missing variables, malformed input, unsupported versions and invalid
/// values: codes 4, 6, 1 and 7, with an attachment already in place that
/// must not be disturbed.
#[test]
fn add_rejects_bad_environment_and_configuration() {
    let ct = cni_topology!("cni_bad_input");
    let base_ns = ct.netns_add();
    let conf = ct.conf("1.0.0", ports(&[pm(8080, 80, "tcp", None)]));
    let base = ct.add_ok(&Call::new("base", &base_ns), &conf, "baseline ADD");
    let _web = ct.server(&base_ns, &tcp_echo_server(80), "tcp", 80);

    let ns = ct.netns_add();
    let good = Call::new("victim", &ns);
    let conf2 = ct.conf("1.0.0", ports(&[pm(8081, 80, "tcp", None)]));

    // Missing or malformed CNI_* variables: 4.
    for (var, what) in [
        ("CNI_NETNS", "missing CNI_NETNS"),
        ("CNI_CONTAINERID", "missing CNI_CONTAINERID"),
        ("CNI_IFNAME", "missing CNI_IFNAME"),
    ] {
        let mut call = good.clone();
        match var {
            "CNI_NETNS" => call.netns = None,
            "CNI_CONTAINERID" => call.cid = None,
            _ => call.ifname = None,
        }
        let err = refused_conf(&ct, &call, &conf2, &ns, 4, what);
        assert!(
            msg(&err).contains(var),
            "[{}] {what}: the message should name {var}: {err}",
            ct.label
        );
    }
    for (args, what) in [
        ("IgnoreUnknown=1;novalue", "CNI_ARGS entry without '='"),
        ("IP=192.0.2.300", "CNI_ARGS IP= that is not an address"),
        ("MAC=02:42:zz:00:00:01", "CNI_ARGS MAC= that is not a MAC"),
    ] {
        refused_conf(&ct, &good.clone().with_args(args), &conf2, &ns, 4, what);
    }

    // Not JSON: 6.
    for (raw, what) in [
        (&b"{not json"[..], "malformed JSON"),
        (&b""[..], "empty configuration"),
        (&b"[1, 2]"[..], "JSON that is not an object"),
    ] {
        assert_add_refused(&ct, &good, raw, Some(&ns), &[6], what);
    }

    // Unsupported version: 1.
    for v in ["0.3.1", "0.2.0", "2.0.0"] {
        let c = ct.conf(v, ports(&[pm(8081, 80, "tcp", None)]));
        refused_conf(&ct, &good, &c, &ns, 1, &format!("cniVersion {v}"));
    }

    // Invalid values of known keys: 7.
    let bad_values = [
        (json!({"subnet": "x"}), "subnet x"),
        (json!({"subnet": "192.0.2.0/33"}), "subnet /33"),
        (json!({"mtu": 10}), "mtu 10"),
        (json!({"mtu": 70000}), "mtu 70000"),
        (json!({"gateway": "not-an-ip"}), "gateway not-an-ip"),
        (json!({"ipMasq": "yes"}), "ipMasq a string"),
        (json!({"subnet": null}), "no subnet and no ipam"),
        (ports(&[pm(0, 80, "tcp", None)]), "hostPort 0"),
        (
            ports(&[pm(8081, 70000, "tcp", None)]),
            "containerPort 70000",
        ),
        (ports(&[pm(8081, 80, "sctp", None)]), "protocol sctp"),
        (
            ports(&[pm(8081, 80, "tcp", Some("not-an-ip"))]),
            "hostIP not-an-ip",
        ),
        (
            json!({"runtimeConfig": {"portMappings": {"hostPort": 8081}}}),
            "portMappings not a list",
        ),
        (
            json!({"runtimeConfig": {"portMappings": [{"containerPort": 80}]}}),
            "portMappings without hostPort",
        ),
    ];
    for (extra, what) in bad_values {
        let c = ct.conf("1.0.0", extra);
        let err = refused_conf(&ct, &good, &c, &ns, 7, what);
        assert_eq!(
            err["cniVersion"], "1.0.0",
            "[{}] {what}: the error answers in the configuration's version",
            ct.label
        );
    }

    // None of this disturbed the baseline, and the same namespace and
    // container id work with a valid configuration.
    ct.assert_published_echo(8080, 21, "baseline after the refused ADDs");
    let att = ct.add_ok(&good, &conf2, "valid ADD after the refused ones");
    assert_ne!(att.ip, base.ip, "[{}] distinct addresses", ct.label);
    let _web2 = ct.server(&ns, &tcp_echo_server(80), "tcp", 80);
    ct.assert_published_echo(8081, 22, "second attachment");
    ct.cni_ok("DEL", &good, &conf2, "DEL second");
    ct.cni_ok("DEL", &base.call, &conf, "DEL baseline");
    ct.assert_clean("after DEL of both");
}

/// Refusals that depend on what exists: the interface (101), the
/// attachment (101), a host port (102), an address (103); and CNI_ARGS
/// IP= and MAC= honoured.
#[test]
fn add_refusals_and_cni_args() {
    let ct = cni_topology!("cni_refusals");
    let base_ns = ct.netns_add();
    let conf = ct.conf("1.1.0", ports(&[pm(8080, 80, "tcp", None)]));
    let base = ct.add_ok(&Call::new("base", &base_ns), &conf, "baseline ADD");
    let _web = ct.server(&base_ns, &tcp_echo_server(80), "tcp", 80);
    let plain = ct.conf("1.1.0", json!({}));

    // The interface already exists in the namespace: 101, and it is left
    // as it was (still the same veth pair, still with its address).
    let ns1 = ct.netns_add();
    ct.ip(
        &ns1,
        &[
            "link", "add", IFNAME, "type", "veth", "peer", "name", "rncpeer0",
        ],
    );
    ct.ip(&ns1, &["addr", "add", "192.0.2.200/24", "dev", IFNAME]);
    let call1 = Call::new("dup-if", &ns1);
    let err = refused_conf(&ct, &call1, &plain, &ns1, 101, "eth0 exists");
    assert!(
        msg(&err).contains(IFNAME),
        "[{}] the message should name {IFNAME}: {err}",
        ct.label
    );
    assert_eq!(ct.addrs(&ns1, IFNAME), vec!["192.0.2.200/24".to_string()]);

    // The same (container id, interface) again, in a fresh namespace: 101.
    let ns2 = ct.netns_add();
    let again = Call::new("base", &ns2);
    refused_conf(&ct, &again, &plain, &ns2, 101, "same attachment twice");

    // Host ports: published by another attachment, or bound by a socket.
    let ns3 = ct.netns_add();
    let call3 = Call::new("ports", &ns3);
    let squat_tcp = ct.server(&ct.h, &tcp_echo_server(8090), "tcp", 8090);
    let squat_udp = ct.server(&ct.h, &udp_echo_server(8091), "udp", 8091);
    for (m, what) in [
        (pm(8080, 80, "tcp", None), "tcp 8080 already published"),
        (
            pm(8080, 81, "tcp", Some("127.0.0.1")),
            "127.0.0.1:8080 overlaps the published 0.0.0.0:8080",
        ),
        (pm(8090, 80, "tcp", None), "tcp 8090 bound in H"),
        (pm(8091, 53, "udp", None), "udp 8091 bound in H"),
    ] {
        let c = ct.conf("1.1.0", ports(&[pm(9000, 90, "tcp", None), m]));
        let err = refused_conf(&ct, &call3, &c, &ns3, 102, what);
        let port = if what.contains("8090") {
            "8090"
        } else if what.contains("8091") {
            "8091"
        } else {
            "8080"
        };
        assert!(
            msg(&err).contains(port),
            "[{}] {what}: the message should name the port: {err}",
            ct.label
        );
    }
    // The squatter still owns 8090 (no DNAT was left), the baseline 8080.
    ct.assert_published_echo(8090, 30, "squatter in H keeps 8090");
    drop((squat_tcp, squat_udp));
    ct.assert_published_echo(8080, 31, "baseline keeps 8080");

    // Addresses: taken, outside the subnet, the gateway, the network address.
    for (ip, what) in [
        (base.ip.as_str(), "IP= taken by the baseline"),
        ("198.51.100.77", "IP= outside the subnet"),
        (GATEWAY, "IP= the gateway"),
        ("192.0.2.0", "IP= the network address"),
        ("192.0.2.255", "IP= the broadcast address"),
    ] {
        let call = call3.clone().with_args(&format!("IgnoreUnknown=1;IP={ip}"));
        refused_conf(&ct, &call, &plain, &ns3, 103, what);
    }

    // The kernel refuses the interface after the address was allocated and
    // the attachment recorded (an all-zero MAC=): the rollback leaves
    // nothing. Code 5 (kernel) or 4 (if rnat rejects the MAC up front).
    let zero_mac = call3.clone().with_args("MAC=00:00:00:00:00:00");
    let stdin = plain.to_string();
    assert_add_refused(
        &ct,
        &zero_mac,
        stdin.as_bytes(),
        Some(&ns3),
        &[5, 4],
        "MAC=00:00:00:00:00:00",
    );

    // IP= and MAC= honoured, read back in the namespace.
    let mac = "02:42:c0:00:02:4d";
    let call = call3.clone().with_args(&format!(
        "IgnoreUnknown=1;K8S_POD_NAME=x;IP=192.0.2.77;MAC={mac}"
    ));
    let att = ct.add_ok(
        &call,
        &ct.conf("1.1.0", ports(&[pm(8080, 80, "udp", None)])),
        "ADD with IP= and MAC= (and udp 8080 beside tcp 8080)",
    );
    assert_eq!(att.ip, "192.0.2.77", "[{}] IP= honoured", ct.label);
    assert_eq!(
        ct.addrs(&ns3, IFNAME),
        vec!["192.0.2.77/24".to_string()],
        "[{}] address in the namespace",
        ct.label
    );
    let link = ct.link_json(&ns3, IFNAME).expect("eth0");
    assert_eq!(link["address"], mac, "[{}] MAC= honoured", ct.label);
    assert_eq!(
        att.result["interfaces"][1]["mac"], mac,
        "[{}] the result reports the MAC",
        ct.label
    );
    let _udp = ct.server(&ns3, &udp_echo_server(80), "udp", 80);
    let dgram = payload(700, 32);
    assert_udp_echo(
        &ct,
        &ct.c,
        H_CLIENT_SIDE_IP,
        8080,
        &dgram,
        "udp 8080 to the IP= container",
    );
    ct.assert_published_echo(8080, 33, "tcp 8080 still to the baseline");

    for (c, cf) in [(&call, &plain), (&base.call, &conf)] {
        ct.cni_ok("DEL", c, cf, "DEL");
    }
    ct.assert_clean("after DEL of both");
}

/// Container ids are only unique as a whole (runtimes are free to share
/// prefixes): two containers whose ids share a long prefix are two
/// attachments.
#[test]
fn container_ids_sharing_a_prefix_are_distinct() {
    let ct = cni_topology!("cni_id_prefix");
    let conf = ct.conf("1.0.0", json!({}));
    let mut atts = Vec::new();
    for suffix in ["a", "b"] {
        let ns = ct.netns_add();
        let call = Call::new(&format!("pod-sandbox-0123456789-{suffix}"), &ns);
        atts.push(ct.add_ok(&call, &conf, &format!("ADD container {suffix}")));
    }
    assert_ne!(atts[0].ip, atts[1].ip, "[{}] distinct addresses", ct.label);
    for a in &atts {
        ct.cni_ok("DEL", &a.call, &conf, "DEL");
    }
    ct.assert_clean("after DEL of both");
}
