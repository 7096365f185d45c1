//! Group formation: the authenticated accept loop, the rendezvous store hosted by rank 0, and the
//! client side of registration.
//!
//! Store protocol, after the [handshake](super::auth) with purpose "store" (the client's rank and
//! world size travel in its hello):
//!
//! ```text
//! rank  -> store  frame tag 1 (REGISTER): UTF-8 socket address of the rank's peer listener
//! store -> rank   frame tag 2 (TABLE), once all ranks registered:
//!                 count u32, then per rank 0..count: len u16 | UTF-8 socket address
//! ```
//!
//! The store serves until every rank has registered and got the table (or until the setup
//! deadline), then closes. A rank registering twice is refused. Its listener, like every rank's,
//! runs the non-blocking accept loop of [`super::accept`].

use std::collections::HashSet;
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc;
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use socket2::SockRef;

use super::accept::{spawn_acceptor, AcceptPolicy, Admitted, StopOnDrop, TurnedAway};
use super::auth::{client_handshake, Cause, HsError, Identity, PURPOSE_STORE, STORE_RANK};
use super::wire::{read_frame, write_frame, Fail};
use super::PgError;

const TAG_REGISTER: u64 = 1;
const TAG_TABLE: u64 = 2;
/// Longest address string accepted in a registration.
pub(crate) const MAX_ADDR_LEN: usize = 256;

/// Take admitted connections from `rx` until ranks `0..needed` are all in, or `deadline`. The
/// timeout error says what the listener turned away meanwhile (`turned_away`): a flood of strangers
/// is then named as the likely cause.
pub(crate) fn collect<T>(
    rx: &mpsc::Receiver<Admitted<T>>,
    turned_away: &TurnedAway,
    needed: u32,
    deadline: Instant,
    what: &str,
) -> Result<Vec<Admitted<T>>, PgError> {
    let missing = |have: &HashSet<u32>| {
        (0..needed)
            .filter(|r| !have.contains(r))
            .collect::<Vec<_>>()
    };
    let mut got = Vec::with_capacity(needed as usize);
    let mut ranks = HashSet::new();
    while got.len() < needed as usize {
        let now = Instant::now();
        let left = deadline.saturating_duration_since(now);
        match rx.recv_timeout(left) {
            Ok(a) => {
                if ranks.insert(a.0) {
                    got.push(a);
                }
            }
            Err(_) => {
                return Err(PgError::Rendezvous(format!(
                    "timed out waiting for {what} from ranks {:?}{}",
                    missing(&ranks),
                    meanwhile(turned_away)
                )))
            }
        }
    }
    Ok(got)
}

/// "; meanwhile the listener turned away 1200 other connections (…)", or nothing: when ranks are
/// missing, whether strangers were crowding the port.
fn meanwhile(turned_away: &TurnedAway) -> String {
    match turned_away.summary() {
        Some(s) => format!("; meanwhile the listener turned away {s}"),
        None => String::new(),
    }
}

/// The rendezvous store, running in a background thread.
#[derive(Debug)]
pub(crate) struct Store {
    thread: Option<JoinHandle<Result<(), PgError>>>,
    stop: StopOnDrop,
}

impl Store {
    /// Serve registrations of `world` ranks on `listener` until all have the table, or `deadline`.
    pub(crate) fn start(
        listener: TcpListener,
        token: Arc<[u8]>,
        world: u32,
        policy: AcceptPolicy,
        deadline: Instant,
    ) -> Result<Store, PgError> {
        let stop = Arc::new(AtomicBool::new(false));
        let me = Identity {
            purpose: PURPOSE_STORE,
            rank: STORE_RANK,
            world,
        };
        let (rx, turned_away) = spawn_acceptor(
            listener,
            token,
            me,
            policy,
            world,
            Some(MAX_ADDR_LEN),
            |id: &Identity, frame: Option<(u64, Vec<u8>)>| {
                let (tag, payload) = frame.unwrap_or_default();
                parse_registration(id, tag, &payload)
            },
            Arc::clone(&stop),
        )?;
        let stop2 = Arc::clone(&stop);
        let thread = std::thread::Builder::new()
            .name("pgt-store".into())
            .spawn(move || {
                let _stop = StopOnDrop(stop2);
                let regs = collect(&rx, &turned_away, world, deadline, "registration")?;
                let mut table = vec![String::new(); world as usize];
                for (rank, _, addr) in &regs {
                    table[*rank as usize] = addr.to_string();
                }
                let payload = encode_table(&table);
                tracing::debug!(world, "store: all ranks registered, sending table");
                let send_deadline = deadline.max(Instant::now() + Duration::from_secs(5));
                for (rank, stream, _) in &regs {
                    send_table(stream, &payload, send_deadline).map_err(|f| {
                        PgError::Rendezvous(format!("store: sending table to rank {rank}: {f}"))
                    })?;
                }
                Ok(())
            })
            .map_err(|e| PgError::io(None, &e))?;
        Ok(Store {
            thread: Some(thread),
            stop: StopOnDrop(stop),
        })
    }

