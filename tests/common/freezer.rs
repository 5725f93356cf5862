//! A TCP proxy that can silence connections: from then on, what either side sends on a
//! silenced connection is read and dropped, and neither side sees a reset or a close, as
//! when a NAT forgets a flow or a peer vanishes behind a middlebox that answers TCP
//! keepalive. Connections opened afterwards are forwarded as before, unless new ones are
//! to be silenced too ([`Freezer::freeze_new`]: a peer that accepts and never answers).

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

pub struct Freezer {
    pub port: u16,
    /// Per connection, in the order accepted.
    connections: Arc<Mutex<Vec<Arc<Flow>>>>,
    /// The connection whose requests last carried the marker, if any.
    latest_marked: Arc<Mutex<Option<usize>>>,
    marked: Arc<AtomicUsize>,
    /// Whether connections accepted from now on start silenced.
    freeze_new: Arc<AtomicBool>,
}

impl Freezer {
    /// Forwards every connection to `upstream` ("host:port"); notes the connections whose
    /// client sends `marker` (a request's bytes within one read, as a request of a few
    /// hundred bytes arrives on loopback).
    pub fn start(upstream: &str, marker: &'static [u8]) -> Freezer {
        let upstream = upstream.trim_end_matches('/').to_owned();
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let connections: Arc<Mutex<Vec<Arc<Flow>>>> = Arc::default();
        let latest_marked: Arc<Mutex<Option<usize>>> = Arc::default();
        let marked = Arc::new(AtomicUsize::new(0));
        let freeze_new = Arc::new(AtomicBool::new(false));
        let (all, latest, count) = (connections.clone(), latest_marked.clone(), marked.clone());
        let new_silenced = freeze_new.clone();
        std::thread::spawn(move || {
            for client in listener.incoming().map_while(Result::ok) {
                let server = TcpStream::connect(&upstream).unwrap();
                let flow = Arc::new(Flow {
                    silenced: AtomicBool::new(new_silenced.load(Ordering::SeqCst)),
                    client_open: AtomicBool::new(true),
                });
                let id = {
                    let mut all = all.lock().unwrap();
                    all.push(flow.clone());
                    all.len() - 1
                };
                let (latest, count) = (latest.clone(), count.clone());
                let on_request = move |chunk: &[u8]| {
                    if chunk.windows(marker.len()).any(|w| w == marker) {
                        *latest.lock().unwrap() = Some(id);
                        count.fetch_add(1, Ordering::SeqCst);
                    }
                };
                let client_closed = {
                    let flow = flow.clone();
                    move || flow.client_open.store(false, Ordering::SeqCst)
                };
                pump(
                    client.try_clone().unwrap(),
                    server.try_clone().unwrap(),
                    flow.clone(),
                    on_request,
                    client_closed,
                );
                pump(server, client, flow, |_| {}, || {});
            }
        });
        Freezer {
            port,
            connections,
            latest_marked,
            marked,
            freeze_new,
        }
    }

    /// How many requests carried the marker so far.
    pub fn marked(&self) -> usize {
        self.marked.load(Ordering::SeqCst)
    }

    /// Silences the connection of the latest marked request; false if there was none.
    pub fn freeze_latest_marked(&self) -> bool {
        let Some(id) = *self.latest_marked.lock().unwrap() else {
            return false;
        };
        self.connections.lock().unwrap()[id]
            .silenced
            .store(true, Ordering::SeqCst);
        true
    }

    /// Silences every connection open or closed so far; returns how many there were.
    pub fn freeze_all(&self) -> usize {
        let all = self.connections.lock().unwrap();
        for c in all.iter() {
            c.silenced.store(true, Ordering::SeqCst);
        }
        all.len()
    }

    /// Whether connections accepted from now on start silenced (their client's first bytes
    /// already dropped); those accepted before keep their state.
    pub fn freeze_new(&self, on: bool) {
        self.freeze_new.store(on, Ordering::SeqCst);
    }

    /// How many silenced connections their client has not closed yet.
    pub fn silenced_still_open(&self) -> usize {
        let all = self.connections.lock().unwrap();
        all.iter()
            .filter(|c| c.silenced.load(Ordering::SeqCst) && c.client_open.load(Ordering::SeqCst))
            .count()
    }

    /// How many connections the proxy accepted so far.
    pub fn accepted(&self) -> usize {
        self.connections.lock().unwrap().len()
    }
}

/// One proxied connection.
struct Flow {
    silenced: AtomicBool,
    /// Until the client's side ends (it closed or reset its socket).
    client_open: AtomicBool,
}

/// Copies `from` to `to` on a thread of its own until `from` closes, then calls `ended`;
/// once the flow is silenced, reads and drops.
fn pump(
    mut from: TcpStream,
    mut to: TcpStream,
    flow: Arc<Flow>,
    mut seen: impl FnMut(&[u8]) + Send + 'static,
    ended: impl FnOnce() + Send + 'static,
) {
    std::thread::spawn(move || {
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            let n = match from.read(&mut buf) {
                Ok(0) | Err(_) => {
                    ended();
                    break;
                }
                Ok(n) => n,
            };
            if flow.silenced.load(Ordering::SeqCst) {
                continue;
            }
            seen(&buf[..n]);
            if to.write_all(&buf[..n]).is_err() {
                break;
            }
        }
        if !flow.silenced.load(Ordering::SeqCst) {
            let _ = to.shutdown(std::net::Shutdown::Write);
        }
    });
}
