//! Request authentication: HTTP Basic (ingest, device API), OAuth bearer tokens (device
//! API, passed on to Dovecot) and the admin bearer token (status, metrics). Configured
//! secrets are compared in constant time; nothing here logs a credential.

use base64::Engine;
use hyper::header::AUTHORIZATION;
use hyper::HeaderMap;

use super::error::ApiError;
use crate::config::Secret;
use crate::domain::credentials::constant_time_eq;
use crate::domain::FieldError;
use crate::mailserver::MailCredential;

/// Decoded HTTP Basic credentials.
pub struct BasicCredentials {
    pub user: String,
    pub password: String,
}

impl std::fmt::Debug for BasicCredentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BasicCredentials")
            .field("user", &self.user)
            .field("password", &"***")
            .finish()
    }
}

/// Parses `Authorization: Basic …` (user and password split at the first `:`).
pub fn basic(headers: &HeaderMap) -> Option<BasicCredentials> {
    let value = headers.get(AUTHORIZATION)?.to_str().ok()?;
    let (scheme, rest) = value.split_once(' ')?;
    if !scheme.eq_ignore_ascii_case("basic") {
        return None;
    }
    let decoded = base64::engine::general_purpose::STANDARD
        .decode(rest.trim())
        .ok()?;
    let decoded = String::from_utf8(decoded).ok()?;
    let (user, password) = decoded.split_once(':')?;
    Some(BasicCredentials {
        user: user.to_owned(),
        password: password.to_owned(),
    })
}

/// The token of `Authorization: Bearer …`, if that is the scheme.
fn bearer(headers: &HeaderMap) -> Option<&str> {
    let value = headers.get(AUTHORIZATION)?.to_str().ok()?;
    let (scheme, token) = value.split_once(' ')?;
    scheme.eq_ignore_ascii_case("bearer").then(|| token.trim())
}

/// Who a device-API request is for and what proves it: HTTP Basic (login and mail
/// password), or `Bearer <token>` for the user named by the `user` query parameter or,
/// without one, by the JWT claim `user_claim` — read, not trusted: the mail server judges
/// the token for that user. `None` when the request carries neither.
pub fn device_login(
    headers: &HeaderMap,
    query: Option<&str>,
    user_claim: &str,
) -> Option<Result<(String, MailCredential), ApiError>> {
    if let Some(c) = basic(headers) {
        return Some(Ok((c.user, MailCredential::Password(c.password))));
    }
    let token = bearer(headers)?;
    let named = query.and_then(|q| {
        form_urlencoded_pairs(q)
            .find(|(k, _)| k == "user")
            .map(|(_, v)| v)
    });
    let user = match named {
        Some(user) => user,
        None => match jwt_claim(token, user_claim) {
            Some(user) => user,
            None => {
                return Some(Err(ApiError::bad_request(FieldError::new(
                    "user",
                    format!("name the user (`?user=`) or send a JWT with a `{user_claim}` claim"),
                ))))
            }
        },
    };
    Some(Ok((user, MailCredential::Bearer(token.to_owned()))))
}

/// `key=value` pairs of a query string, percent- and `+`-decoded (undecodable ones skipped).
fn form_urlencoded_pairs(query: &str) -> impl Iterator<Item = (String, String)> + '_ {
    query.split('&').filter_map(|pair| {
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        let decode = |s: &str| super::percent_decode(&s.replace('+', " "));
        Some((decode(k)?, decode(v)?))
    })
}

/// The string claim `name` of a JWT's payload, without checking anything else about the
/// token (the mail server does that).
pub fn jwt_claim(token: &str, name: &str) -> Option<String> {
    let mut parts = token.split('.');
    let (_header, payload, _signature) = (parts.next()?, parts.next()?, parts.next()?);
    if parts.next().is_some() {
        return None;
    }
    let payload = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(payload.trim_end_matches('='))
        .ok()?;
    let claims: serde_json::Map<String, serde_json::Value> =
        serde_json::from_slice(&payload).ok()?;
    claims.get(name)?.as_str().map(str::to_owned)
}

