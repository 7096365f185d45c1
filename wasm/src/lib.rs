//! # pgt-wasm
//!
//! pgt-core as a WebAssembly module, so that every protocol decision — decoding and validating untrusted
//! metadata, the plan, the sender's and receiver's state machines — can run in a sandbox while the host
//! only moves bytes. Tensor bytes never enter the module: it sees metadata, plans, completions and the
//! digests the host computed.
//!
//! Two builds of one crate (`scripts/build-wasm.sh` makes both):
//! - **raw ABI** (default features, `wasm32-unknown-unknown`, `no_std` + dlmalloc): C-ABI exports over
//!   linear memory with postcard results, importing nothing — loadable by any wasm runtime (wasmtime in
//!   pgt-host's `WasmEngine`, Python's `wasmtime`, a browser). Documented in `wasm/ABI.md`.
//! - **JS** (feature `js`): wasm-bindgen functions and classes on plain JS objects, packaged with
//!   `wasm-bindgen --target nodejs` into `wasm/pkg-node/`.
//!
//! Across the boundary travel pgt-core's own serde types; [`types`] holds the few the ABI adds (the error
//! block, the decode summary). As an rlib (any target) the crate provides them and the [`api`] both builds
//! run, so native code can produce the very values the guest does.
#![cfg_attr(all(target_arch = "wasm32", not(feature = "js")), no_std)]
#![warn(missing_docs)]
#![deny(clippy::undocumented_unsafe_blocks)]

extern crate alloc;

pub mod api;
pub mod types;

#[cfg(all(target_arch = "wasm32", not(feature = "js")))]
mod abi;

#[cfg(all(feature = "js", target_arch = "wasm32"))]
mod js;
#[cfg(feature = "json")]
pub mod json;
