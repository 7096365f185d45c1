//! [`TcpProcessGroup`]: one authenticated TCP connection per pair of ranks, no external service.
//!
//! `TCP.md` at the repository root specifies this group byte by byte (formation, handshake, store,
//! frames, timeouts, security); the summary below follows it.
//!
//! # Formation
//! 1. Every rank binds a listener on an ephemeral port (or [`TcpTuning::listen_port`]) of
//!    `listen_host` — by default the local interface that routes to `MASTER_ADDR` (127.0.0.1 when
//!    the master is on loopback).
//! 2. Rank 0 hosts the rendezvous store on `MASTER_ADDR:MASTER_PORT` in a background thread (it
//!    retries the bind while the port is still held, e.g. by a previous job, until the timeout).
//! 3. Every rank (rank 0 too, over TCP) registers `(rank, listener address)` with the store,
//!    retrying while the store is not up yet, and gets back the table of all addresses once all
//!    `WORLD_SIZE` ranks have registered. The store then exits.
//! 4. Each rank connects to every *higher* rank and accepts connections from every *lower* rank,
//!    concurrently. The connection's identity (rank) travels in the handshake.
//!
//! # Authentication
//! Every connection — to the store and between peers — starts with a mutual HMAC-SHA256
//! challenge–response keyed with the job token `K` (`PGT_TOKEN`). The connecting side is C, the
//! accepting side S; integers little-endian:
//!
//! ```text
//! C -> S  ClientHello  52 bytes  "PGTAUTH1" | purpose u8 | 0u8 x3 | rank u32 | world u32 | nonce_c [32]
//! S -> C  ServerHello  84 bytes  "PGTAUTH1" | purpose u8 | 0u8 x3 | rank u32 | world u32 | nonce_s [32]
//!                                | mac_s [32] = HMAC(K, "pgt/1 server" | ClientHello | ServerHello[..52])
//! C -> S  ClientProof  32 bytes  mac_c = HMAC(K, "pgt/1 client" | ClientHello | ServerHello)
//! S -> C  Verdict       1 byte   0 accepted, 1 bad proof, 2 rank not expected / duplicate,
//!                                3 world size mismatch, 4 wrong purpose
//! ```
//!
//! `purpose` is 1 for the store (whose rank field is `u32::MAX`), 2 between peers. Nonces come from
//! the OS RNG, MACs are checked in constant time, the labels differ per direction (no
//! reflection), and the MACs cover both hellos, so ranks and world size are authenticated too.
//! The traffic itself is not encrypted: the threat model is strangers that don't know the token
//! (scanners, other jobs, stale ranks), not an on-path attacker.
//!
//! A stranger (wrong token, garbage, silence past [`TcpTuning::hello_timeout`], a stalled
//! handshake past [`TcpTuning::handshake_timeout`]) is refused and dropped, counted, and logged
//! within a rate limit. One thread per listener drives all its handshakes without blocking, at most
//! [`TcpTuning::handshake_slots`] at once; beyond that a new connection evicts the one that has
//! shown the least, so silent connections cannot keep real ranks out (see `accept.rs`). A rank
//! connecting twice, a rank not expected at that listener, or a different world size is refused
//! too. After formation the listeners are closed.
//!
//! A client socket that gets connected to itself (the master port is in the ephemeral range and
//! nothing listens there yet: TCP simultaneous open) is closed with a reset and the attempt retried;
//! client sockets have `SO_REUSEADDR`, like the store's listener, so that none of them keeps the
//! store from binding its port.
//!
//! # Sockets
//! `TCP_NODELAY` on every connection (small control messages must not wait for Nagle). Buffer
//! sizes and the per-syscall chunk come from [`TcpTuning`]; see its `Default` for the loopback
//! measurements (`cargo run --release -p pgt-host --example tcp_tune`) behind the defaults.
//! Sends are vectored `sendmsg` calls (header + caller's parts, `MSG_NOSIGNAL`) of at most
//! [`TcpTuning::chunk_size`] bytes each; receives are vectored reads straight into the caller's
//! parts, same chunking.

use std::io;
use std::net::{SocketAddr, TcpListener, TcpStream, ToSocketAddrs, UdpSocket};
use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::{Duration, Instant};

