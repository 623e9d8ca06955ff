//! Starting the container's command inside its namespace, and finding what runs there.

use std::ffi::CString;
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Child, Command};

use crate::netns::{netns_inode_of, NetNs};

/// Spawns `cmd` inside `netns`, in a private mount namespace where `/etc/resolv.conf` is
/// `resolv` and `/sys` shows the container's links (as `ip netns exec` does). The child is
/// killed if this process dies, so a container never outlives the `rnat run` that owns it.
pub fn spawn_in(mut cmd: Command, netns: &NetNs, resolv: Option<&Path>) -> io::Result<Child> {
    let fd = netns.raw_fd();
    let resolv = resolv
        .map(|r| CString::new(r.as_os_str().as_bytes()).map_err(io::Error::other))
        .transpose()?;
    let parent = std::process::id() as libc::pid_t;
    // SAFETY: the closure runs in the forked child before exec, where only async-signal-safe calls
    // are allowed: it makes raw syscalls on data prepared before the fork (an fd number and C
    // strings) and allocates nothing (`last_os_error` builds an `Os` variant without allocating).
    unsafe {
        cmd.pre_exec(move || {
            if libc::setns(fd, libc::CLONE_NEWNET) != 0 || libc::unshare(libc::CLONE_NEWNS) != 0 {
                return Err(io::Error::last_os_error());
            }
            if libc::mount(
                std::ptr::null(),
                c"/".as_ptr(),
                std::ptr::null(),
                libc::MS_REC | libc::MS_SLAVE,
                std::ptr::null(),
            ) != 0
            {
                return Err(io::Error::last_os_error());
            }
            // Best effort: a host without /etc/resolv.conf gets none, and a read-only /sys stays.
            // Read-only: the file is shared by the containers behind one gateway.
            if let Some(r) = &resolv {
                let target = c"/etc/resolv.conf".as_ptr();
                if libc::mount(
                    r.as_ptr(),
                    target,
                    std::ptr::null(),
                    libc::MS_BIND,
                    std::ptr::null(),
                ) == 0
                {
                    libc::mount(
                        std::ptr::null(),
                        target,
                        std::ptr::null(),
                        libc::MS_REMOUNT | libc::MS_BIND | libc::MS_RDONLY,
                        std::ptr::null(),
                    );
                }
            }
            remount_sys();
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                return Err(io::Error::last_os_error());
            }
            if libc::getppid() != parent {
                return Err(io::Error::from_raw_os_error(libc::ESRCH));
            }
            Ok(())
        });
    }
    cmd.spawn()
}

/// Mounts a fresh sysfs over /sys (in a private mount namespace), so that /sys shows the links of
/// the network namespace the caller is in, as `ip netns exec` does. Best effort; async-signal-safe
/// (it runs between fork and exec).
pub fn remount_sys() {
    // SAFETY: umount2/mount with constant NUL-terminated strings and null data.
    unsafe {
        if libc::umount2(c"/sys".as_ptr(), libc::MNT_DETACH) == 0 {
            libc::mount(
                c"sysfs".as_ptr(),
                c"/sys".as_ptr(),
                c"sysfs".as_ptr(),
                0,
                std::ptr::null(),
            );
        }
    }
}

/// PIDs of every process whose network namespace has inode `ino` (except this one).
pub fn pids_in_netns(ino: u64) -> Vec<u32> {
    let me = std::process::id();
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    dir.filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| *pid != me && netns_inode_of(*pid) == Some(ino))
        .collect()
}

/// Sends SIGKILL to every process left in the namespace with inode `ino`. Returns how many.
pub fn kill_netns_processes(ino: u64) -> usize {
    let pids = pids_in_netns(ino);
    for pid in &pids {
        // Only processes inside the container's own namespace are signalled.
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(*pid as i32),
            nix::sys::signal::Signal::SIGKILL,
        );
    }
    pids.len()
}
