//! Process plumbing for the harness: bounded command execution, background
//! processes with captured output, and killing process trees by PID.
//!
//! Everything here is std-only. Signals are sent with `kill -s SIG PID...`
//! (procps), always to explicit PIDs that we started (or descendants of those,
//! or processes found inside namespaces the harness created), never by name.

use std::collections::{BTreeSet, HashMap};
use std::io::{Read, Write};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

/// Poll interval used by every bounded wait in the suite.
pub const POLL: Duration = Duration::from_millis(100);
/// Upper bound on the number of polls of any readiness loop (100 × 100 ms).
pub const MAX_POLLS: u32 = 100;
/// Default time a foreground command may take before it is killed.
pub const FG_TIMEOUT: Duration = Duration::from_secs(30);

/// Output of a finished (or timed-out) command.
#[derive(Debug, Clone)]
pub struct Finished {
    /// `None` when the command was killed because it exceeded its timeout.
    pub status: Option<ExitStatus>,
    pub stdout: Vec<u8>,
    pub stderr: Vec<u8>,
    /// Human-readable command line, for assertion messages.
    pub cmdline: String,
}

impl Finished {
    pub fn timed_out(&self) -> bool {
        self.status.is_none()
    }
    pub fn success(&self) -> bool {
        self.status.is_some_and(|s| s.success())
    }
    /// Exit code, `None` if killed by a signal or timed out.
    pub fn code(&self) -> Option<i32> {
        self.status.and_then(|s| s.code())
    }
    pub fn stdout_str(&self) -> String {
        String::from_utf8_lossy(&self.stdout).into_owned()
    }
    pub fn stderr_str(&self) -> String {
        String::from_utf8_lossy(&self.stderr).into_owned()
    }
    /// One-paragraph description for panic messages.
    pub fn describe(&self) -> String {
        format!(
            "command: {}\nstatus: {}\nstdout: {}\nstderr: {}",
            self.cmdline,
            match self.status {
                Some(s) => format!("{s}"),
                None => "TIMED OUT (killed)".to_string(),
            },
            clip(&self.stdout_str()),
            clip(&self.stderr_str()),
        )
    }
}

fn clip(s: &str) -> String {
    const MAX: usize = 4000;
    if s.len() <= MAX {
        return s.to_string();
    }
    let mut end = MAX;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}… [{} bytes total]", &s[..end], s.len())
}

/// Renders a command line for messages.
pub fn cmdline_of(cmd: &Command) -> String {
    let mut parts = vec![cmd.get_program().to_string_lossy().into_owned()];
    parts.extend(cmd.get_args().map(|a| {
        let a = a.to_string_lossy();
        if a.contains(' ') || a.is_empty() {
            format!("'{a}'")
        } else {
            a.into_owned()
        }
    }));
    parts.join(" ")
}

/// A pipe drained by a thread into a shared buffer.
struct Capture {
    buf: Arc<Mutex<Vec<u8>>>,
    eof: Arc<AtomicBool>,
}

impl Capture {
    fn start<R: Read + Send + 'static>(mut r: R) -> Capture {
        let buf = Arc::new(Mutex::new(Vec::new()));
        let eof = Arc::new(AtomicBool::new(false));
        let (b, e) = (Arc::clone(&buf), Arc::clone(&eof));
        thread::spawn(move || {
            let mut chunk = [0u8; 16 * 1024];
            loop {
                match r.read(&mut chunk) {
                    Ok(0) | Err(_) => break,
                    Ok(n) => b
                        .lock()
                        .expect("capture buffer poisoned")
                        .extend_from_slice(&chunk[..n]),
                }
            }
            e.store(true, Ordering::SeqCst);
        });
        Capture { buf, eof }
    }

    fn snapshot(&self) -> Vec<u8> {
        self.buf.lock().expect("capture buffer poisoned").clone()
    }

    /// Waits (bounded) for the writer side to close. A grandchild that kept
    /// the pipe open must not hang the suite, so this gives up after ~2 s.
    fn settle(&self) {
        for _ in 0..20 {
            if self.eof.load(Ordering::SeqCst) {
                return;
            }
            thread::sleep(POLL);
        }
    }
}

