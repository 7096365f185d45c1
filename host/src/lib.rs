//! pgt-host: the host side of pgt — real I/O around the sans-IO protocol of `pgt-core`.
//!
//! - [`pg`]: process groups (ranked, tagged point-to-point messages) over authenticated TCP,
//!   in-process, or MPI (feature `mpi`);
//! - [`transport`]: `Transport`, PGTransport's API, executing what the protocol [`engine`] asks for;
//! - [`state_dict`]: state dicts for Rust users, shaped like PyTorch's (flat string keys, dots and
//!   all; nesting only where the user nests), with typed constructors for every dtype and
//!   `DTensor`/`ShardedTensor` built from local tensors; [`compare`]: `==` and the first
//!   [`Difference`] between two of them ([`assert_state_dict_eq!`]); [`safetensors_io`]: safetensors
//!   files in and out;
//! - the core types a user needs are re-exported here ([`DType`], [`KeyPath`], [`Value`],
//!   [`DTensorSpec`], …) and everything at once in [`prelude`];
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

pub mod compare;
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

// The core types a user of state dicts needs, so that nobody has to depend on pgt-core.
pub use compare::{Difference, Strictness};
pub use pgt_core::dtensor::{DTensorSpec, DeviceMesh, Placement, ReduceOp};
pub use pgt_core::dtype::DType;
pub use pgt_core::layout::TensorLayout;
pub use pgt_core::sharded::{ShardMetadata, ShardedTensorMetadata};
pub use pgt_core::tree::{Key, KeyPath, PathElem, Value};
pub use state_dict::{
    init_device_mesh, Complex32, Element, Entry, Float8E4M3Fn, Float8E4M3Fnuz, Float8E5M2,
    Float8E5M2Fnuz, Locator, StateDict, Storage, Tensor, Tree,
};

/// Everything a program that builds, sends, receives and compares state dicts uses:
/// `use pgt_host::prelude::*;`.
pub mod prelude {
    pub use crate::assert_state_dict_eq;
    pub use crate::pg::{InProcessGroup, ProcessGroup, TcpOptions, TcpProcessGroup};
    pub use crate::safetensors_io;
    pub use crate::transport::{Transport, TransportOptions};
    pub use crate::{
        init_device_mesh, Complex32, DTensorSpec, DType, DeviceMesh, Difference, Entry, Error,
        Float8E4M3Fn, Float8E4M3Fnuz, Float8E5M2, Float8E5M2Fnuz, Key, KeyPath, PathElem,
        Placement, ReduceOp, Result, ShardMetadata, ShardedTensorMetadata, StateDict, Strictness,
        Tensor, TensorLayout, Tree, Value,
    };
}

/// The README's Rust example, compiled and run as a doctest.
#[doc = include_str!("../../README.md")]
#[cfg(doctest)]
pub struct ReadmeDoctests;
