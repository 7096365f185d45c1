//! pgt-host: the host side of pgt — I/O around the sans-IO protocol of `pgt-core`.
//!
//! So far: [`pg`], process groups (ranked point-to-point messaging) over TCP or in-process.

pub mod engine;
pub mod memory;
pub mod pg;
pub mod safetensors_io;
pub mod state_dict;
pub mod synthetic;
pub mod transport;
#[cfg(feature = "wasm")]
pub mod wasm_engine;
