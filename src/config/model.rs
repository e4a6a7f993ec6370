//! The serde model of a route: what a routes file holds and what the `WebSocketRoute` CRD embeds.
//!
//! Everything here is plain data with defaults; nothing is validated until a spec is compiled
//! into a [`Route`](super::Route) (see [`Route::compile`](super::Route::compile)). Field names are
//! camelCase. The JSON Schema derived from these types is a Kubernetes *structural* schema (see
//! [`route_spec_schema`](super::route_spec_schema)), so:
//!
//! - there are no untagged enums: "exactly one of" choices are structs of optional fields,
//!   checked when compiling;
//! - unknown fields are not rejected by serde (`deny_unknown_fields` does not mix with CRDs);
//!   the routes-file loader reports them by checking the document against the schema.

use std::borrow::Cow;
use std::collections::BTreeMap;

use schemars::{JsonSchema, Schema, SchemaGenerator};
use serde::{Deserialize, Serialize};

use super::duration::DurationSpec;
use super::route::{MAX_BUFFER_BYTES, MAX_MESSAGE_BYTES, MAX_RETRY_ATTEMPTS};

/// A routes file: `routes:` followed by a list of named routes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct RoutesFile {
    /// The routes. Names must be unique.
    pub routes: Vec<RouteEntry>,
}

/// One route of a routes file: a name plus the [`RouteSpec`] fields at the same level.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct RouteEntry {
    /// Unique route name: a DNS label (lowercase letters, digits and `-`, at most 63).
    pub name: String,
    /// The route itself.
    #[serde(flatten)]
    pub spec: RouteSpec,
}

/// A route: which requests it matches and how their WebSocket sessions are relayed.
///
/// This is the `spec` of a `WebSocketRoute` and, with a `name`, an entry of a routes file.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct RouteSpec {
    /// Which requests this route serves. Absent: every host and path.
    #[serde(rename = "match", default)]
    pub matcher: MatchSpec,
    /// Where the WebSocket-over-HTTP requests go. Required.
    pub backend: BackendSpec,
    /// Pod labels of the sidecar gateways that apply this route (Kubernetes only; absent means
    /// ingress gateways). Routes files accept and ignore it.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub workload_selector: BTreeMap<String, String>,
    /// Which client headers are replayed to the backend, and what is added or removed.
    #[serde(default)]
    pub headers: HeadersSpec,
    /// Metadata (`Set-Meta-*`) the backend may bind.
    #[serde(default)]
    pub meta: MetaSpec,
    /// Keep-alive and liveness settings.
    #[serde(default)]
    pub keep_alive: KeepAliveSpec,
    /// GRIP (publish/subscribe) settings.
    #[serde(default)]
    pub grip: GripSpec,
    /// Size, rate and connection limits.
    #[serde(default)]
    pub limits: LimitsSpec,
    /// Backend timeouts.
    #[serde(default)]
    pub timeouts: TimeoutsSpec,
    /// Backend retries of connect failures.
    #[serde(default)]
    pub retries: RetriesSpec,
}

/// Which requests a route serves.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct MatchSpec {
    /// Host names, exact (`chat.example.com`) or with a leading wildcard label
    /// (`*.example.com`, matching one or more labels). Compared case-insensitively, ignoring the
    /// port of the `Host` header. Empty: any host.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub hostnames: Vec<String>,
    /// Path prefixes, each starting with `/`. Matching respects segments: `/ws` matches `/ws`
    /// and `/ws/chat` but not `/wsx`. Empty: `["/"]`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub path_prefixes: Vec<String>,
}

/// Where a route's backend is. Exactly one of `url`, `service` and `port`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct BackendSpec {
    /// Backend base URL: `http`, `https` (`ws` and `wss` are accepted and mean `http` and
    /// `https`). Its path is prepended to the client's path.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub url: Option<String>,
    /// A Kubernetes Service: `http://NAME.NAMESPACE.svc:PORT`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub service: Option<ServiceRef>,
    /// A port on the loopback interface (sidecars): `http://127.0.0.1:PORT`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 65535))]
    pub port: Option<u16>,
    /// Replaces the matched path prefix before the request goes to the backend.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path_rewrite: Option<String>,
    /// `Host` header sent to the backend instead of the client's.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub host_override: Option<String>,
    /// PEM file of CA certificates to trust for an `https` backend, in addition to the
    /// public web roots (for backends with private certificates).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ca_file: Option<String>,
}

