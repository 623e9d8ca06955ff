//! rnat: container networking. See `docs/architecture.md` for the map of this crate.

pub mod cni;
pub mod dns;
pub mod ipam;
pub mod link;
pub mod netns;
pub mod nft;
pub mod process;
pub mod rootful;
pub mod rootless;
pub mod run;
pub mod spec;
pub mod state;
pub mod timing;
