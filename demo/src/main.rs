//! `./scripts/demo`: one delivered mail becomes one push, end to end, on this machine.
//!
//! Starts mock APNs and FCM, a private Dovecot with the dovepush plugin and the
//! dovepush receiver; registers a device for the demo user through the device API with
//! that user's IMAP password; delivers a mail over LMTP; prints what the mock APNs
//! received and the time from the end of DATA to the push; stops everything.

#![forbid(unsafe_code)]

use std::time::{Duration, Instant};

use dovepush_demo::{Stack, USER, USER_PASSWORD};
use dovepush_testkit::messages;

const DEVICE_TOKEN: &str = "a1b2c3d4e5f60718293a4b5c6d7e8f90a1b2c3d4e5f60718293a4b5c6d7e8f90";

fn step(text: &str) {
    println!("\n== {text}");
}

#[tokio::main]
async fn main() {
    if let Err(e) = demo().await {
        eprintln!("demo failed: {e}");
        std::process::exit(1);
    }
}

async fn demo() -> Result<(), Box<dyn std::error::Error>> {
    println!(
        "dovepush demo. No real Apple or Google credentials exist on this machine: the\n\
         pushes go to local mock servers that speak the APNs (HTTP/2 + TLS, ES256 provider\n\
         token) and FCM v1 protocols. Everything below runs on 127.0.0.1 and is stopped\n\
         at the end."
    );
    let stack = Stack::start(&[(USER.to_string(), USER_PASSWORD.to_string())], "").await?;
    step("started");
    println!(
        "private Dovecot: LMTP 127.0.0.1:{}, IMAP 127.0.0.1:{} (plugin lib20_dovepush_plugin.so loaded for lmtp and lda)",
        stack.dovecot.lmtp_port, stack.dovecot.imap_port
    );
    println!("receiver:  http://127.0.0.1:{}", stack.receiver_port);
    println!(
        "mock APNs: {}   mock FCM: {}",
        stack.apns.url(),
        stack.fcm.url()
    );

    step(&format!(
        "register an APNs device for {USER} (PUT /v1/devices, Basic auth with {USER}'s IMAP password)"
    ));
    let (status, body) = stack.register_device(USER, USER_PASSWORD, DEVICE_TOKEN)?;
    println!("HTTP {status} {body}");
    if !(200..300).contains(&status) {
        return Err(format!("registration failed\n{}", stack.receiver_log()).into());
    }
    let metadata = stack.dovecot.subscription(USER)?;
    println!(
        "Dovecot now holds /private/vendor/vendor.dovecot/http-notify = {}",
        metadata.as_deref().unwrap_or("(not set)")
    );

    step("deliver one mail over LMTP to alice@example.com");
    let mut lmtp = stack.dovecot.lmtp()?;
    let before = Instant::now();
    let reply = lmtp.deliver(&["alice@example.com"], &messages::simple(1))?;
    println!(
        "LMTP answered 250 after {:.2} ms",
        reply.as_secs_f64() * 1e3
    );
    let deadline = Instant::now() + Duration::from_secs(20);
    while stack.apns.request_count() == 0 {
        if Instant::now() > deadline {
            return Err(format!(
                "no push reached the mock APNs\nreceiver log:\n{}\ndovecot log:\n{}",
                stack.receiver_log(),
                stack.dovecot.log()
            )
            .into());
        }
        tokio::time::sleep(Duration::from_micros(200)).await;
    }
    let elapsed = before.elapsed();

    step("what the mock APNs received");
    let request = stack.apns.requests().remove(0);
    println!("POST /3/device/{}", request.device_token);
    let mut headers: Vec<_> = request
        .headers
        .iter()
        .filter(|(name, _)| name.as_str().starts_with("apns-") || *name == "authorization")
        .map(|(name, value)| {
            let value = value.to_str().unwrap_or("?");
            let shown = if name == "authorization" {
                format!("{}… (ES256 provider token)", &value[..value.len().min(24)])
            } else {
                value.to_string()
            };
            format!("{name}: {shown}")
        })
        .collect();
    headers.sort();
    for header in headers {
        println!("{header}");
    }
    println!("{}", serde_json::to_string_pretty(&request.json())?);
    println!(
        "\nend of DATA → push at the mock APNs: {:.1} ms",
        elapsed.as_secs_f64() * 1e3
    );

    step("operator view: GET /v1/status/subscriptions");
    // The outbox records the success just after the mock answered.
    let deadline = Instant::now() + Duration::from_secs(5);
    let mut status = stack.status()?.1;
    while status.contains("\"last_success\":null") && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
        status = stack.status()?.1;
    }
    let pretty = serde_json::from_str::<serde_json::Value>(&status)
        .and_then(|v| serde_json::to_string_pretty(&v))
        .unwrap_or(status);
    println!("{pretty}");
    drop(lmtp);
    drop(stack);
    println!("\nstopped Dovecot, the receiver and the mocks.");
    Ok(())
}
