// pgt's TCP process group, from Node: join a job of `pgt` ranks as one rank (not rank 0, which hosts the
// rendezvous store: run `pgt send` or `pgt recv` there).
//
// The TCP process group as TCP.md (repository root) specifies it — the same bytes as the Rust side
// (host/src/pg/) and examples/python/pgt_tcp.py: register with the store on MASTER_ADDR:MASTER_PORT
// and get every rank's listener address; a mutual HMAC-SHA256
// challenge–response keyed with the job token on every connection; one connection per pair of ranks
// (each rank connects to every higher rank and accepts every lower one); then frames
// `tag u64 LE | len u64 LE | payload` both ways. This module only moves bytes; pgt's protocol runs in
// the wasm module.
//
//   const pg = await TcpGroup.join(optionsFromEnv());
//   await pg.recvInto(0, tag, [buf.subarray(0, 64), ...], 60_000);
//   const bytes = await pg.recvBytes(0, tag, 24, 60_000);
//   await pg.send(2, tag, [header, buf.subarray(64, 128)], 60_000);
//   pg.close();
//
// The wire format's pure pieces (hello, parseHello, mac, frameHeader, decodeTable) and the handshake
// and registration steps (clientHandshake and serverHandshake with an optional fixed nonce,
// exchangeRegistration, over a Conn) are exported for tests/node, which checks them against the
// conformance transcripts in tests/vectors/tcp.
//
// Errors are PgError with `kind`: "auth" (wrong token, not a pgt endpoint), "rendezvous", "timeout",
// "closed", "length", "poisoned", "config".

import net from "node:net";
import dgram from "node:dgram";
import crypto from "node:crypto";
import dns from "node:dns/promises";

// host/src/pg/auth.rs, rendezvous.rs, wire.rs
const AUTH_MAGIC = Buffer.from("PGTAUTH1");
const CLIENT_HELLO_LEN = 52;
const SERVER_HELLO_LEN = 84;
const MAC_LEN = 32;
export const NONCE_LEN = 32;
export const PURPOSE_STORE = 1;
export const PURPOSE_PEER = 2;
export const LABEL_SERVER = Buffer.from("pgt/1 server");
export const LABEL_CLIENT = Buffer.from("pgt/1 client");
export const VERDICT_ACCEPTED = 0;
export const VERDICT_BAD_PROOF = 1;
export const VERDICT_UNEXPECTED_RANK = 2;
export const VERDICT_WORLD_MISMATCH = 3;
export const VERDICT_WRONG_PURPOSE = 4;
export const TAG_REGISTER = 1n;
export const TAG_TABLE = 2n;
const MAX_ADDR_LEN = 256;
const FRAME_HEADER_LEN = 16;
const HANDSHAKE_TIMEOUT_MS = 10_000;
/** Cap on frames set aside while waiting for another tag, per peer. */
const STASH_LIMIT = 64 << 20;
/** Bytes read ahead from a socket before it is paused. */
const HIGH_WATER = 64 << 20;

export class PgError extends Error {
  constructor(kind, message) {
    super(message);
    this.name = "PgError";
    this.kind = kind;
  }
}

/** A deadline passed; `partial`: in the middle of a read (the stream is no longer at a boundary). */
class TimedOut extends Error {
  constructor(partial = false) {
    super("timed out");
    this.partial = partial;
  }
}

/** Torch-style options from the environment: MASTER_ADDR, MASTER_PORT, RANK, WORLD_SIZE, PGT_TOKEN,
 * PGT_TIMEOUT_SECS (group formation, default 300 s), PGT_LISTEN_HOST. */
