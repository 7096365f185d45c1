//! Fuzz harnesses for the TCP layer's parsers (feature `fuzzing`), re-exported by
//! [`crate::fuzzing`]. Each runs the production code over a Unix socket pair standing in for the
//! TCP connection: the fuzz input is written to one end and that end is shut down for writing, so
//! every read ends in data or EOF and nothing waits for a deadline.
//!
//! Each harness panics only through its `assert!`s, which are bugs in pgt-host when they fire.

use std::io::Read;
use std::net::{Shutdown, SocketAddr, TcpStream};
use std::os::fd::OwnedFd;
use std::os::unix::net::UnixStream;
use std::time::{Duration, Instant};

use hmac::{Hmac, Mac};
use sha2::Sha256;

use super::auth::{
    client_handshake_with_nonce, server_handshake_with_nonce, HsError, Identity, ServerSteps,
    Verdict, CLIENT_HELLO_LEN, MAC_LEN, NONCE_LEN, PURPOSE_PEER, PURPOSE_STORE, SERVER_HELLO_LEN,
    STORE_RANK,
};
use super::rendezvous::{exchange_registration, read_registration, MAX_ADDR_LEN};
use super::wire::{read_frame, Fail, Header, FRAME_HEADER_LEN};
use super::PgError;

/// The job token of the handshake harness.
const TOKEN: &[u8] = b"pgt fuzzing token";
/// The server's nonce (the blocking handshakes take the caller's).
const NONCE: [u8; NONCE_LEN] = [0x5a; NONCE_LEN];

/// A cursor over the fuzz input; reads past the end yield zeros.
struct Input<'a>(&'a [u8]);

impl<'a> Input<'a> {
    fn bytes(&mut self, n: usize) -> &'a [u8] {
        let (head, rest) = self.0.split_at(n.min(self.0.len()));
        self.0 = rest;
        head
    }
    fn array<const N: usize>(&mut self) -> [u8; N] {
        let mut a = [0u8; N];
        let b = self.bytes(N);
        a[..b.len()].copy_from_slice(b);
        a
    }
    fn u8(&mut self) -> u8 {
        self.array::<1>()[0]
    }
    fn u32(&mut self) -> u32 {
        u32::from_le_bytes(self.array())
    }
    fn rest(&mut self) -> &'a [u8] {
        self.bytes(self.0.len())
    }
}

/// A connected pair: the end the code under test uses (as a `TcpStream`: the functions take one,
/// and they only read, write and set timeouts, which a Unix socket does alike) and the harness's end,
/// which has already sent `incoming` and shut down its writing half.
fn stream_with(incoming: &[u8]) -> (TcpStream, UnixStream) {
    let (ours, theirs) = UnixStream::pair().expect("socketpair");
    // The inputs are at most a few KiB: they fit in the socket buffer, so this does not block.
    std::io::Write::write_all(&mut &theirs, incoming).expect("writing the fuzz input");
    theirs
        .shutdown(Shutdown::Write)
        .expect("shutting down the harness's end");
    (TcpStream::from(OwnedFd::from(ours)), theirs)
}

/// What the code under test sent to the harness's end. Half-closed, not closed: closing a Unix
/// socket with unread input (the rest of the fuzz input) resets the connection, and the harness's
/// read would fail instead of reaching EOF.
fn sent(stream: TcpStream, theirs: &mut UnixStream) -> Vec<u8> {
    stream
        .shutdown(Shutdown::Write)
        .expect("shutting down the tested end");
    let mut out = Vec::new();
    theirs.read_to_end(&mut out).expect("reading what was sent");
    out
}

fn soon() -> Instant {
    Instant::now() + Duration::from_secs(5)
}

