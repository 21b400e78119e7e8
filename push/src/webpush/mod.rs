//! Web Push (RFC 8030) to browsers: the message encrypted with RFC 8291 (`aes128gcm`, by
//! `web-push-native`), VAPID (RFC 8292) with the app's key, `TTL`, `Urgency` and `Topic`
//! headers, POSTed on hyper to the subscription's endpoint — a URL the user supplied, so
//! every connection goes through the SSRF [`guard`], no redirect is followed, replies are
//! read up to [`MAX_REPLY_BODY`] bytes and each exchange is bounded in time.
//!
//! Outcomes: 200/201/202 delivered; 404/410 delete the subscription; 413 cut the message
//! to [`payload::RETRY_BODY`] and send once more (dropped if it cannot get shorter); 429
//! and 5xx retry after `Retry-After`; 401/403 are the VAPID key refused (alert, delete
//! nothing); other replies drop the push; an endpoint whose host now resolves only to
//! refused addresses deletes the subscription (one that does not resolve is retried).

pub mod guard;
pub(crate) mod payload;
pub mod subscription;
pub(crate) mod vapid;

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::Full;
use hyper::header::{HeaderValue, AUTHORIZATION, CONTENT_ENCODING, CONTENT_TYPE, LOCATION};
use hyper::{Method, Request, StatusCode};
use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioTimer};
use rustls::pki_types::CertificateDer;

use crate::config::{AppConfig, ConfigError, WebPushConfig, DEFAULT_TTL_SECS};
use crate::http::{self, ExchangeError};
use crate::model::{Device, Notification, Privacy};
use crate::outcome::Outcome;

pub use guard::{
    check_host, classify as classify_address, AddressClass, AddressPolicy, EndpointRefused,
    Resolve, SystemResolver,
};
pub use payload::EVENT_MESSAGE_NEW;
pub use subscription::{endpoint_id, Subscription, SubscriptionError, MAX_ENDPOINT_LEN};
pub use vapid::VapidKey;

use guard::GuardedResolver;

/// Default bound on one exchange with a push service (`[webpush] timeout_seconds`).
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(10);
/// Largest reply body read from a push service (they answer with nothing or a little
/// JSON; the rest of a bigger body is not read).
pub const MAX_REPLY_BODY: usize = 4096;

/// What the receiver's `[webpush]` section decides for every app's Web Push sends.
#[derive(Clone)]
pub struct WebPushOptions {
    /// Which endpoint addresses are refused.
    pub policy: AddressPolicy,
    /// Trust roots added to Mozilla's (a private push service's CA).
    pub extra_roots: Vec<CertificateDer<'static>>,
    /// Bound on one exchange (connect, request, reply).
    pub timeout: Duration,
    /// How endpoint host names are resolved (the system resolver in production).
    pub resolver: Arc<dyn Resolve>,
}

impl Default for WebPushOptions {
    fn default() -> Self {
        WebPushOptions {
            policy: AddressPolicy::default(),
            extra_roots: Vec::new(),
            timeout: DEFAULT_TIMEOUT,
            resolver: Arc::new(SystemResolver),
        }
    }
}

type GuardedClient = Client<HttpsConnector<HttpConnector<GuardedResolver>>, Full<Bytes>>;

/// The one HTTPS client every app's Web Push sends share (push services are shared too).
pub(crate) struct WebPushClient {
    client: GuardedClient,
    policy: Arc<AddressPolicy>,
    timeout: Duration,
}

impl WebPushClient {
    pub(crate) fn new(options: &WebPushOptions) -> Result<Self, String> {
        let policy = Arc::new(options.policy.clone());
        let resolver = GuardedResolver {
            policy: policy.clone(),
            resolver: options.resolver.clone(),
        };
        let mut connector = HttpConnector::new_with_resolver(resolver);
        connector.enforce_http(false);
        connector.set_nodelay(true);
        connector.set_connect_timeout(Some(options.timeout));
        let tls = http::tls_config(&options.extra_roots, None)?;
        let connector = hyper_rustls::HttpsConnectorBuilder::new()
            .with_tls_config(tls)
            .https_only()
            .enable_all_versions()
            .wrap_connector(connector);
        let mut builder = Client::builder(TokioExecutor::new());
        builder
            .timer(TokioTimer::new())
            .pool_timer(TokioTimer::new())
            .pool_idle_timeout(Duration::from_secs(90))
            .pool_max_idle_per_host(8);
        Ok(WebPushClient {
            client: builder.build(connector),
            policy,
            timeout: options.timeout,
        })
    }
}