use socket2::{Domain, Protocol, SockAddr, Socket, Type};

use super::accept::{spawn_acceptor, AcceptPolicy, StopOnDrop};
use super::auth::{Identity, PURPOSE_PEER};
use super::conn::PeerConn;
use super::rendezvous::{collect, connect_authenticated, register, Store};
use super::stash::DEFAULT_STASH_LIMIT;
use super::Dest;
use super::{check_peer, Observer, PgError, ProcessGroup};

/// Default setup timeout of [`TcpOptions::from_env`] when `PGT_TIMEOUT_SECS` is not set.
pub const DEFAULT_SETUP_TIMEOUT: Duration = Duration::from_secs(300);

/// Where and who: the torch-style rendezvous parameters of one rank.
#[derive(Clone, PartialEq, Eq)]
pub struct TcpOptions {
    /// Host of rank 0's rendezvous store (name or IP).
    pub master_addr: String,
    /// Port of the rendezvous store.
    pub master_port: u16,
    /// This process's rank, `0..world_size`.
    pub rank: u32,
    /// Number of ranks.
    pub world_size: u32,
    /// Shared job secret; must be non-empty and the same on every rank.
    pub token: Vec<u8>,
    /// Deadline for the whole group formation (rendezvous and all connections).
    pub timeout: Duration,
    /// Host/IP to bind this rank's peer listener on; `None` = the interface that routes to the
    /// master. An unspecified address (`0.0.0.0`) listens everywhere and advertises the interface
    /// towards the master.
    pub listen_host: Option<String>,
}

impl std::fmt::Debug for TcpOptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TcpOptions")
            .field("master_addr", &self.master_addr)
            .field("master_port", &self.master_port)
            .field("rank", &self.rank)
            .field("world_size", &self.world_size)
            .field(
                "token",
                &format_args!("<{} bytes redacted>", self.token.len()),
            )
            .field("timeout", &self.timeout)
            .field("listen_host", &self.listen_host)
            .finish()
    }
}

impl TcpOptions {
    /// Read `MASTER_ADDR`, `MASTER_PORT`, `RANK`, `WORLD_SIZE`, `PGT_TOKEN` (all required), and
    /// optionally `PGT_TIMEOUT_SECS` (setup timeout, default 300) and `PGT_LISTEN_HOST`.
    pub fn from_env() -> Result<Self, PgError> {
        Self::from_vars(|k| std::env::var(k).ok())
    }

    fn from_vars(get: impl Fn(&str) -> Option<String>) -> Result<Self, PgError> {
        let req = |k: &str| {
            get(k)
                .filter(|v| !v.is_empty())
                .ok_or_else(|| PgError::Config(format!("environment variable {k} is not set")))
        };
        fn num<T: std::str::FromStr>(k: &str, v: String) -> Result<T, PgError> {
            v.trim()
                .parse()
                .map_err(|_| PgError::Config(format!("{k}={v:?} is not a valid number")))
        }
        let timeout = match get("PGT_TIMEOUT_SECS") {
            Some(v) => {
                let secs: f64 = num("PGT_TIMEOUT_SECS", v)?;
                Duration::try_from_secs_f64(secs).map_err(|_| {
                    PgError::Config(format!("PGT_TIMEOUT_SECS={secs} is not a valid duration"))
                })?
            }
            None => DEFAULT_SETUP_TIMEOUT,
        };
        Ok(TcpOptions {
            master_addr: req("MASTER_ADDR")?,
            master_port: num("MASTER_PORT", req("MASTER_PORT")?)?,
            rank: num("RANK", req("RANK")?)?,
            world_size: num("WORLD_SIZE", req("WORLD_SIZE")?)?,
            token: req("PGT_TOKEN")?.into_bytes(),
            timeout,
            listen_host: get("PGT_LISTEN_HOST").filter(|v| !v.is_empty()),
        })
    }
}

