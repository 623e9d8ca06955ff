//! The receive side of the packet-ring link: an `AF_PACKET` socket with a `TPACKET_V2` ring,
//! mapped into rnat's memory. The kernel copies each frame the container sends into the next
//! free slot (in the sender's own context) and rnat takes them from memory, with no system call
//! per frame. A frame larger than a slot (a TSO frame) is queued on the socket whole instead,
//! and its slot says so (`TP_STATUS_COPY`); `recv(2)` takes it in the slot's turn.
//!
//! The socket is made and bound by `ns::enter_and_make_link` inside the namespaces; this module
//! maps the ring it set up (with the same [`Geometry`]) and walks it.

use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::sync::atomic::{fence, Ordering};

/// The ring's shape. Slots hold a 1500-byte-MTU frame with its headers; larger frames take the
/// copy path, whose queue is the socket's receive buffer (as large as `net.core.rmem_max` lets
/// it be: 4 MiB on this machine, 208 KiB on a default one, a few 64 KiB frames).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Geometry {
    pub block_size: u32,
    pub block_nr: u32,
    pub frame_size: u32,
}

impl Geometry {
    pub const DEFAULT: Geometry = Geometry {
        block_size: 1 << 16,
        block_nr: 16,
        frame_size: 2048,
    };

    pub fn frame_nr(&self) -> u32 {
        self.block_size / self.frame_size * self.block_nr
    }

    pub fn mapped_len(&self) -> usize {
        self.block_size as usize * self.block_nr as usize
    }

    /// The `struct tpacket_req` that asks the kernel for this ring.
    pub fn request(&self) -> libc::tpacket_req {
        libc::tpacket_req {
            tp_block_size: self.block_size,
            tp_block_nr: self.block_nr,
            tp_frame_size: self.frame_size,
            tp_frame_nr: self.frame_nr(),
        }
    }
}

const TP_STATUS_KERNEL: u32 = 0;
const TP_STATUS_USER: u32 = 1;
const TP_STATUS_COPY: u32 = 1 << 1;
const TP_STATUS_CSUMNOTREADY: u32 = 1 << 3;
const TP_STATUS_CSUM_VALID: u32 = 1 << 7;

/// One frame taken from the ring.
pub enum Taken<'a> {
    /// The frame, and whether its checksums may be trusted (the sender's stack vouches for them
    /// or left them to offload).
    Frame(&'a [u8], bool),
    /// A frame too large for its slot, waiting on the socket's queue; the flag as above.
    Queued(bool),
    /// A frame cut short with no whole copy queued (the socket's buffer was full): lost.
    Lost,
}

/// The mapped ring and the socket it belongs to.
pub struct RxRing {
    sock: OwnedFd,
    map: *mut u8,
    geo: Geometry,
    /// The slot to look at next.
    head: u32,
}

