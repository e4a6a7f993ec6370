//! The `application/websocket-events` codec (PROTOCOL.md section 1).
//!
//! An event is `NAME SIZE\r\nCONTENT\r\n` with `SIZE` the content length in hexadecimal, or just
//! `NAME\r\n` when it has no content. Events are concatenated in a request or response body.
//!
//! Decoding is strict, unlike Pushpin's: the CRLF after the content is checked, sizes are
//! bounded hex numbers, truncated input is an error, and every failure is a typed
//! [`DecodeError`]. [`Decoder`] is incremental (feed bytes as they arrive) and zero-copy;
//! [`decode_body`] decodes a whole body. Unknown event names are skipped.

use bytes::{Buf, BufMut, Bytes, BytesMut};

pub use super::frame::CloseFrame;

/// Longest event line (`NAME` or `NAME SIZE`) accepted, CRLF excluded. Input that reaches it
/// without a CRLF is an error instead of being buffered forever.
pub const MAX_LINE_LEN: usize = 64;

/// Most hex digits accepted in a size: 16 digits fit a `u64`, so parsing cannot overflow.
pub const MAX_SIZE_DIGITS: usize = 16;

const CRLF: &[u8] = b"\r\n";

/// One websocket-events event.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    /// `OPEN`: the connection opens (request) or is accepted (response). Content is ignored.
    Open,
    /// `TEXT`: a whole text message. Not UTF-8-checked by this codec.
    Text(Bytes),
    /// `BINARY`: a whole binary message.
    Binary(Bytes),
    /// `PING`: a ping with its payload, possibly empty.
    Ping(Bytes),
    /// `PONG`: a pong with its payload, possibly empty.
    Pong(Bytes),
    /// `CLOSE`: a close with code and reason, or `None` when it had no content (no code).
    /// The code is not range-checked here.
    Close(Option<CloseFrame>),
    /// `DISCONNECT`: the connection ended without a clean close, or does not exist.
    Disconnect,
}

impl Event {
    /// The event's name on the wire: `"OPEN"`, `"TEXT"`, `"BINARY"`, `"PING"`, `"PONG"`,
    /// `"CLOSE"` or `"DISCONNECT"`.
    pub fn name(&self) -> &'static str {
        match self {
            Self::Open => "OPEN",
            Self::Text(_) => "TEXT",
            Self::Binary(_) => "BINARY",
            Self::Ping(_) => "PING",
            Self::Pong(_) => "PONG",
            Self::Close(_) => "CLOSE",
            Self::Disconnect => "DISCONNECT",
        }
    }

    /// Bytes of content as encoded: the payload length, `2 + reason length` for a `CLOSE` with
    /// a code, and 0 for `OPEN`, `DISCONNECT` and a `CLOSE` without code.
    pub fn content_len(&self) -> usize {
        match self {
            Self::Open | Self::Disconnect | Self::Close(None) => 0,
            Self::Text(b) | Self::Binary(b) | Self::Ping(b) | Self::Pong(b) => b.len(),
            Self::Close(Some(close)) => 2 + close.reason.len(),
        }
    }

    /// Exactly the number of bytes [`Event::encode_into`] writes.
    pub fn encoded_len(&self) -> usize {
        let name = self.name().len();
        match self.content_len() {
            0 => name + CRLF.len(),
            len => name + 1 + hex_digits(len) + CRLF.len() + len + CRLF.len(),
        }
    }

    /// Appends the event to `out` as `NAME SIZE\r\nCONTENT\r\n` (lowercase hex size), or as
    /// `NAME\r\n` when it has no content. Writes exactly [`Event::encoded_len`] bytes.
    pub fn encode_into(&self, out: &mut BytesMut) {
        out.reserve(self.encoded_len());
        out.put_slice(self.name().as_bytes());
        let len = self.content_len();
        if len == 0 {
            out.put_slice(CRLF);
            return;
        }
        out.put_u8(b' ');
        put_hex(out, len);
        out.put_slice(CRLF);
        match self {
            Self::Text(b) | Self::Binary(b) | Self::Ping(b) | Self::Pong(b) => out.put_slice(b),
            Self::Close(Some(close)) => {
                out.put_u16(close.code);
                out.put_slice(close.reason.as_bytes());
            }
            // content_len() is 0 for these, handled above.
            Self::Open | Self::Disconnect | Self::Close(None) => {}
        }
        out.put_slice(CRLF);
    }
}