    /// Stop serving (if it still does) and return how serving ended.
    pub(crate) fn stop(self) -> Result<(), PgError> {
        self.stop.0.store(true, Ordering::SeqCst);
        self.join()
    }

    /// Wait for the store to finish serving.
    pub(crate) fn join(mut self) -> Result<(), PgError> {
        match self.thread.take().expect("joined once").join() {
            Ok(r) => r,
            Err(_) => Err(PgError::Rendezvous("store thread panicked".into())),
        }
    }
}

/// The store's side of a registration, right after the handshake admitted `id`: read the REGISTER
/// frame (by the handshake's deadline) and parse its address.
pub(crate) fn read_registration(
    stream: &TcpStream,
    id: &Identity,
    deadline: Instant,
) -> Result<SocketAddr, HsError> {
    let (tag, payload) = read_frame(stream, MAX_ADDR_LEN, deadline).map_err(|f| {
        HsError::Transport(
            format!("reading registration of rank {}: {f}", id.rank),
            Cause::from(&f),
        )
    })?;
    parse_registration(id, tag, &payload).map_err(|e| HsError::Transport(e, Cause::Other))
}

/// A REGISTER frame's address ([TCP.md §4](../../../TCP.md)).
fn parse_registration(id: &Identity, tag: u64, payload: &[u8]) -> Result<SocketAddr, String> {
    (tag == TAG_REGISTER)
        .then(|| {
            std::str::from_utf8(payload)
                .ok()?
                .parse::<SocketAddr>()
                .ok()
        })
        .flatten()
        .ok_or_else(|| format!("bad registration from rank {}", id.rank))
}

/// The store's answer: the TABLE frame, `payload` from [`encode_table`].
pub(crate) fn send_table(
    stream: &TcpStream,
    payload: &[u8],
    deadline: Instant,
) -> Result<(), Fail> {
    write_frame(stream, TAG_TABLE, payload, deadline)
}

/// The TABLE payload: every rank's address, in rank order.
pub(crate) fn encode_table(table: &[String]) -> Vec<u8> {
    let mut v = Vec::new();
    v.extend_from_slice(&(table.len() as u32).to_le_bytes());
    for a in table {
        v.extend_from_slice(&(a.len() as u16).to_le_bytes());
        v.extend_from_slice(a.as_bytes());
    }
    v
}

fn decode_table(b: &[u8], world: u32) -> Option<Vec<SocketAddr>> {
    let count = u32::from_le_bytes(b.get(..4)?.try_into().ok()?);
    if count != world {
        return None;
    }
    let mut off = 4;
    let mut out = Vec::with_capacity(count as usize);
    for _ in 0..count {
        let len = u16::from_le_bytes(b.get(off..off + 2)?.try_into().ok()?) as usize;
        off += 2;
        let s = std::str::from_utf8(b.get(off..off + len)?).ok()?;
        off += len;
        out.push(s.parse().ok()?);
    }
    (off == b.len()).then_some(out)
}

/// How a client connects a socket (buffer sizes etc. are the caller's business).
pub(crate) type Connector<'a> = &'a dyn Fn(SocketAddr, Duration) -> std::io::Result<TcpStream>;

/// Whether `stream` is connected to itself: a connection to a port of this host in the ephemeral
/// range that nobody listens on can get that very port as its source (TCP simultaneous open), and
/// then reads back its own ClientHello as the start of a ServerHello.
pub(crate) fn is_self_connected(stream: &TcpStream) -> bool {
    matches!((stream.local_addr(), stream.peer_addr()), (Ok(l), Ok(p)) if l == p)
}

