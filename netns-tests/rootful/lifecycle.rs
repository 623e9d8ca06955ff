//! Container and network lifecycle: teardown on exit, on signals and after
//! SIGKILL, concurrent allocation, network create/ls/rm.

use super::*;

/// Asserts the running container's ports are in the kernel maps.
fn assert_published(t: &Topology, c: &Container) {
    let maps = t.pub_maps();
    for p in &c.ports {
        let (want, have) = if p.host_ip == "0.0.0.0" {
            (
                MapElem::any(&p.protocol, p.host_port, &c.ip, p.container_port),
                maps.any_elems(),
            )
        } else {
            (
                MapElem::addr(
                    &p.host_ip,
                    &p.protocol,
                    p.host_port,
                    &c.ip,
                    p.container_port,
                ),
                maps.addr_elems(),
            )
        };
        assert!(
            have.contains(&want),
            "[{}] {want:?} of {} missing from the maps: {maps:#?}\nruleset now:\n{}\nps now: {:#?}",
            t.label,
            c.label(),
            t.nft_ruleset_text(),
            t.ps()
        );
    }
}

/// After teardown the single slot of ONE_SLOT and the ports are reusable.
fn assert_slot_and_ports_reusable(t: &Topology, specs: &[&str]) {
    let mut args = vec!["run", "--network", NET];
    for s in specs {
        args.extend(["-p", s]);
    }
    args.extend(["--", "true"]);
    let out = t.rnat(&args);
    assert!(
        out.success(),
        "[{}] the freed IP/ports could not be reused\n{}",
        t.label,
        out.describe()
    );
}

#[test]
fn teardown_when_cmd_exits_by_itself() {
    let t = topology!("teardown_exit");
    t.network_create(NET, ONE_SLOT, &[]);
    let go = t.work_path("go");
    let script = format!(
        "i=0; while [ ! -e {go} ] && [ $i -lt 300 ]; do sleep 0.1; i=$((i+1)); done; exit 3",
        go = sh_quote(&go.to_string_lossy())
    );
    let specs = ["8080:80", "5353:53/udp", "203.0.113.1:8081:80"];
    let mut bg = run_bg(&t, "self-exit", NET, &specs, &strs(&["sh", "-c", &script]));
    let c = t.wait_container(&mut bg, "self-exit");
    t.assert_container_present(&c);
    assert_eq!(c.ports.len(), 3, "three ports published: {:?}", c.ports);
    assert_published(&t, &c);

    std::fs::write(&go, b"").expect("create go file");
    let out = wait_rnat_exit(&mut bg, EXIT_TIMEOUT, "self-exit");
    assert_eq!(
        out.code(),
        Some(3),
        "rnat run must exit with CMD's status\n{}",
        out.describe()
    );
    t.assert_all_gone(&[&c]);
    assert_slot_and_ports_reusable(&t, &specs);
    t.assert_all_gone(&[&c]);
}

#[test]
fn teardown_on_sigterm_and_sigint() {
    let t = topology!("teardown_signal");
    t.network_create(NET, ONE_SLOT, &[]);
    for (sig, code) in [("TERM", 128 + 15), ("INT", 128 + 2)] {
        let name = format!("sig-{}", sig.to_lowercase());
        let mut bg = run_bg(
            &t,
            &name,
            NET,
            &["8080:80", "203.0.113.1:8081:80"],
            &strs(&["sleep", "120"]),
        );
        let c = t.wait_container(&mut bg, &name);
        t.assert_container_present(&c);
        assert_published(&t, &c);
        let cmd_proc = proc_stat(c.pid()).map(|s| Tracked {
            pid: c.pid(),
            start_time: s.start_time,
        });

        bg.signal(sig);
        let out = wait_rnat_exit(&mut bg, EXIT_TIMEOUT, &name);
        assert_eq!(
            out.code(),
            Some(code),
            "after SIG{sig}, rnat run must exit 128+N\n{}",
            out.describe()
        );
        t.assert_all_gone(&[&c]);
        if let Some(p) = cmd_proc {
            assert!(
                !p.still_same_process(),
                "process {} of {name} survived SIG{sig}",
                p.pid
            );
        }
    }
    assert_slot_and_ports_reusable(&t, &["8080:80", "203.0.113.1:8081:80"]);
}

