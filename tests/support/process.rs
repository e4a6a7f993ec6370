//! A real `wsgate gateway` process for the tests that need one (signals, exit codes, process
//! memory, the command line).

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::net::TcpStream;

use super::{DEADLINE, free_addr, http_request, metric_in};

const BIN: &str = env!("CARGO_BIN_EXE_wsgate");

/// A `wsgate gateway` child process on free loopback ports, its log captured; killed on drop.
pub struct GatewayProc {
    child: Child,
    /// The client listener.
    pub addr: SocketAddr,
    /// The admin listener.
    pub admin: SocketAddr,
    log: Arc<Mutex<String>>,
}

impl Drop for GatewayProc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl GatewayProc {
    /// Starts `wsgate gateway` with `extra` flags and `env` (over `WSGATE_LOG=info`; the secret
    /// variables of the caller's environment are not passed on), and waits until `/readyz` is
    /// 200. A port picked free can be taken before the process binds it: a few attempts. Its
    /// output is read as it comes (a full pipe would stall the process at debug level).
    pub async fn start(extra: &[&str], env: &[(&str, &str)]) -> Self {
        let mut last = String::new();
        for _ in 0..3 {
            let (addr, admin) = (free_addr(), free_addr());
            let mut child = Command::new(BIN)
                .args([
                    "gateway",
                    "--listen",
                    &addr.to_string(),
                    "--admin-listen",
                    &admin.to_string(),
                ])
                .args(extra)
                .env_remove("WSGATE_ADMIN_TOKEN")
                .env_remove("WSGATE_PUBLISH_JWT_KEY")
                .env("WSGATE_LOG", "info")
                .envs(env.iter().copied())
                .stdin(Stdio::null())
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .spawn()
                .expect("spawn wsgate");
            // Logs go to stdout, startup errors to stderr: keep both.
            let log = Arc::new(Mutex::new(String::new()));
            let stdout: Box<dyn std::io::Read + Send> = Box::new(child.stdout.take().expect("stdout pipe"));
            let stderr: Box<dyn std::io::Read + Send> = Box::new(child.stderr.take().expect("stderr pipe"));
            for pipe in [stdout, stderr] {
                let sink = log.clone();
                std::thread::spawn(move || {
                    for line in BufReader::new(pipe).lines().map_while(Result::ok) {
                        let mut l = sink.lock().expect("log lock");
                        l.push_str(&line);
                        l.push('\n');
                    }
                });
            }
            let mut p = Self {
                child,
                addr,
                admin,
                log,
            };
            let deadline = tokio::time::Instant::now() + DEADLINE;
            loop {
                if let Some(status) = p.child.try_wait().expect("try_wait") {
                    last = format!("wsgate exited with {status} before it was ready:\n{}", p.log());
                    break;
                }
                if TcpStream::connect(admin).await.is_ok() && p.readyz().await.0 == 200 {
                    return p;
                }
                assert!(
                    tokio::time::Instant::now() < deadline,
                    "wsgate not ready in time:\n{}",
                    p.log()
                );
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
        panic!("{last}");
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn log(&self) -> String {
        self.log.lock().expect("log lock").clone()
    }

    pub fn ws_url(&self, path: &str) -> String {
        format!("ws://{}{path}", self.addr)
    }

    pub async fn readyz(&self) -> (u16, String) {
        let (status, _, body) = http_request(self.admin, "GET", "/readyz", &[], b"").await;
        (status.as_u16(), String::from_utf8_lossy(&body).into_owned())
    }

    /// The whole `/metrics` text (Prometheus exposition).
    pub async fn metrics(&self) -> String {
        let (status, _, body) = http_request(self.admin, "GET", "/metrics", &[], b"").await;
        assert_eq!(status, 200, "GET /metrics");
        String::from_utf8_lossy(&body).into_owned()
    }

    /// The value of one series of `/metrics` (Prometheus text), exactly as written.
    pub async fn metric_text(&self, series: &str) -> Option<String> {
        metric_in(&self.metrics().await, series)
    }

    pub async fn metric(&self, series: &str) -> Option<f64> {
        self.metric_text(series).await.and_then(|v| v.parse().ok())
    }

    /// Waits until the metric has the value `want`.
    pub async fn wait_metric(&self, series: &str, want: f64) {
        let deadline = tokio::time::Instant::now() + DEADLINE;
        loop {
            let got = self.metric(series).await;
            if got == Some(want) {
                return;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "metric {series}: want {want}, got {got:?}"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Waits until the log holds `needle` at least `count` times; returns the log.
    pub async fn wait_log(&self, needle: &str, count: usize) -> String {
        let deadline = tokio::time::Instant::now() + DEADLINE;
        loop {
            let log = self.log();
            if log.matches(needle).count() >= count {
                return log;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "log never had {count} x {needle:?}:\n{log}"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Waits until `/readyz` answers `status` with a body containing `needle`; returns the body.
    pub async fn wait_readyz(&self, status: u16, needle: &str) -> String {
        let deadline = tokio::time::Instant::now() + DEADLINE;
        loop {
            let (s, body) = self.readyz().await;
            if s == status && body.contains(needle) {
                return body;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "/readyz: want {status} with {needle:?}, got {s} {body:?}"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Resident set size in KiB (`VmRSS` of /proc/PID/status).
    pub fn rss_kib(&self) -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.pid())).expect("read /proc status");
        status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .expect("VmRSS line")
    }

    pub fn signal(&self, sig: &str) {
        let status = Command::new("kill")
            .args([format!("-{sig}"), self.pid().to_string()])
            .status()
            .expect("kill");
        assert!(status.success(), "kill -{sig}");
    }

    /// Waits (with a deadline) for the process to exit; returns its exit code.
    pub async fn wait_exit(&mut self, within: Duration) -> Option<i32> {
        let deadline = tokio::time::Instant::now() + within;
        loop {
            if let Some(status) = self.child.try_wait().expect("try_wait") {
                return status.code();
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "wsgate did not exit in time:\n{}",
                self.log()
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// SIGTERM, then waits for a clean exit (code 0); returns everything the gateway logged.
    pub async fn stop(mut self) -> String {
        self.signal("TERM");
        let code = self.wait_exit(DEADLINE).await;
        assert_eq!(code, Some(0), "{}", self.log());
        self.log()
    }
}
