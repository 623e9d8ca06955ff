//! Entering (or creating) the container's user and network namespaces and making the TAP device
//! there. The work happens in a forked child, because a multithreaded process cannot change its
//! user namespace and rnat's own process must stay in the host's network namespace; the TAP's fd
//! comes back over a UNIX socket.

use std::ffi::CString;
use std::io;
use std::net::Ipv4Addr;
use std::os::fd::{AsRawFd, OwnedFd, RawFd};

use super::core::GATEWAY_MAC;
use super::ring;
use super::sys::{self, IfName};

/// How the TAP device is set up once created.
#[derive(Clone)]
pub struct TapAddress {
    pub addr: Ipv4Addr,
    pub prefix: u8,
    pub gateway: Ipv4Addr,
    /// The DNS address rnat answers on (like the gateway, at `GATEWAY_MAC`).
    pub dns: Ipv4Addr,
    pub mtu: u16,
    pub mac: Option<[u8; 6]>,
    pub ipv6: Option<TapAddress6>,
}

/// The TAP's IPv6 address (a /64) and default route.
#[derive(Clone)]
pub struct TapAddress6 {
    pub addr: std::net::Ipv6Addr,
    pub gateway: std::net::Ipv6Addr,
    /// The TAP's `accept_dad` sysctl: turned off, so the address is usable at once (nothing
    /// else on the link could hold it).
    pub accept_dad: CString,
    /// The TAP's `autoconf` sysctl: turned off, so `addr` is the container's only global
    /// address. With a second one from the router advertisement's prefix, the kernel would pick
    /// that as the source of new flows, and the answers of a UDP server to clients of a port
    /// published to `addr` would leave from an address they never wrote to.
    pub autoconf: CString,
}

/// Namespaces to enter, by open fd (held by the caller until the child has run).
pub enum Enter {
    /// New user, network and mount namespaces, mapping `uid`/`gid` to root inside, with
    /// `/etc/resolv.conf` bound to the file at `resolv`.
    New {
        uid_map: CString,
        gid_map: CString,
        resolv: Option<CString>,
    },
    /// Existing namespaces: the user namespace first, if any.
    Join {
        userns: Option<OwnedFd>,
        netns: OwnedFd,
    },
}

/// Frames the TAP's queue holds (the kernel's default for a TAP is 500): room for bursts.
pub const TXQUEUELEN: u32 = 4096;

/// What carries the container's frames to rnat and back.
pub enum LinkPlan {
    /// A TAP device: one fd, read and written a frame per system call.
    Tap,
    /// A veth pair: the container's end named like the TAP would be, its peer in a private network
    /// namespace of rnat's (owned by the same user namespace), where two packet sockets read it
    /// through a ring and write to it. The request creating the pair is built before the fork.
    Ring {
        peer: IfName,
        veth_msg: Vec<u8>,
        /// Where in `veth_msg` the private namespace's fd goes.
        fd_at: usize,
    },
}

impl LinkPlan {
    pub fn is_ring(&self) -> bool {
        matches!(self, LinkPlan::Ring { .. })
    }

    /// The packet ring link, its request prepared for a container end named `tap_name`.
    pub fn ring(tap_name: &str, mtu: u16) -> LinkPlan {
        let (veth_msg, fd_at) = sys::veth_request(tap_name, RING_PEER, mtu);
        LinkPlan::Ring {
            peer: IfName::new(RING_PEER).expect("a valid constant name"),
            veth_msg,
            fd_at,
        }
    }
}

/// The name of the veth's peer in rnat's private namespace (nothing else lives there).
const RING_PEER: &str = "rnat0";

/// The link's fds as the child made them: the one frames are written to, and for the ring link
/// the socket whose ring they are read from (for a TAP, the same fd does both).
pub struct Link {
    pub tx: OwnedFd,
    pub rx: Option<OwnedFd>,
}

/// Everything the child needs, prepared before the fork.
pub struct TapPlan {
    pub enter: Enter,
    pub tap: IfName,
    pub link: LinkPlan,
    pub vnet_hdr: bool,
    pub address: Option<TapAddress>,
    /// The tap queue length; rnat sizes its windows to it.
    pub txqueuelen: u32,
    /// The rtnetlink request that sets `txqueuelen` (built before the fork).
    pub txqlen_msg: Vec<u8>,
}

