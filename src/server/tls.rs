//! TLS for the client listener (`wss://`, and `https://` pass-through): the certificate chain
//! and key from PEM files, served through a resolver that swaps them atomically, and reloaded
//! when the files change.
//!
//! A reload reads both files and compares their content with the last attempt (so Kubernetes
//! Secret volumes, which swap a symlink, and in-place rewrites are both seen). A new pair that
//! doesn't load (bad PEM, a key that doesn't fit the certificate) is logged and refused; the
//! certificate served so far stays. Handshakes in progress and open connections are never
//! disturbed: a swap only affects handshakes that start after it.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, SystemTime};

use arc_swap::ArcSwap;
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use sha2::{Digest, Sha256};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

/// Default of `--tls-reload-interval`.
pub const DEFAULT_RELOAD_INTERVAL: Duration = Duration::from_secs(10);

/// Why a certificate/key pair cannot be served.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TlsError {
    /// A file cannot be read.
    #[error("cannot read {}: {reason}", path.display())]
    Read {
        /// The file.
        path: PathBuf,
        /// The OS error.
        reason: String,
    },
    /// A PEM block doesn't parse.
    #[error("{} is not valid PEM: {reason}", path.display())]
    Pem {
        /// The file.
        path: PathBuf,
        /// The parser's message.
        reason: String,
    },
    /// The certificate file has no `CERTIFICATE` block.
    #[error("{} holds no certificate (PEM `CERTIFICATE` block)", path.display())]
    NoCertificate {
        /// The file.
        path: PathBuf,
    },
    /// The key file has no private key block.
    #[error("{} holds no private key (PEM `PRIVATE KEY`, `RSA PRIVATE KEY` or `EC PRIVATE KEY` block)", path.display())]
    NoKey {
        /// The file.
        path: PathBuf,
    },
    /// The key is of an unsupported kind, or doesn't belong to the certificate.
    #[error("the key in {} doesn't fit the certificate in {}: {reason}", key.display(), cert.display())]
    Key {
        /// The certificate file.
        cert: PathBuf,
        /// The key file.
        key: PathBuf,
        /// rustls's message.
        reason: String,
    },
    /// rustls refuses the server configuration.
    #[error("TLS configuration: {0}")]
    Config(String),
}

/// What the reloader has done so far (see [`ServerTls::subscribe`]).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct TlsStatus {
    /// Certificates installed, the first one included.
    pub loads: u64,
    /// Changed files that were refused.
    pub failures: u64,
    /// Why the last refused change was refused; cleared by the next successful load.
    pub last_error: Option<TlsError>,
    /// End of validity (`notAfter`) of the served certificate, when it could be read.
    pub not_after: Option<SystemTime>,
}

/// The certificate the listener serves, swapped without touching the listener.
#[derive(Debug)]
struct CertResolver {
    current: ArcSwap<CertifiedKey>,
}

impl ResolvesServerCert for CertResolver {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.current.load_full())
    }
}

struct Inner {
    cert_path: PathBuf,
    key_path: PathBuf,
    reload_interval: Duration,
    resolver: Arc<CertResolver>,
    config: Arc<rustls::ServerConfig>,
    /// Digest of the file contents last tried (installed or refused): each change is parsed
    /// and logged once.
    last_seen: Mutex<[u8; 32]>,
    status: watch::Sender<TlsStatus>,
}

/// TLS for the client listener: a rustls configuration (TLS 1.2 and 1.3, ALPN `http/1.1`,
/// the `ring` provider) whose certificate comes from two PEM files and is reloaded when they
/// change. Cheap to clone.
#[derive(Clone)]
pub struct ServerTls {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for ServerTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ServerTls")
            .field("cert", &self.inner.cert_path)
            .field("key", &self.inner.key_path)
            .field("reload_interval", &self.inner.reload_interval)
            .finish_non_exhaustive()
    }
}

fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn read(path: &Path) -> Result<Vec<u8>, TlsError> {
    std::fs::read(path).map_err(|e| TlsError::Read {
        path: path.to_owned(),
        reason: e.to_string(),
    })
}

fn digest(cert: &[u8], key: &[u8]) -> [u8; 32] {
    let mut h = Sha256::new();
    h.update((cert.len() as u64).to_be_bytes());
    h.update(cert);
    h.update(key);
    h.finalize().into()
}

