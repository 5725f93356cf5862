//! What bounds the gateway's own listeners (the admin API, the Lambda API): each holds at
//! most [`MAX_CONNECTIONS`] connections open, and accepts no more until one closes (the
//! kernel's backlog holds the rest). Clients that open connections and never send a
//! request (a scanner, a leaking health checker, a slowloris) can then take the
//! listener's own capacity but never the process's file descriptors, which the brokers'
//! connections need: the data plane does not notice.
//!
//! Each connection is served by [`serve`], which closes a connection that has not sent a
//! request's headers whole within [`HEADER_READ_TIMEOUT`], whether it is new or idle
//! between requests: idle clients hold their places for at most that long, so a flood
//! of them delays the listener's other clients but never locks them out.
//!
//! Also [`raise_descriptor_limit`]: the process's soft file descriptor limit is raised
//! to its hard limit at start, as a service manager's default soft limit (1,024 under
//! systemd) is meant for programs that use `select`, which the gateway does not.

use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

/// Connections one listener holds open at most.
pub const MAX_CONNECTIONS: usize = 64;

/// How long a connection may take to send a request's headers, counted from its accept
/// or from the end of its previous response (hyper's own default, once a timer is set;
/// `axum::serve` sets none, so an idle connection was kept for as long as its client).
pub const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(30);

/// Serves `app` over HTTP/1.1 on every connection `listener` accepts, closing those that
/// do not send a request's headers within [`HEADER_READ_TIMEOUT`]. Runs until the process
/// exits.
pub async fn serve<L: axum::serve::Listener>(listener: L, app: axum::Router) -> io::Result<()> {
    serve_with(listener, app, HEADER_READ_TIMEOUT).await
}

async fn serve_with<L: axum::serve::Listener>(
    mut listener: L,
    app: axum::Router,
    header_read_timeout: Duration,
) -> io::Result<()> {
    loop {
        let (io, _) = listener.accept().await;
        let service = hyper_util::service::TowerToHyperService::new(app.clone());
        tokio::spawn(async move {
            let connection = hyper::server::conn::http1::Builder::new()
                .timer(hyper_util::rt::TokioTimer::new())
                .header_read_timeout(header_read_timeout)
                .serve_connection(hyper_util::rt::TokioIo::new(io), service);
            // A client that went away or timed out: nothing to do but drop the connection.
            if let Err(e) = connection.await {
                tracing::debug!(error = %e, "HTTP connection ended");
            }
        });
    }
}

/// A connection that holds one of its listener's permits until it is dropped.
pub struct Permitted<T> {
    io: T,
    _permit: OwnedSemaphorePermit,
}

impl<T> Permitted<T> {
    pub fn new(io: T, permit: OwnedSemaphorePermit) -> Self {
        Permitted {
            io,
            _permit: permit,
        }
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for Permitted<T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_read(cx, buf)
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for Permitted<T> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.io).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.io).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }
}

/// The permits of one listener.
pub fn permits() -> Arc<Semaphore> {
    Arc::new(Semaphore::new(MAX_CONNECTIONS))
}

/// Takes a permit, waiting while the listener is full.
pub async fn permit(permits: &Arc<Semaphore>) -> OwnedSemaphorePermit {
    permits
        .clone()
        .acquire_owned()
        .await
        .expect("a listener's semaphore is never closed")
}

/// A TCP listener for [`serve`] that holds at most [`MAX_CONNECTIONS`] open.
pub struct Capped {
    inner: TcpListener,
    permits: Arc<Semaphore>,
}

impl Capped {
    pub fn new(inner: TcpListener) -> Self {
        Capped {
            inner,
            permits: permits(),
        }
    }
}

impl axum::serve::Listener for Capped {
    type Io = Permitted<TcpStream>;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        let permit = permit(&self.permits).await;
        // tokio's listener as axum serves it: an accept error (out of descriptors,
        // usually) waits a second and accepts again.
        let (io, addr) = axum::serve::Listener::accept(&mut self.inner).await;
        (Permitted::new(io, permit), addr)
    }

    fn local_addr(&self) -> io::Result<Self::Addr> {
        self.inner.local_addr()
    }
}

