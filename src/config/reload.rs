//! Hot reload of a routes file by polling its content.
//!
//! Polling the content hash (rather than watching inotify events) works the same for a file
//! edited in place, replaced by rename, and a Kubernetes ConfigMap volume, whose files are
//! symlinks into a `..data` directory that is swapped atomically.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

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
    /// When the current run of failures started (set with the first failure after a good
    /// state, kept while `last_error` is set, cleared with it).
    pub failing_since: Option<SystemTime>,
}

impl ReloadState {
    /// Generation of the table in use: 1 for the table loaded at startup, plus one per
    /// successful reload. Unlike the version it never depends on where the first table came
    /// from, so it is the same kind of number for every source.
    pub fn generation(&self) -> u64 {
        self.reloads_ok.saturating_add(1)
    }
}

/// Shared, observable reload status (for `/readyz`, `/metrics` and tests).
///
/// [`watch_routes_file`] sets its version to the table's when it starts, so `default()` is
/// fine to start with.
#[derive(Debug, Default)]
pub struct ReloadStatus {
    state: watch::Sender<ReloadState>,
    /// Unix time in milliseconds of the last poll that found the file readable with its
    /// content in use (0: never). Kept out of `state`: it changes at every poll, and
    /// subscribers should only wake up for real changes.
    last_success_ms: AtomicU64,
}

impl ReloadStatus {
    /// A status for a table currently at `version`.
    pub fn new(version: u64) -> Self {
        Self {
            state: watch::Sender::new(ReloadState {
                version,
                ..ReloadState::default()
            }),
            last_success_ms: AtomicU64::new(0),
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

    /// Generation of the table in use (see [`ReloadState::generation`]).
    pub fn generation(&self) -> u64 {
        self.state.borrow().generation()
    }

    /// Whether the file, as last read, is the one in use: readable and valid (or unchanged
    /// since it was). `false` while the latest content is rejected or the file can't be read.
    pub fn is_up(&self) -> bool {
        self.state.borrow().last_error.is_none()
    }

    /// When the current run of failures started, while there is one.
    pub fn failing_since(&self) -> Option<SystemTime> {
        self.state.borrow().failing_since
    }

    /// The last time the file was found readable with its content in use: at the watcher's
    /// start (the table it started with is in use), then at every such poll. `None` before
    /// the watcher started.
    pub fn last_success(&self) -> Option<SystemTime> {
        match self.last_success_ms.load(Ordering::Relaxed) {
            0 => None,
            ms => Some(UNIX_EPOCH + Duration::from_millis(ms)),
        }
    }

    /// Records that the content in use was confirmed now.
    pub(crate) fn record_success_now(&self) {
        let ms = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(1, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX).max(1));
        self.last_success_ms.store(ms, Ordering::Relaxed);
    }

    /// A receiver notified on every change, e.g. to wait for a version with
    /// `receiver.wait_for(|s| s.version >= 2)`.
    pub fn subscribe(&self) -> watch::Receiver<ReloadState> {
        self.state.subscribe()
    }

    /// Records a successful reload to `version`.
    pub(crate) fn record_ok(&self, version: u64) {
        self.state.send_modify(|s| {
            s.version = version;
            s.reloads_ok += 1;
            s.last_error = None;
            s.failing_since = None;
        });
        self.record_success_now();
    }

    /// Records a failed reload (invalid or unreadable file).
    pub(crate) fn record_failure(&self, error: &ConfigError) {
        let message = error.to_string();
        self.state.send_modify(|s| {
            s.reloads_failed += 1;
            s.last_error = Some(message);
            s.failing_since.get_or_insert_with(SystemTime::now);
        });
    }

    /// Shows `error` as the last error without counting a failure (used when a read error
    /// ends and the content is the one seen before it).
    fn restore_error(&self, error: Option<String>) {
        self.state.send_if_modified(|s| {
            let changed = s.last_error != error;
            if error.is_none() {
                s.failing_since = None;
            }
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
    // The table it starts with is in use, so it counts as loaded fine.
    status.record_success_now();
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
            if seen_error.is_none() {
                status.record_success_now();
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_failure_run_starts_once_and_ends_with_a_good_state() {
        let status = ReloadStatus::new(1);
        assert!(status.is_up() && status.last_success().is_none());
        assert_eq!(status.generation(), 1);
        let bad = ConfigError::single("routes", "expected a list, got a mapping");
        status.record_failure(&bad);
        let since = status.failing_since().expect("failing");
        assert!(!status.is_up());
        status.record_failure(&ConfigError::single("", "cannot read routes file x: gone"));
        assert_eq!(status.failing_since(), Some(since));
        // The read error ends, the rejected content is back: still failing, since the start.
        status.restore_error(Some(bad.to_string()));
        assert_eq!((status.failing_since(), status.reloads_failed()), (Some(since), 2));
        status.restore_error(None);
        assert!(status.is_up() && status.failing_since().is_none());

        status.record_failure(&bad);
        status.record_ok(2);
        assert!(status.is_up() && status.failing_since().is_none() && status.last_success().is_some());
        assert_eq!((status.version(), status.generation()), (2, 2));
    }
}
