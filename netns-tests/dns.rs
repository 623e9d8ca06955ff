//! A tiny authoritative DNS responder (A records only), used as the "host
//! resolver" in the DNS tests.
//!
//! The installed busybox has no `dnsd` applet, so the suite brings its own:
//! the test binary re-executes itself inside a namespace
//! (`ip netns exec NS <this test binary> dns::dns_server_helper --exact
//! --ignored`) with the configuration in environment variables. The helper
//! test is `#[ignore]`d and returns immediately when those are absent, so it
//! is inert in normal runs.

use std::collections::HashMap;
use std::net::{Ipv4Addr, UdpSocket};
use std::time::{Duration, Instant};

use crate::harness::Topology;
use crate::procs::BgProc;

const HELPER_TEST: &str = "dns::dns_server_helper";
const ENV_LISTEN: &str = "RNT_DNS_LISTEN";
const ENV_RECORDS: &str = "RNT_DNS_RECORDS";
/// The helper exits by itself after this long even if nobody kills it.
const LIFETIME: Duration = Duration::from_secs(240);

#[test]
#[ignore = "helper process for the DNS tests; inert unless RNT_DNS_LISTEN is set"]
fn dns_server_helper() {
    let Ok(listen) = std::env::var(ENV_LISTEN) else {
        return;
    };
    let records = parse_records(&std::env::var(ENV_RECORDS).unwrap_or_default());
    let sock =
        UdpSocket::bind(&listen).unwrap_or_else(|e| panic!("dns helper: bind {listen}: {e}"));
    sock.set_read_timeout(Some(Duration::from_millis(500)))
        .expect("set_read_timeout");
    println!(
        "dns helper listening on {listen} with {} record(s)",
        records.len()
    );
    let deadline = Instant::now() + LIFETIME;
    let mut buf = [0u8; 1500];
    while Instant::now() < deadline {
        let Ok((n, peer)) = sock.recv_from(&mut buf) else {
            continue;
        };
        if let Some(reply) = answer(&buf[..n], &records) {
            let _ = sock.send_to(&reply, peer);
        }
    }
}

/// "name=ip,name=ip" → map (names lower-case, no trailing dot).
fn parse_records(spec: &str) -> HashMap<String, Ipv4Addr> {
    spec.split(',')
        .filter(|s| !s.is_empty())
        .map(|kv| {
            let (k, v) = kv
                .split_once('=')
                .unwrap_or_else(|| panic!("bad record {kv:?}"));
            let ip = v
                .parse()
                .unwrap_or_else(|e| panic!("bad record address {v:?}: {e}"));
            (k.trim_end_matches('.').to_ascii_lowercase(), ip)
        })
        .collect()
}

/// Builds the response to QUERY: A records for known names, an empty
/// NOERROR answer for other types of known names, NXDOMAIN otherwise.
/// Returns `None` for anything that is not a one-question standard query.
pub fn answer(query: &[u8], records: &HashMap<String, Ipv4Addr>) -> Option<Vec<u8>> {
    if query.len() < 12 {
        return None;
    }
    let flags = u16::from_be_bytes([query[2], query[3]]);
    let qdcount = u16::from_be_bytes([query[4], query[5]]);
    if flags & 0x8000 != 0 || (flags >> 11) & 0xF != 0 || qdcount != 1 {
        return None;
    }
    // Question: labels, then QTYPE and QCLASS.
    let mut pos = 12;
    let mut labels = Vec::new();
    loop {
        let len = *query.get(pos)? as usize;
        pos += 1;
        if len == 0 {
            break;
        }
        if len > 63 {
            return None; // compression is not valid in a question
        }
        labels.push(String::from_utf8_lossy(query.get(pos..pos + len)?).to_ascii_lowercase());
        pos += len;
    }
    let qtype = u16::from_be_bytes([*query.get(pos)?, *query.get(pos + 1)?]);
    let question_end = pos + 4;
    if query.len() < question_end {
        return None;
    }
    let name = labels.join(".");
    let known = records.get(&name);
    let with_answer = matches!((known, qtype), (Some(_), 1 | 255));
    let rcode: u16 = if known.is_some() { 0 } else { 3 };
    // QR | AA | RD (copied) | rcode.
    let out_flags = 0x8000 | 0x0400 | (flags & 0x0100) | rcode;
    let mut reply = Vec::with_capacity(question_end + 16);
    reply.extend_from_slice(&query[0..2]);
    reply.extend_from_slice(&out_flags.to_be_bytes());
    reply.extend_from_slice(&1u16.to_be_bytes()); // QDCOUNT
    reply.extend_from_slice(&u16::from(with_answer).to_be_bytes()); // ANCOUNT
    reply.extend_from_slice(&[0, 0, 0, 0]); // NSCOUNT, ARCOUNT
    reply.extend_from_slice(&query[12..question_end]);
    if let (true, Some(ip)) = (with_answer, known) {
        reply.extend_from_slice(&[0xC0, 0x0C]); // pointer to the question name
        reply.extend_from_slice(&1u16.to_be_bytes()); // TYPE A
        reply.extend_from_slice(&1u16.to_be_bytes()); // CLASS IN
        reply.extend_from_slice(&60u32.to_be_bytes()); // TTL
        reply.extend_from_slice(&4u16.to_be_bytes()); // RDLENGTH
        reply.extend_from_slice(&ip.octets());
    }
    Some(reply)
}

