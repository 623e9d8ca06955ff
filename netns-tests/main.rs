//! Kernel-level integration tests for rnat.
//!
//! Every test builds its own throw-away topology of network namespaces
//! (`rnt<pid>-<n>{h,u,c}`), runs rnat inside the host namespace H with its
//! own `RNAT_STATE_DIR`, pushes real traffic through it, and tears
//! everything down in a Drop guard, also on panic. Addresses come only from
//! 192.0.2.0/24, 198.51.100.0/24 and 203.0.113.0/24; nothing touches the
//! root namespace's links, routes, sysctls or firewall.
//!
//! Run (as root): `CARGO_TARGET_DIR=/tmp/rnt-target cargo test --test netns`
//! Harness only:  `... cargo test --test netns smoke -- --nocapture`
//!
//! As another user every test prints SKIP and passes; set
//! `RNAT_NETNS_REQUIRE_ROOT=1` to make that a failure instead (for CI).
//! Needs: iproute2 (`ip`, `ss`), nftables, socat, busybox (`nslookup`),
//! util-linux (`nsenter`, `setpriv`), procps (`kill`, `sysctl`).
//!
//! Modules:
//! - `procs`    — bounded command execution, background processes, PID-exact kills
//! - `harness`  — the `Topology` (namespaces, links, guard, namespace registry)
//! - `readback` — parsers for `rnat ps --json`, `nft -j` maps and IPAM files
//! - `rnat`     — driving the rnat CLI and reading back ps/nft/links/state
//! - `fixtures` — socat servers/clients and byte-exact traffic assertions
//! - `dns`      — a minimal DNS responder run as a helper process
//! - `smoke`    — tests of the harness itself (no rnat needed)
//! - `rootful`  — the rnat tests (`traffic`, `resolv`, `lifecycle`, `errors`)
//! - `rootless` — rootless `rnat run` and `rnat attach` as an unprivileged user
//! - `podman_rootless` — rootless Podman with rnat as its slirp4netns

mod cni;
mod dns;
mod fixtures;
mod harness;
mod podman;
mod podman_rootless;
mod procs;
mod readback;
mod rnat;
mod rootful;
mod rootless;
mod smoke;
