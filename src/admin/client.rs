//! A minimal HTTP/1.1 client for the admin API, used by `esm-gateway status` and
//! `esm-gateway health` (the container image has no curl). Plain `http://` only: the
//! admin listener is meant for loopback or a private network.

use std::io::{Read, Write};
use std::net::{TcpStream, ToSocketAddrs};
use std::time::Duration;

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("admin URL {0:?} is not of the form http://host:port")]
    Url(String),
    #[error("cannot reach the admin API at {url}: {source}")]
    Io { url: String, source: std::io::Error },
    #[error("the admin API at {0} sent a malformed response")]
    Malformed(String),
}

/// A response: status code and body.
#[derive(Debug)]
pub struct Reply {
    pub status: u16,
    pub body: String,
}

/// `GET base/path`.
pub fn get(base: &str, path: &str) -> Result<Reply, ClientError> {
    request("GET", base, path, None)
}

/// `GET base/path` with an optional bearer token (`[admin] read_token`).
pub fn get_with_token(base: &str, path: &str, token: Option<&str>) -> Result<Reply, ClientError> {
    request("GET", base, path, token)
}

/// `POST base/path` with an optional bearer token and no body.
pub fn post(base: &str, path: &str, token: Option<&str>) -> Result<Reply, ClientError> {
    request("POST", base, path, token)
}

fn request(
    method: &str,
    base: &str,
    path: &str,
    token: Option<&str>,
) -> Result<Reply, ClientError> {
    let authority = base
        .strip_prefix("http://")
        .map(|a| a.trim_end_matches('/'))
        .filter(|a| !a.is_empty() && !a.contains('/'))
        .ok_or_else(|| ClientError::Url(base.to_owned()))?;
    let url = format!("http://{authority}{path}");
    let io = |source| ClientError::Io {
        url: url.clone(),
        source,
    };
    let timeout = Duration::from_secs(5);
    let addr = authority
        .to_socket_addrs()
        .map_err(io)?
        .next()
        .ok_or_else(|| ClientError::Url(base.to_owned()))?;
    let mut stream = TcpStream::connect_timeout(&addr, timeout).map_err(io)?;
    stream.set_read_timeout(Some(timeout)).map_err(io)?;
    stream.set_write_timeout(Some(timeout)).map_err(io)?;
    let auth = token.map_or(String::new(), |t| format!("Authorization: Bearer {t}\r\n"));
    write!(
        stream,
        "{method} {path} HTTP/1.1\r\nHost: {authority}\r\n{auth}Content-Length: 0\r\nConnection: close\r\n\r\n"
    )
    .map_err(io)?;
    let mut raw = Vec::new();
    stream.read_to_end(&mut raw).map_err(io)?;
    parse(&raw).ok_or(ClientError::Malformed(url))
}

fn parse(raw: &[u8]) -> Option<Reply> {
    let split = raw.windows(4).position(|w| w == b"\r\n\r\n")?;
    let head = std::str::from_utf8(&raw[..split]).ok()?;
    let body = &raw[split + 4..];
    let status = head.split_whitespace().nth(1)?.parse().ok()?;
    let chunked = head.lines().any(|l| {
        let l = l.to_ascii_lowercase();
        l.starts_with("transfer-encoding:") && l.contains("chunked")
    });
    let body = if chunked {
        dechunk(body)?
    } else {
        body.to_vec()
    };
    Some(Reply {
        status,
        body: String::from_utf8_lossy(&body).into_owned(),
    })
}

fn dechunk(mut body: &[u8]) -> Option<Vec<u8>> {
    let mut out = Vec::new();
    loop {
        let line_end = body.windows(2).position(|w| w == b"\r\n")?;
        let size_text = std::str::from_utf8(&body[..line_end]).ok()?;
        let size = usize::from_str_radix(size_text.split(';').next()?.trim(), 16).ok()?;
        body = &body[line_end + 2..];
        if size == 0 {
            return Some(out);
        }
        out.extend_from_slice(body.get(..size)?);
        body = body.get(size + 2..)?;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_plain_and_chunked_responses() {
        let r = parse(b"HTTP/1.1 200 OK\r\ncontent-length: 3\r\n\r\nok\n").unwrap();
        assert_eq!((r.status, r.body.as_str()), (200, "ok\n"));
        let r = parse(
            b"HTTP/1.1 503 Service Unavailable\r\nTransfer-Encoding: chunked\r\n\r\n4\r\nabcd\r\n2\r\nef\r\n0\r\n\r\n",
        )
        .unwrap();
        assert_eq!((r.status, r.body.as_str()), (503, "abcdef"));
        assert!(parse(b"garbage").is_none());
    }

    #[test]
    fn only_plain_http_urls_are_accepted() {
        for bad in ["https://h:1", "h:1", "http://", "http://h:1/x"] {
            assert!(matches!(get(bad, "/"), Err(ClientError::Url(_))), "{bad}");
        }
    }
}
