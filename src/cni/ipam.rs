//! Delegating address management to a standard IPAM plugin (`ipam.type`), the CNI way: the
//! plugin found in CNI_PATH is run with the same environment and configuration.

use std::io::Write;
use std::process::{Command, Stdio};

use serde_json::Value;

use super::config::CniEnv;
use super::error::{CniError, Code};

/// Runs IPAM plugin `kind` with `command`; returns its result (ADD) or `Value::Null`.
pub fn exec(env: &CniEnv, kind: &str, command: &str, conf: &[u8]) -> Result<Value, CniError> {
    if kind.contains('/') {
        return Err(CniError::new(
            Code::InvalidConfig,
            format!("ipam.type {kind:?} must be a plugin name"),
        ));
    }
    let path = env
        .path
        .iter()
        .map(|d| d.join(kind))
        .find(|p| p.is_file())
        .ok_or_else(|| {
            CniError::new(
                Code::InvalidConfig,
                format!("IPAM plugin {kind:?} not found in CNI_PATH"),
            )
        })?;
    let mut child = Command::new(&path)
        .env("CNI_COMMAND", command)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .map_err(|e| CniError::new(Code::Delegate, format!("running {}: {e}", path.display())))?;
    if let Some(mut stdin) = child.stdin.take() {
        stdin.write_all(conf).map_err(|e| {
            CniError::new(
                Code::Delegate,
                format!("writing to {}: {e}", path.display()),
            )
        })?;
    }
    let out = child.wait_with_output().map_err(|e| {
        CniError::new(
            Code::Delegate,
            format!("waiting for {}: {e}", path.display()),
        )
    })?;
    let parsed: Option<Value> = serde_json::from_slice(&out.stdout).ok();
    if !out.status.success() {
        let msg = parsed
            .as_ref()
            .and_then(|v| v.get("msg").and_then(Value::as_str).map(str::to_string))
            .unwrap_or_else(|| String::from_utf8_lossy(&out.stdout).trim().to_string());
        return Err(CniError::new(
            Code::Delegate,
            format!("IPAM plugin {kind} {command} failed: {msg}"),
        ));
    }
    Ok(parsed.unwrap_or(Value::Null))
}
