//! GRIP WebSocket control messages (PROTOCOL.md section 5).
//!
//! Once a backend enables GRIP for a connection (by answering OPEN with
//! `Sec-WebSocket-Extensions: grip`), every TEXT message it sends is one of:
//!
//! - a control message: `c:` followed by one JSON object ([`parse_control`]);
//! - a content message: the message prefix (default `m:`) followed by the payload to relay;
//! - anything else, which is dropped and counted ([`Classified::Unprefixed`]).
//!
//! BINARY messages carry the message prefix too but are never control messages. A backend that
//! must send a payload literally starting with `c:` sends `m:c:...`: the prefix test strips `m:`
//! and the `c:` test never sees it, so no other escaping exists.
//!
//! Field names, defaults and validation follow Pushpin's `WsControlMessage::fromVariant`
//! (`src/handler/wscontrolmessage.cpp`) and the handler that applies it
//! (`src/handler/handlerengine.cpp`); deviations are marked "Unlike Pushpin".

use base64::Engine as _;
use base64::alphabet;
use base64::engine::{DecodePaddingMode, GeneralPurpose, GeneralPurposeConfig};
use bytes::Bytes;
use serde_json::{Map, Value};

/// Prefix that marks a backend TEXT message as a control message.
pub const CONTROL_PREFIX: &[u8] = b"c:";

/// Message prefix used when the backend's `grip` extension has no `message-prefix` parameter.
pub const DEFAULT_MESSAGE_PREFIX: &str = "m:";

/// Keep-alive interval used when `timeout` is absent or 0 (Pushpin `DEFAULT_WS_KEEPALIVE_TIMEOUT`).
pub const DEFAULT_KEEP_ALIVE_TIMEOUT_SECS: u32 = 55;

/// Delay used by `send-delayed` when `timeout` is absent or 0 (Pushpin
/// `DEFAULT_WS_SENDDELAYED_TIMEOUT`).
pub const DEFAULT_SEND_DELAYED_TIMEOUT_SECS: u32 = 1;

/// Largest payload of a WebSocket control frame (PING/PONG), RFC 6455 section 5.5.
pub const MAX_CONTROL_FRAME_PAYLOAD: usize = 125;

/// Longest `type` value quoted back in [`ControlError::UnknownType`], so a hostile backend cannot
/// make log lines arbitrarily long.
const MAX_QUOTED_LEN: usize = 64;

/// Standard base64 (RFC 4648 section 4), padding optional, as written by the GRIP libraries.
pub(crate) const BASE64_STANDARD_LENIENT_PADDING: GeneralPurpose = GeneralPurpose::new(
    &alphabet::STANDARD,
    GeneralPurposeConfig::new().with_decode_padding_mode(DecodePaddingMode::Indifferent),
);

/// One parsed GRIP control message.
#[derive(Debug, Clone, PartialEq)]
pub enum ControlMessage {
    /// `subscribe`: add this connection to `channel`, with publish `filters` (names as sent;
    /// unknown names are kept here and ignored by the filter layer, as Pushpin does).
    Subscribe {
        /// Channel name, never empty.
        channel: String,
        /// Filter names, e.g. `skip-self`.
        filters: Vec<String>,
    },
    /// `unsubscribe`: remove this connection from `channel`.
    Unsubscribe {
        /// Channel name, never empty.
        channel: String,
    },
    /// `detach`: stop relaying client messages to the backend; publishes still arrive.
    Detach,
    /// `set-meta`: set (`Some`, possibly empty) or delete (`None`) subscription metadata `name`.
    SetMeta {
        /// Metadata name, never empty.
        name: String,
        /// New value; `None` when `value` was absent or null.
        value: Option<String>,
    },
    /// `keep-alive`: the gateway sends this message to the client itself on a timer;
    /// `None` (no `content`/`content-bin`) turns keep-alive off.
    KeepAlive(Option<TimedMessage>),
    /// `send-delayed`: send this message after `timeout_secs`. A newer `send-delayed` first
    /// flushes (sends) any pending one, as Pushpin does. Without content the message is empty.
    SendDelayed(TimedMessage),
    /// `flush-delayed`: if a delayed message is pending, send it now; otherwise do nothing.
    /// Carries no fields.
    FlushDelayed,
    /// `session`: set the session id, or clear it (`None`: `id` absent, null or empty).
    Session {
        /// The new session id.
        id: Option<String>,
    },
}

/// Kind of WebSocket message a control message or publish item produces.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum MessageType {
    /// TEXT message (content is valid UTF-8).
    Text,
    /// BINARY message.
    Binary,
    /// PING control frame (content at most 125 bytes).
    Ping,
    /// PONG control frame (content at most 125 bytes).
    Pong,
}

impl MessageType {
    /// Parses the wire name used by `message-type` (control) and `type` (publish).
    pub fn from_name(name: &str) -> Option<Self> {
        match name {
            "text" => Some(Self::Text),
            "binary" => Some(Self::Binary),
            "ping" => Some(Self::Ping),
            "pong" => Some(Self::Pong),
            _ => None,
        }
    }

    /// The wire name: `text`, `binary`, `ping` or `pong`.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Text => "text",
            Self::Binary => "binary",
            Self::Ping => "ping",
            Self::Pong => "pong",
        }
    }
}

/// When a keep-alive message is sent.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum KeepAliveMode {
    /// After `timeout_secs` without any message sent to the client (Pushpin's default).
    #[default]
    Idle,
    /// Every `timeout_secs`, whatever else was sent.
    Interval,
}

