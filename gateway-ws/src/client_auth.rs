//! Client authentication by JWT (`--client-auth jwt`): which tokens a
//! WebSocket client may present, and the [`Identity`] a good one grants.
//!
//! The whole decision lives here, apart from the connection code, because
//! each rule closes a known hole: the algorithm comes from our configuration
//! and never from the token (a token cannot pick `none`, nor turn an RSA
//! public key into an HMAC secret); the clock is an argument, so expiry is
//! tested without sleeping; and the user id and groups pass the same name
//! rules as the rest of herald before they reach a channel name.
//! `jsonwebtoken` only checks signatures; every claim is checked below.

use std::fmt;
use std::path::PathBuf;
use std::time::Duration;

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use herald_proto::names;
use jsonwebtoken::errors::ErrorKind;
use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use serde_json::{Map, Value};

/// Longest token accepted, in bytes. Checked before any decoding, so a client
/// cannot make us base64-decode and parse a megabyte.
pub const MAX_TOKEN_LEN: usize = 8 * 1024;
/// Most distinct groups one token may join: each one is a subscription.
pub const MAX_GROUPS: usize = 64;
/// Most channels the `channels` claim may list.
pub const MAX_CHANNELS: usize = 128;
/// The claim read for groups when [`ClientAuthConfig::groups_claim`] is empty.
pub const DEFAULT_GROUPS_CLAIM: &str = "groups";
/// RFC 7518 §3.2: an HS256 key must be at least as long as the hash.
const MIN_HS256_SECRET_LEN: usize = 32;
/// How much of an unknown `alg` a rejection repeats back.
const MAX_ALG_ECHO: usize = 32;
/// The DER `SubjectPublicKeyInfo` header of every uncompressed P-256 key:
/// algorithm id-ecPublicKey, curve prime256v1, then a 66-byte BIT STRING
/// (no unused bits, 0x04, x, y). Matching it whole is how we tell a P-256
/// key from the other curves, which `jsonwebtoken` would accept here and
/// then fail on every token.
const P256_SPKI_HEADER: [u8; 26] = [
    0x30, 0x59, 0x30, 0x13, 0x06, 0x07, 0x2a, 0x86, 0x48, 0xce, 0x3d, 0x02, 0x01, 0x06, 0x08, 0x2a, 0x86, 0x48, 0xce,
    0x3d, 0x03, 0x01, 0x07, 0x03, 0x42, 0x00,
];
/// Length of an uncompressed P-256 point: 0x04, x, y.
const P256_POINT_LEN: usize = 65;

/// How client tokens are checked.
#[derive(Clone, Default)]
pub struct ClientAuthConfig {
    /// HS256 secrets; any of them may have signed a token (rotation).
    pub hs256_secrets: Vec<String>,
    /// PEM public keys (RSA for RS256, EC P-256 for ES256), as file CONTENTS
    /// plus the path for messages.
    pub public_keys: Vec<(PathBuf, String)>,
    /// Required `aud`, when set (token's aud may be a string or an array
    /// containing it).
    pub audience: Option<String>,
    /// Required `iss`, when set.
    pub issuer: Option<String>,
    /// Name of the claim listing groups to join on connect (empty means
    /// [`DEFAULT_GROUPS_CLAIM`]): an array of strings.
    pub groups_claim: String,
    /// Clock skew allowed for exp/nbf.
    pub leeway: Duration,
}

// Written by hand so that logging a configuration never logs a secret.
impl fmt::Debug for ClientAuthConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ClientAuthConfig")
            .field("hs256_secrets", &format_args!("<{} redacted>", self.hs256_secrets.len()))
            .field("public_keys", &self.public_keys.iter().map(|(path, _)| path).collect::<Vec<_>>())
            .field("audience", &self.audience)
            .field("issuer", &self.issuer)
            .field("groups_claim", &self.groups_claim)
            .field("leeway", &self.leeway)
            .finish()
    }
}

/// Why a [`ClientAuthConfig`] cannot be used. Found at startup, so the
/// gateway refuses to run rather than refuse every client.
#[derive(Debug, thiserror::Error)]
pub enum ClientAuthError {
    #[error("JWT client auth needs at least one HS256 secret or public key")]
    NothingToVerifyWith,
    #[error("HS256 secret #{number} is {len} bytes long; at least {min} are required", min = MIN_HS256_SECRET_LEN)]
    SecretTooShort { number: usize, len: usize },
    #[error("{}: {reason}", path.display())]
    BadPublicKey { path: PathBuf, reason: String },
}

/// Why a token was refused. The message goes back to the client, so it
/// is one line and holds nothing secret.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TokenRejection {
    #[error("malformed token: {0}")]
    Malformed(&'static str),
    #[error("token algorithm {0:?} is not accepted")]
    UnsupportedAlgorithm(String),
    #[error("token signature does not match any trusted key")]
    BadSignature,
    #[error("token has expired")]
    Expired,
    #[error("token is not valid yet")]
    NotYetValid,
    #[error("token audience is wrong or missing")]
    WrongAudience,
    #[error("token issuer is wrong or missing")]
    WrongIssuer,
    #[error("token subject is invalid: {0}")]
    BadSubject(String),
    #[error("token groups are invalid: {0}")]
    BadGroups(String),
    #[error("token channels are invalid: {0}")]
    BadChannels(String),
    #[error("subscription token is for another channel or user")]
    WrongChannel,
}

