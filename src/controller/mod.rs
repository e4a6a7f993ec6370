//! Kubernetes control plane: the `WebSocketRoute` CRD, its reconciler, the snapshot compiler
//! and the control API gateways poll.
//!
//! One job per file (controller-rs style):
//!
//! - [`crd`]: the custom resource types, conditions and the generated CRD ([`crd_yaml`]).
//! - [`evaluate`]: pure rules: validation (the config model's [`Route::compile`]), scopes,
//!   conflicts, reference checks.
//! - [`snapshot`]: from the caches to per-gateway [`Snapshot`]s.
//! - [`reconcile`]: the kube-rs `Controller`, status by server-side apply, Events.
//! - [`leader`]: Lease-based leader election.
//! - [`api`]: the control API server (TokenReview auth, long poll).
//! - [`metrics`]: the counters.
//!
//! Kubernetes types stop here: gateways receive [`RouteSpec`]s in snapshots and compile them
//! like a routes file.
//!
//! # Scopes (which gateway gets which route)
//!
//! A route with a `workloadSelector` applies to sidecar gateways in its own namespace whose pod
//! labels contain the selector; a route without one applies to ingress gateways, i.e. pods
//! labelled `wsgate.io/gateway=ingress`, in every namespace. See [`evaluate`] for conflicts.
//!
//! # Replicas
//!
//! Every replica watches and caches routes, Services and Secrets and serves the control API
//! from its own caches; only the Lease holder writes status and Events. `status.gateways`
//! counts the gateways polling the leader (with one replica: all of them).
//!
//! [`Route::compile`]: crate::config::Route::compile
//! [`Snapshot`]: crate::config::control::Snapshot
//! [`RouteSpec`]: crate::config::RouteSpec

pub mod api;
pub mod crd;
pub mod evaluate;
pub mod leader;
pub mod metrics;
pub mod reconcile;
pub mod snapshot;
pub mod webhook;

use std::net::SocketAddr;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use kube::runtime::events::{Recorder, Reporter};
use tokio::net::TcpListener;
use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;

pub use api::{ApiConfig, AuthMode};
pub use crd::{WebSocketRoute, WebSocketRouteSpec, WebSocketRouteStatus, crd_yaml};
pub use leader::LeaseConfig;
pub use metrics::{ControllerMetrics, MetricsSnapshot};

use self::api::{ControlApi, GatewayTracker, Triggers};
use self::evaluate::Validator;
use self::reconcile::{Context, Wiring};
use self::snapshot::{Compiled, StoreLookup};
use crate::config::DurationSpec;
use crate::config::control::TOKEN_AUDIENCE;

/// Exit code for bad configuration.
pub const EXIT_CONFIG: u8 = 64;

/// Everything the control plane needs besides a client and a listener.
#[derive(Debug, Clone)]
pub struct ControllerConfig {
    /// Leader election.
    pub lease: LeaseConfig,
    /// Control API.
    pub api: ApiConfig,
    /// Each route is re-reconciled this often even without changes.
    pub resync: Duration,
}

impl ControllerConfig {
    /// Defaults: 30 s poll window, TokenReview auth, 10 min resync.
    pub fn new(lease: LeaseConfig) -> Self {
        Self {
            lease,
            api: ApiConfig {
                poll_timeout: Duration::from_secs(30),
                auth: AuthMode::TokenReview {
                    audience: TOKEN_AUDIENCE.to_owned(),
                },
                gateway_grace: Duration::from_secs(45),
            },
            resync: Duration::from_secs(600),
        }
    }
}

/// One controller instance: caches, reconciler, leader election, snapshot compiler and control
/// API. Build it, take what tests and `main` need ([`metrics`](Self::metrics),
/// [`leadership`](Self::leadership)), then [`run`](Self::run) it.
pub struct ControlPlane {
    client: kube::Client,
    config: ControllerConfig,
    metrics: Arc<ControllerMetrics>,
    leader: watch::Sender<bool>,
    compiled: watch::Sender<Arc<Compiled>>,
}

impl std::fmt::Debug for ControlPlane {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ControlPlane")
            .field("config", &self.config)
            .finish_non_exhaustive()
    }
}

impl ControlPlane {
    /// A control plane talking to the API server through `client`.
    pub fn new(client: kube::Client, config: ControllerConfig) -> Self {
        Self {
            client,
            config,
            metrics: Arc::new(ControllerMetrics::default()),
            leader: watch::Sender::new(false),
            compiled: watch::Sender::new(Arc::new(Compiled::default())),
        }
    }

    /// The counters.
    pub fn metrics(&self) -> Arc<ControllerMetrics> {
        self.metrics.clone()
    }

