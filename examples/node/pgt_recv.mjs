#!/usr/bin/env node
// pgt_recv.mjs: receive a checkpoint from `pgt send` in Node, as one rank of the job.
//
//   MASTER_ADDR=127.0.0.1 MASTER_PORT=29500 RANK=1 WORLD_SIZE=2 PGT_TOKEN=… \
//       node pgt_recv.mjs --out received.safetensors
//
// Division of labour (as examples/python/pgt_recv.py):
// - pgt_tcp.mjs joins the TCP process group and moves bytes;
// - pgt's wasm module (the wasm-bindgen build in wasm/pkg-node, from scripts/build-wasm.sh) makes every
//   protocol decision: it checks the header, decodes and validates the metadata, plans the transfer,
//   says which message to receive from whom into which byte ranges of which storage, what to forward
//   where (chain fan-out), checks the digests and yields the result;
// - this file follows its orders, in the one loop of pgt-core's drive.rs (`receive`): receives data
//   straight into per-storage buffers, hashes each data message's bytes with XXH3-64 when asked
//   (@node-rs/xxhash) and reports the digests of the storages it completes, forwards when asked, and
//   writes the tensors as a safetensors file named and laid out as `pgt recv` writes one.
//
// Exit status: 0 received and verified; 1 pgt protocol error (the module's named error, e.g.
// DigestMismatch); 2 usage or setup error; 3 process-group error (authentication, rendezvous, timeout,
// peer closed).

import { createRequire } from "node:module";
import { existsSync, openSync, writeSync, fsyncSync, closeSync, renameSync, rmSync, statSync } from "node:fs";
import path from "node:path";
import { fileURLToPath } from "node:url";
import { parseArgs } from "node:util";

import { PgError, TcpGroup, optionsFromEnv } from "./pgt_tcp.mjs";

const require = createRequire(import.meta.url);
const here = path.dirname(fileURLToPath(import.meta.url));

const EXIT_PROTOCOL = 1;
const EXIT_SETUP = 2;
const EXIT_GROUP = 3;

// PROTOCOL.md §6: element sizes and safetensors names, by torch name.
const ELEMENT_SIZE = {
  float64: 8, float32: 4, float16: 2, bfloat16: 2, float8_e4m3fn: 1, float8_e5m2: 1, float8_e4m3fnuz: 1,
  float8_e5m2fnuz: 1, complex128: 16, complex64: 8, complex32: 4, int64: 8, int32: 4, int16: 2, int8: 1,
  uint64: 8, uint32: 4, uint16: 2, uint8: 1, bool: 1,
};
const SAFETENSORS_NAME = {
  float64: "F64", float32: "F32", float16: "F16", bfloat16: "BF16", float8_e4m3fn: "F8_E4M3",
  float8_e5m2: "F8_E5M2", int64: "I64", int32: "I32", int16: "I16", int8: "I8", uint64: "U64", uint32: "U32",
  uint16: "U16", uint8: "U8", bool: "BOOL",
};
const METADATA_KEY = "__metadata__";
const STEP_KEY = "pgt.step";

/** The wasm-bindgen build: $PGT_WASM_PKG, else wasm/pkg-node of this repository. */
function loadModule() {
  const dir = process.env.PGT_WASM_PKG || path.join(here, "..", "..", "wasm", "pkg-node");
  if (!existsSync(path.join(dir, "pgt_wasm.js"))) throw new Error(`${dir} is missing: run scripts/build-wasm.sh`);
  return require(dir);
}

const num = (x) => Number(x); // module integers are numbers or, above 2^53 - 1, decimal strings

// Every message after the header starts with the transfer id, u64 little-endian (PROTOCOL.md §2).
export const PREFIX_LEN = 8;
// Stale messages skipped while waiting for one message (pgt_core::header::MAX_STALE), and the longest one
// read whole to see whether it is stale (MAX_STALE_LEN).
export const MAX_STALE = 1024;
export const MAX_STALE_LEN = 2 ** 30 + 16;

/** The 8 bytes a message starts with, from an op's `prefix` ("0x…", the transfer id). */
export function prefixBytes(prefix) {
  const b = Buffer.alloc(PREFIX_LEN);
  b.writeBigUInt64LE(BigInt(prefix));
  return b;
}

/**
 * Whether `message` (or its first bytes) belongs to another transfer than `op`'s: it has a prefix, and the
 * prefix is not `op.prefix` (pgt_core's RecvOp::is_stale). Such a message is never used: skip it and
 * receive the next one with the tag.
 */
