//! The stages between a source and the function: batching (`batcher`) and delivery with
//! retries, bisection and parking (`retry`). Sources own ordering: each runs at most one
//! batch per ordering key through `Deliverer::deliver` at a time.

pub mod batcher;
pub mod offsets;
pub mod retry;
