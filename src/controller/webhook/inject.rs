//! The mutation: from an `AdmissionRequest` for a pod to the JSON patch that adds the gateway.
//!
//! Pure: no I/O, no clock. [`Injector::decide`] is the whole policy; [`Injector::admit`] wraps
//! it in an `AdmissionResponse` and [`Injector::handle`] in the `AdmissionReview` wire format.
//!
//! # What a patch adds
//!
//! - the `wsgate-gateway` container: a native sidecar (appended to `initContainers`, with
//!   `restartPolicy: Always` and a `startupProbe`, so it starts after the pod's own init
//!   containers and before the app) or a regular container (appended to `containers`);
//! - its command line `gateway --listen 0.0.0.0:PORT --admin-listen 0.0.0.0:ADMIN --workers N`
//!   (`wsgate.io/workers` or the webhook's default; `0` for `auto`) and then either `--control-url URL` (routes from the `WebSocketRoute`s whose `workloadSelector`
//!   matches the pod) or, when the pod sets `wsgate.io/target-port`, `--backend
//!   http://127.0.0.1:TARGET` (one catch-all route to the app, no control API; the gateway
//!   refuses both together), plus `--admin-allow-unauthenticated` without an admin token;
//! - the downward-API identity (`POD_NAME`, `POD_NAMESPACE`);
//! - with the control API: a projected ServiceAccount token for its audience, mounted read-only
//!   at `/var/run/secrets/wsgate/token` (the gateway's default `--control-token-file`);
//! - readiness (`/readyz`), liveness and startup (`/healthz`) probes on the admin port;
//! - a restricted `securityContext` and resource requests/limits;
//! - the annotation `wsgate.io/injected: MODE` (and, in container mode,
//!   `kubectl.kubernetes.io/default-container` naming the app, unless already set).
//!
//! # Why the admin listener binds 0.0.0.0
//!
//! The kubelet probes from outside the pod's network namespace, so `/healthz` and `/readyz`
//! must be reachable on the pod IP, and the image has no shell for an `exec` probe. The admin
//! listener also serves the publish and connection APIs; the gateway refuses a non-loopback
//! admin address without credentials. With `wsgate.io/admin-token-secret` (or the webhook's
//! default) the token comes from that Secret and is required on those APIs; without one the
//! sidecar runs with `--admin-allow-unauthenticated` and the response carries a warning: any
//! pod that can reach the pod IP could then publish to its channels (restrict it with a
//! NetworkPolicy, or set the token).

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use base64::Engine as _;
use json_patch::jsonptr::PointerBuf;
use json_patch::{AddOperation, Patch, PatchOperation};
use k8s_openapi::api::core::v1::{
    Capabilities, Container, ContainerPort, EnvVar, EnvVarSource, HTTPGetAction, ObjectFieldSelector, Pod, Probe,
    ProjectedVolumeSource, ResourceRequirements, SeccompProfile, SecretKeySelector, SecurityContext,
    ServiceAccountTokenProjection, Volume, VolumeMount, VolumeProjection,
};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity as K8sQuantity;
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use kube::core::DynamicObject;
use kube::core::admission::{AdmissionRequest, AdmissionResponse, AdmissionReview, Operation};
use serde_json::{Value, json};

use crate::controller::metrics::{Admission, AdmissionMetrics};

use super::annotations::{
    ANNOTATION_ADMIN_TOKEN_SECRET, ANNOTATION_INJECTED, ANNOTATION_PORT, ANNOTATION_SIDECAR_MODE, INJECT_DISABLED,
    InjectDefaults, LABEL_INJECT, PodOptions, SidecarMode,
};

/// Name of the injected container.
pub const CONTAINER_NAME: &str = "wsgate-gateway";
/// Name of the projected token volume.
pub const TOKEN_VOLUME: &str = "wsgate-control-token";
/// Where the token volume is mounted (the token is the file `token` in it).
pub const TOKEN_MOUNT_PATH: &str = "/var/run/secrets/wsgate";
/// Name of the gateway's client port (what a Service's `targetPort` can name).
pub const PORT_NAME: &str = "wsgate";
/// Name of the admin port.
pub const ADMIN_PORT_NAME: &str = "wsgate-admin";
/// UID and GID the sidecar runs as (distroless `nonroot`).
pub const SIDECAR_UID: i64 = 65532;
/// Key of the admin token in the Secret named by `wsgate.io/admin-token-secret`.
pub const ADMIN_TOKEN_KEY: &str = "token";
/// `kubectl` picks this container by default.
const DEFAULT_CONTAINER_ANNOTATION: &str = "kubectl.kubernetes.io/default-container";

