//! Between AWS's fields and the gateway's own mapping config: a [`Spec`] becomes the
//! [`Mapping`] the TOML file would have written (built as a TOML table and parsed by the
//! same deserializers, so every range check is the file's), and a file's mapping is
//! described in AWS's fields for listing.

use toml::{Table, Value};

use super::wire::{Kind, SourceAccess, Spec};
use crate::config::{BrokerConfig, Config, DestinationConfig, Mapping, SourceConfig};

/// How a request names a TOML `[[destination]]` where AWS takes a destination ARN:
/// `esm-gateway:destination:<name>`.
pub const DESTINATION_PREFIX: &str = "esm-gateway:destination:";

/// What a Spec's conversion needs of the configuration.
pub struct Context<'a> {
    pub config: &'a Config,
    pub region: &'a str,
    pub account: &'a str,
}

impl Context<'_> {
    /// The URL of the queue an SQS ARN names: on the configured endpoint (an emulator)
    /// or AWS's regional one.
    pub(super) fn queue_url(&self, arn: &str) -> Result<String, String> {
        match arn.split(':').collect::<Vec<_>>()[..] {
            ["arn", _, "sqs", region, account, name] if !name.is_empty() => {
                Ok(match &self.config.aws.endpoint_url {
                    Some(e) => format!("{}/{account}/{name}", e.trim_end_matches('/')),
                    None => format!("https://sqs.{region}.amazonaws.com/{account}/{name}"),
                })
            }
            _ => Err(format!("{arn} is not an SQS queue ARN")),
        }
    }
}

/// The kind of source a Spec names.
pub fn kind(spec: &Spec) -> Kind {
    if spec.self_managed_event_source.is_some() {
        return Kind::Kafka;
    }
    match spec
        .event_source_arn
        .as_deref()
        .map(|a| a.split(':').nth(2))
    {
        Some(Some("sqs")) => Kind::Sqs,
        Some(Some("mq")) => Kind::Mq,
        _ => Kind::Other,
    }
}

/// A config value from outside the file: `${` would be expanded from the gateway's
/// environment, so it is escaped (`$${`).
fn text(s: &str) -> Value {
    Value::String(s.replace("${", "$${"))
}

fn access<'s>(spec: &'s Spec, kind: &str) -> Option<&'s SourceAccess> {
    spec.source_access_configurations
        .iter()
        .flatten()
        .find(|a| a.kind == kind)
}

/// The mapping named `uuid` that `spec` describes, checked as the file's are.
pub fn mapping(uuid: &str, spec: &Spec, cx: &Context) -> Result<Mapping, String> {
    let mut source = Table::new();
    let mut m = Table::new();
    m.insert("name".into(), text(uuid));
    m.insert("function".into(), text(&spec.function_name));
    m.insert(
        "enabled".into(),
        Value::Boolean(spec.enabled.unwrap_or(true)),
    );
    if let Some(types) = &spec.function_response_types {
        for t in types {
            if t != "ReportBatchItemFailures" {
                return Err(format!("FunctionResponseTypes: unknown type {t:?}"));
            }
        }
        m.insert(
            "report_batch_item_failures".into(),
            Value::Boolean(!types.is_empty()),
        );
    }
    if let Some(f) = &spec.filter_criteria {
        let patterns = f.filters.iter().map(|p| text(&p.pattern)).collect();
        m.insert("filters".into(), Value::Array(patterns));
    }
    let kind = kind(spec);
    match kind {
        Kind::Kafka => kafka(uuid, spec, cx, &mut source)?,
        Kind::Sqs => {
            let arn = spec.event_source_arn.as_deref().unwrap_or_default();
            source.insert("type".into(), text("sqs"));
            source.insert("queue_url".into(), text(&cx.queue_url(arn)?));
            if let Some(c) = spec
                .scaling_config
                .as_ref()
                .and_then(|c| c.maximum_concurrency)
            {
                source.insert("max_concurrency".into(), Value::Integer(c.into()));
            }
        }
        Kind::Mq => mq(spec, cx, &mut source)?,
        Kind::Other => {
            return Err(
                "give EventSourceArn (an SQS queue or an Amazon MQ broker ARN) or SelfManagedEventSource (Kafka)"
                    .into(),
            );
        }
    }
    if kind != Kind::Kafka
        && (spec.starting_position.is_some() || spec.starting_position_timestamp.is_some())
    {
        return Err("StartingPosition is only supported for Kafka sources".into());
    }
    let mut batch = Table::new();
    if let Some(n) = spec.batch_size {
        batch.insert("size".into(), Value::Integer(n.into()));
    }
    if let Some(w) = spec.maximum_batching_window_in_seconds {
        batch.insert("window".into(), text(&format!("{w}s")));
    }
    let mut retry = Table::new();
    if let Some(n) = spec.maximum_retry_attempts {
        retry.insert("max_attempts".into(), Value::Integer(n.into()));
    }
    // -1 is AWS's "no limit".
    if let Some(a) = spec.maximum_record_age_in_seconds.filter(|a| *a >= 0) {
        retry.insert("max_record_age".into(), text(&format!("{a}s")));
    }
    if let Some(b) = spec.bisect_batch_on_function_error {
        retry.insert("bisect_on_error".into(), Value::Boolean(b));
    }
    let mut named_destination = None;
    if let Some(d) = spec
        .destination_config
        .as_ref()
        .and_then(|d| d.on_failure.as_ref())
        .and_then(|f| f.destination.as_deref())
    {
        match named(d, cx) {
            // Already parsed (and its `${ENV}` expanded) with the file.
            Some(n) => named_destination = Some(n?),
            None => {
                m.insert(
                    "on_failure".into(),
                    Value::Table(destination(d, &source, cx)?),
                );
            }
        }
    }
    m.insert("batch".into(), Value::Table(batch));
    m.insert("retry".into(), Value::Table(retry));
    m.insert("source".into(), Value::Table(source));
    let mut mapping: Mapping = Value::Table(m)
        .try_into()
        .map_err(|e: toml::de::Error| e.message().to_owned())?;
    if named_destination.is_some() {
        mapping.on_failure = named_destination;
    }
    cx.config
        .check_mapping(&mut mapping)
        .map_err(|p| p.join("; ").replace(&format!("mapping {uuid:?}: "), ""))?;
    Ok(mapping)
}

