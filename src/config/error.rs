//! Configuration errors: every problem found, each naming the field it is about.

use std::fmt;

/// One problem with one field, e.g. `routes[1].backend.url: scheme must be http, https, ws or
/// wss (got "ftp")`.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct FieldError {
    /// Where the problem is, in the document's own (camelCase) names: `routes[1].backend.url`.
    /// Empty for the document as a whole.
    pub path: String,
    /// What is wrong, as a sentence fragment.
    pub message: String,
}

impl FieldError {
    /// A problem at `path`.
    pub fn new(path: impl Into<String>, message: impl Into<String>) -> Self {
        Self {
            path: path.into(),
            message: message.into(),
        }
    }

    /// The same problem, with `prefix` (e.g. `routes[1]` or `spec`) put in front of its path.
    #[must_use]
    pub fn prefixed(mut self, prefix: &str) -> Self {
        self.path = join_path(prefix, &self.path);
        self
    }
}

impl fmt::Display for FieldError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.path.is_empty() {
            f.write_str(&self.message)
        } else {
            write!(f, "{}: {}", self.path, self.message)
        }
    }
}

impl std::error::Error for FieldError {}

/// Joins two field paths: `("routes[1]", "backend.url")` → `routes[1].backend.url`,
/// `("routes", "[1]")` → `routes[1]`.
pub(crate) fn join_path(prefix: &str, rest: &str) -> String {
    if prefix.is_empty() {
        rest.to_owned()
    } else if rest.is_empty() {
        prefix.to_owned()
    } else if rest.starts_with('[') {
        format!("{prefix}{rest}")
    } else {
        format!("{prefix}.{rest}")
    }
}

/// A configuration that cannot be used, with all of its problems (never empty). `Display`
/// prints one problem per line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    errors: Vec<FieldError>,
}

impl ConfigError {
    /// An error from a list of problems. An empty list becomes one generic problem, so a
    /// `ConfigError` always says something.
    pub fn new(errors: Vec<FieldError>) -> Self {
        if errors.is_empty() {
            return Self::single("", "invalid configuration");
        }
        Self { errors }
    }

    /// An error with one problem.
    pub fn single(path: impl Into<String>, message: impl Into<String>) -> Self {
        Self {
            errors: vec![FieldError::new(path, message)],
        }
    }

    /// The problems, in document order.
    pub fn errors(&self) -> &[FieldError] {
        &self.errors
    }

    /// Consumes the error, returning its problems.
    pub fn into_errors(self) -> Vec<FieldError> {
        self.errors
    }

    /// The same problems with `prefix` put in front of every path.
    #[must_use]
    pub fn prefixed(self, prefix: &str) -> Self {
        Self {
            errors: self.errors.into_iter().map(|e| e.prefixed(prefix)).collect(),
        }
    }
}

impl From<FieldError> for ConfigError {
    fn from(error: FieldError) -> Self {
        Self { errors: vec![error] }
    }
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, error) in self.errors.iter().enumerate() {
            if i > 0 {
                f.write_str("\n")?;
            }
            write!(f, "{error}")?;
        }
        Ok(())
    }
}

impl std::error::Error for ConfigError {}

/// A backend URI could not be built for a request (see
/// [`Backend::uri_for`](super::Backend::uri_for)).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RouteError {
    /// The request path does not start with the matched prefix it was given.
    #[error("request path {path:?} does not start with the matched prefix {prefix:?}")]
    PrefixMismatch {
        /// The matched prefix.
        prefix: String,
        /// The request path.
        path: String,
    },
    /// The request target is not an origin-form path (`/...`).
    #[error("request target {0:?} is not a path starting with '/'")]
    NotAPath(String),
    /// The rewritten path and query do not form a valid URI.
    #[error("invalid backend URI for {path_and_query:?}: {reason}")]
    InvalidUri {
        /// The rewritten path and query.
        path_and_query: String,
        /// Why `http` rejected it.
        reason: String,
    },
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_join_with_dots_and_brackets() {
        assert_eq!(join_path("routes[1]", "backend.url"), "routes[1].backend.url");
        assert_eq!(join_path("routes", "[1]"), "routes[1]");
        assert_eq!(join_path("", "name"), "name");
        assert_eq!(join_path("spec", ""), "spec");
    }

    #[test]
    fn display_prints_one_problem_per_line() {
        let err = ConfigError::new(vec![
            FieldError::new("backend.url", "bad"),
            FieldError::new("", "whole document"),
        ])
        .prefixed("routes[2]");
        assert_eq!(err.to_string(), "routes[2].backend.url: bad\nroutes[2]: whole document");
        assert_eq!(err.errors().len(), 2);
    }

    #[test]
    fn empty_list_still_says_something() {
        assert_eq!(ConfigError::new(Vec::new()).to_string(), "invalid configuration");
    }
}
