//! Rootless sessions: `rnat run` without privileges (new namespaces for a command) and
//! `rnat attach` (namespaces someone else made). Both end up in `driver::serve`.

use std::io;
use std::net::Ipv4Addr;
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::path::{Path, PathBuf};
use std::process::Command;

use ipnet::Ipv4Net;
use signal_hook::consts::{SIGHUP, SIGINT, SIGTERM};

use std::cell::Cell;
use std::os::unix::net::UnixListener;
use std::rc::Rc;
use std::time::Instant;

use super::control;
use super::core::{Config, Core};
use super::driver::{self, KernelHost, Wake};
use super::ns::{self, Enter, TapAddress, TapPlan};
use super::publish::Ports;
use super::slirp;
use super::sys::{self, IfName};
use crate::spec::PortMapping;

const SIGNAL_TOKEN: u64 = (1 << 40) + 1;
const EXIT_TOKEN: u64 = (1 << 40) + 2;
const CONTROL_TOKEN: u64 = (1 << 40) + 3;
const API_TOKEN: u64 = (1 << 40) + 4;

impl From<ns::TapError> for Error {
    fn from(e: ns::TapError) -> Error {
        match e {
            ns::TapError::Step(step, source) => Error::Namespaces { step, source },
            ns::TapError::Other(e) => Error::Helper(e),
        }
    }
}

/// What a rootless session is told on the command line.
#[derive(Debug, Clone)]
pub struct Options {
    pub mtu: u16,
    pub cidr: Ipv4Net,
    pub allow_host_loopback: bool,
    /// Use the TAP's virtio header for checksum and segmentation offload.
    pub offload: bool,
    pub tap_name: String,
    /// Ports to publish from the start.
    pub ports: Vec<PortMapping>,
    /// The instance's name (its control socket's); default `rnat-PID`.
    pub name: Option<String>,
    /// The TAP's MAC address (when configured).
    pub mac: Option<[u8; 6]>,
    /// Forward DNS at the DNS address to the host's resolvers.
    pub dns: bool,
    /// Bind outbound sockets to these addresses (IPv4, IPv6).
    pub outbound: Option<Ipv4Addr>,
    pub outbound6: Option<std::net::Ipv6Addr>,
    /// IPv6 too (slirp4netns' `--enable-ipv6` layout: fd00::/64).
    pub ipv6: bool,
}

/// What `rnat attach` does besides serving (slirp4netns' conventions).
#[derive(Debug, Default)]
pub struct AttachExtras {
    /// A slirp4netns-style JSON API socket (add_hostfwd, list_hostfwd, remove_hostfwd).
    pub api_socket: Option<PathBuf>,
    /// Exit when this fd becomes readable or reaches EOF.
    pub exit_fd: Option<OwnedFd>,
    /// Write "1" here once the network is up, then close it.
    pub ready_fd: Option<OwnedFd>,
    /// After set-up, leave every file behind: a new mount namespace whose root is an empty tmpfs.
    pub sandbox: bool,
    /// Then a seccomp filter refusing the system calls the engine never makes.
    pub seccomp: bool,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            mtu: 65520,
            cidr: "10.0.2.0/24".parse().expect("constant CIDR"),
            allow_host_loopback: false,
            offload: std::env::var_os("RNAT_NO_OFFLOAD").is_none(),
            tap_name: "tap0".into(),
            ports: Vec::new(),
            name: None,
            mac: None,
            dns: true,
            outbound: None,
            outbound6: None,
            ipv6: false,
        }
    }
}

/// What can go wrong in a rootless session.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{0}")]
    Invalid(String),
    #[error("cannot use /dev/net/tun: {0} (RNAT_LINK=tap needs it readable and writable by everyone, mode 0666, as most distributions ship it)")]
    Tun(io::Error),
    #[error("{}: {source}{hint}", step.describe(), hint = hint(*.step, .source))]
    Namespaces { step: ns::Step, source: io::Error },
    #[error("setting up the container's namespaces: {0}")]
    Helper(io::Error),
    #[error("{what}: {source}")]
    Io {
        what: String,
        #[source]
        source: io::Error,
    },
    #[error("cannot run {cmd:?}: {source}")]
    Spawn {
        cmd: String,
        status: i32,
        #[source]
        source: io::Error,
    },
}

