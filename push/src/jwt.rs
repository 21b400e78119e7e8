//! ES256 (ECDSA P-256 + SHA-256) JSON Web Tokens signed with ring: the one signer behind
//! APNs provider tokens and Web Push VAPID tokens. Reads the key as PKCS#8 PEM (Apple's
//! `.p8`, `openssl genpkey -algorithm EC -pkeyopt ec_paramgen_curve:P-256`), SEC1 PEM
//! (`openssl ecparam -genkey`) or the raw 32-byte private scalar in base64url (what Web Push
//! libraries print as a VAPID private key).

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use ring::rand::SystemRandom;
use ring::signature::{EcdsaKeyPair, KeyPair, ECDSA_P256_SHA256_FIXED_SIGNING};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{PrivateKeyDer, PrivatePkcs8KeyDer};
use web_push_native::p256;
use web_push_native::p256::elliptic_curve::sec1::ToEncodedPoint;

/// A P-256 private key that signs compact ES256 JWTs.
pub(crate) struct Es256Signer {
    key: EcdsaKeyPair,
    rng: SystemRandom,
}

impl Es256Signer {
    /// From a PKCS#8 PEM (`BEGIN PRIVATE KEY`) holding a P-256 key, as Apple's `.p8`.
    pub(crate) fn from_pkcs8_pem(pem: &[u8]) -> Result<Self, String> {
        let der = PrivatePkcs8KeyDer::from_pem_slice(pem)
            .map_err(|e| format!("not a PKCS#8 PEM private key (BEGIN PRIVATE KEY): {e}"))?;
        Self::from_pkcs8_der(der.secret_pkcs8_der())
    }

