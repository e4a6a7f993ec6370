//! The snapshot compiler: from the caches to what each gateway serves.
//!
//! [`Compiled::build`] evaluates every route once per change of the caches; it keeps the routes
//! that are served (accepted, and every Secret they read exists: a route whose Service is
//! missing *is* served, so its host and path keep answering with backend errors instead of
//! falling through to another route, as Gateway API asks). [`Compiled::snapshot_for`] then picks
//! those whose [`Scope`] applies to one gateway pod.

use std::collections::BTreeMap;
use std::sync::Arc;

use k8s_openapi::api::core::v1::{Secret, Service};
use kube::ResourceExt;
use kube::runtime::reflector::{ObjectRef, Store};

use super::crd::WebSocketRoute;
use super::evaluate::{RefLookup, RefProblem, RouteInput, RouteKey, Scope, Validator, Verdict, check_refs};
use crate::config::control::{SecretMaterial, Snapshot, SnapshotRoute};

/// A route that gateways serve, with its scope.
#[derive(Debug, Clone)]
pub struct ServedRoute {
    /// Namespace and name.
    pub key: RouteKey,
    /// Which gateways get it.
    pub scope: Scope,
    /// What they get.
    pub route: SnapshotRoute,
}

/// Every served route, as of one state of the caches.
#[derive(Debug, Clone, Default)]
pub struct Compiled {
    /// False until the caches have listed everything once: an unsynced controller must never
    /// hand out an (empty) snapshot that would wipe a gateway's routes.
    pub ready: bool,
    /// The served routes, by key.
    pub routes: Vec<ServedRoute>,
}

impl Compiled {
    /// Evaluates `routes` against the Services and Secrets in `lookup`.
    pub fn build(routes: &[Arc<WebSocketRoute>], validator: &Validator, lookup: &dyn RefLookup) -> Self {
        let inputs = route_inputs(routes);
        let verdicts = validator.evaluate(&inputs);
        let mut served = Vec::new();
        for input in &inputs {
            let Some(Verdict::Accepted(validated)) = verdicts.get(&input.key) else {
                continue;
            };
            match check_refs(validated, lookup) {
                Ok(()) | Err(RefProblem::BackendNotFound(_)) => {}
                Err(RefProblem::SecretNotFound(_)) => continue,
            }
            let mut secrets = Vec::new();
            for target in &validated.secrets {
                if let Ok(value) = lookup.secret_value(&target.namespace, &target.name, &target.key) {
                    secrets.push(SecretMaterial::new(&target.name, &target.key, &value));
                }
            }
            served.push(ServedRoute {
                key: input.key.clone(),
                scope: validated.scope.clone(),
                route: SnapshotRoute {
                    namespace: input.key.namespace.clone(),
                    name: input.key.name.clone(),
                    spec: input.spec.clone(),
                    backend_url: validated.backend_url.clone(),
                    secrets,
                },
            });
        }
        Self {
            ready: true,
            routes: served,
        }
    }

    /// The snapshot of a gateway pod in `namespace` with `labels`.
    pub fn snapshot_for(&self, namespace: &str, labels: &BTreeMap<String, String>) -> Snapshot {
        Snapshot::new(
            self.routes
                .iter()
                .filter(|r| r.scope.applies_to(namespace, labels))
                .map(|r| r.route.clone())
                .collect(),
        )
    }
}

/// The evaluation inputs of the routes in a cache; routes being deleted are left out.
pub fn route_inputs(routes: &[Arc<WebSocketRoute>]) -> Vec<RouteInput<'_>> {
    routes
        .iter()
        .filter(|r| r.metadata.deletion_timestamp.is_none())
        .map(|r| RouteInput {
            key: RouteKey::new(r.namespace().unwrap_or_default(), r.name_any()),
            uid: r.metadata.uid.as_deref().unwrap_or(""),
            revision: r
                .metadata
                .generation
                .map(|g| format!("g{g}"))
                .or_else(|| r.metadata.resource_version.clone())
                .unwrap_or_default(),
            created: r
                .metadata
                .creation_timestamp
                .as_ref()
                .map(|t| format!("{:020}", t.0.as_nanosecond())),
            spec: &r.spec.route,
        })
        .collect()
}

/// [`RefLookup`] over the Service and Secret caches.
#[derive(Clone)]
pub struct StoreLookup {
    /// Services.
    pub services: Store<Service>,
    /// Secrets.
    pub secrets: Store<Secret>,
}

impl std::fmt::Debug for StoreLookup {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StoreLookup").finish_non_exhaustive()
    }
}

impl RefLookup for StoreLookup {
    fn service_ports(&self, namespace: &str, name: &str) -> Option<Vec<u16>> {
        let service = self.services.get(&ObjectRef::new(name).within(namespace))?;
        Some(
            service
                .spec
                .as_ref()
                .and_then(|s| s.ports.as_ref())
                .map(|ports| ports.iter().filter_map(|p| u16::try_from(p.port).ok()).collect())
                .unwrap_or_default(),
        )
    }

