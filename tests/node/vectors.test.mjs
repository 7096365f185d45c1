// The JS build of pgt's core (wasm/pkg-node, made by scripts/build-wasm.sh) against the golden vectors of
// tests/vectors: every vector decodes to the summary, plan and error index.json gives; summaries encode
// back to the very bytes; receivers driven by JS accept the streams (and reject the malformed ones with
// the named error) — driven by examples/node/pgt_recv.mjs's loop, as pgt-core's drive.rs; a JS-driven
// sender produces the streams' bytes.
//
// Run: node --test tests/node/
import { test } from "node:test";
import assert from "node:assert/strict";
import { readFileSync, existsSync } from "node:fs";
import { createRequire } from "node:module";
import { fileURLToPath } from "node:url";
import path from "node:path";

import { receive as drive, isStale, prefixBytes } from "../../examples/node/pgt_recv.mjs";

const here = path.dirname(fileURLToPath(import.meta.url));
const root = path.join(here, "..", "..");
const pkgDir = path.join(root, "wasm", "pkg-node");
if (!existsSync(path.join(pkgDir, "pgt_wasm.js"))) {
  throw new Error(`${pkgDir} is missing: run scripts/build-wasm.sh first`);
}
const pgt = createRequire(import.meta.url)(pkgDir);
const vectorsDir = path.join(root, "tests", "vectors");
const index = JSON.parse(readFileSync(path.join(vectorsDir, "index.json"), "utf8"));
const byKind = (kind) => index.vectors.filter((v) => v.kind === kind);
const read = (v) => new Uint8Array(readFileSync(path.join(vectorsDir, v.file)));

/** Header and metadata of a header + metadata vector. */
function split(v) {
  const bytes = read(v);
  return [bytes.subarray(0, v.header_len), bytes.subarray(v.header_len)];
}

/** The records of a stream vector: [{tag, bytes}]. */
function records(v) {
  const b = read(v);
  const view = new DataView(b.buffer, b.byteOffset, b.byteLength);
  const out = [];
  for (let at = 0; at < b.length; ) {
    const tag = Number(view.getBigUint64(at, true));
    const len = Number(view.getBigUint64(at + 8, true));
    out.push({ tag, bytes: b.subarray(at + 16, at + 16 + len) });
    at += 16 + len;
  }
  return out;
}

const big = (x) => BigInt(x); // index.json integers are numbers or decimal strings
const num = (x) => Number(big(x));
const pattern = (s, i) => (17 * s + i) % 256;

/** A pgt error with the vector's variant name (JS errors carry no Debug form: name and message). */
function isPgtError(v) {
  return (e) => {
    assert.ok(e instanceof Error, `not an Error: ${e}`);
    assert.equal(e.pgt, true);
    assert.equal(e.name, v.error, `${v.file}: ${e.message}`);
    assert.equal(e.variant, v.error);
    assert.ok(e.message.length > 0);
    return true;
  };
}

// XXH3-64 of pattern-filled storages, known from the valid stream vectors' results: keyed by storage
// index and size (the pattern depends on nothing else). A JS host would hash with any XXH3 library;
// these tests need none.
const patternDigests = new Map();
for (const v of byKind("stream")) {
  for (const s of v.result.storages) patternDigests.set(`${s.index}/${s.nbytes}`, BigInt(s.digest));
}
function digestOf(storage, bytes) {
  const d = patternDigests.get(`${storage}/${bytes.length}`);
  assert.ok(d !== undefined, `no known digest for storage ${storage} of ${bytes.length} bytes`);
  const isPattern = bytes.every((b, i) => b === pattern(storage, i));
  return isPattern ? d : d ^ 1n; // bytes that differ from the pattern hash to something else
}

test("the module speaks index.json's protocol version (2) and has the documented defaults", () => {
  assert.equal(index.protocol_version, 2);
  assert.equal(pgt.protocolVersion(), index.protocol_version);
  assert.deepEqual(pgt.defaultLimits(), index.default_limits);
});

test("valid metadata decodes to index.json's manifest, plans and re-encodes byte for byte", () => {
  const vs = byKind("valid_metadata");
  assert.ok(vs.length >= 8);
  for (const v of vs) {
    const [h, m] = split(v);
    const summary = pgt.decodeMetadata(h, m);
    const { messages, ...expected } = v.manifest;
    for (const [k, want] of Object.entries(expected)) {
      assert.deepEqual(summary[k], want, `${v.file}: ${k}`);
    }
    assert.ok(Array.isArray(summary.tree) && summary.tree.length > 0, v.file);
    assert.deepEqual(pgt.plan(h, m), messages, `${v.file}: plan`);
    const e = pgt.encode(summary, summary.digests, undefined, BigInt(summary.header.transfer_id));
    assert.deepEqual(e.header, h, `${v.file}: header round trip`);
    assert.deepEqual(e.metadata, m, `${v.file}: metadata round trip`);
  }
});