/// A Kubernetes Service port.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ServiceRef {
    /// Service name.
    pub name: String,
    /// Service namespace. Absent: the route's own namespace (`default` in a routes file).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub namespace: Option<String>,
    /// Service port.
    #[schemars(range(min = 1, max = 65535))]
    pub port: u16,
}

/// Header replay rules.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct HeadersSpec {
    /// If non-empty, only these client headers are replayed.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub replay_allow: Vec<String>,
    /// These client headers are never replayed.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub replay_deny: Vec<String>,
    /// Headers added to every backend request.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub add: Vec<HeaderSpec>,
    /// Client headers removed from every backend request.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub remove: Vec<String>,
    /// What happens to `X-Forwarded-For`.
    #[serde(default)]
    pub forwarded_for: ForwardedForSpec,
}

/// A header name and value.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct HeaderSpec {
    /// Header name.
    pub name: String,
    /// Header value.
    pub value: String,
}

/// `X-Forwarded-For` handling: `append` (default) the client's address to what the client
/// sent, `replace` it, or `drop` the header.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum ForwardedForSpec {
    /// Append the client's address to the client's own value.
    #[default]
    Append,
    /// Send only the client's address.
    Replace,
    /// Send no `X-Forwarded-For`.
    Drop,
}

impl ForwardedForSpec {
    /// The accepted strings, in schema order.
    pub const VARIANTS: [&'static str; 3] = ["append", "replace", "drop"];
}

// Written by hand: the derive turns documented variants into `oneOf` + `const`, which is not
// a structural schema.
impl JsonSchema for ForwardedForSpec {
    fn inline_schema() -> bool {
        true
    }

    fn schema_name() -> Cow<'static, str> {
        "ForwardedFor".into()
    }

    fn json_schema(_generator: &mut SchemaGenerator) -> Schema {
        let mut map = serde_json::Map::new();
        map.insert("type".into(), "string".into());
        map.insert(
            "enum".into(),
            Self::VARIANTS.iter().map(|v| serde_json::Value::from(*v)).collect(),
        );
        Schema::from(map)
    }
}

/// Metadata the backend may set.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct MetaSpec {
    /// Names (the part after `Set-Meta-`, case-insensitive) the backend may set. Empty: any.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub allowed: Vec<String>,
}

/// Keep-alive and liveness settings.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", default)]
pub struct KeepAliveSpec {
    /// Floor for the backend's `Keep-Alive-Interval`.
    pub min_interval: DurationSpec,
    /// The gateway pings clients idle this long; `0s` turns pings off.
    pub client_ping_interval: DurationSpec,
    /// A client that sends no frame for this long is dead (the backend gets `DISCONNECT`);
    /// `0s` turns the check off. Must exceed `clientPingInterval` when both are on.
    pub client_idle_timeout: DurationSpec,
    /// Relay client pings to the backend as `PING` events instead of answering them.
    pub relay_pings: bool,
}

impl Default for KeepAliveSpec {
    fn default() -> Self {
        Self {
            min_interval: DurationSpec::from_secs(1),
            client_ping_interval: DurationSpec::from_secs(30),
            client_idle_timeout: DurationSpec::from_secs(90),
            relay_pings: false,
        }
    }
}

/// GRIP settings.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", default)]
pub struct GripSpec {
    /// Offer GRIP to the backend (`Sec-WebSocket-Extensions: grip`).
    pub enabled: bool,
    /// Key that signs the `Grip-Sig` header. Absent: requests are not signed.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub signing_key: Option<SigningKeySpec>,
    /// `iss` claim of `Grip-Sig`.
    pub issuer: String,
    /// Channel subscriptions allowed per connection.
    #[schemars(range(min = 1))]
    pub max_subscriptions: u32,
}

