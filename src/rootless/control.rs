//! The control socket of a rootless instance: `$XDG_RUNTIME_DIR/rnat/NAME.sock` (or
//! `/tmp/rnat-UID/NAME.sock`), in a 0700 directory, mode 0600. One JSON request per connection,
//! one JSON reply:
//!
//! ```text
//! {"op":"ps"}                                 {"ok":{...instance...}}
//! {"op":"publish","specs":["8080:80"]}        {"ok":{"ports":[...]}} or {"error":"..."}
//! {"op":"unpublish","specs":["8080:80"]}
//! ```
//!
//! `rnat publish`, `rnat unpublish` and `rnat ps` use it when run by an ordinary user.

use std::io::{self, BufRead, BufReader, Write};
use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

/// A request on the control socket.
#[derive(Debug, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "lowercase")]
pub enum Request {
    Ps,
    Publish { specs: Vec<String> },
    Unpublish { specs: Vec<String> },
}

/// The directory of this user's control sockets.
pub fn dir() -> PathBuf {
    match std::env::var_os("XDG_RUNTIME_DIR").map(PathBuf::from) {
        Some(d)
            if d.is_dir() && nix::unistd::access(&d, nix::unistd::AccessFlags::W_OK).is_ok() =>
        {
            d.join("rnat")
        }
        _ => std::env::temp_dir().join(format!("rnat-{}", nix::unistd::geteuid())),
    }
}

/// Creates the control socket for instance `name`. Fails if a live instance has the name.
pub fn listen(name: &str) -> io::Result<(UnixListener, PathBuf)> {
    let dir = dir();
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(&dir)?;
    let meta = std::fs::symlink_metadata(&dir)?;
    if !meta.is_dir()
        || std::os::unix::fs::MetadataExt::uid(&meta) != nix::unistd::geteuid().as_raw()
    {
        return Err(io::Error::new(
            io::ErrorKind::PermissionDenied,
            format!("{} is not a directory of ours", dir.display()),
        ));
    }
    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o700))?;
    let path = dir.join(format!("{name}.sock"));
    if path.exists() {
        if UnixStream::connect(&path).is_ok() {
            return Err(io::Error::new(
                io::ErrorKind::AddrInUse,
                format!("an instance named {name:?} is running"),
            ));
        }
        std::fs::remove_file(&path)?; // left by an instance that died
    }
    let listener = UnixListener::bind(&path)?;
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600))?;
    listener.set_nonblocking(true)?;
    Ok((listener, path))
}

/// How long a request may take to arrive, in all: the engine serves nothing else meanwhile.
const REQUEST_TIME: Duration = Duration::from_millis(500);
/// Connections a control or API socket's readiness serves before the containers' traffic gets a
/// turn (the listener, level-triggered, reports the rest again).
pub const ACCEPTS_PER_WAKE: usize = 8;

/// Reads from a connection just accepted until `whole` says the request is complete, the peer
/// shuts down its side, `max` bytes have come, or `REQUEST_TIME` has passed since the start
/// (which, before any byte, is an error). Replies written to the connection get the same bound
/// per write.
pub fn read_bounded(
    conn: &UnixStream,
    max: usize,
    whole: impl Fn(&[u8]) -> bool,
) -> io::Result<Vec<u8>> {
    conn.set_nonblocking(false)?;
    conn.set_write_timeout(Some(REQUEST_TIME))?;
    let deadline = Instant::now() + REQUEST_TIME;
    let mut body = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return if body.is_empty() {
                Err(io::ErrorKind::TimedOut.into())
            } else {
                Ok(body)
            };
        }
        conn.set_read_timeout(Some(left))?;
        let n = match io::Read::read(&mut &*conn, &mut buf) {
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock && !body.is_empty() => return Ok(body),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                return Err(io::ErrorKind::TimedOut.into())
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        };
        if n == 0 {
            return Ok(body);
        }
        body.extend_from_slice(&buf[..n]);
        if body.len() >= max || whole(&body) {
            return Ok(body);
        }
    }
}

/// Reads one request (a line of JSON) from a connection just accepted (bounded in time and size).
pub fn read_request(conn: &UnixStream) -> io::Result<Request> {
    let body = read_bounded(conn, 64 << 10, |b| b.contains(&b'\n'))?;
    let line = body.split(|&c| c == b'\n').next().unwrap_or_default();
    serde_json::from_slice(line).map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))
}

/// Writes a reply: `{"ok": value}` or `{"error": message}`.
pub fn reply(mut conn: &UnixStream, result: Result<serde_json::Value, String>) {
    let v = match result {
        Ok(v) => serde_json::json!({ "ok": v }),
        Err(e) => serde_json::json!({ "error": e }),
    };
    let _ = writeln!(conn, "{v}");
}

/// Sends `req` to the instance at `path` and returns its answer.
pub fn call(path: &Path, req: &Request) -> io::Result<Result<serde_json::Value, String>> {
    let mut conn = UnixStream::connect(path)?;
    conn.set_read_timeout(Some(Duration::from_secs(10)))?;
    writeln!(
        conn,
        "{}",
        serde_json::to_string(req).map_err(io::Error::other)?
    )?;
    let mut line = String::new();
    BufReader::new(&conn).read_line(&mut line)?;
    let v: serde_json::Value =
        serde_json::from_str(&line).map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))?;
    if let Some(e) = v.get("error") {
        return Ok(Err(e.as_str().unwrap_or("error").to_string()));
    }
    Ok(Ok(v.get("ok").cloned().unwrap_or_default()))
}

/// The control sockets of this user's live instances, by name (stale ones are removed).
pub fn instances() -> Vec<(String, PathBuf)> {
    let Ok(rd) = std::fs::read_dir(dir()) else {
        return Vec::new();
    };
    let mut out = Vec::new();
    for e in rd.flatten() {
        let path = e.path();
        let Some(name) = path
            .file_name()
            .and_then(|n| n.to_str())
            .and_then(|n| n.strip_suffix(".sock"))
        else {
            continue;
        };
        if UnixStream::connect(&path).is_ok() {
            out.push((name.to_string(), path.clone()));
        } else {
            let _ = std::fs::remove_file(&path);
        }
    }
    out.sort();
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A client that trickles its request gets `REQUEST_TIME` in all, not per byte: the read
    /// ends long before the last of 20 bytes sent 100 ms apart (the engine serves nothing else
    /// while it waits).
    #[test]
    fn a_trickled_request_is_cut_off_in_all() {
        let (ours, theirs) = UnixStream::pair().expect("socketpair");
        let writer = std::thread::spawn(move || {
            for _ in 0..20 {
                if (&theirs).write_all(b"x").is_err() {
                    break;
                }
                std::thread::sleep(Duration::from_millis(100));
            }
        });
        let got = read_bounded(&ours, 64 << 10, |b| b.contains(&b'\n')).expect("some bytes");
        assert!(
            !got.is_empty() && got.len() < 20,
            "read {} bytes of a request trickled over 2 s",
            got.len()
        );
        drop(ours);
        writer.join().expect("writer");
    }
}
