//! Process signals shared by the long-running subcommands.

/// Resolves on SIGTERM or SIGINT. Without signal handlers (they could not be installed) it
/// never resolves: the process can then only be killed.
pub async fn terminated() {
    use tokio::signal::unix::{SignalKind, signal};
    let (Ok(mut term), Ok(mut int)) = (signal(SignalKind::terminate()), signal(SignalKind::interrupt())) else {
        std::future::pending::<()>().await;
        return;
    };
    tokio::select! {
        _ = term.recv() => {}
        _ = int.recv() => {}
    }
}
