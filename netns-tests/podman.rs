//! rnat as the CNI plugin of a real client: rootful Podman 4.3 (Debian)
//! with its CNI backend, a conflist of type `rnat` in a private config.
//!
//! Issue requirement: `podman run -d -p HOSTPORT:80` of a small
//! busybox-rootfs container serves from an external namespace, from the
//! host's address and from 127.0.0.1; the container reaches an upstream
//! namespace with the host's address as source; `podman inspect` shows the
//! container's IP; `podman rm -f` leaves no link, rule, map element or
//! allocation.
//!
//! Everything Podman owns lives in the rig's scratch directory (graphroot,
//! runroot, tmp, static dir, CNI config dir, libcni cache, rnat's
//! `stateDir`), and every podman command runs in one private mount
//! namespace inside H (see `podman::rig`). Needs `scripts/podman-deps.sh`.
//!
//! Run: `CARGO_TARGET_DIR=/tmp/rnt-pod-target cargo test --test netns podman -- --nocapture`
//! (`RNAT_PODMAN_TRACE=1` logs what Podman sends rnat and what it answers).

mod rig;

use std::collections::BTreeSet;
use std::net::Ipv4Addr;
use std::os::unix::fs::symlink;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use crate::fixtures::{peer_addr_server, peer_lines, sh_quote};
use crate::harness::{H_CLIENT_SIDE_IP, H_UPLINK_IP, U_IP};
use crate::procs::{self, Finished, Tracked, FG_TIMEOUT};
use crate::readback::{
    collect_allocations, in_subnet, json_contains_string, parse_pub_maps, MapElem,
};
use crate::rnat::RNAT;
use rig::{Rig, TRACE_ENV};

const NET: &str = "rnp-net";
const BRIDGE: &str = "rnpbr0";
const SUBNET: &str = "192.0.2.0/24";
const GATEWAY: &str = "192.0.2.1";
const CTR: &str = "rnp-web";
const HOST_PORT: u16 = 8080;
const UPSTREAM_PORT: u16 = 7000;
/// Bound for `podman run` (the first run initialises the private storage).
const PODMAN_RUN_TIMEOUT: Duration = Duration::from_secs(60);
const PODMAN_TIMEOUT: Duration = Duration::from_secs(30);

