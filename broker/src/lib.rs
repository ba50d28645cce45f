//! herald's channel broker.
//!
//! - [`Hub`]: the routing core (the interest index, sessions, publishing),
//!   no sockets;
//! - [`route`]: validation of a publish, its channel and its delivery;
//! - [`control`]: validation of controls and queries, and where they go;
//! - [`federation`]: the seam to other brokers: on its own ([`federation::Local`])
//!   or bridged by NATS ([`federation::nats`]);
//! - [`history`]: the publications client channels keep, for recovery;
//! - [`backends`]: connection events for backends, and clients' calls to them;
//! - [`server`]: `herald.v1.BrokerService` over gRPC, with reflection and
//!   `grpc.health.v1`;
//! - the hub is also a [`herald_client::Broker`], for gateways in the same
//!   process.

pub mod backends;
pub mod control;
mod error;
pub mod federation;
pub mod history;
pub mod hub;
mod in_process;
mod metrics;
pub mod route;
pub mod server;
mod service;
pub mod tls;

pub use error::{CommandError, CommandErrorKind, PublishError};
pub use hub::{Hub, HubLimits};

/// The broker's gRPC port in the classic layout.
pub const DEFAULT_PORT: u16 = 2206;
/// The broker's admin port (metrics, health).
pub const DEFAULT_ADMIN_PORT: u16 = 2207;
