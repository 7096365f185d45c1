//! pgt-host: the host side of pgt — real I/O around the sans-IO protocol of `pgt-core`.
//!
//! - [`pg`]: process groups (ranked, tagged point-to-point messages) over authenticated TCP,
//!   in-process, or MPI (feature `mpi`);
//! - [`transport`]: `Transport`, PGTransport's API, executing what the protocol [`engine`] asks for;
//! - [`state_dict`]: state dicts for Rust users; [`safetensors_io`]: safetensors files in and out;
//! - [`memory`]: receive buffers that keep page faults off the wire's critical path;
//! - [`Error`]: what the library's operations fail with;
//! - `wasm_engine` (feature `wasm`): pgt-core running inside wasmtime;
//! - `synthetic` (feature `testing`): generated state dicts and their byte-exact verification, for
//!   the demo, the benchmarks and tests — **not part of the stable API**.
//!
//! Features: `wasm` (default), `cli` (default: the `pgt` binary and its dependencies), `testing`,
//! `mpi`. A library user who wants neither the CLI's dependencies nor wasmtime takes
//! `default-features = false`.
#![deny(clippy::undocumented_unsafe_blocks)]

pub mod engine;
mod error;
#[cfg(feature = "fuzzing")]
#[doc(hidden)]
pub mod fuzzing;
pub mod memory;
pub mod pg;
pub mod safetensors_io;
pub mod state_dict;
#[cfg(feature = "testing")]
pub mod synthetic;
pub mod transport;
#[cfg(feature = "wasm")]
pub mod wasm_engine;

pub use error::{Error, PeerAction, Result};

/// The README's Rust example, compiled and run as a doctest.
#[doc = include_str!("../../README.md")]
#[cfg(doctest)]
pub struct ReadmeDoctests;
