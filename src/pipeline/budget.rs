//! Bounds by bytes what a lane holds between its source and the end of its batches.
//!
//! A source acquires a record's weight from its lane's [`Budget`] before the record
//! enters the lane's channel; the [`Hold`] rides in the record and returns the bytes
//! when the record is dropped: once it is resolved and acknowledged, or given up. The
//! channel's count bound alone let a blocked lane of large records hold gigabytes.

use std::sync::Arc;

use metrics::Counter;
use tokio::sync::Semaphore;

use crate::record::Hold;

/// The byte budget of one lane.
#[derive(Debug, Clone)]
pub struct Budget {
    bytes: Arc<Semaphore>,
    /// The budget's size: a record larger than the whole budget takes all of it, so
    /// that it waits for the lane to empty rather than forever.
    capacity: u32,
    /// `esm_gateway_buffer_waits_total`: records that waited for budget.
    waits: Counter,
}

impl Budget {
    /// A budget of `bytes` (at most `u32::MAX`, as validated at load).
    pub fn new(bytes: usize, waits: Counter) -> Budget {
        let capacity = u32::try_from(bytes).unwrap_or(u32::MAX).max(1);
        Budget {
            bytes: Arc::new(Semaphore::new(capacity as usize)),
            capacity,
            waits,
        }
    }

    /// Waits until the lane has room for `weight` more bytes, and holds them.
    pub async fn acquire(&self, weight: usize) -> Hold {
        let n = u32::try_from(weight)
            .unwrap_or(u32::MAX)
            .clamp(1, self.capacity);
        let permit = match self.bytes.clone().try_acquire_many_owned(n) {
            Ok(p) => p,
            Err(_) => {
                self.waits.increment(1);
                self.bytes
                    .clone()
                    .acquire_many_owned(n)
                    .await
                    .expect("a budget's semaphore is never closed")
            }
        };
        Hold::of(permit)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[tokio::test(start_paused = true)]
    async fn a_full_budget_waits_until_a_hold_is_dropped() {
        let budget = Budget::new(100, metrics::Counter::noop());
        let a = budget.acquire(60).await;
        let _b = budget.acquire(40).await;
        let waiting = tokio::time::timeout(Duration::from_secs(1), budget.acquire(1)).await;
        assert!(waiting.is_err(), "no room left");
        drop(a);
        let _c = budget.acquire(60).await;
    }

    #[tokio::test(start_paused = true)]
    async fn a_record_larger_than_the_budget_takes_all_of_it() {
        let budget = Budget::new(100, metrics::Counter::noop());
        let big = budget.acquire(1_000).await;
        let waiting = tokio::time::timeout(Duration::from_secs(1), budget.acquire(1)).await;
        assert!(waiting.is_err(), "the big record holds the whole budget");
        drop(big);
        let _again = budget.acquire(1_000).await;
    }
}
