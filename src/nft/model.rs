//! rnat's nftables ruleset, as data: one `ip rnat` table, three maps, three NAT chains.
//!
//! ```text
//! table ip rnat {
//!   map pub_addr { type ipv4_addr . inet_proto . inet_service : ipv4_addr . inet_service }
//!   map pub_any  { type inet_proto . inet_service : ipv4_addr . inet_service }
//!   map dns      { type ipv4_addr . inet_proto . inet_service : ipv4_addr . inet_service }
//!   chain prerouting  { type nat hook prerouting priority dstnat;
//!     dnat ip to ip daddr . meta l4proto . th dport map @pub_addr
//!     fib daddr type local dnat ip to meta l4proto . th dport map @pub_any
//!     dnat ip to ip daddr . meta l4proto . th dport map @dns }
//!   chain output      { type nat hook output priority dstnat;  (the first two rules again) }
//!   chain postrouting { type nat hook postrouting priority srcnat;
//!     ip saddr 127.0.0.0/8 ct status dnat masquerade            # published on 127.0.0.1
//!     ip saddr SUBNET ct status dnat masquerade                  # hairpin, per network
//!     ip saddr SUBNET ip daddr != SUBNET masquerade }            # outbound, per network
//! }
//! ```
//!
//! Every published port is one map element, so the per-packet cost is one hash lookup however many
//! ports there are, and publishing is an element insert, never a rule rewrite. The per-network
//! postrouting rules change only when a network is created or removed (the chain is rebuilt then, in
//! one transaction).

use std::net::Ipv4Addr;

use ipnet::Ipv4Net;

use super::expr::{CmpOp, Expr, PayloadBase, META_L4PROTO, REG32_00, REG32_01, REG32_02};
use super::ffi::{BatchBuf, Elem, Op};
use super::NftError;
use crate::spec::{PortMapping, Protocol};

/// `NFPROTO_IPV4`: the `ip` family.
pub const FAMILY: u16 = 2;
pub const TABLE: &str = "rnat";

/// A base chain of rnat's table.
#[derive(Debug, Clone, Copy)]
pub struct ChainDef {
    pub name: &'static str,
    pub kind: &'static str,
    pub hook: u32,
    pub priority: i32,
}

pub const PREROUTING: ChainDef = ChainDef {
    name: "prerouting",
    kind: "nat",
    hook: 0,
    priority: -100,
};
pub const OUTPUT: ChainDef = ChainDef {
    name: "output",
    kind: "nat",
    hook: 3,
    priority: -100,
};
pub const POSTROUTING: ChainDef = ChainDef {
    name: "postrouting",
    kind: "nat",
    hook: 4,
    priority: 100,
};

/// A named map: key and data types are nftables' datatype ids (concatenations packed 6 bits each),
/// so that `nft list` prints them.
#[derive(Debug, Clone, Copy)]
pub struct MapDef {
    pub name: &'static str,
    pub key_type: u32,
    pub key_len: u32,
    pub data_type: u32,
    pub data_len: u32,
}

const TYPE_IPV4_ADDR: u32 = 7;
const TYPE_INET_PROTO: u32 = 12;
const TYPE_INET_SERVICE: u32 = 13;
const fn concat2(a: u32, b: u32) -> u32 {
    (a << 6) | b
}
const ADDR_PORT: u32 = concat2(TYPE_IPV4_ADDR, TYPE_INET_SERVICE);

pub const PUB_ANY: MapDef = MapDef {
    name: "pub_any",
    key_type: concat2(TYPE_INET_PROTO, TYPE_INET_SERVICE),
    key_len: 8,
    data_type: ADDR_PORT,
    data_len: 8,
};
pub const PUB_ADDR: MapDef = MapDef {
    name: "pub_addr",
    key_type: concat2(concat2(TYPE_IPV4_ADDR, TYPE_INET_PROTO), TYPE_INET_SERVICE),
    key_len: 12,
    data_type: ADDR_PORT,
    data_len: 8,
};
pub const DNS: MapDef = MapDef {
    name: "dns",
    ..PUB_ADDR
};

