//! The `rnat` command.

use std::io::Write;
use std::net::Ipv4Addr;
use std::process::ExitCode;

use anyhow::Context;
use clap::{Parser, Subcommand};
use ipnet::Ipv4Net;
use rnat::rootful::{CreateOpts, Engine, NetworkChoice};
use rnat::rootless::control::Request;
use rnat::run::RunError;
use rnat::spec::{self, PortMapping};
use rnat::state::{Container, StateDirs};

/// Exit status for rnat's own errors (as Docker and Podman use).
const EXIT_ERROR: u8 = 125;

#[derive(Parser)]
#[command(
    name = "rnat",
    version,
    about = "Container networking: a network namespace with outbound NAT and published ports"
)]
#[command(after_help = "Examples:
  rnat run -p 8080:80 -- busybox httpd -f -p 80 -h /srv/www
  rnat run --name web -p 127.0.0.1:8080:80 -p 5353:53/udp -- ./server
  rnat publish --name web 9000-9010:9000-9010
  rnat unpublish --name web 9000-9010:9000-9010
  rnat network create lab --subnet 192.0.2.0/24
  rnat ps --json

State lives in /var/lib/rnat and /run/rnat (RNAT_STATE_DIR=DIR moves both under DIR).
Logs: RNAT_LOG=debug.")]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Run CMD in a new network namespace with outbound NAT and published ports
    #[command(
        after_help = "SPEC: [HOSTIP:][HOSTPORT[-END]:]CONTAINERPORT[-END][/tcp|/udp], as Docker's -p.
Examples:
  rnat run -p 8080:80 -- busybox httpd -f -p 80
  rnat run --network lab -p 192.0.2.1:53:53/udp -- dnsmasq -k"
    )]
    Run {
        /// Publish a port: [HOSTIP:][HOSTPORT[-END]:]CONTAINERPORT[-END][/tcp|/udp]
        #[arg(short = 'p', long = "publish", value_name = "SPEC")]
        publish: Vec<String>,
        /// Container name (default: rnat-<id>)
        #[arg(long)]
        name: Option<String>,
        /// Network to attach to (default: "default", bridge rnat0)
        #[arg(long)]
        network: Option<String>,
        /// Rootless mode even as root: user-space NAT on a TAP device in a new user namespace
        /// (the mode an ordinary user always gets)
        #[arg(long)]
        rootless: bool,
        #[command(flatten)]
        rootless_opts: RootlessArgs,
        /// The command and its arguments
        #[arg(required = true, trailing_var_arg = true, value_name = "CMD")]
        cmd: Vec<String>,
    },
    /// Serve a network namespace someone else created (rootless mode), as slirp4netns does
    #[command(after_help = "Examples:
  rnat attach --pid 4242 --configure
  rnat attach --netns /run/user/1000/netns/ctr --userns /proc/4242/ns/user --configure

Serves until killed, until the process given by --pid exits, or until the namespace is gone.")]
    Attach {
        /// A process in the namespace (its user namespace is joined too)
        #[arg(long, conflicts_with = "netns", required_unless_present = "netns")]
        pid: Option<i32>,
        /// The network namespace's path
        #[arg(long)]
        netns: Option<std::path::PathBuf>,
        /// The user namespace to join first
        #[arg(long)]
        userns: Option<std::path::PathBuf>,
        /// Give the TAP its address and default route, and bring up lo
        #[arg(long)]
        configure: bool,
        /// Name of the TAP device
        #[arg(long, default_value = "tap0")]
        tap: String,
        #[command(flatten)]
        rootless_opts: RootlessArgs,
    },
    /// slirp4netns 1.2's command line and API socket, served by rnat's engine (also when rnat is
    /// invoked under the name `slirp4netns`); `rnat slirp4netns --help` lists the options
    #[command(disable_help_flag = true)]
    Slirp4netns {
        #[arg(
            trailing_var_arg = true,
            allow_hyphen_values = true,
            value_name = "ARGS"
        )]
        args: Vec<String>,
    },
    /// Publish more ports on a running container
    #[command(
        after_help = "Example:\n  rnat publish --name web 8443:443 127.0.0.1:9000-9009:9000-9009"
    )]
    Publish {
        #[arg(long)]
        name: Option<String>,
        #[arg(required = true, value_name = "SPEC")]
        specs: Vec<String>,
    },
    /// Stop publishing ports of a running container
    #[command(after_help = "Example:\n  rnat unpublish --name web 8443:443")]
    Unpublish {
        #[arg(long)]
        name: Option<String>,
        #[arg(required = true, value_name = "SPEC")]
        specs: Vec<String>,
    },
    /// List running containers
    Ps {
        /// Print JSON
        #[arg(long)]
        json: bool,
    },
    /// Manage networks
    #[command(subcommand)]
    Network(NetCmd),
    /// Install rnat as the CNI plugin `rnat` (see docs/cni.md)
    #[command(after_help = "Example:\n  rnat install-cni /opt/cni/bin")]
    InstallCni {
        /// Plugin directory
        #[arg(default_value = "/opt/cni/bin")]
        dir: std::path::PathBuf,
    },
}

