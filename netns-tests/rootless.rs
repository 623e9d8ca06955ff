//! rnat's rootless mode, run by an unprivileged user inside the test's host namespace H: real
//! traffic from the container to servers in U, checked byte for byte.
//!
//! The set-up creates the system user `rnat-test` (if missing) and makes /dev/net/tun usable by
//! everyone (mode 0666, as most distributions ship it). rnat is copied into the topology's
//! scratch directory so that user can run it wherever the build directory is.

use std::os::unix::fs::PermissionsExt;
use std::process::Command;
use std::sync::Once;
use std::time::Duration;

use crate::dns::{nslookup_addresses, start_dns_server};
use crate::fixtures::*;
use crate::harness::{Topology, H_UPLINK_IP, U_IP};
use crate::procs::{self, Finished};
use crate::rnat::RNAT;
use crate::topology;

const USER: &str = "rnat-test";
const RUN_TIMEOUT: Duration = Duration::from_secs(90);

/// Creates the unprivileged test user and opens /dev/net/tun to everyone, once per run.
fn prepare_host() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        ensure_user(USER, false);
        open_tun_to_all();
    });
}

/// The topology plus a copy of rnat the test user can execute, and ping sockets allowed in H.
struct Rig {
    t: Topology,
    rnat: String,
}

fn rig(t: Topology) -> Rig {
    prepare_host();
    let dst = t.work_path("rnat");
    std::fs::copy(RNAT, &dst).expect("copy rnat");
    std::fs::set_permissions(&dst, std::fs::Permissions::from_mode(0o755)).expect("chmod rnat");
    t.exec_ok(
        &t.h,
        &[
            "sysctl",
            "-q",
            "-w",
            "net.ipv4.ping_group_range=0 2147483647",
        ],
    );
    Rig {
        rnat: dst.to_str().expect("UTF-8 path").to_string(),
        t,
    }
}

impl Rig {
    /// ARGV as the test user in H, from `/`, without root's runtime directory.
    fn as_user(&self, argv: &[&str]) -> Command {
        let mut full = vec![
            "setpriv",
            "--reuid",
            USER,
            "--regid",
            USER,
            "--clear-groups",
            "--",
        ];
        full.extend_from_slice(argv);
        let mut cmd = self.t.ns_command(&self.t.h, &full);
        cmd.current_dir("/").env_remove("XDG_RUNTIME_DIR");
        cmd
    }

    /// `rnat run [FLAGS] -- sh -c SCRIPT` as the test user, with extra environment; waits.
    fn run_env(&self, env: &[(&str, &str)], flags: &[&str], script: &str) -> Finished {
        let mut argv = vec![self.rnat.as_str(), "run"];
        argv.extend_from_slice(flags);
        argv.extend(["--", "sh", "-c", script]);
        let mut cmd = self.as_user(&argv);
        cmd.envs(env.iter().copied());
        procs::run_bounded(cmd, None, RUN_TIMEOUT)
    }

    fn run(&self, flags: &[&str], script: &str) -> Finished {
        self.run_env(&[], flags, script)
    }

    fn run_ok(&self, flags: &[&str], script: &str) -> String {
        self.run_env_ok(&[], flags, script)
    }

    fn run_env_ok(&self, env: &[(&str, &str)], flags: &[&str], script: &str) -> String {
        let out = self.run_env(env, flags, script);
        assert!(
            out.success(),
            "[{}] rootless run failed\n{}",
            self.t.label,
            out.describe()
        );
        out.stdout_str()
    }
}

fn sha256_of(path: &std::path::Path) -> String {
    let out = Command::new("sha256sum")
        .arg(path)
        .output()
        .expect("sha256sum");
    String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .next()
        .expect("a hash")
        .to_string()
}

#[test]
fn runs_unprivileged_with_slirp_addresses_and_exit_status() {
    let t = topology!("rl_basics");
    let r = rig(t);
    let out = r.run(
        &[],
        "id -u; ip -4 -o addr show tap0; ip route show default; cat /etc/resolv.conf; ip -o link show tap0; \
         ip -4 neigh show dev tap0; exit 7",
    );
    assert_eq!(
        out.code(),
        Some(7),
        "rnat exits with the command's status\n{}",
        out.describe()
    );
    let text = out.stdout_str();
    assert!(text.starts_with("0\n"), "the user is root inside\n{text}");
    assert!(
        text.contains("inet 10.0.2.100/24"),
        "tap0 has 10.0.2.100/24\n{text}"
    );
    assert!(text.contains("default via 10.0.2.2 dev tap0"), "{text}");
    assert!(text.contains("nameserver 10.0.2.3"), "{text}");
    assert!(
        text.contains("mtu 65520") && text.contains("qlen 4096"),
        "MTU and queue length\n{text}"
    );
    // The gateway and DNS are known neighbours from the start (no ARP before the first packet).
    for ip in ["10.0.2.2", "10.0.2.3"] {
        assert!(
            text.lines()
                .any(|l| l.starts_with(&format!("{ip} lladdr 52:55:0a:00:02:02 PERMANENT"))),
            "{ip} is a permanent neighbour\n{text}"
        );
    }
    // --cidr moves every address.
    let text = r.run_ok(
        &["--cidr", "192.0.2.0/24"],
        "ip -4 -o addr show tap0; ip route show default; ip -4 neigh show dev tap0",
    );
    assert!(
        text.contains("inet 192.0.2.100/24")
            && text.contains("default via 192.0.2.2")
            && text.contains("192.0.2.3 lladdr 52:55:0a:00:02:02 PERMANENT"),
        "{text}"
    );
}

#[test]
fn the_ring_link_needs_no_tap_and_shows_one_link() {
    // The packet ring link: a veth whose peer lives in rnat's private namespace. The container
    // sees lo and tap0 only, with the usual addresses, and reaches the upstream namespace.
    let t = topology!("rl_ring");
    let r = rig(t);
    let text = r.run_env_ok(
        &[("RNAT_LINK", "ring")],
        &[],
        &format!(
            "ip -o link show | wc -l; ip -4 -o addr show tap0; ip -d -o link show tap0; \
             busybox ping -c 1 -W 3 {U_IP} >/dev/null && echo ping-ok"
        ),
    );
    let mut lines = text.lines();
    assert_eq!(lines.next(), Some("2"), "lo and tap0 only\n{text}");
    assert!(text.contains("inet 10.0.2.100/24"), "{text}");
    assert!(text.contains(" veth "), "tap0 is the veth's end\n{text}");
    assert!(text.contains("ping-ok"), "{text}");
}

#[test]
fn without_tun_access_rnat_falls_back_to_the_ring_link() {
    // /dev/net/tun hidden from the test user (a root-owned 0644 file bound over it, in a private
    // mount namespace): rnat run still serves the container, over a veth; forcing the TAP fails
    // with one line that names the device.
    let t = topology!("rl_notun");
    let r = rig(t);
    let _echo = r.t.server(&r.t.u, &tcp_echo_server(7000), "tcp", 7000);
    let blocker = r.t.work_file("no-tun", b"");
    let blocker = blocker.to_str().expect("UTF-8 path");
    let as_user = format!("setpriv --reuid {USER} --regid {USER} --clear-groups --");
    let run = |link: &str| {
        let script = format!(
            "mount --bind {blocker} /dev/net/tun && exec env {link} {as_user} {} run -- sh -c \
             'ip -d -o link show tap0; echo via-ring | socat -t 5 -T 10 - TCP:{U_IP}:7000'",
            r.rnat
        );
        let mut cmd = r.t.ns_command(
            &r.t.h,
            &[
                "unshare",
                "--mount",
                "--propagation",
                "private",
                "sh",
                "-c",
                &script,
            ],
        );
        cmd.current_dir("/")
            .env_remove("XDG_RUNTIME_DIR")
            .env_remove("RNAT_LINK");
        procs::run_bounded(cmd, None, RUN_TIMEOUT)
    };
    let out = run("RNAT_LOG=warn");
    assert!(out.success(), "{}", out.describe());
    let text = out.stdout_str();
    assert!(text.contains(" veth "), "tap0 is a veth\n{text}");
    assert!(text.contains("via-ring"), "the echo came back\n{text}");
    let forced = run("RNAT_LINK=tap");
    assert!(!forced.success(), "{}", forced.describe());
    let err = forced.stderr_str();
    assert!(
        err.lines().count() == 1 && err.contains("/dev/net/tun"),
        "one line naming the device: {err}"
    );
}

/// A payload of SIZE bytes in a file, and two servers in U on LISTEN (socat's `TCP-LISTEN` or
/// `TCP6-LISTEN`): port 7100 answers with the hash of what it receives, 7101 sends the file.
/// Returns the payload's hash, the file's path and the servers.
fn hash_servers(
    r: &Rig,
    listen: &str,
    size: usize,
    seed: u64,
) -> (String, String, [crate::procs::BgProc; 2]) {
    let file =
        r.t.work_file(&format!("payload-{listen}"), &payload(size, seed));
    let want = sha256_of(&file);
    let file = file.to_str().expect("UTF-8 path").to_string();
    let up = r.t.server(
        &r.t.u,
        &strings(&[
            "socat",
            &format!("{listen}:7100,reuseaddr,fork"),
            "SYSTEM:sha256sum",
        ]),
        "tcp",
        7100,
    );
    let down = r.t.server(
        &r.t.u,
        &strings(&[
            "socat",
            &format!("{listen}:7101,reuseaddr,fork"),
            &format!("OPEN:{file}"),
        ]),
        "tcp",
        7101,
    );
    (want, file, [up, down])
}

