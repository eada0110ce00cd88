//! The pod transformation itself: pure, shared by the webhook and
//! `outrider inject`. Given a pod template's metadata and spec and the
//! mesh values, it adds the init container, the proxy, their volumes, and
//! the probe exemptions; an already injected pod comes back unchanged.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::{
    Capabilities, ConfigMapProjection, Container, ContainerPort, DownwardAPIProjection,
    DownwardAPIVolumeFile, DownwardAPIVolumeSource, EmptyDirVolumeSource, EnvVar, EnvVarSource,
    HTTPGetAction, KeyToPath, ObjectFieldSelector, PodSpec, Probe as KubeProbe,
    ProjectedVolumeSource, ResourceFieldSelector, ResourceRequirements, SeccompProfile,
    SecretVolumeSource, SecurityContext, ServiceAccountTokenProjection, Volume, VolumeMount,
    VolumeProjection,
};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;

use super::config::{
    INJECT, INJECTED, InjectConfig, PodChoice, PodSettings, SidecarMode, ValueError, pod_choice,
};
use crate::policy::index::Probe;

pub const PROXY_CONTAINER: &str = "outrider-proxy";
pub const INIT_CONTAINER: &str = "outrider-init";
pub const IDENTITY_VOLUME: &str = "outrider-identity";
pub const PODINFO_VOLUME: &str = "outrider-podinfo";
pub const TOKEN_VOLUME: &str = "outrider-token";
pub const XTABLES_LOCK_VOLUME: &str = "outrider-xtables-lock";
pub const IDENTITY_DIR: &str = "/var/run/outrider/identity";
pub const PODINFO_DIR: &str = "/var/run/outrider/podinfo";
const TOKEN_DIR: &str = "/var/run/secrets/kubernetes.io/serviceaccount";
/// The label injected pods carry (what a PodMonitor selects).
pub const MESHED_LABEL: &str = "outrider.dev/meshed";
pub const ADMIN_PORT: i32 = 4191;

/// The identity Secret the controller keeps for a ServiceAccount.
pub fn identity_secret_name(service_account: &str) -> String {
    format!("outrider-identity-{service_account}")
}

/// What happened to a pod.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// The sidecar was added; these probes are always allowed.
    Injected { probes: Vec<Probe> },
    /// It already had it: nothing changed.
    AlreadyInjected,
    /// `outrider.dev/inject: disabled` on the pod: nothing changed.
    Disabled,
    /// A `hostNetwork` pod: nothing changed. Its init container would
    /// rewrite the node's own iptables and capture the node's traffic.
    HostNetwork,
}

/// Adds the mesh to one pod template. `metadata` and `spec` are changed
/// only when the outcome is [`Outcome::Injected`].
pub fn inject_template(
    metadata: &mut ObjectMeta,
    spec: &mut PodSpec,
    mesh: &InjectConfig,
) -> Result<Outcome, ValueError> {
    let annotations = metadata.annotations.clone().unwrap_or_default();
    let label = metadata.labels.as_ref().and_then(|l| l.get(INJECT));
    let choice = pod_choice(
        annotations.get(INJECT).map(String::as_str),
        label.map(String::as_str),
    );
    if choice == PodChoice::Disabled {
        return Ok(Outcome::Disabled);
    }
    if spec.host_network == Some(true) {
        return Ok(Outcome::HostNetwork);
    }
    if is_injected(spec) {
        return Ok(Outcome::AlreadyInjected);
    }
    let settings = super::config::pod_settings(mesh, &annotations)?;
    let mut probes = app_probes(spec);
    for extra in &settings.extra_probes {
        if !probes.contains(extra) {
            probes.push(extra.clone());
        }
    }
    let service_account = spec
        .service_account_name
        .clone()
        .or_else(|| spec.service_account.clone())
        .unwrap_or_else(|| "default".to_string());

    let init = init_container(&settings.mesh);
    let proxy = proxy_container(&settings, &probes);
    let init_containers = spec.init_containers.get_or_insert_with(Vec::new);
    match settings.mesh.sidecar_mode {
        SidecarMode::Native => {
            // First the rules, then the proxy, then the pod's own init
            // containers, which so get a working network.
            init_containers.splice(0..0, [init, proxy]);
        }
        SidecarMode::Classic => {
            init_containers.insert(0, init);
            spec.containers.insert(0, proxy);
        }
    }
    spec.volumes
        .get_or_insert_with(Vec::new)
        .extend(volumes(&service_account));

    let labels = metadata.labels.get_or_insert_with(BTreeMap::new);
    labels.insert(MESHED_LABEL.to_string(), "true".to_string());
    let annotations = metadata.annotations.get_or_insert_with(BTreeMap::new);
    annotations.insert(INJECTED.to_string(), env!("CARGO_PKG_VERSION").to_string());
    // For annotation-driven Prometheus setups; an app's own scrape
    // annotations win.
    if !annotations.contains_key("prometheus.io/scrape") {
        annotations.insert("prometheus.io/scrape".into(), "true".into());
        annotations.insert("prometheus.io/port".into(), ADMIN_PORT.to_string());
        annotations.insert("prometheus.io/path".into(), "/metrics".into());
    }
    Ok(Outcome::Injected { probes })
}

