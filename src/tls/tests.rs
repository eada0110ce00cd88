//! Handshakes between the mesh's own configurations, in memory: which
//! key-exchange group two proxies agree on, what a ClientHello offers on
//! the wire, and what happens to a handshake whose key shares were
//! tampered with.

use std::ops::Range;
use std::sync::Arc;
use std::time::Duration;

use rustls::{ClientConnection, ConnectionCommon, ServerConnection};
use rustls_pki_types::ServerName;

use super::*;
use crate::identity::SpiffeId;
use crate::test_util::certs::TestCa;

/// TLS code points (RFC 8446, draft-ietf-tls-ecdhe-mlkem).
const X25519MLKEM768: u16 = 0x11ec;
const X25519: u16 = 0x001d;
const SUPPORTED_GROUPS: u16 = 10;
const KEY_SHARE: u16 = 51;
/// An ML-KEM-768 encapsulation key and ciphertext; the X25519 share
/// follows each in the hybrid.
const MLKEM768_ENCAPSULATION_KEY: usize = 1184;
const MLKEM768_CIPHERTEXT: usize = 1088;

struct Pair {
    client: MeshTls,
    server: MeshTls,
}

fn pair(client_groups: &[KxGroup], server_groups: &[KxGroup]) -> Pair {
    let ca = TestCa::new("cluster.local");
    let mesh = |ns: &str, sa: &str, groups: &[KxGroup]| {
        let settings = TlsSettings {
            clock_skew: Duration::from_secs(60),
            resumption: false,
            key_exchange: groups.to_vec(),
        };
        MeshTls::new(Arc::new(ca.credentials(ns, sa)), &settings).unwrap()
    };
    Pair {
        client: mesh("shop", "client", client_groups),
        server: mesh("shop", "server", server_groups),
    }
}

fn connections(pair: &Pair) -> (ClientConnection, ServerConnection) {
    let expected =
        PeerExpectation::Id(SpiffeId::parse("spiffe://cluster.local/ns/shop/sa/server").unwrap());
    let config = pair.client.client_config(&expected).unwrap();
    let name = ServerName::IpAddress(std::net::Ipv4Addr::LOCALHOST.into());
    let client = ClientConnection::new(config, name).unwrap();
    let server = ServerConnection::new(pair.server.server_config()).unwrap();
    (client, server)
}

/// Which way a flight of records goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Way {
    ToServer,
    ToClient,
}

/// Runs the handshake, handing every flight to `tamper` before the other
/// side reads it. The first error either side reports ends it.
fn handshake(
    client: &mut ClientConnection,
    server: &mut ServerConnection,
    mut tamper: impl FnMut(Way, &mut Vec<u8>),
) -> Result<(), rustls::Error> {
    for _ in 0..10 {
        if !client.is_handshaking() && !server.is_handshaking() {
            return Ok(());
        }
        pass(&mut **client, &mut **server, Way::ToServer, &mut tamper)?;
        pass(&mut **server, &mut **client, Way::ToClient, &mut tamper)?;
    }
    panic!("the handshake neither finished nor failed");
}

/// Moves what `from` has to send to `to`, through `tamper`.
fn pass<A, B>(
    from: &mut ConnectionCommon<A>,
    to: &mut ConnectionCommon<B>,
    way: Way,
    tamper: &mut impl FnMut(Way, &mut Vec<u8>),
) -> Result<(), rustls::Error> {
    let mut flight = Vec::new();
    while from.wants_write() {
        from.write_tls(&mut flight).unwrap();
    }
    if flight.is_empty() {
        return Ok(());
    }
    tamper(way, &mut flight);
    let mut unread = &flight[..];
    while !unread.is_empty() {
        to.read_tls(&mut unread)
            .map_err(|e| rustls::Error::General(e.to_string()))?;
    }
    to.process_new_packets()?;
    Ok(())
}

/// What a ClientHello or ServerHello says about key exchange, with the
/// byte ranges of each key share in the flight (to tamper with them).
#[derive(Debug, Default)]
struct Hello {
    groups: Vec<u16>,
    shares: Vec<(u16, Range<usize>)>,
}

