//! Mock FCM HTTP v1 plus its OAuth2 token endpoint on one listener (TLS from the test PKI, or
//! plain HTTP). `/token` verifies the RS256 JWT-bearer assertion against the test service
//! account's key; `/v1/projects/<id>/messages:send` checks the bearer and the message and
//! answers with Google's real error JSON shapes. Records requests, counts token mints.

use std::collections::{HashSet, VecDeque};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use hyper::header::HeaderMap;
use hyper::{Method, Request, Response, StatusCode};
use ring::signature::{KeyPair, RsaKeyPair, RSA_PKCS1_2048_8192_SHA256};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::PrivatePkcs8KeyDer;
use serde_json::{json, Value};

use crate::jwt::{now_secs, Jwt};
use crate::pki::TestPki;
use crate::server::{self, ConnInfo, Handler, Server};

/// The committed test-only RSA key of the mock service account (see fixtures/README.md).
pub const TEST_ONLY_SERVICE_ACCOUNT_KEY: &str =
    include_str!("../fixtures/TEST-ONLY-fcm-service-account-rsa2048.pem");
/// `client_email` of the mock service account.
pub const TEST_CLIENT_EMAIL: &str = "dovepush-test@mock-project.iam.gserviceaccount.com";
const SCOPE: &str = "https://www.googleapis.com/auth/firebase.messaging";

/// A scripted answer to a send.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FcmReply {
    /// 200 `{"name": "projects/<id>/messages/<n>"}`.
    Ok,
    /// Google error JSON: HTTP status, canonical status, optional FcmError `errorCode`,
    /// message, optional `Retry-After`, optional BadRequest field violation.
    Error {
        http: u16,
        status: String,
        error_code: Option<String>,
        message: String,
        retry_after_secs: Option<u64>,
        field_violation: Option<String>,
    },
    /// Close the connection without answering.
    DropConnection,
}

impl FcmReply {
    pub fn error(http: u16, status: &str, error_code: Option<&str>, message: &str) -> Self {
        FcmReply::Error {
            http,
            status: status.to_owned(),
            error_code: error_code.map(str::to_owned),
            message: message.to_owned(),
            retry_after_secs: None,
            field_violation: None,
        }
    }
}

/// One accepted send.
#[derive(Debug, Clone)]
pub struct FcmRequest {
    pub headers: HeaderMap,
    pub body: Value,
    pub connection: u64,
}

impl FcmRequest {
    pub fn message(&self) -> &Value {
        &self.body["message"]
    }
}

struct State {
    project_id: String,
    public_key: Vec<u8>,
    token_uri: OnceLock<String>,
    issued: Mutex<HashSet<String>>,
    mints: AtomicU64,
    reject_access_tokens: AtomicBool,
    token_endpoint_failure: Mutex<Option<(u16, String)>>,
    script: Mutex<VecDeque<FcmReply>>,
    records: Mutex<Vec<FcmRequest>>,
    ids: AtomicU64,
}

/// A running mock FCM; stops when dropped.
pub struct MockFcm {
    server: Server,
    state: Arc<State>,
    scheme: &'static str,
}

impl MockFcm {
    /// Starts on `127.0.0.1:0`: HTTPS (ALPN h2, http/1.1) when `pki` is given, else plain HTTP.
    pub async fn start(pki: Option<&TestPki>, project_id: &str) -> std::io::Result<Self> {
        let der = PrivatePkcs8KeyDer::from_pem_slice(TEST_ONLY_SERVICE_ACCOUNT_KEY.as_bytes())
            .expect("fixture key is PKCS#8 PEM");
        let key = RsaKeyPair::from_pkcs8(der.secret_pkcs8_der()).expect("fixture key is RSA");
        let state = Arc::new(State {
            project_id: project_id.to_owned(),
            public_key: key.public_key().as_ref().to_vec(),
            token_uri: OnceLock::new(),
            issued: Mutex::default(),
            mints: AtomicU64::new(0),
            reject_access_tokens: AtomicBool::new(false),
            token_endpoint_failure: Mutex::default(),
            script: Mutex::default(),
            records: Mutex::default(),
            ids: AtomicU64::new(0),
        });
        let handler_state = state.clone();
        let handler: Handler = Arc::new(move |info, req| {
            let state = handler_state.clone();
            Box::pin(async move { handle(&state, info, req).await })
        });
        let tls = pki.map(|p| p.server_config(&[b"h2", b"http/1.1"], false));
        let scheme = if tls.is_some() { "https" } else { "http" };
        let server = server::spawn(tls, 1000, handler).await?;
        let mock = MockFcm {
            server,
            state,
            scheme,
        };
        let _ = mock.state.token_uri.set(format!("{}/token", mock.url()));
        Ok(mock)
    }

