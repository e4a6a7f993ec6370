//! Server-side RFC 6455 frame codec: sans-IO, no tokio.
//!
//! [`FrameDecoder`] parses client→server frames (which must be masked), unmasks them in place,
//! reassembles fragmented messages (control frames may be interleaved between fragments) and
//! validates what RFC 6455 requires of a receiver: reserved bits, opcodes, control frame rules,
//! UTF-8 of text messages and close reasons, close code ranges. It never answers anything itself:
//! pings, pongs and close frames are handed to the caller as [`Message`]s (PROTOCOL.md section 4
//! decides what to do with them), which is why the server side does not use tungstenite.
//!
//! [`encode_message`] writes server→client frames: one unmasked FIN frame per message.
//!
//! No extensions are negotiated, so every reserved bit must be zero.

use base64::Engine as _;
use bytes::{Buf, BufMut, Bytes, BytesMut};
use sha1::{Digest, Sha1};

/// Largest payload of a control frame (ping, pong, close), RFC 6455 section 5.5.
pub const MAX_CONTROL_PAYLOAD: usize = 125;

/// Longest close reason that fits a control frame next to the 2-byte code.
pub const MAX_CLOSE_REASON: usize = MAX_CONTROL_PAYLOAD - 2;

/// GUID appended to `Sec-WebSocket-Key` before hashing (RFC 6455 section 1.3).
const ACCEPT_GUID: &[u8] = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11";

const OP_CONTINUATION: u8 = 0x0;
const OP_TEXT: u8 = 0x1;
const OP_BINARY: u8 = 0x2;
const OP_CLOSE: u8 = 0x8;
const OP_PING: u8 = 0x9;
const OP_PONG: u8 = 0xA;

const FIN_BIT: u8 = 0x80;
const RSV_BITS: u8 = 0x70;
const OPCODE_BITS: u8 = 0x0F;
const MASK_BIT: u8 = 0x80;
const LEN7_BITS: u8 = 0x7F;

/// A close frame's status code and reason.
///
/// Also the content of a websocket-events `CLOSE` event (see [`super::events`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CloseFrame {
    /// Status code (RFC 6455 section 7.4).
    pub code: u16,
    /// UTF-8 reason; may be empty.
    pub reason: String,
}

/// One complete WebSocket message (data messages reassembled) or control frame.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Message {
    /// A text message. When produced by [`FrameDecoder`] its bytes are valid UTF-8.
    Text(Bytes),
    /// A binary message.
    Binary(Bytes),
    /// A ping control frame with its payload (at most 125 bytes).
    Ping(Bytes),
    /// A pong control frame with its payload (at most 125 bytes).
    Pong(Bytes),
    /// A close frame: `None` when it carried no payload (no status code).
    Close(Option<CloseFrame>),
}

/// A violation of RFC 6455 by the client. Each maps to the close code to send, see
/// [`ProtocolError::close_code`]. After an error the connection must be closed: the decoder's
/// state and the input buffer are no longer meaningful.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ProtocolError {
    /// A client→server frame without the mask bit (RFC 6455 section 5.1).
    #[error("client frame is not masked")]
    Unmasked,
    /// RSV1, RSV2 or RSV3 set although no extension was negotiated.
    #[error("reserved bits set without a negotiated extension")]
    ReservedBits,
    /// An opcode RFC 6455 reserves (0x3-0x7, 0xB-0xF).
    #[error("unknown opcode 0x{0:x}")]
    UnknownOpcode(u8),
    /// A control frame without FIN.
    #[error("fragmented control frame")]
    FragmentedControl,
    /// A control frame whose payload is longer than 125 bytes.
    #[error("control frame payload of {len} bytes exceeds 125")]
    ControlTooLong {
        /// Declared payload length.
        len: u64,
    },
    /// A continuation frame with no fragmented message in progress.
    #[error("continuation frame without a message in progress")]
    UnexpectedContinuation,
    /// A new text or binary frame while a fragmented message is still in progress.
    #[error("new data frame while a fragmented message is in progress")]
    ExpectedContinuation,
    /// A 64-bit payload length with its most significant bit set (RFC 6455 section 5.2).
    #[error("payload length has its most significant bit set")]
    InvalidLength,
    /// The message (all fragments so far plus the declared frame) exceeds the limit.
    #[error("message of at least {size} bytes exceeds the limit of {limit} bytes")]
    MessageTooBig {
        /// Bytes the message would have with the frame just announced.
        size: u64,
        /// The configured limit.
        limit: usize,
    },
    /// A text message that is not valid UTF-8.
    #[error("text message is not valid UTF-8")]
    InvalidUtf8,
    /// A close frame with a 1-byte payload (a status code needs 2).
    #[error("close frame payload of 1 byte cannot hold a status code")]
    InvalidClosePayload,
    /// A close status code that may not be sent on the wire (RFC 6455 section 7.4).
    #[error("invalid close code {0}")]
    InvalidCloseCode(u16),
    /// A close reason that is not valid UTF-8.
    #[error("close reason is not valid UTF-8")]
    InvalidCloseReason,
}

impl ProtocolError {
    /// The close code to send to the client for this error: 1009 for a message over the limit,
    /// 1007 for invalid UTF-8 (text message or close reason), 1002 for everything else.
    pub fn close_code(&self) -> u16 {
        match self {
            Self::MessageTooBig { .. } => 1009,
            Self::InvalidUtf8 | Self::InvalidCloseReason => 1007,
            Self::Unmasked
            | Self::ReservedBits
            | Self::UnknownOpcode(_)
            | Self::FragmentedControl
            | Self::ControlTooLong { .. }
            | Self::UnexpectedContinuation
            | Self::ExpectedContinuation
            | Self::InvalidLength
            | Self::InvalidClosePayload
            | Self::InvalidCloseCode(_) => 1002,
        }
    }
}

/// Whether `code` may appear in a close frame on the wire (RFC 6455 section 7.4): 1000-1003,
/// 1007-1014 and 3000-4999.
pub fn is_valid_close_code(code: u16) -> bool {
    matches!(code, 1000..=1003 | 1007..=1014 | 3000..=4999)
}

