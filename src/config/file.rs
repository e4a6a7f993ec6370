//! The routes-file loader: YAML text → checked document → compiled routes → [`RouteTable`].
//!
//! Problems are collected, not stopped at: the document is first checked against the route
//! model's structural schema (unknown fields, types, enum values, durations, numeric ranges),
//! then every route is compiled, then names and matches are checked across routes. Every
//! problem names its field, e.g. `routes[1].backend.url: scheme must be http, https, ws or wss
//! (got "ftp")`.

use std::path::Path;

use serde_yaml::Value as Yaml;
use sha2::{Digest, Sha256};

use super::error::ConfigError;
use super::model::RoutesFile;
use super::route::{CompileContext, Route};
use super::schema::check_routes_document;
use super::table::{RouteTable, duplicate_names, overlapping_matches};

/// Version of a table loaded by [`load_routes_file`]; each hot reload adds one.
pub const INITIAL_VERSION: u64 = 1;

/// Parses and validates a routes file with the default [`CompileContext`] (process
/// environment, no Kubernetes Secrets, relative key files relative to the working directory).
///
/// # Errors
///
/// All problems found, each naming its field.
pub fn parse_routes_yaml(text: &str) -> Result<Vec<Route>, ConfigError> {
    parse_routes_yaml_with(text, &CompileContext::default())
}

/// Parses and validates a routes file with an explicit context.
///
/// # Errors
///
/// All problems found, each naming its field.
pub fn parse_routes_yaml_with(text: &str, ctx: &CompileContext<'_>) -> Result<Vec<Route>, ConfigError> {
    let document: Yaml =
        serde_yaml::from_str(text).map_err(|e| ConfigError::single("", format!("invalid YAML: {e}")))?;
    if document.is_null() {
        return Err(ConfigError::single(
            "",
            "the routes file is empty (expected \"routes:\" with a list of routes)",
        ));
    }
    let mut errors = Vec::new();
    check_routes_document(&document, &mut errors);
    let file: RoutesFile = match serde_yaml::from_value(document) {
        Ok(file) => file,
        Err(e) if errors.is_empty() => return Err(ConfigError::single("", e.to_string())),
        // The schema check already explained why; serde's message would repeat it less precisely.
        Err(_) => return Err(ConfigError::new(errors)),
    };
    let schema_paths: Vec<String> = errors.iter().map(|e| e.path.clone()).collect();
    let already_reported = |path: &str| {
        schema_paths.iter().any(|p| {
            path == p
                || path
                    .strip_prefix(p.as_str())
                    .is_some_and(|rest| rest.starts_with(['.', '[']))
        })
    };

    let mut routes = Vec::with_capacity(file.routes.len());
    let mut compiled = Vec::with_capacity(file.routes.len());
    for (index, entry) in file.routes.iter().enumerate() {
        match Route::compile_entry(entry, ctx) {
            Ok(route) => {
                compiled.push(index);
                routes.push(route);
            }
            Err(route_errors) => {
                let prefix = format!("routes[{index}]");
                errors.extend(
                    route_errors
                        .into_iter()
                        .map(|e| e.prefixed(&prefix))
                        .filter(|e| !already_reported(&e.path)),
                );
            }
        }
    }
    errors.extend(duplicate_names(file.routes.iter().map(|e| e.name.as_str()).enumerate()));
    errors.extend(overlapping_matches(compiled.iter().copied().zip(routes.iter())));
    if errors.is_empty() {
        Ok(routes)
    } else {
        errors.sort_by_key(|e| route_index(&e.path));
        Err(ConfigError::new(errors))
    }
}

/// The `N` of a path starting with `routes[N]`; `None` (sorted first) otherwise.
fn route_index(path: &str) -> Option<usize> {
    let rest = path.strip_prefix("routes[")?;
    rest[..rest.find(']')?].parse().ok()
}

/// Reads, parses and validates a routes file into a table of version [`INITIAL_VERSION`].
/// Relative `signingKey.file` paths are relative to the file's directory.
///
/// # Errors
///
/// The file cannot be read or is not UTF-8 (one problem naming the file), or all problems of
/// its content.
pub fn load_routes_file(path: &Path) -> Result<RouteTable, ConfigError> {
    let bytes = std::fs::read(path).map_err(|e| read_error(path, &e))?;
    load_routes_bytes(path, &bytes, INITIAL_VERSION, &|name| std::env::var(name).ok())
}

pub(crate) fn read_error(path: &Path, error: &std::io::Error) -> ConfigError {
    ConfigError::single("", format!("cannot read routes file {}: {error}", path.display()))
}

/// Parses file content already read from `path` into a table of `version`.
pub(crate) fn load_routes_bytes(
    path: &Path,
    bytes: &[u8],
    version: u64,
    env: &dyn Fn(&str) -> Option<String>,
) -> Result<RouteTable, ConfigError> {
    let text = std::str::from_utf8(bytes)
        .map_err(|e| ConfigError::single("", format!("routes file {} is not UTF-8: {e}", path.display())))?;
    let ctx = CompileContext {
        env,
        base_dir: path.parent(),
        ..CompileContext::default()
    };
    let routes = parse_routes_yaml_with(text, &ctx)?;
    Ok(RouteTable::new(routes, version)?.with_source_digest(digest(bytes)))
}

pub(crate) fn digest(bytes: &[u8]) -> [u8; 32] {
    Sha256::digest(bytes).into()
}