export function isStale(op, message) {
  if (op.prefix == null || message.length < PREFIX_LEN) return false;
  return !Buffer.from(message.buffer, message.byteOffset, PREFIX_LEN).equals(prefixBytes(op.prefix));
}

/**
 * Runs receiver `engine` (a pgt.Receiver) to completion over `host` and returns the verified result, as
 * pgt_core::drive::receive does: one loop that reports the host's completions, polls, and acts on the op.
 * The plan (from the metadata) says which storage ranges each data message carries; a forwarded trailer is
 * the trailer as received. The first error — the module's (`e.pgt`) or the host's — ends the transfer;
 * the receiver is freed either way.
 *
 * A host has `recvBytes(op) -> bytes`, `bind(incoming, paths) -> InPlaceTarget[]` (`paths()` gives every
 * leaf's key path), `bound(incoming, bindings)`, `recvData(op, segments)`, `forward(op, payload)` (a data
 * message's segments, or the trailer's bytes) and `nextEvent(wait)`, the next completion:
 * `["landed", m]`, `["digests", m, BigUint64Array]` (the digests of the storages data message m
 * completes, in segment order) or `["forwarded", m]`; null when none is ready (with `wait`: when nothing
 * is in flight); and `discard(op) -> boolean`, which receives a message a failed transfer's plan still says
 * is coming and throws it away (false: stop draining). Any of them may return a promise. Every receive
 * skips messages of other transfers (`isStale`): never use one.
 *
 * After an error the host drains what the plan still says is coming (`engine.leftover()`), so that the
 * next transfer on the link does not meet it (PROTOCOL.md §12).
 */
export async function receive(engine, host) {
  let incoming = null;
  let trailer = new Uint8Array(0);
  let finished = false;
  try {
    for (;;) {
      for (let e; (e = await host.nextEvent(false)) != null; ) apply(engine, e);
      const op = engine.poll();
      if (op.type === "recv") {
        if (op.kind === "header") engine.handleHeader(await host.recvBytes(op));
        else if (op.kind === "metadata") incoming = engine.handleMetadata(await host.recvBytes(op));
        else if (op.kind === "trailer") {
          trailer = await host.recvBytes(op);
          engine.handleTrailer(trailer);
        } else await host.recvData(op, incoming.plan[op.message].segments);
      } else if (op.type === "need_bindings") {
        const bindings = engine.finishBindings(await host.bind(incoming, () => engine.paths()));
        await host.bound(incoming, bindings);
      } else if (op.type === "forward") {
        await host.forward(op, op.kind === "data" ? incoming.plan[op.message].segments : trailer);
      } else if (op.type === "wait") {
        const e = await host.nextEvent(true);
        if (e == null) throw new Error("the receiver waits, but nothing is in flight: incomplete");
        apply(engine, e);
      } else {
        finished = true;
        return engine.finish(); // done: DigestMismatch etc. surface here
      }
    }
  } catch (e) {
    if (!finished) {
      try {
        for (let op; (op = engine.leftover()) != null && (await host.discard(op)); );
      } catch {
        // Draining is best effort: the error that ended the transfer is the one reported.
      }
    }
    throw e;
  } finally {
    engine.free();
  }
}

/** Reports a host's completion to the receiver. */
function apply(engine, [kind, message, digests]) {
  if (kind === "landed") engine.handleData(message);
  else if (kind === "digests") engine.handleDigests(message, digests);
  else engine.handleForwarded(message);
}

/**
 * Moves a transfer's bytes over the process group, each operation at once (its completion is reported at
 * the loop's next turn): data messages straight into per-storage buffers after their 8-byte prefix, hashed
 * with XXH3-64 when the op says so; every storage fresh. Messages of other transfers (stale) are skipped,
 * whatever their length.
 */
export class TcpHost {
  constructor(pg, { timeoutMs, log = () => {} }) {
    Object.assign(this, { pg, timeoutMs, log });
    this.xxh3 = require("@node-rs/xxhash").xxh3;
    this.events = [];
    this.paths = []; // every leaf's key path, for the output's names
    this.buffers = []; // one buffer per storage, of its binding's nbytes
    this.hashers = new Map(); // storage -> Xxh3 of its wire bytes so far
    this.moved = 0;
  }

  /** Counts a stale message of `n` bytes skipped while waiting for `op`'s. */
  skip(op, skipped, n) {
    this.log(`skipped a stale message of ${n} bytes, tag ${op.tag} from rank ${op.from}`);
    if (skipped + 1 > MAX_STALE) {
      throw new Error(`TooManyStale: skipped ${skipped} stale messages waiting for message ${op.message}`);
    }
    return skipped + 1;
  }

