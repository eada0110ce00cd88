//! rustls configurations for the mesh, built from one credentials
//! generation.
//!
//! TLS 1.3 only, ALPN `outrider/1`, our SPIFFE verifiers on both sides.
//! [`MeshTls`] is rebuilt (not mutated) when credentials change, so the
//! server config, its verifier and every client config built from it always
//! agree on the same certificate and bundle.

use std::collections::HashMap;
use std::sync::Arc;

use parking_lot::Mutex;
use std::time::Duration;

use rustls::client::Resumption;
use rustls::crypto::{CryptoProvider, SupportedKxGroup};
use rustls::server::{NoServerSessionStorage, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use rustls::{ClientConfig, ServerConfig};

use super::verify::{ClientVerifier, PeerExpectation, ServerVerifier};
use super::{Error, MESH_ALPN};
use crate::identity::{Credentials, SpiffeId};

/// Key-exchange groups a proxy may offer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Deserialize, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum KxGroup {
    /// The hybrid of X25519 and ML-KEM-768 (FIPS 203): the connection's
    /// keys stay secret unless both are broken, so traffic recorded today
    /// is safe from a future quantum computer.
    X25519Mlkem768,
    X25519,
    Secp256r1,
    Secp384r1,
}

impl KxGroup {
    /// What the mesh offers by default, most preferred first: the
    /// post-quantum hybrid, then X25519 for peers without it (P-256 last,
    /// for peers restricted to NIST curves).
    pub const DEFAULT: [KxGroup; 3] =
        [KxGroup::X25519Mlkem768, KxGroup::X25519, KxGroup::Secp256r1];

    /// Whether the group resists a quantum computer.
    pub fn is_post_quantum(self) -> bool {
        matches!(self, KxGroup::X25519Mlkem768)
    }

    /// The name used in configuration and as the `group` label of the
    /// handshake metrics.
    pub fn name(self) -> &'static str {
        match self {
            KxGroup::X25519Mlkem768 => "x25519mlkem768",
            KxGroup::X25519 => "x25519",
            KxGroup::Secp256r1 => "secp256r1",
            KxGroup::Secp384r1 => "secp384r1",
        }
    }

    /// The group a finished handshake agreed on, from its TLS code point.
    pub fn negotiated(group: rustls::NamedGroup) -> Option<KxGroup> {
        use rustls::NamedGroup as N;
        match group {
            N::X25519MLKEM768 => Some(KxGroup::X25519Mlkem768),
            N::X25519 => Some(KxGroup::X25519),
            N::secp256r1 => Some(KxGroup::Secp256r1),
            N::secp384r1 => Some(KxGroup::Secp384r1),
            _ => None,
        }
    }

    /// `groups` without the post-quantum hybrid when `post_quantum` is
    /// off (the mesh-wide switch for environments that must not use it).
    pub fn offered(groups: &[KxGroup], post_quantum: bool) -> Vec<KxGroup> {
        groups
            .iter()
            .copied()
            .filter(|group| post_quantum || !group.is_post_quantum())
            .collect()
    }
}

/// TLS knobs shared by both directions.
#[derive(Debug, Clone)]
pub struct TlsSettings {
    pub clock_skew: Duration,
    /// TLS 1.3 session resumption. Off by default: a resumed session skips
    /// certificate verification, so leaving it off means every connection
    /// is checked against the current bundle.
    pub resumption: bool,
    pub key_exchange: Vec<KxGroup>,
}

/// Server and client TLS for one credentials generation.
#[derive(Debug)]
pub struct MeshTls {
    credentials: Arc<Credentials>,
    provider: Arc<CryptoProvider>,
    settings: TlsSettings,
    server: Arc<ServerConfig>,
    client_verifier: Arc<ClientVerifier>,
    /// Client configs per expectation, so each keeps its own verifier
    /// cache (and session cache when resumption is on).
    clients: Mutex<HashMap<PeerExpectation, ClientEntry>>,
}

type ClientEntry = (Arc<ClientConfig>, Arc<ServerVerifier>);

#[derive(Debug)]
struct AlwaysResolves(Arc<CertifiedKey>);

impl ResolvesServerCert for AlwaysResolves {
    fn resolve(&self, _: rustls::server::ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.0.clone())
    }
}

impl rustls::client::ResolvesClientCert for AlwaysResolves {
    fn resolve(&self, _: &[&[u8]], _: &[rustls::SignatureScheme]) -> Option<Arc<CertifiedKey>> {
        Some(self.0.clone())
    }

    fn has_certs(&self) -> bool {
        true
    }
}

