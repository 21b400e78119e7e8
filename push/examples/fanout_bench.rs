//! Fan-out benchmark (not a test): pushes/s from `Pusher` to the local mock APNs for 10 000
//! devices, against the mock's own ceiling measured in the same run by a raw hyper HTTP/2
//! client that does no work per request (one pre-minted JWT, one pre-built payload).
//!
//! Run: `cargo run --release --example fanout_bench` (loopback only; bounded: 3 rounds of
//! 10 000 requests per client, each round under a 120 s timeout).
//! Targets: ≥ 20 000 pushes/s and ≥ 0.5 of the ceiling.

use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use bytes::Bytes;
use dovepush_mocks::{MockApns, ProviderKey, TempDir, TestPki};
use dovepush_push::{
    ApnsConfig, ApnsEnvironment, AppConfig, Device, DeviceKind, Notification, Privacy, Pusher,
};
use http_body_util::{BodyExt, Full};
use hyper::Request;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use ring::rand::SystemRandom;
use ring::signature::{EcdsaKeyPair, ECDSA_P256_SHA256_FIXED_SIGNING};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivatePkcs8KeyDer};

const DEVICES: usize = 10_000;
const ROUNDS: usize = 3;
const ROUND_TIMEOUT: Duration = Duration::from_secs(120);

fn main() {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("runtime");
    runtime.block_on(run());
}

async fn run() {
    let pki = TestPki::new();
    let dir = TempDir::new("fanout-bench").expect("temp dir");
    let ca_file = dir.write("ca.pem", pki.ca_pem());
    let key = ProviderKey::generate("TEAM123456", "KEY1234567");
    let mock = MockApns::start(&pki, std::slice::from_ref(&key))
        .await
        .expect("mock APNs");
    mock.set_recording(false);

    let app = AppConfig {
        id: "mail".into(),
        privacy: Privacy::Full,
        generic_text: "New mail".into(),
        ttl_secs: None,
        apns: Some(ApnsConfig {
            topic: "com.example.mail".into(),
            environment: ApnsEnvironment::Production,
            team_id: Some(key.team_id.clone()),
            key_id: Some(key.key_id.clone()),
            key_file: Some(dir.write("AuthKey.p8", &key.p8_pem)),
            cert_file: None,
            cert_key_file: None,
            cert_password_file: None,
            endpoint: Some(mock.url()),
            ca_file: Some(ca_file.clone()),
            request_timeout_secs: Some(30),
        }),
        fcm: None,
        webpush: None,
    };
    let pusher = Arc::new(Pusher::from_config(&[app], dir.path()).expect("pusher"));
    let devices: Arc<Vec<Device>> = Arc::new(
        (0..DEVICES)
            .map(|i| Device {
                app_id: "mail".into(),
                kind: DeviceKind::Apns,
                token: format!("{i:064x}"),
                privacy: None,
                registered_at: None,
            })
            .collect(),
    );
    let note = Arc::new(Notification {
        user: "alice@example.org".into(),
        folder: "INBOX".into(),
        uidvalidity: 1_655_200_000,
        uid: 4242,
        from: Some("=?UTF-8?Q?J=C3=B6rg_M=C3=BCller?= <joerg@example.org>".into()),
        subject: Some("=?UTF-8?B?UXVhcnRhbHNiZXJpY2h0IPCfk4g=?= and the budget".into()),
        snippet: Some("Hi all, attached the numbers".into()),
        unseen: Some(17),
        event_id: Some("0f6c1a52-6d0e-4a8c-9f3e-0a9d8d4b7e21".into()),
        coalesced: 0,
        badge_only: false,
    });

    let raw = RawClient::new(&ca_file, &key, &mock.url());
    // Warm both connections (TLS handshake, first token) outside the timing.
    raw.send(0).await;
    let _ = pusher.send(&devices[0], &note).await;

    let mut raw_rates = Vec::new();
    let mut push_rates = Vec::new();
    for _ in 0..ROUNDS {
        raw_rates.push(timed(|| raw.fan_out()).await);
        let pusher = pusher.clone();
        let devices = devices.clone();
        let note = note.clone();
        push_rates.push(
            timed(move || async move {
                let mut tasks = tokio::task::JoinSet::new();
                for i in 0..DEVICES {
                    let pusher = pusher.clone();
                    let devices = devices.clone();
                    let note = note.clone();
                    tasks.spawn(async move { pusher.send(&devices[i], &note).await });
                }
                let mut delivered = 0;
                while let Some(outcome) = tasks.join_next().await {
                    if outcome.expect("task").class() == "delivered" {
                        delivered += 1;
                    }
                }
                delivered
            })
            .await,
        );
    }

    let best = |v: &[f64]| v.iter().cloned().fold(0.0, f64::max);
    let ceiling = best(&raw_rates);
    let ours = best(&push_rates);
    println!(
        "fan-out to {DEVICES} devices, one HTTP/2 connection each, {ROUNDS} rounds (best shown)"
    );
    println!("| client | pushes/s (best) | rounds | ratio to ceiling |");
    println!("|---|---|---|---|");
    println!(
        "| raw hyper h2 (ceiling: no JWT, no payload work) | {ceiling:.0} | {} | 1.00 |",
        fmt_rounds(&raw_rates)
    );
    println!(
        "| dovepush-push Pusher (ES256 token, payload, decode) | {ours:.0} | {} | {:.2} |",
        fmt_rounds(&push_rates),
        ours / ceiling
    );
    println!(
        "targets: >= 20000 pushes/s: {}; >= 0.5 of ceiling: {}",
        verdict(ours >= 20_000.0),
        verdict(ours / ceiling >= 0.5)
    );
    println!(
        "mock saw {} requests on {} connections, {} provider token(s)",
        mock.request_count(),
        mock.connections(),
        mock.distinct_provider_tokens()
    );
}

