//! The rig of the CNI tests: `harness::Topology`'s wiring (H, U, C, same
//! addresses) under this suite's own prefix, plus container namespaces,
//! all named `rnc<pid>-<n>…` and all registered with one Drop guard.
//!
//! ```text
//!   U h0 198.51.100.2 ── up0 198.51.100.1  H  cl0 203.0.113.1 ── h0 203.0.113.2 C
//!                                          │ (rnat's bridge, made by ADD)
//!                          container namespaces rnc<pid>-<n>k<k>: eth0 from ADD
//! ```
//!
//! Every command runs through `ip netns exec NS` or `ip -n NS` with NS
//! checked against the namespaces this rig created; processes are tracked
//! by PID and start time. Teardown (also on panic) kills what runs in the
//! rig's namespaces, deletes them and removes the scratch directories.
//! The pure parts are shared with the harness: `procs`, the `readback`
//! parsers and the `fixtures` argv builders and byte comparisons.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;
use std::time::Duration;

use serde_json::Value;

use crate::fixtures::{as_strs, assert_same_bytes};
use crate::harness::{euid, C_IP, H_CLIENT_SIDE_IP, H_UPLINK_IP, REQUIRE_ROOT_ENV, U_IP};
use crate::procs::{self, BgProc, Finished, Tracked};
use crate::readback::{collect_allocations, parse_pub_maps, PubMaps};

/// Every namespace and scratch directory of this suite starts with this.
pub const PREFIX: &str = "rnc";
/// Bound on a foreground command (plugin calls have their own).
const FG: Duration = Duration::from_secs(20);

static COUNTER: AtomicUsize = AtomicUsize::new(0);

pub struct Rig {
    pub label: String,
    /// Host namespace: rnat (and the other plugins) run here.
    pub h: String,
    /// Upstream server namespace.
    pub u: String,
    /// External client namespace.
    pub c: String,
    base: String,
    /// Namespaces created and not deleted yet.
    created: Mutex<Vec<String>>,
    /// Counter of container namespaces.
    next_ns: AtomicUsize,
    /// rnat's `stateDir` for this test.
    pub state_dir: PathBuf,
    /// Scratch files (other plugins' data directories, fresh state dirs).
    pub work_dir: PathBuf,
    tracked: Mutex<Vec<Tracked>>,
}

impl Rig {
    /// Builds H, U and C, or returns `None` (after printing why) when not
    /// root, unless `RNAT_NETNS_REQUIRE_ROOT` is set.
    pub fn new(label: &str) -> Option<Rig> {
        let uid = euid();
        if uid != 0 {
            if std::env::var_os(REQUIRE_ROOT_ENV).is_some() {
                panic!("{label}: the netns suite needs root (euid is {uid}) and {REQUIRE_ROOT_ENV} is set");
            }
            eprintln!("SKIP {label}: the netns suite needs root (euid is {uid})");
            return None;
        }
        let n = COUNTER.fetch_add(1, Ordering::SeqCst);
        let base = format!("{PREFIX}{}-{n}", std::process::id());
        let tmp = std::env::temp_dir();
        let rig = Rig {
            label: label.to_string(),
            h: format!("{base}h"),
            u: format!("{base}u"),
            c: format!("{base}c"),
            created: Mutex::new(Vec::new()),
            next_ns: AtomicUsize::new(0),
            state_dir: tmp.join(format!("{base}-state")),
            work_dir: tmp.join(format!("{base}-work")),
            base,
            tracked: Mutex::new(Vec::new()),
        };
        // A panic from here on drops `rig`, which undoes partial setup.
        rig.build();
        eprintln!("[{label}] rig ready: H={} U={} C={}", rig.h, rig.u, rig.c);
        Some(rig)
    }