#[test]
fn bulk_tcp_both_ways_arrives_intact() {
    let t = topology!("rl_bulk");
    let r = rig(t);
    let (want, file, _servers) = hash_servers(&r, "TCP-LISTEN", 24 << 20, 11);
    let helper = r.helper();
    let _urgent = r.t.server(
        &r.t.u,
        &strings(&["python3", &helper, "urgent", "7102"]),
        "tcp",
        7102,
    );
    let _urgent_bulk = r.t.server(
        &r.t.u,
        &strings(&["python3", &helper, "urgentbulk", "7103"]),
        "tcp",
        7103,
    );
    // The last round peeks without SO_PEEK_OFF, as on kernels before 6.9.
    // The packet ring link carries the same bytes (its reordering guard and the kernel's
    // segmentation of its large frames are what the ring rounds check).
    for (mtu, env) in [
        ("65520", None),
        ("1500", None),
        ("65520", Some(("RNAT_NO_PEEK_OFF", "1"))),
        ("65520", Some(("RNAT_LINK", "ring"))),
        ("1500", Some(("RNAT_LINK", "ring"))),
    ] {
        // Then TCP urgent data, which a read does not pass when it has read anything before
        // the mark: a line whose last byte is urgent (the read that finds the line stops short
        // of that byte) must arrive whole; so must a stream with the mark in its middle whose
        // end follows at once (a read stopped at the mark is not the end of the stream).
        let script = format!(
            "socat -t 30 -T 60 - TCP:{U_IP}:7100 <{file} | cut -d' ' -f1; socat -u -T 60 TCP:{U_IP}:7101 - | sha256sum | cut -d' ' -f1; python3 {helper} line {U_IP} 7102; python3 {helper} count {U_IP} 7103"
        );
        let text = r.run_env_ok(env.as_slice(), &["--mtu", mtu], &script);
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(
            lines,
            vec![
                want.as_str(),
                want.as_str(),
                "b'before-the-mark\\n'",
                "11000 1"
            ],
            "MTU {mtu} {env:?}: upload then download hash, then the urgent data"
        );
    }
}

#[test]
fn many_short_connections_udp_and_ping() {
    let t = topology!("rl_short");
    let r = rig(t);
    let _echo = r.t.server(&r.t.u, &tcp_echo_server(7000), "tcp", 7000);
    let _udp = r.t.server(&r.t.u, &udp_echo_server(7001), "udp", 7001);
    let script = format!(
        "ok=0; i=0; while [ $i -lt 150 ]; do \
           r=$(echo conn-$i | socat -t 5 -T 10 - TCP:{U_IP}:7000,connect-timeout=5); \
           [ \"$r\" = conn-$i ] && ok=$((ok+1)); i=$((i+1)); done; echo tcp-ok=$ok; \
         echo datagram | socat -t 2 - UDP:{U_IP}:7001; \
         busybox ping -c 2 -W 3 {U_IP} >/dev/null && echo ping-upstream-ok; \
         busybox ping -c 1 -W 3 10.0.2.2 >/dev/null && echo ping-gateway-ok"
    );
    let text = r.run_ok(&[], &script);
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(
        lines,
        vec![
            "tcp-ok=150",
            "datagram",
            "ping-upstream-ok",
            "ping-gateway-ok"
        ],
        "{text}"
    );
}

#[test]
fn names_resolve_through_the_hosts_resolver() {
    let t = topology!("rl_dns");
    let r = rig(t);
    let _dns = start_dns_server(&r.t, &r.t.u, U_IP, &[("svc.rnat.test", "203.0.113.77")]);
    // rnat reads H's resolv.conf, which `ip netns exec` takes from /etc/netns/H/.
    r.t.write_etc_netns(&r.t.h, "resolv.conf", &format!("nameserver {U_IP}\n"));
    let text = r.run_ok(&[], "busybox nslookup svc.rnat.test");
    assert_eq!(nslookup_addresses(&text), vec!["203.0.113.77"], "{text}");
}

/// IPv6 on the H–U link, a documentation /64: H 2001:db8:1::1 (and EXTRA addresses), U ::2;
/// H routes IPv6 through U.
fn ipv6_uplink(r: &Rig, extra: &[&str]) {
    let h = ["2001:db8:1::1/64"]
        .iter()
        .chain(extra)
        .map(|a| (&r.t.h, *a, "up0"));
    for (ns, addr, dev) in h.chain([(&r.t.u, "2001:db8:1::2/64", "h0")]) {
        r.t.ip(ns, &["-6", "addr", "add", addr, "dev", dev, "nodad"]);
    }
    r.t.ip(
        &r.t.h,
        &["-6", "route", "add", "default", "via", "2001:db8:1::2"],
    );
}

/// `--enable-ipv6`: the container gets fd00::100/64 and reaches an IPv6 server in U (bytes both
/// ways, hashed), UDP and ping over IPv6, the gateway's fd00::2, DNS at fd00::3 (forwarded to H's
/// IPv4 resolver), and the gateway refuses TCP without `--allow-host-loopback`. Without the flag
/// the container has no IPv6 route out.
#[test]
fn ipv6_reaches_an_ipv6_server_and_resolves_at_fd00_3() {
    let t = topology!("rl_ipv6");
    let r = rig(t);
    ipv6_uplink(&r, &[]);
    let (want, file, _servers) = hash_servers(&r, "TCP6-LISTEN", 8 << 20, 13);
    let _udp = r.t.server(
        &r.t.u,
        &strings(&["socat", "UDP6-RECVFROM:7001,fork", "EXEC:cat"]),
        "udp",
        7001,
    );
    let _dns = start_dns_server(&r.t, &r.t.u, U_IP, &[("svc6.rnat.test", "203.0.113.66")]);
    // On H's ::1, which fd00::2 reaches only with --allow-host-loopback.
    let _lo = r.t.server(
        &r.t.h,
        &strings(&[
            "socat",
            "TCP6-LISTEN:7999,bind=[::1],reuseaddr,fork",
            "SYSTEM:echo hello-from-h-loopback",
        ]),
        "tcp",
        7999,
    );
    r.t.write_etc_netns(&r.t.h, "resolv.conf", &format!("nameserver {U_IP}\n"));
    let server = "[2001:db8:1::2]";
    let script = format!(
        "ip -6 addr show dev tap0 | grep -q 'inet6 fd00::100/64' && echo addr-ok; \
         socat -t 30 -T 60 - TCP6:{server}:7100 <{file} | cut -d' ' -f1; \
         socat -u -T 60 TCP6:{server}:7101 - | sha256sum | cut -d' ' -f1; \
         echo datagram6 | socat -t 2 - UDP6:{server}:7001; \
         echo x | socat -t 30 - UDP6:{server}:9 2>&1 | grep -q 'Connection refused' && echo udp6-refused; \
         busybox ping -6 -c 2 -W 3 2001:db8:1::2 >/dev/null && echo ping6-upstream-ok; \
         busybox ping -6 -c 1 -W 3 fd00::2 >/dev/null && echo ping6-gateway-ok; \
         busybox nslookup svc6.rnat.test fd00::3 | grep -q 203.0.113.66 && echo dns6-ok; \
         socat -T 5 - TCP6:[fd00::2]:7999,connect-timeout=5 </dev/null 2>/dev/null || echo gateway-refused"
    );
    // Over the TAP, and over the packet ring link.
    for env in [None, Some(("RNAT_LINK", "ring"))] {
        let text = r.run_env_ok(env.as_slice(), &["--enable-ipv6"], &script);
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(
            lines,
            vec![
                "addr-ok",
                want.as_str(),
                want.as_str(),
                "datagram6",
                "udp6-refused",
                "ping6-upstream-ok",
                "ping6-gateway-ok",
                "dns6-ok",
                "gateway-refused"
            ],
            "{env:?}: {text}"
        );
    }
    // With --allow-host-loopback the same connection reaches H's ::1.
    let text = r.run_ok(
        &["--enable-ipv6", "--allow-host-loopback"],
        "socat -T 5 - TCP6:[fd00::2]:7999,connect-timeout=5 </dev/null",
    );
    assert_eq!(text.trim(), "hello-from-h-loopback", "{text}");
    // Without the flag: no IPv6 address from rnat and no route out.
    let text = r.run_ok(
        &[],
        "ip -6 addr show dev tap0 | grep -c 'scope global' || true; ip -6 route show default | wc -l",
    );
    assert_eq!(text.lines().collect::<Vec<_>>(), vec!["0", "0"], "{text}");
}

