//! Field types that check their own range while being deserialized, so that a bad value
//! is reported by the TOML parser with its line and column.

use std::time::Duration;

use serde::{Deserialize, Deserializer};

/// Lambda's synchronous invoke payload limit: 6 MB.
pub const MAX_PAYLOAD: usize = 6 * 1024 * 1024;

/// Records per batch, 1–10,000.
#[derive(Debug, Clone, Copy, PartialEq, Eq, schemars::JsonSchema)]
pub struct BatchSize(#[schemars(range(min = 1, max = 10_000))] pub u32);

impl<'de> Deserialize<'de> for BatchSize {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let n = i64::deserialize(d)?;
        if (1..=10_000).contains(&n) {
            Ok(BatchSize(n as u32))
        } else {
            Err(serde::de::Error::custom(format!(
                "batch size must be between 1 and 10000, got {n}"
            )))
        }
    }
}

/// Batching window, 0–300 s.
#[derive(Debug, Clone, Copy, PartialEq, Eq, schemars::JsonSchema)]
pub struct BatchWindow(#[schemars(with = "String")] pub Duration);

impl<'de> Deserialize<'de> for BatchWindow {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let w = duration(d)?;
        if w <= Duration::from_secs(300) {
            Ok(BatchWindow(w))
        } else {
            Err(serde::de::Error::custom(format!(
                "batching window must be at most 300s, got {}",
                humantime::format_duration(w)
            )))
        }
    }
}

/// Batch byte cap, 1 KiB–6 MB.
#[derive(Debug, Clone, Copy, PartialEq, Eq, schemars::JsonSchema)]
pub struct ByteSize(pub usize);

impl<'de> Deserialize<'de> for ByteSize {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let n = i64::deserialize(d)?;
        if (1024..=MAX_PAYLOAD as i64).contains(&n) {
            Ok(ByteSize(n as usize))
        } else {
            Err(serde::de::Error::custom(format!(
                "max_bytes must be between 1024 and {MAX_PAYLOAD} (6 MB, Lambda's payload limit), got {n}"
            )))
        }
    }
}

/// A lane's buffer budget in bytes, 1 MiB–4 GiB (less one byte).
#[derive(Debug, Clone, Copy, PartialEq, Eq, schemars::JsonSchema)]
pub struct BufferBytes(pub usize);

impl<'de> Deserialize<'de> for BufferBytes {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let n = i64::deserialize(d)?;
        if (1 << 20..=i64::from(u32::MAX)).contains(&n) {
            Ok(BufferBytes(n as usize))
        } else {
            Err(serde::de::Error::custom(format!(
                "buffer_bytes must be between 1048576 (1 MiB) and {} (4 GiB less one byte), got {n}",
                u32::MAX
            )))
        }
    }
}

/// AWS's MaximumRetryAttempts: -1 (forever) or 0–10,000.
#[derive(Debug, Clone, Copy, PartialEq, Eq, schemars::JsonSchema)]
pub struct RetryAttempts(#[schemars(range(min = -1, max = 10_000))] pub i32);

impl<'de> Deserialize<'de> for RetryAttempts {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let n = i64::deserialize(d)?;
        if n == -1 || (0..=10_000).contains(&n) {
            Ok(RetryAttempts(n as i32))
        } else {
            Err(serde::de::Error::custom(format!(
                "max_attempts must be -1 (forever) or between 0 and 10000, got {n}"
            )))
        }
    }
}

/// AWS's MaximumRecordAgeInSeconds: 60 s–604,800 s (leave it out for no limit).
#[derive(Debug, Clone, Copy, PartialEq, Eq, schemars::JsonSchema)]
pub struct MaxRecordAge(#[schemars(with = "String")] pub Duration);

impl<'de> Deserialize<'de> for MaxRecordAge {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let a = duration(d)?;
        if (Duration::from_secs(60)..=Duration::from_secs(604_800)).contains(&a) {
            Ok(MaxRecordAge(a))
        } else {
            Err(serde::de::Error::custom(format!(
                "max_record_age must be between 60s and 7days, got {}",
                humantime::format_duration(a)
            )))
        }
    }
}

fn duration<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
    let s = String::deserialize(d)?;
    humantime::parse_duration(&s).map_err(|e| {
        serde::de::Error::custom(format!(
            "invalid duration {s:?} ({e}); write it like \"500ms\", \"30s\" or \"5m\""
        ))
    })
}
