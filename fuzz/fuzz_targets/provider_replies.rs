//! APNs, FCM and Web Push replies (status, Retry-After, body) → an outcome, never a panic.
#![no_main]

use dovepush_push::{
    classify_apns_reply, classify_fcm_reply, classify_webpush_reply, Device, DeviceKind,
};
use hyper::{HeaderMap, StatusCode};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if data.len() < 3 {
        return;
    }
    let status = StatusCode::from_u16(100 + u16::from_le_bytes([data[0], data[1]]) % 500)
        .expect("100..600 is a status");
    let split = usize::from(data[2]).min(data.len() - 3);
    let (retry_after, body) = data[3..].split_at(split);
    let mut headers = HeaderMap::new();
    if let Ok(value) = hyper::header::HeaderValue::from_bytes(retry_after) {
        headers.insert("retry-after", value.clone());
        headers.insert("apns-id", value.clone());
        headers.insert("location", value);
    }
    let device = Device {
        app_id: "app".into(),
        kind: DeviceKind::Apns,
        token: "abcd".into(),
        privacy: None,
        registered_at: Some(std::time::UNIX_EPOCH),
    };
    let _ = classify_apns_reply(status, &headers, body, &device).class();
    let _ = classify_fcm_reply(status, &headers, body).class();
    let _ = classify_webpush_reply(status, &headers).class();
});
