//! The container's resolver: forwarded to a loopback host resolver via the
//! gateway, or a copy of a routable host resolv.conf.

use super::*;

fn nameservers(resolv_conf: &str) -> Vec<String> {
    resolv_conf
        .lines()
        .filter_map(|l| l.trim().strip_prefix("nameserver"))
        .map(|s| s.trim().to_string())
        .collect()
}

/// Asserts that `busybox nslookup example.test` in a container answers
/// 192.0.2.77 (the test DNS server's record), resolving through VIA.
fn assert_container_resolves(t: &Topology, via: &str) {
    let out = t.rnat(&[
        "run",
        "--network",
        NET,
        "--",
        "busybox",
        "nslookup",
        "example.test",
    ]);
    assert_eq!(
        nslookup_addresses(&out.stdout_str()),
        vec!["192.0.2.77".to_string()],
        "container must resolve through {via}\n{}",
        out.describe()
    );
}

#[test]
fn dns_via_loopback_host_resolver() {
    let t = topology!("dns_loopback");
    t.write_etc_netns(&t.h, "resolv.conf", "nameserver 127.0.0.53\n");
    let _dnsd = start_dns_server(&t, &t.h, "127.0.0.53", &[("example.test", "192.0.2.77")]);
    t.network_create(NET, SUBNET, &[]);

    let out = t.rnat(&["run", "--network", NET, "--", "cat", "/etc/resolv.conf"]);
    assert!(out.success(), "{}", out.describe());
    assert_eq!(
        nameservers(&out.stdout_str()),
        vec![GATEWAY.to_string()],
        "container resolv.conf must point at the gateway\n{}",
        out.describe()
    );

    assert_container_resolves(&t, "the gateway to the host's loopback resolver");

    // The file is shared by the containers behind this gateway: one of them cannot change it.
    let out = t.rnat(&[
        "run",
        "--network",
        NET,
        "--",
        "sh",
        "-c",
        "echo 'nameserver 198.51.100.99' >> /etc/resolv.conf",
    ]);
    assert!(
        !out.success(),
        "a container could write the shared resolv.conf\n{}",
        out.describe()
    );
    let out = t.rnat(&["run", "--network", NET, "--", "cat", "/etc/resolv.conf"]);
    assert_eq!(
        nameservers(&out.stdout_str()),
        vec![GATEWAY.to_string()],
        "resolv.conf after the attempt\n{}",
        out.describe()
    );
}

#[test]
fn dns_copies_routable_host_resolver() {
    let t = topology!("dns_copy");
    let host_conf = format!("nameserver {U_IP}\noptions timeout:2\n");
    t.write_etc_netns(&t.h, "resolv.conf", &host_conf);
    let _dnsd = start_dns_server(&t, &t.u, U_IP, &[("example.test", "192.0.2.77")]);
    t.network_create(NET, SUBNET, &[]);

    let out = t.rnat(&["run", "--network", NET, "--", "cat", "/etc/resolv.conf"]);
    assert!(out.success(), "{}", out.describe());
    let got = out.stdout_str();
    assert_eq!(
        nameservers(&got),
        vec![U_IP.to_string()],
        "container resolv.conf\n{}",
        out.describe()
    );
    for line in host_conf.lines() {
        assert!(
            got.lines().any(|l| l == line),
            "line {line:?} of the host resolv.conf not copied:\n{got}"
        );
    }

    assert_container_resolves(&t, "the upstream resolver");
}
