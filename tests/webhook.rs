//! The injection webhook over real sockets: HTTPS AdmissionReviews verified with the CA, the
//! certificate bootstrap (Secret, `caBundle`, rotation, concurrent replicas, cert-manager mode)
//! against a small in-process API server, and the whole webhook started as `wsgate controller`
//! starts it.

use std::collections::{BTreeMap, BTreeSet};
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use base64::Engine as _;
use bytes::Bytes;
use http::{Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use serde_json::{Value, json};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio_rustls::TlsConnector;
use tokio_util::sync::CancellationToken;

use wsgate::controller::webhook::{
    BootstrapConfig, BootstrapError, CertBundle, CertManager, CertMode, CertStore, InjectConfig, InjectDefaults,
    Injector, SidecarMode, SidecarModeArg, WebhookConfig, Workers, bootstrap::SecretAction, certs, run_webhook_on,
    server,
};

const DEADLINE: Duration = Duration::from_secs(10);
const NS: &str = "wsgate-system";
const SERVER_NAME: &str = "wsgate-controller.wsgate-system.svc";
const DAY: Duration = Duration::from_secs(86_400);

fn inject_config() -> InjectConfig {
    InjectConfig {
        defaults: InjectDefaults {
            port: 8880,
            admin_port: 9090,
            cpu: "50m".parse().expect("q"),
            cpu_limit: None,
            memory: "64Mi".parse().expect("q"),
            memory_limit: None,
            workers: Workers::SIDECAR_DEFAULT,
            log_level: "info".to_owned(),
            sidecar_mode: SidecarMode::Native,
            admin_token_secret: Some("gw-admin".to_owned()),
        },
        image: "wsgate:test".to_owned(),
        image_pull_policy: "IfNotPresent".to_owned(),
        control_url: Some("http://wsgate-controller.wsgate-system.svc:8081".to_owned()),
        token_audience: "wsgate-control".to_owned(),
        token_expiration_seconds: 3600,
        excluded_namespaces: BTreeSet::from(["kube-system".to_owned(), NS.to_owned()]),
        otel_endpoint: None,
        nats_url: None,
        server_minor: Some(30),
    }
}

fn bootstrap_config(mode: CertMode) -> BootstrapConfig {
    BootstrapConfig {
        namespace: NS.to_owned(),
        secret_name: "wsgate-webhook-cert".to_owned(),
        service: "wsgate-controller".to_owned(),
        cluster_domain: "cluster.local".to_owned(),
        webhook_configuration: "wsgate-injector".to_owned(),
        extra_names: Vec::new(),
        mode,
        validity: 365 * DAY,
        renew_before: 30 * DAY,
        check_interval: Duration::from_secs(3600),
    }
}

fn pod(annotations: Value) -> Value {
    json!({
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": "chat-0", "namespace": "chat", "labels": {"app": "chat"}, "annotations": annotations},
        "spec": {"containers": [{"name": "app", "image": "chat:1", "ports": [{"containerPort": 3000}]}]}
    })
}

fn admission_review(uid: &str, namespace: &str, object: &Value) -> Vec<u8> {
    serde_json::to_vec(&json!({
        "apiVersion": "admission.k8s.io/v1",
        "kind": "AdmissionReview",
        "request": {
            "uid": uid,
            "kind": {"group": "", "version": "v1", "kind": "Pod"},
            "resource": {"group": "", "version": "v1", "resource": "pods"},
            "requestKind": {"group": "", "version": "v1", "kind": "Pod"},
            "requestResource": {"group": "", "version": "v1", "resource": "pods"},
            "name": object["metadata"]["name"],
            "namespace": namespace,
            "operation": "CREATE",
            "userInfo": {"username": "system:serviceaccount:kube-system:replicaset-controller", "groups": ["system:serviceaccounts"]},
            "object": object,
            "oldObject": null,
            "dryRun": false,
            "options": {"apiVersion": "meta.k8s.io/v1", "kind": "CreateOptions"}
        }
    }))
    .expect("json")
}

/// A client that trusts only `ca_pem`, as the API server does with the `caBundle`.
fn connector(ca_pem: &str, alpn: &[&[u8]]) -> TlsConnector {
    use rustls::pki_types::CertificateDer;
    use rustls::pki_types::pem::PemObject;
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_slice_iter(ca_pem.as_bytes()) {
        roots.add(cert.expect("ca pem")).expect("root");
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .expect("versions")
        .with_root_certificates(roots)
        .with_no_client_auth();
    config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    TlsConnector::from(Arc::new(config))
}

enum Proto {
    Http1,
    Http2,
}

/// One HTTPS request to the webhook. Errors are returned as text (TLS failures included).
async fn https(
    addr: SocketAddr,
    ca_pem: &str,
    proto: Proto,
    method: Method,
    path: &str,
    body: Vec<u8>,
) -> Result<(StatusCode, Bytes), String> {
    let alpn: &[&[u8]] = match proto {
        Proto::Http1 => &[b"http/1.1"],
        Proto::Http2 => &[b"h2"],
    };
    let tcp = TcpStream::connect(addr).await.map_err(|e| e.to_string())?;
    let name = rustls::pki_types::ServerName::try_from(SERVER_NAME).map_err(|e| e.to_string())?;
    let tls = connector(ca_pem, alpn)
        .connect(name, tcp)
        .await
        .map_err(|e| format!("tls: {e}"))?;
    let negotiated = tls.get_ref().1.alpn_protocol().map(<[u8]>::to_vec);
    let request = Request::builder()
        .method(method)
        .uri(format!("https://{SERVER_NAME}{path}"))
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(body)))
        .map_err(|e| e.to_string())?;
    let response = match proto {
        Proto::Http1 => {
            let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tls))
                .await
                .map_err(|e| e.to_string())?;
            tokio::spawn(conn);
            sender.send_request(request).await.map_err(|e| e.to_string())?
        }
        Proto::Http2 => {
            assert_eq!(negotiated.as_deref(), Some(&b"h2"[..]), "ALPN must pick h2");
            let (mut sender, conn) = hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(tls))
                .await
                .map_err(|e| e.to_string())?;
            tokio::spawn(conn);
            sender.send_request(request).await.map_err(|e| e.to_string())?
        }
    };
    let status = response.status();
    let body = response
        .into_body()
        .collect()
        .await
        .map_err(|e| e.to_string())?
        .to_bytes();
    Ok((status, body))
}

