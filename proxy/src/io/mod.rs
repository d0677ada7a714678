//! Local I/O: page-aligned buffers, the io_uring file engine and page-cache
//! residency checks.

pub mod buf;
pub mod engine;
pub mod pagecache;

pub use buf::IoBuf;
pub use engine::{Backend, Engine};
