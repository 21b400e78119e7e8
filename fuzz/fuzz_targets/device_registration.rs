//! The device API's registration JSON: a registration or a field error, never a panic.
#![no_main]

use dovepush_receiver::domain::device::parse_registration;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let known = |app: &str| (app == "mail").then_some(None);
    match parse_registration("alice", data, known) {
        Ok(r) => assert_eq!(r.app, "mail"),
        Err(e) => assert!(!e.field.is_empty()),
    }
});
