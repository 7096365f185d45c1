// The TCP process group's conformance transcripts (tests/vectors/tcp, specified in TCP.md) against the
// Node implementation, examples/node/pgt_tcp.mjs.
//
// For every transcript: each message is rebuilt from the inputs with pgt_tcp.mjs's own functions (hello,
// mac, frameHeader) and the MACs are checked with node:crypto directly as well; then the transcript is
// replayed over a real socket against pgt_tcp.mjs's client and server (the handshake with the
// transcript's nonce, then the registration or the frames through TcpGroup), and what they send must be
// the recorded bytes, ending the way the transcript says. (Node never hosts the rendezvous store, so
// the store's end of `store_registration` is not replayed here.)
//
// Run: node --test tests/node/
import { test } from "node:test";
import assert from "node:assert/strict";
import crypto from "node:crypto";
import net from "node:net";
import { readFileSync, readdirSync } from "node:fs";
import { fileURLToPath } from "node:url";
import path from "node:path";
import * as tcp from "../../examples/node/pgt_tcp.mjs";

const here = path.dirname(fileURLToPath(import.meta.url));
const dir = path.join(here, "..", "vectors", "tcp");
const transcripts = readdirSync(dir)
  .filter((f) => f.endsWith(".json"))
  .sort()
  .map((f) => [f.slice(0, -".json".length), JSON.parse(readFileSync(path.join(dir, f), "utf8"))]);
const TIMEOUT_MS = 10_000;

const raw = (m) => Buffer.from(m.hex, "hex");
const of = (t, kind) => t.messages.filter((m) => m.message === kind);
const token = (party) => Buffer.from(party.token, "utf8");

/** The verdict TCP.md's server rules give for the transcript's inputs. */
function expectedVerdict(t) {
  const [c, s] = [t.client, t.server];
  if ("forged_proof" in c || c.token !== s.token) return tcp.VERDICT_BAD_PROOF;
  if (c.purpose !== s.purpose) return tcp.VERDICT_WRONG_PURPOSE;
  if (c.world !== s.world) return tcp.VERDICT_WORLD_MISMATCH;
  if (!s.admits) return tcp.VERDICT_UNEXPECTED_RANK;
  return tcp.VERDICT_ACCEPTED;
}

const hmac = (key, ...pieces) => {
  const h = crypto.createHmac("sha256", key);
  for (const p of pieces) h.update(p);
  return h.digest();
};

/** "1.2.3.4:5" / "[::1]:5" as decodeTable returns it. */
function addr(s) {
  const i = s.lastIndexOf(":");
  const host = s.slice(0, i);
  return { host: host.startsWith("[") ? host.slice(1, -1) : host, port: Number(s.slice(i + 1)) };
}

test("the transcripts are there", () => {
  const names = transcripts.map(([n]) => n);
  for (const n of ["peer_exchange", "store_registration", "not_a_hello", "bad_proof"]) assert.ok(names.includes(n), n);
});

// ---- replay over a socket ----

async function socketPair() {
  const server = net.createServer();
  await new Promise((resolve) => server.listen(0, "127.0.0.1", resolve));
  const accepted = new Promise((resolve) => server.once("connection", resolve));
  const a = net.connect(server.address().port, "127.0.0.1");
  await new Promise((resolve, reject) => {
    a.once("connect", resolve);
    a.once("error", reject);
  });
  const b = await accepted;
  server.close();
  return [a, b];
}

/** A raw socket read as a byte stream (independent of pgt_tcp.mjs's Conn). */
function rawReader(socket) {
  let buf = Buffer.alloc(0);
  let ended = false;
  let wake = () => {};
  socket.on("data", (d) => {
    buf = Buffer.concat([buf, d]);
    wake();
  });
  const end = () => {
    ended = true;
    wake();
  };
  socket.on("end", end);
  socket.on("close", end);
  socket.on("error", end);
  const until = async (enough, deadline) => {
    while (!enough() && !ended) {
      const left = deadline - Date.now();
      if (left <= 0) break;
      await new Promise((resolve) => {
        const timer = setTimeout(resolve, left);
        wake = () => {
          clearTimeout(timer);
          resolve();
        };
      });
    }
  };
  return {
    /** Up to `n` bytes: fewer only if the stream ended or the deadline passed. */
    async read(n, deadline) {
      await until(() => buf.length >= n, deadline);
      const out = buf.subarray(0, n);
      buf = buf.subarray(out.length);
      return out;
    },
    /** Everything until the other side closes. */
    async rest(deadline) {
      await until(() => false, deadline);
      return buf;
    },
  };
}