test("malformed vectors throw the named pgt error", () => {
  const vs = byKind("malformed");
  assert.ok(vs.length >= 40);
  for (const v of vs) {
    const [h, m] = split(v);
    assert.throws(() => pgt.decodeMetadata(h, m, v.limits), isPgtError(v), v.file);
    assert.throws(() => pgt.plan(h, m, v.limits), isPgtError(v), v.file);
  }
});

test("receiver_reject vectors decode but a receiver with the vector's options rejects them", () => {
  for (const v of byKind("receiver_reject")) {
    const [h, m] = split(v);
    pgt.decodeMetadata(h, m);
    const r = new pgt.Receiver(v.receiver);
    const op = r.poll();
    assert.equal(op.type, "recv");
    assert.equal(op.kind, "header");
    r.handleHeader(h);
    assert.throws(() => r.handleMetadata(m), isPgtError(v), v.file);
  }
});

/** The host refusing a message before the core sees it: `error` as in a host_reject_stream entry. */
class HostReject extends Error {
  constructor(error) {
    super(JSON.stringify(error));
    this.error = error;
  }
}

/**
 * A sequential host over a stream's records (pgt_recv.mjs's `receive` drives it): each message is the
 * next record; data lands in fresh storages, with its digests per message when the op says so. A record
 * with another tag than the one asked for is not that message, which then never comes; a record of
 * another transfer (stale: its prefix is not the op's) is skipped; a data message must have exactly the
 * plan's length (the core never sees its bytes).
 */
class RecordsHost {
  constructor(v) {
    Object.assign(this, { v, recs: records(v), next: 0, storages: [], paths: null, forwards: [], events: [] });
    this.skipped = 0;
  }

  recvBytes(op) {
    for (;;) {
      const rec = this.recs[this.next++];
      if (!rec || rec.tag !== num(op.tag)) {
        throw new HostReject({ reason: "missing", from: op.from, tag: num(op.tag) });
      }
      if (!isStale(op, rec.bytes)) return rec.bytes;
      this.skipped++;
    }
  }

  discard(op) {
    try {
      this.recvBytes(op);
      return true;
    } catch {
      return false;
    }
  }

  bind(incoming, paths) {
    this.paths = paths();
    return [];
  }

  bound(incoming, bindings) {
    assert.equal(bindings.length, incoming.storages.length);
    assert.ok(bindings.every((b) => b.dest === "fresh" && b.cast_from === null));
    this.storages = bindings.map((b) => new Uint8Array(num(b.nbytes)));
  }

  recvData(op, segments) {
    const bytes = this.recvBytes(op);
    if (bytes.length !== num(op.len)) {
      const [expected, got] = [num(op.len), bytes.length];
      throw new HostReject({ reason: "length", from: op.from, tag: num(op.tag), expected, got });
    }
    const digests = [];
    let at = 8; // the storage bytes follow the prefix
    for (const seg of segments) {
      const [off, len] = [num(seg.offset), num(seg.len)];
      this.storages[seg.storage].set(bytes.subarray(at, at + len), off);
      at += len;
      if (op.hash && seg.completes) digests.push(digestOf(seg.storage, this.storages[seg.storage]));
    }
    this.events.push(["landed", op.message]);
    if (op.hash) this.events.push(["digests", op.message, BigUint64Array.from(digests)]);
  }

  forward(op) {
    this.forwards.push(op.message);
    this.events.push(["forwarded", op.message]);
  }

  nextEvent() {
    return this.events.shift() ?? null;
  }
}

/** Receives a stream vector with the vector's receiver options: the host and the result. */
async function receive(v) {
  const host = new RecordsHost(v);
  const result = await drive(new pgt.Receiver(v.receiver), host);
  assert.equal(host.next, host.recs.length, `${v.file}: records left over`);
  return { host, result };
}

test("stream vectors are received completely, with the expected leaves and bytes", async () => {
  const vs = byKind("stream");
  assert.ok(vs.length >= 3);
  for (const v of vs) {
    const { host, result } = await receive(v);
    const storages = host.storages;
    assert.deepEqual(result.leaves, v.result.leaves, `${v.file}: leaves`);
    const recs = records(v);
    assert.deepEqual(host.paths, pgt.decodeMetadata(recs[0].bytes, recs[1].bytes).path_elems, `${v.file}: paths`);
    assert.equal(storages.length, v.result.storages.length);
    storages.forEach((s, i) => {
      assert.equal(s.length, num(v.result.storages[i].nbytes));
      assert.ok(s.every((b, j) => b === pattern(i, j)), `${v.file}: storage ${i}`);
    });
    if (v.file === "stream_chain.bin") assert.deepEqual(host.forwards, []); // rank 2 ends the chain
  }
});