#[test]
fn podman_runs_rnat_as_its_cni_plugin() {
    let Some(mut rig) = Rig::new("podman") else {
        return;
    };
    let started = Instant::now();
    let token = format!("rnp-podman-{}-served", std::process::id());
    let rootfs = write_rootfs(&rig, &token);
    install_plugin(&rig);
    write_configs(&rig);
    rig.start_shell(&prelude(&rig));
    let _upstream = rig.server(
        &rig.u,
        &peer_addr_server("tcp", UPSTREAM_PORT),
        "tcp",
        UPSTREAM_PORT,
    );

    // --- podman run -d -p HOSTPORT:80 ---------------------------------
    let publish = format!("{HOST_PORT}:80");
    let rootfs_s = rootfs.to_string_lossy().into_owned();
    let out = rig.podman(
        &[
            "run",
            "-d",
            "--name",
            CTR,
            "--network",
            NET,
            "-p",
            &publish,
            "--rootfs",
            &rootfs_s,
            "/bin/busybox",
            "httpd",
            "-f",
            "-p",
            "80",
            "-h",
            "/www",
        ],
        PODMAN_RUN_TIMEOUT,
    );
    assert!(out.success(), "podman run failed\n{}", out.describe());
    let cid = out.stdout_str().trim().to_string();
    assert!(
        cid.len() == 64 && cid.bytes().all(|b| b.is_ascii_hexdigit()),
        "podman run -d printed no container id\n{}",
        out.describe()
    );
    eprintln!(
        "[podman] container {cid} started after {:?}",
        started.elapsed()
    );

    // --- podman inspect shows the container's IP -----------------------
    let inspect = inspect(&mut rig, CTR);
    let pid = inspect["State"]["Pid"].as_u64().map(|p| p as u32);
    let conmon = inspect["State"]["ConmonPid"].as_u64().map(|p| p as u32);
    for p in [pid, conmon].into_iter().flatten() {
        rig.track_pid(p);
    }
    let pid = pid
        .filter(|&p| p > 0)
        .unwrap_or_else(|| panic!("no State.Pid in inspect: {inspect:#}"));
    assert_eq!(inspect["Id"], json!(cid), "inspect Id");
    assert_eq!(
        inspect["State"]["Running"],
        json!(true),
        "inspect State.Running"
    );
    let net = &inspect["NetworkSettings"]["Networks"][NET];
    let ip_s = net["IPAddress"]
        .as_str()
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| {
            panic!(
                "podman inspect shows no IPAddress on {NET}: {:#}",
                inspect["NetworkSettings"]
            )
        })
        .to_string();
    let ip: Ipv4Addr = ip_s
        .parse()
        .unwrap_or_else(|e| panic!("inspect IPAddress {ip_s:?}: {e}"));
    assert!(
        in_subnet(ip, SUBNET) && ip_s != GATEWAY,
        "container ip {ip} not a host of {SUBNET}"
    );
    assert_eq!(net["Gateway"], json!(GATEWAY), "inspect Gateway");
    assert_eq!(net["IPPrefixLen"], json!(24), "inspect IPPrefixLen");
    assert_eq!(
        inspect["NetworkSettings"]["Ports"]["80/tcp"][0]["HostPort"],
        json!(HOST_PORT.to_string()),
        "inspect Ports"
    );
    // The kernel agrees: the container's eth0 holds that address.
    let ctr_netns = format!("/proc/{pid}/ns/net");
    let addrs = in_container_netns(
        &ctr_netns,
        &["ip", "-j", "-4", "addr", "show", "dev", "eth0"],
    );
    assert!(
        addrs.contains(&format!("\"{ip_s}\"")),
        "eth0 in the container lacks {ip_s}: {addrs}"
    );

    // --- what rnat made for it -----------------------------------------
    let before = snapshot(&rig, &cid, &ip_s);
    let host_veth = before
        .host_veth
        .clone()
        .unwrap_or_else(|| panic!("libcni cached no result with a host interface: {before:#?}"));
    assert!(
        host_veth.starts_with("rv"),
        "host veth {host_veth:?} is not one of rnat's"
    );
    assert!(
        before.links.contains(&host_veth),
        "host veth {host_veth} missing in H: {before:#?}"
    );
    let master = rig.exec_ok(&rig.h, &["ip", "-j", "link", "show", "dev", &host_veth]);
    assert!(
        master.contains(&format!("\"master\":\"{BRIDGE}\"")),
        "{host_veth} not on {BRIDGE}: {master}"
    );
    assert!(
        before
            .pub_any
            .contains(&MapElem::any("tcp", HOST_PORT, &ip_s, 80)),
        "pub_any lacks tcp . {HOST_PORT} : {ip_s} . 80: {before:#?}"
    );
    assert!(
        before.ipam.iter().any(|(a, _)| *a == ip_s),
        "IPAM has no allocation of {ip_s}: {before:#?}"
    );
    assert!(
        before.mentions_cid_in_records,
        "rnat keeps no record of {cid}: {before:#?}"
    );
    assert!(
        before.rnat_items_mentioning_ip > 0,
        "no nft item mentions {ip_s}: {before:#?}"
    );

    // --- published port: external, host address, loopback -------------
    wait_listening(&ctr_netns, 80);
    let c = rig.c.clone();
    let h = rig.h.clone();
    for (ns, addr, what) in [
        (&c, H_CLIENT_SIDE_IP, "external namespace C"),
        (&h, H_UPLINK_IP, "host's address from H"),
        (&h, "127.0.0.1", "127.0.0.1 in H"),
    ] {
        let out = http_get(&rig, ns, addr, HOST_PORT);
        let body = out.stdout_str();
        assert!(
            out.success()
                && body.starts_with("HTTP/1.")
                && body.contains(" 200 ")
                && body.contains(&token),
            "[podman] {what}: GET http://{addr}:{HOST_PORT}/ did not reach the container\n{}",
            out.describe()
        );
        eprintln!("[podman] {what}: served via {addr}:{HOST_PORT}");
    }

    // --- outbound: upstream sees the host's address --------------------
    let up = format!("{UPSTREAM_PORT}");
    let out = rig.podman(&["exec", CTR, "nc", U_IP, &up], PODMAN_TIMEOUT);
    assert!(
        out.success(),
        "container could not reach U\n{}",
        out.describe()
    );
    assert_eq!(
        peer_lines(&out.stdout_str()),
        vec![H_UPLINK_IP.to_string()],
        "U must see the host's address as source\n{}",
        out.describe()
    );

    // --- podman rm -f leaves nothing -----------------------------------
    let out = rig.podman(&["rm", "-f", "-t", "0", CTR], PODMAN_TIMEOUT);
    assert!(
        out.success() && out.stdout_str().contains(CTR),
        "podman rm -f failed\n{}",
        out.describe()
    );
    for p in [Some(pid), conmon].into_iter().flatten() {
        wait_gone(p);
    }
    let ps = rig.podman_ok(&["ps", "-a", "--format", "json"], PODMAN_TIMEOUT);
    let ps: Value =
        serde_json::from_str(&ps).unwrap_or_else(|e| panic!("podman ps json: {e}\n{ps}"));
    assert_eq!(ps, json!([]), "podman still lists containers");
    let after = snapshot(&rig, &cid, &ip_s);
    assert!(
        after.cni_cache.is_empty(),
        "libcni cache still holds {:?} (no DEL?)",
        after.cni_cache
    );
    let rv: Vec<&String> = after.links.iter().filter(|l| l.starts_with("rv")).collect();
    assert!(
        rv.is_empty(),
        "links left in H after podman rm -f: {rv:?}\n{after:#?}"
    );
    assert!(
        after.bridge_ports.is_empty(),
        "ports left on {BRIDGE}: {:?}",
        after.bridge_ports
    );
    assert!(
        after.routes_to_ip.is_empty(),
        "routes to {ip_s} left in H: {:?}",
        after.routes_to_ip
    );
    assert!(
        after.pub_any.is_empty() && after.pub_addr.is_empty(),
        "map elements left after podman rm -f: {after:#?}"
    );
    assert_eq!(
        after.rnat_items_mentioning_ip, 0,
        "nft rules/elements still mention {ip_s}: {after:#?}"
    );
    assert!(
        after.ipam.is_empty(),
        "allocations left after podman rm -f: {:?}",
        after.ipam
    );
    assert!(
        !after.mentions_cid_in_records,
        "rnat still records {cid}: {after:#?}"
    );
    let gone = rig.sh(
        &format!(
            "test ! -e {}",
            sh_quote(
                inspect["NetworkSettings"]["SandboxKey"]
                    .as_str()
                    .unwrap_or("/nonexistent")
            )
        ),
        PODMAN_TIMEOUT,
    );
    assert!(
        gone.success(),
        "Podman left the container's netns mount\n{}",
        gone.describe()
    );
    rig.close_shell();
    eprintln!("[podman] passed in {:?}", started.elapsed());
}

