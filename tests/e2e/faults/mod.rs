//! Faults across real hosts: herald's roles run in network namespaces joined
//! by veth pairs (each a host with its own address), and the tests break the
//! network between them: partitions, packet loss, added latency, restarts;
//! and the secrets that cross it only over TLS.
//! Each scenario writes down what it sent and what was lost, duplicated or
//! misdelivered ([`Outcome`]), the figures of BENCHMARKS.md's "faults" table.
//!
//! The harness needs root (`ip netns`, nftables). Without it a scenario says
//! so and passes vacuously, unless `HERALD_TEST_REQUIRE_TOOLS=1`.

use std::io::Write;
use std::time::Duration;

mod lossy;
pub mod net;
mod partitions;
pub mod proxy;
mod restarts;
mod secure;

/// What one fault scenario delivered.
#[derive(Debug)]
pub struct Outcome {
    pub scenario: &'static str,
    pub sent: u64,
    pub lost: u64,
    pub duplicated: u64,
    pub misdelivered: u64,
    /// From the fault's end until delivery was whole again.
    pub recovery: Duration,
}

impl Outcome {
    /// Prints the outcome as one `herald-faults:` JSON line, and appends it to
    /// the file named by `HERALD_FAULTS_REPORT` when set.
    pub fn record(&self) {
        let line = serde_json::json!({
            "scenario": self.scenario,
            "sent": self.sent,
            "lost": self.lost,
            "duplicated": self.duplicated,
            "misdelivered": self.misdelivered,
            "recovery_ms": self.recovery.as_millis() as u64,
        });
        println!("herald-faults: {line}");
        if let Ok(path) = std::env::var("HERALD_FAULTS_REPORT") {
            let file = std::fs::OpenOptions::new().create(true).append(true).open(&path);
            if let Ok(mut file) = file {
                let _ = writeln!(file, "{line}");
            }
        }
    }
}
