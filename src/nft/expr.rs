//! The nftables expressions rnat's rules are made of, as plain data.
//!
//! This is the model the rest of rnat reasons about and tests; `ffi` turns it into libnftnl objects.
//! Register numbers follow the kernel: `REG_1` is the first 128-bit register, `REG32_00..` its 32-bit
//! slices (concatenations put each component in its own 32-bit slice).

/// The verdict register's first data register, 128 bits wide (`NFT_REG_1`).
pub const REG_1: u32 = 1;
/// 32-bit registers, used for concatenated keys and map data (`NFT_REG32_00` ...).
pub const REG32_00: u32 = 8;
pub const REG32_01: u32 = 9;
pub const REG32_02: u32 = 10;

/// `meta l4proto`.
pub const META_L4PROTO: u32 = 16;
/// `ct status`.
pub const CT_STATUS: u32 = 2;
/// `IPS_DST_NAT`: the connection had its destination rewritten.
pub const CT_STATUS_DNAT: u32 = 1 << 5;
/// `fib daddr`.
pub const FIB_F_DADDR: u32 = 1 << 1;
/// `fib ... type`.
pub const FIB_RESULT_ADDRTYPE: u32 = 3;
/// `RTN_LOCAL`: an address of this host.
pub const RTN_LOCAL: u32 = 2;

/// Which header a payload offset counts from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PayloadBase {
    Network,
    Transport,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CmpOp {
    Eq,
    Neq,
}

/// One expression of a rule.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Expr {
    /// Load `len` bytes at `offset` of a header into `dreg`.
    Payload {
        base: PayloadBase,
        offset: u32,
        len: u32,
        dreg: u32,
    },
    /// Load a meta key (e.g. `l4proto`) into `dreg`.
    Meta {
        key: u32,
        dreg: u32,
    },
    /// Load a conntrack key into `dreg`.
    Ct {
        key: u32,
        dreg: u32,
    },
    /// Route lookup on the destination address; `result` into `dreg`.
    Fib {
        flags: u32,
        result: u32,
        dreg: u32,
    },
    /// `dreg = (sreg & mask) ^ xor`.
    Bitwise {
        sreg: u32,
        dreg: u32,
        mask: Vec<u8>,
        xor: Vec<u8>,
    },
    /// Break out of the rule unless the comparison holds.
    Cmp {
        sreg: u32,
        op: CmpOp,
        data: Vec<u8>,
    },
    /// Look `sreg` up in a named set; a map also writes the data into `dreg`.
    Lookup {
        set: String,
        sreg: u32,
        dreg: Option<u32>,
    },
    /// Destination NAT to the address in `addr_reg` and the port in `proto_reg`.
    Dnat {
        addr_reg: u32,
        proto_reg: Option<u32>,
    },
    /// Source NAT to the outgoing interface's address.
    Masquerade,
    Counter,
}

impl Expr {
    /// `ip saddr`/`ip daddr` (`offset` 12 or 16) within `net/prefix`, or not within it.
    pub fn ipv4_in_prefix(
        offset: u32,
        net: std::net::Ipv4Addr,
        prefix: u8,
        op: CmpOp,
    ) -> [Expr; 3] {
        let mask = if prefix == 0 {
            0
        } else {
            u32::MAX << (32 - u32::from(prefix))
        };
        let mask = mask.to_be_bytes();
        let net = net.octets();
        let masked: Vec<u8> = net.iter().zip(mask.iter()).map(|(a, m)| a & m).collect();
        [
            Expr::Payload {
                base: PayloadBase::Network,
                offset,
                len: 4,
                dreg: REG_1,
            },
            Expr::Bitwise {
                sreg: REG_1,
                dreg: REG_1,
                mask: mask.to_vec(),
                xor: vec![0; 4],
            },
            Expr::Cmp {
                sreg: REG_1,
                op,
                data: masked,
            },
        ]
    }

    /// `fib daddr type local`.
    pub fn daddr_is_local() -> [Expr; 2] {
        [
            Expr::Fib {
                flags: FIB_F_DADDR,
                result: FIB_RESULT_ADDRTYPE,
                dreg: REG_1,
            },
            Expr::Cmp {
                sreg: REG_1,
                op: CmpOp::Eq,
                data: RTN_LOCAL.to_ne_bytes().to_vec(),
            },
        ]
    }

    /// `ct status dnat`.
    pub fn ct_status_dnat() -> [Expr; 3] {
        [
            Expr::Ct {
                key: CT_STATUS,
                dreg: REG_1,
            },
            Expr::Bitwise {
                sreg: REG_1,
                dreg: REG_1,
                mask: CT_STATUS_DNAT.to_ne_bytes().to_vec(),
                xor: vec![0; 4],
            },
            Expr::Cmp {
                sreg: REG_1,
                op: CmpOp::Neq,
                data: vec![0; 4],
            },
        ]
    }
}