impl KeepAliveMode {
    /// The wire name: `idle` or `interval`.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Idle => "idle",
            Self::Interval => "interval",
        }
    }
}

/// A message the gateway sends to the client on a timer (`keep-alive`, `send-delayed`).
#[derive(Debug, Clone, PartialEq)]
pub struct TimedMessage {
    /// Frame type to send.
    pub kind: MessageType,
    /// Payload (already base64-decoded for `content-bin`).
    pub content: Bytes,
    /// Interval or delay in seconds, never 0: absent or 0 means the per-type default
    /// ([`DEFAULT_KEEP_ALIVE_TIMEOUT_SECS`], [`DEFAULT_SEND_DELAYED_TIMEOUT_SECS`]); values over
    /// `u32::MAX` are capped.
    pub timeout_secs: u32,
    /// Keep-alive mode; always [`KeepAliveMode::Idle`] for `send-delayed`.
    pub mode: KeepAliveMode,
}

/// Why a control message was rejected. The session ignores and logs it (as Pushpin does).
#[derive(Debug, Clone, thiserror::Error, PartialEq)]
pub enum ControlError {
    /// The text after `c:` is not JSON.
    #[error("control message is not valid JSON: {0}")]
    Json(String),
    /// The JSON is not an object.
    #[error("control message is not a JSON object")]
    NotObject,
    /// A required field is absent (or null).
    #[error("control message does not contain '{0}'")]
    MissingField(&'static str),
    /// A field has the wrong JSON type.
    #[error("control message contains '{0}' with wrong type")]
    WrongType(&'static str),
    /// A field that must not be empty is empty.
    #[error("control message contains '{0}' with empty value")]
    EmptyField(&'static str),
    /// `type` names no known control message (quoted, truncated to 64 characters).
    #[error("unknown control message type '{0}'")]
    UnknownType(String),
    /// `message-type` is not text, binary, ping or pong.
    #[error("control message contains 'message-type' with unknown value")]
    UnknownMessageType,
    /// `content-bin` is not standard base64.
    #[error("control message contains '{0}' that is not valid base64")]
    BadBase64(&'static str),
    /// `timeout` is negative or not finite.
    #[error("control message contains 'timeout' with invalid value")]
    InvalidTimeout,
    /// A TEXT message's content is not UTF-8 (possible only with `content-bin`).
    #[error("control message has text content that is not valid UTF-8")]
    TextNotUtf8,
    /// A PING/PONG payload exceeds 125 bytes.
    #[error("control message has ping/pong content over 125 bytes")]
    ControlFrameTooLong,
}

/// Parses the JSON that follows the `c:` prefix.
///
/// # Errors
///
/// [`ControlError`] for invalid JSON, a non-object, an unknown `type`, a missing or mistyped
/// field, bad base64, a bad `timeout`, or content the requested frame type cannot carry. Unknown
/// extra fields are ignored. JSON `null` is treated like an absent field.
pub fn parse_control(json: &[u8]) -> Result<ControlMessage, ControlError> {
    let value: Value = serde_json::from_slice(json).map_err(|err| ControlError::Json(err.to_string()))?;
    let Value::Object(obj) = value else {
        return Err(ControlError::NotObject);
    };
    let kind = opt_str(&obj, "type")?.ok_or(ControlError::MissingField("type"))?;
    match kind {
        "subscribe" => {
            let channel = required_non_empty(&obj, "channel")?;
            let filters = match obj.get("filters") {
                None | Some(Value::Null) => Vec::new(),
                Some(Value::Array(items)) => items
                    .iter()
                    .map(|item| match item {
                        Value::String(name) => Ok(name.clone()),
                        _ => Err(ControlError::WrongType("filters")),
                    })
                    .collect::<Result<_, _>>()?,
                Some(_) => return Err(ControlError::WrongType("filters")),
            };
            Ok(ControlMessage::Subscribe { channel, filters })
        }
        "unsubscribe" => Ok(ControlMessage::Unsubscribe {
            channel: required_non_empty(&obj, "channel")?,
        }),
        "detach" => Ok(ControlMessage::Detach),
        "session" => {
            let id = opt_str(&obj, "id")?.filter(|id| !id.is_empty());
            Ok(ControlMessage::Session {
                id: id.map(str::to_owned),
            })
        }
        "set-meta" => Ok(ControlMessage::SetMeta {
            name: required_non_empty(&obj, "name")?,
            value: opt_str(&obj, "value")?.map(str::to_owned),
        }),
        "keep-alive" => {
            let explicit_kind = message_type(&obj)?;
            let timed = timed_message(&obj, explicit_kind, DEFAULT_KEEP_ALIVE_TIMEOUT_SECS)?;
            let mode = match opt_str(&obj, "mode")? {
                // Pushpin treats every value other than "interval" as idle.
                Some("interval") => KeepAliveMode::Interval,
                _ => KeepAliveMode::Idle,
            };
            Ok(ControlMessage::KeepAlive(
                timed.map(|timed| TimedMessage { mode, ..timed }),
            ))
        }
        "send-delayed" => {
            let explicit_kind = message_type(&obj)?;
            let timed = timed_message(&obj, explicit_kind, DEFAULT_SEND_DELAYED_TIMEOUT_SECS)?;
            // No content: Pushpin still schedules an (empty) message with the default delay.
            Ok(ControlMessage::SendDelayed(timed.unwrap_or(TimedMessage {
                kind: explicit_kind.unwrap_or(MessageType::Text),
                content: Bytes::new(),
                timeout_secs: DEFAULT_SEND_DELAYED_TIMEOUT_SECS,
                mode: KeepAliveMode::Idle,
            })))
        }
        "flush-delayed" => Ok(ControlMessage::FlushDelayed),
        other => Err(ControlError::UnknownType(truncate_chars(other, MAX_QUOTED_LEN))),
    }
}

/// Reads the optional `message-type` of `keep-alive`/`send-delayed`.
fn message_type(obj: &Map<String, Value>) -> Result<Option<MessageType>, ControlError> {
    match opt_str(obj, "message-type")? {
        Some(name) => MessageType::from_name(name)
            .map(Some)
            .ok_or(ControlError::UnknownMessageType),
        None => Ok(None),
    }
}

/// Parses `content`/`content-bin` and `timeout` of `keep-alive`/`send-delayed`.
/// Returns `None` when neither content field is present (`timeout` is then not looked at, as in
/// Pushpin).
fn timed_message(
    obj: &Map<String, Value>,
    explicit_kind: Option<MessageType>,
    default_timeout: u32,
) -> Result<Option<TimedMessage>, ControlError> {
    let Some(content) = content_field(obj).map_err(ContentError::into_control)? else {
        return Ok(None);
    };
    // Unlike Pushpin (whose fallback to binary for `content-bin` is unreachable, so base64
    // content goes out as TEXT), `content-bin` without `message-type` means BINARY.
    let kind = explicit_kind.unwrap_or(if content.is_bin {
        MessageType::Binary
    } else {
        MessageType::Text
    });
    check_payload(kind, &content.bytes).map_err(PayloadError::into_control)?;
    let timeout_secs = match obj.get("timeout") {
        None | Some(Value::Null) => 0,
        Some(Value::Number(n)) => {
            if let Some(secs) = n.as_u64() {
                u32::try_from(secs).unwrap_or(u32::MAX)
            } else {
                match n.as_f64() {
                    // Truncates like Qt's toInt; `as` saturates at u32::MAX.
                    Some(secs) if secs.is_finite() && secs >= 0.0 => secs as u32,
                    _ => return Err(ControlError::InvalidTimeout),
                }
            }
        }
        Some(_) => return Err(ControlError::WrongType("timeout")),
    };
    Ok(Some(TimedMessage {
        kind,
        content: content.bytes,
        timeout_secs: if timeout_secs == 0 {
            default_timeout
        } else {
            timeout_secs
        },
        mode: KeepAliveMode::Idle,
    }))
}

impl ControlMessage {
    /// Encodes the message as the JSON object [`parse_control`] accepts (without the `c:`
    /// prefix). Binary, ping and pong content is written as `content-bin`.
    pub fn to_json(&self) -> Value {
        let mut obj = Map::new();
        let kind = match self {
            Self::Subscribe { channel, filters } => {
                obj.insert("channel".into(), channel.as_str().into());
                if !filters.is_empty() {
                    obj.insert("filters".into(), filters.clone().into());
                }
                "subscribe"
            }
            Self::Unsubscribe { channel } => {
                obj.insert("channel".into(), channel.as_str().into());
                "unsubscribe"
            }
            Self::Detach => "detach",
            Self::SetMeta { name, value } => {
                obj.insert("name".into(), name.as_str().into());
                if let Some(value) = value {
                    obj.insert("value".into(), value.as_str().into());
                }
                "set-meta"
            }
            Self::KeepAlive(timed) => {
                if let Some(timed) = timed {
                    insert_timed(&mut obj, timed);
                    obj.insert("mode".into(), timed.mode.as_str().into());
                }
                "keep-alive"
            }
            Self::SendDelayed(timed) => {
                insert_timed(&mut obj, timed);
                "send-delayed"
            }
            Self::FlushDelayed => "flush-delayed",
            Self::Session { id } => {
                if let Some(id) = id {
                    obj.insert("id".into(), id.as_str().into());
                }
                "session"
            }
        };
        obj.insert("type".into(), kind.into());
        Value::Object(obj)
    }
}

fn insert_timed(obj: &mut Map<String, Value>, timed: &TimedMessage) {
    obj.insert("message-type".into(), timed.kind.as_str().into());
    match (timed.kind, std::str::from_utf8(&timed.content)) {
        (MessageType::Text, Ok(text)) => {
            obj.insert("content".into(), text.into());
        }
        _ => {
            obj.insert(
                "content-bin".into(),
                base64::engine::general_purpose::STANDARD.encode(&timed.content).into(),
            );
        }
    }
    obj.insert("timeout".into(), timed.timeout_secs.into());
}

/// Encodes a control message as a backend would send it: `c:` followed by compact JSON.
pub fn encode_control(msg: &ControlMessage) -> Bytes {
    let mut out = CONTROL_PREFIX.to_vec();
    out.extend_from_slice(msg.to_json().to_string().as_bytes());
    Bytes::from(out)
}

/// What a backend message on a GRIP-enabled connection turned out to be.
#[derive(Debug, Clone, PartialEq)]
pub enum Classified {
    /// A `c:` control message, parsed (an `Err` is ignored and logged by the session).
    Control(Result<ControlMessage, ControlError>),
    /// A content message with the message prefix stripped (shares the input buffer).
    Message(Bytes),
    /// Neither control nor prefixed: dropped and counted.
    Unprefixed,
}

/// Classifies a complete (reassembled) backend TEXT message on a GRIP connection.
///
/// `c:` wins over the message prefix, as in Pushpin (`src/proxy/wsproxysession.cpp`); with an
/// empty prefix every non-control message is content.
pub fn classify_text(payload: &Bytes, message_prefix: &str) -> Classified {
    if let Some(json) = payload.strip_prefix(CONTROL_PREFIX) {
        return Classified::Control(parse_control(json));
    }
    classify_binary(payload, message_prefix)
}

/// Classifies a complete backend BINARY message on a GRIP connection: the message prefix applies,
/// but binary messages are never control messages (Pushpin only checks `c:` on TEXT frames).
pub fn classify_binary(payload: &Bytes, message_prefix: &str) -> Classified {
    if payload.starts_with(message_prefix.as_bytes()) {
        Classified::Message(payload.slice(message_prefix.len()..))
    } else {
        Classified::Unprefixed
    }
}

/// Parses the backend's `Sec-WebSocket-Extensions` value from the OPEN response.
///
/// Returns the message prefix if the `grip` extension is listed: its `message-prefix` parameter
/// (token or quoted string with `\` escapes; a bare `message-prefix` means the empty prefix), or
/// [`DEFAULT_MESSAGE_PREFIX`]. Several comma-separated extensions (or several header values joined
/// with `, `) are allowed; the first `grip` wins. Names compare case-insensitively. `None` when
/// there is no `grip` extension or the value has an unterminated quoted string (Pushpin then
/// does not enable GRIP either).
pub fn parse_grip_extension(header_value: &str) -> Option<String> {
    for extension in split_outside_quotes(header_value, ',')? {
        let mut parts = split_outside_quotes(extension, ';')?.into_iter();
        let name = parts.next().unwrap_or_default().trim();
        if !name.eq_ignore_ascii_case("grip") {
            continue;
        }
        for param in parts {
            let (param_name, param_value) = match param.split_once('=') {
                Some((param_name, param_value)) => (param_name, param_value),
                None => (param, ""),
            };
            if param_name.trim().eq_ignore_ascii_case("message-prefix") {
                return unquote(param_value.trim());
            }
        }
        return Some(DEFAULT_MESSAGE_PREFIX.to_owned());
    }
    None
}

/// Splits `s` on the ASCII `sep` where it is outside a quoted string. `None` if a quoted string
/// is not terminated.
fn split_outside_quotes(s: &str, sep: char) -> Option<Vec<&str>> {
    let mut parts = Vec::new();
    let mut start = 0;
    let mut in_quotes = false;
    let mut escaped = false;
    for (i, c) in s.char_indices() {
        if in_quotes {
            if escaped {
                escaped = false;
            } else if c == '\\' {
                escaped = true;
            } else if c == '"' {
                in_quotes = false;
            }
        } else if c == '"' {
            in_quotes = true;
        } else if c == sep {
            parts.push(&s[start..i]);
            start = i + c.len_utf8();
        }
    }
    if in_quotes {
        return None;
    }
    parts.push(&s[start..]);
    Some(parts)
}

/// Decodes a parameter value: a token as is, or a quoted string without its quotes and escapes
/// (text after the closing quote is ignored, as Pushpin does).
fn unquote(value: &str) -> Option<String> {
    let Some(rest) = value.strip_prefix('"') else {
        return Some(value.to_owned());
    };
    let mut out = String::new();
    let mut chars = rest.chars();
    while let Some(c) = chars.next() {
        match c {
            '\\' => out.push(chars.next()?),
            '"' => return Some(out),
            c => out.push(c),
        }
    }
    None
}

/// Reads an optional string field; JSON `null` counts as absent.
fn opt_str<'a>(obj: &'a Map<String, Value>, field: &'static str) -> Result<Option<&'a str>, ControlError> {
    match obj.get(field) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) => Ok(Some(s)),
        Some(_) => Err(ControlError::WrongType(field)),
    }
}

fn required_non_empty(obj: &Map<String, Value>, field: &'static str) -> Result<String, ControlError> {
    match opt_str(obj, field)? {
        None => Err(ControlError::MissingField(field)),
        Some("") => Err(ControlError::EmptyField(field)),
        Some(s) => Ok(s.to_owned()),
    }
}

fn truncate_chars(s: &str, max: usize) -> String {
    s.chars().take(max).collect()
}

/// Content read from `content` (string) or `content-bin` (base64; wins when both are present).
pub(crate) struct Content {
    pub(crate) bytes: Bytes,
    pub(crate) is_bin: bool,
}

/// Why `content`/`content-bin` could not be read.
pub(crate) enum ContentError {
    WrongType(&'static str),
    BadBase64,
}

impl ContentError {
    fn into_control(self) -> ControlError {
        match self {
            Self::WrongType(field) => ControlError::WrongType(field),
            Self::BadBase64 => ControlError::BadBase64("content-bin"),
        }
    }
}

/// Reads `content-bin` or `content` from a control message or `ws-message` object. `Ok(None)`
/// when neither is present (null counts as absent).
pub(crate) fn content_field(obj: &Map<String, Value>) -> Result<Option<Content>, ContentError> {
    match obj.get("content-bin") {
        None | Some(Value::Null) => {}
        Some(Value::String(encoded)) => {
            let bytes = BASE64_STANDARD_LENIENT_PADDING
                .decode(encoded)
                .map_err(|_| ContentError::BadBase64)?;
            return Ok(Some(Content {
                bytes: Bytes::from(bytes),
                is_bin: true,
            }));
        }
        Some(_) => return Err(ContentError::WrongType("content-bin")),
    }
    match obj.get("content") {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(text)) => Ok(Some(Content {
            bytes: Bytes::copy_from_slice(text.as_bytes()),
            is_bin: false,
        })),
        Some(_) => Err(ContentError::WrongType("content")),
    }
}

/// Why a payload cannot be sent as the requested frame type.
pub(crate) enum PayloadError {
    TextNotUtf8,
    ControlFrameTooLong,
}

impl PayloadError {
    fn into_control(self) -> ControlError {
        match self {
            Self::TextNotUtf8 => ControlError::TextNotUtf8,
            Self::ControlFrameTooLong => ControlError::ControlFrameTooLong,
        }
    }
}

/// Checks that `content` can be sent as `kind`: TEXT must be UTF-8, PING/PONG at most 125 bytes.
pub(crate) fn check_payload(kind: MessageType, content: &[u8]) -> Result<(), PayloadError> {
    match kind {
        MessageType::Text if std::str::from_utf8(content).is_err() => Err(PayloadError::TextNotUtf8),
        MessageType::Ping | MessageType::Pong if content.len() > MAX_CONTROL_FRAME_PAYLOAD => {
            Err(PayloadError::ControlFrameTooLong)
        }
        _ => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn parse(json: &str) -> Result<ControlMessage, ControlError> {
        parse_control(json.as_bytes())
    }

    fn timed(kind: MessageType, content: &'static [u8], secs: u32) -> TimedMessage {
        TimedMessage {
            kind,
            content: Bytes::from_static(content),
            timeout_secs: secs,
            mode: KeepAliveMode::Idle,
        }
    }

    #[test]
    fn subscribe_with_and_without_filters() {
        assert_eq!(
            parse(r#"{"type":"subscribe","channel":"room"}"#),
            Ok(ControlMessage::Subscribe {
                channel: "room".into(),
                filters: vec![]
            })
        );
        // Python's json.dumps puts spaces after separators.
        assert_eq!(
            parse(r#"{"channel": "room", "type": "subscribe", "filters": ["skip-self", "x"]}"#),
            Ok(ControlMessage::Subscribe {
                channel: "room".into(),
                filters: vec!["skip-self".into(), "x".into()]
            })
        );
    }

    #[test]
    fn subscribe_errors() {
        assert_eq!(
            parse(r#"{"type":"subscribe"}"#),
            Err(ControlError::MissingField("channel"))
        );
        assert_eq!(
            parse(r#"{"type":"subscribe","channel":""}"#),
            Err(ControlError::EmptyField("channel"))
        );
        assert_eq!(
            parse(r#"{"type":"subscribe","channel":5}"#),
            Err(ControlError::WrongType("channel"))
        );
        assert_eq!(
            parse(r#"{"type":"subscribe","channel":"a","filters":"skip-self"}"#),
            Err(ControlError::WrongType("filters"))
        );
        assert_eq!(
            parse(r#"{"type":"subscribe","channel":"a","filters":[1]}"#),
            Err(ControlError::WrongType("filters"))
        );
    }

    #[test]
    fn unsubscribe() {
        assert_eq!(
            parse(r#"{"type":"unsubscribe","channel":"room"}"#),
            Ok(ControlMessage::Unsubscribe { channel: "room".into() })
        );
        assert_eq!(
            parse(r#"{"type":"unsubscribe"}"#),
            Err(ControlError::MissingField("channel"))
        );
    }

    #[test]
    fn detach_and_flush_delayed_ignore_extra_fields() {
        assert_eq!(parse(r#"{"type":"detach","extra":1}"#), Ok(ControlMessage::Detach));
        assert_eq!(parse(r#"{"type":"flush-delayed"}"#), Ok(ControlMessage::FlushDelayed));
    }

    #[test]
    fn session_sets_or_clears() {
        assert_eq!(
            parse(r#"{"type":"session","id":"s1"}"#),
            Ok(ControlMessage::Session { id: Some("s1".into()) })
        );
        assert_eq!(parse(r#"{"type":"session"}"#), Ok(ControlMessage::Session { id: None }));
        assert_eq!(
            parse(r#"{"type":"session","id":""}"#),
            Ok(ControlMessage::Session { id: None })
        );
        assert_eq!(
            parse(r#"{"type":"session","id":7}"#),
            Err(ControlError::WrongType("id"))
        );
    }

    #[test]
    fn set_meta_value_absent_null_empty() {
        assert_eq!(
            parse(r#"{"type":"set-meta","name":"user","value":"alice"}"#),
            Ok(ControlMessage::SetMeta {
                name: "user".into(),
                value: Some("alice".into())
            })
        );
        assert_eq!(
            parse(r#"{"type":"set-meta","name":"user"}"#),
            Ok(ControlMessage::SetMeta {
                name: "user".into(),
                value: None
            })
        );
        assert_eq!(
            parse(r#"{"type":"set-meta","name":"user","value":null}"#),
            Ok(ControlMessage::SetMeta {
                name: "user".into(),
                value: None
            })
        );
        assert_eq!(
            parse(r#"{"type":"set-meta","name":"user","value":""}"#),
            Ok(ControlMessage::SetMeta {
                name: "user".into(),
                value: Some(String::new())
            })
        );
        assert_eq!(
            parse(r#"{"type":"set-meta","name":""}"#),
            Err(ControlError::EmptyField("name"))
        );
        assert_eq!(
            parse(r#"{"type":"set-meta","value":"x"}"#),
            Err(ControlError::MissingField("name"))
        );
        assert_eq!(
            parse(r#"{"type":"set-meta","name":"a","value":1}"#),
            Err(ControlError::WrongType("value"))
        );
    }

    #[test]
    fn keep_alive_defaults() {
        assert_eq!(
            parse(r#"{"type":"keep-alive","content":"{}"}"#),
            Ok(ControlMessage::KeepAlive(Some(timed(MessageType::Text, b"{}", 55))))
        );
    }

    #[test]
    fn keep_alive_without_content_turns_off_and_ignores_timeout() {
        assert_eq!(parse(r#"{"type":"keep-alive"}"#), Ok(ControlMessage::KeepAlive(None)));
        assert_eq!(
            parse(r#"{"type":"keep-alive","timeout":"bogus"}"#),
            Ok(ControlMessage::KeepAlive(None))
        );
    }

    #[test]
    fn keep_alive_empty_content_is_still_on() {
        assert_eq!(
            parse(r#"{"type":"keep-alive","content":""}"#),
            Ok(ControlMessage::KeepAlive(Some(timed(MessageType::Text, b"", 55))))
        );
    }

    #[test]
    fn keep_alive_all_fields() {
        let msg = parse(
            r#"{"type":"keep-alive","content-bin":"AAEC","message-type":"binary","timeout":20,"mode":"interval"}"#,
        );
        assert_eq!(
            msg,
            Ok(ControlMessage::KeepAlive(Some(TimedMessage {
                kind: MessageType::Binary,
                content: Bytes::from_static(&[0, 1, 2]),
                timeout_secs: 20,
                mode: KeepAliveMode::Interval,
            })))
        );
    }

    #[test]
    fn keep_alive_unknown_mode_is_idle() {
        let Ok(ControlMessage::KeepAlive(Some(t))) = parse(r#"{"type":"keep-alive","content":"x","mode":"sometimes"}"#)
        else {
            panic!("expected keep-alive");
        };
        assert_eq!(t.mode, KeepAliveMode::Idle);
        assert_eq!(
            parse(r#"{"type":"keep-alive","content":"x","mode":3}"#),
            Err(ControlError::WrongType("mode"))
        );
    }

    #[test]
    fn content_bin_defaults_to_binary_and_wins_over_content() {
        assert_eq!(
            parse(r#"{"type":"keep-alive","content-bin":"aGk=","content":"ignored"}"#),
            Ok(ControlMessage::KeepAlive(Some(timed(MessageType::Binary, b"hi", 55))))
        );
        // Padding is optional.
        assert_eq!(
            parse(r#"{"type":"keep-alive","content-bin":"aGk"}"#),
            Ok(ControlMessage::KeepAlive(Some(timed(MessageType::Binary, b"hi", 55))))
        );
    }

    #[test]
    fn message_types_ping_pong_text() {
        for (name, kind) in [
            ("text", MessageType::Text),
            ("binary", MessageType::Binary),
            ("ping", MessageType::Ping),
            ("pong", MessageType::Pong),
        ] {
            let json = format!(r#"{{"type":"keep-alive","content":"p","message-type":"{name}"}}"#);
            assert_eq!(
                parse(&json),
                Ok(ControlMessage::KeepAlive(Some(timed(kind, b"p", 55)))),
                "{name}"
            );
        }
        assert_eq!(
            parse(r#"{"type":"keep-alive","content":"p","message-type":"close"}"#),
            Err(ControlError::UnknownMessageType)
        );
    }

    #[test]
    fn timeout_values() {
        let secs = |json: &str| match parse(json) {
            Ok(ControlMessage::KeepAlive(Some(t))) => Ok(t.timeout_secs),
            Ok(other) => panic!("unexpected {other:?}"),
            Err(err) => Err(err),
        };
        assert_eq!(secs(r#"{"type":"keep-alive","content":"","timeout":0}"#), Ok(55));
        assert_eq!(secs(r#"{"type":"keep-alive","content":"","timeout":30.9}"#), Ok(30));
        assert_eq!(
            secs(r#"{"type":"keep-alive","content":"","timeout":99999999999}"#),
            Ok(u32::MAX)
        );
        assert_eq!(
            secs(r#"{"type":"keep-alive","content":"","timeout":-1}"#),
            Err(ControlError::InvalidTimeout)
        );
        assert_eq!(
            secs(r#"{"type":"keep-alive","content":"","timeout":"5"}"#),
            Err(ControlError::WrongType("timeout"))
        );
    }

    #[test]
    fn send_delayed_default_is_one_second() {
        assert_eq!(
            parse(r#"{"type":"send-delayed","content":"later"}"#),
            Ok(ControlMessage::SendDelayed(timed(MessageType::Text, b"later", 1)))
        );
        assert_eq!(
            parse(r#"{"type":"send-delayed","content":"later","timeout":5}"#),
            Ok(ControlMessage::SendDelayed(timed(MessageType::Text, b"later", 5)))
        );
    }

    #[test]
    fn send_delayed_without_content_is_empty_message() {
        assert_eq!(
            parse(r#"{"type":"send-delayed","timeout":9}"#),
            Ok(ControlMessage::SendDelayed(timed(MessageType::Text, b"", 1)))
        );
        assert_eq!(
            parse(r#"{"type":"send-delayed","message-type":"ping"}"#),
            Ok(ControlMessage::SendDelayed(timed(MessageType::Ping, b"", 1)))
        );
    }

    #[test]
    fn content_errors() {
        assert_eq!(
            parse(r#"{"type":"keep-alive","content-bin":"***"}"#),
            Err(ControlError::BadBase64("content-bin"))
        );
        assert_eq!(
            parse(r#"{"type":"keep-alive","content-bin":5}"#),
            Err(ControlError::WrongType("content-bin"))
        );
        assert_eq!(
            parse(r#"{"type":"send-delayed","content":{"a":1}}"#),
            Err(ControlError::WrongType("content"))
        );
        // 0xff is not UTF-8, so it cannot be a TEXT message.
        assert_eq!(
            parse(r#"{"type":"keep-alive","content-bin":"/w==","message-type":"text"}"#),
            Err(ControlError::TextNotUtf8)
        );
        let long = "x".repeat(126);
        assert_eq!(
            parse(&format!(
                r#"{{"type":"keep-alive","content":"{long}","message-type":"ping"}}"#
            )),
            Err(ControlError::ControlFrameTooLong)
        );
    }

    #[test]
    fn envelope_errors() {
        assert!(matches!(parse("{"), Err(ControlError::Json(_))));
        assert!(matches!(parse(""), Err(ControlError::Json(_))));
        assert_eq!(parse(r#"["subscribe"]"#), Err(ControlError::NotObject));
        assert_eq!(parse(r#""x""#), Err(ControlError::NotObject));
        assert_eq!(parse(r#"{"channel":"a"}"#), Err(ControlError::MissingField("type")));
        assert_eq!(parse(r#"{"type":1}"#), Err(ControlError::WrongType("type")));
        assert_eq!(
            parse(r#"{"type":"auto-respond"}"#),
            Err(ControlError::UnknownType("auto-respond".into()))
        );
        let long = "t".repeat(500);
        assert_eq!(
            parse(&format!(r#"{{"type":"{long}"}}"#)),
            Err(ControlError::UnknownType("t".repeat(64)))
        );
    }

    #[test]
    fn classify_text_control_message_and_unprefixed() {
        let control = Bytes::from_static(br#"c:{"type":"detach"}"#);
        assert_eq!(
            classify_text(&control, "m:"),
            Classified::Control(Ok(ControlMessage::Detach))
        );
        let bad = Bytes::from_static(b"c:nope");
        assert!(matches!(
            classify_text(&bad, "m:"),
            Classified::Control(Err(ControlError::Json(_)))
        ));
        let msg = Bytes::from_static(b"m:hello");
        assert_eq!(
            classify_text(&msg, "m:"),
            Classified::Message(Bytes::from_static(b"hello"))
        );
        let plain = Bytes::from_static(b"hello");
        assert_eq!(classify_text(&plain, "m:"), Classified::Unprefixed);
        assert_eq!(classify_text(&Bytes::new(), "m:"), Classified::Unprefixed);
    }

    #[test]
    fn escaped_control_prefix_is_content() {
        let msg = Bytes::from_static(b"m:c:literal");
        assert_eq!(
            classify_text(&msg, "m:"),
            Classified::Message(Bytes::from_static(b"c:literal"))
        );
    }

    #[test]
    fn custom_and_empty_prefix() {
        let msg = Bytes::from_static(b">>payload");
        assert_eq!(
            classify_text(&msg, ">>"),
            Classified::Message(Bytes::from_static(b"payload"))
        );
        assert_eq!(classify_text(&Bytes::from_static(b"m:x"), ">>"), Classified::Unprefixed);
        assert_eq!(
            classify_text(&Bytes::from_static(b"anything"), ""),
            Classified::Message(Bytes::from_static(b"anything"))
        );
        // Control still wins with an empty prefix.
        assert!(matches!(
            classify_text(&Bytes::from_static(br#"c:{"type":"detach"}"#), ""),
            Classified::Control(Ok(ControlMessage::Detach))
        ));
    }

    #[test]
    fn stripped_message_shares_the_buffer() {
        let msg = Bytes::from(b"m:shared".to_vec());
        let Classified::Message(out) = classify_text(&msg, "m:") else {
            panic!("expected message");
        };
        assert_eq!(out.as_ptr(), msg[2..].as_ptr());
    }

    #[test]
    fn classify_binary_never_control() {
        assert_eq!(
            classify_binary(&Bytes::from_static(b"m:\x00\x01"), "m:"),
            Classified::Message(Bytes::from_static(b"\x00\x01"))
        );
        assert_eq!(
            classify_binary(&Bytes::from_static(br#"c:{"type":"detach"}"#), "m:"),
            Classified::Unprefixed
        );
        assert_eq!(
            classify_binary(&Bytes::from_static(b"\x00"), "m:"),
            Classified::Unprefixed
        );
    }

    #[test]
    fn grip_extension_variants() {
        assert_eq!(parse_grip_extension("grip"), Some("m:".into()));
        assert_eq!(parse_grip_extension("  GRIP  "), Some("m:".into()));
        assert_eq!(parse_grip_extension(r#"grip; message-prefix="p:""#), Some("p:".into()));
        assert_eq!(parse_grip_extension("grip;message-prefix=tok"), Some("tok".into()));
        assert_eq!(parse_grip_extension(r#"grip; message-prefix="""#), Some(String::new()));
        assert_eq!(parse_grip_extension("grip; message-prefix"), Some(String::new()));
        assert_eq!(
            parse_grip_extension(r#"grip; other=1; message-prefix="a\"b;c,d""#),
            Some(r#"a"b;c,d"#.into())
        );
        assert_eq!(
            parse_grip_extension(r#"permessage-deflate; client_max_window_bits, grip; message-prefix="_""#),
            Some("_".into())
        );
        assert_eq!(
            parse_grip_extension(r#"grip; message-prefix="x", grip; message-prefix="y""#),
            Some("x".into())
        );
    }

    #[test]
    fn grip_extension_absent_or_malformed() {
        assert_eq!(parse_grip_extension(""), None);
        assert_eq!(parse_grip_extension("permessage-deflate"), None);
        assert_eq!(parse_grip_extension("gripx"), None);
        assert_eq!(parse_grip_extension("x-grip; message-prefix=m:"), None);
        assert_eq!(parse_grip_extension(r#"grip; message-prefix="open"#), None);
    }

    #[test]
    fn encode_control_round_trips_examples() {
        let messages = [
            ControlMessage::Subscribe {
                channel: "c".into(),
                filters: vec!["skip-self".into()],
            },
            ControlMessage::Unsubscribe { channel: "c".into() },
            ControlMessage::Detach,
            ControlMessage::SetMeta {
                name: "user".into(),
                value: None,
            },
            ControlMessage::KeepAlive(None),
            ControlMessage::KeepAlive(Some(TimedMessage {
                kind: MessageType::Ping,
                content: Bytes::from_static(b"\xff"),
                timeout_secs: 3,
                mode: KeepAliveMode::Interval,
            })),
            ControlMessage::SendDelayed(timed(MessageType::Text, b"bye", 1)),
            ControlMessage::FlushDelayed,
            ControlMessage::Session { id: None },
        ];
        for msg in messages {
            let wire = encode_control(&msg);
            assert!(wire.starts_with(b"c:"));
            assert_eq!(
                classify_text(&wire, "m:"),
                Classified::Control(Ok(msg.clone())),
                "{msg:?}"
            );
        }
    }

    fn arb_kind() -> impl Strategy<Value = MessageType> {
        prop_oneof![
            Just(MessageType::Text),
            Just(MessageType::Binary),
            Just(MessageType::Ping),
            Just(MessageType::Pong),
        ]
    }

    fn arb_timed() -> impl Strategy<Value = TimedMessage> {
        (
            arb_kind(),
            proptest::collection::vec(any::<u8>(), 0..200),
            ".{0,40}",
            1..=u32::MAX,
            prop_oneof![Just(KeepAliveMode::Idle), Just(KeepAliveMode::Interval)],
        )
            .prop_map(|(kind, bin, text, timeout_secs, mode)| {
                let mut content = match kind {
                    MessageType::Text => text.into_bytes(),
                    _ => bin,
                };
                if matches!(kind, MessageType::Ping | MessageType::Pong) {
                    content.truncate(MAX_CONTROL_FRAME_PAYLOAD);
                }
                TimedMessage {
                    kind,
                    content: Bytes::from(content),
                    timeout_secs,
                    mode,
                }
            })
    }

    fn arb_control() -> impl Strategy<Value = ControlMessage> {
        prop_oneof![
            (".{1,20}", proptest::collection::vec(".{0,10}", 0..3))
                .prop_map(|(channel, filters)| ControlMessage::Subscribe { channel, filters }),
            ".{1,20}".prop_map(|channel| ControlMessage::Unsubscribe { channel }),
            Just(ControlMessage::Detach),
            (".{1,20}", proptest::option::of(".{0,20}"))
                .prop_map(|(name, value)| ControlMessage::SetMeta { name, value }),
            proptest::option::of(arb_timed()).prop_map(ControlMessage::KeepAlive),
            arb_timed().prop_map(|t| ControlMessage::SendDelayed(TimedMessage {
                mode: KeepAliveMode::Idle,
                ..t
            })),
            Just(ControlMessage::FlushDelayed),
            proptest::option::of(".{1,20}").prop_map(|id| ControlMessage::Session { id }),
        ]
    }

    proptest! {
        #[test]
        fn parse_control_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
            let _ = parse_control(&bytes);
        }

        #[test]
        fn parse_control_never_panics_on_near_valid_json(
            kind in prop_oneof![
                Just("subscribe"), Just("unsubscribe"), Just("detach"), Just("set-meta"),
                Just("keep-alive"), Just("send-delayed"), Just("flush-delayed"), Just("session"),
            ],
            field in prop_oneof![
                Just("channel"), Just("filters"), Just("name"), Just("value"), Just("content"),
                Just("content-bin"), Just("message-type"), Just("timeout"), Just("mode"), Just("id"),
            ],
            value in prop_oneof![
                Just("null".to_owned()), Just("-1".to_owned()), Just("1e400".to_owned()),
                Just("[1]".to_owned()), Just("{}".to_owned()), Just("true".to_owned()),
                ".{0,12}".prop_map(|s| serde_json::Value::String(s).to_string()),
                any::<f64>().prop_map(|f| serde_json::json!(f).to_string()),
            ],
        ) {
            let json = format!(r#"{{"type":"{kind}","{field}":{value}}}"#);
            let _ = parse_control(json.as_bytes());
        }

        #[test]
        fn control_round_trip(msg in arb_control()) {
            let wire = encode_control(&msg);
            prop_assert_eq!(parse_control(&wire[2..]), Ok(msg));
        }

        #[test]
        fn grip_extension_never_panics(s in ".{0,64}") {
            let _ = parse_grip_extension(&s);
        }

        #[test]
        fn prefixed_text_is_always_content(prefix in "[a-z]{1,3}:", body in ".{0,32}") {
            prop_assume!(!prefix.starts_with("c:"));
            let payload = Bytes::from(format!("{prefix}{body}"));
            prop_assert_eq!(
                classify_text(&payload, &prefix),
                Classified::Message(Bytes::from(body))
            );
        }
    }
}