/// Encodes `events` one after the other into one body.
pub fn encode(events: &[Event]) -> Bytes {
    let mut out = BytesMut::with_capacity(events.iter().map(Event::encoded_len).sum());
    for event in events {
        event.encode_into(&mut out);
    }
    out.freeze()
}

/// Number of lowercase hex digits of `n` (at least 1).
fn hex_digits(n: usize) -> usize {
    let bits = usize::BITS - n.leading_zeros();
    (bits as usize).div_ceil(4).max(1)
}

fn put_hex(out: &mut BytesMut, n: usize) {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    for i in (0..hex_digits(n)).rev() {
        out.put_u8(DIGITS[(n >> (4 * i)) & 0xF]);
    }
}

/// Why a websocket-events body could not be decoded. After an error the rest of the input is
/// not meaningful: the body (or stream) must be rejected.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    /// No CRLF within [`MAX_LINE_LEN`] bytes of the start of an event.
    #[error("event line longer than {limit} bytes")]
    LineTooLong {
        /// [`MAX_LINE_LEN`].
        limit: usize,
    },
    /// A CR or LF that is not part of the expected CRLF.
    #[error("expected CRLF after the event {after}")]
    MissingCrlf {
        /// `"line"` or `"content"`.
        after: &'static str,
    },
    /// An event line with an empty name.
    #[error("empty event name")]
    EmptyName,
    /// A byte in the event line that is neither printable ASCII nor a space.
    #[error("invalid byte 0x{byte:02x} in event line")]
    InvalidName {
        /// The offending byte.
        byte: u8,
    },
    /// A size that is not 1 to [`MAX_SIZE_DIGITS`] hex digits.
    #[error("invalid event size: {reason}")]
    InvalidSize {
        /// What is wrong with it.
        reason: &'static str,
    },
    /// A size over the decoder's limit, reported as soon as the event line is read.
    #[error("event content of {size} bytes exceeds the limit of {limit} bytes")]
    ContentTooLarge {
        /// The declared size.
        size: u64,
        /// The limit.
        limit: usize,
    },
    /// The input ended inside an event.
    #[error("truncated event")]
    Truncated,
    /// `CLOSE` content of 1 byte: a code needs 2.
    #[error("CLOSE content of 1 byte cannot hold a close code")]
    CloseTooShort,
    /// `CLOSE` content whose reason is not UTF-8.
    #[error("CLOSE reason is not valid UTF-8")]
    CloseReasonNotUtf8,
}

/// What an event line announces.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Open,
    Text,
    Binary,
    Ping,
    Pong,
    Close,
    Disconnect,
    /// A name this codec does not know: content is consumed and the event skipped.
    Unknown,
}

impl Kind {
    fn from_name(name: &[u8]) -> Self {
        match name {
            b"OPEN" => Self::Open,
            b"TEXT" => Self::Text,
            b"BINARY" => Self::Binary,
            b"PING" => Self::Ping,
            b"PONG" => Self::Pong,
            b"CLOSE" => Self::Close,
            b"DISCONNECT" => Self::Disconnect,
            _ => Self::Unknown,
        }
    }

    /// The event for this kind with `content`; `None` for unknown kinds.
    fn event(self, content: Bytes) -> Result<Option<Event>, DecodeError> {
        Ok(Some(match self {
            Self::Open => Event::Open,
            Self::Text => Event::Text(content),
            Self::Binary => Event::Binary(content),
            Self::Ping => Event::Ping(content),
            Self::Pong => Event::Pong(content),
            Self::Close => Event::Close(decode_close(&content)?),
            Self::Disconnect => Event::Disconnect,
            Self::Unknown => return Ok(None),
        }))
    }
}

fn decode_close(content: &[u8]) -> Result<Option<CloseFrame>, DecodeError> {
    match content {
        [] => Ok(None),
        [_] => Err(DecodeError::CloseTooShort),
        [hi, lo, reason @ ..] => Ok(Some(CloseFrame {
            code: u16::from_be_bytes([*hi, *lo]),
            reason: std::str::from_utf8(reason)
                .map_err(|_| DecodeError::CloseReasonNotUtf8)?
                .to_owned(),
        })),
    }
}

/// A parsed event line.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Line {
    kind: Kind,
    /// Content size; `None` for `NAME\r\n` (no content and no CRLF after it).
    size: Option<usize>,
    /// Bytes of the line including its CRLF.
    len: usize,
}

