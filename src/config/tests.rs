//! Tests of the route model: parsing, defaults, validation, matching, URIs and hot reload.

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use http::{HeaderName, HeaderValue};
use tokio_util::sync::CancellationToken;

use super::*;
use crate::protocol::sig::{self, SigningKey};

/// The example of the route model's documentation.
const FULL_EXAMPLE: &str = r#"
routes:
  - name: chat
    match:
      hostnames: ["chat.example.com", "*.example.com"]
      pathPrefixes: ["/ws"]
    backend:
      url: http://127.0.0.1:8080/base
      pathRewrite: /
      hostOverride: backend.internal
    workloadSelector: {app: chat}
    headers:
      replayAllow: []
      replayDeny: [Authorization]
      add: [{name: X-Env, value: prod}]
      remove: [Cookie]
      forwardedFor: replace
    meta:
      allowed: [User, room]
    keepAlive:
      minInterval: 2s
      clientPingInterval: 30s
      clientIdleTimeout: 90s
      relayPings: true
    grip:
      enabled: true
      signingKey: {value: "s3cret"}
      issuer: my-issuer
      maxSubscriptions: 7
    limits:
      maxMessageBytes: 1048576
      maxBatchBytes: 200000
      maxResponseBytes: 1000000
      maxRejectBodyBytes: 100000
      outboundQueueBytes: 2097152
      messagesPerSecond: 50
      maxConnections: 1000
    timeouts:
      connect: 500ms
      request: 1m
    retries:
      attempts: 3
      initialBackoff: 250ms
      maxBackoff: 10s
"#;

fn header(name: &str) -> HeaderName {
    HeaderName::from_bytes(name.as_bytes()).unwrap()
}

fn no_env(_: &str) -> Option<String> {
    None
}

/// Parses with an empty environment; returns the errors as strings.
fn errors_of(yaml: &str) -> Vec<String> {
    let ctx = CompileContext {
        env: &no_env,
        ..CompileContext::default()
    };
    match parse_routes_yaml_with(yaml, &ctx) {
        Ok(routes) => panic!("expected errors, parsed {} routes", routes.len()),
        Err(e) => e.errors().iter().map(ToString::to_string).collect(),
    }
}

fn parse_one(yaml: &str) -> Route {
    let ctx = CompileContext {
        env: &no_env,
        ..CompileContext::default()
    };
    let mut routes = parse_routes_yaml_with(yaml, &ctx).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(routes.len(), 1);
    routes.remove(0)
}

fn assert_key(key: Option<&SigningKey>, expected: &[u8]) {
    let key = key.expect("a signing key");
    let token = sig::sign(key, "wsgate", 1_000);
    assert!(
        sig::verify(&token, &SigningKey::new(expected.to_vec()), 1_000).is_ok(),
        "the key is not {:?}",
        String::from_utf8_lossy(expected)
    );
}

#[test]
fn parses_the_full_example() {
    let route = parse_one(FULL_EXAMPLE);
    assert_eq!(route.name, "chat");
    assert_eq!(
        route.matcher,
        RouteMatch {
            hostnames: vec![
                HostMatch::Exact("chat.example.com".into()),
                HostMatch::Wildcard(".example.com".into())
            ],
            path_prefixes: vec!["/ws".into()],
        }
    );
    let backend = &route.backend;
    assert_eq!(backend.scheme, http::uri::Scheme::HTTP);
    assert_eq!(backend.authority.as_str(), "127.0.0.1:8080");
    assert_eq!(backend.base_path, "/base");
    assert_eq!(backend.path_rewrite.as_deref(), Some("/"));
    assert_eq!(
        backend.host_override,
        Some(HeaderValue::from_static("backend.internal"))
    );

    let headers = &route.headers;
    assert_eq!(headers.allow, None, "an empty allow list allows everything");
    assert_eq!(headers.deny, HashSet::from([header("authorization")]));
    assert_eq!(headers.add, vec![(header("x-env"), HeaderValue::from_static("prod"))]);
    assert_eq!(headers.remove, HashSet::from([header("cookie")]));
    assert_eq!(headers.forwarded_for, ForwardedFor::Replace);
    assert_eq!(
        route.meta_allowed,
        Some(HashSet::from(["user".to_owned(), "room".to_owned()]))
    );

    assert_eq!(
        route.keep_alive,
        KeepAlive {
            min_interval: Duration::from_secs(2),
            client_ping_interval: Some(Duration::from_secs(30)),
            client_idle_timeout: Some(Duration::from_secs(90)),
            relay_pings: true,
        }
    );
    assert!(route.grip.enabled);
    assert_eq!(route.grip.issuer, "my-issuer");
    assert_eq!(route.grip.max_subscriptions, 7);
    assert_key(route.grip.signing_key.as_ref(), b"s3cret");
    assert_eq!(
        route.limits,
        Limits {
            max_message_bytes: 1_048_576,
            max_batch_bytes: 200_000,
            max_response_bytes: 1_000_000,
            max_reject_body_bytes: 100_000,
            outbound_queue_bytes: 2_097_152,
            messages_per_second: Some(50),
            max_connections: Some(1000),
        }
    );
    assert_eq!(
        route.timeouts,
        Timeouts {
            connect: Duration::from_millis(500),
            request: Duration::from_secs(60),
            close: Duration::from_secs(5),
        }
    );
    assert_eq!(
        route.retries,
        Retries {
            attempts: 3,
            initial_backoff: Duration::from_millis(250),
            max_backoff: Duration::from_secs(10),
        }
    );
}

