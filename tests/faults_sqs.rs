//! Fault injection against MiniStack's SQS: messages that wait inside the gateway for a
//! delivery permit must keep their visibility from the moment they were received, or SQS
//! hands them out again (a standard queue delivers them twice; a FIFO queue puts two
//! copies of a group in flight, out of order). Queues with very short or zero visibility
//! timeouts too.
//!
//! MiniStack honours VisibilityTimeout (queue attribute and ReceiveMessage parameter)
//! and ChangeMessageVisibility, and rejects stale receipt handles, as SQS does.
//!
//! And a long poll whose answer never comes (the flow dropped by a NAT, the peer gone
//! without a reset): the poller gives it up and polls again on a new connection.

mod common;

use std::collections::HashMap;
use std::time::Duration;

use common::freezer::Freezer;
use common::*;

const LONG: Duration = Duration::from_secs(180);

/// How often each body was delivered, failing at once on a second delivery (a received-
/// again message would otherwise keep the queue from draining until the timeout).
fn counts_once(f: &Function) -> HashMap<String, usize> {
    let mut counts: HashMap<String, usize> = HashMap::new();
    for i in f.invocations() {
        for (b, again) in i.bodies.iter().zip(&i.redelivered) {
            assert!(
                !again,
                "{b} was received again (ApproximateReceiveCount > 1)"
            );
            let n = counts.entry(b.clone()).or_default();
            *n += 1;
            assert_eq!(*n, 1, "{b} delivered twice");
        }
    }
    counts
}

/// Runs the gateway over `messages` until each body arrived once and the queue is empty;
/// asserts no body arrived twice.
async fn drain_once(
    client: &aws_sdk_sqs::Client,
    url: &str,
    f: &Function,
    messages: &[(Option<String>, String)],
    extra: &str,
) {
    send(client, url, messages).await;
    let gw = Gateway::start(&sqs_config(&f.name, url, extra).replace(
        &format!("queue_url = \"{url}\""),
        &format!("queue_url = \"{url}\"\nmax_concurrency = 2"),
    ));
    wait_for("every message delivered", LONG, || {
        (counts_once(f).len() == messages.len()).then_some(())
    })
    .await;
    // Deleted, not merely delivered: nothing visible, nothing in flight.
    let deadline = std::time::Instant::now() + LONG;
    while depth(client, url).await != (0, 0) {
        assert!(
            std::time::Instant::now() < deadline,
            "the queue never drained"
        );
        counts_once(f);
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert_eq!(gw.terminate().await.code(), Some(0));
    let counts = counts_once(f);
    for (_, body) in messages {
        assert_eq!(counts.get(body), Some(&1), "{body}");
    }
    assert_eq!(depth(client, url).await, (0, 0), "every message deleted");
}

/// A standard queue with this visibility timeout, `n` messages, a function sleeping
/// `sleep_ms` per invoke, batches of ten: drained with each message delivered once.
async fn standard_queue_drains_once(prefix: &str, visibility: u32, n: usize, sleep_ms: &str) {
    let client = sqs_client().await;
    let url = create_queue(&client, prefix, false, visibility).await;
    let messages: Vec<_> = (0..n).map(|i| (None, format!("m-{i}"))).collect();
    let f = Function::deploy(prefix, &[("SLEEP_MS", sleep_ms)]).await;
    drain_once(
        &client,
        &url,
        &f,
        &messages,
        "[mapping.batch]\nsize = 10\nwindow = \"200ms\"",
    )
    .await;
}

#[tokio::test]
async fn messages_waiting_for_a_permit_past_their_visibility_are_delivered_once() {
    // Six batches of ten, two at a time, each invoke twice the visibility timeout: the
    // last batches wait about three timeouts in the gateway before their invoke starts.
    standard_queue_drains_once("sqsheld", 2, 60, "4000").await;
}

#[tokio::test]
async fn fifo_groups_waiting_for_a_permit_stay_in_order_and_are_delivered_once() {
    let client = sqs_client().await;
    let url = create_queue(&client, "heldfifo", true, 2).await;
    // Receives of two (the batch size), six groups: SQS hands out each group to one
    // receiver at a time, so up to six batches are out while two run.
    let mut messages = Vec::new();
    for i in 0..4 {
        for g in 0..6 {
            messages.push((Some(format!("g{g}")), format!("g{g}-{i:02}")));
        }
    }
    let f = Function::deploy("sqsheldfifo", &[("SLEEP_MS", "3000")]).await;
    drain_once(&client, &url, &f, &messages, "[mapping.batch]\nsize = 2").await;
    let delivered = f.delivered();
    for g in 0..6 {
        let prefix = format!("g{g}-");
        let got: Vec<&String> = delivered
            .iter()
            .filter(|b| b.starts_with(&prefix))
            .collect();
        let want: Vec<String> = (0..4).map(|i| format!("g{g}-{i:02}")).collect();
        assert_eq!(got, want.iter().collect::<Vec<_>>(), "group {g} in order");
    }
}

#[tokio::test]
async fn a_queue_with_a_zero_visibility_timeout_is_delivered_once() {
    // Without an explicit visibility on receive, every poll would hand out the same
    // messages again at once.
    standard_queue_drains_once("sqszerovis", 0, 30, "1500").await;
}

#[tokio::test]
async fn a_long_poll_whose_answer_never_comes_is_given_up_and_the_queue_still_drains() {
    let client = sqs_client().await;
    let url = create_queue(&client, "sqsfrozen", false, 5).await;
    let f = Function::deploy("sqsfrozen", &[]).await;
    let proxy = Freezer::start(
        aws_endpoint().trim_start_matches("http://"),
        b"AmazonSQS.ReceiveMessage",
    );
    let config = sqs_config(
        &f.name,
        &url,
        "function_timeout = \"3s\"\n[mapping.batch]\nsize = 10\nwindow = \"100ms\"",
    )
    .replace(
        &format!("endpoint_url = \"{}\"", aws_endpoint()),
        &format!("endpoint_url = \"http://127.0.0.1:{}\"", proxy.port),
    );
    let gw = Gateway::start(&config);
    // The idle queue's long poll is out (20 s): its connection goes silent.
    wait_for("a long poll through the proxy", LONG, || {
        proxy.freeze_latest_marked().then_some(())
    })
    .await;
    let polls = proxy.marked();
    // The silenced poll takes the first ten at MiniStack and its answer is dropped: they
    // come back after the queue's 5 s visibility timeout.
    let messages: Vec<_> = (0..20).map(|i| (None, format!("frozen-{i}"))).collect();
    send(&client, &url, &messages).await;
    wait_for("every message delivered", LONG, || {
        (f.delivered().len() >= messages.len()).then_some(())
    })
    .await;
    assert!(
        proxy.marked() > polls,
        "the messages came through a new poll"
    );
    wait_for("the gateway closed the silent connection", LONG, || {
        (proxy.silenced_still_open() == 0).then_some(())
    })
    .await;
    // The count: every message delivered once and deleted, none left in the queue.
    wait_sqs_empty(&client, &url, LONG).await;
    assert_eq!(gw.terminate().await.code(), Some(0));
    let mut delivered = f.delivered();
    delivered.sort();
    let mut want: Vec<String> = messages.into_iter().map(|(_, b)| b).collect();
    want.sort();
    assert_eq!(delivered, want, "each message delivered once");
}
