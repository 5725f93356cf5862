//! `[api]`, `[[broker]]`: the Lambda-compatible event source mapping API's listener,
//! its SigV4 key pairs and where it keeps the mappings it creates, and the registry of
//! brokers its requests name by Amazon MQ ARN.

use std::net::SocketAddr;
use std::path::PathBuf;

use serde::Deserialize;

use super::{Secret, SecretUrl};

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
    /// written atomically). Default: "/var/lib/esm-gateway" (systemd's StateDirectory).
    #[serde(default = "default_state_dir")]
    pub state_dir: PathBuf,
    /// `[[api.key]]`: the key pairs requests may be SigV4-signed with. Default: none,
    /// and every request is refused.
    #[serde(default, rename = "key")]
    pub keys: Vec<ApiKey>,
}

impl Default for ApiConfig {
    fn default() -> Self {
        Self {
            enabled: false,
            listen: default_api_listen(),
            state_dir: default_state_dir(),
            keys: Vec::new(),
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

/// `[[broker]]`: a RabbitMQ broker that API requests name by its Amazon MQ ARN,
/// `arn:aws:mq:<region>:<account>:broker:<name>:<id>`.
#[derive(Debug, Clone, PartialEq, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct BrokerConfig {
    /// The broker's name: the ARN's `<name>`.
    pub name: String,
    /// The ARN's `<id>`, e.g. "b-1234a5b6-78cd-901e-2fgh-3i45j6k178l9". Default: any id.
    pub id: Option<String>,
    /// `amqp://user:pass@host:5672` or `amqps://…` (no vhost: the mapping's VIRTUAL_HOST
    /// picks it, default "/"); `${ENV}` is expanded.
    pub url: SecretUrl,
    /// PEM file with the CA(s) that sign the broker's certificate (amqps). Default: the
    /// platform's trust store.
    pub ca_file: Option<PathBuf>,
}
