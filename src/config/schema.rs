//! JSON Schemas of the route model, and the check of a YAML document against them.
//!
//! The schemas are OpenAPI v3 with every subschema inlined and rewritten into a Kubernetes
//! *structural* schema (every node typed, no `$ref`, no `anyOf` between types). The same
//! schema drives the routes-file loader's first pass ([`check_document`]), which reports unknown
//! fields, wrong types, unknown enum values, bad durations and out-of-range numbers, all at
//! once and each with its path, before serde ever sees the document. A routes file and a
//! `WebSocketRoute` are therefore checked by the same rules.

use std::sync::LazyLock;

use schemars::JsonSchema;
use schemars::generate::SchemaSettings;
use serde_json::{Map, Value as Json};
use serde_yaml::Value as Yaml;

use super::duration::{DURATION_PATTERN, DurationSpec};
use super::error::{FieldError, join_path};
use super::model::{RouteSpec, RoutesFile};

/// The structural OpenAPI v3 schema of [`RouteSpec`]: what the `WebSocketRoute` CRD puts under
/// `spec`. Every node has a `type`, nothing is referenced, maps are `additionalProperties` of a
/// typed schema, leaf defaults are kept and object defaults removed.
pub fn route_spec_schema() -> Json {
    structural_schema_for::<RouteSpec>()
}

/// The structural schema of a whole routes file (`routes:` with named [`RouteSpec`]s).
pub fn routes_file_schema() -> Json {
    structural_schema_for::<RoutesFile>()
}

fn structural_schema_for<T: JsonSchema>() -> Json {
    let generator = SchemaSettings::openapi3()
        .with(|s| {
            s.inline_subschemas = true;
            s.meta_schema = None;
        })
        .into_generator();
    let mut value = generator.into_root_schema_for::<T>().to_value();
    if let Json::Object(root) = &mut value {
        root.remove("$schema");
        root.remove("title");
        root.remove("components");
        root.remove("definitions");
        root.remove("$defs");
    }
    make_structural(&mut value);
    value
}

/// Rewrites schemars' output into Kubernetes' structural form:
/// - `anyOf: [X, {nullable, const: null}]` (an `Option` of a struct) becomes `X` + `nullable`;
/// - `uint*` formats, which the API server does not know, are dropped (`minimum` stays);
/// - `default`s of objects are dropped, so the API server never writes whole sub-objects into
///   stored routes (leaf defaults stay: they document the behaviour);
/// - `title`s are dropped (the descriptions say it all).
fn make_structural(node: &mut Json) {
    let Json::Object(map) = node else { return };
    collapse_nullable_any_of(map);
    if map
        .get("format")
        .and_then(Json::as_str)
        .is_some_and(|f| f.starts_with("uint"))
    {
        map.remove("format");
    }
    if map.get("type").and_then(Json::as_str) == Some("object") {
        map.remove("default");
    }
    map.remove("title");
    for (key, child) in map.iter_mut() {
        match key.as_str() {
            "properties" => {
                if let Json::Object(props) = child {
                    props.values_mut().for_each(make_structural);
                }
            }
            "items" | "additionalProperties" => make_structural(child),
            "anyOf" | "oneOf" | "allOf" => {
                if let Json::Array(list) = child {
                    list.iter_mut().for_each(make_structural);
                }
            }
            _ => {}
        }
    }
}

fn is_null_schema(schema: &Json) -> bool {
    schema.get("const") == Some(&Json::Null) || schema.get("type").and_then(Json::as_str) == Some("null")
}

fn collapse_nullable_any_of(map: &mut Map<String, Json>) {
    let Some(Json::Array(options)) = map.get("anyOf") else {
        return;
    };
    if options.len() != 2 {
        return;
    }
    let Some(null_index) = options.iter().position(is_null_schema) else {
        return;
    };
    let Some(Json::Array(mut options)) = map.remove("anyOf") else {
        return;
    };
    let Json::Object(inner) = options.swap_remove(1 - null_index) else {
        return;
    };
    for (key, value) in inner {
        map.entry(key).or_insert(value);
    }
    map.insert("nullable".into(), Json::Bool(true));
}

