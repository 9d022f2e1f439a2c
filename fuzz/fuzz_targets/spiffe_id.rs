#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| writ::fuzzing::spiffe_id(data));
