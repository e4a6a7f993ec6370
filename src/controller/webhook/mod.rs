//! Sidecar injection: a mutating admission webhook that adds the wsgate gateway to pods.
//!
//! Opt-in is by label, so the API server filters before calling: a namespace labelled
//! `wsgate.io/inject=enabled` (every pod in it, unless the pod is labelled
//! `wsgate.io/inject=disabled`), or a pod labelled `wsgate.io/inject=enabled`. The chart's
//! `MutatingWebhookConfiguration` holds those selectors; this module decides and patches.
//!
//! One job per file:
//!
//! - [`annotations`]: the `wsgate.io/*` annotations, parsed and checked (all errors at once).
//! - [`inject`]: the pure mutation: pod in, JSON patch (or denial) out.
//! - [`certs`]: CA and serving certificate generation and checks, the hot-swappable store.
//! - [`bootstrap`]: the certificate Secret and the `caBundle` (istiod-style), or cert-manager's.
//! - [`server`]: the HTTPS server.
//!
//! [`run_webhook`] ties them together for `wsgate controller --webhook`; every replica serves
//! the webhook (no leader needed: the mutation is pure and the Secret writes are optimistic).
//!
//! # Sidecar mode
//!
//! `--inject-sidecar-mode auto` (the default) asks the API server its version at start: from
//! 1.29 (native sidecars on by default) pods get a native sidecar, before that a regular
//! container. An API server older than 1.28 drops `restartPolicy` from init containers, which
//! would turn a native sidecar into an init container that never exits and a pod stuck in
//! `Init`; so a pod that asks for `native` there is refused.

pub mod annotations;
pub mod bootstrap;
pub mod certs;
pub mod inject;
pub mod server;

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

pub use annotations::{InjectDefaults, PodOptions, Quantity, SidecarMode, Workers};
pub use bootstrap::{BootstrapConfig, BootstrapError, CertManager, CertMode};
pub use certs::{CertBundle, CertStore, TlsError};
pub use inject::{InjectConfig, Injector, Outcome, Skip};

use crate::config::control::{ControlClientConfig, TOKEN_AUDIENCE};

/// Image injected when `--inject-image` is not given.
pub const DEFAULT_IMAGE: &str = concat!("wsgate:", env!("CARGO_PKG_VERSION"));

/// `--inject-sidecar-mode`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum SidecarModeArg {
    /// Native from Kubernetes 1.29, container before (asked from the API server at start).
    Auto,
    /// Always native sidecars.
    Native,
    /// Always regular containers.
    Container,
}

/// `--inject-image-pull-policy`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum PullPolicy {
    /// `Always`.
    #[value(name = "Always")]
    Always,
    /// `IfNotPresent`.
    #[value(name = "IfNotPresent")]
    IfNotPresent,
    /// `Never`.
    #[value(name = "Never")]
    Never,
}

impl PullPolicy {
    fn as_str(self) -> &'static str {
        match self {
            Self::Always => "Always",
            Self::IfNotPresent => "IfNotPresent",
            Self::Never => "Never",
        }
    }
}