/// Socket and protocol knobs; `Default` is right for nearly everyone.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TcpTuning {
    /// SO_SNDBUF for peer connections; `None` keeps the kernel's autotuning.
    pub send_buffer: Option<usize>,
    /// SO_RCVBUF for peer connections; `None` keeps the kernel's autotuning.
    pub recv_buffer: Option<usize>,
    /// Most bytes handed to one send/receive system call; larger messages are streamed in pieces.
    pub chunk_size: usize,
    /// Cap on stashed (out-of-order) bytes per peer; see [`PgError::UnexpectedBacklog`].
    pub stash_limit: usize,
    /// How long an accepted connection may take to authenticate before it is dropped; a client's
    /// wait for the verdict.
    pub handshake_timeout: Duration,
    /// How long an accepted connection may take to deliver its whole ClientHello (a real client sends
    /// it at once): a silent connection holds a handshake slot no longer than this.
    pub hello_timeout: Duration,
    /// Connections each listener keeps in handshake at once; beyond that a new one evicts the one
    /// that has shown the least (TCP.md §7.1). Each costs a file descriptor.
    pub handshake_slots: usize,
    /// Port for this rank's peer listener; 0 (default) = ephemeral.
    pub listen_port: u16,
}

impl Default for TcpTuning {
    /// Kernel-autotuned socket buffers and 4 MiB per system call: across runs of
    /// `examples/tcp_tune.rs` these were at or near the top (fixed buffers never did better, 16 MiB
    /// chunks never helped), and short system calls keep timeouts responsive. The measurements are in
    /// `docs/perf.md`.
    fn default() -> Self {
        TcpTuning {
            send_buffer: None,
            recv_buffer: None,
            chunk_size: 4 << 20,
            stash_limit: DEFAULT_STASH_LIMIT,
            handshake_timeout: Duration::from_secs(10),
            hello_timeout: Duration::from_secs(1),
            handshake_slots: 256,
            listen_port: 0,
        }
    }
}

impl TcpTuning {
    fn accept_policy(&self) -> AcceptPolicy {
        AcceptPolicy {
            hello_timeout: self.hello_timeout,
            handshake_timeout: self.handshake_timeout,
            slots: self.handshake_slots,
        }
    }
}

/// A process group over TCP; see the [module docs](self) and the [`ProcessGroup`] contract.
#[derive(Debug)]
pub struct TcpProcessGroup {
    rank: u32,
    size: u32,
    /// Index = peer rank; `None` at our own rank.
    peers: Vec<Option<PeerConn>>,
}

fn io_err(e: io::Error) -> PgError {
    PgError::io(None, &e)
}

/// A TCP socket for `addr`'s family with the tuning's buffer sizes set (before connect/listen, so
/// that window scaling is negotiated accordingly).
fn tuned_socket(addr: &SocketAddr, tuning: &TcpTuning) -> io::Result<Socket> {
    let s = Socket::new(
        Domain::for_address(*addr),
        Type::STREAM,
        Some(Protocol::TCP),
    )?;
    if let Some(n) = tuning.send_buffer {
        s.set_send_buffer_size(n)?;
    }
    if let Some(n) = tuning.recv_buffer {
        s.set_recv_buffer_size(n)?;
    }
    Ok(s)
}

pub(crate) fn listen(addr: SocketAddr, tuning: &TcpTuning, reuse: bool) -> io::Result<TcpListener> {
    let s = tuned_socket(&addr, tuning)?;
    if reuse {
        s.set_reuse_address(true)?;
    }
    s.bind(&SockAddr::from(addr))?;
    s.listen(1024)?;
    Ok(s.into())
}

/// A client socket for `addr`: tuned, and with `SO_REUSEADDR` like the store's listener. Should it
/// ever hold the store's port (a connection to itself, see
/// [`is_self_connected`](super::rendezvous::is_self_connected)), neither it nor its TIME_WAIT keeps
/// the store from binding that port: Linux lets a bind with `SO_REUSEADDR` through a non-listening
/// socket on the port, TIME_WAIT included, only if that socket had the option too.
pub(crate) fn client_socket(addr: &SocketAddr, tuning: &TcpTuning) -> io::Result<Socket> {
    let s = tuned_socket(addr, tuning)?;
    s.set_reuse_address(true)?;
    Ok(s)
}

fn connect_tuned(addr: SocketAddr, timeout: Duration, tuning: &TcpTuning) -> io::Result<TcpStream> {
    let s = client_socket(&addr, tuning)?;
    s.connect_timeout(&SockAddr::from(addr), timeout)?;
    let s: TcpStream = s.into();
    s.set_nodelay(true)?;
    Ok(s)
}

