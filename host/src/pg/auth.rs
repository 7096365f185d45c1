//! Mutual HMAC-SHA256 challenge–response on a fresh TCP connection.
//!
//! Both ends know the job token `K`. The connecting side is the *client* C, the accepting side the
//! *server* S (the rendezvous store, or the higher rank of a peer pair). All integers little-endian.
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
//! - Mutual: C checks `mac_s` before revealing anything that depends on `K`; S checks `mac_c`.
//!   Both nonces are 32 bytes from the OS RNG, so neither side's MAC can be replayed, and the
//!   distinct labels rule out reflecting one side's MAC back as the other's. MACs are checked in
//!   constant time (`hmac`'s `verify_slice`).
//! - The MACs cover both hellos, so the identities (purpose, rank, world size) are authenticated.
//! - `purpose` is 1 for a store registration, 2 for a peer connection; the store's `rank` field is
//!   `u32::MAX`.
//! - Threat model: strangers on the network that don't know the token (port scanners, other jobs,
//!   stale ranks of an old job with another token). The traffic is not encrypted, and an on-path
//!   attacker could still hijack an authenticated connection.

use std::fmt;
use std::net::TcpStream;
use std::time::Instant;

use hmac::{Hmac, Mac};
use sha2::Sha256;

use super::wire::{read_full, write_full, Fail};
use super::PgError;

type HmacSha256 = Hmac<Sha256>;

const MAGIC: &[u8; 8] = b"PGTAUTH1";
/// Length of a ClientHello, and of a ServerHello without its MAC.
pub(crate) const CLIENT_HELLO_LEN: usize = 52;
/// Length of a ServerHello.
pub(crate) const SERVER_HELLO_LEN: usize = 84;
/// Length of an HMAC-SHA256 (the ServerHello's MAC, the ClientProof).
pub(crate) const MAC_LEN: usize = 32;
/// Length of a hello's nonce.
pub const NONCE_LEN: usize = 32;
/// Label of the server's MAC.
const LABEL_SERVER: &[u8] = b"pgt/1 server";
/// Label of the client's proof.
const LABEL_CLIENT: &[u8] = b"pgt/1 client";

/// Purpose byte: registration with the rendezvous store.
pub const PURPOSE_STORE: u8 = 1;
/// Purpose byte: a peer-to-peer connection.
pub const PURPOSE_PEER: u8 = 2;
/// Rank field of the store.
pub const STORE_RANK: u32 = u32::MAX;

/// Verdict codes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Verdict {
    Accepted = 0,
    BadProof = 1,
    UnexpectedRank = 2,
    WorldMismatch = 3,
    WrongPurpose = 4,
}

impl Verdict {
    fn from_byte(b: u8) -> Option<Self> {
        Some(match b {
            0 => Verdict::Accepted,
            1 => Verdict::BadProof,
            2 => Verdict::UnexpectedRank,
            3 => Verdict::WorldMismatch,
            4 => Verdict::WrongPurpose,
            _ => return None,
        })
    }
}

/// Who is speaking on one end of a handshake.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Identity {
    pub purpose: u8,
    pub rank: u32,
    pub world: u32,
}

impl Identity {
    pub(crate) fn encode(&self, nonce: &[u8; NONCE_LEN]) -> [u8; CLIENT_HELLO_LEN] {
        let mut b = [0u8; CLIENT_HELLO_LEN];
        b[..8].copy_from_slice(MAGIC);
        b[8] = self.purpose;
        b[12..16].copy_from_slice(&self.rank.to_le_bytes());
        b[16..20].copy_from_slice(&self.world.to_le_bytes());
        b[20..52].copy_from_slice(nonce);
        b
    }

    fn decode(b: &[u8]) -> Option<Self> {
        if &b[..8] != MAGIC || b[9..12] != [0, 0, 0] {
            return None;
        }
        Some(Identity {
            purpose: b[8],
            rank: u32::from_le_bytes(b[12..16].try_into().expect("4 bytes")),
            world: u32::from_le_bytes(b[16..20].try_into().expect("4 bytes")),
        })
    }
}

/// A failed handshake.
#[derive(Debug)]
pub(crate) enum HsError {
    /// Transport trouble (refused, reset, EOF, timeout): for a client, worth retrying.
    Transport(String, Cause),
    /// The other side is not a pgt endpoint, does not know the token, or refused us.
    Fatal(PgError),
}

/// What ended a connection at the transport level: a client tallies its failed attempts by it, so
/// that the error it finally reports names what kept it out.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Cause {
    /// The other side closed or reset the connection.
    Closed,
    /// A deadline passed.
    Timeout,
    /// Anything else (including a bad registration frame, at the store).
    Other,
}