impl TokenRejection {
    /// Every value [`TokenRejection::label`] returns.
    pub const LABELS: [&str; 11] = [
        "malformed",
        "unsupported_algorithm",
        "bad_signature",
        "expired",
        "not_yet_valid",
        "wrong_audience",
        "wrong_issuer",
        "bad_subject",
        "bad_groups",
        "bad_channels",
        "wrong_channel",
    ];

    /// A stable name for metrics: it never holds what the client sent.
    pub fn label(&self) -> &'static str {
        match self {
            Self::Malformed(_) => "malformed",
            Self::UnsupportedAlgorithm(_) => "unsupported_algorithm",
            Self::BadSignature => "bad_signature",
            Self::Expired => "expired",
            Self::NotYetValid => "not_yet_valid",
            Self::WrongAudience => "wrong_audience",
            Self::WrongIssuer => "wrong_issuer",
            Self::BadSubject(_) => "bad_subject",
            Self::BadGroups(_) => "bad_groups",
            Self::BadChannels(_) => "bad_channels",
            Self::WrongChannel => "wrong_channel",
        }
    }
}

/// Who a verified token says the client is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Identity {
    /// The token's `sub`.
    pub user_id: String,
    /// Groups to join on connect, in token order, without duplicates.
    pub groups: Vec<String>,
    /// unix seconds
    pub expires_at: Option<u64>,
    /// Client channels it may subscribe to in namespaces that ask for a
    /// listing (the `channels` claim).
    pub channels: Vec<String>,
}

/// One key, tied to the one algorithm it may verify.
struct TrustedKey {
    algorithm: Algorithm,
    key: DecodingKey,
    /// What `Debug` shows instead of the key: a path, or a secret's number.
    origin: String,
}

/// A token verifier built once from a [`ClientAuthConfig`], shared by all
/// connections.
pub struct ClientAuth {
    keys: Vec<TrustedKey>,
    audience: Option<String>,
    issuer: Option<String>,
    groups_claim: String,
    leeway_secs: u64,
}

impl fmt::Debug for ClientAuth {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ClientAuth")
            .field("keys", &self.keys.iter().map(|k| &k.origin).collect::<Vec<_>>())
            .field("audience", &self.audience)
            .field("issuer", &self.issuer)
            .field("groups_claim", &self.groups_claim)
            .field("leeway_secs", &self.leeway_secs)
            .finish()
    }
}

impl ClientAuth {
    /// Fails with a typed error naming the file when a PEM is neither an RSA
    /// nor an EC P-256 public key, or when no secret and no key is given.
    pub fn new(config: ClientAuthConfig) -> Result<Self, ClientAuthError> {
        if config.hs256_secrets.is_empty() && config.public_keys.is_empty() {
            return Err(ClientAuthError::NothingToVerifyWith);
        }
        let mut keys = Vec::with_capacity(config.hs256_secrets.len() + config.public_keys.len());
        for (index, secret) in config.hs256_secrets.iter().enumerate() {
            let number = index + 1;
            if secret.len() < MIN_HS256_SECRET_LEN {
                return Err(ClientAuthError::SecretTooShort { number, len: secret.len() });
            }
            keys.push(TrustedKey {
                algorithm: Algorithm::HS256,
                key: DecodingKey::from_secret(secret.as_bytes()),
                origin: format!("HS256 secret #{number}"),
            });
        }
        for (path, pem) in config.public_keys {
            match public_key(&pem) {
                Ok((algorithm, key)) => {
                    let origin = format!("{algorithm:?} {}", path.display());
                    keys.push(TrustedKey { algorithm, key, origin });
                }
                Err(reason) => return Err(ClientAuthError::BadPublicKey { path, reason }),
            }
        }
        let groups_claim =
            if config.groups_claim.is_empty() { DEFAULT_GROUPS_CLAIM.to_owned() } else { config.groups_claim };
        Ok(Self {
            keys,
            audience: config.audience,
            issuer: config.issuer,
            groups_claim,
            leeway_secs: config.leeway.as_secs(),
        })
    }

    /// Checks a token at `now` (unix seconds, passed in so tests control time).
    pub fn verify(&self, token: &str, now: u64) -> Result<Identity, TokenRejection> {
        let claims = self.signed_claims(token)?;
        self.identity(claims, now)
    }

    /// The claims of a token of bounded length that a trusted key signed.
    fn signed_claims(&self, token: &str) -> Result<Map<String, Value>, TokenRejection> {
        if token.len() > MAX_TOKEN_LEN {
            return Err(TokenRejection::Malformed("longer than 8 KiB"));
        }
        let algorithm = self.accepted_algorithm(token)?;
        self.verified_claims(token, algorithm)
    }

    /// The token's `alg`, if we hold a key for it. Read by hand because
    /// `jsonwebtoken`'s header type cannot even represent `none` or an
    /// unknown name, and those deserve an answer that says so.
    fn accepted_algorithm(&self, token: &str) -> Result<Algorithm, TokenRejection> {
        let mut parts = token.split('.');
        let (Some(header), Some(_), Some(_), None) = (parts.next(), parts.next(), parts.next(), parts.next()) else {
            return Err(TokenRejection::Malformed("not three dot-separated parts"));
        };
        let header =
            URL_SAFE_NO_PAD.decode(header).map_err(|_| TokenRejection::Malformed("header is not base64url"))?;
        let header: Value =
            serde_json::from_slice(&header).map_err(|_| TokenRejection::Malformed("header is not JSON"))?;
        let Some(alg) = header.get("alg").and_then(Value::as_str) else {
            return Err(TokenRejection::Malformed("header has no alg"));
        };
        let algorithm = match alg {
            "HS256" => Some(Algorithm::HS256),
            "RS256" => Some(Algorithm::RS256),
            "ES256" => Some(Algorithm::ES256),
            _ => None,
        };
        match algorithm {
            Some(algorithm) if self.keys.iter().any(|k| k.algorithm == algorithm) => Ok(algorithm),
            _ => Err(TokenRejection::UnsupportedAlgorithm(alg.chars().take(MAX_ALG_ECHO).collect())),
        }
    }

