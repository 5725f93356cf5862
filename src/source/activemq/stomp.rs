//! A small STOMP 1.2 client: what the ActiveMQ source needs and no more. CONNECT with
//! login, passcode and heart-beats; SUBSCRIBE; MESSAGE; ACK/NACK; RECEIPT; ERROR;
//! DISCONNECT. Frames are text: a command line, `name:value` header lines (escaped with
//! `\\`, `\n`, `\r`, `\c`, except in CONNECT and CONNECTED), a blank line, then the body,
//! `content-length` bytes when that header is given, else up to the NUL.
//!
//! Over plain TCP (`stomp://`) or TLS (`stomp+ssl://`, tokio-rustls, trusting the CAs of
//! `ca_file` or else the platform's store). Reading and writing are split so that one
//! task reads frames while others write acks and heart-beats.

use std::io;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{
    AsyncBufReadExt, AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, BufReader, BufWriter,
    ReadHalf, WriteHalf,
};
use tokio::net::TcpStream;

/// Largest frame body accepted (ActiveMQ's own default `maxFrameSize` is far larger,
/// but a Lambda event cannot carry more than 6 MB).
pub const MAX_BODY: usize = 64 * 1024 * 1024;

/// What a connection is made of: TCP, or TLS over TCP.
pub trait Stream: AsyncRead + AsyncWrite + Send + Unpin {}
impl<T: AsyncRead + AsyncWrite + Send + Unpin> Stream for T {}

/// Why talking to the broker failed.
#[derive(Debug, thiserror::Error)]
pub enum StompError {
    #[error("cannot read CA file {path}: {message}")]
    CaFile { path: String, message: String },
    #[error("cannot connect to {addr}: {source}")]
    Connect { addr: String, source: io::Error },
    #[error("TLS with {host}: {message}")]
    Tls { host: String, message: String },
    #[error("the broker refused the login: {0}")]
    Refused(String),
    #[error("the broker sent ERROR: {0}")]
    Broker(String),
    #[error("malformed frame from the broker: {0}")]
    Protocol(String),
    #[error("no frame or heart-beat from the broker for {0:?}")]
    Silent(Duration),
    #[error("{addr} did not answer the login within {after:?}")]
    Unanswered { addr: String, after: Duration },
    #[error("the broker closed the connection")]
    Closed,
    #[error(transparent)]
    Io(#[from] io::Error),
}

/// One frame. Header values are kept in order; the first of a repeated name wins.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Frame {
    pub command: String,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl Frame {
    pub fn new(command: &str, headers: &[(&str, &str)]) -> Frame {
        Frame {
            command: command.to_owned(),
            headers: headers
                .iter()
                .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
                .collect(),
            body: Vec::new(),
        }
    }

    /// The first value of header `name` (STOMP 1.2: the first one wins).
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }

    /// An ERROR's `message` header and the start of its body, for error texts.
    pub fn describe(&self) -> String {
        let body = String::from_utf8_lossy(&self.body);
        let body: String = body.trim().chars().take(300).collect();
        let message = self.header("message").unwrap_or("");
        format!("{} {message} {body}", self.command)
            .trim()
            .to_owned()
    }

    /// The frame as it goes on the wire.
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(64 + self.body.len());
        out.extend_from_slice(self.command.as_bytes());
        out.push(b'\n');
        let raw = self.command == "CONNECT";
        for (k, v) in &self.headers {
            escape_into(&mut out, k, raw);
            out.push(b':');
            escape_into(&mut out, v, raw);
            out.push(b'\n');
        }
        out.push(b'\n');
        out.extend_from_slice(&self.body);
        out.push(0);
        out
    }
}

/// What [`Reader::read`] got: a frame, or a heart-beat (an EOL between frames).
#[derive(Debug, PartialEq, Eq)]
pub enum Read {
    Frame(Frame),
    HeartBeat,
}

/// The reading half of a connection.
pub struct Reader {
    inner: BufReader<ReadHalf<Box<dyn Stream>>>,
    line: Vec<u8>,
}

/// The writing half of a connection, buffered: [`Writer::flush`] sends.
pub struct Writer {
    inner: BufWriter<WriteHalf<Box<dyn Stream>>>,
}

/// What the broker said on CONNECTED.
#[derive(Debug, Clone)]
pub struct Connected {
    /// The connection's id (ActiveMQ: `ID:host-…`).
    pub session: String,
    /// How often the client sends a heart-beat, if at all: half the negotiated
    /// interval, since ActiveMQ's inactivity monitor checks at the interval itself
    /// (without grace), and a beat sent exactly on it can miss a check.
    pub send_every: Option<Duration>,
    /// How long the broker may stay silent before the connection counts as dead.
    pub silent_for: Option<Duration>,
}