/// One published port, resolved to the container address it goes to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Dnat {
    /// `None`: every local address.
    pub host_ip: Option<Ipv4Addr>,
    pub protocol: Protocol,
    pub host_port: u16,
    pub to: Ipv4Addr,
    pub to_port: u16,
}

impl Dnat {
    /// The DNAT for `m` to `to`; `None` when the host address is IPv6 (the `ip` table cannot hold it).
    pub fn for_mapping(m: &PortMapping, to: Ipv4Addr) -> Option<Dnat> {
        let host_ip = match m.host_ip {
            None => None,
            Some(std::net::IpAddr::V4(ip)) => Some(ip),
            Some(std::net::IpAddr::V6(_)) => return None,
        };
        Some(Dnat {
            host_ip,
            protocol: m.protocol,
            host_port: m.host_port,
            to,
            to_port: m.container_port,
        })
    }

    /// Which map holds this DNAT.
    pub fn map(&self) -> &'static str {
        if self.host_ip.is_some() {
            PUB_ADDR.name
        } else {
            PUB_ANY.name
        }
    }

    /// The element: key and data, each component padded to 32 bits as the registers hold them.
    pub fn elem(&self) -> Elem {
        Elem {
            key: key(self.host_ip, self.protocol, self.host_port),
            data: Some(data(self.to, self.to_port)),
        }
    }
}

fn pad_port(port: u16) -> [u8; 4] {
    let p = port.to_be_bytes();
    [p[0], p[1], 0, 0]
}

/// A map key: `[ip daddr .] meta l4proto . th dport`.
pub fn key(host_ip: Option<Ipv4Addr>, proto: Protocol, port: u16) -> Vec<u8> {
    let mut k = Vec::with_capacity(12);
    if let Some(ip) = host_ip {
        k.extend_from_slice(&ip.octets());
    }
    k.extend_from_slice(&[proto.number(), 0, 0, 0]);
    k.extend_from_slice(&pad_port(port));
    k
}

/// Map data: `ipv4_addr . inet_service`.
pub fn data(ip: Ipv4Addr, port: u16) -> Vec<u8> {
    let mut d = Vec::with_capacity(8);
    d.extend_from_slice(&ip.octets());
    d.extend_from_slice(&pad_port(port));
    d
}

fn th_dport(dreg: u32) -> Expr {
    Expr::Payload {
        base: PayloadBase::Transport,
        offset: 2,
        len: 2,
        dreg,
    }
}

/// `dnat ip to ip daddr . meta l4proto . th dport map @MAP`
pub fn rule_dnat_by_addr(map: &str) -> Vec<Expr> {
    vec![
        Expr::Payload {
            base: PayloadBase::Network,
            offset: 16,
            len: 4,
            dreg: REG32_00,
        },
        Expr::Meta {
            key: META_L4PROTO,
            dreg: REG32_01,
        },
        th_dport(REG32_02),
        Expr::Lookup {
            set: map.to_string(),
            sreg: REG32_00,
            dreg: Some(REG32_00),
        },
        Expr::Dnat {
            addr_reg: REG32_00,
            proto_reg: Some(REG32_01),
        },
    ]
}

/// `fib daddr type local dnat ip to meta l4proto . th dport map @pub_any`
pub fn rule_dnat_any() -> Vec<Expr> {
    let mut r: Vec<Expr> = Expr::daddr_is_local().into();
    r.extend([
        Expr::Meta {
            key: META_L4PROTO,
            dreg: REG32_00,
        },
        th_dport(REG32_01),
        Expr::Lookup {
            set: PUB_ANY.name.to_string(),
            sreg: REG32_00,
            dreg: Some(REG32_00),
        },
        Expr::Dnat {
            addr_reg: REG32_00,
            proto_reg: Some(REG32_01),
        },
    ]);
    r
}

