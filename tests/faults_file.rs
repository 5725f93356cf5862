//! Faults at the file edges of parking: a full filesystem under the file destination and
//! under the payload files of a size-limited destination, a redrive while the gateway
//! keeps parking into the same file, and size rotation. Every record ends delivered,
//! parked (a whole line in a destination file, or a whole payload file), or still in the
//! RabbitMQ queue: nothing else.

mod common;

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use common::*;
use serde_json::Value;

const LONG: Duration = Duration::from_secs(180);
const PARKED: &str = "records parked in the on-failure destination";
const UNAVAILABLE: &str = "on-failure destination unavailable";

/// A tmpfs of a fixed size mounted on a fresh directory, unmounted when dropped (also
/// when the test fails), so that a write there can run out of space.
struct Tmpfs {
    dir: tempfile::TempDir,
}

impl Tmpfs {
    fn mount(size: &str) -> Tmpfs {
        let dir = tempfile::tempdir().unwrap();
        let status = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(dir.path())
            .status()
            .unwrap();
        assert!(status.success(), "mount a tmpfs (the tests run as root)");
        Tmpfs { dir }
    }

    /// Grows the filesystem in place: what it holds stays.
    fn grow(&self, size: &str) {
        let status = Command::new("mount")
            .args(["-o", &format!("remount,size={size}")])
            .arg(self.dir.path())
            .status()
            .unwrap();
        assert!(status.success());
    }

    fn path(&self) -> &Path {
        self.dir.path()
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        // Lazy: a gateway still holding a file there must not keep the mount alive.
        let _ = Command::new("umount")
            .arg("-l")
            .arg(self.dir.path())
            .status();
    }
}

/// `n` bodies of about 3 KB, each starting with its own `msg-0000-`.
fn big_bodies(n: usize) -> Vec<Vec<u8>> {
    (0..n)
        .map(|i| format!("msg-{i:04}-{}", "x".repeat(3000)).into_bytes())
        .collect()
}

/// The `msg-0000` of each RabbitMQ message in failure records.
fn parked_ids(records: &[Value]) -> Vec<String> {
    records
        .iter()
        .flat_map(|r| {
            r["payload"]["rmqMessagesByQueue"]
                .as_object()
                .expect("a RabbitMQ payload")
                .values()
                .flat_map(|msgs| msgs.as_array().unwrap().clone())
                .map(|m| m["basicProperties"]["messageId"].as_str().unwrap()[3..11].to_owned())
                .collect::<Vec<_>>()
        })
        .collect()
}

/// Asserts that `ids` has no duplicate and returns them as a set.
fn distinct(ids: Vec<String>) -> BTreeSet<String> {
    let set: BTreeSet<String> = ids.iter().cloned().collect();
    assert_eq!(set.len(), ids.len(), "a record is there twice: {ids:?}");
    set
}

fn file_destination(path: &Path, extra: &str) -> String {
    format!(
        "[mapping.on_failure]\ntype = \"file\"\npath = \"{}\"\n{extra}",
        path.display()
    )
}

/// Batches of one, parked after their first failure, a short backoff on the destination.
fn parking(extra: &str, on_failure: &str) -> String {
    format!(
        "{extra}\n[mapping.batch]\nsize = 1\n\n[mapping.retry]\nmax_attempts = 0\nbackoff_min = \"10ms\"\nbackoff_max = \"200ms\"\n\n{on_failure}"
    )
}