impl From<&Fail> for Cause {
    fn from(f: &Fail) -> Self {
        match f {
            Fail::Closed => Cause::Closed,
            Fail::Timeout => Cause::Timeout,
            Fail::Io(_) => Cause::Other,
        }
    }
}

impl fmt::Display for HsError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            HsError::Transport(s, _) => f.write_str(s),
            HsError::Fatal(e) => e.fmt(f),
        }
    }
}

fn transport(what: &str, f: Fail) -> HsError {
    HsError::Transport(format!("{what}: {f}"), Cause::from(&f))
}

fn nonce() -> Result<[u8; NONCE_LEN], HsError> {
    let mut n = [0u8; NONCE_LEN];
    getrandom::fill(&mut n)
        .map_err(|e| HsError::Fatal(PgError::Config(format!("OS random generator: {e}"))))?;
    Ok(n)
}

fn mac(token: &[u8], label: &[u8], pieces: &[&[u8]]) -> HmacSha256 {
    let mut m = HmacSha256::new_from_slice(token).expect("HMAC takes keys of any length");
    m.update(label);
    for p in pieces {
        m.update(p);
    }
    m
}

fn peer_name(stream: &TcpStream) -> String {
    stream
        .peer_addr()
        .map(|a| a.to_string())
        .unwrap_or_else(|_| "<unknown>".into())
}

/// Client side, with a fresh nonce from the OS RNG. Returns the server's identity once the server
/// accepted us.
pub(crate) fn client_handshake(
    stream: &TcpStream,
    token: &[u8],
    me: Identity,
    deadline: Instant,
) -> Result<Identity, HsError> {
    client_handshake_with_nonce(stream, token, me, &nonce()?, deadline)
}

/// [`client_handshake`] with the caller's nonce: the conformance transcripts fix it.
pub(crate) fn client_handshake_with_nonce(
    stream: &TcpStream,
    token: &[u8],
    me: Identity,
    nonce: &[u8; NONCE_LEN],
    deadline: Instant,
) -> Result<Identity, HsError> {
    let addr = peer_name(stream);
    let auth_failed = |reason: &str| {
        HsError::Fatal(PgError::AuthFailed {
            addr: addr.clone(),
            reason: reason.into(),
        })
    };
    let hello = me.encode(nonce);
    write_full(stream, &[&hello], deadline, usize::MAX, &mut 0)
        .map_err(|f| transport("sending hello", f))?;
    let mut sh = [0u8; SERVER_HELLO_LEN];
    read_full(stream, &mut [&mut sh[..]], deadline, usize::MAX, &mut 0)
        .map_err(|f| transport("reading server hello", f))?;
    let Some(server) = Identity::decode(&sh[..CLIENT_HELLO_LEN]) else {
        return Err(auth_failed("the other side is not a pgt endpoint"));
    };
    mac(token, LABEL_SERVER, &[&hello, &sh[..CLIENT_HELLO_LEN]])
        .verify_slice(&sh[CLIENT_HELLO_LEN..])
        .map_err(|_| auth_failed("the other side does not know the job token"))?;
    let proof = mac(token, LABEL_CLIENT, &[&hello, &sh])
        .finalize()
        .into_bytes();
    write_full(stream, &[&proof], deadline, usize::MAX, &mut 0)
        .map_err(|f| transport("sending proof", f))?;
    let mut v = [0u8; 1];
    read_full(stream, &mut [&mut v[..]], deadline, usize::MAX, &mut 0)
        .map_err(|f| transport("reading verdict", f))?;
    match Verdict::from_byte(v[0]) {
        Some(Verdict::Accepted) => Ok(server),
        Some(Verdict::BadProof) => Err(auth_failed("our proof was refused")),
        Some(Verdict::UnexpectedRank) => Err(HsError::Fatal(PgError::Rendezvous(format!(
            "{addr} refused rank {} (not expected there, or already connected)",
            me.rank
        )))),
        Some(Verdict::WorldMismatch) => Err(HsError::Fatal(PgError::Rendezvous(format!(
            "{addr} runs a world of size {}, we have {}",
            server.world, me.world
        )))),
        Some(Verdict::WrongPurpose) => Err(HsError::Fatal(PgError::Rendezvous(format!(
            "{addr} is not a {}",
            if me.purpose == PURPOSE_STORE {
                "rendezvous store"
            } else {
                "pgt rank"
            }
        )))),
        None => Err(auth_failed("invalid verdict byte")),
    }
}

/// The server's side of a handshake as steps without I/O ([TCP.md §3.5](../../../TCP.md)): the
/// blocking [`server_handshake`] and the listeners' non-blocking acceptor both run it.
pub(crate) struct ServerSteps {
    ch: [u8; CLIENT_HELLO_LEN],
    sh: [u8; SERVER_HELLO_LEN],
    client: Identity,
}

