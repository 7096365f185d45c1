//! Conformance transcripts of the TCP process group (`tests/vectors/tcp/`, specified in `TCP.md`).
//!
//! Each transcript is one connection recorded by [`pgt_host::pg::conformance::record`]: pgt-host's
//! own handshake, registration and framing code at both ends, fixed tokens and nonces. [`files`]
//! renders them as JSON that a reader can check by hand (every message as hex, cut into its fields)
//! and that `tests/python` and `tests/node` replay against their own implementations.
//! `cargo run -p pgt-tests --bin gen-vectors` writes them; `tests/tests/tcp_vectors.rs` checks that
//! the committed files are what today's code records.

use std::net::SocketAddr;

use pgt_host::pg::conformance::{
    self, After, Frame, Kind, Message, Outcome, Party, Script, Side, Transcript, NONCE_LEN,
    PURPOSE_PEER, PURPOSE_STORE, STORE_RANK,
};
use serde_json::{json, Value as Json};

use crate::vectors::json::{self as jsonw, uint};

/// Directory of the transcripts, relative to `tests/vectors/`.
pub const SUBDIR: &str = "tcp";

/// The job token of every transcript (the HMAC key is its bytes, as `PGT_TOKEN`'s).
pub const TOKEN: &str = "0123456789abcdef0123456789abcdef";
/// The token of the stranger in `wrong_token`.
pub const WRONG_TOKEN: &str = "fedcba9876543210fedcba9876543210";

/// The client's nonce: bytes 00 01 … 1f.
pub fn client_nonce() -> [u8; NONCE_LEN] {
    std::array::from_fn(|i| i as u8)
}

/// The server's nonce: bytes 80 81 … 9f.
pub fn server_nonce() -> [u8; NONCE_LEN] {
    std::array::from_fn(|i| 0x80 + i as u8)
}

/// One transcript to record: its file stem, what it shows, and the script.
#[derive(Debug, Clone)]
pub struct Case {
    pub name: &'static str,
    pub description: &'static str,
    pub script: Script,
}

fn client(purpose: u8, rank: u32, world: u32) -> Party {
    Party {
        token: TOKEN.as_bytes().to_vec(),
        purpose,
        rank,
        world,
        nonce: client_nonce(),
    }
}