/// Reads the first handshake message of a flight: a ClientHello (type 1)
/// or a ServerHello (type 2), plain bytes as RFC 8446 §4.1 lays them out.
fn read_hello(flight: &[u8]) -> Hello {
    let mut at = Cursor {
        bytes: flight,
        at: 0,
    };
    assert_eq!(at.u8(), 22, "a handshake record");
    at.skip(2 + 2);
    let kind = at.u8();
    at.skip(3 + 2 + 32);
    let session_id = at.u8() as usize;
    at.skip(session_id);
    match kind {
        1 => {
            let suites = at.u16() as usize;
            at.skip(suites);
            let compression = at.u8() as usize;
            at.skip(compression);
        }
        2 => at.skip(2 + 1),
        other => panic!("handshake message {other} is not a hello"),
    }
    let end = at.u16() as usize + at.at;
    let mut hello = Hello::default();
    while at.at < end {
        let (ext, len) = (at.u16(), at.u16() as usize);
        let ext_end = at.at + len;
        match (ext, kind) {
            (SUPPORTED_GROUPS, _) => {
                let list_end = at.u16() as usize + at.at;
                while at.at < list_end {
                    hello.groups.push(at.u16());
                }
            }
            (KEY_SHARE, 1) => {
                let list_end = at.u16() as usize + at.at;
                while at.at < list_end {
                    let (group, len) = (at.u16(), at.u16() as usize);
                    hello.shares.push((group, at.at..at.at + len));
                    at.skip(len);
                }
            }
            (KEY_SHARE, _) => {
                let (group, len) = (at.u16(), at.u16() as usize);
                hello.shares.push((group, at.at..at.at + len));
            }
            _ => {}
        }
        at.at = ext_end;
    }
    hello
}

struct Cursor<'a> {
    bytes: &'a [u8],
    at: usize,
}

impl Cursor<'_> {
    fn u8(&mut self) -> u8 {
        self.at += 1;
        self.bytes[self.at - 1]
    }
    fn u16(&mut self) -> u16 {
        u16::from(self.u8()) << 8 | u16::from(self.u8())
    }
    fn skip(&mut self, n: usize) {
        self.at += n;
    }
}

fn share(hello: &Hello, group: u16) -> Range<usize> {
    hello
        .shares
        .iter()
        .find(|(g, _)| *g == group)
        .map(|(_, range)| range.clone())
        .unwrap_or_else(|| panic!("no {group:#06x} share in {hello:?}"))
}

#[test]
fn two_mesh_proxies_agree_on_the_post_quantum_hybrid_by_default() {
    let pair = pair(&KxGroup::DEFAULT, &KxGroup::DEFAULT);
    let (mut client, mut server) = connections(&pair);
    let mut offered = None;
    let mut answered = None;
    handshake(&mut client, &mut server, |way, flight| match way {
        Way::ToServer if offered.is_none() => offered = Some(read_hello(flight)),
        Way::ToClient if answered.is_none() => answered = Some(read_hello(flight)),
        _ => {}
    })
    .unwrap();
    assert_eq!(negotiated_group(&client), Some(KxGroup::X25519Mlkem768));
    assert_eq!(negotiated_group(&server), Some(KxGroup::X25519Mlkem768));

    // On the wire: the hybrid is the first group offered, with its share
    // (an ML-KEM-768 key and an X25519 key), and the server answers it.
    let offered = offered.unwrap();
    assert_eq!(offered.groups[..2], [X25519MLKEM768, X25519]);
    assert_eq!(
        share(&offered, X25519MLKEM768).len(),
        MLKEM768_ENCAPSULATION_KEY + 32
    );
    let answered = answered.unwrap();
    assert_eq!(answered.shares.len(), 1);
    assert_eq!(
        share(&answered, X25519MLKEM768).len(),
        MLKEM768_CIPHERTEXT + 32
    );
}

#[test]
fn a_peer_that_offers_only_x25519_still_connects_with_x25519() {
    // An older proxy calling a new one.
    let pair_ = pair(&[KxGroup::X25519], &KxGroup::DEFAULT);
    let (mut client, mut server) = connections(&pair_);
    handshake(&mut client, &mut server, |_, _| {}).unwrap();
    assert_eq!(negotiated_group(&server), Some(KxGroup::X25519));

    // A new proxy calling an older one: the X25519 share the hybrid's
    // offer carries alongside is answered, with no extra round trip.
    let pair_ = pair(&KxGroup::DEFAULT, &[KxGroup::X25519]);
    let (mut client, mut server) = connections(&pair_);
    let mut flights = 0;
    handshake(&mut client, &mut server, |way, _| {
        flights += usize::from(way == Way::ToServer)
    })
    .unwrap();
    assert_eq!(negotiated_group(&client), Some(KxGroup::X25519));
    assert_eq!(flights, 2, "ClientHello and the client's Finished only");
}

#[test]
fn with_post_quantum_off_the_hybrid_is_neither_offered_nor_accepted() {
    let off = KxGroup::offered(&KxGroup::DEFAULT, false);
    let pair_ = pair(&off, &KxGroup::DEFAULT);
    let (mut client, mut server) = connections(&pair_);
    let mut offered = None;
    handshake(&mut client, &mut server, |way, flight| {
        if way == Way::ToServer && offered.is_none() {
            offered = Some(read_hello(flight));
        }
    })
    .unwrap();
    let offered = offered.unwrap();
    assert!(!offered.groups.contains(&X25519MLKEM768), "{offered:?}");
    assert!(offered.shares.iter().all(|(g, _)| *g != X25519MLKEM768));
    assert_eq!(negotiated_group(&server), Some(KxGroup::X25519));

    // A server with it off answers a default client with X25519.
    let pair_ = pair(&KxGroup::DEFAULT, &off);
    let (mut client, mut server) = connections(&pair_);
    handshake(&mut client, &mut server, |_, _| {}).unwrap();
    assert_eq!(negotiated_group(&client), Some(KxGroup::X25519));
}

