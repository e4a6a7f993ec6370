//! [`RouteTable`]: an immutable, versioned set of routes indexed for matching.
//!
//! The gateway holds the current table in an `ArcSwap`; a new version replaces it whole, so
//! a connection keeps the `Arc<Route>` it matched for its lifetime while new connections see
//! the new routes.

use std::borrow::Cow;
use std::collections::HashMap;
use std::sync::Arc;

use super::error::{ConfigError, FieldError};
use super::route::{HostMatch, Route, prefix_matches};

/// One (path prefix → route) candidate under a host key.
#[derive(Debug, Clone)]
struct Candidate {
    prefix: String,
    route: usize,
}

/// The first candidate (longest prefix first) whose prefix matches `path`.
fn first_match<'a>(list: &'a [Candidate], path: &str) -> Option<&'a Candidate> {
    list.iter().find(|c| prefix_matches(&c.prefix, path))
}

/// Routes indexed for matching. Build with [`RouteTable::new`].
#[derive(Debug, Clone, Default)]
pub struct RouteTable {
    version: u64,
    routes: Vec<Arc<Route>>,
    by_name: HashMap<String, usize>,
    /// Exact host → candidates, longest prefix first.
    exact: HashMap<String, Vec<Candidate>>,
    /// Wildcard suffix (`.example.com`) → candidates; longest suffix first, each list longest
    /// prefix first.
    wildcard: Vec<(String, Vec<Candidate>)>,
    /// Routes without hostnames, longest prefix first.
    any_host: Vec<Candidate>,
    /// SHA-256 of the routes file this table was loaded from, if any (hot reload).
    source_digest: Option<[u8; 32]>,
}

impl RouteTable {
    /// Indexes `routes` as version `version`.
    ///
    /// # Errors
    ///
    /// Duplicate route names, and the same (host pattern, path prefix) pair in two routes
    /// (which would make matching ambiguous). Paths are `routes[i]` by position in `routes`.
    pub fn new(routes: Vec<Route>, version: u64) -> Result<Self, ConfigError> {
        let mut errors = duplicate_names(routes.iter().map(|r| r.name.as_str()).enumerate());
        errors.extend(overlapping_matches(routes.iter().enumerate()));
        if !errors.is_empty() {
            return Err(ConfigError::new(errors));
        }
        let routes: Vec<Arc<Route>> = routes.into_iter().map(Arc::new).collect();
        let mut table = RouteTable {
            version,
            by_name: routes.iter().enumerate().map(|(i, r)| (r.name.clone(), i)).collect(),
            ..RouteTable::default()
        };
        let mut wildcard: HashMap<String, Vec<Candidate>> = HashMap::new();
        for (index, route) in routes.iter().enumerate() {
            for prefix in &route.matcher.path_prefixes {
                let candidate = Candidate {
                    prefix: prefix.clone(),
                    route: index,
                };
                if route.matcher.hostnames.is_empty() {
                    table.any_host.push(candidate.clone());
                }
                for host in &route.matcher.hostnames {
                    let list = match host {
                        HostMatch::Exact(h) => table.exact.entry(h.clone()).or_default(),
                        HostMatch::Wildcard(suffix) => wildcard.entry(suffix.clone()).or_default(),
                    };
                    list.push(candidate.clone());
                }
            }
        }
        table.wildcard = wildcard.into_iter().collect();
        table
            .wildcard
            .sort_by(|a, b| b.0.len().cmp(&a.0.len()).then_with(|| a.0.cmp(&b.0)));
        let by_prefix_len = |list: &mut Vec<Candidate>| list.sort_by_key(|c| std::cmp::Reverse(c.prefix.len()));
        table.exact.values_mut().for_each(by_prefix_len);
        table.wildcard.iter_mut().for_each(|(_, list)| by_prefix_len(list));
        by_prefix_len(&mut table.any_host);
        table.routes = routes;
        Ok(table)
    }

    /// The table's version (routes-file reloads count up from 1).
    pub fn version(&self) -> u64 {
        self.version
    }

