//! Persistent and runtime state: networks, address allocations and container records, as JSON
//! files written atomically (temp file, fsync, rename) under one exclusive lock.
//!
//! Layout (`RNAT_STATE_DIR=D` puts both under D):
//! - `/var/lib/rnat/networks/NAME.json`  network definitions (persist across reboots)
//! - `/var/lib/rnat/ipam/NAME.json`      allocations of that network: address -> container id
//! - `/var/lib/rnat/lock`                the lock every state change is made under
//! - `/run/rnat/containers/ID.pN.HEX(NAME).json`   a running container named NAME, owned by an
//!   `rnat run` holding slot N of `owners.lock`; `ID.cni.json` for a CNI attachment. One file each
//!   (writes are O(1)), named so that listing them reads none (gone at reboot, as the containers are)
//! - `/run/rnat/recycled/`               files of removed records, reused by new ones
//! - `/run/rnat/owners.lock`             one byte-range lock per running `rnat run` (its liveness)
//! - `/run/rnat/resolv/GATEWAY.conf`     the resolv.conf of containers behind that gateway
//! - `/run/rnat/ports/PROTO-B.json`      published host ports B*64..B*64+63 and their owners
//!
//! A file that is rewritten keeps a hidden spare, `.NAME.spare` (see `write_replace`).

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
    #[error("the state lock {0} is held by another rnat for too long; try again")]
    Busy(PathBuf),
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

/// How long a command waits for another to release the state lock.
const LOCK_WAIT: std::time::Duration = std::time::Duration::from_secs(60);

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
    /// The resolv.conf shared by the containers whose gateway (and DNS server) is `gateway`.
    pub fn resolv(&self, gateway: std::net::Ipv4Addr) -> PathBuf {
        self.run.join("resolv").join(format!("{gateway}.conf"))
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
        // Wait at most LOCK_WAIT: a runtime would rather hear "try again" than hang.
        let deadline = std::time::Instant::now() + LOCK_WAIT;
        let mut f = f;
        let lock = loop {
            match Flock::lock(f, FlockArg::LockExclusiveNonblock) {
                Ok(l) => break l,
                Err((back, nix::errno::Errno::EWOULDBLOCK))
                    if std::time::Instant::now() < deadline =>
                {
                    f = back;
                    std::thread::sleep(std::time::Duration::from_millis(5));
                }
                Err((_, nix::errno::Errno::EWOULDBLOCK)) => return Err(StateError::Busy(path)),
                Err((_, e)) => {
                    return Err(StateError::Io {
                        path,
                        source: e.into(),
                    })
                }
            }
        };
        Ok(StateLock { _lock: lock })
    }
}

/// Proof that the caller holds the state lock.
pub struct StateLock {
    _lock: Flock<File>,
}

/// Writes `bytes` to `path` so that readers see either the old or the new file, never a mix, and
/// the new one survives a power loss.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<(), StateError> {
    write_replace(path, bytes, true)
}

/// Replaces `path` atomically for readers, with or without making it durable: runtime state (under
/// /run, which a reboot empties along with the containers it describes) needs no fsync.
///
/// A file that exists already is rewritten without making or freeing an inode: the new contents go
/// into its spare (`.NAME.spare`, the previous version) and `RENAME_EXCHANGE` swaps the two names. A
/// rename over the old file would free an inode on every write, and an ext4 without a journal (as on
/// this kind of VM, where even /run is ext4) skips every inode freed in the last minute when it
/// allocates the next one, so set-up would slow down with every container set up before it.
/// Callers hold the state lock, which makes the spare one writer's at a time.
fn write_replace(path: &Path, bytes: &[u8], durable: bool) -> Result<(), StateError> {
    let dir = path.parent().unwrap_or(Path::new("."));
    let spare = spare_path(path);
    let exchanged = path.exists()
        && EXCHANGE_WORKS.load(std::sync::atomic::Ordering::Relaxed)
        && write_exchange(path, &spare, bytes, durable)?;
    if !exchanged {
        fs::create_dir_all(dir).map_err(io_err(dir))?;
        let tmp = path.with_extension(format!("tmp{}", std::process::id()));
        write_file(&tmp, bytes, durable)?;
        fs::rename(&tmp, path).map_err(io_err(path))?;
    }
    if durable {
        if let Ok(d) = File::open(dir) {
            let _ = d.sync_all();
        }
    }
    Ok(())
}

