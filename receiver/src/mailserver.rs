//! The mail server seam: checking a user's own mail credentials with an IMAP login (a
//! password, or an OAuth bearer token passed on with `AUTHENTICATE OAUTHBEARER`/`XOAUTH2`
//! for Dovecot's `oauth2` passdb to judge), and setting or clearing the ox subscription
//! METADATA in that same IMAP session.
//!
//! [`MailServer`] is the trait the HTTP layer and the outbox use; [`ImapMailServer`] is
//! the real one (async-imap over plain TCP, STARTTLS or implicit TLS with rustls/ring).
//! async-imap has no SETMETADATA call, so the command goes through its raw command
//! facility ([`setmetadata_command`] builds it); responses are still parsed by async-imap.

use std::fmt;
use std::net::IpAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use async_imap::Client;
use rustls::pki_types::ServerName;
use rustls::pki_types::{pem::PemObject, CertificateDer};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;

use crate::config::{split_host_port, DovecotConfig, ImapTls, OAuthMechanism, Secret};
use futures_util::future::BoxFuture;

/// The server METADATA entry the ox driver (and the dovepush plugin) reads.
pub use dovepush_protocol::subscription::METADATA_ENTRY;

/// The subscription value written for a login (`user=<login>`): with the plugin's
/// `user_from_metadata`, events then carry exactly this login.
pub fn subscription_value(login: &str) -> String {
    dovepush_protocol::subscription::Subscription {
        user: login.to_string(),
    }
    .value()
}

/// What a user proves who they are with. Never printed: `Debug` shows only the kind.
#[derive(Clone, PartialEq, Eq)]
pub enum MailCredential {
    /// The mail password (IMAP `LOGIN`).
    Password(String),
    /// An OAuth 2.0 access token (IMAP `AUTHENTICATE OAUTHBEARER` or `XOAUTH2`); the
    /// receiver never judges it, Dovecot's `oauth2` passdb does.
    Bearer(String),
}

impl MailCredential {
    /// The secret itself.
    pub fn secret(&self) -> &str {
        match self {
            MailCredential::Password(s) | MailCredential::Bearer(s) => s,
        }
    }

    /// `password` or `bearer`, for logs and metrics.
    pub fn kind(&self) -> &'static str {
        match self {
            MailCredential::Password(_) => "password",
            MailCredential::Bearer(_) => "bearer",
        }
    }

    /// Worth asking the mail server about: not empty, and a bearer token of visible
    /// ASCII only (it goes into a SASL message; RFC 6750's `b64token` is narrower still).
    pub fn is_plausible(&self) -> bool {
        match self {
            MailCredential::Password(p) => !p.is_empty(),
            MailCredential::Bearer(t) => {
                !t.is_empty()
                    && t.len() <= MAX_BEARER_TOKEN
                    && t.bytes().all(|b| b.is_ascii_graphic())
            }
        }
    }
}

impl fmt::Debug for MailCredential {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "MailCredential::{}(***)", self.kind())
    }
}

/// Longest bearer token passed on (JWTs from common identity providers stay well below).
pub const MAX_BEARER_TOKEN: usize = 8192;

/// The SASL initial response carrying `token` for `user`: RFC 7628's GS2 header with the
/// authorization identity (`,` and `=` escaped) and `auth=Bearer`, or XOAUTH2's form.
pub fn bearer_initial_response(mechanism: OAuthMechanism, user: &str, token: &str) -> Vec<u8> {
    match mechanism {
        OAuthMechanism::OAuthBearer => {
            let user = user.replace('=', "=3D").replace(',', "=2C");
            format!("n,a={user},\x01auth=Bearer {token}\x01\x01").into_bytes()
        }
        OAuthMechanism::XOAuth2 => {
            format!("user={user}\x01auth=Bearer {token}\x01\x01").into_bytes()
        }
    }
}

/// What to do with the subscription in the session that checks the credentials.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SubscriptionChange {
    /// Only check the credentials.
    Keep,
    /// Set the METADATA to this value.
    Set(String),
    /// Set the METADATA to NIL.
    Clear,
}

