//! The `WebSocketRoute` custom resource: Rust types, status conditions and the generated
//! `CustomResourceDefinition`.
//!
//! The spec *is* the routes-file model: [`WebSocketRouteSpec`] flattens a
//! [`RouteSpec`] (which already carries `workloadSelector`), and the
//! CRD's `spec` schema is [`route_spec_schema`], so a route
//! file entry and a `WebSocketRoute` spec are checked by the same rules. The status schema is
//! written here by hand so its list-map markers are exact.
//!
//! The CRD targets `apiextensions.k8s.io/v1` as served by Kubernetes 1.20 and later: a
//! structural schema, validation by `type`/`enum`/`minimum`/`maximum`/`pattern` only (no
//! `x-kubernetes-validations`: CEL needs 1.25), the status subresource, printer columns.

use std::collections::BTreeMap;

use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::{
    CustomResourceDefinition, CustomResourceValidation, JSONSchemaProps,
};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition;
use kube::{CustomResource, CustomResourceExt};
use serde::{Deserialize, Serialize};
use serde_json::{Value as Json, json};

use crate::config::{RouteSpec, route_spec_schema};

/// The API group of wsgate's resources.
pub const GROUP: &str = "wsgate.io";
/// The field manager of every write the controller makes.
pub const FIELD_MANAGER: &str = "wsgate";

/// Condition type: the spec is valid and the route is not in conflict with an older one.
pub const CONDITION_ACCEPTED: &str = "Accepted";
/// Condition type: every referenced Service and Secret exists.
pub const CONDITION_RESOLVED_REFS: &str = "ResolvedRefs";

/// Condition reasons (Gateway API style).
pub mod reason {
    /// `Accepted=True`.
    pub const ACCEPTED: &str = "Accepted";
    /// `Accepted=False`: the spec fails validation.
    pub const INVALID: &str = "Invalid";
    /// `Accepted=False`: an older route already serves the same host and path prefix for the
    /// same workloads.
    pub const CONFLICTED: &str = "Conflicted";
    /// `ResolvedRefs=True`.
    pub const RESOLVED_REFS: &str = "ResolvedRefs";
    /// `ResolvedRefs=False`: the backend Service (or its port) does not exist.
    pub const BACKEND_NOT_FOUND: &str = "BackendNotFound";
    /// `ResolvedRefs=False`: a referenced Secret (or its key) does not exist.
    pub const SECRET_NOT_FOUND: &str = "SecretNotFound";
}

/// The spec of a `WebSocketRoute`: exactly the routes-file [`RouteSpec`].
#[derive(CustomResource, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[kube(
    group = "wsgate.io",
    version = "v1alpha1",
    kind = "WebSocketRoute",
    plural = "websocketroutes",
    namespaced,
    status = "WebSocketRouteStatus",
    shortname = "wsr",
    schema = "disabled",
    derive = "PartialEq",
    doc = "A WebSocket route served by wsgate gateways: which requests it matches, where their \
           WebSocket-over-HTTP requests go, and the session's limits.",
    printcolumn = r#"{"name":"Hosts","type":"string","jsonPath":".spec.match.hostnames","description":"Host names served (empty: any)"}"#,
    printcolumn = r#"{"name":"Backend","type":"string","jsonPath":".status.backend","description":"Resolved backend URL"}"#,
    printcolumn = r#"{"name":"Accepted","type":"string","jsonPath":".status.conditions[?(@.type==\"Accepted\")].status"}"#,
    printcolumn = r#"{"name":"Gateways","type":"integer","jsonPath":".status.gateways","description":"Gateways serving the route"}"#,
    printcolumn = r#"{"name":"Age","type":"date","jsonPath":".metadata.creationTimestamp"}"#
)]
pub struct WebSocketRouteSpec {
    /// The route, with the same fields as a routes-file entry (without `name`).
    #[serde(flatten)]
    pub route: RouteSpec,
}

/// What the controller last observed about a route.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct WebSocketRouteStatus {
    /// The `metadata.generation` these conditions describe.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// `Accepted` and `ResolvedRefs`, keyed by `type`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub conditions: Vec<Condition>,
    /// The backend URL requests go to (`http://NAME.NAMESPACE.svc:PORT` for a Service).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub backend: Option<String>,
    /// How many gateways connected to the controller serve this route.
    #[serde(default)]
    pub gateways: u32,
}

impl WebSocketRouteStatus {
    /// The condition of type `type_`, if present.
    pub fn condition(&self, type_: &str) -> Option<&Condition> {
        self.conditions.iter().find(|c| c.type_ == type_)
    }
}

