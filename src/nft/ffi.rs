//! The only place rnat calls libnftnl: turns the ruleset model into netlink messages.
//!
//! Every libnftnl object is allocated, filled and freed inside one function here, so no raw pointer
//! outlives the call that made it. Messages are written into a scratch buffer sized for the largest
//! message rnat builds and appended to a plain byte vector: the batch that `socket` sends.

use std::ffi::{c_void, CString};
use std::ptr::NonNull;

use nftnl_sys as sys;

use super::expr::{CmpOp, Expr, PayloadBase};
use super::model::{ChainDef, MapDef};
use super::NftError;

const NFNL_SUBSYS_NFTABLES: u16 = 10;
const NLM_F_REQUEST: u16 = 0x1;
const NLM_F_EXCL: u16 = 0x200;
const NLM_F_CREATE: u16 = 0x400;
const NLM_F_APPEND: u16 = 0x800;
/// Elements per NEWSETELEM/DELSETELEM message; keeps each message far below `SCRATCH`.
pub const ELEMS_PER_MSG: usize = 256;
/// Scratch space for one message (256 elements of at most 64 bytes of attributes each fit easily).
const SCRATCH: usize = 64 * 1024;

/// Whether a message creates or deletes an object.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Op {
    /// Create; fail if it exists.
    CreateExcl,
    /// Create, or leave as is if it exists.
    Create,
    Delete,
}

/// A set element: key and (for maps) data, already in wire byte order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Elem {
    pub key: Vec<u8>,
    pub data: Option<Vec<u8>>,
}

/// A netlink batch under construction: `BATCH_BEGIN`, messages, `BATCH_END`.
pub struct BatchBuf {
    bytes: Vec<u8>,
    scratch: Vec<u8>,
    seq: u32,
    messages: usize,
}

fn cstr(s: &str) -> Result<CString, NftError> {
    CString::new(s).map_err(|_| NftError::Name(s.to_string()))
}

fn flags_for(op: Op) -> u16 {
    match op {
        Op::CreateExcl => NLM_F_REQUEST | NLM_F_CREATE | NLM_F_EXCL,
        Op::Create => NLM_F_REQUEST | NLM_F_CREATE,
        Op::Delete => NLM_F_REQUEST,
    }
}

/// Frees a libnftnl object when dropped.
struct Owned<T> {
    ptr: NonNull<T>,
    free: unsafe extern "C" fn(*const T),
}

impl<T> Owned<T> {
    fn new(ptr: *mut T, free: unsafe extern "C" fn(*const T)) -> Result<Self, NftError> {
        NonNull::new(ptr)
            .map(|ptr| Owned { ptr, free })
            .ok_or(NftError::Alloc)
    }
    fn as_ptr(&self) -> *mut T {
        self.ptr.as_ptr()
    }
}

impl<T> Drop for Owned<T> {
    fn drop(&mut self) {
        // SAFETY: `ptr` came from the matching libnftnl `*_alloc` and is freed exactly once, here.
        unsafe { (self.free)(self.ptr.as_ptr()) }
    }
}

impl Default for BatchBuf {
    fn default() -> Self {
        Self::new()
    }
}

impl BatchBuf {
    pub fn new() -> Self {
        let mut b = BatchBuf {
            bytes: Vec::new(),
            scratch: vec![0u8; SCRATCH],
            seq: 1,
            messages: 0,
        };
        // SAFETY: the scratch buffer is SCRATCH bytes, far more than a batch-begin header needs.
        let nlh = unsafe { sys::nftnl_batch_begin(b.scratch.as_mut_ptr().cast(), b.seq) };
        b.commit(nlh);
        b
    }

    /// Number of messages between begin and end.
    pub fn len(&self) -> usize {
        self.messages
    }

    pub fn is_empty(&self) -> bool {
        self.messages == 0
    }

    /// Closes the batch and returns its bytes.
    pub fn finish(mut self) -> Vec<u8> {
        // SAFETY: as in `new`.
        let nlh = unsafe { sys::nftnl_batch_end(self.scratch.as_mut_ptr().cast(), self.seq) };
        self.commit(nlh);
        self.bytes
    }

