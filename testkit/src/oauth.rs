//! A local OAuth 2.0 issuer for tests: an ES256 key pair, the key dictionary Dovecot's
//! `oauth2` passdb reads to validate JWTs locally (`introspection_mode = local`, no
//! network), and tokens signed with it — valid ones and the usual bad ones.

use std::fs;
use std::io;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::time::{SystemTime, UNIX_EPOCH};

use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use base64::Engine;
use ring::rand::SystemRandom;
use ring::signature::{EcdsaKeyPair, KeyPair, ECDSA_P256_SHA256_FIXED_SIGNING};

/// The DER prefix of a P-256 SubjectPublicKeyInfo (id-ecPublicKey, prime256v1, then the
/// 65-byte uncompressed point as a BIT STRING).
const P256_SPKI_PREFIX: [u8; 26] = [
    0x30, 0x59, 0x30, 0x13, 0x06, 0x07, 0x2a, 0x86, 0x48, 0xce, 0x3d, 0x02, 0x01, 0x06, 0x08, 0x2a,
    0x86, 0x48, 0xce, 0x3d, 0x03, 0x01, 0x07, 0x03, 0x42, 0x00,
];

/// An issuer (`iss`) with its signing key; `audience` is the `aud` of its tokens and
/// Dovecot's `client_id`.
#[derive(Debug, Clone)]
pub struct Issuer {
    pub url: String,
    pub audience: String,
    pkcs8: Vec<u8>,
}

impl Issuer {
    /// A new issuer with a fresh key.
    pub fn new(url: &str, audience: &str) -> Issuer {
        let pkcs8 =
            EcdsaKeyPair::generate_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, &SystemRandom::new())
                .expect("generating a P-256 key")
                .as_ref()
                .to_vec();
        Issuer {
            url: url.to_owned(),
            audience: audience.to_owned(),
            pkcs8,
        }
    }

    fn key(&self) -> EcdsaKeyPair {
        EcdsaKeyPair::from_pkcs8(
            &ECDSA_P256_SHA256_FIXED_SIGNING,
            &self.pkcs8,
            &SystemRandom::new(),
        )
        .expect("our own key parses")
    }

    /// The public key as a PEM SubjectPublicKeyInfo.
    pub fn public_key_pem(&self) -> String {
        let mut der = P256_SPKI_PREFIX.to_vec();
        der.extend_from_slice(self.key().public_key().as_ref());
        let b64 = STANDARD.encode(der);
        let mut pem = String::from("-----BEGIN PUBLIC KEY-----\n");
        for line in b64.as_bytes().chunks(64) {
            pem.push_str(std::str::from_utf8(line).expect("base64 is ASCII"));
            pem.push('\n');
        }
        pem.push_str("-----END PUBLIC KEY-----\n");
        pem
    }

    /// Writes the key dictionary (`<dir>/default/ES256/default`, readable by Dovecot's
    /// auth process) and the passdb's settings file; returns the settings file's path.
    pub fn write_dovecot_files(
        &self,
        dir: &Path,
        username_claim: &str,
    ) -> io::Result<std::path::PathBuf> {
        let keys = dir.join("oauth2-keys");
        let key_dir = keys.join("default").join("ES256");
        fs::create_dir_all(&key_dir)?;
        fs::write(key_dir.join("default"), self.public_key_pem())?;
        for d in [&keys, &keys.join("default"), &key_dir] {
            fs::set_permissions(d, fs::Permissions::from_mode(0o755))?;
        }
        fs::set_permissions(key_dir.join("default"), fs::Permissions::from_mode(0o644))?;
        let settings = dir.join("oauth2.conf.ext");
        fs::write(
            &settings,
            format!(
                "introspection_mode = local\n\
                 local_validation_key_dict = fs:posix:prefix={keys}/\n\
                 username_attribute = {username_claim}\n\
                 issuers = {iss}\n\
                 client_id = {aud}\n",
                keys = keys.display(),
                iss = self.url,
                aud = self.audience,
            ),
        )?;
        fs::set_permissions(&settings, fs::Permissions::from_mode(0o644))?;
        Ok(settings)
    }

    /// A token for `user` (as `email` and `sub`) valid for an hour from now.
    pub fn token(&self, user: &str) -> String {
        let now = now();
        self.sign(&serde_json::json!({
            "iss": self.url,
            "aud": self.audience,
            "sub": user,
            "email": user,
            "iat": now,
            "nbf": now,
            "exp": now + 3600,
        }))
    }

    /// A token with exactly these claims.
    pub fn sign(&self, claims: &serde_json::Value) -> String {
        let header = URL_SAFE_NO_PAD.encode(br#"{"alg":"ES256","typ":"JWT"}"#);
        let payload = URL_SAFE_NO_PAD.encode(claims.to_string());
        let input = format!("{header}.{payload}");
        let signature = self
            .key()
            .sign(&SystemRandom::new(), input.as_bytes())
            .expect("signing");
        format!("{input}.{}", URL_SAFE_NO_PAD.encode(signature.as_ref()))
    }
}

/// Seconds since the epoch.
pub fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_verify_with_the_published_key() {
        let issuer = Issuer::new("https://idp.test", "dovepush");
        let token = issuer.token("alice");
        let (input, sig) = token.rsplit_once('.').unwrap();
        let point = issuer.key().public_key().as_ref().to_vec();
        let verifier = ring::signature::UnparsedPublicKey::new(
            &ring::signature::ECDSA_P256_SHA256_FIXED,
            point,
        );
        verifier
            .verify(input.as_bytes(), &URL_SAFE_NO_PAD.decode(sig).unwrap())
            .unwrap();
        let pem = issuer.public_key_pem();
        let der: String = pem.lines().filter(|l| !l.starts_with("-----")).collect();
        let der = STANDARD.decode(der).unwrap();
        assert_eq!(der.len(), 91);
        assert_eq!(&der[..26], &P256_SPKI_PREFIX);
    }
}
