//! Between AWS's fields and the gateway's own mapping config: a [`Spec`] becomes the
//! [`Mapping`] the TOML file would have written (built as a TOML table and parsed by the
//! same deserializers, so every range check is the file's), and a file's mapping is
//! described in AWS's fields for listing.

use toml::{Table, Value};

use super::brokers::{secret, secret_entry, secret_file};
use super::wire::{Kind, SourceAccess, Spec};
use crate::config::{Config, DestinationConfig, Mapping, SourceConfig};

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
pub(super) fn text(s: &str) -> Value {
    Value::String(s.replace("${", "$${"))
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
        Kind::Mq => super::brokers::mq(spec, cx, &mut source)?,
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
    let mut tls = Table::new();
    for a in spec.source_access_configurations.iter().flatten() {
        let mechanism = match a.kind.as_str() {
            "SASL_SCRAM_256_AUTH" => "scram-sha-256",
            "SASL_SCRAM_512_AUTH" => "scram-sha-512",
            "BASIC_AUTH" => "plain",
            "CLIENT_CERTIFICATE_TLS_AUTH" => {
                tls.insert(
                    "cert_file".into(),
                    secret_file(cx, a, |s| s.cert_file.as_ref(), "cert_file")?,
                );
                tls.insert(
                    "key_file".into(),
                    secret_file(cx, a, |s| s.key_file.as_ref(), "key_file")?,
                );
                if let Some(p) = &secret_entry(cx, &a.uri)?.key_password {
                    tls.insert("key_password".into(), text(p.expose()));
                }
                continue;
            }
            "SERVER_ROOT_CA_CERTIFICATE" => {
                tls.insert(
                    "ca_file".into(),
                    secret_file(cx, a, |s| s.ca_file.as_ref(), "ca_file")?,
                );
                continue;
            }
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
    // Either certificate turns TLS on, as on AWS.
    if !tls.is_empty() {
        source.insert("tls".into(), Value::Table(tls));
    }
    Ok(())
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

    fn context(config: &Config) -> Context<'_> {
        Context {
            config,
            region: "us-east-1",
            account: "000000000000",
        }
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
        let cx = context(&config);
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
        let cx = context(&config);
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

    #[test]
    fn certificate_secrets_become_the_kafka_sources_tls() {
        let config = Config::parse(
            std::path::Path::new("test.toml"),
            "[[secret]]\nname = \"client\"\ncert_file = \"/etc/c.pem\"\nkey_file = \"/etc/c.key\"\nkey_password = \"k$y\"\n\n\
             [[secret]]\nname = \"root\"\nca_file = \"/etc/ca.pem\"\n",
        )
        .unwrap();
        let cx = context(&config);
        let mut spec = kafka_spec("unused");
        spec.source_access_configurations = Some(vec![
            SourceAccess {
                kind: "CLIENT_CERTIFICATE_TLS_AUTH".into(),
                uri: "arn:aws:secretsmanager:us-east-1:000000000000:secret:client".into(),
            },
            SourceAccess {
                kind: "SERVER_ROOT_CA_CERTIFICATE".into(),
                uri: "root".into(),
            },
        ]);
        let m = mapping("u-1", &spec, &cx).unwrap();
        let SourceConfig::Kafka(k) = &m.source else {
            panic!("{m:?}")
        };
        let tls = k.tls.as_ref().expect("TLS on");
        assert_eq!(
            tls.cert_file.as_deref(),
            Some(std::path::Path::new("/etc/c.pem"))
        );
        assert_eq!(
            tls.key_file.as_deref(),
            Some(std::path::Path::new("/etc/c.key"))
        );
        assert_eq!(tls.key_password.as_ref().map(|p| p.expose()), Some("k$y"));
        assert_eq!(
            tls.ca_file.as_deref(),
            Some(std::path::Path::new("/etc/ca.pem"))
        );
        assert!(k.sasl.is_none());
        // A secret without the file the type needs, or without a login, is named.
        spec.source_access_configurations = Some(vec![SourceAccess {
            kind: "SERVER_ROOT_CA_CERTIFICATE".into(),
            uri: "client".into(),
        }]);
        let err = mapping("u-2", &spec, &cx).unwrap_err();
        assert!(err.contains("\"client\" has no ca_file"), "{err}");
        spec.source_access_configurations = Some(vec![SourceAccess {
            kind: "BASIC_AUTH".into(),
            uri: "root".into(),
        }]);
        let err = mapping("u-3", &spec, &cx).unwrap_err();
        assert!(err.contains("has no username"), "{err}");
    }
}