fn server(purpose: u8, rank: u32, world: u32) -> Party {
    Party {
        nonce: server_nonce(),
        ..client(purpose, rank, world)
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

fn addr(s: &str) -> SocketAddr {
    s.parse().expect("a literal socket address")
}

/// 52 bytes of an HTTP request: what a port scanner might send.
fn http_request() -> [u8; 52] {
    let mut b = [b' '; 52];
    let req = b"GET / HTTP/1.1\r\nHost: 192.0.2.7:40001\r\n\r\n";
    b[..req.len()].copy_from_slice(req);
    b
}

/// `p`'s hello with byte 9 (reserved, must be 0) set to 1.
fn with_reserved_byte(p: Party) -> [u8; 52] {
    let mut b = [0u8; 52];
    b[..8].copy_from_slice(b"PGTAUTH1");
    b[8] = p.purpose;
    b[9] = 1;
    b[12..16].copy_from_slice(&p.rank.to_le_bytes());
    b[16..20].copy_from_slice(&p.world.to_le_bytes());
    b[20..].copy_from_slice(&p.nonce);
    b
}

/// A tag above 2^53 whose eight bytes differ: shows the byte order (and that JSON readers must keep
/// 64 bits).
pub const BIG_TAG: u64 = 0x0807_0605_0403_0201;

/// Every transcript, in file order.
pub fn cases() -> Vec<Case> {
    let peer = |rank, world| client(PURPOSE_PEER, rank, world);
    let peer_server = |rank, world| server(PURPOSE_PEER, rank, world);
    let frame = |from, tag, payload: &[u8]| Frame {
        from,
        tag,
        payload: payload.to_vec(),
    };
    vec![
        Case {
            name: "peer_exchange",
            description: "Rank 0 connects to rank 1's listener (world 2): the handshake is accepted, then \
                rank 0 sends tag 1 (\"hello\") and a 0-byte frame with tag 0x0807060504030201, rank 1 \
                sends tag 3 (8 bytes). Rank 1 asks for the big tag first, so tag 1 waits in its stash.",
            script: script(
                peer(0, 2),
                peer_server(1, 2),
                After::Frames {
                    frames: vec![
                        frame(Side::Client, 1, b"hello"),
                        frame(Side::Client, BIG_TAG, b""),
                        frame(Side::Server, 3, &[0xde, 0xad, 0xbe, 0xef, 0, 1, 2, 3]),
                    ],
                    client_receives: vec![3],
                    server_receives: vec![BIG_TAG, 1],
                },
            ),
        },
        Case {
            name: "store_registration",
            description: "Rank 1 (world 2) registers with the rendezvous store: the handshake with \
                purpose 1 (the store's rank field is 0xFFFFFFFF), then REGISTER with rank 1's listener \
                address and the TABLE of both ranks' addresses (rank 0's is IPv6).",
            script: script(
                client(PURPOSE_STORE, 1, 2),
                server(PURPOSE_STORE, STORE_RANK, 2),
                After::Registration {
                    addr: addr("192.0.2.7:40001"),
                    table: vec![addr("[2001:db8::5]:29500"), addr("192.0.2.7:40001")],
                },
            ),
        },
        Case {
            name: "wrong_token",
            description: "A client with another token connects to rank 1: the server's MAC does not \
                verify, so the client gives up without sending a proof (auth_failed) and closes; the \
                server, waiting for the proof, sees the connection closed.",
            script: script(
                Party {
                    token: WRONG_TOKEN.as_bytes().to_vec(),
                    ..peer(0, 2)
                },
                peer_server(1, 2),
                After::Nothing,
            ),
        },
        Case {
            name: "bad_proof",
            description: "A forger (not pgt's client) sends a well-formed hello, then 32 zero bytes as \
                its proof: rank 1 answers verdict 1 (bad proof) and closes. The hello's purpose (1), \
                world (3) and rank (5) would each be refused too: the proof is checked first. Only \
                the server end is pgt's code here.",
            script: Script {
                forged_proof: Some([0; 32]),
                admit: false,
                ..script(
                    client(PURPOSE_STORE, 5, 3),
                    peer_server(1, 2),
                    After::Nothing,
                )
            },
        },
        Case {
            name: "not_a_hello",
            description: "A stranger sends 52 bytes of an HTTP request instead of a hello: the magic \
                is wrong, so rank 1 closes the connection without answering.",
            script: Script {
                forged_hello: Some(http_request()),
                ..script(peer(0, 2), peer_server(1, 2), After::Nothing)
            },
        },
        Case {
            name: "reserved_byte",
            description: "A hello whose first reserved byte (offset 9) is 01, otherwise rank 0's \
                well-formed hello: rank 1 closes the connection without answering.",
            script: Script {
                forged_hello: Some(with_reserved_byte(peer(0, 2))),
                ..script(peer(0, 2), peer_server(1, 2), After::Nothing)
            },
        },
        Case {
            name: "unexpected_rank",
            description: "Rank 2 (world 3) connects to rank 1, which accepts only lower ranks: the \
                proof is good, the verdict is 2 (rank not expected there).",
            script: Script {
                admit: false,
                ..script(peer(2, 3), peer_server(1, 3), After::Nothing)
            },
        },
        Case {
            name: "world_mismatch",
            description: "Rank 2 of a world of 3 connects to rank 1 of a world of 2: the proof is \
                good, the verdict is 3 (world size mismatch). Rank 1 would not admit rank 2 either: \
                the world size is checked before admission.",
            script: Script {
                admit: false,
                ..script(peer(2, 3), peer_server(1, 2), After::Nothing)
            },
        },
        Case {
            name: "wrong_purpose",
            description: "Rank 1 of a world of 3, registering (purpose 1), reaches rank 0's peer \
                listener (purpose 2, world 2) instead of the store: the proof is good, the verdict is 4 \
                (wrong purpose). The world sizes differ too: the purpose is checked first.",
            script: script(
                client(PURPOSE_STORE, 1, 3),
                peer_server(0, 2),
                After::Nothing,
            ),
        },
    ]
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

fn side(s: Side) -> &'static str {
    match s {
        Side::Client => "client",
        Side::Server => "server",
    }
}

fn kind(k: Kind) -> &'static str {
    match k {
        Kind::ClientHello => "ClientHello",
        Kind::ServerHello => "ServerHello",
        Kind::ClientProof => "ClientProof",
        Kind::Verdict => "Verdict",
        Kind::Register => "Register",
        Kind::Table => "Table",
        Kind::Frame => "Frame",
    }
}

fn outcome(o: Outcome) -> &'static str {
    match o {
        Outcome::Accepted => "accepted",
        Outcome::AuthFailed => "auth_failed",
        Outcome::Refused => "refused",
        Outcome::Closed => "closed",
    }
}