    /// Whether this instance leads, now and as it changes.
    pub fn leadership(&self) -> watch::Receiver<bool> {
        self.leader.subscribe()
    }

    /// Whether the caches have synced once (the control API serves snapshots), as it changes.
    pub fn readiness(&self) -> watch::Receiver<bool> {
        let (tx, rx) = watch::channel(self.compiled.borrow().ready);
        let mut compiled = self.compiled.subscribe();
        tokio::spawn(async move {
            while compiled.changed().await.is_ok() {
                let ready = compiled.borrow_and_update().ready;
                if tx.send(ready).is_err() {
                    return;
                }
            }
        });
        rx
    }

    /// Runs until `cancel` fires: then stops reconciling, releases the Lease if held, and
    /// closes the control API (open polls end; gateways keep their routes and retry).
    ///
    /// Dropping the future stops every task it started (nothing is left detached).
    pub async fn run(self, listener: TcpListener, cancel: CancellationToken) {
        let cancel = cancel.child_token();
        let _stop_tasks_on_drop = cancel.clone().drop_guard();
        let (all_tx, all_rx) = mpsc::channel(1);
        let (one_tx, one_rx) = mpsc::channel(1024);
        let triggers = Triggers {
            one: one_tx,
            all: all_tx.clone(),
        };
        let wiring = Wiring::new(self.client.clone(), (all_tx, all_rx), one_rx);
        let tracker = Arc::new(GatewayTracker::new(triggers.clone(), self.config.api.gateway_grace));
        let validator = Arc::new(Validator::new());
        let lookup = StoreLookup {
            services: wiring.services.clone(),
            secrets: wiring.secrets.clone(),
        };
        let recorder = Recorder::new(
            self.client.clone(),
            Reporter {
                controller: "wsgate-controller".to_owned(),
                instance: Some(self.config.lease.identity.clone()),
            },
        );
        let ctx = Arc::new(Context {
            client: self.client.clone(),
            routes: wiring.routes.clone(),
            lookup: lookup.clone(),
            validator: validator.clone(),
            leader: self.leader.subscribe(),
            tracker: tracker.clone(),
            metrics: self.metrics.clone(),
            recorder,
            resync: self.config.resync,
        });
        let tasks = tokio_util::task::TaskTracker::new();

        // Snapshot compiler: rebuild on every change of the caches, once they have synced.
        let routes = wiring.routes.clone();
        let mut world = wiring.world.subscribe();
        let mut synced = wiring.synced.subscribe();
        let compiled = self.compiled.clone();
        let stop = cancel.clone();
        tasks.spawn(async move {
            let synced = tokio::select! {
                s = synced.wait_for(|bits| *bits == reconcile::SYNCED_ALL) => s.is_ok(),
                () = stop.cancelled() => return,
            };
            if !synced {
                return;
            }
            loop {
                world.borrow_and_update();
                let state = routes.state();
                compiled.send_replace(Arc::new(Compiled::build(&state, &validator, &lookup)));
                tokio::select! {
                    changed = world.changed() => if changed.is_err() { return },
                    () = stop.cancelled() => return,
                }
            }
        });

        // Gateways that stopped polling stop counting.
        let sweep_tracker = tracker.clone();
        let every = (self.config.api.gateway_grace / 2).max(Duration::from_millis(100));
        let stop = cancel.clone();
        tasks.spawn(async move {
            let mut tick = tokio::time::interval(every);
            loop {
                tokio::select! {
                    _ = tick.tick() => sweep_tracker.sweep(),
                    () = stop.cancelled() => return,
                }
            }
        });

        // Leader election; gaining leadership rechecks every route.
        let acquired = triggers.clone();
        let metrics = self.metrics.clone();
        tasks.spawn(leader::run_leader_election(
            self.client.clone(),
            self.config.lease.clone(),
            self.leader.clone(),
            move || {
                ControllerMetrics::inc(&metrics.leader_acquisitions);
                acquired.everything();
            },
            cancel.clone(),
        ));
        let mut leader_rx = self.leader.subscribe();
        let metrics = self.metrics.clone();
        let stop = cancel.clone();
        tasks.spawn(async move {
            loop {
                metrics
                    .leader
                    .store(*leader_rx.borrow_and_update(), std::sync::atomic::Ordering::Relaxed);
                tokio::select! {
                    changed = leader_rx.changed() => if changed.is_err() { return },
                    () = stop.cancelled() => return,
                }
            }
        });

        // Control API.
        let api = Arc::new(ControlApi::new(
            self.client.clone(),
            self.compiled.subscribe(),
            self.config.api.clone(),
            tracker,
            self.metrics.clone(),
        ));
        tasks.spawn(api::serve(listener, api, cancel.clone()));

        // The controller drives the watches; it stops when cancelled.
        let controller = wiring.run(ctx);
        tokio::select! {
            () = controller => tracing::warn!("controller stream ended"),
            () = cancel.cancelled() => {}
        }
        tasks.close();
        tasks.wait().await;
        tracing::info!("controller stopped");
    }
}

