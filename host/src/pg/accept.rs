//! The listeners' accept loop: every connection's server handshake driven by one thread without
//! blocking, with deadlines and a bounded number of slots, so that strangers cost the listener little
//! and cannot keep real ranks out ([TCP.md §7.1](../../../TCP.md), §8 *Denial of service*).
//!
//! - A connection must deliver its whole ClientHello within [`AcceptPolicy::hello_timeout`] of being
//!   accepted (a real client sends it at once) and finish within
//!   [`AcceptPolicy::handshake_timeout`] — at the store including its REGISTER frame.
//! - At most [`AcceptPolicy::slots`] connections are in handshake at once; a new one beyond that
//!   evicts the one that has shown the least: one that sent nothing (oldest first), then one amid its
//!   hello, then the oldest. A flood of silent connections only ever displaces itself; a real client,
//!   which sends its hello right away, keeps its slot.
//! - Every connection turned away is counted by reason ([`TurnedAway`]: a formation that times out
//!   names them) and logged, rate-limited ([`RefusalLog`]): strangers cannot grow the log without
//!   bound.

use std::collections::HashSet;
use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc;
use std::sync::Arc;
use std::time::{Duration, Instant};

use socket2::SockRef;

use super::auth::{Identity, ServerSteps, Verdict, CLIENT_HELLO_LEN, GARBAGE, MAC_LEN, NONCE_LEN};
use super::wire::{Header, FRAME_HEADER_LEN};
use super::PgError;

/// How often the accept loop looks at its stop flag, at the longest.
const ACCEPT_POLL: Duration = Duration::from_millis(100);
/// Refusals a listener logs one by one before it only counts them.
const LOG_BURST: u64 = 10;
/// How often a listener then logs how many connections it turned away meanwhile.
const LOG_SUMMARY_EVERY: Duration = Duration::from_secs(10);

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

/// How a listener treats connections until they are admitted ([TCP.md §7.1](../../../TCP.md)).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct AcceptPolicy {
    /// From accepting a connection to having its whole ClientHello.
    pub hello_timeout: Duration,
    /// From accepting a connection to the verdict (and, at the store, the REGISTER frame).
    pub handshake_timeout: Duration,
    /// Connections a listener keeps in handshake at once; a new one beyond that evicts the one that
    /// has shown the least (see [`spawn_acceptor`]).
    pub slots: usize,
}

/// Why a listener turned a connection away.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(usize)]
pub(crate) enum TurnAway {
    /// No complete ClientHello within the hello deadline, or closed before it was complete.
    Silent,
    /// Closed unanswered to make room for a newer connection (all slots busy).
    Evicted,
    /// The first 52 bytes were not a pgt hello.
    Garbage,
    /// The proof did not verify: the client does not know the job token.
    BadToken,
    /// A token holder refused by verdict 2, 3 or 4 (rank not expected, world size, purpose).
    Refused,
    /// Closed, reset or timed out after a well-formed hello, or a bad registration frame.
    Dropped,
}

impl TurnAway {
    const ALL: [TurnAway; 6] = [
        TurnAway::Silent,
        TurnAway::Evicted,
        TurnAway::Garbage,
        TurnAway::BadToken,
        TurnAway::Refused,
        TurnAway::Dropped,
    ];

    fn describe(self) -> &'static str {
        match self {
            TurnAway::Silent => "without a hello in time (silent, or closed first)",
            TurnAway::Evicted => "evicted for newer connections while every slot was busy",
            TurnAway::Garbage => "not a pgt hello",
            TurnAway::BadToken => "without the job token",
            TurnAway::Refused => "refused after proving the token",
            TurnAway::Dropped => "closed or timed out during the handshake",
        }
    }
}

/// How many connections a listener turned away, by reason; shared with whoever waits on it, so that
/// a formation that times out can say what kept the ranks out.
#[derive(Debug, Default)]
pub(crate) struct TurnedAway([AtomicU64; 6]);

impl TurnedAway {
    fn add(&self, why: TurnAway) {
        self.0[why as usize].fetch_add(1, Ordering::Relaxed);
    }