#[test]
fn refused_and_unreachable_fail_fast_and_loopback_needs_permission() {
    let t = topology!("rl_errors");
    let r = rig(t);
    // A listener on H's loopback, which the gateway address reaches only when allowed.
    let _lo = r.t.server(
        &r.t.h,
        &strings(&[
            "socat",
            "TCP-LISTEN:7200,bind=127.0.0.1,reuseaddr,fork",
            "SYSTEM:echo host-loopback",
        ]),
        "tcp",
        7200,
    );
    let _udp = r.t.server(&r.t.u, &udp_echo_server(7201), "udp", 7201);
    // connect-timeout is long: a refusal or unreachability must come from rnat, not a timer.
    // The same for UDP: a connected socket hears of the ICMP error the host's network sent
    // back, which rnat passes on; without it socat would wait out its 40 s and say nothing.
    // Linux reports host unreachable (a soft error) only to a socket with IP_RECVERR, as on
    // any network. A datagram from the same port afterwards still gets its answer.
    let script = format!(
        "socat -u TCP:{U_IP}:9,connect-timeout=40 - 2>&1; \
         socat -u TCP:198.51.100.77:80,connect-timeout=40 - 2>&1; \
         socat -u TCP:10.0.2.2:7200,connect-timeout=40 - 2>&1; \
         echo x | socat -t 40 - UDP:{U_IP}:9,sourceport=5300 2>&1; \
         echo x | socat -t 40 - UDP:198.51.100.77:80,ip-recverr 2>&1; \
         echo after-error | socat -t 5 - UDP:{U_IP}:7201,sourceport=5300; true"
    );
    let text = r.run_ok(&[], &script);
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines.len(), 6, "{text}");
    let (refused, no_route) = ("Connection refused", "No route to host");
    for (line, want, what) in [
        (lines[0], refused, "closed port"),
        (lines[1], no_route, "address nobody answers for"),
        (lines[2], refused, "host loopback without permission"),
        (lines[3], refused, "UDP to a closed port"),
        (lines[4], no_route, "UDP to an address nobody answers for"),
    ] {
        assert!(line.contains(want), "{what}: {text}");
    }
    assert_eq!(lines[5], "after-error", "{text}");
    // An echo request to that address: the host's error reaches the container's ping socket
    // (a ping socket in the container needs its group in the container's ping_group_range).
    let text = r.run_ok(
        &[],
        &format!(
            "echo '0 0' >/proc/sys/net/ipv4/ping_group_range; python3 {} echoerr 198.51.100.77",
            r.helper()
        ),
    );
    assert_eq!(
        text.trim(),
        "echo-error errno=113 origin=2 type=3 code=1 seq=7",
        "host unreachable for an echo request"
    );
    let text = r.run_ok(
        &["--allow-host-loopback"],
        "socat -u TCP:10.0.2.2:7200,connect-timeout=10 -; \
         echo x | socat -t 40 - UDP:10.0.2.2:7209 2>&1; true",
    );
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines.len(), 2, "{text}");
    assert_eq!(lines[0], "host-loopback");
    assert!(
        lines[1].contains("Connection refused"),
        "UDP to a closed port on the host's loopback: {text}"
    );
}

#[test]
fn attach_serves_a_namespace_made_by_someone_else() {
    let t = topology!("rl_attach");
    let r = rig(t);
    let _echo = r.t.server(&r.t.u, &tcp_echo_server(7000), "tcp", 7000);
    // With a TAP, then with the packet ring link (whose end is noticed through its socket).
    for link in ["tap", "ring"] {
        attach_once(&r, link);
    }
}

/// slirp4netns' `--outbound-addr` and `--outbound-addr6`: the server in U sees the container's
/// TCP and UDP come from the given addresses of H (one given as an interface name), not H's
/// first address; ping still works from the bound socket.
#[test]
fn slirp4netns_outbound_addresses_are_the_sources_servers_see() {
    let t = topology!("rl_outbound");
    let r = rig(t);
    r.t.ip(&r.t.h, &["addr", "add", "198.51.100.3/24", "dev", "up0"]);
    // cl0, H's link to C, has 203.0.113.1: U answers it through H.
    r.t.ip(
        &r.t.u,
        &["route", "add", "203.0.113.0/24", "via", "198.51.100.1"],
    );
    ipv6_uplink(&r, &["2001:db8:1::3/64"]);
    let _tcp =
        r.t.server(&r.t.u, &peer_addr_server("tcp", 7200), "tcp", 7200);
    let _udp =
        r.t.server(&r.t.u, &peer_addr_server("udp", 7201), "udp", 7201);
    let _tcp6 = r.t.server(
        &r.t.u,
        &strings(&[
            "socat",
            "TCP6-LISTEN:7202,fork,reuseaddr",
            "SYSTEM:echo peer=$SOCAT_PEERADDR",
        ]),
        "tcp",
        7202,
    );
    // UDP may lose a datagram (a loaded machine, a server forking per datagram): up to three
    // tries; the source address is what is checked.
    let client = format!(
        "socat -T 5 - TCP:{U_IP}:7200,connect-timeout=5 </dev/null; \
         for i in 1 2 3; do r=$(echo x | socat -t 3 - UDP:{U_IP}:7201); \
           [ -n \"$r\" ] && {{ echo \"$r\"; break; }}; done; \
         socat -T 5 - TCP6:[2001:db8:1::2]:7202,connect-timeout=5 </dev/null; \
         busybox ping -c 1 -W 3 {U_IP} >/dev/null && echo ping-ok; \
         busybox nslookup svc.rnat.test 10.0.2.3 | grep -q 203.0.113.88 && echo dns4-ok; \
         busybox nslookup svc.rnat.test fd00::3 | grep -q 203.0.113.88 && echo dns6-ok"
    );
    // DNS from both families to H's IPv4 resolver: an IPv6 flow's socket reaches it from the
    // IPv4 outbound address (a socket bound to the IPv6 one could not).
    let _dns = start_dns_server(&r.t, &r.t.u, U_IP, &[("svc.rnat.test", "203.0.113.88")]);
    r.t.write_etc_netns(&r.t.h, "resolv.conf", &format!("nameserver {U_IP}\n"));
    for (outbound, want4) in [("198.51.100.3", "198.51.100.3"), ("cl0", "203.0.113.1")] {
        let (out, served) = in_slirp_namespace(
            &r,
            &[
                "--enable-ipv6",
                &format!("--outbound-addr={outbound}"),
                "--outbound-addr6=2001:db8:1::3",
            ],
            &client,
            3,
        );
        let text = out.stdout_str();
        // socat gives the address alone, IPv6 in brackets and written out in full.
        let peers: Vec<std::net::IpAddr> = peer_lines(&text)
            .iter()
            .filter_map(|p| p.trim_matches(['[', ']']).parse().ok())
            .collect();
        let want: Vec<std::net::IpAddr> = [want4, want4, "2001:db8:1::3"]
            .iter()
            .map(|a| a.parse().expect("address"))
            .collect();
        assert_eq!(
            peers,
            want,
            "--outbound-addr={outbound}: the sources U saw\n{text}\n{}",
            served.describe_now()
        );
        for want in ["ping-ok", "dns4-ok", "dns6-ok"] {
            assert!(text.contains(want), "{want}: {text}");
        }
    }
}

/// slirp4netns' `--enable-seccomp`: rnat serves with a seccomp filter in place, which the kernel
/// shows in /proc/PID/status, and traffic passes. (Not with `--enable-sandbox` here: that needs
/// the capabilities rnat has inside Podman's user namespace, not as a plain user.)
#[test]
fn slirp4netns_enable_seccomp_installs_a_filter_and_serves() {
    let t = topology!("rl_seccomp");
    let r = rig(t);
    let _tcp =
        r.t.server(&r.t.u, &peer_addr_server("tcp", 7200), "tcp", 7200);
    let client = format!(
        "socat -T 5 - TCP:{U_IP}:7200,connect-timeout=5 </dev/null; \
         busybox ping -c 1 -W 3 {U_IP} >/dev/null && echo ping-ok"
    );
    let flags = ["--enable-seccomp"];
    let (out, served) = in_slirp_namespace(&r, &flags, &client, 1);
    let text = out.stdout_str();
    assert_eq!(peer_lines(&text), vec![H_UPLINK_IP], "{text}");
    assert!(text.contains("ping-ok"), "{text}");
    let status =
        std::fs::read_to_string(format!("/proc/{}/status", served.pid())).expect("rnat's status");
    let field = |name: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .map(str::trim)
            .unwrap_or("")
            .to_string()
    };
    assert_eq!(field("Seccomp:"), "2", "filter mode\n{status}");
    assert_eq!(field("Seccomp_filters:"), "1", "one filter\n{status}");
    assert_eq!(field("NoNewPrivs:"), "1", "no_new_privs\n{status}");
}