/// Where and how to connect.
pub struct Endpoint<'a> {
    pub host: &'a str,
    pub port: u16,
    pub tls: bool,
    pub ca_file: Option<&'a Path>,
    pub login: Option<&'a str>,
    pub passcode: Option<&'a str>,
    /// The heart-beat interval the client offers and asks for (0: none).
    pub heart_beat: Duration,
}

/// How long connecting and logging in may take, TCP, TLS and CONNECTED together: a
/// broker (or a load balancer in front of it) that accepts and then says nothing is given
/// up, its socket closed, and the session's backoff tries again.
pub const CONNECT_DEADLINE: Duration = Duration::from_secs(10);

/// Opens a connection and logs in, within [`CONNECT_DEADLINE`].
pub async fn connect(e: &Endpoint<'_>) -> Result<(Reader, Writer, Connected), StompError> {
    connect_within(e, CONNECT_DEADLINE).await
}

async fn connect_within(
    e: &Endpoint<'_>,
    deadline: Duration,
) -> Result<(Reader, Writer, Connected), StompError> {
    tokio::time::timeout(deadline, open(e))
        .await
        .map_err(|_| StompError::Unanswered {
            addr: format!("{}:{}", e.host, e.port),
            after: deadline,
        })?
}

async fn open(e: &Endpoint<'_>) -> Result<(Reader, Writer, Connected), StompError> {
    let addr = format!("{}:{}", e.host, e.port);
    let tcp = TcpStream::connect(&addr)
        .await
        .map_err(|source| StompError::Connect {
            addr: addr.clone(),
            source,
        })?;
    tcp.set_nodelay(true)?;
    let stream: Box<dyn Stream> = if e.tls {
        Box::new(tls(tcp, e.host, e.ca_file).await?)
    } else {
        Box::new(tcp)
    };
    let (r, w) = tokio::io::split(stream);
    let mut reader = Reader {
        inner: BufReader::with_capacity(256 * 1024, r),
        line: Vec::new(),
    };
    let mut writer = Writer {
        inner: BufWriter::with_capacity(64 * 1024, w),
    };
    let beat = e.heart_beat.as_millis().to_string();
    let heart_beat = format!("{beat},{beat}");
    let mut headers = vec![
        ("accept-version", "1.2"),
        ("host", e.host),
        ("heart-beat", heart_beat.as_str()),
    ];
    headers.extend(e.login.map(|l| ("login", l)));
    headers.extend(e.passcode.map(|p| ("passcode", p)));
    writer.send(&Frame::new("CONNECT", &headers)).await?;
    writer.flush().await?;
    let reply = loop {
        match reader.read().await? {
            Read::Frame(f) => break f,
            Read::HeartBeat => {}
        }
    };
    match reply.command.as_str() {
        "CONNECTED" => {}
        "ERROR" => return Err(StompError::Refused(reply.describe())),
        other => {
            return Err(StompError::Protocol(format!(
                "{other} instead of CONNECTED"
            )));
        }
    }
    let (sx, sy) = reply
        .header("heart-beat")
        .and_then(parse_heart_beat)
        .unwrap_or((0, 0));
    let ours = e.heart_beat.as_millis() as u64;
    let every = |a: u64, b: u64| (a > 0 && b > 0).then(|| Duration::from_millis(a.max(b)));
    Ok((
        reader,
        writer,
        Connected {
            session: reply.header("session").unwrap_or_default().to_owned(),
            send_every: every(ours, sy).map(|d| d / 2),
            // The spec's "some tolerance": twice the interval, and a second more.
            silent_for: every(ours, sx).map(|d| d * 2 + Duration::from_secs(1)),
        },
    ))
}

fn parse_heart_beat(v: &str) -> Option<(u64, u64)> {
    let (a, b) = v.split_once(',')?;
    Some((a.trim().parse().ok()?, b.trim().parse().ok()?))
}