fn kafka(uuid: &str, spec: &Spec, cx: &Context, source: &mut Table) -> Result<(), String> {
    let servers = spec
        .self_managed_event_source
        .as_ref()
        .and_then(|s| s.endpoints.get("KAFKA_BOOTSTRAP_SERVERS"))
        .filter(|s| !s.is_empty())
        .ok_or("SelfManagedEventSource.Endpoints.KAFKA_BOOTSTRAP_SERVERS is required")?;
    source.insert("type".into(), text("kafka"));
    source.insert("bootstrap_servers".into(), text(&servers.join(",")));
    let topics = spec.topics.clone().unwrap_or_default();
    if topics.len() != 1 {
        return Err("Topics must name exactly one topic".into());
    }
    source.insert(
        "topics".into(),
        Value::Array(topics.iter().map(|t| text(t)).collect()),
    );
    // AWS's default consumer group is the mapping's UUID.
    let group = spec
        .self_managed_kafka_event_source_config
        .as_ref()
        .and_then(|c| c.consumer_group_id.clone())
        .unwrap_or_else(|| uuid.to_owned());
    source.insert("group_id".into(), text(&group));
    let position = match spec.starting_position.as_deref() {
        Some("TRIM_HORIZON") => "trim_horizon",
        Some("LATEST") => "latest",
        Some("AT_TIMESTAMP") => "at_timestamp",
        Some(other) => {
            return Err(format!(
                "StartingPosition {other:?} is not TRIM_HORIZON, LATEST or AT_TIMESTAMP"
            ));
        }
        None => return Err("StartingPosition is required for a Kafka source".into()),
    };
    source.insert("starting_position".into(), text(position));
    if let Some(t) = spec.starting_position_timestamp {
        let at = chrono::DateTime::from_timestamp_millis((t * 1000.0) as i64)
            .ok_or("StartingPositionTimestamp is out of range")?;
        source.insert("starting_timestamp".into(), text(&at.to_rfc3339()));
    }
    if let Some(p) = spec.parallelization_factor {
        source.insert("parallelization_factor".into(), Value::Integer(p.into()));
    }
    for a in spec.source_access_configurations.iter().flatten() {
        let mechanism = match a.kind.as_str() {
            "SASL_SCRAM_256_AUTH" => "scram-sha-256",
            "SASL_SCRAM_512_AUTH" => "scram-sha-512",
            "BASIC_AUTH" => "plain",
            other => {
                return Err(format!(
                    "SourceAccessConfigurations {other:?} is not supported for Kafka sources"
                ));
            }
        };
        let (user, password) = secret(cx, &a.uri)?;
        let mut sasl = Table::new();
        sasl.insert("mechanism".into(), text(mechanism));
        sasl.insert("username".into(), text(&user));
        sasl.insert("password".into(), text(&password));
        source.insert("sasl".into(), Value::Table(sasl));
    }
    Ok(())
}