fn party_json(p: &Party) -> Json {
    json!({
        "token": String::from_utf8(p.token.clone()).expect("ASCII tokens"),
        "purpose": p.purpose,
        "rank": p.rank,
        "world": p.world,
        "nonce": hex(&p.nonce),
    })
}

fn field(name: &str, b: &[u8]) -> Json {
    json!([name, hex(b)])
}

/// A message as JSON: its bytes, and the same bytes cut into named fields.
fn message_json(m: &Message) -> Json {
    let b = &m.bytes;
    let mut j = json!({
        "from": side(m.from),
        "message": kind(m.kind),
        "hex": hex(b),
    });
    let fields = match m.kind {
        Kind::ClientHello | Kind::ServerHello => {
            let mut f = vec![
                field("magic", &b[0..8]),
                field("purpose", &b[8..9]),
                field("reserved", &b[9..12]),
                field("rank", &b[12..16]),
                field("world", &b[16..20]),
                field("nonce", &b[20..52]),
            ];
            if m.kind == Kind::ServerHello {
                f.push(field("mac_s", &b[52..84]));
            }
            f
        }
        Kind::ClientProof => vec![field("mac_c", b)],
        Kind::Verdict => {
            j["verdict"] = json!(b[0]);
            vec![field("verdict", b)]
        }
        Kind::Register | Kind::Table | Kind::Frame => {
            let tag = u64::from_le_bytes(b[0..8].try_into().expect("8 bytes"));
            j["tag"] = uint(tag);
            let payload = &b[16..];
            let mut f = vec![field("tag", &b[0..8]), field("len", &b[8..16])];
            match m.kind {
                Kind::Register => {
                    j["address"] = json!(String::from_utf8_lossy(payload));
                    f.push(field("address", payload));
                }
                Kind::Table => {
                    f.push(field("count", &payload[..4]));
                    let mut addrs = Vec::new();
                    let mut at = 4;
                    while at + 2 <= payload.len() {
                        let n = u16::from_le_bytes([payload[at], payload[at + 1]]) as usize;
                        let r = addrs.len();
                        let text = &payload[at + 2..(at + 2 + n).min(payload.len())];
                        f.push(field(&format!("len[{r}]"), &payload[at..at + 2]));
                        f.push(field(&format!("address[{r}]"), text));
                        addrs.push(String::from_utf8_lossy(text).into_owned());
                        at += 2 + n;
                    }
                    j["addresses"] = json!(addrs);
                }
                _ => {
                    j["payload"] = json!(hex(payload));
                    f.push(field("payload", payload));
                }
            }
            f
        }
    };
    j["fields"] = Json::Array(fields);
    j
}

/// One transcript file.
pub fn transcript_json(case: &Case, t: &Transcript) -> String {
    let s = &case.script;
    let mut client = party_json(&s.client);
    if let Some(h) = s.forged_hello {
        client["forged_hello"] = json!(hex(&h));
    }
    if let Some(p) = s.forged_proof {
        client["forged_proof"] = json!(hex(&p));
    }
    let mut server = party_json(&s.server);
    server["admits"] = json!(s.admit);
    let mut doc = json!({
        "format": 1,
        "generator": "cargo run -p pgt-tests --bin gen-vectors",
        "spec": "TCP.md",
        "description": case.description,
        "client": client,
        "server": server,
        "messages": t.messages.iter().map(message_json).collect::<Vec<_>>(),
        "outcome": {"client": outcome(t.client), "server": outcome(t.server)},
    });
    if let After::Frames {
        client_receives,
        server_receives,
        ..
    } = &s.after
    {
        let tags = |v: &[u64]| Json::Array(v.iter().map(|&t| uint(t)).collect());
        doc["receive_order"] = json!({
            "client": tags(client_receives),
            "server": tags(server_receives),
        });
    }
    jsonw::to_string(&doc)
}