/// Mail server failures.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum MailError {
    #[error("the mail server rejected the credentials")]
    Rejected,
    #[error("mail server unavailable: {0}")]
    Unavailable(String),
    #[error("the mail server refused the METADATA change: {0}")]
    Metadata(String),
    #[error("no master user is configured")]
    NoMasterUser,
}

/// Verifies mail credentials and manages the subscription METADATA.
pub trait MailServer: Send + Sync {
    /// Logs in as `login` with `credential`; on success applies `change` in the same session.
    /// `client` is the address the request came from: Dovecot is told (IMAP `ID`
    /// `x-originating-ip`, honoured for `login_trusted_networks`), so that its penalty for
    /// failed logins falls on that address, not on the receiver's own.
    fn login<'a>(
        &'a self,
        login: &'a str,
        credential: &'a MailCredential,
        change: SubscriptionChange,
        client: Option<IpAddr>,
    ) -> BoxFuture<'a, Result<(), MailError>>;

    /// Sets the user's METADATA to NIL through the configured master user (used when a
    /// transport removed the user's last device); [`MailError::NoMasterUser`] without one.
    fn clear_subscription_as_master<'a>(
        &'a self,
        user: &'a str,
    ) -> BoxFuture<'a, Result<(), MailError>>;
}

/// `ID ("x-originating-ip" "<address>")`: the client a login is for.
pub fn id_command(client: IpAddr) -> String {
    format!("ID (\"x-originating-ip\" \"{client}\")")
}

/// `SETMETADATA "" (<entry> "<value>"|NIL)`.
pub fn setmetadata_command(value: Option<&str>) -> String {
    match value {
        Some(v) => format!("SETMETADATA \"\" ({METADATA_ENTRY} {})", quote(v)),
        None => format!("SETMETADATA \"\" ({METADATA_ENTRY} NIL)"),
    }
}

/// An IMAP quoted string (callers reject control characters beforehand).
fn quote(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 2);
    out.push('"');
    for c in s.chars() {
        if c == '"' || c == '\\' {
            out.push('\\');
        }
        out.push(c);
    }
    out.push('"');
    out
}

/// The real IMAP client.
pub struct ImapMailServer {
    host: String,
    port: u16,
    tls: ImapTls,
    connector: Option<(TlsConnector, ServerName<'static>)>,
    master: Option<(String, Secret)>,
    timeout: Duration,
    oauth_mechanism: OAuthMechanism,
}

impl fmt::Debug for ImapMailServer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ImapMailServer")
            .field("host", &self.host)
            .field("port", &self.port)
            .field("tls", &self.tls)
            .field("master_user", &self.master.as_ref().map(|m| &m.0))
            .field("oauth_mechanism", &self.oauth_mechanism)
            .finish()
    }
}

