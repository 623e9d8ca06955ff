//! Tests of the harness and fixtures themselves, on the real kernel, with
//! no rnat involved. If these fail, the rnat tests cannot be trusted.

use std::path::PathBuf;

use crate::dns::{nslookup_addresses, start_dns_server};
use crate::fixtures::*;
use crate::harness::{netns_exists, C_IP, H_CLIENT_SIDE_IP, H_UPLINK_IP, U_IP};
use crate::procs::{poll, proc_stat, Tracked};
use crate::topology;

#[test]
fn topology_smoke() {
    let names: [String; 3];
    let dirs: [PathBuf; 2];
    let sleeper: Tracked;
    // Outlives the topology on purpose: the guard must kill it, then this
    // handle reaps it.
    let mut survivors = Vec::new();
    {
        let t = topology!("topology_smoke");
        names = [t.h.clone(), t.u.clone(), t.c.clone()];
        dirs = [t.state_dir.clone(), t.work_dir.clone()];
        for ns in &names {
            assert!(
                netns_exists(ns),
                "namespace {ns} should exist while the topology lives"
            );
        }

        // Wiring as documented.
        let h_links = t.links(&t.h);
        for l in ["lo", "up0", "cl0"] {
            assert!(
                h_links.iter().any(|x| x == l),
                "H lacks link {l}: {h_links:?}"
            );
        }
        assert!(t.rv_links().is_empty(), "H must start without rv* links");
        assert_eq!(t.addrs(&t.h, "up0"), vec![format!("{H_UPLINK_IP}/24")]);
        assert_eq!(t.addrs(&t.h, "cl0"), vec![format!("{H_CLIENT_SIDE_IP}/24")]);
        assert_eq!(t.addrs(&t.u, "h0"), vec![format!("{U_IP}/24")]);
        assert_eq!(t.addrs(&t.c, "h0"), vec![format!("{C_IP}/24")]);
        let routes = t.ip(&t.h, &["-4", "route", "show", "default"]);
        assert!(
            routes.contains(&format!("default via {U_IP} dev up0")),
            "H default route: {routes}"
        );
        eprintln!(
            "[topology_smoke] H net.ipv4.ip_forward = {}",
            t.exec_ok(&t.h, &["cat", "/proc/sys/net/ipv4/ip_forward"])
                .trim()
        );

        // `ip netns exec` execs in place: the PID we track is the program's.
        let sleep = t.spawn(&t.u, &["sleep", "300"]);
        let comm_path = format!("/proc/{}/comm", sleep.pid());
        let execd = poll(|| {
            let comm = std::fs::read_to_string(&comm_path).expect("read comm");
            (comm.trim() == "sleep").then_some(())
        });
        assert!(
            execd.is_some(),
            "`ip netns exec` must exec the program in place, not fork it"
        );
        sleeper = Tracked {
            pid: sleep.pid(),
            start_time: sleep.start_time(),
        };
        survivors.push(sleep);

        // C -> H, bytes compared.
        let data = payload(32 * 1024, 7);
        let _h_echo = t.server(&t.h, &tcp_echo_server(7100), "tcp", 7100);
        t.wait_tcp_accepts(&t.c, H_CLIENT_SIDE_IP, 7100);
        assert_tcp_echo(&t, &t.c, H_CLIENT_SIDE_IP, 7100, &data, "C to H");

        // H -> U, bytes compared.
        let _u_echo = t.server(&t.u, &tcp_echo_server(7101), "tcp", 7101);
        assert_tcp_echo(&t, &t.h, U_IP, 7101, &data, "H to U");

        // U and C are isolated from each other without rnat: so the rnat
        // tests' connectivity can only come from rnat's NAT.
        assert_tcp_no_answer(&t, &t.c, U_IP, 7101, "C has no route to U");
        assert_tcp_no_answer(&t, &t.u, C_IP, 7101, "U has no route to C");
        assert_tcp_no_answer(
            &t,
            &t.u,
            "192.0.2.2",
            80,
            "U has no route to container space",
        );

        // The harness refuses namespaces it did not create.
        for foreign in ["rntforeign0", "rnbsomebodyelse", "", "default"] {
            assert!(
                t.check_rnat_target(foreign).is_err(),
                "rnat must not be runnable in {foreign:?}"
            );
            assert!(
                t.check_ours(foreign).is_err(),
                "commands must not be runnable in {foreign:?}"
            );
        }
        for ours in [&t.h, &t.u, &t.c] {
            assert!(
                t.check_rnat_target(ours).is_ok() && t.check_ours(ours).is_ok(),
                "{ours} is ours"
            );
        }
    }
    // The guard dropped: namespaces, processes and directories are gone.
    for ns in &names {
        assert!(!netns_exists(ns), "namespace {ns} survived the guard");
    }
    for d in &dirs {
        assert!(!d.exists(), "directory {} survived the guard", d.display());
    }
    assert!(
        !sleeper.still_same_process(),
        "process {} survived the guard (state {:?})",
        sleeper.pid,
        proc_stat(sleeper.pid).map(|s| s.state)
    );
    drop(survivors);

    // The guard also runs when a test panics half-way.
    let mut name = None;
    let unwound = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        let t = topology!("topology_smoke_panic");
        name = Some(t.h.clone());
        // Unwinds like a failing assertion, without the panic hook's noise.
        std::panic::resume_unwind(Box::new("deliberate unwind through the teardown guard"));
    }));
    assert!(unwound.is_err(), "the deliberate panic did not happen");
    let name = name.expect("the panicking topology was created");
    assert!(
        !netns_exists(&name),
        "namespace {name} survived a panicking test"
    );
}