/// Everything the webhook needs to build a sidecar.
#[derive(Debug, Clone, PartialEq)]
pub struct InjectConfig {
    /// Defaults that annotations override.
    pub defaults: InjectDefaults,
    /// The wsgate image (its entrypoint is the `wsgate` binary).
    pub image: String,
    /// `Always`, `IfNotPresent` or `Never`.
    pub image_pull_policy: String,
    /// The controller's control API (`http://wsgate-controller.wsgate-system.svc:8081`);
    /// `None`: every pod must set `wsgate.io/target-port` (a static `--backend` route).
    pub control_url: Option<String>,
    /// Audience of the projected token (the controller's `--token-audience`).
    pub token_audience: String,
    /// Lifetime of the projected token (the kubelet refreshes it at 80 %).
    pub token_expiration_seconds: i64,
    /// Namespaces never injected (the controller's own among them).
    pub excluded_namespaces: BTreeSet<String>,
    /// `OTEL_EXPORTER_OTLP_ENDPOINT` for the sidecars.
    pub otel_endpoint: Option<String>,
    /// `WSGATE_NATS` (the gateway's `--nats`) for the sidecars.
    pub nats_url: Option<String>,
    /// Minor version of the API server (`1.MINOR`) when known; native sidecars need ≥ 28.
    pub server_minor: Option<u32>,
}

/// Why a pod is admitted unchanged.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Skip {
    /// Not a pod CREATE (the webhook registers only those; anything else passes).
    NotAPodCreate,
    /// The namespace is excluded.
    ExcludedNamespace(String),
    /// The pod is labelled `wsgate.io/inject=disabled`.
    OptedOut,
    /// The pod already has the `wsgate-gateway` container.
    AlreadyInjected,
    /// The pod uses the node's network: the gateway's ports would be the node's.
    HostNetwork,
}

/// What to do with one pod.
#[derive(Debug, Clone, PartialEq)]
pub enum Outcome {
    /// Admit unchanged.
    Skip(Skip),
    /// Admit with this patch.
    Inject {
        /// The JSON patch.
        patch: Patch,
        /// The sidecar mode used.
        mode: SidecarMode,
        /// Warnings for the client (`kubectl` prints them).
        warnings: Vec<String>,
    },
    /// Refuse the pod, with a message for the client.
    Deny(String),
}

impl Skip {
    /// The metric label of this reason.
    fn admission(&self) -> Admission {
        match self {
            Self::NotAPodCreate => Admission::SkippedNotAPodCreate,
            Self::ExcludedNamespace(_) => Admission::SkippedExcludedNamespace,
            Self::OptedOut => Admission::SkippedOptedOut,
            Self::AlreadyInjected => Admission::SkippedAlreadyInjected,
            Self::HostNetwork => Admission::SkippedHostNetwork,
        }
    }
}

