//! The HTTP surface: the accept loop (HTTP/1.1 and HTTP/2, optional TLS), graceful
//! shutdown, routing, body limits, and the defences every endpoint shares: at most
//! `[server] max_connections` connections (more wait in the listen queue; logged when
//! reached), `header_read_timeout_seconds` for a request's headers (slowloris, and an
//! HTTP/1.1 keep-alive connection between requests), `idle_timeout_seconds` for a
//! connection with no request in flight and no traffic (HTTP/2 too), and failed logins
//! throttled per client address and user ([`crate::domain::throttle`]; 429 with
//! `Retry-After`). The client address is the peer's, or behind a `trusted_proxies` peer
//! the one `X-Forwarded-For` names. Handlers live in one module per endpoint group;
//! [`error`] is the only place errors become responses.
//!
//! | Method | Path | Auth | Module |
//! |---|---|---|---|
//! | PUT, POST | `/preliminary/http-notify/v1/notify` | Basic (`[notify]`) | [`notify`] |
//! | POST | `/v1/notify/batch`, `/preliminary/http-notify/v1/notify/batch` | Basic (`[notify]`) | [`notify`] |
//! | PUT, GET | `/v1/devices` | Basic or Bearer (user's mail login) | [`devices`] |
//! | DELETE | `/v1/devices/{token}` | Basic or Bearer (user's mail login) | [`devices`] |
//! | GET | `/v1/apps/{app}/vapid` | Basic or Bearer (user's mail login) | [`devices`] |
//! | GET | `/v1/status/subscriptions[?user=U]` | Bearer (`[admin] token`) | [`status`] |
//! | GET | `/v1/status/credentials` | Bearer (`[admin] token`) | [`status`] |
//! | GET | `/v1/status/drift[?user=U]` | Bearer (`[admin] token`) | [`status`] |
//! | GET | `/metrics` | Bearer (`[admin] token`) | [`status`] |
//! | GET | `/healthz` | none; answers only `{"status":"ok"}` | [`status`] |

pub mod auth;
pub mod devices;
pub mod error;
pub mod notify;
pub mod status;

use std::collections::HashMap;
use std::convert::Infallible;
use std::net::IpAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Limited};
use hyper::body::Incoming;
use hyper::header::CONTENT_LENGTH;
use hyper::service::service_fn;
use hyper::{Method, Request};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::GracefulShutdown;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpListener;
use tokio::sync::{watch, Semaphore};
use tokio_rustls::TlsAcceptor;

use crate::config::{Secret, ServerConfig};
use crate::domain::credential_watch::CredentialWatch;
use crate::domain::ingest::Ingest;
use crate::domain::registry::Registry;
use crate::domain::resync::SubscriptionDirectory;
use crate::domain::store::Store;
use crate::domain::throttle::LoginThrottle;
use crate::telemetry::Metrics;
use error::{ApiError, HttpResponse};

/// How long open connections get to finish after shutdown starts.
pub const SHUTDOWN_GRACE: Duration = Duration::from_secs(10);
/// Bound on a TLS handshake.
pub const TLS_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// What the handlers share.
pub struct AppState {
    pub notify_user: String,
    pub notify_password: Secret,
    pub admin_token: Secret,
    pub ingest: Ingest,
    pub registry: Registry,
    pub store: Arc<dyn Store>,
    pub metrics: Arc<Metrics>,
    /// Timeouts, connection limit, trusted proxies.
    pub server: ServerConfig,
    pub throttle: LoginThrottle,
    /// `[dovecot] oauth_user_claim`: names the user of a bearer request without `?user=`.
    pub oauth_user_claim: String,
    /// Certificate expiries and provider rejections, for `/v1/status/credentials`.
    pub credentials: Arc<CredentialWatch>,
    /// Every user's subscription METADATA, for `/v1/status/drift` (none configured: 503).
    pub directory: Option<Arc<dyn SubscriptionDirectory>>,
    /// App id → VAPID public key, for the apps with Web Push.
    pub vapid_keys: HashMap<String, String>,
}

