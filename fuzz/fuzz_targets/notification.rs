//! The ox notification body (receiver ingest): any bytes give a body or a named field,
//! and a body that parses survives its own serialisation unchanged.
#![no_main]

use dovepush_protocol::Notification;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    match Notification::from_json(data) {
        Ok(n) => {
            let again = Notification::from_json(n.to_json().as_bytes()).expect("own output parses");
            assert_eq!(again, n);
            let cut = n.within_limits();
            assert!(cut.subject.as_ref().is_none_or(|s| s.len() <= 4096));
        }
        Err(e) => assert!(!e.field.is_empty() && !e.message.is_empty()),
    }
    let _ = dovepush_protocol::notification::validate_event_id(data);
});