impl TapPlan {
    /// A plan that maps the caller's uid and gid to root in a new user namespace.
    pub fn new_namespaces(
        resolv: Option<&std::path::Path>,
        tap_name: &str,
        link: LinkPlan,
        vnet_hdr: bool,
        address: Option<TapAddress>,
    ) -> io::Result<TapPlan> {
        use std::os::unix::ffi::OsStrExt;
        let tap = IfName::new(tap_name).map_err(io::Error::other)?;
        let (uid, gid) = (nix::unistd::geteuid(), nix::unistd::getegid());
        let c = |s: String| CString::new(s).map_err(io::Error::other);
        Ok(TapPlan {
            enter: Enter::New {
                uid_map: c(format!("0 {uid} 1\n"))?,
                gid_map: c(format!("0 {gid} 1\n"))?,
                resolv: resolv
                    .map(|p| CString::new(p.as_os_str().as_bytes()).map_err(io::Error::other))
                    .transpose()?,
            },
            txqlen_msg: sys::txqlen_request(tap_name, TXQUEUELEN),
            tap,
            link,
            vnet_hdr,
            address,
            txqueuelen: TXQUEUELEN,
        })
    }
}

fn check(r: libc::c_int) -> io::Result<()> {
    if r != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// The step of the namespace set-up that failed, as the child reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum Step {
    CreateNamespaces = 1,
    MapIds = 2,
    Mounts = 3,
    JoinUserns = 4,
    JoinNetns = 5,
    CreateTap = 6,
    Configure = 7,
    SendFd = 8,
}

impl Step {
    pub fn from_u8(v: u8) -> Option<Step> {
        use Step::*;
        [
            CreateNamespaces,
            MapIds,
            Mounts,
            JoinUserns,
            JoinNetns,
            CreateTap,
            Configure,
            SendFd,
        ]
        .into_iter()
        .find(|s| *s as u8 == v)
    }

    pub fn describe(self) -> &'static str {
        match self {
            Step::CreateNamespaces => "creating user, network and mount namespaces",
            Step::MapIds => "mapping the user to root in the user namespace",
            Step::Mounts => "mounting resolv.conf in the container",
            Step::JoinUserns => "joining the user namespace",
            Step::JoinNetns => "joining the network namespace",
            Step::CreateTap => "creating the container's network device",
            Step::Configure => "configuring the TAP device",
            Step::SendFd => "passing the TAP device back",
        }
    }
}

/// A failed step and its errno, as sent from the child: 1 byte of step, 4 of errno.
pub fn encode_failure(step: Step, e: &io::Error) -> [u8; 5] {
    let errno = e.raw_os_error().unwrap_or(libc::EIO).to_ne_bytes();
    [step as u8, errno[0], errno[1], errno[2], errno[3]]
}

/// Runs in the forked child: enters the namespaces, makes and configures the TAP, sends its fd
/// on `sock`. Async-signal-safe: raw syscalls on the plan's prepared data, no allocation.
pub fn enter_and_make_tap(plan: &TapPlan, sock: RawFd) -> Result<(), (Step, io::Error)> {
    let at = |step: Step| move |e: io::Error| (step, e);
    match &plan.enter {
        Enter::New {
            uid_map,
            gid_map,
            resolv,
        } => {
            // SAFETY: unshare(2) with constant flags; the child is single-threaded.
            check(unsafe {
                libc::unshare(libc::CLONE_NEWUSER | libc::CLONE_NEWNET | libc::CLONE_NEWNS)
            })
            .map_err(at(Step::CreateNamespaces))?;
            sys::write_file(c"/proc/self/setgroups", b"deny").map_err(at(Step::MapIds))?;
            sys::write_file(c"/proc/self/uid_map", uid_map.as_bytes()).map_err(at(Step::MapIds))?;
            sys::write_file(c"/proc/self/gid_map", gid_map.as_bytes()).map_err(at(Step::MapIds))?;
            // SAFETY: mount(2) with NUL-terminated strings or nulls.
            check(unsafe {
                libc::mount(
                    std::ptr::null(),
                    c"/".as_ptr(),
                    std::ptr::null(),
                    libc::MS_REC | libc::MS_SLAVE,
                    std::ptr::null(),
                )
            })
            .map_err(at(Step::Mounts))?;
            if let Some(r) = resolv {
                // SAFETY: as above.
                check(unsafe {
                    libc::mount(
                        r.as_ptr(),
                        c"/etc/resolv.conf".as_ptr(),
                        std::ptr::null(),
                        libc::MS_BIND,
                        std::ptr::null(),
                    )
                })
                .map_err(at(Step::Mounts))?;
            }
        }
        Enter::Join { userns, netns } => {
            if let Some(u) = userns {
                // SAFETY: setns(2) on an open namespace fd; the child is single-threaded.
                check(unsafe { libc::setns(u.as_raw_fd(), libc::CLONE_NEWUSER) })
                    .map_err(at(Step::JoinUserns))?;
            }
            // SAFETY: as above.
            check(unsafe { libc::setns(netns.as_raw_fd(), libc::CLONE_NEWNET) })
                .map_err(at(Step::JoinNetns))?;
        }
    }
    match &plan.link {
        LinkPlan::Tap => {
            let tap = sys::tap_create(&plan.tap, plan.vnet_hdr).map_err(at(Step::CreateTap))?;
            if let Some(a) = &plan.address {
                configure(plan, a).map_err(at(Step::Configure))?;
            }
            sys::send_fds(sock, &[tap.as_raw_fd()]).map_err(at(Step::SendFd))?;
        }
        LinkPlan::Ring {
            peer,
            veth_msg,
            fd_at,
        } => {
            let (tx, rx) = make_ring_link(plan, peer, veth_msg, *fd_at)?;
            sys::send_fds(sock, &[tx.as_raw_fd(), rx.as_raw_fd()]).map_err(at(Step::SendFd))?;
        }
    }
    if matches!(plan.enter, Enter::New { .. }) {
        crate::process::remount_sys();
    }
    Ok(())
}