fn is_injected(spec: &PodSpec) -> bool {
    spec.containers
        .iter()
        .chain(spec.init_containers.iter().flatten())
        .any(|c| c.name == PROXY_CONTAINER || c.name == INIT_CONTAINER)
}

/// The kubelet probes of the pod's containers, as exemptions: an
/// `httpGet` probe allows exactly its path (GET/HEAD, query ignored); a
/// `tcpSocket` or `grpc` probe cannot be told apart from other traffic on
/// its port, so the port is open to unauthenticated callers (documented
/// in docs/injection.md). Probes aimed at another host are not ours.
pub fn app_probes(spec: &PodSpec) -> Vec<Probe> {
    let mut probes: Vec<Probe> = Vec::new();
    for container in &spec.containers {
        let named_port = |name: &str| {
            container
                .ports
                .iter()
                .flatten()
                .find(|p| p.name.as_deref() == Some(name))
                .and_then(|p| u16::try_from(p.container_port).ok())
        };
        let port_of = |port: &IntOrString| match port {
            IntOrString::Int(p) => u16::try_from(*p).ok().filter(|p| *p > 0),
            IntOrString::String(name) => named_port(name),
        };
        for probe in [
            &container.liveness_probe,
            &container.readiness_probe,
            &container.startup_probe,
        ]
        .into_iter()
        .flatten()
        {
            let found = if let Some(http) = &probe.http_get {
                if http.host.as_deref().is_some_and(|h| !h.is_empty()) {
                    None
                } else {
                    let path = http.path.as_deref().unwrap_or("/");
                    let path = path.split('?').next().unwrap_or("/");
                    let path = if path.starts_with('/') {
                        path.to_string()
                    } else {
                        format!("/{path}")
                    };
                    port_of(&http.port).map(|port| Probe {
                        port,
                        path: Some(path),
                    })
                }
            } else if let Some(tcp) = &probe.tcp_socket {
                port_of(&tcp.port).map(|port| Probe { port, path: None })
            } else if let Some(grpc) = &probe.grpc {
                u16::try_from(grpc.port)
                    .ok()
                    .map(|port| Probe { port, path: None })
            } else {
                None
            };
            if let Some(found) = found
                && !probes.contains(&found)
            {
                probes.push(found);
            }
        }
    }
    probes
}

fn env(name: &str, value: impl Into<String>) -> EnvVar {
    EnvVar {
        name: name.into(),
        value: Some(value.into()),
        ..EnvVar::default()
    }
}

fn field_env(name: &str, field: &str) -> EnvVar {
    EnvVar {
        name: name.into(),
        value_from: Some(EnvVarSource {
            field_ref: Some(ObjectFieldSelector {
                field_path: field.into(),
                ..ObjectFieldSelector::default()
            }),
            ..EnvVarSource::default()
        }),
        ..EnvVar::default()
    }
}

