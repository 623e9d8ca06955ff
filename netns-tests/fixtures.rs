//! Traffic fixtures: socat servers and clients, payloads, and the
//! assertions built on them. Every client has a short, explicit bound
//! (socat `connect-timeout`, `-t`, `-T`, plus a wall-clock kill).

use std::time::Duration;

use crate::harness::Topology;
use crate::procs::Finished;

/// Wall-clock bound for one client exchange.
const CLIENT_TIMEOUT: Duration = Duration::from_secs(20);

/// Deterministic pseudo-random bytes (xorshift), with every byte value
/// present, so that any corruption or truncation shows up in a comparison.
pub fn payload(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let mut out: Vec<u8> = (0..=255u8).collect();
    while out.len() < len {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        out.extend_from_slice(&x.to_le_bytes());
    }
    out.truncate(len);
    out
}

/// Argv of a TCP echo server on PORT (one child per connection).
pub fn tcp_echo_server(port: u16) -> Vec<String> {
    vec![
        "socat".into(),
        format!("TCP-LISTEN:{port},fork,reuseaddr"),
        "EXEC:cat".into(),
    ]
}

/// Argv of a UDP echo server on PORT (each datagram is echoed back).
pub fn udp_echo_server(port: u16) -> Vec<String> {
    vec![
        "socat".into(),
        format!("UDP-RECVFROM:{port},fork"),
        "EXEC:cat".into(),
    ]
}

/// Argv of a server that answers every TCP connection / UDP datagram with
/// `peer=<source address it saw>\n`.
///
/// TCP clients must send nothing (the script does not read). UDP clients
/// send one newline-terminated datagram, which the script reads first: if
/// it exited without reading, socat's write of the datagram into the
/// script could fail with EPIPE and drop the reply (seen ~10% of the time).
pub fn peer_addr_server(proto: &str, port: u16) -> Vec<String> {
    let (listen, script) = match proto {
        "tcp" => (
            format!("TCP-LISTEN:{port},fork,reuseaddr"),
            "echo peer=$SOCAT_PEERADDR",
        ),
        "udp" => (
            format!("UDP-RECVFROM:{port},fork"),
            "read line; echo peer=$SOCAT_PEERADDR",
        ),
        other => panic!("unknown protocol {other:?}"),
    };
    vec!["socat".into(), listen, format!("SYSTEM:{script}")]
}

/// Argv of a TCP server that answers every connection with `port=<its own
/// local port>\n` (tells which container port a connection landed on).
pub fn sock_port_server(port: u16) -> Vec<String> {
    vec![
        "socat".into(),
        format!("TCP-LISTEN:{port},fork,reuseaddr"),
        "SYSTEM:echo port=$SOCAT_SOCKPORT".into(),
    ]
}

pub fn as_strs(v: &[String]) -> Vec<&str> {
    v.iter().map(String::as_str).collect()
}

/// Sends PAYLOAD over TCP from NS to ADDR:PORT, half-closes, and returns
/// what came back (the process result; check `.success()`).
pub fn tcp_exchange(t: &Topology, ns: &str, addr: &str, port: u16, payload: &[u8]) -> Finished {
    let target = format!("TCP:{addr}:{port},connect-timeout=2");
    t.exec_input(
        ns,
        &["socat", "-t", "5", "-T", "10", "-", &target],
        payload,
        CLIENT_TIMEOUT,
    )
}

/// Sends one datagram from NS to ADDR:PORT and returns what came back
/// within two seconds (UDP has no EOF: the client always waits that long).
pub fn udp_exchange(t: &Topology, ns: &str, addr: &str, port: u16, payload: &[u8]) -> Finished {
    let target = format!("UDP:{addr}:{port}");
    t.exec_input(
        ns,
        &["socat", "-t", "2", "-", &target],
        payload,
        CLIENT_TIMEOUT,
    )
}

