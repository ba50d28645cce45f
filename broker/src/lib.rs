//! herald's channel broker.
//!
//! - [`hub`]: the routing core (channels, worker ids, session queues), no sockets;
//! - [`route`]: validation of a publish and the channel it travels on;
//! - [`service`] and [`server`]: `herald.v1.BrokerService` over gRPC, with
//!   reflection and `grpc.health.v1`;
//! - [`client`]: how publishers and gateways reach a broker, in-process or
//!   over gRPC with failover between several addresses;
//! - [`cluster`]: several brokers bridged by NATS.

pub mod client;
pub mod cluster;
pub mod error;
pub mod hub;
pub mod metrics;
pub mod route;
pub mod server;
pub mod service;

pub use client::{BrokerClient, BrokerSession};
pub use error::{CommandError, PublishError};
pub use hub::{Hub, HubLimits};
