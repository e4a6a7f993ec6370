//! Webhook TLS without manual steps: the certificate Secret and the `caBundle`.
//!
//! In [`CertMode::Generate`] (the default) every replica, at start and then every
//! [`check_interval`](BootstrapConfig::check_interval):
//!
//! 1. reads the Secret; if it holds a certificate that chains to its `ca.crt`, names
//!    `SERVICE.NAMESPACE.svc` and stays valid for [`renew_before`](BootstrapConfig::renew_before),
//!    uses it;
//! 2. otherwise generates a new CA and serving certificate and writes them (create, or update
//!    with the `resourceVersion` it read, so that concurrent replicas don't overwrite each
//!    other: the loser gets `409`, rereads and uses the winner's). While the previous
//!    certificate is still valid its CA stays in `ca.crt` after the new one, so replicas that
//!    still serve it remain trusted until they reload;
//! 3. serves the Secret's certificate (hot swap, no restart);
//! 4. patches the `caBundle` of every webhook of its `MutatingWebhookConfiguration` that differs
//!    from `ca.crt` (strategic merge by webhook name), as istiod does. Re-checking each period
//!    also repairs a `caBundle` reset by a `helm upgrade` or by hand.
//!
//! In [`CertMode::External`] cert-manager (or anyone) owns the Secret and cert-manager's CA
//! injector fills the `caBundle` (`cert-manager.io/inject-ca-from`): the controller only reads
//! and serves the Secret, reloading it when it changes.

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use base64::Engine as _;
use k8s_openapi::ByteString;
use k8s_openapi::api::admissionregistration::v1::MutatingWebhookConfiguration;
use k8s_openapi::api::core::v1::Secret;
use kube::Api;
use kube::api::{ObjectMeta, Patch, PatchParams, PostParams};
use serde_json::json;
use tokio_util::sync::CancellationToken;

use super::certs::{CertBundle, CertStore, TlsError};

/// Field manager of the controller's writes.
const FIELD_MANAGER: &str = "wsgate";

/// Who provides the serving certificate.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum CertMode {
    /// The controller generates and rotates a CA and certificate, and patches the `caBundle`.
    Generate,
    /// Another party (cert-manager) writes the Secret and the `caBundle`; the controller reads it.
    External,
}

/// Where the certificate lives and how long it lasts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BootstrapConfig {
    /// The controller's namespace (the Secret's and the Service's).
    pub namespace: String,
    /// Name of the Secret holding `ca.crt`, `tls.crt`, `tls.key`.
    pub secret_name: String,
    /// Name of the Service in front of the webhook.
    pub service: String,
    /// Cluster DNS domain (`cluster.local`).
    pub cluster_domain: String,
    /// Name of the `MutatingWebhookConfiguration` whose `caBundle` is patched.
    pub webhook_configuration: String,
    /// More names (DNS or IP) for the certificate, for a webhook reached by `url` rather than
    /// through the Service (an API server outside the cluster, the e2e tier's `127.0.0.1`).
    pub extra_names: Vec<String>,
    /// Who provides the certificate.
    pub mode: CertMode,
    /// Lifetime of generated certificates.
    pub validity: Duration,
    /// A certificate expiring sooner than this is replaced.
    pub renew_before: Duration,
    /// How often the Secret and the `caBundle` are rechecked.
    pub check_interval: Duration,
}

impl BootstrapConfig {
    /// The name the API server verifies: `SERVICE.NAMESPACE.svc`.
    pub fn server_name(&self) -> String {
        format!("{}.{}.svc", self.service, self.namespace)
    }

    /// The names put in a generated certificate (and required of an existing one).
    pub fn dns_names(&self) -> Vec<String> {
        let mut names = vec![
            self.server_name(),
            self.service.clone(),
            format!("{}.{}", self.service, self.namespace),
            format!("{}.{}.svc.{}", self.service, self.namespace, self.cluster_domain),
        ];
        for extra in &self.extra_names {
            if !names.contains(extra) {
                names.push(extra.clone());
            }
        }
        names
    }

