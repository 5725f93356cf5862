//! Fault injection on a mapping's supervisor: a burst of admin requests while the mapping
//! drains must not queue without bound. Past the supervisor's bounded command queue an
//! enable or disable is refused at once (503, saying why), the queued ones are all
//! answered, and no record is lost or delivered twice.

mod common;

use std::time::Duration;

use common::*;

const LONG: Duration = Duration::from_secs(120);

#[tokio::test]
async fn a_burst_of_disables_while_draining_is_bounded_and_each_one_is_answered() {
    let rabbit = Rabbit::connect().await;
    let queue = rabbit.queue("burst").await;
    // One batch whose invoke runs for a while: the disable drains it meanwhile.
    let f = Function::deploy("burst", &[("SLEEP_MS", "3000")]).await;
    rabbit.publish(&queue, numbered(5)).await;
    let gw = Gateway::start(&rabbit_config(
        &f.name,
        &queue,
        "[mapping.batch]\nsize = 5\nwindow = \"200ms\"",
    ));
    gw.wait_admin().await;
    let labels = [("mapping", "test"), ("source", "rabbitmq")];
    wait_for("the batch in flight", LONG, || {
        (gw.metrics().find("esm_gateway_batches_in_flight", &labels) == Some(1.0)).then_some(())
    })
    .await;

    let answers: Vec<(u16, String)> = std::thread::scope(|s| {
        let first = s.spawn(|| gw.post("/mappings/test/disable", Some(ADMIN_TOKEN)));
        // The supervisor is draining, so it takes no command until the invoke returns.
        while gw.mapping("test")["state"].as_str() != Some("draining") {
            assert!(!first.is_finished(), "the disable returned before draining");
            std::thread::yield_now();
        }
        let burst: Vec<_> = (0..30)
            .map(|_| s.spawn(|| gw.post("/mappings/test/disable", Some(ADMIN_TOKEN))))
            .collect();
        let mut answers: Vec<_> = burst.into_iter().map(|t| t.join().unwrap()).collect();
        answers.push(first.join().unwrap());
        answers
    });
    let statuses: Vec<u16> = answers.iter().map(|(status, _)| *status).collect();
    let ok = answers.iter().filter(|(status, _)| *status == 200).count();
    let busy = answers
        .iter()
        .filter(|(status, body)| {
            *status == 503 && body.contains("enables and disables waiting while it drains")
        })
        .count();
    assert_eq!(ok + busy, answers.len(), "only 200 or busy: {answers:?}");
    assert!(busy > 0, "the burst was queued without bound: {statuses:?}");
    assert!(ok > 1, "queued requests are answered too: {statuses:?}");

    // Every record: delivered once by the drained batch, none left in the broker.
    let mut delivered = f.wait_delivered(5, LONG).await;
    assert_eq!(gw.mapping("test")["state"].as_str(), Some("disabled"));
    assert_eq!(gw.terminate().await.code(), Some(0));
    delivered.sort();
    assert_eq!(
        delivered,
        numbered_strings(0..5).into_iter().collect::<Vec<_>>()
    );
    assert_eq!(f.delivered().len(), 5, "nothing delivered twice");
    assert_eq!(rabbit.ready(&queue).await, 0);
    rabbit.delete(&queue).await;
}