/// Asserts that a TCP echo through ADDR:PORT from NS returns PAYLOAD exactly.
pub fn assert_tcp_echo(t: &Topology, ns: &str, addr: &str, port: u16, payload: &[u8], what: &str) {
    let out = tcp_exchange(t, ns, addr, port, payload);
    assert!(
        out.success(),
        "[{}] {what}: TCP exchange with {addr}:{port} from {ns} failed\n{}",
        t.label,
        out.describe()
    );
    assert_same_bytes(
        &out.stdout,
        payload,
        &format!("[{}] {what}: TCP echo via {addr}:{port} from {ns}", t.label),
    );
}

/// Asserts that a UDP echo through ADDR:PORT from NS returns PAYLOAD exactly.
pub fn assert_udp_echo(t: &Topology, ns: &str, addr: &str, port: u16, payload: &[u8], what: &str) {
    let out = udp_exchange(t, ns, addr, port, payload);
    assert!(
        out.success(),
        "[{}] {what}: UDP exchange with {addr}:{port} from {ns} failed\n{}",
        t.label,
        out.describe()
    );
    assert_same_bytes(
        &out.stdout,
        payload,
        &format!("[{}] {what}: UDP echo via {addr}:{port} from {ns}", t.label),
    );
}

/// Asserts that ADDR:PORT does NOT answer from NS: the connection is
/// refused or times out (2 s connect timeout) and no byte comes back.
pub fn assert_tcp_no_answer(t: &Topology, ns: &str, addr: &str, port: u16, what: &str) {
    let probe = b"are you there?\n";
    let out = tcp_exchange(t, ns, addr, port, probe);
    assert!(
        !out.success() && out.stdout.is_empty(),
        "[{}] {what}: {addr}:{port} answered from {ns} but must not\n{}",
        t.label,
        out.describe()
    );
}

/// Byte-exact comparison with a readable failure message.
pub fn assert_same_bytes(got: &[u8], want: &[u8], what: &str) {
    if got == want {
        return;
    }
    let first_diff = got
        .iter()
        .zip(want)
        .position(|(a, b)| a != b)
        .unwrap_or(got.len().min(want.len()));
    panic!(
        "{what}: received {} bytes, expected {} bytes; first difference at offset {first_diff}\n\
         received (head): {:?}",
        got.len(),
        want.len(),
        String::from_utf8_lossy(&got[..got.len().min(200)])
    );
}

/// The `peer=` value printed by `peer_addr_server`, if any line has one.
pub fn peer_lines(output: &str) -> Vec<String> {
    output
        .lines()
        .filter_map(|l| l.trim().strip_prefix("peer=").map(str::to_string))
        .collect()
}

/// Single-quotes S for /bin/sh.
pub fn sh_quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', r"'\''"))
}

/// Creates system user NAME if missing (with a home directory and subordinate ids when
/// `login`, as rootless Podman needs), for tests that run tools unprivileged.
pub fn ensure_user(name: &str, login: bool) {
    let known = std::process::Command::new("id")
        .args(["-u", name])
        .output()
        .expect("run id");
    if known.status.success() {
        return;
    }
    let mut cmd = std::process::Command::new("useradd");
    if login {
        cmd.args(["-m", "-s", "/bin/sh", name]);
    } else {
        cmd.args([
            "--system",
            "--no-create-home",
            "--shell",
            "/usr/sbin/nologin",
            name,
        ]);
    }
    let out = cmd.output().expect("run useradd");
    assert!(
        out.status.success(),
        "useradd {name}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Makes /dev/net/tun usable by everyone (mode 0666, as most distributions ship it): rootless
/// TAP creation needs it.
pub fn open_tun_to_all() {
    use std::os::unix::fs::PermissionsExt;
    let tun = std::path::Path::new("/dev/net/tun");
    let mode = std::fs::metadata(tun)
        .expect("/dev/net/tun exists")
        .permissions()
        .mode();
    if mode & 0o666 != 0o666 {
        std::fs::set_permissions(tun, std::fs::Permissions::from_mode(0o666))
            .expect("chmod /dev/net/tun");
    }
}
