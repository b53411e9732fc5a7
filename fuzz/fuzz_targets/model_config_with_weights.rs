#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let _ = selective::fuzzing::model_config_with_weights(data);
});