    /// How many were turned away for `why`.
    pub(crate) fn count(&self, why: TurnAway) -> u64 {
        self.0[why as usize].load(Ordering::Relaxed)
    }

    fn total(&self) -> u64 {
        TurnAway::ALL.iter().map(|&w| self.count(w)).sum()
    }

    /// "1200 other connections (1100 without a hello in time (…), 100 not a pgt hello)", or `None`
    /// for none.
    pub(crate) fn summary(&self) -> Option<String> {
        let total = self.total();
        if total == 0 {
            return None;
        }
        let parts: Vec<String> = TurnAway::ALL
            .iter()
            .filter(|&&w| self.count(w) > 0)
            .map(|&w| format!("{} {}", self.count(w), w.describe()))
            .collect();
        Some(format!("{total} other connections ({})", parts.join(", ")))
    }
}

/// A listener's warnings about the connections it turns away, rate-limited: the first
/// [`LOG_BURST`] one by one, then a count every [`LOG_SUMMARY_EVERY`] and one when the listener
/// closes. Strangers cannot grow the log faster than that.
struct RefusalLog {
    listener: String,
    logged: u64,
    unlogged: u64,
    since: Instant,
}

impl RefusalLog {
    fn new(listener: String) -> Self {
        RefusalLog {
            listener,
            logged: 0,
            unlogged: 0,
            since: Instant::now(),
        }
    }

    fn refused(&mut self, addr: &SocketAddr, why: TurnAway, detail: &str) {
        if self.logged < LOG_BURST {
            self.logged += 1;
            tracing::warn!(
                listener = %self.listener,
                %addr,
                reason = why.describe(),
                detail,
                "turned a connection away"
            );
            if self.logged == LOG_BURST {
                tracing::warn!(
                    listener = %self.listener,
                    "further connections turned away are counted and logged every {:?}",
                    LOG_SUMMARY_EVERY
                );
                self.since = Instant::now();
            }
        } else {
            self.unlogged += 1;
        }
    }

    /// Log the count of unlogged refusals if one is due (`force`: at the end).
    fn tick(&mut self, now: Instant, force: bool) {
        if self.unlogged > 0 && (force || now.duration_since(self.since) >= LOG_SUMMARY_EVERY) {
            tracing::warn!(
                listener = %self.listener,
                count = self.unlogged,
                "turned away {} more connections in {:.0?}",
                self.unlogged,
                now.duration_since(self.since)
            );
            self.unlogged = 0;
            self.since = now;
        }
    }
}

/// What a connection in handshake waits for next.
enum Phase {
    /// The ClientHello (`CLIENT_HELLO_LEN` bytes).
    Hello,
    /// The ClientProof, after the ServerHello.
    Proof(ServerSteps),
    /// After verdict 0, at the store: the header of the REGISTER frame, then its payload.
    Frame(Identity, Option<Header>),
    /// Admitted: hand the connection over once the verdict is out.
    Admitted(Identity, Option<(u64, Vec<u8>)>),
    /// Refused: close once the verdict is out.
    Closing(TurnAway, String),
}

/// A connection in handshake, driven without blocking by the accept loop.
struct Pending {
    stream: TcpStream,
    addr: SocketAddr,
    since: Instant,
    phase: Phase,
    /// Bytes of the message being read.
    input: Vec<u8>,
    /// Length of the message being read.
    want: usize,
    /// Bytes to send before anything else, and how many of them are out.
    output: Vec<u8>,
    sent: usize,
}

/// How one step of a pending connection ended.
enum Progress {
    /// Waiting for the socket (readable, or writable if output is pending).
    Wait,
    /// Handshake over: admitted (identity, the frame read after it) or turned away.
    Admitted(Identity, Option<(u64, Vec<u8>)>),
    TurnedAway(TurnAway, String),
}

/// What the accept loop needs to run handshakes.
struct Server<'a, A> {
    token: &'a [u8],
    me: Identity,
    /// After an accepted handshake, read one frame of at most this many payload bytes.
    post_frame: Option<usize>,
    admit: A,
}