/// A busybox root filesystem with a page holding TOKEN; returns its path.
fn write_rootfs(rig: &Rig, token: &str) -> std::path::PathBuf {
    let root = rig.work_path("rootfs");
    for d in ["bin", "www", "etc", "tmp", "proc", "sys", "dev"] {
        std::fs::create_dir_all(root.join(d)).expect("create rootfs dirs");
    }
    std::fs::copy("/bin/busybox", root.join("bin/busybox")).expect("copy /bin/busybox");
    let mut cmd = Command::new("/bin/busybox");
    cmd.arg("--list");
    let list = procs::run_bounded(cmd, None, FG_TIMEOUT);
    assert!(list.success(), "busybox --list\n{}", list.describe());
    for applet in list.stdout_str().lines().map(str::trim) {
        if !applet.is_empty() && !applet.contains('/') && applet != "busybox" {
            symlink("busybox", root.join("bin").join(applet)).expect("symlink applet");
        }
    }
    std::fs::write(root.join("www/index.html"), format!("{token}\n")).expect("write index.html");
    std::fs::write(root.join("etc/passwd"), "root:x:0:0:root:/:/bin/sh\n").expect("write passwd");
    std::fs::write(root.join("etc/group"), "root:x:0:\n").expect("write group");
    root
}

/// `rnat install-cni DIR` (rnat itself, as a runtime's installer would);
/// with `RNAT_PODMAN_TRACE` set, a logging wrapper named `rnat` is put in
/// front of the real one.
fn install_plugin(rig: &Rig) {
    let trace = std::env::var_os(TRACE_ENV).is_some();
    let dir = if trace {
        rig.work_path("plugins/real")
    } else {
        rig.work_path("plugins")
    };
    let mut cmd = Command::new(RNAT);
    cmd.arg("install-cni").arg(&dir).env_remove("CNI_COMMAND");
    let out = procs::run_bounded(cmd, None, FG_TIMEOUT);
    assert!(out.success(), "rnat install-cni failed\n{}", out.describe());
    assert!(
        dir.join("rnat").exists(),
        "install-cni put no rnat in {}",
        dir.display()
    );
    if trace {
        let log = sh_quote(&rig.work_path("cni-trace.log").to_string_lossy());
        let real = sh_quote(&dir.join("rnat").to_string_lossy());
        let wrapper = format!(
            "#!/bin/sh\n\
             in=$(cat)\n\
             {{ echo \"=== $(date +%T.%N) $CNI_COMMAND\"; env | grep '^CNI_'; echo \"stdin: $in\"; }} >>{log}\n\
             out=$(printf '%s' \"$in\" | {real}); rc=$?\n\
             echo \"exit $rc, stdout: $out\" >>{log}\n\
             printf '%s\\n' \"$out\"\n\
             exit $rc\n"
        );
        let path = rig.work_path("plugins/rnat");
        std::fs::write(&path, wrapper).expect("write trace wrapper");
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755))
            .expect("chmod wrapper");
    }
}

