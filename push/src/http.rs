//! The shared HTTPS client machinery: rustls (ring) configs with the bundled roots plus an
//! optional `ca_file`, optional client certificate, a pooled hyper client, and one
//! request/response exchange with a timeout and a bounded body.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use hyper::header::HeaderMap;
use hyper::{Request, StatusCode};
use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::connect::{Connect, HttpConnector};
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioTimer};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};

use crate::model::{Device, DeviceKind};
use crate::outcome::Outcome;
use crate::webpush::{EndpointRefused, Subscription};

/// The pooled client used for APNs, FCM and the OAuth token endpoint.
pub(crate) type HttpClient = Client<HttpsConnector<HttpConnector>, Full<Bytes>>;

/// Largest response body read from APNs/FCM (their error bodies are tiny).
const MAX_RESPONSE_BODY: usize = 64 * 1024;

/// A client certificate with its private key, for APNs certificate auth.
pub(crate) struct ClientIdentity {
    pub chain: Vec<CertificateDer<'static>>,
    pub key: PrivateKeyDer<'static>,
}

/// Reads PEM trust roots; every certificate in the file is added.
pub fn read_ca_file(path: &Path) -> Result<Vec<CertificateDer<'static>>, String> {
    let certs: Vec<_> = CertificateDer::pem_file_iter(path)
        .map_err(|e| format!("cannot read PEM certificates: {e}"))?
        .collect::<Result<_, _>>()
        .map_err(|e| format!("bad PEM certificate: {e}"))?;
    if certs.is_empty() {
        return Err("no PEM certificate (BEGIN CERTIFICATE) in file".to_owned());
    }
    Ok(certs)
}

/// A rustls client config on the ring provider: Mozilla roots plus `extra_roots`, and the
/// client identity if given.
pub(crate) fn tls_config(
    extra_roots: &[CertificateDer<'static>],
    identity: Option<ClientIdentity>,
) -> Result<rustls::ClientConfig, String> {
    let mut roots = rustls::RootCertStore::empty();
    roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned());
    for cert in extra_roots {
        roots
            .add(cert.clone())
            .map_err(|e| format!("unusable trust root: {e}"))?;
    }
    let builder = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .map_err(|e| format!("TLS setup: {e}"))?
    .with_root_certificates(roots);
    match identity {
        None => Ok(builder.with_no_client_auth()),
        Some(id) => builder
            .with_client_auth_cert(id.chain, id.key)
            .map_err(|e| format!("unusable client certificate or key: {e}")),
    }
}

/// Which HTTP versions a client may speak.
#[derive(Clone, Copy, PartialEq, Eq)]
pub(crate) enum Protocols {
    /// APNs: HTTP/2 only (ALPN h2 over TLS, prior knowledge over plain http).
    Http2Only,
    /// FCM and OAuth: ALPN picks h2 or http/1.1.
    Http1And2,
}

/// Builds a pooled client. Connections live long (APNs wants hours) and are kept alive
/// with HTTP/2 PINGs.
pub(crate) fn client(tls: rustls::ClientConfig, protocols: Protocols) -> HttpClient {
    let mut http = HttpConnector::new();
    http.enforce_http(false);
    http.set_nodelay(true);
    http.set_connect_timeout(Some(Duration::from_secs(10)));
    let connector = hyper_rustls::HttpsConnectorBuilder::new()
        .with_tls_config(tls)
        .https_or_http();
    let connector = match protocols {
        Protocols::Http2Only => connector.enable_http2().wrap_connector(http),
        Protocols::Http1And2 => connector.enable_all_versions().wrap_connector(http),
    };
    let mut builder = Client::builder(TokioExecutor::new());
    builder
        .timer(TokioTimer::new())
        .pool_timer(TokioTimer::new())
        .pool_idle_timeout(Duration::from_secs(6 * 3600))
        .http2_keep_alive_interval(Duration::from_secs(10 * 60))
        .http2_keep_alive_timeout(Duration::from_secs(20))
        .http2_keep_alive_while_idle(true);
    if protocols == Protocols::Http2Only {
        builder.http2_only(true);
    }
    builder.build(connector)
}

/// A completed HTTP exchange.
pub(crate) struct Reply {
    pub status: StatusCode,
    pub headers: HeaderMap,
    pub body: Bytes,
}

/// Why no reply came back; all of these but `Refused` are worth retrying.
#[derive(Debug)]
pub(crate) enum ExchangeError {
    /// No connection could be made.
    Connect(String),
    /// The (Web Push) endpoint's host resolves only to addresses the policy refuses.
    Refused(EndpointRefused),
    /// The connection broke or the peer misbehaved mid-request.
    Connection(String),
    Timeout,
}