impl Pending {
    fn new(stream: TcpStream, addr: SocketAddr, now: Instant) -> Self {
        Pending {
            stream,
            addr,
            since: now,
            phase: Phase::Hello,
            input: Vec::with_capacity(CLIENT_HELLO_LEN),
            want: CLIENT_HELLO_LEN,
            output: Vec::new(),
            sent: 0,
        }
    }

    /// Eviction order: first the connections that sent nothing, then those amid their hello, then
    /// those further on; oldest first within each.
    fn shown(&self) -> (u8, Instant) {
        let stage = match self.phase {
            Phase::Hello if self.input.is_empty() => 0,
            Phase::Hello => 1,
            _ => 2,
        };
        (stage, self.since)
    }

    fn wants_write(&self) -> bool {
        self.sent < self.output.len()
    }

    fn expect(&mut self, want: usize) {
        self.input.clear();
        self.want = want;
    }

    /// Read towards `want` bytes; `Ok(true)` once they are all in.
    fn fill(&mut self) -> Result<bool, Progress> {
        let mut buf = [0u8; 512];
        while self.input.len() < self.want {
            let n = (self.want - self.input.len()).min(buf.len());
            match (&self.stream).read(&mut buf[..n]) {
                Ok(0) => return Err(self.closed("closed the connection")),
                Ok(k) => self.input.extend_from_slice(&buf[..k]),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(false),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(self.closed(&e.to_string())),
            }
        }
        Ok(true)
    }

    /// Send pending output; `Ok(true)` once it is all out.
    fn flush(&mut self) -> Result<bool, Progress> {
        while self.sent < self.output.len() {
            match (&self.stream).write(&self.output[self.sent..]) {
                Ok(0) => return Err(self.closed("closed the connection")),
                Ok(k) => self.sent += k,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(false),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(self.closed(&e.to_string())),
            }
        }
        Ok(true)
    }

    fn send(&mut self, bytes: &[u8]) {
        self.output.clear();
        self.output.extend_from_slice(bytes);
        self.sent = 0;
    }

    fn closed(&self, what: &str) -> Progress {
        let stage = match self.phase {
            Phase::Hello => "before its hello was complete",
            Phase::Proof(_) => "before its proof",
            Phase::Frame(..) => "before its registration was complete",
            Phase::Admitted(..) | Phase::Closing(..) => "before the verdict was out",
        };
        let why = if matches!(self.phase, Phase::Hello) {
            TurnAway::Silent
        } else {
            TurnAway::Dropped
        };
        Progress::TurnedAway(why, format!("{what} {stage}"))
    }