/// Options of rootless mode.
#[derive(clap::Args)]
struct RootlessArgs {
    /// Rootless mode: MTU of the TAP device [default: 65520]
    #[arg(long)]
    mtu: Option<u16>,
    /// Rootless mode: the container's network (guest .100, gateway .2, DNS .3) [default:
    /// 10.0.2.0/24]
    #[arg(long)]
    cidr: Option<Ipv4Net>,
    /// Rootless mode: let connections to the gateway address reach the host's 127.0.0.1
    #[arg(long)]
    allow_host_loopback: bool,
    /// Rootless mode: IPv6 too (guest fd00::100/64, gateway fd00::2, DNS fd00::3)
    #[arg(long)]
    enable_ipv6: bool,
}

impl RootlessArgs {
    /// The first rootless-only flag given a value other than its default, if any (rootful mode
    /// refuses them rather than ignore them).
    fn given(&self) -> Option<&'static str> {
        [
            (self.mtu.is_some(), "--mtu"),
            (self.cidr.is_some(), "--cidr"),
            (self.allow_host_loopback, "--allow-host-loopback"),
            (self.enable_ipv6, "--enable-ipv6"),
        ]
        .into_iter()
        .find_map(|(set, flag)| set.then_some(flag))
    }

    fn options(&self) -> rnat::rootless::session::Options {
        let d = rnat::rootless::session::Options::default();
        rnat::rootless::session::Options {
            mtu: self.mtu.unwrap_or(d.mtu),
            cidr: self.cidr.unwrap_or(d.cidr),
            allow_host_loopback: self.allow_host_loopback,
            ipv6: self.enable_ipv6,
            ..Default::default()
        }
    }
}

