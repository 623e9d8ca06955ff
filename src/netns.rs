//! Network namespaces as file descriptors.
//!
//! A namespace is held by an open `/proc/.../ns/net` file: it lives while the fd (or a process in
//! it) does. Entering one is done on a short-lived thread, so the calling thread never changes
//! namespace, and anything created there (a netlink socket) keeps the namespace it was made in.

use std::fs::File;
use std::io;
use std::os::fd::{AsFd, AsRawFd};
use std::os::unix::fs::MetadataExt;
use std::path::Path;

use nix::sched::{setns, unshare, CloneFlags};

/// An open handle on a network namespace.
#[derive(Debug)]
pub struct NetNs {
    file: File,
}

impl NetNs {
    /// The namespace of the calling thread.
    pub fn current() -> io::Result<NetNs> {
        Ok(NetNs {
            file: File::open("/proc/thread-self/ns/net")?,
        })
    }

    /// Opens a namespace by path (`/proc/PID/ns/net`, `/run/netns/NAME`).
    pub fn open(path: &Path) -> io::Result<NetNs> {
        Ok(NetNs {
            file: File::open(path)?,
        })
    }

    /// Creates a new, empty network namespace, held by the returned handle.
    pub fn create() -> io::Result<NetNs> {
        std::thread::spawn(|| {
            unshare(CloneFlags::CLONE_NEWNET).map_err(io::Error::from)?;
            NetNs::current()
        })
        .join()
        .map_err(|_| io::Error::other("namespace thread panicked"))?
    }

    /// Runs `f` on a thread that has entered this namespace, and returns its result.
    pub fn run_in<T: Send>(&self, f: impl FnOnce() -> T + Send) -> io::Result<T> {
        std::thread::scope(|s| {
            s.spawn(|| {
                setns(self.file.as_fd(), CloneFlags::CLONE_NEWNET).map_err(io::Error::from)?;
                Ok(f())
            })
            .join()
            .map_err(|_| io::Error::other("namespace thread panicked"))?
        })
    }

    /// The namespace's identity (inode number of its nsfs file).
    pub fn inode(&self) -> io::Result<u64> {
        Ok(self.file.metadata()?.ino())
    }

    pub fn raw_fd(&self) -> i32 {
        self.file.as_raw_fd()
    }
}

impl AsFd for NetNs {
    fn as_fd(&self) -> std::os::fd::BorrowedFd<'_> {
        self.file.as_fd()
    }
}

/// The inode of the network namespace process `pid` is in, if it is still running.
pub fn netns_inode_of(pid: u32) -> Option<u64> {
    std::fs::metadata(format!("/proc/{pid}/ns/net"))
        .ok()
        .map(|m| m.ino())
}