/// Publishes 60 records of 3 KB to a fresh queue, for a function that fails them all,
/// to be parked in `on_failure` (it writes on `fs`, 64 KiB): runs the gateway until the
/// filesystem is full, and checks that every record is either parked (`parked` lists the
/// records kept whole on `fs`) or still in the queue; then grows the filesystem and runs
/// the gateway until the rest are parked, and checks that the queue is empty.
async fn fill_then_grow(
    prefix: &str,
    fs: &Tmpfs,
    on_failure: &str,
    parked: impl Fn() -> Vec<Value>,
) {
    let rabbit = Rabbit::connect().await;
    let queue = rabbit.queue(prefix).await;
    // A short error text: the default one quotes the 3 KB body, and would make even the
    // metadata too large for the 1 KiB messages (then kept whole in payload_dir instead).
    let f = Function::deploy(prefix, &[("FAIL_ALL", "1"), ("ERROR_MESSAGE", "failed")]).await;
    rabbit.publish(&queue, big_bodies(60)).await;
    let config = rabbit_config(&f.name, &queue, &parking("", on_failure));

    let gw = Gateway::start(&config);
    // Full: the mapping keeps retrying one record (or, when writes fail silently, it
    // reports all of them parked).
    wait_for("the destination to fill up", LONG, || {
        (gw.log_count(UNAVAILABLE) >= 3 || gw.log_count(PARKED) >= 60).then_some(())
    })
    .await;
    assert_eq!(gw.terminate().await.code(), Some(0));
    let kept = distinct(parked_ids(&parked())).len();
    let ready = rabbit.ready(&queue).await as usize;
    assert!(kept < 60, "the filesystem filled up");
    assert_eq!(
        kept + ready,
        60,
        "every record is parked whole or still in the queue ({kept} parked, {ready} in the queue)"
    );

    // Room again: the rest are parked, after the ones already there.
    fs.grow("4m");
    let gw = Gateway::start(&config);
    gw.wait_log_count(PARKED, ready, LONG).await;
    assert_eq!(gw.terminate().await.code(), Some(0));
    assert_eq!(rabbit.ready(&queue).await, 0);
    assert!(f.delivered().is_empty());
    rabbit.delete(&queue).await;
}

#[tokio::test]
async fn a_full_filesystem_under_the_file_destination_acknowledges_nothing_unwritten() {
    let fs = Tmpfs::mount("64k");
    let file = fs.path().join("parked.jsonl");
    fill_then_grow("ffull", &fs, &file_destination(&file, ""), || {
        failure_records(&file)
    })
    .await;
    assert_eq!(distinct(parked_ids(&failure_records(&file))).len(), 60);
}

/// Receives every message of an SQS queue (hidden for the rest of the test).
async fn drain_sqs(sqs: &aws_sdk_sqs::Client, url: &str) -> Vec<Value> {
    let mut all = Vec::new();
    loop {
        let out = sqs
            .receive_message()
            .queue_url(url)
            .max_number_of_messages(10)
            .wait_time_seconds(1)
            .visibility_timeout(600)
            .send()
            .await
            .unwrap();
        if out.messages().is_empty() {
            return all;
        }
        for m in out.messages() {
            all.push(serde_json::from_str(m.body().unwrap()).unwrap());
        }
    }
}

/// The whole failure record a payload file holds (it must be whole JSON).
fn payload_file(location: &str) -> Value {
    let path = location.strip_prefix("file://").unwrap();
    let text = std::fs::read_to_string(path).unwrap();
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("payload file {path} is not whole: {e}"))
}

#[tokio::test]
async fn a_full_filesystem_under_the_payload_dir_acknowledges_nothing_unwritten() {
    let fs = Tmpfs::mount("64k");
    let sqs = sqs_client().await;
    let url = sqs_queue(&sqs, "fpayload").await;
    // Every failure record is above the message limit: its payload goes to a file.
    let on_failure = format!(
        "[mapping.on_failure]\ntype = \"sqs\"\nqueue_url = \"{url}\"\nmax_message_bytes = 1024\npayload_dir = \"{}\"",
        fs.path().display()
    );
    fill_then_grow("fpayload", &fs, &on_failure, || {
        std::fs::read_dir(fs.path())
            .unwrap()
            .map(|e| e.unwrap().path())
            .filter(|p| p.extension().is_some_and(|x| x == "json"))
            .map(|p| payload_file(&format!("file://{}", p.display())))
            .collect()
    })
    .await;
    // Each message names a whole payload file; together they hold every record once.
    let whole: Vec<Value> = drain_sqs(&sqs, &url)
        .await
        .iter()
        .map(|m| payload_file(m["payloadLocation"].as_str().expect("payloadLocation")))
        .collect();
    assert_eq!(distinct(parked_ids(&whole)).len(), 60);
}

/// The file destination's file and its rotated files `<path>.<n>`, oldest first.
fn destination_files(path: &Path) -> Vec<PathBuf> {
    let name = path.file_name().unwrap().to_str().unwrap().to_owned();
    let mut rotated: Vec<(u64, PathBuf)> = std::fs::read_dir(path.parent().unwrap())
        .unwrap()
        .filter_map(|e| {
            let e = e.unwrap();
            let n = e
                .file_name()
                .to_str()?
                .strip_prefix(&format!("{name}."))?
                .parse()
                .ok()?;
            Some((n, e.path()))
        })
        .collect();
    rotated.sort();
    let mut files: Vec<PathBuf> = rotated.into_iter().map(|(_, p)| p).collect();
    files.push(path.to_owned());
    files
}

