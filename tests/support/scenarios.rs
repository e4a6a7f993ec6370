//! Controller scenarios shared by `tests/controller.rs` (in-process fake API server) and
//! `tests/kube_real.rs` (a real kube-apiserver, see docs/KUBE-E2E.md).
//!
//! Each scenario is an `async fn` over a [`Cluster`]: an admin `kube::Client` for what the test
//! does, the client the controllers under test run with (on a real server: a ServiceAccount
//! with only the controller's RBAC), the namespace to work in, and the fake's extra hooks when
//! there is one. Where the fake and a real server differ (minting ServiceAccount tokens, moving
//! the clock), [`Cluster`] hides it.
//!
//! Included with `#[path = "support/scenarios.rs"] mod scenarios;` next to `mod support;`.
#![allow(dead_code)]

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use base64::Engine as _;
use k8s_openapi::api::authentication::v1::{BoundObjectReference, TokenRequest, TokenRequestSpec};
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::{Namespace, Pod, Secret, Service, ServiceAccount};
use k8s_openapi::api::events::v1::Event;
use kube::api::{ApiResource, DeleteParams, DynamicObject, Patch, PatchParams, PostParams};
use kube::{Api, ResourceExt};
use serde_json::json;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use crate::support::fake_kube::{FakeKube, TokenUser};
use crate::support::{DEADLINE, eventually, http_request};
use wsgate::config::control::{SNAPSHOT_PATH, Snapshot, TOKEN_AUDIENCE};
use wsgate::controller::{
    ApiConfig, AuthMode, ControlPlane, ControllerConfig, ControllerMetrics, LeaseConfig, WebSocketRoute,
};

/// Namespace of the leader-election Lease.
pub const LEASE_NAMESPACE: &str = "wsgate-system";
/// Name of the leader-election Lease.
pub const LEASE_NAME: &str = "wsgate-controller";
/// ServiceAccount of the gateway pods the scenarios create.
pub const GATEWAY_SA: &str = "gateway";

/// A controller running in this process.
pub struct RunningController {
    pub addr: SocketAddr,
    pub metrics: Arc<ControllerMetrics>,
    pub leader: watch::Receiver<bool>,
    cancel: CancellationToken,
    task: tokio::task::JoinHandle<()>,
}

impl RunningController {
    /// Starts a controller with short Lease timings and a 5 s poll window.
    pub async fn start(client: kube::Client, identity: &str) -> Self {
        let mut config = ControllerConfig::new(LeaseConfig {
            namespace: LEASE_NAMESPACE.into(),
            name: LEASE_NAME.into(),
            identity: identity.into(),
            lease_duration: Duration::from_secs(2),
            renew_deadline: Duration::from_millis(1500),
            retry_period: Duration::from_millis(100),
        });
        config.api = ApiConfig {
            poll_timeout: Duration::from_secs(5),
            auth: AuthMode::TokenReview {
                audience: TOKEN_AUDIENCE.into(),
            },
            gateway_grace: Duration::from_secs(5),
        };
        let plane = ControlPlane::new(client, config);
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let metrics = plane.metrics();
        let leader = plane.leadership();
        let cancel = CancellationToken::new();
        let task = tokio::spawn(plane.run(listener, cancel.clone()));
        Self {
            addr,
            metrics,
            leader,
            cancel,
            task,
        }
    }

    pub async fn wait_leader(&mut self, want: bool) {
        tokio::time::timeout(DEADLINE, self.leader.wait_for(|l| *l == want))
            .await
            .unwrap_or_else(|_| panic!("leadership never became {want}"))
            .expect("controller alive");
    }

    /// Stops gracefully (releases the Lease).
    pub async fn stop(self) {
        self.cancel.cancel();
        tokio::time::timeout(DEADLINE, self.task)
            .await
            .expect("controller stops in time")
            .expect("controller task");
    }
}

/// What scenarios run against: clients, a namespace, and the fake's extra hooks when there is
/// one.
pub struct Cluster {
    /// Creates and reads objects for the test (admin on a real server).
    pub client: kube::Client,
    /// What controllers under test run with.
    pub controller_client: kube::Client,
    /// The namespace the scenarios work in.
    pub ns: String,
    fake: Option<FakeKube>,
}