/// The slirp4netns API over its socket, as slirp4netns' `api.c` answers: ids from 1, never
/// reused; `list_hostfwd` without a `return` wrapper; a port of 0 refused by name; an unknown id
/// refused; and a removed forward's host port no longer bound.
#[test]
fn slirp4netns_api_answers_as_slirp4netns_does() {
    let t = topology!("rl_api");
    let r = rig(t);
    let (holder, pid) = user_namespace_holder(&r);
    let dir = r.t.work_path("api");
    std::fs::create_dir_all(&dir).expect("api dir");
    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o1777)).expect("chmod");
    let sock = dir.join("slirp.sock");
    let sock = sock.to_str().expect("UTF-8 path");
    let pid_s = pid.to_string();
    let mut served = r.t.spawn_command(r.as_user(&[
        r.rnat.as_str(),
        "slirp4netns",
        "--configure",
        "--api-socket",
        sock,
        &pid_s,
        "tap0",
    ]));
    let target = format!("UNIX-CONNECT:{sock}");
    let ask = |req: &str| {
        let out = r.t.exec_input(
            &r.t.h,
            &["socat", "-t", "5", "-", &target],
            req.as_bytes(),
            Duration::from_secs(10),
        );
        out.stdout_str().trim().to_string()
    };
    let list = r#"{"execute":"list_hostfwd"}"#;
    let first = procs::poll(|| Some(ask(list)).filter(|a| !a.is_empty()));
    assert_eq!(first.as_deref(), Some(r#"{"entries":[]}"#));
    let add = |host: u16, guest: u16| {
        ask(&format!(
            r#"{{"execute":"add_hostfwd","arguments":{{"proto":"tcp","host_addr":"","host_port":{host},"guest_addr":"","guest_port":{guest}}}}}"#
        ))
    };
    let remove = |id: u64| {
        ask(&format!(
            r#"{{"execute":"remove_hostfwd","arguments":{{"id":{id}}}}}"#
        ))
    };
    assert_eq!(add(8101, 80), r#"{"return":{"id":1}}"#);
    assert_eq!(add(8102, 81), r#"{"return":{"id":2}}"#);
    assert_eq!(remove(2), r#"{"return":{}}"#);
    assert_eq!(
        remove(2),
        r#"{"error":{"desc":"bad request: remove_hostfwd: bad arguments.id"}}"#
    );
    assert_eq!(
        add(0, 80),
        r#"{"error":{"desc":"bad request: add_hostfwd: bad arguments.host_port"}}"#
    );
    assert_eq!(
        add(8103, 82),
        r#"{"return":{"id":3}}"#,
        "ids are not reused"
    );
    let listed: serde_json::Value = serde_json::from_str(&ask(list)).unwrap_or_default();
    let ports: Vec<(u64, u64, u64)> = listed["entries"]
        .as_array()
        .map(|e| {
            e.iter()
                .filter_map(|f| {
                    Some((
                        f["id"].as_u64()?,
                        f["host_port"].as_u64()?,
                        f["guest_port"].as_u64()?,
                    ))
                })
                .collect()
        })
        .unwrap_or_default();
    assert_eq!(ports, [(1, 8101, 80), (3, 8103, 82)], "{listed}");
    let listening = r.t.exec_ok(&r.t.h, &["ss", "-Hltn"]);
    assert!(
        listening.contains(":8101 ")
            && listening.contains(":8103 ")
            && !listening.contains(":8102 "),
        "host ports bound\n{listening}"
    );
    served.signal("TERM");
    let _ = served.wait_exit(Duration::from_secs(20));
    drop(holder);
}

/// A new user and network namespace owned by the test user, held by a `sleep` in it: the
/// holder and the sleep's PID.
fn user_namespace_holder(r: &Rig) -> (crate::procs::BgProc, u32) {
    let holder = r.t.spawn_command(r.as_user(&[
        "unshare",
        "--user",
        "--map-root-user",
        "--net",
        "sleep",
        "60",
    ]));
    let pid = procs::poll(|| {
        procs::descendants(holder.pid())
            .into_iter()
            .chain([holder.pid()])
            .find(|p| {
                std::fs::read_to_string(format!("/proc/{p}/comm"))
                    .is_ok_and(|c| c.trim() == "sleep")
            })
    })
    .expect("the namespace holder started");
    (holder, pid)
}

/// Runs SCRIPT in the namespaces of PID (as the test user) until `done` accepts its result,
/// which it returns; panics with WHAT and the serving rnat's state if it never does.
fn poll_in_namespace(
    r: &Rig,
    pid: u32,
    script: &str,
    served: &crate::procs::BgProc,
    what: &str,
    done: impl Fn(&Finished) -> bool,
) -> Finished {
    let pid_s = pid.to_string();
    procs::poll(|| {
        let out = procs::run_bounded(
            r.as_user(&[
                "nsenter",
                "--target",
                &pid_s,
                "--user",
                "--net",
                "--preserve-credentials",
                "sh",
                "-c",
                script,
            ]),
            None,
            Duration::from_secs(30),
        );
        done(&out).then_some(out)
    })
    .unwrap_or_else(|| panic!("no traffic through {what}\n{}", served.describe_now()))
}

/// Runs `rnat slirp4netns --configure FLAGS PID tap0` (as the test user) for a new user and
/// network namespace, and CLIENT in it until it prints WANT `peer=` lines (traffic passes);
/// returns what CLIENT printed and the still-running rnat (dropped: stopped).
fn in_slirp_namespace(
    r: &Rig,
    flags: &[&str],
    client: &str,
    want: usize,
) -> (Finished, crate::procs::BgProc) {
    let (holder, pid) = user_namespace_holder(r);
    let pid_s = pid.to_string();
    let mut argv = vec![r.rnat.as_str(), "slirp4netns", "--configure"];
    argv.extend_from_slice(flags);
    argv.extend([pid_s.as_str(), "tap0"]);
    let served = r.t.spawn_command(r.as_user(&argv));
    let out = poll_in_namespace(r, pid, client, &served, "slirp4netns mode", |out| {
        peer_lines(&out.stdout_str()).len() >= want
    });
    drop(holder);
    (out, served)
}

fn attach_once(r: &Rig, link: &str) {
    // A user-owned namespace pair with a process that waits in it.
    let (mut holder, pid) = user_namespace_holder(r);
    let pid_s = pid.to_string();
    let mut attach = r.as_user(&[&r.rnat, "attach", "--pid", &pid_s, "--configure"]);
    attach.env("RNAT_LINK", link);
    let mut served = r.t.spawn_command(attach);
    let client = format!("echo via-attach | socat -t 5 -T 10 - TCP:{U_IP}:7000,connect-timeout=10");
    let what = format!("the attached namespace ({link})");
    let out = poll_in_namespace(r, pid, &client, &served, &what, Finished::success);
    assert_eq!(out.stdout_str().trim(), "via-attach");
    // When the namespace's process exits, rnat attach exits too.
    holder.signal("KILL");
    procs::send_signal("KILL", &[pid]);
    let done = served.wait_exit(Duration::from_secs(20));
    assert!(
        !done.timed_out(),
        "rnat attach ({link}) outlived its target\n{}",
        done.describe()
    );
    assert!(done.success(), "{}", done.describe());
}

fn strings(v: &[&str]) -> Vec<String> {
    v.iter().map(|s| s.to_string()).collect()
}

// ---- Published ports (issue 5) ----

use crate::harness::{C_IP, H_CLIENT_SIDE_IP};

/// A python3 helper: `echo PORT` serves a TCP echo on PORT for many clients at once; `clients
/// HOST PORT N` opens N connections together, sends a distinct line on each, checks each echo,
/// and prints `ok=<count>`; `echoerr HOST` pings HOST from a ping socket and prints the error
/// that comes back; `closefirst PORT` answers one message per connection and closes first, and
/// `reuse HOST PORT N ADDR LPORT` is its client, N connections one after another from ADDR:LPORT;
/// `resetwatch PORT` tells each client how the connection before it ended (eof or reset), and
/// `rst HOST PORT` reads a line, sends a little and aborts; `countserve PORT` answers each stream
/// with its length and count of '!', and `urgentsend HOST PORT` sends it `urgentbulk`'s stream;
/// `hold HOST PORT N` keeps N echoed connections open while it makes a pipe of its own.
const PY_HELPER: &str = r#"
import asyncio, resource, sys
soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))

async def echo(r, w):
    try:
        while data := await r.read(65536):
            w.write(data)
            await w.drain()
    finally:
        w.close()

async def serve(port):
    srv = await asyncio.start_server(echo, "0.0.0.0", port, backlog=4096)
    async with srv:
        await asyncio.sleep(120)

async def one(host, port, i):
    r, w = await asyncio.wait_for(asyncio.open_connection(host, port), 30)
    line = f"conn-{i}\n".encode()
    w.write(line)
    await w.drain()
    got = await asyncio.wait_for(r.readline(), 30)
    w.close()
    return got == line

async def hold(host, port, n):
    # N connections at once, each echoing a line and then kept open while a new pipe of this
    # user is made: prints ok=<echoed> and pipe=<its size>.
    import fcntl, os
    conns = await asyncio.gather(*(asyncio.open_connection(host, port) for _ in range(n)))
    ok = 0
    for i, (r, w) in enumerate(conns):
        w.write(f"held-{i}\n".encode())
        await w.drain()
    for i, (r, w) in enumerate(conns):
        ok += await asyncio.wait_for(r.readline(), 30) == f"held-{i}\n".encode()
    rd, wr = os.pipe()
    print(f"ok={ok} pipe={fcntl.fcntl(wr, 1032)}")  # F_GETPIPE_SZ
    for r, w in conns:
        w.close()

async def clients(host, port, n):
    sem = asyncio.Semaphore(n)
    results = await asyncio.gather(*(one(host, port, i) for i in range(n)), return_exceptions=True)
    errors = [r for r in results if r is not True]
    print(f"ok={len(results) - len(errors)}")
    resets = sum(1 for e in errors if e is False or isinstance(e, (ConnectionError, asyncio.IncompleteReadError)))
    timeouts = sum(1 for e in errors if isinstance(e, (TimeoutError, asyncio.TimeoutError)))
    print(f"reset={resets} timeout={timeouts} other={len(errors) - resets - timeouts}")
    for e in errors[:5]:
        print("error:", repr(e))

def udp_sink(port, n):
    import socket
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
    s.bind(("0.0.0.0", port))
    s.settimeout(20)
    good = bad = 0
    try:
        while good + bad < n:
            d, _ = s.recvfrom(65536)
            i = int.from_bytes(d[:4], "big")
            if len(d) == 1000 and d == i.to_bytes(4, "big") + bytes([i % 251]) * 996:
                good += 1
            else:
                bad += 1
    except socket.timeout:
        pass
    print(f"good={good} bad={bad}", flush=True)

def udp_burst(host, port, n):
    import socket
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    for i in range(n):
        s.sendto(i.to_bytes(4, "big") + bytes([i % 251]) * 996, (host, port))

def echo_error(host):
    # An echo request from a ping socket with IP_RECVERR: the error the network sends back
    # must reach this socket (matched by its identifier), quoting the request's sequence.
    import select, socket, struct
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM, socket.IPPROTO_ICMP)
    s.setsockopt(socket.SOL_IP, 11, 1)  # IP_RECVERR
    s.sendto(b"\x08\x00\x00\x00\x00\x00\x00\x07" + b"x" * 16, (host, 0))
    p = select.poll()
    p.register(s, select.POLLERR)
    if not p.poll(40000):
        print("echo-error none")
        return
    msg, anc, _, _ = s.recvmsg(64, 512, socket.MSG_ERRQUEUE)
    errno, origin, kind, code, _ = struct.unpack("IBBBB", anc[0][2][:8])
    seq = struct.unpack("!H", msg[6:8])[0]
    print(f"echo-error errno={errno} origin={origin} type={kind} code={code} seq={seq}")

def urgent_server(port, bulk):
    # Each client gets one line whose last byte is TCP urgent data (MSG_OOB marks the last byte
    # sent): a read stops short at the urgent mark, with the newline still queued behind it.
    # `bulk`: the mark is in the middle of a larger stream that ends right after it.
    import socket, threading
    srv = socket.socket()
    srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    srv.bind(("0.0.0.0", port))
    srv.listen(16)
    srv.settimeout(120)
    def one(c):
        c.settimeout(60)
        if bulk:
            # 11,000 bytes, the mark after the first 10,000 (more than rnat takes out of a
            # socket at once, so that it peeks up to the mark), then the end of the stream:
            # all of it is queued at rnat's socket when its peek stops at the mark.
            c.sendall(b"a" * 9999 + b"!", socket.MSG_OOB)
            c.sendall(b"b" * 1000)
            c.shutdown(socket.SHUT_WR)
        else:
            c.send(b"before-the-mark\n", socket.MSG_OOB)
        try:
            while c.recv(4096):
                pass
        except OSError:
            pass
        c.close()
    while True:
        c, _ = srv.accept()
        threading.Thread(target=one, args=(c,), daemon=True).start()

def first_line(host, port):
    # Connects, prints the first line the server sends; the server then waits for us.
    import socket
    s = socket.create_connection((host, port), timeout=30)
    s.settimeout(20)
    got = b""
    try:
        while not got.endswith(b"\n"):
            d = s.recv(4096)
            if not d:
                break
            got += d
    except socket.timeout:
        got += b"<timeout>"
    print(repr(got))

def close_first(port):
    import socket
    srv = socket.socket()
    srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    srv.bind(("0.0.0.0", port))
    srv.listen(64)
    srv.settimeout(120)
    while True:
        c, _ = srv.accept()
        c.settimeout(10)
        try:
            c.sendall(b"ok:" + c.recv(100))
        except OSError:
            pass
        c.close()

def count_server(port):
    # Reads each client's stream to its end and answers with its length and how many '!' it held.
    import socket
    srv = socket.socket()
    srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    srv.bind(("0.0.0.0", port))
    srv.listen(16)
    srv.settimeout(120)
    while True:
        c, _ = srv.accept()
        c.settimeout(20)
        c.setsockopt(socket.SOL_SOCKET, socket.SO_OOBINLINE, 1)
        d = b""
        try:
            while x := c.recv(65536):
                d += x
            c.sendall(f"{len(d)} {d.count(b'!')}\n".encode())
        except OSError as e:
            c.sendall(repr(e).encode() + b"\n")
        c.close()

def urgent_send(host, port):
    # The urgent bulk stream of `urgentbulk`, sent by a client; prints the server's answer.
    import socket
    s = socket.create_connection((host, port), timeout=30)
    s.settimeout(30)
    s.sendall(b"a" * 9999 + b"!", socket.MSG_OOB)
    s.sendall(b"b" * 1000)
    s.shutdown(socket.SHUT_WR)
    got = b""
    try:
        while d := s.recv(4096):
            got += d
    except socket.timeout:
        got += b"<timeout>"
    print(got.decode(errors="replace").strip())

def reset_watch(port):
    # Tells each client, in its first line, how the connection before it ended: eof or reset.
    import socket
    srv = socket.socket()
    srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    srv.bind(("0.0.0.0", port))
    srv.listen(16)
    srv.settimeout(120)
    last = b"none"
    while True:
        c, _ = srv.accept()
        c.settimeout(20)
        try:
            c.sendall(last + b"\n")
            while c.recv(65536):
                pass
            last = b"eof"
        except ConnectionResetError:
            last = b"reset"
        except OSError as e:
            last = repr(e).encode()
        c.close()

def rst_client(host, port):
    # Reads the first line, sends a little, then aborts the connection (RST).
    import socket, struct
    s = socket.create_connection((host, port), timeout=30)
    s.settimeout(20)
    got = b""
    while not got.endswith(b"\n"):
        d = s.recv(4096)
        if not d:
            break
        got += d
    s.sendall(b"x" * 1000)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    s.close()
    print(repr(got))

def reuse(host, port, n, local):
    # Each connection ends with the server's close and ours: ours is the second, so our side
    # keeps no TIME_WAIT and the next connection takes the same port at once, while the
    # forwarder may still be closing the last one with the server.
    import errno, socket, time
    bad = []
    for i in range(n):
        c = socket.socket()
        c.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        c.settimeout(10)
        got = b""
        try:
            c.bind(local)
            for _ in range(200):
                # Our last connection may not have heard the final ACK yet (LAST_ACK).
                if c.connect_ex((host, port)) != errno.EADDRNOTAVAIL:
                    break
                time.sleep(0.005)
            c.getpeername()
            c.sendall(b"x%d" % i)
            while d := c.recv(100):
                got += d
        except OSError as e:
            got = repr(e).encode()
        c.close()
        if got != b"ok:x%d" % i:
            bad.append((i, got))
    print(f"ok={n - len(bad)} bad={len(bad)}")
    for b in bad[:5]:
        print("bad:", b)

if sys.argv[1] == "echoerr":
    echo_error(sys.argv[2])
elif sys.argv[1] == "urgent":
    urgent_server(int(sys.argv[2]), False)
elif sys.argv[1] == "urgentbulk":
    urgent_server(int(sys.argv[2]), True)
elif sys.argv[1] == "count":
    # Reads to the end of the stream: the length and how many '!' it held.
    import socket
    s = socket.create_connection((sys.argv[2], int(sys.argv[3])), timeout=30)
    d = b""
    while c := s.recv(65536):
        d += c
    print(len(d), d.count(b"!"))
elif sys.argv[1] == "line":
    first_line(sys.argv[2], int(sys.argv[3]))
elif sys.argv[1] == "udpsink":
    udp_sink(int(sys.argv[2]), int(sys.argv[3]))
elif sys.argv[1] == "udpburst":
    udp_burst(sys.argv[2], int(sys.argv[3]), int(sys.argv[4]))
elif sys.argv[1] == "echo":
    asyncio.run(serve(int(sys.argv[2])))
elif sys.argv[1] == "hold":
    asyncio.run(hold(sys.argv[2], int(sys.argv[3]), int(sys.argv[4])))
elif sys.argv[1] == "countserve":
    count_server(int(sys.argv[2]))
elif sys.argv[1] == "urgentsend":
    urgent_send(sys.argv[2], int(sys.argv[3]))
elif sys.argv[1] == "resetwatch":
    reset_watch(int(sys.argv[2]))
elif sys.argv[1] == "rst":
    rst_client(sys.argv[2], int(sys.argv[3]))
elif sys.argv[1] == "closefirst":
    close_first(int(sys.argv[2]))
elif sys.argv[1] == "reuse":
    reuse(sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), (sys.argv[5], int(sys.argv[6])))
