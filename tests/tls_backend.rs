//! `https` backends through rustls, trusting a route's private CA (`backend.caFile`).

mod support;

use std::convert::Infallible;
use std::sync::Arc;

use http::{Request, Response};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use support::*;
use tokio::net::TcpListener;
use wsgate::protocol::events::{self, Event};

/// A CA and a server certificate for `localhost` signed by it.
fn certificates() -> (
    String,
    rustls::pki_types::CertificateDer<'static>,
    rustls::pki_types::PrivateKeyDer<'static>,
) {
    let ca_key = rcgen::KeyPair::generate().expect("ca key");
    let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new()).expect("ca params");
    ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    ca_params
        .distinguished_name
        .push(rcgen::DnType::CommonName, "wsgate test CA");
    let ca = ca_params.self_signed(&ca_key).expect("ca cert");
    let issuer = rcgen::Issuer::new(ca_params, ca_key);
    let key = rcgen::KeyPair::generate().expect("key");
    let params = rcgen::CertificateParams::new(vec!["localhost".to_owned()]).expect("params");
    let cert = params.signed_by(&key, &issuer).expect("server cert");
    (
        ca.pem(),
        cert.der().clone(),
        rustls::pki_types::PrivateKeyDer::Pkcs8(key.serialize_der().into()),
    )
}

/// An echo events backend behind TLS on 127.0.0.1:0.
async fn tls_echo_backend(
    cert: rustls::pki_types::CertificateDer<'static>,
    key: rustls::pki_types::PrivateKeyDer<'static>,
) -> u16 {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .expect("versions")
        .with_no_client_auth()
        .with_single_cert(vec![cert], key)
        .expect("server config");
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let port = listener.local_addr().expect("addr").port();
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            let acceptor = acceptor.clone();
            tokio::spawn(async move {
                let Ok(tls) = acceptor.accept(stream).await else { return };
                let svc = service_fn(|req: Request<Incoming>| async move {
                    let body = req
                        .into_body()
                        .collect()
                        .await
                        .map(|b| b.to_bytes())
                        .unwrap_or_default();
                    let evs = events::decode_body(body, 1 << 20).unwrap_or_default();
                    let out: Vec<Event> = evs
                        .into_iter()
                        .filter(|e| matches!(e, Event::Open | Event::Text(_)))
                        .collect();
                    let mut r = Response::new(Full::new(events::encode(&out)));
                    r.headers_mut().insert(
                        "content-type",
                        http::HeaderValue::from_static("application/websocket-events"),
                    );
                    Ok::<_, Infallible>(r)
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(tls), svc)
                    .await;
            });
        }
    });
    port
}

#[tokio::test]
async fn https_backend_with_private_ca() {
    let (ca_pem, cert, key) = certificates();
    let port = tls_echo_backend(cert, key).await;
    let dir = std::env::temp_dir().join(format!("wsgate-tls-{}-{port}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("dir");
    let ca_file = dir.join("ca.pem");
    std::fs::write(&ca_file, ca_pem).expect("write ca");

    let yaml = format!(
        "routes:\n  - name: tls\n    backend:\n      url: https://localhost:{port}\n      caFile: {}\n",
        ca_file.display()
    );
    let gw = TestGateway::from_yaml(&yaml).await;
    let mut c = gw.connect("/").await;
    c.send_text("over tls").await;
    c.expect_text("over tls").await;

    // Without the CA the backend's certificate is not trusted: the handshake fails with 502.
    let yaml = format!("routes:\n  - name: tls\n    backend:\n      url: https://localhost:{port}\n");
    let gw = TestGateway::from_yaml(&yaml).await;
    let (status, _, _) = http_request(gw.addr, "GET", "/", &upgrade_headers(), b"").await;
    assert_eq!(status, 502);
    let _ = std::fs::remove_dir_all(&dir);
}
