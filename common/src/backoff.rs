//! Exponential reconnect backoff with jitter, so that many gateways losing
//! the same broker do not reconnect in lockstep.

use std::time::Duration;

/// Delays between reconnect attempts: `initial`, doubling up to `max`, each
/// scaled by a random factor in [0.5, 1.0].
#[derive(Debug, Clone)]
pub struct Backoff {
    initial: Duration,
    max: Duration,
    next: Duration,
}

impl Backoff {
    pub fn new(initial: Duration, max: Duration) -> Self {
        Self { initial, max, next: initial }
    }

    /// The delay before the next attempt.
    pub fn next_delay(&mut self) -> Duration {
        let base = self.next;
        self.next = (self.next * 2).min(self.max);
        let jitter = 0.5 + f64::from(crate::token::random_u32() % 1000) / 2000.0;
        base.mul_f64(jitter)
    }

    /// Starts over after a successful connection.
    pub fn reset(&mut self) {
        self.next = self.initial;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn doubles_up_to_the_cap_and_resets() {
        let mut b = Backoff::new(Duration::from_millis(100), Duration::from_millis(400));
        let delays: Vec<_> = (0..5).map(|_| b.next_delay()).collect();
        let caps = [100, 200, 400, 400, 400];
        for (d, cap) in delays.iter().zip(caps) {
            assert!(*d <= Duration::from_millis(cap) && *d >= Duration::from_millis(cap / 2), "{d:?} vs {cap}");
        }
        b.reset();
        assert!(b.next_delay() <= Duration::from_millis(100));
    }
}