else:
    asyncio.run(clients(sys.argv[2], int(sys.argv[3]), int(sys.argv[4])))
"#;

impl Rig {
    /// `rnat run --name NAME [FLAGS] -- sh -c SCRIPT` as the test user, in the background.
    fn run_bg(&self, name: &str, flags: &[&str], script: &str) -> crate::procs::BgProc {
        let mut argv = vec![self.rnat.as_str(), "run", "--name", name];
        argv.extend_from_slice(flags);
        argv.extend(["--", "sh", "-c", script]);
        self.t.spawn_command(self.as_user(&argv))
    }

    /// Instance NAME's entry in `rnat ps --json` (null if it is not listed), and the output.
    fn instance_json(&self, name: &str) -> (serde_json::Value, Finished) {
        let ps = self.rnat_user(&["ps", "--json"]);
        let list: serde_json::Value = serde_json::from_str(&ps.stdout_str()).unwrap_or_default();
        let inst = list
            .as_array()
            .and_then(|l| l.iter().find(|i| i["name"] == name))
            .cloned()
            .unwrap_or_default();
        (inst, ps)
    }

    /// `rnat ARGS` (publish, unpublish, ps) as the test user.
    fn rnat_user(&self, args: &[&str]) -> Finished {
        let mut argv = vec![self.rnat.as_str()];
        argv.extend_from_slice(args);
        procs::run_bounded(self.as_user(&argv), None, RUN_TIMEOUT)
    }

