//! Cross-crate test support for pgt: the in-memory transfer harness, the golden vectors and the TCP
//! process group's conformance transcripts.

pub mod harness;
pub mod tcp_vectors;
pub mod vectors;
