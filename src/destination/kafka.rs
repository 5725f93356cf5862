//! The Kafka topic destination: a produce keyed by the original record's key, confirmed
//! by its delivery report (acks from all in-sync replicas: `acks = all` is set last, and
//! configuration refuses a weaker one in `properties`). A record larger than the
//! producer or the broker takes is refused for good, and kept in the payload directory.

use serde::Deserialize;
use std::path::PathBuf;
use std::time::Duration;

use rdkafka::ClientConfig;
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::producer::{FutureProducer, FutureRecord};

use super::DestinationError;

/// `on_failure = { type = "kafka", bootstrap_servers = "…", topic = "…" }`
#[derive(Debug, Clone, PartialEq, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Config {
    pub bootstrap_servers: String,
    pub topic: String,
    /// Extra librdkafka producer properties (`${ENV}` is expanded); `acks` other than
    /// `all` is refused. Default: none.
    #[serde(default)]
    pub properties: std::collections::BTreeMap<String, crate::env::Expanded>,
    /// Where a failure record the topic refuses for good (larger than the producer's
    /// `message.max.bytes` or the topic's `max.message.bytes`) is kept whole.
    /// Default: /var/lib/esm-gateway/payloads.
    pub payload_dir: Option<PathBuf>,
}

impl Config {
    pub fn problems(&self, mapping: &str, out: &mut Vec<String>) {
        for key in ["acks", "request.required.acks"] {
            if let Some(v) = self.properties.get(key)
                && !matches!(v.0.as_str(), "all" | "-1")
            {
                out.push(format!(
                    "mapping {mapping:?}: on_failure.properties.\"{key}\" = {:?} would let the broker confirm a failure record \
                     before every in-sync replica has it; the gateway always produces with acks = all, so remove it",
                    v.0
                ));
            }
        }
    }
}

pub struct KafkaDestination {
    producer: Result<FutureProducer, KafkaError>,
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
    pub fn new(c: &Config) -> Self {
        let mut conf = ClientConfig::new();
        conf.set("bootstrap.servers", &c.bootstrap_servers)
            .set("message.timeout.ms", "30000");
        for (k, v) in &c.properties {
            conf.set(k, &v.0);
        }
        // After the properties: a parked record must be on every in-sync replica.
        conf.set("acks", "all");
        KafkaDestination {
            producer: conf.create(),
            topic: c.topic.clone(),
            payload_dir: c
                .payload_dir
                .clone()
                .unwrap_or_else(super::default_payload_dir),
        }
    }

    pub async fn write(&self, record: &[u8], key: Option<&[u8]>) -> Result<(), DestinationError> {
        let kind = "Kafka topic";
        let error = |message: String| DestinationError::Service {
            kind,
            target: self.topic.clone(),
            message,
        };
        let producer = self.producer.as_ref().map_err(|e| error(e.to_string()))?;
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
