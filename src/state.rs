//! Persistent and runtime state: networks, address allocations and container records, as JSON
//! files written atomically (temp file, fsync, rename) under one exclusive lock.
//!
//! Layout (`RNAT_STATE_DIR=D` puts both under D):
//! - `/var/lib/rnat/networks/NAME.json`  network definitions (persist across reboots)
//! - `/var/lib/rnat/ipam/NAME.json`      allocations of that network: address -> container id
//! - `/var/lib/rnat/lock`                the lock every state change is made under
//! - `/run/rnat/containers/ID.json`      running containers (gone at reboot, as the containers are)
//! - `/run/rnat/containers/ID/`          per-container files (resolv.conf)

use std::collections::BTreeMap;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::net::Ipv4Addr;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use ipnet::Ipv4Net;
use nix::fcntl::{Flock, FlockArg};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

use crate::spec::PortMapping;

#[derive(Debug, thiserror::Error)]
pub enum StateError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("{path}: corrupt state file: {source}")]
    Corrupt {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },
}

fn io_err(path: &Path) -> impl FnOnce(io::Error) -> StateError + '_ {
    move |source| StateError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// Where state lives.
#[derive(Debug, Clone)]
pub struct StateDirs {
    pub lib: PathBuf,
    pub run: PathBuf,
}

impl StateDirs {
    /// `RNAT_STATE_DIR` if set, else the system locations.
    pub fn from_env() -> StateDirs {
        match std::env::var_os("RNAT_STATE_DIR") {
            Some(d) if !d.is_empty() => {
                let d = PathBuf::from(d);
                StateDirs {
                    lib: d.join("lib"),
                    run: d.join("run"),
                }
            }
            _ => StateDirs {
                lib: "/var/lib/rnat".into(),
                run: "/run/rnat".into(),
            },
        }
    }

    pub fn networks(&self) -> PathBuf {
        self.lib.join("networks")
    }
    pub fn ipam(&self) -> PathBuf {
        self.lib.join("ipam")
    }
    pub fn containers(&self) -> PathBuf {
        self.run.join("containers")
    }
    pub fn container_dir(&self, id: &str) -> PathBuf {
        self.containers().join(id)
    }

    /// Takes the state lock (blocking until it is free). Released on drop.
    pub fn lock(&self) -> Result<StateLock, StateError> {
        for d in [self.networks(), self.ipam(), self.containers()] {
            fs::create_dir_all(&d).map_err(io_err(&d))?;
        }
        let path = self.lib.join("lock");
        let f = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .mode(0o600)
            .open(&path)
            .map_err(io_err(&path))?;
        let lock = Flock::lock(f, FlockArg::LockExclusive).map_err(|(_, e)| StateError::Io {
            path: path.clone(),
            source: e.into(),
        })?;
        Ok(StateLock { _lock: lock })
    }
}

/// Proof that the caller holds the state lock.
pub struct StateLock {
    _lock: Flock<File>,
}

/// Writes `bytes` to `path` so that readers see either the old or the new file, never a mix.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<(), StateError> {
    let dir = path.parent().unwrap_or(Path::new("."));
    fs::create_dir_all(dir).map_err(io_err(dir))?;
    let tmp = path.with_extension(format!("tmp{}", std::process::id()));
    let mut f = OpenOptions::new()
        .create(true)
        .truncate(true)
        .write(true)
        .mode(0o644)
        .open(&tmp)
        .map_err(io_err(&tmp))?;
    f.write_all(bytes).map_err(io_err(&tmp))?;
    f.sync_all().map_err(io_err(&tmp))?;
    fs::rename(&tmp, path).map_err(io_err(path))?;
    if let Ok(d) = File::open(dir) {
        let _ = d.sync_all();
    }
    Ok(())
}

pub fn write_json<T: Serialize>(path: &Path, value: &T) -> Result<(), StateError> {
    let mut bytes = serde_json::to_vec_pretty(value).map_err(|source| StateError::Corrupt {
        path: path.into(),
        source,
    })?;
    bytes.push(b'\n');
    write_atomic(path, &bytes)
}

pub fn read_json<T: DeserializeOwned>(path: &Path) -> Result<Option<T>, StateError> {
    match fs::read(path) {
        Ok(b) => serde_json::from_slice(&b)
            .map(Some)
            .map_err(|source| StateError::Corrupt {
                path: path.into(),
                source,
            }),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(io_err(path)(e)),
    }
}

pub fn remove_file(path: &Path) -> Result<(), StateError> {
    match fs::remove_file(path) {
        Err(e) if e.kind() != io::ErrorKind::NotFound => Err(io_err(path)(e)),
        _ => Ok(()),
    }
}

/// Every `*.json` in a directory, parsed.
pub fn read_all<T: DeserializeOwned>(dir: &Path) -> Result<Vec<T>, StateError> {
    let entries = match fs::read_dir(dir) {
        Ok(e) => e,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(io_err(dir)(e)),
    };
    let mut paths: Vec<PathBuf> = entries
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "json"))
        .collect();
    paths.sort();
    let mut out = Vec::new();
    for p in paths {
        if let Some(v) = read_json(&p)? {
            out.push(v);
        }
    }
    Ok(out)
}

/// A network: a bridge and the subnet its containers get addresses from.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Network {
    pub name: String,
    pub bridge: String,
    pub subnet: Ipv4Net,
    pub gateway: Ipv4Addr,
}

/// A network's allocations.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Allocations {
    /// Address -> owning container id.
    pub addrs: BTreeMap<Ipv4Addr, String>,
    /// The last address handed out; the next search starts after it, so a freed address is not
    /// reused at once (stale ARP and conntrack entries age out first).
    pub last: Option<Ipv4Addr>,
}

/// A running container, as its `rnat run` process recorded it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Container {
    pub id: String,
    pub name: String,
    pub network: String,
    pub ip: Ipv4Addr,
    pub prefix: u8,
    pub veth: String,
    /// The `rnat run` process that owns the container, and its start time (clock ticks since boot):
    /// together they tell whether the owner is still alive even when PIDs are reused.
    pub owner_pid: u32,
    pub owner_start: u64,
    /// The container's main process, once started.
    pub pid: Option<u32>,
    /// Inode of the container's network namespace.
    pub netns_inode: u64,
    pub ports: Vec<PortMapping>,
}

/// Start time of process `pid` (field 22 of `/proc/PID/stat`), if it exists.
pub fn process_start_time(pid: u32) -> Option<u64> {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name (field 2) may hold spaces and parentheses: count from the last ')'.
    let rest = &stat[stat.rfind(')')? + 1..];
    rest.split_whitespace().nth(19)?.parse().ok()
}

impl Container {
    /// Whether the `rnat run` that owns this container is still running.
    pub fn owner_alive(&self) -> bool {
        process_start_time(self.owner_pid) == Some(self.owner_start)
    }
}
