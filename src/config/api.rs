//! `[api]`, `[[broker]]`, `[[secret]]`, `[[destination]]`: the Lambda-compatible event
//! source mapping API's listener, its SigV4 key pairs and where it keeps the mappings it
//! creates, and the registries of brokers, credentials and on-failure destinations its
//! requests name.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use serde::Deserialize;

use super::{DestinationConfig, Secret, SecretUrl};

/// `[api]`
#[derive(Debug, Clone, PartialEq, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ApiConfig {
    /// Serve the event source mapping API at all. Default: false.
    #[serde(default)]
    pub enabled: bool,
    /// Address and port to listen on. Default: "127.0.0.1:9901" (loopback only).
    #[serde(default = "default_api_listen")]
    pub listen: SocketAddr,
    /// Where the mappings created through the API are kept (`api-mappings.json`,
    /// written atomically) when `store` is not set. Default: "/var/lib/esm-gateway"
    /// (systemd's StateDirectory).
    #[serde(default = "default_state_dir")]
    pub state_dir: PathBuf,
    /// PostgreSQL URL where the API keeps its mappings and schedules instead of
    /// `state_dir`, e.g. "postgres://gateway:${PGPASSWORD}@db:5432/gateway" (`${ENV}` is
    /// expanded; the password is never logged). Replicas given the same store share one
    /// set of mappings: a change made through any replica's API reaches the others, and
    /// each runs them under the sources' own ownership rules. Default: none.
    pub store: Option<SecretUrl>,
    /// With a store: how often each replica reads the whole set again, beside the
    /// notification every change sends (a safety net for a notification lost with a
    /// connection). Default: "10s".
    #[serde(default = "default_store_refresh", with = "humantime_serde")]
    #[schemars(with = "String")]
    pub store_refresh: Duration,
    /// `[[api.key]]`: the key pairs requests may be SigV4-signed with. Default: none,
    /// and every request is refused.
    #[serde(default, rename = "key")]
    pub keys: Vec<ApiKey>,
    /// PEM certificate chain (leaf first) to serve the API over HTTPS, with `key_file`;
    /// read at start. Default: none, plain HTTP.
    #[serde(default, deserialize_with = "crate::env::expand_path_opt")]
    #[schemars(with = "Option<PathBuf>")]
    pub cert_file: Option<PathBuf>,
    /// PEM private key of `cert_file` (PKCS#8, PKCS#1 or SEC1). Default: none.
    #[serde(default, deserialize_with = "crate::env::expand_path_opt")]
    #[schemars(with = "Option<PathBuf>")]
    pub key_file: Option<PathBuf>,
}

impl Default for ApiConfig {
    fn default() -> Self {
        Self {
            enabled: false,
            listen: default_api_listen(),
            state_dir: default_state_dir(),
            store: None,
            store_refresh: default_store_refresh(),
            keys: Vec::new(),
            cert_file: None,
            key_file: None,
        }
    }
}

/// `[[api.key]]`: one access key pair, as the AWS CLI's and SDKs' credentials hold it.
#[derive(Debug, Clone, PartialEq, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ApiKey {
    /// The access key id (AWS_ACCESS_KEY_ID of the clients).
    pub access_key_id: String,
    /// The secret access key; `${ENV}` is expanded; never logged or returned.
    pub secret_access_key: Secret,
}

fn default_api_listen() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 9901))
}

fn default_state_dir() -> PathBuf {
    PathBuf::from("/var/lib/esm-gateway")
}

fn default_store_refresh() -> Duration {
    Duration::from_secs(10)
}

/// `[[broker]]`: a RabbitMQ or ActiveMQ broker that API requests name by its Amazon MQ
/// ARN, `arn:aws:mq:<region>:<account>:broker:<name>:<id>`.
#[derive(Debug, Clone, PartialEq, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct BrokerConfig {
    /// The broker's name: the ARN's `<name>`.
    pub name: String,
    /// The ARN's `<id>`, e.g. "b-1234a5b6-78cd-901e-2fgh-3i45j6k178l9". Default: any id.
    pub id: Option<String>,
    /// RabbitMQ: `amqp://user:pass@host:5672` or `amqps://…` (no vhost: the mapping's
    /// VIRTUAL_HOST picks it, default "/"). ActiveMQ: `stomp://host:61613` or
    /// `stomp+ssl://host:61614` (no credentials: the mapping's BASIC_AUTH gives the
    /// login). `${ENV}` is expanded.
    pub url: SecretUrl,
    /// PEM file with the CA(s) that sign the broker's certificate (amqps, stomp+ssl).
    /// Default: the platform's trust store.
    pub ca_file: Option<PathBuf>,
}

impl BrokerConfig {
    /// Whether the broker is an ActiveMQ one (a STOMP URL), not a RabbitMQ one.
    pub fn is_activemq(&self) -> bool {
        !self.url.expose().starts_with("amqp")
    }

    /// Why the URL is neither an AMQP nor a STOMP URL; the text never holds the URL's
    /// password.
    pub fn url_problem(&self) -> Option<String> {
        if self.is_activemq() {
            crate::source::activemq::config::broker(self.url.expose())
                .err()
                .map(|e| format!("url is not an AMQP or STOMP URL: {e}"))
        } else {
            self.url
                .amqp()
                .err()
                .map(|e| format!("url is not an AMQP URL: {e}"))
        }
    }
}