impl RxRing {
    /// Maps the ring of `sock`, which was set up with `geo`.
    pub fn map(sock: OwnedFd, geo: Geometry) -> io::Result<RxRing> {
        // SAFETY: mmap(2) of the socket's ring: a fresh shared mapping of exactly the ring's
        // length, which the kernel checks against the ring it holds.
        let map = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                geo.mapped_len(),
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                sock.as_raw_fd(),
                0,
            )
        };
        if map == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        Ok(RxRing {
            sock,
            map: map.cast(),
            geo,
            head: 0,
        })
    }

    fn slot(&self, i: u32) -> *mut libc::tpacket2_hdr {
        let per_block = self.geo.block_size / self.geo.frame_size;
        let off = (i / per_block) as usize * self.geo.block_size as usize
            + (i % per_block) as usize * self.geo.frame_size as usize;
        // SAFETY: i < frame_nr, so the offset lies inside the mapping.
        unsafe { self.map.add(off).cast() }
    }

    /// The next frame the kernel has filled, if any. The slot stays rnat's until `release`.
    pub fn take(&self) -> Option<Taken<'_>> {
        let h = self.slot(self.head);
        // SAFETY: `h` points at a slot header inside the mapping; the kernel writes the status
        // last, so the read is volatile and followed by an acquire fence before the rest is read.
        let status = unsafe { std::ptr::addr_of!((*h).tp_status).read_volatile() };
        if status & TP_STATUS_USER == 0 {
            return None;
        }
        fence(Ordering::Acquire);
        let trusted = status & (TP_STATUS_CSUMNOTREADY | TP_STATUS_CSUM_VALID) != 0;
        if status & TP_STATUS_COPY != 0 {
            return Some(Taken::Queued(trusted));
        }
        // SAFETY: the slot is user-owned (status above); its header fields were written before
        // the status and describe bytes inside the slot, which the checks below keep to.
        let (mac, snap, len) = unsafe {
            (
                (*h).tp_mac as usize,
                (*h).tp_snaplen as usize,
                (*h).tp_len as usize,
            )
        };
        if snap < len || mac + snap > self.geo.frame_size as usize {
            return Some(Taken::Lost);
        }
        // SAFETY: as above: [mac, mac + snap) lies inside this slot, which the kernel does not
        // write while it is user-owned.
        let data = unsafe { std::slice::from_raw_parts(h.cast::<u8>().add(mac), snap) };
        Some(Taken::Frame(data, trusted))
    }

    /// Hands the slot `take` returned back to the kernel.
    pub fn release(&mut self) {
        let h = self.slot(self.head);
        fence(Ordering::Release);
        // SAFETY: the slot header lies inside the mapping; the kernel reads the status to decide
        // whether it may fill the slot again.
        unsafe { std::ptr::addr_of_mut!((*h).tp_status).write_volatile(TP_STATUS_KERNEL) };
        self.head = (self.head + 1) % self.geo.frame_nr();
    }

    /// Receives the queued whole copy of a frame too large for its slot into `buf`, returning its
    /// length; `EMSGSIZE` if it did not fit (it is gone), `ENETDOWN` once the link has gone.
    pub fn recv_queued(&self, buf: &mut [u8]) -> io::Result<usize> {
        // SAFETY: recv(2) into a valid buffer of its stated length.
        let n = unsafe {
            libc::recv(
                self.sock.as_raw_fd(),
                buf.as_mut_ptr().cast(),
                buf.len(),
                libc::MSG_DONTWAIT | libc::MSG_TRUNC,
            )
        };
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        if n as usize > buf.len() {
            return Err(io::Error::from_raw_os_error(libc::EMSGSIZE));
        }
        Ok(n as usize)
    }

    /// Frames the kernel dropped because the ring was full, since the last call.
    pub fn drops(&self) -> u64 {
        let mut st = libc::tpacket_stats {
            tp_packets: 0,
            tp_drops: 0,
        };
        match self.get_option(libc::SOL_PACKET, libc::PACKET_STATISTICS, &mut st) {
            Ok(()) => u64::from(st.tp_drops),
            Err(_) => 0,
        }
    }

    /// The socket's pending error: `ENETDOWN` once the link is gone (its namespace ended).
    pub fn error(&self) -> Option<io::Error> {
        let mut err: libc::c_int = 0;
        if let Err(e) = self.get_option(libc::SOL_SOCKET, libc::SO_ERROR, &mut err) {
            return Some(e);
        }
        (err != 0).then(|| io::Error::from_raw_os_error(err))
    }

    /// getsockopt(2) of a plain-data option into `value`.
    fn get_option<T: Copy>(
        &self,
        level: libc::c_int,
        opt: libc::c_int,
        value: &mut T,
    ) -> io::Result<()> {
        let mut len = std::mem::size_of::<T>() as libc::socklen_t;
        // SAFETY: getsockopt(2) writes at most `len` bytes into `value`, which is plain data
        // (`Copy`, every bit pattern of the options read here valid) of that size.
        let r = unsafe {
            libc::getsockopt(
                self.sock.as_raw_fd(),
                level,
                opt,
                (value as *mut T).cast(),
                &mut len,
            )
        };
        if r != 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }
}

impl AsFd for RxRing {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.sock.as_fd()
    }
}

impl Drop for RxRing {
    fn drop(&mut self) {
        // SAFETY: the mapping was made in `map` with this length and is unmapped once.
        unsafe { libc::munmap(self.map.cast(), self.geo.mapped_len()) };
    }
}
