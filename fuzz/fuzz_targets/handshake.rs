//! The server and client sides of the authenticated TCP handshake, fed hostile hellos, proofs,
//! verdicts and registrations.
//! See `pgt_host::fuzzing::handshake`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    pgt_host::fuzzing::handshake(data);
});