/// Decodes an AdmissionReview response and applies its patch to `object`.
fn apply_response(object: &Value, body: &[u8]) -> (Value, Value) {
    let review: Value = serde_json::from_slice(body).expect("review json");
    let response = review["response"].clone();
    let mut patched = object.clone();
    if let Some(encoded) = response["patch"].as_str() {
        assert_eq!(response["patchType"], "JSONPatch");
        let bytes = base64::engine::general_purpose::STANDARD
            .decode(encoded)
            .expect("patch is base64, as Go's []byte");
        let patch: json_patch::Patch = serde_json::from_slice(&bytes).expect("patch json");
        json_patch::patch(&mut patched, &patch).expect("patch applies");
    }
    (review, patched)
}

struct Webhook {
    addr: SocketAddr,
    store: Arc<CertStore>,
    cancel: CancellationToken,
    task: tokio::task::JoinHandle<()>,
}

impl Webhook {
    async fn start(bundle: &CertBundle) -> Self {
        let store = Arc::new(CertStore::new());
        store.install(bundle).expect("install");
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let cancel = CancellationToken::new();
        let tls = certs::server_config(store.clone()).expect("tls config");
        let injector = Arc::new(Injector::new(inject_config()));
        let task = tokio::spawn(server::serve(listener, tls, injector, cancel.clone()));
        Self {
            addr,
            store,
            cancel,
            task,
        }
    }

    async fn stop(self) {
        self.cancel.cancel();
        tokio::time::timeout(DEADLINE, self.task)
            .await
            .expect("server stops")
            .expect("server task");
    }
}

fn names() -> Vec<String> {
    bootstrap_config(CertMode::Generate).dns_names()
}

