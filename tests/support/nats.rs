//! A real `nats-server` on 127.0.0.1 for tests (Debian package `nats-server`), gateways wired to
//! it (one [`Replica`] = one in-process gateway with its own registry, hub and NATS bridge), and
//! a GRIP backend whose connections subscribe to the channel named in their path.

use std::net::SocketAddr;
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use arc_swap::ArcSwap;
use base64::Engine as _;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::net::TcpStream;
use tokio::process::{Child, Command};

use wsgate::config::{Route, RouteTable};
use wsgate::grip::Hub;
use wsgate::grip::nats::{NatsBridge, NatsConfig, NatsState};
use wsgate::protocol::events::Event;
use wsgate::server::{Gateway, GatewaySettings};

use super::{Backend, Client, DEADLINE, Reply, TestGateway, eventually};

/// A `nats-server` child process on a fixed 127.0.0.1 port; killed on drop.
pub struct NatsServer {
    port: u16,
    child: Option<Child>,
    log: Arc<Mutex<String>>,
}

impl Drop for NatsServer {
    fn drop(&mut self) {
        if let Some(child) = &mut self.child {
            let _ = child.start_kill();
        }
    }
}

fn free_port() -> u16 {
    let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind a free port");
    l.local_addr().expect("addr").port()
}

impl NatsServer {
    /// Starts a server on a free port and waits until it accepts connections.
    pub async fn start() -> Self {
        let mut last = String::new();
        // A port picked free can be taken before the server binds it: try a few.
        for _ in 0..5 {
            let mut s = Self {
                port: free_port(),
                child: None,
                log: Arc::new(Mutex::new(String::new())),
            };
            match s.launch().await {
                Ok(()) => return s,
                Err(e) => last = e,
            }
        }
        panic!("nats-server did not start: {last}");
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    pub fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }

    /// The server's log so far (for failure messages).
    pub fn log(&self) -> String {
        self.log.lock().expect("lock").clone()
    }

    /// Kills the server (SIGKILL) and waits for it to exit.
    pub async fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            child.kill().await.expect("kill nats-server");
        }
    }

    /// Starts the server again on the same port, retrying until the deadline (the old socket
    /// may linger briefly).
    pub async fn restart(&mut self) {
        self.kill().await;
        let deadline = tokio::time::Instant::now() + DEADLINE;
        loop {
            match self.launch().await {
                Ok(()) => return,
                Err(e) => assert!(
                    tokio::time::Instant::now() < deadline,
                    "nats-server did not restart on port {}: {e}",
                    self.port
                ),
            }
        }
    }

    /// Spawns the process and waits for "Server is ready" on its log, then for a TCP accept.
    async fn launch(&mut self) -> Result<(), String> {
        let mut child = Command::new("nats-server")
            .args(["-a", "127.0.0.1", "-p", &self.port.to_string()])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .map_err(|e| format!("cannot run nats-server (apt-get install nats-server): {e}"))?;
        let stderr = child.stderr.take().ok_or("no stderr pipe")?;
        let mut lines = BufReader::new(stderr).lines();
        let log = self.log.clone();
        let ready = tokio::time::timeout(DEADLINE, async {
            while let Ok(Some(line)) = lines.next_line().await {
                let is_ready = line.contains("Server is ready");
                log.lock().expect("lock").push_str(&(line + "\n"));
                if is_ready {
                    return true;
                }
            }
            false
        })
        .await;
        if ready != Ok(true) {
            let _ = child.kill().await;
            return Err(format!(
                "no 'Server is ready' within the deadline; log:\n{}",
                self.log()
            ));
        }
        // Keep draining the log so the server never blocks on a full pipe.
        let log = self.log.clone();
        tokio::spawn(async move {
            while let Ok(Some(line)) = lines.next_line().await {
                log.lock().expect("lock").push_str(&(line + "\n"));
            }
        });
        let addr = SocketAddr::from(([127, 0, 0, 1], self.port));
        TcpStream::connect(addr)
            .await
            .map_err(|e| format!("server ready but {addr} refuses connections: {e}"))?;
        self.child = Some(child);
        Ok(())
    }
}

