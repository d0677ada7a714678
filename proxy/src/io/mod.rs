//! Local I/O: page-aligned buffers, the io_uring file engine, page-cache
//! residency checks, and TCP streams on rings of their own.

pub mod buf;
pub mod engine;
pub mod pagecache;
pub mod ring_stream;

pub use buf::IoBuf;
pub use engine::{Backend, Engine};
