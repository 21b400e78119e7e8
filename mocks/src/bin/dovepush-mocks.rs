//! Starts a mock APNs and a mock FCM on loopback for demos, writes the files a dovepush
//! config needs (CA, .p8 key, service-account JSON, APNs client certificate) into a
//! directory, prints one JSON line with ports and paths, and runs until Ctrl-C.
//!
//! Usage: `dovepush-mocks [OUTPUT_DIR]` (default: a new directory under the temp dir).

#![forbid(unsafe_code)]

use std::path::PathBuf;

use dovepush_mocks::{MockApns, MockFcm, ProviderKey, TestPki};

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let dir = match std::env::args_os().nth(1) {
        Some(dir) => PathBuf::from(dir),
        None => std::env::temp_dir().join(format!("dovepush-mocks-{}", std::process::id())),
    };
    std::fs::create_dir_all(&dir)?;
    let pki = TestPki::new();
    let key = ProviderKey::generate("TEAMID1234", "KEYID12345");
    let apns = MockApns::start(&pki, std::slice::from_ref(&key)).await?;
    let fcm = MockFcm::start(Some(&pki), "dovepush-demo").await?;

    let ca_file = dir.join("ca.pem");
    pki.write_ca(&ca_file)?;
    let key_file = dir.join("AuthKey_KEYID12345.p8");
    std::fs::write(&key_file, &key.p8_pem)?;
    let service_account_file = dir.join("firebase.json");
    std::fs::write(&service_account_file, fcm.service_account_json())?;
    let client = pki.issue_client_cert("Apple Push Services: com.example.mail");
    let cert_file = dir.join("apns-client.pem");
    std::fs::write(&cert_file, format!("{}{}", client.cert_pem, client.key_pem))?;

    let info = serde_json::json!({
        "apns_endpoint": apns.url(),
        "apns_port": apns.port(),
        "apns_team_id": key.team_id,
        "apns_key_id": key.key_id,
        "apns_key_file": key_file,
        "apns_cert_file": cert_file,
        "fcm_endpoint": fcm.url(),
        "fcm_port": fcm.port(),
        "fcm_service_account_file": service_account_file,
        "ca_file": ca_file,
    });
    println!("{info}");
    tokio::signal::ctrl_c().await?;
    eprintln!(
        "apns: {} requests on {} connections; fcm: {} requests, {} token mints",
        apns.request_count(),
        apns.connections(),
        fcm.request_count(),
        fcm.token_mints()
    );
    Ok(())
}
