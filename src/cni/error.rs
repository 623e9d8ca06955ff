//! CNI errors: the specification's JSON on stdout, with its codes.

use serde_json::{json, Value};

/// Error codes: 1-99 are the specification's, 100 and up rnat's own (listed in docs/cni.md).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Code {
    IncompatibleVersion = 1,
    UnsupportedField = 2,
    UnknownContainer = 3,
    InvalidEnv = 4,
    Io = 5,
    Decode = 6,
    InvalidConfig = 7,
    TryAgainLater = 11,
    /// STATUS: cannot serve ADDs.
    NotAvailable = 50,
    /// STATUS: cannot serve ADDs, and existing containers may have limited connectivity.
    NotAvailableDegraded = 51,
    /// rnat needs CAP_NET_ADMIN.
    NoPrivilege = 100,
    /// The interface or attachment already exists.
    Exists = 101,
    /// A host port is already published or bound.
    PortInUse = 102,
    /// No address is free, or the requested one is taken.
    NoAddress = 103,
    /// CHECK found the attachment different from what ADD made.
    Drift = 104,
    /// A delegated plugin (IPAM) failed.
    Delegate = 105,
    Internal = 999,
}

/// An error as a CNI plugin reports it.
#[derive(Debug, Clone)]
pub struct CniError {
    pub code: Code,
    pub msg: String,
    pub details: String,
    pub cni_version: String,
}

impl CniError {
    pub fn new(code: Code, msg: impl Into<String>) -> CniError {
        CniError {
            code,
            msg: msg.into(),
            details: String::new(),
            cni_version: "1.1.0".into(),
        }
    }

    pub fn with_details(mut self, d: impl Into<String>) -> CniError {
        self.details = d.into();
        self
    }

    pub fn with_version(mut self, v: &str) -> CniError {
        self.cni_version = v.to_string();
        self
    }

    pub fn to_json(&self) -> Value {
        let mut v =
            json!({ "cniVersion": self.cni_version, "code": self.code as u32, "msg": self.msg });
        if !self.details.is_empty() {
            v["details"] = Value::String(self.details.clone());
        }
        v
    }
}

impl std::fmt::Display for CniError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} (code {})", self.msg, self.code as u32)
    }
}

impl From<crate::rootful::Error> for CniError {
    fn from(e: crate::rootful::Error) -> CniError {
        use crate::rootful::Error as E;
        let code = match &e {
            E::Privilege => Code::NoPrivilege,
            E::AttachmentExists(_) | E::IfaceExists(_) => Code::Exists,
            E::PortPublished { .. } | E::PortBound { .. } => Code::PortInUse,
            E::Exhausted { .. } | E::AddressUnavailable { .. } => Code::NoAddress,
            E::Spec(_)
            | E::NetworkInvalid(_)
            | E::Ipv6(_)
            | E::NetworkExists(_)
            | E::InvalidName(_) => Code::InvalidConfig,
            E::State(crate::state::StateError::Busy(_)) => Code::TryAgainLater,
            E::Link(_) | E::Nft(_) | E::State(_) | E::Io { .. } => Code::Io,
            _ => Code::Internal,
        };
        let details = std::iter::successors(std::error::Error::source(&e), |s| s.source())
            .map(|s| s.to_string())
            .collect::<Vec<_>>()
            .join(": ");
        CniError::new(code, e.to_string()).with_details(details)
    }
}
