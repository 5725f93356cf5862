//! Calling Lambda: the SDK call and its error classes (`lambda`), and the AWS payload
//! shapes the function receives (`event`).

pub mod event;
pub mod lambda;
