//! The controller scenarios of `tests/controller.rs` against a real kube-apiserver (the tier of
//! docs/KUBE-E2E.md, run by `scripts/kube-e2e.sh rust`).
//!
//! Configuration (environment):
//!
//! - `WSGATE_KUBE_E2E_KUBECONFIG`: kubeconfig of an admin: the tests create namespaces, pods,
//!   Services, Secrets and tokens with it. Or `WSGATE_KUBE_E2E_URL` with
//!   `WSGATE_KUBE_E2E_TOKEN_FILE` (and `WSGATE_KUBE_E2E_CA_FILE` for a private CA).
//! - `WSGATE_KUBE_E2E_CONTROLLER_KUBECONFIG`: what the controllers under test run with, e.g. a
//!   ServiceAccount bound to the chart's RBAC (default: the admin configuration).
//! - `WSGATE_KUBE_E2E=1`: set by `scripts/kube-e2e.sh`; a missing configuration then fails
//!   instead of skipping.
//!
//! Without a configuration every test skips (with a note on stderr), also under `CI=true`:
//! the real API server is the tier's job, not the main test run's.
//!
//! The tests share one cluster, one Lease and cluster-wide watches, so they run one at a time
//! (a lock below; under cargo-nextest, which runs tests as separate processes, use `-j 1`).
//! Each works in a new namespace and deletes every `WebSocketRoute` in the cluster first.
//!
//! What only the fake can do stays in `tests/controller.rs`: compacting the watch history to
//! force `410 Gone` and cutting one client's connections.

#[path = "support/scenarios.rs"]
mod scenarios;
mod support;

use kube::config::{KubeConfigOptions, Kubeconfig};
use serde_json::json;

use scenarios::Cluster;

/// One test at a time against the shared cluster.
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// Reads a kubeconfig file into a client.
async fn client_from_kubeconfig(path: &str) -> kube::Client {
    let kubeconfig = Kubeconfig::read_from(path).unwrap_or_else(|e| panic!("kubeconfig {path}: {e}"));
    client_from(kubeconfig).await
}

async fn client_from(kubeconfig: Kubeconfig) -> kube::Client {
    let config = kube::Config::from_custom_kubeconfig(kubeconfig, &KubeConfigOptions::default())
        .await
        .unwrap_or_else(|e| panic!("kubeconfig: {e}"));
    kube::Client::try_from(config).unwrap_or_else(|e| panic!("client: {e}"))
}

/// The admin client from the environment, or `None` (skip) when none is configured.
async fn admin_client() -> Option<kube::Client> {
    let var = |name: &str| std::env::var(name).ok().filter(|v| !v.is_empty());
    if let Some(path) = var("WSGATE_KUBE_E2E_KUBECONFIG") {
        return Some(client_from_kubeconfig(&path).await);
    }
    if let (Some(url), Some(token_file)) = (var("WSGATE_KUBE_E2E_URL"), var("WSGATE_KUBE_E2E_TOKEN_FILE")) {
        let kubeconfig: Kubeconfig = serde_json::from_value(json!({
            "apiVersion": "v1", "kind": "Config",
            "clusters": [{"name": "e2e", "cluster": {"server": url, "certificate-authority": var("WSGATE_KUBE_E2E_CA_FILE")}}],
            "users": [{"name": "e2e", "user": {"tokenFile": token_file}}],
            "contexts": [{"name": "e2e", "context": {"cluster": "e2e", "user": "e2e"}}],
            "current-context": "e2e"
        }))
        .expect("kubeconfig from URL and token");
        return Some(client_from(kubeconfig).await);
    }
    let why = "no real API server configured (WSGATE_KUBE_E2E_KUBECONFIG, or WSGATE_KUBE_E2E_URL and \
               WSGATE_KUBE_E2E_TOKEN_FILE); scripts/kube-e2e.sh runs these tests";
    assert!(
        std::env::var("WSGATE_KUBE_E2E").as_deref() != Ok("1"),
        "WSGATE_KUBE_E2E=1 but {why}"
    );
    eprintln!("skipped: {why}");
    None
}

/// A [`Cluster`] on the real API server in a new namespace `rt-NAME-XXXXXX`, and the lock that
/// keeps the other tests out while it runs.
async fn real_cluster(name: &str) -> Option<(Cluster, tokio::sync::MutexGuard<'static, ()>)> {
    let admin = admin_client().await?;
    let guard = SERIAL.lock().await;
    let controller = match std::env::var("WSGATE_KUBE_E2E_CONTROLLER_KUBECONFIG") {
        Ok(path) if !path.is_empty() => client_from_kubeconfig(&path).await,
        _ => admin.clone(),
    };
    let suffix = uuid::Uuid::new_v4().simple().to_string();
    let ns = format!("rt-{name}-{}", &suffix[..6]);
    Some((Cluster::real(admin, controller, &ns).await, guard))
}

#[tokio::test]
async fn routes_get_status_events_and_snapshots() {
    let Some((cluster, _serial)) = real_cluster("routes").await else {
        return;
    };
    scenarios::routes_get_status_events_and_snapshots(&cluster).await;
}

#[tokio::test]
async fn status_is_written_once_per_change() {
    let Some((cluster, _serial)) = real_cluster("writes").await else {
        return;
    };
    scenarios::status_is_written_once_per_change(&cluster).await;
}

#[tokio::test]
async fn leadership_fails_over_and_only_the_leader_writes() {
    let Some((cluster, _serial)) = real_cluster("leader").await else {
        return;
    };
    scenarios::leadership_fails_over_and_only_the_leader_writes(&cluster).await;
}
