//! A throwaway PKI made at test time with rcgen (ring): a CA, a server certificate for
//! `localhost`/`127.0.0.1` that the mocks present, and client certificates for APNs
//! certificate auth.

use std::io;
use std::path::Path;
use std::sync::Arc;

use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose,
};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use rustls::server::WebPkiClientVerifier;
use rustls::ServerConfig;

/// A client certificate and its key, both PEM.
#[derive(Debug, Clone)]
pub struct ClientCert {
    pub cert_pem: String,
    pub key_pem: String,
}

/// The test CA and the mocks' server certificate.
pub struct TestPki {
    ca_params: CertificateParams,
    ca_key: KeyPair,
    ca_der: CertificateDer<'static>,
    ca_pem: String,
    server_der: CertificateDer<'static>,
    server_key: Vec<u8>,
    server_pem: String,
    server_key_pem: String,
}

impl TestPki {
    /// A new CA and a server certificate valid for `localhost` and `127.0.0.1`.
    pub fn new() -> Self {
        let ca_key = KeyPair::generate().expect("generate CA key");
        let mut ca_params = CertificateParams::new(Vec::<String>::new()).expect("CA params");
        ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        ca_params
            .distinguished_name
            .push(DnType::CommonName, "dovepush mock CA (test only)");
        ca_params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let ca_cert = ca_params.self_signed(&ca_key).expect("self-sign CA");

        let server_key = KeyPair::generate().expect("generate server key");
        let mut params =
            CertificateParams::new(vec!["localhost".to_owned(), "127.0.0.1".to_owned()])
                .expect("server params");
        params
            .distinguished_name
            .push(DnType::CommonName, "dovepush mock server");
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        let issuer = Issuer::from_params(&ca_params, &ca_key);
        let server_cert = params.signed_by(&server_key, &issuer).expect("sign server");

        TestPki {
            ca_der: ca_cert.der().clone(),
            ca_pem: ca_cert.pem(),
            ca_params,
            ca_key,
            server_der: server_cert.der().clone(),
            server_key: server_key.serialize_der(),
            server_pem: server_cert.pem(),
            server_key_pem: server_key.serialize_pem(),
        }
    }

    /// The CA certificate (PEM) clients must trust (the `ca_file` of the configs).
    pub fn ca_pem(&self) -> &str {
        &self.ca_pem
    }

    /// Writes the CA certificate to `path`.
    pub fn write_ca(&self, path: &Path) -> io::Result<()> {
        std::fs::write(path, &self.ca_pem)
    }

    /// The server certificate (for `localhost` and `127.0.0.1`) and its key, PEM: for
    /// servers the tests run themselves (a private PostgreSQL with TLS).
    pub fn server_cert(&self) -> ClientCert {
        ClientCert {
            cert_pem: self.server_pem.clone(),
            key_pem: self.server_key_pem.clone(),
        }
    }

    /// A client certificate signed by the CA, e.g. CN `Apple Push Services: com.example.mail`.
    pub fn issue_client_cert(&self, common_name: &str) -> ClientCert {
        self.issue_client_cert_expiring(common_name, std::time::Duration::from_secs(365 * 86400))
    }

    /// A client certificate like [`TestPki::issue_client_cert`] whose `notAfter` is
    /// `valid_for` from now (whole seconds).
    pub fn issue_client_cert_expiring(
        &self,
        common_name: &str,
        valid_for: std::time::Duration,
    ) -> ClientCert {
        let key = KeyPair::generate().expect("generate client key");
        let mut params = CertificateParams::new(Vec::<String>::new()).expect("client params");
        let now = time::OffsetDateTime::now_utc()
            .replace_nanosecond(0)
            .expect("0 ns");
        params.not_before = now - time::Duration::days(1);
        params.not_after = now + valid_for;
        params
            .distinguished_name
            .push(DnType::CommonName, common_name);
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        let issuer = Issuer::from_params(&self.ca_params, &self.ca_key);
        let cert = params.signed_by(&key, &issuer).expect("sign client cert");
        ClientCert {
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
        }
    }

    /// A server config on ring with the given ALPN list; with `client_auth`, client
    /// certificates signed by the CA are verified when offered (but not required).
    pub(crate) fn server_config(&self, alpn: &[&[u8]], client_auth: bool) -> Arc<ServerConfig> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let builder = ServerConfig::builder_with_provider(provider.clone())
            .with_safe_default_protocol_versions()
            .expect("protocol versions");
        let builder = if client_auth {
            let mut roots = rustls::RootCertStore::empty();
            roots.add(self.ca_der.clone()).expect("CA as root");
            let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider)
                .allow_unauthenticated()
                .build()
                .expect("client verifier");
            builder.with_client_cert_verifier(verifier)
        } else {
            builder.with_no_client_auth()
        };
        let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(self.server_key.clone()));
        let mut config = builder
            .with_single_cert(vec![self.server_der.clone(), self.ca_der.clone()], key)
            .expect("server cert");
        config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
        Arc::new(config)
    }
}

impl Default for TestPki {
    fn default() -> Self {
        Self::new()
    }
}