/// Requires Basic credentials equal to the configured pair.
pub fn require_basic(headers: &HeaderMap, user: &str, password: &Secret) -> Result<(), ApiError> {
    let Some(c) = basic(headers) else {
        return Err(ApiError::unauthorized_basic());
    };
    // Both compared, always, so timing does not tell which one was wrong.
    let user_ok = constant_time_eq(c.user.as_bytes(), user.as_bytes());
    let password_ok = constant_time_eq(c.password.as_bytes(), password.expose().as_bytes());
    if user_ok & password_ok {
        Ok(())
    } else {
        Err(ApiError::unauthorized_basic())
    }
}

/// Requires `Authorization: Bearer <admin token>`.
pub fn require_bearer(headers: &HeaderMap, token: &Secret) -> Result<(), ApiError> {
    match bearer(headers) {
        Some(t) if constant_time_eq(t.as_bytes(), token.expose().as_bytes()) => Ok(()),
        _ => Err(ApiError::unauthorized_bearer()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use hyper::header::HeaderValue;

    fn headers(v: &str) -> HeaderMap {
        let mut h = HeaderMap::new();
        h.insert(AUTHORIZATION, HeaderValue::from_str(v).unwrap());
        h
    }

    fn basic_header(user: &str, pw: &str) -> HeaderMap {
        let enc = base64::engine::general_purpose::STANDARD.encode(format!("{user}:{pw}"));
        headers(&format!("Basic {enc}"))
    }

    #[test]
    fn basic_credentials() {
        let c = basic(&basic_header("alice", "p:w")).unwrap();
        assert_eq!((c.user.as_str(), c.password.as_str()), ("alice", "p:w"));
        assert!(!format!("{c:?}").contains("p:w"));
        assert!(basic(&headers("Basic !!!")).is_none());
        assert!(basic(&headers("Bearer abc")).is_none());
        assert!(basic(&HeaderMap::new()).is_none());
        let pw = Secret::new("secret");
        assert!(require_basic(&basic_header("dovecot", "secret"), "dovecot", &pw).is_ok());
        assert!(require_basic(&basic_header("dovecot", "secreT"), "dovecot", &pw).is_err());
        assert!(require_basic(&basic_header("other", "secret"), "dovecot", &pw).is_err());
    }

    fn jwt(claims: &str) -> String {
        let e = |s: &str| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(s);
        format!("{}.{}.sig", e(r#"{"alg":"ES256"}"#), e(claims))
    }

    #[test]
    fn device_logins() {
        let (user, c) = device_login(&basic_header("alice", "pw"), Some("user=bob"), "email")
            .unwrap()
            .unwrap();
        assert_eq!(
            (user.as_str(), c),
            ("alice", MailCredential::Password("pw".into()))
        );
        let token = jwt(r#"{"email":"carol@example.com","sub":"42"}"#);
        let h = headers(&format!("Bearer {token}"));
        let (user, c) = device_login(&h, None, "email").unwrap().unwrap();
        assert_eq!(user, "carol@example.com");
        assert_eq!(c, MailCredential::Bearer(token.clone()));
        let (user, _) = device_login(&h, Some("x=1&user=dave%40example.com"), "email")
            .unwrap()
            .unwrap();
        assert_eq!(user, "dave@example.com");
        let (user, _) = device_login(&h, None, "sub").unwrap().unwrap();
        assert_eq!(user, "42");
        let err = device_login(&h, None, "preferred_username")
            .unwrap()
            .unwrap_err();
        assert_eq!(err.field.as_deref(), Some("user"));
        let opaque = headers("Bearer opaque-token");
        assert!(device_login(&opaque, None, "email").unwrap().is_err());
        assert!(device_login(&opaque, Some("user=erin"), "email")
            .unwrap()
            .is_ok());
        assert!(device_login(&HeaderMap::new(), Some("user=erin"), "email").is_none());
        assert_eq!(jwt_claim("a.b", "email"), None);
        assert_eq!(jwt_claim(&jwt(r#"{"email":7}"#), "email"), None);
    }

    #[test]
    fn bearer_token() {
        let t = Secret::new("0123456789abcdef");
        assert!(require_bearer(&headers("Bearer 0123456789abcdef"), &t).is_ok());
        assert!(require_bearer(&headers("bearer 0123456789abcdef"), &t).is_ok());
        assert!(require_bearer(&headers("Bearer 0123456789abcdeF"), &t).is_err());
        assert!(require_bearer(&headers("Basic 0123456789abcdef"), &t).is_err());
        assert!(require_bearer(&HeaderMap::new(), &t).is_err());
    }
}