#[derive(Subcommand)]
enum NetCmd {
    /// Define a network (its bridge is created when a container first uses it)
    #[command(after_help = "Example:\n  rnat network create lab --subnet 192.0.2.0/24")]
    Create {
        name: String,
        /// The network's IPv4 subnet; give it again for more (a container gets an address from
        /// the first with room)
        #[arg(long, required = true)]
        subnet: Vec<Ipv4Net>,
        /// Gateway (the bridge's address; default: the subnet's first address)
        #[arg(long)]
        gateway: Option<Ipv4Addr>,
        /// Bridge name (default: rn-NAME)
        #[arg(long)]
        bridge: Option<String>,
    },
    /// Remove a network and its bridge
    Rm { name: String },
    /// List networks
    Ls {
        #[arg(long)]
        json: bool,
    },
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("RNAT_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_writer(std::io::stderr)
        .with_target(false)
        .init();
    // A runtime calling rnat as a CNI plugin sets CNI_COMMAND (and may call it by any name).
    if std::env::var_os("CNI_COMMAND").is_some() {
        return ExitCode::from(rnat::cni::main());
    }
    // Invoked as slirp4netns (a runtime's network_cmd_path, or a symlink): its command line only.
    let argv: Vec<String> = std::env::args().collect();
    let invoked_as = argv
        .first()
        .and_then(|a| std::path::Path::new(a).file_name())
        .and_then(|n| n.to_str())
        .unwrap_or("");
    if invoked_as == "slirp4netns" {
        return slirp4netns(&argv[1..]);
    }
    let cli = Cli::parse();
    match dispatch(cli) {
        Ok(code) => ExitCode::from(code),
        Err(e) if is_broken_pipe(&e) => ExitCode::from(141),
        Err(e) => {
            eprintln!("Error: {}", one_line(&e));
            ExitCode::from(status_of(&e))
        }
    }
}

fn slirp4netns(args: &[String]) -> ExitCode {
    match rnat::rootless::slirp::main(args) {
        Ok(code) => ExitCode::from(u8::try_from(code).unwrap_or(1)),
        Err(e) => {
            eprintln!("Error: {}", one_line(&anyhow::Error::new(e)));
            ExitCode::from(1)
        }
    }
}

/// The error and its causes on one line, leaving out a cause whose text is already shown (typed
/// errors often include their source in their own message).
fn one_line(e: &anyhow::Error) -> String {
    let mut msg = String::new();
    for cause in e.chain() {
        let text = cause.to_string().replace('\n', " ");
        if !msg.contains(&text) {
            if !msg.is_empty() {
                msg.push_str(": ");
            }
            msg.push_str(&text);
        }
    }
    msg
}

/// Output cut short by a reader that went away (`rnat ps | head`) is not an error worth a message.
fn is_broken_pipe(e: &anyhow::Error) -> bool {
    e.chain().any(|c| {
        c.downcast_ref::<std::io::Error>()
            .is_some_and(|io| io.kind() == std::io::ErrorKind::BrokenPipe)
    })
}

fn status_of(e: &anyhow::Error) -> u8 {
    if let Some(rnat::rootless::session::Error::Spawn { status, .. }) = e.downcast_ref() {
        return *status as u8;
    }
    match e.downcast_ref::<RunError>() {
        Some(RunError::Spawn(s)) => s.status as u8,
        _ => EXIT_ERROR,
    }
}

fn parse_specs(specs: &[String]) -> anyhow::Result<Vec<PortMapping>> {
    Ok(spec::expand_all(specs)?)
}

fn dispatch(cli: Cli) -> anyhow::Result<u8> {
    let dirs = StateDirs::from_env();
    match cli.cmd {
        Cmd::Run {
            publish,
            name,
            network,
            rootless,
            rootless_opts,
            cmd,
        } => {
            let ports = parse_specs(&publish)?;
            if rootless || !nix::unistd::geteuid().is_root() {
                if network.is_some() {
                    anyhow::bail!("--network applies to rootful mode only");
                }
                if let Some(n) = &name {
                    rnat::rootful::validate_name(n)?;
                }
                let mut opts = rootless_opts.options();
                opts.ports = ports;
                opts.name = name;
                let status = rnat::rootless::session::run(&opts, &cmd)?;
                return Ok(u8::try_from(status).unwrap_or(EXIT_ERROR));
            }
            if let Some(flag) = rootless_opts.given() {
                anyhow::bail!("{flag} applies to rootless mode only (add --rootless)");
            }
            let mut engine = Engine::open(dirs)?;
            let opts = CreateOpts {
                name,
                network: NetworkChoice::Named(network),
                ports,
                resolv: true,
                ip: None,
                mac: None,
            };
            let status = rnat::run::run(&mut engine, &opts, &cmd)?;
            Ok(u8::try_from(status).unwrap_or(EXIT_ERROR))
        }
        Cmd::Attach {
            pid,
            netns,
            userns,
            configure,
            tap,
            rootless_opts,
        } => {
            let mut opts = rootless_opts.options();
            opts.tap_name = tap;
            let target = match (pid, netns) {
                (Some(pid), _) => rnat::rootless::session::Target::Pid(pid),
                (None, Some(path)) => rnat::rootless::session::Target::Netns(path),
                (None, None) => anyhow::bail!("give --pid or --netns"),
            };
            let status =
                rnat::rootless::session::attach(&opts, &target, userns.as_deref(), configure)?;
            Ok(u8::try_from(status).unwrap_or(EXIT_ERROR))
        }
        Cmd::Slirp4netns { args } => {
            let code = rnat::rootless::slirp::main(&args)?;
            Ok(u8::try_from(code).unwrap_or(1))
        }
        Cmd::Publish { name, specs } if !nix::unistd::geteuid().is_root() => {
            rootless_ports(name.as_deref(), specs, true)
        }
        Cmd::Unpublish { name, specs } if !nix::unistd::geteuid().is_root() => {
            rootless_ports(name.as_deref(), specs, false)
        }
        Cmd::Ps { json } if !nix::unistd::geteuid().is_root() => {
            let mut list = Vec::new();
            for (_, path) in rnat::rootless::control::instances() {
                if let Ok(Ok(v)) = rnat::rootless::control::call(&path, &Request::Ps) {
                    list.push(v);
                }
            }
            print_rootless_ps(&list, json)?;
            Ok(0)
        }
        Cmd::Publish { name, specs } => {
            let ports = parse_specs(&specs)?;
            let mut engine = Engine::open(dirs)?;
            let rec = engine.publish(name.as_deref(), &ports).context("publish")?;
            println!("{}: published {} port(s)", rec.name, ports.len());
            Ok(0)
        }
        Cmd::Unpublish { name, specs } => {
            let ports = parse_specs(&specs)?;
            let mut engine = Engine::open(dirs)?;
            let rec = engine
                .unpublish(name.as_deref(), &ports)
                .context("unpublish")?;
            println!("{}: unpublished {} port(s)", rec.name, ports.len());
            Ok(0)
        }
        Cmd::Ps { json } => {
            let mut engine = Engine::open(dirs)?;
            let lock = engine.dirs().lock()?;
            let live = engine.live_records(&lock)?;
            drop(lock);
            print_ps(&live, json)?;
            Ok(0)
        }
        Cmd::Network(n) => network(dirs, n),
        Cmd::InstallCni { dir } => {
            let dest = rnat::cni::install(&dir)
                .with_context(|| format!("installing into {}", dir.display()))?;
            println!("installed {}", dest.display());
            Ok(0)
        }
    }
}

fn network(dirs: StateDirs, cmd: NetCmd) -> anyhow::Result<u8> {
    match cmd {
        NetCmd::Create {
            name,
            subnet,
            gateway,
            bridge,
        } => {
            let mut engine = Engine::open(dirs)?;
            let net = engine.network_create(&name, &subnet, gateway, bridge.as_deref())?;
            println!(
                "{} {} gateway {} bridge {}",
                net.name, net.subnet, net.gateway, net.bridge
            );
        }
        NetCmd::Rm { name } => {
            let mut engine = Engine::open(dirs)?;
            engine.network_rm(&name)?;
        }
        NetCmd::Ls { json } => {
            let engine = Engine::open(dirs)?;
            let nets = engine.networks()?;
            let mut out = std::io::stdout().lock();
            if json {
                serde_json::to_writer_pretty(&mut out, &nets)?;
                writeln!(out)?;
            } else {
                writeln!(
                    out,
                    "{:<16} {:<18} {:<15} BRIDGE",
                    "NAME", "SUBNET", "GATEWAY"
                )?;
                for n in nets {
                    writeln!(
                        out,
                        "{:<16} {:<18} {:<15} {}",
                        n.name,
                        n.pools()
                            .iter()
                            .map(|p| p.subnet.to_string())
                            .collect::<Vec<_>>()
                            .join(","),
                        n.gateway.to_string(),
                        n.bridge
                    )?;
                }
            }
        }
    }
    Ok(0)
}

/// `rnat publish` / `rnat unpublish` for a rootless instance, through its control socket.
fn rootless_ports(name: Option<&str>, specs: Vec<String>, publish: bool) -> anyhow::Result<u8> {
    parse_specs(&specs)?;
    let n = specs.len();
    let (req, done) = if publish {
        (Request::Publish { specs }, "published")
    } else {
        (Request::Unpublish { specs }, "unpublished")
    };
    let v = rootless_call(name, req)?;
    println!("{}: {done} {n} spec(s)", v["name"].as_str().unwrap_or("?"));
    Ok(0)
}

/// Sends a request to the rootless instance NAME (or the only one running) and returns its answer.
fn rootless_call(name: Option<&str>, req: Request) -> anyhow::Result<serde_json::Value> {
    use rnat::rootless::control;
    let path = match name {
        Some(n) => {
            rnat::rootful::validate_name(n)?;
            control::dir().join(format!("{n}.sock"))
        }
        None => {
            let all = control::instances();
            match all.as_slice() {
                [(_, p)] => p.clone(),
                [] => anyhow::bail!("no rootless instance is running"),
                _ => anyhow::bail!(
                    "{} rootless instances are running: say which with --name ({})",
                    all.len(),
                    all.iter()
                        .map(|(n, _)| n.as_str())
                        .collect::<Vec<_>>()
                        .join(", ")
                ),
            }
        }
    };
    let answer = control::call(&path, &req).map_err(|e| match e.kind() {
        std::io::ErrorKind::NotFound | std::io::ErrorKind::ConnectionRefused => {
            anyhow::anyhow!(
                "no rootless instance named {:?} is running",
                name.unwrap_or("?")
            )
        }
        _ => anyhow::Error::new(e).context(format!("talking to {}", path.display())),
    })?;
    answer.map_err(|e| anyhow::anyhow!(e))
}

fn print_rootless_ps(list: &[serde_json::Value], json: bool) -> anyhow::Result<()> {
    let mut out = std::io::stdout().lock();
    if json {
        serde_json::to_writer_pretty(&mut out, list)?;
        writeln!(out)?;
        return Ok(());
    }
    writeln!(
        out,
        "{:<14} {:<16} {:<12} {:<15} {:<8} PORTS",
        "ID", "NAME", "NETWORK", "IP", "PID"
    )?;
    for c in list {
        let ports: Vec<String> = c["ports"]
            .as_array()
            .map(|a| {
                a.iter()
                    .map(|p| {
                        let host = match p["host_ip"].as_str().unwrap_or("") {
                            "" => String::new(),
                            ip if ip.contains(':') => format!("[{ip}]:"),
                            ip => format!("{ip}:"),
                        };
                        format!(
                            "{host}{}->{}/{}",
                            p["host_port"],
                            p["container_port"],
                            p["protocol"].as_str().unwrap_or("")
                        )
                    })
                    .collect()
            })
            .unwrap_or_default();
        let s = |k: &str| c[k].as_str().unwrap_or("-").to_string();
        let pid = c["pid"].as_i64().map_or("-".to_string(), |p| p.to_string());
        writeln!(
            out,
            "{:<14} {:<16} {:<12} {:<15} {:<8} {}",
            s("id"),
            s("name"),
            s("network"),
            s("ip"),
            pid,
            ports.join(", ")
        )?;
    }
    Ok(())
}

fn print_ps(containers: &[Container], json: bool) -> anyhow::Result<()> {
    let mut out = std::io::stdout().lock();
    if json {
        let list: Vec<serde_json::Value> = containers
            .iter()
            .map(|c| {
                serde_json::json!({
                    "id": c.id, "name": c.name, "network": c.network, "ip": c.ip,
                    "pid": c.main_pid(),
                    "netns": c.main_pid().map(|p| format!("/proc/{p}/ns/net")),
                    "ports": c.ports.iter().map(|p| serde_json::json!({
                        "host_ip": p.host_ip.map_or("0.0.0.0".to_string(), |i| i.to_string()),
                        "host_port": p.host_port, "container_port": p.container_port, "protocol": p.protocol,
                    })).collect::<Vec<_>>(),
                })
            })
            .collect();
        serde_json::to_writer_pretty(&mut out, &list)?;
        writeln!(out)?;
    } else {
        writeln!(
            out,
            "{:<14} {:<16} {:<12} {:<15} {:<8} PORTS",
            "ID", "NAME", "NETWORK", "IP", "PID"
        )?;
        for c in containers {
            let ports: Vec<String> = c.ports.iter().map(|p| p.to_string()).collect();
            let pid = c.main_pid().map_or("-".to_string(), |p| p.to_string());
            writeln!(
                out,
                "{:<14} {:<16} {:<12} {:<15} {:<8} {}",
                c.id,
                c.name,
                c.network,
                c.ip.to_string(),
                pid,
                ports.join(", ")
            )?;
        }
    }
    Ok(())
}
