//! The `Topology` harness: three network namespaces wired together, plus a
//! Drop guard that removes everything the test created, even on panic.
//!
//! ```text
//!        U (upstream, "the internet")             C (external client)
//!        h0 198.51.100.2/24                        h0 203.0.113.2/24
//!            |                                         |
//!        up0 198.51.100.1/24 ---- H (host) ---- cl0 203.0.113.1/24
//!                         default via 198.51.100.2
//! ```
//!
//! rnat runs in H; containers hang off H's bridge in 192.0.2.0/24.
//! Nothing here touches the root namespace's links, routes, sysctls or
//! firewall: links are created with `ip -n H ... peer ... netns U`, so even
//! the veth peers are born inside our namespaces.

use std::collections::HashSet;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Mutex, OnceLock};
use std::time::Duration;

use crate::fixtures::as_strs;
use crate::procs::{self, BgProc, Finished, Tracked, FG_TIMEOUT};

pub const H_UPLINK_IP: &str = "198.51.100.1";
pub const U_IP: &str = "198.51.100.2";
pub const H_CLIENT_SIDE_IP: &str = "203.0.113.1";
pub const C_IP: &str = "203.0.113.2";

/// Every namespace name this process created and has not deleted yet.
/// Commands (and rnat in particular) are only ever run inside these.
fn registry() -> &'static Mutex<HashSet<String>> {
    static REG: OnceLock<Mutex<HashSet<String>>> = OnceLock::new();
    REG.get_or_init(|| Mutex::new(HashSet::new()))
}

fn is_registered(ns: &str) -> bool {
    registry()
        .lock()
        .expect("namespace registry poisoned")
        .contains(ns)
}

static COUNTER: AtomicUsize = AtomicUsize::new(0);

