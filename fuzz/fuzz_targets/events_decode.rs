//! Fuzzes the websocket-events codec: the incremental `Decoder` fed in chunks and
//! `decode_body`, which must never panic and must agree with each other; whatever decodes
//! must re-encode and decode to the same events.
#![no_main]

use bytes::{Bytes, BytesMut};
use libfuzzer_sys::fuzz_target;
use wsgate::protocol::events::{self, Decoder, Event};

fuzz_target!(|data: &[u8]| {
    // First byte: chunk size for the incremental decoder; second: content limit.
    let [chunk, limit, input @ ..] = data else {
        return;
    };
    let chunk = usize::from(*chunk).max(1);
    let limit = usize::from(*limit) * 16;

    let mut decoder = Decoder::new(limit);
    let mut buf = BytesMut::new();
    let mut streamed = Vec::new();
    let mut stream_ok = true;
    'feed: for piece in input.chunks(chunk) {
        buf.extend_from_slice(piece);
        loop {
            match decoder.decode(&mut buf) {
                Ok(Some(event)) => {
                    assert!(event.content_len() <= limit);
                    streamed.push(event);
                }
                Ok(None) => break,
                Err(_) => {
                    stream_ok = false;
                    break 'feed;
                }
            }
        }
    }
    let stream_ok = stream_ok && decoder.finish(&buf).is_ok();

    let body = events::decode_body(Bytes::copy_from_slice(input), limit);
    if stream_ok {
        // A body stops after the first CLOSE or DISCONNECT; the stream goes on.
        let end = streamed
            .iter()
            .position(|e| matches!(e, Event::Close(_) | Event::Disconnect))
            .map_or(streamed.len(), |i| i + 1);
        assert_eq!(body.as_deref(), Ok(&streamed[..end]));
    }

    // Round trip of whatever decoded.
    let encoded = events::encode(&streamed);
    assert_eq!(encoded.len(), streamed.iter().map(Event::encoded_len).sum::<usize>());
    let mut decoder = Decoder::new(usize::MAX);
    let mut buf = BytesMut::from(&encoded[..]);
    let mut again = Vec::new();
    while let Ok(Some(event)) = decoder.decode(&mut buf) {
        again.push(event);
    }
    assert_eq!(again, streamed);
    assert!(decoder.finish(&buf).is_ok());
});
