//! A minimal stand-in for the Lambda Invoke API: `POST /2015-03-31/functions/{name}/invocations`
//! answers 200 with the body `null` (at once, or after a configurable delay) and counts the
//! records of each event. It can also fail one invoke in every `fail_every`, with a partial
//! batch response naming every record of the invoke (issue 15's "errors do not collapse
//! throughput").
//!
//! It shares the machine's cores with the broker and the gateway, so it does as little as
//! possible: records are counted with one pass over the body (see [`EventKind::count_records`]) and
//! only the first event is parsed in full, to check that the count is right.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use axum::Router;
use axum::body::Bytes;
use axum::extract::{DefaultBodyLimit, State};
use axum::routing::post;
use tokio::sync::Notify;

/// The kind of event the stub expects, which decides how it counts records.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EventKind {
    /// `aws:rmq`: one `"basicProperties"` key per record.
    RabbitMq,
    /// `SelfManagedKafka`: one `"offset"` key per record.
    Kafka,
    /// `aws:mq` (ActiveMQ): one `"messageID"` key per record, in a `messages` array.
    ActiveMq,
}

/// How the stub behaves.
#[derive(Clone, Copy, Debug)]
pub struct Options {
    /// Records to wait for; [`Stats::done`] is notified once they have all arrived.
    pub target: u64,
    pub kind: EventKind,
    /// How long each invoke takes before it is answered (an async sleep: concurrent
    /// invokes overlap). Zero answers at once, without touching the timer.
    pub delay: Duration,
    /// Every this many invokes (the `fail_every`th, `2 × fail_every`th, …) one fails: it
    /// answers a partial batch response naming every record's message id, and none of them
    /// counts as delivered. Zero: never. RabbitMQ events only (`basicProperties.messageId`).
    pub fail_every: u64,
    /// Records after which [`Stats::milestone_reached`] is set, to time a drain without the
    /// tail of its last retries. Zero: never.
    pub milestone: u64,
}

impl Options {
    /// `target` records of `kind`, answered at once, none failed.
    pub fn new(target: u64, kind: EventKind) -> Options {
        Options {
            target,
            kind,
            delay: Duration::ZERO,
            fail_every: 0,
            milestone: 0,
        }
    }
}

/// What the stub has seen.
pub struct Stats {
    /// Records to wait for; [`Stats::done`] is notified once they have all arrived.
    target: u64,
    kind: EventKind,
    delay: Duration,
    fail_every: u64,
    milestone: u64,
    records: AtomicU64,
    /// Invokes answered with a partial batch response.
    failed: AtomicU64,
    invokes: AtomicU64,
    /// Invokes being answered now, and the most seen at once.
    in_flight: AtomicU64,
    max_in_flight: AtomicU64,
    /// When the first invoke arrived, and its record count.
    first_invoke: OnceLock<(Instant, u64)>,
    target_reached: OnceLock<Instant>,
    milestone_reached: OnceLock<Instant>,
    /// Set if the first event's record count disagrees with its parsed JSON.
    bad_event: OnceLock<String>,
    done: Notify,
}

impl Stats {
    pub fn records(&self) -> u64 {
        self.records.load(Ordering::Relaxed)
    }
    pub fn invokes(&self) -> u64 {
        self.invokes.load(Ordering::Relaxed)
    }
    /// Invokes answered with a partial batch response.
    pub fn failed(&self) -> u64 {
        self.failed.load(Ordering::Relaxed)
    }
    /// When the count of delivered records reached [`Options::milestone`].
    pub fn milestone_reached(&self) -> Option<Instant> {
        self.milestone_reached.get().copied()
    }
    /// The most invokes the stub was answering at once.
    pub fn max_in_flight(&self) -> u64 {
        self.max_in_flight.load(Ordering::Relaxed)
    }
    /// When the first invoke arrived, and how many records it carried.
    pub fn first_invoke(&self) -> Option<(Instant, u64)> {
        self.first_invoke.get().copied()
    }
    /// When the request that brought the total to the target was answered.
    pub fn target_reached(&self) -> Option<Instant> {
        self.target_reached.get().copied()
    }
    pub fn bad_event(&self) -> Option<&str> {
        self.bad_event.get().map(String::as_str)
    }
    /// Resolves once the target is reached (at once if it already was).
    pub async fn done(&self) {
        self.done.notified().await;
    }
}

/// Starts an `aws:rmq` stub that answers at once, on 127.0.0.1 with a free port, on the
/// current tokio runtime.
pub async fn start(target: u64) -> std::io::Result<(SocketAddr, Arc<Stats>)> {
    start_with(Options::new(target, EventKind::RabbitMq)).await
}

/// Starts a stub on 127.0.0.1 with a free port, on the current tokio runtime.
pub async fn start_with(options: Options) -> std::io::Result<(SocketAddr, Arc<Stats>)> {
    let stats = Arc::new(Stats {
        target: options.target,
        kind: options.kind,
        delay: options.delay,
        fail_every: options.fail_every,
        milestone: options.milestone,
        records: AtomicU64::new(0),
        failed: AtomicU64::new(0),
        invokes: AtomicU64::new(0),
        in_flight: AtomicU64::new(0),
        max_in_flight: AtomicU64::new(0),
        first_invoke: OnceLock::new(),
        target_reached: OnceLock::new(),
        milestone_reached: OnceLock::new(),
        bad_event: OnceLock::new(),
        done: Notify::new(),
    });
    let app = Router::new()
        .route("/2015-03-31/functions/{name}/invocations", post(invoke))
        // Events can be up to 6 MB (large batches); axum's default limit is 2 MB.
        .layer(DefaultBodyLimit::disable())
        .with_state(stats.clone());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    tokio::spawn(async move {
        if let Err(e) = axum::serve(listener, app).await {
            eprintln!("lambda stub stopped: {e}");
        }
    });
    Ok((addr, stats))
}

