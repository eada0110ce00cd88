//! Token verification against keys made here with aws-lc-rs; the cross-check
//! against tokens minted by a JWT library we did not write (PyJWT) is in
//! `tests/request_authn.rs`.

use aws_lc_rs::signature::{
    ECDSA_P256_SHA256_FIXED_SIGNING, EcdsaKeyPair, Ed25519KeyPair, KeyPair,
};
use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use http::HeaderValue;
use jsonwebtoken::{EncodingKey, Header};
use serde_json::{Value, json};

use super::*;

const ISSUER: &str = "https://idp.example";

struct Signer {
    kid: String,
    alg: Algorithm,
    private: EncodingKey,
    jwk: Value,
    public_bytes: Vec<u8>,
}

fn es256(kid: &str) -> Signer {
    let rng = aws_lc_rs::rand::SystemRandom::new();
    let pkcs8 = EcdsaKeyPair::generate_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, &rng).unwrap();
    let pair = EcdsaKeyPair::from_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, pkcs8.as_ref()).unwrap();
    let point = pair.public_key().as_ref().to_vec();
    Signer {
        kid: kid.into(),
        alg: Algorithm::ES256,
        private: EncodingKey::from_ec_der(pkcs8.as_ref()),
        jwk: json!({"kty": "EC", "crv": "P-256", "kid": kid, "use": "sig",
            "x": URL_SAFE_NO_PAD.encode(&point[1..33]), "y": URL_SAFE_NO_PAD.encode(&point[33..])}),
        public_bytes: point,
    }
}

fn ed25519(kid: &str) -> Signer {
    let rng = aws_lc_rs::rand::SystemRandom::new();
    let pkcs8 = Ed25519KeyPair::generate_pkcs8(&rng).unwrap();
    let pair = Ed25519KeyPair::from_pkcs8(pkcs8.as_ref()).unwrap();
    let public = pair.public_key().as_ref().to_vec();
    Signer {
        kid: kid.into(),
        alg: Algorithm::EdDSA,
        private: EncodingKey::from_ed_der(pkcs8.as_ref()),
        jwk: json!({"kty": "OKP", "crv": "Ed25519", "kid": kid,
            "x": URL_SAFE_NO_PAD.encode(&public)}),
        public_bytes: public,
    }
}

fn now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

fn claims() -> Value {
    json!({"iss": ISSUER, "sub": "alice", "aud": "orders", "exp": now() + 600, "groups": ["admin"]})
}

fn mint(signer: &Signer, claims: &Value) -> String {
    let mut header = Header::new(signer.alg);
    header.kid = Some(signer.kid.clone());
    jsonwebtoken::encode(&header, claims, &signer.private).unwrap()
}

fn keys(signers: &[&Signer]) -> KeySet {
    let document = json!({"keys": signers.iter().map(|s| s.jwk.clone()).collect::<Vec<_>>()});
    KeySet::parse(document.to_string().as_bytes()).unwrap()
}

fn rule() -> JwtRule {
    JwtRule {
        policy: "shop/jwt".into(),
        issuer: ISSUER.into(),
        audiences: vec!["orders".into()],
        keys: KeySource::Uri("https://idp.example/keys".into()),
        locations: vec![TokenLocation::bearer()],
        forward: true,
        claim_headers: Vec::new(),
        required: false,
        algorithms: ASYMMETRIC.to_vec(),
    }
}

fn check(token: &str, rule: &JwtRule, keys: &KeySet) -> Result<VerifiedToken, TokenError> {
    let unverified = peek(token)?;
    assert_eq!(unverified.issuer, ISSUER);
    verify(token, &unverified, rule, keys)
}

#[test]
fn a_good_token_verifies_and_names_its_principal_and_audiences() {
    for signer in [es256("k1"), ed25519("k1")] {
        let token = mint(&signer, &claims());
        let verified = check(&token, &rule(), &keys(&[&signer])).unwrap();
        assert_eq!(
            verified.principal.as_deref(),
            Some("https://idp.example/alice")
        );
        assert_eq!(verified.audiences, vec!["orders".to_string()]);
        assert_eq!(verified.claims["groups"], json!(["admin"]));
    }
}

