//! wsgate: a gateway that lets ordinary HTTP backends serve WebSocket clients.
//!
//! Clients speak WebSocket to wsgate; wsgate speaks the WebSocket-over-HTTP protocol
//! (`application/websocket-events`) to the backend, one `POST` per batch of client events.
//!
//! # Layout
//!
//! Imports flow one way: `protocol ← session ← transport ← server`.
//!
//! - [`protocol`]: pure codecs (no tokio, sockets or clock): WebSocket frames, websocket-events,
//!   GRIP control messages, publish items, Grip-Sig.
//! - [`session`]: the sans-IO state machine of one client connection.
//! - [`transport`]: the I/O drivers that feed a session (client socket, backend HTTP client).
//! - [`server`]: accept loop, route match, upgrade or plain-HTTP pass-through, drain.
//! - [`config`]: the one route model, validation, route table and the routes-file loader.
//! - [`grip`]: channel registry.
//! - [`admin`]: the admin listener (health, readiness, publish API).
//!
//! # Cancel safety
//!
//! Buffers live in structs, never in future locals, so every `select!` arm in the
//! connection driver is cancel-safe: dropping a read or a timer future loses nothing.
#![warn(missing_docs)]
#![cfg_attr(not(test), warn(clippy::unwrap_used))]

pub mod admin;
pub mod config;
pub mod controller;
pub mod demo;
pub mod grip;
pub mod metrics;
pub mod protocol;
pub mod server;
pub mod session;
pub mod signal;
pub mod telemetry;
pub mod telemetry_otlp;
pub mod transport;
pub mod worker;