export function optionsFromEnv(env = process.env) {
  const need = (k) => {
    const v = env[k];
    if (v === undefined || v === "") throw new PgError("config", `${k} is not set`);
    return v;
  };
  const int = (k, v) => {
    if (!/^\d+$/.test(String(v))) throw new PgError("config", `${k}=${v} is not a non-negative integer`);
    return Number(v);
  };
  const timeout = env.PGT_TIMEOUT_SECS ? Number(env.PGT_TIMEOUT_SECS) : 300;
  if (!(timeout > 0)) throw new PgError("config", `PGT_TIMEOUT_SECS=${env.PGT_TIMEOUT_SECS} is not a number of seconds`);
  return {
    masterAddr: env.MASTER_ADDR || "127.0.0.1",
    masterPort: int("MASTER_PORT", env.MASTER_PORT || "29500"),
    rank: int("RANK", need("RANK")),
    worldSize: int("WORLD_SIZE", need("WORLD_SIZE")),
    token: Buffer.from(need("PGT_TOKEN")),
    timeoutMs: timeout * 1000,
    listenHost: env.PGT_LISTEN_HOST || null,
  };
}

/** A socket read as a byte stream with deadlines, and written in order. */
export class Conn {
  constructor(socket) {
    this.socket = socket;
    this.chunks = [];
    this.buffered = 0;
    this.consumed = 0; // bytes handed out so far (to tell a clean timeout from one mid-frame)
    this.closed = null;
    this.waiter = null;
    socket.setNoDelay(true);
    socket.on("data", (c) => {
      this.chunks.push(c);
      this.buffered += c.length;
      if (this.buffered > HIGH_WATER) socket.pause();
      this.wake();
    });
    const end = (why) => {
      this.closed ??= why;
      this.wake();
    };
    socket.on("end", () => end("connection closed"));
    socket.on("close", () => end("connection closed"));
    socket.on("error", (e) => end(e.message));
  }

  wake() {
    const w = this.waiter;
    this.waiter = null;
    if (w) w();
  }

  wait(deadline) {
    return new Promise((resolve, reject) => {
      const left = deadline - Date.now();
      if (left <= 0) return reject(new TimedOut());
      const timer = setTimeout(() => {
        this.waiter = null;
        reject(new TimedOut());
      }, left);
      this.waiter = () => {
        clearTimeout(timer);
        resolve();
      };
    });
  }

  /** Fills `target` (a Uint8Array) from the stream, by `deadline` (Date.now() milliseconds). */
  async readInto(target, deadline) {
    let off = 0;
    while (off < target.length) {
      if (this.chunks.length) {
        const c = this.chunks[0];
        const n = Math.min(c.length, target.length - off);
        target.set(c.subarray(0, n), off);
        off += n;
        this.buffered -= n;
        this.consumed += n;
        if (n === c.length) this.chunks.shift();
        else this.chunks[0] = c.subarray(n);
        if (this.buffered <= HIGH_WATER && this.socket.isPaused()) this.socket.resume();
        continue;
      }
      if (this.closed) throw new PgError("closed", this.closed);
      try {
        await this.wait(deadline);
      } catch (e) {
        throw new TimedOut(off > 0);
      }
    }
  }

  async readExact(n, deadline) {
    const b = Buffer.alloc(n);
    await this.readInto(b, deadline);
    return b;
  }

  /** Writes `buffers` in order; resolves once the last is handed to the OS. */
  write(buffers, deadline) {
    return new Promise((resolve, reject) => {
      if (this.closed) return reject(new PgError("closed", this.closed));
      const left = deadline - Date.now();
      if (left <= 0) return reject(new TimedOut());
      const timer = setTimeout(() => reject(new TimedOut()), left);
      const bufs = buffers.filter((b) => b.length > 0);
      if (bufs.length === 0) {
        clearTimeout(timer);
        return resolve();
      }
      bufs.forEach((b, i) =>
        this.socket.write(b, (err) => {
          if (i !== bufs.length - 1 && !err) return;
          clearTimeout(timer);
          if (err) reject(new PgError("closed", err.message));
          else resolve();
        }),
      );
    });
  }

  close() {
    this.socket.destroy();
  }
}

const u64le = (v) => {
  const b = Buffer.alloc(8);
  b.writeBigUInt64LE(BigInt(v));
  return b;
};
/** A frame's 16-byte header: `tag u64 LE | len u64 LE` (the payload follows). */
export const frameHeader = (tag, len) => Buffer.concat([u64le(tag), u64le(len)]);