/// In the child, in the container's namespace: makes rnat's private namespace, the veth pair
/// between the two, and the packet sockets on the peer; returns (tx, rx) and leaves the thread in
/// the container's namespace again.
fn make_ring_link(
    plan: &TapPlan,
    peer: &IfName,
    veth_msg: &[u8],
    fd_at: usize,
) -> Result<(OwnedFd, OwnedFd), (Step, io::Error)> {
    let at = |step: Step| move |e: io::Error| (step, e);
    let container = sys::open_netns().map_err(at(Step::CreateTap))?;
    // SAFETY: unshare(2) with a constant flag; the child is single-threaded.
    check(unsafe { libc::unshare(libc::CLONE_NEWNET) }).map_err(at(Step::CreateTap))?;
    let private = sys::open_netns().map_err(at(Step::CreateTap))?;
    sys::enter_netns(container.as_raw_fd()).map_err(at(Step::CreateTap))?;
    sys::netlink_request_with_fd(veth_msg, fd_at, private.as_raw_fd())
        .map_err(at(Step::CreateTap))?;
    // Frames from the container must reach the ring in the order they were sent. A veth hands
    // frames to its peer's per-CPU backlog, so a TCP socket sending from two CPUs (the
    // application's and the one handling rnat's ACKs) gets them reordered, unless the peer runs
    // NAPI (GRO on) and takes them through its one queue, which it does only for frames that
    // are not TSO-capable: so no TSO on the container's end (the container's stack still
    // segments in software, and GRO on the peer joins the segments again).
    let ctl = sys::ctl_socket().map_err(at(Step::CreateTap))?;
    sys::if_set_feature(ctl.as_raw_fd(), &plan.tap, sys::ETHTOOL_STSO, false)
        .map_err(at(Step::CreateTap))?;
    if let Some(a) = &plan.address {
        configure(plan, a).map_err(at(Step::Configure))?;
    }
    sys::enter_netns(private.as_raw_fd()).map_err(at(Step::CreateTap))?;
    let socks = (|| {
        let ctl = sys::ctl_socket()?;
        sys::if_set_feature(ctl.as_raw_fd(), peer, sys::ETHTOOL_SGRO, true)?;
        sys::if_up(ctl.as_raw_fd(), peer)?;
        let index = sys::if_index(ctl.as_raw_fd(), peer)?;
        // The parent maps it with the same shape (`driver::KernelHost::attach_link`).
        let rx = sys::packet_rx_ring(index, &ring::Geometry::DEFAULT.request())?;
        let tx = sys::packet_tx(index, plan.vnet_hdr)?;
        Ok((tx, rx))
    })()
    .map_err(at(Step::CreateTap));
    sys::enter_netns(container.as_raw_fd()).map_err(at(Step::CreateTap))?;
    socks
}

