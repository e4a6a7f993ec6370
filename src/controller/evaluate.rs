//! Pure evaluation of the cluster's routes: validation, reference checks and conflicts.
//!
//! Nothing here talks to the API server: the reconciler (for status) and the snapshot compiler
//! (for what gateways get) both call [`Validator::evaluate`] over what the caches hold and
//! [`check_refs`] over a [`RefLookup`], so they always agree on which routes are served.
//!
//! # Rules
//!
//! - A spec is valid when [`Route::compile`] accepts it (with a resolver that records the
//!   Secret references instead of reading them) and it uses no gateway-local source
//!   (`signingKey.env`/`file`, `backend.caFile`: a cluster-wide object must not depend on one
//!   pod's environment or files).
//! - Scope: a route with a `workloadSelector` applies to the sidecar gateways *in its own
//!   namespace* whose pod labels include every selector label; a route without one applies to
//!   every ingress gateway (pods labelled `wsgate.io/gateway=ingress`) in any namespace.
//! - Conflicts: two valid routes conflict when their scopes can reach the same gateway (both
//!   ingress; or sidecar routes of one namespace whose selectors don't disagree on a label) and
//!   they claim the same (host pattern, path prefix). The older route (creation time, then
//!   `namespace/name`) wins; the newer one is `Conflicted` and served nowhere. Routes are
//!   considered oldest first and a conflicted route claims nothing, so it never blocks a third.

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::sync::{Arc, Mutex};

use crate::config::{CompileContext, FieldError, HostMatch, Route, RouteSpec, SecretResolver};

/// The label that marks a pod as an ingress gateway (value [`INGRESS_VALUE`]).
pub const GATEWAY_LABEL: &str = "wsgate.io/gateway";
/// The value of [`GATEWAY_LABEL`] for ingress gateways.
pub const INGRESS_VALUE: &str = "ingress";

/// A route's identity: namespace and name.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct RouteKey {
    /// Namespace.
    pub namespace: String,
    /// Name.
    pub name: String,
}

impl RouteKey {
    /// A key.
    pub fn new(namespace: impl Into<String>, name: impl Into<String>) -> Self {
        Self {
            namespace: namespace.into(),
            name: name.into(),
        }
    }
}

impl fmt::Display for RouteKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.namespace, self.name)
    }
}

/// Which gateways a route applies to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Scope {
    /// Every ingress gateway, whatever its namespace.
    Ingress,
    /// Sidecars in `namespace` whose labels include all of `selector` (never empty).
    Workloads {
        /// The route's namespace.
        namespace: String,
        /// Required pod labels.
        selector: BTreeMap<String, String>,
    },
}

impl Scope {
    /// Whether some gateway could be in both scopes.
    pub fn overlaps(&self, other: &Scope) -> bool {
        match (self, other) {
            (Scope::Ingress, Scope::Ingress) => true,
            (
                Scope::Workloads { namespace, selector },
                Scope::Workloads {
                    namespace: other_ns,
                    selector: other_sel,
                },
            ) => {
                namespace == other_ns
                    && selector
                        .iter()
                        .all(|(k, v)| other_sel.get(k).is_none_or(|other_v| other_v == v))
            }
            _ => false,
        }
    }

    /// Whether a gateway pod in `namespace` with `labels` is in scope.
    pub fn applies_to(&self, namespace: &str, labels: &BTreeMap<String, String>) -> bool {
        let ingress = labels.get(GATEWAY_LABEL).map(String::as_str) == Some(INGRESS_VALUE);
        match self {
            Scope::Ingress => ingress,
            Scope::Workloads {
                namespace: ns,
                selector,
            } => !ingress && ns == namespace && selector.iter().all(|(k, v)| labels.get(k) == Some(v)),
        }
    }
}

/// A Service port a route's backend points at.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct ServiceTarget {
    /// Namespace (the route's when the spec leaves it out).
    pub namespace: String,
    /// Service name.
    pub name: String,
    /// Port.
    pub port: u16,
}

/// A key of a Secret a route reads.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SecretTarget {
    /// Namespace (always the route's).
    pub namespace: String,
    /// Secret name.
    pub name: String,
    /// Key in `data`.
    pub key: String,
}