/// `wsgate controller` flags of the injection webhook.
#[derive(Debug, Clone, clap::Args)]
pub struct WebhookArgs {
    /// Serve the sidecar-injection webhook.
    #[arg(id = "webhook", long = "webhook", env = "WSGATE_WEBHOOK")]
    pub enabled: bool,
    /// HTTPS address of the webhook.
    #[arg(long, default_value = "0.0.0.0:9443", env = "WSGATE_WEBHOOK_LISTEN")]
    pub webhook_listen: SocketAddr,
    /// The controller's namespace: where the certificate Secret and the Service are. Never
    /// injected.
    #[arg(long, env = "POD_NAMESPACE", default_value = "wsgate-system")]
    pub webhook_namespace: String,
    /// Service in front of the webhook (the certificate names `SERVICE.NAMESPACE.svc`).
    #[arg(long, default_value = "wsgate-controller")]
    pub webhook_service: String,
    /// Secret holding the webhook's `ca.crt`, `tls.crt` and `tls.key`.
    #[arg(long, default_value = "wsgate-webhook-cert")]
    pub webhook_cert_secret: String,
    /// `generate`: the controller creates and rotates the certificate and patches the
    /// `caBundle`; `external`: cert-manager does, the controller only reads the Secret.
    #[arg(long, value_enum, default_value = "generate")]
    pub webhook_cert_mode: CertMode,
    /// `MutatingWebhookConfiguration` whose `caBundle` the controller patches.
    #[arg(long, default_value = "wsgate-injector")]
    pub webhook_configuration: String,
    /// Cluster DNS domain, for the certificate's fully qualified name.
    #[arg(long, default_value = "cluster.local")]
    pub webhook_cluster_domain: String,
    /// More certificate names, DNS or IP (comma-separated), for a webhook configuration that
    /// calls a `url` instead of the Service.
    #[arg(long, value_delimiter = ',')]
    pub webhook_cert_extra_names: Vec<String>,
    /// Image of the injected gateway.
    #[arg(long, env = "WSGATE_INJECT_IMAGE", default_value = DEFAULT_IMAGE)]
    pub inject_image: String,
    /// Pull policy of the injected gateway.
    #[arg(long, value_enum, default_value = "IfNotPresent")]
    pub inject_image_pull_policy: PullPolicy,
    /// Control API URL given to sidecars (`http://wsgate-controller.NAMESPACE.svc:8081`): they
    /// serve the `WebSocketRoute`s selecting their pod. Without it, pods must set
    /// `wsgate.io/target-port` (a static route to the app).
    #[arg(long, env = "WSGATE_INJECT_CONTROL_URL")]
    pub inject_control_url: Option<String>,
    /// Namespaces never injected (comma-separated); the controller's own is always added.
    #[arg(long, value_delimiter = ',', default_value = "kube-system")]
    pub inject_excluded_namespaces: Vec<String>,
    /// Default sidecar mode (`wsgate.io/sidecar-mode` overrides it per pod).
    #[arg(long, value_enum, default_value = "auto")]
    pub inject_sidecar_mode: SidecarModeArg,
    /// Default gateway port (`wsgate.io/port`).
    #[arg(long, default_value_t = 8880)]
    pub inject_port: u16,
    /// Default admin port (`wsgate.io/admin-port`).
    #[arg(long, default_value_t = 9090)]
    pub inject_admin_port: u16,
    /// Default CPU request (`wsgate.io/cpu`).
    #[arg(long, default_value = "50m")]
    pub inject_cpu: String,
    /// Default CPU limit (`wsgate.io/cpu-limit`); none unless given.
    #[arg(long)]
    pub inject_cpu_limit: Option<String>,
    /// Default memory request (`wsgate.io/memory`).
    #[arg(long, default_value = "64Mi")]
    pub inject_memory: String,
    /// Default memory limit (`wsgate.io/memory-limit`); the request unless given.
    #[arg(long)]
    pub inject_memory_limit: Option<String>,
    /// Default data-plane worker threads of sidecars (`wsgate.io/workers`): 1-1024, or `auto`
    /// (`0`) for one per CPU the sidecar may use, which is every CPU of the node without a CPU
    /// limit.
    #[arg(long, default_value_t = Workers::SIDECAR_DEFAULT)]
    pub inject_workers: Workers,
    /// Default log filter of sidecars (`wsgate.io/log-level`).
    #[arg(long, default_value = "info")]
    pub inject_log_level: String,
    /// Default Secret (key `token`, in the pod's namespace) with the sidecars' admin token
    /// (`wsgate.io/admin-token-secret`). Without one the admin API is unauthenticated.
    #[arg(long)]
    pub inject_admin_token_secret: Option<String>,
    /// Audience of the sidecars' projected token (the controller's `--token-audience`).
    #[arg(long, default_value = TOKEN_AUDIENCE)]
    pub inject_token_audience: String,
    /// Lifetime in seconds of the sidecars' projected token (at least 600).
    #[arg(long, default_value_t = 3600)]
    pub inject_token_expiration: i64,
    /// `OTEL_EXPORTER_OTLP_ENDPOINT` for sidecars.
    #[arg(long, env = "WSGATE_INJECT_OTEL_ENDPOINT")]
    pub inject_otel_endpoint: Option<String>,
    /// NATS URL(s) for sidecars (their `WSGATE_NATS`, the gateway's `--nats`).
    #[arg(long, env = "WSGATE_INJECT_NATS_URL")]
    pub inject_nats_url: Option<String>,
}

