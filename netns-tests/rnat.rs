//! Driving the rnat CLI inside a topology's H namespace, and reading back
//! what it did (`rnat ps --json`, the `ip rnat` nftables maps, `rv*` links,
//! the IPAM/container files under `RNAT_STATE_DIR`), with the assertions
//! built on those read-backs. The parsers themselves are in `readback`.

use std::collections::BTreeSet;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use serde_json::Value;

use crate::harness::{ss_flag, Topology};
use crate::procs::{self, BgProc, Finished, FG_TIMEOUT};
use crate::readback::{
    collect_allocations, json_contains_string, parse_pub_maps, Container, MapElem, PubMaps,
};

/// The binary under test.
pub const RNAT: &str = env!("CARGO_BIN_EXE_rnat");

/// Exit code rnat uses for its own errors.
pub const RNAT_ERROR: i32 = 125;

/// What rnat left in the kernel and on disk; compared before/after a
/// command that must fail without side effects.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Residue {
    pub rv_links: BTreeSet<String>,
    pub pub_any: BTreeSet<MapElem>,
    pub pub_addr: BTreeSet<MapElem>,
    /// (id, ip) of every container `rnat ps --json` reports.
    pub containers: BTreeSet<(String, String)>,
    /// (ip, owner) allocations of every IPAM file.
    pub ipam: BTreeSet<(String, String)>,
    /// Entry names under run/containers.
    pub records: BTreeSet<String>,
}

fn files_under(dir: &Path) -> Vec<std::path::PathBuf> {
    let mut found = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    // Bounded walk: the state dir is tiny; never follow more than 1000 entries.
    while let Some(d) = stack.pop() {
        let Ok(rd) = std::fs::read_dir(&d) else {
            continue;
        };
        for e in rd.flatten() {
            if found.len() > 1000 {
                return found;
            }
            let p = e.path();
            if e.file_type().is_ok_and(|t| t.is_dir()) {
                stack.push(p);
            } else {
                found.push(p);
            }
        }
    }
    found.sort();
    found
}

impl Topology {
    /// `ip netns exec NS rnat ARGS...` with this topology's state dir.
    /// Panics unless NS is a namespace this harness created.
    pub fn rnat_command_in(&self, ns: &str, prefix: &[&str], args: &[&str]) -> Command {
        if let Err(msg) = self.check_rnat_target(ns) {
            panic!("{msg}");
        }
        let mut argv: Vec<&str> = prefix.to_vec();
        argv.push(RNAT);
        argv.extend_from_slice(args);
        // ns_command re-checks the global registry of created namespaces.
        let mut cmd = self.ns_command(ns, &argv);
        cmd.env("RNAT_STATE_DIR", &self.state_dir);
        cmd
    }

    /// Ok if rnat may run in NS: one of this topology's namespaces, still
    /// present in the registry of namespaces the harness created.
    pub fn check_rnat_target(&self, ns: &str) -> Result<(), String> {
        if ![&self.h, &self.u, &self.c].iter().any(|n| n.as_str() == ns) {
            return Err(format!(
                "refusing to run rnat in {ns:?}: only the harness-created namespaces of `{}` are allowed",
                self.label
            ));
        }
        self.check_ours(ns)
            .map_err(|e| format!("refusing to run rnat: {e}"))
    }

    /// rnat in H, built but not started.
    pub fn rnat_command(&self, args: &[&str]) -> Command {
        self.rnat_command_in(&self.h, &[], args)
    }

    /// Runs rnat in H to completion (bounded), whatever its status.
    pub fn rnat(&self, args: &[&str]) -> Finished {
        procs::run_bounded(self.rnat_command(args), None, FG_TIMEOUT)
    }

    /// Runs rnat in H and asserts success; returns stdout.
    pub fn rnat_ok(&self, args: &[&str]) -> String {
        let out = self.rnat(args);
        assert!(
            out.success(),
            "[{}] rnat failed\n{}",
            self.label,
            out.describe()
        );
        out.stdout_str()
    }

    /// Starts a long-running rnat (typically `run`) in H.
    pub fn rnat_bg(&self, args: &[&str]) -> BgProc {
        self.spawn_command(self.rnat_command(args))
    }

    /// `rnat network create NAME --subnet CIDR [EXTRA...]`.
    pub fn network_create(&self, name: &str, subnet: &str, extra: &[&str]) {
        let mut args = vec!["network", "create", name, "--subnet", subnet];
        args.extend_from_slice(extra);
        self.rnat_ok(&args);
    }