    fn build(&self) {
        for dir in [&self.state_dir, &self.work_dir] {
            std::fs::create_dir(dir).unwrap_or_else(|e| panic!("create {}: {e}", dir.display()));
        }
        for ns in [&self.h, &self.u, &self.c] {
            self.create_ns(ns);
        }
        let (h, u, c) = (&self.h, &self.u, &self.c);
        // Link names never start with "rv" (rnat's prefix); the peers are
        // born inside our namespaces.
        self.ip(
            h,
            &[
                "link", "add", "up0", "type", "veth", "peer", "name", "h0", "netns", u,
            ],
        );
        self.ip(
            h,
            &[
                "link", "add", "cl0", "type", "veth", "peer", "name", "h0", "netns", c,
            ],
        );
        self.ip(
            h,
            &["addr", "add", &format!("{H_UPLINK_IP}/24"), "dev", "up0"],
        );
        self.ip(u, &["addr", "add", &format!("{U_IP}/24"), "dev", "h0"]);
        self.ip(
            h,
            &[
                "addr",
                "add",
                &format!("{H_CLIENT_SIDE_IP}/24"),
                "dev",
                "cl0",
            ],
        );
        self.ip(c, &["addr", "add", &format!("{C_IP}/24"), "dev", "h0"]);
        for (ns, dev) in [(h, "up0"), (h, "cl0"), (u, "h0"), (c, "h0")] {
            self.ip(ns, &["link", "set", dev, "up"]);
        }
        self.ip(h, &["route", "add", "default", "via", U_IP]);
    }

    /// `ip netns add NS` (refusing an existing name), registered at once.
    fn create_ns(&self, ns: &str) {
        assert!(
            ns.starts_with(PREFIX),
            "namespace names must start with {PREFIX}: {ns}"
        );
        assert!(
            !Path::new("/run/netns").join(ns).exists(),
            "namespace {ns} already exists; refusing to reuse it"
        );
        let out = run_ip(&["netns", "add", ns]);
        assert!(out.success(), "{}", out.describe());
        self.created
            .lock()
            .expect("namespace list poisoned")
            .push(ns.to_string());
        self.ip(ns, &["link", "set", "lo", "up"]);
    }

    /// A fresh container namespace (loopback up). Returns its name.
    pub fn netns_add(&self) -> String {
        let k = self.next_ns.fetch_add(1, Ordering::SeqCst);
        let ns = format!("{}k{k}", self.base);
        self.create_ns(&ns);
        ns
    }

    /// Deletes container namespace NS now (killing what runs in it).
    pub fn netns_del(&self, ns: &str) {
        self.assert_ours(ns);
        assert!(
            ![&self.h, &self.u, &self.c].contains(&&ns.to_string()),
            "netns_del is for container namespaces, not {ns}"
        );
        kill_pids_in(ns);
        let out = run_ip(&["netns", "del", ns]);
        assert!(out.success(), "{}", out.describe());
        self.created
            .lock()
            .expect("namespace list poisoned")
            .retain(|n| n != ns);
    }

    fn is_ours(&self, ns: &str) -> bool {
        ns.starts_with(PREFIX)
            && self
                .created
                .lock()
                .expect("namespace list poisoned")
                .iter()
                .any(|n| n == ns)
    }

    fn assert_ours(&self, ns: &str) {
        assert!(
            self.is_ours(ns),
            "[{}] refusing to act on namespace {ns:?}: this rig did not create it",
            self.label
        );
    }

    /// `ip -n NS ARGS...`, whatever its status. NS must be ours.
    pub fn ip_try(&self, ns: &str, args: &[&str]) -> Finished {
        self.assert_ours(ns);
        let mut full = vec!["-n", ns];
        full.extend_from_slice(args);
        run_ip(&full)
    }

    /// `ip -n NS ARGS...`, asserting success; returns stdout.
    pub fn ip(&self, ns: &str, args: &[&str]) -> String {
        let out = self.ip_try(ns, args);
        assert!(out.success(), "[{}] {}", self.label, out.describe());
        out.stdout_str()
    }

    /// `ip netns exec NS ARGV...` as a Command. NS must be ours.
    pub fn command(&self, ns: &str, argv: &[&str]) -> Command {
        self.assert_ours(ns);
        assert!(!argv.is_empty(), "empty argv for namespace {ns}");
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", ns]).args(argv);
        cmd
    }

    /// Runs ARGV in NS to completion (bounded), feeding it INPUT.
    pub fn exec_input(&self, ns: &str, argv: &[&str], input: &[u8]) -> Finished {
        procs::run_bounded(self.command(ns, argv), Some(input), FG)
    }

    /// Runs ARGV in NS and returns its stdout; panics if it failed.
    pub fn exec_ok(&self, ns: &str, argv: &[&str]) -> String {
        let out = procs::run_bounded(self.command(ns, argv), None, FG);
        assert!(
            out.success(),
            "[{}] command failed in {ns}\n{}",
            self.label,
            out.describe()
        );
        out.stdout_str()
    }