fn init_container(mesh: &InjectConfig) -> Container {
    let mut env_vars = vec![
        env("OUTRIDER_INIT_PROXY_UID", mesh.proxy_uid.to_string()),
        env("OUTRIDER_INIT_IPTABLES_MODE", mesh.iptables_mode.clone()),
    ];
    for (name, value) in [
        ("OUTRIDER_INIT_SKIP_INBOUND_PORTS", &mesh.skip_inbound_ports),
        (
            "OUTRIDER_INIT_SKIP_OUTBOUND_PORTS",
            &mesh.skip_outbound_ports,
        ),
        (
            "OUTRIDER_INIT_SKIP_OUTBOUND_CIDRS",
            &mesh.skip_outbound_cidrs,
        ),
    ] {
        if !value.is_empty() {
            env_vars.push(env(name, value.clone()));
        }
    }
    Container {
        name: INIT_CONTAINER.into(),
        image: Some(mesh.image.clone()),
        image_pull_policy: Some(mesh.image_pull_policy.clone()),
        args: Some(vec!["init".into()]),
        env: Some(env_vars),
        resources: Some(ResourceRequirements {
            requests: Some(quantities(&[("cpu", "10m"), ("memory", "10Mi")])),
            limits: Some(quantities(&[("memory", "50Mi")])),
            ..ResourceRequirements::default()
        }),
        security_context: Some(SecurityContext {
            // iptables needs root and exactly these two capabilities.
            run_as_user: Some(0),
            run_as_non_root: Some(false),
            allow_privilege_escalation: Some(false),
            read_only_root_filesystem: Some(true),
            privileged: Some(false),
            capabilities: Some(Capabilities {
                add: Some(vec!["NET_ADMIN".into(), "NET_RAW".into()]),
                drop: Some(vec!["ALL".into()]),
            }),
            seccomp_profile: Some(runtime_default()),
            ..SecurityContext::default()
        }),
        // iptables takes its lock in /run, which a read-only root
        // filesystem would refuse (Linkerd mounts the same emptyDir).
        volume_mounts: Some(vec![VolumeMount {
            name: XTABLES_LOCK_VOLUME.into(),
            mount_path: "/run".into(),
            ..VolumeMount::default()
        }]),
        ..Container::default()
    }
}

