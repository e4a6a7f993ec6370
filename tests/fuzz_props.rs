//! The fuzz targets' properties as proptests, so every `cargo test` runs them (libFuzzer runs
//! only by hand, docs/FUZZING.md): the websocket-events decoder, GRIP control messages, publish
//! bodies and the routes file (`--config`), each fed random bytes and valid inputs mutated
//! byte-wise and token-wise. Nothing may panic; bad input is an `Err` that says what is wrong;
//! whatever is accepted satisfies the invariants the rest of the gateway relies on.
//!
//! The codec modules' own proptests (`protocol::events::tests`, `protocol::control::tests`,
//! `protocol::publish::tests`, `protocol::frame::tests`) cover round trips and split points;
//! these add structure-aware mutation of valid seeds, which reaches deeper than random bytes.

use bytes::{Bytes, BytesMut};
use proptest::prelude::*;

use wsgate::config::{CompileContext, RouteTable, parse_routes_yaml_with};
use wsgate::protocol::control::{self, Classified, ControlMessage, MAX_CONTROL_FRAME_PAYLOAD, MessageType};
use wsgate::protocol::events::{self, Decoder, Event};
use wsgate::protocol::frame::CloseFrame;
use wsgate::protocol::publish::{self, MAX_CLOSE_REASON_BYTES, WsMessageAction};