/// Why an admission request body could not be answered.
#[derive(Debug, thiserror::Error)]
pub enum ReviewError {
    /// The body is not an `AdmissionReview`.
    #[error("not an AdmissionReview: {0}")]
    Decode(#[source] serde_json::Error),
    /// The review has no `request`.
    #[error("the AdmissionReview has no request")]
    NoRequest,
    /// The response could not be serialized.
    #[error("cannot encode the response: {0}")]
    Encode(#[source] serde_json::Error),
}

/// The injection policy, shared by every request.
#[derive(Debug)]
pub struct Injector {
    config: InjectConfig,
    metrics: Arc<AdmissionMetrics>,
}

fn add(tokens: &[&str], value: Value) -> PatchOperation {
    PatchOperation::Add(AddOperation {
        path: PointerBuf::from_tokens(tokens.iter().copied()),
        value,
    })
}

fn pod_display_name(pod: &Pod) -> String {
    match (&pod.metadata.name, &pod.metadata.generate_name) {
        (Some(name), _) if !name.is_empty() => name.clone(),
        (_, Some(prefix)) => format!("{prefix}*"),
        _ => "<unnamed>".to_owned(),
    }
}

impl Injector {
    /// An injector with this configuration and its own decision counters.
    pub fn new(config: InjectConfig) -> Self {
        Self::with_metrics(config, Arc::default())
    }

    /// An injector counting its decisions in `metrics` (the controller's
    /// [`ControllerMetrics::admissions`](crate::controller::ControllerMetrics::admissions), so
    /// the controller's `/metrics` shows them).
    pub fn with_metrics(config: InjectConfig, metrics: Arc<AdmissionMetrics>) -> Self {
        Self { config, metrics }
    }

    /// The configuration.
    pub fn config(&self) -> &InjectConfig {
        &self.config
    }

    /// The decision counters.
    pub fn metrics(&self) -> &Arc<AdmissionMetrics> {
        &self.metrics
    }

    /// Decides what to do with `pod`, created in `namespace`.
    pub fn decide(&self, namespace: &str, pod: &Pod) -> Outcome {
        self.evaluate(namespace, pod).0
    }

    /// [`Injector::decide`] with the decision's metric label.
    fn evaluate(&self, namespace: &str, pod: &Pod) -> (Outcome, Admission) {
        let skip = |reason: Skip| {
            let admission = reason.admission();
            (Outcome::Skip(reason), admission)
        };
        if self.config.excluded_namespaces.contains(namespace) {
            return skip(Skip::ExcludedNamespace(namespace.to_owned()));
        }
        let labels = pod.metadata.labels.clone().unwrap_or_default();
        if labels.get(LABEL_INJECT).map(String::as_str) == Some(INJECT_DISABLED) {
            return skip(Skip::OptedOut);
        }
        let Some(spec) = &pod.spec else {
            return (
                Outcome::Deny("wsgate sidecar injection refused: the pod has no spec".to_owned()),
                Admission::DeniedNoSpec,
            );
        };
        let init = spec.init_containers.as_deref().unwrap_or_default();
        let all_containers = || spec.containers.iter().chain(init.iter());
        if all_containers().any(|c| c.name == CONTAINER_NAME) {
            return skip(Skip::AlreadyInjected);
        }
        if spec.host_network == Some(true) {
            return skip(Skip::HostNetwork);
        }
        let annotations = pod.metadata.annotations.clone().unwrap_or_default();
        let (options, mut warnings) = match PodOptions::from_annotations(&annotations, &self.config.defaults) {
            Ok(parsed) => parsed,
            Err(errors) => {
                let list: Vec<String> = errors.iter().map(ToString::to_string).collect();
                return (
                    Outcome::Deny(format!("wsgate sidecar injection refused: {}", list.join("; "))),
                    Admission::DeniedInvalidAnnotations,
                );
            }
        };

        let mut problems = Vec::new();
        if options.sidecar_mode == SidecarMode::Native
            && options.sidecar_mode_explicit
            && let Some(minor) = self.config.server_minor
            && minor < 28
        {
            problems.push(format!(
                "{ANNOTATION_SIDECAR_MODE}: \"native\" needs Kubernetes 1.29 (1.28 with the SidecarContainers \
                 feature gate) and this API server is 1.{minor}; use \"container\""
            ));
        }
        if options.target_port.is_none() && self.config.control_url.is_none() {
            problems.push(
                "wsgate.io/target-port is required: the webhook has no control URL to fetch routes from".to_owned(),
            );
        }
        if spec.volumes.iter().flatten().any(|v| v.name == TOKEN_VOLUME) {
            problems.push(format!(
                "the volume name {TOKEN_VOLUME} is reserved for the wsgate sidecar"
            ));
        }
        for c in all_containers() {
            for p in c.ports.iter().flatten() {
                for (annotation, ours) in [
                    (ANNOTATION_PORT, options.port),
                    ("wsgate.io/admin-port", options.admin_port),
                ] {
                    if p.container_port == i32::from(ours) {
                        problems.push(format!(
                            "{annotation} {ours} is also declared by container {}; choose another port with {annotation}",
                            c.name
                        ));
                    }
                }
                if let Some(name) = &p.name
                    && (name == PORT_NAME || name == ADMIN_PORT_NAME)
                {
                    problems.push(format!(
                        "the port name {name} (container {}) is reserved for the wsgate sidecar",
                        c.name
                    ));
                }
            }
        }
        if !problems.is_empty() {
            return (
                Outcome::Deny(format!("wsgate sidecar injection refused: {}", problems.join("; "))),
                Admission::DeniedInvalidPod,
            );
        }
        if options.admin_token_secret.is_none() {
            warnings.push(format!(
                "wsgate: the sidecar's admin API (publish, connections) on port {} accepts unauthenticated \
                 requests; set {ANNOTATION_ADMIN_TOKEN_SECRET}",
                options.admin_port
            ));
        }

        let container = self.container(&options);
        let mut ops = Vec::new();
        let mut new_annotations = BTreeMap::new();
        new_annotations.insert(ANNOTATION_INJECTED.to_owned(), options.sidecar_mode.as_str().to_owned());
        if options.sidecar_mode == SidecarMode::Container
            && !annotations.contains_key(DEFAULT_CONTAINER_ANNOTATION)
            && let Some(first) = spec.containers.first()
        {
            new_annotations.insert(DEFAULT_CONTAINER_ANNOTATION.to_owned(), first.name.clone());
        }
        if pod.metadata.annotations.is_none() {
            ops.push(add(&["metadata", "annotations"], json!(new_annotations)));
        } else {
            for (key, value) in new_annotations {
                ops.push(add(&["metadata", "annotations", &key], Value::String(value)));
            }
        }
        if self.uses_control_api(&options) {
            let volume = to_value(&self.token_volume());
            match &spec.volumes {
                Some(_) => ops.push(add(&["spec", "volumes", "-"], volume)),
                None => ops.push(add(&["spec", "volumes"], Value::Array(vec![volume]))),
            }
        }
        let container = to_value(&container);
        match (options.sidecar_mode, &spec.init_containers) {
            (SidecarMode::Native, Some(_)) => ops.push(add(&["spec", "initContainers", "-"], container)),
            (SidecarMode::Native, None) => ops.push(add(&["spec", "initContainers"], Value::Array(vec![container]))),
            (SidecarMode::Container, _) => ops.push(add(&["spec", "containers", "-"], container)),
        }
        let admission = match options.sidecar_mode {
            SidecarMode::Native => Admission::InjectedNative,
            SidecarMode::Container => Admission::InjectedContainer,
        };
        (
            Outcome::Inject {
                patch: Patch(ops),
                mode: options.sidecar_mode,
                warnings,
            },
            admission,
        )
    }

    /// Whether the sidecar fetches its routes from the control API (no `wsgate.io/target-port`).
    fn uses_control_api(&self, o: &PodOptions) -> bool {
        o.target_port.is_none() && self.config.control_url.is_some()
    }

    fn token_volume(&self) -> Volume {
        Volume {
            name: TOKEN_VOLUME.to_owned(),
            projected: Some(ProjectedVolumeSource {
                default_mode: Some(0o444),
                sources: Some(vec![VolumeProjection {
                    service_account_token: Some(ServiceAccountTokenProjection {
                        audience: Some(self.config.token_audience.clone()),
                        expiration_seconds: Some(self.config.token_expiration_seconds),
                        path: "token".to_owned(),
                    }),
                    ..VolumeProjection::default()
                }]),
            }),
            ..Volume::default()
        }
    }

    fn container(&self, o: &PodOptions) -> Container {
        let mut args = vec![
            "gateway".to_owned(),
            "--listen".to_owned(),
            format!("0.0.0.0:{}", o.port),
            "--admin-listen".to_owned(),
            format!("0.0.0.0:{}", o.admin_port),
            // Always explicit: the gateway's own default (one per CPU it may use) means every
            // CPU of the node for a sidecar without a CPU limit.
            "--workers".to_owned(),
            o.workers.as_arg().to_string(),
        ];
        match (o.target_port, &self.config.control_url) {
            (Some(target), _) => args.extend(["--backend".to_owned(), format!("http://127.0.0.1:{target}")]),
            (None, Some(url)) => args.extend(["--control-url".to_owned(), url.clone()]),
            // Refused in `decide`.
            (None, None) => {}
        }
        if o.admin_token_secret.is_none() {
            args.push("--admin-allow-unauthenticated".to_owned());
        }

        let field = |path: &str| EnvVarSource {
            field_ref: Some(ObjectFieldSelector {
                field_path: path.to_owned(),
                api_version: Some("v1".to_owned()),
            }),
            ..EnvVarSource::default()
        };
        let value = |name: &str, value: &str| EnvVar {
            name: name.to_owned(),
            value: Some(value.to_owned()),
            value_from: None,
        };
        let mut env = vec![
            EnvVar {
                name: crate::config::control::ENV_POD_NAME.to_owned(),
                value: None,
                value_from: Some(field("metadata.name")),
            },
            EnvVar {
                name: crate::config::control::ENV_POD_NAMESPACE.to_owned(),
                value: None,
                value_from: Some(field("metadata.namespace")),
            },
            value("WSGATE_LOG", &o.log_level),
            value("WSGATE_LOG_FORMAT", "json"),
        ];
        if let Some(secret) = &o.admin_token_secret {
            env.push(EnvVar {
                name: "WSGATE_ADMIN_TOKEN".to_owned(),
                value: None,
                value_from: Some(EnvVarSource {
                    secret_key_ref: Some(SecretKeySelector {
                        name: secret.clone(),
                        key: ADMIN_TOKEN_KEY.to_owned(),
                        optional: Some(false),
                    }),
                    ..EnvVarSource::default()
                }),
            });
        }
        if let Some(endpoint) = &self.config.otel_endpoint {
            env.push(value("OTEL_EXPORTER_OTLP_ENDPOINT", endpoint));
            env.push(value("OTEL_SERVICE_NAME", CONTAINER_NAME));
            env.push(value(
                "OTEL_RESOURCE_ATTRIBUTES",
                "k8s.pod.name=$(POD_NAME),k8s.namespace.name=$(POD_NAMESPACE)",
            ));
        }
        if let Some(url) = &self.config.nats_url {
            env.push(value("WSGATE_NATS", url));
        }

        let probe = |path: &str, period: i32, failures: i32| Probe {
            http_get: Some(HTTPGetAction {
                path: Some(path.to_owned()),
                port: IntOrString::Int(i32::from(o.admin_port)),
                scheme: Some("HTTP".to_owned()),
                ..HTTPGetAction::default()
            }),
            period_seconds: Some(period),
            failure_threshold: Some(failures),
            timeout_seconds: Some(2),
            ..Probe::default()
        };
        let requests = BTreeMap::from([
            ("cpu".to_owned(), K8sQuantity(o.cpu.to_string())),
            ("memory".to_owned(), K8sQuantity(o.memory.to_string())),
        ]);
        let mut limits = BTreeMap::from([("memory".to_owned(), K8sQuantity(o.memory_limit.to_string()))]);
        if let Some(cpu) = &o.cpu_limit {
            limits.insert("cpu".to_owned(), K8sQuantity(cpu.to_string()));
        }

        Container {
            name: CONTAINER_NAME.to_owned(),
            image: Some(self.config.image.clone()),
            image_pull_policy: Some(self.config.image_pull_policy.clone()),
            args: Some(args),
            env: Some(env),
            ports: Some(vec![
                ContainerPort {
                    name: Some(PORT_NAME.to_owned()),
                    container_port: i32::from(o.port),
                    protocol: Some("TCP".to_owned()),
                    ..ContainerPort::default()
                },
                ContainerPort {
                    name: Some(ADMIN_PORT_NAME.to_owned()),
                    container_port: i32::from(o.admin_port),
                    protocol: Some("TCP".to_owned()),
                    ..ContainerPort::default()
                },
            ]),
            resources: Some(ResourceRequirements {
                requests: Some(requests),
                limits: Some(limits),
                ..ResourceRequirements::default()
            }),
            restart_policy: (o.sidecar_mode == SidecarMode::Native).then(|| "Always".to_owned()),
            // Gates the app containers' start in native mode; harmless in container mode.
            startup_probe: Some(probe("/healthz", 1, 60)),
            readiness_probe: Some(probe("/readyz", 5, 3)),
            liveness_probe: Some(probe("/healthz", 10, 3)),
            security_context: Some(SecurityContext {
                allow_privilege_escalation: Some(false),
                capabilities: Some(Capabilities {
                    drop: Some(vec!["ALL".to_owned()]),
                    add: None,
                }),
                privileged: Some(false),
                read_only_root_filesystem: Some(true),
                run_as_non_root: Some(true),
                run_as_user: Some(SIDECAR_UID),
                run_as_group: Some(SIDECAR_UID),
                seccomp_profile: Some(SeccompProfile {
                    type_: "RuntimeDefault".to_owned(),
                    localhost_profile: None,
                }),
                ..SecurityContext::default()
            }),
            termination_message_policy: Some("FallbackToLogsOnError".to_owned()),
            volume_mounts: self.uses_control_api(o).then(|| {
                vec![VolumeMount {
                    name: TOKEN_VOLUME.to_owned(),
                    mount_path: TOKEN_MOUNT_PATH.to_owned(),
                    read_only: Some(true),
                    ..VolumeMount::default()
                }]
            }),
            ..Container::default()
        }
    }

    /// Answers one admission request. Never fails: a pod that cannot be read is admitted
    /// unchanged with a warning (a bug here must not block pod creation).
    pub fn admit(&self, req: &AdmissionRequest<DynamicObject>) -> AdmissionResponse {
        let response = AdmissionResponse::from(req);
        let is_pod_create = req.kind.group.is_empty()
            && req.kind.kind == "Pod"
            && req.operation == Operation::Create
            && req.sub_resource.is_none();
        let Some(object) = req.object.as_ref().filter(|_| is_pod_create) else {
            self.metrics.record(Skip::NotAPodCreate.admission());
            return response;
        };
        let pod: Pod = match serde_json::to_value(object).and_then(serde_json::from_value) {
            Ok(pod) => pod,
            Err(e) => {
                self.metrics.record(Admission::ErrorUnreadablePod);
                tracing::error!(uid = %req.uid, error = %e, "cannot read the pod of an admission request");
                let mut response = response;
                response.warnings = Some(vec![format!("wsgate: sidecar not injected: cannot read the pod: {e}")]);
                return response;
            }
        };
        let namespace = req
            .namespace
            .clone()
            .or_else(|| pod.metadata.namespace.clone())
            .unwrap_or_default();
        let name = pod_display_name(&pod);
        let (outcome, admission) = self.evaluate(&namespace, &pod);
        match outcome {
            Outcome::Skip(reason) => {
                self.metrics.record(admission);
                tracing::debug!(%namespace, pod = %name, ?reason, "not injected");
                let mut response = response;
                if reason == Skip::HostNetwork {
                    response.warnings = Some(vec![
                        "wsgate: sidecar not injected: the pod uses hostNetwork".to_owned(),
                    ]);
                }
                response
            }
            Outcome::Deny(message) => {
                self.metrics.record(admission);
                tracing::info!(%namespace, pod = %name, %message, "injection refused");
                let mut response = response.deny(message);
                response.result.code = 400;
                response.result.reason = "BadRequest".to_owned();
                response
            }
            Outcome::Inject { patch, mode, warnings } => match response.clone().with_patch(patch) {
                Ok(mut patched) => {
                    self.metrics.record(admission);
                    tracing::info!(%namespace, pod = %name, %mode, "sidecar injected");
                    if !warnings.is_empty() {
                        patched.warnings = Some(warnings);
                    }
                    patched
                }
                Err(e) => {
                    self.metrics.record(Admission::ErrorPatchEncoding);
                    tracing::error!(%namespace, pod = %name, error = %e, "cannot encode the patch");
                    response
                }
            },
        }
    }

    /// Answers an `AdmissionReview` body with an `AdmissionReview` body (same `apiVersion`).
    ///
    /// # Errors
    ///
    /// The body is not an `AdmissionReview` with a request (the server answers 400).
    pub fn handle(&self, body: &[u8]) -> Result<Vec<u8>, ReviewError> {
        let review: AdmissionReview<DynamicObject> = serde_json::from_slice(body).map_err(|e| {
            self.metrics.record(Admission::ErrorBadReview);
            ReviewError::Decode(e)
        })?;
        let request: AdmissionRequest<DynamicObject> = review.try_into().map_err(|_| {
            self.metrics.record(Admission::ErrorBadReview);
            ReviewError::NoRequest
        })?;
        let response = self.admit(&request);
        let mut review = serde_json::to_value(response.into_review()).map_err(ReviewError::Encode)?;
        // kube-core writes `patch` (Go `[]byte`) as an array of numbers, which the API server
        // accepts; Go itself writes base64, ~3.5 times smaller. Send what Go sends.
        if let Some(patch) = review.pointer_mut("/response/patch")
            && let Some(bytes) = patch.as_array().map(|items| {
                items
                    .iter()
                    .filter_map(|b| b.as_u64().and_then(|b| u8::try_from(b).ok()))
                    .collect::<Vec<u8>>()
            })
        {
            *patch = Value::String(base64::engine::general_purpose::STANDARD.encode(bytes));
        }
        serde_json::to_vec(&review).map_err(ReviewError::Encode)
    }
}

/// Serializes a k8s-openapi object. They are plain data (strings, numbers, maps with string
/// keys) and always serialize; `Null` would only appear on a serde bug.
fn to_value<T: serde::Serialize>(v: &T) -> Value {
    serde_json::to_value(v).unwrap_or(Value::Null)
}

#[cfg(test)]
mod tests;
