//! Conformance transcripts of the TCP process group (`TCP.md` §10, `tests/vectors/tcp/`).
//!
//! [`record`] runs this crate's own handshake, registration and framing code — both ends of one
//! connection, each in its own thread — over loopback TCP through a relay that records every byte
//! each end writes. The job tokens and the handshake nonces come from a [`Script`]; the handshake
//! functions take the nonce as an argument, and a real group always passes fresh ones from the OS
//! RNG. Nothing here changes how a [`TcpProcessGroup`](super::TcpProcessGroup) behaves: it only
//! writes down what it puts on the wire.
//!
//! `cargo run -p pgt-tests --bin gen-vectors` turns the transcripts into `tests/vectors/tcp/*.json`;
//! the Rust, Python and Node test suites check them byte for byte.

use std::io::{self, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use super::auth::{
    client_handshake_with_nonce, server_handshake_with_nonce, HsError, Identity, Verdict,
    CLIENT_HELLO_LEN, MAC_LEN, SERVER_HELLO_LEN,
};
use super::conn::PeerConn;
use super::rendezvous::{encode_table, exchange_registration, read_registration, send_table};
use super::stash::DEFAULT_STASH_LIMIT;
use super::wire::{read_full, write_full, Fail, FRAME_HEADER_LEN};
use super::{Dest, PgError};

pub use super::auth::{NONCE_LEN, PURPOSE_PEER, PURPOSE_STORE, STORE_RANK};

/// How long a recording may take before it is abandoned (it takes milliseconds).
const LIMIT: Duration = Duration::from_secs(10);

/// One end of the recorded connection: what it knows and says in its hello.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Party {
    /// Its job token (the HMAC key).
    pub token: Vec<u8>,
    /// [`PURPOSE_STORE`] or [`PURPOSE_PEER`] (any byte is sent as given).
    pub purpose: u8,
    /// Its rank ([`STORE_RANK`] for the store).
    pub rank: u32,
    /// Its world size.
    pub world: u32,
    /// Its hello's nonce.
    pub nonce: [u8; NONCE_LEN],
}

/// Which end.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Side {
    /// The connecting end.
    Client,
    /// The accepting end (a rank's listener, or the store).
    Server,
}

/// One frame of a peer exchange.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Frame {
    /// Who sends it.
    pub from: Side,
    pub tag: u64,
    pub payload: Vec<u8>,
}

/// What follows an accepted handshake.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum After {
    /// Nothing: both ends close.
    Nothing,
    /// A registration with the store: the client registers `addr`, the store answers with `table`.
    Registration {
        addr: SocketAddr,
        table: Vec<SocketAddr>,
    },
    /// Frames between two ranks. Each end sends its frames in list order; then each receives the
    /// frames sent to it, asking for the tags in the order given (a tag asked for before an earlier
    /// frame's is served from the stash).
    Frames {
        frames: Vec<Frame>,
        client_receives: Vec<u64>,
        server_receives: Vec<u64>,
    },
}

/// A recording to make.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Script {
    pub client: Party,
    pub server: Party,
    /// The server's admission decision once purpose and world size matched (`false`: verdict 2).
    pub admit: bool,
    /// `Some(hello)`: the client is not pgt's client but a forger that sends these bytes instead of
    /// its hello (the server end is then the only pgt code recorded). It reads the ServerHello if one
    /// comes, then sends `forged_proof` if there is one, or closes.
    pub forged_hello: Option<[u8; CLIENT_HELLO_LEN]>,
    /// `Some(proof)`: the client is a forger (as for `forged_hello`) that sends its hello, then
    /// `proof` whatever the server said, and reads the verdict.
    pub forged_proof: Option<[u8; MAC_LEN]>,
    pub after: After,
}

/// What a message is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    ClientHello,
    ServerHello,
    ClientProof,
    Verdict,
    /// The rank's REGISTER frame to the store.
    Register,
    /// The store's TABLE frame.
    Table,
    /// A frame between ranks.
    Frame,
}

/// One message as it went over the wire.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Message {
    pub from: Side,
    pub kind: Kind,
    pub bytes: Vec<u8>,
}

