//! The batch ingest body as the receiver reads it: the envelope, then each notification
//! on its own.
#![no_main]

use dovepush_protocol::batch::BatchRequest;
use dovepush_protocol::Notification;
use libfuzzer_sys::fuzz_target;
use serde_json::value::RawValue;

fuzz_target!(|data: &[u8]| {
    let Ok(batch) = serde_json::from_slice::<BatchRequest<Box<RawValue>>>(data) else {
        return;
    };
    for item in batch.notifications {
        let _ = dovepush_protocol::notification::validate_event_id(item.event_id.as_bytes());
        let _ = Notification::from_json(item.notification.get().as_bytes());
    }
});