/// A (host pattern or any host, path prefix) pair a route serves.
pub type Claim = (Option<HostMatch>, String);

/// What a valid spec needs and claims.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Validated {
    /// Where the route applies.
    pub scope: Scope,
    /// (host pattern or any host, path prefix) pairs it serves.
    pub claims: Vec<Claim>,
    /// The backend Service, if it uses one.
    pub service: Option<ServiceTarget>,
    /// Secret keys it reads.
    pub secrets: Vec<SecretTarget>,
    /// The backend base URL (`http://chat.default.svc:8080`).
    pub backend_url: String,
}

/// The outcome of evaluating one route among all routes.
#[derive(Debug, Clone, PartialEq)]
pub enum Verdict {
    /// The spec is invalid; every problem, paths under `spec`.
    Invalid(Vec<FieldError>),
    /// An older route serves a claim of this one for an overlapping scope.
    Conflicted {
        /// The route that wins.
        winner: RouteKey,
        /// The claim both make, as text (`host "a.example.com" with path prefix "/ws"`).
        claim: String,
        /// The (valid) spec's details.
        validated: Arc<Validated>,
    },
    /// Valid and not in conflict.
    Accepted(Arc<Validated>),
}

/// One route as the caches hold it.
#[derive(Debug, Clone)]
pub struct RouteInput<'a> {
    /// Namespace and name.
    pub key: RouteKey,
    /// `metadata.uid`.
    pub uid: &'a str,
    /// `metadata.generation` (or, lacking it, `metadata.resourceVersion`): the cache key of
    /// the validation result.
    pub revision: String,
    /// `metadata.creationTimestamp` as RFC 3339 text (sorts chronologically); `None` sorts last.
    pub created: Option<String>,
    /// The spec.
    pub spec: &'a RouteSpec,
}

type Validation = Arc<Result<Arc<Validated>, Vec<FieldError>>>;

/// Validates routes, remembering each result per (uid, revision) so re-evaluating an unchanged
/// route costs a lookup.
#[derive(Debug, Default)]
pub struct Validator {
    cache: Mutex<HashMap<RouteKey, (String, String, Validation)>>,
}

impl Validator {
    /// A validator with an empty cache.
    pub fn new() -> Self {
        Self::default()
    }

