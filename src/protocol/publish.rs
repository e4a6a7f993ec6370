//! Publish API bodies (PROTOCOL.md section 6) and publish filters.
//!
//! A body is `{"items": [item, ...]}`. An item has `channel` (required), optional `id`, `prev-id`
//! and `meta` (string values), and its formats either under `"formats"` (the JS libraries) or
//! directly on the item (Python `GripPubControl`); `"formats"` wins when present, as in Pushpin
//! (`src/handler/publishitem.cpp`). Only `ws-message` matters here; `http-response` and
//! `http-stream` are accepted and ignored. `ws-message` follows Pushpin's
//! `PublishFormat::fromVariant` (`src/handler/publishformat.cpp`).
//!
//! Filters follow Pushpin's `src/handler/filter.cpp`: `skip-self`, `skip-users`, `require-sub`.

use std::collections::BTreeMap;

use base64::Engine as _;
use bytes::Bytes;
use serde_json::{Map, Value};

use super::control::{self, ContentError, MessageType, PayloadError};

/// Longest close reason a close frame can carry (125-byte payload minus the 2-byte code).
pub const MAX_CLOSE_REASON_BYTES: usize = 123;

/// A parsed publish request.
#[derive(Debug, Clone, PartialEq)]
pub struct PublishRequest {
    /// Items in the order given; deliver them in this order.
    pub items: Vec<Item>,
}

/// One publish item.
#[derive(Debug, Clone, PartialEq)]
pub struct Item {
    /// Target channel (may be empty, as Pushpin allows; nobody can subscribe to it).
    pub channel: String,
    /// Item id (`id`).
    pub id: Option<String>,
    /// Previous item id (`prev-id`).
    pub prev_id: Option<String>,
    /// Publish metadata, read by filters (e.g. `sender` for `skip-self`).
    pub meta: BTreeMap<String, String>,
    /// The `ws-message` action; `None` when the item had only other formats (or a `ws-message`
    /// with action `hint`, which WebSocket sessions ignore): accepted, nothing to deliver.
    pub ws: Option<WsMessageAction>,
}

/// What a `ws-message` asks the gateway to do with each subscribed connection.
#[derive(Debug, Clone, PartialEq)]
pub enum WsMessageAction {
    /// Send a message to the client.
    Send {
        /// Frame type.
        kind: MessageType,
        /// Payload (base64-decoded for `content-bin`).
        content: Bytes,
    },
    /// Close the client connection.
    Close {
        /// Close code; `None` means the client sees 1000.
        code: Option<u16>,
        /// Close reason, at most [`MAX_CLOSE_REASON_BYTES`] bytes (longer ones are cut at a
        /// character boundary), empty when absent.
        reason: String,
    },
    /// Send a request to the backend now.
    Refresh,
}