impl ServerSteps {
    /// Steps 1–3: from the ClientHello, the ServerHello to send (with `nonce`); `None` when the hello
    /// is garbage (no magic, or non-zero reserved bytes): close without answering.
    pub(crate) fn hello(
        token: &[u8],
        me: Identity,
        nonce: &[u8; NONCE_LEN],
        ch: &[u8; CLIENT_HELLO_LEN],
    ) -> Option<Self> {
        let client = Identity::decode(ch)?;
        let mut sh = [0u8; SERVER_HELLO_LEN];
        sh[..CLIENT_HELLO_LEN].copy_from_slice(&me.encode(nonce));
        let mac_s = mac(token, LABEL_SERVER, &[ch, &sh[..CLIENT_HELLO_LEN]])
            .finalize()
            .into_bytes();
        sh[CLIENT_HELLO_LEN..].copy_from_slice(&mac_s);
        Some(ServerSteps {
            ch: *ch,
            sh,
            client,
        })
    }

    /// The ServerHello to send.
    pub(crate) fn server_hello(&self) -> &[u8; SERVER_HELLO_LEN] {
        &self.sh
    }

    /// Who the client says it is (authenticated only once [`verdict`](Self::verdict) accepts it).
    pub(crate) fn client(&self) -> Identity {
        self.client
    }

    /// Steps 4–5: the verdict on the client's proof. The checks run in the specified order; `admit`
    /// is asked only once the proof, purpose and world size are right.
    pub(crate) fn verdict(
        &self,
        token: &[u8],
        me: Identity,
        proof: &[u8; MAC_LEN],
        admit: impl FnOnce(&Identity) -> Verdict,
    ) -> Verdict {
        if mac(token, LABEL_CLIENT, &[&self.ch, &self.sh])
            .verify_slice(proof)
            .is_err()
        {
            Verdict::BadProof
        } else if self.client.purpose != me.purpose {
            Verdict::WrongPurpose
        } else if self.client.world != me.world {
            Verdict::WorldMismatch
        } else {
            admit(&self.client)
        }
    }
}

/// Why the server refused a client, as the error the blocking handshake returns.
pub(crate) fn refusal(addr: &str, client: &Identity, verdict: Verdict) -> PgError {
    match verdict {
        Verdict::BadProof => PgError::AuthFailed {
            addr: addr.into(),
            reason: "wrong job token".into(),
        },
        v => PgError::Rendezvous(format!("refused rank {} from {addr}: {v:?}", client.rank)),
    }
}

/// Server side, with a fresh nonce from the OS RNG. `admit` decides, after the client proved the
/// token, whether this identity is welcome (expected rank, not a duplicate, ...). Returns the
/// client's identity once accepted. (The listeners run [`ServerSteps`] without blocking instead.)
#[cfg(test)]
pub(crate) fn server_handshake(
    stream: &TcpStream,
    token: &[u8],
    me: Identity,
    deadline: Instant,
    admit: impl FnOnce(&Identity) -> Verdict,
) -> Result<Identity, HsError> {
    server_handshake_with_nonce(stream, token, me, &nonce()?, deadline, admit)
}

/// [`server_handshake`] with the caller's nonce: the conformance transcripts fix it.
pub(crate) fn server_handshake_with_nonce(
    stream: &TcpStream,
    token: &[u8],
    me: Identity,
    nonce: &[u8; NONCE_LEN],
    deadline: Instant,
    admit: impl FnOnce(&Identity) -> Verdict,
) -> Result<Identity, HsError> {
    let addr = peer_name(stream);
    let mut ch = [0u8; CLIENT_HELLO_LEN];
    read_full(stream, &mut [&mut ch[..]], deadline, usize::MAX, &mut 0)
        .map_err(|f| transport("reading client hello", f))?;
    let Some(steps) = ServerSteps::hello(token, me, nonce, &ch) else {
        return Err(HsError::Fatal(PgError::AuthFailed {
            addr,
            reason: GARBAGE.into(),
        }));
    };
    write_full(
        stream,
        &[steps.server_hello()],
        deadline,
        usize::MAX,
        &mut 0,
    )
    .map_err(|f| transport("sending server hello", f))?;
    let mut proof = [0u8; MAC_LEN];
    read_full(stream, &mut [&mut proof[..]], deadline, usize::MAX, &mut 0)
        .map_err(|f| transport("reading proof", f))?;
    let verdict = steps.verdict(token, me, &proof, admit);
    let sent = write_full(stream, &[&[verdict as u8]], deadline, usize::MAX, &mut 0)
        .map_err(|f| transport("sending verdict", f));
    if verdict != Verdict::Accepted {
        return Err(HsError::Fatal(refusal(&addr, &steps.client(), verdict)));
    }
    sent?;
    Ok(steps.client())
}