/// One edit of a seed. Positions are taken modulo the seed's length.
#[derive(Debug, Clone)]
enum Mutation {
    /// Replace one byte.
    Set(usize, u8),
    /// Remove up to `len` bytes.
    Delete(usize, usize),
    /// Insert bytes.
    Insert(usize, Vec<u8>),
    /// Repeat up to `len` bytes in place.
    Duplicate(usize, usize),
    /// Insert a token that parsers treat specially.
    Token(usize, &'static str),
    /// Cut the input here.
    Truncate(usize),
}

/// Tokens that mean something to JSON, YAML, the events codec or the route model.
const TOKENS: &[&str] = &[
    "",
    "\r\n",
    "\n",
    "\0",
    "\"",
    "'",
    "{",
    "}",
    "[",
    "]",
    ":",
    ",",
    "-",
    "- ",
    "~",
    "null",
    "true",
    "0",
    "-1",
    "1e400",
    "18446744073709551616",
    "0x10",
    "0s",
    "1ms",
    "99999h",
    "&a ",
    "*a",
    "!!binary ",
    "? ",
    "|",
    ">",
    "#",
    "\\u0000",
    "\u{feff}",
    "é",
    "*",
    "*.",
    "/",
    "//",
    "..",
    "?",
    "%",
    "http://",
    "https://",
    "ftp://",
    "ws://",
    "[::1]",
    "127.0.0.1:0",
    "ffffffffffffffff",
    "TEXT ",
    "CLOSE ",
    "OPEN",
    "c:",
    "m:",
    "routes:",
    "name:",
    "backend:",
    "url:",
    "port:",
    "match:",
    "hostnames:",
    "pathPrefixes:",
    "signingKey:",
    "env:",
    "value:",
    "file:",
    "secretRef:",
    "headers:",
    "add:",
    "limits:",
    "timeouts:",
    "retries:",
    "keepAlive:",
    "grip:",
    "channel",
    "content",
    "content-bin",
    "action",
    "close",
    "code",
    "items",
    "formats",
    "ws-message",
];

fn mutation() -> impl Strategy<Value = Mutation> {
    prop_oneof![
        (any::<usize>(), any::<u8>()).prop_map(|(at, b)| Mutation::Set(at, b)),
        (any::<usize>(), 1..16usize).prop_map(|(at, len)| Mutation::Delete(at, len)),
        (any::<usize>(), proptest::collection::vec(any::<u8>(), 1..8)).prop_map(|(at, b)| Mutation::Insert(at, b)),
        (any::<usize>(), 1..64usize).prop_map(|(at, len)| Mutation::Duplicate(at, len)),
        (any::<usize>(), proptest::sample::select(TOKENS)).prop_map(|(at, t)| Mutation::Token(at, t)),
        any::<usize>().prop_map(Mutation::Truncate),
    ]
}

fn mutate(seed: &[u8], mutations: &[Mutation]) -> Vec<u8> {
    let mut out = seed.to_vec();
    for m in mutations {
        let at = |p: usize, len: usize| if len == 0 { 0 } else { p % (len + 1) };
        match m {
            Mutation::Set(p, b) => {
                if !out.is_empty() {
                    let i = p % out.len();
                    out[i] = *b;
                }
            }
            Mutation::Delete(p, len) => {
                let i = at(*p, out.len());
                let end = (i + len).min(out.len());
                out.drain(i..end);
            }
            Mutation::Insert(p, bytes) => {
                let i = at(*p, out.len());
                out.splice(i..i, bytes.iter().copied());
            }
            Mutation::Duplicate(p, len) => {
                let i = at(*p, out.len());
                let end = (i + len).min(out.len());
                let copy = out[i..end].to_vec();
                out.splice(i..i, copy);
            }
            Mutation::Token(p, t) => {
                let i = at(*p, out.len());
                out.splice(i..i, t.bytes());
            }
            Mutation::Truncate(p) => {
                let i = at(*p, out.len());
                out.truncate(i);
            }
        }
    }
    out
}

fn config() -> ProptestConfig {
    ProptestConfig {
        // `PROPTEST_CASES=100000` for a deeper run by hand.
        cases: std::env::var("PROPTEST_CASES")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(512),
        // Integration tests have no `src/` beside them to persist failures to; a failure
        // prints its minimal input.
        failure_persistence: None,
        ..ProptestConfig::default()
    }
}

// -------------------------------------------------------------------------------------------
// websocket-events

fn event() -> impl Strategy<Value = Event> {
    let payload = proptest::collection::vec(any::<u8>(), 0..40).prop_map(Bytes::from);
    prop_oneof![
        Just(Event::Open),
        payload.clone().prop_map(Event::Text),
        payload.clone().prop_map(Event::Binary),
        payload.clone().prop_map(Event::Ping),
        payload.prop_map(Event::Pong),
        Just(Event::Close(None)),
        (any::<u16>(), ".{0,10}").prop_map(|(code, reason)| Event::Close(Some(CloseFrame { code, reason }))),
        Just(Event::Disconnect),
    ]
}

/// Feeds `input` to a [`Decoder`] in `chunk`-byte pieces; the events, and whether the whole
/// stream decoded cleanly. Every decoded event respects `limit`.
fn stream(input: &[u8], chunk: usize, limit: usize) -> (Vec<Event>, bool) {
    let mut decoder = Decoder::new(limit);
    let mut buf = BytesMut::new();
    let mut out = Vec::new();
    for piece in input.chunks(chunk.max(1)) {
        buf.extend_from_slice(piece);
        loop {
            match decoder.decode(&mut buf) {
                Ok(Some(event)) => {
                    assert!(event.content_len() <= limit, "{event:?} over {limit}");
                    out.push(event);
                }
                Ok(None) => break,
                Err(e) => {
                    assert!(!e.to_string().is_empty());
                    return (out, false);
                }
            }
        }
    }
    let clean = decoder.finish(&buf).is_ok();
    (out, clean)
}

fn check_events(input: &[u8], chunk: usize, limit: usize) {
    let (streamed, clean) = stream(input, chunk, limit);
    let body = events::decode_body(Bytes::copy_from_slice(input), limit);
    if let Ok(events) = &body {
        assert!(events.iter().all(|e| e.content_len() <= limit));
        // Nothing follows a CLOSE or DISCONNECT in a body.
        if let Some(i) = events
            .iter()
            .position(|e| matches!(e, Event::Close(_) | Event::Disconnect))
        {
            assert_eq!(i + 1, events.len(), "{events:?}");
        }
    }
    if clean {
        let end = streamed
            .iter()
            .position(|e| matches!(e, Event::Close(_) | Event::Disconnect))
            .map_or(streamed.len(), |i| i + 1);
        assert_eq!(body.as_deref(), Ok(&streamed[..end]));
    }
}

// -------------------------------------------------------------------------------------------
// Control messages

fn control_message() -> impl Strategy<Value = ControlMessage> {
    prop_oneof![
        ("[a-z#*]{1,12}", proptest::collection::vec("[a-z-]{1,10}", 0..3))
            .prop_map(|(channel, filters)| ControlMessage::Subscribe { channel, filters }),
        "[a-z]{1,12}".prop_map(|channel| ControlMessage::Unsubscribe { channel }),
        Just(ControlMessage::Detach),
        ("[a-z]{1,8}", proptest::option::of(".{0,8}"))
            .prop_map(|(name, value)| ControlMessage::SetMeta { name, value }),
        Just(ControlMessage::KeepAlive(None)),
        Just(ControlMessage::FlushDelayed),
        proptest::option::of("[a-z0-9]{1,12}").prop_map(|id| ControlMessage::Session { id }),
    ]
}

fn check_control(data: &[u8], prefix_len: usize) {
    if let Ok(msg) = control::parse_control(data) {
        match &msg {
            ControlMessage::Subscribe { channel, .. } | ControlMessage::Unsubscribe { channel } => {
                assert!(!channel.is_empty())
            }
            ControlMessage::SetMeta { name, .. } => assert!(!name.is_empty()),
            ControlMessage::Session { id } => assert_ne!(id.as_deref(), Some("")),
            ControlMessage::KeepAlive(Some(t)) | ControlMessage::SendDelayed(t) => {
                assert_ne!(t.timeout_secs, 0);
                match t.kind {
                    MessageType::Text => assert!(std::str::from_utf8(&t.content).is_ok()),
                    MessageType::Ping | MessageType::Pong => assert!(t.content.len() <= MAX_CONTROL_FRAME_PAYLOAD),
                    MessageType::Binary => {}
                }
            }
            ControlMessage::KeepAlive(None) | ControlMessage::Detach | ControlMessage::FlushDelayed => {}
        }
        // What parses re-encodes to itself.
        let wire = control::encode_control(&msg);
        assert_eq!(control::classify_text(&wire, "m:"), Classified::Control(Ok(msg)));
    }
    let payload = Bytes::copy_from_slice(data);
    let prefix = std::str::from_utf8(data.get(..prefix_len.min(data.len())).unwrap_or_default())
        .unwrap_or(control::DEFAULT_MESSAGE_PREFIX);
    for classified in [
        control::classify_text(&payload, prefix),
        control::classify_binary(&payload, prefix),
    ] {
        match classified {
            Classified::Message(content) => assert_eq!(&payload[prefix.len()..], &content[..]),
            Classified::Control(Err(e)) => assert!(!e.to_string().is_empty()),
            _ => {}
        }
    }
    let _ = control::parse_grip_extension(&String::from_utf8_lossy(data));
}

// -------------------------------------------------------------------------------------------
// Publish bodies

fn ws_action() -> impl Strategy<Value = WsMessageAction> {
    prop_oneof![
        ".{0,20}".prop_map(|s| WsMessageAction::Send {
            kind: MessageType::Text,
            content: Bytes::from(s)
        }),
        proptest::collection::vec(any::<u8>(), 0..20).prop_map(|b| WsMessageAction::Send {
            kind: MessageType::Binary,
            content: Bytes::from(b)
        }),
        (proptest::option::of(3000..4999u16), ".{0,10}")
            .prop_map(|(code, reason)| WsMessageAction::Close { code, reason }),
        Just(WsMessageAction::Refresh),
    ]
}

fn check_publish(data: &[u8]) {
    match publish::parse_publish(data) {
        Ok(request) => {
            for item in &request.items {
                let Some(action) = &item.ws else { continue };
                match action {
                    WsMessageAction::Send { kind, content } => match kind {
                        MessageType::Text => assert!(std::str::from_utf8(content).is_ok()),
                        MessageType::Ping | MessageType::Pong => assert!(content.len() <= MAX_CONTROL_FRAME_PAYLOAD),
                        MessageType::Binary => {}
                    },
                    WsMessageAction::Close { code, reason } => {
                        assert!(code.is_none_or(publish::is_sendable_close_code));
                        assert!(reason.len() <= MAX_CLOSE_REASON_BYTES);
                    }
                    WsMessageAction::Refresh => {}
                }
                let again = publish::parse_publish(&publish::build_publish_body(&item.channel, action))
                    .expect("own output parses");
                assert_eq!(again.items[0].ws.as_ref(), Some(action));
            }
        }
        // The reason is sent verbatim in the 400 body.
        Err(e) => assert!(!e.to_string().is_empty()),
    }
}

// -------------------------------------------------------------------------------------------
// Routes file

/// A routes file using every field (keys from the environment, not from files).
const ROUTES_SEED: &str = r#"routes:
  - name: chat
    match:
      hostnames: ["chat.example.com", "*.example.com"]
      pathPrefixes: ["/ws", "/chat/"]
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
      forwardedFor: append
    meta: {allowed: [user, room]}
    keepAlive: {minInterval: 1s, clientPingInterval: 30s, clientIdleTimeout: 90s, relayPings: false}
    grip: {enabled: true, signingKey: {env: KEY_CHAT}, issuer: wsgate, maxSubscriptions: 20}
    limits: {maxMessageBytes: 1048576, maxBatchBytes: 200000, maxResponseBytes: 1000000}
    timeouts: {connect: 5s, request: 30s, close: 5s}
    retries: {attempts: 5, initialBackoff: 1s, maxBackoff: 30s}
  - name: svc
    match: {hostnames: ["api.example.com"]}
    backend: {service: {name: app, namespace: prod, port: 8080}}
    grip: {signingKey: {value: "base64:c2VjcmV0"}}
  - name: echo
    backend: {port: 9000}
"#;

/// The same document as JSON (YAML's subset), as some tools write it.
const ROUTES_JSON_SEED: &str = r#"{"routes":[{"name":"a","match":{"pathPrefixes":["/a"]},"backend":{"url":"https://a.example.com"},"grip":{"signingKey":{"value":"k"}}},{"name":"b","backend":{"port":1}}]}"#;

/// `signingKey.env` finds a variable only when its name starts with `K`.
fn fake_env(name: &str) -> Option<String> {
    name.starts_with('K').then(|| format!("value-of-{name}"))
}

fn check_routes(text: &str) {
    // `signingKey.file` reads the named file: never a device that blocks or never ends.
    if text.contains("/dev") || text.contains("/proc") || text.contains("/sys") {
        return;
    }
    let ctx = CompileContext {
        env: &fake_env,
        base_dir: Some(std::path::Path::new("/nonexistent-wsgate-fuzz")),
        ..CompileContext::default()
    };
    let first = parse_routes_yaml_with(text, &ctx);
    let second = parse_routes_yaml_with(text, &ctx);
    match (first, second) {
        (Err(e), Err(again)) => {
            assert_eq!(e.to_string(), again.to_string(), "deterministic");
            assert!(!e.errors().is_empty());
            for field in e.errors() {
                assert!(
                    field.path.is_empty() || field.path.starts_with("routes") || text.contains(field.path.as_str()),
                    "a problem names a field of the document: {field:?}"
                );
                assert!(!field.message.is_empty(), "{field:?}");
            }
        }
        (Ok(routes), Ok(again)) => {
            let names: Vec<String> = routes.iter().map(|r| r.name.clone()).collect();
            assert_eq!(names, again.iter().map(|r| r.name.clone()).collect::<Vec<_>>());
            let mut unique = names.clone();
            unique.sort();
            unique.dedup();
            assert_eq!(unique.len(), names.len(), "names are unique: {names:?}");
            let table = RouteTable::new(routes, 1).expect("accepted routes make a table");
            for host in [
                None,
                Some("chat.example.com"),
                Some("x.example.com:80"),
                Some("api.example.com"),
            ] {
                for path in ["/", "/ws", "/ws/x?y=1", "/chat", "/a/b", "//"] {
                    if let Some((route, prefix)) = table.match_route(host, path) {
                        let _ = route.backend.uri_for(prefix, path);
                    }
                }
            }
        }
        (a, b) => panic!("not deterministic: {:?} then {:?}", a.is_ok(), b.is_ok()),
    }
}

proptest! {
    #![proptest_config(config())]

    #[test]
    fn events_random_bytes(input in proptest::collection::vec(any::<u8>(), 0..256), chunk in 1..32usize, limit in 0..64usize) {
        check_events(&input, chunk, limit);
    }

    #[test]
    fn events_mutated(
        evs in proptest::collection::vec(event(), 1..6),
        mutations in proptest::collection::vec(mutation(), 1..4),
        chunk in 1..32usize,
        limit in 0..64usize,
    ) {
        let seed = events::encode(&evs);
        check_events(&mutate(&seed, &mutations), chunk, limit);
    }

    #[test]
    fn control_random_bytes(input in proptest::collection::vec(any::<u8>(), 0..128), prefix_len in 0..4usize) {
        check_control(&input, prefix_len);
    }

    #[test]
    fn control_mutated(msg in control_message(), mutations in proptest::collection::vec(mutation(), 1..4), prefix_len in 0..4usize) {
        let wire = control::encode_control(&msg);
        // Without the `c:` prefix: the JSON parser itself; with it: the classifier.
        check_control(&mutate(&wire[2..], &mutations), prefix_len);
        check_control(&mutate(&wire, &mutations), prefix_len);
    }

    #[test]
    fn publish_random_bytes(input in proptest::collection::vec(any::<u8>(), 0..128)) {
        check_publish(&input);
    }

    #[test]
    fn publish_mutated(
        channel in "[a-z]{1,8}",
        action in ws_action(),
        mutations in proptest::collection::vec(mutation(), 1..4),
    ) {
        let body = publish::build_publish_body(&channel, &action);
        check_publish(&mutate(&body, &mutations));
    }

    #[test]
    fn routes_random_text(text in "[ -~\n]{0,200}") {
        check_routes(&text);
    }

    #[test]
    fn routes_mutated(json in any::<bool>(), mutations in proptest::collection::vec(mutation(), 1..5)) {
        let seed = if json { ROUTES_JSON_SEED } else { ROUTES_SEED };
        check_routes(&String::from_utf8_lossy(&mutate(seed.as_bytes(), &mutations)));
    }

    #[test]
    fn routes_line_edits(
        edits in proptest::collection::vec((any::<usize>(), 0..3u8, any::<usize>()), 1..4),
    ) {
        // Whole lines removed, duplicated or moved: the YAML stays well-formed more often, so
        // the schema and route checks see the damage.
        let mut lines: Vec<&str> = ROUTES_SEED.lines().collect();
        for (at, op, to) in edits {
            if lines.is_empty() {
                break;
            }
            let i = at % lines.len();
            match op {
                0 => {
                    lines.remove(i);
                }
                1 => lines.insert(i, lines[i]),
                _ => {
                    let line = lines.remove(i);
                    lines.insert(to % (lines.len() + 1), line);
                }
            }
        }
        check_routes(&lines.join("\n"));
    }
}

/// The seeds themselves are valid: the mutations start from accepted documents.
#[test]
fn seeds_are_valid() {
    for seed in [ROUTES_SEED, ROUTES_JSON_SEED] {
        let ctx = CompileContext {
            env: &fake_env,
            ..CompileContext::default()
        };
        let routes = parse_routes_yaml_with(seed, &ctx).expect("seed parses");
        assert!(routes.len() >= 2);
    }
    assert!(events::decode_body(events::encode(&[Event::Open, Event::Disconnect]), 16).is_ok());
}

/// YAML aliases expanding exponentially ("billion laughs") are refused quickly, not expanded.
#[test]
fn alias_bombs_are_refused() {
    let mut doc = String::from("a0: &a0 [x, x, x, x, x, x, x, x, x, x]\n");
    for i in 1..12 {
        let prev = i - 1;
        doc.push_str(&format!(
            "a{i}: &a{i} [*a{prev}, *a{prev}, *a{prev}, *a{prev}, *a{prev}, *a{prev}, *a{prev}, *a{prev}, *a{prev}, *a{prev}]\n"
        ));
    }
    doc.push_str("routes: *a11\n");
    let started = std::time::Instant::now();
    let result = wsgate::config::parse_routes_yaml(&doc);
    assert!(result.is_err());
    assert!(
        started.elapsed() < std::time::Duration::from_secs(5),
        "took {:?}",
        started.elapsed()
    );
}
