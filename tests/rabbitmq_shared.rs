//! Shared AMQP connections, against the local RabbitMQ: many mappings on one broker share
//! a few connections, one channel each; a channel that fails recovers alone, and a
//! connection that fails recovers all its channels. Connections are counted by the
//! broker (`rabbitmqctl`), not by the gateway.

mod common;

use std::collections::BTreeSet;
use std::time::Duration;

use common::*;

const LONG: Duration = Duration::from_secs(180);

/// Upper bound on the connections of a gateway whose mappings all reach one broker:
/// 256 channels share a connection, so 1,000 mappings need 4.
fn connections_for(mappings: usize) -> usize {
    mappings.div_ceil(256)
}

/// `n` fresh queues and a gateway config with one mapping on each, into `function`.
async fn queues_and_mappings(
    rabbit: &Rabbit,
    prefix: &str,
    n: usize,
    function: &str,
) -> (Vec<String>, String) {
    let mut queues = Vec::with_capacity(n);
    let mut config = gateway_header();
    for i in 0..n {
        let q = rabbit.queue(&format!("{prefix}{i}")).await;
        config += &rabbit_mapping(&format!("{prefix}-{i}"), function, &q, "");
        queues.push(q);
    }
    (queues, config)
}

#[tokio::test]
async fn a_thousand_mappings_share_four_connections_and_each_receives_its_message() {
    const N: usize = 1000;
    let rabbit = Rabbit::connect().await;
    let f = Function::deploy("many", &[]).await;
    let (queues, config) = queues_and_mappings(&rabbit, "many", N, &f.name).await;
    let gw = Gateway::start(&config);
    for q in &queues {
        rabbit.publish(q, [q.clone().into_bytes()]).await;
    }

    let delivered: BTreeSet<String> = f.wait_delivered(N, LONG).await.into_iter().collect();
    let expected: BTreeSet<String> = queues.iter().cloned().collect();
    assert_eq!(
        delivered, expected,
        "every mapping received its queue's message"
    );
    let connections = gateway_connections(gw.pid());
    assert!(
        !connections.is_empty() && connections.len() <= connections_for(N),
        "{N} mappings on one broker take at most {} connections, not {}",
        connections_for(N),
        connections.len()
    );

    assert_eq!(gw.terminate().await.code(), Some(0));
    assert_eq!(f.delivered().len(), N, "each message once");
    for q in &queues {
        assert_eq!(rabbit.ready(q).await, 0, "{q} was acknowledged");
        rabbit.delete(q).await;
    }
}

#[tokio::test]
async fn a_failed_channel_recovers_alone_on_the_shared_connection() {
    let rabbit = Rabbit::connect().await;
    let (gone, steady) = (rabbit.queue("gone").await, rabbit.queue("steady").await);
    let f = Function::deploy("alone", &[]).await;
    let config = gateway_header()
        + &rabbit_mapping("gone", &f.name, &gone, "")
        + &rabbit_mapping("steady", &f.name, &steady, "");
    let gw = Gateway::start(&config);
    gw.wait_log_count("consuming", 2, LONG).await;
    let before = gateway_connections(gw.pid());
    assert_eq!(before.len(), 1, "two mappings, one connection");

    // Deleting a queue cancels its consumer; its mapping's channel fails and its
    // reconnects find no queue until it is declared again.
    rabbit.delete(&gone).await;
    gw.wait_log("RabbitMQ session ended", LONG).await;
    rabbit.publish(&steady, numbered(5)).await;
    f.wait_delivered(5, LONG).await;
    assert_eq!(
        gateway_connections(gw.pid()),
        before,
        "the connection outlived the failed channel"
    );

    // Declared again, the queue is consumed again, on the same connection.
    rabbit.declare(&gone).await;
    rabbit.publish(&gone, [b"again".to_vec()]).await;
    let delivered = f.wait_delivered(6, LONG).await;
    assert!(delivered.contains(&"again".to_owned()));
    assert_eq!(gateway_connections(gw.pid()), before);
    let steady_status = gw.mapping("steady");
    assert_eq!(steady_status["state"], "running", "{steady_status}");
    let steady_sessions = gw
        .logs
        .lock()
        .unwrap()
        .iter()
        .filter(|l| l.contains("RabbitMQ session ended") && l.contains("steady"))
        .count();
    assert_eq!(
        steady_sessions, 0,
        "the other mapping's channel never failed"
    );

    assert_eq!(gw.terminate().await.code(), Some(0));
    for q in [&gone, &steady] {
        assert_eq!(rabbit.ready(q).await, 0);
        rabbit.delete(q).await;
    }
}

#[tokio::test]
async fn a_closed_connection_recovers_every_channel_on_one_new_connection() {
    const N: usize = 20;
    let rabbit = Rabbit::connect().await;
    let f = Function::deploy("recover", &[]).await;
    let (queues, config) = queues_and_mappings(&rabbit, "recover", N, &f.name).await;
    let gw = Gateway::start(&config);
    gw.wait_log_count("consuming", N, LONG).await;
    let first = gateway_connections(gw.pid());
    assert_eq!(first.len(), 1);

    rabbitmqctl(&[
        "close_connection",
        &first[0],
        "fault test closes the shared connection",
    ]);
    gw.wait_log_count("consuming", 2 * N, LONG).await;
    let second = gateway_connections(gw.pid());
    assert_eq!(
        second.len(),
        1,
        "the mappings reconnected onto one connection"
    );
    assert_ne!(second, first);

    for q in &queues {
        rabbit.publish(q, [q.clone().into_bytes()]).await;
    }
    let delivered: BTreeSet<String> = f.wait_delivered(N, LONG).await.into_iter().collect();
    assert_eq!(delivered, queues.iter().cloned().collect());
    assert_eq!(gw.terminate().await.code(), Some(0));
    for q in &queues {
        assert_eq!(rabbit.ready(q).await, 0);
        rabbit.delete(q).await;
    }
}