/// The routes-file schema, built once.
static ROUTES_FILE_SCHEMA: LazyLock<Json> = LazyLock::new(routes_file_schema);

/// Checks a parsed routes document against the routes-file schema; every problem is pushed
/// onto `errors`.
pub(crate) fn check_routes_document(document: &Yaml, errors: &mut Vec<FieldError>) {
    check_document(document, &ROUTES_FILE_SCHEMA, "", errors);
}

/// Checks `value` (at `path`) against a structural `schema`.
pub(crate) fn check_document(value: &Yaml, schema: &Json, path: &str, errors: &mut Vec<FieldError>) {
    let value = match value {
        Yaml::Tagged(tagged) => {
            errors.push(FieldError::new(
                path,
                format!("YAML tags are not supported (found {})", tagged.tag),
            ));
            return;
        }
        other => other,
    };
    if value.is_null() {
        if schema.get("nullable") != Some(&Json::Bool(true)) {
            let expected = schema.get("type").and_then(Json::as_str).unwrap_or("value");
            errors.push(FieldError::new(
                path,
                format!("expected {}, got null", article(expected)),
            ));
        }
        return;
    }
    let Some(expected) = schema.get("type").and_then(Json::as_str) else {
        return; // untyped node: anything goes (not produced by the route model)
    };
    let type_ok = match expected {
        "object" => value.is_mapping(),
        "array" => value.is_sequence(),
        "string" => value.is_string(),
        "boolean" => value.is_bool(),
        "integer" => value.is_i64() || value.is_u64(),
        "number" => value.is_number(),
        _ => true,
    };
    if !type_ok {
        let hint = if expected == "string" && (value.is_number() || value.is_bool()) {
            " (quote it)"
        } else {
            ""
        };
        errors.push(FieldError::new(
            path,
            format!("expected {}, got {}{hint}", article(expected), describe(value)),
        ));
        return;
    }
    match value {
        Yaml::Mapping(mapping) => check_mapping(mapping, schema, path, errors),
        Yaml::Sequence(items) => {
            if let Some(item_schema) = schema.get("items") {
                for (i, item) in items.iter().enumerate() {
                    check_document(item, item_schema, &format!("{path}[{i}]"), errors);
                }
            }
        }
        Yaml::String(s) => check_string(s, schema, path, errors),
        Yaml::Number(n) => check_number(n, schema, path, errors),
        _ => {}
    }
}

fn check_mapping(mapping: &serde_yaml::Mapping, schema: &Json, path: &str, errors: &mut Vec<FieldError>) {
    let properties = schema.get("properties").and_then(Json::as_object);
    let additional = schema.get("additionalProperties").filter(|a| a.is_object());
    for (key, value) in mapping {
        let Some(key) = key.as_str() else {
            errors.push(FieldError::new(
                path,
                format!("keys must be strings, got {}", describe(key)),
            ));
            continue;
        };
        if let Some(property) = properties.and_then(|p| p.get(key)) {
            check_document(value, property, &join_path(path, key), errors);
        } else if let Some(additional) = additional {
            check_document(value, additional, &map_key_path(path, key), errors);
        } else {
            let field_path = join_path(path, key);
            let suggestion = properties
                .and_then(|p| closest(key, p.keys().map(String::as_str)))
                .map(|s| format!(" (did you mean \"{s}\"?)"))
                .unwrap_or_default();
            errors.push(FieldError::new(field_path, format!("unknown field{suggestion}")));
        }
    }
    if let Some(required) = schema.get("required").and_then(Json::as_array) {
        for name in required.iter().filter_map(Json::as_str) {
            // A present but null value was reported by the type check already.
            if !mapping.contains_key(name) {
                errors.push(FieldError::new(join_path(path, name), "required field is missing"));
            }
        }
    }
}

