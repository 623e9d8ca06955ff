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

use super::core::{Config, Core};
use super::driver::{self, KernelHost, Wake};
use super::ns::{self, Enter, TapAddress, TapPlan};
use super::sys::{self, IfName};

const SIGNAL_TOKEN: u64 = (1 << 40) + 1;
const EXIT_TOKEN: u64 = (1 << 40) + 2;

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
}

impl Default for Options {
    fn default() -> Self {
        Options {
            mtu: 65520,
            cidr: "10.0.2.0/24".parse().expect("constant CIDR"),
            allow_host_loopback: false,
            offload: std::env::var_os("RNAT_NO_OFFLOAD").is_none(),
            tap_name: "tap0".into(),
        }
    }
}

/// What can go wrong in a rootless session.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{0}")]
    Invalid(String),
    #[error("cannot use /dev/net/tun: {0} (rootless mode needs it readable and writable by everyone, mode 0666, as most distributions ship it)")]
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

/// The IPv4 nameservers in a resolv.conf.
pub fn resolvers(text: &str) -> Vec<Ipv4Addr> {
    text.lines()
        .filter_map(|l| {
            let mut w = l.split_whitespace();
            (w.next() == Some("nameserver")).then(|| w.next()?.parse().ok())?
        })
        .collect()
}

/// The resolv.conf the container sees: rnat's DNS address, and the host's search domains and
/// options.
fn container_resolv(host: &str, dns: Ipv4Addr) -> String {
    let mut out = format!("nameserver {dns}\n");
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
    cfg.resolvers = resolvers(&std::fs::read_to_string("/etc/resolv.conf").unwrap_or_default());
    let nofile = sys::raise_nofile();
    cfg.max_flows = cfg
        .max_flows
        .min(nofile.saturating_sub(64).max(16) as usize);
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
        mtu: opts.mtu,
        mac: None,
    }
}

fn check_tun() -> Result<(), Error> {
    nix::unistd::access(
        "/dev/net/tun",
        nix::unistd::AccessFlags::R_OK | nix::unistd::AccessFlags::W_OK,
    )
    .map_err(|e| Error::Tun(e.into()))
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
    check_tun()?;
    IfName::new(&opts.tap_name).map_err(Error::Invalid)?;
    let host_resolv = std::fs::read_to_string("/etc/resolv.conf").unwrap_or_default();
    let resolv_file = write_resolv(&container_resolv(&host_resolv, cfg.dns))?;
    let plan = TapPlan::new_namespaces(
        Some(resolv_file.path()),
        &opts.tap_name,
        opts.offload,
        Some(tap_address(&cfg, opts)),
    )
    .map_err(io_err("preparing the namespaces"))?;
    let (ours, theirs) = ns::fd_channel().map_err(io_err("creating a socket pair"))?;
    let signals = SignalPipe::new().map_err(io_err("installing signal handlers"))?;

    let (prog, args) = argv
        .split_first()
        .ok_or_else(|| Error::Invalid("no command given".into()))?;
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
    let tap = ns::recv_tap(ours.as_raw_fd());
    match (spawned, tap) {
        (Ok(child), Ok(tap)) => serve_child(cfg, opts, tap, child, signals),
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

fn serve_child(
    cfg: Config,
    opts: &Options,
    tap: OwnedFd,
    mut child: std::process::Child,
    signals: SignalPipe,
) -> Result<i32, Error> {
    let pid = child.id() as libc::pid_t;
    let pidfd = sys::pidfd_open(pid).map_err(io_err("watching the container's process"))?;
    let mut host =
        KernelHost::new(tap, opts.offload).map_err(io_err("setting up the event loop"))?;
    host.watch(signals.read.as_fd(), SIGNAL_TOKEN)
        .map_err(io_err("setting up the event loop"))?;
    host.watch(pidfd.as_fd(), EXIT_TOKEN)
        .map_err(io_err("setting up the event loop"))?;
    let mut core = Core::new(cfg);
    let served = driver::serve(&mut core, &mut host, |_, wake| match wake {
        Wake::Token(SIGNAL_TOKEN) => {
            for sig in signals.drain() {
                let _ = nix::sys::signal::kill(
                    nix::unistd::Pid::from_raw(pid),
                    nix::sys::signal::Signal::try_from(sig).ok(),
                );
            }
            true
        }
        Wake::Token(EXIT_TOKEN) | Wake::TapGone => false,
        Wake::Token(_) => true,
    });
    tracing::debug!(stats = ?core.stats(), "rootless engine stopped");
    let status = child.wait().map_err(io_err("waiting for the command"))?;
    served.map_err(io_err("serving the container's network"))?;
    Ok(status
        .code()
        .unwrap_or_else(|| 128 + status.signal().unwrap_or(0)))
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
    let cfg = build_config(opts)?;
    check_tun()?;
    let tap_name = IfName::new(&opts.tap_name).map_err(Error::Invalid)?;
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
        vnet_hdr: opts.offload,
        address: configure.then(|| tap_address(&cfg, opts)),
        txqueuelen: ns::TXQUEUELEN,
        txqlen_msg: sys::txqlen_request(&opts.tap_name, ns::TXQUEUELEN),
    };
    let tap = ns::tap_in_existing(&plan)?;
    drop(plan);
    let signals = SignalPipe::new().map_err(io_err("installing signal handlers"))?;
    let mut host =
        KernelHost::new(tap, opts.offload).map_err(io_err("setting up the event loop"))?;
    host.watch(signals.read.as_fd(), SIGNAL_TOKEN)
        .map_err(io_err("setting up the event loop"))?;
    if let Some(p) = &pidfd {
        host.watch(p.as_fd(), EXIT_TOKEN)
            .map_err(io_err("setting up the event loop"))?;
    }
    let mut core = Core::new(cfg);
    driver::serve(&mut core, &mut host, |_, wake| {
        !matches!(
            wake,
            Wake::Token(SIGNAL_TOKEN) | Wake::Token(EXIT_TOKEN) | Wake::TapGone
        )
    })
    .map_err(io_err("serving the namespace's network"))?;
    tracing::debug!(stats = ?core.stats(), "rootless engine stopped");
    Ok(0)
}