/// A client's failed connection attempts, by cause, for the error that ends its retries.
#[derive(Debug, Default)]
struct Attempts {
    refused: u32,
    closed: u32,
    timed_out: u32,
    self_connected: u32,
    other: u32,
    last: Option<String>,
}

impl Attempts {
    fn failed(&mut self, addr: SocketAddr, cause: Cause, what: impl std::fmt::Display) {
        match cause {
            Cause::Closed => self.closed += 1,
            Cause::Timeout => self.timed_out += 1,
            Cause::Other => self.other += 1,
        }
        self.last = Some(format!("{addr}: {what}"));
    }

    fn connect_failed(&mut self, addr: SocketAddr, e: &std::io::Error) {
        use std::io::ErrorKind::*;
        match e.kind() {
            ConnectionRefused => {
                self.refused += 1;
                self.last = Some(format!("{addr}: {e}"));
            }
            TimedOut | WouldBlock => self.failed(addr, Cause::Timeout, format!("connect: {e}")),
            ConnectionReset | ConnectionAborted => {
                self.failed(addr, Cause::Closed, format!("connect: {e}"))
            }
            _ => self.failed(addr, Cause::Other, format!("connect: {e}")),
        }
    }

    /// "12 attempts: 10 closed by the other side before the verdict (…), 2 refused (…); last: …"
    fn summary(&self) -> String {
        let parts: Vec<String> = [
            (
                self.closed,
                "closed by the other side before the verdict (not a pgt endpoint, or a listener \
                 that drops connections: overloaded or flooded)",
            ),
            (self.refused, "refused (nothing listening yet)"),
            (self.timed_out, "timed out"),
            (
                self.self_connected,
                "connected to themselves (the port is in the ephemeral range and nothing listens)",
            ),
            (self.other, "failed otherwise"),
        ]
        .into_iter()
        .filter(|&(n, _)| n > 0)
        .map(|(n, what)| format!("{n} {what}"))
        .collect();
        let total = self.refused + self.closed + self.timed_out + self.self_connected + self.other;
        format!(
            "{total} attempts: {}; last: {}",
            if parts.is_empty() {
                "none".into()
            } else {
                parts.join(", ")
            },
            self.last.as_deref().unwrap_or("no address to try")
        )
    }
}

/// Connect to one of `addrs` and run the client handshake, retrying transport failures (not up
/// yet, reset, connected to itself, ...) until `deadline`. Authentication failures and refusals are
/// not retried. The error after the deadline counts the failed attempts by cause.
pub(crate) fn connect_authenticated(
    addrs: &[SocketAddr],
    connector: Connector<'_>,
    token: &[u8],
    me: Identity,
    handshake_timeout: Duration,
    deadline: Instant,
    what: &str,
) -> Result<(TcpStream, Identity), PgError> {
    let mut backoff = Duration::from_millis(10);
    let mut attempts = Attempts::default();
    let started = Instant::now();
    loop {
        for &addr in addrs {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(PgError::Rendezvous(format!(
                    "could not reach {what} at {addrs:?} within {:.1?}: {}",
                    started.elapsed(),
                    attempts.summary()
                )));
            }
            match connector(addr, left.min(Duration::from_secs(5))) {
                Ok(stream) if is_self_connected(&stream) => {
                    // Closed with a reset: no TIME_WAIT left on the port, which the store (rank 0)
                    // may be about to bind.
                    let _ = SockRef::from(&stream).set_linger(Some(Duration::ZERO));
                    drop(stream);
                    tracing::debug!(%addr, "connected to itself, retrying");
                    attempts.self_connected += 1;
                    attempts.last = Some(format!("{addr}: connected to itself"));
                }
                Ok(stream) => {
                    let hs_deadline = deadline.min(Instant::now() + handshake_timeout);
                    match client_handshake(&stream, token, me, hs_deadline) {
                        Ok(id) => return Ok((stream, id)),
                        Err(HsError::Fatal(e)) => return Err(e),
                        Err(HsError::Transport(s, cause)) => attempts.failed(addr, cause, s),
                    }
                }
                Err(e) => attempts.connect_failed(addr, &e),
            }
        }
        let left = deadline.saturating_duration_since(Instant::now());
        std::thread::sleep(backoff.min(left));
        backoff = (backoff * 2).min(Duration::from_millis(200));
    }
}

