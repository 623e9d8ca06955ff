//! The Internet checksum (RFC 1071), summed 32 bits at a time.

use std::net::IpAddr;

/// Adds `data` to a running one's-complement sum (not yet folded).
pub fn add(mut sum: u64, data: &[u8]) -> u64 {
    let mut chunks = data.chunks_exact(4);
    for c in &mut chunks {
        sum += u64::from(u32::from_be_bytes([c[0], c[1], c[2], c[3]]));
    }
    let rest = chunks.remainder();
    let mut tail = [0u8; 4];
    tail[..rest.len()].copy_from_slice(rest);
    sum + u64::from(u32::from_be_bytes(tail))
}

/// Folds a running sum to 16 bits (not inverted).
pub fn fold(mut sum: u64) -> u16 {
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    sum as u16
}

/// The pseudo-header sum for an L4 segment of `len` bytes (IPv4, RFC 793; IPv6, RFC 8200
/// 8.1: the same fields, so the same sum). Both addresses are of one family.
pub fn pseudo(src: IpAddr, dst: IpAddr, proto: u8, len: usize) -> u64 {
    let mut sum = add_ip(0, src);
    sum = add_ip(sum, dst);
    sum + u64::from(proto) + len as u64
}

fn add_ip(sum: u64, ip: IpAddr) -> u64 {
    match ip {
        IpAddr::V4(a) => add(sum, &a.octets()),
        IpAddr::V6(a) => add(sum, &a.octets()),
    }
}

/// The checksum to store: the inverted fold of `sum`.
pub fn finish(sum: u64) -> u16 {
    !fold(sum)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn matches_rfc1071_example() {
        // RFC 1071 section 3: the words 0001 f203 f4f5 f6f7 sum to ddf2.
        let data = [0x00, 0x01, 0xf2, 0x03, 0xf4, 0xf5, 0xf6, 0xf7];
        assert_eq!(fold(add(0, &data)), 0xddf2);
        // An odd length pads with a zero byte.
        assert_eq!(fold(add(0, &[0x01])), 0x0100);
    }

    #[test]
    fn agrees_with_smoltcp() {
        let data: Vec<u8> = (0..1001u32).map(|i| (i * 7 + 3) as u8).collect();
        assert_eq!(fold(add(0, &data)), smoltcp::wire::checksum::data(&data));
    }
}