fn proxy_container(settings: &PodSettings, probes: &[Probe]) -> Container {
    let mesh = &settings.mesh;
    let mut env_vars = vec![
        field_env("OUTRIDER_POD_NAMESPACE", "metadata.namespace"),
        field_env("OUTRIDER_SERVICE_ACCOUNT", "spec.serviceAccountName"),
        // Kubernetes expands $(VAR) from the variables above, so the ID is
        // right even when the manifest names no namespace.
        env(
            "OUTRIDER_IDENTITY_ID",
            format!(
                "spiffe://{}/ns/$(OUTRIDER_POD_NAMESPACE)/sa/$(OUTRIDER_SERVICE_ACCOUNT)",
                mesh.trust_domain
            ),
        ),
        env("OUTRIDER_IDENTITY_DIR", IDENTITY_DIR),
        env("OUTRIDER_MTLS_MODE", mesh.mtls_mode.clone()),
        // With discovery, policies come over the same connection to the
        // controller (no watch on the API server per proxy).
        env(
            "OUTRIDER_POLICY_SOURCE",
            if mesh.discovery_address.is_some() {
                "discovery"
            } else {
                "kubernetes"
            },
        ),
        field_env("OUTRIDER_WORKLOAD_POD", "metadata.name"),
        env("OUTRIDER_POLICY_DEFAULT", mesh.default_policy.clone()),
        env(
            "OUTRIDER_WORKLOAD_LABELS_FILE",
            format!("{PODINFO_DIR}/labels"),
        ),
        env("OUTRIDER_LOG_LEVEL", mesh.log_level.clone()),
        env("OUTRIDER_LOG_FORMAT", mesh.log_format.clone()),
    ];
    if !probes.is_empty() {
        let list: Vec<String> = probes
            .iter()
            .map(|p| match &p.path {
                Some(path) => format!("{}{path}", p.port),
                None => p.port.to_string(),
            })
            .collect();
        env_vars.push(env("OUTRIDER_POLICY_PROBES", list.join(",")));
    }
    if let Some(ports) = &mesh.opaque_ports {
        env_vars.push(env("OUTRIDER_OPAQUE_PORTS", ports.replace(' ', "")));
    }
    if let Some(size) = &mesh.max_request_body {
        env_vars.push(env("OUTRIDER_MAX_REQUEST_BODY", size.clone()));
    }
    if !mesh.post_quantum {
        // Set only when off, so the proxy's default stays the one place
        // that says the hybrid is on.
        env_vars.push(env("OUTRIDER_TLS_POST_QUANTUM", "false"));
    }
    if let Some(address) = &mesh.discovery_address {
        env_vars.push(env("OUTRIDER_DISCOVERY_ADDRESS", address.clone()));
    }
    if let Some(identity) = &mesh.discovery_identity {
        env_vars.push(env("OUTRIDER_DISCOVERY_IDENTITY", identity.clone()));
    }
    if mesh.resources.memory_limit.is_some() {
        // The proxy sizes its connection limits from the memory it may
        // use; Kubernetes passes the limit in bytes.
        env_vars.push(EnvVar {
            name: "OUTRIDER_MEMORY_LIMIT".into(),
            value_from: Some(EnvVarSource {
                resource_field_ref: Some(ResourceFieldSelector {
                    container_name: Some(PROXY_CONTAINER.into()),
                    resource: "limits.memory".into(),
                    ..ResourceFieldSelector::default()
                }),
                ..EnvVarSource::default()
            }),
            ..EnvVar::default()
        });
    }
    let http_probe = |path: &str, period: i32, failures: i32| KubeProbe {
        http_get: Some(HTTPGetAction {
            path: Some(path.into()),
            port: IntOrString::Int(ADMIN_PORT),
            ..HTTPGetAction::default()
        }),
        period_seconds: Some(period),
        failure_threshold: Some(failures),
        ..KubeProbe::default()
    };
    let native = mesh.sidecar_mode == SidecarMode::Native;
    let r = &mesh.resources;
    let requests: Vec<(&str, &str)> = [("cpu", &r.cpu_request), ("memory", &r.memory_request)]
        .into_iter()
        .filter_map(|(k, v)| v.as_deref().map(|v| (k, v)))
        .collect();
    let limits: Vec<(&str, &str)> = [("cpu", &r.cpu_limit), ("memory", &r.memory_limit)]
        .into_iter()
        .filter_map(|(k, v)| v.as_deref().map(|v| (k, v)))
        .collect();
    Container {
        name: PROXY_CONTAINER.into(),
        image: Some(mesh.image.clone()),
        image_pull_policy: Some(mesh.image_pull_policy.clone()),
        args: Some(vec!["proxy".into()]),
        env: Some(env_vars),
        // A native sidecar: started (and ready, see the startup probe)
        // before the app, stopped after it.
        restart_policy: native.then(|| "Always".into()),
        ports: Some(vec![ContainerPort {
            name: Some("outrider-admin".into()),
            container_port: ADMIN_PORT,
            protocol: Some("TCP".into()),
            ..ContainerPort::default()
        }]),
        // The app starts only once the proxy is ready (native sidecars
        // gate the next container on this probe).
        startup_probe: native.then(|| http_probe("/ready", 1, 120)),
        readiness_probe: Some(http_probe("/ready", 5, 3)),
        liveness_probe: Some(http_probe("/live", 10, 3)),
        resources: Some(ResourceRequirements {
            requests: (!requests.is_empty()).then(|| quantities(&requests)),
            limits: (!limits.is_empty()).then(|| quantities(&limits)),
            ..ResourceRequirements::default()
        }),
        security_context: Some(SecurityContext {
            run_as_user: Some(mesh.proxy_uid),
            run_as_group: Some(mesh.proxy_uid),
            run_as_non_root: Some(true),
            allow_privilege_escalation: Some(false),
            read_only_root_filesystem: Some(true),
            privileged: Some(false),
            capabilities: Some(Capabilities {
                drop: Some(vec!["ALL".into()]),
                ..Capabilities::default()
            }),
            seccomp_profile: Some(runtime_default()),
            ..SecurityContext::default()
        }),
        volume_mounts: Some(vec![
            VolumeMount {
                name: IDENTITY_VOLUME.into(),
                mount_path: IDENTITY_DIR.into(),
                read_only: Some(true),
                ..VolumeMount::default()
            },
            VolumeMount {
                name: PODINFO_VOLUME.into(),
                mount_path: PODINFO_DIR.into(),
                read_only: Some(true),
                ..VolumeMount::default()
            },
            VolumeMount {
                name: TOKEN_VOLUME.into(),
                mount_path: TOKEN_DIR.into(),
                read_only: Some(true),
                ..VolumeMount::default()
            },
        ]),
        ..Container::default()
    }
}

