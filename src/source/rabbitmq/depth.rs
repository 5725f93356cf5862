//! The RabbitMQ queue's depth: ready messages, asked for with a passive `queue.declare`
//! on the session's channel, often while messages move and rarely while the queue idles.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use lapin::options::QueueDeclareOptions;
use lapin::types::FieldTable;

/// A session's deliveries and acks so far, for the depth poll.
#[derive(Default)]
pub(super) struct Traffic {
    pub(super) delivered: AtomicU64,
    pub(super) acked: AtomicU64,
}

/// How often the queue's depth is asked for while messages move.
const DEPTH_INTERVAL: Duration = Duration::from_secs(10);
/// How often it is asked for once the queue read empty with every delivery acked, and
/// nothing has been delivered since: a consumer with an empty prefetch is sent every
/// ready message at once, so such a queue stays empty until a delivery says otherwise.
/// A thousand idle mappings then cost 17 passive declares a second, not 100.
const IDLE_DEPTH_INTERVAL: Duration = Duration::from_secs(60);

/// Reports the queue's ready messages (a passive `queue.declare`'s message count) on the
/// session's channel until the session ends: at once, then every [`DEPTH_INTERVAL`], or
/// every [`IDLE_DEPTH_INTERVAL`] while the last count was 0 with nothing unacked and
/// nothing has been delivered since. The ticks fall on one grid for the whole
/// process, so that many mappings wake and ask together (a few wake-ups, their requests
/// in a few writes) rather than each at its own moment. The count excludes the messages
/// delivered to consumers and not yet acknowledged.
pub(super) async fn poll_depth(
    channel: lapin::Channel,
    queue: String,
    status: Arc<crate::status::MappingStatus>,
    traffic: Arc<Traffic>,
) {
    static GRID: std::sync::OnceLock<tokio::time::Instant> = std::sync::OnceLock::new();
    let grid = *GRID.get_or_init(tokio::time::Instant::now);
    let now = tokio::time::Instant::now();
    let since = now.duration_since(grid).as_nanos();
    let period = DEPTH_INTERVAL.as_nanos();
    let next = grid + Duration::from_nanos(((since / period + 1) * period) as u64);
    let mut tick = tokio::time::interval_at(next, DEPTH_INTERVAL);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    let mut schedule = DepthSchedule::default();
    let mut now = now;
    loop {
        // Read in this order, `acked >= seen` says every delivery so far was acked.
        let seen = traffic.delivered.load(Ordering::Relaxed);
        let settled = traffic.acked.load(Ordering::Relaxed) >= seen;
        if schedule.due(seen, now) {
            let passive = QueueDeclareOptions {
                passive: true,
                ..Default::default()
            };
            match channel
                .queue_declare(queue.as_str().into(), passive, FieldTable::default())
                .await
            {
                Ok(q) => {
                    let depth = q.message_count();
                    status.depth(depth.into());
                    schedule.polled(depth, seen, settled, now);
                }
                // The channel is gone (the session is ending and will report why).
                Err(e) => {
                    tracing::debug!(mapping = %status.name, error = %e, "cannot read the queue depth");
                    return;
                }
            }
        }
        now = tick.tick().await;
    }
}

/// Whether the depth poll's tick should ask the broker (see [`poll_depth`]).
#[derive(Default)]
struct DepthSchedule {
    /// The deliveries seen, and when, at the last poll that read an empty queue with
    /// every delivery acked.
    idle_since: Option<(u64, tokio::time::Instant)>,
}

impl DepthSchedule {
    fn due(&self, delivered: u64, now: tokio::time::Instant) -> bool {
        !self.idle_since.is_some_and(|(seen, polled)| {
            seen == delivered && now.duration_since(polled) < IDLE_DEPTH_INTERVAL
        })
    }

    fn polled(&mut self, depth: u32, delivered: u64, settled: bool, now: tokio::time::Instant) {
        self.idle_since = (depth == 0 && settled).then_some((delivered, now));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_idle_queue_is_asked_for_its_depth_less_often() {
        let start = tokio::time::Instant::now();
        let at = |secs| start + Duration::from_secs(secs);
        let mut s = DepthSchedule::default();
        assert!(s.due(0, at(0)), "the first tick asks");
        s.polled(0, 0, true, at(0));
        assert!(
            !s.due(0, at(10)),
            "empty, nothing unacked, nothing delivered since"
        );
        assert!(!s.due(0, at(50)));
        assert!(
            s.due(0, at(60)),
            "an idle queue is still asked every minute"
        );
        assert!(s.due(1, at(10)), "a delivery since the empty read");
        s.polled(0, 1, false, at(10));
        assert!(
            s.due(1, at(20)),
            "a delivery not yet acked: the prefetch may be full"
        );
        s.polled(3, 1, true, at(20));
        assert!(s.due(1, at(30)), "messages were waiting");
    }
}