    /// The claims, once some key of `algorithm` has verified the signature.
    fn verified_claims(&self, token: &str, algorithm: Algorithm) -> Result<Map<String, Value>, TokenRejection> {
        // Signature only: `jsonwebtoken` would read the system clock for
        // exp/nbf, and want `exp` and `aud` on its own terms.
        let mut validation = Validation::new(algorithm);
        validation.required_spec_claims.clear();
        validation.validate_exp = false;
        validation.validate_nbf = false;
        validation.validate_aud = false;
        for trusted in self.keys.iter().filter(|k| k.algorithm == algorithm) {
            match jsonwebtoken::decode::<Value>(token, &trusted.key, &validation) {
                Ok(data) => {
                    return match data.claims {
                        Value::Object(claims) => Ok(claims),
                        _ => Err(TokenRejection::Malformed("claims are not a JSON object")),
                    };
                }
                // Another key of the same kind may have signed it (rotation).
                Err(e) if matches!(e.kind(), ErrorKind::InvalidSignature) => {}
                Err(e) => {
                    return Err(TokenRejection::Malformed(match e.kind() {
                        ErrorKind::Base64(_) => "a part is not base64url",
                        ErrorKind::Json(_) | ErrorKind::Utf8(_) => "header or claims are not valid JSON",
                        _ => "not a signed JWT",
                    }));
                }
            }
        }
        Err(TokenRejection::BadSignature)
    }

    /// Checks a subscription token, signed by the backend for one client
    /// channel: its `channel` claim must be `channel`, and its `sub`, when
    /// it has one, the connection's user id. Returns when it expires.
    pub fn verify_subscription(
        &self,
        token: &str,
        channel: &str,
        user_id: Option<&str>,
        now: u64,
    ) -> Result<Option<u64>, TokenRejection> {
        let claims = self.signed_claims(token)?;
        let expires_at = self.check_registered(&claims, now)?;
        let for_user = match claims.get("sub") {
            None => true,
            Some(Value::String(sub)) => Some(sub.as_str()) == user_id,
            Some(_) => false,
        };
        if claims.get("channel").and_then(Value::as_str) != Some(channel) || !for_user {
            return Err(TokenRejection::WrongChannel);
        }
        Ok(expires_at)
    }

    fn identity(&self, claims: Map<String, Value>, now: u64) -> Result<Identity, TokenRejection> {
        let expires_at = self.check_registered(&claims, now)?;
        let user_id = match claims.get("sub") {
            Some(Value::String(sub)) => sub,
            Some(_) => return Err(TokenRejection::BadSubject("sub is not a string".to_owned())),
            None => return Err(TokenRejection::BadSubject("sub is missing".to_owned())),
        };
        names::validate_user_id(user_id).map_err(|e| TokenRejection::BadSubject(e.to_string()))?;
        let groups = self.groups(claims.get(&self.groups_claim))?;
        let channels = channels(claims.get("channels"))?;
        Ok(Identity { user_id: user_id.clone(), groups, expires_at, channels })
    }

    /// Checks exp, nbf, aud and iss; returns exp.
    fn check_registered(&self, claims: &Map<String, Value>, now: u64) -> Result<Option<u64>, TokenRejection> {
        let expires_at = numeric_date(claims.get("exp"), "exp is not a number of seconds")?;
        // RFC 7519: the token is good only *before* its exp.
        if expires_at.is_some_and(|exp| now >= exp.saturating_add(self.leeway_secs)) {
            return Err(TokenRejection::Expired);
        }
        let not_before = numeric_date(claims.get("nbf"), "nbf is not a number of seconds")?;
        if not_before.is_some_and(|nbf| nbf > now.saturating_add(self.leeway_secs)) {
            return Err(TokenRejection::NotYetValid);
        }
        if let Some(audience) = &self.audience {
            let ours = |v: &Value| v.as_str() == Some(audience.as_str());
            let matches = match claims.get("aud") {
                Some(Value::Array(auds)) => auds.iter().any(ours),
                Some(aud) => ours(aud),
                None => false,
            };
            if !matches {
                return Err(TokenRejection::WrongAudience);
            }
        }
        if let Some(issuer) = &self.issuer
            && claims.get("iss").and_then(Value::as_str) != Some(issuer.as_str())
        {
            return Err(TokenRejection::WrongIssuer);
        }
        Ok(expires_at)
    }