test("stale streams: records of another transfer are skipped, the result is the transfer's own", async () => {
  const vs = byKind("stale_stream");
  assert.ok(vs.length >= 1);
  for (const v of vs) {
    const { host, result } = await receive(v);
    assert.equal(host.skipped, v.records.filter((r) => r.stale).length, v.file);
    assert.ok(host.skipped >= 3, v.file);
    assert.deepEqual(result.leaves, v.result.leaves, `${v.file}: leaves`);
    host.storages.forEach((s, i) => assert.ok(s.every((b, j) => b === pattern(i, j)), `${v.file}: storage ${i}`));
    // A host that hands the module the stale metadata is refused by name, never served.
    const recs = records(v);
    const r = new pgt.Receiver(v.receiver);
    r.poll();
    r.handleHeader(recs[0].bytes);
    assert.throws(() => r.handleMetadata(recs[1].bytes), (e) => e.name === "TransferMismatch", v.file);
  }
});

test("malformed streams fail with the named error", async () => {
  const vs = byKind("malformed_stream");
  assert.ok(vs.length >= 2);
  for (const v of vs) await assert.rejects(receive(v), isPgtError(v), v.file);
});

test("host_reject streams are refused by the host before the core sees the message", async () => {
  const vs = byKind("host_reject_stream");
  assert.ok(vs.length >= 4);
  for (const v of vs) {
    await assert.rejects(
      receive(v),
      (e) => {
        assert.ok(e instanceof HostReject, `${v.file}: ${e}`);
        assert.deepEqual(e.error, v.host_error, v.file);
        return true;
      },
      v.file,
    );
  }
});

test("every vector kind is tested", () => {
  const kinds = new Set(index.vectors.map((v) => v.kind));
  const tested = [
    "valid_metadata",
    "malformed",
    "receiver_reject",
    "stream",
    "stale_stream",
    "malformed_stream",
    "host_reject_stream",
  ];
  assert.deepEqual([...kinds].sort(), [...tested].sort());
});

test("a JS-driven sender produces each stream's bytes", () => {
  for (const v of byKind("stream")) {
    const recs = records(v);
    const summary = pgt.decodeMetadata(recs[0].bytes, recs[1].bytes);
    const s = new pgt.Sender(summary, summary.digests, undefined, BigInt(summary.header.transfer_id));
    const plan = s.plan();
    const storages = summary.storages.map((st, i) =>
      Uint8Array.from({ length: num(st.nbytes) }, (_, j) => pattern(i, j)),
    );
    const rank = v.receiver.rank;
    const chain = summary.plan.fanout === "Chain";
    const sent = [];
    const digests = [];
    for (;;) {
      // As pgt_core::drive::send, with every send done (and hashed) at once.
      while (digests.length) s.handleDigests(...digests.shift());
      const op = s.poll();
      if (op.type === "done") break;
      assert.equal(op.type, "send", `${v.file}: all digests are reported as sends complete`);
      let bytes;
      if (op.kind === "data") {
        bytes = new Uint8Array(num(op.len));
        bytes.set(prefixBytes(op.prefix)); // the transfer id, then the storage bytes
        const done = [];
        let at = 8;
        for (const seg of plan[op.message].segments) {
          const [off, len] = [num(seg.offset), num(seg.len)];
          bytes.set(storages[seg.storage].subarray(off, off + len), at);
          at += len;
          if (op.hash && seg.completes) done.push(digestOf(seg.storage, storages[seg.storage]));
        }
        if (op.hash) digests.push([op.message, BigUint64Array.from(done)]);
      } else {
        bytes = s.bytes(op.message);
      }
      assert.equal(bytes.length, num(op.len));
      // What `rank` gets: its own messages; in chain mode, data and trailer via the chain.
      if (op.to === rank || (chain && num(op.tag) > 2)) sent.push({ tag: num(op.tag), bytes });
    }
    assert.deepEqual(sent.map((r) => r.tag), recs.map((r) => r.tag), `${v.file}: tags`);
    sent.forEach((r, i) => assert.deepEqual(r.bytes, recs[i].bytes, `${v.file}: message ${i}`));
  }
});

test("bad arguments are errors too, not crashes", () => {
  assert.throws(() => pgt.encode({ source: 0 }, false, undefined, 0n), (e) => e.name === "BadArgument");
  assert.throws(() => new pgt.Receiver({ rank: 1 }), (e) => e.name === "BadArgument");
  const r = new pgt.Receiver({ rank: 1, source: 0 });
  const target = { storage: 0, id: 0, dtype: "float32", nbytes: 4 };
  assert.throws(() => r.finishBindings([target]), (e) => e.name === "UnexpectedCall"); // before the metadata
  assert.throws(() => r.finishBindings([{ ...target, dtype: "float33" }]), (e) => e.name === "BadArgument");
  assert.throws(() => r.finish(), (e) => e.name === "Incomplete");
  assert.throws(() => r.poll(), (e) => e.name === "BadHandle");
});
