//! A browser's push subscription (`PushSubscription.toJSON()`: `endpoint` and
//! `keys.p256dh` / `keys.auth`), checked, and its canonical form as a device token:
//! `webpush:<endpoint>|<p256dh>|<auth>` (the keys in unpadded base64url), so that the store
//! keeps Web Push devices in the same `token` column as APNs and FCM devices.

use std::fmt;

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use web_push_native::p256;

/// Longest accepted endpoint URL (bytes).
pub const MAX_ENDPOINT_LEN: usize = 2048;
/// The canonical token's prefix.
pub const TOKEN_PREFIX: &str = "webpush:";
/// The prefix of a Web Push device's short id ([`Subscription::id`]).
pub const ID_PREFIX: &str = "wp-";

/// A checked push subscription.
#[derive(Clone, PartialEq, Eq)]
pub struct Subscription {
    endpoint: String,
    uri: hyper::Uri,
    /// The user agent's P-256 public key, uncompressed (65 bytes).
    p256dh: Vec<u8>,
    /// The 16-byte authentication secret (a secret: never logged or shown).
    auth: [u8; 16],
}

impl fmt::Debug for Subscription {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Neither the capability URL nor the auth secret belong in a debug dump.
        f.debug_struct("Subscription")
            .field("host", &self.host())
            .finish_non_exhaustive()
    }
}

/// A subscription field that is not acceptable, with the reason.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SubscriptionError {
    /// `endpoint`, `keys.p256dh` or `keys.auth` (or `token` for a bad canonical token).
    pub field: &'static str,
    pub message: String,
}

impl fmt::Display for SubscriptionError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.field, self.message)
    }
}

impl std::error::Error for SubscriptionError {}

fn error(field: &'static str, message: impl Into<String>) -> SubscriptionError {
    SubscriptionError {
        field,
        message: message.into(),
    }
}

/// Unpadded (or padded) base64url, as browsers encode `PushSubscription` keys.
fn decode_key(field: &'static str, text: &str) -> Result<Vec<u8>, SubscriptionError> {
    URL_SAFE_NO_PAD
        .decode(text.trim_end_matches('='))
        .map_err(|_| error(field, "not base64url"))
}

impl Subscription {
    /// Checks a subscription: `endpoint` an `https` URL of at most [`MAX_ENDPOINT_LEN`]
    /// bytes (visible ASCII, a host, no user info); `p256dh` a P-256 public key as an
    /// uncompressed point (65 bytes) and `auth` 16 bytes, both base64url.
    pub fn new(endpoint: &str, p256dh: &str, auth: &str) -> Result<Self, SubscriptionError> {
        if endpoint.is_empty() || endpoint.len() > MAX_ENDPOINT_LEN {
            return Err(error(
                "endpoint",
                format!("expected a URL of 1-{MAX_ENDPOINT_LEN} bytes"),
            ));
        }
        if !endpoint.bytes().all(|b| b.is_ascii_graphic() && b != b'|') {
            return Err(error(
                "endpoint",
                "a URL has no spaces, control or non-ASCII characters",
            ));
        }
        let uri: hyper::Uri = endpoint
            .parse()
            .map_err(|_| error("endpoint", "not a URL"))?;
        if uri.scheme_str() != Some("https") {
            return Err(error("endpoint", "must be an https URL"));
        }
        let Some(authority) = uri.authority() else {
            return Err(error("endpoint", "has no host"));
        };
        if authority.as_str().contains('@') {
            return Err(error("endpoint", "must not contain user info"));
        }
        if authority.host().is_empty() || authority.port_u16() == Some(0) {
            return Err(error("endpoint", "has no host"));
        }
        let p256dh = decode_key("keys.p256dh", p256dh)?;
        if p256dh.len() != 65 || p256dh[0] != 4 {
            return Err(error(
                "keys.p256dh",
                "expected a P-256 public key as an uncompressed point (65 bytes)",
            ));
        }
        if p256::PublicKey::from_sec1_bytes(&p256dh).is_err() {
            return Err(error("keys.p256dh", "not a point on the P-256 curve"));
        }
        let auth: [u8; 16] = decode_key("keys.auth", auth)?
            .try_into()
            .map_err(|_| error("keys.auth", "expected 16 bytes"))?;
        Ok(Subscription {
            endpoint: endpoint.to_owned(),
            uri,
            p256dh,
            auth,
        })
    }