/// Whether the state's file system swaps names (`RENAME_EXCHANGE`); once refused, never tried again.
static EXCHANGE_WORKS: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(true);

/// The spare of a state file (`DIR/.NAME.spare`): its previous version, rewritten by the next
/// write. Hidden, as nothing should read it.
fn spare_path(path: &Path) -> PathBuf {
    let mut name = std::ffi::OsString::from(".");
    name.push(path.file_name().unwrap_or_default());
    name.push(".spare");
    path.with_file_name(name)
}

fn write_file(path: &Path, bytes: &[u8], durable: bool) -> Result<(), StateError> {
    let mut f = OpenOptions::new()
        .create(true)
        .truncate(true)
        .write(true)
        .mode(0o644)
        .open(path)
        .map_err(io_err(path))?;
    f.write_all(bytes).map_err(io_err(path))?;
    if durable {
        f.sync_all().map_err(io_err(path))?;
    }
    Ok(())
}

/// Writes `bytes` to `spare` and swaps it with `path`. `Ok(false)` when the file system cannot
/// exchange names (the caller then renames a new file over `path`).
fn write_exchange(
    path: &Path,
    spare: &Path,
    bytes: &[u8],
    durable: bool,
) -> Result<bool, StateError> {
    use nix::fcntl::{renameat2, RenameFlags, AT_FDCWD};
    write_file(spare, bytes, durable)?;
    match renameat2(
        AT_FDCWD,
        spare,
        AT_FDCWD,
        path,
        RenameFlags::RENAME_EXCHANGE,
    ) {
        Ok(()) => Ok(true),
        Err(nix::errno::Errno::EINVAL | nix::errno::Errno::ENOSYS) => {
            EXCHANGE_WORKS.store(false, std::sync::atomic::Ordering::Relaxed);
            let _ = fs::remove_file(spare);
            Ok(false)
        }
        Err(nix::errno::Errno::ENOENT) => {
            // `path` went away since it was seen: the spare becomes it.
            fs::rename(spare, path).map_err(io_err(path))?;
            Ok(true)
        }
        Err(e) => Err(io_err(path)(e.into())),
    }
}

pub fn write_json<T: Serialize>(path: &Path, value: &T) -> Result<(), StateError> {
    let mut bytes = serde_json::to_vec_pretty(value).map_err(|source| StateError::Corrupt {
        path: path.into(),
        source,
    })?;
    bytes.push(b'\n');
    write_atomic(path, &bytes)
}

/// Runtime state (a file under /run): replaced atomically, not fsynced.
pub fn write_runtime(path: &Path, bytes: &[u8]) -> Result<(), StateError> {
    write_replace(path, bytes, false)
}

/// Runtime state read on every command: compact JSON, replaced atomically, not fsynced.
pub fn write_json_runtime<T: Serialize>(path: &Path, value: &T) -> Result<(), StateError> {
    let mut bytes = serde_json::to_vec(value).map_err(|source| StateError::Corrupt {
        path: path.into(),
        source,
    })?;
    bytes.push(b'\n');
    write_replace(path, &bytes, false)
}

/// Runtime state that others hold open or have bind-mounted (a container's resolv.conf): left alone
/// when it already says `bytes`, else replaced by a new file, so that nobody's view of it changes
/// under them.
pub fn write_runtime_shared(path: &Path, bytes: &[u8]) -> Result<(), StateError> {
    if fs::read(path).is_ok_and(|b| b == bytes) {
        return Ok(());
    }
    let dir = path.parent().unwrap_or(Path::new("."));
    fs::create_dir_all(dir).map_err(io_err(dir))?;
    let tmp = path.with_extension(format!("tmp{}", std::process::id()));
    write_file(&tmp, bytes, false)?;
    fs::rename(&tmp, path).map_err(io_err(path))
}

pub fn read_json<T: DeserializeOwned>(path: &Path) -> Result<Option<T>, StateError> {
    use std::io::Read;
    use std::os::unix::fs::MetadataExt;
    // A reader without the state lock (CNI CHECK and STATUS, `network ls`) may open a file just
    // before a write turns it into the spare, and a second write may be rewriting it as it reads:
    // what was read counts only if the path still names the file read, and parses.
    let mut tries = 0;
    loop {
        let mut f = match File::open(path) {
            Ok(f) => f,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(io_err(path)(e)),
        };
        // One read usually takes all of it (no size query first).
        let mut b = Vec::with_capacity(64 * 1024);
        f.read_to_end(&mut b).map_err(io_err(path))?;
        let same = match (f.metadata(), fs::metadata(path)) {
            (Ok(a), Ok(b)) => a.ino() == b.ino(),
            _ => false,
        };
        if !same && tries < 2 {
            tries += 1;
            continue;
        }
        match serde_json::from_slice(&b) {
            Ok(v) => return Ok(Some(v)),
            Err(_) if tries < 2 => tries += 1,
            Err(source) => {
                return Err(StateError::Corrupt {
                    path: path.into(),
                    source,
                })
            }
        }
    }
}