#[test]
fn time_claims_are_judged_within_sixty_seconds_of_skew() {
    let signer = es256("k1");
    let keys = keys(&[&signer]);
    let with = |field: &str, at: u64| {
        let mut c = claims();
        c[field] = json!(at);
        check(&mint(&signer, &c), &rule(), &keys)
    };
    assert_eq!(with("exp", now() - 120), Err(TokenError::Expired));
    assert!(with("exp", now() - 30).is_ok(), "within the skew");
    assert_eq!(with("nbf", now() + 120), Err(TokenError::NotYetValid));
    assert!(with("nbf", now() + 30).is_ok(), "within the skew");
    let mut no_exp = claims();
    no_exp.as_object_mut().unwrap().remove("exp");
    assert_eq!(
        check(&mint(&signer, &no_exp), &rule(), &keys),
        Err(TokenError::NoExpiry)
    );
}

#[test]
fn a_token_for_another_audience_or_without_one_is_refused() {
    let signer = es256("k1");
    let keys = keys(&[&signer]);
    let mut other = claims();
    other["aud"] = json!(["billing", "web"]);
    assert_eq!(
        check(&mint(&signer, &other), &rule(), &keys),
        Err(TokenError::WrongAudience)
    );
    let mut listed = claims();
    listed["aud"] = json!(["billing", "orders"]);
    assert!(check(&mint(&signer, &listed), &rule(), &keys).is_ok());
    let mut none = claims();
    none.as_object_mut().unwrap().remove("aud");
    assert_eq!(
        check(&mint(&signer, &none), &rule(), &keys),
        Err(TokenError::WrongAudience)
    );
}

#[test]
fn a_signature_by_another_key_under_a_known_key_id_is_refused() {
    let real = es256("k1");
    let forger = es256("k1");
    let token = mint(&forger, &claims());
    assert_eq!(
        check(&token, &rule(), &keys(&[&real])),
        Err(TokenError::BadSignature)
    );
    // Tampering with the payload of a good token breaks it too.
    let good = mint(&real, &claims());
    let mut parts: Vec<String> = good.split('.').map(String::from).collect();
    let mut tampered = claims();
    tampered["sub"] = json!("mallory");
    parts[1] = URL_SAFE_NO_PAD.encode(tampered.to_string());
    assert_eq!(
        check(&parts.join("."), &rule(), &keys(&[&real])),
        Err(TokenError::BadSignature)
    );
}

#[test]
fn an_unknown_key_id_asks_for_the_keys_again() {
    let known = es256("k1");
    let rotated = es256("k2");
    assert_eq!(
        check(&mint(&rotated, &claims()), &rule(), &keys(&[&known])),
        Err(TokenError::UnknownKeyId)
    );
}

