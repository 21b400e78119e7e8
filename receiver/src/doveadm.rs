//! Dovecot's doveadm HTTP API as a [`SubscriptionDirectory`]: `mailbox metadata get`,
//! `set` and `unset` of the ox subscription entry for any user, and `user '*'` to list
//! every user (whose values are then read one by one), without any user's password
//! (`[dovecot] doveadm_url`, `doveadm_api_key`). (`mailbox metadata get -A` would be one
//! request, but Dovecot 2.3.19 answers it with empty values for server attributes.)
//!
//! One request per call over a fresh HTTP/1.1 connection (resync is rare), each bounded by
//! `[dovecot] timeout_seconds`. The API key goes in `Authorization: X-Dovecot-API
//! <base64>`; replies are `[["doveadmResponse", [rows], tag]]` or `[["error", {"exitCode":
//! n}, tag]]`.

use std::time::Duration;

use base64::Engine;
use bytes::Bytes;
use futures_util::future::BoxFuture;
use futures_util::StreamExt;
use http_body_util::{BodyExt, Full, Limited};
use hyper::header::{AUTHORIZATION, CONTENT_TYPE, HOST};
use hyper::Request;
use hyper_util::rt::TokioIo;
use serde_json::{json, Value};
use tokio::net::TcpStream;

use crate::config::{split_host_port, DoveadmConfig, Secret};
use crate::domain::resync::{SubscriptionDirectory, UserValues};
use crate::mailserver::{MailError, METADATA_ENTRY};

/// Largest doveadm reply read (`user '*'` lists every user).
const MAX_REPLY: usize = 64 * 1024 * 1024;

/// Reads in flight at once while listing every user.
const LIST_CONCURRENCY: usize = 8;

/// The doveadm HTTP API client.
pub struct DoveadmClient {
    authority: String,
    path: String,
    api_key: Secret,
    timeout: Duration,
}

impl std::fmt::Debug for DoveadmClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DoveadmClient")
            .field("authority", &self.authority)
            .field("path", &self.path)
            .finish_non_exhaustive()
    }
}

impl DoveadmClient {
    /// From `[dovecot] doveadm_url` (checked by the config: `http://host:port/path`).
    pub fn new(cfg: &DoveadmConfig, timeout: Duration) -> Result<Self, MailError> {
        let bad = || MailError::Unavailable(format!("bad doveadm_url {}", cfg.url));
        let rest = cfg.url.strip_prefix("http://").ok_or_else(bad)?;
        let (authority, path) = rest.split_once('/').ok_or_else(bad)?;
        split_host_port(authority).ok_or_else(bad)?;
        Ok(Self {
            authority: authority.to_owned(),
            path: format!("/{path}"),
            api_key: cfg.api_key.clone(),
            timeout,
        })
    }

    /// Runs one doveadm command; returns its result (rows, or an object).
    async fn command(&self, name: &str, params: Value) -> Result<Value, MailError> {
        tokio::time::timeout(self.timeout, self.command_inner(name, params))
            .await
            .unwrap_or_else(|_| Err(MailError::Unavailable("doveadm timed out".into())))
    }

    async fn command_inner(&self, name: &str, params: Value) -> Result<Value, MailError> {
        let unavailable =
            |e: &dyn std::fmt::Display| MailError::Unavailable(format!("doveadm: {e}"));
        let body = json!([[name, params, "dovepush"]]).to_string();
        let tcp = TcpStream::connect(self.authority.as_str())
            .await
            .map_err(|e| unavailable(&e))?;
        let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tcp))
            .await
            .map_err(|e| unavailable(&e))?;
        let conn = tokio::spawn(conn);
        let key = base64::engine::general_purpose::STANDARD.encode(self.api_key.expose());
        let req = Request::post(&self.path)
            .header(HOST, &self.authority)
            .header(CONTENT_TYPE, "application/json")
            .header(AUTHORIZATION, format!("X-Dovecot-API {key}"))
            .body(Full::new(Bytes::from(body)))
            .map_err(|e| unavailable(&e))?;
        let resp = sender
            .send_request(req)
            .await
            .map_err(|e| unavailable(&e))?;
        let status = resp.status();
        let bytes = Limited::new(resp.into_body(), MAX_REPLY)
            .collect()
            .await
            .map_err(|e| unavailable(&e))?
            .to_bytes();
        conn.abort();
        if status == hyper::StatusCode::UNAUTHORIZED {
            return Err(MailError::Unavailable(
                "doveadm refused the API key (doveadm_api_key)".into(),
            ));
        }
        if !status.is_success() {
            return Err(MailError::Unavailable(format!("doveadm answered {status}")));
        }
        parse_reply(&bytes)
    }

    fn params(user: &str) -> Value {
        json!({
            "user": user,
            "mailbox": "",
            "allowEmptyMailboxName": true,
            "key": METADATA_ENTRY,
        })
    }
}

