//! Mock Web Push service (RFC 8030) over HTTPS with the test PKI: it hands out browser-like
//! subscriptions (a P-256 key pair and auth secret per subscription, bound to the VAPID
//! key given at subscribe time, as `PushManager.subscribe({applicationServerKey})` does),
//! and for each push checks the VAPID header (ES256 signature with `k`, `k` = the
//! subscription's key, `aud` = the origin the request was sent to, `exp` within 24 h, `sub`), the `TTL`,
//! `Content-Encoding`, `Urgency` and `Topic` headers and the 4096-byte body limit, then
//! decrypts the body (RFC 8291) with the subscription's private key, as the browser would,
//! and records the plaintext. Answers 201 unless scripted otherwise (410, 413, 429, …); an
//! unsubscribed endpoint answers 410.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use hyper::header::HeaderMap;
use hyper::{Method, Request, Response, StatusCode};
use rcgen::{KeyPair, PKCS_ECDSA_P256_SHA256};
use ring::rand::{SecureRandom, SystemRandom};
use ring::signature::ECDSA_P256_SHA256_FIXED;
use serde_json::{json, Value};
use web_push_native::p256;
use web_push_native::p256::elliptic_curve::sec1::ToEncodedPoint;

use crate::jwt::{now_secs, Jwt};
use crate::pki::TestPki;
use crate::server::{self, ConnInfo, Handler, Server};

/// The body limit every push service must accept (RFC 8030 §7.2); larger bodies get 413.
pub const WEBPUSH_MAX_BODY: usize = 4096;
/// The longest `exp` a VAPID token may have (RFC 8292 §2).
const MAX_VAPID_LIFETIME_SECS: u64 = 24 * 3600;

/// An application server's VAPID key pair, as a test writes it for `[apps.webpush]`.
#[derive(Debug, Clone)]
pub struct VapidKeyPair {
    /// PKCS#8 PEM (`BEGIN PRIVATE KEY`).
    pub private_pem: String,
    /// The public key in unpadded base64url (the browser's `applicationServerKey`).
    pub public_key: String,
}

impl VapidKeyPair {
    pub fn generate() -> Self {
        let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).expect("generate P-256 key");
        VapidKeyPair {
            private_pem: key.serialize_pem(),
            public_key: URL_SAFE_NO_PAD.encode(key.public_key_raw()),
        }
    }
}

/// A subscription as `PushSubscription.toJSON()` gives it to the page.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Subscription {
    pub endpoint: String,
    /// The user agent's public key, unpadded base64url (65-byte uncompressed point).
    pub p256dh: String,
    /// The 16-byte auth secret, unpadded base64url.
    pub auth: String,
}

impl Subscription {
    /// `{"endpoint": …, "expirationTime": null, "keys": {"p256dh": …, "auth": …}}`.
    pub fn to_json(&self) -> Value {
        json!({
            "endpoint": self.endpoint,
            "expirationTime": null,
            "keys": {"p256dh": self.p256dh, "auth": self.auth},
        })
    }
}

/// A scripted answer to a push.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum WebPushReply {
    /// 201 with a `Location` for the message.
    Created,
    /// Any status, with an optional `Retry-After` (seconds).
    Status {
        status: u16,
        retry_after_secs: Option<u64>,
    },
    /// Close the connection without answering.
    DropConnection,
}

impl WebPushReply {
    /// 410 Gone: the subscription expired or was unsubscribed.
    pub fn gone() -> Self {
        Self::status(410)
    }

    /// 413 Payload Too Large.
    pub fn too_large() -> Self {
        Self::status(413)
    }

    /// 429 Too Many Requests with `Retry-After`.
    pub fn too_many(retry_after_secs: u64) -> Self {
        WebPushReply::Status {
            status: 429,
            retry_after_secs: Some(retry_after_secs),
        }
    }

    pub fn status(status: u16) -> Self {
        WebPushReply::Status {
            status,
            retry_after_secs: None,
        }
    }
}

/// One push the mock accepted (VAPID and headers checked, body decrypted).
#[derive(Debug, Clone)]
pub struct WebPushRequest {
    /// The subscription's endpoint.
    pub endpoint: String,
    pub headers: HeaderMap,
    /// The encrypted body's length.
    pub body_len: usize,
    /// The decrypted message.
    pub plaintext: Vec<u8>,
    /// The VAPID token's claims (`aud`, `exp`, `sub`).
    pub vapid_claims: Value,
    pub connection: u64,
}

