//! The webhook's serving certificate: generation (rcgen, ring), checks (webpki, as the API
//! server will verify it), and the hot-swappable store the TLS acceptor reads.

use std::collections::BTreeMap;
use std::fmt;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use arc_swap::ArcSwapOption;
use k8s_openapi::ByteString;
use k8s_openapi::api::core::v1::Secret;
use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair, KeyUsagePurpose,
    SerialNumber,
};
use rustls::RootCertStore;
use rustls::client::WebPkiServerVerifier;
use rustls::client::danger::ServerCertVerifier;
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;

/// Secret key of the CA bundle (PEM; the current CA first).
pub const KEY_CA: &str = "ca.crt";
/// Secret key of the serving certificate chain (PEM).
pub const KEY_CERT: &str = "tls.crt";
/// Secret key of the serving key (PEM, PKCS#8).
pub const KEY_KEY: &str = "tls.key";

/// What is wrong with a certificate or key.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TlsError {
    /// rcgen failed.
    #[error("cannot generate a certificate: {0}")]
    Generate(String),
    /// A Secret key is absent.
    #[error("the Secret has no {0}")]
    Missing(&'static str),
    /// A PEM block doesn't parse.
    #[error("{what} is not valid PEM: {reason}")]
    Pem {
        /// Which key.
        what: &'static str,
        /// The parser's message.
        reason: String,
    },
    /// The certificate doesn't verify (expired, wrong name, wrong CA, key mismatch).
    #[error("the certificate is not usable: {0}")]
    Invalid(String),
}

/// A CA bundle, a serving certificate chain and its key, as PEM.
#[derive(Clone, PartialEq, Eq)]
pub struct CertBundle {
    /// CA certificates the API server should trust (current first).
    pub ca_pem: String,
    /// Serving certificate (then any intermediates).
    pub cert_pem: String,
    /// Serving key.
    pub key_pem: String,
}

impl fmt::Debug for CertBundle {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CertBundle")
            .field("ca_pem", &self.ca_pem)
            .field("cert_pem", &self.cert_pem)
            .field("key_pem", &"<redacted>")
            .finish()
    }
}

fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn certs(pem: &str, what: &'static str) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let certs = CertificateDer::pem_slice_iter(pem.as_bytes())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| TlsError::Pem {
            what,
            reason: e.to_string(),
        })?;
    if certs.is_empty() {
        return Err(TlsError::Pem {
            what,
            reason: "no CERTIFICATE block".to_owned(),
        });
    }
    Ok(certs)
}

fn generated(e: rcgen::Error) -> TlsError {
    TlsError::Generate(e.to_string())
}

fn offset(t: SystemTime) -> time::OffsetDateTime {
    time::OffsetDateTime::from(t)
}

impl CertBundle {
    /// A new CA and a serving certificate for `dns_names` (the first is the subject), both
    /// valid from an hour before `now` (clock skew) for `validity`. Keys are ECDSA P-256.
    ///
    /// # Errors
    ///
    /// No names, or rcgen refuses a name.
    pub fn generate(dns_names: &[String], now: SystemTime, validity: Duration) -> Result<Self, TlsError> {
        let Some(subject) = dns_names.first() else {
            return Err(TlsError::Generate("no DNS name".to_owned()));
        };
        let not_before = offset(now.checked_sub(Duration::from_secs(3600)).unwrap_or(now));
        let not_after = offset(now + validity);
        let since_epoch = now.duration_since(SystemTime::UNIX_EPOCH).unwrap_or_default().as_secs();

        let ca_key = KeyPair::generate().map_err(generated)?;
        let mut ca = CertificateParams::new(Vec::<String>::new()).map_err(generated)?;
        // A distinct name per generation tells an old CA from a new one in the bundle.
        ca.distinguished_name
            .push(DnType::CommonName, format!("wsgate webhook CA {since_epoch}"));
        ca.distinguished_name.push(DnType::OrganizationName, "wsgate");
        ca.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        ca.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        ca.not_before = not_before;
        ca.not_after = not_after;
        ca.serial_number = Some(random_serial());
        let ca_cert = ca.self_signed(&ca_key).map_err(generated)?;
        let issuer = Issuer::new(ca, &ca_key);

        let key = KeyPair::generate().map_err(generated)?;
        let mut leaf = CertificateParams::new(dns_names.to_vec()).map_err(generated)?;
        leaf.distinguished_name.push(DnType::CommonName, subject.clone());
        leaf.is_ca = IsCa::ExplicitNoCa;
        leaf.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        leaf.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        leaf.use_authority_key_identifier_extension = true;
        leaf.not_before = not_before;
        leaf.not_after = not_after;
        leaf.serial_number = Some(random_serial());
        let cert = leaf.signed_by(&key, &issuer).map_err(generated)?;
        Ok(Self {
            ca_pem: ca_cert.pem(),
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
        })
    }

