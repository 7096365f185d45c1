//! Hostile header and metadata bytes fed to the wasm module's decoder and receiver under tight fuel
//! and memory caps; the engine then still runs an honest transfer.
//! See `pgt_host::fuzzing::wasm`.
#![no_main]

libfuzzer_sys::fuzz_target!(init: pgt_host::fuzzing::wasm_init(), |data: &[u8]| {
    pgt_host::fuzzing::wasm(data);
});