    /// Waits until instance NAME lists PORT (as `HOST->CONTAINER/PROTO`) in `rnat ps`.
    fn wait_published(&self, name: &str, port: &str) {
        let found = procs::poll(|| {
            let out = self.rnat_user(&["ps"]);
            out.stdout_str()
                .lines()
                .any(|l| l.contains(name) && l.contains(port))
                .then_some(())
        });
        assert!(
            found.is_some(),
            "instance {name} never listed {port}\n{}",
            self.rnat_user(&["ps"]).describe()
        );
    }

    /// The helper's `clients` mode from the client namespace: N connections at once to the host's
    /// PORT, each echoing a line.
    fn clients_from_outside(&self, helper: &str, port: u16, n: u32) -> Finished {
        let (port, n) = (port.to_string(), n.to_string());
        self.run_helper(&self.t.c, helper, &["clients", H_CLIENT_SIDE_IP, &port, &n])
    }

    /// The python helper with ARGS, as root in namespace NS, bounded to 120 s.
    fn run_helper(&self, ns: &str, helper: &str, args: &[&str]) -> Finished {
        let mut argv = vec!["python3", helper];
        argv.extend_from_slice(args);
        procs::run_bounded(self.t.ns_command(ns, &argv), None, Duration::from_secs(120))
    }

    fn helper(&self) -> String {
        let p = self.t.work_file("helper.py", PY_HELPER.as_bytes());
        p.to_str().expect("UTF-8 path").to_string()
    }
}

/// Stops an `rnat run` instance with SIGTERM and checks that it exits.
fn stop(bg: &mut crate::procs::BgProc) {
    bg.signal("TERM");
    let done = bg.wait_exit(Duration::from_secs(20));
    assert!(!done.timed_out(), "{}", done.describe());
}

/// Waits until a TCP client from NS to ADDR:PORT gets an answer (the container's server is up).
fn wait_answer(t: &Topology, ns: &str, addr: &str, port: u16) {
    let target = format!("TCP:{addr}:{port},connect-timeout=2");
    let ok = procs::poll(|| {
        let out = t.exec_input(
            ns,
            &["socat", "-T", "3", "-", &target],
            b"probe\n",
            Duration::from_secs(10),
        );
        (out.success() && !out.stdout_str().is_empty()).then_some(())
    });
    assert!(ok.is_some(), "no answer from {addr}:{port} in {ns}");
}

#[test]
fn published_ports_carry_bytes_and_the_clients_address() {
    let t = topology!("rl_publish");
    let r = rig(t);
    let script = "socat TCP-LISTEN:80,fork,reuseaddr EXEC:cat & \
                  socat TCP-LISTEN:81,fork,reuseaddr SYSTEM:'echo peer=$SOCAT_PEERADDR' & \
                  socat UDP-RECVFROM:53,fork SYSTEM:'read l; echo peer=$SOCAT_PEERADDR' & \
                  sleep 60";
    let mut bg = r.run_bg(
        "web",
        &["-p", "8080:80", "-p", "8081:81", "-p", "5353:53/udp"],
        script,
    );
    r.wait_published("web", "8080->80/tcp");
    wait_answer(&r.t, &r.t.c, H_CLIENT_SIDE_IP, 8080);
    let data = payload(4 << 20, 21);
    // An external client goes through the engine; a loopback client is spliced.
    assert_tcp_echo(
        &r.t,
        &r.t.c,
        H_CLIENT_SIDE_IP,
        8080,
        &data,
        "external client, engine path",
    );
    assert_tcp_echo(
        &r.t,
        &r.t.h,
        "127.0.0.1",
        8080,
        &data,
        "loopback client, splice path",
    );
    let peer = tcp_exchange(&r.t, &r.t.c, H_CLIENT_SIDE_IP, 8081, b"");
    assert_eq!(
        peer_lines(&peer.stdout_str()),
        vec![C_IP.to_string()],
        "the container sees the external client\n{}",
        peer.describe()
    );
    let peer = udp_exchange(&r.t, &r.t.c, H_CLIENT_SIDE_IP, 5353, b"hello\n");
    assert_eq!(
        peer_lines(&peer.stdout_str()),
        vec![C_IP.to_string()],
        "UDP keeps the client address\n{}",
        peer.describe()
    );
    stop(&mut bg);
}

/// IPv6 on the C–H link: H 2001:db8:2::1, C 2001:db8:2::2.
const H6: &str = "[2001:db8:2::1]";
const C6: &str = "2001:db8:2::2";

/// The addresses in `peer=` lines (socat writes IPv6 ones bracketed and in full; an IPv4-mapped
/// one is taken as IPv4).
fn peer_ips(output: &str) -> Vec<std::net::IpAddr> {
    peer_lines(output)
        .iter()
        .filter_map(|l| {
            let ip: std::net::IpAddr = l.trim_matches(['[', ']']).parse().ok()?;
            Some(match ip {
                std::net::IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, std::net::IpAddr::V4),
                v4 => v4,
            })
        })
        .collect()
}

/// Asserts that the server behind a published port saw exactly the client addresses `want`.
fn assert_seen(peer: Finished, want: &[&str], what: &str) {
    assert_eq!(
        peer_ips(&peer.stdout_str()),
        ips(want),
        "{what}\n{}",
        peer.describe()
    );
}

fn ips(v: &[&str]) -> Vec<std::net::IpAddr> {
    v.iter().map(|s| s.parse().expect("IP address")).collect()
}

fn ipv6_client_link(r: &Rig) {
    r.t.ip(
        &r.t.h,
        &[
            "-6",
            "addr",
            "add",
            "2001:db8:2::1/64",
            "dev",
            "cl0",
            "nodad",
        ],
    );
    r.t.ip(
        &r.t.c,
        &[
            "-6",
            "addr",
            "add",
            "2001:db8:2::2/64",
            "dev",
            "h0",
            "nodad",
        ],
    );
}

/// A port published without a host address listens on IPv6 too. With `--enable-ipv6` an IPv6
/// client goes through the engine to fd00::100 and the container sees its address (TCP and UDP),
/// `::1` is spliced, and IPv4 clients go on as before. Without it an IPv6 TCP client is spliced
/// to the container's IPv4 (its address is not kept), UDP stays IPv4-only, and `0.0.0.0:PORT`
/// is IPv4-only.
/// Instance NAME running socat servers of family `v` ("6": IPv6 listeners, which take IPv4
/// clients too; "": IPv4) on the container's ports 80 (TCP echo), 81 (TCP) and 53 (UDP), the
/// last two answering `peer=<client address>`, published on the host's 8080, 8081 and 5353
/// (UDP), with `more` flags. Returns once an IPv6 client of the host's port 8080 gets an answer.
fn peer_servers(r: &Rig, name: &str, v: &str, more: &[&str]) -> crate::procs::BgProc {
    let script = format!(
        "socat TCP{v}-LISTEN:80,fork,reuseaddr EXEC:cat & \
         socat TCP{v}-LISTEN:81,fork,reuseaddr SYSTEM:'echo peer=$SOCAT_PEERADDR' & \
         socat UDP{v}-RECVFROM:53,fork SYSTEM:'read l; echo peer=$SOCAT_PEERADDR' & \
         sleep 60"
    );
    let mut flags = vec!["-p", "8080:80", "-p", "8081:81", "-p", "5353:53/udp"];
    flags.extend_from_slice(more);
    let bg = r.run_bg(name, &flags, &script);
    r.wait_published(name, "8080->80/tcp");
    wait_answer(&r.t, &r.t.c, H6, 8080);
    bg
}

#[test]
fn published_ports_over_ipv6() {
    let t = topology!("rl_pub6");
    let r = rig(t);
    ipv6_client_link(&r);
    // Dual-stack servers (socat's TCP6-LISTEN takes IPv4 clients too).
    let mut bg = peer_servers(&r, "web6", "6", &["--enable-ipv6"]);
    let data = payload(2 << 20, 23);
    assert_tcp_echo(&r.t, &r.t.c, H6, 8080, &data, "IPv6 client, engine path");
    assert_tcp_echo(
        &r.t,
        &r.t.h,
        "[::1]",
        8080,
        &data,
        "::1 client, splice path",
    );
    assert_tcp_echo(&r.t, &r.t.c, H_CLIENT_SIDE_IP, 8080, &data, "IPv4 client");
    assert_seen(
        tcp_exchange(&r.t, &r.t.c, H6, 8081, b""),
        &[C6],
        "the container sees the IPv6 client",
    );
    assert_seen(
        udp_exchange(&r.t, &r.t.c, H6, 5353, b"hello\n"),
        &[C6],
        "UDP over IPv6 keeps the client address",
    );
    assert_seen(
        udp_exchange(&r.t, &r.t.c, H_CLIENT_SIDE_IP, 5353, b"hello\n"),
        &[C_IP],
        "UDP over IPv4 goes on",
    );
    stop(&mut bg);

    // Without --enable-ipv6: IPv4-only servers.
    let mut bg = peer_servers(&r, "web4", "", &["-p", "0.0.0.0:8082:80"]);
    assert_tcp_echo(
        &r.t,
        &r.t.c,
        H6,
        8080,
        &data,
        "IPv6 client, spliced to IPv4",
    );
    assert_seen(
        tcp_exchange(&r.t, &r.t.c, H6, 8081, b""),
        &["127.0.0.1"],
        "an IPv6 client arrives as a loopback client does",
    );
    let peer = udp_exchange(&r.t, &r.t.c, H6, 5353, b"hello\n");
    assert!(
        peer_lines(&peer.stdout_str()).is_empty(),
        "UDP is not published on IPv6 without --enable-ipv6\n{}",
        peer.describe()
    );
    let peer = udp_exchange(&r.t, &r.t.c, H_CLIENT_SIDE_IP, 5353, b"hello\n");
    assert_eq!(
        peer_ips(&peer.stdout_str()),
        ips(&[C_IP]),
        "{}",
        peer.describe()
    );
    assert_tcp_echo(
        &r.t,
        &r.t.c,
        H_CLIENT_SIDE_IP,
        8082,
        &data,
        "0.0.0.0:8082 over IPv4",
    );
    assert_tcp_no_answer(&r.t, &r.t.c, H6, 8082, "0.0.0.0:8082 is IPv4-only");
    stop(&mut bg);
}