/// Why a publish body was rejected; `Display` is the reason sent verbatim in the `400` body.
#[derive(Debug, Clone, thiserror::Error, PartialEq)]
pub enum PublishError {
    /// The body is not JSON.
    #[error("body is not valid JSON: {0}")]
    Json(String),
    /// The body is not a JSON object.
    #[error("body is not a JSON object")]
    NotObject,
    /// No `items`.
    #[error("body does not contain 'items'")]
    MissingItems,
    /// `items` is not an array.
    #[error("'items' is not an array")]
    ItemsNotArray,
    /// An error inside item `index` (0-based).
    #[error("item {index}: {error}")]
    Item {
        /// Position of the item in `items`.
        index: usize,
        /// What is wrong with it.
        error: Box<PublishError>,
    },
    /// The item is not a JSON object.
    #[error("item is not an object")]
    ItemNotObject,
    /// The item has no `channel`.
    #[error("item does not contain 'channel'")]
    MissingChannel,
    /// A field has the wrong JSON type.
    #[error("'{0}' has the wrong type")]
    WrongType(&'static str),
    /// A `meta` value is not a string.
    #[error("'meta' contains '{0}' with wrong type")]
    MetaWrongType(String),
    /// Neither `formats` nor a format directly on the item, or `formats` is empty.
    #[error("no formats specified")]
    NoFormats,
    /// `ws-message` is not an object.
    #[error("'ws-message' is not an object")]
    WsMessageNotObject,
    /// `action` is not send, close, refresh (or hint, inside a publish item).
    #[error("'ws-message' contains 'action' with unknown value")]
    UnknownAction,
    /// `type` is not text, binary, ping or pong.
    #[error("'ws-message' contains 'type' with unknown value")]
    UnknownType,
    /// A text/binary send without `content` or `content-bin`.
    #[error("'ws-message' does not contain 'content' or 'content-bin'")]
    NoContent,
    /// `content-bin` is not standard base64.
    #[error("'ws-message' contains 'content-bin' that is not valid base64")]
    BadBase64,
    /// A text message whose `content-bin` is not UTF-8.
    #[error("'ws-message' has text content that is not valid UTF-8")]
    TextNotUtf8,
    /// A ping/pong payload over 125 bytes.
    #[error("'ws-message' has ping/pong content over 125 bytes")]
    ControlFrameTooLong,
    /// `code` is not a close code that may be sent: 1000-1003, 1007-1014 or 3000-4999.
    #[error("'ws-message' contains 'code' that is not a valid close code (1000-1003, 1007-1014 or 3000-4999)")]
    BadCloseCode,
}

impl PublishError {
    fn in_item(self, index: usize) -> Self {
        Self::Item {
            index,
            error: Box::new(self),
        }
    }
}

impl From<ContentError> for PublishError {
    fn from(err: ContentError) -> Self {
        match err {
            ContentError::WrongType(field) => Self::WrongType(field),
            ContentError::BadBase64 => Self::BadBase64,
        }
    }
}

impl From<PayloadError> for PublishError {
    fn from(err: PayloadError) -> Self {
        match err {
            PayloadError::TextNotUtf8 => Self::TextNotUtf8,
            PayloadError::ControlFrameTooLong => Self::ControlFrameTooLong,
        }
    }
}

/// Parses a publish body (both item shapes). The body size limit is the caller's job.
///
/// # Errors
///
/// [`PublishError`] for bad JSON, a non-object body, missing or non-array `items`, and any
/// invalid item (wrapped in [`PublishError::Item`] with its index). One bad item rejects the
/// whole request, as in Pushpin. JSON `null` counts as an absent field.
pub fn parse_publish(body: &[u8]) -> Result<PublishRequest, PublishError> {
    let value: Value = serde_json::from_slice(body).map_err(|err| PublishError::Json(err.to_string()))?;
    let Value::Object(obj) = value else {
        return Err(PublishError::NotObject);
    };
    let items = match obj.get("items") {
        None => return Err(PublishError::MissingItems),
        Some(Value::Array(items)) => items,
        Some(_) => return Err(PublishError::ItemsNotArray),
    };
    let items = items
        .iter()
        .enumerate()
        .map(|(index, item)| parse_item(item).map_err(|err| err.in_item(index)))
        .collect::<Result<_, _>>()?;
    Ok(PublishRequest { items })
}

fn parse_item(value: &Value) -> Result<Item, PublishError> {
    let Value::Object(obj) = value else {
        return Err(PublishError::ItemNotObject);
    };
    let channel = opt_str(obj, "channel")?.ok_or(PublishError::MissingChannel)?.to_owned();
    let id = opt_str(obj, "id")?.map(str::to_owned);
    let prev_id = opt_str(obj, "prev-id")?.map(str::to_owned);

    const FORMAT_NAMES: [&str; 3] = ["http-response", "http-stream", "ws-message"];
    let (formats, has_formats) = match obj.get("formats") {
        // Python shape: formats sit directly on the item.
        None | Some(Value::Null) => (
            obj,
            FORMAT_NAMES
                .iter()
                .any(|name| obj.get(*name).is_some_and(|v| !v.is_null())),
        ),
        // JS shape. Pushpin only rejects an empty `formats`; unknown format names are accepted.
        Some(Value::Object(formats)) => (formats, !formats.is_empty()),
        Some(_) => return Err(PublishError::WrongType("formats")),
    };
    if !has_formats {
        return Err(PublishError::NoFormats);
    }
    let ws_value = formats.get("ws-message").filter(|v| !v.is_null());
    let ws = ws_value.map(parse_ws_format).transpose()?.flatten();

    let meta = match obj.get("meta") {
        None | Some(Value::Null) => BTreeMap::new(),
        Some(Value::Object(meta)) => meta
            .iter()
            .map(|(key, value)| match value {
                Value::String(value) => Ok((key.clone(), value.clone())),
                _ => Err(PublishError::MetaWrongType(key.clone())),
            })
            .collect::<Result<_, _>>()?,
        Some(_) => return Err(PublishError::WrongType("meta")),
    };
    Ok(Item {
        channel,
        id,
        prev_id,
        meta,
        ws,
    })
}

/// Parses one `ws-message` object, as used by the connection API
/// (`POST /connections/{id}/messages`).
///
/// # Errors
///
/// As [`parse_publish`] for a `ws-message`; also [`PublishError::UnknownAction`] for `hint`, which
/// means nothing for a single connection.
pub fn parse_ws_message(v: &Value) -> Result<WsMessageAction, PublishError> {
    parse_ws_format(v)?.ok_or(PublishError::UnknownAction)
}

/// Parses a `ws-message`; `Ok(None)` for action `hint`.
fn parse_ws_format(v: &Value) -> Result<Option<WsMessageAction>, PublishError> {
    let Value::Object(obj) = v else {
        return Err(PublishError::WsMessageNotObject);
    };
    match opt_str(obj, "action")? {
        None | Some("send") => parse_send(obj).map(Some),
        Some("close") => parse_close(obj).map(Some),
        Some("refresh") => Ok(Some(WsMessageAction::Refresh)),
        Some("hint") => Ok(None),
        Some(_) => Err(PublishError::UnknownAction),
    }
}

fn parse_send(obj: &Map<String, Value>) -> Result<WsMessageAction, PublishError> {
    let explicit_kind = match opt_str(obj, "type")? {
        Some(name) => Some(MessageType::from_name(name).ok_or(PublishError::UnknownType)?),
        None => None,
    };
    let (kind, content) = match (control::content_field(obj)?, explicit_kind) {
        (Some(content), kind) => {
            let default = if content.is_bin {
                MessageType::Binary
            } else {
                MessageType::Text
            };
            (kind.unwrap_or(default), content.bytes)
        }
        // Pushpin allows a ping or pong without content (empty payload).
        (None, Some(kind @ (MessageType::Ping | MessageType::Pong))) => (kind, Bytes::new()),
        (None, _) => return Err(PublishError::NoContent),
    };
    control::check_payload(kind, &content)?;
    Ok(WsMessageAction::Send { kind, content })
}

fn parse_close(obj: &Map<String, Value>) -> Result<WsMessageAction, PublishError> {
    let code = match obj.get("code") {
        None | Some(Value::Null) => None,
        Some(Value::Number(n)) => Some(
            n.as_u64()
                .and_then(|code| u16::try_from(code).ok())
                .filter(|&code| is_sendable_close_code(code))
                .ok_or(PublishError::BadCloseCode)?,
        ),
        Some(_) => return Err(PublishError::BadCloseCode),
    };
    let reason = opt_str(obj, "reason")?.unwrap_or_default();
    Ok(WsMessageAction::Close {
        code,
        reason: truncate_at_char_boundary(reason, MAX_CLOSE_REASON_BYTES).to_owned(),
    })
}

/// Whether an endpoint may put `code` in a close frame (RFC 6455 section 7.4 and the IANA
/// registry): 1000-1003, 1007-1014, 3000-4999. Unlike Pushpin, which accepts any non-negative
/// integer.
pub fn is_sendable_close_code(code: u16) -> bool {
    matches!(code, 1000..=1003 | 1007..=1014 | 3000..=4999)
}

fn truncate_at_char_boundary(s: &str, max: usize) -> &str {
    if s.len() <= max {
        return s;
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

fn opt_str<'a>(obj: &'a Map<String, Value>, field: &'static str) -> Result<Option<&'a str>, PublishError> {
    match obj.get(field) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) => Ok(Some(s)),
        Some(_) => Err(PublishError::WrongType(field)),
    }
}

impl WsMessageAction {
    /// Encodes the action as a `ws-message` object that [`parse_ws_message`] reads back: UTF-8
    /// text as `content`, everything else as `content-bin` (with `type` unless binary).
    pub fn to_json(&self) -> Value {
        let mut obj = Map::new();
        match self {
            Self::Send { kind, content } => match (kind, std::str::from_utf8(content)) {
                (MessageType::Text, Ok(text)) => {
                    obj.insert("content".into(), text.into());
                }
                _ => {
                    if *kind != MessageType::Binary {
                        obj.insert("type".into(), kind.as_str().into());
                    }
                    obj.insert(
                        "content-bin".into(),
                        base64::engine::general_purpose::STANDARD.encode(content).into(),
                    );
                }
            },
            Self::Close { code, reason } => {
                obj.insert("action".into(), "close".into());
                if let Some(code) = code {
                    obj.insert("code".into(), (*code).into());
                }
                if !reason.is_empty() {
                    obj.insert("reason".into(), reason.as_str().into());
                }
            }
            Self::Refresh => {
                obj.insert("action".into(), "refresh".into());
            }
        }
        Value::Object(obj)
    }
}

impl Item {
    /// Encodes the item in the JS libraries' shape (formats under `"formats"`). An item without
    /// a `ws-message` gets no `formats` and would not parse back.
    pub fn to_json(&self) -> Value {
        let mut obj = Map::new();
        obj.insert("channel".into(), self.channel.as_str().into());
        if let Some(id) = &self.id {
            obj.insert("id".into(), id.as_str().into());
        }
        if let Some(prev_id) = &self.prev_id {
            obj.insert("prev-id".into(), prev_id.as_str().into());
        }
        if !self.meta.is_empty() {
            let meta = self
                .meta
                .iter()
                .map(|(key, value)| (key.clone(), Value::from(value.as_str())))
                .collect::<Map<_, _>>();
            obj.insert("meta".into(), Value::Object(meta));
        }
        if let Some(ws) = &self.ws {
            let mut formats = Map::new();
            formats.insert("ws-message".into(), ws.to_json());
            obj.insert("formats".into(), Value::Object(formats));
        }
        Value::Object(obj)
    }
}

/// Builds a publish body with one item for `channel` (JS shape), as `wsgate publish` sends it.
pub fn build_publish_body(channel: &str, action: &WsMessageAction) -> Vec<u8> {
    let item = Item {
        channel: channel.to_owned(),
        id: None,
        prev_id: None,
        meta: BTreeMap::new(),
        ws: Some(action.clone()),
    };
    let mut body = Map::new();
    body.insert("items".into(), Value::Array(vec![item.to_json()]));
    Value::Object(body).to_string().into_bytes()
}

/// A publish filter named in a subscription's `filters` (Pushpin `src/handler/filter.cpp`).
///
/// Pushpin's content filters (`build-id`, `var-subst`) and network filters (`http-check`,
/// `http-modify`) are not supported; [`Filter::parse`] returns `None` for them and for unknown
/// names, which are then ignored, as Pushpin ignores unknown names.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Filter {
    /// `skip-self`: drop when subscription meta `user` and item meta `sender` are equal and
    /// non-empty.
    SkipSelf,
    /// `skip-users`: drop when subscription meta `user` is non-empty and listed in item meta
    /// `skip_users` (comma-separated, entries trimmed).
    SkipUsers,
    /// `require-sub`: drop when item meta `require_sub` is non-empty and the connection is not
    /// subscribed to that channel. (Pushpin's WebSocket sessions pass no subscriptions to this
    /// filter, so there it drops every such item; [`Filter::allows_with_subscriptions`] checks
    /// the connection's subscriptions, the behaviour Pushpin gives HTTP subscribers.)
    RequireSub,
}