    /// Appends the message just written at the start of `scratch` (its length is in its header).
    fn commit(&mut self, nlh: *mut libc::nlmsghdr) {
        // SAFETY: `nlh` points at the start of `scratch`, where libnftnl wrote a complete message whose
        // length field it keeps up to date; the length never exceeds the buffer (see SCRATCH).
        let len = unsafe { (*nlh).nlmsg_len } as usize;
        assert!(
            len <= self.scratch.len(),
            "netlink message overflowed the scratch buffer"
        );
        self.bytes.extend_from_slice(&self.scratch[..len]);
        self.seq += 1;
    }

    /// Writes a message header for `msg` into scratch and returns it.
    fn header(&mut self, msg: u16, family: u16, flags: u16) -> *mut libc::nlmsghdr {
        self.scratch.fill(0);
        let ty = (NFNL_SUBSYS_NFTABLES << 8) | msg;
        // SAFETY: the buffer is SCRATCH bytes long; a header needs 20.
        unsafe {
            sys::nftnl_nlmsg_build_hdr(
                self.scratch.as_mut_ptr().cast(),
                ty,
                family,
                flags,
                self.seq,
            )
        }
    }

    pub fn table(&mut self, op: Op, family: u16, name: &str) -> Result<(), NftError> {
        let t = table_object(family, name)?;
        // SAFETY: `t` is a live table (freed by `Owned`); `nlh` points into scratch.
        unsafe {
            let msg = if op == Op::Delete {
                libc::NFT_MSG_DELTABLE
            } else {
                libc::NFT_MSG_NEWTABLE
            };
            let nlh = self.header(msg as u16, family, flags_for(op));
            sys::nftnl_table_nlmsg_build_payload(nlh, t.as_ptr());
            self.commit(nlh);
        }
        self.messages += 1;
        Ok(())
    }

    pub fn chain(
        &mut self,
        op: Op,
        family: u16,
        table: &str,
        def: &ChainDef,
    ) -> Result<(), NftError> {
        let (table, name, ty) = (cstr(table)?, cstr(def.name)?, cstr(def.kind)?);
        // SAFETY: as in `table`.
        unsafe {
            let c = Owned::new(sys::nftnl_chain_alloc(), sys_free_chain)?;
            let p = c.as_ptr();
            sys::nftnl_chain_set_u32(p, sys::NFTNL_CHAIN_FAMILY as u16, u32::from(family));
            sys::nftnl_chain_set_str(p, sys::NFTNL_CHAIN_TABLE as u16, table.as_ptr());
            sys::nftnl_chain_set_str(p, sys::NFTNL_CHAIN_NAME as u16, name.as_ptr());
            if op != Op::Delete {
                sys::nftnl_chain_set_u32(p, sys::NFTNL_CHAIN_HOOKNUM as u16, def.hook);
                sys::nftnl_chain_set_s32(p, sys::NFTNL_CHAIN_PRIO as u16, def.priority);
                sys::nftnl_chain_set_str(p, sys::NFTNL_CHAIN_TYPE as u16, ty.as_ptr());
            }
            let msg = if op == Op::Delete {
                libc::NFT_MSG_DELCHAIN
            } else {
                libc::NFT_MSG_NEWCHAIN
            };
            let nlh = self.header(msg as u16, family, flags_for(op));
            sys::nftnl_chain_nlmsg_build_payload(nlh, p);
            self.commit(nlh);
        }
        self.messages += 1;
        Ok(())
    }

    /// Deletes every rule of a chain (a DELRULE naming the chain and no handle).
    pub fn flush_chain(&mut self, family: u16, table: &str, chain: &str) -> Result<(), NftError> {
        let (table, chain) = (cstr(table)?, cstr(chain)?);
        // SAFETY: as in `table`.
        unsafe {
            let r = Owned::new(sys::nftnl_rule_alloc(), sys_free_rule)?;
            sys::nftnl_rule_set_u32(r.as_ptr(), sys::NFTNL_RULE_FAMILY as u16, u32::from(family));
            sys::nftnl_rule_set_str(r.as_ptr(), sys::NFTNL_RULE_TABLE as u16, table.as_ptr());
            sys::nftnl_rule_set_str(r.as_ptr(), sys::NFTNL_RULE_CHAIN as u16, chain.as_ptr());
            let nlh = self.header(libc::NFT_MSG_DELRULE as u16, family, NLM_F_REQUEST);
            sys::nftnl_rule_nlmsg_build_payload(nlh, r.as_ptr());
            self.commit(nlh);
        }
        self.messages += 1;
        Ok(())
    }