    /// Base URL for `[apps.fcm] endpoint`.
    pub fn url(&self) -> String {
        format!("{}://127.0.0.1:{}", self.scheme, self.server.addr.port())
    }

    pub fn port(&self) -> u16 {
        self.server.addr.port()
    }

    /// A service-account JSON whose `token_uri` is this mock's token endpoint.
    pub fn service_account_json(&self) -> String {
        json!({
            "type": "service_account",
            "project_id": self.state.project_id,
            "private_key_id": "0123456789abcdef0123456789abcdef01234567",
            "private_key": TEST_ONLY_SERVICE_ACCOUNT_KEY,
            "client_email": TEST_CLIENT_EMAIL,
            "client_id": "100000000000000000000",
            "token_uri": self.state.token_uri.get().cloned().unwrap_or_default(),
        })
        .to_string()
    }

    pub fn script(&self, replies: impl IntoIterator<Item = FcmReply>) {
        lock(&self.state.script).extend(replies);
    }

    /// Makes every access token fail (401 UNAUTHENTICATED), or stops doing so.
    pub fn reject_access_tokens(&self, on: bool) {
        self.state.reject_access_tokens.store(on, Ordering::SeqCst);
    }

    /// Forgets every issued access token: the next send with an old one gets 401.
    pub fn revoke_access_tokens(&self) {
        lock(&self.state.issued).clear();
    }

    /// Makes the token endpoint answer `status` with OAuth error `error`, or work again.
    pub fn fail_token_endpoint(&self, failure: Option<(u16, &str)>) {
        *lock(&self.state.token_endpoint_failure) = failure.map(|(s, e)| (s, e.to_owned()));
    }

    /// Access tokens issued so far.
    pub fn token_mints(&self) -> u64 {
        self.state.mints.load(Ordering::SeqCst)
    }

    pub fn requests(&self) -> Vec<FcmRequest> {
        lock(&self.state.records).clone()
    }

    pub fn connections(&self) -> u64 {
        self.server.stats.connections.load(Ordering::SeqCst)
    }

