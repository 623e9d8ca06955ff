//! The rig of the Podman test: its own namespaces (`rnp<pid>-<n>{h,u,c}`,
//! wired like `harness::Topology`), a scratch directory holding every bit of
//! Podman's state, and one long-lived shell in a private mount namespace
//! inside H through which every `podman` command of the test runs.
//!
//! Why one shell: Podman bind-mounts the container's network namespace
//! (`/run/netns/netns-UUID`) and later runs `podman container cleanup`
//! (CNI DEL) from conmon; all of that must happen in one mount namespace.
//! The shell is `nsenter --net=/run/netns/H unshare --mount --propagation
//! slave sh -s`; its prelude hides the cgroup2 mount (crun refuses the VM's
//! hybrid layout), puts private tmpfs mounts over `/run/netns` and
//! `/dev/shm` (Podman's lock segment) and a private directory over
//! `/var/lib/cni` (libcni's cache), and exports `CONTAINERS_CONF` /
//! `CONTAINERS_STORAGE_CONF`. Slave propagation keeps all of it out of the
//! root mount namespace.
//!
//! The Drop guard removes everything, also on panic: `podman rm -f --all`
//! through the shell, then every process it can prove is ours (PID + start
//! time; members of our namespaces and of the private mount namespace),
//! then the namespaces, then the scratch directory.

use std::fs::File;
use std::io::Write;
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use crate::fixtures::sh_quote;
use crate::harness::{
    euid, netns_identity, C_IP, H_CLIENT_SIDE_IP, H_UPLINK_IP, REQUIRE_ROOT_ENV, U_IP,
};
use crate::procs::{self, BgProc, Finished, Tracked, FG_TIMEOUT};

/// Every name this rig creates starts with this.
pub const PREFIX: &str = "rnp";
/// Set to interpose a logging wrapper between Podman and rnat (the log,
/// `cni-trace.log` in the scratch directory, is printed at the end).
pub const TRACE_ENV: &str = "RNAT_PODMAN_TRACE";

static COUNTER: AtomicUsize = AtomicUsize::new(0);

/// True if PROGRAM is an executable file somewhere in PATH.
fn in_path(program: &str) -> bool {
    use std::os::unix::fs::PermissionsExt;
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path).any(|d| {
        std::fs::metadata(d.join(program))
            .is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
    })
}

pub struct Rig {
    pub label: String,
    pub h: String,
    pub u: String,
    pub c: String,
    /// Namespaces created so far (deleted by Drop).
    created: Vec<String>,
    /// Scratch directory: Podman's whole state, the rootfs, rnat's stateDir.
    pub dir: PathBuf,
    /// Processes to kill at teardown (checked by start time first).
    tracked: Vec<Tracked>,
    servers: Vec<BgProc>,
    shell: Option<PodShell>,
}

impl Rig {
    /// Builds H, U, C and the scratch directory, or returns `None` (after
    /// printing why) when not root or when Podman/crun are missing, unless
    /// `RNAT_NETNS_REQUIRE_ROOT` is set, which makes both a failure.
    pub fn new(label: &str) -> Option<Rig> {
        let strict = std::env::var_os(REQUIRE_ROOT_ENV).is_some();
        let uid = euid();
        let missing: Vec<&str> = [
            "podman",
            "crun",
            "conmon",
            "nsenter",
            "unshare",
            "mountpoint",
            "socat",
            "nft",
            "ss",
        ]
        .into_iter()
        .filter(|p| !in_path(p) && !Path::new("/usr/bin").join(p).exists())
        .collect();
        let why = if uid != 0 {
            Some(format!("the netns suite needs root (euid is {uid})"))
        } else if !missing.is_empty() || !Path::new("/bin/busybox").exists() {
            Some(format!(
                "missing {missing:?} or /bin/busybox (run scripts/podman-deps.sh)"
            ))
        } else {
            None
        };
        if let Some(why) = why {
            if strict {
                panic!("{label}: {why} and {REQUIRE_ROOT_ENV} is set");
            }
            eprintln!("SKIP {label}: {why}");
            return None;
        }
        let n = COUNTER.fetch_add(1, Ordering::SeqCst);
        let base = format!("{PREFIX}{}-{n}", std::process::id());
        let mut rig = Rig {
            label: label.to_string(),
            h: format!("{base}h"),
            u: format!("{base}u"),
            c: format!("{base}c"),
            created: Vec::new(),
            dir: std::env::temp_dir().join(format!("{base}-podman")),
            tracked: Vec::new(),
            servers: Vec::new(),
            shell: None,
        };
        // From here on a panic drops `rig`, which undoes partial setup.
        rig.build();
        eprintln!(
            "[{label}] rig ready: H={} U={} C={} dir={}",
            rig.h,
            rig.u,
            rig.c,
            rig.dir.display()
        );
        Some(rig)
    }

