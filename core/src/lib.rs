//! # pgt-core
//!
//! The checkpoint-transfer protocol of pgt, once, with no I/O: the data model ([`dtype`], [`layout`],
//! [`dtensor`], [`sharded`], [`tree`]), the wire [`codec`] with validation of untrusted bytes, the
//! transfer [`plan`], and the sans-IO [`sender`] and [`receiver`] state machines that a host drives.
//!
//! The crate is `#![no_std]` + `alloc` so that it runs unchanged inside a wasm sandbox; it never reads a
//! clock, never touches a socket and never holds tensor bytes. See `PROTOCOL.md` for the wire format.
#![no_std]
#![forbid(unsafe_code)]
#![warn(missing_docs)]

extern crate alloc;

pub mod codec;
pub mod digest;
pub mod dtensor;
pub mod dtype;
mod error;
pub mod layout;
pub mod plan;
pub mod receiver;
pub mod reference;
pub mod sender;
pub mod sharded;
pub mod tree;

pub use error::Error;

/// Result alias used throughout the crate.
pub type Result<T, E = Error> = core::result::Result<T, E>;