/// How one end's part ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// The handshake accepted and everything after it went as scripted.
    Accepted,
    /// [`PgError::AuthFailed`]: a MAC did not verify, or the server refused our proof.
    AuthFailed,
    /// [`PgError::Rendezvous`] from the handshake: a verdict refused the client.
    Refused,
    /// The other end closed the connection in the middle of the handshake.
    Closed,
}

/// A recorded connection.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Transcript {
    /// Every message, in protocol order (the handshake's four in turn, then the registration or
    /// the frames in script order).
    pub messages: Vec<Message>,
    pub client: Outcome,
    pub server: Outcome,
}

fn io_fail(what: &str, e: impl std::fmt::Display) -> PgError {
    PgError::Rendezvous(format!("conformance recording: {what}: {e}"))
}

fn identity(p: &Party) -> Identity {
    Identity {
        purpose: p.purpose,
        rank: p.rank,
        world: p.world,
    }
}

fn outcome(r: Result<(), HsError>) -> Result<Outcome, PgError> {
    match r {
        Ok(()) => Ok(Outcome::Accepted),
        Err(HsError::Fatal(PgError::AuthFailed { .. })) => Ok(Outcome::AuthFailed),
        Err(HsError::Fatal(PgError::Rendezvous(_))) => Ok(Outcome::Refused),
        Err(HsError::Transport(..)) => Ok(Outcome::Closed),
        Err(HsError::Fatal(e)) => Err(e),
    }
}

/// Copies `from` to `to` until EOF, recording the bytes; then passes the EOF on.
fn relay(from: TcpStream, to: TcpStream) -> JoinHandle<io::Result<Vec<u8>>> {
    std::thread::spawn(move || {
        from.set_read_timeout(Some(LIMIT))?;
        let mut seen = Vec::new();
        let mut buf = [0u8; 4096];
        loop {
            let n = match (&from).read(&mut buf) {
                Ok(0) => break,
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::ConnectionReset => break,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e),
            };
            seen.extend_from_slice(&buf[..n]);
            // The other end may be gone already (it refused us): keep recording what this one says.
            let _ = (&to).write_all(&buf[..n]);
        }
        let _ = to.shutdown(Shutdown::Write);
        Ok(seen)
    })
}

fn run_client(stream: TcpStream, script: &Script, deadline: Instant) -> Result<Outcome, PgError> {
    let me = identity(&script.client);
    let token = &script.client.token;
    if script.forged_hello.is_some() || script.forged_proof.is_some() {
        return run_forger(&stream, script, deadline);
    }
    let hs = client_handshake_with_nonce(&stream, token, me, &script.client.nonce, deadline);
    let server = match hs {
        Ok(id) => id,
        Err(e) => return outcome(Err(e)),
    };
    match &script.after {
        After::Nothing => {}
        After::Registration { addr, table } => {
            let got = exchange_registration(&stream, me.rank, me.world, *addr, deadline)?;
            if got != *table {
                return Err(io_fail("table", format!("{got:?} instead of {table:?}")));
            }
        }
        After::Frames {
            frames,
            client_receives,
            ..
        } => exchange(stream, server.rank, Side::Client, frames, client_receives)?,
    }
    Ok(Outcome::Accepted)
}

/// A client that is not pgt's: a scripted hello, then a scripted proof or nothing.
fn run_forger(stream: &TcpStream, script: &Script, deadline: Instant) -> Result<Outcome, PgError> {
    let hello = script
        .forged_hello
        .unwrap_or_else(|| identity(&script.client).encode(&script.client.nonce));
    let io = |r: Result<(), Fail>| match r {
        Ok(()) => Ok(true),
        Err(Fail::Closed) => Ok(false),
        Err(e) => Err(io_fail("forger", e)),
    };
    io(write_full(stream, &[&hello], deadline, usize::MAX, &mut 0))?;
    let mut sh = [0u8; SERVER_HELLO_LEN];
    if !io(read_full(
        stream,
        &mut [&mut sh[..]],
        deadline,
        usize::MAX,
        &mut 0,
    ))? {
        return Ok(Outcome::Closed);
    }
    let Some(proof) = script.forged_proof else {
        return Ok(Outcome::Closed);
    };
    io(write_full(stream, &[&proof], deadline, usize::MAX, &mut 0))?;
    let mut v = [0u8; 1];
    if !io(read_full(
        stream,
        &mut [&mut v[..]],
        deadline,
        usize::MAX,
        &mut 0,
    ))? {
        return Ok(Outcome::Closed);
    }
    Ok(if v[0] == Verdict::Accepted as u8 {
        Outcome::Accepted
    } else {
        Outcome::AuthFailed
    })
}

