//! Rootless Podman 4.3 with rnat as its slirp4netns (`network_cmd_path`), both port handlers.
//!
//! A user `rnat-podman` (with subordinate ids, made by the set-up) runs podman inside the
//! test's host namespace H, in a private mount namespace (crun refuses this VM's hybrid cgroup
//! layout, so the cgroup2 mount is hidden there; Podman's lock segment gets a private /dev/shm).
//! Podman's whole state lives in the topology's scratch directory. The container (a busybox root
//! filesystem) reaches a server in U, serves a page and a CGI that prints the client's address,
//! and is reached from C (external) and from H's loopback.

use std::os::unix::fs::{symlink, PermissionsExt};
use std::process::Command;
use std::time::Duration;

use crate::harness::{Topology, C_IP, H_CLIENT_SIDE_IP, U_IP};
use crate::procs;
use crate::rnat::RNAT;

const USER: &str = "rnat-podman";

fn prepare_user() {
    crate::fixtures::ensure_user(USER, true);
    crate::fixtures::open_tun_to_all();
}

fn chown_r(path: &std::path::Path) {
    let out = Command::new("chown")
        .args(["-R", &format!("{USER}:{USER}")])
        .arg(path)
        .output()
        .expect("chown");
    assert!(
        out.status.success(),
        "chown: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Podman's private state, configuration, rnat as `slirp4netns`, and a busybox root filesystem.
fn write_podman_dir(t: &Topology) -> std::path::PathBuf {
    let dir = t.work_path("podman");
    let root = dir.join("rootfs");
    for d in [
        "bin",
        "etc",
        "proc",
        "sys",
        "dev",
        "tmp",
        "www/cgi-bin",
        "xdg",
    ] {
        std::fs::create_dir_all(root.join(d)).expect("mkdir");
    }
    std::fs::copy("/bin/busybox", root.join("bin/busybox")).expect("copy busybox");
    for a in ["sh", "nc", "httpd", "echo", "cat", "sleep", "ip"] {
        symlink("busybox", root.join("bin").join(a)).expect("symlink");
    }
    std::fs::write(root.join("www/index.html"), "page-from-container\n").expect("page");
    let cgi = root.join("www/cgi-bin/peer");
    std::fs::write(
        &cgi,
        "#!/bin/sh\necho 'Content-Type: text/plain'\necho\necho \"peer=$REMOTE_ADDR\"\n",
    )
    .expect("cgi");
    std::fs::set_permissions(&cgi, std::fs::Permissions::from_mode(0o755)).expect("chmod cgi");
    // Podman finds its features in `slirp4netns --help`: the binary is rnat under that name.
    let bin = dir.join("slirp4netns");
    std::fs::copy(RNAT, &bin).expect("copy rnat");
    std::fs::set_permissions(&bin, std::fs::Permissions::from_mode(0o755)).expect("chmod rnat");
    let d = dir.display();
    std::fs::write(
        dir.join("containers.conf"),
        format!(
            "[containers]\ndefault_ulimits = [\"nofile=20000:20000\", \"nproc=32768:32768\"]\n\
             [engine]\ncgroup_manager = \"cgroupfs\"\nevents_logger = \"file\"\nevents_logfile_path = \"{d}/events.log\"\n\
             runtime = \"crun\"\nnetwork_cmd_path = \"{d}/slirp4netns\"\n\
             tmp_dir = \"{d}/tmp\"\nstatic_dir = \"{d}/static\"\nvolume_path = \"{d}/volumes\"\n"
        ),
    )
    .expect("containers.conf");
    std::fs::write(
        dir.join("storage.conf"),
        format!("[storage]\ndriver = \"vfs\"\nrunroot = \"{d}/runroot\"\ngraphroot = \"{d}/graphroot\"\n"),
    )
    .expect("storage.conf");
    chown_r(&dir);
    dir
}

/// Runs `podman run` with HANDLER publishing HOST_PORT in a private mount namespace in H, and
/// meanwhile the clients; returns what the clients printed.
fn run_with_handler(
    t: &Topology,
    dir: &std::path::Path,
    handler: &str,
    host_port: u16,
) -> procs::Finished {
    let d = dir.display();
    let network = match handler {
        "slirp4netns" => "slirp4netns:port_handler=slirp4netns".to_string(),
        _ => "slirp4netns".to_string(),
    };
    let ctr =
        format!("echo hello | nc {U_IP} 7777 > /www/outbound.txt; ping -6 -c 1 -W 3 fd00::2 >/dev/null 2>&1 && echo ipv6-ok > /www/ipv6.txt; httpd -p 80 -h /www; sleep 25");
    let get = |path: &str| format!("printf 'GET {path} HTTP/1.0\\r\\n\\r\\n'");
    let script = format!(
        "set -u\n\
         umount /sys/fs/cgroup/unified 2>/dev/null\n\
         mount -t tmpfs tmpfs /dev/shm\n\
         export HOME=/home/{USER} XDG_RUNTIME_DIR={d}/xdg CONTAINERS_CONF={d}/containers.conf CONTAINERS_STORAGE_CONF={d}/storage.conf\n\
         chmod 700 {d}/xdg\n\
         setpriv --reuid {USER} --regid {USER} --init-groups podman run --rm --name rl-{handler} --network {network} -p {host_port}:80 --rootfs {d}/rootfs /bin/sh -c '{ctr}' >{d}/podman-{handler}.log 2>&1 &\n\
         P=$!\n\
         ok=''\n\
         for i in $(seq 1 60); do\n\
           if {get} | socat -T2 - TCP:127.0.0.1:{host_port} 2>/dev/null | grep -q page-from-container; then ok=1; break; fi\n\
           sleep 0.5\n\
         done\n\
         [ -n \"$ok\" ] || {{ echo 'published port never answered'; cat {d}/podman-{handler}.log; }}\n\
         echo \"loopback: $({get} | socat -T3 - TCP:127.0.0.1:{host_port} | tail -1)\"\n\
         echo \"external: $(ip netns exec {c} sh -c \"{get_q} | socat -T3 - TCP:{H_CLIENT_SIDE_IP}:{host_port}\" | tail -1)\"\n\
         echo \"outbound: $({get_out} | socat -T3 - TCP:127.0.0.1:{host_port} | tail -1)\"\n\
         echo \"ipv6: $({get_v6} | socat -T3 - TCP:127.0.0.1:{host_port} | tail -1)\"\n\
         echo \"peer: $(ip netns exec {c} sh -c \"{get_peer} | socat -T3 - TCP:{H_CLIENT_SIDE_IP}:{host_port}\" | tail -1)\"\n\
         setpriv --reuid {USER} --regid {USER} --init-groups podman rm -f -t 0 rl-{handler} >/dev/null 2>&1\n\
         wait $P\n\
         true\n",
        c = t.c,
        get = get("/index.html"),
        get_q = get("/index.html").replace('"', "\\\""),
        get_out = get("/outbound.txt"),
        get_v6 = get("/ipv6.txt"),
        get_peer = get("/cgi-bin/peer").replace('"', "\\\""),
    );
    let mut cmd = Command::new("nsenter");
    cmd.arg(format!("--net=/run/netns/{}", t.h)).args([
        "unshare",
        "--mount",
        "--propagation",
        "slave",
        "sh",
        "-c",
        &script,
    ]);
    procs::run_bounded(cmd, None, Duration::from_secs(150))
}

#[test]
fn rootless_podman_runs_with_rnat_as_slirp4netns_with_both_port_handlers() {
    let t = match Topology::with_prefix("rnp", "podman_rootless") {
        Some(t) => t,
        None => return,
    };
    if !std::path::Path::new("/usr/bin/podman").exists() {
        crate::harness::skip_or_fail(
            "podman_rootless",
            "podman is not installed (scripts/podman-deps.sh)",
        );
        return;
    }
    prepare_user();
    let dir = write_podman_dir(&t);
    let _upstream = t.server(
        &t.u,
        &[
            "socat".into(),
            "TCP-LISTEN:7777,reuseaddr,fork".into(),
            "SYSTEM:'read l; echo outbound-ok'".into(),
        ],
        "tcp",
        7777,
    );
    for (handler, port) in [("slirp4netns", 8095u16), ("rootlessport", 8096)] {
        let out = run_with_handler(&t, &dir, handler, port);
        let text = out.stdout_str();
        let line = |k: &str| {
            text.lines()
                .find_map(|l| l.strip_prefix(k))
                .unwrap_or("")
                .trim()
                .to_string()
        };
        assert_eq!(
            line("loopback:"),
            "page-from-container",
            "{handler}: loopback client\n{}",
            out.describe()
        );
        assert_eq!(
            line("external:"),
            "page-from-container",
            "{handler}: external client\n{}",
            out.describe()
        );
        assert_eq!(
            line("outbound:"),
            "outbound-ok",
            "{handler}: the container reached U\n{}",
            out.describe()
        );
        // Podman asks for IPv6 by default (`--enable-ipv6`): the container has it.
        assert_eq!(
            line("ipv6:"),
            "ipv6-ok",
            "{handler}: the container pinged fd00::2\n{}",
            out.describe()
        );
        if handler == "slirp4netns" {
            // busybox httpd listens on IPv6 and prints IPv4 clients v4-mapped.
            let peer = line("peer:");
            assert!(
                peer == format!("peer={C_IP}") || peer == format!("peer=[::ffff:{C_IP}]"),
                "the container sees the external client, not {peer:?}\n{}",
                out.describe()
            );
        }
    }
}