fn runtime_default() -> SeccompProfile {
    SeccompProfile {
        type_: "RuntimeDefault".into(),
        ..SeccompProfile::default()
    }
}

fn quantities(pairs: &[(&str, &str)]) -> BTreeMap<String, Quantity> {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), Quantity(v.to_string())))
        .collect()
}

fn volumes(service_account: &str) -> Vec<Volume> {
    let field = |path: &str, field: &str| DownwardAPIVolumeFile {
        path: path.into(),
        field_ref: Some(ObjectFieldSelector {
            field_path: field.into(),
            ..ObjectFieldSelector::default()
        }),
        ..DownwardAPIVolumeFile::default()
    };
    vec![
        Volume {
            name: XTABLES_LOCK_VOLUME.into(),
            empty_dir: Some(EmptyDirVolumeSource::default()),
            ..Volume::default()
        },
        Volume {
            name: IDENTITY_VOLUME.into(),
            secret: Some(SecretVolumeSource {
                secret_name: Some(identity_secret_name(service_account)),
                // Readable by the proxy's UID; no other container mounts it.
                default_mode: Some(0o444),
                ..SecretVolumeSource::default()
            }),
            ..Volume::default()
        },
        Volume {
            name: PODINFO_VOLUME.into(),
            downward_api: Some(DownwardAPIVolumeSource {
                items: Some(vec![
                    field("labels", "metadata.labels"),
                    field("name", "metadata.name"),
                    field("namespace", "metadata.namespace"),
                ]),
                ..DownwardAPIVolumeSource::default()
            }),
            ..Volume::default()
        },
        // The proxy watches policies with its own token, whether or not
        // the pod automounts one for the app.
        Volume {
            name: TOKEN_VOLUME.into(),
            projected: Some(ProjectedVolumeSource {
                default_mode: Some(0o444),
                sources: Some(vec![
                    VolumeProjection {
                        service_account_token: Some(ServiceAccountTokenProjection {
                            path: "token".into(),
                            expiration_seconds: Some(3607),
                            ..ServiceAccountTokenProjection::default()
                        }),
                        ..VolumeProjection::default()
                    },
                    VolumeProjection {
                        config_map: Some(ConfigMapProjection {
                            name: "kube-root-ca.crt".into(),
                            items: Some(vec![KeyToPath {
                                key: "ca.crt".into(),
                                path: "ca.crt".into(),
                                ..KeyToPath::default()
                            }]),
                            ..ConfigMapProjection::default()
                        }),
                        ..VolumeProjection::default()
                    },
                    VolumeProjection {
                        downward_api: Some(DownwardAPIProjection {
                            items: Some(vec![field("namespace", "metadata.namespace")]),
                        }),
                        ..VolumeProjection::default()
                    },
                ]),
                ..ProjectedVolumeSource::default()
            }),
            ..Volume::default()
        },
    ]
}
