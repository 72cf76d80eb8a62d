//! The cluster file parser + validator (files from disk and from config pushes).
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(text) = std::str::from_utf8(data) {
        if malai::config::ClusterConfig::parse(text).is_ok() {
            // What parses must survive the secret-stripping edit that pushes use.
            let _ = malai::config::edit::strip_secrets(text);
        }
    }
});