/// A fragmented data message being reassembled. Only exists between its first and last frame.
#[derive(Debug)]
struct Partial {
    /// `true` for a text message, `false` for binary.
    text: bool,
    /// Unmasked payload of the fragments so far.
    buf: BytesMut,
    /// Prefix of `buf` known to be valid UTF-8 (text only): lets invalid text fail at the
    /// fragment that contains it instead of at the end of the message.
    utf8_checked: usize,
}

/// Incremental parser of client→server frames.
///
/// Owns only the limit and, while a fragmented message is in progress, its reassembly buffer:
/// an idle decoder is 16 bytes on 64-bit targets (`usize` + `Option<Box<_>>`) and owns no heap
/// memory. Unfragmented messages are unmasked in place in the caller's buffer and split off it
/// without copying.
#[derive(Debug)]
pub struct FrameDecoder {
    max_message_bytes: usize,
    partial: Option<Box<Partial>>,
}

/// Frame header fields, parsed before the payload has arrived.
struct Header {
    fin: bool,
    opcode: u8,
    mask: [u8; 4],
    header_len: usize,
    payload_len: usize,
}

impl FrameDecoder {
    /// A decoder that rejects data messages longer than `max_message_bytes` (after reassembly).
    /// Control frames are bounded by RFC 6455 itself (125 bytes) and are not subject to it.
    pub fn new(max_message_bytes: usize) -> Self {
        Self {
            max_message_bytes,
            partial: None,
        }
    }

    /// Whether a fragmented message is in progress (its first frame was read, its last not yet).
    pub fn is_mid_message(&self) -> bool {
        self.partial.is_some()
    }

    /// Parses client→server frames from `buf`, consuming them, and returns the next complete
    /// message. Control frames are returned as soon as they are read, also between the
    /// fragments of a data message.
    ///
    /// Returns `Ok(None)` when `buf` holds no complete message yet; call again once more bytes
    /// were appended. Frames that only continue a fragmented message are consumed (their
    /// payload moved to the reassembly buffer) before `Ok(None)` is returned.
    ///
    /// # Errors
    ///
    /// A [`ProtocolError`] for any violation of RFC 6455; header violations and lengths over
    /// the limit are reported as soon as the header bytes are in, before the payload arrives.
    /// The connection must then be closed with [`ProtocolError::close_code`].
    pub fn decode(&mut self, buf: &mut BytesMut) -> Result<Option<Message>, ProtocolError> {
        loop {
            let Some(header) = self.parse_header(buf)? else {
                return Ok(None);
            };
            let frame_len = header.header_len.saturating_add(header.payload_len);
            if buf.len() < frame_len {
                // No reserve for the declared length: a peer that announces a large frame and
                // then stalls must not make us allocate it.
                return Ok(None);
            }
            buf.advance(header.header_len);
            let mut payload = buf.split_to(header.payload_len);
            unmask(&mut payload, header.mask);
            if let Some(message) = self.handle_frame(&header, payload)? {
                return Ok(Some(message));
            }
        }
    }

    /// Validates the frame header at the front of `buf`; `Ok(None)` when it is incomplete.
    /// Errors that the first two bytes already show are reported before the rest arrives.
    fn parse_header(&self, buf: &[u8]) -> Result<Option<Header>, ProtocolError> {
        let [b0, b1, ..] = *buf else {
            return Ok(None);
        };
        let fin = b0 & FIN_BIT != 0;
        let opcode = b0 & OPCODE_BITS;
        if b0 & RSV_BITS != 0 {
            return Err(ProtocolError::ReservedBits);
        }
        let is_control = match opcode {
            OP_CONTINUATION | OP_TEXT | OP_BINARY => false,
            OP_CLOSE | OP_PING | OP_PONG => true,
            other => return Err(ProtocolError::UnknownOpcode(other)),
        };
        if b1 & MASK_BIT == 0 {
            return Err(ProtocolError::Unmasked);
        }
        let len7 = b1 & LEN7_BITS;
        if is_control {
            if !fin {
                return Err(ProtocolError::FragmentedControl);
            }
            if usize::from(len7) > MAX_CONTROL_PAYLOAD {
                // 126/127 announce an extended length, which a control frame may never need.
                return Err(ProtocolError::ControlTooLong { len: u64::from(len7) });
            }
        } else {
            match (opcode, &self.partial) {
                (OP_CONTINUATION, None) => return Err(ProtocolError::UnexpectedContinuation),
                (OP_TEXT | OP_BINARY, Some(_)) => return Err(ProtocolError::ExpectedContinuation),
                _ => {}
            }
        }
        let (len_bytes, len) = match len7 {
            126 => {
                let Some(&[hi, lo]) = buf.get(2..4) else {
                    return Ok(None);
                };
                (2, u64::from(u16::from_be_bytes([hi, lo])))
            }
            127 => {
                let Some(ext) = buf.get(2..10) else {
                    return Ok(None);
                };
                let mut be = [0u8; 8];
                be.copy_from_slice(ext);
                let len = u64::from_be_bytes(be);
                if len >> 63 != 0 {
                    return Err(ProtocolError::InvalidLength);
                }
                (8, len)
            }
            short => (0, u64::from(short)),
        };
        let payload_len = if is_control {
            // Checked above: at most 125.
            usize::from(len7)
        } else {
            let so_far = self.partial.as_ref().map_or(0, |p| p.buf.len());
            let size = (so_far as u64).saturating_add(len);
            let too_big = || ProtocolError::MessageTooBig {
                size,
                limit: self.max_message_bytes,
            };
            if size > self.max_message_bytes as u64 {
                return Err(too_big());
            }
            usize::try_from(len).map_err(|_| too_big())?
        };
        let header_len = 2 + len_bytes + 4;
        let Some(&[m0, m1, m2, m3]) = buf.get(2 + len_bytes..header_len) else {
            return Ok(None);
        };
        Ok(Some(Header {
            fin,
            opcode,
            mask: [m0, m1, m2, m3],
            header_len,
            payload_len,
        }))
    }