/// Parses a certificate chain and key (PEM) into what rustls serves.
fn certified_key(cert_path: &Path, cert_pem: &[u8], key_path: &Path, key_pem: &[u8]) -> Result<CertifiedKey, TlsError> {
    let chain = CertificateDer::pem_slice_iter(cert_pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| TlsError::Pem {
            path: cert_path.to_owned(),
            reason: e.to_string(),
        })?;
    if chain.is_empty() {
        return Err(TlsError::NoCertificate {
            path: cert_path.to_owned(),
        });
    }
    let key = PrivateKeyDer::from_pem_slice(key_pem).map_err(|e| match e {
        rustls::pki_types::pem::Error::NoItemsFound => TlsError::NoKey {
            path: key_path.to_owned(),
        },
        e => TlsError::Pem {
            path: key_path.to_owned(),
            reason: e.to_string(),
        },
    })?;
    // Also checks that the key belongs to the (parsable) end-entity certificate.
    CertifiedKey::from_der(chain, key, &provider()).map_err(|e| TlsError::Key {
        cert: cert_path.to_owned(),
        key: key_path.to_owned(),
        reason: e.to_string(),
    })
}

fn leaf_not_after(key: &CertifiedKey) -> Option<SystemTime> {
    key.end_entity_cert().ok().and_then(|c| not_after(c.as_ref()))
}

impl ServerTls {
    /// Loads the certificate chain (PEM, the server certificate first) and its key (PEM:
    /// PKCS#8, PKCS#1 or SEC1). `reload_interval` is how often [`watch`](Self::watch) checks
    /// the files; zero disables the checks ([`reload`](Self::reload) still works).
    ///
    /// # Errors
    ///
    /// A file can't be read, or the pair can't be served.
    pub fn load(
        cert_path: impl Into<PathBuf>,
        key_path: impl Into<PathBuf>,
        reload_interval: Duration,
    ) -> Result<Self, TlsError> {
        let (cert_path, key_path) = (cert_path.into(), key_path.into());
        let cert_pem = read(&cert_path)?;
        let key_pem = read(&key_path)?;
        let key = certified_key(&cert_path, &cert_pem, &key_path, &key_pem)?;
        let not_after = leaf_not_after(&key);
        let resolver = Arc::new(CertResolver {
            current: ArcSwap::from_pointee(key),
        });
        let mut config = rustls::ServerConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .map_err(|e| TlsError::Config(e.to_string()))?
            .with_no_client_auth()
            .with_cert_resolver(resolver.clone());
        // The listener speaks HTTP/1.1 only (WebSocket upgrades need it).
        config.alpn_protocols = vec![b"http/1.1".to_vec()];
        log_loaded(&cert_path, not_after, "TLS certificate loaded");
        let (status, _) = watch::channel(TlsStatus {
            loads: 1,
            not_after,
            ..TlsStatus::default()
        });
        Ok(Self {
            inner: Arc::new(Inner {
                last_seen: Mutex::new(digest(&cert_pem, &key_pem)),
                cert_path,
                key_path,
                reload_interval,
                resolver,
                config: Arc::new(config),
                status,
            }),
        })
    }

    /// The rustls configuration (its certificate follows reloads).
    pub fn config(&self) -> Arc<rustls::ServerConfig> {
        self.inner.config.clone()
    }

    /// An acceptor for the listener.
    pub fn acceptor(&self) -> tokio_rustls::TlsAcceptor {
        tokio_rustls::TlsAcceptor::from(self.config())
    }

    /// The certificate chain file.
    pub fn cert_path(&self) -> &Path {
        &self.inner.cert_path
    }

    /// The key file.
    pub fn key_path(&self) -> &Path {
        &self.inner.key_path
    }

    /// How often [`watch`](Self::watch) checks the files (zero: never).
    pub fn reload_interval(&self) -> Duration {
        self.inner.reload_interval
    }

