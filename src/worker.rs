//! Which data-plane worker the current thread is (see `server::workers`).
//!
//! Per-worker state (the backend pool's idle sockets, the registry's delivery relays) is indexed
//! by it: `1..=N` on the N worker threads, `0` on every other thread.

use std::cell::Cell;

std::thread_local! {
    static CURRENT: Cell<usize> = const { Cell::new(0) };
}

/// This thread's worker index: `1..=N` on a data-plane worker, `0` elsewhere.
pub fn current() -> usize {
    CURRENT.with(Cell::get)
}

/// Marks this thread as worker `index` (`1..=N`); worker threads call it once at start.
pub fn set_current(index: usize) {
    CURRENT.with(|c| c.set(index));
}