impl ImapMailServer {
    /// Builds the client from `[dovecot]` (reads `ca_file` if given).
    pub fn new(cfg: &DovecotConfig) -> Result<Self, MailError> {
        let (host, port) = split_host_port(&cfg.imap)
            .ok_or_else(|| MailError::Unavailable(format!("bad address {}", cfg.imap)))?;
        let connector = if cfg.tls == ImapTls::None {
            None
        } else {
            let mut roots = rustls::RootCertStore::empty();
            match &cfg.ca_file {
                Some(path) => {
                    for cert in CertificateDer::pem_file_iter(path).map_err(|e| {
                        MailError::Unavailable(format!("cannot read {}: {e}", path.display()))
                    })? {
                        let cert = cert.map_err(|e| {
                            MailError::Unavailable(format!("bad PEM in {}: {e}", path.display()))
                        })?;
                        roots.add(cert).map_err(|e| {
                            MailError::Unavailable(format!("bad CA in {}: {e}", path.display()))
                        })?;
                    }
                }
                None => roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned()),
            }
            let config = rustls::ClientConfig::builder_with_provider(Arc::new(
                rustls::crypto::ring::default_provider(),
            ))
            .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
            .map_err(|e| MailError::Unavailable(e.to_string()))?
            .with_root_certificates(roots)
            .with_no_client_auth();
            let name = ServerName::try_from(host.clone())
                .map_err(|e| MailError::Unavailable(format!("bad server name {host}: {e}")))?;
            Some((TlsConnector::from(Arc::new(config)), name))
        };
        Ok(Self {
            host,
            port,
            tls: cfg.tls,
            connector,
            master: cfg.master_user.clone().zip(cfg.master_password.clone()),
            timeout: cfg.timeout,
            oauth_mechanism: cfg.oauth_mechanism,
        })
    }

    async fn tls_wrap(&self, tcp: TcpStream) -> Result<ImapStream, MailError> {
        let (connector, name) = self
            .connector
            .as_ref()
            .ok_or_else(|| MailError::Unavailable("TLS is not configured".into()))?;
        let tls = connector
            .connect(name.clone(), tcp)
            .await
            .map_err(|e| MailError::Unavailable(format!("TLS handshake: {e}")))?;
        Ok(ImapStream::Tls(Box::new(tls)))
    }

    /// Connects and reads the greeting (doing STARTTLS if configured).
    async fn connect(&self) -> Result<Client<ImapStream>, MailError> {
        let unavailable = |e: &dyn fmt::Display| MailError::Unavailable(e.to_string());
        let tcp = TcpStream::connect((self.host.as_str(), self.port))
            .await
            .map_err(|e| unavailable(&e))?;
        let _ = tcp.set_nodelay(true);
        let stream = match self.tls {
            ImapTls::Implicit => self.tls_wrap(tcp).await?,
            ImapTls::None | ImapTls::StartTls => ImapStream::Plain(tcp),
        };
        let mut client = Client::new(stream);
        client
            .read_response()
            .await
            .map_err(|e| unavailable(&e))?
            .ok_or_else(|| MailError::Unavailable("no greeting".into()))?;
        if self.tls == ImapTls::StartTls {
            client
                .run_command_and_check_ok("STARTTLS", None)
                .await
                .map_err(|e| unavailable(&e))?;
            let ImapStream::Plain(tcp) = client.into_inner() else {
                return Err(MailError::Unavailable("unexpected stream state".into()));
            };
            client = Client::new(self.tls_wrap(tcp).await?);
        }
        Ok(client)
    }

    async fn login_inner(
        &self,
        login: &str,
        credential: &MailCredential,
        change: SubscriptionChange,
        from: Option<IpAddr>,
    ) -> Result<(), MailError> {
        let mut client = self.connect().await?;
        if let Some(from) = from {
            // Only an address: nothing a client chose goes into the command.
            client
                .run_command_and_check_ok(&id_command(from), None)
                .await
                .map_err(|e| MailError::Unavailable(e.to_string()))?;
        }
        let mut session = match credential {
            MailCredential::Password(password) => client
                .login(login, password)
                .await
                .map_err(|(e, _)| classify_login_error(e))?,
            MailCredential::Bearer(token) => {
                let auth = SaslOnce {
                    response: bearer_initial_response(self.oauth_mechanism, login, token),
                    on_error: match self.oauth_mechanism {
                        // RFC 7628 §3.2.3: answer the error challenge with %x01.
                        OAuthMechanism::OAuthBearer => vec![1],
                        OAuthMechanism::XOAuth2 => Vec::new(),
                    },
                };
                client
                    .authenticate(self.oauth_mechanism.as_str(), auth)
                    .await
                    .map_err(|(e, _)| classify_login_error(e))?
            }
        };
        let result = apply(&mut session, &change).await;
        let _ = session.logout().await;
        result
    }

    /// Logs in as `user` through the master user (SASL PLAIN with an authorization id).
    async fn master_session(
        &self,
        user: &str,
    ) -> Result<async_imap::Session<ImapStream>, MailError> {
        let (master, password) = self.master.as_ref().ok_or(MailError::NoMasterUser)?;
        let client = self.connect().await?;
        let plain = SaslOnce {
            response: format!("{user}\0{master}\0{}", password.expose()).into_bytes(),
            on_error: Vec::new(),
        };
        client
            .authenticate("PLAIN", plain)
            .await
            .map_err(|(e, _)| classify_login_error(e))
    }

    async fn change_as_master(
        &self,
        user: &str,
        change: &SubscriptionChange,
    ) -> Result<(), MailError> {
        let mut session = self.master_session(user).await?;
        let result = apply(&mut session, change).await;
        let _ = session.logout().await;
        result
    }

    async fn read_as_master(&self, user: &str) -> Result<Option<String>, MailError> {
        let mut session = self.master_session(user).await?;
        let result = session
            .get_metadata("", "", METADATA_ENTRY)
            .await
            .map_err(|e| match e {
                async_imap::error::Error::No(m) | async_imap::error::Error::Bad(m) => {
                    MailError::Metadata(m)
                }
                other => MailError::Unavailable(other.to_string()),
            });
        let _ = session.logout().await;
        Ok(result?
            .into_iter()
            .find(|m| m.entry == METADATA_ENTRY)
            .and_then(|m| m.value)
            .filter(|v| !v.is_empty()))
    }

    /// The user's subscription value, read through the master user (`None` if unset).
    pub async fn subscription_as_master(&self, user: &str) -> Result<Option<String>, MailError> {
        tokio::time::timeout(self.timeout, self.read_as_master(user))
            .await
            .unwrap_or_else(|_| Err(MailError::Unavailable("IMAP timed out".into())))
    }

    /// Sets (or with `None`, clears) the user's subscription through the master user.
    pub async fn set_subscription_as_master(
        &self,
        user: &str,
        value: Option<&str>,
    ) -> Result<(), MailError> {
        let change = match value {
            Some(v) => SubscriptionChange::Set(v.to_owned()),
            None => SubscriptionChange::Clear,
        };
        tokio::time::timeout(self.timeout, self.change_as_master(user, &change))
            .await
            .unwrap_or_else(|_| Err(MailError::Unavailable("IMAP timed out".into())))
    }
}