#[test]
fn the_shipped_example_file_parses() {
    let text = include_str!("../../examples/routes.yaml");
    let env = |name: &str| (name == "WSGATE_CHAT_GRIP_KEY").then(|| "example-key".to_owned());
    let ctx = CompileContext {
        env: &env,
        ..CompileContext::default()
    };
    let routes = parse_routes_yaml_with(text, &ctx).unwrap_or_else(|e| panic!("{e}"));
    let names: Vec<&str> = routes.iter().map(|r| r.name.as_str()).collect();
    assert_eq!(names, ["chat", "echo"]);
    assert_key(routes[0].grip.signing_key.as_ref(), b"example-key");
    let table = RouteTable::new(routes, 1).unwrap();
    let (route, prefix) = table.match_route(Some("chat.example.com"), "/ws/room").unwrap();
    assert_eq!((route.name.as_str(), prefix), ("chat", "/ws"));
    assert_eq!(
        route.backend.uri_for(prefix, "/ws/room?x=1").unwrap().to_string(),
        "http://127.0.0.1:8080/base/room?x=1"
    );
    let (route, _) = table.match_route(Some("other.org"), "/ws/room").unwrap();
    assert_eq!(route.name, "echo");
}

#[test]
fn an_almost_empty_route_gets_the_defaults() {
    let route = parse_one("routes:\n- name: min\n  backend: {port: 8080}\n");
    assert!(route.matcher.hostnames.is_empty());
    assert_eq!(route.matcher.path_prefixes, ["/"]);
    assert_eq!(route.backend.scheme, http::uri::Scheme::HTTP);
    assert_eq!(route.backend.authority.as_str(), "127.0.0.1:8080");
    assert_eq!(route.backend.base_path, "");
    assert_eq!(route.backend.path_rewrite, None);
    assert_eq!(route.backend.host_override, None);
    assert_eq!(route.headers, HeaderRules::default());
    assert_eq!(route.meta_allowed, None);
    assert_eq!(
        route.keep_alive,
        KeepAlive {
            min_interval: Duration::from_secs(1),
            client_ping_interval: Some(Duration::from_secs(30)),
            client_idle_timeout: Some(Duration::from_secs(90)),
            relay_pings: false,
        }
    );
    assert!(route.grip.enabled);
    assert!(route.grip.signing_key.is_none());
    assert_eq!(route.grip.issuer, "wsgate");
    assert_eq!(route.grip.max_subscriptions, 20);
    assert_eq!(
        route.limits,
        Limits {
            max_message_bytes: 1_048_576,
            max_batch_bytes: 200_000,
            max_response_bytes: 1_000_000,
            max_reject_body_bytes: 100_000,
            outbound_queue_bytes: 1_048_576,
            messages_per_second: None,
            max_connections: None,
        }
    );
    assert_eq!(
        route.timeouts,
        Timeouts {
            connect: Duration::from_secs(5),
            request: Duration::from_secs(30),
            close: Duration::from_secs(5),
        }
    );
    assert_eq!(
        route.retries,
        Retries {
            attempts: 5,
            initial_backoff: Duration::from_secs(1),
            max_backoff: Duration::from_secs(30),
        }
    );
}

#[test]
fn zero_durations_and_limits_mean_off() {
    let route = parse_one(concat!(
        "routes:\n- name: z\n  backend: {port: 1}\n",
        "  keepAlive: {clientPingInterval: 0s, clientIdleTimeout: 0ms}\n",
        "  limits: {messagesPerSecond: 0, maxConnections: 0, maxRejectBodyBytes: 0}\n",
    ));
    assert_eq!(route.keep_alive.client_ping_interval, None);
    assert_eq!(route.keep_alive.client_idle_timeout, None);
    assert_eq!(route.limits.messages_per_second, None);
    assert_eq!(route.limits.max_connections, None);
    assert_eq!(route.limits.max_reject_body_bytes, 0);
}

#[test]
fn backend_kinds_map_to_scheme_authority_and_base_path() {
    let cases = [
        ("{url: \"ws://Example.com/\"}", "http", "example.com", ""),
        (
            "{url: \"WSS://example.com:8443/a/b/\"}",
            "https",
            "example.com:8443",
            "/a/b",
        ),
        ("{url: \"https://[::1]:9000\"}", "https", "[::1]:9000", ""),
        ("{service: {name: app, port: 8080}}", "http", "app.default.svc:8080", ""),
        (
            "{service: {name: app, namespace: prod, port: 80}}",
            "http",
            "app.prod.svc:80",
            "",
        ),
        ("{port: 65535}", "http", "127.0.0.1:65535", ""),
    ];
    for (backend, scheme, authority, base) in cases {
        let route = parse_one(&format!("routes:\n- name: b\n  backend: {backend}\n"));
        assert_eq!(route.backend.scheme.as_str(), scheme, "{backend}");
        assert_eq!(
            route.backend.authority.as_str().to_ascii_lowercase(),
            authority,
            "{backend}"
        );
        assert_eq!(route.backend.base_path, base, "{backend}");
    }
}

