//! How far the broker has followed the gateway's directory journal, and the
//! connections waiting for it to get somewhere: a new connection before its
//! greeting (so that a backend can address it at once), a subscription
//! before its reply (so that every publication after the reply arrives).
//!
//! Each waiter is woken once, when the broker's acknowledgement reaches its
//! position: an acknowledgement wakes only the waiters it satisfies, not
//! every waiter (as a watch channel would, each of them to check again).

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, PoisonError};
use std::time::Duration;

use tokio::sync::oneshot;

#[derive(Debug, Default)]
pub(crate) struct Followed {
    /// The journal position the broker has acknowledged.
    upto: AtomicU64,
    /// Waiters by the position they wait for.
    waiters: Mutex<BTreeMap<u64, Vec<oneshot::Sender<()>>>>,
}

impl Followed {
    /// Records that the broker followed the journal up to `upto`, and wakes
    /// whoever waited for that.
    pub(crate) fn advance(&self, upto: u64) {
        self.upto.fetch_max(upto, Ordering::AcqRel);
        let ready = {
            let mut waiters = self.waiters.lock().unwrap_or_else(PoisonError::into_inner);
            let later = waiters.split_off(&(upto + 1));
            std::mem::replace(&mut *waiters, later)
        };
        for sender in ready.into_values().flatten() {
            let _ = sender.send(());
        }
    }

    /// Waits until the broker has followed the journal up to `position`, or
    /// `patience` has passed (the broker is slow, or being reconnected to).
    pub(crate) async fn wait(&self, position: u64, patience: Duration) {
        if self.upto.load(Ordering::Acquire) >= position {
            return;
        }
        let (sender, followed) = oneshot::channel();
        {
            let mut waiters = self.waiters.lock().unwrap_or_else(PoisonError::into_inner);
            // Checked again under the lock that `advance` drains under.
            if self.upto.load(Ordering::Acquire) >= position {
                return;
            }
            waiters.entry(position).or_default().push(sender);
        }
        let _ = tokio::time::timeout(patience, followed).await;
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;

    #[tokio::test]
    async fn a_waiter_wakes_when_its_position_is_followed_and_not_before() {
        let followed = Arc::new(Followed::default());
        let waiter = tokio::spawn({
            let followed = followed.clone();
            async move { followed.wait(5, Duration::from_secs(5)).await }
        });
        tokio::task::yield_now().await;
        followed.advance(4);
        tokio::task::yield_now().await;
        assert!(!waiter.is_finished(), "4 is not 5");
        followed.advance(7);
        tokio::time::timeout(Duration::from_secs(1), waiter).await.unwrap().unwrap();
        tokio::time::timeout(Duration::from_millis(100), followed.wait(6, Duration::from_secs(5)))
            .await
            .expect("a position already followed does not wait");
    }

    #[tokio::test]
    async fn a_waiter_gives_up_after_its_patience() {
        let followed = Followed::default();
        let started = tokio::time::Instant::now();
        followed.wait(1, Duration::from_millis(50)).await;
        assert!(started.elapsed() >= Duration::from_millis(50));
    }
}