/** Plays `side` of transcript `t` on `socket` from the recorded bytes: writes that side's messages, reads
 * the other side's and compares them, in order; then ends its sending half and expects nothing more
 * before the other side closes. Resolves to a list of problems. */
async function play(socket, t, side) {
  const problems = [];
  const reader = rawReader(socket);
  const deadline = Date.now() + TIMEOUT_MS;
  for (const [i, m] of t.messages.entries()) {
    if (m.from === side) {
      socket.write(raw(m));
      continue;
    }
    const got = await reader.read(raw(m).length, deadline);
    if (!got.equals(raw(m))) {
      problems.push(`message ${i} ${m.message}: ${got.toString("hex")}`);
      socket.destroy();
      return problems;
    }
  }
  socket.end();
  const rest = await reader.rest(deadline);
  if (rest.length) problems.push(`${rest.length} bytes after the transcript: ${rest.toString("hex")}`);
  socket.destroy();
  return problems;
}

function outcome(e) {
  if (e === null) return "accepted";
  if (e instanceof tcp.PgError && e.kind === "auth") return "auth_failed";
  if (e instanceof tcp.PgError && e.kind === "rendezvous") return "refused";
  if (e instanceof tcp.PgError && e.kind === "closed") return "closed";
  return `unexpected ${e?.name}: ${e?.message}`;
}

/** Our end's frames through TcpGroup: ours sent in order, then received in the transcript's order, each
 * payload as recorded. */
async function exchange(conn, t, me, peerRank, myRank, world) {
  const pg = new tcp.TcpGroup(myRank, world, new Map([[peerRank, conn]]));
  const frames = of(t, "Frame");
  for (const f of frames.filter((f) => f.from === me)) {
    await pg.send(peerRank, BigInt(f.tag), [Buffer.from(f.payload, "hex")], TIMEOUT_MS);
  }
  const incoming = frames.filter((f) => f.from !== me);
  for (const tag of t.receive_order[me].map(BigInt)) {
    const at = incoming.findIndex((f) => BigInt(f.tag) === tag);
    assert.ok(at >= 0, `no frame left with tag ${tag}`);
    const [want] = incoming.splice(at, 1);
    const got = await pg.recvBytes(peerRank, tag, 1 << 20, TIMEOUT_MS);
    assert.deepEqual(Buffer.from(got), Buffer.from(want.payload, "hex"), `tag ${tag}`);
  }
  assert.equal(incoming.length, 0);
}

/** Runs `ours(conn)` (our implementation as `me`) against the transcript's other side. */
async function runAgainst(t, me, ours) {
  const [mine, theirs] = await socketPair();
  const player = play(theirs, t, me === "client" ? "server" : "client");
  const conn = new tcp.Conn(mine);
  let error = null;
  try {
    await ours(conn);
  } catch (e) {
    if (!(e instanceof tcp.PgError)) throw e;
    error = e;
  } finally {
    conn.close();
  }
  assert.deepEqual(await player, []);
  assert.equal(outcome(error), t.outcome[me]);
}

