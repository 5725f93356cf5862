//! The Kafka topic destination: a produce keyed by the original record's key, confirmed
//! by its delivery report (acks from all in-sync replicas).

use std::time::Duration;

use rdkafka::ClientConfig;
use rdkafka::producer::{FutureProducer, FutureRecord};

use super::DestinationError;
use crate::config;

pub struct KafkaDestination {
    producer: Result<FutureProducer, String>,
    topic: String,
}

impl std::fmt::Debug for KafkaDestination {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KafkaDestination")
            .field("topic", &self.topic)
            .finish()
    }
}

impl KafkaDestination {
    pub fn new(c: &config::KafkaDestination) -> Self {
        let mut conf = ClientConfig::new();
        conf.set("bootstrap.servers", &c.bootstrap_servers)
            .set("acks", "all")
            .set("message.timeout.ms", "30000");
        for (k, v) in &c.properties {
            conf.set(k, &v.0);
        }
        KafkaDestination {
            producer: conf.create().map_err(|e| e.to_string()),
            topic: c.topic.clone(),
        }
    }

    pub async fn write(&self, record: &[u8], key: Option<&str>) -> Result<(), DestinationError> {
        let error = |message: String| DestinationError::Service {
            kind: "Kafka topic",
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
            .map_err(|(e, _)| error(e.to_string()))
    }
}