  /** The next message with `op`'s tag, whatever its length (up to what a stale message can be). */
  whole(op) {
    return this.pg.recvBytes(op.from, op.tag, Math.max(num(op.len), MAX_STALE_LEN), this.timeoutMs);
  }

  async recvBytes(op) {
    let data;
    for (let skipped = 0; isStale(op, (data = await this.whole(op))); ) skipped = this.skip(op, skipped, data.length);
    if (data.length > num(op.len)) {
      throw new PgError("length", `message with tag ${op.tag} from rank ${op.from} has ${data.length} bytes, more than the limit of ${op.len}`);
    }
    this.log(`${op.kind}: ${data.length} bytes from rank ${op.from}`);
    return data;
  }

  bind(incoming, paths) {
    // No in-place targets: every storage gets a fresh buffer. The key paths name the tensors.
    this.paths = paths();
    return [];
  }

  bound(incoming, bindings) {
    this.buffers = bindings.map((b) => {
      if (b.dest !== "fresh" || b.cast_from !== null) throw new Error(`unexpected binding ${JSON.stringify(b)}`);
      return Buffer.alloc(num(b.nbytes));
    });
  }

  parts(segments) {
    return segments.map((s) => this.buffers[s.storage].subarray(num(s.offset), num(s.offset) + num(s.len)));
  }

  async recvData(op, segments) {
    const parts = this.parts(segments);
    const prefix = Buffer.alloc(PREFIX_LEN);
    for (let skipped = 0; ; ) {
      let n = num(op.len);
      try {
        // The prefix into its own 8 bytes, the rest straight into the storages.
        await this.pg.recvInto(op.from, op.tag, [prefix, ...parts], this.timeoutMs);
        if (!isStale(op, prefix)) break; // a stale message's bytes are overwritten by the next
      } catch (e) {
        if (!(e instanceof PgError && e.kind === "length")) throw e;
        // Another length: stale (skip it), or this transfer's (the transfer fails).
        const whole = await this.whole(op);
        if (!isStale(op, whole)) throw e;
        n = whole.length;
      }
      skipped = this.skip(op, skipped, n);
    }
    this.moved += num(op.len) - PREFIX_LEN;
    this.events.push(["landed", op.message]);
    if (op.hash) {
      const digests = [];
      segments.forEach((s, i) => {
        let h = this.hashers.get(s.storage);
        if (!h) this.hashers.set(s.storage, (h = this.xxh3.Xxh3.withSeed(0n)));
        h.update(parts[i]);
        if (s.completes) {
          digests.push(h.digest()); // the storage's last bytes: its digest is done
          this.hashers.delete(s.storage);
        }
      });
      this.events.push(["digests", op.message, BigUint64Array.from(digests)]);
    }
  }

  async forward(op, payload) {
    // The trailer as received (prefix included), or a data message's prefix and segments as received.
    const parts = payload instanceof Uint8Array ? [payload] : [prefixBytes(op.prefix), ...this.parts(payload)];
    await this.pg.send(op.to, op.tag, parts, this.timeoutMs);
    this.events.push(["forwarded", op.message]);
    this.log(`forwarded message ${op.message} to rank ${op.to}`);
  }

  nextEvent() {
    return this.events.shift() ?? null;
  }

  /** Receives a message a failed transfer still sends and throws it away; false when the link fails. */
  async discard(op) {
    try {
      let data;
      for (let skipped = 0; isStale(op, (data = await this.whole(op))); ) skipped = this.skip(op, skipped, data.length);
    } catch {
      return false;
    }
    this.log(`drained message ${op.message} from rank ${op.from}`);
    return true;
  }
}

/** Receives one checkpoint from rank `src` over the group: {result, paths, buffers, bytes}. */
export async function receiveCheckpoint(pg, pgt, { src, expectedStep = null, timeoutMs, log = () => {} }) {
  const engine = new pgt.Receiver({ rank: pg.rank, source: src, expected_step: expectedStep });
  const host = new TcpHost(pg, { timeoutMs, log });
  const result = await receive(engine, host);
  return { result, paths: host.paths, buffers: host.buffers, bytes: host.moved };
}

/** A key path as pgt displays it: elements joined by '.', '<root>' for the empty path. */
const display = (p) => (p.length ? p.map((e) => String(e.key ?? e.int_key ?? e.index)).join(".") : "<root>");

