//! The client side of `wsgate publish`: builds one publish item from the command line and
//! posts it to a gateway's publish API (PROTOCOL.md section 6), as the GRIP libraries do
//! (`POST <url>/publish/`, `Content-Type: application/json`, `Authorization: Bearer <token>`).

use std::time::Duration;

use bytes::Bytes;
use http::header::{self, HeaderValue};
use http::{Method, Request, Uri};
use http_body_util::{BodyExt, Limited};

use crate::protocol::control::MessageType;
use crate::protocol::publish::{MAX_CLOSE_REASON_BYTES, WsMessageAction, build_publish_body, is_sendable_close_code};
use crate::transport::backend::{BackendPool, full_body};

/// Default publish API address (the admin listener's default).
pub const DEFAULT_URL: &str = "http://127.0.0.1:9090";

/// Time allowed to connect to the publish API.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// Time allowed for the whole request, response body included.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);

/// Longest response body read back.
const MAX_RESPONSE_BYTES: usize = 64 * 1024;

/// Builds the action `wsgate publish` sends: a close when `close` is given (with `reason`),
/// otherwise `message` as a text message, or as a binary one (its UTF-8 bytes) with `binary`.
///
/// # Errors
///
/// A message for the CLI when there is neither a message nor `--close`, when both are given,
/// when `--reason` or `--binary` comes without what it applies to, when the close code may not
/// be sent, or when the reason is over 123 bytes.
pub fn action_from_cli(
    message: Option<&str>,
    binary: bool,
    close: Option<u16>,
    reason: Option<&str>,
) -> Result<WsMessageAction, String> {
    match (message, close) {
        (Some(_), Some(_)) => Err("give either a MESSAGE or --close, not both".into()),
        (None, None) => Err("a MESSAGE (or --close CODE) is required".into()),
        (None, Some(code)) => {
            if binary {
                return Err("--binary applies to a MESSAGE, not to --close".into());
            }
            if !is_sendable_close_code(code) {
                return Err(format!(
                    "close code {code} may not be sent (use 1000-1003, 1007-1014 or 3000-4999)"
                ));
            }
            let reason = reason.unwrap_or_default();
            if reason.len() > MAX_CLOSE_REASON_BYTES {
                return Err(format!("the close reason is over {MAX_CLOSE_REASON_BYTES} bytes"));
            }
            Ok(WsMessageAction::Close {
                code: Some(code),
                reason: reason.to_owned(),
            })
        }
        (Some(message), None) => {
            if reason.is_some() {
                return Err("--reason applies to --close only".into());
            }
            let kind = if binary { MessageType::Binary } else { MessageType::Text };
            Ok(WsMessageAction::Send {
                kind,
                content: Bytes::copy_from_slice(message.as_bytes()),
            })
        }
    }
}

/// The publish endpoint for a base URL: `http://h:p` and `http://h:p/` become
/// `http://h:p/publish/`; a URL already ending in `/publish` or `/publish/` is kept.
fn publish_uri(url: &str) -> Result<Uri, String> {
    let trimmed = url.trim_end_matches('/');
    let full = if trimmed.ends_with("/publish") {
        format!("{trimmed}/")
    } else {
        format!("{trimmed}/publish/")
    };
    let uri: Uri = full.parse().map_err(|e| format!("invalid URL {url:?}: {e}"))?;
    match uri.scheme_str() {
        Some("http" | "https") if uri.host().is_some() => Ok(uri),
        _ => Err(format!(
            "invalid URL {url:?}: expected http://host:port or https://host:port"
        )),
    }
}

