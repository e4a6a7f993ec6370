//! The [`Hub`]: the one place publishes and connection-API calls go through. It delivers to
//! this replica's connections through the [`Registry`]; with a [`NatsBridge`] it also reaches
//! the other replicas (see [`super::nats`]).
//!
//! With NATS, a publish is delivered locally first and then handed to the bridge without
//! waiting (an outage never slows or fails a publish); a connection-API call is tried locally
//! first and, when the connection is not here and NATS is connected, asked of the other
//! replicas with a short timeout.

use std::sync::Arc;
use std::sync::atomic::Ordering;

use crate::protocol::control::MessageType;
use crate::protocol::frame::{CloseFrame, Message};
use crate::protocol::publish::{Item, WsMessageAction};

use super::nats::NatsBridge;
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

/// Queues `action` for local connection `id`.
pub(crate) fn send_to(registry: &Registry, id: &str, action: &WsMessageAction) -> Targeted {
    let Some(conn) = registry.get(id) else {
        return Targeted::NotFound;
    };
    match conn.mailbox.push(delivery_for(action)) {
        PushOutcome::Queued => Targeted::Delivered,
        PushOutcome::Overflow => {
            registry.stats.slow_consumer_drops.fetch_add(1, Ordering::Relaxed);
            Targeted::Overflow
        }
        PushOutcome::Closed => Targeted::NotFound,
    }
}

/// Describes local connection `id`.
pub(crate) fn view_of(registry: &Registry, id: &str) -> Option<ConnectionView> {
    let conn = registry.get(id)?;
    Some(ConnectionView {
        id: conn.id.clone(),
        route: conn.route.clone(),
        age_secs: conn.created.elapsed().map(|d| d.as_secs()).unwrap_or(0),
        info: conn.info(),
    })
}

/// Publishing and per-connection calls for this replica (and others, with NATS).
#[derive(Debug, Clone)]
pub struct Hub {
    registry: Arc<Registry>,
    nats: Option<NatsBridge>,
}

impl Hub {
    /// A hub delivering to `registry`'s connections only.
    pub fn new(registry: Arc<Registry>) -> Self {
        Self { registry, nats: None }
    }

    /// A hub delivering to `registry`'s connections and, through `bridge`, to other replicas.
    /// `bridge` must deliver to the same registry.
    pub fn with_nats(registry: Arc<Registry>, bridge: NatsBridge) -> Self {
        Self {
            registry,
            nats: Some(bridge),
        }
    }

    /// The local registry.
    pub fn registry(&self) -> &Arc<Registry> {
        &self.registry
    }

    /// The NATS bridge, when the hub has one.
    pub fn nats(&self) -> Option<&NatsBridge> {
        self.nats.as_ref()
    }

    /// Delivers one publish item to local subscribers; returns how many got it. Items without
    /// a `ws-message` format count as published and reach nobody.
    pub fn publish_local(&self, item: &Item) -> usize {
        let Some(action) = &item.ws else {
            return 0;
        };
        self.registry.publish(&item.channel, &item.meta, &delivery_for(action))
    }

    /// Publishes items in order: to local subscribers, and (with NATS) to the other replicas.
    /// Returns how many local connections got them. Never waits for NATS.
    pub async fn publish(&self, items: &[Item]) -> usize {
        let mut n = 0;
        for item in items {
            n += self.publish_local(item);
            if let Some(bridge) = &self.nats {
                bridge.forward(item);
            }
        }
        n
    }

    /// Sends an action to one local connection.
    pub fn send_local(&self, id: &str, action: &WsMessageAction) -> Targeted {
        send_to(&self.registry, id, action)
    }

    /// Sends an action to one connection, on this replica or (with NATS) another one.
    pub async fn send(&self, id: &str, action: &WsMessageAction) -> Targeted {
        if self.registry.get(id).is_some() {
            return self.send_local(id, action);
        }
        match &self.nats {
            Some(bridge) => bridge.send_remote(id, action).await,
            None => Targeted::NotFound,
        }
    }

    /// Describes one local connection.
    pub fn get_local(&self, id: &str) -> Option<ConnectionView> {
        view_of(&self.registry, id)
    }

    /// Describes one connection, on this replica or (with NATS) another one.
    pub async fn get(&self, id: &str) -> Option<ConnectionView> {
        if let Some(v) = self.get_local(id) {
            return Some(v);
        }
        self.nats.as_ref()?.get_remote(id).await
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