    /// Handles one complete, unmasked frame: returns a message when one is complete.
    fn handle_frame(&mut self, header: &Header, payload: BytesMut) -> Result<Option<Message>, ProtocolError> {
        match header.opcode {
            OP_PING => Ok(Some(Message::Ping(payload.freeze()))),
            OP_PONG => Ok(Some(Message::Pong(payload.freeze()))),
            OP_CLOSE => decode_close(&payload).map(|close| Some(Message::Close(close))),
            OP_TEXT | OP_BINARY if header.fin => {
                if header.opcode == OP_TEXT {
                    if std::str::from_utf8(&payload).is_err() {
                        return Err(ProtocolError::InvalidUtf8);
                    }
                    Ok(Some(Message::Text(payload.freeze())))
                } else {
                    Ok(Some(Message::Binary(payload.freeze())))
                }
            }
            OP_TEXT | OP_BINARY => {
                // Copied so the reassembly buffer owns its memory instead of pinning the
                // caller's read buffer for the whole message.
                let mut partial = Box::new(Partial {
                    text: header.opcode == OP_TEXT,
                    buf: BytesMut::from(&payload[..]),
                    utf8_checked: 0,
                });
                partial.check_utf8(false)?;
                self.partial = Some(partial);
                Ok(None)
            }
            _ => {
                // Continuation; parse_header guarantees a message is in progress.
                let Some(partial) = self.partial.as_mut() else {
                    return Err(ProtocolError::UnexpectedContinuation);
                };
                partial.buf.extend_from_slice(&payload);
                partial.check_utf8(header.fin)?;
                if !header.fin {
                    return Ok(None);
                }
                let Some(done) = self.partial.take() else {
                    return Err(ProtocolError::UnexpectedContinuation);
                };
                let bytes = done.buf.freeze();
                Ok(Some(if done.text {
                    Message::Text(bytes)
                } else {
                    Message::Binary(bytes)
                }))
            }
        }
    }
}

impl Partial {
    /// Extends the validated UTF-8 prefix over the bytes appended since the last call. An
    /// incomplete sequence at the end is fine unless the message is `complete`.
    fn check_utf8(&mut self, complete: bool) -> Result<(), ProtocolError> {
        if !self.text {
            return Ok(());
        }
        let rest = self.buf.get(self.utf8_checked..).unwrap_or_default();
        match std::str::from_utf8(rest) {
            Ok(_) => self.utf8_checked = self.buf.len(),
            Err(e) if e.error_len().is_none() && !complete => {
                self.utf8_checked += e.valid_up_to();
            }
            Err(_) => return Err(ProtocolError::InvalidUtf8),
        }
        Ok(())
    }
}

/// Parses a close frame payload (already unmasked).
fn decode_close(payload: &[u8]) -> Result<Option<CloseFrame>, ProtocolError> {
    match payload {
        [] => Ok(None),
        [_] => Err(ProtocolError::InvalidClosePayload),
        [hi, lo, reason @ ..] => {
            let code = u16::from_be_bytes([*hi, *lo]);
            if !is_valid_close_code(code) {
                return Err(ProtocolError::InvalidCloseCode(code));
            }
            let reason = std::str::from_utf8(reason)
                .map_err(|_| ProtocolError::InvalidCloseReason)?
                .to_owned();
            Ok(Some(CloseFrame { code, reason }))
        }
    }
}

/// XORs `data` with the 4-byte `mask`, starting at mask index 0. Eight bytes at a time.
fn unmask(data: &mut [u8], mask: [u8; 4]) {
    let [m0, m1, m2, m3] = mask;
    let wide = u64::from_ne_bytes([m0, m1, m2, m3, m0, m1, m2, m3]);
    let mut chunks = data.chunks_exact_mut(8);
    for chunk in &mut chunks {
        let mut word = [0u8; 8];
        word.copy_from_slice(chunk);
        chunk.copy_from_slice(&(u64::from_ne_bytes(word) ^ wide).to_ne_bytes());
    }
    // Each chunk is 8 bytes, a multiple of 4, so the remainder starts at mask index 0 again.
    for (byte, m) in chunks.into_remainder().iter_mut().zip(mask.iter().cycle()) {
        *byte ^= m;
    }
}

/// The opcode of a message and its payload split into (close code, bytes). Control payloads
/// are cut to 125 bytes (close reasons at a UTF-8 character boundary) so that the frame is
/// always valid.
fn parts(msg: &Message) -> (u8, Option<u16>, &[u8]) {
    match msg {
        Message::Text(b) => (OP_TEXT, None, b),
        Message::Binary(b) => (OP_BINARY, None, b),
        Message::Ping(b) => (OP_PING, None, truncate(b, MAX_CONTROL_PAYLOAD)),
        Message::Pong(b) => (OP_PONG, None, truncate(b, MAX_CONTROL_PAYLOAD)),
        Message::Close(None) => (OP_CLOSE, None, &[]),
        Message::Close(Some(close)) => (
            OP_CLOSE,
            Some(close.code),
            truncate_str(&close.reason, MAX_CLOSE_REASON).as_bytes(),
        ),
    }
}

fn truncate(bytes: &[u8], max: usize) -> &[u8] {
    bytes.get(..max).unwrap_or(bytes)
}

