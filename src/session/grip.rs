//! GRIP state of one connection: message prefix, subscriptions, detach, subscription meta,
//! the gateway-sent keep-alive and the delayed message.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use bytes::Bytes;

use crate::protocol::control::{self, KeepAliveMode, TimedMessage};

/// How a backend message on a GRIP connection is to be treated.
#[derive(Debug)]
pub(super) enum Classified {
    Control(Result<control::ControlMessage, control::ControlError>),
    Message(Bytes),
    Unprefixed,
}

/// One subscription and its publish filters.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Subscription {
    /// Channel name.
    pub channel: String,
    /// Filter names given with the subscribe (e.g. `skip-self`).
    pub filters: Vec<String>,
}

/// GRIP state, present once the backend answered OPEN with `Sec-WebSocket-Extensions: grip`.
#[derive(Debug)]
pub struct GripState {
    prefix: String,
    subscriptions: Vec<Subscription>,
    /// Client messages are no longer relayed to the backend.
    pub detached: bool,
    /// Subscription metadata (`set-meta`), used by publish filters.
    pub meta: BTreeMap<String, String>,
    /// Session id set by the `session` control message.
    pub session_id: Option<String>,
    keep_alive: Option<(TimedMessage, Instant)>,
    delayed: Option<(TimedMessage, Instant)>,
}

impl GripState {
    pub(super) fn new(prefix: String) -> Self {
        Self {
            prefix,
            subscriptions: Vec::new(),
            detached: false,
            meta: BTreeMap::new(),
            session_id: None,
            keep_alive: None,
            delayed: None,
        }
    }

    /// The message prefix the backend uses (default `m:`).
    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    /// Current subscriptions.
    pub fn subscriptions(&self) -> &[Subscription] {
        &self.subscriptions
    }

    pub(super) fn classify_text(&self, b: &Bytes) -> Classified {
        match control::classify_text(b, &self.prefix) {
            control::Classified::Control(c) => Classified::Control(c),
            control::Classified::Message(m) => Classified::Message(m),
            control::Classified::Unprefixed => Classified::Unprefixed,
        }
    }

    pub(super) fn classify_binary(&self, b: &Bytes) -> Classified {
        match control::classify_binary(b, &self.prefix) {
            control::Classified::Control(c) => Classified::Control(c),
            control::Classified::Message(m) => Classified::Message(m),
            control::Classified::Unprefixed => Classified::Unprefixed,
        }
    }

    /// Ok(true): newly subscribed; Ok(false): already subscribed (filters updated); Err: over the limit.
    pub(super) fn subscribe(&mut self, channel: &str, filters: Vec<String>, max: usize) -> Result<bool, ()> {
        if let Some(s) = self.subscriptions.iter_mut().find(|s| s.channel == channel) {
            s.filters = filters;
            return Ok(false);
        }
        if self.subscriptions.len() >= max {
            return Err(());
        }
        self.subscriptions.push(Subscription {
            channel: channel.to_owned(),
            filters,
        });
        Ok(true)
    }

    pub(super) fn unsubscribe(&mut self, channel: &str) -> bool {
        let before = self.subscriptions.len();
        self.subscriptions.retain(|s| s.channel != channel);
        before != self.subscriptions.len()
    }

    pub(super) fn set_meta(&mut self, name: String, value: Option<String>) {
        match value {
            Some(v) => {
                self.meta.insert(name, v);
            }
            None => {
                self.meta.remove(&name);
            }
        }
    }

    pub(super) fn set_keep_alive(&mut self, m: Option<TimedMessage>, now: Instant) {
        self.keep_alive = m.map(|m| {
            let at = now + Duration::from_secs(u64::from(m.timeout_secs.max(1)));
            (m, at)
        });
    }

    /// Something was sent to the client: an idle-mode keep-alive starts counting again.
    pub(super) fn note_sent(&mut self, now: Instant) {
        if let Some((m, at)) = self.keep_alive.as_mut()
            && m.mode == KeepAliveMode::Idle
        {
            *at = now + Duration::from_secs(u64::from(m.timeout_secs.max(1)));
        }
    }

    /// Schedules a delayed message; a message still pending is returned to be sent now
    /// (as Pushpin does: a new `send-delayed` flushes the previous one).
    pub(super) fn send_delayed(&mut self, m: TimedMessage, now: Instant) -> Option<TimedMessage> {
        let at = now + Duration::from_secs(u64::from(m.timeout_secs));
        self.delayed.replace((m, at)).map(|(prev, _)| prev)
    }

    pub(super) fn take_delayed(&mut self) -> Option<TimedMessage> {
        self.delayed.take().map(|(m, _)| m)
    }

    pub(super) fn next_deadline(&self) -> Option<Instant> {
        let a = self.keep_alive.as_ref().map(|(_, t)| *t);
        let b = self.delayed.as_ref().map(|(_, t)| *t);
        match (a, b) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    /// Messages whose time has come (delayed message, keep-alive), rescheduling the keep-alive.
    pub(super) fn poll_due(&mut self, now: Instant) -> Vec<TimedMessage> {
        let mut out = Vec::new();
        if self.delayed.as_ref().is_some_and(|(_, t)| *t <= now)
            && let Some((m, _)) = self.delayed.take()
        {
            out.push(m);
        }
        if let Some((m, at)) = self.keep_alive.as_mut()
            && *at <= now
        {
            out.push(m.clone());
            *at = now + Duration::from_secs(u64::from(m.timeout_secs.max(1)));
        }
        out
    }
}
