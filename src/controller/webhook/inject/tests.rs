//! Golden tests of the mutation: each case feeds a pod to [`Injector::decide`] and compares the
//! outcome with `tests/golden/webhook/CASE.json`. `WSGATE_UPDATE_GOLDEN=1` rewrites the files
//! (review the diff before committing).

use std::collections::BTreeSet;

use base64::Engine as _;
use serde_json::{Value, json};

use super::*;
use crate::controller::webhook::annotations::{ANNOTATION_WORKERS, Quantity, Workers};

fn q(s: &str) -> Quantity {
    s.parse().expect("quantity")
}

fn config() -> InjectConfig {
    InjectConfig {
        defaults: InjectDefaults {
            port: 8880,
            admin_port: 9090,
            cpu: q("50m"),
            cpu_limit: None,
            memory: q("64Mi"),
            memory_limit: Some(q("128Mi")),
            workers: Workers::SIDECAR_DEFAULT,
            log_level: "info".to_owned(),
            sidecar_mode: SidecarMode::Native,
            admin_token_secret: None,
        },
        image: "wsgate:test".to_owned(),
        image_pull_policy: "IfNotPresent".to_owned(),
        control_url: Some("http://wsgate-controller.wsgate-system.svc:8081".to_owned()),
        token_audience: "wsgate-control".to_owned(),
        token_expiration_seconds: 3600,
        excluded_namespaces: BTreeSet::from(["kube-system".to_owned(), "wsgate-system".to_owned()]),
        otel_endpoint: None,
        nats_url: None,
        server_minor: Some(30),
    }
}

fn pod(value: Value) -> Pod {
    serde_json::from_value(value).expect("pod")
}

fn app_pod() -> Value {
    json!({
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"generateName": "chat-7d9f-", "labels": {"app": "chat"}},
        "spec": {"containers": [{"name": "app", "image": "chat:1", "ports": [{"containerPort": 3000}]}]}
    })
}

/// The outcome as stable JSON, for goldens.
fn outcome_json(outcome: &Outcome) -> Value {
    match outcome {
        Outcome::Skip(reason) => json!({"outcome": "skip", "reason": format!("{reason:?}")}),
        Outcome::Deny(message) => json!({"outcome": "deny", "message": message}),
        Outcome::Inject { patch, mode, warnings } => json!({
            "outcome": "inject",
            "mode": mode.as_str(),
            "warnings": warnings,
            "patch": serde_json::to_value(patch).expect("patch json"),
        }),
    }
}

fn check_golden(case: &str, actual: &Value) {
    let path = format!("{}/tests/golden/webhook/{case}.json", env!("CARGO_MANIFEST_DIR"));
    let rendered = format!("{}\n", serde_json::to_string_pretty(actual).expect("json"));
    if std::env::var_os("WSGATE_UPDATE_GOLDEN").is_some() {
        std::fs::write(&path, &rendered).expect("write golden");
        return;
    }
    let expected: Value = std::fs::read_to_string(&path)
        .ok()
        .and_then(|s| serde_json::from_str(&s).ok())
        .unwrap_or(Value::Null);
    assert!(
        expected == *actual,
        "{path} differs (WSGATE_UPDATE_GOLDEN=1 rewrites it); actual:\n{rendered}"
    );
}

/// Applies an injection patch and returns the patched pod.
fn apply(original: &Value, outcome: &Outcome) -> Value {
    let Outcome::Inject { patch, .. } = outcome else {
        panic!("expected an injection, got {outcome:?}");
    };
    let mut doc = original.clone();
    json_patch::patch(&mut doc, patch).expect("the patch applies");
    doc
}