async function readFrame(conn, maxLen, deadline) {
  const h = await conn.readExact(FRAME_HEADER_LEN, deadline);
  const tag = h.readBigUInt64LE(0);
  const n = h.readBigUInt64LE(8);
  if (n > BigInt(maxLen)) throw new PgError("rendezvous", `control frame of ${n} bytes exceeds ${maxLen}`);
  return [tag, await conn.readExact(Number(n), deadline)];
}

// ---- the handshake (host/src/pg/auth.rs) ----

/** A ClientHello, or a ServerHello's first 52 bytes. */
export function hello(purpose, rank, world, nonce) {
  const b = Buffer.alloc(CLIENT_HELLO_LEN);
  AUTH_MAGIC.copy(b, 0);
  b[8] = purpose;
  b.writeUInt32LE(rank >>> 0, 12);
  b.writeUInt32LE(world >>> 0, 16);
  nonce.copy(b, 20);
  return b;
}

/** `{ purpose, rank, world }`, or null if `b` is not a pgt hello's first 52 bytes. */
export function parseHello(b) {
  if (!b.subarray(0, 8).equals(AUTH_MAGIC) || b[9] || b[10] || b[11]) return null;
  return { purpose: b[8], rank: b.readUInt32LE(12), world: b.readUInt32LE(16) };
}

/** HMAC-SHA256 keyed with the job token over `label` and `pieces`, concatenated. */
export function mac(token, label, ...pieces) {
  const m = crypto.createHmac("sha256", token);
  m.update(label);
  for (const p of pieces) m.update(p);
  return m.digest();
}

const sameMac = (a, b) => a.length === b.length && crypto.timingSafeEqual(a, b);

function peerName(socket) {
  const a = socket.remoteAddress ?? "<unknown>";
  return a.includes(":") ? `[${a}]:${socket.remotePort}` : `${a}:${socket.remotePort}`;
}

/** Client side; resolves to the server's `{ purpose, rank, world }` once it accepted us. `nonce`: fresh
 * from the OS unless given (the conformance transcripts fix it). */
export async function clientHandshake(conn, token, purpose, rank, world, deadline, what, nonce = crypto.randomBytes(NONCE_LEN)) {
  const addr = peerName(conn.socket);
  const mine = hello(purpose, rank, world, nonce);
  await conn.write([mine], deadline);
  const sh = await conn.readExact(SERVER_HELLO_LEN, deadline);
  const server = parseHello(sh.subarray(0, CLIENT_HELLO_LEN));
  if (!server) throw new PgError("auth", `authentication with ${what} at ${addr} failed: the other side is not a pgt endpoint`);
  if (!sameMac(mac(token, LABEL_SERVER, mine, sh.subarray(0, CLIENT_HELLO_LEN)), sh.subarray(CLIENT_HELLO_LEN))) {
    throw new PgError(
      "auth",
      `authentication with ${what} at ${addr} failed: the other side does not know the job token (is PGT_TOKEN the same on every rank?)`,
    );
  }
  await conn.write([mac(token, LABEL_CLIENT, mine, sh)], deadline);
  const verdict = (await conn.readExact(1, deadline))[0];
  switch (verdict) {
    case VERDICT_ACCEPTED:
      return server;
    case VERDICT_BAD_PROOF:
      throw new PgError("auth", `authentication with ${what} at ${addr} failed: our proof was refused`);
    case VERDICT_UNEXPECTED_RANK:
      throw new PgError("rendezvous", `${what} at ${addr} refused rank ${rank} (not expected there, or already connected)`);
    case VERDICT_WORLD_MISMATCH:
      throw new PgError("rendezvous", `${what} at ${addr} runs a world of size ${server.world}, we have ${world}`);
    case VERDICT_WRONG_PURPOSE:
      throw new PgError("rendezvous", `${addr} is not a ${purpose === PURPOSE_STORE ? "rendezvous store" : "pgt rank"}`);
    default:
      throw new PgError("auth", `authentication with ${what} at ${addr} failed: invalid verdict byte ${verdict}`);
  }
}

