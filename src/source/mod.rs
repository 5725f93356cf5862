//! Sources: where records come from. Each turns its broker's messages into
//! [`Record`](crate::record::Record)s, runs them through the pipeline in its ordering
//! unit (queue, partition, message group) and acknowledges what the pipeline resolved.
//! Schedules are the exception: they make their records, one per fire.

pub mod kafka;
pub mod rabbitmq;
pub mod schedule;