impl Cluster {
    /// A fresh in-process fake API server; namespace `apps`.
    pub async fn fake() -> Self {
        let fake = FakeKube::start().await;
        Self {
            client: fake.client(),
            controller_client: fake.client(),
            ns: "apps".into(),
            fake: Some(fake),
        }
    }

    /// A real API server. Creates `ns` (a new name per run: nothing deletes namespaces on a
    /// tier without kube-controller-manager), its ServiceAccounts and the Lease namespace, and
    /// deletes every `WebSocketRoute` left in the cluster, so that routes of earlier tests or
    /// tiers can neither conflict with this test's routes nor count as status writes.
    pub async fn real(client: kube::Client, controller_client: kube::Client, ns: &str) -> Self {
        for name in [ns, LEASE_NAMESPACE] {
            let body = json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": name}});
            Api::<Namespace>::all(client.clone())
                .patch(name, &PatchParams::apply("wsgate-e2e").force(), &Patch::Apply(&body))
                .await
                .unwrap_or_else(|e| panic!("create namespace {name}: {e}"));
        }
        // No kube-controller-manager creates `default`; pods name their ServiceAccount anyway.
        for sa in ["default", GATEWAY_SA] {
            let body = json!({"apiVersion": "v1", "kind": "ServiceAccount", "metadata": {"name": sa, "namespace": ns}});
            Api::<ServiceAccount>::namespaced(client.clone(), ns)
                .patch(sa, &PatchParams::apply("wsgate-e2e").force(), &Patch::Apply(&body))
                .await
                .unwrap_or_else(|e| panic!("create serviceaccount {ns}/{sa}: {e}"));
        }
        let all = Api::<WebSocketRoute>::all(client.clone());
        for route in all.list(&Default::default()).await.expect("list routes").items {
            let namespace = route.namespace().unwrap_or_default();
            let _ = Api::<WebSocketRoute>::namespaced(client.clone(), &namespace)
                .delete(&route.name_any(), &DeleteParams::default())
                .await;
        }
        Self {
            client,
            controller_client,
            ns: ns.into(),
            fake: None,
        }
    }

    /// The fake API server; panics on a real one (for fake-only tests).
    pub fn fake_kube(&self) -> &FakeKube {
        self.fake.as_ref().expect("this test needs the fake API server")
    }

    pub fn is_fake(&self) -> bool {
        self.fake.is_some()
    }

    pub fn routes(&self) -> Api<WebSocketRoute> {
        Api::namespaced(self.client.clone(), &self.ns)
    }

    pub async fn create_route(&self, name: &str, spec: serde_json::Value) -> WebSocketRoute {
        let route: WebSocketRoute = serde_json::from_value(json!({
            "apiVersion": "wsgate.io/v1alpha1", "kind": "WebSocketRoute",
            "metadata": {"name": name, "namespace": self.ns},
            "spec": spec
        }))
        .expect("route json");
        self.routes()
            .create(&PostParams::default(), &route)
            .await
            .expect("create route")
    }

    pub async fn create_service(&self, name: &str, port: i32) {
        let svc: Service = serde_json::from_value(json!({
            "apiVersion": "v1", "kind": "Service",
            "metadata": {"name": name, "namespace": self.ns},
            "spec": {"ports": [{"port": port}]}
        }))
        .expect("service");
        Api::<Service>::namespaced(self.client.clone(), &self.ns)
            .create(&PostParams::default(), &svc)
            .await
            .expect("create service");
    }

    pub async fn put_secret(&self, name: &str, key: &str, value: &str) {
        let secret: Secret = serde_json::from_value(json!({
            "apiVersion": "v1", "kind": "Secret",
            "metadata": {"name": name, "namespace": self.ns},
            "stringData": {key: value}
        }))
        .expect("secret");
        let api = Api::<Secret>::namespaced(self.client.clone(), &self.ns);
        match api.get_opt(name).await.expect("get secret") {
            None => {
                api.create(&PostParams::default(), &secret)
                    .await
                    .expect("create secret");
            }
            Some(_) => {
                api.patch(name, &PatchParams::default(), &Patch::Merge(&secret))
                    .await
                    .expect("patch secret");
            }
        }
    }

