//! The stages between a source and the function: batching (`batcher`) within a lane's
//! byte budget (`budget`), filtering (`filter`), delivery with retries and bisection
//! (`retry`) reading the function's answer (`response`), failure records and parking
//! (`park`), and Kafka's committable positions (`offsets`). The pipeline knows a source
//! only by its event shape (`invoke::event::Shape`) and what its exhausted records
//! become (`retry::Exhausted`). Sources own ordering: each runs at most one
//! batch per ordering key through `Deliverer::deliver` at a time.

pub mod batcher;
pub mod budget;
pub mod filter;
pub mod offsets;
pub mod park;
pub mod policy;
pub mod response;
pub mod retry;
