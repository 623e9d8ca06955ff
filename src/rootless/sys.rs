//! The system calls rootless mode needs that neither std nor nix wraps: TAP creation and offloads,
//! interface and route configuration by ioctl, fd passing, peek offsets, pidfds.
//!
//! Everything here that `ns::enter_and_make_tap` calls runs in a forked child before exec, so it
//! makes raw syscalls on memory prepared before the fork and never allocates.

use std::io;
use std::net::Ipv4Addr;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};

/// `SO_PEEK_OFF` (asm-generic/socket.h); TCP honours it since Linux 6.10.
const SO_PEEK_OFF: libc::c_int = 42;

fn cvt(r: libc::c_int) -> io::Result<libc::c_int> {
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(r)
    }
}

/// An interface name as the kernel wants it in `struct ifreq`.
#[derive(Clone, Copy)]
pub struct IfName([libc::c_char; libc::IFNAMSIZ]);

impl IfName {
    pub fn new(name: &str) -> Result<IfName, String> {
        if name.is_empty()
            || name.len() >= libc::IFNAMSIZ
            || name
                .bytes()
                .any(|b| b == 0 || b == b'/' || b.is_ascii_whitespace())
        {
            return Err(format!("invalid interface name {name:?}"));
        }
        let mut n = [0 as libc::c_char; libc::IFNAMSIZ];
        for (d, s) in n.iter_mut().zip(name.bytes()) {
            *d = s as libc::c_char;
        }
        Ok(IfName(n))
    }
}

fn ifreq(name: &IfName) -> libc::ifreq {
    // SAFETY: ifreq is plain old data; all-zero is a valid value.
    let mut r: libc::ifreq = unsafe { std::mem::zeroed() };
    r.ifr_name = name.0;
    r
}

fn sockaddr_in(ip: Ipv4Addr) -> libc::sockaddr {
    let sin = libc::sockaddr_in {
        sin_family: libc::AF_INET as libc::sa_family_t,
        sin_port: 0,
        sin_addr: libc::in_addr {
            s_addr: u32::from(ip).to_be(),
        },
        sin_zero: [0; 8],
    };
    // SAFETY: sockaddr_in and sockaddr have the same size; the kernel reads it by family.
    unsafe { std::mem::transmute::<libc::sockaddr_in, libc::sockaddr>(sin) }
}

/// Creates TAP device `name` in the calling thread's network namespace and returns its queue fd
/// (non-blocking, close-on-exec). With `vnet_hdr`, frames carry a virtio-net header and the
/// device is told it may hand over checksum-less and TSO frames.
pub fn tap_create(name: &IfName, vnet_hdr: bool) -> io::Result<OwnedFd> {
    // SAFETY: open(2) on a constant NUL-terminated path.
    let fd = cvt(unsafe {
        libc::open(
            c"/dev/net/tun".as_ptr(),
            libc::O_RDWR | libc::O_CLOEXEC | libc::O_NONBLOCK,
        )
    })?;
    // SAFETY: fd was just opened and is owned by nothing else.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    let mut r = ifreq(name);
    let mut flags = libc::IFF_TAP | libc::IFF_NO_PI;
    if vnet_hdr {
        flags |= libc::IFF_VNET_HDR;
    }
    r.ifr_ifru.ifru_flags = flags as libc::c_short;
    // SAFETY: TUNSETIFF reads a struct ifreq, which `r` is.
    cvt(unsafe { libc::ioctl(fd.as_raw_fd(), libc::TUNSETIFF, &mut r) })?;
    if vnet_hdr {
        let offloads = libc::TUN_F_CSUM | libc::TUN_F_TSO4 | libc::TUN_F_TSO6;
        // SAFETY: TUNSETOFFLOAD takes an unsigned long by value.
        cvt(unsafe {
            libc::ioctl(
                fd.as_raw_fd(),
                libc::TUNSETOFFLOAD,
                offloads as libc::c_ulong,
            )
        })?;
    }
    Ok(fd)
}

/// An AF_INET datagram socket to configure interfaces with.
pub fn ctl_socket() -> io::Result<OwnedFd> {
    // SAFETY: socket(2) with constant arguments.
    let fd = cvt(unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) })?;
    // SAFETY: fd was just created and is owned by nothing else.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

