//! Mock APNs provider API: HTTP/2 over TLS with the test PKI, checking provider tokens (ES256
//! signature, `kid`, `iss`, `iat` age) or client certificates, the `apns-*` headers and the
//! 4096-byte payload limit, then answering from a script with real status codes and reason
//! JSON. Records every accepted request.

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use hyper::header::HeaderMap;
use hyper::{Method, Request, Response, StatusCode, Version};
use rcgen::{KeyPair, PKCS_ECDSA_P256_SHA256};
use ring::signature::ECDSA_P256_SHA256_FIXED;

use crate::jwt::{now_secs, Jwt};
use crate::pki::TestPki;
use crate::server::{self, ConnInfo, Handler, Server};

/// APNs' payload limit.
pub const APNS_MAX_PAYLOAD: usize = 4096;

/// An Apple "auth key" (.p8) for token auth: the private key for the client config and the
/// public key the mock verifies with.
#[derive(Debug, Clone)]
pub struct ProviderKey {
    pub team_id: String,
    pub key_id: String,
    /// PKCS#8 PEM, like the `.p8` file Apple hands out.
    pub p8_pem: String,
    /// Uncompressed P-256 point.
    pub public_key: Vec<u8>,
}

impl ProviderKey {
    pub fn generate(team_id: &str, key_id: &str) -> Self {
        let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).expect("generate P-256 key");
        ProviderKey {
            team_id: team_id.to_owned(),
            key_id: key_id.to_owned(),
            p8_pem: key.serialize_pem(),
            public_key: key.public_key_raw().to_vec(),
        }
    }
}

/// A scripted answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ApnsReply {
    /// 200 with an `apns-id`.
    Ok,
    /// An APNs error: status, `{"reason": …}`, optional `timestamp` (ms) and `Retry-After`.
    Error {
        status: u16,
        reason: String,
        timestamp_ms: Option<u64>,
        retry_after_secs: Option<u64>,
    },
    /// Close the connection without answering.
    DropConnection,
}

impl ApnsReply {
    pub fn error(status: u16, reason: &str) -> Self {
        ApnsReply::Error {
            status,
            reason: reason.to_owned(),
            timestamp_ms: None,
            retry_after_secs: None,
        }
    }

    /// 410 `Unregistered` with the given timestamp (ms since the epoch).
    pub fn unregistered(timestamp_ms: u64) -> Self {
        ApnsReply::Error {
            status: 410,
            reason: "Unregistered".to_owned(),
            timestamp_ms: Some(timestamp_ms),
            retry_after_secs: None,
        }
    }
}

/// One request the mock accepted (passed auth and header checks).
#[derive(Debug, Clone)]
pub struct ApnsRequest {
    pub device_token: String,
    pub headers: HeaderMap,
    pub body: Bytes,
    pub connection: u64,
    pub client_cert: bool,
    /// When the mock accepted it (for end-to-end latency measurements).
    pub received: std::time::Instant,
}

impl ApnsRequest {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }

    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body).unwrap_or(serde_json::Value::Null)
    }
}

struct State {
    keys: HashMap<String, ProviderKey>,
    /// Verified JWTs and their `iat` (verification is cached per token, as APNs does).
    verified: Mutex<HashMap<String, u64>>,
    script: Mutex<VecDeque<ApnsReply>>,
    reject_tokens: Mutex<Option<String>>,
    records: Mutex<Vec<ApnsRequest>>,
    recording: AtomicBool,
    delay_ms: AtomicU64,
    ids: AtomicU64,
}

/// A running mock APNs; stops when dropped.
pub struct MockApns {
    server: Server,
    state: Arc<State>,
}

impl MockApns {
    /// Starts on `127.0.0.1:0` with TLS (ALPN h2) from `pki`, accepting provider tokens of
    /// `keys` and client certificates signed by the `pki` CA.
    pub async fn start(pki: &TestPki, keys: &[ProviderKey]) -> std::io::Result<Self> {
        let state = Arc::new(State {
            keys: keys.iter().map(|k| (k.key_id.clone(), k.clone())).collect(),
            verified: Mutex::default(),
            script: Mutex::default(),
            reject_tokens: Mutex::default(),
            records: Mutex::default(),
            recording: AtomicBool::new(true),
            delay_ms: AtomicU64::new(0),
            ids: AtomicU64::new(0),
        });
        let handler_state = state.clone();
        let handler: Handler = Arc::new(move |info, req| {
            let state = handler_state.clone();
            Box::pin(async move { handle(&state, info, req).await })
        });
        let tls = pki.server_config(&[b"h2"], true);
        let server = server::spawn(Some(tls), 1000, handler).await?;
        Ok(MockApns { server, state })
    }

    /// `https://127.0.0.1:<port>`, for `[apps.apns] endpoint`.
    pub fn url(&self) -> String {
        format!("https://127.0.0.1:{}", self.server.addr.port())
    }

    pub fn port(&self) -> u16 {
        self.server.addr.port()
    }

