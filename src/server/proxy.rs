//! Plain HTTP pass-through: non-upgrade requests are reverse-proxied to the route's backend
//! with bodies streamed in both directions. `http://` backends are served in the client
//! connection's own task by [`super::proxy_h1`]; `https://` backends (and requests that need
//! the general client) go through the pooled hyper client.

use std::net::SocketAddr;

use http::{Request, Response, StatusCode};
use http_body_util::BodyExt;
use hyper::body::Incoming;

use super::{Gateway, ResponseBody, text_response};
use crate::config::Route;
use crate::transport::backend::{ClientInfo, RequestTemplate, error_chain, is_hop_by_hop};

pub(super) async fn handle(
    gw: &Gateway,
    req: Request<Incoming>,
    peer: SocketAddr,
    route: &std::sync::Arc<Route>,
    prefix: &str,
    tls: bool,
) -> Response<ResponseBody> {
    let path_and_query = req.uri().path_and_query().map_or("/", |p| p.as_str());
    let template = match RequestTemplate::new(
        route.clone(),
        prefix,
        path_and_query,
        req.headers(),
        &ClientInfo { peer, tls },
        None,
        false,
    ) {
        Ok(t) => t,
        Err(e) => return text_response(StatusCode::BAD_REQUEST, format!("{e}\n")),
    };
    let span = crate::telemetry::proxy_span(&route.name, req.method(), req.uri(), req.headers());
    if super::proxy_h1::can_forward(&req, &template) {
        return super::proxy_h1::forward(gw, req, template, &span).await;
    }
    let (parts, body) = req.into_parts();
    let mut out = Request::new(
        body.map_err(|e| Box::new(e) as Box<dyn std::error::Error + Send + Sync>)
            .boxed_unsync(),
    );
    *out.method_mut() = parts.method;
    *out.headers_mut() = template.headers();
    crate::telemetry::inject(&span, out.headers_mut());
    *out.uri_mut() = template.uri;
    *out.version_mut() = http::Version::HTTP_11;
    let client = gw.pool.client_for(route);
    let resp = match tokio::time::timeout(route.timeouts.request, client.request(out)).await {
        Ok(Ok(r)) => r,
        Ok(Err(e)) => {
            tracing::debug!(cause = %error_chain(&e), "pass-through request failed");
            crate::telemetry::record_proxy_status(&span, StatusCode::BAD_GATEWAY, Some("failed"));
            return text_response(StatusCode::BAD_GATEWAY, "backend unavailable\n");
        }
        Err(_) => {
            crate::telemetry::record_proxy_status(&span, StatusCode::GATEWAY_TIMEOUT, Some("timeout"));
            return text_response(StatusCode::GATEWAY_TIMEOUT, "backend timed out\n");
        }
    };
    let (mut parts, body) = resp.into_parts();
    crate::telemetry::record_proxy_status(&span, parts.status, None);
    strip_hop_by_hop(&mut parts.headers);
    Response::from_parts(
        parts,
        body.map_err(|e| Box::new(e) as Box<dyn std::error::Error + Send + Sync>)
            .boxed_unsync(),
    )
}

/// Removes hop-by-hop headers from a backend response: the fixed set and any header named in
/// its `Connection` header (RFC 9110 7.6.1).
pub(super) fn strip_hop_by_hop(headers: &mut http::HeaderMap) {
    let listed: Vec<http::HeaderName> = headers
        .get_all(http::header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|t| http::HeaderName::from_bytes(t.trim().as_bytes()).ok())
        .collect();
    if listed.is_empty() && !headers.keys().any(is_hop_by_hop) {
        return;
    }
    let names: Vec<http::HeaderName> = headers
        .keys()
        .filter(|n| is_hop_by_hop(n) || listed.contains(n))
        .cloned()
        .collect();
    for n in names {
        headers.remove(n);
    }
}