/** Server side; `admit(rank)` decides once the client proved the token. Returns the client's rank.
 * `nonce`: fresh from the OS unless given. */
export async function serverHandshake(conn, token, purpose, rank, world, deadline, admit, nonce = crypto.randomBytes(NONCE_LEN)) {
  const addr = peerName(conn.socket);
  const ch = await conn.readExact(CLIENT_HELLO_LEN, deadline);
  const client = parseHello(ch);
  if (!client) throw new PgError("auth", `refused ${addr}: garbage instead of a pgt hello`);
  const sh0 = hello(purpose, rank, world, nonce);
  const sh = Buffer.concat([sh0, mac(token, LABEL_SERVER, ch, sh0)]);
  await conn.write([sh], deadline);
  const proof = await conn.readExact(MAC_LEN, deadline);
  if (!sameMac(mac(token, LABEL_CLIENT, ch, sh), proof)) {
    await conn.write([Buffer.from([VERDICT_BAD_PROOF])], deadline).catch(() => {});
    throw new PgError("auth", `refused ${addr}: wrong job token`);
  }
  let verdict = VERDICT_ACCEPTED;
  if (client.purpose !== purpose) verdict = VERDICT_WRONG_PURPOSE;
  else if (client.world !== world) verdict = VERDICT_WORLD_MISMATCH;
  else if (!admit(client.rank)) verdict = VERDICT_UNEXPECTED_RANK;
  await conn.write([Buffer.from([verdict])], deadline);
  if (verdict !== VERDICT_ACCEPTED) throw new PgError("rendezvous", `refused rank ${client.rank} from ${addr}: verdict ${verdict}`);
  return client.rank;
}

// ---- formation (host/src/pg/tcp.rs, rendezvous.rs) ----

/** A rank's side of a registration, right after the store accepted its handshake on `conn`: sends the
 * REGISTER frame with `advertised` and waits (until `deadline`) for the TABLE; resolves to it as
 * `decodeTable` returns it. */
export async function exchangeRegistration(conn, rank, world, advertised, deadline) {
  try {
    await conn.write([frameHeader(TAG_REGISTER, Buffer.byteLength(advertised)), Buffer.from(advertised)], deadline);
    const [tag, payload] = await readFrame(conn, 4 + world * (2 + MAX_ADDR_LEN), deadline);
    if (tag !== TAG_TABLE) throw new PgError("rendezvous", `unexpected store message tag ${tag}`);
    const table = decodeTable(payload, world);
    if (!table) throw new PgError("rendezvous", "malformed address table from the store");
    return table;
  } catch (e) {
    if (e instanceof TimedOut) throw new PgError("rendezvous", `rank ${rank}: timed out waiting for all ${world} ranks to register`);
    throw e;
  }
}

const fmtAddr = (host, port) => (host.includes(":") ? `[${host}]:${port}` : `${host}:${port}`);

function parseAddr(s) {
  const i = s.lastIndexOf(":");
  if (i < 0) throw new Error(`bad address ${s}`);
  let host = s.slice(0, i);
  const port = Number(s.slice(i + 1));
  if (host.startsWith("[")) host = host.slice(1, -1);
  if (!Number.isInteger(port)) throw new Error(`bad address ${s}`);
  return { host, port };
}

/** The TABLE payload as `[{ host, port }]` in rank order, or null if it is malformed or not `world`
 * entries long. */
export function decodeTable(b, world) {
  if (b.length < 4 || b.readUInt32LE(0) !== world) return null;
  const out = [];
  let off = 4;
  for (let r = 0; r < world; r++) {
    if (off + 2 > b.length) return null;
    const n = b.readUInt16LE(off);
    off += 2;
    if (off + n > b.length) return null;
    try {
      out.push(parseAddr(b.subarray(off, off + n).toString("utf8")));
    } catch {
      return null;
    }
    off += n;
  }
  return off === b.length ? out : null;
}