impl Filter {
    /// Parses a filter name; `None` for names wsgate does not implement.
    pub fn parse(name: &str) -> Option<Self> {
        match name {
            "skip-self" => Some(Self::SkipSelf),
            "skip-users" => Some(Self::SkipUsers),
            "require-sub" => Some(Self::RequireSub),
            _ => None,
        }
    }

    /// The filter's wire name.
    pub fn name(self) -> &'static str {
        match self {
            Self::SkipSelf => "skip-self",
            Self::SkipUsers => "skip-users",
            Self::RequireSub => "require-sub",
        }
    }

    /// Whether an item with `item_meta` may be delivered to a subscription with `sub_meta`
    /// (set with `set-meta`), without knowing the connection's subscriptions: `require-sub` then
    /// drops every item that names a channel, exactly as Pushpin's WebSocket sessions do. Prefer
    /// [`Filter::allows_with_subscriptions`].
    pub fn allows(self, sub_meta: &BTreeMap<String, String>, item_meta: &BTreeMap<String, String>) -> bool {
        self.allows_with_subscriptions(sub_meta, item_meta, &|_| false)
    }

    /// Like [`Filter::allows`]; `is_subscribed` answers whether the receiving connection is
    /// subscribed to a channel (consulted by `require-sub` only).
    pub fn allows_with_subscriptions(
        self,
        sub_meta: &BTreeMap<String, String>,
        item_meta: &BTreeMap<String, String>,
        is_subscribed: &dyn Fn(&str) -> bool,
    ) -> bool {
        match self {
            Self::SkipSelf => match (non_empty(sub_meta, "user"), non_empty(item_meta, "sender")) {
                (Some(user), Some(sender)) => user != sender,
                _ => true,
            },
            Self::SkipUsers => match (non_empty(sub_meta, "user"), non_empty(item_meta, "skip_users")) {
                (Some(user), Some(list)) => !list.split(',').any(|entry| entry.trim() == user),
                _ => true,
            },
            Self::RequireSub => non_empty(item_meta, "require_sub").is_none_or(is_subscribed),
        }
    }
}