/// A connection's traffic, for the idle timeout: when it last read or wrote (ms since it
/// was accepted) and how many of its requests are being answered.
#[derive(Default)]
struct Activity {
    last_ms: AtomicU64,
    in_flight: AtomicUsize,
    started: std::sync::OnceLock<tokio::time::Instant>,
}

impl Activity {
    fn touch(&self) {
        let started = *self.started.get_or_init(tokio::time::Instant::now);
        let ms = started.elapsed().as_millis() as u64;
        self.last_ms.store(ms, Ordering::Relaxed);
    }

    /// Resolves once the connection has been idle for `idle` with nothing in flight.
    async fn idle(&self, idle: Duration) {
        let started = *self.started.get_or_init(tokio::time::Instant::now);
        loop {
            let last = started + Duration::from_millis(self.last_ms.load(Ordering::Relaxed));
            let quiet_until = last + idle;
            if tokio::time::Instant::now() >= quiet_until
                && self.in_flight.load(Ordering::Acquire) == 0
            {
                return;
            }
            tokio::time::sleep_until(quiet_until.max(tokio::time::Instant::now() + idle / 4)).await;
        }
    }
}

/// A stream that notes its traffic in an [`Activity`].
struct Tracked<S> {
    inner: S,
    activity: Arc<Activity>,
}

impl<S: AsyncRead + Unpin> AsyncRead for Tracked<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let polled = Pin::new(&mut self.inner).poll_read(cx, buf);
        if buf.filled().len() > before {
            self.activity.touch();
        }
        polled
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Tracked<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        let polled = Pin::new(&mut self.inner).poll_write(cx, data);
        if matches!(polled, Poll::Ready(Ok(n)) if n > 0) {
            self.activity.touch();
        }
        polled
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

/// Counts a request as in flight while it is answered.
struct InFlight(Arc<Activity>);

impl InFlight {
    fn new(activity: &Arc<Activity>) -> Self {
        activity.in_flight.fetch_add(1, Ordering::AcqRel);
        InFlight(activity.clone())
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Ordering::AcqRel);
        self.0.touch();
    }
}