    /// Checks, as the API server will when it calls `server_name`, that the serving certificate
    /// chains to the CA bundle, names `server_name`, is valid at `at`, and matches the key.
    ///
    /// # Errors
    ///
    /// What fails first.
    pub fn check(&self, server_name: &str, at: SystemTime) -> Result<(), TlsError> {
        let key = self.certified_key()?;
        let (end_entity, intermediates) = key
            .cert
            .split_first()
            .ok_or_else(|| TlsError::Invalid("no certificate".to_owned()))?;
        let mut roots = RootCertStore::empty();
        for ca in certs(&self.ca_pem, KEY_CA)? {
            roots
                .add(ca)
                .map_err(|e| TlsError::Invalid(format!("CA certificate: {e}")))?;
        }
        let verifier = WebPkiServerVerifier::builder_with_provider(Arc::new(roots), provider())
            .build()
            .map_err(|e| TlsError::Invalid(e.to_string()))?;
        let name = ServerName::try_from(server_name.to_owned())
            .map_err(|e| TlsError::Invalid(format!("{server_name}: {e}")))?;
        let at = UnixTime::since_unix_epoch(at.duration_since(SystemTime::UNIX_EPOCH).unwrap_or_default());
        verifier
            .verify_server_cert(end_entity, intermediates, &name, &[], at)
            .map(|_| ())
            .map_err(|e| TlsError::Invalid(e.to_string()))
    }

    /// The chain and signing key for rustls.
    ///
    /// # Errors
    ///
    /// Unparsable PEM, an unsupported key, or a key that doesn't match the certificate.
    pub fn certified_key(&self) -> Result<Arc<CertifiedKey>, TlsError> {
        let chain = certs(&self.cert_pem, KEY_CERT)?;
        let key = PrivateKeyDer::from_pem_slice(self.key_pem.as_bytes()).map_err(|e| TlsError::Pem {
            what: KEY_KEY,
            reason: e.to_string(),
        })?;
        CertifiedKey::from_der(chain, key, &provider())
            .map(Arc::new)
            .map_err(|e| TlsError::Invalid(e.to_string()))
    }

    /// The first (current) CA certificate of the bundle, as PEM.
    pub fn current_ca_pem(&self) -> Option<String> {
        let first = CertificateDer::pem_slice_iter(self.ca_pem.as_bytes()).next()?.ok()?;
        Some(pem_encode("CERTIFICATE", first.as_ref()))
    }

    /// Reads `ca.crt`, `tls.crt` and `tls.key` from a Secret. Doesn't verify them: see
    /// [`check`](Self::check).
    ///
    /// # Errors
    ///
    /// A key is absent or not UTF-8.
    pub fn from_secret(secret: &Secret) -> Result<Self, TlsError> {
        let data = secret.data.clone().unwrap_or_default();
        let text = |key: &'static str| -> Result<String, TlsError> {
            let bytes = data.get(key).ok_or(TlsError::Missing(key))?;
            String::from_utf8(bytes.0.clone()).map_err(|_| TlsError::Pem {
                what: key,
                reason: "not UTF-8".to_owned(),
            })
        };
        Ok(Self {
            ca_pem: text(KEY_CA)?,
            cert_pem: text(KEY_CERT)?,
            key_pem: text(KEY_KEY)?,
        })
    }

    /// The Secret `data` holding this bundle.
    pub fn to_secret_data(&self) -> BTreeMap<String, ByteString> {
        BTreeMap::from([
            (KEY_CA.to_owned(), ByteString(self.ca_pem.as_bytes().to_vec())),
            (KEY_CERT.to_owned(), ByteString(self.cert_pem.as_bytes().to_vec())),
            (KEY_KEY.to_owned(), ByteString(self.key_pem.as_bytes().to_vec())),
        ])
    }
}

fn random_serial() -> SerialNumber {
    let mut bytes: [u8; 16] = rand::random();
    // Positive and without a leading zero octet: a well-formed 128-bit serial.
    bytes[0] = (bytes[0] & 0x7f) | 0x40;
    SerialNumber::from_slice(&bytes)
}

fn pem_encode(label: &str, der: &[u8]) -> String {
    use base64::Engine as _;
    let b64 = base64::engine::general_purpose::STANDARD.encode(der);
    let mut out = format!("-----BEGIN {label}-----\n");
    for line in b64.as_bytes().chunks(64) {
        out.push_str(&String::from_utf8_lossy(line));
        out.push('\n');
    }
    out.push_str(&format!("-----END {label}-----\n"));
    out
}

/// The certificate the webhook serves, replaced without restarting the listener.
///
/// Until a certificate is installed, handshakes fail (the API server then applies the
/// webhook's `failurePolicy`).
#[derive(Debug, Default)]
pub struct CertStore {
    current: ArcSwapOption<CertifiedKey>,
    /// The PEM of what is installed, to skip reinstalling the same certificate.
    installed: Mutex<Option<String>>,
}

