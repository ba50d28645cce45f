//! Small pieces every herald role shares: API keys, TLS, the HTTP server loop,
//! metric primitives rendered in the Prometheus text format, listener binding
//! (with `SO_REUSEPORT` for several gateway processes on one port), reconnect
//! backoff, random tokens, and a small HTTP client for the hooks herald calls.

pub mod auth;
pub mod backoff;
pub mod duration;
pub mod http;
pub mod http_client;
pub mod metrics;
pub mod namespaces;
pub mod net;
mod refusals;
pub mod tls;
pub mod token;