fn hint(step: ns::Step, e: &io::Error) -> &'static str {
    match (step, e.raw_os_error()) {
        (ns::Step::CreateNamespaces, Some(libc::EPERM | libc::ENOSPC | libc::EACCES)) => {
            " (are unprivileged user namespaces allowed? see sysctl user.max_user_namespaces and kernel.apparmor_restrict_unprivileged_userns)"
        }
        (ns::Step::JoinNetns | ns::Step::CreateTap, Some(libc::EPERM)) => {
            " (no privilege over that namespace: give --userns, or run rnat inside the namespace's owning user namespace)"
        }
        _ => "",
    }
}

fn io_err(what: impl Into<String>) -> impl FnOnce(io::Error) -> Error {
    let what = what.into();
    move |source| Error::Io { what, source }
}

/// The nameservers in a resolv.conf (IPv4 and IPv6; a scoped link-local one is skipped).
pub fn resolvers(text: &str) -> Vec<std::net::IpAddr> {
    text.lines()
        .filter_map(|l| {
            let mut w = l.split_whitespace();
            (w.next() == Some("nameserver")).then(|| w.next()?.parse().ok())?
        })
        .collect()
}

/// The resolv.conf the container sees: rnat's DNS address, and the host's search domains and
/// options.
fn container_resolv(host: &str, dns: Ipv4Addr, dns6: Option<std::net::Ipv6Addr>) -> String {
    let mut out = format!("nameserver {dns}\n");
    if let Some(dns6) = dns6 {
        out.push_str(&format!("nameserver {dns6}\n"));
    }
    for l in host.lines() {
        let t = l.trim_start();
        if t.starts_with("search ") || t.starts_with("domain ") || t.starts_with("options ") {
            out.push_str(t);
            out.push('\n');
        }
    }
    out
}

fn build_config(opts: &Options) -> Result<Config, Error> {
    if opts.mtu < 576 || opts.mtu > 65520 {
        return Err(Error::Invalid(format!(
            "--mtu {}: must be between 576 and 65520",
            opts.mtu
        )));
    }
    let mut cfg = Config::for_cidr(opts.cidr).map_err(Error::Invalid)?;
    cfg.mtu = opts.mtu;
    cfg.allow_host_loopback = opts.allow_host_loopback;
    cfg.offload = opts.offload;
    if opts.ipv6 {
        if opts.mtu < 1280 {
            return Err(Error::Invalid(format!(
                "--enable-ipv6 needs an MTU of at least 1280 (IPv6's minimum), not {}",
                opts.mtu
            )));
        }
        if std::path::Path::new("/proc/net/if_inet6").exists() {
            cfg.ipv6 = Some(crate::rootless::core::Ipv6Config::slirp());
        } else {
            tracing::warn!("IPv6 is disabled on this host: the container gets IPv4 only");
        }
    }
    if opts.dns {
        cfg.resolvers = resolvers(&std::fs::read_to_string("/etc/resolv.conf").unwrap_or_default());
    }
    // File descriptors: a flow takes one, a spliced connection six (two sockets, two pipes).
    // Four fifths of the budget go to flows, the rest to splices (see Instance::new).
    let nofile = sys::raise_nofile();
    let budget = nofile.saturating_sub(64).max(20) as usize;
    cfg.max_flows = cfg.max_flows.min(budget * 4 / 5);
    cfg.seed ^= u64::from(std::process::id()) << 20
        ^ std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos() as u64);
    Ok(cfg)
}

fn tap_address(cfg: &Config, opts: &Options) -> TapAddress {
    TapAddress {
        addr: cfg.guest,
        prefix: cfg.cidr.prefix_len(),
        gateway: cfg.gateway,
        dns: cfg.dns,
        mtu: opts.mtu,
        mac: opts.mac,
        ipv6: cfg.ipv6.map(|v6| crate::rootless::ns::TapAddress6 {
            addr: v6.guest,
            gateway: v6.gateway,
            // Built here: the child that writes it runs after a fork.
            accept_dad: std::ffi::CString::new(format!(
                "/proc/sys/net/ipv6/conf/{}/accept_dad",
                opts.tap_name
            ))
            .unwrap_or_default(),
            autoconf: std::ffi::CString::new(format!(
                "/proc/sys/net/ipv6/conf/{}/autoconf",
                opts.tap_name
            ))
            .unwrap_or_default(),
        }),
    }
}