    /// Checks `bundle` for every name of [`dns_names`](Self::dns_names) at `at`.
    ///
    /// # Errors
    ///
    /// The first name the certificate doesn't serve, or any other [`CertBundle::check`] failure.
    pub fn check(&self, bundle: &CertBundle, at: SystemTime) -> Result<(), TlsError> {
        for name in self.dns_names() {
            bundle.check(&name, at)?;
        }
        Ok(())
    }
}

/// Why a bootstrap step failed (each is retried).
#[derive(Debug, thiserror::Error)]
pub enum BootstrapError {
    /// An API call failed.
    #[error("{action}: {source}")]
    Kube {
        /// What was being done.
        action: String,
        /// The client's error.
        #[source]
        source: kube::Error,
    },
    /// Another replica wrote the Secret first; reread it.
    #[error("the Secret {0} changed concurrently; rereading it")]
    Conflict(String),
    /// A certificate problem.
    #[error(transparent)]
    Tls(#[from] TlsError),
    /// External mode: the Secret is absent or not usable yet.
    #[error("the Secret {name} is not usable yet: {reason}")]
    SecretNotReady {
        /// `namespace/name`.
        name: String,
        /// Why.
        reason: String,
    },
    /// The webhook configuration doesn't exist (not installed, or another name).
    #[error("MutatingWebhookConfiguration {0} not found: pods are not sent to the webhook")]
    NoWebhookConfiguration(String),
}

fn kube_error(action: impl Into<String>) -> impl FnOnce(kube::Error) -> BootstrapError {
    let action = action.into();
    move |source| BootstrapError::Kube { action, source }
}

fn is_conflict(e: &kube::Error) -> bool {
    matches!(e, kube::Error::Api(s) if s.code == 409)
}

/// What [`CertManager::ensure_secret`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SecretAction {
    /// The Secret's certificate was valid.
    Reused,
    /// There was no Secret; one was created.
    Created,
    /// The certificate was expiring or invalid; it was replaced.
    Rotated,
}

/// Keeps the webhook's certificate Secret and `caBundle` in order.
#[derive(Debug, Clone)]
pub struct CertManager {
    secrets: Api<Secret>,
    webhooks: Api<MutatingWebhookConfiguration>,
    config: BootstrapConfig,
}

impl CertManager {
    /// A manager talking to the API server through `client`.
    pub fn new(client: kube::Client, config: BootstrapConfig) -> Self {
        Self {
            secrets: Api::namespaced(client.clone(), &config.namespace),
            webhooks: Api::all(client),
            config,
        }
    }

    /// The configuration.
    pub fn config(&self) -> &BootstrapConfig {
        &self.config
    }

    fn secret_ref(&self) -> String {
        format!("{}/{}", self.config.namespace, self.config.secret_name)
    }