/// Input: `max` selector, then the bytes on the wire. [`read_frame`] returns a frame exactly when a
/// whole one of at most `max` payload bytes was there (its header read back by `Header::decode`), and
/// otherwise says why: too large, or closed before the end. Returns whether it read a frame.
pub fn frame(data: &[u8]) -> bool {
    let mut input = Input(data);
    // The caps the callers use: a REGISTER frame's, a TABLE's for a world of 1024 ranks.
    let max = match input.u8() % 4 {
        0 => 0,
        1 => 16,
        2 => MAX_ADDR_LEN,
        _ => 4 + 1024 * (2 + MAX_ADDR_LEN),
    };
    let wire = input.rest();
    if let Ok(b) = <[u8; FRAME_HEADER_LEN]>::try_from(wire.get(..FRAME_HEADER_LEN).unwrap_or(&[])) {
        let h = Header::decode(&b);
        assert_eq!(h.encode(), b, "frame header does not round-trip");
    }
    let (stream, _theirs) = stream_with(wire);
    let result = read_frame(&stream, max, soon());
    let accepted = result.is_ok();
    match result {
        Ok((tag, payload)) => {
            let h = Header::decode(wire[..FRAME_HEADER_LEN].try_into().expect("16 bytes"));
            assert_eq!(h.tag, tag);
            assert!(
                h.len <= max as u64,
                "frame of {} bytes over max {max}",
                h.len
            );
            assert_eq!(
                payload,
                &wire[FRAME_HEADER_LEN..FRAME_HEADER_LEN + h.len as usize]
            );
        }
        Err(Fail::Closed) => {
            let complete = wire.len() >= FRAME_HEADER_LEN && {
                let h = Header::decode(wire[..FRAME_HEADER_LEN].try_into().expect("16 bytes"));
                h.len <= max as u64 && (wire.len() - FRAME_HEADER_LEN) as u64 >= h.len
            };
            assert!(!complete, "a whole frame reported as closed");
        }
        Err(Fail::Io(e)) => {
            let h = Header::decode(wire[..FRAME_HEADER_LEN].try_into().expect("16 bytes"));
            assert!(
                h.len > max as u64,
                "frame of {} bytes within {max}: {e}",
                h.len
            );
        }
        Err(Fail::Timeout) => panic!("read_frame timed out on data that ended in EOF"),
    }
    accepted
}

type HmacSha256 = Hmac<Sha256>;

/// HMAC-SHA256 of the token over `label` and `pieces` (TCP.md §3), computed here independently of
/// `auth`'s.
fn mac(label: &[u8], pieces: &[&[u8]]) -> [u8; MAC_LEN] {
    let mut m = HmacSha256::new_from_slice(TOKEN).expect("any key length");
    m.update(label);
    for p in pieces {
        m.update(p);
    }
    m.finalize().into_bytes().into()
}

fn verdict_of(b: u8) -> Verdict {
    match b % 4 {
        0 => Verdict::Accepted,
        1 => Verdict::UnexpectedRank,
        2 => Verdict::WorldMismatch,
        _ => Verdict::WrongPurpose,
    }
}

/// Input: `mode`, then the side's messages. `mode` bit 0: fuzz the server (else the client); bit 1:
/// the harness replaces the MAC in the input by the right one, so the input gets past authentication;
/// bit 2: the server is the rendezvous store (else a peer); bits 3–4: what the server's `admit` says.
///
/// Server: ClientHello (52), proof (32, or the right one), then (store) the REGISTER frame. It is
/// accepted exactly when the hello is well formed, the proof right, purpose and world match and
/// `admit` says so; it sends the ServerHello of `ServerSteps` and the verdict; the registration
/// yields an address exactly when the frame is tag 1 with a socket address.
///
/// Client: ServerHello (84, its MAC replaced or not), verdict byte. It succeeds exactly when the MAC
/// is right and the verdict is 0, and then returns the server's identity from the hello.
///
/// Returns whether the side accepted (and, at the store, got an address from the registration).
pub fn handshake(data: &[u8]) -> bool {
    let mut input = Input(data);
    let mode = input.u8();
    let honest = mode & 2 != 0;
    let store = mode & 4 != 0;
    let admit = verdict_of(mode >> 3);
    let me = Identity {
        purpose: if store { PURPOSE_STORE } else { PURPOSE_PEER },
        rank: if store { STORE_RANK } else { 1 },
        world: 4,
    };
    if mode & 1 != 0 {
        server_side(&mut input, me, honest, admit)
    } else {
        client_side(&mut input, me, honest)
    }
}