fn check_tun() -> Result<(), Error> {
    // Opened, not just checked for permission: a device cgroup or a missing module refuses an
    // open that the file's mode allows.
    std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/net/tun")
        .map(drop)
        .map_err(Error::Tun)
}

/// The link to the container: `RNAT_LINK=tap` or `ring` chooses; by default a TAP when
/// /dev/net/tun can be opened, else the packet ring link, which needs no device file.
fn choose_link(opts: &Options) -> Result<ns::LinkPlan, Error> {
    let ring = || ns::LinkPlan::ring(&opts.tap_name, opts.mtu);
    match std::env::var("RNAT_LINK").as_deref() {
        Ok("ring") => Ok(ring()),
        Ok("tap") => check_tun().map(|()| ns::LinkPlan::Tap),
        Ok(other) => Err(Error::Invalid(format!(
            "RNAT_LINK={other:?}: the link is \"tap\" or \"ring\""
        ))),
        Err(_) => match check_tun() {
            Ok(()) => Ok(ns::LinkPlan::Tap),
            Err(e) => {
                tracing::info!("{e}; using the packet ring link instead");
                Ok(ring())
            }
        },
    }
}

/// A self-pipe that turns SIGINT, SIGTERM and SIGHUP into readable bytes.
struct SignalPipe {
    read: std::os::unix::net::UnixStream,
    ids: Vec<signal_hook::SigId>,
}

impl SignalPipe {
    fn new() -> io::Result<SignalPipe> {
        let (read, write) = std::os::unix::net::UnixStream::pair()?;
        read.set_nonblocking(true)?;
        write.set_nonblocking(true)?;
        let mut ids = Vec::new();
        for sig in [SIGINT, SIGTERM, SIGHUP] {
            ids.push(signal_hook::low_level::pipe::register(
                sig,
                write.try_clone()?,
            )?);
        }
        Ok(SignalPipe { read, ids })
    }

    /// The signals received since the last call.
    fn drain(&self) -> Vec<i32> {
        // signal-hook's pipe writes one byte per signal but not which; report SIGTERM.
        let mut buf = [0u8; 64];
        let mut n = 0;
        while let Ok(k) = nix::unistd::read(self.read.as_fd(), &mut buf) {
            if k == 0 {
                break;
            }
            n += k;
        }
        vec![SIGTERM; n.min(1)]
    }
}

impl Drop for SignalPipe {
    fn drop(&mut self) {
        for id in self.ids.drain(..) {
            signal_hook::low_level::unregister(id);
        }
    }
}