impl WebPushRequest {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }

    /// The decrypted message as JSON (`Null` if it is not JSON).
    pub fn json(&self) -> Value {
        serde_json::from_slice(&self.plaintext).unwrap_or(Value::Null)
    }
}

struct Subscriber {
    endpoint: String,
    secret: p256::SecretKey,
    auth: web_push_native::Auth,
    /// The VAPID public key (uncompressed point) the subscription is bound to.
    server_key: Vec<u8>,
    gone: bool,
}

struct State {
    origin: OnceLock<String>,
    subscribers: Mutex<HashMap<String, Subscriber>>,
    script: Mutex<VecDeque<WebPushReply>>,
    records: Mutex<Vec<WebPushRequest>>,
    max_body: AtomicUsize,
    ids: AtomicU64,
}

/// A running mock Web Push service; stops when dropped.
pub struct MockWebPush {
    server: Server,
    state: Arc<State>,
}

impl MockWebPush {
    /// Starts on `127.0.0.1:0` with TLS (ALPN h2, http/1.1) from `pki`.
    pub async fn start(pki: &TestPki) -> std::io::Result<Self> {
        let state = Arc::new(State {
            origin: OnceLock::new(),
            subscribers: Mutex::default(),
            script: Mutex::default(),
            records: Mutex::default(),
            max_body: AtomicUsize::new(WEBPUSH_MAX_BODY),
            ids: AtomicU64::new(0),
        });
        let handler_state = state.clone();
        let handler: Handler = Arc::new(move |info, req| {
            let state = handler_state.clone();
            Box::pin(async move { handle(&state, info, req).await })
        });
        let tls = pki.server_config(&[b"h2", b"http/1.1"], false);
        let server = server::spawn(Some(tls), 1000, handler).await?;
        let _ = state
            .origin
            .set(format!("https://127.0.0.1:{}", server.addr.port()));
        Ok(MockWebPush { server, state })
    }

    /// `https://127.0.0.1:<port>`, the origin of the endpoints it hands out (what VAPID
    /// tokens name as `aud`).
    pub fn origin(&self) -> String {
        self.state.origin.get().cloned().unwrap_or_default()
    }

    pub fn port(&self) -> u16 {
        self.server.addr.port()
    }

    /// A new subscription bound to `application_server_key` (unpadded base64url, as
    /// `GET /v1/apps/{app}/vapid` gives it), with fresh keys, as a browser makes one.
    pub fn subscribe(&self, application_server_key: &str) -> Subscription {
        let rng = SystemRandom::new();
        let secret = loop {
            let mut bytes = [0u8; 32];
            rng.fill(&mut bytes).expect("random bytes");
            if let Ok(secret) = p256::SecretKey::from_slice(&bytes) {
                break secret;
            }
        };
        let mut auth = [0u8; 16];
        rng.fill(&mut auth).expect("random bytes");
        let n = self.state.ids.fetch_add(1, Ordering::Relaxed);
        let mut id = [0u8; 12];
        rng.fill(&mut id).expect("random bytes");
        let id = format!("{n}-{}", URL_SAFE_NO_PAD.encode(id));
        let endpoint = format!("{}/push/{id}", self.origin());
        let public = secret.public_key().to_encoded_point(false);
        let subscription = Subscription {
            endpoint: endpoint.clone(),
            p256dh: URL_SAFE_NO_PAD.encode(public.as_bytes()),
            auth: URL_SAFE_NO_PAD.encode(auth),
        };
        let subscriber = Subscriber {
            endpoint,
            secret,
            auth: web_push_native::Auth::clone_from_slice(&auth),
            server_key: URL_SAFE_NO_PAD
                .decode(application_server_key.trim_end_matches('='))
                .unwrap_or_default(),
            gone: false,
        };
        lock(&self.state.subscribers).insert(id, subscriber);
        subscription
    }

    /// Ends a subscription as the browser's unsubscribe does: pushes to it get 410.
    pub fn unsubscribe(&self, endpoint: &str) {
        for s in lock(&self.state.subscribers).values_mut() {
            if s.endpoint == endpoint {
                s.gone = true;
            }
        }
    }

    /// Answers the next pushes with `replies`, in order (after their checks passed).
    pub fn script(&self, replies: impl IntoIterator<Item = WebPushReply>) {
        lock(&self.state.script).extend(replies);
    }

