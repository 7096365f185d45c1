//! pgt-host: the host side of pgt — I/O around the sans-IO protocol of `pgt-core`.
//!
//! So far: [`pg`], process groups (ranked point-to-point messaging) over TCP or in-process.

pub mod pg;
