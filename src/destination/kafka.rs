//! The Kafka topic destination: a produce keyed by the original record's key, confirmed
//! by its delivery report (acks from all in-sync replicas: `acks = all` is set last, and
//! configuration refuses a weaker one in `properties`). A record larger than the
//! producer or the broker takes is refused for good, and kept in the payload directory.

use std::path::PathBuf;
use std::time::Duration;

use rdkafka::ClientConfig;
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::producer::{FutureProducer, FutureRecord};

use super::DestinationError;
use crate::config;

pub struct KafkaDestination {
    producer: Result<FutureProducer, String>,
    topic: String,
    pub(super) payload_dir: PathBuf,
}

impl std::fmt::Debug for KafkaDestination {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KafkaDestination")
            .field("topic", &self.topic)
            .finish()
    }
}

/// Produce errors that the same record would get again.
fn permanent(e: &KafkaError) -> bool {
    matches!(
        e.rdkafka_error_code(),
        Some(
            RDKafkaErrorCode::MessageSizeTooLarge
                | RDKafkaErrorCode::InvalidMessageSize
                | RDKafkaErrorCode::InvalidMessage
                | RDKafkaErrorCode::InvalidRecord
        )
    )
}

impl KafkaDestination {
    pub fn new(c: &config::KafkaDestination) -> Self {
        let mut conf = ClientConfig::new();
        conf.set("bootstrap.servers", &c.bootstrap_servers)
            .set("message.timeout.ms", "30000");
        for (k, v) in &c.properties {
            conf.set(k, &v.0);
        }
        // After the properties: a parked record must be on every in-sync replica.
        conf.set("acks", "all");
        KafkaDestination {
            producer: conf.create().map_err(|e| e.to_string()),
            topic: c.topic.clone(),
            payload_dir: c
                .payload_dir
                .clone()
                .unwrap_or_else(super::default_payload_dir),
        }
    }

    pub async fn write(&self, record: &[u8], key: Option<&str>) -> Result<(), DestinationError> {
        let kind = "Kafka topic";
        let error = |message: String| DestinationError::Service {
            kind,
            target: self.topic.clone(),
            message,
        };
        let producer = self.producer.as_ref().map_err(|e| error(e.clone()))?;
        let mut r = FutureRecord::to(&self.topic).payload(record);
        if let Some(k) = key {
            r = r.key(k);
        }
        producer
            .send(r, Duration::from_secs(30))
            .await
            .map(|_| ())
            .map_err(|(e, _)| {
                if permanent(&e) {
                    DestinationError::Rejected {
                        kind,
                        target: self.topic.clone(),
                        message: e.to_string(),
                        kept: None,
                    }
                } else {
                    error(e.to_string())
                }
            })
    }
}
