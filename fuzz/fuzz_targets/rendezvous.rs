//! The rendezvous store's messages: a rank's REGISTER frame at the store, the store's TABLE frame at
//! a rank.
//! See `pgt_host::fuzzing::rendezvous`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    pgt_host::fuzzing::rendezvous(data);
});
