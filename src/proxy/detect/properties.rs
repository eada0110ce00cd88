//! Detection over arbitrary bytes, as a hostile client would send them:
//! it never panics, a decision never changes as more bytes arrive, it
//! always decides within the bytes the proxy buffers, and nothing
//! HTTP-shaped (a word, then whitespace) is ever taken for an opaque
//! protocol, which would let it reach the application unparsed.

use proptest::prelude::*;
use proptest::sample::select;

use super::*;
use crate::proxy::MAX_DETECT_BYTES;

/// Pieces that make interesting prefixes when strung together: request
/// line parts, separators a lenient parser accepts, TLS and HTTP/2
/// openings, and any byte.
fn piece() -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![
        select(vec![
            &b"GET"[..],
            b"PRI",
            b"M-SEARCH",
            b" ",
            b"\t",
            b"\x0b",
            b"/",
            b"*",
            b"HTTP/1.1",
            b"HTTP/1.0",
            b"HTTP/1.2",
            b"HTTP/2.0",
            b"\r\n",
            b"\n",
            b"\r",
            b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n",
            b"\x16\x03\x01",
            b"\x16\x03\x03\x00\x05",
            b"x-outrider-client-id: spiffe://cluster.local/ns/a/sa/b",
        ])
        .prop_map(<[u8]>::to_vec),
        any::<u8>().prop_map(|b| vec![b]),
        proptest::collection::vec(any::<u8>(), 0..16),
    ]
}

fn prefix() -> impl Strategy<Value = Vec<u8>> {
    proptest::collection::vec(piece(), 0..12).prop_map(|pieces| pieces.concat())
}

/// A method-like word (the characters RFC 9110 allows in a token).
fn word() -> impl Strategy<Value = Vec<u8>> {
    proptest::collection::vec(
        select(
            b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789!#$%&'*+-.^_`|~"
                .to_vec(),
        ),
        1..=MAX_METHOD,
    )
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(3000))]

    #[test]
    fn a_decision_stands_whatever_bytes_follow(prefix in prefix(), more in prefix()) {
        if let Progress::Done(protocol) = classify(&prefix) {
            let longer = [prefix.as_slice(), more.as_slice()].concat();
            prop_assert_eq!(classify(&longer), Progress::Done(protocol));
        }
        // And what a stall makes of it never panics either.
        let _ = stalled(&prefix);
    }

    #[test]
    fn http_shaped_bytes_are_served_or_refused_never_relayed(
        word in word(),
        space in select(vec![b' ', b'\t', 0x0b, 0x0c]),
        rest in prefix(),
    ) {
        let bytes = [word.as_slice(), &[space], rest.as_slice()].concat();
        let mut relayed = Vec::new();
        // As it arrives, one byte more at a time.
        for end in word.len() + 1..=bytes.len() {
            let seen = &bytes[..end];
            match classify(seen) {
                Progress::Done(Protocol::Http1 | Protocol::Http2 | Protocol::MalformedHttp) => break,
                Progress::Done(other) => relayed.push((end, format!("{other:?}"))),
                Progress::NeedMore => {
                    prop_assert_eq!(stalled(seen), Stalled::MalformedHttp, "{:?}", seen);
                }
            }
        }
        prop_assert!(relayed.is_empty(), "relayed {:?} as {:?}", bytes, relayed);
    }

    #[test]
    fn detection_decides_within_the_bytes_the_proxy_buffers(
        head in prefix(),
        filler in any::<u8>(),
    ) {
        // The longest undecided prefix a client can build: anything, then
        // one byte repeated (a request line that never ends, a TLS record
        // that never completes).
        let mut bytes = head;
        bytes.resize(bytes.len().max(MAX_DETECT_BYTES), filler);
        prop_assert_ne!(classify(&bytes[..MAX_DETECT_BYTES]), Progress::NeedMore);
    }
}