#[test]
fn publish_and_unpublish_on_a_running_instance_spare_open_connections() {
    let t = topology!("rl_republish");
    let r = rig(t);
    let mut bg = r.run_bg(
        "app",
        &[],
        "socat TCP-LISTEN:80,fork,reuseaddr EXEC:cat & sleep 60",
    );
    let published = procs::poll(|| {
        r.rnat_user(&["publish", "--name", "app", "9090:80"])
            .success()
            .then_some(())
    });
    assert!(
        published.is_some(),
        "publish on a running instance failed\n{}",
        r.rnat_user(&["publish", "--name", "app", "9090:80"])
            .describe()
    );
    wait_answer(&r.t, &r.t.c, H_CLIENT_SIDE_IP, 9090);
    // A connection that stays open across the unpublish.
    let target = format!("TCP:{H_CLIENT_SIDE_IP}:9090");
    let mut long = r.t.spawn(
        &r.t.c,
        &[
            "sh",
            "-c",
            &format!("(echo before; sleep 3; echo after) | socat -T 10 - {target}"),
        ],
    );
    std::thread::sleep(Duration::from_millis(1000));
    let out = r.rnat_user(&["unpublish", "--name", "app", "9090:80"]);
    assert!(out.success(), "{}", out.describe());
    let refused = tcp_exchange(&r.t, &r.t.c, H_CLIENT_SIDE_IP, 9090, b"x\n");
    assert!(
        !refused.success() || refused.stdout_str().is_empty(),
        "port still answers after unpublish\n{}",
        refused.describe()
    );
    let done = long.wait_exit(Duration::from_secs(20));
    assert_eq!(
        done.stdout_str(),
        "before\nafter\n",
        "the open connection went on\n{}",
        done.describe()
    );
    // Unpublishing again names the problem.
    let again = r.rnat_user(&["unpublish", "--name", "app", "9090:80"]);
    assert_eq!(again.code(), Some(125));
    assert!(
        again.stderr_str().contains("not published"),
        "{}",
        again.describe()
    );
    // A container UDP port takes one host port: a second is refused, naming the container port,
    // and leaves its host port free (the socket it bound is closed), as a publish there shows.
    let udp = r.rnat_user(&["publish", "--name", "app", "5353:53/udp"]);
    assert!(udp.success(), "{}", udp.describe());
    let second = r.rnat_user(&["publish", "--name", "app", "5354:53/udp"]);
    assert!(
        !second.success() && second.stderr_str().contains("container port 53/udp"),
        "{}",
        second.describe()
    );
    let free = r.rnat_user(&["publish", "--name", "app", "5354:54/udp"]);
    assert!(
        free.success(),
        "host port 5354 still bound\n{}",
        free.describe()
    );
    bg.signal("TERM");
    let _ = bg.wait_exit(Duration::from_secs(20));
}

#[test]
fn a_port_in_use_or_privileged_fails_before_the_command_runs() {
    let t = topology!("rl_inuse");
    let r = rig(t);
    let _taken = r.t.server(
        &r.t.h,
        &strings(&["socat", "TCP-LISTEN:8085,reuseaddr,fork", "EXEC:cat"]),
        "tcp",
        8085,
    );
    let marker = r.t.work_path("ran");
    let script = format!("touch {}", marker.display());
    // Taken on IPv6 only: a mapping without an address listens on both families, so it fails.
    let _taken6 = r.t.server(
        &r.t.h,
        &strings(&[
            "socat",
            "TCP6-LISTEN:8086,ipv6only=1,reuseaddr,fork",
            "EXEC:cat",
        ]),
        "tcp",
        8086,
    );
    for (spec, want) in [
        ("8085:80", "Address already in use"),
        ("8086:80", "Address already in use"),
        ("80:80", "ip_unprivileged_port_start"),
        ("[::1]:5356:53/udp", "needs --enable-ipv6"),
    ] {
        let out = r.run(&["-p", spec], &script);
        assert_eq!(out.code(), Some(125), "{}", out.describe());
        assert!(
            out.stderr_str().contains(want),
            "{spec}: {}",
            out.describe()
        );
        assert_eq!(
            out.stderr_str().lines().count(),
            1,
            "one line: {}",
            out.describe()
        );
        assert!(!marker.exists(), "the command ran although {spec} failed");
    }
    // The failed 8086 left no IPv4 listener behind: IPv4 alone can still be published.
    let out = r.run(&["-p", "0.0.0.0:8086:80"], "echo ran");
    assert!(
        out.success() && out.stdout_str().trim() == "ran",
        "{}",
        out.describe()
    );
}

#[test]
fn two_thousand_concurrent_connections_through_a_published_port() {
    let t = topology!("rl_many");
    let r = rig(t);
    let helper = r.helper();
    let mut bg = r.run_bg(
        "many",
        &["-p", "8090:80"],
        &format!("python3 {helper} echo 80"),
    );
    r.wait_published("many", "8090->80/tcp");
    wait_answer(&r.t, &r.t.c, H_CLIENT_SIDE_IP, 8090);
    let out = r.clients_from_outside(&helper, 8090, 2000);
    assert_eq!(
        out.stdout_str().lines().next(),
        Some("ok=2000"),
        "{}",
        out.describe()
    );
    bg.signal("TERM");
    let _ = bg.wait_exit(Duration::from_secs(20));
}

/// A client that takes the same port again as soon as its connection is over (its side closed
/// second, so it keeps no TIME_WAIT) reaches the container every time, though rnat may still be
/// closing the last connection on that 4-tuple with the container when the next one arrives.
#[test]
fn a_client_reusing_its_port_at_once_is_served_every_time() {
    let t = topology!("rl_reuse");
    let r = rig(t);
    let helper = r.helper();
    let mut bg = r.run_bg(
        "reuse",
        &["-p", "8092:80"],
        &format!("python3 {helper} closefirst 80"),
    );
    r.wait_published("reuse", "8092->80/tcp");
    wait_answer(&r.t, &r.t.c, H_CLIENT_SIDE_IP, 8092);
    let args = ["reuse", H_CLIENT_SIDE_IP, "8092", "500", C_IP, "41000"];
    let out = r.run_helper(&r.t.c, &helper, &args);
    assert_eq!(
        out.stdout_str().lines().next(),
        Some("ok=500 bad=0"),
        "{}",
        out.describe()
    );
    // The case this is about happened (the old flow still held the 4-tuple), and nothing was
    // refused.
    let (inst, ps) = r.instance_json("reuse");
    let waited = inst["stats"]["tcp_inbound_waited"].as_u64();
    assert!(
        waited.is_some_and(|n| n > 0) && inst["port_stats"]["refused"] == 0,
        "want new connections that waited for the old one on their 4-tuple, none refused\n{}",
        ps.describe()
    );
    stop(&mut bg);
}

/// Many loopback clients at once: spliced connections' pipes stay within half the user's pipe
/// soft limit (which the user's other processes share: past it, each new pipe of the user gets
/// 2 pages), and the clients past that budget go through the engine, all of them served.
#[test]
fn spliced_connections_leave_the_users_pipe_quota_to_others() {
    let t = topology!("rl_pipes");
    let r = rig(t);
    let helper = r.helper();
    let mut bg = r.run_bg(
        "pipes",
        &["-p", "8097:80"],
        &format!("python3 {helper} echo 80"),
    );
    r.wait_published("pipes", "8097->80/tcp");
    wait_answer(&r.t, &r.t.h, "127.0.0.1", 8097);
    // 300 clients, as the instance's own user (whose pipes the limit counts), from the host's
    // loopback: 300 splices at 512 KiB of pipe each would be 150 MiB, over the default soft
    // limit of 64 MiB.
    let out = procs::run_bounded(
        r.as_user(&[
            "/usr/bin/python3",
            &helper,
            "hold",
            "127.0.0.1",
            "8097",
            "300",
        ]),
        None,
        Duration::from_secs(120),
    );
    assert_eq!(
        out.stdout_str().trim(),
        "ok=300 pipe=65536",
        "every client echoed, and a new pipe of the user still has its default size\n{}",
        out.describe()
    );
    let (inst, ps) = r.instance_json("pipes");
    let stats = &inst["port_stats"];
    let (spliced, engine) = (stats["spliced"].as_u64(), stats["via_engine"].as_u64());
    assert!(
        spliced.is_some_and(|n| n > 0) && engine.is_some_and(|n| n > 0),
        "want some clients spliced and the rest through the engine\n{}",
        ps.describe()
    );
    stop(&mut bg);
}