#[test]
fn sigkilled_run_is_cleaned_by_next_command() {
    let t = topology!("kill9");
    t.network_create(NET, ONE_SLOT, &[]);
    let specs = ["8080:80", "203.0.113.1:8081:80"];
    let mut bg = run_bg(&t, "doomed", NET, &specs, &strs(&["sleep", "120"]));
    let c = t.wait_container(&mut bg, "doomed");
    t.assert_container_present(&c);
    assert_published(&t, &c);

    for orphan in bg.kill9() {
        t.track(orphan);
    }
    let ps = t.ps();
    assert!(
        ps.is_empty(),
        "the first `rnat ps --json` after SIGKILL must show nothing: {ps:#?}"
    );
    t.assert_all_gone(&[&c]);
    assert_slot_and_ports_reusable(&t, &specs);
}

#[test]
fn concurrent_runs_get_distinct_ips() {
    const N: usize = 8;
    let t = topology!("concurrency");
    t.network_create(NET, SUBNET, &[]);
    let names: Vec<String> = (0..N).map(|i| format!("c{i}")).collect();
    let mut runs: Vec<BgProc> = names
        .iter()
        .map(|n| run_bg(&t, n, NET, &[], &strs(&["sleep", "120"])))
        .collect();

    let ps = crate::procs::poll(|| {
        for r in runs.iter_mut() {
            if r.exited().is_some() {
                panic!("a concurrent `rnat run` exited early\n{}", r.describe_now());
            }
        }
        let ps = t.ps();
        (ps.len() == N && ps.iter().all(Container::is_started)).then_some(ps)
    })
    .unwrap_or_else(|| {
        panic!(
            "never saw {N} containers in `rnat ps --json`: {:#?}",
            t.ps()
        )
    });

    let got_names: BTreeSet<String> = ps.iter().filter_map(|c| c.name.clone()).collect();
    assert_eq!(got_names, names.iter().cloned().collect(), "names in ps");
    let ips: BTreeSet<String> = ps.iter().map(|c| c.ip.clone()).collect();
    assert_eq!(
        ips.len(),
        N,
        "IPs must be distinct: {:?}",
        ps.iter().map(|c| &c.ip).collect::<Vec<_>>()
    );
    for c in &ps {
        let ip = c.ipv4();
        assert!(in_subnet(ip, SUBNET), "{} outside {SUBNET}", c.ip);
        assert!(
            ![GATEWAY, "192.0.2.0", "192.0.2.255"].contains(&c.ip.as_str()),
            "{} is not assignable",
            c.ip
        );
    }
    assert_eq!(t.rv_links().len(), N, "one rv* link per container");

    for r in runs.iter_mut() {
        r.signal("TERM");
    }
    for r in runs.iter_mut() {
        let out = wait_rnat_exit(r, EXIT_TIMEOUT, "concurrent container");
        assert_eq!(out.code(), Some(143), "{}", out.describe());
    }
    let gone: Vec<&Container> = ps.iter().collect();
    t.assert_all_gone(&gone);
}

fn json_has_name(v: &serde_json::Value, name: &str) -> bool {
    match v {
        serde_json::Value::Object(o) => {
            o.get("name").and_then(|n| n.as_str()) == Some(name)
                || o.values().any(|x| json_has_name(x, name))
        }
        serde_json::Value::Array(a) => a.iter().any(|x| json_has_name(x, name)),
        _ => false,
    }
}

fn network_listed(t: &Topology, name: &str) -> bool {
    let out = t.rnat_ok(&["network", "ls", "--json"]);
    let v: serde_json::Value = serde_json::from_str(&out)
        .unwrap_or_else(|e| panic!("`rnat network ls --json` is not JSON ({e}): {out}"));
    json_has_name(&v, name)
}

