//! `Grip-Sig`: HS256 JSON Web Tokens (RFC 7519) between the gateway and backends.
//!
//! The gateway signs every backend request with claims `{"iss": issuer, "exp": now + 3600}`, as
//! Pushpin does (`make_token` in `src/proxy/proxyutil.cpp`); GRIP libraries verify the signature
//! and `exp` (Python `gripcontrol.validate_sig` via PyJWT, npm `@fanoutio/grip` `validateSig`
//! via `jose`) before trusting `Meta-*` headers. [`verify`] checks tokens the same way, e.g. for
//! publish API authentication.
//!
//! Time is a parameter (Unix seconds), never read from a clock here.

use base64::Engine as _;
use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use hmac::{Hmac, Mac};
use serde_json::Value;
use sha2::Sha256;

/// Lifetime of a signed token in seconds.
pub const TOKEN_LIFETIME_SECS: u64 = 3600;

/// The only header wsgate writes and the only `alg` it accepts.
const HEADER_JSON: &str = r#"{"alg":"HS256","typ":"JWT"}"#;

type HmacSha256 = Hmac<Sha256>;

/// A shared HMAC key. `Debug` never shows it.
#[derive(Clone)]
pub struct SigningKey(Vec<u8>);

impl SigningKey {
    /// Wraps raw key bytes. An empty key is accepted here; configuration should refuse it.
    pub fn new(bytes: impl Into<Vec<u8>>) -> Self {
        Self(bytes.into())
    }

    /// Reads a key as written in configuration: `base64:` followed by standard base64 (the
    /// convention of GRIP URIs and Pushpin's config), otherwise the UTF-8 bytes of `value`.
    ///
    /// # Errors
    ///
    /// [`SigError::BadKey`] if the `base64:` form does not decode.
    pub fn from_config_value(value: &str) -> Result<Self, SigError> {
        match value.strip_prefix("base64:") {
            Some(encoded) => STANDARD.decode(encoded.trim()).map(Self).map_err(|_| SigError::BadKey),
            None => Ok(Self(value.as_bytes().to_vec())),
        }
    }

    /// Whether the key has no bytes.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    fn mac(&self) -> HmacSha256 {
        // HMAC (RFC 2104) accepts keys of any length: longer ones are hashed, shorter ones padded,
        // so `new_from_slice` cannot fail for `Hmac`.
        HmacSha256::new_from_slice(&self.0).expect("HMAC accepts keys of any length")
    }
}

impl std::fmt::Debug for SigningKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("SigningKey(<redacted>)")
    }
}

