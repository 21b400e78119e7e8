//! The HTTP side: the clients, and what one request comes to.
//!
//! Outcomes are those of the ox driver's lib-http, per event:
//! - 2xx: delivered;
//! - connection errors, timeouts, 408, 429, 5xx: worth another try (with backoff);
//! - any other status: final, logged with the user, never retried.
//!
//! A single notification is `PUT` to the endpoint URL with `X-Dovepush-Event-Id`; a batch
//! is `POST`ed to its batch URL ([`dovepush_protocol::batch`]) and answered with one
//! result per event.

use std::sync::{Arc, OnceLock};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use hyper::{Request, StatusCode};
use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;

use dovepush_protocol::batch::{batch_url, BatchItem, BatchRequest, BatchResponse};
use dovepush_protocol::record::Record;
use dovepush_protocol::EVENT_ID_HEADER;
use dovepush_settings::Endpoint;

/// First retry delay; doubles per attempt up to [`MAX_BACKOFF`].
const FIRST_BACKOFF: Duration = Duration::from_millis(200);
const MAX_BACKOFF: Duration = Duration::from_secs(5);
/// Largest answer read (a batch answer for [`dovepush_protocol::batch::MAX_BATCH_ITEMS`]
/// events is far smaller).
const MAX_ANSWER: usize = 1024 * 1024;
const USER_AGENT: &str = concat!("dovepush/", env!("CARGO_PKG_VERSION"));

/// What one attempt came to for one event.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Attempt {
    Delivered,
    Retry(String),
    Final(String),
}

/// Sort an HTTP status into the outcome classes.
pub fn classify(status: StatusCode) -> Attempt {
    if status.is_success() {
        Attempt::Delivered
    } else if status == StatusCode::REQUEST_TIMEOUT
        || status == StatusCode::TOO_MANY_REQUESTS
        || status.is_server_error()
    {
        Attempt::Retry(format!("HTTP {status}"))
    } else {
        Attempt::Final(format!("HTTP {status}"))
    }
}

/// Delay before retry number `attempt` (0-based).
pub fn backoff(attempt: u32) -> Duration {
    FIRST_BACKOFF
        .saturating_mul(1u32 << attempt.min(16))
        .min(MAX_BACKOFF)
}

type HttpClient = Client<HttpsConnector<HttpConnector>, Full<Bytes>>;

/// A client that verifies TLS against `roots` (an empty store for the plain-HTTP one).
fn build_client(roots: rustls::RootCertStore) -> Result<HttpClient, String> {
    let tls = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .map_err(|e| format!("TLS setup failed: {e}"))?
    .with_root_certificates(roots)
    .with_no_client_auth();
    let https = hyper_rustls::HttpsConnectorBuilder::new()
        .with_tls_config(tls)
        .https_or_http()
        .enable_http1()
        .build();
    Ok(Client::builder(TokioExecutor::new())
        .pool_idle_timeout(Duration::from_secs(30))
        .pool_max_idle_per_host(64)
        .build(https))
}

/// The clients: one for `http://` receivers, and one for `https://` receivers, made at
/// the first such request from the system trust store.
pub struct Clients {
    plain: HttpClient,
    tls: OnceLock<Result<HttpClient, String>>,
}

impl Clients {
    pub fn new() -> Result<Clients, String> {
        Ok(Clients {
            plain: build_client(rustls::RootCertStore::empty())?,
            tls: OnceLock::new(),
        })
    }

    fn for_url(&self, url: &str) -> Result<&HttpClient, &str> {
        if !url.starts_with("https:") {
            return Ok(&self.plain);
        }
        let tls = self.tls.get_or_init(|| {
            let mut roots = rustls::RootCertStore::empty();
            for cert in rustls_native_certs::load_native_certs().certs {
                let _ = roots.add(cert);
            }
            build_client(roots)
        });
        tls.as_ref().map_err(String::as_str)
    }

    /// Send `body` to `url`; the status, or why there is none.
    async fn exchange(
        &self,
        endpoint: &Endpoint,
        request: hyper::http::request::Builder,
        url: &str,
        body: Bytes,
    ) -> Result<(StatusCode, Bytes), String> {
        let client = self.for_url(url).map_err(str::to_string)?;
        let mut request = request
            .uri(url)
            .header("content-type", "application/json; charset=utf-8")
            .header("user-agent", USER_AGENT);
        if let Some(authorization) = &endpoint.authorization {
            request = request.header("authorization", authorization.as_str());
        }
        let request = request
            .body(Full::new(body))
            .map_err(|e| format!("cannot build the request: {e}"))?;
        let exchange = async {
            let response = client.request(request).await.map_err(|e| error_chain(&e))?;
            let status = response.status();
            // Read the (small) answer so the connection can be reused.
            let answer = Limited::new(response.into_body(), MAX_ANSWER)
                .collect()
                .await
                .map(|b| b.to_bytes())
                .unwrap_or_default();
            Ok((status, answer))
        };
        match tokio::time::timeout(endpoint.timeout, exchange).await {
            Err(_) => Err(format!(
                "no answer within {} ms",
                endpoint.timeout.as_millis()
            )),
            Ok(result) => result,
        }
    }