#[tokio::test]
async fn https_admission_reviews_are_answered_and_verified_with_the_ca() {
    let bundle = CertBundle::generate(&names(), SystemTime::now(), DAY).expect("cert");
    let webhook = Webhook::start(&bundle).await;

    // A pod in an opted-in namespace gets the sidecar, over HTTP/1.1 and HTTP/2.
    let object = pod(json!({"wsgate.io/target-port": "3000"}));
    for (uid, proto) in [("uid-h1", Proto::Http1), ("uid-h2", Proto::Http2)] {
        let started = tokio::time::Instant::now();
        let (status, body) = https(
            webhook.addr,
            &bundle.ca_pem,
            proto,
            Method::POST,
            "/inject",
            admission_review(uid, "chat", &object),
        )
        .await
        .expect("request");
        let elapsed = started.elapsed();
        assert_eq!(status, StatusCode::OK);
        let (review, patched) = apply_response(&object, &body);
        assert_eq!(review["apiVersion"], "admission.k8s.io/v1");
        assert_eq!(review["response"]["uid"], uid);
        assert_eq!(review["response"]["allowed"], true);
        assert!(
            review["response"].get("warnings").is_none(),
            "a token Secret means no warning"
        );
        let sidecar = &patched["spec"]["initContainers"][0];
        assert_eq!(sidecar["name"], "wsgate-gateway");
        assert_eq!(sidecar["restartPolicy"], "Always");
        let args = sidecar["args"].as_array().expect("args");
        assert!(args.contains(&json!("http://127.0.0.1:3000")));
        assert!(!args.contains(&json!("--control-url")));
        assert!(
            elapsed < Duration::from_secs(2),
            "an admission took {elapsed:?} (timeout is seconds)"
        );
    }

    // A bad annotation is refused with the reason.
    let bad = pod(json!({"wsgate.io/cpu": "a lot"}));
    let (status, body) = https(
        webhook.addr,
        &bundle.ca_pem,
        Proto::Http1,
        Method::POST,
        "/inject",
        admission_review("uid-bad", "chat", &bad),
    )
    .await
    .expect("request");
    assert_eq!(status, StatusCode::OK, "a denial is an answer, not an HTTP error");
    let (review, unchanged) = apply_response(&bad, &body);
    assert_eq!(review["response"]["allowed"], false);
    assert_eq!(unchanged, bad);
    let message = review["response"]["status"]["message"].as_str().expect("message");
    assert!(
        message.contains(r#"wsgate.io/cpu: "a lot" is not a Kubernetes quantity"#),
        "{message}"
    );

    // The controller's own namespace is never injected.
    let (_, body) = https(
        webhook.addr,
        &bundle.ca_pem,
        Proto::Http1,
        Method::POST,
        "/inject",
        admission_review("uid-self", NS, &object),
    )
    .await
    .expect("request");
    let (review, unchanged) = apply_response(&object, &body);
    assert_eq!(review["response"]["allowed"], true);
    assert_eq!(unchanged, object);

    // Not an AdmissionReview, wrong method, unknown path, oversized body, health.
    let garbage = https(
        webhook.addr,
        &bundle.ca_pem,
        Proto::Http1,
        Method::POST,
        "/inject",
        b"{\"kind\":".to_vec(),
    )
    .await
    .expect("request");
    assert_eq!(garbage.0, StatusCode::BAD_REQUEST);
    let get = https(
        webhook.addr,
        &bundle.ca_pem,
        Proto::Http1,
        Method::GET,
        "/inject",
        vec![],
    )
    .await;
    assert_eq!(get.expect("request").0, StatusCode::METHOD_NOT_ALLOWED);
    let missing = https(
        webhook.addr,
        &bundle.ca_pem,
        Proto::Http1,
        Method::POST,
        "/mutate",
        vec![],
    )
    .await;
    assert_eq!(missing.expect("request").0, StatusCode::NOT_FOUND);
    let huge = vec![b' '; server::MAX_REVIEW_BYTES + 1];
    let too_big = https(
        webhook.addr,
        &bundle.ca_pem,
        Proto::Http1,
        Method::POST,
        "/inject",
        huge,
    )
    .await;
    assert_eq!(too_big.expect("request").0, StatusCode::PAYLOAD_TOO_LARGE);
    let health = https(
        webhook.addr,
        &bundle.ca_pem,
        Proto::Http2,
        Method::GET,
        "/healthz",
        vec![],
    )
    .await;
    assert_eq!(health.expect("request"), (StatusCode::OK, Bytes::from_static(b"ok\n")));

    webhook.stop().await;
}

#[tokio::test]
async fn clients_that_do_not_trust_the_ca_are_refused_and_certificates_swap_live() {
    let first = CertBundle::generate(&names(), SystemTime::now(), DAY).expect("cert");
    let second = CertBundle::generate(&names(), SystemTime::now(), DAY).expect("cert");
    let webhook = Webhook::start(&first).await;
    let object = pod(json!({}));

    let wrong_ca = https(
        webhook.addr,
        &second.ca_pem,
        Proto::Http1,
        Method::POST,
        "/inject",
        admission_review("u", "chat", &object),
    )
    .await
    .expect_err("a foreign CA must not verify");
    assert!(wrong_ca.starts_with("tls:"), "{wrong_ca}");

    assert_eq!(webhook.store.install(&second), Ok(true));
    let (status, _) = https(
        webhook.addr,
        &second.ca_pem,
        Proto::Http1,
        Method::GET,
        "/healthz",
        vec![],
    )
    .await
    .expect("the new certificate is served without a restart");
    assert_eq!(status, StatusCode::OK);
    assert!(
        https(
            webhook.addr,
            &first.ca_pem,
            Proto::Http1,
            Method::GET,
            "/healthz",
            vec![]
        )
        .await
        .is_err()
    );
    webhook.stop().await;
}

#[tokio::test]
async fn without_a_certificate_handshakes_fail_and_nothing_is_served() {
    let store = Arc::new(CertStore::new());
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    let cancel = CancellationToken::new();
    let tls = certs::server_config(store).expect("tls");
    let task = tokio::spawn(server::serve(
        listener,
        tls,
        Arc::new(Injector::new(inject_config())),
        cancel.clone(),
    ));
    let bundle = CertBundle::generate(&names(), SystemTime::now(), DAY).expect("cert");
    let result = https(addr, &bundle.ca_pem, Proto::Http1, Method::GET, "/healthz", vec![]).await;
    assert!(result.expect_err("no certificate yet").starts_with("tls:"));
    cancel.cancel();
    tokio::time::timeout(DEADLINE, task)
        .await
        .expect("stops")
        .expect("task");
}

// ---------------------------------------------------------------------------------------------
// A small API server: Secrets in one namespace, MutatingWebhookConfigurations, /version.
// Real paths, verbs, `resourceVersion` preconditions (409), `Status` errors, and strategic
// merge of `webhooks` by name (their patch merge key).

#[derive(Default)]
struct ApiState {
    secrets: BTreeMap<String, Value>,
    webhook_configurations: BTreeMap<String, Value>,
    next_version: u64,
    log: Vec<String>,
}

#[derive(Clone)]
struct MiniApi {
    state: Arc<Mutex<ApiState>>,
    /// Bumped on every successful write, for tests to await.
    writes: watch::Sender<u64>,
    minor: &'static str,
}

fn status(code: u16, reason: &str, message: &str) -> Response<Full<Bytes>> {
    let body = json!({"kind": "Status", "apiVersion": "v1", "status": "Failure", "code": code, "reason": reason, "message": message});
    let mut r = Response::new(Full::new(Bytes::from(body.to_string())));
    *r.status_mut() = StatusCode::from_u16(code).expect("status");
    r.headers_mut()
        .insert("content-type", http::HeaderValue::from_static("application/json"));
    r
}

fn ok(code: u16, body: &Value) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(Bytes::from(body.to_string())));
    *r.status_mut() = StatusCode::from_u16(code).expect("status");
    r.headers_mut()
        .insert("content-type", http::HeaderValue::from_static("application/json"));
    r
}

