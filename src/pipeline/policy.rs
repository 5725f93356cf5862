//! A mapping's retry policy: its settings, resolved from the configuration, the backoff
//! between attempts, and what becomes of records that run out of retries.

use std::time::Duration;

use rand::Rng;

/// A mapping's retry settings, resolved from its configuration.
#[derive(Debug, Clone)]
pub struct Policy {
    /// Retries after the first attempt; None is forever.
    pub retries: Option<u32>,
    pub max_age: Option<Duration>,
    pub backoff_min: Duration,
    pub backoff_max: Duration,
    pub bisect: bool,
    pub report_item_failures: bool,
    /// Largest event the function accepts.
    pub max_payload: usize,
    /// What becomes of exhausted records without an on-failure destination.
    pub exhausted: Exhausted,
}

/// What becomes of records that ran out of retries when there is no on-failure
/// destination: a property of the source.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Exhausted {
    /// Wait for one: only a record too large for any invoke gets here (configuration
    /// requires a destination where retries are limited), and it blocks its mapping
    /// rather than being lost. RabbitMQ, Kafka.
    Park,
    /// Give them back to the source for redelivery (SQS: after their visibility
    /// timeout, subject to the queue's redrive policy).
    Release,
    /// Drop them, logged (a schedule's fire, as Scheduler does without a dead-letter
    /// queue: the schedule fires again at its next time).
    Drop,
}

impl Policy {
    /// `min * 2^(n-1)` capped at max, with equal jitter (half fixed, half random) so
    /// that replicas retrying the same failure do not stay in step.
    pub fn backoff(&self, n: u32) -> Duration {
        let exp = self
            .backoff_min
            .saturating_mul(1u32 << n.saturating_sub(1).min(20));
        let d = exp.min(self.backoff_max);
        let half = d / 2;
        half + rand::rng().random_range(Duration::ZERO..=half)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_within_bounds() {
        let p = Policy {
            retries: None,
            max_age: None,
            backoff_min: Duration::from_millis(100),
            backoff_max: Duration::from_secs(1),
            bisect: false,
            report_item_failures: false,
            max_payload: 1,
            exhausted: Exhausted::Park,
        };
        for (n, full) in [
            (1, 100),
            (2, 200),
            (3, 400),
            (4, 800),
            (5, 1000),
            (40, 1000),
        ] {
            let d = p.backoff(n).as_millis() as u64;
            assert!(
                d >= full / 2 && d <= full,
                "attempt {n}: {d}ms not in [{}, {full}]",
                full / 2
            );
        }
    }
}
