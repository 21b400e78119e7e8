//! The mail server seam: checking a user's own mail credentials with an IMAP login, and
//! setting or clearing the ox subscription METADATA in that same IMAP session.
//!
//! [`MailServer`] is the trait the HTTP layer and the outbox use; [`ImapMailServer`] is
//! the real one (async-imap over plain TCP, STARTTLS or implicit TLS with rustls/ring).
//! async-imap has no SETMETADATA call, so the command goes through its raw command
//! facility ([`setmetadata_command`] builds it); responses are still parsed by async-imap.

use std::fmt;
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

use crate::config::{split_host_port, DovecotConfig, ImapTls, Secret};
use crate::store::BoxFuture;

/// The server METADATA entry the ox driver (and the dovepush plugin) reads.
pub const METADATA_ENTRY: &str = "/private/vendor/vendor.dovecot/http-notify";

/// The subscription value written for a login (`user=<login>`): with the plugin's
/// `user_from_metadata`, events then carry exactly this login.
pub fn subscription_value(login: &str) -> String {
    format!("user={login}")
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
    /// Logs in as `login` with `password`; on success applies `change` in the same session.
    fn login<'a>(
        &'a self,
        login: &'a str,
        password: &'a str,
        change: SubscriptionChange,
    ) -> BoxFuture<'a, Result<(), MailError>>;

    /// Sets the user's METADATA to NIL through the configured master user (used when a
    /// transport removed the user's last device); [`MailError::NoMasterUser`] without one.
    fn clear_subscription_as_master<'a>(
        &'a self,
        user: &'a str,
    ) -> BoxFuture<'a, Result<(), MailError>>;
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
}

impl fmt::Debug for ImapMailServer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ImapMailServer")
            .field("host", &self.host)
            .field("port", &self.port)
            .field("tls", &self.tls)
            .field("master_user", &self.master.as_ref().map(|m| &m.0))
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
        password: &str,
        change: SubscriptionChange,
    ) -> Result<(), MailError> {
        let client = self.connect().await?;
        let mut session = client
            .login(login, password)
            .await
            .map_err(|(e, _)| classify_login_error(e))?;
        let result = apply(&mut session, &change).await;
        let _ = session.logout().await;
        result
    }

    async fn clear_as_master(&self, user: &str) -> Result<(), MailError> {
        let (master, password) = self.master.as_ref().ok_or(MailError::NoMasterUser)?;
        let client = self.connect().await?;
        let plain = PlainAuth {
            response: format!("{user}\0{master}\0{}", password.expose()).into_bytes(),
        };
        let mut session = client
            .authenticate("PLAIN", plain)
            .await
            .map_err(|(e, _)| classify_login_error(e))?;
        let result = apply(&mut session, &SubscriptionChange::Clear).await;
        let _ = session.logout().await;
        result
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

/// SASL PLAIN with an authorization id (Dovecot master-user login).
struct PlainAuth {
    response: Vec<u8>,
}

impl async_imap::Authenticator for PlainAuth {
    type Response = Vec<u8>;
    fn process(&mut self, _challenge: &[u8]) -> Vec<u8> {
        std::mem::take(&mut self.response)
    }
}

impl MailServer for ImapMailServer {
    fn login<'a>(
        &'a self,
        login: &'a str,
        password: &'a str,
        change: SubscriptionChange,
    ) -> BoxFuture<'a, Result<(), MailError>> {
        Box::pin(async move {
            tokio::time::timeout(self.timeout, self.login_inner(login, password, change))
                .await
                .unwrap_or_else(|_| Err(MailError::Unavailable("IMAP timed out".into())))
        })
    }

    fn clear_subscription_as_master<'a>(
        &'a self,
        user: &'a str,
    ) -> BoxFuture<'a, Result<(), MailError>> {
        Box::pin(async move {
            tokio::time::timeout(self.timeout, self.clear_as_master(user))
                .await
                .unwrap_or_else(|_| Err(MailError::Unavailable("IMAP timed out".into())))
        })
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
        };
        let m = ImapMailServer::new(&cfg).unwrap();
        let err = m
            .login("a", "b", SubscriptionChange::Keep)
            .await
            .unwrap_err();
        assert!(matches!(err, MailError::Unavailable(_)), "{err:?}");
        assert_eq!(
            m.clear_subscription_as_master("a").await.unwrap_err(),
            MailError::NoMasterUser
        );
    }
}