/** The elements of view `layout` of storage `buf`, row-major (a subarray when dense, else gathered). */
function viewBytes(buf, layout) {
  const es = ELEMENT_SIZE[layout.dtype];
  const shape = layout.shape.map(num);
  const stride = layout.stride.map(num);
  const off = num(layout.storage_offset);
  const numel = shape.reduce((a, b) => a * b, 1);
  if (numel === 0) return Buffer.alloc(0);
  let dense = true;
  for (let d = shape.length - 1, expect = 1; d >= 0; expect *= shape[d], d--) {
    if (shape[d] !== 1 && stride[d] !== expect) {
      dense = false;
      break;
    }
  }
  if (dense) return buf.subarray(off * es, (off + numel) * es);
  const out = Buffer.alloc(numel * es);
  const idx = new Array(shape.length).fill(0);
  for (let k = 0; k < numel; k++) {
    let e = off;
    for (let d = 0; d < shape.length; d++) e += idx[d] * stride[d];
    buf.copy(out, k * es, e * es, (e + 1) * es);
    for (let d = shape.length - 1; d >= 0 && ++idx[d] === shape[d]; d--) idx[d] = 0;
  }
  return out;
}

/** A value leaf as a safetensors metadata string (as pgt's safetensors_io::value_repr). */
function valueRepr(v) {
  switch (v.type) {
    case "none":
      return "null";
    case "bool":
      return v.value ? "true" : "false";
    case "int":
      return String(v.value);
    case "float": {
      const f = Buffer.from(BigInt(v.bits).toString(16).padStart(16, "0"), "hex").readDoubleBE(0);
      if (Number.isNaN(f)) return "NaN";
      if (!Number.isFinite(f)) return f > 0 ? "inf" : "-inf";
      return JSON.stringify(f);
    }
    case "str":
      return v.value;
    default:
      return "0x" + v.hex;
  }
}

/** JSON with sorted keys and no spaces (as serde_json writes pgt's metadata entries). */
const sortedJson = (x) =>
  Array.isArray(x)
    ? `[${x.map(sortedJson).join(",")}]`
    : x !== null && typeof x === "object"
      ? `{${Object.keys(x).sort().map((k) => `${JSON.stringify(k)}:${sortedJson(x[k])}`).join(",")}}`
      : JSON.stringify(x);

/** [name, dtype, shape, bytes] for every tensor of the result, and the metadata map, named and laid out
 * as `pgt recv` writes a safetensors file (host/src/safetensors_io.rs). */
export function tensorsOf({ result, paths, buffers }) {
  const root = result.tree[0];
  const writeMetadata = typeof root === "object" && root.dict?.includes(METADATA_KEY);
  const tensors = [];
  const metadata = {};
  const names = new Set();
  const meta = (k, v) => {
    if (k in metadata) throw new Error(`${k}: two values would share this __metadata__ entry`);
    metadata[k] = v;
  };
  let storage = 0;
  const add = (name, layout) => {
    if (names.has(name)) throw new Error(`${name}: two tensors would share this name`);
    names.add(name);
    tensors.push([name, layout.dtype, layout.shape.map(num), viewBytes(buffers[storage], layout)]);
    storage += 1;
  };
  result.leaves.forEach((leaf, i) => {
    const p = paths[i];
    const name = display(p);
    if (leaf.kind === "value") {
      if (p.length > 1 && p[0].key === METADATA_KEY) meta(display(p.slice(1)), valueRepr(leaf.value));
      else meta(name, valueRepr(leaf.value));
    } else if (leaf.kind === "tensor") {
      add(name, leaf.layout);
    } else if (leaf.kind === "dtensor") {
      const spec = leaf.spec;
      meta(`pgt.dtensor.${name}`, sortedJson({ global_shape: spec.global_shape.map(num), mesh: spec.mesh.shape.map(num), placements: spec.placements }));
      add(name, leaf.local);
    } else {
      const g = leaf.global;
      meta(
        `pgt.sharded.${name}`,
        sortedJson({
          global_size: g.global_size.map(num),
          dtype: g.dtype,
          local_shards: leaf.local_shards.map((s) => ({ offsets: s.meta.offsets.map(num), sizes: s.meta.sizes.map(num), placement: s.meta.placement })),
        }),
      );
      leaf.local_shards.forEach((shard, k) => add(`${name}.shard${k}`, shard.layout));
    }
  });
  if (result.step !== null && result.step !== undefined) metadata[STEP_KEY] = String(result.step);
  return [tensors, writeMetadata || Object.keys(metadata).length ? metadata : null];
}