#[test]
fn service_namespace_defaults_to_the_context_namespace() {
    let spec: RouteSpec = serde_yaml::from_str("backend: {service: {name: app, port: 80}}").unwrap();
    let ctx = CompileContext {
        namespace: "team-a",
        ..CompileContext::default()
    };
    let route = Route::compile("team-a.chat", &spec, &ctx).unwrap();
    assert_eq!(route.backend.authority.as_str(), "app.team-a.svc:80");
    assert_eq!(route.name, "team-a.chat");
}

#[test]
fn every_validation_error_names_its_field_and_all_are_reported_together() {
    let errors = errors_of(concat!(
        "routes:\n",
        "- name: Bad_Name\n",
        "  match:\n",
        "    hostnames: [\"*\", \"a.*.com\", \"host:80\", \"bad_host.com\", \"-x.com\"]\n",
        "    pathPrefixes: [ws, \"/a?b\", \"/ok\"]\n",
        "  backend: {url: \"ftp://x\", pathRewrite: rel, hostOverride: \"a b\"}\n",
        "  headers:\n",
        "    replayAllow: [\"bad header\"]\n",
        "    replayDeny: [\"\"]\n",
        "    add: [{name: Meta-User, value: x}, {name: Host, value: x}, {name: X-Ok, value: \"a\\u0001b\"}, {name: \"x y\", value: v}]\n",
        "    remove: [\"(\"]\n",
        "  meta: {allowed: [Set-Meta-User, \"a b\"]}\n",
        "  keepAlive: {minInterval: 500ms, clientPingInterval: 10ms, clientIdleTimeout: 5s}\n",
        "  grip: {issuer: \"\", maxSubscriptions: 0, signingKey: {value: k, env: E}}\n",
        "  limits: {maxMessageBytes: 67108865, maxBatchBytes: 0, maxResponseBytes: 2000000000, outboundQueueBytes: 0}\n",
        "  timeouts: {connect: 0s, request: 0ms}\n",
        "  retries: {attempts: 101, initialBackoff: 0s}\n",
        "- name: second\n",
        "  backend: {url: \"http://a\", port: 80}\n",
        "- name: third\n",
        "  backend: {}\n",
        "- name: fourth\n",
        "  backend: {port: 0}\n",
        "  keepAlive: {clientPingInterval: 30s, clientIdleTimeout: 30s}\n",
        "  retries: {initialBackoff: 10s, maxBackoff: 5s}\n",
        "- name: fifth\n",
        "  backend: {service: {name: App, namespace: \"x.y\", port: 0}}\n",
    ));
    let expected = [
        "routes[0].name: must be a DNS label: 1-63 lowercase letters, digits or '-', starting and ending with a letter or digit (got \"Bad_Name\")",
        "routes[0].limits.maxMessageBytes: must be at most 67108864 (got 67108865)",
        "routes[0].limits.maxBatchBytes: must be at least 1 (got 0)",
        "routes[0].limits.outboundQueueBytes: must be at least 1 (got 0)",
        "routes[0].grip.maxSubscriptions: must be at least 1 (got 0)",
        "routes[0].retries.attempts: must be at most 100 (got 101)",
        "routes[0].match.hostnames[0]: \"*\" is not a host name; leave hostnames empty to match any host",
        "routes[0].match.hostnames[1]: a wildcard must be the whole first label, as in \"*.example.com\" (got \"a.*.com\")",
        "routes[0].match.hostnames[2]: must be a host name without a port (got \"host:80\")",
        "routes[0].match.hostnames[3]: must be a DNS name (letters, digits, '-' and '.') or \"*.\" followed by one (got \"bad_host.com\")",
        "routes[0].match.hostnames[4]: must be a DNS name (letters, digits, '-' and '.') or \"*.\" followed by one (got \"-x.com\")",
        "routes[0].match.pathPrefixes[0]: must start with '/' (got \"ws\")",
        "routes[0].match.pathPrefixes[1]: must be a path without '?' or '#' (got \"/a?b\")",
        "routes[0].backend.pathRewrite: must be a path starting with '/' (got \"rel\")",
        "routes[0].backend.hostOverride: must be a host name with an optional port (got \"a b\")",
        "routes[0].backend.url: scheme must be http, https, ws or wss (got \"ftp\")",
        "routes[0].headers.replayAllow[0]: invalid header name \"bad header\"",
        "routes[0].headers.replayDeny[0]: invalid header name \"\"",
        "routes[0].headers.remove[0]: invalid header name \"(\"",
        "routes[0].headers.add[0].name: Meta-User cannot be added: Meta-* headers carry bound metadata only",
        "routes[0].headers.add[1].name: Host cannot be added: use backend.hostOverride instead",
        "routes[0].headers.add[2].value: invalid header value (control characters and non-ASCII text are not allowed)",
        "routes[0].headers.add[3].name: invalid header name \"x y\"",
        "routes[0].meta.allowed[0]: give the name without the Set-Meta-/Meta- prefix (got \"Set-Meta-User\")",
        "routes[0].meta.allowed[1]: must be a header-name token (got \"a b\")",
        "routes[0].keepAlive.minInterval: must be at least 1s; Keep-Alive-Interval is in whole seconds (got 500ms)",
        "routes[0].keepAlive.clientPingInterval: must be 0s (off) or at least 1s (got 10ms)",
        "routes[0].grip.issuer: must not be empty",
        "routes[0].grip.signingKey: exactly one of value, env, file or secretRef must be set",
        "routes[0].limits.maxResponseBytes: must be at most 1073741824 (got 2000000000)",
        "routes[0].timeouts.connect: must be greater than 0s",
        "routes[0].timeouts.request: must be greater than 0s",
        "routes[0].retries.initialBackoff: must be greater than 0s",
        "routes[1].backend: exactly one of url, service or port may be set",
        "routes[2].backend: one of url, service or port is required",
        "routes[3].backend.port: must be at least 1 (got 0)",
        "routes[3].keepAlive.clientIdleTimeout: must be longer than clientPingInterval (30s), or idle but healthy clients are cut off (got 30s)",
        "routes[3].retries.maxBackoff: must not be shorter than initialBackoff (10s; got 5s)",
        "routes[4].backend.service.port: must be at least 1 (got 0)",
        "routes[4].backend.service.name: must be a DNS label: 1-63 lowercase letters, digits or '-', starting and ending with a letter or digit (got \"App\")",
        "routes[4].backend.service.namespace: must be a DNS label: 1-63 lowercase letters, digits or '-', starting and ending with a letter or digit (got \"x.y\")",
    ];
    let missing: Vec<&&str> = expected
        .iter()
        .filter(|e| !errors.iter().any(|got| got == **e))
        .collect();
    let unexpected: Vec<&String> = errors.iter().filter(|got| !expected.contains(&got.as_str())).collect();
    assert!(
        missing.is_empty() && unexpected.is_empty(),
        "missing: {missing:#?}\nunexpected: {unexpected:#?}"
    );
    // Grouped by route, in document order.
    let indexes: Vec<usize> = errors
        .iter()
        .map(|e| e["routes[".len()..].split(']').next().unwrap().parse().unwrap())
        .collect();
    assert!(indexes.windows(2).all(|w| w[0] <= w[1]), "{errors:#?}");
}