impl MiniApi {
    async fn start(minor: &'static str) -> (Self, kube::Client, CancellationToken) {
        let api = Self {
            state: Arc::default(),
            writes: watch::Sender::new(0),
            minor,
        };
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let stop = CancellationToken::new();
        let server = api.clone();
        let halt = stop.clone();
        tokio::spawn(async move {
            loop {
                let (tcp, _) = tokio::select! {
                    a = listener.accept() => match a { Ok(a) => a, Err(_) => continue },
                    () = halt.cancelled() => return,
                };
                let server = server.clone();
                tokio::spawn(async move {
                    let svc = service_fn(move |req| {
                        let server = server.clone();
                        async move { Ok::<_, Infallible>(server.handle(req).await) }
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(tcp), svc)
                        .await;
                });
            }
        });
        let url: http::Uri = format!("http://{addr}").parse().expect("url");
        let client = kube::Client::try_from(kube::Config::new(url)).expect("client");
        (api, client, stop)
    }

    fn add_webhook_configuration(&self, name: &str, webhooks: &[&str]) {
        let mut s = self.state.lock().expect("state");
        s.next_version += 1;
        let object = json!({
            "apiVersion": "admissionregistration.k8s.io/v1",
            "kind": "MutatingWebhookConfiguration",
            "metadata": {"name": name, "resourceVersion": s.next_version.to_string()},
            "webhooks": webhooks.iter().map(|w| json!({
                "name": w,
                "admissionReviewVersions": ["v1"],
                "sideEffects": "None",
                "clientConfig": {"service": {"name": "wsgate-controller", "namespace": NS, "path": "/inject", "port": 443}}
            })).collect::<Vec<_>>()
        });
        s.webhook_configurations.insert(name.to_owned(), object);
    }

    fn put_secret(&self, name: &str, data: &BTreeMap<String, k8s_openapi::ByteString>) {
        let mut s = self.state.lock().expect("state");
        s.next_version += 1;
        let object = json!({
            "apiVersion": "v1", "kind": "Secret", "type": "kubernetes.io/tls",
            "metadata": {"name": name, "namespace": NS, "resourceVersion": s.next_version.to_string()},
            "data": serde_json::to_value(data).expect("data"),
        });
        s.secrets.insert(name.to_owned(), object);
    }

    fn secret(&self, name: &str) -> Option<Value> {
        self.state.lock().expect("state").secrets.get(name).cloned()
    }

    fn ca_bundles(&self, name: &str) -> Vec<Option<String>> {
        let s = self.state.lock().expect("state");
        s.webhook_configurations
            .get(name)
            .and_then(|c| c["webhooks"].as_array().cloned())
            .unwrap_or_default()
            .iter()
            .map(|w| {
                w["clientConfig"]["caBundle"].as_str().map(|b| {
                    String::from_utf8(
                        base64::engine::general_purpose::STANDARD
                            .decode(b)
                            .expect("caBundle base64"),
                    )
                    .expect("utf-8")
                })
            })
            .collect()
    }

    /// Writes (method and path) so far, then forgets them.
    fn take_writes(&self) -> Vec<String> {
        std::mem::take(&mut self.state.lock().expect("state").log)
    }

    async fn handle(&self, req: Request<Incoming>) -> Response<Full<Bytes>> {
        let method = req.method().clone();
        let path = req.uri().path().to_owned();
        let content_type = req
            .headers()
            .get("content-type")
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
            .to_owned();
        let body = req
            .into_body()
            .collect()
            .await
            .map(|b| b.to_bytes())
            .unwrap_or_default();
        let secrets_prefix = format!("/api/v1/namespaces/{NS}/secrets");
        let mwc_prefix = "/apis/admissionregistration.k8s.io/v1/mutatingwebhookconfigurations/";
        let response = {
            let mut s = self.state.lock().expect("state");
            if method != Method::GET {
                s.log.push(format!("{method} {path}"));
            }
            if path == "/version" {
                ok(
                    200,
                    &json!({"major": "1", "minor": self.minor, "gitVersion": format!("v1.{}.0", self.minor)}),
                )
            } else if path == secrets_prefix && method == Method::POST {
                let mut object: Value = serde_json::from_slice(&body).expect("secret json");
                let name = object["metadata"]["name"].as_str().expect("name").to_owned();
                if s.secrets.contains_key(&name) {
                    status(409, "AlreadyExists", &format!("secrets \"{name}\" already exists"))
                } else {
                    s.next_version += 1;
                    object["metadata"]["resourceVersion"] = json!(s.next_version.to_string());
                    s.secrets.insert(name, object.clone());
                    ok(201, &object)
                }
            } else if let Some(name) = path.strip_prefix(&format!("{secrets_prefix}/")) {
                match method {
                    Method::GET => match s.secrets.get(name) {
                        Some(o) => ok(200, o),
                        None => status(404, "NotFound", &format!("secrets \"{name}\" not found")),
                    },
                    Method::PUT => {
                        let mut object: Value = serde_json::from_slice(&body).expect("secret json");
                        let current = s.secrets.get(name).map(|o| o["metadata"]["resourceVersion"].clone());
                        match current {
                            None => status(404, "NotFound", "not found"),
                            Some(rv) if rv != object["metadata"]["resourceVersion"] => status(
                                409,
                                "Conflict",
                                "the object has been modified; please apply your changes to the latest version",
                            ),
                            Some(_) => {
                                if s.secrets[name]["type"] != object["type"] {
                                    status(422, "Invalid", "field is immutable: type")
                                } else {
                                    s.next_version += 1;
                                    object["metadata"]["resourceVersion"] = json!(s.next_version.to_string());
                                    s.secrets.insert(name.to_owned(), object.clone());
                                    ok(200, &object)
                                }
                            }
                        }
                    }
                    _ => status(405, "MethodNotAllowed", "no"),
                }
            } else if let Some(name) = path.strip_prefix(mwc_prefix) {
                match (method, s.webhook_configurations.get(name).cloned()) {
                    (_, None) => status(
                        404,
                        "NotFound",
                        &format!("mutatingwebhookconfigurations \"{name}\" not found"),
                    ),
                    (Method::GET, Some(o)) => ok(200, &o),
                    (Method::PATCH, Some(mut o)) => {
                        assert_eq!(content_type, "application/strategic-merge-patch+json");
                        let patch: Value = serde_json::from_slice(&body).expect("patch json");
                        for item in patch["webhooks"].as_array().into_iter().flatten() {
                            let webhooks = o["webhooks"].as_array_mut().expect("webhooks");
                            let target = webhooks
                                .iter_mut()
                                .find(|w| w["name"] == item["name"])
                                .expect("strategic merge by name: the webhook exists");
                            json_patch::merge(target, item);
                        }
                        s.next_version += 1;
                        o["metadata"]["resourceVersion"] = json!(s.next_version.to_string());
                        s.webhook_configurations.insert(name.to_owned(), o.clone());
                        ok(200, &o)
                    }
                    _ => status(405, "MethodNotAllowed", "no"),
                }
            } else {
                status(404, "NotFound", &format!("{path} is not served by this test API"))
            }
        };
        if response.status().is_success() && !matches!(path.as_str(), "/version") {
            self.writes.send_modify(|n| *n += 1);
        }
        response
    }
}

fn secret_bundle(api: &MiniApi) -> CertBundle {
    let secret: k8s_openapi::api::core::v1::Secret =
        serde_json::from_value(api.secret("wsgate-webhook-cert").expect("secret")).expect("secret");
    CertBundle::from_secret(&secret).expect("bundle")
}

#[tokio::test]
async fn the_controller_creates_reuses_and_rotates_its_certificate() {
    let (api, client, stop) = MiniApi::start("30").await;
    api.add_webhook_configuration("wsgate-injector", &["ns.inject.wsgate.io", "pod.inject.wsgate.io"]);
    let manager = CertManager::new(client, bootstrap_config(CertMode::Generate));
    let store = CertStore::new();
    let now = SystemTime::now();

    // First start: a Secret is created, served, and both webhooks trust its CA.
    manager.reconcile(&store, now).await.expect("first reconcile");
    assert!(store.is_ready());
    let first = secret_bundle(&api);
    first.check(SERVER_NAME, now).expect("valid");
    assert_eq!(api.ca_bundles("wsgate-injector"), vec![Some(first.ca_pem.clone()); 2]);
    assert_eq!(
        api.take_writes(),
        [
            format!("POST /api/v1/namespaces/{NS}/secrets"),
            "PATCH /apis/admissionregistration.k8s.io/v1/mutatingwebhookconfigurations/wsgate-injector".to_owned()
        ]
    );

    // Restart or periodic check: nothing to write.
    let (_, action) = manager.ensure_secret(now).await.expect("ensure");
    assert_eq!(action, SecretAction::Reused);
    manager.reconcile(&store, now + DAY).await.expect("second reconcile");
    assert_eq!(api.take_writes(), Vec::<String>::new());

    // Someone resets a caBundle (helm upgrade): repaired on the next round.
    api.add_webhook_configuration("wsgate-injector", &["ns.inject.wsgate.io", "pod.inject.wsgate.io"]);
    manager.reconcile(&store, now + DAY).await.expect("repair");
    assert_eq!(api.ca_bundles("wsgate-injector"), vec![Some(first.ca_pem.clone()); 2]);
    api.take_writes();

    // 340 days later the certificate expires within renew_before: rotated, and the old CA stays
    // trusted after the new one while the old certificate is still valid.
    let later = now + 340 * DAY;
    manager.reconcile(&store, later).await.expect("rotation");
    let second = secret_bundle(&api);
    assert_ne!(second.cert_pem, first.cert_pem);
    let new_ca = second.current_ca_pem().expect("current CA");
    assert!(second.ca_pem.starts_with(&new_ca), "the new CA comes first");
    assert_ne!(new_ca, first.ca_pem);
    assert!(
        second.ca_pem.ends_with(&first.ca_pem),
        "the previous CA follows the new one"
    );
    second.check(SERVER_NAME, later).expect("new certificate valid");
    let old_served = CertBundle {
        ca_pem: second.ca_pem.clone(),
        ..first.clone()
    };
    old_served
        .check(SERVER_NAME, later)
        .expect("replicas still serving the old certificate remain trusted");
    assert_eq!(api.ca_bundles("wsgate-injector"), vec![Some(second.ca_pem.clone()); 2]);
    assert_eq!(
        api.take_writes(),
        [
            format!("PUT /api/v1/namespaces/{NS}/secrets/wsgate-webhook-cert"),
            "PATCH /apis/admissionregistration.k8s.io/v1/mutatingwebhookconfigurations/wsgate-injector".to_owned()
        ]
    );

    // A Secret with garbage is replaced too (and nothing of it is kept in the bundle).
    let mut garbage = second.to_secret_data();
    garbage.insert("tls.crt".to_owned(), k8s_openapi::ByteString(b"garbage".to_vec()));
    api.put_secret("wsgate-webhook-cert", &garbage);
    manager.reconcile(&store, later).await.expect("replace garbage");
    let third = secret_bundle(&api);
    third.check(SERVER_NAME, later).expect("valid");
    assert_eq!(
        third.current_ca_pem().as_deref(),
        Some(third.ca_pem.as_str()),
        "one CA only"
    );
    stop.cancel();
}

#[tokio::test]
async fn concurrent_replicas_converge_on_one_certificate() {
    let (api, client, stop) = MiniApi::start("30").await;
    api.add_webhook_configuration("wsgate-injector", &["ns.inject.wsgate.io"]);
    let a = CertManager::new(client.clone(), bootstrap_config(CertMode::Generate));
    let b = CertManager::new(client, bootstrap_config(CertMode::Generate));
    let now = SystemTime::now();
    let (ra, rb) = tokio::join!(a.ensure_secret(now), b.ensure_secret(now));
    let outcomes = [&ra, &rb];
    let created = outcomes
        .iter()
        .filter(|r| matches!(r, Ok((_, SecretAction::Created))))
        .count();
    let lost = outcomes
        .iter()
        .filter(|r| matches!(r, Err(BootstrapError::Conflict(_))))
        .count();
    // Either both read "absent" and one lost the create, or one read the other's Secret.
    assert_eq!(created, 1, "{ra:?} {rb:?}");
    assert!(lost <= 1);
    // The next round (what the loser's retry does) reads the winner's certificate.
    let (from_a, _) = a.ensure_secret(now).await.expect("a");
    let (from_b, _) = b.ensure_secret(now).await.expect("b");
    assert_eq!(from_a, from_b);
    assert_eq!(from_a, secret_bundle(&api));
    stop.cancel();
}

#[tokio::test]
async fn cert_manager_mode_only_reads_the_secret() {
    let (api, client, stop) = MiniApi::start("30").await;
    api.add_webhook_configuration("wsgate-injector", &["ns.inject.wsgate.io"]);
    let manager = CertManager::new(client, bootstrap_config(CertMode::External));
    let store = CertStore::new();
    let now = SystemTime::now();
    let missing = manager.reconcile(&store, now).await.expect_err("no Secret yet");
    assert!(matches!(missing, BootstrapError::SecretNotReady { .. }), "{missing}");
    assert!(!store.is_ready());

    let issued = CertBundle::generate(&names(), now, 90 * DAY).expect("cert");
    api.put_secret("wsgate-webhook-cert", &issued.to_secret_data());
    api.take_writes();
    manager
        .reconcile(&store, now)
        .await
        .expect("reads cert-manager's Secret");
    assert!(store.is_ready());
    assert_eq!(api.take_writes(), Vec::<String>::new(), "no Secret or caBundle writes");
    assert_eq!(
        api.ca_bundles("wsgate-injector"),
        vec![None],
        "cainjector owns the caBundle"
    );

    // Expired: not served (cert-manager renews), reported.
    let expired = manager.reconcile(&store, now + 91 * DAY).await.expect_err("expired");
    assert!(expired.to_string().contains("not usable yet"), "{expired}");
    stop.cancel();
}

#[tokio::test]
async fn a_missing_webhook_configuration_is_reported() {
    let (_api, client, stop) = MiniApi::start("30").await;
    let manager = CertManager::new(client, bootstrap_config(CertMode::Generate));
    let err = manager
        .reconcile(&CertStore::new(), SystemTime::now())
        .await
        .expect_err("no configuration");
    assert_eq!(
        err.to_string(),
        "MutatingWebhookConfiguration wsgate-injector not found: pods are not sent to the webhook"
    );
    stop.cancel();
}

/// The webhook as `wsgate controller --webhook` runs it, against a 1.20 API server: it writes
/// its certificate, registers the CA, and answers an AdmissionReview over a connection that
/// trusts only the registered `caBundle`, injecting a regular container (no native sidecars on
/// 1.20).
#[tokio::test]
async fn the_whole_webhook_bootstraps_and_injects_regular_containers_on_old_servers() {
    let (api, client, stop) = MiniApi::start("20").await;
    api.add_webhook_configuration("wsgate-injector", &["ns.inject.wsgate.io", "pod.inject.wsgate.io"]);
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    let config = WebhookConfig {
        listen: addr,
        inject: inject_config(),
        sidecar_mode: SidecarModeArg::Auto,
        bootstrap: bootstrap_config(CertMode::Generate),
    };
    let cancel = CancellationToken::new();
    let task = tokio::spawn(run_webhook_on(listener, config, client, cancel.clone()));

    let mut writes = api.writes.subscribe();
    tokio::time::timeout(
        DEADLINE,
        writes.wait_for(|_| api.ca_bundles("wsgate-injector").iter().all(Option::is_some)),
    )
    .await
    .expect("caBundle registered in time")
    .expect("watch");
    let ca_bundle = api.ca_bundles("wsgate-injector")[0].clone().expect("caBundle");

    let object = pod(json!({}));
    let (status, body) = https(
        addr,
        &ca_bundle,
        Proto::Http1,
        Method::POST,
        "/inject",
        admission_review("uid-e2e", "chat", &object),
    )
    .await
    .expect("the API server's view: trusts the caBundle");
    assert_eq!(status, StatusCode::OK);
    let (review, patched) = apply_response(&object, &body);
    assert_eq!(review["response"]["allowed"], true);
    assert!(patched["spec"].get("initContainers").is_none());
    let containers = patched["spec"]["containers"].as_array().expect("containers");
    assert_eq!(containers.len(), 2);
    assert_eq!(containers[1]["name"], "wsgate-gateway");
    assert!(containers[1].get("restartPolicy").is_none());
    assert_eq!(patched["metadata"]["annotations"]["wsgate.io/injected"], "container");

    // A pod asking for native sidecars on 1.20 is refused with the reason.
    let native = pod(json!({"wsgate.io/sidecar-mode": "native"}));
    let (_, body) = https(
        addr,
        &ca_bundle,
        Proto::Http1,
        Method::POST,
        "/inject",
        admission_review("uid-native", "chat", &native),
    )
    .await
    .expect("request");
    let (review, _) = apply_response(&native, &body);
    assert_eq!(review["response"]["allowed"], false);
    assert!(
        review["response"]["status"]["message"]
            .as_str()
            .expect("message")
            .contains("this API server is 1.20")
    );

    cancel.cancel();
    tokio::time::timeout(DEADLINE, task)
        .await
        .expect("stops on cancel")
        .expect("task")
        .expect("no error");
    stop.cancel();
}

#[tokio::test]
async fn a_new_certificate_name_rotates_the_certificate() {
    let (api, client, stop) = MiniApi::start("30").await;
    api.add_webhook_configuration("wsgate-injector", &["ns.inject.wsgate.io"]);
    let now = SystemTime::now();
    let plain = CertManager::new(client.clone(), bootstrap_config(CertMode::Generate));
    plain.reconcile(&CertStore::new(), now).await.expect("first");
    let first = secret_bundle(&api);
    assert!(first.check("127.0.0.1", now).is_err());

    let mut config = bootstrap_config(CertMode::Generate);
    config.extra_names = vec!["127.0.0.1".to_owned()];
    let with_ip = CertManager::new(client, config);
    let (bundle, action) = with_ip.ensure_secret(now).await.expect("rotate");
    assert_eq!(action, SecretAction::Rotated);
    bundle.check("127.0.0.1", now).expect("the IP is served");
    bundle.check(SERVER_NAME, now).expect("and the Service name");
    stop.cancel();
}

/// The command line and environment the webhook gives sidecars exist in the real binary.
#[test]
fn injected_command_lines_match_the_gateway_cli() {
    let bin = env!("CARGO_BIN_EXE_wsgate");
    let mut config = inject_config();
    config.nats_url = Some("nats://nats:4222".to_owned());
    config.otel_endpoint = Some("http://otel:4317".to_owned());
    let injector = Injector::new(config);
    let help = |args: &[&str]| {
        let out = std::process::Command::new(bin).args(args).output().expect("run wsgate");
        (
            out.status.success(),
            format!(
                "{}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            ),
        )
    };
    let (_, global_help) = help(&["--help"]);
    let (_, gateway_help) = help(&["gateway", "--help"]);
    for (annotations, workers) in [
        (json!({}), "2"),
        (json!({"wsgate.io/target-port": "3000"}), "2"),
        (json!({"wsgate.io/admin-token-secret": "admin"}), "2"),
        (json!({"wsgate.io/workers": "auto"}), "0"),
        (json!({"wsgate.io/workers": "1024"}), "1024"),
    ] {
        let object = pod(annotations);
        let pod: k8s_openapi::api::core::v1::Pod = serde_json::from_value(object.clone()).expect("pod");
        let wsgate::controller::webhook::Outcome::Inject { patch, .. } = injector.decide("chat", &pod) else {
            panic!("expected an injection");
        };
        let mut patched = object;
        json_patch::patch(&mut patched, &patch).expect("applies");
        let sidecar = &patched["spec"]["initContainers"][0];
        let args: Vec<&str> = sidecar["args"]
            .as_array()
            .expect("args")
            .iter()
            .filter_map(Value::as_str)
            .collect();
        assert_eq!(args[0], "gateway");
        let at = args.iter().position(|a| *a == "--workers").expect("--workers");
        assert_eq!(args.get(at + 1), Some(&workers), "{args:?}");
        // clap refuses unknown arguments before acting on --help.
        let mut with_help = args.clone();
        with_help.push("--help");
        let (ok, output) = help(&with_help);
        assert!(ok, "`wsgate {}` is not a valid command line:\n{output}", args.join(" "));
        for env in sidecar["env"].as_array().expect("env") {
            let name = env["name"].as_str().expect("name");
            if name.starts_with("WSGATE_") {
                let shown = format!("[env: {name}=");
                assert!(
                    gateway_help.contains(&shown) || global_help.contains(&shown),
                    "the gateway reads no {name}"
                );
            }
        }
    }
}

/// Every admission decision is counted under its `decision` and `reason` labels
/// (`wsgate_webhook_admissions_total`), as the controller's `/metrics` exports them: a known
/// mix of reviews over HTTPS, then the exact value of every series.
#[tokio::test]
async fn admission_decisions_are_counted_by_decision_and_reason() {
    use wsgate::controller::ControllerMetrics;
    use wsgate::controller::metrics::Admission;
    use wsgate::metrics::{Exposition, Format};

    let bundle = CertBundle::generate(&names(), SystemTime::now(), DAY).expect("cert");
    let store = Arc::new(CertStore::new());
    store.install(&bundle).expect("install");
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    let cancel = CancellationToken::new();
    let controller_metrics = Arc::new(ControllerMetrics::default());
    let injector = Arc::new(Injector::with_metrics(
        inject_config(),
        controller_metrics.admissions.clone(),
    ));
    let task = tokio::spawn(server::serve(
        listener,
        certs::server_config(store).expect("tls config"),
        injector,
        cancel.clone(),
    ));
    let send = |body: Vec<u8>| https(addr, &bundle.ca_pem, Proto::Http1, Method::POST, "/inject", body);
    let allowed = |body: &Bytes| -> bool {
        let review: Value = serde_json::from_slice(body).expect("review json");
        review["response"]["allowed"].as_bool().expect("allowed")
    };

    // Injected: twice native (the default), once as a regular container.
    for uid in ["n1", "n2"] {
        let (status, body) = send(admission_review(uid, "chat", &pod(json!({}))))
            .await
            .expect("request");
        assert_eq!(status, StatusCode::OK);
        assert!(allowed(&body));
    }
    let container = pod(json!({"wsgate.io/sidecar-mode": "container"}));
    let (_, body) = send(admission_review("c1", "chat", &container)).await.expect("request");
    assert!(allowed(&body));
    // Skipped: two excluded namespaces, one opted-out pod, one already injected, one UPDATE.
    for (uid, ns) in [("x1", "kube-system"), ("x2", NS)] {
        let (_, body) = send(admission_review(uid, ns, &pod(json!({})))).await.expect("request");
        assert!(allowed(&body));
    }
    let mut opted_out = pod(json!({}));
    opted_out["metadata"]["labels"]["wsgate.io/inject"] = json!("disabled");
    let (_, body) = send(admission_review("o1", "chat", &opted_out)).await.expect("request");
    assert!(allowed(&body));
    let mut injected = pod(json!({}));
    injected["spec"]["containers"]
        .as_array_mut()
        .expect("containers")
        .push(json!({"name": "wsgate-gateway", "image": "wsgate:test"}));
    let (_, body) = send(admission_review("a1", "chat", &injected)).await.expect("request");
    assert!(allowed(&body));
    let mut update: Value = serde_json::from_slice(&admission_review("u1", "chat", &pod(json!({})))).expect("json");
    update["request"]["operation"] = json!("UPDATE");
    let (_, body) = send(serde_json::to_vec(&update).expect("json")).await.expect("request");
    assert!(allowed(&body));
    // Denied: a bad annotation; a port the sidecar needs is taken by the app.
    let (_, body) = send(admission_review("d1", "chat", &pod(json!({"wsgate.io/cpu": "a lot"}))))
        .await
        .expect("request");
    assert!(!allowed(&body));
    let mut clash = pod(json!({}));
    clash["spec"]["containers"][0]["ports"] = json!([{"containerPort": 8880}]);
    let (_, body) = send(admission_review("d2", "chat", &clash)).await.expect("request");
    assert!(!allowed(&body));
    // Error: not an AdmissionReview.
    let (status, _) = send(b"{\"kind\":".to_vec()).await.expect("request");
    assert_eq!(status, StatusCode::BAD_REQUEST);

    let admissions = &controller_metrics.admissions;
    let expected = [
        (Admission::InjectedNative, 2),
        (Admission::InjectedContainer, 1),
        (Admission::SkippedNotAPodCreate, 1),
        (Admission::SkippedExcludedNamespace, 2),
        (Admission::SkippedOptedOut, 1),
        (Admission::SkippedAlreadyInjected, 1),
        (Admission::SkippedHostNetwork, 0),
        (Admission::DeniedNoSpec, 0),
        (Admission::DeniedInvalidAnnotations, 1),
        (Admission::DeniedInvalidPod, 1),
        (Admission::ErrorBadReview, 1),
        (Admission::ErrorUnreadablePod, 0),
        (Admission::ErrorPatchEncoding, 0),
    ];
    for (admission, count) in expected {
        assert_eq!(admissions.get(admission), count, "{admission:?}");
    }
    let mut exposition = Exposition::new(Format::Prometheus);
    admissions.encode(&mut exposition);
    let text = exposition.finish();
    let samples: Vec<&str> = text.lines().filter(|l| !l.starts_with('#')).collect();
    assert_eq!(
        samples,
        [
            r#"wsgate_webhook_admissions_total{decision="injected",reason="native"} 2"#,
            r#"wsgate_webhook_admissions_total{decision="injected",reason="container"} 1"#,
            r#"wsgate_webhook_admissions_total{decision="skipped",reason="not_a_pod_create"} 1"#,
            r#"wsgate_webhook_admissions_total{decision="skipped",reason="excluded_namespace"} 2"#,
            r#"wsgate_webhook_admissions_total{decision="skipped",reason="opted_out"} 1"#,
            r#"wsgate_webhook_admissions_total{decision="skipped",reason="already_injected"} 1"#,
            r#"wsgate_webhook_admissions_total{decision="skipped",reason="host_network"} 0"#,
            r#"wsgate_webhook_admissions_total{decision="denied",reason="no_spec"} 0"#,
            r#"wsgate_webhook_admissions_total{decision="denied",reason="invalid_annotations"} 1"#,
            r#"wsgate_webhook_admissions_total{decision="denied",reason="invalid_pod"} 1"#,
            r#"wsgate_webhook_admissions_total{decision="error",reason="bad_review"} 1"#,
            r#"wsgate_webhook_admissions_total{decision="error",reason="unreadable_pod"} 0"#,
            r#"wsgate_webhook_admissions_total{decision="error",reason="patch_encoding"} 0"#,
        ]
    );
    assert!(
        text.contains("# TYPE wsgate_webhook_admissions_total counter\n"),
        "{text}"
    );
    // Both formats the controller's /metrics negotiates parse.
    openmetrics_parser::prometheus::parse_prometheus(&text).expect("valid Prometheus text");
    let mut exposition = Exposition::new(Format::OpenMetrics);
    admissions.encode(&mut exposition);
    let open = exposition.finish();
    let parsed = openmetrics_parser::openmetrics::parse_openmetrics(&open).expect("valid OpenMetrics");
    assert!(parsed.families.contains_key("wsgate_webhook_admissions"), "{open}");

    cancel.cancel();
    tokio::time::timeout(DEADLINE, task)
        .await
        .expect("server stops")
        .expect("server task");
}
