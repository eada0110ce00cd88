//! The key store against a JWKS server on loopback (`test_util`'s HTTPS
//! server with a test CA): first fetch, single-flight refetch on an
//! unknown key id, its 10 s floor, and keeping the last good keys.

use std::sync::Arc;
use std::time::Duration;

use serde_json::json;

use super::*;
use crate::policy::jwt::{ASYMMETRIC, TokenLocation};
use crate::test_util::jwks_server::JwksServer;

/// A real P-256 public key (any will do: these tests never verify).
fn document(kids: &[&str]) -> String {
    let keys: Vec<_> = kids
        .iter()
        .map(|kid| {
            json!({"kty": "EC", "crv": "P-256", "kid": kid,
                "x": "f83OJ3D2xF1Bg8vub9tLe1gHMzV76e8Tus9uPHvRVEU",
                "y": "x_FEzRu9m36HLN_tue659LNpXW6pCyStikYjKIWI5a0"})
        })
        .collect();
    json!({ "keys": keys }).to_string()
}

fn rule(url: String) -> Arc<JwtRule> {
    Arc::new(JwtRule {
        policy: "shop/jwt".into(),
        issuer: "https://idp.example".into(),
        audiences: vec!["orders".into()],
        keys: KeySource::Uri(url.into()),
        locations: vec![TokenLocation::bearer()],
        forward: true,
        claim_headers: Vec::new(),
        required: false,
        algorithms: ASYMMETRIC.to_vec(),
    })
}

fn store(server: &JwksServer) -> Arc<KeyStore> {
    let fetcher = Fetcher::new(
        fetch::roots(std::slice::from_ref(&server.ca_der)),
        Duration::from_secs(2),
    )
    .unwrap();
    let registry = prometheus::Registry::new();
    KeyStore::with_fetcher(fetcher, JwksMetrics::new(&registry).unwrap())
}

/// As if the last fetch were [`REFETCH_EVERY`] older.
fn lapse_refetch_floor(store: &KeyStore, server: &JwksServer) {
    let lapsed = |s: &mut State| {
        s.last_attempt = s.last_attempt.map(|at| at - REFETCH_EVERY);
    };
    store
        .issuer(&server.url("/keys"))
        .unwrap()
        .state
        .send_modify(lapsed);
}

#[tokio::test]
async fn the_first_request_waits_for_the_first_fetch_and_gets_its_keys() {
    let server = JwksServer::start(&document(&["k1"])).await;
    let store = store(&server);
    let rule = rule(server.url("/keys"));
    store.sync(std::slice::from_ref(&rule));
    let keys = store.keys(&rule).await.unwrap();
    assert!(keys.has_key_id("k1"));
    assert_eq!(server.fetches(), 1);
}

#[tokio::test]
async fn a_rule_the_store_was_not_synced_with_is_fetched_on_first_use() {
    // A request can see a new policy before the sync task has: its keys
    // must be fetched then, not refused as never fetched.
    let server = JwksServer::start(&document(&["k1"])).await;
    let store = store(&server);
    let rule = rule(server.url("/keys"));
    let keys = store.keys(&rule).await.unwrap();
    assert!(keys.has_key_id("k1"));
    assert_eq!(server.fetches(), 1);
}

#[tokio::test]
async fn a_provider_down_at_start_makes_keys_unavailable_until_it_answers() {
    let server = JwksServer::start(&document(&["k1"])).await;
    server.set_down(true);
    let store = store(&server);
    let rule = rule(server.url("/keys"));
    store.sync(std::slice::from_ref(&rule));
    assert_eq!(
        store.keys(&rule).await.err(),
        Some(Unavailable::NeverFetched)
    );
    server.set_down(false);
    // The refresh retries after 1 s, then 2 s.
    let keys = crate::test_util::eventually(Duration::from_secs(10), async || {
        store.keys(&rule).await.ok()
    })
    .await;
    assert!(keys.is_some(), "keys once the provider answers");
}

