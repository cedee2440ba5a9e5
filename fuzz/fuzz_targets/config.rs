//! Fuzz target `config`: see `stratus_node::fuzzing::config` for the property it checks.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| stratus_node::fuzzing::config(data));
