//! Fault injection: partial batch responses that name an item more than once or name an
//! id two records share. Every record with a reported id must be retried; acking one
//! copy of a reported failure would lose it.
//!
//! Shares the local stack's RabbitMQ with the other integration tests, so
//! `.config/nextest.toml` runs it in the one-at-a-time `stack` group.

mod common;

use std::time::Duration;

use common::*;

const LONG: Duration = Duration::from_secs(120);

#[tokio::test]
async fn every_record_with_a_reported_message_id_is_retried() {
    let rabbit = Rabbit::connect().await;
    let queue = rabbit.queue("dup-ids").await;
    let f = Function::deploy("dup-ids", &[("FAIL_ONCE", "msg-0003")]).await;
    // Seven messages, two of them `msg-0003` with the one message id `id-msg-0003`.
    let mut bodies = numbered(6);
    bodies.push(b"msg-0003".to_vec());
    rabbit.publish(&queue, bodies).await;

    let gw = Gateway::start(&rabbit_config(&f.name, &queue, PARTIAL_BATCH));
    f.wait_invocations(2, LONG).await;
    assert_eq!(gw.terminate().await.code(), Some(0));

    let inv = f.invocations();
    assert_eq!(inv[0].bodies.len(), 7, "one batch of all seven: {inv:?}");
    assert_eq!(inv[0].failed, ["id-msg-0003"]);
    assert_eq!(
        inv[1].bodies,
        ["msg-0003", "msg-0003"],
        "both records that carry the reported id are retried: {inv:?}"
    );
    // The count: all seven delivered (two copies of msg-0003), none left in the queue.
    let mut delivered = f.delivered();
    delivered.sort();
    let mut expected = numbered_strings(0..6);
    expected.push("msg-0003".into());
    expected.sort();
    assert_eq!(delivered, expected);
    assert_eq!(rabbit.ready(&queue).await, 0);
    rabbit.delete(&queue).await;
}
