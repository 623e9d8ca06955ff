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

/// System calls the serving engine never makes, refused (`EPERM`) once `--enable-seccomp` has
/// installed its filter: running programs, tracing or reading other processes, mounts, kernel
/// modules, keys, BPF, clocks, swap, reboot. `setns` and `prctl` stay: the socket maker that
/// rnat forks again when one dies enters the container's namespaces and asks for its parent's
/// death signal.
#[cfg(target_arch = "x86_64")]
const SECCOMP_DENIED: &[libc::c_long] = &[
    libc::SYS_execve,
    libc::SYS_execveat,
    libc::SYS_ptrace,
    libc::SYS_process_vm_readv,
    libc::SYS_process_vm_writev,
    libc::SYS_pidfd_getfd,
    libc::SYS_mount,
    libc::SYS_umount2,
    libc::SYS_pivot_root,
    libc::SYS_chroot,
    libc::SYS_unshare,
    libc::SYS_open_by_handle_at,
    libc::SYS_name_to_handle_at,
    libc::SYS_fsopen,
    libc::SYS_fsmount,
    libc::SYS_fsconfig,
    libc::SYS_move_mount,
    libc::SYS_open_tree,
    libc::SYS_mount_setattr,
    libc::SYS_init_module,
    libc::SYS_finit_module,
    libc::SYS_delete_module,
    libc::SYS_kexec_load,
    libc::SYS_kexec_file_load,
    libc::SYS_reboot,
    libc::SYS_swapon,
    libc::SYS_swapoff,
    libc::SYS_bpf,
    libc::SYS_perf_event_open,
    libc::SYS_keyctl,
    libc::SYS_add_key,
    libc::SYS_request_key,
    libc::SYS_lookup_dcookie,
    libc::SYS_acct,
    libc::SYS_quotactl,
    libc::SYS_settimeofday,
    libc::SYS_clock_settime,
    libc::SYS_adjtimex,
    libc::SYS_clock_adjtime,
    libc::SYS_iopl,
    libc::SYS_ioperm,
    libc::SYS_userfaultfd,
    libc::SYS_uselib,
];

/// The seccomp BPF program for `SECCOMP_DENIED`: another architecture's calls (or x32's) are
/// refused too, everything else allowed.
#[cfg(target_arch = "x86_64")]
fn seccomp_program() -> Vec<libc::sock_filter> {
    const LD_ABS_W: u16 = 0x20; // BPF_LD | BPF_W | BPF_ABS
    const JEQ_K: u16 = 0x15; // BPF_JMP | BPF_JEQ | BPF_K
    const JGE_K: u16 = 0x35; // BPF_JMP | BPF_JGE | BPF_K
    const RET_K: u16 = 0x06; // BPF_RET | BPF_K
    const AUDIT_ARCH_X86_64: u32 = 0xc000_003e;
    const X32_SYSCALL_BIT: u32 = 0x4000_0000;
    const RET_ALLOW: u32 = 0x7fff_0000;
    const RET_EPERM: u32 = 0x0005_0000 | libc::EPERM as u32;
    let op = |code, jt, jf, k| libc::sock_filter { code, jt, jf, k };
    let n = SECCOMP_DENIED.len();
    // Layout: 0 load arch, 1 check it, 2 load nr, 3 x32, then one test per call, ALLOW, DENY.
    let mut p = vec![
        op(LD_ABS_W, 0, 0, 4), // seccomp_data.arch
        op(JEQ_K, 1, 0, AUDIT_ARCH_X86_64),
        op(RET_K, 0, 0, RET_EPERM),
        op(LD_ABS_W, 0, 0, 0), // seccomp_data.nr
        op(JGE_K, (n + 1) as u8, 0, X32_SYSCALL_BIT),
    ];
    for (i, nr) in SECCOMP_DENIED.iter().enumerate() {
        p.push(op(JEQ_K, (n - i) as u8, 0, *nr as u32));
    }
    p.push(op(RET_K, 0, 0, RET_ALLOW));
    p.push(op(RET_K, 0, 0, RET_EPERM));
    p
}

/// Installs the `SECCOMP_DENIED` filter for this process (single-threaded here) and what it
/// forks from now on. Needs `no_new_privs`, which it sets.
#[cfg(target_arch = "x86_64")]
pub fn install_seccomp() -> io::Result<()> {
    let mut prog = seccomp_program();
    let fprog = libc::sock_fprog {
        len: prog.len() as u16,
        filter: prog.as_mut_ptr(),
    };
    // SAFETY: prctl with integer arguments.
    cvt(unsafe { libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) })?;
    // SAFETY: PR_SET_SECCOMP reads the sock_fprog, whose filter points into `prog`, alive here.
    cvt(unsafe {
        libc::prctl(
            libc::PR_SET_SECCOMP,
            libc::SECCOMP_MODE_FILTER,
            &fprog as *const libc::sock_fprog,
        )
    })
    .map(drop)
}

/// Seccomp filters are written for x86_64 only.
#[cfg(not(target_arch = "x86_64"))]
pub fn install_seccomp() -> io::Result<()> {
    Err(io::Error::from(io::ErrorKind::Unsupported))
}

