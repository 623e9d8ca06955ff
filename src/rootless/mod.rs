//! Rootless mode: a user-space NAT between a TAP device in the container's namespace and
//! ordinary host sockets. `core` is the protocol engine (no I/O); the rest attaches it to the
//! kernel.

pub mod control;
pub mod core;
pub mod driver;
pub mod keeper;
pub mod ns;
pub mod publish;
pub mod ring;
pub mod session;
pub mod slirp;
pub mod sys;