async fn invoke(State(stats): State<Arc<Stats>>, body: Bytes) -> String {
    let arrived = Instant::now();
    let mut n = stats.kind.count_records(&body);
    if stats.first_invoke.set((arrived, n)).is_ok()
        && let Err(e) = stats.kind.check_event(&body, n)
    {
        let _ = stats.bad_event.set(e);
    }
    if !stats.delay.is_zero() {
        // The records count once the invoke is answered, as the gateway sees it.
        let now = stats.in_flight.fetch_add(1, Ordering::Relaxed) + 1;
        stats.max_in_flight.fetch_max(now, Ordering::Relaxed);
        tokio::time::sleep(stats.delay).await;
        stats.in_flight.fetch_sub(1, Ordering::Relaxed);
    }
    let invoke = stats.invokes.fetch_add(1, Ordering::Relaxed) + 1;
    let mut answer = String::from("null");
    if stats.fail_every > 0 && invoke.is_multiple_of(stats.fail_every) {
        // The named records are not delivered: they come back in later invokes.
        let ids = message_ids(&body);
        let items: Vec<String> = ids
            .iter()
            .map(|id| format!(r#"{{"itemIdentifier":"{id}"}}"#))
            .collect();
        answer = format!(r#"{{"batchItemFailures":[{}]}}"#, items.join(","));
        n = n.saturating_sub(ids.len() as u64);
        stats.failed.fetch_add(1, Ordering::Relaxed);
    }
    let total = stats.records.fetch_add(n, Ordering::Relaxed) + n;
    if stats.milestone > 0 && total >= stats.milestone {
        let _ = stats.milestone_reached.set(Instant::now());
    }
    if total >= stats.target && stats.target_reached.set(Instant::now()).is_ok() {
        // notify_one keeps a permit if nobody is waiting yet, so the wake-up is not lost.
        stats.done.notify_one();
    }
    answer
}

/// The `"messageId":"…"` values of an event (ids without quotes or escapes, as the
/// benches publish them).
fn message_ids(body: &[u8]) -> Vec<&str> {
    const KEY: &[u8] = br#""messageId":""#;
    let mut ids = Vec::new();
    let mut rest = body;
    while let Some(at) = rest.windows(KEY.len()).position(|w| w == KEY) {
        rest = &rest[at + KEY.len()..];
        let Some(len) = rest.iter().position(|&b| b == b'"') else {
            break;
        };
        if let Ok(id) = std::str::from_utf8(&rest[..len]) {
            ids.push(id);
        }
        rest = &rest[len..];
    }
    ids
}

impl EventKind {
    /// The key each record has exactly once, the `eventSource` and the object that holds
    /// the records (one queue or partition per event, as the gateway sends them).
    fn shape(self) -> (&'static [u8], &'static str, &'static str) {
        match self {
            EventKind::RabbitMq => (b"basicProperties", "aws:rmq", "rmqMessagesByQueue"),
            EventKind::Kafka => (b"offset", "SelfManagedKafka", "records"),
            EventKind::ActiveMq => (b"messageID", "aws:mq", "messages"),
        }
    }

    /// Records in an event, by its per-record key. Bodies, keys and values are base64
    /// (no quotes) and Kafka header values are arrays of numbers, so splitting on quotes
    /// yields few pieces, and the key is the only piece equal to it (JSON punctuation
    /// between strings never is; as long as no topic or header is named `offset`). One
    /// cheap pass, no parsing.
    pub fn count_records(self, body: &[u8]) -> u64 {
        let (key, _, _) = self.shape();
        body.split(|&b| b == b'"')
            .filter(|piece| *piece == key)
            .count() as u64
    }

    /// Parses `body` in full and checks it is an event of this kind holding `expected`
    /// records of one queue or partition.
    fn check_event(self, body: &[u8], expected: u64) -> Result<(), String> {
        let (_, source, field) = self.shape();
        let v: serde_json::Value =
            serde_json::from_slice(body).map_err(|e| format!("event is not JSON: {e}"))?;
        if v["eventSource"] != source {
            return Err(format!("eventSource is {}", v["eventSource"]));
        }
        let records = if self == EventKind::ActiveMq {
            &v[field]
        } else {
            let groups = v[field]
                .as_object()
                .ok_or_else(|| format!("no {field} object"))?;
            let [(_, records)] = groups.iter().collect::<Vec<_>>()[..] else {
                return Err(format!("{} entries in {field}", groups.len()));
            };
            records
        };
        let parsed = records.as_array().ok_or("records are not an array")?.len() as u64;
        if parsed == expected {
            Ok(())
        } else {
            Err(format!(
                "first event: fast count {expected}, parsed {parsed} records"
            ))
        }
    }
}