/// Register this rank's listener address with the store at `store_addrs` and wait for the table of
/// all ranks' addresses.
#[allow(clippy::too_many_arguments)]
pub(crate) fn register(
    store_addrs: &[SocketAddr],
    connector: Connector<'_>,
    token: &[u8],
    rank: u32,
    world: u32,
    listen_addr: SocketAddr,
    handshake_timeout: Duration,
    deadline: Instant,
) -> Result<Vec<SocketAddr>, PgError> {
    let me = Identity {
        purpose: PURPOSE_STORE,
        rank,
        world,
    };
    let (stream, _) = connect_authenticated(
        store_addrs,
        connector,
        token,
        me,
        handshake_timeout,
        deadline,
        "the rendezvous store",
    )?;
    exchange_registration(&stream, rank, world, listen_addr, deadline)
}

/// A rank's side of a registration, right after the store accepted its handshake: send the REGISTER
/// frame and wait (until `deadline`) for the TABLE.
pub(crate) fn exchange_registration(
    stream: &TcpStream,
    rank: u32,
    world: u32,
    listen_addr: SocketAddr,
    deadline: Instant,
) -> Result<Vec<SocketAddr>, PgError> {
    let fail = |what: &str, f: Fail| PgError::Rendezvous(format!("{what}: {f}"));
    write_frame(
        stream,
        TAG_REGISTER,
        listen_addr.to_string().as_bytes(),
        deadline,
    )
    .map_err(|f| fail("sending registration", f))?;
    let max = 4 + world as usize * (2 + MAX_ADDR_LEN);
    let (tag, payload) = read_frame(stream, max, deadline).map_err(|f| match f {
        Fail::Timeout => PgError::Rendezvous(format!(
            "rank {rank}: timed out waiting for all {world} ranks to register"
        )),
        Fail::Closed => PgError::Rendezvous(format!(
            "rank {rank}: the store closed the connection before sending the address table \
             (rank 0 gave up: not all {world} ranks registered by its deadline, or it failed)"
        )),
        f => fail("waiting for the address table", f),
    })?;
    if tag != TAG_TABLE {
        return Err(PgError::Rendezvous(format!(
            "unexpected store message tag {tag}"
        )));
    }
    decode_table(&payload, world)
        .ok_or_else(|| PgError::Rendezvous("malformed address table from the store".into()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pg::auth::Verdict;
    use crate::pg::tcp::{client_socket, listen, TcpTuning};
    use socket2::SockAddr;
    use std::io::{Read, Write};
    use std::sync::atomic::AtomicU32;

    #[test]
    fn table_roundtrip() {
        let t = vec!["127.0.0.1:5".to_string(), "[::1]:65535".to_string()];
        let b = encode_table(&t);
        let d = decode_table(&b, 2).unwrap();
        assert_eq!(d[0], "127.0.0.1:5".parse().unwrap());
        assert_eq!(d[1], "[::1]:65535".parse().unwrap());
        assert!(decode_table(&b, 3).is_none());
        assert!(decode_table(&b[..b.len() - 1], 2).is_none());
    }

    /// A rank's first attempt to reach the store gets the store's own port as its source port (the
    /// kernel's pick, forced here by binding it) while the store is not up yet: TCP connects the
    /// socket to itself. The rank must notice at once, close without leaving a TIME_WAIT, and retry;
    /// the store, which binds the port meanwhile, must get it. Before, the rank read its own hello
    /// back as the start of a ServerHello and waited out the handshake timeout (10 s) with the port
    /// held, and the TIME_WAIT it then left kept the store from binding for 60 s.
    #[test]
    fn a_connection_to_itself_is_detected_and_retried() {
        let tuning = TcpTuning::default();
        let addr = TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap();
        let token: Arc<[u8]> = Arc::from(&b"token"[..]);
        let policy = AcceptPolicy {
            hello_timeout: Duration::from_secs(1),
            handshake_timeout: Duration::from_secs(5),
            slots: 8,
        };
        let deadline = Instant::now() + Duration::from_secs(8);
        let attempts = AtomicU32::new(0);
        let self_connected = AtomicBool::new(false);
        let connector = |a: SocketAddr, t: Duration| {
            let s = client_socket(&a, &tuning)?;
            if attempts.fetch_add(1, Ordering::SeqCst) == 0 {
                s.bind(&SockAddr::from(a))?;
            }
            s.connect_timeout(&SockAddr::from(a), t)?;
            let s: TcpStream = s.into();
            if is_self_connected(&s) {
                self_connected.store(true, Ordering::SeqCst);
            }
            Ok(s)
        };
        std::thread::scope(|scope| {
            let store = scope.spawn(|| {
                // Up a little later, retrying the bind as rank 0 does.
                std::thread::sleep(Duration::from_millis(200));
                let listener = loop {
                    match listen(addr, &tuning, true) {
                        Ok(l) => break l,
                        Err(e) if Instant::now() < deadline => {
                            let _ = e;
                            std::thread::sleep(Duration::from_millis(100));
                        }
                        Err(e) => panic!("the store could not bind {addr}: {e}"),
                    }
                };
                Store::start(listener, Arc::clone(&token), 1, policy, deadline)
                    .unwrap()
                    .join()
            });
            let t0 = Instant::now();
            let table = register(
                &[addr],
                &connector,
                &token,
                0,
                1,
                "127.0.0.1:9".parse().unwrap(),
                policy.handshake_timeout,
                deadline,
            )
            .unwrap();
            let took = t0.elapsed();
            assert_eq!(table, vec!["127.0.0.1:9".parse().unwrap()]);
            assert!(
                self_connected.load(Ordering::SeqCst),
                "no connection to itself"
            );
            assert!(took < Duration::from_secs(2), "registration took {took:?}");
            store.join().unwrap().unwrap();
        });
    }

    /// A token holder's REGISTER header announcing 2^64−1 bytes: the store closes the connection
    /// from the header (nothing allocated), forgets the rank's admission, and the rank can register.
    #[test]
    fn a_registration_too_long_is_refused_from_its_header_and_forgotten() {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let token: Arc<[u8]> = Arc::from(&b"token"[..]);
        let policy = AcceptPolicy {
            hello_timeout: Duration::from_secs(1),
            handshake_timeout: Duration::from_secs(5),
            slots: 8,
        };
        let deadline = Instant::now() + Duration::from_secs(8);
        let store = Store::start(listener, Arc::clone(&token), 1, policy, deadline).unwrap();
        let me = Identity {
            purpose: PURPOSE_STORE,
            rank: 0,
            world: 1,
        };
        let s = TcpStream::connect(addr).unwrap();
        client_handshake(&s, &token, me, deadline).unwrap();
        let huge = crate::pg::wire::Header {
            tag: TAG_REGISTER,
            len: u64::MAX,
        };
        (&s).write_all(&huge.encode()).unwrap();
        let mut b = [0u8; 1];
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        assert!(matches!((&s).read(&mut b), Ok(0) | Err(_)), "not closed");
        let connector = |a: SocketAddr, t: Duration| TcpStream::connect_timeout(&a, t);
        let mine: SocketAddr = "127.0.0.1:9".parse().unwrap();
        let table = register(
            &[addr],
            &connector,
            &token,
            0,
            1,
            mine,
            policy.handshake_timeout,
            deadline,
        )
        .unwrap();
        assert_eq!(table, vec![mine]);
        store.join().unwrap();
    }

    /// A store (with the token) answering with a TABLE header that announces 2^64−1 bytes: the rank
    /// refuses it from the header, before reading or allocating it.
    #[test]
    fn an_address_table_too_long_is_refused_from_its_header() {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let token: &[u8] = b"token";
        let deadline = Instant::now() + Duration::from_secs(5);
        let store = std::thread::spawn(move || {
            let (s, _) = listener.accept().unwrap();
            let me = Identity {
                purpose: PURPOSE_STORE,
                rank: STORE_RANK,
                world: 2,
            };
            let id = crate::pg::auth::server_handshake(&s, b"token", me, deadline, |_| {
                Verdict::Accepted
            })
            .unwrap();
            read_registration(&s, &id, deadline).unwrap();
            let huge = crate::pg::wire::Header {
                tag: TAG_TABLE,
                len: u64::MAX,
            };
            (&s).write_all(&huge.encode()).unwrap();
            s
        });
        let connector = |a: SocketAddr, t: Duration| TcpStream::connect_timeout(&a, t);
        let e = register(
            &[addr],
            &connector,
            token,
            1,
            2,
            "127.0.0.1:9".parse().unwrap(),
            Duration::from_secs(5),
            deadline,
        )
        .unwrap_err();
        assert!(matches!(e, PgError::Rendezvous(_)), "{e}");
        assert!(e.to_string().contains("exceeds"), "{e}");
        drop(store.join().unwrap());
    }
}
