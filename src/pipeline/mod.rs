//! The stages between a source and the function: batching (`batcher`), filtering
//! (`filter`), delivery with retries, bisection and parking (`retry`), and Kafka's
//! committable positions (`offsets`). Sources own ordering: each runs at most one
//! batch per ordering key through `Deliverer::deliver` at a time.

pub mod batcher;
pub mod filter;
pub mod offsets;
pub mod retry;