/// Effective UID from /proc/self/status (std has no geteuid).
pub fn euid() -> u32 {
    let status = std::fs::read_to_string("/proc/self/status").expect("read /proc/self/status");
    status
        .lines()
        .find_map(|l| l.strip_prefix("Uid:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .expect("parse effective uid from /proc/self/status")
}

/// Set this (to anything) to make a non-root run fail instead of skip.
pub const REQUIRE_ROOT_ENV: &str = "RNAT_NETNS_REQUIRE_ROOT";

/// The only name prefixes a topology may use: `rnt` (rnat CLI tests),
/// `rnc` (CNI tests), `rnp` (Podman test). Other prefixes on this machine
/// belong to somebody else.
pub const PREFIXES: [&str; 3] = ["rnt", "rnc", "rnp"];

/// Why this process cannot run the suite (not root), if it cannot.
pub fn not_root() -> Option<String> {
    let uid = euid();
    (uid != 0).then(|| format!("the netns suite needs root (euid is {uid})"))
}

/// Reports that test LABEL cannot run because of WHY: prints SKIP, or
/// panics when `RNAT_NETNS_REQUIRE_ROOT` is set.
pub fn skip_or_fail(label: &str, why: &str) {
    if std::env::var_os(REQUIRE_ROOT_ENV).is_some() {
        panic!("{label}: {why} and {REQUIRE_ROOT_ENV} is set");
    }
    eprintln!("SKIP {label}: {why}");
}

/// Creates a topology or returns from the test (skips) when not root.
#[macro_export]
macro_rules! topology {
    ($label:expr) => {
        match $crate::harness::Topology::new($label) {
            Some(t) => t,
            None => return,
        }
    };
}

/// Identity of a network namespace (device + inode of its nsfs file).
pub fn netns_identity(path: &Path) -> Option<(u64, u64)> {
    let m = std::fs::metadata(path).ok()?;
    Some((m.dev(), m.ino()))
}

pub struct Topology {
    pub label: String,
    /// One of `PREFIXES`; every name this topology creates starts with it.
    prefix: &'static str,
    /// `<prefix><pid>-<n>`: the stem of all its names.
    base: String,
    /// Host namespace: rnat runs here.
    pub h: String,
    /// Upstream server namespace.
    pub u: String,
    /// External client namespace.
    pub c: String,
    /// Namespaces actually created so far (deleted by Drop).
    created: Mutex<Vec<String>>,
    /// `RNAT_STATE_DIR` for every rnat invocation of this topology.
    pub state_dir: PathBuf,
    /// Scratch files (payloads, configs, outputs).
    pub work_dir: PathBuf,
    /// /etc/netns/<ns> directories this topology created.
    etc_dirs: Mutex<Vec<PathBuf>>,
    /// Processes to kill on teardown (PID + start time).
    tracked: Mutex<Vec<Tracked>>,
    /// Network namespaces of containers observed during the test; any
    /// process still inside one at teardown is killed.
    container_netns: Mutex<Vec<ContainerNs>>,
}

/// A container's network namespace, anchored to a process inside it.
///
/// Namespace inode numbers are recycled as soon as a namespace dies, and
/// other tests create namespaces all the time: an identity alone could later
/// name somebody else's namespace. It is only trusted while the anchor (same
/// PID, same start time) is alive and still inside it, which keeps the
/// namespace, and so its inode number, alive.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct ContainerNs {
    id: (u64, u64),
    anchor: Tracked,
}

impl ContainerNs {
    fn still_valid(&self) -> bool {
        self.anchor.still_same_process()
            && netns_identity(Path::new(&format!("/proc/{}/ns/net", self.anchor.pid)))
                == Some(self.id)
    }
}

/// Panics if PATH is the network namespace the test process runs in.
fn assert_not_test_netns(id: (u64, u64), path: &Path) {
    let own = netns_identity(Path::new("/proc/self/ns/net")).expect("stat /proc/self/ns/net");
    assert_ne!(
        id,
        own,
        "container netns {} is the test's own network namespace!",
        path.display()
    );
}

impl Topology {
    /// Builds H, U, C and their links under the `rnt` prefix. Returns
    /// `None` (after printing why) when not root, so the test can skip.
    pub fn new(label: &str) -> Option<Topology> {
        Topology::with_prefix("rnt", label)
    }

    /// Like `new`, with every name (namespaces, scratch directories)
    /// starting with PREFIX, one of `PREFIXES`.
    pub fn with_prefix(prefix: &'static str, label: &str) -> Option<Topology> {
        assert!(
            PREFIXES.contains(&prefix),
            "topology prefix {prefix:?} is not one of {PREFIXES:?}"
        );
        if let Some(why) = not_root() {
            skip_or_fail(label, &why);
            return None;
        }
        let n = COUNTER.fetch_add(1, Ordering::SeqCst);
        // The '-' keeps (pid, n) pairs from colliding, e.g. 12|34 vs 123|4.
        let base = format!("{prefix}{}-{n}", std::process::id());
        let tmp = std::env::temp_dir();
        let topo = Topology {
            label: label.to_string(),
            prefix,
            h: format!("{base}h"),
            u: format!("{base}u"),
            c: format!("{base}c"),
            created: Mutex::new(Vec::new()),
            state_dir: tmp.join(format!("{base}-state")),
            work_dir: tmp.join(format!("{base}-work")),
            base,
            etc_dirs: Mutex::new(Vec::new()),
            tracked: Mutex::new(Vec::new()),
            container_netns: Mutex::new(Vec::new()),
        };
        // From here on, a panic drops `topo`, which undoes partial setup.
        topo.build();
        eprintln!(
            "[{label}] topology ready: H={} U={} C={}",
            topo.h, topo.u, topo.c
        );
        Some(topo)
    }

    fn build(&self) {
        for dir in [&self.state_dir, &self.work_dir] {
            std::fs::create_dir(dir).unwrap_or_else(|e| panic!("create {}: {e}", dir.display()));
        }
        for ns in [&self.h, &self.u, &self.c] {
            self.create_ns(ns);
        }
        let (h, u, c) = (&self.h, &self.u, &self.c);
        // Link names are short and never start with "rv" (rnat's prefix);
        // the veth peers are born inside our namespaces.
        for (dev, peer_ns) in [("up0", u), ("cl0", c)] {
            self.ip(
                h,
                &[
                    "link", "add", dev, "type", "veth", "peer", "name", "h0", "netns", peer_ns,
                ],
            );
        }
        for (ns, ip, dev) in [
            (h, H_UPLINK_IP, "up0"),
            (u, U_IP, "h0"),
            (h, H_CLIENT_SIDE_IP, "cl0"),
            (c, C_IP, "h0"),
        ] {
            self.ip(ns, &["addr", "add", &format!("{ip}/24"), "dev", dev]);
            self.ip(ns, &["link", "set", dev, "up"]);
        }
        self.ip(h, &["route", "add", "default", "via", U_IP]);
    }

    /// `ip netns add NS` (refusing an existing or foreign name), registered
    /// at once, loopback up.
    fn create_ns(&self, ns: &str) {
        assert!(
            ns.starts_with(&self.base),
            "namespace names must start with {}: {ns}",
            self.base
        );
        assert!(
            !Path::new("/run/netns").join(ns).exists(),
            "namespace {ns} already exists; refusing to reuse it"
        );
        host_ip(&["netns", "add", ns]);
        self.created
            .lock()
            .expect("created list poisoned")
            .push(ns.to_string());
        registry()
            .lock()
            .expect("namespace registry poisoned")
            .insert(ns.to_string());
        self.ip(ns, &["link", "set", "lo", "up"]);
    }

    /// Creates one more namespace, named `<base>SUFFIX` (e.g. a container
    /// namespace of the CNI tests), owned and torn down like H, U and C.
    pub fn add_ns(&self, suffix: &str) -> String {
        let ns = format!("{}{suffix}", self.base);
        self.create_ns(&ns);
        ns
    }

    /// Deletes namespace NS now, after killing what runs in it. Refuses
    /// H, U, C and anything this topology did not create.
    pub fn del_ns(&self, ns: &str) {
        self.assert_ours(ns);
        assert!(
            ![&self.h, &self.u, &self.c].contains(&&ns.to_string()),
            "del_ns is for extra namespaces, not {ns}"
        );
        for _ in 0..2 {
            let pids = ns_pids(ns);
            if pids.is_empty() {
                break;
            }
            procs::send_signal("KILL", &pids);
            std::thread::sleep(Duration::from_millis(100));
        }
        host_ip(&["netns", "del", ns]);
        self.created
            .lock()
            .expect("created list poisoned")
            .retain(|n| n != ns);
        registry()
            .lock()
            .expect("namespace registry poisoned")
            .remove(ns);
    }

    /// `ip -n NS ARGS...`, whatever its status. NS must be ours.
    pub fn ip_try(&self, ns: &str, args: &[&str]) -> Finished {
        self.assert_ours(ns);
        let mut full = vec!["-n", ns];
        full.extend_from_slice(args);
        let mut cmd = Command::new("ip");
        cmd.args(&full);
        procs::run_bounded(cmd, None, FG_TIMEOUT)
    }

    /// `ip -n NS ARGS...`, asserting success. NS must be ours.
    pub fn ip(&self, ns: &str, args: &[&str]) -> String {
        let out = self.ip_try(ns, args);
        assert!(
            out.success(),
            "[{}] ip command failed\n{}",
            self.label,
            out.describe()
        );
        out.stdout_str()
    }

    /// Ok if NS is a namespace this topology created (and still owns).
    pub fn check_ours(&self, ns: &str) -> Result<(), String> {
        let mine = self
            .created
            .lock()
            .expect("created list poisoned")
            .iter()
            .any(|n| n == ns);
        if ns.starts_with(self.prefix) && is_registered(ns) && mine {
            Ok(())
        } else {
            Err(format!(
                "refusing to act on namespace {ns:?}: it was not created by this topology ({})",
                self.label
            ))
        }
    }

    fn assert_ours(&self, ns: &str) {
        if let Err(msg) = self.check_ours(ns) {
            panic!("{msg}");
        }
    }

    /// `ip netns exec NS PROGRAM ARGS...` as a Command, for customisation.
    pub fn ns_command(&self, ns: &str, argv: &[&str]) -> Command {
        self.assert_ours(ns);
        assert!(!argv.is_empty(), "empty argv for namespace {ns}");
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", ns]).args(argv);
        cmd
    }

    /// Runs a command in NS to completion (bounded), whatever its status.
    pub fn exec(&self, ns: &str, argv: &[&str]) -> Finished {
        procs::run_bounded(self.ns_command(ns, argv), None, FG_TIMEOUT)
    }

    /// Runs a command in NS with stdin and an explicit time bound.
    pub fn exec_input(&self, ns: &str, argv: &[&str], input: &[u8], timeout: Duration) -> Finished {
        procs::run_bounded(self.ns_command(ns, argv), Some(input), timeout)
    }

    /// Runs a command in NS and returns its stdout; panics if it failed.
    pub fn exec_ok(&self, ns: &str, argv: &[&str]) -> String {
        let out = self.exec(ns, argv);
        assert!(
            out.success(),
            "[{}] command failed in {ns}\n{}",
            self.label,
            out.describe()
        );
        out.stdout_str()
    }

    /// Starts a long-running process in NS, tracked by the teardown guard.
    pub fn spawn(&self, ns: &str, argv: &[&str]) -> BgProc {
        self.spawn_command(self.ns_command(ns, argv))
    }

    /// Starts an already-built command (it must come from `ns_command` or
    /// `rnat_command`, i.e. be confined to one of our namespaces).
    pub fn spawn_command(&self, cmd: Command) -> BgProc {
        let bg = BgProc::spawn(cmd);
        self.track(Tracked {
            pid: bg.pid(),
            start_time: bg.start_time(),
        });
        bg
    }

    /// Starts ARGV in NS (tracked) and waits until it listens on
    /// PROTO/PORT; fails early, with its output, if it exits first.
    pub fn server(&self, ns: &str, argv: &[String], proto: &str, port: u16) -> BgProc {
        let mut bg = self.spawn(ns, &as_strs(argv));
        self.wait_listening_inner(ns, proto, port, Some(&mut bg));
        bg
    }

    /// Adds processes to the kill list of the guard (e.g. orphans left by
    /// a SIGKILLed `rnat run`).
    pub fn track(&self, t: Tracked) {
        self.tracked.lock().expect("tracked list poisoned").push(t);
    }

    /// Tracks PID (e.g. a process a runtime started for the test) if it
    /// still exists, by PID and start time.
    pub fn track_pid(&self, pid: u32) {
        if let Some(st) = procs::proc_stat(pid) {
            self.track(Tracked {
                pid,
                start_time: st.start_time,
            });
        }
    }

    /// Remembers the network namespace PATH of a container whose process
    /// PID lives in it, so that any process left in it is killed at
    /// teardown. Refuses the namespace the test runs in.
    pub fn note_container_netns(&self, pid: u32, path: &Path) {
        let Some(id) = netns_identity(path) else {
            return;
        };
        assert_not_test_netns(id, path);
        let Some(st) = procs::proc_stat(pid) else {
            return;
        };
        let entry = ContainerNs {
            id,
            anchor: Tracked {
                pid,
                start_time: st.start_time,
            },
        };
        if !entry.still_valid() {
            return; // PID is not (or no longer) inside that namespace
        }
        let mut known = self
            .container_netns
            .lock()
            .expect("container netns poisoned");
        if !known.contains(&entry) {
            known.push(entry);
        }
    }

    /// Runs a read-only inspection command (e.g. `ss`) inside a container's
    /// network namespace given as a path such as /proc/PID/ns/net.
    pub fn exec_in_container_netns(&self, netns: &str, argv: &[&str]) -> Finished {
        let path = Path::new(netns);
        if let Some(id) = netns_identity(path) {
            assert_not_test_netns(id, path);
        } else {
            return Finished {
                status: None,
                stdout: Vec::new(),
                stderr: format!("netns path {netns} does not exist").into_bytes(),
                cmdline: format!("nsenter --net={netns} {}", argv.join(" ")),
            };
        }
        let mut cmd = Command::new("nsenter");
        cmd.arg(format!("--net={netns}")).args(argv);
        procs::run_bounded(cmd, None, FG_TIMEOUT)
    }

    /// Sets a (namespaced) sysctl inside NS if the key exists there;
    /// returns whether it did. Never used on the root namespace.
    pub fn set_sysctl_if_present(&self, ns: &str, key: &str, value: &str) -> bool {
        let path = format!("/proc/sys/{}", key.replace('.', "/"));
        if !self.exec(ns, &["test", "-e", &path]).success() {
            return false;
        }
        self.exec_ok(ns, &["sysctl", "-q", "-w", &format!("{key}={value}")]);
        true
    }

    /// Writes /etc/netns/NS/FILE (e.g. resolv.conf); `ip netns exec NS`
    /// bind-mounts it over /etc/FILE. The directory is removed by Drop.
    pub fn write_etc_netns(&self, ns: &str, file: &str, contents: &str) {
        self.assert_ours(ns);
        let dir = Path::new("/etc/netns").join(ns);
        if !dir.exists() {
            std::fs::create_dir_all(&dir)
                .unwrap_or_else(|e| panic!("create {}: {e}", dir.display()));
            self.etc_dirs
                .lock()
                .expect("etc dirs poisoned")
                .push(dir.clone());
        }
        let path = dir.join(file);
        std::fs::write(&path, contents).unwrap_or_else(|e| panic!("write {}: {e}", path.display()));
    }

    /// Writes a scratch file and returns its absolute path.
    pub fn work_file(&self, name: &str, contents: &[u8]) -> PathBuf {
        let path = self.work_dir.join(name);
        std::fs::write(&path, contents).unwrap_or_else(|e| panic!("write {}: {e}", path.display()));
        path
    }

    /// Path of a scratch file (not created).
    pub fn work_path(&self, name: &str) -> PathBuf {
        self.work_dir.join(name)
    }

    /// Waits (bounded) until something in NS listens on PORT.
    /// `proto` is "tcp" or "udp".
    pub fn wait_listening(&self, ns: &str, proto: &str, port: u16) {
        self.wait_listening_inner(ns, proto, port, None);
    }

    /// `wait_listening`, failing early if SERVER (when given) exits.
    fn wait_listening_inner(
        &self,
        ns: &str,
        proto: &str,
        port: u16,
        mut server: Option<&mut BgProc>,
    ) {
        let flag = ss_flag(proto);
        let filter = format!("sport = :{port}");
        let ok = procs::poll(|| {
            if let Some(bg) = server.as_deref_mut() {
                assert!(
                    bg.exited().is_none(),
                    "[{}] server in {ns} exited\n{}",
                    self.label,
                    bg.describe_now()
                );
            }
            let out = self.exec(ns, &["ss", "-Hn", flag, &filter]);
            (out.success() && !out.stdout.is_empty()).then_some(())
        });
        assert!(
            ok.is_some(),
            "[{}] nothing started listening on {proto} port {port} in {ns}",
            self.label
        );
    }

    /// Waits (bounded) until a TCP connection from NS to ADDR:PORT is accepted.
    pub fn wait_tcp_accepts(&self, ns: &str, addr: &str, port: u16) {
        let target = format!("TCP:{addr}:{port},connect-timeout=1");
        let mut last = None;
        let ok = procs::poll(|| {
            let out = self.exec(ns, &["socat", "-u", "/dev/null", &target]);
            let ok = out.success();
            last = Some(out);
            ok.then_some(())
        });
        if ok.is_none() {
            panic!(
                "[{}] {addr}:{port} never accepted a TCP connection from {ns}\nlast attempt:\n{}",
                self.label,
                last.map(|o| o.describe()).unwrap_or_default()
            );
        }
    }

    /// Names of all links in NS.
    pub fn links(&self, ns: &str) -> Vec<String> {
        let json = self.ip(ns, &["-j", "link", "show"]);
        let v: serde_json::Value = serde_json::from_str(&json).expect("`ip -j link show` is JSON");
        v.as_array()
            .expect("`ip -j link show` is an array")
            .iter()
            .filter_map(|l| l.get("ifname")?.as_str().map(str::to_string))
            .collect()
    }

    /// IPv4 addresses (with prefix) configured on DEV in NS.
    pub fn addrs(&self, ns: &str, dev: &str) -> Vec<String> {
        let json = self.ip(ns, &["-j", "-4", "addr", "show", "dev", dev]);
        let v: serde_json::Value = serde_json::from_str(&json).expect("`ip -j addr show` is JSON");
        let mut found = Vec::new();
        for link in v.as_array().into_iter().flatten() {
            for a in link
                .get("addr_info")
                .and_then(|a| a.as_array())
                .into_iter()
                .flatten()
            {
                if let (Some(ip), Some(len)) =
                    (a.get("local").and_then(|x| x.as_str()), a.get("prefixlen"))
                {
                    found.push(format!("{ip}/{len}"));
                }
            }
        }
        found
    }

    /// `nft -j list ruleset` in H, parsed.
    pub fn nft_ruleset_json(&self) -> serde_json::Value {
        let out = self.exec_ok(&self.h, &["nft", "-j", "list", "ruleset"]);
        serde_json::from_str(&out)
            .unwrap_or_else(|e| panic!("nft -j output is not JSON: {e}\n{out}"))
    }

    /// `nft list ruleset` in H, as text.
    pub fn nft_ruleset_text(&self) -> String {
        self.exec_ok(&self.h, &["nft", "list", "ruleset"])
    }

    /// Every PID that should die at teardown: tracked processes, members
    /// of our namespaces and of the container namespaces we saw, the
    /// EXTRA roots a wrapping rig proves are its own, and all their
    /// descendants.
    fn doomed_pids(&self, extra: &[u32]) -> Vec<u32> {
        let mut roots: Vec<u32> = self
            .tracked
            .lock()
            .map(|t| t.clone())
            .unwrap_or_default()
            .into_iter()
            .filter(Tracked::still_same_process)
            .map(|t| t.pid)
            .collect();
        roots.extend_from_slice(extra);
        // Anything living inside our own namespaces.
        let created = self.created.lock().map(|c| c.clone()).unwrap_or_default();
        for ns in &created {
            roots.extend(ns_pids(ns));
        }
        // Anything living inside a container namespace we saw, if that
        // namespace provably still exists (see `ContainerNs`).
        let netns: HashSet<(u64, u64)> = self
            .container_netns
            .lock()
            .map(|n| n.clone())
            .unwrap_or_default()
            .into_iter()
            .filter(ContainerNs::still_valid)
            .map(|n| n.id)
            .collect();
        if !netns.is_empty() {
            for pid in procs::all_pids() {
                if let Some(id) = netns_identity(Path::new(&format!("/proc/{pid}/ns/net"))) {
                    if netns.contains(&id) {
                        roots.push(pid);
                    }
                }
            }
        }
        let mut pids = roots.clone();
        for r in roots {
            pids.extend(procs::descendants(r));
        }
        let me = std::process::id();
        pids.retain(|&p| p != me && p > 1);
        pids.sort_unstable();
        pids.dedup();
        pids
    }

    /// SIGKILLs every doomed PID (see `doomed_pids`; EXTRA is re-evaluated
    /// each round), twice: the first round may expose orphans. Must not
    /// panic (it runs during unwinding).
    pub fn kill_doomed(&self, extra: &dyn Fn() -> Vec<u32>) {
        for _ in 0..2 {
            let pids = self.doomed_pids(&extra());
            if pids.is_empty() {
                break;
            }
            procs::send_signal("KILL", &pids);
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

impl Drop for Topology {
    fn drop(&mut self) {
        // 1. Kill processes (twice: the first round may have exposed orphans).
        self.kill_doomed(&Vec::new);
        // 2. Delete our namespaces.
        let created = std::mem::take(&mut *self.created.lock().unwrap_or_else(|p| p.into_inner()));
        for ns in &created {
            if !ns.starts_with(&self.base) || !PREFIXES.contains(&self.prefix) {
                // Never happens with names built by `with_prefix`.
                eprintln!(
                    "[{}] teardown: not deleting {ns}: not a {}* name",
                    self.label, self.base
                );
                continue;
            }
            let out = procs::run_bounded(
                {
                    let mut c = Command::new("ip");
                    c.args(["netns", "del", ns]);
                    c
                },
                None,
                Duration::from_secs(10),
            );
            if !out.success() {
                eprintln!(
                    "[{}] teardown: could not delete netns {ns}\n{}",
                    self.label,
                    out.describe()
                );
            }
            if let Ok(mut reg) = registry().lock() {
                reg.remove(ns);
            }
        }
        // 3. Remove /etc/netns/<ns> and scratch directories.
        let etc = std::mem::take(&mut *self.etc_dirs.lock().unwrap_or_else(|p| p.into_inner()));
        for dir in etc.iter().chain([&self.state_dir, &self.work_dir]) {
            if dir.exists() {
                if let Err(e) = std::fs::remove_dir_all(dir) {
                    eprintln!(
                        "[{}] teardown: could not remove {}: {e}",
                        self.label,
                        dir.display()
                    );
                }
            }
        }
    }
}

/// PIDs inside namespace NS (`ip netns pids`), never our own or init.
fn ns_pids(ns: &str) -> Vec<u32> {
    let mut cmd = Command::new("ip");
    cmd.args(["netns", "pids", ns]);
    let out = procs::run_bounded(cmd, None, Duration::from_secs(10));
    let me = std::process::id();
    out.stdout_str()
        .split_whitespace()
        .filter_map(|p| p.parse::<u32>().ok())
        .filter(|&p| p != me && p > 1)
        .collect()
}

/// The `ss` flag listing listeners of PROTO ("tcp" or "udp").
pub fn ss_flag(proto: &str) -> &'static str {
    match proto {
        "tcp" => "-lt",
        "udp" => "-lu",
        other => panic!("unknown protocol {other:?} (expected tcp or udp)"),
    }
}

/// `ip ARGS...` as invoked by the harness itself, asserting success. Only
/// called with `netns add/del NAME` or `-n NAME ...` for our own names.
fn host_ip(args: &[&str]) -> String {
    let mut cmd = Command::new("ip");
    cmd.args(args);
    let out = procs::run_bounded(cmd, None, FG_TIMEOUT);
    assert!(out.success(), "ip command failed\n{}", out.describe());
    out.stdout_str()
}

/// True if the named namespace is still present in /run/netns or `ip netns list`.
pub fn netns_exists(ns: &str) -> bool {
    if Path::new("/run/netns").join(ns).exists() {
        return true;
    }
    let mut cmd = Command::new("ip");
    cmd.args(["netns", "list"]);
    let out = procs::run_bounded(cmd, None, FG_TIMEOUT);
    out.stdout_str()
        .lines()
        .any(|l| l.split_whitespace().next() == Some(ns))
}