/// Removes a state file and its spare.
pub fn remove_file(path: &Path) -> Result<(), StateError> {
    let _ = fs::remove_file(spare_path(path));
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
    /// MTU of the veths (the kernel's default when unset).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mtu: Option<u32>,
    /// Masquerade traffic leaving the subnet.
    #[serde(default = "yes")]
    pub masquerade: bool,
    /// Let a container reach itself through its own published port (bridge port hairpin).
    #[serde(default = "yes")]
    pub hairpin: bool,
    /// More subnets, each with its gateway on the bridge: a container gets its address from the
    /// first subnet (`subnet`, then these) that has room.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub extra: Vec<Pool>,
}

/// One subnet of a network and its gateway (an address of the bridge).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Pool {
    pub subnet: Ipv4Net,
    pub gateway: Ipv4Addr,
}

impl Network {
    /// Every subnet of the network, the main one first.
    pub fn pools(&self) -> Vec<Pool> {
        std::iter::once(Pool {
            subnet: self.subnet,
            gateway: self.gateway,
        })
        .chain(self.extra.iter().copied())
        .collect()
    }
}

fn yes() -> bool {
    true
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

/// What keeps a container alive.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "lowercase")]
pub enum Owner {
    /// An `rnat run` process; alive while it holds the owner lock of `slot` (see `OwnerLock`).
    Process { pid: u32, slot: u32 },
    /// A CNI attachment: it lives until the runtime's DEL (or a GC that does not list it).
    Cni {
        container_id: String,
        ifname: String,
        netns: String,
    },
}

/// A container's network attachment, as rnat recorded it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Container {
    pub id: String,
    pub name: String,
    pub network: String,
    pub ip: Ipv4Addr,
    pub prefix: u8,
    /// The gateway of the subnet the address came from.
    pub gateway: Ipv4Addr,
    /// The host end of the veth pair.
    pub veth: String,
    /// The container end's name inside its namespace.
    pub ifname: String,
    /// Whether rnat installed the container's default route (not when the namespace already had
    /// one: a second network attached to the same container).
    #[serde(default = "yes")]
    pub default_route: bool,
    pub owner: Owner,
    /// Inode of the container's network namespace.
    pub netns_inode: u64,
    pub ports: Vec<PortMapping>,
}

/// The lock a container's owner process holds for its whole life: an open-file-description
/// lock on one byte (the container's slot) of `run/owners.lock`. The kernel releases it when the
/// process ends, however it ends, so liveness never depends on PIDs (which are reused); and a
/// check is one `fcntl` on a file opened once per command.
pub struct OwnerLock {
    _file: File,
}

fn owners_path(dirs: &StateDirs) -> PathBuf {
    dirs.run.join("owners.lock")
}

fn slot_lock(slot: u32, ty: libc::c_short) -> libc::flock {
    libc::flock {
        l_type: ty,
        l_whence: libc::SEEK_SET as libc::c_short,
        l_start: libc::off_t::from(slot),
        l_len: 1,
        l_pid: 0,
    }
}

/// Takes the owner lock of `slot`.
pub fn take_owner_lock(dirs: &StateDirs, slot: u32) -> Result<OwnerLock, StateError> {
    let path = owners_path(dirs);
    let file = OpenOptions::new()
        .create(true)
        .truncate(false)
        .read(true)
        .write(true)
        .mode(0o600)
        .open(&path)
        .map_err(io_err(&path))?;
    nix::fcntl::fcntl(
        &file,
        nix::fcntl::FcntlArg::F_OFD_SETLK(&slot_lock(slot, libc::F_WRLCK as libc::c_short)),
    )
    .map_err(|e| StateError::Io {
        path: path.clone(),
        source: e.into(),
    })?;
    Ok(OwnerLock { _file: file })
}