/// Brings up `lo`, gives the TAP its address, MTU and queue length, and adds the default route.
fn configure(plan: &TapPlan, a: &TapAddress) -> io::Result<()> {
    let ctl = sys::ctl_socket()?;
    let s = ctl.as_raw_fd();
    let lo = IfName::new("lo").map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))?;
    sys::if_up(s, &lo)?;
    if let Some(v6) = &a.ipv6 {
        // Before the link comes up, so its link-local address is not held back either. Best
        // effort: with duplicate address detection on, addresses are usable a second later.
        let _ = sys::write_file(&v6.accept_dad, b"0");
        let _ = sys::write_file(&v6.autoconf, b"0");
    }
    if let Some(mac) = a.mac {
        sys::if_set_mac(s, &plan.tap, mac)?;
    }
    let mask = Ipv4Addr::from(u32::MAX.checked_shl(32 - u32::from(a.prefix)).unwrap_or(0));
    sys::if_configure(s, &plan.tap, a.addr, mask, a.mtu)?;
    // Best effort: a short queue costs bursts, not correctness.
    let _ = sys::netlink_request(&plan.txqlen_msg);
    sys::if_up(s, &plan.tap)?;
    // The gateway and DNS addresses are rnat's own, at a fixed MAC: known from the start, the
    // container's first packets need no ARP round trip. Waiting for one, its kernel keeps only
    // a few (`unres_qlen_bytes`) and drops the rest of a burst. Best effort: ARP still answers.
    for ip in [a.gateway, a.dns] {
        let _ = sys::add_static_arp(s, &plan.tap, ip, GATEWAY_MAC);
    }
    sys::add_default_route(s, a.gateway)?;
    if let Some(v6) = &a.ipv6 {
        let ctl6 = sys::ctl_socket6()?;
        let index = sys::if_index(s, &plan.tap)?;
        sys::add_addr6(ctl6.as_raw_fd(), index, v6.addr, 64)?;
        sys::add_default_route6(ctl6.as_raw_fd(), index, v6.gateway)?;
    }
    Ok(())
}

/// A connected pair of UNIX sockets for passing the TAP's fd (close-on-exec).
pub fn fd_channel() -> io::Result<(OwnedFd, OwnedFd)> {
    nix::sys::socket::socketpair(
        nix::sys::socket::AddressFamily::Unix,
        nix::sys::socket::SockType::SeqPacket,
        None,
        nix::sys::socket::SockFlag::SOCK_CLOEXEC,
    )
    .map_err(io::Error::from)
}

/// Why no TAP came back from the child.
#[derive(Debug)]
pub enum TapError {
    /// The child failed at this step.
    Step(Step, io::Error),
    Other(io::Error),
}

/// Receives the link's fds from the child, or the step at which it failed.
/// `ring`: whether the plan asked for the ring link (two fds) rather than a TAP (one).
pub fn recv_link(sock: RawFd, ring: bool) -> Result<Link, TapError> {
    let mut msg = [0u8; 5];
    match sys::recv_fds(sock, &mut msg) {
        Ok((fds, _)) if !fds.is_empty() => {
            let mut fds = fds.into_iter();
            let tx = fds
                .next()
                .ok_or(TapError::Other(io::Error::from_raw_os_error(libc::EBADF)))?;
            let rx = fds.next();
            if rx.is_some() != ring {
                return Err(TapError::Other(io::Error::new(
                    io::ErrorKind::InvalidData,
                    "the namespace helper sent the wrong number of descriptors",
                )));
            }
            Ok(Link { tx, rx })
        }
        Ok((_, 5)) => {
            let errno = i32::from_ne_bytes([msg[1], msg[2], msg[3], msg[4]]);
            match Step::from_u8(msg[0]) {
                Some(step) => Err(TapError::Step(step, io::Error::from_raw_os_error(errno))),
                None => Err(TapError::Other(io::Error::from_raw_os_error(errno))),
            }
        }
        Ok(_) => Err(TapError::Other(io::Error::new(
            io::ErrorKind::UnexpectedEof,
            "the namespace helper exited without the container's network device",
        ))),
        Err(e) => Err(TapError::Other(e)),
    }
}

/// For `rnat attach`: forks a child that joins existing namespaces and makes the TAP there;
/// returns its fd. Must be called while this process has a single thread.
pub fn link_in_existing(plan: &TapPlan) -> Result<Link, TapError> {
    let (ours, theirs) = fd_channel().map_err(TapError::Other)?;
    // SAFETY: the process is single-threaded here (the caller's contract), so the child may do
    // anything; it only runs `enter_and_make_tap` and exits without unwinding.
    match unsafe { nix::unistd::fork() }.map_err(|e| TapError::Other(e.into()))? {
        nix::unistd::ForkResult::Child => {
            let code = match enter_and_make_tap(plan, theirs.as_raw_fd()) {
                Ok(()) => 0,
                Err((step, e)) => {
                    let msg = encode_failure(step, &e);
                    // SAFETY: send(2) of a small buffer on an open socket.
                    unsafe { libc::send(theirs.as_raw_fd(), msg.as_ptr().cast(), msg.len(), 0) };
                    1
                }
            };
            // SAFETY: _exit(2) ends the child without running the parent's destructors.
            unsafe { libc::_exit(code) }
        }
        nix::unistd::ForkResult::Parent { child } => {
            drop(theirs);
            let got = recv_link(ours.as_raw_fd(), plan.link.is_ring());
            let _ = nix::sys::wait::waitpid(child, None);
            got
        }
    }
}