    /// Drive the handshake as far as the socket allows.
    fn advance<A>(&mut self, server: &mut Server<'_, A>) -> Progress
    where
        A: FnMut(&Identity) -> Verdict,
    {
        match self.step(server) {
            Ok(p) | Err(p) => p,
        }
    }

    fn step<A>(&mut self, server: &mut Server<'_, A>) -> Result<Progress, Progress>
    where
        A: FnMut(&Identity) -> Verdict,
    {
        loop {
            if !self.flush()? {
                return Ok(Progress::Wait);
            }
            match &mut self.phase {
                Phase::Admitted(id, frame) => return Ok(Progress::Admitted(*id, frame.take())),
                Phase::Closing(why, detail) => {
                    return Ok(Progress::TurnedAway(*why, std::mem::take(detail)))
                }
                _ => {}
            }
            if !self.fill()? {
                return Ok(Progress::Wait);
            }
            let input = std::mem::take(&mut self.input);
            match std::mem::replace(&mut self.phase, Phase::Hello) {
                Phase::Hello => {
                    let mut nonce = [0u8; NONCE_LEN];
                    getrandom::fill(&mut nonce).map_err(|e| {
                        Progress::TurnedAway(TurnAway::Dropped, format!("OS random generator: {e}"))
                    })?;
                    let ch: &[u8; CLIENT_HELLO_LEN] = input[..].try_into().expect("hello length");
                    let Some(steps) = ServerSteps::hello(server.token, server.me, &nonce, ch)
                    else {
                        return Err(Progress::TurnedAway(TurnAway::Garbage, GARBAGE.into()));
                    };
                    self.send(steps.server_hello());
                    self.phase = Phase::Proof(steps);
                    self.expect(MAC_LEN);
                }
                Phase::Proof(steps) => {
                    let proof: &[u8; MAC_LEN] = input[..].try_into().expect("proof length");
                    let client = steps.client();
                    let verdict = steps.verdict(server.token, server.me, proof, &mut server.admit);
                    self.send(&[verdict as u8]);
                    self.phase = match verdict {
                        Verdict::Accepted => match server.post_frame {
                            Some(_) => Phase::Frame(client, None),
                            None => Phase::Admitted(client, None),
                        },
                        Verdict::BadProof => {
                            Phase::Closing(TurnAway::BadToken, "wrong job token".into())
                        }
                        v => Phase::Closing(
                            TurnAway::Refused,
                            format!("rank {} of world {}: {v:?}", client.rank, client.world),
                        ),
                    };
                    self.expect(FRAME_HEADER_LEN);
                }
                Phase::Frame(id, None) => {
                    let header = Header::decode(input[..].try_into().expect("frame header length"));
                    let max = server.post_frame.unwrap_or(0);
                    if header.len > max as u64 {
                        self.phase = Phase::Frame(id, None);
                        return Err(Progress::TurnedAway(
                            TurnAway::Dropped,
                            format!(
                                "rank {}: frame of {} bytes, more than {max}",
                                id.rank, header.len
                            ),
                        ));
                    }
                    self.phase = Phase::Frame(id, Some(header));
                    self.expect(header.len as usize);
                }
                Phase::Frame(id, Some(header)) => {
                    self.phase = Phase::Admitted(id, Some((header.tag, input)));
                }
                Phase::Admitted(..) | Phase::Closing(..) => unreachable!("handled above"),
            }
        }
    }
}

/// `poll(2)` on `fds`, at most `timeout`; an interrupted call counts as nothing ready.
fn poll(fds: &mut [libc::pollfd], timeout: Duration) -> io::Result<()> {
    // Rounded up: a deadline 0.4 ms away must not make a busy loop.
    let ms = timeout.as_micros().div_ceil(1000).min(i32::MAX as u128) as libc::c_int;
    // SAFETY: `fds` is a valid, exclusively borrowed array of `fds.len()` pollfd structs for the
    // whole call, which is what poll(2) reads and writes.
    let n = unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, ms) };
    if n < 0 {
        let e = io::Error::last_os_error();
        if e.kind() != io::ErrorKind::Interrupted {
            return Err(e);
        }
    }
    Ok(())
}

fn fd(s: &impl std::os::fd::AsRawFd) -> libc::c_int {
    s.as_raw_fd()
}

