//! The METADATA subscription value the plugin reads: never a panic, and a value written
//! for a parsed identity reads back as that identity.
#![no_main]

use dovepush_protocol::subscription::Subscription;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok(s) = Subscription::parse(text) {
        assert_eq!(Subscription::parse(&s.value()).unwrap(), s);
    }
});