/** The safetensors format: u64 LE header size, JSON header padded with spaces to 8 bytes, the bytes. */
export function writeSafetensors(file, tensors, metadata) {
  const header = {};
  if (metadata) header[METADATA_KEY] = metadata;
  let offset = 0;
  for (const [name, dtype, shape, data] of tensors) {
    const st = SAFETENSORS_NAME[dtype];
    if (!st) throw new Error(`${name}: dtype ${dtype} has no safetensors name`);
    header[name] = { dtype: st, shape, data_offsets: [offset, offset + data.length] };
    offset += data.length;
  }
  let h = Buffer.from(JSON.stringify(header));
  h = Buffer.concat([h, Buffer.alloc((8 - (h.length % 8)) % 8, " ")]);
  const size = Buffer.alloc(8);
  size.writeBigUInt64LE(BigInt(h.length));
  const tmp = path.join(path.dirname(file), `.${path.basename(file)}.tmp-${process.pid}`);
  try {
    const fd = openSync(tmp, "w");
    try {
      for (const b of [size, h, ...tensors.map((t) => t[3])]) {
        for (let at = 0; at < b.length; ) at += writeSync(fd, b, at, b.length - at);
      }
      fsyncSync(fd);
    } finally {
      closeSync(fd);
    }
    renameSync(tmp, file);
  } finally {
    rmSync(tmp, { force: true });
  }
}

async function main() {
  let args;
  try {
    ({ values: args } = parseArgs({
      options: {
        out: { type: "string" },
        src: { type: "string", default: "0" },
        "expect-step": { type: "string" },
        timeout: { type: "string", default: "120" },
        quiet: { type: "boolean", short: "q", default: false },
        verbose: { type: "boolean", short: "v", default: false },
      },
    }));
    if (!args.out) throw new Error("give --out FILE.safetensors");
    const dir = path.dirname(path.resolve(args.out));
    if (!existsSync(dir) || !statSync(dir).isDirectory()) throw new Error(`cannot write ${args.out}: ${dir} is not a directory`);
  } catch (e) {
    console.error(`pgt_recv: error: ${e.message}`);
    return EXIT_SETUP;
  }
  const src = Number(args.src);
  const log = args.verbose ? (m) => console.error(`pgt_recv: ${m}`) : () => {};
  let pgt, opts;
  try {
    pgt = loadModule();
    opts = optionsFromEnv();
  } catch (e) {
    console.error(`pgt_recv: error: ${e.message}`);
    return EXIT_SETUP;
  }
  let pg = null;
  let rec;
  const start = Date.now();
  try {
    pg = await TcpGroup.join(opts, log);
    rec = await receiveCheckpoint(pg, pgt, {
      src,
      expectedStep: args["expect-step"] ?? null,
      timeoutMs: Number(args.timeout) * 1000,
      log,
    });
  } catch (e) {
    if (e instanceof PgError) {
      const what = pg ? `receiving from rank ${src}` : `rank ${opts.rank} could not join the job at ${opts.masterAddr}:${opts.masterPort}`;
      console.error(`pgt_recv: error: ${what}: ${e.kind}: ${e.message}`);
      return EXIT_GROUP;
    }
    if (e && e.pgt) {
      console.error(`pgt_recv: error: receiving from rank ${src}: pgt error ${e.name}: ${e.message}`);
      return EXIT_PROTOCOL;
    }
    console.error(`pgt_recv: error: receiving from rank ${src}: ${e?.stack ?? e}`);
    return EXIT_PROTOCOL;
  } finally {
    if (pg) pg.close();
  }
  const seconds = (Date.now() - start) / 1000;
  try {
    const [tensors, metadata] = tensorsOf(rec);
    writeSafetensors(args.out, tensors, metadata);
    if (!args.quiet) {
      const step = rec.result.step ?? "none";
      console.error(
        `received ${args.out} from rank ${src} (step ${step}): ${rec.bytes} bytes, ${tensors.length} tensors, ` +
          `${seconds.toFixed(3)} s, ${(rec.bytes / Math.max(seconds, 1e-9) / 1e9).toFixed(2)} GB/s`,
      );
    }
  } catch (e) {
    console.error(`pgt_recv: error: writing the checkpoint: ${e.message}`);
    return EXIT_SETUP;
  }
  return 0;
}

if (process.argv[1] && path.resolve(process.argv[1]) === fileURLToPath(import.meta.url)) {
  process.exitCode = await main();
}