    /// `PUT` one event to the endpoint.
    pub async fn send_one(&self, endpoint: &Endpoint, record: &Record) -> Attempt {
        let request =
            Request::put(endpoint.display_url.as_str()).header(EVENT_ID_HEADER, record.id.as_str());
        let body = Bytes::from(record.body.to_json());
        match self
            .exchange(endpoint, request, &endpoint.display_url, body)
            .await
        {
            Ok((status, _)) => classify(status),
            Err(problem) => Attempt::Retry(problem),
        }
    }

    /// `POST` events to the endpoint's batch URL: one outcome per record, in order.
    /// `Err` when the receiver has no batch URL (404, 405): send them one by one.
    pub async fn send_batch(
        &self,
        endpoint: &Endpoint,
        records: &[Arc<Record>],
    ) -> Result<Vec<Attempt>, String> {
        let request = BatchRequest {
            notifications: records
                .iter()
                .map(|r| BatchItem {
                    event_id: r.id.clone(),
                    notification: r.body.clone(),
                })
                .collect(),
        };
        let body = Bytes::from(serde_json::to_vec(&request).expect("a batch serialises"));
        let url = batch_url(&endpoint.display_url);
        let all = |attempt: Attempt| Ok(vec![attempt; records.len()]);
        let (status, answer) = match self
            .exchange(endpoint, Request::post(url.as_str()), &url, body)
            .await
        {
            Ok(answer) => answer,
            Err(problem) => return all(Attempt::Retry(problem)),
        };
        if status == StatusCode::NOT_FOUND || status == StatusCode::METHOD_NOT_ALLOWED {
            return Err(format!("{url} answered HTTP {status}"));
        }
        if !status.is_success() {
            return all(classify(status));
        }
        let results = match serde_json::from_slice::<BatchResponse>(&answer) {
            Ok(response) if response.results.len() == records.len() => response.results,
            Ok(response) => {
                return all(Attempt::Retry(format!(
                    "the batch answer has {} results for {} events",
                    response.results.len(),
                    records.len()
                )))
            }
            Err(e) => {
                return all(Attempt::Retry(format!(
                    "the batch answer is not valid: {e}"
                )))
            }
        };
        Ok(results
            .into_iter()
            .zip(records)
            .map(|(result, record)| {
                if result.event_id != record.id {
                    return Attempt::Retry("the batch answer's results are out of order".into());
                }
                match StatusCode::from_u16(result.status) {
                    Ok(status) => match (classify(status), result.error) {
                        (Attempt::Final(why), Some(error)) => {
                            Attempt::Final(format!("{why}: {error}"))
                        }
                        (attempt, _) => attempt,
                    },
                    Err(_) => {
                        Attempt::Retry(format!("status {} in the batch answer", result.status))
                    }
                }
            })
            .collect())
    }
}

fn error_chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(inner) = source {
        text.push_str(": ");
        text.push_str(&inner.to_string());
        source = inner.source();
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn classes() {
        assert_eq!(classify(StatusCode::OK), Attempt::Delivered);
        assert_eq!(classify(StatusCode::NO_CONTENT), Attempt::Delivered);
        for retry in [408, 429, 500, 502, 503, 504] {
            let status = StatusCode::from_u16(retry).unwrap();
            assert!(matches!(classify(status), Attempt::Retry(_)), "{retry}");
        }
        for fatal in [400, 401, 403, 404, 413, 301] {
            let status = StatusCode::from_u16(fatal).unwrap();
            assert!(matches!(classify(status), Attempt::Final(_)), "{fatal}");
        }
    }

    #[test]
    fn the_trust_store_is_loaded_only_for_https() {
        let clients = Clients::new().unwrap();
        assert!(clients.for_url("http://127.0.0.1:9/notify").is_ok());
        assert!(
            clients.tls.get().is_none(),
            "plain HTTP needs no trust store"
        );
        assert!(clients.for_url("https://push.example/notify").is_ok());
        assert!(clients.tls.get().is_some());
    }

    #[test]
    fn backoff_grows_and_is_capped() {
        assert_eq!(backoff(0), Duration::from_millis(200));
        assert_eq!(backoff(1), Duration::from_millis(400));
        assert_eq!(backoff(10), MAX_BACKOFF);
        assert_eq!(backoff(u32::MAX), MAX_BACKOFF);
    }
}
