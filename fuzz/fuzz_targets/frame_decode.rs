//! Fuzzes the RFC 6455 frame decoder fed in chunks: it must never panic, must only return
//! messages that respect the protocol (UTF-8 text, short control frames, the size limit, valid
//! close codes), and whatever it returns must survive a masked re-encode and decode unchanged.
#![no_main]

use bytes::BytesMut;
use libfuzzer_sys::fuzz_target;
use wsgate::protocol::frame::{self, FrameDecoder, Message};

fuzz_target!(|data: &[u8]| {
    // First byte: chunk size; next two: message size limit.
    let [chunk, hi, lo, input @ ..] = data else {
        return;
    };
    let chunk = usize::from(*chunk).max(1);
    let limit = usize::from(u16::from_be_bytes([*hi, *lo]));

    let mut decoder = FrameDecoder::new(limit);
    let mut buf = BytesMut::new();
    let mut messages = Vec::new();
    'feed: for piece in input.chunks(chunk) {
        buf.extend_from_slice(piece);
        loop {
            match decoder.decode(&mut buf) {
                Ok(Some(message)) => {
                    match &message {
                        Message::Text(t) => {
                            assert!(std::str::from_utf8(t).is_ok());
                            assert!(t.len() <= limit);
                        }
                        Message::Binary(b) => assert!(b.len() <= limit),
                        Message::Ping(p) | Message::Pong(p) => assert!(p.len() <= 125),
                        Message::Close(Some(c)) => {
                            assert!(frame::is_valid_close_code(c.code));
                            assert!(c.reason.len() <= 123);
                        }
                        Message::Close(None) => {}
                    }
                    messages.push(message);
                }
                Ok(None) => break,
                Err(err) => {
                    assert!(matches!(err.close_code(), 1002 | 1007 | 1009));
                    break 'feed;
                }
            }
        }
    }

    let mut wire = BytesMut::new();
    for message in &messages {
        frame::encode_masked(message, [0xa5, 0x01, 0xff, 0x3c], &mut wire);
    }
    let mut decoder = FrameDecoder::new(limit);
    let mut again = Vec::new();
    while let Ok(Some(message)) = decoder.decode(&mut wire) {
        again.push(message);
    }
    assert_eq!(again, messages);
    assert!(wire.is_empty());
});
