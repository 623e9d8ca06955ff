//! Stage timestamps for performance work, cheap enough not to change what they measure: marks are
//! kept in memory and written as one line when `flush` is called, only when `RNAT_TIMING` names a
//! file (`tracing` output, by contrast, slows each stage enough to hide contention effects).

use std::io::Write;
use std::sync::{Mutex, OnceLock};
use std::time::Instant;

struct Marks {
    start: Instant,
    marks: Vec<(&'static str, Instant)>,
}

fn marks() -> Option<&'static Mutex<Marks>> {
    static MARKS: OnceLock<Option<Mutex<Marks>>> = OnceLock::new();
    MARKS
        .get_or_init(|| {
            std::env::var_os("RNAT_TIMING").map(|_| {
                Mutex::new(Marks {
                    start: Instant::now(),
                    marks: Vec::new(),
                })
            })
        })
        .as_ref()
}

/// Records that `stage` just ended (a no-op unless `RNAT_TIMING` is set).
pub fn mark(stage: &'static str) {
    if let Some(m) = marks() {
        if let Ok(mut m) = m.lock() {
            m.marks.push((stage, Instant::now()));
        }
    }
}

/// Appends `stage=µs-since-the-previous-mark ...` as one line to the `RNAT_TIMING` file.
pub fn flush() {
    let (Some(m), Some(path)) = (marks(), std::env::var_os("RNAT_TIMING")) else {
        return;
    };
    let Ok(m) = m.lock() else { return };
    let mut prev = m.start;
    let mut line = String::new();
    for (stage, at) in &m.marks {
        line.push_str(&format!("{stage}={} ", at.duration_since(prev).as_micros()));
        prev = *at;
    }
    line.push('\n');
    if let Ok(mut f) = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
    {
        let _ = f.write_all(line.as_bytes());
    }
}
