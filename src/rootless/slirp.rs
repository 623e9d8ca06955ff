//! slirp4netns compatibility: `rnat slirp4netns ARGS` (or rnat invoked as `slirp4netns`) takes
//! slirp4netns 1.2's command line and serves its API socket, so that Podman, RootlessKit and
//! Docker's rootless mode can drive rnat as they drive slirp4netns.
//!
//! Runtimes decide which flags to pass by looking for `--flag` in the `--help` output, so the
//! help lists with dashes exactly the flags rnat honours; the ones it cannot honour are listed by
//! name in a section of their own and refused with a clear error if passed anyway.

use std::net::{IpAddr, Ipv4Addr};
use std::os::fd::{FromRawFd, OwnedFd};
use std::path::PathBuf;

use ipnet::Ipv4Net;
use serde_json::{json, Value};

use super::session::{self, AttachExtras, Options, Target};
use crate::spec::{PortMapping, Protocol};

/// The help text, with `--enable-seccomp` among the honoured flags where rnat has a filter for
/// the architecture (Podman passes every flag it finds there) and among the refused ones
/// elsewhere.
macro_rules! help_text {
    ($seccomp:literal, $seccomp_refused:literal) => {
        concat!(
            "Usage: slirp4netns [OPTION]... PID|PATH [TAPNAME]\n",
            "User-mode networking for unprivileged network namespaces (rnat's engine, slirp4netns 1.2 compatible).\n",
            "\n",
            "-c, --configure          bring up the interface\n",
            "-e, --exit-fd=FD         specify the FD for terminating slirp4netns\n",
            "-r, --ready-fd=FD        specify the FD to write to when the network is configured\n",
            "-m, --mtu=MTU            specify MTU (default=1500, max=65521)\n",
            "-a, --api-socket=PATH    specify API socket path\n",
            "--cidr=CIDR              specify network address CIDR (default=10.0.2.0/24)\n",
            "--disable-host-loopback  prohibit connecting to 127.0.0.1:* on the host namespace\n",
            "--netns-type=TYPE        specify network namespace type ([path|pid], default=pid)\n",
            "--userns-path=PATH       specify user namespace path\n",
            "--enable-sandbox         create a new mount namespace whose root is an empty tmpfs, and drop all\n",
            "                         capabilities except CAP_NET_BIND_SERVICE\n",
            "-6, --enable-ipv6        enable IPv6 (fd00::/64: guest fd00::100, gateway fd00::2, DNS fd00::3)\n",
            "--outbound-addr=IPv4     sets outbound ipv4 address to bound to\n",
            "--outbound-addr=IFACE    the same, with the first IPv4 address of interface IFACE\n",
            "--outbound-addr6=IPv6    sets outbound ipv6 address to bound to (for --enable-ipv6)\n",
            "--outbound-addr6=IFACE   the same, with the first global IPv6 address of interface IFACE\n",
            $seccomp,
            "--disable-dns            disables 10.0.2.3 (or configured internal ip) to host dns redirect\n",
            "--macaddress=MAC         specify the MAC address of the TAP (only valid with -c)\n",
            "--target-type=TYPE       specify the target type ([netns], default=netns)\n",
            "-h, --help               show this help and exit\n",
            "-v, --version            show version and exit\n",
            "\n",
            "Accepted but refused, because rnat cannot honour them (it exits with an error naming the flag):\n",
            "  target-type=bess       only network namespaces are served\n",
            $seccomp_refused,
            "\n",
        )
    };
}

#[cfg(target_arch = "x86_64")]
pub const HELP: &str = help_text!(
    "--enable-seccomp         refuse the system calls the engine never makes (execve, ptrace, mount,\n                         module, key, BPF and clock calls...)\n",
    ""
);
#[cfg(not(target_arch = "x86_64"))]
pub const HELP: &str = help_text!(
    "",
    "  enable-seccomp         no filter for this architecture yet\n"
);