#[test]
fn network_lifecycle_with_custom_gateway_and_bridge() {
    let t = topology!("network_lifecycle");
    let (net, subnet, gw, br) = ("n", "192.0.2.64/26", "192.0.2.126", "br-custom");
    t.network_create(net, subnet, &["--gateway", gw, "--bridge", br]);
    assert!(
        network_listed(&t, net),
        "`network ls --json` must list {net}"
    );

    // Inside the container: eth0 in the subnet, default route via the gateway.
    let out = t.rnat(&[
        "run",
        "--network",
        net,
        "--",
        "sh",
        "-c",
        "ip -4 -o addr show dev eth0; ip -4 route show default",
    ]);
    assert!(out.success(), "{}", out.describe());
    let text = out.stdout_str();
    let addr = text
        .split_whitespace()
        .skip_while(|w| *w != "inet")
        .nth(1)
        .unwrap_or_else(|| panic!("no inet address on eth0 in:\n{text}"));
    let (ip, len) = addr
        .split_once('/')
        .unwrap_or_else(|| panic!("address without prefix: {addr}"));
    assert_eq!(len, "26", "eth0 prefix length: {text}");
    let ip: std::net::Ipv4Addr = ip
        .parse()
        .unwrap_or_else(|e| panic!("bad eth0 address {ip}: {e}"));
    assert!(
        in_subnet(ip, subnet) && ip.to_string() != gw,
        "eth0 address {ip} not a host of {subnet}"
    );
    assert!(
        text.contains(&format!("default via {gw} dev eth0")),
        "default route via {gw} expected:\n{text}"
    );

    // While a container runs: bridge with the gateway address, rm refused.
    let mut keep = run_bg(&t, "keep", net, &[], &strs(&["sleep", "120"]));
    let c = t.wait_container(&mut keep, "keep");
    assert_eq!(
        t.addrs(&t.h, br),
        vec![format!("{gw}/26")],
        "bridge {br} address"
    );
    let enslaved = t.ip(&t.h, &["-j", "link", "show", "master", br]);
    assert!(
        enslaved.contains("\"ifname\":\"rv"),
        "no rv* link enslaved to {br}: {enslaved}"
    );
    let out = t.rnat(&["network", "rm", net]);
    assert_rnat_error(&out, RNAT_ERROR, "network rm while in use");
    assert!(
        t.links(&t.h).iter().any(|l| l == br),
        "bridge removed although rm failed"
    );
    assert!(
        t.ps().iter().any(|x| x.id == c.id),
        "container vanished after a failed network rm"
    );

    keep.signal("TERM");
    wait_rnat_exit(&mut keep, EXIT_TIMEOUT, "keep");
    t.rnat_ok(&["network", "rm", net]);
    assert!(
        !t.links(&t.h).iter().any(|l| l == br),
        "bridge {br} survived network rm"
    );
    assert!(
        !network_listed(&t, net),
        "`network ls --json` still lists {net}"
    );
    let rules = t.nft_ruleset_text();
    assert!(
        !rules.contains(subnet) && !rules.contains(br),
        "masquerade rules for {subnet}/{br} survived network rm:\n{rules}"
    );
}

/// Ports published on a running container go away with it: teardown removes what the container
/// has at the end (after `rnat publish`), not only what `rnat run` started with.
#[test]
fn teardown_removes_ports_published_later() {
    let t = topology!("teardown_published_later");
    t.network_create(NET, ONE_SLOT, &[]);
    let mut bg = run_bg(&t, "grown", NET, &["8080:80"], &strs(&["sleep", "120"]));
    let c = t.wait_container(&mut bg, "grown");
    t.rnat_ok(&["publish", "--name", "grown", "9090:80", "127.0.0.1:9091:80"]);
    let maps = t.pub_maps();
    assert_eq!(
        maps.any_elems().len(),
        2,
        "8080 and 9090 in pub_any: {maps:#?}"
    );
    assert_eq!(
        maps.addr_elems().len(),
        1,
        "127.0.0.1:9091 in pub_addr: {maps:#?}"
    );
    bg.signal("TERM");
    let out = wait_rnat_exit(&mut bg, EXIT_TIMEOUT, "grown");
    assert_eq!(out.code(), Some(128 + 15), "{}", out.describe());
    t.assert_all_gone(&[&c]);
}

/// rnat's links carry no IPv6 address (so no IPv6 chatter is flooded to every bridge port), on the
/// host side and in the container, and the container's end drops IPv6.
#[test]
fn links_get_no_ipv6_addresses() {
    let t = topology!("no_ipv6");
    t.network_create(NET, SUBNET, &[]);
    let (_web, c) = start_web(&t, "web6", &["8080:80"]);
    let host = t.ip(&t.h, &["-6", "-o", "addr", "show"]);
    assert!(
        t.rv_links().len() == 1 && !host.lines().any(|l| l.contains(": rv")),
        "[{}] host veth has IPv6 addresses: {host}",
        t.label
    );
    let netns = c.netns.clone().expect("container netns in ps");
    let inside =
        t.exec_in_container_netns(&netns, &["ip", "-6", "-o", "addr", "show", "dev", "eth0"]);
    assert!(inside.success(), "{}", inside.describe());
    assert_eq!(
        inside.stdout_str().trim(),
        "",
        "[{}] the container's eth0 has IPv6 addresses",
        t.label
    );
    // And it takes no IPv6 from the bridge at all (no router advertisement from a neighbour).
    let off = t.exec_in_container_netns(
        &netns,
        &["cat", "/proc/sys/net/ipv6/conf/eth0/disable_ipv6"],
    );
    assert_eq!(off.stdout_str().trim(), "1", "{}", off.describe());
}
