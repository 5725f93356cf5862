//! The stages between a source and the function: batching (`batcher`) within a lane's
//! byte budget (`budget`), filtering
//! (`filter`), delivery with retries, bisection and parking (`retry`), and Kafka's
//! committable positions (`offsets`). Sources own ordering: each runs at most one
//! batch per ordering key through `Deliverer::deliver` at a time.

pub mod batcher;
pub mod budget;
pub mod filter;
pub mod offsets;
pub mod retry;