impl CertStore {
    /// An empty store.
    pub fn new() -> Self {
        Self::default()
    }

    /// Serves `bundle` from the next handshake on. Returns whether it differs from the
    /// certificate served so far.
    ///
    /// # Errors
    ///
    /// The bundle's certificate or key is unusable (the previous one stays).
    pub fn install(&self, bundle: &CertBundle) -> Result<bool, TlsError> {
        let mut installed = self.installed.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        if installed.as_deref() == Some(bundle.cert_pem.as_str()) {
            return Ok(false);
        }
        let key = bundle.certified_key()?;
        self.current.store(Some(key));
        *installed = Some(bundle.cert_pem.clone());
        Ok(true)
    }

    /// Whether a certificate is installed.
    pub fn is_ready(&self) -> bool {
        self.current.load().is_some()
    }
}

impl ResolvesServerCert for CertStore {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        self.current.load_full()
    }
}

/// A TLS server configuration (TLS 1.2 and 1.3, ALPN `h2` and `http/1.1`) serving the
/// certificate in `store`.
///
/// # Errors
///
/// The ring provider lacks the default protocol versions (it doesn't).
pub fn server_config(store: Arc<CertStore>) -> Result<Arc<rustls::ServerConfig>, TlsError> {
    let mut config = rustls::ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| TlsError::Invalid(e.to_string()))?
        .with_no_client_auth()
        .with_cert_resolver(store);
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(Arc::new(config))
}

#[cfg(test)]
mod tests {
    use super::*;

    const DAY: Duration = Duration::from_secs(86_400);

    fn names() -> Vec<String> {
        [
            "wsgate-controller",
            "wsgate-controller.ops.svc",
            "wsgate-controller.ops.svc.cluster.local",
        ]
        .map(str::to_owned)
        .to_vec()
    }

    #[test]
    fn generated_certificates_verify_for_their_names_and_lifetime() {
        let now = SystemTime::now();
        let bundle = CertBundle::generate(&names(), now, 365 * DAY).expect("generate");
        bundle.check("wsgate-controller.ops.svc", now).expect("valid now");
        bundle
            .check("wsgate-controller.ops.svc", now + 300 * DAY)
            .expect("valid in 300 days");
        let expired = bundle
            .check("wsgate-controller.ops.svc", now + 366 * DAY)
            .expect_err("expired");
        assert!(expired.to_string().contains("expired"), "{expired}");
        let wrong = bundle.check("other.ops.svc", now).expect_err("wrong name");
        assert!(matches!(wrong, TlsError::Invalid(_)));
    }

    #[test]
    fn a_certificate_from_another_ca_or_key_is_refused() {
        let now = SystemTime::now();
        let a = CertBundle::generate(&names(), now, 30 * DAY).expect("a");
        let b = CertBundle::generate(&names(), now, 30 * DAY).expect("b");
        let mixed_ca = CertBundle {
            ca_pem: b.ca_pem.clone(),
            ..a.clone()
        };
        assert!(mixed_ca.check("wsgate-controller.ops.svc", now).is_err());
        let mixed_key = CertBundle {
            key_pem: b.key_pem.clone(),
            ..a.clone()
        };
        assert!(mixed_key.certified_key().is_err());
        // A bundle with both CAs trusts either certificate (rotation overlap).
        let both = CertBundle {
            ca_pem: format!("{}{}", b.ca_pem, a.ca_pem),
            ..a.clone()
        };
        both.check("wsgate-controller.ops.svc", now)
            .expect("old CA still trusted");
        assert_eq!(both.current_ca_pem().as_deref(), Some(b.ca_pem.as_str()));
    }

    #[test]
    fn secrets_round_trip_and_report_missing_keys() {
        let bundle = CertBundle::generate(&names(), SystemTime::now(), DAY).expect("generate");
        let secret = Secret {
            data: Some(bundle.to_secret_data()),
            ..Secret::default()
        };
        assert_eq!(CertBundle::from_secret(&secret).expect("read"), bundle);
        assert_eq!(
            CertBundle::from_secret(&Secret::default()),
            Err(TlsError::Missing(KEY_CA))
        );
        assert!(!format!("{bundle:?}").contains("PRIVATE KEY"));
    }

    #[test]
    fn the_store_swaps_certificates_once() {
        let store = CertStore::new();
        assert!(!store.is_ready());
        let bundle = CertBundle::generate(&names(), SystemTime::now(), DAY).expect("generate");
        assert_eq!(store.install(&bundle), Ok(true));
        assert_eq!(store.install(&bundle), Ok(false));
        assert!(store.is_ready());
        let broken = CertBundle {
            key_pem: "garbage".to_owned(),
            cert_pem: "also garbage".to_owned(),
            ..bundle
        };
        assert!(store.install(&broken).is_err());
        assert!(store.is_ready(), "a bad bundle leaves the served certificate in place");
    }
}