    /// Returns a certificate valid at `now`, from the Secret, or (generate mode) newly written
    /// into it.
    ///
    /// # Errors
    ///
    /// API failures, a lost race (`Conflict`: retry), external mode without a usable Secret.
    pub async fn ensure_secret(&self, now: SystemTime) -> Result<(CertBundle, SecretAction), BootstrapError> {
        let name = &self.config.secret_name;
        let server_name = self.config.server_name();
        let existing = self
            .secrets
            .get_opt(name)
            .await
            .map_err(kube_error(format!("reading Secret {}", self.secret_ref())))?;

        if self.config.mode == CertMode::External {
            let secret = existing.ok_or_else(|| BootstrapError::SecretNotReady {
                name: self.secret_ref(),
                reason: "not found (cert-manager creates it)".to_owned(),
            })?;
            let bundle = CertBundle::from_secret(&secret)?;
            bundle
                .check(&server_name, now)
                .map_err(|e| BootstrapError::SecretNotReady {
                    name: self.secret_ref(),
                    reason: e.to_string(),
                })?;
            return Ok((bundle, SecretAction::Reused));
        }

        let current = existing.as_ref().map(CertBundle::from_secret);
        let renew_at = now + self.config.renew_before;
        let problem = match &current {
            Some(Ok(bundle)) => match self.config.check(bundle, renew_at) {
                Ok(()) => return Ok((bundle.clone(), SecretAction::Reused)),
                Err(e) => Some(e.to_string()),
            },
            Some(Err(e)) => Some(e.to_string()),
            None => None,
        };

        let mut fresh = CertBundle::generate(&self.config.dns_names(), now, self.config.validity)?;
        if let Some(Ok(previous)) = &current
            && previous.check(&server_name, now).is_ok()
            && let Some(old_ca) = previous.current_ca_pem()
        {
            fresh.ca_pem.push_str(&old_ca);
        }
        match existing {
            None => {
                let secret = Secret {
                    metadata: ObjectMeta {
                        name: Some(name.clone()),
                        namespace: Some(self.config.namespace.clone()),
                        labels: Some(
                            [
                                (
                                    "app.kubernetes.io/managed-by".to_owned(),
                                    "wsgate-controller".to_owned(),
                                ),
                                ("app.kubernetes.io/component".to_owned(), "webhook".to_owned()),
                            ]
                            .into(),
                        ),
                        ..ObjectMeta::default()
                    },
                    type_: Some("kubernetes.io/tls".to_owned()),
                    data: Some(fresh.to_secret_data()),
                    ..Secret::default()
                };
                let params = PostParams {
                    field_manager: Some(FIELD_MANAGER.to_owned()),
                    ..PostParams::default()
                };
                match self.secrets.create(&params, &secret).await {
                    Ok(_) => {
                        tracing::info!(secret = %self.secret_ref(), "webhook certificate generated");
                        Ok((fresh, SecretAction::Created))
                    }
                    Err(e) if is_conflict(&e) => Err(BootstrapError::Conflict(self.secret_ref())),
                    Err(e) => Err(kube_error(format!("creating Secret {}", self.secret_ref()))(e)),
                }
            }
            Some(mut secret) => {
                // Keep the type (immutable), labels and resourceVersion (the update's precondition).
                let mut data = secret.data.take().unwrap_or_default();
                data.extend(fresh.to_secret_data());
                secret.data = Some(data);
                secret.string_data = None;
                secret.metadata.managed_fields = None;
                let params = PostParams {
                    field_manager: Some(FIELD_MANAGER.to_owned()),
                    ..PostParams::default()
                };
                match self.secrets.replace(name, &params, &secret).await {
                    Ok(_) => {
                        tracing::info!(
                            secret = %self.secret_ref(),
                            reason = problem.as_deref().unwrap_or("unknown"),
                            "webhook certificate rotated"
                        );
                        Ok((fresh, SecretAction::Rotated))
                    }
                    Err(e) if is_conflict(&e) => Err(BootstrapError::Conflict(self.secret_ref())),
                    Err(e) => Err(kube_error(format!("updating Secret {}", self.secret_ref()))(e)),
                }
            }
        }
    }

