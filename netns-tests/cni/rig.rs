//! The rig of the CNI tests: a `harness::Topology` (H, U, C, same wiring,
//! addresses, registry and Drop guard) under this suite's own prefix, plus
//! container namespaces, all named `rnc<pid>-<n>…`.
//!
//! ```text
//!   U h0 198.51.100.2 ── up0 198.51.100.1  H  cl0 203.0.113.1 ── h0 203.0.113.2 C
//!                                          │ (rnat's bridge, made by ADD)
//!                          container namespaces rnc<pid>-<n>k<k>: eth0 from ADD
//! ```
//!
//! Everything generic (commands confined to the rig's namespaces, tracked
//! servers, waits, link and address listings, teardown also on panic) is
//! the topology's, reached through `Deref`; the traffic assertions are the
//! `fixtures` ones and the nft/IPAM read-backs the `rnat` ones. What is
//! CNI-specific lives here and in the parent module.

use std::collections::BTreeSet;
use std::ops::Deref;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};

use crate::harness::Topology;

/// Every namespace and scratch directory of this suite starts with this.
pub const PREFIX: &str = "rnc";

pub struct Rig {
    topo: Topology,
    /// Counter of container namespaces.
    next_ns: AtomicUsize,
}

impl Deref for Rig {
    type Target = Topology;

    fn deref(&self) -> &Topology {
        &self.topo
    }
}

impl Rig {
    /// Builds H, U and C, or returns `None` (after printing why) when not
    /// root, unless `RNAT_NETNS_REQUIRE_ROOT` is set.
    pub fn new(label: &str) -> Option<Rig> {
        Some(Rig {
            topo: Topology::with_prefix(PREFIX, label)?,
            next_ns: AtomicUsize::new(0),
        })
    }

    /// A fresh container namespace `<base>k<k>` (loopback up), torn down
    /// with the rig unless `del_ns` deletes it first. Returns its name.
    pub fn netns_add(&self) -> String {
        let k = self.next_ns.fetch_add(1, Ordering::SeqCst);
        self.add_ns(&format!("k{k}"))
    }

    /// Names of the entries under `stateDir/run/containers`.
    pub fn container_dirs(&self) -> BTreeSet<String> {
        files_in(&self.state_dir.join("run").join("containers"))
            .iter()
            .map(|p| file_name(p))
            .collect()
    }
}

/// Entries of DIR (not recursive, at most 1000), sorted.
fn files_in(dir: &Path) -> Vec<PathBuf> {
    let mut out: Vec<PathBuf> = std::fs::read_dir(dir)
        .map(|rd| rd.flatten().take(1000).map(|e| e.path()).collect())
        .unwrap_or_default();
    out.sort();
    out
}

fn file_name(p: &Path) -> String {
    p.file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default()
}