/// Why a server closes a connection whose first 52 bytes are not a hello.
pub(crate) const GARBAGE: &str = "garbage instead of a pgt hello";

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Write};
    use std::net::TcpListener;
    use std::time::Duration;

    fn pair() -> (TcpStream, TcpStream) {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let c = TcpStream::connect(l.local_addr().unwrap()).unwrap();
        let (s, _) = l.accept().unwrap();
        (c, s)
    }

    const SERVER: Identity = Identity {
        purpose: PURPOSE_PEER,
        rank: 1,
        world: 2,
    };
    const CLIENT: Identity = Identity {
        purpose: PURPOSE_PEER,
        rank: 0,
        world: 2,
    };

    fn soon() -> Instant {
        Instant::now() + Duration::from_secs(5)
    }

    #[test]
    fn same_token_accepts_both_ways() {
        let (c, s) = pair();
        let t = std::thread::spawn(move || {
            server_handshake(&s, b"secret", SERVER, soon(), |id| {
                assert_eq!(id.rank, 0);
                Verdict::Accepted
            })
            .unwrap()
        });
        let server = client_handshake(&c, b"secret", CLIENT, soon()).unwrap();
        assert_eq!(server, SERVER);
        assert_eq!(t.join().unwrap(), CLIENT);
    }

    #[test]
    fn wrong_token_is_refused_on_both_sides() {
        let (c, s) = pair();
        let t = std::thread::spawn(move || {
            server_handshake(&s, b"secret", SERVER, soon(), |_| Verdict::Accepted)
        });
        let r = client_handshake(&c, b"guess", CLIENT, soon());
        assert!(
            matches!(r, Err(HsError::Fatal(PgError::AuthFailed { .. }))),
            "{r:?}"
        );
        drop(c);
        // The client gave up after the server's MAC failed; the server saw no valid proof.
        assert!(t.join().unwrap().is_err());
    }

    #[test]
    fn forged_proof_gets_bad_proof_verdict() {
        let (mut c, s) = pair();
        let t = std::thread::spawn(move || {
            server_handshake(&s, b"secret", SERVER, soon(), |_| Verdict::Accepted)
        });
        c.write_all(&CLIENT.encode(&[7; 32])).unwrap();
        let mut sh = [0u8; SERVER_HELLO_LEN];
        c.read_exact(&mut sh).unwrap();
        c.write_all(&[0u8; 32]).unwrap();
        let mut v = [9u8; 1];
        c.read_exact(&mut v).unwrap();
        assert_eq!(v[0], Verdict::BadProof as u8);
        assert!(matches!(
            t.join().unwrap(),
            Err(HsError::Fatal(PgError::AuthFailed { .. }))
        ));
    }

    #[test]
    fn garbage_and_silence_are_dropped() {
        let (mut c, s) = pair();
        c.write_all(&[0x47; 60]).unwrap();
        let r = server_handshake(&s, b"secret", SERVER, soon(), |_| Verdict::Accepted);
        assert!(matches!(r, Err(HsError::Fatal(PgError::AuthFailed { .. }))));

        let (_c, s) = pair();
        let t0 = Instant::now();
        let r = server_handshake(
            &s,
            b"secret",
            SERVER,
            Instant::now() + Duration::from_millis(200),
            |_| Verdict::Accepted,
        );
        assert!(matches!(r, Err(HsError::Transport(_, Cause::Timeout))));
        assert!(t0.elapsed() < Duration::from_secs(1));
    }

    #[test]
    fn admission_and_world_checks() {
        let (c, s) = pair();
        let t = std::thread::spawn(move || {
            server_handshake(&s, b"k", SERVER, soon(), |_| Verdict::UnexpectedRank)
        });
        let r = client_handshake(&c, b"k", CLIENT, soon());
        assert!(matches!(r, Err(HsError::Fatal(PgError::Rendezvous(_)))));
        assert!(t.join().unwrap().is_err());

        let (c, s) = pair();
        let t = std::thread::spawn(move || {
            server_handshake(&s, b"k", SERVER, soon(), |_| Verdict::Accepted)
        });
        let r = client_handshake(&c, b"k", Identity { world: 3, ..CLIENT }, soon());
        assert!(
            matches!(r, Err(HsError::Fatal(PgError::Rendezvous(_)))),
            "{r:?}"
        );
        assert!(t.join().unwrap().is_err());
    }
}
