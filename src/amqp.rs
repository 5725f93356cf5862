//! The AMQP 0-9-1 connection code shared by the RabbitMQ source, the RabbitMQ on-failure
//! destination and redrive: how a connection is opened (TLS with a custom CA) and how
//! its errors are told without the password.

use std::path::{Path, PathBuf};

use lapin::{Connection, ConnectionProperties};

use crate::env::SecretUrl;

/// Why a connection could not be opened. No variant carries the password.
#[derive(Debug, thiserror::Error)]
pub enum AmqpError {
    #[error("cannot read CA file {}: {source}", path.display())]
    CaFile {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot start the AMQP client: {0}")]
    Runtime(String),
    #[error("cannot connect to {url}: {message}")]
    Connect { url: String, message: String },
}

/// Opens a connection named `name` (the broker shows it), with a custom CA when
/// `ca_file` is given.
pub async fn connect(
    url: &SecretUrl,
    ca_file: Option<&Path>,
    name: &str,
) -> Result<Connection, AmqpError> {
    let props = ConnectionProperties::default().with_connection_name(name.into());
    let tls = match ca_file {
        None => lapin::tcp::OwnedTLSConfig::default(),
        Some(path) => lapin::tcp::OwnedTLSConfig {
            identity: None,
            cert_chain: Some(std::fs::read_to_string(path).map_err(|source| {
                AmqpError::CaFile {
                    path: path.to_owned(),
                    source,
                }
            })?),
        },
    };
    let runtime =
        lapin::runtime::default_runtime().map_err(|e| AmqpError::Runtime(e.to_string()))?;
    Connection::connect_with_config(url.expose(), props, tls, runtime)
        .await
        .map_err(|e| AmqpError::Connect {
            url: url.to_string(),
            message: e.to_string().replace(url.expose(), &url.to_string()),
        })
}