/// Answers "is slot N's owner alive?" for one command.
pub struct OwnerProbe {
    file: Option<File>,
}

impl OwnerProbe {
    pub fn open(dirs: &StateDirs) -> OwnerProbe {
        OwnerProbe {
            file: File::open(owners_path(dirs)).ok(),
        }
    }

    /// Whether some process holds `slot`'s lock.
    pub fn held(&self, slot: u32) -> bool {
        let Some(f) = &self.file else { return false };
        let mut probe = slot_lock(slot, libc::F_WRLCK as libc::c_short);
        match nix::fcntl::fcntl(f, nix::fcntl::FcntlArg::F_OFD_GETLK(&mut probe)) {
            Ok(_) => probe.l_type != libc::F_UNLCK as libc::c_short,
            // Cannot tell: count it alive rather than tear down a running container.
            Err(_) => true,
        }
    }
}

impl Container {
    /// Whether the owner still holds the container (a CNI attachment always does until DEL).
    pub fn owner_alive(&self, probe: &OwnerProbe) -> bool {
        match &self.owner {
            Owner::Process { slot, .. } => probe.held(*slot),
            Owner::Cni { .. } => true,
        }
    }

    /// The container's main process: the owner's child, once started (`rnat run` only). Derived
    /// rather than recorded, so starting the command costs no state write.
    pub fn main_pid(&self) -> Option<u32> {
        let Owner::Process { pid, .. } = self.owner else {
            return None;
        };
        let children = fs::read_to_string(format!("/proc/{pid}/task/{pid}/children")).ok()?;
        children.split_whitespace().next()?.parse().ok()
    }

    /// The CNI attachment key, for CNI-owned records.
    pub fn cni_key(&self) -> Option<(&str, &str)> {
        match &self.owner {
            Owner::Cni {
                container_id,
                ifname,
                ..
            } => Some((container_id, ifname)),
            Owner::Process { .. } => None,
        }
    }
}

/// A running container as its record's file name tells it: the id and, for an `rnat run` owner,
/// the owner-lock slot and the container's name. Listing these is a readdir; no record is read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    pub id: String,
    /// `None` for a CNI attachment.
    pub slot: Option<u32>,
    /// `None` for a CNI attachment (found by id, never by name).
    pub name: Option<String>,
}

impl Entry {
    fn of(rec: &Container) -> Entry {
        match rec.owner {
            Owner::Process { slot, .. } => Entry {
                id: rec.id.clone(),
                slot: Some(slot),
                name: Some(rec.name.clone()),
            },
            Owner::Cni { .. } => Entry {
                id: rec.id.clone(),
                slot: None,
                name: None,
            },
        }
    }

    fn file_name(&self) -> String {
        match (self.slot, &self.name) {
            (Some(s), Some(n)) => format!("{}.p{s}.{}.json", self.id, hex(n)),
            (Some(s), None) => format!("{}.p{s}.json", self.id),
            (None, _) => format!("{}.cni.json", self.id),
        }
    }

    fn parse(file: &str) -> Option<Entry> {
        let stem = file.strip_suffix(".json")?;
        let mut parts = stem.split('.');
        let (id, tag, name) = (parts.next()?, parts.next()?, parts.next());
        if parts.next().is_some() {
            return None;
        }
        let (slot, name) = match (tag, name) {
            ("cni", None) => (None, None),
            (t, n) => (
                Some(t.strip_prefix('p')?.parse().ok()?),
                match n {
                    Some(h) => Some(unhex(h)?),
                    None => None,
                },
            ),
        };
        Some(Entry {
            id: id.to_string(),
            slot,
            name,
        })
    }
}

/// The container records: one file each under `run/containers/`, so writing one is O(1) and
/// listing them reads no file.
impl StateDirs {
    pub fn list_records(&self) -> Result<Vec<Entry>, StateError> {
        let dir = self.containers();
        let rd = match fs::read_dir(&dir) {
            Ok(rd) => rd,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => return Err(io_err(&dir)(e)),
        };
        let mut out: Vec<Entry> = rd
            .filter_map(|e| e.ok())
            .filter_map(|e| e.file_name().to_str().and_then(Entry::parse))
            .collect();
        out.sort_by(|a, b| a.id.cmp(&b.id));
        Ok(out)
    }

    pub fn read_record(&self, e: &Entry) -> Result<Option<Container>, StateError> {
        read_json(&self.containers().join(e.file_name()))
    }