/// The first address of interface `name` that `pick` takes, from the host's interfaces (as
/// slirp4netns resolves `--outbound-addr=INTERFACE`: once, at start).
fn interface_address<T>(name: &str, pick: impl Fn(IpAddr) -> Option<T>) -> Result<T, String> {
    let addrs = nix::ifaddrs::getifaddrs().map_err(|e| format!("listing interfaces: {e}"))?;
    let mut found = false;
    for a in addrs.filter(|a| a.interface_name == name) {
        found = true;
        let Some(sa) = a.address else { continue };
        let ip = if let Some(v4) = sa.as_sockaddr_in() {
            IpAddr::V4(v4.ip())
        } else if let Some(v6) = sa.as_sockaddr_in6() {
            IpAddr::V6(v6.ip())
        } else {
            continue;
        };
        if let Some(t) = pick(ip) {
            return Ok(t);
        }
    }
    Err(if found {
        format!("interface {name} has no such address")
    } else {
        format!("there is no interface {name}")
    })
}

/// What the command line asks for.
#[derive(Debug, Default)]
struct Args {
    configure: bool,
    exit_fd: Option<i32>,
    ready_fd: Option<i32>,
    mtu: Option<u16>,
    api_socket: Option<PathBuf>,
    cidr: Option<Ipv4Net>,
    disable_host_loopback: bool,
    netns_type: Option<String>,
    userns_path: Option<PathBuf>,
    sandbox: bool,
    seccomp: bool,
    outbound: Option<Ipv4Addr>,
    outbound6: Option<std::net::Ipv6Addr>,
    ipv6: bool,
    disable_dns: bool,
    mac: Option<[u8; 6]>,
    positional: Vec<String>,
}

fn parse_mac(s: &str) -> Result<[u8; 6], String> {
    let parts: Vec<u8> = s
        .split(':')
        .map(|p| u8::from_str_radix(p, 16))
        .collect::<Result<_, _>>()
        .map_err(|_| format!("--macaddress {s}: not a MAC address"))?;
    <[u8; 6]>::try_from(parts).map_err(|_| format!("--macaddress {s}: not a MAC address"))
}

fn parse(argv: &[String]) -> Result<Option<Args>, String> {
    let mut a = Args::default();
    let mut i = 0;
    while i < argv.len() {
        let arg = &argv[i];
        let (flag, inline) = match arg.split_once('=') {
            Some((f, v)) if f.starts_with("--") => (f, Some(v.to_string())),
            _ => (arg.as_str(), None),
        };
        let mut value = |name: &str| -> Result<String, String> {
            if let Some(v) = &inline {
                return Ok(v.clone());
            }
            i += 1;
            argv.get(i)
                .cloned()
                .ok_or_else(|| format!("{name} needs a value"))
        };
        let num = |name: &str, v: String| {
            v.parse::<i32>()
                .map_err(|_| format!("{name} {v}: not a number"))
        };
        match flag {
            "-h" | "--help" => return Ok(None),
            "-v" | "--version" => {
                println!(
                    "slirp4netns version 1.2.0 (rnat {})",
                    env!("CARGO_PKG_VERSION")
                );
                return Ok(None);
            }
            "-c" | "--configure" => a.configure = true,
            "-e" | "--exit-fd" => a.exit_fd = Some(num("--exit-fd", value("--exit-fd")?)?),
            "-r" | "--ready-fd" => a.ready_fd = Some(num("--ready-fd", value("--ready-fd")?)?),
            "-m" | "--mtu" => {
                let v = value("--mtu")?;
                let m: u32 = v.parse().map_err(|_| format!("--mtu {v}: not a number"))?;
                // slirp4netns accepts up to 65521; rnat's TAP takes up to 65520.
                a.mtu = Some(m.min(65520) as u16);
            }
            "-a" | "--api-socket" => a.api_socket = Some(value("--api-socket")?.into()),
            "--cidr" => {
                let v = value("--cidr")?;
                a.cidr = Some(
                    v.parse()
                        .map_err(|_| format!("--cidr {v}: not an IPv4 CIDR"))?,
                );
            }
            "--disable-host-loopback" => a.disable_host_loopback = true,
            "--netns-type" => a.netns_type = Some(value("--netns-type")?),
            "--userns-path" => a.userns_path = Some(value("--userns-path")?.into()),
            "--enable-sandbox" => a.sandbox = true,
            "--outbound-addr" => {
                let v = value("--outbound-addr")?;
                a.outbound = Some(match v.parse() {
                    Ok(ip) => ip,
                    Err(_) => interface_address(&v, |ip| match ip {
                        IpAddr::V4(a) => Some(a),
                        IpAddr::V6(_) => None,
                    })
                    .map_err(|e| format!("--outbound-addr {v}: not an IPv4 address, and {e}"))?,
                });
            }
            "--outbound-addr6" => {
                let v = value("--outbound-addr6")?;
                a.outbound6 = Some(match v.parse() {
                    Ok(ip) => ip,
                    Err(_) => interface_address(&v, |ip| match ip {
                        IpAddr::V6(a) if !a.is_unicast_link_local() && !a.is_loopback() => Some(a),
                        _ => None,
                    })
                    .map_err(|e| format!("--outbound-addr6 {v}: not an IPv6 address, and {e}"))?,
                });
            }
            "--disable-dns" => a.disable_dns = true,
            "--macaddress" => a.mac = Some(parse_mac(&value("--macaddress")?)?),
            "--target-type" => {
                let v = value("--target-type")?;
                if v != "netns" {
                    return Err(format!(
                        "--target-type={v}: rnat serves network namespaces only"
                    ));
                }
            }
            "-6" | "--enable-ipv6" => a.ipv6 = true,
            "--enable-seccomp" => a.seccomp = true,
            f if f.starts_with('-') && f.len() > 1 => return Err(format!("unknown option {f}")),
            _ => a.positional.push(arg.clone()),
        }
        i += 1;
    }
    Ok(Some(a))
}