/// Sends to the Web Push subscriptions of one app.
pub(crate) struct WebPushSender {
    app_id: String,
    vapid: VapidKey,
    client: Arc<WebPushClient>,
    generic_text: String,
    ttl: Duration,
}

impl WebPushSender {
    pub(crate) fn from_config(
        app: &AppConfig,
        cfg: &WebPushConfig,
        base_dir: &std::path::Path,
        client: Arc<WebPushClient>,
    ) -> Result<Self, ConfigError> {
        Ok(WebPushSender {
            app_id: app.id.clone(),
            vapid: VapidKey::from_config(app, cfg, base_dir)?,
            client,
            generic_text: app.generic_text.clone(),
            ttl: Duration::from_secs(app.ttl_secs.unwrap_or(DEFAULT_TTL_SECS)),
        })
    }

    /// The app's VAPID public key (base64url).
    pub(crate) fn vapid_public_key(&self) -> &str {
        self.vapid.public_key()
    }

    /// VAPID tokens minted so far.
    pub(crate) fn token_mints(&self) -> u64 {
        self.vapid.mints()
    }

    /// Sends one message; a 413 is answered by one more try with a shorter message.
    pub(crate) async fn send(
        &self,
        device: &Device,
        n: &Notification,
        privacy: Privacy,
    ) -> Outcome {
        let Ok(sub) = Subscription::from_token(&device.token) else {
            return Outcome::delete("BadSubscription", None);
        };
        let host = sub.host();
        if !self.client.policy.host_allowed(host) {
            // IP literals never reach the resolver: they are checked here.
            if let Some(class) =
                guard::ip_literal(host).and_then(|ip| self.client.policy.refusal(ip))
            {
                tracing::warn!(app = %self.app_id, %host, %class, "Web Push endpoint refused; subscription deleted");
                return Outcome::delete("endpoint_refused", None);
            }
        }
        let Ok(mut message) =
            payload::build(n, privacy, &self.generic_text, payload::MAX_PLAINTEXT)
        else {
            tracing::warn!(app = %self.app_id, "Web Push message too large even after cutting texts; dropped");
            return Outcome::drop("payload_too_large");
        };
        let authorization = match self.vapid.authorization(&sub.origin()) {
            Ok(header) => header,
            Err(err) => {
                tracing::error!(app = %self.app_id, error = %err, "signing the VAPID token failed");
                return Outcome::credentials("vapid_signing");
            }
        };
        let mut cut = false;
        loop {
            let req = match self.request(&sub, n, privacy, &message, authorization.clone()) {
                Ok(req) => req,
                Err(outcome) => return outcome,
            };
            let reply = match http::exchange_bounded(
                &self.client.client,
                req,
                self.client.timeout,
                MAX_REPLY_BODY,
            )
            .await
            {
                Ok(reply) => reply,
                // A name that does not resolve now may again later (a DNS outage must
                // not delete every subscription); one that resolves only to refused
                // addresses is refused for good.
                Err(ExchangeError::Refused(EndpointRefused::Unresolvable { host, message })) => {
                    tracing::debug!(app = %self.app_id, %host, error = %message, "Web Push endpoint does not resolve");
                    return Outcome::retry("dns", None);
                }
                Err(ExchangeError::Refused(refused)) => {
                    tracing::warn!(app = %self.app_id, error = %refused, "Web Push endpoint refused; subscription deleted");
                    return Outcome::delete("endpoint_refused", None);
                }
                Err(err) => {
                    tracing::debug!(app = %self.app_id, error = %err, "Web Push exchange failed");
                    return Outcome::retry(err.label(), None);
                }
            };
            if reply.status == StatusCode::PAYLOAD_TOO_LARGE && !cut {
                cut = true;
                let limit = payload::RETRY_BODY - payload::OVERHEAD;
                if let Ok(shorter) = payload::build(n, privacy, &self.generic_text, limit) {
                    if shorter.len() < message.len() {
                        tracing::info!(app = %self.app_id, from = message.len(), to = shorter.len(), "Web Push message too large for the push service; sending it shorter");
                        message = shorter;
                        continue;
                    }
                }
            }
            let outcome = classify(reply.status, &reply.headers);
            http::log_outcome("Web Push", &self.app_id, device, &outcome);
            return outcome;
        }
    }

