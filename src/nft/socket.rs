//! Sends a batch to the kernel and collects its verdict.
//!
//! nfnetlink processes a batch synchronously inside `sendmsg`: by the time the send returns, any
//! error the kernel has to report is already queued on the socket. So a send is followed by a
//! non-blocking drain, and the batch succeeded if no error message came back. No ACKs are requested,
//! so the receive queue never fills however many messages a batch holds.

use std::io;
use std::os::fd::AsRawFd;

use netlink_sys::{protocols::NETLINK_NETFILTER, Socket, SocketAddr};

use super::NftError;

const NLMSG_ERROR: u16 = 2;
const NLMSG_HDRLEN: usize = 16;

pub struct NftSocket {
    sock: Socket,
}

impl NftSocket {
    pub fn open() -> Result<Self, NftError> {
        let mut sock = Socket::new(NETLINK_NETFILTER).map_err(NftError::Socket)?;
        sock.bind_auto().map_err(NftError::Socket)?;
        sock.connect(&SocketAddr::new(0, 0))
            .map_err(NftError::Socket)?;
        Ok(NftSocket { sock })
    }

    /// Sends one batch; returns the first error the kernel reported, with the failing message's
    /// sequence number.
    pub fn send(&mut self, batch: &[u8]) -> Result<(), NftError> {
        grow_sndbuf(&self.sock, batch.len());
        self.sock
            .set_non_blocking(false)
            .map_err(NftError::Socket)?;
        let sent = self.sock.send(batch, 0).map_err(NftError::Socket)?;
        if sent != batch.len() {
            return Err(NftError::Socket(io::Error::other("short netlink send")));
        }
        self.sock.set_non_blocking(true).map_err(NftError::Socket)?;
        let mut first_err: Option<(i32, u32)> = None;
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            let n = match self.sock.recv(&mut &mut buf[..], 0) {
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(NftError::Socket(e)),
            };
            let mut off = 0;
            while off + NLMSG_HDRLEN <= n {
                let len =
                    u32::from_ne_bytes(buf[off..off + 4].try_into().unwrap_or([0; 4])) as usize;
                let ty = u16::from_ne_bytes([buf[off + 4], buf[off + 5]]);
                let seq = u32::from_ne_bytes(buf[off + 8..off + 12].try_into().unwrap_or([0; 4]));
                if len < NLMSG_HDRLEN || off + len > n {
                    break;
                }
                if ty == NLMSG_ERROR && len >= NLMSG_HDRLEN + 4 {
                    let code = i32::from_ne_bytes(
                        buf[off + NLMSG_HDRLEN..off + NLMSG_HDRLEN + 4]
                            .try_into()
                            .unwrap_or([0; 4]),
                    );
                    if code != 0 && first_err.is_none() {
                        first_err = Some((-code, seq));
                    }
                }
                off += (len + 3) & !3;
            }
        }
        match first_err {
            None => Ok(()),
            Some((errno, seq)) => Err(NftError::Kernel {
                errno,
                seq,
                source: io::Error::from_raw_os_error(errno),
            }),
        }
    }
}

impl NftSocket {
    /// Sends one request with NLM_F_ACK and returns the types of the messages that came back
    /// before the ACK, or the kernel's error.
    pub fn request(&mut self, msg: &[u8]) -> Result<Vec<u16>, NftError> {
        self.sock
            .set_non_blocking(false)
            .map_err(NftError::Socket)?;
        self.sock.send(msg, 0).map_err(NftError::Socket)?;
        let mut types = Vec::new();
        let mut buf = vec![0u8; 64 * 1024];
        // Bounded: a GET for one object yields the object and an ACK.
        for _ in 0..64 {
            let n = match self.sock.recv(&mut &mut buf[..], 0) {
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(NftError::Socket(e)),
            };
            let mut off = 0;
            while off + NLMSG_HDRLEN <= n {
                let len =
                    u32::from_ne_bytes(buf[off..off + 4].try_into().unwrap_or([0; 4])) as usize;
                let ty = u16::from_ne_bytes([buf[off + 4], buf[off + 5]]);
                let seq = u32::from_ne_bytes(buf[off + 8..off + 12].try_into().unwrap_or([0; 4]));
                if len < NLMSG_HDRLEN || off + len > n {
                    break;
                }
                if ty == NLMSG_ERROR && len >= NLMSG_HDRLEN + 4 {
                    let code = i32::from_ne_bytes(
                        buf[off + NLMSG_HDRLEN..off + NLMSG_HDRLEN + 4]
                            .try_into()
                            .unwrap_or([0; 4]),
                    );
                    if code == 0 {
                        return Ok(types);
                    }
                    return Err(NftError::Kernel {
                        errno: -code,
                        seq,
                        source: io::Error::from_raw_os_error(-code),
                    });
                }
                types.push(ty);
                off += (len + 3) & !3;
            }
        }
        Err(NftError::Socket(io::Error::other("no ACK from nftables")))
    }
}

/// Makes room for the whole batch in one send (the kernel refuses a netlink message larger than the
/// send buffer). `SO_SNDBUFFORCE` needs CAP_NET_ADMIN, which anything programming nftables has.
fn grow_sndbuf(sock: &Socket, len: usize) {
    let want = i32::try_from(len.saturating_mul(2)).unwrap_or(i32::MAX);
    if len < 200 * 1024 {
        return;
    }
    for opt in [libc::SO_SNDBUFFORCE, libc::SO_SNDBUF] {
        // SAFETY: setsockopt with a pointer to a live i32 and its exact size.
        let rc = unsafe {
            libc::setsockopt(
                sock.as_raw_fd(),
                libc::SOL_SOCKET,
                opt,
                (&want as *const i32).cast(),
                std::mem::size_of::<i32>() as libc::socklen_t,
            )
        };
        if rc == 0 {
            return;
        }
    }
}