/// Runs slirp4netns-compatible mode; returns the exit status.
pub fn main(argv: &[String]) -> Result<i32, session::Error> {
    let a = match parse(argv).map_err(session::Error::Invalid)? {
        Some(a) => a,
        None => {
            if argv.iter().any(|x| x == "-h" || x == "--help") {
                print!("{HELP}");
            }
            return Ok(0);
        }
    };
    let (target, tap) = match a.positional.as_slice() {
        [t] => (t.clone(), "tap0".to_string()),
        [t, tap] => (t.clone(), tap.clone()),
        _ => {
            return Err(session::Error::Invalid(format!(
                "expected PID|PATH [TAPNAME]\n{HELP}"
            )))
        }
    };
    let target = match a.netns_type.as_deref().unwrap_or("pid") {
        "pid" => Target::Pid(target.parse().map_err(|_| {
            session::Error::Invalid(format!(
                "{target}: not a PID (use --netns-type=path for a path)"
            ))
        })?),
        "path" => Target::Netns(target.into()),
        other => {
            return Err(session::Error::Invalid(format!(
                "--netns-type={other}: must be pid or path"
            )))
        }
    };
    if a.mac.is_some() && !a.configure {
        return Err(session::Error::Invalid(
            "--macaddress is only valid with --configure".into(),
        ));
    }
    let mut opts = Options {
        mtu: a.mtu.unwrap_or(1500),
        allow_host_loopback: !a.disable_host_loopback,
        tap_name: tap,
        mac: a.mac,
        dns: !a.disable_dns,
        outbound: a.outbound,
        outbound6: a.outbound6,
        ipv6: a.ipv6,
        ..Options::default()
    };
    if let Some(c) = a.cidr {
        opts.cidr = c;
    }
    // SAFETY: the caller handed these fds over on the command line; we take ownership of them
    // (as slirp4netns does) and nothing else in this process uses them.
    let take = |fd: i32| unsafe { OwnedFd::from_raw_fd(fd) };
    let extras = AttachExtras {
        api_socket: a.api_socket,
        exit_fd: a.exit_fd.filter(|fd| *fd >= 0 && fd_is_open(*fd)).map(take),
        ready_fd: a
            .ready_fd
            .filter(|fd| *fd >= 0 && fd_is_open(*fd))
            .map(take),
        sandbox: a.sandbox,
        seccomp: a.seccomp,
    };
    session::attach_with(
        &opts,
        &target,
        a.userns_path.as_deref(),
        a.configure,
        extras,
    )
}