/// Serves until `shutdown` turns true, then drains connections (bounded).
pub async fn serve(
    listener: TcpListener,
    tls: Option<TlsAcceptor>,
    state: Arc<AppState>,
    mut shutdown: watch::Receiver<bool>,
) {
    let graceful = GracefulShutdown::new();
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(state.server.header_read_timeout);
    let idle_timeout = state.server.idle_timeout;
    let connections = Arc::new(Semaphore::new(state.server.max_connections));
    let mut full_since: Option<Instant> = None;
    loop {
        // A connection slot first: at the limit, new connections wait in the listen queue
        // (and `accept` never fails for want of descriptors).
        let slot = match connections.clone().try_acquire_owned() {
            Ok(slot) => slot,
            Err(_) => {
                if full_since.is_none() {
                    full_since = Some(Instant::now());
                    state.metrics.connections_limited.inc();
                    tracing::warn!(
                        max_connections = state.server.max_connections,
                        "Connection limit reached: new connections wait until others close \
                         ([server] max_connections)."
                    );
                }
                tokio::select! {
                    slot = connections.clone().acquire_owned() => match slot {
                        Ok(slot) => slot,
                        Err(_) => break,
                    },
                    _ = shutdown.changed() => break,
                }
            }
        };
        if let Some(since) = full_since.take() {
            tracing::info!(
                waited_ms = since.elapsed().as_millis() as u64,
                "Below the connection limit again."
            );
        }
        let (tcp, peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(e) => {
                    tracing::warn!(error = %e, "Accept failed.");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            _ = shutdown.changed() => break,
        };
        let _ = tcp.set_nodelay(true);
        let activity = Arc::new(Activity::default());
        activity.touch();
        let state = state.clone();
        let requests = activity.clone();
        let service = service_fn(move |req| {
            let state = state.clone();
            let in_flight = InFlight::new(&requests);
            async move {
                let response = route(&state, req, peer.ip()).await;
                drop(in_flight);
                Ok::<_, Infallible>(response)
            }
        });
        let builder = builder.clone();
        let watcher = graceful.watcher();
        let tls = tls.clone();
        tokio::spawn(async move {
            let _slot = slot;
            let served = async {
                match tls {
                    None => {
                        let tracked = Tracked {
                            inner: tcp,
                            activity: activity.clone(),
                        };
                        let conn = builder.serve_connection(TokioIo::new(tracked), service);
                        let _ = watcher.watch(conn).await;
                    }
                    Some(acceptor) => {
                        let stream =
                            match tokio::time::timeout(TLS_HANDSHAKE_TIMEOUT, acceptor.accept(tcp))
                                .await
                            {
                                Ok(Ok(s)) => s,
                                Ok(Err(e)) => {
                                    tracing::debug!(error = %e, "TLS handshake failed.");
                                    return;
                                }
                                Err(_) => return,
                            };
                        let tracked = Tracked {
                            inner: stream,
                            activity: activity.clone(),
                        };
                        let conn = builder.serve_connection(TokioIo::new(tracked), service);
                        let _ = watcher.watch(conn).await;
                    }
                }
            };
            // An idle connection (nothing in flight, no traffic) is dropped, which
            // closes it.
            tokio::select! {
                _ = served => {}
                _ = activity.idle(idle_timeout) => {
                    tracing::debug!(peer = %peer, "Idle connection closed.");
                }
            }
        });
    }
    drop(listener);
    if tokio::time::timeout(SHUTDOWN_GRACE, graceful.shutdown())
        .await
        .is_err()
    {
        tracing::warn!("Connections still open after the shutdown grace period.");
    }
}

/// Dispatches one request from a connection whose peer is `peer`.
pub async fn route(state: &AppState, req: Request<Incoming>, peer: IpAddr) -> HttpResponse {
    let started = Instant::now();
    let client = state.server.client_address(
        peer,
        req.headers()
            .get("x-forwarded-for")
            .and_then(|v| v.to_str().ok()),
    );
    // A clone of the URI shares its buffer: no copy of the path per request.
    let uri = req.uri().clone();
    let method = req.method().clone();
    // Logins are throttled per client address, and on the device API per user too.
    let authenticated = uri.path() != "/healthz";
    let user = (uri.path().starts_with("/v1/devices") || uri.path().starts_with("/v1/apps/"))
        .then(|| {
            auth::device_login(req.headers(), uri.query(), &state.oauth_user_claim)
                .and_then(Result::ok)
                .map(|(user, _)| user)
        })
        .flatten();
    if authenticated {
        if let Err(wait) = state
            .throttle
            .check(Some(client), user.as_deref(), Instant::now())
        {
            state.metrics.login_throttled.inc();
            tracing::info!(client = %client, user = ?user, wait_s = wait.as_secs(), "Throttled after failed logins.");
            return ApiError::too_many_failed_logins(wait).into_response();
        }
    }
    let result = match (method, uri.path()) {
        (Method::PUT | Method::POST, notify::PATH) => notify::handle(state, req, started).await,
        (_, notify::PATH) => Err(ApiError::method_not_allowed("PUT, POST")),
        (Method::POST, "/v1/notify/batch" | "/preliminary/http-notify/v1/notify/batch") => {
            notify::handle_batch(state, req, started).await
        }
        (_, "/v1/notify/batch" | "/preliminary/http-notify/v1/notify/batch") => {
            Err(ApiError::method_not_allowed("POST"))
        }
        (Method::PUT, "/v1/devices") => devices::register(state, req, client).await,
        (Method::GET, "/v1/devices") => devices::list(state, req, client).await,
        (_, "/v1/devices") => Err(ApiError::method_not_allowed("GET, PUT")),
        (m, p) if p.starts_with("/v1/devices/") => {
            if m == Method::DELETE {
                devices::remove(state, req, &p["/v1/devices/".len()..], client).await
            } else {
                Err(ApiError::method_not_allowed("DELETE"))
            }
        }
        (m, p) if p.starts_with("/v1/apps/") => match vapid_app(&p["/v1/apps/".len()..]) {
            Some(app) if m == Method::GET => devices::vapid_key(state, req, app, client).await,
            Some(_) => Err(ApiError::method_not_allowed("GET")),
            None => Err(ApiError::not_found()),
        },
        (Method::GET, "/v1/status/subscriptions") => status::subscriptions(state, req).await,
        (Method::GET, "/v1/status/credentials") => status::credentials(state, req).await,
        (Method::GET, "/v1/status/drift") => status::drift(state, req).await,
        (Method::GET, "/metrics") => status::metrics(state, req).await,
        (Method::GET, "/healthz") => Ok(status::healthz()),
        (
            _,
            "/v1/status/subscriptions"
            | "/v1/status/credentials"
            | "/v1/status/drift"
            | "/metrics"
            | "/healthz",
        ) => Err(ApiError::method_not_allowed("GET")),
        _ => Err(ApiError::not_found()),
    };
    match &result {
        Err(e) if e.status == hyper::StatusCode::UNAUTHORIZED => {
            state
                .throttle
                .failed(Some(client), user.as_deref(), Instant::now());
        }
        Ok(_) => {
            if let Some(user) = &user {
                state.throttle.succeeded(user);
            }
        }
        Err(_) => {}
    }
    result.unwrap_or_else(ApiError::into_response)
}

/// The `{app}` of `/v1/apps/{app}/vapid`, given the path after `/v1/apps/`.
fn vapid_app(rest: &str) -> Option<&str> {
    rest.strip_suffix("/vapid")
        .filter(|app| !app.is_empty() && !app.contains('/'))
}

/// Reads a whole body of at most `limit` bytes (413 beyond).
pub async fn read_body(req: Request<Incoming>, limit: usize) -> Result<Bytes, ApiError> {
    let declared = req
        .headers()
        .get(CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|n| n > limit as u64) {
        return Err(ApiError::payload_too_large(limit));
    }
    match Limited::new(req.into_body(), limit).collect().await {
        Ok(collected) => Ok(collected.to_bytes()),
        Err(e) if e.is::<http_body_util::LengthLimitError>() => {
            Err(ApiError::payload_too_large(limit))
        }
        Err(_) => Err(ApiError::new(
            hyper::StatusCode::BAD_REQUEST,
            "cannot read the request body",
        )),
    }
}

/// Strict percent-decoding of a URL path segment or query value (`+` stays `+`): a `%`
/// not followed by two hex digits, or bytes that are not UTF-8, give `None` (the
/// `percent-encoding` crate would pass a malformed escape through as it is).
pub fn percent_decode(s: &str) -> Option<String> {
    let well_formed = s.split('%').skip(1).all(|escape| {
        escape
            .as_bytes()
            .get(..2)
            .is_some_and(|h| h.iter().all(u8::is_ascii_hexdigit))
    });
    if !well_formed {
        return None;
    }
    percent_encoding::percent_decode_str(s)
        .decode_utf8()
        .ok()
        .map(|decoded| decoded.into_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percent_decoding() {
        assert_eq!(percent_decode("a%40b.c").as_deref(), Some("a@b.c"));
        assert_eq!(percent_decode("a+b").as_deref(), Some("a+b"));
        assert_eq!(percent_decode("%zz"), None);
        assert_eq!(percent_decode("%4"), None);
        assert_eq!(percent_decode("%ff"), None);
    }
}
