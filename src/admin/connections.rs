//! The connection API (PROTOCOL.md section 7, a wsgate extension): look at, send to, and close
//! one connection by its `Connection-Id`.
//!
//! | request | outcome |
//! |---|---|
//! | `GET /connections/{id}` | `200` JSON `{"id","route","age_secs","meta","subscriptions","session_meta"}`, or `404` |
//! | `POST /connections/{id}/messages` | body: one `ws-message` object; `202` queued, `400` bad body, `404` unknown, `503` the connection is closing as a slow consumer |
//! | `DELETE /connections/{id}` | optional body `{"code": 4000, "reason": "..."}` (default 1000); `200` closing, `400` bad body, `404` unknown |
//!
//! Other methods get `405` with `Allow`; authentication and body limits are the publish API's.

use http::{Method, Request, Response, StatusCode};
use hyper::body::Incoming;
use serde_json::{Map, Value, json};

use super::AdminState;
use super::publish::{authenticate, json_response, method_not_allowed, read_body};
use crate::grip::hub::{ConnectionView, Targeted};
use crate::protocol::publish::{MAX_CLOSE_REASON_BYTES, is_sendable_close_code, parse_ws_message};
use crate::server::{ResponseBody, text_response};

/// Path prefix of the connection API.
pub const PREFIX: &str = "/connections/";

/// Close code used by `DELETE` without a body (normal closure).
pub const DEFAULT_CLOSE_CODE: u16 = 1000;

/// Which resource a path names.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Target<'a> {
    /// `/connections/{id}`.
    Connection(&'a str),
    /// `/connections/{id}/messages`.
    Messages(&'a str),
}

fn parse_path(path: &str) -> Option<Target<'_>> {
    let rest = path.strip_prefix(PREFIX)?;
    let (id, tail) = match rest.split_once('/') {
        Some((id, tail)) => (id, Some(tail)),
        None => (rest, None),
    };
    if id.is_empty() {
        return None;
    }
    match tail {
        None => Some(Target::Connection(id)),
        Some("messages") => Some(Target::Messages(id)),
        Some(_) => None,
    }
}

/// Handles every request under `/connections/`.
pub async fn handle(st: &AdminState, req: Request<Incoming>) -> Response<ResponseBody> {
    let path = req.uri().path().to_owned();
    let Some(target) = parse_path(&path) else {
        return text_response(StatusCode::NOT_FOUND, "not found\n");
    };
    let method = req.method().clone();
    match (&target, &method) {
        (Target::Connection(_), &Method::GET | &Method::DELETE) | (Target::Messages(_), &Method::POST) => {}
        (Target::Connection(_), _) => return method_not_allowed("GET, DELETE"),
        (Target::Messages(_), _) => return method_not_allowed("POST"),
    }
    if let Err(refusal) = authenticate(st, req.headers()) {
        return refusal.into_response();
    }
    match target {
        Target::Connection(id) if method == Method::GET => get(st, id).await,
        Target::Connection(id) => close(st, id, req).await,
        Target::Messages(id) => send(st, id, req).await,
    }
}

async fn get(st: &AdminState, id: &str) -> Response<ResponseBody> {
    match st.hub.get(id).await {
        Some(view) => json_response(StatusCode::OK, view_json(&view).to_string()),
        None => not_found(),
    }
}

/// The JSON the connection API returns for one connection.
pub fn view_json(view: &ConnectionView) -> Value {
    let strings = |m: &std::collections::BTreeMap<String, String>| {
        Value::Object(
            m.iter()
                .map(|(k, v)| (k.clone(), Value::from(v.as_str())))
                .collect::<Map<_, _>>(),
        )
    };
    json!({
        "id": view.id,
        "route": view.route,
        "age_secs": view.age_secs,
        "meta": strings(&view.info.meta),
        "subscriptions": view.info.channels,
        "session_meta": strings(&view.info.sub_meta),
    })
}

async fn send(st: &AdminState, id: &str, req: Request<Incoming>) -> Response<ResponseBody> {
    let body = match read_body(req, st.max_publish_body).await {
        Ok(b) => b,
        Err(refusal) => return refusal.into_response(),
    };
    let value: Value = match serde_json::from_slice(&body) {
        Ok(v) => v,
        Err(e) => return bad_request(&format!("body is not valid JSON: {e}")),
    };
    let action = match parse_ws_message(&value) {
        Ok(a) => a,
        Err(e) => return bad_request(&e.to_string()),
    };
    match st.hub.send(id, &action).await {
        Targeted::Delivered => text_response(StatusCode::ACCEPTED, "Queued\n"),
        Targeted::NotFound => not_found(),
        Targeted::Overflow => slow_consumer(),
    }
}

