//! The one route model: serde + schemars types, validation, the route table and the
//! routes-file loader with hot reload.
//!
//! Three sources feed one model (DESIGN.md): the `--backend` flag ([`Route::catch_all`]), a
//! routes file ([`load_routes_file`], [`watch_routes_file`]) and, later, the controller, which
//! turns each `WebSocketRoute` (whose `spec` is a [`RouteSpec`], schema from
//! [`route_spec_schema`]) into a [`Route`] with [`Route::compile`] and a [`CompileContext`]
//! carrying its namespace and Secrets.
//!
//! ```text
//! YAML / CRD ──serde──▶ RouteSpec ──Route::compile (all checks)──▶ Route ──▶ RouteTable (ArcSwap)
//! ```
//!
//! - [`model`]: the serde model ([`RouteSpec`] and its parts). Plain data, no validation.
//! - [`duration`]: [`DurationSpec`], durations written as `"30s"`.
//! - [`schema`](route_spec_schema): the structural schemas, and the first pass of the file
//!   loader that checks a document against them (unknown fields, types, ranges).
//! - [`Route`] and its parts: the compiled, validated form the data plane uses; no serde
//!   types in it.
//! - [`RouteTable`]: routes indexed for matching (exact host, wildcard, any host; then the
//!   longest path prefix).
//! - Errors: [`ConfigError`] lists every problem, each a [`FieldError`] naming its field
//!   (`routes[1].backend.url: scheme must be http, https, ws or wss (got "ftp")`).
//!
//! # Routes file
//!
//! ```yaml
//! routes:
//!   - name: chat
//!     match: { hostnames: ["chat.example.com"], pathPrefixes: ["/ws"] }
//!     backend: { url: "http://127.0.0.1:8080/base", pathRewrite: "/" }
//! ```
//!
//! `examples/routes.yaml` shows every field. `workloadSelector` is accepted and ignored
//! outside Kubernetes; `signingKey.secretRef` is an error outside Kubernetes.
//!
//! Limits worth knowing: `limits.maxBatchBytes` caps *batching* only: a single client
//! message larger than it (but within `maxMessageBytes`) is still sent, alone in its request.

pub mod control;
pub mod duration;
mod error;
mod file;
pub mod model;
mod reload;
mod route;
mod schema;
mod table;

pub use duration::DurationSpec;
pub use error::{ConfigError, FieldError, RouteError};
pub use file::{INITIAL_VERSION, load_routes_file, parse_routes_yaml, parse_routes_yaml_with};
pub use model::{RouteEntry, RouteSpec, RoutesFile};
pub use reload::{ReloadState, ReloadStatus, watch_routes_file};
pub use route::{
    Backend, CompileContext, ForwardedFor, Grip, HeaderRules, HostMatch, KeepAlive, Limits, MAX_BUFFER_BYTES,
    MAX_MESSAGE_BYTES, MAX_RETRY_ATTEMPTS, MIN_KEEPALIVE, Retries, Route, RouteMatch, SecretResolver, Timeouts,
};
pub use schema::{route_spec_schema, routes_file_schema};
pub use table::RouteTable;

#[cfg(test)]
mod tests;
