//! Data-plane worker threads (`--workers`).
//!
//! Each worker is a thread running its own single-threaded tokio runtime and accepting on the
//! shared client listener. A connection then lives on the thread that accepted it: its
//! handshake, its session task, its backend sockets (the `http://` pool keeps idle sockets per
//! worker) and its timers. Nothing on the message path wakes another thread, which a
//! work-stealing runtime does on almost every message (measured in `docs/PERFORMANCE.md`).
//! The process's main runtime keeps the rest: the admin listener, the publish API, the NATS
//! bridge, route reloads, the control client and span export. A publish reaches the
//! subscribers on a worker through the worker's delivery relay (`Registry::relay`, which each
//! worker runs): one job and one cross-thread wake per worker and publish.
//!
//! The kernel hands each new connection to one of the workers waiting in `accept`; a busy
//! worker is not waiting, so new connections go to the idle ones.

use std::io;
use std::net::TcpListener as StdListener;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio::sync::oneshot;
use tokio_util::sync::CancellationToken;

use super::Gateway;

/// The running workers.
#[derive(Debug)]
pub struct Workers {
    done: Vec<oneshot::Receiver<()>>,
    threads: Vec<std::thread::JoinHandle<()>>,
}

/// The number of workers for `--workers 0`: the CPUs this process may use (the affinity mask
/// and the cgroup CPU quota, as [`std::thread::available_parallelism`] reads them), at least 1.
pub fn default_count() -> usize {
    std::thread::available_parallelism().map_or(1, std::num::NonZeroUsize::get)
}

/// Starts `n` (at least 1) workers accepting on `listener` until `stop` fires. Each keeps
/// running after that until the gateway's connection tracker is closed and empty (the drain,
/// [`Gateway::drain`], closes it), so the connections it accepted are served to their end.
///
/// # Errors
///
/// When the listener cannot be shared or a runtime or thread cannot be created.
pub fn start(n: usize, listener: TcpListener, gw: &Arc<Gateway>, stop: &CancellationToken) -> io::Result<Workers> {
    let listener = listener.into_std()?;
    let mut workers = Workers {
        done: Vec::with_capacity(n.max(1)),
        threads: Vec::with_capacity(n.max(1)),
    };
    for i in 0..n.max(1) {
        let listener: StdListener = listener.try_clone()?;
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
        let (tx, rx) = oneshot::channel();
        let gw = gw.clone();
        let stop = stop.clone();
        let thread = std::thread::Builder::new()
            .name(format!("wsgate-worker-{i}"))
            .spawn(move || {
                crate::worker::set_current(i + 1);
                rt.block_on(serve(i + 1, listener, gw, stop));
                let _ = tx.send(());
            })?;
        workers.done.push(rx);
        workers.threads.push(thread);
    }
    Ok(workers)
}

async fn serve(index: usize, listener: StdListener, gw: Arc<Gateway>, stop: CancellationToken) {
    // Publishes from other threads wake this worker's connections through its relay.
    let registry = gw.registry.clone();
    tokio::spawn(async move { registry.relay(index).await });
    match TcpListener::from_std(listener) {
        Ok(listener) => super::accept_loop(listener, gw.clone(), stop).await,
        Err(e) => {
            // Only when the reactor refuses the socket; the other workers still accept.
            tracing::error!(cause = %e, "a data-plane worker cannot use the listener");
            stop.cancelled().await;
        }
    }
    // The connections accepted here run on this thread's runtime: keep it until the drain
    // has closed the tracker and every tracked task (on any worker) has ended.
    gw.tracker.wait().await;
}

impl Workers {
    /// Waits up to `grace` for every worker to end (after the drain), then joins those that
    /// ended. A worker still running then is left to end with the process.
    pub async fn finish(self, grace: Duration) {
        let _ = tokio::time::timeout(grace, futures_util::future::join_all(self.done)).await;
        for t in self.threads {
            if t.is_finished() {
                let _ = t.join();
            }
        }
    }
}
