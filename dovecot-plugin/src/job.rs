//! A notification ready to send: one event for one endpoint, with everything the
//! background sender (and a later process replaying the spool) needs, as owned data.

use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use crate::config::Endpoint;

#[derive(Debug, Clone)]
pub struct Job {
    /// The event id (`X-Dovepush-Event-Id`), the same for every endpoint of one event.
    pub event_id: String,
    /// The Dovecot username, for log lines.
    pub user: String,
    pub endpoint: Arc<Endpoint>,
    /// The JSON body.
    pub body: String,
    /// When the mail was delivered (milliseconds since the epoch).
    pub created_ms: u64,
}

pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

impl Job {
    /// The spool's on-disk form (version 1). It holds the endpoint URL with its
    /// credentials, so spool files are created mode 0600.
    pub fn to_record(&self) -> String {
        serde_json::json!({
            "v": 1,
            "id": self.event_id,
            "user": self.user,
            "url": self.endpoint.url,
            "max_retries": self.endpoint.max_retries,
            "timeout_ms": self.endpoint.timeout.as_millis() as u64,
            "created_ms": self.created_ms,
            "body": self.body,
        })
        .to_string()
    }

    pub fn from_record(text: &str) -> Result<Job, String> {
        let v: serde_json::Value =
            serde_json::from_str(text).map_err(|e| format!("not JSON ({e})"))?;
        let field = |name: &str| {
            v.get(name)
                .ok_or_else(|| format!("field {name} is missing"))
        };
        let text_field = |name: &str| -> Result<String, String> {
            field(name)?
                .as_str()
                .map(str::to_string)
                .ok_or_else(|| format!("field {name} is not a string"))
        };
        let number = |name: &str| -> Result<u64, String> {
            field(name)?
                .as_u64()
                .ok_or_else(|| format!("field {name} is not a number"))
        };
        if number("v")? != 1 {
            return Err("unknown record version".into());
        }
        let endpoint = Endpoint::parse(
            "spool record url",
            &text_field("url")?,
            number("max_retries")? as u32,
            Duration::from_millis(number("timeout_ms")?),
            false,
        )
        .map_err(|e| e.to_string())?;
        Ok(Job {
            event_id: text_field("id")?,
            user: text_field("user")?,
            endpoint: Arc::new(endpoint),
            body: text_field("body")?,
            created_ms: number("created_ms")?,
        })
    }
}

#[cfg(test)]
pub(crate) fn test_job(id: &str, url: &str) -> Job {
    Job {
        event_id: id.into(),
        user: "alice".into(),
        endpoint: Arc::new(
            Endpoint::parse("t", url, 1, Duration::from_millis(500), false).unwrap(),
        ),
        body: format!("{{\"user\":\"alice\",\"id\":\"{id}\"}}"),
        created_ms: now_ms(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn record_round_trip_keeps_credentials_and_body() {
        let job = test_job("e1", "http://u:p%40w@127.0.0.1:9/notify");
        let back = Job::from_record(&job.to_record()).unwrap();
        assert_eq!(back.event_id, "e1");
        assert_eq!(back.body, job.body);
        assert_eq!(back.endpoint.url, job.endpoint.url);
        assert_eq!(back.endpoint.authorization, job.endpoint.authorization);
        assert_eq!(back.endpoint.timeout, Duration::from_millis(500));
    }

    #[test]
    fn bad_records_are_errors() {
        assert!(Job::from_record("nope").is_err());
        assert!(Job::from_record("{\"v\":2}").is_err());
        assert!(Job::from_record("{\"v\":1,\"id\":\"x\"}").is_err());
    }
}