    /// A record named the way rnat named them before names went into file names
    /// (`ID.pSLOT.json`, left by a container started before an upgrade) is renamed to its current
    /// name, so that look-ups by name find it; any other entry comes back as it is. Best effort:
    /// a record that cannot be read or renamed stays as it is (and is only missing from look-ups
    /// by name). Call under the state lock.
    pub fn migrate_record(&self, e: Entry) -> Result<Entry, StateError> {
        if e.slot.is_none() || e.name.is_some() {
            return Ok(e);
        }
        let from = self.containers().join(e.file_name());
        let rec = match self.read_record(&e) {
            Ok(Some(rec)) => rec,
            Ok(None) => return Ok(e),
            Err(err) => {
                tracing::warn!("cannot read the old-form record {}: {err}", from.display());
                return Ok(e);
            }
        };
        let new = Entry::of(&rec);
        let to = self.containers().join(new.file_name());
        if to.exists() {
            // Written under the new name since (a publish by an rnat in between): that one is
            // current; the old file goes.
            remove_file(&from)?;
            return Ok(new);
        }
        if let Err(err) = fs::rename(&from, &to) {
            tracing::warn!(
                "cannot rename the old-form record {}: {err}",
                from.display()
            );
            return Ok(e);
        }
        let _ = fs::remove_file(spare_path(&from));
        Ok(new)
    }

    /// Files of removed records, kept to be reused by new ones (see `write_record`).
    fn recycled(&self) -> PathBuf {
        self.run.join("recycled")
    }

    /// Writes a record. A new one goes into a recycled file when there is one, renamed into place
    /// once written: no inode is made, as no inode is freed when a record is removed (see
    /// `write_replace` on why that matters). At most as many files wait there as containers once
    /// ran at the same time.
    pub fn write_record(&self, rec: &Container) -> Result<(), StateError> {
        let path = self.containers().join(Entry::of(rec).file_name());
        if !path.exists() {
            if let Some(free) = fs::read_dir(self.recycled())
                .ok()
                .and_then(|mut rd| rd.find_map(|e| e.ok()))
            {
                let mut bytes = serde_json::to_vec(rec).map_err(|source| StateError::Corrupt {
                    path: path.clone(),
                    source,
                })?;
                bytes.push(b'\n');
                let free = free.path();
                if write_file(&free, &bytes, false).is_ok() && fs::rename(&free, &path).is_ok() {
                    return Ok(());
                }
                let _ = fs::remove_file(&free);
            }
        }
        write_json_runtime(&path, rec)
    }

    /// Removes a record: its file goes to the recycled files (its spare, if any, is deleted).
    pub fn remove_record(&self, rec: &Container) -> Result<(), StateError> {
        let entry = Entry::of(rec);
        let path = self.containers().join(entry.file_name());
        let _ = fs::remove_file(spare_path(&path));
        let dir = self.recycled();
        if fs::create_dir_all(&dir).is_err() || fs::rename(&path, dir.join(&rec.id)).is_err() {
            // Not recyclable (or already gone): removed for good.
            remove_file(&path)?;
        }
        // A record named the way rnat named them before names went into file names.
        if entry.name.is_some() {
            let legacy = Entry {
                name: None,
                ..entry
            };
            remove_file(&self.containers().join(legacy.file_name()))?;
        }
        Ok(())
    }

    fn port_bucket(&self, proto: crate::spec::Protocol, port: u16) -> PathBuf {
        self.run
            .join("ports")
            .join(format!("{proto}-{}.json", port / 64))
    }

    /// Published ports of `proto` in the bucket (64 ports) holding `port`, with their owners.
    pub fn ports_in_bucket(
        &self,
        proto: crate::spec::Protocol,
        port: u16,
    ) -> Result<Vec<PortOwner>, StateError> {
        Ok(read_json(&self.port_bucket(proto, port))?.unwrap_or_default())
    }

