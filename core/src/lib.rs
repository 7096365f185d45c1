//! # pgt-core
//!
//! The checkpoint-transfer protocol of pgt, once, with no I/O: the data model ([`dtype`], [`layout`],
//! [`dtensor`], [`sharded`], [`tree`]), the metadata [`schema`], the [`header`] and [`codec`] (which
//! [`scan`]s untrusted bytes under hard caps before decoding them), validation into a [`manifest`], the
//! transfer [`plan`], and the sans-IO [`sender`] and [`receiver`] state machines that a host drives —
//! directly, or through the one [`drive`] loop over the [`engine`] traits.
//!
//! The crate is `#![no_std]` + `alloc` so that it runs unchanged inside a wasm sandbox; it never reads a
//! clock, never touches a socket and never holds tensor bytes (except [`memory`], an in-memory host for
//! tools and tests). See `PROTOCOL.md` for the wire format.
//!
//! Modules depend one way: data model → schema → header → plan → manifest → scan → codec →
//! sender/receiver → engine → drive → memory.
#![no_std]
#![forbid(unsafe_code)]
#![warn(missing_docs)]

extern crate alloc;

pub mod codec;
pub mod digest;
pub mod drive;
pub mod dtensor;
pub mod dtype;
pub mod engine;
mod error;
pub mod header;
pub mod layout;
pub mod manifest;
pub mod memory;
pub mod plan;
pub mod receiver;
#[cfg(feature = "testing")]
pub mod reference;
pub mod scan;
pub mod schema;
pub mod sender;
pub mod sharded;
pub mod tree;

pub use error::{Call, Error};

/// Result alias used throughout the crate.
pub type Result<T, E = Error> = core::result::Result<T, E>;
