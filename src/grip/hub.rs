//! The [`Hub`]: the one place publishes and connection-API calls go through. It delivers to
//! this replica's connections through the [`Registry`]; with NATS it also reaches the other
//! replicas (see `nats.rs`).

use std::collections::BTreeMap;
use std::sync::Arc;

use crate::protocol::control::MessageType;
use crate::protocol::frame::{CloseFrame, Message};
use crate::protocol::publish::{Item, WsMessageAction};

use super::{ConnInfo, Delivery, PushOutcome, Registry};

/// What the connection API reports about one connection.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConnectionView {
    /// Connection-Id.
    pub id: String,
    /// Route name.
    pub route: String,
    /// Seconds since the connection was accepted.
    pub age_secs: u64,
    /// Metadata and subscriptions.
    pub info: ConnInfo,
}

/// Result of a call aimed at one connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Targeted {
    /// Queued for the connection.
    Delivered,
    /// No such connection (on any replica reached).
    NotFound,
    /// The connection is closing as a slow consumer.
    Overflow,
}

/// Turns a publish action into what a connection receives.
pub fn delivery_for(action: &WsMessageAction) -> Delivery {
    match action {
        WsMessageAction::Send { kind, content } => Delivery::Message(match kind {
            MessageType::Text => Message::Text(content.clone()),
            MessageType::Binary => Message::Binary(content.clone()),
            MessageType::Ping => Message::Ping(content.clone()),
            MessageType::Pong => Message::Pong(content.clone()),
        }),
        WsMessageAction::Close { code, reason } => Delivery::Message(Message::Close(Some(CloseFrame {
            code: code.unwrap_or(1000),
            reason: reason.clone(),
        }))),
        WsMessageAction::Refresh => Delivery::Refresh,
    }
}

/// Publishing and per-connection calls for this replica (and others, with NATS).
#[derive(Debug, Clone)]
pub struct Hub {
    registry: Arc<Registry>,
}

impl Hub {
    /// A hub delivering to `registry`'s connections.
    pub fn new(registry: Arc<Registry>) -> Self {
        Self { registry }
    }

    /// The local registry.
    pub fn registry(&self) -> &Arc<Registry> {
        &self.registry
    }

    /// Delivers one publish item to local subscribers; returns how many got it. Items without
    /// a `ws-message` format count as published and reach nobody.
    pub fn publish_local(&self, item: &Item) -> usize {
        let Some(action) = &item.ws else {
            return 0;
        };
        self.registry.publish(&item.channel, &item.meta, &delivery_for(action))
    }

    /// Publishes items (locally; NATS forwarding is added by the bridge).
    pub async fn publish(&self, items: &[Item]) -> usize {
        items.iter().map(|i| self.publish_local(i)).sum()
    }

    /// Sends an action to one local connection.
    pub fn send_local(&self, id: &str, action: &WsMessageAction) -> Targeted {
        let Some(conn) = self.registry.get(id) else {
            return Targeted::NotFound;
        };
        match conn.mailbox.push(delivery_for(action)) {
            PushOutcome::Queued => Targeted::Delivered,
            PushOutcome::Overflow => Targeted::Overflow,
            PushOutcome::Closed => Targeted::NotFound,
        }
    }

    /// Sends an action to one connection.
    pub async fn send(&self, id: &str, action: &WsMessageAction) -> Targeted {
        self.send_local(id, action)
    }

    /// Describes one local connection.
    pub fn get_local(&self, id: &str) -> Option<ConnectionView> {
        let conn = self.registry.get(id)?;
        Some(ConnectionView {
            id: conn.id.clone(),
            route: conn.route.clone(),
            age_secs: conn.created.elapsed().map(|d| d.as_secs()).unwrap_or(0),
            info: conn.info(),
        })
    }

    /// Describes one connection.
    pub async fn get(&self, id: &str) -> Option<ConnectionView> {
        self.get_local(id)
    }

    /// Closes one connection with `code` and `reason`.
    pub async fn close(&self, id: &str, code: u16, reason: &str) -> Targeted {
        self.send(
            id,
            &WsMessageAction::Close {
                code: Some(code),
                reason: reason.to_owned(),
            },
        )
        .await
    }
}

/// Item meta shortcut for tests and callers.
pub fn no_meta() -> BTreeMap<String, String> {
    BTreeMap::new()
}
