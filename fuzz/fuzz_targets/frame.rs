//! A TCP frame (header, then payload) read by `read_frame` with a payload cap.
//! See `pgt_host::fuzzing::frame`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    pgt_host::fuzzing::frame(data);
});
