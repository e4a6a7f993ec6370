//! `wsgate demo`: a gateway in front of a built-in demo backend, to try wsgate with one command.
//!
//! The demo backend is an ordinary WebSocket-over-HTTP backend, written the way a user of
//! Pushpin would write one:
//!
//! - `GET /` (plain HTTP, passed through by the gateway) serves a small web page;
//! - `/echo` echoes every message;
//! - `/chat?name=NAME` is a GRIP chat room: OPEN enables GRIP, binds `Set-Meta-User` and
//!   subscribes the connection to channel `room`; every message a client sends is published
//!   to `room` through the gateway's publish API (`POST /publish/` on the admin listener), so
//!   every member (on every replica) receives it.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::protocol::control::{ControlMessage, encode_control};
use crate::protocol::events::{self, Event};

const PAGE: &str = include_str!("index.html");
const EVENTS: &str = "application/websocket-events";
const ROOM: &str = "room";

/// The demo backend's state.
#[derive(Clone)]
struct Demo {
    publish_url: String,
    http: Client<HttpConnector, Full<Bytes>>,
}

/// Serves the demo backend on `listener` until `stop` fires. Chat messages are published to
/// `publish_url` (the gateway's `/publish/`).
pub async fn serve_backend(listener: TcpListener, publish_url: String, stop: CancellationToken) {
    let demo = Arc::new(Demo {
        publish_url,
        http: Client::builder(TokioExecutor::new()).build(HttpConnector::new()),
    });
    loop {
        let (stream, _) = tokio::select! {
            r = listener.accept() => match r {
                Ok(x) => x,
                Err(_) => continue,
            },
            () = stop.cancelled() => return,
        };
        let demo = demo.clone();
        tokio::spawn(async move {
            let svc = service_fn(move |req| {
                let demo = demo.clone();
                async move { Ok::<_, Infallible>(demo.handle(req).await) }
            });
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(stream), svc)
                .await;
        });
    }
}

fn respond(status: StatusCode, content_type: &str, body: impl Into<Bytes>) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(body.into()));
    *r.status_mut() = status;
    if let Ok(v) = http::HeaderValue::from_str(content_type) {
        r.headers_mut().insert(http::header::CONTENT_TYPE, v);
    }
    r
}

fn query_param(uri: &http::Uri, name: &str) -> Option<String> {
    uri.query()?.split('&').find_map(|kv| {
        let (k, v) = kv.split_once('=')?;
        (k == name).then(|| v.replace('+', " "))
    })
}

/// A display name: letters, digits, `-` and `_`, at most 24 characters.
fn clean_name(raw: Option<String>) -> String {
    let name: String = raw
        .unwrap_or_default()
        .chars()
        .filter(|c| c.is_ascii_alphanumeric() || *c == '-' || *c == '_')
        .take(24)
        .collect();
    if name.is_empty() { "guest".into() } else { name }
}

impl Demo {
    async fn handle(&self, req: Request<Incoming>) -> Response<Full<Bytes>> {
        let is_events = req
            .headers()
            .get(http::header::CONTENT_TYPE)
            .is_some_and(|v| v.as_bytes().starts_with(EVENTS.as_bytes()));
        if req.method() == Method::GET && req.uri().path() == "/" {
            return respond(StatusCode::OK, "text/html; charset=utf-8", PAGE);
        }
        if req.method() != Method::POST || !is_events {
            return respond(StatusCode::NOT_FOUND, "text/plain", "not found\n");
        }
        let path = req.uri().path().to_owned();
        let name = req
            .headers()
            .get("meta-user")
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned)
            .unwrap_or_else(|| clean_name(query_param(req.uri(), "name")));
        let body = match Limited::new(req.into_body(), 1 << 20).collect().await {
            Ok(b) => b.to_bytes(),
            Err(_) => return respond(StatusCode::PAYLOAD_TOO_LARGE, "text/plain", "too large\n"),
        };
        let Ok(evs) = events::decode_body(body, 1 << 20) else {
            return respond(StatusCode::BAD_REQUEST, "text/plain", "bad events\n");
        };
        match path.as_str() {
            "/echo" => self.echo(evs),
            "/chat" => self.chat(evs, &name).await,
            _ => respond(StatusCode::NOT_FOUND, "text/plain", "no such endpoint\n"),
        }
    }

    fn echo(&self, evs: Vec<Event>) -> Response<Full<Bytes>> {
        let out: Vec<Event> = evs
            .into_iter()
            .filter(|e| matches!(e, Event::Open | Event::Text(_) | Event::Binary(_) | Event::Close(_)))
            .collect();
        respond(StatusCode::OK, EVENTS, events::encode(&out))
    }

    async fn chat(&self, evs: Vec<Event>, name: &str) -> Response<Full<Bytes>> {
        let mut out = Vec::new();
        let mut extra = Vec::new();
        for ev in evs {
            match ev {
                Event::Open => {
                    out.push(Event::Open);
                    out.push(Event::Text(encode_control(&ControlMessage::Subscribe {
                        channel: ROOM.into(),
                        filters: Vec::new(),
                    })));
                    let hello = serde_json::json!({"from": "wsgate", "text": format!("{name} joined")});
                    extra.push(hello.to_string());
                }
                Event::Text(t) => {
                    let text = String::from_utf8_lossy(&t).chars().take(500).collect::<String>();
                    extra.push(serde_json::json!({"from": name, "text": text}).to_string());
                }
                Event::Close(f) => out.push(Event::Close(f)),
                _ => {}
            }
        }
        for msg in extra {
            // Every chat line goes to the whole room through the publish API.
            self.publish(&msg).await;
        }
        let mut r = respond(StatusCode::OK, EVENTS, events::encode(&out));
        r.headers_mut()
            .insert("sec-websocket-extensions", http::HeaderValue::from_static("grip"));
        if let Ok(v) = http::HeaderValue::from_str(name) {
            r.headers_mut().insert("set-meta-user", v);
        }
        r
    }

    async fn publish(&self, text: &str) {
        let body = serde_json::json!({
            "items": [{"channel": ROOM, "formats": {"ws-message": {"content": text}}}]
        });
        let req = Request::builder()
            .method(Method::POST)
            .uri(&self.publish_url)
            .header(http::header::CONTENT_TYPE, "application/json")
            .body(Full::new(Bytes::from(body.to_string())));
        let Ok(req) = req else { return };
        match self.http.request(req).await {
            Ok(r) if r.status().is_success() => {}
            Ok(r) => tracing::warn!(status = %r.status(), "demo publish refused"),
            Err(e) => tracing::warn!(cause = %e, "demo publish failed"),
        }
    }
}

/// Address helper for the README's one command.
pub fn default_listen() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 8080))
}
