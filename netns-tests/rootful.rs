//! rnat's rootful mode proven with real traffic: each test builds its own
//! topology (H, U, C), drives the rnat CLI in H, and asserts on bytes that
//! crossed the kernel and on kernel state read back (links, nft maps).
//!
//! This module holds what the test modules share; the tests live in
//! `traffic`, `resolv`, `lifecycle` and `errors`.

mod errors;
mod lifecycle;
mod resolv;
mod traffic;

use std::collections::BTreeSet;
use std::time::Duration;

use crate::dns::{nslookup_addresses, start_dns_server};
use crate::fixtures::*;
use crate::harness::{Topology, H_CLIENT_SIDE_IP, H_UPLINK_IP, U_IP};
use crate::procs::{proc_stat, BgProc, Tracked};
use crate::readback::*;
use crate::rnat::*;
use crate::topology;

const NET: &str = "t";
const SUBNET: &str = "192.0.2.0/24";
const GATEWAY: &str = "192.0.2.1";
/// A subnet with room for exactly one container (.1 is the gateway).
const ONE_SLOT: &str = "192.0.2.0/30";
/// How long `rnat run` may take to tear down after its CMD ends.
const EXIT_TIMEOUT: Duration = Duration::from_secs(20);

/// `rnat run --name NAME --network NET [-p SPEC]... -- CMD...` in the background.
fn run_bg(t: &Topology, name: &str, net: &str, specs: &[&str], cmd: &[String]) -> BgProc {
    let mut args = vec!["run", "--name", name, "--network", net];
    for s in specs {
        args.extend(["-p", s]);
    }
    args.push("--");
    args.extend(cmd.iter().map(String::as_str));
    t.rnat_bg(&args)
}

/// Starts a named TCP echo container publishing SPECS and waits until its
/// server listens on container port 80.
fn start_web(t: &Topology, name: &str, specs: &[&str]) -> (BgProc, Container) {
    let mut bg = run_bg(t, name, NET, specs, &tcp_echo_server(80));
    let c = t.wait_container(&mut bg, name);
    t.wait_container_listening(&c, "tcp", 80);
    (bg, c)
}

fn strs(v: &[&str]) -> Vec<String> {
    v.iter().map(|s| s.to_string()).collect()
}

fn port(host_ip: &str, host_port: u16, container_port: u16, protocol: &str) -> PortMapping {
    PortMapping {
        host_ip: host_ip.into(),
        host_port,
        container_port,
        protocol: protocol.into(),
    }
}

fn sorted(mut v: Vec<PortMapping>) -> Vec<PortMapping> {
    v.sort();
    v
}