/// The local IP the OS would use to reach `to` (no packet is sent).
fn route_to(to: SocketAddr) -> io::Result<std::net::IpAddr> {
    let any: SocketAddr = if to.is_ipv4() {
        ([0, 0, 0, 0], 0).into()
    } else {
        ([0u16; 8], 0).into()
    };
    let u = UdpSocket::bind(any)?;
    u.connect(to)?;
    Ok(u.local_addr()?.ip())
}

fn resolve(host: &str, port: u16) -> Result<Vec<SocketAddr>, PgError> {
    let addrs: Vec<SocketAddr> = (host, port)
        .to_socket_addrs()
        .map_err(|e| PgError::Config(format!("cannot resolve {host:?}: {e}")))?
        .collect();
    if addrs.is_empty() {
        return Err(PgError::Config(format!("{host:?} resolves to no address")));
    }
    Ok(addrs)
}

impl TcpProcessGroup {
    /// Form the group with default [`TcpTuning`]; blocks until every rank is connected or
    /// `opts.timeout` has passed.
    pub fn connect(opts: TcpOptions) -> Result<Self, PgError> {
        Self::connect_with(opts, TcpTuning::default())
    }

    /// Form the group with explicit tuning (every rank should use the same).
    pub fn connect_with(opts: TcpOptions, tuning: TcpTuning) -> Result<Self, PgError> {
        let TcpOptions {
            master_addr,
            master_port,
            rank,
            world_size: world,
            token,
            timeout,
            listen_host,
        } = opts;
        if world == 0 || rank >= world {
            return Err(PgError::Config(format!(
                "rank {rank} is outside world size {world}"
            )));
        }
        if token.is_empty() {
            return Err(PgError::Config("the job token is empty".into()));
        }
        let deadline = Instant::now() + timeout;
        if world == 1 {
            return Ok(TcpProcessGroup {
                rank,
                size: 1,
                peers: vec![None],
            });
        }
        let token: Arc<[u8]> = token.into();
        let masters = resolve(&master_addr, master_port)?;

        // 1. Our peer listener.
        let route = route_to(masters[0])
            .map_err(|e| PgError::Config(format!("no route to MASTER_ADDR {}: {e}", masters[0])))?;
        let bind_addr = match &listen_host {
            Some(h) => resolve(h, tuning.listen_port)?[0],
            None => SocketAddr::new(route, tuning.listen_port),
        };
        let listener = listen(bind_addr, &tuning, false)
            .map_err(|e| PgError::Config(format!("cannot listen on {bind_addr}: {e}")))?;
        let mut advertised = listener.local_addr().map_err(io_err)?;
        if advertised.ip().is_unspecified() {
            advertised.set_ip(route);
        }

        // 2. Rank 0: the store.
        let mut store = if rank == 0 {
            Some(Self::host_store(
                masters[0], &token, world, &tuning, deadline,
            )?)
        } else {
            None
        };

        // 4a. Accept lower ranks from now on (they may connect as soon as they have the table).
        let stop = Arc::new(AtomicBool::new(false));
        let _stop_guard = StopOnDrop(Arc::clone(&stop));
        let me = Identity {
            purpose: PURPOSE_PEER,
            rank,
            world,
        };
        let (incoming, turned_away) = spawn_acceptor(
            listener,
            Arc::clone(&token),
            me,
            tuning.accept_policy(),
            rank,
            None,
            |_: &Identity, _| Ok(()),
            Arc::clone(&stop),
        )?;

        // 3. Register and get the table.
        let connector = |a: SocketAddr, t: Duration| connect_tuned(a, t, &tuning);
        let table = register(
            &masters,
            &connector,
            &token,
            rank,
            world,
            advertised,
            tuning.handshake_timeout,
            deadline,
        )
        .map_err(|e| match store.take() {
            // Rank 0's own registration fails when its store gives up: the store's error says why
            // (which ranks are missing, what it turned away meanwhile).
            Some(store) => store.stop().err().unwrap_or(e),
            None => e,
        })?;
        tracing::debug!(rank, ?table, "got address table");

        // 4b. Connect to higher ranks.
        let mut streams: Vec<Option<TcpStream>> = (0..world).map(|_| None).collect();
        for peer in rank + 1..world {
            let (s, id) = connect_authenticated(
                &table[peer as usize..=peer as usize],
                &connector,
                &token,
                me,
                tuning.handshake_timeout,
                deadline,
                &format!("rank {peer}"),
            )?;
            if id.rank != peer {
                return Err(PgError::Rendezvous(format!(
                    "{} answered as rank {}, expected rank {peer}",
                    table[peer as usize], id.rank
                )));
            }
            streams[peer as usize] = Some(s);
        }

        // 4c. Collect lower ranks.
        let lower = collect(&incoming, &turned_away, rank, deadline, "connections")?;
        for (r, s, ()) in lower {
            streams[r as usize] = Some(s);
        }
        drop(_stop_guard);

        if let Some(store) = store {
            store.join()?;
        }
        let peers = streams
            .into_iter()
            .enumerate()
            .map(|(r, s)| {
                s.map(|s| PeerConn::new(r as u32, s, tuning.chunk_size, tuning.stash_limit))
            })
            .collect();
        tracing::info!(rank, world, "TCP process group formed");
        Ok(TcpProcessGroup {
            rank,
            size: world,
            peers,
        })
    }

