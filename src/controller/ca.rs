//! The CA as the controller holds it: the Secret `outrider-ca` read (or
//! bootstrapped) through the API, checked by [`crate::ca::secret`] before
//! use, the last good one kept when a new version fails; the webhook's
//! serving certificate issued from it; and the expiry warnings.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::ByteString;
use k8s_openapi::api::core::v1::Secret;
use kube::api::Api;
use rustls::sign::CertifiedKey;
use time::OffsetDateTime;
use tokio::sync::watch;

use super::{Controller, ControllerConfig, Error, webhook};
use crate::ca::secret::{CA_SECRET, CaMaterial};
use crate::units::format_utc;

impl Controller {
    fn ca_secrets(&self) -> Api<Secret> {
        Api::namespaced(self.client.clone(), &self.config.namespace)
    }

    pub(super) fn current_ca(&self) -> Option<Arc<CaMaterial>> {
        self.ca.borrow().clone()
    }

    /// Reads (or bootstraps) the CA Secret; a changed Secret that fails
    /// its checks is refused and the last good CA kept.
    pub(super) async fn load_ca(&self) -> Result<(), Error> {
        let secret = match self.ca_secrets().get_opt(CA_SECRET).await? {
            Some(secret) => secret,
            // Deleted while we hold a CA: a new anchor now would cut every
            // proxy off from its peers until all had the new bundle. Keep
            // the last good CA; recreating it is the operator's call.
            None if self.current_ca().is_some() => {
                self.metrics.ca_load_failure();
                return Err(Error::CaSecretGone {
                    namespace: self.config.namespace.clone(),
                    name: CA_SECRET.into(),
                });
            }
            None if self.config.bootstrap => self.bootstrap_ca().await?,
            None => {
                return Err(Error::CaSecretMissing {
                    namespace: self.config.namespace.clone(),
                    name: CA_SECRET.into(),
                });
            }
        };
        let data = secret.data.unwrap_or_default();
        if self.ca_data.lock().as_ref() == Some(&data) {
            // Unchanged: fine if it was good, still refused if it was not.
            return match self.current_ca() {
                Some(_) => Ok(()),
                None => Err(Error::CaUnusable {
                    name: CA_SECRET.into(),
                }),
            };
        }
        let bytes: BTreeMap<String, Vec<u8>> =
            data.iter().map(|(k, v)| (k.clone(), v.0.clone())).collect();
        // Remembered either way, so the same bad data is not re-checked
        // (and re-logged) every pass; the last good CA stays in force.
        *self.ca_data.lock() = Some(data);
        let material = CaMaterial::from_secret_data(
            &bytes,
            &self.config.trust_domain,
            OffsetDateTime::now_utc(),
        )
        .inspect_err(|_| self.metrics.ca_load_failure())?;
        tracing::info!(
            issuer_expires = %format_utc(material.issuer_not_after.unix_timestamp()),
            anchor_expires = %format_utc(material.anchor_not_after.unix_timestamp()),
            "Loaded the CA"
        );
        self.metrics
            .set_ca_expiry(material.issuer_not_after, material.anchor_not_after);
        self.ca.send_replace(Some(Arc::new(material)));
        Ok(())
    }

    /// Creates the CA Secret with a new anchor and issuer; if another
    /// replica won the race, theirs is the one returned.
    async fn bootstrap_ca(&self) -> Result<Secret, Error> {
        let data = CaMaterial::bootstrap(
            &self.config.trust_domain,
            self.config.anchor_lifetime,
            self.config.issuer_lifetime,
            OffsetDateTime::now_utc(),
        )?;
        let secret = Secret {
            metadata: kube::api::ObjectMeta {
                name: Some(CA_SECRET.into()),
                labels: Some(BTreeMap::from([(
                    "app.kubernetes.io/managed-by".to_string(),
                    "outrider".to_string(),
                )])),
                ..Default::default()
            },
            type_: Some("kubernetes.io/tls".into()),
            data: Some(
                data.into_iter()
                    .map(|(k, v)| (k, ByteString(v.into_bytes())))
                    .collect(),
            ),
            ..Default::default()
        };
        let api = self.ca_secrets();
        match api.create(&super::write_params(), &secret).await {
            Ok(created) => {
                tracing::info!(
                    secret = CA_SECRET,
                    namespace = %self.config.namespace,
                    "Bootstrapped a new trust anchor and issuer"
                );
                Ok(created)
            }
            Err(kube::Error::Api(e)) if e.code == 409 => Ok(api.get(CA_SECRET).await?),
            Err(e) => Err(e.into()),
        }
    }

