//! An ActiveMQ source's configuration: its TOML table, its checks and AWS's defaults.

use std::path::PathBuf;
use std::time::Duration;

use serde::Deserialize;

use super::event::AmqShape;
use crate::env::{Expanded, Secret, SecretUrl};
use crate::pipeline::retry::Exhausted;
use crate::source::{Defaults, Facts};

/// `[mapping.source]` with `type = "activemq"`: one queue of an ActiveMQ broker, over
/// STOMP 1.2.
#[derive(Debug, Clone, PartialEq, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ActiveMqSource {
    /// `stomp://host:61613` or `stomp+ssl://host:61614` (Amazon MQ's STOMP endpoint);
    /// `${ENV}` is expanded.
    pub url: SecretUrl,
    /// The STOMP login. Default: none.
    pub username: Option<Expanded>,
    /// The STOMP passcode. Default: none.
    pub password: Option<Secret>,
    /// Queue to consume from (its physical name, without `/queue/`).
    pub queue: String,
    /// `activemq.prefetchSize`: most messages the broker sends ahead of their acks.
    /// Default: twice the batch size, at least 100.
    pub prefetch: Option<u32>,
    /// PEM file with the CA(s) that sign the broker's certificate (`stomp+ssl`).
    /// Default: the platform's trust store.
    pub ca_file: Option<PathBuf>,
    /// Heart-beat interval offered to and asked of the broker (0 for none). Default: 10 s.
    #[serde(default, with = "humantime_serde")]
    #[schemars(with = "Option<String>")]
    pub heart_beat: Option<Duration>,
    /// The event's `eventSource`. Default: `aws:mq` (see the README on why not `aws:amq`).
    pub event_source: Option<String>,
    /// Override the synthetic `eventSourceArn`. Default: built from host and port.
    pub event_source_arn: Option<String>,
}

/// AWS's defaults for Amazon MQ (ActiveMQ) mappings: 100 records or 500 ms. AWS's
/// consumer redelivers a failed batch with ActiveMQ's default redelivery policy
/// (`maximumRedeliveries` 6) and then gives the messages back to the broker (its DLQ):
/// here, 6 retries with the gateway's backoff and then a NACK of each exhausted message,
/// so that the broker's redelivery policy and dead-letter queue apply.
pub const DEFAULTS: Defaults = Defaults {
    batch_size: 100,
    batch_window: Duration::from_millis(500),
    max_attempts: 6,
    forever: None,
    forever_with_destination: Some(10),
    max_record_age: None,
    exhausted: Exhausted::Release,
};

/// Default `heart_beat`.
pub const HEART_BEAT: Duration = Duration::from_secs(10);

/// What `url` names.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Broker {
    pub host: String,
    pub port: u16,
    pub tls: bool,
}

/// Parses `stomp://host[:port][/]` or `stomp+ssl://…`; the error never holds the URL.
pub fn broker(url: &str) -> Result<Broker, String> {
    let (scheme, rest) = url
        .split_once("://")
        .ok_or("it has no scheme (stomp:// or stomp+ssl://)")?;
    let (tls, default_port) = match scheme {
        "stomp" | "stomp+nio" | "tcp" => (false, 61613),
        "stomp+ssl" | "stomp+nio+ssl" | "ssl" => (true, 61614),
        other => {
            return Err(format!(
                "scheme {other:?} is not stomp:// or stomp+ssl:// (the gateway speaks STOMP 1.2)"
            ));
        }
    };
    let rest = rest.strip_suffix('/').unwrap_or(rest);
    if rest.contains(['@', '/', '?', '#']) {
        return Err(
            "it has credentials, a path or a query; give only host and port \
             (the login goes in source.username and source.password)"
                .into(),
        );
    }
    let (host, port) = match rest.rsplit_once(':') {
        Some((h, p)) if !h.ends_with(']') || h.starts_with('[') => (
            h,
            p.parse::<u16>()
                .map_err(|_| format!("port {p:?} is not a number from 1 to 65535"))?,
        ),
        _ => (rest, default_port),
    };
    let host = host.trim_start_matches('[').trim_end_matches(']');
    if host.is_empty() || port == 0 {
        return Err("it has no host or port".into());
    }
    Ok(Broker {
        host: host.to_owned(),
        port,
        tls,
    })
}

