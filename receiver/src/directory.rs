//! How resync and the drift status reach every user's subscription METADATA: the
//! doveadm HTTP API when `[dovecot] doveadm_url` is set ([`crate::doveadm`]), else the
//! IMAP master user (`[dovecot] master_user`; [`MasterUserDirectory`]), else not at all.

use std::sync::Arc;

use futures_util::future::BoxFuture;

use crate::config::DovecotConfig;
use crate::domain::resync::{SubscriptionDirectory, UserValues};
use crate::doveadm::DoveadmClient;
use crate::mailserver::{ImapMailServer, MailError};

/// The IMAP master-user login as a [`SubscriptionDirectory`] (it cannot list users).
#[derive(Debug)]
pub struct MasterUserDirectory(pub Arc<ImapMailServer>);

impl SubscriptionDirectory for MasterUserDirectory {
    fn name(&self) -> &'static str {
        "imap master user"
    }

    fn get<'a>(&'a self, user: &'a str) -> BoxFuture<'a, Result<Option<String>, MailError>> {
        Box::pin(self.0.subscription_as_master(user))
    }

    fn set<'a>(
        &'a self,
        user: &'a str,
        value: Option<&'a str>,
    ) -> BoxFuture<'a, Result<(), MailError>> {
        Box::pin(self.0.set_subscription_as_master(user, value))
    }

    fn list_all(&self) -> BoxFuture<'_, Result<Option<UserValues>, MailError>> {
        Box::pin(async { Ok(None) })
    }
}

/// The directory `cfg` allows, if any.
pub fn from_config(
    cfg: &DovecotConfig,
) -> Result<Option<Arc<dyn SubscriptionDirectory>>, MailError> {
    if let Some(doveadm) = &cfg.doveadm {
        return Ok(Some(Arc::new(DoveadmClient::new(doveadm, cfg.timeout)?)));
    }
    if cfg.master_user.is_some() {
        let imap = Arc::new(ImapMailServer::new(cfg)?);
        return Ok(Some(Arc::new(MasterUserDirectory(imap))));
    }
    Ok(None)
}