/// Why a token was rejected.
#[derive(Debug, Clone, thiserror::Error, PartialEq)]
pub enum SigError {
    /// Not three base64url segments, or a header/claims segment that is not a JSON object.
    #[error("malformed token: {0}")]
    Malformed(&'static str),
    /// The header's `alg` is not `HS256` (this includes `none`).
    #[error("unsupported token algorithm")]
    UnsupportedAlgorithm,
    /// The signature does not match the key.
    #[error("bad token signature")]
    BadSignature,
    /// No numeric `exp` claim.
    #[error("token has no valid 'exp' claim")]
    MissingExpiry,
    /// `now >= exp`.
    #[error("token expired")]
    Expired,
    /// `now < nbf`.
    #[error("token not yet valid")]
    NotYetValid,
    /// A configured `base64:` key does not decode.
    #[error("signing key is not valid base64")]
    BadKey,
}

/// Signs a token with claims `{"iss": issuer, "exp": now_unix + 3600}` and header
/// `{"alg":"HS256","typ":"JWT"}`, base64url without padding.
pub fn sign(key: &SigningKey, issuer: &str, now_unix: u64) -> String {
    // Written by hand so the byte layout does not depend on serde_json's map ordering feature.
    let claims = format!(
        r#"{{"iss":{},"exp":{}}}"#,
        Value::from(issuer),
        now_unix.saturating_add(TOKEN_LIFETIME_SECS)
    );
    let mut token = URL_SAFE_NO_PAD.encode(HEADER_JSON);
    token.push('.');
    token.push_str(&URL_SAFE_NO_PAD.encode(claims));
    let mut mac = key.mac();
    mac.update(token.as_bytes());
    let signature = mac.finalize().into_bytes();
    token.push('.');
    token.push_str(&URL_SAFE_NO_PAD.encode(signature));
    token
}

/// Verifies an HS256 token: `alg` must be `HS256`, the signature must match (compared in
/// constant time), `exp` must be present and later than `now_unix`, and `nbf`, if present, not
/// later than `now_unix`. Returns the claims object.
///
/// # Errors
///
/// [`SigError`] saying which check failed. The signature is checked before the claims are
/// parsed, so the claims of a forged token are never looked at.
pub fn verify(token: &str, key: &SigningKey, now_unix: u64) -> Result<Value, SigError> {
    let malformed = SigError::Malformed("expected three segments");
    let (signing_input, signature_b64) = token.rsplit_once('.').ok_or(malformed.clone())?;
    let (header_b64, claims_b64) = signing_input.split_once('.').ok_or(malformed.clone())?;
    if claims_b64.contains('.') {
        return Err(malformed);
    }

    let header = decode_object(header_b64, ("header is not base64url", "header is not a JSON object"))?;
    if header.get("alg").and_then(Value::as_str) != Some("HS256") {
        return Err(SigError::UnsupportedAlgorithm);
    }

    let signature = URL_SAFE_NO_PAD
        .decode(signature_b64)
        .map_err(|_| SigError::Malformed("signature is not base64url"))?;
    let mut mac = key.mac();
    mac.update(signing_input.as_bytes());
    mac.verify_slice(&signature).map_err(|_| SigError::BadSignature)?;

    let claims = decode_object(claims_b64, ("claims are not base64url", "claims are not a JSON object"))?;
    let now = now_unix as f64;
    let exp = claims
        .get("exp")
        .and_then(Value::as_f64)
        .ok_or(SigError::MissingExpiry)?;
    if now >= exp {
        return Err(SigError::Expired);
    }
    if let Some(nbf) = claims.get("nbf").and_then(Value::as_f64)
        && now < nbf
    {
        return Err(SigError::NotYetValid);
    }
    Ok(claims)
}

/// Decodes a base64url segment holding a JSON object; `errors` are the messages for "not
/// base64url" and "not a JSON object".
fn decode_object(segment: &str, errors: (&'static str, &'static str)) -> Result<Value, SigError> {
    let bytes = URL_SAFE_NO_PAD
        .decode(segment)
        .map_err(|_| SigError::Malformed(errors.0))?;
    match serde_json::from_slice::<Value>(&bytes) {
        Ok(value @ Value::Object(_)) => Ok(value),
        _ => Err(SigError::Malformed(errors.1)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use serde_json::json;

    const NOW: u64 = 1_700_000_000;

    fn key() -> SigningKey {
        SigningKey::new(b"changeme".to_vec())
    }

    /// Splits a token and decodes one segment to a string.
    fn segment(token: &str, index: usize) -> String {
        let part = token.split('.').nth(index).expect("segment exists");
        String::from_utf8(URL_SAFE_NO_PAD.decode(part).expect("base64url")).expect("utf-8")
    }

    /// Signs arbitrary header/claims JSON with `key` (for tokens `sign` would never produce).
    fn forge(header: &str, claims: &str, key: &SigningKey) -> String {
        forge_raw(
            &format!("{}.{}", URL_SAFE_NO_PAD.encode(header), URL_SAFE_NO_PAD.encode(claims)),
            key,
        )
    }

    /// Appends a valid signature to an already encoded `header.claims`.
    fn forge_raw(signing_input: &str, key: &SigningKey) -> String {
        let mut mac = key.mac();
        mac.update(signing_input.as_bytes());
        format!(
            "{signing_input}.{}",
            URL_SAFE_NO_PAD.encode(mac.finalize().into_bytes())
        )
    }

    #[test]
    fn known_vector() {
        let token = sign(&key(), "wsgate", NOW);
        assert_eq!(segment(&token, 0), r#"{"alg":"HS256","typ":"JWT"}"#);
        // Header segment is the well-known base64url of that JSON.
        assert!(token.starts_with("eyJhbGciOiJIUzI1NiIsInR5cCI6IkpXVCJ9."));
        let claims: Value = serde_json::from_str(&segment(&token, 1)).expect("claims JSON");
        assert_eq!(claims, json!({"iss": "wsgate", "exp": NOW + 3600}));
        assert!(!token.contains('='));
        assert!(!token.contains('+') && !token.contains('/'));
        assert_eq!(segment(&token, 1), r#"{"iss":"wsgate","exp":1700003600}"#);
        // Fixed vector: HMAC-SHA256 with key "changeme" over "<header>.<claims>", computed
        // independently (Python hmac/hashlib).
        assert_eq!(
            token,
            "eyJhbGciOiJIUzI1NiIsInR5cCI6IkpXVCJ9.\
             eyJpc3MiOiJ3c2dhdGUiLCJleHAiOjE3MDAwMDM2MDB9.\
             rQhiQ9oIElAlgk9nitW0CBqT-qh_fl_ZosGjE2aj0wc"
        );
    }

    #[test]
    fn round_trip() {
        let token = sign(&key(), "wsgate", NOW);
        let claims = verify(&token, &key(), NOW).expect("valid token");
        assert_eq!(claims["iss"], "wsgate");
        assert_eq!(claims["exp"], NOW + 3600);
        assert!(verify(&token, &key(), NOW + 3599).is_ok());
    }

    #[test]
    fn expired_rejected() {
        let token = sign(&key(), "wsgate", NOW);
        assert_eq!(verify(&token, &key(), NOW + 3600), Err(SigError::Expired));
        assert_eq!(verify(&token, &key(), NOW + 999_999), Err(SigError::Expired));
    }

    #[test]
    fn wrong_key_rejected() {
        let token = sign(&key(), "wsgate", NOW);
        assert_eq!(
            verify(&token, &SigningKey::new(b"other".to_vec()), NOW),
            Err(SigError::BadSignature)
        );
    }

    #[test]
    fn tampered_claims_rejected() {
        let token = sign(&key(), "wsgate", NOW);
        let mut parts: Vec<String> = token.split('.').map(str::to_owned).collect();
        parts[1] = URL_SAFE_NO_PAD.encode(r#"{"iss":"wsgate","exp":9999999999}"#);
        assert_eq!(verify(&parts.join("."), &key(), NOW), Err(SigError::BadSignature));
    }

    #[test]
    fn tampered_signature_rejected() {
        let token = sign(&key(), "wsgate", NOW);
        let mut bytes = token.into_bytes();
        let last = bytes.len() - 2;
        bytes[last] = if bytes[last] == b'A' { b'B' } else { b'A' };
        let token = String::from_utf8(bytes).expect("ascii");
        assert_eq!(verify(&token, &key(), NOW), Err(SigError::BadSignature));
    }

    #[test]
    fn alg_none_and_other_algs_rejected() {
        let claims = format!(r#"{{"exp":{}}}"#, NOW + 10);
        let none = format!(
            "{}.{}.",
            URL_SAFE_NO_PAD.encode(r#"{"alg":"none"}"#),
            URL_SAFE_NO_PAD.encode(&claims)
        );
        assert_eq!(verify(&none, &key(), NOW), Err(SigError::UnsupportedAlgorithm));
        let hs512 = forge(r#"{"alg":"HS512"}"#, &claims, &key());
        assert_eq!(verify(&hs512, &key(), NOW), Err(SigError::UnsupportedAlgorithm));
        let no_alg = forge(r#"{"typ":"JWT"}"#, &claims, &key());
        assert_eq!(verify(&no_alg, &key(), NOW), Err(SigError::UnsupportedAlgorithm));
    }

    #[test]
    fn exp_and_nbf_checks() {
        let header = r#"{"alg":"HS256"}"#;
        assert_eq!(
            verify(&forge(header, r#"{"iss":"x"}"#, &key()), &key(), NOW),
            Err(SigError::MissingExpiry)
        );
        assert_eq!(
            verify(&forge(header, r#"{"exp":"soon"}"#, &key()), &key(), NOW),
            Err(SigError::MissingExpiry)
        );
        // Fractional NumericDate (RFC 7519 allows it).
        let frac = forge(header, &format!(r#"{{"exp":{}.5}}"#, NOW), &key());
        assert!(verify(&frac, &key(), NOW).is_ok());
        assert_eq!(verify(&frac, &key(), NOW + 1), Err(SigError::Expired));
        let nbf = forge(
            header,
            &format!(r#"{{"exp":{},"nbf":{}}}"#, NOW + 100, NOW + 10),
            &key(),
        );
        assert_eq!(verify(&nbf, &key(), NOW), Err(SigError::NotYetValid));
        assert!(verify(&nbf, &key(), NOW + 10).is_ok());
    }

    #[test]
    fn malformed_tokens() {
        let hs256 = URL_SAFE_NO_PAD.encode(r#"{"alg":"HS256"}"#);
        // Valid signature over a claims segment that is not base64url.
        let bad_claims = forge_raw(&format!("{hs256}.!!"), &key());
        for token in [
            String::new(),
            "a".into(),
            "a.b".into(),
            "a.b.c.d".into(),
            "!!.e30.".into(),
            format!("{hs256}.e30.!!"),
            bad_claims,
        ] {
            assert!(
                matches!(verify(&token, &key(), NOW), Err(SigError::Malformed(_))),
                "{token:?}"
            );
        }
        // Header that is JSON but not an object.
        let array_header = format!("{}.e30.", URL_SAFE_NO_PAD.encode("[1]"));
        assert_eq!(
            verify(&array_header, &key(), NOW),
            Err(SigError::Malformed("header is not a JSON object"))
        );
        // Correctly signed claims that are not an object.
        let array_claims = forge(r#"{"alg":"HS256"}"#, "[1]", &key());
        assert_eq!(
            verify(&array_claims, &key(), NOW),
            Err(SigError::Malformed("claims are not a JSON object"))
        );
        // Padded segments are not base64url-without-padding.
        let token = sign(&key(), "wsgate", NOW);
        let padded = token.replacen('.', "=.", 1);
        assert!(matches!(verify(&padded, &key(), NOW), Err(SigError::Malformed(_))));
    }

    #[test]
    fn debug_is_redacted() {
        let key = SigningKey::new(b"supersecret".to_vec());
        assert_eq!(format!("{key:?}"), "SigningKey(<redacted>)");
        assert_eq!(format!("{:?}", Some(&key)), "Some(SigningKey(<redacted>))");
    }

    #[test]
    fn key_from_config_value() {
        let plain = SigningKey::from_config_value("changeme").expect("plain key");
        let b64 = SigningKey::from_config_value("base64:Y2hhbmdlbWU=").expect("base64 key");
        // Same bytes, so tokens from one verify with the other.
        let token = sign(&plain, "wsgate", NOW);
        assert!(verify(&token, &b64, NOW).is_ok());
        assert_eq!(
            SigningKey::from_config_value("base64:***").map(|_| ()),
            Err(SigError::BadKey)
        );
        assert!(SigningKey::new(Vec::new()).is_empty());
        assert!(!plain.is_empty());
    }

    #[test]
    fn exp_saturates() {
        let token = sign(&key(), "wsgate", u64::MAX);
        let claims: Value = serde_json::from_str(&segment(&token, 1)).expect("claims JSON");
        assert_eq!(claims["exp"], u64::MAX);
    }

    proptest! {
        #[test]
        fn sign_verify_round_trip(
            key_bytes in proptest::collection::vec(any::<u8>(), 0..100),
            issuer in ".{0,30}",
            now in 0u64..4_000_000_000,
        ) {
            let key = SigningKey::new(key_bytes);
            let token = sign(&key, &issuer, now);
            let claims = verify(&token, &key, now).expect("own token verifies");
            prop_assert_eq!(claims["iss"].as_str(), Some(issuer.as_str()));
            prop_assert_eq!(verify(&token, &key, now + TOKEN_LIFETIME_SECS), Err(SigError::Expired));
        }

        #[test]
        fn verify_never_panics(token in ".{0,200}") {
            let _ = verify(&token, &key(), NOW);
        }

        #[test]
        fn verify_never_panics_on_dotted_base64(
            a in "[A-Za-z0-9_-]{0,40}", b in "[A-Za-z0-9_-]{0,40}", c in "[A-Za-z0-9_-]{0,60}",
        ) {
            let _ = verify(&format!("{a}.{b}.{c}"), &key(), NOW);
        }
    }
}