#[test]
fn url_problems_are_explained() {
    let cases = [
        ("\"127.0.0.1:8080\"", "must be an absolute URL such as http://host:port"),
        ("\"http://user:pw@host\"", "must not contain credentials"),
        ("\"http://host:0\"", "port must be between 1 and 65535"),
        ("\"http://host/?a=1\"", "must not have a query"),
        ("\"http://host/#x\"", "must not have a fragment"),
        ("\"http://ho st\"", "not a valid URL"),
    ];
    for (url, message) in cases {
        let errors = errors_of(&format!("routes:\n- name: u\n  backend: {{url: {url}}}\n"));
        assert_eq!(errors.len(), 1, "{url}: {errors:?}");
        assert!(
            errors[0].starts_with("routes[0].backend.url: ") && errors[0].contains(message),
            "{url}: {errors:?}"
        );
    }
}

#[test]
fn unknown_fields_are_errors_naming_the_field() {
    let errors = errors_of(concat!(
        "routes:\n",
        "- name: a\n",
        "  match: {pathPrefix: [/ws]}\n",
        "  backend: {url: \"http://x\", timeout: 5s}\n",
        "  limit: {}\n",
    ));
    assert_eq!(
        errors,
        [
            "routes[0].match.pathPrefix: unknown field (did you mean \"pathPrefixes\"?)",
            "routes[0].backend.timeout: unknown field",
            "routes[0].limit: unknown field (did you mean \"limits\"?)",
        ]
    );
    // Top level too.
    assert_eq!(
        errors_of("route: []\n"),
        [
            "route: unknown field (did you mean \"routes\"?)",
            "routes: required field is missing"
        ]
    );
}

#[test]
fn unknown_fields_and_semantic_errors_are_reported_together() {
    let errors = errors_of("routes:\n- name: a\n  backend: {url: \"ftp://x\"}\n  grip: {enable: true}\n");
    assert_eq!(
        errors,
        [
            "routes[0].grip.enable: unknown field (did you mean \"enabled\"?)",
            "routes[0].backend.url: scheme must be http, https, ws or wss (got \"ftp\")",
        ]
    );
}

#[test]
fn yaml_and_document_level_problems() {
    let errors = errors_of("routes:\n  - name: a\n    backend: {port: 1\n");
    assert_eq!(errors.len(), 1);
    assert!(
        errors[0].starts_with("invalid YAML: ") && errors[0].contains("line"),
        "{errors:?}"
    );
    assert_eq!(
        errors_of(""),
        ["the routes file is empty (expected \"routes:\" with a list of routes)"]
    );
    assert_eq!(errors_of("- a\n"), ["expected a mapping, got a list"]);
    let errors = errors_of("routes:\n- name: a\n  name: b\n  backend: {port: 1}\n");
    assert!(errors[0].contains("duplicate"), "{errors:?}");
}

#[test]
fn duplicate_names_and_identical_matches_are_rejected() {
    let errors = errors_of(concat!(
        "routes:\n",
        "- {name: a, match: {hostnames: [X.com], pathPrefixes: [/ws]}, backend: {port: 1}}\n",
        "- {name: a, backend: {port: 2}}\n",
        "- {name: c, match: {hostnames: [\"x.com.\"], pathPrefixes: [\"/ws/\"]}, backend: {port: 3}}\n",
        "- {name: d, match: {pathPrefixes: [/]}, backend: {port: 4}}\n",
    ));
    assert_eq!(
        errors,
        [
            "routes[1].name: duplicate route name \"a\" (also routes[0])",
            "routes[2].match: host \"x.com\" with path prefix \"/ws\" is already matched by route \"a\" (routes[0])",
            "routes[3].match: any host with path prefix \"/\" is already matched by route \"a\" (routes[1])",
        ]
    );
    // RouteTable::new applies the same rules to routes from any source.
    let route = |name: &str| {
        Route::catch_all("http://127.0.0.1:1").map(|mut r| {
            r.name = name.to_owned();
            r
        })
    };
    let err = RouteTable::new(vec![route("x").unwrap(), route("y").unwrap()], 1).unwrap_err();
    assert_eq!(
        err.to_string(),
        "routes[1].match: any host with path prefix \"/\" is already matched by route \"x\" (routes[0])"
    );
    let err = RouteTable::new(vec![route("x").unwrap(), route("x").unwrap()], 1).unwrap_err();
    assert!(
        err.to_string()
            .starts_with("routes[1].name: duplicate route name \"x\""),
        "{err}"
    );
}