/// Runs `argv` in new user, network and mount namespaces with the NAT engine serving its TAP,
/// and returns the status to exit with.
pub fn run(opts: &Options, argv: &[String]) -> Result<i32, Error> {
    let cfg = build_config(opts)?;
    IfName::new(&opts.tap_name).map_err(Error::Invalid)?;
    let link = choose_link(opts)?;
    let (prog, args) = argv
        .split_first()
        .ok_or_else(|| Error::Invalid("no command given".into()))?;
    // Ports and the control socket come first: if one cannot be had, nothing has started.
    let child_pid = Rc::new(Cell::new(0));
    let target_pid = child_pid.clone();
    let mut inst = Instance::new(
        cfg,
        opts,
        Box::new(move || {
            let pid = target_pid.get();
            let open =
                |ns: &str| std::fs::File::open(format!("/proc/{pid}/ns/{ns}")).map(OwnedFd::from);
            Ok((Some(open("user")?), open("net")?))
        }),
    )?;
    let host_resolv = std::fs::read_to_string("/etc/resolv.conf").unwrap_or_default();
    let c = inst.core.config();
    let resolv_file = write_resolv(&container_resolv(
        &host_resolv,
        c.dns,
        c.ipv6.map(|v6| v6.dns),
    ))?;
    let tap_addr = tap_address(inst.core.config(), opts);
    let ring = link.is_ring();
    let plan = TapPlan::new_namespaces(
        Some(resolv_file.path()),
        &opts.tap_name,
        link,
        opts.offload,
        Some(tap_addr),
    )
    .map_err(io_err("preparing the namespaces"))?;
    let (ours, theirs) = ns::fd_channel().map_err(io_err("creating a socket pair"))?;

    let mut cmd = Command::new(prog);
    cmd.args(args);
    let theirs_fd = theirs.as_raw_fd();
    let parent = std::process::id() as libc::pid_t;
    // SAFETY: the closure runs in the forked child before exec. `enter_and_make_tap` is
    // async-signal-safe (raw syscalls on data prepared before the fork, no allocation), and so
    // are prctl, getppid and send.
    unsafe {
        cmd.pre_exec(move || {
            if let Err((step, e)) = ns::enter_and_make_tap(&plan, theirs_fd) {
                let msg = ns::encode_failure(step, &e);
                libc::send(theirs_fd, msg.as_ptr().cast(), msg.len(), 0);
                return Err(e);
            }
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                return Err(io::Error::last_os_error());
            }
            if libc::getppid() != parent {
                return Err(io::Error::from_raw_os_error(libc::ESRCH));
            }
            Ok(())
        });
    }
    let spawned = cmd.spawn();
    drop(theirs);
    drop(resolv_file);
    let tap = ns::recv_link(ours.as_raw_fd(), ring);
    match (spawned, tap) {
        (Ok(mut child), Ok(tap)) => {
            child_pid.set(child.id() as i32);
            // The container's network namespace, while the command holds it: what is left in it
            // when the command ends (daemons it started) is ended too, as in rootful mode.
            let netns_ino = std::fs::metadata(format!("/proc/{}/ns/net", child.id()))
                .ok()
                .map(|m| std::os::unix::fs::MetadataExt::ino(&m));
            // Held until the engine has stopped: a namespace whose last process has exited is
            // torn down, and with it the frames still queued on its `tap0`, which the engine
            // hands on after the command's end. (A TAP's fd holds its namespace already; the
            // ring link's sockets live in rnat's private namespace and do not.)
            let netns_held = std::fs::File::open(format!("/proc/{}/ns/net", child.id())).ok();
            let served = inst.serve_child(tap, &mut child);
            drop(netns_held);
            if served.is_err() {
                let _ = child.kill();
            }
            let status = child.wait().map_err(io_err("waiting for the command"))?;
            drop(inst); // the keeper, if any, goes first
            if let Some(ino) = netns_ino {
                let own = std::fs::metadata("/proc/self/ns/net")
                    .ok()
                    .map(|m| std::os::unix::fs::MetadataExt::ino(&m));
                if own != Some(ino) {
                    let n = crate::process::kill_netns_processes(ino);
                    if n > 0 {
                        tracing::debug!("ended {n} process(es) left in the container");
                    }
                }
            }
            served?;
            Ok(status
                .code()
                .unwrap_or_else(|| 128 + status.signal().unwrap_or(0)))
        }
        (Ok(mut child), Err(e)) => {
            let _ = child.kill();
            let _ = child.wait();
            Err(e.into())
        }
        // The child reported the step that failed, before exec.
        (Err(_), Err(e @ ns::TapError::Step(..))) => Err(e.into()),
        (Err(e), _) => {
            let status = match e.kind() {
                io::ErrorKind::NotFound => crate::run::EXIT_NOT_FOUND,
                _ => crate::run::EXIT_NOT_EXECUTABLE,
            };
            Err(Error::Spawn {
                cmd: prog.clone(),
                status,
                source: e,
            })
        }
    }
}

/// A running rootless engine: the core, its host sockets, the published ports and the control
/// socket.
struct Instance {
    core: Core,
    host: KernelHost,
    ports: Ports,
    name: String,
    control: Option<(UnixListener, PathBuf)>,
    signals: SignalPipe,
    started: std::time::SystemTime,
    child: i32,
    /// The slirp4netns API socket, and the forwards made through it.
    api: Option<(UnixListener, PathBuf)>,
    hostfwds: slirp::HostFwds,
}