    /// Adds (or, with `add` false, removes) `id`'s mappings in the port index, one bucket file
    /// (64 ports) at a time.
    pub fn index_ports(
        &self,
        id: &str,
        name: &str,
        ports: &[PortMapping],
        add: bool,
    ) -> Result<(), StateError> {
        let mut by_bucket: BTreeMap<PathBuf, Vec<PortMapping>> = BTreeMap::new();
        for m in ports {
            by_bucket
                .entry(self.port_bucket(m.protocol, m.host_port))
                .or_default()
                .push(*m);
        }
        for (path, ms) in by_bucket {
            let mut all: Vec<PortOwner> = read_json(&path)?.unwrap_or_default();
            if add {
                all.extend(ms.iter().map(|m| PortOwner {
                    mapping: *m,
                    id: id.to_string(),
                    name: name.to_string(),
                }));
            } else {
                all.retain(|p| !(p.id == id && ms.contains(&p.mapping)));
            }
            if all.is_empty() {
                remove_file(&path)?;
            } else {
                write_json_runtime(&path, &all)?;
            }
        }
        Ok(())
    }
}

fn hex(s: &str) -> String {
    s.bytes().map(|b| format!("{b:02x}")).collect()
}

fn unhex(s: &str) -> Option<String> {
    if s.len() % 2 != 0 {
        return None;
    }
    let bytes = (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(s.get(i..i + 2)?, 16).ok())
        .collect::<Option<Vec<u8>>>()?;
    String::from_utf8(bytes).ok()
}

