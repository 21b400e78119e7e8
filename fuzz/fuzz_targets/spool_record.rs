//! What the sender service reads from mail processes and its spool: records (socket
//! lines, drop files) and, on the plugin's side, acknowledgements.
#![no_main]

use dovepush_protocol::record::{AckReader, Record};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(record) = Record::decode(data) {
        let name = record.file_name();
        assert!(!name.contains('/') && !name.starts_with('.'), "{name}");
        assert_eq!(Record::decode(record.encode().as_bytes()).unwrap(), record);
    }
    let mut acks = AckReader::default();
    for chunk in data.chunks(7) {
        if acks.feed(chunk).is_err() {
            break;
        }
    }
});