impl std::fmt::Display for ExchangeError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ExchangeError::Connect(e) => write!(f, "connect: {e}"),
            ExchangeError::Refused(e) => write!(f, "refused: {e}"),
            ExchangeError::Connection(e) => write!(f, "connection: {e}"),
            ExchangeError::Timeout => f.write_str("timed out"),
        }
    }
}

impl ExchangeError {
    /// The reason label used in [`crate::Outcome::Retry`].
    pub(crate) fn label(&self) -> &'static str {
        match self {
            ExchangeError::Connect(_) => "connect",
            ExchangeError::Refused(_) => "endpoint_refused",
            ExchangeError::Connection(_) => "connection",
            ExchangeError::Timeout => "timeout",
        }
    }
}

/// Sends `req` and reads the whole (bounded) reply, all within `timeout`.
pub(crate) async fn exchange(
    client: &HttpClient,
    req: Request<Full<Bytes>>,
    timeout: Duration,
) -> Result<Reply, ExchangeError> {
    exchange_bounded(client, req, timeout, MAX_RESPONSE_BODY).await
}

/// [`exchange`] on any connector, reading at most `max_body` bytes of the reply.
pub(crate) async fn exchange_bounded<C>(
    client: &Client<C, Full<Bytes>>,
    req: Request<Full<Bytes>>,
    timeout: Duration,
    max_body: usize,
) -> Result<Reply, ExchangeError>
where
    C: Connect + Clone + Send + Sync + 'static,
{
    let work = async {
        let resp = client.request(req).await.map_err(|e| {
            if let Some(refused) = source_of::<EndpointRefused>(&e) {
                ExchangeError::Refused(refused.clone())
            } else if e.is_connect() {
                ExchangeError::Connect(error_chain(&e))
            } else {
                ExchangeError::Connection(error_chain(&e))
            }
        })?;
        let (parts, body) = resp.into_parts();
        let body = Limited::new(body, max_body)
            .collect()
            .await
            .map_err(|e| ExchangeError::Connection(format!("reading response body: {e}")))?
            .to_bytes();
        Ok(Reply {
            status: parts.status,
            headers: parts.headers,
            body,
        })
    };
    match tokio::time::timeout(timeout, work).await {
        Ok(result) => result,
        Err(_) => Err(ExchangeError::Timeout),
    }
}

/// The first error of type `T` in `err`'s source chain.
fn source_of<'e, T: std::error::Error + 'static>(
    err: &'e (dyn std::error::Error + 'static),
) -> Option<&'e T> {
    let mut at = Some(err);
    while let Some(e) = at {
        if let Some(found) = e.downcast_ref::<T>() {
            return Some(found);
        }
        at = e.source();
    }
    None
}

fn error_chain(err: &dyn std::error::Error) -> String {
    let mut out = err.to_string();
    let mut source = err.source();
    while let Some(s) = source {
        out.push_str(": ");
        out.push_str(&s.to_string());
        source = s.source();
    }
    out
}

/// `Retry-After` in delta-seconds form (the form APNs and Google use).
pub(crate) fn retry_after(headers: &HeaderMap) -> Option<Duration> {
    headers
        .get(hyper::header::RETRY_AFTER)?
        .to_str()
        .ok()?
        .trim()
        .parse::<u64>()
        .ok()
        .map(Duration::from_secs)
}

/// Logs a send's outcome for `service` ("APNs", "FCM"): nothing for a delivery (the hot
/// path: not even the token hint is built), a warning for a dropped push, an error for
/// rejected credentials, a debug line for the rest.
pub(crate) fn log_outcome(service: &str, app: &str, device: &Device, outcome: &Outcome) {
    match outcome {
        Outcome::Delivered { .. } => {}
        Outcome::Drop { reason } => {
            let token = token_hint(device);
            tracing::warn!(%app, %token, %reason, "{service} push dropped")
        }
        Outcome::CredentialsRejected { reason } => {
            tracing::error!(%app, %reason, "{service} rejected our credentials")
        }
        other => {
            let token = token_hint(device);
            tracing::debug!(%app, %token, class = other.class(), reason = other.reason(), "{service} push not delivered")
        }
    }
}

/// A token shortened for logs: enough to find it in the store, not enough to use it. A
/// Web Push subscription shows its id and the endpoint's host (the rest of the URL is a
/// capability, the keys are secret).
pub(crate) fn token_hint(device: &Device) -> String {
    if device.kind == DeviceKind::WebPush {
        return match Subscription::from_token(&device.token) {
            Ok(sub) => format!("{}@{}", sub.id(), sub.host()),
            Err(_) => "(bad subscription)".to_owned(),
        };
    }
    let head: String = device.token.chars().take(8).collect();
    format!("{head}…")
}