    /// Reads a canonical token (`webpush:<endpoint>|<p256dh>|<auth>`).
    pub fn from_token(token: &str) -> Result<Self, SubscriptionError> {
        let bad = || error("token", "not a Web Push subscription token");
        let rest = token.strip_prefix(TOKEN_PREFIX).ok_or_else(bad)?;
        let mut parts = rest.rsplitn(3, '|');
        let (Some(auth), Some(p256dh), Some(endpoint)) = (parts.next(), parts.next(), parts.next())
        else {
            return Err(bad());
        };
        Subscription::new(endpoint, p256dh, auth)
    }

    /// The canonical token: `webpush:<endpoint>|<p256dh>|<auth>`.
    pub fn token(&self) -> String {
        format!(
            "{TOKEN_PREFIX}{}|{}|{}",
            self.endpoint,
            URL_SAFE_NO_PAD.encode(&self.p256dh),
            URL_SAFE_NO_PAD.encode(self.auth)
        )
    }

    /// The endpoint URL (a capability: whoever has it can push to the browser, given the
    /// keys; shown only to the subscription's owner).
    pub fn endpoint(&self) -> &str {
        &self.endpoint
    }

    pub(crate) fn uri(&self) -> &hyper::Uri {
        &self.uri
    }

    /// The endpoint's host (what operators see), without brackets for IPv6.
    pub fn host(&self) -> &str {
        let host = self.uri.host().unwrap_or_default();
        host.trim_start_matches('[').trim_end_matches(']')
    }

    /// `https://host[:port]`, the endpoint's origin as RFC 6454 serialises it (host in
    /// lower case, no port when it is 443): the VAPID `aud` claim.
    pub fn origin(&self) -> String {
        let origin = match self.uri.authority() {
            Some(a) if a.port_u16() == Some(443) => format!("https://{}", a.host()),
            Some(a) => format!("https://{}", a.as_str()),
            None => "https://".to_owned(),
        };
        origin.to_ascii_lowercase()
    }

    /// A short, stable, URL-safe name for the device (`wp-` and 22 base64url characters of
    /// the endpoint's SHA-256): what listings show and `DELETE /v1/devices/{token}` takes.
    pub fn id(&self) -> String {
        endpoint_id(&self.endpoint)
    }

    /// The user agent's public key.
    pub(crate) fn ua_public(&self) -> Option<p256::PublicKey> {
        p256::PublicKey::from_sec1_bytes(&self.p256dh).ok()
    }

    pub(crate) fn auth(&self) -> &[u8; 16] {
        &self.auth
    }
}