/// An Amazon MQ broker ARN resolved through `[[broker]]`: a RabbitMQ broker (`amqp://`,
/// `amqps://`) or an ActiveMQ one (`stomp://`, `stomp+ssl://`), and the one queue of
/// `Queues`.
fn mq(spec: &Spec, cx: &Context, source: &mut Table) -> Result<(), String> {
    let arn = spec.event_source_arn.as_deref().unwrap_or_default();
    let ["arn", _, "mq", _, _, "broker", name, id] = arn.split(':').collect::<Vec<_>>()[..] else {
        return Err(format!(
            "{arn} is not an Amazon MQ broker ARN (arn:aws:mq:<region>:<account>:broker:<name>:<id>)"
        ));
    };
    let broker = cx
        .config
        .brokers
        .iter()
        .find(|b| b.name == name && b.id.as_deref().is_none_or(|i| i == id))
        .ok_or_else(|| {
            format!("no [[broker]] named {name:?} with id {id:?} in the gateway's configuration")
        })?;
    let queues = spec.queues.clone().unwrap_or_default();
    let [queue] = &queues[..] else {
        return Err("Queues must name exactly one queue".into());
    };
    source.insert("queue".into(), text(queue));
    source.insert("event_source_arn".into(), text(arn));
    if let Some(ca) = &broker.ca_file {
        source.insert("ca_file".into(), text(&ca.display().to_string()));
    }
    if broker.is_activemq() {
        activemq(spec, cx, broker, source)
    } else {
        rabbitmq(spec, cx, broker, source)
    }
}

/// A RabbitMQ broker, with the vhost of VIRTUAL_HOST.
fn rabbitmq(
    spec: &Spec,
    cx: &Context,
    broker: &BrokerConfig,
    source: &mut Table,
) -> Result<(), String> {
    let vhost = access(spec, "VIRTUAL_HOST").map_or("/", |a| a.uri.as_str());
    let mut base = broker.url.expose().trim_end_matches('/').to_owned();
    for a in spec.source_access_configurations.iter().flatten() {
        match a.kind.as_str() {
            "VIRTUAL_HOST" => {}
            "BASIC_AUTH" => {
                let (user, password) = secret(cx, &a.uri)?;
                let Some((scheme, rest)) = base.split_once("://") else {
                    return Err(format!("[[broker]] {:?} has no URL scheme", broker.name));
                };
                // The broker's own credentials, if any, give way to the secret's.
                let host = rest.rsplit_once('@').map_or(rest, |(_, h)| h);
                base = format!(
                    "{scheme}://{}:{}@{host}",
                    super::sigv4::encode(&user, true),
                    super::sigv4::encode(&password, true)
                );
            }
            other => {
                return Err(format!(
                    "SourceAccessConfigurations {other:?} is not supported for RabbitMQ brokers"
                ));
            }
        }
    }
    let url = format!("{base}/{}", super::sigv4::encode(vhost, true));
    source.insert("type".into(), text("rabbitmq"));
    source.insert("url".into(), text(&url));
    Ok(())
}

/// An ActiveMQ broker, over STOMP: AWS's ActiveMQ mappings log in with BASIC_AUTH.
fn activemq(
    spec: &Spec,
    cx: &Context,
    broker: &BrokerConfig,
    source: &mut Table,
) -> Result<(), String> {
    source.insert("type".into(), text("activemq"));
    source.insert("url".into(), text(broker.url.expose()));
    for a in spec.source_access_configurations.iter().flatten() {
        match a.kind.as_str() {
            "BASIC_AUTH" => {
                let (user, password) = secret(cx, &a.uri)?;
                source.insert("username".into(), text(&user));
                source.insert("password".into(), text(&password));
            }
            other => {
                return Err(format!(
                    "SourceAccessConfigurations {other:?} is not supported for ActiveMQ brokers"
                ));
            }
        }
    }
    Ok(())
}

/// The user name and password of the `[[secret]]` a SourceAccessConfigurations URI names.
fn secret(cx: &Context, uri: &str) -> Result<(String, String), String> {
    let s = cx
        .config
        .secrets
        .iter()
        .find(|s| s.is_named_by(uri))
        .ok_or_else(|| format!("no [[secret]] named by {uri:?} in the gateway's configuration"))?;
    let password = s.password()?;
    Ok((s.username.0.clone(), password.expose().to_owned()))
}

