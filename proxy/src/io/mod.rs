//! Local I/O: page-aligned buffers, the io_uring file engine, page-cache
//! residency checks, TCP streams on rings of their own, the receive
//! low-water mark, and the adaptive spin that polls a queue-depth-1 socket
//! before its task sleeps.

pub mod buf;
pub mod engine;
pub mod lowat;
pub mod pagecache;
pub mod ring_stream;
pub mod spin;

pub use buf::IoBuf;
pub use engine::{Backend, Engine};