impl Drop for Instance {
    fn drop(&mut self) {
        for (_, path) in [&self.control, &self.api].into_iter().flatten() {
            let _ = std::fs::remove_file(path);
        }
    }
}

impl Instance {
    fn new(
        cfg: Config,
        opts: &Options,
        keeper_target: Box<dyn Fn() -> io::Result<(Option<OwnedFd>, OwnedFd)>>,
    ) -> Result<Instance, Error> {
        let setup = io_err("setting up the event loop");
        let mut host = KernelHost::new(opts.offload).map_err(setup)?;
        host.outbound = opts.outbound;
        host.outbound6 = opts.outbound6;
        let signals = SignalPipe::new().map_err(io_err("installing signal handlers"))?;
        host.watch(signals.read.as_fd(), SIGNAL_TOKEN)
            .map_err(io_err("setting up the event loop"))?;
        // Splices use 6 fds each (two sockets, two pipes), from the fifth of the fd budget that
        // flows leave (build_config).
        let max_splices = cfg.max_flows / 4 / 6;
        let mut core = Core::new(cfg);
        let mut ports = Ports::new(max_splices, keeper_target);
        let now = Instant::now();
        for m in &opts.ports {
            ports
                .publish(&mut core, &mut host, m, now)
                .map_err(|e| Error::Invalid(e.to_string()))?;
        }
        let name = match &opts.name {
            Some(n) => n.clone(),
            None => format!("rnat-{}", std::process::id()),
        };
        let control = match control::listen(&name) {
            Ok((l, path)) => {
                host.watch(l.as_fd(), CONTROL_TOKEN)
                    .map_err(io_err("setting up the event loop"))?;
                Some((l, path))
            }
            Err(e) if e.kind() == io::ErrorKind::AddrInUse => {
                return Err(Error::Invalid(e.to_string()))
            }
            Err(e) => {
                tracing::warn!(
                    "no control socket ({e}): rnat publish and ps will not see this instance"
                );
                None
            }
        };
        Ok(Instance {
            core,
            host,
            ports,
            name,
            control,
            signals,
            started: std::time::SystemTime::now(),
            child: 0,
            api: None,
            hostfwds: slirp::HostFwds::default(),
        })
    }

    /// Serves until `child` exits; signals are passed on to it.
    fn serve_child(&mut self, tap: ns::Link, child: &mut std::process::Child) -> Result<(), Error> {
        let pid = child.id() as libc::pid_t;
        self.child = pid;
        let pidfd = sys::pidfd_open(pid).map_err(io_err("watching the container's process"))?;
        self.host
            .attach_link(tap)
            .map_err(io_err("setting up the event loop"))?;
        self.host
            .watch(pidfd.as_fd(), EXIT_TOKEN)
            .map_err(io_err("setting up the event loop"))?;
        let stop_on_signal = false;
        self.serve(stop_on_signal)
    }