async fn close(st: &AdminState, id: &str, req: Request<Incoming>) -> Response<ResponseBody> {
    let body = match read_body(req, st.max_publish_body).await {
        Ok(b) => b,
        Err(refusal) => return refusal.into_response(),
    };
    let (code, reason) = match parse_close_body(&body) {
        Ok(x) => x,
        Err(e) => return bad_request(e),
    };
    match st.hub.close(id, code, &reason).await {
        Targeted::Delivered => text_response(StatusCode::OK, "Closing\n"),
        Targeted::NotFound => not_found(),
        Targeted::Overflow => slow_consumer(),
    }
}

/// Reads the optional `DELETE` body: empty, or `{"code": N, "reason": "..."}` with both
/// fields optional.
fn parse_close_body(body: &[u8]) -> Result<(u16, String), &'static str> {
    if body.iter().all(u8::is_ascii_whitespace) {
        return Ok((DEFAULT_CLOSE_CODE, String::new()));
    }
    let Ok(Value::Object(obj)) = serde_json::from_slice::<Value>(body) else {
        return Err("body is not a JSON object");
    };
    let code = match obj.get("code") {
        None | Some(Value::Null) => DEFAULT_CLOSE_CODE,
        Some(v) => v
            .as_u64()
            .and_then(|c| u16::try_from(c).ok())
            .filter(|&c| is_sendable_close_code(c))
            .ok_or("'code' is not a valid close code (1000-1003, 1007-1014 or 3000-4999)")?,
    };
    let reason = match obj.get("reason") {
        None | Some(Value::Null) => String::new(),
        Some(Value::String(s)) if s.len() <= MAX_CLOSE_REASON_BYTES => s.clone(),
        Some(Value::String(_)) => return Err("'reason' is over 123 bytes"),
        Some(_) => return Err("'reason' is not a string"),
    };
    Ok((code, reason))
}

fn not_found() -> Response<ResponseBody> {
    text_response(StatusCode::NOT_FOUND, "connection not found\n")
}

fn bad_request(reason: &str) -> Response<ResponseBody> {
    text_response(StatusCode::BAD_REQUEST, format!("{reason}\n"))
}

fn slow_consumer() -> Response<ResponseBody> {
    text_response(
        StatusCode::SERVICE_UNAVAILABLE,
        "connection is closing as a slow consumer\n",
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::grip::ConnInfo;

    #[test]
    fn paths() {
        assert_eq!(parse_path("/connections/abc"), Some(Target::Connection("abc")));
        assert_eq!(parse_path("/connections/abc/messages"), Some(Target::Messages("abc")));
        assert_eq!(parse_path("/connections/"), None);
        assert_eq!(parse_path("/connections//messages"), None);
        assert_eq!(parse_path("/connections/abc/"), None);
        assert_eq!(parse_path("/connections/abc/other"), None);
        assert_eq!(parse_path("/connections/abc/messages/x"), None);
        assert_eq!(parse_path("/connection/abc"), None);
    }

    #[test]
    fn close_bodies() {
        assert_eq!(parse_close_body(b""), Ok((1000, String::new())));
        assert_eq!(parse_close_body(b" \n"), Ok((1000, String::new())));
        assert_eq!(parse_close_body(b"{}"), Ok((1000, String::new())));
        assert_eq!(
            parse_close_body(br#"{"code":4000,"reason":"bye"}"#),
            Ok((4000, "bye".to_owned()))
        );
        assert_eq!(parse_close_body(br#"{"code":null}"#), Ok((1000, String::new())));
        for bad in [
            &br#"{"code":1005}"#[..],
            br#"{"code":"4000"}"#,
            br#"{"code":70000}"#,
            br#"{"reason":5}"#,
            b"[]",
            b"{",
        ] {
            assert!(parse_close_body(bad).is_err(), "{}", String::from_utf8_lossy(bad));
        }
        let long = format!(r#"{{"reason":"{}"}}"#, "x".repeat(124));
        assert!(parse_close_body(long.as_bytes()).is_err());
        let max = format!(r#"{{"reason":"{}"}}"#, "x".repeat(123));
        assert_eq!(parse_close_body(max.as_bytes()), Ok((1000, "x".repeat(123))));
    }

    #[test]
    fn view_shape() {
        let mut info = ConnInfo::default();
        info.meta.insert("user".into(), "alice".into());
        info.sub_meta.insert("room".into(), "1".into());
        info.channels.push("room".into());
        let view = ConnectionView {
            id: "c1".into(),
            route: "r".into(),
            age_secs: 3,
            info,
        };
        assert_eq!(
            view_json(&view),
            json!({"id": "c1", "route": "r", "age_secs": 3, "meta": {"user": "alice"},
                   "subscriptions": ["room"], "session_meta": {"room": "1"}})
        );
    }
}
