//! APNs provider authentication tokens: ES256 JWTs (`kid`, `iss`, `iat`) signed with ring
//! (the shared [`Es256Signer`]), reused for [`TOKEN_REUSE`] and renewed well before Apple's 60-minute limit; one forced
//! renewal per rejection, at most once per [`FORCED_RENEWAL_COOLDOWN`].

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use hyper::header::HeaderValue;

use crate::jwt::Es256Signer;

/// A token is used for this long (Apple: no more often than every 20 min, no less than 60).
pub(crate) const TOKEN_REUSE: Duration = Duration::from_secs(40 * 60);
/// After APNs rejects a token, a new one is minted at most this often.
pub(crate) const FORCED_RENEWAL_COOLDOWN: Duration = Duration::from_secs(60);

/// One minted provider token.
pub(crate) struct ProviderToken {
    /// `bearer <jwt>`, ready for the `authorization` header.
    pub header: HeaderValue,
    pub generation: u64,
    minted: Instant,
}

/// Mints and caches the provider token of one Apple key (team id + key id).
pub(crate) struct ProviderTokens {
    signer: Es256Signer,
    key_id: String,
    team_id: String,
    current: RwLock<Option<Arc<ProviderToken>>>,
    last_forced: RwLock<Option<Instant>>,
    mints: AtomicU64,
}

impl ProviderTokens {
    /// From the `.p8` file's content (PKCS#8 PEM with a P-256 key).
    pub(crate) fn new(p8_pem: &[u8], key_id: &str, team_id: &str) -> Result<Self, String> {
        Ok(ProviderTokens {
            signer: Es256Signer::from_pkcs8_pem(p8_pem)?,
            key_id: key_id.to_owned(),
            team_id: team_id.to_owned(),
            current: RwLock::new(None),
            last_forced: RwLock::new(None),
            mints: AtomicU64::new(0),
        })
    }

    /// The token to use now, minting one if there is none or it is older than [`TOKEN_REUSE`].
    pub(crate) fn current(&self) -> Result<Arc<ProviderToken>, String> {
        if let Some(token) = self.read_current() {
            if token.minted.elapsed() < TOKEN_REUSE {
                return Ok(token);
            }
        }
        let mut slot = self.current.write().unwrap_or_else(|e| e.into_inner());
        if let Some(token) = slot.as_ref() {
            if token.minted.elapsed() < TOKEN_REUSE {
                return Ok(token.clone());
            }
        }
        let token = Arc::new(self.mint()?);
        *slot = Some(token.clone());
        Ok(token)
    }

    /// APNs rejected `rejected`. Returns a new token if one may be minted (the rejected one is
    /// still current and no forced renewal happened within the cooldown), else `None`.
    pub(crate) fn renew_after_rejection(
        &self,
        rejected: &ProviderToken,
    ) -> Result<Option<Arc<ProviderToken>>, String> {
        let mut slot = self.current.write().unwrap_or_else(|e| e.into_inner());
        if let Some(token) = slot.as_ref() {
            if token.generation != rejected.generation {
                // Someone else already renewed it: use theirs.
                return Ok(Some(token.clone()));
            }
        }
        let mut last = self.last_forced.write().unwrap_or_else(|e| e.into_inner());
        if last.is_some_and(|t| t.elapsed() < FORCED_RENEWAL_COOLDOWN) {
            return Ok(None);
        }
        let token = Arc::new(self.mint()?);
        *slot = Some(token.clone());
        *last = Some(Instant::now());
        Ok(Some(token))
    }

    /// How many tokens were minted so far.
    pub(crate) fn mints(&self) -> u64 {
        self.mints.load(Ordering::Relaxed)
    }

    fn read_current(&self) -> Option<Arc<ProviderToken>> {
        self.current
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    fn mint(&self) -> Result<ProviderToken, String> {
        let iat = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_err(|_| "system clock before 1970".to_owned())?
            .as_secs();
        let header = serde_json::json!({"alg": "ES256", "kid": self.key_id});
        let claims = serde_json::json!({"iss": self.team_id, "iat": iat});
        let jwt = self.signer.sign(&header, &claims)?;
        let mut header = HeaderValue::from_str(&format!("bearer {jwt}"))
            .map_err(|_| "token is not a header value".to_owned())?;
        header.set_sensitive(true);
        let generation = self.mints.fetch_add(1, Ordering::Relaxed) + 1;
        Ok(ProviderToken {
            header,
            generation,
            minted: Instant::now(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::jwt::tests::{pkcs8_der as test_key, verify};

    fn pem(der: &[u8]) -> Vec<u8> {
        crate::jwt::tests::pem("PRIVATE KEY", der)
    }

    #[test]
    fn token_is_reused_and_verifies() {
        let der = test_key();
        let tokens = ProviderTokens::new(&pem(&der), "KEY1234567", "TEAM123456").unwrap();
        let a = tokens.current().unwrap();
        let b = tokens.current().unwrap();
        assert_eq!(a.header, b.header);
        assert_eq!(tokens.mints(), 1);

        let jwt = a.header.to_str().unwrap().strip_prefix("bearer ").unwrap();
        let (head, claims) = verify(jwt, tokens.signer.public_key());
        assert_eq!(head["alg"], "ES256");
        assert_eq!(head["kid"], "KEY1234567");
        assert_eq!(claims["iss"], "TEAM123456");
        assert!(claims["iat"].as_u64().unwrap() > 1_700_000_000);
    }

    #[test]
    fn forced_renewal_happens_once_per_generation_and_cooldown() {
        let tokens = ProviderTokens::new(&pem(&test_key()), "K", "T").unwrap();
        let first = tokens.current().unwrap();
        let second = tokens.renew_after_rejection(&first).unwrap().unwrap();
        assert_ne!(first.generation, second.generation);
        // A late rejection of the first token gets the already renewed one.
        let again = tokens.renew_after_rejection(&first).unwrap().unwrap();
        assert_eq!(again.generation, second.generation);
        // A rejection of the new one within the cooldown mints nothing.
        assert!(tokens.renew_after_rejection(&second).unwrap().is_none());
        assert_eq!(tokens.mints(), 2);
    }

    #[test]
    fn rejects_non_p256_keys() {
        assert!(ProviderTokens::new(b"not a key", "K", "T").is_err());
    }
}