async fn apply(
    session: &mut async_imap::Session<ImapStream>,
    change: &SubscriptionChange,
) -> Result<(), MailError> {
    let command = match change {
        SubscriptionChange::Keep => return Ok(()),
        SubscriptionChange::Set(v) => setmetadata_command(Some(v)),
        SubscriptionChange::Clear => setmetadata_command(None),
    };
    session
        .run_command_and_check_ok(&command)
        .await
        .map_err(|e| match e {
            async_imap::error::Error::No(m) | async_imap::error::Error::Bad(m) => {
                MailError::Metadata(m)
            }
            other => MailError::Unavailable(other.to_string()),
        })
}

fn classify_login_error(e: async_imap::error::Error) -> MailError {
    use async_imap::error::Error;
    match e {
        Error::No(_) | Error::Bad(_) | Error::Validate(_) => MailError::Rejected,
        other => MailError::Unavailable(other.to_string()),
    }
}

/// A one-step SASL exchange: `response` to the server's first (empty) challenge, then
/// `on_error` to any further one, which only a failing server sends (an OAUTHBEARER error
/// report, after which the server answers NO).
struct SaslOnce {
    response: Vec<u8>,
    on_error: Vec<u8>,
}

impl async_imap::Authenticator for SaslOnce {
    type Response = Vec<u8>;
    fn process(&mut self, _challenge: &[u8]) -> Vec<u8> {
        if self.response.is_empty() {
            self.on_error.clone()
        } else {
            std::mem::take(&mut self.response)
        }
    }
}

impl MailServer for ImapMailServer {
    fn login<'a>(
        &'a self,
        login: &'a str,
        credential: &'a MailCredential,
        change: SubscriptionChange,
        client: Option<IpAddr>,
    ) -> BoxFuture<'a, Result<(), MailError>> {
        Box::pin(async move {
            tokio::time::timeout(
                self.timeout,
                self.login_inner(login, credential, change, client),
            )
            .await
            .unwrap_or_else(|_| Err(MailError::Unavailable("IMAP timed out".into())))
        })
    }

    fn clear_subscription_as_master<'a>(
        &'a self,
        user: &'a str,
    ) -> BoxFuture<'a, Result<(), MailError>> {
        Box::pin(self.set_subscription_as_master(user, None))
    }
}

