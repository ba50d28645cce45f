//! End-to-end tests: each starts real `herald` processes on ephemeral
//! loopback ports and drives them with real clients (curl, grpcurl, Python
//! grpcio stubs, headless Chromium, tokio-tungstenite).
//!
//! Tools the suite needs are installed by `scripts/test`. Run alone, a test
//! whose tool is missing says so and passes vacuously, unless
//! `HERALD_TEST_REQUIRE_TOOLS=1` (as `scripts/test` sets) makes it fail.

mod support;

mod attacks;
mod auth;
mod backend_events;
mod backends;
mod browser;
mod browser_recovery;
mod browser_rpc;
mod channels;
mod classic;
mod cluster;
mod config;
mod conformance;
mod directory;
mod faults;
mod follower;
mod gateway;
mod hardening;
mod history;
mod operability;
mod protocol_client;
pub mod tls;

mod tools;