/// Starts the DNS helper in NS on LISTEN_IP:53 answering RECORDS, and waits
/// until it listens.
pub fn start_dns_server(
    t: &Topology,
    ns: &str,
    listen_ip: &str,
    records: &[(&str, &str)],
) -> BgProc {
    let exe = std::env::current_exe().expect("path of the running test binary");
    let exe = exe.to_str().expect("test binary path is UTF-8");
    let mut cmd = t.ns_command(
        ns,
        &[
            exe,
            HELPER_TEST,
            "--exact",
            "--ignored",
            "--nocapture",
            "--test-threads=1",
        ],
    );
    let spec: Vec<String> = records.iter().map(|(n, ip)| format!("{n}={ip}")).collect();
    cmd.env(ENV_LISTEN, format!("{listen_ip}:53"))
        .env(ENV_RECORDS, spec.join(","));
    let bg = t.spawn_command(cmd);
    t.wait_listening(ns, "udp", 53);
    bg
}

/// Addresses printed by `busybox nslookup` for the looked-up name (the
/// `Address` lines after the `Name:` line; the server's own address, which
/// comes before, is ignored).
pub fn nslookup_addresses(output: &str) -> Vec<String> {
    let mut after_name = false;
    let mut found = Vec::new();
    for line in output.lines() {
        let line = line.trim();
        if line.starts_with("Name:") {
            after_name = true;
            continue;
        }
        if after_name && line.starts_with("Address") {
            if let Some(addr) = line.rsplit([' ', '\t']).next() {
                found.push(addr.to_string());
            }
        }
    }
    found
}

#[cfg(test)]
mod unit {
    use super::*;

    fn query(name: &str, qtype: u16) -> Vec<u8> {
        let mut q = vec![0x12, 0x34, 0x01, 0x00, 0, 1, 0, 0, 0, 0, 0, 0];
        for label in name.split('.') {
            q.push(label.len() as u8);
            q.extend_from_slice(label.as_bytes());
        }
        q.push(0);
        q.extend_from_slice(&qtype.to_be_bytes());
        q.extend_from_slice(&1u16.to_be_bytes());
        q
    }

    #[test]
    fn dns_answer_builds_a_record_and_nxdomain() {
        let records = parse_records("example.test=192.0.2.77");
        let r = answer(&query("Example.Test", 1), &records).expect("an answer");
        assert_eq!(&r[0..2], &[0x12, 0x34]);
        assert_eq!(r[3] & 0x0F, 0, "rcode NOERROR");
        assert_eq!(u16::from_be_bytes([r[6], r[7]]), 1, "one answer");
        assert_eq!(&r[r.len() - 4..], &[192, 0, 2, 77]);
        let aaaa = answer(&query("example.test", 28), &records).expect("an answer");
        assert_eq!(u16::from_be_bytes([aaaa[6], aaaa[7]]), 0, "no AAAA answer");
        let nx = answer(&query("other.test", 1), &records).expect("an answer");
        assert_eq!(nx[3] & 0x0F, 3, "rcode NXDOMAIN");
    }

    #[test]
    fn nslookup_output_parsing_ignores_server_address() {
        let out = "Server:\t\t127.0.0.53\nAddress:\t127.0.0.53:53\n\nName:\texample.test\nAddress: 192.0.2.77\n";
        assert_eq!(nslookup_addresses(out), vec!["192.0.2.77".to_string()]);
    }
}