/// Plain TCP or TLS, one type for async-imap.
#[derive(Debug)]
pub enum ImapStream {
    Plain(TcpStream),
    Tls(Box<tokio_rustls::client::TlsStream<TcpStream>>),
}

impl AsyncRead for ImapStream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        match self.get_mut() {
            ImapStream::Plain(s) => Pin::new(s).poll_read(cx, buf),
            ImapStream::Tls(s) => Pin::new(s.as_mut()).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for ImapStream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        match self.get_mut() {
            ImapStream::Plain(s) => Pin::new(s).poll_write(cx, buf),
            ImapStream::Tls(s) => Pin::new(s.as_mut()).poll_write(cx, buf),
        }
    }
    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        match self.get_mut() {
            ImapStream::Plain(s) => Pin::new(s).poll_flush(cx),
            ImapStream::Tls(s) => Pin::new(s.as_mut()).poll_flush(cx),
        }
    }
    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        match self.get_mut() {
            ImapStream::Plain(s) => Pin::new(s).poll_shutdown(cx),
            ImapStream::Tls(s) => Pin::new(s.as_mut()).poll_shutdown(cx),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn setmetadata_commands() {
        assert_eq!(
            setmetadata_command(Some(&subscription_value("alice"))),
            "SETMETADATA \"\" (/private/vendor/vendor.dovecot/http-notify \"user=alice\")"
        );
        assert_eq!(
            setmetadata_command(None),
            "SETMETADATA \"\" (/private/vendor/vendor.dovecot/http-notify NIL)"
        );
        assert_eq!(quote("a\"b\\c"), "\"a\\\"b\\\\c\"");
        assert_eq!(
            id_command("192.0.2.7".parse().unwrap()),
            "ID (\"x-originating-ip\" \"192.0.2.7\")"
        );
        assert_eq!(
            id_command("2001:db8::1".parse().unwrap()),
            "ID (\"x-originating-ip\" \"2001:db8::1\")"
        );
    }

    #[test]
    fn bearer_responses_and_redaction() {
        assert_eq!(
            bearer_initial_response(OAuthMechanism::OAuthBearer, "a,b=c", "tok"),
            b"n,a=a=2Cb=3Dc,\x01auth=Bearer tok\x01\x01"
        );
        assert_eq!(
            bearer_initial_response(OAuthMechanism::XOAuth2, "alice", "tok"),
            b"user=alice\x01auth=Bearer tok\x01\x01"
        );
        let c = MailCredential::Bearer("secret-token".into());
        assert!(!format!("{c:?}").contains("secret"));
        assert!(c.is_plausible());
        assert!(!MailCredential::Bearer("a b".into()).is_plausible());
        assert!(!MailCredential::Bearer("a\x01".into()).is_plausible());
        assert!(!MailCredential::Bearer("x".repeat(MAX_BEARER_TOKEN + 1)).is_plausible());
        assert!(!MailCredential::Password(String::new()).is_plausible());
    }

    #[tokio::test]
    async fn unreachable_server_is_unavailable_not_rejected() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        drop(listener);
        let cfg = DovecotConfig {
            imap: addr.to_string(),
            tls: ImapTls::None,
            ca_file: None,
            master_user: None,
            master_password: None,
            auth_cache: Duration::from_secs(1),
            timeout: Duration::from_secs(2),
            oauth_mechanism: Default::default(),
            oauth_user_claim: "email".into(),
            doveadm: None,
        };
        let m = ImapMailServer::new(&cfg).unwrap();
        let err = m
            .login(
                "a",
                &MailCredential::Password("b".into()),
                SubscriptionChange::Keep,
                None,
            )
            .await
            .unwrap_err();
        assert!(matches!(err, MailError::Unavailable(_)), "{err:?}");
        assert_eq!(
            m.clear_subscription_as_master("a").await.unwrap_err(),
            MailError::NoMasterUser
        );
    }
}
