//! rnat: container networking. See `docs/architecture.md` for the map of this crate.

pub mod nft;
pub mod spec;
