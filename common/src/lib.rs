//! Small pieces every herald role shares: metric primitives rendered in the
//! Prometheus text format, listener binding (with `SO_REUSEPORT` for several
//! gateway processes on one port), reconnect backoff and random tokens.

pub mod backoff;
pub mod metrics;
pub mod net;
pub mod token;