fn verdict(ok: bool) -> &'static str {
    if ok {
        "met"
    } else {
        "NOT met"
    }
}

fn fmt_rounds(rates: &[f64]) -> String {
    rates
        .iter()
        .map(|r| format!("{r:.0}"))
        .collect::<Vec<_>>()
        .join(" / ")
}

/// Runs one round and returns delivered pushes per second.
async fn timed<F, Fut>(round: F) -> f64
where
    F: FnOnce() -> Fut,
    Fut: std::future::Future<Output = usize>,
{
    let start = Instant::now();
    let delivered = tokio::time::timeout(ROUND_TIMEOUT, round())
        .await
        .expect("round timed out");
    let secs = start.elapsed().as_secs_f64();
    assert_eq!(delivered, DEVICES, "not every push was delivered");
    delivered as f64 / secs
}

/// The ceiling client: plain hyper-util over rustls, everything prepared once.
#[derive(Clone)]
struct RawClient {
    client: Client<
        hyper_rustls::HttpsConnector<hyper_util::client::legacy::connect::HttpConnector>,
        Full<Bytes>,
    >,
    base: String,
    authorization: String,
    body: Bytes,
}

impl RawClient {
    fn new(ca_file: &std::path::Path, key: &ProviderKey, base: &str) -> Self {
        let mut roots = rustls::RootCertStore::empty();
        for cert in CertificateDer::pem_file_iter(ca_file).expect("ca") {
            roots.add(cert.expect("cert")).expect("root");
        }
        let tls = rustls::ClientConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .expect("versions")
        .with_root_certificates(roots)
        .with_no_client_auth();
        // Same TCP settings as the crate's client, so only per-request work differs.
        let mut http = hyper_util::client::legacy::connect::HttpConnector::new();
        http.enforce_http(false);
        http.set_nodelay(true);
        let connector = hyper_rustls::HttpsConnectorBuilder::new()
            .with_tls_config(tls)
            .https_only()
            .enable_http2()
            .wrap_connector(http);
        let client = Client::builder(TokioExecutor::new())
            .http2_only(true)
            .build(connector);
        RawClient {
            client,
            base: base.to_owned(),
            authorization: format!("bearer {}", mint_jwt(key)),
            body: Bytes::from_static(
                br#"{"aps":{"alert":{"title":"J\u00f6rg M\u00fcller","body":"Quartalsbericht and the budget"},"badge":17,"thread-id":"INBOX","mutable-content":1},"dovepush":{"folder":"INBOX","uid":4242,"uidvalidity":1655200000}}"#,
            ),
        }
    }

    async fn send(&self, i: usize) -> bool {
        let req = Request::post(format!("{}/3/device/{i:064x}", self.base))
            .header("authorization", &self.authorization)
            .header("apns-topic", "com.example.mail")
            .header("apns-push-type", "alert")
            .header("apns-priority", "10")
            .body(Full::new(self.body.clone()))
            .expect("request");
        match self.client.request(req).await {
            Ok(resp) => {
                let ok = resp.status().is_success();
                let _ = resp.into_body().collect().await;
                ok
            }
            Err(_) => false,
        }
    }

    async fn fan_out(&self) -> usize {
        let mut tasks = tokio::task::JoinSet::new();
        for i in 0..DEVICES {
            let me = self.clone();
            tasks.spawn(async move { me.send(i).await });
        }
        let mut delivered = 0;
        while let Some(ok) = tasks.join_next().await {
            if ok.expect("task") {
                delivered += 1;
            }
        }
        delivered
    }
}

fn mint_jwt(key: &ProviderKey) -> String {
    let der = PrivatePkcs8KeyDer::from_pem_slice(key.p8_pem.as_bytes()).expect("p8");
    let rng = SystemRandom::new();
    let pair = EcdsaKeyPair::from_pkcs8(
        &ECDSA_P256_SHA256_FIXED_SIGNING,
        der.secret_pkcs8_der(),
        &rng,
    )
    .expect("key");
    let iat = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("clock")
        .as_secs();
    let mut jwt = URL_SAFE_NO_PAD.encode(format!(r#"{{"alg":"ES256","kid":"{}"}}"#, key.key_id));
    jwt.push('.');
    jwt.push_str(&URL_SAFE_NO_PAD.encode(format!(r#"{{"iss":"{}","iat":{iat}}}"#, key.team_id)));
    let sig = pair.sign(&rng, jwt.as_bytes()).expect("sign");
    jwt.push('.');
    jwt.push_str(&URL_SAFE_NO_PAD.encode(sig.as_ref()));
    jwt
}
