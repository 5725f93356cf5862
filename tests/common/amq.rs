//! An ActiveMQ client of the tests' own, over the gateway's STOMP client
//! (`source::activemq::stomp`): publish with receipts, read queue depths from the
//! statistics plugin, drain a queue.

use std::time::{Duration, Instant};

use esm_gateway::source::activemq::config::broker;
use esm_gateway::source::activemq::stomp::{self, Frame, Read};

pub fn var(name: &str, default: &str) -> String {
    std::env::var(name).unwrap_or_else(|_| default.into())
}

pub fn amq_url() -> String {
    var("ESM_ACTIVEMQ_URL", "stomp://127.0.0.1:61613")
}

/// A STOMP connection of the test's own (producer, statistics, DLQ reader).
pub struct Amq {
    reader: stomp::Reader,
    writer: stomp::Writer,
    receipts: u64,
}

impl Amq {
    pub async fn connect() -> Amq {
        let b = broker(&amq_url()).unwrap();
        let (user, password) = (
            var("ESM_ACTIVEMQ_USER", "esm"),
            var("ESM_ACTIVEMQ_PASSWORD", "esm-stack"),
        );
        let (reader, writer, _) = stomp::connect(&stomp::Endpoint {
            host: &b.host,
            port: b.port,
            tls: false,
            ca_file: None,
            login: Some(&user),
            passcode: Some(&password),
            heart_beat: Duration::ZERO,
        })
        .await
        .expect("connect to ActiveMQ (is `scripts/stack up` running?)");
        Amq {
            reader,
            writer,
            receipts: 0,
        }
    }

    pub async fn frame(&mut self, timeout: Duration) -> Option<Frame> {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            match tokio::time::timeout_at(deadline, self.reader.read()).await {
                Err(_) => return None,
                Ok(Ok(Read::HeartBeat)) => {}
                Ok(Ok(Read::Frame(f))) => return Some(f),
                Ok(Err(e)) => panic!("reading from ActiveMQ: {e}"),
            }
        }
    }

    /// Sends `frames` with a receipt on the last and waits for it.
    pub async fn confirmed(&mut self, mut frames: Vec<Frame>) {
        self.receipts += 1;
        let id = format!("t-{}", self.receipts);
        frames
            .last_mut()
            .unwrap()
            .headers
            .push(("receipt".into(), id.clone()));
        for f in &frames {
            self.writer.send(f).await.unwrap();
        }
        self.writer.flush().await.unwrap();
        let f = self.frame(Duration::from_secs(30)).await.expect("receipt");
        assert_eq!(
            (f.command.as_str(), f.header("receipt-id")),
            ("RECEIPT", Some(id.as_str())),
            "{}",
            f.describe()
        );
    }

    /// Publishes persistent messages: even ones as text (no content-length), odd ones as
    /// bytes (with it), each with a `seq` property.
    pub async fn publish(&mut self, queue: &str, bodies: &[Vec<u8>]) {
        let destination = format!("/queue/{queue}");
        for (chunk_index, chunk) in bodies.chunks(200).enumerate() {
            let frames = chunk
                .iter()
                .enumerate()
                .map(|(i, body)| {
                    let n = chunk_index * 200 + i;
                    let seq = n.to_string();
                    let mut f = Frame::new(
                        "SEND",
                        &[
                            ("destination", &destination),
                            ("persistent", "true"),
                            ("seq", &seq),
                        ],
                    );
                    if n % 2 == 1 {
                        f.headers
                            .push(("content-length".into(), body.len().to_string()));
                    }
                    f.body = body.clone();
                    f
                })
                .collect();
            self.confirmed(frames).await;
        }
    }

    /// The queue's depth from the statistics plugin (0 for a queue that does not exist).
    pub async fn depth(&mut self, queue: &str) -> u64 {
        let reply = format!("/temp-queue/stats-{}", self.receipts);
        self.confirmed(vec![Frame::new(
            "SUBSCRIBE",
            &[
                ("destination", &reply),
                ("id", &reply),
                ("transformation", "jms-map-json"),
            ],
        )])
        .await;
        let statistics = format!("/queue/ActiveMQ.Statistics.Destination.{queue}");
        self.confirmed(vec![Frame::new(
            "SEND",
            &[("destination", &statistics), ("reply-to", &reply)],
        )])
        .await;
        let f = self.frame(Duration::from_secs(10)).await;
        self.confirmed(vec![Frame::new("UNSUBSCRIBE", &[("id", &reply)])])
            .await;
        let Some(f) = f else {
            return 0; // the plugin answers nothing for a destination that does not exist
        };
        let json: serde_json::Value = serde_json::from_slice(&f.body).unwrap();
        json["map"]["entry"]
            .as_array()
            .and_then(|e| e.iter().find(|e| e["string"] == "size"))
            .and_then(|e| e["long"].as_u64())
            .unwrap_or_else(|| panic!("no size in {json}"))
    }

    /// Waits until the queue's depth is `n`.
    pub async fn wait_depth(&mut self, queue: &str, n: u64, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        loop {
            let d = self.depth(queue).await;
            if d == n {
                return;
            }
            assert!(Instant::now() < deadline, "{queue} holds {d}, expected {n}");
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    /// Takes (and acks) every message of `queue` present now.
    pub async fn drain(&mut self, queue: &str) -> Vec<Frame> {
        let n = self.depth(queue).await;
        let destination = format!("/queue/{queue}");
        self.confirmed(vec![Frame::new(
            "SUBSCRIBE",
            &[
                ("destination", &destination),
                ("id", "drain"),
                ("ack", "auto"),
            ],
        )])
        .await;
        let mut out = Vec::new();
        while (out.len() as u64) < n {
            let f = self.frame(Duration::from_secs(10)).await.expect("message");
            if f.command == "MESSAGE" {
                out.push(f);
            }
        }
        self.confirmed(vec![Frame::new("UNSUBSCRIBE", &[("id", "drain")])])
            .await;
        out
    }
}