    /// The verdict of every route, judged together (conflicts need all of them). The cache
    /// forgets routes not in `routes`.
    pub fn evaluate(&self, routes: &[RouteInput<'_>]) -> BTreeMap<RouteKey, Verdict> {
        let validations: Vec<Validation> = {
            // A poisoned lock only means another evaluation panicked mid-insert; the cache
            // holds whole entries, so it is still consistent.
            let mut cache = self.cache.lock().unwrap_or_else(|e| e.into_inner());
            let results = routes
                .iter()
                .map(|r| match cache.get(&r.key) {
                    Some((uid, revision, v)) if uid == r.uid && *revision == r.revision => v.clone(),
                    _ => {
                        let v: Validation = Arc::new(validate(&r.key, r.spec).map(Arc::new));
                        cache.insert(r.key.clone(), (r.uid.to_owned(), r.revision.clone(), v.clone()));
                        v
                    }
                })
                .collect();
            if cache.len() > routes.len() {
                let live: std::collections::HashSet<&RouteKey> = routes.iter().map(|r| &r.key).collect();
                cache.retain(|k, _| live.contains(k));
            }
            results
        };
        let mut order: Vec<usize> = (0..routes.len()).collect();
        order.sort_by(|a, b| {
            let (a, b) = (&routes[*a], &routes[*b]);
            let created = match (&a.created, &b.created) {
                (Some(x), Some(y)) => x.cmp(y),
                (Some(_), None) => std::cmp::Ordering::Less,
                (None, Some(_)) => std::cmp::Ordering::Greater,
                (None, None) => std::cmp::Ordering::Equal,
            };
            created.then_with(|| a.key.cmp(&b.key))
        });
        let mut claimed: HashMap<Claim, Vec<(usize, Arc<Validated>)>> = HashMap::new();
        let mut verdicts = BTreeMap::new();
        for index in order {
            let route = &routes[index];
            let validated = match validations[index].as_ref() {
                Err(errors) => {
                    verdicts.insert(route.key.clone(), Verdict::Invalid(errors.clone()));
                    continue;
                }
                Ok(v) => v.clone(),
            };
            let conflict = validated.claims.iter().find_map(|claim| {
                claimed.get(claim).and_then(|holders| {
                    holders
                        .iter()
                        .find(|(_, other)| other.scope.overlaps(&validated.scope))
                        .map(|(winner, _)| (routes[*winner].key.clone(), describe_claim(claim)))
                })
            });
            if let Some((winner, claim)) = conflict {
                verdicts.insert(
                    route.key.clone(),
                    Verdict::Conflicted {
                        winner,
                        claim,
                        validated,
                    },
                );
                continue;
            }
            for claim in &validated.claims {
                claimed
                    .entry(claim.clone())
                    .or_default()
                    .push((index, validated.clone()));
            }
            verdicts.insert(route.key.clone(), Verdict::Accepted(validated));
        }
        verdicts
    }
}

fn describe_claim((host, prefix): &Claim) -> String {
    match host {
        Some(host) => format!("host {:?} with path prefix {prefix:?}", host.to_string()),
        None => format!("any host with path prefix {prefix:?}"),
    }
}

/// The placeholder key handed to [`Route::compile`] while validating: validation checks the
/// spec; whether the Secret exists is [`check_refs`]'s business.
const PLACEHOLDER_KEY: &[u8] = b"wsgate-validation-placeholder";

/// Records the Secret keys a spec asks for.
struct RecordingResolver {
    seen: Mutex<Vec<SecretTarget>>,
}

impl SecretResolver for RecordingResolver {
    fn resolve(&self, namespace: &str, name: &str, key: &str) -> Result<Vec<u8>, String> {
        if name.is_empty() || key.is_empty() {
            return Err("name and key must not be empty".to_owned());
        }
        self.seen.lock().unwrap_or_else(|e| e.into_inner()).push(SecretTarget {
            namespace: namespace.to_owned(),
            name: name.to_owned(),
            key: key.to_owned(),
        });
        Ok(PLACEHOLDER_KEY.to_vec())
    }
}

fn no_env(_: &str) -> Option<String> {
    None
}

/// Validates one spec: everything [`Route::compile`] checks, plus the Kubernetes-only rules.
/// Paths of the errors start with `spec.`.
///
/// # Errors
///
/// Every problem found.
pub fn validate(key: &RouteKey, spec: &RouteSpec) -> Result<Validated, Vec<FieldError>> {
    let mut errors = Vec::new();
    if let Some(signing) = &spec.grip.signing_key {
        if signing.env.is_some() {
            errors.push(FieldError::new(
                "grip.signingKey.env",
                "not supported in a WebSocketRoute (it would depend on each gateway's environment); use secretRef",
            ));
        }
        if signing.file.is_some() {
            errors.push(FieldError::new(
                "grip.signingKey.file",
                "not supported in a WebSocketRoute (it would depend on each gateway's files); use secretRef",
            ));
        }
    }
    if spec.backend.ca_file.is_some() {
        errors.push(FieldError::new(
            "backend.caFile",
            "not supported in a WebSocketRoute (it would depend on each gateway's files)",
        ));
    }
    for (label, value) in &spec.workload_selector {
        if label.is_empty() || label.len() > 317 || value.len() > 63 {
            errors.push(FieldError::new(
                format!("workloadSelector[{label:?}]"),
                "not a valid label (key at most 317 characters, value at most 63)",
            ));
        }
    }
    let resolver = RecordingResolver {
        seen: Mutex::new(Vec::new()),
    };
    let ctx = CompileContext {
        namespace: &key.namespace,
        env: &no_env,
        secrets: Some(&resolver),
        base_dir: None,
    };
    let compiled = Route::compile(&key.to_string(), &without_local_key_sources(spec), &ctx);
    let route = match compiled {
        Ok(route) if errors.is_empty() => route,
        Ok(_) => return Err(prefixed(errors)),
        Err(more) => {
            errors.extend(more);
            return Err(prefixed(errors));
        }
    };
    let scope = if spec.workload_selector.is_empty() {
        Scope::Ingress
    } else {
        Scope::Workloads {
            namespace: key.namespace.clone(),
            selector: spec.workload_selector.clone(),
        }
    };
    let hosts: Vec<Option<HostMatch>> = if route.matcher.hostnames.is_empty() {
        vec![None]
    } else {
        route.matcher.hostnames.iter().cloned().map(Some).collect()
    };
    let claims = hosts
        .iter()
        .flat_map(|h| route.matcher.path_prefixes.iter().map(move |p| (h.clone(), p.clone())))
        .collect();
    let service = spec.backend.service.as_ref().map(|s| ServiceTarget {
        namespace: s.namespace.clone().unwrap_or_else(|| key.namespace.clone()),
        name: s.name.clone(),
        port: s.port,
    });
    let mut secrets = resolver.seen.into_inner().unwrap_or_else(|e| e.into_inner());
    secrets.sort();
    secrets.dedup();
    let backend = &route.backend;
    Ok(Validated {
        scope,
        claims,
        service,
        secrets,
        backend_url: format!("{}://{}{}", backend.scheme, backend.authority, backend.base_path),
    })
}

fn prefixed(errors: Vec<FieldError>) -> Vec<FieldError> {
    errors.into_iter().map(|e| e.prefixed("spec")).collect()
}

/// A view of the Services and Secrets the caches hold.
pub trait RefLookup {
    /// The ports of Service `name` in `namespace`, or `None` if it does not exist.
    fn service_ports(&self, namespace: &str, name: &str) -> Option<Vec<u16>>;
    /// The value of `key` in Secret `name` of `namespace`: `Err` says what is missing.
    ///
    /// # Errors
    ///
    /// The Secret or the key is missing.
    fn secret_value(&self, namespace: &str, name: &str, key: &str) -> Result<Vec<u8>, String>;
}

/// Why references don't resolve.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RefProblem {
    /// The Service (or its port) is missing.
    BackendNotFound(String),
    /// A Secret (or its key) is missing.
    SecretNotFound(String),
}