    /// Queues answers used (in order) before the token-prefix rules.
    pub fn script(&self, replies: impl IntoIterator<Item = ApnsReply>) {
        lock(&self.state.script).extend(replies);
    }

    /// Rejects every provider token with 403 `reason` (e.g. a revoked key), or stops doing so.
    pub fn reject_all_tokens(&self, reason: Option<&str>) {
        *lock(&self.state.reject_tokens) = reason.map(str::to_owned);
    }

    /// Delays every answer (to hold many streams open at once).
    pub fn set_delay(&self, delay: Duration) {
        self.state
            .delay_ms
            .store(delay.as_millis() as u64, Ordering::Relaxed);
    }

    /// Turns recording of requests off (benchmarks) or on.
    pub fn set_recording(&self, on: bool) {
        self.state.recording.store(on, Ordering::Relaxed);
    }

    pub fn requests(&self) -> Vec<ApnsRequest> {
        lock(&self.state.records).clone()
    }

    /// HTTP requests received (including rejected ones).
    pub fn request_count(&self) -> u64 {
        self.server.stats.requests.load(Ordering::SeqCst)
    }

    /// TCP connections accepted.
    pub fn connections(&self) -> u64 {
        self.server.stats.connections.load(Ordering::SeqCst)
    }

    /// Most requests in progress at once.
    pub fn max_in_flight(&self) -> u64 {
        self.server.stats.max_in_flight.load(Ordering::SeqCst)
    }