/// A checked webhook configuration.
#[derive(Debug, Clone, PartialEq)]
pub struct WebhookConfig {
    /// HTTPS address.
    pub listen: SocketAddr,
    /// The mutation's settings (`server_minor` is filled in at start).
    pub inject: InjectConfig,
    /// `auto` is resolved against the API server's version at start.
    pub sidecar_mode: SidecarModeArg,
    /// The certificate.
    pub bootstrap: BootstrapConfig,
}

/// Why the webhook cannot run.
#[derive(Debug, thiserror::Error)]
pub enum WebhookError {
    /// Bad flags (exit 64).
    #[error("bad webhook configuration: {0}")]
    Config(String),
    /// The listener cannot be bound.
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        /// The address.
        addr: SocketAddr,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// The TLS configuration cannot be built.
    #[error(transparent)]
    Tls(#[from] TlsError),
}

impl WebhookArgs {
    /// The checked configuration.
    ///
    /// # Errors
    ///
    /// Every bad flag, in one message.
    pub fn to_config(&self) -> Result<WebhookConfig, String> {
        let mut errors = Vec::new();
        let mut quantity = |flag: &str, value: &str, memory: bool| -> Option<Quantity> {
            match value.parse::<Quantity>() {
                Ok(q) if memory && q.as_str().ends_with('m') => {
                    errors.push(format!("--{flag} {value}: suffix m is milli; write Mi for mebibytes"));
                    None
                }
                Ok(q) => Some(q),
                Err(e) => {
                    errors.push(format!("--{flag} {value}: {e}"));
                    None
                }
            }
        };
        let cpu = quantity("inject-cpu", &self.inject_cpu, false);
        let cpu_limit = self
            .inject_cpu_limit
            .as_deref()
            .map(|v| quantity("inject-cpu-limit", v, false));
        let memory = quantity("inject-memory", &self.inject_memory, true);
        let memory_limit = self
            .inject_memory_limit
            .as_deref()
            .map(|v| quantity("inject-memory-limit", v, true));
        if self.inject_image.trim().is_empty() {
            errors.push("--inject-image must not be empty".to_owned());
        }
        if let Some(url) = &self.inject_control_url
            && let Err(e) = ControlClientConfig::new(url.clone(), "namespace", "pod").validate()
        {
            errors.push(format!("--inject-control-url: {e}"));
        }
        if self.inject_port == 0 || self.inject_admin_port == 0 || self.inject_port == self.inject_admin_port {
            errors.push(format!(
                "--inject-port ({}) and --inject-admin-port ({}) must be two different non-zero ports",
                self.inject_port, self.inject_admin_port
            ));
        }
        if let Err(e) = annotations::check_log_level(&self.inject_log_level) {
            errors.push(format!("--inject-log-level {:?} {e}", self.inject_log_level));
        }
        for (flag, name) in [
            ("webhook-namespace", Some(&self.webhook_namespace)),
            ("webhook-service", Some(&self.webhook_service)),
            ("webhook-cert-secret", Some(&self.webhook_cert_secret)),
            ("webhook-configuration", Some(&self.webhook_configuration)),
            ("inject-admin-token-secret", self.inject_admin_token_secret.as_ref()),
        ] {
            if let Some(name) = name
                && !annotations::is_dns1123_subdomain(name)
            {
                errors.push(format!("--{flag} {name:?} is not a valid Kubernetes name"));
            }
        }
        let extra_names: Vec<String> = self
            .webhook_cert_extra_names
            .iter()
            .map(|n| n.trim().to_owned())
            .filter(|n| !n.is_empty())
            .collect();
        for name in &extra_names {
            let is_ip = name.parse::<std::net::IpAddr>().is_ok();
            let is_dns = annotations::is_dns1123_subdomain(name);
            if !is_ip && !is_dns {
                errors.push(format!(
                    "--webhook-cert-extra-names: {name:?} is neither a DNS name nor an IP address"
                ));
            }
        }
        if !(600..=u32::MAX.into()).contains(&self.inject_token_expiration) {
            errors.push("--inject-token-expiration must be at least 600 seconds".to_owned());
        }
        if self.inject_token_audience.is_empty() {
            errors.push("--inject-token-audience must not be empty".to_owned());
        }
        let (Some(cpu), Some(memory)) = (cpu, memory) else {
            return Err(errors.join("; "));
        };
        if !errors.is_empty() {
            return Err(errors.join("; "));
        }
        let mut excluded: BTreeSet<String> = self
            .inject_excluded_namespaces
            .iter()
            .map(|n| n.trim().to_owned())
            .filter(|n| !n.is_empty())
            .collect();
        excluded.insert(self.webhook_namespace.clone());
        let defaults = InjectDefaults {
            port: self.inject_port,
            admin_port: self.inject_admin_port,
            cpu,
            cpu_limit: cpu_limit.flatten(),
            memory,
            memory_limit: memory_limit.flatten(),
            workers: self.inject_workers,
            log_level: self.inject_log_level.clone(),
            sidecar_mode: match self.inject_sidecar_mode {
                SidecarModeArg::Native => SidecarMode::Native,
                SidecarModeArg::Auto | SidecarModeArg::Container => SidecarMode::Container,
            },
            admin_token_secret: self.inject_admin_token_secret.clone(),
        };
        // The same checks pods get: a default memory limit below the request, for instance.
        PodOptions::from_annotations(&Default::default(), &defaults).map_err(|errors| {
            errors
                .iter()
                .map(|e| format!("defaults: {e}"))
                .collect::<Vec<_>>()
                .join("; ")
        })?;
        Ok(WebhookConfig {
            listen: self.webhook_listen,
            inject: InjectConfig {
                defaults,
                image: self.inject_image.clone(),
                image_pull_policy: self.inject_image_pull_policy.as_str().to_owned(),
                control_url: self.inject_control_url.clone(),
                token_audience: self.inject_token_audience.clone(),
                token_expiration_seconds: self.inject_token_expiration,
                excluded_namespaces: excluded,
                otel_endpoint: self.inject_otel_endpoint.clone().filter(|s| !s.is_empty()),
                nats_url: self.inject_nats_url.clone().filter(|s| !s.is_empty()),
                server_minor: None,
            },
            sidecar_mode: self.inject_sidecar_mode,
            bootstrap: BootstrapConfig {
                namespace: self.webhook_namespace.clone(),
                secret_name: self.webhook_cert_secret.clone(),
                service: self.webhook_service.clone(),
                cluster_domain: self.webhook_cluster_domain.clone(),
                webhook_configuration: self.webhook_configuration.clone(),
                extra_names,
                mode: self.webhook_cert_mode,
                validity: Duration::from_secs(365 * 86_400),
                renew_before: Duration::from_secs(30 * 86_400),
                check_interval: Duration::from_secs(60),
            },
        })
    }
}

/// The minor version of a Kubernetes `1.x` API server (`"29+"` → 29).
fn parse_minor(major: &str, minor: &str) -> Option<u32> {
    if major.trim_end_matches('+') != "1" {
        return None;
    }
    let digits: String = minor.chars().take_while(char::is_ascii_digit).collect();
    digits.parse().ok()
}

/// Asks the API server its version (bounded: 10 s).
async fn server_minor(client: &kube::Client) -> Option<u32> {
    match tokio::time::timeout(Duration::from_secs(10), client.apiserver_version()).await {
        Ok(Ok(info)) => parse_minor(&info.major, &info.minor),
        Ok(Err(e)) => {
            tracing::warn!(error = %e, "cannot read the API server version");
            None
        }
        Err(_) => {
            tracing::warn!("reading the API server version timed out");
            None
        }
    }
}

/// The sidecar mode for `arg` on an API server of minor version `minor`.
fn resolve_mode(arg: SidecarModeArg, minor: Option<u32>) -> SidecarMode {
    match (arg, minor) {
        (SidecarModeArg::Native, _) => SidecarMode::Native,
        (SidecarModeArg::Container, _) => SidecarMode::Container,
        (SidecarModeArg::Auto, Some(m)) if m >= 29 => SidecarMode::Native,
        (SidecarModeArg::Auto, _) => SidecarMode::Container,
    }
}

/// Runs the webhook until `cancel` fires: certificate bootstrap and rotation, and the HTTPS
/// server. Spawn it beside the control plane in `wsgate controller` when `args.enabled`.
///
/// # Errors
///
/// Bad flags ([`WebhookError::Config`], exit 64) or an address that cannot be bound. Everything
/// later (API errors, missing Secret) is logged and retried.
pub async fn run_webhook(
    args: WebhookArgs,
    client: kube::Client,
    cancel: CancellationToken,
) -> Result<(), WebhookError> {
    let config = args.to_config().map_err(WebhookError::Config)?;
    let listener = TcpListener::bind(config.listen)
        .await
        .map_err(|source| WebhookError::Bind {
            addr: config.listen,
            source,
        })?;
    run_webhook_on(listener, config, client, cancel).await
}

/// [`run_webhook`] on a bound listener with a checked configuration (tests bind
/// `127.0.0.1:0`).
///
/// # Errors
///
/// The TLS configuration cannot be built.
pub async fn run_webhook_on(
    listener: TcpListener,
    config: WebhookConfig,
    client: kube::Client,
    cancel: CancellationToken,
) -> Result<(), WebhookError> {
    run_webhook_with_metrics(listener, config, client, Arc::default(), cancel).await
}

/// [`run_webhook_on`] counting the admission decisions in `admissions`: pass the controller's
/// [`ControllerMetrics::admissions`](crate::controller::ControllerMetrics::admissions) so its
/// `/metrics` exports `wsgate_webhook_admissions_total`.
///
/// # Errors
///
/// The TLS configuration cannot be built.
pub async fn run_webhook_with_metrics(
    listener: TcpListener,
    mut config: WebhookConfig,
    client: kube::Client,
    admissions: Arc<crate::controller::metrics::AdmissionMetrics>,
    cancel: CancellationToken,
) -> Result<(), WebhookError> {
    let minor = server_minor(&client).await;
    config.inject.server_minor = minor;
    let mode = resolve_mode(config.sidecar_mode, minor);
    config.inject.defaults.sidecar_mode = mode;
    if mode == SidecarMode::Native && minor.is_some_and(|m| m < 28) {
        tracing::warn!(
            server = ?minor.map(|m| format!("1.{m}")),
            "--inject-sidecar-mode native on an API server older than 1.28: injected pods will stay in Init"
        );
    }
    let store = Arc::new(CertStore::new());
    let tls = certs::server_config(store.clone())?;
    let injector = Arc::new(Injector::with_metrics(config.inject.clone(), admissions));
    tracing::info!(
        listen = %listener.local_addr().map_or(config.listen, |a| a),
        sidecar_mode = %mode,
        cert_mode = ?config.bootstrap.mode,
        "injection webhook started"
    );
    let manager = CertManager::new(client, config.bootstrap.clone());
    tokio::join!(
        manager.run(store, cancel.clone()),
        server::serve(listener, tls, injector, cancel)
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use clap::Parser;

    use super::*;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        args: WebhookArgs,
    }

    fn parse(argv: &[&str]) -> Result<WebhookConfig, String> {
        Cli::try_parse_from(std::iter::once("wsgate").chain(argv.iter().copied()))
            .map_err(|e| e.to_string())?
            .args
            .to_config()
    }

    #[test]
    fn flattens_beside_the_controller_flags() {
        #[derive(Parser)]
        struct Controller {
            #[command(flatten)]
            controller: crate::controller::ControllerArgs,
        }
        // clap's debug assertions reject duplicate ids and flags at parse time.
        let cli = Controller::try_parse_from([
            "wsgate",
            "--identity",
            "ctl-0",
            "--webhook",
            "--webhook-namespace",
            "ops",
            "--lease-namespace",
            "ops",
        ])
        .expect("parse");
        assert!(cli.controller.webhook.enabled);
        assert_eq!(cli.controller.identity.as_deref(), Some("ctl-0"));
        let config = cli.controller.webhook.to_config().expect("config");
        assert!(config.inject.excluded_namespaces.contains("ops"));
    }

    #[test]
    fn defaults_are_usable() {
        let config = parse(&["--webhook-namespace", "ops"]).expect("config");
        assert_eq!(config.listen, "0.0.0.0:9443".parse().expect("addr"));
        assert_eq!(config.sidecar_mode, SidecarModeArg::Auto);
        assert!(config.inject.excluded_namespaces.contains("kube-system"));
        assert!(config.inject.excluded_namespaces.contains("ops"));
        assert_eq!(config.inject.defaults.port, 8880);
        assert_eq!(config.inject.token_audience, TOKEN_AUDIENCE);
        assert_eq!(config.bootstrap.server_name(), "wsgate-controller.ops.svc");
        assert_eq!(config.bootstrap.mode, CertMode::Generate);
        assert_eq!(config.inject.image, DEFAULT_IMAGE);
        assert_eq!(config.inject.defaults.workers, Workers::SIDECAR_DEFAULT);
        assert_eq!(config.inject.defaults.workers.as_arg(), 2);
    }

    #[test]
    fn inject_workers_takes_a_count_or_auto() {
        for (value, arg) in [("8", 8), ("1024", 1024), ("auto", 0), ("0", 0)] {
            let config = parse(&["--inject-workers", value]).expect("config");
            assert_eq!(config.inject.defaults.workers.as_arg(), arg, "{value}");
        }
        for bad in ["1025", "lots", "-1"] {
            let flag = format!("--inject-workers={bad}");
            let e = parse(&[&flag]).expect_err(bad);
            assert!(e.contains("--inject-workers"), "{e}");
            assert!(e.contains("is not a worker count (1-1024, or auto)"), "{e}");
        }
    }

    #[test]
    fn every_bad_flag_is_reported() {
        let e = parse(&[
            "--inject-cpu",
            "lots",
            "--inject-memory",
            "64m",
            "--inject-control-url",
            "ftp://x",
            "--inject-port",
            "9090",
            "--inject-token-expiration",
            "60",
            "--webhook-cert-secret",
            "Bad_Name",
        ])
        .expect_err("bad");
        for needle in [
            "--inject-cpu lots",
            "--inject-memory 64m",
            "--inject-control-url",
            "--inject-port (9090)",
            "--inject-token-expiration",
            "--webhook-cert-secret",
        ] {
            assert!(e.contains(needle), "{needle} missing from {e}");
        }
        let e = parse(&["--inject-memory", "1Gi", "--inject-memory-limit", "512Mi"]).expect_err("limit");
        assert!(e.contains("below the memory request"), "{e}");
    }

    #[test]
    fn excluded_namespaces_are_a_comma_list() {
        let config = parse(&["--inject-excluded-namespaces", "kube-system, monitoring,"]).expect("config");
        let excluded: Vec<&str> = config.inject.excluded_namespaces.iter().map(String::as_str).collect();
        assert_eq!(excluded, ["kube-system", "monitoring", "wsgate-system"]);
    }

    #[test]
    fn auto_mode_follows_the_server_version() {
        assert_eq!(parse_minor("1", "29+"), Some(29));
        assert_eq!(parse_minor("1", "20"), Some(20));
        assert_eq!(parse_minor("2", "0"), None);
        assert_eq!(resolve_mode(SidecarModeArg::Auto, Some(29)), SidecarMode::Native);
        assert_eq!(resolve_mode(SidecarModeArg::Auto, Some(28)), SidecarMode::Container);
        assert_eq!(resolve_mode(SidecarModeArg::Auto, None), SidecarMode::Container);
        assert_eq!(resolve_mode(SidecarModeArg::Native, Some(20)), SidecarMode::Native);
        assert_eq!(
            resolve_mode(SidecarModeArg::Container, Some(33)),
            SidecarMode::Container
        );
    }
}