#[test]
fn unsigned_and_shared_secret_tokens_are_refused_whatever_they_claim() {
    let signer = es256("k1");
    let keys = keys(&[&signer]);
    // alg: none, hand-assembled: no library will make one.
    let none = format!(
        "{}.{}.",
        URL_SAFE_NO_PAD.encode(r#"{"alg":"none","typ":"JWT"}"#),
        URL_SAFE_NO_PAD.encode(claims().to_string())
    );
    assert_eq!(peek(&none).err(), Some(TokenError::Malformed));
    // Algorithm confusion: HS256 keyed with the issuer's public key.
    let mut header = Header::new(Algorithm::HS256);
    header.kid = Some("k1".into());
    let confused = jsonwebtoken::encode(
        &header,
        &claims(),
        &EncodingKey::from_secret(&signer.public_bytes).unwrap(),
    )
    .unwrap();
    assert_eq!(
        check(&confused, &rule(), &keys),
        Err(TokenError::AlgorithmNotAllowed)
    );
}

#[test]
fn an_algorithm_outside_the_rule_s_list_is_refused() {
    let signer = es256("k1");
    let only_eddsa = JwtRule {
        algorithms: vec![Algorithm::EdDSA],
        ..rule()
    };
    assert_eq!(
        check(&mint(&signer, &claims()), &only_eddsa, &keys(&[&signer])),
        Err(TokenError::AlgorithmNotAllowed)
    );
}

#[test]
fn a_key_the_token_carries_itself_is_never_used() {
    let real = es256("k1");
    let attacker = es256("evil");
    let mut header = Header::new(Algorithm::ES256);
    header.kid = Some("evil".into());
    header.jwk = Some(serde_json::from_value(attacker.jwk.clone()).unwrap());
    header.jku = Some("https://attacker.example/keys".into());
    header.x5u = Some("https://attacker.example/cert".into());
    let token = jsonwebtoken::encode(&header, &claims(), &attacker.private).unwrap();
    assert_eq!(
        check(&token, &rule(), &keys(&[&real])),
        Err(TokenError::UnknownKeyId)
    );
    header.kid = Some("k1".into());
    let token = jsonwebtoken::encode(&header, &claims(), &attacker.private).unwrap();
    assert_eq!(
        check(&token, &rule(), &keys(&[&real])),
        Err(TokenError::BadSignature)
    );
}

#[test]
fn garbage_is_malformed_not_a_panic() {
    for token in [
        "",
        "a.b",
        "a.b.c.d",
        "!!!.???.###",
        "eyJhbGciOiJFUzI1NiJ9..",
        &"a".repeat(MAX_TOKEN_BYTES + 1),
    ] {
        assert_eq!(
            peek(token).err(),
            Some(TokenError::Malformed),
            "{token:.40}"
        );
    }
}

#[test]
fn a_token_is_found_behind_its_prefix_and_two_different_ones_are_refused() {
    let locations = vec![TokenLocation::bearer()];
    let mut headers = HeaderMap::new();
    headers.insert(
        "authorization",
        HeaderValue::from_static("Basic dXNlcjpwdw=="),
    );
    assert_eq!(
        find_token(&headers, &locations),
        Ok(None),
        "not a bearer token"
    );
    headers.insert("authorization", HeaderValue::from_static("bearer abc"));
    assert_eq!(
        find_token(&headers, &locations).unwrap().map(|f| f.token),
        Some("abc")
    );
    headers.append("authorization", HeaderValue::from_static("Bearer abc"));
    assert!(
        find_token(&headers, &locations).unwrap().is_some(),
        "the same token twice"
    );
    headers.append("authorization", HeaderValue::from_static("Bearer xyz"));
    assert_eq!(find_token(&headers, &locations), Err(TokenError::Ambiguous));
    let both = vec![
        TokenLocation::bearer(),
        TokenLocation {
            header: HeaderName::from_static("x-token"),
            prefix: String::new(),
        },
    ];
    let mut headers = HeaderMap::new();
    headers.insert("authorization", HeaderValue::from_static("Bearer abc"));
    headers.insert("x-token", HeaderValue::from_static("def"));
    assert_eq!(find_token(&headers, &both), Err(TokenError::Ambiguous));
}

#[test]
fn a_token_that_is_not_utf8_is_malformed() {
    let mut headers = HeaderMap::new();
    headers.insert(
        "authorization",
        HeaderValue::from_bytes(b"Bearer abc\xffdef").unwrap(),
    );
    assert_eq!(
        find_token(&headers, &[TokenLocation::bearer()]),
        Err(TokenError::Malformed)
    );
}

#[test]
fn a_jwks_keeps_only_asymmetric_signing_keys() {
    let ec = es256("ec");
    let document = json!({"keys": [
        ec.jwk,
        {"kty": "oct", "kid": "secret", "k": "c2VjcmV0"},
        {"kty": "EC", "crv": "P-256", "kid": "enc", "use": "enc",
         "x": ec.jwk["x"], "y": ec.jwk["y"]},
        {"kty": "PQ", "kid": "future"},
    ]});
    let set = KeySet::parse(document.to_string().as_bytes()).unwrap();
    assert_eq!((set.len(), set.skipped), (1, 3));
    let only_secret = json!({"keys": [{"kty": "oct", "k": "c2VjcmV0"}]});
    assert_eq!(
        KeySet::parse(only_secret.to_string().as_bytes()).err(),
        Some(KeysError::NoUsableKey)
    );
    let many = json!({"keys": vec![ec.jwk.clone(); keys::MAX_KEYS + 1]});
    assert!(matches!(
        KeySet::parse(many.to_string().as_bytes()),
        Err(KeysError::TooMany(_))
    ));
    assert!(KeySet::parse(b"<html>").is_err());
}

#[test]
fn a_jwk_naming_its_algorithm_verifies_only_that_one() {
    let mut ec = es256("k1");
    ec.jwk["alg"] = json!("ES384");
    // An ES384 label on a P-256 key is a mismatch: the key is unusable.
    let document = json!({"keys": [ec.jwk]});
    assert_eq!(
        KeySet::parse(document.to_string().as_bytes()).err(),
        Some(KeysError::NoUsableKey)
    );
}

#[test]
fn claims_become_header_values_only_when_they_are_scalars() {
    let claims = json!({"s": "x", "n": 7, "b": true, "l": ["a"], "bad": "a\nb"});
    let claims = claims.as_object().unwrap();
    assert_eq!(claim_header_value(claims, "s").unwrap(), "x");
    assert_eq!(claim_header_value(claims, "n").unwrap(), "7");
    assert_eq!(claim_header_value(claims, "b").unwrap(), "true");
    assert!(claim_header_value(claims, "l").is_none());
    assert!(
        claim_header_value(claims, "bad").is_none(),
        "no header injection"
    );
    assert!(claim_header_value(claims, "missing").is_none());
}
