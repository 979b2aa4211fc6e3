//! Restart delay for the proxy: exponential from `initial` to `max`, reset
//! once a run lasted long enough to count as healthy.

use std::time::Duration;

#[derive(Debug, Clone)]
pub struct Backoff {
    initial: Duration,
    max: Duration,
    next: Duration,
}

/// A run at least this long resets the delay to `initial`.
pub const HEALTHY_RUN: Duration = Duration::from_secs(30);

impl Backoff {
    pub fn new(initial: Duration, max: Duration) -> Backoff {
        Backoff {
            initial,
            max,
            next: initial,
        }
    }

    /// The delay before the next start, given how long the last run lasted.
    pub fn after_run(&mut self, ran: Duration) -> Duration {
        if ran >= HEALTHY_RUN {
            self.next = self.initial;
        }
        let d = self.next;
        self.next = (self.next * 2).min(self.max);
        d
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn doubles_up_to_max_and_resets_after_a_healthy_run() {
        let mut b = Backoff::new(Duration::from_millis(100), Duration::from_millis(700));
        let short = Duration::from_millis(10);
        let got: Vec<u128> = (0..5).map(|_| b.after_run(short).as_millis()).collect();
        assert_eq!(got, [100, 200, 400, 700, 700]);
        assert_eq!(b.after_run(HEALTHY_RUN).as_millis(), 100);
        assert_eq!(b.after_run(short).as_millis(), 200);
    }
}