/// Parses the event line at the front of `buf`. `Ok(None)` when the line is not complete yet;
/// bytes seen so far are validated so that garbage fails early.
fn parse_line(buf: &[u8], max_content: usize) -> Result<Option<Line>, DecodeError> {
    let window = buf.get(..=MAX_LINE_LEN).unwrap_or(buf);
    let Some(end) = window.iter().position(|&b| b == b'\r' || b == b'\n') else {
        check_line_bytes(window)?;
        if buf.len() > MAX_LINE_LEN {
            return Err(DecodeError::LineTooLong { limit: MAX_LINE_LEN });
        }
        return Ok(None);
    };
    let line = window.get(..end).unwrap_or_default();
    check_line_bytes(line)?;
    match buf.get(end..end + 2) {
        Some(CRLF) => {}
        Some(_) => return Err(DecodeError::MissingCrlf { after: "line" }),
        None if buf.get(end) == Some(&b'\r') => return Ok(None),
        None => return Err(DecodeError::MissingCrlf { after: "line" }),
    }
    let (name, digits) = match line.iter().position(|&b| b == b' ') {
        Some(space) => (line.get(..space).unwrap_or_default(), line.get(space + 1..)),
        None => (line, None),
    };
    if name.is_empty() {
        return Err(DecodeError::EmptyName);
    }
    let size = match digits {
        Some(digits) => Some(parse_size(digits, max_content)?),
        None => None,
    };
    Ok(Some(Line {
        kind: Kind::from_name(name),
        size,
        len: end + CRLF.len(),
    }))
}

/// Every byte of an event line is printable ASCII or a space.
fn check_line_bytes(line: &[u8]) -> Result<(), DecodeError> {
    match line.iter().find(|&&b| !(b' '..=b'~').contains(&b)) {
        Some(&byte) => Err(DecodeError::InvalidName { byte }),
        None => Ok(()),
    }
}

fn parse_size(digits: &[u8], max_content: usize) -> Result<usize, DecodeError> {
    if digits.is_empty() {
        return Err(DecodeError::InvalidSize { reason: "empty" });
    }
    if digits.len() > MAX_SIZE_DIGITS {
        return Err(DecodeError::InvalidSize {
            reason: "more than 16 hex digits",
        });
    }
    let mut size: u64 = 0;
    for &d in digits {
        let v = match d {
            b'0'..=b'9' => d - b'0',
            b'a'..=b'f' => d - b'a' + 10,
            b'A'..=b'F' => d - b'A' + 10,
            _ => {
                return Err(DecodeError::InvalidSize {
                    reason: "not hexadecimal",
                });
            }
        };
        // At most 16 digits: cannot overflow.
        size = (size << 4) | u64::from(v);
    }
    match usize::try_from(size) {
        Ok(n) if n <= max_content => Ok(n),
        _ => Err(DecodeError::ContentTooLarge {
            size,
            limit: max_content,
        }),
    }
}

/// Checks the CRLF after content of `size` bytes at the front of `buf`, as far as it has
/// arrived: `Ok(true)` when content and CRLF are complete.
fn check_content_end(buf: &[u8], size: usize) -> Result<bool, DecodeError> {
    let tail = buf.get(size..).unwrap_or_default();
    let seen = tail.len().min(CRLF.len());
    if tail.get(..seen) != CRLF.get(..seen) {
        return Err(DecodeError::MissingCrlf { after: "content" });
    }
    Ok(seen == CRLF.len())
}

/// Where the incremental decoder is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// Expecting an event line.
    Line,
    /// The line was read (and consumed); waiting for `size` bytes of content and a CRLF.
    Content { kind: Kind, size: usize },
}

/// Incremental decoder: feed bytes as they arrive, call [`Decoder::decode`] until it returns
/// `Ok(None)`, and [`Decoder::finish`] at the end of input.
///
/// Owns only the content limit and its position (between events, or after an event line while
/// the content is arriving); the bytes stay in the caller's buffer.
#[derive(Debug, Clone)]
pub struct Decoder {
    max_content: usize,
    state: State,
}

impl Decoder {
    /// A decoder that rejects events whose content exceeds `max_content` bytes.
    pub fn new(max_content: usize) -> Self {
        Self {
            max_content,
            state: State::Line,
        }
    }