fn fd_is_open(fd: i32) -> bool {
    nix::fcntl::fcntl(
        // SAFETY: the fd is only borrowed for one F_GETFD, which is harmless on any number (an
        // fd that is not open makes it fail with EBADF, which is the answer sought).
        unsafe { std::os::fd::BorrowedFd::borrow_raw(fd) },
        nix::fcntl::FcntlArg::F_GETFD,
    )
    .is_ok()
}

/// A port forward made through the API.
#[derive(Debug, Clone, Copy)]
pub struct HostFwd {
    pub id: u64,
    pub mapping: PortMapping,
}

/// The forwards made through the API, with slirp4netns' ids: 1, 2, 3, ..., never reused (a
/// client holding the id of a forward it removed cannot remove another by mistake).
#[derive(Debug)]
pub struct HostFwds {
    list: Vec<HostFwd>,
    next_id: u64,
}

impl Default for HostFwds {
    fn default() -> Self {
        HostFwds {
            list: Vec::new(),
            next_id: 1,
        }
    }
}

impl HostFwds {
    /// Records a forward made; its id.
    pub fn add(&mut self, mapping: PortMapping) -> u64 {
        let id = self.next_id;
        self.next_id += 1;
        self.list.push(HostFwd { id, mapping });
        id
    }

    /// Forgets forward `id`, if there is one.
    pub fn remove(&mut self, id: u64) -> Option<HostFwd> {
        let i = self.list.iter().position(|f| f.id == id)?;
        Some(self.list.remove(i))
    }

    pub fn list(&self) -> &[HostFwd] {
        &self.list
    }
}

/// What the API asks of the instance.
pub enum ApiOp {
    Add(PortMapping),
    List,
    Remove(u64),
}

/// Parses one API request; `Err` is the error JSON to send back.
pub fn parse_request(body: &[u8], guest: Ipv4Addr) -> Result<ApiOp, Value> {
    let bad = |d: &str| json!({"error": {"desc": format!("bad request: {d}")}});
    if body.len() > 4096 {
        return Err(bad("too large message"));
    }
    let v: Value = serde_json::from_slice(body).map_err(|_| bad("cannot parse JSON"))?;
    let Some(exec) = v.get("execute").and_then(Value::as_str) else {
        return Err(bad("no execute found"));
    };
    let args = v.get("arguments").cloned().unwrap_or(Value::Null);
    match exec {
        "add_hostfwd" => {
            let protocol = match args.get("proto").and_then(Value::as_str) {
                Some("tcp") => Protocol::Tcp,
                Some("udp") => Protocol::Udp,
                _ => return Err(bad("add_hostfwd: bad arguments.proto")),
            };
            let host_addr = match args.get("host_addr").and_then(Value::as_str).unwrap_or("") {
                // IPv4 only, as slirp4netns 1.2 binds it (a mapping without an address would
                // listen on IPv6 too).
                "" | "0.0.0.0" => Some(IpAddr::V4(Ipv4Addr::UNSPECIFIED)),
                s => match s.parse::<Ipv4Addr>() {
                    Ok(ip) => Some(IpAddr::V4(ip)),
                    Err(_) => return Err(bad("add_hostfwd: bad arguments.host_addr")),
                },
            };
            // A port missing, 0 or out of range is refused, as slirp4netns refuses 0 (what it
            // reads for a missing one), each under its own name.
            let port = |k: &str| {
                args.get(k)
                    .and_then(Value::as_u64)
                    .and_then(|p| u16::try_from(p).ok())
                    .filter(|&p| p != 0)
                    .ok_or_else(|| bad(&format!("add_hostfwd: bad arguments.{k}")))
            };
            let host_port = port("host_port")?;
            // The guest is the only address forwards can reach here (slirp4netns would take any
            // address of its network; its clients all pass the guest's, or none).
            match args.get("guest_addr").and_then(Value::as_str).unwrap_or("") {
                "" => {}
                s if s.parse::<Ipv4Addr>() == Ok(guest) => {}
                _ => return Err(bad("add_hostfwd: bad arguments.guest_addr")),
            }
            let container_port = port("guest_port")?;
            Ok(ApiOp::Add(PortMapping {
                host_ip: host_addr,
                host_port,
                container_port,
                protocol,
            }))
        }
        "list_hostfwd" => Ok(ApiOp::List),
        "remove_hostfwd" => match args.get("id").and_then(Value::as_u64) {
            Some(id) => Ok(ApiOp::Remove(id)),
            None => Err(bad("remove_hostfwd: bad arguments.id")),
        },
        _ => Err(bad("unknown execute")),
    }
}

