//! Fuzz harnesses of pgt-host (feature `fuzzing`; not an API): the cargo-fuzz targets of `fuzz/`
//! are thin wrappers around these functions, and `host/tests/fuzz_regressions.rs` replays the
//! committed inputs through them in `cargo test`. Each panics only through its `assert!`s, which
//! are bugs when they fire. [`wasm`] needs feature `wasm` as well.

pub use crate::pg::fuzzing::{frame, handshake, rendezvous};
#[cfg(feature = "wasm")]
pub use wasm::{wasm, wasm_init};

#[cfg(feature = "wasm")]
mod wasm;