    /// Appends a rule made of `exprs` to a chain.
    pub fn rule(
        &mut self,
        family: u16,
        table: &str,
        chain: &str,
        exprs: &[Expr],
    ) -> Result<(), NftError> {
        let (table, chain) = (cstr(table)?, cstr(chain)?);
        // SAFETY: the rule takes ownership of each expression added to it (`nftnl_rule_add_expr`), and
        // is freed by `Owned`; the expressions are never used after being added.
        unsafe {
            let r = Owned::new(sys::nftnl_rule_alloc(), sys_free_rule)?;
            sys::nftnl_rule_set_u32(r.as_ptr(), sys::NFTNL_RULE_FAMILY as u16, u32::from(family));
            sys::nftnl_rule_set_str(r.as_ptr(), sys::NFTNL_RULE_TABLE as u16, table.as_ptr());
            sys::nftnl_rule_set_str(r.as_ptr(), sys::NFTNL_RULE_CHAIN as u16, chain.as_ptr());
            for e in exprs {
                let raw = build_expr(e, family)?;
                sys::nftnl_rule_add_expr(r.as_ptr(), raw.as_ptr());
            }
            let nlh = self.header(
                libc::NFT_MSG_NEWRULE as u16,
                family,
                NLM_F_REQUEST | NLM_F_CREATE | NLM_F_APPEND,
            );
            sys::nftnl_rule_nlmsg_build_payload(nlh, r.as_ptr());
            self.commit(nlh);
        }
        self.messages += 1;
        Ok(())
    }

    /// Creates or deletes a named map.
    pub fn map(
        &mut self,
        op: Op,
        family: u16,
        table: &str,
        def: &MapDef,
        id: u32,
    ) -> Result<(), NftError> {
        let (table, name) = (cstr(table)?, cstr(def.name)?);
        // SAFETY: as in `table`.
        unsafe {
            let s = Owned::new(sys::nftnl_set_alloc(), sys_free_set)?;
            let p = s.as_ptr();
            set_common(p, family, &table, &name);
            sys::nftnl_set_set_u32(p, sys::NFTNL_SET_ID as u16, id);
            if op != Op::Delete {
                sys::nftnl_set_set_u32(p, sys::NFTNL_SET_FLAGS as u16, libc::NFT_SET_MAP as u32);
                sys::nftnl_set_set_u32(p, sys::NFTNL_SET_KEY_TYPE as u16, def.key_type);
                sys::nftnl_set_set_u32(p, sys::NFTNL_SET_KEY_LEN as u16, def.key_len);
                sys::nftnl_set_set_u32(p, sys::NFTNL_SET_DATA_TYPE as u16, def.data_type);
                sys::nftnl_set_set_u32(p, sys::NFTNL_SET_DATA_LEN as u16, def.data_len);
            }
            let msg = if op == Op::Delete {
                libc::NFT_MSG_DELSET
            } else {
                libc::NFT_MSG_NEWSET
            };
            let nlh = self.header(msg as u16, family, flags_for(op));
            sys::nftnl_set_nlmsg_build_payload(nlh, p);
            self.commit(nlh);
        }
        self.messages += 1;
        Ok(())
    }

    /// Adds or deletes elements of a named set or map, `ELEMS_PER_MSG` to a message.
    pub fn elems(
        &mut self,
        op: Op,
        family: u16,
        table: &str,
        set: &str,
        elems: &[Elem],
    ) -> Result<(), NftError> {
        let (table, name) = (cstr(table)?, cstr(set)?);
        for chunk in elems.chunks(ELEMS_PER_MSG) {
            // SAFETY: each element is handed to the set (`nftnl_set_elem_add` transfers ownership) and
            // freed with it; key and data bytes are copied by libnftnl.
            unsafe {
                let s = Owned::new(sys::nftnl_set_alloc(), sys_free_set)?;
                set_common(s.as_ptr(), family, &table, &name);
                for e in chunk {
                    let el = NonNull::new(sys::nftnl_set_elem_alloc()).ok_or(NftError::Alloc)?;
                    sys::nftnl_set_elem_set(
                        el.as_ptr(),
                        sys::NFTNL_SET_ELEM_KEY as u16,
                        e.key.as_ptr().cast::<c_void>(),
                        e.key.len() as u32,
                    );
                    if let Some(data) = &e.data {
                        sys::nftnl_set_elem_set(
                            el.as_ptr(),
                            sys::NFTNL_SET_ELEM_DATA as u16,
                            data.as_ptr().cast::<c_void>(),
                            data.len() as u32,
                        );
                    }
                    sys::nftnl_set_elem_add(s.as_ptr(), el.as_ptr());
                }
                let msg = if op == Op::Delete {
                    libc::NFT_MSG_DELSETELEM
                } else {
                    libc::NFT_MSG_NEWSETELEM
                };
                let nlh = self.header(msg as u16, family, flags_for(op));
                sys::nftnl_set_elems_nlmsg_build_payload(nlh, s.as_ptr());
                self.commit(nlh);
            }
            self.messages += 1;
        }
        Ok(())
    }
}