/// The value of `key` in `map` unless absent or empty (Pushpin's filters treat both alike).
fn non_empty<'a>(map: &'a BTreeMap<String, String>, key: &str) -> Option<&'a str> {
    map.get(key).map(String::as_str).filter(|value| !value.is_empty())
}

/// Parses subscription filter names, dropping names wsgate does not implement.
pub fn parse_filters<S: AsRef<str>>(names: &[S]) -> Vec<Filter> {
    names.iter().filter_map(|name| Filter::parse(name.as_ref())).collect()
}

/// Whether every filter allows the item (an empty list allows everything); see
/// [`Filter::allows_with_subscriptions`].
pub fn filters_allow(
    filters: &[Filter],
    sub_meta: &BTreeMap<String, String>,
    item_meta: &BTreeMap<String, String>,
    is_subscribed: &dyn Fn(&str) -> bool,
) -> bool {
    filters
        .iter()
        .all(|filter| filter.allows_with_subscriptions(sub_meta, item_meta, is_subscribed))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use serde_json::json;

    fn parse(body: &str) -> Result<PublishRequest, PublishError> {
        parse_publish(body.as_bytes())
    }

    fn first_item(body: &str) -> Item {
        match parse(body) {
            Ok(mut req) if req.items.len() == 1 => req.items.remove(0),
            other => panic!("expected one item, got {other:?}"),
        }
    }

    fn item_error(body: &str) -> PublishError {
        match parse(body) {
            Err(PublishError::Item { index: 0, error }) => *error,
            other => panic!("expected an error in item 0, got {other:?}"),
        }
    }

    fn send(kind: MessageType, content: &'static [u8]) -> Option<WsMessageAction> {
        Some(WsMessageAction::Send {
            kind,
            content: Bytes::from_static(content),
        })
    }

    fn meta(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs.iter().map(|(k, v)| ((*k).to_owned(), (*v).to_owned())).collect()
    }

    #[test]
    fn js_shape() {
        let item = first_item(r#"{"items":[{"channel":"c","formats":{"ws-message":{"content":"hi"}}}]}"#);
        assert_eq!(
            item,
            Item {
                channel: "c".into(),
                id: None,
                prev_id: None,
                meta: BTreeMap::new(),
                ws: send(MessageType::Text, b"hi"),
            }
        );
    }

    #[test]
    fn python_shape() {
        let item =
            first_item(r#"{"items": [{"channel": "c", "id": "1", "prev-id": "0", "ws-message": {"content": "hi"}}]}"#);
        assert_eq!(item.channel, "c");
        assert_eq!(item.id.as_deref(), Some("1"));
        assert_eq!(item.prev_id.as_deref(), Some("0"));
        assert_eq!(item.ws, send(MessageType::Text, b"hi"));
    }

    #[test]
    fn formats_key_wins_over_direct_formats() {
        let item = first_item(
            r#"{"items":[{"channel":"c","ws-message":{"content":"direct"},"formats":{"ws-message":{"content":"nested"}}}]}"#,
        );
        assert_eq!(item.ws, send(MessageType::Text, b"nested"));
    }

    #[test]
    fn several_items_keep_order() {
        let req = parse(
            r#"{"items":[{"channel":"a","ws-message":{"content":"1"}},{"channel":"b","ws-message":{"content":"2"}}]}"#,
        )
        .expect("valid body");
        let channels: Vec<_> = req.items.iter().map(|i| i.channel.as_str()).collect();
        assert_eq!(channels, ["a", "b"]);
        assert_eq!(parse(r#"{"items":[]}"#), Ok(PublishRequest { items: vec![] }));
    }

    #[test]
    fn other_formats_are_accepted_and_ignored() {
        let item = first_item(r#"{"items":[{"channel":"c","http-stream":{"content":"x"}}]}"#);
        assert_eq!(item.ws, None);
        let item = first_item(r#"{"items":[{"channel":"c","formats":{"http-response":{"body":"x"}}}]}"#);
        assert_eq!(item.ws, None);
        let item = first_item(r#"{"items":[{"channel":"c","formats":{"future-format":{}}}]}"#);
        assert_eq!(item.ws, None);
    }

    #[test]
    fn hint_is_accepted_and_ignored() {
        let item = first_item(r#"{"items":[{"channel":"c","formats":{"ws-message":{"action":"hint"}}}]}"#);
        assert_eq!(item.ws, None);
        assert_eq!(
            parse_ws_message(&json!({"action": "hint"})),
            Err(PublishError::UnknownAction)
        );
    }

    #[test]
    fn meta_is_read() {
        let item = first_item(r#"{"items":[{"channel":"c","meta":{"sender":"alice"},"ws-message":{"content":"x"}}]}"#);
        assert_eq!(item.meta, meta(&[("sender", "alice")]));
    }

    #[test]
    fn send_types_and_defaults() {
        let action = |v: Value| parse_ws_message(&v);
        assert_eq!(
            action(json!({"content": "t"})),
            Ok(WsMessageAction::Send {
                kind: MessageType::Text,
                content: Bytes::from_static(b"t")
            })
        );
        assert_eq!(
            action(json!({"content-bin": "AAE="})),
            Ok(WsMessageAction::Send {
                kind: MessageType::Binary,
                content: Bytes::from_static(&[0, 1])
            })
        );
        assert_eq!(
            action(json!({"action": "send", "type": "binary", "content": "b"})),
            Ok(WsMessageAction::Send {
                kind: MessageType::Binary,
                content: Bytes::from_static(b"b")
            })
        );
        assert_eq!(
            action(json!({"type": "text", "content-bin": "aGk="})),
            Ok(WsMessageAction::Send {
                kind: MessageType::Text,
                content: Bytes::from_static(b"hi")
            })
        );
        assert_eq!(
            action(json!({"type": "ping"})),
            Ok(WsMessageAction::Send {
                kind: MessageType::Ping,
                content: Bytes::new()
            })
        );
        assert_eq!(
            action(json!({"type": "pong", "content": "p"})),
            Ok(WsMessageAction::Send {
                kind: MessageType::Pong,
                content: Bytes::from_static(b"p")
            })
        );
    }

    #[test]
    fn close_and_refresh() {
        assert_eq!(
            parse_ws_message(&json!({"action": "close"})),
            Ok(WsMessageAction::Close {
                code: None,
                reason: String::new()
            })
        );
        assert_eq!(
            parse_ws_message(&json!({"action": "close", "code": 4000, "reason": "bye"})),
            Ok(WsMessageAction::Close {
                code: Some(4000),
                reason: "bye".into()
            })
        );
        assert_eq!(
            parse_ws_message(&json!({"action": "refresh"})),
            Ok(WsMessageAction::Refresh)
        );
    }

    #[test]
    fn close_reason_is_cut_at_a_char_boundary() {
        let reason = "é".repeat(100); // 200 bytes
        let Ok(WsMessageAction::Close { reason: cut, .. }) =
            parse_ws_message(&json!({"action": "close", "reason": reason}))
        else {
            panic!("expected close");
        };
        assert_eq!(cut.len(), 122);
        assert!(reason.starts_with(&cut));
    }

    #[test]
    fn bad_close_codes() {
        for code in [
            json!(999),
            json!(1005),
            json!(1006),
            json!(1015),
            json!(2000),
            json!(5000),
            json!(70000),
            json!(-1),
            json!(1000.5),
            json!("1000"),
        ] {
            assert_eq!(
                parse_ws_message(&json!({"action": "close", "code": code})),
                Err(PublishError::BadCloseCode),
                "{code}"
            );
        }
        for code in [1000, 1003, 1007, 1014, 3000, 4999] {
            assert!(is_sendable_close_code(code), "{code}");
        }
    }

    #[test]
    fn envelope_errors() {
        assert!(matches!(parse("{"), Err(PublishError::Json(_))));
        assert!(matches!(parse(""), Err(PublishError::Json(_))));
        assert_eq!(parse("[]"), Err(PublishError::NotObject));
        assert_eq!(parse("{}"), Err(PublishError::MissingItems));
        assert_eq!(parse(r#"{"items":{}}"#), Err(PublishError::ItemsNotArray));
        assert_eq!(parse(r#"{"items":null}"#), Err(PublishError::ItemsNotArray));
    }

    #[test]
    fn item_errors() {
        assert_eq!(item_error(r#"{"items":[5]}"#), PublishError::ItemNotObject);
        assert_eq!(
            item_error(r#"{"items":[{"ws-message":{"content":"x"}}]}"#),
            PublishError::MissingChannel
        );
        assert_eq!(
            item_error(r#"{"items":[{"channel":1,"ws-message":{"content":"x"}}]}"#),
            PublishError::WrongType("channel")
        );
        assert_eq!(item_error(r#"{"items":[{"channel":"c"}]}"#), PublishError::NoFormats);
        assert_eq!(
            item_error(r#"{"items":[{"channel":"c","formats":{}}]}"#),
            PublishError::NoFormats
        );
        assert_eq!(
            item_error(r#"{"items":[{"channel":"c","formats":[]}]}"#),
            PublishError::WrongType("formats")
        );
        assert_eq!(
            item_error(r#"{"items":[{"channel":"c","id":1,"ws-message":{"content":"x"}}]}"#),
            PublishError::WrongType("id")
        );
        assert_eq!(
            item_error(r#"{"items":[{"channel":"c","meta":{"a":1},"ws-message":{"content":"x"}}]}"#),
            PublishError::MetaWrongType("a".into())
        );
        assert_eq!(
            item_error(r#"{"items":[{"channel":"c","meta":"x","ws-message":{"content":"x"}}]}"#),
            PublishError::WrongType("meta")
        );
    }

    #[test]
    fn ws_message_errors() {
        let err = |ws: &str| item_error(&format!(r#"{{"items":[{{"channel":"c","ws-message":{ws}}}]}}"#));
        assert_eq!(err("5"), PublishError::WsMessageNotObject);
        assert_eq!(err("{}"), PublishError::NoContent);
        assert_eq!(err(r#"{"type":"text"}"#), PublishError::NoContent);
        assert_eq!(err(r#"{"type":"binary"}"#), PublishError::NoContent);
        assert_eq!(err(r#"{"type":"close","content":"x"}"#), PublishError::UnknownType);
        assert_eq!(err(r#"{"action":"explode"}"#), PublishError::UnknownAction);
        assert_eq!(err(r#"{"action":7}"#), PublishError::WrongType("action"));
        assert_eq!(err(r#"{"content-bin":"%%%"}"#), PublishError::BadBase64);
        assert_eq!(err(r#"{"content-bin":[1]}"#), PublishError::WrongType("content-bin"));
        assert_eq!(err(r#"{"content":1}"#), PublishError::WrongType("content"));
        assert_eq!(
            err(r#"{"type":"text","content-bin":"/w=="}"#),
            PublishError::TextNotUtf8
        );
        let long = "x".repeat(126);
        assert_eq!(
            err(&format!(r#"{{"type":"ping","content":"{long}"}}"#)),
            PublishError::ControlFrameTooLong
        );
        assert_eq!(err(r#"{"action":"close","code":1}"#), PublishError::BadCloseCode);
    }

    #[test]
    fn error_index_and_message() {
        let err = parse(r#"{"items":[{"channel":"a","ws-message":{"content":"x"}},{"channel":"b","ws-message":{}}]}"#)
            .expect_err("second item has no content");
        assert_eq!(
            err.to_string(),
            "item 1: 'ws-message' does not contain 'content' or 'content-bin'"
        );
    }

    #[test]
    fn build_publish_body_is_js_shape() {
        let body = build_publish_body(
            "room",
            &WsMessageAction::Send {
                kind: MessageType::Text,
                content: Bytes::from_static(b"hello"),
            },
        );
        let value: Value = serde_json::from_slice(&body).expect("valid JSON");
        assert_eq!(
            value,
            json!({"items": [{"channel": "room", "formats": {"ws-message": {"content": "hello"}}}]})
        );
    }

    #[test]
    fn filter_names() {
        assert_eq!(Filter::parse("skip-self"), Some(Filter::SkipSelf));
        assert_eq!(Filter::parse("skip-users"), Some(Filter::SkipUsers));
        assert_eq!(Filter::parse("require-sub"), Some(Filter::RequireSub));
        assert_eq!(Filter::parse("build-id"), None);
        assert_eq!(Filter::parse("Skip-Self"), None);
        assert_eq!(
            parse_filters(&["var-subst", "skip-self", "nope"]),
            vec![Filter::SkipSelf]
        );
        for filter in [Filter::SkipSelf, Filter::SkipUsers, Filter::RequireSub] {
            assert_eq!(Filter::parse(filter.name()), Some(filter));
        }
    }

    #[test]
    fn skip_self() {
        let never = |_: &str| false;
        let f = Filter::SkipSelf;
        let alice = meta(&[("user", "alice")]);
        assert!(!f.allows_with_subscriptions(&alice, &meta(&[("sender", "alice")]), &never));
        assert!(f.allows_with_subscriptions(&alice, &meta(&[("sender", "bob")]), &never));
        assert!(f.allows_with_subscriptions(&alice, &meta(&[]), &never));
        assert!(f.allows_with_subscriptions(&meta(&[]), &meta(&[("sender", "alice")]), &never));
        // Empty values never match.
        assert!(f.allows_with_subscriptions(&meta(&[("user", "")]), &meta(&[("sender", "")]), &never));
    }

    #[test]
    fn skip_users() {
        let never = |_: &str| false;
        let f = Filter::SkipUsers;
        let bob = meta(&[("user", "bob")]);
        assert!(!f.allows_with_subscriptions(&bob, &meta(&[("skip_users", "alice, bob ,carol")]), &never));
        assert!(f.allows_with_subscriptions(&bob, &meta(&[("skip_users", "alice,bobby")]), &never));
        assert!(f.allows_with_subscriptions(&bob, &meta(&[]), &never));
        assert!(f.allows_with_subscriptions(&meta(&[]), &meta(&[("skip_users", ",,")]), &never));
        assert!(f.allows_with_subscriptions(&meta(&[("user", "")]), &meta(&[("skip_users", ",")]), &never));
    }

    #[test]
    fn require_sub() {
        let f = Filter::RequireSub;
        let subscribed = |channel: &str| channel == "vip";
        let none = meta(&[]);
        assert!(f.allows_with_subscriptions(&none, &meta(&[("require_sub", "vip")]), &subscribed));
        assert!(!f.allows_with_subscriptions(&none, &meta(&[("require_sub", "other")]), &subscribed));
        assert!(f.allows_with_subscriptions(&none, &meta(&[]), &subscribed));
        assert!(f.allows_with_subscriptions(&none, &meta(&[("require_sub", "")]), &subscribed));
        // Without subscription info (Pushpin's WebSocket behaviour) a named channel drops.
        assert!(!f.allows(&none, &meta(&[("require_sub", "vip")])));
        assert!(f.allows(&none, &meta(&[])));
        assert!(!Filter::SkipSelf.allows(&meta(&[("user", "a")]), &meta(&[("sender", "a")])));
    }

    #[test]
    fn filters_allow_needs_all() {
        let never = |_: &str| false;
        let filters = [Filter::SkipSelf, Filter::SkipUsers];
        let sub = meta(&[("user", "bob")]);
        assert!(filters_allow(&filters, &sub, &meta(&[("sender", "alice")]), &never));
        assert!(!filters_allow(
            &filters,
            &sub,
            &meta(&[("sender", "alice"), ("skip_users", "bob")]),
            &never
        ));
        assert!(filters_allow(&[], &sub, &meta(&[("sender", "bob")]), &never));
    }

    fn arb_action() -> impl Strategy<Value = WsMessageAction> {
        let send = (
            prop_oneof![
                Just(MessageType::Text),
                Just(MessageType::Binary),
                Just(MessageType::Ping),
                Just(MessageType::Pong),
            ],
            proptest::collection::vec(any::<u8>(), 0..125),
            ".{0,40}",
        )
            .prop_map(|(kind, bin, text)| WsMessageAction::Send {
                kind,
                content: Bytes::from(if kind == MessageType::Text {
                    text.into_bytes()
                } else {
                    bin
                }),
            });
        let close = (
            proptest::option::of(prop_oneof![1000u16..=1003, 1007u16..=1014, 3000u16..=4999]),
            "[a-z ]{0,40}",
        )
            .prop_map(|(code, reason)| WsMessageAction::Close { code, reason });
        prop_oneof![send, close, Just(WsMessageAction::Refresh)]
    }

    proptest! {
        #[test]
        fn parse_publish_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
            let _ = parse_publish(&bytes);
        }

        #[test]
        fn parse_publish_never_panics_on_near_valid_json(
            field in prop_oneof![
                Just("action"), Just("type"), Just("content"), Just("content-bin"),
                Just("code"), Just("reason"),
            ],
            value in prop_oneof![
                Just("null".to_owned()), Just("-1".to_owned()), Just("1e400".to_owned()),
                Just("[]".to_owned()), Just("{}".to_owned()), Just("false".to_owned()),
                ".{0,12}".prop_map(|s| Value::String(s).to_string()),
                any::<i64>().prop_map(|n| n.to_string()),
                any::<f64>().prop_map(|f| json!(f).to_string()),
            ],
        ) {
            let body = format!(r#"{{"items":[{{"channel":"c","ws-message":{{"{field}":{value}}}}}]}}"#);
            let _ = parse_publish(body.as_bytes());
        }

        #[test]
        fn build_then_parse_round_trips(channel in ".{0,20}", action in arb_action()) {
            let body = build_publish_body(&channel, &action);
            let req = parse_publish(&body).expect("own output parses");
            prop_assert_eq!(req.items.len(), 1);
            prop_assert_eq!(&req.items[0].channel, &channel);
            prop_assert_eq!(req.items[0].ws.as_ref(), Some(&action));
        }

        #[test]
        fn close_reason_never_exceeds_limit(reason in ".{0,200}") {
            let parsed = parse_ws_message(&json!({"action": "close", "reason": reason}));
            let Ok(WsMessageAction::Close { reason: cut, .. }) = parsed else {
                return Err(TestCaseError::fail("expected close"));
            };
            prop_assert!(cut.len() <= MAX_CLOSE_REASON_BYTES);
            prop_assert!(reason.starts_with(&cut));
        }
    }
}