/// Checks a valid route's references.
///
/// # Errors
///
/// The first missing Service, else the first missing Secret key.
pub fn check_refs(validated: &Validated, lookup: &dyn RefLookup) -> Result<(), RefProblem> {
    if let Some(service) = &validated.service {
        match lookup.service_ports(&service.namespace, &service.name) {
            None => {
                return Err(RefProblem::BackendNotFound(format!(
                    "Service {}/{} not found",
                    service.namespace, service.name
                )));
            }
            Some(ports) if !ports.contains(&service.port) => {
                return Err(RefProblem::BackendNotFound(format!(
                    "Service {}/{} has no port {}",
                    service.namespace, service.name, service.port
                )));
            }
            Some(_) => {}
        }
    }
    for secret in &validated.secrets {
        match lookup.secret_value(&secret.namespace, &secret.name, &secret.key) {
            Ok(value) if value.is_empty() => {
                return Err(RefProblem::SecretNotFound(format!(
                    "key {} of Secret {}/{} is empty",
                    secret.key, secret.namespace, secret.name
                )));
            }
            Ok(_) => {}
            Err(reason) => {
                return Err(RefProblem::SecretNotFound(format!(
                    "spec.grip.signingKey.secretRef: {reason}"
                )));
            }
        }
    }
    Ok(())
}