    /// The groups claim, checked and deduplicated in order; absent means none.
    fn groups(&self, claim: Option<&Value>) -> Result<Vec<String>, TokenRejection> {
        let name = &self.groups_claim;
        let items = match claim {
            None => return Ok(Vec::new()),
            Some(Value::Array(items)) => items,
            Some(_) => return Err(TokenRejection::BadGroups(format!("{name:?} is not an array"))),
        };
        let mut groups: Vec<String> = Vec::new();
        for (i, item) in items.iter().enumerate() {
            let Value::String(group) = item else {
                return Err(TokenRejection::BadGroups(format!("{name:?}[{i}] is not a string")));
            };
            names::validate_group(group).map_err(|e| TokenRejection::BadGroups(format!("{name:?}[{i}]: {e}")))?;
            if groups.contains(group) {
                continue;
            }
            if groups.len() == MAX_GROUPS {
                return Err(TokenRejection::BadGroups(format!("more than {MAX_GROUPS} groups")));
            }
            groups.push(group.clone());
        }
        Ok(groups)
    }
}

/// The `channels` claim: client channels, checked; absent means none.
fn channels(claim: Option<&Value>) -> Result<Vec<String>, TokenRejection> {
    let items = match claim {
        None => return Ok(Vec::new()),
        Some(Value::Array(items)) => items,
        Some(_) => return Err(TokenRejection::BadChannels("\"channels\" is not an array".to_owned())),
    };
    if items.len() > MAX_CHANNELS {
        return Err(TokenRejection::BadChannels(format!("more than {MAX_CHANNELS} channels")));
    }
    items
        .iter()
        .enumerate()
        .map(|(i, item)| match item {
            Value::String(channel) => names::validate_channel(channel)
                .map(|()| channel.clone())
                .map_err(|e| TokenRejection::BadChannels(format!("\"channels\"[{i}]: {e}"))),
            _ => Err(TokenRejection::BadChannels(format!("\"channels\"[{i}] is not a string"))),
        })
        .collect()
}

/// A NumericDate claim in whole seconds; RFC 7519 allows fractions.
/// The time tokens are checked against: now, in unix seconds.
pub(crate) fn unix_now() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

fn numeric_date(value: Option<&Value>, malformed: &'static str) -> Result<Option<u64>, TokenRejection> {
    let Some(value) = value else { return Ok(None) };
    let seconds = value.as_u64().or_else(|| value.as_f64().filter(|s| s.is_finite() && *s >= 0.0).map(|s| s as u64));
    seconds.map(Some).ok_or(TokenRejection::Malformed(malformed))
}

/// The algorithm a PEM public key verifies, and the key. Private keys are
/// refused by name: `jsonwebtoken` would take an RSA one, and then no token
/// would ever verify.
fn public_key(pem_text: &str) -> Result<(Algorithm, DecodingKey), String> {
    let blocks = pem::parse_many(pem_text).map_err(|e| format!("is not a valid PEM file: {e}"))?;
    let block = match blocks.as_slice() {
        [block] => block,
        [] => return Err("holds no PEM block".to_owned()),
        _ => return Err(format!("holds {} PEM blocks; give one public key per file", blocks.len())),
    };
    match block.tag() {
        "PUBLIC KEY" => {
            if let Some(point) = block.contents().strip_prefix(&P256_SPKI_HEADER) {
                return match point {
                    [0x04, ..] if point.len() == P256_POINT_LEN => {
                        Ok((Algorithm::ES256, DecodingKey::from_ec_der(point)))
                    }
                    _ => Err("EC P-256 public key has a malformed point".to_owned()),
                };
            }
            DecodingKey::from_rsa_pem(pem_text.as_bytes())
                .map(|key| (Algorithm::RS256, key))
                .map_err(|_| "is neither an RSA nor an EC P-256 public key".to_owned())
        }
        "RSA PUBLIC KEY" => DecodingKey::from_rsa_pem(pem_text.as_bytes())
            .map(|key| (Algorithm::RS256, key))
            .map_err(|_| "RSA PUBLIC KEY block does not hold an RSA key".to_owned()),
        tag if tag.contains("PRIVATE KEY") => {
            Err(format!("is a {tag}; give the public key (openssl pkey -pubout) instead"))
        }
        tag => Err(format!("is a {tag}, not a PUBLIC KEY or RSA PUBLIC KEY")),
    }
}

#[cfg(test)]
mod tests {
    use jsonwebtoken::{EncodingKey, Header, encode};
    use ring::rand::SystemRandom;
    use ring::signature::{ECDSA_P256_SHA256_FIXED_SIGNING, EcdsaKeyPair, KeyPair};
    use serde_json::json;

    use super::*;