    /// Runs the loop until the watched process exits or the TAP goes away (or, with
    /// `stop_on_signal`, a signal arrives; otherwise signals go to the child).
    fn serve(&mut self, stop_on_signal: bool) -> Result<(), Error> {
        let Instance {
            core,
            host,
            ports,
            name,
            control,
            signals,
            started,
            child,
            api,
            hostfwds,
        } = self;
        let result = driver::serve(core, host, |core, host, wake, now| match wake {
            Wake::Token(SIGNAL_TOKEN) => {
                let sigs = signals.drain();
                if stop_on_signal {
                    return sigs.is_empty();
                }
                for sig in sigs {
                    let _ = nix::sys::signal::kill(
                        nix::unistd::Pid::from_raw(*child),
                        nix::sys::signal::Signal::try_from(sig).ok(),
                    );
                }
                true
            }
            Wake::Token(EXIT_TOKEN) | Wake::TapGone => false,
            Wake::Token(CONTROL_TOKEN) => {
                if let Some((l, _)) = control {
                    for _ in 0..control::ACCEPTS_PER_WAKE {
                        let Ok((conn, _)) = l.accept() else { break };
                        let result = match control::read_request(&conn) {
                            Ok(req) => handle(core, host, ports, name, *started, *child, req, now),
                            Err(e) => Err(format!("bad request: {e}")),
                        };
                        control::reply(&conn, result);
                    }
                }
                true
            }
            Wake::Token(API_TOKEN) => {
                if let Some((l, _)) = api {
                    for _ in 0..control::ACCEPTS_PER_WAKE {
                        let Ok((conn, _)) = l.accept() else { break };
                        let reply = match read_api_request(&conn) {
                            Ok(body) => handle_api(core, host, ports, hostfwds, &body, now),
                            Err(_) => {
                                serde_json::json!({"error": {"desc": "bad request: cannot read request"}})
                            }
                        };
                        let _ = std::io::Write::write_all(&mut &conn, reply.to_string().as_bytes());
                    }
                }
                true
            }
            Wake::Token(t) => {
                ports.on_event(core, host, t, now);
                true
            }
            Wake::Urgent(t) => {
                ports.on_urgent(t);
                ports.on_event(core, host, t, now);
                true
            }
        });
        tracing::debug!(
            stats = ?self.core.stats(),
            ports = ?self.ports.stats(),
            link = ?self.host.link_stats(),
            udp_dropped = self.host.udp_dropped,
            "rootless engine stopped"
        );
        result.map_err(io_err("serving the container's network"))
    }
}

/// Reads one API request: up to EOF (the client shuts down its side) or 4 KiB and a bit.
fn read_api_request(conn: &std::os::unix::net::UnixStream) -> io::Result<Vec<u8>> {
    // A whole JSON object may come without EOF (a client that waits for the reply).
    control::read_bounded(conn, 4097, |b| {
        serde_json::from_slice::<serde_json::Value>(b).is_ok()
    })
}

/// Answers one slirp4netns API request.
fn handle_api(
    core: &mut Core,
    host: &mut KernelHost,
    ports: &mut Ports,
    fwds: &mut slirp::HostFwds,
    body: &[u8],
    now: Instant,
) -> serde_json::Value {
    let guest = core.config().guest;
    tracing::debug!(request = %String::from_utf8_lossy(body), "API request");
    match slirp::parse_request(body, guest) {
        Err(e) => e,
        Ok(slirp::ApiOp::List) => slirp::list_reply(fwds.list(), guest),
        Ok(slirp::ApiOp::Add(m)) => match ports.publish(core, host, &m, now) {
            Ok(()) => {
                let id = fwds.add(m);
                serde_json::json!({"return": {"id": id}})
            }
            Err(e) => {
                tracing::info!("add_hostfwd: {e}");
                serde_json::json!({"error": {"desc": "bad request: add_hostfwd: slirp_add_hostfwd failed"}})
            }
        },
        Ok(slirp::ApiOp::Remove(id)) => match fwds.remove(id) {
            Some(f) => {
                let _ = ports.unpublish(core, host, &f.mapping);
                serde_json::json!({"return": {}})
            }
            None => {
                serde_json::json!({"error": {"desc": "bad request: remove_hostfwd: bad arguments.id"}})
            }
        },
    }
}

/// Answers one control request.
#[allow(clippy::too_many_arguments)]
fn handle(
    core: &mut Core,
    host: &mut KernelHost,
    ports: &mut Ports,
    name: &str,
    started: std::time::SystemTime,
    child: i32,
    req: control::Request,
    now: Instant,
) -> Result<serde_json::Value, String> {
    match req {
        control::Request::Ps => Ok(describe(core, host, ports, name, started, child)),
        control::Request::Publish { specs } => {
            let maps = crate::spec::expand_all(&specs).map_err(|e| e.to_string())?;
            let mut done = Vec::new();
            for m in &maps {
                if let Err(e) = ports.publish(core, host, m, now) {
                    // All or nothing: take back what this request published.
                    for d in &done {
                        let _ = ports.unpublish(core, host, d);
                    }
                    return Err(e.to_string());
                }
                done.push(*m);
            }
            Ok(describe(core, host, ports, name, started, child))
        }
        control::Request::Unpublish { specs } => {
            let maps = crate::spec::expand_all(&specs).map_err(|e| e.to_string())?;
            let listed = ports.list();
            if let Some(m) = maps.iter().find(|m| !listed.contains(m)) {
                return Err(format!("{m}: not published"));
            }
            for m in &maps {
                ports.unpublish(core, host, m).map_err(|e| e.to_string())?;
            }
            Ok(describe(core, host, ports, name, started, child))
        }
    }
}