/// `list_hostfwd`'s answer: `{"entries": [...]}`, without the `return` wrapper of the other
/// answers, as slirp4netns sends it (its manual shows a wrapper that it never sent).
pub fn list_reply(fwds: &[HostFwd], guest: Ipv4Addr) -> Value {
    let entries: Vec<Value> = fwds
        .iter()
        .map(|f| {
            json!({
                "id": f.id,
                "proto": match f.mapping.protocol { Protocol::Tcp => "tcp", Protocol::Udp => "udp" },
                "host_addr": f.mapping.host_ip.map_or("0.0.0.0".to_string(), |i| i.to_string()),
                "host_port": f.mapping.host_port,
                "guest_addr": guest.to_string(),
                "guest_port": f.mapping.container_port,
            })
        })
        .collect();
    json!({ "entries": entries })
}

#[cfg(test)]
mod tests {
    use super::*;

    const GUEST: Ipv4Addr = Ipv4Addr::new(10, 0, 2, 100);

    #[test]
    fn podmans_command_line_parses_and_refused_flags_say_why() {
        let argv: Vec<String> = "--disable-host-loopback --mtu=65520 --enable-sandbox -c -e 3 -r 4 --api-socket /run/x.sock --netns-type=path /run/user/1000/netns/cni-x tap0"
            .split(' ')
            .map(String::from)
            .collect();
        let a = parse(&argv).expect("parses").expect("not help");
        assert!(a.configure && a.disable_host_loopback && a.sandbox);
        assert_eq!(
            (a.exit_fd, a.ready_fd, a.mtu),
            (Some(3), Some(4), Some(65520))
        );
        assert_eq!(a.positional, vec!["/run/user/1000/netns/cni-x", "tap0"]);
        for flag in [
            "--outbound-addr=no-such-interface0",
            "--outbound-addr6=no-such-interface0",
            "--target-type=bess",
            "--bogus",
        ] {
            let err = parse(&[flag.to_string()]).expect_err(flag);
            assert!(
                err.contains(flag.split('=').next().unwrap_or(flag)) || err.contains("unknown"),
                "{flag}: {err}"
            );
        }
    }

    #[test]
    fn outbound_addresses_take_addresses_and_interfaces() {
        let parsed = |args: &[&str]| {
            let argv: Vec<String> = args.iter().map(|a| a.to_string()).collect();
            parse(&argv).expect("parses").expect("not help")
        };
        let a = parsed(&["--outbound-addr=192.0.2.7", "--outbound-addr6=2001:db8::7"]);
        assert_eq!(a.outbound, Some(Ipv4Addr::new(192, 0, 2, 7)));
        assert_eq!(a.outbound6, Some("2001:db8::7".parse().expect("address")));
        // An interface of this machine with an IPv4 address, by name (a namespace whose lo is
        // still down may have none).
        let any = nix::ifaddrs::getifaddrs()
            .expect("interfaces")
            .find_map(|a| {
                let v4 = a.address?.as_sockaddr_in()?.ip();
                Some((a.interface_name, v4))
            });
        if let Some((name, v4)) = any {
            let flag = format!("--outbound-addr={name}");
            assert_eq!(parsed(&[flag.as_str()]).outbound, Some(v4));
        }
    }