    /// `rnat ps --json`, parsed. Also records each container's netns for
    /// the teardown guard.
    pub fn ps(&self) -> Vec<Container> {
        let out = self.rnat(&["ps", "--json"]);
        assert!(
            out.success(),
            "[{}] `rnat ps --json` failed\n{}",
            self.label,
            out.describe()
        );
        let v: Value = serde_json::from_slice(&out.stdout)
            .unwrap_or_else(|e| panic!("`rnat ps --json` is not JSON ({e})\n{}", out.describe()));
        let arr = v
            .as_array()
            .unwrap_or_else(|| panic!("`rnat ps --json` is not an array: {v}"));
        let containers: Vec<Container> = arr.iter().map(Container::from_json).collect();
        for c in &containers {
            if let (Some(pid), Some(netns)) = (c.pid, c.netns.as_deref()) {
                self.note_container_netns(pid, Path::new(netns));
            }
        }
        containers
    }

    /// Waits (bounded) until `rnat ps` lists a started container (pid and
    /// netns known) named NAME; fails early, with rnat's output, if BG
    /// exits first.
    pub fn wait_container(&self, bg: &mut BgProc, name: &str) -> Container {
        let found = procs::poll(|| {
            if bg.exited().is_some() {
                panic!(
                    "[{}] `rnat run` for {name} exited before the container showed up\n{}",
                    self.label,
                    bg.describe_now()
                );
            }
            self.ps()
                .into_iter()
                .find(|c| c.name.as_deref() == Some(name) && c.is_started())
        });
        found.unwrap_or_else(|| {
            panic!(
                "[{}] container {name} never appeared in `rnat ps --json`\n{}",
                self.label,
                bg.describe_now()
            )
        })
    }

    /// Waits (bounded) until CMD listens on PORT inside the container.
    pub fn wait_container_listening(&self, c: &Container, proto: &str, port: u16) {
        let flag = ss_flag(proto);
        let filter = format!("sport = :{port}");
        let ok = procs::poll(|| {
            let out = self.exec_in_container_netns(c.netns(), &["ss", "-Hn", flag, &filter]);
            (out.success() && !out.stdout.is_empty()).then_some(())
        });
        assert!(
            ok.is_some(),
            "[{}] container {} never listened on {proto}/{port}",
            self.label,
            c.label()
        );
    }

    /// The pub_any / pub_addr maps as seen by the kernel in H.
    pub fn pub_maps(&self) -> PubMaps {
        parse_pub_maps(&self.nft_ruleset_json())
    }

    /// Links in H whose name starts with `rv` (rnat's host veth ends).
    pub fn rv_links(&self) -> BTreeSet<String> {
        self.links(&self.h)
            .into_iter()
            .filter(|l| l.starts_with("rv"))
            .collect()
    }

    /// Parsed IPAM files under `$RNAT_STATE_DIR/lib/ipam/` as (file name,
    /// JSON). Unparsable files are returned as a JSON string of their text.
    fn ipam_files(&self) -> Vec<(String, Value)> {
        let dir = self.state_dir.join("lib").join("ipam");
        files_under(&dir)
            .into_iter()
            .filter_map(|file| {
                let name = file.file_name()?.to_string_lossy().into_owned();
                if name.ends_with(".lock") || name.starts_with('.') {
                    return None;
                }
                let text = std::fs::read_to_string(&file).ok()?;
                let v = serde_json::from_str(&text)
                    .unwrap_or(Value::String(format!("<unparsable> {text}")));
                Some((name, v))
            })
            .collect()
    }

    /// (ip, owner) allocations found in the IPAM files (best-effort layout:
    /// a JSON map of ip -> container id somewhere in each file).
    pub fn ipam_allocations(&self) -> BTreeSet<(String, String)> {
        let mut out = BTreeSet::new();
        for (name, v) in self.ipam_files() {
            if let Value::String(raw) = &v {
                out.insert((format!("{name}: unparsable"), raw.clone()));
            }
            collect_allocations(&v, &mut out);
        }
        out
    }

    /// True if the IPAM files allocate IP, or mention container id ID anywhere.
    pub fn ipam_holds(&self, ip: &str, id: &str) -> bool {
        self.ipam_allocations()
            .iter()
            .any(|(a, owner)| a == ip || owner == id)
            || self
                .ipam_files()
                .iter()
                .any(|(_, v)| json_contains_string(v, id))
    }