/// Raises the soft limit on open files to the hard limit; returns the limit in force.
pub fn raise_descriptor_limit() -> io::Result<u64> {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit and setrlimit only read and write the struct given.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) != 0 {
            return Err(io::Error::last_os_error());
        }
        if limit.rlim_cur < limit.rlim_max {
            let raised = libc::rlimit {
                rlim_cur: limit.rlim_max,
                rlim_max: limit.rlim_max,
            };
            if libc::setrlimit(libc::RLIMIT_NOFILE, &raised) != 0 {
                return Err(io::Error::last_os_error());
            }
            limit = raised;
        }
    }
    Ok(limit.rlim_cur)
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::serve::Listener;

    #[tokio::test]
    async fn a_full_listener_accepts_again_once_a_connection_closes() {
        let tcp = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = tcp.local_addr().unwrap();
        let mut capped = Capped::new(tcp);
        let mut clients = Vec::new();
        let mut held = Vec::new();
        for _ in 0..MAX_CONNECTIONS {
            clients.push(TcpStream::connect(addr).await.unwrap());
            held.push(capped.accept().await.0);
        }
        // One more client: the kernel completes its handshake, the listener waits.
        clients.push(TcpStream::connect(addr).await.unwrap());
        let waiting =
            tokio::time::timeout(std::time::Duration::from_millis(200), capped.accept()).await;
        assert!(waiting.is_err(), "no connection past the cap");
        held.pop();
        let accepted =
            tokio::time::timeout(std::time::Duration::from_secs(5), capped.accept()).await;
        assert!(accepted.is_ok(), "accepted once one closed");
    }

    /// Reads from `c` until `want` has arrived, or to its end (`want` empty); what was read.
    async fn read_until(c: &mut TcpStream, want: &str) -> String {
        use tokio::io::AsyncReadExt;
        let mut got = Vec::new();
        let mut buf = [0u8; 1024];
        loop {
            match c.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => got.extend_from_slice(&buf[..n]),
            }
            if !want.is_empty() && String::from_utf8_lossy(&got).contains(want) {
                break;
            }
        }
        String::from_utf8_lossy(&got).into_owned()
    }

    #[tokio::test]
    async fn idle_connections_are_closed_so_a_full_listener_serves_new_clients() {
        use tokio::io::AsyncWriteExt;
        let tcp = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = tcp.local_addr().unwrap();
        let app = axum::Router::new().route("/healthz", axum::routing::get(|| async { "ok" }));
        tokio::spawn(serve_with(
            Capped::new(tcp),
            app,
            Duration::from_millis(500),
        ));
        let request = b"GET /healthz HTTP/1.1\r\nhost: gateway\r\n\r\n";
        let within = |d: u64| Duration::from_secs(d);
        // One client is answered and keeps its connection; the others never send a thing.
        let mut kept = TcpStream::connect(addr).await.unwrap();
        kept.write_all(request).await.unwrap();
        let first = tokio::time::timeout(within(10), read_until(&mut kept, "\r\n\r\nok")).await;
        assert!(
            first.unwrap().starts_with("HTTP/1.1 200"),
            "first request answered"
        );
        let mut idle = Vec::new();
        for _ in 1..MAX_CONNECTIONS {
            idle.push(TcpStream::connect(addr).await.unwrap());
        }
        // The listener is full: a new client is served once the idle ones are closed.
        let mut late = TcpStream::connect(addr).await.unwrap();
        late.write_all(request).await.unwrap();
        let answer = tokio::time::timeout(within(10), read_until(&mut late, "\r\n\r\nok")).await;
        assert!(
            answer.is_ok_and(|a| a.starts_with("HTTP/1.1 200")),
            "a client past a listener full of idle connections is answered"
        );
        // Every idle connection was closed by the server, the kept-alive one too.
        for c in idle.iter_mut().chain([&mut kept]) {
            let end = tokio::time::timeout(within(10), read_until(c, "")).await;
            assert!(end.is_ok(), "an idle connection is closed");
        }
    }

    #[test]
    fn the_soft_descriptor_limit_is_raised_to_the_hard_one() {
        let limit = raise_descriptor_limit().unwrap();
        let mut now = libc::rlimit {
            rlim_cur: 0,
            rlim_max: 0,
        };
        // SAFETY: getrlimit only writes the struct given.
        assert_eq!(unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut now) }, 0);
        assert_eq!(now.rlim_cur, now.rlim_max);
        assert_eq!(limit, now.rlim_cur);
    }
}
