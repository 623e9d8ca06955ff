//! nftables: rnat's table, maps and rules, written as atomic netlink batches through libnftnl.
//!
//! - `expr`: the expressions rules are made of, as data.
//! - `model`: rnat's ruleset layout and element encoding (pure, unit-tested).
//! - `ffi`: the one module that calls libnftnl, turning the model into netlink messages.
//! - `socket`: sends a batch and reports the kernel's verdict.

pub mod expr;
pub mod ffi;
pub mod model;
pub mod socket;

use std::io;

use ipnet::Ipv4Net;

pub use ffi::{BatchBuf, Op};
pub use model::Dnat;

/// What can go wrong talking to nftables.
#[derive(Debug, thiserror::Error)]
pub enum NftError {
    #[error("netfilter netlink socket: {0}")]
    Socket(#[source] io::Error),
    #[error("nftables rejected the change (message {seq}): {source}")]
    Kernel {
        errno: i32,
        seq: u32,
        #[source]
        source: io::Error,
    },
    #[error("libnftnl could not allocate an object")]
    Alloc,
    #[error("name contains a NUL byte: {0:?}")]
    Name(String),
}

impl NftError {
    pub fn errno(&self) -> Option<i32> {
        match self {
            NftError::Kernel { errno, .. } => Some(*errno),
            NftError::Socket(e) => e.raw_os_error(),
            _ => None,
        }
    }
}

/// rnat's view of the kernel's nftables in the current network namespace.
pub struct Firewall {
    sock: socket::NftSocket,
}

impl Firewall {
    pub fn open() -> Result<Self, NftError> {
        Ok(Firewall {
            sock: socket::NftSocket::open()?,
        })
    }

    fn send(&mut self, batch: BatchBuf) -> Result<(), NftError> {
        if batch.is_empty() {
            return Ok(());
        }
        self.sock.send(&batch.finish())
    }

    /// Whether rnat's table exists (a GETTABLE: it changes nothing and costs one round trip, where
    /// re-sending the creation batch would make the kernel process every rule before refusing).
    pub fn table_exists(&mut self) -> Result<bool, NftError> {
        let req = ffi::get_table_request(model::FAMILY, model::TABLE, 1)?;
        match self.sock.request(&req) {
            Ok(_) => Ok(true),
            Err(e) if e.errno() == Some(libc::ENOENT) => Ok(false),
            Err(e) => Err(e),
        }
    }

    /// Creates rnat's table with its maps and chains unless it exists. Returns whether it did.
    pub fn ensure_table(&mut self) -> Result<bool, NftError> {
        if self.table_exists()? {
            return Ok(false);
        }
        let mut b = BatchBuf::new();
        model::create_table(&mut b)?;
        match self.send(b) {
            Err(e) if e.errno() == Some(libc::EEXIST) => Ok(false),
            other => other.map(|()| true),
        }
    }

    /// Replaces the per-network masquerade rules, in one transaction.
    pub fn set_networks(&mut self, nets: &[(Ipv4Net, bool)]) -> Result<(), NftError> {
        let mut b = BatchBuf::new();
        model::replace_postrouting(&mut b, nets)?;
        self.send(b)
    }

    /// Adds DNAT elements in one transaction; fails whole if any key is already present.
    pub fn add_dnats(&mut self, dnats: &[Dnat]) -> Result<(), NftError> {
        let mut b = BatchBuf::new();
        model::dnat_elems(&mut b, Op::CreateExcl, dnats)?;
        self.send(b)
    }

    /// Removes DNAT elements in one transaction. If some are already gone (a teardown that ran
    /// before), the rest are removed one by one so that removal is idempotent.
    pub fn remove_dnats(&mut self, dnats: &[Dnat]) -> Result<(), NftError> {
        let mut b = BatchBuf::new();
        model::dnat_elems(&mut b, Op::Delete, dnats)?;
        match self.send(b) {
            Err(e) if e.errno() == Some(libc::ENOENT) => {
                for d in dnats {
                    let mut b = BatchBuf::new();
                    model::dnat_elems(&mut b, Op::Delete, std::slice::from_ref(d))?;
                    match self.send(b) {
                        Err(e) if e.errno() == Some(libc::ENOENT) => {}
                        other => other?,
                    }
                }
                Ok(())
            }
            other => other,
        }
    }

    /// Removes the DNS forwarding of each gateway (absent ones are fine).
    pub fn set_dns_forwards_removed(
        &mut self,
        gateways: &[std::net::Ipv4Addr],
    ) -> Result<(), NftError> {
        for gw in gateways {
            self.set_dns_forward(*gw, std::net::Ipv4Addr::UNSPECIFIED, Op::Delete)?;
        }
        Ok(())
    }

    /// Sends an empty transaction: does nftables answer here at all?
    pub fn probe(&mut self) -> Result<(), NftError> {
        self.sock.send(&BatchBuf::new().finish())
    }

    /// For each DNAT, whether its map element is present, without changing anything: each probe is
    /// one transaction that adds the element exclusively and deletes it again. `EEXIST` means it
    /// was there (and the aborted transaction changed nothing); success means it was not (and the
    /// transaction's net effect is nil).
    pub fn dnats_present(&mut self, dnats: &[Dnat]) -> Result<Vec<bool>, NftError> {
        let mut out = Vec::with_capacity(dnats.len());
        for d in dnats {
            let mut b = BatchBuf::new();
            model::dnat_elems(&mut b, Op::CreateExcl, std::slice::from_ref(d))?;
            model::dnat_elems(&mut b, Op::Delete, std::slice::from_ref(d))?;
            match self.send(b) {
                Ok(()) => out.push(false),
                Err(e) if e.errno() == Some(libc::EEXIST) => out.push(true),
                Err(e) => return Err(e),
            }
        }
        Ok(out)
    }

    /// Points `gateway:53` (UDP and TCP) at a resolver on the host's loopback, or removes that.
    pub fn set_dns_forward(
        &mut self,
        gateway: std::net::Ipv4Addr,
        resolver: std::net::Ipv4Addr,
        op: Op,
    ) -> Result<(), NftError> {
        let mut b = BatchBuf::new();
        let elems: Vec<ffi::Elem> = [crate::spec::Protocol::Udp, crate::spec::Protocol::Tcp]
            .iter()
            .map(|p| ffi::Elem {
                key: model::key(Some(gateway), *p, 53),
                data: Some(model::data(resolver, 53)),
            })
            .collect();
        b.elems(op, model::FAMILY, model::TABLE, model::DNS.name, &elems)?;
        match self.send(b) {
            Err(e) if op == Op::Delete && e.errno() == Some(libc::ENOENT) => Ok(()),
            other => other,
        }
    }
}
