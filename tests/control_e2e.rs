//! End to end: fake API server + controller + two gateways fed by the control API + real
//! echo backends and WebSocket clients.

mod support;

use std::sync::Arc;
use std::time::Duration;

use kube::Api;
use kube::api::{Patch, PatchParams, PostParams};
use serde_json::json;
use tokio_util::sync::CancellationToken;

use support::fake_kube::FakeKube;
use support::{Backend, TestGateway, eventually, http_request, sample, upgrade_headers};
use wsgate::admin::AdminState;
use wsgate::config::control::{ControlClientConfig, ControlStatus, run_control_client};
use wsgate::controller::{ControlPlane, ControllerConfig, LeaseConfig, WebSocketRoute};
use wsgate::server::GatewaySettings;

const NS: &str = "apps";

/// A gateway whose routes come from the control API.
struct ControlledGateway {
    gateway: TestGateway,
    status: Arc<ControlStatus>,
    /// An admin listener that knows the control status (the one of `TestGateway` does not).
    admin: std::net::SocketAddr,
    stop: CancellationToken,
    _token_file: TempFile,
}

impl Drop for ControlledGateway {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

/// A file removed on drop.
struct TempFile(std::path::PathBuf);

impl Drop for TempFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

impl ControlledGateway {
    /// Creates the pod `name` with `labels`, a bound token for it, and a gateway polling
    /// `control_url` as that pod.
    async fn start(fake: &FakeKube, control_url: &str, name: &str, labels: serde_json::Value) -> Self {
        let token = fake.gateway_pod_token(NS, name, labels).await;
        let path = std::env::temp_dir().join(format!("wsgate-token-{}", uuid::Uuid::new_v4()));
        std::fs::write(&path, format!("{token}\n")).expect("token file");
        let gateway = TestGateway::with_routes(Vec::new(), GatewaySettings::default()).await;
        let mut config = ControlClientConfig::new(control_url, NS, name);
        config.token_file = Some(path.clone());
        config.initial_backoff = Duration::from_millis(20);
        config.max_backoff = Duration::from_millis(200);
        config.request_timeout = Duration::from_secs(10);
        let status = Arc::new(ControlStatus::new());
        let stop = CancellationToken::new();
        tokio::spawn(run_control_client(
            config,
            gateway.table.clone(),
            status.clone(),
            stop.clone(),
        ));
        let admin_listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind admin");
        let admin = admin_listener.local_addr().expect("admin addr");
        let admin_state = Arc::new(AdminState {
            listening: true.into(),
            control: Some(status.clone()),
            ..AdminState::new(gateway.gw.clone())
        });
        tokio::spawn(wsgate::admin::run(admin_listener, admin_state, stop.clone()));
        Self {
            gateway,
            status,
            admin,
            stop,
            _token_file: TempFile(path),
        }
    }

    async fn readyz(&self) -> (u16, String) {
        let (status, _, body) = http_request(self.admin, "GET", "/readyz", &[], b"").await;
        (status.as_u16(), String::from_utf8_lossy(&body).into_owned())
    }

    async fn metrics(&self) -> String {
        let (status, _, body) = http_request(self.admin, "GET", "/metrics", &[], b"").await;
        assert_eq!(status, 200, "GET /metrics");
        String::from_utf8_lossy(&body).into_owned()
    }