/** The local address the OS would use to reach `host` (no packet is sent). */
function routeTo(host, family) {
  return new Promise((resolve, reject) => {
    const s = dgram.createSocket(family === 6 ? "udp6" : "udp4");
    s.on("error", (e) => {
      s.close();
      reject(e);
    });
    s.connect(9, host, () => {
      const a = s.address().address;
      s.close();
      resolve(a);
    });
  });
}

function connectSocket(host, port, deadline) {
  return new Promise((resolve, reject) => {
    const socket = net.connect({ host, port });
    const timer = setTimeout(() => {
      socket.destroy();
      reject(new Error("connect timed out"));
    }, Math.max(1, Math.min(5000, deadline - Date.now())));
    socket.once("connect", () => {
      clearTimeout(timer);
      socket.removeAllListeners("error");
      resolve(socket);
    });
    socket.once("error", (e) => {
      clearTimeout(timer);
      reject(e);
    });
  });
}

const sleep = (ms) => new Promise((r) => setTimeout(r, ms));

/** Connects to `host:port` and authenticates, retrying transport failures (not up yet, reset…) until
 * `deadline`; refusals and authentication failures are not retried. */
async function connectAuthenticated({ host, port }, token, purpose, rank, world, deadline, what) {
  let backoff = 10;
  let last = "no attempt";
  for (;;) {
    if (Date.now() >= deadline) throw new PgError("rendezvous", `could not reach ${what} in time: ${last}`);
    let socket;
    try {
      socket = await connectSocket(host, port, deadline);
    } catch (e) {
      last = `${fmtAddr(host, port)}: ${e.message}`;
      await sleep(Math.min(backoff, Math.max(0, deadline - Date.now())));
      backoff = Math.min(backoff * 2, 200);
      continue;
    }
    const conn = new Conn(socket);
    try {
      const server = await clientHandshake(conn, token, purpose, rank, world, Math.min(deadline, Date.now() + HANDSHAKE_TIMEOUT_MS), what);
      return [conn, server];
    } catch (e) {
      conn.close();
      if (e instanceof PgError && e.kind !== "closed") throw e;
      last = `${fmtAddr(host, port)}: ${e instanceof TimedOut ? "handshake timed out" : e.message}`;
    }
    await sleep(Math.min(backoff, Math.max(0, deadline - Date.now())));
    backoff = Math.min(backoff * 2, 200);
  }
}

class Peer {
  constructor(rank, conn) {
    this.rank = rank;
    this.conn = conn;
    this.stash = new Map(); // tag (bigint) -> [Buffer]
    this.stashed = 0;
    this.pending = null; // [tag, len] of a frame whose header was read, not its payload
    this.poisoned = false;
    this.busy = Promise.resolve(); // one receive at a time
    this.sending = Promise.resolve(); // one send at a time
  }
}

/** One rank of a job's TCP process group. */
export class TcpGroup {
  constructor(rank, world, conns) {
    this.rank = rank;
    this.size = world;
    this.peers = new Map([...conns].map(([r, c]) => [r, new Peer(r, c)]));
  }