#[tokio::test]
async fn concurrent_unknown_key_ids_share_one_refetch_and_then_wait_ten_seconds() {
    let server = JwksServer::start(&document(&["k1"])).await;
    let store = store(&server);
    let rule = rule(server.url("/keys"));
    store.sync(std::slice::from_ref(&rule));
    let old = store.keys(&rule).await.unwrap();
    assert_eq!(server.fetches(), 1);
    // The provider rotates; the last fetch was just now, so no refetch.
    server.set_document(&document(&["k1", "k2"]));
    assert!(store.refetch(&rule, &old).await.is_none());
    assert_eq!(server.fetches(), 1, "at most once per 10 s");
    // Ten seconds later, twenty requests with the new key id at once.
    lapse_refetch_floor(&store, &server);
    let waits: Vec<_> = (0..20)
        .map(|_| {
            let (store, rule, old) = (store.clone(), rule.clone(), old.clone());
            tokio::spawn(async move { store.refetch(&rule, &old).await })
        })
        .collect();
    for wait in waits {
        let fresh = wait.await.unwrap().expect("new keys");
        assert!(fresh.has_key_id("k2"));
    }
    assert_eq!(server.fetches(), 2, "one fetch for all of them");
}

#[tokio::test]
async fn the_last_good_keys_stay_when_the_provider_goes_down() {
    let server = JwksServer::start(&document(&["k1"])).await;
    let store = store(&server);
    let rule = rule(server.url("/keys"));
    store.sync(std::slice::from_ref(&rule));
    let good = store.keys(&rule).await.unwrap();
    server.set_down(true);
    lapse_refetch_floor(&store, &server);
    assert!(store.refetch(&rule, &good).await.is_none(), "fetch failed");
    let still = store.keys(&rule).await.unwrap();
    assert!(Arc::ptr_eq(&good, &still));
    // After 24 h without a good fetch, they are no longer trusted.
    let aged = |s: &mut State| {
        if let Some((_, at)) = s.keys.as_mut()
            && let Some(earlier) = at.checked_sub(KEEP_LAST_GOOD + Duration::from_secs(1))
        {
            *at = earlier;
        }
    };
    store
        .issuer(&server.url("/keys"))
        .unwrap()
        .state
        .send_modify(aged);
    assert_eq!(store.keys(&rule).await.err(), Some(Unavailable::Stale));
}

#[tokio::test]
async fn fetches_are_bounded_in_size_redirects_and_scheme() {
    let server = JwksServer::start(&document(&["k1"])).await;
    let fetcher = Fetcher::new(
        fetch::roots(std::slice::from_ref(&server.ca_der)),
        Duration::from_secs(2),
    )
    .unwrap();
    assert!(fetcher.fetch(&server.url("/redirect/3")).await.is_ok());
    assert!(matches!(
        fetcher.fetch(&server.url("/redirect/4")).await,
        Err(FetchError::TooManyRedirects)
    ));
    assert!(matches!(
        fetcher.fetch(&server.url("/huge")).await,
        Err(FetchError::TooLarge)
    ));
    assert!(matches!(
        fetcher.fetch(&server.url("/nothing")).await,
        Err(FetchError::Status(http::StatusCode::NOT_FOUND))
    ));
    // Without the provider's CA, the server is not trusted.
    let untrusting = Fetcher::new(fetch::roots(&[]), Duration::from_secs(2)).unwrap();
    assert!(matches!(
        untrusting.fetch(&server.url("/keys")).await,
        Err(FetchError::Tls { .. })
    ));
}

#[tokio::test]
async fn a_provider_that_accepts_and_never_answers_is_given_up_on() {
    // Accepts TCP, never speaks TLS.
    let silent = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = silent.local_addr().unwrap().port();
    let _held = tokio::spawn(async move {
        let mut open = Vec::new();
        while let Ok((stream, _)) = silent.accept().await {
            open.push(stream);
        }
    });
    let fetcher = Fetcher::new(fetch::roots(&[]), Duration::from_millis(300)).unwrap();
    let started = std::time::Instant::now();
    let result = fetcher
        .fetch(&format!("https://127.0.0.1:{port}/keys"))
        .await;
    assert!(matches!(result, Err(FetchError::Timeout(_))), "{result:?}");
    assert!(started.elapsed() < Duration::from_secs(2));
}