    /// Returns the next complete event, consuming its bytes from `buf`; `Ok(None)` when more
    /// bytes are needed. Unknown event names are skipped (consumed, not returned). Content is
    /// split off `buf` without copying.
    ///
    /// # Errors
    ///
    /// A [`DecodeError`] for malformed input, as soon as the bytes seen show it (a size over
    /// the limit as soon as its line is read). The stream must then be abandoned.
    pub fn decode(&mut self, buf: &mut BytesMut) -> Result<Option<Event>, DecodeError> {
        loop {
            let (kind, size) = match self.state {
                State::Line => {
                    let Some(line) = parse_line(buf, self.max_content)? else {
                        return Ok(None);
                    };
                    buf.advance(line.len);
                    match line.size {
                        None => match line.kind.event(Bytes::new())? {
                            Some(event) => return Ok(Some(event)),
                            None => continue,
                        },
                        Some(size) => {
                            self.state = State::Content { kind: line.kind, size };
                            (line.kind, size)
                        }
                    }
                }
                State::Content { kind, size } => (kind, size),
            };
            if !check_content_end(buf, size)? {
                return Ok(None);
            }
            self.state = State::Line;
            let content = buf.split_to(size).freeze();
            buf.advance(CRLF.len());
            if let Some(event) = kind.event(content)? {
                return Ok(Some(event));
            }
        }
    }

    /// Call at the end of input, after [`Decoder::decode`] returned `Ok(None)`.
    ///
    /// # Errors
    ///
    /// [`DecodeError::Truncated`] if `buf` holds a partial event or the decoder is inside one.
    pub fn finish(&self, buf: &BytesMut) -> Result<(), DecodeError> {
        if buf.is_empty() && self.state == State::Line {
            Ok(())
        } else {
            Err(DecodeError::Truncated)
        }
    }
}