    // Test-only RSA keys, generated with `openssl genrsa 2048`; never use them
    // for anything else.
    const RSA_PRIVATE: &str = include_str!("../tests/fixtures/rsa-test-private.pem");
    const RSA_PUBLIC: &str = include_str!("../tests/fixtures/rsa-test-public.pem");
    const RSA_UNTRUSTED_PUBLIC: &str = include_str!("../tests/fixtures/rsa-test-untrusted-public.pem");
    /// `RSA_PUBLIC` as PKCS#1 (`openssl rsa -pubin -RSAPublicKey_out`).
    const RSA_PUBLIC_PKCS1: &str = "-----BEGIN RSA PUBLIC KEY-----
MIIBCgKCAQEAynAkhbRbsQc+IgHNokI0zcI0hZElOXB313wbwlhL2kvUocZenEcn
Fv+goARzzUR1zbayvNrUoAoA9g65M2MliU5Wcqpdg5gDDQtlrjFE9WVjeFr4j/Dg
UYIgBQBQs9mybz7sZJx98Pu2dzYtktYkwqEcacZfNpfjXUUDcHRahMjGW2hvaXB8
oNyYzSt3BWvioe0HwLHWAFhkwoFE7PAytvam2RgoQV+iouKNoKwBA1OTCm9rkCKd
IST2+pOfdvnZWd/jWdVlh41Gdgzx7+DTKGh9xip+Dakkt0QLM/nP4apj6QIqeJHV
I8ckrXsqJX0JNNkimHF/sJmbTyMVl6G2BwIDAQAB
-----END RSA PUBLIC KEY-----
";
    /// From `openssl ecparam -name prime256v1 -genkey | openssl ec -pubout`:
    /// checks `P256_SPKI_HEADER` against a key we did not build ourselves.
    const OPENSSL_P256_PUBLIC: &str = "-----BEGIN PUBLIC KEY-----
MFkwEwYHKoZIzj0CAQYIKoZIzj0DAQcDQgAESgsb25KnUgzz5KjVZfcEQ1BLTKKz
C6Hj7Ghcnz1mByLgv7IuF4Wf/ZkGyevqX4mhAOiNKZ4Dafpp6fzbPnwyow==
-----END PUBLIC KEY-----
";
    /// The same, on secp384r1.
    const OPENSSL_P384_PUBLIC: &str = "-----BEGIN PUBLIC KEY-----
MHYwEAYHKoZIzj0CAQYFK4EEACIDYgAE4pUduBdbCplJkjx3cqKUmnOeWYEjEkEd
720rk8iYWyWMewZVe/aO53vrgmA7j1R3F7D0/8vnIWQryfRxn4ZrHPT7P/5+uIAY
6Bwww0C1AW8iyKRgsfjIAvR38iltYZCG
-----END PUBLIC KEY-----
";

    const NOW: u64 = 1_800_000_000;
    const SECRET_OLD: &str = "old-secret-old-secret-old-secret-old";
    const SECRET_NEW: &str = "new-secret-new-secret-new-secret-new";

    fn hs256_only() -> ClientAuthConfig {
        ClientAuthConfig {
            hs256_secrets: vec![SECRET_OLD.to_owned(), SECRET_NEW.to_owned()],
            ..ClientAuthConfig::default()
        }
    }

    fn with_keys(keys: &[(&str, &str)]) -> ClientAuthConfig {
        ClientAuthConfig {
            public_keys: keys.iter().map(|(path, pem)| (PathBuf::from(path), (*pem).to_owned())).collect(),
            ..ClientAuthConfig::default()
        }
    }

    fn auth(config: ClientAuthConfig) -> ClientAuth {
        ClientAuth::new(config).unwrap()
    }

    fn alice() -> Value {
        json!({ "sub": "alice", "exp": NOW + 60 })
    }

    fn sign(alg: Algorithm, claims: &Value, key: &EncodingKey) -> String {
        encode(&Header::new(alg), claims, key).unwrap()
    }

    fn hs256(secret: &str, claims: &Value) -> String {
        sign(Algorithm::HS256, claims, &EncodingKey::from_secret(secret.as_bytes()))
    }

    fn rs256(claims: &Value) -> String {
        sign(Algorithm::RS256, claims, &EncodingKey::from_rsa_pem(RSA_PRIVATE.as_bytes()).unwrap())
    }

