//! Real traffic through rnat: outbound masquerade, published TCP/UDP ports
//! (from outside, from the host, hairpin), ranges, address-specific ports,
//! and publish/unpublish on a running container.

use super::*;

#[test]
fn outbound_tcp_and_udp_are_masqueraded() {
    let t = topology!("outbound");
    t.network_create(NET, SUBNET, &[]);
    let _tcp = t.server(&t.u, &peer_addr_server("tcp", 7000), "tcp", 7000);
    let _udp = t.server(&t.u, &peer_addr_server("udp", 7001), "udp", 7001);

    let target = format!("TCP:{U_IP}:7000,connect-timeout=3");
    let out = t.rnat(&[
        "run",
        "--network",
        NET,
        "--",
        "socat",
        "-u",
        &target,
        "STDOUT",
    ]);
    assert!(
        out.success(),
        "container could not reach U over TCP\n{}",
        out.describe()
    );
    assert_eq!(
        peer_lines(&out.stdout_str()),
        vec![H_UPLINK_IP.to_string()],
        "U must see the host's address as TCP source\n{}",
        out.describe()
    );

    let script = format!("echo ping | socat -t 2 - UDP:{U_IP}:7001");
    let out = t.rnat(&["run", "--network", NET, "--", "sh", "-c", &script]);
    assert!(
        out.success(),
        "container UDP client failed\n{}",
        out.describe()
    );
    assert_eq!(
        peer_lines(&out.stdout_str()),
        vec![H_UPLINK_IP.to_string()],
        "U must see the host's address as UDP source\n{}",
        out.describe()
    );
    t.assert_all_gone(&[]);
}

#[test]
fn published_tcp_port_answers_from_everywhere() {
    let t = topology!("publish_tcp");
    t.network_create(NET, SUBNET, &[]);
    let (mut web, c) = start_web(&t, "web", &["8080:80"]);

    assert_eq!(c.network, NET);
    assert!(
        in_subnet(c.ipv4(), SUBNET) && c.ip != GATEWAY,
        "container ip {} not a host of {SUBNET}",
        c.ip
    );
    assert_eq!(
        c.ports,
        vec![port("0.0.0.0", 8080, 80, "tcp")],
        "ports in `rnat ps --json`"
    );
    let maps = t.pub_maps();
    assert!(
        maps.any_elems()
            .contains(&MapElem::any("tcp", 8080, &c.ip, 80)),
        "pub_any lacks tcp . 8080 : {} . 80: {maps:#?}",
        c.ip
    );

    let data = payload(48 * 1024, 1);
    assert_tcp_echo(&t, &t.c, H_CLIENT_SIDE_IP, 8080, &data, "external client");
    assert_tcp_echo(&t, &t.h, "127.0.0.1", 8080, &data, "host loopback");
    assert_tcp_echo(
        &t,
        &t.h,
        H_CLIENT_SIDE_IP,
        8080,
        &data,
        "host's own address",
    );

    // Hairpin: a sibling container reaches the published port via H's address.
    assert_hairpin(&t, &data, "default bridge netfilter settings");
    // With br_netfilter loaded, bridged replies go through conntrack and a
    // hairpin works even without rnat's hairpin masquerade; switch that off
    // in H (a host without br_netfilter) so the masquerade is really needed.
    if t.set_sysctl_if_present(&t.h, "net.bridge.bridge-nf-call-iptables", "0") {
        assert_hairpin(&t, &data, "bridge-nf-call-iptables=0 in H");
    }

    assert!(
        web.exited().is_none(),
        "web container died during the test\n{}",
        web.describe_now()
    );
}

/// A sibling container sends DATA to the published 203.0.113.1:8080 and
/// must get exactly DATA back.
fn assert_hairpin(t: &Topology, data: &[u8], what: &str) {
    let input = t.work_file("hairpin.in", data);
    let output = t.work_path("hairpin.out");
    let _ = std::fs::remove_file(&output);
    let script = format!(
        "socat -t 5 -T 10 - TCP:{H_CLIENT_SIDE_IP}:8080,connect-timeout=3 < {} > {}",
        sh_quote(&input.to_string_lossy()),
        sh_quote(&output.to_string_lossy())
    );
    let out = t.rnat(&[
        "run",
        "--name",
        "sibling",
        "--network",
        NET,
        "--",
        "sh",
        "-c",
        &script,
    ]);
    assert!(
        out.success(),
        "hairpin client container failed ({what})\n{}",
        out.describe()
    );
    let got = std::fs::read(&output).expect("hairpin output file written by the sibling container");
    assert_same_bytes(
        &got,
        data,
        &format!("hairpin from a sibling container ({what})"),
    );
}

#[test]
fn published_udp_port_answers() {
    let t = topology!("publish_udp");
    t.network_create(NET, SUBNET, &[]);
    let mut dns = run_bg(&t, "udp", NET, &["5353:53/udp"], &udp_echo_server(53));
    let c = t.wait_container(&mut dns, "udp");
    t.wait_container_listening(&c, "udp", 53);

    assert_eq!(
        c.ports,
        vec![port("0.0.0.0", 5353, 53, "udp")],
        "ports in `rnat ps --json`"
    );
    let maps = t.pub_maps();
    assert!(
        maps.any_elems()
            .contains(&MapElem::any("udp", 5353, &c.ip, 53)),
        "pub_any lacks udp . 5353 : {} . 53: {maps:#?}",
        c.ip
    );
    let data = payload(1200, 2);
    assert_udp_echo(&t, &t.c, H_CLIENT_SIDE_IP, 5353, &data, "external client");
    assert_udp_echo(&t, &t.h, "127.0.0.1", 5353, &data, "host loopback");
    // TCP on the same port number is not published.
    assert_tcp_no_answer(&t, &t.c, H_CLIENT_SIDE_IP, 5353, "udp-only publish");
}