/// The postrouting rules for a set of container subnets; the flag says whether traffic leaving
/// the subnet is masqueraded (hairpin traffic always is).
pub fn postrouting_rules(nets: &[(Ipv4Net, bool)]) -> Vec<Vec<Expr>> {
    let mut rules = Vec::new();
    let mut localhost: Vec<Expr> =
        Expr::ipv4_in_prefix(12, Ipv4Addr::new(127, 0, 0, 0), 8, CmpOp::Eq).into();
    localhost.extend(Expr::ct_status_dnat());
    localhost.push(Expr::Masquerade);
    rules.push(localhost);
    for (net, masquerade) in nets {
        let src = Expr::ipv4_in_prefix(12, net.network(), net.prefix_len(), CmpOp::Eq);
        let mut hairpin: Vec<Expr> = src.clone().into();
        hairpin.extend(Expr::ct_status_dnat());
        hairpin.push(Expr::Masquerade);
        rules.push(hairpin);
        if !masquerade {
            continue;
        }
        let mut outbound: Vec<Expr> = src.into();
        outbound.extend(Expr::ipv4_in_prefix(
            16,
            net.network(),
            net.prefix_len(),
            CmpOp::Neq,
        ));
        outbound.push(Expr::Masquerade);
        rules.push(outbound);
    }
    rules
}

/// The batch that creates the whole table. It fails with `EEXIST` when the table is already there
/// (it is only ever created whole, so an existing table is complete).
pub fn create_table(batch: &mut BatchBuf) -> Result<(), NftError> {
    batch.table(Op::CreateExcl, FAMILY, TABLE)?;
    for (id, map) in [PUB_ADDR, PUB_ANY, DNS].iter().enumerate() {
        batch.map(Op::Create, FAMILY, TABLE, map, id as u32 + 1)?;
    }
    for chain in [PREROUTING, OUTPUT, POSTROUTING] {
        batch.chain(Op::Create, FAMILY, TABLE, &chain)?;
    }
    for chain in [PREROUTING, OUTPUT] {
        batch.rule(FAMILY, TABLE, chain.name, &rule_dnat_by_addr(PUB_ADDR.name))?;
        batch.rule(FAMILY, TABLE, chain.name, &rule_dnat_any())?;
    }
    batch.rule(FAMILY, TABLE, PREROUTING.name, &rule_dnat_by_addr(DNS.name))?;
    for rule in postrouting_rules(&[]) {
        batch.rule(FAMILY, TABLE, POSTROUTING.name, &rule)?;
    }
    Ok(())
}

/// The batch that replaces the postrouting rules with those for `nets`.
pub fn replace_postrouting(batch: &mut BatchBuf, nets: &[(Ipv4Net, bool)]) -> Result<(), NftError> {
    batch.flush_chain(FAMILY, TABLE, POSTROUTING.name)?;
    for rule in postrouting_rules(nets) {
        batch.rule(FAMILY, TABLE, POSTROUTING.name, &rule)?;
    }
    Ok(())
}