    /// The certificate handshakes get now (the end-entity certificate first).
    pub fn current_chain(&self) -> Vec<CertificateDer<'static>> {
        self.inner.resolver.current.load().cert.clone()
    }

    /// What the reloader has done so far.
    pub fn status(&self) -> TlsStatus {
        self.inner.status.borrow().clone()
    }

    /// A receiver that sees every change of [`status`](Self::status).
    pub fn subscribe(&self) -> watch::Receiver<TlsStatus> {
        self.inner.status.subscribe()
    }

    /// Reads both files and, when their content changed since the last attempt, installs the
    /// new pair for the handshakes that follow. `Ok(true)`: a new certificate is served;
    /// `Ok(false)`: the files are as last tried (whether that attempt succeeded or not:
    /// see [`status`](Self::status)). Reads files: call it off the async workers, as
    /// [`watch`](Self::watch) does.
    ///
    /// # Errors
    ///
    /// A file can't be read, or the new pair can't be served (logged; the previous
    /// certificate stays). An unreadable file is retried at every call; a changed file that
    /// is refused is not retried until it changes again.
    pub fn reload(&self) -> Result<bool, TlsError> {
        let inner = &self.inner;
        let files = read(&inner.cert_path).and_then(|c| read(&inner.key_path).map(|k| (c, k)));
        let (cert_pem, key_pem) = match files {
            Ok(f) => f,
            Err(e) => {
                self.refused(&e);
                return Err(e);
            }
        };
        let seen = digest(&cert_pem, &key_pem);
        {
            let mut last = inner.last_seen.lock().unwrap_or_else(PoisonError::into_inner);
            if *last == seen {
                return Ok(false);
            }
            *last = seen;
        }
        match certified_key(&inner.cert_path, &cert_pem, &inner.key_path, &key_pem) {
            Ok(key) => {
                let not_after = leaf_not_after(&key);
                inner.resolver.current.store(Arc::new(key));
                log_loaded(&inner.cert_path, not_after, "TLS certificate reloaded");
                inner.status.send_modify(|s| {
                    s.loads += 1;
                    s.last_error = None;
                    s.not_after = not_after;
                });
                Ok(true)
            }
            Err(e) => {
                self.refused(&e);
                Err(e)
            }
        }
    }

    fn refused(&self, e: &TlsError) {
        tracing::error!(cause = %e, "TLS certificate not reloaded; the previous one stays in use");
        self.inner.status.send_modify(|s| {
            s.failures += 1;
            s.last_error = Some(e.clone());
        });
    }

    /// Checks the files every reload interval until `stop` fires, reloading on change (the
    /// file reads run on the blocking pool). Returns at once for a zero interval.
    pub async fn watch(self, stop: CancellationToken) {
        let period = self.inner.reload_interval;
        if period.is_zero() {
            return;
        }
        let mut tick = tokio::time::interval_at(tokio::time::Instant::now() + period, period);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = tick.tick() => {}
                () = stop.cancelled() => return,
            }
            let this = self.clone();
            // Errors are logged and recorded in the status by `reload` itself.
            let _ = tokio::task::spawn_blocking(move || this.reload()).await;
        }
    }
}

fn log_loaded(path: &Path, not_after: Option<SystemTime>, what: &'static str) {
    let now = SystemTime::now();
    let valid_for_days = not_after.map(|t| match t.duration_since(now) {
        Ok(d) => (d.as_secs() / 86_400) as i64,
        Err(e) => -((e.duration().as_secs() / 86_400) as i64) - 1,
    });
    let not_after_unix = not_after.and_then(|t| t.duration_since(SystemTime::UNIX_EPOCH).ok().map(|d| d.as_secs()));
    if not_after.is_some_and(|t| t <= now) {
        tracing::warn!(cert = %path.display(), not_after_unix, "TLS certificate has expired");
    }
    tracing::info!(cert = %path.display(), not_after_unix, valid_for_days, "{what}");
}

/// The `notAfter` of an X.509 certificate (DER), or `None` when it doesn't parse. Reads only
/// the fields before `validity`, without checking anything else.
pub fn not_after(der: &[u8]) -> Option<SystemTime> {
    let (cert, _) = der_expect(der, 0x30)?;
    let (tbs, _) = der_expect(cert, 0x30)?;
    let (mut tag, _, mut rest) = der_tlv(tbs)?;
    if tag == 0xa0 {
        // [0] version; the serial number follows.
        (tag, _, rest) = der_tlv(rest)?;
    }
    if tag != 0x02 {
        return None;
    }
    let (_signature, rest) = der_expect(rest, 0x30)?;
    let (_issuer, rest) = der_expect(rest, 0x30)?;
    let (validity, _) = der_expect(rest, 0x30)?;
    let (_, _not_before, rest) = der_tlv(validity)?;
    let (tag, value, _) = der_tlv(rest)?;
    der_time(tag, value)
}

/// A DER element with tag `tag`: `(value, rest)`.
fn der_expect(input: &[u8], tag: u8) -> Option<(&[u8], &[u8])> {
    match der_tlv(input)? {
        (t, value, rest) if t == tag => Some((value, rest)),
        _ => None,
    }
}

/// One DER tag-length-value: `(tag, value, rest)`. Single-byte tags, definite lengths.
fn der_tlv(input: &[u8]) -> Option<(u8, &[u8], &[u8])> {
    let (&tag, input) = input.split_first()?;
    let (&first, mut input) = input.split_first()?;
    let len = if first < 0x80 {
        usize::from(first)
    } else {
        let n = usize::from(first & 0x7f);
        if n == 0 || n > 4 || input.len() < n {
            return None;
        }
        let (bytes, rest) = input.split_at(n);
        input = rest;
        bytes.iter().fold(0usize, |acc, &b| (acc << 8) | usize::from(b))
    };
    if input.len() < len {
        return None;
    }
    let (value, rest) = input.split_at(len);
    Some((tag, value, rest))
}