#[test]
fn fresh_pod_gets_a_native_sidecar() {
    let injector = Injector::new(config());
    let original = app_pod();
    let outcome = injector.decide("chat", &pod(original.clone()));
    check_golden("fresh_pod", &outcome_json(&outcome));

    let patched = apply(&original, &outcome);
    // The result is still a valid Pod, with the sidecar as the only init container.
    let patched_pod = pod(patched.clone());
    let spec = patched_pod.spec.as_ref().expect("spec");
    let init = spec.init_containers.as_ref().expect("init containers");
    assert_eq!(init.len(), 1);
    let sidecar = &init[0];
    assert_eq!(sidecar.name, CONTAINER_NAME);
    assert_eq!(sidecar.restart_policy.as_deref(), Some("Always"));
    assert_eq!(
        sidecar.args.as_deref().expect("args"),
        [
            "gateway",
            "--listen",
            "0.0.0.0:8880",
            "--admin-listen",
            "0.0.0.0:9090",
            "--workers",
            "2",
            "--control-url",
            "http://wsgate-controller.wsgate-system.svc:8081",
            "--admin-allow-unauthenticated"
        ]
    );
    let sc = sidecar.security_context.as_ref().expect("securityContext");
    assert_eq!(sc.run_as_non_root, Some(true));
    assert_eq!(sc.read_only_root_filesystem, Some(true));
    assert_eq!(sc.allow_privilege_escalation, Some(false));
    assert_eq!(
        sc.capabilities.as_ref().and_then(|c| c.drop.clone()),
        Some(vec!["ALL".to_owned()])
    );
    assert_eq!(
        sc.seccomp_profile.as_ref().map(|p| p.type_.as_str()),
        Some("RuntimeDefault")
    );
    let mount = &sidecar.volume_mounts.as_ref().expect("mounts")[0];
    assert_eq!(
        format!("{}/token", mount.mount_path),
        crate::config::control::DEFAULT_TOKEN_FILE
    );
    let volume = &spec.volumes.as_ref().expect("volumes")[0];
    let token = volume
        .projected
        .as_ref()
        .expect("projected")
        .sources
        .as_ref()
        .expect("sources")[0]
        .service_account_token
        .as_ref()
        .expect("token");
    assert_eq!(token.audience.as_deref(), Some(crate::config::control::TOKEN_AUDIENCE));
    assert_eq!(spec.containers.len(), 1, "app containers untouched");
    assert_eq!(patched["metadata"]["annotations"][ANNOTATION_INJECTED], json!("native"));
}

#[test]
fn existing_init_containers_run_before_the_sidecar() {
    let injector = Injector::new(config());
    let mut original = app_pod();
    original["metadata"]["annotations"] = json!({"wsgate.io/target-port": "3000", "team": "chat"});
    original["spec"]["initContainers"] = json!([{"name": "migrate", "image": "chat:1"}]);
    original["spec"]["volumes"] = json!([{"name": "data", "emptyDir": {}}]);
    let outcome = injector.decide("chat", &pod(original.clone()));
    check_golden("existing_init_containers", &outcome_json(&outcome));

    let patched = apply(&original, &outcome);
    let names: Vec<&str> = patched["spec"]["initContainers"]
        .as_array()
        .expect("init")
        .iter()
        .filter_map(|c| c["name"].as_str())
        .collect();
    assert_eq!(names, ["migrate", CONTAINER_NAME]);
    assert_eq!(patched["metadata"]["annotations"]["team"], json!("chat"));
    // wsgate.io/target-port: a static route to the app, no control API and so no token.
    let sidecar = &patched["spec"]["initContainers"][1];
    let args = sidecar["args"].as_array().expect("args");
    assert!(args.contains(&json!("--backend")) && args.contains(&json!("http://127.0.0.1:3000")));
    assert!(!args.contains(&json!("--control-url")), "the gateway refuses both");
    assert_eq!(patched["spec"]["volumes"], json!([{"name": "data", "emptyDir": {}}]));
    assert!(sidecar.get("volumeMounts").is_none());
}

