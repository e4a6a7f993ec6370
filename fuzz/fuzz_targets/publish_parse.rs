//! Fuzzes publish bodies: `parse_publish` must never panic; every parsed `ws-message` must be
//! sendable (UTF-8 text, short ping/pong, valid close code and reason) and survive
//! `build_publish_body` and a second parse unchanged.
#![no_main]

use libfuzzer_sys::fuzz_target;
use wsgate::protocol::control::{MAX_CONTROL_FRAME_PAYLOAD, MessageType};
use wsgate::protocol::publish::{self, MAX_CLOSE_REASON_BYTES, WsMessageAction};

fn check(action: &WsMessageAction) {
    match action {
        WsMessageAction::Send { kind, content } => match kind {
            MessageType::Text => assert!(std::str::from_utf8(content).is_ok()),
            MessageType::Ping | MessageType::Pong => {
                assert!(content.len() <= MAX_CONTROL_FRAME_PAYLOAD)
            }
            MessageType::Binary => {}
        },
        WsMessageAction::Close { code, reason } => {
            assert!(code.is_none_or(publish::is_sendable_close_code));
            assert!(reason.len() <= MAX_CLOSE_REASON_BYTES);
        }
        WsMessageAction::Refresh => {}
    }
}

fuzz_target!(|data: &[u8]| {
    let Ok(request) = publish::parse_publish(data) else {
        return;
    };
    for item in &request.items {
        let Some(action) = &item.ws else {
            continue;
        };
        check(action);
        let body = publish::build_publish_body(&item.channel, action);
        let again = publish::parse_publish(&body).expect("own output parses");
        assert_eq!(again.items.len(), 1);
        assert_eq!(again.items[0].channel, item.channel);
        assert_eq!(again.items[0].ws.as_ref(), Some(action));
    }
});