/// Runs `cmd` to completion with a time bound, feeding it `stdin`.
/// Never panics on a non-zero exit; callers decide what is a failure.
pub fn run_bounded(mut cmd: Command, stdin: Option<&[u8]>, timeout: Duration) -> Finished {
    let cmdline = cmdline_of(&cmd);
    cmd.stdin(if stdin.is_some() {
        Stdio::piped()
    } else {
        Stdio::null()
    })
    .stdout(Stdio::piped())
    .stderr(Stdio::piped());
    let mut child = cmd
        .spawn()
        .unwrap_or_else(|e| panic!("cannot spawn `{cmdline}`: {e} (is the tool installed?)"));
    if let Some(input) = stdin {
        let mut pipe = child.stdin.take().expect("stdin was requested as piped");
        let input = input.to_vec();
        // A separate thread so a child that does not read cannot block us.
        thread::spawn(move || {
            let _ = pipe.write_all(&input);
            // Dropping `pipe` closes it: the child sees EOF.
        });
    }
    let out = Capture::start(child.stdout.take().expect("stdout was requested as piped"));
    let err = Capture::start(child.stderr.take().expect("stderr was requested as piped"));
    let status = wait_child(&mut child, timeout);
    if status.is_none() {
        kill_tree(child.id());
        let _ = wait_child(&mut child, Duration::from_secs(5));
    }
    out.settle();
    err.settle();
    Finished {
        status,
        stdout: out.snapshot(),
        stderr: err.snapshot(),
        cmdline,
    }
}

/// Polls `child` until it exits or `timeout` passes.
fn wait_child(child: &mut Child, timeout: Duration) -> Option<ExitStatus> {
    let deadline = Instant::now() + timeout;
    loop {
        match child.try_wait() {
            Ok(Some(s)) => return Some(s),
            Ok(None) => {}
            Err(e) => panic!("try_wait on pid {} failed: {e}", child.id()),
        }
        if Instant::now() >= deadline {
            return None;
        }
        thread::sleep(Duration::from_millis(20));
    }
}

/// A long-running process (server, `rnat run`, ...) with captured output.
/// Dropping it kills it and all of its descendants.
pub struct BgProc {
    child: Child,
    out: Capture,
    err: Capture,
    status: Option<ExitStatus>,
    cmdline: String,
    start_time: u64,
}

impl BgProc {
    pub fn spawn(mut cmd: Command) -> BgProc {
        let cmdline = cmdline_of(&cmd);
        cmd.stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("cannot spawn `{cmdline}`: {e} (is the tool installed?)"));
        let out = Capture::start(child.stdout.take().expect("stdout was requested as piped"));
        let err = Capture::start(child.stderr.take().expect("stderr was requested as piped"));
        let start_time = proc_stat(child.id()).map(|s| s.start_time).unwrap_or(0);
        BgProc {
            child,
            out,
            err,
            status: None,
            cmdline,
            start_time,
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn start_time(&self) -> u64 {
        self.start_time
    }

    /// `Some(status)` once the process has exited (and been reaped).
    pub fn exited(&mut self) -> Option<ExitStatus> {
        if self.status.is_none() {
            self.status = self
                .child
                .try_wait()
                .expect("try_wait on a background process");
        }
        self.status
    }

    pub fn stdout_now(&self) -> String {
        String::from_utf8_lossy(&self.out.snapshot()).into_owned()
    }

    pub fn stderr_now(&self) -> String {
        String::from_utf8_lossy(&self.err.snapshot()).into_owned()
    }

    /// Sends signal `sig` (a name such as "TERM", "INT", "KILL") to this
    /// process only. Panics if it already exited (the PID may be reused).
    pub fn signal(&mut self, sig: &str) {
        assert!(
            self.exited().is_none(),
            "cannot send SIG{sig} to `{}`: it already exited\n{}",
            self.cmdline,
            self.describe_now()
        );
        send_signal(sig, &[self.pid()]);
    }

    /// SIGKILLs the process itself (not its descendants) and reaps it.
    /// Returns the descendants it had just before, which may now be orphans;
    /// the caller should hand them to the topology guard.
    pub fn kill9(&mut self) -> Vec<Tracked> {
        let orphans: Vec<Tracked> = descendants(self.pid())
            .into_iter()
            .filter_map(|pid| {
                proc_stat(pid).map(|s| Tracked {
                    pid,
                    start_time: s.start_time,
                })
            })
            .collect();
        self.signal("KILL");
        self.wait_exit(Duration::from_secs(10));
        orphans
    }

    /// Waits (bounded) for the process to exit; kills its tree on timeout.
    pub fn wait_exit(&mut self, timeout: Duration) -> Finished {
        if self.status.is_none() {
            self.status = wait_child(&mut self.child, timeout);
        }
        if self.status.is_none() {
            kill_tree(self.pid());
            let _ = wait_child(&mut self.child, Duration::from_secs(5));
            self.out.settle();
            self.err.settle();
            return self.finished(None);
        }
        self.out.settle();
        self.err.settle();
        self.finished(self.status)
    }

    fn finished(&self, status: Option<ExitStatus>) -> Finished {
        Finished {
            status,
            stdout: self.out.snapshot(),
            stderr: self.err.snapshot(),
            cmdline: self.cmdline.clone(),
        }
    }

    /// Description of the current state, for panic messages.
    pub fn describe_now(&self) -> String {
        format!(
            "command: {}\nstatus: {}\nstdout so far: {}\nstderr so far: {}",
            self.cmdline,
            match self.status {
                Some(s) => format!("{s}"),
                None => "running".to_string(),
            },
            clip(&self.stdout_now()),
            clip(&self.stderr_now()),
        )
    }
}

impl Drop for BgProc {
    fn drop(&mut self) {
        // Must not panic (it may run during unwinding): no `expect` here.
        if self.status.is_none() && matches!(self.child.try_wait(), Ok(None)) {
            kill_tree(self.pid());
            for _ in 0..MAX_POLLS / 2 {
                if !matches!(self.child.try_wait(), Ok(None)) {
                    break;
                }
                thread::sleep(POLL);
            }
        }
    }
}

/// A PID plus its kernel start time, so that a recycled PID is never killed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct Tracked {
    pub pid: u32,
    pub start_time: u64,
}