#[test]
fn container_mode_appends_a_regular_container() {
    let injector = Injector::new(config());
    let mut original = app_pod();
    original["metadata"]["annotations"] = json!({
        "wsgate.io/sidecar-mode": "container",
        "wsgate.io/admin-token-secret": "chat-admin",
        "wsgate.io/memory": "96Mi",
        "wsgate.io/cpu-limit": "500m",
    });
    let outcome = injector.decide("chat", &pod(original.clone()));
    check_golden("container_mode", &outcome_json(&outcome));

    let patched = pod(apply(&original, &outcome));
    let spec = patched.spec.expect("spec");
    assert!(spec.init_containers.is_none());
    let sidecar = spec.containers.last().expect("sidecar");
    assert_eq!(sidecar.name, CONTAINER_NAME);
    assert_eq!(sidecar.restart_policy, None);
    let args = sidecar.args.clone().expect("args");
    assert!(!args.contains(&"--admin-allow-unauthenticated".to_owned()));
    let token_env = sidecar
        .env
        .iter()
        .flatten()
        .find(|e| e.name == "WSGATE_ADMIN_TOKEN")
        .expect("token env");
    let secret = token_env
        .value_from
        .as_ref()
        .and_then(|v| v.secret_key_ref.as_ref())
        .expect("secretKeyRef");
    assert_eq!((secret.name.as_str(), secret.key.as_str()), ("chat-admin", "token"));
    let annotations = patched.metadata.annotations.expect("annotations");
    assert_eq!(annotations[DEFAULT_CONTAINER_ANNOTATION], "app");
}

/// The sidecar's arguments after injecting `original` with `injector`.
fn sidecar_args(injector: &Injector, original: &Value) -> Vec<String> {
    let patched = pod(apply(original, &injector.decide("chat", &pod(original.clone()))));
    let spec = patched.spec.expect("spec");
    let sidecar = spec
        .init_containers
        .into_iter()
        .flatten()
        .chain(spec.containers)
        .find(|c| c.name == CONTAINER_NAME)
        .expect("sidecar");
    sidecar.args.expect("args")
}

/// The value following `--workers`, which must appear exactly once.
fn workers_arg(args: &[String]) -> &str {
    let at: Vec<usize> = (0..args.len()).filter(|&i| args[i] == "--workers").collect();
    assert_eq!(at.len(), 1, "one --workers in {args:?}");
    args.get(at[0] + 1).map(String::as_str).expect("--workers has a value")
}

#[test]
fn workers_come_from_the_annotation_or_the_webhook_default() {
    let injector = Injector::new(config());
    assert_eq!(workers_arg(&sidecar_args(&injector, &app_pod())), "2");
    for (annotation, arg) in [("6", "6"), ("1024", "1024"), ("auto", "0"), ("0", "0")] {
        let mut original = app_pod();
        original["metadata"]["annotations"] = json!({ANNOTATION_WORKERS: annotation});
        assert_eq!(workers_arg(&sidecar_args(&injector, &original)), arg, "{annotation}");
    }
    // Static-route and container-mode sidecars get it too.
    let mut original = app_pod();
    original["metadata"]["annotations"] = json!({
        "wsgate.io/target-port": "3000",
        "wsgate.io/sidecar-mode": "container",
        ANNOTATION_WORKERS: "3",
    });
    assert_eq!(workers_arg(&sidecar_args(&injector, &original)), "3");

    let mut cfg = config();
    cfg.defaults.workers = Workers::AUTO;
    let injector = Injector::new(cfg);
    assert_eq!(workers_arg(&sidecar_args(&injector, &app_pod())), "0");
    let mut original = app_pod();
    original["metadata"]["annotations"] = json!({ANNOTATION_WORKERS: "4"});
    assert_eq!(workers_arg(&sidecar_args(&injector, &original)), "4");
}

#[test]
fn a_bad_workers_annotation_is_denied() {
    let injector = Injector::new(config());
    let mut original = app_pod();
    original["metadata"]["annotations"] = json!({ANNOTATION_WORKERS: "lots"});
    let Outcome::Deny(message) = injector.decide("chat", &pod(original)) else {
        panic!("expected a denial");
    };
    assert_eq!(
        message,
        r#"wsgate sidecar injection refused: wsgate.io/workers: "lots" is not a worker count (1-1024, or auto)"#
    );
}

#[test]
fn already_injected_pod_is_unchanged() {
    let injector = Injector::new(config());
    let original = app_pod();
    let first = apply(&original, &injector.decide("chat", &pod(original.clone())));
    let second = injector.decide("chat", &pod(first));
    check_golden("already_injected", &outcome_json(&second));
    assert_eq!(second, Outcome::Skip(Skip::AlreadyInjected));
}