/// Every failure record in the destination's files (each line must be whole JSON).
fn all_records(path: &Path) -> Vec<Value> {
    destination_files(path)
        .iter()
        .flat_map(|p| failure_records(p))
        .collect()
}

/// A function that fails each body once (so the gateway parks it) and takes it when a
/// redrive replays it, and a config parking into `file` with `destination_extra`.
async fn fail_once_then_redrive(
    prefix: &str,
    n: usize,
    destination_extra: &str,
) -> (Function, Rabbit, String, PathBuf, PathBuf) {
    let bodies = numbered_strings(0..n).join(",");
    let f = Function::deploy(prefix, &[("FAIL_ONCE", &bodies)]).await;
    let rabbit = Rabbit::connect().await;
    let queue = rabbit.queue(prefix).await;
    let file = f.dir.path().join("parked.jsonl");
    let config = f.dir.path().join("gateway.toml");
    std::fs::write(
        &config,
        rabbit_config(
            &f.name,
            &queue,
            &parking(
                "report_batch_item_failures = true",
                &file_destination(&file, destination_extra),
            ),
        ),
    )
    .unwrap();
    (f, rabbit, queue, file, config)
}

#[tokio::test]
async fn a_redrive_while_the_gateway_keeps_parking_into_the_same_file_loses_nothing() {
    let (f, rabbit, queue, file, config) = fail_once_then_redrive("fredrive", 120, "").await;
    rabbit.publish(&queue, numbered(120)).await;
    let gw = Gateway::start(&std::fs::read_to_string(&config).unwrap());
    // Redrives while the gateway parks the rest into the same file, until one of them
    // ran while it parked more (asserting that the second of two did was a race that a
    // quick redrive could lose).
    gw.wait_log_count(PARKED, 10, LONG).await;
    wait_for("a redrive while the gateway parked more", LONG, || {
        let during = gw.log_count(PARKED);
        assert!(during < 120, "no redrive ran while the gateway was parking");
        let out = redrive(&config, &[]);
        assert!(out.contains("remaining 0"), "{out}");
        (gw.log_count(PARKED) > during).then_some(())
    })
    .await;
    gw.wait_log_count(PARKED, 120, LONG).await;
    assert_eq!(gw.terminate().await.code(), Some(0));
    let last = redrive(&config, &[]);
    assert!(last.contains("remaining 0"), "{last}");

    // Every record was parked once and then delivered once by a redrive; none is left.
    let delivered = distinct(f.delivered());
    assert_eq!(delivered, numbered_strings(0..120).into_iter().collect());
    assert!(all_records(&file).is_empty());
    assert_eq!(rabbit.ready(&queue).await, 0);
    rabbit.delete(&queue).await;
}

#[tokio::test]
async fn rotation_keeps_every_parked_record_and_redrive_reads_the_rotated_files() {
    let (f, rabbit, queue, file, config) =
        fail_once_then_redrive("frotate", 30, "rotate_bytes = 3000").await;
    rabbit.publish(&queue, numbered(30)).await;
    let gw = Gateway::start(&std::fs::read_to_string(&config).unwrap());
    gw.wait_log_count(PARKED, 30, LONG).await;
    assert_eq!(gw.terminate().await.code(), Some(0));
    let files = destination_files(&file);
    assert_eq!(
        distinct(parked_ids(&all_records(&file))),
        numbered_strings(0..30).into_iter().collect(),
        "the lines across {files:?} are every parked record"
    );
    assert!(
        files.len() > 6,
        "rotated more often than the old keep of 5: {files:?}"
    );
    assert_eq!(rabbit.ready(&queue).await, 0);
    assert!(f.delivered().is_empty());

    let out = redrive(&config, &[]);
    assert!(
        out.contains("replayed 30, removed 30, remaining 0"),
        "{out}"
    );
    assert_eq!(
        distinct(f.delivered()),
        numbered_strings(0..30).into_iter().collect()
    );
    assert!(all_records(&file).is_empty());
    rabbit.delete(&queue).await;
}