impl ActiveMqSource {
    pub fn problems(&self, facts: &Facts, out: &mut Vec<String>) {
        let name = facts.mapping;
        if self.queue.is_empty() {
            out.push(format!("mapping {name:?}: source.queue is empty"));
        }
        if self.queue.starts_with('/') || self.queue.contains(',') {
            out.push(format!(
                "mapping {name:?}: source.queue {:?} must be a queue's physical name, without /queue/ and without commas",
                self.queue
            ));
        }
        if let Some(p) = self.prefetch
            && (p as usize) < facts.batch_size
        {
            out.push(format!(
                "mapping {name:?}: source.prefetch ({p}) is smaller than batch.size ({}); a batch could never fill",
                facts.batch_size
            ));
        }
        match self.broker() {
            Err(e) => out.push(format!(
                "mapping {name:?}: source.url {} is not a STOMP URL: {e}",
                self.url
            )),
            Ok(b) if !b.tls && self.ca_file.is_some() => out.push(format!(
                "mapping {name:?}: source.ca_file is set but source.url is not stomp+ssl://"
            )),
            Ok(_) => {}
        }
        if self.password.is_some() && self.username.is_none() {
            out.push(format!(
                "mapping {name:?}: source.password is set without source.username"
            ));
        }
    }

    pub fn broker(&self) -> Result<Broker, String> {
        broker(self.url.expose())
    }

    /// The prefetch asked of the broker.
    pub fn prefetch(&self, batch_size: usize) -> u32 {
        self.prefetch
            .unwrap_or_else(|| (batch_size * 2).clamp(100, 65_535) as u32)
    }

    pub fn heart_beat(&self) -> Duration {
        self.heart_beat.unwrap_or(HEART_BEAT)
    }

    /// The event's `eventSourceArn`: the configured one, else a synthetic broker ARN
    /// built from the URL's host and port.
    pub fn arn(&self, region: &str, account: &str) -> String {
        self.event_source_arn.clone().unwrap_or_else(|| {
            let (host, port) = self
                .broker()
                .map_or(("unknown".into(), 61613), |b| (b.host, b.port));
            format!("arn:aws:mq:{region}:{account}:broker:{host}:{port}")
        })
    }

    pub fn shape(&self, region: &str, account: &str) -> AmqShape {
        let source = self.event_source.as_deref().unwrap_or("aws:mq");
        AmqShape::new(source, &self.arn(region, account), &self.queue)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_parse_with_default_ports_and_refuse_the_rest() {
        let b = broker("stomp+ssl://b-1.mq.us-east-1.amazonaws.com:61614").unwrap();
        assert_eq!(
            b,
            Broker {
                host: "b-1.mq.us-east-1.amazonaws.com".into(),
                port: 61614,
                tls: true
            }
        );
        assert_eq!(broker("stomp://localhost/").unwrap().port, 61613);
        assert_eq!(broker("stomp://[::1]:7").unwrap().host, "::1");
        for bad in [
            "amqp://h",
            "h:1",
            "stomp://user:secret@h:1",
            "stomp://h:x",
            "stomp://:1",
            "stomp://h/q",
        ] {
            let e = broker(bad).unwrap_err();
            assert!(!e.contains("secret"), "{e}");
        }
    }

    fn parse(source: &str) -> Result<crate::config::Config, String> {
        let text = format!(
            "[[mapping]]\nname = \"m\"\nfunction = \"f\"\n\n[mapping.source]\ntype = \"activemq\"\n{source}"
        );
        crate::config::Config::parse(std::path::Path::new("t.toml"), &text)
            .map_err(|e| e.to_string())
    }

    #[test]
    fn bad_tables_name_the_field_and_line() {
        let e = parse("url = \"stomp://h:61613\"\n").unwrap_err();
        assert!(e.contains("queue"), "{e}");
        let e = parse("url = \"stomp://h:61613\"\nqueue = \"q\"\nprefech = 1\n").unwrap_err();
        assert!(e.contains("prefech") && e.contains("line 9"), "{e}");
        let e = parse("url = \"amqp://u:hidden@h\"\nqueue = \"q\"\n").unwrap_err();
        assert!(e.contains("source.url") && e.contains("stomp"), "{e}");
        assert!(!e.contains("hidden"), "{e}");
        let e = parse("url = \"stomp://h\"\nqueue = \"q\"\nprefetch = 5\n").unwrap_err();
        assert!(e.contains("source.prefetch (5)"), "{e}");
        let e = parse("url = \"stomp://h\"\nqueue = \"q\"\nca_file = \"/x.pem\"\n").unwrap_err();
        assert!(e.contains("source.ca_file"), "{e}");
    }

    #[test]
    fn a_good_table_has_aws_defaults() {
        let c =
            parse("url = \"stomp://h\"\nusername = \"esm\"\npassword = \"pw\"\nqueue = \"q\"\n")
                .unwrap();
        let m = &c.mappings[0];
        assert_eq!(m.batch_size(), 100);
        assert_eq!(m.retries(), Some(6));
        assert!(!format!("{m:?}").contains("pw"));
        let crate::source::SourceConfig::Activemq(s) = &m.source else {
            panic!("not activemq")
        };
        assert_eq!(s.prefetch(100), 200);
        assert_eq!(
            s.arn("eu-west-1", "1"),
            "arn:aws:mq:eu-west-1:1:broker:h:61613"
        );
    }
}