/// One published port in the port index.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PortOwner {
    pub mapping: PortMapping,
    pub id: String,
    pub name: String,
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A directory of this test's own under the system temp dir, removed on drop.
    struct Scratch(PathBuf);
    impl Scratch {
        fn new(tag: &str) -> Scratch {
            let d = std::env::temp_dir().join(format!("rnat-state-{tag}-{}", std::process::id()));
            let _ = fs::remove_dir_all(&d);
            fs::create_dir_all(&d).expect("scratch dir");
            Scratch(d)
        }
    }
    impl Drop for Scratch {
        fn drop(&mut self) {
            let _ = fs::remove_dir_all(&self.0);
        }
    }

    fn ino(p: &Path) -> u64 {
        use std::os::unix::fs::MetadataExt;
        fs::metadata(p).expect("stat").ino()
    }

    #[test]
    fn rewrites_swap_two_inodes_and_leave_no_temp_files() {
        let dir = Scratch::new("swap");
        let path = dir.0.join("net.json");
        write_runtime(&path, b"one").unwrap();
        let first = ino(&path);
        write_atomic(&path, b"two").unwrap();
        let second = ino(&path);
        assert_ne!(first, second);
        assert_eq!(ino(&spare_path(&path)), first, "the old file is the spare");
        write_runtime(&path, b"three").unwrap();
        assert_eq!(ino(&path), first, "the third write reuses the first inode");
        assert_eq!(fs::read(&path).unwrap(), b"three");
        let mut names: Vec<String> = fs::read_dir(&dir.0)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        assert_eq!(names, [".net.json.spare", "net.json"]);
        remove_file(&path).unwrap();
        assert_eq!(
            fs::read_dir(&dir.0).unwrap().count(),
            0,
            "spare removed too"
        );
    }

    #[test]
    fn shared_files_change_only_as_new_files() {
        let dir = Scratch::new("shared");
        let path = dir.0.join("r.conf");
        write_runtime_shared(&path, b"a").unwrap();
        let held = File::open(&path).unwrap();
        let first = ino(&path);
        write_runtime_shared(&path, b"a").unwrap();
        assert_eq!(ino(&path), first, "same contents: left alone");
        write_runtime_shared(&path, b"b").unwrap();
        assert_ne!(ino(&path), first);
        let mut old = String::new();
        std::io::Read::read_to_string(&mut &held, &mut old).unwrap();
        assert_eq!(
            old, "a",
            "a holder of the old file still sees the old contents"
        );
    }

    fn record(id: &str, slot: u32) -> Container {
        Container {
            id: id.into(),
            name: format!("n{id}"),
            network: "net".into(),
            ip: Ipv4Addr::new(192, 0, 2, 9),
            prefix: 24,
            gateway: Ipv4Addr::new(192, 0, 2, 1),
            veth: "rv00000000".into(),
            ifname: "eth0".into(),
            default_route: true,
            owner: Owner::Process { pid: 1, slot },
            netns_inode: 7,
            ports: Vec::new(),
        }
    }

    /// State directories inside `dir`, with the containers' directory made.
    fn scratch_dirs(dir: &Scratch) -> StateDirs {
        let dirs = StateDirs {
            lib: dir.0.join("lib"),
            run: dir.0.join("run"),
        };
        fs::create_dir_all(dirs.containers()).unwrap();
        dirs
    }

    #[test]
    fn removed_records_lend_their_files_to_new_ones() {
        let dir = Scratch::new("recycle");
        let dirs = scratch_dirs(&dir);
        let (a, b) = (record("aaaaaaaaaaaa", 0), record("bbbbbbbbbbbb", 1));
        dirs.write_record(&a).unwrap();
        let e = dirs.list_records().unwrap();
        let a_ino = ino(&dirs.containers().join(e[0].file_name()));
        dirs.remove_record(&a).unwrap();
        assert!(dirs.list_records().unwrap().is_empty());
        dirs.write_record(&b).unwrap();
        let e = dirs.list_records().unwrap();
        assert_eq!(e.len(), 1);
        assert_eq!(dirs.read_record(&e[0]).unwrap(), Some(b.clone()));
        assert_eq!(
            ino(&dirs.containers().join(e[0].file_name())),
            a_ino,
            "the new record reuses the removed one's file"
        );
        assert_eq!(fs::read_dir(dirs.recycled()).unwrap().count(), 0);
        // Without a recycled file, a new one is made.
        dirs.write_record(&a).unwrap();
        assert_eq!(dirs.list_records().unwrap().len(), 2);
    }

    #[test]
    fn a_record_named_the_old_way_is_renamed_found_by_name_and_removed() {
        let dir = Scratch::new("legacy");
        let dirs = scratch_dirs(&dir);
        let a = record("aaaaaaaaaaaa", 4);
        let legacy = dirs.containers().join("aaaaaaaaaaaa.p4.json");
        fs::write(&legacy, serde_json::to_vec(&a).unwrap()).unwrap();
        let listed = dirs.list_records().unwrap();
        assert_eq!(listed.len(), 1);
        assert_eq!(
            listed[0].name, None,
            "the old name carries no container name"
        );
        let e = dirs.migrate_record(listed[0].clone()).unwrap();
        assert_eq!(e.name.as_deref(), Some("naaaaaaaaaaaa"));
        assert!(!legacy.exists());
        let listed = dirs.list_records().unwrap();
        assert_eq!(listed, vec![e.clone()], "one record, under its new name");
        assert_eq!(dirs.read_record(&e).unwrap(), Some(a.clone()));
        assert_eq!(
            dirs.migrate_record(e.clone()).unwrap(),
            e,
            "a current name stays"
        );
        // Both forms present (a newer write under the new name): the new one is kept.
        let mut newer = a.clone();
        newer.netns_inode = 8;
        dirs.write_record(&newer).unwrap();
        fs::write(&legacy, serde_json::to_vec(&a).unwrap()).unwrap();
        let old = Entry {
            name: None,
            ..e.clone()
        };
        assert_eq!(dirs.migrate_record(old).unwrap(), e);
        assert!(!legacy.exists());
        assert_eq!(dirs.read_record(&e).unwrap(), Some(newer));
        // An unreadable old-form record is left alone, not an error.
        fs::write(&legacy, b"{ not json").unwrap();
        let bad = dirs
            .list_records()
            .unwrap()
            .into_iter()
            .find(|x| x.name.is_none())
            .unwrap();
        assert_eq!(dirs.migrate_record(bad.clone()).unwrap(), bad);
        fs::remove_file(&legacy).unwrap();
        dirs.remove_record(&a).unwrap();
        assert!(dirs.list_records().unwrap().is_empty());
    }

    #[test]
    fn entries_round_trip_through_file_names() {
        for e in [
            Entry {
                id: "0123456789ab".into(),
                slot: Some(17),
                name: Some("web.1-x".into()),
            },
            Entry {
                id: "0123456789ab".into(),
                slot: Some(3),
                name: None,
            },
            Entry {
                id: "ba9876543210".into(),
                slot: None,
                name: None,
            },
        ] {
            assert_eq!(Entry::parse(&e.file_name()), Some(e));
        }
        assert_eq!(Entry::parse("x.tmp123"), None);
        assert_eq!(
            Entry::parse("0123456789ab"),
            None,
            "a container's directory is not a record"
        );
        assert_eq!(Entry::parse("id.q3.json"), None);
        assert_eq!(Entry::parse("id.p3.7g.json"), None, "not hex");
        assert_eq!(Entry::parse("id.p3.777.json"), None, "odd length");
        assert_eq!(Entry::parse("id.cni.77.json"), None);
        assert_eq!(
            Entry::parse(".id.p3.77.json.spare"),
            None,
            "a spare is not a record"
        );
    }
}
