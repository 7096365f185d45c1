//! Arbitrary bytes as a header and a metadata message: Header::parse, codec::decode_metadata and
//! codec::decode never panic; whatever decodes re-validates and round-trips. See `../harness.rs`.
#![no_main]

#[path = "../harness.rs"]
mod harness;

libfuzzer_sys::fuzz_target!(|data: &[u8]| harness::decode(data));