async fn tls(
    tcp: TcpStream,
    host: &str,
    ca_file: Option<&Path>,
) -> Result<tokio_rustls::client::TlsStream<TcpStream>, StompError> {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, ServerName};
    let tls_error = |message: String| StompError::Tls {
        host: host.to_owned(),
        message,
    };
    let mut roots = rustls::RootCertStore::empty();
    match ca_file {
        Some(path) => {
            let ca_error = |message: String| StompError::CaFile {
                path: path.display().to_string(),
                message,
            };
            let certs: Vec<CertificateDer> = CertificateDer::pem_file_iter(path)
                .and_then(|i| i.collect::<Result<_, _>>())
                .map_err(|e| ca_error(e.to_string()))?;
            if certs.is_empty() {
                return Err(ca_error("no PEM certificate in it".into()));
            }
            for c in certs {
                roots.add(c).map_err(|e| ca_error(e.to_string()))?;
            }
        }
        None => {
            let found = rustls_native_certs::load_native_certs();
            roots.add_parsable_certificates(found.certs);
        }
    }
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| tls_error(e.to_string()))?
        .with_root_certificates(roots)
        .with_no_client_auth();
    let name = ServerName::try_from(host.to_owned()).map_err(|e| tls_error(e.to_string()))?;
    tokio_rustls::TlsConnector::from(Arc::new(config))
        .connect(name, tcp)
        .await
        .map_err(|e| tls_error(e.to_string()))
}

impl Writer {
    /// Buffers a frame.
    pub async fn send(&mut self, frame: &Frame) -> io::Result<()> {
        self.inner.write_all(&frame.encode()).await
    }

    /// Buffers a heart-beat.
    pub async fn heart_beat(&mut self) -> io::Result<()> {
        self.inner.write_all(b"\n").await
    }

    pub async fn flush(&mut self) -> io::Result<()> {
        self.inner.flush().await
    }
}

impl Reader {
    /// Reads the next frame or heart-beat; the body by `content-length` when given,
    /// else up to the NUL.
    pub async fn read(&mut self) -> Result<Read, StompError> {
        let command = self.read_line().await?;
        if command.is_empty() {
            return Ok(Read::HeartBeat);
        }
        let raw = command == "CONNECTED";
        let mut headers = Vec::new();
        loop {
            let line = self.read_line().await?;
            if line.is_empty() {
                break;
            }
            let (k, v) = line
                .split_once(':')
                .ok_or_else(|| StompError::Protocol(format!("header line {line:?}")))?;
            headers.push(if raw {
                (k.to_owned(), v.to_owned())
            } else {
                (unescape(k)?, unescape(v)?)
            });
        }
        let length = headers
            .iter()
            .find(|(k, _)| k == "content-length")
            .map(|(_, v)| v.trim().parse::<usize>())
            .transpose()
            .map_err(|e| StompError::Protocol(format!("content-length: {e}")))?;
        let body = match length {
            Some(n) if n > MAX_BODY => {
                return Err(StompError::Protocol(format!(
                    "a body of {n} bytes, above {MAX_BODY}"
                )));
            }
            Some(n) => {
                let mut body = vec![0; n + 1];
                self.inner.read_exact(&mut body).await.map_err(eof)?;
                if body.pop() != Some(0) {
                    return Err(StompError::Protocol("body not followed by NUL".into()));
                }
                body
            }
            None => {
                let mut body = Vec::new();
                (&mut self.inner)
                    .take(MAX_BODY as u64 + 1)
                    .read_until(0, &mut body)
                    .await?;
                if body.pop() != Some(0) {
                    return Err(StompError::Closed);
                }
                body
            }
        };
        Ok(Read::Frame(Frame {
            command,
            headers,
            body,
        }))
    }

    /// A line without its EOL (`\n` or `\r\n`); header lines are UTF-8 (decoded lossily:
    /// the broker encodes Java strings, which are).
    async fn read_line(&mut self) -> Result<String, StompError> {
        self.line.clear();
        let n = (&mut self.inner)
            .take(1024 * 1024)
            .read_until(b'\n', &mut self.line)
            .await?;
        if n == 0 {
            return Err(StompError::Closed);
        }
        if self.line.pop() != Some(b'\n') {
            return Err(StompError::Protocol("a header line without its end".into()));
        }
        if self.line.last() == Some(&b'\r') {
            self.line.pop();
        }
        Ok(String::from_utf8_lossy(&self.line).into_owned())
    }
}

fn eof(e: io::Error) -> StompError {
    if e.kind() == io::ErrorKind::UnexpectedEof {
        StompError::Closed
    } else {
        StompError::Io(e)
    }
}

fn escape_into(out: &mut Vec<u8>, s: &str, raw: bool) {
    if raw {
        out.extend_from_slice(s.as_bytes());
        return;
    }
    for b in s.bytes() {
        match b {
            b'\\' => out.extend_from_slice(b"\\\\"),
            b'\n' => out.extend_from_slice(b"\\n"),
            b'\r' => out.extend_from_slice(b"\\r"),
            b':' => out.extend_from_slice(b"\\c"),
            b => out.push(b),
        }
    }
}