impl Default for GripSpec {
    fn default() -> Self {
        Self {
            enabled: true,
            signing_key: None,
            issuer: "wsgate".to_owned(),
            max_subscriptions: 20,
        }
    }
}

/// Where a signing key comes from. Exactly one field.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct SigningKeySpec {
    /// The key itself: its UTF-8 bytes, or `base64:` followed by the base64 of the bytes.
    /// Prefer the other sources outside of tests.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub value: Option<String>,
    /// An environment variable of the gateway process holding the key (`base64:` as for
    /// `value`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub env: Option<String>,
    /// A file holding the key (trailing CR/LF removed). Relative paths are relative to the
    /// routes file.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub file: Option<String>,
    /// A key of a Kubernetes Secret in the route's namespace (Kubernetes only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub secret_ref: Option<SecretKeyRef>,
}

/// A key of a Kubernetes Secret.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct SecretKeyRef {
    /// Secret name.
    pub name: String,
    /// Key within the Secret's data.
    pub key: String,
}

/// Size, rate and connection limits.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", default)]
pub struct LimitsSpec {
    /// Largest client message; a bigger one closes the client with 1009.
    #[schemars(range(min = 1, max = MAX_MESSAGE_BYTES))]
    pub max_message_bytes: u64,
    /// Content bytes batched into one backend request. It caps batching only: a single
    /// message larger than this still goes, alone.
    #[schemars(range(min = 1, max = MAX_MESSAGE_BYTES))]
    pub max_batch_bytes: u64,
    /// Largest backend response body.
    #[schemars(range(min = 1, max = MAX_BUFFER_BYTES))]
    pub max_response_bytes: u64,
    /// Largest backend body passed through when the backend rejects a handshake.
    #[schemars(range(max = MAX_BUFFER_BYTES))]
    pub max_reject_body_bytes: u64,
    /// Bytes queued toward one slow client before it is disconnected.
    #[schemars(range(min = 1, max = MAX_BUFFER_BYTES))]
    pub outbound_queue_bytes: u64,
    /// Client messages per second per connection; `0`: unlimited.
    pub messages_per_second: u32,
    /// Concurrent connections on this route; `0`: unlimited.
    pub max_connections: u64,
}

impl Default for LimitsSpec {
    fn default() -> Self {
        Self {
            max_message_bytes: 1_048_576,
            max_batch_bytes: 200_000,
            max_response_bytes: 1_000_000,
            max_reject_body_bytes: 100_000,
            outbound_queue_bytes: 1_048_576,
            messages_per_second: 0,
            max_connections: 0,
        }
    }
}

/// Backend timeouts.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", default)]
pub struct TimeoutsSpec {
    /// TCP (and TLS) connect.
    pub connect: DurationSpec,
    /// A whole backend request, body included.
    pub request: DurationSpec,
    /// How long a close waits for the other side's answering close (client or backend).
    pub close: DurationSpec,
}

impl Default for TimeoutsSpec {
    fn default() -> Self {
        Self {
            connect: DurationSpec::from_secs(5),
            request: DurationSpec::from_secs(30),
            close: DurationSpec::from_secs(5),
        }
    }
}

/// Retries of backend requests that failed before their body was sent.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", default)]
pub struct RetriesSpec {
    /// Tries in total, the first included.
    #[schemars(range(min = 1, max = MAX_RETRY_ATTEMPTS))]
    pub attempts: u32,
    /// Delay before the first retry; it doubles (with jitter) up to `maxBackoff`.
    pub initial_backoff: DurationSpec,
    /// Longest delay between tries.
    pub max_backoff: DurationSpec,
}

impl Default for RetriesSpec {
    fn default() -> Self {
        Self {
            attempts: 5,
            initial_backoff: DurationSpec::from_secs(1),
            max_backoff: DurationSpec::from_secs(30),
        }
    }
}