/// Run an accept loop on `listener` in a background thread until `stop` is set, and return the
/// channel of admitted connections and the tally of those turned away.
///
/// One thread drives every handshake without blocking (`poll(2)`), so a connection costs the
/// listener a file descriptor and a few hundred bytes, not a thread:
/// - a connection must deliver its whole ClientHello within `policy.hello_timeout` of being accepted
///   (a real client sends it at once) and finish within `policy.handshake_timeout` — for the store,
///   including the REGISTER frame (`post_frame`: read one frame of at most that many payload bytes
///   after the verdict);
/// - at most `policy.slots` connections are in handshake at once; a new one beyond that evicts the
///   one that has shown the least (sent nothing, oldest first; then amid its hello; then the oldest),
///   so a flood of silent connections only ever displaces itself, while a real client, which sends
///   its hello right away, keeps its slot;
/// - a client is admitted if its rank is below `ranks_below` and no other connection claimed that
///   rank; then `post` runs on it (with the frame read after the verdict, if any) and the result goes
///   to the channel. If `post` fails, the rank may connect again;
/// - every connection turned away is counted by reason, and logged within the rate limit of
///   [`RefusalLog`].
#[allow(clippy::too_many_arguments)]
pub(crate) fn spawn_acceptor<T, P>(
    listener: TcpListener,
    token: Arc<[u8]>,
    me: Identity,
    policy: AcceptPolicy,
    ranks_below: u32,
    post_frame: Option<usize>,
    post: P,
    stop: Arc<AtomicBool>,
) -> Result<(mpsc::Receiver<Admitted<T>>, Arc<TurnedAway>), PgError>
where
    T: Send + 'static,
    P: Fn(&Identity, Option<(u64, Vec<u8>)>) -> Result<T, String> + Send + 'static,
{
    listener
        .set_nonblocking(true)
        .map_err(|e| PgError::io(None, &e))?;
    let (tx, rx) = mpsc::channel();
    let turned_away = Arc::new(TurnedAway::default());
    let tally = Arc::clone(&turned_away);
    let name = listener
        .local_addr()
        .map(|a| a.to_string())
        .unwrap_or_else(|_| "?".into());
    std::thread::Builder::new()
        .name(format!("pgt-accept-{}", me.rank))
        .spawn(move || {
            let mut log = RefusalLog::new(name);
            let mut claimed = HashSet::<u32>::new();
            let mut pending: Vec<Pending> = Vec::new();
            let mut fds: Vec<libc::pollfd> = Vec::new();
            let slots = policy.slots.max(1);
            let turn_away = |p: Pending, why: TurnAway, detail: &str, log: &mut RefusalLog| {
                tally.add(why);
                log.refused(&p.addr, why, detail);
                if matches!(why, TurnAway::Silent | TurnAway::Evicted | TurnAway::Garbage) {
                    // Nothing was sent on it: closed with a reset, leaving no TIME_WAIT here.
                    let _ = SockRef::from(&p.stream).set_linger(Some(Duration::ZERO));
                }
            };
            while !stop.load(Ordering::SeqCst) {
                let now = Instant::now();
                // Wait for the listener, the pending connections, or the next deadline.
                fds.clear();
                fds.push(libc::pollfd {
                    fd: fd(&listener),
                    events: libc::POLLIN,
                    revents: 0,
                });
                let mut wait = ACCEPT_POLL;
                for p in &pending {
                    let events = if p.wants_write() {
                        libc::POLLOUT
                    } else {
                        libc::POLLIN
                    };
                    fds.push(libc::pollfd {
                        fd: fd(&p.stream),
                        events,
                        revents: 0,
                    });
                    wait = wait.min(deadline(p, &policy).saturating_duration_since(now));
                }
                if let Err(e) = poll(&mut fds, wait) {
                    tracing::error!(error = %e, "poll failed; the listener stops");
                    break;
                }
                let mut server = Server {
                    token: &token,
                    me,
                    post_frame,
                    admit: |id: &Identity| {
                        if id.rank < ranks_below && claimed.insert(id.rank) {
                            Verdict::Accepted
                        } else {
                            Verdict::UnexpectedRank
                        }
                    },
                };
                // 1. Advance the connections that are ready (from the end: swap_remove keeps the
                //    indices below valid).
                let mut done: Vec<(Pending, Progress)> = Vec::new();
                for i in (0..pending.len()).rev() {
                    if fds[i + 1].revents == 0 {
                        continue;
                    }
                    match pending[i].advance(&mut server) {
                        Progress::Wait => {}
                        p => done.push((pending.swap_remove(i), p)),
                    }
                }
                // 2. Accept what is waiting, evicting when every slot is busy.
                if fds[0].revents != 0 {
                    for _ in 0..slots {
                        let (stream, addr) = match listener.accept() {
                            Ok(x) => x,
                            Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                            Err(e) => {
                                // E.g. out of file descriptors: the connection stays queued.
                                tally.add(TurnAway::Dropped);
                                log.refused(
                                    &SocketAddr::from(([0, 0, 0, 0], 0)),
                                    TurnAway::Dropped,
                                    &format!("accept failed: {e}"),
                                );
                                std::thread::sleep(Duration::from_millis(10));
                                break;
                            }
                        };
                        if stream.set_nonblocking(true).is_err() {
                            continue;
                        }
                        let _ = stream.set_nodelay(true);
                        while pending.len() >= slots {
                            if let Some(i) = evictee(&mut pending, &mut server, &mut done) {
                                let p = pending.swap_remove(i);
                                done.push((
                                    p,
                                    Progress::TurnedAway(
                                        TurnAway::Evicted,
                                        format!("all {slots} handshake slots busy"),
                                    ),
                                ));
                            }
                        }
                        let mut p = Pending::new(stream, addr, Instant::now());
                        // Its hello may be there already.
                        match p.advance(&mut server) {
                            Progress::Wait => pending.push(p),
                            progress => done.push((p, progress)),
                        }
                    }
                }
                // 3. Deadlines.
                let now = Instant::now();
                for i in (0..pending.len()).rev() {
                    let p = &pending[i];
                    if now >= deadline(p, &policy) {
                        let (why, what) = match p.phase {
                            Phase::Hello => (TurnAway::Silent, "no complete hello"),
                            _ => (TurnAway::Dropped, "handshake not complete"),
                        };
                        let limit = match p.phase {
                            Phase::Hello => policy.hello_timeout.min(policy.handshake_timeout),
                            _ => policy.handshake_timeout,
                        };
                        let p = pending.swap_remove(i);
                        done.push((
                            p,
                            Progress::TurnedAway(why, format!("{what} within {limit:?}")),
                        ));
                    }
                }
                // 4. Hand over the admitted, close the others.
                for (p, progress) in done {
                    match progress {
                        Progress::Wait => unreachable!("only finished connections are here"),
                        Progress::Admitted(id, frame) => {
                            let handed = p
                                .stream
                                .set_nonblocking(false)
                                .map_err(|e| e.to_string())
                                .and_then(|()| post(&id, frame));
                            match handed {
                                Ok(t) => {
                                    tracing::debug!(addr = %p.addr, rank = id.rank, "accepted connection");
                                    let _ = tx.send((id.rank, p.stream, t));
                                }
                                Err(e) => {
                                    // Let the rank try again.
                                    claimed.remove(&id.rank);
                                    turn_away(p, TurnAway::Dropped, &e, &mut log);
                                }
                            }
                        }
                        Progress::TurnedAway(why, detail) => {
                            if let Phase::Frame(id, _) | Phase::Admitted(id, _) = &p.phase {
                                // Admitted, then lost before the end: the rank may come again.
                                claimed.remove(&id.rank);
                            }
                            turn_away(p, why, &detail, &mut log);
                        }
                    }
                }
                log.tick(Instant::now(), false);
            }
            log.tick(Instant::now(), true);
        })
        .map_err(|e| PgError::io(None, &e))?;
    Ok((rx, turned_away))
}

/// When `p` must be done with its current phase.
fn deadline(p: &Pending, policy: &AcceptPolicy) -> Instant {
    let all = p.since + policy.handshake_timeout;
    match p.phase {
        Phase::Hello => all.min(p.since + policy.hello_timeout),
        _ => all,
    }
}

/// The pending connection to evict for a new one: the one that has shown the least. A candidate
/// that sent nothing yet gets one more look at its socket first (its hello may have just arrived):
/// then `None` (look again), and one that finished meanwhile has moved to `done`.
fn evictee<A>(
    pending: &mut Vec<Pending>,
    server: &mut Server<'_, A>,
    done: &mut Vec<(Pending, Progress)>,
) -> Option<usize>
where
    A: FnMut(&Identity) -> Verdict,
{
    let i = (0..pending.len()).min_by_key(|&i| pending[i].shown())?;
    if pending[i].shown().0 > 0 {
        return Some(i);
    }
    match pending[i].advance(server) {
        Progress::Wait if pending[i].shown().0 == 0 => Some(i),
        Progress::Wait => None,
        p => {
            done.push((pending.swap_remove(i), p));
            None
        }
    }
}