fn ioctl_ifreq(sock: RawFd, req: libc::Ioctl, r: &mut libc::ifreq) -> io::Result<()> {
    // SAFETY: every request passed here reads or writes a struct ifreq.
    cvt(unsafe { libc::ioctl(sock, req, r as *mut libc::ifreq) }).map(drop)
}

/// Sets the IFF_UP flag of `name`.
pub fn if_up(sock: RawFd, name: &IfName) -> io::Result<()> {
    let mut r = ifreq(name);
    ioctl_ifreq(sock, libc::SIOCGIFFLAGS, &mut r)?;
    // SAFETY: SIOCGIFFLAGS filled the flags member of the union.
    let flags = unsafe { r.ifr_ifru.ifru_flags };
    r.ifr_ifru.ifru_flags = flags | libc::IFF_UP as libc::c_short;
    ioctl_ifreq(sock, libc::SIOCSIFFLAGS, &mut r)
}

/// Gives `name` an address, netmask and MTU.
pub fn if_configure(
    sock: RawFd,
    name: &IfName,
    addr: Ipv4Addr,
    mask: Ipv4Addr,
    mtu: u16,
) -> io::Result<()> {
    let mut r = ifreq(name);
    r.ifr_ifru.ifru_addr = sockaddr_in(addr);
    ioctl_ifreq(sock, libc::SIOCSIFADDR, &mut r)?;
    let mut r = ifreq(name);
    r.ifr_ifru.ifru_netmask = sockaddr_in(mask);
    ioctl_ifreq(sock, libc::SIOCSIFNETMASK, &mut r)?;
    let mut r = ifreq(name);
    r.ifr_ifru.ifru_mtu = libc::c_int::from(mtu);
    ioctl_ifreq(sock, libc::SIOCSIFMTU, &mut r)
}

/// An RTM_NEWLINK request setting the transmit queue length of the link named `name` (built
/// before a fork; sent by `netlink_request`). The ioctl for this needs privilege over the initial
/// namespace; rtnetlink accepts it from the namespace's owner.
pub fn txqlen_request(name: &str, txqlen: u32) -> Vec<u8> {
    fn attr(buf: &mut Vec<u8>, kind: u16, data: &[u8]) {
        let len = 4 + data.len();
        buf.extend_from_slice(&(len as u16).to_ne_bytes());
        buf.extend_from_slice(&kind.to_ne_bytes());
        buf.extend_from_slice(data);
        buf.resize(buf.len() + (4 - len % 4) % 4, 0);
    }
    let mut m = vec![0u8; 16]; // nlmsghdr, filled below
    m.extend_from_slice(&[0u8; 16]); // ifinfomsg: AF_UNSPEC, index 0 (by name)
    let mut ifname = name.as_bytes().to_vec();
    ifname.push(0);
    attr(&mut m, libc::IFLA_IFNAME, &ifname);
    attr(&mut m, libc::IFLA_TXQLEN, &txqlen.to_ne_bytes());
    let len = m.len() as u32;
    m[0..4].copy_from_slice(&len.to_ne_bytes());
    m[4..6].copy_from_slice(&libc::RTM_NEWLINK.to_ne_bytes());
    let flags = (libc::NLM_F_REQUEST | libc::NLM_F_ACK) as u16;
    m[6..8].copy_from_slice(&flags.to_ne_bytes());
    m[8..12].copy_from_slice(&1u32.to_ne_bytes());
    m
}

