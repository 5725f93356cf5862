//! The RabbitMQ exchange destination: persistent, mandatory publishes on a confirm
//! channel. A write succeeds only on the broker's ack of a routed message; a nack, an
//! unroutable return or a dropped connection is an error (and the next write reconnects).

use std::path::PathBuf;

use lapin::BasicProperties;
use lapin::options::{BasicPublishOptions, ConfirmSelectOptions};
use serde::Deserialize;
use tokio::sync::Mutex;

use super::DestinationError;
use crate::amqp::{Lease, Pool};
use crate::env::SecretUrl;

/// `on_failure = { type = "rabbitmq", … }`
#[derive(Debug, Clone, PartialEq, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// Broker URL; `${ENV}` is expanded.
    pub url: SecretUrl,
    /// Exchange to publish to ("" is the default exchange).
    pub exchange: String,
    /// Routing key. Default: the mapping's name.
    pub routing_key: Option<String>,
    /// PEM CA file for amqps. Default: the platform's trust store.
    pub ca_file: Option<PathBuf>,
}

impl Config {
    pub fn problems(&self, mapping: &str, out: &mut Vec<String>) {
        if let Err(e) = self.url.amqp() {
            out.push(format!(
                "mapping {mapping:?}: on_failure.url is not an AMQP URL: {e}"
            ));
        }
    }
}

#[derive(Debug)]
pub struct RabbitDestination {
    url: SecretUrl,
    exchange: String,
    routing_key: String,
    ca_file: Option<std::path::PathBuf>,
    /// A confirm channel on a connection shared with the broker's other users.
    channel: Mutex<Option<Lease>>,
    pool: Pool,
}

impl RabbitDestination {
    pub fn new(c: &Config, mapping: &str, pool: &Pool) -> Self {
        RabbitDestination {
            url: c.url.clone(),
            exchange: c.exchange.clone(),
            routing_key: c.routing_key.clone().unwrap_or_else(|| mapping.to_owned()),
            ca_file: c.ca_file.clone(),
            channel: Mutex::new(None),
            pool: pool.clone(),
        }
    }

    fn error(&self, message: impl ToString) -> DestinationError {
        DestinationError::Rabbit {
            url: self.url.to_string(),
            exchange: self.exchange.clone(),
            message: message.to_string(),
        }
    }

    pub async fn write(&self, record: &[u8]) -> Result<(), DestinationError> {
        let mut guard = self.channel.lock().await;
        if guard
            .as_ref()
            .is_none_or(|lease| !lease.channel.status().connected())
        {
            // The old lease (if any) is given back before a new one is taken.
            *guard = None;
            let lease = self
                .pool
                .channel(&self.url, self.ca_file.as_deref(), "on-failure")
                .await
                .map_err(|e| self.error(e))?;
            lease
                .channel
                .confirm_select(ConfirmSelectOptions::default())
                .await
                .map_err(|e| self.error(e))?;
            *guard = Some(lease);
        }
        let channel = &guard.as_ref().expect("connected above").channel;
        let result = async {
            let confirm = channel
                .basic_publish(
                    self.exchange.as_str().into(),
                    self.routing_key.as_str().into(),
                    BasicPublishOptions {
                        mandatory: true,
                        ..Default::default()
                    },
                    record,
                    BasicProperties::default()
                        .with_delivery_mode(2)
                        .with_content_type("application/json".into()),
                )
                .await
                .map_err(|e| e.to_string())?
                .await
                .map_err(|e| e.to_string())?;
            if !confirm.is_ack() {
                return Err("the broker nacked the publish".to_owned());
            }
            if confirm.take_message().is_some() {
                return Err(format!(
                    "no queue is bound to the exchange for routing key {:?}; the record was returned",
                    self.routing_key
                ));
            }
            Ok(())
        }
        .await;
        result.map_err(|m| {
            *guard = None;
            self.error(m)
        })
    }
}