fn check_string(s: &str, schema: &Json, path: &str, errors: &mut Vec<FieldError>) {
    if let Some(allowed) = schema.get("enum").and_then(Json::as_array)
        && !allowed.iter().any(|a| a.as_str() == Some(s))
    {
        let list: Vec<&str> = allowed.iter().filter_map(Json::as_str).collect();
        errors.push(FieldError::new(
            path,
            format!("must be one of {} (got {s:?})", list.join(", ")),
        ));
    }
    if schema.get("pattern").and_then(Json::as_str) == Some(DURATION_PATTERN)
        && let Err(e) = s.parse::<DurationSpec>()
    {
        errors.push(FieldError::new(path, e.to_string()));
    }
}

fn check_number(n: &serde_yaml::Number, schema: &Json, path: &str, errors: &mut Vec<FieldError>) {
    // Integers beyond i64/u64 are not integers to serde_yaml; the type check caught them.
    let value = n.as_i64().map(i128::from).or_else(|| n.as_u64().map(i128::from));
    let Some(value) = value else { return };
    let bound = |key: &str| {
        schema
            .get(key)
            .and_then(|b| b.as_i64().map(i128::from).or_else(|| b.as_u64().map(i128::from)))
    };
    if let Some(min) = bound("minimum")
        && value < min
    {
        errors.push(FieldError::new(path, format!("must be at least {min} (got {value})")));
    }
    if let Some(max) = bound("maximum")
        && value > max
    {
        errors.push(FieldError::new(path, format!("must be at most {max} (got {value})")));
    }
}

fn map_key_path(path: &str, key: &str) -> String {
    let plain = !key.is_empty() && key.chars().all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-');
    if plain {
        join_path(path, key)
    } else {
        format!("{path}[{key:?}]")
    }
}

fn article(type_name: &str) -> String {
    match type_name {
        "object" => "a mapping".to_owned(),
        "array" => "a list".to_owned(),
        "integer" => "an integer".to_owned(),
        other => format!("a {other}"),
    }
}

fn describe(value: &Yaml) -> &'static str {
    match value {
        Yaml::Null => "null",
        Yaml::Bool(_) => "a boolean",
        Yaml::Number(n) if n.is_f64() => "a decimal number",
        Yaml::Number(_) => "a number",
        Yaml::String(_) => "a string",
        Yaml::Sequence(_) => "a list",
        Yaml::Mapping(_) => "a mapping",
        Yaml::Tagged(_) => "a tagged value",
    }
}

/// The candidate closest to `word` by edit distance (case-insensitive), if it is close
/// enough to be a plausible typo.
fn closest<'a>(word: &str, candidates: impl Iterator<Item = &'a str>) -> Option<&'a str> {
    let word = word.to_ascii_lowercase();
    candidates
        .map(|c| (edit_distance(&word, &c.to_ascii_lowercase()), c))
        .filter(|(d, c)| *d <= (c.len() / 3).max(1))
        .min_by_key(|(d, _)| *d)
        .map(|(_, c)| c)
}