    /// Answers 413 to bodies longer than `bytes` (default [`WEBPUSH_MAX_BODY`]).
    pub fn set_max_body(&self, bytes: usize) {
        self.state.max_body.store(bytes, Ordering::SeqCst);
    }

    /// The pushes accepted so far.
    pub fn requests(&self) -> Vec<WebPushRequest> {
        lock(&self.state.records).clone()
    }

    /// Every request that reached the mock (refused ones too).
    pub fn request_count(&self) -> u64 {
        self.server.stats.requests.load(Ordering::SeqCst)
    }

    pub fn connections(&self) -> u64 {
        self.server.stats.connections.load(Ordering::SeqCst)
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// An answer with a short text body (push services say little).
fn reply(status: u16, text: &str) -> Response<Full<Bytes>> {
    let mut resp = Response::new(Full::new(Bytes::from(text.to_owned())));
    *resp.status_mut() = StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    resp
}

/// A refused push: the status and the text of the answer.
type Refusal = (u16, String);

/// Checks `Authorization: vapid t=<JWT>, k=<key>` for a subscription bound to
/// `server_key`; the token's claims, or the refusal.
fn check_vapid(headers: &HeaderMap, server_key: &[u8], origin: &str) -> Result<Value, Refusal> {
    let unauthorized = |why: &str| (401, format!("VAPID: {why}"));
    let value = headers
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .ok_or_else(|| unauthorized("no Authorization header"))?;
    let params = value
        .strip_prefix("vapid ")
        .ok_or_else(|| unauthorized("not the vapid scheme"))?;
    let mut token = None;
    let mut key = None;
    for param in params.split(',') {
        match param.trim().split_once('=') {
            Some(("t", v)) => token = Some(v.trim()),
            Some(("k", v)) => key = Some(v.trim()),
            _ => return Err(unauthorized("unknown parameter")),
        }
    }
    let (Some(token), Some(key)) = (token, key) else {
        return Err(unauthorized("t= and k= are required"));
    };
    let key = URL_SAFE_NO_PAD
        .decode(key.trim_end_matches('='))
        .map_err(|_| unauthorized("k is not base64url"))?;
    if key != server_key {
        // As push services do when the key differs from the subscription's
        // applicationServerKey.
        return Err((403, "VAPID key does not match the subscription".into()));
    }
    let jwt = Jwt::parse(token).ok_or_else(|| unauthorized("malformed JWT"))?;
    if jwt.header["alg"] != "ES256" {
        return Err(unauthorized("alg must be ES256"));
    }
    if !jwt.verify(&ECDSA_P256_SHA256_FIXED, &key) {
        return Err(unauthorized("bad signature"));
    }
    if jwt.claims["aud"].as_str() != Some(origin) {
        return Err(unauthorized("aud is not this push service's origin"));
    }
    let now = now_secs();
    match jwt.claims["exp"].as_u64() {
        Some(exp) if exp > now && exp <= now + MAX_VAPID_LIFETIME_SECS => {}
        _ => return Err(unauthorized("exp missing, past or more than 24 h ahead")),
    }
    let sub = jwt.claims["sub"].as_str().unwrap_or_default();
    if !(sub.starts_with("mailto:") || sub.starts_with("https://")) {
        return Err(unauthorized("sub must be a mailto: or https: URL"));
    }
    Ok(jwt.claims)
}

/// `TTL` (required), `Content-Encoding: aes128gcm`, `Urgency` and `Topic` (RFC 8030 §5).
fn check_headers(headers: &HeaderMap) -> Result<(), Refusal> {
    let get = |name: &str| headers.get(name).and_then(|v| v.to_str().ok());
    if get("ttl").and_then(|t| t.parse::<u64>().ok()).is_none() {
        return Err((400, "TTL header missing or not a number".into()));
    }
    if get("content-encoding") != Some("aes128gcm") {
        return Err((415, "Content-Encoding must be aes128gcm".into()));
    }
    if let Some(urgency) = get("urgency") {
        if !matches!(urgency, "very-low" | "low" | "normal" | "high") {
            return Err((400, "bad Urgency".into()));
        }
    }
    if let Some(topic) = get("topic") {
        let base64url = topic
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_');
        if topic.is_empty() || topic.len() > 32 || !base64url {
            return Err((400, "Topic must be 1-32 base64url characters".into()));
        }
    }
    Ok(())
}

async fn handle(state: &State, info: ConnInfo, req: Request<Incoming>) -> Response<Full<Bytes>> {
    if req.method() != Method::POST {
        return reply(405, "method not allowed");
    }
    let Some(id) = req.uri().path().strip_prefix("/push/").map(str::to_owned) else {
        return reply(404, "no such subscription");
    };
    let headers = req.headers().clone();
    // The VAPID audience is the origin of the endpoint the client used.
    let authority = req
        .uri()
        .authority()
        .map(|a| a.as_str().to_owned())
        .or_else(|| {
            headers
                .get("host")
                .and_then(|h| h.to_str().ok())
                .map(str::to_owned)
        })
        .unwrap_or_default();
    let limit = state.max_body.load(Ordering::SeqCst);
    let body = match Limited::new(req.into_body(), 64 * 1024).collect().await {
        Ok(b) => b.to_bytes(),
        Err(_) => return reply(413, "payload too large"),
    };
    let origin = format!("https://{authority}");
    let (endpoint, secret, auth, server_key) = {
        let subscribers = lock(&state.subscribers);
        let Some(s) = subscribers.get(&id) else {
            return reply(404, "no such subscription");
        };
        if s.gone {
            return reply(410, "subscription expired");
        }
        (
            s.endpoint.clone(),
            s.secret.clone(),
            s.auth,
            s.server_key.clone(),
        )
    };
    let claims = match check_vapid(&headers, &server_key, &origin) {
        Ok(claims) => claims,
        Err((status, text)) => return reply(status, &text),
    };
    if let Err((status, text)) = check_headers(&headers) {
        return reply(status, &text);
    }
    if body.len() > limit {
        return reply(413, "payload too large");
    }
    let Ok(plaintext) = web_push_native::decrypt(body.to_vec(), &secret, &auth) else {
        return reply(400, "cannot decrypt the message (aes128gcm)");
    };
    lock(&state.records).push(WebPushRequest {
        endpoint,
        headers,
        body_len: body.len(),
        plaintext,
        vapid_claims: claims,
        connection: info.id,
    });
    let scripted = lock(&state.script).pop_front();
    match scripted.unwrap_or(WebPushReply::Created) {
        WebPushReply::Created => {
            let n = state.ids.fetch_add(1, Ordering::Relaxed);
            let mut resp = reply(201, "");
            resp.headers_mut().insert(
                "location",
                format!("{origin}/message/{n}").parse().expect("header"),
            );
            resp
        }
        WebPushReply::Status {
            status,
            retry_after_secs,
        } => {
            let mut resp = reply(status, "scripted");
            if let Some(secs) = retry_after_secs {
                resp.headers_mut()
                    .insert("retry-after", secs.to_string().parse().expect("header"));
            }
            resp
        }
        WebPushReply::DropConnection => {
            info.drop_now.notify_one();
            tokio::time::sleep(Duration::from_secs(5)).await;
            reply(500, "")
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn subscriptions_look_like_a_browsers() {
        let key = VapidKeyPair::generate();
        assert!(key.private_pem.starts_with("-----BEGIN PRIVATE KEY-----"));
        assert_eq!(URL_SAFE_NO_PAD.decode(&key.public_key).unwrap().len(), 65);
        let sub = Subscription {
            endpoint: "https://127.0.0.1:1/push/x".into(),
            p256dh: "p".into(),
            auth: "a".into(),
        };
        assert_eq!(
            sub.to_json(),
            json!({"endpoint": "https://127.0.0.1:1/push/x", "expirationTime": null,
                   "keys": {"p256dh": "p", "auth": "a"}})
        );
    }

    #[test]
    fn header_checks() {
        let mut h = HeaderMap::new();
        assert_eq!(check_headers(&h).unwrap_err().0, 400);
        h.insert("ttl", "60".parse().unwrap());
        assert_eq!(check_headers(&h).unwrap_err().0, 415);
        h.insert("content-encoding", "aes128gcm".parse().unwrap());
        assert!(check_headers(&h).is_ok());
        h.insert("topic", "a/b".parse().unwrap());
        assert_eq!(check_headers(&h).unwrap_err().0, 400);
        h.insert("topic", "inbox".parse().unwrap());
        h.insert("urgency", "urgent".parse().unwrap());
        assert_eq!(check_headers(&h).unwrap_err().0, 400);
        h.insert("urgency", "low".parse().unwrap());
        assert!(check_headers(&h).is_ok());
    }
}