/// The conflist, containers.conf and storage.conf, all private.
fn write_configs(rig: &Rig) {
    let d = |rel: &str| rig.work_path(rel).to_string_lossy().into_owned();
    for sub in [
        "net.d",
        "cni-cache",
        "graph",
        "run",
        "tmp",
        "static",
        "volumes",
        "state",
    ] {
        std::fs::create_dir_all(rig.work_path(sub)).expect("create podman dirs");
    }
    let conflist = json!({
        "cniVersion": "1.0.0",
        "name": NET,
        "plugins": [{
            "type": "rnat",
            "bridge": BRIDGE,
            "subnet": SUBNET,
            "gateway": GATEWAY,
            "ipMasq": true,
            "stateDir": d("state"),
            "capabilities": {"portMappings": true}
        }]
    });
    std::fs::write(
        rig.work_path(&format!("net.d/{NET}.conflist")),
        format!("{conflist:#}\n"),
    )
    .expect("write conflist");
    // TOML basic strings are JSON strings for these (plain) paths.
    let q = |rel: &str| json!(d(rel)).to_string();
    let containers_conf = format!(
        "[containers]\n\
         default_ulimits = [\"nofile=20000:20000\", \"nproc=32768:32768\"]\n\
         cgroups = \"disabled\"\n\
         [network]\n\
         network_backend = \"cni\"\n\
         cni_plugin_dirs = [{plugins}]\n\
         network_config_dir = {netd}\n\
         default_network = \"{NET}\"\n\
         default_subnet = \"{SUBNET}\"\n\
         [engine]\n\
         cgroup_manager = \"cgroupfs\"\n\
         events_logger = \"file\"\n\
         events_logfile_path = {events}\n\
         runtime = \"crun\"\n\
         tmp_dir = {tmp}\n\
         static_dir = {stat}\n\
         volume_path = {vol}\n",
        plugins = q("plugins"),
        netd = q("net.d"),
        events = q("events.log"),
        tmp = q("tmp"),
        stat = q("static"),
        vol = q("volumes"),
    );
    std::fs::write(rig.work_path("containers.conf"), containers_conf)
        .expect("write containers.conf");
    let storage_conf = format!(
        "[storage]\ndriver = \"vfs\"\nrunroot = {}\ngraphroot = {}\n",
        q("run"),
        q("graph")
    );
    std::fs::write(rig.work_path("storage.conf"), storage_conf).expect("write storage.conf");
}

