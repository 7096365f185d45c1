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
//! deadline), then closes. A rank registering twice is refused.

use std::collections::HashSet;
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use socket2::SockRef;

use super::auth::{
    client_handshake, server_handshake, HsError, Identity, Verdict, PURPOSE_STORE, STORE_RANK,
};
use super::wire::{read_frame, write_frame, Fail};
use super::PgError;

const TAG_REGISTER: u64 = 1;
const TAG_TABLE: u64 = 2;
/// Longest address string accepted in a registration.
const MAX_ADDR_LEN: usize = 256;
/// Handshakes in progress at once per listener; connections beyond this are dropped unanswered.
const MAX_CONCURRENT_HANDSHAKES: usize = 64;
/// How often the accept loop looks at its stop flag.
const ACCEPT_POLL: Duration = Duration::from_millis(100);

/// Sets the flag when dropped: stops an accept loop on every exit path.
#[derive(Debug)]
pub(crate) struct StopOnDrop(pub Arc<AtomicBool>);

impl Drop for StopOnDrop {
    fn drop(&mut self) {
        self.0.store(true, Ordering::SeqCst);
    }
}

/// An admitted connection: (rank, stream, what `post` produced).
pub(crate) type Admitted<T> = (u32, TcpStream, T);

/// Run an accept loop on `listener` in a background thread until `stop` is set. Each connection
/// is authenticated in its own thread within `handshake_timeout`; strangers (wrong token, garbage,
/// silence) are logged and dropped while the loop goes on. A client is admitted if its rank is below
/// `ranks_below` and no other connection claimed that rank; then `post` runs on it (same thread, same
/// handshake deadline) and the result is sent to the returned channel.
pub(crate) fn spawn_acceptor<T, P>(
    listener: TcpListener,
    token: Arc<[u8]>,
    me: Identity,
    handshake_timeout: Duration,
    ranks_below: u32,
    post: P,
    stop: Arc<AtomicBool>,
) -> Result<mpsc::Receiver<Admitted<T>>, PgError>
where
    T: Send + 'static,
    P: Fn(&TcpStream, &Identity, Instant) -> Result<T, HsError> + Send + Sync + 'static,
{
    // Linux honours SO_RCVTIMEO for accept(2) (socket(7)), which lets the loop poll `stop`.
    SockRef::from(&listener)
        .set_read_timeout(Some(ACCEPT_POLL))
        .map_err(|e| PgError::io(None, &e))?;
    let (tx, rx) = mpsc::channel();
    let claimed = Arc::new(Mutex::new(HashSet::<u32>::new()));
    let active = Arc::new(AtomicUsize::new(0));
    let post = Arc::new(post);
    std::thread::Builder::new()
        .name(format!("pgt-accept-{}", me.rank))
        .spawn(move || {
            while !stop.load(Ordering::SeqCst) {
                let (stream, addr) = match listener.accept() {
                    Ok(x) => x,
                    Err(e)
                        if matches!(
                            e.kind(),
                            std::io::ErrorKind::WouldBlock
                                | std::io::ErrorKind::TimedOut
                                | std::io::ErrorKind::Interrupted
                        ) =>
                    {
                        continue
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "accept failed");
                        std::thread::sleep(Duration::from_millis(10));
                        continue;
                    }
                };
                if active.load(Ordering::SeqCst) >= MAX_CONCURRENT_HANDSHAKES {
                    tracing::warn!(%addr, "too many handshakes in progress, dropping connection");
                    continue;
                }
                active.fetch_add(1, Ordering::SeqCst);
                let (tx, claimed, active, post, token, stop) = (
                    tx.clone(),
                    Arc::clone(&claimed),
                    Arc::clone(&active),
                    Arc::clone(&post),
                    Arc::clone(&token),
                    Arc::clone(&stop),
                );
                let spawned = std::thread::Builder::new()
                    .name("pgt-handshake".into())
                    .spawn(move || {
                        let _ = stream.set_nonblocking(false);
                        let _ = stream.set_nodelay(true);
                        let deadline = Instant::now() + handshake_timeout;
                        let admit = |id: &Identity| {
                            let mut c = claimed.lock().unwrap_or_else(|e| e.into_inner());
                            if id.rank < ranks_below && c.insert(id.rank) {
                                Verdict::Accepted
                            } else {
                                Verdict::UnexpectedRank
                            }
                        };
                        let result = server_handshake(&stream, &token, me, deadline, admit)
                            .and_then(|id| match post(&stream, &id, deadline) {
                                Ok(t) => Ok((id, t)),
                                Err(e) => {
                                    // Let the rank try again.
                                    claimed
                                        .lock()
                                        .unwrap_or_else(|e| e.into_inner())
                                        .remove(&id.rank);
                                    Err(e)
                                }
                            });
                        match result {
                            Ok((id, t)) if !stop.load(Ordering::SeqCst) => {
                                tracing::debug!(%addr, rank = id.rank, "accepted connection");
                                let _ = tx.send((id.rank, stream, t));
                            }
                            Ok(_) => {}
                            Err(e) => {
                                tracing::warn!(%addr, error = %e, "refused connection");
                            }
                        }
                        active.fetch_sub(1, Ordering::SeqCst);
                    });
                if spawned.is_err() {
                    tracing::warn!(%addr, "could not spawn a handshake thread, dropping connection");
                }
            }
        })
        .map_err(|e| PgError::io(None, &e))?;
    Ok(rx)
}