    pub fn request_count(&self) -> u64 {
        self.server.stats.requests.load(Ordering::SeqCst)
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

fn json_response(status: u16, body: Value) -> Response<Full<Bytes>> {
    let mut resp = Response::new(Full::new(Bytes::from(body.to_string())));
    *resp.status_mut() = StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    resp.headers_mut().insert(
        "content-type",
        "application/json; charset=UTF-8".parse().expect("header"),
    );
    resp
}

fn google_error(reply: &FcmReply) -> Response<Full<Bytes>> {
    let FcmReply::Error {
        http,
        status,
        error_code,
        message,
        retry_after_secs,
        field_violation,
    } = reply
    else {
        return json_response(500, json!({}));
    };
    let mut details = Vec::new();
    if let Some(code) = error_code {
        details.push(json!({
            "@type": "type.googleapis.com/google.firebase.fcm.v1.FcmError",
            "errorCode": code,
        }));
    }
    if let Some(field) = field_violation {
        details.push(json!({
            "@type": "type.googleapis.com/google.rpc.BadRequest",
            "fieldViolations": [{"field": field, "description": message}],
        }));
    }
    let mut error = json!({"code": http, "message": message, "status": status});
    if !details.is_empty() {
        error["details"] = Value::Array(details);
    }
    let mut resp = json_response(*http, json!({ "error": error }));
    if let Some(secs) = retry_after_secs {
        resp.headers_mut()
            .insert("retry-after", secs.to_string().parse().expect("header"));
    }
    resp
}

async fn handle(state: &State, info: ConnInfo, req: Request<Incoming>) -> Response<Full<Bytes>> {
    if req.method() != Method::POST {
        return google_error(&FcmReply::error(
            405,
            "METHOD_NOT_ALLOWED",
            None,
            "Method not allowed.",
        ));
    }
    let path = req.uri().path().to_owned();
    let headers = req.headers().clone();
    let body = match Limited::new(req.into_body(), 256 * 1024).collect().await {
        Ok(b) => b.to_bytes(),
        Err(_) => {
            return google_error(&FcmReply::error(
                413,
                "INVALID_ARGUMENT",
                None,
                "Request too large.",
            ))
        }
    };
    if path == "/token" {
        return token_endpoint(state, &body);
    }
    let expected = format!("/v1/projects/{}/messages:send", state.project_id);
    if path != expected {
        return google_error(&FcmReply::error(
            404,
            "NOT_FOUND",
            None,
            "Requested entity was not found.",
        ));
    }
    let bearer = headers
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "));
    let authorised = bearer.is_some_and(|b| lock(&state.issued).contains(b))
        && !state.reject_access_tokens.load(Ordering::SeqCst);
    if !authorised {
        return google_error(&FcmReply::error(
            401,
            "UNAUTHENTICATED",
            None,
            "Request had invalid authentication credentials. Expected OAuth 2 access token, login cookie or other valid authentication credential.",
        ));
    }
    let Ok(body) = serde_json::from_slice::<Value>(&body) else {
        return google_error(&FcmReply::error(
            400,
            "INVALID_ARGUMENT",
            None,
            "Invalid JSON payload received.",
        ));
    };
    if let Err(message) = check_message(&body["message"]) {
        return google_error(&FcmReply::error(400, "INVALID_ARGUMENT", None, &message));
    }
    let token = body["message"]["token"]
        .as_str()
        .unwrap_or_default()
        .to_owned();
    lock(&state.records).push(FcmRequest {
        headers,
        body,
        connection: info.id,
    });
    let reply = lock(&state.script)
        .pop_front()
        .unwrap_or_else(|| by_prefix(&token));
    match reply {
        FcmReply::Ok => {
            let n = state.ids.fetch_add(1, Ordering::Relaxed);
            json_response(
                200,
                json!({"name": format!("projects/{}/messages/0:{n}", state.project_id)}),
            )
        }
        FcmReply::DropConnection => {
            info.drop_now.notify_one();
            tokio::time::sleep(Duration::from_secs(5)).await;
            json_response(500, json!({}))
        }
        error => google_error(&error),
    }
}

/// Checks the v1 message like FCM: one token, string data values, valid android block,
/// payload (data + notification) at most 4096 bytes.
fn check_message(m: &Value) -> Result<(), String> {
    if !m.is_object() {
        return Err("Invalid value at 'message'".into());
    }
    if m["token"].as_str().is_none_or(str::is_empty) {
        return Err("Recipient of the message is not set.".into());
    }
    if let Some(data) = m.get("data") {
        let Some(map) = data.as_object() else {
            return Err("Invalid value at 'message.data'".into());
        };
        if let Some((i, _)) = map.iter().enumerate().find(|(_, (_, v))| !v.is_string()) {
            return Err(format!(
                "Invalid value at 'message.data[{i}].value' (TYPE_STRING)"
            ));
        }
    }
    if let Some(android) = m.get("android") {
        if let Some(p) = android.get("priority") {
            if !matches!(p.as_str(), Some("NORMAL" | "HIGH")) {
                return Err("Invalid value at 'message.android.priority'".into());
            }
        }
        if let Some(ttl) = android.get("ttl") {
            let ok = ttl
                .as_str()
                .and_then(|t| t.strip_suffix('s'))
                .and_then(|n| n.parse::<u64>().ok())
                .is_some_and(|n| n <= 2_419_200);
            if !ok {
                return Err("Invalid value at 'message.android.ttl'".into());
            }
        }
    }
    let size = m.get("data").map_or(0, |d| d.to_string().len())
        + m.get("notification").map_or(0, |n| n.to_string().len());
    if size > 4096 {
        return Err("Message is too big".into());
    }
    Ok(())
}

/// Built-in answers by registration-token prefix when the script is empty.
///
/// `unregistered…` 404 UNREGISTERED · `invalid…` 400 INVALID_ARGUMENT naming the token ·
/// `quota…` 429 QUOTA_EXCEEDED (Retry-After 9) · `unavailable…` 503 UNAVAILABLE (Retry-After 4) ·
/// `internal…` 500 INTERNAL · `mismatch…` 403 SENDER_ID_MISMATCH · `thirdparty…` 401
/// THIRD_PARTY_AUTH_ERROR · `cut…` drop the connection · anything else 200.
fn by_prefix(token: &str) -> FcmReply {
    let with_retry = |http, status: &str, code: &str, secs| FcmReply::Error {
        http,
        status: status.to_owned(),
        error_code: Some(code.to_owned()),
        message: format!("{code} (mock)"),
        retry_after_secs: Some(secs),
        field_violation: None,
    };
    if token.starts_with("unregistered") {
        FcmReply::error(
            404,
            "NOT_FOUND",
            Some("UNREGISTERED"),
            "Requested entity was not found.",
        )
    } else if token.starts_with("invalid") {
        FcmReply::Error {
            http: 400,
            status: "INVALID_ARGUMENT".into(),
            error_code: Some("INVALID_ARGUMENT".into()),
            message: "The registration token is not a valid FCM registration token".into(),
            retry_after_secs: None,
            field_violation: Some("message.token".into()),
        }
    } else if token.starts_with("quota") {
        with_retry(429, "RESOURCE_EXHAUSTED", "QUOTA_EXCEEDED", 9)
    } else if token.starts_with("unavailable") {
        with_retry(503, "UNAVAILABLE", "UNAVAILABLE", 4)
    } else if token.starts_with("internal") {
        FcmReply::error(
            500,
            "INTERNAL",
            Some("INTERNAL"),
            "Internal error encountered.",
        )
    } else if token.starts_with("mismatch") {
        FcmReply::error(
            403,
            "PERMISSION_DENIED",
            Some("SENDER_ID_MISMATCH"),
            "SenderId mismatch",
        )
    } else if token.starts_with("thirdparty") {
        FcmReply::error(
            401,
            "UNAUTHENTICATED",
            Some("THIRD_PARTY_AUTH_ERROR"),
            "Auth error from APNS or Web Push Service",
        )
    } else if token.starts_with("cut") {
        FcmReply::DropConnection
    } else {
        FcmReply::Ok
    }
}

fn oauth_error(status: u16, error: &str, description: &str) -> Response<Full<Bytes>> {
    json_response(
        status,
        json!({"error": error, "error_description": description}),
    )
}

/// The OAuth2 JWT-bearer grant, verified like Google's token endpoint.
fn token_endpoint(state: &State, body: &[u8]) -> Response<Full<Bytes>> {
    if let Some((status, error)) = lock(&state.token_endpoint_failure).clone() {
        return oauth_error(status, &error, "scripted failure (mock)");
    }
    let form = parse_form(body);
    let field = |name: &str| {
        form.iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    };
    if field("grant_type") != Some("urn:ietf:params:oauth:grant-type:jwt-bearer") {
        return oauth_error(400, "unsupported_grant_type", "Invalid grant_type");
    }
    let Some(jwt) = field("assertion").and_then(Jwt::parse) else {
        return oauth_error(400, "invalid_grant", "Invalid JWT: malformed");
    };
    if jwt.header["alg"] != "RS256" {
        return oauth_error(400, "invalid_grant", "Invalid JWT: alg must be RS256");
    }
    if !jwt.verify(&RSA_PKCS1_2048_8192_SHA256, &state.public_key) {
        return oauth_error(400, "invalid_grant", "Invalid JWT Signature.");
    }
    let c = &jwt.claims;
    if c["iss"].as_str() != Some(TEST_CLIENT_EMAIL) {
        return oauth_error(400, "invalid_grant", "Invalid JWT: unknown issuer");
    }
    if c["aud"].as_str() != state.token_uri.get().map(String::as_str) {
        return oauth_error(
            400,
            "invalid_grant",
            "Invalid JWT: audience is not the token URI",
        );
    }
    let scopes = c["scope"].as_str().unwrap_or_default();
    if !scopes
        .split(' ')
        .any(|s| s == SCOPE || s == "https://www.googleapis.com/auth/cloud-platform")
    {
        return oauth_error(400, "invalid_scope", "Invalid OAuth scope");
    }
    let (Some(iat), Some(exp)) = (c["iat"].as_u64(), c["exp"].as_u64()) else {
        return oauth_error(400, "invalid_grant", "Invalid JWT: iat/exp missing");
    };
    let now = now_secs();
    if exp <= iat || exp - iat > 3600 || iat > now + 300 || exp < now {
        return oauth_error(400, "invalid_grant", "Invalid JWT: Token must be a short-lived token (60 minutes) and in a reasonable timeframe.");
    }
    let n = state.mints.fetch_add(1, Ordering::SeqCst) + 1;
    let token = format!("ya29.mock-access-token-{n}");
    lock(&state.issued).insert(token.clone());
    json_response(
        200,
        json!({"access_token": token, "expires_in": 3599, "token_type": "Bearer"}),
    )
}

fn parse_form(body: &[u8]) -> Vec<(String, String)> {
    form_urlencoded::parse(body).into_owned().collect()
}