/// The `[[destination]]` that `d` names, when it is `esm-gateway:destination:<name>`.
fn named(d: &str, cx: &Context) -> Option<Result<DestinationConfig, String>> {
    let name = d.strip_prefix(DESTINATION_PREFIX)?;
    Some(
        cx.config
            .destinations
            .iter()
            .find(|n| n.name == name)
            .map(|n| n.destination.clone())
            .ok_or_else(|| {
                format!("no [[destination]] named {name:?} in the gateway's configuration")
            }),
    )
}

/// A schedule's `Target.DeadLetterConfig.Arn`: an SQS queue ARN, or a `[[destination]]`
/// as `esm-gateway:destination:<name>`.
pub fn dead_letter_queue(arn: &str, cx: &Context) -> Result<DestinationConfig, String> {
    if let Some(n) = named(arn, cx) {
        return n;
    }
    if arn.split(':').nth(2) != Some("sqs") {
        return Err(format!(
            "{arn:?} is not an SQS queue ARN or {DESTINATION_PREFIX}<name>"
        ));
    }
    let mut t = Table::new();
    t.insert("type".into(), text("sqs"));
    t.insert("queue_url".into(), text(&cx.queue_url(arn)?));
    Value::Table(t)
        .try_into()
        .map_err(|e: toml::de::Error| e.message().to_owned())
}

/// `DestinationConfig.OnFailure.Destination`: an SQS queue or Lambda function ARN, or
/// `kafka://<topic>` on the source's cluster (a `[[destination]]` is resolved by
/// [`named`]).
fn destination(d: &str, source: &Table, cx: &Context) -> Result<Table, String> {
    let mut t = Table::new();
    if let Some(topic) = d.strip_prefix("kafka://") {
        let Some(servers) = source.get("bootstrap_servers") else {
            return Err("a kafka:// destination needs a Kafka source".into());
        };
        t.insert("type".into(), text("kafka"));
        t.insert("bootstrap_servers".into(), servers.clone());
        t.insert("topic".into(), text(topic));
    } else if d.starts_with("arn:") && d.split(':').nth(2) == Some("sqs") {
        t.insert("type".into(), text("sqs"));
        t.insert("queue_url".into(), text(&cx.queue_url(d)?));
    } else if d.starts_with("arn:") && d.split(':').nth(2) == Some("lambda") {
        t.insert("type".into(), text("lambda"));
        t.insert("function".into(), text(d));
    } else {
        return Err(format!(
            "DestinationConfig.OnFailure.Destination {d:?} is not an SQS queue ARN, a Lambda function ARN, kafka://<topic> or {DESTINATION_PREFIX}<name>"
        ));
    }
    Ok(t)
}