/// Sends one prepared rtnetlink request and waits for its acknowledgement.
pub fn netlink_request(msg: &[u8]) -> io::Result<()> {
    // SAFETY: socket(2) with constant arguments.
    let fd = cvt(unsafe {
        libc::socket(
            libc::AF_NETLINK,
            libc::SOCK_RAW | libc::SOCK_CLOEXEC,
            libc::NETLINK_ROUTE,
        )
    })?;
    // SAFETY: fd was just created and is owned by nothing else.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    // SAFETY: send(2) of a valid buffer.
    if unsafe { libc::send(fd.as_raw_fd(), msg.as_ptr().cast(), msg.len(), 0) } < 0 {
        return Err(io::Error::last_os_error());
    }
    let mut ack = [0u8; 256];
    // SAFETY: recv(2) into a valid buffer.
    let n = unsafe { libc::recv(fd.as_raw_fd(), ack.as_mut_ptr().cast(), ack.len(), 0) };
    if n < 20 {
        return Err(io::Error::last_os_error());
    }
    // NLMSG_ERROR carries the request's errno (0: done) after the 16-byte header.
    let errno = i32::from_ne_bytes([ack[16], ack[17], ack[18], ack[19]]);
    if errno < 0 {
        return Err(io::Error::from_raw_os_error(-errno));
    }
    Ok(())
}

/// Sets `name`'s hardware address.
pub fn if_set_mac(sock: RawFd, name: &IfName, mac: [u8; 6]) -> io::Result<()> {
    let mut r = ifreq(name);
    // SAFETY: sockaddr is plain old data.
    let mut sa: libc::sockaddr = unsafe { std::mem::zeroed() };
    sa.sa_family = libc::ARPHRD_ETHER;
    for (d, s) in sa.sa_data.iter_mut().zip(mac) {
        *d = s as libc::c_char;
    }
    r.ifr_ifru.ifru_hwaddr = sa;
    ioctl_ifreq(sock, libc::SIOCSIFHWADDR, &mut r)
}

/// `struct rtentry` from <net/route.h> (glibc's layout; the libc crate has it only for musl).
#[repr(C)]
struct RtEntry {
    rt_pad1: libc::c_ulong,
    rt_dst: libc::sockaddr,
    rt_gateway: libc::sockaddr,
    rt_genmask: libc::sockaddr,
    rt_flags: libc::c_ushort,
    rt_pad2: libc::c_short,
    rt_pad3: libc::c_ulong,
    rt_pad4: *mut libc::c_void,
    rt_metric: libc::c_short,
    rt_dev: *mut libc::c_char,
    rt_mtu: libc::c_ulong,
    rt_window: libc::c_ulong,
    rt_irtt: libc::c_ushort,
}

/// Adds a default route through `gateway`.
pub fn add_default_route(sock: RawFd, gateway: Ipv4Addr) -> io::Result<()> {
    let mut rt = RtEntry {
        rt_pad1: 0,
        rt_dst: sockaddr_in(Ipv4Addr::UNSPECIFIED),
        rt_gateway: sockaddr_in(gateway),
        rt_genmask: sockaddr_in(Ipv4Addr::UNSPECIFIED),
        rt_flags: libc::RTF_UP | libc::RTF_GATEWAY,
        rt_pad2: 0,
        rt_pad3: 0,
        rt_pad4: std::ptr::null_mut(),
        rt_metric: 0,
        rt_dev: std::ptr::null_mut(),
        rt_mtu: 0,
        rt_window: 0,
        rt_irtt: 0,
    };
    // SAFETY: SIOCADDRT reads a struct rtentry, which RtEntry lays out; its pointers are null.
    cvt(unsafe { libc::ioctl(sock, libc::SIOCADDRT, &mut rt as *mut RtEntry) }).map(drop)
}

/// Writes `data` to the file at `path` (a /proc file), in one write.
pub fn write_file(path: &std::ffi::CStr, data: &[u8]) -> io::Result<()> {
    // SAFETY: open(2) on a NUL-terminated path.
    let fd = cvt(unsafe { libc::open(path.as_ptr(), libc::O_WRONLY | libc::O_CLOEXEC) })?;
    // SAFETY: fd is open; data is a valid slice.
    let n = unsafe { libc::write(fd, data.as_ptr().cast(), data.len()) };
    let err = io::Error::last_os_error();
    // SAFETY: fd is ours to close.
    unsafe { libc::close(fd) };
    if n < 0 {
        return Err(err);
    }
    Ok(())
}