/// Every file of `tests/vectors/tcp/`: `(file name, bytes)`. Panics if a recording fails (it runs
/// the group's code over loopback; a failure is a bug to see at once).
pub fn files() -> Vec<(String, Vec<u8>)> {
    let recorded: Vec<(Case, Transcript)> = cases()
        .into_iter()
        .map(|c| {
            let t = conformance::record(&c.script)
                .unwrap_or_else(|e| panic!("recording {}: {e}", c.name));
            (c, t)
        })
        .collect();
    let mut out: Vec<(String, Vec<u8>)> = recorded
        .iter()
        .map(|(c, t)| {
            (
                format!("{}.json", c.name),
                transcript_json(c, t).into_bytes(),
            )
        })
        .collect();
    out.push(("README.md".into(), readme(&recorded).into_bytes()));
    out
}

/// `README.md` of `tests/vectors/tcp/`.
pub fn readme(recorded: &[(Case, Transcript)]) -> String {
    let mut out = String::from(README_HEAD);
    out.push_str("| file | outcome (client / server) | what happens |\n|---|---|---|\n");
    for (c, t) in recorded {
        out.push_str(&format!(
            "| `{}.json` | {} / {} | {} |\n",
            c.name,
            outcome(t.client),
            outcome(t.server),
            c.description.replace('|', "\\|")
        ));
    }
    out
}

const README_HEAD: &str = r#"# TCP process group: conformance transcripts

Generated — do not edit by hand. Regenerate with

    cargo run -p pgt-tests --bin gen-vectors

(it rewrites `tests/vectors/` and this directory). Each file is one TCP connection of pgt's process group
as `TCP.md` (repository root) specifies it, recorded with pgt-host's own code at both ends
(`pgt_host::pg::conformance`), with fixed job tokens and nonces so that every byte is reproducible.
Checked by `cargo test -p pgt-tests --test tcp_vectors` (today's code records exactly these files),
`tests/python/test_tcp_transcripts.py` (`python/src/pgt/tcp.py`) and
`tests/node/tcp_transcripts.test.mjs` (`examples/node/pgt_tcp.mjs`): each builds every message from
the inputs with its own code, verifies the MACs, and replays the transcript against its own client and
server over a real socket, comparing what they send byte for byte.

## Format

JSON, keys sorted. Integers above 2^53 − 1 (tags) are decimal strings. Bytes are lowercase hex.

- `client`, `server`: the inputs of each end — `token` (the job token; the HMAC key is its UTF-8
  bytes), `purpose`, `rank`, `world` and `nonce` of its hello. `server.admits`: whether the server's
  admission check lets this client's rank in (verdict 2 otherwise). `client.forged_hello`: present
  when the client is a stranger that sends these 52 bytes instead of its hello (its other inputs then
  play no part). `client.forged_proof`: present when the client is a forger that sends these 32 bytes
  as its proof instead of computing it.
- `messages`: every message in protocol order, each with `from` (`client` or `server`), `message`
  (`ClientHello`, `ServerHello`, `ClientProof`, `Verdict`, `Register`, `Table`, `Frame`), `hex` (its
  bytes) and `fields` (the same bytes cut into `[name, hex]` pairs, in order). Frames also have `tag`;
  `Frame` has `payload`, `Register` the `address` it carries, `Table` the `addresses`, `Verdict` the
  `verdict` code.
- `outcome`: how each end's part ended — `accepted` (the handshake accepted and everything after it
  went as listed), `auth_failed` (a MAC did not verify, or the server refused the proof), `refused`
  (verdict 2, 3 or 4), `closed` (the other end closed the connection during the handshake).
- `receive_order` (frame exchanges): the tags each end asks for, in order; a tag asked for before an
  earlier frame's is served from the stash.

With `K` the token's bytes and `CH`, `SH` the ClientHello and ServerHello: `mac_s` =
HMAC-SHA256(K, `"pgt/1 server"` ‖ CH ‖ SH[0..52]) and `mac_c` = HMAC-SHA256(K, `"pgt/1 client"` ‖ CH ‖
SH), where SH is all 84 bytes.

## Transcripts

"#;