    /// Distinct valid provider tokens seen (= tokens the client minted and used).
    pub fn distinct_provider_tokens(&self) -> usize {
        lock(&self.state.verified).len()
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

fn reply(status: u16, reason: Option<&str>) -> Response<Full<Bytes>> {
    let body = match reason {
        Some(r) => Bytes::from(serde_json::json!({ "reason": r }).to_string()),
        None => Bytes::new(),
    };
    let mut resp = Response::new(Full::new(body));
    *resp.status_mut() = StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    resp
}

async fn handle(state: &State, info: ConnInfo, req: Request<Incoming>) -> Response<Full<Bytes>> {
    if req.version() != Version::HTTP_2 {
        return reply(505, Some("HTTP2Required"));
    }
    if req.method() != Method::POST {
        return reply(405, Some("MethodNotAllowed"));
    }
    let Some(device_token) = req
        .uri()
        .path()
        .strip_prefix("/3/device/")
        .map(str::to_owned)
    else {
        return reply(404, Some("BadPath"));
    };
    if device_token.is_empty() {
        return reply(400, Some("MissingDeviceToken"));
    }
    let headers = req.headers().clone();
    let header = |name: &str| headers.get(name).and_then(|v| v.to_str().ok());

    match header("authorization") {
        Some(auth) => {
            let Some(jwt) = auth.strip_prefix("bearer ") else {
                return reply(403, Some("InvalidProviderToken"));
            };
            if let Err(reason) = verify_token(state, jwt) {
                return reply(403, Some(reason));
            }
            if let Some(reason) = lock(&state.reject_tokens).clone() {
                return reply(403, Some(&reason));
            }
        }
        None if info.client_cert => {}
        None => return reply(403, Some("MissingProviderToken")),
    }

    if header("apns-topic").is_none_or(str::is_empty) {
        return reply(400, Some("MissingTopic"));
    }
    let priority = header("apns-priority").unwrap_or("10");
    if !matches!(priority, "1" | "5" | "10") {
        return reply(400, Some("BadPriority"));
    }
    match header("apns-push-type") {
        None | Some("alert") => {}
        Some("background") if priority == "5" => {}
        Some("background") => return reply(400, Some("BadPriority")),
        Some(
            "voip" | "location" | "complication" | "fileprovider" | "mdm" | "liveactivity"
            | "pushtotalk",
        ) => {}
        Some(_) => return reply(400, Some("InvalidPushType")),
    }
    if header("apns-expiration").is_some_and(|v| v.parse::<u64>().is_err()) {
        return reply(400, Some("BadExpirationDate"));
    }
    if header("apns-collapse-id").is_some_and(|v| v.len() > 64) {
        return reply(400, Some("BadCollapseId"));
    }
    let body = match Limited::new(req.into_body(), 64 * 1024).collect().await {
        Ok(body) => body.to_bytes(),
        Err(_) => return reply(413, Some("PayloadTooLarge")),
    };
    if body.is_empty() {
        return reply(400, Some("PayloadEmpty"));
    }
    if body.len() > APNS_MAX_PAYLOAD {
        return reply(413, Some("PayloadTooLarge"));
    }
    let json_ok = serde_json::from_slice::<serde_json::Value>(&body)
        .map(|v| v.get("aps").is_some_and(|a| a.is_object()))
        .unwrap_or(false);
    if !json_ok {
        return reply(400, Some("BadPayload"));
    }

    if state.recording.load(Ordering::Relaxed) {
        lock(&state.records).push(ApnsRequest {
            device_token: device_token.clone(),
            headers,
            body,
            connection: info.id,
            client_cert: info.client_cert,
            received: std::time::Instant::now(),
        });
    }
    let delay = state.delay_ms.load(Ordering::Relaxed);
    if delay > 0 {
        tokio::time::sleep(Duration::from_millis(delay)).await;
    }

    let scripted = lock(&state.script).pop_front();
    let answer = scripted.unwrap_or_else(|| by_prefix(&device_token));
    match answer {
        ApnsReply::Ok => {
            let n = state.ids.fetch_add(1, Ordering::Relaxed);
            let mut resp = reply(200, None);
            let id = format!("00000000-0000-4000-8000-{n:012X}");
            resp.headers_mut()
                .insert("apns-id", id.parse().expect("apns-id header"));
            resp
        }
        ApnsReply::Error {
            status,
            reason,
            timestamp_ms,
            retry_after_secs,
        } => {
            let mut body = serde_json::json!({ "reason": reason });
            if let Some(ts) = timestamp_ms {
                body["timestamp"] = ts.into();
            }
            let mut resp = Response::new(Full::new(Bytes::from(body.to_string())));
            *resp.status_mut() = StatusCode::from_u16(status).unwrap_or(StatusCode::BAD_REQUEST);
            if let Some(secs) = retry_after_secs {
                resp.headers_mut()
                    .insert("retry-after", secs.to_string().parse().expect("header"));
            }
            resp
        }
        ApnsReply::DropConnection => {
            info.drop_now.notify_one();
            tokio::time::sleep(Duration::from_secs(5)).await;
            reply(500, Some("InternalServerError"))
        }
    }
}

/// Built-in answers by device-token prefix, used when the script is empty.
///
/// `gone…` 410 Unregistered (timestamp now) · `badtoken…` 400 BadDeviceToken ·
/// `wrongtopic…` 400 DeviceTokenNotForTopic · `badmsg…` 400 BadMessageId · `busy…` 429
/// TooManyRequests (Retry-After 7) · `down…` 503 ServiceUnavailable (Retry-After 3) ·
/// `crash…` 500 InternalServerError · `cut…` drop the connection · anything else 200.
fn by_prefix(token: &str) -> ApnsReply {
    let with_retry = |status, reason: &str, secs| ApnsReply::Error {
        status,
        reason: reason.to_owned(),
        timestamp_ms: None,
        retry_after_secs: Some(secs),
    };
    if token.starts_with("gone") {
        ApnsReply::unregistered(now_secs() * 1000)
    } else if token.starts_with("badtoken") {
        ApnsReply::error(400, "BadDeviceToken")
    } else if token.starts_with("wrongtopic") {
        ApnsReply::error(400, "DeviceTokenNotForTopic")
    } else if token.starts_with("badmsg") {
        ApnsReply::error(400, "BadMessageId")
    } else if token.starts_with("busy") {
        with_retry(429, "TooManyRequests", 7)
    } else if token.starts_with("down") {
        with_retry(503, "ServiceUnavailable", 3)
    } else if token.starts_with("crash") {
        ApnsReply::error(500, "InternalServerError")
    } else if token.starts_with("cut") {
        ApnsReply::DropConnection
    } else {
        ApnsReply::Ok
    }
}

/// Checks a provider token like APNs: known `kid`, ES256, `iss` = the key's team, `iat` not
/// older than an hour. Verification is cached per token string.
fn verify_token(state: &State, jwt: &str) -> Result<(), &'static str> {
    let cached = lock(&state.verified).get(jwt).copied();
    let iat = match cached {
        Some(iat) => iat,
        None => {
            let parsed = Jwt::parse(jwt).ok_or("InvalidProviderToken")?;
            if parsed.header["alg"] != "ES256" {
                return Err("InvalidProviderToken");
            }
            let kid = parsed.header["kid"]
                .as_str()
                .ok_or("InvalidProviderToken")?;
            let key = state.keys.get(kid).ok_or("InvalidProviderToken")?;
            if parsed.claims["iss"].as_str() != Some(key.team_id.as_str()) {
                return Err("InvalidProviderToken");
            }
            let iat = parsed.claims["iat"]
                .as_u64()
                .ok_or("InvalidProviderToken")?;
            if !parsed.verify(&ECDSA_P256_SHA256_FIXED, &key.public_key) {
                return Err("InvalidProviderToken");
            }
            iat
        }
    };
    let now = now_secs();
    if iat > now + 300 {
        return Err("InvalidProviderToken");
    }
    if now.saturating_sub(iat) > 3600 {
        return Err("ExpiredProviderToken");
    }
    if cached.is_none() {
        lock(&state.verified).insert(jwt.to_owned(), iat);
    }
    Ok(())
}

/// Distinct device tokens in a list of requests (test helper).
pub fn distinct_device_tokens(requests: &[ApnsRequest]) -> HashSet<String> {
    requests.iter().map(|r| r.device_token.clone()).collect()
}