fn run_server(stream: TcpStream, script: &Script, deadline: Instant) -> Result<Outcome, PgError> {
    let me = identity(&script.server);
    let admit = |_: &Identity| {
        if script.admit {
            Verdict::Accepted
        } else {
            Verdict::UnexpectedRank
        }
    };
    let hs = server_handshake_with_nonce(
        &stream,
        &script.server.token,
        me,
        &script.server.nonce,
        deadline,
        admit,
    );
    let client = match hs {
        Ok(id) => id,
        Err(e) => return outcome(Err(e)),
    };
    match &script.after {
        After::Nothing => {}
        After::Registration { addr, table } => {
            let got = read_registration(&stream, &client, deadline)
                .map_err(|e| io_fail("registration", e))?;
            if got != *addr {
                return Err(io_fail("registration", format!("{got} instead of {addr}")));
            }
            let table: Vec<String> = table.iter().map(SocketAddr::to_string).collect();
            send_table(&stream, &encode_table(&table), deadline)
                .map_err(|e| io_fail("table", e))?;
        }
        After::Frames {
            frames,
            server_receives,
            ..
        } => exchange(stream, client.rank, Side::Server, frames, server_receives)?,
    }
    Ok(Outcome::Accepted)
}

/// One end's part of a frame exchange, through the group's own connection code.
fn exchange(
    stream: TcpStream,
    peer: u32,
    me: Side,
    frames: &[Frame],
    receives: &[u64],
) -> Result<(), PgError> {
    let conn = PeerConn::new(peer, stream, 1 << 20, DEFAULT_STASH_LIMIT);
    for f in frames.iter().filter(|f| f.from == me) {
        conn.send(f.tag, &[&f.payload], LIMIT)?;
    }
    let mut expected: Vec<&Frame> = frames.iter().filter(|f| f.from != me).collect();
    if receives.len() != expected.len() {
        return Err(io_fail(
            "script",
            "the receive order does not list every frame",
        ));
    }
    for &tag in receives {
        let at = expected
            .iter()
            .position(|f| f.tag == tag)
            .ok_or_else(|| io_fail("script", format!("no frame left with tag {tag}")))?;
        let want = expected.remove(at);
        let got = conn
            .recv(tag, Dest::Vec { max: usize::MAX }, LIMIT)?
            .unwrap_or_default();
        if got != want.payload {
            return Err(io_fail("exchange", format!("wrong payload for tag {tag}")));
        }
    }
    Ok(())
}

/// Cuts the first `n` bytes off `rest` as a message, if they are there.
fn take(rest: &mut &[u8], n: usize, from: Side, kind: Kind, out: &mut Vec<Message>) -> bool {
    if rest.len() < n {
        return false;
    }
    let (head, tail) = rest.split_at(n);
    out.push(Message {
        from,
        kind,
        bytes: head.to_vec(),
    });
    *rest = tail;
    true
}

/// Cuts one frame off `rest` (header and payload), if it is all there.
fn take_frame(rest: &mut &[u8], from: Side, kind: Kind, out: &mut Vec<Message>) -> bool {
    let Some(len) = rest.get(8..FRAME_HEADER_LEN) else {
        return false;
    };
    let len = u64::from_le_bytes(len.try_into().expect("8 bytes"));
    match usize::try_from(len) {
        Ok(len) if len <= rest.len() - FRAME_HEADER_LEN => {
            take(rest, FRAME_HEADER_LEN + len, from, kind, out)
        }
        _ => false,
    }
}