impl Tracked {
    pub fn still_same_process(&self) -> bool {
        proc_stat(self.pid).is_some_and(|s| s.start_time == self.start_time && s.state != 'Z')
    }
}

pub struct ProcStat {
    pub ppid: u32,
    pub state: char,
    pub start_time: u64,
}

/// Parses the fields we need from /proc/PID/stat.
pub fn proc_stat(pid: u32) -> Option<ProcStat> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // comm (field 2) may contain spaces and parentheses: split after the last ')'.
    let rest = &text[text.rfind(')')? + 1..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // fields[0] is field 3 (state), so field N is fields[N - 3].
    Some(ProcStat {
        state: fields.first()?.chars().next()?,
        ppid: fields.get(1)?.parse().ok()?,
        start_time: fields.get(19)?.parse().ok()?,
    })
}

/// All numeric entries of /proc.
pub fn all_pids() -> Vec<u32> {
    let Ok(rd) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    rd.filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok())
        .collect()
}

/// Transitive children of `root` (not including `root`), from a /proc scan.
pub fn descendants(root: u32) -> Vec<u32> {
    let mut children: HashMap<u32, Vec<u32>> = HashMap::new();
    for pid in all_pids() {
        if let Some(st) = proc_stat(pid) {
            children.entry(st.ppid).or_default().push(pid);
        }
    }
    let mut found = BTreeSet::new();
    let mut stack = vec![root];
    while let Some(p) = stack.pop() {
        for &c in children.get(&p).map(Vec::as_slice).unwrap_or(&[]) {
            if found.insert(c) {
                stack.push(c);
            }
        }
    }
    found.into_iter().collect()
}

/// Sends `sig` to exactly these PIDs. Errors (already gone) are ignored.
pub fn send_signal(sig: &str, pids: &[u32]) {
    if pids.is_empty() {
        return;
    }
    let mut cmd = Command::new("kill");
    cmd.arg("-s").arg(sig);
    cmd.args(pids.iter().map(u32::to_string));
    let _ = cmd.stdout(Stdio::null()).stderr(Stdio::null()).status();
}

/// SIGKILLs `root` and every descendant it has right now.
pub fn kill_tree(root: u32) {
    let mut pids = descendants(root);
    pids.push(root);
    send_signal("KILL", &pids);
}

/// Tries `probe` up to `MAX_POLLS` times, `POLL` apart; returns the first
/// `Some`. This is the only retry loop shape used by the suite.
pub fn poll<T>(mut probe: impl FnMut() -> Option<T>) -> Option<T> {
    for i in 0..MAX_POLLS {
        if let Some(v) = probe() {
            return Some(v);
        }
        if i + 1 < MAX_POLLS {
            thread::sleep(POLL);
        }
    }
    None
}
