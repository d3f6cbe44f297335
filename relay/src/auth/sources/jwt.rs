//! Signed console tokens (JWT): a control plane signs a token naming the console's target,
//! and any appliance that has the key checks it, with no state shared. The claims are
//! websockify's JWTTokenApi's (`host`, `port`, `nbf`, `exp`) plus relay's own: `instance`,
//! `internal_access_path`, `console`, `iat`, and `jti`, which makes a token single-use
//! (the store records each `jti` it has seen until the token expires). Nothing is stored
//! per token, so `instance reset --revoke` leaves a note in the store instead: the
//! instance's tokens issued (`iat`, else `nbf`) at or before the reset are refused.
//!
//! Keys come from files, each with its algorithm (HS256, RS256, ES256 or EdDSA) and
//! optionally a `kid`, so that keys can be rotated: a token naming a `kid` is checked
//! against that key only. `alg: none` and algorithms no key is configured for are refused.

use super::{Found, TokenSource, parse_target};
use crate::auth::store::{StoreFuture, TokenRejection, TokenStore};
use crate::auth::token::{TokenHash, TokenRecord, check_instance};
use crate::config::{JwtAlgorithm, JwtKey};
use anyhow::Context as _;
use jsonwebtoken::errors::ErrorKind;
use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use serde::{Deserialize, Serialize};
use std::sync::Arc;

struct Key {
    kid: Option<String>,
    algorithm: Algorithm,
    key: DecodingKey,
}

pub struct JwtSource {
    keys: Vec<Key>,
    leeway: u64,
    require_exp: bool,
    /// Lifetime of a token without `exp` (when `require_exp` is off), for listings and `jti`.
    ttl: u64,
    tokens: Arc<dyn TokenStore>,
}

/// The claims relay reads.
#[derive(Debug, Serialize, Deserialize)]
pub struct Claims {
    pub host: String,
    /// A number, or a string as some websockify users write it.
    pub port: serde_json::Value,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub exp: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub nbf: Option<u64>,
    /// Issued at: a reset with revocation refuses the instance's tokens issued before it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub iat: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub instance: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub internal_access_path: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub console: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub jti: Option<String>,
}

pub fn algorithm(a: JwtAlgorithm) -> Algorithm {
    match a {
        JwtAlgorithm::HS256 => Algorithm::HS256,
        JwtAlgorithm::RS256 => Algorithm::RS256,
        JwtAlgorithm::ES256 => Algorithm::ES256,
        JwtAlgorithm::EdDSA => Algorithm::EdDSA,
    }
}

fn decoding_key(k: &JwtKey) -> anyhow::Result<DecodingKey> {
    let bytes = std::fs::read(&k.file).with_context(|| format!("jwt key {}", k.file.display()))?;
    let key = match k.algorithm {
        // An HMAC secret file may end with a newline that is not part of the secret.
        JwtAlgorithm::HS256 => DecodingKey::from_secret(bytes.trim_ascii_end()),
        JwtAlgorithm::RS256 => DecodingKey::from_rsa_pem(&bytes)?,
        JwtAlgorithm::ES256 => DecodingKey::from_ec_pem(&bytes)?,
        JwtAlgorithm::EdDSA => DecodingKey::from_ed_pem(&bytes)?,
    };
    Ok(key)
}

impl JwtSource {
    pub fn new(keys: &[JwtKey], leeway: u64, require_exp: bool, ttl: u64, tokens: Arc<dyn TokenStore>) -> anyhow::Result<JwtSource> {
        let keys = keys
            .iter()
            .map(|k| {
                Ok(Key {
                    kid: k.kid.clone(),
                    algorithm: algorithm(k.algorithm),
                    key: decoding_key(k).with_context(|| format!("jwt key {}", k.file.display()))?,
                })
            })
            .collect::<anyhow::Result<Vec<_>>>()?;
        tracing::info!(keys = keys.len(), "token source jwt");
        Ok(JwtSource { keys, leeway, require_exp, ttl, tokens })
    }