    /// Starts ARGV in NS and waits until it listens on PROTO/PORT. The
    /// process is tracked: teardown kills it at the latest.
    pub fn server(&self, ns: &str, argv: &[String], proto: &str, port: u16) -> BgProc {
        let mut bg = BgProc::spawn(self.command(ns, &as_strs(argv)));
        self.tracked
            .lock()
            .expect("tracked list poisoned")
            .push(Tracked {
                pid: bg.pid(),
                start_time: bg.start_time(),
            });
        let flag = match proto {
            "tcp" => "-lt",
            "udp" => "-lu",
            other => panic!("unknown protocol {other:?}"),
        };
        let filter = format!("sport = :{port}");
        let ok = procs::poll(|| {
            assert!(
                bg.exited().is_none(),
                "[{}] server in {ns} exited\n{}",
                self.label,
                bg.describe_now()
            );
            let out = self.exec_input(ns, &["ss", "-Hn", flag, &filter], b"");
            (out.success() && !out.stdout.is_empty()).then_some(())
        });
        assert!(
            ok.is_some(),
            "[{}] nothing listened on {proto}/{port} in {ns}",
            self.label
        );
        bg
    }

    /// Waits (bounded) until a TCP connection from NS to ADDR:PORT is accepted.
    pub fn wait_tcp_accepts(&self, ns: &str, addr: &str, port: u16) {
        let target = format!("TCP:{addr}:{port},connect-timeout=1");
        let mut last = None;
        let ok = procs::poll(|| {
            let out = self.exec_input(ns, &["socat", "-u", "/dev/null", &target], b"");
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

    /// Sends PAYLOAD over TCP from NS to ADDR:PORT, half-closes, and returns
    /// what came back.
    pub fn tcp_exchange(&self, ns: &str, addr: &str, port: u16, payload: &[u8]) -> Finished {
        let target = format!("TCP:{addr}:{port},connect-timeout=2");
        self.exec_input(ns, &["socat", "-t", "5", "-T", "10", "-", &target], payload)
    }

    /// Sends one datagram from NS to ADDR:PORT; returns what came back
    /// within two seconds.
    pub fn udp_exchange(&self, ns: &str, addr: &str, port: u16, payload: &[u8]) -> Finished {
        let target = format!("UDP:{addr}:{port}");
        self.exec_input(ns, &["socat", "-t", "2", "-", &target], payload)
    }

    /// Asserts that a TCP echo through ADDR:PORT from NS returns PAYLOAD exactly.
    pub fn assert_tcp_echo(&self, ns: &str, addr: &str, port: u16, payload: &[u8], what: &str) {
        let out = self.tcp_exchange(ns, addr, port, payload);
        assert!(
            out.success(),
            "[{}] {what}: TCP exchange with {addr}:{port} from {ns} failed\n{}",
            self.label,
            out.describe()
        );
        assert_same_bytes(
            &out.stdout,
            payload,
            &format!(
                "[{}] {what}: TCP echo via {addr}:{port} from {ns}",
                self.label
            ),
        );
    }

    /// Asserts that a UDP echo through ADDR:PORT from NS returns PAYLOAD exactly.
    pub fn assert_udp_echo(&self, ns: &str, addr: &str, port: u16, payload: &[u8], what: &str) {
        let out = self.udp_exchange(ns, addr, port, payload);
        assert!(
            out.success(),
            "[{}] {what}: UDP exchange with {addr}:{port} from {ns} failed\n{}",
            self.label,
            out.describe()
        );
        assert_same_bytes(
            &out.stdout,
            payload,
            &format!(
                "[{}] {what}: UDP echo via {addr}:{port} from {ns}",
                self.label
            ),
        );
    }

    /// Asserts that ADDR:PORT does not answer from NS (refused or timed out,
    /// no byte back).
    pub fn assert_tcp_no_answer(&self, ns: &str, addr: &str, port: u16, what: &str) {
        let out = self.tcp_exchange(ns, addr, port, b"are you there?\n");
        assert!(
            !out.success() && out.stdout.is_empty(),
            "[{}] {what}: {addr}:{port} answered from {ns} but must not\n{}",
            self.label,
            out.describe()
        );
    }

    /// Names of all links in NS.
    pub fn links(&self, ns: &str) -> Vec<String> {
        let v: Value = serde_json::from_str(&self.ip(ns, &["-j", "link", "show"]))
            .expect("`ip -j link show` is JSON");
        v.as_array()
            .into_iter()
            .flatten()
            .filter_map(|l| l["ifname"].as_str().map(str::to_string))
            .collect()
    }

    /// Links in H whose name starts with `rv` (rnat's host veth ends).
    pub fn rv_links(&self) -> BTreeSet<String> {
        self.links(&self.h)
            .into_iter()
            .filter(|l| l.starts_with("rv"))
            .collect()
    }

    /// rnat's pub_any / pub_addr maps as the kernel in H reports them.
    pub fn pub_maps(&self) -> PubMaps {
        let out = self.exec_ok(&self.h, &["nft", "-j", "list", "ruleset"]);
        let v: Value = serde_json::from_str(&out)
            .unwrap_or_else(|e| panic!("nft -j output is not JSON: {e}\n{out}"));
        parse_pub_maps(&v)
    }

    /// (ip, owner) allocations of rnat's IPAM files under `stateDir`
    /// (an unparsable file shows up as an allocation, so it never hides).
    pub fn ipam_allocations(&self) -> BTreeSet<(String, String)> {
        let mut out = BTreeSet::new();
        for file in files_in(&self.state_dir.join("lib").join("ipam")) {
            let name = file_name(&file);
            if name.ends_with(".lock") || name.starts_with('.') {
                continue;
            }
            let text = std::fs::read_to_string(&file).unwrap_or_default();
            match serde_json::from_str::<Value>(&text) {
                Ok(v) => collect_allocations(&v, &mut out),
                Err(_) => {
                    out.insert((format!("{name}: unparsable"), text));
                }
            }
        }
        out
    }

    /// Names of the entries under `stateDir/run/containers`.
    pub fn container_dirs(&self) -> BTreeSet<String> {
        files_in(&self.state_dir.join("run").join("containers"))
            .iter()
            .map(|p| file_name(p))
            .collect()
    }

    /// Path of a scratch file or directory (not created).
    pub fn work_path(&self, name: &str) -> PathBuf {
        self.work_dir.join(name)
    }
}

impl Drop for Rig {
    fn drop(&mut self) {
        // Must not panic (it may run during unwinding).
        let tracked = self.tracked.lock().map(|t| t.clone()).unwrap_or_default();
        let mut pids = Vec::new();
        for t in tracked {
            if t.still_same_process() {
                pids.push(t.pid);
                pids.extend(procs::descendants(t.pid));
            }
        }
        procs::send_signal("KILL", &pids);
        let created = std::mem::take(&mut *self.created.lock().unwrap_or_else(|p| p.into_inner()));
        for ns in &created {
            kill_pids_in(ns);
        }
        for ns in &created {
            if !ns.starts_with(PREFIX) {
                continue; // never happens: create_ns checks it
            }
            let out = run_ip(&["netns", "del", ns]);
            if !out.success() {
                eprintln!(
                    "[{}] teardown: could not delete netns {ns}\n{}",
                    self.label,
                    out.describe()
                );
            }
        }
        for dir in [&self.state_dir, &self.work_dir] {
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

/// SIGKILLs every process inside namespace NS (an `rnc*` name), twice
/// (the first round may expose processes forked meanwhile).
fn kill_pids_in(ns: &str) {
    if !ns.starts_with(PREFIX) {
        return;
    }
    let me = std::process::id();
    for _ in 0..2 {
        let out = run_ip(&["netns", "pids", ns]);
        let pids: Vec<u32> = out
            .stdout_str()
            .split_whitespace()
            .filter_map(|p| p.parse().ok())
            .filter(|&p| p != me && p > 1)
            .collect();
        if pids.is_empty() {
            return;
        }
        procs::send_signal("KILL", &pids);
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn run_ip(args: &[&str]) -> Finished {
    let mut cmd = Command::new("ip");
    cmd.args(args);
    procs::run_bounded(cmd, None, FG)
}

/// Entries of DIR (not recursive, at most 1000), sorted.
fn files_in(dir: &Path) -> Vec<PathBuf> {
    let mut out: Vec<PathBuf> = std::fs::read_dir(dir)
        .map(|rd| rd.flatten().take(1000).map(|e| e.path()).collect())
        .unwrap_or_default();
    out.sort();
    out
}

fn file_name(p: &Path) -> String {
    p.file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default()
}