    /// (name, contents) of every file under `$RNAT_STATE_DIR/run/containers`.
    pub fn container_records(&self) -> Vec<(String, String)> {
        let dir = self.state_dir.join("run").join("containers");
        files_under(&dir)
            .into_iter()
            .map(|p| {
                let rel = p
                    .strip_prefix(&dir)
                    .unwrap_or(&p)
                    .to_string_lossy()
                    .into_owned();
                let text = std::fs::read_to_string(&p).unwrap_or_default();
                (rel, text)
            })
            .collect()
    }

    /// Snapshot of everything a container leaves behind. Calls `rnat ps`
    /// first, since that is allowed to reap dead containers.
    pub fn residue(&self) -> Residue {
        let containers = self.ps().into_iter().map(|c| (c.id, c.ip)).collect();
        let maps = self.pub_maps();
        Residue {
            rv_links: self.rv_links(),
            pub_any: maps.any_elems(),
            pub_addr: maps.addr_elems(),
            containers,
            ipam: self.ipam_allocations(),
            records: self
                .container_records()
                .into_iter()
                .map(|(n, _)| n)
                .collect(),
        }
    }

    /// Asserts that a running container is visible everywhere we look:
    /// `rnat ps`, an `rv*` link in H, and (best-effort) IPAM.
    pub fn assert_container_present(&self, c: &Container) {
        assert!(
            self.ps().iter().any(|x| x.id == c.id),
            "[{}] container {} missing from `rnat ps --json`",
            self.label,
            c.label()
        );
        assert!(
            !self.rv_links().is_empty(),
            "[{}] no rv* link in H while {} runs",
            self.label,
            c.label()
        );
        if !self.ipam_holds(&c.ip, &c.id) {
            eprintln!(
                "[{}] note: IPAM files under {} do not mention {} / {}; \
                 allocation checks rely on re-allocation instead",
                self.label,
                self.state_dir.join("lib/ipam").display(),
                c.id,
                c.ip
            );
        }
    }

    /// Asserts that nothing of the given (finished) containers is left and
    /// that no container at all remains: no `rv*` link, empty maps, empty
    /// `rnat ps`, no IPAM entry or record mentioning them.
    pub fn assert_all_gone(&self, gone: &[&Container]) {
        let ps = self.ps();
        assert!(
            ps.is_empty(),
            "[{}] `rnat ps --json` is not empty after teardown: {ps:#?}",
            self.label
        );
        let rv = self.rv_links();
        assert!(
            rv.is_empty(),
            "[{}] rv* links left in H after teardown: {rv:?}",
            self.label
        );
        let maps = self.pub_maps();
        assert!(
            maps.any_elems().is_empty() && maps.addr_elems().is_empty(),
            "[{}] map elements left after teardown: {maps:#?}",
            self.label
        );
        for c in gone {
            assert!(
                !self.ipam_holds(&c.ip, &c.id),
                "[{}] IPAM still mentions {} / {}: {:#?}",
                self.label,
                c.id,
                c.ip,
                self.ipam_allocations()
            );
            for (name, text) in self.container_records() {
                assert!(
                    !name.contains(&c.id) && !text.contains(&c.id),
                    "[{}] container record {name} still mentions {}",
                    self.label,
                    c.id
                );
            }
        }
    }
}

/// Asserts the rnat error convention: exit code CODE and exactly one
/// non-empty stderr line starting with `Error: `.
pub fn assert_rnat_error(out: &Finished, code: i32, what: &str) {
    assert_eq!(
        out.code(),
        Some(code),
        "{what}: expected exit code {code}\n{}",
        out.describe()
    );
    let stderr = out.stderr_str();
    let lines: Vec<&str> = stderr.trim_end_matches('\n').lines().collect();
    assert!(
        lines.len() == 1 && lines[0].starts_with("Error: ") && lines[0].len() > "Error: ".len(),
        "{what}: expected exactly one `Error: ...` line on stderr\n{}",
        out.describe()
    );
}

/// Waits (bounded) for a background rnat to exit, with a clear panic.
pub fn wait_rnat_exit(bg: &mut BgProc, timeout: Duration, what: &str) -> Finished {
    let out = bg.wait_exit(timeout);
    assert!(
        !out.timed_out(),
        "{what}: `rnat run` did not exit within {timeout:?}\n{}",
        out.describe()
    );
    out
}