    fn request(
        &self,
        sub: &Subscription,
        n: &Notification,
        privacy: Privacy,
        message: &[u8],
        authorization: HeaderValue,
    ) -> Result<Request<Full<Bytes>>, Outcome> {
        let Some(ua_public) = sub.ua_public() else {
            return Err(Outcome::delete("BadSubscription", None));
        };
        let auth = web_push_native::Auth::clone_from_slice(sub.auth());
        let body = web_push_native::encrypt(message.to_vec(), &ua_public, &auth).map_err(|e| {
            tracing::error!(app = %self.app_id, error = %e, "Web Push encryption failed");
            Outcome::drop("encryption")
        })?;
        let urgency = match privacy {
            Privacy::Silent => "low",
            Privacy::Full | Privacy::Generic => "normal",
        };
        Request::builder()
            .method(Method::POST)
            .uri(sub.uri().clone())
            .header("ttl", self.ttl.as_secs().min(28 * 24 * 3600))
            .header("urgency", urgency)
            .header("topic", topic(sub, &n.folder))
            .header(CONTENT_ENCODING, "aes128gcm")
            .header(CONTENT_TYPE, "application/octet-stream")
            .header(AUTHORIZATION, authorization)
            .body(Full::new(Bytes::from(body)))
            .map_err(|_| Outcome::delete("BadSubscription", None))
    }
}

/// The `Topic` (coalescing key): a push service keeps only the newest undelivered message
/// per topic and subscription. One per folder: a later message (or, later, a badge update
/// for the folder) replaces an older one still waiting. 32 base64url characters of a
/// SHA-256 over the subscription's auth secret and the folder, so the push service learns
/// neither the folder nor the user, and cannot link topics across subscriptions.
pub(crate) fn topic(sub: &Subscription, folder: &str) -> String {
    use base64::Engine;
    let mut ctx = ring::digest::Context::new(&ring::digest::SHA256);
    ctx.update(b"dovepush topic\0");
    ctx.update(sub.auth());
    ctx.update(folder.as_bytes());
    let digest = ctx.finish();
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(&digest.as_ref()[..24])
}