/// Sends `fd` over the UNIX socket `sock` (SCM_RIGHTS), with one byte of payload.
pub fn send_fd(sock: RawFd, fd: RawFd) -> io::Result<()> {
    let mut byte = [b'T'];
    let mut iov = libc::iovec {
        iov_base: byte.as_mut_ptr().cast(),
        iov_len: 1,
    };
    // Room for one fd, aligned as cmsghdr requires.
    let mut cbuf = [0u64; 4];
    // SAFETY: msghdr is plain old data.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    msg.msg_control = cbuf.as_mut_ptr().cast();
    // SAFETY: CMSG_SPACE is a pure computation.
    msg.msg_controllen = unsafe { libc::CMSG_SPACE(std::mem::size_of::<RawFd>() as u32) } as usize;
    // SAFETY: msg_control points at a buffer of msg_controllen bytes, large enough for one
    // header, so CMSG_FIRSTHDR is non-null and its data has room for one fd.
    unsafe {
        let c = libc::CMSG_FIRSTHDR(&msg);
        (*c).cmsg_level = libc::SOL_SOCKET;
        (*c).cmsg_type = libc::SCM_RIGHTS;
        (*c).cmsg_len = libc::CMSG_LEN(std::mem::size_of::<RawFd>() as u32) as usize;
        std::ptr::write_unaligned(libc::CMSG_DATA(c).cast::<RawFd>(), fd);
    }
    // SAFETY: msg describes valid buffers for the duration of the call.
    let n = unsafe { libc::sendmsg(sock, &msg, libc::MSG_NOSIGNAL) };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Receives one message into `payload`: the fd it carried (SCM_RIGHTS), if any, and its length.
pub fn recv_fd(sock: RawFd, payload: &mut [u8]) -> io::Result<(Option<OwnedFd>, usize)> {
    let mut iov = libc::iovec {
        iov_base: payload.as_mut_ptr().cast(),
        iov_len: payload.len(),
    };
    let mut cbuf = [0u64; 4];
    // SAFETY: msghdr is plain old data.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    msg.msg_control = cbuf.as_mut_ptr().cast();
    msg.msg_controllen = std::mem::size_of_val(&cbuf);
    // SAFETY: msg describes valid buffers for the duration of the call.
    let n = unsafe { libc::recvmsg(sock, &mut msg, libc::MSG_CMSG_CLOEXEC) };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    if msg.msg_flags & libc::MSG_CTRUNC != 0 {
        // The fd sent could not be installed (no descriptor free): the message itself arrived.
        return Err(io::Error::from_raw_os_error(libc::EMFILE));
    }
    // SAFETY: the kernel filled msg_control; CMSG_FIRSTHDR checks msg_controllen before returning
    // a header, and the data of an SCM_RIGHTS header holds the fds.
    unsafe {
        let c = libc::CMSG_FIRSTHDR(&msg);
        if c.is_null() || (*c).cmsg_level != libc::SOL_SOCKET || (*c).cmsg_type != libc::SCM_RIGHTS
        {
            return Ok((None, n as usize));
        }
        let fd = std::ptr::read_unaligned(libc::CMSG_DATA(c).cast::<RawFd>());
        Ok((Some(OwnedFd::from_raw_fd(fd)), n as usize))
    }
}

/// Sets a socket's peek offset (`SO_PEEK_OFF`); `-1` turns peek offsets off.
pub fn set_peek_off(sock: RawFd, off: libc::c_int) -> io::Result<()> {
    // SAFETY: setsockopt with a pointer to an int of the stated size.
    cvt(unsafe {
        libc::setsockopt(
            sock,
            libc::SOL_SOCKET,
            SO_PEEK_OFF,
            (&off as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as u32,
        )
    })
    .map(drop)
}

/// Sends datagrams `(destination, bytes)` on UDP socket `fd` with one `sendmmsg(2)` per 64;
/// returns how many the kernel took (it stops at the first one it refuses, e.g. a full buffer).
pub fn send_datagrams(fd: RawFd, msgs: &[(std::net::SocketAddrV4, &[u8])]) -> usize {
    let mut sent = 0;
    for chunk in msgs.chunks(64) {
        let mut addrs: Vec<libc::sockaddr_in> = chunk
            .iter()
            .map(|(a, _)| libc::sockaddr_in {
                sin_family: libc::AF_INET as libc::sa_family_t,
                sin_port: a.port().to_be(),
                sin_addr: libc::in_addr {
                    s_addr: u32::from(*a.ip()).to_be(),
                },
                sin_zero: [0; 8],
            })
            .collect();
        let mut iovs: Vec<libc::iovec> = chunk
            .iter()
            .map(|(_, d)| libc::iovec {
                iov_base: d.as_ptr() as *mut libc::c_void,
                iov_len: d.len(),
            })
            .collect();
        let mut hdrs: Vec<libc::mmsghdr> = (0..chunk.len())
            .map(|i| {
                // SAFETY: msghdr is plain old data; the fields set point into `addrs` and `iovs`,
                // which outlive the call below.
                let mut h: libc::msghdr = unsafe { std::mem::zeroed() };
                h.msg_name = (&mut addrs[i] as *mut libc::sockaddr_in).cast();
                h.msg_namelen = std::mem::size_of::<libc::sockaddr_in>() as u32;
                h.msg_iov = &mut iovs[i];
                h.msg_iovlen = 1;
                libc::mmsghdr {
                    msg_hdr: h,
                    msg_len: 0,
                }
            })
            .collect();
        // SAFETY: `hdrs` holds `len` initialised headers whose buffers are alive.
        let n =
            unsafe { libc::sendmmsg(fd, hdrs.as_mut_ptr(), hdrs.len() as u32, libc::MSG_DONTWAIT) };
        if n <= 0 {
            break;
        }
        sent += n as usize;
        if (n as usize) < chunk.len() {
            break;
        }
    }
    sent
}

/// `SOL_UDP` / `UDP_SEGMENT` (linux/udp.h): send a buffer as datagrams of the given size.
const SOL_UDP: libc::c_int = 17;
const UDP_SEGMENT: libc::c_int = 103;

/// Sends `data` to `dst` as datagrams of `size` bytes (the last may be shorter) in one
/// `sendmsg(2)` with UDP generic segmentation offload. Returns the datagrams sent.
pub fn send_segmented(
    fd: RawFd,
    dst: std::net::SocketAddrV4,
    data: &[u8],
    size: u16,
) -> io::Result<usize> {
    let mut addr = libc::sockaddr_in {
        sin_family: libc::AF_INET as libc::sa_family_t,
        sin_port: dst.port().to_be(),
        sin_addr: libc::in_addr {
            s_addr: u32::from(*dst.ip()).to_be(),
        },
        sin_zero: [0; 8],
    };
    let mut iov = libc::iovec {
        iov_base: data.as_ptr() as *mut libc::c_void,
        iov_len: data.len(),
    };
    let mut cbuf = [0u64; 4];
    // SAFETY: msghdr is plain old data; its pointers reference locals alive during the call.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_name = (&mut addr as *mut libc::sockaddr_in).cast();
    msg.msg_namelen = std::mem::size_of::<libc::sockaddr_in>() as u32;
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    msg.msg_control = cbuf.as_mut_ptr().cast();
    // SAFETY: CMSG_SPACE/CMSG_LEN are pure; the control buffer has room for one u16 option, so
    // CMSG_FIRSTHDR is non-null.
    unsafe {
        msg.msg_controllen = libc::CMSG_SPACE(2) as usize;
        let c = libc::CMSG_FIRSTHDR(&msg);
        (*c).cmsg_level = SOL_UDP;
        (*c).cmsg_type = UDP_SEGMENT;
        (*c).cmsg_len = libc::CMSG_LEN(2) as usize;
        std::ptr::write_unaligned(libc::CMSG_DATA(c).cast::<u16>(), size);
    }
    // SAFETY: msg describes valid buffers for the duration of the call.
    let n = unsafe { libc::sendmsg(fd, &msg, libc::MSG_DONTWAIT) };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(data.len().div_ceil(usize::from(size)))
}

/// Whether the peer of stream socket `fd` has shut down its sending side (POLLRDHUP, which nix's
/// poll flags do not carry).
pub fn peer_closed(fd: RawFd) -> bool {
    let mut p = libc::pollfd {
        fd,
        events: libc::POLLRDHUP,
        revents: 0,
    };
    // SAFETY: poll(2) on one valid pollfd, without waiting.
    let r = unsafe { libc::poll(&mut p, 1, 0) };
    r == 1 && p.revents & (libc::POLLRDHUP | libc::POLLHUP) != 0
}

/// slirp4netns' `--enable-sandbox`: a private mount namespace whose root is an empty tmpfs (no
/// file of the host is reachable any more), and no capability but CAP_NET_BIND_SERVICE.
pub fn enter_sandbox() -> io::Result<()> {
    let c = |r: libc::c_int| cvt(r).map(drop);
    // SAFETY: unshare/mount/mkdir/pivot_root/chdir/umount2 with constant NUL-terminated strings.
    unsafe {
        c(libc::unshare(libc::CLONE_NEWNS))?;
        c(libc::mount(
            std::ptr::null(),
            c"/".as_ptr(),
            std::ptr::null(),
            libc::MS_REC | libc::MS_PRIVATE,
            std::ptr::null(),
        ))?;
        c(libc::mount(
            c"tmpfs".as_ptr(),
            c"/tmp".as_ptr(),
            c"tmpfs".as_ptr(),
            0,
            c"size=64k,mode=0700".as_ptr().cast(),
        ))?;
        c(libc::mkdir(c"/tmp/old".as_ptr(), 0o700))?;
        c(
            libc::syscall(libc::SYS_pivot_root, c"/tmp".as_ptr(), c"/tmp/old".as_ptr())
                as libc::c_int,
        )?;
        c(libc::chdir(c"/".as_ptr()))?;
        c(libc::umount2(c"/old".as_ptr(), libc::MNT_DETACH))?;
        libc::rmdir(c"/old".as_ptr());
    }
    // Capabilities: only binding low ports stays (what slirp4netns keeps).
    const CAP_NET_BIND_SERVICE: u32 = 10;
    for cap in 0..64 {
        if cap != CAP_NET_BIND_SERVICE {
            // SAFETY: prctl with integer arguments; an unknown cap number fails harmlessly.
            unsafe { libc::prctl(libc::PR_CAPBSET_DROP, cap as libc::c_ulong, 0, 0, 0) };
        }
    }
    #[repr(C)]
    struct Header {
        version: u32,
        pid: libc::c_int,
    }
    #[repr(C)]
    #[derive(Clone, Copy)]
    struct Data {
        effective: u32,
        permitted: u32,
        inheritable: u32,
    }
    let mut h = Header {
        version: 0x2008_0522,
        pid: 0,
    };
    let keep = 1u32 << CAP_NET_BIND_SERVICE;
    let mut d = [Data {
        effective: 0,
        permitted: 0,
        inheritable: 0,
    }; 2];
    // SAFETY: capget/capset with a v3 header and two data structs, as the kernel expects.
    unsafe {
        c(libc::syscall(libc::SYS_capget, &mut h as *mut Header, d.as_mut_ptr()) as libc::c_int)?;
        for x in d.iter_mut() {
            x.inheritable = 0;
        }
        d[0].effective &= keep;
        d[0].permitted &= keep;
        d[1].effective = 0;
        d[1].permitted = 0;
        c(libc::syscall(libc::SYS_capset, &mut h as *mut Header, d.as_ptr()) as libc::c_int)?;
    }
    Ok(())
}

/// A pidfd for `pid` (readable once the process has exited).
pub fn pidfd_open(pid: libc::pid_t) -> io::Result<OwnedFd> {
    // SAFETY: pidfd_open(2) takes a pid and flags and returns a new fd or -1.
    let r = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) };
    if r < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: the syscall returned a new fd that nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(r as RawFd) })
}

/// Raises the soft limit on open files to the hard limit; returns the new limit.
pub fn raise_nofile() -> u64 {
    // SAFETY: getrlimit/setrlimit with a pointer to a valid rlimit.
    unsafe {
        let mut rl: libc::rlimit = std::mem::zeroed();
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut rl) != 0 {
            return 1024;
        }
        if rl.rlim_cur < rl.rlim_max {
            rl.rlim_cur = rl.rlim_max;
            if libc::setrlimit(libc::RLIMIT_NOFILE, &rl) != 0 {
                libc::getrlimit(libc::RLIMIT_NOFILE, &mut rl);
            }
        }
        rl.rlim_cur
    }
}