    fn build(&mut self) {
        std::fs::create_dir(&self.dir)
            .unwrap_or_else(|e| panic!("create {}: {e}", self.dir.display()));
        for ns in [self.h.clone(), self.u.clone(), self.c.clone()] {
            assert!(
                ns.starts_with(PREFIX),
                "namespace names must start with {PREFIX}: {ns}"
            );
            assert!(
                !Path::new("/run/netns").join(&ns).exists(),
                "namespace {ns} already exists; refusing to reuse it"
            );
            run_ip(&["netns", "add", &ns]);
            self.created.push(ns.clone());
            self.ip(&ns, &["link", "set", "lo", "up"]);
        }
        let (h, u, c) = (self.h.clone(), self.u.clone(), self.c.clone());
        self.ip(
            &h,
            &[
                "link", "add", "up0", "type", "veth", "peer", "name", "h0", "netns", &u,
            ],
        );
        self.ip(
            &h,
            &[
                "link", "add", "cl0", "type", "veth", "peer", "name", "h0", "netns", &c,
            ],
        );
        self.ip(
            &h,
            &["addr", "add", &format!("{H_UPLINK_IP}/24"), "dev", "up0"],
        );
        self.ip(&u, &["addr", "add", &format!("{U_IP}/24"), "dev", "h0"]);
        self.ip(
            &h,
            &[
                "addr",
                "add",
                &format!("{H_CLIENT_SIDE_IP}/24"),
                "dev",
                "cl0",
            ],
        );
        self.ip(&c, &["addr", "add", &format!("{C_IP}/24"), "dev", "h0"]);
        for (ns, dev) in [(&h, "up0"), (&h, "cl0"), (&u, "h0"), (&c, "h0")] {
            self.ip(ns, &["link", "set", dev, "up"]);
        }
        self.ip(&h, &["route", "add", "default", "via", U_IP]);
    }

    fn assert_ours(&self, ns: &str) {
        assert!(
            ns.starts_with(PREFIX) && self.created.iter().any(|n| n == ns),
            "refusing to act on namespace {ns:?}: not created by this rig ({})",
            self.label
        );
    }

    /// `ip -n NS ARGS...`, asserting success.
    pub fn ip(&self, ns: &str, args: &[&str]) -> String {
        self.assert_ours(ns);
        let mut full = vec!["-n", ns];
        full.extend_from_slice(args);
        run_ip(&full)
    }

    /// `ip netns exec NS ARGV...` with optional stdin, bounded.
    pub fn exec(
        &self,
        ns: &str,
        argv: &[&str],
        input: Option<&[u8]>,
        timeout: Duration,
    ) -> Finished {
        self.assert_ours(ns);
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", ns]).args(argv);
        procs::run_bounded(cmd, input, timeout)
    }

    /// Like `exec` without stdin, asserting success; returns stdout.
    pub fn exec_ok(&self, ns: &str, argv: &[&str]) -> String {
        let out = self.exec(ns, argv, None, FG_TIMEOUT);
        assert!(
            out.success(),
            "[{}] command failed in {ns}\n{}",
            self.label,
            out.describe()
        );
        out.stdout_str()
    }

