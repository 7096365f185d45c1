//! Formation against strangers: a sustained flood of silent connections to the store's port while
//! the ranks form the group. The group must form in time, and the warnings the strangers cause must
//! stay few (counted by a tracing subscriber, per listener).

use std::collections::HashMap;
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Once};
use std::time::{Duration, Instant};

use pgt_host::pg::{PgError, TcpProcessGroup, TcpTuning};
use tracing::field::{Field, Visit};
use tracing::{span, Event, Level, Metadata, Subscriber};

use crate::scenarios;
use crate::tcp::{free_port, opts, TOKEN};

/// Warnings and errors, by the value of their `listener` field ("" when they have none).
static WARNINGS: Mutex<Option<HashMap<String, u64>>> = Mutex::new(None);

/// A subscriber that only counts warnings and errors.
struct CountWarnings;

struct ListenerField(String);

impl Visit for ListenerField {
    fn record_debug(&mut self, field: &Field, value: &dyn std::fmt::Debug) {
        if field.name() == "listener" {
            self.0 = format!("{value:?}");
        }
    }
}

impl Subscriber for CountWarnings {
    fn enabled(&self, metadata: &Metadata<'_>) -> bool {
        *metadata.level() <= Level::WARN
    }
    fn new_span(&self, _: &span::Attributes<'_>) -> span::Id {
        span::Id::from_u64(1)
    }
    fn record(&self, _: &span::Id, _: &span::Record<'_>) {}
    fn record_follows_from(&self, _: &span::Id, _: &span::Id) {}
    fn event(&self, event: &Event<'_>) {
        let mut listener = ListenerField(String::new());
        event.record(&mut listener);
        let mut w = WARNINGS.lock().unwrap_or_else(|e| e.into_inner());
        *w.get_or_insert_with(HashMap::new)
            .entry(listener.0)
            .or_default() += 1;
    }
    fn enter(&self, _: &span::Id) {}
    fn exit(&self, _: &span::Id) {}
}

fn count_warnings() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        tracing::subscriber::set_global_default(CountWarnings).expect("the only subscriber");
    });
}

fn warnings(listener: &str) -> u64 {
    let w = WARNINGS.lock().unwrap_or_else(|e| e.into_inner());
    w.as_ref()
        .and_then(|m| m.get(listener).copied())
        .unwrap_or(0)
}

fn all_warnings() -> u64 {
    let w = WARNINGS.lock().unwrap_or_else(|e| e.into_inner());
    w.as_ref().map(|m| m.values().sum()).unwrap_or(0)
}

/// Whether the other side has not closed `s` (it sends nothing to a silent client).
fn alive(s: &TcpStream) -> bool {
    let mut b = [0u8; 1];
    matches!(s.peek(&mut b), Err(e) if e.kind() == std::io::ErrorKind::WouldBlock)
}

/// A stranger's flood: keeps `held` silent connections to `addr` open as long as the server lets
/// them be, opening a new one every `every` while fewer are open, until `stop` or `total`
/// connections. Its connections end with a reset, leaving no TIME_WAIT behind.
fn flood(
    addr: SocketAddr,
    held: usize,
    total: u64,
    every: Duration,
    stop: Arc<AtomicBool>,
    opened: Arc<AtomicU64>,
) -> std::thread::JoinHandle<()> {
    std::thread::spawn(move || {
        let mut open: Vec<TcpStream> = Vec::new();
        let close = |s: &TcpStream| {
            let _ = socket2::SockRef::from(s).set_linger(Some(Duration::ZERO));
        };
        let mut checked = Instant::now();
        while !stop.load(Ordering::SeqCst) && opened.load(Ordering::SeqCst) < total {
            if open.len() < held {
                if let Ok(s) = TcpStream::connect_timeout(&addr, Duration::from_secs(1)) {
                    opened.fetch_add(1, Ordering::SeqCst);
                    let _ = s.set_nonblocking(true);
                    open.push(s);
                }
            }
            if checked.elapsed() >= Duration::from_millis(20) {
                open.retain(|s| {
                    alive(s) || {
                        close(s);
                        false
                    }
                });
                checked = Instant::now();
            }
            std::thread::sleep(every);
        }
        open.iter().for_each(close);
    })
}