/// What `rnat ps` shows of a rootless instance.
fn describe(
    core: &Core,
    host: &KernelHost,
    ports: &Ports,
    name: &str,
    started: std::time::SystemTime,
    child: i32,
) -> serde_json::Value {
    let cfg = core.config();
    let (tx_dropped, ring_drops, rx_lost) = host.link_stats();
    serde_json::json!({
        "id": format!("rl-{}", std::process::id()),
        "name": name,
        "mode": "rootless",
        "network": "rootless",
        "ip": cfg.guest.to_string(),
        "pid": (child > 0).then_some(child),
        "netns": (child > 0).then(|| format!("/proc/{child}/ns/net")),
        "rnat_pid": std::process::id(),
        "started": started.duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0),
        "ports": ports.list().iter().map(|p| serde_json::json!({
            // Empty: every address of both families.
            "host_ip": p.host_ip.map_or(String::new(), |i| i.to_string()),
            "host_port": p.host_port, "container_port": p.container_port, "protocol": p.protocol,
        })).collect::<Vec<_>>(),
        "stats": core.stats(),
        "port_stats": ports.stats(),
        "link_stats": {
            "tx_dropped": tx_dropped, "ring_drops": ring_drops, "rx_lost": rx_lost,
            "udp_dropped": host.udp_dropped,
        },
    })
}

/// A resolv.conf for the container, in a file that is removed when dropped (the bind mount keeps
/// its content alive).
struct TempFile(PathBuf);