fn server_side(input: &mut Input<'_>, me: Identity, honest: bool, admit: Verdict) -> bool {
    let ch: [u8; CLIENT_HELLO_LEN] = input.array();
    let steps = ServerSteps::hello(TOKEN, me, &NONCE, &ch);
    let mut proof: [u8; MAC_LEN] = input.array();
    if let (true, Some(s)) = (honest, &steps) {
        proof = mac(b"pgt/1 client", &[&ch, s.server_hello()]);
    }
    let frame = input.rest();
    let wire = [&ch[..], &proof, frame].concat();
    let (stream, mut theirs) = stream_with(&wire);
    let mut asked = false;
    let result = server_handshake_with_nonce(&stream, TOKEN, me, &NONCE, soon(), |_| {
        asked = true;
        admit
    });
    let registration = match (&result, me.purpose) {
        (Ok(id), PURPOSE_STORE) => Some(read_registration(&stream, id, soon())),
        _ => None,
    };
    let out = sent(stream, &mut theirs);
    let Some(steps) = steps else {
        assert!(
            matches!(result, Err(HsError::Fatal(PgError::AuthFailed { .. }))),
            "garbage hello: {result:?}"
        );
        assert!(out.is_empty(), "answered a garbage hello");
        return false;
    };
    assert_eq!(out[..SERVER_HELLO_LEN], steps.server_hello()[..]);
    let client = steps.client();
    let right_proof = proof == mac(b"pgt/1 client", &[&ch, steps.server_hello()]);
    let expected = if !right_proof {
        Verdict::BadProof
    } else if client.purpose != me.purpose {
        Verdict::WrongPurpose
    } else if client.world != me.world {
        Verdict::WorldMismatch
    } else {
        admit
    };
    assert_eq!(
        asked,
        right_proof && client.purpose == me.purpose && client.world == me.world
    );
    assert_eq!(out[SERVER_HELLO_LEN..], [expected as u8], "verdict sent");
    let accepted = result.is_ok();
    match result {
        Ok(id) => {
            assert_eq!(expected, Verdict::Accepted);
            assert_eq!(id, client);
        }
        Err(e) => assert_ne!(expected, Verdict::Accepted, "refused, yet verdict 0: {e}"),
    }
    match registration {
        Some(registration) => {
            let parsed = frame_addr(input_frame(&wire[CLIENT_HELLO_LEN + MAC_LEN..]));
            match registration {
                Ok(addr) => assert_eq!(Some(addr), parsed),
                Err(e) => assert_eq!(parsed, None, "a good registration refused: {e}"),
            }
            parsed.is_some()
        }
        None => accepted,
    }
}

/// The whole frame at the start of `wire` with a payload of at most [`MAX_ADDR_LEN`] bytes.
fn input_frame(wire: &[u8]) -> Option<(u64, &[u8])> {
    let h = Header::decode(wire.get(..FRAME_HEADER_LEN)?.try_into().ok()?);
    if h.len > MAX_ADDR_LEN as u64 {
        return None;
    }
    let payload = wire.get(FRAME_HEADER_LEN..FRAME_HEADER_LEN + h.len as usize)?;
    Some((h.tag, payload))
}

/// The address a REGISTER frame carries.
fn frame_addr(frame: Option<(u64, &[u8])>) -> Option<SocketAddr> {
    let (tag, payload) = frame?;
    (tag == 1).then_some(())?;
    std::str::from_utf8(payload).ok()?.parse().ok()
}

fn client_side(input: &mut Input<'_>, me: Identity, honest: bool) -> bool {
    let client = Identity {
        rank: if me.purpose == PURPOSE_STORE { 2 } else { 0 },
        ..me
    };
    let nonce_c = [0xc3u8; NONCE_LEN];
    let hello = client.encode(&nonce_c);
    let mut sh: [u8; SERVER_HELLO_LEN] = input.array();
    if honest {
        let m = mac(b"pgt/1 server", &[&hello, &sh[..CLIENT_HELLO_LEN]]);
        sh[CLIENT_HELLO_LEN..].copy_from_slice(&m);
    }
    let verdict = input.bytes(1).to_vec();
    let wire = [&sh[..], &verdict].concat();
    let (stream, mut theirs) = stream_with(&wire);
    let result = client_handshake_with_nonce(&stream, TOKEN, client, &nonce_c, soon());
    let out = sent(stream, &mut theirs);
    assert_eq!(out[..CLIENT_HELLO_LEN], hello, "hello sent");
    let well_formed = &sh[..8] == b"PGTAUTH1" && sh[9..12] == [0, 0, 0];
    let right_mac =
        sh[CLIENT_HELLO_LEN..] == mac(b"pgt/1 server", &[&hello, &sh[..CLIENT_HELLO_LEN]]);
    if well_formed && right_mac {
        assert_eq!(
            out[CLIENT_HELLO_LEN..],
            mac(b"pgt/1 client", &[&hello, &sh]),
            "proof sent"
        );
    } else {
        assert_eq!(out.len(), CLIENT_HELLO_LEN, "proof sent to an impostor");
    }
    let accepted = result.is_ok();
    match result {
        Ok(server) => {
            assert!(
                well_formed && right_mac && verdict == [0],
                "accepted {sh:?} {verdict:?}"
            );
            assert_eq!(server.encode(&sh[20..52].try_into().expect("32")), sh[..52]);
        }
        Err(HsError::Transport(..)) => assert!(
            well_formed && right_mac && verdict.is_empty(),
            "transport error with a verdict byte there"
        ),
        Err(HsError::Fatal(_)) => {
            assert!(
                !(well_formed && right_mac && verdict == [0]),
                "refused verdict 0"
            )
        }
    }
    accepted
}