    fn from_pkcs8_der(der: &[u8]) -> Result<Self, String> {
        let rng = SystemRandom::new();
        let key = EcdsaKeyPair::from_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, der, &rng)
            .map_err(|e| format!("not an ES256 (P-256) key: {e}"))?;
        Ok(Es256Signer { key, rng })
    }

    /// From a PEM file's content (PKCS#8 or SEC1 `BEGIN EC PRIVATE KEY`), or from the raw
    /// 32-byte private scalar in base64url (with or without padding).
    pub(crate) fn from_pem_or_raw(content: &[u8]) -> Result<Self, String> {
        let text = String::from_utf8_lossy(content);
        let trimmed = text.trim();
        if trimmed.starts_with("-----BEGIN") {
            return match PrivateKeyDer::from_pem_slice(content) {
                Ok(PrivateKeyDer::Pkcs8(der)) => Self::from_pkcs8_der(der.secret_pkcs8_der()),
                Ok(PrivateKeyDer::Sec1(der)) => {
                    let secret = p256::SecretKey::from_sec1_der(der.secret_sec1_der())
                        .map_err(|_| "not a P-256 key (EC PRIVATE KEY)".to_owned())?;
                    Self::from_secret(&secret)
                }
                Ok(_) => Err("an RSA key; a P-256 (EC) key is needed".to_owned()),
                Err(e) => Err(format!("no usable private key in the PEM: {e}")),
            };
        }
        let raw = URL_SAFE_NO_PAD
            .decode(trimmed.trim_end_matches('='))
            .map_err(|_| {
                "neither a PEM private key nor a base64url private key (32 bytes)".to_owned()
            })?;
        if raw.len() != 32 {
            return Err(format!(
                "a raw private key must be 32 bytes, this one has {}",
                raw.len()
            ));
        }
        let secret = p256::SecretKey::from_slice(&raw)
            .map_err(|_| "not a valid P-256 private key".to_owned())?;
        Self::from_secret(&secret)
    }

    fn from_secret(secret: &p256::SecretKey) -> Result<Self, String> {
        let public = secret.public_key().to_encoded_point(false);
        let rng = SystemRandom::new();
        let key = EcdsaKeyPair::from_private_key_and_public_key(
            &ECDSA_P256_SHA256_FIXED_SIGNING,
            &secret.to_bytes(),
            public.as_bytes(),
            &rng,
        )
        .map_err(|e| format!("not a usable P-256 key: {e}"))?;
        Ok(Es256Signer { key, rng })
    }

    /// The public key as an uncompressed point (65 bytes, `0x04 || x || y`).
    pub(crate) fn public_key(&self) -> &[u8] {
        self.key.public_key().as_ref()
    }

    /// `base64url(header).base64url(claims).base64url(signature)`.
    pub(crate) fn sign(
        &self,
        header: &serde_json::Value,
        claims: &serde_json::Value,
    ) -> Result<String, String> {
        let mut jwt = String::with_capacity(256);
        jwt.push_str(&URL_SAFE_NO_PAD.encode(header.to_string()));
        jwt.push('.');
        jwt.push_str(&URL_SAFE_NO_PAD.encode(claims.to_string()));
        let signature = self
            .key
            .sign(&self.rng, jwt.as_bytes())
            .map_err(|_| "ES256 signing failed".to_owned())?;
        jwt.push('.');
        jwt.push_str(&URL_SAFE_NO_PAD.encode(signature.as_ref()));
        Ok(jwt)
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use ring::signature::{UnparsedPublicKey, ECDSA_P256_SHA256_FIXED};

    /// A fresh P-256 key as PKCS#8 DER.
    pub(crate) fn pkcs8_der() -> Vec<u8> {
        let rng = SystemRandom::new();
        EcdsaKeyPair::generate_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, &rng)
            .unwrap()
            .as_ref()
            .to_vec()
    }

    pub(crate) fn pem(label: &str, der: &[u8]) -> Vec<u8> {
        use base64::engine::general_purpose::STANDARD;
        format!(
            "-----BEGIN {label}-----\n{}\n-----END {label}-----\n",
            STANDARD.encode(der)
        )
        .into_bytes()
    }

    /// Checks `jwt`'s signature with `public_key` and returns its header and claims.
    pub(crate) fn verify(jwt: &str, public_key: &[u8]) -> (serde_json::Value, serde_json::Value) {
        let (signed, sig) = jwt.rsplit_once('.').unwrap();
        UnparsedPublicKey::new(&ECDSA_P256_SHA256_FIXED, public_key)
            .verify(signed.as_bytes(), &URL_SAFE_NO_PAD.decode(sig).unwrap())
            .expect("signature verifies");
        let (head, claims) = signed.split_once('.').unwrap();
        let part = |p: &str| serde_json::from_slice(&URL_SAFE_NO_PAD.decode(p).unwrap()).unwrap();
        (part(head), part(claims))
    }

    #[test]
    fn signs_verifiable_tokens() {
        let signer = Es256Signer::from_pkcs8_pem(&pem("PRIVATE KEY", &pkcs8_der())).unwrap();
        let jwt = signer
            .sign(
                &serde_json::json!({"alg": "ES256"}),
                &serde_json::json!({"a": 1}),
            )
            .unwrap();
        let (head, claims) = verify(&jwt, signer.public_key());
        assert_eq!(head["alg"], "ES256");
        assert_eq!(claims["a"], 1);
    }

    #[test]
    fn reads_pkcs8_sec1_and_raw_keys_alike() {
        let secret = p256::SecretKey::from_slice(&[7u8; 32]).unwrap();
        let expected = secret.public_key().to_encoded_point(false);
        let raw = URL_SAFE_NO_PAD.encode(secret.to_bytes());
        let sec1 = secret.to_sec1_der().unwrap();
        for content in [
            raw.clone().into_bytes(),
            format!("{raw}\n").into_bytes(),
            pem("EC PRIVATE KEY", &sec1),
        ] {
            let signer = Es256Signer::from_pem_or_raw(&content).unwrap();
            assert_eq!(signer.public_key(), expected.as_bytes());
        }
        let pkcs8 = pem("PRIVATE KEY", &pkcs8_der());
        assert!(Es256Signer::from_pem_or_raw(&pkcs8).is_ok());
        assert!(Es256Signer::from_pem_or_raw(b"not a key").is_err());
        let short = URL_SAFE_NO_PAD.encode([1u8; 16]);
        let err = Es256Signer::from_pem_or_raw(short.as_bytes())
            .err()
            .unwrap();
        assert!(err.contains("32 bytes"), "{err}");
        assert!(Es256Signer::from_pkcs8_pem(b"nope").is_err());
    }
}
