//! One file per `herd` subcommand.

pub mod cache;
pub mod fleet;
pub mod image;
pub mod iscsi;
pub mod manifest;
pub mod profile;
pub mod record;
pub mod replay;
pub mod serve;
pub mod tls;