/// Maps a push service's reply to an outcome (RFC 8030 §5, §8.3; the services' practice).
pub(crate) fn classify(status: StatusCode, headers: &hyper::HeaderMap) -> Outcome {
    let retry_after = http::retry_after(headers);
    match status.as_u16() {
        200..=202 => Outcome::Delivered {
            id: headers
                .get(LOCATION)
                .and_then(|v| v.to_str().ok())
                .map(str::to_owned),
        },
        404 => Outcome::delete("SubscriptionNotFound", None),
        410 => Outcome::delete("SubscriptionGone", None),
        413 => Outcome::drop("PayloadTooLarge"),
        401 => Outcome::credentials("VapidUnauthorized"),
        403 => Outcome::credentials("VapidForbidden"),
        429 => Outcome::retry("TooManyRequests", retry_after),
        s if s >= 500 => Outcome::retry(format!("http_{s}"), retry_after),
        s => Outcome::drop(format!("http_{s}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use base64::engine::general_purpose::URL_SAFE_NO_PAD;
    use base64::Engine;

    fn reply(status: u16, retry_after: Option<&str>) -> Outcome {
        let mut headers = hyper::HeaderMap::new();
        if let Some(r) = retry_after {
            headers.insert("retry-after", r.parse().unwrap());
        }
        classify(StatusCode::from_u16(status).unwrap(), &headers)
    }

    #[test]
    fn classification_table() {
        for (status, class, reason) in [
            (201, "delivered", "ok"),
            (200, "delivered", "ok"),
            (202, "delivered", "ok"),
            (404, "delete_device", "SubscriptionNotFound"),
            (410, "delete_device", "SubscriptionGone"),
            (413, "drop", "PayloadTooLarge"),
            (401, "credentials_rejected", "VapidUnauthorized"),
            (403, "credentials_rejected", "VapidForbidden"),
            (429, "retry", "TooManyRequests"),
            (500, "retry", "http_500"),
            (503, "retry", "http_503"),
            (400, "drop", "http_400"),
            (301, "drop", "http_301"),
        ] {
            let outcome = reply(status, None);
            assert_eq!(
                (outcome.class(), outcome.reason()),
                (class, reason),
                "{status}"
            );
        }
        assert_eq!(
            reply(429, Some("30")),
            Outcome::Retry {
                reason: "TooManyRequests".into(),
                retry_after: Some(Duration::from_secs(30))
            }
        );
    }

    /// RFC 8291, Appendix A: the RFC's message, decrypted with the RFC's user agent
    /// private key and auth secret, is the RFC's plaintext.
    #[test]
    fn rfc8291_appendix_a_test_vector() {
        const MESSAGE: &str = "DGv6ra1nlYgDCS1FRnbzlwAAEABBBP4z9KsN6nGRTbVYI_c7VJSPQTBtkgcy27mlml\
                               MoZIIgDll6e3vCYLocInmYWAmS6TlzAC8wEqKK6PBru3jl7A_yl95bQpu6cVPTpK4M\
                               qgkf1CXztLVBSt2Ks3oZwbuwXPXLWyouBWLVWGNWQexSgSxsj_Qulcy4a-fN";
        const UA_PRIVATE: &str = "q1dXpw3UpT5VOmu_cf_v6ih07Aems3njxI-JWgLcM94";
        const AUTH: &str = "BTBZMqHH6r4Tts7J_aSIgg";
        let message = URL_SAFE_NO_PAD.decode(MESSAGE).unwrap();
        let ua_private = web_push_native::p256::SecretKey::from_slice(
            &URL_SAFE_NO_PAD.decode(UA_PRIVATE).unwrap(),
        )
        .unwrap();
        let auth = web_push_native::Auth::clone_from_slice(&URL_SAFE_NO_PAD.decode(AUTH).unwrap());
        let plaintext = web_push_native::decrypt(message, &ua_private, &auth).unwrap();
        assert_eq!(plaintext, b"When I grow up, I want to be a watermelon");
        // And what we encrypt for the RFC's user agent, it can decrypt (a fresh key pair
        // and salt each time, so only the round trip can be compared).
        let sub = Subscription::new(
            "https://push.example/x",
            subscription::tests::P256DH,
            subscription::tests::AUTH,
        )
        .unwrap();
        let ours = web_push_native::encrypt(
            b"hello".to_vec(),
            &sub.ua_public().unwrap(),
            &web_push_native::Auth::clone_from_slice(sub.auth()),
        )
        .unwrap();
        assert_eq!(ours.len(), 5 + payload::OVERHEAD);
        assert_eq!(
            web_push_native::decrypt(ours, &ua_private, &auth).unwrap(),
            b"hello"
        );
    }

    #[test]
    fn topics_are_short_base64url_and_per_folder() {
        let sub = Subscription::new(
            "https://push.example/x",
            subscription::tests::P256DH,
            subscription::tests::AUTH,
        )
        .unwrap();
        let inbox = topic(&sub, "INBOX");
        assert_eq!(inbox.len(), 32);
        assert!(inbox
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_'));
        assert_eq!(inbox, topic(&sub, "INBOX"));
        assert_ne!(inbox, topic(&sub, "Work"));
        assert!(!inbox.contains("INBOX"));
    }
}