/// Splits the two recorded byte streams into messages, in protocol order.
fn split(script: &Script, c2s: &[u8], s2c: &[u8]) -> Result<Vec<Message>, PgError> {
    let (mut c, mut s) = (c2s, s2c);
    let mut out = Vec::new();
    let (client, server) = (Side::Client, Side::Server);
    let handshake = take(
        &mut c,
        CLIENT_HELLO_LEN,
        client,
        Kind::ClientHello,
        &mut out,
    ) && take(
        &mut s,
        SERVER_HELLO_LEN,
        server,
        Kind::ServerHello,
        &mut out,
    ) && take(&mut c, MAC_LEN, client, Kind::ClientProof, &mut out)
        && take(&mut s, 1, server, Kind::Verdict, &mut out);
    if handshake {
        match &script.after {
            After::Nothing => {}
            After::Registration { .. } => {
                take_frame(&mut c, client, Kind::Register, &mut out);
                take_frame(&mut s, server, Kind::Table, &mut out);
            }
            After::Frames { frames, .. } => {
                for f in frames {
                    let rest = if f.from == client { &mut c } else { &mut s };
                    take_frame(rest, f.from, Kind::Frame, &mut out);
                }
            }
        }
    }
    if !c.is_empty() || !s.is_empty() {
        return Err(io_fail(
            "split",
            format!(
                "{} client and {} server bytes left over after {} messages",
                c.len(),
                s.len(),
                out.len()
            ),
        ));
    }
    Ok(out)
}

