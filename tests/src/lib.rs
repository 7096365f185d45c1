//! Cross-crate test support for pgt: the in-memory transfer harness (and golden vectors).

pub mod harness;
pub mod vectors;