    /// Sets the `caBundle` of every webhook in the configuration to `ca_pem`. Returns whether
    /// anything changed.
    ///
    /// # Errors
    ///
    /// The configuration is absent, or the API call fails.
    pub async fn ensure_ca_bundle(&self, ca_pem: &str) -> Result<bool, BootstrapError> {
        let name = &self.config.webhook_configuration;
        let config = self
            .webhooks
            .get_opt(name)
            .await
            .map_err(kube_error(format!("reading MutatingWebhookConfiguration {name}")))?
            .ok_or_else(|| BootstrapError::NoWebhookConfiguration(name.clone()))?;
        let want = ByteString(ca_pem.as_bytes().to_vec());
        let stale: Vec<&str> = config
            .webhooks
            .iter()
            .flatten()
            .filter(|w| w.client_config.ca_bundle.as_ref() != Some(&want))
            .map(|w| w.name.as_str())
            .collect();
        if stale.is_empty() {
            return Ok(false);
        }
        let encoded = base64::engine::general_purpose::STANDARD.encode(ca_pem.as_bytes());
        let patch = json!({
            "webhooks": stale
                .iter()
                .map(|n| json!({"name": n, "clientConfig": {"caBundle": encoded}}))
                .collect::<Vec<_>>()
        });
        let params = PatchParams {
            field_manager: Some(FIELD_MANAGER.to_owned()),
            ..PatchParams::default()
        };
        self.webhooks
            .patch(name, &params, &Patch::Strategic(patch))
            .await
            .map_err(kube_error(format!("patching the caBundle of {name}")))?;
        tracing::info!(configuration = %name, webhooks = ?stale, "webhook caBundle updated");
        Ok(true)
    }

    /// One round: the Secret, the served certificate, the `caBundle`.
    ///
    /// # Errors
    ///
    /// The first step that failed.
    pub async fn reconcile(&self, store: &CertStore, now: SystemTime) -> Result<(), BootstrapError> {
        let (bundle, _) = self.ensure_secret(now).await?;
        if store.install(&bundle)? {
            tracing::info!(secret = %self.secret_ref(), "webhook serving certificate loaded");
        }
        if self.config.mode == CertMode::Generate {
            self.ensure_ca_bundle(&bundle.ca_pem).await?;
        }
        Ok(())
    }

    /// Reconciles now and then every `check_interval` (after a failure: 1 s, doubling up to
    /// 30 s) until `cancel` fires.
    pub async fn run(self, store: Arc<CertStore>, cancel: CancellationToken) {
        let mut failures: u32 = 0;
        loop {
            let delay = match self.reconcile(&store, SystemTime::now()).await {
                Ok(()) => {
                    failures = 0;
                    self.config.check_interval
                }
                Err(e) => {
                    failures = failures.saturating_add(1);
                    let delay = retry_delay(failures);
                    if matches!(e, BootstrapError::Conflict(_)) {
                        tracing::debug!(error = %e, "webhook certificate");
                    } else {
                        tracing::warn!(error = %e, retry_in = ?delay, "webhook certificate");
                    }
                    delay
                }
            };
            tokio::select! {
                () = tokio::time::sleep(delay) => {}
                () = cancel.cancelled() => return,
            }
        }
    }
}

/// 1 s, 2 s, 4 s … capped at 30 s.
fn retry_delay(failures: u32) -> Duration {
    let exp = failures.saturating_sub(1).min(5);
    Duration::from_secs(1 << exp).min(Duration::from_secs(30))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_cover_every_way_to_reach_the_service() {
        let config = BootstrapConfig {
            namespace: "ops".into(),
            secret_name: "cert".into(),
            service: "wsgate-controller".into(),
            cluster_domain: "cluster.local".into(),
            webhook_configuration: "wsgate-injector".into(),
            extra_names: vec!["127.0.0.1".into(), "wsgate-controller".into()],
            mode: CertMode::Generate,
            validity: Duration::from_secs(1),
            renew_before: Duration::from_secs(1),
            check_interval: Duration::from_secs(1),
        };
        assert_eq!(config.server_name(), "wsgate-controller.ops.svc");
        assert_eq!(
            config.dns_names(),
            [
                "wsgate-controller.ops.svc",
                "wsgate-controller",
                "wsgate-controller.ops",
                "wsgate-controller.ops.svc.cluster.local",
                "127.0.0.1"
            ]
        );
    }

    #[test]
    fn retries_back_off_to_thirty_seconds() {
        let delays: Vec<u64> = (1..=8).map(|n| retry_delay(n).as_secs()).collect();
        assert_eq!(delays, [1, 2, 4, 8, 16, 30, 30, 30]);
    }
}