/// Bridge settings for tests: fast reconnects.
pub fn test_config(url: &str) -> NatsConfig {
    let mut c = NatsConfig::new(url);
    c.reconnect_max_delay = Duration::from_millis(100);
    c.connection_timeout = Duration::from_secs(1);
    c.request_timeout = Duration::from_millis(500);
    c
}

/// One gateway replica: an in-process gateway whose hub and `on_channel` use a NATS bridge.
pub struct Replica {
    pub tg: TestGateway,
    pub bridge: NatsBridge,
    pub hub: Hub,
}

impl Replica {
    /// A replica with one catch-all route to `backend_url`, connected to NATS at `nats_url`.
    pub async fn start(backend_url: &str, nats_url: &str) -> Self {
        let route = Route::catch_all(backend_url).expect("catch-all route");
        let table = Arc::new(ArcSwap::from_pointee(RouteTable::new(vec![route], 1).expect("table")));
        let mut gw = Gateway::new(table, GatewaySettings::default());
        let bridge = NatsBridge::connect(test_config(nats_url), gw.registry.clone())
            .await
            .expect("nats bridge");
        gw.on_channel = Some(bridge.channel_hook());
        let hub = Hub::with_nats(gw.registry.clone(), bridge.clone());
        let tg = TestGateway::with_gateway(gw, hub.clone()).await;
        let r = Self { tg, bridge, hub };
        r.wait_state(NatsState::Connected).await;
        r
    }

    pub async fn wait_state(&self, want: NatsState) {
        let b = self.bridge.clone();
        eventually(&format!("bridge state {want:?}"), move || {
            let b = b.clone();
            async move { b.state() == want }
        })
        .await;
    }

    /// Waits until `channel` has a local subscriber here and this replica's NATS subscription
    /// for it is registered at the server.
    pub async fn wait_subscribed(&self, channel: &str) {
        let (reg, b, ch) = (self.tg.gw.registry.clone(), self.bridge.clone(), channel.to_owned());
        eventually(&format!("subscription to {channel:?}"), move || {
            let (reg, b, ch) = (reg.clone(), b.clone(), ch.clone());
            async move { reg.channels().contains(&ch) && b.subscribed_channels().contains(&ch) }
        })
        .await;
        self.bridge.sync().await.expect("bridge sync");
    }

    /// Waits until this replica holds no NATS subscription for `channel`.
    pub async fn wait_unsubscribed(&self, channel: &str) {
        let (b, ch) = (self.bridge.clone(), channel.to_owned());
        eventually(&format!("no subscription to {channel:?}"), move || {
            let (b, ch) = (b.clone(), ch.clone());
            async move { !b.subscribed_channels().contains(&ch) }
        })
        .await;
    }

    /// Connects a client that subscribes to `channel` (through [`grip_backend`]); `tag` makes
    /// the path unique so the backend's record can be found.
    pub async fn subscriber(&self, channel: &str, tag: &str) -> Client {
        self.tg.connect(&sub_path(channel, tag)).await
    }
}

/// The path a [`grip_backend`] reads the channel from.
pub fn sub_path(channel: &str, tag: &str) -> String {
    format!(
        "/sub/{}/{tag}",
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(channel.as_bytes())
    )
}

/// A GRIP backend: OPEN on `/sub/<base64url channel>/...` is answered with OPEN and a
/// `subscribe` control message for that channel; other requests get an empty events body.
pub async fn grip_backend() -> Backend {
    Backend::start(|r| {
        if !r.events().contains(&Event::Open) {
            return Reply::events(&[]);
        }
        let channel = r
            .uri
            .path()
            .strip_prefix("/sub/")
            .and_then(|rest| rest.split('/').next())
            .and_then(|b| base64::engine::general_purpose::URL_SAFE_NO_PAD.decode(b).ok())
            .and_then(|b| String::from_utf8(b).ok());
        super::grip_open_reply(channel.as_deref())
    })
    .await
}

/// The Connection-Id the backend saw for the client connected on `path`.
pub fn connection_id_for(backend: &Backend, path: &str) -> String {
    backend
        .requests()
        .iter()
        .find(|r| r.uri.path() == path && r.events().contains(&Event::Open))
        .map(|r| r.connection_id())
        .expect("backend saw the OPEN for this path")
}