    /// The most specific route for a request: an exact host beats a wildcard (longer suffix
    /// first) beats any-host routes; within those, the longest matching path prefix wins.
    /// A host tier without a matching prefix falls through to the next tier.
    ///
    /// `host` is the `Host` header or `:authority` as sent (case and port are ignored);
    /// `path` is the request path (a `?query` is ignored). Returns the route and the matched
    /// path prefix (normalized: `/` or without a trailing `/`), as
    /// [`Backend::uri_for`](super::Backend::uri_for) takes it.
    pub fn match_route(&self, host: Option<&str>, path: &str) -> Option<(Arc<Route>, &str)> {
        let path = path.split_once('?').map_or(path, |(p, _)| p);
        let host = host.and_then(normalize_host);
        let mut found = None;
        if let Some(host) = host.as_deref() {
            found = self.exact.get(host).and_then(|list| first_match(list, path));
            if found.is_none() {
                found = self
                    .wildcard
                    .iter()
                    .filter(|(suffix, _)| host.len() > suffix.len() && host.ends_with(suffix.as_str()))
                    .find_map(|(_, list)| first_match(list, path));
            }
        }
        let found = found.or_else(|| first_match(&self.any_host, path))?;
        let route = self.routes.get(found.route)?;
        Some((Arc::clone(route), found.prefix.as_str()))
    }

    /// The route named `name`.
    pub fn get(&self, name: &str) -> Option<Arc<Route>> {
        self.by_name.get(name).and_then(|i| self.routes.get(*i)).cloned()
    }

    /// All routes, in the order given to [`RouteTable::new`].
    pub fn routes(&self) -> &[Arc<Route>] {
        &self.routes
    }

    /// Records the digest of the file this table came from (used by the file watcher).
    pub(crate) fn with_source_digest(mut self, digest: [u8; 32]) -> Self {
        self.source_digest = Some(digest);
        self
    }

    /// The digest recorded by [`with_source_digest`](Self::with_source_digest).
    pub(crate) fn source_digest(&self) -> Option<[u8; 32]> {
        self.source_digest
    }
}

/// Lowercases a `Host` value and strips its port and a trailing dot; `None` if empty.
/// `[::1]:8080` → `[::1]`.
pub(crate) fn normalize_host(host: &str) -> Option<Cow<'_, str>> {
    let host = host.trim();
    let without_port = if host.starts_with('[') {
        host.find(']').map_or(host, |end| &host[..=end])
    } else {
        match host.rsplit_once(':') {
            Some((name, port)) if port.bytes().all(|b| b.is_ascii_digit()) => name,
            _ => host,
        }
    };
    let host = without_port.strip_suffix('.').unwrap_or(without_port);
    if host.is_empty() {
        return None;
    }
    Some(if host.bytes().any(|b| b.is_ascii_uppercase()) {
        Cow::Owned(host.to_ascii_lowercase())
    } else {
        Cow::Borrowed(host)
    })
}

/// `routes[i].name` errors for names used twice.
pub(crate) fn duplicate_names<'a>(names: impl Iterator<Item = (usize, &'a str)>) -> Vec<FieldError> {
    let mut first: HashMap<&str, usize> = HashMap::new();
    let mut errors = Vec::new();
    for (index, name) in names {
        if let Some(previous) = first.get(name) {
            errors.push(FieldError::new(
                format!("routes[{index}].name"),
                format!("duplicate route name {name:?} (also routes[{previous}])"),
            ));
        } else {
            first.insert(name, index);
        }
    }
    errors
}

/// `routes[i].match` errors for (host, prefix) pairs already claimed by an earlier route.
pub(crate) fn overlapping_matches<'a>(routes: impl Iterator<Item = (usize, &'a Route)>) -> Vec<FieldError> {
    let mut claimed: HashMap<(Option<&HostMatch>, &str), (usize, &str)> = HashMap::new();
    let mut errors = Vec::new();
    for (index, route) in routes {
        let hosts: Vec<Option<&HostMatch>> = if route.matcher.hostnames.is_empty() {
            vec![None]
        } else {
            route.matcher.hostnames.iter().map(Some).collect()
        };
        for host in hosts {
            for prefix in &route.matcher.path_prefixes {
                match claimed.get(&(host, prefix.as_str())) {
                    Some((other, other_name)) if *other != index => {
                        let host_text =
                            host.map_or_else(|| "any host".to_owned(), |h| format!("host {h:?}", h = h.to_string()));
                        errors.push(FieldError::new(
                            format!("routes[{index}].match"),
                            format!(
                                "{host_text} with path prefix {prefix:?} is already matched by route {other_name:?} (routes[{other}])"
                            ),
                        ));
                    }
                    Some(_) => {}
                    None => {
                        claimed.insert((host, prefix.as_str()), (index, route.name.as_str()));
                    }
                }
            }
        }
    }
    errors
}