    fn secret_value(&self, namespace: &str, name: &str, key: &str) -> Result<Vec<u8>, String> {
        let secret = self
            .secrets
            .get(&ObjectRef::new(name).within(namespace))
            .ok_or_else(|| format!("Secret {namespace}/{name} not found"))?;
        secret
            .data
            .as_ref()
            .and_then(|d| d.get(key))
            .map(|v| v.0.clone())
            .ok_or_else(|| format!("Secret {namespace}/{name} has no key {key}"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::controller::crd::WebSocketRouteSpec;
    use crate::controller::evaluate::{GATEWAY_LABEL, INGRESS_VALUE};

    struct Refs;
    impl RefLookup for Refs {
        fn service_ports(&self, _: &str, _: &str) -> Option<Vec<u16>> {
            None
        }
        fn secret_value(&self, namespace: &str, name: &str, key: &str) -> Result<Vec<u8>, String> {
            if (namespace, name, key) == ("apps", "grip", "key") {
                Ok(b"s3cret".to_vec())
            } else {
                Err("missing".into())
            }
        }
    }

    fn route(ns: &str, name: &str, ts: i64, yaml: &str) -> Arc<WebSocketRoute> {
        let spec: WebSocketRouteSpec = serde_yaml::from_str(yaml).expect("spec");
        let mut r = WebSocketRoute::new(name, spec);
        r.metadata.namespace = Some(ns.into());
        r.metadata.uid = Some(format!("{ns}-{name}"));
        r.metadata.generation = Some(1);
        r.metadata.creation_timestamp = Some(k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(
            k8s_openapi::jiff::Timestamp::from_second(ts).expect("ts"),
        ));
        Arc::new(r)
    }

    #[test]
    fn gateways_get_only_their_routes_and_only_the_key_material_those_use() {
        let routes = vec![
            route(
                "apps",
                "chat",
                1,
                "backend: {service: {name: chat, port: 80}}\nworkloadSelector: {app: chat}\ngrip: {signingKey: {secretRef: {name: grip, key: key}}}",
            ),
            route(
                "apps",
                "feed",
                2,
                "backend: {port: 8080}\nworkloadSelector: {app: feed}",
            ),
            route(
                "apps",
                "nokey",
                3,
                "backend: {port: 8081}\nworkloadSelector: {app: chat}\nmatch: {pathPrefixes: [/x]}\ngrip: {signingKey: {secretRef: {name: gone, key: key}}}",
            ),
            route(
                "edge",
                "public",
                4,
                "backend: {url: 'http://chat.apps.svc:80'}\nmatch: {hostnames: [chat.example.com]}",
            ),
            route("apps", "late", 5, "backend: {port: 1}\nworkloadSelector: {tier: web}"),
        ];
        let compiled = Compiled::build(&routes, &Validator::new(), &Refs);
        let keys: Vec<String> = compiled.routes.iter().map(|r| r.key.to_string()).collect();
        // nokey: Secret missing, not served; late: conflicts with chat (both "/" for pods that
        // could carry app=chat and tier=web).
        assert_eq!(keys, ["apps/chat", "apps/feed", "edge/public"]);

        let chat_pod: BTreeMap<String, String> = [("app".to_string(), "chat".to_string())].into();
        let snap = compiled.snapshot_for("apps", &chat_pod);
        assert_eq!(snap.routes.len(), 1);
        assert_eq!(snap.routes[0].name, "chat");
        assert_eq!(snap.routes[0].backend_url, "http://chat.apps.svc:80");
        assert_eq!(snap.routes[0].secrets, [SecretMaterial::new("grip", "key", b"s3cret")]);
        assert!(compiled.snapshot_for("other", &chat_pod).routes.is_empty());

        let feed_pod: BTreeMap<String, String> = [("app".to_string(), "feed".to_string())].into();
        let feed = compiled.snapshot_for("apps", &feed_pod);
        assert_eq!(feed.routes.len(), 1);
        assert!(feed.routes[0].secrets.is_empty());
        assert_ne!(feed.version, snap.version);

        let ingress: BTreeMap<String, String> = [(GATEWAY_LABEL.to_string(), INGRESS_VALUE.to_string())].into();
        let edge = compiled.snapshot_for("wsgate-system", &ingress);
        assert_eq!(edge.routes.len(), 1);
        assert_eq!(edge.routes[0].name, "public");
        // Same content, same version.
        assert_eq!(compiled.snapshot_for("wsgate-system", &ingress), edge);
        edge.compile().expect("the gateway can compile it");
        snap.compile().expect("the gateway can compile it");
    }

    #[test]
    fn routes_being_deleted_are_not_served() {
        let mut r = (*route("apps", "gone", 1, "backend: {port: 1}")).clone();
        r.metadata.deletion_timestamp = r.metadata.creation_timestamp.clone();
        let compiled = Compiled::build(&[Arc::new(r)], &Validator::new(), &Refs);
        assert!(compiled.routes.is_empty());
    }
}
