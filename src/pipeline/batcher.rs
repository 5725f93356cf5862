//! Groups records into batches: a batch closes at the first of its size, its byte cap,
//! or its window (counted from its first record), as AWS closes them.

use std::time::Duration;

use tokio::sync::mpsc;
use tokio::sync::mpsc::error::TryRecvError;
use tokio::time::{Instant, sleep_until};

use crate::record::Record;

/// When a batch closes: AWS's size, window and byte cap.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BatchLimits {
    pub size: usize,
    pub window: Duration,
    /// What the records may add to the event: the cap less the envelope.
    pub max_bytes: usize,
    /// What a lane may hold (see `pipeline::budget`): `batch.buffer_bytes`.
    pub buffer_bytes: usize,
}

pub struct Batcher {
    rx: mpsc::Receiver<Record>,
    /// A record that would have overflowed the previous batch's byte cap.
    carry: Option<Record>,
    size: usize,
    window: Duration,
    max_bytes: usize,
}

impl Batcher {
    pub fn new(rx: mpsc::Receiver<Record>, limits: BatchLimits) -> Self {
        Batcher {
            rx,
            carry: None,
            size: limits.size,
            window: limits.window,
            max_bytes: limits.max_bytes,
        }
    }

    /// The next batch, or None once the source is closed and drained. A record larger
    /// than the byte cap alone makes a batch of one (the invoker parks it).
    pub async fn next(&mut self) -> Option<Vec<Record>> {
        let first = match self.carry.take() {
            Some(r) => r,
            None => self.rx.recv().await?,
        };
        // One timer per batch, armed when the channel first runs dry.
        let window = sleep_until(Instant::now() + self.window);
        tokio::pin!(window);
        let mut bytes = first.weight();
        let mut batch = Vec::with_capacity(self.size.min(1024));
        batch.push(first);
        while batch.len() < self.size {
            let record = match self.rx.try_recv() {
                Ok(r) => r,
                Err(TryRecvError::Disconnected) => break,
                Err(TryRecvError::Empty) if self.window.is_zero() => break,
                Err(TryRecvError::Empty) => tokio::select! {
                    r = self.rx.recv() => match r {
                        Some(r) => r,
                        None => break,
                    },
                    () = &mut window => break,
                },
            };
            if bytes + record.weight() > self.max_bytes {
                self.carry = Some(record);
                break;
            }
            bytes += record.weight();
            batch.push(record);
        }
        Some(batch)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::record::{Ack, Hold};
    use proptest::prelude::*;

    fn lim(size: usize, window: Duration, max_bytes: usize) -> BatchLimits {
        BatchLimits {
            size,
            window,
            max_bytes,
            buffer_bytes: 1 << 20,
        }
    }

    fn rec(i: u64, len: usize) -> Record {
        Record {
            fragment: "x".repeat(len),
            id: None,
            key: None,
            position: i,
            received: Instant::now(),
            received_at: std::time::SystemTime::now(),
            trace: None,
            ack: Ack::NONE,
            hold: Hold::default(),
        }
    }

    #[tokio::test(start_paused = true)]
    async fn closes_on_size_then_on_window() {
        let (tx, rx) = mpsc::channel(100);
        let mut b = Batcher::new(rx, lim(3, Duration::from_millis(500), 1 << 20));
        for i in 0..4 {
            tx.send(rec(i, 1)).await.unwrap();
        }
        let first = b.next().await.unwrap();
        assert_eq!(
            first.iter().map(|r| r.position).collect::<Vec<_>>(),
            [0, 1, 2]
        );
        let start = Instant::now();
        let second = b.next().await.unwrap();
        assert_eq!(second.len(), 1);
        assert_eq!(start.elapsed(), Duration::from_millis(500));
    }

    #[tokio::test(start_paused = true)]
    async fn a_record_arriving_inside_the_window_joins_the_batch() {
        let (tx, rx) = mpsc::channel(100);
        let mut b = Batcher::new(rx, lim(10, Duration::from_secs(1), 1 << 20));
        tx.send(rec(0, 1)).await.unwrap();
        let late = tx.clone();
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(300)).await;
            late.send(rec(1, 1)).await.unwrap();
        });
        let batch = b.next().await.unwrap();
        assert_eq!(batch.len(), 2);
    }

    #[tokio::test(start_paused = true)]
    async fn zero_window_takes_only_what_is_ready() {
        let (tx, rx) = mpsc::channel(100);
        let mut b = Batcher::new(rx, lim(10, Duration::ZERO, 1 << 20));
        tx.send(rec(0, 1)).await.unwrap();
        tx.send(rec(1, 1)).await.unwrap();
        assert_eq!(b.next().await.unwrap().len(), 2);
        drop(tx);
        assert!(b.next().await.is_none());
    }

    #[tokio::test(start_paused = true)]
    async fn byte_cap_carries_the_overflowing_record() {
        let (tx, rx) = mpsc::channel(100);
        let mut b = Batcher::new(rx, lim(10, Duration::ZERO, 25));
        for (i, len) in [(0, 10), (1, 10), (2, 10), (3, 100)] {
            tx.send(rec(i, len)).await.unwrap();
        }
        drop(tx);
        assert_eq!(b.next().await.unwrap().len(), 2);
        assert_eq!(b.next().await.unwrap()[0].position, 2);
        let big = b.next().await.unwrap();
        assert_eq!((big.len(), big[0].position), (1, 3));
        assert!(b.next().await.is_none());
    }

    proptest! {
        /// Whatever the sizes, batches keep every record exactly once, in order, within
        /// the size cap, and within the byte cap unless a lone record exceeds it.
        #[test]
        fn batches_partition_the_stream(
            lens in proptest::collection::vec(1usize..200, 0..300),
            size in 1usize..50,
            cap in 50usize..2000,
        ) {
            let rt = tokio::runtime::Builder::new_current_thread().enable_time().start_paused(true).build().unwrap();
            rt.block_on(async {
                let (tx, rx) = mpsc::channel(lens.len().max(1));
                for (i, &l) in lens.iter().enumerate() {
                    tx.send(rec(i as u64, l)).await.unwrap();
                }
                drop(tx);
                let mut b = Batcher::new(rx, lim(size, Duration::from_millis(10), cap));
                let mut seen = Vec::new();
                while let Some(batch) = b.next().await {
                    prop_assert!(!batch.is_empty() && batch.len() <= size);
                    let bytes: usize = batch.iter().map(Record::weight).sum();
                    prop_assert!(bytes <= cap || batch.len() == 1);
                    seen.extend(batch.iter().map(|r| r.position));
                }
                prop_assert_eq!(seen, (0..lens.len() as u64).collect::<Vec<_>>());
                Ok(())
            })?;
        }
    }
}