/// Flips one bit at `offset` into the hybrid share of the first flight
/// going `way`.
fn flip_in_hybrid_share(way: Way, offset: usize) -> impl FnMut(Way, &mut Vec<u8>) {
    let mut done = false;
    move |w, flight| {
        if w == way && !done {
            done = true;
            let range = share(&read_hello(flight), X25519MLKEM768);
            flight[range.start + offset] ^= 0x01;
        }
    }
}

#[test]
fn a_tampered_hybrid_share_fails_the_handshake_in_either_direction() {
    let pair = pair(&KxGroup::DEFAULT, &KxGroup::DEFAULT);
    // In the ML-KEM key, the X25519 key, the ML-KEM ciphertext and the
    // server's X25519 key: each one alone breaks the handshake.
    for (way, offset) in [
        (Way::ToServer, 100),
        (Way::ToServer, MLKEM768_ENCAPSULATION_KEY + 5),
        (Way::ToClient, 100),
        (Way::ToClient, MLKEM768_CIPHERTEXT + 5),
    ] {
        let (mut client, mut server) = connections(&pair);
        let result = handshake(&mut client, &mut server, flip_in_hybrid_share(way, offset));
        assert!(
            result.is_err(),
            "{way:?} at {offset}: the handshake finished"
        );
        assert!(client.is_handshaking() || server.is_handshaking());
    }
}

#[test]
fn a_hybrid_share_of_the_wrong_length_is_refused_with_an_error() {
    let pair = pair(&KxGroup::DEFAULT, &KxGroup::DEFAULT);
    let (mut client, mut server) = connections(&pair);
    // The client's hybrid share claims (and carries) only an X25519 key:
    // its length prefix and the lengths around it are rewritten so the
    // message still parses.
    let result = handshake(&mut client, &mut server, |way, flight| {
        if way != Way::ToServer || !is_client_hello(flight) {
            return;
        }
        let range = share(&read_hello(flight), X25519MLKEM768);
        let cut = MLKEM768_ENCAPSULATION_KEY;
        flight.drain(range.start..range.start + cut);
        // Share length, client_shares length, extension length, all
        // extensions length, handshake length, record length.
        let shrink = |flight: &mut Vec<u8>, at: usize, width: usize| {
            let mut value = 0usize;
            for byte in &flight[at..at + width] {
                value = value << 8 | usize::from(*byte);
            }
            let value = value - cut;
            for (i, byte) in flight[at..at + width].iter_mut().enumerate() {
                *byte = (value >> (8 * (width - 1 - i))) as u8;
            }
        };
        shrink(flight, range.start - 2, 2);
        for at in length_prefixes_around(flight, range.start) {
            shrink(flight, at.0, at.1);
        }
    });
    let error = result.unwrap_err();
    assert_eq!(
        error,
        rustls::Error::PeerMisbehaved(rustls::PeerMisbehaved::InvalidKeyShare)
    );
    assert!(server.is_handshaking());
}

/// Whether a flight starts with a ClientHello (sent once; the client's
/// later flights are its Finished).
fn is_client_hello(flight: &[u8]) -> bool {
    flight.first() == Some(&22) && flight.get(5) == Some(&1)
}

/// The (offset, width) of every length prefix that encloses the byte at
/// `inner` in a ClientHello flight, outermost last: the key_share list,
/// the key_share extension, the extensions block, the handshake message
/// and the record.
fn length_prefixes_around(flight: &[u8], inner: usize) -> Vec<(usize, usize)> {
    let mut at = Cursor {
        bytes: flight,
        at: 0,
    };
    let mut prefixes = vec![(3, 2), (6, 3)];
    at.skip(5 + 4 + 2 + 32);
    let session_id = at.u8() as usize;
    at.skip(session_id);
    let suites = at.u16() as usize;
    at.skip(suites);
    let compression = at.u8() as usize;
    at.skip(compression);
    prefixes.push((at.at, 2));
    let _ = at.u16();
    loop {
        let start = at.at;
        let (ext, len) = (at.u16(), at.u16() as usize);
        if ext == KEY_SHARE {
            assert!((at.at..at.at + len).contains(&inner));
            prefixes.push((start + 2, 2));
            prefixes.push((at.at, 2));
            break;
        }
        at.skip(len);
    }
    prefixes.reverse();
    prefixes
}

#[test]
fn each_group_is_labelled_by_the_name_its_configuration_uses() {
    for group in [
        KxGroup::X25519Mlkem768,
        KxGroup::X25519,
        KxGroup::Secp256r1,
        KxGroup::Secp384r1,
    ] {
        let configured = serde_json::to_string(&group).unwrap();
        assert_eq!(configured, format!("\"{}\"", group.name()));
    }
}