/// TCP urgent data through a spliced connection, both ways: `splice(2)` reads nothing at the
/// urgent mark, so without help the stream stalls there, or ends there once the sender closes.
/// Each stream has its mark after 10,000 of 11,000 bytes and its end right behind.
#[test]
fn urgent_data_passes_a_spliced_connection_both_ways() {
    let t = topology!("rl_spliceurg");
    let r = rig(t);
    let helper = r.helper();
    let mut bg = r.run_bg(
        "urg",
        &["-p", "8095:80", "-p", "8096:81"],
        &format!("python3 {helper} urgentbulk 80 & python3 {helper} countserve 81"),
    );
    r.wait_published("urg", "8096->81/tcp");
    let client = |args: &[&str]| r.run_helper(&r.t.h, &helper, args);
    // Container → client (the servers may still be starting: retried until one answers).
    let down = procs::poll(|| {
        let out = client(&["count", "127.0.0.1", "8095"]);
        (out.success() && !out.stdout_str().trim().is_empty() && out.stdout_str().trim() != "0 0")
            .then_some(out)
    });
    let down = down.unwrap_or_else(|| client(&["count", "127.0.0.1", "8095"]));
    assert_eq!(down.stdout_str().trim(), "11000 1", "{}", down.describe());
    // Client → container.
    let up = client(&["urgentsend", "127.0.0.1", "8096"]);
    assert_eq!(up.stdout_str().trim(), "11000 1", "{}", up.describe());
    let (inst, ps) = r.instance_json("urg");
    let spliced = inst["port_stats"]["spliced"].as_u64();
    assert!(
        spliced.is_some_and(|n| n >= 2),
        "want the spliced path\n{}",
        ps.describe()
    );
    stop(&mut bg);
}

/// A loopback client (spliced kernel to kernel) that aborts its connection: the container's
/// server hears a reset too, not an orderly end of a stream that was cut short.
#[test]
fn a_spliced_client_that_resets_resets_the_containers_side() {
    let t = topology!("rl_splicerst");
    let r = rig(t);
    let helper = r.helper();
    let mut bg = r.run_bg(
        "rst",
        &["-p", "8094:80"],
        &format!("python3 {helper} resetwatch 80"),
    );
    r.wait_published("rst", "8094->80/tcp");
    let client = |mode: &str| r.run_helper(&r.t.h, &helper, &[mode, "127.0.0.1", "8094"]);
    // The first connection may come before the server listens: retried until it answers.
    let first = procs::poll(|| {
        let out = client("rst");
        out.stdout_str().contains("none").then_some(out)
    });
    assert!(first.is_some(), "{}", client("rst").describe());
    let told = client("line");
    assert_eq!(
        told.stdout_str().trim(),
        "b'reset\\n'",
        "the server heard the aborted connection end as\n{}",
        told.describe()
    );
    let (inst, ps) = r.instance_json("rst");
    assert_eq!(
        inst["port_stats"]["spliced"],
        2,
        "want both connections spliced\n{}",
        ps.describe()
    );
    stop(&mut bg);
}

#[test]
fn a_burst_of_datagrams_keeps_every_boundary() {
    // A burst goes out as runs under UDP segmentation offload: each datagram must still arrive
    // whole and alone. Then again without the offload (`sendmmsg` of single datagrams), and
    // through the packet ring link. The uplink is slow (a token bucket with a deep queue), so
    // the burst is more than a host socket's send buffer holds: what the socket refuses must
    // wait for room, and still go out when the command has ended.
    let t = topology!("rl_udp_burst");
    let r = rig(t);
    r.t.exec_ok(
        &r.t.h,
        &[
            "tc", "qdisc", "add", "dev", "up0", "root", "tbf", "rate", "8mbit", "burst", "16kb",
            "limit", "4mb",
        ],
    );
    let helper = r.helper();
    let no_gso = ("RNAT_NO_UDP_GSO", "1");
    let cases: [(&str, &[(&str, &str)]); 3] = [
        ("7300", &[]),
        ("7301", &[no_gso]),
        ("7302", &[no_gso, ("RNAT_LINK", "ring")]),
    ];
    for (port, env) in cases {
        let mut sink =
            r.t.spawn(&r.t.u, &["python3", &helper, "udpsink", port, "300"]);
        r.t.wait_listening(&r.t.u, "udp", port.parse().expect("port"));
        let out = r.run_env(
            env,
            &[],
            &format!("python3 {helper} udpburst {U_IP} {port} 300"),
        );
        assert!(out.success(), "{env:?}: {}", out.describe());
        let done = sink.wait_exit(Duration::from_secs(30));
        assert_eq!(
            done.stdout_str().trim(),
            "good=300 bad=0",
            "{env:?}: {}",
            done.describe()
        );
    }
}

/// The pids of `rnat` processes under ROOT that live in another network namespace than NS_OF (the
/// socket maker `rnat` forks into the container).
fn keepers_under(root: u32, ns_of: u32) -> Vec<u32> {
    let net = |p: u32| std::fs::read_link(format!("/proc/{p}/ns/net")).ok();
    let host = net(ns_of);
    procs::descendants(root)
        .into_iter()
        .filter(|&p| {
            std::fs::read_to_string(format!("/proc/{p}/comm")).is_ok_and(|c| c.trim() == "rnat")
                && net(p).is_some()
                && net(p) != host
        })
        .collect()
}

#[test]
fn a_dead_socket_maker_is_replaced() {
    let t = topology!("rl_keeper");
    let r = rig(t);
    let mut bg = r.run_bg(
        "keep",
        &["-p", "8082:80"],
        "socat TCP-LISTEN:80,fork,reuseaddr EXEC:cat & sleep 60",
    );
    r.wait_published("keep", "8082->80/tcp");
    wait_answer(&r.t, &r.t.h, "127.0.0.1", 8082);
    let data = payload(64 << 10, 7);
    assert_tcp_echo(&r.t, &r.t.h, "127.0.0.1", 8082, &data, "before");
    let first = keepers_under(bg.pid(), bg.pid());
    assert_eq!(
        first.len(),
        1,
        "one socket maker after a loopback client: {first:?}"
    );
    procs::send_signal("KILL", &first);
    let gone =
        procs::poll(|| (!keepers_under(bg.pid(), bg.pid()).contains(&first[0])).then_some(()));
    assert!(gone.is_some(), "the socket maker {} did not die", first[0]);
    // The client that finds it dead still gets through (by the engine), and the next one is
    // spliced by a new socket maker.
    assert_tcp_echo(&r.t, &r.t.h, "127.0.0.1", 8082, &data, "maker just died");
    assert_tcp_echo(&r.t, &r.t.h, "127.0.0.1", 8082, &data, "after");
    let now = keepers_under(bg.pid(), bg.pid());
    assert!(
        now.len() == 1 && now[0] != first[0],
        "no new socket maker: before {first:?}, now {now:?}"
    );
    stop(&mut bg);
}

#[test]
fn a_low_descriptor_limit_resets_excess_clients_and_recovers() {
    let t = topology!("rl_nofile");
    let r = rig(t);
    let helper = r.helper();
    let argv = [
        "prlimit",
        "--nofile=48:48",
        "--",
        r.rnat.as_str(),
        "run",
        "--name",
        "fds",
        "-p",
        "8083:80",
        "--",
        "python3",
        &helper,
        "echo",
        "80",
    ];
    let mut bg = r.t.spawn_command(r.as_user(&argv));
    r.wait_published("fds", "8083->80/tcp");
    wait_answer(&r.t, &r.t.c, H_CLIENT_SIDE_IP, 8083);
    // 300 clients at once from outside (one descriptor each in rnat) against a flow cap that rnat
    // derives from its descriptor limit: the excess is reset at once, none is left hanging.
    let out = r.clients_from_outside(&helper, 8083, 300);
    let text = out.stdout_str();
    let field = |k: &str| -> u32 {
        text.split_whitespace()
            .find_map(|w| w.strip_prefix(k)?.parse().ok())
            .unwrap_or(u32::MAX)
    };
    let (ok, reset, timeout, other) = (
        field("ok="),
        field("reset="),
        field("timeout="),
        field("other="),
    );
    assert!(
        (1..300).contains(&ok) && reset >= 1 && timeout == 0 && other == 0 && ok + reset == 300,
        "want every client echoed or reset at once, some of each\n{}",
        out.describe()
    );
    // Every reset client was refused by rnat and counted where `rnat ps --json` shows it.
    let (inst, ps) = r.instance_json("fds");
    let refused = inst["port_stats"]["refused"].as_u64();
    assert!(
        refused.is_some_and(|n| n >= u64::from(reset)) && inst["link_stats"]["udp_dropped"] == 0,
        "want at least {reset} refusals counted and the link's counters shown\n{}",
        ps.describe()
    );
    // Descriptors come back as those connections end: a new client is served.
    wait_answer(&r.t, &r.t.c, H_CLIENT_SIDE_IP, 8083);
    stop(&mut bg);
}