/// Input: `mode`, world size byte, tag byte, then what the store sends: raw bytes, or (`mode` bit 0)
/// a frame the harness builds around them, with tag 2 (bit 2) or the tag byte. `mode` bit 1: the
/// REGISTER side instead, the same bytes being what a rank sends the store after its handshake.
///
/// Rank side ([`exchange_registration`]): it returns the table exactly when a tag-2 frame holds
/// `world` entries of socket addresses, and those addresses, in order, are in the frame. Store side
/// ([`read_registration`]): an address exactly when the frame is a tag-1 socket address. Returns
/// whether the side accepted what it read.
pub fn rendezvous(data: &[u8]) -> bool {
    let mut input = Input(data);
    let mode = input.u8();
    let world = u32::from(input.u8() % 8) + 1;
    let tag = if mode & 4 != 0 {
        2
    } else {
        u64::from(input.u8())
    };
    let rest = input.rest();
    let framed;
    let wire = if mode & 1 != 0 {
        framed = [
            &Header {
                tag,
                len: rest.len() as u64,
            }
            .encode()[..],
            rest,
        ]
        .concat();
        &framed[..]
    } else {
        rest
    };
    let (stream, mut theirs) = stream_with(wire);
    if mode & 2 != 0 {
        let id = Identity {
            purpose: PURPOSE_STORE,
            rank: 1,
            world,
        };
        let r = read_registration(&stream, &id, soon());
        drop(sent(stream, &mut theirs));
        let accepted = r.is_ok();
        match r {
            Ok(addr) => assert_eq!(Some(addr), frame_addr(input_frame(wire))),
            Err(e) => assert_eq!(frame_addr(input_frame(wire)), None, "refused: {e}"),
        }
        return accepted;
    }
    let listen: SocketAddr = "127.0.0.1:29500".parse().expect("an address");
    let r = exchange_registration(&stream, 1, world, listen, soon());
    let out = sent(stream, &mut theirs);
    let reg = input_frame(&out).expect("a REGISTER frame sent");
    assert_eq!(frame_addr(Some(reg)), Some(listen));
    let expected = table(wire, world);
    let accepted = r.is_ok();
    match r {
        Ok(addrs) => assert_eq!(Some(addrs), expected),
        Err(e) => assert_eq!(expected, None, "table refused: {e}"),
    }
    accepted
}

/// The addresses of a TABLE frame at the start of `wire` for `world` ranks, parsed independently
/// of `rendezvous`'s decoder (TCP.md §4).
fn table(wire: &[u8], world: u32) -> Option<Vec<SocketAddr>> {
    let h = Header::decode(wire.get(..FRAME_HEADER_LEN)?.try_into().ok()?);
    if h.tag != 2 || h.len > 4 + u64::from(world) * (2 + MAX_ADDR_LEN as u64) {
        return None;
    }
    let mut p = Input(wire.get(FRAME_HEADER_LEN..FRAME_HEADER_LEN + h.len as usize)?);
    if p.0.len() < 4 || p.u32() != world {
        return None;
    }
    let mut out = Vec::new();
    for _ in 0..world {
        let n = p.bytes(2);
        let n = u16::from_le_bytes(n.try_into().ok()?) as usize;
        let s = p.bytes(n);
        if s.len() != n {
            return None;
        }
        out.push(std::str::from_utf8(s).ok()?.parse().ok()?);
    }
    p.0.is_empty().then_some(out)
}
