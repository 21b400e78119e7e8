//! Request authentication: HTTP Basic (ingest, device API) and the admin bearer token
//! (status, metrics). Configured secrets are compared in constant time; nothing here logs
//! a credential.

use base64::Engine;
use hyper::header::AUTHORIZATION;
use hyper::HeaderMap;

use super::error::ApiError;
use crate::config::Secret;
use crate::domain::credentials::constant_time_eq;

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
    let given = headers
        .get(AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split_once(' '))
        .filter(|(scheme, _)| scheme.eq_ignore_ascii_case("bearer"))
        .map(|(_, t)| t.trim());
    match given {
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
