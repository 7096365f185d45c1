//! A receiver driven by an arbitrary program of calls (header, metadata, bindings, data, digests,
//! trailer, forwards, finish): never panics, and yields a result only for a complete, verified
//! transfer. See `../harness.rs`.
#![no_main]

#[path = "../harness.rs"]
mod harness;

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    harness::receiver(data);
});