fn unescape(s: &str) -> Result<String, StompError> {
    if !s.contains('\\') {
        return Ok(s.to_owned());
    }
    let mut out = String::with_capacity(s.len());
    let mut chars = s.chars();
    while let Some(c) = chars.next() {
        if c != '\\' {
            out.push(c);
            continue;
        }
        out.push(match chars.next() {
            Some('\\') => '\\',
            Some('n') => '\n',
            Some('r') => '\r',
            Some('c') => ':',
            other => {
                return Err(StompError::Protocol(format!(
                    "undefined escape \\{} in a header",
                    other.map(String::from).unwrap_or_default()
                )));
            }
        });
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_broker_that_never_answers_the_login_is_given_up_at_the_deadline() {
        // Accepted by the kernel, never answered.
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let endpoint = Endpoint {
            host: "127.0.0.1",
            port: listener.local_addr().unwrap().port(),
            tls: false,
            ca_file: None,
            login: Some("app"),
            passcode: Some("hunter2"),
            heart_beat: Duration::from_secs(10),
        };
        let given_up = tokio::time::timeout(
            Duration::from_secs(5),
            connect_within(&endpoint, Duration::from_millis(200)),
        )
        .await
        .expect("given up by the deadline, not waiting forever");
        let e = given_up.err().expect("no connection").to_string();
        assert!(e.contains("did not answer the login within 200ms"), "{e}");
        assert!(!e.contains("hunter2"), "{e}");
    }

    fn reader_of(bytes: &[u8]) -> Reader {
        let (client, mut server) = tokio::io::duplex(1 << 20);
        let bytes = bytes.to_vec();
        tokio::spawn(async move {
            server.write_all(&bytes).await.unwrap();
        });
        let stream: Box<dyn Stream> = Box::new(client);
        let (r, _w) = tokio::io::split(stream);
        Reader {
            inner: BufReader::new(r),
            line: Vec::new(),
        }
    }

    async fn frame(r: &mut Reader) -> Frame {
        loop {
            match r.read().await.unwrap() {
                Read::Frame(f) => return f,
                Read::HeartBeat => {}
            }
        }
    }

    #[tokio::test]
    async fn frames_round_trip_with_escapes_bodies_and_heart_beats() {
        let mut sent = Frame::new("MESSAGE", &[("weird:key", "a\nb\\c\r"), ("k", "v")]);
        sent.body = b"\x00\x01 binary \x00".to_vec();
        let length = sent.body.len().to_string();
        sent.headers.push(("content-length".into(), length));
        let mut wire = b"\n\r\n".to_vec();
        wire.extend(sent.encode());
        wire.extend(b"\nRECEIPT\r\nreceipt-id:r\\c1\n\nno length here\0");
        wire.extend(b"MESSAGE\nk:first\nk:second\n\n\0");
        let mut r = reader_of(&wire);
        assert_eq!(r.read().await.unwrap(), Read::HeartBeat);
        assert_eq!(r.read().await.unwrap(), Read::HeartBeat);
        assert_eq!(frame(&mut r).await, sent);
        let receipt = frame(&mut r).await;
        assert_eq!(receipt.command, "RECEIPT");
        assert_eq!(receipt.header("receipt-id"), Some("r:1"));
        assert_eq!(receipt.body, b"no length here");
        let repeated = frame(&mut r).await;
        assert_eq!(repeated.header("k"), Some("first"));
        assert!(matches!(r.read().await, Err(StompError::Closed)));
    }

    #[test]
    fn connect_headers_are_not_escaped_and_others_are() {
        let connect = Frame::new("CONNECT", &[("passcode", "a:b")]).encode();
        assert_eq!(connect, b"CONNECT\npasscode:a:b\n\n\0");
        let ack = Frame::new("ACK", &[("id", "ID:x:1\n")]).encode();
        assert_eq!(ack, b"ACK\nid:ID\\cx\\c1\\n\n\n\0");
    }

    #[tokio::test]
    async fn bad_frames_are_protocol_errors() {
        for wire in [
            &b"MESSAGE\nno colon\n\n\0"[..],
            b"MESSAGE\nk:\\t\n\n\0",
            b"MESSAGE\ncontent-length:2\n\nabc\0",
            b"MESSAGE\ncontent-length:x\n\n\0",
        ] {
            let mut r = reader_of(wire);
            assert!(
                matches!(r.read().await, Err(StompError::Protocol(_))),
                "{:?}",
                String::from_utf8_lossy(wire)
            );
        }
        let mut r = reader_of(b"MESSAGE\ncontent-length:5\n\nab");
        assert!(matches!(r.read().await, Err(StompError::Closed)));
    }

    #[test]
    fn heart_beats_parse() {
        assert_eq!(parse_heart_beat("10000, 0"), Some((10_000, 0)));
        assert_eq!(parse_heart_beat("x,1"), None);
    }
}