/// A file mapping in AWS's fields, for listing.
pub fn describe(m: &Mapping, cx: &Context) -> Spec {
    let mut spec = Spec {
        function_name: m.function.clone(),
        enabled: Some(m.enabled),
        batch_size: Some(m.batch_size() as u32),
        maximum_batching_window_in_seconds: Some(m.batch_window().as_secs() as u32),
        function_response_types: Some(if m.report_batch_item_failures {
            vec!["ReportBatchItemFailures".into()]
        } else {
            Vec::new()
        }),
        ..Spec::default()
    };
    if !m.filters.is_empty() {
        spec.filter_criteria = Some(super::wire::FilterCriteria {
            filters: m
                .filters
                .iter()
                .map(|p| super::wire::FilterPattern { pattern: p.clone() })
                .collect(),
        });
    }
    match &m.source {
        SourceConfig::Sqs(s) => {
            let mut parts = s.queue_url.trim_end_matches('/').rsplit('/');
            let name = parts.next().unwrap_or_default();
            let account = parts.next().unwrap_or(cx.account);
            spec.event_source_arn = Some(format!("arn:aws:sqs:{}:{account}:{name}", cx.region));
        }
        SourceConfig::Kafka(k) => {
            spec.self_managed_event_source = Some(super::wire::SelfManagedEventSource {
                endpoints: [(
                    "KAFKA_BOOTSTRAP_SERVERS".to_owned(),
                    k.bootstrap_servers
                        .split(',')
                        .map(|s| s.trim().to_owned())
                        .collect(),
                )]
                .into(),
            });
            spec.topics = Some(k.topics.clone());
            spec.starting_position = Some(
                match k.starting_position {
                    crate::source::kafka::config::StartingPosition::TrimHorizon => "TRIM_HORIZON",
                    crate::source::kafka::config::StartingPosition::Latest => "LATEST",
                    crate::source::kafka::config::StartingPosition::AtTimestamp => "AT_TIMESTAMP",
                }
                .into(),
            );
            spec.self_managed_kafka_event_source_config =
                Some(super::wire::KafkaEventSourceConfig {
                    consumer_group_id: Some(crate::source::kafka::config::group_id(k, &m.name)),
                });
        }
        SourceConfig::Rabbitmq(r) => {
            let (vhost, arn) = r.vhost_and_arn(cx.region, cx.account);
            spec.event_source_arn = Some(arn);
            spec.queues = Some(vec![r.queue.clone()]);
            spec.source_access_configurations = Some(vec![SourceAccess {
                kind: "VIRTUAL_HOST".into(),
                uri: vhost,
            }]);
        }
        SourceConfig::Activemq(a) => {
            spec.event_source_arn = a.event_source_arn.clone();
            spec.queues = Some(vec![a.queue.clone()]);
        }
        SourceConfig::Schedule(_) => {}
    }
    spec
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::wire::{SelfManagedEventSource, SourceAccess};
    use crate::source::kafka::config::SaslMechanism;

    fn config() -> Config {
        Config::parse(
            std::path::Path::new("test.toml"),
            "[[secret]]\nname = \"kafka-app\"\nusername = \"app\"\npassword = \"pa$$word\"\n",
        )
        .unwrap()
    }

    fn kafka_spec(uri: &str) -> Spec {
        Spec {
            function_name: "f".into(),
            topics: Some(vec!["t".into()]),
            starting_position: Some("LATEST".into()),
            self_managed_event_source: Some(SelfManagedEventSource {
                endpoints: [("KAFKA_BOOTSTRAP_SERVERS".into(), vec!["k:9092".into()])].into(),
            }),
            source_access_configurations: Some(vec![SourceAccess {
                kind: "SASL_SCRAM_512_AUTH".into(),
                uri: uri.into(),
            }]),
            ..Spec::default()
        }
    }

    #[test]
    fn a_named_secret_becomes_the_kafka_sources_sasl_and_an_unknown_one_is_refused() {
        let config = config();
        let cx = Context {
            config: &config,
            region: "us-east-1",
            account: "000000000000",
        };
        let uri = "arn:aws:secretsmanager:us-east-1:000000000000:secret:kafka-app-AbCdEf";
        let m = mapping("u-1", &kafka_spec(uri), &cx).unwrap();
        let SourceConfig::Kafka(k) = &m.source else {
            panic!("{m:?}")
        };
        let sasl = k.sasl.as_ref().unwrap();
        assert_eq!(sasl.mechanism, SaslMechanism::ScramSha512);
        assert_eq!(sasl.username.0, "app");
        assert_eq!(sasl.password.expose(), "pa$$word");
        assert_eq!(k.group_id.as_deref(), Some("u-1"));
        let err = mapping("u-2", &kafka_spec("other"), &cx).unwrap_err();
        assert!(err.contains("no [[secret]]"), "{err}");
        assert!(!err.contains("pa$$word"));
    }

    #[test]
    fn a_named_destination_becomes_the_on_failure_and_an_unknown_one_is_refused() {
        let config = Config::parse(
            std::path::Path::new("test.toml"),
            "[[destination]]\nname = \"parked\"\ntype = \"file\"\npath = \"/tmp/p.jsonl\"\n",
        )
        .unwrap();
        let cx = Context {
            config: &config,
            region: "us-east-1",
            account: "000000000000",
        };
        let mut spec = kafka_spec("unused");
        spec.source_access_configurations = None;
        spec.maximum_retry_attempts = Some(0);
        spec.destination_config = Some(crate::api::wire::DestinationConfig {
            on_failure: Some(crate::api::wire::OnFailure {
                destination: Some(format!("{DESTINATION_PREFIX}parked")),
            }),
        });
        let m = mapping("u-1", &spec, &cx).unwrap();
        assert_eq!(
            m.on_failure,
            Some(config.destinations[0].destination.clone())
        );
        let arn = "arn:aws:sqs:us-east-1:000000000000:dlq";
        assert!(matches!(
            dead_letter_queue(arn, &cx),
            Ok(DestinationConfig::Sqs(_))
        ));
        assert!(matches!(
            dead_letter_queue(&format!("{DESTINATION_PREFIX}parked"), &cx),
            Ok(DestinationConfig::File(_))
        ));
        let err = dead_letter_queue(&format!("{DESTINATION_PREFIX}gone"), &cx).unwrap_err();
        assert!(err.contains("no [[destination]] named \"gone\""), "{err}");
        assert!(dead_letter_queue("arn:aws:sns:us-east-1:0:t", &cx).is_err());
    }
}