/// The structural schema of [`WebSocketRouteStatus`].
fn status_schema() -> Json {
    let condition = json!({
        "type": "object",
        "description": "A condition in the style of metav1.Condition.",
        "required": ["type", "status", "lastTransitionTime", "reason", "message"],
        "properties": {
            "type": {"type": "string", "description": "Accepted or ResolvedRefs.", "maxLength": 316},
            "status": {"type": "string", "enum": ["True", "False", "Unknown"]},
            "observedGeneration": {"type": "integer", "format": "int64", "minimum": 0},
            "lastTransitionTime": {"type": "string", "format": "date-time"},
            "reason": {"type": "string", "maxLength": 1024, "minLength": 1,
                       "pattern": "^[A-Za-z]([A-Za-z0-9_,:]*[A-Za-z0-9_])?$"},
            "message": {"type": "string", "maxLength": 32768}
        }
    });
    json!({
        "type": "object",
        "description": "What the controller last observed about the route.",
        "properties": {
            "observedGeneration": {
                "type": "integer", "format": "int64", "minimum": 0,
                "description": "The metadata.generation the conditions describe."
            },
            "conditions": {
                "type": "array",
                "description": "Accepted and ResolvedRefs (Gateway API reasons).",
                "maxItems": 8,
                "items": condition,
                "x-kubernetes-list-type": "map",
                "x-kubernetes-list-map-keys": ["type"]
            },
            "backend": {"type": "string", "description": "The backend URL requests go to."},
            "gateways": {
                "type": "integer", "format": "int32", "minimum": 0,
                "description": "Gateways connected to the controller that serve this route."
            }
        }
    })
}

/// The `openAPIV3Schema` of the CRD: `spec` from the route model, `status` written here (with
/// `conditions` as a list map keyed by `type`).
pub fn open_api_schema() -> Json {
    let mut spec = route_spec_schema();
    if let Json::Object(map) = &mut spec {
        map.insert(
            "description".into(),
            "The route: the same fields as an entry of a routes file, without its name.".into(),
        );
    }
    json!({
        "type": "object",
        "description": "A WebSocket route served by wsgate gateways.",
        "required": ["spec"],
        "properties": {
            "apiVersion": {"type": "string"},
            "kind": {"type": "string"},
            "metadata": {"type": "object"},
            "spec": spec,
            "status": status_schema()
        }
    })
}

/// The `CustomResourceDefinition` of `WebSocketRoute`.
///
/// # Errors
///
/// Only if the generated schema does not fit `JSONSchemaProps` (a bug, caught by tests).
pub fn crd() -> Result<CustomResourceDefinition, serde_json::Error> {
    let mut crd = WebSocketRoute::crd();
    let schema: JSONSchemaProps = serde_json::from_value(open_api_schema())?;
    for version in &mut crd.spec.versions {
        version.schema = Some(CustomResourceValidation {
            open_api_v3_schema: Some(schema.clone()),
        });
    }
    let labels = crd.metadata.labels.get_or_insert_with(BTreeMap::new);
    labels.insert("app.kubernetes.io/part-of".into(), "wsgate".into());
    Ok(crd)
}