/// The short id of the device whose endpoint is `endpoint` (see [`Subscription::id`]).
pub fn endpoint_id(endpoint: &str) -> String {
    let digest = ring::digest::digest(&ring::digest::SHA256, endpoint.as_bytes());
    let mut id = String::from(ID_PREFIX);
    id.push_str(&URL_SAFE_NO_PAD.encode(digest.as_ref())[..22]);
    id
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use web_push_native::p256::elliptic_curve::sec1::ToEncodedPoint;

    /// The user agent's keys of RFC 8291, Appendix A.
    pub(crate) const P256DH: &str =
        "BCVxsr7N_eNgVRqvHtD0zTZsEc6-VV-JvLexhqUzORcxaOzi6-AYWXvTBHm4bjyPjs7Vd8pZGH6SRpkNtoIAiw4";
    pub(crate) const AUTH: &str = "BTBZMqHH6r4Tts7J_aSIgg";

    #[test]
    fn accepts_a_browser_subscription_and_round_trips_its_token() {
        let sub = Subscription::new(
            "https://fcm.googleapis.com/fcm/send/abc:def-ghi",
            P256DH,
            &format!("{AUTH}=="),
        )
        .unwrap();
        assert_eq!(sub.host(), "fcm.googleapis.com");
        assert_eq!(sub.origin(), "https://fcm.googleapis.com");
        let token = sub.token();
        assert_eq!(
            token,
            format!("webpush:https://fcm.googleapis.com/fcm/send/abc:def-ghi|{P256DH}|{AUTH}")
        );
        assert_eq!(Subscription::from_token(&token).unwrap(), sub);
        let id = sub.id();
        assert!(id.starts_with("wp-") && id.len() == 25, "{id}");
        assert!(id[3..]
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_'));
        let debug = format!("{sub:?}");
        assert!(
            !debug.contains("abc:def") && !debug.contains(AUTH),
            "{debug}"
        );
        let ported = Subscription::new("https://[::1]:8443/p/1", P256DH, AUTH).unwrap();
        assert_eq!(ported.host(), "::1");
        assert_eq!(ported.origin(), "https://[::1]:8443");
        let default_port = Subscription::new("https://[::1]:443/p/1", P256DH, AUTH).unwrap();
        assert_eq!(default_port.origin(), "https://[::1]");
        let named = Subscription::new("https://Push.Example:443/p", P256DH, AUTH).unwrap();
        assert_eq!(named.origin(), "https://push.example");
    }

    #[test]
    fn bad_subscriptions_name_the_field() {
        let long = format!("https://push.example/{}", "a".repeat(MAX_ENDPOINT_LEN));
        let off_curve = {
            let mut p = URL_SAFE_NO_PAD.decode(P256DH).unwrap();
            p[64] ^= 1;
            URL_SAFE_NO_PAD.encode(p)
        };
        let compressed = {
            let secret = p256::SecretKey::from_slice(&[3u8; 32]).unwrap();
            URL_SAFE_NO_PAD.encode(secret.public_key().to_encoded_point(true).as_bytes())
        };
        let cases: Vec<(String, String, String, &str)> = vec![
            (
                "http://push.example/x".into(),
                P256DH.into(),
                AUTH.into(),
                "endpoint",
            ),
            ("https:///x".into(), P256DH.into(), AUTH.into(), "endpoint"),
            (
                "https://u:p@push.example/x".into(),
                P256DH.into(),
                AUTH.into(),
                "endpoint",
            ),
            (
                "https://push.example/a b".into(),
                P256DH.into(),
                AUTH.into(),
                "endpoint",
            ),
            (
                "https://push.example/ä".into(),
                P256DH.into(),
                AUTH.into(),
                "endpoint",
            ),
            ("/relative".into(), P256DH.into(), AUTH.into(), "endpoint"),
            ("".into(), P256DH.into(), AUTH.into(), "endpoint"),
            (long, P256DH.into(), AUTH.into(), "endpoint"),
            (
                "https://p.example/".into(),
                "***".into(),
                AUTH.into(),
                "keys.p256dh",
            ),
            (
                "https://p.example/".into(),
                off_curve,
                AUTH.into(),
                "keys.p256dh",
            ),
            (
                "https://p.example/".into(),
                compressed,
                AUTH.into(),
                "keys.p256dh",
            ),
            (
                "https://p.example/".into(),
                P256DH.into(),
                "AAAA".into(),
                "keys.auth",
            ),
            (
                "https://p.example/".into(),
                P256DH.into(),
                "!".into(),
                "keys.auth",
            ),
        ];
        for (endpoint, p256dh, auth, field) in cases {
            let err = Subscription::new(&endpoint, &p256dh, &auth).unwrap_err();
            assert_eq!(err.field, field, "{endpoint} {p256dh} {auth}: {err}");
        }
        for token in ["a1b2c3", "webpush:https://p.example/", "webpush:x|y|z"] {
            assert!(Subscription::from_token(token).is_err(), "{token}");
        }
    }
}
