//! Pure protocol codecs: no tokio, no sockets, no clock. Fuzzed and property-tested.

pub mod control;
pub mod events;
pub mod frame;
pub mod publish;
pub mod sig;
