//! Padding-tolerant JWT pieces for the mocks: split, decode and verify the signature over the
//! raw `header.claims` bytes with ring.

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use ring::signature::{UnparsedPublicKey, VerificationAlgorithm};
use serde_json::Value;

/// A JWT split into its decoded parts.
pub(crate) struct Jwt<'a> {
    pub header: Value,
    pub claims: Value,
    signing_input: &'a str,
    signature: Vec<u8>,
}

/// Base64url (or standard base64) with or without `=` padding.
pub(crate) fn b64(part: &str) -> Option<Vec<u8>> {
    let cleaned: String = part
        .trim_end_matches('=')
        .chars()
        .map(|c| match c {
            '+' => '-',
            '/' => '_',
            c => c,
        })
        .collect();
    URL_SAFE_NO_PAD.decode(cleaned).ok()
}

impl<'a> Jwt<'a> {
    pub(crate) fn parse(token: &'a str) -> Option<Self> {
        let (signing_input, signature) = token.rsplit_once('.')?;
        let (header, claims) = signing_input.split_once('.')?;
        Some(Jwt {
            header: serde_json::from_slice(&b64(header)?).ok()?,
            claims: serde_json::from_slice(&b64(claims)?).ok()?,
            signing_input,
            signature: b64(signature)?,
        })
    }

    pub(crate) fn verify(
        &self,
        alg: &'static dyn VerificationAlgorithm,
        public_key: &[u8],
    ) -> bool {
        UnparsedPublicKey::new(alg, public_key)
            .verify(self.signing_input.as_bytes(), &self.signature)
            .is_ok()
    }
}

pub(crate) fn now_secs() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}