/// A single `GETTABLE` request (not a batch) for table `name`, asking for an ACK.
pub fn get_table_request(family: u16, name: &str, seq: u32) -> Result<Vec<u8>, NftError> {
    let t = table_object(family, name)?;
    let mut buf = vec![0u8; 1024];
    let ty = (NFNL_SUBSYS_NFTABLES << 8) | libc::NFT_MSG_GETTABLE as u16;
    // SAFETY: the buffer holds 1024 bytes, more than a header and a table name attribute need;
    // `t` is a live table freed by `Owned`.
    unsafe {
        let nlh = sys::nftnl_nlmsg_build_hdr(
            buf.as_mut_ptr().cast(),
            ty,
            family,
            NLM_F_REQUEST | 0x4,
            seq,
        );
        sys::nftnl_table_nlmsg_build_payload(nlh, t.as_ptr());
        let len = (*nlh).nlmsg_len as usize;
        buf.truncate(len);
    }
    Ok(buf)
}

/// A table object naming `family`/`name`, freed when dropped.
fn table_object(family: u16, name: &str) -> Result<Owned<sys::nftnl_table>, NftError> {
    let name = cstr(name)?;
    // SAFETY: a fresh table from `nftnl_table_alloc`, owned by `Owned`; the name is copied.
    unsafe {
        let t = Owned::new(sys::nftnl_table_alloc(), sys_free_table)?;
        sys::nftnl_table_set_u32(
            t.as_ptr(),
            sys::NFTNL_TABLE_FAMILY as u16,
            u32::from(family),
        );
        sys::nftnl_table_set_str(t.as_ptr(), sys::NFTNL_TABLE_NAME as u16, name.as_ptr());
        Ok(t)
    }
}

/// SAFETY (caller): `p` is a live set.
unsafe fn set_common(p: *mut sys::nftnl_set, family: u16, table: &CString, name: &CString) {
    // SAFETY: per the caller's contract; strings are copied.
    unsafe {
        sys::nftnl_set_set_u32(p, sys::NFTNL_SET_FAMILY as u16, u32::from(family));
        sys::nftnl_set_set_str(p, sys::NFTNL_SET_TABLE as u16, table.as_ptr());
        sys::nftnl_set_set_str(p, sys::NFTNL_SET_NAME as u16, name.as_ptr());
    }
}

