//! Fault injection on the gateway's own listeners: clients that open connections and
//! never send a request (a port scanner, a leaking health checker, a slowloris). The
//! data plane must not notice. Counted at the end: every message delivered, none left.

mod common;

use std::net::TcpStream;
use std::process::Command;
use std::time::Duration;

use common::*;

const LONG: Duration = Duration::from_secs(90);

/// The gateway's file descriptor limit, soft and hard (`prlimit`: as a service manager
/// or a container runtime would set it).
const NOFILE: usize = 150;

#[tokio::test]
async fn idle_connections_flooding_the_admin_listener_leave_descriptors_for_the_brokers() {
    let rabbit = Rabbit::connect().await;
    let queue = rabbit.queue("flood").await;
    let f = Function::deploy("flood", &[]).await;
    let config = gateway_header() + &rabbit_mapping(&unique("flood"), &f.name, &queue, "");
    let gw = Gateway::start(&config);
    gw.wait_log("consuming", LONG).await;
    let limit = format!("--nofile={NOFILE}:{NOFILE}");
    let pid = gw.pid().to_string();
    let out = Command::new("prlimit")
        .args(["--pid", &pid, &limit])
        .output()
        .expect("run prlimit");
    assert!(out.status.success(), "prlimit: {out:?}");

    // More idle connections than the gateway has descriptors; the kernel's backlog
    // takes those it does not accept.
    let addr: std::net::SocketAddr = gw
        .admin_url()
        .trim_start_matches("http://")
        .parse()
        .unwrap();
    let flood: Vec<TcpStream> = (0..NOFILE + 100)
        .map_while(|_| TcpStream::connect_timeout(&addr, Duration::from_secs(2)).ok())
        .collect();
    let open = std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap()
        .count();
    eprintln!(
        "flood: {} connections; the gateway has {open} descriptors",
        flood.len()
    );
    assert!(
        flood.len() >= NOFILE,
        "a flood that would take every descriptor if each connection were accepted"
    );

    // The broker ends the gateway's connection: the mapping must open another, while
    // the flood holds its connections open.
    let id = wait_for("the gateway's connection in rabbitmqctl", LONG, || {
        gateway_connections(gw.pid()).into_iter().next()
    })
    .await;
    rabbitmqctl(&[
        "close_connection",
        &id,
        "fault test closes the gateway's connection",
    ]);
    rabbit.publish(&queue, numbered(20)).await;
    f.wait_delivered(20, LONG).await;

    drop(flood);
    // The admin API answers again once the flood is gone.
    gw.wait_admin().await;
    assert_eq!(gw.terminate().await.code(), Some(0));
    let mut delivered = f.delivered();
    delivered.sort();
    assert_eq!(delivered, numbered_strings(0..20), "each delivered once");
    assert_eq!(rabbit.ready(&queue).await, 0, "nothing left in the queue");
    rabbit.delete(&queue).await;
}