/// An IPv6 datagram socket for the interface ioctls that take IPv6 addresses.
pub fn ctl_socket6() -> io::Result<OwnedFd> {
    // SAFETY: socket(2) with constant arguments.
    let fd =
        cvt(unsafe { libc::socket(libc::AF_INET6, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) })?;
    // SAFETY: fd was just created and is owned by nothing else.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// Adds IPv6 address `addr`/`prefix` to interface `ifindex` (`sock6` from `ctl_socket6`).
pub fn add_addr6(
    sock6: RawFd,
    ifindex: libc::c_int,
    addr: std::net::Ipv6Addr,
    prefix: u8,
) -> io::Result<()> {
    let mut r = libc::in6_ifreq {
        ifr6_addr: libc::in6_addr {
            s6_addr: addr.octets(),
        },
        ifr6_prefixlen: u32::from(prefix),
        ifr6_ifindex: ifindex,
    };
    // SAFETY: SIOCSIFADDR on an IPv6 socket reads a struct in6_ifreq, fully initialised here.
    cvt(unsafe { libc::ioctl(sock6, libc::SIOCSIFADDR, &mut r as *mut libc::in6_ifreq) }).map(drop)
}

/// `struct in6_rtmsg` (linux/ipv6_route.h); libc's has private fields.
#[repr(C)]
struct In6Rtmsg {
    dst: [u8; 16],
    src: [u8; 16],
    gateway: [u8; 16],
    rtype: u32,
    dst_len: u16,
    src_len: u16,
    metric: u32,
    info: libc::c_ulong,
    flags: u32,
    ifindex: libc::c_int,
}

/// Adds an IPv6 default route through `gateway` on interface `ifindex`.
pub fn add_default_route6(
    sock6: RawFd,
    ifindex: libc::c_int,
    gateway: std::net::Ipv6Addr,
) -> io::Result<()> {
    let mut rt = In6Rtmsg {
        dst: [0; 16],
        src: [0; 16],
        gateway: gateway.octets(),
        rtype: 0,
        dst_len: 0,
        src_len: 0,
        metric: 1,
        info: 0,
        flags: u32::from(libc::RTF_UP | libc::RTF_GATEWAY),
        ifindex,
    };
    // SAFETY: SIOCADDRT on an IPv6 socket reads a struct in6_rtmsg, which In6Rtmsg lays out.
    cvt(unsafe { libc::ioctl(sock6, libc::SIOCADDRT, &mut rt as *mut In6Rtmsg) }).map(drop)
}

/// `ATF_COM | ATF_PERM` (linux/if_arp.h): a complete entry that never expires.
const ATF_COM_PERM: libc::c_int = 0x02 | 0x04;

/// Adds a permanent ARP entry on interface `name`: `ip` is at `mac`.
pub fn add_static_arp(sock: RawFd, name: &IfName, ip: Ipv4Addr, mac: [u8; 6]) -> io::Result<()> {
    let mut ha = libc::sockaddr {
        sa_family: libc::ARPHRD_ETHER,
        sa_data: [0; 14],
    };
    for (d, m) in ha.sa_data.iter_mut().zip(mac) {
        *d = m as libc::c_char;
    }
    let mut req = libc::arpreq {
        arp_pa: sockaddr_in(ip),
        arp_ha: ha,
        arp_flags: ATF_COM_PERM,
        arp_netmask: sockaddr_in(Ipv4Addr::UNSPECIFIED),
        arp_dev: name.0,
    };
    // SAFETY: SIOCSARP reads a struct arpreq, fully initialised here.
    cvt(unsafe { libc::ioctl(sock, libc::SIOCSARP, &mut req as *mut libc::arpreq) }).map(drop)
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

/// The most fds one message carries here.
const MAX_FDS: usize = 2;

/// Sends `fd` over the UNIX socket `sock` (SCM_RIGHTS), with one byte of payload.
pub fn send_fd(sock: RawFd, fd: RawFd) -> io::Result<()> {
    send_fds(sock, &[fd])
}

/// Sends up to two fds over the UNIX socket `sock` (SCM_RIGHTS) in one message, with one byte of
/// payload. No allocation (the child of a fork calls it).
pub fn send_fds(sock: RawFd, fds: &[RawFd]) -> io::Result<()> {
    if fds.is_empty() || fds.len() > MAX_FDS {
        return Err(io::Error::from_raw_os_error(libc::EINVAL));
    }
    let mut byte = [b'T'];
    let mut iov = libc::iovec {
        iov_base: byte.as_mut_ptr().cast(),
        iov_len: 1,
    };
    // Room for MAX_FDS fds, aligned as cmsghdr requires.
    let mut cbuf = [0u64; 4];
    let data_len = std::mem::size_of_val(fds) as u32;
    // SAFETY: msghdr is plain old data.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    msg.msg_control = cbuf.as_mut_ptr().cast();
    // SAFETY: CMSG_SPACE is a pure computation.
    msg.msg_controllen = unsafe { libc::CMSG_SPACE(data_len) } as usize;
    // SAFETY: msg_control points at a buffer of 32 bytes, at least msg_controllen (one header
    // and two fds), so CMSG_FIRSTHDR is non-null and its data has room for `fds`.
    unsafe {
        let c = libc::CMSG_FIRSTHDR(&msg);
        (*c).cmsg_level = libc::SOL_SOCKET;
        (*c).cmsg_type = libc::SCM_RIGHTS;
        (*c).cmsg_len = libc::CMSG_LEN(data_len) as usize;
        let d = libc::CMSG_DATA(c).cast::<RawFd>();
        for (i, fd) in fds.iter().enumerate() {
            std::ptr::write_unaligned(d.add(i), *fd);
        }
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
    let (fds, n) = recv_fds(sock, payload)?;
    Ok((fds.into_iter().next(), n))
}

/// Receives one message into `payload`: the fds it carried (SCM_RIGHTS; room for four, more
/// than any sender here sends), and its length.
pub fn recv_fds(sock: RawFd, payload: &mut [u8]) -> io::Result<(Vec<OwnedFd>, usize)> {
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
    let mut fds = Vec::new();
    // SAFETY: the kernel filled msg_control; CMSG_FIRSTHDR checks msg_controllen before returning
    // a header, and the data of an SCM_RIGHTS header holds (cmsg_len - CMSG_LEN(0)) / 4 fds,
    // each now owned by this process.
    unsafe {
        let c = libc::CMSG_FIRSTHDR(&msg);
        if !c.is_null() && (*c).cmsg_level == libc::SOL_SOCKET && (*c).cmsg_type == libc::SCM_RIGHTS
        {
            let count = ((*c).cmsg_len - libc::CMSG_LEN(0) as usize) / std::mem::size_of::<RawFd>();
            let d = libc::CMSG_DATA(c).cast::<RawFd>();
            for i in 0..count {
                fds.push(OwnedFd::from_raw_fd(std::ptr::read_unaligned(d.add(i))));
            }
        }
    }
    if msg.msg_flags & libc::MSG_CTRUNC != 0 {
        // An fd sent could not be installed (no descriptor free): the message itself arrived.
        return Err(io::Error::from_raw_os_error(libc::EMFILE));
    }
    Ok((fds, n as usize))
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

/// Delivers TCP urgent data in line (`SO_OOBINLINE`). Out of line, a peek skips the urgent
/// byte without counting it in the peek offset, which then lags the stream by one.
pub fn set_oob_inline(sock: RawFd) -> io::Result<()> {
    let on: libc::c_int = 1;
    // SAFETY: setsockopt with a pointer to an int of the stated size.
    cvt(unsafe {
        libc::setsockopt(
            sock,
            libc::SOL_SOCKET,
            libc::SO_OOBINLINE,
            (&on as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as u32,
        )
    })
    .map(drop)
}

/// An int-valued `SOL_SOCKET` option of `sock`.
fn socket_option(sock: RawFd, option: libc::c_int) -> io::Result<libc::c_int> {
    let mut value: libc::c_int = 0;
    let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
    // SAFETY: getsockopt with a pointer to an int and its size.
    cvt(unsafe {
        libc::getsockopt(
            sock,
            libc::SOL_SOCKET,
            option,
            (&mut value as *mut libc::c_int).cast(),
            &mut len,
        )
    })?;
    Ok(value)
}

/// Whether `SO_OOBINLINE` is on.
pub fn oob_inline(sock: RawFd) -> io::Result<bool> {
    socket_option(sock, libc::SO_OOBINLINE).map(|v| v != 0)
}

/// A socket's peek offset (`SO_PEEK_OFF`; -1 when off).
pub fn peek_off(sock: RawFd) -> io::Result<libc::c_int> {
    socket_option(sock, SO_PEEK_OFF)
}

/// Accepts a connection on listener `fd` as a non-blocking, close-on-exec socket, with its peer's
/// address (IPv4 or IPv6).
pub fn accept_nonblocking(fd: RawFd) -> io::Result<(OwnedFd, Option<std::net::SocketAddr>)> {
    // SAFETY: an all-zero sockaddr_storage is a valid value of the type.
    let mut sa: libc::sockaddr_storage = unsafe { std::mem::zeroed() };
    let mut len = std::mem::size_of::<libc::sockaddr_storage>() as libc::socklen_t;
    // SAFETY: accept4 writes at most `len` bytes of the peer's address into `sa` and returns a
    // new descriptor that nothing else owns.
    let conn = cvt(unsafe {
        libc::accept4(
            fd,
            (&mut sa as *mut libc::sockaddr_storage).cast(),
            &mut len,
            libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC,
        )
    })?;
    // SAFETY: `conn` was just returned by accept4 and is owned by no one else.
    let conn = unsafe { OwnedFd::from_raw_fd(conn) };
    Ok((conn, sockaddr_to_std(&sa, len as usize)))
}

/// The address in `sa` (of `len` bytes, as the kernel filled it), if it is IPv4 or IPv6; an
/// IPv4-mapped IPv6 address comes back as IPv4.
fn sockaddr_to_std(sa: &libc::sockaddr_storage, len: usize) -> Option<std::net::SocketAddr> {
    use std::net::{SocketAddr, SocketAddrV4, SocketAddrV6};
    match i32::from(sa.ss_family) {
        libc::AF_INET if len >= std::mem::size_of::<libc::sockaddr_in>() => {
            // SAFETY: the kernel wrote a sockaddr_in (its family and length say so), and
            // sockaddr_storage is large enough and aligned for any socket address type.
            let a = unsafe { &*(sa as *const libc::sockaddr_storage).cast::<libc::sockaddr_in>() };
            Some(SocketAddr::V4(SocketAddrV4::new(
                Ipv4Addr::from(u32::from_be(a.sin_addr.s_addr)),
                u16::from_be(a.sin_port),
            )))
        }
        libc::AF_INET6 if len >= std::mem::size_of::<libc::sockaddr_in6>() => {
            // SAFETY: as above, for a sockaddr_in6.
            let a = unsafe { &*(sa as *const libc::sockaddr_storage).cast::<libc::sockaddr_in6>() };
            let ip = std::net::Ipv6Addr::from(a.sin6_addr.s6_addr);
            let port = u16::from_be(a.sin6_port);
            Some(match ip.to_ipv4_mapped() {
                Some(v4) => SocketAddr::V4(SocketAddrV4::new(v4, port)),
                None => SocketAddr::V6(SocketAddrV6::new(
                    ip,
                    port,
                    a.sin6_flowinfo,
                    a.sin6_scope_id,
                )),
            })
        }
        _ => None,
    }
}

/// Asks the kernel to queue the ICMP errors a UDP or echo socket's datagrams meet: of IPv4
/// (`IP_RECVERR`) and of IPv6 (`IPV6_RECVERR`), as asked (a dual-stack UDP socket wants both).
/// An unconnected socket hears of none without it. Each error is then also reported once by
/// the socket's next call (see `send_datagrams`).
pub fn set_recv_errors(fd: RawFd, v4: bool, v6: bool) -> io::Result<()> {
    let s = std::mem::ManuallyDrop::new(
        // SAFETY: borrows the caller's open fd for the calls below; ManuallyDrop keeps it open.
        unsafe { socket2::Socket::from_raw_fd(fd) },
    );
    if v4 {
        nix::sys::socket::setsockopt(&*s, nix::sys::socket::sockopt::Ipv4RecvErr, &true)?;
    }
    if v6 {
        nix::sys::socket::setsockopt(&*s, nix::sys::socket::sockopt::Ipv6RecvErr, &true)?;
    }
    Ok(())
}

/// The address in `a`, if it is IPv4 or IPv6; an IPv4-mapped IPv6 address comes back as IPv4.
pub fn storage_to_std(a: &nix::sys::socket::SockaddrStorage) -> Option<std::net::SocketAddr> {
    if let Some(a) = a.as_sockaddr_in() {
        return Some(std::net::SocketAddr::V4((*a).into()));
    }
    a.as_sockaddr_in6().map(|a| {
        let a = std::net::SocketAddrV6::from(*a);
        match a.ip().to_ipv4_mapped() {
            Some(v4) => std::net::SocketAddrV4::new(v4, a.port()).into(),
            None => a.into(),
        }
    })
}

/// One entry of a socket's error queue, as `take_dgram_error` read it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct QueuedError {
    /// Where the datagram was going (an IPv4-mapped address as IPv4).
    pub dst: Option<std::net::SocketAddr>,
    /// `(origin, type, code)` of `struct sock_extended_err`: origin `SO_EE_ORIGIN_ICMP` or
    /// `SO_EE_ORIGIN_ICMP6` for an error the network sent back.
    pub cause: Option<(u8, u8, u8)>,
    /// Bytes of the datagram's payload that came back with it (at most 2 KiB are read), and
    /// the first eight of them (zeros beyond `len`).
    pub len: usize,
    pub head: [u8; 8],
}

/// Takes the oldest entry from UDP socket `fd`'s error queue (`MSG_ERRQUEUE`); `None` when the
/// queue is empty.
pub fn take_dgram_error(fd: RawFd) -> io::Result<Option<QueuedError>> {
    use nix::sys::socket::{recvmsg, ControlMessageOwned, MsgFlags, SockaddrStorage};
    let mut payload = [0u8; 2048];
    let mut iov = [io::IoSliceMut::new(&mut payload)];
    let mut cmsg = nix::cmsg_space!(libc::sock_extended_err, libc::sockaddr_in6);
    let msg = match recvmsg::<SockaddrStorage>(
        fd,
        &mut iov,
        Some(&mut cmsg),
        MsgFlags::MSG_ERRQUEUE | MsgFlags::MSG_DONTWAIT,
    ) {
        Ok(m) => m,
        Err(nix::errno::Errno::EAGAIN) => return Ok(None),
        Err(e) => return Err(e.into()),
    };
    let dst = msg.address.as_ref().and_then(storage_to_std);
    let mut cause = None;
    if let Ok(cmsgs) = msg.cmsgs() {
        for c in cmsgs {
            if let ControlMessageOwned::Ipv4RecvErr(e, _) | ControlMessageOwned::Ipv6RecvErr(e, _) =
                c
            {
                cause = Some((e.ee_origin, e.ee_type, e.ee_code));
            }
        }
    }
    let len = msg.bytes;
    let mut head = [0; 8];
    let n = len.min(8);
    head[..n].copy_from_slice(&payload[..n]);
    Ok(Some(QueuedError {
        dst,
        cause,
        len,
        head,
    }))
}

/// Sends datagrams `(destination, bytes)` on UDP socket `fd` with one `sendmmsg(2)` per 64;
/// returns how many the kernel took (it stops at the first one it refuses) and whether it
/// stopped because the socket's buffer was full (the rest may be sent when it drains).
pub fn send_datagrams(fd: RawFd, msgs: &[(std::net::SocketAddr, &[u8])]) -> (usize, bool) {
    let mut sent = 0;
    while sent < msgs.len() {
        let chunk = &msgs[sent..(sent + 64).min(msgs.len())];
        let addrs: Vec<socket2::SockAddr> = chunk
            .iter()
            .map(|(a, _)| socket2::SockAddr::from(*a))
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
                h.msg_name = addrs[i].as_ptr().cast_mut().cast();
                h.msg_namelen = addrs[i].len();
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
            let full = io::Error::last_os_error().kind() == io::ErrorKind::WouldBlock;
            if n < 0 && !full {
                // The first failure may be an ICMP error the socket reports once (it has
                // `IP_RECVERR`, see `set_recv_errors`), not this datagram's: try it alone.
                let (again, full) = send_datagrams_once(fd, &msgs[sent..sent + 1]);
                if again == 0 {
                    return (sent, full);
                }
                sent += 1;
                continue;
            }
            return (sent, n < 0 && full);
        }
        sent += n as usize;
        if (n as usize) < chunk.len() {
            // The next one was refused: send it alone to learn why (it may go now; then the
            // rest follow).
            let (again, full) = send_datagrams_once(fd, &msgs[sent..sent + 1]);
            if again == 0 {
                return (sent, full);
            }
            sent += 1;
        }
    }
    (sent, false)
}

/// One datagram through `send_datagrams`' path, for its error.
fn send_datagrams_once(fd: RawFd, msg: &[(std::net::SocketAddr, &[u8])]) -> (usize, bool) {
    let Some((dst, data)) = msg.first() else {
        return (0, false);
    };
    let s = std::mem::ManuallyDrop::new(
        // SAFETY: borrows the caller's open fd for one call; ManuallyDrop keeps it open.
        unsafe { socket2::Socket::from_raw_fd(fd) },
    );
    match s.send_to_with_flags(data, &socket2::SockAddr::from(*dst), libc::MSG_DONTWAIT) {
        Ok(_) => (1, false),
        Err(e) => (0, e.kind() == io::ErrorKind::WouldBlock),
    }
}

/// `SOL_UDP` / `UDP_SEGMENT` (linux/udp.h): send a buffer as datagrams of the given size.
const SOL_UDP: libc::c_int = 17;
const UDP_SEGMENT: libc::c_int = 103;

/// Sends `data` to `dst` as datagrams of `size` bytes (the last may be shorter) in one
/// `sendmsg(2)` with UDP generic segmentation offload. Returns the datagrams sent.
pub fn send_segmented(
    fd: RawFd,
    dst: std::net::SocketAddr,
    data: &[u8],
    size: u16,
) -> io::Result<usize> {
    let addr = socket2::SockAddr::from(dst);
    let mut iov = libc::iovec {
        iov_base: data.as_ptr() as *mut libc::c_void,
        iov_len: data.len(),
    };
    let mut cbuf = [0u64; 4];
    // SAFETY: msghdr is plain old data; its pointers reference locals alive during the call.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_name = addr.as_ptr().cast_mut().cast();
    msg.msg_namelen = addr.len();
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
    // A failure may be an ICMP error the socket reports once (see `set_recv_errors`), not this
    // send's: then the second try goes.
    let mut tries = 0;
    loop {
        // SAFETY: msg describes valid buffers for the duration of the call.
        let n = unsafe { libc::sendmsg(fd, &msg, libc::MSG_DONTWAIT) };
        if n >= 0 {
            return Ok(data.len().div_ceil(usize::from(size)));
        }
        let e = io::Error::last_os_error();
        tries += 1;
        if tries == 2 || e.kind() == io::ErrorKind::WouldBlock {
            return Err(e);
        }
    }
}

/// Whether the peer of stream socket `fd` has shut down its sending side (POLLRDHUP, which nix's
/// poll flags do not carry) and no TCP urgent data waits (POLLPRI): a peek that stopped short
/// with the peer gone reached the end of the stream, unless it stopped at the urgent mark.
pub fn peer_closed_no_urgent(fd: RawFd) -> bool {
    let mut p = libc::pollfd {
        fd,
        events: libc::POLLRDHUP | libc::POLLPRI,
        revents: 0,
    };
    // SAFETY: poll(2) on one valid pollfd, without waiting.
    let r = unsafe { libc::poll(&mut p, 1, 0) };
    r == 1 && p.revents & (libc::POLLRDHUP | libc::POLLHUP) != 0 && p.revents & libc::POLLPRI == 0
}

/// `SIOCATMARK` (asm-generic/sockios.h), which the libc crate does not define for Linux.
const SIOCATMARK: libc::c_ulong = 0x8905;

/// Whether stream socket `fd`'s next byte is TCP urgent data (`SIOCATMARK`): a read from the
/// socket stops short of it, and a `splice` reads nothing there at all.
pub fn at_urgent_mark(fd: RawFd) -> io::Result<bool> {
    let mut at: libc::c_int = 0;
    // SAFETY: SIOCATMARK writes one int through the pointer, which points at a live c_int.
    let r = unsafe { libc::ioctl(fd, SIOCATMARK as _, &mut at as *mut libc::c_int) };
    if r < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(at != 0)
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

/// An RTM_NEWLINK request creating a veth pair: `name` in the calling thread's network namespace
/// with MTU `mtu`, its peer `peer` (MTU 65535, so it takes any frame the container sends) in the
/// namespace whose fd is written at the returned offset before sending (the fd is opened in the
/// forked child, after this was built).
pub fn veth_request(name: &str, peer: &str, mtu: u16) -> (Vec<u8>, usize) {
    fn attr(buf: &mut Vec<u8>, kind: u16, data: &[u8]) -> usize {
        let at = buf.len();
        let len = 4 + data.len();
        buf.extend_from_slice(&(len as u16).to_ne_bytes());
        buf.extend_from_slice(&kind.to_ne_bytes());
        buf.extend_from_slice(data);
        buf.resize(buf.len() + (4 - len % 4) % 4, 0);
        at
    }
    /// Closes a nested attribute opened at `at` by writing its length.
    fn close(buf: &mut [u8], at: usize) {
        let len = (buf.len() - at) as u16;
        buf[at..at + 2].copy_from_slice(&len.to_ne_bytes());
    }
    fn cstr(s: &str) -> Vec<u8> {
        let mut v = s.as_bytes().to_vec();
        v.push(0);
        v
    }
    const VETH_INFO_PEER: u16 = 1;
    const NLA_F_NESTED: u16 = 1 << 15;
    let mut m = vec![0u8; 16]; // nlmsghdr, filled below
    m.extend_from_slice(&[0u8; 16]); // ifinfomsg: AF_UNSPEC
    attr(&mut m, libc::IFLA_IFNAME, &cstr(name));
    attr(&mut m, libc::IFLA_MTU, &u32::from(mtu).to_ne_bytes());
    let info = attr(&mut m, libc::IFLA_LINKINFO | NLA_F_NESTED, &[]);
    attr(&mut m, libc::IFLA_INFO_KIND, b"veth");
    let data = attr(&mut m, libc::IFLA_INFO_DATA | NLA_F_NESTED, &[]);
    let p = attr(&mut m, VETH_INFO_PEER | NLA_F_NESTED, &[0u8; 16]); // + the peer's ifinfomsg
    attr(&mut m, libc::IFLA_IFNAME, &cstr(peer));
    attr(&mut m, libc::IFLA_MTU, &65535u32.to_ne_bytes());
    let fd_at = attr(&mut m, libc::IFLA_NET_NS_FD, &[0u8; 4]) + 4;
    close(&mut m, p);
    close(&mut m, data);
    close(&mut m, info);
    let len = m.len() as u32;
    m[0..4].copy_from_slice(&len.to_ne_bytes());
    m[4..6].copy_from_slice(&libc::RTM_NEWLINK.to_ne_bytes());
    let flags =
        (libc::NLM_F_REQUEST | libc::NLM_F_ACK | libc::NLM_F_CREATE | libc::NLM_F_EXCL) as u16;
    m[6..8].copy_from_slice(&flags.to_ne_bytes());
    m[8..12].copy_from_slice(&1u32.to_ne_bytes());
    (m, fd_at)
}

/// The largest prepared rtnetlink request `netlink_request_with_fd` patches on the stack.
pub const MAX_REQUEST: usize = 256;

/// Sends the prepared request `msg` with `fd` written at byte `at` (no allocation: the copy is on
/// the stack).
pub fn netlink_request_with_fd(msg: &[u8], at: usize, fd: RawFd) -> io::Result<()> {
    let mut buf = [0u8; MAX_REQUEST];
    if msg.len() > buf.len() || at + 4 > msg.len() {
        return Err(io::Error::from_raw_os_error(libc::EINVAL));
    }
    buf[..msg.len()].copy_from_slice(msg);
    buf[at..at + 4].copy_from_slice(&fd.to_ne_bytes());
    netlink_request(&buf[..msg.len()])
}

/// An fd for the calling thread's network namespace.
pub fn open_netns() -> io::Result<OwnedFd> {
    // SAFETY: open(2) on a constant NUL-terminated path.
    let fd = cvt(unsafe {
        libc::open(
            c"/proc/thread-self/ns/net".as_ptr(),
            libc::O_RDONLY | libc::O_CLOEXEC,
        )
    })?;
    // SAFETY: fd was just opened and is owned by nothing else.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// Moves the calling thread into the network namespace `ns`.
pub fn enter_netns(ns: RawFd) -> io::Result<()> {
    // SAFETY: setns(2) on an open fd with a constant type.
    cvt(unsafe { libc::setns(ns, libc::CLONE_NEWNET) }).map(drop)
}

/// `ETHTOOL_STSO` and `ETHTOOL_SGRO` (linux/ethtool.h): turn TCP segmentation offload or
/// generic receive offload on or off.
pub const ETHTOOL_STSO: u32 = 0x1f;
pub const ETHTOOL_SGRO: u32 = 0x2c;

/// Sets one of `name`'s on/off ethtool features (`ETHTOOL_S*` command `cmd`).
pub fn if_set_feature(sock: RawFd, name: &IfName, cmd: u32, on: bool) -> io::Result<()> {
    #[repr(C)]
    struct EthtoolValue {
        cmd: u32,
        data: u32,
    }
    let mut v = EthtoolValue {
        cmd,
        data: u32::from(on),
    };
    let mut r = ifreq(name);
    r.ifr_ifru.ifru_data = (&mut v as *mut EthtoolValue).cast();
    // SAFETY: SIOCETHTOOL reads a struct ifreq whose data member points at a struct
    // ethtool_value, which `v` lays out and which outlives the call.
    cvt(unsafe { libc::ioctl(sock, libc::SIOCETHTOOL as libc::Ioctl, &mut r) }).map(drop)
}

/// The index of interface `name`.
pub fn if_index(sock: RawFd, name: &IfName) -> io::Result<libc::c_int> {
    let mut r = ifreq(name);
    ioctl_ifreq(sock, libc::SIOCGIFINDEX, &mut r)?;
    // SAFETY: SIOCGIFINDEX filled the ifindex member of the union.
    Ok(unsafe { r.ifr_ifru.ifru_ifindex })
}

fn set_int(fd: RawFd, level: libc::c_int, opt: libc::c_int, v: libc::c_int) -> io::Result<()> {
    // SAFETY: setsockopt(2) with a pointer to an int of the stated size.
    cvt(unsafe {
        libc::setsockopt(
            fd,
            level,
            opt,
            (&v as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as u32,
        )
    })
    .map(drop)
}

fn packet_socket(protocol: u16) -> io::Result<OwnedFd> {
    // SAFETY: socket(2) with constant arguments.
    let fd = cvt(unsafe {
        libc::socket(
            libc::AF_PACKET,
            libc::SOCK_RAW | libc::SOCK_CLOEXEC | libc::SOCK_NONBLOCK,
            libc::c_int::from(protocol.to_be()),
        )
    })?;
    // SAFETY: fd was just created and is owned by nothing else.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

fn packet_bind(fd: RawFd, ifindex: libc::c_int, protocol: u16) -> io::Result<()> {
    // SAFETY: sockaddr_ll is plain old data.
    let mut ll: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
    ll.sll_family = libc::AF_PACKET as u16;
    ll.sll_protocol = protocol.to_be();
    ll.sll_ifindex = ifindex;
    // SAFETY: bind(2) with a sockaddr_ll of the stated size.
    cvt(unsafe {
        libc::bind(
            fd,
            (&ll as *const libc::sockaddr_ll).cast(),
            std::mem::size_of::<libc::sockaddr_ll>() as u32,
        )
    })
    .map(drop)
}

/// Receive buffer for frames too large for a ring slot (TSO frames up to 64 KiB each).
const RING_COPY_RCVBUF: libc::c_int = 8 << 20;

/// The receiving socket of the packet-ring link: every frame arriving on `ifindex` (none that
/// leave it), into a `TPACKET_V2` ring of `req`'s shape; frames too large for a slot are queued
/// whole on the socket. Needs CAP_NET_RAW in the namespace (the child has it).
pub fn packet_rx_ring(ifindex: libc::c_int, req: &libc::tpacket_req) -> io::Result<OwnedFd> {
    let s = packet_socket(libc::ETH_P_ALL as u16)?;
    let fd = s.as_raw_fd();
    set_int(
        fd,
        libc::SOL_PACKET,
        libc::PACKET_VERSION,
        libc::tpacket_versions::TPACKET_V2 as libc::c_int,
    )?;
    set_int(fd, libc::SOL_PACKET, libc::PACKET_COPY_THRESH, 1)?;
    set_int(fd, libc::SOL_PACKET, libc::PACKET_IGNORE_OUTGOING, 1)?;
    // As large a queue for whole copies as `net.core.rmem_max` allows (an error leaves the
    // default, which still works, with more loss under bursts of large frames).
    let _ = set_int(fd, libc::SOL_SOCKET, libc::SO_RCVBUF, RING_COPY_RCVBUF);
    // SAFETY: setsockopt(2) with a tpacket_req of the stated size.
    cvt(unsafe {
        libc::setsockopt(
            fd,
            libc::SOL_PACKET,
            libc::PACKET_RX_RING,
            (req as *const libc::tpacket_req).cast(),
            std::mem::size_of::<libc::tpacket_req>() as u32,
        )
    })?;
    packet_bind(fd, ifindex, libc::ETH_P_ALL as u16)?;
    Ok(s)
}

/// The sending socket of the packet-ring link: bound to `ifindex` without a protocol, so it
/// receives nothing; with `vnet_hdr`, each frame starts with a virtio-net header (checksum and
/// segmentation offload), as on a TAP.
pub fn packet_tx(ifindex: libc::c_int, vnet_hdr: bool) -> io::Result<OwnedFd> {
    let s = packet_socket(0)?;
    let fd = s.as_raw_fd();
    if vnet_hdr {
        set_int(fd, libc::SOL_PACKET, libc::PACKET_VNET_HDR, 1)?;
    }
    // Not PACKET_QDISC_BYPASS: that path drops any frame the device cannot take as it is, and a
    // segmentation-offload frame from user space is marked untrusted (SKB_GSO_DODGY), which a veth
    // does not take unsegmented. Through the (empty) queueing layer the kernel segments it.
    let _ = set_int(fd, libc::SOL_SOCKET, libc::SO_SNDBUF, RING_COPY_RCVBUF);
    packet_bind(fd, ifindex, 0)?;
    Ok(s)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::MetadataExt;

    /// Waits (at most 5 s) until `fd` reports an error (`POLLERR`).
    fn wait_for_error(fd: RawFd) -> bool {
        let mut p = libc::pollfd {
            fd,
            events: 0,
            revents: 0,
        };
        // SAFETY: one valid pollfd for the duration of the call.
        unsafe { libc::poll(&mut p, 1, 5000) == 1 && p.revents & libc::POLLERR != 0 }
    }

    /// On the test process's loopback (nothing is configured): a datagram to a closed port
    /// brings a port unreachable back at once, which the socket then reports on its next call.
    /// Neither way of sending loses the next datagram to it, and the error queue says what
    /// happened.
    #[test]
    fn a_pending_icmp_error_costs_no_datagram_and_is_queued() {
        use std::net::UdpSocket;
        let rx = UdpSocket::bind("127.0.0.1:0").expect("bind");
        rx.set_read_timeout(Some(std::time::Duration::from_secs(5)))
            .expect("timeout");
        let to = rx.local_addr().expect("addr");
        let closed = UdpSocket::bind("127.0.0.1:0")
            .and_then(|s| s.local_addr())
            .expect("a port, closed again");
        let tx = UdpSocket::bind("127.0.0.1:0").expect("bind");
        let fd = tx.as_raw_fd();
        set_recv_errors(fd, true, false).expect("IP_RECVERR");
        let mut buf = [0u8; 16];

        tx.send_to(b"to-nobody", closed).expect("send");
        assert!(wait_for_error(fd), "no port unreachable came back");
        assert_eq!(send_datagrams(fd, &[(to, b"one")]), (1, false));
        assert_eq!(rx.recv(&mut buf).ok(), Some(3));

        tx.send_to(b"to-nobody", closed).expect("send");
        assert!(wait_for_error(fd), "no port unreachable came back");
        assert_eq!(send_segmented(fd, to, b"twotwo", 3).ok(), Some(2));
        assert_eq!(rx.recv(&mut buf).ok(), Some(3));
        assert_eq!(rx.recv(&mut buf).ok(), Some(3));

        let want = QueuedError {
            dst: Some(closed),
            cause: Some((libc::SO_EE_ORIGIN_ICMP, 3, 3)),
            len: 9,
            head: *b"to-nobod",
        };
        assert_eq!(take_dgram_error(fd).ok(), Some(Some(want)));
        assert_eq!(take_dgram_error(fd).ok(), Some(Some(want)));
        assert_eq!(take_dgram_error(fd).ok(), Some(None));
    }

    /// The filter, installed in a forked child: a denied call (`unshare`, with no flags: it
    /// would otherwise succeed) fails with EPERM, allowed ones (`prctl`, `getpid`) work.
    #[cfg(target_arch = "x86_64")]
    #[test]
    fn the_seccomp_filter_refuses_in_a_child() {
        // SAFETY: the child makes raw system calls only and leaves with _exit.
        match unsafe { libc::fork() } {
            0 => {
                let code = (|| {
                    if install_seccomp().is_err() {
                        return 10;
                    }
                    // SAFETY: plain system calls with integer arguments.
                    unsafe {
                        if libc::unshare(0) != -1 || *libc::__errno_location() != libc::EPERM {
                            return 11;
                        }
                        if libc::prctl(libc::PR_GET_NO_NEW_PRIVS, 0, 0, 0, 0) != 1 {
                            return 12;
                        }
                        if libc::getpid() <= 0 {
                            return 13;
                        }
                    }
                    0
                })();
                // SAFETY: ends the forked child without running the parent's destructors.
                unsafe { libc::_exit(code) }
            }
            -1 => panic!("fork: {}", io::Error::last_os_error()),
            child => {
                let mut status = 0;
                // SAFETY: waits for our own child.
                let r = unsafe { libc::waitpid(child, &mut status, 0) };
                assert_eq!(r, child);
                assert!(libc::WIFEXITED(status), "the child died: {status:#x}");
                assert_eq!(
                    libc::WEXITSTATUS(status),
                    0,
                    "10 install, 11 unshare, 12 prctl"
                );
            }
        }
    }

    /// Every denied call's test jumps to the refusing return, and only the end allows.
    #[cfg(target_arch = "x86_64")]
    #[test]
    fn the_seccomp_program_refuses_exactly_the_denied_calls() {
        let p = seccomp_program();
        let n = SECCOMP_DENIED.len();
        assert_eq!(p.len(), 5 + n + 2);
        let (allow, deny) = (p.len() - 2, p.len() - 1);
        assert_eq!((p[allow].code, p[allow].k), (0x06, 0x7fff_0000));
        assert_eq!(
            (p[deny].code, p[deny].k),
            (0x06, 0x0005_0000 | libc::EPERM as u32)
        );
        // Wrong architecture: refused (the instruction after the arch test).
        assert_eq!((p[1].jt, p[1].jf, p[2].k), (1, 0, p[deny].k));
        // x32 calls jump to the refusal.
        assert_eq!(4 + 1 + usize::from(p[4].jt), deny);
        for (i, nr) in SECCOMP_DENIED.iter().enumerate() {
            let at = 5 + i;
            assert_eq!((p[at].code, p[at].k, p[at].jf), (0x15, *nr as u32, 0));
            assert_eq!(at + 1 + usize::from(p[at].jt), deny, "call {nr}");
        }
        for nr in [
            libc::SYS_setns,
            libc::SYS_prctl,
            libc::SYS_read,
            libc::SYS_clone,
        ] {
            assert!(
                !SECCOMP_DENIED.contains(&nr),
                "{nr} is needed after the filter"
            );
        }
    }

    #[test]
    fn two_fds_cross_in_one_message() {
        let (a, b) = std::os::unix::net::UnixStream::pair().expect("socketpair");
        let f1 = std::fs::File::open("/proc/self/stat").expect("open");
        let f2 = std::fs::File::open("/proc/self/status").expect("open");
        send_fds(a.as_raw_fd(), &[f1.as_raw_fd(), f2.as_raw_fd()]).expect("send");
        let mut payload = [0u8; 4];
        let (fds, n) = recv_fds(b.as_raw_fd(), &mut payload).expect("recv");
        assert_eq!(n, 1);
        assert_eq!(fds.len(), 2);
        let ino = |fd: &OwnedFd| {
            std::fs::metadata(format!("/proc/self/fd/{}", fd.as_raw_fd()))
                .expect("stat")
                .ino()
        };
        let (i1, i2) = (
            f1.metadata().expect("stat").ino(),
            f2.metadata().expect("stat").ino(),
        );
        assert_eq!((ino(&fds[0]), ino(&fds[1])), (i1, i2), "in the order sent");
        assert!(send_fds(a.as_raw_fd(), &[]).is_err());
        assert!(send_fds(a.as_raw_fd(), &[0, 1, 2]).is_err());
    }

    #[test]
    fn the_veth_request_nests_its_peer_and_marks_the_namespace_fd() {
        let (m, at) = veth_request("tap0", "rnat0", 65520);
        assert!(m.len() <= MAX_REQUEST);
        assert_eq!(
            u32::from_ne_bytes(m[0..4].try_into().unwrap()) as usize,
            m.len()
        );
        // The fd's attribute: IFLA_NET_NS_FD, 8 bytes with its header, inside the peer's attributes.
        let len = u16::from_ne_bytes([m[at - 4], m[at - 3]]);
        let kind = u16::from_ne_bytes([m[at - 2], m[at - 1]]);
        assert_eq!((len, kind), (8, libc::IFLA_NET_NS_FD));
        let text = String::from_utf8_lossy(&m);
        assert!(text.contains("tap0\0") && text.contains("rnat0\0") && text.contains("veth"));
        // Patching writes the fd there and nowhere else.
        let mut patched = m.clone();
        patched[at..at + 4].copy_from_slice(&7i32.to_ne_bytes());
        let diff: Vec<usize> = (0..m.len()).filter(|&i| m[i] != patched[i]).collect();
        assert_eq!(diff, vec![at]);
        assert!(
            netlink_request_with_fd(&m, m.len() - 2, 7).is_err(),
            "out of bounds"
        );
    }
}