fn provider(settings: &TlsSettings) -> CryptoProvider {
    use crate::crypto::backend;
    let mut provider = crate::crypto::provider();
    // TLS 1.3 suites only, AES-128-GCM first: as strong as the P-256 keys
    // it protects, and the cheapest on hardware with AES instructions.
    provider.cipher_suites = vec![
        backend::cipher_suite::TLS13_AES_128_GCM_SHA256,
        backend::cipher_suite::TLS13_AES_256_GCM_SHA384,
        backend::cipher_suite::TLS13_CHACHA20_POLY1305_SHA256,
    ];
    provider.kx_groups = settings
        .key_exchange
        .iter()
        .map(|group| -> &'static dyn SupportedKxGroup {
            match group {
                KxGroup::X25519Mlkem768 => backend::kx_group::X25519MLKEM768,
                KxGroup::X25519 => backend::kx_group::X25519,
                KxGroup::Secp256r1 => backend::kx_group::SECP256R1,
                KxGroup::Secp384r1 => backend::kx_group::SECP384R1,
            }
        })
        .collect();
    provider
}

// === impl MeshTls ===

impl MeshTls {
    pub fn new(credentials: Arc<Credentials>, settings: &TlsSettings) -> Result<Self, Error> {
        if settings.key_exchange.is_empty() {
            return Err(Error::NoKeyExchange);
        }
        let provider = Arc::new(provider(settings));
        let client_verifier = Arc::new(ClientVerifier::new(
            credentials.bundle.clone(),
            credentials.id().trust_domain(),
            settings.clock_skew,
            provider.signature_verification_algorithms,
        ));
        let mut server = ServerConfig::builder_with_provider(provider.clone())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .map_err(Error::Config)?
            .with_client_cert_verifier(client_verifier.clone())
            .with_cert_resolver(Arc::new(AlwaysResolves(credentials.certified_key.clone())));
        server.alpn_protocols = vec![MESH_ALPN.to_vec()];
        if !settings.resumption {
            server.session_storage = Arc::new(NoServerSessionStorage {});
            server.send_tls13_tickets = 0;
        }
        Ok(Self {
            credentials,
            provider,
            settings: settings.clone(),
            server: Arc::new(server),
            client_verifier,
            clients: Mutex::new(HashMap::new()),
        })
    }

    pub fn credentials(&self) -> &Arc<Credentials> {
        &self.credentials
    }

    pub fn server_config(&self) -> Arc<ServerConfig> {
        self.server.clone()
    }

    /// The client config for connections that expect `expected`, built on
    /// first use.
    pub fn client_config(&self, expected: &PeerExpectation) -> Result<Arc<ClientConfig>, Error> {
        let mut clients = self.clients.lock();
        if let Some((config, _)) = clients.get(expected) {
            return Ok(config.clone());
        }
        let verifier = Arc::new(ServerVerifier::new(
            self.credentials.bundle.clone(),
            expected.clone(),
            self.settings.clock_skew,
            self.provider.signature_verification_algorithms,
        ));
        let mut config = ClientConfig::builder_with_provider(self.provider.clone())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .map_err(Error::Config)?
            .dangerous()
            .with_custom_certificate_verifier(verifier.clone())
            .with_client_cert_resolver(Arc::new(AlwaysResolves(
                self.credentials.certified_key.clone(),
            )));
        config.alpn_protocols = vec![MESH_ALPN.to_vec()];
        // Peers are addressed by IP; there is no name worth sending.
        config.enable_sni = false;
        if !self.settings.resumption {
            config.resumption = Resumption::disabled();
        }
        let config = Arc::new(config);
        clients.insert(expected.clone(), (config.clone(), verifier));
        Ok(config)
    }

    /// The SPIFFE ID of a client this server accepted.
    ///
    /// Call only with a leaf from a completed handshake: the verifier has
    /// then accepted it, so when its cache no longer holds the leaf (it is
    /// cleared when full), reading the ID from the certificate is safe.
    pub fn client_id(&self, end_entity: &[u8]) -> Option<SpiffeId> {
        self.client_verifier
            .peer_id(end_entity)
            .or_else(|| id_of_verified(end_entity))
    }

    /// The SPIFFE ID of a server a client config built here accepted (same
    /// contract as [`Self::client_id`]).
    pub fn server_id(&self, expected: &PeerExpectation, end_entity: &[u8]) -> Option<SpiffeId> {
        let cached = self
            .clients
            .lock()
            .get(expected)
            .and_then(|(_, verifier)| verifier.peer_id(end_entity));
        cached.or_else(|| id_of_verified(end_entity))
    }
}

fn id_of_verified(end_entity: &[u8]) -> Option<SpiffeId> {
    crate::identity::svid::parse_leaf(end_entity)
        .ok()
        .map(|leaf| leaf.id)
}
