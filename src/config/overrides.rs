//! Flags and environment variables that replace keys of the file: the one
//! list of them. Each entry names its flag, its variable, the key it
//! replaces and the parser it goes through (the file's own, for keywords
//! and addresses), so a bad value exits 64 naming that key, and adding a
//! flag is one entry here plus the key in [`super::file`].

use std::path::PathBuf;

use super::file::FileConfig;
use super::{ConfigError, invalid, parse_labels, parse_opaque_ports, parse_probes};
use crate::units::{keyword, list, parse_bytes};

/// Declares [`Overrides`] and [`FileConfig::apply`] from one list of
/// `doc flag: Type, "ENV" => "key", slot = parser;` entries.
macro_rules! overrides {
    ($(
        $(#[doc = $doc:literal])*
        $flag:ident: $ty:ty, $env:literal => $key:literal, $($slot:ident).+ = $parse:expr;
    )*) => {
        /// Values given on the command line or in the environment; each
        /// replaces its key in the file. `outrider proxy` flattens this
        /// into its arguments.
        #[derive(Debug, Clone, Default, clap::Args)]
        pub struct Overrides {
            $(
                $(#[doc = $doc])*
                #[arg(long, env = $env)]
                pub $flag: Option<$ty>,
            )*
        }

        impl FileConfig {
            /// Applies overrides, each parsed as the file's value is.
            pub fn apply(&mut self, overrides: &Overrides) -> Result<(), ConfigError> {
                $(
                    if let Some(value) = &overrides.$flag {
                        self.$($slot).+ =
                            ($parse)(value).map_err(|reason| invalid($key, reason))?;
                    }
                )*
                Ok(())
            }
        }
    };
}

/// The value as given.
fn verbatim<T: Clone>(value: &T) -> Result<T, String> {
    Ok(value.clone())
}

/// The value as given, for a key that is unset by default.
fn set<T: Clone>(value: &T) -> Result<Option<T>, String> {
    Ok(Some(value.clone()))
}

/// A keyword or address, for a key that is unset by default.
fn some<T: serde::de::DeserializeOwned>(value: &str) -> Result<Option<T>, String> {
    keyword(value).map(Some)
}

/// A byte size (`134217728`, `128MiB`, `128Mi`), for a key that is
/// unset by default.
fn byte_size(value: &str) -> Result<Option<usize>, String> {
    parse_bytes(value).map(Some).map_err(|e| e.to_string())
}

/// A comma-separated list of keywords.
fn keywords<T: serde::de::DeserializeOwned>(value: &str) -> Result<Vec<T>, String> {
    list(value, keyword)
}

overrides! {
    /// The identity directory (tls.crt, tls.key, ca.crt).
    identity_dir: PathBuf, "OUTRIDER_IDENTITY_DIR" => "identity.dir", identity.dir = verbatim;
    /// The SPIFFE ID this workload's certificate must carry.
    identity_id: String, "OUTRIDER_IDENTITY_ID" => "identity.id", identity.id = some;
    /// strict or permissive.
    mtls_mode: String, "OUTRIDER_MTLS_MODE" => "mtls_mode", mtls_mode = keyword;
    /// The inbound listener address.
    inbound_listen: String, "OUTRIDER_INBOUND_LISTEN" => "inbound.listen", inbound.listen = keyword;
    /// Static mode: forward inbound traffic to this address.
    inbound_app: String, "OUTRIDER_INBOUND_APP" => "inbound.app", inbound.app = some;
    /// detect or opaque.
    inbound_protocol: String, "OUTRIDER_INBOUND_PROTOCOL" => "inbound.protocol", inbound.protocol = keyword;
    /// The outbound listener address.
    outbound_listen: String, "OUTRIDER_OUTBOUND_LISTEN" => "outbound.listen", outbound.listen = keyword;
    /// Static mode: send outbound traffic to this peer proxy.
    outbound_peer: String, "OUTRIDER_OUTBOUND_PEER" => "outbound.peer", outbound.peer = some;
    /// The SPIFFE ID the static peer must present.
    outbound_peer_id: String, "OUTRIDER_OUTBOUND_PEER_ID" => "outbound.peer_id", outbound.peer_id = some;
    /// detect or opaque.
    outbound_protocol: String, "OUTRIDER_OUTBOUND_PROTOCOL" => "outbound.protocol", outbound.protocol = keyword;
    /// The admin listener address (/metrics, /ready, /live).
    admin_listen: String, "OUTRIDER_ADMIN_LISTEN" => "admin.listen", admin.listen = keyword;
    /// Enable TLS 1.3 session resumption.
    tls_resumption: bool, "OUTRIDER_TLS_RESUMPTION" => "tls.resumption", tls.resumption = verbatim;
    /// Comma-separated key-exchange groups (x25519mlkem768, x25519,
    /// secp256r1, secp384r1), most preferred first.
    tls_key_exchange: String, "OUTRIDER_TLS_KEY_EXCHANGE" => "tls.key_exchange", tls.key_exchange = keywords;
    /// Offer the post-quantum hybrid x25519mlkem768 (`false` drops it).
    tls_post_quantum: bool, "OUTRIDER_TLS_POST_QUANTUM" => "tls.post_quantum", tls.post_quantum = verbatim;
    /// A tracing filter such as `info` or `outrider=debug`.
    log_level: String, "OUTRIDER_LOG_LEVEL" => "log.level", log.level = verbatim;
    /// plain or json.
    log_format: String, "OUTRIDER_LOG_FORMAT" => "log.format", log.format = keyword;
    /// The workload's namespace (default: the one in --identity-id).
    workload_namespace: String, "OUTRIDER_WORKLOAD_NAMESPACE" => "workload.namespace", workload.namespace = set;
    /// The workload's labels, `key=value,key=value` (local mode).
    workload_labels: String, "OUTRIDER_WORKLOAD_LABELS" => "workload.labels", workload.labels = parse_labels;
    /// A downward-API file holding the workload's labels (cluster mode).
    workload_labels_file: PathBuf, "OUTRIDER_WORKLOAD_LABELS_FILE" => "workload.labels_file", workload.labels_file = set;
    /// The pod's name (the injector passes metadata.name).
    workload_pod: String, "OUTRIDER_WORKLOAD_POD" => "workload.pod", workload.pod = set;
    /// none, files or kubernetes.
    policy_source: String, "OUTRIDER_POLICY_SOURCE" => "policy.source", policy.source = keyword;
    /// The directory of policy YAML (policy source `files`).
    policy_dir: PathBuf, "OUTRIDER_POLICY_DIR" => "policy.dir", policy.dir = set;
    /// allow-all, allow-authenticated, allow-same-namespace or deny.
    policy_default: String, "OUTRIDER_POLICY_DEFAULT" => "policy.default", policy.default = keyword;
    /// Kubelet probes always allowed, `PORT` or `PORT/path`, comma-separated
    /// (the injector fills it from the pod's probes).
    policy_probes: String, "OUTRIDER_POLICY_PROBES" => "policy.probes", policy.probes = parse_probes;
    /// The container's memory limit in bytes (the injector passes
    /// `limits.memory` through the downward API); sizes the connection
    /// limits when they are not set.
    memory_limit: String, "OUTRIDER_MEMORY_LIMIT" => "limits.memory_limit", limits.memory_limit = byte_size;
    /// Inbound request bodies over this size get 413 (`10Mi`, `1G`, bytes).
    max_request_body: String, "OUTRIDER_MAX_REQUEST_BODY" => "limits.max_request_body", limits.max_request_body = byte_size;
    /// Ports that skip protocol detection, comma-separated (replaces the
    /// default list).
    opaque_ports: String, "OUTRIDER_OPAQUE_PORTS" => "opaque_ports", opaque_ports = parse_opaque_ports;
    /// The controller's discovery API, `host:port` (cluster mode).
    discovery_address: String, "OUTRIDER_DISCOVERY_ADDRESS" => "discovery.address", discovery.address = set;
    /// The identity the discovery API must present.
    discovery_identity: String, "OUTRIDER_DISCOVERY_IDENTITY" => "discovery.identity", discovery.identity = some;
    /// PEM CA certificates trusted for JWKS servers beside the platform's.
    jwks_ca_file: PathBuf, "OUTRIDER_JWKS_CA_FILE" => "jwt.extra_ca_file", jwt.extra_ca_file = set;
}