/// `wsgate controller` flags.
#[derive(Debug, Clone, clap::Args)]
pub struct ControllerArgs {
    /// Address of the control API (gateways poll their routes here) and /healthz, /readyz.
    #[arg(long, default_value = "0.0.0.0:8081", env = "WSGATE_CONTROL_LISTEN")]
    pub control_listen: SocketAddr,
    /// How long a snapshot poll waits for a change before answering 304.
    #[arg(long, default_value = "30s")]
    pub poll_timeout: DurationSpec,
    /// Audience gateway tokens must carry.
    #[arg(long, default_value = TOKEN_AUDIENCE)]
    pub token_audience: String,
    /// Serve snapshots without authenticating gateways. For local testing only: anyone who can
    /// reach the control API can then read routes and GRIP signing keys.
    #[arg(long)]
    pub insecure_skip_auth: bool,
    /// Namespace of the leader-election Lease (the controller's own namespace).
    #[arg(long, env = "POD_NAMESPACE", default_value = "wsgate-system")]
    pub lease_namespace: String,
    /// Name of the leader-election Lease.
    #[arg(long, default_value = "wsgate-controller")]
    pub lease_name: String,
    /// This replica's identity in the Lease (the pod name).
    #[arg(long, env = "POD_NAME")]
    pub identity: Option<String>,
    /// How long a Lease is valid without renewal.
    #[arg(long, default_value = "15s")]
    pub lease_duration: DurationSpec,
    /// A leader that cannot renew for this long steps down.
    #[arg(long, default_value = "10s")]
    pub renew_deadline: DurationSpec,
    /// Time between Lease tries.
    #[arg(long, default_value = "2s")]
    pub retry_period: DurationSpec,
    /// Sidecar-injection webhook.
    #[command(flatten)]
    pub webhook: webhook::WebhookArgs,
}

impl ControllerArgs {
    /// The configuration, or what is wrong with the flags.
    ///
    /// # Errors
    ///
    /// Inconsistent durations.
    pub fn to_config(&self) -> Result<ControllerConfig, String> {
        let (lease, renew, retry) = (
            self.lease_duration.get(),
            self.renew_deadline.get(),
            self.retry_period.get(),
        );
        if lease < Duration::from_secs(1) {
            return Err("--lease-duration must be at least 1s".into());
        }
        if renew.is_zero() || renew >= lease {
            return Err(format!(
                "--renew-deadline ({}) must be shorter than --lease-duration ({})",
                self.renew_deadline, self.lease_duration
            ));
        }
        if retry.is_zero() || retry >= renew {
            return Err(format!(
                "--retry-period ({}) must be shorter than --renew-deadline ({})",
                self.retry_period, self.renew_deadline
            ));
        }
        if self.poll_timeout.is_zero() {
            return Err("--poll-timeout must be greater than 0s".into());
        }
        if self.token_audience.is_empty() && !self.insecure_skip_auth {
            return Err("--token-audience must not be empty".into());
        }
        let identity = self
            .identity
            .clone()
            .filter(|i| !i.is_empty())
            .unwrap_or_else(|| format!("wsgate-controller-{}", uuid::Uuid::new_v4()));
        let mut config = ControllerConfig::new(LeaseConfig {
            namespace: self.lease_namespace.clone(),
            name: self.lease_name.clone(),
            identity,
            lease_duration: lease,
            renew_deadline: renew,
            retry_period: retry,
        });
        config.api.poll_timeout = self.poll_timeout.get();
        config.api.gateway_grace = self.poll_timeout.get() + Duration::from_secs(15);
        config.api.auth = if self.insecure_skip_auth {
            AuthMode::InsecureSkipAuth
        } else {
            AuthMode::TokenReview {
                audience: self.token_audience.clone(),
            }
        };
        Ok(config)
    }
}