#[test]
fn type_errors_are_reported_with_paths_before_serde() {
    let errors = errors_of("routes:\n- name: a\n  backend: {port: \"80\"}\n  limits: {maxConnections: lots}\n");
    assert_eq!(
        errors,
        [
            "routes[0].backend.port: expected an integer, got a string",
            "routes[0].limits.maxConnections: expected an integer, got a string",
        ]
    );
}

fn table_of(yaml: &str) -> RouteTable {
    let ctx = CompileContext {
        env: &no_env,
        ..CompileContext::default()
    };
    RouteTable::new(parse_routes_yaml_with(yaml, &ctx).unwrap_or_else(|e| panic!("{e}")), 7).unwrap()
}

fn matched(table: &RouteTable, host: Option<&str>, path: &str) -> Option<(String, String)> {
    table
        .match_route(host, path)
        .map(|(route, prefix)| (route.name.clone(), prefix.to_owned()))
}

#[test]
fn matching_prefers_exact_host_then_wildcard_then_any_then_longest_prefix() {
    let table = table_of(concat!(
        "routes:\n",
        "- {name: any-root, backend: {port: 1}}\n",
        "- {name: any-ws, match: {pathPrefixes: [/ws]}, backend: {port: 2}}\n",
        "- {name: any-ws-deep, match: {pathPrefixes: [/ws/deep/]}, backend: {port: 3}}\n",
        "- {name: wild, match: {hostnames: [\"*.example.com\"], pathPrefixes: [/]}, backend: {port: 4}}\n",
        "- {name: wild-sub, match: {hostnames: [\"*.eu.example.com\"], pathPrefixes: [/ws]}, backend: {port: 5}}\n",
        "- {name: exact, match: {hostnames: [chat.example.com], pathPrefixes: [/ws]}, backend: {port: 6}}\n",
    ));
    assert_eq!(table.version(), 7);
    let m = |host: Option<&str>, path: &str| matched(&table, host, path);
    let r = |name: &str, prefix: &str| Some((name.to_owned(), prefix.to_owned()));

    // Exact host beats wildcard and any-host, even with a shorter prefix.
    assert_eq!(m(Some("chat.example.com"), "/ws/deep/x"), r("exact", "/ws"));
    // Case and port are ignored; so is a trailing dot.
    assert_eq!(m(Some("CHAT.Example.COM:8443"), "/ws"), r("exact", "/ws"));
    assert_eq!(m(Some("chat.example.com."), "/ws"), r("exact", "/ws"));
    // No prefix of the exact host matches: fall through to the wildcard.
    assert_eq!(m(Some("chat.example.com"), "/other"), r("wild", "/"));
    // The longer wildcard suffix wins; multiple labels match a wildcard.
    assert_eq!(m(Some("a.b.eu.example.com"), "/ws/x"), r("wild-sub", "/ws"));
    assert_eq!(m(Some("x.eu.example.com"), "/nows"), r("wild", "/"));
    // A wildcard needs at least one label in front.
    assert_eq!(m(Some("example.com"), "/ws/deep"), r("any-ws-deep", "/ws/deep"));
    // Any host: longest prefix, on segment boundaries.
    assert_eq!(m(Some("other.org"), "/ws/deep/x"), r("any-ws-deep", "/ws/deep"));
    assert_eq!(m(Some("other.org"), "/ws/deeper"), r("any-ws", "/ws"));
    assert_eq!(m(Some("other.org"), "/ws"), r("any-ws", "/ws"));
    assert_eq!(m(Some("other.org"), "/ws/"), r("any-ws", "/ws"));
    assert_eq!(m(Some("other.org"), "/wsx"), r("any-root", "/"));
    assert_eq!(m(Some("other.org"), "/ws?x=1"), r("any-ws", "/ws"));
    // No host at all, or an empty one: any-host routes only.
    assert_eq!(m(None, "/ws/a"), r("any-ws", "/ws"));
    assert_eq!(m(Some(""), "/"), r("any-root", "/"));
    // IPv6 literal with port.
    assert_eq!(m(Some("[::1]:8080"), "/x"), r("any-root", "/"));
}

#[test]
fn no_match_without_a_fallback_route() {
    let table =
        table_of("routes:\n- {name: a, match: {hostnames: [a.com], pathPrefixes: [/ws]}, backend: {port: 1}}\n");
    assert_eq!(matched(&table, Some("a.com"), "/wsx"), None);
    assert_eq!(matched(&table, Some("b.com"), "/ws"), None);
    assert_eq!(matched(&table, None, "/ws"), None);
    assert_eq!(
        matched(&table, Some("a.com"), "/ws/1"),
        Some(("a".into(), "/ws".into()))
    );
    assert!(table.get("a").is_some() && table.get("b").is_none());
    assert_eq!(table.routes().len(), 1);
    assert!(RouteTable::default().match_route(Some("a.com"), "/").is_none());
}