    /// The verified claims, or why the token is refused.
    fn verify(&self, token: &str) -> Result<Claims, TokenRejection> {
        let header = jsonwebtoken::decode_header(token).map_err(|_| TokenRejection::Unknown)?;
        let candidates = self.keys.iter().filter(|k| k.algorithm == header.alg).filter(|k| header.kid.is_none() || k.kid == header.kid);
        let mut validation = Validation::new(header.alg);
        validation.leeway = self.leeway;
        validation.validate_nbf = true;
        validation.required_spec_claims = if self.require_exp { ["exp".to_string()].into() } else { Default::default() };
        let mut why = TokenRejection::Unknown;
        for key in candidates {
            match jsonwebtoken::decode::<Claims>(token, &key.key, &validation) {
                Ok(data) => return Ok(data.claims),
                Err(e) if matches!(e.kind(), ErrorKind::ExpiredSignature) => why = TokenRejection::Expired,
                Err(_) => {}
            }
        }
        Err(why)
    }

    fn record(&self, hash: &TokenHash, claims: Claims, now: u64) -> Result<TokenRecord, TokenRejection> {
        let port = match &claims.port {
            serde_json::Value::Number(n) => n.to_string(),
            serde_json::Value::String(s) => s.clone(),
            _ => return Err(TokenRejection::Unknown),
        };
        let mut target = parse_target(&format!("{}:{port}", claims.host)).ok_or(TokenRejection::Unknown)?;
        if let Some(path) = claims.internal_access_path {
            if path.is_empty() || path.len() > 2048 || path.bytes().any(|b| b.is_ascii_control() || b == b' ') {
                return Err(TokenRejection::Unknown);
            }
            target.internal_access_path = Some(path);
        }
        let instance = claims.instance.unwrap_or_else(|| format!("jwt-{}", hash.id()));
        check_instance(&instance).map_err(|_| TokenRejection::Unknown)?;
        let mut record = super::outside_record("jwt", hash, target, now, self.ttl);
        record.instance = instance;
        if let Some(exp) = claims.exp {
            record.expires = exp;
            record.no_expiry = false;
        }
        if let Some(console) = claims.console {
            record.console = console;
        }
        record.single_use = claims.jti.is_some();
        Ok(record)
    }
}

impl TokenSource for JwtSource {
    fn name(&self) -> &'static str {
        "jwt"
    }

    fn redeem<'a>(&'a self, token: &'a str, hash: TokenHash, now: u64) -> StoreFuture<'a, Found> {
        Box::pin(async move {
            // Not a JWT (three dot-separated parts): another source's token.
            if token.split('.').count() != 3 {
                return Ok(None);
            }
            let claims = match self.verify(token) {
                Ok(claims) => claims,
                Err(why) => return Ok(Some(Err(why))),
            };
            let jti = claims.jti.clone();
            let issued = claims.iat.or(claims.nbf).unwrap_or(0);
            let record = match self.record(&hash, claims, now) {
                Ok(record) => record,
                Err(why) => return Ok(Some(Err(why))),
            };
            // A reset with revocation since it was issued: the store has the note.
            if let Some(at) = self.tokens.signed_revoked_at(&record.instance, now).await?
                && issued <= at
            {
                return Ok(Some(Err(TokenRejection::Revoked)));
            }
            // Single use: the first appliance to record the `jti` opens the console.
            if let Some(jti) = jti
                && !self.tokens.take_once(TokenHash::of(&format!("jwt-jti:{jti}")), record.expires.max(now + 1)).await?
            {
                return Ok(Some(Err(TokenRejection::AlreadyUsed)));
            }
            Ok(Some(Ok(record)))
        })
    }
}

/// Signs `claims` with the key in `key` (for `relay ctl token sign`).
pub fn sign(key: &JwtKey, claims: &Claims) -> anyhow::Result<String> {
    use jsonwebtoken::EncodingKey;
    let bytes = std::fs::read(&key.file).with_context(|| format!("{}", key.file.display()))?;
    let encoding = match key.algorithm {
        JwtAlgorithm::HS256 => EncodingKey::from_secret(bytes.trim_ascii_end()),
        JwtAlgorithm::RS256 => EncodingKey::from_rsa_pem(&bytes)?,
        JwtAlgorithm::ES256 => EncodingKey::from_ec_pem(&bytes)?,
        JwtAlgorithm::EdDSA => EncodingKey::from_ed_pem(&bytes)?,
    };
    let mut header = jsonwebtoken::Header::new(algorithm(key.algorithm));
    header.kid = key.kid.clone();
    Ok(jsonwebtoken::encode(&header, claims, &encoding)?)
}
