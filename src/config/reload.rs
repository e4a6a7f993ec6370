//! Hot reload of a routes file by polling its content.
//!
//! Polling the content hash (rather than watching inotify events) works the same for a file
//! edited in place, replaced by rename, and a Kubernetes ConfigMap volume, whose files are
//! symlinks into a `..data` directory that is swapped atomically.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use tokio::sync::watch;
use tokio::time::MissedTickBehavior;
use tokio_util::sync::CancellationToken;

use super::error::ConfigError;
use super::file::{digest, load_routes_bytes, read_error};
use super::table::RouteTable;

/// A snapshot of the reload state.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ReloadState {
    /// Version of the table in use.
    pub version: u64,
    /// Successful reloads so far.
    pub reloads_ok: u64,
    /// Failed reloads (invalid or unreadable file) so far.
    pub reloads_failed: u64,
    /// Why the latest reload failed; cleared by the next successful one.
    pub last_error: Option<String>,
}

/// Shared, observable reload status (for `/readyz`, the admin API and tests).
///
/// [`watch_routes_file`] sets its version to the table's when it starts, so `default()` is
/// fine to start with.
#[derive(Debug, Default)]
pub struct ReloadStatus {
    state: watch::Sender<ReloadState>,
}

impl ReloadStatus {
    /// A status for a table currently at `version`.
    pub fn new(version: u64) -> Self {
        Self {
            state: watch::Sender::new(ReloadState {
                version,
                ..ReloadState::default()
            }),
        }
    }

    /// The current state.
    pub fn snapshot(&self) -> ReloadState {
        self.state.borrow().clone()
    }

    /// Version of the table in use.
    pub fn version(&self) -> u64 {
        self.state.borrow().version
    }

    /// Why the latest reload failed, until a reload succeeds.
    pub fn last_error(&self) -> Option<String> {
        self.state.borrow().last_error.clone()
    }

    /// Successful reloads so far.
    pub fn reloads_ok(&self) -> u64 {
        self.state.borrow().reloads_ok
    }

    /// Failed reloads so far.
    pub fn reloads_failed(&self) -> u64 {
        self.state.borrow().reloads_failed
    }

    /// A receiver notified on every change, e.g. to wait for a version with
    /// `receiver.wait_for(|s| s.version >= 2)`.
    pub fn subscribe(&self) -> watch::Receiver<ReloadState> {
        self.state.subscribe()
    }

    fn record_ok(&self, version: u64) {
        self.state.send_modify(|s| {
            s.version = version;
            s.reloads_ok += 1;
            s.last_error = None;
        });
    }

    fn record_failure(&self, error: &ConfigError) {
        let message = error.to_string();
        self.state.send_modify(|s| {
            s.reloads_failed += 1;
            s.last_error = Some(message);
        });
    }

    /// Shows `error` as the last error without counting a failure (used when a read error
    /// ends and the content is the one seen before it).
    fn restore_error(&self, error: Option<String>) {
        self.state.send_if_modified(|s| {
            let changed = s.last_error != error;
            s.last_error = error;
            changed
        });
    }
}

/// Polls `path` every `interval` until `cancel` fires. When the content changes it is parsed
/// and validated; a valid file becomes a new [`RouteTable`] (current version + 1) stored
/// into `table`, an invalid or unreadable one is logged with `tracing::error!`, recorded in
/// `status`, and the current table stays. A bad content is reported once, not at every poll.
///
/// Start it right after [`load_routes_file`](super::load_routes_file): the table it produced
/// remembers the content it came from, so nothing is reloaded until the file changes. (For a
/// table from anywhere else the first poll loads the file.)
///
/// Cancel-safe: dropping the future between polls loses nothing.
pub async fn watch_routes_file(
    path: PathBuf,
    interval: Duration,
    table: Arc<ArcSwap<RouteTable>>,
    status: Arc<ReloadStatus>,
    cancel: CancellationToken,
) {
    let current = table.load_full();
    status.state.send_if_modified(|s| {
        let changed = s.version != current.version();
        s.version = current.version();
        changed
    });
    let mut seen = current.source_digest();
    drop(current);
    // Why the content with digest `seen` was rejected, if it was.
    let mut seen_error: Option<String> = None;
    let mut read_failing: Option<String> = None;
    let mut ticker = tokio::time::interval(interval.max(Duration::from_millis(1)));
    ticker.set_missed_tick_behavior(MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            biased;
            () = cancel.cancelled() => return,
            _ = ticker.tick() => {}
        }
        let bytes = match tokio::fs::read(&path).await {
            Ok(bytes) => bytes,
            Err(e) => {
                let error = read_error(&path, &e);
                let message = error.to_string();
                if read_failing.as_deref() != Some(message.as_str()) {
                    tracing::error!(path = %path.display(), error = %message, "cannot read routes file; keeping the current routes");
                    status.record_failure(&error);
                    read_failing = Some(message);
                }
                continue;
            }
        };
        let recovered = read_failing.take().is_some();
        if recovered {
            tracing::info!(path = %path.display(), "routes file readable again");
        }
        let new_digest = digest(&bytes);
        if seen == Some(new_digest) {
            if recovered {
                status.restore_error(seen_error.clone());
            }
            continue;
        }
        seen = Some(new_digest);
        let version = table.load().version().saturating_add(1);
        match compile_in_background(&path, bytes, version).await {
            Ok(new_table) => {
                let routes = new_table.routes().len();
                table.store(Arc::new(new_table));
                status.record_ok(version);
                seen_error = None;
                tracing::info!(path = %path.display(), version, routes, "routes file reloaded");
            }
            Err(error) => {
                tracing::error!(
                    path = %path.display(),
                    error = %error,
                    "routes file rejected; keeping the current routes"
                );
                status.record_failure(&error);
                seen_error = Some(error.to_string());
            }
        }
    }
}

/// Parses on the blocking pool: compiling may read key files.
async fn compile_in_background(path: &Path, bytes: Vec<u8>, version: u64) -> Result<RouteTable, ConfigError> {
    let path_owned = path.to_owned();
    tokio::task::spawn_blocking(move || {
        load_routes_bytes(&path_owned, &bytes, version, &|name| std::env::var(name).ok())
    })
    .await
    .unwrap_or_else(|e| Err(ConfigError::single("", format!("routes file compilation failed: {e}"))))
}
