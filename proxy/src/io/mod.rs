//! Local I/O: page-aligned buffers and the io_uring file engine.

pub mod buf;
pub mod engine;

pub use buf::IoBuf;
pub use engine::{Backend, Engine};