#[test]
fn opted_out_pod_is_unchanged() {
    let injector = Injector::new(config());
    let mut original = app_pod();
    original["metadata"]["labels"]["wsgate.io/inject"] = json!("disabled");
    let outcome = injector.decide("chat", &pod(original));
    check_golden("opted_out", &outcome_json(&outcome));
    assert_eq!(outcome, Outcome::Skip(Skip::OptedOut));
}

#[test]
fn bad_annotations_are_denied_with_every_reason() {
    let injector = Injector::new(config());
    let mut original = app_pod();
    original["metadata"]["annotations"] = json!({
        "wsgate.io/port": "eighty",
        "wsgate.io/memory": "64m",
    });
    let outcome = injector.decide("chat", &pod(original));
    check_golden("bad_annotation", &outcome_json(&outcome));
    let Outcome::Deny(message) = outcome else {
        panic!("expected a denial");
    };
    assert!(message.contains(r#"wsgate.io/port: "eighty" is not a port number (1-65535)"#));
    assert!(message.contains("wsgate.io/memory"));
}

#[test]
fn excluded_namespaces_and_host_network_are_skipped() {
    let injector = Injector::new(config());
    for ns in ["kube-system", "wsgate-system"] {
        assert_eq!(
            injector.decide(ns, &pod(app_pod())),
            Outcome::Skip(Skip::ExcludedNamespace(ns.to_owned()))
        );
    }
    let mut host = app_pod();
    host["spec"]["hostNetwork"] = json!(true);
    assert_eq!(injector.decide("chat", &pod(host)), Outcome::Skip(Skip::HostNetwork));
}

#[test]
fn port_collisions_and_reserved_names_are_denied() {
    let injector = Injector::new(config());
    let mut original = app_pod();
    original["spec"]["containers"][0]["ports"] = json!([
        {"containerPort": 8880},
        {"containerPort": 9090, "name": "wsgate-admin"}
    ]);
    original["spec"]["volumes"] = json!([{"name": TOKEN_VOLUME, "emptyDir": {}}]);
    let Outcome::Deny(message) = injector.decide("chat", &pod(original)) else {
        panic!("expected a denial");
    };
    assert!(
        message.contains("wsgate.io/port 8880 is also declared by container app"),
        "{message}"
    );
    assert!(
        message.contains("wsgate.io/admin-port 9090 is also declared by container app"),
        "{message}"
    );
    assert!(message.contains("port name wsgate-admin"), "{message}");
    assert!(
        message.contains("volume name wsgate-control-token is reserved"),
        "{message}"
    );
}

#[test]
fn native_mode_on_an_old_server_is_denied_only_when_asked_for() {
    let mut cfg = config();
    cfg.server_minor = Some(20);
    cfg.defaults.sidecar_mode = SidecarMode::Container;
    let injector = Injector::new(cfg);
    let mut asked = app_pod();
    asked["metadata"]["annotations"] = json!({"wsgate.io/sidecar-mode": "native"});
    let Outcome::Deny(message) = injector.decide("chat", &pod(asked)) else {
        panic!("expected a denial");
    };
    assert!(message.contains("this API server is 1.20"), "{message}");
    let Outcome::Inject { mode, .. } = injector.decide("chat", &pod(app_pod())) else {
        panic!("expected an injection");
    };
    assert_eq!(mode, SidecarMode::Container);
}

#[test]
fn without_a_control_url_the_target_port_is_required() {
    let mut cfg = config();
    cfg.control_url = None;
    let injector = Injector::new(cfg);
    let Outcome::Deny(message) = injector.decide("chat", &pod(app_pod())) else {
        panic!("expected a denial");
    };
    assert!(message.contains("wsgate.io/target-port is required"), "{message}");
}

#[test]
fn telemetry_and_nats_reach_the_sidecar_env() {
    let mut cfg = config();
    cfg.otel_endpoint = Some("http://otel-collector.observability:4317".to_owned());
    cfg.nats_url = Some("nats://nats.messaging:4222".to_owned());
    let injector = Injector::new(cfg);
    let original = app_pod();
    let patched = pod(apply(&original, &injector.decide("chat", &pod(original.clone()))));
    let sidecar = patched.spec.expect("spec").init_containers.expect("init").remove(0);
    let env: BTreeMap<String, Option<String>> = sidecar
        .env
        .expect("env")
        .into_iter()
        .map(|e| (e.name, e.value))
        .collect();
    assert_eq!(
        env["OTEL_EXPORTER_OTLP_ENDPOINT"].as_deref(),
        Some("http://otel-collector.observability:4317")
    );
    assert_eq!(env["WSGATE_NATS"].as_deref(), Some("nats://nats.messaging:4222"));
    assert!(env.contains_key("POD_NAME") && env.contains_key("POD_NAMESPACE"));
}

fn review(object: Value, operation: &str) -> Vec<u8> {
    serde_json::to_vec(&json!({
        "apiVersion": "admission.k8s.io/v1",
        "kind": "AdmissionReview",
        "request": {
            "uid": "705ab4f5-6393-11e8-b7cc-42010a800002",
            "kind": {"group": "", "version": "v1", "kind": "Pod"},
            "resource": {"group": "", "version": "v1", "resource": "pods"},
            "namespace": "chat",
            "operation": operation,
            "userInfo": {"username": "system:serviceaccount:kube-system:replicaset-controller"},
            "object": object,
            "oldObject": null,
            "dryRun": false
        }
    }))
    .expect("json")
}

#[test]
fn reviews_round_trip_with_a_base64_json_patch() {
    let injector = Injector::new(config());
    let original = app_pod();
    let out: Value =
        serde_json::from_slice(&injector.handle(&review(original.clone(), "CREATE")).expect("handled")).expect("json");
    assert_eq!(out["apiVersion"], "admission.k8s.io/v1");
    assert_eq!(out["kind"], "AdmissionReview");
    let response = &out["response"];
    assert_eq!(response["uid"], "705ab4f5-6393-11e8-b7cc-42010a800002");
    assert_eq!(response["allowed"], true);
    assert_eq!(response["patchType"], "JSONPatch");
    let bytes = base64::engine::general_purpose::STANDARD
        .decode(response["patch"].as_str().expect("patch"))
        .expect("base64");
    let patch: json_patch::Patch = serde_json::from_slice(&bytes).expect("patch");
    let mut doc = original;
    json_patch::patch(&mut doc, &patch).expect("applies");
    assert_eq!(doc["spec"]["initContainers"][0]["name"], CONTAINER_NAME);
    assert!(
        response["warnings"][0]
            .as_str()
            .expect("warning")
            .contains("unauthenticated")
    );
    assert_eq!(injector.metrics().get(Admission::InjectedNative), 1);

    // Other operations pass unchanged.
    let out: Value =
        serde_json::from_slice(&injector.handle(&review(app_pod(), "UPDATE")).expect("handled")).expect("json");
    assert_eq!(out["response"]["allowed"], true);
    assert!(out["response"].get("patch").is_none());

    // A denial carries the message and a 400 code.
    let mut bad = app_pod();
    bad["metadata"]["annotations"] = json!({"wsgate.io/sidecar-mode": "sidecar"});
    let out: Value = serde_json::from_slice(&injector.handle(&review(bad, "CREATE")).expect("handled")).expect("json");
    assert_eq!(out["response"]["allowed"], false);
    assert_eq!(out["response"]["status"]["code"], 400);
    assert!(
        out["response"]["status"]["message"]
            .as_str()
            .expect("message")
            .starts_with("wsgate sidecar injection refused: wsgate.io/sidecar-mode")
    );
    assert_eq!(injector.metrics().get(Admission::DeniedInvalidAnnotations), 1);
    assert_eq!(injector.metrics().get(Admission::SkippedNotAPodCreate), 1);

    assert!(matches!(
        injector.handle(b"{}"),
        Err(ReviewError::Decode(_)) | Err(ReviewError::NoRequest)
    ));
    assert!(matches!(injector.handle(b"not json"), Err(ReviewError::Decode(_))));
    assert_eq!(injector.metrics().get(Admission::ErrorBadReview), 2);
}