/// Decodes a whole body: every event up to and including the first `CLOSE` or `DISCONNECT`
/// (later bytes are ignored, not even parsed, per PROTOCOL.md). Content shares `body`'s memory.
///
/// # Errors
///
/// A [`DecodeError`] for malformed or truncated input before that point.
pub fn decode_body(body: Bytes, max_content: usize) -> Result<Vec<Event>, DecodeError> {
    let mut events = Vec::new();
    let mut pos = 0;
    while let Some(rest) = body.get(pos..).filter(|rest| !rest.is_empty()) {
        let line = parse_line(rest, max_content)?.ok_or(DecodeError::Truncated)?;
        pos += line.len;
        let content = match line.size {
            None => Bytes::new(),
            Some(size) => {
                let rest = body.get(pos..).unwrap_or_default();
                if !check_content_end(rest, size)? {
                    return Err(DecodeError::Truncated);
                }
                // check_content_end saw `size` bytes and a CRLF after `pos`: in range.
                let content = body.slice(pos..pos + size);
                pos += size + CRLF.len();
                content
            }
        };
        if let Some(event) = line.kind.event(content)? {
            let last = matches!(event, Event::Close(_) | Event::Disconnect);
            events.push(event);
            if last {
                break;
            }
        }
    }
    Ok(events)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const LIMIT: usize = 1 << 16;

    fn close(code: u16, reason: &str) -> Event {
        Event::Close(Some(CloseFrame {
            code,
            reason: reason.to_owned(),
        }))
    }

    /// Decodes all of `input` with the incremental decoder, then `finish`.
    fn decode_stream(input: &[u8]) -> Result<Vec<Event>, DecodeError> {
        let mut dec = Decoder::new(LIMIT);
        let mut buf = BytesMut::from(input);
        let mut out = Vec::new();
        while let Some(e) = dec.decode(&mut buf)? {
            out.push(e);
        }
        dec.finish(&buf)?;
        Ok(out)
    }

    /// Both decoders must agree (the input has no CLOSE/DISCONNECT before its end).
    fn decode_both(input: &[u8]) -> Result<Vec<Event>, DecodeError> {
        let stream = decode_stream(input);
        let body = decode_body(Bytes::copy_from_slice(input), LIMIT);
        assert_eq!(stream, body, "{:?}", String::from_utf8_lossy(input));
        stream
    }

    #[test]
    fn encodes_every_event() {
        let events = [
            Event::Open,
            Event::Text(Bytes::from_static(b"hello")),
            Event::Binary(Bytes::from(vec![0u8; 26])),
            Event::Ping(Bytes::new()),
            Event::Pong(Bytes::from_static(b"x")),
            Event::Text(Bytes::new()),
            close(1000, "bye"),
            Event::Close(None),
            Event::Disconnect,
        ];
        let body = encode(&events);
        assert_eq!(
            &body[..],
            b"OPEN\r\nTEXT 5\r\nhello\r\nBINARY 1a\r\n\0\0\0\0\0\0\0\0\0\0\0\0\0\0\0\0\0\0\0\0\0\0\0\0\0\0\r\n\
              PING\r\nPONG 1\r\nx\r\nTEXT\r\nCLOSE 5\r\n\x03\xe8bye\r\nCLOSE\r\nDISCONNECT\r\n"
        );
        assert_eq!(body.len(), events.iter().map(Event::encoded_len).sum::<usize>());
        assert_eq!(close(1000, "bye").content_len(), 5);
        assert_eq!(Event::Close(None).content_len(), 0);
        let names: Vec<_> = events.iter().map(Event::name).collect();
        assert_eq!(
            names,
            [
                "OPEN",
                "TEXT",
                "BINARY",
                "PING",
                "PONG",
                "TEXT",
                "CLOSE",
                "CLOSE",
                "DISCONNECT"
            ]
        );
    }

    #[test]
    fn hex_sizes() {
        for (n, hex) in [
            (1, "1"),
            (15, "f"),
            (16, "10"),
            (255, "ff"),
            (256, "100"),
            (0x1_0000, "10000"),
        ] {
            let event = Event::Binary(Bytes::from(vec![b'z'; n]));
            let mut out = BytesMut::new();
            event.encode_into(&mut out);
            assert!(out.starts_with(format!("BINARY {hex}\r\n").as_bytes()), "{n}");
            assert_eq!(out.len(), event.encoded_len());
        }
        assert_eq!(hex_digits(0), 1);
        assert_eq!(hex_digits(usize::MAX), usize::BITS as usize / 4);
    }

    #[test]
    fn decodes_both_size_forms_and_cases() {
        assert_eq!(
            decode_both(
                b"TEXT A\r\n0123456789\r\nTEXT a\r\n0123456789\r\nTEXT 0\r\n\r\nTEXT\r\nTEXT 0005\r\nhello\r\n"
            ),
            Ok(vec![
                Event::Text(Bytes::from_static(b"0123456789")),
                Event::Text(Bytes::from_static(b"0123456789")),
                Event::Text(Bytes::new()),
                Event::Text(Bytes::new()),
                Event::Text(Bytes::from_static(b"hello")),
            ])
        );
    }

    #[test]
    fn content_may_contain_crlf_and_any_byte() {
        assert_eq!(
            decode_both(b"BINARY 4\r\n\r\n\xff\0\r\n"),
            Ok(vec![Event::Binary(Bytes::from_static(b"\r\n\xff\0"))])
        );
    }

    #[test]
    fn open_content_is_ignored() {
        assert_eq!(
            decode_both(b"OPEN 3\r\nabc\r\nDISCONNECT 2\r\nxy\r\n"),
            Ok(vec![Event::Open, Event::Disconnect])
        );
        // ... but must still be framed.
        assert_eq!(
            decode_both(b"OPEN 3\r\nabcd\r\n"),
            Err(DecodeError::MissingCrlf { after: "content" })
        );
    }

    #[test]
    fn close_content() {
        assert_eq!(decode_both(b"CLOSE\r\n"), Ok(vec![Event::Close(None)]));
        assert_eq!(decode_both(b"CLOSE 0\r\n\r\n"), Ok(vec![Event::Close(None)]));
        assert_eq!(decode_both(b"CLOSE 2\r\n\x0f\xa0\r\n"), Ok(vec![close(4000, "")]));
        assert_eq!(
            decode_both(&[&b"CLOSE 7\r\n\x03\xe9"[..], "héllo\r\n".as_bytes()].concat()),
            Err(DecodeError::MissingCrlf { after: "content" }),
            "é is 2 bytes: 8 bytes of content, not 7"
        );
        assert_eq!(
            decode_both("CLOSE 8\r\n\x03\x01héllo\r\n".as_bytes()),
            Ok(vec![close(769, "héllo")])
        );
        assert_eq!(decode_both(b"CLOSE 1\r\n\x03\r\n"), Err(DecodeError::CloseTooShort));
        assert_eq!(
            decode_both(b"CLOSE 3\r\n\x03\xe8\xff\r\n"),
            Err(DecodeError::CloseReasonNotUtf8)
        );
    }

    #[test]
    fn text_is_not_utf8_checked() {
        assert_eq!(
            decode_both(b"TEXT 1\r\n\xff\r\n"),
            Ok(vec![Event::Text(Bytes::from_static(b"\xff"))])
        );
    }

    #[test]
    fn unknown_events_are_skipped() {
        assert_eq!(
            decode_both(b"FUTURE 3\r\nabc\r\nTEXT 1\r\na\r\nOTHER\r\ntext 1\r\nb\r\nPING\r\n"),
            Ok(vec![Event::Text(Bytes::from_static(b"a")), Event::Ping(Bytes::new()),])
        );
        // A body of only unknown events.
        let mut dec = Decoder::new(LIMIT);
        let mut buf = BytesMut::from(&b"X\r\nY 1\r\n.\r\n"[..]);
        assert_eq!(dec.decode(&mut buf), Ok(None));
        assert!(buf.is_empty());
        assert_eq!(dec.finish(&buf), Ok(()));
        // Unknown events are framed strictly and bounded too.
        assert_eq!(
            decode_both(b"X 1\r\nab\r\n"),
            Err(DecodeError::MissingCrlf { after: "content" })
        );
        assert_eq!(
            decode_both(b"X 10001\r\n"),
            Err(DecodeError::ContentTooLarge {
                size: 0x10001,
                limit: LIMIT
            })
        );
    }

    #[test]
    fn line_errors() {
        let cases: &[(&[u8], DecodeError)] = &[
            (b"TEXT 5\nhello\r\n", DecodeError::MissingCrlf { after: "line" }),
            (b"TEXT\n", DecodeError::MissingCrlf { after: "line" }),
            (b"TEXT\rX", DecodeError::MissingCrlf { after: "line" }),
            (b"\r\n", DecodeError::EmptyName),
            (b" 5\r\nhello\r\n", DecodeError::EmptyName),
            (b"TE\tXT\r\n", DecodeError::InvalidName { byte: b'\t' }),
            (b"T\xc3\xa9\r\n", DecodeError::InvalidName { byte: 0xc3 }),
            (b"TEXT \r\n", DecodeError::InvalidSize { reason: "empty" }),
            (
                b"TEXT  5\r\n",
                DecodeError::InvalidSize {
                    reason: "not hexadecimal",
                },
            ),
            (
                b"TEXT 5 \r\n",
                DecodeError::InvalidSize {
                    reason: "not hexadecimal",
                },
            ),
            (
                b"TEXT +5\r\n",
                DecodeError::InvalidSize {
                    reason: "not hexadecimal",
                },
            ),
            (
                b"TEXT -1\r\n",
                DecodeError::InvalidSize {
                    reason: "not hexadecimal",
                },
            ),
            (
                b"TEXT 0x5\r\n",
                DecodeError::InvalidSize {
                    reason: "not hexadecimal",
                },
            ),
            (
                b"TEXT g\r\n",
                DecodeError::InvalidSize {
                    reason: "not hexadecimal",
                },
            ),
            (
                b"TEXT 00000000000000001\r\n",
                DecodeError::InvalidSize {
                    reason: "more than 16 hex digits",
                },
            ),
            (
                b"TEXT ffffffffffffffff\r\n",
                DecodeError::ContentTooLarge {
                    size: u64::MAX,
                    limit: LIMIT,
                },
            ),
            (
                b"TEXT 10001\r\n",
                DecodeError::ContentTooLarge {
                    size: 0x10001,
                    limit: LIMIT,
                },
            ),
        ];
        for (input, want) in cases {
            assert_eq!(
                decode_both(input),
                Err(want.clone()),
                "{:?}",
                String::from_utf8_lossy(input)
            );
            assert!(!want.to_string().is_empty());
        }
        // Exactly at the limit is fine.
        let mut body = b"BINARY 10000\r\n".to_vec();
        body.extend(vec![1u8; LIMIT]);
        body.extend_from_slice(b"\r\n");
        assert_eq!(
            decode_both(&body),
            Ok(vec![Event::Binary(Bytes::from(vec![1u8; LIMIT]))])
        );
    }

    #[test]
    fn line_length_is_bounded() {
        let name = "N".repeat(MAX_LINE_LEN);
        assert_eq!(decode_both(format!("{name}\r\n").as_bytes()), Ok(vec![]));
        let long = "N".repeat(MAX_LINE_LEN + 1);
        let want = DecodeError::LineTooLong { limit: MAX_LINE_LEN };
        assert_eq!(decode_both(format!("{long}\r\n").as_bytes()), Err(want.clone()));
        // Without any CRLF: an error once the limit is passed, not an endless wait.
        let mut buf = BytesMut::from(long.as_bytes());
        assert_eq!(Decoder::new(LIMIT).decode(&mut buf), Err(want));
        let mut buf = BytesMut::from(name.as_bytes());
        assert_eq!(Decoder::new(LIMIT).decode(&mut buf), Ok(None));
    }

    #[test]
    fn errors_are_reported_early() {
        // Garbage errors with its first bytes, without waiting for a CRLF.
        let mut buf = BytesMut::from(&b"\x00\x01"[..]);
        assert_eq!(
            Decoder::new(LIMIT).decode(&mut buf),
            Err(DecodeError::InvalidName { byte: 0 })
        );
        // An oversize size errors once its line is complete, before any content.
        let mut buf = BytesMut::from(&b"BINARY 7fffffff\r\n"[..]);
        assert_eq!(
            Decoder::new(LIMIT).decode(&mut buf),
            Err(DecodeError::ContentTooLarge {
                size: 0x7fff_ffff,
                limit: LIMIT
            })
        );
        // A wrong byte after the content errors without waiting for a second byte.
        let mut dec = Decoder::new(LIMIT);
        let mut buf = BytesMut::from(&b"TEXT 2\r\nabX"[..]);
        assert_eq!(dec.decode(&mut buf), Err(DecodeError::MissingCrlf { after: "content" }));
        let mut dec = Decoder::new(LIMIT);
        let mut buf = BytesMut::from(&b"TEXT 2\r\nab\rX"[..]);
        assert_eq!(dec.decode(&mut buf), Err(DecodeError::MissingCrlf { after: "content" }));
    }

    #[test]
    fn truncated_input() {
        for input in [
            &b"TEXT"[..],
            b"TEXT\r",
            b"TEXT 5",
            b"TEXT 5\r\n",
            b"TEXT 5\r\nhel",
            b"TEXT 5\r\nhello",
            b"TEXT 5\r\nhello\r",
            b"OPEN\r\nPING",
        ] {
            assert_eq!(decode_stream(input), Err(DecodeError::Truncated), "{input:?}");
            assert_eq!(
                decode_body(Bytes::copy_from_slice(input), LIMIT),
                Err(DecodeError::Truncated),
                "{input:?}"
            );
        }
        assert_eq!(decode_both(b""), Ok(vec![]));
    }

    #[test]
    fn finish_sees_consumed_line() {
        // The line was consumed, the buffer is empty, but the event is incomplete.
        let mut dec = Decoder::new(LIMIT);
        let mut buf = BytesMut::from(&b"TEXT 5\r\n"[..]);
        assert_eq!(dec.decode(&mut buf), Ok(None));
        assert!(buf.is_empty());
        assert_eq!(dec.finish(&buf), Err(DecodeError::Truncated));
        buf.extend_from_slice(b"hello\r\n");
        assert_eq!(
            dec.decode(&mut buf),
            Ok(Some(Event::Text(Bytes::from_static(b"hello"))))
        );
        assert_eq!(dec.finish(&buf), Ok(()));
    }

    #[test]
    fn decode_body_stops_after_close_or_disconnect() {
        let body = Bytes::from_static(b"TEXT 1\r\na\r\nCLOSE\r\nTEXT 1\r\nb\r\ngarbage \xff");
        assert_eq!(
            decode_body(body, LIMIT),
            Ok(vec![Event::Text(Bytes::from_static(b"a")), Event::Close(None)])
        );
        let body = Bytes::from_static(b"DISCONNECT\r\nTEXT 9\r\n");
        assert_eq!(decode_body(body, LIMIT), Ok(vec![Event::Disconnect]));
        // The incremental decoder is not a body: it keeps going.
        assert_eq!(
            decode_stream(b"CLOSE\r\nTEXT 1\r\nb\r\n"),
            Ok(vec![Event::Close(None), Event::Text(Bytes::from_static(b"b"))])
        );
    }

    #[test]
    fn content_is_zero_copy() {
        let body = Bytes::from_static(b"TEXT 5\r\nhello\r\n");
        let events = decode_body(body.clone(), LIMIT).unwrap();
        let Event::Text(t) = &events[0] else {
            panic!("{events:?}")
        };
        assert_eq!(t.as_ptr(), body[8..].as_ptr());

        let mut buf = BytesMut::from(&b"TEXT 5\r\nhello\r\n"[..]);
        let content_at = buf[8..].as_ptr();
        let Ok(Some(Event::Text(t))) = Decoder::new(LIMIT).decode(&mut buf) else {
            panic!()
        };
        assert_eq!(t.as_ptr(), content_at);
    }

    fn arb_event() -> impl Strategy<Value = Event> {
        let bytes = prop::collection::vec(any::<u8>(), 0..300).prop_map(Bytes::from);
        prop_oneof![
            Just(Event::Open),
            bytes.clone().prop_map(Event::Text),
            bytes.clone().prop_map(Event::Binary),
            bytes.clone().prop_map(Event::Ping),
            bytes.prop_map(Event::Pong),
            Just(Event::Close(None)),
            (any::<u16>(), ".{0,40}").prop_map(|(code, reason)| Event::Close(Some(CloseFrame { code, reason }))),
            Just(Event::Disconnect),
        ]
    }

    proptest! {
        #[test]
        fn round_trip(events in prop::collection::vec(arb_event(), 0..8)) {
            let body = encode(&events);
            prop_assert_eq!(body.len(), events.iter().map(Event::encoded_len).sum::<usize>());
            prop_assert_eq!(decode_stream(&body)?, events.clone());
            let end = events
                .iter()
                .position(|e| matches!(e, Event::Close(_) | Event::Disconnect))
                .map_or(events.len(), |i| i + 1);
            prop_assert_eq!(decode_body(body, LIMIT)?, events[..end].to_vec());
        }

        #[test]
        fn every_split_point(events in prop::collection::vec(arb_event(), 1..5)) {
            let body = encode(&events);
            // Offsets where an event ends: the only cuts after which the input is complete.
            let ends: Vec<usize> = events
                .iter()
                .scan(0, |at, e| {
                    *at += e.encoded_len();
                    Some(*at)
                })
                .collect();
            for cut in 0..=body.len() {
                let mut dec = Decoder::new(LIMIT);
                let mut buf = BytesMut::from(&body[..cut]);
                let mut got = Vec::new();
                while let Some(e) = dec.decode(&mut buf)? {
                    got.push(e);
                }
                let complete = cut == 0 || ends.contains(&cut);
                prop_assert_eq!(dec.finish(&buf).is_ok(), complete, "cut {}", cut);
                prop_assert_eq!(got.len(), ends.iter().filter(|&&end| end <= cut).count());
                buf.extend_from_slice(&body[cut..]);
                while let Some(e) = dec.decode(&mut buf)? {
                    got.push(e);
                }
                dec.finish(&buf)?;
                prop_assert_eq!(&got, &events);
            }
        }

        #[test]
        fn byte_at_a_time(events in prop::collection::vec(arb_event(), 1..5)) {
            let body = encode(&events);
            let mut dec = Decoder::new(LIMIT);
            let mut buf = BytesMut::new();
            let mut got = Vec::new();
            for &b in body.iter() {
                buf.put_u8(b);
                while let Some(e) = dec.decode(&mut buf)? {
                    got.push(e);
                }
            }
            dec.finish(&buf)?;
            prop_assert_eq!(got, events);
        }

        #[test]
        fn arbitrary_bytes_never_panic(
            bytes in prop::collection::vec(any::<u8>(), 0..400),
            chunk in 1usize..32,
            limit in 0usize..64,
        ) {
            let _ = decode_body(Bytes::from(bytes.clone()), limit);
            let mut dec = Decoder::new(limit);
            let mut buf = BytesMut::new();
            'feed: for piece in bytes.chunks(chunk) {
                buf.extend_from_slice(piece);
                loop {
                    match dec.decode(&mut buf) {
                        Ok(Some(e)) => prop_assert!(e.content_len() <= limit),
                        Ok(None) => break,
                        Err(_) => break 'feed,
                    }
                }
            }
            let _ = dec.finish(&buf);
        }

        /// Near-valid input (event-like tokens glued together) exercises deeper paths than
        /// uniform random bytes; the two decoders must agree on everything that has no
        /// CLOSE/DISCONNECT.
        #[test]
        fn event_like_input_decoders_agree(
            parts in prop::collection::vec(
                prop_oneof![
                    Just(&b"TEXT"[..]), Just(&b"PING"[..]), Just(&b"OPEN"[..]), Just(&b"X"[..]),
                    Just(&b" "[..]), Just(&b"\r\n"[..]), Just(&b"\r"[..]), Just(&b"1"[..]),
                    Just(&b"a"[..]), Just(&b"F"[..]), Just(&b"0"[..]),
                ],
                0..20,
            ),
        ) {
            let input: Vec<u8> = parts.concat();
            let stream = decode_stream(&input);
            let body = decode_body(Bytes::from(input), LIMIT);
            prop_assert_eq!(stream, body);
        }
    }
}