  /** Forms the group with the other ranks; resolves once every rank is connected, within opts.timeoutMs. */
  static async join(opts, log = () => {}) {
    const { rank, worldSize: world, token } = opts;
    if (!(world > 0) || !(rank >= 0 && rank < world)) throw new PgError("config", `rank ${rank} is outside world size ${world}`);
    if (!token || token.length === 0) throw new PgError("config", "the job token is empty");
    if (rank === 0) throw new PgError("config", "rank 0 hosts the rendezvous store: run pgt (Rust) or the Python example there");
    const deadline = Date.now() + opts.timeoutMs;
    let master;
    try {
      master = await dns.lookup(opts.masterAddr);
    } catch (e) {
      throw new PgError("config", `cannot resolve ${opts.masterAddr}: ${e.message}`);
    }
    const route = await routeTo(master.address, master.family).catch((e) => {
      throw new PgError("config", `no route to MASTER_ADDR ${opts.masterAddr}: ${e.message}`);
    });
    // 1. Our listener for lower ranks, on the interface that routes to the master (or PGT_LISTEN_HOST).
    const listenHost = opts.listenHost || route;
    const accepted = new Map();
    const claimed = new Set();
    let acceptedChanged = () => {};
    const server = net.createServer((socket) => {
      const conn = new Conn(socket);
      const admit = (r) => r < rank && !claimed.has(r) && (claimed.add(r), true);
      serverHandshake(conn, token, PURPOSE_PEER, rank, world, Date.now() + HANDSHAKE_TIMEOUT_MS, admit).then(
        (r) => {
          accepted.set(r, conn);
          acceptedChanged();
        },
        (e) => {
          log(`refused a connection from ${peerName(socket)}: ${e.message}`);
          conn.close();
        },
      );
    });
    await new Promise((resolve, reject) => {
      server.once("error", (e) => reject(new PgError("config", `cannot listen on ${listenHost}: ${e.message}`)));
      server.listen(0, listenHost, resolve);
    });
    const bound = server.address();
    const advertised = fmtAddr(bound.address === "0.0.0.0" || bound.address === "::" ? route : bound.address, bound.port);
    const conns = new Map();
    try {
      // 2. Register with the store and get the address table.
      const [store] = await connectAuthenticated(
        { host: master.address, port: opts.masterPort },
        token,
        PURPOSE_STORE,
        rank,
        world,
        deadline,
        "the rendezvous store",
      );
      let table;
      try {
        table = await exchangeRegistration(store, rank, world, advertised, deadline);
      } finally {
        store.close();
      }
      log(`rank ${rank}: got the address table`);
      // 3. Connect to higher ranks.
      for (let peer = rank + 1; peer < world; peer++) {
        const [conn, srv] = await connectAuthenticated(table[peer], token, PURPOSE_PEER, rank, world, deadline, `rank ${peer}`);
        conns.set(peer, conn);
        if (srv.rank !== peer) throw new PgError("rendezvous", `${fmtAddr(table[peer].host, table[peer].port)} answered as rank ${srv.rank}, expected rank ${peer}`);
      }
      // 4. Wait for the lower ranks.
      while (accepted.size < rank) {
        const left = deadline - Date.now();
        const missing = [...Array(rank).keys()].filter((r) => !accepted.has(r));
        if (left <= 0) throw new PgError("rendezvous", `timed out waiting for connections from ranks ${missing}`);
        await new Promise((resolve) => {
          const t = setTimeout(resolve, left);
          acceptedChanged = () => {
            clearTimeout(t);
            resolve();
          };
        });
      }
      for (const [r, c] of accepted) conns.set(r, c);
    } catch (e) {
      for (const c of conns.values()) c.close();
      for (const c of accepted.values()) c.close();
      throw e instanceof TimedOut ? new PgError("rendezvous", "timed out forming the group") : e;
    } finally {
      server.close();
    }
    log(`rank ${rank}: TCP process group of ${world} formed`);
    return new TcpGroup(rank, world, conns);
  }

  peer(r) {
    const p = this.peers.get(r);
    if (!p) throw new PgError("config", `rank ${r} is not another rank of this group of ${this.size} (we are rank ${this.rank})`);
    if (p.poisoned) throw new PgError("poisoned", `connection to rank ${r} is unusable after an earlier failure in the middle of a frame`);
    return p;
  }

  /** Sends one message (the concatenation of `parts`, Uint8Arrays) with `tag` to `dst`. */
  send(dst, tag, parts, timeoutMs) {
    const p = this.peer(dst);
    const run = async () => {
      const n = parts.reduce((a, b) => a + b.length, 0);
      try {
        await p.conn.write([frameHeader(tag, n), ...parts], Date.now() + timeoutMs);
      } catch (e) {
        p.poisoned = true;
        if (e instanceof TimedOut) throw new PgError("timeout", `timed out after ${timeoutMs} ms sending tag ${tag} to rank ${dst}`);
        throw new PgError("closed", `rank ${dst} closed the connection`);
      }
    };
    const done = p.sending.then(run, run);
    p.sending = done.catch(() => {});
    return done;
  }

