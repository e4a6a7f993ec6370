//! Controller behaviour against the in-process fake API server.
//!
//! The scenarios live in `tests/support/scenarios.rs`, each an `async fn` over a
//! [`Cluster`]; `tests/kube_real.rs` runs the same ones against a real kube-apiserver. The
//! tests here that need the fake's hooks (compaction, cut connections) run only here.

#[path = "support/scenarios.rs"]
mod scenarios;
mod support;

use serde_json::json;

use scenarios::{Cluster, RunningController, created_route_is_accepted, is, service_spec};

#[tokio::test]
async fn routes_get_status_events_and_snapshots() {
    scenarios::routes_get_status_events_and_snapshots(&Cluster::fake().await).await;
}

#[tokio::test]
async fn status_is_written_once_per_change() {
    scenarios::status_is_written_once_per_change(&Cluster::fake().await).await;
}

#[tokio::test]
async fn leadership_fails_over_and_only_the_leader_writes() {
    scenarios::leadership_fails_over_and_only_the_leader_writes(&Cluster::fake().await).await;
}

#[tokio::test]
async fn watches_recover_from_expired_resource_versions() {
    let cluster = Cluster::fake().await;
    let mut ctl = RunningController::start(cluster.client.clone(), "ctl-0").await;
    ctl.wait_leader(true).await;
    created_route_is_accepted(&cluster).await;
    // History gone and every watch cut: resuming gets 410 Gone, so the caches relist.
    cluster.fake_kube().compact();
    cluster.fake_kube().close_watches();
    cluster
        .create_route("after", service_spec("after.example.com", "nope", 1))
        .await;
    cluster
        .wait_route("after", "reconciled after the relist", |r| {
            is(r, "ResolvedRefs", "False", "BackendNotFound")
        })
        .await;
    assert!(
        cluster
            .fake_kube()
            .requests()
            .iter()
            .any(|r| r.starts_with("GET /apis/wsgate.io/v1alpha1/websocketroutes?") && !r.contains("watch=true")),
        "the routes were listed again"
    );
    ctl.stop().await;
}

#[tokio::test]
async fn a_partitioned_leader_steps_down_and_is_replaced_after_the_lease_expires() {
    let cluster = Cluster::fake().await;
    let (client, cut) = cluster.fake_kube().partitionable_client().await;
    let mut first = RunningController::start(client, "ctl-a").await;
    first.wait_leader(true).await;
    let mut second = RunningController::start(cluster.client.clone(), "ctl-b").await;
    // No release: the leader's requests stop arriving, like a crashed or partitioned pod.
    cut.cancel();
    first.wait_leader(false).await;
    second.wait_leader(true).await;
    cluster
        .create_route("after-crash", json!({"backend": {"port": 1}}))
        .await;
    cluster
        .wait_route("after-crash", "accepted", |r| is(r, "Accepted", "True", "Accepted"))
        .await;
    second.stop().await;
}