/// The longest prefix of `s` of at most `max` bytes that ends on a character boundary.
pub(crate) fn truncate_str(s: &str, max: usize) -> &str {
    if s.len() <= max {
        return s;
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    s.get(..end).unwrap_or_default()
}

fn payload_len(code: Option<u16>, data: &[u8]) -> usize {
    data.len() + if code.is_some() { 2 } else { 0 }
}

fn header_len(payload_len: usize, masked: bool) -> usize {
    let ext = match payload_len {
        0..=125 => 0,
        126..=0xFFFF => 2,
        _ => 8,
    };
    2 + ext + if masked { 4 } else { 0 }
}

fn put_header(out: &mut BytesMut, opcode: u8, payload_len: usize, mask_bit: u8) {
    out.put_u8(FIN_BIT | opcode);
    match payload_len {
        0..=125 => out.put_u8(mask_bit | payload_len as u8),
        126..=0xFFFF => {
            out.put_u8(mask_bit | 126);
            out.put_u16(payload_len as u16);
        }
        _ => {
            out.put_u8(mask_bit | 127);
            out.put_u64(payload_len as u64);
        }
    }
}

/// Bytes [`encode_message`] writes for `msg`.
pub fn encoded_len(msg: &Message) -> usize {
    let (_, code, data) = parts(msg);
    let len = payload_len(code, data);
    header_len(len, false) + len
}

/// Writes `msg` as one unmasked FIN frame (server→client; no fragmentation).
///
/// `Close(None)` is a close frame with an empty payload. Ping and pong payloads longer than 125
/// bytes are cut to 125 bytes and close reasons to 123 bytes (at a character boundary), so the
/// frame is always valid. Exactly [`encoded_len`] bytes are written.
pub fn encode_message(msg: &Message, out: &mut BytesMut) {
    let (opcode, code, data) = parts(msg);
    let len = payload_len(code, data);
    out.reserve(header_len(len, false) + len);
    put_header(out, opcode, len, 0);
    if let Some(code) = code {
        out.put_u16(code);
    }
    out.put_slice(data);
}

/// Writes `msg` as one masked FIN frame, as a client would (for tests and the load generator).
/// Control payloads are cut as by [`encode_message`].
pub fn encode_masked(msg: &Message, mask: [u8; 4], out: &mut BytesMut) {
    let (opcode, code, data) = parts(msg);
    let len = payload_len(code, data);
    out.reserve(header_len(len, true) + len);
    put_header(out, opcode, len, MASK_BIT);
    out.put_slice(&mask);
    let start = out.len();
    if let Some(code) = code {
        out.put_u16(code);
    }
    out.put_slice(data);
    if let Some(payload) = out.get_mut(start..) {
        unmask(payload, mask);
    }
}

/// The `Sec-WebSocket-Accept` value for a `Sec-WebSocket-Key` (RFC 6455 section 4.2.2):
/// base64 of the SHA-1 of the key followed by the WebSocket GUID.
pub fn accept_key(key: &[u8]) -> String {
    let mut sha = Sha1::new();
    sha.update(key);
    sha.update(ACCEPT_GUID);
    base64::engine::general_purpose::STANDARD.encode(sha.finalize())
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const LIMIT: usize = 1 << 16;
    const MASK: [u8; 4] = [0x37, 0xfa, 0x21, 0x3d];

    /// A masked client frame with arbitrary first byte (FIN/RSV/opcode) and payload.
    fn raw(b0: u8, payload: &[u8]) -> BytesMut {
        let mut out = BytesMut::new();
        out.put_u8(b0);
        match payload.len() {
            0..=125 => out.put_u8(MASK_BIT | payload.len() as u8),
            126..=0xFFFF => {
                out.put_u8(MASK_BIT | 126);
                out.put_u16(payload.len() as u16);
            }
            n => {
                out.put_u8(MASK_BIT | 127);
                out.put_u64(n as u64);
            }
        }
        out.put_slice(&MASK);
        let start = out.len();
        out.put_slice(payload);
        unmask(&mut out[start..], MASK);
        out
    }

    fn masked(msg: &Message) -> BytesMut {
        let mut out = BytesMut::new();
        encode_masked(msg, MASK, &mut out);
        out
    }

    fn decode_all(dec: &mut FrameDecoder, buf: &mut BytesMut) -> Result<Vec<Message>, ProtocolError> {
        let mut out = Vec::new();
        while let Some(m) = dec.decode(buf)? {
            out.push(m);
        }
        Ok(out)
    }

    fn decode_one(bytes: &[u8]) -> Result<Option<Message>, ProtocolError> {
        FrameDecoder::new(LIMIT).decode(&mut BytesMut::from(bytes))
    }

    fn close(code: u16, reason: &str) -> Message {
        Message::Close(Some(CloseFrame {
            code,
            reason: reason.to_owned(),
        }))
    }

    #[test]
    fn decoder_is_small() {
        assert!(std::mem::size_of::<FrameDecoder>() <= 2 * std::mem::size_of::<usize>());
    }

    #[test]
    fn rfc_masked_hello() {
        // RFC 6455 section 5.7: a single-frame masked text message.
        let bytes = [0x81, 0x85, 0x37, 0xfa, 0x21, 0x3d, 0x7f, 0x9f, 0x4d, 0x51, 0x58];
        let mut buf = BytesMut::from(&bytes[..]);
        let msg = FrameDecoder::new(LIMIT).decode(&mut buf);
        assert_eq!(msg, Ok(Some(Message::Text(Bytes::from_static(b"Hello")))));
        assert!(buf.is_empty());
        assert_eq!(masked(&Message::Text(Bytes::from_static(b"Hello")))[..], bytes);
    }

    #[test]
    fn rfc_unmasked_examples_encode() {
        // RFC 6455 section 5.7: unmasked "Hello", unmasked ping "Hello", 256 and 65536 byte binary.
        let mut out = BytesMut::new();
        encode_message(&Message::Text(Bytes::from_static(b"Hello")), &mut out);
        assert_eq!(out[..], [0x81, 0x05, 0x48, 0x65, 0x6c, 0x6c, 0x6f]);
        out.clear();
        encode_message(&Message::Ping(Bytes::from_static(b"Hello")), &mut out);
        assert_eq!(out[..], [0x89, 0x05, 0x48, 0x65, 0x6c, 0x6c, 0x6f]);
        out.clear();
        encode_message(&Message::Binary(Bytes::from(vec![0; 256])), &mut out);
        assert_eq!(out[..4], [0x82, 0x7E, 0x01, 0x00]);
        assert_eq!(out.len(), 4 + 256);
        out.clear();
        encode_message(&Message::Binary(Bytes::from(vec![0; 65536])), &mut out);
        assert_eq!(out[..10], [0x82, 0x7F, 0, 0, 0, 0, 0, 1, 0, 0]);
        assert_eq!(out.len(), 10 + 65536);
    }

    #[test]
    fn rfc_fragmented_hello() {
        // RFC 6455 section 5.7: "Hel" then "lo", here masked as a client must.
        let mut buf = raw(OP_TEXT, b"Hel");
        buf.extend_from_slice(&raw(FIN_BIT | OP_CONTINUATION, b"lo"));
        let mut dec = FrameDecoder::new(LIMIT);
        assert_eq!(
            dec.decode(&mut buf),
            Ok(Some(Message::Text(Bytes::from_static(b"Hello"))))
        );
        assert!(buf.is_empty());
        assert!(!dec.is_mid_message());
    }

    #[test]
    fn accept_key_rfc_example() {
        assert_eq!(accept_key(b"dGhlIHNhbXBsZSBub25jZQ=="), "s3pPLMBiTxaQ9kYGzzhZRbK+xOo=");
    }

    #[test]
    fn close_payloads() {
        assert_eq!(
            decode_one(&raw(FIN_BIT | OP_CLOSE, b"")),
            Ok(Some(Message::Close(None)))
        );
        assert_eq!(
            decode_one(&raw(FIN_BIT | OP_CLOSE, b"\x03\xe8bye")),
            Ok(Some(close(1000, "bye")))
        );
        assert_eq!(
            decode_one(&raw(FIN_BIT | OP_CLOSE, b"\x0f\xa0")),
            Ok(Some(close(4000, "")))
        );
    }

    #[test]
    fn close_code_ranges() {
        let valid = [
            1000, 1001, 1002, 1003, 1007, 1008, 1009, 1010, 1011, 1012, 1013, 1014, 3000, 4999,
        ];
        let invalid = [0, 999, 1004, 1005, 1006, 1015, 1016, 2999, 5000, u16::MAX];
        for code in valid {
            assert!(is_valid_close_code(code), "{code}");
            let frame = raw(FIN_BIT | OP_CLOSE, &code.to_be_bytes());
            assert_eq!(decode_one(&frame), Ok(Some(close(code, ""))), "{code}");
        }
        for code in invalid {
            assert!(!is_valid_close_code(code), "{code}");
            let frame = raw(FIN_BIT | OP_CLOSE, &code.to_be_bytes());
            let err = decode_one(&frame).unwrap_err();
            assert_eq!(err, ProtocolError::InvalidCloseCode(code));
            assert_eq!(err.close_code(), 1002);
        }
    }

    /// Each error with the close code it maps to.
    #[test]
    fn errors_and_close_codes() {
        let big = vec![b'a'; LIMIT + 1];
        let cases: Vec<(BytesMut, ProtocolError, u16)> = vec![
            (
                BytesMut::from(&[0x81, 0x05, b'H', b'e', b'l', b'l', b'o'][..]),
                ProtocolError::Unmasked,
                1002,
            ),
            (raw(FIN_BIT | 0x40 | OP_TEXT, b"x"), ProtocolError::ReservedBits, 1002),
            (raw(FIN_BIT | 0x20 | OP_TEXT, b"x"), ProtocolError::ReservedBits, 1002),
            (raw(FIN_BIT | 0x10 | OP_TEXT, b"x"), ProtocolError::ReservedBits, 1002),
            (raw(FIN_BIT | 0x3, b""), ProtocolError::UnknownOpcode(3), 1002),
            (raw(FIN_BIT | 0x7, b""), ProtocolError::UnknownOpcode(7), 1002),
            (raw(FIN_BIT | 0xB, b""), ProtocolError::UnknownOpcode(0xB), 1002),
            (raw(FIN_BIT | 0xF, b""), ProtocolError::UnknownOpcode(0xF), 1002),
            (raw(OP_PING, b""), ProtocolError::FragmentedControl, 1002),
            (raw(OP_CLOSE, b""), ProtocolError::FragmentedControl, 1002),
            (
                raw(FIN_BIT | OP_PING, &[0; 126]),
                ProtocolError::ControlTooLong { len: 126 },
                1002,
            ),
            (
                raw(FIN_BIT | OP_PONG, &[0; 200]),
                ProtocolError::ControlTooLong { len: 126 },
                1002,
            ),
            (
                raw(FIN_BIT | OP_CONTINUATION, b"x"),
                ProtocolError::UnexpectedContinuation,
                1002,
            ),
            (
                {
                    let mut b = raw(OP_TEXT, b"a");
                    b.extend_from_slice(&raw(FIN_BIT | OP_BINARY, b"b"));
                    b
                },
                ProtocolError::ExpectedContinuation,
                1002,
            ),
            (
                BytesMut::from(&[0x82, 0xFF, 0x80, 0, 0, 0, 0, 0, 0, 0][..]),
                ProtocolError::InvalidLength,
                1002,
            ),
            (
                raw(FIN_BIT | OP_BINARY, &big),
                ProtocolError::MessageTooBig {
                    size: big.len() as u64,
                    limit: LIMIT,
                },
                1009,
            ),
            (raw(FIN_BIT | OP_TEXT, b"\xff"), ProtocolError::InvalidUtf8, 1007),
            (raw(FIN_BIT | OP_TEXT, b"ok\xc3"), ProtocolError::InvalidUtf8, 1007),
            (
                raw(FIN_BIT | OP_CLOSE, b"\x03"),
                ProtocolError::InvalidClosePayload,
                1002,
            ),
            (
                raw(FIN_BIT | OP_CLOSE, b"\x03\xed"),
                ProtocolError::InvalidCloseCode(1005),
                1002,
            ),
            (
                raw(FIN_BIT | OP_CLOSE, b"\x03\xe8\xc3\x28"),
                ProtocolError::InvalidCloseReason,
                1007,
            ),
        ];
        for (bytes, want, code) in cases {
            let got = decode_all(&mut FrameDecoder::new(LIMIT), &mut bytes.clone());
            assert_eq!(got, Err(want.clone()), "{bytes:02x?}");
            assert_eq!(want.close_code(), code, "{want}");
            assert!(!want.to_string().is_empty());
        }
    }

    #[test]
    fn header_errors_before_payload_arrives() {
        // Only the first bytes of each frame: the error must not wait for the rest.
        assert_eq!(decode_one(&[0x81, 0x05]), Err(ProtocolError::Unmasked));
        assert_eq!(decode_one(&[0xC1]), Ok(None));
        assert_eq!(decode_one(&[0xC1, 0x85]), Err(ProtocolError::ReservedBits));
        assert_eq!(decode_one(&[0x09, 0x80]), Err(ProtocolError::FragmentedControl));
        assert_eq!(
            decode_one(&[0x89, 0xFE]),
            Err(ProtocolError::ControlTooLong { len: 126 })
        );
        assert_eq!(decode_one(&[0x80, 0x80]), Err(ProtocolError::UnexpectedContinuation));
        // 2^40 bytes announced: rejected from the 10-byte length alone, nothing reserved.
        let mut buf = BytesMut::from(&[0x82, 0xFF, 0, 0, 1, 0, 0, 0, 0, 0][..]);
        assert_eq!(
            FrameDecoder::new(LIMIT).decode(&mut buf),
            Err(ProtocolError::MessageTooBig {
                size: 1 << 40,
                limit: LIMIT,
            })
        );
        assert_eq!(
            FrameDecoder::new(1000).decode(&mut BytesMut::from(&[0x82, 0xFE, 0xFF, 0xFF][..])),
            Err(ProtocolError::MessageTooBig {
                size: 0xFFFF,
                limit: 1000,
            })
        );
    }

    #[test]
    fn limit_counts_all_fragments() {
        let mut dec = FrameDecoder::new(10);
        let mut buf = raw(OP_BINARY, &[1; 6]);
        assert_eq!(dec.decode(&mut buf), Ok(None));
        // 6 so far + 5 announced = 11 > 10: rejected from the header alone.
        let frame = raw(FIN_BIT | OP_CONTINUATION, &[2; 5]);
        buf.extend_from_slice(&frame[..2]);
        assert_eq!(
            dec.decode(&mut buf),
            Err(ProtocolError::MessageTooBig { size: 11, limit: 10 })
        );
        // Exactly at the limit is fine.
        let mut dec = FrameDecoder::new(10);
        let mut buf = raw(OP_BINARY, &[1; 6]);
        buf.extend_from_slice(&raw(FIN_BIT | OP_CONTINUATION, &[2; 4]));
        let want = [1, 1, 1, 1, 1, 1, 2, 2, 2, 2];
        assert_eq!(
            dec.decode(&mut buf),
            Ok(Some(Message::Binary(Bytes::copy_from_slice(&want))))
        );
    }

    #[test]
    fn control_frames_not_subject_to_message_limit() {
        let mut buf = raw(FIN_BIT | OP_PING, &[7; 125]);
        assert_eq!(
            FrameDecoder::new(4).decode(&mut buf),
            Ok(Some(Message::Ping(Bytes::from(vec![7; 125]))))
        );
    }

    #[test]
    fn fragmented_with_interleaved_control_frames() {
        let mut buf = raw(OP_TEXT, "héllo ".as_bytes());
        buf.extend_from_slice(&raw(FIN_BIT | OP_PING, b"p1"));
        buf.extend_from_slice(&raw(OP_CONTINUATION, "wör".as_bytes()));
        buf.extend_from_slice(&raw(FIN_BIT | OP_PONG, b""));
        buf.extend_from_slice(&raw(OP_CONTINUATION, b""));
        buf.extend_from_slice(&raw(FIN_BIT | OP_CONTINUATION, "ld".as_bytes()));
        buf.extend_from_slice(&raw(FIN_BIT | OP_BINARY, b"\x00\xff"));
        let mut dec = FrameDecoder::new(LIMIT);
        assert_eq!(
            decode_all(&mut dec, &mut buf),
            Ok(vec![
                Message::Ping(Bytes::from_static(b"p1")),
                Message::Pong(Bytes::new()),
                Message::Text(Bytes::from("héllo wörld")),
                Message::Binary(Bytes::from_static(b"\x00\xff")),
            ])
        );
        assert!(buf.is_empty());
    }

    #[test]
    fn close_between_fragments() {
        let mut buf = raw(OP_BINARY, b"ab");
        buf.extend_from_slice(&raw(FIN_BIT | OP_CLOSE, b"\x03\xe9"));
        let mut dec = FrameDecoder::new(LIMIT);
        assert_eq!(dec.decode(&mut buf), Ok(Some(close(1001, ""))));
        assert!(dec.is_mid_message());
    }

    #[test]
    fn utf8_split_across_fragments_is_valid() {
        // "€" = e2 82 ac, split inside the character.
        let mut buf = raw(OP_TEXT, b"\xe2");
        buf.extend_from_slice(&raw(OP_CONTINUATION, b"\x82"));
        buf.extend_from_slice(&raw(FIN_BIT | OP_CONTINUATION, b"\xac!"));
        assert_eq!(decode_one(&buf), Ok(Some(Message::Text(Bytes::from("€!")))));
    }

    #[test]
    fn invalid_utf8_fails_at_the_fragment() {
        // The first fragment is already invalid: error without waiting for the rest.
        let mut dec = FrameDecoder::new(LIMIT);
        assert_eq!(
            dec.decode(&mut raw(OP_TEXT, b"ok\xff")),
            Err(ProtocolError::InvalidUtf8)
        );
        // Valid prefix, then an invalid continuation byte in the second fragment.
        let mut dec = FrameDecoder::new(LIMIT);
        assert_eq!(dec.decode(&mut raw(OP_TEXT, b"\xe2\x82")), Ok(None));
        assert_eq!(
            dec.decode(&mut raw(OP_CONTINUATION, b"x")),
            Err(ProtocolError::InvalidUtf8)
        );
        // Incomplete sequence at the end of the final fragment.
        let mut dec = FrameDecoder::new(LIMIT);
        assert_eq!(dec.decode(&mut raw(OP_TEXT, b"a")), Ok(None));
        assert_eq!(
            dec.decode(&mut raw(FIN_BIT | OP_CONTINUATION, b"\xe2\x82")),
            Err(ProtocolError::InvalidUtf8)
        );
        // Binary messages are never checked.
        assert_eq!(
            decode_one(&raw(FIN_BIT | OP_BINARY, b"\xff")),
            Ok(Some(Message::Binary(Bytes::from_static(b"\xff"))))
        );
    }

    #[test]
    fn partial_input_needs_more() {
        let frame = masked(&Message::Binary(Bytes::from(vec![9; 300])));
        for cut in 0..frame.len() {
            let mut buf = BytesMut::from(&frame[..cut]);
            assert_eq!(FrameDecoder::new(LIMIT).decode(&mut buf), Ok(None), "cut {cut}");
            assert_eq!(buf.len(), cut, "nothing consumed before the frame is complete");
        }
    }

    #[test]
    fn encode_truncates_control_payloads() {
        let long = Message::Ping(Bytes::from(vec![1; 300]));
        let mut out = BytesMut::new();
        encode_message(&long, &mut out);
        assert_eq!(out.len(), encoded_len(&long));
        assert_eq!(out.len(), 2 + 125);
        // Reason of 70 two-byte characters (140 bytes) is cut at a character boundary.
        let reason: String = "é".repeat(70);
        let msg = close(1000, &reason);
        let mut buf = masked(&msg);
        let got = FrameDecoder::new(LIMIT).decode(&mut buf);
        assert_eq!(got, Ok(Some(close(1000, &"é".repeat(61)))));
        out.clear();
        encode_message(&msg, &mut out);
        assert_eq!(out.len(), encoded_len(&msg));
        assert_eq!(out.len(), 2 + 2 + 122);
        out.clear();
        encode_message(&Message::Close(None), &mut out);
        assert_eq!(out[..], [0x88, 0x00]);
    }

    #[test]
    fn unmask_matches_bytewise() {
        let mask = [1, 2, 3, 0xff];
        for len in 0..40 {
            let data: Vec<u8> = (0..len).map(|i| i as u8).collect();
            let mut fast = data.clone();
            unmask(&mut fast, mask);
            let slow: Vec<u8> = data.iter().enumerate().map(|(i, b)| b ^ mask[i % 4]).collect();
            assert_eq!(fast, slow, "len {len}");
        }
    }

    fn arb_message() -> impl Strategy<Value = Message> {
        let control = prop::collection::vec(any::<u8>(), 0..=125).prop_map(Bytes::from);
        let data = prop::collection::vec(any::<u8>(), 0..400).prop_map(Bytes::from);
        let valid_code = prop_oneof![1000u16..=1003, 1007u16..=1014, 3000u16..=4999];
        prop_oneof![
            ".{0,80}".prop_map(|s: String| Message::Text(Bytes::from(s))),
            data.prop_map(Message::Binary),
            control.clone().prop_map(Message::Ping),
            control.prop_map(Message::Pong),
            Just(Message::Close(None)),
            (valid_code, "[a-zé ]{0,40}")
                .prop_map(|(code, reason)| { Message::Close(Some(CloseFrame { code, reason })) }),
        ]
    }

    proptest! {
        #[test]
        fn round_trip_every_split_point(
            msgs in prop::collection::vec(arb_message(), 1..5),
            mask in any::<[u8; 4]>(),
        ) {
            let mut wire = BytesMut::new();
            for m in &msgs {
                encode_masked(m, mask, &mut wire);
            }
            for cut in 0..=wire.len() {
                let mut dec = FrameDecoder::new(LIMIT);
                let mut buf = BytesMut::from(&wire[..cut]);
                let mut got = decode_all(&mut dec, &mut buf).unwrap();
                buf.extend_from_slice(&wire[cut..]);
                got.extend(decode_all(&mut dec, &mut buf).unwrap());
                prop_assert_eq!(&got, &msgs);
                prop_assert!(buf.is_empty());
            }
        }

        #[test]
        fn server_encoding_is_unmasked_masked_encoding(msg in arb_message()) {
            let mut plain = BytesMut::new();
            encode_message(&msg, &mut plain);
            prop_assert_eq!(plain.len(), encoded_len(&msg));
            let client = masked(&msg);
            prop_assert_eq!(client.len(), plain.len() + 4);
            // Same header apart from the mask bit, and the payload masked with MASK.
            prop_assert_eq!(client[0], plain[0]);
            prop_assert_eq!(client[1], plain[1] | MASK_BIT);
            let (_, code, data) = parts(&msg);
            let header = header_len(payload_len(code, data), false);
            let mut unmasked = client[header + 4..].to_vec();
            unmask(&mut unmasked, MASK);
            prop_assert_eq!(&client[2..header], &plain[2..header]);
            prop_assert_eq!(&unmasked[..], &plain[header..]);
        }

        #[test]
        fn fragmented_round_trip(
            data in prop::collection::vec(any::<u8>(), 0..300),
            cuts in prop::collection::vec(any::<prop::sample::Index>(), 0..4),
            text in any::<bool>(),
        ) {
            let data = if text { String::from_utf8_lossy(&data).into_owned().into_bytes() } else { data };
            let mut points: Vec<usize> = cuts.iter().map(|i| i.index(data.len() + 1)).collect();
            points.sort_unstable();
            let mut bounds = vec![0];
            bounds.extend(points);
            bounds.push(data.len());
            let mut wire = BytesMut::new();
            for (i, w) in bounds.windows(2).enumerate() {
                let first = i == 0;
                let last = i == bounds.len() - 2;
                let op = if !first { OP_CONTINUATION } else if text { OP_TEXT } else { OP_BINARY };
                wire.extend_from_slice(&raw(if last { FIN_BIT | op } else { op }, &data[w[0]..w[1]]));
                wire.extend_from_slice(&raw(FIN_BIT | OP_PING, &[i as u8]));
            }
            let mut dec = FrameDecoder::new(LIMIT);
            let got = decode_all(&mut dec, &mut wire).unwrap();
            let want = if text { Message::Text(Bytes::from(data)) } else { Message::Binary(Bytes::from(data)) };
            // The final fragment's message comes before the ping that follows it.
            prop_assert_eq!(got.len(), bounds.len());
            prop_assert_eq!(&got[bounds.len() - 2], &want);
            prop_assert!(!dec.is_mid_message());
        }

        #[test]
        fn arbitrary_bytes_never_panic(
            bytes in prop::collection::vec(any::<u8>(), 0..600),
            chunk in 1usize..64,
            limit in 0usize..512,
        ) {
            let mut dec = FrameDecoder::new(limit);
            let mut buf = BytesMut::new();
            'feed: for piece in bytes.chunks(chunk) {
                buf.extend_from_slice(piece);
                loop {
                    match dec.decode(&mut buf) {
                        Ok(Some(Message::Text(t))) => prop_assert!(std::str::from_utf8(&t).is_ok()),
                        Ok(Some(Message::Ping(p) | Message::Pong(p))) => prop_assert!(p.len() <= 125),
                        Ok(Some(Message::Binary(b))) => prop_assert!(b.len() <= limit),
                        Ok(Some(Message::Close(Some(c)))) => prop_assert!(is_valid_close_code(c.code)),
                        Ok(Some(Message::Close(None))) => {}
                        Ok(None) => break,
                        Err(_) => break 'feed,
                    }
                }
            }
        }
    }

    /// Interoperability with a real client implementation: tungstenite in the client role.
    mod tungstenite_interop {
        use super::*;
        use std::io::{self, Read, Write};
        use tokio_tungstenite::tungstenite::{
            self as tung,
            protocol::{
                Role, WebSocket,
                frame::Frame,
                frame::coding::{Data, OpCode},
            },
        };

        /// An in-memory stream: reads from `input`, collects writes in `output`.
        #[derive(Default)]
        struct Pipe {
            input: io::Cursor<Vec<u8>>,
            output: Vec<u8>,
        }

        impl Read for Pipe {
            fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
                let n = self.input.read(buf)?;
                if n == 0 && !buf.is_empty() {
                    return Err(io::ErrorKind::WouldBlock.into());
                }
                Ok(n)
            }
        }

        impl Write for Pipe {
            fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
                self.output.extend_from_slice(buf);
                Ok(buf.len())
            }
            fn flush(&mut self) -> io::Result<()> {
                Ok(())
            }
        }

        #[test]
        fn decodes_tungstenite_client_frames() {
            let mut client = WebSocket::from_raw_socket(Pipe::default(), Role::Client, None);
            let big = "x".repeat(70_000);
            client.send(tung::Message::text("héllo")).unwrap();
            client.send(tung::Message::binary(vec![0u8, 1, 2])).unwrap();
            client.send(tung::Message::text(big.clone())).unwrap();
            client.send(tung::Message::Ping(Bytes::from_static(b"pp"))).unwrap();
            client.send(tung::Message::Pong(Bytes::new())).unwrap();
            // A fragmented message with a ping between its fragments.
            client
                .write(tung::Message::Frame(Frame::message(
                    &b"frag"[..],
                    OpCode::Data(Data::Text),
                    false,
                )))
                .unwrap();
            client.write(tung::Message::Ping(Bytes::from_static(b"mid"))).unwrap();
            client
                .write(tung::Message::Frame(Frame::message(
                    &b"ment"[..],
                    OpCode::Data(Data::Continue),
                    true,
                )))
                .unwrap();
            client.flush().unwrap();
            client
                .close(Some(tung::protocol::CloseFrame {
                    code: 4001.into(),
                    reason: "done".into(),
                }))
                .unwrap();
            let _ = client.flush();
            let wire = std::mem::take(&mut client.get_mut().output);

            let mut dec = FrameDecoder::new(1 << 20);
            let mut buf = BytesMut::from(&wire[..]);
            let got = decode_all(&mut dec, &mut buf).unwrap();
            assert!(buf.is_empty());
            assert_eq!(
                got,
                vec![
                    Message::Text(Bytes::from("héllo")),
                    Message::Binary(Bytes::from_static(&[0, 1, 2])),
                    Message::Text(Bytes::from(big)),
                    Message::Ping(Bytes::from_static(b"pp")),
                    Message::Pong(Bytes::new()),
                    Message::Ping(Bytes::from_static(b"mid")),
                    Message::Text(Bytes::from_static(b"fragment")),
                    close(4001, "done"),
                ]
            );
        }

        #[test]
        fn tungstenite_client_reads_our_frames() {
            let msgs = [
                Message::Text(Bytes::from("héllo")),
                Message::Binary(Bytes::from(vec![7u8; 70_000])),
                Message::Text(Bytes::new()),
                Message::Ping(Bytes::from_static(b"p")),
                Message::Pong(Bytes::from_static(b"q")),
                close(1001, "going away"),
            ];
            let mut wire = BytesMut::new();
            for m in &msgs {
                encode_message(m, &mut wire);
            }
            let pipe = Pipe {
                input: io::Cursor::new(wire.to_vec()),
                output: Vec::new(),
            };
            let mut client = WebSocket::from_raw_socket(pipe, Role::Client, None);
            let mut got = Vec::new();
            for _ in 0..msgs.len() {
                got.push(client.read().unwrap());
            }
            assert_eq!(
                got,
                vec![
                    tung::Message::text("héllo"),
                    tung::Message::binary(vec![7u8; 70_000]),
                    tung::Message::text(""),
                    tung::Message::Ping(Bytes::from_static(b"p")),
                    tung::Message::Pong(Bytes::from_static(b"q")),
                    tung::Message::Close(Some(tung::protocol::CloseFrame {
                        code: 1001.into(),
                        reason: "going away".into(),
                    })),
                ]
            );
            // tungstenite answered the ping and echoed the close: both decode with our decoder.
            let _ = client.flush();
            let mut buf = BytesMut::from(&client.get_ref().output[..]);
            let replies = decode_all(&mut FrameDecoder::new(LIMIT), &mut buf).unwrap();
            assert_eq!(
                replies,
                vec![Message::Pong(Bytes::from_static(b"p")), close(1001, "going away"),]
            );
        }
    }
}