/// Publishes `action` to `channel` through the publish API at `url` (e.g.
/// `http://127.0.0.1:9090`), with `token` as a bearer credential when given. Returns the
/// response body (`Published\n`).
///
/// # Errors
///
/// A message for a bad URL or token, a connection failure, a timeout, or a non-2xx answer
/// (with its status and body).
pub async fn publish(
    url: &str,
    token: Option<&str>,
    channel: &str,
    action: &WsMessageAction,
) -> Result<String, String> {
    let uri = publish_uri(url)?;
    let mut req = Request::builder()
        .method(Method::POST)
        .uri(uri.clone())
        .header(header::CONTENT_TYPE, "application/json");
    if let Some(token) = token {
        let value = HeaderValue::from_str(&format!("Bearer {token}"))
            .map_err(|_| "the token contains characters not allowed in a header".to_owned())?;
        req = req.header(header::AUTHORIZATION, value);
    }
    let req = req
        .body(full_body(Bytes::from(build_publish_body(channel, action))))
        .map_err(|e| format!("could not build the request: {e}"))?;
    let client = BackendPool::new(
        Duration::from_secs(1),
        0,
        crate::transport::h1::HeadLimits::default(),
        0,
    )
    .client(CONNECT_TIMEOUT, None);
    let exchange = async {
        let resp = client
            .request(req)
            .await
            .map_err(|e| format!("could not reach {uri}: {e}"))?;
        let status = resp.status();
        let body = Limited::new(resp.into_body(), MAX_RESPONSE_BYTES)
            .collect()
            .await
            .map_err(|e| format!("could not read the response from {uri}: {e}"))?
            .to_bytes();
        let body = String::from_utf8_lossy(&body).into_owned();
        if status.is_success() {
            Ok(body)
        } else {
            Err(format!("{uri} answered {status}: {}", body.trim_end()))
        }
    };
    tokio::time::timeout(REQUEST_TIMEOUT, exchange)
        .await
        .map_err(|_| format!("no answer from {uri} within {}s", REQUEST_TIMEOUT.as_secs()))?
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cli_actions() {
        assert_eq!(
            action_from_cli(Some("hi"), false, None, None),
            Ok(WsMessageAction::Send {
                kind: MessageType::Text,
                content: Bytes::from_static(b"hi")
            })
        );
        assert_eq!(
            action_from_cli(Some("é"), true, None, None),
            Ok(WsMessageAction::Send {
                kind: MessageType::Binary,
                content: Bytes::from_static("é".as_bytes())
            })
        );
        assert_eq!(
            action_from_cli(None, false, Some(4000), Some("bye")),
            Ok(WsMessageAction::Close {
                code: Some(4000),
                reason: "bye".into()
            })
        );
        assert_eq!(
            action_from_cli(None, false, Some(1000), None),
            Ok(WsMessageAction::Close {
                code: Some(1000),
                reason: String::new()
            })
        );
        assert!(action_from_cli(None, false, None, None).is_err());
        assert!(action_from_cli(Some("x"), false, Some(1000), None).is_err());
        assert!(action_from_cli(Some("x"), false, None, Some("r")).is_err());
        assert!(action_from_cli(None, true, Some(1000), None).is_err());
        assert!(action_from_cli(None, false, Some(1006), None).is_err());
        assert!(action_from_cli(None, false, Some(1000), Some(&"x".repeat(124))).is_err());
    }

    #[test]
    fn uris() {
        let u = |s: &str| publish_uri(s).map(|u| u.to_string());
        assert_eq!(u("http://127.0.0.1:9090"), Ok("http://127.0.0.1:9090/publish/".into()));
        assert_eq!(u("http://127.0.0.1:9090/"), Ok("http://127.0.0.1:9090/publish/".into()));
        assert_eq!(u("http://h:1/publish"), Ok("http://h:1/publish/".into()));
        assert_eq!(u("http://h:1/publish/"), Ok("http://h:1/publish/".into()));
        assert_eq!(u("https://h/base"), Ok("https://h/base/publish/".into()));
        assert!(u("127.0.0.1:9090").is_err());
        assert!(u("ftp://h/").is_err());
        assert!(u("not a url").is_err());
    }
}
