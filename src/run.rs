//! `rnat run`: set up, run the command inside, tear down, exit with the command's status.
//!
//! SIGINT, SIGTERM and SIGHUP are caught from the start, so a signal during setup cannot leave a
//! half-made container: setup finishes (or rolls back), then the container is torn down. Once the
//! command runs, those signals are forwarded to it and rnat waits for it to exit.

use std::io;
use std::os::unix::process::ExitStatusExt;
use std::process::Command;
use std::sync::atomic::{AtomicI32, AtomicU32, Ordering};
use std::sync::Arc;

use signal_hook::consts::{SIGHUP, SIGINT, SIGTERM};
use signal_hook::iterator::Signals;

use crate::process;
use crate::rootful::{CreateOpts, Engine, Error, Sandbox};

/// Exit status for a command that could not be run (as in Docker, Podman and shells).
pub const EXIT_NOT_EXECUTABLE: i32 = 126;
pub const EXIT_NOT_FOUND: i32 = 127;

/// A command that failed to start, with the status rnat exits with.
#[derive(Debug, thiserror::Error)]
#[error("cannot run {cmd:?}: {source}")]
pub struct SpawnError {
    pub cmd: String,
    pub status: i32,
    #[source]
    pub source: io::Error,
}

/// What went wrong in `run`.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error(transparent)]
    Setup(#[from] Error),
    #[error(transparent)]
    Spawn(SpawnError),
}

/// Runs `argv` in a new container and returns the status to exit with.
pub fn run(engine: &mut Engine, opts: &CreateOpts, argv: &[String]) -> Result<i32, RunError> {
    let child_pid = Arc::new(AtomicU32::new(0));
    let pending = Arc::new(AtomicI32::new(0));
    let mut signals = Signals::new([SIGINT, SIGTERM, SIGHUP]).map_err(|source| Error::Io {
        what: "installing signal handlers".into(),
        source,
    })?;
    let handle = signals.handle();
    let forwarder = {
        let (child_pid, pending) = (child_pid.clone(), pending.clone());
        std::thread::spawn(move || {
            for sig in signals.forever() {
                pending.store(sig, Ordering::SeqCst);
                let pid = child_pid.load(Ordering::SeqCst);
                if pid != 0 {
                    let _ = nix::sys::signal::kill(
                        nix::unistd::Pid::from_raw(pid as i32),
                        nix::sys::signal::Signal::try_from(sig).ok(),
                    );
                }
            }
        })
    };

    let result = run_inner(engine, opts, argv, &child_pid, &pending);
    handle.close();
    let _ = forwarder.join();
    result
}

fn run_inner(
    engine: &mut Engine,
    opts: &CreateOpts,
    argv: &[String],
    child_pid: &AtomicU32,
    pending: &AtomicI32,
) -> Result<i32, RunError> {
    crate::timing::mark("start");
    let sandbox = Sandbox::new_process()?;
    crate::timing::mark("netns");
    let prepared = engine.create(opts, sandbox)?;
    tracing::info!(name = %prepared.record.name, ip = %prepared.record.ip, "container ready");
    let interrupted = pending.load(Ordering::SeqCst);
    if interrupted != 0 {
        engine.destroy(&prepared.record)?;
        return Ok(128 + interrupted);
    }
    let (prog, args) = argv.split_first().ok_or_else(|| {
        RunError::Spawn(SpawnError {
            cmd: String::new(),
            status: EXIT_NOT_FOUND,
            source: io::Error::other("no command given"),
        })
    })?;
    let mut cmd = Command::new(prog);
    cmd.args(args);
    let mut child = match process::spawn_in(cmd, &prepared.netns, prepared.resolv.as_deref()) {
        Ok(c) => c,
        Err(source) => {
            let status = if source.kind() == io::ErrorKind::NotFound {
                EXIT_NOT_FOUND
            } else {
                EXIT_NOT_EXECUTABLE
            };
            if let Err(e) = engine.destroy(&prepared.record) {
                tracing::error!("{e}");
            }
            return Err(RunError::Spawn(SpawnError {
                cmd: prog.clone(),
                status,
                source,
            }));
        }
    };
    child_pid.store(child.id(), Ordering::SeqCst);
    crate::timing::mark("spawn");
    crate::timing::flush();
    // A signal that arrived between setup and the store above is delivered now.
    let sig = pending.load(Ordering::SeqCst);
    if sig != 0 {
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(child.id() as i32),
            nix::sys::signal::Signal::try_from(sig).ok(),
        );
    }
    let status = loop {
        match child.wait() {
            Ok(s) => break s,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => {
                tracing::error!("waiting for the container's command: {e}");
                let _ = child.kill();
                break child.wait().map_err(|source| Error::Io {
                    what: "waiting for command".into(),
                    source,
                })?;
            }
        }
    };
    child_pid.store(0, Ordering::SeqCst);
    engine.destroy(&prepared.record)?;
    drop(prepared);
    Ok(status
        .code()
        .unwrap_or_else(|| 128 + status.signal().unwrap_or(0)))
}
