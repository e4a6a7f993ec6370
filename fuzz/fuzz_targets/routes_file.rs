//! Fuzzes the routes file as `--config` loads it: YAML (or JSON, a subset) text through the
//! schema check, route compilation and the cross-route checks (`parse_routes_yaml_with`), then
//! the route table. Nothing may panic; a rejected file is an `Err` whose every problem names a
//! field of the document; an accepted file builds a table whose routes have
//! unique DNS-label names, and matching any host and path against it, and building the backend
//! URI for a match, never panics.
#![no_main]

use libfuzzer_sys::fuzz_target;
use wsgate::config::{CompileContext, RouteTable, parse_routes_yaml_with};

/// `signingKey.env` finds a variable only when its name starts with `K`.
fn env(name: &str) -> Option<String> {
    name.starts_with('K').then(|| format!("value-of-{name}"))
}

fn is_dns_label(name: &str) -> bool {
    (1..=63).contains(&name.len())
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !name.starts_with('-')
        && !name.ends_with('-')
}

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    // `signingKey.file` reads the named file: keep the fuzzer away from device files that never
    // end (`/dev/zero`) or block (`/dev/stdin`).
    if text.contains("/dev") || text.contains("/proc") || text.contains("/sys") {
        return;
    }
    let ctx = CompileContext {
        env: &env,
        base_dir: Some(std::path::Path::new("/nonexistent-wsgate-fuzz")),
        ..CompileContext::default()
    };
    let routes = match parse_routes_yaml_with(text, &ctx) {
        Ok(routes) => routes,
        Err(e) => {
            assert!(!e.errors().is_empty(), "an error names at least one problem");
            for field in e.errors() {
                assert!(
                    field.path.is_empty() || field.path.starts_with("routes") || text.contains(field.path.as_str()),
                    "a problem names a field of the document: {field:?}"
                );
                assert!(!field.message.is_empty());
            }
            let _ = e.to_string();
            return;
        }
    };
    let mut names: Vec<&str> = routes.iter().map(|r| r.name.as_str()).collect();
    assert!(names.iter().all(|n| is_dns_label(n)), "{names:?}");
    names.sort_unstable();
    let count = names.len();
    names.dedup();
    assert_eq!(names.len(), count, "route names are unique");

    // Parsing succeeded, so the table's own checks (names, overlaps) pass too.
    let table = match RouteTable::new(routes, 1) {
        Ok(t) => t,
        Err(e) => panic!("accepted routes make no table: {e}"),
    };
    // Hosts and paths taken from the input itself, plus fixed ones.
    let words: Vec<&str> = text
        .split(|c: char| c.is_whitespace() || matches!(c, '"' | '\'' | ',' | '[' | ']' | '{' | '}'))
        .filter(|w| !w.is_empty())
        .take(16)
        .collect();
    for host in [None, Some("example.com"), Some("a.example.com:8080")]
        .into_iter()
        .chain(words.iter().map(|w| Some(*w)))
    {
        for path in ["/", "/ws", "/ws/chat?x=1", "//", "/a/../b"]
            .into_iter()
            .chain(words.iter().copied())
        {
            if let Some((route, prefix)) = table.match_route(host, path) {
                let _ = route.backend.uri_for(prefix, path);
            }
        }
    }
});
