//! The discovery index: Services, EndpointSlices and Pods as compact
//! facts, and the pure answer to "where does traffic for this target
//! go?" — the endpoint set of a Service port (by ClusterIP or by name),
//! a single pod (by pod IP), or "not something I know".
//!
//! The rules (docs/discovery.md):
//! - ready endpoints only; serving-and-terminating ones only when no
//!   endpoint is ready (so a Service in a rolling restart still answers);
//! - a Service port is matched by its port number (IP targets) and its
//!   target port comes from each EndpointSlice's port of the same name, so
//!   a named `targetPort` resolving to different numbers on different
//!   pods works;
//! - one address family per answer: the target IP's, or for a name the
//!   Service's primary family (its first `ipFamilies` entry);
//! - ExternalName Services are not resolved (DNS does that); headless
//!   Services are answered by name (their pods by pod IP);
//! - an endpoint whose pod carries the injector's annotation is meshed,
//!   with the SPIFFE ID of the pod's ServiceAccount; opaque ports come
//!   from `outrider.dev/opaque-ports` on the Service (service ports) or
//!   the pod (its ports).

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::{IpAddr, SocketAddr};

use k8s_openapi::api::core::v1::{Pod, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;

use crate::config::parse_opaque_ports;
use crate::identity::{SpiffeId, TrustDomain};
use crate::inject::config::INJECTED;

/// The annotation naming opaque ports on a Service or a pod.
pub const OPAQUE_PORTS: &str = "outrider.dev/opaque-ports";
/// The label an EndpointSlice names its Service with.
const SERVICE_NAME_LABEL: &str = "kubernetes.io/service-name";

/// A namespaced name.
pub type Key = (String, String);

mod target;
pub use target::{InvalidTarget, Target};

/// Where traffic for a target goes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Resolution {
    /// Not a Service or pod this index knows: use the original destination.
    Unknown,
    Endpoints(EndpointSet),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EndpointSet {
    /// The Service, for a Service target (metric labels, never per pod).
    pub service: Option<Key>,
    /// The Service port is opaque (its `outrider.dev/opaque-ports`).
    pub opaque: bool,
    /// Sorted by address, so equal sets compare equal.
    pub endpoints: Vec<Endpoint>,
}

#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct Endpoint {
    pub addr: SocketAddr,
    /// The SPIFFE ID its proxy presents, when the pod is meshed.
    pub identity: Option<SpiffeId>,
    /// The pod's port is opaque (the pod's `outrider.dev/opaque-ports`).
    pub opaque: bool,
    /// Serving but terminating (only when nothing is ready).
    pub terminating: bool,
    pub zone: Option<String>,
    /// `namespace/name` of the pod, when known.
    pub pod: Option<Key>,
}

/// What a change touches: the subscribers of these need a new answer.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Affected {
    Service(Key),
    PodIp(IpAddr),
}

#[derive(Debug, Clone, PartialEq, Eq)]
struct ServicePort {
    name: Option<String>,
    port: u16,
}

