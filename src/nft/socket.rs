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

/// One message of a netlink reply: its type, sequence number, and for `NLMSG_ERROR` the errno
/// (0 for an ACK).
struct Reply {
    ty: u16,
    seq: u32,
    error: Option<i32>,
}

/// The messages in `buf` (a datagram of `n` bytes), stopping at a truncated one.
fn replies(buf: &[u8]) -> Vec<Reply> {
    let word = |at: usize| {
        buf.get(at..at + 4)
            .and_then(|b| <[u8; 4]>::try_from(b).ok())
    };
    let mut out = Vec::new();
    let mut off = 0;
    while off + NLMSG_HDRLEN <= buf.len() {
        let len = word(off).map_or(0, u32::from_ne_bytes) as usize;
        if len < NLMSG_HDRLEN || off + len > buf.len() {
            break;
        }
        let ty = u16::from_ne_bytes([buf[off + 4], buf[off + 5]]);
        let seq = word(off + 8).map_or(0, u32::from_ne_bytes);
        let error = (ty == NLMSG_ERROR && len >= NLMSG_HDRLEN + 4)
            .then(|| word(off + NLMSG_HDRLEN).map_or(0, |w| -i32::from_ne_bytes(w)));
        out.push(Reply { ty, seq, error });
        off += (len + 3) & !3;
    }
    out
}

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
            for r in replies(&buf[..n]) {
                if let (Some(errno), None) = (r.error.filter(|e| *e != 0), first_err) {
                    first_err = Some((errno, r.seq));
                }
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
            for r in replies(&buf[..n]) {
                match r.error {
                    Some(0) => return Ok(types),
                    Some(errno) => {
                        return Err(NftError::Kernel {
                            errno,
                            seq: r.seq,
                            source: io::Error::from_raw_os_error(errno),
                        })
                    }
                    None => types.push(r.ty),
                }
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