/// `[[secret]]`: credentials that API requests name in `SourceAccessConfigurations`, by
/// name or by a Secrets Manager ARN ending in `:secret:<name>` (optionally with AWS's
/// `-XXXXXX` suffix): a login (BASIC_AUTH, SASL_SCRAM_256_AUTH, SASL_SCRAM_512_AUTH), a
/// client certificate (CLIENT_CERTIFICATE_TLS_AUTH) or a CA (SERVER_ROOT_CA_CERTIFICATE).
/// Their values stay in the gateway: never sent by, returned by or stored by the API.
#[derive(Debug, Clone, PartialEq, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct SecretConfig {
    /// The name requests use.
    pub name: String,
    /// The user name; `${ENV}` is expanded. Default: none (a secret of certificates).
    pub username: Option<super::Expanded>,
    /// The password; `${ENV}` is expanded. Default: none (then `password_file`).
    pub password: Option<Secret>,
    /// A file holding the password (a trailing newline is dropped), read at load.
    #[serde(default, deserialize_with = "crate::env::expand_path_opt")]
    #[schemars(with = "Option<PathBuf>")]
    pub password_file: Option<PathBuf>,
    /// PEM client certificate (CLIENT_CERTIFICATE_TLS_AUTH), with `key_file`. Default: none.
    #[serde(default, deserialize_with = "crate::env::expand_path_opt")]
    #[schemars(with = "Option<PathBuf>")]
    pub cert_file: Option<PathBuf>,
    /// PEM key of `cert_file`. Default: none.
    #[serde(default, deserialize_with = "crate::env::expand_path_opt")]
    #[schemars(with = "Option<PathBuf>")]
    pub key_file: Option<PathBuf>,
    /// Password of an encrypted `key_file`; `${ENV}` is expanded. Default: none.
    pub key_password: Option<Secret>,
    /// PEM CA bundle that signs the brokers' certificates (SERVER_ROOT_CA_CERTIFICATE).
    /// Default: none.
    #[serde(default, deserialize_with = "crate::env::expand_path_opt")]
    #[schemars(with = "Option<PathBuf>")]
    pub ca_file: Option<PathBuf>,
}

impl SecretConfig {
    /// The password, from `password` or `password_file`.
    pub fn password(&self) -> Result<Secret, String> {
        match (&self.password, &self.password_file) {
            (Some(p), None) => Ok(p.clone()),
            (None, Some(path)) => std::fs::read_to_string(path)
                .map(|s| Secret::new(s.trim_end_matches(['\n', '\r'])))
                .map_err(|e| format!("cannot read {}: {e}", path.display())),
            _ => Err("give exactly one of password and password_file".into()),
        }
    }

    /// The user name and password, for a login.
    pub fn login(&self) -> Result<(String, Secret), String> {
        let user = self.username.as_ref().ok_or_else(|| {
            format!(
                "the [[secret]] {:?} has no username: it is not a login",
                self.name
            )
        })?;
        Ok((user.0.clone(), self.password()?))
    }

    /// What is wrong with the secret: it must hold a login, certificates, or both.
    pub fn problem(&self) -> Option<String> {
        let login =
            self.username.is_some() || self.password.is_some() || self.password_file.is_some();
        let certificates =
            self.cert_file.is_some() || self.key_file.is_some() || self.ca_file.is_some();
        if !login && !certificates {
            return Some(
                "give username and password (a login), or cert_file and key_file, or ca_file"
                    .into(),
            );
        }
        if login && let Err(e) = self.login() {
            return Some(e);
        }
        if self.cert_file.is_some() != self.key_file.is_some() {
            return Some("cert_file and key_file go together".into());
        }
        if self.key_password.is_some() && self.key_file.is_none() {
            return Some("key_password is set without key_file".into());
        }
        None
    }

    /// Whether a SourceAccessConfigurations URI names this secret.
    pub fn is_named_by(&self, uri: &str) -> bool {
        let name = uri.rsplit_once(":secret:").map_or(uri, |(_, n)| n);
        name == self.name
            || name
                .strip_prefix(self.name.as_str())
                .is_some_and(|rest| rest.len() == 7 && rest.starts_with('-'))
    }
}

/// `[[destination]]`: an on-failure destination that API requests name as
/// `esm-gateway:destination:<name>` in `DestinationConfig.OnFailure.Destination` (and a
/// schedule's `Target.DeadLetterConfig.Arn`). Its other keys are a mapping's
/// `on_failure` table's (`type = "file"`, `"rabbitmq"`, …). A `file` destination parks
/// the records of one mapping at a time: the API refuses a second.
#[derive(Debug, Clone, PartialEq, Deserialize, schemars::JsonSchema)]
pub struct NamedDestination {
    /// The name requests use.
    pub name: String,
    /// The destination, as a mapping's `on_failure` table writes it.
    #[serde(flatten)]
    pub destination: DestinationConfig,
}
