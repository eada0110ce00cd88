use std::time::Duration;

use rcgen::{CustomExtension, ExtendedKeyUsagePurpose, KeyUsagePurpose};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, UnixTime};

use super::*;
use crate::test_util::certs::{LeafPem, TestCa};

fn chain(pem: &str) -> Vec<CertificateDer<'static>> {
    CertificateDer::pem_slice_iter(pem.as_bytes())
        .collect::<Result<_, _>>()
        .unwrap()
}

fn bundle(cas: &[&TestCa]) -> TrustBundle {
    TrustBundle::new(cas.iter().flat_map(|ca| chain(&ca.root_pem)).collect()).unwrap()
}

fn verify(
    ca: &TestCa,
    pem: &str,
    expected: &Expected<'_>,
    skew: Duration,
) -> Result<SvidLeaf, SvidError> {
    let certs = chain(pem);
    verify_svid(
        &bundle(&[ca]),
        &certs[0],
        &certs[1..],
        expected,
        Usage::Client,
        UnixTime::now(),
        skew,
    )
}

fn verify_td(ca: &TestCa, leaf: &LeafPem) -> Result<SvidLeaf, SvidError> {
    verify(
        ca,
        &leaf.chain_pem,
        &Expected::TrustDomain(&ca.trust_domain),
        Duration::ZERO,
    )
}

#[test]
fn an_issued_svid_verifies_and_reports_its_id_and_serial() {
    let ca = TestCa::new("cluster.local");
    let svid = ca.issue("shop", "orders");
    let leaf = verify(
        &ca,
        &svid.chain_pem,
        &Expected::Id(&svid.id),
        Duration::ZERO,
    )
    .unwrap();
    assert_eq!(leaf.id, svid.id);
    assert_eq!(leaf.serial, svid.serial);
    assert!(leaf.not_after - leaf.not_before >= 86400);
}

#[test]
fn rejects_a_leaf_with_two_uri_sans() {
    let ca = TestCa::new("cluster.local");
    let err = verify_td(&ca, &ca.leaf_with_two_uris("shop", "orders")).unwrap_err();
    assert_eq!(err, SvidError::UriSanCount(2));
}

#[test]
fn rejects_a_leaf_without_a_uri_san() {
    let ca = TestCa::new("cluster.local");
    let leaf = ca.leaf_with(&[], |p| {
        p.subject_alt_names = vec![rcgen::SanType::DnsName("orders.shop".try_into().unwrap())];
    });
    assert_eq!(
        verify_td(&ca, &leaf).unwrap_err(),
        SvidError::UriSanCount(0)
    );
}

#[test]
fn accepts_a_dns_san_beside_the_single_uri_san() {
    let ca = TestCa::new("cluster.local");
    let id = ca.id("shop", "orders");
    let leaf = ca.leaf_with(&[id.as_str()], |p| {
        p.subject_alt_names.push(rcgen::SanType::DnsName(
            "orders.shop.svc".try_into().unwrap(),
        ));
    });
    assert_eq!(verify_td(&ca, &leaf).unwrap().id, id);
}

#[test]
fn rejects_a_leaf_marked_ca() {
    let ca = TestCa::new("cluster.local");
    assert_eq!(
        verify_td(&ca, &ca.leaf_marked_ca("shop", "orders")).unwrap_err(),
        SvidError::LeafIsCa
    );
}

#[test]
fn rejects_a_leaf_that_may_sign_certificates() {
    let ca = TestCa::new("cluster.local");
    let id = ca.id("shop", "orders");
    let leaf = ca.leaf_with(&[id.as_str()], |p| {
        p.key_usages.push(KeyUsagePurpose::KeyCertSign)
    });
    assert_eq!(verify_td(&ca, &leaf).unwrap_err(), SvidError::LeafCanSign);
    let leaf = ca.leaf_with(&[id.as_str()], |p| {
        p.key_usages.push(KeyUsagePurpose::CrlSign)
    });
    assert_eq!(verify_td(&ca, &leaf).unwrap_err(), SvidError::LeafCanSign);
}

#[test]
fn rejects_missing_or_non_critical_key_usage() {
    let ca = TestCa::new("cluster.local");
    let id = ca.id("shop", "orders");
    let leaf = ca.leaf_with(&[id.as_str()], |p| p.key_usages.clear());
    assert_eq!(verify_td(&ca, &leaf).unwrap_err(), SvidError::NoKeyUsage);

    let leaf = ca.leaf_with(&[id.as_str()], |p| {
        p.key_usages.clear();
        // keyUsage = BIT STRING { digitalSignature }, not marked critical.
        let mut ext =
            CustomExtension::from_oid_content(&[2, 5, 29, 15], vec![0x03, 0x02, 0x07, 0x80]);
        ext.set_criticality(false);
        p.custom_extensions.push(ext);
    });
    assert_eq!(
        verify_td(&ca, &leaf).unwrap_err(),
        SvidError::KeyUsageNotCritical
    );

    let leaf = ca.leaf_with(&[id.as_str()], |p| {
        p.key_usages = vec![KeyUsagePurpose::KeyAgreement]
    });
    assert_eq!(
        verify_td(&ca, &leaf).unwrap_err(),
        SvidError::NoDigitalSignature
    );
}

