//! TLS on the API's listener (`[api] cert_file`, `key_file`): the certificate chain and
//! key are read once at start-up, and each connection's handshake runs in its own task,
//! so that a client that never finishes one holds up nobody else's.

use std::io;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio_rustls::server::TlsStream;

use crate::listen::Permitted;

/// Longest a client may take over its handshake.
const HANDSHAKE: Duration = Duration::from_secs(10);

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("[api] cert_file {path}: {message}")]
    Cert { path: String, message: String },
    #[error("[api] key_file {path}: {message}")]
    Key { path: String, message: String },
    #[error("[api] cert_file and key_file do not make a TLS server: {0}")]
    Config(String),
}

/// The server configuration of a PEM certificate chain (leaf first) and its key.
pub fn server_config(
    cert_file: &Path,
    key_file: &Path,
) -> Result<Arc<rustls::ServerConfig>, TlsError> {
    let cert_error = |message: String| TlsError::Cert {
        path: cert_file.display().to_string(),
        message,
    };
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(cert_file)
        .and_then(|i| i.collect::<Result<_, _>>())
        .map_err(|e| cert_error(e.to_string()))?;
    if certs.is_empty() {
        return Err(cert_error("no PEM certificate in it".into()));
    }
    // The error names the file only: a key's bytes never reach a message.
    let key = PrivateKeyDer::from_pem_file(key_file).map_err(|e| TlsError::Key {
        path: key_file.display().to_string(),
        message: e.to_string(),
    })?;
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .and_then(|b| b.with_no_client_auth().with_single_cert(certs, key))
        .map_err(|e| TlsError::Config(e.to_string()))?;
    Ok(Arc::new(config))
}

/// A listener of TLS connections for [`serve`](crate::listen::serve): a task accepts TCP
/// connections and runs each handshake in a task of its own; finished ones are handed
/// over here. At most [`MAX_CONNECTIONS`](crate::listen::MAX_CONNECTIONS) are open,
/// handshaking or served.
pub struct TlsListener {
    ready: mpsc::Receiver<(Permitted<TlsStream<TcpStream>>, SocketAddr)>,
    local: SocketAddr,
}

impl TlsListener {
    pub fn new(listener: TcpListener, config: Arc<rustls::ServerConfig>) -> io::Result<Self> {
        let local = listener.local_addr()?;
        let (tx, ready) = mpsc::channel(64);
        let acceptor = tokio_rustls::TlsAcceptor::from(config);
        let permits = crate::listen::permits();
        tokio::spawn(async move {
            loop {
                let permit = crate::listen::permit(&permits).await;
                let (tcp, peer) = match listener.accept().await {
                    Ok(c) => c,
                    Err(e) => {
                        // Out of descriptors, usually: wait, as axum's own listener does.
                        tracing::warn!(error = %e, "the API listener cannot accept a connection");
                        tokio::time::sleep(Duration::from_secs(1)).await;
                        continue;
                    }
                };
                let (acceptor, handed) = (acceptor.clone(), tx.clone());
                tokio::spawn(async move {
                    match tokio::time::timeout(HANDSHAKE, acceptor.accept(tcp)).await {
                        Ok(Ok(tls)) => {
                            let _ = handed.send((Permitted::new(tls, permit), peer)).await;
                        }
                        Ok(Err(e)) => {
                            tracing::debug!(%peer, error = %e, "API TLS handshake failed")
                        }
                        Err(_) => tracing::debug!(%peer, "API TLS handshake timed out"),
                    }
                });
                if tx.is_closed() {
                    break;
                }
            }
        });
        Ok(TlsListener { ready, local })
    }
}

impl axum::serve::Listener for TlsListener {
    type Io = Permitted<TlsStream<TcpStream>>;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        match self.ready.recv().await {
            Some(c) => c,
            // The accepting task only ends once this listener is dropped.
            None => std::future::pending().await,
        }
    }

    fn local_addr(&self) -> io::Result<Self::Addr> {
        Ok(self.local)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unusable_files_are_named_and_a_keys_bytes_never_shown() {
        let dir = tempfile::tempdir().unwrap();
        let cert = dir.path().join("api.pem");
        let key = dir.path().join("api.key");
        std::fs::write(&cert, "not a certificate\n").unwrap();
        let err = server_config(&cert, &key).unwrap_err().to_string();
        assert!(
            err.contains("cert_file")
                && err.contains("api.pem")
                && err.contains("no PEM certificate"),
            "{err}"
        );
        // A well-formed certificate block, and a key file holding no key.
        std::fs::write(
            &cert,
            "-----BEGIN CERTIFICATE-----\nMAA=\n-----END CERTIFICATE-----\n",
        )
        .unwrap();
        std::fs::write(&key, "hunter2-not-a-key\n").unwrap();
        let err = server_config(&cert, &key).unwrap_err().to_string();
        assert!(err.contains("key_file") && err.contains("api.key"), "{err}");
        assert!(!err.contains("hunter2"), "{err}");
    }
}
