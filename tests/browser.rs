//! The demo in a real browser: headless Chromium (Debian's `chromium`) opens the demo page in
//! two tabs, both join the chat, and a message typed in one appears in the other.
//!
//! Needs `WSGATE_CHROMIUM` (the browser) and `WSGATE_NODE_MODULES` with `playwright-core`,
//! which `scripts/test` installs. Outside CI the test skips with a reason when they are
//! missing; under `CI=true` it fails.

mod support;

use std::process::{Command, Stdio};

use support::*;

const BIN: &str = env!("CARGO_BIN_EXE_wsgate");

fn tool(var: &str) -> Option<String> {
    match std::env::var(var) {
        Ok(v) if !v.is_empty() => Some(v),
        _ => {
            assert!(
                std::env::var("CI").as_deref() != Ok("true"),
                "{var} is not set under CI=true; scripts/test installs it"
            );
            eprintln!("skipping: {var} is not set (run through scripts/test)");
            None
        }
    }
}

#[tokio::test]
async fn two_tabs_chat_through_the_demo() {
    let (Some(chromium), Some(modules)) = (tool("WSGATE_CHROMIUM"), tool("WSGATE_NODE_MODULES")) else {
        return;
    };
    let node = std::env::var("WSGATE_NODE").unwrap_or_else(|_| "node".into());
    let (addr, admin) = (free_addr(), free_addr());
    let mut demo = Command::new(BIN)
        .args([
            "demo",
            "--listen",
            &addr.to_string(),
            "--admin-listen",
            &admin.to_string(),
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn demo");
    eventually("demo listening", || async {
        tokio::net::TcpStream::connect(addr).await.is_ok()
    })
    .await;
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/browser/chat.cjs");
    let out = tokio::task::spawn_blocking(move || {
        Command::new(node)
            .arg(script)
            .arg(format!("http://{addr}/"))
            .arg(chromium)
            .env("NODE_PATH", &modules)
            .output()
            .expect("run node")
    })
    .await
    .expect("join");
    let _ = demo.kill();
    let _ = demo.wait();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && stdout.starts_with("OK "),
        "browser run failed:\nstdout: {stdout}\nstderr: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains("alice: hello from alice"));
}
