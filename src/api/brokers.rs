//! Amazon MQ brokers named by ARN (`[[broker]]`: RabbitMQ over AMQP, ActiveMQ over
//! STOMP) and the `[[secret]]`s that `SourceAccessConfigurations` name: what a request
//! says about a broker or a credential becomes source fields, and the secrets' values go
//! only into the mapping the runtime runs, never back to the request.

use toml::{Table, Value};

use super::convert::{Context, text};
use super::wire::{SourceAccess, Spec};
use crate::config::{BrokerConfig, SecretConfig};

fn access<'s>(spec: &'s Spec, kind: &str) -> Option<&'s SourceAccess> {
    spec.source_access_configurations
        .iter()
        .flatten()
        .find(|a| a.kind == kind)
}

/// An Amazon MQ broker ARN resolved through `[[broker]]`: a RabbitMQ broker (`amqp://`,
/// `amqps://`) or an ActiveMQ one (`stomp://`, `stomp+ssl://`), and the one queue of
/// `Queues`.
pub(super) fn mq(spec: &Spec, cx: &Context, source: &mut Table) -> Result<(), String> {
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
    // A CA the request names wins over the broker's.
    if let Some(a) = access(spec, "SERVER_ROOT_CA_CERTIFICATE") {
        let ca = secret_file(cx, a, |s| s.ca_file.as_ref(), "ca_file")?;
        source.insert("ca_file".into(), ca);
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
            "VIRTUAL_HOST" | "SERVER_ROOT_CA_CERTIFICATE" => {}
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
            "SERVER_ROOT_CA_CERTIFICATE" => {}
            other => {
                return Err(format!(
                    "SourceAccessConfigurations {other:?} is not supported for ActiveMQ brokers"
                ));
            }
        }
    }
    Ok(())
}

/// The `[[secret]]` a SourceAccessConfigurations URI names.
pub(super) fn secret_entry<'c>(cx: &Context<'c>, uri: &str) -> Result<&'c SecretConfig, String> {
    cx.config
        .secrets
        .iter()
        .find(|s| s.is_named_by(uri))
        .ok_or_else(|| format!("no [[secret]] named by {uri:?} in the gateway's configuration"))
}

/// The user name and password of the `[[secret]]` a SourceAccessConfigurations URI names.
pub(super) fn secret(cx: &Context, uri: &str) -> Result<(String, String), String> {
    let (user, password) = secret_entry(cx, uri)?.login()?;
    Ok((user, password.expose().to_owned()))
}

/// A file of the `[[secret]]` that `a` names, which its type needs.
pub(super) fn secret_file(
    cx: &Context,
    a: &SourceAccess,
    file: impl Fn(&SecretConfig) -> Option<&std::path::PathBuf>,
    key: &str,
) -> Result<Value, String> {
    let s = secret_entry(cx, &a.uri)?;
    file(s)
        .map(|p| text(&p.display().to_string()))
        .ok_or_else(|| format!("{}: the [[secret]] {:?} has no {key}", a.kind, s.name))
}