fn backend(url: &str, rewrite: Option<&str>) -> Backend {
    let mut route = Route::catch_all(url).unwrap();
    route.backend.path_rewrite = rewrite.map(str::to_owned);
    route.backend
}

#[test]
fn uri_for_applies_base_path_rewrite_and_query() {
    let cases = [
        // (backend url, rewrite, matched prefix, request, expected)
        (
            "http://b:8080",
            None,
            "/ws",
            "/ws/chat?x=1&y",
            "http://b:8080/ws/chat?x=1&y",
        ),
        (
            "http://b:8080/base",
            None,
            "/ws",
            "/ws/chat",
            "http://b:8080/base/ws/chat",
        ),
        ("http://b:8080/base/", None, "/", "/", "http://b:8080/base/"),
        (
            "http://b:8080/base",
            Some("/"),
            "/ws",
            "/ws/chat?q",
            "http://b:8080/base/chat?q",
        ),
        ("http://b:8080/base", Some("/"), "/ws", "/ws", "http://b:8080/base/"),
        ("http://b:8080", Some("/"), "/ws", "/ws?a=b", "http://b:8080/?a=b"),
        (
            "http://b:8080",
            Some("/api"),
            "/ws",
            "/ws/chat",
            "http://b:8080/api/chat",
        ),
        (
            "http://b:8080",
            Some("/api/"),
            "/ws",
            "/ws/chat",
            "http://b:8080/api/chat",
        ),
        ("http://b:8080", Some("/api/"), "/ws", "/ws", "http://b:8080/api/"),
        ("http://b:8080", Some("/api"), "/", "/chat", "http://b:8080/api/chat"),
        ("wss://b", Some("/v2"), "/v1", "/v1/", "https://b/v2/"),
    ];
    for (url, rewrite, prefix, request, expected) in cases {
        let uri = backend(url, rewrite).uri_for(prefix, request).unwrap();
        assert_eq!(uri.to_string(), expected, "{url} {rewrite:?} {prefix} {request}");
    }
}

#[test]
fn uri_for_rejects_mismatched_prefixes_and_bad_targets() {
    let b = backend("http://b", Some("/"));
    assert_eq!(
        b.uri_for("/ws", "/wsx/a"),
        Err(RouteError::PrefixMismatch {
            prefix: "/ws".into(),
            path: "/wsx/a".into()
        })
    );
    assert_eq!(b.uri_for("/ws", "ws/a"), Err(RouteError::NotAPath("ws/a".into())));
    assert!(matches!(b.uri_for("/", "/a b"), Err(RouteError::InvalidUri { .. })));
    assert_eq!(b.uri_for("/ws", "/ws?x").unwrap().to_string(), "http://b/?x");
}

#[test]
fn catch_all_serves_everything_with_defaults() {
    let route = Route::catch_all("http://127.0.0.1:8080/app").unwrap();
    assert_eq!(route.name, "default");
    assert!(route.matcher.hostnames.is_empty());
    assert_eq!(route.matcher.path_prefixes, ["/"]);
    assert_eq!(route.backend.base_path, "/app");
    assert_eq!(route.limits.max_message_bytes, 1_048_576);
    let err = Route::catch_all("ftp://x").unwrap_err();
    assert_eq!(
        err.to_string(),
        "backend.url: scheme must be http, https, ws or wss (got \"ftp\")"
    );
}

#[test]
fn header_rules_replay_allow_deny_and_remove() {
    let route = parse_one(concat!(
        "routes:\n- name: h\n  backend: {port: 1}\n",
        "  headers: {replayAllow: [Cookie, X-A, User-Agent], replayDeny: [x-a], remove: [USER-AGENT]}\n",
    ));
    let rules = &route.headers;
    assert!(rules.replays(&header("cookie")));
    assert!(!rules.replays(&header("x-a")), "deny beats allow");
    assert!(!rules.replays(&header("user-agent")), "remove beats allow");
    assert!(!rules.replays(&header("x-other")), "not in the allow list");
    let open = HeaderRules::default();
    assert!(open.replays(&header("x-other")));
}