    /// Creates a gateway pod (ServiceAccount [`GATEWAY_SA`]) and a token bound to it for the
    /// control API's audience; returns the token.
    pub async fn gateway_pod(&self, name: &str, labels: &[(&str, &str)]) -> String {
        let labels: BTreeMap<&str, &str> = labels.iter().copied().collect();
        let pod: Pod = serde_json::from_value(json!({
            "apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": name, "namespace": self.ns, "labels": labels},
            "spec": {"serviceAccountName": GATEWAY_SA, "containers": [{"name": "app", "image": "app"}]}
        }))
        .expect("pod");
        Api::<Pod>::namespaced(self.client.clone(), &self.ns)
            .create(&PostParams::default(), &pod)
            .await
            .expect("create pod");
        self.pod_token(name, TOKEN_AUDIENCE).await
    }

    /// A ServiceAccount token bound to the existing gateway pod `pod`, for `audience`: from the
    /// TokenRequest API on a real server, registered with the fake otherwise.
    pub async fn pod_token(&self, pod: &str, audience: &str) -> String {
        let stored = Api::<Pod>::namespaced(self.client.clone(), &self.ns)
            .get(pod)
            .await
            .expect("get pod");
        let uid = stored.metadata.uid.clone().expect("uid");
        if let Some(fake) = &self.fake {
            let token = format!("token-{pod}-{}", uuid::Uuid::new_v4());
            fake.add_token(&token, TokenUser::pod(&self.ns, GATEWAY_SA, pod, &uid, audience));
            return token;
        }
        let request = TokenRequest {
            spec: TokenRequestSpec {
                audiences: vec![audience.to_owned()],
                bound_object_ref: Some(BoundObjectReference {
                    api_version: Some("v1".into()),
                    kind: Some("Pod".into()),
                    name: Some(pod.to_owned()),
                    uid: Some(uid),
                }),
                expiration_seconds: Some(3600),
            },
            ..TokenRequest::default()
        };
        Api::<ServiceAccount>::namespaced(self.client.clone(), &self.ns)
            .create_token_request(GATEWAY_SA, &PostParams::default(), &request)
            .await
            .expect("TokenRequest")
            .status
            .expect("token status")
            .token
    }

    /// Makes sure objects created from now on have a later `creationTimestamp` than `route`:
    /// the fake's clock moves forward; on a real server (timestamps in whole seconds) this
    /// waits until the next second on the server's clock has begun.
    pub async fn after_creation_of(&self, route: &WebSocketRoute) {
        if let Some(fake) = &self.fake {
            fake.advance_clock(10);
            return;
        }
        let created = route.metadata.creation_timestamp.as_ref().expect("creationTimestamp").0;
        // Timestamps are stored in whole seconds. This assumes the server's clock is this
        // machine's (true on the kube-e2e tier); the scenario asserts the order it got.
        let next = k8s_openapi::jiff::Timestamp::from_second(created.as_second() + 1).expect("timestamp");
        let wait = next.duration_since(k8s_openapi::jiff::Timestamp::now());
        if let Ok(wait) = Duration::try_from(wait) {
            tokio::time::sleep(wait + Duration::from_millis(50)).await;
        }
    }

    /// The `namespace/name` text the controller uses in messages.
    pub fn key(&self, name: &str) -> String {
        format!("{}/{name}", self.ns)
    }

    /// Waits until route `name`'s status satisfies `pred`.
    pub async fn wait_route(&self, name: &str, what: &str, pred: impl Fn(&WebSocketRoute) -> bool) -> WebSocketRoute {
        let api = self.routes();
        let deadline = tokio::time::Instant::now() + DEADLINE;
        loop {
            let route = api.get(name).await.expect("get route");
            if pred(&route) {
                return route;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "timed out waiting for route {name}: {what}; status: {:#?}",
                route.status
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    pub async fn events_for(&self, name: &str) -> Vec<Event> {
        Api::<Event>::namespaced(self.client.clone(), &self.ns)
            .list(&Default::default())
            .await
            .expect("list events")
            .items
            .into_iter()
            .filter(|e| e.regarding.as_ref().and_then(|r| r.name.as_deref()) == Some(name))
            .collect()
    }

    /// `leaseTransitions` of the controllers' Lease.
    pub async fn lease_transitions(&self) -> i32 {
        let lease: Lease = Api::namespaced(self.client.clone(), LEASE_NAMESPACE)
            .get(LEASE_NAME)
            .await
            .expect("lease");
        lease.spec.and_then(|s| s.lease_transitions).unwrap_or(0)
    }
}

pub fn condition<'a>(route: &'a WebSocketRoute, type_: &str) -> Option<(&'a str, &'a str, &'a str)> {
    let c = route.status.as_ref()?.condition(type_)?;
    Some((c.status.as_str(), c.reason.as_str(), c.message.as_str()))
}

pub fn is(route: &WebSocketRoute, type_: &str, status: &str, reason: &str) -> bool {
    condition(route, type_).is_some_and(|(s, r, _)| s == status && r == reason)
}

/// GETs a snapshot; `Ok(None)` for 304.
pub async fn fetch_snapshot(
    addr: SocketAddr,
    ns: &str,
    pod: &str,
    token: &str,
    version: Option<u64>,
) -> Result<Option<Snapshot>, (u16, String)> {
    let mut path = format!("{SNAPSHOT_PATH}?namespace={ns}&pod={pod}");
    if let Some(v) = version {
        path.push_str(&format!("&version={v}"));
    }
    let auth = format!("Bearer {token}");
    let (status, _, body) = http_request(addr, "GET", &path, &[("authorization", &auth)], b"").await;
    match status.as_u16() {
        200 => Ok(Some(serde_json::from_slice(&body).expect("snapshot json"))),
        304 => Ok(None),
        code => Err((code, String::from_utf8_lossy(&body).into_owned())),
    }
}

/// Polls (long poll) until the pod's snapshot satisfies `pred`.
pub async fn wait_snapshot(
    addr: SocketAddr,
    ns: &str,
    pod: &str,
    token: &str,
    what: &str,
    pred: impl Fn(&Snapshot) -> bool,
) -> Snapshot {
    let deadline = tokio::time::Instant::now() + DEADLINE;
    let mut last = None;
    loop {
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting for snapshot: {what}; last: {last:#?}"
        );
        match fetch_snapshot(addr, ns, pod, token, last.as_ref().map(|s: &Snapshot| s.version)).await {
            Ok(Some(s)) if pred(&s) => return s,
            Ok(Some(s)) => last = Some(s),
            Ok(None) => {}
            Err((503, _)) => tokio::time::sleep(Duration::from_millis(20)).await,
            Err(e) => panic!("snapshot request failed: {e:?}"),
        }
    }
}

/// An ingress route for `host` to a Service.
pub fn service_spec(host: &str, service: &str, port: u16) -> serde_json::Value {
    json!({"match": {"hostnames": [host]}, "backend": {"service": {"name": service, "port": port}}})
}

// ---------------------------------------------------------------------------------------------
// Scenarios

pub async fn created_route_is_accepted(cluster: &Cluster) {
    cluster.create_service("chat", 8080).await;
    cluster
        .create_route("chat", service_spec("chat.example.com", "chat", 8080))
        .await;
    let route = cluster
        .wait_route("chat", "Accepted and ResolvedRefs", |r| {
            is(r, "Accepted", "True", "Accepted") && is(r, "ResolvedRefs", "True", "ResolvedRefs")
        })
        .await;
    let status = route.status.expect("status");
    assert_eq!(status.observed_generation, Some(1));
    assert_eq!(
        status.backend.as_deref(),
        Some(format!("http://chat.{}.svc:8080", cluster.ns).as_str())
    );
    assert!(status.conditions.iter().all(|c| c.observed_generation == Some(1)));
}

pub async fn invalid_spec_is_rejected_with_reason_and_event(cluster: &Cluster) {
    // The schema accepts this (both fields are optional); the route model does not.
    cluster
        .create_route("both", json!({"backend": {"url": "http://a:1", "port": 8080}}))
        .await;
    let route = cluster
        .wait_route("both", "Accepted=False Invalid", |r| {
            is(r, "Accepted", "False", "Invalid")
        })
        .await;
    let (_, _, message) = condition(&route, "Accepted").expect("condition");
    assert_eq!(message, "spec.backend: exactly one of url, service or port may be set");
    assert_eq!(condition(&route, "ResolvedRefs").map(|c| c.0), Some("Unknown"));
    eventually("a Warning Event for the invalid route", || async {
        cluster.events_for("both").await.iter().any(|e| {
            e.reason.as_deref() == Some("Invalid")
                && e.type_.as_deref() == Some("Warning")
                && e.note.as_deref().is_some_and(|n| n.contains("spec.backend"))
        })
    })
    .await;
    // Fixing it flips the condition, at the new generation.
    let fix = json!({"spec": {"backend": {"url": null}}});
    cluster
        .routes()
        .patch("both", &PatchParams::default(), &Patch::Merge(&fix))
        .await
        .expect("patch");
    let route = cluster
        .wait_route("both", "Accepted after the fix", |r| {
            is(r, "Accepted", "True", "Accepted")
        })
        .await;
    assert_eq!(route.metadata.generation, Some(2));
    assert_eq!(route.status.expect("status").observed_generation, Some(2));
}

pub async fn schema_violations_are_refused_by_the_api_server(cluster: &Cluster) {
    // Untyped, so the test can send what the Rust types can't express.
    let api: Api<DynamicObject> = Api::namespaced_with(
        cluster.client.clone(),
        &cluster.ns,
        &ApiResource::erase::<WebSocketRoute>(&()),
    );
    let bad: DynamicObject = serde_json::from_value(json!({
        "apiVersion": "wsgate.io/v1alpha1", "kind": "WebSocketRoute",
        "metadata": {"name": "bad", "namespace": cluster.ns},
        "spec": {
            "backend": {"port": 70000},
            "headers": {"forwardedFor": "keep"},
            "keepAlive": {"minInterval": "1d"},
            "limits": {"maxMessageBytes": 0}
        }
    }))
    .expect("json");
    let err = api
        .create(&PostParams::default(), &bad)
        .await
        .expect_err("the schema refuses it");
    let kube::Error::Api(status) = err else {
        panic!("expected a 422, got {err}")
    };
    assert_eq!((status.code, status.reason.as_str()), (422, "Invalid"));
    for field in [
        "spec.backend.port",
        "spec.headers.forwardedFor",
        "spec.keepAlive.minInterval",
        "spec.limits.maxMessageBytes",
    ] {
        assert!(
            status.message.contains(field),
            "{field} missing from: {}",
            status.message
        );
    }
    // Unknown fields are pruned, not refused (structural schema), and defaults are applied.
    let pruned: DynamicObject = serde_json::from_value(json!({
        "apiVersion": "wsgate.io/v1alpha1", "kind": "WebSocketRoute",
        "metadata": {"name": "pruned", "namespace": cluster.ns},
        "spec": {"backend": {"port": 8080, "colour": "red"}, "keepAlive": {}}
    }))
    .expect("json");
    let stored = api.create(&PostParams::default(), &pruned).await.expect("accepted");
    assert_eq!(stored.data["spec"]["backend"], json!({"port": 8080}));
    assert_eq!(stored.data["spec"]["keepAlive"]["minInterval"], "1s");
    api.delete("pruned", &DeleteParams::default()).await.expect("delete");
}

pub async fn missing_service_resolves_when_it_appears(cluster: &Cluster) {
    cluster
        .create_route("late", service_spec("late.example.com", "late-svc", 9000))
        .await;
    let route = cluster
        .wait_route("late", "ResolvedRefs=False BackendNotFound", |r| {
            is(r, "ResolvedRefs", "False", "BackendNotFound")
        })
        .await;
    assert_eq!(
        condition(&route, "ResolvedRefs").map(|c| c.2),
        Some(format!("Service {} not found", cluster.key("late-svc")).as_str())
    );
    assert!(
        is(&route, "Accepted", "True", "Accepted"),
        "a missing Service does not make the spec invalid"
    );
    eventually("a BackendNotFound Event", || async {
        cluster
            .events_for("late")
            .await
            .iter()
            .any(|e| e.reason.as_deref() == Some("BackendNotFound"))
    })
    .await;
    cluster.create_service("late-svc", 9000).await;
    cluster
        .wait_route("late", "ResolvedRefs=True", |r| {
            is(r, "ResolvedRefs", "True", "ResolvedRefs")
        })
        .await;
}

pub async fn secret_rotation_reaches_the_gateway(cluster: &Cluster, ctl: &RunningController) {
    let ns = cluster.ns.as_str();
    let token = cluster.gateway_pod("chat-0", &[("app", "chat")]).await;
    cluster.put_secret("grip", "key", "first-key").await;
    cluster
        .create_route(
            "signed",
            json!({
                "backend": {"port": 8080},
                "workloadSelector": {"app": "chat"},
                "grip": {"signingKey": {"secretRef": {"name": "grip", "key": "key"}}}
            }),
        )
        .await;
    let key_of = |s: &Snapshot| {
        s.routes
            .iter()
            .find(|r| r.name == "signed")
            .and_then(|r| r.secrets.first())
            .map(|m| base64::engine::general_purpose::STANDARD.decode(&m.value).expect("b64"))
    };
    let first = wait_snapshot(ctl.addr, ns, "chat-0", &token, "first key", |s| {
        key_of(s).as_deref() == Some(b"first-key".as_slice())
    })
    .await;
    first.compile().expect("the gateway compiles it");
    cluster.put_secret("grip", "key", "second-key").await;
    let second = wait_snapshot(ctl.addr, ns, "chat-0", &token, "rotated key", |s| {
        key_of(s).as_deref() == Some(b"second-key".as_slice())
    })
    .await;
    assert_ne!(first.version, second.version);
    // A pod the route doesn't select gets neither the route nor the key.
    let other = cluster.gateway_pod("feed-0", &[("app", "feed")]).await;
    let snap = fetch_snapshot(ctl.addr, ns, "feed-0", &other, None)
        .await
        .expect("ok")
        .expect("snapshot");
    assert!(snap.routes.is_empty(), "{snap:?}");
    // The route counts the one gateway serving it.
    cluster
        .wait_route("signed", "gateways = 1", |r| {
            r.status.as_ref().is_some_and(|s| s.gateways == 1)
        })
        .await;
}

pub async fn conflicts_go_against_the_newer_route(cluster: &Cluster) {
    let spec =
        json!({"match": {"hostnames": ["dup.example.com"], "pathPrefixes": ["/ws"]}, "backend": {"url": "http://a:1"}});
    let zeta = cluster.create_route("zeta", spec.clone()).await;
    cluster
        .wait_route("zeta", "zeta accepted", |r| is(r, "Accepted", "True", "Accepted"))
        .await;
    cluster.after_creation_of(&zeta).await;
    // Alphabetically first, but created later: it loses.
    let created = cluster.create_route("alpha", spec).await;
    assert!(
        created.metadata.creation_timestamp > zeta.metadata.creation_timestamp,
        "alpha must be created after zeta: {:?} vs {:?}",
        created.metadata.creation_timestamp,
        zeta.metadata.creation_timestamp
    );
    let alpha = cluster
        .wait_route("alpha", "alpha Conflicted", |r| {
            is(r, "Accepted", "False", "Conflicted")
        })
        .await;
    let (_, _, message) = condition(&alpha, "Accepted").expect("condition");
    assert_eq!(
        message,
        format!(
            "host \"dup.example.com\" with path prefix \"/ws\" is already served by the older route {} for the same workloads",
            cluster.key("zeta")
        )
    );
    let zeta = cluster.routes().get("zeta").await.expect("zeta");
    assert!(is(&zeta, "Accepted", "True", "Accepted"));
    eventually("a Conflicted Event", || async {
        cluster
            .events_for("alpha")
            .await
            .iter()
            .any(|e| e.reason.as_deref() == Some("Conflicted"))
    })
    .await;
    // Deleting the winner lets the other one in.
    cluster
        .routes()
        .delete("zeta", &DeleteParams::default())
        .await
        .expect("delete");
    cluster
        .wait_route("alpha", "alpha accepted after zeta is gone", |r| {
            is(r, "Accepted", "True", "Accepted")
        })
        .await;
}

pub async fn deletion_removes_the_route_from_snapshots(cluster: &Cluster, ctl: &RunningController) {
    let ns = cluster.ns.as_str();
    let token = cluster.gateway_pod("web-0", &[("app", "web")]).await;
    cluster
        .create_route(
            "gone",
            json!({"backend": {"port": 8080}, "workloadSelector": {"app": "web"}}),
        )
        .await;
    let snap = wait_snapshot(ctl.addr, ns, "web-0", &token, "route present", |s| s.routes.len() == 1).await;
    cluster
        .routes()
        .delete("gone", &DeleteParams::default())
        .await
        .expect("delete");
    let after = fetch_snapshot(ctl.addr, ns, "web-0", &token, Some(snap.version))
        .await
        .expect("ok")
        .expect("a change, not a 304");
    assert!(after.routes.is_empty(), "{after:?}");
}

pub async fn gateways_are_authenticated(cluster: &Cluster, ctl: &RunningController) {
    let ns = cluster.ns.as_str();
    let token = cluster.gateway_pod("auth-0", &[("app", "auth")]).await;
    let _other = cluster.gateway_pod("auth-1", &[("app", "auth")]).await;
    let deny = |r: Result<Option<Snapshot>, (u16, String)>| r.expect_err("refused");
    let (code, body) = deny(fetch_snapshot(ctl.addr, ns, "auth-0", "not-a-token", None).await);
    assert_eq!(code, 401, "{body}");
    let (code, body) = deny(fetch_snapshot(ctl.addr, ns, "auth-1", &token, None).await);
    assert_eq!(
        (code, body.trim()),
        (403, "the token belongs to pod auth-0, not auth-1")
    );
    // A token for the API server's own audience is not one for the control API.
    let api_token = cluster.pod_token("auth-0", "https://kubernetes.default.svc").await;
    let (code, _) = deny(fetch_snapshot(ctl.addr, ns, "auth-0", &api_token, None).await);
    assert_eq!(code, 401);
    assert!(ctl.metrics.snapshot().auth_failures >= 3);
    fetch_snapshot(ctl.addr, ns, "auth-0", &token, None)
        .await
        .expect("allowed");
}

// ---------------------------------------------------------------------------------------------
// Test bodies run against both the fake and a real API server

/// Every status, Event and snapshot scenario with one leading controller.
pub async fn routes_get_status_events_and_snapshots(cluster: &Cluster) {
    let mut ctl = RunningController::start(cluster.controller_client.clone(), "ctl-0").await;
    ctl.wait_leader(true).await;
    created_route_is_accepted(cluster).await;
    invalid_spec_is_rejected_with_reason_and_event(cluster).await;
    schema_violations_are_refused_by_the_api_server(cluster).await;
    missing_service_resolves_when_it_appears(cluster).await;
    secret_rotation_reaches_the_gateway(cluster, &ctl).await;
    conflicts_go_against_the_newer_route(cluster).await;
    deletion_removes_the_route_from_snapshots(cluster, &ctl).await;
    gateways_are_authenticated(cluster, &ctl).await;
    let m = ctl.metrics.snapshot();
    assert!(m.reconciles > 0 && m.status_writes > 0 && m.events >= 3, "{m:?}");
    // The same counters are scraped from the control API's /metrics.
    let (status, _, body) = http_request(ctl.addr, "GET", "/metrics", &[], b"").await;
    assert_eq!(status, 200);
    let text = String::from_utf8_lossy(&body);
    let reconciles = text
        .lines()
        .find_map(|l| l.strip_prefix("wsgate_controller_reconciles_total "))
        .and_then(|v| v.trim().parse::<u64>().ok())
        .unwrap_or_else(|| panic!("no wsgate_controller_reconciles_total in:\n{text}"));
    assert!(reconciles >= m.reconciles, "{reconciles} < {}", m.reconciles);
    let timed = text
        .lines()
        .find_map(|l| l.strip_prefix("wsgate_controller_reconcile_duration_seconds_count "))
        .and_then(|v| v.trim().parse::<u64>().ok())
        .unwrap_or_else(|| panic!("no reconcile duration histogram in:\n{text}"));
    assert!(timed > 0, "reconciles are timed");
    ctl.stop().await;
}

/// The controller does not loop on its own status writes.
pub async fn status_is_written_once_per_change(cluster: &Cluster) {
    let mut ctl = RunningController::start(cluster.controller_client.clone(), "ctl-0").await;
    ctl.wait_leader(true).await;
    created_route_is_accepted(cluster).await;
    // Writing status bumps resourceVersion but not generation; the controller must not loop on
    // its own writes. Another route's creation rechecks everything but rewrites nothing.
    // The accepted status can be seen before the controller's patch call returns and counts it.
    eventually("the first status write is counted", || async {
        ctl.metrics.snapshot().status_writes > 0
    })
    .await;
    let writes = ctl.metrics.snapshot().status_writes;
    cluster
        .create_route(
            "other",
            json!({"match": {"pathPrefixes": ["/other"]}, "backend": {"port": 1}}),
        )
        .await;
    cluster
        .wait_route("other", "accepted", |r| is(r, "Accepted", "True", "Accepted"))
        .await;
    eventually("the new route's status write is counted", || async {
        ctl.metrics.snapshot().status_writes > writes
    })
    .await;
    let chat = cluster.routes().get("chat").await.expect("chat");
    assert_eq!(chat.metadata.generation, Some(1));
    assert_eq!(
        ctl.metrics.snapshot().status_writes,
        writes + 1,
        "only the new route's status was written"
    );
    ctl.stop().await;
}

/// A graceful stop hands the Lease over at once; only the leader writes.
pub async fn leadership_fails_over_and_only_the_leader_writes(cluster: &Cluster) {
    let mut first = RunningController::start(cluster.controller_client.clone(), "ctl-a").await;
    first.wait_leader(true).await;
    let transitions = cluster.lease_transitions().await;
    let mut second = RunningController::start(cluster.controller_client.clone(), "ctl-b").await;
    cluster.create_service("chat", 8080).await;
    cluster
        .create_route("chat", service_spec("chat.example.com", "chat", 8080))
        .await;
    cluster
        .wait_route("chat", "accepted by the leader", |r| {
            is(r, "Accepted", "True", "Accepted")
        })
        .await;
    assert!(!*second.leader.borrow(), "one leader at a time");
    assert_eq!(
        second.metrics.snapshot().status_writes,
        0,
        "the follower writes nothing"
    );
    eventually("the follower reconciles (without writing)", || async {
        second.metrics.snapshot().reconciles > 0
    })
    .await;
    assert_eq!(
        second.metrics.snapshot().status_writes,
        0,
        "the follower writes nothing"
    );

    first.stop().await;
    second.wait_leader(true).await;
    let lease: Lease = Api::namespaced(cluster.client.clone(), LEASE_NAMESPACE)
        .get(LEASE_NAME)
        .await
        .expect("lease");
    let spec = lease.spec.expect("spec");
    assert_eq!(spec.holder_identity.as_deref(), Some("ctl-b"));
    assert_eq!(spec.lease_transitions, Some(transitions + 1));
    cluster
        .create_route("next", service_spec("next.example.com", "chat", 8080))
        .await;
    let next = cluster
        .wait_route("next", "accepted by the new leader", |r| {
            is(r, "Accepted", "True", "Accepted")
        })
        .await;
    assert_eq!(next.name_any(), "next");
    // The status can be visible through the API before the leader's patch call has returned
    // and counted the write, so wait for the counter rather than read it once.
    eventually("the new leader counts its status write", || async {
        second.metrics.snapshot().status_writes > 0
    })
    .await;
    second.stop().await;
}
