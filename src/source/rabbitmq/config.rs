//! A RabbitMQ source's configuration: its TOML table and its checks.

use std::path::PathBuf;

use serde::Deserialize;

use super::event::RabbitShape;
use crate::env::SecretUrl;
use crate::source::Facts;

/// `[mapping.source]` with `type = "rabbitmq"`.
#[derive(Debug, Clone, PartialEq, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct RabbitSource {
    /// `amqp://user:pass@host:5672/vhost` or `amqps://…`; `${ENV}` is expanded.
    pub url: SecretUrl,
    /// Queue to consume from.
    pub queue: String,
    /// basic.qos prefetch count. Default: twice the batch size, at least 100, at most 65,535.
    pub prefetch: Option<u16>,
    /// Declare the queue (durable) instead of requiring it to exist. Default: false.
    #[serde(default)]
    pub declare: bool,
    /// With `declare`, declare it with `x-single-active-consumer` so that several gateway
    /// replicas keep the queue's order (one consumes, the others stand by). Default: false.
    #[serde(default)]
    pub single_active_consumer: bool,
    /// PEM file with the CA(s) that sign the broker's certificate (amqps). Default: the
    /// platform's trust store.
    pub ca_file: Option<PathBuf>,
    /// The event's `eventSourceArn`, e.g. the real Amazon MQ broker ARN
    /// (`arn:aws:mq:<region>:<account>:broker:<name>:<id>`). Default: synthetic,
    /// `arn:aws:mq:<region>:<account>:broker:<host>:<port>` from the URL.
    pub event_source_arn: Option<String>,
}

/// AWS's defaults for Amazon MQ mappings.
pub const DEFAULTS: crate::source::Defaults = crate::source::STREAM_DEFAULTS;

impl RabbitSource {
    pub fn problems(&self, facts: &Facts, out: &mut Vec<String>) {
        let name = facts.mapping;
        if self.queue.is_empty() {
            out.push(format!("mapping {name:?}: source.queue is empty"));
        }
        if let Some(p) = self.prefetch
            && (p as usize) < facts.batch_size
        {
            out.push(format!(
                "mapping {name:?}: source.prefetch ({p}) is smaller than batch.size ({}); a batch could never fill",
                facts.batch_size
            ));
        }
        if self.single_active_consumer && !self.declare {
            out.push(format!(
                "mapping {name:?}: source.single_active_consumer needs source.declare = true \
                 (it is a property of the queue, set when it is declared)"
            ));
        }
        if let Err(e) = self.url.amqp() {
            out.push(format!(
                "mapping {name:?}: source.url is not an AMQP URL: {e}"
            ));
        }
    }

    /// The `rmqMessagesByQueue` vhost and the event's `eventSourceArn`: the configured
    /// one, else a synthetic broker ARN built from the URL's host and port.
    pub fn vhost_and_arn(&self, region: &str, account: &str) -> (String, String) {
        let uri = self.url.amqp().ok();
        let vhost = uri
            .as_ref()
            .map_or_else(|| "/".to_owned(), |u| u.vhost.clone());
        let arn = self.event_source_arn.clone().unwrap_or_else(|| {
            let host = uri
                .as_ref()
                .map_or("unknown", |u| u.authority.host.as_str());
            let port = uri.as_ref().map_or(5672, |u| u.authority.port);
            format!("arn:aws:mq:{region}:{account}:broker:{host}:{port}")
        });
        (vhost, arn)
    }

    pub fn shape(&self, region: &str, account: &str) -> RabbitShape {
        let (vhost, arn) = self.vhost_and_arn(region, account);
        RabbitShape::new(&arn, &self.queue, &vhost)
    }
}