impl TempFile {
    fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for TempFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

fn write_resolv(content: &str) -> Result<TempFile, Error> {
    use std::io::Write;
    // $XDG_RUNTIME_DIR when it is ours to write in, else the temporary directory.
    let dirs = std::env::var_os("XDG_RUNTIME_DIR")
        .map(PathBuf::from)
        .into_iter()
        .chain([std::env::temp_dir()]);
    let mut last = None;
    for dir in dirs {
        for attempt in 0..16u32 {
            let path = dir.join(format!("rnat-resolv-{}-{attempt}.conf", std::process::id()));
            match std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .open(&path)
            {
                Ok(mut f) => {
                    f.write_all(content.as_bytes())
                        .map_err(io_err(format!("writing {}", path.display())))?;
                    return Ok(TempFile(path));
                }
                Err(e) if e.kind() == io::ErrorKind::AlreadyExists => continue,
                Err(e) => {
                    last = Some((path, e));
                    break;
                }
            }
        }
    }
    match last {
        Some((path, e)) => Err(io_err(format!("creating {}", path.display()))(e)),
        None => Err(Error::Invalid(
            "cannot create a temporary resolv.conf".into(),
        )),
    }
}

/// Where `rnat attach` finds the namespaces.
pub enum Target {
    Pid(i32),
    Netns(PathBuf),
}

/// `rnat attach`: a TAP in existing namespaces, served until the target process exits, the
/// namespace goes away, or a signal arrives.
pub fn attach(
    opts: &Options,
    target: &Target,
    userns: Option<&Path>,
    configure: bool,
) -> Result<i32, Error> {
    attach_with(opts, target, userns, configure, AttachExtras::default())
}

/// `attach` with slirp4netns' extras: an API socket, ready and exit fds, a sandbox.
pub fn attach_with(
    opts: &Options,
    target: &Target,
    userns: Option<&Path>,
    configure: bool,
    extras: AttachExtras,
) -> Result<i32, Error> {
    let cfg = build_config(opts)?;
    let tap_name = IfName::new(&opts.tap_name).map_err(Error::Invalid)?;
    let link = choose_link(opts)?;
    let open = |p: &Path| -> Result<OwnedFd, Error> {
        std::fs::File::open(p)
            .map(OwnedFd::from)
            .map_err(io_err(format!("opening {}", p.display())))
    };
    let (netns, userns, pidfd) = match target {
        Target::Pid(pid) => {
            let pidfd = sys::pidfd_open(*pid).map_err(io_err(format!("process {pid}")))?;
            let netns = open(&PathBuf::from(format!("/proc/{pid}/ns/net")))?;
            let userns = match userns {
                Some(p) => Some(open(p)?),
                None => {
                    let theirs = PathBuf::from(format!("/proc/{pid}/ns/user"));
                    let same = std::fs::metadata(&theirs)
                        .ok()
                        .map(|m| std::os::unix::fs::MetadataExt::ino(&m))
                        == std::fs::metadata("/proc/self/ns/user")
                            .ok()
                            .map(|m| std::os::unix::fs::MetadataExt::ino(&m));
                    if same {
                        None
                    } else {
                        Some(open(&theirs)?)
                    }
                }
            };
            (netns, userns, Some(pidfd))
        }
        Target::Netns(path) => (open(path)?, userns.map(open).transpose()?, None),
    };
    let plan = TapPlan {
        enter: Enter::Join { userns, netns },
        tap: tap_name,
        link,
        vnet_hdr: opts.offload,
        address: configure.then(|| tap_address(&cfg, opts)),
        txqueuelen: ns::TXQUEUELEN,
        txqlen_msg: sys::txqlen_request(&opts.tap_name, ns::TXQUEUELEN),
    };
    let tap = ns::link_in_existing(&plan)?;
    let Enter::Join { userns, netns } = plan.enter else {
        unreachable!("attach joins namespaces")
    };
    // The keeper (made on the first loopback client of a published port) joins the same ones.
    let keeper_ns = (userns, netns);
    let keeper_target: Box<dyn Fn() -> io::Result<(Option<OwnedFd>, OwnedFd)>> =
        Box::new(move || {
            Ok((
                keeper_ns.0.as_ref().map(OwnedFd::try_clone).transpose()?,
                keeper_ns.1.try_clone()?,
            ))
        });
    let mut inst = Instance::new(cfg, opts, keeper_target)?;
    inst.host
        .attach_link(tap)
        .map_err(io_err("setting up the event loop"))?;
    if let Some(p) = &pidfd {
        inst.host
            .watch(p.as_fd(), EXIT_TOKEN)
            .map_err(io_err("setting up the event loop"))?;
    }
    if let Some(path) = &extras.api_socket {
        let l = bind_api_socket(path)?;
        inst.host
            .watch(l.as_fd(), API_TOKEN)
            .map_err(io_err("setting up the event loop"))?;
        inst.api = Some((l, path.clone()));
    }
    // The exit fd wakes the loop on data or EOF alike: either means stop.
    if let Some(fd) = &extras.exit_fd {
        inst.host
            .watch(fd.as_fd(), EXIT_TOKEN)
            .map_err(io_err("watching the exit fd"))?;
    }
    if extras.sandbox {
        sys::enter_sandbox().map_err(io_err("entering the sandbox (--enable-sandbox)"))?;
    }
    if extras.seccomp {
        sys::install_seccomp()
            .map_err(io_err("installing the seccomp filter (--enable-seccomp)"))?;
    }
    if let Some(fd) = extras.ready_fd {
        let mut f = std::fs::File::from(fd);
        let _ = std::io::Write::write_all(&mut f, b"1");
    }
    inst.serve(true)?;
    drop(extras.exit_fd);
    Ok(0)
}

/// Binds the slirp4netns API socket at `path` (mode 0600), replacing a dead one.
fn bind_api_socket(path: &Path) -> Result<UnixListener, Error> {
    use std::os::unix::fs::PermissionsExt;
    if path.exists() && std::os::unix::net::UnixStream::connect(path).is_err() {
        let _ = std::fs::remove_file(path);
    }
    let l = UnixListener::bind(path)
        .map_err(io_err(format!("binding the API socket {}", path.display())))?;
    let _ = std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600));
    l.set_nonblocking(true)
        .map_err(io_err("binding the API socket"))?;
    Ok(l)
}