#[test]
fn port_range_maps_each_port() {
    let t = topology!("port_range");
    t.network_create(NET, SUBNET, &[]);
    let script = "for p in 7000 7001 7002; do \
                  socat TCP-LISTEN:$p,fork,reuseaddr 'SYSTEM:echo port=$SOCAT_SOCKPORT' & \
                  done; wait";
    let mut bg = run_bg(
        &t,
        "ranged",
        NET,
        &["9000-9002:7000-7002"],
        &strs(&["sh", "-c", script]),
    );
    let c = t.wait_container(&mut bg, "ranged");
    for p in 7000..=7002 {
        t.wait_container_listening(&c, "tcp", p);
    }

    let want_ports: Vec<PortMapping> = (0..3)
        .map(|i| port("0.0.0.0", 9000 + i, 7000 + i, "tcp"))
        .collect();
    assert_eq!(
        sorted(c.ports.clone()),
        want_ports,
        "ports in `rnat ps --json`"
    );
    let elems = t.pub_maps().any_elems();
    for i in 0..3 {
        let want = MapElem::any("tcp", 9000 + i, &c.ip, 7000 + i);
        assert!(elems.contains(&want), "pub_any lacks {want:?}: {elems:#?}");
    }
    for i in 0..3u16 {
        let out = tcp_exchange(&t, &t.c, H_CLIENT_SIDE_IP, 9000 + i, b"");
        assert!(
            out.success(),
            "host port {} did not answer\n{}",
            9000 + i,
            out.describe()
        );
        assert_eq!(
            out.stdout_str(),
            format!("port={}\n", 7000 + i),
            "host port {} went to the wrong container port",
            9000 + i
        );
    }
}

#[test]
fn host_ip_specific_publish() {
    let t = topology!("host_ip");
    t.network_create(NET, SUBNET, &[]);
    let (_web, c) = start_web(&t, "web", &["203.0.113.1:8081:80", "8082:80"]);

    assert_eq!(
        sorted(c.ports.clone()),
        sorted(vec![
            port(H_CLIENT_SIDE_IP, 8081, 80, "tcp"),
            port("0.0.0.0", 8082, 80, "tcp")
        ]),
        "ports in `rnat ps --json`"
    );
    let maps = t.pub_maps();
    let want = MapElem::addr(H_CLIENT_SIDE_IP, "tcp", 8081, &c.ip, 80);
    assert!(
        maps.addr_elems().contains(&want),
        "pub_addr lacks {want:?}: {maps:#?}"
    );
    assert!(
        !maps
            .any_elems()
            .iter()
            .any(|e| e.key.get(1).map(String::as_str) == Some("8081")),
        "8081 must not be in pub_any: {maps:#?}"
    );

    let data = payload(8 * 1024, 4);
    assert_tcp_echo(&t, &t.c, H_CLIENT_SIDE_IP, 8081, &data, "published address");
    // Control: U reaches a wildcard-published port on 198.51.100.1 ...
    assert_tcp_echo(
        &t,
        &t.u,
        H_UPLINK_IP,
        8082,
        &data,
        "wildcard port via the uplink address",
    );
    // ... but not the port bound to 203.0.113.1 only.
    assert_tcp_no_answer(
        &t,
        &t.u,
        H_UPLINK_IP,
        8081,
        "address-specific port via another address",
    );
    assert_tcp_no_answer(
        &t,
        &t.h,
        H_UPLINK_IP,
        8081,
        "address-specific port via another local address",
    );
}

#[test]
fn publish_and_unpublish_on_running_container() {
    let t = topology!("publish_unpublish");
    t.network_create(NET, SUBNET, &[]);
    let (_web, c) = start_web(&t, "web", &["8080:80"]);
    let data = payload(16 * 1024, 5);
    let elem = MapElem::any("tcp", 8090, &c.ip, 80);

    assert_tcp_no_answer(&t, &t.c, H_CLIENT_SIDE_IP, 8090, "before publish");
    assert!(
        !t.pub_maps().any_elems().contains(&elem),
        "8090 must not be mapped before publish"
    );

    t.rnat_ok(&["publish", "--name", "web", "8090:80"]);
    let maps = t.pub_maps();
    assert!(
        maps.any_elems().contains(&elem),
        "pub_any lacks {elem:?} after publish: {maps:#?}"
    );
    assert_tcp_echo(&t, &t.c, H_CLIENT_SIDE_IP, 8090, &data, "after publish");
    let now = t
        .ps()
        .into_iter()
        .find(|x| x.id == c.id)
        .expect("web still in ps");
    assert!(
        now.ports.contains(&port("0.0.0.0", 8090, 80, "tcp")),
        "ps lacks 8090: {:?}",
        now.ports
    );

    t.rnat_ok(&["unpublish", "--name", "web", "8090:80"]);
    let maps = t.pub_maps();
    assert!(
        !maps.any_elems().contains(&elem),
        "{elem:?} still in pub_any after unpublish: {maps:#?}"
    );
    assert_tcp_no_answer(&t, &t.c, H_CLIENT_SIDE_IP, 8090, "after unpublish");
    assert_tcp_echo(
        &t,
        &t.c,
        H_CLIENT_SIDE_IP,
        8080,
        &data,
        "the original port after unpublish",
    );
    let now = t
        .ps()
        .into_iter()
        .find(|x| x.id == c.id)
        .expect("web still in ps");
    assert_eq!(
        now.ports,
        vec![port("0.0.0.0", 8080, 80, "tcp")],
        "ps ports after unpublish"
    );
}