/// What the Podman shell does first (in its private mount namespace).
fn prelude(rig: &Rig) -> String {
    let p = |rel: &str| sh_quote(&rig.work_path(rel).to_string_lossy());
    format!(
        "set -e\n\
         if mountpoint -q /sys/fs/cgroup/unified; then umount /sys/fs/cgroup/unified; fi\n\
         mkdir -p /var/lib/cni\n\
         mount --bind {cache} /var/lib/cni\n\
         mount -t tmpfs -o mode=0755,size=8m rnp-netns /run/netns\n\
         mount -t tmpfs -o mode=1777,size=64m rnp-shm /dev/shm\n\
         export CONTAINERS_CONF={conf} CONTAINERS_STORAGE_CONF={storage}\n\
         podman --version\n\
         set +e",
        cache = p("cni-cache"),
        conf = p("containers.conf"),
        storage = p("storage.conf"),
    )
}

/// `podman inspect NAME`, the single object.
fn inspect(rig: &mut Rig, name: &str) -> Value {
    let out = rig.podman_ok(&["inspect", name], PODMAN_TIMEOUT);
    let v: Value = serde_json::from_str(&out)
        .unwrap_or_else(|e| panic!("podman inspect is not JSON: {e}\n{out}"));
    v.get(0)
        .cloned()
        .unwrap_or_else(|| panic!("podman inspect returned no object: {v}"))
}

/// Runs a read-only command (ip, ss) in a container's network namespace.
fn in_container_netns(netns: &str, argv: &[&str]) -> String {
    let mut cmd = Command::new("nsenter");
    cmd.arg(format!("--net={netns}")).args(argv);
    let out = procs::run_bounded(cmd, None, FG_TIMEOUT);
    assert!(
        out.success(),
        "command in {netns} failed\n{}",
        out.describe()
    );
    out.stdout_str()
}

fn wait_listening(netns: &str, port: u16) {
    let filter = format!("sport = :{port}");
    let ok = procs::poll(|| {
        (!in_container_netns(netns, &["ss", "-Hltn", &filter])
            .trim()
            .is_empty())
        .then_some(())
    });
    assert!(ok.is_some(), "the container never listened on tcp/{port}");
}

/// GET / over HTTP/1.0 from NS to ADDR:PORT with socat (bounded).
fn http_get(rig: &Rig, ns: &str, addr: &str, port: u16) -> Finished {
    let target = format!("TCP:{addr}:{port},connect-timeout=2");
    let req = format!("GET / HTTP/1.0\r\nHost: {addr}\r\n\r\n");
    rig.exec_input(
        ns,
        &["socat", "-t", "5", "-T", "10", "-", &target],
        req.as_bytes(),
        Duration::from_secs(20),
    )
}

/// Waits (bounded) until PID is gone (or is another process by now).
fn wait_gone(pid: u32) {
    let Some(st) = procs::proc_stat(pid) else {
        return;
    };
    let t = Tracked {
        pid,
        start_time: st.start_time,
    };
    let ok = procs::poll(|| (!t.still_same_process()).then_some(()));
    assert!(ok.is_some(), "process {pid} still runs after podman rm -f");
}

