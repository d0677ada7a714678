//! The NBD protocol codec shared by the export (server) and the NBD
//! upstream (client).

pub mod proto;