    fn host_store(
        addr: SocketAddr,
        token: &Arc<[u8]>,
        world: u32,
        tuning: &TcpTuning,
        deadline: Instant,
    ) -> Result<Store, PgError> {
        // The store only carries tiny messages: no buffer tuning.
        let plain = TcpTuning {
            send_buffer: None,
            recv_buffer: None,
            ..tuning.clone()
        };
        let listener = loop {
            match listen(addr, &plain, true) {
                Ok(l) => break l,
                Err(e) if e.kind() == io::ErrorKind::AddrInUse && Instant::now() < deadline => {
                    tracing::debug!(%addr, "store port busy, retrying");
                    std::thread::sleep(Duration::from_millis(100));
                }
                Err(e) => {
                    return Err(PgError::Rendezvous(format!(
                        "cannot host the store on {addr}: {e}"
                    )))
                }
            }
        };
        Store::start(
            listener,
            Arc::clone(token),
            world,
            tuning.accept_policy(),
            deadline,
        )
    }

    fn peer(&self, peer: u32) -> Result<&PeerConn, PgError> {
        check_peer(peer, self.rank, self.size)?;
        Ok(self.peers[peer as usize]
            .as_ref()
            .expect("every other rank has a connection"))
    }
}

impl ProcessGroup for TcpProcessGroup {
    fn rank(&self) -> u32 {
        self.rank
    }

    fn size(&self) -> u32 {
        self.size
    }

    fn send(&self, dst: u32, tag: u64, parts: &[&[u8]], timeout: Duration) -> Result<(), PgError> {
        self.peer(dst)?.send(tag, parts, timeout)
    }

    fn recv_into(
        &self,
        src: u32,
        tag: u64,
        parts: &mut [&mut [u8]],
        timeout: Duration,
    ) -> Result<(), PgError> {
        self.peer(src)?
            .recv(tag, Dest::Parts(parts), timeout)
            .map(|_| ())
    }

    fn recv_vec(
        &self,
        src: u32,
        tag: u64,
        max_len: usize,
        timeout: Duration,
    ) -> Result<Vec<u8>, PgError> {
        self.peer(src)?
            .recv(tag, Dest::Vec { max: max_len }, timeout)
            .map(|v| v.expect("Dest::Vec yields a Vec"))
    }

    fn forget_prefix(&self, src: u32, prefix: [u8; 8]) -> Result<(), PgError> {
        self.peer(src)?.forget(prefix);
        Ok(())
    }

    fn send_observed(
        &self,
        dst: u32,
        tag: u64,
        parts: &[&[u8]],
        timeout: Duration,
        observe: &mut Observer<'_>,
    ) -> Result<(), PgError> {
        self.peer(dst)?
            .send_observed(tag, parts, timeout, Some(observe))
    }

    fn recv_into_observed(
        &self,
        src: u32,
        tag: u64,
        parts: &mut [&mut [u8]],
        timeout: Duration,
        observe: &mut Observer<'_>,
    ) -> Result<(), PgError> {
        self.peer(src)?
            .recv_observed(tag, Dest::Parts(parts), timeout, Some(observe))
            .map(|_| ())
    }
}