/// What rnat and Podman hold for one container, read back from the kernel
/// (in H) and from disk.
#[derive(Debug)]
struct Snapshot {
    links: BTreeSet<String>,
    bridge_ports: BTreeSet<String>,
    routes_to_ip: Vec<String>,
    pub_any: BTreeSet<MapElem>,
    pub_addr: BTreeSet<MapElem>,
    /// nft rules, maps, sets and elements of table `ip rnat` naming the IP.
    rnat_items_mentioning_ip: usize,
    /// (ip, owner) from rnat's IPAM files.
    ipam: BTreeSet<(String, String)>,
    mentions_cid_in_records: bool,
    /// libcni's cached results for the container (Podman removes it on DEL).
    cni_cache: Vec<String>,
    /// The host interface of the cached ADD result.
    host_veth: Option<String>,
}

fn snapshot(rig: &Rig, cid: &str, ip: &str) -> Snapshot {
    let h = rig.h.clone();
    let links_json: Value =
        serde_json::from_str(&rig.ip(&h, &["-j", "link", "show"])).expect("ip -j link");
    let mut links = BTreeSet::new();
    let mut bridge_ports = BTreeSet::new();
    for l in links_json.as_array().into_iter().flatten() {
        let name = l["ifname"].as_str().unwrap_or_default().to_string();
        if l["master"].as_str() == Some(BRIDGE) {
            bridge_ports.insert(name.clone());
        }
        links.insert(name);
    }
    let routes_json: Value =
        serde_json::from_str(&rig.ip(&h, &["-j", "-4", "route", "show", "table", "all"]))
            .expect("ip -j route");
    let routes_to_ip = routes_json
        .as_array()
        .into_iter()
        .flatten()
        .filter(|r| r["dst"].as_str() == Some(ip))
        .map(Value::to_string)
        .collect();
    let ruleset = rig.nft_ruleset_json();
    let maps = parse_pub_maps(&ruleset);
    let rnat_items_mentioning_ip = ruleset["nftables"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|item| {
            ["rule", "map", "set", "element"]
                .iter()
                .find_map(|k| item.get(*k))
        })
        .filter(|o| o["family"] == json!("ip") && o["table"] == json!("rnat"))
        .filter(|o| json_contains_string(o, ip))
        .count();
    let mut ipam = BTreeSet::new();
    for file in read_dir_files(&rig.work_path("state/lib/ipam")) {
        if file.extension().is_some_and(|e| e == "json") {
            let text = std::fs::read_to_string(&file).unwrap_or_default();
            let v: Value = serde_json::from_str(&text)
                .unwrap_or_else(|e| panic!("{}: {e}\n{text}", file.display()));
            collect_allocations(&v, &mut ipam);
        }
    }
    let mentions_cid_in_records = read_dir_files(&rig.work_path("state/run"))
        .iter()
        .chain(read_dir_files(&rig.work_path("state/run/containers")).iter())
        .any(|f| std::fs::read_to_string(f).is_ok_and(|t| t.contains(cid)));
    let mut cni_cache = Vec::new();
    let mut host_veth = None;
    for file in read_dir_files(&rig.work_path("cni-cache/results")) {
        let name = file
            .file_name()
            .unwrap_or_default()
            .to_string_lossy()
            .into_owned();
        if !name.contains(cid) {
            continue;
        }
        let cached: Value =
            serde_json::from_str(&std::fs::read_to_string(&file).unwrap_or_default())
                .unwrap_or(Value::Null);
        host_veth = cached["result"]["interfaces"]
            .as_array()
            .into_iter()
            .flatten()
            .find(|i| i.get("sandbox").is_none())
            .and_then(|i| i["name"].as_str())
            .map(str::to_string);
        cni_cache.push(name);
    }
    Snapshot {
        links,
        bridge_ports,
        routes_to_ip,
        pub_any: maps.any_elems(),
        pub_addr: maps.addr_elems(),
        rnat_items_mentioning_ip,
        ipam,
        mentions_cid_in_records,
        cni_cache,
        host_veth,
    }
}

/// Regular files directly in DIR (none if it does not exist).
fn read_dir_files(dir: &Path) -> Vec<std::path::PathBuf> {
    let Ok(rd) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    let mut files: Vec<_> = rd
        .flatten()
        .filter(|e| e.file_type().is_ok_and(|t| t.is_file()))
        .map(|e| e.path())
        .collect();
    files.sort();
    files
}
