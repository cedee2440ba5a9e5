//! Fuzz target `cache_key`: see `stratus_node::fuzzing::cache_key` for the property it checks.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| stratus_node::fuzzing::cache_key(data));