/// Take admitted connections from `rx` until ranks `0..needed` are all in, or `deadline`.
pub(crate) fn collect<T>(
    rx: &mpsc::Receiver<Admitted<T>>,
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
                    "timed out waiting for {what} from ranks {:?}",
                    missing(&ranks)
                )))
            }
        }
    }
    Ok(got)
}

/// The rendezvous store, running in a background thread.
#[derive(Debug)]
pub(crate) struct Store {
    thread: Option<JoinHandle<Result<(), PgError>>>,
    _stop: StopOnDrop,
}

impl Store {
    /// Serve registrations of `world` ranks on `listener` until all have the table, or `deadline`.
    pub(crate) fn start(
        listener: TcpListener,
        token: Arc<[u8]>,
        world: u32,
        handshake_timeout: Duration,
        deadline: Instant,
    ) -> Result<Store, PgError> {
        let stop = Arc::new(AtomicBool::new(false));
        let me = Identity {
            purpose: PURPOSE_STORE,
            rank: STORE_RANK,
            world,
        };
        let rx = spawn_acceptor(
            listener,
            token,
            me,
            handshake_timeout,
            world,
            read_registration,
            Arc::clone(&stop),
        )?;
        let stop2 = Arc::clone(&stop);
        let thread = std::thread::Builder::new()
            .name("pgt-store".into())
            .spawn(move || {
                let _stop = StopOnDrop(stop2);
                let regs = collect(&rx, world, deadline, "registration")?;
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
            _stop: StopOnDrop(stop),
        })
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
        HsError::Transport(format!("reading registration of rank {}: {f}", id.rank))
    })?;
    (tag == TAG_REGISTER)
        .then(|| {
            std::str::from_utf8(&payload)
                .ok()?
                .parse::<SocketAddr>()
                .ok()
        })
        .flatten()
        .ok_or_else(|| HsError::Transport(format!("bad registration from rank {}", id.rank)))
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

/// Connect to one of `addrs` and run the client handshake, retrying transport failures (not up
/// yet, reset, ...) until `deadline`. Authentication failures and refusals are not retried.
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
    let mut last = String::from("no address to try");
    loop {
        for &addr in addrs {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(PgError::Rendezvous(format!(
                    "could not reach {what} at {addrs:?} in time: {last}"
                )));
            }
            match connector(addr, left.min(Duration::from_secs(5))) {
                Ok(stream) => {
                    let hs_deadline = deadline.min(Instant::now() + handshake_timeout);
                    match client_handshake(&stream, token, me, hs_deadline) {
                        Ok(id) => return Ok((stream, id)),
                        Err(HsError::Fatal(e)) => return Err(e),
                        Err(HsError::Transport(s)) => last = format!("{addr}: {s}"),
                    }
                }
                Err(e) => last = format!("{addr}: {e}"),
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
}
