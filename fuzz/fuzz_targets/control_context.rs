//! Fuzz target `control_context`: see `stratus_node::fuzzing::control_context` for the property it checks.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| stratus_node::fuzzing::control_context(data));