    /// Starts a server in NS (killed at teardown) and waits until it
    /// listens on TCP PORT.
    pub fn spawn_tcp_server(&mut self, ns: &str, argv: &[&str], port: u16) {
        self.assert_ours(ns);
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", ns]).args(argv);
        let bg = BgProc::spawn(cmd);
        self.tracked.push(Tracked {
            pid: bg.pid(),
            start_time: bg.start_time(),
        });
        self.servers.push(bg);
        let filter = format!("sport = :{port}");
        let ok = procs::poll(|| {
            let out = self.exec(ns, &["ss", "-Hltn", &filter], None, FG_TIMEOUT);
            (out.success() && !out.stdout.is_empty()).then_some(())
        });
        assert!(
            ok.is_some(),
            "[{}] nothing listens on tcp/{port} in {ns}",
            self.label
        );
    }

    /// Remembers a process (e.g. conmon, the container's init) to kill at
    /// teardown if it is still the same process then.
    pub fn track_pid(&mut self, pid: u32) {
        if let Some(st) = procs::proc_stat(pid) {
            self.tracked.push(Tracked {
                pid,
                start_time: st.start_time,
            });
        }
    }

    /// `nft -j list ruleset` in H, parsed.
    pub fn nft_json(&self) -> serde_json::Value {
        let out = self.exec_ok(&self.h, &["nft", "-j", "list", "ruleset"]);
        serde_json::from_str(&out)
            .unwrap_or_else(|e| panic!("nft -j output is not JSON: {e}\n{out}"))
    }

    /// Path inside the scratch directory.
    pub fn path(&self, rel: &str) -> PathBuf {
        self.dir.join(rel)
    }

    /// Starts the Podman shell in H and runs PRELUDE in it (at top level,
    /// so its exports stay); panics if the prelude fails.
    pub fn start_shell(&mut self, prelude: &str) {
        assert!(self.shell.is_none(), "the podman shell is already running");
        self.assert_ours(&self.h.clone());
        let shell = PodShell::start(&self.h, &self.path("shell"));
        self.tracked.push(Tracked {
            pid: shell.child.id(),
            start_time: shell.start_time,
        });
        let shell = self.shell.insert(shell);
        let out = shell.run(prelude, Duration::from_secs(30), true);
        assert!(
            out.success(),
            "[{}] podman shell prelude failed\n{}",
            self.label,
            out.describe()
        );
        shell.mnt_ns = netns_identity(Path::new(&format!("/proc/{}/ns/mnt", shell.child.id())));
        let own = netns_identity(Path::new("/proc/self/ns/mnt"));
        assert!(
            shell.mnt_ns.is_some() && shell.mnt_ns != own,
            "the podman shell did not get its own mount namespace"
        );
    }

    /// Runs a shell SCRIPT in the Podman shell (in a subshell), bounded.
    pub fn sh(&mut self, script: &str, timeout: Duration) -> Finished {
        self.shell
            .as_mut()
            .expect("start_shell first")
            .run(script, timeout, false)
    }

    /// `podman ARGS...` in the Podman shell, bounded.
    pub fn podman(&mut self, args: &[&str], timeout: Duration) -> Finished {
        let mut script = String::from("podman");
        for a in args {
            script.push(' ');
            script.push_str(&sh_quote(a));
        }
        self.sh(&script, timeout)
    }

    /// Like `podman`, asserting success; returns stdout.
    pub fn podman_ok(&mut self, args: &[&str], timeout: Duration) -> String {
        let out = self.podman(args, timeout);
        assert!(
            out.success(),
            "[{}] podman failed\n{}",
            self.label,
            out.describe()
        );
        out.stdout_str()
    }

    /// Ends the Podman shell (`exit`), asserting it exits cleanly; the
    /// private mount namespace goes with it.
    pub fn close_shell(&mut self) {
        let mut shell = self.shell.take().expect("no podman shell");
        let status = shell.exit(Duration::from_secs(10));
        assert!(
            status.is_some_and(|s| s.success()),
            "[{}] podman shell did not exit cleanly: {status:?}\n{}",
            self.label,
            shell.log()
        );
    }

