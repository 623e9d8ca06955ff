//! The rig of the Podman test: a `harness::Topology` under its own prefix
//! (`rnp<pid>-<n>{h,u,c}`, reached through `Deref`), whose scratch
//! directory holds every bit of Podman's state, and one long-lived shell in
//! a private mount namespace inside H through which every `podman` command
//! of the test runs.
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
//! time; members of our namespaces and of the private mount namespace, and
//! their descendants); the topology's own guard then deletes the
//! namespaces and the scratch directories.

use std::fs::File;
use std::io::Write;
use std::ops::Deref;
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use crate::fixtures::sh_quote;
use crate::harness::{netns_identity, not_root, skip_or_fail, Topology};
use crate::procs::{self, Finished, Tracked};

/// Every name this rig creates starts with this.
pub const PREFIX: &str = "rnp";
/// Set to interpose a logging wrapper between Podman and rnat (the log,
/// `cni-trace.log` in the scratch directory, is printed at the end).
pub const TRACE_ENV: &str = "RNAT_PODMAN_TRACE";

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
    shell: Option<PodShell>,
    /// Namespaces, scratch directory (`work_dir`: Podman's whole state,
    /// the rootfs, rnat's stateDir), tracked processes, the base guard.
    topo: Topology,
}

impl Deref for Rig {
    type Target = Topology;

    fn deref(&self) -> &Topology {
        &self.topo
    }
}

impl Rig {
    /// Builds H, U, C and the scratch directory, or returns `None` (after
    /// printing why) when not root or when Podman/crun are missing, unless
    /// `RNAT_NETNS_REQUIRE_ROOT` is set, which makes both a failure.
    pub fn new(label: &str) -> Option<Rig> {
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
        let why = not_root().or_else(|| {
            (!missing.is_empty() || !Path::new("/bin/busybox").exists()).then(|| {
                format!("missing {missing:?} or /bin/busybox (run scripts/podman-deps.sh)")
            })
        });
        if let Some(why) = why {
            skip_or_fail(label, &why);
            return None;
        }
        let topo = Topology::with_prefix(PREFIX, label)?;
        eprintln!("[{label}] podman dir={}", topo.work_dir.display());
        Some(Rig { shell: None, topo })
    }

    /// Starts the Podman shell in H and runs PRELUDE in it (at top level,
    /// so its exports stay); panics if the prelude fails.
    pub fn start_shell(&mut self, prelude: &str) {
        assert!(self.shell.is_none(), "the podman shell is already running");
        if let Err(e) = self.check_ours(&self.h) {
            panic!("{e}");
        }
        let shell = PodShell::start(&self.h, &self.work_path("shell"));
        self.topo.track(Tracked {
            pid: shell.child.id(),
            start_time: shell.start_time,
        });
        let shell = self.shell.insert(shell);
        let out = shell.run(prelude, Duration::from_secs(30), true);
        assert!(
            out.success(),
            "[{}] podman shell prelude failed\n{}",
            self.topo.label,
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

    fn print_diagnostics(&self) {
        let trace = self.work_path("cni-trace.log");
        if let Ok(t) = std::fs::read_to_string(&trace) {
            eprintln!("[{}] CNI trace ({}):\n{t}", self.label, trace.display());
        }
        if let Some(sh) = &self.shell {
            eprintln!("[{}] podman shell log:\n{}", self.label, sh.log());
        }
    }
}

/// Members of the shell's private mount namespace (conmon, podman
/// cleanup), trusted only while the shell anchoring it is alive.
fn mount_ns_members(shell: &Option<PodShell>) -> Vec<u32> {
    let Some(sh) = shell else {
        return Vec::new();
    };
    let anchor = Tracked {
        pid: sh.child.id(),
        start_time: sh.start_time,
    };
    let (Some(mnt), true) = (sh.mnt_ns, anchor.still_same_process()) else {
        return Vec::new();
    };
    procs::all_pids()
        .into_iter()
        .filter(|pid| netns_identity(Path::new(&format!("/proc/{pid}/ns/mnt"))) == Some(mnt))
        .collect()
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
                        self.topo.label,
                        out.describe()
                    );
                }
            }
        }
        // 2. Kill what is left, the private mount namespace's members too.
        let shell = &self.shell;
        self.topo.kill_doomed(&|| mount_ns_members(shell));
        if let Some(mut sh) = self.shell.take() {
            let _ = sh.exit(Duration::from_secs(5));
        }
        // 3. Then `topo` drops: namespaces and the scratch directory go
        // (Podman's mounts lived only in the private mount namespace,
        // which is gone with its processes).
    }
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