/// Builds one libnftnl expression. The caller owns the result (and normally gives it to a rule).
fn build_expr(e: &Expr, family: u16) -> Result<NonNull<sys::nftnl_expr>, NftError> {
    let kind: &std::ffi::CStr = match e {
        Expr::Payload { .. } => c"payload",
        Expr::Meta { .. } => c"meta",
        Expr::Ct { .. } => c"ct",
        Expr::Fib { .. } => c"fib",
        Expr::Bitwise { .. } => c"bitwise",
        Expr::Cmp { .. } => c"cmp",
        Expr::Lookup { .. } => c"lookup",
        Expr::Dnat { .. } => c"nat",
        Expr::Masquerade => c"masq",
        Expr::Counter => c"counter",
    };
    // SAFETY: `x` is a freshly allocated expression of the kind whose attributes are set below;
    // byte attributes are copied by libnftnl.
    unsafe {
        let x = NonNull::new(sys::nftnl_expr_alloc(kind.as_ptr())).ok_or(NftError::Alloc)?;
        let p = x.as_ptr();
        let u32_ = |attr: u32, v: u32| sys::nftnl_expr_set_u32(p, attr as u16, v);
        let bytes = |attr: u32, v: &[u8]| {
            sys::nftnl_expr_set(p, attr as u16, v.as_ptr().cast::<c_void>(), v.len() as u32);
        };
        match e {
            Expr::Payload {
                base,
                offset,
                len,
                dreg,
            } => {
                let base = match base {
                    PayloadBase::Network => libc::NFT_PAYLOAD_NETWORK_HEADER,
                    PayloadBase::Transport => libc::NFT_PAYLOAD_TRANSPORT_HEADER,
                };
                u32_(sys::NFTNL_EXPR_PAYLOAD_BASE, base as u32);
                u32_(sys::NFTNL_EXPR_PAYLOAD_OFFSET, *offset);
                u32_(sys::NFTNL_EXPR_PAYLOAD_LEN, *len);
                u32_(sys::NFTNL_EXPR_PAYLOAD_DREG, *dreg);
            }
            Expr::Meta { key, dreg } => {
                u32_(sys::NFTNL_EXPR_META_KEY, *key);
                u32_(sys::NFTNL_EXPR_META_DREG, *dreg);
            }
            Expr::Ct { key, dreg } => {
                u32_(sys::NFTNL_EXPR_CT_KEY, *key);
                u32_(sys::NFTNL_EXPR_CT_DREG, *dreg);
            }
            Expr::Fib {
                flags,
                result,
                dreg,
            } => {
                u32_(sys::NFTNL_EXPR_FIB_FLAGS, *flags);
                u32_(sys::NFTNL_EXPR_FIB_RESULT, *result);
                u32_(sys::NFTNL_EXPR_FIB_DREG, *dreg);
            }
            Expr::Bitwise {
                sreg,
                dreg,
                mask,
                xor,
            } => {
                u32_(sys::NFTNL_EXPR_BITWISE_SREG, *sreg);
                u32_(sys::NFTNL_EXPR_BITWISE_DREG, *dreg);
                u32_(sys::NFTNL_EXPR_BITWISE_LEN, mask.len() as u32);
                bytes(sys::NFTNL_EXPR_BITWISE_MASK, mask);
                bytes(sys::NFTNL_EXPR_BITWISE_XOR, xor);
            }
            Expr::Cmp { sreg, op, data } => {
                let op = match op {
                    CmpOp::Eq => libc::NFT_CMP_EQ,
                    CmpOp::Neq => libc::NFT_CMP_NEQ,
                };
                u32_(sys::NFTNL_EXPR_CMP_SREG, *sreg);
                u32_(sys::NFTNL_EXPR_CMP_OP, op as u32);
                bytes(sys::NFTNL_EXPR_CMP_DATA, data);
            }
            Expr::Lookup { set, sreg, dreg } => {
                let name = cstr(set)?;
                u32_(sys::NFTNL_EXPR_LOOKUP_SREG, *sreg);
                if let Some(d) = dreg {
                    u32_(sys::NFTNL_EXPR_LOOKUP_DREG, *d);
                }
                sys::nftnl_expr_set_str(p, sys::NFTNL_EXPR_LOOKUP_SET as u16, name.as_ptr());
            }
            Expr::Dnat {
                addr_reg,
                proto_reg,
            } => {
                u32_(sys::NFTNL_EXPR_NAT_TYPE, libc::NFT_NAT_DNAT as u32);
                u32_(sys::NFTNL_EXPR_NAT_FAMILY, u32::from(family));
                u32_(sys::NFTNL_EXPR_NAT_REG_ADDR_MIN, *addr_reg);
                if let Some(r) = proto_reg {
                    u32_(sys::NFTNL_EXPR_NAT_REG_PROTO_MIN, *r);
                }
            }
            Expr::Masquerade | Expr::Counter => {}
        }
        Ok(x)
    }
}

// libnftnl's free functions take `*const T` in some versions and `*mut T` in others; these adapters
// give `Owned` one signature.
unsafe extern "C" fn sys_free_table(p: *const sys::nftnl_table) {
    // SAFETY: called once by `Owned::drop` on a pointer from `nftnl_table_alloc`.
    unsafe { sys::nftnl_table_free(p.cast_mut()) }
}
unsafe extern "C" fn sys_free_chain(p: *const sys::nftnl_chain) {
    // SAFETY: as above, for chains.
    unsafe { sys::nftnl_chain_free(p.cast_mut()) }
}
unsafe extern "C" fn sys_free_rule(p: *const sys::nftnl_rule) {
    // SAFETY: as above, for rules (this also frees the rule's expressions).
    unsafe { sys::nftnl_rule_free(p.cast_mut()) }
}
unsafe extern "C" fn sys_free_set(p: *const sys::nftnl_set) {
    // SAFETY: as above, for sets (this also frees the set's elements).
    unsafe { sys::nftnl_set_free(p.cast_mut()) }
}
