//! Exports: how a proxy serves its image to children.

pub mod iscsi;
pub mod nbd;