/// The CRD as YAML, as `wsgate crd` prints it and `crds/wsgate.io_websocketroutes.yaml`
/// holds it.
pub fn crd_yaml() -> String {
    let crd = match crd() {
        Ok(crd) => crd,
        // The schema is built from static types; tests cover this path never being taken.
        Err(e) => return format!("# error: the CRD schema does not serialize: {e}\n"),
    };
    match serde_yaml::to_string(&crd) {
        Ok(yaml) => yaml,
        Err(e) => format!("# error: the CRD does not serialize: {e}\n"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Asserts the structural-schema rules the API server enforces, recursively: every node
    /// has one concrete type (or `x-kubernetes-int-or-string`), no `$ref`, no `properties`
    /// together with `additionalProperties`, arrays have `items`, and nothing under
    /// `allOf`/`anyOf`/`oneOf`/`not` carries types, descriptions, defaults or nested
    /// properties the structure doesn't already declare (we forbid the combinators outright).
    fn assert_structural(node: &Json, path: &str, problems: &mut Vec<String>) {
        let Some(map) = node.as_object() else {
            problems.push(format!("{path}: schema is not an object"));
            return;
        };
        for forbidden in [
            "$ref",
            "allOf",
            "anyOf",
            "oneOf",
            "not",
            "x-kubernetes-validations",
            "definitions",
        ] {
            if map.contains_key(forbidden) {
                problems.push(format!("{path}: {forbidden} is not allowed"));
            }
        }
        let ty = map.get("type").and_then(Json::as_str);
        let int_or_string = map.get("x-kubernetes-int-or-string") == Some(&Json::Bool(true));
        if !int_or_string
            && !matches!(
                ty,
                Some("object" | "array" | "string" | "integer" | "number" | "boolean")
            )
        {
            problems.push(format!("{path}: needs one concrete type, got {:?}", map.get("type")));
        }
        if map.contains_key("properties") && map.contains_key("additionalProperties") {
            problems.push(format!("{path}: properties and additionalProperties together"));
        }
        if map.get("additionalProperties").is_some_and(|a| !a.is_object()) {
            problems.push(format!("{path}: additionalProperties must be a schema"));
        }
        if ty == Some("object") && map.contains_key("default") {
            problems.push(format!("{path}: object defaults are not allowed here"));
        }
        if let Some(keys) = map.get("x-kubernetes-list-map-keys").and_then(Json::as_array) {
            let required: Vec<&str> = map["items"]["required"]
                .as_array()
                .map(|r| r.iter().filter_map(Json::as_str).collect())
                .unwrap_or_default();
            for key in keys.iter().filter_map(Json::as_str) {
                if !required.contains(&key) {
                    problems.push(format!("{path}: list-map key {key} must be required"));
                }
            }
            if map.get("x-kubernetes-list-type").and_then(Json::as_str) != Some("map") {
                problems.push(format!("{path}: list-map keys without x-kubernetes-list-type: map"));
            }
        }
        if let Some(props) = map.get("properties").and_then(Json::as_object) {
            for (name, child) in props {
                assert_structural(child, &format!("{path}.{name}"), problems);
            }
        }
        if let Some(additional) = map.get("additionalProperties").filter(|a| a.is_object()) {
            assert_structural(additional, &format!("{path}[*]"), problems);
        }
        if ty == Some("array") {
            match map.get("items") {
                Some(items) => assert_structural(items, &format!("{path}[]"), problems),
                None => problems.push(format!("{path}: array without items")),
            }
        }
    }

    #[test]
    fn the_crd_schema_is_structural() {
        let crd = crd().expect("crd");
        let version = &crd.spec.versions[0];
        let schema = serde_json::to_value(
            version
                .schema
                .as_ref()
                .and_then(|s| s.open_api_v3_schema.as_ref())
                .expect("schema"),
        )
        .expect("json");
        let mut problems = Vec::new();
        assert_structural(&schema, "", &mut problems);
        assert!(problems.is_empty(), "{problems:#?}");
        // metadata may only be `type: object` at the root.
        assert_eq!(schema["properties"]["metadata"], json!({"type": "object"}));
    }

    #[test]
    fn the_structural_check_can_fail() {
        let bad = json!({"type": "object", "properties": {
            "a": {"anyOf": [{"type": "string"}]},
            "b": {"type": "object", "properties": {}, "additionalProperties": {"type": "string"}},
            "c": {"type": "array"},
            "d": {"$ref": "#/x"}
        }});
        let mut problems = Vec::new();
        assert_structural(&bad, "", &mut problems);
        assert_eq!(problems.len(), 6, "{problems:#?}");
    }

    #[test]
    fn the_crd_has_names_columns_status_and_list_map_conditions() {
        let crd = crd().expect("crd");
        assert_eq!(crd.metadata.name.as_deref(), Some("websocketroutes.wsgate.io"));
        assert_eq!(crd.spec.group, GROUP);
        assert_eq!(crd.spec.scope, "Namespaced");
        assert_eq!(crd.spec.names.kind, "WebSocketRoute");
        assert_eq!(crd.spec.names.short_names, Some(vec!["wsr".to_owned()]));
        let version = &crd.spec.versions[0];
        assert_eq!(version.name, "v1alpha1");
        assert!(version.served && version.storage);
        assert!(version.subresources.as_ref().and_then(|s| s.status.as_ref()).is_some());
        let columns: Vec<&str> = version
            .additional_printer_columns
            .as_ref()
            .expect("columns")
            .iter()
            .map(|c| c.name.as_str())
            .collect();
        assert_eq!(columns, ["Hosts", "Backend", "Accepted", "Gateways", "Age"]);
        let schema = open_api_schema();
        let conditions = &schema["properties"]["status"]["properties"]["conditions"];
        assert_eq!(conditions["x-kubernetes-list-type"], "map");
        assert_eq!(conditions["x-kubernetes-list-map-keys"], json!(["type"]));
        assert_eq!(schema["properties"]["spec"]["required"], json!(["backend"]));
        assert_eq!(
            schema["properties"]["spec"]["properties"]["backend"]["properties"]["port"]["maximum"],
            65535
        );
    }

    #[test]
    fn the_yaml_round_trips_and_has_no_error_marker() {
        let yaml = crd_yaml();
        assert!(!yaml.starts_with("# error"), "{yaml}");
        let back: CustomResourceDefinition = serde_yaml::from_str(&yaml).expect("parse");
        assert_eq!(back, crd().expect("crd"));
        assert!(yaml.contains("apiVersion: apiextensions.k8s.io/v1"));
    }

    #[test]
    fn the_spec_serializes_flat() {
        let spec: WebSocketRouteSpec = serde_json::from_value(json!({
            "match": {"hostnames": ["chat.example.com"]},
            "backend": {"service": {"name": "chat", "port": 8080}},
            "workloadSelector": {"app": "chat"}
        }))
        .expect("spec");
        assert_eq!(spec.route.matcher.hostnames, ["chat.example.com"]);
        assert_eq!(spec.route.workload_selector["app"], "chat");
        let back = serde_json::to_value(&spec).expect("json");
        assert_eq!(back["backend"]["service"]["port"], 8080);
        assert!(back.get("route").is_none());
    }
}