/// `wsgate controller`: runs until SIGTERM or SIGINT. Exit 64 on bad flags or when no cluster
/// configuration (in-cluster or kubeconfig) is found; 1 when the listener cannot be bound.
pub async fn run(args: ControllerArgs) -> ExitCode {
    let config = match args.to_config() {
        Ok(c) => c,
        Err(e) => {
            eprintln!("wsgate controller: bad configuration: {e}");
            return ExitCode::from(EXIT_CONFIG);
        }
    };
    if config.api.auth == AuthMode::InsecureSkipAuth {
        tracing::warn!("--insecure-skip-auth: the control API serves routes and keys to anyone");
    }
    let webhook_config = match args.webhook.enabled.then(|| args.webhook.to_config()).transpose() {
        Ok(c) => c,
        Err(e) => {
            eprintln!("wsgate controller: bad configuration: {e}");
            return ExitCode::from(EXIT_CONFIG);
        }
    };
    let client = match kube::Client::try_default().await {
        Ok(c) => c,
        Err(e) => {
            eprintln!("wsgate controller: no Kubernetes configuration: {e}");
            return ExitCode::from(EXIT_CONFIG);
        }
    };
    let listener = match TcpListener::bind(args.control_listen).await {
        Ok(l) => l,
        Err(e) => {
            eprintln!("wsgate controller: cannot listen on {}: {e}", args.control_listen);
            return ExitCode::FAILURE;
        }
    };
    tracing::info!(listen = %args.control_listen, identity = %config.lease.identity, "wsgate controller started");
    let webhook_listener = match &webhook_config {
        Some(c) => match TcpListener::bind(c.listen).await {
            Ok(l) => Some(l),
            Err(e) => {
                eprintln!("wsgate controller: cannot listen on {}: {e}", c.listen);
                return ExitCode::FAILURE;
            }
        },
        None => None,
    };
    let cancel = CancellationToken::new();
    let plane = ControlPlane::new(client.clone(), config);
    // The webhook counts its decisions where the control API's /metrics reads them.
    let admissions = plane.metrics().admissions.clone();
    let webhook_task = webhook_config.zip(webhook_listener).map(|(config, listener)| {
        tokio::spawn(webhook::run_webhook_with_metrics(
            listener,
            config,
            client,
            admissions,
            cancel.clone(),
        ))
    });
    let run = tokio::spawn(plane.run(listener, cancel.clone()));
    crate::signal::terminated().await;
    tracing::info!("shutdown: releasing the Lease, closing the control API");
    cancel.cancel();
    let _ = run.await;
    if let Some(task) = webhook_task
        && let Ok(Err(e)) = task.await
    {
        tracing::error!(error = %e, "injection webhook failed");
    }
    ExitCode::SUCCESS
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        args: ControllerArgs,
    }

    fn parse(argv: &[&str]) -> ControllerArgs {
        Cli::try_parse_from(std::iter::once("wsgate").chain(argv.iter().copied()))
            .expect("parse")
            .args
    }

    #[test]
    fn flags_have_working_defaults() {
        let args = parse(&["--identity", "ctl-0", "--lease-namespace", "ops"]);
        let config = args.to_config().expect("config");
        assert_eq!(args.control_listen, "0.0.0.0:8081".parse().expect("addr"));
        assert_eq!(config.lease.identity, "ctl-0");
        assert_eq!(config.lease.namespace, "ops");
        assert_eq!(config.lease.lease_duration, Duration::from_secs(15));
        assert_eq!(config.api.poll_timeout, Duration::from_secs(30));
        assert_eq!(
            config.api.auth,
            AuthMode::TokenReview {
                audience: "wsgate-control".into()
            }
        );
    }

    #[test]
    fn inconsistent_durations_are_refused() {
        let args = parse(&["--identity", "x", "--renew-deadline", "20s"]);
        assert!(args.to_config().unwrap_err().contains("--renew-deadline (20s)"));
        let args = parse(&["--identity", "x", "--retry-period", "10s"]);
        assert!(args.to_config().unwrap_err().contains("--retry-period"));
        let args = parse(&["--identity", "x", "--poll-timeout", "0s"]);
        assert!(args.to_config().is_err());
        let args = parse(&["--insecure-skip-auth"]);
        let config = args.to_config().expect("config");
        assert_eq!(config.api.auth, AuthMode::InsecureSkipAuth);
        assert!(config.lease.identity.starts_with("wsgate-controller-"));
    }

    #[test]
    fn the_checked_in_crd_matches_the_generated_one() {
        let path = concat!(env!("CARGO_MANIFEST_DIR"), "/crds/wsgate.io_websocketroutes.yaml");
        let on_disk = std::fs::read_to_string(path).unwrap_or_default();
        assert!(
            on_disk == crd_yaml(),
            "crds/wsgate.io_websocketroutes.yaml is stale: regenerate it with `wsgate crd > {path}`"
        );
    }
}