    /// Every PID that must die at teardown.
    fn doomed_pids(&self) -> Vec<u32> {
        let mut roots: Vec<u32> = self
            .tracked
            .iter()
            .filter(|t| t.still_same_process())
            .map(|t| t.pid)
            .collect();
        // Members of the private mount namespace (conmon, podman cleanup),
        // trusted only while the shell anchoring it is alive.
        if let Some(sh) = &self.shell {
            let anchor = Tracked {
                pid: sh.child.id(),
                start_time: sh.start_time,
            };
            if let (Some(mnt), true) = (sh.mnt_ns, anchor.still_same_process()) {
                for pid in procs::all_pids() {
                    if netns_identity(Path::new(&format!("/proc/{pid}/ns/mnt"))) == Some(mnt) {
                        roots.push(pid);
                    }
                }
            }
        }
        for ns in &self.created {
            let mut cmd = Command::new("ip");
            cmd.args(["netns", "pids", ns]);
            let out = procs::run_bounded(cmd, None, Duration::from_secs(10));
            roots.extend(
                out.stdout_str()
                    .split_whitespace()
                    .filter_map(|p| p.parse::<u32>().ok()),
            );
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

    fn print_diagnostics(&self) {
        let trace = self.path("cni-trace.log");
        if let Ok(t) = std::fs::read_to_string(&trace) {
            eprintln!("[{}] CNI trace ({}):\n{t}", self.label, trace.display());
        }
        if let Some(sh) = &self.shell {
            eprintln!("[{}] podman shell log:\n{}", self.label, sh.log());
        }
    }
}

impl Drop for Rig {
    fn drop(&mut self) {
        // Must not panic: it may run during unwinding.
        if std::thread::panicking() || std::env::var_os(TRACE_ENV).is_some() {
            self.print_diagnostics();
        }
        // 1. Let Podman remove what it still has (CNI DEL included).
        if let Some(sh) = self.shell.as_mut() {
            if sh.alive() {
                let out = sh.run("podman rm -f -t 0 --all", Duration::from_secs(30), false);
                if !out.success() {
                    eprintln!(
                        "[{}] teardown: podman rm -f --all failed\n{}",
                        self.label,
                        out.describe()
                    );
                }
            }
        }
        // 2. Kill what is left (twice: the first round may expose orphans).
        for _ in 0..2 {
            let pids = self.doomed_pids();
            if pids.is_empty() {
                break;
            }
            procs::send_signal("KILL", &pids);
            std::thread::sleep(Duration::from_millis(100));
        }
        if let Some(mut sh) = self.shell.take() {
            let _ = sh.exit(Duration::from_secs(5));
        }
        self.servers.clear();
        // 3. Namespaces.
        for ns in std::mem::take(&mut self.created) {
            if !ns.starts_with(PREFIX) {
                eprintln!(
                    "[{}] teardown: not deleting {ns}: not an {PREFIX}* name",
                    self.label
                );
                continue;
            }
            let mut cmd = Command::new("ip");
            cmd.args(["netns", "del", &ns]);
            let out = procs::run_bounded(cmd, None, Duration::from_secs(10));
            if !out.success() {
                eprintln!(
                    "[{}] teardown: could not delete netns {ns}\n{}",
                    self.label,
                    out.describe()
                );
            }
        }
        // 4. The scratch directory (Podman's mounts lived only in the
        // private mount namespace, which is gone with its processes).
        let ours = self
            .dir
            .file_name()
            .is_some_and(|n| n.to_string_lossy().starts_with(PREFIX));
        if ours && self.dir.exists() {
            if let Err(e) = std::fs::remove_dir_all(&self.dir) {
                eprintln!(
                    "[{}] teardown: could not remove {}: {e}",
                    self.label,
                    self.dir.display()
                );
            }
        }
    }
}

/// `ip ARGS...` as run by the rig itself, asserting success.
fn run_ip(args: &[&str]) -> String {
    let mut cmd = Command::new("ip");
    cmd.args(args);
    let out = procs::run_bounded(cmd, None, FG_TIMEOUT);
    assert!(out.success(), "ip command failed\n{}", out.describe());
    out.stdout_str()
}

/// A `sh -s` in H and a private mount namespace, fed commands on stdin.
/// Each command's stdout, stderr and status go to numbered files in `dir`.
struct PodShell {
    child: Child,
    stdin: Option<ChildStdin>,
    start_time: u64,
    dir: PathBuf,
    seq: u32,
    mnt_ns: Option<(u64, u64)>,
}

impl PodShell {
    fn start(h: &str, dir: &Path) -> PodShell {
        std::fs::create_dir(dir).unwrap_or_else(|e| panic!("create {}: {e}", dir.display()));
        let log = File::create(dir.join("shell.log")).expect("create shell.log");
        let mut cmd = Command::new("nsenter");
        cmd.arg(format!("--net=/run/netns/{h}"))
            .args(["unshare", "--mount", "--propagation", "slave", "sh", "-s"])
            .stdin(Stdio::piped())
            .stdout(log.try_clone().expect("dup shell.log"))
            .stderr(log);
        let mut child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start the podman shell: {e}"));
        let start_time = procs::proc_stat(child.id())
            .map(|s| s.start_time)
            .unwrap_or(0);
        let stdin = child.stdin.take();
        PodShell {
            child,
            stdin,
            start_time,
            dir: dir.to_path_buf(),
            seq: 0,
            mnt_ns: None,
        }
    }

    fn alive(&mut self) -> bool {
        self.stdin.is_some() && matches!(self.child.try_wait(), Ok(None))
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("shell.log")).unwrap_or_default()
    }

    /// Runs SCRIPT (in the shell itself when TOP_LEVEL, else in a subshell)
    /// with stdin from /dev/null; waits at most TIMEOUT, then kills the
    /// shell's children (the shell itself survives).
    fn run(&mut self, script: &str, timeout: Duration, top_level: bool) -> Finished {
        self.seq += 1;
        let n = self.seq;
        let f = |ext: &str| self.dir.join(format!("{n}.{ext}"));
        let (out, err, rc) = (f("out"), f("err"), f("rc"));
        let q = |p: &Path| sh_quote(&p.to_string_lossy());
        let (open, close) = if top_level { ("{", "}") } else { ("(", ")") };
        let block = format!(
            "{open}\n{script}\n{close} >{} 2>{} </dev/null; echo $? >{}.tmp; mv {}.tmp {}\n",
            q(&out),
            q(&err),
            q(&rc),
            q(&rc),
            q(&rc)
        );
        let finished = |status: Option<ExitStatus>| Finished {
            status,
            stdout: std::fs::read(&out).unwrap_or_default(),
            stderr: std::fs::read(&err).unwrap_or_default(),
            cmdline: format!("[podman shell #{n}] {script}"),
        };
        let written = self
            .stdin
            .as_mut()
            .map(|s| s.write_all(block.as_bytes()).and_then(|()| s.flush()));
        if !matches!(written, Some(Ok(()))) {
            return finished(None);
        }
        let read_rc = || -> Option<ExitStatus> {
            let code: i32 = std::fs::read_to_string(&rc).ok()?.trim().parse().ok()?;
            Some(ExitStatus::from_raw((code & 0xff) << 8))
        };
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            if let Some(s) = read_rc() {
                return finished(Some(s));
            }
            if !matches!(self.child.try_wait(), Ok(None)) {
                return finished(None); // the shell died
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        // Timed out: kill what the shell runs, let it write the status.
        procs::send_signal("KILL", &procs::descendants(self.child.id()));
        for _ in 0..50 {
            if read_rc().is_some() {
                break;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        finished(None)
    }

    /// Sends `exit`, closes stdin and waits (bounded); kills on timeout.
    fn exit(&mut self, timeout: Duration) -> Option<ExitStatus> {
        if let Some(mut s) = self.stdin.take() {
            let _ = s.write_all(b"exit 0\n");
        }
        let deadline = Instant::now() + timeout;
        loop {
            match self.child.try_wait() {
                Ok(Some(s)) => return Some(s),
                Ok(None) if Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(50))
                }
                _ => break,
            }
        }
        procs::kill_tree(self.child.id());
        let _ = self.child.wait();
        None
    }
}

impl Drop for PodShell {
    fn drop(&mut self) {
        if matches!(self.child.try_wait(), Ok(None)) {
            procs::kill_tree(self.child.id());
            let _ = self.child.wait();
        }
    }
}