#[test]
fn rejects_an_extended_key_usage_without_both_auth_purposes() {
    let ca = TestCa::new("cluster.local");
    let id = ca.id("shop", "orders");
    let leaf = ca.leaf_with(&[id.as_str()], |p| {
        p.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    });
    assert_eq!(
        verify_td(&ca, &leaf).unwrap_err(),
        SvidError::ExtendedKeyUsage
    );
}

#[test]
fn rejects_a_root_path_and_a_non_spiffe_uri() {
    let ca = TestCa::new("cluster.local");
    let leaf = ca.leaf_with(&["spiffe://cluster.local"], |_| {});
    assert!(matches!(
        verify_td(&ca, &leaf).unwrap_err(),
        SvidError::RootPath(_)
    ));
    let leaf = ca.leaf_with(&["https://cluster.local/ns/a/sa/b"], |_| {});
    assert!(matches!(
        verify_td(&ca, &leaf).unwrap_err(),
        SvidError::NotSpiffe(_)
    ));
}

#[test]
fn rejects_another_trust_domain_and_an_unexpected_id() {
    let ca = TestCa::new("cluster.local");
    let leaf = ca.leaf_with(&["spiffe://other.domain/ns/shop/sa/orders"], |_| {});
    assert!(matches!(
        verify_td(&ca, &leaf).unwrap_err(),
        SvidError::WrongTrustDomain { .. }
    ));

    let svid = ca.issue("shop", "orders");
    let payments = ca.id("shop", "payments");
    let err = verify(
        &ca,
        &svid.chain_pem,
        &Expected::Id(&payments),
        Duration::ZERO,
    )
    .unwrap_err();
    assert!(matches!(err, SvidError::WrongId { .. }));
}

#[test]
fn rejects_expired_and_not_yet_valid_leaves_beyond_the_skew() {
    let ca = TestCa::new("cluster.local");
    assert!(matches!(
        verify_td(&ca, &ca.leaf_expired("shop", "orders")).unwrap_err(),
        SvidError::Expired { .. }
    ));
    assert!(matches!(
        verify_td(&ca, &ca.leaf_not_yet_valid("shop", "orders")).unwrap_err(),
        SvidError::NotYetValid { .. }
    ));
}

#[test]
fn tolerates_a_clock_skew_smaller_than_configured() {
    let ca = TestCa::new("cluster.local");
    let id = ca.id("shop", "orders");
    let starts_soon = ca.leaf_with(&[id.as_str()], |p| {
        let now = time::OffsetDateTime::now_utc();
        p.not_before = now + time::Duration::seconds(20);
        p.not_after = now + time::Duration::hours(1);
    });
    let td = Expected::TrustDomain(&ca.trust_domain);
    assert!(verify(&ca, &starts_soon.chain_pem, &td, Duration::ZERO).is_err());
    assert!(verify(&ca, &starts_soon.chain_pem, &td, Duration::from_secs(60)).is_ok());
}

#[test]
fn rejects_a_leaf_from_a_foreign_ca() {
    let ours = TestCa::new("cluster.local");
    let foreign = TestCa::new("cluster.local");
    let svid = foreign.issue("shop", "orders");
    let err = verify(
        &ours,
        &svid.chain_pem,
        &Expected::TrustDomain(&ours.trust_domain),
        Duration::ZERO,
    )
    .unwrap_err();
    assert_eq!(err, SvidError::UnknownIssuer);
    assert_eq!(err.reason(), "unknown_ca");
}

#[test]
fn a_bundle_with_two_roots_accepts_leaves_from_either() {
    let old = TestCa::new("cluster.local");
    let new = TestCa::new("cluster.local");
    let both = bundle(&[&old, &new]);
    for ca in [&old, &new] {
        let certs = chain(&ca.issue("shop", "orders").chain_pem);
        let td = Expected::TrustDomain(&ca.trust_domain);
        verify_svid(
            &both,
            &certs[0],
            &certs[1..],
            &td,
            Usage::Server,
            UnixTime::now(),
            Duration::ZERO,
        )
        .unwrap();
    }
}

#[test]
fn garbage_is_reported_as_malformed() {
    assert!(matches!(
        parse_leaf(b"not a certificate"),
        Err(SvidError::Malformed(_))
    ));
    assert!(TrustBundle::new(vec![]).is_err());
    assert!(TrustBundle::new(vec![CertificateDer::from(vec![1, 2, 3])]).is_err());
}