#[test]
fn signing_key_sources() {
    struct Secrets;
    impl SecretResolver for Secrets {
        fn resolve(&self, namespace: &str, name: &str, key: &str) -> Result<Vec<u8>, String> {
            match (namespace, name, key) {
                ("ns", "grip", "key") => Ok(b"from-secret".to_vec()),
                _ => Err("not found".into()),
            }
        }
    }
    let dir = TempDir::new();
    std::fs::write(dir.path().join("key.txt"), b"from-file\r\n\n").unwrap();
    let env: HashMap<&str, &str> = HashMap::from([("GRIP_KEY", "from-env"), ("B64", "base64:AAEC/w==")]);
    let env_lookup = |name: &str| env.get(name).map(|v| (*v).to_owned());
    let secrets = Secrets;
    let ctx = CompileContext {
        namespace: "ns",
        env: &env_lookup,
        secrets: Some(&secrets),
        base_dir: Some(dir.path()),
    };
    let compile = |key: &str| {
        let spec: RouteSpec =
            serde_yaml::from_str(&format!("backend: {{port: 1}}\ngrip: {{signingKey: {key}}}")).unwrap();
        Route::compile("r", &spec, &ctx).map(|r| r.grip.signing_key)
    };
    assert_key(compile("{value: v1}").unwrap().as_ref(), b"v1");
    assert_key(compile("{value: \"base64:aGk=\"}").unwrap().as_ref(), b"hi");
    assert_key(compile("{env: GRIP_KEY}").unwrap().as_ref(), b"from-env");
    assert_key(compile("{env: B64}").unwrap().as_ref(), &[0, 1, 2, 255]);
    assert_key(compile("{file: key.txt}").unwrap().as_ref(), b"from-file");
    let absolute = dir.path().join("key.txt");
    assert_key(
        compile(&format!("{{file: {:?}}}", absolute.display().to_string()))
            .unwrap()
            .as_ref(),
        b"from-file",
    );
    assert_key(
        compile("{secretRef: {name: grip, key: key}}").unwrap().as_ref(),
        b"from-secret",
    );

    let error = |key: &str| {
        let errors = compile(key).unwrap_err();
        assert_eq!(errors.len(), 1, "{errors:?}");
        errors[0].to_string()
    };
    assert_eq!(
        error("{env: NOPE}"),
        "grip.signingKey.env: environment variable NOPE is not set"
    );
    assert_eq!(error("{value: \"\"}"), "grip.signingKey.value: the key is empty");
    assert_eq!(
        error("{value: \"base64:!!\"}"),
        "grip.signingKey.value: the text after \"base64:\" is not valid base64"
    );
    assert!(error("{file: missing.txt}").starts_with("grip.signingKey.file: cannot read "));
    assert_eq!(
        error("{secretRef: {name: other, key: key}}"),
        "grip.signingKey.secretRef: Secret ns/other key key: not found"
    );
    assert_eq!(
        error("{}"),
        "grip.signingKey: exactly one of value, env, file or secretRef must be set"
    );

    // Outside Kubernetes there is no resolver.
    let errors =
        errors_of("routes:\n- name: a\n  backend: {port: 1}\n  grip: {signingKey: {secretRef: {name: s, key: k}}}\n");
    assert_eq!(
        errors,
        ["routes[0].grip.signingKey.secretRef: secretRef is only available in Kubernetes"]
    );
}

#[test]
fn try_from_entry_uses_the_default_context() {
    let entry: RouteEntry = serde_yaml::from_str("name: e\nbackend: {port: 9}").unwrap();
    let route = Route::try_from(&entry).unwrap();
    assert_eq!(route.name, "e");
    let entry: RouteEntry = serde_yaml::from_str("name: E\nbackend: {port: 9}").unwrap();
    let err = Route::try_from(&entry).unwrap_err();
    assert!(err.to_string().starts_with("name: must be a DNS label"), "{err}");
}

#[test]
fn spec_round_trips_through_serde() {
    let file: RoutesFile = serde_yaml::from_str(FULL_EXAMPLE).unwrap();
    let json = serde_json::to_value(&file).unwrap();
    assert_eq!(json["routes"][0]["keepAlive"]["clientPingInterval"], "30s");
    assert_eq!(json["routes"][0]["match"]["pathPrefixes"][0], "/ws");
    let back: RoutesFile = serde_json::from_value(json).unwrap();
    assert_eq!(back, file);
}

// ---- files and hot reload ----

/// A temporary directory removed on drop.
struct TempDir(PathBuf);

impl TempDir {
    fn new() -> Self {
        let path = std::env::temp_dir().join(format!("wsgate-config-{}", uuid::Uuid::new_v4()));
        std::fs::create_dir_all(&path).unwrap();
        Self(path)
    }

    fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Replaces `path` atomically (write a sibling, rename), as editors and ConfigMaps do.
fn write_atomically(path: &Path, content: &str) {
    let tmp = path.with_extension(format!("tmp-{}", uuid::Uuid::new_v4()));
    std::fs::write(&tmp, content).unwrap();
    std::fs::rename(&tmp, path).unwrap();
}

const ROUTES_V1: &str = "routes:\n- {name: one, backend: {port: 1001}}\n";
const ROUTES_V2: &str = "routes:\n- {name: two, backend: {port: 1002}}\n";

#[test]
fn load_routes_file_reads_and_reports_the_file() {
    let dir = TempDir::new();
    let path = dir.path().join("routes.yaml");
    std::fs::write(&path, ROUTES_V1).unwrap();
    let table = load_routes_file(&path).unwrap();
    assert_eq!(table.version(), INITIAL_VERSION);
    assert!(table.get("one").is_some());

    let missing = dir.path().join("missing.yaml");
    let err = load_routes_file(&missing).unwrap_err().to_string();
    assert!(
        err.starts_with(&format!("cannot read routes file {}", missing.display())),
        "{err}"
    );

    std::fs::write(&path, b"routes: [\xff]").unwrap();
    let err = load_routes_file(&path).unwrap_err().to_string();
    assert!(err.contains("is not UTF-8"), "{err}");
}

async fn wait_for_state(status: &ReloadStatus, what: &str, pred: impl FnMut(&ReloadState) -> bool) -> ReloadState {
    let mut rx = status.subscribe();
    match tokio::time::timeout(Duration::from_secs(10), rx.wait_for(pred)).await {
        Ok(Ok(state)) => state.clone(),
        _ => panic!("timed out waiting for {what}; state: {:?}", status.snapshot()),
    }
}

struct Watcher {
    table: Arc<ArcSwap<RouteTable>>,
    status: Arc<ReloadStatus>,
    cancel: CancellationToken,
    task: tokio::task::JoinHandle<()>,
}

impl Watcher {
    fn start(path: &Path) -> Self {
        let table = Arc::new(ArcSwap::from_pointee(load_routes_file(path).unwrap()));
        let status = Arc::new(ReloadStatus::default());
        let cancel = CancellationToken::new();
        let task = tokio::spawn(watch_routes_file(
            path.to_owned(),
            Duration::from_millis(10),
            table.clone(),
            status.clone(),
            cancel.clone(),
        ));
        Self {
            table,
            status,
            cancel,
            task,
        }
    }