#[test]
fn tcp_formation_survives_a_flood_of_silent_connections_with_few_warnings() {
    count_warnings();
    let port = free_port();
    let store: SocketAddr = ([127, 0, 0, 1], port).into();
    let timeout = Duration::from_secs(8);
    let rank = |r: u32| {
        let mut o = opts(port, r, 3, TOKEN);
        o.timeout = timeout;
        std::thread::spawn(move || TcpProcessGroup::connect_with(o, TcpTuning::default()))
    };
    let t0 = Instant::now();
    let h0 = rank(0);
    // The store is up once it accepts a connection (itself the flood's first).
    while TcpStream::connect(store).is_err() {
        assert!(
            t0.elapsed() < Duration::from_secs(5),
            "the store never came up"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    let stop = Arc::new(AtomicBool::new(false));
    let opened = Arc::new(AtomicU64::new(0));
    // Up to 300 silent connections held as long as the store keeps them, a new one every
    // millisecond while fewer are open (at most 10000).
    let flooder = flood(
        store,
        300,
        10_000,
        Duration::from_millis(1),
        Arc::clone(&stop),
        Arc::clone(&opened),
    );
    while opened.load(Ordering::SeqCst) < 300 {
        assert!(!flooder.is_finished(), "the flood could not connect");
        std::thread::sleep(Duration::from_millis(10));
    }
    let warned_before = all_warnings();
    let formed = Instant::now();
    let h1 = rank(1);
    // The last rank comes late: the store serves under the flood for longer than the hello deadline.
    std::thread::sleep(Duration::from_millis(1500));
    let h2 = rank(2);
    let results: Vec<Result<TcpProcessGroup, PgError>> = [h0, h1, h2]
        .into_iter()
        .map(|h| h.join().unwrap())
        .collect();
    let took = formed.elapsed();
    stop.store(true, Ordering::SeqCst);
    flooder.join().unwrap();
    let flooded = opened.load(Ordering::SeqCst);
    let store_warnings = warnings(&store.to_string());
    eprintln!(
        "formation under a flood of {flooded} connections: {took:.2?}; {store_warnings} warnings \
         from the store, {} in all meanwhile (other tests included)",
        all_warnings() - warned_before
    );
    let g: Vec<TcpProcessGroup> = results
        .into_iter()
        .map(|r| r.expect("the ranks form the group despite the flood"))
        .collect();
    assert!(took < timeout, "{took:?}");
    scenarios::ring(&g);
    // At most 10 one by one, a note that further ones are counted, a count every 10 s and one at the
    // end: the strangers cannot make the log grow with their number.
    let bound = 10 + 1 + took.as_secs() / 10 + 1 + 1;
    assert!(
        store_warnings <= bound,
        "{store_warnings} warnings from the store for {flooded} strangers (at most {bound})"
    );
}

#[test]
fn tcp_formation_errors_name_the_cause() {
    let short = |port, rank, world| {
        let mut o = opts(port, rank, world, TOKEN);
        o.timeout = Duration::from_millis(1500);
        o
    };
    // Nothing listens on the store's port: the attempts were refused.
    let e = TcpProcessGroup::connect(short(free_port(), 1, 2)).unwrap_err();
    eprintln!("nothing listening: {e}");
    assert!(matches!(e, PgError::Rendezvous(_)), "{e}");
    assert!(
        e.to_string().contains("refused (nothing listening yet)"),
        "{e}"
    );

    // Something on the store's port closes every connection unanswered.
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = l.local_addr().unwrap().port();
    l.set_nonblocking(true).unwrap();
    let done = Arc::new(AtomicBool::new(false));
    let until = Arc::clone(&done);
    let closer = std::thread::spawn(move || {
        let t0 = Instant::now();
        while !until.load(Ordering::SeqCst) && t0.elapsed() < Duration::from_secs(5) {
            match l.accept() {
                Ok((s, _)) => drop(s),
                Err(_) => std::thread::sleep(Duration::from_millis(1)),
            }
        }
    });
    let e = TcpProcessGroup::connect(short(port, 1, 2)).unwrap_err();
    eprintln!("closed at once: {e}");
    done.store(true, Ordering::SeqCst);
    assert!(
        e.to_string()
            .contains("closed by the other side before the verdict"),
        "{e}"
    );
    closer.join().unwrap();

    // Strangers flood the store while rank 1 never comes: rank 0 says what its store turned away.
    let port = free_port();
    let store: SocketAddr = ([127, 0, 0, 1], port).into();
    let o = short(port, 0, 2);
    let h0 = std::thread::spawn(move || TcpProcessGroup::connect(o));
    let t0 = Instant::now();
    while TcpStream::connect(store).is_err() {
        assert!(
            t0.elapsed() < Duration::from_secs(1),
            "the store never came up"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    let stop = Arc::new(AtomicBool::new(false));
    let opened = Arc::new(AtomicU64::new(0));
    let flooder = flood(
        store,
        50,
        2000,
        Duration::from_millis(2),
        Arc::clone(&stop),
        Arc::clone(&opened),
    );
    let e = h0.join().unwrap().unwrap_err();
    stop.store(true, Ordering::SeqCst);
    flooder.join().unwrap();
    let m = e.to_string();
    eprintln!("flooded, rank 1 missing: {m}");
    assert!(m.contains("waiting for registration from ranks [1]"), "{m}");
    assert!(m.contains("meanwhile the listener turned away"), "{m}");
    assert!(m.contains("without a hello in time"), "{m}");
}