fn edit_distance(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut row: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut diagonal = row[0];
        row[0] = i + 1;
        for (j, cb) in b.iter().enumerate() {
            let above = row[j + 1];
            row[j + 1] = (above + 1).min(row[j] + 1).min(diagonal + usize::from(ca != *cb));
            diagonal = above;
        }
    }
    row[b.len()]
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Asserts that `node` (at `path`) is a Kubernetes structural schema node, recursively.
    fn assert_structural(node: &Json, path: &str) {
        let map = node
            .as_object()
            .unwrap_or_else(|| panic!("{path}: schema is not an object: {node}"));
        assert!(!map.contains_key("$ref"), "{path}: $ref left: {node}");
        for combinator in ["anyOf", "oneOf", "allOf", "not"] {
            assert!(!map.contains_key(combinator), "{path}: {combinator} present: {node}");
        }
        let int_or_string = map.get("x-kubernetes-int-or-string") == Some(&Json::Bool(true));
        let ty = map.get("type").and_then(Json::as_str);
        assert!(ty.is_some() || int_or_string, "{path}: no type: {node}");
        assert!(
            matches!(
                ty,
                Some("object" | "array" | "string" | "integer" | "number" | "boolean")
            ),
            "{path}: type must be one concrete type: {node}"
        );
        if let Some(format) = map.get("format").and_then(Json::as_str) {
            assert!(!format.starts_with("uint"), "{path}: unknown format {format}");
        }
        match ty {
            Some("object") => {
                assert!(!map.contains_key("default"), "{path}: object default: {node}");
                let props = map.get("properties").and_then(Json::as_object);
                let additional = map.get("additionalProperties");
                assert!(
                    props.is_some() != additional.is_some(),
                    "{path}: an object needs properties xor additionalProperties: {node}"
                );
                if let Some(props) = props {
                    for (name, child) in props {
                        assert!(!name.contains('_'), "{path}.{name}: not camelCase");
                        assert_structural(child, &format!("{path}.{name}"));
                    }
                }
                if let Some(additional) = additional {
                    assert!(
                        additional.is_object(),
                        "{path}: additionalProperties must be a typed schema"
                    );
                    assert_structural(additional, &format!("{path}[*]"));
                }
            }
            Some("array") => {
                let items = map
                    .get("items")
                    .unwrap_or_else(|| panic!("{path}: array without items"));
                assert_structural(items, &format!("{path}[]"));
            }
            _ => {}
        }
    }

    #[test]
    fn route_spec_schema_is_structural() {
        let schema = route_spec_schema();
        assert_structural(&schema, "spec");
        assert!(schema.get("$schema").is_none());
        let props = &schema["properties"];
        for name in [
            "match",
            "backend",
            "workloadSelector",
            "headers",
            "meta",
            "keepAlive",
            "grip",
            "limits",
            "timeouts",
            "retries",
        ] {
            assert!(props.get(name).is_some(), "missing {name}");
        }
        assert_eq!(schema["required"], serde_json::json!(["backend"]));
        // Spot checks of the details the CRD relies on.
        let backend = &props["backend"]["properties"];
        assert_eq!(backend["service"]["type"], "object");
        assert_eq!(backend["service"]["nullable"], true);
        assert_eq!(backend["service"]["properties"]["port"]["minimum"], 1);
        assert_eq!(backend["port"]["maximum"], 65535);
        assert_eq!(props["workloadSelector"]["additionalProperties"]["type"], "string");
        assert_eq!(
            props["keepAlive"]["properties"]["minInterval"]["pattern"],
            DURATION_PATTERN
        );
        assert_eq!(props["keepAlive"]["properties"]["minInterval"]["default"], "1s");
        assert_eq!(
            props["headers"]["properties"]["forwardedFor"]["enum"],
            serde_json::json!(["append", "replace", "drop"])
        );
        assert_eq!(props["limits"]["properties"]["maxMessageBytes"]["minimum"], 1);
        assert_eq!(props["limits"]["properties"]["maxMessageBytes"]["default"], 1_048_576);
        assert_eq!(props["retries"]["properties"]["attempts"]["maximum"], 100);
        assert_eq!(
            props["grip"]["properties"]["signingKey"]["properties"]["secretRef"]["required"],
            serde_json::json!(["name", "key"])
        );
        assert!(props["limits"]["description"].as_str().is_some_and(|d| !d.is_empty()));
    }

    #[test]
    fn routes_file_schema_is_structural_with_name_beside_the_spec() {
        let schema = routes_file_schema();
        assert_structural(&schema, "");
        let entry = &schema["properties"]["routes"]["items"];
        assert_eq!(entry["properties"]["name"]["type"], "string");
        assert_eq!(entry["properties"]["backend"]["type"], "object");
        let required: Vec<&str> = entry["required"]
            .as_array()
            .unwrap()
            .iter()
            .filter_map(Json::as_str)
            .collect();
        assert!(
            required.contains(&"name") && required.contains(&"backend"),
            "{required:?}"
        );
    }

    #[test]
    fn the_structural_check_catches_a_non_structural_schema() {
        let bad = serde_json::json!({"type": "object", "properties": {"a": {"anyOf": [{"type": "string"}, {"type": "integer"}]}}});
        let result = std::panic::catch_unwind(|| assert_structural(&bad, ""));
        assert!(result.is_err());
    }

    fn check(yaml: &str) -> Vec<String> {
        let doc: Yaml = serde_yaml::from_str(yaml).unwrap();
        let mut errors = Vec::new();
        check_routes_document(&doc, &mut errors);
        errors.iter().map(ToString::to_string).collect()
    }

    #[test]
    fn document_check_reports_unknown_fields_with_suggestions() {
        let errors = check(
            "routes:\n- name: a\n  match: {hostname: [x]}\n  backend: {port: 1}\n  keepAlive: {clientPingIntervall: 1s}\n  colour: red\n",
        );
        assert_eq!(
            errors,
            [
                "routes[0].match.hostname: unknown field (did you mean \"hostnames\"?)",
                "routes[0].keepAlive.clientPingIntervall: unknown field (did you mean \"clientPingInterval\"?)",
                "routes[0].colour: unknown field",
            ]
        );
    }

    #[test]
    fn document_check_reports_types_ranges_enums_and_durations_together() {
        let errors = check(concat!(
            "routes:\n",
            "- name: 7\n",
            "  backend: {port: 70000}\n",
            "  headers: {forwardedFor: keep, add: [{name: X, value: 1}]}\n",
            "  limits: {maxMessageBytes: 0, messagesPerSecond: -1}\n",
            "  timeouts: {connect: 5}\n",
            "  retries: {initialBackoff: 1d, attempts: 1.5}\n",
            "  workloadSelector: {app.kubernetes.io/name: [x]}\n",
            "- backend: null\n",
        ));
        assert_eq!(
            errors,
            [
                "routes[0].name: expected a string, got a number (quote it)",
                "routes[0].backend.port: must be at most 65535 (got 70000)",
                "routes[0].headers.forwardedFor: must be one of append, replace, drop (got \"keep\")",
                "routes[0].headers.add[0].value: expected a string, got a number (quote it)",
                "routes[0].limits.maxMessageBytes: must be at least 1 (got 0)",
                "routes[0].limits.messagesPerSecond: must be at least 0 (got -1)",
                "routes[0].timeouts.connect: expected a string, got a number (quote it)",
                "routes[0].retries.initialBackoff: invalid duration \"1d\": expected digits followed by ms, s, m or h (e.g. \"30s\")",
                "routes[0].retries.attempts: expected an integer, got a decimal number",
                "routes[0].workloadSelector[\"app.kubernetes.io/name\"]: expected a string, got a list",
                "routes[1].backend: expected a mapping, got null",
                "routes[1].name: required field is missing",
            ]
        );
    }

    #[test]
    fn document_check_accepts_nulls_where_nullable_and_rejects_tags() {
        assert_eq!(
            check("routes:\n- name: a\n  backend: {url: ~, port: 80}\n"),
            Vec::<String>::new()
        );
        assert_eq!(
            check("routes: !foo []\n"),
            ["routes: YAML tags are not supported (found !foo)"]
        );
        assert_eq!(check("routes: {}\n"), ["routes: expected a list, got a mapping"]);
        assert_eq!(check("{}"), ["routes: required field is missing"]);
    }

    #[test]
    fn suggestions_only_for_plausible_typos() {
        let names = ["hostnames", "pathPrefixes"];
        assert_eq!(closest("hostname", names.into_iter()), Some("hostnames"));
        assert_eq!(closest("PathPrefix", names.into_iter()), Some("pathPrefixes"));
        assert_eq!(closest("colour", names.into_iter()), None);
        assert_eq!(edit_distance("kitten", "sitting"), 3);
        assert_eq!(edit_distance("", "abc"), 3);
    }
}
