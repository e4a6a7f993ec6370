//! Fuzzes GRIP control-message handling: `parse_control`, `classify_text`/`classify_binary` and
//! `parse_grip_extension` must never panic; whatever parses must respect the documented
//! invariants and survive `encode_control` and a second parse unchanged.
#![no_main]

use bytes::Bytes;
use libfuzzer_sys::fuzz_target;
use wsgate::protocol::control::{
    self, Classified, ControlMessage, MAX_CONTROL_FRAME_PAYLOAD, MessageType, TimedMessage,
};

fn check_timed(timed: &TimedMessage) {
    assert_ne!(timed.timeout_secs, 0);
    match timed.kind {
        MessageType::Text => assert!(std::str::from_utf8(&timed.content).is_ok()),
        MessageType::Ping | MessageType::Pong => {
            assert!(timed.content.len() <= MAX_CONTROL_FRAME_PAYLOAD)
        }
        MessageType::Binary => {}
    }
}

fn check(msg: &ControlMessage) {
    match msg {
        ControlMessage::Subscribe { channel, .. } | ControlMessage::Unsubscribe { channel } => {
            assert!(!channel.is_empty())
        }
        ControlMessage::SetMeta { name, .. } => assert!(!name.is_empty()),
        ControlMessage::Session { id } => assert_ne!(id.as_deref(), Some("")),
        ControlMessage::KeepAlive(Some(timed)) | ControlMessage::SendDelayed(timed) => check_timed(timed),
        ControlMessage::KeepAlive(None) | ControlMessage::Detach | ControlMessage::FlushDelayed => {}
    }
}

fuzz_target!(|data: &[u8]| {
    if let Ok(msg) = control::parse_control(data) {
        check(&msg);
        let wire = control::encode_control(&msg);
        assert_eq!(control::classify_text(&wire, "m:"), Classified::Control(Ok(msg)));
    }

    // First byte picks a prefix length; the prefix is taken from the payload itself.
    let payload = Bytes::copy_from_slice(data);
    let prefix_len = data.first().map_or(0, |b| usize::from(b % 4));
    let prefix =
        std::str::from_utf8(data.get(1..1 + prefix_len).unwrap_or_default()).unwrap_or(control::DEFAULT_MESSAGE_PREFIX);
    for classified in [
        control::classify_text(&payload, prefix),
        control::classify_binary(&payload, prefix),
    ] {
        if let Classified::Message(content) = classified {
            assert_eq!(&payload[prefix.len()..], &content[..]);
        }
    }

    let _ = control::parse_grip_extension(&String::from_utf8_lossy(data));
});
