//! Which events forwarded to other brokers NATS has confirmed receiving.
//!
//! A forward is a core NATS publish: it is written to the connection, not
//! acknowledged. When the connection drops, what was written since NATS
//! last answered a flush may be lost, and the other brokers' clients never
//! get it. So a task flushes now and then, and each flush answered confirms
//! every forward made before it; when the connection is lost, the forwards
//! not yet confirmed are counted as unconfirmed: an upper bound of the
//! events the cluster lost with it, reported as a metric.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use herald_common::metrics::Counter;
use tokio_util::sync::CancellationToken;

/// How often forwards are confirmed.
const CONFIRM_EVERY: Duration = Duration::from_millis(100);
/// How long a flush may take before the next try.
const FLUSH_TIMEOUT: Duration = Duration::from_secs(2);

#[derive(Debug, Default)]
pub(super) struct Confirmations {
    forwarded: AtomicU64,
    confirmed: AtomicU64,
    unconfirmed_at_loss: Counter,
}

impl Confirmations {
    /// Counts one forward about to be written to the connection. It is
    /// counted first, so that a loss reported meanwhile counts it too.
    pub(super) fn forwarded(&self) {
        self.forwarded.fetch_add(1, Ordering::Relaxed);
    }

    /// The connection was lost: the forwards not confirmed may be gone.
    pub(super) fn connection_lost(&self) {
        let forwarded = self.forwarded.load(Ordering::Relaxed);
        let confirmed = self.confirmed.swap(forwarded, Ordering::Relaxed);
        self.unconfirmed_at_loss.add(forwarded.saturating_sub(confirmed));
    }

    /// Forwards unconfirmed when a connection was lost, in all.
    pub(super) fn unconfirmed(&self) -> &Counter {
        &self.unconfirmed_at_loss
    }

    /// Every forward counted up to `mark` reached NATS.
    fn confirm_up_to(&self, mark: u64) {
        self.confirmed.fetch_max(mark, Ordering::Relaxed);
    }
}

/// Flushes the connection every [`CONFIRM_EVERY`] while forwards wait for
/// confirmation, until `stop`.
pub(super) async fn confirm_forwards(
    client: async_nats::Client,
    confirmations: Arc<Confirmations>,
    stop: CancellationToken,
) {
    let mut ticker = tokio::time::interval(CONFIRM_EVERY);
    loop {
        tokio::select! {
            () = stop.cancelled() => return,
            _ = ticker.tick() => {}
        }
        let mark = confirmations.forwarded.load(Ordering::Relaxed);
        if mark <= confirmations.confirmed.load(Ordering::Relaxed) {
            continue;
        }
        if let Ok(Ok(())) = tokio::time::timeout(FLUSH_TIMEOUT, client.flush()).await {
            confirmations.confirm_up_to(mark);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn forwards_not_confirmed_when_the_connection_drops_are_counted_once() {
        let confirmations = Confirmations::default();
        (0..10).for_each(|_| confirmations.forwarded());
        confirmations.confirm_up_to(7);
        confirmations.connection_lost();
        assert_eq!(confirmations.unconfirmed().get(), 3);
        confirmations.connection_lost();
        assert_eq!(confirmations.unconfirmed().get(), 3, "each forward is counted at most once");
        confirmations.confirm_up_to(5);
        confirmations.forwarded();
        confirmations.connection_lost();
        assert_eq!(confirmations.unconfirmed().get(), 4, "a late flush answer confirms nothing already written off");
    }
}
