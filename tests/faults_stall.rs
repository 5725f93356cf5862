//! Fault injection: a Lambda endpoint that accepts connections and never answers (a
//! flow that a NAT or firewall dropped looks the same from the gateway). The mapping must
//! not stall: each attempt is abandoned after `function_timeout`, retried, and a disable
//! completes; the connection carries TCP keepalive; nothing is acked that was not
//! delivered.
//!
//! Shares the local stack's RabbitMQ with the other integration tests, so
//! `.config/nextest.toml` runs it in the one-at-a-time `stack` group.

mod common;

use std::net::{TcpListener, TcpStream};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::*;

const LONG: Duration = Duration::from_secs(120);

/// A TCP listener that accepts every connection and never reads or writes.
struct BlackHole {
    port: u16,
    _held: Arc<Mutex<Vec<TcpStream>>>,
}

impl BlackHole {
    fn start() -> BlackHole {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let held = Arc::new(Mutex::new(Vec::new()));
        let sink = held.clone();
        std::thread::spawn(move || {
            for s in listener.incoming().map_while(Result::ok) {
                sink.lock().unwrap().push(s);
            }
        });
        BlackHole { port, _held: held }
    }

    /// Whether a connection to this listener has its keepalive timer running: the
    /// `tr` field of /proc/net/tcp is 2 for a socket with SO_KEEPALIVE that is idle.
    fn peer_has_keepalive(&self) -> bool {
        let port = format!("{:04X}", self.port);
        std::fs::read_to_string("/proc/net/tcp")
            .unwrap()
            .lines()
            .skip(1)
            .filter_map(|l| {
                let f: Vec<&str> = l.split_whitespace().collect();
                // rem_address is "IP:PORT" in hex; the timer is "tr:when".
                let remote_port = f.get(2)?.split(':').nth(1)?;
                (remote_port == port && f.get(3) == Some(&"01")).then(|| f.get(5).copied())?
            })
            .any(|timer| timer.starts_with("02:"))
    }
}

#[tokio::test]
async fn an_invoke_that_never_answers_is_abandoned_retried_and_never_stalls_the_mapping() {
    let rabbit = Rabbit::connect().await;
    let queue = rabbit.queue("black-hole").await;
    rabbit.publish(&queue, numbered(3)).await;
    let hole = BlackHole::start();
    let config = rabbit_config(
        "never-answers",
        &queue,
        r#"
function_timeout = "1s"

[mapping.batch]
size = 10
window = "100ms"

[mapping.retry]
backoff_min = "10ms"
backoff_max = "100ms"
"#,
    )
    .replace(&aws_endpoint(), &format!("http://127.0.0.1:{}", hole.port));
    let gw = Gateway::start(&config);

    wait_for("TCP keepalive on the invoke's connection", LONG, || {
        hole.peer_has_keepalive().then_some(())
    })
    .await;
    // Two abandoned attempts: the first did not stall the batch, it was retried.
    gw.wait_log_count("no answer within the function timeout", 2, LONG)
        .await;
    let (status, body) = gw.post("/mappings/test/disable", Some(ADMIN_TOKEN));
    assert_eq!(status, 200, "a disable completes: {body}");
    assert_eq!(gw.terminate().await.code(), Some(0));
    // The count: nothing was delivered, so all three are back in the queue.
    assert_eq!(rabbit.ready(&queue).await, 3);
    rabbit.delete(&queue).await;
}