  /** Reads frames from `p` until one with `tag` is next (stashing others whole); returns its length. */
  async nextFrame(p, tag, deadline) {
    for (;;) {
      if (p.pending === null) {
        const h = Buffer.alloc(FRAME_HEADER_LEN);
        await p.conn.readInto(h, deadline);
        p.pending = [h.readBigUInt64LE(0), h.readBigUInt64LE(8)];
      }
      const [t, n] = p.pending;
      if (t === tag) return Number(n);
      if (p.stashed + Number(n) + 64 > STASH_LIMIT) {
        throw new PgError("length", `receiving tag ${tag} from rank ${p.rank}: a frame with tag ${t} (${n} bytes) does not fit the stash`);
      }
      const b = Buffer.alloc(Number(n));
      await p.conn.readInto(b, deadline);
      p.pending = null;
      if (!p.stash.has(t)) p.stash.set(t, []);
      p.stash.get(t).push(b);
      p.stashed += b.length + 64;
    }
  }

  /** The message with `tag` from `src`: `take(len, read | null, data | null)` checks its length and
   * reads it (`read(view)` from the wire, or `data` from the stash). */
  recv(src, tag, timeoutMs, take) {
    const p = this.peer(src);
    tag = BigInt(tag);
    const run = async () => {
      const queued = p.stash.get(tag);
      if (queued && queued.length) {
        const data = queued[0];
        const out = take(data.length, null, data);
        queued.shift();
        if (!queued.length) p.stash.delete(tag);
        p.stashed -= data.length + 64;
        return out;
      }
      const deadline = Date.now() + timeoutMs;
      let payloadStart = null;
      try {
        const n = await this.nextFrame(p, tag, deadline);
        payloadStart = p.conn.consumed;
        const out = await take(n, (view) => p.conn.readInto(view, deadline), null);
        p.pending = null;
        return out;
      } catch (e) {
        if (e instanceof TimedOut) {
          // Clean at a frame boundary, or right after a frame's header (kept as pending); otherwise
          // the stream can no longer be parsed.
          if (e.partial || (payloadStart !== null && p.conn.consumed !== payloadStart)) p.poisoned = true;
          throw new PgError("timeout", `timed out after ${timeoutMs} ms waiting for tag ${tag} from rank ${src}`);
        }
        if (e instanceof PgError && e.kind === "closed") p.poisoned = true;
        throw e;
      }
    };
    const done = p.busy.then(run, run);
    p.busy = done.catch(() => {});
    return done;
  }

  /** Receives the message with `tag` from `src` straight into `parts` (Uint8Arrays, filled in order);
   * its length must equal theirs, else a "length" PgError (the message stays first in line). */
  recvInto(src, tag, parts, timeoutMs) {
    const want = parts.reduce((a, b) => a + b.length, 0);
    return this.recv(src, tag, timeoutMs, async (n, read, data) => {
      if (n !== want) throw new PgError("length", `message with tag ${tag} from rank ${src} has ${n} bytes, expected ${want}`);
      let off = 0;
      for (const x of parts) {
        if (data) x.set(data.subarray(off, off + x.length));
        else await read(x);
        off += x.length;
      }
    });
  }

  /** Receives the message with `tag` from `src`, whatever its length up to `maxLen`. */
  recvBytes(src, tag, maxLen, timeoutMs) {
    return this.recv(src, tag, timeoutMs, async (n, read, data) => {
      if (n > maxLen) throw new PgError("length", `message with tag ${tag} from rank ${src} has ${n} bytes, more than the limit of ${maxLen}`);
      if (data) return data;
      const b = Buffer.alloc(n);
      await read(b);
      return b;
    });
  }

  close() {
    for (const p of this.peers.values()) p.conn.close();
    this.peers = new Map();
  }
}