/// A UTCTime (`YYMMDDHHMMSSZ`) or GeneralizedTime (`YYYYMMDDHHMMSSZ`), as X.509 writes them.
fn der_time(tag: u8, value: &[u8]) -> Option<SystemTime> {
    let text = std::str::from_utf8(value).ok()?;
    let digits = text.strip_suffix('Z')?;
    if !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let num = |s: &str| s.parse::<u32>().ok();
    let (year, rest) = match (tag, digits.len()) {
        (0x17, 12) => {
            let yy = num(&digits[..2])?;
            // RFC 5280: YY >= 50 is 19YY, else 20YY.
            (if yy >= 50 { 1900 + yy } else { 2000 + yy }, &digits[2..])
        }
        (0x18, 14) => (num(&digits[..4])?, &digits[4..]),
        _ => return None,
    };
    let month = time::Month::try_from(u8::try_from(num(&rest[0..2])?).ok()?).ok()?;
    let date =
        time::Date::from_calendar_date(i32::try_from(year).ok()?, month, u8::try_from(num(&rest[2..4])?).ok()?).ok()?;
    let at = date
        .with_hms(
            u8::try_from(num(&rest[4..6])?).ok()?,
            u8::try_from(num(&rest[6..8])?).ok()?,
            u8::try_from(num(&rest[8..10])?).ok()?,
        )
        .ok()?
        .assume_utc();
    Some(SystemTime::from(at))
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Dir(PathBuf);

    impl Drop for Dir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    fn temp_dir() -> Dir {
        let dir = std::env::temp_dir().join(format!("wsgate-server-tls-{}", uuid::Uuid::new_v4()));
        std::fs::create_dir_all(&dir).expect("dir");
        Dir(dir)
    }

    /// A self-signed certificate for `cn` valid until `not_after`, as (cert PEM, key PEM, DER).
    fn cert(cn: &str, not_after: time::OffsetDateTime) -> (String, String, CertificateDer<'static>) {
        let key = rcgen::KeyPair::generate().expect("key");
        let mut params = rcgen::CertificateParams::new(vec!["localhost".to_owned()]).expect("params");
        params.distinguished_name.push(rcgen::DnType::CommonName, cn);
        params.not_after = not_after;
        let cert = params.self_signed(&key).expect("cert");
        (cert.pem(), key.serialize_pem(), cert.der().clone())
    }

    fn date(y: i32, m: time::Month, d: u8) -> time::OffsetDateTime {
        time::Date::from_calendar_date(y, m, d)
            .expect("date")
            .with_hms(12, 34, 56)
            .expect("time")
            .assume_utc()
    }

    fn write(dir: &Dir, cert: &str, key: &str) -> (PathBuf, PathBuf) {
        let (c, k) = (dir.0.join("tls.crt"), dir.0.join("tls.key"));
        std::fs::write(&c, cert).expect("write cert");
        std::fs::write(&k, key).expect("write key");
        (c, k)
    }

    #[test]
    fn loads_swaps_and_keeps_the_old_certificate_on_a_bad_one() {
        let dir = temp_dir();
        let a = cert("a", date(2031, time::Month::March, 4));
        let (c, k) = write(&dir, &a.0, &a.1);
        let tls = ServerTls::load(&c, &k, Duration::ZERO).expect("load");
        assert_eq!(tls.current_chain(), vec![a.2.clone()]);
        assert_eq!(tls.status().loads, 1);
        assert_eq!(
            tls.status().not_after,
            Some(SystemTime::from(date(2031, time::Month::March, 4)))
        );
        assert_eq!(tls.config().alpn_protocols, vec![b"http/1.1".to_vec()]);
        assert_eq!(tls.reload(), Ok(false), "unchanged files");

        let b = cert("b", date(2032, time::Month::June, 7));
        write(&dir, &b.0, &b.1);
        assert_eq!(tls.reload(), Ok(true));
        assert_eq!(tls.current_chain(), vec![b.2.clone()]);
        assert_eq!(tls.status().loads, 2);

        // A key of another certificate: refused once, the served certificate stays.
        let c2 = cert("c", date(2033, time::Month::July, 8));
        write(&dir, &c2.0, &b.1);
        assert!(matches!(tls.reload(), Err(TlsError::Key { .. })));
        assert_eq!(
            tls.reload(),
            Ok(false),
            "a refused change is not retried until it changes"
        );
        assert_eq!(tls.current_chain(), vec![b.2.clone()]);
        let st = tls.status();
        assert_eq!((st.loads, st.failures), (2, 1));
        assert!(matches!(st.last_error, Some(TlsError::Key { .. })));
        assert_eq!(st.not_after, Some(SystemTime::from(date(2032, time::Month::June, 7))));

        // Garbage and a missing key file.
        write(&dir, "garbage", &b.1);
        assert_eq!(tls.reload(), Err(TlsError::NoCertificate { path: c.clone() }));
        std::fs::remove_file(&k).expect("rm key");
        assert!(matches!(tls.reload(), Err(TlsError::Read { .. })));
        assert_eq!(tls.current_chain(), vec![b.2.clone()]);
        assert_eq!(tls.status().failures, 3);

        // Back to a good pair: served, and the error is cleared.
        write(&dir, &a.0, &a.1);
        assert_eq!(tls.reload(), Ok(true));
        assert_eq!(tls.current_chain(), vec![a.2]);
        assert_eq!(tls.status().last_error, None);
    }

    #[test]
    fn load_errors_name_the_file() {
        let dir = temp_dir();
        let a = cert("a", date(2031, time::Month::March, 4));
        let (c, k) = write(
            &dir,
            &a.0,
            "-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n",
        );
        let e = ServerTls::load(&c, &k, Duration::ZERO).expect_err("no key");
        assert_eq!(e, TlsError::NoKey { path: k.clone() });
        assert!(e.to_string().contains("tls.key"), "{e}");
        let missing = dir.0.join("missing.crt");
        let e = ServerTls::load(&missing, &k, Duration::ZERO).expect_err("missing");
        assert!(e.to_string().contains("missing.crt"), "{e}");
        write(&dir, "", &a.1);
        assert_eq!(
            ServerTls::load(&c, &k, Duration::ZERO).expect_err("empty"),
            TlsError::NoCertificate { path: c.clone() }
        );
        write(
            &dir,
            "-----BEGIN CERTIFICATE-----\n!!!\n-----END CERTIFICATE-----\n",
            &a.1,
        );
        assert!(matches!(
            ServerTls::load(&c, &k, Duration::ZERO),
            Err(TlsError::Pem { .. })
        ));
    }

    #[test]
    fn not_after_reads_utc_and_generalized_times() {
        for when in [
            date(2030, time::Month::January, 31),
            date(2049, time::Month::December, 31),
            date(2050, time::Month::February, 1),
            date(1999, time::Month::August, 9),
        ] {
            let (_, _, der) = cert("x", when);
            assert_eq!(not_after(der.as_ref()), Some(SystemTime::from(when)), "{when}");
        }
        assert_eq!(not_after(b""), None);
        assert_eq!(not_after(&[0x30, 0x84, 0xff, 0xff, 0xff, 0xff]), None);
        let (_, _, der) = cert("x", date(2030, time::Month::January, 31));
        for cut in 0..der.len() {
            // Truncations never panic (a short certificate may still reach notAfter).
            let _ = not_after(&der[..cut]);
        }
        assert_eq!(
            der_time(0x17, b"300131123456Z"),
            Some(SystemTime::from(date(2030, time::Month::January, 31)))
        );
        assert_eq!(der_time(0x17, b"301331123456Z"), None);
        assert_eq!(der_time(0x18, b"300131123456Z"), None);
        assert_eq!(der_time(0x17, b"3001311234+6Z"), None);
    }

    #[tokio::test]
    async fn watch_picks_up_changed_files_until_stopped() {
        let dir = temp_dir();
        let a = cert("a", date(2031, time::Month::March, 4));
        let (c, k) = write(&dir, &a.0, &a.1);
        let tls = ServerTls::load(&c, &k, Duration::from_millis(20)).expect("load");
        let stop = CancellationToken::new();
        let task = tokio::spawn(tls.clone().watch(stop.clone()));
        let mut status = tls.subscribe();
        let b = cert("b", date(2032, time::Month::June, 7));
        write(&dir, &b.0, &b.1);
        tokio::time::timeout(Duration::from_secs(10), status.wait_for(|s| s.loads == 2))
            .await
            .expect("reloaded in time")
            .expect("status");
        assert_eq!(tls.current_chain(), vec![b.2]);
        write(&dir, "garbage", &b.1);
        tokio::time::timeout(Duration::from_secs(10), status.wait_for(|s| s.failures == 1))
            .await
            .expect("refused in time")
            .expect("status");
        stop.cancel();
        tokio::time::timeout(Duration::from_secs(10), task)
            .await
            .expect("watch stops")
            .expect("join");
    }
}