    async fn stop(self) {
        self.cancel.cancel();
        tokio::time::timeout(Duration::from_secs(10), self.task)
            .await
            .expect("the watcher stops when cancelled")
            .unwrap();
    }
}

#[tokio::test]
async fn reload_picks_up_a_changed_file_and_keeps_the_old_table_on_errors() {
    let dir = TempDir::new();
    let path = dir.path().join("routes.yaml");
    std::fs::write(&path, ROUTES_V1).unwrap();
    let w = Watcher::start(&path);
    wait_for_state(&w.status, "the watcher to adopt version 1", |s| s.version == 1).await;

    write_atomically(&path, ROUTES_V2);
    let state = wait_for_state(&w.status, "version 2", |s| s.version == 2).await;
    assert_eq!((state.reloads_ok, state.reloads_failed, state.last_error), (1, 0, None));
    let table = w.table.load_full();
    assert_eq!(table.version(), 2);
    assert!(table.get("two").is_some() && table.get("one").is_none());

    write_atomically(&path, "routes:\n- {name: two, backend: {url: \"ftp://x\"}}\n");
    let state = wait_for_state(&w.status, "a failed reload", |s| s.reloads_failed == 1).await;
    let error = state.last_error.expect("the error is recorded");
    assert!(
        error.contains("routes[0].backend.url: scheme must be http, https, ws or wss"),
        "{error}"
    );
    assert_eq!(state.version, 2);
    assert!(w.table.load().get("two").is_some(), "the old table stays");

    // A fixed file is picked up again and clears the error.
    write_atomically(&path, ROUTES_V1);
    let state = wait_for_state(&w.status, "version 3", |s| s.version == 3).await;
    assert_eq!((state.reloads_ok, state.reloads_failed, state.last_error), (2, 1, None));
    assert_eq!(w.table.load().version(), 3);
    assert!(w.table.load().get("one").is_some());

    // A deleted file is an error once; the routes stay.
    std::fs::remove_file(&path).unwrap();
    let state = wait_for_state(&w.status, "a read failure", |s| s.reloads_failed == 2).await;
    assert!(state.last_error.is_some_and(|e| e.contains("cannot read routes file")));
    assert_eq!(w.table.load().version(), 3);
    // The same content coming back is not a new version; the read error goes away.
    write_atomically(&path, ROUTES_V1);
    let state = wait_for_state(&w.status, "the read error to clear", |s| s.last_error.is_none()).await;
    assert_eq!((state.version, state.reloads_ok, state.reloads_failed), (3, 2, 2));
    w.stop().await;
}

#[cfg(unix)]
#[tokio::test]
async fn reload_follows_configmap_style_symlink_swaps() {
    use std::os::unix::fs::symlink;
    let dir = TempDir::new();
    let root = dir.path();
    std::fs::create_dir(root.join("..v1")).unwrap();
    std::fs::write(root.join("..v1/routes.yaml"), ROUTES_V1).unwrap();
    symlink("..v1", root.join("..data")).unwrap();
    symlink("..data/routes.yaml", root.join("routes.yaml")).unwrap();
    let path = root.join("routes.yaml");
    let w = Watcher::start(&path);
    assert!(w.table.load().get("one").is_some());

    // The kubelet writes a new directory and swaps `..data` with a rename.
    std::fs::create_dir(root.join("..v2")).unwrap();
    std::fs::write(root.join("..v2/routes.yaml"), ROUTES_V2).unwrap();
    symlink("..v2", root.join("..data_tmp")).unwrap();
    std::fs::rename(root.join("..data_tmp"), root.join("..data")).unwrap();

    wait_for_state(&w.status, "version 2", |s| s.version == 2).await;
    assert!(w.table.load().get("two").is_some());
    w.stop().await;
}

#[tokio::test]
async fn a_table_from_elsewhere_is_replaced_by_the_file_on_the_first_poll() {
    let dir = TempDir::new();
    let path = dir.path().join("routes.yaml");
    std::fs::write(&path, ROUTES_V2).unwrap();
    let table = RouteTable::new(vec![Route::catch_all("http://127.0.0.1:1").unwrap()], 5).unwrap();
    let table = Arc::new(ArcSwap::from_pointee(table));
    let status = Arc::new(ReloadStatus::new(5));
    let cancel = CancellationToken::new();
    let task = tokio::spawn(watch_routes_file(
        path.clone(),
        Duration::from_millis(10),
        table.clone(),
        status.clone(),
        cancel.clone(),
    ));
    wait_for_state(&status, "version 6", |s| s.version == 6).await;
    assert!(table.load().get("two").is_some());
    cancel.cancel();
    task.await.unwrap();
}