/// Adds (or deletes) the elements for `dnats`, grouped by map, to one batch.
pub fn dnat_elems(batch: &mut BatchBuf, op: Op, dnats: &[Dnat]) -> Result<(), NftError> {
    for map in [PUB_ANY.name, PUB_ADDR.name] {
        let elems: Vec<Elem> = dnats
            .iter()
            .filter(|d| d.map() == map)
            .map(Dnat::elem)
            .collect();
        if !elems.is_empty() {
            batch.elems(op, FAMILY, TABLE, map, &elems)?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_pad_each_component_to_a_register() {
        assert_eq!(
            key(None, Protocol::Tcp, 8080),
            vec![6, 0, 0, 0, 0x1f, 0x90, 0, 0]
        );
        assert_eq!(
            key(Some(Ipv4Addr::new(192, 0, 2, 1)), Protocol::Udp, 53),
            vec![192, 0, 2, 1, 17, 0, 0, 0, 0, 53, 0, 0]
        );
        assert_eq!(
            data(Ipv4Addr::new(192, 0, 2, 9), 80),
            vec![192, 0, 2, 9, 0, 80, 0, 0]
        );
        assert_eq!(key(None, Protocol::Tcp, 1).len() as u32, PUB_ANY.key_len);
        assert_eq!(
            key(Some(Ipv4Addr::LOCALHOST), Protocol::Tcp, 1).len() as u32,
            PUB_ADDR.key_len
        );
    }

    #[test]
    fn dnat_goes_to_the_map_its_host_address_selects() {
        let to = Ipv4Addr::new(192, 0, 2, 2);
        let m: PortMapping = "8080:80"
            .parse::<crate::spec::PortSpec>()
            .expect("spec")
            .mappings()
            .next()
            .expect("one");
        assert_eq!(Dnat::for_mapping(&m, to).expect("v4").map(), "pub_any");
        let m = PortMapping {
            host_ip: Some("127.0.0.1".parse().expect("ip")),
            ..m
        };
        assert_eq!(Dnat::for_mapping(&m, to).expect("v4").map(), "pub_addr");
        let m = PortMapping {
            host_ip: Some("2001:db8::1".parse().expect("ip")),
            ..m
        };
        assert_eq!(Dnat::for_mapping(&m, to), None);
    }

    #[test]
    fn map_types_are_nft_concatenations() {
        // What `nft` itself computes for `inet_proto . inet_service` and `ipv4_addr . inet_service`.
        assert_eq!(PUB_ANY.key_type, 781);
        assert_eq!(PUB_ANY.data_type, 461);
    }

    #[test]
    fn rules_load_what_the_lookup_reads() {
        // The lookup key must start where the first load went, and nat must read the address and
        // port where the map data lands: REG32_00 and REG32_01.
        for rule in [rule_dnat_any(), rule_dnat_by_addr("pub_addr")] {
            let lookup = rule.iter().find_map(|e| match e {
                Expr::Lookup { sreg, dreg, .. } => Some((*sreg, *dreg)),
                _ => None,
            });
            assert_eq!(lookup, Some((REG32_00, Some(REG32_00))));
            assert_eq!(
                rule.last(),
                Some(&Expr::Dnat {
                    addr_reg: REG32_00,
                    proto_reg: Some(REG32_01)
                })
            );
        }
    }

    #[test]
    fn postrouting_has_hairpin_per_network_and_outbound_where_masqueraded() {
        let nets: Vec<(Ipv4Net, bool)> = vec![
            ("192.0.2.0/26".parse().expect("net"), true),
            ("192.0.2.64/26".parse().expect("net"), false),
        ];
        let rules = postrouting_rules(&nets);
        // localhost; hairpin + outbound for the first; hairpin only for the second.
        assert_eq!(rules.len(), 4);
        assert!(rules.iter().all(|r| r.last() == Some(&Expr::Masquerade)));
    }

    #[test]
    fn batches_build_without_the_kernel() {
        let mut b = BatchBuf::new();
        create_table(&mut b).expect("table batch");
        let dnats: Vec<Dnat> = (1..=1000)
            .map(|p| Dnat {
                host_ip: None,
                protocol: Protocol::Tcp,
                host_port: p,
                to: Ipv4Addr::new(192, 0, 2, 2),
                to_port: p,
            })
            .collect();
        dnat_elems(&mut b, Op::Create, &dnats).expect("elems");
        // 1 table + 3 maps + 3 chains + 5 rules + 1 postrouting rule + 4 element messages.
        assert_eq!(b.len(), 1 + 3 + 3 + 5 + 1 + 4);
        let bytes = b.finish();
        // Each element carries at least its 8-byte key and 8-byte data.
        assert!(bytes.len() > 1000 * 16);
    }
}
