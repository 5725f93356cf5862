//! Sources: where records come from. Each turns its broker's messages into
//! [`Record`](crate::record::Record)s, runs them through the pipeline in its ordering
//! unit (queue, partition, message group) and acknowledges what the pipeline resolved.
//! Schedules are the exception: they make their records, one per fire.

pub mod kafka;
pub mod rabbitmq;
pub mod schedule;
pub mod sqs;
pub mod sqs_visibility;

use std::time::Duration;

use tokio_util::sync::CancellationToken;

/// How long a source waits before reconnecting after `failures` consecutive failures:
/// 0.5 s, doubling, at most 30 s.
pub fn reconnect_delay(failures: u32) -> Duration {
    Duration::from_millis(250 * (1u64 << failures.clamp(1, 7))).min(Duration::from_secs(30))
}

/// Sleeps for `delay`, or until shutdown if that comes first.
pub async fn pause(delay: Duration, shutdown: &CancellationToken) {
    tokio::select! {
        () = tokio::time::sleep(delay) => {}
        () = shutdown.cancelled() => {}
    }
}