/// Run `script` through pgt's code over loopback and return what went over the wire.
pub fn record(script: &Script) -> Result<Transcript, PgError> {
    let deadline = Instant::now() + LIMIT;
    let local = |what| move |e: io::Error| io_fail(what, e);
    let server_listener = TcpListener::bind("127.0.0.1:0").map_err(local("listen"))?;
    let relay_listener = TcpListener::bind("127.0.0.1:0").map_err(local("listen"))?;
    let relay_addr = relay_listener.local_addr().map_err(local("listen"))?;
    let server_addr = server_listener.local_addr().map_err(local("listen"))?;
    std::thread::scope(|scope| {
        let client = scope.spawn(move || {
            let stream = TcpStream::connect(relay_addr).map_err(local("connect"))?;
            run_client(stream, script, deadline)
        });
        let (from_client, _) = relay_listener.accept().map_err(local("accept"))?;
        let to_server = TcpStream::connect(server_addr).map_err(local("connect"))?;
        let (server_stream, _) = server_listener.accept().map_err(local("accept"))?;
        let server = scope.spawn(move || run_server(server_stream, script, deadline));
        let c2s = relay(
            from_client.try_clone().map_err(local("clone"))?,
            to_server.try_clone().map_err(local("clone"))?,
        );
        let s2c = relay(to_server, from_client);
        let joined = |h: std::thread::ScopedJoinHandle<'_, Result<Outcome, PgError>>| {
            h.join()
                .unwrap_or_else(|_| Err(io_fail("thread", "an end panicked")))
        };
        let client = joined(client)?;
        let server = joined(server)?;
        let bytes = |h: JoinHandle<io::Result<Vec<u8>>>| match h.join() {
            Ok(r) => r.map_err(local("relay")),
            Err(_) => Err(io_fail("relay", "panicked")),
        };
        let (c2s, s2c) = (bytes(c2s)?, bytes(s2c)?);
        Ok(Transcript {
            messages: split(script, &c2s, &s2c)?,
            client,
            server,
        })
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn party(purpose: u8, rank: u32, world: u32, token: &[u8], n: u8) -> Party {
        Party {
            token: token.to_vec(),
            purpose,
            rank,
            world,
            nonce: [n; NONCE_LEN],
        }
    }

    fn script(client: Party, server: Party, after: After) -> Script {
        Script {
            client,
            server,
            admit: true,
            forged_hello: None,
            forged_proof: None,
            after,
        }
    }

    #[test]
    fn accepted_peer_exchange_is_recorded_in_order() {
        let frames = vec![
            Frame {
                from: Side::Client,
                tag: 5,
                payload: b"abc".to_vec(),
            },
            Frame {
                from: Side::Server,
                tag: 6,
                payload: vec![],
            },
            Frame {
                from: Side::Client,
                tag: 7,
                payload: vec![1; 3000],
            },
        ];
        let s = script(
            party(PURPOSE_PEER, 0, 2, b"k", 1),
            party(PURPOSE_PEER, 1, 2, b"k", 2),
            After::Frames {
                frames,
                client_receives: vec![6],
                server_receives: vec![7, 5],
            },
        );
        let t = record(&s).unwrap();
        assert_eq!((t.client, t.server), (Outcome::Accepted, Outcome::Accepted));
        let kinds: Vec<Kind> = t.messages.iter().map(|m| m.kind).collect();
        let handshake = [
            Kind::ClientHello,
            Kind::ServerHello,
            Kind::ClientProof,
            Kind::Verdict,
        ];
        assert_eq!(kinds[..4], handshake);
        assert_eq!(kinds[4..], [Kind::Frame; 3]);
        let froms: Vec<Side> = t.messages[4..].iter().map(|m| m.from).collect();
        assert_eq!(froms, [Side::Client, Side::Server, Side::Client]);
        assert_eq!(t.messages[3].bytes, [0]);
        assert_eq!(&t.messages[0].bytes[20..], &[1; NONCE_LEN]);
        assert_eq!(&t.messages[1].bytes[20..52], &[2; NONCE_LEN]);
        assert_eq!(t.messages[6].bytes.len(), 16 + 3000);
        // Same script, same bytes.
        assert_eq!(record(&s).unwrap(), t);
    }

    #[test]
    fn refusals_end_where_they_should() {
        let wrong_token = script(
            party(PURPOSE_PEER, 0, 2, b"guess", 1),
            party(PURPOSE_PEER, 1, 2, b"k", 2),
            After::Nothing,
        );
        let t = record(&wrong_token).unwrap();
        assert_eq!((t.client, t.server), (Outcome::AuthFailed, Outcome::Closed));
        assert_eq!(t.messages.len(), 2);

        let world = script(
            party(PURPOSE_PEER, 0, 3, b"k", 1),
            party(PURPOSE_PEER, 1, 2, b"k", 2),
            After::Nothing,
        );
        let t = record(&world).unwrap();
        assert_eq!((t.client, t.server), (Outcome::Refused, Outcome::Refused));
        assert_eq!(t.messages[3].bytes, [Verdict::WorldMismatch as u8]);

        let forged = Script {
            forged_proof: Some([0; MAC_LEN]),
            ..script(
                party(PURPOSE_PEER, 0, 2, b"k", 1),
                party(PURPOSE_PEER, 1, 2, b"k", 2),
                After::Nothing,
            )
        };
        let t = record(&forged).unwrap();
        assert_eq!(t.server, Outcome::AuthFailed);
        assert_eq!(t.messages[3].bytes, [Verdict::BadProof as u8]);

        // A hello with a reserved byte set: dropped without a word.
        let mut hello = identity(&forged.client).encode(&[1; NONCE_LEN]);
        hello[10] = 1;
        let garbage = Script {
            forged_hello: Some(hello),
            forged_proof: None,
            ..forged
        };
        let t = record(&garbage).unwrap();
        assert_eq!((t.client, t.server), (Outcome::Closed, Outcome::AuthFailed));
        assert_eq!(t.messages.len(), 1);
        assert_eq!(t.messages[0].bytes, hello);
    }

    #[test]
    fn registration_is_recorded() {
        let table: Vec<SocketAddr> = vec![
            "127.0.0.1:1000".parse().unwrap(),
            "[::1]:2000".parse().unwrap(),
        ];
        let s = script(
            party(PURPOSE_STORE, 1, 2, b"k", 1),
            party(PURPOSE_STORE, STORE_RANK, 2, b"k", 2),
            After::Registration {
                addr: table[1],
                table: table.clone(),
            },
        );
        let t = record(&s).unwrap();
        assert_eq!(t.messages[4].kind, Kind::Register);
        assert_eq!(&t.messages[4].bytes[16..], b"[::1]:2000");
        assert_eq!(t.messages[5].kind, Kind::Table);
        assert_eq!(t.messages[5].bytes.len(), 16 + 4 + 2 + 14 + 2 + 10);
    }
}