#[test]
fn fixtures_smoke() {
    let etc_dir;
    {
        let t = topology!("fixtures_smoke");
        etc_dir = PathBuf::from("/etc/netns").join(&t.h);

        // Peer-address server sees the client's address (TCP and UDP).
        let _pt = t.server(&t.u, &peer_addr_server("tcp", 7000), "tcp", 7000);
        let _pu = t.server(&t.u, &peer_addr_server("udp", 7001), "udp", 7001);
        let out = tcp_exchange(&t, &t.h, U_IP, 7000, b"");
        assert!(out.success(), "{}", out.describe());
        assert_eq!(
            peer_lines(&out.stdout_str()),
            vec![H_UPLINK_IP.to_string()],
            "{}",
            out.describe()
        );
        let out = udp_exchange(&t, &t.h, U_IP, 7001, b"ping\n");
        assert_eq!(
            peer_lines(&out.stdout_str()),
            vec![H_UPLINK_IP.to_string()],
            "{}",
            out.describe()
        );

        // UDP echo, byte-exact, twice (the fork server must keep serving).
        let _ue = t.server(&t.h, &udp_echo_server(5353), "udp", 5353);
        let dgram = payload(1200, 3);
        assert_udp_echo(&t, &t.c, H_CLIENT_SIDE_IP, 5353, &dgram, "first datagram");
        assert_udp_echo(&t, &t.c, H_CLIENT_SIDE_IP, 5353, &dgram, "second datagram");

        // Local-port server reports the port it listens on.
        let _sp = t.server(&t.h, &sock_port_server(7002), "tcp", 7002);
        let out = tcp_exchange(&t, &t.c, H_CLIENT_SIDE_IP, 7002, b"");
        assert_eq!(out.stdout_str(), "port=7002\n", "{}", out.describe());

        // A container-style client script writing to a scratch file.
        let input = t.work_file("in", &payload(5000, 9));
        let output = t.work_path("out");
        let _e = t.server(&t.h, &tcp_echo_server(7003), "tcp", 7003);
        let script = format!(
            "socat -t 5 -T 10 - TCP:{H_CLIENT_SIDE_IP}:7003,connect-timeout=3 < {} > {}",
            sh_quote(&input.to_string_lossy()),
            sh_quote(&output.to_string_lossy())
        );
        t.exec_ok(&t.c, &["sh", "-c", &script]);
        let got = std::fs::read(&output).expect("client output file");
        assert_same_bytes(&got, &payload(5000, 9), "script client");

        // DNS: /etc/netns/H/resolv.conf is what H's programs see, and the
        // DNS helper answers busybox nslookup on a loopback address.
        t.write_etc_netns(&t.h, "resolv.conf", "nameserver 127.0.0.53\n");
        assert_eq!(
            t.exec_ok(&t.h, &["cat", "/etc/resolv.conf"]),
            "nameserver 127.0.0.53\n"
        );
        let _dns = start_dns_server(&t, &t.h, "127.0.0.53", &[("example.test", "192.0.2.77")]);
        let out = t.exec(&t.h, &["busybox", "nslookup", "example.test"]);
        assert_eq!(
            nslookup_addresses(&out.stdout_str()),
            vec!["192.0.2.77".to_string()],
            "{}",
            out.describe()
        );
        eprintln!(
            "[fixtures_smoke] busybox nslookup exit status with our DNS helper: {:?}",
            out.code()
        );
        let out = t.exec(&t.h, &["busybox", "nslookup", "missing.test"]);
        assert!(
            nslookup_addresses(&out.stdout_str()).is_empty(),
            "{}",
            out.describe()
        );

        // The same helper on a routable address, queried across a link.
        let _dns_u = start_dns_server(&t, &t.u, U_IP, &[("example.test", "192.0.2.78")]);
        let out = t.exec(&t.h, &["busybox", "nslookup", "example.test", U_IP]);
        assert_eq!(
            nslookup_addresses(&out.stdout_str()),
            vec!["192.0.2.78".to_string()],
            "{}",
            out.describe()
        );
        assert!(etc_dir.exists());
    }
    assert!(
        !etc_dir.exists(),
        "{} survived the guard",
        etc_dir.display()
    );
}