for (const [name, t] of transcripts) {
  const [c, s] = [t.client, t.server];

  test(`${name}: every message from the inputs`, () => {
    const ms = t.messages;
    const ch = raw(ms[0]);
    if ("forged_hello" in c) {
      // Not a hello: the server answers nothing.
      assert.deepEqual(ch, Buffer.from(c.forged_hello, "hex"));
      assert.equal(tcp.parseHello(ch), null);
      assert.equal(ms.length, 1);
      return;
    }
    assert.deepEqual(ch, tcp.hello(c.purpose, c.rank, c.world, Buffer.from(c.nonce, "hex")));
    assert.deepEqual(tcp.parseHello(ch), { purpose: c.purpose, rank: c.rank, world: c.world });
    const sh = raw(ms[1]);
    const sh0 = sh.subarray(0, 52);
    assert.deepEqual(sh0, tcp.hello(s.purpose, s.rank, s.world, Buffer.from(s.nonce, "hex")));
    assert.deepEqual(tcp.parseHello(sh0), { purpose: s.purpose, rank: s.rank, world: s.world });
    const macS = tcp.mac(token(s), tcp.LABEL_SERVER, ch, sh0);
    assert.deepEqual(sh.subarray(52), macS);
    assert.deepEqual(macS, hmac(token(s), Buffer.from("pgt/1 server"), ch, sh0));
    // The client checks mac_s under its own token: it verifies exactly when the tokens agree.
    const clientView = tcp.mac(token(c), tcp.LABEL_SERVER, ch, sh0);
    assert.equal(clientView.equals(sh.subarray(52)), c.token === s.token);
    if (c.token !== s.token) {
      assert.equal(ms.length, 2, "the client gives up before proving anything");
      return;
    }
    const [proof] = of(t, "ClientProof");
    const macC = tcp.mac(token(c), tcp.LABEL_CLIENT, ch, sh);
    assert.deepEqual(macC, hmac(token(c), Buffer.from("pgt/1 client"), ch, sh));
    if ("forged_proof" in c) {
      assert.deepEqual(raw(proof), Buffer.from(c.forged_proof, "hex"));
      assert.notDeepEqual(raw(proof), macC);
    } else {
      assert.deepEqual(raw(proof), macC);
    }
    const [verdict] = of(t, "Verdict");
    assert.deepEqual(raw(verdict), Buffer.from([expectedVerdict(t)]));
    assert.equal(verdict.verdict, expectedVerdict(t));
    for (const m of of(t, "Frame")) {
      const payload = Buffer.from(m.payload, "hex");
      assert.deepEqual(raw(m), Buffer.concat([tcp.frameHeader(BigInt(m.tag), payload.length), payload]));
    }
    for (const m of of(t, "Register")) {
      const a = Buffer.from(m.address, "utf8");
      assert.deepEqual(raw(m), Buffer.concat([tcp.frameHeader(tcp.TAG_REGISTER, a.length), a]));
    }
    for (const m of of(t, "Table")) {
      const payload = raw(m).subarray(16);
      assert.deepEqual(raw(m).subarray(0, 16), tcp.frameHeader(tcp.TAG_TABLE, payload.length));
      assert.deepEqual(tcp.decodeTable(payload, c.world), m.addresses.map(addr));
      assert.equal(tcp.decodeTable(payload, c.world + 1), null);
    }
    for (const m of ms) assert.equal(m.fields.map(([, h]) => h).join(""), m.hex);
  });

  const forger = "forged_hello" in c || "forged_proof" in c;
  test(`${name}: our client replays it`, { skip: forger && "the client is a forger, not pgt's" }, async () => {
    await runAgainst(t, "client", async (conn) => {
      const deadline = Date.now() + TIMEOUT_MS;
      const nonce = Buffer.from(c.nonce, "hex");
      const server = await tcp.clientHandshake(conn, token(c), c.purpose, c.rank, c.world, deadline, "the server", nonce);
      const [reg] = of(t, "Register");
      if (reg) {
        const table = await tcp.exchangeRegistration(conn, c.rank, c.world, reg.address, deadline);
        assert.deepEqual(table, of(t, "Table")[0].addresses.map(addr));
      } else if (t.receive_order) {
        await exchange(conn, t, "client", server.rank, c.rank, c.world);
      }
    });
  });

  test(`${name}: our server replays it`, { skip: of(t, "Register").length > 0 && "Node does not host the store" }, async () => {
    await runAgainst(t, "server", async (conn) => {
      const deadline = Date.now() + TIMEOUT_MS;
      const nonce = Buffer.from(s.nonce, "hex");
      const admitted = [];
      const admit = (rank) => {
        admitted.push(rank);
        return s.admits;
      };
      const client = await tcp.serverHandshake(conn, token(s), s.purpose, s.rank, s.world, deadline, admit, nonce);
      assert.deepEqual(admitted, [c.rank]);
      if (t.receive_order) await exchange(conn, t, "server", client, s.rank, s.world);
    });
  });
}