#[derive(Debug, Clone, PartialEq, Eq)]
struct ServiceFacts {
    cluster_ips: Vec<IpAddr>,
    /// `ipFamilies[0]`, else the first ClusterIP's family.
    primary_v6: Option<bool>,
    external_name: bool,
    ports: Vec<ServicePort>,
    opaque_ports: BTreeSet<u16>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
struct SliceEndpoint {
    addresses: Vec<IpAddr>,
    ready: bool,
    serving: bool,
    terminating: bool,
    pod: Option<String>,
    zone: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
struct SliceFacts {
    service: Key,
    /// (port name, number) as the slice resolved them.
    ports: Vec<(Option<String>, u16)>,
    endpoints: Vec<SliceEndpoint>,
}

impl SliceFacts {
    /// The pods the slice names, each once.
    fn pods(&self) -> BTreeSet<&str> {
        self.endpoints
            .iter()
            .filter_map(|e| e.pod.as_deref())
            .collect()
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
struct PodFacts {
    ips: Vec<IpAddr>,
    service_account: String,
    meshed: bool,
    opaque_ports: BTreeSet<u16>,
}

/// The index. Apply and delete return what the change affects.
#[derive(Debug)]
pub struct Index {
    trust_domain: TrustDomain,
    services: BTreeMap<Key, ServiceFacts>,
    by_cluster_ip: HashMap<IpAddr, Key>,
    /// Slices by (namespace, slice name).
    slices: BTreeMap<Key, SliceFacts>,
    /// The slice names of each Service.
    slices_of: HashMap<Key, BTreeSet<String>>,
    pods: HashMap<Key, PodFacts>,
    pods_by_ip: HashMap<IpAddr, Key>,
    /// The Services whose slices name each pod, with how many slices do.
    services_of_pod: HashMap<Key, BTreeMap<Key, usize>>,
}

fn key_of(meta: &k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta) -> Option<Key> {
    Some((meta.namespace.clone()?, meta.name.clone()?))
}

fn opaque_of(meta: &k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta) -> BTreeSet<u16> {
    // A malformed annotation marks nothing opaque rather than everything:
    // the injector and the proxy refuse it with the reason.
    meta.annotations
        .as_ref()
        .and_then(|a| a.get(OPAQUE_PORTS))
        .and_then(|text| parse_opaque_ports(text).ok())
        .unwrap_or_default()
}

fn port_u16(port: i32) -> Option<u16> {
    u16::try_from(port).ok().filter(|p| *p != 0)
}

impl Index {
    pub fn new(trust_domain: TrustDomain) -> Self {
        Self {
            trust_domain,
            services: BTreeMap::new(),
            by_cluster_ip: HashMap::new(),
            slices: BTreeMap::new(),
            slices_of: HashMap::new(),
            pods: HashMap::new(),
            pods_by_ip: HashMap::new(),
            services_of_pod: HashMap::new(),
        }
    }

    pub fn apply_service(&mut self, service: &Service) -> Vec<Affected> {
        let Some(key) = key_of(&service.metadata) else {
            return Vec::new();
        };
        let spec = service.spec.clone().unwrap_or_default();
        let cluster_ips: Vec<IpAddr> = spec
            .cluster_ips
            .clone()
            .or_else(|| spec.cluster_ip.clone().map(|ip| vec![ip]))
            .unwrap_or_default()
            .iter()
            .filter_map(|ip| ip.parse().ok())
            .collect();
        let primary_v6 = spec
            .ip_families
            .as_ref()
            .and_then(|f| f.first())
            .map(|f| f == "IPv6")
            .or_else(|| cluster_ips.first().map(IpAddr::is_ipv6));
        let facts = ServiceFacts {
            cluster_ips,
            primary_v6,
            external_name: spec.type_.as_deref() == Some("ExternalName"),
            ports: spec
                .ports
                .iter()
                .flatten()
                .filter(|p| p.protocol.as_deref().unwrap_or("TCP") == "TCP")
                .filter_map(|p| {
                    Some(ServicePort {
                        name: p.name.clone().filter(|n| !n.is_empty()),
                        port: port_u16(p.port)?,
                    })
                })
                .collect(),
            opaque_ports: opaque_of(&service.metadata),
        };
        self.remove_service_ips(&key);
        for ip in &facts.cluster_ips {
            self.by_cluster_ip.insert(*ip, key.clone());
        }
        self.services.insert(key.clone(), facts);
        vec![Affected::Service(key)]
    }

    pub fn delete_service(&mut self, namespace: &str, name: &str) -> Vec<Affected> {
        let key = (namespace.to_string(), name.to_string());
        self.remove_service_ips(&key);
        self.services.remove(&key);
        vec![Affected::Service(key)]
    }

    fn remove_service_ips(&mut self, key: &Key) {
        if let Some(old) = self.services.get(key) {
            for ip in &old.cluster_ips {
                if self.by_cluster_ip.get(ip) == Some(key) {
                    self.by_cluster_ip.remove(ip);
                }
            }
        }
    }

    pub fn apply_slice(&mut self, slice: &EndpointSlice) -> Vec<Affected> {
        let Some(slice_key) = key_of(&slice.metadata) else {
            return Vec::new();
        };
        let Some(service_name) = slice
            .metadata
            .labels
            .as_ref()
            .and_then(|l| l.get(SERVICE_NAME_LABEL))
        else {
            return self.delete_slice(&slice_key.0, &slice_key.1);
        };
        // FQDN slices name hosts, not addresses: not ours to balance.
        if slice.address_type != "IPv4" && slice.address_type != "IPv6" {
            return self.delete_slice(&slice_key.0, &slice_key.1);
        }
        let service = (slice_key.0.clone(), service_name.clone());
        let endpoints = slice
            .endpoints
            .iter()
            .flatten()
            .map(|e| {
                let conditions = e.conditions.clone().unwrap_or_default();
                // The API: a nil `ready` means ready; `serving` defaults
                // to `ready`.
                let ready = conditions.ready.unwrap_or(true);
                SliceEndpoint {
                    addresses: e.addresses.iter().filter_map(|a| a.parse().ok()).collect(),
                    ready,
                    serving: conditions.serving.unwrap_or(ready),
                    terminating: conditions.terminating.unwrap_or(false),
                    pod: e
                        .target_ref
                        .as_ref()
                        .filter(|r| r.kind.as_deref() == Some("Pod"))
                        .and_then(|r| r.name.clone()),
                    zone: e.zone.clone(),
                }
            })
            .collect();
        let facts = SliceFacts {
            service: service.clone(),
            ports: slice
                .ports
                .iter()
                .flatten()
                .filter(|p| p.protocol.as_deref().unwrap_or("TCP") == "TCP")
                .filter_map(|p| {
                    Some((p.name.clone().filter(|n| !n.is_empty()), port_u16(p.port?)?))
                })
                .collect(),
            endpoints,
        };
        let mut affected = self.delete_slice(&slice_key.0, &slice_key.1);
        for pod in facts.pods() {
            *self
                .services_of_pod
                .entry((slice_key.0.clone(), pod.to_string()))
                .or_default()
                .entry(service.clone())
                .or_default() += 1;
        }
        self.slices_of
            .entry(service.clone())
            .or_default()
            .insert(slice_key.1.clone());
        self.slices.insert(slice_key, facts);
        affected.push(Affected::Service(service));
        affected.sort();
        affected.dedup();
        affected
    }

    pub fn delete_slice(&mut self, namespace: &str, name: &str) -> Vec<Affected> {
        let key = (namespace.to_string(), name.to_string());
        let Some(old) = self.slices.remove(&key) else {
            return Vec::new();
        };
        if let Some(names) = self.slices_of.get_mut(&old.service) {
            names.remove(name);
            if names.is_empty() {
                self.slices_of.remove(&old.service);
            }
        }
        for pod in old.pods() {
            let pod_key = (namespace.to_string(), pod.to_string());
            let Some(services) = self.services_of_pod.get_mut(&pod_key) else {
                continue;
            };
            if let Some(count) = services.get_mut(&old.service) {
                *count -= 1;
                if *count == 0 {
                    services.remove(&old.service);
                }
            }
            if services.is_empty() {
                self.services_of_pod.remove(&pod_key);
            }
        }
        vec![Affected::Service(old.service)]
    }

    pub fn apply_pod(&mut self, pod: &Pod) -> Vec<Affected> {
        let Some(key) = key_of(&pod.metadata) else {
            return Vec::new();
        };
        let status = pod.status.clone().unwrap_or_default();
        let mut ips: Vec<IpAddr> = status
            .pod_ips
            .iter()
            .flatten()
            .filter_map(|ip| ip.ip.parse().ok())
            .collect();
        if ips.is_empty()
            && let Some(ip) = status.pod_ip.as_ref().and_then(|ip| ip.parse().ok())
        {
            ips.push(ip);
        }
        let spec = pod.spec.clone().unwrap_or_default();
        // hostNetwork pods share the node's address: never map it to one pod.
        if spec.host_network == Some(true) {
            ips.clear();
        }
        let facts = PodFacts {
            ips,
            service_account: spec
                .service_account_name
                .clone()
                .filter(|s| !s.is_empty())
                .unwrap_or_else(|| "default".into()),
            meshed: pod
                .metadata
                .annotations
                .as_ref()
                .is_some_and(|a| a.contains_key(INJECTED)),
            opaque_ports: opaque_of(&pod.metadata),
        };
        let mut affected = self.delete_pod(&key.0, &key.1);
        for ip in &facts.ips {
            self.pods_by_ip.insert(*ip, key.clone());
            affected.push(Affected::PodIp(*ip));
        }
        affected.extend(
            self.services_of_pod
                .get(&key)
                .into_iter()
                .flat_map(BTreeMap::keys)
                .cloned()
                .map(Affected::Service),
        );
        self.pods.insert(key, facts);
        affected.sort();
        affected.dedup();
        affected
    }

    /// The ServiceAccount the pod `namespace/name` runs as, if known.
    pub fn service_account_of(&self, namespace: &str, name: &str) -> Option<&str> {
        self.pods
            .get(&(namespace.to_string(), name.to_string()))
            .map(|pod| pod.service_account.as_str())
    }

    pub fn delete_pod(&mut self, namespace: &str, name: &str) -> Vec<Affected> {
        let key = (namespace.to_string(), name.to_string());
        let Some(old) = self.pods.remove(&key) else {
            return Vec::new();
        };
        let mut affected = Vec::new();
        for ip in old.ips {
            if self.pods_by_ip.get(&ip) == Some(&key) {
                self.pods_by_ip.remove(&ip);
            }
            affected.push(Affected::PodIp(ip));
        }
        affected.extend(
            self.services_of_pod
                .get(&key)
                .into_iter()
                .flat_map(BTreeMap::keys)
                .cloned()
                .map(Affected::Service),
        );
        affected
    }

    /// What a target's subscribers watch.
    pub fn depends_on(&self, target: &Target) -> Affected {
        match target {
            Target::Addr(addr) => match self.by_cluster_ip.get(&addr.ip()) {
                Some(service) => Affected::Service(service.clone()),
                None => Affected::PodIp(addr.ip()),
            },
            Target::Name {
                namespace, name, ..
            } => Affected::Service((namespace.clone(), name.clone())),
        }
    }

    pub fn resolve(&self, target: &Target) -> Resolution {
        match target {
            Target::Addr(addr) => {
                if let Some(service) = self.by_cluster_ip.get(&addr.ip()) {
                    return self.service_endpoints(service, addr.port(), Some(addr.is_ipv6()));
                }
                self.pod_endpoint(*addr)
            }
            Target::Name {
                namespace,
                name,
                port,
            } => self.service_endpoints(&(namespace.clone(), name.clone()), *port, None),
        }
    }

    fn identity_of(&self, namespace: &str, pod: &PodFacts) -> Option<SpiffeId> {
        if !pod.meshed {
            return None;
        }
        SpiffeId::workload(&self.trust_domain, namespace, &pod.service_account).ok()
    }

    fn pod_endpoint(&self, addr: SocketAddr) -> Resolution {
        let Some(key) = self.pods_by_ip.get(&addr.ip()) else {
            return Resolution::Unknown;
        };
        let Some(pod) = self.pods.get(key) else {
            return Resolution::Unknown;
        };
        Resolution::Endpoints(EndpointSet {
            service: None,
            opaque: false,
            endpoints: vec![Endpoint {
                addr,
                identity: self.identity_of(&key.0, pod),
                opaque: pod.opaque_ports.contains(&addr.port()),
                terminating: false,
                zone: None,
                pod: Some(key.clone()),
            }],
        })
    }

    fn service_endpoints(&self, key: &Key, port: u16, family_v6: Option<bool>) -> Resolution {
        let Some(service) = self.services.get(key) else {
            return Resolution::Unknown;
        };
        if service.external_name {
            return Resolution::Unknown;
        }
        let Some(service_port) = service.ports.iter().find(|p| p.port == port) else {
            return Resolution::Unknown;
        };
        let family_v6 = family_v6.or(service.primary_v6);
        let mut ready = Vec::new();
        let mut terminating = Vec::new();
        for name in self.slices_of.get(key).into_iter().flatten() {
            let Some(slice) = self.slices.get(&(key.0.clone(), name.clone())) else {
                continue;
            };
            // The slice's number for this Service port (named target
            // ports may differ between slices).
            let Some(&(_, target_port)) = slice.ports.iter().find(|(n, _)| *n == service_port.name)
            else {
                continue;
            };
            for endpoint in &slice.endpoints {
                let list = if endpoint.ready {
                    &mut ready
                } else if endpoint.serving && endpoint.terminating {
                    &mut terminating
                } else {
                    continue;
                };
                let Some(ip) = endpoint
                    .addresses
                    .iter()
                    .find(|ip| family_v6.is_none_or(|v6| ip.is_ipv6() == v6))
                else {
                    continue;
                };
                let pod_key = endpoint.pod.clone().map(|p| (key.0.clone(), p));
                let pod = pod_key.as_ref().and_then(|k| self.pods.get(k));
                list.push(Endpoint {
                    addr: SocketAddr::new(*ip, target_port),
                    identity: pod.and_then(|p| self.identity_of(&key.0, p)),
                    opaque: pod.is_some_and(|p| p.opaque_ports.contains(&target_port)),
                    terminating: endpoint.terminating,
                    zone: endpoint.zone.clone(),
                    pod: pod_key,
                });
            }
        }
        let mut endpoints = if ready.is_empty() { terminating } else { ready };
        endpoints.sort();
        endpoints.dedup_by(|a, b| a.addr == b.addr);
        Resolution::Endpoints(EndpointSet {
            service: Some(key.clone()),
            opaque: service.opaque_ports.contains(&port),
            endpoints,
        })
    }
}

#[cfg(test)]
mod tests;
