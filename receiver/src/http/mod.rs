//! The HTTP surface: the accept loop (HTTP/1.1 and HTTP/2, optional TLS), graceful
//! shutdown, routing, and body limits. Handlers live in one module per endpoint group;
//! [`error`] is the only place errors become responses.
//!
//! | Method | Path | Auth | Module |
//! |---|---|---|---|
//! | PUT, POST | `/preliminary/http-notify/v1/notify` | Basic (`[notify]`) | [`notify`] |
//! | PUT, GET | `/v1/devices` | Basic (user's mail login) | [`devices`] |
//! | DELETE | `/v1/devices/{token}` | Basic (user's mail login) | [`devices`] |
//! | GET | `/v1/status/subscriptions[?user=U]` | Bearer (`[admin] token`) | [`status`] |
//! | GET | `/metrics` | Bearer (`[admin] token`) | [`status`] |
//! | GET | `/healthz` | none; answers only `{"status":"ok"}` | [`status`] |

pub mod auth;
pub mod devices;
pub mod error;
pub mod notify;
pub mod status;

use std::convert::Infallible;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Limited};
use hyper::body::Incoming;
use hyper::header::CONTENT_LENGTH;
use hyper::service::service_fn;
use hyper::{Method, Request};
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::GracefulShutdown;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio_rustls::TlsAcceptor;

use crate::config::Secret;
use crate::domain::ingest::Ingest;
use crate::domain::registry::Registry;
use crate::store::Store;
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
}

/// Serves until `shutdown` turns true, then drains connections (bounded).
pub async fn serve(
    listener: TcpListener,
    tls: Option<TlsAcceptor>,
    state: Arc<AppState>,
    mut shutdown: watch::Receiver<bool>,
) {
    let graceful = GracefulShutdown::new();
    let builder = auto::Builder::new(TokioExecutor::new());
    loop {
        let (tcp, _peer) = tokio::select! {
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
        let state = state.clone();
        let service = service_fn(move |req| {
            let state = state.clone();
            async move { Ok::<_, Infallible>(route(&state, req).await) }
        });
        let builder = builder.clone();
        let watcher = graceful.watcher();
        let tls = tls.clone();
        tokio::spawn(async move {
            match tls {
                None => {
                    let conn = builder.serve_connection(TokioIo::new(tcp), service);
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
                    let conn = builder.serve_connection(TokioIo::new(stream), service);
                    let _ = watcher.watch(conn).await;
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

/// Dispatches one request.
pub async fn route(state: &AppState, req: Request<Incoming>) -> HttpResponse {
    let started = Instant::now();
    // A clone of the URI shares its buffer: no copy of the path per request.
    let uri = req.uri().clone();
    let method = req.method().clone();
    let result = match (method, uri.path()) {
        (Method::PUT | Method::POST, notify::PATH) => notify::handle(state, req, started).await,
        (_, notify::PATH) => Err(ApiError::method_not_allowed("PUT, POST")),
        (Method::PUT, "/v1/devices") => devices::register(state, req).await,
        (Method::GET, "/v1/devices") => devices::list(state, req).await,
        (_, "/v1/devices") => Err(ApiError::method_not_allowed("GET, PUT")),
        (m, p) if p.starts_with("/v1/devices/") => {
            if m == Method::DELETE {
                devices::remove(state, req, &p["/v1/devices/".len()..]).await
            } else {
                Err(ApiError::method_not_allowed("DELETE"))
            }
        }
        (Method::GET, "/v1/status/subscriptions") => status::subscriptions(state, req).await,
        (Method::GET, "/metrics") => status::metrics(state, req).await,
        (Method::GET, "/healthz") => Ok(status::healthz()),
        (_, "/v1/status/subscriptions" | "/metrics" | "/healthz") => {
            Err(ApiError::method_not_allowed("GET"))
        }
        _ => Err(ApiError::not_found()),
    };
    result.unwrap_or_else(ApiError::into_response)
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

/// Strict percent-decoding of a URL path segment or query value (`+` stays `+`).
pub fn percent_decode(s: &str) -> Option<String> {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hex = s.get(i + 1..i + 3)?;
            out.push(u8::from_str_radix(hex, 16).ok()?);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(out).ok()
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
