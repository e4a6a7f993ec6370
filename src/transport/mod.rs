//! I/O drivers that feed a [`crate::session::Session`]: the client's WebSocket socket and the
//! backend's HTTP client. Client-side and backend-side failures are mapped to close codes and
//! statuses here and in the session, nowhere else.

pub mod backend;
pub mod client;
pub mod h1;
pub mod io;