/// Plain single-stream loopback TCP throughput in GB/s (bytes / seconds / 1e9): a sender thread
/// writes `bytes` from a reused, touched 8 MiB buffer to a receiver reading into another touched
/// 8 MiB buffer, default socket options. The baseline for group benchmarks in the same run (feature
/// `testing`: not part of the stable API).
#[cfg(feature = "testing")]
pub fn raw_loopback_gbps(bytes: u64) -> io::Result<f64> {
    use std::io::{Read, Write};
    const BUF: usize = 8 << 20;
    let listener = TcpListener::bind("127.0.0.1:0")?;
    let addr = listener.local_addr()?;
    let sender = std::thread::spawn(move || -> io::Result<()> {
        let buf: Vec<u8> = (0..BUF).map(|i| i as u8).collect();
        let mut s = TcpStream::connect(addr)?;
        let mut left = bytes;
        while left > 0 {
            let n = left.min(BUF as u64) as usize;
            s.write_all(&buf[..n])?;
            left -= n as u64;
        }
        Ok(())
    });
    let (mut r, _) = listener.accept()?;
    let mut buf = vec![1u8; BUF];
    let start = Instant::now();
    let mut got = 0u64;
    while got < bytes {
        let n = r.read(&mut buf)?;
        if n == 0 {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "sender closed early",
            ));
        }
        got += n as u64;
    }
    let secs = start.elapsed().as_secs_f64();
    sender
        .join()
        .map_err(|_| io::Error::other("sender thread panicked"))??;
    Ok(bytes as f64 / secs / 1e9)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn options_from_vars() {
        let vars = |k: &str| {
            Some(
                match k {
                    "MASTER_ADDR" => "127.0.0.1",
                    "MASTER_PORT" => "29500",
                    "RANK" => "2",
                    "WORLD_SIZE" => "4",
                    "PGT_TOKEN" => "s3cret",
                    "PGT_TIMEOUT_SECS" => "1.5",
                    _ => return None,
                }
                .to_string(),
            )
        };
        let o = TcpOptions::from_vars(vars).unwrap();
        assert_eq!(o.master_port, 29500);
        assert_eq!((o.rank, o.world_size), (2, 4));
        assert_eq!(o.token, b"s3cret");
        assert_eq!(o.timeout, Duration::from_millis(1500));
        assert_eq!(o.listen_host, None);
        assert!(!format!("{o:?}").contains("s3cret"));

        let e = TcpOptions::from_vars(|k| if k == "RANK" { None } else { vars(k) }).unwrap_err();
        assert!(e.to_string().contains("RANK"), "{e}");
        let e = TcpOptions::from_vars(|k| {
            if k == "MASTER_PORT" {
                Some("http".into())
            } else {
                vars(k)
            }
        })
        .unwrap_err();
        assert!(e.to_string().contains("MASTER_PORT"), "{e}");
    }

    /// A client socket on the store's port — connected to itself, as a rank's retry can be when the
    /// kernel picks the master port as its source port — keeps the store from binding neither while
    /// it is open nor in TIME_WAIT after it closed (before `client_socket` set `SO_REUSEADDR`, both
    /// binds failed with "Address already in use", the second for 60 s).
    #[test]
    fn the_store_binds_through_a_client_socket_on_its_port() {
        let tuning = TcpTuning::default();
        let port = TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap();
        let s = client_socket(&port, &tuning).unwrap();
        // The same port at both ends: a simultaneous open with itself.
        s.bind(&SockAddr::from(port)).unwrap();
        s.connect(&SockAddr::from(port)).unwrap();
        let s: TcpStream = s.into();
        assert!(super::super::rendezvous::is_self_connected(&s));
        drop(listen(port, &tuning, true).expect("bind while the client socket is open"));
        drop(s); // an orderly close: TIME_WAIT on the port
        drop(listen(port, &tuning, true).expect("bind through the TIME_WAIT"));
    }

    #[test]
    #[cfg(feature = "testing")]
    fn raw_loopback_measures_something() {
        let g = raw_loopback_gbps(32 << 20).unwrap();
        assert!(g > 0.0 && g.is_finite());
    }
}
