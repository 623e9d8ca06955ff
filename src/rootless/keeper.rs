//! A small process inside the container's user and network namespaces that makes sockets there
//! on request, so that rnat's own process (which stays in the host's namespace, and as an
//! unprivileged process cannot enter another) can connect to the container's loopback.

use std::io;
use std::os::fd::{AsRawFd, OwnedFd, RawFd};

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

use super::sys;

pub struct Keeper {
    sock: OwnedFd,
    pid: Pid,
}

impl Keeper {
    /// Forks the keeper; it joins `userns` (if given), then `netns`. Must be called while this
    /// process has a single thread (rootless rnat never starts one).
    pub fn spawn(userns: Option<OwnedFd>, netns: OwnedFd) -> io::Result<Keeper> {
        let (ours, theirs) = super::ns::fd_channel()?;
        // SAFETY: single-threaded (the caller's contract): the child runs only raw syscalls and
        // leaves by _exit.
        match unsafe { nix::unistd::fork() }.map_err(io::Error::from)? {
            nix::unistd::ForkResult::Child => {
                drop(ours);
                let code = serve(userns.as_ref(), &netns, theirs.as_raw_fd());
                // SAFETY: _exit(2) ends the child without running the parent's destructors.
                unsafe { libc::_exit(code) }
            }
            nix::unistd::ForkResult::Parent { child } => {
                drop(theirs);
                let tv = libc::timeval {
                    tv_sec: 2,
                    tv_usec: 0,
                };
                // SAFETY: setsockopt with a pointer to a timeval of the stated size.
                unsafe {
                    libc::setsockopt(
                        ours.as_raw_fd(),
                        libc::SOL_SOCKET,
                        libc::SO_RCVTIMEO,
                        (&tv as *const libc::timeval).cast(),
                        std::mem::size_of::<libc::timeval>() as u32,
                    );
                }
                Ok(Keeper {
                    sock: ours,
                    pid: child,
                })
            }
        }
    }

    /// A TCP socket in the container's namespace, connecting (non-blocking) to 127.0.0.1:`port`.
    ///
    /// An error of kind `BrokenPipe` means the request and its answer may no longer pair up (the
    /// keeper died, or answered too late): the keeper must not be used again. Any other error is
    /// the keeper's answer (its connect failed) or `EMFILE` (no descriptor here for the socket).
    pub fn connect_local(&self, port: u16) -> io::Result<OwnedFd> {
        let broken = |e: io::Error| {
            io::Error::new(
                io::ErrorKind::BrokenPipe,
                format!("socket maker channel: {e}"),
            )
        };
        nix::sys::socket::send(
            self.sock.as_raw_fd(),
            &port.to_be_bytes(),
            nix::sys::socket::MsgFlags::MSG_NOSIGNAL,
        )
        .map_err(|e| broken(e.into()))?;
        let mut msg = [0u8; 4];
        // A signal handled meanwhile (SIGTERM forwarded to the command, say) interrupts the wait
        // even under SA_RESTART, because of the receive timeout; nothing was taken from the
        // channel, so the wait goes on.
        let answer = loop {
            match sys::recv_fd(self.sock.as_raw_fd(), &mut msg) {
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                answer => break answer,
            }
        };
        match answer {
            Ok((Some(fd), _)) => Ok(fd),
            Ok((None, 4)) => Err(io::Error::from_raw_os_error(i32::from_ne_bytes(msg))),
            Ok((None, _)) => Err(broken(io::Error::from(io::ErrorKind::UnexpectedEof))),
            Err(e) if e.raw_os_error() == Some(libc::EMFILE) => Err(e),
            // A timeout leaves an answer in flight: the channel is out of step.
            Err(e) => Err(broken(e)),
        }
    }
}

impl Drop for Keeper {
    fn drop(&mut self) {
        let _ = kill(self.pid, Signal::SIGKILL);
        let _ = nix::sys::wait::waitpid(self.pid, None);
    }
}

/// The keeper's loop. Raw syscalls only: it runs in a forked child.
fn serve(userns: Option<&OwnedFd>, netns: &OwnedFd, sock: RawFd) -> i32 {
    // The fork copied every fd rnat had (the TAP, listeners, flow sockets): keep only ours, or a
    // closed listener or socket would live on here (and the TAP would pin the namespace).
    let mut keep = [
        sock,
        netns.as_raw_fd(),
        userns.map_or(sock, |u| u.as_raw_fd()),
    ];
    keep.sort_unstable();
    let mut from: libc::c_uint = 3;
    for k in keep {
        let k = k as libc::c_uint;
        if k > from {
            // SAFETY: close_range(2) on a range of fd numbers; it only closes.
            unsafe { libc::syscall(libc::SYS_close_range, from, k - 1, 0) };
        }
        from = from.max(k + 1);
    }
    // SAFETY: as above, up to the highest fd number.
    unsafe { libc::syscall(libc::SYS_close_range, from, libc::c_uint::MAX, 0) };
    // SAFETY: prctl/setns with valid arguments; the child is single-threaded.
    unsafe {
        libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
        if let Some(u) = userns {
            if libc::setns(u.as_raw_fd(), libc::CLONE_NEWUSER) != 0 {
                return 1;
            }
        }
        if libc::setns(netns.as_raw_fd(), libc::CLONE_NEWNET) != 0 {
            return 1;
        }
    }
    loop {
        let mut req = [0u8; 2];
        // SAFETY: recv(2) into a valid 2-byte buffer.
        let n = unsafe { libc::recv(sock, req.as_mut_ptr().cast(), 2, 0) };
        if n != 2 {
            return 0; // rnat closed its end
        }
        let port = u16::from_be_bytes(req);
        match connect_loopback(port) {
            Ok(fd) => {
                let _ = sys::send_fd(sock, fd.as_raw_fd());
            }
            Err(e) => {
                let errno = e.raw_os_error().unwrap_or(libc::EIO).to_ne_bytes();
                // SAFETY: send(2) of a 4-byte buffer.
                unsafe { libc::send(sock, errno.as_ptr().cast(), 4, 0) };
            }
        }
    }
}

fn connect_loopback(port: u16) -> io::Result<OwnedFd> {
    use std::os::fd::FromRawFd;
    // SAFETY: socket(2) with constant arguments; the fd is owned at once.
    let fd = unsafe {
        libc::socket(
            libc::AF_INET,
            libc::SOCK_STREAM | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC,
            0,
        )
    };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: fd was just created.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    let one: libc::c_int = 1;
    let sin = libc::sockaddr_in {
        sin_family: libc::AF_INET as libc::sa_family_t,
        sin_port: port.to_be(),
        sin_addr: libc::in_addr {
            s_addr: u32::from(std::net::Ipv4Addr::LOCALHOST).to_be(),
        },
        sin_zero: [0; 8],
    };
    // SAFETY: setsockopt with an int; connect with a sockaddr_in of the stated size.
    let r = unsafe {
        libc::setsockopt(
            fd.as_raw_fd(),
            libc::IPPROTO_TCP,
            libc::TCP_NODELAY,
            (&one as *const libc::c_int).cast(),
            4,
        );
        libc::connect(
            fd.as_raw_fd(),
            (&sin as *const libc::sockaddr_in).cast(),
            std::mem::size_of::<libc::sockaddr_in>() as u32,
        )
    };
    if r != 0 {
        let e = io::Error::last_os_error();
        if e.raw_os_error() != Some(libc::EINPROGRESS) {
            return Err(e);
        }
    }
    Ok(fd)
}