    /// A serving certificate for the webhook's Service names, from the
    /// current CA.
    pub(super) fn serving_key(&self) -> Result<Arc<CertifiedKey>, Error> {
        let ca = self.current_ca().ok_or(Error::NoServingCert)?;
        let service = &self.config.webhook_service;
        let ns = &self.config.namespace;
        let names = vec![
            format!("{service}.{ns}.svc"),
            format!("{service}.{ns}.svc.cluster.local"),
        ];
        let signed = ca.signing.issue_server_cert(
            &names,
            self.config.webhook_cert_lifetime,
            OffsetDateTime::now_utc(),
        )?;
        let key = webhook::certified_key(&signed.cert_pem, &signed.key_pem)?;
        self.metrics.issued("webhook", "serving");
        Ok(key)
    }
}

impl Controller {
    /// The discovery server's TLS: an SVID for the controller's own
    /// ServiceAccount from the CA in use, client certificates of the
    /// trust domain required, HTTP/2 only (gRPC).
    pub(super) fn discovery_tls(&self) -> Result<Arc<rustls::ServerConfig>, Error> {
        use crate::identity::{Credentials, RawCredentials, SpiffeId};
        let ca = self.current_ca().ok_or(Error::NoServingCert)?;
        let id = SpiffeId::workload(
            &ca.trust_domain,
            &self.config.namespace,
            super::discovery::server::SERVICE_ACCOUNT,
        )?;
        let svid = ca.signing.issue(
            &id,
            self.config.identity_lifetime,
            OffsetDateTime::now_utc(),
        )?;
        let raw = RawCredentials {
            cert_pem: svid.chain_pem.into_bytes(),
            key_pem: svid.key_pem.into_bytes(),
            bundle_pem: ca.bundle_pem.clone().into_bytes(),
        };
        let skew = Duration::from_secs(60);
        let credentials = Credentials::from_raw(&raw, &id, rustls_pki_types::UnixTime::now(), skew)
            .map_err(|e| Error::DiscoveryTls(e.to_string()))?;
        let config =
            super::discovery::server::server_tls(Arc::new(credentials), self.config.post_quantum)
                .map_err(|e| Error::DiscoveryTls(e.to_string()))?;
        self.metrics.issued("discovery", "serving");
        Ok(config)
    }
}

/// Reissues the discovery server's SVID at two thirds of its lifetime
/// and whenever the CA changes.
pub(super) async fn refresh_discovery_tls(
    controller: Arc<Controller>,
    tls: super::discovery::server::ServerTls,
    mut ca: watch::Receiver<Option<Arc<CaMaterial>>>,
) {
    let every = controller.config.identity_lifetime * 2 / 3;
    loop {
        tokio::select! {
            _ = tokio::time::sleep(every) => {}
            changed = ca.changed() => if changed.is_err() { return },
        }
        match controller.discovery_tls() {
            Ok(config) => *tls.write() = config,
            Err(error) => {
                tracing::error!(%error, "Cannot renew the discovery certificate; keeping the current one");
            }
        }
    }
}

/// Reissues the webhook's certificate at a third of its lifetime and
/// whenever the CA changes.
pub(super) async fn refresh_serving_cert(
    controller: Arc<Controller>,
    serving: Arc<webhook::ServingCert>,
    mut ca: watch::Receiver<Option<Arc<CaMaterial>>>,
) {
    let every = controller.config.webhook_cert_lifetime * 2 / 3;
    loop {
        tokio::select! {
            _ = tokio::time::sleep(every) => {}
            changed = ca.changed() => if changed.is_err() { return },
        }
        match controller.serving_key() {
            Ok(key) => serving.replace(key),
            Err(error) => {
                tracing::error!(%error, "Cannot renew the webhook certificate; keeping the current one");
            }
        }
    }
}

/// Logs (at most hourly) when the issuer or an anchor expires within the
/// configured warning period.
pub(super) fn warn_before_expiry(
    config: &ControllerConfig,
    ca: &CaMaterial,
    last: &mut Option<tokio::time::Instant>,
) {
    if last.is_some_and(|t| t.elapsed() < Duration::from_secs(3600)) {
        return;
    }
    let horizon = OffsetDateTime::now_utc() + config.expiry_warning;
    for (what, at) in [
        ("issuer", ca.issuer_not_after),
        ("trust anchor", ca.anchor_not_after),
    ] {
        if at <= horizon {
            tracing::warn!(
                certificate = what,
                expires = %format_utc(at.unix_timestamp()),
                "The mesh CA expires soon: rotate it (docs/operations.md)"
            );
            *last = Some(tokio::time::Instant::now());
        }
    }
}