    fn route_names(&self) -> Vec<String> {
        self.gateway
            .table
            .load()
            .routes()
            .iter()
            .map(|r| r.name.clone())
            .collect()
    }
}

fn route(name: &str, spec: serde_json::Value) -> WebSocketRoute {
    serde_json::from_value(json!({
        "apiVersion": "wsgate.io/v1alpha1", "kind": "WebSocketRoute",
        "metadata": {"name": name, "namespace": NS},
        "spec": spec
    }))
    .expect("route")
}

#[tokio::test]
async fn routes_reach_only_matching_gateways_and_survive_edits_and_controller_loss() {
    let fake = FakeKube::start().await;
    let mut config = ControllerConfig::new(LeaseConfig {
        namespace: "wsgate-system".into(),
        name: "wsgate-controller".into(),
        identity: "ctl-0".into(),
        lease_duration: Duration::from_secs(2),
        renew_deadline: Duration::from_millis(1500),
        retry_period: Duration::from_millis(100),
    });
    config.api.poll_timeout = Duration::from_secs(5);
    let plane = ControlPlane::new(fake.client(), config);
    let metrics = plane.metrics();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let control_url = format!("http://{}", listener.local_addr().expect("addr"));
    let stop_controller = CancellationToken::new();
    let controller = tokio::spawn(plane.run(listener, stop_controller.clone()));

    let chat = ControlledGateway::start(&fake, &control_url, "chat-0", json!({"app": "chat"})).await;
    let feed = ControlledGateway::start(&fake, &control_url, "feed-0", json!({"app": "feed"})).await;
    let backend = Backend::echo().await;

    let routes: Api<WebSocketRoute> = Api::namespaced(fake.client(), NS);
    routes
        .create(
            &PostParams::default(),
            &route(
                "chat",
                json!({
                    "match": {"pathPrefixes": ["/chat"]},
                    "backend": {"url": backend.url()},
                    "workloadSelector": {"app": "chat"},
                    "headers": {"add": [{"name": "x-route-rev", "value": "1"}]}
                }),
            ),
        )
        .await
        .expect("create route");

    // The route reaches only the gateway whose pod labels match.
    eventually("the chat gateway gets the route", || async {
        chat.route_names() == ["apps/chat"]
    })
    .await;
    eventually("the feed gateway syncs (without the route)", || async {
        feed.status.is_synced()
    })
    .await;
    assert!(feed.route_names().is_empty());
    assert_eq!(chat.status.version(), Some(chat.gateway.table.load().version()));
    // /readyz and /metrics show the same exact version (a u64 content hash).
    let version = chat.gateway.table.load().version();
    assert_eq!(
        chat.readyz().await,
        (200, format!("ready (routes version {version})\n"))
    );
    let text = chat.metrics().await;
    let info = format!(r#"wsgate_config_info{{version="{version}",source="control"}}"#);
    assert_eq!(sample(&text, &info), Some(1.0), "{text}");
    assert_eq!(sample(&text, "wsgate_config_source_up"), Some(1.0));
    assert_eq!(
        sample(&text, "wsgate_config_version"),
        Some(chat.status.updates() as f64)
    );
    let (status, _, _) = http_request(feed.gateway.addr, "GET", "/chat", &upgrade_headers(), b"").await;
    assert_eq!(status, 404, "the feed gateway has no such route");

    // A WebSocket client goes through it.
    let mut client = chat.gateway.connect("/chat").await;
    client.send_text("hello").await;
    client.expect_text("hello").await;
    let open = backend
        .wait_for("the OPEN request", |reqs| !reqs.is_empty())
        .await
        .remove(0);
    assert_eq!(open.header("x-route-rev"), Some("1"));

    // Edit the route: the open connection moves to the new version (without being dropped)
    // and new connections get it too.
    let edit = json!({"spec": {"headers": {"add": [{"name": "x-route-rev", "value": "2"}]}}});
    routes
        .patch("chat", &PatchParams::default(), &Patch::Merge(&edit))
        .await
        .expect("patch route");
    eventually("the chat gateway gets the edited route", || async {
        chat.gateway
            .table
            .load()
            .get("apps/chat")
            .is_some_and(|r| r.headers.add.iter().any(|(_, v)| v == "2"))
    })
    .await;
    client.send_text("still here").await;
    client.expect_text("still here").await;
    let carried = |text: &str| {
        backend
            .requests()
            .into_iter()
            .find(|r| r.body.windows(text.len()).any(|w| w == text.as_bytes()))
            .and_then(|r| r.header("x-route-rev").map(str::to_owned))
    };
    assert_eq!(carried("hello").as_deref(), Some("1"));
    assert_eq!(
        carried("still here").as_deref(),
        Some("2"),
        "the open connection uses the edited route"
    );
    let mut second = chat.gateway.connect("/chat/room").await;
    second.send_text("second").await;
    second.expect_text("second").await;
    let requests = backend.requests();
    assert!(
        requests
            .iter()
            .any(|r| r.uri.path() == "/chat/room" && r.header("x-route-rev") == Some("2")),
        "a new connection uses the edited route"
    );

    // Controller gone: gateways keep their routes and traffic keeps flowing.
    let served = metrics.snapshot().snapshots_served;
    assert!(served >= 3, "{served}");
    stop_controller.cancel();
    controller.await.expect("controller stops");
    eventually("the gateway notices the controller is gone", || async {
        !chat.status.is_connected() && chat.status.last_error().is_some()
    })
    .await;
    assert_eq!(chat.route_names(), ["apps/chat"]);
    // Still ready on the last good snapshot, but /readyz and /metrics say the controller is
    // away.
    let version = chat.gateway.table.load().version();
    eventually("readyz says the control API is unreachable", || async {
        let (status, body) = chat.readyz().await;
        assert_eq!(status, 200, "{body}");
        body.starts_with(&format!(
            "ready (routes version {version}); degraded: control API unreachable since "
        ))
    })
    .await;
    let text = chat.metrics().await;
    assert_eq!(sample(&text, "wsgate_config_source_up"), Some(0.0), "{text}");
    assert!(sample(&text, "wsgate_config_reload_failures_total").is_some_and(|n| n >= 1.0));
    let info = format!(r#"wsgate_config_info{{version="{version}",source="control"}}"#);
    assert_eq!(sample(&text, &info), Some(1.0), "{text}");
    client.send_text("after the controller").await;
    client.expect_text("after the controller").await;
    let mut third = chat.gateway.connect("/chat").await;
    third.send_text("third").await;
    third.expect_text("third").await;
}