/// The result of a doveadm reply, or the command's failure.
pub fn parse_reply(bytes: &[u8]) -> Result<Value, MailError> {
    let bad = |what: &str| MailError::Unavailable(format!("doveadm: {what}"));
    let reply: Value = serde_json::from_slice(bytes).map_err(|_| bad("reply is not JSON"))?;
    let first = reply
        .as_array()
        .and_then(|a| a.first())
        .and_then(Value::as_array)
        .ok_or_else(|| bad("unexpected reply shape"))?;
    match (first.first().and_then(Value::as_str), first.get(1)) {
        (Some("doveadmResponse"), Some(result)) => Ok(result.clone()),
        (Some("error"), Some(e)) => {
            let code = e["exitCode"].as_i64().unwrap_or(-1);
            // 67 (EX_NOUSER): no such user.
            Err(MailError::Metadata(format!("doveadm exit code {code}")))
        }
        _ => Err(bad("unexpected reply shape")),
    }
}

impl SubscriptionDirectory for DoveadmClient {
    fn name(&self) -> &'static str {
        "doveadm"
    }

    fn get<'a>(&'a self, user: &'a str) -> BoxFuture<'a, Result<Option<String>, MailError>> {
        Box::pin(async move {
            let rows = self
                .command("mailboxMetadataGet", Self::params(user))
                .await?;
            Ok(rows
                .get(0)
                .and_then(|r| r["value"].as_str())
                .filter(|v| !v.is_empty())
                .map(str::to_owned))
        })
    }

    fn set<'a>(
        &'a self,
        user: &'a str,
        value: Option<&'a str>,
    ) -> BoxFuture<'a, Result<(), MailError>> {
        Box::pin(async move {
            let mut params = Self::params(user);
            let name = match value {
                Some(v) => {
                    params["value"] = v.into();
                    "mailboxMetadataSet"
                }
                None => "mailboxMetadataUnset",
            };
            self.command(name, params).await.map(|_| ())
        })
    }

    fn list_all(&self) -> BoxFuture<'_, Result<Option<UserValues>, MailError>> {
        Box::pin(async move {
            let listed = self.command("user", json!({ "userMask": ["*"] })).await?;
            let users: Vec<String> = listed["userList"]
                .as_array()
                .ok_or_else(|| MailError::Unavailable("doveadm user: no userList".into()))?
                .iter()
                .filter_map(|u| u.as_str().map(str::to_owned))
                .collect();
            let mut reads = Vec::with_capacity(users.len());
            for user in users {
                reads.push(async move {
                    let value = self.get(&user).await?;
                    Ok::<_, MailError>(value.map(|v| (user, v)))
                });
            }
            let values: Vec<Result<Option<(String, String)>, MailError>> =
                futures_util::stream::iter(reads)
                    .buffer_unordered(LIST_CONCURRENCY)
                    .collect()
                    .await;
            let mut out = Vec::new();
            for v in values {
                out.extend(v?);
            }
            Ok(Some(out))
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn replies() {
        let rows = parse_reply(br#"[["doveadmResponse",[{"value":"user=alice"}],"t"]]"#).unwrap();
        assert_eq!(rows[0]["value"], "user=alice");
        let users = parse_reply(br#"[["doveadmResponse",{"userList":["a","b"]},"t"]]"#).unwrap();
        assert_eq!(users["userList"][1], "b");
        assert_eq!(
            parse_reply(br#"[["error",{"type":"exitCode", "exitCode":67},"t"]]"#),
            Err(MailError::Metadata("doveadm exit code 67".into()))
        );
        assert!(parse_reply(b"[]").is_err());
        assert!(parse_reply(b"<html>").is_err());
        let cfg = DoveadmConfig {
            url: "http://127.0.0.1:8080/doveadm/v1".into(),
            api_key: Secret::new("k"),
        };
        let c = DoveadmClient::new(&cfg, Duration::from_secs(1)).unwrap();
        assert_eq!(
            (c.authority.as_str(), c.path.as_str()),
            ("127.0.0.1:8080", "/doveadm/v1")
        );
        assert!(!format!("{c:?}").contains("api_key"));
    }
}