/// The spec with `signingKey.env`/`file` replaced by a placeholder `value` and without
/// `backend.caFile`: those are reported as errors by [`validate`], and compiling must never read
/// the controller's own environment or files.
fn without_local_key_sources(spec: &RouteSpec) -> std::borrow::Cow<'_, RouteSpec> {
    let local = spec
        .grip
        .signing_key
        .as_ref()
        .is_some_and(|k| k.env.is_some() || k.file.is_some());
    if !local && spec.backend.ca_file.is_none() {
        return std::borrow::Cow::Borrowed(spec);
    }
    let mut spec = spec.clone();
    spec.backend.ca_file = None;
    if let Some(signing) = &mut spec.grip.signing_key {
        signing.env = None;
        signing.file = None;
        if signing.value.is_none() && signing.secret_ref.is_none() {
            signing.value = Some("placeholder".to_owned());
        }
    }
    std::borrow::Cow::Owned(spec)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::model::{BackendSpec, MatchSpec, SecretKeyRef, ServiceRef, SigningKeySpec};

    fn spec(hosts: &[&str], prefixes: &[&str]) -> RouteSpec {
        let yaml = "backend: {url: 'http://127.0.0.1:9'}";
        let mut spec: RouteSpec = serde_yaml::from_str(yaml).unwrap();
        spec.matcher = MatchSpec {
            hostnames: hosts.iter().map(|s| s.to_string()).collect(),
            path_prefixes: prefixes.iter().map(|s| s.to_string()).collect(),
        };
        spec
    }

    fn input<'a>(ns: &str, name: &str, created: &str, spec: &'a RouteSpec) -> RouteInput<'a> {
        RouteInput {
            key: RouteKey::new(ns, name),
            uid: "uid",
            revision: "1".into(),
            created: Some(created.into()),
            spec,
        }
    }

    #[test]
    fn scopes_overlap_only_when_a_gateway_could_get_both() {
        let w = |ns: &str, pairs: &[(&str, &str)]| Scope::Workloads {
            namespace: ns.into(),
            selector: pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect(),
        };
        assert!(Scope::Ingress.overlaps(&Scope::Ingress));
        assert!(!Scope::Ingress.overlaps(&w("a", &[("app", "x")])));
        assert!(w("a", &[("app", "x")]).overlaps(&w("a", &[("tier", "y")])));
        assert!(!w("a", &[("app", "x")]).overlaps(&w("a", &[("app", "y")])));
        assert!(!w("a", &[("app", "x")]).overlaps(&w("b", &[("app", "x")])));
        let labels: BTreeMap<String, String> = [("app".to_string(), "x".to_string())].into();
        assert!(w("a", &[("app", "x")]).applies_to("a", &labels));
        assert!(!w("a", &[("app", "x")]).applies_to("b", &labels));
        assert!(!Scope::Ingress.applies_to("a", &labels));
        let ingress: BTreeMap<String, String> = [(GATEWAY_LABEL.to_string(), INGRESS_VALUE.to_string())].into();
        assert!(Scope::Ingress.applies_to("anywhere", &ingress));
    }

    #[test]
    fn the_older_route_wins_and_a_conflicted_route_claims_nothing() {
        let a = spec(&["h1.example.com"], &["/ws"]);
        let b = spec(&["h1.example.com", "h2.example.com"], &["/ws"]);
        let c = spec(&["h2.example.com"], &["/ws/"]);
        let routes = [
            input("ns", "c", "2024-01-03T00:00:00Z", &c),
            input("ns", "b", "2024-01-02T00:00:00Z", &b),
            input("other", "a", "2024-01-01T00:00:00Z", &a),
        ];
        let verdicts = Validator::new().evaluate(&routes);
        assert!(matches!(verdicts[&RouteKey::new("other", "a")], Verdict::Accepted(_)));
        match &verdicts[&RouteKey::new("ns", "b")] {
            Verdict::Conflicted { winner, claim, .. } => {
                assert_eq!(winner, &RouteKey::new("other", "a"));
                assert_eq!(claim, "host \"h1.example.com\" with path prefix \"/ws\"");
            }
            other => panic!("{other:?}"),
        }
        assert!(matches!(verdicts[&RouteKey::new("ns", "c")], Verdict::Accepted(_)));
    }

    #[test]
    fn same_claims_in_disjoint_scopes_do_not_conflict_and_ties_break_by_name() {
        let mut x = spec(&[], &["/"]);
        x.workload_selector = [("app".to_string(), "x".to_string())].into();
        let mut y = spec(&[], &["/"]);
        y.workload_selector = [("app".to_string(), "y".to_string())].into();
        let i1 = spec(&[], &["/"]);
        let i2 = spec(&[], &["/"]);
        let t = "2024-01-01T00:00:00Z";
        let routes = [
            input("ns", "x", t, &x),
            input("ns", "y", t, &y),
            input("b", "ingress", t, &i1),
            input("a", "ingress", t, &i2),
        ];
        let verdicts = Validator::new().evaluate(&routes);
        assert!(matches!(verdicts[&RouteKey::new("ns", "x")], Verdict::Accepted(_)));
        assert!(matches!(verdicts[&RouteKey::new("ns", "y")], Verdict::Accepted(_)));
        assert!(matches!(verdicts[&RouteKey::new("a", "ingress")], Verdict::Accepted(_)));
        assert!(matches!(
            &verdicts[&RouteKey::new("b", "ingress")],
            Verdict::Conflicted { winner, .. } if winner == &RouteKey::new("a", "ingress")
        ));
    }

    #[test]
    fn invalid_specs_list_their_fields_and_never_conflict() {
        let mut bad = spec(&["h.example.com"], &["/"]);
        bad.backend.port = Some(8080);
        bad.backend.ca_file = Some("/etc/hostname".into());
        bad.grip.signing_key = Some(SigningKeySpec {
            env: Some("KEY".into()),
            ..SigningKeySpec::default()
        });
        let good = spec(&["h.example.com"], &["/"]);
        let routes = [
            input("ns", "bad", "2024-01-01T00:00:00Z", &bad),
            input("ns", "good", "2024-01-02T00:00:00Z", &good),
        ];
        let verdicts = Validator::new().evaluate(&routes);
        let Verdict::Invalid(errors) = &verdicts[&RouteKey::new("ns", "bad")] else {
            panic!("{verdicts:?}")
        };
        let text: Vec<String> = errors.iter().map(ToString::to_string).collect();
        assert!(
            text.iter()
                .any(|e| e.starts_with("spec.grip.signingKey.env: not supported")),
            "{text:?}"
        );
        assert!(
            text.contains(&"spec.backend: exactly one of url, service or port may be set".to_owned()),
            "{text:?}"
        );
        assert!(
            text.contains(
                &"spec.backend.caFile: not supported in a WebSocketRoute (it would depend on each gateway's files)"
                    .to_owned()
            ),
            "{text:?}"
        );
        assert!(matches!(verdicts[&RouteKey::new("ns", "good")], Verdict::Accepted(_)));
    }

    struct Refs;
    impl RefLookup for Refs {
        fn service_ports(&self, namespace: &str, name: &str) -> Option<Vec<u16>> {
            (namespace == "ns" && name == "chat").then(|| vec![8080])
        }
        fn secret_value(&self, namespace: &str, name: &str, key: &str) -> Result<Vec<u8>, String> {
            if namespace == "ns" && name == "grip" && key == "key" {
                Ok(b"k".to_vec())
            } else {
                Err(format!("Secret {name} not found"))
            }
        }
    }

    #[test]
    fn refs_name_the_missing_service_port_and_secret() {
        let mut s = spec(&[], &["/"]);
        s.backend = BackendSpec {
            service: Some(ServiceRef {
                name: "chat".into(),
                namespace: None,
                port: 8080,
            }),
            ..BackendSpec::default()
        };
        s.grip.signing_key = Some(SigningKeySpec {
            secret_ref: Some(SecretKeyRef {
                name: "grip".into(),
                key: "key".into(),
            }),
            ..SigningKeySpec::default()
        });
        let key = RouteKey::new("ns", "r");
        let v = validate(&key, &s).expect("valid");
        assert_eq!(v.backend_url, "http://chat.ns.svc:8080");
        assert_eq!(
            v.secrets,
            [SecretTarget {
                namespace: "ns".into(),
                name: "grip".into(),
                key: "key".into()
            }]
        );
        assert_eq!(check_refs(&v, &Refs), Ok(()));
        let mut s2 = s.clone();
        if let Some(svc) = &mut s2.backend.service {
            svc.port = 9090;
        }
        let v2 = validate(&key, &s2).expect("valid");
        assert_eq!(
            check_refs(&v2, &Refs),
            Err(RefProblem::BackendNotFound("Service ns/chat has no port 9090".into()))
        );
        let v3 = validate(&RouteKey::new("other", "r"), &s).expect("valid");
        assert!(matches!(check_refs(&v3, &Refs), Err(RefProblem::BackendNotFound(m)) if m.contains("other/chat")));
        if let Some(svc) = &mut s.backend.service {
            svc.namespace = Some("ns".into());
        }
        let v4 = validate(&RouteKey::new("other", "r"), &s).expect("valid");
        // The Service is found in ns/, but Secrets are always read from the route's namespace.
        assert!(
            matches!(check_refs(&v4, &Refs), Err(RefProblem::SecretNotFound(m)) if m.contains("Secret grip not found")),
        );
    }
}