    #[test]
    fn help_lists_with_dashes_only_what_is_honoured() {
        for honoured in [
            "--configure",
            "--exit-fd",
            "--ready-fd",
            "--mtu",
            "--api-socket",
            "--cidr",
            "--disable-host-loopback",
            "--netns-type",
            "--userns-path",
            "--enable-sandbox",
            "--outbound-addr",
            "--disable-dns",
            "--macaddress",
            "--enable-ipv6",
            "--outbound-addr6",
            "--enable-seccomp",
        ] {
            assert!(HELP.contains(honoured), "{honoured}");
        }
        let refused = "--target-type=bess";
        assert!(!HELP.contains(refused), "{refused} must not look supported");
        assert!(HELP.contains(&refused[2..]), "{refused} is still listed");
    }

    #[test]
    fn api_requests_and_errors_match_slirp4netns() {
        let add = br#"{"execute":"add_hostfwd","arguments":{"proto":"tcp","host_addr":"0.0.0.0","host_port":8091,"guest_addr":"","guest_port":80}}"#;
        match parse_request(add, GUEST) {
            Ok(ApiOp::Add(m)) => assert_eq!(
                (m.host_ip, m.host_port, m.container_port, m.protocol),
                (Some(Ipv4Addr::UNSPECIFIED.into()), 8091, 80, Protocol::Tcp)
            ),
            _ => panic!("add_hostfwd"),
        }
        let desc = |body: &[u8]| match parse_request(body, GUEST) {
            Err(v) => v["error"]["desc"].as_str().unwrap_or("").to_string(),
            Ok(_) => "ok".into(),
        };
        assert_eq!(desc(b"{"), "bad request: cannot parse JSON");
        assert_eq!(
            desc(br#"{"unexpectedjson": 42}"#),
            "bad request: no execute found"
        );
        assert_eq!(
            desc(br#"{"execute": "bad"}"#),
            "bad request: unknown execute"
        );
        assert_eq!(
            desc(br#"{"execute":"add_hostfwd","arguments":{"proto":"sctp"}}"#),
            "bad request: add_hostfwd: bad arguments.proto"
        );
        assert_eq!(desc(&[b'x'; 5000]), "bad request: too large message");
        let fwds = [HostFwd {
            id: 1,
            mapping: PortMapping {
                host_ip: None,
                host_port: 8091,
                container_port: 80,
                protocol: Protocol::Udp,
            },
        }];
        assert_eq!(
            list_reply(&fwds, GUEST),
            json!({"entries":[{"id":1,"proto":"udp","host_addr":"0.0.0.0","host_port":8091,"guest_addr":"10.0.2.100","guest_port":80}]})
        );
        // Ports: 0 or missing is refused, each under its own name, host port first.
        let with = |args: &str| {
            format!(r#"{{"execute":"add_hostfwd","arguments":{{"proto":"tcp",{args}}}}}"#)
        };
        assert_eq!(
            desc(with(r#""host_port":0,"guest_port":80"#).as_bytes()),
            "bad request: add_hostfwd: bad arguments.host_port"
        );
        assert_eq!(
            desc(with(r#""host_port":8080"#).as_bytes()),
            "bad request: add_hostfwd: bad arguments.guest_port"
        );
        assert_eq!(
            desc(with(r#""host_port":70000,"guest_port":80"#).as_bytes()),
            "bad request: add_hostfwd: bad arguments.host_port"
        );
        // Ids count up and are never reused.
        let mut made = HostFwds::default();
        let m = fwds[0].mapping;
        assert_eq!((made.add(m), made.add(m)), (1, 2));
        assert!(made.remove(2).is_some() && made.remove(2).is_none());
        assert_eq!(made.add(m), 3);
        assert_eq!(made.list().iter().map(|f| f.id).collect::<Vec<_>>(), [1, 3]);
    }
}
