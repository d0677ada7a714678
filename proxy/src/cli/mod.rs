//! One file per `herd` subcommand (`serve` lives in `main.rs`, with the
//! runtime it sets up).

pub mod cache;
pub mod iscsi;
pub mod manifest;
pub mod profile;
pub mod record;
pub mod replay;
