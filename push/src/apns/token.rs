//! APNs provider authentication tokens: ES256 JWTs (`kid`, `iss`, `iat`) signed with ring,
//! reused for [`TOKEN_REUSE`] and renewed well before Apple's 60-minute limit; one forced
//! renewal per rejection, at most once per [`FORCED_RENEWAL_COOLDOWN`].

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use hyper::header::HeaderValue;
use ring::rand::SystemRandom;
use ring::signature::{EcdsaKeyPair, ECDSA_P256_SHA256_FIXED_SIGNING};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::PrivatePkcs8KeyDer;

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
    key: EcdsaKeyPair,
    rng: SystemRandom,
    key_id: String,
    team_id: String,
    current: RwLock<Option<Arc<ProviderToken>>>,
    last_forced: RwLock<Option<Instant>>,
    mints: AtomicU64,
}

impl ProviderTokens {
    /// From the `.p8` file's content (PKCS#8 PEM with a P-256 key).
    pub(crate) fn new(p8_pem: &[u8], key_id: &str, team_id: &str) -> Result<Self, String> {
        let der = PrivatePkcs8KeyDer::from_pem_slice(p8_pem)
            .map_err(|e| format!("not a PKCS#8 PEM private key (BEGIN PRIVATE KEY): {e}"))?;
        let rng = SystemRandom::new();
        let key = EcdsaKeyPair::from_pkcs8(
            &ECDSA_P256_SHA256_FIXED_SIGNING,
            der.secret_pkcs8_der(),
            &rng,
        )
        .map_err(|e| format!("not an ES256 (P-256) key: {e}"))?;
        Ok(ProviderTokens {
            key,
            rng,
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
        let mut jwt = String::with_capacity(200);
        jwt.push_str(&URL_SAFE_NO_PAD.encode(header.to_string()));
        jwt.push('.');
        jwt.push_str(&URL_SAFE_NO_PAD.encode(claims.to_string()));
        let signature = self
            .key
            .sign(&self.rng, jwt.as_bytes())
            .map_err(|_| "ES256 signing failed".to_owned())?;
        jwt.push('.');
        jwt.push_str(&URL_SAFE_NO_PAD.encode(signature.as_ref()));
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
    use ring::signature::{
        EcdsaKeyPair as Pair, KeyPair, UnparsedPublicKey, ECDSA_P256_SHA256_FIXED,
    };

    fn test_key() -> Vec<u8> {
        let rng = SystemRandom::new();
        let pkcs8 = Pair::generate_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, &rng).unwrap();
        PrivatePkcs8KeyDer::from(pkcs8.as_ref().to_vec())
            .secret_pkcs8_der()
            .to_vec()
    }

    fn pem(der: &[u8]) -> Vec<u8> {
        use base64::engine::general_purpose::STANDARD;
        format!(
            "-----BEGIN PRIVATE KEY-----\n{}\n-----END PRIVATE KEY-----\n",
            STANDARD.encode(der)
        )
        .into_bytes()
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
        let (signed, sig) = jwt.rsplit_once('.').unwrap();
        let rng = SystemRandom::new();
        let pair = Pair::from_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, &der, &rng).unwrap();
        UnparsedPublicKey::new(&ECDSA_P256_SHA256_FIXED, pair.public_key().as_ref())
            .verify(signed.as_bytes(), &URL_SAFE_NO_PAD.decode(sig).unwrap())
            .unwrap();
        let (head, claims) = signed.split_once('.').unwrap();
        let head: serde_json::Value =
            serde_json::from_slice(&URL_SAFE_NO_PAD.decode(head).unwrap()).unwrap();
        let claims: serde_json::Value =
            serde_json::from_slice(&URL_SAFE_NO_PAD.decode(claims).unwrap()).unwrap();
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
