//! The receiver's config file: any text gives a config or problems naming keys, never a
//! panic. (Paths in it are resolved against a directory with nothing in it.)
#![no_main]

use dovepush_receiver::config::Config;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    // Key files are read when named: keep the fuzzer away from devices and big files.
    if text.contains("/dev") || text.contains("/proc") || text.contains("/sys") {
        return;
    }
    if let Err(e) = Config::parse(text, std::path::Path::new("/nonexistent/receiver.toml")) {
        assert!(!e.problems.is_empty());
    }
});