    /// A fresh P-256 pair: the signing key, and the public key as PEM.
    fn p256_pair() -> (EncodingKey, String) {
        let rng = SystemRandom::new();
        let pkcs8 = EcdsaKeyPair::generate_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, &rng).unwrap();
        let pair = EcdsaKeyPair::from_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, pkcs8.as_ref(), &rng).unwrap();
        let spki = [P256_SPKI_HEADER.as_slice(), pair.public_key().as_ref()].concat();
        (EncodingKey::from_ec_der(pkcs8.as_ref()), pem::encode(&pem::Pem::new("PUBLIC KEY", spki)))
    }

    /// A token with any header, signed with nothing.
    fn unsigned(header: &Value, claims: &Value) -> String {
        let part = |v: &Value| URL_SAFE_NO_PAD.encode(serde_json::to_vec(v).unwrap());
        format!("{}.{}.", part(header), part(claims))
    }

    #[test]
    fn hs256_signed_by_any_configured_secret_is_accepted() {
        let identity = auth(hs256_only()).verify(&hs256(SECRET_NEW, &alice()), NOW).unwrap();
        assert_eq!(
            identity,
            Identity { user_id: "alice".into(), groups: vec![], expires_at: Some(NOW + 60), channels: vec![] }
        );
    }

    #[test]
    fn the_channels_claim_lists_client_channels() {
        let auth = auth(hs256_only());
        let token = hs256(SECRET_NEW, &json!({"sub": "alice", "exp": NOW + 60, "channels": ["chat:a", "news:b"]}));
        assert_eq!(auth.verify(&token, NOW).unwrap().channels, ["chat:a", "news:b"]);
        for bad in [json!("chat:a"), json!(["chat:a", 3]), json!(["chat:a b"])] {
            let token = hs256(SECRET_NEW, &json!({"sub": "alice", "channels": bad}));
            assert_eq!(auth.verify(&token, NOW).unwrap_err().label(), "bad_channels", "{bad}");
        }
    }

    #[test]
    fn a_subscription_token_is_good_for_its_channel_and_user_only() {
        let auth = auth(hs256_only());
        let token = hs256(SECRET_NEW, &json!({"sub": "alice", "channel": "secret:a", "exp": NOW + 60}));
        assert_eq!(auth.verify_subscription(&token, "secret:a", Some("alice"), NOW), Ok(Some(NOW + 60)));
        assert_eq!(auth.verify_subscription(&token, "secret:b", Some("alice"), NOW), Err(TokenRejection::WrongChannel));
        assert_eq!(auth.verify_subscription(&token, "secret:a", Some("bob"), NOW), Err(TokenRejection::WrongChannel));
        assert_eq!(auth.verify_subscription(&token, "secret:a", None, NOW), Err(TokenRejection::WrongChannel));
        assert_eq!(auth.verify_subscription(&token, "secret:a", Some("alice"), NOW + 60), Err(TokenRejection::Expired));
        let anyone = hs256(SECRET_NEW, &json!({"channel": "secret:a"}));
        assert_eq!(auth.verify_subscription(&anyone, "secret:a", None, NOW), Ok(None), "no sub: any connection");
        let forged = hs256("some-other-secret-some-other-secret!", &json!({"channel": "secret:a"}));
        assert_eq!(auth.verify_subscription(&forged, "secret:a", None, NOW), Err(TokenRejection::BadSignature));
    }

    #[test]
    fn hs256_signed_by_another_secret_has_a_bad_signature() {
        let token = hs256("some-other-secret-some-other-secret!", &alice());
        assert_eq!(auth(hs256_only()).verify(&token, NOW), Err(TokenRejection::BadSignature));
    }

    #[test]
    fn rs256_signed_by_a_configured_key_is_accepted_whichever_key_is_listed_first() {
        let auth = auth(with_keys(&[("old.pem", RSA_UNTRUSTED_PUBLIC), ("new.pem", RSA_PUBLIC)]));
        assert_eq!(auth.verify(&rs256(&alice()), NOW).unwrap().user_id, "alice");
    }

    #[test]
    fn rs256_is_accepted_with_a_pkcs1_public_key() {
        let auth = auth(with_keys(&[("pkcs1.pem", RSA_PUBLIC_PKCS1)]));
        assert_eq!(auth.verify(&rs256(&alice()), NOW).unwrap().user_id, "alice");
    }

    #[test]
    fn rs256_signed_by_a_key_we_do_not_trust_has_a_bad_signature() {
        let auth = auth(with_keys(&[("other.pem", RSA_UNTRUSTED_PUBLIC)]));
        assert_eq!(auth.verify(&rs256(&alice()), NOW), Err(TokenRejection::BadSignature));
    }

    #[test]
    fn es256_signed_by_a_configured_p256_key_is_accepted() {
        let (signing, public) = p256_pair();
        let (_, other_public) = p256_pair();
        let auth = auth(with_keys(&[("other.pem", &other_public), ("ec.pem", &public)]));
        let token = sign(Algorithm::ES256, &alice(), &signing);
        assert_eq!(auth.verify(&token, NOW).unwrap().user_id, "alice");
    }

    #[test]
    fn es256_signed_by_another_p256_key_has_a_bad_signature() {
        let (signing, _) = p256_pair();
        let (_, public) = p256_pair();
        let token = sign(Algorithm::ES256, &alice(), &signing);
        assert_eq!(auth(with_keys(&[("ec.pem", &public)])).verify(&token, NOW), Err(TokenRejection::BadSignature));
    }

    #[test]
    fn rs256_is_refused_when_only_hs256_secrets_are_configured() {
        assert_eq!(
            auth(hs256_only()).verify(&rs256(&alice()), NOW),
            Err(TokenRejection::UnsupportedAlgorithm("RS256".into()))
        );
    }

    #[test]
    fn hs256_signed_with_the_rsa_public_key_as_secret_is_refused() {
        // The classic key confusion: a verifier that let the token pick the
        // algorithm would HMAC-check it with the public key's bytes.
        let token = hs256(RSA_PUBLIC, &alice());
        assert_eq!(
            auth(with_keys(&[("rsa.pem", RSA_PUBLIC)])).verify(&token, NOW),
            Err(TokenRejection::UnsupportedAlgorithm("HS256".into()))
        );
    }

    #[test]
    fn alg_none_is_refused() {
        let token = unsigned(&json!({ "alg": "none", "typ": "JWT" }), &alice());
        assert_eq!(auth(hs256_only()).verify(&token, NOW), Err(TokenRejection::UnsupportedAlgorithm("none".into())));
    }

    #[test]
    fn hs512_is_refused_even_with_a_configured_secret() {
        let token = sign(Algorithm::HS512, &alice(), &EncodingKey::from_secret(SECRET_NEW.as_bytes()));
        assert_eq!(auth(hs256_only()).verify(&token, NOW), Err(TokenRejection::UnsupportedAlgorithm("HS512".into())));
    }

    #[test]
    fn an_unknown_alg_is_echoed_truncated_on_one_line() {
        let alg = format!("X\n{}", "y".repeat(100));
        let token = unsigned(&json!({ "alg": alg }), &alice());
        let rejection = auth(hs256_only()).verify(&token, NOW).unwrap_err();
        assert_eq!(rejection, TokenRejection::UnsupportedAlgorithm(alg.chars().take(MAX_ALG_ECHO).collect()));
        assert!(!rejection.to_string().contains('\n'));
    }

    #[test]
    fn a_token_is_expired_at_its_exp_unless_within_leeway() {
        let token = hs256(SECRET_OLD, &alice());
        let strict = auth(hs256_only());
        assert!(strict.verify(&token, NOW + 59).is_ok());
        assert_eq!(strict.verify(&token, NOW + 60), Err(TokenRejection::Expired));
        let lenient = auth(ClientAuthConfig { leeway: Duration::from_secs(30), ..hs256_only() });
        assert!(lenient.verify(&token, NOW + 89).is_ok());
        assert_eq!(lenient.verify(&token, NOW + 90), Err(TokenRejection::Expired));
    }

    #[test]
    fn a_token_without_exp_is_accepted_and_never_expires() {
        let token = hs256(SECRET_OLD, &json!({ "sub": "alice" }));
        assert_eq!(auth(hs256_only()).verify(&token, u64::MAX).unwrap().expires_at, None);
    }

    #[test]
    fn a_fractional_exp_counts_in_whole_seconds() {
        let token = hs256(SECRET_OLD, &json!({ "sub": "alice", "exp": NOW as f64 + 10.5 }));
        assert_eq!(auth(hs256_only()).verify(&token, NOW).unwrap().expires_at, Some(NOW + 10));
    }

    #[test]
    fn an_exp_that_is_not_a_number_is_malformed() {
        let token = hs256(SECRET_OLD, &json!({ "sub": "alice", "exp": "tomorrow" }));
        assert_eq!(
            auth(hs256_only()).verify(&token, NOW),
            Err(TokenRejection::Malformed("exp is not a number of seconds"))
        );
    }

    #[test]
    fn a_token_before_its_nbf_is_not_yet_valid_unless_within_leeway() {
        let token = hs256(SECRET_OLD, &json!({ "sub": "alice", "nbf": NOW + 10 }));
        assert_eq!(auth(hs256_only()).verify(&token, NOW), Err(TokenRejection::NotYetValid));
        assert!(auth(hs256_only()).verify(&token, NOW + 10).is_ok());
        let lenient = auth(ClientAuthConfig { leeway: Duration::from_secs(10), ..hs256_only() });
        assert!(lenient.verify(&token, NOW).is_ok());
    }

    #[test]
    fn audience_must_match_when_configured() {
        let auth = auth(ClientAuthConfig { audience: Some("herald".into()), ..hs256_only() });
        let with_aud = |aud: Value| hs256(SECRET_OLD, &json!({ "sub": "alice", "aud": aud }));
        assert!(auth.verify(&with_aud(json!("herald")), NOW).is_ok());
        assert!(auth.verify(&with_aud(json!(["billing", "herald"])), NOW).is_ok());
        assert_eq!(auth.verify(&with_aud(json!("billing")), NOW), Err(TokenRejection::WrongAudience));
        assert_eq!(auth.verify(&with_aud(json!(["billing"])), NOW), Err(TokenRejection::WrongAudience));
        assert_eq!(auth.verify(&hs256(SECRET_OLD, &alice()), NOW), Err(TokenRejection::WrongAudience));
    }

    #[test]
    fn audience_is_ignored_when_not_configured() {
        let token = hs256(SECRET_OLD, &json!({ "sub": "alice", "aud": "billing" }));
        assert!(auth(hs256_only()).verify(&token, NOW).is_ok());
    }

    #[test]
    fn issuer_must_match_when_configured() {
        let auth = auth(ClientAuthConfig { issuer: Some("https://id.example".into()), ..hs256_only() });
        let with_iss = |iss: &str| hs256(SECRET_OLD, &json!({ "sub": "alice", "iss": iss }));
        assert!(auth.verify(&with_iss("https://id.example"), NOW).is_ok());
        assert_eq!(auth.verify(&with_iss("https://evil.example"), NOW), Err(TokenRejection::WrongIssuer));
        assert_eq!(auth.verify(&hs256(SECRET_OLD, &alice()), NOW), Err(TokenRejection::WrongIssuer));
    }

    #[test]
    fn sub_is_required_and_must_be_a_valid_user_id() {
        let auth = auth(hs256_only());
        let verify = |claims: Value| auth.verify(&hs256(SECRET_OLD, &claims), NOW);
        assert_eq!(verify(json!({})), Err(TokenRejection::BadSubject("sub is missing".into())));
        assert_eq!(verify(json!({ "sub": 42 })), Err(TokenRejection::BadSubject("sub is not a string".into())));
        assert!(matches!(verify(json!({ "sub": "alice smith" })), Err(TokenRejection::BadSubject(_))));
        assert!(matches!(verify(json!({ "sub": "" })), Err(TokenRejection::BadSubject(_))));
        assert_eq!(verify(json!({ "sub": "auth0|alice@example.com" })).unwrap().user_id, "auth0|alice@example.com");
    }

    #[test]
    fn groups_are_read_in_order_without_duplicates() {
        let token = hs256(SECRET_OLD, &json!({ "sub": "alice", "groups": ["ops", "dev", "ops", "eu/west"] }));
        assert_eq!(auth(hs256_only()).verify(&token, NOW).unwrap().groups, ["ops", "dev", "eu/west"]);
    }

    #[test]
    fn groups_come_from_the_configured_claim() {
        let auth = auth(ClientAuthConfig { groups_claim: "roles".into(), ..hs256_only() });
        let token = hs256(SECRET_OLD, &json!({ "sub": "alice", "roles": ["admin"], "groups": ["ignored"] }));
        assert_eq!(auth.verify(&token, NOW).unwrap().groups, ["admin"]);
    }

    #[test]
    fn groups_must_be_an_array_of_valid_group_names() {
        let auth = auth(hs256_only());
        let verify = |groups: Value| auth.verify(&hs256(SECRET_OLD, &json!({ "sub": "alice", "groups": groups })), NOW);
        assert_eq!(verify(json!(["ops", 7])), Err(TokenRejection::BadGroups("\"groups\"[1] is not a string".into())));
        assert_eq!(verify(json!("ops")), Err(TokenRejection::BadGroups("\"groups\" is not an array".into())));
        assert!(matches!(verify(json!(["two words"])), Err(TokenRejection::BadGroups(_))));
        assert!(matches!(verify(json!([""])), Err(TokenRejection::BadGroups(_))));
    }

    #[test]
    fn at_most_64_distinct_groups_are_accepted() {
        let auth = auth(hs256_only());
        let verify = |n: usize| {
            let groups: Vec<String> = (0..n).map(|i| format!("g{i}")).collect();
            auth.verify(&hs256(SECRET_OLD, &json!({ "sub": "alice", "groups": groups })), NOW)
        };
        assert_eq!(verify(MAX_GROUPS).unwrap().groups.len(), MAX_GROUPS);
        assert_eq!(verify(MAX_GROUPS + 1), Err(TokenRejection::BadGroups("more than 64 groups".into())));
    }

    #[test]
    fn a_token_over_8_kib_is_refused_before_parsing() {
        let token = hs256(SECRET_OLD, &json!({ "sub": "alice", "pad": "x".repeat(MAX_TOKEN_LEN) }));
        assert_eq!(auth(hs256_only()).verify(&token, NOW), Err(TokenRejection::Malformed("longer than 8 KiB")));
    }

    #[test]
    fn garbage_is_malformed() {
        let auth = auth(hs256_only());
        let good = hs256(SECRET_OLD, &alice());
        let not_json = format!("{}.e30.sig", URL_SAFE_NO_PAD.encode("not json"));
        for token in ["", "garbage", "a.b.c", "a.b.c.d", "e30.e30.sig", &not_json, &format!("{good}.extra")] {
            assert!(matches!(auth.verify(token, NOW), Err(TokenRejection::Malformed(_))), "{token:?}");
        }
    }

    #[test]
    fn signed_claims_that_are_not_an_object_are_malformed() {
        let token = hs256(SECRET_OLD, &json!(["alice"]));
        assert!(matches!(auth(hs256_only()).verify(&token, NOW), Err(TokenRejection::Malformed(_))));
    }

    #[test]
    fn every_rejection_has_a_listed_label_and_a_one_line_message() {
        let all = [
            TokenRejection::Malformed("x"),
            TokenRejection::UnsupportedAlgorithm("x".into()),
            TokenRejection::BadSignature,
            TokenRejection::Expired,
            TokenRejection::NotYetValid,
            TokenRejection::WrongAudience,
            TokenRejection::WrongIssuer,
            TokenRejection::BadSubject("x".into()),
            TokenRejection::BadGroups("x".into()),
            TokenRejection::BadChannels("x".into()),
            TokenRejection::WrongChannel,
        ];
        let labels: Vec<_> = all.iter().map(TokenRejection::label).collect();
        assert_eq!(labels, TokenRejection::LABELS);
        for rejection in all {
            assert!(!rejection.to_string().contains('\n'));
        }
    }

    #[test]
    fn an_openssl_p256_public_key_is_accepted() {
        assert!(ClientAuth::new(with_keys(&[("ec.pem", OPENSSL_P256_PUBLIC)])).is_ok());
    }

    #[test]
    fn a_pem_that_is_not_an_rsa_or_p256_public_key_is_refused_naming_the_file() {
        for pem in [
            "hello",
            OPENSSL_P384_PUBLIC,
            RSA_PRIVATE,
            "-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n",
        ] {
            let err = ClientAuth::new(with_keys(&[("/etc/herald/key.pem", pem)])).unwrap_err();
            assert!(matches!(&err, ClientAuthError::BadPublicKey { path, .. } if path.ends_with("key.pem")));
            assert!(err.to_string().starts_with("/etc/herald/key.pem: "), "{err}");
        }
    }

    #[test]
    fn two_keys_in_one_file_are_refused() {
        let both = format!("{RSA_PUBLIC}{RSA_UNTRUSTED_PUBLIC}");
        assert!(matches!(
            ClientAuth::new(with_keys(&[("both.pem", &both)])),
            Err(ClientAuthError::BadPublicKey { .. })
        ));
    }

    #[test]
    fn a_config_with_no_secret_and_no_key_is_refused() {
        assert!(matches!(ClientAuth::new(ClientAuthConfig::default()), Err(ClientAuthError::NothingToVerifyWith)));
    }

    #[test]
    fn a_secret_shorter_than_32_bytes_is_refused() {
        let config = ClientAuthConfig { hs256_secrets: vec![SECRET_OLD.into(), "short".into()], ..Default::default() };
        assert!(matches!(ClientAuth::new(config), Err(ClientAuthError::SecretTooShort { number: 2, len: 5 })));
    }

    #[test]
    fn debug_output_never_shows_a_secret() {
        let config =
            ClientAuthConfig { public_keys: with_keys(&[("rsa.pem", RSA_PUBLIC)]).public_keys, ..hs256_only() };
        let shown = format!("{config:?} {:?}", auth(config.clone()));
        assert!(!shown.contains(SECRET_OLD) && !shown.contains(SECRET_NEW), "{shown}");
        assert!(shown.contains("rsa.pem"), "{shown}");
    }
}
